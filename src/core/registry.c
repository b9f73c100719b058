/*
 * registry.c: every poll in memory, found by id; each owner's polls newest first for
 * listing; every vote found by receipt.
 *
 * An owner's polls are a singly linked list through tly_poll_t.owner_next, ordered by
 * (created_at, poll_id) descending. New polls are the newest and go to the head; a
 * store that loads oldest first also appends at the tail, so both are O(1). Listing
 * resumes after a cursor poll found in O(1) through the poll map. Removing a poll
 * walks its owner's list: deletions are rare next to reads.
 */
#include "core/core_int.h"

#include <string.h>

typedef struct owner_list {
    UT_hash_handle hh;
    char *owner_id;
    tly_poll_t *head, *tail;
} owner_list_t;

struct tly_registry {
    tly_poll_t *polls;    /* by poll_id */
    tly_poll_t *codes;    /* by join_code, through hh_code: polls that hold one */
    tly_vote_t *receipts; /* by receipt, through hh_receipt */
    owner_list_t *owners; /* by owner_id */
    bool final_by_store;  /* given to every poll added */
};

void tly_registry_set_final_by_store(tly_registry_t *r, bool on) { r->final_by_store = on; }

tly_registry_t *tly_registry_new(void) { return tly_calloc(1, sizeof(tly_registry_t)); }

tly_vote_t **core_registry_receipts(tly_registry_t *r) { return &r->receipts; }

void tly_registry_free(tly_registry_t *r)
{
    if (r == NULL)
        return;
    HASH_CLEAR(hh_receipt, r->receipts);
    HASH_CLEAR(hh_code, r->codes);
    tly_poll_t *p, *ptmp;
    HASH_ITER(hh, r->polls, p, ptmp) {
        HASH_DELETE(hh, r->polls, p);
        tly_poll_free(p);
    }
    owner_list_t *o, *otmp;
    HASH_ITER(hh, r->owners, o, otmp) {
        HASH_DELETE(hh, r->owners, o);
        tly_free(o->owner_id);
        tly_free(o);
    }
    tly_free(r);
}

tly_poll_t *tly_registry_find_poll(tly_registry_t *r, const char *poll_id)
{
    tly_poll_t *p = NULL;
    HASH_FIND_STR(r->polls, poll_id, p);
    return p;
}

/* Whether a lists before b (newer first). */
static bool newer(const tly_poll_t *a, const tly_poll_t *b)
{
    return a->created_at > b->created_at || (a->created_at == b->created_at && strcmp(a->poll_id, b->poll_id) > 0);
}

static owner_list_t *find_owner(tly_registry_t *r, const char *owner_id)
{
    owner_list_t *o = NULL;
    HASH_FIND(hh, r->owners, owner_id, strlen(owner_id), o);
    return o;
}

/* Unlinks p from its owner's list (the list goes when it empties). */
static void owner_unlink(tly_registry_t *r, tly_poll_t *p)
{
    owner_list_t *o = find_owner(r, p->owner_id != NULL ? p->owner_id : "");
    if (o == NULL)
        return;
    tly_poll_t *prev = NULL, *q = o->head;
    while (q != NULL && q != p) {
        prev = q;
        q = q->owner_next;
    }
    if (q == p) {
        if (prev == NULL)
            o->head = p->owner_next;
        else
            prev->owner_next = p->owner_next;
        if (o->tail == p)
            o->tail = prev;
    }
    p->owner_next = NULL;
    if (o->head == NULL) {
        HASH_DELETE(hh, r->owners, o);
        tly_free(o->owner_id);
        tly_free(o);
    }
}

/* Inserts p into the list of p->owner_id at its place (newest first). false when the
 * list entry cannot be allocated: p then works by id but is missing from the listing. */
static bool owner_link(tly_registry_t *r, tly_poll_t *p)
{
    p->owner_next = NULL;
    const char *owner = p->owner_id != NULL ? p->owner_id : "";
    owner_list_t *o = find_owner(r, owner);
    if (o == NULL) {
        o = tly_calloc(1, sizeof(*o));
        if (o == NULL || (o->owner_id = tly_strdup(owner)) == NULL) {
            tly_free(o);
            return false;
        }
        HASH_ADD_KEYPTR(hh, r->owners, o->owner_id, strlen(o->owner_id), o);
        if (o->hh.tbl == NULL) {
            tly_free(o->owner_id);
            tly_free(o);
            return false;
        }
    }
    if (o->head == NULL) {
        o->head = o->tail = p;
    } else if (newer(p, o->head)) {
        p->owner_next = o->head;
        o->head = p;
    } else if (newer(o->tail, p)) {
        o->tail->owner_next = p;
        o->tail = p;
    } else {
        tly_poll_t *q = o->head;
        while (q->owner_next != NULL && newer(q->owner_next, p))
            q = q->owner_next;
        p->owner_next = q->owner_next;
        q->owner_next = p;
        if (p->owner_next == NULL)
            o->tail = p;
    }
    return true;
}

static void code_index(tly_registry_t *r, tly_poll_t *p)
{
    tly_poll_t *holder = NULL;
    if (p->join_code[0] != '\0')
        HASH_FIND(hh_code, r->codes, p->join_code, strlen(p->join_code), holder);
    if (p->join_code[0] == '\0' || holder != NULL) {
        p->join_code[0] = '\0';
        return;
    }
    HASH_ADD(hh_code, r->codes, join_code, strlen(p->join_code), p);
    if (p->hh_code.tbl == NULL) /* out of memory: the poll works, without a code */
        p->join_code[0] = '\0';
}

static void code_unindex(tly_registry_t *r, tly_poll_t *p)
{
    if (p->join_code[0] != '\0' && p->hh_code.tbl != NULL)
        HASH_DELETE(hh_code, r->codes, p);
    p->join_code[0] = '\0';
    memset(&p->hh_code, 0, sizeof(p->hh_code));
}

tly_poll_t *tly_registry_find_code(tly_registry_t *r, const char *code)
{
    tly_poll_t *p = NULL;
    if (code != NULL && code[0] != '\0')
        HASH_FIND(hh_code, r->codes, code, strlen(code), p);
    return p;
}

int tly_registry_set_code(tly_registry_t *r, tly_poll_t *p, const char *code)
{
    if (code != NULL && strcmp(p->join_code, code) == 0 && code[0] != '\0')
        return 0;
    code_unindex(r, p);
    if (code == NULL || code[0] == '\0')
        return 0;
    if (tly_registry_find_code(r, code) != NULL)
        return TLY_EEXIST;
    snprintf(p->join_code, sizeof(p->join_code), "%s", code);
    code_index(r, p);
    return p->join_code[0] != '\0' ? 0 : TLY_ENOMEM;
}

/*
 * If the owner's list entry cannot be allocated the poll still works by id but is
 * missing from that owner's listing; add_poll has no way to report it, and refusing
 * the poll would be worse.
 */
int tly_registry_add_poll(tly_registry_t *r, tly_poll_t *p)
{
    HASH_ADD_STR(r->polls, poll_id, p);
    if (p->hh.tbl == NULL)
        return TLY_ENOMEM;
    memset(&p->hh_code, 0, sizeof(p->hh_code));
    code_index(r, p);
    p->final_by_store = r->final_by_store;
    if (p->type == TLY_TYPE_SCORE && p->score_sum == NULL && p->total_votes == 0)
        p->score_sum = tly_calloc(p->noptions ? 2 * p->noptions : 1, sizeof(uint64_t));
    /* counted as the store loads the ballots, not all at once by the first render (on
     * failure the first render builds it); the pairs come with the first ballot */
    if (p->type == TLY_TYPE_RANKED && p->ranked == NULL)
        (void)core_ranked_build(p);
    (void)owner_link(r, p);
    return 0;
}

void tly_registry_remove_poll(tly_registry_t *r, tly_poll_t *p)
{
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next)
        if (v->hh_receipt.tbl != NULL && r->receipts != NULL) /* added without a registry: not there */
            HASH_DELETE(hh_receipt, r->receipts, v);
    code_unindex(r, p);
    HASH_DELETE(hh, r->polls, p);
    owner_unlink(r, p);
    tly_poll_free(p);
}

int tly_registry_set_owner(tly_registry_t *r, tly_poll_t *p, const char *owner_id)
{
    char *id = tly_strdup(owner_id);
    if (id == NULL)
        return TLY_ENOMEM;
    owner_unlink(r, p);
    tly_free(p->owner_id);
    p->owner_id = id;
    return owner_link(r, p) ? 0 : TLY_ENOMEM;
}

tly_vote_t *tly_registry_find_receipt(tly_registry_t *r, const char *receipt)
{
    tly_vote_t *v = NULL;
    HASH_FIND(hh_receipt, r->receipts, receipt, strlen(receipt), v);
    return v;
}

/* A cursor naming no poll of this owner (deleted, or someone else's) lists nothing. */
size_t tly_registry_list_owner(tly_registry_t *r, const char *owner_id, const char *after_poll_id, tly_poll_t **out,
                               size_t max, bool *more)
{
    *more = false;
    owner_list_t *o = find_owner(r, owner_id);
    if (o == NULL)
        return 0;
    tly_poll_t *q = o->head;
    if (after_poll_id != NULL) {
        tly_poll_t *c = tly_registry_find_poll(r, after_poll_id);
        if (c == NULL || c->owner_id == NULL || strcmp(c->owner_id, owner_id) != 0)
            return 0;
        q = c->owner_next;
    }
    size_t n = 0;
    for (; q != NULL && n < max; q = q->owner_next)
        out[n++] = q;
    *more = q != NULL;
    return n;
}

size_t tly_registry_count(const tly_registry_t *r) { return HASH_COUNT(r->polls); }

void tly_registry_each_poll(tly_registry_t *r, void (*fn)(void *ctx, tly_poll_t *p), void *ctx)
{
    tly_poll_t *p, *tmp;
    HASH_ITER(hh, r->polls, p, tmp) {
        fn(ctx, p);
    }
}
