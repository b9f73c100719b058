/*
 * main.c: the tally command: `tally serve` runs the server, `tally token` mints a token
 * with the server secret (for scripts, tests and benchmarks), `tally reconcile` checks
 * (and with --repair puts right) a shared store's counters and Redis's live counters
 * against the ballots, once.
 */
#include <curl/curl.h>
#include <jansson.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "api/api.h"
#include "auth/auth.h"
#include "base/base.h"
#include "conf/conf.h"
#include "http/http.h"
#include "obs/obs.h"
#include "store/store.h"

static volatile sig_atomic_t stop_requested, reload_requested;

static void on_signal(int sig)
{
    if (sig == SIGHUP)
        reload_requested = 1;
    else
        stop_requested = 1;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: tally <command> [options]\n"
                 "       tally --version\n\n"
                 "commands:\n"
                 "  serve    run the server (HTTP API, live results, web UI)\n"
                 "  token    print a bearer token for --sub, signed with the server secret\n"
                 "  reconcile\n"
                 "           compare a shared store's counter rows (and, with --bus, Redis's live\n"
                 "           counters) with the ballots and print every drift; --repair puts them\n"
                 "           right. Exit status: 0 no drift left, 1 drift found and not repaired,\n"
                 "           2 error\n\n"
                 "options of serve (flags > TALLY_* environment > config file > defaults):\n");
    tly_conf_help(out, "serve");
    fprintf(out, "\noptions of token:\n");
    tly_conf_help(out, "token");
    fprintf(out, "\noptions of reconcile:\n");
    tly_conf_help(out, "reconcile");
}

/* The signing secret, as a heap string the caller frees. */
static char *secret_of(const tly_conf_t *conf, char *err)
{
    if (conf->secret[0] != '\0') {
        if (strlen(conf->secret) < 16) {
            snprintf(err, 512, "the secret must be at least 16 characters");
            return NULL;
        }
        return tly_strdup(conf->secret);
    }
    return tly_secret_load(conf->data_dir, err);
}

static int cmd_token(const tly_conf_t *conf)
{
    char err[512], token[TLY_JWT_MAX + 1];
    if (conf->sub[0] == '\0') {
        fprintf(stderr, "tally token: --sub is required\n");
        return 2;
    }
    char *secret = secret_of(conf, err);
    if (secret == NULL) {
        fprintf(stderr, "tally token: %s\n", err);
        return 1;
    }
    int64_t now = tly_now_ms() / 1000;
    int rc =
        tly_jwt_sign((const uint8_t *)secret, strlen(secret), conf->sub, conf->anonymous, now, now + conf->ttl, token);
    tly_free(secret);
    if (rc < 0) {
        fprintf(stderr, "tally token: --sub must be 1 to %d bytes without control characters\n", TLY_SUB_MAX);
        return 2;
    }
    printf("%s\n", token);
    return 0;
}

/*
 * Fault injection for the tests in tests/crash/, read from the environment at start and
 * deliberately not options (no flag, no config file, not in --help): nobody should turn
 * them on by accident. Unset or empty = off. A value that is not a positive integer
 * stops the start, so that a typo cannot quietly turn a fault test into a plain one.
 *   TALLY_FAULT_FSYNC_AFTER=n  the n-th fsync of the database or its WAL fails with EIO
 *                              (tly_store_fault_fsync), counted from before the store opens
 *   TALLY_FAULT_ALLOC_EVERY=n  every n-th allocation fails (tly_alloc_fail_every), from
 *                              when the store is loaded and the server listens
 * Returns 0 (off), the value, or -1 when malformed.
 */
static long fault_env(const char *name)
{
    const char *v = getenv(name);
    if (v == NULL || v[0] == '\0')
        return 0;
    char *end;
    long n = strtol(v, &end, 10);
    if (*end != '\0' || n < 1) {
        fprintf(stderr, "tally serve: %s must be a positive integer\n", name);
        return -1;
    }
    return n;
}

/* Under systemd (Type=notify, NOTIFY_SOCKET set) the unit is "started" only once the
 * store is loaded and the port listens, and "stopping" from the first SIGTERM; anywhere
 * else sd_notify does nothing. */
static void notify(const char *state)
{
    (void)sd_notify(0, state);
}

/*
 * SIGHUP: the log file opened anew (a rotation lets go of the old one), the config file
 * and environment read again, and what can change while serving changes (log-level,
 * log-file, cors-origins, web-root, public-url); any other option that changed is named
 * in a warning and waits for a restart. A reload that does not check out changes
 * nothing. The server never stops for it.
 */
static void reload(tly_conf_t *conf, tly_app_t *app, int argc, char **argv)
{
    char err[512];
    tly_conf_t fresh;
    notify("RELOADING=1");
    if (tly_conf_load(&fresh, "serve", argc, argv, err, sizeof(err)) != 0 || tly_app_check_conf(&fresh, err) != 0) {
        tly_log(TLY_LOG_ERROR, "reload refused; nothing changed", "reason", err, NULL);
        tly_conf_free(&fresh);
        notify("READY=1");
        return;
    }
    if (fresh.log_file[0] != '\0') {
        int rc = tly_log_open(fresh.log_file);
        if (rc != 0) {
            tly_log(TLY_LOG_ERROR, "reload refused; nothing changed", "reason", "cannot open --log-file", "path",
                    fresh.log_file, "error", strerror(-rc), NULL);
            tly_conf_free(&fresh);
            notify("READY=1");
            return;
        }
    }
    char changed[512], restart[512];
    tly_conf_reload(conf, &fresh, "serve", changed, restart, sizeof(changed));
    tly_conf_free(&fresh);
    tly_log_set_level(conf->log_level);
    tly_app_reloaded(app);
    tly_log(TLY_LOG_INFO, "reloaded", "changed", changed, NULL);
    if (restart[0] != '\0')
        tly_log(TLY_LOG_WARN, "options changed that take effect at the next start", "options", restart, NULL);
    notify("READY=1");
}

static int cmd_serve(tly_conf_t *conf, int argc, char **argv)
{
    char err[512];
    /* a HUP from now on reloads (the default action would end the process) */
    struct sigaction hup = {.sa_handler = on_signal};
    sigemptyset(&hup.sa_mask);
    sigaction(SIGHUP, &hup, NULL);
    /* every argument checked before anything is created on disk */
    if (tly_app_check_conf(conf, err) != 0) {
        fprintf(stderr, "tally serve: %s\n", err);
        return 2;
    }
    long fault_fsync = fault_env("TALLY_FAULT_FSYNC_AFTER"), fault_alloc = fault_env("TALLY_FAULT_ALLOC_EVERY");
    if (fault_fsync < 0 || fault_alloc < 0)
        return 2;
    if (conf->log_file[0] != '\0') {
        int rc = tly_log_open(conf->log_file);
        if (rc != 0) {
            fprintf(stderr, "tally serve: cannot open --log-file %s: %s\n", conf->log_file, strerror(-rc));
            return 2;
        }
    }
    tly_log_set_level(conf->log_level);
    tly_metrics_process_start();
    if (fault_fsync > 0) {
        char n[24];
        snprintf(n, sizeof(n), "%ld", fault_fsync);
        tly_log(TLY_LOG_WARN, "fault injection: a failing fsync", "fsync_after", n, NULL);
        if (tly_store_fault_fsync(fault_fsync) != 0) {
            tly_log(TLY_LOG_ERROR, "cannot start", "reason", "cannot install the fault-injection VFS", NULL);
            return 1;
        }
    }
    /* Each connection is a descriptor: the soft limit up to the hard one before anything
     * opens (tly_server_new lowers --max-connections to what it leaves room for). */
    uint64_t fd_before, fd_after;
    int fd_rc = tly_fd_limit_raise(&fd_before, &fd_after);
    if (fd_rc != 0) {
        tly_log(TLY_LOG_WARN, "cannot raise the open-file limit", "reason", strerror(-fd_rc), NULL);
    } else if (fd_after != fd_before) {
        char from[24], to[24];
        snprintf(from, sizeof(from), "%llu", (unsigned long long)fd_before);
        snprintf(to, sizeof(to), "%llu", (unsigned long long)fd_after);
        tly_log(TLY_LOG_INFO, "open-file limit raised to the hard limit", "from", from, "to",
                fd_after ? to : "unlimited", NULL);
    }
    char *secret = secret_of(conf, err);
    if (secret == NULL) {
        tly_log(TLY_LOG_ERROR, "cannot start", "reason", err, NULL);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    tly_loop_t *loop = tly_loop_new();
    tly_app_t *app = loop ? tly_app_new(conf, loop, secret, err) : NULL;
    tly_free(secret); /* the app keeps its own copy */
    if (app == NULL) {
        tly_log(TLY_LOG_ERROR, "cannot start", "reason", loop ? err : "out of memory", NULL);
        tly_loop_free(loop);
        return 1;
    }
    char port[16];
    snprintf(port, sizeof(port), "%d", tly_app_port(app));
    tly_log(TLY_LOG_INFO, "listening", "listen", conf->listen, "port", port, "data_dir", conf->data_dir, "version",
            tly_version, NULL);
    if (tly_app_metrics_port(app) != 0) {
        snprintf(port, sizeof(port), "%d", tly_app_metrics_port(app));
        tly_log(TLY_LOG_INFO, "serving /metrics", "listen", conf->metrics_listen, "port", port, NULL);
    }
    notify("READY=1");
    if (fault_alloc > 0) {
        char n[24];
        snprintf(n, sizeof(n), "%ld", fault_alloc);
        tly_log(TLY_LOG_WARN, "fault injection: failing allocations", "every", n, NULL);
        tly_alloc_fail_every(fault_alloc);
    }
    while (!stop_requested) {
        tly_loop_run_once(loop, 200);
        if (reload_requested) {
            reload_requested = 0;
            reload(conf, app, argc, argv);
        }
    }
    notify("STOPPING=1");
    /* Graceful stop: no new connections; answer what is in flight (each waits for its
     * batch to commit); then close the store, which commits whatever is still queued. */
    tly_log(TLY_LOG_INFO, "stopping", NULL);
    tly_app_stop_accepting(app);
    uint64_t deadline = tly_loop_now(loop) + 10000;
    while (tly_app_busy(app) && tly_loop_now(loop) < deadline)
        tly_loop_run_once(loop, 50);
    /* let the last responses reach their sockets */
    for (int i = 0; i < 5; i++)
        tly_loop_run_once(loop, 10);
    tly_app_free(app);
    tly_loop_free(loop);
    tly_log(TLY_LOG_INFO, "stopped", NULL);
    return 0;
}

/* ---- tally reconcile ---- */

int main(int argc, char **argv)
{
    /* every allocation, jansson's too, goes through the wrapper tests can fail */
    json_set_alloc_funcs(tly_malloc, tly_free);
    if (sodium_init() < 0) {
        fprintf(stderr, "tally: libsodium failed to initialise\n");
        return 1;
    }
    /* before any thread: webhook deliveries (src/http/client.c) */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "tally: libcurl failed to initialise\n");
        return 1;
    }
    if (argc >= 2 && (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version"))) {
        printf("tally %s (commit %s)\n", tly_version, tly_build_commit);
        return 0;
    }
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *command = argv[1];
    if (strcmp(command, "serve") != 0 && strcmp(command, "token") != 0 && strcmp(command, "reconcile") != 0) {
        fprintf(stderr, "tally: unknown command \"%s\"\n\n", command);
        usage(stderr);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
    }
    tly_conf_t conf;
    char err[512];
    if (tly_conf_load(&conf, command, argc - 2, argv + 2, err, sizeof(err)) != 0) {
        fprintf(stderr, "tally %s: %s\n", command, err);
        tly_conf_free(&conf);
        return 2;
    }
    int rc = strcmp(command, "serve") == 0   ? cmd_serve(&conf, argc - 2, argv + 2)
             : strcmp(command, "token") == 0 ? cmd_token(&conf)
                                             : tly_reconcile_cli(&conf);
    tly_conf_free(&conf);
    curl_global_cleanup();
    return rc;
}
