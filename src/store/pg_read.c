/*
 * pg_read.c: the reads of the PostgreSQL store: load (everything, once, at start),
 * readers (paged exports) and generated ballots for tests and benchmarks. Each uses a
 * connection of its own, never the writer's or the follower's.
 */
#include "store/pg_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rows per FETCH of a load cursor. */
#define LOAD_FETCH "5000"

static const char *cs(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t ci(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? 0 : strtoll(PQgetvalue(res, row, col), NULL, 10);
}

/* bytea (text output) into out; *p NULL for SQL NULL or, as SQLite reads a zero-length
 * blob, for an empty value. Returns 0, or -1 when malformed or longer than cap. */
static int cbytes(const PGresult *res, int row, int col, uint8_t *out, size_t cap, const uint8_t **p, int *n)
{
    *p = NULL;
    *n = 0;
    if (PQgetisnull(res, row, col))
        return 0;
    if ((*n = pg_unhex(PQgetvalue(res, row, col), out, cap)) < 0)
        return -1;
    *p = *n > 0 ? out : NULL;
    return 0;
}

static int chash(const PGresult *res, int row, int col, uint8_t h[16])
{
    const uint8_t *p;
    int n;
    memset(h, 0, 16);
    return cbytes(res, row, col, h, 16, &p, &n) != 0 || (p != NULL && n != 16) ? -1 : 0;
}

/* ---- load ------------------------------------------------------------------------ */

typedef int (*row_fn)(void *arg, const PGresult *res, int row);

/* Streams a query through a cursor, so that memory stays bounded by one fetch however
 * many rows there are (10 million ballots at restart). */
static int each_row(PGconn *c, const char *declare, row_fn fn, void *arg)
{
    int rc = TLY_EIO;
    PGresult *res = PQexec(c, declare);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_log_error("store: postgres load failed", c, res);
        PQclear(res);
        return TLY_EIO;
    }
    PQclear(res);
    for (;;) {
        res = PQexec(c, "FETCH " LOAD_FETCH " FROM tly_load");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            pg_log_error("store: postgres load failed", c, res);
            goto fail;
        }
        int n = PQntuples(res);
        for (int i = 0; i < n; i++)
            if ((rc = fn(arg, res, i)) != 0)
                goto fail;
        PQclear(res);
        res = NULL;
        if (n == 0)
            break;
    }
    rc = pg_exec(c, "CLOSE tly_load", PGRES_COMMAND_OK);
fail:
    PQclear(res);
    return rc == 0 ? 0 : rc < 0 ? rc : TLY_EIO;
}

typedef struct {
    tly_load_t check; /* the checks and the bad-row rule (load.c) */
    tly_option_row_t *opts;
    size_t nopts;
} load_t;

static int load_user(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    tly_user_row_t u = {cs(res, i, 0), cs(res, i, 1), cs(res, i, 2), cs(res, i, 3), ci(res, i, 4)};
    return tly_load_user(&l->check, &u);
}

static int load_link(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    tly_device_link_row_t d = {cs(res, i, 0), cs(res, i, 1), ci(res, i, 2)};
    return tly_load_link(&l->check, &d);
}

/* A poll row that does not decode; its ballots follow as ballots of a poll load has
 * not seen, bad rows too. */
static int bad_poll(load_t *l, const char *poll_id, const char *why)
{
    char key[TLY_LOAD_KEY_MAX];
    tly_load_key(key, "poll_id", poll_id, NULL);
    return tly_load_bad(&l->check, "polls", key, why);
}

static int load_poll(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    json_error_t err;
    int rc;
    tly_poll_row_t p = {
        .poll_id = cs(res, i, 0),
        .owner_id = cs(res, i, 1),
        .title = cs(res, i, 2),
        .description = cs(res, i, 3),
        .type = (int)ci(res, i, 4),
        .status = (int)ci(res, i, 5),
        .start_time = ci(res, i, 6),
        .end_time = ci(res, i, 7),
        .settings_json = cs(res, i, 8),
        .created_at = ci(res, i, 9),
        .updated_at = ci(res, i, 10),
        .idem_key = cs(res, i, 11),
        .final_results = cs(res, i, 13),
        .join_code = cs(res, i, 15),
    };
    if (chash(res, i, 12, p.body_hash) != 0)
        return bad_poll(l, p.poll_id, "body_hash is not 16 bytes");
    /* Built by the query from the options table: only out of memory makes it unreadable
     * (jansson allocates through the wrapper). */
    json_t *opts = json_loads(PQgetvalue(res, i, 14), 0, &err);
    size_t n = json_array_size(opts);
    if (opts == NULL)
        return TLY_ENOMEM;
    if (n > l->nopts) {
        tly_option_row_t *o = tly_realloc(l->opts, n * sizeof *o);
        if (o == NULL) {
            json_decref(opts);
            return TLY_ENOMEM;
        }
        l->opts = o;
        l->nopts = n;
    }
    for (size_t k = 0; k < n; k++) {
        const json_t *x = json_array_get(opts, k);
        l->opts[k] = (tly_option_row_t){
            json_string_value(json_array_get(x, 0)), json_string_value(json_array_get(x, 1)),
            (int)json_integer_value(json_array_get(x, 2)), (int)json_integer_value(json_array_get(x, 3))};
    }
    p.noptions = n;
    p.options = n ? l->opts : NULL;
    rc = tly_load_poll(&l->check, &p);
    json_decref(opts);
    return rc;
}

/* Room for a decoded ballot's byte fields. */
typedef struct {
    uint8_t choices[256], scores[256], ip[16];
} ballot_buf_t;

/* A ballot row's columns from `at` on: poll_id, voter_id, vote_id, receipt, choices,
 * scores, recorded_at, idem_key, body_hash, client_meta, and ip_hash when with_ip (load;
 * pages leave it out). The byte fields of *b point into buf. NULL, or what is wrong
 * with the row. */
static const char *decode_ballot(const PGresult *res, int i, int at, int with_ip, ballot_buf_t *buf,
                                 tly_ballot_row_t *b)
{
    int n = 0, ns = 0, ni = 0;
    const uint8_t *ipp = NULL;
    *b = (tly_ballot_row_t){
        .poll_id = cs(res, i, at),
        .voter_id = cs(res, i, at + 1),
        .vote_id = cs(res, i, at + 2),
        .receipt = cs(res, i, at + 3),
        .recorded_at = ci(res, i, at + 6),
        .idem_key = cs(res, i, at + 7),
        .client_meta = cs(res, i, at + 9),
    };
    if (cbytes(res, i, at + 4, buf->choices, 255, &b->choices, &n) != 0)
        return "choices is longer than 255 bytes";
    if (cbytes(res, i, at + 5, buf->scores, 255, &b->scores, &ns) != 0 || (b->scores != NULL && ns != n))
        return "scores is not as long as choices";
    if (chash(res, i, at + 8, b->body_hash) != 0)
        return "body_hash is not 16 bytes";
    if (with_ip && (cbytes(res, i, at + 10, buf->ip, 16, &ipp, &ni) != 0 || (ipp != NULL && ni != 16)))
        return "ip_hash is not 16 bytes";
    b->nchoices = (uint8_t)n;
    b->ip_hash = ipp;
    return NULL;
}

static int load_ballot(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    ballot_buf_t buf;
    tly_ballot_row_t b;
    int64_t seq = ci(res, i, 11);
    const char *bad = decode_ballot(res, i, 0, 1, &buf, &b);
    if (bad != NULL) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%" PRId64, seq);
        tly_load_key(key, "seq", seqs, "poll_id", b.poll_id, "voter_id", b.voter_id, NULL);
        return tly_load_bad(&l->check, "ballots", key, bad);
    }
    return tly_load_ballot(&l->check, &b, seq);
}

static int load_request(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    tly_request_row_t r = {cs(res, i, 0), cs(res, i, 1), cs(res, i, 2), cs(res, i, 3),
                           cs(res, i, 4), cs(res, i, 5), ci(res, i, 6)};
    return tly_load_request(&l->check, &r);
}

static int load_retracted(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    int64_t seq = ci(res, i, 5);
    tly_retracted_row_t r = {
        .poll_id = cs(res, i, 0), .voter_id = cs(res, i, 1), .idem_key = cs(res, i, 2), .at = ci(res, i, 4)};
    if (chash(res, i, 3, r.body_hash) != 0) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%" PRId64, seq);
        tly_load_key(key, "seq", seqs, NULL);
        return tly_load_bad(&l->check, "audit", key, "body_hash is not 16 bytes");
    }
    return tly_load_retracted(&l->check, &r, seq);
}

static int load_cast(void *arg, const PGresult *res, int i)
{
    load_t *l = arg;
    ballot_buf_t buf;
    int n, ns;
    tly_ballot_row_t b = {.poll_id = cs(res, i, 0), .voter_id = cs(res, i, 1), .recorded_at = ci(res, i, 4)};
    int64_t seq = ci(res, i, 5);
    if (cbytes(res, i, 2, buf.choices, 255, &b.choices, &n) != 0 ||
        cbytes(res, i, 3, buf.scores, 255, &b.scores, &ns) != 0 || (b.scores != NULL && ns != n)) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
        tly_load_key(key, "seq", seqs, "poll_id", b.poll_id, "voter_id", b.voter_id, NULL);
        return tly_load_bad(&l->check, "ballots", key, "cast_choices or cast_scores do not decode");
    }
    b.nchoices = (uint8_t)n;
    return tly_load_cast(&l->check, &b, seq);
}

int pg_load(pg_store_t *s, const tly_store_load_cb_t *cb, void *ctx)
{
    int rc = TLY_EIO;
    int64_t head = 0;
    load_t l = {0};
    PGresult *res = NULL;
    PGconn *c = pg_connect(s, "load");

    tly_load_init(&l.check, cb, ctx);

    if (c == NULL)
        return TLY_EIO;
    /* One snapshot for the rows and the feed position: the follower starts right after
     * what this returns, so nothing is missed and nothing is applied twice. */
    if (pg_exec(c, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", PGRES_COMMAND_OK) != 0)
        goto fail;
    res = PQexec(c, "SELECT seq FROM feed_head");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        pg_log_error("store: postgres load failed", c, res);
        goto fail;
    }
    head = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    res = NULL;
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT user_id, username, password_hash, email, created_at FROM users ORDER BY ord",
                       load_user, &l)) != 0)
        goto fail;
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT device_id, user_id, linked_at FROM device_links ORDER BY linked_at, device_id",
                       load_link, &l)) != 0)
        goto fail;
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT poll_id, owner_id, title, description, type, status, start_time, end_time,"
                       " settings, created_at, updated_at, idem_key, body_hash, final_results,"
                       " (SELECT coalesce(json_agg(json_build_array(o.option_id, o.text, o.display_order,"
                       " o.position) ORDER BY o.position), '[]'::json) FROM options o"
                       " WHERE o.poll_id = p.poll_id), join_code FROM polls p ORDER BY ord",
                       load_poll, &l)) != 0)
        goto fail;
    /* seq order: a merge of the partitions' seq indexes, streamed. */
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"
                       " body_hash, client_meta, ip_hash, seq FROM ballots ORDER BY seq",
                       load_ballot, &l)) != 0)
        goto fail;
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT request_id, poll_id, voter_id, state, vote_id, error, created_at"
                       " FROM vote_requests ORDER BY ord",
                       load_request, &l)) != 0)
        goto fail;
    char retracted_sql[256];
    snprintf(retracted_sql, sizeof retracted_sql,
             "DECLARE tly_load NO SCROLL CURSOR FOR SELECT poll_id, voter_id, idem_key, body_hash, at, seq FROM audit"
             " WHERE event = 'revoked' AND idem_key IS NOT NULL AND at >= %" PRId64 " ORDER BY seq",
             cb->retracted_since);
    if ((rc = each_row(c, retracted_sql, load_retracted, &l)) != 0)
        goto fail;
    if ((rc = each_row(c,
                       "DECLARE tly_load NO SCROLL CURSOR FOR"
                       " SELECT poll_id, voter_id, cast_choices, cast_scores, cast_at, seq FROM ballots"
                       " WHERE cast_at IS NOT NULL AND idem_key IS NOT NULL",
                       load_cast, &l)) != 0)
        goto fail;
    if ((rc = pg_exec(c, "COMMIT", PGRES_COMMAND_OK)) != 0)
        goto fail;
    rc = 0;
fail:
    PQclear(res);
    PQfinish(c);
    tly_free(l.opts);
    rc = tly_load_finish(&l.check, rc);
    if (rc >= 0) /* loaded (bad rows left out, if any): follow from the snapshot on */
        pg_feed_start(s, head + 1, 1);
    return rc;
}

/* ---- readers: paged reads for exports -------------------------------------------------- */

/* Both walk their (poll_id, seq) index of the one partition poll_id hashes to. */
const char tly_store_pg_audit_page_sql[] = "SELECT seq, poll_id, voter_id, event, choices, scores, at FROM audit"
                                           " WHERE poll_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
const char tly_store_pg_ballots_page_sql[] =
    "SELECT seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"
    " body_hash, client_meta FROM ballots WHERE poll_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

tly_store_reader_t *pg_reader_open(pg_store_t *s)
{
    pg_reader_t *r = tly_calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->base.be = &tly_store_pg;
    if ((r->c = pg_connect(s, "reader")) == NULL) {
        tly_free(r);
        return NULL;
    }
    return &r->base;
}

void pg_reader_close(tly_store_reader_t *rd)
{
    pg_reader_t *r = (pg_reader_t *)rd;
    if (r == NULL)
        return;
    PQfinish(r->c);
    tly_free(r);
}

/* Runs a page query; NULL (logged) on failure. A connection the server dropped is
 * reconnected once per call, so an export survives a restart of the server. */
static PGresult *page_query(pg_reader_t *r, const char *sql, const char *poll_id, int64_t after_seq, size_t limit)
{
    char after[24], lim[24];
    const char *params[3] = {poll_id, after, lim};
    snprintf(after, sizeof after, "%lld", (long long)after_seq);
    snprintf(lim, sizeof lim, "%lld", (long long)(limit > INT_MAX ? INT_MAX : limit));
    if (pg_conn_lost(r->c)) {
        PQreset(r->c);
        if (pg_conn_lost(r->c) || PQsetClientEncoding(r->c, "UTF8") != 0) {
            pg_log_error("store: postgres reader cannot reconnect", r->c, NULL);
            return NULL;
        }
    }
    PGresult *res = PQexecParams(r->c, sql, 3, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_log_error("store: postgres page read failed", r->c, res);
        PQclear(res);
        return NULL;
    }
    return res;
}

/* A page of rows: row(res, i, arg) decodes row i and passes it on (TLY_EIO when it is
 * malformed, which ends the page). Returns the number of rows or TLY_EIO. */
static int page_rows(pg_reader_t *r, const char *sql, const char *poll_id, int64_t after_seq, size_t limit,
                     int (*row)(const PGresult *res, int i, void *arg), void *arg)
{
    if (limit == 0)
        return 0;
    PGresult *res = page_query(r, sql, poll_id, after_seq, limit);
    if (res == NULL)
        return TLY_EIO;
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        if (row(res, i, arg) != 0) {
            PQclear(res);
            return TLY_EIO;
        }
    }
    PQclear(res);
    return n;
}

typedef struct {
    void (*audit)(void *ctx, const tly_audit_row_t *row);
    void (*ballot)(void *ctx, const tly_ballot_row_t *row, int64_t seq);
    void *ctx;
} page_cb_t;

/* A page met a row that does not decode (a start with --skip-bad-rows leaves such rows
 * in the store): the page fails, and the log says which row. */
static void page_malformed(const char *table, int64_t seq, const char *why)
{
    char key[32];
    snprintf(key, sizeof key, "seq=%" PRId64, seq);
    tly_log(TLY_LOG_ERROR, "store: malformed row", "table", table, "key", key, "reason", why, NULL);
}

static int audit_row(const PGresult *res, int i, void *arg)
{
    const page_cb_t *pc = arg;
    uint8_t choices[256], scores[256];
    int nc, ns;
    tly_audit_row_t a = {
        .seq = ci(res, i, 0),
        .poll_id = cs(res, i, 1),
        .voter_id = cs(res, i, 2),
        .event = cs(res, i, 3),
        .at = ci(res, i, 6),
    };
    if (cbytes(res, i, 4, choices, 255, &a.choices, &nc) != 0 || cbytes(res, i, 5, scores, 255, &a.scores, &ns) != 0 ||
        (a.scores != NULL && ns != nc)) {
        page_malformed("audit", a.seq, "choices or scores longer than 255 bytes, or of different lengths");
        return TLY_EIO;
    }
    a.nchoices = (uint8_t)nc;
    pc->audit(pc->ctx, &a);
    return 0;
}

static int ballot_row(const PGresult *res, int i, void *arg)
{
    const page_cb_t *pc = arg;
    ballot_buf_t buf;
    tly_ballot_row_t b;
    const char *bad = decode_ballot(res, i, 1, 0, &buf, &b); /* column 0 is the seq */
    if (bad != NULL) {
        page_malformed("ballots", ci(res, i, 0), bad);
        return TLY_EIO;
    }
    pc->ballot(pc->ctx, &b, ci(res, i, 0));
    return 0;
}

int pg_audit_page(tly_store_reader_t *rd, const char *poll_id, int64_t after_seq, size_t limit,
                  void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx)
{
    page_cb_t pc = {.audit = cb, .ctx = ctx};
    return page_rows((pg_reader_t *)rd, tly_store_pg_audit_page_sql, poll_id, after_seq, limit, audit_row, &pc);
}

int pg_ballots_page(tly_store_reader_t *rd, const char *poll_id, int64_t after_seq, size_t limit,
                    void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx)
{
    page_cb_t pc = {.ballot = cb, .ctx = ctx};
    return page_rows((pg_reader_t *)rd, tly_store_pg_ballots_page_sql, poll_id, after_seq, limit, ballot_row, &pc);
}

/* ---- generated ballots, for tests and benchmarks ------------------------------------- */

#define GENERATE_CHUNK 10000

/* Ballots first..last of a poll in one statement, with their counters and audit rows.
 * The choice is sqlite.c's: Fibonacci hashing of i over the options. */
static const char generate_sql[] =
    "WITH g AS (SELECT i, (((i * 2654435761) % 4294967296) >> 8) % $4::bigint AS c"
    "  FROM generate_series($2::bigint, $3::bigint) AS i),"
    "p AS (SELECT poll_id FROM polls WHERE poll_id = $1 FOR KEY SHARE),"
    "ins AS (INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
    "  SELECT p.poll_id, 'gen' || g.i, 'g_' || p.poll_id || '_' || g.i, 'gr_' || p.poll_id || '_' || g.i,"
    "    set_byte('\\x00'::bytea, 0, g.c::int), $5::bigint FROM g, p ORDER BY g.i"
    "  RETURNING poll_id, voter_id, choices, recorded_at),"
    "c AS (UPDATE option_counts oc SET votes = oc.votes + d.n"
    "  FROM (SELECT get_byte(choices, 0) AS position, count(*) AS n FROM ins GROUP BY 1) d"
    "  WHERE oc.poll_id = $1 AND oc.position = d.position),"
    "t AS (UPDATE poll_counts SET ballots = ballots + (SELECT count(*) FROM ins) WHERE poll_id = $1),"
    "a AS (INSERT INTO audit(poll_id, voter_id, event, choices, at)"
    "  SELECT poll_id, voter_id, 'cast', choices, recorded_at FROM ins)"
    "SELECT count(*) FROM ins";

int pg_generate_ballots(pg_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    int rc = TLY_EIO;
    char from[24], to[24], nopt[24], now[24];
    const char *params[5] = {poll_id, from, to, nopt, now};
    PGresult *res = NULL;
    PGconn *c;

    if (poll_id == NULL || noptions == 0 || noptions > 256)
        return TLY_EINVAL;
    if ((c = pg_connect(s, "generate")) == NULL)
        return TLY_EIO;
    res = PQexecParams(c, "SELECT 1 FROM polls WHERE poll_id = $1", 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_log_error("store: postgres generate failed", c, res);
        goto fail;
    }
    if (PQntuples(res) == 0) {
        rc = TLY_ENOTFOUND;
        goto fail;
    }
    PQclear(res);
    res = NULL;
    snprintf(nopt, sizeof nopt, "%zu", noptions);
    snprintf(now, sizeof now, "%lld", (long long)tly_now_ms());
    for (size_t i = 0; i < n; i += GENERATE_CHUNK) {
        size_t last = i + GENERATE_CHUNK < n ? i + GENERATE_CHUNK - 1 : n - 1;
        snprintf(from, sizeof from, "%zu", i);
        snprintf(to, sizeof to, "%zu", last);
        if (pg_exec(c, "BEGIN", PGRES_COMMAND_OK) != 0)
            goto fail;
        res = PQexecParams(c, generate_sql, 5, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            if (st != NULL && strcmp(st, "23505") == 0)
                rc = TLY_EEXIST;
            else
                pg_log_error("store: postgres generate failed", c, res);
            PQclear(PQexec(c, "ROLLBACK"));
            goto fail;
        }
        PQclear(res);
        res = NULL;
        if (pg_exec(c, "COMMIT", PGRES_COMMAND_OK) != 0)
            goto fail;
    }
    rc = 0;
fail:
    PQclear(res);
    PQfinish(c);
    return rc;
}
