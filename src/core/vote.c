/*
 * vote.c: recorded ballots: allocation, the per-poll dedup map, the receipt map, the
 * per-poll address set (voter_check), and counting on commit and retraction. Counters
 * change only here.
 */
#include "core/core_int.h"

#include <stdio.h>
#include <string.h>

/*
 * The vote stores its choices and, after them, one score per choice. Scores are kept
 * for every type (zeros outside score polls): tly_vote_new does not know the poll's
 * type, and the extra nchoices bytes are cheaper than a second layout.
 */
tly_vote_t *tly_vote_new(const tly_ballot_t *b, const char *voter_id, const char *idem_key, const char *vote_id,
                         const char *receipt, int64_t recorded_at)
{
    size_t n = b->nchoices;
    if (n > TLY_MAX_OPTIONS || voter_id == NULL)
        return NULL;
    tly_vote_t *v = tly_calloc(1, sizeof(*v) + 2 * n);
    if (v == NULL)
        return NULL;
    v->voter_id = tly_strdup(voter_id);
    v->idem_key = idem_key != NULL ? tly_strdup(idem_key) : NULL;
    if (v->voter_id == NULL || (idem_key != NULL && v->idem_key == NULL)) {
        tly_vote_free(v);
        return NULL;
    }
    if (vote_id != NULL)
        snprintf(v->vote_id, sizeof(v->vote_id), "%s", vote_id);
    else
        tly_random_id(v->vote_id, "v_", 12);
    if (receipt != NULL)
        snprintf(v->receipt, sizeof(v->receipt), "%s", receipt);
    else
        tly_random_id(v->receipt, "", 16);
    v->recorded_at = recorded_at;
    v->state = TLY_VOTE_PENDING;
    v->nchoices = (uint8_t)n;
    memcpy(v->data, b->choices, n);
    memcpy(v->data + n, b->scores, n);
    return v;
}

void tly_vote_free(tly_vote_t *v)
{
    if (v == NULL)
        return;
    tly_free(v->voter_id);
    tly_free(v->idem_key);
    tly_free(v->cast);
    tly_free(v);
}

/* A copy of a ballot (n choices, then n scores) and its time; NULL when out of memory. */
static struct tly_vote_cast *cast_new(size_t n, const uint8_t *choices, const uint8_t *scores, int64_t at)
{
    struct tly_vote_cast *c = tly_malloc(sizeof(*c) + 2 * n);
    if (c == NULL)
        return NULL;
    c->recorded_at = at;
    c->nchoices = (uint8_t)n;
    memcpy(c->data, choices, n);
    memcpy(c->data + n, scores, n);
    return c;
}

int tly_vote_set_cast(tly_vote_t *v, const tly_ballot_t *b, int64_t cast_at)
{
    if (v->poll == NULL || b->nchoices > TLY_MAX_OPTIONS)
        return TLY_EINVAL;
    for (size_t i = 0; i < b->nchoices; i++)
        if (b->choices[i] >= v->poll->noptions)
            return TLY_EINVAL;
    struct tly_vote_cast *c = cast_new(b->nchoices, b->choices, b->scores, cast_at);
    if (c == NULL)
        return TLY_ENOMEM;
    tly_free(v->cast);
    v->cast = c;
    return 0;
}

tly_vote_t *tly_poll_find_vote(tly_poll_t *p, const char *voter_id)
{
    tly_vote_t *v = NULL;
    HASH_FIND(hh, p->votes, voter_id, strlen(voter_id), v);
    return v;
}

int tly_poll_add_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v)
{
    v->poll = p;
    HASH_ADD_KEYPTR(hh, p->votes, v->voter_id, strlen(v->voter_id), v);
    if (v->hh.tbl == NULL)
        return TLY_ENOMEM;
    if (r != NULL) {
        tly_vote_t **receipts = core_registry_receipts(r);
        HASH_ADD_KEYPTR(hh_receipt, *receipts, v->receipt, strlen(v->receipt), v);
        if (v->hh_receipt.tbl == NULL) {
            HASH_DELETE(hh, p->votes, v);
            return TLY_ENOMEM;
        }
    }
    return 0;
}

size_t core_counted_options(const tly_poll_t *p, const tly_vote_t *v, uint8_t *out)
{
    const uint8_t *c = core_vote_choices(v), *s = core_vote_scores(v);
    size_t n = p->noptions, k = 0;
    for (size_t i = 0; i < v->nchoices; i++) {
        if (c[i] >= n)
            continue;
        if ((p->type == TLY_TYPE_RANKED && i != 0) || (p->type == TLY_TYPE_SCORE && s[i] == 0))
            continue;
        out[k++] = c[i];
    }
    return k;
}

/*
 * The pairs of one ranking, in O(length^2): each listed option once, and each option
 * ranked before another once for that ordered pair. A ranking naming an option the poll
 * does not have is left out whole, as the instant-runoff count leaves it out.
 */
static void count_pairs(uint64_t *pairs, size_t n, const tly_vote_t *v, uint64_t d)
{
    const uint8_t *c = core_vote_choices(v);
    size_t k = v->nchoices;
    for (size_t i = 0; i < k; i++)
        if (c[i] >= n)
            return;
    uint64_t *listed = pairs + n * n;
    for (size_t i = 0; i < k; i++) {
        uint64_t *row = pairs + (size_t)c[i] * n;
        listed[c[i]] += d;
        for (size_t j = i + 1; j < k; j++)
            row[c[j]] += d;
    }
}

int core_ranked_pairs_build(tly_poll_t *p)
{
    size_t n = p->noptions;
    uint64_t *pairs = tly_calloc(n > 0 ? n * n + n : 1, sizeof(uint64_t));
    if (pairs == NULL)
        return TLY_ENOMEM;
    for (const tly_vote_t *v = p->votes; v != NULL; v = v->hh.next)
        if (v->state == TLY_VOTE_COMMITTED)
            count_pairs(pairs, n, v, 1);
    tly_free(p->ranked_pairs);
    p->ranked_pairs = pairs;
    return 0;
}

/*
 * One list of counted options feeds both the options' votes and the timelines, so
 * that the two cannot disagree on what a ballot counts for.
 */
void core_count_vote(tly_poll_t *p, tly_vote_t *v, int dir)
{
    uint8_t idx[TLY_MAX_OPTIONS];
    size_t k = core_counted_options(p, v, idx);
    for (size_t i = 0; i < k; i++)
        p->options[idx[i]].votes += dir > 0 ? 1 : (uint64_t)-1;
    if (p->type == TLY_TYPE_SCORE && p->score_sum != NULL) {
        const uint8_t *c = core_vote_choices(v), *s = core_vote_scores(v);
        size_t n = p->noptions;
        for (size_t i = 0; i < v->nchoices; i++) {
            if (c[i] >= n)
                continue;
            p->score_sum[c[i]] += dir > 0 ? s[i] : -(uint64_t)s[i];
            p->score_sum[n + c[i]] += dir > 0 ? 1 : (uint64_t)-1;
        }
    }
    if (p->type == TLY_TYPE_RANKED) {
        /* the pairs take noptions^2 counters: a poll gets them with its first ballot (on
         * failure, or once dropped, the next render builds them from the ballots) */
        size_t n = p->noptions;
        if (p->ranked_pairs == NULL && dir > 0 && p->total_votes == 0)
            p->ranked_pairs = tly_calloc(n * n + n, sizeof(uint64_t));
        if (p->ranked_pairs != NULL)
            count_pairs(p->ranked_pairs, n, v, dir > 0 ? 1 : (uint64_t)-1);
        core_ranked_count(p, v, dir);
    }
    core_timeline_count(p, v->recorded_at, idx, k, dir);
}

void tly_poll_commit_vote(tly_poll_t *p, tly_vote_t *v, int64_t now)
{
    if (v->state == TLY_VOTE_COMMITTED)
        return;
    v->state = TLY_VOTE_COMMITTED;
    core_count_vote(p, v, +1);
    core_activity_add(p, v->recorded_at);
    p->total_votes++;
    p->seq++;
    p->as_of = now;
    core_results_changed(p);
}

/* Takes v's address out of p's set: that address may cast a ballot again. */
static void remove_ip(tly_poll_t *p, tly_vote_t *v)
{
    if (v->ip == NULL)
        return;
    HASH_DELETE(hh, p->ip_votes, v->ip);
    tly_free(v->ip);
    v->ip = NULL;
}

static void remove_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v)
{
    remove_ip(p, v);
    HASH_DELETE(hh, p->votes, v);
    tly_vote_t **receipts = r != NULL ? core_registry_receipts(r) : NULL;
    if (receipts != NULL && *receipts != NULL && v->hh_receipt.tbl != NULL)
        HASH_DELETE(hh_receipt, *receipts, v);
    tly_vote_free(v);
}

void tly_poll_retract_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, int64_t now)
{
    if (v->state == TLY_VOTE_COMMITTED) {
        core_count_vote(p, v, -1);
        p->total_votes--;
        p->seq++;
        p->as_of = now;
        core_results_changed(p);
    }
    remove_vote(r, p, v);
}

void tly_poll_drop_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v)
{
    /* only pending votes are dropped; a committed one would leave counts behind */
    if (v->state == TLY_VOTE_COMMITTED) {
        tly_poll_retract_vote(r, p, v, p->as_of);
        return;
    }
    remove_vote(r, p, v);
}

/*
 * Moves a vote within one of its hash tables from the address whose handle is `from`
 * to `to_elt`, whose handle `to` is already a byte copy of `from`: every pointer the
 * table holds to the old element or its handle (app-order neighbours, the tail, the
 * bucket chain and its head) is repointed. This is uthash's own layout (2.x); doing it
 * in place, instead of HASH_DELETE and HASH_ADD, allocates nothing, so a change cannot
 * fail half-way (deleting a table's only element frees the table, and adding it back
 * would allocate again). Returns whether the element heads the table (its prev is
 * NULL), for the caller to repoint the head.
 */
static bool move_in_table(const UT_hash_handle *from, UT_hash_handle *to, void *to_elt)
{
    UT_hash_table *tbl = from->tbl;
    if (from->prev != NULL)
        ((UT_hash_handle *)(void *)((char *)from->prev + tbl->hho))->next = to_elt;
    if (from->next != NULL)
        ((UT_hash_handle *)(void *)((char *)from->next + tbl->hho))->prev = to_elt;
    if (tbl->tail == from)
        tbl->tail = to;
    if (from->hh_prev != NULL)
        from->hh_prev->hh_next = to;
    if (from->hh_next != NULL)
        from->hh_next->hh_prev = to;
    unsigned bkt;
    HASH_TO_BKT(from->hashv, tbl->num_buckets, bkt);
    if (tbl->buckets[bkt].hh_head == from)
        tbl->buckets[bkt].hh_head = to;
    return from->prev == NULL;
}

int tly_poll_change_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, const tly_ballot_t *b, int64_t now,
                         tly_vote_t **out)
{
    *out = v;
    if (v->state != TLY_VOTE_COMMITTED)
        return TLY_ESTATE;
    size_t n = b->nchoices;
    if (v->poll != p || n > TLY_MAX_OPTIONS || n > p->noptions)
        return TLY_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (b->choices[i] >= p->noptions)
            return TLY_EINVAL;
    tly_vote_t **receipts = r != NULL ? core_registry_receipts(r) : NULL;
    if (v->hh_receipt.tbl != NULL &&
        (receipts == NULL || *receipts == NULL || (*receipts)->hh_receipt.tbl != v->hh_receipt.tbl))
        return TLY_EINVAL; /* moving it would leave the real map's head pointing at freed memory */
    /* the first change of a vote with a key keeps the ballot as cast: a retry of the
     * POST that cast it answers with that (tly_vote_cast_option_ids) */
    struct tly_vote_cast *cast = NULL;
    if (v->idem_key != NULL && v->cast == NULL &&
        (cast = cast_new(v->nchoices, core_vote_choices(v), core_vote_scores(v), v->recorded_at)) == NULL)
        return TLY_ENOMEM;
    tly_vote_t *w = v;
    if (n > v->nchoices && (w = tly_malloc(sizeof(*w) + 2 * n)) == NULL) {
        tly_free(cast);
        return TLY_ENOMEM;
    }

    /* nothing can fail from here on; the copy goes in before w copies v */
    if (cast != NULL)
        v->cast = cast;
    core_count_vote(p, v, -1); /* the old ballot, at its old time */
    if (w != v) {
        memcpy(w, v, sizeof(*v)); /* the ids, the strings (now w's) and both hash handles */
        if (v->hh.tbl != NULL && move_in_table(&v->hh, &w->hh, w))
            p->votes = w;
        if (v->hh_receipt.tbl != NULL && receipts != NULL) { /* checked above: receipts is its map */
            w->hh_receipt.key = w->receipt;                  /* the key lives inside the vote */
            if (move_in_table(&v->hh_receipt, &w->hh_receipt, w))
                *receipts = w;
        }
        if (w->ip != NULL)
            w->ip->vote = w; /* the address entry is keyed by its hash: only its pointer moves */
        tly_free(v);         /* not tly_vote_free: voter_id, idem_key and cast moved to w */
    }
    w->nchoices = (uint8_t)n;
    memcpy(w->data, b->choices, n);
    memcpy(w->data + n, b->scores, n);
    w->recorded_at = now;
    core_count_vote(p, w, +1);
    core_activity_add(p, now);
    p->seq++;
    p->as_of = now;
    core_results_changed(p);
    *out = w;
    return 0;
}

/*
 * Moves v from its bucket to the one of its new key in place: the poll's map already
 * holds v, so nothing is allocated but the new id, and the re-key cannot fail half-way
 * (a HASH_DELETE and HASH_ADD could: deleting the only vote frees the table, and adding
 * may grow the buckets). The app-order list (prev/next) stays as it is. uthash's own
 * layout (2.x), as move_in_table.
 */
int tly_poll_rekey_vote(tly_poll_t *p, tly_vote_t *v, const char *voter_id)
{
    if (v->poll != p || v->hh.tbl == NULL || p->votes == NULL || v->hh.tbl != p->votes->hh.tbl)
        return TLY_EINVAL;
    if (tly_poll_find_vote(p, voter_id) != NULL)
        return TLY_EEXIST;
    char *id = tly_strdup(voter_id);
    if (id == NULL)
        return TLY_ENOMEM;
    UT_hash_table *tbl = v->hh.tbl;
    unsigned bkt;
    HASH_TO_BKT(v->hh.hashv, tbl->num_buckets, bkt);
    HASH_DEL_IN_BKT(tbl->buckets[bkt], &v->hh);
    tly_free(v->voter_id);
    v->voter_id = id;
    size_t len = strlen(id);
    v->hh.key = id;
    v->hh.keylen = (unsigned)len;
    HASH_VALUE(id, len, v->hh.hashv);
    HASH_TO_BKT(v->hh.hashv, tbl->num_buckets, bkt);
    UT_hash_bucket *b = &tbl->buckets[bkt];
    b->count++;
    v->hh.hh_next = b->hh_head;
    v->hh.hh_prev = NULL;
    if (b->hh_head != NULL)
        b->hh_head->hh_prev = &v->hh;
    b->hh_head = &v->hh;
    return 0;
}

/* ---- client addresses ---- */

tly_vote_t *tly_poll_find_ip(const tly_poll_t *p, const uint8_t ip_hash[TLY_IP_HASH_LEN])
{
    struct tly_ip_vote *e = NULL;
    HASH_FIND(hh, p->ip_votes, ip_hash, TLY_IP_HASH_LEN, e);
    return e != NULL ? e->vote : NULL;
}

int tly_poll_set_vote_ip(tly_poll_t *p, tly_vote_t *v, const uint8_t ip_hash[TLY_IP_HASH_LEN])
{
    if (v->poll != p || v->ip != NULL)
        return TLY_EINVAL;
    if (tly_poll_find_ip(p, ip_hash) != NULL)
        return TLY_EEXIST;
    struct tly_ip_vote *e = tly_calloc(1, sizeof(*e));
    if (e == NULL)
        return TLY_ENOMEM;
    memcpy(e->hash, ip_hash, TLY_IP_HASH_LEN);
    e->vote = v;
    HASH_ADD(hh, p->ip_votes, hash, TLY_IP_HASH_LEN, e);
    if (e->hh.tbl == NULL) {
        tly_free(e);
        return TLY_ENOMEM;
    }
    v->ip = e;
    return 0;
}

const uint8_t *tly_vote_ip_hash(const tly_vote_t *v) { return v->ip != NULL ? v->ip->hash : NULL; }

size_t tly_poll_ip_count(const tly_poll_t *p) { return HASH_COUNT(p->ip_votes); }

void core_ip_votes_clear(tly_poll_t *p)
{
    struct tly_ip_vote *e, *tmp;
    HASH_ITER(hh, p->ip_votes, e, tmp) {
        HASH_DELETE(hh, p->ip_votes, e);
        if (e->vote != NULL)
            e->vote->ip = NULL;
        tly_free(e);
    }
}
