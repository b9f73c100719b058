/*
 * pg_reconcile.c: the PostgreSQL store's counter rows (option_counts, poll_counts)
 * checked against the ballots they count, and put right (store.h, tly_store_reconcile).
 *
 * One statement does it all: it counts the ballots (per poll, and per poll and option
 * position through get_byte over generate_series, a ballot counting once for a position
 * however often its choices list it, as the writer counts), compares every counter
 * with its count and, when asked, moves the counters that differ. Set-based: one scan
 * of the ballots, hash aggregates, no loop per ballot or per poll.
 *
 * Why READ COMMITTED and deltas rather than REPEATABLE READ and absolute values: while
 * this runs, other instances keep committing ballots and moving the same counter rows.
 * Under REPEATABLE READ the UPDATE of any row one of them touched after our snapshot
 * fails with a serialization error, which on a busy poll is nearly every run. Within
 * one statement READ COMMITTED still reads one snapshot; an UPDATE that meets a row
 * changed since then waits for that change to commit and applies itself to the newest
 * version. The writer moves ballots and their counters in one statement, so a drift
 * (counter minus true count) does not change when a ballot is committed; adding the
 * drift we found to the newest value is right whatever happened in between.
 */
#include "store/pg_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <stdlib.h>
#include <string.h>

/*
 * $1: repair (boolean). Keys: a poll's option positions are those of its options and
 * those with a counter row; its total is counted for every poll and every poll_counts
 * row. `stored` is NULL for a missing row; `live`: the poll exists (rows of a poll that
 * does not are orphans, whose true count is 0). Missing rows of an existing poll are
 * created on repair, at 0 too: the writer only moves rows that exist.
 */
static const char reconcile_sql[] =
    "WITH opt_true AS ("
    "  SELECT b.poll_id, p.position, count(*) AS n"
    "  FROM ballots b CROSS JOIN LATERAL ("
    "    SELECT DISTINCT get_byte(b.choices, g) AS position"
    "    FROM generate_series(0, length(b.choices) - 1) AS g) p"
    "  GROUP BY b.poll_id, p.position),"
    "poll_true AS (SELECT poll_id, count(*) AS n FROM ballots GROUP BY poll_id),"
    "opt AS ("
    "  SELECT k.poll_id, k.position, oc.votes AS stored, coalesce(t.n, 0) AS actual,"
    "    EXISTS (SELECT 1 FROM polls p WHERE p.poll_id = k.poll_id) AS live"
    "  FROM (SELECT poll_id, position FROM options UNION SELECT poll_id, position FROM option_counts) k"
    "  LEFT JOIN option_counts oc ON oc.poll_id = k.poll_id AND oc.position = k.position"
    "  LEFT JOIN opt_true t ON t.poll_id = k.poll_id AND t.position = k.position),"
    "tot AS ("
    "  SELECT k.poll_id, -1 AS position, pc.ballots AS stored, coalesce(t.n, 0) AS actual,"
    "    EXISTS (SELECT 1 FROM polls p WHERE p.poll_id = k.poll_id) AS live"
    "  FROM (SELECT poll_id FROM polls UNION SELECT poll_id FROM poll_counts) k"
    "  LEFT JOIN poll_counts pc ON pc.poll_id = k.poll_id"
    "  LEFT JOIN poll_true t ON t.poll_id = k.poll_id),"
    "uo AS ("
    "  UPDATE option_counts oc SET votes = oc.votes + (d.actual - d.stored) FROM opt d"
    "  WHERE $1::boolean AND d.stored IS NOT NULL AND d.stored <> d.actual"
    "    AND oc.poll_id = d.poll_id AND oc.position = d.position),"
    "io AS ("
    "  INSERT INTO option_counts(poll_id, position, votes)"
    "  SELECT poll_id, position, actual FROM opt WHERE $1::boolean AND stored IS NULL AND live"
    "  ON CONFLICT (poll_id, position) DO UPDATE SET votes = option_counts.votes + excluded.votes),"
    "up AS ("
    "  UPDATE poll_counts pc SET ballots = pc.ballots + (d.actual - d.stored) FROM tot d"
    "  WHERE $1::boolean AND d.stored IS NOT NULL AND d.stored <> d.actual AND pc.poll_id = d.poll_id),"
    "ip AS ("
    "  INSERT INTO poll_counts(poll_id, ballots)"
    "  SELECT poll_id, actual FROM tot WHERE $1::boolean AND stored IS NULL AND live"
    "  ON CONFLICT (poll_id) DO UPDATE SET ballots = poll_counts.ballots + excluded.ballots)"
    "SELECT poll_id, position, stored, actual, live FROM ("
    "  SELECT poll_id, position, coalesce(stored, 0) AS stored, actual, live FROM tot"
    "  UNION ALL SELECT poll_id, position, coalesce(stored, 0), actual, live FROM opt) x"
    " ORDER BY poll_id COLLATE \"C\", position";

int tly_store_pg_reconcile(tly_store_reader_t *rd, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                           void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx)
{
    pg_reader_t *r = (pg_reader_t *)rd;
    const char *params[1] = {repair ? "true" : "false"};
    PGresult *res = NULL;
    int rc = TLY_EIO, began = 0;

    if (pg_conn_lost(r->c)) { /* as page reads do: survive a restart of the server */
        PQreset(r->c);
        if (pg_conn_lost(r->c) || PQsetClientEncoding(r->c, "UTF8") != 0) {
            pg_log_error("store: postgres reconcile cannot reconnect", r->c, NULL);
            return TLY_EIO;
        }
    }
    if (pg_exec(r->c, "BEGIN ISOLATION LEVEL READ COMMITTED", PGRES_COMMAND_OK) != 0)
        goto fail;
    began = 1;
    res = PQexec(r->c, "SELECT pg_try_advisory_xact_lock(" TLY_STORE_PG_RECONCILE_LOCK ")");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        pg_log_error("store: postgres reconcile lock failed", r->c, res);
        goto fail;
    }
    if (strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
        rc = TLY_ESTATE; /* another instance is reconciling */
        goto fail;
    }
    PQclear(res);
    res = PQexecParams(r->c, reconcile_sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        pg_log_error("store: postgres reconcile failed", r->c, res);
        goto fail;
    }
    if (pg_exec(r->c, "COMMIT", PGRES_COMMAND_OK) != 0) {
        began = 0; /* a failed COMMIT ends the transaction */
        goto fail;
    }
    began = 0;
    /* Only what committed is reported. */
    int drifts = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        tly_store_drift_t d = {
            .poll_id = PQgetvalue(res, i, 0),
            .position = atoi(PQgetvalue(res, i, 1)),
            .stored = strtoll(PQgetvalue(res, i, 2), NULL, 10),
            .actual = strtoll(PQgetvalue(res, i, 3), NULL, 10),
        };
        if (d.stored != d.actual) {
            drifts++;
            if (drift != NULL)
                drift(ctx, &d);
        }
        if (actual != NULL && strcmp(PQgetvalue(res, i, 4), "t") == 0)
            actual(ctx, d.poll_id, d.position, d.actual);
    }
    rc = drifts;
fail:
    PQclear(res);
    if (began)
        PQclear(PQexec(r->c, "ROLLBACK"));
    return rc;
}
