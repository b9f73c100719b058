/*
 * client.c: outbound HTTP POSTs from the loop (webhook deliveries), with libcurl's multi
 * interface driven by the loop: curl names the sockets it wants watched
 * (CURLMOPT_SOCKETFUNCTION → tly_fdwatch) and when it wants to be woken
 * (CURLMOPT_TIMERFUNCTION → tly_timer), and every readiness is handed back with
 * curl_multi_socket_action. Name resolution is curl's threaded resolver, so nothing
 * blocks the loop.
 *
 * Server-side request forgery: a request may only connect to a public address. The check
 * is made on the address curl is about to connect to (CURLOPT_OPENSOCKETFUNCTION), after
 * resolution, so a name that resolves to a private address (or is changed to one between
 * two lookups) is refused all the same; the operator's allow-list (tly_client_new) opens
 * chosen ranges. No proxy from the environment is used (the check would see the proxy),
 * no redirect is followed, only http and https are spoken.
 */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>

#include "base/base.h"
#include "http/http_int.h"

#define CLIENT_TIMEOUT_MS 10000
#define CLIENT_CONNECT_TIMEOUT_MS 5000

typedef struct sockw sockw_t;
typedef struct call call_t;

struct tly_client {
    tly_loop_t *loop;
    CURLM *multi;
    tly_timer_t timer;
    tly_proxies_t allow;
    size_t in_flight;
    call_t *calls;   /* in flight, for tly_client_free */
    sockw_t *socks;  /* watched, for tly_client_free */
};

/* one watched socket */
struct sockw {
    tly_client_t *c;
    curl_socket_t fd;
    tly_fdwatch_t *watch;
    sockw_t *prev, *next;
};

/* one request */
struct call {
    tly_client_t *c;
    call_t *prev, *next;
    CURL *easy;
    struct curl_slist *headers;
    char *body;
    tly_client_done_fn done;
    void *arg;
    bool refused; /* the address was not a public one, nor allowed */
    char refused_addr[INET6_ADDRSTRLEN];
    char errbuf[CURL_ERROR_SIZE];
};

#define LIST_ADD(head, x)                                                                                              \
    do {                                                                                                               \
        (x)->prev = NULL;                                                                                              \
        (x)->next = (head);                                                                                            \
        if ((head) != NULL)                                                                                            \
            (head)->prev = (x);                                                                                        \
        (head) = (x);                                                                                                  \
    } while (0)
#define LIST_DEL(head, x)                                                                                              \
    do {                                                                                                               \
        if ((x)->prev != NULL)                                                                                         \
            (x)->prev->next = (x)->next;                                                                               \
        else                                                                                                           \
            (head) = (x)->next;                                                                                        \
        if ((x)->next != NULL)                                                                                         \
            (x)->next->prev = (x)->prev;                                                                               \
    } while (0)

static void check_done(tly_client_t *c);

static void on_ready(void *arg, bool readable, bool writable)
{
    sockw_t *w = arg;
    tly_client_t *c = w->c;
    int running;
    /* w may be freed inside (CURL_POLL_REMOVE): not used after this call */
    curl_multi_socket_action(c->multi, w->fd, (readable ? CURL_CSELECT_IN : 0) | (writable ? CURL_CSELECT_OUT : 0),
                             &running);
    check_done(c);
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    tly_client_t *c = userp;
    sockw_t *w = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (w != NULL) {
            LIST_DEL(c->socks, w);
            tly_fdwatch_free(w->watch);
            tly_free(w);
            curl_multi_assign(c->multi, fd, NULL);
        }
        return 0;
    }
    if (w == NULL) {
        if ((w = tly_calloc(1, sizeof(*w))) == NULL)
            return -1;
        w->c = c;
        w->fd = fd;
        if ((w->watch = tly_fdwatch_new(c->loop, fd, on_ready, w)) == NULL) {
            tly_free(w);
            return -1;
        }
        LIST_ADD(c->socks, w);
        curl_multi_assign(c->multi, fd, w);
    }
    tly_fdwatch_want(w->watch, what == CURL_POLL_IN || what == CURL_POLL_INOUT,
                     what == CURL_POLL_OUT || what == CURL_POLL_INOUT);
    return 0;
}

static void on_timer(tly_timer_t *t)
{
    tly_client_t *c = (tly_client_t *)((char *)t - offsetof(tly_client_t, timer));
    int running;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(c);
}

/* curl's "wake me in ms" (-1: never); the action itself runs from the loop, not here */
static int timer_cb(CURLM *multi, long ms, void *userp)
{
    (void)multi;
    tly_client_t *c = userp;
    tly_timer_stop(&c->timer);
    if (ms >= 0)
        tly_timer_start(c->loop, &c->timer, ms < 1 ? 1 : (uint64_t)ms, on_timer);
    return 0;
}

static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    (void)purpose;
    call_t *call = clientp;
    char host[INET6_ADDRSTRLEN] = "";
    if (a->family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&a->addr)->sin_addr, host, sizeof(host));
    else if (a->family == AF_INET6)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&a->addr)->sin6_addr, host, sizeof(host));
    if (host[0] == '\0' || (!tly_addr_public(host) && !tly_cidrs_contain(&call->c->allow, host))) {
        call->refused = true;
        snprintf(call->refused_addr, sizeof(call->refused_addr), "%s", host[0] ? host : "?");
        return CURL_SOCKET_BAD;
    }
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

static size_t discard(char *ptr, size_t size, size_t n, void *userdata)
{
    (void)ptr;
    (void)userdata;
    return size * n; /* the receiver's body is not read: only its status counts */
}

static void call_free(call_t *call)
{
    if (call->easy != NULL)
        curl_easy_cleanup(call->easy);
    curl_slist_free_all(call->headers);
    tly_free(call->body);
    tly_free(call);
}

static void check_done(tly_client_t *c)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        call_t *call = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&call);
        tly_client_result_t r = {0};
        char why[CURL_ERROR_SIZE + 96];
        if (call->refused) {
            r.refused = true;
            snprintf(why, sizeof(why), "refused: %s is not a public address (--webhook-allow)", call->refused_addr);
            r.error = why;
        } else if (msg->data.result != CURLE_OK) {
            snprintf(why, sizeof(why), "%s", call->errbuf[0] ? call->errbuf : curl_easy_strerror(msg->data.result));
            r.error = why;
        } else {
            long status = 0;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
            r.status = (int)status;
        }
        curl_multi_remove_handle(c->multi, msg->easy_handle);
        c->in_flight--;
        LIST_DEL(c->calls, call);
        call->done(call->arg, &r);
        call_free(call);
    }
}

tly_client_t *tly_client_new(tly_loop_t *loop, const tly_proxies_t *allow)
{
    tly_client_t *c = tly_calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->loop = loop;
    if (allow != NULL)
        c->allow = *allow;
    if ((c->multi = curl_multi_init()) == NULL) {
        tly_free(c);
        return NULL;
    }
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, 64L);
    return c;
}

int tly_client_post(tly_client_t *c, const char *url, const char *const *headers, size_t nheaders, const char *body,
                    size_t len, tly_client_done_fn done, void *arg)
{
    call_t *call = tly_calloc(1, sizeof(*call));
    if (call == NULL)
        return TLY_ENOMEM;
    call->c = c;
    call->done = done;
    call->arg = arg;
    if ((call->body = tly_malloc(len + 1)) == NULL || (call->easy = curl_easy_init()) == NULL)
        goto oom;
    memcpy(call->body, body, len);
    call->body[len] = '\0';
    for (size_t i = 0; i < nheaders; i++) {
        struct curl_slist *l = curl_slist_append(call->headers, headers[i]);
        if (l == NULL)
            goto oom;
        call->headers = l;
    }
    CURL *e = call->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)CLIENT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)CLIENT_CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, call->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, call->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, call);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, call->errbuf);
    curl_easy_setopt(e, CURLOPT_PRIVATE, call);
    if (curl_multi_add_handle(c->multi, e) != CURLM_OK)
        goto oom;
    c->in_flight++;
    LIST_ADD(c->calls, call);
    return 0;
oom:
    call_free(call);
    return TLY_ENOMEM;
}

size_t tly_client_in_flight(tly_client_t *c) { return c != NULL ? c->in_flight : 0; }

void tly_client_free(tly_client_t *c)
{
    if (c == NULL)
        return;
    tly_timer_stop(&c->timer);
    /* the requests still in flight end unanswered: their done callbacks do not run */
    while (c->calls != NULL) {
        call_t *call = c->calls;
        LIST_DEL(c->calls, call);
        curl_multi_remove_handle(c->multi, call->easy);
        call_free(call);
    }
    curl_multi_cleanup(c->multi);
    while (c->socks != NULL) { /* what cleanup left watched */
        sockw_t *w = c->socks;
        LIST_DEL(c->socks, w);
        tly_fdwatch_free(w->watch);
        tly_free(w);
    }
    tly_free(c);
}
