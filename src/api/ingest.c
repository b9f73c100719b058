/*
 * ingest.c: the durable ingest log for `Prefer: respond-async` votes when instances are
 * joined by a bus (--bus redis://...).
 *
 * Accepting: a ballot that passed every check memory can make (votes.c) goes into the
 * Redis Stream `tally:ingest` by one Lua script that also claims the voter's dedup key
 * (`tally:dedup:{poll}:{voter}`, SET NX: a second async ballot of the voter is answered
 * from it without reaching the store) and writes the request's status hash
 * (`tally:req:{request_id}`, state pending). The script's reply is the 202: Redis has the
 * entry, and with `appendfsync always` (required; see the README) it is on disk.
 *
 * Applying: every instance is a consumer of the group `tally` of that stream. It reads
 * new entries (XREADGROUP, every 50 ms and at once after its own enqueues), applies each
 * through the same path as a synchronous vote (votes.c, api_cast_submit, with the
 * request_id so the store writes the request's outcome in the ballot's transaction) and
 * acknowledges it (XACK) once the outcome is durable. Applying is idempotent on
 * request_id: an entry whose request memory already knows is only acknowledged, and the
 * store's UNIQUE(poll_id, voter_id) and "first outcome wins" for vote_requests stand
 * behind that. Entries left unacknowledged by a consumer that died or failed are claimed
 * by another after 5 s (XAUTOCLAIM); the attempts are counted in the status hash, and the
 * fourth attempt moves the entry to `tally:ingest:dead` with the reason instead.
 *
 * Status: GET .../votes/requests/{id} is answered from memory (the store's rows, on every
 * instance through the feed) and, for a request not applied yet or refused before it
 * reached the store, from the status hash.
 *
 * Threads: the loop thread only.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

#define STREAM "tally:ingest"
#define DEAD "tally:ingest:dead"
#define GROUP "tally"
#define READ_MS 50
#define CLAIM_MS 1000
#define CLAIM_IDLE_MS "5000"
#define MAX_ATTEMPTS 3
#define MAX_INFLIGHT 4096
#define STATUS_TTL_S "86400"
#define DEDUP_TTL_MS "86400000"
#define STREAM_MAXLEN "1000000"

/* KEYS: dedup key, stream, status hash. ARGV: dedup value, dedup ttl, poll, voter,
 * stream max length, then the entry's field/value pairs. */
static const char enqueue_lua[] =
    "local cur = redis.call('GET', KEYS[1])\n"
    "if cur then return {0, cur} end\n"
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\n"
    "local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))\n"
    "redis.call('HSET', KEYS[3], 'state', 'pending', 'p', ARGV[3], 'v', ARGV[4])\n"
    "redis.call('EXPIRE', KEYS[3], " STATUS_TTL_S ")\n"
    "return {1, id}\n";

struct ingest {
    tly_app_t *app;
    tly_bus_script_t *enqueue;
    tly_timer_t read_timer, claim_timer;
    bool reading, claiming, group_ok;
    size_t inflight;
    uint64_t enqueued, applied, failed, dead, replayed;
};

/* ---- small helpers ---- */

static bool is_error(const tly_bus_reply_t *r) { return r->type == TLY_BUS_ERROR; }

/* ---- accepting ---- */

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
    char poll_id[TLY_POLL_ID_LEN + 1];
    char request_id[24];
    char *voter_id, *idem, *client_meta;
    char hash_hex[33];
    uint8_t hash_bytes[16];
    tly_ballot_t ballot;
    bool has_ip;
    uint8_t ip_hash[TLY_IP_HASH_LEN];
    int64_t at;
} enqueue_t;

static void enqueue_free(enqueue_t *e)
{
    tly_free(e->voter_id);
    tly_free(e->idem);
    tly_free(e->client_meta);
    tly_free(e);
}

static void kick(struct ingest *in);

/* Why a ballot the log took at `at` (the request was checked then) cannot be cast in p
 * now: the error code, or NULL. Meanwhile the poll may have been deleted, closed by its
 * owner, given its final results or new options, and the voter or the address may have
 * voted through another request. A poll whose end_time passed after `at` still takes
 * the ballot until its final results are stored (they then hold it): the voter was
 * told it was accepted while the poll was open, and a ballot of the direct path that
 * is still on its way to the store at the close counts the same way. */
static const char *cannot_cast(tly_poll_t *p, const char *voter_id, const tly_ballot_t *b, const uint8_t *ip_hash,
                               int64_t at)
{
    if (p == NULL)
        return "POLL_NOT_FOUND";
    if (!tly_poll_accepts_votes(p, at) || tly_poll_final_results(p) != NULL)
        return "POLL_NOT_ACTIVE";
    if (tly_poll_find_vote(p, voter_id) != NULL || (ip_hash != NULL && tly_poll_find_ip(p, ip_hash) != NULL))
        return "ALREADY_VOTED";
    for (size_t i = 0; i < b->nchoices; i++)
        if (b->choices[i] >= p->noptions)
            return "INVALID_OPTION";
    return NULL;
}

/* The log could not take it (Redis went away): the request runs once more through the
 * vote route, which skips the log for it and casts straight into the store (answering
 * 202 once durable there), with every check of a vote made again against the poll as
 * it is now: it may have been deleted, closed or changed, and the voter may have voted,
 * retracted or replayed meanwhile. */
static void enqueue_fallback(enqueue_t *e)
{
    tly_app_t *app = e->app;
    app->ingest_bypass = e->req;
    app->limit_passed = e->req; /* checked on the first run */
    api_dispatch(app, e->req);
    app->ingest_bypass = NULL;
    app->limit_passed = NULL;
}

static void respond_closing(tly_req_t *req)
{
    tly_req_add_header(req, "Retry-After", "1");
    api_respond_error(req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
}

static void enqueued(void *arg, const tly_bus_reply_t *r)
{
    enqueue_t *e = arg;
    tly_app_t *app = e->app;
    api_end_async(app);
    if (app->closing) {
        respond_closing(e->req);
        enqueue_free(e);
        return;
    }
    if (is_error(r) || r->type != TLY_BUS_ARRAY || r->nelements != 2 || r->elements[0].type != TLY_BUS_INT ||
        r->elements[1].type != TLY_BUS_STRING) {
        tly_log(TLY_LOG_WARN, "ingest log unavailable, vote stored directly", "error",
                is_error(r) ? r->str : "unexpected reply", NULL);
        enqueue_fallback(e);
    } else if (r->elements[0].integer == 1) {
        app->ingest->enqueued++;
        api_respond_accepted(e->req, e->poll_id, e->request_id);
        kick(app->ingest);
    } else {
        /* the voter's ballot is already in the log: "request_id hash idem" */
        char rid[24] = "", hh[33] = "";
        const char *cur = r->elements[1].str;
        const char *sp1 = memchr(cur, ' ', r->elements[1].len);
        const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', r->elements[1].len - (size_t)(sp1 + 1 - cur)) : NULL;
        if (sp1 && sp2 && (size_t)(sp1 - cur) < sizeof(rid) && sp2 - sp1 - 1 == 32) {
            memcpy(rid, cur, (size_t)(sp1 - cur));
            memcpy(hh, sp1 + 1, 32);
        }
        const char *idem = sp2 ? sp2 + 1 : "";
        size_t idem_len = sp2 ? r->elements[1].len - (size_t)(sp2 + 1 - cur) : 0;
        if (rid[0] && e->idem != NULL && strlen(e->idem) == idem_len && memcmp(e->idem, idem, idem_len) == 0 &&
            strcmp(hh, e->hash_hex) == 0) {
            app->ingest->replayed++;
            api_respond_accepted(e->req, e->poll_id, rid);
        } else if (rid[0] && e->idem != NULL && strlen(e->idem) == idem_len && memcmp(e->idem, idem, idem_len) == 0) {
            api_respond_error(e->req, 422, "IDEMPOTENCY_KEY_REUSED",
                              "this Idempotency-Key was used with a different ballot", NULL);
        } else {
            api_respond_error(e->req, 409, "ALREADY_VOTED", "this voter has already voted in this poll", NULL);
        }
    }
    enqueue_free(e);
}

bool api_ingest_up(tly_app_t *app) { return app->ingest != NULL && tly_bus_up(app->bus) && app->ingest->group_ok; }

void api_ingest_enqueue(tly_app_t *app, tly_req_t *req, tly_poll_t *p, const char *voter_id, const tly_ballot_t *ballot,
                        const char *idem, const uint8_t hash[16], const uint8_t *ip_hash, char *client_meta)
{
    enqueue_t *e = tly_calloc(1, sizeof(*e));
    if (e == NULL || (e->voter_id = tly_strdup(voter_id)) == NULL ||
        (idem != NULL && (e->idem = tly_strdup(idem)) == NULL) ||
        (client_meta != NULL && (e->client_meta = tly_strdup(client_meta)) == NULL)) {
        if (e != NULL)
            enqueue_free(e);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    e->app = app;
    e->req = req;
    memcpy(e->poll_id, p->poll_id, sizeof(e->poll_id));
    tly_random_id(e->request_id, "r_", 12);
    memcpy(e->hash_bytes, hash, 16);
    tly_hex_encode(hash, 16, e->hash_hex);
    e->ballot = *ballot;
    if (ip_hash != NULL) {
        e->has_ip = true;
        memcpy(e->ip_hash, ip_hash, TLY_IP_HASH_LEN);
    }
    e->at = tly_now_ms();

    char dedup_key[TLY_POLL_ID_LEN + TLY_VOTER_ID_MAX + 32], status_key[48], dedup_val[24 + 34 + 260];
    char choices[2 * TLY_MAX_OPTIONS + 1], scores[2 * TLY_MAX_OPTIONS + 1], iph[2 * TLY_IP_HASH_LEN + 1], at[24];
    snprintf(dedup_key, sizeof(dedup_key), "tally:dedup:%s:%s", p->poll_id, voter_id);
    snprintf(status_key, sizeof(status_key), "tally:req:%s", e->request_id);
    snprintf(dedup_val, sizeof(dedup_val), "%s %s %.255s", e->request_id, e->hash_hex, idem ? idem : "");
    tly_hex_encode(ballot->choices, ballot->nchoices, choices);
    tly_hex_encode(ballot->scores, p->type == TLY_TYPE_SCORE ? ballot->nchoices : 0, scores);
    tly_hex_encode(ip_hash ? ip_hash : (const uint8_t *)"", ip_hash ? TLY_IP_HASH_LEN : 0, iph);
    snprintf(at, sizeof(at), "%lld", (long long)e->at);
    const char *argv[] = {dedup_key,    STREAM,
                          status_key,   dedup_val,
                          DEDUP_TTL_MS, p->poll_id,
                          voter_id,     STREAM_MAXLEN,
                          "r",          e->request_id,
                          "p",          p->poll_id,
                          "v",          voter_id,
                          "c",          choices,
                          "s",          scores,
                          "k",          idem ? idem : "",
                          "h",          e->hash_hex,
                          "i",          iph,
                          "m",          client_meta ? client_meta : "",
                          "t",          at};
    size_t lens[TLY_ARRAY_SIZE(argv)];
    for (size_t i = 0; i < TLY_ARRAY_SIZE(argv); i++)
        lens[i] = strlen(argv[i]);
    api_begin_async(app);
    if (tly_bus_script(app->bus, app->ingest->enqueue, enqueued, e, 3, TLY_ARRAY_SIZE(argv), argv, lens) != 0) {
        api_end_async(app);
        enqueue_fallback(e);
        enqueue_free(e);
    }
}

/* ---- applying ---- */

typedef struct entry {
    tly_app_t *app;
    char id[48]; /* the stream entry's id */
    char request_id[24];
    char poll_id[TLY_POLL_ID_LEN + 1];
    char *voter_id, *idem, *client_meta;
    uint8_t hash[16];
    tly_ballot_t ballot;
    bool has_ip, synced, relinked;
    uint8_t ip_hash[TLY_IP_HASH_LEN];
    long long attempts;
    int64_t at; /* when the log took it (the 202): the ballot's time */
} entry_t;

static void entry_free(entry_t *en)
{
    en->app->ingest->inflight--;
    tly_free(en->voter_id);
    tly_free(en->idem);
    tly_free(en->client_meta);
    tly_free(en);
}

static void ack(tly_app_t *app, const char *id)
{
    tly_bus_command(app->bus, api_bus_ignore, NULL, "XACK %s %s %s", STREAM, GROUP, id);
}

static void set_status(tly_app_t *app, const char *rid, const char *state, const char *vote_id, const char *error)
{
    tly_bus_command(app->bus, api_bus_ignore, NULL, "HSET tally:req:%s state %s vote_id %s error %s", rid, state,
                    vote_id ? vote_id : "", error ? error : "");
}

/* Refused before reaching the store: the request fails with `code`; the voter may try
 * again unless the reason is a ballot already there. */
static void refuse(entry_t *en, const char *code)
{
    tly_app_t *app = en->app;
    app->ingest->failed++;
    set_status(app, en->request_id, "failed", NULL, code);
    if (strcmp(code, "ALREADY_VOTED") != 0)
        tly_bus_command(app->bus, api_bus_ignore, NULL, "DEL tally:dedup:%s:%s", en->poll_id, en->voter_id);
    ack(app, en->id);
    entry_free(en);
}

static void dead_letter(entry_t *en, const char *reason)
{
    tly_app_t *app = en->app;
    app->ingest->dead++;
    tly_log(TLY_LOG_ERROR, "ingest entry moved to the dead-letter stream", "request_id", en->request_id, "reason",
            reason, NULL);
    tly_bus_command(app->bus, api_bus_ignore, NULL, "XADD %s * id %s r %s p %s v %s reason %s", DEAD, en->id,
                    en->request_id, en->poll_id, en->voter_id, reason);
    set_status(app, en->request_id, "failed", NULL, "UNAVAILABLE");
    tly_bus_command(app->bus, api_bus_ignore, NULL, "DEL tally:dedup:%s:%s", en->poll_id, en->voter_id);
    ack(app, en->id);
    entry_free(en);
}

static void synced(void *arg);

static void applied(void *arg, int result, const char *vote_id)
{
    entry_t *en = arg;
    tly_app_t *app = en->app;
    if (app->closing) {
        /* unacknowledged: the outcome is in the store, and a consumer claiming the entry
         * finds the request known and only acknowledges it */
    } else if (result == TLY_EAUTH && !en->relinked) {
        /* another instance linked the voter's device to an account after this consumer
         * took the entry: once memory has the link, the ballot is cast as the account's */
        en->relinked = true;
        tly_store_sync(app->store, synced, en);
        return;
    } else if (result == 0) {
        app->ingest->applied++;
        set_status(app, en->request_id, "completed", vote_id, NULL);
        ack(app, en->id);
    } else if (result == TLY_EEXIST || result == TLY_ESTATE) {
        /* the store wrote "failed: ALREADY_VOTED" (or POLL_NOT_ACTIVE: the poll's final
         * results were stored before this ballot) */
        app->ingest->failed++;
        set_status(app, en->request_id, "failed", NULL, result == TLY_EEXIST ? "ALREADY_VOTED" : "POLL_NOT_ACTIVE");
        ack(app, en->id);
    } else if (en->attempts >= MAX_ATTEMPTS) {
        dead_letter(en, "the store could not commit the ballot");
        return;
    }
    /* otherwise left unacknowledged: claimed again after CLAIM_IDLE_MS */
    entry_free(en);
}

static void apply_entry(entry_t *en);

static void synced(void *arg)
{
    entry_t *en = arg;
    if (en->app->closing) {
        entry_free(en);
        return;
    }
    api_follow_flush(en->app);
    apply_entry(en);
}

static void apply_entry(entry_t *en)
{
    tly_app_t *app = en->app;
    vote_request_t *known;
    HASH_FIND_STR(app->requests, en->request_id, known);
    if (known != NULL) { /* applied before (by us or another consumer): only acknowledge */
        ack(app, en->id);
        entry_free(en);
        return;
    }
    tly_poll_t *p = tly_registry_find_poll(app->registry, en->poll_id);
    if (p == NULL && !en->synced && tly_store_shared(app->store)) {
        en->synced = true; /* made on another instance a moment ago? */
        tly_store_sync(app->store, synced, en);
        return;
    }
    /* the voter's device linked to an account since it cast this: the account's ballot */
    const char *voter = api_person(app, en->voter_id);
    tly_vote_t *v = p != NULL ? tly_poll_find_vote(p, voter) : NULL;
    if ((v != NULL && v->state != TLY_VOTE_COMMITTED) || api_link_busy(app, en->voter_id) ||
        api_link_busy(app, voter)) {
        entry_free(en); /* our own write for this voter (or its link) is under way: claimed again later */
        return;
    }
    const char *why = cannot_cast(p, voter, &en->ballot, en->has_ip ? en->ip_hash : NULL, en->at);
    if (why != NULL) {
        refuse(en, why);
        return;
    }
    char *meta = en->client_meta;
    en->client_meta = NULL;
    if (api_cast_submit(app, p, voter, &en->ballot, en->idem, en->hash, en->has_ip ? en->ip_hash : NULL, meta,
                        en->request_id, en->at, NULL, applied, en) != 0)
        entry_free(en); /* out of memory: claimed again later */
}

static const tly_bus_reply_t *field(const tly_bus_reply_t *kv, const char *name)
{
    for (size_t i = 0; i + 1 < kv->nelements; i += 2)
        if (kv->elements[i].type == TLY_BUS_STRING && strcmp(kv->elements[i].str, name) == 0 &&
            kv->elements[i + 1].type == TLY_BUS_STRING)
            return &kv->elements[i + 1];
    return NULL;
}

/* One stream entry [id, [field, value, ...]], copied out of the reply; NULL when there is
 * nothing to apply (a deleted entry, a malformed one: dead-lettered, out of memory). */
static entry_t *take_entry(tly_app_t *app, const tly_bus_reply_t *e)
{
    if (e->type != TLY_BUS_ARRAY || e->nelements != 2 || e->elements[0].type != TLY_BUS_STRING ||
        e->elements[1].type != TLY_BUS_ARRAY)
        return NULL; /* a deleted entry (nil): nothing to apply */
    const tly_bus_reply_t *kv = &e->elements[1];
    const tly_bus_reply_t *r = field(kv, "r"), *p = field(kv, "p"), *v = field(kv, "v"), *c = field(kv, "c"),
                          *s = field(kv, "s"), *k = field(kv, "k"), *h = field(kv, "h"), *i = field(kv, "i"),
                          *m = field(kv, "m"), *t = field(kv, "t");
    entry_t *en = tly_calloc(1, sizeof(*en));
    if (en == NULL)
        return NULL; /* claimed again later */
    en->app = app;
    app->ingest->inflight++;
    en->attempts = 1;
    snprintf(en->id, sizeof(en->id), "%s", e->elements[0].str);
    int nc = c ? tly_hex_decode(c->str, c->len, en->ballot.choices, TLY_MAX_OPTIONS) : -1;
    int ns = s ? tly_hex_decode(s->str, s->len, en->ballot.scores, TLY_MAX_OPTIONS) : -1;
    int nh = h ? tly_hex_decode(h->str, h->len, en->hash, 16) : -1;
    int ni = i ? tly_hex_decode(i->str, i->len, en->ip_hash, TLY_IP_HASH_LEN) : -1;
    if (!r || !p || !v || r->len >= sizeof(en->request_id) || p->len != TLY_POLL_ID_LEN || nc < 1 ||
        (ns != 0 && ns != nc) || nh != 16 || (ni != 0 && ni != TLY_IP_HASH_LEN) ||
        (en->voter_id = tly_strdup(v->str)) == NULL) {
        tly_log(TLY_LOG_ERROR, "malformed ingest entry", "id", en->id, NULL);
        snprintf(en->request_id, sizeof(en->request_id), "%s", r && r->len < 24 ? r->str : "");
        snprintf(en->poll_id, sizeof(en->poll_id), "%s", p && p->len == TLY_POLL_ID_LEN ? p->str : "");
        if (en->voter_id == NULL)
            en->voter_id = tly_strdup("");
        if (en->voter_id != NULL)
            dead_letter(en, "malformed entry");
        else
            entry_free(en);
        return NULL;
    }
    memcpy(en->request_id, r->str, r->len + 1);
    memcpy(en->poll_id, p->str, p->len + 1);
    en->at = t != NULL ? strtoll(t->str, NULL, 10) : 0;
    if (en->at <= 0 || en->at > tly_now_ms())
        en->at = tly_now_ms(); /* an entry without a sane time: judged as of now */
    en->ballot.nchoices = (uint8_t)nc;
    en->has_ip = ni == TLY_IP_HASH_LEN;
    if ((k && k->len && (en->idem = tly_strdup(k->str)) == NULL) ||
        (m && m->len && (en->client_meta = tly_strdup(m->str)) == NULL)) {
        entry_free(en);
        return NULL;
    }
    return en;
}

static void read_done(void *arg, const tly_bus_reply_t *r)
{
    tly_app_t *app = arg;
    struct ingest *in = app->ingest;
    in->reading = false;
    if (app->closing)
        return; /* delivered, unacknowledged: claimed by another consumer later */
    if (is_error(r)) {
        if (r->len >= 7 && memcmp(r->str, "NOGROUP", 7) == 0)
            in->group_ok = false;
        return;
    }
    /* [[stream, [entry, ...]]] or nil */
    if (r->type == TLY_BUS_ARRAY && r->nelements == 1 && r->elements[0].type == TLY_BUS_ARRAY &&
        r->elements[0].nelements == 2) {
        const tly_bus_reply_t *entries = &r->elements[0].elements[1];
        for (size_t i = 0; i < entries->nelements; i++) {
            entry_t *en = take_entry(app, &entries->elements[i]);
            if (en != NULL)
                apply_entry(en);
        }
        if (entries->nelements > 0)
            kick(in); /* there may be more */
    }
}

/* A claimed entry was delivered before: its attempts are counted in its status hash, so
 * that they add up across consumers and restarts. */
static void counted(void *arg, const tly_bus_reply_t *r)
{
    entry_t *en = arg;
    if (en->app->closing) {
        entry_free(en);
        return;
    }
    en->attempts = r->type == TLY_BUS_INT ? r->integer : MAX_ATTEMPTS + 1;
    if (en->attempts > MAX_ATTEMPTS)
        dead_letter(en, "not applied after 3 attempts");
    else
        apply_entry(en);
}

static void claim_done(void *arg, const tly_bus_reply_t *r)
{
    tly_app_t *app = arg;
    app->ingest->claiming = false;
    if (app->closing)
        return;
    /* [next, [entry, ...], [deleted ids]] */
    if (is_error(r) || r->type != TLY_BUS_ARRAY || r->nelements < 2 || r->elements[1].type != TLY_BUS_ARRAY)
        return;
    const tly_bus_reply_t *entries = &r->elements[1];
    for (size_t i = 0; i < entries->nelements; i++) {
        entry_t *en = take_entry(app, &entries->elements[i]);
        if (en != NULL &&
            tly_bus_command(app->bus, counted, en, "HINCRBY tally:req:%s attempts 1", en->request_id) != 0)
            entry_free(en);
    }
}

static void group_created(void *arg, const tly_bus_reply_t *r)
{
    tly_app_t *app = arg;
    if (app->closing)
        return;
    if (!is_error(r) || (r->len >= 9 && memcmp(r->str, "BUSYGROUP", 9) == 0)) {
        app->ingest->group_ok = true;
        kick(app->ingest);
    }
}

static void read_tick(tly_timer_t *t)
{
    struct ingest *in = (struct ingest *)((char *)t - offsetof(struct ingest, read_timer));
    tly_app_t *app = in->app;
    tly_timer_start(app->loop, &in->read_timer, READ_MS, read_tick);
    if (!tly_bus_up(app->bus))
        return;
    if (!in->group_ok) {
        tly_bus_command(app->bus, group_created, app, "XGROUP CREATE %s %s 0 MKSTREAM", STREAM, GROUP);
        return;
    }
    if (in->reading || in->inflight >= MAX_INFLIGHT || !tly_store_writable(app->store))
        return;
    in->reading = true;
    if (tly_bus_command(app->bus, read_done, app, "XREADGROUP GROUP %s %s COUNT 256 STREAMS %s >", GROUP,
                        app->instance_id, STREAM) != 0)
        in->reading = false;
}

static void claim_tick(tly_timer_t *t)
{
    struct ingest *in = (struct ingest *)((char *)t - offsetof(struct ingest, claim_timer));
    tly_app_t *app = in->app;
    tly_timer_start(app->loop, &in->claim_timer, CLAIM_MS, claim_tick);
    if (!tly_bus_up(app->bus) || !in->group_ok || in->claiming || in->inflight >= MAX_INFLIGHT ||
        !tly_store_writable(app->store))
        return;
    in->claiming = true;
    if (tly_bus_command(app->bus, claim_done, app, "XAUTOCLAIM %s %s %s %s 0-0 COUNT 128", STREAM, GROUP,
                        app->instance_id, CLAIM_IDLE_MS) != 0)
        in->claiming = false;
}

static void kick(struct ingest *in)
{
    tly_timer_stop(&in->read_timer);
    tly_timer_start(in->app->loop, &in->read_timer, 0, read_tick);
}

int api_ingest_open(tly_app_t *app)
{
    if (app->bus == NULL)
        return 0;
    struct ingest *in = tly_calloc(1, sizeof(*in));
    if (in == NULL || (in->enqueue = tly_bus_script_new(app->bus, enqueue_lua)) == NULL) {
        tly_free(in);
        return TLY_ENOMEM;
    }
    in->app = app;
    app->ingest = in;
    tly_timer_start(app->loop, &in->read_timer, 0, read_tick);
    tly_timer_start(app->loop, &in->claim_timer, CLAIM_MS, claim_tick);
    return 0;
}

void api_ingest_close(tly_app_t *app)
{
    if (app->ingest == NULL)
        return;
    tly_timer_stop(&app->ingest->read_timer);
    tly_timer_stop(&app->ingest->claim_timer);
    tly_free(app->ingest);
    app->ingest = NULL;
}

/* ---- status of a request memory does not know ---- */

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
    char poll_id[TLY_POLL_ID_LEN + 1];
    char request_id[24];
    char *voter_id;
} status_t;

static void status_done(void *arg, const tly_bus_reply_t *r)
{
    status_t *st = arg;
    api_end_async(st->app);
    if (st->app->closing) {
        respond_closing(st->req);
        tly_free(st->voter_id);
        tly_free(st);
        return;
    }
    /* HGETALL: [field, value, ...] */
    const tly_bus_reply_t *state = r->type == TLY_BUS_ARRAY ? field(r, "state") : NULL;
    const tly_bus_reply_t *voter = r->type == TLY_BUS_ARRAY ? field(r, "v") : NULL;
    const tly_bus_reply_t *poll = r->type == TLY_BUS_ARRAY ? field(r, "p") : NULL;
    if (state == NULL || voter == NULL || poll == NULL || strcmp(voter->str, st->voter_id) != 0 ||
        strcmp(poll->str, st->poll_id) != 0) {
        api_respond_error(st->req, 404, "REQUEST_NOT_FOUND", "no vote request with that id for this voter", NULL);
    } else {
        json_t *o = json_pack("{s:s, s:s}", "request_id", st->request_id, "state", state->str);
        const tly_bus_reply_t *vid = field(r, "vote_id"), *err = field(r, "error");
        if (vid != NULL && vid->len)
            json_object_set_new(o, "vote_id", json_string(vid->str));
        if (err != NULL && err->len)
            json_object_set_new(o, "error", json_pack("{s:s}", "code", err->str));
        api_respond_json(st->req, 200, o);
    }
    tly_free(st->voter_id);
    tly_free(st);
}

bool api_ingest_status(tly_app_t *app, tly_req_t *req, const char *poll_id, const char *request_id,
                       const char *voter_id)
{
    if (app->ingest == NULL || !tly_bus_up(app->bus) || strlen(request_id) >= 24)
        return false;
    status_t *st = tly_calloc(1, sizeof(*st));
    if (st == NULL || (st->voter_id = tly_strdup(voter_id)) == NULL) {
        tly_free(st);
        return false;
    }
    st->app = app;
    st->req = req;
    snprintf(st->request_id, sizeof(st->request_id), "%s", request_id);
    snprintf(st->poll_id, sizeof(st->poll_id), "%s", poll_id);
    api_begin_async(app);
    if (tly_bus_command(app->bus, status_done, st, "HGETALL tally:req:%s", request_id) != 0) {
        api_end_async(app);
        tly_free(st->voter_id);
        tly_free(st);
        return false;
    }
    return true;
}

void api_ingest_forget(tly_app_t *app, const char *poll_id, const char *voter_id)
{
    if (app->ingest != NULL)
        tly_bus_command(app->bus, api_bus_ignore, NULL, "DEL tally:dedup:%s:%s", poll_id, voter_id);
}

void api_ingest_stats(const tly_app_t *app, uint64_t *enqueued, uint64_t *applied, uint64_t *failed, uint64_t *dead)
{
    const struct ingest *in = app->ingest;
    *enqueued = in ? in->enqueued : 0;
    *applied = in ? in->applied : 0;
    *failed = in ? in->failed : 0;
    *dead = in ? in->dead : 0;
}
