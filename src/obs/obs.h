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
/* Writes {"ts","level","msg", k1:v1, ...}: `kv` is a NULL-terminated list of key,
 * value string pairs. */
void tly_log(tly_log_level_t level, const char *msg, ...);
/* One line per request: method, route pattern, status, duration, request size. */
void tly_log_request(const char *method, const char *route, int status, double ms, const char *peer);

#endif
