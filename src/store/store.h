/*
 * store: the durable truth. Every write goes through one writer thread that commits
 * operations in batches (group commit): many operations, one transaction, one fsync.
 * An operation's `done` callback runs only after its batch has committed (or failed),
 * so a caller acknowledges a ballot only when it is durable.
 *
 * Two implementations behind this one interface, chosen by tly_store_conf_t.url: SQLite
 * (sqlite.c, the default: a file in data_dir, WAL mode, synchronous=FULL) and PostgreSQL
 * (pg.c, url "postgres://..." or "postgresql://..."), which many tally instances may share.
 * store.c dispatches. Both version their schema and migrate it on open.
 *
 * Sharing (PostgreSQL): every committed batch also appends one row to a change feed whose
 * order is the commit order across all instances. Each instance follows the feed and gets
 * what the others committed through tly_store_follow's callback, in that order, in
 * tly_store_reap, interleaved with its own done callbacks at their batches' places. So the
 * in-memory state of every instance is the same fold of the same sequence of changes.
 *
 * Threads: tly_store_open, tly_store_load, tly_store_reap and tly_store_close are
 * called from the owning (event-loop) thread; tly_store_submit from any thread. `done`
 * callbacks run on the thread that calls tly_store_reap. The writer thread touches
 * nothing but the operation it was given, and only between submit and done. A reader
 * (tly_store_reader_t, for paged exports) belongs to the one thread using it.
 *
 * History: every ballot cast, changed or revoked is an event of the poll's append-only
 * audit log, committed with the change itself. The ballots table holds the current
 * ballots (the truth that load replays); the audit log says how they got there. In
 * SQLite a ballot row is its own "cast" event until it is retracted (migration 6).
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
    /* The final results as JSON text, written once the poll is closed; NULL = none.
     * POLL_INSERT stores it as given; POLL_UPDATE stores it only while the poll has
     * none (a closed poll's final results are final: an update never clears or
     * replaces them); load returns it. The store never parses it. */
    const char *final_results;
    /* POLL_UPDATE in a shared store (tly_store_shared) only: freeze != 0 makes the
     * update the poll's freeze, whose final_results were computed from this instance's
     * state at feed position freeze_after (tly_store_applied_seq). It is written only if
     * the poll has no final results yet (else TLY_EEXIST: the stored ones reach this
     * instance through the follow callback) and no change to the poll committed after
     * freeze_after (else TLY_ESTATE: follow, compute again, retry). Ballot statements in
     * flight commit before it; from its commit on, the store refuses the poll's ballot
     * inserts, changes and retractions with TLY_ESTATE, so every ballot the store took
     * is in the final results. Other stores ignore both fields. */
    int freeze;
    int64_t freeze_after;
    /* The poll's join code (TLY_JOIN_CODE_LEN characters of TLY_JOIN_CODE_ALPHABET), or
     * NULL: none. Unique among the polls that have one: POLL_INSERT and POLL_UPDATE give
     * TLY_EEXIST when another poll holds it. The store never keeps a code on a closed
     * poll: POLL_UPDATE of a poll that is closed (status, or final results stored or
     * given) writes NULL whatever is given, which frees the code for another poll. Load
     * returns it. */
    const char *join_code;
} tly_poll_row_t;

typedef struct {
    const char *poll_id, *voter_id, *vote_id, *receipt;
    uint8_t nchoices;
    const uint8_t *choices; /* option positions */
    const uint8_t *scores;  /* NULL unless a score poll */
    int64_t recorded_at;
    const char *idem_key; /* may be NULL */
    uint8_t body_hash[16];
    const char *client_meta; /* JSON text or NULL; stored, never trusted */
    /* When request_id is set (a `Prefer: respond-async` vote) a row in vote_requests is
     * written in the same transaction: state "completed" with vote_id, or "failed" with
     * error "ALREADY_VOTED" when the ballot hits UNIQUE(poll_id, voter_id) (or the
     * address rule below). */
    const char *request_id;
    /* NULL, or the 16-byte keyed hash of the client address the ballot was cast from
     * (settings.voter_check "ip" / "token+ip"; never a raw address). BALLOT_INSERT
     * stores it; within a poll no two ballots share one (TLY_EEXIST, like a second
     * ballot of a voter); BALLOT_REPLACE keeps it; BALLOT_DELETE removes it with the
     * row, freeing the address. Load returns it; ballot pages (exports) do not (NULL). */
    const uint8_t *ip_hash;
    /* The ballot's place in the store's commit order: set by BALLOT_INSERT and by load,
     * named by BALLOT_REPLACE and BALLOT_DELETE (SQLite; PostgreSQL finds the ballot by
     * poll and voter and ignores it). 0 = not known. */
    int64_t seq;
} tly_ballot_row_t;

typedef struct {
    const char *request_id, *poll_id, *voter_id;
    const char *state;   /* "pending" | "completed" | "failed" */
    const char *vote_id; /* may be NULL */
    const char *error;   /* error code or NULL */
    int64_t created_at;
} tly_request_row_t;

/* One row of the audit log. seq is the log's own order (commit order, ascending). */
typedef struct {
    int64_t seq;
    const char *poll_id, *voter_id;
    const char *event;      /* "cast" | "changed" | "revoked" */
    uint8_t nchoices;       /* 0 for "revoked" */
    const uint8_t *choices; /* the ballot after the event (option positions); NULL for
                               "revoked" and whenever nchoices is 0 */
    const uint8_t *scores;  /* NULL unless a score ballot */
    int64_t at;             /* ms since the epoch: the ballot's recorded_at for "cast"
                               and "changed", the time of retraction for "revoked" */
} tly_audit_row_t;

/*
 * Linking a device to an account (TLY_OP_DEVICE_LINK): an anonymous device token
 * (voter id "anon_...") used to register or log in becomes one person with the account.
 * From the link on, the device's id is the account's everywhere; what the device held
 * becomes the account's in the same transaction as the link row.
 */
typedef enum {
    TLY_LINK_GONE = 0,         /* the device has no ballot there (any more): nothing done */
    TLY_LINK_MOVED = 1,        /* the device's ballot is the account's now (its voter_id rewritten) */
    TLY_LINK_KEPT_DEVICE = 2,  /* both had one; the device's, cast first, is the account's now and the
                               account's was retracted (an audit "revoked" row under the account) */
    TLY_LINK_KEPT_ACCOUNT = 3, /* both had one; the account's was cast first and stays; the device's
                              was retracted (an audit "revoked" row under the device) */
    TLY_LINK_KEPT_BOTH = 4,    /* both had one and the poll takes no more changes (closed, or its final
                                 results stored): both stay as they are, the device's under its id */
} tly_link_outcome_t;          /* the numbers are PostgreSQL's link_ballots' too */

/* A poll in which the device holds a ballot. */
typedef struct {
    const char *poll_id;
    /* The device's ballot and the account's in the poll (0: the account has none), as
     * BALLOT_INSERT or load gave them: SQLite finds the rows by them; PostgreSQL finds
     * them by poll and voter and ignores both. */
    int64_t device_seq, user_seq;
    int closed;  /* the poll takes no more changes: two ballots stay as they are */
    int outcome; /* tly_link_outcome_t; set by the store before done */
} tly_link_ballot_t;

typedef struct {
    const char *device_id, *user_id;
    int64_t at; /* ms: the link's time, and its retractions' */
    /* Every poll in which the caller's memory holds a committed ballot of the device (a
     * store has no index by voter to find them; one process's memory, or with a shared
     * store memory at feed position `after`, has them all). */
    size_t nballots;
    tly_link_ballot_t *ballots;
    /* Shared store: the feed position the list was made at (tly_store_applied_seq).
     * The store refuses the link with TLY_ESTATE when a change committed after it names
     * the device or the account as a voter, or links either: the caller catches up
     * (tly_store_sync) and offers the link again with a new list. */
    int64_t after;
    /* Set by the store before done, whatever the result: the polls the device owned,
     * now the account's (found by owner, so a poll whose creation committed just before
     * the link is among them). One block from tly_malloc, the array and then the ids;
     * the caller frees it with tly_free (NULL when none). */
    char **polls_moved;
    size_t npolls_moved;
} tly_link_row_t;

/* A device link as load returns it. */
typedef struct {
    const char *device_id, *user_id;
    int64_t linked_at;
} tly_device_link_row_t;

typedef enum {
    /* Feed only: a vote request's row (tly_store_follow; never submitted). */
    TLY_OP_REQUEST = -1,
    TLY_OP_USER_INSERT, /* u.user; TLY_EEXIST when the username (case-insensitive) exists */
    TLY_OP_POLL_INSERT, /* u.poll; TLY_EEXIST when the poll_id exists */
    TLY_OP_POLL_UPDATE, /* u.poll: replaces the poll row (final_results included) and its
                           options, all but owner_id (only TLY_OP_DEVICE_LINK changes a
                           poll's owner, and an update queued behind a link must not undo
                           it); TLY_ENOTFOUND when the poll_id does not exist */
    /* u.poll.poll_id: the poll, its options, ballots, requests and its audit rows. A
     * deleted poll is gone entirely: its owner deleted it, and an audit log of a poll
     * nobody can see any more would only be personal data kept without a purpose. */
    TLY_OP_POLL_DELETE,
    /* u.ballot; TLY_EEXIST on a second ballot of the voter in the poll (or a reused
     * vote_id/receipt, or an ip_hash another ballot of the poll holds). PostgreSQL checks
     * the voter and the ids with unique indexes (instances share it); SQLite only the
     * address (its one writer process and that process's memory keep one ballot a voter:
     * migration 6). Sets u.ballot.seq (before done) to the ballot's place in the store.
     * The ballot is its own audit "cast" event (its choices and scores, at =
     * recorded_at): audit pages show it; a duplicate writes nothing. */
    TLY_OP_BALLOT_INSERT,
    /* u.ballot: poll_id, voter_id, seq (what BALLOT_INSERT or load gave; SQLite finds
     * the row by it), nchoices, choices, scores (NULL unless a score poll),
     * recorded_at = the time of the change, idem_key and body_hash of the change request
     * (NULL / all zero when none). Replaces the voter's current ballot in that poll:
     * choices, scores, recorded_at, idem_key and body_hash take the new values (the row
     * describes the request that produced its content); vote_id, receipt, client_meta
     * and the ballot's seq (its place in load order and in ballot pages) are kept.
     * The first replace of a ballot also keeps the ballot as it was cast (its choices,
     * scores and recorded_at before that replace) beside it, and later ones leave that
     * copy alone: load gives it back for a ballot with an idem_key (the `cast`
     * callback), whose POST, retried, must get its first answer again. It goes with the
     * ballot row (a retraction, the poll's delete).
     * Appends an audit "changed" row with the new ballot, in the same savepoint.
     * TLY_ENOTFOUND when the voter has no ballot in the poll (or the poll does not
     * exist). vote_id, receipt, client_meta and request_id are ignored. */
    TLY_OP_BALLOT_REPLACE,
    /* u.ballot: poll_id, voter_id, seq (as for BALLOT_REPLACE), recorded_at = the time
     * of the retraction, idem_key and
     * body_hash of the request that cast the ballot (NULL / all zero when none). Deletes
     * the voter's ballot in that poll and appends an audit "revoked" row (no choices; the
     * key and hash, which load gives back: tly_retracted_row_t), in one savepoint; the
     * voter may then cast again (a new ballot, new seq). TLY_ENOTFOUND when the voter has
     * no ballot in the poll. Every other field is ignored. */
    TLY_OP_BALLOT_DELETE,
    /* u.link: the row device_links(device_id, user_id, linked_at), and in the same
     * savepoint what the device held becomes the account's: for each of u.link.ballots
     * the outcome of tly_link_outcome_t, the earlier ballot standing where both voted
     * (cast time, then seq); the polls it owned (u.link.polls_moved). TLY_EEXIST when the
     * device is linked already (to any account; nothing changes), TLY_ESTATE (shared
     * store: u.link.after). A shared store from then on refuses what another instance,
     * not yet knowing the link, writes under the device's id: BALLOT_INSERT and
     * POLL_INSERT with TLY_EAUTH (the caller catches up and acts as the account), and
     * changes or retractions of the device's ballots find none (TLY_ENOTFOUND). */
    TLY_OP_DEVICE_LINK,
} tly_op_type_t;

typedef struct tly_store_op tly_store_op_t;
struct tly_store_op {
    tly_op_type_t type;
    /* Set by the store before done: 0, TLY_EEXIST (unique constraint; this operation
     * only), TLY_ENOTFOUND (a ballot, update or delete for a poll the store does not
     * have; this operation only), TLY_EINVAL (any other constraint; this operation only),
     * TLY_EIO (the batch did not commit: nothing of it is durable), TLY_EFULL (disk full:
     * nothing of the batch is durable; later batches may succeed), TLY_ESTATE (a
     * ballot insert, replace or delete for a poll whose final results a shared store
     * holds, or a freeze that came too late: tly_poll_row_t.freeze; this operation
     * only), TLY_EAUTH (a shared store: a ballot or poll insert under the id of a device
     * linked to an account, TLY_OP_DEVICE_LINK; this operation only). */
    int result;
    void (*done)(tly_store_op_t *op); /* runs in tly_store_reap */
    void *ctx;
    union {
        tly_user_row_t user;
        tly_poll_row_t poll;
        tly_ballot_row_t ballot;
        tly_request_row_t request; /* TLY_OP_REQUEST (feed only) */
        tly_link_row_t link;       /* TLY_OP_DEVICE_LINK */
    } u;
    tly_store_op_t *next; /* the store's; do not touch */
};

typedef struct {
    /* NULL or "" for SQLite in data_dir; "postgres://..." / "postgresql://..." (a libpq
     * connection URI) for PostgreSQL. */
    const char *url;
    const char *data_dir;
    /* This instance's name in the change feed (PostgreSQL): unique among the instances
     * sharing the store while they run, at most 63 bytes. */
    const char *origin;
    size_t batch_max; /* most operations in one transaction (default 4096) */
    /* Called from the writer thread after a batch is done, so that the owning thread
     * wakes up and calls tly_store_reap. Must be thread-safe and must not block. */
    void (*notify)(void *arg);
    void *notify_arg;
} tly_store_conf_t;

/* One process per data directory: creates data_dir (mode 0700, like mkdir -p) and takes
 * an exclusive flock on data_dir/lock, writing this process's PID into it. *fd gets the
 * descriptor that holds the lock until it is closed. Returns 0; TLY_ESTATE when another
 * process holds it (logged with that process's PID); TLY_EIO otherwise (logged). Both
 * stores take it at open (tly_store_open); any thread. */
int tly_store_lock_dir(const char *data_dir, int *fd);

/* Opens (creating if needed) the store in conf->data_dir (file tally.db), applies
 * migrations and starts the writer thread. Returns 0 or a negative TLY_E* code. */
int tly_store_open(const tly_store_conf_t *conf, tly_store_t **out);

/* A retracted ballot's Idempotency-Key (from its audit "revoked" row): a late retry of
 * the request that cast it must not cast it again. */
typedef struct {
    const char *poll_id;
    const char *voter_id;
    const char *idem_key;
    uint8_t body_hash[16];
    int64_t at; /* the retraction's time, ms since the epoch */
} tly_retracted_row_t;

/*
 * What load hands rows to. Each callback takes the row into memory and returns 0; or
 * TLY_EINVAL with *why set (a static string) when the row does not fit what memory
 * already holds (a second ballot of one voter in a poll, settings memory cannot read):
 * the store then treats the row as a bad row, below; or another negative TLY_E* code
 * (TLY_ENOMEM), which ends the load with that code. A NULL callback takes its rows
 * without looking at them.
 */
typedef struct {
    int (*user)(void *ctx, const tly_user_row_t *u, const char **why);
    int (*link)(void *ctx, const tly_device_link_row_t *l, const char **why);
    int (*poll)(void *ctx, const tly_poll_row_t *p, const char **why);
    int (*ballot)(void *ctx, const tly_ballot_row_t *b, const char **why);
    int (*request)(void *ctx, const tly_request_row_t *r, const char **why);
    int (*retracted)(void *ctx, const tly_retracted_row_t *r, const char **why);
    int64_t retracted_since; /* keys of ballots retracted before this time (ms) are not read */
    /* Each changed ballot that has an idem_key, as it was first cast (BALLOT_REPLACE
     * keeps it): poll_id, voter_id, nchoices, choices, scores (NULL unless a score
     * ballot) and recorded_at (the cast's); every other field NULL or zero. After
     * every ballot; a cast of a ballot left out is not handed over. */
    int (*cast)(void *ctx, const tly_ballot_row_t *b, const char **why);
    /* 0: a bad row fails the load (TLY_EINVAL) once every row has been read; 1: a bad
     * row is left out (logged at warn level with its table and key) and the load goes
     * on. Either way nothing is written: a row left out is still in the store. */
    int skip_bad_rows;
    /* SQLite: 0 runs PRAGMA quick_check over the whole file beside the load (on a
     * thread of its own, so that it costs the start little wall-clock time), and any
     * problem it reports fails the load (TLY_EIO, the report logged); 1 skips it.
     * PostgreSQL checks its own pages: ignored. */
    int skip_quick_check;
} tly_store_load_cb_t;

/*
 * Reads everything back at start: users, then device links, then polls (with options),
 * then ballots in commit order, then vote requests, then the keys of retracted ballots
 * (in retraction order), then the first casts of changed ballots (any order). Rows
 * passed to callbacks are valid only during the call. Call before submitting anything.
 *
 * Load verifies what it hands over. A bad row is one that does not decode (a NULL where
 * a value is required, a hash that is not 16 bytes, scores of another length than the
 * choices, option positions that do not run 0..n-1, a state that is not one of the
 * three) or does not fit what it refers to (a ballot of a poll that was not handed
 * over, a choice outside its poll's options or named twice), or one a callback refused.
 * Each is logged with its table, its key (ballots: seq, poll_id and voter_id) and the
 * reason: at error level (the first 100 of a load; the rest are counted), or at warn
 * level when skip_bad_rows leaves it out. Ballots of a poll left out are bad rows too.
 *
 * Returns the number of bad rows left out (0 unless skip_bad_rows), TLY_EINVAL (bad
 * rows and not skip_bad_rows: memory holds what the callbacks took, and the caller
 * must not serve from it), TLY_EIO (the store could not be read, or quick_check
 * reported a problem) or TLY_ENOMEM.
 */
int tly_store_load(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx);

/* Queues op for the writer. The caller keeps op and every string it points to alive and
 * unchanged until op->done runs. Any thread. */
void tly_store_submit(tly_store_t *s, tly_store_op_t *op);

/* Holds the calling thread's submissions from now on: tly_store_submit queues them here
 * and tly_store_release hands them to the writer as one list, one lock and one wake-up
 * for all of them. The event loop releases at the end of each turn, so the ballots of
 * one turn's requests go out together: a writer woken by the first would commit it
 * alone and keep the rest waiting for that commit. Other threads' submissions are not
 * held. tly_store_close releases what is held. Owning thread. */
void tly_store_hold(tly_store_t *s);
void tly_store_release(tly_store_t *s);

/* Runs the done callbacks of finished operations, in submission order. Owning thread. */
void tly_store_reap(tly_store_t *s);

/* 1 while the store accepts writes. SQLite: 0 after an unrecoverable I/O error (a failed
 * fsync: from then on every operation fails with TLY_EIO and nothing more is
 * acknowledged). PostgreSQL: 0 while the server cannot be reached (operations fail with
 * TLY_EIO, nothing is acknowledged); 1 again once the writer has reconnected. */
int tly_store_writable(tly_store_t *s);

/*
 * Sharing a store between instances. Changes other instances committed are passed to cb
 * in tly_store_reap, one operation at a time, in commit order: TLY_OP_USER_INSERT,
 * POLL_INSERT, POLL_UPDATE, POLL_DELETE, BALLOT_INSERT (with request_id when the vote was
 * async), BALLOT_REPLACE, BALLOT_DELETE, DEVICE_LINK (with the outcomes its store set),
 * and TLY_OP_REQUEST (a request that failed, e.g. ALREADY_VOTED). op->result is 0 and op->done NULL; op and its rows
 * are valid only during the call. A ballot row carries what this store's load gives (ip_hash included). Set it before
 * the first reap. SQLite is never shared: cb is never called. Owning thread.
 */
void tly_store_follow(tly_store_t *s, void (*cb)(void *ctx, const tly_store_op_t *op), void *ctx);

/* 1 when other instances may write to this store (PostgreSQL), 0 for SQLite. */
int tly_store_shared(tly_store_t *s);

/*
 * Calls cb(arg) in a later tly_store_reap, once every change that other instances had
 * committed when this was called has been passed to the follow callback (and every own
 * batch submitted before has run its done callbacks). For a request that met a fact
 * memory did not know yet (a ballot insert refused as a duplicate, a poll not found):
 * after cb, memory knows it. If the store cannot be read (PostgreSQL down) cb still runs,
 * once the attempt has failed. SQLite (never shared): cb runs before this returns, so
 * callers that may meet either store must not hold state cb changes. Owning thread.
 */
void tly_store_sync(tly_store_t *s, void (*cb)(void *arg), void *arg);

/* The feed position this instance has applied: every change other instances committed
 * up to this feed seq has been passed to the follow callback, and every own batch up to
 * it has run its done callbacks (read it in a sync callback for a position memory is
 * known to be at). 0 for SQLite. Owning thread. */
int64_t tly_store_applied_seq(tly_store_t *s);

/* The feed has advanced (a message from another instance on the bus): follow it now
 * rather than at the next periodic read. Any thread; a no-op for SQLite. */
void tly_store_poke(tly_store_t *s);

/* Commits what is queued, stops the writer, runs remaining done callbacks and closes. */
void tly_store_close(tly_store_t *s);

/*
 * Test hook, never for production: tests/crash/fsync.test.mjs sets it through
 * TALLY_FAULT_FSYNC_AFTER=n, which main.c reads at start. Installs as SQLite's default a
 * VFS that passes everything to the real one, except that the n-th fsync (n >= 1,
 * counted over the database and WAL files of every connection of the process from this
 * call on) is not done and fails as an EIO from fsync(2) does (SQLITE_IOERR_FSYNC).
 * Later fsyncs succeed again, as they may on Linux once a failure has been reported:
 * the store must not be fooled by that. Call before tly_store_open; a later call
 * re-arms it (the count starts afresh). Returns 0, TLY_EINVAL when n < 1, or TLY_EIO
 * when SQLite has no default VFS to wrap. Owning thread.
 */
int tly_store_fault_fsync(long n);

/*
 * Paged reads for owner-only exports (the ballots of a poll, its audit log).
 *
 * A reader is its own read-only SQLite connection with its statements prepared once.
 * In WAL mode a reader never blocks the writer and the writer never blocks a reader, so
 * an export does not slow down voting. A reader belongs to one thread at a time: the
 * event-loop thread may keep one for small pages, an export worker thread its own; it
 * may be handed from one thread to another between calls, but never used by two at
 * once. Open and close readers while the store is open (close them before
 * tly_store_close). Memory: a reader holds SQLite's page cache for its connection
 * (SQLite's default, about 2 MiB at most) and nothing per page.
 *
 * Returns the reader or NULL (out of memory, or the database cannot be opened); the
 * caller owns it. Any thread (the thread that will use it, preferably).
 */
typedef struct tly_store_reader tly_store_reader_t;
tly_store_reader_t *tly_store_reader_open(tly_store_t *s);

/* Closes the reader. NULL is a no-op. The thread that owns it. */
void tly_store_reader_close(tly_store_reader_t *r);

/*
 * Calls cb for the audit rows of poll_id with seq > after_seq, in seq order, at most
 * `limit` of them, and returns how many it passed (0 = no more rows), or TLY_EIO /
 * TLY_ENOMEM. Start with after_seq = 0 and pass the last row's seq to get the next page.
 *
 * Each page is one consistent snapshot, read through the (poll_id, seq) index: no
 * OFFSET, so a page costs O(limit) however far into the log it is, and walking a whole
 * log is O(n) in time and constant in memory (rows are handed over, not collected).
 * Across pages the walk is not a snapshot: rows committed meanwhile are seen if their
 * seq is beyond the cursor. Cost measured here on a 1.1-million-ballot store: about
 * 15 us per page plus 0.4-0.6 us per row, so a page of 20 rows is a few tens of
 * microseconds and one of 1,000 about half a millisecond. The event-loop thread may
 * serve small pages itself, and may stream an export in pages of a few hundred between
 * other work; a reader on a worker thread takes even that off the loop.
 *
 * Rows (and every pointer in them) are valid only during the call to cb; cb must not
 * use this reader. The thread that owns the reader.
 */
int tly_store_audit_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                         void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx);

/*
 * Calls cb for the current ballots of poll_id with seq > after_seq, in seq order (seq
 * passed beside the row; request_id is NULL), at most `limit` of them, and returns how
 * many it passed (0 = no more), or TLY_EIO / TLY_ENOMEM. Same paging, cost, snapshot
 * and lifetime rules as tly_store_audit_page. A changed ballot keeps its seq, so a walk
 * sees each ballot present throughout it exactly once (with whatever content it had
 * when its page was read). The thread that owns the reader.
 */
int tly_store_ballots_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                           void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx);

/*
 * Reconciliation: the counters a shared store keeps beside the ballots against the
 * ballots themselves.
 *
 * PostgreSQL keeps counter rows (option_counts: per poll and option position, the current
 * ballots whose choices include it; poll_counts: per poll, its current ballots), moved in
 * the same statement as every ballot change, so they should never drift; this finds out
 * whether they did (a bug, a hand edit, a restore) and puts them right. One drift is one
 * counter whose stored value is not the true count: `position` is an option position, or
 * -1 for the poll's ballot count; a missing row counts as stored 0.
 */
typedef struct {
    const char *poll_id;
    int position; /* -1: the poll's ballots */
    int64_t stored, actual;
} tly_store_drift_t;

/*
 * Counts the current ballots of every poll (in total and per option position) in one
 * consistent read, compares each counter with its true count and, when `repair`,
 * corrects those that differ in the same transaction. Then, counter by counter, calls
 * drift(ctx, d) for each that differed, and actual(ctx, poll_id, position, count) for
 * every true count of every existing poll: polls in bytewise (strcmp) poll_id order,
 * each with position -1 (its ballots) first and then its option positions in order; so
 * a caller can check other copies of the counters (Redis's live counters) against
 * them. Either callback may be NULL; both run only once the transaction has committed,
 * and their pointers are valid only during the call.
 *
 * A repair moves a counter by the difference it found (actual - stored) rather than
 * setting the count, so a ballot another instance commits meanwhile (and counts in the
 * same row) is neither lost nor counted twice. A poll's option positions are those of its
 * options plus any that have a counter row; a missing row of an existing poll's option
 * is created on repair (even at 0, since the writer only moves rows that exist).
 *
 * Instances sharing the store never reconcile at the same time: an advisory lock is
 * taken for the transaction, and while another holds it this returns TLY_ESTATE having
 * done nothing. Otherwise returns the number of drifts found (0: none), or TLY_EIO
 * (nothing repaired, nothing called). It reads every ballot (a scan of the whole table,
 * in set-based SQL): run it on a thread that may block, never the event-loop thread.
 *
 * SQLite keeps no counter rows (the counts live in memory, rebuilt from the ballots at
 * every load), so there is nothing to drift: returns 0 without calling either callback.
 * The thread that owns the reader.
 */
int tly_store_reconcile(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                        void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx);

/*
 * For tests and benchmarks only, never while serving: writes n generated ballots for
 * poll_id (voters "gen<i>", one choice each, spread over the first noptions options,
 * no scores) and their audit "cast" rows, committing every 10,000, through a connection
 * of its own, i.e. beside the writer rather than through it. The in-memory state of a
 * running server does not see them until the next load. Returns 0, TLY_EINVAL
 * (noptions not in 1..256), TLY_ENOTFOUND (no such poll), TLY_EEXIST (generated ids
 * already there, e.g. a second call for the same poll: nothing of the failing 10,000
 * is written) or TLY_EIO. Owning thread.
 */
int tly_store_generate_ballots(tly_store_t *s, const char *poll_id, size_t noptions, size_t n);

/* Statistics for metrics: batches committed and failed, operations, the last batch's
 * size and commit (fsync) time, operations queued and not yet taken by the writer, and
 * histograms (counts per bucket, not cumulative) of batch sizes and commit times in
 * microseconds with the bounds below (a last, implicit bucket holds the rest). */
#define TLY_STORE_HIST 12
extern const uint64_t tly_store_batch_bounds[TLY_STORE_HIST];
extern const uint64_t tly_store_commit_us_bounds[TLY_STORE_HIST];
typedef struct {
    uint64_t batches, failed_batches, ops, last_batch_size, last_commit_us, queued;
    uint64_t batch_hist[TLY_STORE_HIST + 1], commit_hist[TLY_STORE_HIST + 1];
    uint64_t batch_sum, commit_us_sum;
    /* SQLite: checkpoints run, the bytes of WAL commits appended, and those committed
     * but not yet copied back into the database file (what runs behind the durability
     * point). 0 elsewhere. */
    uint64_t checkpoints, wal_bytes, checkpoint_backlog_bytes;
} tly_store_stats_t;
void tly_store_stats(tly_store_t *s, tly_store_stats_t *out);

#endif
