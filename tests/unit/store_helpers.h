/*
 * store_helpers.h: what the SQLite and PostgreSQL store suites (test_store.c,
 * test_store_pg.c) share: the pipe the stores notify on, the rows both write, and the
 * load and page callbacks that copy out what a store hands back (rows die after the
 * callback). store_scenarios.h builds the scenarios both suites run on these.
 *
 * Header-only, because each unit suite is built from its one .c file (the Makefile's
 * UNIT_BIN rule). Everything is static; both suites use all of it, so -Wunused-function
 * keeps dead helpers out. The including file defines, for its backend:
 *   open_store()        a store on the test's fresh data directory or database, opened
 *                       the same way every time, so a reopen sees what the last one wrote;
 *   wait_done(s, n)     reaps s until n done callbacks have run in total.
 */
#ifndef TALLY_TESTS_STORE_HELPERS_H
#define TALLY_TESTS_STORE_HELPERS_H

#include "base/base.h"
#include "store/store.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static tly_store_t *open_store(void);
static void wait_done(tly_store_t *s, int target);

/* ---- notify pipe and done callbacks -------------------------------------------------- */

static int pipefd[2];
static atomic_int notifies;
static int ndone;

/* The stores' notify: a byte on the pipe the test waits on, as the event loop's wakeup. */
static void notify(void *arg)
{
    char c = 1;
    atomic_fetch_add(&notifies, 1);
    (void)!write(pipefd[1], &c, 1); /* non-blocking: a full pipe already wakes the reader */
}

static void on_done(tly_store_op_t *op)
{
    ndone++;
}

/* Done callbacks may free their op: the store must not touch it afterwards (ASan). */
static void free_done(tly_store_op_t *op)
{
    ndone++;
    free(op);
}

static void open_notify_pipe(void)
{
    cr_assert_eq(pipe2(pipefd, O_NONBLOCK | O_CLOEXEC), 0);
    atomic_store(&notifies, 0);
    ndone = 0;
}

static void close_notify_pipe(void)
{
    close(pipefd[0]);
    close(pipefd[1]);
}

static void submit_wait(tly_store_t *s, tly_store_op_t *op)
{
    int target = ndone + 1;
    op->done = on_done;
    tly_store_submit(s, op);
    wait_done(s, target);
}

/* Submits ops[0..n-1] as one list (one batch, batch_max permitting) and waits for all. */
static void submit_chain(tly_store_t *s, tly_store_op_t *ops, int n)
{
    int target = ndone + n;
    for (int i = 0; i < n; i++) {
        ops[i].done = on_done;
        ops[i].next = i + 1 < n ? &ops[i + 1] : NULL;
    }
    tly_store_submit_list(s, &ops[0]);
    wait_done(s, target);
}

static int str_eq(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* ---- rows ---------------------------------------------------------------------------- */

static const tly_option_row_t opts1[] = {
    {.option_id = "optA", .text = "Red", .display_order = 2, .position = 0},
    {.option_id = "optB", .text = "Green \xc3\xa9", .display_order = 0, .position = 1},
    {.option_id = "optC", .text = "Blue", .display_order = 1, .position = 2},
};
static const tly_option_row_t opts2[] = {
    {.option_id = "optX", .text = "Yes", .display_order = 0, .position = 0},
    {.option_id = "optY", .text = "No", .display_order = 1, .position = 1},
};

static tly_store_op_t poll_op(const char *poll_id, int nopts)
{
    tly_store_op_t op = {.type = TLY_OP_POLL_INSERT};
    tly_poll_row_t *p = &op.u.poll;
    p->poll_id = poll_id;
    p->owner_id = "user1";
    p->title = "Favourite colour";
    p->type = 2;
    p->status = 1;
    p->settings_json = "{\"max_choices\":2}";
    p->created_at = 1700000000000;
    p->updated_at = 1700000000000;
    p->noptions = (size_t)nopts;
    p->options = nopts == 3 ? opts1 : opts2;
    return op;
}

static const uint8_t choices2[] = {0, 2};
static const uint8_t scores2[] = {5, 9};

static tly_store_op_t ballot_op(const char *poll_id, const char *voter, const char *vote_id,
                                const char *receipt)
{
    tly_store_op_t op = {.type = TLY_OP_BALLOT_INSERT};
    tly_ballot_row_t *b = &op.u.ballot;
    b->poll_id = poll_id;
    b->voter_id = voter;
    b->vote_id = vote_id;
    b->receipt = receipt;
    b->nchoices = 2;
    b->choices = choices2;
    b->recorded_at = 1700000001000;
    return op;
}

/* A TLY_OP_BALLOT_REPLACE or TLY_OP_BALLOT_DELETE of voter's ballot in poll_id. */
/* A change (BALLOT_REPLACE) or retraction (BALLOT_DELETE) of the ballot `seq` names:
 * what the insert (or load) gave back in u.ballot.seq. PostgreSQL ignores seq. */
static tly_store_op_t change_op(tly_op_type_t type, const char *poll_id, const char *voter,
                                int64_t at, int64_t seq)
{
    tly_store_op_t op = {.type = type};
    op.u.ballot.seq = seq;
    op.u.ballot.poll_id = poll_id;
    op.u.ballot.voter_id = voter;
    op.u.ballot.recorded_at = at;
    return op;
}

/* ---- what load hands back ------------------------------------------------------------ */

typedef struct {
    int users, polls, ballots, requests;
    char poll_ids[8][32];
    size_t noptions[8];
    char final_results[8][64]; /* "(null)" when none */
    char ballot_vote_ids[16][32];
    char req_ids[8][32], req_state[8][32], req_vote[8][32], req_error[8][32];
} seen_t;

static void see_user(void *ctx, const tly_user_row_t *u)
{
    ((seen_t *)ctx)->users++;
}

static void see_poll(void *ctx, const tly_poll_row_t *p)
{
    seen_t *seen = ctx;
    if (seen->polls < 8) {
        snprintf(seen->poll_ids[seen->polls], 32, "%s", p->poll_id);
        seen->noptions[seen->polls] = p->noptions;
        snprintf(seen->final_results[seen->polls], 64, "%s",
                 p->final_results ? p->final_results : "(null)");
    }
    seen->polls++;
}

static void see_ballot(void *ctx, const tly_ballot_row_t *b)
{
    seen_t *seen = ctx;
    if (seen->ballots < 16)
        snprintf(seen->ballot_vote_ids[seen->ballots], 32, "%s", b->vote_id);
    seen->ballots++;
}

static void see_request(void *ctx, const tly_request_row_t *r)
{
    seen_t *seen = ctx;
    int i = seen->requests++;
    if (i >= 8)
        return;
    snprintf(seen->req_ids[i], 32, "%s", r->request_id);
    snprintf(seen->req_state[i], 32, "%s", r->state);
    snprintf(seen->req_vote[i], 32, "%s", r->vote_id ? r->vote_id : "(null)");
    snprintf(seen->req_error[i], 32, "%s", r->error ? r->error : "(null)");
}

static const tly_store_load_cb_t seen_cb = {
    .user = see_user, .poll = see_poll, .ballot = see_ballot, .request = see_request};

/* Closes, reopens and loads: what a restart would see. */
/* Load gave back exactly the ballots with these vote ids (NULL-terminated), in order. */
static void assert_ballot_ids(const seen_t *seen, const char *const *ids)
{
    int n = 0;
    for (; ids[n] != NULL; n++)
        cr_assert_str_eq(seen->ballot_vote_ids[n], ids[n], "ballot %d", n);
    cr_assert_eq(seen->ballots, n);
}

static tly_store_t *reopen_load(tly_store_t *s, seen_t *seen)
{
    tly_store_close(s);
    s = open_store();
    memset(seen, 0, sizeof *seen);
    cr_assert_eq(tly_store_load(s, &seen_cb, seen), 0);
    return s;
}

/* Ballots generated by tly_store_generate_ballots: one choice of three, no scores. */
typedef struct {
    int rows, bad_choice;
} gen_seen_t;

static void see_generated(void *ctx, const tly_ballot_row_t *b)
{
    gen_seen_t *g = ctx;
    g->rows++;
    if (b->nchoices != 1 || b->choices[0] >= 3 || b->scores != NULL)
        g->bad_choice++;
}

/* ---- what the page reads hand back ---------------------------------------------------- */

/* Current ballots copied out of a page callback. */
typedef struct {
    int n;
    int64_t seq[16];
    char voter[16][32], vote_id[16][32], receipt[16][32], idem[16][32];
    uint8_t nchoices[16], choices[16][8], scores[16][8];
    int has_scores[16];
    int64_t at[16];
    uint8_t body_hash[16][16];
} ballots_seen_t;

static void see_page_ballot(void *ctx, const tly_ballot_row_t *b, int64_t seq)
{
    ballots_seen_t *bs = ctx;
    int i = bs->n++;
    cr_assert_lt(i, 16);
    bs->seq[i] = seq;
    snprintf(bs->voter[i], 32, "%s", b->voter_id);
    snprintf(bs->vote_id[i], 32, "%s", b->vote_id);
    snprintf(bs->receipt[i], 32, "%s", b->receipt);
    snprintf(bs->idem[i], 32, "%s", b->idem_key ? b->idem_key : "(null)");
    bs->nchoices[i] = b->nchoices;
    cr_assert_leq(b->nchoices, 8);
    if (b->choices)
        memcpy(bs->choices[i], b->choices, b->nchoices);
    bs->has_scores[i] = b->scores != NULL;
    if (b->scores)
        memcpy(bs->scores[i], b->scores, b->nchoices);
    bs->at[i] = b->recorded_at;
    memcpy(bs->body_hash[i], b->body_hash, 16);
    cr_assert_null(b->request_id);
    cr_assert_null(b->ip_hash);
}

/* Audit rows copied out of a page callback. */
typedef struct {
    int n;
    int64_t seq[16];
    char poll[16][32], voter[16][32], event[16][16];
    uint8_t nchoices[16], choices[16][8], scores[16][8];
    int has_choices[16], has_scores[16];
    int64_t at[16];
} audit_seen_t;

static void see_audit(void *ctx, const tly_audit_row_t *a)
{
    audit_seen_t *as = ctx;
    int i = as->n++;
    cr_assert_lt(i, 16);
    as->seq[i] = a->seq;
    snprintf(as->poll[i], 32, "%s", a->poll_id);
    snprintf(as->voter[i], 32, "%s", a->voter_id);
    snprintf(as->event[i], 16, "%s", a->event);
    as->nchoices[i] = a->nchoices;
    as->has_choices[i] = a->choices != NULL;
    as->has_scores[i] = a->scores != NULL;
    cr_assert_leq(a->nchoices, 8);
    if (a->choices)
        memcpy(as->choices[i], a->choices, a->nchoices);
    if (a->scores)
        memcpy(as->scores[i], a->scores, a->nchoices);
    as->at[i] = a->at;
}

/* Every audit row of a poll, through a reader opened for the occasion. */
static void read_audit(tly_store_t *s, const char *poll_id, audit_seen_t *as)
{
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    memset(as, 0, sizeof *as);
    int n = tly_store_audit_page(r, poll_id, 0, 100, see_audit, as);
    cr_assert_eq(n, as->n);
    cr_assert_eq(tly_store_audit_page(r, poll_id, n ? as->seq[n - 1] : 0, 100, see_audit, as), 0);
    tly_store_reader_close(r);
}

/* ---- walks over many pages ------------------------------------------------------------- */

/* Walk state: every voter "voter<i>" must be seen once, in ascending seq. */
typedef struct {
    int64_t last_seq;
    int rows, out_of_order, foreign;
    unsigned char *seen; /* counts per voter index */
    int nvoters;
} walk_t;

static void walk_note(walk_t *w, int64_t seq, const char *poll_id, const char *voter)
{
    int i;
    if (seq <= w->last_seq)
        w->out_of_order++;
    w->last_seq = seq;
    w->rows++;
    if (strcmp(poll_id, "poll1") != 0 || sscanf(voter, "voter%d", &i) != 1 || i < 0 || i >= w->nvoters)
        w->foreign++;
    else if (w->seen[i] < 255)
        w->seen[i]++;
}

static void walk_ballot(void *ctx, const tly_ballot_row_t *b, int64_t seq)
{
    walk_note(ctx, seq, b->poll_id, b->voter_id);
}

static void walk_audit(void *ctx, const tly_audit_row_t *a)
{
    walk_note(ctx, a->seq, a->poll_id, a->voter_id);
}

/* Submits ballots voter<from>..voter<to-1> for poll1, each followed by one for poll2 so
 * the two polls' rows interleave, and waits for them. ids is indexed by voter (two
 * entries each), ops from 0 for this call. */
typedef char ids_t[3][40]; /* voter id, vote id, receipt */

static void cast_range(tly_store_t *s, int from, int to, ids_t *ids, tly_store_op_t *ops)
{
    int n = 0;
    for (int i = from; i < to; i++) {
        for (int k = 0; k < 2; k++) {
            char(*id)[40] = ids[2 * i + k];
            snprintf(id[0], 40, "voter%d", i);
            snprintf(id[1], 40, "v_%d_%d", k, i);
            snprintf(id[2], 40, "r_%d_%d", k, i);
            ops[n++] = ballot_op(k == 0 ? "poll1" : "poll2", id[0], id[1], id[2]);
        }
    }
    if (n == 0)
        return;
    submit_chain(s, ops, n);
    for (int i = 0; i < n; i++)
        cr_assert_eq(ops[i].result, 0, "ballot %d: %d", i, ops[i].result);
}

#endif
