/*
 * polls.c: create, read, change, delete and list polls. A change is answered only once
 * the store has committed it.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

static void respond_poll(tly_req_t *req, int status, const tly_poll_t *p)
{
    api_respond_json(req, status, tly_poll_to_json(p, tly_now_ms()));
}

/* p as JSON text (jansson's memory: free()), or NULL when out of memory. */
static char *json_dumps_poll(const tly_poll_t *p, int64_t now)
{
    json_t *j = tly_poll_to_json(p, now);
    uint64_t failed = tly_alloc_failures();
    char *s = j != NULL ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
    json_decref(j);
    if (s != NULL && tly_alloc_failures() != failed) { /* jansson may have left out a piece */
        free(s);
        s = NULL;
    }
    return s;
}

static void respond_created(tly_req_t *req, const tly_poll_t *p)
{
    char loc[64];
    snprintf(loc, sizeof(loc), "/v1/polls/%s", p->poll_id);
    tly_req_add_header(req, "Location", loc);
    respond_poll(req, 201, p);
}

/* ---- join codes ----
 *
 * Every poll that is open (a draft or active) holds a join code, which memory's registry
 * finds it by; a poll closing (by PATCH, or by its end_time once it is settled) gives its
 * code back. The codes are random; one that a poll in memory holds is never given, and
 * one the store finds taken all the same (a poll another instance made a moment ago, or
 * one of this instance's creates still in the writer) is drawn again (create_committed).
 * With 2^30 codes, even a million open polls leave the first draw free 999 times in a
 * thousand. */

#define CODE_DRAWS 16      /* codes tried against memory for one poll */
#define CODE_STORE_TRIES 8 /* creates the store refused for a taken code, in a row */

/* A code no poll in memory holds, into out; "" when CODE_DRAWS draws all were (not
 * seen with a billion codes: the poll then goes without one). */
static void draw_code(tly_app_t *app, char out[TLY_JOIN_CODE_LEN + 1])
{
    for (int i = 0; i < CODE_DRAWS; i++) {
        tly_join_code_random(out);
        if (tly_registry_find_code(app->registry, out) == NULL)
            return;
    }
    out[0] = '\0';
}

/* After a change of p (in the registry): an open poll without a code gets one (a poll
 * from before codes existed), a closed one gives its back. */
static void fit_code(tly_app_t *app, tly_poll_t *p, int64_t now)
{
    if (tly_poll_effective_status(p, now) == TLY_STATUS_CLOSED) {
        tly_registry_set_code(app->registry, p, NULL);
    } else if (p->join_code[0] == '\0') {
        char code[TLY_JOIN_CODE_LEN + 1];
        draw_code(app, code);
        tly_registry_set_code(app->registry, p, code);
    }
}

/* ---- create ---- */

static void create_committed(tly_store_op_t *op)
{
    poll_op_t *po = op->ctx;
    tly_app_t *app = po->app;
    tly_poll_t *p = po->poll;
    if (op->result == TLY_EEXIST && p->join_code[0] != '\0' && po->attempts < CODE_STORE_TRIES && !app->closing) {
        /* the code is taken in the store (poll ids are 96 random bits: it is the code) */
        po->attempts++;
        draw_code(app, p->join_code);
        memcpy(po->join_code, p->join_code, sizeof(po->join_code));
        op->u.poll.join_code = po->join_code[0] != '\0' ? po->join_code : NULL;
        tly_store_submit(app->store, op);
        return;
    }
    api_end_async(app);
    poll_idem_t *pi = NULL;
    if (p->idem_key != NULL) {
        size_t klen = strlen(p->owner_id) + strlen(p->idem_key) + 2;
        char *key = tly_malloc(klen);
        if (key != NULL) {
            snprintf(key, klen, "%s\n%s", p->owner_id, p->idem_key);
            HASH_FIND_STR(app->poll_idem, key, pi);
            tly_free(key);
        }
    }
    if (op->result == TLY_EAUTH) {
        /* A shared store: another instance linked the caller's device to an account
         * meanwhile. Once memory has the link the request runs again, as the account's. */
        if (pi != NULL) {
            HASH_DEL(app->poll_idem, pi);
            tly_free(pi->key);
            tly_free(pi);
        }
        tly_poll_free(p);
        if (!api_resync(app, po->req)) {
            tly_req_add_header(po->req, "Retry-After", "1");
            api_respond_error(po->req, 503, "UNAVAILABLE", "this device was linked to an account meanwhile; try again",
                              NULL);
        }
        poll_op_free(po);
        return;
    }
    if (op->result == 0 && tly_registry_add_poll(app->registry, p) != 0) {
        /* stored, but memory could not index it: the next start loads it */
        tly_log(TLY_LOG_ERROR, "poll stored but not loaded (out of memory)", "poll_id", p->poll_id, NULL);
        op->result = TLY_ENOMEM;
    }
    if (op->result == 0) {
        if (pi != NULL)
            pi->committed = true;
        respond_created(po->req, p);
    } else {
        if (pi != NULL) {
            HASH_DEL(app->poll_idem, pi);
            tly_free(pi->key);
            tly_free(pi);
        }
        api_respond_store_error(po->req, op->result);
        tly_poll_free(p);
    }
    poll_op_free(po);
}

void api_polls_create(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    char *idem;
    if (!api_caller(app, req, true, &caller) || !api_limit_caller(app, req, API_LIMIT_POLL, &caller) ||
        !api_idempotency_key(req, &idem) || api_link_guard(app, req, &caller))
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    uint8_t hash[16];
    api_body_hash(req, hash);
    poll_idem_t *pi = NULL;
    if (idem != NULL) {
        size_t klen = strlen(caller.id) + strlen(idem) + 2;
        char *key = tly_req_alloc(req, klen);
        snprintf(key, klen, "%s\n%s", caller.id, idem);
        HASH_FIND_STR(app->poll_idem, key, pi);
        if (pi != NULL) {
            tly_poll_t *prev = tly_registry_find_poll(app->registry, pi->poll_id);
            if (memcmp(pi->body_hash, hash, 16) != 0)
                api_respond_error(req, 422, "IDEMPOTENCY_KEY_REUSED",
                                  "this Idempotency-Key was used with a different request body", NULL);
            else if (!pi->committed)
                api_respond_error(req, 409, "REQUEST_IN_PROGRESS",
                                  "a request with this Idempotency-Key is still being processed; retry shortly", NULL);
            else if (prev == NULL)
                api_respond_error(req, 404, "POLL_NOT_FOUND", "the poll created with this key was deleted", NULL);
            else
                respond_created(req, prev);
            goto done;
        }
    }
    const char *field = NULL, *msg = NULL;
    char errbuf[256];
    int64_t now = tly_now_ms();
    tly_poll_t *p = tly_poll_from_json(body, caller.id, now, &field, &msg, errbuf, sizeof(errbuf));
    if (p == NULL && field == NULL && msg == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        goto done;
    }
    if (p == NULL) {
        api_respond_validation(req, field, msg ? msg : "invalid poll");
        goto done;
    }
    if (idem != NULL && (p->idem_key = tly_strdup(idem)) == NULL)
        goto oom;
    memcpy(p->body_hash, hash, 16);
    if (tly_poll_effective_status(p, now) != TLY_STATUS_CLOSED)
        draw_code(app, p->join_code); /* indexed when the poll joins the registry, committed */
    poll_op_t *po = poll_op_new(app, TLY_OP_POLL_INSERT, p);
    if (po == NULL)
        goto oom;
    if (idem != NULL) {
        pi = tly_calloc(1, sizeof(*pi));
        size_t klen = strlen(caller.id) + strlen(idem) + 2;
        if (pi == NULL || (pi->key = tly_malloc(klen)) == NULL) {
            tly_free(pi);
            poll_op_free(po);
            goto oom;
        }
        snprintf(pi->key, klen, "%s\n%s", caller.id, idem);
        memcpy(pi->poll_id, p->poll_id, sizeof(pi->poll_id));
        memcpy(pi->body_hash, hash, 16);
        HASH_ADD_KEYPTR(hh, app->poll_idem, pi->key, strlen(pi->key), pi);
    }
    po->poll = p;
    po->req = req;
    po->op.ctx = po;
    po->op.done = create_committed;
    api_begin_async(app);
    tly_store_submit(app->store, &po->op);
    goto done;
oom:
    tly_poll_free(p);
    tly_req_add_header(req, "Retry-After", "1");
    api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
done:
    json_decref(body);
}

/* ---- closing: the final tally ----
 *
 * One instance: the final results are frozen from memory once no ballot accepted before
 * the close is pending (tly_poll_freeze_results; a render does it too), and stored.
 *
 * Instances sharing the store: the first freeze the store takes is everyone's. This
 * instance catches up with the store (tly_store_sync), computes the final results from
 * memory, and offers them with the feed position memory is at (tly_poll_row_t.freeze).
 * The store takes them only if nothing changed the poll after that position, and from
 * then on refuses the poll's ballots, so every ballot in the store is in them and every
 * ballot acknowledged is in the store. Until then reads show the current counts, without
 * "final" (final_by_store). Another instance's freeze reaches memory through the feed
 * (tly_poll_adopt); one that found the poll changed is tried again after a new sync.
 */

#define SETTLE_ATTEMPTS 5 /* freezes refused (stale, or frozen elsewhere) in a row before the next read tries */

typedef struct {
    tly_app_t *app;
    char poll_id[TLY_POLL_ID_LEN + 1];
    int attempts;
} settle_t;

/* A read waiting for a settle under way to end (api_poll_await_final). */
struct final_wait {
    final_wait_t *next;
    tly_req_t *req;
    api_final_answer_fn answer;
    char poll_id[TLY_POLL_ID_LEN + 1];
};

static bool settle_now(tly_app_t *app, tly_poll_t *p, int64_t now, int attempts);
static bool settle_shared(tly_app_t *app, tly_poll_t *p, int attempts);

/* The settle of poll_id has ended (final results known, or not this time): the reads
 * waiting for it are answered with what memory has now. */
static void settle_end(tly_app_t *app, const char *poll_id)
{
    final_wait_t **pp = &app->final_waits;
    while (*pp != NULL) {
        final_wait_t *w = *pp;
        if (strcmp(w->poll_id, poll_id) != 0) {
            pp = &w->next;
            continue;
        }
        *pp = w->next;
        api_end_async(app);
        w->answer(app, w->req, poll_id); /* w is request memory: gone after this */
    }
}

bool api_poll_await_final(tly_app_t *app, tly_poll_t *p, tly_req_t *req, api_final_answer_fn answer)
{
    if (!p->settling || !p->final_by_store || tly_poll_final_results(p) != NULL)
        return false;
    final_wait_t *w = tly_req_alloc(req, sizeof(*w));
    if (w == NULL)
        return false; /* answered at once, with the current counts */
    w->req = req;
    w->answer = answer;
    memcpy(w->poll_id, p->poll_id, sizeof(w->poll_id));
    w->next = app->final_waits;
    app->final_waits = w;
    api_begin_async(app);
    return true;
}

static void settle_committed(tly_store_op_t *op)
{
    poll_op_t *po = op->ctx;
    tly_app_t *app = po->app;
    tly_poll_t *p = tly_registry_find_poll(app->registry, op->u.poll.poll_id);
    if (!op->u.poll.freeze) {
        if (op->result != 0) /* memory serves the frozen tally; the store gets it on the next change */
            tly_log(TLY_LOG_WARN, "final results not stored", "poll_id", op->u.poll.poll_id, NULL);
        poll_op_free(po);
        return;
    }
    bool again = false;
    if (p != NULL) {
        p->settling = false;
        if (op->result == 0 && tly_poll_final_results(p) == NULL) {
            if (tly_poll_set_final_results(p, po->final) != 0) /* out of memory: the store has them */
                tly_log(TLY_LOG_WARN, "final results stored but not in memory until the next load", "poll_id",
                        p->poll_id, NULL);
        } else if ((op->result == TLY_ESTATE || op->result == TLY_EEXIST) && !app->closing &&
                   po->attempts + 1 < SETTLE_ATTEMPTS) {
            /* the poll changed since memory's position, or another instance froze it
             * first: catch up (which brings the stored final results), and try again */
            again = settle_shared(app, p, po->attempts + 1);
        } else if (op->result != 0) {
            tly_log(TLY_LOG_WARN, "final results not stored; tried again on the next read", "poll_id", p->poll_id,
                    NULL);
        }
    }
    if (!again)
        settle_end(app, op->u.poll.poll_id);
    poll_op_free(po);
}

static void settle_synced(void *arg)
{
    settle_t *st = arg;
    tly_app_t *app = st->app;
    app->settling--;
    tly_poll_t *p = NULL;
    if (!app->closing) {
        api_follow_flush(app);
        p = tly_registry_find_poll(app->registry, st->poll_id);
    }
    if (p != NULL)
        p->settling = false;
    if (p == NULL || !settle_now(app, p, tly_now_ms(), st->attempts))
        settle_end(app, st->poll_id);
    tly_free(st);
}

/* Other instances' last changes must be in memory before the tally is computed: catch up
 * with the store first. Returns whether a sync was started. */
static bool settle_shared(tly_app_t *app, tly_poll_t *p, int attempts)
{
    settle_t *st = app->settling < 64 ? tly_calloc(1, sizeof(*st)) : NULL;
    if (st == NULL)
        return false; /* tried again on the next read */
    st->app = app;
    st->attempts = attempts;
    memcpy(st->poll_id, p->poll_id, sizeof(st->poll_id));
    app->settling++;
    p->settling = true;
    tly_store_sync(app->store, settle_synced, st);
    return true;
}

void api_poll_settle(tly_app_t *app, tly_poll_t *p, int64_t now)
{
    if (tly_poll_final_results(p) != NULL || tly_poll_effective_status(p, now) != TLY_STATUS_CLOSED || p->settling)
        return;
    if (tly_store_shared(app->store))
        settle_shared(app, p, 0);
    else
        settle_now(app, p, now, 0);
}

/* Freezes (one instance) or offers the store a freeze (shared store). Returns whether a
 * freeze went to a shared store (the settle goes on in settle_committed). */
static bool settle_now(tly_app_t *app, tly_poll_t *p, int64_t now, int attempts)
{
    if (tly_poll_final_results(p) != NULL || tly_poll_effective_status(p, now) != TLY_STATUS_CLOSED)
        return false;
    bool shared = tly_store_shared(app->store);
    char *final = NULL;
    if (shared ? tly_poll_render_final(p, now, &final) != 0 : tly_poll_freeze_results(p, now) != 0)
        return false;                              /* pending ballots, or out of memory: tried again on the next read */
    tly_registry_set_code(app->registry, p, NULL); /* closed: its code goes back */
    poll_op_t *po = poll_op_new(app, TLY_OP_POLL_UPDATE, p);
    if (po == NULL) {
        tly_free(final);
        return false;
    }
    if (shared) {
        po->final = final;
        po->attempts = attempts;
        po->op.u.poll.final_results = final;
        po->op.u.poll.freeze = 1;
        po->op.u.poll.freeze_after = tly_store_applied_seq(app->store);
        p->settling = true;
    }
    po->op.ctx = po;
    po->op.done = settle_committed;
    tly_store_submit(app->store, &po->op);
    return shared;
}

/* ---- read ---- */

void api_polls_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, false, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    int64_t now = tly_now_ms();
    api_poll_settle(app, p, now);
    char *json = json_dumps_poll(p, now);
    if (json == NULL) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    api_respond_cached(req, json, strlen(json), api_poll_cache(p, now));
    free(json);
}

/* ---- change ---- */

/* Puts p back as `before` (a copy of it taken ahead of a change the store did not take):
 * memory shows what the store has. false when out of memory (the change stays). */
static bool undo_patch(tly_poll_t *p, const poll_op_t *before)
{
    int rc;
    tly_poll_t *was = api_poll_build(&before->op.u.poll, &rc);
    if (was == NULL)
        return false;
    api_poll_adopt(before->app, p, was);
    return true;
}

static void patch_committed(tly_store_op_t *op)
{
    poll_op_t *po = op->ctx;
    api_end_async(po->app);
    if (op->result == 0) {
        tly_poll_t *p = tly_registry_find_poll(po->app->registry, op->u.poll.poll_id);
        if (p != NULL && tly_store_shared(po->app->store)) {
            /* Another instance's change committed before ours may have been applied
             * over ours meanwhile; ours is the later one, so it is what memory shows. */
            int rc;
            tly_poll_t *from = api_poll_build(&op->u.poll, &rc);
            if (from != NULL)
                api_poll_adopt(po->app, p, from);
        }
        if (p != NULL) {
            respond_poll(po->req, 200, p);
            api_poll_settle(po->app, p, tly_now_ms()); /* a close: the final tally */
        } else
            api_respond_error(po->req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
    } else {
        /* The change went live in memory before the store refused it: memory goes back
         * to the poll as it was (what the store still has), and the caller hears so. */
        tly_poll_t *p = tly_registry_find_poll(po->app->registry, op->u.poll.poll_id);
        bool undone = p == NULL || undo_patch(p, po->before);
        tly_log(TLY_LOG_ERROR,
                undone ? "poll change not stored; undone" : "poll change not stored; not undone (out of memory)",
                "poll_id", op->u.poll.poll_id, NULL);
        api_respond_store_error(po->req, op->result);
    }
    poll_op_free(po);
}

static bool owner_or_answer(tly_req_t *req, const tly_poll_t *p, const caller_t *caller)
{
    if (api_is_owner(p, caller))
        return true;
    api_respond_error(req, 403, "FORBIDDEN", "only the poll's owner may do that", NULL);
    return false;
}

static void count_row(void *ctx, const tly_audit_row_t *row) { (*(int *)ctx)++; }

/* Whether any ballot was ever cast in p (a one-row indexed read of the audit log). When
 * the store cannot answer, assume yes: refusing a change is the safe mistake. */
static bool has_history(tly_app_t *app, const tly_poll_t *p)
{
    tly_store_reader_t *r = api_reader(app);
    int n = 0;
    return r == NULL || tly_store_audit_page(r, p->poll_id, 0, 1, count_row, &n) != 0;
}

void api_polls_patch(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    /* A change (a close freezes the tally) is made on the store's latest state, not on
     * one this instance has not caught up with yet. */
    if (tly_store_shared(app->store) && app->redispatch != req && api_resync(app, req))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL || !owner_or_answer(req, p, &caller) || api_link_guard(app, req, &caller))
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    /* Ballots and audit rows name options by position: once a poll has any history (even
     * if every ballot was retracted since), replacing its options would rewrite it. */
    if (json_object_get(body, "options") != NULL && p->votes == NULL && has_history(app, p)) {
        json_decref(body);
        api_respond_error(req, 409, "POLL_HAS_VOTES", "options cannot change once a vote has been cast", NULL);
        return;
    }
    poll_op_t *before = poll_op_new(app, TLY_OP_POLL_UPDATE, p);
    if (before == NULL) {
        json_decref(body);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    const char *field = NULL, *msg = NULL;
    char errbuf[256];
    int rc = tly_poll_patch(p, body, tly_now_ms(), &field, &msg, errbuf, sizeof(errbuf));
    json_decref(body);
    if (rc != 0)
        poll_op_free(before);
    if (rc == TLY_EINVAL) {
        api_respond_validation(req, field, msg ? msg : "invalid change");
        return;
    }
    if (rc == TLY_ESTATE) {
        api_respond_error(req, 409, "INVALID_STATUS_TRANSITION",
                          msg ? msg : "the poll cannot move to that status from its current one", NULL);
        return;
    }
    if (rc == TLY_EEXIST) {
        api_respond_error(req, 409, "POLL_HAS_VOTES", msg ? msg : "options cannot change once a vote exists",
                          field ? json_pack("{s:s}", "field", field) : NULL);
        return;
    }
    if (rc != 0) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    p->updated_at = tly_now_ms();
    fit_code(app, p, p->updated_at);
    /* Closing freezes the final tally, stored with the change. Instances that share the
     * store freeze it once the close is stored (patch_committed: api_poll_settle), as
     * ballots other instances took before the close may still be on their way. */
    if (tly_poll_effective_status(p, p->updated_at) == TLY_STATUS_CLOSED && tly_poll_final_results(p) == NULL &&
        !tly_store_shared(app->store))
        tly_poll_freeze_results(p, p->updated_at);
    poll_op_t *po = poll_op_new(app, TLY_OP_POLL_UPDATE, p);
    if (po == NULL) {
        undo_patch(p, before);
        poll_op_free(before);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    po->before = before;
    po->req = req;
    po->op.ctx = po;
    po->op.done = patch_committed;
    api_begin_async(app);
    tly_store_submit(app->store, &po->op);
}

/* ---- delete ---- */

void api_poll_forget(tly_app_t *app, const char *poll_id)
{
    poll_mark_t *m;
    HASH_FIND_STR(app->deleting, poll_id, m);
    if (m != NULL) {
        HASH_DEL(app->deleting, m);
        tly_free(m);
    }
    tly_poll_t *p = tly_registry_find_poll(app->registry, poll_id);
    if (p != NULL)
        tly_registry_remove_poll(app->registry, p);
    /* the store deleted the poll's vote requests with it; so does memory */
    vote_request_t *r, *tmp;
    HASH_ITER(hh, app->requests, r, tmp) {
        if (strcmp(r->poll_id, poll_id) == 0)
            api_request_free(app, r); /* cppcheck-suppress uninitvar ; HASH_ITER sets r */
    }
}

void api_poll_mark_deleting(tly_app_t *app, const char *poll_id)
{
    poll_mark_t *m;
    HASH_FIND_STR(app->deleting, poll_id, m);
    if (m != NULL || (m = tly_calloc(1, sizeof(*m))) == NULL)
        return;
    snprintf(m->poll_id, sizeof(m->poll_id), "%s", poll_id);
    HASH_ADD_STR(app->deleting, poll_id, m);
}

static void delete_committed(tly_store_op_t *op)
{
    poll_op_t *po = op->ctx;
    tly_app_t *app = po->app;
    api_end_async(app);
    poll_mark_t *m;
    HASH_FIND_STR(app->deleting, op->u.poll.poll_id, m);
    if (m != NULL) {
        HASH_DEL(app->deleting, m);
        tly_free(m);
    }
    if (op->result == 0) {
        api_poll_forget(app, op->u.poll.poll_id);
        tly_req_respond(po->req, 204, NULL, "", 0);
    } else {
        api_respond_store_error(po->req, op->result);
    }
    poll_op_free(po);
}

void api_polls_delete(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL || !owner_or_answer(req, p, &caller) || api_link_guard(app, req, &caller))
        return;
    poll_op_t *po = poll_op_new(app, TLY_OP_POLL_DELETE, p);
    poll_mark_t *m = tly_calloc(1, sizeof(*m));
    if (po == NULL || m == NULL) {
        poll_op_free(po);
        tly_free(m);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    /* From now on the poll is gone for readers and voters; ballots already queued
     * commit before the delete (the writer keeps submission order). */
    memcpy(m->poll_id, p->poll_id, sizeof(m->poll_id));
    HASH_ADD_STR(app->deleting, poll_id, m);
    po->req = req;
    po->op.ctx = po;
    po->op.done = delete_committed;
    api_begin_async(app);
    tly_store_submit(app->store, &po->op);
}

/* ---- list ---- */

void api_polls_list(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    tly_str_t v;
    if (!tly_req_query_param(req, "mine", &v) || !(tly_str_eq(v, "1") || tly_str_eq(v, "true"))) {
        api_respond_validation(req, "mine", "listing needs mine=1: only your own polls can be listed");
        return;
    }
    long limit = 20;
    if (tly_req_query_param(req, "limit", &v)) {
        char *end;
        limit = strtol(v.ptr, &end, 10);
        if (v.len == 0 || *end != '\0' || limit < 1 || limit > 100) {
            api_respond_validation(req, "limit", "limit must be a whole number from 1 to 100");
            return;
        }
    }
    const char *after = NULL;
    if (tly_req_query_param(req, "cursor", &v) && v.len > 0) {
        tly_poll_t *c = v.len == TLY_POLL_ID_LEN ? tly_registry_find_poll(app->registry, v.ptr) : NULL;
        if (c == NULL || strcmp(c->owner_id, caller.id) != 0) {
            api_respond_validation(req, "cursor", "the cursor is not valid (it may refer to a deleted poll)");
            return;
        }
        after = v.ptr;
    }
    tly_poll_t *items[100];
    bool more = false;
    size_t n = tly_registry_list_owner(app->registry, caller.id, after, items, (size_t)limit, &more);
    json_t *arr = json_array();
    int64_t now = tly_now_ms();
    for (size_t i = 0; i < n; i++) {
        poll_mark_t *m;
        HASH_FIND_STR(app->deleting, items[i]->poll_id, m);
        if (m == NULL) /* a poll being deleted is already gone for readers */
            json_array_append_new(arr, tly_poll_to_json(items[i], now));
    }
    api_respond_json(req, 200,
                     json_pack("{s:o, s:o}", "items", arr, "next_cursor",
                               more && n > 0 ? json_string(items[n - 1]->poll_id) : json_null()));
}

/* ---- join codes: GET /v1/join/{code}, GET /j/{code} ---- */

/* The open poll holding the code in the path, or NULL: not a code, no poll holds it,
 * its poll is closed (its end_time passed: it keeps the code until settled, but nobody
 * joins a closed poll) or being deleted. *resyncing: the request waits for memory to
 * catch up with a shared store and runs again (a poll made on another instance a
 * moment ago); answer nothing then. */
static tly_poll_t *join_find(tly_app_t *app, tly_req_t *req, const tly_params_t *params, bool *resyncing)
{
    size_t len;
    const char *text = tly_params_get(params, "code", &len);
    char code[TLY_JOIN_CODE_LEN + 1];
    tly_poll_t *p = NULL;
    *resyncing = false;
    if (text != NULL && len <= 32 && tly_join_code_read(text, len, code))
        p = tly_registry_find_code(app->registry, code);
    poll_mark_t *m = NULL;
    if (p != NULL)
        HASH_FIND_STR(app->deleting, p->poll_id, m);
    if (p != NULL && (m != NULL || tly_poll_effective_status(p, tly_now_ms()) == TLY_STATUS_CLOSED))
        p = NULL;
    if (p == NULL && text != NULL && tly_join_code_read(text, len, code))
        *resyncing = api_resync(app, req);
    return p;
}

void api_join_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    bool resyncing;
    if (!api_caller(app, req, false, &caller) || !api_limit(app, req, API_LIMIT_JOIN, NULL))
        return;
    tly_poll_t *p = join_find(app, req, params, &resyncing);
    if (resyncing)
        return;
    /* a draft is its owner's until it opens, by code as by id */
    if (p != NULL && tly_poll_effective_status(p, tly_now_ms()) == TLY_STATUS_DRAFT && !api_is_owner(p, &caller))
        p = NULL;
    if (p == NULL) {
        api_respond_error(req, 404, "POLL_NOT_FOUND", "no open poll has that join code", NULL);
        return;
    }
    respond_poll(req, 200, p);
}

void api_join_redirect(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    bool resyncing;
    if (!api_limit(app, req, API_LIMIT_JOIN, NULL))
        return;
    tly_poll_t *p = join_find(app, req, params, &resyncing);
    if (resyncing)
        return;
    tly_req_add_header(req, "Cache-Control", "no-store"); /* a code changes hands once its poll closes */
    if (p == NULL) {
        /* the web app's page says so, in its words (a typo in a typed address) */
        if (!api_static_index(app, req, 404))
            api_respond_error(req, 404, "POLL_NOT_FOUND", "no open poll has that join code", NULL);
        return;
    }
    /* A draft's page too: the page asks the API with the visitor's token, which shows
     * the owner the draft and anyone else that it is not open. */
    char loc[8 + TLY_POLL_ID_LEN];
    snprintf(loc, sizeof(loc), "/p/%s", p->poll_id);
    tly_req_add_header(req, "Location", loc);
    tly_req_respond(req, 302, "text/plain; charset=utf-8", "", 0);
}
