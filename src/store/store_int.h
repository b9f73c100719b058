/*
 * store_int.h: what the store's own files and its unit tests share beyond store.h.
 * Nothing outside src/store/ and tests/unit/test_store.c includes this.
 */
#ifndef TALLY_STORE_INT_H
#define TALLY_STORE_INT_H

#include "store/store.h"

/* The schema version tly_store_open migrates to (PRAGMA user_version). */
#define TLY_STORE_SCHEMA_VERSION 3

/* Default most operations in one transaction when conf->batch_max is 0. */
#define TLY_STORE_BATCH_MAX 4096

/* A passive WAL checkpoint runs between batches once the WAL has grown by this much
 * since the last one. Overridable at build time so a test can make it run often. */
#ifndef TLY_STORE_CHECKPOINT_BYTES
#define TLY_STORE_CHECKPOINT_BYTES (64u << 20)
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

#endif
