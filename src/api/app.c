/*
 * app.c: wires the resources to the router, the store and the loop; the response and
 * request helpers every resource uses; the worker threads for slow work.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

/* ---- responses ---- */

static const char JSON_TYPE[] = "application/json; charset=utf-8";

void api_respond_raw_json(tly_req_t *req, int status, const char *json, size_t len)
{
    tly_req_add_header(req, "Cache-Control", "no-store");
    tly_req_respond(req, status, JSON_TYPE, json, len);
}

void api_respond_json(tly_req_t *req, int status, json_t *body)
{
    uint64_t failed = tly_alloc_failures();
    char *s = body ? json_dumps(body, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
    json_decref(body);
    if (s != NULL && tly_alloc_failures() != failed) { /* jansson may have left out a piece */
        free(s);
        s = NULL;
    }
    if (s == NULL) {
        static const char oom[] = "{\"error\":{\"code\":\"UNAVAILABLE\",\"message\":\"out of memory\"}}";
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_raw_json(req, 503, oom, sizeof(oom) - 1);
        return;
    }
    api_respond_raw_json(req, status, s, strlen(s));
    free(s);
}

void api_respond_error(tly_req_t *req, int status, const char *code, const char *message, json_t *extra)
{
    tly_req_set_note(req, code);
    json_t *err = json_pack("{s:s, s:s}", "code", code, "message", message);
    if (err != NULL && extra != NULL)
        json_object_update(err, extra);
    json_decref(extra);
    if (status == 401)
        tly_req_add_header(req, "WWW-Authenticate", "Bearer");
    api_respond_json(req, status, err ? json_pack("{s:o}", "error", err) : NULL);
}

void api_respond_validation(tly_req_t *req, const char *field, const char *message)
{
    api_respond_error(req, 400, "VALIDATION_ERROR", message, field ? json_pack("{s:s}", "field", field) : NULL);
}

void api_respond_store_error(tly_req_t *req, int result)
{
    tly_req_add_header(req, "Retry-After", "5");
    if (result == TLY_EFULL)
        api_respond_error(req, 507, "INSUFFICIENT_STORAGE", "the server's disk is full; nothing was stored", NULL);
    else
        api_respond_error(req, 503, "UNAVAILABLE",
                          "the store could not commit the write; it was not acknowledged and may not have been stored",
                          NULL);
}

/* Errors the HTTP layer answers itself, before a request reaches a route; message,
 * when given, says what was wrong better than the status's own. */
static size_t render_error(int status, const char *message, char *buf, size_t cap)
{
    const char *code = "BAD_REQUEST", *msg = "the request is malformed";
    switch (status) {
    case 413:
        code = "PAYLOAD_TOO_LARGE";
        msg = "the request body is larger than the server accepts";
        break;
    case 414:
        code = "URI_TOO_LONG";
        msg = "the request target is longer than the server accepts";
        break;
    case 431:
        code = "HEADERS_TOO_LARGE";
        msg = "the request headers are larger than the server accepts";
        break;
    case 503:
        code = "UNAVAILABLE";
        msg = "the server is busy";
        break;
    }
    if (message != NULL)
        msg = message;
    int n = snprintf(buf, cap, "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}", code, msg);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* ---- requests ---- */

json_t *api_parse_body(tly_req_t *req, bool allow_empty)
{
    tly_str_t body = tly_req_body(req);
    if (body.len == 0 && allow_empty)
        return json_object();
    json_error_t jerr;
    uint64_t failed = tly_alloc_failures();
    json_t *v = json_loadb(body.ptr, body.len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (v == NULL && tly_alloc_failures() != failed) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return NULL;
    }
    if (v == NULL) {
        char msg[200];
        snprintf(msg, sizeof(msg), "the body is not valid JSON: %s (at byte %d)", jerr.text, jerr.position);
        api_respond_error(req, 400, "INVALID_JSON", msg, NULL);
        return NULL;
    }
    if (!json_is_object(v)) {
        json_decref(v);
        api_respond_validation(req, "body", "the body must be a JSON object");
        return NULL;
    }
    return v;
}

bool api_caller(tly_app_t *app, tly_req_t *req, bool required, caller_t *out)
{
    memset(out, 0, sizeof(*out));
    tly_str_t h = tly_req_header(req, "authorization");
    if (h.ptr == NULL) {
        if (required)
            api_respond_error(req, 401, "UNAUTHENTICATED", "a bearer token is required", NULL);
        return !required;
    }
    if (h.len < 7 || strncasecmp(h.ptr, "Bearer ", 7) != 0) {
        api_respond_error(req, 401, "UNAUTHENTICATED", "the Authorization header must be \"Bearer <token>\"", NULL);
        return false;
    }
    return api_caller_token(app, req, (tly_str_t){h.ptr + 7, h.len - 7}, out);
}

bool api_caller_token(tly_app_t *app, tly_req_t *req, tly_str_t token, caller_t *out)
{
    memset(out, 0, sizeof(*out));
    tly_claims_t claims;
    uint64_t failed = tly_alloc_failures();
    if (tly_jwt_verifier_check(app->jwt, token.ptr, token.len, tly_now_ms() / 1000, &claims) != 0) {
        if (tly_alloc_failures() != failed) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
            return false;
        }
        api_respond_error(req, 401, "UNAUTHENTICATED", "the token is invalid or expired", NULL);
        return false;
    }
    out->present = true;
    out->anonymous = claims.anonymous;
    out->id = tly_req_strdup(req, (tly_str_t){claims.sub, strlen(claims.sub)});
    /* A device linked to an account is the account (link.c): its ballots, its polls,
     * its limits and the polls that need a registered voter are the account's. */
    const char *user = out->id != NULL && claims.anonymous ? api_linked_user(app, out->id) : NULL;
    if (user != NULL) {
        out->device = out->id;
        out->anonymous = false;
        out->id = tly_req_strdup(req, (tly_str_t){user, strlen(user)});
    }
    if (out->id == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
    }
    return out->id != NULL;
}

bool api_idempotency_key(tly_req_t *req, char **key)
{
    *key = NULL;
    tly_str_t h = tly_req_header(req, "idempotency-key");
    if (h.ptr == NULL)
        return true;
    bool ok = h.len >= 1 && h.len <= TLY_IDEM_KEY_MAX;
    for (size_t i = 0; ok && i < h.len; i++)
        ok = h.ptr[i] >= 0x21 && h.ptr[i] <= 0x7e;
    if (!ok) {
        api_respond_validation(req, "Idempotency-Key", "Idempotency-Key must be 1 to 255 printable ASCII characters");
        return false;
    }
    *key = tly_req_strdup(req, h);
    return *key != NULL;
}

void api_body_hash(tly_req_t *req, uint8_t out[16])
{
    tly_str_t b = tly_req_body(req);
    crypto_generichash(out, 16, (const unsigned char *)b.ptr, b.len, NULL, 0);
}

bool api_is_owner(const tly_poll_t *p, const caller_t *caller)
{
    return caller->present && strcmp(caller->id, p->owner_id) == 0;
}

tly_poll_t *api_find_poll(tly_app_t *app, tly_req_t *req, const tly_params_t *params, const caller_t *caller)
{
    size_t len;
    const char *id = tly_params_get(params, "poll_id", &len);
    tly_poll_t *p = NULL;
    if (id != NULL && len == TLY_POLL_ID_LEN) {
        char key[TLY_POLL_ID_LEN + 1];
        memcpy(key, id, len);
        key[len] = '\0';
        poll_mark_t *m;
        HASH_FIND_STR(app->deleting, key, m);
        if (m == NULL)
            p = tly_registry_find_poll(app->registry, key);
    }
    if (p != NULL && tly_poll_effective_status(p, tly_now_ms()) == TLY_STATUS_DRAFT && !api_is_owner(p, caller))
        p = NULL;
    if (p == NULL && !api_resync(app, req)) /* made on another instance a moment ago? */
        api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
    return p;
}

void api_begin_async(tly_app_t *app) { app->in_flight++; }

void api_end_async(tly_app_t *app) { app->in_flight--; }

/* ---- worker threads ---- */

static void *work_main(void *arg)
{
    tly_app_t *app = arg;
    pthread_setname_np(pthread_self(), "tally-work");
    pthread_mutex_lock(&app->work.mu);
    for (;;) {
        while (app->work.head == NULL && !app->work.stop)
            pthread_cond_wait(&app->work.cond, &app->work.mu);
        if (app->work.head == NULL)
            break;
        work_t *w = app->work.head;
        app->work.head = w->next;
        if (app->work.head == NULL)
            app->work.tail = NULL;
        pthread_mutex_unlock(&app->work.mu);
        w->run(w);
        pthread_mutex_lock(&app->work.mu);
        w->next = NULL;
        if (app->work.done_tail)
            app->work.done_tail->next = w;
        else
            app->work.done_head = w;
        app->work.done_tail = w;
        tly_waker_wake(app->work.waker);
    }
    pthread_mutex_unlock(&app->work.mu);
    return NULL;
}

static void work_reap(void *arg)
{
    tly_app_t *app = arg;
    pthread_mutex_lock(&app->work.mu);
    work_t *w = app->work.done_head;
    app->work.done_head = app->work.done_tail = NULL;
    pthread_mutex_unlock(&app->work.mu);
    while (w != NULL) {
        work_t *next = w->next;
        w->done(w);
        w = next;
    }
}

void api_work_submit(tly_app_t *app, work_t *w)
{
    w->next = NULL;
    pthread_mutex_lock(&app->work.mu);
    if (app->work.tail)
        app->work.tail->next = w;
    else
        app->work.head = w;
    app->work.tail = w;
    pthread_cond_signal(&app->work.cond);
    pthread_mutex_unlock(&app->work.mu);
}

/* ---- dispatch ---- */

static void on_store_wake(void *arg)
{
    tly_app_t *app = arg;
    tly_store_reap(app->store);
    api_follow_flush(app); /* other instances' changes that waited for ours */
    api_link_kick(app);    /* links that waited for ours */
    api_bus_flush_counts(app);
    api_bus_announce(app);
}

static void notify_store(void *arg) { tly_waker_wake(arg); }

static void release_writes(void *arg)
{
    tly_app_t *app = arg;
    tly_store_release(app->store);
}

static const char *method_label(tly_method_t m)
{
    /* one line a case: it reads as a table */
    /* clang-format off */
    switch (m) {
    case TLY_M_GET: return "GET";
    case TLY_M_HEAD: return "HEAD";
    case TLY_M_POST: return "POST";
    case TLY_M_PUT: return "PUT";
    case TLY_M_PATCH: return "PATCH";
    case TLY_M_DELETE: return "DELETE";
    case TLY_M_OPTIONS: return "OPTIONS";
    default: return "OTHER";
    }
    /* clang-format on */
}

static void serve_metrics(tly_app_t *app, tly_req_t *req);

/* Every response: one log line and the metrics. Nothing of the request's content. */
static void on_response(tly_req_t *req, int status, void *arg)
{
    (void)arg;
    const char *route = tly_req_route(req), *code = tly_req_note(req);
    const char *method = method_label(tly_req_method(req));
    uint64_t us = tly_mono_us() - tly_req_start(req);
    double ms = (double)us / 1000;
    tly_metrics_request(route, method, status, us);
    if (code != NULL)
        tly_metrics_count("tally_errors_total", "code", code);
    if (route != NULL && strcmp(route, "/v1/polls/{poll_id}/votes") == 0)
        tly_metrics_count("tally_votes_total", "outcome",
                          code            ? code
                          : status == 200 ? "recorded"
                          : status == 202 ? "accepted"
                                          : "other");
    else if (route != NULL && strcmp(route, "/v1/polls/{poll_id}/votes/me") == 0 && strcmp(method, "GET") != 0)
        tly_metrics_count("tally_vote_changes_total", "outcome",
                          code                         ? code
                          : strcmp(method, "PUT") == 0 ? "changed"
                                                       : "retracted");
    if (code != NULL && strcmp(code, "RATE_LIMITED") == 0)
        tly_metrics_count("tally_rate_limited_total", "route", route ? route : "unmatched");
    tly_log_request(method, route ? route : "unmatched", status, code, ms, tly_req_client(req));
}

/* GET /metrics on the app's own address: there unless --metrics-listen moved it. */
void api_ops_metrics(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (app->metrics_server != NULL) {
        api_respond_error(req, 404, "NOT_FOUND", "no such route", NULL);
        return;
    }
    serve_metrics(app, req);
}

/* The --metrics-listen address serves /metrics and nothing else. */
static void metrics_handle(tly_req_t *req, void *arg)
{
    tly_app_t *app = arg;
    tly_method_t m = tly_req_method(req);
    if (!tly_str_eq(tly_req_path(req), "/metrics")) {
        api_respond_error(req, 404, "NOT_FOUND", "this address serves GET /metrics only", NULL);
        return;
    }
    tly_req_set_route(req, "/metrics");
    if (m != TLY_M_GET && m != TLY_M_HEAD) {
        tly_req_add_header(req, "Allow", "GET, HEAD");
        api_respond_error(req, 405, "METHOD_NOT_ALLOWED", "this path does not accept that method", NULL);
        return;
    }
    serve_metrics(app, req);
}

static void serve_metrics(tly_app_t *app, tly_req_t *req)
{
    tly_store_stats_t st;
    tly_store_stats(app->store, &st);
    tly_metrics_extra_t x = {.batch_bounds = tly_store_batch_bounds,
                             .commit_us_bounds = tly_store_commit_us_bounds,
                             .nbounds = TLY_STORE_HIST,
                             .batch_hist = st.batch_hist,
                             .commit_hist = st.commit_hist,
                             .batch_sum = st.batch_sum,
                             .commit_us_sum = st.commit_us_sum,
                             .failed_batches = st.failed_batches,
                             .queued = st.queued,
                             .checkpoints = st.checkpoints,
                             .wal_bytes = st.wal_bytes,
                             .checkpoint_backlog_bytes = st.checkpoint_backlog_bytes,
                             .writable = tly_store_writable(app->store),
                             .live_subscribers = api_live_subscribers(app->live),
                             .connections = tly_server_connections(app->server),
                             .polls = tly_registry_count(app->registry),
                             .store_kind = tly_store_shared(app->store) ? "postgres" : "sqlite"};
    api_reconcile_stats(app, &x.reconcile_runs, &x.reconcile_repairs_store, &x.reconcile_repairs_redis,
                        &x.reconcile_last_run_ms);
    x.followed = app->followed;
    x.resyncs = app->resyncs;
    x.bus_up = -1;
    if (app->bus != NULL) {
        tly_bus_stats_t bs;
        tly_bus_stats(app->bus, &bs);
        x.bus_up = bs.up;
        x.bus_reconnects = bs.reconnects;
        x.bus_dropped = bs.dropped;
        api_ingest_stats(app, &x.ingest_enqueued, &x.ingest_applied, &x.ingest_failed, &x.ingest_dead);
    }
    size_t len;
    char *text = tly_metrics_render(&x, &len);
    if (text == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    tly_req_add_header(req, "Cache-Control", "no-store");
    tly_req_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    tly_free(text);
}

void api_dispatch(tly_app_t *app, tly_req_t *req);

static void handle(tly_req_t *req, void *arg) { api_dispatch(arg, req); }

void api_dispatch(tly_app_t *app, tly_req_t *req)
{
    tly_str_t path = tly_req_path(req);
    tly_route_fn fn;
    tly_params_t params;
    unsigned allowed;
    bool api_path = (path.len >= 3 && memcmp(path.ptr, "/v1", 3) == 0 && (path.len == 3 || path.ptr[3] == '/'));
    if ((api_path || tly_str_eq(path, "/oembed")) && api_cors_handle(app, req))
        return; /* a preflight, answered */
    switch (tly_router_match(app->router, tly_req_method(req), path, &fn, &params, &allowed)) {
    case TLY_ROUTE_FOUND:
        tly_req_set_route(req, params.route);
        fn(req, &params, app);
        return;
    case TLY_ROUTE_NO_METHOD: {
        char allow[128];
        tly_methods_format(allowed, allow, sizeof(allow));
        tly_req_add_header(req, "Allow", allow);
        api_respond_error(req, 405, "METHOD_NOT_ALLOWED", "this path does not accept that method", NULL);
        return;
    }
    case TLY_ROUTE_NO_PATH:
        break;
    }
    if (!api_path && (tly_req_method(req) == TLY_M_GET || tly_req_method(req) == TLY_M_HEAD)) {
        tly_req_set_route(req, "static");
        api_static_get(req, &params, app);
        return;
    }
    api_respond_error(req, 404, "NOT_FOUND", "no such route", NULL);
}

static int add_routes(tly_router_t *r)
{
    static const struct {
        unsigned methods;
        const char *pattern;
        tly_route_fn fn;
    } routes[] = {
        {TLY_M_POST, "/v1/auth/register", api_auth_register},
        {TLY_M_POST, "/v1/auth/login", api_auth_login},
        {TLY_M_POST, "/v1/auth/anonymous", api_auth_anonymous},
        {TLY_M_POST, "/v1/auth/challenge", api_auth_challenge},
        {TLY_M_GET, "/v1/auth/me", api_auth_me},
        {TLY_M_POST, "/v1/polls", api_polls_create},
        {TLY_M_GET, "/v1/polls", api_polls_list},
        {TLY_M_GET, "/v1/polls/{poll_id}", api_polls_get},
        {TLY_M_PATCH, "/v1/polls/{poll_id}", api_polls_patch},
        {TLY_M_DELETE, "/v1/polls/{poll_id}", api_polls_delete},
        {TLY_M_POST, "/v1/polls/{poll_id}/votes", api_votes_cast},
        {TLY_M_GET, "/v1/polls/{poll_id}/votes/me", api_votes_me},
        {TLY_M_PUT, "/v1/polls/{poll_id}/votes/me", api_votes_change},
        {TLY_M_DELETE, "/v1/polls/{poll_id}/votes/me", api_votes_retract},
        {TLY_M_GET, "/v1/polls/{poll_id}/audit", api_polls_audit},
        {TLY_M_GET, "/v1/polls/{poll_id}/export", api_polls_export},
        {TLY_M_GET, "/v1/polls/{poll_id}/timeline", api_polls_timeline},
        {TLY_M_GET, "/v1/polls/{poll_id}/qr.svg", api_polls_qr},
        {TLY_M_GET, "/v1/polls/{poll_id}/results.svg", api_polls_results_svg},
        {TLY_M_GET, "/embed/{poll_id}", api_embed_page},
        {TLY_M_GET, "/oembed", api_oembed},
        {TLY_M_GET, "/v1/polls/{poll_id}/votes/requests/{request_id}", api_votes_request},
        {TLY_M_GET, "/v1/polls/{poll_id}/results", api_results_get},
        {TLY_M_GET, "/v1/polls/{poll_id}/live", api_live_sse},
        {TLY_M_GET, "/v1/polls/{poll_id}/ws", api_live_ws},
        {TLY_M_GET, "/v1/receipts/{receipt}", api_receipts_get},
        {TLY_M_GET, "/v1/join/{code}", api_join_get},
        {TLY_M_GET, "/j/{code}", api_join_redirect},
        {TLY_M_POST, "/v1/polls/{poll_id}/webhooks", api_webhooks_create},
        {TLY_M_GET, "/v1/polls/{poll_id}/webhooks", api_webhooks_list},
        {TLY_M_DELETE, "/v1/polls/{poll_id}/webhooks/{webhook_id}", api_webhooks_delete},
        {TLY_M_GET, "/healthz", api_ops_healthz},
        {TLY_M_GET, "/readyz", api_ops_readyz},
        {TLY_M_GET, "/metrics", api_ops_metrics},
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(routes); i++)
        if (tly_router_add(r, routes[i].methods, routes[i].pattern, routes[i].fn) != 0)
            return -1;
    return 0;
}

tly_app_t *tly_app_new(const tly_conf_t *conf, tly_loop_t *loop, const char *secret, char *err)
{
    tly_proxies_t proxies;
    char perr[160];
    if (tly_proxies_parse(conf->trusted_proxies, &proxies, perr, sizeof(perr)) != 0) {
        snprintf(err, 512, "--trusted-proxies: %s", perr);
        return NULL;
    }
    tly_app_t *app = tly_calloc(1, sizeof(*app));
    if (app == NULL) {
        snprintf(err, 512, "out of memory");
        return NULL;
    }
    if (api_cors_parse(conf->cors_origins, &app->cors, perr, sizeof(perr)) != 0 ||
        tly_proxies_parse(conf->webhook_allow, &app->webhook_allow, perr, sizeof(perr)) != 0) {
        snprintf(err, 512, "--cors-origins or --webhook-allow: %s", perr);
        tly_free(app);
        return NULL;
    }
    app->conf = conf;
    app->loop = loop;
    app->secret_len = strlen(secret);
    app->secret = (uint8_t *)tly_strdup(secret);
    app->registry = tly_registry_new();
    app->router = tly_router_new();
    app->store_waker = tly_waker_new(loop, on_store_wake, app);
    app->work.waker = tly_waker_new(loop, work_reap, app);
    if (app->secret != NULL && app->secret_len > 0 &&
        tly_jwt_verifier_new(app->secret, app->secret_len, &app->jwt) != 0)
        app->jwt = NULL;
    if (app->secret == NULL || app->jwt == NULL || app->registry == NULL || app->router == NULL ||
        app->store_waker == NULL || app->work.waker == NULL || add_routes(app->router) != 0) {
        snprintf(err, 512, "out of memory");
        goto fail;
    }
    if (conf->instance_id[0] != '\0') {
        snprintf(app->instance_id, sizeof(app->instance_id), "%s", conf->instance_id);
    } else {
        char host[48] = "tally";
        const char *port = strrchr(conf->listen, ':');
        gethostname(host, sizeof(host) - 1);
        snprintf(app->instance_id, sizeof(app->instance_id), "%s:%s", host, port ? port + 1 : "0");
    }
    pthread_mutex_init(&app->work.mu, NULL);
    pthread_cond_init(&app->work.cond, NULL);
    for (size_t i = 0; i < TLY_ARRAY_SIZE(app->work.threads); i++)
        pthread_create(&app->work.threads[i], NULL, work_main, app);

    tly_store_conf_t sc = {.url = conf->store,
                           .data_dir = conf->data_dir,
                           .origin = app->instance_id,
                           .batch_max = (size_t)conf->batch_max,
                           .notify = notify_store,
                           .notify_arg = app->store_waker};
    int rc = tly_store_open(&sc, &app->store);
    if (rc != 0) {
        snprintf(err, 512, "cannot open the store %s (error %d); see the log above",
                 conf->store[0] ? "named by --store" : conf->data_dir, rc);
        goto fail;
    }
    /* Instances sharing the store must agree on a closed poll's final results: they are
     * the store's (api_poll_settle), never a render's of this instance's counts. */
    tly_registry_set_final_by_store(app->registry, tly_store_shared(app->store));
    if ((rc = api_load(app)) != 0) {
        const char *where = conf->store[0] ? "named by --store" : conf->data_dir;
        if (rc == TLY_EINVAL)
            snprintf(err, 512,
                     "the store %s has rows that do not load, each named above (table, key, reason): repair or "
                     "delete them, or start with --skip-bad-rows to leave them out",
                     where);
        else
            snprintf(err, 512,
                     "cannot load the store %s (error %d): it could not be read, or PRAGMA quick_check found the "
                     "file damaged; the log line above says which",
                     where, rc);
        goto fail;
    }
    /* the ballots of one turn's requests go to the writer together (tly_store_hold) */
    tly_store_hold(app->store);
    tly_loop_on_turn_end(loop, release_writes, app);
    api_follow_init(app);
    if (api_bus_open(app, err) != 0)
        goto fail;
    if (api_ingest_open(app) != 0) {
        snprintf(err, 512, "out of memory");
        goto fail;
    }
    if (api_reconcile_init(app) != 0) {
        snprintf(err, 512, "out of memory");
        goto fail;
    }
    if (api_webhooks_open(app, err) != 0)
        goto fail;
    tly_server_conf_t hc = {.body_max = (size_t)conf->body_limit,
                            .head_max = (size_t)conf->head_limit,
                            .uri_max = (size_t)conf->uri_limit,
                            .head_timeout_ms = (uint64_t)conf->header_timeout * 1000,
                            .idle_timeout_ms = (uint64_t)conf->idle_timeout * 1000,
                            .max_connections = (size_t)conf->max_connections,
                            .max_connections_per_ip = (size_t)conf->max_connections_per_ip,
                            .trusted_proxies = proxies,
                            .handler = handle,
                            .arg = app,
                            .render_error = render_error,
                            .on_response = on_response};
    if (api_limits_init(app) != 0 || (app->live = api_live_new(app)) == NULL) {
        snprintf(err, 512, "out of memory");
        goto fail;
    }
    char herr[256];
    app->server = tly_server_new(loop, conf->listen, &hc, herr);
    if (app->server == NULL) {
        snprintf(err, 512, "cannot listen: %s", herr);
        goto fail;
    }
    if (conf->metrics_listen[0] != '\0') {
        tly_server_conf_t mc = hc;
        mc.handler = metrics_handle;
        mc.max_connections = 64; /* scrapers, not clients */
        mc.max_connections_per_ip = 0;
        if ((app->metrics_server = tly_server_new(loop, conf->metrics_listen, &mc, herr)) == NULL) {
            snprintf(err, 512, "cannot listen on --metrics-listen: %s", herr);
            goto fail;
        }
    }
    if (conf->web_root[0] != '\0' && !api_web_root_ok(conf->web_root))
        tly_log(TLY_LOG_WARN, "--web-root has no index.html: the web UI's pages will be 404 (leave --web-root empty to "
                "serve the copy compiled into the binary)", "web_root", conf->web_root, NULL);
    uint64_t fd_limit;
    size_t max_conns = tly_server_max_connections(app->server, &fd_limit);
    if (max_conns < (size_t)conf->max_connections) {
        char want[24], got[24], lim[24];
        snprintf(want, sizeof(want), "%ld", conf->max_connections);
        snprintf(got, sizeof(got), "%zu", max_conns);
        snprintf(lim, sizeof(lim), "%llu", (unsigned long long)fd_limit);
        tly_log(TLY_LOG_WARN, "--max-connections lowered to fit the open-file limit", "max_connections", want,
                "clamped_to", got, "fd_limit", lim, NULL);
    }
    return app;
fail:
    tly_app_free(app);
    return NULL;
}

int tly_app_port(tly_app_t *app) { return tly_server_port(app->server); }

int tly_app_metrics_port(tly_app_t *app) { return app->metrics_server ? tly_server_port(app->metrics_server) : 0; }

int tly_app_check_conf(const tly_conf_t *conf, char *err)
{
    char e[256];
    tly_proxies_t proxies;
    api_cors_t cors;
    if (tly_log_level_valid(conf->log_level) != 0) {
        snprintf(err, 512, "--log-level must be debug, info, warn or error, got \"%.100s\"", conf->log_level);
        return -1;
    }
    if (tly_listen_check(conf->listen, e) != 0) {
        snprintf(err, 512, "--listen: %s", e);
        return -1;
    }
    if (conf->metrics_listen[0] != '\0' && tly_listen_check(conf->metrics_listen, e) != 0) {
        snprintf(err, 512, "--metrics-listen: %s", e);
        return -1;
    }
    if (tly_proxies_parse(conf->trusted_proxies, &proxies, e, sizeof(e)) != 0) {
        snprintf(err, 512, "--trusted-proxies: %s", e);
        return -1;
    }
    if (api_cors_parse(conf->cors_origins, &cors, e, sizeof(e)) != 0) {
        snprintf(err, 512, "--cors-origins: %s", e);
        return -1;
    }
    if (tly_proxies_parse(conf->webhook_allow, &proxies, e, sizeof(e)) != 0) {
        snprintf(err, 512, "--webhook-allow: %s", e);
        return -1;
    }
    if (conf->store[0] != '\0' && strncmp(conf->store, "postgres://", 11) != 0 &&
        strncmp(conf->store, "postgresql://", 13) != 0) {
        snprintf(err, 512, "--store must be empty (SQLite in --data-dir) or a postgres:// URI");
        return -1;
    }
    if (conf->bus[0] != '\0' && strncmp(conf->bus, "redis://", 8) != 0) {
        snprintf(err, 512, "--bus must be empty or a redis:// URI");
        return -1;
    }
    return 0;
}

void tly_app_reloaded(tly_app_t *app)
{
    char e[256];
    if (api_cors_parse(app->conf->cors_origins, &app->cors, e, sizeof(e)) != 0) /* checked before */
        memset(&app->cors, 0, sizeof(app->cors));
}

void tly_app_stop_accepting(tly_app_t *app)
{
    if (app->server != NULL)
        tly_server_stop_accepting(app->server);
    if (app->metrics_server != NULL)
        tly_server_stop_accepting(app->metrics_server);
    api_live_shutdown(app->live);
}

bool tly_app_busy(tly_app_t *app) { return app->in_flight > 0; }

void tly_app_free(tly_app_t *app)
{
    if (app == NULL)
        return;
    /* From here on, callbacks that closing the store and the bus still run only release
     * what they hold (and answer 503): the app they would act on is going away. */
    app->closing = true;
    tly_loop_on_turn_end(app->loop, NULL, NULL); /* closing the store releases what it holds */
    api_reconcile_stop(app);                     /* a pass still queued for a worker does nothing */
    api_webhooks_close(app);                     /* before the loop goes: its timer and sockets */
    if (app->work.waker != NULL) {
        pthread_mutex_lock(&app->work.mu);
        app->work.stop = true;
        pthread_cond_broadcast(&app->work.cond);
        pthread_mutex_unlock(&app->work.mu);
        for (size_t i = 0; i < TLY_ARRAY_SIZE(app->work.threads); i++)
            if (app->work.threads[i])
                pthread_join(app->work.threads[i], NULL);
    }
    tly_store_reader_close(app->reader);
    if (app->store != NULL)
        tly_store_close(app->store);
    api_follow_free(app);
    api_links_free(app);
    api_ingest_close(app);
    tly_bus_close(app->bus);
    api_reconcile_free(app); /* after the bus: its last replies reach the job */
    api_live_shutdown(app->live);
    tly_server_free(app->server); /* closes open streams; their subscribers unlink */
    tly_server_free(app->metrics_server);
    api_live_free(app->live);
    api_limits_free(app);
    tly_router_free(app->router);
    tly_registry_free(app->registry);
    user_t *u, *tmp;
    HASH_ITER(hh_id, app->users_by_id, u, tmp) {
        HASH_DELETE(hh_id, app->users_by_id, u);
        HASH_DELETE(hh_name, app->users_by_name, u);
        tly_free(u->user_id);
        tly_free(u->username);
        tly_free(u->name_key);
        tly_free(u->password_hash);
        tly_free(u);
    }
    vote_request_t *r, *rtmp;
    HASH_ITER(hh, app->requests, r, rtmp) {
        /* cppcheck-suppress uninitvar ; HASH_ITER sets r */
        api_request_free(app, r);
    }
    api_pow_free(app);
    retracted_key_t *rk, *rktmp;
    HASH_ITER(hh, app->retracted, rk, rktmp) {
        HASH_DEL(app->retracted, rk);
        tly_free(rk->key);
        tly_free(rk);
    }
    poll_idem_t *pi, *pitmp;
    HASH_ITER(hh, app->poll_idem, pi, pitmp) {
        HASH_DEL(app->poll_idem, pi);
        tly_free(pi->key);
        tly_free(pi);
    }
    tly_waker_free(app->store_waker);
    tly_waker_free(app->work.waker);
    tly_jwt_verifier_free(app->jwt);
    tly_free(app->secret);
    tly_free(app);
}

/* ---- the secret ---- */

char *tly_secret_load(const char *data_dir, char *err)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/secret", data_dir);
    if (tly_mkdir_p(data_dir) != 0) {
        snprintf(err, 512, "cannot create data directory %.300s: %s", data_dir, strerror(errno));
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buf[257];
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
            n--;
        if (n < 16) {
            snprintf(err, 512, "%.300s is shorter than 16 characters; remove it to generate a new one", path);
            return NULL;
        }
        buf[n] = '\0';
        return tly_strdup(buf);
    }
    if (errno != ENOENT) {
        snprintf(err, 512, "cannot read %.300s: %s", path, strerror(errno));
        return NULL;
    }
    uint8_t raw[32];
    char hex[65];
    randombytes_buf(raw, sizeof(raw));
    sodium_bin2hex(hex, sizeof(hex), raw, sizeof(raw));
    /* O_EXCL: two processes starting at once must not both write a secret */
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno == EEXIST)
            return tly_secret_load(data_dir, err);
        snprintf(err, 512, "cannot create %.300s: %s", path, strerror(errno));
        return NULL;
    }
    char line[66];
    snprintf(line, sizeof(line), "%s\n", hex);
    if (write(fd, line, 65) != 65 || fsync(fd) != 0) {
        snprintf(err, 512, "cannot write %.300s: %s", path, strerror(errno));
        close(fd);
        unlink(path);
        return NULL;
    }
    close(fd);
    tly_log(TLY_LOG_INFO, "generated a new server secret", "path", path, NULL);
    return tly_strdup(hex);
}
