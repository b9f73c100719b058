/*
 * Private to src/api: the application state shared by the resource files, and the
 * helpers they use to read requests and write responses.
 */
#ifndef TALLY_API_INT_H
#define TALLY_API_INT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <uthash.h>

#include "api/api.h"
#include "auth/auth.h"
#include "core/core.h"
#include "limit/limit.h"
#include "store/store.h"
#include "bus/bus.h"

/* ---- users (registered accounts) ---- */
typedef struct user {
    UT_hash_handle hh_id;   /* app->users_by_id */
    UT_hash_handle hh_name; /* app->users_by_name, keyed by the lower-cased username */
    char *user_id;
    char *username;
    char *name_key; /* lower-cased username */
    char *password_hash;
    bool committed; /* false while the insert is in the writer */
} user_t;

typedef struct deferred deferred_t;       /* follow.c */
typedef struct count_moves count_moves_t; /* follow.c: live counter moves not yet sent */
typedef struct waiter waiter_t;           /* votes.c: a request waiting for its ballot's batch */
typedef struct final_wait final_wait_t;   /* polls.c: a read waiting for a poll's final results */
/* results.c: a read waiting for a count of a big ranked poll on a worker */
typedef struct results_wait results_wait_t;
/* The outcome of a ballot cast from the ingest log: 0 (vote_id set) or a TLY_E* code. */
typedef void (*api_cast_done_fn)(void *arg, int result, const char *vote_id);

/* ---- async vote requests (Prefer: respond-async) ---- */
typedef struct vote_request {
    UT_hash_handle hh;      /* app->requests, by request_id */
    UT_hash_handle hh_vote; /* app->requests_by_vote, by vote_id: completed ones only */
    char request_id[24];
    char poll_id[TLY_POLL_ID_LEN + 1];
    char *voter_id;
    char state[12];
    char vote_id[TLY_VOTE_ID_LEN + 1];
    char error[32];
} vote_request_t;

/* ---- Idempotency-Key of poll creation: (owner, key) -> poll ---- */
typedef struct poll_idem {
    UT_hash_handle hh;
    char *key; /* owner "\n" Idempotency-Key */
    char poll_id[TLY_POLL_ID_LEN + 1];
    uint8_t body_hash[16];
    bool committed;
} poll_idem_t;

/* ---- Idempotency-Keys of retracted ballots: "poll\nvoter\nkey" -> body hash, so that a
 * late retry of the POST that cast a retracted ballot does not cast it again, for
 * conf->retracted_key_ttl seconds after the retraction. In retraction order (uthash
 * keeps insertion order), so the expired ones are always first. ---- */
typedef struct retracted_key {
    UT_hash_handle hh;
    char *key;
    uint8_t body_hash[16];
    int64_t at; /* the retraction's time */
} retracted_key_t;

/* ---- proof-of-work challenges already answered, until they expire (auth.c) ---- */
typedef struct pow_used {
    UT_hash_handle hh;
    char nonce_id[24];     /* the challenge's random part */
    int64_t expires;       /* seconds */
    struct pow_used *next; /* expiry order (all live equally long) */
} pow_used_t;

/* ---- device links (link.c): an anonymous device linked to an account, by device ---- */
typedef struct device_link {
    UT_hash_handle hh; /* app->links, by device_id */
    char *device_id;
    char *user_id;
} device_link_t;
typedef struct linking linking_t; /* link.c: a link under way */

/* ---- polls being deleted: votes and changes are refused until the delete commits ---- */
typedef struct poll_mark {
    UT_hash_handle hh;
    char poll_id[TLY_POLL_ID_LEN + 1];
} poll_mark_t;

/* ---- CORS: the origins granted (--cors-origins) ---- */
#define API_CORS_MAX 32
typedef struct {
    bool any; /* "*" */
    size_t n;
    char origins[API_CORS_MAX][256];
} api_cors_t;

/* ---- background work (password hashing) ---- */
typedef struct work work_t;
struct work {
    void (*run)(work_t *w);  /* on a worker thread */
    void (*done)(work_t *w); /* on the loop thread */
    work_t *next;
};

typedef enum {
    API_LIMIT_AUTH,
    API_LIMIT_ANON,
    API_LIMIT_POLL,
    API_LIMIT_VOTE_IP,
    API_LIMIT_VOTER,
    API_LIMIT_JOIN, /* join-code lookups per address (polls.c) */
    API_LIMIT_POW,  /* an address's backlog of new device tokens: the proof of work's level */
    API_LIMIT_N
} api_limit_t;

struct tly_app {
    const tly_conf_t *conf;
    tly_loop_t *loop;
    api_cors_t cors; /* --cors-origins */
    struct api_webhooks *webhooks; /* webhooks.c */
    tly_proxies_t webhook_allow;   /* --webhook-allow: ranges webhooks may reach beyond public addresses */
    tly_server_t *server;
    tly_server_t *metrics_server; /* --metrics-listen; NULL: /metrics is a route of server */
    tly_router_t *router;
    tly_store_t *store;
    tly_waker_t *store_waker;
    char instance_id[64]; /* --instance-id, or host name:port */
    tly_registry_t *registry;
    uint8_t *secret;
    size_t secret_len;
    tly_jwt_verifier_t *jwt; /* the secret prepared for bearer tokens (loop thread) */
    user_t *users_by_id, *users_by_name;
    vote_request_t *requests, *requests_by_vote;
    poll_idem_t *poll_idem;
    poll_mark_t *deleting;
    retracted_key_t *retracted;
    device_link_t *links; /* link.c: every device linked to an account */
    linking_t *linking;   /* link.c: links under way on this instance (a handful) */
    pow_used_t *pow_used, *pow_head, *pow_tail;
    size_t pow_count;
    tly_limiter_t *limiter; /* NULL with --rate-limits off */
    tly_limit_rule_t rules[API_LIMIT_N];
    tly_timer_t limit_sweep;
    struct ballot_op *pending_ballots; /* votes.c: ballots in the writer, by vote */
    /* follow.c: a shared store's changes from other instances */
    deferred_t *deferred;           /* waiting for a write of ours on the same key */
    tly_req_t *redispatch;          /* the request running a second time after a sync */
    tly_req_t *limit_passed;        /* the request running again after its rate limit passed */
    tly_req_t *ingest_bypass;       /* ingest.c: the async vote running again, the log refused it */
    bool closing;                   /* tly_app_free has begun */
    tly_bus_script_t *limit_script; /* limits.c: shared buckets in Redis (with a bus) */
    uint64_t followed, resyncs;
    unsigned settling;               /* polls.c: closed polls waiting for a sync to be frozen */
    final_wait_t *final_waits;       /* polls.c: reads waiting for a settle to end */
    results_wait_t *results_waits;   /* results.c: reads waiting for a count on a worker */
    tly_bus_t *bus;                  /* --bus: Redis, joining the instances; NULL without */
    struct ingest *ingest;           /* ingest.c: the async ingest log; NULL without a bus */
    tly_bus_script_t *counts_script; /* follow.c: live counters in Redis */
    count_moves_t *count_moves;      /* their moves since the last reap, by poll */
    uint64_t announced;              /* store batches committed when we last told the bus */
    struct live *live;
    tly_store_reader_t *reader;      /* loop thread's, opened on first use */
    struct api_reconcile *reconcile; /* reconcile.c: the periodic job; NULL when off */
    size_t in_flight;                /* requests waiting for the store or a worker */
    /* worker threads for slow work */
    struct {
        pthread_t threads[2];
        pthread_mutex_t mu;
        pthread_cond_t cond;
        work_t *head, *tail;
        work_t *done_head, *done_tail;
        bool stop;
        tly_waker_t *waker;
    } work;
};

/* The caller identified by the request's bearer token. */
typedef struct {
    bool present;   /* a valid token was given */
    const char *id; /* its subject (voter id / user id), request memory; for a device
                       token linked to an account, the account's id */
    bool anonymous; /* an anonymous device token not linked to an account */
    /* A device token linked to an account: its own subject (the device id), request
     * memory; NULL otherwise. */
    const char *device;
} caller_t;

/* The route being served, for logs */
typedef struct {
    tly_app_t *app;
    const char *route;
} route_ctx_t;

/* ---- responses (http helpers in app.c) ---- */
void api_respond_json(tly_req_t *req, int status, json_t *body); /* steals body */
void api_respond_raw_json(tly_req_t *req, int status, const char *json, size_t len);
/* {"error":{"code","message", ...extra}}; extra is stolen and may be NULL */
void api_respond_error(tly_req_t *req, int status, const char *code, const char *message, json_t *extra);
void api_respond_validation(tly_req_t *req, const char *field, const char *message);
void api_respond_store_error(tly_req_t *req, int result);

/* ---- HTTP caching (caching.c) ---- */
typedef enum {
    API_CACHE_PRIVATE, /* depends on who asks: "private, no-cache" */
    API_CACHE_PUBLIC,  /* the same for everyone, changing: "public, max-age=1" */
    API_CACHE_FINAL    /* a closed poll's final results: "public, max-age=3600" */
} api_cache_t;
/* Answers 200 with json (copied) and its ETag and Cache-Control, or 304 without a body
 * when If-None-Match names that ETag. Loop thread. */
void api_respond_cached(tly_req_t *req, const char *json, size_t len, api_cache_t policy);
/* The same for a body of another media type. */
void api_respond_cached_as(tly_req_t *req, const char *type, const char *body, size_t len, api_cache_t policy);
/* Who may keep p as a poll object, and its results, at time now (ms). */
api_cache_t api_poll_cache(tly_poll_t *p, int64_t now);
api_cache_t api_results_cache(tly_poll_t *p, int64_t now);

/* ---- embeds (embed.c) ---- */
/* The absolute base URL of this server as others reach it, without a trailing slash:
 * --public-url, else "http://<Host>". */
void api_base_url(tly_app_t *app, tly_req_t *req, char *out, size_t cap);
/* The Open Graph, Twitter card and oEmbed discovery tags for the head of the page of
 * poll_id (request memory, *len bytes), or NULL when no poll anyone may see has that id. */
const char *api_poll_page_head(tly_app_t *app, tly_req_t *req, tly_str_t poll_id, size_t *len);
void api_embed_page(tly_req_t *req, const tly_params_t *params, void *arg);
void api_oembed(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_results_svg(tly_req_t *req, const tly_params_t *params, void *arg);

/* ---- the web app compiled in (build/gen/web_files.c, scripts/embed-web.sh) ---- */
typedef struct {
    const char *path;           /* under web/: "/index.html", "/js/app.js" */
    const unsigned char *data;  /* NUL-terminated */
    size_t len;                 /* without the NUL */
} api_web_file_t;
extern const api_web_file_t api_web_files[];
extern const size_t api_web_nfiles;

/* ---- webhooks (webhooks.c) ---- */
/* Loads DATA_DIR/webhooks.json and starts the deliveries' tick. Returns 0, or -1 with a
 * reason in err (512 bytes). Loop thread, after the store is loaded. */
int api_webhooks_open(tly_app_t *app, char *err);
/* Drops the deliveries in flight or waiting and frees the webhooks (the file stays). */
void api_webhooks_close(tly_app_t *app);
void api_webhooks_create(tly_req_t *req, const tly_params_t *params, void *arg);
void api_webhooks_list(tly_req_t *req, const tly_params_t *params, void *arg);
void api_webhooks_delete(tly_req_t *req, const tly_params_t *params, void *arg);

/* ---- CORS (cors.c) ---- */
/* Parses --cors-origins ("" none, "*" any, or origins separated by commas or spaces)
 * into app->cors. Returns 0, or -1 with a reason in err (errlen bytes). */
int api_cors_parse(const char *spec, api_cors_t *out, char *err, size_t errlen);
/* For a request to the API (/v1/..., /oembed): adds the CORS response headers its
 * Origin is granted, and Vary: Origin when the answer depends on it. A preflight
 * (OPTIONS) is answered here (204) and true returned; false otherwise. */
bool api_cors_handle(tly_app_t *app, tly_req_t *req);

/* ---- requests ---- */
/* Parses the body as a JSON object. On failure answers 400 and returns NULL. */
json_t *api_parse_body(tly_req_t *req, bool allow_empty);
/* Reads the bearer token. Returns false after answering 401 when a token is present but
 * invalid, or when `required` and there is none. */
bool api_caller(tly_app_t *app, tly_req_t *req, bool required, caller_t *out);
/* The same for a token given some other way (EventSource cannot send headers, so live
 * streams also take ?access_token=). */
bool api_caller_token(tly_app_t *app, tly_req_t *req, tly_str_t token, caller_t *out);
/* Validates Idempotency-Key (<= 255 printable ASCII). Returns false after answering 400;
 * *key is NULL when absent. */
bool api_idempotency_key(tly_req_t *req, char **key);
void api_body_hash(tly_req_t *req, uint8_t out[16]);
/* The poll named in the path, hidden (404) when missing, being deleted, or a draft not
 * owned by the caller. Answers 404 and returns NULL then. */
tly_poll_t *api_find_poll(tly_app_t *app, tly_req_t *req, const tly_params_t *params, const caller_t *caller);
bool api_is_owner(const tly_poll_t *p, const caller_t *caller);
/* Counts the request as waiting (for graceful shutdown) until api_end_async. */
void api_begin_async(tly_app_t *app);
void api_end_async(tly_app_t *app);
void api_work_submit(tly_app_t *app, work_t *w);

/* ---- rate limits (limits.c) ---- */
int api_limits_init(tly_app_t *app);
void api_limits_free(tly_app_t *app);
/* Takes one request of class `which` for voter_id (NULL: the peer's address) and adds
 * the RateLimit-* headers. Returns false after answering 429 RATE_LIMITED (or when the
 * shared buckets in Redis will decide: the request then runs again from the top, with
 * its limits passed). A no-op with --rate-limits off. Loop thread. */
bool api_limit(tly_app_t *app, tly_req_t *req, api_limit_t which, const char *voter_id);
/* The same per caller (its account, or its anonymous device token), whose refusal says
 * which; an anonymous caller's ballots (API_LIMIT_VOTER) also take a token from its
 * address's API_LIMIT_VOTE_IP bucket. */
bool api_limit_caller(tly_app_t *app, tly_req_t *req, api_limit_t which, const caller_t *caller);
/* Counts one new device challenge for the address whose key (tly_addr_key) is addr_key
 * and calls done(app, req, difficulty) with the leading zero bits its proof of work
 * must have: --pow-difficulty while the address is quiet, more as its recent challenges
 * pile up (tly_pow_difficulty), at most --pow-max-difficulty. Now, or, with a bus, once
 * Redis answered (the level is shared by the instances); done always runs exactly once
 * and answers req. Independent of --rate-limits. Loop thread. */
typedef void (*api_pow_done_fn)(tly_app_t *app, tly_req_t *req, int difficulty);
void api_pow_difficulty(tly_app_t *app, tly_req_t *req, const char *addr_key, api_pow_done_fn done);

/* ---- persistence glue (persist.c) ---- */
/* A store operation with its own copy of a poll row, freed with poll_op_free. */
typedef struct poll_op {
    tly_store_op_t op;
    tly_app_t *app;
    tly_req_t *req;
    tly_poll_t *poll;
    char *scratch; /* the strings of op.u.poll */
    tly_option_row_t *options;
    struct poll_op *before; /* PATCH: the poll as it was, put back if the store fails */
    char *final;            /* a freeze: the final results it offers (op.u.poll's) */
    int attempts;           /* a freeze: how many came before it in a row; a create: codes taken */
    /* op.u.poll.join_code's ("" = NULL) */
    char join_code[TLY_JOIN_CODE_LEN + 1];
} poll_op_t;
poll_op_t *poll_op_new(tly_app_t *app, tly_op_type_t type, const tly_poll_t *p);
void poll_op_free(poll_op_t *po);
/* Loads the store into memory (conf: --skip-bad-rows, --skip-quick-check). 0, or what
 * tly_store_load returned: TLY_EINVAL (bad rows, each logged), TLY_EIO, TLY_ENOMEM. */
int api_load(tly_app_t *app);
/* Store rows into memory, for load and for other instances' changes (follow.c). Each
 * returns 0, TLY_ENOMEM, or TLY_EINVAL for a row memory cannot hold (a ballot naming an
 * option the poll does not have or of a voter who has one, unreadable settings, a
 * second user with a username); load names such a row and refuses to start
 * (persist.c, tly_store_load). */
int api_user_from_row(tly_app_t *app, const tly_user_row_t *row);
/* A poll built from its row, not in the registry (NULL with *rc set on failure). */
tly_poll_t *api_poll_build(const tly_poll_row_t *row, int *rc);
/* The same, added to the registry with its create Idempotency-Key. */
int api_poll_from_row(tly_app_t *app, const tly_poll_row_t *row);
/* tly_poll_adopt, and p takes from's join code in the registry too. */
void api_poll_adopt(tly_app_t *app, tly_poll_t *p, tly_poll_t *from);
/* A committed ballot of p (counted; its address hash kept). */
int api_ballot_from_row(tly_app_t *app, tly_poll_t *p, const tly_ballot_row_t *row);
/* A vote request's outcome; a request already known keeps its first outcome. */
int api_request_from_row(tly_app_t *app, const tly_request_row_t *row);
/* The async request that cast the ballot vote_id, or NULL (a ballot cast directly). */
vote_request_t *api_request_of_vote(tly_app_t *app, const char *vote_id);
/* Forgets a request (its poll is deleted, or the app goes). */
void api_request_free(tly_app_t *app, vote_request_t *r);

/* ---- routes ---- */
void api_auth_register(tly_req_t *req, const tly_params_t *params, void *arg);
void api_auth_login(tly_req_t *req, const tly_params_t *params, void *arg);
void api_auth_anonymous(tly_req_t *req, const tly_params_t *params, void *arg);
void api_auth_challenge(tly_req_t *req, const tly_params_t *params, void *arg);
void api_pow_free(tly_app_t *app);
void api_auth_me(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_create(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_get(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_patch(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_delete(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_list(tly_req_t *req, const tly_params_t *params, void *arg);
void api_join_get(tly_req_t *req, const tly_params_t *params, void *arg);
void api_join_redirect(tly_req_t *req, const tly_params_t *params, void *arg);
/* static.c: the web UI's index.html with this status (the app's own pages, such as
 * "no poll has this code"). false when it cannot be read (nothing answered). */
bool api_static_index(tly_app_t *app, tly_req_t *req, int status);
/* Whether the directory root has an index.html (a --web-root that would serve the app). */
bool api_web_root_ok(const char *root);
void api_votes_cast(tly_req_t *req, const tly_params_t *params, void *arg);
void api_votes_me(tly_req_t *req, const tly_params_t *params, void *arg);
void api_votes_change(tly_req_t *req, const tly_params_t *params, void *arg);
void api_votes_retract(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_audit(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_export(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_timeline(tly_req_t *req, const tly_params_t *params, void *arg);
void api_polls_qr(tly_req_t *req, const tly_params_t *params, void *arg);
/* Freezes the final results of a poll that has closed (by PATCH or end_time) and
 * stores them, once. Call wherever a closed poll is read. With a shared store this
 * goes on after the call (p->settling): see polls.c. */
void api_poll_settle(tly_app_t *app, tly_poll_t *p, int64_t now);
/* After api_poll_settle: when a settle of p is under way with a shared store, req waits
 * for it to end and is then answered by answer(app, req, poll_id), which finds the poll
 * again (it may be gone); returns true then. false: answer now. */
typedef void (*api_final_answer_fn)(tly_app_t *app, tly_req_t *req, const char *poll_id);
bool api_poll_await_final(tly_app_t *app, tly_poll_t *p, tly_req_t *req, api_final_answer_fn answer);
/* A per-poll pseudonym for a voter: the same voter gets the same one within a poll and
 * unrelated ones across polls; the real id cannot be recovered without the secret. A
 * device linked to an account gets the account's (api_person). */
void api_pseudonym(tly_app_t *app, const char *poll_id, const char *voter_id, char out[24]);
/* The loop thread's store reader for small owner-only pages; NULL when it cannot open. */
tly_store_reader_t *api_reader(tly_app_t *app);
void api_votes_request(tly_req_t *req, const tly_params_t *params, void *arg);
void api_receipts_get(tly_req_t *req, const tly_params_t *params, void *arg);
void api_results_get(tly_req_t *req, const tly_params_t *params, void *arg);
/* The rendering of p's results to offer a live subscriber now, without counting a big
 * ranked poll on the loop: the newest rendering at hand, which may show an older seq
 * (*seq says which) while a count of the current one runs on a worker; NULL when there is
 * none yet, or out of memory (try again later). Loop thread. */
const char *api_results_current(tly_app_t *app, tly_poll_t *p, int64_t now, uint64_t *seq);
void api_ops_healthz(tly_req_t *req, const tly_params_t *params, void *arg);
void api_ops_readyz(tly_req_t *req, const tly_params_t *params, void *arg);
void api_ops_metrics(tly_req_t *req, const tly_params_t *params, void *arg);
void api_static_get(tly_req_t *req, const tly_params_t *params, void *arg);
void api_live_sse(tly_req_t *req, const tly_params_t *params, void *arg);
void api_live_ws(tly_req_t *req, const tly_params_t *params, void *arg);

/* live.c: live results streams */
typedef struct live live_t;
live_t *api_live_new(tly_app_t *app);
/* Ends every stream with a retry hint (graceful shutdown). */
void api_live_shutdown(live_t *l);
void api_live_free(live_t *l);
size_t api_live_subscribers(live_t *l);

/* The answer of register and login: {"user_id","token","expires_at"} for user_id, and
 * "linked" when linked is not NULL (stolen; json null says a link was asked for and not
 * made). auth.c. */
void api_respond_token(tly_app_t *app, tly_req_t *req, int status, const char *user_id, json_t *linked);

/* ---- link.c: one person, one ballot, across sign-up and sign-in ---- */
/* The account device_id is linked to, or NULL. */
const char *api_linked_user(tly_app_t *app, const char *device_id);
/* The person an id is: the account of a linked device, or the id itself. */
const char *api_person(tly_app_t *app, const char *id);
/* A link of the caller's device, or to the caller's account, is under way here: answers
 * 409 LINK_IN_PROGRESS (Retry-After: 1) and returns true. Writes that the link would
 * have to see (ballots, polls) call it first. */
bool api_link_guard(tly_app_t *app, tly_req_t *req, const caller_t *caller);
/* Whether id is the device or the account of a link under way here. */
bool api_link_busy(tly_app_t *app, const char *id);
/* Links device_id (an anonymous device token's subject) to the account user_id and
 * answers req: api_respond_token with `status` and what was merged. `registered`: the
 * account was just created (register), so a link that cannot be made still answers
 * `status` with "linked": null; on login it answers 409 DEVICE_LINKED or the store's
 * error. Loop thread. */
void api_link_device(tly_app_t *app, tly_req_t *req, int status, const char *device_id, const char *user_id,
                     bool registered);
/* A committed link into memory: ours (own: counters in Redis move, summary gets what was
 * merged) or another instance's (follow.c). */
void api_link_apply(tly_app_t *app, const tly_link_row_t *l, bool own, json_t *summary);
/* After the store's done callbacks: links waiting for this instance's writes about their
 * device's or account's ballots go on. */
void api_link_kick(tly_app_t *app);
/* A stored link at load: 0, TLY_EINVAL (*why: no such account) or TLY_ENOMEM. */
int api_link_from_row(tly_app_t *app, const tly_device_link_row_t *row, const char **why);
/* At shutdown, after the store is closed: answers links still waiting and frees every link. */
void api_links_free(tly_app_t *app);
/* votes.c: whether this instance has a ballot write (a cast, change or retraction) of
 * voter_id in the store's queue. */
bool api_votes_pending_for(tly_app_t *app, const char *voter_id);

/* user map helpers (auth.c) */
user_t *api_user_find(tly_app_t *app, const char *user_id);
void api_user_add(tly_app_t *app, user_t *u);
/* By username, case-insensitively; pending registrations included. */
user_t *api_user_find_name(tly_app_t *app, const char *username);

/* follow.c: other instances' changes (a shared store) */
void api_follow_init(tly_app_t *app);  /* after api_load */
void api_follow_flush(tly_app_t *app); /* after our own writes are done */
void api_follow_free(tly_app_t *app);
/* --bus: joins the instances through Redis (0, or -1 with a message in err[512]). */
int api_bus_open(tly_app_t *app, char *err);
/* Moves the poll's live counters in Redis for one committed change of a ballot: its
 * option positions before (none for a cast) and after (none for a retraction). The
 * moves are summed per poll and sent by api_bus_flush_counts (after each reap). */
void api_bus_count(tly_app_t *app, const char *poll_id, const uint8_t *before, size_t nbefore, const uint8_t *after,
                   size_t nafter);
void api_bus_flush_counts(tly_app_t *app);
/* A reply callback for commands whose outcome nobody waits for. */
void api_bus_ignore(void *arg, const tly_bus_reply_t *r);
/* votes.c: 202 accepted with the Location of the request's status. */
void api_respond_accepted(tly_req_t *req, const char *poll_id, const char *request_id);
/* Tells the other instances that our store batches committed (after a reap). */
void api_bus_announce(tly_app_t *app);
/* A request that found nothing where another instance may just have made something:
 * with a shared store, waits until memory has caught up with the store and runs the
 * request again (once), and returns true: the caller returns without answering. false
 * (not shared, already the second run, out of memory): the caller answers the miss. */
bool api_resync(tly_app_t *app, tly_req_t *req);
/* Routes a request (app.c); follow.c runs a request again through it. */
void api_dispatch(tly_app_t *app, tly_req_t *req);
/* votes.c: a validated ballot into memory (pending) and the store's queue; see votes.c. */
waiter_t *api_waiter_new(tly_req_t *req, bool async); /* in request memory; NULL: none */
int api_cast_submit(tly_app_t *app, tly_poll_t *p, const char *voter_id, const tly_ballot_t *ballot, const char *idem,
                    const uint8_t hash[16], const uint8_t *ip_hash, char *client_meta, const char *request_id,
                    int64_t now, waiter_t *w, api_cast_done_fn on_done, void *done_arg);
/* ingest.c: the durable ingest log for Prefer: respond-async (Redis Streams, --bus). */
bool api_ingest_up(tly_app_t *app);
/* Appends a validated ballot to the log and answers req: 202 once Redis has it, a replay
 * or 409 when the voter's ballot is already in the log, or (the log unreachable) falls
 * back to casting it straight into the store. */
void api_ingest_enqueue(tly_app_t *app, tly_req_t *req, tly_poll_t *p, const char *voter_id, const tly_ballot_t *ballot,
                        const char *idem, const uint8_t hash[16], const uint8_t *ip_hash, char *client_meta);
int api_ingest_open(tly_app_t *app);
void api_ingest_stats(const tly_app_t *app, uint64_t *enqueued, uint64_t *applied, uint64_t *failed, uint64_t *dead);
/* votes.c: remembers the Idempotency-Key of a ballot retracted at `at` (here or on
 * another instance), so that a late retry of the POST that cast it is refused, not cast
 * again, until conf->retracted_key_ttl has passed. */
void api_remember_retracted(tly_app_t *app, const tly_poll_t *p, const tly_vote_t *v, int64_t at);
/* The same from a stored "revoked" row (load): 0 (also when it has expired: then it is
 * not kept) or TLY_ENOMEM. */
int api_remember_retracted_key(tly_app_t *app, const char *poll_id, const char *voter_id, const char *idem_key,
                               const uint8_t body_hash[16], int64_t at);
/* A retracted ballot frees its voter's dedup key, so the voter may vote again. */
void api_ingest_forget(tly_app_t *app, const char *poll_id, const char *voter_id);
void api_ingest_close(tly_app_t *app);
/* GET .../votes/requests/{id} for a request memory does not know: asks the log. */
bool api_ingest_status(tly_app_t *app, tly_req_t *req, const char *poll_id, const char *request_id,
                       const char *voter_id);
/* votes.c: whether this instance has a write about v (or, v NULL, any ballot of p) in
 * the store's queue. */
bool api_votes_busy(tly_app_t *app, tly_poll_t *p, tly_vote_t *v);
/* polls.c: a deleted poll leaves memory (its vote requests with it); a poll about to be
 * deleted is hidden from readers and voters. */
void api_poll_forget(tly_app_t *app, const char *poll_id);
void api_poll_mark_deleting(tly_app_t *app, const char *poll_id);

/* ---- reconcile.c: counters put right when they drift from the ballots ----
 * The periodic job (serve) and the pieces `tally reconcile` (main.c) runs once. */
typedef struct api_reconcile api_reconcile_t;
/* Starts the job every --reconcile-interval seconds on a worker thread; a no-op when 0
 * or without a shared store. After api_bus_open. 0 or TLY_ENOMEM. Loop thread. */
int api_reconcile_init(tly_app_t *app);
/* Stops the timer; a pass still queued does nothing. Before the workers stop. */
void api_reconcile_stop(tly_app_t *app);
/* Frees the job. After the workers have stopped and the bus is closed. */
void api_reconcile_free(tly_app_t *app);
/* For /metrics: runs completed, counters repaired (store rows, Redis fields), and the
 * time of the last run (ms since the epoch, 0: none yet). */
void api_reconcile_stats(const tly_app_t *app, uint64_t *runs, uint64_t *repairs_store, uint64_t *repairs_redis,
                         int64_t *last_run_ms);

/* The true counts of one tly_store_reconcile pass, as its `actual` callback gives them
 * (polls in strcmp order, each poll's position -1 first): fields[first .. first + n) are
 * polls[i]'s. Bounded; beyond the bound (or out of memory) `truncated` is set and the
 * rest is not kept. Zero-initialise; free with api_rec_counts_free. */
typedef struct {
    int position; /* -1: the poll's ballots */
    int64_t count;
} api_rec_field_t;
typedef struct {
    char poll_id[TLY_POLL_ID_LEN + 1];
    size_t first, n;
} api_rec_poll_t;
typedef struct {
    api_rec_poll_t *polls;
    size_t npolls, pcap;
    api_rec_field_t *fields;
    size_t nfields, fcap;
    bool truncated;
} api_rec_counts_t;
/* The `actual` callback of tly_store_reconcile; ctx is an api_rec_counts_t. */
void api_rec_counts_add(void *ctx, const char *poll_id, int position, int64_t count);
void api_rec_counts_free(api_rec_counts_t *c);
/* Whether poll a->polls[poll] has the same counts in b. Call with increasing `poll`
 * and one cursor (starting at 0) per walk over b. */
bool api_rec_unchanged(const api_rec_counts_t *a, const api_rec_counts_t *b, size_t poll, size_t *cursor);

/* A Redis live counter (tally:counts:{poll}) that differs from the true count. */
typedef struct {
    size_t poll;  /* index in counts->polls */
    int position; /* -1: field "ballots" */
    int64_t redis, actual;
    bool del;               /* a field of a position the poll does not have: repaired by HDEL */
    bool repaired, skipped; /* set by api_rec_redis_repair */
} api_rec_diff_t;
typedef struct api_rec_redis api_rec_redis_t;
struct api_rec_redis {
    /* set by the caller */
    tly_bus_t *bus;
    const api_rec_counts_t *counts;    /* kept alive until done */
    void (*done)(api_rec_redis_t *rr); /* on the loop thread, once everything answered */
    void *arg;
    /* results: the differences found (grouped by poll, in poll order); replies that
     * were errors or could not be kept (bus down, out of memory) */
    api_rec_diff_t *diffs;
    size_t ndiffs, dcap, errors;
    /* reconcile.c's */
    struct rec_req *reqs;
    size_t next, inflight;
    bool repairing, finished;
    bool (*keep)(void *arg, size_t poll);
    void *keep_arg;
};
/* Reads every poll's hash (HGETALL, a bounded number in flight) and fills diffs; then
 * calls done. 0, or TLY_ENOMEM (done not called). Loop thread of rr->bus. */
int api_rec_redis_read(api_rec_redis_t *rr);
/* After a read: sets the differing fields of every poll that keep(keep_arg, poll)
 * allows (keep NULL: all) to the true counts (HSET; HDEL for `del`), marks each diff
 * repaired or skipped, then calls done again. */
void api_rec_redis_repair(api_rec_redis_t *rr, bool (*keep)(void *arg, size_t poll), void *keep_arg);
void api_rec_redis_free(api_rec_redis_t *rr);

#endif
