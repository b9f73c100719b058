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
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"

#define SWEEP_MS 100
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

/* "ip:<address>", with IPv6 addresses cut to their /64 */
static void ip_key(const char *peer, char *out, size_t cap)
{
    struct in6_addr a6;
    if (strchr(peer, ':') != NULL && inet_pton(AF_INET6, peer, &a6) == 1) {
        const uint8_t *b = a6.s6_addr;
        if (IN6_IS_ADDR_V4MAPPED(&a6)) { /* a dual-stack listener's IPv4 client */
            snprintf(out, cap, "ip:%u.%u.%u.%u", b[12], b[13], b[14], b[15]);
            return;
        }
        snprintf(out, cap, "ip6:%02x%02x:%02x%02x:%02x%02x:%02x%02x::/64", b[0], b[1], b[2], b[3], b[4], b[5], b[6],
                 b[7]);
        return;
    }
    snprintf(out, cap, "ip:%s", peer);
}

bool api_limit(tly_app_t *app, tly_req_t *req, api_limit_t which, const char *voter_id)
{
    if (app->limiter == NULL || app->redispatch == req) /* counted on its first run */
        return true;
    char key[TLY_LIMIT_KEY_MAX + 1];
    if (voter_id != NULL)
        snprintf(key, sizeof(key), "id:%.200s", voter_id);
    else
        ip_key(tly_req_peer(req), key, sizeof(key));
    tly_limit_result_t r;
    tly_limit_take(app->limiter, &app->rules[which], key, tly_loop_now(app->loop), &r);
    char limit[TLY_LIMIT_HDR_LEN], remaining[TLY_LIMIT_HDR_LEN], reset[TLY_LIMIT_HDR_LEN],
        retry[TLY_LIMIT_HDR_LEN];
    tly_limit_headers(&r, limit, remaining, reset, retry);
    if (r.limit > 0) {
        tly_req_add_header(req, "RateLimit-Limit", limit);
        tly_req_add_header(req, "RateLimit-Remaining", remaining);
        tly_req_add_header(req, "RateLimit-Reset", reset);
    }
    if (r.allowed)
        return true;
    tly_req_add_header(req, "Retry-After", retry);
    api_respond_error(req, 429, "RATE_LIMITED", "too many requests; retry after the time in Retry-After",
                      json_pack("{s:s, s:I}", "limit", app->rules[which].name, "retry_after_ms",
                                (json_int_t)r.retry_after_ms));
    return false;
}
