/*
 * log.c: JSON log lines.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

#include "base/base.h"
#include "obs/obs.h"

static tly_log_level_t min_level = TLY_LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};

int tly_log_level_valid(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0)
            return 0;
    return -1;
}

int tly_log_set_level(const char *name)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            min_level = (tly_log_level_t)i;
            return 0;
        }
    }
    return -1;
}

int tly_log_open(const char *path)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0)
        return -errno;
    int rc = dup2(fd, STDERR_FILENO) < 0 ? -errno : 0; /* dup2 clears O_CLOEXEC on fd 2 */
    close(fd);
    return rc;
}

static void emit(json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (s == NULL)
        return;
    size_t n = strlen(s);
    s[n] = '\n';
    /* one write per line so lines from threads never interleave */
    ssize_t w = write(STDERR_FILENO, s, n + 1);
    (void)w;
    free(s);
}

static json_t *line(tly_log_level_t level, const char *msg)
{
    char ts[TLY_TIME_LEN];
    tly_time_format(tly_now_ms(), ts);
    return json_pack("{s:s, s:s, s:s}", "ts", ts, "level", level_names[level], "msg", msg);
}

void tly_log(tly_log_level_t level, const char *msg, ...)
{
    if (level < min_level)
        return;
    json_t *o = line(level, msg);
    if (o == NULL)
        return;
    va_list ap;
    va_start(ap, msg);
    const char *k;
    while ((k = va_arg(ap, const char *)) != NULL) {
        const char *v = va_arg(ap, const char *);
        json_object_set_new(o, k, v ? json_string(v) : json_null());
    }
    va_end(ap);
    emit(o);
    json_decref(o);
}

void tly_log_request(const char *method, const char *route, int status, const char *code, double ms, const char *peer)
{
    if (TLY_LOG_INFO < min_level)
        return;
    json_t *o = line(TLY_LOG_INFO, "request");
    if (o == NULL)
        return;
    json_object_set_new(o, "method", json_string(method));
    json_object_set_new(o, "route", json_string(route));
    json_object_set_new(o, "status", json_integer(status));
    if (code != NULL)
        json_object_set_new(o, "code", json_string(code));
    json_object_set_new(o, "ms", json_real((double)(int64_t)(ms * 1000) / 1000));
    json_object_set_new(o, "peer", json_string(peer));
    emit(o);
    json_decref(o);
}
