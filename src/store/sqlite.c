/*
 * sqlite.c: the embedded store. SQLite in WAL mode with synchronous=FULL, one writer
 * thread that owns its connection and commits operations in batches (group commit).
 *
 * Why one writer: SQLite serialises writers anyway, and a COMMIT in WAL mode with
 * synchronous=FULL costs one fsync of the WAL whatever the size of the transaction. So
 * the writer takes everything queued, runs it in one transaction and pays one fsync for
 * the lot; while it is syncing, the next batch fills up behind it. Throughput then grows
 * with load instead of being capped at 1 / fsync latency.
 *
 * Durability rule: an operation's done callback sees result 0 only after the COMMIT of
 * its batch returned SQLITE_OK. If a COMMIT fails with an I/O error (in particular a
 * failed fsync) the store latches into a failed state and never acknowledges anything
 * again: after a failed fsync the kernel may have dropped the dirty pages, so nothing
 * later could be trusted to be on disk.
 *
 * Memory: our own allocations go through tly_malloc. SQLite's internal allocations use
 * its default allocator: redirecting them (SQLITE_CONFIG_MALLOC) is process-global and
 * must happen before any other SQLite use, which is not this module's call to make.
 */
#include "store/store_int.h"

typedef struct sq_store sq_store_t;
typedef struct sq_reader sq_reader_t;

#include "base/base.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---- schema ---------------------------------------------------------------------- */

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
};

_Static_assert(TLY_ARRAY_SIZE(migrations) == TLY_STORE_SCHEMA_VERSION,
               "TLY_STORE_SCHEMA_VERSION must match the migration steps");

/* ---- the writer's prepared statements ---------------------------------------------- */

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_SAVEPOINT,
    ST_RELEASE,
    ST_ROLLBACK_TO,
    ST_USER_INSERT,
    ST_POLL_INSERT,
    ST_POLL_UPDATE,
    ST_POLL_DELETE,
    ST_OPTIONS_DELETE,
    ST_OPTION_INSERT,
    ST_BALLOT_INSERT,
    ST_BALLOT_REPLACE,
    ST_BALLOT_DELETE,
    ST_AUDIT_INSERT,
    ST_AUDIT_DELETE,
    ST_REQUEST_UPSERT,
    ST_REQUESTS_DELETE,
    ST__COUNT
};

/* Poll insert and update bind the same numbered parameters (see bind_poll). */
static const char *const stmt_sql[ST__COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SAVEPOINT] = "SAVEPOINT op",
    [ST_RELEASE] = "RELEASE op",
    [ST_ROLLBACK_TO] = "ROLLBACK TO op",
    [ST_USER_INSERT] = "INSERT INTO users(user_id, username, password_hash, email, created_at)"
                       " VALUES(?1, ?2, ?3, ?4, ?5)",
    [ST_POLL_INSERT] = "INSERT INTO polls(poll_id, owner_id, title, description, type, status,"
                       " start_time, end_time, settings, created_at, updated_at, idem_key,"
                       " body_hash, final_results)"
                       " VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    [ST_POLL_UPDATE] = "UPDATE polls SET owner_id = ?2, title = ?3, description = ?4, type = ?5,"
                       " status = ?6, start_time = ?7, end_time = ?8, settings = ?9,"
                       " created_at = ?10, updated_at = ?11, idem_key = ?12, body_hash = ?13,"
                       " final_results = ?14 WHERE poll_id = ?1",
    [ST_POLL_DELETE] = "DELETE FROM polls WHERE poll_id = ?1",
    [ST_OPTIONS_DELETE] = "DELETE FROM options WHERE poll_id = ?1",
    [ST_OPTION_INSERT] = "INSERT INTO options(poll_id, position, option_id, text, display_order)"
                         " VALUES(?1, ?2, ?3, ?4, ?5)",
    [ST_BALLOT_INSERT] = "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, scores,"
                         " recorded_at, idem_key, body_hash, client_meta, ip_hash)"
                         " VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    /* Replace and delete bind poll_id, voter_id as ?1, ?2 (see ballot_change). */
    [ST_BALLOT_REPLACE] = "UPDATE ballots SET choices = ?3, scores = ?4, recorded_at = ?5,"
                          " idem_key = ?6, body_hash = ?7 WHERE poll_id = ?1 AND voter_id = ?2",
    [ST_BALLOT_DELETE] = "DELETE FROM ballots WHERE poll_id = ?1 AND voter_id = ?2",
    [ST_AUDIT_INSERT] = "INSERT INTO audit(poll_id, voter_id, event, choices, scores, at)"
                        " VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_AUDIT_DELETE] = "DELETE FROM audit WHERE poll_id = ?1",
    /* A request's first final outcome wins: a replayed request (the ingest consumer
     * retrying) must not turn "completed" into "failed: ALREADY_VOTED". Only a
     * "pending" row, should anything write one, is overwritten. */
    [ST_REQUEST_UPSERT] = "INSERT INTO vote_requests(request_id, poll_id, voter_id, state, vote_id,"
                          " error, created_at) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                          " ON CONFLICT(request_id) DO UPDATE SET state = excluded.state,"
                          " vote_id = excluded.vote_id, error = excluded.error"
                          " WHERE vote_requests.state = 'pending'",
    [ST_REQUESTS_DELETE] = "DELETE FROM vote_requests WHERE poll_id = ?1",
};

struct sq_store {
    tly_store_t base; /* first: see store_int.h */
    tly_store_conf_t conf; /* conf.data_dir points at data_dir below */
    char *data_dir;
    char *db_path;

    /* The writer's. Opened on the owning thread in tly_store_open, then used only by the
     * writer thread until it is joined in tly_store_close. */
    sqlite3 *db;
    sqlite3_stmt *st[ST__COUNT];
    int wal_frames;  /* frames in the WAL after the last commit (wal hook) */
    int ckpt_frames; /* wal_frames when the last checkpoint ran */
    int page_size;

    /* Submission queue. Unbounded here on purpose: the store cannot refuse a write it
     * has no way to report back except through done, so callers bound their in-flight
     * operations (each holds its op until done runs) and the queue can never hold more
     * than they allow. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    tly_store_op_t *head, *tail;
    int stopping;

    /* Finished operations waiting for tly_store_reap, in submission order, and the
     * statistics (both written by the writer, read by the owning thread). */
    pthread_mutex_t done_mu;
    tly_store_op_t *done_head, *done_tail;
    tly_store_stats_t stats;

    atomic_int failed; /* latched on an I/O error; never cleared */
    pthread_t writer;
    int writer_started, sync_ready;
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* One JSON line on stderr: the store has no logger of its own and must say why it
 * stopped accepting writes. SQLite's messages name tables and columns, never values. */
static void log_sqlite(const char *msg, sqlite3 *db, int rc)
{
    fprintf(stderr, "{\"level\":\"error\",\"msg\":\"store: %s\",\"sqlite_rc\":%d,\"sqlite\":\"%s\"}\n",
            msg, rc, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
}

/* ---- open ------------------------------------------------------------------------ */

/* mkdir -p with mode 0700 for what it creates; existing directories keep their mode. */
static int mkdir_p(const char *dir)
{
    int rc = TLY_EIO;
    struct stat sb;
    char *p = tly_strdup(dir);
    if (p == NULL)
        return TLY_ENOMEM;
    for (char *c = p + 1;; c++) {
        if (*c != '/' && *c != '\0')
            continue;
        char save = *c;
        *c = '\0';
        if (mkdir(p, 0700) != 0 && errno != EEXIST)
            goto fail;
        *c = save;
        if (save == '\0')
            break;
    }
    if (stat(p, &sb) != 0 || !S_ISDIR(sb.st_mode))
        goto fail;
    rc = 0;
fail:
    tly_free(p);
    return rc;
}

static int sqlite_to_tly(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW:
        return 0;
    case SQLITE_NOMEM:
        return TLY_ENOMEM;
    case SQLITE_FULL:
        return TLY_EFULL;
    default:
        return TLY_EIO;
    }
}

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
static int configure(sqlite3 *db)
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
        fprintf(stderr, "{\"level\":\"error\",\"msg\":\"store: schema version %ld is newer than %d\"}\n",
                version, TLY_STORE_SCHEMA_VERSION);
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
            log_sqlite("migration failed", s->db, rc);
            if (!sqlite3_get_autocommit(s->db))
                sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
    }
    return SQLITE_OK;
}

/* Called by SQLite on the writer thread after each commit. Installing it also turns off
 * SQLite's auto-checkpoint, which would otherwise run inside COMMIT and delay the
 * acknowledgement of the batch; we checkpoint after notifying instead. */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int nframes)
{
    sq_store_t *s = arg;
    s->wal_frames = nframes;
    return SQLITE_OK;
}

static void *writer_main(void *arg);

static void store_free(sq_store_t *s)
{
    for (size_t i = 0; i < ST__COUNT; i++)
        sqlite3_finalize(s->st[i]);
    if (s->db != NULL)
        sqlite3_close_v2(s->db);
    if (s->sync_ready) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        pthread_mutex_destroy(&s->done_mu);
    }
    tly_free(s->db_path);
    tly_free(s->data_dir);
    tly_free(s);
}

static int sq_open(const tly_store_conf_t *conf, sq_store_t **out)
{
    int rc = TLY_EINVAL, src;
    char mode[32];
    long page_size = 0;
    sq_store_t *s = NULL;

    *out = NULL;
    if (conf == NULL || conf->data_dir == NULL || conf->data_dir[0] == '\0')
        goto fail;
    rc = TLY_ENOMEM;
    if ((s = tly_calloc(1, sizeof *s)) == NULL)
        goto fail;
    s->base.be = &tly_store_sqlite;
    s->conf = *conf;
    if (s->conf.batch_max == 0)
        s->conf.batch_max = TLY_STORE_BATCH_MAX;
    if ((s->data_dir = tly_strdup(conf->data_dir)) == NULL)
        goto fail;
    s->conf.data_dir = s->data_dir;
    size_t n = strlen(s->data_dir) + sizeof "/tally.db";
    if ((s->db_path = tly_malloc(n)) == NULL)
        goto fail;
    snprintf(s->db_path, n, "%s/tally.db", s->data_dir);

    rc = TLY_EIO;
    if (pthread_mutex_init(&s->mu, NULL) != 0)
        goto fail;
    if (pthread_mutex_init(&s->done_mu, NULL) != 0) {
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    if (pthread_cond_init(&s->cv, NULL) != 0) {
        pthread_mutex_destroy(&s->done_mu);
        pthread_mutex_destroy(&s->mu);
        goto fail;
    }
    s->sync_ready = 1;

    if ((rc = mkdir_p(s->data_dir)) != 0)
        goto fail;

    /* NOMUTEX: the connection is handed to the writer thread and used by it alone. */
    src = sqlite3_open_v2(s->db_path, &s->db,
                          SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (src != SQLITE_OK)
        goto sqlite_fail;
    if ((src = configure(s->db)) != SQLITE_OK)
        goto sqlite_fail;
    if ((src = exec_text(s->db, "PRAGMA journal_mode = WAL", mode)) != SQLITE_OK)
        goto sqlite_fail;
    if (strcmp(mode, "wal") != 0) {
        src = SQLITE_CANTOPEN; /* e.g. a file system without shared memory */
        goto sqlite_fail;
    }
    /* A bigger page cache keeps the hot pages of the ballot indexes (random ids) in
     * memory, so a batch's inserts touch the disk only through the WAL. */
    if ((src = sqlite3_exec(s->db, "PRAGMA cache_size = -65536", NULL, NULL, NULL)) != SQLITE_OK)
        goto sqlite_fail;
    /* Statement journals (a duplicate ballot backing out its own INSERT, a cascading
     * poll delete) stay in memory: a temporary file would be created and unlinked on the
     * vote path, and deleting files stalls fsyncs on this disk. */
    if ((src = sqlite3_exec(s->db, "PRAGMA temp_store = MEMORY", NULL, NULL, NULL)) != SQLITE_OK)
        goto sqlite_fail;
    if ((src = migrate(s)) != SQLITE_OK)
        goto sqlite_fail;
    if ((src = exec_int(s->db, "PRAGMA page_size", &page_size)) != SQLITE_OK)
        goto sqlite_fail;
    s->page_size = page_size > 0 ? (int)page_size : 4096;
    for (size_t i = 0; i < ST__COUNT; i++) {
        src = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
        if (src != SQLITE_OK)
            goto sqlite_fail;
    }
    sqlite3_wal_hook(s->db, wal_hook, s);

    rc = TLY_EIO;
    if (pthread_create(&s->writer, NULL, writer_main, s) != 0)
        goto fail;
    s->writer_started = 1;
    *out = s;
    return 0;

sqlite_fail:
    log_sqlite("open failed", s->db, src);
    rc = sqlite_to_tly(src);
    if (rc == 0)
        rc = TLY_EIO;
fail:
    if (s != NULL)
        store_free(s);
    return rc;
}

/* ---- submit / reap --------------------------------------------------------------- */

static void sq_submit_list(sq_store_t *s, tly_store_op_t *first)
{
    tly_store_op_t *last = first;
    if (first == NULL)
        return;
    while (last->next != NULL)
        last = last->next;
    pthread_mutex_lock(&s->mu);
    if (s->tail != NULL)
        s->tail->next = first;
    else
        s->head = first;
    s->tail = last;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void sq_reap(sq_store_t *s)
{
    tly_store_op_t *op, *next;
    pthread_mutex_lock(&s->done_mu);
    op = s->done_head;
    s->done_head = s->done_tail = NULL;
    pthread_mutex_unlock(&s->done_mu);
    for (; op != NULL; op = next) {
        next = op->next; /* done may free op */
        if (op->done != NULL)
            op->done(op);
    }
}

static int sq_writable(sq_store_t *s)
{
    return !atomic_load(&s->failed);
}

static void sq_stats(sq_store_t *s, tly_store_stats_t *out)
{
    pthread_mutex_lock(&s->done_mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->done_mu);
    pthread_mutex_lock(&s->mu);
    out->queued = 0;
    for (tly_store_op_t *op = s->head; op != NULL && out->queued < 1000000; op = op->next)
        out->queued++;
    pthread_mutex_unlock(&s->mu);
}

/* ---- the writer ------------------------------------------------------------------ */

/* Steps a statement that returns no rows we need, then resets it and drops its
 * bindings (they point into the caller's op, which may be freed once done runs).
 * Returns SQLITE_OK or the (extended) error code of the step. */
static int step_reset(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

static int is_constraint(int rc)
{
    return (rc & 0xff) == SQLITE_CONSTRAINT;
}

/* The op result of a constraint failure. Only uniqueness is a normal outcome (EEXIST);
 * a missing poll (foreign key) or a missing required field is the caller's bug, but it
 * fails that operation alone rather than everyone else's ballots in the batch. */
static int constraint_result(int rc)
{
    switch (rc) {
    case SQLITE_CONSTRAINT_UNIQUE:
    case SQLITE_CONSTRAINT_PRIMARYKEY:
        return TLY_EEXIST;
    case SQLITE_CONSTRAINT_FOREIGNKEY:
        return TLY_ENOTFOUND;
    default:
        return TLY_EINVAL;
    }
}

static void bind_str(sqlite3_stmt *st, int i, const char *v)
{
    /* SQLITE_STATIC: the caller keeps every string alive until done runs, and bindings
     * are cleared right after the step. A NULL pointer binds SQL NULL. */
    sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}

static void bind_time(sqlite3_stmt *st, int i, int64_t ms)
{
    if (ms == 0)
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_int64(st, i, ms);
}

/* An all-zero hash means "none" and is stored as NULL, so it reads back as zeros. */
static void bind_hash(sqlite3_stmt *st, int i, const uint8_t h[16])
{
    static const uint8_t zero[16];
    if (memcmp(h, zero, 16) == 0)
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_blob(st, i, h, 16, SQLITE_STATIC);
}

static int user_insert(sq_store_t *s, tly_store_op_t *op)
{
    const tly_user_row_t *u = &op->u.user;
    sqlite3_stmt *st = s->st[ST_USER_INSERT];
    bind_str(st, 1, u->user_id);
    bind_str(st, 2, u->username);
    bind_str(st, 3, u->password_hash);
    bind_str(st, 4, u->email);
    sqlite3_bind_int64(st, 5, u->created_at);
    return step_reset(st);
}

static void bind_poll(sqlite3_stmt *st, const tly_poll_row_t *p)
{
    bind_str(st, 1, p->poll_id);
    bind_str(st, 2, p->owner_id);
    bind_str(st, 3, p->title);
    bind_str(st, 4, p->description);
    sqlite3_bind_int(st, 5, p->type);
    sqlite3_bind_int(st, 6, p->status);
    bind_time(st, 7, p->start_time);
    bind_time(st, 8, p->end_time);
    bind_str(st, 9, p->settings_json);
    bind_time(st, 10, p->created_at);
    bind_time(st, 11, p->updated_at);
    bind_str(st, 12, p->idem_key);
    bind_hash(st, 13, p->body_hash);
    bind_str(st, 14, p->final_results);
}

static int options_insert(sq_store_t *s, const tly_poll_row_t *p)
{
    sqlite3_stmt *st = s->st[ST_OPTION_INSERT];
    for (size_t i = 0; i < p->noptions; i++) {
        const tly_option_row_t *o = &p->options[i];
        bind_str(st, 1, p->poll_id);
        sqlite3_bind_int(st, 2, o->position);
        bind_str(st, 3, o->option_id);
        bind_str(st, 4, o->text);
        sqlite3_bind_int(st, 5, o->display_order);
        int rc = step_reset(st);
        if (rc != SQLITE_OK)
            return rc;
    }
    return SQLITE_OK;
}

static int poll_insert(sq_store_t *s, tly_store_op_t *op)
{
    bind_poll(s->st[ST_POLL_INSERT], &op->u.poll);
    int rc = step_reset(s->st[ST_POLL_INSERT]);
    return rc != SQLITE_OK ? rc : options_insert(s, &op->u.poll);
}

static int poll_update(sq_store_t *s, tly_store_op_t *op)
{
    const tly_poll_row_t *p = &op->u.poll;
    bind_poll(s->st[ST_POLL_UPDATE], p);
    int rc = step_reset(s->st[ST_POLL_UPDATE]);
    if (rc != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    bind_str(s->st[ST_OPTIONS_DELETE], 1, p->poll_id);
    if ((rc = step_reset(s->st[ST_OPTIONS_DELETE])) != SQLITE_OK)
        return rc;
    return options_insert(s, p);
}

/* Options and ballots go by ON DELETE CASCADE; requests and audit rows have no foreign
 * key. The audit rows go after the poll row: the trigger guarding them lets a row go
 * only once its poll is gone. */
static int poll_delete(sq_store_t *s, tly_store_op_t *op)
{
    int rc;
    bind_str(s->st[ST_REQUESTS_DELETE], 1, op->u.poll.poll_id);
    if ((rc = step_reset(s->st[ST_REQUESTS_DELETE])) != SQLITE_OK)
        return rc;
    bind_str(s->st[ST_POLL_DELETE], 1, op->u.poll.poll_id);
    if ((rc = step_reset(s->st[ST_POLL_DELETE])) != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    bind_str(s->st[ST_AUDIT_DELETE], 1, op->u.poll.poll_id);
    return step_reset(s->st[ST_AUDIT_DELETE]);
}

/* A zero-length blob needs a non-NULL pointer, or it binds NULL. */
static const uint8_t empty_blob[1];

static void bind_choices(sqlite3_stmt *st, int ichoices, int iscores, const tly_ballot_row_t *b)
{
    sqlite3_bind_blob(st, ichoices, b->nchoices ? b->choices : empty_blob, b->nchoices, SQLITE_STATIC);
    if (b->scores != NULL)
        sqlite3_bind_blob(st, iscores, b->nchoices ? b->scores : empty_blob, b->nchoices, SQLITE_STATIC);
}

static int audit_insert(sq_store_t *s, const tly_ballot_row_t *b, const char *event)
{
    sqlite3_stmt *st = s->st[ST_AUDIT_INSERT];
    bind_str(st, 1, b->poll_id);
    bind_str(st, 2, b->voter_id);
    bind_str(st, 3, event);
    if (strcmp(event, "revoked") != 0)
        bind_choices(st, 4, 5, b);
    sqlite3_bind_int64(st, 6, b->recorded_at);
    return step_reset(st);
}

/* BALLOT_REPLACE and BALLOT_DELETE: change the voter's ballot row, and only if there
 * was one append the audit row, all inside run_op's savepoint. */
static int ballot_change(sq_store_t *s, tly_store_op_t *op)
{
    const tly_ballot_row_t *b = &op->u.ballot;
    int replace = op->type == TLY_OP_BALLOT_REPLACE;
    sqlite3_stmt *st = s->st[replace ? ST_BALLOT_REPLACE : ST_BALLOT_DELETE];
    int rc;

    bind_str(st, 1, b->poll_id);
    bind_str(st, 2, b->voter_id);
    if (replace) {
        bind_choices(st, 3, 4, b);
        sqlite3_bind_int64(st, 5, b->recorded_at);
        bind_str(st, 6, b->idem_key);
        bind_hash(st, 7, b->body_hash);
    }
    if ((rc = step_reset(st)) != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    return audit_insert(s, b, replace ? "changed" : "revoked");
}

/*
 * The ballot row, then its audit "cast" row (only if the ballot went in: a duplicate
 * writes neither). Why no savepoint around the pair and no trigger: measured here, the
 * ballot and its audit row cost the writer about 13 us of CPU; a savepoint per ballot
 * added about 4.5 us and a trigger instead of this statement about 4 us, i.e. a quarter
 * to a third of the store's throughput. Atomicity holds without them: every constraint
 * of audit is implied by one of ballots that already passed, so the audit insert can
 * only fail with an error that dooms the whole batch. Should a later schema give audit
 * a constraint of its own, a failure of it deletes the ballot row again by hand and
 * fails this op alone.
 */
static int ballot_insert(sq_store_t *s, tly_store_op_t *op)
{
    const tly_ballot_row_t *b = &op->u.ballot;
    sqlite3_stmt *st = s->st[ST_BALLOT_INSERT];
    int rc;

    bind_str(st, 1, b->poll_id);
    bind_str(st, 2, b->voter_id);
    bind_str(st, 3, b->vote_id);
    bind_str(st, 4, b->receipt);
    bind_choices(st, 5, 6, b); /* choices is NOT NULL: an empty ballot is an empty blob */
    sqlite3_bind_int64(st, 7, b->recorded_at);
    bind_str(st, 8, b->idem_key);
    bind_hash(st, 9, b->body_hash);
    bind_str(st, 10, b->client_meta);
    if (b->ip_hash != NULL)
        sqlite3_bind_blob(st, 11, b->ip_hash, 16, SQLITE_STATIC);
    rc = step_reset(st);
    if (rc == SQLITE_OK && (rc = audit_insert(s, b, "cast")) != SQLITE_OK && is_constraint(rc)) {
        int urc;
        st = s->st[ST_BALLOT_DELETE];
        bind_str(st, 1, b->poll_id);
        bind_str(st, 2, b->voter_id);
        if ((urc = step_reset(st)) != SQLITE_OK)
            return is_constraint(urc) ? SQLITE_ERROR : urc; /* never half an op */
        /* and rc, a constraint, fails this op alone */
    }
    if (b->request_id == NULL)
        return rc;
    /* Only "already voted" is an outcome the request row records; any other failure
     * (unknown poll, missing field) is returned and the savepoint undoes the op. */
    if (rc != SQLITE_OK && constraint_result(rc) != TLY_EEXIST)
        return rc;

    st = s->st[ST_REQUEST_UPSERT];
    bind_str(st, 1, b->request_id);
    bind_str(st, 2, b->poll_id);
    bind_str(st, 3, b->voter_id);
    if (rc == SQLITE_OK) {
        bind_str(st, 4, "completed");
        bind_str(st, 5, b->vote_id);
    } else {
        op->result = TLY_EEXIST;
        bind_str(st, 4, "failed");
        bind_str(st, 6, "ALREADY_VOTED");
    }
    sqlite3_bind_int64(st, 7, b->recorded_at);
    return step_reset(st);
}

/*
 * Runs one operation inside the batch's transaction. Returns SQLITE_OK when the
 * transaction may go on (op->result says how the operation itself went) or the SQLite
 * error that dooms the whole batch.
 *
 * A constraint failure under SQLite's default ABORT resolution backs out only the
 * failing statement and leaves the transaction open, which is what lets one duplicate
 * ballot fail alone. Operations of several statements (polls, ballot changes and
 * retractions, ballots with a request row) run inside a savepoint so that such a
 * failure undoes the operation as a whole; a plain ballot and its audit row do without
 * (see ballot_insert).
 */
static int run_op(sq_store_t *s, tly_store_op_t *op)
{
    int rc, rc2;
    int multi = op->type == TLY_OP_POLL_INSERT || op->type == TLY_OP_POLL_UPDATE ||
                op->type == TLY_OP_POLL_DELETE || op->type == TLY_OP_BALLOT_REPLACE ||
                op->type == TLY_OP_BALLOT_DELETE ||
                (op->type == TLY_OP_BALLOT_INSERT && op->u.ballot.request_id != NULL);

    op->result = 0;
    if (multi && (rc = step_reset(s->st[ST_SAVEPOINT])) != SQLITE_OK)
        return rc;
    switch (op->type) {
    case TLY_OP_USER_INSERT:
        rc = user_insert(s, op);
        break;
    case TLY_OP_POLL_INSERT:
        rc = poll_insert(s, op);
        break;
    case TLY_OP_POLL_UPDATE:
        rc = poll_update(s, op);
        break;
    case TLY_OP_POLL_DELETE:
        rc = poll_delete(s, op);
        break;
    case TLY_OP_BALLOT_INSERT:
        rc = ballot_insert(s, op);
        break;
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE:
        rc = ballot_change(s, op);
        break;
    default:
        rc = SQLITE_CONSTRAINT; /* an unknown type fails alone, as TLY_EINVAL */
        break;
    }
    if (rc != SQLITE_OK && !is_constraint(rc))
        return rc; /* the batch rolls back; the savepoint goes with it */
    if (rc != SQLITE_OK) {
        op->result = constraint_result(rc);
        if (multi && (rc2 = step_reset(s->st[ST_ROLLBACK_TO])) != SQLITE_OK)
            return rc2;
    }
    if (multi && (rc2 = step_reset(s->st[ST_RELEASE])) != SQLITE_OK)
        return rc2;
    return SQLITE_OK;
}

/* Runs a batch in one transaction. Returns 1 when it committed. On failure every op of
 * the batch gets the same result: nothing of it is durable. */
static int run_batch(sq_store_t *s, tly_store_op_t *first, uint64_t *commit_us)
{
    tly_store_op_t *op;
    int rc, result;
    int64_t t0;

    if (atomic_load(&s->failed)) {
        result = TLY_EIO; /* never touch the database again after an I/O error */
        goto fail_all;
    }
    if ((rc = step_reset(s->st[ST_BEGIN])) != SQLITE_OK)
        goto fail;
    for (op = first; op != NULL; op = op->next)
        if ((rc = run_op(s, op)) != SQLITE_OK)
            goto fail;
    t0 = now_us();
    /* synchronous=FULL in WAL mode: this COMMIT fsyncs the WAL, once for the batch. */
    if ((rc = step_reset(s->st[ST_COMMIT])) != SQLITE_OK)
        goto fail;
    *commit_us = (uint64_t)(now_us() - t0);
    return 1;

fail:
    log_sqlite("batch failed", s->db, rc);
    /* SQLite may already have rolled back by itself (FULL, IOERR, NOMEM, BUSY on
     * COMMIT leaves it open); only roll back what is still open. */
    if (!sqlite3_get_autocommit(s->db)) {
        int rrc = step_reset(s->st[ST_ROLLBACK]);
        if (rrc != SQLITE_OK) {
            log_sqlite("rollback failed", s->db, rrc);
            atomic_store(&s->failed, 1);
        }
    }
    switch (rc & 0xff) {
    case SQLITE_FULL:
        /* Nothing was committed and nothing half-written is trusted; the next batch
         * tries again, and succeeds if space was freed. */
        result = TLY_EFULL;
        break;
    case SQLITE_IOERR:
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        atomic_store(&s->failed, 1);
        result = TLY_EIO;
        break;
    default:
        result = TLY_EIO;
        break;
    }
fail_all:
    for (op = first; op != NULL; op = op->next)
        op->result = result;
    return 0;
}

/* Between batches, after the acknowledgements are out: copy the WAL back into the
 * database once it has grown enough. PASSIVE never waits for readers and never
 * truncates the WAL: once fully checkpointed SQLite reuses it from the start, so no big
 * file is deleted or truncated (which stalls fsyncs on this disk). */
static void maybe_checkpoint(sq_store_t *s)
{
    int rc, log = 0, done = 0;
    if (s->wal_frames < s->ckpt_frames)
        s->ckpt_frames = 0; /* the WAL was restarted */
    if ((int64_t)(s->wal_frames - s->ckpt_frames) * s->page_size < (int64_t)TLY_STORE_CHECKPOINT_BYTES)
        return;
    if (atomic_load(&s->failed))
        return;
    rc = sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
    s->ckpt_frames = s->wal_frames;
    if ((rc & 0xff) == SQLITE_IOERR || (rc & 0xff) == SQLITE_CORRUPT) {
        /* A failed fsync of the database file: the same rule as for the WAL. */
        log_sqlite("checkpoint failed", s->db, rc);
        atomic_store(&s->failed, 1);
    }
}

static void *writer_main(void *arg)
{
    sq_store_t *s = arg;
    for (;;) {
        tly_store_op_t *first, *last;
        uint64_t n = 1, commit_us = 0;
        int committed;

        pthread_mutex_lock(&s->mu);
        while (s->head == NULL && !s->stopping)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->head == NULL) { /* stopping, and everything queued is done */
            pthread_mutex_unlock(&s->mu);
            break;
        }
        first = last = s->head;
        while (n < s->conf.batch_max && last->next != NULL) {
            last = last->next;
            n++;
        }
        s->head = last->next;
        if (s->head == NULL)
            s->tail = NULL;
        last->next = NULL;
        pthread_mutex_unlock(&s->mu);

        /* Submitters keep queueing while this runs: that is the next batch. */
        committed = run_batch(s, first, &commit_us);

        /* From here the ops belong to tly_store_reap (which may free them). */
        pthread_mutex_lock(&s->done_mu);
        if (s->done_tail != NULL)
            s->done_tail->next = first;
        else
            s->done_head = first;
        s->done_tail = last;
        if (committed) {
            s->stats.batches++;
            s->stats.ops += n;
            s->stats.last_batch_size = n;
            s->stats.last_commit_us = commit_us;
            s->stats.batch_hist[(size_t)tly_store_hist_bucket(tly_store_batch_bounds, n)]++;
            s->stats.commit_hist[(size_t)tly_store_hist_bucket(tly_store_commit_us_bounds, commit_us)]++;
            s->stats.batch_sum += n;
            s->stats.commit_us_sum += commit_us;
        } else {
            s->stats.failed_batches++;
        }
        pthread_mutex_unlock(&s->done_mu);
        if (s->conf.notify != NULL)
            s->conf.notify(s->conf.notify_arg);

        if (committed)
            maybe_checkpoint(s);
    }
    return NULL;
}

static void sq_close(sq_store_t *s)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->writer_started)
        pthread_join(s->writer, NULL);
    sq_reap(s);
    store_free(s);
}

/* ---- fault injection: a failing fsync (test hook) --------------------------------- */

/*
 * A shim VFS for tly_store_fault_fsync, which tests/crash/fsync.test.mjs reaches through
 * TALLY_FAULT_FSYNC_AFTER. Nothing here runs unless that hook was called: production
 * connections use SQLite's own VFS directly. Each file opened through the shim is the
 * real VFS's file placed right after our header; every method forwards to it, and
 * xSync of a database or WAL file counts. Version 2 methods (no xFetch), so SQLite does
 * not memory-map the database behind the shim's back (it would not anyway: mmap_size
 * is 0 by default).
 */
typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* lives right after this struct */
    int counted;        /* a database or WAL file: its fsyncs count */
} fault_file_t;

static sqlite3_vfs *fault_real_vfs;
static sqlite3_vfs fault_vfs;
static atomic_long fault_syncs_left; /* fsyncs until the failing one; <= 0: spent */

#define FAULT_REAL(f) (((fault_file_t *)(f))->real)

static int fault_close(sqlite3_file *f)
{
    return FAULT_REAL(f)->pMethods->xClose(FAULT_REAL(f));
}
static int fault_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return FAULT_REAL(f)->pMethods->xRead(FAULT_REAL(f), b, n, o);
}
static int fault_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    return FAULT_REAL(f)->pMethods->xWrite(FAULT_REAL(f), b, n, o);
}
static int fault_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return FAULT_REAL(f)->pMethods->xTruncate(FAULT_REAL(f), size);
}
static int fault_sync(sqlite3_file *f, int flags)
{
    if (((fault_file_t *)f)->counted && atomic_fetch_sub(&fault_syncs_left, 1) == 1) {
        fprintf(stderr, "{\"level\":\"warn\",\"msg\":\"fault injection: this fsync fails with EIO\"}\n");
        return SQLITE_IOERR_FSYNC;
    }
    return FAULT_REAL(f)->pMethods->xSync(FAULT_REAL(f), flags);
}
static int fault_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return FAULT_REAL(f)->pMethods->xFileSize(FAULT_REAL(f), size);
}
static int fault_lock(sqlite3_file *f, int l)
{
    return FAULT_REAL(f)->pMethods->xLock(FAULT_REAL(f), l);
}
static int fault_unlock(sqlite3_file *f, int l)
{
    return FAULT_REAL(f)->pMethods->xUnlock(FAULT_REAL(f), l);
}
static int fault_reserved(sqlite3_file *f, int *out)
{
    return FAULT_REAL(f)->pMethods->xCheckReservedLock(FAULT_REAL(f), out);
}
static int fault_fcntl(sqlite3_file *f, int op, void *arg)
{
    return FAULT_REAL(f)->pMethods->xFileControl(FAULT_REAL(f), op, arg);
}
static int fault_sector(sqlite3_file *f)
{
    return FAULT_REAL(f)->pMethods->xSectorSize(FAULT_REAL(f));
}
static int fault_devchar(sqlite3_file *f)
{
    return FAULT_REAL(f)->pMethods->xDeviceCharacteristics(FAULT_REAL(f));
}
static int fault_shmmap(sqlite3_file *f, int pg, int sz, int ext, void volatile **pp)
{
    return FAULT_REAL(f)->pMethods->xShmMap(FAULT_REAL(f), pg, sz, ext, pp);
}
static int fault_shmlock(sqlite3_file *f, int off, int n, int flags)
{
    return FAULT_REAL(f)->pMethods->xShmLock(FAULT_REAL(f), off, n, flags);
}
static void fault_shmbarrier(sqlite3_file *f)
{
    FAULT_REAL(f)->pMethods->xShmBarrier(FAULT_REAL(f));
}
static int fault_shmunmap(sqlite3_file *f, int del)
{
    return FAULT_REAL(f)->pMethods->xShmUnmap(FAULT_REAL(f), del);
}

static const sqlite3_io_methods fault_methods = {
    .iVersion = 2,
    .xClose = fault_close,
    .xRead = fault_read,
    .xWrite = fault_write,
    .xTruncate = fault_truncate,
    .xSync = fault_sync,
    .xFileSize = fault_size,
    .xLock = fault_lock,
    .xUnlock = fault_unlock,
    .xCheckReservedLock = fault_reserved,
    .xFileControl = fault_fcntl,
    .xSectorSize = fault_sector,
    .xDeviceCharacteristics = fault_devchar,
    .xShmMap = fault_shmmap,
    .xShmLock = fault_shmlock,
    .xShmBarrier = fault_shmbarrier,
    .xShmUnmap = fault_shmunmap,
};

static int fault_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    fault_file_t *p = (fault_file_t *)f;
    p->real = (sqlite3_file *)(p + 1);
    p->counted = (flags & (SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_WAL)) != 0;
    int rc = fault_real_vfs->xOpen(fault_real_vfs, name, p->real, flags, out);
    /* No methods means SQLite will not call xClose: neither may we. */
    p->base.pMethods = p->real->pMethods != NULL ? &fault_methods : NULL;
    return rc;
}

int tly_store_fault_fsync(long n)
{
    if (n < 1)
        return TLY_EINVAL;
    if (fault_real_vfs == NULL) {
        if ((fault_real_vfs = sqlite3_vfs_find(NULL)) == NULL)
            return TLY_EIO;
        fault_vfs = *fault_real_vfs;
        fault_vfs.zName = "tally-fault-fsync";
        fault_vfs.szOsFile = (int)sizeof(fault_file_t) + fault_real_vfs->szOsFile;
        fault_vfs.xOpen = fault_open;
        fault_vfs.pNext = NULL;
        if (sqlite3_vfs_register(&fault_vfs, 1) != SQLITE_OK) /* the default from now on */
            return TLY_EIO;
    }
    atomic_store(&fault_syncs_left, n);
    return 0;
}

/* ---- load ------------------------------------------------------------------------ */

static const char *col_str(sqlite3_stmt *st, int i)
{
    return (const char *)sqlite3_column_text(st, i);
}

static void col_hash(sqlite3_stmt *st, int i, uint8_t out[16])
{
    const void *p = sqlite3_column_blob(st, i);
    if (p != NULL && sqlite3_column_bytes(st, i) == 16)
        memcpy(out, p, 16);
    else
        memset(out, 0, 16);
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

static int sq_load(sq_store_t *s, const tly_store_load_cb_t *cb, void *ctx)
{
    int rc = TLY_EIO, src;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL, *ost = NULL;
    option_buf_t ob = {0};

    /* A connection of its own: the writer's belongs to the writer thread, and a WAL
     * reader sees a consistent snapshot whatever the writer does meanwhile. */
    src = sqlite3_open_v2(s->db_path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src != SQLITE_OK || (src = configure(db)) != SQLITE_OK)
        goto sqlite_fail;
    /* One read transaction over all four tables: one snapshot. */
    if ((src = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL)) != SQLITE_OK)
        goto sqlite_fail;

    src = sqlite3_prepare_v2(db, "SELECT user_id, username, password_hash, email, created_at"
                                 " FROM users ORDER BY rowid", -1, &st, NULL);
    if (src != SQLITE_OK)
        goto sqlite_fail;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        tly_user_row_t u = {
            .user_id = col_str(st, 0),
            .username = col_str(st, 1),
            .password_hash = col_str(st, 2),
            .email = col_str(st, 3),
            .created_at = sqlite3_column_int64(st, 4),
        };
        if (cb->user != NULL)
            cb->user(ctx, &u);
    }
    if (src != SQLITE_DONE)
        goto sqlite_fail;
    sqlite3_finalize(st);
    st = NULL;

    src = sqlite3_prepare_v2(db, "SELECT poll_id, owner_id, title, description, type, status,"
                                 " start_time, end_time, settings, created_at, updated_at,"
                                 " idem_key, body_hash, final_results FROM polls ORDER BY rowid",
                             -1, &st, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db, "SELECT option_id, text, display_order, position"
                                     " FROM options WHERE poll_id = ?1 ORDER BY position",
                                 -1, &ost, NULL);
    if (src != SQLITE_OK)
        goto sqlite_fail;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
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
        };
        col_hash(st, 12, p.body_hash);
        ob.n = ob.len = 0;
        sqlite3_bind_text(ost, 1, p.poll_id, -1, SQLITE_STATIC);
        while ((src = sqlite3_step(ost)) == SQLITE_ROW)
            if ((rc = option_buf_add(&ob, ost)) != 0)
                goto fail;
        rc = TLY_EIO;
        if (src != SQLITE_DONE)
            goto sqlite_fail;
        sqlite3_reset(ost);
        for (size_t i = 0; i < ob.n; i++) {
            ob.rows[i].option_id = ob.buf + ob.off[i].id;
            ob.rows[i].text = ob.buf + ob.off[i].text;
        }
        p.noptions = ob.n;
        p.options = ob.rows;
        if (cb->poll != NULL)
            cb->poll(ctx, &p);
    }
    if (src != SQLITE_DONE)
        goto sqlite_fail;
    sqlite3_finalize(st);
    st = NULL;

    /* seq order is commit order: replaying in it rebuilds exactly the committed state. */
    src = sqlite3_prepare_v2(db, "SELECT poll_id, voter_id, vote_id, receipt, choices, scores,"
                                 " recorded_at, idem_key, body_hash, client_meta, ip_hash"
                                 " FROM ballots ORDER BY seq", -1, &st, NULL);
    if (src != SQLITE_OK)
        goto sqlite_fail;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        int nchoices = sqlite3_column_bytes(st, 4);
        tly_ballot_row_t b = {
            .poll_id = col_str(st, 0),
            .voter_id = col_str(st, 1),
            .vote_id = col_str(st, 2),
            .receipt = col_str(st, 3),
            .choices = sqlite3_column_blob(st, 4),
            .scores = sqlite3_column_blob(st, 5),
            .recorded_at = sqlite3_column_int64(st, 6),
            .idem_key = col_str(st, 7),
            .client_meta = col_str(st, 9),
            .ip_hash = sqlite3_column_blob(st, 10),
        };
        if (nchoices > UINT8_MAX ||
            (b.scores != NULL && sqlite3_column_bytes(st, 5) != nchoices) ||
            (b.ip_hash != NULL && sqlite3_column_bytes(st, 10) != 16)) {
            fprintf(stderr, "{\"level\":\"error\",\"msg\":\"store: malformed ballot row\"}\n");
            goto fail;
        }
        b.nchoices = (uint8_t)nchoices;
        col_hash(st, 8, b.body_hash);
        if (cb->ballot != NULL)
            cb->ballot(ctx, &b);
    }
    if (src != SQLITE_DONE)
        goto sqlite_fail;
    sqlite3_finalize(st);
    st = NULL;

    src = sqlite3_prepare_v2(db, "SELECT request_id, poll_id, voter_id, state, vote_id, error,"
                                 " created_at FROM vote_requests ORDER BY rowid", -1, &st, NULL);
    if (src != SQLITE_OK)
        goto sqlite_fail;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        tly_request_row_t r = {
            .request_id = col_str(st, 0),
            .poll_id = col_str(st, 1),
            .voter_id = col_str(st, 2),
            .state = col_str(st, 3),
            .vote_id = col_str(st, 4),
            .error = col_str(st, 5),
            .created_at = sqlite3_column_int64(st, 6),
        };
        if (cb->request != NULL)
            cb->request(ctx, &r);
    }
    if (src != SQLITE_DONE)
        goto sqlite_fail;
    rc = 0;
    goto fail;

sqlite_fail:
    log_sqlite("load failed", db, src);
    rc = src == SQLITE_NOMEM ? TLY_ENOMEM : TLY_EIO;
fail:
    sqlite3_finalize(st);
    sqlite3_finalize(ost);
    if (db != NULL)
        sqlite3_close_v2(db); /* ends the read transaction */
    tly_free(ob.rows);
    tly_free(ob.off);
    tly_free(ob.buf);
    return rc;
}

/* ---- readers: paged reads for exports ------------------------------------------------ */

/* Both walk their (poll_id, seq) index from after_seq on: no OFFSET and no sort, so a
 * page costs the rows it returns however deep into the poll it starts. */
const char tly_store_audit_page_sql[] =
    "SELECT seq, poll_id, voter_id, event, choices, scores, at FROM audit"
    " WHERE poll_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";
const char tly_store_ballots_page_sql[] =
    "SELECT seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key,"
    " body_hash, client_meta FROM ballots WHERE poll_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";

struct sq_reader {
    tly_store_reader_t base; /* first: see store_int.h */
    sqlite3 *db; /* read-only, NOMUTEX: one thread at a time, as the header says */
    sqlite3_stmt *audit, *ballots;
};

static void sq_reader_close(sq_reader_t *r)
{
    if (r == NULL)
        return;
    sqlite3_finalize(r->audit);
    sqlite3_finalize(r->ballots);
    if (r->db != NULL)
        sqlite3_close_v2(r->db);
    tly_free(r);
}

static sq_reader_t *sq_reader_open(sq_store_t *s)
{
    int src;
    sq_reader_t *r = tly_calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->base.be = &tly_store_sqlite;
    /* s->db_path is set once in tly_store_open and never changes: any thread may read it. */
    src = sqlite3_open_v2(s->db_path, &r->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = configure(r->db);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v3(r->db, tly_store_audit_page_sql, -1, SQLITE_PREPARE_PERSISTENT,
                                 &r->audit, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v3(r->db, tly_store_ballots_page_sql, -1, SQLITE_PREPARE_PERSISTENT,
                                 &r->ballots, NULL);
    if (src != SQLITE_OK) {
        log_sqlite("reader open failed", r->db, src);
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
    log_sqlite("page read failed", db, src);
    return (src & 0xff) == SQLITE_NOMEM ? TLY_ENOMEM : TLY_EIO;
}

/* Choices and scores of a row; 0 when they are well formed. A zero-length blob reads as
 * NULL (SQLite's rule), so an empty ballot has nchoices 0 and NULL choices. */
static int col_choices(sqlite3_stmt *st, int ichoices, int iscores, uint8_t *n,
                       const uint8_t **choices, const uint8_t **scores)
{
    /* Pointer first, then size: SQLite's documented order for a value it may convert. */
    *choices = sqlite3_column_blob(st, ichoices);
    int nchoices = sqlite3_column_bytes(st, ichoices);
    *scores = sqlite3_column_blob(st, iscores);
    int nscores = sqlite3_column_bytes(st, iscores);
    if (nchoices > UINT8_MAX || (*scores != NULL && nscores != nchoices)) {
        fprintf(stderr, "{\"level\":\"error\",\"msg\":\"store: malformed ballot row\"}\n");
        return TLY_EIO;
    }
    *n = (uint8_t)nchoices;
    return 0;
}

static int sq_audit_page(sq_reader_t *r, const char *poll_id, int64_t after_seq,
                         size_t limit, void (*cb)(void *ctx, const tly_audit_row_t *row),
                         void *ctx)
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
        if (col_choices(st, 4, 5, &a.nchoices, &a.choices, &a.scores) != 0) {
            page_end(r->db, st, SQLITE_DONE, 0);
            return TLY_EIO;
        }
        cb(ctx, &a);
        n++;
    }
    return page_end(r->db, st, src, n);
}

static int sq_ballots_page(sq_reader_t *r, const char *poll_id, int64_t after_seq,
                           size_t limit,
                           void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq),
                           void *ctx)
{
    sqlite3_stmt *st = r->ballots;
    int src, n = 0;
    if (limit == 0)
        return 0;
    page_bind(st, poll_id, after_seq, limit);
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        tly_ballot_row_t b = {
            .poll_id = col_str(st, 1),
            .voter_id = col_str(st, 2),
            .vote_id = col_str(st, 3),
            .receipt = col_str(st, 4),
            .recorded_at = sqlite3_column_int64(st, 7),
            .idem_key = col_str(st, 8),
            .client_meta = col_str(st, 10),
        };
        if (col_choices(st, 5, 6, &b.nchoices, &b.choices, &b.scores) != 0) {
            page_end(r->db, st, SQLITE_DONE, 0);
            return TLY_EIO;
        }
        col_hash(st, 9, b.body_hash);
        cb(ctx, &b, sqlite3_column_int64(st, 0));
        n++;
    }
    return page_end(r->db, st, src, n);
}

/* ---- generated ballots, for tests and benchmarks ------------------------------------- */

#define GENERATE_CHUNK 10000

static int sq_generate_ballots(sq_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    int rc = TLY_EINVAL, src = SQLITE_OK;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL, *ast = NULL;
    char *buf = NULL;
    int64_t now = tly_now_ms();

    if (poll_id == NULL || noptions == 0 || noptions > 256)
        return TLY_EINVAL;
    size_t idn = strlen(poll_id) + 32; /* "g_<poll_id>_<i>": vote ids are unique store-wide */
    rc = TLY_ENOMEM;
    if ((buf = tly_malloc(3 * idn)) == NULL)
        goto fail;
    char *voter = buf, *vote_id = buf + idn, *receipt = buf + 2 * idn;

    /* A connection of its own, beside the writer: busy_timeout covers the moments when
     * the writer holds the write lock, and the writer's wait for ours (one chunk). */
    src = sqlite3_open_v2(s->db_path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = configure(db);
    if (src == SQLITE_OK) /* the writer's cache size and temp store, for the same reasons */
        src = sqlite3_exec(db, "PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;", NULL, NULL, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db, "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt,"
                                     " choices, recorded_at) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                                 -1, &st, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db, "INSERT INTO audit(poll_id, voter_id, event, choices, at)"
                                     " VALUES(?1, ?2, 'cast', ?3, ?4)", -1, &ast, NULL);
    for (size_t i = 0; src == SQLITE_OK && i < n; i++) {
        /* Fibonacci hashing: choices spread over the options, not round-robin. */
        uint8_t choice = (uint8_t)(((uint32_t)i * 2654435761u >> 8) % noptions);
        if (i % GENERATE_CHUNK == 0 && (src = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL)) != SQLITE_OK)
            break;
        snprintf(voter, idn, "gen%zu", i);
        snprintf(vote_id, idn, "g_%s_%zu", poll_id, i);
        snprintf(receipt, idn, "gr_%s_%zu", poll_id, i);
        sqlite3_bind_text(st, 1, poll_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, voter, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, vote_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, receipt, -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 5, &choice, 1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 6, now);
        if ((src = step_reset(st)) != SQLITE_OK)
            break;
        sqlite3_bind_text(ast, 1, poll_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(ast, 2, voter, -1, SQLITE_STATIC);
        sqlite3_bind_blob(ast, 3, &choice, 1, SQLITE_STATIC);
        sqlite3_bind_int64(ast, 4, now);
        if ((src = step_reset(ast)) != SQLITE_OK)
            break;
        if ((i + 1) % GENERATE_CHUNK == 0 || i + 1 == n)
            src = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    }
    if (src == SQLITE_OK) {
        rc = 0;
        goto fail;
    }
    rc = is_constraint(src) ? constraint_result(src) : sqlite_to_tly(src);
    if (rc == 0)
        rc = TLY_EIO;
    if (!is_constraint(src))
        log_sqlite("generate failed", db, src);
    if (db != NULL && !sqlite3_get_autocommit(db))
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
fail:
    sqlite3_finalize(st);
    sqlite3_finalize(ast);
    if (db != NULL)
        sqlite3_close_v2(db);
    tly_free(buf);
    return rc;
}

/* ---- the backend table store.c dispatches through ---- */

static int be_open(const tly_store_conf_t *conf, tly_store_t **out)
{
    sq_store_t *s;
    int rc = sq_open(conf, &s);
    *out = rc == 0 ? &s->base : NULL;
    return rc;
}
static int be_load(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx)
{
    return sq_load((sq_store_t *)s, cb, ctx);
}
static void be_submit_list(tly_store_t *s, tly_store_op_t *first)
{
    sq_submit_list((sq_store_t *)s, first);
}
static void be_reap(tly_store_t *s)
{
    sq_reap((sq_store_t *)s);
}
static int be_writable(tly_store_t *s)
{
    return sq_writable((sq_store_t *)s);
}
static void be_close(tly_store_t *s)
{
    sq_close((sq_store_t *)s);
}
static tly_store_reader_t *be_reader_open(tly_store_t *s)
{
    sq_reader_t *r = sq_reader_open((sq_store_t *)s);
    return r ? &r->base : NULL;
}
static void be_reader_close(tly_store_reader_t *r)
{
    sq_reader_close((sq_reader_t *)r);
}
static int be_audit_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                         void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx)
{
    return sq_audit_page((sq_reader_t *)r, poll_id, after_seq, limit, cb, ctx);
}
static int be_ballots_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                           void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx)
{
    return sq_ballots_page((sq_reader_t *)r, poll_id, after_seq, limit, cb, ctx);
}
static int be_generate_ballots(tly_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    return sq_generate_ballots((sq_store_t *)s, poll_id, noptions, n);
}
static void be_stats(tly_store_t *s, tly_store_stats_t *out)
{
    sq_stats((sq_store_t *)s, out);
}

const tly_store_backend_t tly_store_sqlite = {
    .name = "sqlite",
    .open = be_open,
    .load = be_load,
    .submit_list = be_submit_list,
    .reap = be_reap,
    .writable = be_writable,
    .close = be_close,
    .reader_open = be_reader_open,
    .reader_close = be_reader_close,
    .audit_page = be_audit_page,
    .ballots_page = be_ballots_page,
    .generate_ballots = be_generate_ballots,
    .stats = be_stats,
};
