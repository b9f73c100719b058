/*
 * api: the HTTP resources of tally (API.md). One file per resource: auth.c, polls.c,
 * votes.c, results.c, ops.c; app.c wires them to the router, the store and the loop.
 * Parses and validates requests, calls core, renders JSON. No SQL here.
 *
 * Threads: an app lives on the event-loop thread that created it.
 */
#ifndef TALLY_API_H
#define TALLY_API_H

#include <stdbool.h>

#include "conf/conf.h"
#include "http/http.h"

typedef struct tly_app tly_app_t;

/* Opens the store in conf->data_dir, loads every poll, ballot and user into memory,
 * and listens on conf->listen. Returns NULL with a reason in err (512 bytes). */
tly_app_t *tly_app_new(const tly_conf_t *conf, tly_loop_t *loop, const char *secret, char *err);
/* Graceful stop: stop accepting, let in-flight requests finish (the caller keeps running
 * the loop while tly_app_busy), then tly_app_free commits what is queued and closes. */
void tly_app_stop_accepting(tly_app_t *app);
bool tly_app_busy(tly_app_t *app);
void tly_app_free(tly_app_t *app);
int tly_app_port(tly_app_t *app);
/* The port --metrics-listen bound, or 0 without it. */
int tly_app_metrics_port(tly_app_t *app);

/* Checks what can be checked of conf without touching the disk or the network (the
 * listen addresses parse and resolve, --trusted-proxies, --cors-origins, --log-level,
 * the --store and --bus schemes), so that a bad argument refuses the start before
 * anything is created. Returns 0, or -1 with a reason in err (512 bytes). Main thread. */
int tly_app_check_conf(const tly_conf_t *conf, char *err);
/* SIGHUP: the options tly_conf_reload moved into app's conf (already checked with
 * tly_app_check_conf) take effect: the CORS origins; web-root and public-url are read
 * per request. Loop thread. */
void tly_app_reloaded(tly_app_t *app);

/* Reads the server secret from data_dir/secret, creating it (32 random bytes, hex, mode
 * 0600) when absent. Returns a heap string or NULL with a reason in err (512 bytes). */
char *tly_secret_load(const char *data_dir, char *err);

/* `tally reconcile`: compares the counter rows (and, with --bus, Redis's live counters)
 * with the ballots once, prints every drift, repairs with --repair. Exit status: 0 when
 * no drift is left, 1 when drift was found and not repaired, 2 on errors. */
int tly_reconcile_cli(const tly_conf_t *conf);

#endif
