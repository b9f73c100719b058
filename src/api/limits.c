/*
 * limits.c: the rate limits of the API, as rules of src/limit applied per route class.
 *
 *   auth   register, login             per IP      --rate-auth-ip / minute
 *   anon   anonymous device tokens     per IP      --rate-anon-ip / minute
 *   poll   poll creation               per user    --rate-poll-user / hour
 *   vote   ballots from anonymous      per IP      --rate-vote-ip / minute
 *   voter  ballots, changes, retractions per voter --rate-vote-voter / minute
 *
 * Authenticated voters are limited per voter, not per IP, so that many voters behind one
 * address (a campus, a benchmark) still work. IPv6 clients are keyed by their /64: one
 * host usually holds a whole /64 and could otherwise take fresh buckets at will.
 * Every limited response carries RateLimit-Limit/Remaining/Reset; a refusal is 429
 * RATE_LIMITED with Retry-After. Checked before any other work on the route.
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

/* KEYS[1]: the bucket; ARGV: capacity, period in ms. Returns {allowed, remaining,
 * reset_ms, retry_after_ms}, the fields of tly_limit_result_t. The bucket holds the
 * theoretical arrival time in ms and expires when it would be full again. */
static const char gcra_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local c, p = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local e = p / c\n"
    "local tat = tonumber(redis.call('GET', KEYS[1]) or now)\n"
    "if tat < now then tat = now end\n"
    "local new = tat + e\n"
    "if new - now <= p then\n"
    "  redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1)\n"
    "  local rem = math.floor((p - (new - now)) / e + 1e-9)\n"
    "  local reset = new - now\n"
    "  if rem < 1 then reset = new - now - p + e end\n"
    "  return {1, rem, math.max(1, math.ceil(reset)), 0}\n"
    "end\n"
    "local retry = math.max(1, math.ceil(new - now - p))\n"
    "return {0, 0, retry, retry}\n";
#define SWEEP_WORK 10000

static tly_app_t *sweep_app;

static void on_sweep(tly_timer_t *t)
{
    tly_app_t *app = sweep_app;
    tly_limiter_sweep(app->limiter, tly_loop_now(app->loop), SWEEP_WORK);
    tly_timer_start(app->loop, t, SWEEP_MS, on_sweep);
}

int api_limits_init(tly_app_t *app)
{
    const tly_conf_t *c = app->conf;
    if (!c->rate_limits)
        return 0;
    app->limiter = tly_limiter_new((size_t)c->rate_keys);
    if (app->limiter == NULL)
        return TLY_ENOMEM;
    app->rules[API_LIMIT_AUTH] = (tly_limit_rule_t){"auth", (uint32_t)c->rate_auth_ip, 60000};
    app->rules[API_LIMIT_ANON] = (tly_limit_rule_t){"anon", (uint32_t)c->rate_anon_ip, 60000};
    app->rules[API_LIMIT_POLL] = (tly_limit_rule_t){"poll", (uint32_t)c->rate_poll_user, 3600000};
    app->rules[API_LIMIT_VOTE_IP] = (tly_limit_rule_t){"vote", (uint32_t)c->rate_vote_ip, 60000};
    app->rules[API_LIMIT_VOTER] = (tly_limit_rule_t){"voter", (uint32_t)c->rate_vote_voter, 60000};
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

/* Answers the request by r: headers, and a 429 when refused. Returns r->allowed. */
static bool apply_result(tly_app_t *app, tly_req_t *req, api_limit_t which, const tly_limit_result_t *r0)
{
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
    tly_req_add_header(req, "Retry-After", retry);
    api_respond_error(
        req, 429, "RATE_LIMITED", "too many requests; retry after the time in Retry-After",
        json_pack("{s:s, s:I}", "limit", app->rules[which].name, "retry_after_ms", (json_int_t)r.retry_after_ms));
    return false;
}

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
    api_limit_t which;
    char key[TLY_LIMIT_KEY_MAX + 1];
} shared_t;

static void local_take(tly_app_t *app, api_limit_t which, const char *key, tly_limit_result_t *r)
{
    tly_limit_take(app->limiter, &app->rules[which], key, tly_loop_now(app->loop), r);
}

static void shared_done(void *arg, const tly_bus_reply_t *reply)
{
    shared_t *sh = arg;
    tly_app_t *app = sh->app;
    api_end_async(app);
    if (app->closing) {
        tly_req_add_header(sh->req, "Retry-After", "1");
        api_respond_error(sh->req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
        return;
    }
    tly_limit_result_t r = {0};
    if (reply->type == TLY_BUS_ARRAY && reply->nelements == 4 && reply->elements[0].type == TLY_BUS_INT) {
        r.allowed = reply->elements[0].integer == 1;
        r.limit = app->rules[sh->which].capacity;
        r.remaining = (uint32_t)reply->elements[1].integer;
        r.reset_ms = (uint64_t)reply->elements[2].integer;
        r.retry_after_ms = (uint64_t)reply->elements[3].integer;
    } else {
        local_take(app, sh->which, sh->key, &r); /* Redis could not answer: ours decide */
    }
    if (!apply_result(app, sh->req, sh->which, &r))
        return;
    app->limit_passed = sh->req;
    api_dispatch(app, sh->req);
    app->limit_passed = NULL;
}

bool api_limit(tly_app_t *app, tly_req_t *req, api_limit_t which, const char *voter_id)
{
    if (app->limiter == NULL || app->limit_passed == req) /* counted on its first run */
        return true;
    char key[TLY_LIMIT_KEY_MAX + 1];
    if (voter_id != NULL)
        snprintf(key, sizeof(key), "id:%.200s", voter_id);
    else
        tly_addr_key(tly_req_client(req), key, sizeof(key));
    shared_t *sh;
    if (app->limit_script != NULL && tly_bus_up(app->bus) && (sh = tly_req_alloc(req, sizeof(*sh))) != NULL) {
        const tly_limit_rule_t *rule = &app->rules[which];
        char bucket[TLY_LIMIT_KEY_MAX + 48], cap[16], period[24];
        snprintf(bucket, sizeof(bucket), "tally:rl:%s:%s", rule->name, key);
        snprintf(cap, sizeof(cap), "%u", (unsigned)rule->capacity);
        snprintf(period, sizeof(period), "%llu", (unsigned long long)rule->period_ms);
        const char *argv[] = {bucket, cap, period};
        size_t lens[] = {strlen(bucket), strlen(cap), strlen(period)};
        *sh = (shared_t){.app = app, .req = req, .which = which};
        snprintf(sh->key, sizeof(sh->key), "%s", key);
        api_begin_async(app);
        if (tly_bus_script(app->bus, app->limit_script, shared_done, sh, 1, 3, argv, lens) == 0)
            return false; /* answered, or run again, when Redis replies */
        api_end_async(app);
    }
    tly_limit_result_t r;
    local_take(app, which, key, &r);
    return apply_result(app, req, which, &r);
}
