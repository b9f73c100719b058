/*
 * conf.c: the option table and its three sources.
 */
#include "conf/conf.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"

typedef enum { OPT_STR, OPT_LONG, OPT_BOOL } opt_type_t;

typedef struct {
    const char *name;
    opt_type_t type;
    size_t offset;
    const char *def;
    long min, max;
    const char *commands; /* space-separated commands the option applies to */
    const char *help;
} option_t;

#define OFF(f) offsetof(tly_conf_t, f)

static const option_t options[] = {
    {"config", OPT_STR, OFF(config), "", 0, 0, "serve token reconcile", "config file of `name = value` lines"},
    {"listen", OPT_STR, OFF(listen), "127.0.0.1:8080", 0, 0, "serve", "address to serve HTTP on (host:port)"},
    {"data-dir", OPT_STR, OFF(data_dir), "./data", 0, 0, "serve token", "directory of the store and the secret"},
    {"secret", OPT_STR, OFF(secret), "", 0, 0, "serve token",
     "token signing secret (default: generated once into DATA_DIR/secret)"},
    {"store", OPT_STR, OFF(store), "", 0, 0, "serve reconcile",
     "where the ballots live: empty for SQLite in DATA_DIR, or a PostgreSQL URI (postgres://...) that "
     "many instances may share"},
    {"bus", OPT_STR, OFF(bus), "", 0, 0, "serve reconcile",
     "empty for one instance, or a Redis URI (redis://host:port[/db]) joining the instances of a --store "
     "for live fan-out, shared limits, dedup and the async ingest log"},
    {"instance-id", OPT_STR, OFF(instance_id), "", 0, 0, "serve",
     "this instance's name among those sharing a store (default: host name and port)"},
    {"web-root", OPT_STR, OFF(web_root), "", 0, 0, "serve",
     "directory of the web UI served at / instead of the copy compiled into the binary (empty: that copy)"},
    {"public-url", OPT_STR, OFF(public_url), "", 0, 0, "serve", "base URL used in share links (default: from Host)"},
    {"log-level", OPT_STR, OFF(log_level), "info", 0, 0, "serve reconcile", "debug, info, warn or error"},
    {"log-file", OPT_STR, OFF(log_file), "", 0, 0, "serve",
     "append the log to this file instead of stderr; SIGHUP opens it anew (after a rotation)"},
    {"metrics-listen", OPT_STR, OFF(metrics_listen), "", 0, 0, "serve",
     "serve GET /metrics on this address (host:port) instead of the API's, e.g. one only the monitoring "
     "network reaches; empty: on the API's address"},
    {"body-limit", OPT_LONG, OFF(body_limit), "65536", 1024, 64L << 20, "serve", "largest request body, bytes (413)"},
    {"head-limit", OPT_LONG, OFF(head_limit), "8192", 1024, 1L << 20, "serve",
     "largest request line + headers, bytes (431)"},
    {"uri-limit", OPT_LONG, OFF(uri_limit), "2048", 64, 1L << 20, "serve", "longest request target, bytes (414)"},
    {"header-timeout", OPT_LONG, OFF(header_timeout), "10", 1, 3600, "serve",
     "seconds a request head may take to arrive"},
    {"idle-timeout", OPT_LONG, OFF(idle_timeout), "60", 1, 86400, "serve",
     "seconds an idle keep-alive connection stays"},
    {"max-connections", OPT_LONG, OFF(max_connections), "19000", 1, 10000000, "serve",
     "open connections at most; lowered, with a warning, to what the open-file limit leaves room for"},
    {"max-connections-per-ip", OPT_LONG, OFF(max_connections_per_ip), "4096", 0, 10000000, "serve",
     "open connections at most from one address (IPv6: one /64); 0: no limit"},
    {"trusted-proxies", OPT_STR, OFF(trusted_proxies), "", 0, 0, "serve",
     "reverse proxies (addresses or CIDRs, comma-separated) whose X-Forwarded-For names the client "
     "for per-address limits, voter_check \"ip\" and logs; empty: the TCP peer is the client"},
    {"cors-origins", OPT_STR, OFF(cors_origins), "", 0, 0, "serve",
     "origins (scheme://host[:port], comma-separated, or *) whose pages may call the API from a browser (CORS); "
     "empty: none. Tokens are bearer headers, never cookies, so a grant cannot be used for request forgery"},
    {"webhook-allow", OPT_STR, OFF(webhook_allow), "", 0, 0, "serve",
     "address ranges (addresses or CIDRs, comma-separated) webhooks may be delivered to besides public addresses; "
     "empty: loopback, private, link-local and other non-public destinations are refused"},
    {"webhook-attempts", OPT_LONG, OFF(webhook_attempts), "8", 1, 100, "serve",
     "attempts at a webhook delivery before it goes to the webhook's dead-letter list"},
    {"webhook-backoff-ms", OPT_LONG, OFF(webhook_backoff_ms), "1000", 10, 3600000, "serve",
     "milliseconds before the first retry of a webhook delivery; each further retry waits twice as long (at most "
     "an hour)"},
    {"token-ttl", OPT_LONG, OFF(token_ttl), "2592000", 60, 31622400, "serve", "lifetime of issued tokens, seconds"},
    {"retracted-key-ttl", OPT_LONG, OFF(retracted_key_ttl), "86400", 1, 31622400, "serve",
     "seconds the Idempotency-Key of a retracted ballot is remembered: until then a retry of the POST that cast it "
     "gets 409 VOTE_RETRACTED, afterwards it casts a new ballot"},
    {"skip-bad-rows", OPT_BOOL, OFF(skip_bad_rows), "false", 0, 0, "serve",
     "start even if rows of the store do not load (do not decode, or do not fit their poll): each is left out "
     "and logged with its table and key, and stays in the store (without it such a row refuses the start)"},
    {"skip-quick-check", OPT_BOOL, OFF(skip_quick_check), "false", 0, 0, "serve",
     "do not run SQLite's PRAGMA quick_check over the data directory's database at start (it reads the whole "
     "file beside the load; a damaged file refuses the start)"},
    {"batch-max", OPT_LONG, OFF(batch_max), "4096", 1, 1000000, "serve", "most writes in one store transaction"},
    {"live-tick", OPT_LONG, OFF(live_tick), "250", 10, 10000, "serve",
     "milliseconds between live results pushes (coalescing tick)"},
    {"live-max", OPT_LONG, OFF(live_max), "19000", 1, 10000000, "serve", "live subscribers at most, in total"},
    {"live-max-per-ip", OPT_LONG, OFF(live_max_per_ip), "2000", 1, 10000000, "serve",
     "live subscribers at most from one IP address"},
    {"rate-limits", OPT_BOOL, OFF(rate_limits), "true", 0, 0, "serve",
     "rate limits on (true) or off (false, for benchmarks and tests about something else)"},
    {"rate-vote-ip", OPT_LONG, OFF(rate_vote_ip), "600", 1, 1000000, "serve",
     "ballots, changes and retractions per minute per IP address from anonymous device tokens, all devices "
     "together (each device is also held to --rate-vote-voter)"},
    {"rate-vote-voter", OPT_LONG, OFF(rate_vote_voter), "60", 1, 1000000, "serve",
     "ballots, changes and retractions per minute per voter (an account or an anonymous device token)"},
    {"rate-poll-user", OPT_LONG, OFF(rate_poll_user), "60", 1, 1000000, "serve",
     "polls created per hour per account (or anonymous device token)"},
    {"rate-auth-ip", OPT_LONG, OFF(rate_auth_ip), "20", 1, 1000000, "serve",
     "register and login requests per minute per IP address"},
    {"rate-anon-ip", OPT_LONG, OFF(rate_anon_ip), "600", 1, 1000000, "serve",
     "anonymous device tokens per minute per IP address (their proof of work is what they cost; this is a "
     "backstop)"},
    {"rate-join-ip", OPT_LONG, OFF(rate_join_ip), "600", 1, 1000000, "serve",
     "join-code lookups (GET /j/CODE, GET /v1/join/CODE) per minute per IP address: a room types its code "
     "once a phone; guessing codes takes many"},
    {"rate-keys", OPT_LONG, OFF(rate_keys), "1000000", 1000, 100000000, "serve",
     "rate-limit buckets kept at most (about 80 bytes each)"},
    {"pow-difficulty", OPT_LONG, OFF(pow_difficulty), "14", 0, 32, "serve",
     "leading zero bits of SHA-256 an anonymous token's proof of work needs while its address is quiet "
     "(0: no proof)"},
    {"pow-max-difficulty", OPT_LONG, OFF(pow_max_difficulty), "22", 0, 40, "serve",
     "the most the proof of work rises to for an address that asks for many new anonymous tokens (one bit "
     "each time its backlog grows by a factor of 1.41 beyond --pow-burst); --pow-difficulty or less keeps it "
     "fixed"},
    {"pow-burst", OPT_LONG, OFF(pow_burst), "256", 1, 100000, "serve",
     "an address's backlog of new anonymous tokens (challenges) that costs only --pow-difficulty"},
    {"pow-rate", OPT_LONG, OFF(pow_rate), "60", 1, 1000000, "serve",
     "new anonymous tokens per minute by which an address's backlog falls back"},
    {"reconcile-interval", OPT_LONG, OFF(reconcile_interval), "300", 0, 86400, "serve",
     "seconds between reconciliations of the shared store's counter rows and Redis's live counters "
     "with the ballots (0: never); only with --store postgres://..."},
    {"repair", OPT_BOOL, OFF(repair), "false", 0, 0, "reconcile",
     "put the drifted counters right (without it, only report them)"},
    {"sub", OPT_STR, OFF(sub), "", 0, 0, "token", "subject (voter id) of the token"},
    {"ttl", OPT_LONG, OFF(ttl), "86400", 1, 31622400, "token", "lifetime of the token, seconds"},
    {"anonymous", OPT_BOOL, OFF(anonymous), "false", 0, 0, "token", "mint an anonymous device token"},
};

static bool applies(const option_t *o, const char *command)
{
    size_t n = strlen(command);
    for (const char *p = o->commands; (p = strstr(p, command)) != NULL; p += n)
        if ((p == o->commands || p[-1] == ' ') && (p[n] == '\0' || p[n] == ' '))
            return true;
    return false;
}

static const option_t *find(const char *name, size_t len)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++)
        if (strlen(options[i].name) == len && memcmp(options[i].name, name, len) == 0)
            return &options[i];
    return NULL;
}

static int set(tly_conf_t *c, const option_t *o, const char *value, const char *source, char *err, size_t errlen)
{
    void *field = (char *)c + o->offset;
    switch (o->type) {
    case OPT_STR: {
        char *v = tly_strdup(value);
        if (v == NULL) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        tly_free(*(char **)field);
        *(char **)field = v;
        return 0;
    }
    case OPT_LONG: {
        char *end;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (errno || end == value || *end != '\0' || v < o->min || v > o->max) {
            snprintf(err, errlen, "%s: %s must be a whole number from %ld to %ld, got \"%s\"", source, o->name, o->min,
                     o->max, value);
            return -1;
        }
        *(long *)field = v;
        return 0;
    }
    case OPT_BOOL:
        if (!strcmp(value, "true") || !strcmp(value, "1") || !strcmp(value, "on") || !strcmp(value, "yes")) {
            *(bool *)field = true;
        } else if (!strcmp(value, "false") || !strcmp(value, "0") || !strcmp(value, "off") || !strcmp(value, "no")) {
            *(bool *)field = false;
        } else {
            snprintf(err, errlen, "%s: %s must be true or false, got \"%s\"", source, o->name, value);
            return -1;
        }
        return 0;
    }
    return -1;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static int load_file(tly_conf_t *c, const char *command, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "cannot open config file %s: %s", path, strerror(errno));
        return -1;
    }
    char line[4096];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            snprintf(err, errlen, "%s:%d: expected name = value", path, lineno);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *name = trim(s), *value = trim(eq + 1);
        const option_t *o = find(name, strlen(name));
        if (o == NULL || !strcmp(o->name, "config")) {
            snprintf(err, errlen, "%s:%d: unknown option \"%s\"", path, lineno, name);
            rc = -1;
            break;
        }
        if (!applies(o, command))
            continue;
        char source[300];
        snprintf(source, sizeof(source), "%.256s:%d", path, lineno);
        if ((rc = set(c, o, value, source, err, errlen)) != 0)
            break;
    }
    fclose(f);
    return rc;
}

static void env_name(const option_t *o, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "TALLY_%s", o->name);
    for (size_t i = 6; i < n && i < cap; i++)
        buf[i] = buf[i] == '-' ? '_' : (char)toupper((unsigned char)buf[i]);
}

int tly_conf_load(tly_conf_t *c, const char *command, int argc, char **argv, char *err, size_t errlen)
{
    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++)
        if (set(c, &options[i], options[i].def, "default", err, errlen) != 0)
            return -1;
    /* the config file may itself come from a flag or the environment */
    const char *config = getenv("TALLY_CONFIG");
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            config = argv[i + 1];
        else if (!strncmp(argv[i], "--config=", 9))
            config = argv[i] + 9;
    }
    if (config != NULL && *config != '\0') {
        if (set(c, find("config", 6), config, "config", err, errlen) != 0 ||
            load_file(c, command, config, err, errlen) != 0)
            return -1;
    }
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++) {
        char name[64];
        env_name(&options[i], name, sizeof(name));
        const char *v = getenv(name);
        if (v != NULL && applies(&options[i], command) && set(c, &options[i], v, name, err, errlen) != 0)
            return -1;
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument \"%s\" (see tally %s --help)", a, command);
            return -1;
        }
        a += 2;
        const char *eq = strchr(a, '=');
        size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
        const option_t *o = find(a, nlen);
        if (o == NULL || !applies(o, command)) {
            snprintf(err, errlen, "unknown option --%.*s for \"tally %s\" (see tally %s --help)", (int)nlen, a, command,
                     command);
            return -1;
        }
        const char *value;
        if (eq != NULL) {
            value = eq + 1;
        } else if (o->type == OPT_BOOL) {
            /* "--rate-limits off" as well as "--anonymous" */
            static const char *const words[] = {"true", "false", "on", "off", "yes", "no", "1", "0"};
            value = "true";
            for (size_t w = 0; i + 1 < argc && w < TLY_ARRAY_SIZE(words); w++)
                if (strcmp(argv[i + 1], words[w]) == 0) {
                    value = argv[++i];
                    break;
                }
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            snprintf(err, errlen, "option --%s needs a value", o->name);
            return -1;
        }
        char source[80];
        snprintf(source, sizeof(source), "--%s", o->name);
        if (set(c, o, value, source, err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* What SIGHUP changes in a running server (main.c applies each). */
static const char *const reloadable[] = {"log-level", "log-file", "cors-origins", "web-root", "public-url"};

static bool is_reloadable(const char *name)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(reloadable); i++)
        if (strcmp(reloadable[i], name) == 0)
            return true;
    return false;
}

static void list_add(char *list, size_t cap, const char *name)
{
    size_t n = strlen(list);
    snprintf(list + n, cap - n, "%s%s", n ? "," : "", name);
}

void tly_conf_reload(tly_conf_t *live, tly_conf_t *fresh, const char *command, char *changed, char *restart,
                     size_t cap)
{
    changed[0] = restart[0] = '\0';
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++) {
        const option_t *o = &options[i];
        if (!applies(o, command) || !strcmp(o->name, "config"))
            continue;
        void *a = (char *)live + o->offset, *b = (char *)fresh + o->offset;
        bool same = o->type == OPT_STR    ? strcmp(*(char **)a, *(char **)b) == 0
                    : o->type == OPT_LONG ? *(long *)a == *(long *)b
                                          : *(bool *)a == *(bool *)b;
        if (same)
            continue;
        if (!is_reloadable(o->name)) {
            list_add(restart, cap, o->name);
            continue;
        }
        list_add(changed, cap, o->name);
        char *old = *(char **)a; /* every reloadable option is a string */
        *(char **)a = *(char **)b;
        *(char **)b = old;
    }
}

void tly_conf_free(tly_conf_t *c)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++) {
        if (options[i].type == OPT_STR) {
            char **field = (char **)((char *)c + options[i].offset);
            tly_free(*field);
            *field = NULL;
        }
    }
}

void tly_conf_help(FILE *out, const char *command)
{
    for (size_t i = 0; i < TLY_ARRAY_SIZE(options); i++) {
        const option_t *o = &options[i];
        if (!applies(o, command))
            continue;
        char env[64], flag[64];
        env_name(o, env, sizeof(env));
        snprintf(flag, sizeof(flag), "--%s%s", o->name, o->type == OPT_BOOL ? "" : " VALUE");
        fprintf(out, "  %-26s %s\n  %-26s   env %s, default \"%s\"\n", flag, o->help, "", env, o->def);
    }
}
