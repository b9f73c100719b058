/*
 * loop.c: the event loop, cross-thread wakers and timers, on h2o's evloop.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "http/http_int.h"

_Static_assert(sizeof(timer_priv_t) <= sizeof(((tly_timer_t *)0)->priv), "tly_timer_t too small for h2o entry");

tly_loop_t *tly_loop_new(void)
{
    tly_loop_t *loop = tly_calloc(1, sizeof(*loop));
    if (loop == NULL)
        return NULL;
    loop->h2o = h2o_evloop_create();
    loop->queue = h2o_multithread_create_queue(loop->h2o);
    return loop;
}

int tly_loop_run_once(tly_loop_t *loop, int32_t max_wait_ms)
{
    int rc = h2o_evloop_run(loop->h2o, max_wait_ms);
    if (loop->turn_end != NULL)
        loop->turn_end(loop->turn_end_arg);
    return rc;
}

void tly_loop_on_turn_end(tly_loop_t *loop, void (*cb)(void *arg), void *arg)
{
    loop->turn_end = cb;
    loop->turn_end_arg = arg;
}

uint64_t tly_loop_now(tly_loop_t *loop) { return h2o_now(loop->h2o); }

static void dispose_durations(tly_loop_t *loop);

void tly_loop_free(tly_loop_t *loop)
{
    if (loop == NULL)
        return;
    h2o_multithread_destroy_queue(loop->queue);
    /* h2o 2.2.5 frees the queue in its libuv build only; the evloop build leaves the
     * h2o_mem_alloc'd (malloc) struct to the caller */
    free(loop->queue);
    /* h2o requires every timeout to be disposed before the loop; sockets closed earlier
     * are freed by h2o_evloop_destroy itself */
    dispose_durations(loop);
    h2o_evloop_destroy(loop->h2o);
    tly_free(loop);
}

struct tly_waker {
    h2o_multithread_receiver_t receiver;
    h2o_multithread_message_t message;
    tly_loop_t *loop;
    void (*cb)(void *arg);
    void *arg;
    atomic_int queued; /* 1 while message is linked in the queue */
};

static void on_wake(h2o_multithread_receiver_t *receiver, h2o_linklist_t *messages)
{
    tly_waker_t *w = (tly_waker_t *)((char *)receiver - offsetof(tly_waker_t, receiver));
    while (!h2o_linklist_is_empty(messages))
        h2o_linklist_unlink(messages->next);
    /* clear before running so a wake during cb schedules another run */
    atomic_store(&w->queued, 0);
    w->cb(w->arg);
}

tly_waker_t *tly_waker_new(tly_loop_t *loop, void (*cb)(void *arg), void *arg)
{
    tly_waker_t *w = tly_calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->loop = loop;
    w->cb = cb;
    w->arg = arg;
    h2o_multithread_register_receiver(loop->queue, &w->receiver, on_wake);
    return w;
}

void tly_waker_wake(tly_waker_t *w)
{
    int expected = 0;
    if (atomic_compare_exchange_strong(&w->queued, &expected, 1)) {
        w->message = (h2o_multithread_message_t){{NULL, NULL}};
        h2o_multithread_send_message(&w->receiver, &w->message);
    }
}

void tly_waker_free(tly_waker_t *w)
{
    if (w == NULL)
        return;
    h2o_multithread_unregister_receiver(w->loop->queue, &w->receiver);
    tly_free(w);
}

/*
 * Timers: h2o 2.2 groups entries by a fixed duration (h2o_timeout_t). Timers here have
 * arbitrary durations, so each distinct duration gets its own h2o_timeout_t, kept in a
 * small table per loop; tally uses a handful of durations (tick, ping, timeouts).
 */
typedef struct {
    uint64_t ms;
    h2o_timeout_t timeout;
} duration_t;

#define MAX_DURATIONS 64
static __thread duration_t durations[MAX_DURATIONS];
static __thread size_t ndurations;

static h2o_timeout_t *timeout_for(tly_loop_t *loop, uint64_t ms)
{
    for (size_t i = 0; i < ndurations; i++)
        if (durations[i].ms == ms)
            return &durations[i].timeout;
    if (ndurations == MAX_DURATIONS)
        abort(); /* broken invariant: durations are a few constants from the configuration */
    duration_t *d = &durations[ndurations++];
    d->ms = ms;
    h2o_timeout_init(loop->h2o, &d->timeout, ms);
    return &d->timeout;
}

static void dispose_durations(tly_loop_t *loop)
{
    for (size_t i = 0; i < ndurations; i++) {
        h2o_linklist_t *entries = &durations[i].timeout._entries;
        while (!h2o_linklist_is_empty(entries))
            h2o_linklist_unlink(entries->next);
        h2o_timeout_dispose(loop->h2o, &durations[i].timeout);
    }
    ndurations = 0;
}

static void on_timer(h2o_timeout_entry_t *entry)
{
    timer_priv_t *p = (timer_priv_t *)entry;
    tly_timer_t *t = (tly_timer_t *)((char *)p - offsetof(tly_timer_t, priv));
    t->cb(t);
}

void tly_timer_start(tly_loop_t *loop, tly_timer_t *t, uint64_t ms, void (*cb)(tly_timer_t *t))
{
    timer_priv_t *p = (timer_priv_t *)t->priv;
    if (h2o_timeout_is_linked(&p->entry))
        h2o_timeout_unlink(&p->entry);
    t->cb = cb;
    p->loop = loop;
    p->entry.cb = on_timer;
    h2o_timeout_link(loop->h2o, timeout_for(loop, ms), &p->entry);
}

void tly_timer_stop(tly_timer_t *t)
{
    timer_priv_t *p = (timer_priv_t *)t->priv;
    if (p->entry._link.next != NULL && h2o_timeout_is_linked(&p->entry))
        h2o_timeout_unlink(&p->entry);
}

bool tly_timer_active(const tly_timer_t *t)
{
    const timer_priv_t *p = (const timer_priv_t *)t->priv;
    return p->entry._link.next != NULL && h2o_timeout_is_linked((h2o_timeout_entry_t *)&p->entry);
}

/*
 * fd watches: an h2o socket with H2O_SOCKET_FLAG_DONT_READ, so readiness reaches us
 * without h2o reading into its own buffer; h2o_socket_notify_write with nothing queued
 * is h2o's "tell me when writable". Freeing exports the socket, which detaches the fd
 * from the loop without closing it.
 */
struct tly_fdwatch {
    h2o_socket_t *sock; /* NULL once freed inside on_ready */
    void (*on_ready)(void *arg, bool readable, bool writable);
    void *arg;
    bool want_read, want_write;
    bool write_armed; /* h2o_socket_notify_write outstanding */
    bool busy;        /* inside on_ready: freeing waits until it returns */
};

static void fdwatch_arm(tly_fdwatch_t *w);

static void fdwatch_notify(tly_fdwatch_t *w, bool readable, bool writable)
{
    w->busy = true;
    w->on_ready(w->arg, readable, writable);
    w->busy = false;
    if (w->sock == NULL) {
        tly_free(w);
        return;
    }
    fdwatch_arm(w);
}

static void on_fdwatch_read(h2o_socket_t *sock, const char *err)
{
    (void)err; /* with DONT_READ h2o reads nothing, so never fails; errors show as readable */
    tly_fdwatch_t *w = sock->data;
    if (w->want_read)
        fdwatch_notify(w, true, false);
}

static void on_fdwatch_write(h2o_socket_t *sock, const char *err)
{
    (void)err;
    tly_fdwatch_t *w = sock->data;
    w->write_armed = false;
    if (w->want_write)
        fdwatch_notify(w, false, true);
}

static void fdwatch_arm(tly_fdwatch_t *w)
{
    if (w->want_read != h2o_socket_is_reading(w->sock)) {
        if (w->want_read)
            h2o_socket_read_start(w->sock, on_fdwatch_read);
        else
            h2o_socket_read_stop(w->sock);
    }
    /* h2o cannot cancel a write notification: an unwanted one is ignored when it fires */
    if (w->want_write && !w->write_armed) {
        w->write_armed = true;
        h2o_socket_notify_write(w->sock, on_fdwatch_write);
    }
}

tly_fdwatch_t *tly_fdwatch_new(tly_loop_t *loop, int fd, void (*on_ready)(void *arg, bool readable, bool writable),
                               void *arg)
{
    tly_fdwatch_t *w = tly_calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->on_ready = on_ready;
    w->arg = arg;
    w->sock = h2o_evloop_socket_create(loop->h2o, fd, H2O_SOCKET_FLAG_DONT_READ);
    w->sock->data = w;
    return w;
}

void tly_fdwatch_want(tly_fdwatch_t *w, bool read, bool write)
{
    w->want_read = read;
    w->want_write = write;
    if (!w->busy) /* inside on_ready the change is applied when it returns */
        fdwatch_arm(w);
}

void tly_fdwatch_free(tly_fdwatch_t *w)
{
    if (w == NULL || w->sock == NULL)
        return;
    /* h2o_socket_export refuses a socket with a write pending; the pending notification
     * dies with the socket (h2o skips disposed sockets) */
    w->sock->_cb.write = NULL;
    h2o_socket_export_t info;
    if (h2o_socket_export(w->sock, &info) == 0)
        h2o_buffer_dispose(&info.input); /* not h2o_socket_dispose_export: that closes fd */
    w->sock = NULL;
    if (!w->busy)
        tly_free(w);
}
