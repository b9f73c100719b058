/*
 * test_limit.c: rate-limit buckets. A mistake here shows up to users as a voter refused
 * for no reason, a Retry-After that lies, a ballot stuffer let through, or a server whose
 * memory grows with every address that ever called it.
 */
#include "limit/limit.h"

#include "base/base.h"

#include <criterion/criterion.h>
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static const tly_limit_rule_t votes = {"vote", 10, 60000};      /* 10 per minute */
static const tly_limit_rule_t polls = {"poll", 5, 3600000};     /* 5 per hour */
static const tly_limit_rule_t sevens = {"seven", 7, 60000};     /* 8571.43 ms a token */
static const tly_limit_rule_t fast = {"fast", 1000, 250};       /* 4 tokens a ms */
static const tly_limit_rule_t one = {"one", 1, 1000000};        /* a single token */

static tly_limiter_t *new_limiter(size_t max_keys)
{
    tly_limiter_t *l = tly_limiter_new(max_keys);
    cr_assert_not_null(l);
    return l;
}

static tly_limit_result_t take(tly_limiter_t *l, const tly_limit_rule_t *rule, const char *key, uint64_t now)
{
    tly_limit_result_t r;
    memset(&r, 0xA5, sizeof(r));
    cr_assert_eq(tly_limit_take(l, rule, key, now, &r), 0, "take %s %s at %llu", rule->name, key,
                 (unsigned long long)now);
    return r;
}

/* ---- decisions ---------------------------------------------------------------- */

Test(limit, burst_up_to_capacity_then_denied)
{
    tly_limiter_t *l = new_limiter(100);
    uint64_t t0 = 5000000;
    for (uint32_t i = 1; i <= 10; i++) {
        tly_limit_result_t r = take(l, &votes, "ip:203.0.113.7", t0);
        cr_assert(r.allowed, "request %u of the burst", i);
        cr_assert_eq(r.limit, 10);
        cr_assert_eq(r.remaining, 10 - i);
        cr_assert_eq(r.retry_after_ms, 0);
        /* until full while a token is left; until the next token once none is */
        cr_assert_eq(r.reset_ms, i < 10 ? 6000u * i : 6000u, "request %u", i);
    }
    for (int i = 0; i < 3; i++) {
        tly_limit_result_t r = take(l, &votes, "ip:203.0.113.7", t0 + 1000);
        cr_assert_not(r.allowed);
        cr_assert_eq(r.remaining, 0);
        cr_assert_eq(r.limit, 10);
        cr_assert_eq(r.retry_after_ms, 5000, "a token comes 6 s after the burst");
        cr_assert_eq(r.reset_ms, 5000);
    }
    tly_limiter_free(l);
}

Test(limit, refill_over_time)
{
    tly_limiter_t *l = new_limiter(100);
    for (int i = 0; i < 10; i++)
        cr_assert(take(l, &votes, "k", 0).allowed);

    tly_limit_result_t r = take(l, &votes, "k", 5999);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.retry_after_ms, 1);
    r = take(l, &votes, "k", 6000);
    cr_assert(r.allowed, "one token after 6 s");
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.reset_ms, 6000);
    r = take(l, &votes, "k", 6000);
    cr_assert_not(r.allowed, "and only one");
    cr_assert_eq(r.retry_after_ms, 6000);

    /* 30 s later: five tokens */
    for (int i = 0; i < 5; i++) {
        r = take(l, &votes, "k", 36000);
        cr_assert(r.allowed);
        cr_assert_eq(r.remaining, (uint32_t)(4 - i));
    }
    cr_assert_not(take(l, &votes, "k", 36000).allowed);

    /* a full period after emptying: a full burst again, never more */
    for (int i = 0; i < 10; i++)
        cr_assert(take(l, &votes, "k", 36000 + 60000 + 500000).allowed);
    cr_assert_not(take(l, &votes, "k", 36000 + 60000 + 500000).allowed);
    tly_limiter_free(l);
}

Test(limit, fractional_refill_is_exact)
{
    /* 7 per minute: a token every 8571.43 ms; allowed at 8572, not at 8571 */
    tly_limiter_t *l = new_limiter(10);
    for (int i = 0; i < 7; i++)
        cr_assert(take(l, &sevens, "k", 1000).allowed);
    /* token k arrives k * 60000 / 7 ms after emptying, exactly: rounding each token to
     * a whole ms would drift by a ms every few tokens */
    for (uint64_t k = 1; k <= 21; k++) {
        uint64_t arrival = 1000 + (k * 60000 + 6) / 7;
        tly_limit_result_t r = take(l, &sevens, "k", arrival - 1);
        cr_assert_not(r.allowed, "token %llu not yet at %llu", (unsigned long long)k,
                      (unsigned long long)arrival - 1);
        cr_assert_eq(r.retry_after_ms, 1);
        r = take(l, &sevens, "k", arrival);
        cr_assert(r.allowed, "token %llu at %llu", (unsigned long long)k, (unsigned long long)arrival);
        cr_assert_eq(r.remaining, 0);
    }
    tly_limit_result_t r;

    /* faster than a token per ms */
    for (int i = 0; i < 1000; i++)
        cr_assert(take(l, &fast, "k", 0).allowed);
    r = take(l, &fast, "k", 0);
    cr_assert_not(r.allowed);
    cr_assert_eq(r.retry_after_ms, 1);
    for (int i = 0; i < 4; i++)
        cr_assert(take(l, &fast, "k", 1).allowed, "4 tokens a ms");
    cr_assert_not(take(l, &fast, "k", 1).allowed);
    tly_limiter_free(l);
}

Test(limit, keys_and_rules_are_independent)
{
    tly_limiter_t *l = new_limiter(100);
    for (int i = 0; i < 10; i++)
        cr_assert(take(l, &votes, "ip:198.51.100.1", 0).allowed);
    cr_assert_not(take(l, &votes, "ip:198.51.100.1", 0).allowed);
    cr_assert(take(l, &votes, "ip:198.51.100.2", 0).allowed, "another key");
    cr_assert_eq(take(l, &polls, "ip:198.51.100.1", 0).remaining, 4, "the same key under another rule");

    /* rule name and key cannot run into each other */
    tly_limit_rule_t a = {"a:", 1, 1000000}, b = {"a", 1, 1000000};
    cr_assert(take(l, &a, "b", 0).allowed);
    cr_assert(take(l, &b, ":b", 0).allowed);
    cr_assert(take(l, &b, "b", 0).allowed);
    cr_assert_not(take(l, &a, "b", 0).allowed);
    cr_assert_eq(tly_limiter_size(l), 6);
    tly_limiter_free(l);
}

Test(limit, invalid_input_is_refused_and_allowed)
{
    tly_limiter_t *l = new_limiter(10);
    char longkey[TLY_LIMIT_KEY_MAX + 2];
    memset(longkey, 'k', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = '\0';
    tly_limit_rule_t bad[] = {
        {NULL, 1, 1}, {"", 1, 1}, {"x", 0, 1000}, {"x", 1, 0}, {"x", 1, TLY_LIMIT_PERIOD_MAX + 1},
        {"x", UINT32_MAX, TLY_LIMIT_PERIOD_MAX}, /* capacity * period over 2^62 */
        {"a-name-that-is-longer-than-32-bytes", 1, 1},
    };
    tly_limit_result_t r;
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++) {
        cr_assert_eq(tly_limit_take(l, &bad[i], "k", 0, &r), TLY_EINVAL, "rule %zu", i);
        cr_assert(r.allowed);
    }
    cr_assert_eq(tly_limit_take(l, &votes, "", 0, &r), TLY_EINVAL);
    cr_assert_eq(tly_limit_take(l, &votes, NULL, 0, &r), TLY_EINVAL);
    cr_assert_eq(tly_limit_take(l, &votes, longkey, 0, &r), TLY_EINVAL);
    cr_assert(r.allowed);
    longkey[TLY_LIMIT_KEY_MAX] = '\0';
    cr_assert_eq(tly_limit_take(l, &votes, longkey, 0, &r), 0, "the longest key is fine");
    tly_limit_rule_t widest = {"x", UINT32_MAX, ((uint64_t)1 << 62) / UINT32_MAX};
    cr_assert_eq(tly_limit_take(l, &widest, "k", 0, &r), 0);
    cr_assert_eq(r.remaining, UINT32_MAX - 1);
    cr_assert_eq(tly_limiter_size(l), 2);

    cr_assert_null(tly_limiter_new(0));
    cr_assert_null(tly_limiter_new(((size_t)1 << 30) + 1));
    tly_limiter_free(NULL);
    tly_limiter_free(l);
}

Test(limit, time_going_backwards_stays_strict)
{
    tly_limiter_t *l = new_limiter(10);
    for (int i = 0; i < 10; i++)
        cr_assert(take(l, &votes, "k", 1000000).allowed);
    tly_limit_result_t r = take(l, &votes, "k", 0);
    cr_assert_not(r.allowed);
    cr_assert_leq(r.retry_after_ms, 60000, "never more than a period");
    tly_limiter_free(l);
}

/* ---- headers ------------------------------------------------------------------ */

Test(limit, header_values)
{
    char lim[TLY_LIMIT_HDR_LEN], rem[TLY_LIMIT_HDR_LEN], reset[TLY_LIMIT_HDR_LEN], retry[TLY_LIMIT_HDR_LEN];
    tly_limiter_t *l = new_limiter(10);
    tly_limit_result_t r = take(l, &votes, "k", 0);
    tly_limit_headers(&r, lim, rem, reset, retry);
    cr_assert_str_eq(lim, "10");
    cr_assert_str_eq(rem, "9");
    cr_assert_str_eq(reset, "6");
    cr_assert_str_eq(retry, "", "nothing to retry after an allowed request");
    for (int i = 0; i < 9; i++)
        take(l, &votes, "k", 0);
    r = take(l, &votes, "k", 1);
    tly_limit_headers(&r, lim, rem, reset, retry);
    cr_assert_str_eq(lim, "10");
    cr_assert_str_eq(rem, "0");
    cr_assert_str_eq(reset, "6", "5999 ms rounds up");
    cr_assert_str_eq(retry, "6");
    r = take(l, &votes, "k", 5999);
    tly_limit_headers(&r, lim, rem, reset, retry);
    cr_assert_str_eq(retry, "1", "1 ms rounds up to a second");
    cr_assert_str_eq(reset, "1");

    /* polls: 5 an hour, 720 s a token */
    r = take(l, &polls, "u", 0);
    tly_limit_headers(&r, lim, rem, NULL, NULL);
    cr_assert_str_eq(lim, "5");
    cr_assert_str_eq(rem, "4");
    cr_assert_eq(r.reset_ms, 720000);

    static const struct {
        uint64_t ms;
        const char *reset, *retry;
    } v[] = {{0, "0", "1"},       {1, "1", "1"},          {999, "1", "1"}, {1000, "1", "1"},
             {1001, "2", "2"},    {3600000, "3600", "3600"}, {UINT64_MAX, "999999999999999", "999999999999999"}};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(v); i++) {
        tly_limit_result_t d = {.allowed = false, .limit = UINT32_MAX, .remaining = 0, .reset_ms = v[i].ms,
                                .retry_after_ms = v[i].ms};
        tly_limit_headers(&d, lim, rem, reset, retry);
        cr_assert_str_eq(lim, "4294967295");
        cr_assert_str_eq(reset, v[i].reset, "ms=%llu", (unsigned long long)v[i].ms);
        cr_assert_str_eq(retry, v[i].retry, "ms=%llu", (unsigned long long)v[i].ms);
    }
    tly_limiter_free(l);
}

/* ---- memory bounds -------------------------------------------------------------- */

Test(limit, eviction_keeps_size_bounded_and_evicts_lru)
{
    tly_limiter_t *l = new_limiter(3);
    cr_assert(take(l, &polls, "a", 0).allowed);
    cr_assert(take(l, &polls, "b", 0).allowed);
    cr_assert(take(l, &polls, "c", 0).allowed);
    cr_assert_eq(take(l, &polls, "a", 1).remaining, 3, "a is now the most recently used");
    /* none is full, so the least recently used goes: b */
    cr_assert_eq(take(l, &polls, "d", 2).remaining, 4);
    cr_assert_eq(tly_limiter_size(l), 3);
    cr_assert_eq(take(l, &polls, "a", 3).remaining, 2, "a kept its bucket");
    cr_assert_eq(take(l, &polls, "c", 4).remaining, 3, "c kept its bucket");
    /* b was forgotten and starts from a full bucket (evicting d, now the oldest) */
    cr_assert_eq(take(l, &polls, "b", 5).remaining, 4);
    cr_assert_eq(tly_limiter_size(l), 3);
    cr_assert_eq(take(l, &polls, "a", 6).remaining, 1);
    cr_assert_eq(take(l, &polls, "c", 6).remaining, 2);
    cr_assert_eq(take(l, &polls, "d", 6).remaining, 4, "d was evicted");
    tly_limiter_free(l);

    /* a flood of distinct keys never holds more than max_keys */
    l = new_limiter(1000);
    char key[32];
    for (int i = 0; i < 100000; i++) {
        snprintf(key, sizeof(key), "ip:2001:db8::%x", i);
        cr_assert(take(l, &votes, key, (uint64_t)i).allowed);
        cr_assert_leq(tly_limiter_size(l), 1000);
    }
    cr_assert_eq(tly_limiter_size(l), 1000);
    /* the newest 1000 are the ones kept */
    for (int i = 99000; i < 100000; i++) {
        snprintf(key, sizeof(key), "ip:2001:db8::%x", i);
        cr_assert_eq(take(l, &votes, key, 100000).remaining, 8, "key %d", i);
    }
    tly_limiter_free(l);
}

Test(limit, eviction_prefers_a_full_bucket)
{
    static const tly_limit_rule_t brief = {"brief", 1, 10};
    tly_limiter_t *l = new_limiter(3);
    take(l, &one, "x", 0);   /* oldest, and empty for a long time */
    take(l, &brief, "y", 0); /* full again at 10 */
    take(l, &one, "z", 0);
    take(l, &one, "w", 100); /* at the bound: y goes, not x */
    cr_assert_eq(tly_limiter_size(l), 3);
    cr_assert_not(take(l, &one, "x", 100).allowed, "x is still limited");
    cr_assert_not(take(l, &one, "z", 100).allowed, "z is still limited");
    cr_assert_not(take(l, &one, "w", 100).allowed);
    cr_assert_eq(tly_limiter_size(l), 3);
    tly_limiter_free(l);
}

Test(limit, sweep_drops_idle_full_buckets)
{
    tly_limiter_t *l = new_limiter(10000);
    char key[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "ip:10.0.%d.%d", i / 256, i % 256);
        take(l, &votes, key, 0);
        if (i % 10 == 0)
            take(l, &polls, key, 0);
    }
    cr_assert_eq(tly_limiter_size(l), 1100);

    tly_limiter_sweep(l, 5999, 100000);
    cr_assert_eq(tly_limiter_size(l), 1100, "nothing is full again yet");
    tly_limiter_sweep(l, 5000, 0);
    cr_assert_eq(tly_limiter_size(l), 1100, "no work, no change");

    /* one slot at a time: bounded work, at most one bucket per call */
    size_t before = tly_limiter_size(l);
    for (int i = 0; i < 50; i++) {
        tly_limiter_sweep(l, 6001, 1);
        size_t now = tly_limiter_size(l);
        cr_assert_leq(before - now, 1);
        before = now;
    }
    /* repeated small calls finish the job: the vote buckets are full, poll buckets are not */
    for (int i = 0; i < 10000 && tly_limiter_size(l) > 100; i++)
        tly_limiter_sweep(l, 6001, 64);
    cr_assert_eq(tly_limiter_size(l), 100);
    /* what was dropped was worthless: a swept key starts as full as it was */
    cr_assert_eq(take(l, &votes, "ip:10.0.0.1", 6001).remaining, 9);
    /* what was kept still limits */
    cr_assert_eq(take(l, &polls, "ip:10.0.0.0", 6001).remaining, 3);
    tly_limiter_sweep(l, 3600000 + 1, 1 << 20);
    cr_assert_eq(tly_limiter_size(l), 0);
    tly_limiter_sweep(l, 3600000 + 1, 1 << 20);
    tly_limiter_free(l);
}

/* The measured figure reported in limit.h: heap bytes per key at the bound, allocator
 * overhead included. ASan replaces the allocator, so the figure only means something
 * without it. */
Test(limit, memory_per_key)
{
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("allocator replaced by ASan");
#else
    const size_t n = 1000000;
    struct mallinfo2 m0 = mallinfo2();
    tly_limiter_t *l = new_limiter(n);
    char key[32];
    size_t keybytes = 0;
    for (size_t i = 0; i < n; i++) {
        int len = snprintf(key, sizeof(key), "ip:10.%zu.%zu.%zu", i >> 16, (i >> 8) & 255, i & 255);
        keybytes += strlen(votes.name) + 1 + (size_t)len;
        take(l, &votes, key, 0);
    }
    cr_assert_eq(tly_limiter_size(l), n);
    struct mallinfo2 m1 = mallinfo2();
    double total = (double)((m1.uordblks + m1.hblkhd) - (m0.uordblks + m0.hblkhd));
    double per_key = total / (double)n, key_len = (double)keybytes / (double)n;
    fprintf(stderr, "limit: %.1f bytes per key with keys of %.1f bytes (%.1f MB for %zu keys)\n", per_key, key_len,
            total / 1e6, n);
    cr_assert_lt(per_key, 100 + key_len);
    tly_limiter_free(l);
#endif
}

/* ---- allocation failure ------------------------------------------------------- */

Test(limit, out_of_memory_fails_open)
{
    tly_alloc_fail_after(0);
    cr_assert_null(tly_limiter_new(10));
    tly_alloc_fail_after(1);
    cr_assert_null(tly_limiter_new(10), "the table allocation fails; nothing leaks");
    tly_alloc_fail_after(-1);

    tly_limiter_t *l = new_limiter(100);
    for (int i = 0; i < 10; i++)
        take(l, &votes, "known", 0);

    tly_limit_result_t r;
    tly_alloc_fail_after(0);
    for (int i = 0; i < 20; i++) {
        memset(&r, 0, sizeof(r));
        cr_assert_eq(tly_limit_take(l, &votes, "new", 0, &r), TLY_ENOMEM);
        cr_assert(r.allowed, "a limiter outage must not take voting down");
        cr_assert_eq(r.limit, 10);
        cr_assert_eq(r.remaining, 9, "reported as a fresh bucket");
        cr_assert_eq(r.reset_ms, 6000);
    }
    cr_assert_eq(tly_limit_take(l, &votes, "known", 0, &r), 0, "a known key needs no memory");
    cr_assert_not(r.allowed, "and stays limited");
    cr_assert_eq(tly_limiter_size(l), 1);
    tly_alloc_fail_after(-1);
    cr_assert_eq(take(l, &votes, "new", 0).remaining, 9);

    /* the table doubling fails: 16 slots hold 8 buckets */
    char key[16];
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        take(l, &votes, key, 0);
    }
    cr_assert_eq(tly_limiter_size(l), 8);
    tly_alloc_fail_after(0); /* no bucket */
    cr_assert_eq(tly_limit_take(l, &votes, "ninth", 0, &r), TLY_ENOMEM);
    cr_assert(r.allowed);
    tly_alloc_fail_after(1); /* a bucket, but the table cannot grow */
    cr_assert_eq(tly_limit_take(l, &votes, "ninth", 0, &r), TLY_ENOMEM);
    cr_assert(r.allowed);
    tly_alloc_fail_after(-1);
    cr_assert_eq(tly_limiter_size(l), 8);
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        cr_assert_eq(take(l, &votes, key, 0).remaining, 8, "%s kept its bucket", key);
    }
    cr_assert_eq(take(l, &votes, "ninth", 0).remaining, 9);
    tly_limiter_free(l);
}

Test(limit, failure_at_every_allocation_is_clean)
{
    /* a run of keys under failure after n allocations, for every n: never a crash or a
     * leak (ASan), never a denial the limiter could not justify */
    char key[16];
    for (long n = 0; n < 40; n++) {
        tly_alloc_fail_after(n);
        tly_limiter_t *l = tly_limiter_new(20);
        if (l == NULL)
            continue;
        size_t stored = 0;
        for (int i = 0; i < 30; i++) {
            snprintf(key, sizeof(key), "k%d", i);
            tly_limit_result_t r;
            int rc = tly_limit_take(l, &one, key, (uint64_t)i, &r);
            cr_assert(rc == 0 || rc == TLY_ENOMEM);
            cr_assert(r.allowed, "every key is new: n=%ld i=%d", n, i);
            if (rc == 0)
                stored++;
        }
        cr_assert_eq(tly_limiter_size(l), stored < 20 ? stored : 20);
        tly_alloc_fail_after(-1);
        tly_limiter_free(l);
    }
    tly_alloc_fail_after(-1);
}

/* ---- against a reference model -------------------------------------------------- */

/* The textbook token bucket in floating point: tokens refill at capacity / period per ms
 * up to capacity; a request takes a whole token if there is one. Exact token counts are
 * multiples of 1 / period_ms (at least 1/60000 here), so comparing with a tolerance far
 * below that (EPS) makes the model's answers exact despite rounding. */
typedef struct {
    double tokens;
    uint64_t last;
    bool seen;
} model_t;

#define EPS 1e-7

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic, so a failure reproduces */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

Test(limit, matches_reference_model, .timeout = 120)
{
    static const tly_limit_rule_t rules[] = {
        {"vote", 10, 60000}, {"seven", 7, 60000}, {"three", 3, 1000}, {"fast", 1000, 250}, {"one", 1, 5000},
    };
    static const char *keys[] = {"ip:192.0.2.1", "ip:192.0.2.2", "voter:u_1", "voter:u_2"};
    enum { NR = TLY_ARRAY_SIZE(rules), NK = TLY_ARRAY_SIZE(keys), OPS = 1000000 };
    model_t model[NR][NK] = {{{0}}};
    tly_limiter_t *l = new_limiter(NR * NK);
    uint64_t now = 1000000;
    long allowed = 0, denied = 0, at_boundary = 0, sweeps = 0;
    size_t ri = 0, ki = 0;

    for (long op = 0; op < OPS; op++) {
        uint64_t x = rnd();
        /* runs on one bucket, mostly in bursts, sometimes after a pause long enough to
         * refill it partly or wholly */
        if ((x >> 8) % 4 == 0) {
            ri = (size_t)(x >> 32) % NR;
            ki = (size_t)(x >> 48) % NK;
        }
        const tly_limit_rule_t *rule = &rules[ri];
        unsigned dice = (unsigned)(x % 100);
        if (dice >= 60 && dice < 90)
            now += (x >> 40) % (2 * rule->period_ms / rule->capacity + 1);
        else if (dice >= 90 && dice < 99)
            now += (x >> 40) % (rule->period_ms / 2 + 1);
        else if (dice == 99)
            now += (x >> 40) % (2 * rule->period_ms + 1);
        if ((x >> 20) % 100 == 0) {
            /* dropping full buckets must never change an answer */
            tly_limiter_sweep(l, now, (x >> 8) & 31);
            sweeps++;
        }

        model_t *m = &model[ri][ki];
        double c = rule->capacity, p = (double)rule->period_ms;
        bool refilled = m->seen && now > m->last && m->tokens < c;
        if (!m->seen) {
            m->tokens = c;
            m->seen = true;
        } else {
            m->tokens = fmin(c, m->tokens + (double)(now - m->last) * c / p);
        }
        m->last = now;
        if (refilled && fabs(m->tokens - 1.0) < EPS)
            at_boundary++; /* a token completed in this very ms */

        tly_limit_result_t r = take(l, rule, keys[ki], now);
        bool expect = m->tokens >= 1.0 - EPS;
        cr_assert_eq(r.allowed, expect, "op %ld: %s %s at %llu with %.9f tokens", op, rule->name, keys[ki],
                     (unsigned long long)now, m->tokens);
        if (r.allowed) {
            m->tokens = fmax(0.0, m->tokens - 1.0);
            allowed++;
        } else {
            denied++;
        }
        cr_assert_eq(r.limit, rule->capacity);
        cr_assert_eq(r.remaining, (uint32_t)floor(m->tokens + EPS), "op %ld: remaining %u, model %.9f", op,
                     r.remaining, m->tokens);

        /* ms until full, or until the next token when no whole token is left */
        double ms_per_token = p / c;
        double want = r.remaining > 0 ? (c - m->tokens) * ms_per_token : (1.0 - m->tokens) * ms_per_token;
        cr_assert_eq(r.reset_ms, (uint64_t)fmax(0.0, ceil(want - 1e-6)), "op %ld: reset %llu ms, model %.6f", op,
                     (unsigned long long)r.reset_ms, want);
        if (r.allowed)
            cr_assert_eq(r.retry_after_ms, 0);
        else
            cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms == r.reset_ms);
    }
    fprintf(stderr, "limit model: %ld allowed, %ld denied, %ld just as a token completed, %ld sweeps\n", allowed,
            denied, at_boundary, sweeps);
    cr_assert_gt(allowed, OPS / 4);
    cr_assert_gt(denied, OPS / 10);
    cr_assert_gt(at_boundary, 100, "the boundary case is exercised");
    tly_limiter_free(l);
}

/* ---- words for a wait ------------------------------------------------------------ */

static const char *words(uint64_t ms)
{
    static char buf[32];
    tly_limit_wait_words(ms, buf, sizeof(buf));
    return buf;
}

Test(limit, waits_in_words_a_person_reads)
{
    cr_assert_str_eq(words(0), "1 second");
    cr_assert_str_eq(words(1), "1 second");
    cr_assert_str_eq(words(1000), "1 second");
    cr_assert_str_eq(words(1001), "2 seconds");
    cr_assert_str_eq(words(59000), "59 seconds");
    cr_assert_str_eq(words(59001), "about a minute");
    cr_assert_str_eq(words(89000), "about a minute");
    cr_assert_str_eq(words(90000), "about 2 minutes");
    /* the refusal: "717 seconds" is about 12 minutes */
    cr_assert_str_eq(words(717000), "about 12 minutes");
    cr_assert_str_eq(words(3569000), "about 59 minutes");
    cr_assert_str_eq(words(3570000), "about an hour");
    cr_assert_str_eq(words(5399000), "about an hour");
    cr_assert_str_eq(words(5400000), "about 2 hours");
    cr_assert_str_eq(words(UINT64_MAX), "about 5124095576030 hours");
    char small[8];
    tly_limit_wait_words(717000, small, sizeof(small));
    cr_assert_str_eq(small, "about 1", "cut to the buffer, NUL-terminated");
}

/* ---- the proof of work's curve ---------------------------------------------------- */

static const tly_pow_curve_t room = {.base = 14, .max = 22, .burst = 256};

Test(limit, pow_difficulty_stays_at_the_base_through_a_room_and_rises_past_it)
{
    for (uint64_t level = 0; level <= 362; level++)
        cr_assert_eq(tly_pow_difficulty(&room, level), 14, "level %llu", (unsigned long long)level);
    /* one bit each time the level grows by sqrt(2): the thresholds are
     * ceil(256 * sqrt(2)^k) */
    static const struct {
        uint64_t level;
        uint32_t bits;
    } steps[] = {{363, 15}, {511, 15}, {512, 16}, {724, 16},     {725, 17},  {1023, 17}, {1024, 18},
                 {1448, 18}, {1449, 19}, {2047, 19}, {2048, 20}, {2896, 20}, {2897, 21}, {4095, 21},
                 {4096, 22}, {10000, 22}, {1u << 30, 22}};
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++)
        cr_assert_eq(tly_pow_difficulty(&room, steps[i].level), steps[i].bits, "level %llu",
                     (unsigned long long)steps[i].level);
    cr_assert_eq(tly_pow_capacity(&room), 4096, "the level where the top is reached");
    /* never falls as the level grows */
    uint32_t prev = 0;
    for (uint64_t level = 0; level < 20000; level++) {
        uint32_t d = tly_pow_difficulty(&room, level);
        cr_assert_geq(d, prev);
        prev = d;
    }
}

Test(limit, pow_curve_edges)
{
    tly_pow_curve_t off = {.base = 0, .max = 22, .burst = 256};
    cr_assert_eq(tly_pow_difficulty(&off, 100000), 0, "no proof stays no proof");
    tly_pow_curve_t fixed = {.base = 14, .max = 14, .burst = 256};
    cr_assert_eq(tly_pow_difficulty(&fixed, 100000), 14);
    cr_assert_eq(tly_pow_capacity(&fixed), 256);
    tly_pow_curve_t below = {.base = 14, .max = 10, .burst = 256};
    cr_assert_eq(tly_pow_difficulty(&below, 100000), 14, "a max below the base is the base");
    tly_pow_curve_t odd = {.base = 8, .max = 15, .burst = 4};
    cr_assert_eq(tly_pow_capacity(&odd), 46, "ceil(4 * sqrt(2)^7) = ceil(45.25)");
    cr_assert_eq(tly_pow_difficulty(&odd, 45), 14);
    cr_assert_eq(tly_pow_difficulty(&odd, 46), 15);
    tly_pow_curve_t zero = {.base = 8, .max = 12, .burst = 0};
    cr_assert_eq(tly_pow_difficulty(&zero, 1), 8, "burst 0 counts as 1");
    cr_assert_eq(tly_pow_difficulty(&zero, 4), 12);
    tly_pow_curve_t huge = {.base = 1, .max = 64, .burst = 100000};
    cr_assert_eq(tly_pow_capacity(&huge), TLY_POW_LEVEL_MAX, "the top out of reach: capped");
    cr_assert_eq(tly_pow_difficulty(&huge, UINT64_MAX), 1 + 6, "1e6 / 1e5 = 10 = sqrt(2)^6.6");
}

/* What minting costs from one address, token after token without a pause (the level is
 * the count): the average work per token against the base's, for the first n. */
static double mean_work(const tly_pow_curve_t *c, uint64_t n)
{
    double sum = 0;
    uint64_t cap = tly_pow_capacity(c);
    for (uint64_t i = 1; i <= n; i++)
        sum += ldexp(1.0, (int)tly_pow_difficulty(c, i < cap ? i : cap) - (int)c->base);
    return sum / (double)n;
}

Test(limit, pow_a_room_pays_the_base_and_a_mint_of_ten_thousand_pays_over_100x)
{
    cr_assert_float_eq(mean_work(&room, 300), 1.0, 1e-9, "300 phones: the base each");
    double mint = mean_work(&room, 10000);
    cr_assert_geq(mint, 100.0, "10,000 tokens back to back: %.1f times the base work each", mint);
}
