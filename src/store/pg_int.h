/*
 * pg_int.h: what the PostgreSQL backend's files share (pg.c: open and the writer;
 * pg_schema.c: schema, migrations, connecting;
 * pg_feed.c: the change feed, the follower and reap; pg_read.c: load, readers and
 * generated ballots). Nothing outside src/store/pg*.c includes this.
 *
 * Threads and locks of one pg_store_t:
 *  - the owning thread: open, load, reap, sync, follow, close;
 *  - the writer thread: owns wconn, runs batches; `mu` guards the submission queue;
 *  - a connector thread, started by the writer while its connection is down, so that
 *    batches keep failing fast while a (possibly slow) connect is attempted;
 *  - the follower thread: owns fconn, reads the feed.
 *  `fmu` guards everything the writer, the follower and the owning thread share about
 *  delivery: the feed position, own batches waiting for their place, sync requests,
 *  the reap queue and the statistics. Nothing slow (no query, no JSON parse of a big
 *  row, no callback) runs under it.
 */
#ifndef TALLY_STORE_PG_INT_H
#define TALLY_STORE_PG_INT_H

#include "store/store_int.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/*
 * One unit of the delivery order, in one of three lists:
 *  - own batches in submission order (pend_*), each with the feed seq its COMMIT wrote
 *    (seq 0: the batch wrote no feed row: it failed or changed nothing), until its
 *    place comes;
 *  - sync requests waiting for their target (sync_*);
 *  - the reap queue (rq_*): what the owning thread runs next, strictly in order.
 */
enum { PG_ITEM_OPS, PG_ITEM_FEED, PG_ITEM_SYNC };

typedef struct pg_item pg_item_t;
struct pg_item {
    pg_item_t *next;
    int kind;
    /* PG_ITEM_OPS: the batch's ops (chained through next), how many, its feed seq, the
     * token its feed row carries (0: none, or the batch failed), and whether its outcome
     * is still unknown (the follower must not pass a row with this token then). */
    tly_store_op_t *ops;
    uint64_t nops;
    int64_t seq, token;
    int committing, waited; /* waited: the follower stopped at its row */
    /* PG_ITEM_FEED: a row another instance (or an earlier run of this one) committed:
     * the parsed `ops` array. */
    json_t *feed;
    /* PG_ITEM_SYNC: cb(arg) once the feed up to `target` is queued (target < 0: not read
     * yet) and the `sub` ops submitted before the sync are queued too; `seq` is then the
     * last feed seq queued before it. */
    void (*cb)(void *arg);
    void *arg;
    uint64_t sub;
    int64_t target;
};

typedef struct pg_store {
    tly_store_t base; /* first: see store_int.h */
    tly_store_conf_t conf;
    char *url, *origin;

    /* Submission queue (mu/cv), unbounded for the reason sqlite.c gives. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    tly_store_op_t *head, *tail;
    uint64_t submitted; /* ops ever submitted */
    int stopping;

    /* The writer's connection and its reconnection (connector fields under mu). */
    PGconn *wconn;
    pthread_t writer, connector;
    int writer_started, connecting; /* connecting: 0 idle, 1 running, 2 done */
    PGconn *connected;              /* the connector's result */
    int64_t retry_at_us, backoff_ms, last_retention_us, last_ping_us;
    atomic_int wdown;  /* the writer has no connection */
    atomic_int behind; /* the follower fell behind the feed's retention: latched */
    int64_t run;       /* random, per open: the high half of this run's batch tokens */
    uint32_t batches;  /* the writer's: batches sent, the low half of the next token */

    /* Delivery (fmu/fcv). */
    pthread_mutex_t fmu;
    pthread_cond_t fcv;
    int64_t next_seq; /* every feed seq below it is queued for reap (or skipped) */
    int following;    /* the follower may read (set by load, or the first submit/sync) */
    int poked, fstopping;
    pg_item_t *pend_head, *pend_tail;
    pg_item_t *sync_head, *sync_tail;
    pg_item_t *rq_head, *rq_tail;
    uint64_t released; /* ops of own batches moved to the reap queue */
    tly_store_stats_t stats;

    PGconn *fconn; /* the follower's */
    pthread_t follower;
    int follower_started;

    /* The owning thread's. */
    void (*follow_cb)(void *ctx, const tly_store_op_t *op);
    void *follow_ctx;
    int locks_ready;
    int64_t applied; /* every feed row up to this seq has been through reap */
} pg_store_t;

/* ---- pg.c ---- */
int64_t pg_now_us(void);
/* Connects to s->url (blocking, connect_timeout 5 s) and sets the session up; NULL on
 * failure (logged, without the password). `role` names the connection in logs. */
PGconn *pg_connect(const pg_store_t *s, const char *role);
/* Logs a failed query or connection: our message, SQLSTATE and libpq's text. */
void pg_log_error(const char *msg, PGconn *c, const PGresult *res);
/* Runs sql without parameters; 0 when its status is `want`, else logs and TLY_EIO. */
int pg_exec(PGconn *c, const char *sql, ExecStatusType want);
/* The connection is gone (broken socket, terminated backend). */
int pg_conn_lost(PGconn *c);
/* Applies the migrations the database lacks, under an advisory lock (instances starting
 * together migrate once). 0 or TLY_EIO. */
int pg_migrate(PGconn *c);

/* ---- pg_stmt.c ---- */
/* Prepares the writer's statements on c ("ballots", "cast", "feed", ... : see there) and
 * makes its plans generic. 0 or TLY_EIO (logged). */
int pg_prepare_writer(PGconn *c);

/* ---- pg_feed.c ---- */
void *pg_follower_main(void *arg);
/* JSON of one submitted op as the feed (and the writer's statements) carry it; NULL with
 * *rc = TLY_EINVAL (a string that is not UTF-8) or TLY_ENOMEM. */
json_t *pg_op_json(const tly_store_op_t *op, int *rc);
/* The JSON of an async ballot's failed request (TLY_OP_REQUEST in the feed). */
json_t *pg_request_json(const tly_ballot_row_t *b);
/* Writer: the batch is about to run the statement that commits it, with feed token
 * `token`; returns the item that stands for it in the delivery order (allocation
 * retried: never fails). Until pg_feed_batch_done, the follower stops at a row with
 * that token. */
pg_item_t *pg_feed_sending(pg_store_t *s, tly_store_op_t *first, uint64_t nops, int64_t token);
/* Writer: the batch is over. item is the one pg_feed_sending returned (NULL when the
 * batch never reached that point); committed says whether it committed, and seq is its
 * feed row (0: it changed nothing). Records stats, queues what may be queued and
 * notifies. */
void pg_feed_batch_done(pg_store_t *s, pg_item_t *item, tly_store_op_t *first, uint64_t nops, int committed,
                        int64_t seq, uint64_t commit_us);
/* The follower reads from `seq` on (load; or the position at open). */
void pg_feed_start(pg_store_t *s, int64_t next_seq, int from_load);
void pg_feed_wake(pg_store_t *s);
/* Close: move everything still waiting to the reap queue, in order. */
void pg_feed_flush(pg_store_t *s);
void pg_reap(pg_store_t *s);
void pg_sync(pg_store_t *s, void (*cb)(void *arg), void *arg);
void pg_free_items(pg_item_t *it);

/* ---- pg_read.c ---- */
int pg_load(pg_store_t *s, const tly_store_load_cb_t *cb, void *ctx);
tly_store_reader_t *pg_reader_open(pg_store_t *s);
void pg_reader_close(tly_store_reader_t *r);
int pg_audit_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                  void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx);
int pg_ballots_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                    void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx);
int pg_generate_ballots(pg_store_t *s, const char *poll_id, size_t noptions, size_t n);

/* Hex (bytea's text output "\x..." or a feed field) into out; returns the number of
 * bytes, or -1 when malformed or longer than cap. */
int pg_unhex(const char *hex, uint8_t *out, size_t cap);

/* A reader (pg_read.c): its own connection, blocking calls; also reconcile's. */
typedef struct {
    tly_store_reader_t base; /* first: see store_int.h */
    PGconn *c;
} pg_reader_t;

#endif
