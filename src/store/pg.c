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
 * The schema, its migrations and connecting are in pg_schema.c; the statements in
 * pg_stmt.c.
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

/* At most once a minute. The newest row always stays, so a follower that lags behind
 * the retention finds a row beyond its position and knows it. */
static const char retention_sql[] = "DELETE FROM feed WHERE at < now() - interval '1 hour'"
                                    " AND seq < (SELECT seq FROM feed_head)";

static PGconn *connect_writer(pg_store_t *s)
{
    PGconn *c = pg_connect(s, "writer");
    if (c != NULL && pg_prepare_writer(c) != 0) {
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
    json_t **js; /* the op as JSON, or NULL (op failed before reaching the database) */
    char *req;   /* 1: an async ballot's failed request row was written */
    size_t n;
    json_t *deltas; /* counter deltas of replaced and deleted ballots (feed_sql's $3) */
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

/* The checks of a freeze (poll_lock_sql says what they are): *result gets 0 (store the
 * final results), TLY_ENOTFOUND, TLY_EEXIST (the poll has final results already) or
 * TLY_ESTATE (the poll changed after row->freeze_after). Returns R_OK, or what classify
 * says of a failed statement. */
static int freeze_check(PGconn *c, const tly_poll_row_t *row, int *result, int *res_op)
{
    char after[24];
    snprintf(after, sizeof after, "%" PRId64, row->freeze_after);
    const char *params[2] = {row->poll_id, after};
    PGresult *res = PQexecPrepared(c, "poll_lock", 1, params, NULL, NULL, 0);
    int r = classify(c, res, PGRES_TUPLES_OK, res_op);
    if (r == R_OK)
        *result = PQntuples(res) == 0 ? TLY_ENOTFOUND : PQgetvalue(res, 0, 0)[0] == 't' ? TLY_EEXIST : 0;
    PQclear(res);
    if (r == R_OK && *result == 0) {
        res = PQexecPrepared(c, "poll_touched", 2, params, NULL, NULL, 0);
        r = classify(c, res, PGRES_TUPLES_OK, res_op);
        if (r == R_OK && PQntuples(res) == 1 && PQgetvalue(res, 0, 0)[0] == 't')
            *result = TLY_ESTATE;
        PQclear(res);
    }
    if (r == R_FATAL || r == R_RETRY)
        pg_log_error("store: postgres freeze check failed", c, NULL);
    return r;
}

/*
 * TLY_OP_DEVICE_LINK (store.h), inside run_op's savepoint, by the statements of
 * pg_stmt.c ("A device link"): device_links locked ACCESS EXCLUSIVE (ballot and poll
 * inserts of every instance wait from here to the commit; the savepoint's rollback lets
 * it go), the feed checked for what the caller's list cannot know (TLY_ESTATE), the link
 * row (TLY_EEXIST), the ballots (their outcomes, and the counters of those retracted)
 * and the polls. Returns R_OK, R_OP with *res_op, or R_RETRY / R_FATAL for the batch.
 */
static int run_link(pg_store_t *s, tly_store_op_t *op, const char *param, json_t *deltas, int *res_op)
{
    PGconn *c = s->wconn;
    tly_link_row_t *l = &op->u.link;
    tly_strlist_t moved = {0};
    PGresult *res;
    int r;

    tly_free(l->polls_moved); /* an earlier attempt of the batch's */
    l->polls_moved = NULL;
    l->npolls_moved = 0;
    for (size_t i = 0; i < l->nballots; i++)
        l->ballots[i].outcome = TLY_LINK_GONE;
    res = PQexec(c, "LOCK TABLE device_links IN ACCESS EXCLUSIVE MODE");
    r = classify(c, res, PGRES_COMMAND_OK, res_op);
    if (r == R_FATAL || r == R_RETRY)
        pg_log_error("store: postgres link lock failed", c, res);
    PQclear(res);
    if (r != R_OK)
        return r == R_OP ? R_FATAL : r;
    res = exec_json(c, "link_check", param);
    r = classify(c, res, PGRES_TUPLES_OK, res_op);
    if (r == R_OK && PQntuples(res) == 1 && PQgetvalue(res, 0, 0)[0] == 't') {
        *res_op = TLY_ESTATE;
        r = R_OP;
    }
    PQclear(res);
    if (r == R_OK)
        r = exec_count(c, "link_insert", param, NULL, res_op); /* a second link: 23505, TLY_EEXIST */
    if (r != R_OK)
        goto out;
    res = exec_json(c, "link_ballots", param);
    r = classify(c, res, PGRES_TUPLES_OK, res_op);
    if (r == R_OK && PQntuples(res) != (int)l->nballots) {
        tly_log(TLY_LOG_ERROR, "store: postgres link_ballots answered another number of rows", NULL);
        r = R_FATAL;
    }
    for (int i = 0; r == R_OK && i < PQntuples(res); i++) {
        tly_link_ballot_t *e = &l->ballots[i];
        uint8_t old[256];
        int nold = PQgetisnull(res, i, 2) ? 0 : pg_unhex(PQgetvalue(res, i, 2), old, sizeof old);
        e->outcome = (int)strtol(PQgetvalue(res, i, 1), NULL, 10);
        if ((e->outcome == TLY_LINK_KEPT_DEVICE || e->outcome == TLY_LINK_KEPT_ACCOUNT) &&
            add_deltas(deltas, e->poll_id, -1, old, nold > 0 ? (size_t)nold : 0, -1) != 0)
            r = R_FATAL; /* out of memory: the batch fails as a whole */
    }
    if (r == R_FATAL || r == R_RETRY)
        pg_log_error("store: postgres link statement failed", c, res);
    PQclear(res);
    if (r != R_OK)
        goto out;
    res = exec_json(c, "link_polls", param);
    r = classify(c, res, PGRES_TUPLES_OK, res_op);
    for (int i = 0; r == R_OK && i < PQntuples(res); i++)
        if (tly_strlist_add(&moved, PQgetvalue(res, i, 0)) != 0)
            r = R_FATAL;
    if (r == R_FATAL || r == R_RETRY)
        pg_log_error("store: postgres link statement failed", c, res);
    PQclear(res);
    if (r == R_OK && tly_strlist_take(&moved, &l->polls_moved, &l->npolls_moved) != 0)
        r = R_FATAL;
out:
    tly_free(moved.buf);
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
        r = exec_count(c, "poll_insert", param, &n, &res_op);
        if (r == R_OK && n == 0) { /* its owner is a linked device: nothing written */
            r = R_OP;
            res_op = TLY_EAUTH;
        }
        break;
    case TLY_OP_POLL_UPDATE:
        if (op->u.poll.freeze && (r = freeze_check(c, &op->u.poll, &op->result, &res_op)) != R_OK)
            break;
        if (op->result != 0) { /* frozen already, or changed since: nothing to write */
            r = R_OP;
            res_op = op->result;
            break;
        }
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
            if (n == 0 && PQntuples(q) > 0 && PQgetvalue(q, 0, 2)[0] == 't')
                op->result = TLY_ESTATE; /* the poll has its final results */
            else if (n == 0)
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
    case TLY_OP_DEVICE_LINK:
        r = run_link(s, op, param, deltas, &res_op);
        break;
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
static int run_ballots(pg_store_t *s, batch_t *b, size_t from, size_t to, int64_t token, int64_t *seq, int *rc_nomem)
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
            else if (kind == 4)
                b->op[at]->result = TLY_ESTATE; /* the poll has its final results */
            else if (kind == 5)
                b->op[at]->result = TLY_EAUTH; /* the voter is a linked device */
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
        if (op->type < TLY_OP_USER_INSERT || op->type > TLY_OP_DEVICE_LINK) {
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
    /* A link's feed entry carries what it did (the outcomes the statements set), so that
     * every instance applies the same. */
    for (size_t i = 0; i < b->n; i++) {
        int rc = 0;
        if (b->op[i]->type != TLY_OP_DEVICE_LINK || b->op[i]->result != 0 || b->js[i] == NULL)
            continue;
        json_decref(b->js[i]);
        if ((b->js[i] = pg_op_json(b->op[i], &rc)) == NULL)
            goto nomem_rollback;
    }

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
    pthread_setname_np(pthread_self(), "tally-pg-conn");
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
    pthread_setname_np(pthread_self(), "tally-writer");
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
    if (pg_prepare_writer(s->wconn) != 0)
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
    tly_store_stop_thread(&s->mu, &s->cv, &s->stopping, s->writer, s->writer_started);
    tly_store_stop_thread(&s->fmu, &s->fcv, &s->fstopping, s->follower, s->follower_started);
    pg_feed_flush(s);
    pg_reap(s);
    store_free(s);
}

static int pg_writable(pg_store_t *s) { return !atomic_load(&s->wdown) && !atomic_load(&s->behind); }

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
static void be_reap(tly_store_t *s) { pg_reap((pg_store_t *)s); }
static int be_writable(tly_store_t *s) { return pg_writable((pg_store_t *)s); }
static void be_follow(tly_store_t *s, void (*cb)(void *ctx, const tly_store_op_t *op), void *ctx)
{
    pg_store_t *p = (pg_store_t *)s;
    p->follow_cb = cb;
    p->follow_ctx = ctx;
}
static int be_shared(tly_store_t *s) { return 1; }
static int64_t be_applied_seq(tly_store_t *s) { return ((pg_store_t *)s)->applied; }
static void be_sync(tly_store_t *s, void (*cb)(void *arg), void *arg) { pg_sync((pg_store_t *)s, cb, arg); }
static void be_poke(tly_store_t *s) { pg_feed_wake((pg_store_t *)s); }
static void be_close(tly_store_t *s) { pg_close((pg_store_t *)s); }
static tly_store_reader_t *be_reader_open(tly_store_t *s) { return pg_reader_open((pg_store_t *)s); }
static int be_generate_ballots(tly_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    return pg_generate_ballots((pg_store_t *)s, poll_id, noptions, n);
}
static void be_stats(tly_store_t *s, tly_store_stats_t *out) { pg_stats((pg_store_t *)s, out); }

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
    .applied_seq = be_applied_seq,
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
