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
 *
 * This file holds the writer, open and close, and the backend table; the schema, load,
 * the readers and the fault-injection VFS live beside it (sqlite_int.h has the map).
 */
#include "store/sqlite_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the writer's prepared statements ---------------------------------------------- */

const char sq_next_seq_sql[] = "SELECT max(coalesce((SELECT max(seq) FROM ballots), 0),"
                               " coalesce((SELECT max(seq) FROM audit), 0)) + 1";

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
                       " body_hash, final_results, join_code)"
                       " VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    /* Not owner_id (?2 is bound and unused): only a device link moves a poll to another
     * owner, and an update queued behind one (a freeze) must not move it back. A closed
     * poll keeps no join code (store.h). */
    [ST_POLL_UPDATE] = "UPDATE polls SET title = ?3, description = ?4, type = ?5,"
                       " status = ?6, start_time = ?7, end_time = ?8, settings = ?9,"
                       " created_at = ?10, updated_at = ?11, idem_key = ?12, body_hash = ?13,"
                       " join_code = CASE WHEN ?6 = 2 OR coalesce(final_results, ?14) IS NOT NULL THEN NULL"
                       " ELSE ?15 END, final_results = coalesce(final_results, ?14) WHERE poll_id = ?1",
    [ST_POLL_DELETE] = "DELETE FROM polls WHERE poll_id = ?1",
    [ST_OPTIONS_DELETE] = "DELETE FROM options WHERE poll_id = ?1",
    [ST_OPTION_INSERT] = "INSERT INTO options(poll_id, position, option_id, text, display_order)"
                         " VALUES(?1, ?2, ?3, ?4, ?5)",
    [ST_BALLOT_INSERT] = "INSERT INTO ballots(seq, poll_id, voter_id, vote_id, receipt, choices, scores,"
                         " recorded_at, idem_key, body_hash, client_meta, ip_hash)"
                         " VALUES(?12, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    /* Replace and delete find the row by its seq (?1) and check that it is the voter's
     * (?2, ?3): no index on (poll_id, voter_id) exists (migration 6). The first replace
     * keeps the ballot as cast (the right-hand sides read the old row): it stays the
     * row's cast event, and a retry of the POST that cast it is answered from it. */
    [ST_BALLOT_REPLACE] = "UPDATE ballots SET"
                          " cast_choices = CASE WHEN cast_at IS NULL THEN choices ELSE cast_choices END,"
                          " cast_scores = CASE WHEN cast_at IS NULL THEN scores ELSE cast_scores END,"
                          " cast_at = coalesce(cast_at, recorded_at),"
                          " choices = ?4, scores = ?5, recorded_at = ?6,"
                          " idem_key = ?7, body_hash = ?8 WHERE seq = ?1 AND poll_id = ?2 AND voter_id = ?3",
    [ST_BALLOT_DELETE] = "DELETE FROM ballots WHERE seq = ?1 AND poll_id = ?2 AND voter_id = ?3",
    /* Before a ballot row goes, its cast event (the row as first cast) moves to audit
     * under the ballot's own seq, unless it is there already (ballots from before
     * migration 6). */
    [ST_CAST_TO_AUDIT] = "INSERT INTO audit(seq, poll_id, voter_id, event, choices, scores, at)"
                         " SELECT seq, poll_id, voter_id, 'cast',"
                         " CASE WHEN cast_at IS NULL THEN choices ELSE cast_choices END,"
                         " CASE WHEN cast_at IS NULL THEN scores ELSE cast_scores END,"
                         " coalesce(cast_at, recorded_at) FROM ballots"
                         " WHERE seq = ?1 AND poll_id = ?2 AND voter_id = ?3 AND cast_in_audit = 0",
    [ST_AUDIT_INSERT] = "INSERT INTO audit(seq, poll_id, voter_id, event, choices, scores, at, idem_key, body_hash)"
                        " VALUES(?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    /* The next seq of ballots and audit (one sequence), read once a batch under the
     * write lock: a generator's connection (tly_store_generate_ballots) may have
     * appended since the last batch. */
    [ST_NEXT_SEQ] = sq_next_seq_sql,
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
    /* A device link (device_link below). */
    [ST_LINK_INSERT] = "INSERT INTO device_links(device_id, user_id, linked_at) VALUES(?1, ?2, ?3)",
    [ST_LINK_BALLOT] = "SELECT coalesce(cast_at, recorded_at), idem_key, body_hash FROM ballots"
                       " WHERE seq = ?1 AND poll_id = ?2 AND voter_id = ?3",
    [ST_LINK_FROZEN] = "SELECT final_results IS NOT NULL FROM polls WHERE poll_id = ?1",
    [ST_BALLOT_REKEY] = "UPDATE ballots SET voter_id = ?4 WHERE seq = ?1 AND poll_id = ?2 AND voter_id = ?3",
    [ST_POLLS_REOWN] = "UPDATE polls SET owner_id = ?2 WHERE owner_id = ?1 RETURNING poll_id",
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Logs why a SQLite call failed (the store must say why it stopped accepting writes).
 * SQLite's messages name tables and columns, never values. */
void sq_log_sqlite(const char *msg, sqlite3 *db, int rc)
{
    char what[96], code[16];
    snprintf(what, sizeof what, "store: %s", msg);
    snprintf(code, sizeof code, "%d", rc);
    /* The connection's message only when it has an error: rc may be our own refusal. */
    const char *text = db != NULL && sqlite3_errcode(db) != SQLITE_OK ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    tly_log(TLY_LOG_ERROR, what, "sqlite_rc", code, "sqlite", text, NULL);
}

/* ---- open ------------------------------------------------------------------------ */

/* sq_wal_check on DATA_DIR/tally.db-wal, before SQLite opens the database. */
static int check_wal(sq_store_t *s)
{
    size_t n = strlen(s->db_path) + sizeof "-wal";
    char *wal = tly_malloc(n);
    if (wal == NULL)
        return TLY_ENOMEM;
    snprintf(wal, n, "%s-wal", s->db_path);
    int rc = sq_wal_check(wal);
    tly_free(wal);
    return rc;
}

int sq_sqlite_to_tly(int rc)
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

/* Called by SQLite on the writer thread after each commit. Installing it also turns off
 * SQLite's auto-checkpoint, which would otherwise run inside COMMIT and delay the
 * acknowledgement of the batch; we checkpoint after notifying instead. */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int nframes)
{
    sq_store_t *s = arg;
    s->hook_frames = nframes;
    return SQLITE_OK;
}

static void *writer_main(void *arg);
static void *ckpt_main(void *arg);

static void store_free(sq_store_t *s)
{
    for (size_t i = 0; i < ST__COUNT; i++)
        sqlite3_finalize(s->st[i]);
    if (s->ckpt_db != NULL)
        sqlite3_close_v2(s->ckpt_db);
    if (s->db != NULL)
        sqlite3_close_v2(s->db);
    if (s->ckpt_ready) {
        pthread_cond_destroy(&s->ckpt_cv);
        pthread_mutex_destroy(&s->ckpt_mu);
    }
    if (s->sync_ready) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        pthread_mutex_destroy(&s->done_mu);
    }
    if (s->lock_fd >= 0)
        close(s->lock_fd); /* releases the lock, last: nothing of ours touches the files now */
    tly_free(s->db_path);
    tly_free(s->data_dir);
    tly_free(s);
}

static int sq_open(const tly_store_conf_t *conf, sq_store_t **out)
{
    int rc = TLY_EINVAL, src;
    sq_store_t *s = NULL;

    *out = NULL;
    if (conf == NULL || conf->data_dir == NULL || conf->data_dir[0] == '\0')
        goto fail;
    rc = TLY_ENOMEM;
    if ((s = tly_calloc(1, sizeof *s)) == NULL)
        goto fail;
    s->base.be = &tly_store_sqlite;
    s->lock_fd = -1;
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

    /* One process per data directory. Since migration 6 nothing in the file refuses a
     * second ballot of a voter: the writer process's memory does, so a second process
     * on the same files would take ballots nobody checks against the first's. */
    if ((rc = tly_store_lock_dir(s->data_dir, &s->lock_fd)) != 0)
        goto fail;
    if ((rc = check_wal(s)) != 0)
        goto fail;

    if ((src = sq_open_writer_db(s)) != SQLITE_OK)
        goto sqlite_fail;
    for (size_t i = 0; i < ST__COUNT; i++) {
        src = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
        if (src != SQLITE_OK)
            goto sqlite_fail;
    }
    sqlite3_wal_hook(s->db, wal_hook, s);
    if ((src = sq_open_checkpoint_db(s)) != SQLITE_OK)
        goto sqlite_fail;

    rc = TLY_EIO;
    if (pthread_mutex_init(&s->ckpt_mu, NULL) != 0)
        goto fail;
    if (pthread_cond_init(&s->ckpt_cv, NULL) != 0) {
        pthread_mutex_destroy(&s->ckpt_mu);
        goto fail;
    }
    s->ckpt_ready = 1;
    if (pthread_create(&s->ckpt, NULL, ckpt_main, s) != 0)
        goto fail;
    s->ckpt_started = 1;
    if (pthread_create(&s->writer, NULL, writer_main, s) != 0)
        goto fail;
    s->writer_started = 1;
    *out = s;
    return 0;

sqlite_fail:
    sq_log_sqlite("open failed", s->db, src);
    rc = sq_sqlite_to_tly(src);
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

static int sq_writable(sq_store_t *s) { return !atomic_load(&s->failed); }

static void sq_stats(sq_store_t *s, tly_store_stats_t *out)
{
    pthread_mutex_lock(&s->done_mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->done_mu);
    int backlog = atomic_load(&s->wal_frames) - atomic_load(&s->ckpt_frames);
    out->checkpoints = atomic_load(&s->checkpoints);
    out->wal_bytes = atomic_load(&s->wal_appended);
    out->checkpoint_backlog_bytes = backlog > 0 ? (uint64_t)backlog * (uint64_t)s->page_size : 0;
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
int sq_step_reset(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

int sq_is_constraint(int rc) { return (rc & 0xff) == SQLITE_CONSTRAINT; }

/* The op result of a constraint failure. Only uniqueness is a normal outcome (EEXIST);
 * a missing poll (foreign key) or a missing required field is the caller's bug, but it
 * fails that operation alone rather than everyone else's ballots in the batch. */
int sq_constraint_result(int rc)
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
    return sq_step_reset(st);
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
    bind_str(st, 15, p->join_code);
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
        int rc = sq_step_reset(st);
        if (rc != SQLITE_OK)
            return rc;
    }
    return SQLITE_OK;
}

static int poll_insert(sq_store_t *s, tly_store_op_t *op)
{
    bind_poll(s->st[ST_POLL_INSERT], &op->u.poll);
    int rc = sq_step_reset(s->st[ST_POLL_INSERT]);
    return rc != SQLITE_OK ? rc : options_insert(s, &op->u.poll);
}

static int poll_update(sq_store_t *s, tly_store_op_t *op)
{
    const tly_poll_row_t *p = &op->u.poll;
    bind_poll(s->st[ST_POLL_UPDATE], p);
    int rc = sq_step_reset(s->st[ST_POLL_UPDATE]);
    if (rc != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    bind_str(s->st[ST_OPTIONS_DELETE], 1, p->poll_id);
    if ((rc = sq_step_reset(s->st[ST_OPTIONS_DELETE])) != SQLITE_OK)
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
    if ((rc = sq_step_reset(s->st[ST_REQUESTS_DELETE])) != SQLITE_OK)
        return rc;
    bind_str(s->st[ST_POLL_DELETE], 1, op->u.poll.poll_id);
    if ((rc = sq_step_reset(s->st[ST_POLL_DELETE])) != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    bind_str(s->st[ST_AUDIT_DELETE], 1, op->u.poll.poll_id);
    return sq_step_reset(s->st[ST_AUDIT_DELETE]);
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
    sqlite3_bind_int64(st, 9, s->next_seq++);
    bind_str(st, 1, b->poll_id);
    bind_str(st, 2, b->voter_id);
    bind_str(st, 3, event);
    if (strcmp(event, "revoked") != 0) {
        bind_choices(st, 4, 5, b);
    } else { /* the retracted ballot's key, for a late retry of its request */
        bind_str(st, 7, b->idem_key);
        bind_hash(st, 8, b->body_hash);
    }
    sqlite3_bind_int64(st, 6, b->recorded_at);
    return sq_step_reset(st);
}

static void bind_ballot_key(sqlite3_stmt *st, const tly_ballot_row_t *b)
{
    sqlite3_bind_int64(st, 1, b->seq);
    bind_str(st, 2, b->poll_id);
    bind_str(st, 3, b->voter_id);
}

/* BALLOT_REPLACE and BALLOT_DELETE, inside run_op's savepoint: before a retraction the
 * ballot's cast event moves to audit (a change keeps it in the row), then the row
 * changes, and only if there was one the "changed" or "revoked" row is appended. */
static int ballot_change(sq_store_t *s, tly_store_op_t *op)
{
    const tly_ballot_row_t *b = &op->u.ballot;
    int replace = op->type == TLY_OP_BALLOT_REPLACE;
    sqlite3_stmt *st = s->st[ST_CAST_TO_AUDIT];
    int rc;

    if (!replace) {
        bind_ballot_key(st, b);
        if ((rc = sq_step_reset(st)) != SQLITE_OK)
            return rc;
    }
    st = s->st[replace ? ST_BALLOT_REPLACE : ST_BALLOT_DELETE];
    bind_ballot_key(st, b);
    if (replace) {
        bind_choices(st, 4, 5, b);
        sqlite3_bind_int64(st, 6, b->recorded_at);
        bind_str(st, 7, b->idem_key);
        bind_hash(st, 8, b->body_hash);
    }
    if ((rc = sq_step_reset(st)) != SQLITE_OK)
        return rc;
    if (sqlite3_changes(s->db) == 0) {
        op->result = TLY_ENOTFOUND;
        return SQLITE_OK;
    }
    return audit_insert(s, b, replace ? "changed" : "revoked");
}

/* What a link reads of one ballot row: when it was cast (the earlier of two stands) and
 * the key of the request that cast it (a retraction keeps it in its "revoked" row). */
typedef struct {
    int found;
    int64_t cast_at;
    char *idem_key; /* tly_malloc'd, or NULL */
    uint8_t body_hash[16];
} link_ballot_t;

/* Reads the ballot `seq` when it is voter's in poll_id (seq 0: none). An SQLite code. */
static int link_read_ballot(sq_store_t *s, int64_t seq, const char *poll_id, const char *voter, link_ballot_t *out)
{
    sqlite3_stmt *st = s->st[ST_LINK_BALLOT];
    int rc = SQLITE_OK;
    *out = (link_ballot_t){0};
    if (seq == 0)
        return SQLITE_OK;
    sqlite3_bind_int64(st, 1, seq);
    bind_str(st, 2, poll_id);
    bind_str(st, 3, voter);
    int step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(st, 1);
        const void *h = sqlite3_column_blob(st, 2);
        out->found = 1;
        out->cast_at = sqlite3_column_int64(st, 0);
        if (k != NULL && (out->idem_key = tly_strdup(k)) == NULL)
            rc = SQLITE_NOMEM;
        if (h != NULL && sqlite3_column_bytes(st, 2) == 16)
            memcpy(out->body_hash, h, 16);
    } else if (step != SQLITE_DONE) {
        rc = step;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

/* Whether the poll's final results are stored (*frozen). An SQLite code. */
static int link_poll_frozen(sq_store_t *s, const char *poll_id, int *frozen)
{
    sqlite3_stmt *st = s->st[ST_LINK_FROZEN];
    bind_str(st, 1, poll_id);
    int step = sqlite3_step(st);
    *frozen = step == SQLITE_ROW && sqlite3_column_int(st, 0) != 0;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return step == SQLITE_ROW || step == SQLITE_DONE ? SQLITE_OK : step;
}

/* Retracts the ballot b read as voter's `seq` in e's poll: as BALLOT_DELETE does (its
 * cast event into audit, the row gone, a "revoked" row with its request's key), at the
 * link's time. An SQLite code. */
static int link_retract(sq_store_t *s, const tly_link_row_t *l, const tly_link_ballot_t *e, int64_t seq,
                        const char *voter, const link_ballot_t *b)
{
    tly_store_op_t del = {.type = TLY_OP_BALLOT_DELETE};
    del.u.ballot = (tly_ballot_row_t){
        .poll_id = e->poll_id, .voter_id = voter, .seq = seq, .recorded_at = l->at, .idem_key = b->idem_key};
    memcpy(del.u.ballot.body_hash, b->body_hash, 16);
    return ballot_change(s, &del);
}

/* Files the device's ballot `seq` under the account. An SQLite code. */
static int link_rekey(sq_store_t *s, const tly_link_row_t *l, const tly_link_ballot_t *e)
{
    sqlite3_stmt *st = s->st[ST_BALLOT_REKEY];
    sqlite3_bind_int64(st, 1, e->device_seq);
    bind_str(st, 2, e->poll_id);
    bind_str(st, 3, l->device_id);
    bind_str(st, 4, l->user_id);
    return sq_step_reset(st);
}

/* One poll of a link: the outcome of tly_link_outcome_t, the earlier ballot (cast time,
 * then seq) standing where both voted. An SQLite code. */
static int link_ballot(sq_store_t *s, const tly_link_row_t *l, tly_link_ballot_t *e)
{
    link_ballot_t d, u = {0};
    int rc, frozen = 0;
    e->outcome = TLY_LINK_GONE;
    if ((rc = link_read_ballot(s, e->device_seq, e->poll_id, l->device_id, &d)) != SQLITE_OK || !d.found)
        goto out;
    if ((rc = link_read_ballot(s, e->user_seq, e->poll_id, l->user_id, &u)) != SQLITE_OK)
        goto out;
    if (u.found && !e->closed && (rc = link_poll_frozen(s, e->poll_id, &frozen)) != SQLITE_OK)
        goto out;
    if (!u.found) {
        rc = link_rekey(s, l, e);
        e->outcome = TLY_LINK_MOVED;
    } else if (e->closed || frozen) {
        e->outcome = TLY_LINK_KEPT_BOTH;
    } else if (d.cast_at < u.cast_at || (d.cast_at == u.cast_at && e->device_seq < e->user_seq)) {
        if ((rc = link_retract(s, l, e, e->user_seq, l->user_id, &u)) == SQLITE_OK)
            rc = link_rekey(s, l, e);
        e->outcome = TLY_LINK_KEPT_DEVICE;
    } else {
        rc = link_retract(s, l, e, e->device_seq, l->device_id, &d);
        e->outcome = TLY_LINK_KEPT_ACCOUNT;
    }
out:
    tly_free(d.idem_key);
    tly_free(u.idem_key);
    return rc;
}

/*
 * TLY_OP_DEVICE_LINK, inside run_op's savepoint: the link row (a second link of the
 * device fails it as a duplicate key: TLY_EEXIST), then each ballot the caller's memory
 * listed (found by seq: no index by voter since migration 6), then the device's polls
 * (found by polls_owner). Everything in the one savepoint, so that a restart sees the
 * link with all of it or none of it.
 */
static int device_link(sq_store_t *s, tly_store_op_t *op)
{
    tly_link_row_t *l = &op->u.link;
    sqlite3_stmt *st = s->st[ST_LINK_INSERT];
    tly_strlist_t moved = {0};
    int rc, step;

    l->polls_moved = NULL;
    l->npolls_moved = 0;
    bind_str(st, 1, l->device_id);
    bind_str(st, 2, l->user_id);
    sqlite3_bind_int64(st, 3, l->at);
    if ((rc = sq_step_reset(st)) != SQLITE_OK)
        return rc;
    for (size_t i = 0; i < l->nballots; i++)
        if ((rc = link_ballot(s, l, &l->ballots[i])) != SQLITE_OK)
            return rc;
    st = s->st[ST_POLLS_REOWN];
    bind_str(st, 1, l->device_id);
    bind_str(st, 2, l->user_id);
    while ((step = sqlite3_step(st)) == SQLITE_ROW)
        if (tly_strlist_add(&moved, (const char *)sqlite3_column_text(st, 0)) != 0) {
            step = SQLITE_NOMEM;
            break;
        }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (step == SQLITE_DONE && tly_strlist_take(&moved, &l->polls_moved, &l->npolls_moved) != 0)
        step = SQLITE_NOMEM;
    tly_free(moved.buf);
    return step == SQLITE_DONE ? SQLITE_OK : step;
}

/*
 * The ballot row, appended under the batch's next seq, which goes back to the caller in
 * b->seq (its memory names the ballot by it for a later change or retraction). Nothing
 * else is written for a ballot (migration 6): the row is its own cast event, and that
 * memory holds one ballot per voter is the caller's to keep (one process per data
 * directory). Only the address rule keeps an index here (partial, on the polls that
 * use it): a second ballot from an address fails this op alone with TLY_EEXIST.
 */
static int ballot_insert(sq_store_t *s, tly_store_op_t *op)
{
    tly_ballot_row_t *b = &op->u.ballot;
    sqlite3_stmt *st = s->st[ST_BALLOT_INSERT];
    int rc;

    b->seq = s->next_seq;
    sqlite3_bind_int64(st, 12, b->seq);
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
    rc = sq_step_reset(st);
    if (rc == SQLITE_OK)
        s->next_seq++;
    else
        b->seq = 0;
    if (b->request_id == NULL)
        return rc;
    /* Only "already voted" is an outcome the request row records; any other failure
     * (unknown poll, missing field) is returned and the savepoint undoes the op. */
    if (rc != SQLITE_OK && sq_constraint_result(rc) != TLY_EEXIST)
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
    return sq_step_reset(st);
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
 * failure undoes the operation as a whole; a plain ballot is one statement.
 */
static int run_op(sq_store_t *s, tly_store_op_t *op)
{
    int rc, rc2;
    int multi = op->type == TLY_OP_POLL_INSERT || op->type == TLY_OP_POLL_UPDATE || op->type == TLY_OP_POLL_DELETE ||
                op->type == TLY_OP_BALLOT_REPLACE || op->type == TLY_OP_BALLOT_DELETE ||
                op->type == TLY_OP_DEVICE_LINK || (op->type == TLY_OP_BALLOT_INSERT && op->u.ballot.request_id != NULL);

    op->result = 0;
    if (multi && (rc = sq_step_reset(s->st[ST_SAVEPOINT])) != SQLITE_OK)
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
    case TLY_OP_DEVICE_LINK:
        rc = device_link(s, op);
        break;
    default:
        rc = SQLITE_CONSTRAINT; /* an unknown type fails alone, as TLY_EINVAL */
        break;
    }
    if (rc != SQLITE_OK && !sq_is_constraint(rc))
        return rc; /* the batch rolls back; the savepoint goes with it */
    if (rc != SQLITE_OK) {
        op->result = sq_constraint_result(rc);
        if (multi && (rc2 = sq_step_reset(s->st[ST_ROLLBACK_TO])) != SQLITE_OK)
            return rc2;
    }
    if (multi && (rc2 = sq_step_reset(s->st[ST_RELEASE])) != SQLITE_OK)
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
    if ((rc = sq_step_reset(s->st[ST_BEGIN])) != SQLITE_OK)
        goto fail;
    if ((rc = sqlite3_step(s->st[ST_NEXT_SEQ])) != SQLITE_ROW)
        goto fail;
    s->next_seq = sqlite3_column_int64(s->st[ST_NEXT_SEQ], 0);
    sqlite3_reset(s->st[ST_NEXT_SEQ]);
    for (op = first; op != NULL; op = op->next)
        if ((rc = run_op(s, op)) != SQLITE_OK)
            goto fail;
    t0 = now_us();
    /* synchronous=FULL in WAL mode: this COMMIT fsyncs the WAL, once for the batch. */
    if ((rc = sq_step_reset(s->st[ST_COMMIT])) != SQLITE_OK)
        goto fail;
    *commit_us = (uint64_t)(now_us() - t0);
    return 1;

fail:
    sq_log_sqlite("batch failed", s->db, rc);
    /* SQLite may already have rolled back by itself (FULL, IOERR, NOMEM, BUSY on
     * COMMIT leaves it open); only roll back what is still open. */
    if (!sqlite3_get_autocommit(s->db)) {
        int rrc = sq_step_reset(s->st[ST_ROLLBACK]);
        if (rrc != SQLITE_OK) {
            sq_log_sqlite("rollback failed", s->db, rrc);
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

/*
 * Checkpoints run on a thread of their own, off the writer's path: copying the WAL back
 * into the database and fsyncing it takes tens of ms per 16 MiB here, and on the writer
 * every commit queued behind it waited that long. SQLite lets a checkpoint run beside a
 * writer in WAL mode: PASSIVE copies the frames committed when it starts, never waits
 * for the writer and never truncates the WAL. The WAL is reused from its start once a
 * checkpoint has caught up with it when the writer begins its next transaction; under
 * steady load a PASSIVE checkpoint rarely finishes between two commits, so once the WAL
 * is CKPT_RESTART_FACTOR times the threshold the checkpointer asks for RESTART instead,
 * which copies what PASSIVE left (little, just after one) while holding the writer off
 * briefly, and makes the next commit start the WAL over. No big file is ever deleted or
 * truncated (which stalls fsyncs on this disk).
 */
#define CKPT_RESTART_FACTOR 4

static void *ckpt_main(void *arg)
{
    sq_store_t *s = arg;
    pthread_setname_np(pthread_self(), "tally-ckpt");
    for (;;) {
        pthread_mutex_lock(&s->ckpt_mu);
        while (!s->ckpt_wanted && !s->ckpt_stopping)
            pthread_cond_wait(&s->ckpt_cv, &s->ckpt_mu);
        int stop = s->ckpt_stopping;
        s->ckpt_wanted = 0;
        pthread_mutex_unlock(&s->ckpt_mu);
        if (stop)
            break;
        if (atomic_load(&s->failed))
            continue;
        int log = 0, done = 0;
        int64_t big = (int64_t)CKPT_RESTART_FACTOR * (int64_t)TLY_STORE_CHECKPOINT_BYTES / s->page_size;
        int mode = atomic_load(&s->wal_frames) >= big ? SQLITE_CHECKPOINT_RESTART : SQLITE_CHECKPOINT_PASSIVE;
        int rc = sqlite3_wal_checkpoint_v2(s->ckpt_db, NULL, mode, &log, &done);
        if (rc == SQLITE_OK || (rc & 0xff) == SQLITE_BUSY) {
            /* BUSY: a RESTART that could not get the writer off in busy_timeout; what it
             * copied is copied, the next request tries again */
            atomic_store(&s->ckpt_frames, done > 0 ? done : 0);
            atomic_fetch_add(&s->checkpoints, 1);
            continue;
        }
        sq_log_sqlite("checkpoint failed", s->ckpt_db, rc);
        if ((rc & 0xff) == SQLITE_IOERR || (rc & 0xff) == SQLITE_CORRUPT)
            atomic_store(&s->failed, 1); /* a failed fsync of the database file: the WAL's rule */
    }
    return NULL;
}

/* After a committed batch, on the writer: records the WAL's length and wakes the
 * checkpointer once TLY_STORE_CHECKPOINT_BYTES have been appended since the frames it
 * last copied. A WAL shorter than before was started over: everything in the old one
 * had been copied. */
static void after_commit(sq_store_t *s)
{
    int frames = s->hook_frames, prev = atomic_load(&s->wal_frames);
    if (frames < prev)
        atomic_store(&s->ckpt_frames, 0);
    atomic_fetch_add(&s->wal_appended, (uint64_t)(frames >= prev ? frames - prev : frames) * (uint64_t)s->page_size);
    atomic_store(&s->wal_frames, frames);
    if ((int64_t)(frames - atomic_load(&s->ckpt_frames)) * s->page_size < (int64_t)TLY_STORE_CHECKPOINT_BYTES)
        return;
    pthread_mutex_lock(&s->ckpt_mu);
    s->ckpt_wanted = 1;
    pthread_cond_signal(&s->ckpt_cv);
    pthread_mutex_unlock(&s->ckpt_mu);
}

static void *writer_main(void *arg)
{
    sq_store_t *s = arg;
    pthread_setname_np(pthread_self(), "tally-writer");
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
            after_commit(s);
    }
    return NULL;
}

static void sq_close(sq_store_t *s)
{
    if (s == NULL)
        return;
    tly_store_stop_thread(&s->mu, &s->cv, &s->stopping, s->writer, s->writer_started);
    tly_store_stop_thread(&s->ckpt_mu, &s->ckpt_cv, &s->ckpt_stopping, s->ckpt, s->ckpt_started);
    sq_reap(s);
    store_free(s);
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
static void be_submit_list(tly_store_t *s, tly_store_op_t *first) { sq_submit_list((sq_store_t *)s, first); }
static void be_reap(tly_store_t *s) { sq_reap((sq_store_t *)s); }
static int be_writable(tly_store_t *s) { return sq_writable((sq_store_t *)s); }
static void be_close(tly_store_t *s) { sq_close((sq_store_t *)s); }
static tly_store_reader_t *be_reader_open(tly_store_t *s)
{
    sq_reader_t *r = sq_reader_open((sq_store_t *)s);
    return r ? &r->base : NULL;
}
static void be_reader_close(tly_store_reader_t *r) { sq_reader_close((sq_reader_t *)r); }
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
static void be_stats(tly_store_t *s, tly_store_stats_t *out) { sq_stats((sq_store_t *)s, out); }

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
    .reconcile = tly_store_sqlite_reconcile,
};
