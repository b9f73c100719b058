/*
 * results.c: the results of a poll, from the rendering cached in memory (rebuilt at
 * most once per change), after the visibility check for the caller.
 */
#include "api/api_int.h"
#include "base/base.h"

/* The poll of the path if the caller may see its counts; answers 404/403 otherwise. */
static tly_poll_t *visible_poll(tly_app_t *app, tly_req_t *req, const tly_params_t *params, int64_t now)
{
    caller_t caller;
    if (!api_caller(app, req, false, &caller))
        return NULL;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return NULL;
    api_poll_settle(app, p, now);
    tly_vote_t *mine = caller.present ? tly_poll_find_vote(p, caller.id) : NULL;
    bool voted = mine != NULL && mine->state == TLY_VOTE_COMMITTED; /* acknowledged ballots only */
    if (!tly_results_visible(p, caller.present ? caller.id : NULL, voted, now)) {
        api_respond_error(
            req, 403, "RESULTS_HIDDEN", "the results of this poll are not visible to you yet",
            json_pack("{s:s}", "results_visibility", tly_visibility_name(p->settings.results_visibility)));
        return NULL;
    }
    return p;
}

void api_polls_timeline(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    int64_t now = tly_now_ms();
    tly_str_t v;
    int64_t bucket = TLY_TIMELINE_1M, from = 0, to = INT64_MAX;
    if (tly_req_query_param(req, "bucket", &v) && (bucket = tly_timeline_bucket_ms(v.ptr)) <= 0) {
        api_respond_validation(req, "bucket", "bucket must be 10s, 1m or 1h");
        return;
    }
    if (tly_req_query_param(req, "from", &v) && tly_time_parse(v.ptr, &from) != 0) {
        api_respond_validation(req, "from", "from must be an RFC 3339 time");
        return;
    }
    if (tly_req_query_param(req, "to", &v) && tly_time_parse(v.ptr, &to) != 0) {
        api_respond_validation(req, "to", "to must be an RFC 3339 time");
        return;
    }
    tly_poll_t *p = visible_poll(app, req, params, now);
    if (p == NULL)
        return;
    json_t *t = tly_timeline_json(p, bucket, from, to);
    if (t == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    api_respond_json(req, 200, t);
}

static void respond_results(tly_req_t *req, tly_poll_t *p, int64_t now);

/* The settle a read waited for has ended (api_poll_await_final). */
static void answer_results(tly_app_t *app, tly_req_t *req, const char *poll_id)
{
    tly_poll_t *p = tly_registry_find_poll(app->registry, poll_id);
    if (p == NULL)
        api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
    else
        respond_results(req, p, tly_now_ms());
}

void api_results_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    int64_t now = tly_now_ms();
    tly_poll_t *p = visible_poll(app, req, params, now);
    if (p == NULL)
        return;
    /* just closed, with instances sharing the store: the final results are on their way */
    if (api_poll_await_final(app, p, req, answer_results))
        return;
    respond_results(req, p, now);
}

static void respond_results(tly_req_t *req, tly_poll_t *p, int64_t now)
{
    size_t len;
    const char *json = tly_results_render(p, now, &len);
    if (json == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    api_respond_raw_json(req, 200, json, len);
}
