/*
 * store_int.h: what the store's own files and its unit tests share beyond store.h.
 * Nothing outside src/store/ and tests/unit/test_store.c includes this.
 */
#ifndef TALLY_STORE_INT_H
#define TALLY_STORE_INT_H

#include <pthread.h>

#include "store/store.h"

/*
 * A backend: the functions store.c dispatches to. Every backend's store and reader
 * structs begin with a tly_store_t / tly_store_reader_t (their `be`), so a pointer to
 * one is a pointer to the other.
 */
typedef struct tly_store_backend {
    const char *name; /* "sqlite", "postgres" */
    int (*open)(const tly_store_conf_t *conf, tly_store_t **out);
    int (*load)(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx);
    void (*submit_list)(tly_store_t *s, tly_store_op_t *first);
    void (*reap)(tly_store_t *s);
    int (*writable)(tly_store_t *s);
    void (*follow)(tly_store_t *s, void (*cb)(void *ctx, const tly_store_op_t *op), void *ctx);
    int (*shared)(tly_store_t *s);
    void (*sync)(tly_store_t *s, void (*cb)(void *arg), void *arg);
    int64_t (*applied_seq)(tly_store_t *s);
    void (*poke)(tly_store_t *s);
    void (*close)(tly_store_t *s);
    tly_store_reader_t *(*reader_open)(tly_store_t *s);
    void (*reader_close)(tly_store_reader_t *r);
    int (*audit_page)(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                      void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx);
    int (*ballots_page)(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                        void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx);
    int (*generate_ballots)(tly_store_t *s, const char *poll_id, size_t noptions, size_t n);
    void (*stats)(tly_store_t *s, tly_store_stats_t *out);
    /* tly_store_reconcile; NULL: nothing to reconcile (returns 0). */
    int (*reconcile)(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                     void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx);
} tly_store_backend_t;

struct tly_store {
    const tly_store_backend_t *be;
    /* tly_store_hold: operations the holding thread submitted since the last release */
    tly_store_op_t *held_head, *held_tail;
    pthread_t holder;
    int holding;
    int lock_fd; /* DATA_DIR/lock held for a PostgreSQL store (SQLite's keeps its own); -1: none */
};
struct tly_store_reader {
    const tly_store_backend_t *be;
};

extern const tly_store_backend_t tly_store_sqlite; /* sqlite.c */
extern const tly_store_backend_t tly_store_pg;     /* pg.c */

/* For histograms: the index of the bucket of v among bounds (TLY_STORE_HIST of them). */
int tly_store_hist_bucket(const uint64_t *bounds, uint64_t v);

/* How a backend stops one of its threads (writer, follower): sets *stop under mu, wakes
 * the thread waiting on cv, and joins t if started is set. The thread finishes what is
 * queued before it returns. Owning thread, at close. */
void tly_store_stop_thread(pthread_mutex_t *mu, pthread_cond_t *cv, int *stop, pthread_t t, int started);

/*
 * Load (load.c): the checks every backend's load makes and the rule for a bad row
 * (tly_store_load in store.h). A backend decodes each row and passes it to the
 * tly_load_* function of its table, which checks it, hands it to its callback and
 * deals with a bad one; a row it cannot decode it passes to tly_load_bad itself. Each
 * returns 0 (go on: the row was taken, or was bad and is counted and logged) or a
 * negative code that ends the load (TLY_ENOMEM). The thread that runs the load.
 */
typedef struct tly_load {
    const tly_store_load_cb_t *cb;
    void *ctx;
    struct load_poll *polls; /* every poll seen, by poll_id (load.c's) */
    size_t bad;              /* bad rows so far */
} tly_load_t;

void tly_load_init(tly_load_t *l, const tly_store_load_cb_t *cb, void *ctx);
int tly_load_user(tly_load_t *l, const tly_user_row_t *u);
int tly_load_link(tly_load_t *l, const tly_device_link_row_t *d);
int tly_load_poll(tly_load_t *l, const tly_poll_row_t *p);
int tly_load_ballot(tly_load_t *l, const tly_ballot_row_t *b, int64_t seq);
int tly_load_request(tly_load_t *l, const tly_request_row_t *r);
int tly_load_retracted(tly_load_t *l, const tly_retracted_row_t *r, int64_t seq); /* seq: the audit row's */
int tly_load_cast(tly_load_t *l, const tly_ballot_row_t *b, int64_t seq);         /* seq: the ballot's */
/* A row of `table` that does not decode: key names it (tly_load_key), why says what is
 * wrong. Logs it (store.h says at which level) and counts it. Returns 0. */
int tly_load_bad(tly_load_t *l, const char *table, const char *key, const char *why);
/* Writes a row's key for the log, "name=value name=value" from NULL-terminated pairs
 * (a NULL value reads NULL); bytes a log line should not carry are escaped \xNN and a
 * long value is cut, so that the key of a corrupt row is still one readable line. */
#define TLY_LOAD_KEY_MAX 320
void tly_load_key(char buf[TLY_LOAD_KEY_MAX], const char *name, const char *value, ...) __attribute__((sentinel));
/* Ends the load: frees what l holds and returns what tly_store_load returns, given
 * rc, the load's own result so far (0 or a negative code, which wins). */
int tly_load_finish(tly_load_t *l, int rc);

/* The schema version sqlite_schema.c migrates to (PRAGMA user_version). */
#define TLY_STORE_SCHEMA_VERSION 8

/* Default most operations in one transaction when conf->batch_max is 0. */
#define TLY_STORE_BATCH_MAX 4096

/* The checkpointer thread copies the WAL back once this much was appended since what
 * it copied last (sqlite.c, ckpt_main). Overridable at build time so a test can make it
 * run often. */
#ifndef TLY_STORE_CHECKPOINT_BYTES
#define TLY_STORE_CHECKPOINT_BYTES (16u << 20)
#endif

/*
 * Queues a NULL-terminated chain of operations (linked through op->next) as one
 * unit: they are adjacent in the queue, so when the writer is idle and the chain is no
 * longer than batch_max they are committed in the same batch. Same ownership rules as
 * tly_store_submit. Any thread. Used by the tests to put two ballots in one batch.
 */
void tly_store_submit_list(tly_store_t *s, tly_store_op_t *first);

/* The SQL of the two page reads (?1 poll_id, ?2 after_seq, ?3 limit), so that a test can
 * check with EXPLAIN QUERY PLAN that they search the (poll_id, seq) indexes rather than
 * scan or sort: that is what keeps a whole-poll export O(n). */
extern const char tly_store_audit_page_sql[];
extern const char tly_store_ballots_page_sql[];
/* The same two reads of the PostgreSQL backend ($1 poll_id, $2 after_seq, $3 limit), for
 * an EXPLAIN of their plans in its tests (pg_read.c). */
extern const char tly_store_pg_audit_page_sql[];
extern const char tly_store_pg_ballots_page_sql[];

/* The backends' tly_store_reconcile (pg_reconcile.c; sqlite_read.c). */
int tly_store_pg_reconcile(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                           void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx);
int tly_store_sqlite_reconcile(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                               void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx);
/* Its key for pg_try_advisory_xact_lock, so that a test can hold it. */
#define TLY_STORE_PG_RECONCILE_LOCK "499850701946"

#endif
