/*
 * pg.c: the PostgreSQL store, which many tally instances may share. This file opens
 * it (schema migrations under an advisory lock), and runs the writer: one thread, one
 * connection, operations committed in batches exactly as sqlite.c does (group commit),
 * so a vote is acknowledged only once the transaction holding it has committed.
 *
 * What sharing adds (pg_feed.c has the rest): every batch that changed anything also
 * appends one row to the change feed in its own transaction, at its very end. The feed's
 * sequence number comes from the single row of feed_head, whose row lock every
 * committing batch of every instance takes last and holds until its commit: so the feed
 * order is the commit order, without gaps (a batch that rolls back rolls its increment
 * back). The follower of each instance reads the feed and hands the other instances'
 * changes to the follow callback, in that order, interleaved with this instance's own
 * done callbacks at their batches' places.
 *
 * The hot path, a batch of nothing but ballot inserts, is ONE statement and its own
 * transaction (cast_sql): one round trip per batch. Its data-modifying CTEs insert the
 * ballots (insert ... on conflict do nothing returning), their audit and request rows,
 * and then call feed_append (a function of the schema) with the feed row built from what
 * was actually inserted and the counter deltas of the same, so a duplicate never moves a
 * counter. Any other batch is a transaction of several statements (BEGIN, each op in a
 * savepoint, feed_sql, COMMIT).
 *
 * feed_append takes feed_head, moves the counter rows, and inserts the feed row. The
 * counters move there, after feed_head, because every instance updates the same rows:
 * locked earlier, they serialised the instances' whole batches (measured: three instances
 * slower than one). And it is a function because its statements then run with snapshots
 * taken once feed_head is held: in the batch's own statement, whose snapshot predates the
 * wait, every counter row another instance had just updated was re-checked
 * (EvalPlanQual, which sets up the whole big plan again), which made the locked section
 * ten times longer (measured).
 *
 * The schema, its migrations and connecting are in pg_schema.c.
 *
 * Availability: when the writer's connection drops the batch in flight fails (TLY_EIO),
 * later batches fail at once while a connector thread reconnects with backoff (100 ms
 * doubling to 2 s), and tly_store_writable says 0 until it has. Nothing is ever
 * acknowledged that did not commit; a commit whose outcome is unknown is a failure
 * (if it did commit after all, the follower delivers the batch as a foreign change).
 */
#include "store/pg_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define PG_RETENTION_US (60 * 1000000LL)
#define PG_PING_US 1000000LL
#define PG_BACKOFF_MIN_MS 100
#define PG_BACKOFF_MAX_MS 2000
#define PG_BATCH_ATTEMPTS 3 /* a batch chosen as a deadlock victim runs again, this often */

/* ---- the writer's statements (prepared on each of its connections) ---------------- */

/* Every op travels as the JSON the feed carries (pg_op_json): one text parameter, so
 * no SQL is ever built from data and the feed row is the statement's own input. */
#define BALLOT_FIELDS                                                                      \
    "poll_id text, voter_id text, vote_id text, receipt text, choices text, scores text,"  \
    " recorded_at bigint, idem_key text, body_hash text, client_meta text, ip_hash text,"  \
    " request_id text"
#define POLL_FIELDS                                                                        \
    "poll_id text, owner_id text, title text, description text, type int, status int,"    \
    " start_time bigint, end_time bigint, settings text, created_at bigint,"              \
    " updated_at bigint, idem_key text, body_hash text, final_results text"
#define OPTION_FIELDS "position int, option_id text, text text, display_order int"

/* Consecutive ballot inserts, $1 a JSON array of ballots: the CTEs both ballot
 * statements share. `res` is (i, 0) for each inserted ballot (i: 1-based place in the
 * array), (i, 2) for each request row written (first op of a request_id), (i, 1) for
 * each ballot whose poll does not exist; any op not in it was a duplicate. The poll rows
 * are KEY SHARE locked, so a concurrent POLL_DELETE waits for this batch (and then
 * deletes its ballots) or wins (and these ballots find no poll). */
#define BALLOT_CTES                                                                        \
    "WITH x AS ("                                                                          \
    "  SELECT e.i, e.j, r.* FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(j, i)," \
    "    jsonb_to_record(e.j) AS r(" BALLOT_FIELDS ")),"                                   \
    "src AS ("                                                                             \
    "  SELECT x.i, x.poll_id, x.voter_id, x.vote_id, x.receipt, decode(x.choices, 'hex') AS choices," \
    "    decode(x.scores, 'hex') AS scores, x.recorded_at, x.idem_key,"                    \
    "    decode(x.body_hash, 'hex') AS body_hash, x.client_meta, decode(x.ip_hash, 'hex') AS ip_hash," \
    "    x.request_id"                                                                     \
    "  FROM x JOIN polls p ON p.poll_id = x.poll_id FOR KEY SHARE OF p),"                  \
    "ins AS ("                                                                             \
    "  INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at," \
    "    idem_key, body_hash, client_meta, ip_hash)"                                       \
    "  SELECT poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key," \
    "    body_hash, client_meta, ip_hash FROM src ORDER BY i"                              \
    "  ON CONFLICT DO NOTHING"                                                             \
    "  RETURNING poll_id, voter_id, vote_id, receipt, ip_hash, choices, scores, recorded_at)," \
    "ok AS ("                                                                              \
    "  SELECT DISTINCT ON (ins.poll_id, ins.voter_id) src.i, ins.*"                        \
    "  FROM ins JOIN src ON src.poll_id = ins.poll_id AND src.voter_id = ins.voter_id"     \
    "    AND src.vote_id = ins.vote_id AND src.receipt = ins.receipt"                      \
    "    AND src.ip_hash IS NOT DISTINCT FROM ins.ip_hash"                                 \
    "  ORDER BY ins.poll_id, ins.voter_id, src.i),"                                        \
    "a AS ("                                                                               \
    "  INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"                   \
    "  SELECT poll_id, voter_id, 'cast', choices, scores, recorded_at FROM ok ORDER BY i"  \
    "  RETURNING 1),"                                                                      \
    "r AS ("                                                                               \
    "  INSERT INTO vote_requests(request_id, poll_id, voter_id, state, vote_id, error, created_at)" \
    "  SELECT DISTINCT ON (s.request_id) s.request_id, s.poll_id, s.voter_id,"             \
    "    CASE WHEN ok.i IS NULL THEN 'failed' ELSE 'completed' END,"                       \
    "    CASE WHEN ok.i IS NULL THEN NULL ELSE s.vote_id END,"                             \
    "    CASE WHEN ok.i IS NULL THEN 'ALREADY_VOTED' END, s.recorded_at"                   \
    "  FROM src s LEFT JOIN ok ON ok.i = s.i"                                              \
    "  WHERE s.request_id IS NOT NULL ORDER BY s.request_id, s.i"                          \
    /* A request's first final outcome wins (a consumer replaying it must not turn         \
     * "completed" into "failed"); only a "pending" row is overwritten. */                 \
    "  ON CONFLICT (request_id) DO UPDATE SET state = excluded.state, vote_id = excluded.vote_id," \
    "    error = excluded.error WHERE vote_requests.state = 'pending'"                     \
    "  RETURNING request_id),"                                                             \
    "res AS ("                                                                             \
    "  SELECT i, 0 AS k FROM ok"                                                           \
    "  UNION ALL SELECT min(s.i), 2 FROM r JOIN src s USING (request_id) GROUP BY r.request_id" \
    "  UNION ALL SELECT x.i, 1 FROM x WHERE NOT EXISTS (SELECT 1 FROM src WHERE src.i = x.i))"

/* Inside a batch's transaction (with other ops): the counters move in feed_sql, by
 * what this reports inserted. */
static const char ballot_sql[] = BALLOT_CTES " SELECT i, k FROM res";

/*
 * A batch of nothing but ballot inserts is this one statement, its own transaction:
 * one round trip. After the inserts (h waits for f and a, which read everything they
 * depend on) it takes feed_head, moves the counters by what was inserted, and appends
 * the feed row, built here from the ops that took effect: those inserted, and a failed
 * async request (TLY_OP_REQUEST, -1) for a duplicate that wrote its request row. No
 * row, no feed_head lock when nothing took effect. $2 origin, $3 token. Returns res,
 * and (seq, 3) for the feed row.
 */
static const char cast_sql[] =
    BALLOT_CTES ","
    "f AS ("
    "  SELECT jsonb_agg(o.j ORDER BY o.i)::text AS ops FROM ("
    "    SELECT x.i, x.j FROM x JOIN ok USING (i)"
    "    UNION ALL SELECT q.i, jsonb_build_object('t', -1, 'request_id', s.request_id,"
    "      'poll_id', s.poll_id, 'voter_id', s.voter_id, 'state', 'failed', 'vote_id', NULL,"
    "      'error', 'ALREADY_VOTED', 'created_at', s.recorded_at)"
    "    FROM res q JOIN src s ON s.i = q.i"
    "    WHERE q.k = 2 AND NOT EXISTS (SELECT 1 FROM ok WHERE ok.i = q.i)) o"
    "  HAVING count(*) > 0),"
    "d AS (SELECT poll_id AS p, -1 AS o, count(*) AS n FROM ok GROUP BY 1"
    "  UNION ALL SELECT p, o::int, count(*) FROM ("
    "    SELECT DISTINCT ok.i, ok.poll_id AS p, get_byte(ok.choices, g) AS o"
    "    FROM ok, generate_series(0, length(ok.choices) - 1) g) v GROUP BY 1, 2),"
    "h AS (SELECT feed_append($2::text, $3::bigint, f.ops, dd.ps, dd.os, dd.ns) AS seq"
    "  FROM f, (SELECT array_agg(p) AS ps, array_agg(o) AS os, array_agg(n) AS ns FROM d) dd"
    "  WHERE (SELECT count(*) FROM a) >= 0)"
    " SELECT i, k FROM res UNION ALL SELECT seq, 3 FROM h";
_Static_assert(TLY_OP_REQUEST == -1, "cast_sql writes failed requests as t: -1");

static const char user_sql[] =
    "INSERT INTO users(user_id, username, password_hash, email, created_at)"
    " SELECT user_id, username, password_hash, email, created_at"
    " FROM jsonb_to_record($1::jsonb) AS r(user_id text, username text, password_hash text,"
    " email text, created_at bigint) RETURNING user_id";

static const char poll_insert_sql[] =
    "WITH r AS (SELECT * FROM jsonb_to_record($1::jsonb) AS r(" POLL_FIELDS ")),"
    "o AS (SELECT * FROM jsonb_to_recordset($1::jsonb -> 'options') AS o(" OPTION_FIELDS ")),"
    "p AS ("
    "  INSERT INTO polls(poll_id, owner_id, title, description, type, status, start_time,"
    "    end_time, settings, created_at, updated_at, idem_key, body_hash, final_results)"
    "  SELECT poll_id, owner_id, title, description, type, status, nullif(start_time, 0),"
    "    nullif(end_time, 0), settings, nullif(created_at, 0), nullif(updated_at, 0), idem_key,"
    "    decode(body_hash, 'hex'), final_results FROM r RETURNING poll_id),"
    "io AS (INSERT INTO options(poll_id, position, option_id, text, display_order)"
    "  SELECT p.poll_id, o.position, o.option_id, o.text, o.display_order FROM p, o),"
    "ic AS (INSERT INTO option_counts(poll_id, position, votes)"
    "  SELECT p.poll_id, o.position, 0 FROM p, o),"
    "ip AS (INSERT INTO poll_counts(poll_id, ballots) SELECT poll_id, 0 FROM p)"
    "SELECT count(*) FROM p";

/* An update replaces the row and drops the options (a second statement inserts the new
 * ones: deleting and inserting one key in the same statement is not safe). */
static const char poll_update_sql[] =
    "WITH r AS (SELECT * FROM jsonb_to_record($1::jsonb) AS r(" POLL_FIELDS ")),"
    "u AS ("
    "  UPDATE polls SET owner_id = r.owner_id, title = r.title, description = r.description,"
    "    type = r.type, status = r.status, start_time = nullif(r.start_time, 0),"
    "    end_time = nullif(r.end_time, 0), settings = r.settings,"
    "    created_at = nullif(r.created_at, 0), updated_at = nullif(r.updated_at, 0),"
    "    idem_key = r.idem_key, body_hash = decode(r.body_hash, 'hex'),"
    "    final_results = r.final_results"
    "  FROM r WHERE polls.poll_id = r.poll_id RETURNING polls.poll_id),"
    "d AS (DELETE FROM options WHERE poll_id IN (SELECT poll_id FROM u))"
    "SELECT count(*) FROM u";

/* The new options, and the counters of a changed option set: rows of positions gone
 * go; a new position is counted from the ballots (only ballots cast while an earlier
 * option set had that position can hold it, so this costs nothing in the usual case of
 * options edited before anyone voted); kept positions keep their counts. */
static const char poll_options_sql[] =
    "WITH o AS (SELECT * FROM jsonb_to_recordset($1::jsonb -> 'options') AS o(" OPTION_FIELDS ")),"
    "io AS (INSERT INTO options(poll_id, position, option_id, text, display_order)"
    "  SELECT $1::jsonb ->> 'poll_id', o.position, o.option_id, o.text, o.display_order FROM o),"
    "dc AS (DELETE FROM option_counts WHERE poll_id = $1::jsonb ->> 'poll_id'"
    "  AND position NOT IN (SELECT position FROM o)),"
    "ic AS (INSERT INTO option_counts(poll_id, position, votes)"
    "  SELECT $1::jsonb ->> 'poll_id', o.position,"
    "    (SELECT count(*) FROM ballots b WHERE b.poll_id = $1::jsonb ->> 'poll_id'"
    "       AND position(set_byte('\\x00'::bytea, 0, o.position) IN b.choices) > 0)"
    "  FROM o WHERE NOT EXISTS (SELECT 1 FROM option_counts c"
    "    WHERE c.poll_id = $1::jsonb ->> 'poll_id' AND c.position = o.position))"
    "SELECT 1";

/* The poll row first, alone: if a batch of another instance holds it (ballots being
 * inserted), this waits for that COMMIT, and the next statement, with a fresh snapshot,
 * then sees and deletes those ballots too. */
static const char poll_delete_sql[] =
    "WITH d AS (DELETE FROM polls WHERE poll_id = $1 RETURNING 1) SELECT count(*) FROM d";
static const char poll_delete_rest_sql[] =
    "WITH o AS (DELETE FROM options WHERE poll_id = $1),"
    "b AS (DELETE FROM ballots WHERE poll_id = $1),"
    "a AS (DELETE FROM audit WHERE poll_id = $1),"
    "r AS (DELETE FROM vote_requests WHERE poll_id = $1),"
    "oc AS (DELETE FROM option_counts WHERE poll_id = $1),"
    "pc AS (DELETE FROM poll_counts WHERE poll_id = $1)"
    "SELECT 1";

/* The old choices are read under the row lock (FOR UPDATE returns the newest version if
 * another instance changed it meanwhile) and returned (hex), so that the counters move
 * by the difference in feed_sql. */
static const char ballot_replace_sql[] =
    "WITH n AS (SELECT * FROM jsonb_to_record($1::jsonb) AS n(" BALLOT_FIELDS ")),"
    "old AS (SELECT b.poll_id, b.voter_id, b.choices FROM ballots b"
    "  JOIN n ON b.poll_id = n.poll_id AND b.voter_id = n.voter_id FOR UPDATE OF b),"
    "u AS ("
    "  UPDATE ballots b SET choices = decode(n.choices, 'hex'), scores = decode(n.scores, 'hex'),"
    "    recorded_at = n.recorded_at, idem_key = n.idem_key, body_hash = decode(n.body_hash, 'hex')"
    "  FROM old, n WHERE b.poll_id = old.poll_id AND b.voter_id = old.voter_id"
    "  RETURNING b.poll_id, b.voter_id, b.choices, b.scores, b.recorded_at),"
    "a AS (INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"
    "  SELECT poll_id, voter_id, 'changed', choices, scores, recorded_at FROM u)"
    "SELECT (SELECT count(*) FROM u), (SELECT encode(choices, 'hex') FROM old LIMIT 1)";

static const char ballot_delete_sql[] =
    "WITH n AS (SELECT * FROM jsonb_to_record($1::jsonb) AS n(" BALLOT_FIELDS ")),"
    "d AS (DELETE FROM ballots b USING n WHERE b.poll_id = n.poll_id AND b.voter_id = n.voter_id"
    "  RETURNING b.poll_id, b.voter_id, b.choices),"
    "a AS (INSERT INTO audit(poll_id, voter_id, event, at)"
    "  SELECT d.poll_id, d.voter_id, 'revoked', n.recorded_at FROM d, n)"
    "SELECT (SELECT count(*) FROM d), (SELECT encode(choices, 'hex') FROM d LIMIT 1)";

/*
 * The last statement of a batch of several statements that changed anything: the
 * feed_head row lock is held from here to COMMIT. $1 origin, $2 the feed row's ops, $3
 * the counter deltas of the batch's ballot changes ([{"p": poll_id, "o": position or -1
 * for the poll's ballots, "n": delta}], computed from what the ballot statements
 * reported inserted, replaced or deleted), $4 the batch's token.
 */
static const char feed_sql[] =
    "SELECT feed_append($1::text, $4::bigint, $2::text, array_agg(p), array_agg(o), array_agg(n)) FROM ("
    "  SELECT p, o, sum(n)::bigint AS n FROM jsonb_to_recordset($3::jsonb) AS d(p text, o int, n bigint)"
    "  GROUP BY 1, 2 HAVING sum(n) <> 0) d";

/* At most once a minute. The newest row always stays, so a follower that lags behind
 * the retention finds a row beyond its position and knows it. */
static const char retention_sql[] =
    "DELETE FROM feed WHERE at < now() - interval '1 hour'"
    " AND seq < (SELECT seq FROM feed_head)";

static const struct {
    const char *name, *sql;
} stmts[] = {
    {"ballots", ballot_sql},
    {"cast", cast_sql},
    {"user", user_sql},
    {"poll_insert", poll_insert_sql},
    {"poll_update", poll_update_sql},
    {"poll_options", poll_options_sql},
    {"poll_delete", poll_delete_sql},
    {"poll_delete_rest", poll_delete_rest_sql},
    {"ballot_replace", ballot_replace_sql},
    {"ballot_delete", ballot_delete_sql},
    {"feed", feed_sql},
};

static int prepare_writer(PGconn *c)
{
    /* Every statement here is planned once: planning it again per batch with the
     * parameters' values (PostgreSQL's default for the first runs, and later whenever
     * the generic plan looks dearer) would cost more than the batch itself. */
    if (pg_exec(c, "SET plan_cache_mode = force_generic_plan", PGRES_COMMAND_OK) != 0)
        return TLY_EIO;
    for (size_t i = 0; i < TLY_ARRAY_SIZE(stmts); i++) {
        PGresult *res = PQprepare(c, stmts[i].name, stmts[i].sql, 0, NULL);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            pg_log_error("store: postgres prepare failed", c, res);
        PQclear(res);
        if (!ok)
            return TLY_EIO;
    }
    return 0;
}

static PGconn *connect_writer(pg_store_t *s)
{
    PGconn *c = pg_connect(s, "writer");
    if (c != NULL && prepare_writer(c) != 0) {
        PQfinish(c);
        c = NULL;
    }
    return c;
}

/* ---- submit -------------------------------------------------------------------------- */

static void pg_submit_list(pg_store_t *s, tly_store_op_t *first)
{
    tly_store_op_t *last = first;
    uint64_t n = 1;
    if (first == NULL)
        return;
    while (last->next != NULL) {
        last = last->next;
        n++;
    }
    pthread_mutex_lock(&s->mu);
    if (s->tail != NULL)
        s->tail->next = first;
    else
        s->head = first;
    s->tail = last;
    s->submitted += n;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* ---- the writer ------------------------------------------------------------------ */

/* How a statement ended, for run_op and the batch. */
enum { R_OK, R_OP, R_RETRY, R_FATAL };

static int classify(PGconn *c, PGresult *res, ExecStatusType want, int *op_result)
{
    if (PQresultStatus(res) == want)
        return R_OK;
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (pg_conn_lost(c) || st == NULL || strlen(st) != 5)
        return R_FATAL;
    if (strcmp(st, "40P01") == 0 || strcmp(st, "40001") == 0)
        return R_RETRY; /* deadlock victim or serialization failure: run it again */
    if (strcmp(st, "23505") == 0) {
        *op_result = TLY_EEXIST;
        return R_OP;
    }
    if (strcmp(st, "23503") == 0) {
        *op_result = TLY_ENOTFOUND;
        return R_OP;
    }
    /* Any other integrity (23) or data (22: bad input, e.g. a byte beyond 255) error is
     * this operation's alone. */
    if (strncmp(st, "23", 2) == 0 || strncmp(st, "22", 2) == 0) {
        *op_result = TLY_EINVAL;
        return R_OP;
    }
    return R_FATAL;
}

static PGresult *exec_json(PGconn *c, const char *stmt, const char *param)
{
    const char *params[1] = {param};
    return PQexecPrepared(c, stmt, 1, params, NULL, NULL, 0);
}

/* Scratch of one batch (writer thread only). */
typedef struct {
    tly_store_op_t **op;
    json_t **js;     /* the op as JSON, or NULL (op failed before reaching the database) */
    char *req;       /* 1: an async ballot's failed request row was written */
    size_t n;
    json_t *deltas;  /* counter deltas of replaced and deleted ballots (feed_sql's $3) */
} batch_t;

/* Appends to d the counter deltas of one ballot: `sign` for its poll's ballots (0: none,
 * a replacement) and for every option position in choices (hex), each once. Returns 0 or
 * TLY_ENOMEM. */
static int add_deltas(json_t *d, const char *poll_id, int total, const uint8_t *choices, size_t n, int sign)
{
    uint8_t seen[256] = {0};
    if (total != 0 && json_array_append_new(d, json_pack("{s:s, s:i, s:i}", "p", poll_id, "o", -1, "n", total)) != 0)
        return TLY_ENOMEM;
    for (size_t k = 0; k < n; k++) {
        if (seen[choices[k]]++)
            continue;
        if (json_array_append_new(d, json_pack("{s:s, s:i, s:i}", "p", poll_id, "o", (int)choices[k], "n", sign)) != 0)
            return TLY_ENOMEM;
    }
    return 0;
}

/* Runs one statement taking the op's JSON; *count gets the first column of the first
 * row (the statements end in SELECT count(*)). */
static int exec_count(PGconn *c, const char *stmt, const char *param, long *count, int *op_result)
{
    PGresult *res = exec_json(c, stmt, param);
    int r = classify(c, res, PGRES_TUPLES_OK, op_result);
    if (r == R_OK && count != NULL)
        *count = PQntuples(res) > 0 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : 0;
    if (r == R_FATAL || r == R_RETRY)
        pg_log_error("store: postgres batch statement failed", c, res);
    PQclear(res);
    return r;
}

/* A non-ballot op (or a single ballot, in the fallback) inside its own savepoint, so
 * that a constraint failure undoes it alone. Returns R_OK (op->result set) or R_RETRY /
 * R_FATAL for the batch. */
static int run_op(pg_store_t *s, tly_store_op_t *op, const char *param, json_t *deltas)
{
    PGconn *c = s->wconn;
    int r, res_op = 0;
    long n = 0;

    op->result = 0;
    PGresult *res = PQexec(c, "SAVEPOINT op");
    r = classify(c, res, PGRES_COMMAND_OK, &res_op);
    PQclear(res);
    if (r != R_OK)
        return r == R_OP ? R_FATAL : r;
    switch (op->type) {
    case TLY_OP_USER_INSERT:
        r = exec_count(c, "user", param, NULL, &res_op);
        break;
    case TLY_OP_POLL_INSERT:
        r = exec_count(c, "poll_insert", param, NULL, &res_op);
        break;
    case TLY_OP_POLL_UPDATE:
        r = exec_count(c, "poll_update", param, &n, &res_op);
        if (r == R_OK && n == 0)
            op->result = TLY_ENOTFOUND;
        else if (r == R_OK)
            r = exec_count(c, "poll_options", param, NULL, &res_op);
        break;
    case TLY_OP_POLL_DELETE:
        r = exec_count(c, "poll_delete", op->u.poll.poll_id, &n, &res_op);
        if (r == R_OK && n == 0)
            op->result = TLY_ENOTFOUND;
        else if (r == R_OK)
            r = exec_count(c, "poll_delete_rest", op->u.poll.poll_id, NULL, &res_op);
        break;
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE: {
        PGresult *q = exec_json(c, op->type == TLY_OP_BALLOT_REPLACE ? "ballot_replace" : "ballot_delete", param);
        r = classify(c, q, PGRES_TUPLES_OK, &res_op);
        if (r == R_FATAL || r == R_RETRY)
            pg_log_error("store: postgres batch statement failed", c, q);
        if (r == R_OK) {
            n = PQntuples(q) > 0 ? strtol(PQgetvalue(q, 0, 0), NULL, 10) : 0;
            uint8_t old[256];
            int nold = n > 0 ? pg_unhex(PQgetvalue(q, 0, 1), old, sizeof old) : 0;
            const tly_ballot_row_t *bl = &op->u.ballot;
            if (n == 0)
                op->result = TLY_ENOTFOUND;
            else if (add_deltas(deltas, bl->poll_id, op->type == TLY_OP_BALLOT_DELETE ? -1 : 0, old,
                                nold > 0 ? (size_t)nold : 0, -1) != 0 ||
                     (op->type == TLY_OP_BALLOT_REPLACE &&
                      add_deltas(deltas, bl->poll_id, 0, bl->choices, bl->nchoices, 1) != 0))
                r = R_FATAL; /* out of memory: the batch fails as a whole */
        }
        PQclear(q);
        break;
    }
    default:
        r = R_OP;
        res_op = TLY_EINVAL;
        break;
    }
    if (r == R_RETRY || r == R_FATAL)
        return r;
    if (r == R_OP) {
        op->result = res_op;
        res = PQexec(c, "ROLLBACK TO SAVEPOINT op");
    } else {
        res = PQexec(c, "RELEASE SAVEPOINT op");
    }
    r = classify(c, res, PGRES_COMMAND_OK, &res_op);
    PQclear(res);
    return r == R_OK ? R_OK : r == R_RETRY ? R_RETRY : R_FATAL;
}

/* The ballots b->op[from..to) (consecutive BALLOT_INSERTs; those with js NULL already
 * failed and are left out) in one statement: ballot_sql inside the batch's transaction,
 * or, with token != 0, cast_sql as the whole batch (then *seq gets its feed row, 0 when
 * it changed nothing). */
static int run_ballots(pg_store_t *s, batch_t *b, size_t from, size_t to, int64_t token, int64_t *seq,
                       int *rc_nomem)
{
    PGconn *c = s->wconn;
    json_t *arr = json_array();
    size_t *idx = tly_malloc((to - from) * sizeof *idx);
    char *text = NULL, tok[24];
    int r = R_FATAL, dummy = 0;
    size_t k = 0;
    PGresult *res = NULL;

    if (arr == NULL || idx == NULL)
        goto nomem;
    for (size_t i = from; i < to; i++) {
        if (b->js[i] == NULL)
            continue;
        if (json_array_append(arr, b->js[i]) != 0)
            goto nomem;
        idx[k++] = i;
        b->op[i]->result = TLY_EEXIST; /* unless the statement says otherwise */
        b->req[i] = 0;
    }
    if (k == 0) {
        r = R_OK;
        goto out;
    }
    if ((text = json_dumps(arr, JSON_COMPACT)) == NULL)
        goto nomem;
    if (token != 0) {
        const char *params[3] = {text, s->origin, tok};
        snprintf(tok, sizeof tok, "%" PRId64, token);
        res = PQexecPrepared(c, "cast", 3, params, NULL, NULL, 0);
    } else {
        res = exec_json(c, "ballots", text);
    }
    r = classify(c, res, PGRES_TUPLES_OK, &dummy);
    if (r == R_OK) {
        for (int row = 0; row < PQntuples(res); row++) {
            long long i = strtoll(PQgetvalue(res, row, 0), NULL, 10);
            long kind = strtol(PQgetvalue(res, row, 1), NULL, 10);
            if (kind == 3 && seq != NULL) {
                *seq = i;
                continue;
            }
            if (i < 1 || (size_t)i > k)
                continue;
            size_t at = idx[i - 1];
            if (kind == 0)
                b->op[at]->result = 0;
            else if (kind == 1)
                b->op[at]->result = TLY_ENOTFOUND;
            else
                b->req[at] = 1;
        }
    } else if (r == R_RETRY || r == R_FATAL) {
        pg_log_error("store: postgres ballot statement failed", c, res);
    }
    goto out;
nomem:
    *rc_nomem = 1;
    r = R_FATAL;
out:
    PQclear(res);
    free(text);
    json_decref(arr);
    tly_free(idx);
    return r;
}

/* Consecutive ballots: one statement inside a savepoint. Should it fail with a data or
 * constraint error that ON CONFLICT does not absorb (a malformed field), the ballots run
 * again one by one, each in its own savepoint, so that only the bad one fails. */
static int run_ballot_group(pg_store_t *s, batch_t *b, size_t from, size_t to, int *nomem)
{
    PGconn *c = s->wconn;
    int r, dummy = 0;
    PGresult *res = PQexec(c, "SAVEPOINT ballots");
    r = classify(c, res, PGRES_COMMAND_OK, &dummy);
    PQclear(res);
    if (r != R_OK)
        return r == R_RETRY ? R_RETRY : R_FATAL;
    r = run_ballots(s, b, from, to, 0, NULL, nomem);
    if (r == R_OP) {
        res = PQexec(c, "ROLLBACK TO SAVEPOINT ballots");
        r = classify(c, res, PGRES_COMMAND_OK, &dummy);
        PQclear(res);
        for (size_t i = from; r == R_OK && i < to; i++) {
            if (b->js[i] == NULL)
                continue;
            res = PQexec(c, "SAVEPOINT one");
            r = classify(c, res, PGRES_COMMAND_OK, &dummy);
            PQclear(res);
            if (r != R_OK)
                break;
            r = run_ballots(s, b, i, i + 1, 0, NULL, nomem);
            if (r == R_OP) {
                b->op[i]->result = TLY_EINVAL;
                b->req[i] = 0;
                res = PQexec(c, "ROLLBACK TO SAVEPOINT one");
                r = classify(c, res, PGRES_COMMAND_OK, &dummy);
                PQclear(res);
            }
            if (r == R_OK) {
                res = PQexec(c, "RELEASE SAVEPOINT one");
                r = classify(c, res, PGRES_COMMAND_OK, &dummy);
                PQclear(res);
            }
        }
    }
    if (r != R_OK)
        return r == R_RETRY ? R_RETRY : R_FATAL;
    res = PQexec(c, "RELEASE SAVEPOINT ballots");
    r = classify(c, res, PGRES_COMMAND_OK, &dummy);
    PQclear(res);
    return r == R_OK ? R_OK : r == R_RETRY ? R_RETRY : R_FATAL;
}

/* The connection is gone: drop it and schedule the first reconnection. */
static void writer_lost(pg_store_t *s)
{
    if (s->wconn != NULL)
        PQfinish(s->wconn);
    s->wconn = NULL;
    if (!atomic_exchange(&s->wdown, 1))
        tly_log(TLY_LOG_ERROR, "store: postgres writer connection lost; failing writes until it is back", NULL);
    s->backoff_ms = PG_BACKOFF_MIN_MS;
    s->retry_at_us = pg_now_us() + PG_BACKOFF_MIN_MS * 1000;
}

static void fail_all(batch_t *b, int result)
{
    for (size_t i = 0; i < b->n; i++)
        b->op[i]->result = result;
}

/* feed_sql's $3: the counter deltas of the ballots the batch inserted (from what the
 * ballot statements reported) and of those it replaced or deleted (b->deltas). Malloc'd
 * JSON text, NULL when out of memory. */
static char *counter_deltas(const batch_t *b)
{
    json_t *d = json_copy(b->deltas);
    char *text = NULL;
    if (d == NULL)
        return NULL;
    for (size_t i = 0; i < b->n; i++) {
        const tly_store_op_t *op = b->op[i];
        if (op->type == TLY_OP_BALLOT_INSERT && op->result == 0 &&
            add_deltas(d, op->u.ballot.poll_id, 1, op->u.ballot.choices, op->u.ballot.nchoices, 1) != 0)
            goto out;
    }
    text = json_dumps(d, JSON_COMPACT);
out:
    json_decref(d);
    return text;
}

/* The next feed token of this run: never 0. */
static int64_t next_token(pg_store_t *s)
{
    if (++s->batches == 0)
        s->batches = 1;
    return s->run | (int64_t)s->batches;
}

/* A batch of ballot inserts only, as cast_sql: R_OK (committed; *seq its feed row or
 * 0), R_OP (a ballot the statement cannot take: the caller runs the batch the long way,
 * which isolates it), R_FATAL. */
static int run_cast(pg_store_t *s, batch_t *b, int64_t token, int64_t *seq, int *nomem)
{
    int r = R_FATAL;
    for (int attempt = 0; attempt < PG_BATCH_ATTEMPTS; attempt++) {
        *seq = 0;
        r = run_ballots(s, b, 0, b->n, token, seq, nomem);
        if (r != R_RETRY || *nomem)
            break;
    }
    return r == R_RETRY ? R_FATAL : r;
}

/*
 * One batch, one transaction. Returns 1 when it committed; then *seq is its feed row (0
 * when it changed nothing). On failure every op has TLY_EIO. *item is NULL, or the item
 * pg_feed_sending queued for it, which pg_feed_batch_done settles.
 */
static int run_batch(pg_store_t *s, batch_t *b, tly_store_op_t *first, pg_item_t **item, int64_t *seq_out,
                     uint64_t *commit_us)
{
    int nomem = 0, r = R_FATAL, dummy = 0, only_ballots = 1;
    char *feed_text = NULL, *counts_text = NULL, tok[24];
    json_t *feed = NULL;
    PGresult *res = NULL;
    int64_t token, t0;

    *item = NULL;
    *seq_out = 0;
    for (size_t i = 0; i < b->n; i++) {
        int rc = 0;
        tly_store_op_t *op = b->op[i];
        b->js[i] = NULL;
        b->req[i] = 0;
        op->result = 0;
        if (op->type == TLY_OP_BALLOT_INSERT) {
            const tly_ballot_row_t *bl = &op->u.ballot;
            /* NOT NULL columns, checked here: the ballot statement has no per-op
             * savepoint, and a NULL would fail every ballot of the group. */
            if (bl->poll_id == NULL || bl->voter_id == NULL || bl->vote_id == NULL || bl->receipt == NULL ||
                (bl->nchoices > 0 && bl->choices == NULL)) {
                op->result = TLY_EINVAL;
                continue;
            }
        }
        if (op->type == TLY_OP_POLL_DELETE) {
            if (op->u.poll.poll_id == NULL)
                op->result = TLY_EINVAL;
            else if ((b->js[i] = pg_op_json(op, &rc)) == NULL)
                op->result = rc;
            only_ballots = 0;
            continue;
        }
        if (op->type < TLY_OP_USER_INSERT || op->type > TLY_OP_BALLOT_DELETE) {
            op->result = TLY_EINVAL;
            continue;
        }
        if ((b->js[i] = pg_op_json(op, &rc)) == NULL) {
            if (rc != TLY_EINVAL)
                goto nomem;
            op->result = TLY_EINVAL;
        }
        if (op->type != TLY_OP_BALLOT_INSERT)
            only_ballots = 0;
    }
    if (s->wconn == NULL)
        goto fail;
    token = next_token(s);
    snprintf(tok, sizeof tok, "%" PRId64, token);
    *item = pg_feed_sending(s, first, b->n, token);

    t0 = pg_now_us();
    if (only_ballots) {
        r = run_cast(s, b, token, seq_out, &nomem);
        if (r == R_OK) {
            *commit_us = (uint64_t)(pg_now_us() - t0);
            return 1;
        }
        if (r != R_OP || nomem)
            goto fail;
        for (size_t i = 0; i < b->n; i++) /* the long way: same JSON, results again */
            if (b->js[i] != NULL)
                b->op[i]->result = 0;
    }

    for (int attempt = 0; attempt < PG_BATCH_ATTEMPTS; attempt++) {
        json_decref(b->deltas); /* a fresh start: deltas again */
        if ((b->deltas = json_array()) == NULL)
            goto nomem;
        res = PQexec(s->wconn, "BEGIN");
        r = classify(s->wconn, res, PGRES_COMMAND_OK, &dummy);
        if (r != R_OK)
            pg_log_error("store: postgres BEGIN failed", s->wconn, res);
        PQclear(res);
        res = NULL;
        if (r != R_OK)
            goto fail;
        for (size_t i = 0; r == R_OK && i < b->n;) {
            if (b->js[i] == NULL) {
                i++;
                continue;
            }
            if (b->op[i]->type == TLY_OP_BALLOT_INSERT) {
                size_t j = i;
                while (j < b->n && b->op[j]->type == TLY_OP_BALLOT_INSERT)
                    j++;
                r = run_ballot_group(s, b, i, j, &nomem);
                i = j;
            } else {
                char *param = NULL;
                if (b->op[i]->type != TLY_OP_POLL_DELETE && (param = json_dumps(b->js[i], JSON_COMPACT)) == NULL) {
                    nomem = 1;
                    r = R_FATAL;
                    break;
                }
                r = run_op(s, b->op[i], param, b->deltas);
                free(param);
                i++;
            }
        }
        if (r == R_OK)
            break;
        PQclear(PQexec(s->wconn, "ROLLBACK"));
        if (r != R_RETRY || nomem)
            goto fail;
        for (size_t i = 0; i < b->n; i++) /* a fresh start: same JSON, results again */
            if (b->js[i] != NULL)
                b->op[i]->result = 0;
    }
    if (r != R_OK)
        goto fail;

    /* The feed row: every op that changed something, in order. */
    if ((feed = json_array()) == NULL)
        goto nomem_rollback;
    for (size_t i = 0; i < b->n; i++) {
        tly_store_op_t *op = b->op[i];
        if (op->result == 0 && b->js[i] != NULL) {
            if (json_array_append(feed, b->js[i]) != 0)
                goto nomem_rollback;
        } else if (op->type == TLY_OP_BALLOT_INSERT && b->req[i]) {
            json_t *rq = pg_request_json(&op->u.ballot);
            if (rq == NULL || json_array_append_new(feed, rq) != 0)
                goto nomem_rollback;
        }
    }
    if (json_array_size(feed) > 0) {
        const char *params[4] = {s->origin, NULL, NULL, tok};
        if ((feed_text = json_dumps(feed, JSON_COMPACT)) == NULL || (counts_text = counter_deltas(b)) == NULL)
            goto nomem_rollback;
        params[1] = feed_text;
        params[2] = counts_text;
        res = PQexecPrepared(s->wconn, "feed", 4, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
            pg_log_error("store: postgres feed append failed", s->wconn, res);
            PQclear(PQexec(s->wconn, "ROLLBACK"));
            goto fail;
        }
        *seq_out = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
        res = NULL;
    }
    res = PQexec(s->wconn, "COMMIT");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_log_error("store: postgres COMMIT failed", s->wconn, res);
        goto fail;
    }
    *commit_us = (uint64_t)(pg_now_us() - t0);
    PQclear(res);
    json_decref(feed);
    free(feed_text);
    free(counts_text);
    json_decref(b->deltas);
    b->deltas = NULL;
    return 1;

nomem_rollback:
    PQclear(PQexec(s->wconn, "ROLLBACK"));
nomem:
    tly_log(TLY_LOG_ERROR, "store: out of memory in a postgres batch", NULL);
fail:
    PQclear(res);
    json_decref(feed);
    free(feed_text);
    free(counts_text);
    json_decref(b->deltas);
    b->deltas = NULL;
    if (s->wconn != NULL && pg_conn_lost(s->wconn))
        writer_lost(s);
    else if (s->wconn != NULL && PQtransactionStatus(s->wconn) != PQTRANS_IDLE)
        PQclear(PQexec(s->wconn, "ROLLBACK"));
    fail_all(b, TLY_EIO);
    *seq_out = 0;
    return 0;
}

static void *connector_main(void *arg)
{
    pg_store_t *s = arg;
    PGconn *c = connect_writer(s);
    pthread_mutex_lock(&s->mu);
    s->connected = c;
    s->connecting = 2;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Between batches: notice a connection the server closed while we were idle, so that
 * writable says so before the next batch fails; trim the feed once a minute. */
static void writer_idle(pg_store_t *s)
{
    int64_t now = pg_now_us();
    if (s->wconn == NULL)
        return;
    if (now - s->last_ping_us >= PG_PING_US) {
        s->last_ping_us = now;
        struct pollfd p = {.fd = PQsocket(s->wconn), .events = POLLIN};
        if (p.fd < 0 || (poll(&p, 1, 0) > 0 && (PQconsumeInput(s->wconn) == 0 || pg_conn_lost(s->wconn)))) {
            writer_lost(s);
            return;
        }
    }
    if (now - s->last_retention_us >= PG_RETENTION_US) {
        s->last_retention_us = now;
        PGresult *res = PQexec(s->wconn, retention_sql);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            pg_log_error("store: postgres feed retention failed", s->wconn, res);
            if (pg_conn_lost(s->wconn))
                writer_lost(s);
        }
        PQclear(res);
    }
}

static void *writer_main(void *arg)
{
    pg_store_t *s = arg;
    batch_t b = {0};
    size_t cap = 0;

    for (;;) {
        tly_store_op_t *first = NULL, *last = NULL;
        uint64_t n = 0, commit_us = 0;
        int64_t seq = 0;
        PGconn *got = NULL;
        int have_got = 0, stop = 0;

        pthread_mutex_lock(&s->mu);
        for (;;) {
            int64_t now = pg_now_us(), due = now + PG_PING_US;
            if (s->connecting == 2 || s->head != NULL || s->stopping)
                break;
            if (s->wconn == NULL && s->connecting == 0) {
                if (now >= s->retry_at_us)
                    break;
                if (s->retry_at_us < due)
                    due = s->retry_at_us;
            } else if (s->wconn != NULL && now - s->last_ping_us >= PG_PING_US) {
                break;
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            int64_t ns = ts.tv_nsec + (due - now) * 1000;
            ts.tv_sec += ns / 1000000000;
            ts.tv_nsec = ns % 1000000000;
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        }
        if (s->connecting == 2) {
            pthread_join(s->connector, NULL);
            got = s->connected;
            s->connected = NULL;
            s->connecting = 0;
            have_got = 1;
        }
        if (s->head != NULL) {
            first = last = s->head;
            n = 1;
            while (n < s->conf.batch_max && last->next != NULL) {
                last = last->next;
                n++;
            }
            s->head = last->next;
            if (s->head == NULL)
                s->tail = NULL;
            last->next = NULL;
        } else if (s->stopping) {
            stop = 1;
        }
        pthread_mutex_unlock(&s->mu);

        if (have_got) {
            if (got != NULL) {
                s->wconn = got;
                s->backoff_ms = PG_BACKOFF_MIN_MS;
                s->last_ping_us = pg_now_us();
                atomic_store(&s->wdown, 0);
                tly_log(TLY_LOG_INFO, "store: postgres writer reconnected", NULL);
            } else {
                s->backoff_ms = s->backoff_ms * 2 > PG_BACKOFF_MAX_MS ? PG_BACKOFF_MAX_MS : s->backoff_ms * 2;
                s->retry_at_us = pg_now_us() + s->backoff_ms * 1000;
            }
        }

        if (first != NULL) {
            pg_item_t *item = NULL;
            int committed = 0;
            if (n > cap) {
                size_t ncap = n < 64 ? 64 : n;
                void *o = tly_realloc(b.op, ncap * sizeof *b.op), *j = NULL, *q = NULL;
                if (o != NULL)
                    b.op = o;
                if (o != NULL && (j = tly_realloc(b.js, ncap * sizeof *b.js)) != NULL)
                    b.js = j;
                if (j != NULL && (q = tly_realloc(b.req, ncap)) != NULL)
                    b.req = q;
                if (q != NULL)
                    cap = ncap;
            }
            b.n = 0;
            for (tly_store_op_t *op = first; op != NULL && b.n < cap; op = op->next)
                b.op[b.n++] = op;
            if (b.n == n) {
                committed = run_batch(s, &b, first, &item, &seq, &commit_us);
                for (size_t i = 0; i < b.n; i++) {
                    json_decref(b.js[i]);
                    b.js[i] = NULL;
                }
            } else {
                tly_log(TLY_LOG_ERROR, "store: out of memory for a postgres batch", NULL);
                for (tly_store_op_t *op = first; op != NULL; op = op->next)
                    op->result = TLY_EIO;
            }
            /* From here the ops belong to the delivery order (and then to reap). */
            pg_feed_batch_done(s, item, first, n, committed, seq, commit_us);
        } else if (!stop) {
            writer_idle(s);
        }

        if (stop) {
            int joined = 0;
            pthread_mutex_lock(&s->mu);
            if (s->connecting != 0) {
                pthread_mutex_unlock(&s->mu);
                pthread_join(s->connector, NULL); /* at most connect_timeout */
                joined = 1;
            } else {
                pthread_mutex_unlock(&s->mu);
            }
            if (joined && s->connected != NULL)
                PQfinish(s->connected);
            break;
        }
        if (s->wconn == NULL) {
            pthread_mutex_lock(&s->mu);
            if (s->connecting == 0 && pg_now_us() >= s->retry_at_us && !s->stopping) {
                if (pthread_create(&s->connector, NULL, connector_main, s) == 0)
                    s->connecting = 1;
                else
                    s->retry_at_us = pg_now_us() + PG_BACKOFF_MAX_MS * 1000;
            }
            pthread_mutex_unlock(&s->mu);
        }
    }
    tly_free(b.op);
    tly_free(b.js);
    tly_free(b.req);
    return NULL;
}

/* ---- open / close ------------------------------------------------------------------ */

static void store_free(pg_store_t *s)
{
    if (s->wconn != NULL)
        PQfinish(s->wconn);
    if (s->fconn != NULL)
        PQfinish(s->fconn);
    if (s->locks_ready) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->fcv);
        pthread_mutex_destroy(&s->fmu);
    }
    pg_free_items(s->rq_head);
    tly_free(s->url);
    tly_free(s->origin);
    tly_free(s);
}

static int pg_open(const tly_store_conf_t *conf, pg_store_t **out)
{
    int rc = TLY_EINVAL;
    pg_store_t *s = NULL;
    PGresult *res = NULL;

    *out = NULL;
    if (conf == NULL || conf->url == NULL)
        goto fail;
    if (conf->origin != NULL && strlen(conf->origin) > 63)
        goto fail;
    rc = TLY_ENOMEM;
    if ((s = tly_calloc(1, sizeof *s)) == NULL)
        goto fail;
    s->base.be = &tly_store_pg;
    s->conf = *conf;
    if (s->conf.batch_max == 0)
        s->conf.batch_max = TLY_STORE_BATCH_MAX;
    if ((s->url = tly_strdup(conf->url)) == NULL)
        goto fail;
    if ((s->origin = tly_strdup(conf->origin != NULL && conf->origin[0] ? conf->origin : "tally")) == NULL)
        goto fail;
    s->conf.url = s->url;
    s->conf.origin = s->origin;
    s->conf.data_dir = NULL; /* not ours to keep */
    uint32_t run = 0;
    while (run == 0 && getrandom(&run, sizeof run, 0) != (ssize_t)sizeof run)
        ;
    s->run = (int64_t)(run & 0x7fffffff) << 32;

    rc = TLY_EIO;
    if (pthread_mutex_init(&s->mu, NULL) != 0)
        goto fail;
    if (pthread_mutex_init(&s->fmu, NULL) != 0) {
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    if (pthread_cond_init(&s->cv, NULL) != 0) {
        pthread_mutex_destroy(&s->fmu);
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    if (pthread_cond_init(&s->fcv, NULL) != 0) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->fmu);
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    s->locks_ready = 1;

    if ((s->wconn = pg_connect(s, "writer")) == NULL)
        goto fail;
    if ((rc = pg_migrate(s->wconn)) != 0)
        goto fail;
    rc = TLY_EIO;
    if (prepare_writer(s->wconn) != 0)
        goto fail;
    /* Where the follower starts unless load says otherwise (load reads it in the same
     * snapshot as the rows it returns). */
    res = PQexec(s->wconn, "SELECT seq FROM feed_head");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        pg_log_error("store: postgres feed head", s->wconn, res);
        goto fail;
    }
    s->next_seq = strtoll(PQgetvalue(res, 0, 0), NULL, 10) + 1;
    PQclear(res);
    res = NULL;
    if ((s->fconn = pg_connect(s, "follower")) == NULL)
        goto fail;
    s->backoff_ms = PG_BACKOFF_MIN_MS;
    s->last_ping_us = s->last_retention_us = pg_now_us();
    s->last_retention_us -= PG_RETENTION_US; /* trim once soon after start */

    if (pthread_create(&s->writer, NULL, writer_main, s) != 0)
        goto fail;
    s->writer_started = 1;
    if (pthread_create(&s->follower, NULL, pg_follower_main, s) != 0) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->writer, NULL);
        goto fail;
    }
    s->follower_started = 1;
    *out = s;
    return 0;

fail:
    PQclear(res);
    if (s != NULL)
        store_free(s);
    return rc;
}

static void pg_close(pg_store_t *s)
{
    if (s == NULL)
        return;
    /* The writer first: it commits what is queued. Then the follower (own batches still
     * waiting for foreign rows before them get them if it can read them in time). */
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->writer_started)
        pthread_join(s->writer, NULL);
    pthread_mutex_lock(&s->fmu);
    s->fstopping = 1;
    pthread_cond_signal(&s->fcv);
    pthread_mutex_unlock(&s->fmu);
    if (s->follower_started)
        pthread_join(s->follower, NULL);
    pg_feed_flush(s);
    pg_reap(s);
    store_free(s);
}

static int pg_writable(pg_store_t *s)
{
    return !atomic_load(&s->wdown) && !atomic_load(&s->behind);
}

static void pg_stats(pg_store_t *s, tly_store_stats_t *out)
{
    pthread_mutex_lock(&s->fmu);
    *out = s->stats;
    pthread_mutex_unlock(&s->fmu);
    pthread_mutex_lock(&s->mu);
    out->queued = 0;
    for (tly_store_op_t *op = s->head; op != NULL && out->queued < 1000000; op = op->next)
        out->queued++;
    pthread_mutex_unlock(&s->mu);
}

/* ---- the backend table store.c dispatches through ---- */

static int be_open(const tly_store_conf_t *conf, tly_store_t **out)
{
    pg_store_t *s;
    int rc = pg_open(conf, &s);
    *out = rc == 0 ? &s->base : NULL;
    return rc;
}
static int be_load(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx)
{
    return pg_load((pg_store_t *)s, cb, ctx);
}
static void be_submit_list(tly_store_t *s, tly_store_op_t *first)
{
    pg_store_t *p = (pg_store_t *)s;
    pg_feed_start(p, 0, 0); /* no load: follow from the position at open */
    pg_submit_list(p, first);
}
static void be_reap(tly_store_t *s)
{
    pg_reap((pg_store_t *)s);
}
static int be_writable(tly_store_t *s)
{
    return pg_writable((pg_store_t *)s);
}
static void be_follow(tly_store_t *s, void (*cb)(void *ctx, const tly_store_op_t *op), void *ctx)
{
    pg_store_t *p = (pg_store_t *)s;
    p->follow_cb = cb;
    p->follow_ctx = ctx;
}
static int be_shared(tly_store_t *s)
{
    return 1;
}
static void be_sync(tly_store_t *s, void (*cb)(void *arg), void *arg)
{
    pg_sync((pg_store_t *)s, cb, arg);
}
static void be_poke(tly_store_t *s)
{
    pg_feed_wake((pg_store_t *)s);
}
static void be_close(tly_store_t *s)
{
    pg_close((pg_store_t *)s);
}
static tly_store_reader_t *be_reader_open(tly_store_t *s)
{
    return pg_reader_open((pg_store_t *)s);
}
static int be_generate_ballots(tly_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    return pg_generate_ballots((pg_store_t *)s, poll_id, noptions, n);
}
static void be_stats(tly_store_t *s, tly_store_stats_t *out)
{
    pg_stats((pg_store_t *)s, out);
}

const tly_store_backend_t tly_store_pg = {
    .name = "postgres",
    .open = be_open,
    .load = be_load,
    .submit_list = be_submit_list,
    .reap = be_reap,
    .writable = be_writable,
    .follow = be_follow,
    .shared = be_shared,
    .sync = be_sync,
    .poke = be_poke,
    .close = be_close,
    .reader_open = be_reader_open,
    .reader_close = pg_reader_close,
    .audit_page = pg_audit_page,
    .ballots_page = pg_ballots_page,
    .generate_ballots = be_generate_ballots,
    .stats = be_stats,
    .reconcile = tly_store_pg_reconcile,
};
