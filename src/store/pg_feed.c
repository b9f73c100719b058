/*
 * pg_feed.c: the change feed of the PostgreSQL store, and the one delivery order of
 * everything tly_store_reap runs.
 *
 * The feed: every committed batch that changed anything is one row (seq, origin, ops),
 * seq being the commit order across all instances (pg.c says why). `ops` is a JSON
 * array with one object per op of the batch that succeeded, in order, carrying every
 * field needed to rebuild the tly_store_op_t (pg_op_json); the writer's statements take
 * the very same JSON as their parameter.
 *
 * Delivery. next_seq is the first feed seq not yet queued for reap. Three producers
 * append to the reap queue, under fmu, strictly in seq order:
 *  - the follower thread reads `feed WHERE seq >= next_seq` every 100 ms (at once when
 *    poked or when a sync waits) and queues each row another instance wrote (a FEED
 *    item: its ops go to the follow callback one by one);
 *  - the writer queues its own batch (an OPS item: its done callbacks) when the
 *    batch's place comes: at once if everything before its seq is already queued (a
 *    single instance never waits for the follower), else when the follower gets there.
 *    A batch that wrote no feed row (it failed or changed nothing) needs no place in the
 *    feed; it only keeps its place among this instance's batches (submission order);
 *  - sync requests are queued once next_seq has passed the feed_head seq read after the
 *    request and the ops submitted before it are queued.
 * Own rows are recognised by token: every batch's feed row carries one (the high half
 * random per run, the low half the writer's batch count), and the writer queues the
 * batch's item with it, marked "committing", before it sends the statement that commits
 * (the row cannot be visible earlier). The follower never passes a row whose token is a
 * committing item's: the writer learns the seq only with the commit (a batch of ballots
 * is one statement), and until it has it nothing behind that row may be queued.
 * Committed: the item gets its seq, and the row is the writer's to queue. Failed: the
 * token goes, and should the row exist after all (the connection died while the commit
 * went through) it is delivered as foreign: the done callbacks have already said TLY_EIO,
 * and the follow callback now says what did happen. Rows of this origin whose token no
 * item holds (an earlier run) are foreign too.
 */
#include "store/pg_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FOLLOW_INTERVAL_US 100000
#define FOLLOW_PAGE 500
#define FOLLOW_BACKOFF_MIN_US 100000
#define FOLLOW_BACKOFF_MAX_US 2000000

/* ---- hex --------------------------------------------------------------------------- */

/* bytea's text output is "\x" and hex; JSON fields are bare hex. */
int pg_unhex(const char *hex, uint8_t *out, size_t cap)
{
    if (hex[0] == '\\' && hex[1] == 'x')
        hex += 2;
    return tly_hex_decode(hex, strlen(hex), out, cap);
}

/* ---- ops as JSON ------------------------------------------------------------------- */

/* Sets o[k] to v, or appends v to the array o when k is NULL. */
static int put(json_t *o, const char *k, json_t *v)
{
    if (v == NULL)
        return TLY_ENOMEM;
    if (k == NULL)
        return json_array_append_new(o, v) == 0 ? 0 : TLY_ENOMEM;
    return json_object_set_new(o, k, v) == 0 ? 0 : TLY_ENOMEM;
}

static int put_str(json_t *o, const char *k, const char *v)
{
    json_t *j = v != NULL ? json_string(v) : json_null();
    if (j == NULL)
        return tly_utf8_length(v, strlen(v)) < 0 ? TLY_EINVAL : TLY_ENOMEM;
    return put(o, k, j);
}

static int put_int(json_t *o, const char *k, int64_t v) { return put(o, k, json_integer((json_int_t)v)); }

/* Bytes as hex; NULL stays null. At most 255 bytes (choices, scores, hashes). */
static int put_bytes(json_t *o, const char *k, const uint8_t *p, size_t n)
{
    char buf[2 * 255 + 1];
    if (p == NULL && n == 0 && strcmp(k, "choices") == 0)
        return put(o, k, json_string(""));
    if (p == NULL)
        return put(o, k, json_null());
    tly_hex_encode(p, n, buf);
    return put(o, k, json_string(buf));
}

/* An all-zero hash means "none" and is stored as NULL, so it reads back as zeros. */
static int put_hash(json_t *o, const char *k, const uint8_t h[16])
{
    static const uint8_t zero[16];
    return put_bytes(o, k, memcmp(h, zero, 16) == 0 ? NULL : h, 16);
}

static int poll_json(json_t *o, const tly_poll_row_t *p)
{
    int rc;
    json_t *opts;
    if ((rc = put_str(o, "poll_id", p->poll_id)) || (rc = put_str(o, "owner_id", p->owner_id)) ||
        (rc = put_str(o, "title", p->title)) || (rc = put_str(o, "description", p->description)) ||
        (rc = put_int(o, "type", p->type)) || (rc = put_int(o, "status", p->status)) ||
        (rc = put_int(o, "start_time", p->start_time)) || (rc = put_int(o, "end_time", p->end_time)) ||
        (rc = put_str(o, "settings", p->settings_json)) || (rc = put_int(o, "created_at", p->created_at)) ||
        (rc = put_int(o, "updated_at", p->updated_at)) || (rc = put_str(o, "idem_key", p->idem_key)) ||
        (rc = put_hash(o, "body_hash", p->body_hash)) || (rc = put_str(o, "final_results", p->final_results)) ||
        (rc = put_str(o, "join_code", p->join_code)))
        return rc;
    if ((opts = json_array()) == NULL || json_object_set_new(o, "options", opts) != 0)
        return TLY_ENOMEM;
    if (p->noptions > 0 && p->options == NULL)
        return TLY_EINVAL;
    for (size_t i = 0; i < p->noptions; i++) {
        const tly_option_row_t *r = &p->options[i];
        json_t *x = json_object();
        if (x == NULL || json_array_append_new(opts, x) != 0)
            return TLY_ENOMEM;
        if ((rc = put_int(x, "position", r->position)) || (rc = put_str(x, "option_id", r->option_id)) ||
            (rc = put_str(x, "text", r->text)) || (rc = put_int(x, "display_order", r->display_order)))
            return rc;
    }
    return 0;
}

static int ballot_json(json_t *o, const tly_ballot_row_t *b, tly_op_type_t type)
{
    int rc;
    if ((rc = put_str(o, "poll_id", b->poll_id)) || (rc = put_str(o, "voter_id", b->voter_id)) ||
        (rc = put_int(o, "recorded_at", b->recorded_at)))
        return rc;
    if ((rc = put_str(o, "idem_key", b->idem_key)) || (rc = put_hash(o, "body_hash", b->body_hash)))
        return rc;
    if (type == TLY_OP_BALLOT_DELETE)
        return 0; /* the key and hash of the retracted ballot's request, for its audit row */
    if ((rc = put_bytes(o, "choices", b->nchoices ? b->choices : NULL, b->nchoices)) ||
        (rc = put_bytes(o, "scores", b->scores, b->nchoices)))
        return rc;
    if (type == TLY_OP_BALLOT_REPLACE)
        return 0; /* vote_id, receipt, client_meta and request_id: ignored by a change */
    if ((rc = put_str(o, "vote_id", b->vote_id)) || (rc = put_str(o, "receipt", b->receipt)) ||
        (rc = put_str(o, "client_meta", b->client_meta)) || (rc = put_str(o, "request_id", b->request_id)) ||
        (rc = put_bytes(o, "ip_hash", b->ip_hash, 16)))
        return rc;
    return 0;
}

/* A link: who with whom, the list the caller made, and (once the store ran it) what was
 * done: each ballot's outcome, the polls moved. The statements read device_id, user_id,
 * at, after and ballots[].poll_id/closed; the feed carries the rest. */
static int link_json(json_t *o, const tly_link_row_t *l)
{
    int rc;
    json_t *arr;
    if ((rc = put_str(o, "device_id", l->device_id)) || (rc = put_str(o, "user_id", l->user_id)) ||
        (rc = put_int(o, "at", l->at)) || (rc = put_int(o, "after", l->after)))
        return rc;
    if ((arr = json_array()) == NULL || json_object_set_new(o, "ballots", arr) != 0)
        return TLY_ENOMEM;
    if (l->nballots > 0 && l->ballots == NULL)
        return TLY_EINVAL;
    for (size_t i = 0; i < l->nballots; i++) {
        const tly_link_ballot_t *e = &l->ballots[i];
        json_t *x = json_object();
        if (x == NULL || json_array_append_new(arr, x) != 0)
            return TLY_ENOMEM;
        if ((rc = put_str(x, "poll_id", e->poll_id)) || (rc = put(x, "closed", json_boolean(e->closed))) ||
            (rc = put_int(x, "outcome", e->outcome)))
            return rc;
    }
    if ((arr = json_array()) == NULL || json_object_set_new(o, "polls_moved", arr) != 0)
        return TLY_ENOMEM;
    for (size_t i = 0; i < l->npolls_moved; i++)
        if ((rc = put_str(arr, NULL, l->polls_moved[i])) != 0)
            return rc;
    return 0;
}

json_t *pg_op_json(const tly_store_op_t *op, int *rc)
{
    json_t *o = json_object();
    *rc = TLY_ENOMEM;
    if (o == NULL || put_int(o, "t", op->type) != 0)
        goto fail;
    switch (op->type) {
    case TLY_OP_USER_INSERT: {
        const tly_user_row_t *u = &op->u.user;
        if ((*rc = put_str(o, "user_id", u->user_id)) || (*rc = put_str(o, "username", u->username)) ||
            (*rc = put_str(o, "password_hash", u->password_hash)) || (*rc = put_str(o, "email", u->email)) ||
            (*rc = put_int(o, "created_at", u->created_at)))
            goto fail;
        break;
    }
    case TLY_OP_POLL_INSERT:
    case TLY_OP_POLL_UPDATE:
        if ((*rc = poll_json(o, &op->u.poll)) != 0)
            goto fail;
        break;
    case TLY_OP_POLL_DELETE:
        if ((*rc = put_str(o, "poll_id", op->u.poll.poll_id)) != 0)
            goto fail;
        break;
    case TLY_OP_BALLOT_INSERT:
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE:
        if ((*rc = ballot_json(o, &op->u.ballot, op->type)) != 0)
            goto fail;
        break;
    case TLY_OP_DEVICE_LINK:
        if ((*rc = link_json(o, &op->u.link)) != 0)
            goto fail;
        break;
    default:
        *rc = TLY_EINVAL;
        goto fail;
    }
    *rc = 0;
    return o;
fail:
    json_decref(o);
    return NULL;
}

json_t *pg_request_json(const tly_ballot_row_t *b)
{
    json_t *o = json_object();
    if (o == NULL || put_int(o, "t", TLY_OP_REQUEST) || put_str(o, "request_id", b->request_id) ||
        put_str(o, "poll_id", b->poll_id) || put_str(o, "voter_id", b->voter_id) || put_str(o, "state", "failed") ||
        put_str(o, "vote_id", NULL) || put_str(o, "error", "ALREADY_VOTED") ||
        put_int(o, "created_at", b->recorded_at)) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ---- JSON back into ops (owning thread, in reap) ------------------------------------ */

typedef struct {
    uint8_t choices[256], scores[256], body_hash[16], ip_hash[16];
    tly_option_row_t options[256];
    tly_link_ballot_t *link_ballots; /* a link's lists, allocated: decoded_free */
    char **link_polls;
} decoded_t;

static const char *gs(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k)); /* NULL for null or absent */
}

static int64_t gi(const json_t *o, const char *k) { return (int64_t)json_integer_value(json_object_get(o, k)); }

static int gbytes(const json_t *o, const char *k, uint8_t *out, size_t cap, const uint8_t **p, int *n)
{
    const char *h = gs(o, k);
    *p = NULL;
    *n = 0;
    if (h == NULL)
        return 0;
    if ((*n = pg_unhex(h, out, cap)) < 0)
        return -1;
    *p = out;
    return 0;
}

static int ghash(const json_t *o, const char *k, uint8_t h[16])
{
    const uint8_t *p;
    int n;
    memset(h, 0, 16);
    if (gbytes(o, k, h, 16, &p, &n) != 0 || (p != NULL && n != 16))
        return -1;
    return 0;
}

static void decoded_free(decoded_t *d)
{
    tly_free(d->link_ballots);
    tly_free(d->link_polls);
    d->link_ballots = NULL;
    d->link_polls = NULL;
}

/* A link's row from its feed entry; its lists are allocated into d. 0, TLY_EINVAL
 * (malformed) or TLY_ENOMEM. */
static int link_from_json(const json_t *o, tly_link_row_t *l, decoded_t *d)
{
    const json_t *ballots = json_object_get(o, "ballots"), *polls = json_object_get(o, "polls_moved");
    tly_strlist_t moved = {0};
    *l = (tly_link_row_t){
        .device_id = gs(o, "device_id"), .user_id = gs(o, "user_id"), .at = gi(o, "at"), .after = gi(o, "after")};
    if (l->device_id == NULL || l->user_id == NULL || !json_is_array(ballots) || !json_is_array(polls))
        return TLY_EINVAL;
    size_t n = json_array_size(ballots);
    tly_link_ballot_t *b = n > 0 ? tly_calloc(n, sizeof *b) : NULL;
    if (n > 0 && b == NULL)
        return TLY_ENOMEM;
    d->link_ballots = b;
    for (size_t i = 0; i < n; i++) {
        const json_t *x = json_array_get(ballots, i);
        b[i] = (tly_link_ballot_t){.poll_id = gs(x, "poll_id"),
                                   .closed = json_is_true(json_object_get(x, "closed")),
                                   .outcome = (int)gi(x, "outcome")};
        if (b[i].poll_id == NULL)
            return TLY_EINVAL;
    }
    l->ballots = b;
    l->nballots = n;
    for (size_t i = 0; i < json_array_size(polls); i++) {
        const char *id = json_string_value(json_array_get(polls, i));
        if (id == NULL) {
            tly_free(moved.buf);
            return TLY_EINVAL;
        }
        if (tly_strlist_add(&moved, id) != 0) {
            tly_free(moved.buf);
            return TLY_ENOMEM;
        }
    }
    if (tly_strlist_take(&moved, &d->link_polls, &l->npolls_moved) != 0)
        return TLY_ENOMEM;
    l->polls_moved = d->link_polls;
    return 0;
}

static int op_from_json(const json_t *o, tly_store_op_t *op, decoded_t *d)
{
    int n, ns;
    const uint8_t *p;
    memset(op, 0, sizeof *op);
    if (!json_is_object(o) || !json_is_integer(json_object_get(o, "t")))
        return TLY_EINVAL;
    op->type = (tly_op_type_t)gi(o, "t");
    switch (op->type) {
    case TLY_OP_REQUEST:
        op->u.request = (tly_request_row_t){gs(o, "request_id"), gs(o, "poll_id"), gs(o, "voter_id"),  gs(o, "state"),
                                            gs(o, "vote_id"),    gs(o, "error"),   gi(o, "created_at")};
        return op->u.request.request_id != NULL ? 0 : -1;
    case TLY_OP_USER_INSERT:
        op->u.user = (tly_user_row_t){gs(o, "user_id"), gs(o, "username"), gs(o, "password_hash"), gs(o, "email"),
                                      gi(o, "created_at")};
        return op->u.user.user_id != NULL ? 0 : -1;
    case TLY_OP_POLL_DELETE:
        op->u.poll.poll_id = gs(o, "poll_id");
        return op->u.poll.poll_id != NULL ? 0 : -1;
    case TLY_OP_POLL_INSERT:
    case TLY_OP_POLL_UPDATE: {
        tly_poll_row_t *pr = &op->u.poll;
        const json_t *opts = json_object_get(o, "options");
        pr->poll_id = gs(o, "poll_id");
        pr->owner_id = gs(o, "owner_id");
        pr->title = gs(o, "title");
        pr->description = gs(o, "description");
        pr->type = (int)gi(o, "type");
        pr->status = (int)gi(o, "status");
        pr->start_time = gi(o, "start_time");
        pr->end_time = gi(o, "end_time");
        pr->settings_json = gs(o, "settings");
        pr->created_at = gi(o, "created_at");
        pr->updated_at = gi(o, "updated_at");
        pr->idem_key = gs(o, "idem_key");
        pr->final_results = gs(o, "final_results");
        pr->join_code = gs(o, "join_code");
        if (pr->poll_id == NULL || ghash(o, "body_hash", pr->body_hash) != 0 || json_array_size(opts) > 256)
            return TLY_EINVAL;
        for (size_t i = 0; i < json_array_size(opts); i++) {
            const json_t *x = json_array_get(opts, i);
            d->options[i] = (tly_option_row_t){gs(x, "option_id"), gs(x, "text"), (int)gi(x, "display_order"),
                                               (int)gi(x, "position")};
        }
        pr->noptions = json_array_size(opts);
        pr->options = d->options;
        return 0;
    }
    case TLY_OP_BALLOT_INSERT:
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE: {
        tly_ballot_row_t *b = &op->u.ballot;
        b->poll_id = gs(o, "poll_id");
        b->voter_id = gs(o, "voter_id");
        b->vote_id = gs(o, "vote_id");
        b->receipt = gs(o, "receipt");
        b->recorded_at = gi(o, "recorded_at");
        b->idem_key = gs(o, "idem_key");
        b->client_meta = gs(o, "client_meta");
        b->request_id = gs(o, "request_id");
        if (b->poll_id == NULL || b->voter_id == NULL)
            return TLY_EINVAL;
        if (gbytes(o, "choices", d->choices, 255, &p, &n) != 0)
            return TLY_EINVAL;
        b->nchoices = (uint8_t)n;
        b->choices = n > 0 ? p : NULL;
        if (gbytes(o, "scores", d->scores, 255, &p, &ns) != 0 || (p != NULL && ns != n))
            return TLY_EINVAL;
        b->scores = p;
        if (ghash(o, "body_hash", b->body_hash) != 0)
            return TLY_EINVAL;
        if (gbytes(o, "ip_hash", d->ip_hash, 16, &p, &n) != 0 || (p != NULL && n != 16))
            return TLY_EINVAL;
        b->ip_hash = p;
        return 0;
    }
    case TLY_OP_DEVICE_LINK:
        return link_from_json(o, &op->u.link, d);
    default:
        return TLY_EINVAL;
    }
}

static void deliver(pg_store_t *s, const json_t *ops)
{
    decoded_t d;
    tly_store_op_t op;
    d.link_ballots = NULL;
    d.link_polls = NULL;
    for (size_t i = 0; i < json_array_size(ops); i++) {
        int rc = op_from_json(json_array_get(ops, i), &op, &d);
        if (rc != 0) {
            /* out of memory for a link's lists: like a malformed entry, logged; the
             * instance then lags what the store holds until it restarts */
            tly_log(TLY_LOG_ERROR,
                    rc == TLY_ENOMEM ? "store: out of memory for an op of the postgres feed; skipped"
                                     : "store: malformed op in the postgres feed; skipped",
                    NULL);
            decoded_free(&d);
            continue;
        }
        if (s->follow_cb != NULL)
            s->follow_cb(s->follow_ctx, &op);
        decoded_free(&d);
    }
}

/* ---- the delivery order (fmu held) ------------------------------------------------------ */

static void rq_append(pg_store_t *s, pg_item_t *it)
{
    it->next = NULL;
    if (s->rq_tail != NULL)
        s->rq_tail->next = it;
    else
        s->rq_head = it;
    s->rq_tail = it;
}

/* Own batches whose place has come, then syncs that are due. Returns 1 when something
 * was queued. */
static int release(pg_store_t *s)
{
    int queued = 0;
    pg_item_t *h;
    while ((h = s->pend_head) != NULL) {
        if (h->committing)
            break;
        if (h->seq != 0) {
            if (h->seq > s->next_seq)
                break; /* foreign rows before it are not queued yet */
            if (h->seq == s->next_seq)
                s->next_seq++;
        }
        s->pend_head = h->next;
        if (s->pend_head == NULL)
            s->pend_tail = NULL;
        s->released += h->nops;
        rq_append(s, h);
        queued = 1;
    }
    while ((h = s->sync_head) != NULL && h->target >= 0 && s->next_seq > h->target && s->released >= h->sub) {
        s->sync_head = h->next;
        if (s->sync_head == NULL)
            s->sync_tail = NULL;
        h->seq = s->next_seq - 1;
        rq_append(s, h);
        queued = 1;
    }
    return queued;
}

static void notify(pg_store_t *s)
{
    if (s->conf.notify != NULL)
        s->conf.notify(s->conf.notify_arg);
}

/* An item must exist for every batch (its done callbacks have no other way to run):
 * allocation is retried rather than failed. */
static pg_item_t *must_alloc(void)
{
    pg_item_t *it;
    int logged = 0;
    while ((it = tly_calloc(1, sizeof *it)) == NULL) {
        if (!logged++)
            tly_log(TLY_LOG_ERROR, "store: out of memory for a finished batch; retrying", NULL);
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    return it;
}

pg_item_t *pg_feed_sending(pg_store_t *s, tly_store_op_t *first, uint64_t nops, int64_t token)
{
    pg_item_t *it = must_alloc();
    it->kind = PG_ITEM_OPS;
    it->ops = first;
    it->nops = nops;
    it->token = token;
    it->committing = 1;
    pthread_mutex_lock(&s->fmu);
    if (s->pend_tail != NULL)
        s->pend_tail->next = it;
    else
        s->pend_head = it;
    s->pend_tail = it;
    pthread_mutex_unlock(&s->fmu);
    return it;
}

void pg_feed_batch_done(pg_store_t *s, pg_item_t *it, tly_store_op_t *first, uint64_t nops, int committed, int64_t seq,
                        uint64_t commit_us)
{
    pg_item_t *fresh = it == NULL ? must_alloc() : NULL;
    int queued, waited = 0;

    pthread_mutex_lock(&s->fmu);
    if (fresh != NULL) {
        fresh->kind = PG_ITEM_OPS;
        fresh->ops = first;
        fresh->nops = nops;
        if (s->pend_tail != NULL)
            s->pend_tail->next = fresh;
        else
            s->pend_head = fresh;
        s->pend_tail = fresh;
    } else {
        waited = it->waited;
        it->committing = 0;
        it->seq = committed ? seq : 0;
        if (!committed)
            it->token = 0; /* not ours after all: if the row exists, it is foreign */
    }
    if (committed) {
        s->stats.batches++;
        s->stats.ops += nops;
        s->stats.last_batch_size = nops;
        s->stats.last_commit_us = commit_us;
        s->stats.batch_hist[(size_t)tly_store_hist_bucket(tly_store_batch_bounds, nops)]++;
        s->stats.commit_hist[(size_t)tly_store_hist_bucket(tly_store_commit_us_bounds, commit_us)]++;
        s->stats.batch_sum += nops;
        s->stats.commit_us_sum += commit_us;
    } else {
        s->stats.failed_batches++;
    }
    queued = release(s);
    if (s->pend_head != NULL || waited) {
        /* Waiting for rows of other instances before it, or the follower stopped at
         * this batch's row: read on now. */
        s->poked = 1;
        pthread_cond_signal(&s->fcv);
    }
    pthread_mutex_unlock(&s->fmu);
    if (queued)
        notify(s);
}

void pg_feed_start(pg_store_t *s, int64_t next_seq, int from_load)
{
    pthread_mutex_lock(&s->fmu);
    if (!s->following) {
        if (from_load)
            s->next_seq = next_seq;
        s->following = 1;
        pthread_cond_signal(&s->fcv);
    }
    pthread_mutex_unlock(&s->fmu);
}

void pg_feed_wake(pg_store_t *s)
{
    pthread_mutex_lock(&s->fmu);
    s->poked = 1;
    pthread_cond_signal(&s->fcv);
    pthread_mutex_unlock(&s->fmu);
}

void pg_sync(pg_store_t *s, void (*cb)(void *arg), void *arg)
{
    pg_item_t *it = tly_calloc(1, sizeof *it);
    if (it == NULL) {
        /* Out of memory: the caller still gets its callback, only sooner. */
        tly_log(TLY_LOG_ERROR, "store: out of memory for a sync; answering at once", NULL);
        cb(arg);
        return;
    }
    it->kind = PG_ITEM_SYNC;
    it->cb = cb;
    it->arg = arg;
    it->target = -1;
    pthread_mutex_lock(&s->mu);
    it->sub = s->submitted;
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_lock(&s->fmu);
    if (s->sync_tail != NULL)
        s->sync_tail->next = it;
    else
        s->sync_head = it;
    s->sync_tail = it;
    s->following = 1;
    pthread_cond_signal(&s->fcv);
    pthread_mutex_unlock(&s->fmu);
}

void pg_feed_flush(pg_store_t *s)
{
    pg_item_t *h;
    pthread_mutex_lock(&s->fmu);
    while ((h = s->pend_head) != NULL) {
        s->pend_head = h->next;
        rq_append(s, h);
    }
    s->pend_tail = NULL;
    while ((h = s->sync_head) != NULL) {
        s->sync_head = h->next;
        rq_append(s, h);
    }
    s->sync_tail = NULL;
    pthread_mutex_unlock(&s->fmu);
}

void pg_free_items(pg_item_t *it)
{
    while (it != NULL) {
        pg_item_t *next = it->next;
        json_decref(it->feed);
        tly_free(it);
        it = next;
    }
}

void pg_reap(pg_store_t *s)
{
    pg_item_t *it, *next;
    pthread_mutex_lock(&s->fmu);
    it = s->rq_head;
    s->rq_head = s->rq_tail = NULL;
    pthread_mutex_unlock(&s->fmu);
    for (; it != NULL; it = next) {
        next = it->next;
        if (it->seq > s->applied)
            s->applied = it->seq;
        switch (it->kind) {
        case PG_ITEM_OPS: {
            tly_store_op_t *op = it->ops, *onext;
            for (; op != NULL; op = onext) {
                onext = op->next; /* done may free op */
                if (op->done != NULL)
                    op->done(op);
            }
            break;
        }
        case PG_ITEM_FEED:
            deliver(s, it->feed);
            break;
        case PG_ITEM_SYNC:
            it->cb(it->arg);
            break;
        }
        json_decref(it->feed);
        tly_free(it);
    }
}

/* ---- the follower thread -------------------------------------------------------------- */

typedef struct {
    int64_t us, backoff_us, retry_at_us;
} follow_clock_t;

static int follower_conn(pg_store_t *s, follow_clock_t *fc)
{
    if (s->fconn != NULL && !pg_conn_lost(s->fconn))
        return 1;
    if (s->fconn != NULL) {
        PQfinish(s->fconn);
        s->fconn = NULL;
        tly_log(TLY_LOG_ERROR, "store: postgres follower connection lost", NULL);
        fc->backoff_us = FOLLOW_BACKOFF_MIN_US;
        fc->retry_at_us = pg_now_us() + fc->backoff_us;
        return 0;
    }
    if (pg_now_us() < fc->retry_at_us)
        return 0;
    if ((s->fconn = pg_connect(s, "follower")) == NULL) {
        fc->backoff_us = fc->backoff_us * 2 > FOLLOW_BACKOFF_MAX_US ? FOLLOW_BACKOFF_MAX_US : fc->backoff_us * 2;
        fc->retry_at_us = pg_now_us() + fc->backoff_us;
        return 0;
    }
    fc->backoff_us = FOLLOW_BACKOFF_MIN_US;
    tly_log(TLY_LOG_INFO, "store: postgres follower reconnected", NULL);
    return 1;
}

/* The feed_head seq now; -1 when it cannot be read. */
static int64_t read_head(pg_store_t *s)
{
    int64_t head = -1;
    PGresult *res = PQexec(s->fconn, "SELECT seq FROM feed_head");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        head = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    else
        pg_log_error("store: postgres feed head read failed", s->fconn, res);
    PQclear(res);
    return head;
}

static pg_item_t *feed_item(const char *text)
{
    json_error_t err;
    pg_item_t *it = tly_calloc(1, sizeof *it);
    if (it == NULL)
        return NULL;
    uint64_t failures = tly_alloc_failures();
    it->kind = PG_ITEM_FEED;
    it->feed = json_loads(text, 0, &err);
    if (it->feed == NULL && tly_alloc_failures() != failures) {
        tly_free(it); /* out of memory, not a bad row: again at the next round */
        return NULL;
    }
    if (it->feed == NULL) /* malformed: delivered as nothing rather than stalling */
        tly_log(TLY_LOG_ERROR, "store: malformed row in the postgres feed; skipped", NULL);
    return it;
}

/*
 * Reads pages of the feed from next_seq on and queues what may be queued. Returns when
 * the feed is exhausted, a row of our own batch still committing is reached (the writer
 * pokes once it knows), or on error.
 */
static void catch_up(pg_store_t *s)
{
    for (;;) {
        char from[24];
        const char *params[1] = {from};
        int64_t next;
        pg_item_t **items = NULL;
        int n, done_rows = 0, blocked = 0, queued = 0;

        pthread_mutex_lock(&s->fmu);
        next = s->next_seq;
        pthread_mutex_unlock(&s->fmu);
        snprintf(from, sizeof from, "%lld", (long long)next);
        PGresult *res =
            PQexecParams(s->fconn, "SELECT seq, origin, ops, token FROM feed WHERE seq >= $1 ORDER BY seq LIMIT 500", 1,
                         NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            pg_log_error("store: postgres feed read failed", s->fconn, res);
            PQclear(res);
            return;
        }
        n = PQntuples(res);
        if (n > 0 && (items = tly_calloc((size_t)n, sizeof *items)) == NULL) {
            PQclear(res);
            return;
        }
        /* Parse foreign rows outside the lock; rows of our origin are usually our own
         * batches, parsed only if they turn out not to be. */
        for (int i = 0; i < n; i++) {
            if (strcmp(PQgetvalue(res, i, 1), s->origin) == 0)
                continue;
            if ((items[i] = feed_item(PQgetvalue(res, i, 2))) == NULL)
                break;
        }

        pthread_mutex_lock(&s->fmu);
        for (int i = 0; i < n; i++, done_rows++) {
            int64_t seq = strtoll(PQgetvalue(res, i, 0), NULL, 10);
            pg_item_t *own = NULL;
            if (seq < s->next_seq)
                continue; /* queued meanwhile by the writer */
            if (seq > s->next_seq) {
                /* The rows before it are gone: deleted by retention before we read them.
                 * What this instance holds in memory can no longer be trusted to match
                 * the store; it stops accepting writes until restarted (and loaded). */
                char a[24], b[24];
                snprintf(a, sizeof a, "%lld", (long long)s->next_seq);
                snprintf(b, sizeof b, "%lld", (long long)seq);
                tly_log(TLY_LOG_ERROR, "store: fell behind the postgres feed retention; restart this instance",
                        "expected_seq", a, "found_seq", b, NULL);
                atomic_store(&s->behind, 1);
                s->next_seq = seq;
                queued |= release(s);
            }
            if (!PQgetisnull(res, i, 3) && strcmp(PQgetvalue(res, i, 1), s->origin) == 0) {
                int64_t token = strtoll(PQgetvalue(res, i, 3), NULL, 10);
                for (pg_item_t *p = s->pend_head; p != NULL && token != 0; p = p->next)
                    if (p->token == token) {
                        own = p;
                        break;
                    }
            }
            if (own != NULL) {
                if (own->committing) {
                    own->waited = 1;
                    blocked = 1;
                    break;
                }
                queued |= release(s);
                if (s->next_seq == seq) { /* cannot happen: batches before it are out */
                    blocked = 1;
                    break;
                }
                continue;
            }
            if (items[i] == NULL && strcmp(PQgetvalue(res, i, 1), s->origin) == 0)
                items[i] = feed_item(PQgetvalue(res, i, 2)); /* an earlier run of ours */
            if (items[i] == NULL) {
                blocked = 1; /* out of memory: again at the next round */
                break;
            }
            items[i]->seq = seq;
            rq_append(s, items[i]);
            items[i] = NULL;
            s->next_seq = seq + 1;
            queued = 1;
            release(s);
        }
        queued |= release(s);
        pthread_mutex_unlock(&s->fmu);
        if (queued)
            notify(s);
        for (int i = 0; i < n; i++)
            if (items[i] != NULL)
                pg_free_items(items[i]);
        tly_free(items);
        PQclear(res);
        if (blocked || n < FOLLOW_PAGE || done_rows < n)
            return;
    }
}

void *pg_follower_main(void *arg)
{
    pg_store_t *s = arg;
    pthread_setname_np(pthread_self(), "tally-follower");
    follow_clock_t fc = {.backoff_us = FOLLOW_BACKOFF_MIN_US};
    int64_t deadline = 0;

    for (;;) {
        int reading = 0, queued = 0;
        pthread_mutex_lock(&s->fmu);
        for (;;) {
            int unread = 0;
            int64_t now = pg_now_us(), due = now + 1000000;
            if (s->fstopping)
                break;
            for (pg_item_t *q = s->sync_head; q != NULL && !unread; q = q->next)
                unread = q->target == -1;
            if (s->following && (s->poked || unread || now >= deadline))
                break;
            if (s->following)
                due = deadline;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            int64_t ns = ts.tv_nsec + (due - now) * 1000;
            ts.tv_sec += ns / 1000000000;
            ts.tv_nsec = ns % 1000000000;
            pthread_cond_timedwait(&s->fcv, &s->fmu, &ts);
        }
        if (s->fstopping) {
            pthread_mutex_unlock(&s->fmu);
            break;
        }
        s->poked = 0;
        /* Syncs asked before this head read are answered by it; later ones by the next. */
        for (pg_item_t *q = s->sync_head; q != NULL; q = q->next)
            if (q->target == -1) {
                q->target = -2;
                reading = 1;
            }
        pthread_mutex_unlock(&s->fmu);

        int up = follower_conn(s, &fc);
        if (reading) {
            int64_t head = up ? read_head(s) : -1;
            if (head < 0) {
                head = 0; /* cannot read: the sync is answered, after the failure */
                if (up && pg_conn_lost(s->fconn))
                    up = follower_conn(s, &fc);
            }
            pthread_mutex_lock(&s->fmu);
            for (pg_item_t *q = s->sync_head; q != NULL; q = q->next)
                if (q->target == -2)
                    q->target = head;
            queued = release(s);
            pthread_mutex_unlock(&s->fmu);
            if (queued)
                notify(s);
        }
        if (up) {
            catch_up(s);
            if (pg_conn_lost(s->fconn))
                follower_conn(s, &fc);
        }
        deadline = pg_now_us() + FOLLOW_INTERVAL_US;
    }
    return NULL;
}
