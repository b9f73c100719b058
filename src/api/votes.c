/*
 * votes.c: casting a ballot, reading one's own, async request status and receipts.
 *
 * The vote path: token -> poll (in memory) -> Idempotency-Key replay or dedup (the
 * poll's voter map holds pending and committed ballots, so a second ballot is refused
 * before it reaches the store) -> time window -> ballot validation -> the writer's next
 * batch -> commit -> counts move -> 200 (or 202 for Prefer: respond-async). The store's
 * UNIQUE(poll_id, voter_id) is the last word should memory and disk ever disagree.
 *
 * settings.voter_check "ip" / "token+ip" adds a second dedup key: the client address,
 * kept only as HMAC(server secret, "ip\n" poll_id "\n" address key) cut to 16 bytes, so
 * neither memory nor the store ever holds an address, and hashes cannot be linked
 * across polls. The address is the client's (tly_req_client: the TCP peer's, or what a
 * trusted proxy's X-Forwarded-For names, --trusted-proxies).
 */
#include <openssl/hmac.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

struct waiter {
    tly_req_t *req;
    bool async;
    struct waiter *next;
};

/* A write about one voter's ballot (cast, change or retraction) waiting for its batch.
 * While one is in the writer for a vote, no other change or retraction of that vote is
 * accepted (409 VOTE_IN_PROGRESS): done callbacks would otherwise meet a freed vote. */
typedef struct ballot_op {
    UT_hash_handle hh; /* app->pending_ballots, keyed by the vote pointer */
    tly_store_op_t op;
    tly_app_t *app;
    tly_poll_t *poll;
    tly_vote_t *vote;
    waiter_t *waiters;
    char request_id[24];
    char *client_meta;
    tly_ballot_t ballot;              /* a change: the new ballot */
    uint8_t ip_hash[TLY_IP_HASH_LEN]; /* a cast under an address rule: op.u.ballot.ip_hash */
    api_cast_done_fn on_done;         /* a cast from the ingest log (no waiters): its outcome */
    void *done_arg;
} ballot_op_t;

static json_t *recorded_body(const tly_poll_t *p, const tly_vote_t *v, json_t *option_ids, int64_t recorded_at)
{
    char at[TLY_TIME_LEN];
    tly_time_format(recorded_at, at);
    return json_pack("{s:s, s:s, s:s, s:o, s:s, s:s}", "status", "recorded", "vote_id", v->vote_id, "poll_id",
                     p->poll_id, "option_ids", option_ids, "recorded_at", at, "receipt", v->receipt);
}

/* The 200 answer for v as it stands now (a cast, a change). */
static json_t *recorded_json(const tly_poll_t *p, const tly_vote_t *v)
{
    return recorded_body(p, v, tly_vote_option_ids(p, v), v->recorded_at);
}

/* The 200 answer of the POST that cast v, for a retry of it (same Idempotency-Key and
 * body): the first response again, with the ballot and time it was cast with even when
 * v was changed since (core keeps them, and the store, across restarts). vote_id and
 * receipt never change. */
static json_t *cast_json(const tly_poll_t *p, const tly_vote_t *v)
{
    int64_t at;
    json_t *ids = tly_vote_cast_option_ids(p, v, &at);
    return recorded_body(p, v, ids, at);
}

/* Whether s may go into JSON between quotes as it is: the URL-safe alphabet of our ids
 * and the characters of an RFC 3339 time. */
static bool json_plain(const char *s)
{
    for (; *s != '\0'; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_' || *s == ':' || *s == '.'))
            return false;
    return true;
}

/* Appends the NUL-terminated s at p; returns the new end. */
static char *put(char *p, const char *s)
{
    size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

/* The 200 of a recorded ballot. The vote path sends one a ballot, and building it as a
 * jansson object and dumping it cost as much as the rest of the reply, so it is written
 * straight into a buffer sized for the longest one: every value is an id or a time of
 * ours (fixed-size arrays), plain by construction (json_plain); should one not be (a bug,
 * or a row from elsewhere), the jansson path escapes it. The same bytes either way: the
 * fields in this order, compact. */
static void respond_recorded(tly_req_t *req, const tly_poll_t *p, const tly_vote_t *v)
{
    char at[TLY_TIME_LEN];
    char body[sizeof("{'status':'recorded','vote_id':'','poll_id':'','option_ids':[],'recorded_at':'','receipt':''}") +
              TLY_VOTE_ID_LEN + TLY_POLL_ID_LEN + TLY_MAX_OPTIONS * (TLY_OPTION_ID_LEN + 3) + TLY_TIME_LEN +
              TLY_RECEIPT_LEN];
    tly_time_format(v->recorded_at, at);
    bool plain = json_plain(v->vote_id) && json_plain(p->poll_id) && json_plain(v->receipt) && json_plain(at);
    char *o = put(body, "{\"status\":\"recorded\",\"vote_id\":\"");
    o = put(o, v->vote_id);
    o = put(o, "\",\"poll_id\":\"");
    o = put(o, p->poll_id);
    o = put(o, "\",\"option_ids\":[");
    const uint8_t *scores = p->type == TLY_TYPE_SCORE ? v->data + v->nchoices : NULL;
    for (size_t i = 0; plain && i < v->nchoices && i < TLY_MAX_OPTIONS; i++) {
        if (scores != NULL && scores[i] == 0)
            continue; /* a score of 0 chose nothing, as tly_vote_option_ids says */
        const char *id = v->data[i] < p->noptions ? p->options[v->data[i]].option_id : "";
        plain = id[0] != '\0' && json_plain(id);
        o = put(o, o[-1] == '[' ? "\"" : ",\"");
        o = put(o, id);
        o = put(o, "\"");
    }
    o = put(o, "],\"recorded_at\":\"");
    o = put(o, at);
    o = put(o, "\",\"receipt\":\"");
    o = put(o, v->receipt);
    o = put(o, "\"}");
    if (!plain) {
        api_respond_json(req, 200, recorded_json(p, v));
        return;
    }
    api_respond_raw_json(req, 200, body, (size_t)(o - body));
}

void api_respond_accepted(tly_req_t *req, const char *poll_id, const char *request_id)
{
    char loc[128];
    snprintf(loc, sizeof(loc), "/v1/polls/%s/votes/requests/%s", poll_id, request_id);
    tly_req_add_header(req, "Location", loc);
    api_respond_json(req, 202,
                     json_pack("{s:s, s:s, s:s}", "status", "accepted", "poll_id", poll_id, "request_id", request_id));
}

static void respond_already_voted(tly_req_t *req, const tly_vote_t *v)
{
    api_respond_error(req, 409, "ALREADY_VOTED", "this voter has already voted in this poll",
                      v ? json_pack("{s:s}", "vote_id", v->vote_id) : NULL);
}

static void respond_address_voted(tly_req_t *req, const tly_vote_t *v)
{
    api_respond_error(req, 409, "ALREADY_VOTED", "a ballot from this network address was already cast in this poll",
                      json_pack("{s:s, s:s}", "vote_id", v->vote_id, "rule", "ip"));
}

/* The store refused a ballot, change or retraction: another instance stored the poll's
 * final results first (tly_poll_row_t.freeze). Nothing was counted. */
static void respond_finalised(tly_req_t *req)
{
    api_respond_error(req, 409, "POLL_NOT_ACTIVE",
                      "the poll closed and its final results were stored before this request; it was not counted",
                      json_pack("{s:s}", "status", "closed"));
}

/* The keyed hash of the request's client address for poll_id. false when OpenSSL fails. */
static bool address_hash(tly_app_t *app, tly_req_t *req, const char *poll_id, uint8_t out[TLY_IP_HASH_LEN])
{
    char key[80], msg[TLY_POLL_ID_LEN + 96];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int len = sizeof(mac);
    tly_addr_key(tly_req_client(req), key, sizeof(key));
    int n = snprintf(msg, sizeof(msg), "ip\n%s\n%s", poll_id, key);
    if (n < 0 || (size_t)n >= sizeof(msg) ||
        HMAC(EVP_sha256(), app->secret, (int)app->secret_len, (const unsigned char *)msg, (size_t)n, mac, &len) ==
            NULL ||
        len < TLY_IP_HASH_LEN)
        return false;
    memcpy(out, mac, TLY_IP_HASH_LEN);
    return true;
}

static void remember_request(tly_app_t *app, const char *request_id, const tly_poll_t *p, const char *voter_id,
                             const char *state, const char *vote_id, const char *error)
{
    tly_request_row_t row = {request_id, p->poll_id, voter_id, state, vote_id, error, 0};
    (void)api_request_from_row(app, &row); /* out of memory: the row is durable; a restart brings it back */
}

waiter_t *api_waiter_new(tly_req_t *req, bool async)
{
    waiter_t *w = tly_req_alloc(req, sizeof(*w));
    if (w != NULL)
        *w = (waiter_t){req, async, NULL};
    return w;
}

bool api_votes_busy(tly_app_t *app, tly_poll_t *p, tly_vote_t *v)
{
    ballot_op_t *bo, *tmp;
    if (v != NULL) {
        if (v->state != TLY_VOTE_COMMITTED)
            return true;
        HASH_FIND_PTR(app->pending_ballots, &v, bo);
        return bo != NULL;
    }
    if (p->pending_votes > 0)
        return true;
    HASH_ITER(hh, app->pending_ballots, bo, tmp)
        if (bo->poll == p)
            return true;
    return false;
}

bool api_votes_pending_for(tly_app_t *app, const char *voter_id)
{
    ballot_op_t *bo, *tmp;
    HASH_ITER(hh, app->pending_ballots, bo, tmp)
        if (strcmp(bo->vote->voter_id, voter_id) == 0)
            return true;
    return false;
}

/*
 * A shared store refused a ballot memory did not know (TLY_EEXIST): another instance
 * holds this voter's ballot (or one from this address) and its change has not reached
 * us yet. Once memory has caught up (tly_store_sync), the waiters are answered as a
 * duplicate arriving here later would be: a retry with the same Idempotency-Key and
 * body gets the ballot's receipt, anything else 409 ALREADY_VOTED.
 */
typedef struct {
    tly_app_t *app;
    waiter_t *waiters;
    char poll_id[TLY_POLL_ID_LEN + 1];
    char *voter_id, *idem;
    uint8_t body_hash[16];
} conflict_t;

static void conflict_resolved(void *arg)
{
    conflict_t *c = arg;
    tly_app_t *app = c->app;
    api_follow_flush(app);
    tly_poll_t *p = tly_registry_find_poll(app->registry, c->poll_id);
    /* a device's ballot refused as its account's (linked meanwhile) is the account's */
    tly_vote_t *v = p ? tly_poll_find_vote(p, api_person(app, c->voter_id)) : NULL;
    if (v != NULL && v->state != TLY_VOTE_COMMITTED)
        v = NULL;
    bool same = v != NULL && c->idem != NULL && v->idem_key != NULL && strcmp(c->idem, v->idem_key) == 0 &&
                memcmp(c->body_hash, v->body_hash, 16) == 0;
    for (waiter_t *w = c->waiters; w != NULL; w = w->next) {
        api_end_async(app);
        if (same)
            api_respond_json(w->req, 200, cast_json(p, v));
        else
            respond_already_voted(w->req, v);
    }
    tly_free(c->voter_id);
    tly_free(c->idem);
    tly_free(c);
}

static bool await_conflict(tly_app_t *app, ballot_op_t *bo)
{
    conflict_t *c = tly_calloc(1, sizeof(*c));
    if (c == NULL || (c->voter_id = tly_strdup(bo->vote->voter_id)) == NULL ||
        (bo->vote->idem_key != NULL && (c->idem = tly_strdup(bo->vote->idem_key)) == NULL)) {
        if (c != NULL)
            tly_free(c->voter_id);
        tly_free(c);
        return false;
    }
    c->app = app;
    c->waiters = bo->waiters;
    memcpy(c->poll_id, bo->poll->poll_id, sizeof(c->poll_id));
    memcpy(c->body_hash, bo->vote->body_hash, 16);
    tly_store_sync(app->store, conflict_resolved, c);
    return true;
}

static void ballot_committed(tly_store_op_t *op)
{
    ballot_op_t *bo = op->ctx;
    tly_app_t *app = bo->app;
    tly_poll_t *p = bo->poll;
    tly_vote_t *v = bo->vote;
    HASH_DEL(app->pending_ballots, bo);
    p->pending_votes--;
    if (op->result == 0) {
        v->store_seq = op->u.ballot.seq;
        tly_poll_commit_vote(p, v, tly_now_ms());
        api_bus_count(app, p->poll_id, NULL, 0, v->data, v->nchoices);
        if (bo->request_id[0])
            remember_request(app, bo->request_id, p, v->voter_id, "completed", v->vote_id, NULL);
        if (bo->on_done != NULL)
            bo->on_done(bo->done_arg, 0, v->vote_id);
        for (waiter_t *w = bo->waiters; w != NULL; w = w->next) {
            api_end_async(app);
            if (w->async && bo->request_id[0])
                api_respond_accepted(w->req, p->poll_id, bo->request_id);
            else
                respond_recorded(w->req, p, v);
        }
    } else if (op->result == TLY_EAUTH) {
        /* A shared store: another instance linked this device to an account after we
         * took the ballot. Once memory has the link, the request runs again as the
         * account's (api_resync); the ingest log's consumer does the same itself. */
        if (bo->on_done != NULL)
            bo->on_done(bo->done_arg, op->result, NULL);
        for (waiter_t *w = bo->waiters; w != NULL; w = w->next) {
            api_end_async(app);
            if (!api_resync(app, w->req)) {
                tly_req_add_header(w->req, "Retry-After", "1");
                api_respond_error(w->req, 503, "UNAVAILABLE",
                                  "this device was linked to an account meanwhile; vote again", NULL);
            }
        }
        tly_poll_drop_vote(app->registry, p, v);
    } else {
        if (bo->on_done != NULL)
            bo->on_done(bo->done_arg, op->result, NULL);
        if (op->result == TLY_EEXIST && bo->waiters != NULL && tly_store_shared(app->store) &&
            await_conflict(app, bo)) {
            /* another instance's ballot; it is in the feed, on its way here */
            if (bo->request_id[0])
                remember_request(app, bo->request_id, p, v->voter_id, "failed", NULL, "ALREADY_VOTED");
            tly_poll_drop_vote(app->registry, p, v);
            tly_free(bo->client_meta);
            tly_free(bo);
            return;
        }
        if (op->result == TLY_ESTATE && bo->request_id[0])
            remember_request(app, bo->request_id, p, v->voter_id, "failed", NULL, "POLL_NOT_ACTIVE");
        if (op->result == TLY_EEXIST) {
            /* memory did not know this ballot but the store did: trust the store (with a
             * shared store that is only another instance's ballot on its way here) */
            if (!tly_store_shared(app->store))
                tly_log(TLY_LOG_ERROR, "ballot already in store but not in memory", "poll_id", p->poll_id, NULL);
            if (bo->request_id[0])
                remember_request(app, bo->request_id, p, v->voter_id, "failed", NULL, "ALREADY_VOTED");
        }
        for (waiter_t *w = bo->waiters; w != NULL; w = w->next) {
            api_end_async(app);
            if (op->result == TLY_EEXIST)
                respond_already_voted(w->req, NULL);
            else if (op->result == TLY_ESTATE)
                respond_finalised(w->req);
            else
                api_respond_store_error(w->req, op->result);
        }
        tly_poll_drop_vote(app->registry, p, v);
    }
    tly_free(bo->client_meta);
    tly_free(bo);
}

static char *retracted_key_of(const char *poll_id, const char *voter_id, const char *idem)
{
    size_t n = strlen(poll_id) + strlen(voter_id) + strlen(idem) + 3;
    char *k = tly_malloc(n);
    if (k != NULL)
        snprintf(k, n, "%s\n%s\n%s", poll_id, voter_id, idem);
    return k;
}

/* Whether rk is past its time (conf->retracted_key_ttl after its retraction). */
static bool retracted_expired(const tly_app_t *app, const retracted_key_t *rk, int64_t now)
{
    return rk->at + app->conf->retracted_key_ttl * 1000 <= now;
}

/* The keys remembered for too long go, oldest first: they are first in the table. */
static void forget_expired_keys(tly_app_t *app, int64_t now)
{
    retracted_key_t *rk;
    while ((rk = app->retracted) != NULL && retracted_expired(app, rk, now)) {
        HASH_DEL(app->retracted, rk);
        tly_free(rk->key);
        tly_free(rk);
    }
}

int api_remember_retracted_key(tly_app_t *app, const char *poll_id, const char *voter_id, const char *idem_key,
                               const uint8_t body_hash[16], int64_t at)
{
    int64_t now = tly_now_ms();
    forget_expired_keys(app, now);
    if (idem_key == NULL)
        return 0;
    retracted_key_t *rk = tly_calloc(1, sizeof(*rk));
    if (rk == NULL || (rk->key = retracted_key_of(poll_id, voter_id, idem_key)) == NULL) {
        tly_free(rk);
        return TLY_ENOMEM;
    }
    retracted_key_t *old;
    HASH_FIND_STR(app->retracted, rk->key, old);
    if (old != NULL) {
        HASH_DEL(app->retracted, old);
        tly_free(old->key);
        tly_free(old);
    }
    memcpy(rk->body_hash, body_hash, 16);
    rk->at = at;
    if (retracted_expired(app, rk, now)) { /* a stored one past its time: not kept */
        tly_free(rk->key);
        tly_free(rk);
        return 0;
    }
    HASH_ADD_KEYPTR(hh, app->retracted, rk->key, strlen(rk->key), rk);
    return 0;
}

void api_remember_retracted(tly_app_t *app, const tly_poll_t *p, const tly_vote_t *v, int64_t at)
{
    /* out of memory: a late retry here would cast again, as before the retraction */
    (void)api_remember_retracted_key(app, p->poll_id, v->voter_id, v->idem_key, v->body_hash, at);
}

/* Prefer is a list (RFC 7240 2): respond-async may be in any of its fields. */
static bool prefers_async(tly_req_t *req)
{
    tly_str_t h;
    for (size_t n = 0; (h = tly_req_header_nth(req, "prefer", n)).ptr != NULL; n++)
        for (size_t i = 0; i + 13 <= h.len; i++)
            if (strncasecmp(h.ptr + i, "respond-async", 13) == 0)
                return true;
    return false;
}

/* A retry of the request that cast v (same Idempotency-Key and body) gets that request's
 * answer again, whether the retry prefers async or not, and whether v was changed since
 * or not: 200 with the ballot as cast (cast_json), or for an async first request its 202
 * with the same request_id. */
static void replay(tly_app_t *app, tly_req_t *req, tly_poll_t *p, tly_vote_t *v)
{
    if (v->state == TLY_VOTE_COMMITTED) {
        vote_request_t *r = api_request_of_vote(app, v->vote_id);
        if (r != NULL)
            api_respond_accepted(req, p->poll_id, r->request_id);
        else
            api_respond_json(req, 200, cast_json(p, v));
        return;
    }
    ballot_op_t *bo;
    HASH_FIND_PTR(app->pending_ballots, &v, bo);
    waiter_t *w = tly_req_alloc(req, sizeof(*w));
    if (bo == NULL || w == NULL) {
        respond_already_voted(req, v);
        return;
    }
    w->req = req;
    w->async = bo->request_id[0] != '\0';
    w->next = bo->waiters;
    bo->waiters = w;
    api_begin_async(app);
}

/*
 * Puts a validated ballot of voter_id into memory (pending) and the store's queue. The
 * caller has checked everything (dedup in memory, the address rule, the poll accepting
 * votes). w: the request waiting for the outcome (NULL for the ingest log, which gets
 * on_done instead). Takes client_meta (malloc'd JSON or NULL) in every case. Returns 0,
 * or TLY_ENOMEM with nothing changed.
 */
int api_cast_submit(tly_app_t *app, tly_poll_t *p, const char *voter_id, const tly_ballot_t *ballot, const char *idem,
                    const uint8_t hash[16], const uint8_t *ip_hash, char *client_meta, const char *request_id,
                    int64_t now, struct waiter *w, api_cast_done_fn on_done, void *done_arg)
{
    ballot_op_t *bo = tly_calloc(1, sizeof(*bo));
    tly_vote_t *v = tly_vote_new(ballot, voter_id, idem, NULL, NULL, now);
    if (bo == NULL || v == NULL)
        goto fail;
    memcpy(v->body_hash, hash, 16);
    if (tly_poll_add_vote(app->registry, p, v) != 0)
        goto fail;
    if (ip_hash != NULL && tly_poll_set_vote_ip(p, v, ip_hash) != 0) { /* only ENOMEM: checked before */
        tly_poll_drop_vote(app->registry, p, v);
        v = NULL;
        goto fail;
    }
    p->pending_votes++;
    bo->app = app;
    bo->poll = p;
    bo->vote = v;
    bo->waiters = w;
    bo->client_meta = client_meta;
    bo->on_done = on_done;
    bo->done_arg = done_arg;
    snprintf(bo->request_id, sizeof(bo->request_id), "%s", request_id ? request_id : "");
    bool async = bo->request_id[0] != '\0';
    bo->op.type = TLY_OP_BALLOT_INSERT;
    bo->op.ctx = bo;
    bo->op.done = ballot_committed;
    tly_ballot_row_t *row = &bo->op.u.ballot;
    row->poll_id = p->poll_id;
    row->voter_id = v->voter_id;
    row->vote_id = v->vote_id;
    row->receipt = v->receipt;
    row->nchoices = v->nchoices;
    row->choices = v->data;
    row->scores = p->type == TLY_TYPE_SCORE ? v->data + v->nchoices : NULL;
    row->recorded_at = v->recorded_at;
    row->idem_key = v->idem_key;
    memcpy(row->body_hash, hash, 16);
    row->client_meta = bo->client_meta;
    row->request_id = async ? bo->request_id : NULL;
    if (ip_hash != NULL) {
        memcpy(bo->ip_hash, ip_hash, TLY_IP_HASH_LEN);
        row->ip_hash = bo->ip_hash;
    }
    HASH_ADD_PTR(app->pending_ballots, vote, bo);
    if (w != NULL)
        api_begin_async(app);
    tly_store_submit(app->store, &bo->op);
    return 0;
fail:
    if (v != NULL)
        tly_vote_free(v);
    tly_free(bo);
    tly_free(client_meta);
    return TLY_ENOMEM;
}

void api_votes_cast(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    char *idem;
    if (!api_caller(app, req, true, &caller) ||
        !api_limit_caller(app, req, API_LIMIT_VOTER, &caller) ||
        !api_idempotency_key(req, &idem))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    if (strlen(caller.id) > TLY_VOTER_ID_MAX) {
        api_respond_error(req, 401, "UNAUTHENTICATED", "the token's subject is too long", NULL);
        return;
    }
    if (caller.anonymous && !p->settings.allow_anonymous) {
        api_respond_error(req, 403, "FORBIDDEN", "this poll needs a registered voter; sign in to vote", NULL);
        return;
    }
    if (api_link_guard(app, req, &caller))
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    bool async = prefers_async(req);
    uint8_t hash[16];
    api_body_hash(req, hash);
    tly_vote_t *prev = tly_poll_find_vote(p, caller.id);
    if (prev != NULL) {
        if (idem != NULL && prev->idem_key != NULL && strcmp(idem, prev->idem_key) == 0) {
            if (memcmp(hash, prev->body_hash, 16) == 0)
                replay(app, req, p, prev);
            else
                api_respond_error(req, 422, "IDEMPOTENCY_KEY_REUSED",
                                  "this Idempotency-Key was used with a different ballot", NULL);
        } else {
            respond_already_voted(req, prev);
        }
        goto done;
    }
    if (idem != NULL && app->retracted != NULL) {
        /* a device linked since keeps the keys of what it retracted under its own id */
        retracted_key_t *rk = NULL;
        for (int i = 0; i < 2 && rk == NULL; i++) {
            const char *who = i == 0 ? caller.id : caller.device;
            char *k = who != NULL ? retracted_key_of(p->poll_id, who, idem) : NULL;
            if (k != NULL)
                HASH_FIND_STR(app->retracted, k, rk);
            tly_free(k);
        }
        if (rk != NULL && retracted_expired(app, rk, tly_now_ms()))
            rk = NULL; /* remembered no longer: a new ballot, like any request with a fresh key */
        if (rk != NULL) {
            if (memcmp(rk->body_hash, hash, 16) == 0)
                api_respond_error(req, 409, "VOTE_RETRACTED",
                                  "the ballot this request cast was retracted; vote again without this "
                                  "Idempotency-Key",
                                  NULL);
            else
                api_respond_error(req, 422, "IDEMPOTENCY_KEY_REUSED",
                                  "this Idempotency-Key was used with a different ballot", NULL);
            goto done;
        }
    }
    /* the address rule: one ballot per address, whoever the token names */
    bool by_address = tly_voter_check_ip(p->settings.voter_check);
    uint8_t ip_hash[TLY_IP_HASH_LEN];
    if (by_address) {
        if (!address_hash(app, req, p->poll_id, ip_hash)) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
            goto done;
        }
        tly_vote_t *other = tly_poll_find_ip(p, ip_hash);
        if (other != NULL) {
            respond_address_voted(req, other);
            goto done;
        }
    }
    int64_t now = tly_now_ms();
    if (!tly_poll_accepts_votes(p, now)) {
        const char *why = tly_poll_effective_status(p, now) == TLY_STATUS_CLOSED  ? "the poll is closed"
                          : tly_poll_effective_status(p, now) == TLY_STATUS_DRAFT ? "the poll is a draft"
                                                                                  : "the poll has not started yet";
        api_respond_error(req, 409, "POLL_NOT_ACTIVE", why,
                          json_pack("{s:s}", "status", tly_poll_status_name(tly_poll_effective_status(p, now))));
        goto done;
    }
    tly_ballot_t ballot;
    const char *field = NULL, *msg = NULL;
    switch (tly_ballot_parse(p, body, &ballot, &field, &msg)) {
    case TLY_BALLOT_OK:
        break;
    case TLY_BALLOT_UNKNOWN_OPTION:
        api_respond_error(req, 400, "INVALID_OPTION", msg ? msg : "no option with that id in this poll",
                          field ? json_pack("{s:s}", "field", field) : NULL);
        goto done;
    default:
        api_respond_validation(req, field, msg ? msg : "invalid ballot");
        goto done;
    }
    json_t *meta = json_object_get(body, "client_meta");
    char *client_meta = meta != NULL ? json_dumps(meta, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    waiter_t *w = tly_req_alloc(req, sizeof(*w));
    if ((meta != NULL && client_meta == NULL) || w == NULL) {
        tly_free(client_meta);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        goto done;
    }
    if (async && api_ingest_up(app) && app->ingest_bypass != req) {
        /* into the durable ingest log; a consumer (any instance) applies it */
        api_ingest_enqueue(app, req, p, caller.id, &ballot, idem, hash, by_address ? ip_hash : NULL, client_meta);
        tly_free(client_meta);
        goto done;
    }
    *w = (waiter_t){req, async, NULL};
    char request_id[24] = "";
    if (async)
        tly_random_id(request_id, "r_", 12);
    if (api_cast_submit(app, p, caller.id, &ballot, idem, hash, by_address ? ip_hash : NULL, client_meta, request_id,
                        now, w, NULL, NULL) != 0) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
    }
done:
    json_decref(body);
}

void api_votes_me(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    tly_vote_t *v = tly_poll_find_vote(p, caller.id);
    if (v == NULL || v->state != TLY_VOTE_COMMITTED) {
        api_respond_json(req, 200, json_pack("{s:b, s:[], s:n}", "has_voted", 0, "option_ids", "voted_at"));
        return;
    }
    char at[TLY_TIME_LEN];
    tly_time_format(v->recorded_at, at);
    api_respond_json(req, 200,
                     json_pack("{s:b, s:o, s:s, s:s, s:o}", "has_voted", 1, "option_ids", tly_vote_option_ids(p, v),
                               "voted_at", at, "vote_id", v->vote_id, "ballot", tly_ballot_to_json(p, v)));
}

void api_votes_request(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    size_t plen, rlen;
    const char *pid = tly_params_get(params, "poll_id", &plen);
    const char *rid = tly_params_get(params, "request_id", &rlen);
    vote_request_t *r = NULL;
    char key[sizeof(r->request_id)] = "", poll_id[TLY_POLL_ID_LEN + 1] = "";
    if (rlen < sizeof(key)) {
        memcpy(key, rid, rlen);
        key[rlen] = '\0';
        HASH_FIND_STR(app->requests, key, r);
    }
    if (plen < sizeof(poll_id))
        memcpy(poll_id, pid, plen);
    /* a request a device made before it was linked is its account's too */
    if (r == NULL || strcmp(api_person(app, r->voter_id), caller.id) != 0 || strlen(r->poll_id) != plen ||
        memcmp(r->poll_id, pid, plen) != 0) {
        /* another instance's request, or one still in the ingest log? */
        if (r == NULL && key[0] && (api_resync(app, req) || api_ingest_status(app, req, poll_id, key, caller.id)))
            return;
        api_respond_error(req, 404, "REQUEST_NOT_FOUND", "no vote request with that id for this voter", NULL);
        return;
    }
    json_t *o = json_pack("{s:s, s:s}", "request_id", r->request_id, "state", r->state);
    if (r->vote_id[0])
        json_object_set_new(o, "vote_id", json_string(r->vote_id));
    if (r->error[0])
        json_object_set_new(o, "error", json_pack("{s:s}", "code", r->error));
    api_respond_json(req, 200, o);
}

void api_receipts_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    size_t len;
    const char *rc = tly_params_get(params, "receipt", &len);
    tly_vote_t *v = NULL;
    if (len == TLY_RECEIPT_LEN) {
        char key[TLY_RECEIPT_LEN + 1];
        memcpy(key, rc, len);
        key[len] = '\0';
        v = tly_registry_find_receipt(app->registry, key);
    }
    if (v == NULL || v->state != TLY_VOTE_COMMITTED) {
        if (v == NULL && api_resync(app, req))
            return;
        api_respond_error(req, 404, "RECEIPT_NOT_FOUND", "no counted ballot has that receipt", NULL);
        return;
    }
    char at[TLY_TIME_LEN];
    tly_time_format(v->recorded_at, at);
    api_respond_json(req, 200,
                     json_pack("{s:b, s:s, s:s}", "counted", 1, "poll_id", v->poll->poll_id, "recorded_at", at));
}

/* ---- changing and retracting (allow_vote_change) ---- */

/* The checks PUT and DELETE share. Returns the caller's committed vote, or NULL after
 * answering. */
static tly_vote_t *own_vote_for_change(tly_app_t *app, tly_req_t *req, const tly_params_t *params, caller_t *caller,
                                       tly_poll_t **pp)
{
    if (!api_caller(app, req, true, caller) ||
        !api_limit_caller(app, req, API_LIMIT_VOTER, caller))
        return NULL;
    tly_poll_t *p = api_find_poll(app, req, params, caller);
    if (p == NULL)
        return NULL;
    *pp = p;
    if (caller->anonymous && !p->settings.allow_anonymous) {
        api_respond_error(req, 403, "FORBIDDEN", "this poll needs a registered voter; sign in to vote", NULL);
        return NULL;
    }
    if (api_link_guard(app, req, caller))
        return NULL;
    if (!p->settings.allow_vote_change) {
        api_respond_error(req, 409, "VOTE_CHANGE_NOT_ALLOWED", "this poll does not allow changing or retracting a vote",
                          NULL);
        return NULL;
    }
    int64_t now = tly_now_ms();
    if (!tly_poll_accepts_votes(p, now)) {
        api_respond_error(req, 409, "POLL_NOT_ACTIVE", "the poll is not open for voting",
                          json_pack("{s:s}", "status", tly_poll_status_name(tly_poll_effective_status(p, now))));
        return NULL;
    }
    tly_vote_t *v = tly_poll_find_vote(p, caller->id);
    ballot_op_t *busy = NULL;
    if (v != NULL)
        HASH_FIND_PTR(app->pending_ballots, &v, busy);
    if (v != NULL && (busy != NULL || v->state != TLY_VOTE_COMMITTED)) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 409, "VOTE_IN_PROGRESS", "an earlier request about this ballot is still being stored",
                          NULL);
        return NULL;
    }
    if (v == NULL && !api_resync(app, req))
        api_respond_error(req, 404, "VOTE_NOT_FOUND", "you have no ballot in this poll", NULL);
    return v;
}

/* A change or retraction the store did not take. */
static void respond_change_refused(tly_req_t *req, int result)
{
    if (result == TLY_ENOTFOUND)
        api_respond_error(req, 404, "VOTE_NOT_FOUND", "you have no ballot in this poll", NULL);
    else if (result == TLY_ESTATE)
        respond_finalised(req);
    else
        api_respond_store_error(req, result);
}

/* A shared store found no ballot to change or retract: another instance retracted it,
 * or linked its device to an account (the ballot is the account's now). The request
 * runs again once memory has caught up, and answers from there. */
static bool refused_stale(tly_app_t *app, tly_req_t *req, int result)
{
    return result == TLY_ENOTFOUND && tly_store_shared(app->store) && api_resync(app, req);
}

static void change_committed(tly_store_op_t *op)
{
    ballot_op_t *bo = op->ctx;
    tly_app_t *app = bo->app;
    HASH_DEL(app->pending_ballots, bo);
    api_end_async(app);
    tly_req_t *req = bo->waiters->req;
    if (refused_stale(app, req, op->result)) {
        tly_free(bo);
        return;
    }
    if (op->result == 0) {
        tly_vote_t *nv = NULL;
        uint8_t before[TLY_MAX_OPTIONS];
        size_t nbefore = bo->vote->nchoices;
        memcpy(before, bo->vote->data, nbefore);
        api_bus_count(app, bo->poll->poll_id, before, nbefore, bo->ballot.choices, bo->ballot.nchoices);
        if (tly_poll_change_vote(app->registry, bo->poll, bo->vote, &bo->ballot, op->u.ballot.recorded_at, &nv) != 0) {
            /* stored but not applied in memory: the next start recounts from the store */
            tly_log(TLY_LOG_ERROR, "vote change stored but not counted (out of memory)", "poll_id", bo->poll->poll_id,
                    NULL);
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        } else {
            respond_recorded(req, bo->poll, nv);
        }
    } else {
        respond_change_refused(req, op->result);
    }
    tly_free(bo);
}

static void retract_committed(tly_store_op_t *op)
{
    ballot_op_t *bo = op->ctx;
    tly_app_t *app = bo->app;
    HASH_DEL(app->pending_ballots, bo);
    api_end_async(app);
    tly_req_t *req = bo->waiters->req;
    if (refused_stale(app, req, op->result)) {
        tly_free(bo);
        return;
    }
    if (op->result == 0) {
        api_bus_count(app, bo->poll->poll_id, bo->vote->data, bo->vote->nchoices, NULL, 0);
        api_ingest_forget(app, bo->poll->poll_id, bo->vote->voter_id); /* may vote again */
        api_remember_retracted(app, bo->poll, bo->vote, op->u.ballot.recorded_at);
        tly_poll_retract_vote(app->registry, bo->poll, bo->vote, op->u.ballot.recorded_at);
        tly_req_respond(req, 204, NULL, "", 0);
    } else {
        respond_change_refused(req, op->result);
    }
    tly_free(bo);
}

static ballot_op_t *change_op_new(tly_app_t *app, tly_req_t *req, tly_poll_t *p, tly_vote_t *v)
{
    ballot_op_t *bo = tly_calloc(1, sizeof(*bo));
    waiter_t *w = tly_req_alloc(req, sizeof(*w));
    if (bo == NULL || w == NULL) {
        tly_free(bo);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return NULL;
    }
    *w = (waiter_t){req, false, NULL};
    bo->waiters = w;
    bo->app = app;
    bo->poll = p;
    bo->vote = v;
    bo->op.ctx = bo;
    tly_ballot_row_t *row = &bo->op.u.ballot;
    row->poll_id = p->poll_id;
    row->voter_id = v->voter_id;
    row->seq = v->store_seq;
    row->recorded_at = tly_now_ms();
    return bo;
}

void api_votes_change(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    tly_poll_t *p = NULL;
    tly_vote_t *v = own_vote_for_change(app, req, params, &caller, &p);
    if (v == NULL)
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    tly_ballot_t ballot;
    const char *field = NULL, *msg = NULL;
    tly_ballot_result_t br = tly_ballot_parse(p, body, &ballot, &field, &msg);
    json_decref(body);
    if (br == TLY_BALLOT_UNKNOWN_OPTION) {
        api_respond_error(req, 400, "INVALID_OPTION", msg ? msg : "no option with that id in this poll",
                          field ? json_pack("{s:s}", "field", field) : NULL);
        return;
    }
    if (br != TLY_BALLOT_OK) {
        api_respond_validation(req, field, msg ? msg : "invalid ballot");
        return;
    }
    ballot_op_t *bo = change_op_new(app, req, p, v);
    if (bo == NULL)
        return;
    bo->ballot = ballot;
    bo->op.type = TLY_OP_BALLOT_REPLACE;
    bo->op.done = change_committed;
    tly_ballot_row_t *row = &bo->op.u.ballot;
    row->nchoices = bo->ballot.nchoices;
    row->choices = bo->ballot.choices;
    row->scores = p->type == TLY_TYPE_SCORE ? bo->ballot.scores : NULL;
    /* the ballot keeps the Idempotency-Key and body hash of the POST that cast it, in
     * memory (core) and so in the store: a retry of that POST still replays */
    row->idem_key = v->idem_key;
    memcpy(row->body_hash, v->body_hash, 16);
    HASH_ADD_PTR(app->pending_ballots, vote, bo);
    api_begin_async(app);
    tly_store_submit(app->store, &bo->op);
}

void api_votes_retract(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    tly_poll_t *p = NULL;
    tly_vote_t *v = own_vote_for_change(app, req, params, &caller, &p);
    if (v == NULL)
        return;
    ballot_op_t *bo = change_op_new(app, req, p, v);
    if (bo == NULL)
        return;
    bo->op.type = TLY_OP_BALLOT_DELETE;
    bo->op.done = retract_committed;
    /* kept in the "revoked" audit row: a late retry of the cast is refused after a restart */
    bo->op.u.ballot.idem_key = v->idem_key;
    memcpy(bo->op.u.ballot.body_hash, v->body_hash, 16);
    HASH_ADD_PTR(app->pending_ballots, vote, bo);
    api_begin_async(app);
    tly_store_submit(app->store, &bo->op);
}
