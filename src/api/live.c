/*
 * live.c: live results over Server-Sent Events (GET /v1/polls/{poll_id}/live) and
 * WebSocket (GET /v1/polls/{poll_id}/ws), one subscriber model for both.
 *
 * Coalescing: a timer ticks every --live-tick ms. For each watched poll whose counts or
 * status changed since the last tick, the results are rendered once (the cached
 * rendering of core) and offered to every subscriber. A subscriber whose socket still
 * holds unwritten data is only marked: when its socket drains it gets the newest state,
 * never a backlog. So a slow reader costs at most one pending message and never slows
 * the vote path or other readers; one that makes no progress for 30 s is dropped. A big
 * ranked poll is not counted on the loop (results.c): a subscriber gets the newest
 * rendering at hand, with the seq it shows in its event id, and the next one once counted.
 *
 * Visibility is decided per subscriber on every offer, so a voter on an after_vote poll
 * starts with a state without counts and receives the counts once their ballot commits.
 * A subscriber who may not see the counts learns nothing that moves with the ballots:
 * the state it gets has no count, its id (state_id) does not move with them, and it gets
 * a message only when that state changes (the poll's status, visibility, options).
 *
 * Threads: the loop thread only.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

#define PING_MS 15000
#define STALL_MS 30000
#define RETRY_MS 2000

typedef struct sub sub_t;
typedef struct live_poll live_poll_t;

struct sub {
    sub_t *prev, *next; /* in its live_poll */
    live_poll_t *lp;
    live_t *live;
    tly_req_t *req;
    bool ws;         /* WebSocket rather than SSE */
    char *caller_id; /* NULL for anonymous watchers */
    char ip[48];
    uint64_t sent_id;         /* state_id of the state the client has (sent, or resumed from) */
    uint64_t last_label;      /* the largest id this connection carried */
    uint64_t sent_hidden_ver; /* the live_poll's hidden_ver of the hidden state sent */
    bool sent_visible, sent_any;
    bool want; /* a newer state waits for the socket to drain */
    uint64_t last_progress, last_write;
    const char *close_reason; /* WebSocket: close once the last message has drained */
};

struct live_poll {
    UT_hash_handle hh;
    char poll_id[TLY_POLL_ID_LEN + 1];
    sub_t *subs;
    size_t nsubs;
    uint64_t seen_seq, seen_edits;
    int seen_status;
    char *hidden; /* state without counts, rebuilt when the status or the poll changes */
    int hidden_status;
    uint64_t hidden_edits;
    uint64_t hidden_ver; /* grows when the text of `hidden` changes */
    bool pass_changed;   /* counts, status or the poll changed since the previous pass */
};

typedef struct ip_count {
    UT_hash_handle hh;
    char ip[48];
    size_t n;
} ip_count_t;

struct live {
    tly_app_t *app;
    live_poll_t *polls;
    ip_count_t *ips;
    size_t nsubs;
    tly_timer_t tick, step;
    bool stopping;
    /* the pass in progress: the next subscriber to visit */
    bool in_pass;
    live_poll_t *cur_lp;
    sub_t *cur_sub;
};

static live_t *the_live; /* the timer callback's way back (one app per process) */

size_t api_live_subscribers(live_t *l) { return l ? l->nsubs : 0; }

/* ---- rendering ---- */

static const char *hidden_state(live_poll_t *lp, const tly_poll_t *p, int status)
{
    if (lp->hidden != NULL && lp->hidden_status == status && lp->hidden_edits == p->edits)
        return lp->hidden;
    json_t *opts = json_array();
    for (size_t i = 0; i < p->noptions; i++)
        json_array_append_new(
            opts, json_pack("{s:s, s:s}", "option_id", p->options[i].option_id, "label", p->options[i].text));
    json_t *o = json_pack("{s:s, s:s, s:b, s:s, s:o}", "poll_id", p->poll_id, "status",
                          tly_poll_status_name((tly_poll_status_t)status), "results_hidden", 1, "results_visibility",
                          tly_visibility_name(p->settings.results_visibility), "options", opts);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (s == NULL)
        return NULL;
    if (lp->hidden == NULL || strcmp(lp->hidden, s) != 0) {
        char *copy = tly_strdup(s);
        if (copy == NULL) {
            free(s);
            return NULL;
        }
        tly_free(lp->hidden);
        lp->hidden = copy;
        lp->hidden_ver++;
    }
    free(s);
    lp->hidden_status = status;
    lp->hidden_edits = p->edits;
    return lp->hidden;
}

/* ---- transport: SSE or WebSocket ---- */

static size_t sub_pending(sub_t *s) { return s->ws ? tly_ws_pending(s->req) : tly_req_stream_pending(s->req); }

static void sub_end(sub_t *s, const char *reason)
{
    /* wslay sends control frames ahead of queued messages, so the close frame waits until
     * the final message is on the wire (on_drain) */
    if (s->ws && tly_ws_pending(s->req) > 0)
        s->close_reason = reason;
    else if (s->ws)
        tly_ws_close(s->req, 1000, reason);
    else
        tly_req_stream_end(s->req);
}

static void sub_ping(sub_t *s)
{
    if (s->ws)
        tly_ws_ping(s->req);
    else
        tly_req_stream_write(s->req, ": ping\n\n", 8);
}

static int write_event(sub_t *s, const char *event, uint64_t id, const char *data)
{
    if (s->ws) {
        /* {"type":"results","seq":N,"data":{...}}: data is spliced in, already JSON */
        size_t dlen = strlen(data);
        char head[80];
        int n =
            id ? snprintf(head, sizeof(head), "{\"type\":\"%s\",\"seq\":%llu,\"data\":", event, (unsigned long long)id)
               : snprintf(head, sizeof(head), "{\"type\":\"%s\",\"data\":", event);
        char *msg = tly_malloc((size_t)n + dlen + 2);
        if (msg == NULL)
            return TLY_ENOMEM;
        memcpy(msg, head, (size_t)n);
        memcpy(msg + n, data, dlen);
        msg[(size_t)n + dlen] = '}';
        int rc = tly_ws_send_text(s->req, msg, (size_t)n + dlen + 1);
        tly_free(msg);
        s->last_write = tly_loop_now(s->live->app->loop);
        return rc == TLY_ENOMEM ? TLY_ENOMEM : 0;
    }
    /* one event, one stream write: a write per piece would cost a syscall each */
    char head[96];
    int n = id ? snprintf(head, sizeof(head), "event: %s\nid: %llu\ndata: ", event, (unsigned long long)id)
               : snprintf(head, sizeof(head), "event: %s\ndata: ", event);
    size_t dlen = strlen(data), total = (size_t)n + dlen + 2;
    char *msg = tly_malloc(total);
    if (msg == NULL)
        return TLY_ENOMEM;
    memcpy(msg, head, (size_t)n);
    memcpy(msg + n, data, dlen);
    memcpy(msg + n + dlen, "\n\n", 2);
    int rc = tly_req_stream_write(s->req, msg, total);
    tly_free(msg);
    if (rc != 0)
        return TLY_ENOMEM;
    s->last_write = tly_loop_now(s->live->app->loop);
    return 0;
}

/*
 * The event id (SSE `id:`, WebSocket `seq`) names the state a caller is sent:
 *
 *   with counts:    id_base + 2 * (3 * (seq + edits) + status) + 2
 *   without counts: id_base + 2 * (3 * edits + status) + 1
 *
 * seq counts the committed changes to counts (cast, change, retraction), edits the
 * changes to the poll itself, status is 0 draft, 1 active, 2 closed and only moves
 * forward. So:
 *   - the id of a state without counts never moves with a ballot: it changes only when
 *     the poll is edited or its status moves, and carries no count;
 *   - two states a caller can be sent have two ids (counts or not is the low bit), so
 *     Last-Event-ID equal to the caller's current id means the client has it;
 *   - a caller who becomes allowed to see the counts (their ballot commits, the poll
 *     closes, the owner opens them) gets a larger id than any id without counts before.
 * A caller who loses the counts (the owner hides them, their ballot is retracted on an
 * after_vote poll) would get a smaller id: within one connection ids never go down (that
 * message carries the previous id + 1, see offer), and a client that resumes with such
 * an id gets the state again, as after any id that is not the current one.
 * seq and edits restart when the server starts (seq from the stored ballots), so ids
 * carry a base taken from the start time in microseconds: ids of a later run are larger
 * than any id of an earlier one unless that run made more than one change every 6
 * microseconds of its uptime. They stay below 2^53, so JavaScript reads them exactly.
 */
static uint64_t id_base;

/* The id of the state of p with counts as of seq (a big ranked poll's rendering may
 * show an older seq than p's: api_results_current), or without counts. */
static uint64_t state_id(const tly_poll_t *p, uint64_t seq, int status, bool visible)
{
    return visible ? id_base + 2 * (3 * (seq + p->edits) + (uint64_t)status) + 2
                   : id_base + 2 * (3 * p->edits + (uint64_t)status) + 1;
}

/* What the caller may see of p now. */
static bool caller_sees(tly_poll_t *p, const char *caller_id, int64_t now)
{
    tly_vote_t *mine = caller_id != NULL ? tly_poll_find_vote(p, caller_id) : NULL;
    bool voted = mine != NULL && mine->state == TLY_VOTE_COMMITTED;
    return tly_results_visible(p, caller_id, voted, now);
}

/* Offers the poll's current state to s: sent now if its socket is idle, else later. */
static void offer(sub_t *s, tly_poll_t *p, int64_t now)
{
    if (s->close_reason != NULL)
        return; /* ending */
    int status = (int)tly_poll_effective_status(p, now);
    if (status == TLY_STATUS_CLOSED && p->final_by_store && tly_poll_final_results(p) == NULL) {
        /* closed, but the store has not settled the final results yet (api_poll_settle,
         * on every tick): the closing message carries them, on a later tick */
        s->want = true;
        return;
    }
    bool visible = caller_sees(p, s->caller_id, now);
    /* a big ranked poll is counted on a worker: the rendering at hand may show an older
     * seq than p's, and then the newer one follows once counted (want) */
    uint64_t seq = p->seq;
    const char *data = visible ? api_results_current(s->live->app, p, now, &seq) : hidden_state(s->lp, p, status);
    uint64_t id = state_id(p, seq, status, visible);
    if (data == NULL || (visible && s->sent_any && s->sent_visible && id < s->sent_id)) {
        /* none yet, out of memory, or older than a state this one was sent: try again
         * on the next tick */
        s->want = true;
        return;
    }
    /* nothing new: the same state, or (without counts) the same text under a new id, as
     * after an edit of the title, which such a state does not show */
    bool same = s->sent_any && s->sent_visible == visible &&
                (s->sent_id == id || (!visible && s->sent_hidden_ver == s->lp->hidden_ver));
    if (same) {
        if (status == TLY_STATUS_CLOSED && sub_pending(s) == 0) {
            /* a client that resumed with the final state's id: just say it is over */
            write_event(s, "closed", 0, "{}");
            sub_end(s, "poll closed");
        }
        return; /* nothing new for this one */
    }
    if (sub_pending(s) > 0) {
        s->want = true;
        return;
    }
    s->want = visible && seq != p->seq;
    /* ids never go down within one connection (see state_id) */
    uint64_t label = id > s->last_label ? id : s->last_label + 1;
    if (write_event(s, "results", label, data) != 0) {
        s->want = true; /* out of memory: try again on the next tick */
        return;
    }
    s->sent_any = true;
    s->sent_id = id;
    s->last_label = label;
    s->sent_visible = visible;
    s->sent_hidden_ver = visible ? 0 : s->lp->hidden_ver;
    if (status == TLY_STATUS_CLOSED) {
        /* final message, then the stream ends; clients need not reconnect */
        write_event(s, "closed", 0, "{}");
        sub_end(s, "poll closed");
    }
}

/* ---- subscribers ---- */

static void sub_unlink(sub_t *s)
{
    live_t *l = s->live;
    live_poll_t *lp = s->lp;
    if (l->cur_sub == s) /* the pass in progress must not visit a freed subscriber */
        l->cur_sub = s->next;
    if (s->prev)
        s->prev->next = s->next;
    else
        lp->subs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    lp->nsubs--;
    l->nsubs--;
    ip_count_t *ic;
    HASH_FIND_STR(l->ips, s->ip, ic);
    if (ic != NULL && --ic->n == 0) {
        HASH_DEL(l->ips, ic);
        tly_free(ic);
    }
    if (lp->nsubs == 0) {
        if (l->cur_lp == lp) {
            l->cur_lp = lp->hh.next;
            l->cur_sub = l->cur_lp ? l->cur_lp->subs : NULL;
        }
        HASH_DEL(l->polls, lp);
        tly_free(lp->hidden);
        tly_free(lp);
    }
    tly_free(s->caller_id);
    tly_free(s);
}

static void on_close(tly_req_t *req, void *arg) { sub_unlink(arg); }

static void on_drain(tly_req_t *req, void *arg)
{
    sub_t *s = arg;
    s->last_progress = tly_loop_now(s->live->app->loop);
    if (s->close_reason != NULL) {
        const char *reason = s->close_reason;
        s->close_reason = NULL;
        tly_ws_close(req, 1000, reason);
        return;
    }
    if (!s->want)
        return;
    tly_poll_t *p = tly_registry_find_poll(s->live->app->registry, s->lp->poll_id);
    if (p != NULL)
        offer(s, p, tly_now_ms());
}

/*
 * Fan-out runs in passes. A tick starts a pass unless the previous one is still going
 * (then the effective tick stretches: under heavy fan-out watchers get fewer, never
 * staler, messages). A pass visits at most STEP_SUBS subscribers per loop turn and then
 * yields, so requests (votes above all) are served between slices instead of waiting for
 * a pass over every subscriber: one write per subscriber is a system call each, and
 * 19,000 of them take longer than a tick.
 */
#define STEP_SUBS 256

static void visit(live_t *l, sub_t *s, live_poll_t *lp, tly_poll_t *p, int64_t now, uint64_t mono)
{
    if (p == NULL) { /* deleted */
        write_event(s, "deleted", 0, "{}");
        sub_end(s, "poll deleted");
    } else if (sub_pending(s) > 0 && mono - s->last_progress > STALL_MS) {
        tly_log(TLY_LOG_INFO, "live subscriber dropped: no progress for 30 s", "poll_id", lp->poll_id, "peer", s->ip,
                NULL);
        tly_req_stream_abort(s->req);
    } else if (lp->pass_changed || s->want || !s->sent_any) {
        offer(s, p, now);
    } else if (mono - s->last_write >= PING_MS && sub_pending(s) == 0) {
        s->last_write = mono;
        sub_ping(s);
    }
}

static void on_step(tly_timer_t *t)
{
    live_t *l = the_live;
    tly_app_t *app = l->app;
    int64_t now = tly_now_ms();
    uint64_t mono = tly_loop_now(app->loop);
    size_t budget = STEP_SUBS;
    while (l->cur_lp != NULL && budget > 0) {
        sub_t *s = l->cur_sub;
        if (s == NULL) {
            l->cur_lp = l->cur_lp->hh.next;
            l->cur_sub = l->cur_lp ? l->cur_lp->subs : NULL;
            continue;
        }
        l->cur_sub = s->next; /* before visiting: s may be freed (sub_unlink keeps this right) */
        live_poll_t *lp = s->lp;
        visit(l, s, lp, tly_registry_find_poll(app->registry, lp->poll_id), now, mono);
        budget--;
    }
    if (l->cur_lp == NULL)
        l->in_pass = false;
    else if (!l->stopping)
        tly_timer_start(app->loop, &l->step, 1, on_step);
}

static void on_tick(tly_timer_t *t)
{
    live_t *l = the_live;
    tly_app_t *app = l->app;
    if (!l->in_pass && l->polls != NULL) {
        int64_t now = tly_now_ms();
        live_poll_t *lp, *lptmp;
        HASH_ITER(hh, l->polls, lp, lptmp) {
            tly_poll_t *p = tly_registry_find_poll(app->registry, lp->poll_id);
            if (p == NULL) {
                lp->pass_changed = true;
                continue;
            }
            api_poll_settle(app, p, now);
            int status = (int)tly_poll_effective_status(p, now);
            /* cppcheck-suppress uninitvar ; HASH_ITER sets lp, whose fields are calloc'd */
            lp->pass_changed = p->seq != lp->seen_seq || p->edits != lp->seen_edits || status != lp->seen_status;
            lp->seen_seq = p->seq;
            lp->seen_edits = p->edits;
            lp->seen_status = status;
        }
        l->in_pass = true;
        l->cur_lp = l->polls;
        l->cur_sub = l->cur_lp->subs;
        on_step(&l->step);
    }
    if (!l->stopping)
        tly_timer_start(app->loop, &l->tick, (uint64_t)app->conf->live_tick, on_tick);
}

static void on_ws_text(tly_req_t *req, const char *msg, size_t len, void *arg)
{
    sub_t *s = arg;
    json_t *m = json_loadb(msg, len, 0, NULL);
    const char *type = json_string_value(json_object_get(m, "type"));
    if (type != NULL && strcmp(type, "ping") == 0) {
        static const char pong[] = "{\"type\":\"pong\"}";
        tly_ws_send_text(s->req, pong, sizeof(pong) - 1);
    } else {
        static const char err[] =
            "{\"type\":\"error\",\"error\":{\"code\":\"UNKNOWN_MESSAGE\",\"message\":\"the server accepts "
            "{\\\"type\\\":\\\"ping\\\"} only\"}}";
        tly_ws_send_text(s->req, err, sizeof(err) - 1);
    }
    json_decref(m);
}

static void subscribe(tly_req_t *req, const tly_params_t *params, tly_app_t *app, bool ws);

void api_live_sse(tly_req_t *req, const tly_params_t *params, void *arg) { subscribe(req, params, arg, false); }

void api_live_ws(tly_req_t *req, const tly_params_t *params, void *arg)
{
    if (!tly_req_wants_websocket(req)) {
        tly_req_add_header(req, "Upgrade", "websocket");
        api_respond_error(req, 426, "UPGRADE_REQUIRED", "this endpoint speaks WebSocket only", NULL);
        return;
    }
    subscribe(req, params, arg, true);
}

static void subscribe(tly_req_t *req, const tly_params_t *params, tly_app_t *app, bool ws)
{
    live_t *l = app->live;
    caller_t caller;
    tly_str_t qtoken;
    if (tly_req_header(req, "authorization").ptr == NULL && tly_req_query_param(req, "access_token", &qtoken)) {
        if (!api_caller_token(app, req, qtoken, &caller))
            return;
    } else if (!api_caller(app, req, false, &caller)) {
        return;
    }
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    if (l->stopping) {
        tly_req_add_header(req, "Retry-After", "2");
        api_respond_error(req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
        return;
    }
    const char *ip = tly_req_client(req);
    ip_count_t *ic;
    HASH_FIND_STR(l->ips, ip, ic);
    if (l->nsubs >= (size_t)app->conf->live_max || (ic != NULL && ic->n >= (size_t)app->conf->live_max_per_ip)) {
        tly_req_add_header(req, "Retry-After", "10");
        api_respond_error(req, 503, "TOO_MANY_SUBSCRIBERS",
                          l->nsubs >= (size_t)app->conf->live_max
                              ? "this server has as many live subscribers as it accepts"
                              : "too many live subscribers from your address",
                          NULL);
        return;
    }
    if (tly_req_client_gone(req)) {
        /* it left while its token or the poll was looked up: nobody to stream to, and
         * tly_req_stream_start would run on_close (freeing the subscriber) before the
         * code below is done with it */
        api_respond_error(req, 503, "UNAVAILABLE", "the client is gone", NULL);
        return;
    }
    sub_t *s = tly_calloc(1, sizeof(*s));
    live_poll_t *lp;
    HASH_FIND_STR(l->polls, p->poll_id, lp);
    bool new_lp = lp == NULL, new_ic = ic == NULL;
    if (new_lp && (lp = tly_calloc(1, sizeof(*lp))) != NULL) {
        memcpy(lp->poll_id, p->poll_id, sizeof(lp->poll_id));
        lp->seen_seq = p->seq;
        lp->seen_edits = p->edits;
        lp->seen_status = -1;
    }
    if (new_ic && (ic = tly_calloc(1, sizeof(*ic))) != NULL)
        snprintf(ic->ip, sizeof(ic->ip), "%s", ip);
    if (s == NULL || lp == NULL || ic == NULL || (caller.present && (s->caller_id = tly_strdup(caller.id)) == NULL)) {
        if (s)
            tly_free(s->caller_id);
        tly_free(s);
        if (new_lp)
            tly_free(lp);
        if (new_ic)
            tly_free(ic);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    if (new_lp)
        HASH_ADD_STR(l->polls, poll_id, lp);
    if (new_ic)
        HASH_ADD_STR(l->ips, ip, ic);
    ic->n++;
    snprintf(s->ip, sizeof(s->ip), "%s", ip);
    s->live = l;
    s->lp = lp;
    s->req = req;
    s->next = lp->subs;
    if (lp->subs)
        lp->subs->prev = s;
    lp->subs = s;
    lp->nsubs++;
    l->nsubs++;
    s->last_progress = s->last_write = tly_loop_now(app->loop);

    /* Last-Event-ID: a client that already has the current state waits for the next */
    tly_str_t last = tly_req_header(req, "last-event-id");
    int64_t now = tly_now_ms();
    if (last.ptr != NULL && last.len > 0 && last.len < 21) {
        char buf[24];
        memcpy(buf, last.ptr, last.len);
        buf[last.len] = '\0';
        char *end;
        unsigned long long id = strtoull(buf, &end, 10);
        int status = (int)tly_poll_effective_status(p, now);
        bool visible = caller_sees(p, caller.present ? caller.id : NULL, now);
        if (*end == '\0' && id == state_id(p, p->seq, status, visible)) {
            s->sent_any = true;
            s->sent_id = s->last_label = id;
            s->sent_visible = visible;
            if (!visible && hidden_state(lp, p, status) != NULL)
                s->sent_hidden_ver = lp->hidden_ver;
        }
    }
    s->ws = ws;
    if (ws) {
        tly_ws_cb_t wcb = {
            .on_text = on_ws_text, .on_drain = on_drain, .on_close = on_close, .arg = s, .max_message = 4096};
        if (tly_req_ws_accept(req, &wcb) != 0) {
            sub_unlink(s); /* answered 400/503 already */
            return;
        }
    } else {
        tly_req_add_header(req, "Cache-Control", "no-store");
        tly_req_add_header(req, "X-Accel-Buffering", "no");
        tly_stream_cb_t cb = {.on_drain = on_drain, .on_close = on_close, .arg = s};
        tly_req_stream_start(req, 200, "text/event-stream; charset=utf-8", &cb);
        char retry[32];
        int n = snprintf(retry, sizeof(retry), "retry: %d\n\n", RETRY_MS);
        tly_req_stream_write(req, retry, (size_t)n);
    }
    offer(s, p, now);
}

live_t *api_live_new(tly_app_t *app)
{
    live_t *l = tly_calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    l->app = app;
    the_live = l;
    id_base = (uint64_t)tly_now_ms() * 1000;
    tly_timer_start(app->loop, &l->tick, (uint64_t)app->conf->live_tick, on_tick);
    return l;
}

void api_live_shutdown(live_t *l)
{
    if (l == NULL || l->stopping)
        return;
    l->stopping = true;
    tly_timer_stop(&l->tick);
    tly_timer_stop(&l->step);
    l->in_pass = false;
    l->cur_lp = NULL;
    l->cur_sub = NULL;
    live_poll_t *lp, *lptmp;
    HASH_ITER(hh, l->polls, lp, lptmp) {
        for (sub_t *s = lp->subs, *next; s != NULL; s = next) {
            next = s->next;
            bool last = next == NULL;
            if (s->ws) {
                tly_ws_close(s->req, 1001, "server shutting down; reconnect shortly");
            } else {
                tly_req_stream_write(s->req, "retry: 1000\n\n", 13);
                tly_req_stream_end(s->req);
            }
            if (last)
                break;
        }
    }
}

void api_live_free(live_t *l)
{
    if (l == NULL)
        return;
    tly_timer_stop(&l->tick);
    tly_timer_stop(&l->step);
    /* streams still open are closed by the server, whose on_close unlinks them */
    the_live = NULL;
    tly_free(l);
}
