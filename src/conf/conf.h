/*
 * conf: tally's configuration from one table of options. Each option can be set in a
 * config file (`name = value` lines, --config / TALLY_CONFIG), in the environment
 * (TALLY_<NAME> with dashes as underscores) or as a flag (--name value or --name=value);
 * flags override the environment, which overrides the file, which overrides defaults.
 *
 * Threads: load once at start on the main thread; read-only afterwards.
 */
#ifndef TALLY_CONF_H
#define TALLY_CONF_H

#include <stdbool.h>
#include <stdio.h>

typedef struct {
    char *config;
    char *listen;
    char *data_dir;
    char *store;       /* "" = SQLite in data_dir, or postgres://... */
    char *bus;         /* "" = none, or redis://... */
    char *instance_id; /* "" = host name and port */
    char *secret;
    char *web_root;
    char *log_level;
    char *public_url;
    char *trusted_proxies; /* "" = none: X-Forwarded-For is ignored */
    char *cors_origins;    /* "" = none, "*" = any, or a list of origins */
    char *log_file;        /* "" = stderr */
    char *metrics_listen;  /* "" = /metrics on the API's address */
    char *webhook_allow;   /* "" = webhooks reach public addresses only */
    long webhook_attempts;
    long webhook_backoff_ms;
    long body_limit;
    long head_limit;
    long uri_limit;
    long header_timeout;
    long idle_timeout;
    long max_connections;
    long max_connections_per_ip;
    long token_ttl;
    long retracted_key_ttl; /* seconds */
    long batch_max;
    bool skip_bad_rows;    /* start without the rows load refuses, logging each */
    bool skip_quick_check; /* no PRAGMA quick_check at start (SQLite) */
    long live_tick;
    long live_max;
    long live_max_per_ip;
    bool rate_limits;
    long rate_vote_ip;
    long rate_vote_voter;
    long rate_poll_user;
    long rate_auth_ip;
    long rate_anon_ip;
    long rate_join_ip;
    long rate_keys;
    long pow_difficulty;     /* leading zero bits while an address is quiet; 0 = no proof */
    long pow_max_difficulty; /* the most it rises to with the address's new tokens */
    long pow_burst;          /* an address's backlog of new tokens at the base difficulty */
    long pow_rate;           /* new tokens a minute the backlog drains by */
    long reconcile_interval; /* seconds; 0 = off */
    /* `tally reconcile` */
    bool repair;
    /* `tally token` */
    char *sub;
    long ttl;
    bool anonymous;
} tly_conf_t;

/* Fills c from defaults, the config file, the environment and argv (the arguments after
 * the subcommand). Returns 0, or -1 with a message in err (errlen bytes). Strings in c
 * are allocated and live for the process. */
int tly_conf_load(tly_conf_t *c, const char *command, int argc, char **argv, char *err, size_t errlen);
/* SIGHUP: takes into live the values of the options that can change while the server
 * runs (log-level, log-file, cors-origins, web-root, public-url) from fresh (a new
 * tly_conf_load; its strings move, so free fresh afterwards as usual), and writes the
 * names of those that changed into `changed` and of the other options whose value
 * differs, which need a restart, into `restart` (comma-separated, "" for none; cap
 * bytes each). The caller checks fresh's values first. */
void tly_conf_reload(tly_conf_t *live, tly_conf_t *fresh, const char *command, char *changed, char *restart,
                     size_t cap);
/* Frees the strings tly_conf_load allocated. */
void tly_conf_free(tly_conf_t *c);
/* Prints the options of `command` ("serve", "token" or "reconcile") with defaults and help. */
void tly_conf_help(FILE *out, const char *command);

#endif
