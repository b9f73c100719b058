/*
 * webhooks.c: signed webhooks. A poll's owner registers URLs (POST/GET/DELETE
 * /v1/polls/{poll_id}/webhooks) for events of the poll:
 *   poll.closed      once, when the poll is closed and its final results are settled;
 *   vote.threshold   once, when its committed ballots reach `threshold`;
 *   results.changed  when its counts changed, at most once per `min_interval` seconds
 *                    (the latest results then).
 * Events are read from memory on a tick (TICK_MS), and memory's counts move only after
 * the store committed (docs/ARCHITECTURE.md, "The vote path"): nothing uncommitted is
 * ever delivered. Each delivery is a POST of {"delivery_id","event","webhook_id",
 * "poll_id","created_at","data": the results} signed like Stripe's and GitHub's:
 * `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the
 * webhook's secret>`, made anew for each attempt. A delivery that gets no 2xx is
 * retried after --webhook-backoff-ms, doubling each time, until --webhook-attempts
 * attempts; then it goes to the webhook's dead-letter list, which its owner reads with
 * GET. A destination that is not a public address (loopback, private, link-local, ...)
 * is refused unless --webhook-allow lists it: at registration when the URL names an
 * address, and at every connection after name resolution (src/http/client.c).
 *
 * Where they live: DATA_DIR/webhooks.json, written whole (a temporary file, fsync,
 * rename) on a worker thread after each registration, deletion, dead letter and
 * once-only event, one write at a time; a registration or deletion is answered once
 * it is on disk. Deliveries waiting for a retry are in memory only: a restart drops
 * them. With a shared store the webhooks are the instance's that took them (its data
 * directory), and that instance delivers them, so each event goes out once.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

#define TICK_MS 250
#define MAX_PER_POLL 10
#define MAX_DEAD 50          /* dead letters kept per webhook, the newest */
#define MAX_QUEUED 10000     /* deliveries waiting at most; beyond, straight to dead letters */
#define MAX_IN_FLIGHT 32     /* POSTs at once */
#define MAX_BACKOFF_MS 3600000
#define URL_MAX 2048

enum { EV_CLOSED = 1, EV_THRESHOLD = 2, EV_CHANGED = 4 };
static const struct {
    unsigned bit;
    const char *name;
} event_names[] = {{EV_CLOSED, "poll.closed"}, {EV_THRESHOLD, "vote.threshold"}, {EV_CHANGED, "results.changed"}};

typedef struct {
    char delivery_id[24];
    const char *event; /* static */
    int attempts;
    int last_status;
    char *last_error;
    int64_t failed_at;
    char *payload;
} dead_t;

typedef struct webhook {
    UT_hash_handle hh; /* api_webhooks.by_id */
    char id[24];
    char poll_id[TLY_POLL_ID_LEN + 1];
    char *url;
    unsigned events;
    long threshold;
    long min_interval; /* seconds */
    char secret[64];
    int64_t created_at;
    bool threshold_fired, closed_fired;
    bool seen;         /* last_seq holds the poll's seq as last looked at */
    uint64_t last_seq;
    int64_t last_sent; /* ms: the last results.changed */
    uint64_t delivered, failed;
    dead_t dead[MAX_DEAD];
    size_t ndead; /* the oldest is dropped beyond MAX_DEAD */
} webhook_t;

struct api_webhooks;

typedef struct delivery {
    struct delivery *next;
    struct api_webhooks *wh;
    char id[24];
    char webhook_id[24];
    const char *event;
    char *body;
    int attempts;
    int64_t due; /* ms */
    bool sending;
} delivery_t;

/* a request waiting for the file to hold its change */
typedef struct save_wait {
    struct save_wait *next;
    tly_req_t *req;
    int status; /* what to answer once saved */
    char *body; /* heap; NULL for 204 */
} save_wait_t;

typedef struct {
    work_t work;
    tly_app_t *app;
    char *path, *text;
    int rc;
    save_wait_t *waits;
} save_t;

struct api_webhooks {
    webhook_t *by_id;
    delivery_t *queue;
    size_t queued;
    tly_client_t *client;
    tly_timer_t tick;
    tly_app_t *app;
    long attempts, backoff_ms;
    char path[4096];
    bool saving, dirty;
    save_wait_t *waiting; /* for the next save */
};

/* ---- the file ---- */

static json_t *webhook_json(const webhook_t *w, bool with_secret, bool with_state)
{
    json_t *ev = json_array();
    for (size_t i = 0; i < TLY_ARRAY_SIZE(event_names); i++)
        if (w->events & event_names[i].bit)
            json_array_append_new(ev, json_string(event_names[i].name));
    char created[TLY_TIME_LEN];
    tly_time_format(w->created_at, created);
    json_t *o = json_pack("{s:s, s:s, s:s, s:o, s:I, s:s}", "webhook_id", w->id, "poll_id", w->poll_id, "url", w->url,
                          "events", ev, "min_interval", (json_int_t)w->min_interval, "created_at", created);
    if (o == NULL)
        return NULL;
    if (w->events & EV_THRESHOLD)
        json_object_set_new(o, "threshold", json_integer(w->threshold));
    if (with_secret)
        json_object_set_new(o, "secret", json_string(w->secret));
    if (with_state) {
        json_t *dead = json_array();
        for (size_t i = 0; i < w->ndead; i++) {
            const dead_t *d = &w->dead[i];
            char at[TLY_TIME_LEN];
            tly_time_format(d->failed_at, at);
            json_t *payload = d->payload ? json_loads(d->payload, 0, NULL) : NULL;
            json_array_append_new(dead, json_pack("{s:s, s:s, s:i, s:i, s:s?, s:s, s:o?}", "delivery_id",
                                                  d->delivery_id, "event", d->event, "attempts", d->attempts,
                                                  "last_status", d->last_status, "last_error", d->last_error,
                                                  "failed_at", at, "payload", payload));
        }
        json_object_set_new(o, "dead_letters", dead);
        json_object_set_new(o, "delivered", json_integer((json_int_t)w->delivered));
        json_object_set_new(o, "failed", json_integer((json_int_t)w->failed));
    }
    return o;
}

/* What the file holds: every webhook with its secret, its once-only events' state and
 * its dead letters. */
static char *file_text(struct api_webhooks *wh)
{
    json_t *list = json_array();
    webhook_t *w, *tmp;
    HASH_ITER(hh, wh->by_id, w, tmp) {
        /* cppcheck-suppress uninitvar ; HASH_ITER sets w */
        json_t *o = webhook_json(w, true, true);
        if (o == NULL) {
            json_decref(list);
            return NULL;
        }
        json_object_set_new(o, "threshold_fired", json_boolean(w->threshold_fired));
        json_object_set_new(o, "closed_fired", json_boolean(w->closed_fired));
        json_array_append_new(list, o);
    }
    json_t *doc = json_pack("{s:i, s:o}", "version", 1, "webhooks", list);
    char *s = doc ? json_dumps(doc, JSON_INDENT(1)) : NULL;
    json_decref(doc);
    return s;
}

static void save_run(work_t *work)
{
    save_t *s = (save_t *)work;
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", s->path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    size_t len = strlen(s->text);
    s->rc = 0;
    if (fd < 0 || write(fd, s->text, len) != (ssize_t)len || fsync(fd) != 0)
        s->rc = -errno;
    if (fd >= 0)
        close(fd);
    if (s->rc == 0 && rename(tmp, s->path) != 0)
        s->rc = -errno;
    if (s->rc == 0) { /* the rename itself durable */
        char dir[4200];
        snprintf(dir, sizeof(dir), "%s", s->path);
        char *slash = strrchr(dir, '/');
        if (slash != NULL)
            *slash = '\0';
        int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            if (fsync(dfd) != 0)
                s->rc = -errno;
            close(dfd);
        }
    }
}

static void save_start(struct api_webhooks *wh);

static void save_done(work_t *work)
{
    save_t *s = (save_t *)work;
    struct api_webhooks *wh = s->app->webhooks;
    api_end_async(s->app);
    if (s->rc != 0)
        tly_log(TLY_LOG_ERROR, "webhooks: cannot write the file", "path", s->path, "error", strerror(-s->rc), NULL);
    for (save_wait_t *w = s->waits, *next; w != NULL; w = next) {
        next = w->next;
        if (s->rc != 0)
            api_respond_store_error(w->req, TLY_EIO);
        else if (w->body != NULL)
            api_respond_raw_json(w->req, w->status, w->body, strlen(w->body));
        else
            tly_req_respond(w->req, w->status, NULL, NULL, 0);
        free(w->body);
        tly_free(w);
    }
    free(s->text);
    tly_free(s->path);
    tly_free(s);
    if (wh != NULL) {
        wh->saving = false;
        if (wh->dirty)
            save_start(wh);
    }
}

/* Writes the file on a worker: now, or after the write under way (one at a time, so
 * that an older snapshot never replaces a newer one). */
static void save_start(struct api_webhooks *wh)
{
    if (wh->saving) {
        wh->dirty = true;
        return;
    }
    wh->dirty = false;
    save_t *s = tly_calloc(1, sizeof(*s));
    char *text = file_text(wh);
    char *path = tly_strdup(wh->path);
    if (s == NULL || text == NULL || path == NULL) {
        tly_free(s);
        free(text);
        tly_free(path);
        tly_log(TLY_LOG_ERROR, "webhooks: out of memory writing the file", NULL);
        for (save_wait_t *w = wh->waiting, *next; w != NULL; w = next) {
            next = w->next;
            tly_req_add_header(w->req, "Retry-After", "1");
            api_respond_error(w->req, 503, "UNAVAILABLE", "out of memory", NULL);
            free(w->body);
            tly_free(w);
        }
        wh->waiting = NULL;
        return;
    }
    s->work.run = save_run;
    s->work.done = save_done;
    s->app = wh->app;
    s->text = text;
    s->path = path;
    s->waits = wh->waiting;
    wh->waiting = NULL;
    wh->saving = true;
    api_begin_async(wh->app);
    api_work_submit(wh->app, &s->work);
}

/* Answers req with status and body (stolen; NULL for none) once the file holds what
 * memory holds now. */
static void save_then_answer(struct api_webhooks *wh, tly_req_t *req, int status, json_t *body)
{
    save_wait_t *w = tly_calloc(1, sizeof(*w));
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (w == NULL || (body != NULL && text == NULL)) {
        tly_free(w);
        free(text);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    w->req = req;
    w->status = status;
    w->body = text;
    w->next = wh->waiting;
    wh->waiting = w;
    if (wh->saving)
        wh->dirty = true;
    else
        save_start(wh);
}

static void dead_clear(dead_t *d)
{
    tly_free(d->last_error);
    tly_free(d->payload);
    memset(d, 0, sizeof(*d));
}

static void webhook_free(webhook_t *w)
{
    for (size_t i = 0; i < w->ndead; i++)
        dead_clear(&w->dead[i]);
    tly_free(w->url);
    tly_free(w);
}

static const char *event_static(const char *name)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(event_names); i++)
        if (name != NULL && strcmp(event_names[i].name, name) == 0)
            return event_names[i].name;
    return NULL;
}

static unsigned event_bit(const char *name)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(event_names); i++)
        if (name != NULL && strcmp(event_names[i].name, name) == 0)
            return event_names[i].bit;
    return 0;
}

/* Reads the file at start; a file that does not parse refuses the start. */
static int load_file(struct api_webhooks *wh, char *err)
{
    json_error_t jerr;
    json_t *doc = json_load_file(wh->path, 0, &jerr);
    if (doc == NULL) {
        struct stat st;
        if (stat(wh->path, &st) != 0 && errno == ENOENT)
            return 0;
        snprintf(err, 512, "%.300s does not load: %.120s", wh->path, jerr.text);
        return -1;
    }
    json_t *list = json_object_get(doc, "webhooks");
    for (size_t i = 0; i < json_array_size(list); i++) {
        json_t *o = json_array_get(list, i);
        webhook_t *w = tly_calloc(1, sizeof(*w));
        const char *id = json_string_value(json_object_get(o, "webhook_id"));
        const char *poll = json_string_value(json_object_get(o, "poll_id"));
        const char *url = json_string_value(json_object_get(o, "url"));
        const char *secret = json_string_value(json_object_get(o, "secret"));
        const char *created = json_string_value(json_object_get(o, "created_at"));
        if (w == NULL || id == NULL || poll == NULL || url == NULL || secret == NULL || created == NULL ||
            strlen(id) >= sizeof(w->id) || strlen(poll) != TLY_POLL_ID_LEN || strlen(secret) >= sizeof(w->secret) ||
            (w->url = tly_strdup(url)) == NULL || tly_time_parse(created, &w->created_at) != 0) {
            if (w != NULL)
                webhook_free(w);
            json_decref(doc);
            snprintf(err, 512, "%.300s: webhook %zu is not whole", wh->path, i);
            return -1;
        }
        snprintf(w->id, sizeof(w->id), "%s", id);
        snprintf(w->poll_id, sizeof(w->poll_id), "%s", poll);
        snprintf(w->secret, sizeof(w->secret), "%s", secret);
        json_t *evs = json_object_get(o, "events");
        for (size_t j = 0; j < json_array_size(evs); j++)
            w->events |= event_bit(json_string_value(json_array_get(evs, j)));
        w->threshold = (long)json_integer_value(json_object_get(o, "threshold"));
        w->min_interval = (long)json_integer_value(json_object_get(o, "min_interval"));
        if (w->min_interval < 1)
            w->min_interval = 1;
        w->threshold_fired = json_is_true(json_object_get(o, "threshold_fired"));
        w->closed_fired = json_is_true(json_object_get(o, "closed_fired"));
        w->delivered = (uint64_t)json_integer_value(json_object_get(o, "delivered"));
        w->failed = (uint64_t)json_integer_value(json_object_get(o, "failed"));
        json_t *deads = json_object_get(o, "dead_letters");
        for (size_t j = 0; j < json_array_size(deads) && w->ndead < MAX_DEAD; j++) {
            json_t *d = json_array_get(deads, j);
            dead_t *x = &w->dead[w->ndead];
            const char *did = json_string_value(json_object_get(d, "delivery_id"));
            const char *at = json_string_value(json_object_get(d, "failed_at"));
            const char *why = json_string_value(json_object_get(d, "last_error"));
            x->event = event_static(json_string_value(json_object_get(d, "event")));
            if (did == NULL || at == NULL || x->event == NULL || tly_time_parse(at, &x->failed_at) != 0)
                continue;
            snprintf(x->delivery_id, sizeof(x->delivery_id), "%s", did);
            x->attempts = (int)json_integer_value(json_object_get(d, "attempts"));
            x->last_status = (int)json_integer_value(json_object_get(d, "last_status"));
            x->last_error = why ? tly_strdup(why) : NULL;
            json_t *payload = json_object_get(d, "payload");
            x->payload = payload ? json_dumps(payload, JSON_COMPACT) : NULL;
            if (x->payload != NULL) { /* jansson's memory, ours from here: copy */
                char *copy = tly_strdup(x->payload);
                free(x->payload);
                x->payload = copy;
            }
            w->ndead++;
        }
        HASH_ADD_STR(wh->by_id, id, w);
    }
    json_decref(doc);
    return 0;
}

/* ---- deliveries ---- */

static void dead_letter(struct api_webhooks *wh, webhook_t *w, const delivery_t *d, int status, const char *why)
{
    if (w->ndead == MAX_DEAD) { /* the oldest goes */
        dead_clear(&w->dead[0]);
        memmove(&w->dead[0], &w->dead[1], sizeof(dead_t) * (MAX_DEAD - 1));
        memset(&w->dead[MAX_DEAD - 1], 0, sizeof(dead_t));
        w->ndead--;
    }
    dead_t *x = &w->dead[w->ndead++];
    snprintf(x->delivery_id, sizeof(x->delivery_id), "%s", d->id);
    x->event = d->event;
    x->attempts = d->attempts;
    x->last_status = status;
    x->last_error = why ? tly_strdup(why) : NULL;
    x->failed_at = tly_now_ms();
    x->payload = d->body ? tly_strdup(d->body) : NULL;
    w->failed++;
    tly_metrics_count("tally_webhook_deliveries_total", "outcome", "dead_lettered");
    tly_log(TLY_LOG_WARN, "webhook delivery dead-lettered", "webhook_id", w->id, "poll_id", w->poll_id, "event",
            d->event, "delivery_id", d->id, "reason", why ? why : "no 2xx answer", NULL);
    save_start(wh);
}

static void delivery_free(delivery_t *d)
{
    tly_free(d->body);
    tly_free(d);
}

static void unlink_delivery(struct api_webhooks *wh, delivery_t *d)
{
    for (delivery_t **pp = &wh->queue; *pp != NULL; pp = &(*pp)->next)
        if (*pp == d) {
            *pp = d->next;
            wh->queued--;
            return;
        }
}

static void sent(void *arg, const tly_client_result_t *r)
{
    delivery_t *d = arg;
    struct api_webhooks *wh = d->wh; /* still there: tly_client_free drops calls unanswered */
    d->sending = false;
    webhook_t *w;
    HASH_FIND_STR(wh->by_id, d->webhook_id, w);
    bool ok = r->status >= 200 && r->status < 300;
    if (w == NULL || ok) { /* delivered, or the webhook was deleted meanwhile */
        if (w != NULL) {
            w->delivered++;
            tly_metrics_count("tally_webhook_deliveries_total", "outcome", "delivered");
        }
        unlink_delivery(wh, d);
        delivery_free(d);
        return;
    }
    char why[320];
    if (r->error != NULL)
        snprintf(why, sizeof(why), "%s", r->error);
    else
        snprintf(why, sizeof(why), "answered %d", r->status);
    if (r->refused || d->attempts >= wh->attempts) {
        if (r->refused)
            tly_metrics_count("tally_webhook_deliveries_total", "outcome", "refused");
        unlink_delivery(wh, d);
        dead_letter(wh, w, d, r->status, why);
        delivery_free(d);
        return;
    }
    tly_metrics_count("tally_webhook_deliveries_total", "outcome", "retried");
    int64_t wait = wh->backoff_ms;
    for (int i = 1; i < d->attempts && wait < MAX_BACKOFF_MS; i++)
        wait *= 2;
    d->due = tly_now_ms() + (wait < MAX_BACKOFF_MS ? wait : MAX_BACKOFF_MS);
}

static void send_one(struct api_webhooks *wh, webhook_t *w, delivery_t *d)
{
    char t[24], sig[200], hex[crypto_auth_hmacsha256_BYTES * 2 + 1];
    snprintf(t, sizeof(t), "%lld", (long long)(tly_now_ms() / 1000));
    uint8_t mac[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_state st;
    crypto_auth_hmacsha256_init(&st, (const unsigned char *)w->secret, strlen(w->secret));
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)t, strlen(t));
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)".", 1);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)d->body, strlen(d->body));
    crypto_auth_hmacsha256_final(&st, mac);
    tly_hex_encode(mac, sizeof(mac), hex);
    snprintf(sig, sizeof(sig), "Tally-Signature: t=%s,v1=%s", t, hex);
    char event[80], delivery[80], ua[64];
    snprintf(event, sizeof(event), "Tally-Event: %s", d->event);
    snprintf(delivery, sizeof(delivery), "Tally-Delivery: %s", d->id);
    snprintf(ua, sizeof(ua), "User-Agent: tally/%s", tly_version);
    const char *headers[] = {"Content-Type: application/json", sig, event, delivery, ua, "Expect:"};
    d->attempts++;
    d->sending = true;
    if (tly_client_post(wh->client, w->url, headers, TLY_ARRAY_SIZE(headers), d->body, strlen(d->body), sent, d) != 0) {
        d->sending = false;
        d->due = tly_now_ms() + wh->backoff_ms; /* out of memory: try again later */
    }
}

/* Queues a delivery of event for w with data (stolen). */
static void enqueue(struct api_webhooks *wh, webhook_t *w, const char *event, json_t *data, int64_t now)
{
    delivery_t *d = tly_calloc(1, sizeof(*d));
    char at[TLY_TIME_LEN];
    tly_time_format(now, at);
    if (d != NULL)
        tly_random_id(d->id, "d_", 12);
    json_t *o = d ? json_pack("{s:s, s:s, s:s, s:s, s:s, s:o}", "delivery_id", d->id, "event", event, "webhook_id",
                              w->id, "poll_id", w->poll_id, "created_at", at, "data", data)
                  : (json_decref(data), NULL);
    if (o != NULL && strcmp(event, "vote.threshold") == 0)
        json_object_set_new(o, "threshold", json_integer(w->threshold));
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (d == NULL || s == NULL) {
        free(s);
        tly_free(d);
        tly_log(TLY_LOG_ERROR, "webhooks: out of memory; an event is not delivered", "webhook_id", w->id, "event",
                event, NULL);
        return;
    }
    d->body = tly_strdup(s);
    free(s);
    if (d->body == NULL) {
        tly_free(d);
        return;
    }
    snprintf(d->webhook_id, sizeof(d->webhook_id), "%s", w->id);
    d->wh = wh;
    d->event = event_static(event);
    d->due = now;
    if (wh->queued >= MAX_QUEUED) {
        dead_letter(wh, w, d, 0, "the server's queue of deliveries is full");
        delivery_free(d);
        return;
    }
    d->next = wh->queue;
    wh->queue = d;
    wh->queued++;
}

/* p's results as the owner sees them (the owner registered the webhook), or NULL. */
static json_t *results_of(tly_poll_t *p, int64_t now)
{
    size_t len;
    const char *s = tly_results_render(p, now, &len);
    return s ? json_loadb(s, len, 0, NULL) : NULL;
}

static void on_tick(tly_timer_t *t)
{
    struct api_webhooks *wh = (struct api_webhooks *)((char *)t - offsetof(struct api_webhooks, tick));
    tly_app_t *app = wh->app;
    int64_t now = tly_now_ms();
    bool changed = false;
    webhook_t *w, *tmp;
    HASH_ITER(hh, wh->by_id, w, tmp) {
        tly_poll_t *p = tly_registry_find_poll(app->registry, w->poll_id);
        if (p == NULL) { /* the poll was deleted (memory follows the store's commits): so are its webhooks */
            HASH_DEL(wh->by_id, w);
            webhook_free(w);
            changed = true;
            continue;
        }
        /* cppcheck-suppress uninitvar ; HASH_ITER sets w */
        if (!w->seen) {
            w->seen = true;
            w->last_seq = p->seq;
        }
        if ((w->events & EV_CHANGED) && p->seq != w->last_seq && now - w->last_sent >= w->min_interval * 1000) {
            json_t *r = results_of(p, now);
            if (r != NULL) {
                w->last_seq = p->seq;
                w->last_sent = now;
                enqueue(wh, w, "results.changed", r, now);
            }
        }
        if ((w->events & EV_THRESHOLD) && !w->threshold_fired && p->total_votes >= (uint64_t)w->threshold) {
            json_t *r = results_of(p, now);
            if (r != NULL) {
                w->threshold_fired = true;
                changed = true;
                enqueue(wh, w, "vote.threshold", r, now);
            }
        }
        if ((w->events & EV_CLOSED) && !w->closed_fired && tly_poll_effective_status(p, now) == TLY_STATUS_CLOSED) {
            api_poll_settle(app, p, now);
            /* settled: the final results, as GET .../results gives them */
            json_t *r = tly_poll_final_results(p) != NULL ? results_of(p, now) : NULL;
            if (r != NULL) {
                w->closed_fired = true;
                changed = true;
                enqueue(wh, w, "poll.closed", r, now);
            }
        }
    }
    if (changed)
        save_start(wh);
    size_t in_flight = tly_client_in_flight(wh->client);
    for (delivery_t *d = wh->queue, *next; d != NULL && in_flight < MAX_IN_FLIGHT; d = next) {
        next = d->next;
        if (d->sending || d->due > now)
            continue;
        HASH_FIND_STR(wh->by_id, d->webhook_id, w);
        if (w == NULL) {
            unlink_delivery(wh, d);
            delivery_free(d);
            continue;
        }
        send_one(wh, w, d);
        in_flight++;
    }
    tly_timer_start(app->loop, &wh->tick, TICK_MS, on_tick);
}

/* ---- routes ---- */

/* The poll of the path when the caller owns it; answers otherwise. */
static tly_poll_t *owned_poll(tly_app_t *app, tly_req_t *req, const tly_params_t *params)
{
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return NULL;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return NULL;
    if (!api_is_owner(p, &caller)) {
        api_respond_error(req, 403, "FORBIDDEN", "only the poll's owner may manage its webhooks", NULL);
        return NULL;
    }
    return p;
}

/* The host of an http(s) URL into host (brackets of an IPv6 literal dropped); false
 * when url is not one. */
static bool url_host(const char *url, char *host, size_t cap)
{
    const char *p;
    if (strncasecmp(url, "https://", 8) == 0)
        p = url + 8;
    else if (strncasecmp(url, "http://", 7) == 0)
        p = url + 7;
    else
        return false;
    const char *end = p + strcspn(p, "/?#");
    const char *at = memchr(p, '@', (size_t)(end - p));
    if (at != NULL) /* no credentials in a webhook URL */
        return false;
    const char *hend;
    if (*p == '[') {
        hend = memchr(p, ']', (size_t)(end - p));
        if (hend == NULL)
            return false;
        p++;
    } else {
        hend = memchr(p, ':', (size_t)(end - p));
        if (hend == NULL)
            hend = end;
    }
    size_t n = (size_t)(hend - p);
    if (n == 0 || n >= cap)
        return false;
    memcpy(host, p, n);
    host[n] = '\0';
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)host[i] <= 0x20 || host[i] == 0x7f)
            return false;
    return true;
}

void api_webhooks_create(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    struct api_webhooks *wh = app->webhooks;
    tly_poll_t *p = owned_poll(app, req, params);
    if (p == NULL)
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    webhook_t *w = NULL;
    const char *url = json_string_value(json_object_get(body, "url"));
    char host[256];
    if (url == NULL || strlen(url) > URL_MAX || !url_host(url, host, sizeof(host))) {
        api_respond_validation(req, "url", "url must be an http:// or https:// URL without credentials, at most 2048 "
                                           "characters");
        goto done;
    }
    /* an address written in the URL is judged now; a name, at every connection */
    uint8_t probe[16];
    bool literal = inet_pton(AF_INET, host, probe) == 1 || inet_pton(AF_INET6, host, probe) == 1;
    if (literal && !tly_addr_public(host) && !tly_cidrs_contain(&app->webhook_allow, host)) {
        api_respond_validation(req, "url",
                               "url points to a loopback, private or link-local address, which webhooks may not "
                               "reach unless the server's --webhook-allow lists it");
        goto done;
    }
    json_t *events = json_object_get(body, "events");
    unsigned bits = 0;
    if (!json_is_array(events) || json_array_size(events) == 0) {
        api_respond_validation(req, "events",
                               "events must be a non-empty array of poll.closed, vote.threshold, results.changed");
        goto done;
    }
    for (size_t i = 0; i < json_array_size(events); i++) {
        unsigned b = event_bit(json_string_value(json_array_get(events, i)));
        if (b == 0 || (bits & b)) {
            api_respond_validation(req, "events", "events must name poll.closed, vote.threshold or results.changed, "
                                                  "each at most once");
            goto done;
        }
        bits |= b;
    }
    json_t *th = json_object_get(body, "threshold"), *mi = json_object_get(body, "min_interval");
    if ((bits & EV_THRESHOLD) &&
        (!json_is_integer(th) || json_integer_value(th) < 1 || json_integer_value(th) > 1000000000)) {
        api_respond_validation(req, "threshold", "vote.threshold needs threshold, a whole number from 1 to 1000000000");
        goto done;
    }
    if (mi != NULL && (!json_is_integer(mi) || json_integer_value(mi) < 1 || json_integer_value(mi) > 86400)) {
        api_respond_validation(req, "min_interval", "min_interval must be a whole number of seconds from 1 to 86400");
        goto done;
    }
    size_t mine = 0;
    webhook_t *x, *tmp;
    HASH_ITER(hh, wh->by_id, x, tmp) mine += strcmp(x->poll_id, p->poll_id) == 0;
    if (mine >= MAX_PER_POLL) {
        api_respond_error(req, 409, "TOO_MANY_WEBHOOKS", "a poll has at most 10 webhooks; delete one first", NULL);
        goto done;
    }
    if ((w = tly_calloc(1, sizeof(*w))) == NULL || (w->url = tly_strdup(url)) == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        goto done;
    }
    tly_random_id(w->id, "wh_", 12);
    tly_random_id(w->secret, "whsec_", 32);
    memcpy(w->poll_id, p->poll_id, sizeof(w->poll_id));
    w->events = bits;
    w->threshold = (bits & EV_THRESHOLD) ? (long)json_integer_value(th) : 0;
    w->min_interval = mi ? (long)json_integer_value(mi) : 10;
    w->created_at = tly_now_ms();
    w->seen = true; /* results.changed: from the counts as they are now */
    w->last_seq = p->seq;
    HASH_ADD_STR(wh->by_id, id, w);
    char loc[128];
    snprintf(loc, sizeof(loc), "/v1/polls/%s/webhooks/%s", p->poll_id, w->id);
    tly_req_add_header(req, "Location", loc);
    save_then_answer(wh, req, 201, webhook_json(w, true, false));
    w = NULL;
done:
    if (w != NULL)
        webhook_free(w);
    json_decref(body);
}

void api_webhooks_list(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_poll_t *p = owned_poll(app, req, params);
    if (p == NULL)
        return;
    json_t *items = json_array();
    webhook_t *w, *tmp;
    HASH_ITER(hh, app->webhooks->by_id, w, tmp) {
        if (strcmp(w->poll_id, p->poll_id) != 0)
            continue;
        /* cppcheck-suppress uninitvar ; HASH_ITER sets w */
        json_t *o = webhook_json(w, false, true);
        size_t pending = 0;
        for (delivery_t *d = app->webhooks->queue; d != NULL; d = d->next)
            pending += strcmp(d->webhook_id, w->id) == 0;
        if (o != NULL)
            json_object_set_new(o, "pending", json_integer((json_int_t)pending));
        json_array_append_new(items, o);
    }
    api_respond_json(req, 200, json_pack("{s:o}", "items", items));
}

void api_webhooks_delete(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_poll_t *p = owned_poll(app, req, params);
    if (p == NULL)
        return;
    size_t len;
    const char *id = tly_params_get(params, "webhook_id", &len);
    char key[24];
    webhook_t *w = NULL;
    if (id != NULL && len < sizeof(key)) {
        memcpy(key, id, len);
        key[len] = '\0';
        HASH_FIND_STR(app->webhooks->by_id, key, w);
    }
    if (w == NULL || strcmp(w->poll_id, p->poll_id) != 0) {
        api_respond_error(req, 404, "WEBHOOK_NOT_FOUND", "this poll has no webhook with that id", NULL);
        return;
    }
    HASH_DEL(app->webhooks->by_id, w);
    webhook_free(w);
    tly_req_add_header(req, "Cache-Control", "no-store");
    save_then_answer(app->webhooks, req, 204, NULL);
}

/* ---- life ---- */

int api_webhooks_open(tly_app_t *app, char *err)
{
    struct api_webhooks *wh = tly_calloc(1, sizeof(*wh));
    if (wh == NULL) {
        snprintf(err, 512, "out of memory");
        return -1;
    }
    wh->app = app;
    wh->attempts = app->conf->webhook_attempts;
    wh->backoff_ms = app->conf->webhook_backoff_ms;
    snprintf(wh->path, sizeof(wh->path), "%s/webhooks.json", app->conf->data_dir);
    app->webhooks = wh;
    if (load_file(wh, err) != 0)
        return -1;
    if ((wh->client = tly_client_new(app->loop, &app->webhook_allow)) == NULL) {
        snprintf(err, 512, "out of memory");
        return -1;
    }
    tly_timer_start(app->loop, &wh->tick, TICK_MS, on_tick);
    return 0;
}

void api_webhooks_close(tly_app_t *app)
{
    struct api_webhooks *wh = app->webhooks;
    if (wh == NULL)
        return;
    tly_timer_stop(&wh->tick);
    tly_client_free(wh->client); /* what is in flight is dropped, sent() not called */
    while (wh->queue != NULL) {
        delivery_t *d = wh->queue;
        wh->queue = d->next;
        delivery_free(d);
    }
    webhook_t *w, *tmp;
    HASH_ITER(hh, wh->by_id, w, tmp) {
        HASH_DEL(wh->by_id, w);
        webhook_free(w);
    }
    for (save_wait_t *s = wh->waiting, *next; s != NULL; s = next) { /* none: answered before close */
        next = s->next;
        free(s->body);
        tly_free(s);
    }
    app->webhooks = NULL;
    tly_free(wh);
}
