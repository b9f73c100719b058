/*
 * metrics.c: counters and histograms for GET /metrics, in Prometheus text format.
 *
 * Everything here is recorded on the event-loop thread (requests, votes, limits), so
 * nothing locks; the store's figures come from tly_store_stats at scrape time. Series
 * are few and fixed in kind (route patterns, methods, statuses, error codes), kept in
 * small open-addressing tables with a bound; a series beyond the bound is counted in
 * tally_metrics_dropped_total instead of growing memory.
 */
#include <dirent.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "base/base.h"
#include "obs/obs.h"

#define MAX_SERIES 512
#define NBUCKETS 14

/* microseconds: a read from memory takes tens of them, a durable vote a commit's fsync */
static const uint64_t latency_bounds_us[NBUCKETS] = {100,   250,   500,    1000,   2500,   5000,   10000,
                                                     25000, 50000, 100000, 250000, 500000, 1000000, 5000000};

typedef struct {
    const char *route, *method; /* static strings; NULL = free slot */
    int status;
    uint64_t count;
} req_series_t;

/* One histogram per (route, method): a path with several methods (GET and PATCH of a
 * poll) is several series, each with its own labels. */
typedef struct {
    const char *route, *method;
    uint64_t buckets[NBUCKETS + 1];
    uint64_t count;
    uint64_t sum_us;
} latency_series_t;

typedef struct {
    const char *family, *label, *value;
    uint64_t count;
} counter_series_t;

static req_series_t reqs[MAX_SERIES];
static latency_series_t lats[MAX_SERIES / 4];
static counter_series_t counters[MAX_SERIES];
static uint64_t dropped;

static size_t hash_ptrs(const void *a, const void *b, int n)
{
    uintptr_t h = (uintptr_t)a * 31 + (uintptr_t)b * 17 + (uintptr_t)n;
    h ^= h >> 17;
    h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 20);
}

void tly_metrics_request(const char *route, const char *method, int status, uint64_t us)
{
    if (route == NULL)
        route = "unmatched";
    size_t n = TLY_ARRAY_SIZE(reqs), i = hash_ptrs(route, method, status) % n;
    for (size_t k = 0; k < n; k++, i = (i + 1) % n) {
        req_series_t *s = &reqs[i];
        if (s->route == NULL) {
            s->route = route;
            s->method = method;
            s->status = status;
        }
        if (s->route == route && s->method == method && s->status == status) {
            s->count++;
            break;
        }
        if (k == n - 1)
            dropped++;
    }
    n = TLY_ARRAY_SIZE(lats);
    i = hash_ptrs(route, method, 0) % n;
    for (size_t k = 0; k < n; k++, i = (i + 1) % n) {
        latency_series_t *l = &lats[i];
        if (l->route == NULL) {
            l->route = route;
            l->method = method;
        }
        if (l->route == route && l->method == method) {
            size_t b = 0;
            while (b < NBUCKETS && us > latency_bounds_us[b])
                b++;
            l->buckets[b]++;
            l->count++;
            l->sum_us += us;
            return;
        }
    }
    dropped++;
}

/* Counter series are matched by content: the same error code written in two files may
 * be two different pointers, and two series with one label set would be invalid. */
static size_t hash_str(const char *a, const char *b)
{
    size_t h = 5381;
    for (const char *p = a; *p; p++)
        h = h * 33 + (unsigned char)*p;
    for (const char *p = b; *p; p++)
        h = h * 33 + (unsigned char)*p;
    return h;
}

void tly_metrics_count(const char *family, const char *label, const char *value)
{
    size_t n = TLY_ARRAY_SIZE(counters), i = hash_str(family, value) % n;
    for (size_t k = 0; k < n; k++, i = (i + 1) % n) {
        counter_series_t *c = &counters[i];
        if (c->family == NULL) {
            c->family = family;
            c->label = label;
            c->value = value;
        }
        if (strcmp(c->family, family) == 0 && strcmp(c->value, value) == 0) {
            c->count++;
            return;
        }
    }
    dropped++;
}

/* ---- rendering ---- */

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} out_t;

static void put(out_t *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out_t *o, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = 1;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2 + (size_t)n;
        char *b = tly_realloc(o->buf, cap);
        if (b == NULL) {
            o->failed = 1;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
}

/* Label values here are route patterns, methods and error codes: no quotes or
 * backslashes can occur, so no escaping is needed. */

static bool family_seen(const char *family, size_t upto)
{
    for (size_t j = 0; j < upto; j++)
        if (counters[j].family != NULL && strcmp(counters[j].family, family) == 0)
            return true;
    return false;
}

/* ---- the process (Prometheus's process_* conventions) and the build ---- */

static double start_time_s; /* wall clock at tly_metrics_process_start */

void tly_metrics_process_start(void) { start_time_s = (double)tly_now_ms() / 1000; }

static size_t open_fds(void)
{
    size_t n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n > 0 ? n - 1 : 0; /* not the directory's own */
}

/* /proc/self/statm: sizes in pages (virtual, resident) */
static void memory(uint64_t *virt, uint64_t *rss)
{
    *virt = *rss = 0;
    FILE *f = fopen("/proc/self/statm", "re");
    if (f == NULL)
        return;
    unsigned long long v, r;
    if (fscanf(f, "%llu %llu", &v, &r) == 2) {
        uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
        *virt = v * page;
        *rss = r * page;
    }
    fclose(f);
}

static void put_build_and_process(out_t *o, const tly_metrics_extra_t *x)
{
    put(o,
        "# HELP tally_build_info The running build: its version, commit and store (always 1).\n"
        "# TYPE tally_build_info gauge\ntally_build_info{version=\"%s\",commit=\"%s\",store=\"%s\"} 1\n",
        tly_version, tly_build_commit, x->store_kind ? x->store_kind : "sqlite");
    struct rusage ru;
    double cpu = 0;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
              (double)ru.ru_stime.tv_usec / 1e6;
    uint64_t virt, rss;
    memory(&virt, &rss);
    struct rlimit rl;
    double max_fds = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (double)rl.rlim_cur : -1;
    put(o,
        "# HELP process_cpu_seconds_total User and system CPU time spent, in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.6f\n"
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %llu\n"
        "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
        "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %llu\n"
        "# HELP process_open_fds Number of open file descriptors.\n"
        "# TYPE process_open_fds gauge\nprocess_open_fds %zu\n"
        "# HELP process_max_fds Maximum number of open file descriptors (-1: no limit).\n"
        "# TYPE process_max_fds gauge\nprocess_max_fds %.0f\n"
        "# HELP process_start_time_seconds Start time of the process since the Unix epoch, in seconds.\n"
        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %.3f\n",
        cpu, (unsigned long long)rss, (unsigned long long)virt, open_fds(), max_fds, start_time_s);
}

char *tly_metrics_render(const tly_metrics_extra_t *x, size_t *len)
{
    out_t o = {.cap = 16384};
    if ((o.buf = tly_malloc(o.cap)) == NULL)
        return NULL;
    put(&o, "# HELP tally_http_requests_total HTTP requests answered, by route pattern, method and status.\n"
            "# TYPE tally_http_requests_total counter\n");
    for (size_t i = 0; i < TLY_ARRAY_SIZE(reqs); i++)
        if (reqs[i].route != NULL)
            put(&o, "tally_http_requests_total{route=\"%s\",method=\"%s\",status=\"%d\"} %llu\n", reqs[i].route,
                reqs[i].method, reqs[i].status, (unsigned long long)reqs[i].count);
    put(&o, "# HELP tally_http_request_duration_seconds Time from a complete request head to the start of its "
            "response.\n# TYPE tally_http_request_duration_seconds histogram\n");
    for (size_t i = 0; i < TLY_ARRAY_SIZE(lats); i++) {
        latency_series_t *l = &lats[i];
        if (l->route == NULL)
            continue;
        uint64_t cum = 0;
        for (size_t b = 0; b < NBUCKETS; b++) {
            cum += l->buckets[b];
            put(&o, "tally_http_request_duration_seconds_bucket{route=\"%s\",method=\"%s\",le=\"%g\"} %llu\n",
                l->route, l->method, (double)latency_bounds_us[b] / 1e6, (unsigned long long)cum);
        }
        cum += l->buckets[NBUCKETS];
        put(&o, "tally_http_request_duration_seconds_bucket{route=\"%s\",method=\"%s\",le=\"+Inf\"} %llu\n", l->route,
            l->method, (unsigned long long)cum);
        put(&o, "tally_http_request_duration_seconds_sum{route=\"%s\",method=\"%s\"} %.6f\n", l->route, l->method,
            (double)l->sum_us / 1e6);
        put(&o, "tally_http_request_duration_seconds_count{route=\"%s\",method=\"%s\"} %llu\n", l->route, l->method,
            (unsigned long long)l->count);
    }
    /* counter families, each with its HELP/TYPE once */
    for (size_t i = 0; i < TLY_ARRAY_SIZE(counters); i++) {
        const char *fam = counters[i].family;
        if (fam == NULL || family_seen(fam, i))
            continue;
        put(&o, "# HELP %s %s\n# TYPE %s counter\n", fam, tly_metrics_help(fam), fam);
        for (size_t j = i; j < TLY_ARRAY_SIZE(counters); j++)
            if (counters[j].family != NULL && strcmp(counters[j].family, fam) == 0)
                put(&o, "%s{%s=\"%s\"} %llu\n", fam, counters[j].label, counters[j].value,
                    (unsigned long long)counters[j].count);
    }
    const uint64_t *bb = x->batch_bounds, *cb = x->commit_us_bounds;
    put(&o, "# HELP tally_store_batch_size Operations per committed store transaction.\n"
            "# TYPE tally_store_batch_size histogram\n");
    uint64_t cum = 0;
    for (size_t b = 0; b < x->nbounds; b++) {
        cum += x->batch_hist[b];
        put(&o, "tally_store_batch_size_bucket{le=\"%llu\"} %llu\n", (unsigned long long)bb[b],
            (unsigned long long)cum);
    }
    cum += x->batch_hist[x->nbounds];
    put(&o, "tally_store_batch_size_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    put(&o, "tally_store_batch_size_sum %llu\ntally_store_batch_size_count %llu\n", (unsigned long long)x->batch_sum,
        (unsigned long long)cum);
    put(&o, "# HELP tally_store_commit_seconds Time to commit (and fsync) one store transaction.\n"
            "# TYPE tally_store_commit_seconds histogram\n");
    cum = 0;
    for (size_t b = 0; b < x->nbounds; b++) {
        cum += x->commit_hist[b];
        put(&o, "tally_store_commit_seconds_bucket{le=\"%g\"} %llu\n", (double)cb[b] / 1e6, (unsigned long long)cum);
    }
    cum += x->commit_hist[x->nbounds];
    put(&o, "tally_store_commit_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    put(&o, "tally_store_commit_seconds_sum %.6f\ntally_store_commit_seconds_count %llu\n",
        (double)x->commit_us_sum / 1e6, (unsigned long long)cum);
    put(&o,
        "# HELP tally_store_failed_batches_total Store transactions that did not commit.\n"
        "# TYPE tally_store_failed_batches_total counter\ntally_store_failed_batches_total %llu\n",
        (unsigned long long)x->failed_batches);
    put(&o,
        "# HELP tally_store_queue_depth Writes queued for the store and not yet taken by the writer.\n"
        "# TYPE tally_store_queue_depth gauge\ntally_store_queue_depth %llu\n",
        (unsigned long long)x->queued);
    put(&o,
        "# HELP tally_store_checkpoints_total WAL checkpoints run (SQLite: the checkpointer thread).\n"
        "# TYPE tally_store_checkpoints_total counter\ntally_store_checkpoints_total %llu\n"
        "# HELP tally_store_wal_bytes_total Bytes of WAL the store's commits appended (SQLite).\n"
        "# TYPE tally_store_wal_bytes_total counter\ntally_store_wal_bytes_total %llu\n"
        "# HELP tally_store_checkpoint_backlog_bytes WAL committed but not yet copied back into the database file.\n"
        "# TYPE tally_store_checkpoint_backlog_bytes gauge\ntally_store_checkpoint_backlog_bytes %llu\n",
        (unsigned long long)x->checkpoints, (unsigned long long)x->wal_bytes,
        (unsigned long long)x->checkpoint_backlog_bytes);
    put(&o,
        "# HELP tally_store_writable Whether the store accepts writes (0 after a failed fsync).\n"
        "# TYPE tally_store_writable gauge\ntally_store_writable %d\n",
        x->writable);
    put(&o,
        "# HELP tally_live_subscribers Open live results streams (SSE and WebSocket).\n"
        "# TYPE tally_live_subscribers gauge\ntally_live_subscribers %llu\n",
        (unsigned long long)x->live_subscribers);
    put(&o,
        "# HELP tally_http_connections Open HTTP connections.\n"
        "# TYPE tally_http_connections gauge\ntally_http_connections %llu\n",
        (unsigned long long)x->connections);
    put(&o, "# HELP tally_polls Polls in memory.\n# TYPE tally_polls gauge\ntally_polls %llu\n",
        (unsigned long long)x->polls);
    put(&o,
        "# HELP tally_reconcile_runs_total Reconciliations of the counters with the ballots this instance "
        "completed.\n# TYPE tally_reconcile_runs_total counter\ntally_reconcile_runs_total %llu\n",
        (unsigned long long)x->reconcile_runs);
    put(&o,
        "# HELP tally_reconcile_repairs_total Counters found drifted from the ballots and put right, by where "
        "they are kept.\n# TYPE tally_reconcile_repairs_total counter\n"
        "tally_reconcile_repairs_total{where=\"store\"} %llu\n"
        "tally_reconcile_repairs_total{where=\"redis\"} %llu\n",
        (unsigned long long)x->reconcile_repairs_store, (unsigned long long)x->reconcile_repairs_redis);
    put(&o,
        "# HELP tally_follow_ops_total Changes committed by other instances sharing the store, applied to "
        "this one's memory.\n# TYPE tally_follow_ops_total counter\ntally_follow_ops_total %llu\n",
        (unsigned long long)x->followed);
    put(&o,
        "# HELP tally_resyncs_total Requests that found nothing in memory and waited for it to catch up with "
        "the shared store before answering.\n# TYPE tally_resyncs_total counter\ntally_resyncs_total %llu\n",
        (unsigned long long)x->resyncs);
    if (x->bus_up >= 0) {
        put(&o,
            "# HELP tally_bus_up Whether the Redis bus is connected.\n# TYPE tally_bus_up gauge\n"
            "tally_bus_up %d\n",
            x->bus_up);
        put(&o,
            "# HELP tally_bus_reconnects_total Times the Redis bus came back after being down.\n"
            "# TYPE tally_bus_reconnects_total counter\ntally_bus_reconnects_total %llu\n",
            (unsigned long long)x->bus_reconnects);
        put(&o,
            "# HELP tally_bus_dropped_total Messages to other instances dropped while the bus was down (they "
            "read the feed on their own within 100 ms).\n# TYPE tally_bus_dropped_total counter\n"
            "tally_bus_dropped_total %llu\n",
            (unsigned long long)x->bus_dropped);
        put(&o,
            "# HELP tally_ingest_total Async ballots through the ingest log, by outcome on this instance.\n"
            "# TYPE tally_ingest_total counter\n"
            "tally_ingest_total{outcome=\"enqueued\"} %llu\n"
            "tally_ingest_total{outcome=\"applied\"} %llu\n"
            "tally_ingest_total{outcome=\"failed\"} %llu\n"
            "tally_ingest_total{outcome=\"dead_lettered\"} %llu\n",
            (unsigned long long)x->ingest_enqueued, (unsigned long long)x->ingest_applied,
            (unsigned long long)x->ingest_failed, (unsigned long long)x->ingest_dead);
    }
    put(&o,
        "# HELP tally_reconcile_last_run_timestamp_seconds When this instance last completed a reconciliation "
        "(0: never).\n# TYPE tally_reconcile_last_run_timestamp_seconds gauge\n"
        "tally_reconcile_last_run_timestamp_seconds %.3f\n",
        (double)x->reconcile_last_run_ms / 1000);
    put_build_and_process(&o, x);
    put(&o,
        "# HELP tally_metrics_dropped_total Observations not recorded because a series table was full.\n"
        "# TYPE tally_metrics_dropped_total counter\ntally_metrics_dropped_total %llu\n",
        (unsigned long long)dropped);
    if (o.failed) {
        tly_free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}
