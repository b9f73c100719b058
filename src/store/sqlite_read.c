/*
 * sqlite_read.c: what the SQLite backend reads beside the writer, each on a connection
 * of its own: load (the whole state, at start), the readers' paged reads for exports,
 * and generated ballots for tests and benchmarks.
 */
#include "store/sqlite_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

/* ---- load ------------------------------------------------------------------------ */

static const char *col_str(sqlite3_stmt *st, int i) { return (const char *)sqlite3_column_text(st, i); }

/* A 16-byte hash column: 0, or -1 when it holds something else (NULL reads as zeros). */
static int col_hash(sqlite3_stmt *st, int i, uint8_t out[16])
{
    const void *p = sqlite3_column_blob(st, i);
    memset(out, 0, 16);
    if (p == NULL)
        return 0;
    if (sqlite3_column_bytes(st, i) != 16)
        return -1;
    memcpy(out, p, 16);
    return 0;
}

/* Choices and scores of a row: NULL when they are well formed, else what is wrong. A
 * zero-length blob reads as NULL (SQLite's rule), so an empty ballot has nchoices 0 and
 * NULL choices. */
static const char *col_choices(sqlite3_stmt *st, int ichoices, int iscores, uint8_t *n, const uint8_t **choices,
                               const uint8_t **scores)
{
    /* Pointer first, then size: SQLite's documented order for a value it may convert. */
    *choices = sqlite3_column_blob(st, ichoices);
    int nchoices = sqlite3_column_bytes(st, ichoices);
    *scores = sqlite3_column_blob(st, iscores);
    int nscores = sqlite3_column_bytes(st, iscores);
    *n = 0;
    if (nchoices > UINT8_MAX)
        return "choices is longer than 255 bytes";
    if (*scores != NULL && nscores != nchoices)
        return "scores is not as long as choices";
    *n = (uint8_t)nchoices;
    return NULL;
}

/* The ballot columns that load and the ballot pages share, from column `at` on:
 * poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,
 * body_hash, client_meta. NULL, or what is wrong with the row. */
static const char *col_ballot(sqlite3_stmt *st, int at, tly_ballot_row_t *b)
{
    *b = (tly_ballot_row_t){
        .poll_id = col_str(st, at),
        .voter_id = col_str(st, at + 1),
        .vote_id = col_str(st, at + 2),
        .receipt = col_str(st, at + 3),
        .recorded_at = sqlite3_column_int64(st, at + 6),
        .idem_key = col_str(st, at + 7),
        .client_meta = col_str(st, at + 9),
    };
    if (col_hash(st, at + 8, b->body_hash) != 0)
        return "body_hash is not 16 bytes";
    return col_choices(st, at + 4, at + 5, &b->nchoices, &b->choices, &b->scores);
}

/* A poll's options, gathered before its callback: they come from a second statement, so
 * their strings are copied (SQLite's pointers die at the next step). Reused per poll. */
typedef struct {
    size_t id, text; /* offsets into buf: buf may move while rows are gathered */
} option_off_t;

typedef struct {
    tly_option_row_t *rows;
    option_off_t *off;
    size_t n, cap;
    char *buf;
    size_t len, bufcap;
} option_buf_t;

static int option_buf_add(option_buf_t *ob, sqlite3_stmt *st)
{
    const char *id = col_str(st, 0), *text = col_str(st, 1);
    size_t idn = id ? strlen(id) + 1 : 1, textn = text ? strlen(text) + 1 : 1;
    if (ob->n == ob->cap) {
        size_t cap = ob->cap ? ob->cap * 2 : 16;
        tly_option_row_t *rows = tly_realloc(ob->rows, cap * sizeof *rows);
        if (rows == NULL)
            return TLY_ENOMEM;
        ob->rows = rows;
        option_off_t *off = tly_realloc(ob->off, cap * sizeof *off);
        if (off == NULL)
            return TLY_ENOMEM;
        ob->off = off;
        ob->cap = cap;
    }
    if (ob->len + idn + textn > ob->bufcap) {
        size_t cap = ob->bufcap ? ob->bufcap : 1024;
        while (cap < ob->len + idn + textn)
            cap *= 2;
        char *buf = tly_realloc(ob->buf, cap);
        if (buf == NULL)
            return TLY_ENOMEM;
        ob->buf = buf;
        ob->bufcap = cap;
    }
    ob->off[ob->n].id = ob->len;
    memcpy(ob->buf + ob->len, id ? id : "", idn);
    ob->len += idn;
    ob->off[ob->n].text = ob->len;
    memcpy(ob->buf + ob->len, text ? text : "", textn);
    ob->len += textn;
    ob->rows[ob->n].display_order = sqlite3_column_int(st, 2);
    ob->rows[ob->n].position = sqlite3_column_int(st, 3);
    ob->n++;
    return 0;
}

/* What load's row decoders share. */
typedef struct {
    tly_load_t check;  /* the checks and the bad-row rule (load.c) */
    sqlite3_stmt *ost; /* a poll's options */
    option_buf_t ob;
} sq_load_t;

/* Logs a failed SQLite call of load; the TLY_E* code for it. */
static int load_failed(sqlite3 *db, int src)
{
    sq_log_sqlite("load failed", db, src);
    return (src & 0xff) == SQLITE_NOMEM ? TLY_ENOMEM : TLY_EIO;
}

/* Runs sql on db (its one parameter, if any, bound to param) and hands every row to fn,
 * which returns 0 or a TLY_E* code that stops the walk. 0, or a TLY_E* code. */
static int each_row(sqlite3 *db, const char *sql, int64_t param, int (*fn)(sq_load_t *l, sqlite3_stmt *st),
                    sq_load_t *l)
{
    sqlite3_stmt *st = NULL;
    int rc = 0, src = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (src == SQLITE_OK && sqlite3_bind_parameter_count(st) > 0)
        src = sqlite3_bind_int64(st, 1, param);
    if (src == SQLITE_OK) {
        while ((src = sqlite3_step(st)) == SQLITE_ROW && (rc = fn(l, st)) == 0)
            ;
        if (src == SQLITE_DONE)
            src = SQLITE_OK;
    }
    if (src != SQLITE_OK && src != SQLITE_ROW)
        rc = load_failed(db, src);
    sqlite3_finalize(st);
    return rc;
}

static int load_user(sq_load_t *l, sqlite3_stmt *st)
{
    tly_user_row_t u = {
        .user_id = col_str(st, 0),
        .username = col_str(st, 1),
        .password_hash = col_str(st, 2),
        .email = col_str(st, 3),
        .created_at = sqlite3_column_int64(st, 4),
    };
    return tly_load_user(&l->check, &u);
}

static int load_link(sq_load_t *l, sqlite3_stmt *st)
{
    tly_device_link_row_t d = {
        .device_id = col_str(st, 0), .user_id = col_str(st, 1), .linked_at = sqlite3_column_int64(st, 2)};
    return tly_load_link(&l->check, &d);
}

static int load_poll(sq_load_t *l, sqlite3_stmt *st)
{
    option_buf_t *ob = &l->ob;
    int rc = 0, src;
    tly_poll_row_t p = {
        .poll_id = col_str(st, 0),
        .owner_id = col_str(st, 1),
        .title = col_str(st, 2),
        .description = col_str(st, 3),
        .type = sqlite3_column_int(st, 4),
        .status = sqlite3_column_int(st, 5),
        .start_time = sqlite3_column_int64(st, 6), /* NULL reads as 0: unset */
        .end_time = sqlite3_column_int64(st, 7),
        .settings_json = col_str(st, 8),
        .created_at = sqlite3_column_int64(st, 9),
        .updated_at = sqlite3_column_int64(st, 10),
        .idem_key = col_str(st, 11),
        .final_results = col_str(st, 13),
        .join_code = col_str(st, 14),
    };
    if (col_hash(st, 12, p.body_hash) != 0) {
        char key[TLY_LOAD_KEY_MAX];
        tly_load_key(key, "poll_id", p.poll_id, NULL);
        /* its ballots follow as ballots of a poll load has not seen: bad rows too */
        return tly_load_bad(&l->check, "polls", key, "body_hash is not 16 bytes");
    }
    ob->n = ob->len = 0;
    sqlite3_bind_text(l->ost, 1, p.poll_id, -1, SQLITE_STATIC);
    while ((src = sqlite3_step(l->ost)) == SQLITE_ROW && (rc = option_buf_add(ob, l->ost)) == 0)
        ;
    sqlite3_reset(l->ost);
    if (rc != 0)
        return rc;
    if (src != SQLITE_DONE)
        return load_failed(sqlite3_db_handle(l->ost), src);
    for (size_t i = 0; i < ob->n; i++) {
        ob->rows[i].option_id = ob->buf + ob->off[i].id;
        ob->rows[i].text = ob->buf + ob->off[i].text;
    }
    p.noptions = ob->n;
    p.options = ob->rows;
    return tly_load_poll(&l->check, &p);
}

static int load_ballot(sq_load_t *l, sqlite3_stmt *st)
{
    tly_ballot_row_t b;
    int64_t seq = sqlite3_column_int64(st, 11);
    const char *bad = col_ballot(st, 0, &b);
    b.ip_hash = sqlite3_column_blob(st, 10);
    if (bad == NULL && b.ip_hash != NULL && sqlite3_column_bytes(st, 10) != 16)
        bad = "ip_hash is not 16 bytes";
    if (bad != NULL) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
        tly_load_key(key, "seq", seqs, "poll_id", b.poll_id, "voter_id", b.voter_id, NULL);
        return tly_load_bad(&l->check, "ballots", key, bad);
    }
    b.seq = seq;
    return tly_load_ballot(&l->check, &b, seq);
}

static int load_request(sq_load_t *l, sqlite3_stmt *st)
{
    tly_request_row_t r = {
        .request_id = col_str(st, 0),
        .poll_id = col_str(st, 1),
        .voter_id = col_str(st, 2),
        .state = col_str(st, 3),
        .vote_id = col_str(st, 4),
        .error = col_str(st, 5),
        .created_at = sqlite3_column_int64(st, 6),
    };
    return tly_load_request(&l->check, &r);
}

static int load_retracted(sq_load_t *l, sqlite3_stmt *st)
{
    tly_retracted_row_t r = {.poll_id = col_str(st, 0),
                             .voter_id = col_str(st, 1),
                             .idem_key = col_str(st, 2),
                             .at = sqlite3_column_int64(st, 4)};
    int64_t seq = sqlite3_column_int64(st, 5);
    if (col_hash(st, 3, r.body_hash) != 0) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
        tly_load_key(key, "seq", seqs, NULL);
        return tly_load_bad(&l->check, "audit", key, "body_hash is not 16 bytes");
    }
    return tly_load_retracted(&l->check, &r, seq);
}

/* ---- PRAGMA quick_check, beside the load ------------------------------------------ */

/* Bytes of quick_check's report kept for the log line: its first problems say what is
 * wrong and where; the rest are counted. */
#define QUICK_CHECK_REPORT_MAX 1024

typedef struct {
    const char *db_path;
    pthread_t thread;
    int started;
    int rc; /* 0: "ok"; TLY_EIO: a problem (logged); TLY_ENOMEM */
} quick_check_t;

static void report_add(char *report, size_t *len, const char *line)
{
    int n = snprintf(report + *len, QUICK_CHECK_REPORT_MAX - *len, "%s%s", *len ? "; " : "", line);
    if (n > 0)
        *len = *len + (size_t)n < QUICK_CHECK_REPORT_MAX ? *len + (size_t)n : QUICK_CHECK_REPORT_MAX - 1;
}

/*
 * Runs PRAGMA quick_check on a read-only connection of its own. It reads every page of
 * the file and checks each b-tree (tables and indexes) and the free list; it does not
 * compare an index with its table (integrity_check does, at several times the cost).
 * That is what catches a damaged index page, which load never reads (it walks tables
 * in rowid order) but which the first write through that index fails on. Its own
 * thread: load is bound by building memory and the check by reading pages, so side by
 * side the check adds little to the start (docs/PERFORMANCE.md has the figures).
 */
static void *quick_check_main(void *arg)
{
    quick_check_t *qc = arg;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    char report[QUICK_CHECK_REPORT_MAX] = "", problems[24], ms[24];
    size_t len = 0, n = 0;
    int64_t t0 = tly_now_ms();

    int src = sqlite3_open_v2(qc->db_path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = sq_configure(db);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &st, NULL);
    while (src == SQLITE_OK && (src = sqlite3_step(st)) == SQLITE_ROW) {
        const char *line = col_str(st, 0);
        src = SQLITE_OK;
        if (line != NULL && strcmp(line, "ok") == 0)
            continue;
        report_add(report, &len, line != NULL ? line : "(no text)");
        n++;
    }
    if (src != SQLITE_DONE && src != SQLITE_OK) {
        /* The check itself stopped: a page so damaged it could not go on, or the file
         * could not be opened. Either way the report is SQLite's message. */
        report_add(report, &len, db != NULL ? sqlite3_errmsg(db) : sqlite3_errstr(src));
        n++;
    }
    sqlite3_finalize(st);
    if (db != NULL)
        sqlite3_close_v2(db);
    snprintf(ms, sizeof ms, "%lld", (long long)(tly_now_ms() - t0));
    if (n == 0) {
        tly_log(TLY_LOG_INFO, "store: quick_check ok", "ms", ms, NULL);
        qc->rc = 0;
        return NULL;
    }
    snprintf(problems, sizeof problems, "%zu", n);
    tly_log(TLY_LOG_ERROR, "store: PRAGMA quick_check found the database file damaged", "report", report, "problems",
            problems, "ms", ms, NULL);
    qc->rc = (src & 0xff) == SQLITE_NOMEM ? TLY_ENOMEM : TLY_EIO;
    return NULL;
}

static int load_cast(sq_load_t *l, sqlite3_stmt *st)
{
    tly_ballot_row_t b = {
        .poll_id = col_str(st, 0), .voter_id = col_str(st, 1), .recorded_at = sqlite3_column_int64(st, 4)};
    int64_t seq = sqlite3_column_int64(st, 5);
    if (col_choices(st, 2, 3, &b.nchoices, &b.choices, &b.scores) != 0) {
        char key[TLY_LOAD_KEY_MAX], seqs[24];
        snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
        tly_load_key(key, "seq", seqs, "poll_id", b.poll_id, "voter_id", b.voter_id, NULL);
        return tly_load_bad(&l->check, "ballots", key, "cast_scores are not as long as cast_choices");
    }
    return tly_load_cast(&l->check, &b, seq);
}

int sq_load(sq_store_t *s, const tly_store_load_cb_t *cb, void *ctx)
{
    int rc, src;
    sqlite3 *db = NULL;
    sq_load_t l = {0};
    quick_check_t qc = {.db_path = s->db_path};

    tly_load_init(&l.check, cb, ctx);
    if (!cb->skip_quick_check) {
        if (pthread_create(&qc.thread, NULL, quick_check_main, &qc) == 0)
            qc.started = 1;
        else
            quick_check_main(&qc); /* no thread to be had: the start takes longer, but checks */
    }
    /* A connection of its own: the writer's belongs to the writer thread, and a WAL
     * reader sees a consistent snapshot whatever the writer does meanwhile. */
    src = sqlite3_open_v2(s->db_path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = sq_configure(db);
    /* One read transaction over all the tables: one snapshot. */
    if (src == SQLITE_OK)
        src = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db,
                                 "SELECT option_id, text, display_order, position"
                                 " FROM options WHERE poll_id = ?1 ORDER BY position",
                                 -1, &l.ost, NULL);
    if (src != SQLITE_OK) {
        rc = load_failed(db, src);
        goto out;
    }
    if ((rc = each_row(db, "SELECT user_id, username, password_hash, email, created_at FROM users ORDER BY rowid", 0,
                       load_user, &l)) != 0 ||
        (rc = each_row(db, "SELECT device_id, user_id, linked_at FROM device_links ORDER BY rowid", 0, load_link,
                       &l)) != 0 ||
        (rc = each_row(db,
                       "SELECT poll_id, owner_id, title, description, type, status,"
                       " start_time, end_time, settings, created_at, updated_at,"
                       " idem_key, body_hash, final_results, join_code FROM polls ORDER BY rowid",
                       0, load_poll, &l)) != 0 ||
        /* seq order is commit order: replaying in it rebuilds exactly the committed state. */
        (rc = each_row(db,
                       "SELECT poll_id, voter_id, vote_id, receipt, choices, scores,"
                       " recorded_at, idem_key, body_hash, client_meta, ip_hash, seq"
                       " FROM ballots ORDER BY seq",
                       0, load_ballot, &l)) != 0 ||
        (rc = each_row(db,
                       "SELECT request_id, poll_id, voter_id, state, vote_id, error,"
                       " created_at FROM vote_requests ORDER BY rowid",
                       0, load_request, &l)) != 0)
        goto out;
    rc = each_row(db,
                  "SELECT poll_id, voter_id, idem_key, body_hash, at, seq FROM audit"
                  " WHERE event = 'revoked' AND idem_key IS NOT NULL AND at >= ?1 ORDER BY seq",
                  cb->retracted_since, load_retracted, &l);
    /* through the partial index of changed ballots (seq order makes it the plan) */
    if (rc == 0)
        rc = each_row(db,
                      "SELECT poll_id, voter_id, cast_choices, cast_scores, cast_at, seq FROM ballots"
                      " WHERE cast_at IS NOT NULL AND idem_key IS NOT NULL ORDER BY seq",
                      0, load_cast, &l);
out:
    sqlite3_finalize(l.ost);
    if (db != NULL)
        sqlite3_close_v2(db); /* ends the read transaction */
    tly_free(l.ob.rows);
    tly_free(l.ob.off);
    tly_free(l.ob.buf);
    if (qc.started)
        pthread_join(qc.thread, NULL);
    /* A damaged file explains whatever else went wrong: its report is the answer. */
    if (qc.rc != 0)
        rc = qc.rc;
    return tly_load_finish(&l.check, rc);
}

/* ---- readers: paged reads for exports ------------------------------------------------ */

/* Both walk (poll_id, seq) indexes from after_seq on: no OFFSET and no sort, so a page
 * costs the rows it returns however deep into the poll it starts. An audit page merges
 * two walks in seq order (ballots and audit share one sequence): the ballot rows, each
 * its own cast event as first cast, and the audit rows (migration 6). */
const char tly_store_audit_page_sql[] =
    "SELECT seq, poll_id, voter_id, 'cast', CASE WHEN cast_at IS NULL THEN choices ELSE cast_choices END,"
    " CASE WHEN cast_at IS NULL THEN scores ELSE cast_scores END, coalesce(cast_at, recorded_at) FROM ballots"
    " WHERE poll_id = ?1 AND seq > ?2 AND cast_in_audit = 0"
    " UNION ALL"
    " SELECT seq, poll_id, voter_id, event, choices, scores, at FROM audit WHERE poll_id = ?1 AND seq > ?2"
    " ORDER BY 1 LIMIT ?3";
const char tly_store_ballots_page_sql[] =
    "SELECT seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"
    " body_hash, client_meta FROM ballots WHERE poll_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";

void sq_reader_close(sq_reader_t *r)
{
    if (r == NULL)
        return;
    sqlite3_finalize(r->audit);
    sqlite3_finalize(r->ballots);
    if (r->db != NULL)
        sqlite3_close_v2(r->db);
    tly_free(r);
}

sq_reader_t *sq_reader_open(sq_store_t *s)
{
    int src;
    sq_reader_t *r = tly_calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->base.be = &tly_store_sqlite;
    /* s->db_path is set once in tly_store_open and never changes: any thread may read it. */
    src = sqlite3_open_v2(s->db_path, &r->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = sq_configure(r->db);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v3(r->db, tly_store_audit_page_sql, -1, SQLITE_PREPARE_PERSISTENT, &r->audit, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v3(r->db, tly_store_ballots_page_sql, -1, SQLITE_PREPARE_PERSISTENT, &r->ballots, NULL);
    if (src != SQLITE_OK) {
        sq_log_sqlite("reader open failed", r->db, src);
        sq_reader_close(r);
        return NULL;
    }
    return r;
}

/* Binds a page's parameters. A limit beyond INT_MAX is INT_MAX, so the count of rows
 * passed fits the int the page functions return. */
static void page_bind(sqlite3_stmt *st, const char *poll_id, int64_t after_seq, size_t limit)
{
    sqlite3_bind_text(st, 1, poll_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, after_seq);
    sqlite3_bind_int64(st, 3, limit > INT_MAX ? INT_MAX : (int64_t)limit);
}

/* Ends a page: the reset ends the statement's read transaction, so an idle reader holds
 * no snapshot and never keeps a checkpoint from recycling the WAL. */
static int page_end(sqlite3 *db, sqlite3_stmt *st, int src, int n)
{
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (src == SQLITE_DONE)
        return n;
    sq_log_sqlite("page read failed", db, src);
    return (src & 0xff) == SQLITE_NOMEM ? TLY_ENOMEM : TLY_EIO;
}

/* A page met a row that does not decode (a start with --skip-bad-rows leaves such rows
 * in the store): the page fails, and the log says which row. */
static void page_malformed(const char *table, int64_t seq, const char *why)
{
    char key[32];
    snprintf(key, sizeof key, "seq=%lld", (long long)seq);
    tly_log(TLY_LOG_ERROR, "store: malformed row", "table", table, "key", key, "reason", why, NULL);
}

int sq_audit_page(sq_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                  void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx)
{
    sqlite3_stmt *st = r->audit;
    int src, n = 0;
    if (limit == 0)
        return 0;
    page_bind(st, poll_id, after_seq, limit);
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        tly_audit_row_t a = {
            .seq = sqlite3_column_int64(st, 0),
            .poll_id = col_str(st, 1),
            .voter_id = col_str(st, 2),
            .event = col_str(st, 3),
            .at = sqlite3_column_int64(st, 6),
        };
        const char *bad = col_choices(st, 4, 5, &a.nchoices, &a.choices, &a.scores);
        if (bad != NULL) {
            page_malformed("audit", a.seq, bad);
            page_end(r->db, st, SQLITE_DONE, 0);
            return TLY_EIO;
        }
        cb(ctx, &a);
        n++;
    }
    return page_end(r->db, st, src, n);
}

int sq_ballots_page(sq_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                    void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx)
{
    sqlite3_stmt *st = r->ballots;
    int src, n = 0;
    if (limit == 0)
        return 0;
    page_bind(st, poll_id, after_seq, limit);
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        tly_ballot_row_t b;
        const char *bad = col_ballot(st, 1, &b);
        if (bad != NULL) {
            page_malformed("ballots", sqlite3_column_int64(st, 0), bad);
            page_end(r->db, st, SQLITE_DONE, 0);
            return TLY_EIO;
        }
        cb(ctx, &b, sqlite3_column_int64(st, 0));
        n++;
    }
    return page_end(r->db, st, src, n);
}

/* ---- generated ballots, for tests and benchmarks ------------------------------------- */

#define GENERATE_CHUNK 10000

int sq_generate_ballots(sq_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    int rc = TLY_EINVAL, src = SQLITE_OK;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL, *next = NULL;
    char *buf = NULL;
    int64_t now = tly_now_ms(), seq = 0;

    if (poll_id == NULL || noptions == 0 || noptions > 256)
        return TLY_EINVAL;
    size_t idn = strlen(poll_id) + 32; /* "g_<poll_id>_<i>": vote ids are unique store-wide */
    rc = TLY_ENOMEM;
    if ((buf = tly_malloc(3 * idn)) == NULL)
        goto fail;
    char *voter = buf, *vote_id = buf + idn, *receipt = buf + 2 * idn;

    /* A connection of its own, beside the writer: busy_timeout covers the moments when
     * the writer holds the write lock, and the writer's wait for ours (one chunk). Each
     * chunk takes its seqs after the last of ballots and audit under the write lock, as
     * the writer's batches do. */
    src = sqlite3_open_v2(s->db_path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = sq_configure(db);
    if (src == SQLITE_OK) /* the writer's cache size and temp store, for the same reasons */
        src = sqlite3_exec(db, "PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;", NULL, NULL, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db,
                                 "INSERT INTO ballots(seq, poll_id, voter_id, vote_id, receipt,"
                                 " choices, recorded_at) VALUES(?7, ?1, ?2, ?3, ?4, ?5, ?6)",
                                 -1, &st, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db, sq_next_seq_sql, -1, &next, NULL);
    for (size_t i = 0; src == SQLITE_OK && i < n; i++) {
        /* Fibonacci hashing: choices spread over the options, not round-robin. */
        uint8_t choice = (uint8_t)(((uint32_t)i * 2654435761u >> 8) % noptions);
        if (i % GENERATE_CHUNK == 0) {
            if ((src = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL)) != SQLITE_OK)
                break;
            if ((src = sqlite3_step(next)) != SQLITE_ROW)
                break;
            seq = sqlite3_column_int64(next, 0);
            src = sqlite3_reset(next);
        }
        snprintf(voter, idn, "gen%zu", i);
        snprintf(vote_id, idn, "g_%s_%zu", poll_id, i);
        snprintf(receipt, idn, "gr_%s_%zu", poll_id, i);
        sqlite3_bind_text(st, 1, poll_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, voter, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, vote_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, receipt, -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 5, &choice, 1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 6, now);
        sqlite3_bind_int64(st, 7, seq++);
        if ((src = sq_step_reset(st)) != SQLITE_OK)
            break;
        if ((i + 1) % GENERATE_CHUNK == 0 || i + 1 == n)
            src = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    }
    if (src == SQLITE_OK) {
        rc = 0;
        goto fail;
    }
    rc = sq_is_constraint(src) ? sq_constraint_result(src) : sq_sqlite_to_tly(src);
    if (rc == 0)
        rc = TLY_EIO;
    if (!sq_is_constraint(src))
        sq_log_sqlite("generate failed", db, src);
    if (db != NULL && !sqlite3_get_autocommit(db))
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
fail:
    sqlite3_finalize(st);
    sqlite3_finalize(next);
    if (db != NULL)
        sqlite3_close_v2(db);
    tly_free(buf);
    return rc;
}

/* ---- reconciliation ---------------------------------------------------------------------- */

/* SQLite keeps no counter rows: an instance on SQLite counts in memory, and memory is
 * rebuilt from the ballots at every load, so the only counts there are the ballots'
 * own and nothing can drift from them. (SQLite is never shared, so there are no live
 * counters in Redis either.) */
int tly_store_sqlite_reconcile(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                               void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx)
{
    (void)r;
    (void)repair;
    (void)drift;
    (void)actual;
    (void)ctx;
    return 0;
}
