/*
 * limit: rate limits as token buckets, one per (rule, key), in bounded memory.
 *
 * A rule lets `capacity` requests through at once and refills continuously at
 * capacity / period_ms tokens per millisecond, so "10 per 60000 ms" allows a burst of 10
 * and then one every 6 s. The bucket is kept as GCRA (the generic cell rate algorithm):
 * one timestamp per key, the moment the bucket would be full again, held exactly in
 * units of 1/capacity ms. It answers exactly as a token bucket with fractional refill
 * would, with no rounding drift, and a denied request costs nothing.
 *
 * The module is pure: no I/O, no clock, no threads. Callers pass the time in, as
 * monotonic milliseconds that must not go backwards (if they do, answers stay safe but
 * strict). Which rules exist, how keys are built (per IP, per voter) and whether limits
 * are on at all (`--rate-limits off`: the API layer simply does not ask) are the API
 * layer's business.
 *
 * Memory: at most max_keys buckets. A new key at the bound evicts the least recently
 * used bucket, preferring a full one among the few oldest (a full bucket is the same as
 * no bucket). Evicting a bucket that is not full forgets what its key has spent, so that
 * key starts again from a full bucket: the bound trades a little extra allowance for a
 * key evicted under pressure for a fixed memory ceiling. tly_limiter_sweep drops full
 * buckets so that keys seen once do not pin memory until evicted. Measured on x86-64
 * glibc with 1,000,000 keys like "ip:10.1.2.3" under rule "vote" (19.5 bytes stored
 * per key: name, NUL, key): 80.8 bytes per key in all, i.e. 61 + key length: a 34-byte
 * bucket plus the stored key as malloc rounds it, and 16.8 bytes of hash table.
 *
 * Threads: a tly_limiter_t belongs to the one event-loop thread that uses it; nothing
 * here locks. Each event-loop thread that limits requests has its own limiter (or its
 * requests are sent to the one that owns it as messages).
 */
#ifndef TALLY_LIMIT_H
#define TALLY_LIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TLY_LIMIT_NAME_MAX 32                 /* longest rule name, bytes */
#define TLY_LIMIT_KEY_MAX 255                 /* longest key, bytes */
#define TLY_LIMIT_PERIOD_MAX 1000000000000ull /* longest period, ms (about 31 years) */
#define TLY_LIMIT_HDR_LEN 16                  /* buffer size for each tly_limit_headers value */

/* A class of requests and its limit. Rules are identified by name: one name, one
 * capacity and period for the life of the limiter (the API layer defines them at startup,
 * e.g. {"vote", 10, 60000}, {"poll", 5, 3600000}, {"auth", 20, 60000},
 * {"anon", 20, 60000}). capacity 1..UINT32_MAX, period_ms 1..TLY_LIMIT_PERIOD_MAX and
 * capacity * period_ms <= 2^62; name non-empty, at most TLY_LIMIT_NAME_MAX bytes. The
 * limiter does not keep the pointer. */
typedef struct {
    const char *name;
    uint32_t capacity; /* burst size, and tokens refilled per period */
    uint64_t period_ms;
} tly_limit_rule_t;

/* What tly_limit_take decided, and what to tell the client. */
typedef struct {
    bool allowed;
    uint32_t limit;          /* RateLimit-Limit: the rule's capacity */
    uint32_t remaining;      /* RateLimit-Remaining: whole tokens left after this request */
    uint64_t reset_ms;       /* RateLimit-Reset: until the bucket is full again; when no whole
                              * token is left (remaining 0), until the next one is */
    uint64_t retry_after_ms; /* when !allowed: until one token is available (>= 1); else 0 */
} tly_limit_result_t;

typedef struct tly_limiter tly_limiter_t;

/* Creates a limiter that holds at most max_keys buckets (1..2^30; 1,000,000 short keys
 * cost about 81 MB when all are held). Returns NULL when max_keys is out of range or
 * memory runs out.
 * Reads 16 random bytes once (through libsodium) to key the hash, so that clients who
 * choose their keys (IPv6 addresses) cannot make the table degrade. The caller owns it;
 * free with tly_limiter_free. Any thread; the limiter then belongs to one thread. */
tly_limiter_t *tly_limiter_new(size_t max_keys);

/* Frees the limiter and every bucket. NULL is a no-op. */
void tly_limiter_free(tly_limiter_t *l);

/* Counts one request of `rule` by `key` (NUL-terminated, 1..TLY_LIMIT_KEY_MAX bytes,
 * composed by the caller, e.g. "ip:203.0.113.7" or "voter:u_123") at time now_ms, and
 * fills *out. The rule's name is part of the bucket's identity, so one key under two
 * rules has two buckets. A request is allowed and takes one token when a whole token is
 * there; a denied request takes nothing. Returns:
 *   0            *out is the decision;
 *   TLY_ENOMEM   a new key's bucket could not be allocated: *out allows the request and
 *                reports a fresh bucket (capacity - 1 remaining), and nothing is stored.
 *                Fail open on purpose: limits protect capacity, not correctness (the vote
 *                path still dedups per voter and the store's UNIQUE constraint is the last
 *                word), and failing closed would turn a memory blip into a 429 for every
 *                new client, which is an outage an attacker could cause. Keys that already
 *                have a bucket need no memory and stay limited.
 *   TLY_EINVAL   a bad rule or key (a bug in the caller): *out allows, limit 0.
 * Never blocks; O(1) expected (a rare table doubling is O(size)). */
int tly_limit_take(tly_limiter_t *l, const tly_limit_rule_t *rule, const char *key, uint64_t now_ms,
                   tly_limit_result_t *out);

/* Number of buckets held (<= max_keys). */
size_t tly_limiter_size(const tly_limiter_t *l);

/* Drops buckets that are full again at now_ms (they hold nothing a fresh bucket would
 * not), looking at no more than max_work table slots per call and resuming where the
 * last call stopped; one pass over the table takes about 2 * max_keys / max_work calls
 * at the table's largest. Meant to run on a timer on the owning thread, e.g. 10,000
 * slots every 100 ms. Dropping a full bucket never changes a later answer. */
void tly_limiter_sweep(tly_limiter_t *l, uint64_t now_ms, size_t max_work);

/* Formats the response header values from a result, NUL-terminated, in seconds:
 * RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset (rounded up) and Retry-After
 * (rounded up, at least 1; "" when the request was allowed, as there is nothing to send).
 * Any buffer may be NULL to skip it. Pure; any thread. */
void tly_limit_headers(const tly_limit_result_t *r, char limit[TLY_LIMIT_HDR_LEN], char remaining[TLY_LIMIT_HDR_LEN],
                       char reset[TLY_LIMIT_HDR_LEN], char retry_after[TLY_LIMIT_HDR_LEN]);

/* Words for a wait of ms milliseconds, for people: whole seconds below a minute ("1
 * second", "45 seconds"), then "about a minute", "about 12 minutes" (rounded to the
 * nearest minute), "about an hour", "about 3 hours" (to the nearest hour). Never a bare
 * count of seconds beyond a minute: "717 seconds" reads as "about 12 minutes". At least
 * one second. Writes a NUL-terminated string of at most cap bytes (32 always suffice).
 * Pure; any thread. */
void tly_limit_wait_words(uint64_t ms, char *out, size_t cap);

/*
 * The proof of work an anonymous device token costs, by how many its address asked for
 * lately. `level` is the address's backlog of new device tokens: the count of a bucket
 * that every token (challenge) adds one to and that drains at a steady rate (a rule of
 * capacity tly_pow_capacity and period capacity / rate: a tly_limit_take on it leaves
 * level = limit - remaining; a refusal means the bucket is full, level = capacity).
 *
 * Up to `burst` the difficulty is `base`; past it, one more leading zero bit each time
 * the level grows by a factor of sqrt(2), so the work per token grows as (level /
 * burst)^2; never beyond `max`. With base 14, max 22, burst 256: 14 bits up to a level
 * of 362, 15 from 363, 16 from 512, 18 from 1,024, 20 from 2,048, 22 (256 times the
 * base work) from 4,096. Exact integer arithmetic (no floating point), so that every
 * instance of a cluster and the tests agree to the token.
 */
typedef struct {
    uint32_t base;  /* leading zero bits while the address is quiet (0: no proof at all) */
    uint32_t max;   /* the most it rises to (<= 64; below base counts as base) */
    uint32_t burst; /* the level up to which base applies (>= 1) */
} tly_pow_curve_t;

#define TLY_POW_LEVEL_MAX 1000000u /* the largest capacity tly_pow_capacity gives */

/* The leading zero bits a token costs at this level (0 when c->base is 0). Pure. */
uint32_t tly_pow_difficulty(const tly_pow_curve_t *c, uint64_t level);

/* The smallest level at which the difficulty reaches c->max (at most TLY_POW_LEVEL_MAX,
 * at least c->burst): the capacity of the address's bucket, beyond which counting on
 * would change nothing but how long the address takes to fall back. Pure. */
uint32_t tly_pow_capacity(const tly_pow_curve_t *c);

#endif
