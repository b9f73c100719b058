/*
 * core_int.h: what the files of src/core share and nobody else sees.
 *
 * Include this first in every .c file of src/core: it routes uthash's own allocations (bucket
 * tables) through tly_malloc before <uthash.h> is seen, so allocation-failure tests
 * cover them too. uthash's reaction to a failed table allocation stays its default
 * (the process exits): a dedup map that silently lost an entry would admit a second
 * ballot from the same voter, which is worse than stopping.
 */
#ifndef TALLY_CORE_INT_H
#define TALLY_CORE_INT_H

#include "base/base.h"

#include <stdatomic.h>

#define uthash_malloc(sz) tly_malloc(sz)
#define uthash_free(ptr, sz) tly_free(ptr)
/* A failed table allocation leaves the item out of the table (its hh.tbl is NULL)
 * instead of exiting: the caller sees it and refuses the operation (503). Nothing is
 * lost silently, so a dedup map can never admit a second ballot by it. */
#define HASH_NONFATAL_OOM 1

#include "core/core.h"

#define CORE_STR_(x) #x
#define CORE_STR(x) CORE_STR_(x)

/* Where a validation error goes: the caller's out-parameters and scratch buffer. */
typedef struct {
    const char **field;
    const char **msg;
    char *buf;
    size_t len;
} core_err_t;

/* Records a validation error (static strings) and returns TLY_EINVAL. */
int core_fail(core_err_t *e, const char *field, const char *msg);
/* Same, with the field written as "<array>[<idx>]<suffix>" into e->buf (falls back to
 * `array` when there is no room). */
int core_fail_at(core_err_t *e, const char *array, size_t idx, const char *suffix, const char *msg);
/* Records an allocation failure: field and message NULL, returns TLY_ENOMEM. */
int core_oom(core_err_t *e);

/* Adds (+1) or removes (-1) a vote's contribution to p's per-option counters, score
 * sums, ranked pairs and rankings, and timelines (at v->recorded_at); not total_votes
 * nor votes_last_minute. */
void core_count_vote(tly_poll_t *p, tly_vote_t *v, int dir);

/* Allocates p->ranked_pairs (replacing any) and counts every committed ballot of p in
 * it, O(ballots * ranking length^2); from then on core_count_vote keeps it. 0 or
 * TLY_ENOMEM (p unchanged). */
int core_ranked_pairs_build(tly_poll_t *p);

/* ---- ranked.c: the rankings of a ranked poll, for the instant-runoff count ---- */

/* CHUNK_ROWS rows of `stride` bytes each: a ranking's length (0: the row is empty),
 * then its option indexes. Shared by the table and its snapshots, never written while
 * more than one holds it. */
typedef struct core_chunk {
    _Atomic size_t refs;
    uint8_t rows[];
} core_chunk_t;

/* Rankings: rows 0..rows-1 of the chunks, `stride` bytes each (1 + the longest ranking
 * a row holds); cells is the sum of the lengths of the rows in use (what a count walks). */
typedef struct {
    core_chunk_t **chunks;
    size_t nchunks, rows, stride, cells;
} core_rankings_t;

typedef struct core_ranked core_ranked_t;

/* Builds p->ranked from p's committed ballots (replacing any), O(total ranking length);
 * from then on core_count_vote keeps it. 0 or TLY_ENOMEM (p->ranked is then NULL). */
int core_ranked_build(tly_poll_t *p);
/* Adds (dir > 0) or removes v's ranking to or from p->ranked, when p keeps one; sets or
 * clears v->ranked_row. Out of memory drops the table (see ranked.c): never fails. */
void core_ranked_count(tly_poll_t *p, tly_vote_t *v, int dir);
/* Frees p->ranked (the poll goes, or its options changed); snapshots stay valid. */
void core_ranked_drop(tly_poll_t *p);
/* p's rankings as they are (loop thread, valid until p changes), NULL when not kept. */
const core_rankings_t *core_ranked_rankings(const tly_poll_t *p);
/* A snapshot of p's rankings into *out, O(rows / chunk): readable on any thread until
 * core_rankings_release, whatever p does meanwhile. 0, or TLY_ENOMEM (also when p keeps
 * no table) with *out empty. Loop thread. */
int core_rankings_snapshot(const tly_poll_t *p, core_rankings_t *out);
/* Releases a snapshot. Any thread. */
void core_rankings_release(core_rankings_t *r);
/* Row `row` (< r->rows) of r. */
const uint8_t *core_rankings_row(const core_rankings_t *r, size_t row);

/* Results change: the rendering is stale (results_dirty) and results_gen moves on. */
static inline void core_results_changed(tly_poll_t *p)
{
    p->results_dirty = true;
    p->results_gen++;
}

/* The options v counts for (those core_count_vote adds to: chosen; ranked: the first;
 * score: scored above 0), as indexes into out (room for TLY_MAX_OPTIONS); returns how
 * many. */
size_t core_counted_options(const tly_poll_t *p, const tly_vote_t *v, uint8_t *out);
/* Adds (dir > 0) or removes one ballot counting for options idx[0..n) at time t to or
 * from each of p's timelines. Never fails (see the invariant in core.h). */
void core_timeline_count(tly_poll_t *p, int64_t t, const uint8_t *idx, size_t n, int dir);
/* Empties p's timelines and frees their buckets (options changed, or the poll goes). */
void core_timeline_reset(tly_poll_t *p);
/* Counts one ballot cast or changed at t in votes_last_minute. */
void core_activity_add(tly_poll_t *p, int64_t t);

/* One entry of a poll's address set (tly_poll_t.ip_votes). */
struct tly_ip_vote {
    UT_hash_handle hh; /* keyed by hash */
    uint8_t hash[TLY_IP_HASH_LEN];
    tly_vote_t *vote;
};

/* A vote's ballot as first cast (tly_vote_t.cast): choices then scores, as in the vote. */
struct tly_vote_cast {
    int64_t recorded_at;
    uint8_t nchoices;
    uint8_t data[];
};

/* Frees p's address set (the poll goes). */
void core_ip_votes_clear(tly_poll_t *p);

/* The registry's receipt map (the registry is opaque outside registry.c). */
tly_vote_t **core_registry_receipts(tly_registry_t *r);

/* The choices and scores stored in a vote. */
static inline const uint8_t *core_vote_choices(const tly_vote_t *v) { return v->data; }
static inline const uint8_t *core_vote_scores(const tly_vote_t *v) { return v->data + v->nchoices; }

#endif
