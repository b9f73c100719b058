/*
 * store: the durable truth. Every write goes through one writer thread that commits
 * operations in batches (group commit): many operations, one transaction, one fsync.
 * An operation's `done` callback runs only after its batch has committed (or failed),
 * so a caller acknowledges a ballot only when it is durable.
 *
 * The embedded implementation is SQLite (sqlite.c) in WAL mode with synchronous=FULL;
 * the schema is versioned and migrated on open (see migrations in sqlite.c).
 *
 * Threads: tly_store_open, tly_store_load, tly_store_reap and tly_store_close are
 * called from the owning (event-loop) thread; tly_store_submit from any thread. `done`
 * callbacks run on the thread that calls tly_store_reap. The writer thread touches
 * nothing but the operation it was given, and only between submit and done.
 */
#ifndef TALLY_STORE_H
#define TALLY_STORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct tly_store tly_store_t;

typedef struct {
    const char *user_id, *username, *password_hash, *email; /* email may be NULL */
    int64_t created_at;
} tly_user_row_t;

typedef struct {
    const char *option_id;
    const char *text;
    int display_order;
    int position; /* index in the poll's option array; ballots refer to it */
} tly_option_row_t;

typedef struct {
    const char *poll_id, *owner_id, *title, *description; /* description may be NULL */
    int type, status;                                     /* tly_poll_type_t, tly_poll_status_t */
    int64_t start_time, end_time, created_at, updated_at; /* 0 = unset */
    const char *settings_json;                            /* the settings object as JSON text */
    const char *idem_key;                                 /* may be NULL */
    uint8_t body_hash[16];
    size_t noptions;
    const tly_option_row_t *options;
} tly_poll_row_t;

typedef struct {
    const char *poll_id, *voter_id, *vote_id, *receipt;
    uint8_t nchoices;
    const uint8_t *choices; /* option positions */
    const uint8_t *scores;  /* NULL unless a score poll */
    int64_t recorded_at;
    const char *idem_key;   /* may be NULL */
    uint8_t body_hash[16];
    const char *client_meta; /* JSON text or NULL; stored, never trusted */
    /* When request_id is set (a `Prefer: respond-async` vote) a row in vote_requests is
     * written in the same transaction: state "completed" with vote_id, or "failed" with
     * error "ALREADY_VOTED" when the ballot hits UNIQUE(poll_id, voter_id). */
    const char *request_id;
} tly_ballot_row_t;

typedef struct {
    const char *request_id, *poll_id, *voter_id;
    const char *state;    /* "pending" | "completed" | "failed" */
    const char *vote_id;  /* may be NULL */
    const char *error;    /* error code or NULL */
    int64_t created_at;
} tly_request_row_t;

typedef enum {
    TLY_OP_USER_INSERT,  /* u.user; TLY_EEXIST when the username (case-insensitive) exists */
    TLY_OP_POLL_INSERT,  /* u.poll; TLY_EEXIST when the poll_id exists */
    TLY_OP_POLL_UPDATE,  /* u.poll: replaces the poll row and its options */
    TLY_OP_POLL_DELETE,  /* u.poll.poll_id: the poll, its options, ballots and requests */
    TLY_OP_BALLOT_INSERT /* u.ballot; TLY_EEXIST on UNIQUE(poll_id, voter_id) */
} tly_op_type_t;

typedef struct tly_store_op tly_store_op_t;
struct tly_store_op {
    tly_op_type_t type;
    /* Set by the store before done: 0, TLY_EEXIST (unique constraint; this operation
     * only), TLY_ENOTFOUND (a ballot, update or delete for a poll the store does not
     * have; this operation only), TLY_EINVAL (any other constraint; this operation only),
     * TLY_EIO (the batch did not commit: nothing of it is durable), TLY_EFULL (disk full:
     * nothing of the batch is durable; later batches may succeed). */
    int result;
    void (*done)(tly_store_op_t *op); /* runs in tly_store_reap */
    void *ctx;
    union {
        tly_user_row_t user;
        tly_poll_row_t poll;
        tly_ballot_row_t ballot;
    } u;
    tly_store_op_t *next; /* the store's; do not touch */
};

typedef struct {
    const char *data_dir;
    size_t batch_max;      /* most operations in one transaction (default 4096) */
    /* Called from the writer thread after a batch is done, so that the owning thread
     * wakes up and calls tly_store_reap. Must be thread-safe and must not block. */
    void (*notify)(void *arg);
    void *notify_arg;
} tly_store_conf_t;

/* Opens (creating if needed) the store in conf->data_dir (file tally.db), applies
 * migrations and starts the writer thread. Returns 0 or a negative TLY_E* code. */
int tly_store_open(const tly_store_conf_t *conf, tly_store_t **out);

typedef struct {
    void (*user)(void *ctx, const tly_user_row_t *u);
    void (*poll)(void *ctx, const tly_poll_row_t *p);
    void (*ballot)(void *ctx, const tly_ballot_row_t *b);
    void (*request)(void *ctx, const tly_request_row_t *r);
} tly_store_load_cb_t;

/* Reads everything back at start: users, then polls (with options), then ballots in
 * commit order, then vote requests. Rows passed to callbacks are valid only during
 * the call. Call before submitting anything. Returns 0 or TLY_EIO. */
int tly_store_load(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx);

/* Queues op for the writer. The caller keeps op and every string it points to alive and
 * unchanged until op->done runs. Any thread. */
void tly_store_submit(tly_store_t *s, tly_store_op_t *op);

/* Runs the done callbacks of finished operations, in submission order. Owning thread. */
void tly_store_reap(tly_store_t *s);

/* 1 while the store accepts writes; 0 after an unrecoverable I/O error (a failed fsync:
 * from then on every operation fails with TLY_EIO and nothing more is acknowledged). */
int tly_store_writable(tly_store_t *s);

/* Commits what is queued, stops the writer, runs remaining done callbacks and closes. */
void tly_store_close(tly_store_t *s);

/* Statistics for metrics: batches committed, operations, last batch size, last commit
 * (fsync) time in microseconds. */
typedef struct {
    uint64_t batches, ops, last_batch_size, last_commit_us;
} tly_store_stats_t;
void tly_store_stats(tly_store_t *s, tly_store_stats_t *out);

#endif
