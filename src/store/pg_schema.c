/*
 * pg_schema.c: the PostgreSQL store's schema and its migrations, and what every one of
 * its connections shares: connecting, error logs, small statement helpers.
 */
#include "store/pg_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The advisory lock key of migrations: "tally" as a number (0x74616c6c79). */
#define PG_MIGRATION_LOCK "499850701945"

/* ---- schema ---------------------------------------------------------------------- */

/* One base-32 digit of n.v (a row's number made a code in migration 5), in SQL. */
#define JOIN_CODE_DIGIT(shift) "substr('" TLY_JOIN_CODE_ALPHABET "', ((n.v >> " #shift ") & 31)::int + 1, 1)"

/*
 * migrations[i] takes schema_version i to i + 1, each in its own transaction with the
 * version bump, under an advisory lock (instances starting together migrate once).
 * Append only. No foreign keys: a poll's rows go with it in POLL_DELETE explicitly, and
 * a ballot insert takes a KEY SHARE lock on its poll row itself (see ballot_sql), which
 * is all a foreign key would add, without its per-row trigger.
 */
static const char *const migrations[] = {
    /* 1: everything. */
    "CREATE TABLE users("
    "  user_id text PRIMARY KEY,"
    "  username text NOT NULL,"
    "  password_hash text NOT NULL,"
    "  email text,"
    "  created_at bigint NOT NULL,"
    "  ord bigserial NOT NULL);"
    "CREATE UNIQUE INDEX users_username ON users(lower(username));"
    "CREATE TABLE polls("
    "  poll_id text PRIMARY KEY,"
    "  owner_id text NOT NULL,"
    "  title text NOT NULL,"
    "  description text,"
    "  type integer NOT NULL,"
    "  status integer NOT NULL,"
    "  start_time bigint,"
    "  end_time bigint,"
    "  settings text NOT NULL,"
    "  created_at bigint,"
    "  updated_at bigint,"
    "  idem_key text,"
    "  body_hash bytea,"
    "  final_results text,"
    "  ord bigserial NOT NULL);"
    "CREATE INDEX polls_owner ON polls(owner_id, created_at);"
    "CREATE TABLE options("
    "  poll_id text NOT NULL,"
    "  position integer NOT NULL,"
    "  option_id text NOT NULL,"
    "  text text NOT NULL,"
    "  display_order integer NOT NULL,"
    "  PRIMARY KEY(poll_id, position));"
    /* seq: load order, kept by a change. Unique keys must include the partition key,
     * so vote ids and receipts are unique per poll here (SQLite: store-wide). */
    "CREATE SEQUENCE ballots_seq;"
    "CREATE TABLE ballots("
    "  seq bigint NOT NULL DEFAULT nextval('ballots_seq'),"
    "  poll_id text NOT NULL,"
    "  voter_id text NOT NULL,"
    "  vote_id text NOT NULL,"
    "  receipt text NOT NULL,"
    "  choices bytea NOT NULL,"
    "  scores bytea,"
    "  recorded_at bigint NOT NULL,"
    "  idem_key text,"
    "  body_hash bytea,"
    "  client_meta text,"
    "  ip_hash bytea,"
    "  PRIMARY KEY(poll_id, voter_id),"
    "  UNIQUE(poll_id, vote_id),"
    "  UNIQUE(poll_id, receipt),"
    "  UNIQUE(poll_id, ip_hash)) PARTITION BY HASH (poll_id);"
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    "CREATE INDEX ballots_seq_order ON ballots(seq);" /* load streams it: a merge, no sort */
    "CREATE SEQUENCE audit_seq;"
    "CREATE TABLE audit("
    "  seq bigint NOT NULL DEFAULT nextval('audit_seq'),"
    "  poll_id text NOT NULL,"
    "  voter_id text NOT NULL,"
    "  event text NOT NULL CHECK(event IN ('cast','changed','revoked')),"
    "  choices bytea,"
    "  scores bytea,"
    "  at bigint NOT NULL,"
    "  PRIMARY KEY(poll_id, seq)) PARTITION BY HASH (poll_id);"
    "DO $$ BEGIN"
    "  FOR i IN 0..15 LOOP"
    "    EXECUTE format('CREATE TABLE ballots_p%s PARTITION OF ballots"
    "                    FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);"
    "    EXECUTE format('CREATE TABLE audit_p%s PARTITION OF audit"
    "                    FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);"
    "  END LOOP;"
    "END $$;"
    /* History is never rewritten (a guard against bugs: the owner of the database can
     * drop it). Rows go only with their poll, by DELETE. */
    "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS"
    "  $$ BEGIN RAISE EXCEPTION 'audit is append-only'; END $$;"
    "CREATE TRIGGER audit_no_update BEFORE UPDATE OR TRUNCATE ON audit"
    "  FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();"
    /* votes = the current ballots of the poll whose choices include the position. */
    "CREATE TABLE option_counts("
    "  poll_id text NOT NULL,"
    "  position integer NOT NULL,"
    "  votes bigint NOT NULL DEFAULT 0,"
    "  PRIMARY KEY(poll_id, position));"
    "CREATE TABLE poll_counts("
    "  poll_id text PRIMARY KEY,"
    "  ballots bigint NOT NULL DEFAULT 0);"
    "CREATE TABLE vote_requests("
    "  request_id text PRIMARY KEY,"
    "  poll_id text NOT NULL,"
    "  voter_id text NOT NULL,"
    "  state text NOT NULL,"
    "  vote_id text,"
    "  error text,"
    "  created_at bigint NOT NULL,"
    "  ord bigserial NOT NULL);"
    "CREATE INDEX vote_requests_poll ON vote_requests(poll_id);"
    "CREATE TABLE feed_head("
    "  id integer PRIMARY KEY CHECK (id = 1),"
    "  seq bigint NOT NULL);"
    "INSERT INTO feed_head VALUES (1, 0);"
    "CREATE TABLE feed("
    "  seq bigint PRIMARY KEY,"
    "  origin text NOT NULL,"
    "  at timestamptz NOT NULL DEFAULT now(),"
    "  ops text NOT NULL);"
    "CREATE INDEX feed_at ON feed(at);",
    /* 2: the batch that wrote a feed row (token), for its instance to know the row as
     * its own before it has the seq (a batch that is one statement learns it with the
     * commit); and the end of every batch as a function (pg.c says why). */
    "ALTER TABLE feed ADD COLUMN token bigint;"
    "CREATE FUNCTION feed_append(p_origin text, p_token bigint, p_ops text,"
    "  p_polls text[], p_positions int[], p_deltas bigint[]) RETURNS bigint"
    "  LANGUAGE plpgsql AS $$"
    "DECLARE s bigint;"
    "BEGIN"
    "  UPDATE feed_head SET seq = seq + 1 RETURNING seq INTO s;"
    "  UPDATE option_counts oc SET votes = oc.votes + d.n"
    "    FROM unnest(p_polls, p_positions, p_deltas) AS d(p, o, n)"
    "    WHERE d.o >= 0 AND d.n <> 0 AND oc.poll_id = d.p AND oc.position = d.o;"
    "  UPDATE poll_counts pc SET ballots = pc.ballots + d.n"
    "    FROM unnest(p_polls, p_positions, p_deltas) AS d(p, o, n)"
    "    WHERE d.o = -1 AND d.n <> 0 AND pc.poll_id = d.p;"
    "  INSERT INTO feed(seq, origin, token, ops) VALUES (s, p_origin, p_token, p_ops);"
    "  RETURN s;"
    "END $$;",
    /* 3: a "revoked" row keeps the Idempotency-Key and body hash of the request that cast
     * the retracted ballot (a late retry of it is refused after a restart too); load
     * reads them through the partial index. */
    "ALTER TABLE audit ADD COLUMN idem_key text, ADD COLUMN body_hash bytea;"
    "CREATE INDEX audit_retracted_keys ON audit(seq) WHERE event = 'revoked' AND idem_key IS NOT NULL;",
    /* 4: the ballot as first cast, kept by its first change (BALLOT_REPLACE): a retry of
     * the POST that cast it gets its first answer again after a change and a restart.
     * NULL for ballots never changed; load reads the others through the partial index.
     * Ballots changed before this version get theirs from the audit log (the voter's
     * latest "cast" row, when a "changed" row follows it), in one grouped pass, once. */
    "ALTER TABLE ballots ADD COLUMN cast_choices bytea, ADD COLUMN cast_scores bytea, ADD COLUMN cast_at bigint;"
    "CREATE INDEX ballots_changed ON ballots(seq) WHERE cast_at IS NOT NULL;"
    "UPDATE ballots b SET cast_choices = a.choices, cast_scores = a.scores, cast_at = a.at"
    "  FROM (SELECT poll_id, voter_id, max(seq) FILTER (WHERE event = 'cast') AS cast_seq,"
    "          max(seq) FILTER (WHERE event = 'changed') AS changed_seq"
    "        FROM audit GROUP BY poll_id, voter_id) l"
    "  JOIN audit a ON a.poll_id = l.poll_id AND a.seq = l.cast_seq"
    "  WHERE l.changed_seq > l.cast_seq AND b.poll_id = l.poll_id AND b.voter_id = l.voter_id;",
    /* 5: join codes, as SQLite's 7: an open poll's code, unique among the polls that
     * hold one; a poll closing gives its code back. The polls open before this step get
     * theirs from their row numbers through n -> (n * m + a) mod 2^30 (m odd, a and m
     * random, chosen once): a bijection, so they are distinct. */
    "ALTER TABLE polls ADD COLUMN join_code text;"
    "WITH k AS MATERIALIZED (SELECT floor(random() * 1073741824)::bigint AS a,"
    "    floor(random() * 536870912)::bigint * 2 + 1 AS m),"
    "n AS (SELECT p.poll_id, ((row_number() OVER (ORDER BY p.ord)) * k.m + k.a) % 1073741824 AS v"
    "  FROM polls p, k WHERE p.status <> 2 AND p.final_results IS NULL)"
    "UPDATE polls SET join_code = " JOIN_CODE_DIGIT(25) " || " JOIN_CODE_DIGIT(20) " || " JOIN_CODE_DIGIT(
        15) "  || " JOIN_CODE_DIGIT(10) " || " JOIN_CODE_DIGIT(5) " || " JOIN_CODE_DIGIT(0) "  FROM n WHERE "
                                                                                            "polls.poll_id = n.poll_id;"
                                                                                            "CREATE UNIQUE INDEX "
                                                                                            "polls_join_code ON "
                                                                                            "polls(join_code) WHERE "
                                                                                            "join_code IS NOT NULL;",

    /* 6: device links (issue 17): an anonymous device token that registers or logs in
     * becomes one person with the account. The link row, the device's ballots rewritten
     * to the account (where both voted in a poll, the later ballot retracted with a
     * "revoked" row, as a retraction writes it), and its polls handed over are one
     * transaction. link_ballots does the ballots the caller lists (p: the op's JSON,
     * pg_op_json), one result row per poll in their order: the outcome of
     * tly_link_outcome_t and the retracted ballot's choices (hex, for the counters).
     * Row locks first (the poll KEY SHARE, as ballot statements take it; both ballots
     * FOR UPDATE), so that it decides on what concurrent changes left. */
    "CREATE TABLE device_links("
    "  device_id text PRIMARY KEY,"
    "  user_id text NOT NULL,"
    "  linked_at bigint NOT NULL);"
    "CREATE FUNCTION link_ballots(p jsonb) RETURNS TABLE(o_poll text, o_outcome int, o_choices text)"
    "  LANGUAGE plpgsql AS $$"
    "DECLARE"
    "  v_dev text := p->>'device_id';"
    "  v_usr text := p->>'user_id';"
    "  v_at bigint := (p->>'at')::bigint;"
    "  v_frozen boolean;"
    "  e record; d record; u record;"
    "BEGIN"
    "  FOR e IN SELECT x.poll_id, x.closed FROM jsonb_to_recordset(p->'ballots') AS x(poll_id text, closed boolean)"
    "  LOOP"
    "    o_poll := e.poll_id; o_outcome := 0; o_choices := NULL;"
    "    SELECT pl.final_results IS NOT NULL INTO v_frozen FROM polls pl WHERE pl.poll_id = e.poll_id FOR KEY SHARE;"
    "    IF FOUND THEN"
    "      SELECT b.seq, b.choices, b.idem_key, b.body_hash, coalesce(b.cast_at, b.recorded_at) AS cast_time INTO d"
    "        FROM ballots b WHERE b.poll_id = e.poll_id AND b.voter_id = v_dev FOR UPDATE;"
    "      IF FOUND THEN"
    "        SELECT b.seq, b.choices, b.idem_key, b.body_hash, coalesce(b.cast_at, b.recorded_at) AS cast_time INTO u"
    "          FROM ballots b WHERE b.poll_id = e.poll_id AND b.voter_id = v_usr FOR UPDATE;"
    "        IF NOT FOUND THEN"
    "          UPDATE ballots SET voter_id = v_usr WHERE poll_id = e.poll_id AND voter_id = v_dev;"
    "          o_outcome := 1;"
    "        ELSIF v_frozen OR e.closed THEN"
    "          o_outcome := 4;"
    "        ELSIF (d.cast_time, d.seq) < (u.cast_time, u.seq) THEN"
    "          DELETE FROM ballots WHERE poll_id = e.poll_id AND voter_id = v_usr;"
    "          INSERT INTO audit(poll_id, voter_id, event, at, idem_key, body_hash)"
    "            VALUES (e.poll_id, v_usr, 'revoked', v_at, u.idem_key, u.body_hash);"
    "          UPDATE ballots SET voter_id = v_usr WHERE poll_id = e.poll_id AND voter_id = v_dev;"
    "          o_outcome := 2; o_choices := encode(u.choices, 'hex');"
    "        ELSE"
    "          DELETE FROM ballots WHERE poll_id = e.poll_id AND voter_id = v_dev;"
    "          INSERT INTO audit(poll_id, voter_id, event, at, idem_key, body_hash)"
    "            VALUES (e.poll_id, v_dev, 'revoked', v_at, d.idem_key, d.body_hash);"
    "          o_outcome := 3; o_choices := encode(d.choices, 'hex');"
    "        END IF;"
    "      END IF;"
    "    END IF;"
    "    RETURN NEXT;"
    "  END LOOP;"
    "END $$;",
};

/* ---- helpers ----------------------------------------------------------------------- */

int64_t pg_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void pg_log_error(const char *msg, PGconn *c, const PGresult *res)
{
    char text[512];
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *m = res ? PQresultErrorMessage(res) : NULL;
    if (m == NULL || m[0] == '\0')
        m = c ? PQerrorMessage(c) : "no connection";
    /* libpq's messages name tables, constraints and hosts, never the password; keys
     * of a failed unique check may quote ids, which are not secrets. One line. */
    snprintf(text, sizeof text, "%s", m);
    for (char *p = text; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    tly_log(TLY_LOG_ERROR, msg, "sqlstate", state ? state : "", "pg", text, NULL);
}

int pg_conn_lost(PGconn *c) { return c == NULL || PQstatus(c) != CONNECTION_OK; }

int pg_exec(PGconn *c, const char *sql, ExecStatusType want)
{
    PGresult *res = PQexec(c, sql);
    int ok = PQresultStatus(res) == want;
    if (!ok)
        pg_log_error("store: postgres statement failed", c, res);
    PQclear(res);
    return ok ? 0 : TLY_EIO;
}

/* Server notices (e.g. "relation already exists, skipping") are not ours to print:
 * libpq's default writes them raw to stderr, outside the JSON log. */
static void quiet_notice(void *arg, const char *message) {}

PGconn *pg_connect(const pg_store_t *s, const char *role)
{
    /* dbname first: it is the URL, expanded; the parameters after it override it. */
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {s->url, "5", "tally", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (c == NULL) {
        tly_log(TLY_LOG_ERROR, "store: postgres connect failed", "conn", role, "pg", "out of memory", NULL);
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        char text[512];
        snprintf(text, sizeof text, "%s", PQerrorMessage(c));
        for (char *p = text; *p; p++)
            if (*p == '\n')
                *p = ' ';
        tly_log(TLY_LOG_ERROR, "store: postgres connect failed", "conn", role, "pg", text, NULL);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, quiet_notice, NULL);
    /* Strings are UTF-8 in and out whatever the server's default; times are ours
     * (bigint ms), so the session's time zone does not matter. */
    if (PQsetClientEncoding(c, "UTF8") != 0) {
        pg_log_error("store: postgres client encoding", c, NULL);
        PQfinish(c);
        return NULL;
    }
    return c;
}

int pg_migrate(PGconn *c)
{
    int rc = TLY_EIO;
    long version = 0;
    char sql[96];
    PGresult *res = NULL;

    /* Session-level: held across the per-step transactions, released below. */
    if (pg_exec(c, "SELECT pg_advisory_lock(" PG_MIGRATION_LOCK ")", PGRES_TUPLES_OK) != 0)
        return TLY_EIO;
    if (pg_exec(c, "CREATE TABLE IF NOT EXISTS schema_version(version integer NOT NULL)", PGRES_COMMAND_OK) != 0)
        goto fail;
    res = PQexec(c, "SELECT coalesce(max(version), 0) FROM schema_version");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        pg_log_error("store: postgres schema version", c, res);
        goto fail;
    }
    version = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    if (version < 0 || version > (long)TLY_ARRAY_SIZE(migrations)) {
        tly_log(TLY_LOG_ERROR, "store: postgres schema is newer than this tally", NULL);
        goto fail;
    }
    for (long v = version; v < (long)TLY_ARRAY_SIZE(migrations); v++) {
        if (pg_exec(c, "BEGIN", PGRES_COMMAND_OK) != 0)
            goto fail;
        snprintf(sql, sizeof sql, "DELETE FROM schema_version; INSERT INTO schema_version VALUES (%ld)", v + 1);
        if (pg_exec(c, migrations[v], PGRES_COMMAND_OK) != 0 || pg_exec(c, sql, PGRES_COMMAND_OK) != 0 ||
            pg_exec(c, "COMMIT", PGRES_COMMAND_OK) != 0) {
            PQclear(PQexec(c, "ROLLBACK"));
            goto fail;
        }
    }
    rc = 0;
fail:
    PQclear(res);
    PQclear(PQexec(c, "SELECT pg_advisory_unlock(" PG_MIGRATION_LOCK ")"));
    return rc;
}
