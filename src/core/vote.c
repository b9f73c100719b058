/*
 * vote.c: recorded ballots: allocation, the per-poll dedup map, the receipt map, and
 * counting on commit and retraction. Counters change only here.
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
    tly_free(v);
}

tly_vote_t *tly_poll_find_vote(tly_poll_t *p, const char *voter_id)
{
    tly_vote_t *v = NULL;
    HASH_FIND(hh, p->votes, voter_id, strlen(voter_id), v);
    return v;
}

void tly_poll_add_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v)
{
    v->poll = p;
    HASH_ADD_KEYPTR(hh, p->votes, v->voter_id, strlen(v->voter_id), v);
    if (r != NULL) {
        tly_vote_t **receipts = core_registry_receipts(r);
        HASH_ADD_KEYPTR(hh_receipt, *receipts, v->receipt, strlen(v->receipt), v);
    }
}

void core_count_vote(tly_poll_t *p, const tly_vote_t *v, int dir)
{
    const uint8_t *c = core_vote_choices(v), *s = core_vote_scores(v);
    size_t n = p->noptions;
    for (size_t i = 0; i < v->nchoices; i++) {
        if (c[i] >= n)
            continue;
        uint64_t *votes = &p->options[c[i]].votes;
        switch (p->type) {
        case TLY_TYPE_RANKED:
            if (i == 0)
                *votes += dir > 0 ? 1 : (uint64_t)-1;
            break;
        case TLY_TYPE_SCORE:
            if (s[i] > 0)
                *votes += dir > 0 ? 1 : (uint64_t)-1;
            if (p->score_sum != NULL) {
                p->score_sum[c[i]] += dir > 0 ? s[i] : -(uint64_t)s[i];
                p->score_sum[n + c[i]] += dir > 0 ? 1 : (uint64_t)-1;
            }
            break;
        default:
            *votes += dir > 0 ? 1 : (uint64_t)-1;
        }
    }
}

void tly_poll_commit_vote(tly_poll_t *p, tly_vote_t *v, int64_t now)
{
    if (v->state == TLY_VOTE_COMMITTED)
        return;
    v->state = TLY_VOTE_COMMITTED;
    core_count_vote(p, v, +1);
    p->total_votes++;
    p->seq++;
    p->as_of = now;
    p->results_dirty = true;
}

static void remove_vote(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v)
{
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
        p->results_dirty = true;
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
