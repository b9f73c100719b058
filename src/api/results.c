/*
 * results.c: the results of a poll, from the rendering cached in memory (rebuilt at
 * most once per change), after the visibility check for the caller.
 *
 * A ranked poll with many rankings is not counted on the loop: its instant-runoff count
 * is O(total ranking length), 10 ms and more, and every other request would wait for it.
 * Above OFF_LOOP_CHOICES a read that finds the rendering stale waits (without holding
 * the loop) for a count on a worker thread (tly_results_job_t: a snapshot taken on the
 * loop, counted on the worker, installed back on the loop), one at a time per poll. A
 * read is answered with a rendering that shows every ballot committed before it
 * arrived, as a read of a small poll is: a voter who got 200 sees their ballot counted.
 * Live streams take the newest rendering at hand and the next one when it is counted.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

/* Ranked choices (and rows) from which a count runs on a worker. Below it a count on
 * the loop stays well under a millisecond (3,000,000 choices take 5-6 ms, see
 * docs/PERFORMANCE.md), and a read is answered without the worker's round trip. */
#define OFF_LOOP_CHOICES 100000

/* A read waiting for a count of its poll (request memory). */
struct results_wait {
    results_wait_t *next;
    tly_req_t *req;
    uint64_t need; /* the poll's seq when the read arrived */
    char poll_id[TLY_POLL_ID_LEN + 1];
};

/* A count of one poll on a worker. */
typedef struct {
    work_t work;
    tly_app_t *app;
    tly_results_job_t *job;
    int rc;
    char poll_id[TLY_POLL_ID_LEN + 1];
} count_t;

static void count_run(work_t *w)
{
    count_t *c = (count_t *)w;
    c->rc = tly_results_job_run(c->job);
}

static void count_done(work_t *w);

/* Starts a count of p on a worker, unless one is under way; false when it cannot start
 * (out of memory). The count holds the app busy (graceful shutdown waits for it). */
static bool count_start(tly_app_t *app, tly_poll_t *p, int64_t now)
{
    if (p->counting)
        return true;
    count_t *c = tly_calloc(1, sizeof(*c));
    if (c == NULL || (c->job = tly_results_job_new(p, now)) == NULL) {
        tly_free(c);
        return false;
    }
    c->work.run = count_run;
    c->work.done = count_done;
    c->app = app;
    memcpy(c->poll_id, p->poll_id, sizeof(c->poll_id));
    p->counting = true;
    api_begin_async(app);
    api_work_submit(app, &c->work);
    return true;
}

static void respond_results(tly_app_t *app, tly_req_t *req, tly_poll_t *p, int64_t now, uint64_t need);

/* A count of poll_id has ended (rc: its outcome): the reads waiting for it are answered
 * when what is installed now shows their ballots, and wait for the next count if not. */
static void answer_waits(tly_app_t *app, const char *poll_id, int rc)
{
    results_wait_t *mine = NULL, **pp = &app->results_waits;
    while (*pp != NULL) {
        results_wait_t *w = *pp;
        if (strcmp(w->poll_id, poll_id) == 0) {
            *pp = w->next;
            w->next = mine;
            mine = w;
        } else {
            pp = &w->next;
        }
    }
    while (mine != NULL) {
        results_wait_t *w = mine;
        mine = w->next;
        tly_req_t *req = w->req;
        uint64_t need = w->need; /* w is request memory: gone once req is answered */
        api_end_async(app);
        tly_poll_t *p = tly_registry_find_poll(app->registry, poll_id);
        if (p == NULL) {
            api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
        } else if (rc != 0) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        } else {
            respond_results(app, req, p, tly_now_ms(), need);
        }
    }
}

static void count_done(work_t *w)
{
    count_t *c = (count_t *)w;
    tly_app_t *app = c->app;
    tly_poll_t *p = tly_registry_find_poll(app->registry, c->poll_id);
    const char *outcome = c->rc != 0 ? "failed" : "superseded"; /* or the poll is gone */
    if (p != NULL) {
        p->counting = false;
        if (c->rc == 0 && tly_results_job_install(p, c->job))
            outcome = "installed";
    }
    tly_metrics_count("tally_ranked_counts_total", "outcome", outcome);
    tly_results_job_free(c->job);
    api_end_async(app);
    answer_waits(app, c->poll_id, c->rc);
    tly_free(c);
}

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

/* The settle a read waited for has ended (api_poll_await_final). */
static void answer_results(tly_app_t *app, tly_req_t *req, const char *poll_id)
{
    tly_poll_t *p = tly_registry_find_poll(app->registry, poll_id);
    if (p == NULL)
        api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
    else
        respond_results(app, req, p, tly_now_ms(), p->seq);
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
    respond_results(app, req, p, now, p->seq);
}

/* Answers with p's results showing at least seq `need`: rendered here when that is
 * cheap, else from a count on a worker, which the read waits for when the cached
 * rendering is older than `need`. */
static void respond_results(tly_app_t *app, tly_req_t *req, tly_poll_t *p, int64_t now, uint64_t need)
{
    size_t len;
    const char *json = NULL;
    if (tly_results_render_cost(p, now) >= OFF_LOOP_CHOICES) {
        json = tly_results_cached(p, now, need, NULL, &len);
        if (json == NULL) {
            results_wait_t *w = tly_req_alloc(req, sizeof(*w));
            if (w != NULL && count_start(app, p, now)) {
                w->req = req;
                w->need = need;
                memcpy(w->poll_id, p->poll_id, sizeof(w->poll_id));
                w->next = app->results_waits;
                app->results_waits = w;
                api_begin_async(app);
                return;
            }
            /* out of memory for the wait: count here, slow but right */
        }
    }
    if (json == NULL)
        json = tly_results_render(p, now, &len);
    if (json == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    api_respond_cached(req, json, len, api_results_cache(p, now));
}

const char *api_results_current(tly_app_t *app, tly_poll_t *p, int64_t now, uint64_t *seq)
{
    if (tly_results_render_cost(p, now) < OFF_LOOP_CHOICES) {
        *seq = p->seq;
        return tly_results_render(p, now, NULL);
    }
    (void)count_start(app, p, now); /* out of memory: the next offer tries again */
    return tly_results_cached(p, now, 0, seq, NULL);
}
