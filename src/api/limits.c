/*
 * limits.c: the rate limits of the API, as rules of src/limit applied per route class,
 * and the buckets behind the anonymous device tokens' proof of work.
 *
 *   auth   register, login                 per address  --rate-auth-ip / minute
 *   anon   anonymous device tokens         per address  --rate-anon-ip / minute
 *   poll   poll creation                   per caller   --rate-poll-user / hour
 *   vote   ballots of anonymous devices    per address  --rate-vote-ip / minute
 *   voter  ballots, changes, retractions   per caller   --rate-vote-voter / minute
 *   join   join-code lookups               per address  --rate-join-ip / minute
 *   pow    new device challenges           per address  (a level, never refused: auth.c)
 *
 * A caller (an account, or an anonymous device token) is limited by its own bucket, so
 * that many voters behind one address (a lecture hall, a campus) all get through; an
 * anonymous device's ballots also count in its address's bucket, which is generous: a
 * device token costs a proof of work (auth.c), and that, not the address's bucket, is
 * what a new anonymous identity costs. IPv6 clients are keyed by their /64: one host
 * usually holds a whole /64 and could otherwise take fresh buckets at will.
 * Every limited response carries RateLimit-Limit/Remaining/Reset (of the bucket nearest
 * to empty when two count); a refusal is 429 RATE_LIMITED with Retry-After in seconds
 * and a message that says the wait in words ("Try again in about 12 minutes") and whom
 * the limit is for (this network, this account, this device). Checked before any other
 * work on the route.
 *
 * Shared buckets: with a bus (--bus), the buckets live in Redis, so a client spreading its
 * requests over the instances gets the limit once, not once per instance. The same GCRA
 * runs in a Lua script on Redis's clock (the instances' clocks may differ); the request
 * waits for the answer and then runs (again, from the top, with the limit passed). When
 * Redis cannot answer, the instance's own buckets decide, as without a bus.
 */
#include <stdio.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"

#define SWEEP_MS 100

/* KEYS[1..n]: the buckets; ARGV: capacity and period in ms of each, in turn. Takes one
 * token from each bucket in order, stopping at the first that has none (those before it
 * keep theirs taken, as the local buckets do). Returns {allowed, remaining, reset_ms,
 * retry_after_ms, i}: the fields of tly_limit_result_t of the refusing bucket i, or, all
 * allowed, of the one with the fewest tokens left. A bucket holds its theoretical
 * arrival time in ms and expires when it would be full again. */
static const char gcra_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local best = nil\n"
    "for i = 1, #KEYS do\n"
    "  local c, p = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])\n"
    "  local e = p / c\n"
    "  local tat = tonumber(redis.call('GET', KEYS[i]) or now)\n"
    "  if tat < now then tat = now end\n"
    "  local new = tat + e\n"
    "  if new - now > p then\n"
    "    local retry = math.max(1, math.ceil(new - now - p))\n"
    "    return {0, 0, retry, retry, i}\n"
    "  end\n"
    "  redis.call('SET', KEYS[i], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1)\n"
    "  local rem = math.floor((p - (new - now)) / e + 1e-9)\n"
    "  local reset = new - now\n"
    "  if rem < 1 then reset = new - now - p + e end\n"
    "  if best == nil or rem < best[2] then best = {1, rem, math.max(1, math.ceil(reset)), 0, i} end\n"
    "end\n"
    "return best\n";
#define SWEEP_WORK 10000

/* How a refusal of each rule reads. A rule per address speaks of "this network"; one per
 * caller of "this account" or "this device" (an anonymous device token). */
static const struct {
    bool per_caller;
    const char *what; /* per caller: a format with one %s, the caller's kind */
} rule_words[API_LIMIT_N] = {
    [API_LIMIT_AUTH] = {false, "Too many sign-in attempts from this network"},
    [API_LIMIT_ANON] = {false, "Too many new anonymous devices from this network"},
    [API_LIMIT_POLL] = {true, "This %s has created many polls in a short time"},
    [API_LIMIT_VOTE_IP] = {false, "Too many ballots from this network"},
    [API_LIMIT_VOTER] = {true, "Too many ballots and changes from this %s"},
    [API_LIMIT_JOIN] = {false, "Too many join codes tried from this network"},
    [API_LIMIT_POW] = {false, "Too many new anonymous devices from this network"},
};

static tly_app_t *sweep_app;

static void on_sweep(tly_timer_t *t)
{
    tly_app_t *app = sweep_app;
    tly_limiter_sweep(app->limiter, tly_loop_now(app->loop), SWEEP_WORK);
    tly_timer_start(app->loop, t, SWEEP_MS, on_sweep);
}

/* The proof of work's curve as configured. */
static tly_pow_curve_t pow_curve(const tly_conf_t *c)
{
    return (tly_pow_curve_t){
        .base = (uint32_t)c->pow_difficulty,
        .max = (uint32_t)(c->pow_max_difficulty > c->pow_difficulty ? c->pow_max_difficulty : c->pow_difficulty),
        .burst = (uint32_t)c->pow_burst};
}

static bool pow_adaptive(const tly_conf_t *c)
{
    return c->pow_difficulty > 0 && c->pow_max_difficulty > c->pow_difficulty;
}

int api_limits_init(tly_app_t *app)
{
    const tly_conf_t *c = app->conf;
    if (!c->rate_limits && !pow_adaptive(c))
        return 0;
    app->limiter = tly_limiter_new((size_t)c->rate_keys);
    if (app->limiter == NULL)
        return TLY_ENOMEM;
    app->rules[API_LIMIT_AUTH] = (tly_limit_rule_t){"auth", (uint32_t)c->rate_auth_ip, 60000};
    app->rules[API_LIMIT_ANON] = (tly_limit_rule_t){"anon", (uint32_t)c->rate_anon_ip, 60000};
    app->rules[API_LIMIT_POLL] = (tly_limit_rule_t){"poll", (uint32_t)c->rate_poll_user, 3600000};
    app->rules[API_LIMIT_VOTE_IP] = (tly_limit_rule_t){"vote", (uint32_t)c->rate_vote_ip, 60000};
    app->rules[API_LIMIT_VOTER] = (tly_limit_rule_t){"voter", (uint32_t)c->rate_vote_voter, 60000};
    app->rules[API_LIMIT_JOIN] = (tly_limit_rule_t){"join", (uint32_t)c->rate_join_ip, 60000};
    /* The address's backlog of new device tokens: one token a challenge, drained at
     * --pow-rate a minute, as deep as the level at which the difficulty stops rising
     * (so an address that stops falls back from the top in capacity / rate minutes). */
    tly_pow_curve_t curve = pow_curve(c);
    uint32_t cap = tly_pow_capacity(&curve);
    app->rules[API_LIMIT_POW] = (tly_limit_rule_t){"pow", cap, (uint64_t)cap * 60000u / (uint64_t)c->pow_rate};
    if (app->rules[API_LIMIT_POW].period_ms == 0)
        app->rules[API_LIMIT_POW].period_ms = 1;
    if (app->bus != NULL && (app->limit_script = tly_bus_script_new(app->bus, gcra_lua)) == NULL)
        return TLY_ENOMEM;
    sweep_app = app;
    tly_timer_start(app->loop, &app->limit_sweep, SWEEP_MS, on_sweep);
    return 0;
}

void api_limits_free(tly_app_t *app)
{
    if (app->limiter == NULL)
        return;
    tly_timer_stop(&app->limit_sweep);
    tly_limiter_free(app->limiter);
    app->limiter = NULL;
}

/* ---- taking tokens: here, or from the buckets in Redis ---- */

#define TAKE_MAX 2

/* What a take is about, kept in request memory while Redis answers. */
typedef struct take take_t;
struct take {
    tly_app_t *app;
    tly_req_t *req;
    size_t n;
    api_limit_t which[TAKE_MAX];
    char key[TAKE_MAX][TLY_LIMIT_KEY_MAX + 1];
    const char *kind; /* per caller: "account" or "device" */
    /* the answer, once every bucket decided: r is the refusing bucket's result, or the
     * one nearest to empty; i its index */
    void (*done)(take_t *t, const tly_limit_result_t *r, size_t i);
    api_pow_done_fn pow_done; /* api_pow_difficulty's caller */
};

/* One token from each bucket in turn, stopping at the first refusal. */
static size_t local_take(take_t *t, tly_limit_result_t *out)
{
    tly_app_t *app = t->app;
    uint64_t now = tly_loop_now(app->loop);
    size_t best = 0;
    for (size_t i = 0; i < t->n; i++) {
        tly_limit_result_t r;
        tly_limit_take(app->limiter, &app->rules[t->which[i]], t->key[i], now, &r);
        if (!r.allowed) {
            *out = r;
            return i;
        }
        if (i == 0 || r.remaining < out->remaining) {
            *out = r;
            best = i;
        }
    }
    return best;
}

static void shared_done(void *arg, const tly_bus_reply_t *reply)
{
    take_t *t = arg;
    tly_app_t *app = t->app;
    api_end_async(app);
    if (app->closing) {
        tly_req_add_header(t->req, "Retry-After", "1");
        api_respond_error(t->req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
        return;
    }
    tly_limit_result_t r = {0};
    size_t i;
    if (reply->type == TLY_BUS_ARRAY && reply->nelements == 5 && reply->elements[0].type == TLY_BUS_INT &&
        reply->elements[4].type == TLY_BUS_INT && reply->elements[4].integer >= 1 &&
        (size_t)reply->elements[4].integer <= t->n) {
        i = (size_t)reply->elements[4].integer - 1;
        r.allowed = reply->elements[0].integer == 1;
        r.limit = app->rules[t->which[i]].capacity;
        r.remaining = (uint32_t)reply->elements[1].integer;
        r.reset_ms = (uint64_t)reply->elements[2].integer;
        r.retry_after_ms = (uint64_t)reply->elements[3].integer;
    } else {
        i = local_take(t, &r); /* Redis could not answer: ours decide */
    }
    t->done(t, &r, i);
}

/* Takes a token from each of t's buckets. Returns true with *out and *idx set when the
 * buckets here decided; false when Redis will (t->done runs with its answer: t must be
 * request memory). */
static bool take(take_t *t, tly_limit_result_t *out, size_t *idx)
{
    tly_app_t *app = t->app;
    if (app->limit_script != NULL && tly_bus_up(app->bus)) {
        char bucket[TAKE_MAX][TLY_LIMIT_KEY_MAX + 48], cap[TAKE_MAX][16], period[TAKE_MAX][24];
        const char *argv[3 * TAKE_MAX];
        size_t lens[3 * TAKE_MAX];
        for (size_t i = 0; i < t->n; i++) {
            const tly_limit_rule_t *rule = &app->rules[t->which[i]];
            snprintf(bucket[i], sizeof(bucket[i]), "tally:rl:%s:%s", rule->name, t->key[i]);
            snprintf(cap[i], sizeof(cap[i]), "%u", (unsigned)rule->capacity);
            snprintf(period[i], sizeof(period[i]), "%llu", (unsigned long long)rule->period_ms);
            argv[i] = bucket[i];
            argv[t->n + 2 * i] = cap[i];
            argv[t->n + 2 * i + 1] = period[i];
        }
        for (size_t i = 0; i < 3 * t->n; i++)
            lens[i] = strlen(argv[i]);
        api_begin_async(app);
        if (tly_bus_script(app->bus, app->limit_script, shared_done, t, t->n, 3 * t->n, argv, lens) == 0)
            return false; /* answered when Redis replies */
        api_end_async(app);
    }
    *idx = local_take(t, out);
    return true;
}

/* ---- rate limits ---- */

/* Answers the request by r (of t's bucket i): headers, and a 429 when refused. Returns
 * r->allowed. */
static bool apply_result(take_t *t, const tly_limit_result_t *r0, size_t i)
{
    tly_app_t *app = t->app;
    tly_req_t *req = t->req;
    tly_limit_result_t r = *r0;
    char limit[TLY_LIMIT_HDR_LEN], remaining[TLY_LIMIT_HDR_LEN], reset[TLY_LIMIT_HDR_LEN], retry[TLY_LIMIT_HDR_LEN];
    tly_limit_headers(&r, limit, remaining, reset, retry);
    if (r.limit > 0) {
        tly_req_add_header(req, "RateLimit-Limit", limit);
        tly_req_add_header(req, "RateLimit-Remaining", remaining);
        tly_req_add_header(req, "RateLimit-Reset", reset);
    }
    if (r.allowed)
        return true;
    api_limit_t which = t->which[i];
    bool per_caller = rule_words[which].per_caller && t->kind != NULL;
    char what[96], wait[32], message[160];
    if (per_caller)
        snprintf(what, sizeof(what), rule_words[which].what, t->kind);
    else
        snprintf(what, sizeof(what), "%s", rule_words[which].what);
    tly_limit_wait_words(r.retry_after_ms, wait, sizeof(wait));
    snprintf(message, sizeof(message), "%s. Try again in %s.", what, wait);
    tly_req_add_header(req, "Retry-After", retry);
    api_respond_error(req, 429, "RATE_LIMITED", message,
                      json_pack("{s:s, s:s, s:I}", "limit", app->rules[which].name, "scope",
                                per_caller ? t->kind : "address", "retry_after_ms", (json_int_t)r.retry_after_ms));
    return false;
}

static void limit_done(take_t *t, const tly_limit_result_t *r, size_t i)
{
    if (!apply_result(t, r, i))
        return;
    tly_app_t *app = t->app;
    app->limit_passed = t->req;
    api_dispatch(app, t->req);
    app->limit_passed = NULL;
}

/* The limit check of api_limit and api_limit_caller: t holds the buckets. */
static bool limit_run(take_t *t)
{
    t->done = limit_done;
    tly_limit_result_t r;
    size_t i;
    if (!take(t, &r, &i))
        return false; /* answered, or run again, when Redis replies */
    return apply_result(t, &r, i);
}

static bool limits_skip(tly_app_t *app, tly_req_t *req)
{
    /* off, or counted on this request's first run */
    return app->limiter == NULL || !app->conf->rate_limits || app->limit_passed == req;
}

bool api_limit(tly_app_t *app, tly_req_t *req, api_limit_t which, const char *voter_id)
{
    if (limits_skip(app, req))
        return true;
    take_t local, *t = tly_req_alloc(req, sizeof(*t));
    if (t == NULL)
        t = &local; /* no request memory: Redis is not asked (below) */
    *t = (take_t){.app = app, .req = req, .n = 1, .which = {which}, .kind = voter_id ? "account" : NULL};
    if (voter_id != NULL)
        snprintf(t->key[0], sizeof(t->key[0]), "id:%.200s", voter_id);
    else
        tly_addr_key(tly_req_client(req), t->key[0], sizeof(t->key[0]));
    if (t == &local) {
        tly_limit_result_t r;
        size_t i = local_take(t, &r);
        return apply_result(t, &r, i);
    }
    return limit_run(t);
}

bool api_limit_caller(tly_app_t *app, tly_req_t *req, api_limit_t which, const caller_t *caller)
{
    if (limits_skip(app, req))
        return true;
    take_t local, *t = tly_req_alloc(req, sizeof(*t));
    if (t == NULL)
        t = &local;
    *t = (take_t){.app = app, .req = req, .n = 1, .which = {which}, .kind = caller->anonymous ? "device" : "account"};
    snprintf(t->key[0], sizeof(t->key[0]), "id:%.200s", caller->id);
    /* an anonymous device's ballots also count for its address (generously) */
    if (caller->anonymous && which == API_LIMIT_VOTER) {
        t->which[1] = API_LIMIT_VOTE_IP;
        tly_addr_key(tly_req_client(req), t->key[1], sizeof(t->key[1]));
        t->n = 2;
    }
    if (t == &local) {
        tly_limit_result_t r;
        size_t i = local_take(t, &r);
        return apply_result(t, &r, i);
    }
    return limit_run(t);
}

/* ---- the proof of work's difficulty ---- */

/* The difficulty at the level a take on the "pow" bucket left: a refusal means the
 * bucket is full (the level at its capacity, the most the difficulty rises to). */
static int pow_of(tly_app_t *app, const tly_limit_result_t *r)
{
    uint64_t cap = app->rules[API_LIMIT_POW].capacity;
    uint64_t level = r->allowed && r->remaining <= cap ? cap - r->remaining : cap;
    tly_pow_curve_t curve = pow_curve(app->conf);
    return (int)tly_pow_difficulty(&curve, level);
}

static void pow_done(take_t *t, const tly_limit_result_t *r, size_t i)
{
    t->pow_done(t->app, t->req, pow_of(t->app, r));
}

void api_pow_difficulty(tly_app_t *app, tly_req_t *req, const char *addr_key, api_pow_done_fn done)
{
    if (app->limiter == NULL || !pow_adaptive(app->conf)) {
        done(app, req, (int)app->conf->pow_difficulty);
        return;
    }
    take_t local, *t = tly_req_alloc(req, sizeof(*t));
    if (t == NULL)
        t = &local;
    *t = (take_t){.app = app, .req = req, .n = 1, .which = {API_LIMIT_POW}, .done = pow_done, .pow_done = done};
    snprintf(t->key[0], sizeof(t->key[0]), "%s", addr_key);
    tly_limit_result_t r;
    size_t i;
    if (t == &local) {
        local_take(t, &r);
        done(app, req, pow_of(app, &r));
        return;
    }
    if (take(t, &r, &i))
        done(app, req, pow_of(app, &r));
}
