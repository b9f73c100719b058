/*
 * sqlite_schema.c: the SQLite backend's schema and its migrations (PRAGMA user_version
 * 1 to TLY_STORE_SCHEMA_VERSION), and what opens and configures a connection: the
 * settings every connection needs and the writer's own (WAL, cache, temp store).
 */
#include "store/sqlite_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- schema ---------------------------------------------------------------------- */

/* One base-32 digit of n.v (a row's number made a code in migration 7), in SQL. */
#define JOIN_CODE_DIGIT(shift) "substr('" TLY_JOIN_CODE_ALPHABET "', ((n.v >> " #shift ") & 31) + 1, 1)"

/*
 * Migrations: migrations[i] takes the schema from user_version i to i + 1. Each runs in
 * its own transaction together with the user_version bump, so a crash mid-migration
 * leaves the previous version intact. Append only: never edit a step that has shipped.
 */
static const char *const migrations[] = {
    /* 1: everything. */
    "CREATE TABLE users("
    "  user_id TEXT PRIMARY KEY,"
    "  username TEXT NOT NULL UNIQUE COLLATE NOCASE,"
    "  password_hash TEXT NOT NULL,"
    "  email TEXT,"
    "  created_at INTEGER NOT NULL);"
    "CREATE TABLE polls("
    "  poll_id TEXT PRIMARY KEY,"
    "  owner_id TEXT NOT NULL,"
    "  title TEXT NOT NULL,"
    "  description TEXT,"
    "  type INTEGER NOT NULL,"
    "  status INTEGER NOT NULL,"
    "  start_time INTEGER,"
    "  end_time INTEGER,"
    "  settings TEXT NOT NULL,"
    "  created_at INTEGER,"
    "  updated_at INTEGER,"
    "  idem_key TEXT,"
    "  body_hash BLOB);"
    "CREATE INDEX polls_owner ON polls(owner_id, created_at);"
    "CREATE TABLE options("
    "  poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    "  position INTEGER NOT NULL,"
    "  option_id TEXT NOT NULL,"
    "  text TEXT NOT NULL,"
    "  display_order INTEGER NOT NULL,"
    "  PRIMARY KEY(poll_id, position));"
    /* seq is the rowid: commit order, which is the order ballots are replayed in. The
     * UNIQUE(poll_id, voter_id) index also serves the ON DELETE CASCADE lookups. */
    "CREATE TABLE ballots("
    "  seq INTEGER PRIMARY KEY,"
    "  poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    "  voter_id TEXT NOT NULL,"
    "  vote_id TEXT NOT NULL UNIQUE,"
    "  receipt TEXT NOT NULL UNIQUE,"
    "  choices BLOB NOT NULL,"
    "  scores BLOB,"
    "  recorded_at INTEGER NOT NULL,"
    "  idem_key TEXT,"
    "  body_hash BLOB,"
    "  client_meta TEXT,"
    "  UNIQUE(poll_id, voter_id));"
    /* No foreign key: a request outcome is kept even if it names a poll that never
     * existed (the consumer still has to be told). POLL_DELETE removes them explicitly. */
    "CREATE TABLE vote_requests("
    "  request_id TEXT PRIMARY KEY,"
    "  poll_id TEXT NOT NULL,"
    "  voter_id TEXT NOT NULL,"
    "  state TEXT NOT NULL,"
    "  vote_id TEXT,"
    "  error TEXT,"
    "  created_at INTEGER NOT NULL);"
    "CREATE INDEX vote_requests_poll ON vote_requests(poll_id);",

    /* 2: final results, the audit log, and paging by poll in seq order. */
    "ALTER TABLE polls ADD COLUMN final_results TEXT;"
    /* Append-only history of every ballot. No foreign key: the rows go with their poll
     * in POLL_DELETE explicitly, and a foreign key would cost every ballot insert one
     * more parent lookup. */
    "CREATE TABLE audit("
    "  seq INTEGER PRIMARY KEY,"
    "  poll_id TEXT NOT NULL,"
    "  voter_id TEXT NOT NULL,"
    "  event TEXT NOT NULL CHECK(event IN ('cast','changed','revoked')),"
    "  choices BLOB,"
    "  scores BLOB,"
    "  at INTEGER NOT NULL);"
    /* Ballots cast before this version get their "cast" row, in commit order, so that
     * every poll's log is complete. Costs one pass over the ballots, once. */
    "INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"
    "  SELECT poll_id, voter_id, 'cast', choices, scores, recorded_at FROM ballots ORDER BY seq;"
    "CREATE INDEX audit_poll_seq ON audit(poll_id, seq);"
    /* Ballot pages walk one poll in seq order; UNIQUE(poll_id, voter_id) cannot. */
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    /* History is never rewritten. Rows may go only once their poll is gone (POLL_DELETE
     * deletes the poll first). These guard against bugs, not against someone with the
     * file: they can drop triggers. */
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN"
    "  SELECT RAISE(ABORT, 'audit is append-only');"
    "END;"
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
    "  WHEN EXISTS(SELECT 1 FROM polls WHERE poll_id = OLD.poll_id) BEGIN"
    "  SELECT RAISE(ABORT, 'audit rows go only with their poll');"
    "END;",

    /* 3: settings.voter_check. The keyed hash (16 bytes, never the address) of the client
     * address of ballots cast under an address rule; NULL for every other ballot, those
     * before this version included. One ballot per address per poll is the store's last
     * word too, as UNIQUE(poll_id, voter_id) is for voters. The index is partial: ballots
     * without a hash (most of them) cost it nothing. */
    "ALTER TABLE ballots ADD COLUMN ip_hash BLOB;"
    "CREATE UNIQUE INDEX ballots_poll_ip ON ballots(poll_id, ip_hash) WHERE ip_hash IS NOT NULL;",

    /* 4: a "revoked" row keeps the Idempotency-Key and body hash of the request that cast
     * the retracted ballot, so that a late retry of it is refused after a restart too
     * (load reads them through the partial index; other rows leave both NULL). */
    "ALTER TABLE audit ADD COLUMN idem_key TEXT;"
    "ALTER TABLE audit ADD COLUMN body_hash BLOB;"
    "CREATE INDEX audit_retracted_keys ON audit(seq) WHERE event = 'revoked' AND idem_key IS NOT NULL;",

    /* 5: the ballot as first cast, kept by its first change (BALLOT_REPLACE), so that a
     * retry of the POST that cast it gets its first answer again after a change, and
     * after a restart too; NULL for ballots never changed, and load reads the others
     * through the partial index. Ballots changed before this version get theirs from
     * the audit log: the "cast" row of the voter's latest cast, when a "changed" row
     * follows it. One grouped pass over the log, once. */
    "ALTER TABLE ballots ADD COLUMN cast_choices BLOB;"
    "ALTER TABLE ballots ADD COLUMN cast_scores BLOB;"
    "ALTER TABLE ballots ADD COLUMN cast_at INTEGER;"
    "CREATE INDEX ballots_changed ON ballots(seq) WHERE cast_at IS NOT NULL;"
    "WITH last AS (SELECT poll_id, voter_id,"
    "    max(CASE WHEN event = 'cast' THEN seq END) AS cast_seq,"
    "    max(CASE WHEN event = 'changed' THEN seq END) AS changed_seq"
    "  FROM audit GROUP BY poll_id, voter_id)"
    "UPDATE ballots SET cast_choices = a.choices, cast_scores = a.scores, cast_at = a.at"
    "  FROM last JOIN audit a ON a.seq = last.cast_seq"
    "  WHERE last.changed_seq > last.cast_seq"
    "    AND ballots.poll_id = last.poll_id AND ballots.voter_id = last.voter_id;",

    /* 6: the lean ballot row (docs/ARCHITECTURE.md, "The embedded store"). A ballot is
     * appended at the end of the table and of its poll's (poll_id, seq) range, and that
     * is all its commit writes: no index on a random key (vote_id, receipt, voter), no
     * audit row. One writer process (the data directory's lock) and its memory decide
     * that a voter has one ballot; changes and retractions find the row by its seq.
     * The ballot row is its own "cast" event (as first cast: cast_* once it changed)
     * until it is retracted, which copies that event into audit under the ballot's seq:
     * ballots and audit share one sequence from here on, kept by the writer. Ballots
     * from before this step have their cast row in audit already (cast_in_audit). */
    "CREATE TABLE ballots_v6("
    "  seq INTEGER PRIMARY KEY,"
    "  poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    "  voter_id TEXT NOT NULL,"
    "  vote_id TEXT NOT NULL,"
    "  receipt TEXT NOT NULL,"
    "  choices BLOB NOT NULL,"
    "  scores BLOB,"
    "  recorded_at INTEGER NOT NULL,"
    "  idem_key TEXT,"
    "  body_hash BLOB,"
    "  client_meta TEXT,"
    "  ip_hash BLOB,"
    "  cast_choices BLOB,"
    "  cast_scores BLOB,"
    "  cast_at INTEGER,"
    "  cast_in_audit INTEGER NOT NULL DEFAULT 0);"
    "INSERT INTO ballots_v6(seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"
    "  body_hash, client_meta, ip_hash, cast_choices, cast_scores, cast_at, cast_in_audit)"
    "  SELECT seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key, body_hash,"
    "  client_meta, ip_hash, cast_choices, cast_scores, cast_at, 1 FROM ballots ORDER BY seq;"
    "DROP TABLE ballots;"
    "ALTER TABLE ballots_v6 RENAME TO ballots;"
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    "CREATE UNIQUE INDEX ballots_poll_ip ON ballots(poll_id, ip_hash) WHERE ip_hash IS NOT NULL;"
    "CREATE INDEX ballots_changed ON ballots(seq) WHERE cast_at IS NOT NULL;",

    /* 7: join codes. An open poll's code, unique among the polls that hold one (the
     * partial index); a poll closing gives its code back (POLL_UPDATE writes NULL). The
     * polls open before this step get theirs here: n -> (n * m + a) mod 2^30, with m odd
     * and a chosen at random once, is a bijection, so the codes of the polls' row
     * numbers are distinct whatever m and a are; six base-32 digits of the alphabet. */
    "ALTER TABLE polls ADD COLUMN join_code TEXT;"
    "WITH k AS MATERIALIZED (SELECT abs(random() % 1073741824) AS a, abs(random() % 536870912) * 2 + 1 AS m),"
    "n AS (SELECT p.poll_id, ((row_number() OVER (ORDER BY p.rowid)) * k.m + k.a) % 1073741824 AS v"
    "  FROM polls p, k WHERE p.status != 2 AND p.final_results IS NULL)"
    "UPDATE polls SET join_code = " JOIN_CODE_DIGIT(25) " || " JOIN_CODE_DIGIT(20) " || " JOIN_CODE_DIGIT(
        15) "  || " JOIN_CODE_DIGIT(10) " || " JOIN_CODE_DIGIT(5) " || " JOIN_CODE_DIGIT(0) "  FROM n WHERE "
                                                                                            "polls.poll_id = n.poll_id;"
                                                                                            "CREATE UNIQUE INDEX "
                                                                                            "polls_join_code ON "
                                                                                            "polls(join_code) WHERE "
                                                                                            "join_code IS NOT NULL;",

    /* 8: device links (issue 17). An anonymous device token that registers or logs in
     * becomes one person with the account: the row is written in the transaction that
     * rewrites the device's ballots to the account (by seq: migration 6 left no index by
     * voter), retracts the later of two ballots in one poll, and hands the device's polls
     * over (polls_owner). Load reads it back, so that the device's token goes on acting
     * as the account after a restart. */
    "CREATE TABLE device_links("
    "  device_id TEXT PRIMARY KEY,"
    "  user_id TEXT NOT NULL,"
    "  linked_at INTEGER NOT NULL);",
};

_Static_assert(TLY_ARRAY_SIZE(migrations) == TLY_STORE_SCHEMA_VERSION,
               "TLY_STORE_SCHEMA_VERSION must match the migration steps");

/* ---- connections ---------------------------------------------------------------- */

static int first_column(void *arg, int ncols, char **vals, char **names)
{
    char *out = arg;
    if (ncols > 0 && vals[0] != NULL && out[0] == '\0')
        snprintf(out, 32, "%s", vals[0]);
    return 0;
}

/* Runs sql and copies the first column of its first row (if any) into out[32]. */
static int exec_text(sqlite3 *db, const char *sql, char out[32])
{
    out[0] = '\0';
    return sqlite3_exec(db, sql, first_column, out, NULL);
}

static int exec_int(sqlite3 *db, const char *sql, long *v)
{
    char buf[32];
    int rc = exec_text(db, sql, buf);
    if (rc == SQLITE_OK)
        *v = strtol(buf, NULL, 10);
    return rc;
}

/* Settings every connection needs. journal_mode is a property of the file, and only
 * checked on the writer (a read-only connection cannot change it). */
int sq_configure(sqlite3 *db)
{
    int rc;
    sqlite3_extended_result_codes(db, 1);
    rc = sqlite3_busy_timeout(db, 5000);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;", NULL, NULL, NULL);
    return rc;
}

static int migrate(sq_store_t *s)
{
    long version = 0;
    char sql[64];
    int rc = exec_int(s->db, "PRAGMA user_version", &version);
    if (rc != SQLITE_OK)
        return rc;
    if (version > (long)TLY_ARRAY_SIZE(migrations) || version < 0) {
        /* Written by a newer tally: refuse rather than misread it. */
        char found[24], known[24];
        snprintf(found, sizeof found, "%ld", version);
        snprintf(known, sizeof known, "%d", TLY_STORE_SCHEMA_VERSION);
        tly_log(TLY_LOG_ERROR, "store: the database's schema is newer than this tally knows", "schema_version", found,
                "known", known, NULL);
        return SQLITE_MISMATCH;
    }
    for (long v = version; v < (long)TLY_ARRAY_SIZE(migrations); v++) {
        rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(s->db, migrations[v], NULL, NULL, NULL);
        if (rc == SQLITE_OK) {
            snprintf(sql, sizeof sql, "PRAGMA user_version = %ld", v + 1);
            rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
        }
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            sq_log_sqlite("migration failed", s->db, rc);
            if (!sqlite3_get_autocommit(s->db))
                sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
    }
    return SQLITE_OK;
}

int sq_open_writer_db(sq_store_t *s)
{
    int src;
    char mode[32];
    long page_size = 0;

    /* NOMUTEX: the connection is handed to the writer thread and used by it alone. */
    src = sqlite3_open_v2(s->db_path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (src != SQLITE_OK)
        return src;
    if ((src = sq_configure(s->db)) != SQLITE_OK)
        return src;
    if ((src = exec_text(s->db, "PRAGMA journal_mode = WAL", mode)) != SQLITE_OK)
        return src;
    if (strcmp(mode, "wal") != 0)
        return SQLITE_CANTOPEN; /* e.g. a file system without shared memory */
    /* A bigger page cache keeps the hot pages of the ballot indexes (random ids) in
     * memory, so a batch's inserts touch the disk only through the WAL. */
    if ((src = sqlite3_exec(s->db, "PRAGMA cache_size = -65536", NULL, NULL, NULL)) != SQLITE_OK)
        return src;
    /* Statement journals (a duplicate ballot backing out its own INSERT, a cascading
     * poll delete) stay in memory: a temporary file would be created and unlinked on the
     * vote path, and deleting files stalls fsyncs on this disk. */
    if ((src = sqlite3_exec(s->db, "PRAGMA temp_store = MEMORY", NULL, NULL, NULL)) != SQLITE_OK)
        return src;
    if ((src = migrate(s)) != SQLITE_OK)
        return src;
    if ((src = exec_int(s->db, "PRAGMA page_size", &page_size)) != SQLITE_OK)
        return src;
    s->page_size = page_size > 0 ? (int)page_size : 4096;
    return SQLITE_OK;
}

int sq_open_checkpoint_db(sq_store_t *s)
{
    /* NOMUTEX: the checkpointer thread alone uses it. */
    int src = sqlite3_open_v2(s->db_path, &s->ckpt_db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = sq_configure(s->ckpt_db);
    /* not sq_configure's 5 s: a RESTART holds new batches off while it waits, so it
     * gives up soon (BUSY) and the next request tries again */
    if (src == SQLITE_OK)
        src = sqlite3_busy_timeout(s->ckpt_db, 50);
    return src;
}
