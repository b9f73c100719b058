/*
 * load.c: what the backends' loads share: the check of every row before its callback
 * sees it, and the rule for a bad row (store.h, tly_store_load). The backends decode
 * their rows; a row they cannot decode comes here as tly_load_bad, a decoded one
 * through tly_load_user, _link, _poll, _ballot, _request, _retracted or _cast.
 *
 * Why check at all: a row that memory cannot hold used to be dropped with a warning,
 * and the server then started with a state the store contradicts (a voter memory says
 * has not voted, whose ballot the store refuses to duplicate). A start is the one
 * moment every row passes by anyway, so it is where the store says which rows are bad
 * and lets the operator decide.
 */
#include "base/base.h"
#include "obs/obs.h"
#include "store/store_int.h"

/* uthash's tables through the allocation wrapper, and a failed one reported rather
 * than fatal (as in core_int.h). */
#define uthash_malloc(sz) tly_malloc(sz)
#define uthash_free(ptr, sz) tly_free(ptr)
#define HASH_NONFATAL_OOM 1
#include <uthash.h>

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Bad rows a refused load logs one by one; the rest are only counted, so that a store
 * whose every ballot is bad does not fill the log before the start is refused. When
 * they are left out (skip_bad_rows) each one is logged: the operator must be able to
 * tell what the running server does not have. */
#define BAD_LOGGED_MAX 100

/* A poll that load has seen, by poll_id: ballots refer to it and to its options. */
struct load_poll {
    UT_hash_handle hh;
    size_t noptions;
    int left_out; /* a bad row: its ballots are bad too */
    char poll_id[];
};

void tly_load_init(tly_load_t *l, const tly_store_load_cb_t *cb, void *ctx) { *l = (tly_load_t){.cb = cb, .ctx = ctx}; }

/* Appends value to the key with every byte outside printable ASCII (and the
 * backslash) written \xNN, at most 64 bytes of it: a corrupt row's key may be
 * anything, and the log line must still say which row it is. */
static void key_put(char *buf, size_t cap, size_t *len, const char *value)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *v = (const unsigned char *)value;
    size_t vlen = strlen(value), n = vlen < 64 ? vlen : 64;
    for (size_t i = 0; i <= n; i++) {
        char esc[5] = {(char)(i < n ? v[i] : 0), '\0'};
        if (i == n && vlen <= n)
            return;
        if (i == n)
            memcpy(esc, "...", 4);
        else if (v[i] < 0x20 || v[i] > 0x7e || v[i] == '\\')
            esc[0] = '\\', esc[1] = 'x', esc[2] = hex[v[i] >> 4], esc[3] = hex[v[i] & 15], esc[4] = '\0';
        size_t k = strlen(esc);
        if (*len + k >= cap)
            return;
        memcpy(buf + *len, esc, k + 1);
        *len += k;
    }
}

void tly_load_key(char buf[TLY_LOAD_KEY_MAX], const char *name, const char *value, ...)
{
    size_t len = 0;
    va_list ap;
    buf[0] = '\0';
    va_start(ap, value);
    while (name != NULL) {
        int n = snprintf(buf + len, TLY_LOAD_KEY_MAX - len, "%s%s=", len ? " " : "", name);
        if (n < 0 || (size_t)n >= TLY_LOAD_KEY_MAX - len)
            break;
        len += (size_t)n;
        key_put(buf, TLY_LOAD_KEY_MAX, &len, value != NULL ? value : "NULL");
        if ((name = va_arg(ap, const char *)) != NULL)
            value = va_arg(ap, const char *);
    }
    va_end(ap);
}

int tly_load_bad(tly_load_t *l, const char *table, const char *key, const char *why)
{
    l->bad++;
    if (l->cb->skip_bad_rows)
        tly_log(TLY_LOG_WARN, "store: bad row left out", "table", table, "key", key, "reason", why, NULL);
    else if (l->bad <= BAD_LOGGED_MAX)
        tly_log(TLY_LOG_ERROR, "store: bad row", "table", table, "key", key, "reason", why, NULL);
    return 0;
}

/* The reason a callback gave for refusing a row. */
static const char *callback_why(const char *why) { return why != NULL ? why : "memory cannot hold it"; }

/* The name of the first of n required columns that is NULL, or NULL. */
static const char *missing(const char *const *names, const char *const *values, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (values[i] == NULL)
            return names[i];
    return NULL;
}

/* Keys are written only for a bad row: load passes millions of good ones, and writing
 * a key costs about as much as the rest of the check. */

static int bad_user(tly_load_t *l, const tly_user_row_t *u, const char *why)
{
    char key[TLY_LOAD_KEY_MAX];
    tly_load_key(key, "user_id", u->user_id, NULL);
    return tly_load_bad(l, "users", key, why);
}

/* "<column> is NULL", for a required column. */
static const char *null_why(char *buf, size_t cap, const char *column)
{
    snprintf(buf, cap, "%s is NULL", column);
    return buf;
}

int tly_load_user(tly_load_t *l, const tly_user_row_t *u)
{
    char why[64];
    const char *cb_why = NULL;
    static const char *const names[] = {"user_id", "username", "password_hash"};
    const char *values[] = {u->user_id, u->username, u->password_hash};
    const char *null = missing(names, values, 3);
    if (null != NULL)
        return bad_user(l, u, null_why(why, sizeof why, null));
    int rc = l->cb->user != NULL ? l->cb->user(l->ctx, u, &cb_why) : 0;
    return rc == TLY_EINVAL ? bad_user(l, u, callback_why(cb_why)) : rc;
}

int tly_load_link(tly_load_t *l, const tly_device_link_row_t *d)
{
    char why[64], key[TLY_LOAD_KEY_MAX];
    const char *cb_why = NULL;
    static const char *const names[] = {"device_id", "user_id"};
    const char *values[] = {d->device_id, d->user_id};
    const char *null = missing(names, values, 2);
    const char *bad = null != NULL ? null_why(why, sizeof why, null) : NULL;
    int rc = 0;
    if (bad == NULL && (rc = l->cb->link != NULL ? l->cb->link(l->ctx, d, &cb_why) : 0) == TLY_EINVAL)
        bad = callback_why(cb_why);
    if (bad == NULL)
        return rc;
    tly_load_key(key, "device_id", d->device_id, NULL);
    return tly_load_bad(l, "device_links", key, bad);
}

/* Remembers a poll (taken or left out) for its ballots. 0 or TLY_ENOMEM. */
static int remember_poll(tly_load_t *l, const char *poll_id, size_t noptions, int left_out)
{
    size_t n = strlen(poll_id);
    struct load_poll *lp = tly_malloc(sizeof *lp + n + 1);
    if (lp == NULL)
        return TLY_ENOMEM;
    memset(lp, 0, sizeof *lp);
    lp->noptions = noptions;
    lp->left_out = left_out;
    memcpy(lp->poll_id, poll_id, n + 1);
    HASH_ADD(hh, l->polls, poll_id[0], n, lp);
    if (lp->hh.tbl == NULL) {
        tly_free(lp);
        return TLY_ENOMEM;
    }
    return 0;
}

static struct load_poll *find_poll(tly_load_t *l, const char *poll_id)
{
    struct load_poll *lp;
    HASH_FIND(hh, l->polls, poll_id, strlen(poll_id), lp);
    return lp;
}

/* Why a poll's options are bad, or NULL; *at is the position to name in the key. */
static const char *options_bad(const tly_poll_row_t *p, char *why, size_t cap, int *at)
{
    /* Ballots name options by a byte: 256 positions at most. */
    if (p->noptions > 256) {
        *at = 256;
        snprintf(why, cap, "%zu options: positions are bytes, 256 at most", p->noptions);
        return why;
    }
    for (size_t i = 0; i < p->noptions; i++) {
        const tly_option_row_t *o = &p->options[i];
        *at = (int)i;
        /* They come sorted by position, so a gap, a duplicate or a negative position
         * shows as the first one out of step. */
        if (o->position != (int)i) {
            snprintf(why, cap, "option positions must run 0..%zu; position %zu is not there", p->noptions - 1, i);
            return why;
        }
        if (o->option_id == NULL || o->text == NULL) {
            snprintf(why, cap, "%s is NULL", o->option_id == NULL ? "option_id" : "text");
            return why;
        }
    }
    return NULL;
}

static int bad_poll(tly_load_t *l, const tly_poll_row_t *p, const char *why)
{
    char key[TLY_LOAD_KEY_MAX];
    tly_load_key(key, "poll_id", p->poll_id, NULL);
    return tly_load_bad(l, "polls", key, why);
}

int tly_load_poll(tly_load_t *l, const tly_poll_row_t *p)
{
    char why[128];
    const char *cb_why = NULL, *bad;
    static const char *const names[] = {"poll_id", "owner_id", "title", "settings"};
    const char *values[] = {p->poll_id, p->owner_id, p->title, p->settings_json};
    int at = 0, rc;

    const char *null = missing(names, values, 4);
    if (p->poll_id != NULL && find_poll(l, p->poll_id) != NULL)
        return bad_poll(l, p, "a second row with this poll_id"); /* the first stays what ballots refer to */
    if (null != NULL) {
        bad_poll(l, p, null_why(why, sizeof why, null));
        /* its ballots are bad too (with no poll_id, they name a poll load has not seen) */
        return p->poll_id != NULL ? remember_poll(l, p->poll_id, 0, 1) : 0;
    }
    if ((bad = options_bad(p, why, sizeof why, &at)) != NULL) {
        char pos[16], key[TLY_LOAD_KEY_MAX];
        snprintf(pos, sizeof pos, "%d", at);
        tly_load_key(key, "poll_id", p->poll_id, "position", pos, NULL);
        tly_load_bad(l, "options", key, bad);
        return remember_poll(l, p->poll_id, 0, 1);
    }
    rc = l->cb->poll != NULL ? l->cb->poll(l->ctx, p, &cb_why) : 0;
    if (rc == TLY_EINVAL)
        bad_poll(l, p, callback_why(cb_why));
    else if (rc != 0)
        return rc;
    return remember_poll(l, p->poll_id, p->noptions, rc != 0);
}

static int bad_ballot(tly_load_t *l, const tly_ballot_row_t *b, int64_t seq, const char *why)
{
    char key[TLY_LOAD_KEY_MAX], seqs[24];
    snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
    tly_load_key(key, "seq", seqs, "poll_id", b->poll_id, "voter_id", b->voter_id, NULL);
    return tly_load_bad(l, "ballots", key, why);
}

int tly_load_ballot(tly_load_t *l, const tly_ballot_row_t *b, int64_t seq)
{
    char why[128];
    const char *cb_why = NULL;
    static const char *const names[] = {"poll_id", "voter_id", "vote_id", "receipt"};
    const char *values[] = {b->poll_id, b->voter_id, b->vote_id, b->receipt};
    uint64_t named[4] = {0}; /* a bit per option position */

    const char *null = missing(names, values, 4);
    if (null != NULL)
        return bad_ballot(l, b, seq, null_why(why, sizeof why, null));
    struct load_poll *lp = find_poll(l, b->poll_id);
    if (lp == NULL)
        return bad_ballot(l, b, seq, "no poll with this poll_id");
    if (lp->left_out)
        return bad_ballot(l, b, seq, "its poll is a bad row");
    for (size_t i = 0; i < b->nchoices; i++) {
        uint8_t c = b->choices[i];
        if (c >= lp->noptions) {
            snprintf(why, sizeof why, "choice position %u is outside the poll's %zu options", (unsigned)c,
                     lp->noptions);
            return bad_ballot(l, b, seq, why);
        }
        if (named[c >> 6] & (1ull << (c & 63))) {
            snprintf(why, sizeof why, "choice position %u is named twice", (unsigned)c);
            return bad_ballot(l, b, seq, why);
        }
        named[c >> 6] |= 1ull << (c & 63);
    }
    int rc = l->cb->ballot != NULL ? l->cb->ballot(l->ctx, b, &cb_why) : 0;
    return rc == TLY_EINVAL ? bad_ballot(l, b, seq, callback_why(cb_why)) : rc;
}

static int bad_request(tly_load_t *l, const tly_request_row_t *r, const char *why)
{
    char key[TLY_LOAD_KEY_MAX];
    tly_load_key(key, "request_id", r->request_id, NULL);
    return tly_load_bad(l, "vote_requests", key, why);
}

int tly_load_request(tly_load_t *l, const tly_request_row_t *r)
{
    char why[64];
    const char *cb_why = NULL;
    static const char *const names[] = {"request_id", "poll_id", "voter_id", "state"};
    const char *values[] = {r->request_id, r->poll_id, r->voter_id, r->state};

    /* No check of the poll: an outcome is kept even for a poll that never existed
     * (the schema's comment on vote_requests). */
    const char *null = missing(names, values, 4);
    if (null != NULL)
        return bad_request(l, r, null_why(why, sizeof why, null));
    if (strcmp(r->state, "pending") != 0 && strcmp(r->state, "completed") != 0 && strcmp(r->state, "failed") != 0)
        return bad_request(l, r, "state is not pending, completed or failed");
    int rc = l->cb->request != NULL ? l->cb->request(l->ctx, r, &cb_why) : 0;
    return rc == TLY_EINVAL ? bad_request(l, r, callback_why(cb_why)) : rc;
}

static int bad_retracted(tly_load_t *l, int64_t seq, const char *why)
{
    char key[TLY_LOAD_KEY_MAX], seqs[24];
    snprintf(seqs, sizeof seqs, "%lld", (long long)seq);
    tly_load_key(key, "seq", seqs, NULL);
    return tly_load_bad(l, "audit", key, why);
}

int tly_load_retracted(tly_load_t *l, const tly_retracted_row_t *r, int64_t seq)
{
    char why[64];
    const char *cb_why = NULL;
    static const char *const names[] = {"poll_id", "voter_id", "idem_key"};
    const char *values[] = {r->poll_id, r->voter_id, r->idem_key};

    const char *null = missing(names, values, 3);
    if (null != NULL)
        return bad_retracted(l, seq, null_why(why, sizeof why, null));
    int rc = l->cb->retracted != NULL ? l->cb->retracted(l->ctx, r, &cb_why) : 0;
    return rc == TLY_EINVAL ? bad_retracted(l, seq, callback_why(cb_why)) : rc;
}

int tly_load_cast(tly_load_t *l, const tly_ballot_row_t *b, int64_t seq)
{
    char why[128];
    const char *cb_why = NULL;
    struct load_poll *lp = find_poll(l, b->poll_id);
    if (lp == NULL || lp->left_out)
        return 0; /* its ballot was a bad row already (the ballots come first) */
    for (size_t i = 0; i < b->nchoices; i++)
        if (b->choices[i] >= lp->noptions) {
            snprintf(why, sizeof why, "cast choice position %u is outside the poll's %zu options",
                     (unsigned)b->choices[i], lp->noptions);
            return bad_ballot(l, b, seq, why);
        }
    int rc = l->cb->cast != NULL ? l->cb->cast(l->ctx, b, &cb_why) : 0;
    return rc == TLY_EINVAL ? bad_ballot(l, b, seq, callback_why(cb_why)) : rc;
}

int tly_load_finish(tly_load_t *l, int rc)
{
    struct load_poll *lp, *tmp;
    HASH_ITER(hh, l->polls, lp, tmp) {
        HASH_DEL(l->polls, lp);
        tly_free(lp);
    }
    if (rc < 0)
        return rc;
    if (l->bad == 0)
        return 0;
    if (l->cb->skip_bad_rows)
        return l->bad > INT_MAX ? INT_MAX : (int)l->bad;
    char n[24], listed[24];
    snprintf(n, sizeof n, "%zu", l->bad);
    snprintf(listed, sizeof listed, "%zu", l->bad < BAD_LOGGED_MAX ? l->bad : (size_t)BAD_LOGGED_MAX);
    tly_log(TLY_LOG_ERROR, "store: not loaded: it has bad rows", "bad_rows", n, "listed", listed, NULL);
    return TLY_EINVAL;
}
