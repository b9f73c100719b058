/*
 * timeline.c: per-option counts in tumbling windows of 10 s, 1 min and 1 h, and the
 * sliding minute behind votes_last_minute. Both are kept up to date as ballots are
 * counted, retracted and changed (vote.c calls in here), so reading them never walks
 * the ballots. The invariant they keep is written in core.h.
 *
 * Each resolution is a ring of buckets sorted by start, holding only windows that had
 * a ballot. Ballots arrive nearly in time order (the loop commits them as they come,
 * the store replays them in commit order), so a ballot's bucket is almost always the
 * newest one or a new one after it: both O(1). Anything else (a slow commit, a vote
 * changed and replayed at load, a retraction) finds its bucket by binary search, and a
 * new bucket in the middle moves the newer ones up one slot. Dropping the oldest bucket
 * at the bound only moves the ring's head.
 */
#include "core/core_int.h"

#include <string.h>

typedef struct {
    int64_t size; /* ms */
    uint32_t max; /* buckets kept */
    const char *name;
} resolution_t;

static const resolution_t resolutions[TLY_TIMELINE_RESOLUTIONS] = {
    {TLY_TIMELINE_10S, TLY_TIMELINE_MAX_10S, "10s"},
    {TLY_TIMELINE_1M, TLY_TIMELINE_MAX_1M, "1m"},
    {TLY_TIMELINE_1H, TLY_TIMELINE_MAX_1H, "1h"},
};

/* The first allocation: most polls see ballots in a handful of windows. */
#define FIRST_CAP 8

/* A bucket; `stride` bytes apart in the ring (8-byte aligned, so start is too). */
typedef struct {
    int64_t start;
    uint32_t counts[];
} bucket_t;

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static size_t stride_for(uint32_t noptions)
{
    return (sizeof(int64_t) + (size_t)noptions * sizeof(uint32_t) + 7) & ~(size_t)7;
}

/* The i-th bucket in start order. */
static bucket_t *bucket_at(const tly_timeline_t *tl, size_t stride, uint32_t i)
{
    return (bucket_t *)(void *)(tl->buckets + (size_t)((tl->head + i) % tl->cap) * stride);
}

/* The position of the first bucket starting at or after `start` (count if none). */
static uint32_t lower_bound(const tly_timeline_t *tl, size_t stride, int64_t start)
{
    if (tl->count == 0 || bucket_at(tl, stride, tl->count - 1)->start < start)
        return tl->count; /* the common case: a new window after the newest */
    uint32_t lo = 0, hi = tl->count - 1;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (bucket_at(tl, stride, mid)->start < start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Doubles the ring (up to the bound), unrolled from its head. */
static int grow(tly_timeline_t *tl, size_t stride, uint32_t max)
{
    if (tl->cap >= max)
        return TLY_EFULL;
    uint32_t cap = tl->cap == 0 ? FIRST_CAP : tl->cap > max / 2 ? max : tl->cap * 2;
    if (cap > max)
        cap = max;
    uint8_t *buckets = tly_malloc((size_t)cap * stride);
    if (buckets == NULL)
        return TLY_ENOMEM;
    for (uint32_t i = 0; i < tl->count; i++)
        memcpy(buckets + (size_t)i * stride, bucket_at(tl, stride, i), stride);
    tly_free(tl->buckets);
    tl->buckets = buckets;
    tl->cap = cap;
    tl->head = 0;
    return 0;
}

static void apply(bucket_t *b, uint32_t noptions, const uint8_t *idx, size_t n, int dir)
{
    for (size_t i = 0; i < n; i++) {
        if (idx[i] >= noptions)
            continue;
        uint32_t *c = &b->counts[idx[i]];
        if (dir > 0) {
            if (*c < UINT32_MAX)
                (*c)++;
        } else if (*c > 0) {
            (*c)--;
        }
    }
}

static void timeline_count(tly_timeline_t *tl, const resolution_t *res, int64_t t, const uint8_t *idx, size_t n,
                           int dir)
{
    int64_t start = floor_div(t, res->size) * res->size;
    if (start < tl->floor)
        return; /* a dropped range: it no longer changes */
    size_t stride = stride_for(tl->noptions);
    uint32_t pos = lower_bound(tl, stride, start);
    bucket_t *b;
    if (pos < tl->count && (b = bucket_at(tl, stride, pos))->start == start) {
        apply(b, tl->noptions, idx, n, dir);
        return;
    }
    if (dir < 0)
        return; /* never counted here: only possible if the invariant was already broken */
    if (tl->count == tl->cap && grow(tl, stride, res->max) != 0) {
        /*
         * At the bound, or out of memory: make room by dropping the oldest bucket, and
         * raise the floor past it so that the ballots it held, when retracted or
         * changed later, leave the buckets still kept exact. A ballot older than every
         * bucket kept is itself the one to drop.
         */
        if (tl->count == 0) {
            tl->floor = start + res->size;
            return;
        }
        bucket_t *oldest = bucket_at(tl, stride, 0);
        if (start < oldest->start) {
            tl->floor = start + res->size;
            return;
        }
        tl->floor = oldest->start + res->size;
        tl->head = (tl->head + 1) % tl->cap;
        tl->count--;
        pos--; /* start > oldest->start, so pos was at least 1 */
    }
    for (uint32_t i = tl->count; i > pos; i--)
        memcpy(bucket_at(tl, stride, i), bucket_at(tl, stride, i - 1), stride);
    b = bucket_at(tl, stride, pos);
    memset(b, 0, stride);
    b->start = start;
    tl->count++;
    apply(b, tl->noptions, idx, n, dir);
}

void core_timeline_count(tly_poll_t *p, int64_t t, const uint8_t *idx, size_t n, int dir)
{
    if (n == 0)
        return; /* a ballot counting for no option (a score ballot of zeros) takes no bucket */
    for (size_t r = 0; r < TLY_TIMELINE_RESOLUTIONS; r++) {
        tly_timeline_t *tl = &p->timeline[r];
        if (tl->noptions != p->noptions) {
            /* laid out for other options (replaced while no ballot existed): start over */
            tly_free(tl->buckets);
            memset(tl, 0, sizeof(*tl));
            tl->noptions = (uint32_t)p->noptions;
        }
        timeline_count(tl, &resolutions[r], t, idx, n, dir);
    }
}

void core_timeline_reset(tly_poll_t *p)
{
    for (size_t r = 0; r < TLY_TIMELINE_RESOLUTIONS; r++) {
        tly_free(p->timeline[r].buckets);
        memset(&p->timeline[r], 0, sizeof(p->timeline[r]));
    }
}

int64_t tly_timeline_bucket_ms(const char *name)
{
    for (size_t r = 0; name != NULL && r < TLY_TIMELINE_RESOLUTIONS; r++)
        if (strcmp(name, resolutions[r].name) == 0)
            return resolutions[r].size;
    return 0;
}

static bool bucket_empty(const bucket_t *b, uint32_t noptions)
{
    for (uint32_t i = 0; i < noptions; i++)
        if (b->counts[i] != 0)
            return false;
    return true;
}

static json_t *bucket_json(const tly_poll_t *p, const bucket_t *b, uint32_t noptions)
{
    char start[TLY_TIME_LEN];
    tly_time_format(b->start, start);
    json_t *counts = json_object();
    for (uint32_t i = 0; counts != NULL && i < noptions; i++)
        if (b->counts[i] != 0 &&
            json_object_set_new(counts, p->options[i].option_id, json_integer((json_int_t)b->counts[i])) != 0) {
            json_decref(counts);
            counts = NULL;
        }
    return counts == NULL ? NULL : json_pack("{s:s, s:o}", "start", start, "counts", counts);
}

json_t *tly_timeline_json(const tly_poll_t *p, int64_t bucket_ms, int64_t from, int64_t to)
{
    size_t r = 0;
    while (r < TLY_TIMELINE_RESOLUTIONS && resolutions[r].size != bucket_ms)
        r++;
    if (r == TLY_TIMELINE_RESOLUTIONS)
        return NULL;
    const tly_timeline_t *tl = &p->timeline[r];
    json_t *items = json_array();
    json_t *o = json_pack("{s:s, s:o}", "bucket", resolutions[r].name, "items", items);
    if (o == NULL)
        return NULL;
    if (tl->floor > 0) {
        char at[TLY_TIME_LEN];
        tly_time_format(tl->floor, at);
        if (json_object_set_new(o, "available_from", json_string(at)) != 0)
            goto fail;
    }
    if (tl->buckets == NULL || tl->noptions != p->noptions)
        return o;
    size_t stride = stride_for(tl->noptions), listed = 0;
    for (uint32_t i = lower_bound(tl, stride, from); i < tl->count; i++) {
        const bucket_t *b = bucket_at(tl, stride, i);
        if (b->start >= to)
            break;
        if (bucket_empty(b, tl->noptions))
            continue; /* every ballot in it was retracted or changed away */
        if (listed == TLY_TIMELINE_MAX_ITEMS) {
            if (json_object_set_new(o, "truncated", json_true()) != 0)
                goto fail;
            break;
        }
        if (json_array_append_new(items, bucket_json(p, b, tl->noptions)) != 0)
            goto fail;
        listed++;
    }
    return o;
fail:
    json_decref(o);
    return NULL;
}

/* ---- votes_last_minute ---- */

static size_t slot_of(int64_t second)
{
    int64_t m = second % 60;
    return (size_t)(m < 0 ? m + 60 : m);
}

void core_activity_add(tly_poll_t *p, int64_t t)
{
    tly_activity_t *a = &p->activity;
    int64_t second = floor_div(t, 1000);
    size_t i = slot_of(second);
    if (a->second[i] == second) {
        if (a->count[i] < UINT32_MAX)
            a->count[i]++;
    } else if (a->second[i] < second) {
        a->second[i] = second; /* the slot's old second is a minute or more behind */
        a->count[i] = 1;
    }
    /* else: a minute or more older than an event already seen, so outside every window
     * read from now on (now does not go back) */
}

uint64_t tly_poll_votes_last_minute(const tly_poll_t *p, int64_t now)
{
    const tly_activity_t *a = &p->activity;
    int64_t second = floor_div(now, 1000);
    uint64_t n = 0;
    for (size_t i = 0; i < 60; i++)
        if (a->second[i] > second - 60 && a->second[i] <= second)
            n += a->count[i];
    return n;
}
