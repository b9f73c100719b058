/*
 * results.c: the results of a poll, from the rendering cached in memory (rebuilt at
 * most once per change), after the visibility check for the caller.
 */
#include "api/api_int.h"
#include "base/base.h"

void api_results_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, false, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    int64_t now = tly_now_ms();
    bool voted = caller.present && tly_poll_find_vote(p, caller.id) != NULL;
    if (!tly_results_visible(p, caller.present ? caller.id : NULL, voted, now)) {
        api_respond_error(req, 403, "RESULTS_HIDDEN", "the results of this poll are not visible to you yet",
                          json_pack("{s:s}", "results_visibility",
                                    tly_visibility_name(p->settings.results_visibility)));
        return;
    }
    size_t len;
    const char *json = tly_results_render(p, now, &len);
    if (json == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    api_respond_raw_json(req, 200, json, len);
}
