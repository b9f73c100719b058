/*
 * link.c: one person, one ballot, across sign-up and sign-in.
 *
 * A person votes with an anonymous device token, then registers or logs in. Sent with
 * that token (`Authorization: Bearer`), POST /v1/auth/register and /login link the
 * device to the account (auth.c asks; this file does it): from then on the device's id
 * means the account everywhere. The store writes the link row and, in the same
 * transaction, rewrites the device's ballots to the account (where both voted in a poll
 * the earlier ballot stands and the later is retracted, audited as "revoked") and hands
 * the device's polls over (TLY_OP_DEVICE_LINK). Memory then does the same
 * (api_link_apply), and the answer says what was merged.
 *
 * Why rewrite rather than resolve at every read: one person is one voter id in the
 * store, so the one-ballot rule stays what it was (memory's voter map, PostgreSQL's
 * UNIQUE(poll_id, voter_id)) and load needs nothing new to rebuild it. What still names
 * the device (audit rows, vote requests, retracted keys) is read through api_person.
 *
 * The list: the store has no index by voter (SQLite since migration 6, and PostgreSQL's
 * keys start with the poll), so memory names the polls where the device has a ballot
 * (a scan of the registry, O(polls), once a link). For that list to be whole, the link
 * waits until this instance has no write about the device's or the account's ballots in
 * the store's queue, and from its start such writes are refused with 409
 * LINK_IN_PROGRESS (api_link_guard) until it is done: one commit. With a shared store,
 * other instances' changes the list could not know refuse the link (TLY_ESTATE); it is
 * then made again once memory has caught up.
 *
 * Threads: the loop thread only.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

/* Offers of one link a shared store may refuse because the feed moved under it before
 * the answer is 503: each refusal means a change of the device's or the account's
 * ballots on another instance within the last commit, which a person does not keep up. */
#define LINK_ATTEMPTS 5

struct linking {
    linking_t *next;
    tly_app_t *app;
    tly_req_t *req;
    int status;      /* of the answer: 201 register, 200 login */
    bool registered; /* the account was just created: it exists whatever becomes of the link */
    bool submitted;  /* the op is with the store */
    int attempts;
    char *device_id, *user_id;
    tly_store_op_t op;
    tly_link_ballot_t *ballots;
    char (*poll_ids)[TLY_POLL_ID_LEN + 1];
    size_t nballots, cap;
};

/* ---- the map ---- */

static device_link_t *find_link(tly_app_t *app, const char *device_id)
{
    device_link_t *l;
    HASH_FIND_STR(app->links, device_id, l);
    return l;
}

const char *api_linked_user(tly_app_t *app, const char *device_id)
{
    if (app->links == NULL)
        return NULL;
    device_link_t *l = find_link(app, device_id);
    return l != NULL ? l->user_id : NULL;
}

const char *api_person(tly_app_t *app, const char *id)
{
    const char *user = api_linked_user(app, id);
    return user != NULL ? user : id;
}

/* Adds device_id -> user_id. 0, TLY_EEXIST (the device is linked already: kept as it
 * is) or TLY_ENOMEM. */
static int add_link(tly_app_t *app, const char *device_id, const char *user_id)
{
    if (find_link(app, device_id) != NULL)
        return TLY_EEXIST;
    device_link_t *l = tly_calloc(1, sizeof(*l));
    if (l == NULL || (l->device_id = tly_strdup(device_id)) == NULL || (l->user_id = tly_strdup(user_id)) == NULL)
        goto fail;
    HASH_ADD_KEYPTR(hh, app->links, l->device_id, strlen(l->device_id), l);
    if (l->hh.tbl == NULL)
        goto fail;
    return 0;
fail:
    if (l != NULL) {
        tly_free(l->device_id);
        tly_free(l->user_id);
    }
    tly_free(l);
    return TLY_ENOMEM;
}

int api_link_from_row(tly_app_t *app, const tly_device_link_row_t *row, const char **why)
{
    /* a link to an account memory does not have would make the device no one */
    if (api_user_find(app, row->user_id) == NULL) {
        *why = "no user with this user_id";
        return TLY_EINVAL;
    }
    int rc = add_link(app, row->device_id, row->user_id);
    if (rc == TLY_EEXIST)
        *why = "a second row with this device_id";
    return rc == TLY_EEXIST ? TLY_EINVAL : rc;
}

/* ---- links under way ---- */

bool api_link_busy(tly_app_t *app, const char *id)
{
    for (linking_t *k = app->linking; k != NULL; k = k->next)
        if (strcmp(k->device_id, id) == 0 || strcmp(k->user_id, id) == 0)
            return true;
    return false;
}

bool api_link_guard(tly_app_t *app, tly_req_t *req, const caller_t *caller)
{
    if (app->linking == NULL || !caller->present ||
        !(api_link_busy(app, caller->id) || (caller->device != NULL && api_link_busy(app, caller->device))))
        return false;
    tly_req_add_header(req, "Retry-After", "1");
    api_respond_error(req, 409, "LINK_IN_PROGRESS",
                      "this device is being linked to an account right now; try again in a moment", NULL);
    return true;
}

static void linking_free(linking_t *k)
{
    tly_app_t *app = k->app;
    for (linking_t **p = &app->linking; *p != NULL; p = &(*p)->next)
        if (*p == k) {
            *p = k->next;
            break;
        }
    tly_free(k->op.u.link.polls_moved);
    tly_free(k->ballots);
    tly_free(k->poll_ids);
    tly_free(k->device_id);
    tly_free(k->user_id);
    tly_free(k);
}

/* The "linked" member of an answer: what was merged (filled by api_link_apply). */
static json_t *summary_new(const char *device_id, bool already)
{
    return json_pack("{s:s, s:i, s:i, s:[], s:[], s:b}", "device_id", device_id, "ballots", 0, "polls", 0, "retracted",
                     "kept_both", "already_linked", already);
}

/* Answers the request and ends the link. linked: as api_respond_token takes it. */
static void finish(linking_t *k, json_t *linked)
{
    tly_app_t *app = k->app;
    api_end_async(app);
    api_respond_token(app, k->req, k->status, k->user_id, linked);
    linking_free(k);
}

/* The link was not made: a new account is still the answer (with "linked": null, so the
 * client knows to log in with the device token again); a login hears why. */
static void fail(linking_t *k, int result)
{
    tly_app_t *app = k->app;
    if (k->registered) {
        finish(k, json_null());
        return;
    }
    api_end_async(app);
    if (result == TLY_EEXIST)
        api_respond_error(k->req, 409, "DEVICE_LINKED",
                          "this device token belongs to another account; sign in without it", NULL);
    else if (app->closing) {
        tly_req_add_header(k->req, "Retry-After", "1");
        api_respond_error(k->req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
    } else if (result == TLY_ESTATE) {
        tly_req_add_header(k->req, "Retry-After", "1");
        api_respond_error(k->req, 503, "UNAVAILABLE",
                          "the device's ballots kept changing on other instances while it was being linked; try "
                          "again",
                          NULL);
    } else
        api_respond_store_error(k->req, result);
    linking_free(k);
}

typedef struct {
    linking_t *k;
    int64_t now;
    int rc;
} gather_t;

/* One poll of the registry: an entry when the device has a ballot there. */
static void gather(void *ctx, tly_poll_t *p)
{
    gather_t *g = ctx;
    linking_t *k = g->k;
    tly_vote_t *dv = g->rc == 0 ? tly_poll_find_vote(p, k->device_id) : NULL;
    if (dv == NULL || dv->state != TLY_VOTE_COMMITTED)
        return;
    if (k->nballots == k->cap) {
        size_t cap = k->cap ? 2 * k->cap : 16;
        tly_link_ballot_t *b = tly_realloc(k->ballots, cap * sizeof(*b));
        if (b != NULL)
            k->ballots = b;
        char(*ids)[TLY_POLL_ID_LEN + 1] = b != NULL ? tly_realloc(k->poll_ids, cap * sizeof(*ids)) : NULL;
        if (ids == NULL) {
            g->rc = TLY_ENOMEM;
            return;
        }
        k->poll_ids = ids;
        k->cap = cap;
    }
    tly_vote_t *uv = tly_poll_find_vote(p, k->user_id);
    memcpy(k->poll_ids[k->nballots], p->poll_id, sizeof(k->poll_ids[0]));
    k->ballots[k->nballots] = (tly_link_ballot_t){.device_seq = dv->store_seq,
                                                  .user_seq = uv != NULL ? uv->store_seq : 0,
                                                  .closed = !tly_poll_accepts_votes(p, g->now)};
    k->nballots++;
}

static void link_done(tly_store_op_t *op);

/* Makes the list and hands the link to the store, unless this instance still has writes
 * about the device's or the account's ballots queued (api_link_kick tries again). */
static void try_submit(linking_t *k)
{
    tly_app_t *app = k->app;
    if (k->submitted || api_votes_pending_for(app, k->device_id) || api_votes_pending_for(app, k->user_id))
        return;
    /* another device of the same account being linked: its ballots become the account's
     * at its commit, and this list must see them as the account's */
    for (linking_t *o = app->linking; o != NULL; o = o->next)
        if (o != k && o->submitted && strcmp(o->user_id, k->user_id) == 0)
            return;
    gather_t g = {k, tly_now_ms(), 0};
    k->nballots = 0;
    tly_registry_each_poll(app->registry, gather, &g);
    if (g.rc != 0) {
        fail(k, g.rc);
        return;
    }
    for (size_t i = 0; i < k->nballots; i++)
        k->ballots[i].poll_id = k->poll_ids[i];
    tly_free(k->op.u.link.polls_moved);
    k->op = (tly_store_op_t){.type = TLY_OP_DEVICE_LINK, .done = link_done, .ctx = k};
    k->op.u.link = (tly_link_row_t){.device_id = k->device_id,
                                    .user_id = k->user_id,
                                    .at = g.now,
                                    .nballots = k->nballots,
                                    .ballots = k->ballots,
                                    .after = tly_store_applied_seq(app->store)};
    k->submitted = true;
    tly_store_submit(app->store, &k->op);
}

void api_link_kick(tly_app_t *app)
{
    linking_t *k = app->linking;
    while (k != NULL) {
        linking_t *next = k->next; /* try_submit may end k */
        if (!k->submitted)
            try_submit(k);
        k = next;
    }
}

/* After a sync: memory has caught up with what made the store refuse the link. */
static void link_caught_up(void *arg)
{
    linking_t *k = arg;
    tly_app_t *app = k->app;
    if (app->closing) {
        fail(k, TLY_EIO);
        return;
    }
    api_follow_flush(app);
    const char *user = api_linked_user(app, k->device_id);
    if (user != NULL) { /* linked meanwhile, here or elsewhere */
        if (strcmp(user, k->user_id) == 0)
            finish(k, summary_new(k->device_id, true));
        else
            fail(k, TLY_EEXIST);
        return;
    }
    try_submit(k);
}

static void link_done(tly_store_op_t *op)
{
    linking_t *k = op->ctx;
    tly_app_t *app = k->app;
    k->submitted = false;
    if (op->result == 0) {
        json_t *summary = summary_new(k->device_id, false);
        api_link_apply(app, &op->u.link, true, summary);
        finish(k, summary);
        return;
    }
    if (!app->closing && ((op->result == TLY_ESTATE && ++k->attempts < LINK_ATTEMPTS) || op->result == TLY_EEXIST)) {
        /* the feed moved under the list, or the device is linked already (by a request
         * on another instance, or one memory has not seen): catch up, then decide */
        tly_store_sync(app->store, link_caught_up, k);
        return;
    }
    fail(k, op->result);
}

void api_link_device(tly_app_t *app, tly_req_t *req, int status, const char *device_id, const char *user_id,
                     bool registered)
{
    const char *user = api_linked_user(app, device_id);
    if (user != NULL || api_link_busy(app, device_id)) {
        /* linked already, or being linked by another request: to this account it is done
         * (or about to be); to another, the device is someone else's */
        if (user != NULL && strcmp(user, user_id) == 0) {
            api_respond_token(app, req, status, user_id, summary_new(device_id, true));
        } else if (registered) {
            api_respond_token(app, req, status, user_id, json_null());
        } else if (user == NULL) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 409, "LINK_IN_PROGRESS",
                              "this device is being linked to an account right now; try again in a moment", NULL);
        } else {
            api_respond_error(req, 409, "DEVICE_LINKED",
                              "this device token belongs to another account; sign in without it", NULL);
        }
        return;
    }
    linking_t *k = tly_calloc(1, sizeof(*k));
    if (k == NULL || (k->device_id = tly_strdup(device_id)) == NULL || (k->user_id = tly_strdup(user_id)) == NULL) {
        if (k != NULL)
            tly_free(k->device_id);
        tly_free(k);
        if (registered) {
            api_respond_token(app, req, status, user_id, json_null());
            return;
        }
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    k->app = app;
    k->req = req;
    k->status = status;
    k->registered = registered;
    k->next = app->linking;
    app->linking = k; /* from here on the device's and the account's ballot writes wait */
    api_begin_async(app);
    try_submit(k);
}

void api_links_free(tly_app_t *app)
{
    while (app->linking != NULL)
        fail(app->linking, TLY_EIO); /* waiting for writes that will not come now */
    device_link_t *l, *tmp;
    HASH_ITER(hh, app->links, l, tmp) {
        HASH_DEL(app->links, l);
        tly_free(l->device_id);
        tly_free(l->user_id);
        tly_free(l);
    }
}

/* ---- a committed link into memory ---- */

/* A ballot the link retracted: as a retraction (votes.c, follow.c) leaves memory. */
static void retract(tly_app_t *app, tly_poll_t *p, tly_vote_t *v, int64_t at, bool own, json_t *retracted,
                    const char *whose)
{
    if (retracted != NULL)
        json_array_append_new(
            retracted, json_pack("{s:s, s:s, s:s}", "poll_id", p->poll_id, "vote_id", v->vote_id, "ballot", whose));
    if (own) /* the committing instance moves the live counters in Redis */
        api_bus_count(app, p->poll_id, v->data, v->nchoices, NULL, 0);
    api_remember_retracted(app, p, v, at); /* a late retry of its POST: 409, as after any retraction */
    tly_poll_retract_vote(app->registry, p, v, at);
}

static void rekey(tly_poll_t *p, tly_vote_t *v, const char *user_id)
{
    if (tly_poll_rekey_vote(p, v, user_id) != 0)
        /* stored, but memory still files it under the device: the next start has it right */
        tly_log(TLY_LOG_ERROR, "linked ballot stored but not moved in memory", "poll_id", p->poll_id, NULL);
}

/* The create Idempotency-Key of a poll handed over: "owner\nkey" follows its owner, so
 * that a retry of the create (the device's token, now the account) finds it. */
static void rekey_poll_idem(tly_app_t *app, const tly_poll_t *p, const char *from)
{
    if (p->idem_key == NULL)
        return;
    poll_idem_t *pi;
    size_t n = strlen(from) + strlen(p->idem_key) + 2, m = strlen(p->owner_id) + strlen(p->idem_key) + 2;
    char *old = tly_malloc(n), *key = tly_malloc(m);
    if (old == NULL || key == NULL)
        goto out;
    snprintf(old, n, "%s\n%s", from, p->idem_key);
    snprintf(key, m, "%s\n%s", p->owner_id, p->idem_key);
    HASH_FIND_STR(app->poll_idem, old, pi);
    if (pi == NULL)
        goto out;
    HASH_DEL(app->poll_idem, pi);
    tly_free(pi->key);
    pi->key = key;
    key = NULL;
    HASH_ADD_KEYPTR(hh, app->poll_idem, pi->key, strlen(pi->key), pi);
    if (pi->hh.tbl == NULL) { /* out of memory: a retry of the create would make a second poll */
        tly_free(pi->key);
        tly_free(pi);
    }
out:
    tly_free(old);
    tly_free(key);
}

void api_link_apply(tly_app_t *app, const tly_link_row_t *l, bool own, json_t *summary)
{
    json_t *retracted = summary ? json_object_get(summary, "retracted") : NULL;
    json_t *kept = summary ? json_object_get(summary, "kept_both") : NULL;
    int moved = 0, polls = 0;
    for (size_t i = 0; i < l->nballots; i++) {
        const tly_link_ballot_t *e = &l->ballots[i];
        tly_poll_t *p = tly_registry_find_poll(app->registry, e->poll_id);
        if (p == NULL)
            continue; /* deleted here since */
        tly_vote_t *dv = tly_poll_find_vote(p, l->device_id), *uv = tly_poll_find_vote(p, l->user_id);
        switch ((tly_link_outcome_t)e->outcome) {
        case TLY_LINK_MOVED:
            if (dv != NULL)
                rekey(p, dv, l->user_id);
            moved++;
            break;
        case TLY_LINK_KEPT_DEVICE:
            if (uv != NULL)
                retract(app, p, uv, l->at, own, retracted, "account");
            if (dv != NULL)
                rekey(p, dv, l->user_id);
            moved++;
            break;
        case TLY_LINK_KEPT_ACCOUNT:
            if (dv != NULL)
                retract(app, p, dv, l->at, own, retracted, "device");
            break;
        case TLY_LINK_KEPT_BOTH:
            if (kept != NULL)
                json_array_append_new(kept, json_string(p->poll_id));
            break;
        case TLY_LINK_GONE:
            break;
        }
    }
    for (size_t i = 0; i < l->npolls_moved; i++) {
        tly_poll_t *p = tly_registry_find_poll(app->registry, l->polls_moved[i]);
        polls++;
        if (p == NULL || strcmp(p->owner_id, l->device_id) != 0)
            continue;
        if (tly_registry_set_owner(app->registry, p, l->user_id) != 0)
            tly_log(TLY_LOG_ERROR, "linked poll stored but not moved in memory", "poll_id", p->poll_id, NULL);
        else
            rekey_poll_idem(app, p, l->device_id);
    }
    if (add_link(app, l->device_id, l->user_id) == TLY_ENOMEM)
        /* the device's token acts as itself here until the next start */
        tly_log(TLY_LOG_ERROR, "device link stored but not kept in memory (out of memory)", NULL);
    if (summary != NULL) {
        json_object_set_new(summary, "ballots", json_integer(moved));
        json_object_set_new(summary, "polls", json_integer(polls));
    }
}
