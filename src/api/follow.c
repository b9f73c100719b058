/*
 * follow.c: what other instances sharing the store committed, applied to this instance's
 * memory, and the two ways a request waits for memory to catch up.
 *
 * With a shared store (PostgreSQL) every instance holds the same state in memory: the
 * fold of the store's change feed (store.h, tly_store_follow). The store hands us the
 * other instances' operations in commit order, between our own done callbacks, and we
 * apply them with the same core functions our own writes use, so live results, receipts,
 * dedup and idempotent replays work whichever instance a request reaches.
 *
 * One conflict needs care: an operation about a ballot (or username, or poll) on which
 * this instance has its own write in flight. Our write is then about to fail or to land
 * on top of theirs, and its done callback holds pointers into memory that the foreign
 * operation would free or replace. So such an operation waits in `deferred` until our
 * write is done, then applies (api_follow_flush). Only that key waits; the rest goes on.
 *
 * Misses: memory may lag the store by the feed's delay (a few ms with the bus, at most a
 * follow period without). A request that finds no poll, ballot, vote request or user
 * where another instance may just have made one asks the store to catch up
 * (tly_store_sync) and runs once more (api_resync); the second run answers whatever it
 * finds. A ballot refused by the store as a duplicate that memory did not know waits the
 * same way (votes.c), so a retry that lands on another instance is answered like a retry
 * on the first one.
 *
 * Threads: the loop thread only.
 */
#include <string.h>
#include <strings.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

struct deferred {
    deferred_t *next;
    tly_store_op_t op; /* strings and arrays point into buf (a link's lists: below) */
    uint8_t ip_hash[TLY_IP_HASH_LEN];
    tly_link_ballot_t *link_ballots; /* a link's, allocated apart (alignment) */
    char **link_polls;
    char buf[];
};

static void deferred_free(deferred_t *d)
{
    tly_free(d->link_ballots);
    tly_free(d->link_polls);
    tly_free(d);
}

/* A link's lists, copied into d (its ids into buf at *cur). 0 or TLY_ENOMEM. */
static int copy_link(deferred_t *d, const tly_link_row_t *l, char **cur);

static size_t slen(const char *s) { return s ? strlen(s) + 1 : 0; }

static const char *put(char **cur, const char *s)
{
    if (s == NULL)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = *cur;
    memcpy(d, s, n);
    *cur += n;
    return d;
}

static int copy_link(deferred_t *d, const tly_link_row_t *l, char **cur)
{
    tly_link_row_t *c = &d->op.u.link;
    tly_strlist_t moved = {0};
    *c = *l;
    c->device_id = put(cur, l->device_id);
    c->user_id = put(cur, l->user_id);
    c->ballots = NULL;
    c->polls_moved = NULL;
    if (l->nballots > 0 && (d->link_ballots = tly_calloc(l->nballots, sizeof(*d->link_ballots))) == NULL)
        return TLY_ENOMEM;
    for (size_t i = 0; i < l->nballots; i++) {
        d->link_ballots[i] = l->ballots[i];
        d->link_ballots[i].poll_id = put(cur, l->ballots[i].poll_id);
    }
    c->ballots = d->link_ballots;
    for (size_t i = 0; i < l->npolls_moved; i++)
        if (tly_strlist_add(&moved, l->polls_moved[i]) != 0) {
            tly_free(moved.buf);
            return TLY_ENOMEM;
        }
    if (tly_strlist_take(&moved, &d->link_polls, &c->npolls_moved) != 0)
        return TLY_ENOMEM;
    c->polls_moved = d->link_polls;
    return 0;
}

/* A copy of the kinds of operation that may have to wait (users, ballots, poll deletes,
 * device links). */
static deferred_t *deferred_new(const tly_store_op_t *op)
{
    size_t need = 0;
    const tly_user_row_t *u = &op->u.user;
    const tly_ballot_row_t *b = &op->u.ballot;
    const tly_link_row_t *l = &op->u.link;
    if (op->type == TLY_OP_USER_INSERT) {
        need = slen(u->user_id) + slen(u->username) + slen(u->password_hash) + slen(u->email);
    } else if (op->type == TLY_OP_POLL_DELETE) {
        need = slen(op->u.poll.poll_id);
    } else if (op->type == TLY_OP_DEVICE_LINK) {
        need = slen(l->device_id) + slen(l->user_id);
        for (size_t i = 0; i < l->nballots; i++)
            need += slen(l->ballots[i].poll_id);
    } else
        need = slen(b->poll_id) + slen(b->voter_id) + slen(b->vote_id) + slen(b->receipt) + slen(b->idem_key) +
               slen(b->request_id) + 2 * (size_t)b->nchoices;
    deferred_t *d = tly_calloc(1, sizeof(*d) + need);
    if (d == NULL)
        return NULL;
    d->op.type = op->type;
    char *cur = d->buf;
    if (op->type == TLY_OP_USER_INSERT) {
        tly_user_row_t *c = &d->op.u.user;
        *c = *u;
        c->user_id = put(&cur, u->user_id);
        c->username = put(&cur, u->username);
        c->password_hash = put(&cur, u->password_hash);
        c->email = put(&cur, u->email);
    } else if (op->type == TLY_OP_POLL_DELETE) {
        d->op.u.poll.poll_id = put(&cur, op->u.poll.poll_id);
    } else if (op->type == TLY_OP_DEVICE_LINK) {
        if (copy_link(d, l, &cur) != 0) {
            deferred_free(d);
            return NULL;
        }
    } else {
        tly_ballot_row_t *c = &d->op.u.ballot;
        *c = *b;
        c->poll_id = put(&cur, b->poll_id);
        c->voter_id = put(&cur, b->voter_id);
        c->vote_id = put(&cur, b->vote_id);
        c->receipt = put(&cur, b->receipt);
        c->idem_key = put(&cur, b->idem_key);
        c->request_id = put(&cur, b->request_id);
        c->client_meta = NULL; /* never read back into memory */
        if (b->nchoices > 0 && b->choices != NULL) {
            memcpy(cur, b->choices, b->nchoices);
            c->choices = (const uint8_t *)cur;
            cur += b->nchoices;
        }
        if (b->nchoices > 0 && b->scores != NULL) {
            memcpy(cur, b->scores, b->nchoices);
            c->scores = (const uint8_t *)cur;
        }
        if (b->ip_hash != NULL) {
            memcpy(d->ip_hash, b->ip_hash, TLY_IP_HASH_LEN);
            c->ip_hash = d->ip_hash;
        }
    }
    return d;
}

/* Whether this instance has a write in flight that op must wait for. */
static bool blocked(tly_app_t *app, const tly_store_op_t *op)
{
    switch (op->type) {
    case TLY_OP_USER_INSERT: {
        user_t *u = api_user_find_name(app, op->u.user.username);
        return u != NULL && !u->committed;
    }
    case TLY_OP_POLL_DELETE: {
        tly_poll_t *p = tly_registry_find_poll(app->registry, op->u.poll.poll_id);
        return p != NULL && api_votes_busy(app, p, NULL);
    }
    case TLY_OP_BALLOT_INSERT:
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE: {
        tly_poll_t *p = tly_registry_find_poll(app->registry, op->u.ballot.poll_id);
        tly_vote_t *v = p ? tly_poll_find_vote(p, op->u.ballot.voter_id) : NULL;
        return v != NULL && api_votes_busy(app, p, v);
    }
    case TLY_OP_DEVICE_LINK:
        /* our writes about the device's or the account's ballots hold pointers to votes
         * the link retracts or files anew; each of them commits after the link (which
         * refuses them, or they land on the account's ballots) */
        return api_votes_pending_for(app, op->u.link.device_id) || api_votes_pending_for(app, op->u.link.user_id);
    default:
        return false;
    }
}

static void log_failed(const char *what, const char *id, int rc)
{
    char code[16];
    snprintf(code, sizeof(code), "%d", rc);
    tly_log(rc == TLY_ENOMEM ? TLY_LOG_ERROR : TLY_LOG_WARN, what, "id", id, "error", code, NULL);
}

static void apply_ballot(tly_app_t *app, const tly_store_op_t *op)
{
    const tly_ballot_row_t *row = &op->u.ballot;
    tly_poll_t *p = tly_registry_find_poll(app->registry, row->poll_id);
    if (p == NULL)
        return; /* deleted here already (or never seen: a poll created and deleted meanwhile) */
    tly_vote_t *v = tly_poll_find_vote(p, row->voter_id);
    int rc = 0;
    switch (op->type) {
    case TLY_OP_BALLOT_INSERT:
        if (v == NULL)
            rc = api_ballot_from_row(app, p, row);
        if (rc == 0 && row->request_id != NULL && row->request_id[0]) {
            tly_request_row_t r = {.request_id = row->request_id,
                                   .poll_id = row->poll_id,
                                   .voter_id = row->voter_id,
                                   .state = "completed",
                                   .vote_id = row->vote_id,
                                   .created_at = row->recorded_at};
            rc = api_request_from_row(app, &r);
        }
        break;
    case TLY_OP_BALLOT_REPLACE: {
        if (v == NULL || row->nchoices > TLY_MAX_OPTIONS) {
            rc = TLY_ENOTFOUND;
            break;
        }
        tly_ballot_t b;
        b.nchoices = row->nchoices;
        for (size_t i = 0; i < row->nchoices; i++) {
            b.choices[i] = row->choices[i];
            b.scores[i] = row->scores ? row->scores[i] : 0;
        }
        tly_vote_t *nv;
        rc = tly_poll_change_vote(app->registry, p, v, &b, row->recorded_at, &nv);
        break;
    }
    case TLY_OP_BALLOT_DELETE:
        if (v != NULL) {
            api_remember_retracted(app, p, v, row->recorded_at); /* a late retry of its POST here: 409 too */
            tly_poll_retract_vote(app->registry, p, v, row->recorded_at);
        }
        break;
    default:
        break;
    }
    if (rc != 0)
        log_failed("another instance's ballot change not applied here", row->poll_id, rc);
}

static void apply(tly_app_t *app, const tly_store_op_t *op)
{
    int rc = 0;
    const char *id = "";
    switch (op->type) {
    case TLY_OP_USER_INSERT:
        id = op->u.user.user_id;
        if (api_user_find(app, op->u.user.user_id) == NULL)
            rc = api_user_from_row(app, &op->u.user);
        break;
    case TLY_OP_POLL_INSERT:
    case TLY_OP_POLL_UPDATE: {
        id = op->u.poll.poll_id;
        tly_poll_t *p = tly_registry_find_poll(app->registry, op->u.poll.poll_id);
        if (p == NULL) {
            rc = api_poll_from_row(app, &op->u.poll);
        } else if (op->type == TLY_OP_POLL_UPDATE) {
            tly_poll_t *from = api_poll_build(&op->u.poll, &rc);
            if (from != NULL)
                api_poll_adopt(app, p, from);
        }
        break;
    }
    case TLY_OP_POLL_DELETE:
        api_poll_forget(app, op->u.poll.poll_id);
        break;
    case TLY_OP_BALLOT_INSERT:
    case TLY_OP_BALLOT_REPLACE:
    case TLY_OP_BALLOT_DELETE:
        apply_ballot(app, op);
        break;
    case TLY_OP_REQUEST:
        id = op->u.request.request_id;
        rc = api_request_from_row(app, &op->u.request);
        break;
    case TLY_OP_DEVICE_LINK:
        api_link_apply(app, &op->u.link, false, NULL);
        break;
    }
    if (rc != 0)
        log_failed("another instance's change not applied here", id, rc);
}

static const char *poll_of(const tly_store_op_t *op)
{
    return op->type == TLY_OP_POLL_DELETE ? op->u.poll.poll_id : op->u.ballot.poll_id;
}

/* Whether a link and another op that may wait touch the same person: a ballot op of the
 * device or the account in any poll, or a link of either. */
static bool link_touches(const tly_link_row_t *l, const tly_store_op_t *o)
{
    if (o->type == TLY_OP_DEVICE_LINK)
        return strcmp(o->u.link.device_id, l->device_id) == 0 || strcmp(o->u.link.user_id, l->user_id) == 0;
    if (o->type != TLY_OP_BALLOT_INSERT && o->type != TLY_OP_BALLOT_REPLACE && o->type != TLY_OP_BALLOT_DELETE)
        return false;
    return strcmp(o->u.ballot.voter_id, l->device_id) == 0 || strcmp(o->u.ballot.voter_id, l->user_id) == 0;
}

/* Whether a and b (both kinds that may wait) are about the same thing, so that their
 * order matters: the same username, the same voter in a poll, a poll and anything in
 * it, or a link and anything of its device or account. Operations on different keys
 * commute. */
static bool same_key(const tly_store_op_t *a, const tly_store_op_t *b)
{
    if (a->type == TLY_OP_DEVICE_LINK)
        return link_touches(&a->u.link, b);
    if (b->type == TLY_OP_DEVICE_LINK)
        return link_touches(&b->u.link, a);
    if ((a->type == TLY_OP_USER_INSERT) != (b->type == TLY_OP_USER_INSERT))
        return false;
    if (a->type == TLY_OP_USER_INSERT)
        return strcasecmp(a->u.user.username, b->u.user.username) == 0;
    if (strcmp(poll_of(a), poll_of(b)) != 0)
        return false;
    return a->type == TLY_OP_POLL_DELETE || b->type == TLY_OP_POLL_DELETE ||
           strcmp(a->u.ballot.voter_id, b->u.ballot.voter_id) == 0;
}

static bool waits_behind(tly_app_t *app, const tly_store_op_t *op, const deferred_t *upto)
{
    for (const deferred_t *d = app->deferred; d != upto; d = d->next)
        if (same_key(&d->op, op))
            return true;
    return false;
}

static bool can_wait(const tly_store_op_t *op)
{
    return op->type == TLY_OP_USER_INSERT || op->type == TLY_OP_POLL_DELETE || op->type == TLY_OP_BALLOT_INSERT ||
           op->type == TLY_OP_BALLOT_REPLACE || op->type == TLY_OP_BALLOT_DELETE || op->type == TLY_OP_DEVICE_LINK;
}

static void follow_op(void *ctx, const tly_store_op_t *op)
{
    tly_app_t *app = ctx;
    app->followed++;
    /* behind an earlier operation on the same key that waits, so that order is kept per
     * key; other keys go on */
    if (!can_wait(op) || (!blocked(app, op) && !waits_behind(app, op, NULL))) {
        apply(app, op);
        return;
    }
    deferred_t *d = deferred_new(op);
    if (d == NULL) {
        log_failed("another instance's change dropped here (out of memory)", "", TLY_ENOMEM);
        return;
    }
    if (op->type == TLY_OP_POLL_DELETE) /* gone for readers and voters from now on */
        api_poll_mark_deleting(app, op->u.poll.poll_id);
    deferred_t **tail = &app->deferred;
    while (*tail != NULL)
        tail = &(*tail)->next;
    *tail = d;
}

void api_follow_flush(tly_app_t *app)
{
    deferred_t **link = &app->deferred;
    while (*link != NULL) {
        deferred_t *d = *link;
        if (blocked(app, &d->op) || waits_behind(app, &d->op, d)) {
            link = &d->next;
            continue;
        }
        *link = d->next;
        apply(app, &d->op);
        deferred_free(d);
        link = &app->deferred; /* an applied entry may unblock an earlier one's key */
    }
}

void api_follow_init(tly_app_t *app)
{
    if (tly_store_shared(app->store))
        tly_store_follow(app->store, follow_op, app);
}

void api_follow_free(tly_app_t *app)
{
    api_bus_flush_counts(app); /* the last batches' moves, while the bus is open */
    while (app->deferred != NULL) {
        deferred_t *d = app->deferred;
        app->deferred = d->next;
        deferred_free(d);
    }
}

/* ---- a request that missed: catch up and run it once more ---- */

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
} resync_t;

static void resync_done(void *arg)
{
    resync_t *r = arg;
    tly_app_t *app = r->app;
    api_end_async(app);
    if (app->closing) {
        tly_req_add_header(r->req, "Retry-After", "1");
        api_respond_error(r->req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
        return;
    }
    app->redispatch = r->req;
    app->limit_passed = r->req; /* checked on the first run */
    api_dispatch(app, r->req);
    app->redispatch = NULL;
    app->limit_passed = NULL;
}

bool api_resync(tly_app_t *app, tly_req_t *req)
{
    if (app->redispatch == req || !tly_store_shared(app->store))
        return false;
    resync_t *r = tly_req_alloc(req, sizeof(*r));
    if (r == NULL)
        return false;
    r->app = app;
    r->req = req;
    app->resyncs++;
    api_begin_async(app);
    tly_store_sync(app->store, resync_done, r);
    return true;
}

/* ---- the bus: "the feed moved" between instances ---- */

/* Every instance publishes its name here after its batches commit; the others read
 * their store's feed at once instead of at the next periodic read. The message carries
 * no data: the feed is the truth, so a lost message costs only latency. */
#define FEED_CHANNEL "tally:feed"

static void on_bus_message(void *arg, const char *channel, const char *payload, size_t len)
{
    tly_app_t *app = arg;
    if (len == strlen(app->instance_id) && memcmp(payload, app->instance_id, len) == 0)
        return; /* our own */
    tly_store_poke(app->store);
}

static void on_bus_state(void *arg, bool up)
{
    tly_app_t *app = arg;
    if (up) /* messages sent while we were away are lost: look at the feed now */
        tly_store_poke(app->store);
}

/* Live counters in Redis, a hash per poll (`tally:counts:{poll_id}`: field "ballots" =
 * current ballots, field "<position>" = current ballots that include that option
 * position, as the store's counter rows). The instance that committed changes moves
 * them without waiting: the changes of one store batch are summed per poll and sent as
 * one script call per poll when the batch has been reaped (api_bus_flush_counts). A move
 * lost on the way (bus down, a crash between commit and call) is drift that
 * reconciliation repairs. */
static const char counts_lua[] = "for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end\n"
                                 "return 0\n";

struct count_moves {
    UT_hash_handle hh;
    char poll_id[TLY_POLL_ID_LEN + 1];
    int ballots;
    int delta[TLY_MAX_OPTIONS];
};

void api_bus_ignore(void *arg, const tly_bus_reply_t *r)
{
    (void)arg;
    (void)r;
}

static void send_counts(tly_app_t *app, const count_moves_t *m)
{
    char key[TLY_POLL_ID_LEN + 16], buf[2 * TLY_MAX_OPTIONS + 2][16];
    const char *argv[2 * TLY_MAX_OPTIONS + 3];
    size_t lens[2 * TLY_MAX_OPTIONS + 3], n = 0;
    snprintf(key, sizeof(key), "tally:counts:%s", m->poll_id);
    argv[n] = key;
    lens[n++] = strlen(key);
    for (int pos = -1; pos < TLY_MAX_OPTIONS; pos++) {
        int d = pos < 0 ? m->ballots : m->delta[pos];
        if (d == 0)
            continue;
        size_t k = n - 1;
        if (pos < 0)
            snprintf(buf[k], sizeof(buf[k]), "ballots");
        else
            snprintf(buf[k], sizeof(buf[k]), "%d", pos);
        snprintf(buf[k + 1], sizeof(buf[k + 1]), "%d", d);
        argv[n] = buf[k];
        lens[n] = strlen(buf[k]);
        argv[n + 1] = buf[k + 1];
        lens[n + 1] = strlen(buf[k + 1]);
        n += 2;
    }
    if (n > 1 && tly_bus_up(app->bus))
        tly_bus_script(app->bus, app->counts_script, api_bus_ignore, NULL, 1, n, argv, lens);
}

void api_bus_count(tly_app_t *app, const char *poll_id, const uint8_t *before, size_t nbefore, const uint8_t *after,
                   size_t nafter)
{
    if (app->bus == NULL || app->counts_script == NULL || !tly_bus_up(app->bus))
        return;
    count_moves_t *m = NULL;
    HASH_FIND_STR(app->count_moves, poll_id, m);
    if (m == NULL) {
        if ((m = tly_calloc(1, sizeof(*m))) == NULL)
            return; /* out of memory: a lost move, drift that reconciliation repairs */
        snprintf(m->poll_id, sizeof(m->poll_id), "%s", poll_id);
        HASH_ADD_STR(app->count_moves, poll_id, m);
    }
    for (size_t i = 0; i < nbefore; i++)
        if (before[i] < TLY_MAX_OPTIONS)
            m->delta[before[i]]--;
    for (size_t i = 0; i < nafter; i++)
        if (after[i] < TLY_MAX_OPTIONS)
            m->delta[after[i]]++;
    m->ballots += (nafter > 0) - (nbefore > 0);
}

void api_bus_flush_counts(tly_app_t *app)
{
    count_moves_t *m, *tmp;
    HASH_ITER(hh, app->count_moves, m, tmp) {
        HASH_DEL(app->count_moves, m);
        send_counts(app, m);
        tly_free(m);
    }
}

int api_bus_open(tly_app_t *app, char *err)
{
    const char *url = app->conf->bus;
    if (url == NULL || url[0] == '\0')
        return 0;
    if (!tly_store_shared(app->store)) {
        snprintf(err, 512, "--bus joins instances that share a store: it needs --store postgres://...");
        return -1;
    }
    tly_bus_conf_t bc = {.loop = app->loop,
                         .url = url,
                         .instance_id = app->instance_id,
                         .on_message = on_bus_message,
                         .on_state = on_bus_state,
                         .arg = app};
    int rc = tly_bus_open(&bc, &app->bus);
    if (rc == 0)
        rc = tly_bus_subscribe(app->bus, FEED_CHANNEL);
    if (rc == 0 && (app->counts_script = tly_bus_script_new(app->bus, counts_lua)) == NULL)
        rc = TLY_ENOMEM;
    if (rc != 0) {
        snprintf(err, 512, "cannot use the bus %s (error %d): expected redis://host:port[/db]", url, rc);
        return -1;
    }
    return 0;
}

void api_bus_announce(tly_app_t *app)
{
    if (app->bus == NULL)
        return;
    tly_store_stats_t st;
    tly_store_stats(app->store, &st);
    if (st.batches == app->announced)
        return;
    app->announced = st.batches;
    tly_bus_publish(app->bus, FEED_CHANNEL, app->instance_id, strlen(app->instance_id));
}
