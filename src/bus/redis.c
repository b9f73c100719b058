/*
 * redis.c: the bus on Redis, with hiredis's async API driven by tally's loop.
 *
 * Connections have roles (conn_role_t): commands and publishes share one; the
 * subscriber needs its own because a subscribed connection accepts nothing but
 * (P)SUBSCRIBE. A blocking-read connection for stream consumers (XREADGROUP BLOCK)
 * would be a third role: a name, a handshake and a place in conn_ready's rules.
 *
 * Each connection is in one of three states: waiting to retry (ac == NULL, timer
 * armed with the backoff), handshaking (ac set, !ready, timer armed with the deadline)
 * and ready. Every way a hiredis context dies (connect refused, disconnect, our own
 * drop) goes through conn_failed once; hiredis callbacks compare their context with
 * c->ac to ignore a context we have already given up on.
 */
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "bus/bus.h"
#include "obs/obs.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define HANDSHAKE_MS 2000 /* connect + handshake, else drop and retry */
#define DEFER_MS 1        /* "bus down" replies: from the loop, never inside the call */

typedef enum { CONN_CMD, CONN_SUB, NCONN } conn_role_t;
static const char *const conn_names[NCONN] = {"cmd", "sub"};

typedef struct conn {
    tly_bus_t *bus;
    conn_role_t role;
    redisAsyncContext *ac; /* NULL between attempts */
    bool ready;            /* the handshake was answered */
    uint64_t backoff_ms;   /* delay before the next attempt after a failure */
    tly_timer_t timer;     /* retry (ac == NULL) or handshake deadline (ac && !ready) */
} conn_t;

struct tly_bus_script {
    char *lua;
    char sha[41];
};

/* A command the caller waits for, from send (or deferral) to its one callback. */
typedef struct pending {
    struct pending *next; /* in bus->deferred */
    tly_bus_t *bus;
    tly_bus_cb cb;
    void *arg;
    const char *defer_err;    /* deferred: the error it will get */
    tly_bus_script_t *script; /* EVALSHA: cmd kept to send again after NOSCRIPT */
    char *cmd;
    size_t cmdlen;
    bool retried;
} pending_t;

struct tly_bus {
    tly_loop_t *loop;
    char *host;
    int port, db;
    char *instance_id;
    void (*on_message)(void *arg, const char *channel, const char *payload, size_t len);
    void (*on_state)(void *arg, bool up);
    void *arg;
    conn_t conns[NCONN];
    char **channels;
    size_t nchannels;
    tly_bus_script_t *scripts[TLY_BUS_MAX_SCRIPTS];
    size_t nscripts;
    pending_t *deferred, **deferred_tail;
    tly_timer_t defer_timer;
    size_t inflight;
    bool up, ever_up, warned, closing;
    int depth; /* > 0 while a caller's callback runs */
    tly_bus_stats_t stats;
};

/* ---- the adapter: hiredis's event hooks on a tly_fdwatch_t ---- */

typedef struct {
    tly_fdwatch_t *watch;
    bool read, write;
} adapter_t;

static void on_fd_ready(void *arg, bool readable, bool writable)
{
    redisAsyncContext *ac = arg;
    /* one readiness per call: either may free ac */
    if (readable)
        redisAsyncHandleRead(ac);
    else if (writable)
        redisAsyncHandleWrite(ac);
}

static void ev_add_read(void *p)
{
    adapter_t *a = p;
    a->read = true;
    tly_fdwatch_want(a->watch, a->read, a->write);
}

static void ev_del_read(void *p)
{
    adapter_t *a = p;
    a->read = false;
    tly_fdwatch_want(a->watch, a->read, a->write);
}

static void ev_add_write(void *p)
{
    adapter_t *a = p;
    a->write = true;
    tly_fdwatch_want(a->watch, a->read, a->write);
}

static void ev_del_write(void *p)
{
    adapter_t *a = p;
    a->write = false;
    tly_fdwatch_want(a->watch, a->read, a->write);
}

/* hiredis calls this just before it closes the fd */
static void ev_cleanup(void *p)
{
    adapter_t *a = p;
    tly_fdwatch_free(a->watch);
    tly_free(a);
}

static int adapter_attach(tly_loop_t *loop, redisAsyncContext *ac)
{
    adapter_t *a = tly_calloc(1, sizeof(*a));
    if (a == NULL)
        return TLY_ENOMEM;
    a->watch = tly_fdwatch_new(loop, ac->c.fd, on_fd_ready, ac);
    if (a->watch == NULL) {
        tly_free(a);
        return TLY_ENOMEM;
    }
    ac->ev.data = a;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- replies ---- */

static size_t reply_nodes(const redisReply *r)
{
    size_t n = 1;
    if (r->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i < r->elements; i++)
            n += reply_nodes(r->element[i]);
    return n;
}

/* Fills *out from r; array elements take consecutive nodes from *next. */
static void reply_fill(const redisReply *r, tly_bus_reply_t *out, tly_bus_reply_t **next)
{
    *out = (tly_bus_reply_t){0};
    switch (r->type) {
    case REDIS_REPLY_INTEGER:
        out->type = TLY_BUS_INT;
        out->integer = r->integer;
        break;
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        out->type = r->type == REDIS_REPLY_STRING   ? TLY_BUS_STRING
                    : r->type == REDIS_REPLY_STATUS ? TLY_BUS_STATUS
                                                    : TLY_BUS_ERROR;
        out->str = r->str;
        out->len = r->len;
        break;
    case REDIS_REPLY_ARRAY: {
        out->type = TLY_BUS_ARRAY;
        tly_bus_reply_t *el = *next;
        *next += r->elements;
        out->elements = el;
        out->nelements = r->elements;
        for (size_t i = 0; i < r->elements; i++)
            reply_fill(r->element[i], &el[i], next);
        break;
    }
    default:
        out->type = TLY_BUS_NIL;
        break;
    }
}

static bool reply_is_error(const redisReply *r, const char *prefix)
{
    return r != NULL && r->type == REDIS_REPLY_ERROR && r->str != NULL && strncmp(r->str, prefix, strlen(prefix)) == 0;
}

static void user_call(tly_bus_t *bus, const pending_t *p, const tly_bus_reply_t *r)
{
    if (r->type == TLY_BUS_ERROR)
        bus->stats.errors++;
    if (p->cb == NULL)
        return;
    bus->depth++;
    p->cb(p->arg, r);
    bus->depth--;
}

static void deliver_error(pending_t *p, const char *msg)
{
    tly_bus_reply_t r = {.type = TLY_BUS_ERROR, .str = msg, .len = strlen(msg)};
    user_call(p->bus, p, &r);
}

static void deliver_reply(pending_t *p, const redisReply *reply)
{
    tly_bus_reply_t small[16], *nodes = small;
    size_t n = reply_nodes(reply);
    if (n > TLY_ARRAY_SIZE(small) && (nodes = tly_malloc(n * sizeof(*nodes))) == NULL) {
        deliver_error(p, "out of memory");
        return;
    }
    tly_bus_reply_t *next = nodes + 1;
    reply_fill(reply, nodes, &next);
    user_call(p->bus, p, nodes);
    if (nodes != small)
        tly_free(nodes);
}

static void pending_free(pending_t *p)
{
    if (p->cmd != NULL)
        redisFreeCommand(p->cmd);
    tly_free(p);
}

/* ---- connection state ---- */

static void conn_start(conn_t *c);
static void conn_failed(conn_t *c, const char *reason);

static void bus_update_state(tly_bus_t *bus, const char *reason, const conn_t *c)
{
    bool up = true;
    for (int i = 0; i < NCONN; i++)
        up = up && bus->conns[i].ready;
    if (up == bus->up) {
        /* still down: say once why a bus that never came up is not coming up */
        if (!up && !bus->ever_up && !bus->warned && reason != NULL) {
            bus->warned = true;
            tly_log(TLY_LOG_WARN, "bus unavailable", "reason", reason, "conn", conn_names[c->role], NULL);
        }
        return;
    }
    bus->up = up;
    bus->stats.up = up;
    if (up) {
        if (bus->ever_up)
            bus->stats.reconnects++;
        bus->ever_up = true;
        tly_log(TLY_LOG_INFO, "bus connected", "host", bus->host, NULL);
    } else {
        tly_log(TLY_LOG_WARN, "bus lost", "reason", reason != NULL ? reason : "unknown", "conn", conn_names[c->role],
                NULL);
    }
    if (bus->on_state != NULL && !bus->closing) {
        bus->depth++;
        bus->on_state(bus->arg, up);
        bus->depth--;
    }
}

static void on_conn_timer(tly_timer_t *t)
{
    conn_t *c = (conn_t *)((char *)t - offsetof(conn_t, timer));
    if (c->ac == NULL) {
        conn_start(c);
    } else if (!c->ready) {
        redisAsyncContext *ac = c->ac;
        c->ac = NULL;
        redisAsyncFree(ac); /* not inside a hiredis callback: frees now */
        conn_failed(c, "connect timed out");
    }
}

/* The context is gone (or being freed by hiredis); wait and try again. */
static void conn_failed(conn_t *c, const char *reason)
{
    tly_bus_t *bus = c->bus;
    c->ac = NULL;
    c->ready = false;
    if (bus->closing)
        return;
    tly_timer_start(bus->loop, &c->timer, c->backoff_ms, on_conn_timer);
    c->backoff_ms = c->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : c->backoff_ms * 2;
    bus_update_state(bus, reason, c);
}

/* Gives up on a live context (a failed handshake) from anywhere, even inside one of its
 * callbacks, where hiredis defers the free until the callback returns. */
static void conn_drop(conn_t *c, const char *reason)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    redisAsyncFree(ac);
    conn_failed(c, reason);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    conn_t *c = ac->data;
    if (status != REDIS_OK && c->ac == ac)
        conn_failed(c, ac->c.errstr[0] != '\0' ? ac->c.errstr : "connect failed");
    /* hiredis frees ac after this returns */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    conn_t *c = ac->data;
    if (c->ac == ac)
        conn_failed(c, status == REDIS_OK || ac->c.errstr[0] == '\0' ? "connection closed" : ac->c.errstr);
}

/* The handshake's last reply: the connection is usable. */
static void on_handshake(redisAsyncContext *ac, void *r, void *priv)
{
    conn_t *c = priv;
    const redisReply *reply = r;
    if (reply == NULL || c->ac != ac)
        return;
    if (reply->type == REDIS_REPLY_ERROR) { /* LOADING, NOAUTH, ... */
        conn_drop(c, reply->str);
        return;
    }
    tly_timer_stop(&c->timer);
    c->ready = true;
    c->backoff_ms = BACKOFF_MIN_MS;
    bus_update_state(c->bus, NULL, c);
}

/* A handshake step whose error makes the connection useless (SELECT). */
static void on_required(redisAsyncContext *ac, void *r, void *priv)
{
    conn_t *c = priv;
    const redisReply *reply = r;
    if (reply != NULL && c->ac == ac && reply->type == REDIS_REPLY_ERROR)
        conn_drop(c, reply->str);
}

static void on_script_loaded(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    tly_bus_script_t *s = priv;
    (void)ac;
    if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
        tly_log(TLY_LOG_ERROR, "bus script not loaded", "sha", s->sha, "reason", reply->str, NULL);
}

/* Messages on the subscriber: ["message", channel, payload]; also the confirmations
 * ["subscribe", channel, n], which need nothing. */
static void on_sub_reply(redisAsyncContext *ac, void *r, void *priv)
{
    conn_t *c = priv;
    tly_bus_t *bus = c->bus;
    const redisReply *reply = r;
    if (reply == NULL || c->ac != ac || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    const redisReply *kind = reply->element[0], *ch = reply->element[1], *msg = reply->element[2];
    if (kind->type != REDIS_REPLY_STRING || strcmp(kind->str, "message") != 0 || ch->type != REDIS_REPLY_STRING ||
        msg->type != REDIS_REPLY_STRING || bus->on_message == NULL)
        return;
    bus->depth++;
    bus->on_message(bus->arg, ch->str, msg->str, msg->len);
    bus->depth--;
}

static void send_subscribe(conn_t *c, size_t first, size_t n)
{
    tly_bus_t *bus = c->bus;
    const char *argv[1 + 64];
    while (n > 0) {
        size_t k = n > 64 ? 64 : n;
        argv[0] = "SUBSCRIBE";
        for (size_t i = 0; i < k; i++)
            argv[1 + i] = bus->channels[first + i];
        redisAsyncCommandArgv(c->ac, on_sub_reply, c, (int)(1 + k), argv, NULL);
        first += k;
        n -= k;
    }
}

/* Pipelined after connect; the connection is ready when the final PING answers. */
static void conn_handshake(conn_t *c)
{
    tly_bus_t *bus = c->bus;
    redisAsyncContext *ac = c->ac;
    char name[160];
    snprintf(name, sizeof(name), "tally:%s:%s", bus->instance_id, conn_names[c->role]);
    if (c->role == CONN_CMD && bus->db != 0)
        redisAsyncCommand(ac, on_required, c, "SELECT %d", bus->db);
    redisAsyncCommand(ac, NULL, NULL, "CLIENT SETNAME %s", name); /* only a label: errors ignored */
    if (c->role == CONN_CMD)
        for (size_t i = 0; i < bus->nscripts; i++)
            redisAsyncCommand(ac, on_script_loaded, bus->scripts[i], "SCRIPT LOAD %s", bus->scripts[i]->lua);
    redisAsyncCommand(ac, on_handshake, c, "PING");
    if (c->role == CONN_SUB)
        send_subscribe(c, 0, bus->nchannels);
}

static void conn_start(conn_t *c)
{
    tly_bus_t *bus = c->bus;
    char reason[160];
    redisAsyncContext *ac = redisAsyncConnect(bus->host, bus->port);
    if (ac == NULL) {
        conn_failed(c, "out of memory");
        return;
    }
    if (ac->err != 0) { /* refused at once, or no such host */
        snprintf(reason, sizeof(reason), "%s", ac->errstr);
        redisAsyncFree(ac);
        conn_failed(c, reason);
        return;
    }
    if (adapter_attach(bus->loop, ac) != 0) {
        redisAsyncFree(ac);
        conn_failed(c, "out of memory");
        return;
    }
    ac->data = c;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->ready = false;
    tly_timer_start(bus->loop, &c->timer, HANDSHAKE_MS, on_conn_timer);
    conn_handshake(c);
}

/* ---- commands ---- */

static void on_defer_timer(tly_timer_t *t)
{
    tly_bus_t *bus = (tly_bus_t *)((char *)t - offsetof(tly_bus_t, defer_timer));
    /* only those deferred so far: a callback that retries at once waits for the next run */
    pending_t *p = bus->deferred;
    bus->deferred = NULL;
    bus->deferred_tail = &bus->deferred;
    while (p != NULL) {
        pending_t *next = p->next;
        deliver_error(p, p->defer_err);
        pending_free(p);
        p = next;
    }
}

static void defer(tly_bus_t *bus, pending_t *p, const char *err)
{
    p->defer_err = err;
    p->next = NULL;
    *bus->deferred_tail = p;
    bus->deferred_tail = &p->next;
    if (!tly_timer_active(&bus->defer_timer))
        tly_timer_start(bus->loop, &bus->defer_timer, DEFER_MS, on_defer_timer);
}

static redisAsyncContext *cmd_context(tly_bus_t *bus)
{
    conn_t *c = &bus->conns[CONN_CMD];
    return c->ready && bus->inflight < TLY_BUS_MAX_INFLIGHT ? c->ac : NULL;
}

static void on_command_reply(redisAsyncContext *ac, void *r, void *priv);

static int send_pending(tly_bus_t *bus, pending_t *p, const char *cmd, size_t len)
{
    redisAsyncContext *ac = cmd_context(bus);
    if (ac == NULL || redisAsyncFormattedCommand(ac, on_command_reply, p, cmd, len) != REDIS_OK)
        return TLY_ESTATE;
    bus->inflight++;
    bus->stats.commands++;
    return 0;
}

static void on_command_reply(redisAsyncContext *ac, void *r, void *priv)
{
    pending_t *p = priv;
    tly_bus_t *bus = p->bus;
    const redisReply *reply = r;
    (void)ac;
    bus->inflight--;
    if (reply == NULL) {
        deliver_error(p, bus->closing ? "bus closed" : "bus lost");
        pending_free(p);
        return;
    }
    bus->stats.replies++;
    if (p->script != NULL && !p->retried && reply_is_error(reply, "NOSCRIPT")) {
        /* flushed or failed over: load it and run it again, in order on this connection */
        p->retried = true;
        redisAsyncContext *cac = cmd_context(bus);
        if (cac != NULL &&
            redisAsyncCommand(cac, on_script_loaded, p->script, "SCRIPT LOAD %s", p->script->lua) == REDIS_OK &&
            send_pending(bus, p, p->cmd, p->cmdlen) == 0)
            return;
    }
    deliver_reply(p, reply);
    pending_free(p);
}

static pending_t *pending_new(tly_bus_t *bus, tly_bus_cb cb, void *arg)
{
    pending_t *p = tly_calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->bus = bus;
    p->cb = cb;
    p->arg = arg;
    return p;
}

/* Sends a formatted command (taking cmd) or defers "bus down". */
static int submit(tly_bus_t *bus, tly_bus_cb cb, void *arg, char *cmd, int len, tly_bus_script_t *script)
{
    if (len < 0)
        return TLY_EINVAL;
    pending_t *p = pending_new(bus, cb, arg);
    if (p == NULL) {
        redisFreeCommand(cmd);
        return TLY_ENOMEM;
    }
    if (script != NULL) {
        p->script = script;
        p->cmd = cmd;
        p->cmdlen = (size_t)len;
    }
    if (send_pending(bus, p, cmd, (size_t)len) != 0)
        defer(bus, p, "bus down");
    if (script == NULL)
        redisFreeCommand(cmd); /* hiredis copied it */
    return 0;
}

int tly_bus_command(tly_bus_t *bus, tly_bus_cb cb, void *arg, const char *fmt, ...)
{
    if (bus->closing)
        return TLY_ESTATE;
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    return submit(bus, cb, arg, cmd, len, NULL);
}

int tly_bus_command_argv(tly_bus_t *bus, tly_bus_cb cb, void *arg, size_t argc, const char *const *argv,
                         const size_t *argvlen)
{
    if (bus->closing)
        return TLY_ESTATE;
    if (argc == 0 || argc > INT32_MAX)
        return TLY_EINVAL;
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, (int)argc, (const char **)argv, argvlen);
    return submit(bus, cb, arg, cmd, len, NULL);
}

tly_bus_script_t *tly_bus_script_new(tly_bus_t *bus, const char *lua)
{
    if (bus->nscripts == TLY_BUS_MAX_SCRIPTS)
        return NULL;
    tly_bus_script_t *s = tly_calloc(1, sizeof(*s));
    if (s == NULL || (s->lua = tly_strdup(lua)) == NULL) {
        tly_free(s);
        return NULL;
    }
    /* Redis names a script by the SHA-1 of its text: EVALSHA can go out before any load */
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)lua, strlen(lua), md);
    for (size_t i = 0; i < SHA_DIGEST_LENGTH; i++)
        snprintf(s->sha + 2 * i, 3, "%02x", md[i]);
    bus->scripts[bus->nscripts++] = s;
    redisAsyncContext *ac = cmd_context(bus);
    if (ac != NULL)
        redisAsyncCommand(ac, on_script_loaded, s, "SCRIPT LOAD %s", s->lua);
    return s;
}

int tly_bus_script(tly_bus_t *bus, tly_bus_script_t *script, tly_bus_cb cb, void *arg, size_t nkeys, size_t argc,
                   const char *const *argv, const size_t *argvlen)
{
    if (bus->closing)
        return TLY_ESTATE;
    if (nkeys > argc || argc > 1024)
        return TLY_EINVAL;
    const char *v[3 + 1024];
    size_t vl[3 + 1024];
    char nk[24];
    snprintf(nk, sizeof(nk), "%zu", nkeys);
    v[0] = "EVALSHA";
    v[1] = script->sha;
    v[2] = nk;
    for (size_t i = 0; i < 3; i++)
        vl[i] = strlen(v[i]);
    for (size_t i = 0; i < argc; i++) {
        v[3 + i] = argv[i];
        vl[3 + i] = argvlen != NULL ? argvlen[i] : strlen(argv[i]);
    }
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, (int)(3 + argc), v, vl);
    return submit(bus, cb, arg, cmd, len, script);
}

static void on_publish_reply(redisAsyncContext *ac, void *r, void *priv)
{
    tly_bus_t *bus = priv;
    const redisReply *reply = r;
    (void)ac;
    bus->inflight--;
    if (reply == NULL)
        bus->stats.dropped++;
    else if (reply->type == REDIS_REPLY_ERROR)
        bus->stats.errors++;
}

void tly_bus_publish(tly_bus_t *bus, const char *channel, const char *payload, size_t len)
{
    redisAsyncContext *ac = bus->closing ? NULL : cmd_context(bus);
    if (ac == NULL ||
        redisAsyncCommand(ac, on_publish_reply, bus, "PUBLISH %s %b", channel, payload, len) != REDIS_OK) {
        bus->stats.dropped++;
        return;
    }
    bus->inflight++;
    bus->stats.published++;
}

int tly_bus_subscribe(tly_bus_t *bus, const char *channel)
{
    if (channel == NULL || channel[0] == '\0')
        return TLY_EINVAL;
    for (size_t i = 0; i < bus->nchannels; i++)
        if (strcmp(bus->channels[i], channel) == 0)
            return 0;
    if (bus->nchannels == TLY_BUS_MAX_CHANNELS)
        return TLY_EFULL;
    char **grown = tly_realloc(bus->channels, (bus->nchannels + 1) * sizeof(*grown));
    if (grown == NULL)
        return TLY_ENOMEM;
    bus->channels = grown;
    if ((bus->channels[bus->nchannels] = tly_strdup(channel)) == NULL)
        return TLY_ENOMEM;
    bus->nchannels++;
    /* handshaking or ready: hiredis queues it behind the handshake; otherwise the next
     * handshake subscribes to every channel */
    conn_t *c = &bus->conns[CONN_SUB];
    if (c->ac != NULL)
        send_subscribe(c, bus->nchannels - 1, 1);
    return 0;
}

bool tly_bus_up(tly_bus_t *bus) { return bus->up; }

void tly_bus_stats(tly_bus_t *bus, tly_bus_stats_t *out) { *out = bus->stats; }

/* ---- open, close ---- */

/* redis://host:port[/db], host possibly "[v6]"; port defaults to 6379. */
static int parse_url(const char *url, char **host, int *port, int *db)
{
    static const char scheme[] = "redis://";
    if (strncmp(url, scheme, sizeof(scheme) - 1) != 0)
        return TLY_EINVAL;
    const char *h = url + sizeof(scheme) - 1, *end;
    size_t hlen;
    if (*h == '[') {
        if ((end = strchr(h, ']')) == NULL)
            return TLY_EINVAL;
        h++;
        hlen = (size_t)(end - h);
        end++;
    } else {
        end = h + strcspn(h, ":/");
        hlen = (size_t)(end - h);
    }
    if (hlen == 0 || memchr(h, '@', hlen) != NULL || hlen > 253)
        return TLY_EINVAL;
    long p = 6379, d = 0;
    if (*end == ':') {
        char *e;
        if (end[1] < '0' || end[1] > '9')
            return TLY_EINVAL;
        p = strtol(end + 1, &e, 10);
        if (p < 1 || p > 65535)
            return TLY_EINVAL;
        end = e;
    }
    if (*end == '/' && end[1] != '\0') {
        char *e;
        if (end[1] < '0' || end[1] > '9')
            return TLY_EINVAL;
        d = strtol(end + 1, &e, 10);
        if (d < 0 || d > 1000000)
            return TLY_EINVAL;
        end = e;
    } else if (*end == '/') {
        end++;
    }
    if (*end != '\0')
        return TLY_EINVAL;
    if ((*host = tly_strndup(h, hlen)) == NULL)
        return TLY_ENOMEM;
    *port = (int)p;
    *db = (int)d;
    return 0;
}

int tly_bus_open(const tly_bus_conf_t *conf, tly_bus_t **out)
{
    int err = TLY_ENOMEM;
    tly_bus_t *bus = tly_calloc(1, sizeof(*bus));
    if (bus == NULL)
        goto fail;
    if (conf->loop == NULL || conf->url == NULL) {
        err = TLY_EINVAL;
        goto fail;
    }
    if ((err = parse_url(conf->url, &bus->host, &bus->port, &bus->db)) != 0)
        goto fail;
    err = TLY_ENOMEM;
    if ((bus->instance_id = tly_strdup(conf->instance_id != NULL ? conf->instance_id : "-")) == NULL)
        goto fail;
    bus->loop = conf->loop;
    bus->on_message = conf->on_message;
    bus->on_state = conf->on_state;
    bus->arg = conf->arg;
    bus->deferred_tail = &bus->deferred;
    for (int i = 0; i < NCONN; i++) {
        bus->conns[i].bus = bus;
        bus->conns[i].role = (conn_role_t)i;
        bus->conns[i].backoff_ms = BACKOFF_MIN_MS;
    }
    for (int i = 0; i < NCONN; i++)
        conn_start(&bus->conns[i]);
    *out = bus;
    return 0;

fail:
    if (bus != NULL) {
        tly_free(bus->host);
        tly_free(bus);
    }
    return err;
}

void tly_bus_close(tly_bus_t *bus)
{
    if (bus == NULL)
        return;
    if (bus->depth > 0)
        abort(); /* broken invariant: hiredis would free its context after we free the bus */
    bus->closing = true;
    for (int i = 0; i < NCONN; i++) {
        conn_t *c = &bus->conns[i];
        tly_timer_stop(&c->timer);
        if (c->ac != NULL) {
            redisAsyncContext *ac = c->ac;
            c->ac = NULL;
            c->ready = false;
            redisAsyncFree(ac); /* in-flight commands get "bus closed" */
        }
    }
    tly_timer_stop(&bus->defer_timer);
    on_defer_timer(&bus->defer_timer);
    for (size_t i = 0; i < bus->nchannels; i++)
        tly_free(bus->channels[i]);
    tly_free(bus->channels);
    for (size_t i = 0; i < bus->nscripts; i++) {
        tly_free(bus->scripts[i]->lua);
        tly_free(bus->scripts[i]);
    }
    tly_free(bus->host);
    tly_free(bus->instance_id);
    tly_free(bus);
}
