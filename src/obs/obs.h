/*
 * obs: structured logs, one JSON object per line on stderr. Never log a token, a
 * password or ballot content.
 *
 * Threads: any thread; each line is written with one write(2).
 */
#ifndef TALLY_OBS_H
#define TALLY_OBS_H

#include <stdint.h>

typedef enum { TLY_LOG_DEBUG, TLY_LOG_INFO, TLY_LOG_WARN, TLY_LOG_ERROR } tly_log_level_t;

/* Sets the lowest level written; "debug", "info", "warn" or "error". Returns 0 or -1. */
int tly_log_set_level(const char *name);
/* Whether name is a level tly_log_set_level takes: 0 or -1. */
int tly_log_level_valid(const char *name);
/* Sends the log (this process's stderr) to the file at path, appending, created with
 * mode 0640 if missing; called again (SIGHUP), it opens the path anew, so a rotated file
 * is let go. The switch is atomic (dup2): no line is lost or split. Returns 0 or -errno.
 * Main thread. */
int tly_log_open(const char *path);
/* Writes {"ts","level","msg", k1:v1, ...}: `kv` is a NULL-terminated list of key,
 * value string pairs (the compiler checks the NULL: `sentinel`). */
void tly_log(tly_log_level_t level, const char *msg, ...) __attribute__((sentinel));
/* One line per request: method, route pattern, status, error code (or NULL), duration
 * and the peer's address. Never the path's query, a header or a body. */
void tly_log_request(const char *method, const char *route, int status, const char *code, double ms, const char *peer);

/* ---- metrics (GET /metrics). Record on the event-loop thread only; every string must
 * be static (series are keyed by pointer). ---- */

/* One answered request: route pattern (NULL: no route matched), method, status, and
 * the microseconds (monotonic) from a complete head to the response. */
void tly_metrics_request(const char *route, const char *method, int status, uint64_t us);
/* Notes the process's start time for process_start_time_seconds; call once at start. */
void tly_metrics_process_start(void);
/* +1 on the counter `family`{label="value"}. */
void tly_metrics_count(const char *family, const char *label, const char *value);
/* HELP text of a counter family (metrics_help.c keeps the list). */
const char *tly_metrics_help(const char *family);

/* What the caller adds at scrape time: the store's statistics and gauges. */
typedef struct {
    const uint64_t *batch_bounds, *commit_us_bounds;
    size_t nbounds;
    const uint64_t *batch_hist, *commit_hist; /* nbounds + 1 entries */
    uint64_t batch_sum, commit_us_sum, failed_batches, queued;
    uint64_t checkpoints, wal_bytes, checkpoint_backlog_bytes;
    int writable;
    uint64_t live_subscribers, connections, polls;
    /* reconciliation of counters with the ballots: runs completed, counters repaired in
     * the store and in Redis, and when the last run completed (ms since the epoch; 0:
     * never) */
    uint64_t reconcile_runs, reconcile_repairs_store, reconcile_repairs_redis;
    int64_t reconcile_last_run_ms;
    /* scale-out: other instances' changes applied, requests that waited for a catch-up,
     * the bus and the ingest log */
    uint64_t followed, resyncs;
    int bus_up; /* -1: no bus */
    uint64_t bus_reconnects, bus_dropped;
    uint64_t ingest_enqueued, ingest_applied, ingest_failed, ingest_dead;
    const char *store_kind; /* tally_build_info's store label: "sqlite" or "postgres" */
} tly_metrics_extra_t;
/* The whole exposition (heap, caller frees), or NULL on allocation failure. */
char *tly_metrics_render(const tly_metrics_extra_t *x, size_t *len);

#endif
