/*
 * pg_stmt.c: the PostgreSQL writer's statements, prepared on each of its connections
 * (pg.c runs them by name). pg.c says how a batch uses them.
 */
#include "store/pg_int.h"

#include "base/base.h"

/* ---- the writer's statements (prepared on each of its connections) ---------------- */

/* Every op travels as the JSON the feed carries (pg_op_json): one text parameter, so
 * no SQL is ever built from data and the feed row is the statement's own input. */
#define BALLOT_FIELDS                                                                                                  \
    "poll_id text, voter_id text, vote_id text, receipt text, choices text, scores text,"                              \
    " recorded_at bigint, idem_key text, body_hash text, client_meta text, ip_hash text,"                              \
    " request_id text"
#define POLL_FIELDS                                                                                                    \
    "poll_id text, owner_id text, title text, description text, type int, status int,"                                 \
    " start_time bigint, end_time bigint, settings text, created_at bigint,"                                           \
    " updated_at bigint, idem_key text, body_hash text, final_results text, join_code text"
#define OPTION_FIELDS "position int, option_id text, text text, display_order int"

/* Consecutive ballot inserts, $1 a JSON array of ballots: the CTEs both ballot
 * statements share. `res` is (i, 0) for each inserted ballot (i: 1-based place in the
 * array), (i, 2) for each request row written (first op of a request_id), (i, 1) for
 * each ballot whose poll does not exist, (i, 4) for each ballot whose poll has its final
 * results (closed: not inserted), (i, 5) for each ballot under the id of a device linked
 * to an account (not inserted, no request row: the instance that sent it had not yet
 * heard of the link, and casts it again as the account); any op not in it was a
 * duplicate. Reading device_links takes its ACCESS SHARE lock before the statement's
 * snapshot, so a link in progress (which holds it ACCESS EXCLUSIVE) is either seen
 * whole or waited for. The poll rows are KEY SHARE locked, so a concurrent POLL_DELETE
 * waits for this batch (and then deletes its ballots) or wins (and these ballots find
 * no poll), and so does a freeze (poll_lock: FOR UPDATE): one that wins is seen here,
 * as the lock re-reads the row it waited for.
 * A request row takes its request's first final outcome (a consumer replaying it must
 * not turn "completed" into "failed"): only a "pending" row is overwritten. */
#define FAILED_ERROR "CASE WHEN s.closed THEN 'POLL_NOT_ACTIVE' ELSE 'ALREADY_VOTED' END"
#define BALLOT_CTES                                                                                                    \
    "WITH x AS ("                                                                                                      \
    "  SELECT e.i, e.j, r.* FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(j, i),"                          \
    "    jsonb_to_record(e.j) AS r(" BALLOT_FIELDS ")),"                                                               \
    "src AS ("                                                                                                         \
    "  SELECT x.i, x.poll_id, x.voter_id, x.vote_id, x.receipt, decode(x.choices, 'hex') AS choices,"                  \
    "    decode(x.scores, 'hex') AS scores, x.recorded_at, x.idem_key,"                                                \
    "    decode(x.body_hash, 'hex') AS body_hash, x.client_meta, decode(x.ip_hash, 'hex') AS ip_hash,"                 \
    "    x.request_id"                                                                                                 \
    "    , p.final_results IS NOT NULL AS closed,"                                                                     \
    "    EXISTS (SELECT 1 FROM device_links l WHERE l.device_id = x.voter_id) AS linked"                               \
    "  FROM x JOIN polls p ON p.poll_id = x.poll_id FOR KEY SHARE OF p),"                                              \
    "ins AS ("                                                                                                         \
    "  INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at,"                         \
    "    idem_key, body_hash, client_meta, ip_hash)"                                                                   \
    "  SELECT poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"                            \
    "    body_hash, client_meta, ip_hash FROM src WHERE NOT closed AND NOT linked ORDER BY i"                          \
    "  ON CONFLICT DO NOTHING"                                                                                         \
    "  RETURNING poll_id, voter_id, vote_id, receipt, ip_hash, choices, scores, recorded_at),"                         \
    "ok AS ("                                                                                                          \
    "  SELECT DISTINCT ON (ins.poll_id, ins.voter_id) src.i, ins.*"                                                    \
    "  FROM ins JOIN src ON src.poll_id = ins.poll_id AND src.voter_id = ins.voter_id"                                 \
    "    AND src.vote_id = ins.vote_id AND src.receipt = ins.receipt"                                                  \
    "    AND src.ip_hash IS NOT DISTINCT FROM ins.ip_hash"                                                             \
    "  ORDER BY ins.poll_id, ins.voter_id, src.i),"                                                                    \
    "a AS ("                                                                                                           \
    "  INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"                                               \
    "  SELECT poll_id, voter_id, 'cast', choices, scores, recorded_at FROM ok ORDER BY i"                              \
    "  RETURNING 1),"                                                                                                  \
    "r AS ("                                                                                                           \
    "  INSERT INTO vote_requests(request_id, poll_id, voter_id, state, vote_id, error, created_at)"                    \
    "  SELECT DISTINCT ON (s.request_id) s.request_id, s.poll_id, s.voter_id,"                                         \
    "    CASE WHEN ok.i IS NULL THEN 'failed' ELSE 'completed' END,"                                                   \
    "    CASE WHEN ok.i IS NULL THEN NULL ELSE s.vote_id END,"                                                         \
    "    CASE WHEN ok.i IS NULL THEN " FAILED_ERROR " END, s.recorded_at"                                              \
    "  FROM src s LEFT JOIN ok ON ok.i = s.i"                                                                          \
    "  WHERE s.request_id IS NOT NULL AND NOT s.linked ORDER BY s.request_id, s.i"                                     \
    "  ON CONFLICT (request_id) DO UPDATE SET state = excluded.state, vote_id = excluded.vote_id,"                     \
    "    error = excluded.error WHERE vote_requests.state = 'pending'"                                                 \
    "  RETURNING request_id),"                                                                                         \
    "res AS ("                                                                                                         \
    "  SELECT i, 0 AS k FROM ok"                                                                                       \
    "  UNION ALL SELECT min(s.i), 2 FROM r JOIN src s USING (request_id) GROUP BY r.request_id"                        \
    "  UNION ALL SELECT x.i, 1 FROM x WHERE NOT EXISTS (SELECT 1 FROM src WHERE src.i = x.i)"                          \
    "  UNION ALL SELECT i, 4 FROM src WHERE closed"                                                                    \
    "  UNION ALL SELECT i, 5 FROM src WHERE linked AND NOT closed)"

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
                "      'error', " FAILED_ERROR ", 'created_at', s.recorded_at)"
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

static const char user_sql[] = "INSERT INTO users(user_id, username, password_hash, email, created_at)"
                               " SELECT user_id, username, password_hash, email, created_at"
                               " FROM jsonb_to_record($1::jsonb) AS r(user_id text, username text, password_hash text,"
                               " email text, created_at bigint) RETURNING user_id";

static const char poll_insert_sql[] =
    "WITH r AS (SELECT * FROM jsonb_to_record($1::jsonb) AS r(" POLL_FIELDS ")),"
    "o AS (SELECT * FROM jsonb_to_recordset($1::jsonb -> 'options') AS o(" OPTION_FIELDS ")),"
    "p AS ("
    "  INSERT INTO polls(poll_id, owner_id, title, description, type, status, start_time,"
    "    end_time, settings, created_at, updated_at, idem_key, body_hash, final_results, join_code)"
    "  SELECT poll_id, owner_id, title, description, type, status, nullif(start_time, 0),"
    "    nullif(end_time, 0), settings, nullif(created_at, 0), nullif(updated_at, 0), idem_key,"
    "    decode(body_hash, 'hex'), final_results, join_code FROM r"
    "  WHERE NOT EXISTS (SELECT 1 FROM device_links l WHERE l.device_id = r.owner_id) RETURNING poll_id),"
    "io AS (INSERT INTO options(poll_id, position, option_id, text, display_order)"
    "  SELECT p.poll_id, o.position, o.option_id, o.text, o.display_order FROM p, o),"
    "ic AS (INSERT INTO option_counts(poll_id, position, votes)"
    "  SELECT p.poll_id, o.position, 0 FROM p, o),"
    "ip AS (INSERT INTO poll_counts(poll_id, ballots) SELECT poll_id, 0 FROM p)"
    "SELECT count(*) FROM p";

/* A poll insert writes nothing (count 0: TLY_EAUTH) when its owner is a device linked
 * to an account: the instance that sent it had not heard of the link yet.
 *
 * An update replaces the row but its owner (only a device link moves a poll to another
 * owner; an update queued behind one, such as a freeze, must not move it back) and
 * drops the options (a second statement inserts the new ones: deleting and inserting
 * one key in the same statement is not safe). A closed poll keeps no join code. */
static const char poll_update_sql[] =
    "WITH r AS (SELECT * FROM jsonb_to_record($1::jsonb) AS r(" POLL_FIELDS ")),"
    "u AS ("
    "  UPDATE polls SET title = r.title, description = r.description,"
    "    type = r.type, status = r.status, start_time = nullif(r.start_time, 0),"
    "    end_time = nullif(r.end_time, 0), settings = r.settings,"
    "    created_at = nullif(r.created_at, 0), updated_at = nullif(r.updated_at, 0),"
    "    idem_key = r.idem_key, body_hash = decode(r.body_hash, 'hex'),"
    "    join_code = CASE WHEN r.status = 2 OR coalesce(polls.final_results, r.final_results) IS NOT NULL"
    "      THEN NULL ELSE r.join_code END,"
    "    final_results = coalesce(polls.final_results, r.final_results)"
    "  FROM r WHERE polls.poll_id = r.poll_id RETURNING polls.poll_id),"
    "d AS (DELETE FROM options WHERE poll_id IN (SELECT poll_id FROM u))"
    "SELECT count(*) FROM u";

/*
 * A freeze (an update with final results and tly_poll_row_t.freeze): poll_lock takes
 * the poll row FOR UPDATE, so that ballot statements that hold it (KEY SHARE) commit
 * first and later ones wait and then see the final results; it returns whether the poll
 * has them already. Then, in a statement of its own (a snapshot taken after the lock,
 * which sees those commits), poll_touched: whether a feed row after $2 names the poll,
 * i.e. whether anything changed it that the final results were not computed from.
 */
static const char poll_lock_sql[] = "SELECT final_results IS NOT NULL FROM polls WHERE poll_id = $1 FOR UPDATE";
static const char poll_touched_sql[] = "SELECT EXISTS (SELECT 1 FROM feed WHERE seq > $2::bigint"
                                       "  AND (ops::jsonb @> jsonb_build_array(jsonb_build_object('poll_id', $1::text))"
                                       "    OR ops::jsonb @> jsonb_build_array(jsonb_build_object('ballots',"
                                       "      jsonb_build_array(jsonb_build_object('poll_id', $1::text))))))";

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
static const char poll_delete_rest_sql[] = "WITH o AS (DELETE FROM options WHERE poll_id = $1),"
                                           "b AS (DELETE FROM ballots WHERE poll_id = $1),"
                                           "a AS (DELETE FROM audit WHERE poll_id = $1),"
                                           "r AS (DELETE FROM vote_requests WHERE poll_id = $1),"
                                           "oc AS (DELETE FROM option_counts WHERE poll_id = $1),"
                                           "pc AS (DELETE FROM poll_counts WHERE poll_id = $1)"
                                           "SELECT 1";

/* The old choices are read under the row lock (FOR UPDATE returns the newest version if
 * another instance changed it meanwhile) and returned (hex), so that the counters move
 * by the difference in feed_sql. */
/* A change or retraction: (ballots changed, the old choices in hex, whether the poll is
 * closed). `g` locks the poll row as the ballot statements do (a freeze waits for it, or
 * it sees the freeze); a poll with final results keeps its ballots as they are. */
#define BALLOT_GUARD                                                                                                   \
    "WITH n AS (SELECT * FROM jsonb_to_record($1::jsonb) AS n(" BALLOT_FIELDS ")),"                                    \
    "g AS (SELECT p.final_results IS NOT NULL AS closed FROM polls p JOIN n"                                           \
    "  ON p.poll_id = n.poll_id FOR KEY SHARE OF p),"
static const char ballot_replace_sql[] =
    BALLOT_GUARD "old AS (SELECT b.poll_id, b.voter_id, b.choices FROM ballots b"
                 "  JOIN n ON b.poll_id = n.poll_id AND b.voter_id = n.voter_id"
                 "  WHERE NOT coalesce((SELECT closed FROM g), false) FOR UPDATE OF b),"
                 "u AS ("
                 /* the first change keeps the ballot as cast (b.* are the old values) */
                 "  UPDATE ballots b SET cast_choices = CASE WHEN b.cast_at IS NULL THEN b.choices"
                 "      ELSE b.cast_choices END,"
                 "    cast_scores = CASE WHEN b.cast_at IS NULL THEN b.scores ELSE b.cast_scores END,"
                 "    cast_at = coalesce(b.cast_at, b.recorded_at),"
                 "    choices = decode(n.choices, 'hex'), scores = decode(n.scores, 'hex'),"
                 "    recorded_at = n.recorded_at, idem_key = n.idem_key, body_hash = decode(n.body_hash, 'hex')"
                 "  FROM old, n WHERE b.poll_id = old.poll_id AND b.voter_id = old.voter_id"
                 "  RETURNING b.poll_id, b.voter_id, b.choices, b.scores, b.recorded_at),"
                 "a AS (INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"
                 "  SELECT poll_id, voter_id, 'changed', choices, scores, recorded_at FROM u)"
                 "SELECT (SELECT count(*) FROM u), (SELECT encode(choices, 'hex') FROM old LIMIT 1),"
                 "  coalesce((SELECT closed FROM g), false)";

static const char ballot_delete_sql[] = BALLOT_GUARD
    "d AS (DELETE FROM ballots b USING n WHERE b.poll_id = n.poll_id AND b.voter_id = n.voter_id"
    "  AND NOT coalesce((SELECT closed FROM g), false)"
    "  RETURNING b.poll_id, b.voter_id, b.choices),"
    "a AS (INSERT INTO audit(poll_id, voter_id, event, at, idem_key, body_hash)"
    "  SELECT d.poll_id, d.voter_id, 'revoked', n.recorded_at, n.idem_key, decode(n.body_hash, 'hex') FROM d, n)"
    "SELECT (SELECT count(*) FROM d), (SELECT encode(choices, 'hex') FROM d LIMIT 1),"
    "  coalesce((SELECT closed FROM g), false)";

/*
 * A device link (pg.c, run_link), $1 the op's JSON (pg_op_json). It holds device_links
 * ACCESS EXCLUSIVE from its first statement to its commit: ballot and poll inserts read
 * that table (above), so none commits beside it; those under way when it came commit
 * first, and those after it see the link and refuse the device's id. link_check: whether
 * a change committed after the feed position the caller's list was made at names the
 * device or the account as a voter, or links either (TLY_ESTATE: the list may miss a
 * ballot); the lock makes the answer final. link_polls hands the device's polls over,
 * found by owner (polls_owner), and names them.
 */
#define LINK_FIELDS "device_id text, user_id text, at bigint, after bigint"
static const char link_check_sql[] =
    "SELECT EXISTS (SELECT 1 FROM feed, jsonb_to_record($1::jsonb) AS l(" LINK_FIELDS ")"
    "  WHERE feed.seq > l.after"
    "  AND (feed.ops::jsonb @> jsonb_build_array(jsonb_build_object('voter_id', l.device_id))"
    "    OR feed.ops::jsonb @> jsonb_build_array(jsonb_build_object('voter_id', l.user_id))"
    "    OR feed.ops::jsonb @> jsonb_build_array(jsonb_build_object('t', 7, 'device_id', l.device_id))"
    "    OR feed.ops::jsonb @> jsonb_build_array(jsonb_build_object('t', 7, 'user_id', l.user_id))))";
_Static_assert(TLY_OP_DEVICE_LINK == 7, "link_check_sql names device links as t: 7");
static const char link_insert_sql[] = "INSERT INTO device_links(device_id, user_id, linked_at)"
                                      " SELECT device_id, user_id, at FROM jsonb_to_record($1::jsonb)"
                                      " AS l(" LINK_FIELDS ") RETURNING 1";
static const char link_ballots_sql[] = "SELECT o_poll, o_outcome, o_choices FROM link_ballots($1::jsonb)";
_Static_assert(TLY_LINK_MOVED == 1 && TLY_LINK_KEPT_DEVICE == 2 && TLY_LINK_KEPT_ACCOUNT == 3 &&
                   TLY_LINK_KEPT_BOTH == 4,
               "link_ballots (pg_schema.c, migration 6) returns these numbers");
static const char link_polls_sql[] = "UPDATE polls SET owner_id = l.user_id FROM jsonb_to_record($1::jsonb)"
                                     " AS l(" LINK_FIELDS ") WHERE polls.owner_id = l.device_id"
                                     " RETURNING polls.poll_id";

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

static const struct {
    const char *name, *sql;
} stmts[] = {
    {"ballots", ballot_sql},
    {"cast", cast_sql},
    {"user", user_sql},
    {"poll_insert", poll_insert_sql},
    {"poll_update", poll_update_sql},
    {"poll_lock", poll_lock_sql},
    {"poll_touched", poll_touched_sql},
    {"poll_options", poll_options_sql},
    {"poll_delete", poll_delete_sql},
    {"poll_delete_rest", poll_delete_rest_sql},
    {"ballot_replace", ballot_replace_sql},
    {"ballot_delete", ballot_delete_sql},
    {"feed", feed_sql},
    {"link_check", link_check_sql},
    {"link_insert", link_insert_sql},
    {"link_ballots", link_ballots_sql},
    {"link_polls", link_polls_sql},
};

int pg_prepare_writer(PGconn *c)
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
