/*
 * reconcile.c: the counters kept beside the ballots put right when they drift.
 *
 * A shared store (PostgreSQL) keeps counter rows moved in the same statement as each
 * ballot, and Redis keeps live counters (follow.c, api_bus_count) moved fire-and-forget
 * by the instance that committed each change, so they drift whenever a call is lost.
 * Every --reconcile-interval seconds one instance (the store's advisory lock picks it)
 * counts the ballots on a worker thread (tly_store_reconcile: one scan, never on the
 * loop thread), repairs the counter rows that differ, and gets the true counts back;
 * then, on the loop thread, compares every poll's Redis hash with them and repairs the
 * fields that differ. `tally reconcile` (main.c) runs the same steps once.
 *
 * Redis races with the ballots: between the store's snapshot and a HGETALL's reply,
 * instances keep committing and moving the live counters, so a busy poll looks drifted
 * when it is not, and setting it to the snapshot's count would undo real ballots. So a
 * Redis field is repaired only for a poll whose true counts were the same in a second
 * count of the ballots taken after every HGETALL had answered: the poll did not change
 * across the read of Redis. A poll that keeps changing is left alone (counted as
 * "skipped") and tried again at the next run.
 *
 * Memory: the true counts of one run (polls x options, 16 bytes a field) up to
 * REC_MAX_FIELDS; polls beyond are not compared with Redis that run (logged). Drift
 * lines logged per run are bounded too; every drift is counted in the metrics.
 *
 * Threads: the job's state belongs to the loop thread, except while its work item runs
 * on a worker, which touches only the work item's own fields.
 */
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

#define REC_MAX_FIELDS (1u << 21) /* true counts kept for the Redis check: 32 MiB */
#define REC_MAX_LOGGED 1000       /* drift lines logged per run; the rest only counted */
#define REC_WINDOW 256            /* Redis commands in flight at once */

/* ---- the true counts of one pass --------------------------------------------------- */

void api_rec_counts_free(api_rec_counts_t *c)
{
    tly_free(c->polls);
    tly_free(c->fields);
    memset(c, 0, sizeof(*c));
}

void api_rec_counts_add(void *ctx, const char *poll_id, int position, int64_t count)
{
    api_rec_counts_t *c = ctx;
    if (c->truncated)
        return;
    if (strlen(poll_id) > TLY_POLL_ID_LEN || c->nfields == REC_MAX_FIELDS) {
        c->truncated = true;
        return;
    }
    if (c->npolls == 0 || strcmp(c->polls[c->npolls - 1].poll_id, poll_id) != 0) {
        if (c->npolls == c->pcap) {
            size_t cap = c->pcap ? c->pcap * 2 : 64;
            api_rec_poll_t *p = tly_realloc(c->polls, cap * sizeof(*p));
            if (p == NULL) {
                c->truncated = true;
                return;
            }
            c->polls = p;
            c->pcap = cap;
        }
        api_rec_poll_t *p = &c->polls[c->npolls++];
        snprintf(p->poll_id, sizeof(p->poll_id), "%s", poll_id);
        p->first = c->nfields;
        p->n = 0;
    }
    if (c->nfields == c->fcap) {
        size_t cap = c->fcap ? c->fcap * 2 : 256;
        api_rec_field_t *f = tly_realloc(c->fields, cap * sizeof(*f));
        if (f == NULL) { /* drop the partial poll: it would look drifted */
            c->nfields = c->polls[--c->npolls].first;
            c->truncated = true;
            return;
        }
        c->fields = f;
        c->fcap = cap;
    }
    c->fields[c->nfields++] = (api_rec_field_t){position, count};
    c->polls[c->npolls - 1].n++;
}

/* The poll of `b` named like a->polls[i], found from *cursor on (both lists are in
 * strcmp order), or NULL. */
static const api_rec_poll_t *find_poll(const api_rec_counts_t *b, const char *poll_id, size_t *cursor)
{
    while (*cursor < b->npolls) {
        int cmp = strcmp(b->polls[*cursor].poll_id, poll_id);
        if (cmp == 0)
            return &b->polls[*cursor];
        if (cmp > 0)
            return NULL;
        (*cursor)++;
    }
    return NULL;
}

static bool same_poll(const api_rec_counts_t *a, const api_rec_poll_t *pa, const api_rec_counts_t *b,
                      const api_rec_poll_t *pb)
{
    if (pb == NULL || pa->n != pb->n)
        return false;
    for (size_t k = 0; k < pa->n; k++) {
        const api_rec_field_t *x = &a->fields[pa->first + k], *y = &b->fields[pb->first + k];
        if (x->position != y->position || x->count != y->count)
            return false;
    }
    return true;
}

/* ---- Redis's live counters against them ------------------------------------------ */

static void field_name(int position, char out[16])
{
    if (position < 0)
        snprintf(out, 16, "ballots");
    else
        snprintf(out, 16, "%d", position);
}

/* A Redis field name as a position: -1 for "ballots", -2 for anything else. */
static int field_position(const char *s, size_t len)
{
    if (len == 7 && memcmp(s, "ballots", 7) == 0)
        return -1;
    if (len == 0 || len > 3)
        return -2;
    int v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -2;
        v = v * 10 + (s[i] - '0');
    }
    return len > 1 && s[0] == '0' ? -2 : v;
}

static int64_t reply_int(const tly_bus_reply_t *r)
{
    if (r->type == TLY_BUS_INT)
        return r->integer;
    if (r->type == TLY_BUS_STRING || r->type == TLY_BUS_STATUS)
        return strtoll(r->str, NULL, 10);
    return 0;
}

static void add_diff(api_rec_redis_t *rr, size_t poll, int position, int64_t redis, int64_t actual, bool del)
{
    if (rr->ndiffs == rr->dcap) {
        size_t cap = rr->dcap ? rr->dcap * 2 : 64;
        api_rec_diff_t *d = cap <= REC_MAX_FIELDS ? tly_realloc(rr->diffs, cap * sizeof(*d)) : NULL;
        if (d == NULL) {
            rr->errors++;
            return;
        }
        rr->diffs = d;
        rr->dcap = cap;
    }
    rr->diffs[rr->ndiffs++] =
        (api_rec_diff_t){.poll = poll, .position = position, .redis = redis, .actual = actual, .del = del};
}

static void compare_poll(api_rec_redis_t *rr, size_t poll, const tly_bus_reply_t *r)
{
    const api_rec_counts_t *c = rr->counts;
    const api_rec_poll_t *p = &c->polls[poll];
    size_t npairs = r->nelements / 2;
    for (size_t k = 0; k < p->n; k++) {
        const api_rec_field_t *f = &c->fields[p->first + k];
        int64_t have = 0; /* a missing field is 0 */
        for (size_t e = 0; e < npairs; e++) {
            const tly_bus_reply_t *name = &r->elements[2 * e];
            if (name->type == TLY_BUS_STRING && field_position(name->str, name->len) == f->position) {
                have = reply_int(&r->elements[2 * e + 1]);
                break;
            }
        }
        if (have != f->count)
            add_diff(rr, poll, f->position, have, f->count, false);
    }
    /* Fields of positions the poll does not have: nothing counts there. */
    for (size_t e = 0; e < npairs; e++) {
        const tly_bus_reply_t *name = &r->elements[2 * e];
        int pos = name->type == TLY_BUS_STRING ? field_position(name->str, name->len) : -2;
        if (pos < 0)
            continue; /* "ballots" is always ours; unknown names are left alone */
        bool ours = false;
        for (size_t k = 0; k < p->n && !ours; k++)
            ours = c->fields[p->first + k].position == pos;
        int64_t v = reply_int(&r->elements[2 * e + 1]);
        if (!ours && v != 0)
            add_diff(rr, poll, pos, v, 0, true);
    }
}

static void pump(api_rec_redis_t *rr);

struct rec_req {
    api_rec_redis_t *rr;
    size_t poll;
    size_t first, n; /* repair: the poll's diffs */
    bool del;        /* repair: this is the HDEL of them (else the HSET) */
};
typedef struct rec_req rec_req_t;

static void on_read(void *arg, const tly_bus_reply_t *r)
{
    rec_req_t *q = arg;
    api_rec_redis_t *rr = q->rr;
    rr->inflight--;
    if (r->type == TLY_BUS_ARRAY && r->nelements % 2 == 0)
        compare_poll(rr, q->poll, r);
    else
        rr->errors++;
    pump(rr);
}

static void on_repaired(void *arg, const tly_bus_reply_t *r)
{
    rec_req_t *q = arg;
    api_rec_redis_t *rr = q->rr;
    rr->inflight--;
    if (r->type == TLY_BUS_ERROR) {
        rr->errors++;
    } else {
        for (size_t i = q->first; i < q->first + q->n; i++)
            if (rr->diffs[i].del == q->del)
                rr->diffs[i].repaired = true;
    }
    pump(rr);
}

/* One poll's repair: HSET of its fields that differ (del false), or HDEL of those of
 * positions it does not have (del true). */
static int send_repair(api_rec_redis_t *rr, size_t poll, size_t first, size_t end, bool del)
{
    rec_req_t *q = &rr->reqs[2 * poll + del];
    *q = (rec_req_t){.rr = rr, .poll = poll, .first = first, .n = end - first, .del = del};
    char key[TLY_POLL_ID_LEN + 16];
    snprintf(key, sizeof(key), "tally:counts:%s", rr->counts->polls[q->poll].poll_id);
    size_t n = 0;
    for (size_t i = q->first; i < q->first + q->n; i++)
        n += rr->diffs[i].del == del;
    if (n == 0)
        return 0;
    const char **argv = tly_malloc((2 + 2 * n) * sizeof(*argv));
    char(*buf)[2][24] = tly_malloc(n * sizeof(*buf));
    int rc = TLY_ENOMEM;
    if (argv == NULL || buf == NULL)
        goto fail;
    size_t argc = 0, k = 0;
    argv[argc++] = del ? "HDEL" : "HSET";
    argv[argc++] = key;
    for (size_t i = q->first; i < q->first + q->n; i++) {
        const api_rec_diff_t *d = &rr->diffs[i];
        if (d->del != del)
            continue;
        field_name(d->position, buf[k][0]);
        argv[argc++] = buf[k][0];
        if (!del) {
            snprintf(buf[k][1], sizeof(buf[k][1]), "%lld", (long long)d->actual);
            argv[argc++] = buf[k][1];
        }
        k++;
    }
    rc = tly_bus_command_argv(rr->bus, on_repaired, q, argc, argv, NULL);
    if (rc == 0)
        rr->inflight++;
fail:
    tly_free(argv);
    tly_free(buf);
    return rc;
}

/* Sends what the window allows; calls done once everything has answered. */
static void pump(api_rec_redis_t *rr)
{
    const api_rec_counts_t *c = rr->counts;
    while (!rr->repairing && rr->next < c->npolls && rr->inflight < REC_WINDOW) {
        rec_req_t *q = &rr->reqs[rr->next];
        *q = (rec_req_t){.rr = rr, .poll = rr->next};
        rr->next++;
        char key[TLY_POLL_ID_LEN + 16];
        snprintf(key, sizeof(key), "tally:counts:%s", c->polls[q->poll].poll_id);
        if (tly_bus_command(rr->bus, on_read, q, "HGETALL %s", key) == 0)
            rr->inflight++;
        else
            rr->errors++;
    }
    while (rr->repairing && rr->next < rr->ndiffs && rr->inflight < REC_WINDOW) {
        size_t first = rr->next, poll = rr->diffs[first].poll, end = first;
        while (end < rr->ndiffs && rr->diffs[end].poll == poll)
            end++;
        rr->next = end;
        if (rr->keep != NULL && !rr->keep(rr->keep_arg, poll)) {
            for (size_t i = first; i < end; i++)
                rr->diffs[i].skipped = true;
            continue;
        }
        if (send_repair(rr, poll, first, end, false) != 0)
            rr->errors++;
        if (send_repair(rr, poll, first, end, true) != 0)
            rr->errors++;
    }
    size_t total = rr->repairing ? rr->ndiffs : c->npolls;
    if (rr->next == total && rr->inflight == 0 && !rr->finished) {
        rr->finished = true;
        rr->done(rr);
    }
}

int api_rec_redis_read(api_rec_redis_t *rr)
{
    rr->next = rr->inflight = rr->ndiffs = rr->errors = 0;
    rr->repairing = rr->finished = false;
    tly_free(rr->reqs);
    /* one per poll for the read; two per poll (HSET, HDEL) for the repair */
    rr->reqs = rr->counts->npolls ? tly_calloc(2 * rr->counts->npolls, sizeof(rec_req_t)) : NULL;
    if (rr->counts->npolls && rr->reqs == NULL)
        return TLY_ENOMEM;
    pump(rr);
    return 0;
}

void api_rec_redis_repair(api_rec_redis_t *rr, bool (*keep)(void *arg, size_t poll), void *keep_arg)
{
    rr->next = rr->inflight = 0;
    rr->repairing = true;
    rr->finished = false;
    rr->keep = keep;
    rr->keep_arg = keep_arg;
    pump(rr);
}

void api_rec_redis_free(api_rec_redis_t *rr)
{
    tly_free(rr->reqs);
    tly_free(rr->diffs);
    rr->reqs = NULL;
    rr->diffs = NULL;
    rr->ndiffs = rr->dcap = 0;
}

bool api_rec_unchanged(const api_rec_counts_t *a, const api_rec_counts_t *b, size_t poll, size_t *cursor)
{
    const api_rec_poll_t *pa = &a->polls[poll];
    return same_poll(a, pa, b, find_poll(b, pa->poll_id, cursor));
}

/* ---- the periodic job --------------------------------------------------------------- */

typedef enum { REC_IDLE, REC_STORE, REC_REDIS_READ, REC_RECOUNT, REC_REDIS_REPAIR } rec_state_t;

typedef struct {
    tly_store_drift_t d;
    char poll_id[TLY_POLL_ID_LEN + 1];
} rec_drift_t;

struct api_reconcile {
    tly_timer_t timer; /* first: the timer's callback finds the job from it */
    work_t work;
    tly_app_t *app;
    rec_state_t state;
    atomic_bool cancel; /* the app is stopping: a queued pass does nothing */
    /* the work item's, while it runs on a worker */
    bool recount; /* this pass only counts again (no repair, no drift report) */
    int rc;
    api_rec_counts_t counts, recounted;
    rec_drift_t *drifts; /* the first REC_MAX_LOGGED */
    size_t ndrifts;
    int64_t started_ms, store_ms;
    /* the loop thread's */
    api_rec_redis_t redis;
    size_t recount_cursor;
    uint64_t runs, repairs_store, repairs_redis;
    int64_t last_run_ms;
};

static void rec_drift(void *ctx, const tly_store_drift_t *d)
{
    api_reconcile_t *j = ctx;
    if (j->ndrifts >= REC_MAX_LOGGED)
        return;
    rec_drift_t *x = &j->drifts[j->ndrifts++];
    snprintf(x->poll_id, sizeof(x->poll_id), "%s", d->poll_id);
    x->d = *d;
    x->d.poll_id = x->poll_id;
}

static void rec_actual(void *ctx, const char *poll_id, int position, int64_t count)
{
    api_reconcile_t *j = ctx;
    api_rec_counts_add(&j->counts, poll_id, position, count);
}

/* Worker thread: its own reader (a connection), opened and closed per pass. */
static void rec_run(work_t *w)
{
    api_reconcile_t *j = (api_reconcile_t *)((char *)w - offsetof(api_reconcile_t, work));
    j->rc = TLY_ESTATE;
    if (atomic_load(&j->cancel))
        return;
    tly_store_reader_t *r = tly_store_reader_open(j->app->store);
    if (r == NULL) {
        j->rc = TLY_EIO;
        return;
    }
    if (j->recount) {
        j->rc = tly_store_reconcile(r, 0, NULL, api_rec_counts_add, &j->recounted);
    } else {
        if (j->drifts == NULL)
            j->drifts = tly_malloc(REC_MAX_LOGGED * sizeof(*j->drifts));
        j->rc = tly_store_reconcile(r, 1, j->drifts ? rec_drift : NULL, rec_actual, j);
    }
    tly_store_reader_close(r);
}

static void rec_schedule(api_reconcile_t *j);

static void rec_finish(api_reconcile_t *j)
{
    api_rec_counts_free(&j->counts);
    api_rec_counts_free(&j->recounted);
    api_rec_redis_free(&j->redis);
    j->ndrifts = 0;
    j->state = REC_IDLE;
    rec_schedule(j);
}

static void log_i64(const char *msg, tly_log_level_t level, const char *where, const char *poll_id, int position,
                    int64_t stored, int64_t actual)
{
    char pos[16], st[24], ac[24];
    snprintf(pos, sizeof(pos), "%d", position);
    snprintf(st, sizeof(st), "%lld", (long long)stored);
    snprintf(ac, sizeof(ac), "%lld", (long long)actual);
    tly_log(level, msg, "where", where, "poll_id", poll_id, "position", pos, "stored", st, "actual", ac, NULL);
}

static bool rec_keep(void *arg, size_t poll)
{
    api_reconcile_t *j = arg;
    return api_rec_unchanged(&j->counts, &j->recounted, poll, &j->recount_cursor);
}

static void rec_redis_done(api_rec_redis_t *rr)
{
    api_reconcile_t *j = rr->arg;
    if (j->state == REC_REDIS_READ) {
        if (rr->ndiffs == 0 || atomic_load(&j->cancel)) {
            char polls[24], errs[24];
            snprintf(polls, sizeof(polls), "%zu", j->counts.npolls);
            snprintf(errs, sizeof(errs), "%zu", rr->errors);
            tly_log(TLY_LOG_INFO, "reconcile", "where", "redis", "polls", polls, "drifts", "0", "errors", errs, NULL);
            rec_finish(j);
            return;
        }
        /* Count again before touching Redis: see the top of the file. */
        j->state = REC_RECOUNT;
        j->recount = true;
        api_work_submit(j->app, &j->work);
        return;
    }
    /* REC_REDIS_REPAIR */
    size_t repaired = 0, skipped = 0;
    for (size_t i = 0; i < rr->ndiffs; i++) {
        const api_rec_diff_t *d = &rr->diffs[i];
        if (d->repaired && repaired++ < REC_MAX_LOGGED)
            log_i64("reconcile repaired", TLY_LOG_WARN, "redis", j->counts.polls[d->poll].poll_id, d->position,
                    d->redis, d->actual);
        skipped += d->skipped;
    }
    j->repairs_redis += repaired;
    char polls[24], drifts[24], sk[24], errs[24];
    snprintf(polls, sizeof(polls), "%zu", j->counts.npolls);
    snprintf(drifts, sizeof(drifts), "%zu", repaired);
    snprintf(sk, sizeof(sk), "%zu", skipped);
    snprintf(errs, sizeof(errs), "%zu", rr->errors);
    tly_log(TLY_LOG_INFO, "reconcile", "where", "redis", "polls", polls, "drifts", drifts, "skipped", sk, "errors",
            errs, NULL);
    rec_finish(j);
}

/* Loop thread: a pass is over. */
static void rec_done(work_t *w)
{
    api_reconcile_t *j = (api_reconcile_t *)((char *)w - offsetof(api_reconcile_t, work));
    tly_app_t *app = j->app;
    if (atomic_load(&j->cancel)) {
        j->state = REC_IDLE;
        return;
    }
    if (j->state == REC_RECOUNT) {
        j->recount = false;
        if (j->rc < 0) {             /* cannot tell which polls were quiet: leave Redis alone */
            if (j->rc == TLY_ESTATE) /* it is doing the same: nothing lost */
                tly_log(TLY_LOG_INFO, "reconcile: Redis not repaired", "reason", "another instance is reconciling",
                        NULL);
            else
                tly_log(TLY_LOG_WARN, "reconcile: Redis not repaired", "reason", "the store cannot be read", NULL);
            rec_finish(j);
            return;
        }
        j->state = REC_REDIS_REPAIR;
        j->recount_cursor = 0;
        api_rec_redis_repair(&j->redis, rec_keep, j);
        return;
    }
    /* REC_STORE */
    if (j->rc == TLY_ESTATE) {
        tly_log(TLY_LOG_DEBUG, "reconcile skipped", "reason", "another instance is reconciling", NULL);
        rec_finish(j);
        return;
    }
    if (j->rc < 0) {
        tly_log(TLY_LOG_ERROR, "reconcile failed", "reason", "the store cannot be read", NULL);
        rec_finish(j);
        return;
    }
    for (size_t i = 0; i < j->ndrifts; i++)
        log_i64("reconcile repaired", TLY_LOG_WARN, "store", j->drifts[i].d.poll_id, j->drifts[i].d.position,
                j->drifts[i].d.stored, j->drifts[i].d.actual);
    j->runs++;
    j->repairs_store += (uint64_t)j->rc;
    j->last_run_ms = tly_now_ms();
    char polls[24], drifts[24], ms[24];
    snprintf(polls, sizeof(polls), "%zu", j->counts.npolls);
    snprintf(drifts, sizeof(drifts), "%d", j->rc);
    snprintf(ms, sizeof(ms), "%lld", (long long)(j->last_run_ms - j->started_ms));
    tly_log(TLY_LOG_INFO, "reconcile", "where", "store", "polls", polls, "drifts", drifts, "ms", ms, NULL);
    if (j->counts.truncated)
        tly_log(TLY_LOG_WARN, "reconcile: too many counts to keep; some polls not compared with Redis", NULL);
    if (app->bus == NULL || !tly_bus_up(app->bus) || j->counts.npolls == 0) {
        rec_finish(j);
        return;
    }
    j->state = REC_REDIS_READ;
    j->redis = (api_rec_redis_t){.bus = app->bus, .counts = &j->counts, .done = rec_redis_done, .arg = j};
    if (api_rec_redis_read(&j->redis) != 0)
        rec_finish(j);
}

static void rec_timer(tly_timer_t *t)
{
    api_reconcile_t *j = (api_reconcile_t *)t;
    if (j->state != REC_IDLE) /* the last run is still going (cannot happen: rescheduled at its end) */
        return;
    j->state = REC_STORE;
    j->recount = false;
    j->started_ms = tly_now_ms();
    api_work_submit(j->app, &j->work);
}

static void rec_schedule(api_reconcile_t *j)
{
    if (!atomic_load(&j->cancel))
        tly_timer_start(j->app->loop, &j->timer, (uint64_t)j->app->conf->reconcile_interval * 1000, rec_timer);
}

int api_reconcile_init(tly_app_t *app)
{
    if (app->conf->reconcile_interval <= 0 || !tly_store_shared(app->store))
        return 0; /* SQLite: memory is the ballots' own count; nothing to reconcile */
    api_reconcile_t *j = tly_calloc(1, sizeof(*j));
    if (j == NULL)
        return TLY_ENOMEM;
    j->app = app;
    j->work.run = rec_run;
    j->work.done = rec_done;
    atomic_init(&j->cancel, false);
    app->reconcile = j;
    rec_schedule(j);
    return 0;
}

void api_reconcile_stop(tly_app_t *app)
{
    api_reconcile_t *j = app->reconcile;
    if (j == NULL)
        return;
    atomic_store(&j->cancel, true);
    tly_timer_stop(&j->timer);
}

void api_reconcile_free(tly_app_t *app)
{
    api_reconcile_t *j = app->reconcile;
    if (j == NULL)
        return;
    api_rec_counts_free(&j->counts);
    api_rec_counts_free(&j->recounted);
    api_rec_redis_free(&j->redis);
    tly_free(j->drifts);
    tly_free(j);
    app->reconcile = NULL;
}

void api_reconcile_stats(const tly_app_t *app, uint64_t *runs, uint64_t *repairs_store, uint64_t *repairs_redis,
                         int64_t *last_run_ms)
{
    const api_reconcile_t *j = app->reconcile;
    *runs = j ? j->runs : 0;
    *repairs_store = j ? j->repairs_store : 0;
    *repairs_redis = j ? j->repairs_redis : 0;
    *last_run_ms = j ? j->last_run_ms : 0;
}

/* ---- `tally reconcile`: one pass from the command line ---- */

typedef struct {
    bool repair;
    api_rec_counts_t counts, recounted;
    size_t cursor;
    bool redis_done;
} cli_rec_t;

static void position_name(int position, char out[16])
{
    if (position < 0)
        snprintf(out, 16, "ballots");
    else
        snprintf(out, 16, "%d", position);
}

static void cli_drift(void *ctx, const tly_store_drift_t *d)
{
    cli_rec_t *c = ctx;
    char pos[16];
    position_name(d->position, pos);
    printf("drift store poll=%s position=%s stored=%lld actual=%lld %s\n", d->poll_id, pos, (long long)d->stored,
           (long long)d->actual, c->repair ? "repaired" : "not-repaired");
}

static void cli_actual(void *ctx, const char *poll_id, int position, int64_t count)
{
    api_rec_counts_add(&((cli_rec_t *)ctx)->counts, poll_id, position, count);
}

static void cli_redis_done(api_rec_redis_t *rr) { ((cli_rec_t *)rr->arg)->redis_done = true; }

static bool cli_keep(void *arg, size_t poll)
{
    cli_rec_t *c = arg;
    return api_rec_unchanged(&c->counts, &c->recounted, poll, &c->cursor);
}

static void cli_notify(void *arg) { (void)arg; /* nothing is submitted: no batch to reap */ }

/* Runs the loop until *flag is set or ms pass; false on timeout. */
static bool run_until(tly_loop_t *loop, const bool *flag, uint64_t ms)
{
    uint64_t until = tly_loop_now(loop) + ms;
    while (!*flag && tly_loop_now(loop) < until)
        tly_loop_run_once(loop, 50);
    return *flag;
}

/* Compares Redis's live counters with c->counts and, with --repair, sets those that
 * differ, except for polls whose counts moved meanwhile (see api/reconcile.c). Returns
 * the drifts left (found and not repaired), or -1 on an error (message printed). */
static long cli_redis(const tly_conf_t *conf, tly_store_reader_t *rd, cli_rec_t *c)
{
    long left = -1;
    tly_bus_t *bus = NULL;
    tly_loop_t *loop = tly_loop_new();
    tly_bus_conf_t bc = {.loop = loop, .url = conf->bus, .instance_id = "reconcile"};
    api_rec_redis_t rr = {.counts = &c->counts, .done = cli_redis_done, .arg = c};
    if (loop == NULL || tly_bus_open(&bc, &bus) != 0) {
        fprintf(stderr, "tally reconcile: cannot use the bus %s: expected redis://host:port[/db]\n", conf->bus);
        goto fail;
    }
    uint64_t until = tly_loop_now(loop) + 5000;
    while (!tly_bus_up(bus) && tly_loop_now(loop) < until)
        tly_loop_run_once(loop, 50);
    if (!tly_bus_up(bus)) {
        fprintf(stderr, "tally reconcile: Redis at %s does not answer\n", conf->bus);
        goto fail;
    }
    rr.bus = bus;
    if (api_rec_redis_read(&rr) != 0 || !run_until(loop, &c->redis_done, 60000) || rr.errors > 0) {
        fprintf(stderr, "tally reconcile: reading Redis's counters failed\n");
        goto fail;
    }
    if (rr.ndiffs > 0 && c->repair) {
        /* Count again: only polls that did not change across the read are repaired. */
        int rc = tly_store_reconcile(rd, 0, NULL, api_rec_counts_add, &c->recounted);
        if (rc < 0) {
            fprintf(stderr, "tally reconcile: %s\n",
                    rc == TLY_ESTATE ? "another instance is reconciling now; try again"
                                     : "the store cannot be read (see the log)");
            goto fail;
        }
        c->redis_done = false;
        api_rec_redis_repair(&rr, cli_keep, c);
        if (!run_until(loop, &c->redis_done, 60000) || rr.errors > 0) {
            fprintf(stderr, "tally reconcile: repairing Redis's counters failed\n");
            goto fail;
        }
    }
    left = 0;
    for (size_t i = 0; i < rr.ndiffs; i++) {
        const api_rec_diff_t *d = &rr.diffs[i];
        char pos[16];
        position_name(d->position, pos);
        printf("drift redis poll=%s position=%s stored=%lld actual=%lld %s\n", c->counts.polls[d->poll].poll_id, pos,
               (long long)d->redis, (long long)d->actual,
               d->repaired  ? "repaired"
               : d->skipped ? "skipped-poll-changed"
                            : "not-repaired");
        left += !d->repaired;
    }
    printf("reconcile: redis: %zu polls, %zu drifts, %ld not repaired\n", c->counts.npolls, rr.ndiffs, left);
fail:
    api_rec_redis_free(&rr);
    tly_bus_close(bus);
    tly_loop_free(loop);
    return left;
}

int tly_reconcile_cli(const tly_conf_t *conf)
{
    if (tly_log_set_level(conf->log_level) != 0) {
        fprintf(stderr, "tally reconcile: --log-level must be debug, info, warn or error\n");
        return 2;
    }
    if (strncmp(conf->store, "postgres://", 11) != 0 && strncmp(conf->store, "postgresql://", 13) != 0) {
        fprintf(stderr, "tally reconcile: needs --store postgres://... (SQLite keeps no counters beside the "
                        "ballots: its counts are rebuilt from them at every start)\n");
        return 2;
    }
    int status = 2;
    cli_rec_t c = {.repair = conf->repair};
    tly_store_reader_t *rd = NULL;
    tly_store_t *store = NULL;
    /* no data directory: a one-off client of the shared store, beside the running servers */
    tly_store_conf_t sc = {.url = conf->store, .data_dir = NULL, .origin = "reconcile", .notify = cli_notify};
    int rc = tly_store_open(&sc, &store);
    if (rc != 0 || (rd = tly_store_reader_open(store)) == NULL) {
        fprintf(stderr, "tally reconcile: cannot open the store (error %d); see the log above\n", rc);
        goto fail;
    }
    rc = tly_store_reconcile(rd, conf->repair, cli_drift, cli_actual, &c);
    if (rc < 0) {
        fprintf(stderr, "tally reconcile: %s\n",
                rc == TLY_ESTATE ? "another instance is reconciling now; try again"
                                 : "the store cannot be read (see the log)");
        goto fail;
    }
    printf("reconcile: store: %zu polls, %d drifts%s\n", c.counts.npolls, rc,
           rc == 0        ? ""
           : conf->repair ? ", repaired"
                          : ", not repaired (--repair puts them right)");
    if (c.counts.truncated)
        fprintf(stderr, "tally reconcile: too many counts to keep; some polls not compared with Redis\n");
    long left = conf->repair ? 0 : rc;
    if (conf->bus[0] != '\0') {
        long redis_left = cli_redis(conf, rd, &c);
        if (redis_left < 0)
            goto fail;
        left += redis_left;
    }
    status = left > 0 ? 1 : 0;
fail:
    tly_store_reader_close(rd);
    tly_store_close(store);
    api_rec_counts_free(&c.counts);
    api_rec_counts_free(&c.recounted);
    return status;
}
