/*
 * ranked.c: the rankings of a ranked poll's committed ballots, kept in one table so that
 * the instant-runoff count can run on another thread than the loop's, from a snapshot.
 *
 * The table is rows of `stride` bytes (the ranking's length, then its option indexes),
 * CHUNK_ROWS rows to a chunk; a row holds the longest ranking the poll accepts
 * (settings.max_choices, or a longer one the poll already has), so a poll of 100 options
 * ranked 3 deep takes 4 bytes a ballot, not 101. A ballot takes a row when it is counted and
 * gives it back when uncounted (retracted, or changed: the new ranking then takes the
 * same row back); rows given back are used again first, so the table never holds more
 * rows than the poll once had ballots standing at the same time. A ranking naming an
 * option the poll does not have, or none at all, takes no row: the count leaves such a
 * ballot out anyway. A ranking longer than a row (the poll's settings changed while it had
 * no ballot) drops the table, which the next count builds again with longer rows.
 *
 * Snapshots: a count elsewhere reads the chunks of one moment, each chunk holding a
 * reference count. The loop never writes a chunk a snapshot still holds: it copies the
 * chunk first (copy on write) and writes the copy. So taking a snapshot costs
 * O(rows / CHUNK_ROWS), and each chunk is copied at most once per snapshot, when a
 * ballot in it is first counted or uncounted after the snapshot was taken.
 *
 * Out of memory: a row, a chunk or a copy that cannot be allocated drops the whole table
 * (the ballots stay counted everywhere else); the next count builds it again from the
 * ballots. So the table is exact or absent, and counting a ballot never fails.
 *
 * Threads: the table is the loop thread's (like the poll); a snapshot may be read and
 * released on any thread.
 */
#include "core/core_int.h"

#include <string.h>

#define CHUNK_ROWS 256

struct core_ranked {
    core_rankings_t r;
    size_t chunk_cap;   /* room in r.chunks */
    uint32_t *free_row; /* rows given back, used again first (a stack) */
    size_t nfree, free_cap;
};

static core_chunk_t *chunk_new(size_t stride)
{
    core_chunk_t *c = tly_malloc(sizeof(*c) + CHUNK_ROWS * stride);
    if (c != NULL)
        atomic_init(&c->refs, 1);
    return c;
}

/* Drops one reference; the last one frees the chunk. Any thread. */
static void chunk_release(core_chunk_t *c)
{
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
        tly_free(c);
}

void core_ranked_drop(tly_poll_t *p)
{
    core_ranked_t *t = p->ranked;
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->r.nchunks; i++)
        chunk_release(t->r.chunks[i]);
    tly_free(t->r.chunks);
    tly_free(t->free_row);
    tly_free(t);
    p->ranked = NULL;
}

/* Row `row` of t, made writable: a chunk a snapshot also holds is copied first. NULL when
 * that copy cannot be allocated. */
static uint8_t *writable_row(core_ranked_t *t, size_t row)
{
    core_chunk_t **slot = &t->r.chunks[row / CHUNK_ROWS];
    /* acquire: a snapshot released on another thread finished reading before we write */
    if (atomic_load_explicit(&(*slot)->refs, memory_order_acquire) > 1) {
        core_chunk_t *copy = chunk_new(t->r.stride);
        if (copy == NULL)
            return NULL;
        memcpy(copy->rows, (*slot)->rows, CHUNK_ROWS * t->r.stride);
        chunk_release(*slot);
        *slot = copy;
    }
    return (*slot)->rows + (row % CHUNK_ROWS) * t->r.stride;
}

/* A row for a new ranking: one given back, or the next one (a new chunk every
 * CHUNK_ROWS rows). SIZE_MAX when out of memory. */
static size_t take_row(core_ranked_t *t)
{
    if (t->nfree > 0)
        return t->free_row[--t->nfree];
    size_t row = t->r.rows;
    if (row >= UINT32_MAX - 1) /* votes keep row + 1 in 32 bits */
        return SIZE_MAX;
    if (row % CHUNK_ROWS == 0) {
        if (t->r.nchunks == t->chunk_cap) {
            size_t cap = t->chunk_cap ? 2 * t->chunk_cap : 8;
            core_chunk_t **chunks = tly_realloc(t->r.chunks, cap * sizeof(*chunks));
            if (chunks == NULL)
                return SIZE_MAX;
            t->r.chunks = chunks;
            t->chunk_cap = cap;
        }
        core_chunk_t *c = chunk_new(t->r.stride);
        if (c == NULL)
            return SIZE_MAX;
        t->r.chunks[t->r.nchunks++] = c;
    }
    t->r.rows++;
    return row;
}

/* Adds v's ranking to t; false when out of memory (t is then to be dropped). */
static bool add_row(core_ranked_t *t, size_t noptions, tly_vote_t *v)
{
    const uint8_t *c = core_vote_choices(v);
    size_t k = v->nchoices;
    v->ranked_row = 0;
    if (k == 0)
        return true;
    for (size_t i = 0; i < k; i++)
        if (c[i] >= noptions)
            return true; /* left out of the count */
    if (k >= t->r.stride)
        return false; /* longer than a row: built again with longer rows */
    size_t row = take_row(t);
    uint8_t *r = row != SIZE_MAX ? writable_row(t, row) : NULL;
    if (r == NULL)
        return false;
    r[0] = (uint8_t)k;
    memcpy(r + 1, c, k);
    t->r.cells += k;
    v->ranked_row = (uint32_t)row + 1;
    return true;
}

/* Takes v's ranking out of t; false when out of memory (t is then to be dropped). */
static bool remove_row(core_ranked_t *t, tly_vote_t *v)
{
    if (v->ranked_row == 0)
        return true;
    size_t row = v->ranked_row - 1;
    v->ranked_row = 0;
    uint8_t *r = writable_row(t, row);
    if (r == NULL)
        return false;
    t->r.cells -= r[0];
    r[0] = 0; /* an empty row: the count skips it */
    if (t->nfree == t->free_cap) {
        size_t cap = t->free_cap ? 2 * t->free_cap : 64;
        uint32_t *rows = tly_realloc(t->free_row, cap * sizeof(*rows));
        if (rows == NULL)
            return true; /* the row stays empty for good: exact still, one row larger */
        t->free_row = rows;
        t->free_cap = cap;
    }
    t->free_row[t->nfree++] = (uint32_t)row;
    return true;
}

int core_ranked_build(tly_poll_t *p)
{
    core_ranked_drop(p);
    core_ranked_t *t = tly_calloc(1, sizeof(*t));
    if (t == NULL)
        return TLY_ENOMEM;
    size_t longest = p->settings.max_choices > 0 ? (size_t)p->settings.max_choices : 1;
    for (const tly_vote_t *v = p->votes; v != NULL; v = v->hh.next)
        if (v->state == TLY_VOTE_COMMITTED && v->nchoices > longest)
            longest = v->nchoices;
    t->r.stride = 1 + longest;
    p->ranked = t;
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next) {
        v->ranked_row = 0;
        if (v->state == TLY_VOTE_COMMITTED && !add_row(t, p->noptions, v)) {
            core_ranked_drop(p);
            return TLY_ENOMEM;
        }
    }
    return 0;
}

void core_ranked_count(tly_poll_t *p, tly_vote_t *v, int dir)
{
    if (p->ranked == NULL)
        return; /* built from the ballots by the next count */
    bool ok = dir > 0 ? add_row(p->ranked, p->noptions, v) : remove_row(p->ranked, v);
    if (!ok)
        core_ranked_drop(p);
}

const core_rankings_t *core_ranked_rankings(const tly_poll_t *p) { return p->ranked ? &p->ranked->r : NULL; }

int core_rankings_snapshot(const tly_poll_t *p, core_rankings_t *out)
{
    memset(out, 0, sizeof(*out));
    const core_ranked_t *t = p->ranked;
    if (t == NULL)
        return TLY_ENOMEM; /* the caller builds the table first */
    out->chunks = tly_malloc((t->r.nchunks ? t->r.nchunks : 1) * sizeof(*out->chunks));
    if (out->chunks == NULL)
        return TLY_ENOMEM;
    for (size_t i = 0; i < t->r.nchunks; i++) {
        out->chunks[i] = t->r.chunks[i];
        atomic_fetch_add_explicit(&out->chunks[i]->refs, 1, memory_order_relaxed);
    }
    out->nchunks = t->r.nchunks;
    out->rows = t->r.rows;
    out->stride = t->r.stride;
    out->cells = t->r.cells;
    return 0;
}

void core_rankings_release(core_rankings_t *r)
{
    for (size_t i = 0; i < r->nchunks; i++)
        chunk_release(r->chunks[i]);
    tly_free(r->chunks);
    memset(r, 0, sizeof(*r));
}

const uint8_t *core_rankings_row(const core_rankings_t *r, size_t row)
{
    return r->chunks[row / CHUNK_ROWS]->rows + (row % CHUNK_ROWS) * r->stride;
}
