/*
 * sqlite_int.h: what the SQLite backend's files share. Nothing outside src/store/sqlite*.c
 * includes this.
 *
 *  - sqlite.c: the writer (submission queue, batches, the per-op statements,
 *    checkpoints), reap, stats, open and close, the backend table, and the helpers every
 *    piece uses (result codes, logging, stepping a statement);
 *  - sqlite_schema.c: the schema and its migrations, and the opening and configuration
 *    (pragmas) of connections;
 *  - sqlite_read.c: load (with PRAGMA quick_check on a thread beside it), the readers
 *    (paged reads for exports) and generated ballots, each on a connection of its own;
 *  - sqlite_wal.c: the check of the WAL before SQLite opens it (damage that recovery
 *    would take silently);
 *  - sqlite_fault.c: the test-only VFS whose n-th fsync fails (tly_store_fault_fsync).
 */
#ifndef TALLY_STORE_SQLITE_INT_H
#define TALLY_STORE_SQLITE_INT_H

#include "store/store_int.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct sq_store sq_store_t;
typedef struct sq_reader sq_reader_t;

/* ---- the writer's prepared statements (their SQL: stmt_sql in sqlite.c) ------------ */

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
    ST_CAST_TO_AUDIT,
    ST_AUDIT_INSERT,
    ST_AUDIT_DELETE,
    ST_NEXT_SEQ,
    ST_REQUEST_UPSERT,
    ST_REQUESTS_DELETE,
    ST_LINK_INSERT,
    ST_LINK_BALLOT,
    ST_LINK_FROZEN,
    ST_BALLOT_REKEY,
    ST_POLLS_REOWN,
    ST__COUNT
};

struct sq_store {
    tly_store_t base;      /* first: see store_int.h */
    tly_store_conf_t conf; /* conf.data_dir points at data_dir below */
    char *data_dir;
    char *db_path;

    /* The writer's. Opened on the owning thread in tly_store_open, then used only by the
     * writer thread until it is joined in tly_store_close. */
    sqlite3 *db;
    sqlite3_stmt *st[ST__COUNT];
    int64_t next_seq; /* of ballots and audit, during a batch (read at its start) */
    int hook_frames;  /* frames in the WAL after the last commit (wal hook) */
    int page_size;

    /* The checkpointer (ckpt_main): its own connection, used by its thread alone, woken
     * by the writer through ckpt_wanted. wal_frames is the WAL's length after the last
     * commit (the writer's), ckpt_frames how much of it the last checkpoint had copied
     * back (the checkpointer's); the difference is the backlog. */
    sqlite3 *ckpt_db;
    pthread_mutex_t ckpt_mu;
    pthread_cond_t ckpt_cv;
    int ckpt_wanted, ckpt_stopping;
    atomic_int wal_frames, ckpt_frames;
    atomic_uint_fast64_t checkpoints, wal_appended; /* WAL bytes appended by commits */
    pthread_t ckpt;
    int ckpt_started, ckpt_ready;

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
    int lock_fd;       /* DATA_DIR/lock, flock'ed while open (-1: not yet) */
    pthread_t writer;
    int writer_started, sync_ready;
};

/* A reader: its own read-only connection and the two page statements (sqlite_read.c). */
struct sq_reader {
    tly_store_reader_t base; /* first: see store_int.h */
    sqlite3 *db;             /* read-only, NOMUTEX: one thread at a time, as the header says */
    sqlite3_stmt *audit, *ballots;
};

/* ---- sqlite.c -------------------------------------------------------------------- */

/* The next seq of ballots and audit (one sequence since migration 6): one row, one
 * column. Read under the write lock by whoever appends (the writer, the generator). */
extern const char sq_next_seq_sql[];

/* One JSON line on stderr saying why an SQLite call failed. Any thread. */
void sq_log_sqlite(const char *msg, sqlite3 *db, int rc);
/* The TLY_E* code (or 0) of an SQLite result code. */
int sq_sqlite_to_tly(int rc);
/* Steps a statement, then resets it and clears its bindings; SQLITE_OK or the error. */
int sq_step_reset(sqlite3_stmt *st);
/* Whether an (extended) SQLite result code is a constraint failure. */
int sq_is_constraint(int rc);
/* The op result (TLY_EEXIST, TLY_ENOTFOUND, TLY_EINVAL) of a constraint failure. */
int sq_constraint_result(int rc);

/* ---- sqlite_schema.c ------------------------------------------------------------- */

/* Applies the settings every connection needs. Returns an SQLite result code. */
int sq_configure(sqlite3 *db);
/* Opens the writer's connection s->db on s->db_path in WAL mode, sets its pragmas,
 * migrates the schema to TLY_STORE_SCHEMA_VERSION and reads s->page_size. Returns an
 * SQLite result code; on failure s->db may be set all the same (store_free closes it). */
int sq_open_writer_db(sq_store_t *s);
/* Opens the checkpointer's connection s->ckpt_db on the migrated file. An SQLite result
 * code; on failure s->ckpt_db may be set all the same. */
int sq_open_checkpoint_db(sq_store_t *s);

/* ---- sqlite_wal.c ------------------------------------------------------------------ */

/* Reads the WAL at wal_path as SQLite's recovery will, before SQLite opens it: 0 when
 * recovery keeps every transaction whose commit was acknowledged (no WAL, an intact
 * one, or one whose only damage is the torn tail of its last transaction), TLY_EIO
 * (logged with the file, the byte offset and the frame) when a damaged frame is
 * followed by a later transaction's commit, which recovery would drop without a word;
 * TLY_ENOMEM. Owning thread, before the store opens. */
int sq_wal_check(const char *wal_path);

/* ---- sqlite_read.c: the backend's load, readers and generate_ballots (store.h) ----- */

int sq_load(sq_store_t *s, const tly_store_load_cb_t *cb, void *ctx);
sq_reader_t *sq_reader_open(sq_store_t *s);
void sq_reader_close(sq_reader_t *r);
int sq_audit_page(sq_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                  void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx);
int sq_ballots_page(sq_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                    void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx);
int sq_generate_ballots(sq_store_t *s, const char *poll_id, size_t noptions, size_t n);

#endif
