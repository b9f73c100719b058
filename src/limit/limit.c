/*
 * limit.c: GCRA buckets in an open-addressing hash table with an LRU list.
 *
 * Units. For a rule of capacity C and period P ms, a bucket's state is its "debt" d:
 * how far it is below full, in units where one token costs P and refill adds C per ms.
 * Full is d = 0, empty is d = C * P, and whole tokens left are (C * P - d) / P. Both the
 * cost of a token and the refill per ms are integers in these units, so the arithmetic
 * is exact whatever C and P are (10 per minute is 6000 ms a token; 7 per minute is
 * 8571.43 ms a token and still exact). A bucket stores the time its debt reaches zero,
 * tat (GCRA's "theoretical arrival time"), as whole ms plus a remainder in 1/C ms; then
 * d(now) = max(0, tat - now) * C, and "full" needs no rule at all, which is what lets
 * sweep and eviction judge buckets without knowing their rules.
 *
 * Table. Linear probing with backward-shift deletion (no tombstones, as buckets come and
 * go all the time), at most half full, power-of-two sized, doubled as needed and never
 * larger than twice max_keys rounded up to a power of two; never shrunk (its size is
 * bounded by max_keys, and shrinking would be an unbounded pause). A slot holds a
 * pointer; each bucket carries 32 bits of its hash, which both place it and filter
 * comparisons. Keys are stored as rule name, NUL, key: neither can contain a NUL, so no
 * two (rule, key) pairs share a stored key.
 */
#include "limit/limit.h"

#include "base/base.h"

#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

#define MAX_KEYS_LIMIT ((size_t)1 << 30)
#define MIN_TABLE 16
#define EVICT_SCAN 8 /* oldest buckets looked at for a full one before evicting the oldest */
#define DEBT_MAX ((uint64_t)1 << 62)

typedef struct bucket {
    struct bucket *older, *newer; /* LRU list */
    uint64_t tat_ms;              /* when the bucket is full again: tat_ms + tat_frac / C */
    uint32_t tat_frac;            /* < C */
    uint32_t hash;
    uint16_t keylen;
    char key[]; /* rule name, NUL, key; not NUL-terminated */
} bucket_t;

struct tly_limiter {
    bucket_t **slots;
    size_t mask; /* slots - 1 */
    size_t count;
    size_t max_keys;
    size_t sweep_pos;
    bucket_t *newest, *oldest;
    unsigned char seed[crypto_shorthash_KEYBYTES];
};

/* ---- LRU list ----------------------------------------------------------------- */

static void lru_unlink(tly_limiter_t *l, bucket_t *b)
{
    if (b->newer)
        b->newer->older = b->older;
    else
        l->newest = b->older;
    if (b->older)
        b->older->newer = b->newer;
    else
        l->oldest = b->newer;
    b->older = b->newer = NULL;
}

static void lru_push_newest(tly_limiter_t *l, bucket_t *b)
{
    b->older = l->newest;
    b->newer = NULL;
    if (l->newest)
        l->newest->newer = b;
    else
        l->oldest = b;
    l->newest = b;
}

/* ---- table -------------------------------------------------------------------- */

static uint32_t hash_key(const tly_limiter_t *l, const char *k, size_t len)
{
    unsigned char h[crypto_shorthash_BYTES];
    crypto_shorthash(h, (const unsigned char *)k, len, l->seed);
    uint32_t v;
    memcpy(&v, h, sizeof(v));
    return v;
}

/* The slot holding the key, or the empty slot where it would go. */
static size_t find_slot(const tly_limiter_t *l, const char *k, size_t len, uint32_t hash)
{
    size_t i = hash & l->mask;
    for (;;) {
        const bucket_t *b = l->slots[i];
        if (b == NULL || (b->hash == hash && b->keylen == len && memcmp(b->key, k, len) == 0))
            return i;
        i = (i + 1) & l->mask;
    }
}

static size_t slot_of(const tly_limiter_t *l, const bucket_t *b)
{
    size_t i = b->hash & l->mask;
    while (l->slots[i] != b)
        i = (i + 1) & l->mask;
    return i;
}

/* Empties slot i, moving later members of its cluster back so that every bucket stays
 * reachable from its home slot without tombstones. */
static void table_delete(tly_limiter_t *l, size_t i)
{
    size_t j = i;
    l->slots[i] = NULL;
    for (;;) {
        j = (j + 1) & l->mask;
        bucket_t *b = l->slots[j];
        if (b == NULL)
            return;
        size_t home = b->hash & l->mask;
        /* b may fill the hole at i unless its home lies cyclically in (i, j] */
        bool home_between = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!home_between) {
            l->slots[i] = b;
            l->slots[j] = NULL;
            i = j;
        }
    }
}

/* Makes room for one more bucket at most half full: 0 or TLY_ENOMEM. */
static int table_reserve(tly_limiter_t *l)
{
    size_t cap = l->mask + 1;
    if ((l->count + 1) * 2 <= cap)
        return 0;
    size_t ncap = cap * 2;
    bucket_t **ns = tly_calloc(ncap, sizeof(*ns));
    if (ns == NULL)
        return TLY_ENOMEM;
    for (size_t i = 0; i < cap; i++) {
        bucket_t *b = l->slots[i];
        if (b == NULL)
            continue;
        size_t j = b->hash & (ncap - 1);
        while (ns[j] != NULL)
            j = (j + 1) & (ncap - 1);
        ns[j] = b;
    }
    tly_free(l->slots);
    l->slots = ns;
    l->mask = ncap - 1;
    l->sweep_pos &= l->mask;
    return 0;
}

static void bucket_remove(tly_limiter_t *l, bucket_t *b, size_t slot)
{
    table_delete(l, slot);
    lru_unlink(l, b);
    l->count--;
    tly_free(b);
}

/* ---- buckets ------------------------------------------------------------------ */

static bool bucket_full(const bucket_t *b, uint64_t now)
{
    return b->tat_ms < now || (b->tat_ms == now && b->tat_frac == 0);
}

/* The bucket's debt at now, in the units above, at most C * P. A remainder or a distance
 * out of range can only come from a rule renamed onto another's buckets or from time
 * going backwards; clamping keeps the arithmetic in range and the answer strict. */
static uint64_t bucket_debt(const bucket_t *b, uint64_t now, uint64_t c, uint64_t p)
{
    if (bucket_full(b, now))
        return 0;
    uint64_t ms = b->tat_ms - now;
    if (ms >= p)
        return c * p;
    uint64_t frac = b->tat_frac < c ? b->tat_frac : c - 1;
    return ms * c + frac;
}

static void bucket_set_debt(bucket_t *b, uint64_t now, uint64_t debt, uint64_t c)
{
    b->tat_ms = now + debt / c;
    b->tat_frac = (uint32_t)(debt % c);
}

static uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/* Fills out for a bucket whose debt is `debt` after the decision. */
static void describe(tly_limit_result_t *out, bool allowed, uint64_t debt, uint64_t c, uint64_t p)
{
    uint64_t full = c * p;
    out->allowed = allowed;
    out->limit = (uint32_t)c;
    out->remaining = (uint32_t)((full - debt) / p);
    /* with a whole token left, the quota "resets" when the bucket is full again; with
     * none, what the client waits for is the next token */
    uint64_t next_token_debt = full - p; /* the largest debt that still holds one token */
    if (out->remaining > 0)
        out->reset_ms = div_up(debt, c);
    else
        out->reset_ms = div_up(debt - next_token_debt, c);
    out->retry_after_ms = allowed ? 0 : out->reset_ms;
}

static bool rule_valid(const tly_limit_rule_t *r)
{
    if (r == NULL || r->name == NULL || r->name[0] == '\0' || strlen(r->name) > TLY_LIMIT_NAME_MAX)
        return false;
    if (r->capacity == 0 || r->period_ms == 0 || r->period_ms > TLY_LIMIT_PERIOD_MAX)
        return false;
    return r->period_ms <= DEBT_MAX / r->capacity;
}

/* Evicts one bucket to make room: a full one among the EVICT_SCAN oldest if there is
 * one, else the oldest. */
static void evict_one(tly_limiter_t *l, uint64_t now)
{
    bucket_t *victim = l->oldest;
    bucket_t *b = l->oldest;
    if (victim == NULL) /* only called with count >= max_keys >= 1 */
        return;
    for (int n = 0; b != NULL && n < EVICT_SCAN; n++, b = b->newer) {
        if (bucket_full(b, now)) {
            victim = b;
            break;
        }
    }
    bucket_remove(l, victim, slot_of(l, victim));
}

/* ---- public ------------------------------------------------------------------- */

tly_limiter_t *tly_limiter_new(size_t max_keys)
{
    if (max_keys == 0 || max_keys > MAX_KEYS_LIMIT || sodium_init() < 0)
        return NULL;
    tly_limiter_t *l = tly_calloc(1, sizeof(*l));
    if (l == NULL)
        goto fail;
    l->slots = tly_calloc(MIN_TABLE, sizeof(*l->slots));
    if (l->slots == NULL)
        goto fail;
    l->mask = MIN_TABLE - 1;
    l->max_keys = max_keys;
    randombytes_buf(l->seed, sizeof(l->seed));
    return l;
fail:
    tly_free(l);
    return NULL;
}

void tly_limiter_free(tly_limiter_t *l)
{
    if (l == NULL)
        return;
    bucket_t *b = l->oldest;
    while (b != NULL) {
        bucket_t *next = b->newer;
        tly_free(b);
        b = next;
    }
    tly_free(l->slots);
    tly_free(l);
}

size_t tly_limiter_size(const tly_limiter_t *l) { return l->count; }

int tly_limit_take(tly_limiter_t *l, const tly_limit_rule_t *rule, const char *key, uint64_t now_ms,
                   tly_limit_result_t *out)
{
    size_t keylen = key != NULL ? strnlen(key, TLY_LIMIT_KEY_MAX + 1) : 0;
    if (!rule_valid(rule) || keylen == 0 || keylen > TLY_LIMIT_KEY_MAX) {
        *out = (tly_limit_result_t){.allowed = true};
        return TLY_EINVAL;
    }
    const uint64_t c = rule->capacity, p = rule->period_ms;

    char k[TLY_LIMIT_NAME_MAX + 1 + TLY_LIMIT_KEY_MAX];
    size_t namelen = strlen(rule->name);
    memcpy(k, rule->name, namelen);
    k[namelen] = '\0';
    memcpy(k + namelen + 1, key, keylen);
    size_t len = namelen + 1 + keylen;
    uint32_t hash = hash_key(l, k, len);

    size_t slot = find_slot(l, k, len, hash);
    bucket_t *b = l->slots[slot];
    if (b == NULL) {
        /* allocate before evicting, so that running out of memory never costs a bucket */
        size_t size = offsetof(bucket_t, key) + len;
        b = tly_malloc(size > sizeof(bucket_t) ? size : sizeof(bucket_t));
        if (b == NULL)
            goto fail;
        if (l->count >= l->max_keys)
            evict_one(l, now_ms);
        if (table_reserve(l) != 0) /* never at the bound: the table is already large enough */
            goto fail;
        memcpy(b->key, k, len);
        b->keylen = (uint16_t)len;
        b->hash = hash;
        b->tat_ms = now_ms;
        b->tat_frac = 0;
        /* eviction and growth move buckets: look for the hole again */
        l->slots[find_slot(l, k, len, hash)] = b;
        l->count++;
    } else {
        lru_unlink(l, b);
    }
    lru_push_newest(l, b);

    uint64_t debt = bucket_debt(b, now_ms, c, p);
    bool allowed = debt + p <= c * p;
    if (allowed) {
        debt += p;
        bucket_set_debt(b, now_ms, debt, c);
    }
    describe(out, allowed, debt, c, p);
    return 0;
fail:
    tly_free(b);
    describe(out, true, p, c, p); /* what a fresh bucket would say */
    return TLY_ENOMEM;
}

void tly_limiter_sweep(tly_limiter_t *l, uint64_t now_ms, size_t max_work)
{
    for (size_t work = 0; work < max_work && l->count > 0; work++) {
        size_t i = l->sweep_pos & l->mask;
        bucket_t *b = l->slots[i];
        if (b != NULL && bucket_full(b, now_ms))
            bucket_remove(l, b, i); /* slot i may now hold a shifted bucket: look again */
        else
            l->sweep_pos = (i + 1) & l->mask;
    }
}

/* Values from valid rules fit easily (seconds <= 10^9); the clamp is for a hand-made
 * result, so the text always fits its 16 bytes. */
static void format_u64(char out[TLY_LIMIT_HDR_LEN], uint64_t v)
{
    if (out != NULL)
        snprintf(out, TLY_LIMIT_HDR_LEN, "%" PRIu64, v < 999999999999999u ? v : 999999999999999u);
}

void tly_limit_headers(const tly_limit_result_t *r, char limit[TLY_LIMIT_HDR_LEN], char remaining[TLY_LIMIT_HDR_LEN],
                       char reset[TLY_LIMIT_HDR_LEN], char retry_after[TLY_LIMIT_HDR_LEN])
{
    format_u64(limit, r->limit);
    format_u64(remaining, r->remaining);
    format_u64(reset, div_up(r->reset_ms, 1000));
    if (retry_after != NULL) {
        if (r->allowed) {
            retry_after[0] = '\0';
        } else {
            uint64_t s = div_up(r->retry_after_ms, 1000);
            format_u64(retry_after, s > 0 ? s : 1);
        }
    }
}

/* ---- words for a wait ------------------------------------------------------------ */

void tly_limit_wait_words(uint64_t ms, char *out, size_t cap)
{
    uint64_t s = div_up(ms, 1000);
    if (s == 0)
        s = 1;
    if (s < 60) {
        snprintf(out, cap, "%" PRIu64 " second%s", s, s == 1 ? "" : "s");
        return;
    }
    uint64_t m = (s + 30) / 60; /* to the nearest minute */
    if (m < 60) {
        if (m == 1)
            snprintf(out, cap, "about a minute");
        else
            snprintf(out, cap, "about %" PRIu64 " minutes", m);
        return;
    }
    uint64_t h = (s + 1800) / 3600;
    if (h <= 1)
        snprintf(out, cap, "about an hour");
    else
        snprintf(out, cap, "about %" PRIu64 " hours", h);
}

/* ---- the proof of work's curve ------------------------------------------------------ */

/* The extra bits at `level`: the largest k with level^2 >= burst^2 * 2^k (level >=
 * burst * sqrt(2)^k), at most `extra`. level is clamped to TLY_POW_LEVEL_MAX and burst
 * to it too, so level^2 < 2^40 and burst^2 << 64 is never needed: k stops at extra <= 64
 * and at the first k whose threshold passes level^2. */
static uint32_t extra_bits(uint64_t level, uint64_t burst, uint32_t extra)
{
    if (level > TLY_POW_LEVEL_MAX)
        level = TLY_POW_LEVEL_MAX;
    uint64_t l2 = level * level, t = burst * burst;
    uint32_t k = 0;
    while (k < extra && t <= l2 / 2) { /* t * 2 <= l2, without overflow */
        t *= 2;
        k++;
    }
    return k;
}

static void curve_clamp(const tly_pow_curve_t *c, uint64_t *burst, uint32_t *extra)
{
    uint32_t max = c->max > 64 ? 64 : c->max;
    *extra = max > c->base ? max - c->base : 0;
    *burst = c->burst == 0 ? 1 : c->burst > TLY_POW_LEVEL_MAX ? TLY_POW_LEVEL_MAX : c->burst;
}

uint32_t tly_pow_difficulty(const tly_pow_curve_t *c, uint64_t level)
{
    if (c->base == 0)
        return 0;
    uint64_t burst;
    uint32_t extra;
    curve_clamp(c, &burst, &extra);
    return c->base + extra_bits(level, burst, extra);
}

uint32_t tly_pow_capacity(const tly_pow_curve_t *c)
{
    uint64_t burst;
    uint32_t extra;
    curve_clamp(c, &burst, &extra);
    /* the first level with all the extra bits: a binary search over [burst, max] */
    uint64_t lo = burst, hi = TLY_POW_LEVEL_MAX;
    if (extra_bits(hi, burst, extra) < extra)
        return TLY_POW_LEVEL_MAX;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (extra_bits(mid, burst, extra) >= extra)
            hi = mid;
        else
            lo = mid + 1;
    }
    return (uint32_t)lo;
}
