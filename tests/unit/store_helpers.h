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
#include <jansson.h>
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

/* Two choices that fit every poll poll_op makes (2 or 3 options): load refuses a ballot
 * naming an option its poll does not have. */
static const uint8_t choices2[] = {0, 1};
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
    char join_codes[64][8];    /* "" when none */
    char ballot_vote_ids[16][32];
    char req_ids[8][32], req_state[8][32], req_vote[8][32], req_error[8][32];
} seen_t;

static int see_user(void *ctx, const tly_user_row_t *u, const char **why)
{
    ((seen_t *)ctx)->users++;
    return 0;
}

static int see_poll(void *ctx, const tly_poll_row_t *p, const char **why)
{
    seen_t *seen = ctx;
    if (seen->polls < 8) {
        snprintf(seen->poll_ids[seen->polls], 32, "%s", p->poll_id);
        seen->noptions[seen->polls] = p->noptions;
        snprintf(seen->final_results[seen->polls], 64, "%s",
                 p->final_results ? p->final_results : "(null)");
    }
    if (seen->polls < 64)
        snprintf(seen->join_codes[seen->polls], 8, "%s", p->join_code ? p->join_code : "");
    seen->polls++;
    return 0;
}

static int see_ballot(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    seen_t *seen = ctx;
    if (seen->ballots < 16)
        snprintf(seen->ballot_vote_ids[seen->ballots], 32, "%s", b->vote_id);
    seen->ballots++;
    return 0;
}

static int see_request(void *ctx, const tly_request_row_t *r, const char **why)
{
    seen_t *seen = ctx;
    int i = seen->requests++;
    if (i >= 8)
        return 0;
    snprintf(seen->req_ids[i], 32, "%s", r->request_id);
    snprintf(seen->req_state[i], 32, "%s", r->state);
    snprintf(seen->req_vote[i], 32, "%s", r->vote_id ? r->vote_id : "(null)");
    snprintf(seen->req_error[i], 32, "%s", r->error ? r->error : "(null)");
    return 0;
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

static int see_generated(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    gen_seen_t *g = ctx;
    g->rows++;
    if (b->nchoices != 1 || b->choices[0] >= 3 || b->scores != NULL)
        g->bad_choice++;
    return 0;
}

/* ---- bad rows: what load hands over and what it logs ------------------------------------ */

/* Rows load handed over, by table, with the voters of its ballots. The callbacks refuse
 * what the test asks them to, as memory does (persist.c): a second ballot of a voter
 * in a poll, and any row at all when refuse_all is set (with ENOMEM when enomem). */
typedef struct {
    int users, polls, ballots, requests, retracted;
    char voters[16][40]; /* "<poll_id>/<voter_id>" of each ballot taken */
    int refuse_duplicates, refuse_all, enomem;
} bad_seen_t;

static int bad_refuse(bad_seen_t *b, const char **why)
{
    if (b->enomem)
        return TLY_ENOMEM;
    if (!b->refuse_all)
        return 0;
    *why = "the test refuses every row";
    return TLY_EINVAL;
}

static int bad_user(void *ctx, const tly_user_row_t *u, const char **why)
{
    bad_seen_t *b = ctx;
    int rc = bad_refuse(b, why);
    b->users += rc == 0;
    return rc;
}

static int bad_poll(void *ctx, const tly_poll_row_t *p, const char **why)
{
    bad_seen_t *b = ctx;
    int rc = bad_refuse(b, why);
    b->polls += rc == 0;
    return rc;
}

static int bad_ballot(void *ctx, const tly_ballot_row_t *r, const char **why)
{
    bad_seen_t *b = ctx;
    char pv[40];
    int rc = bad_refuse(b, why);
    if (rc != 0)
        return rc;
    snprintf(pv, sizeof pv, "%s/%s", r->poll_id, r->voter_id);
    for (int i = 0; b->refuse_duplicates && i < b->ballots && i < 16; i++)
        if (strcmp(b->voters[i], pv) == 0) {
            *why = "the voter already has a ballot in this poll";
            return TLY_EINVAL;
        }
    if (b->ballots < 16)
        snprintf(b->voters[b->ballots], sizeof b->voters[0], "%s", pv);
    b->ballots++;
    return 0;
}

static int bad_request(void *ctx, const tly_request_row_t *r, const char **why)
{
    bad_seen_t *b = ctx;
    int rc = bad_refuse(b, why);
    b->requests += rc == 0;
    return rc;
}

static int bad_retracted(void *ctx, const tly_retracted_row_t *r, const char **why)
{
    bad_seen_t *b = ctx;
    int rc = bad_refuse(b, why);
    b->retracted += rc == 0;
    return rc;
}

/* Loads s with the bad_* callbacks into *seen (cleared first, flags kept). */
static int bad_load(tly_store_t *s, bad_seen_t *seen, int skip_bad_rows)
{
    tly_store_load_cb_t cb = {.user = bad_user,
                              .poll = bad_poll,
                              .ballot = bad_ballot,
                              .request = bad_request,
                              .retracted = bad_retracted,
                              .skip_bad_rows = skip_bad_rows};
    bad_seen_t flags = *seen;
    *seen = (bad_seen_t){.refuse_duplicates = flags.refuse_duplicates,
                         .refuse_all = flags.refuse_all,
                         .enomem = flags.enomem};
    return tly_store_load(s, &cb, seen);
}

/* Load's log lines go to stderr. A test that checks them sends stderr to a temporary
 * file meanwhile. */
typedef struct {
    int saved;
    FILE *f;
} log_capture_t;

static void log_capture_start(log_capture_t *c)
{
    fflush(stderr);
    c->f = tmpfile();
    cr_assert_not_null(c->f);
    c->saved = dup(STDERR_FILENO);
    cr_assert_geq(c->saved, 0);
    cr_assert_geq(dup2(fileno(c->f), STDERR_FILENO), 0);
}

/* What was logged since log_capture_start (the caller frees it); it is also written to
 * the real stderr, so that the test's output shows it. */
static char *log_capture_end(log_capture_t *c)
{
    fflush(stderr);
    cr_assert_geq(dup2(c->saved, STDERR_FILENO), 0);
    close(c->saved);
    off_t n = lseek(fileno(c->f), 0, SEEK_END); /* the log writes with write(2) */
    cr_assert_geq(n, 0);
    char *text = calloc(1, (size_t)n + 1);
    cr_assert_not_null(text);
    cr_assert_eq(pread(fileno(c->f), text, (size_t)n, 0), n);
    fclose(c->f);
    (void)!write(STDERR_FILENO, text, (size_t)n);
    return text;
}

/* How many lines of text are JSON log lines at `level` with message `msg` whose
 * "table" is table and whose "key" and "reason" contain key and reason (each NULL:
 * any). */
static int log_count(const char *text, const char *level, const char *msg, const char *table, const char *key,
                     const char *reason)
{
    int n = 0;
    for (const char *line = text; *line != '\0';) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        json_t *o = json_loadb(line, len, 0, NULL);
        const char *lv = json_string_value(json_object_get(o, "level")),
                   *m = json_string_value(json_object_get(o, "msg")),
                   *t = json_string_value(json_object_get(o, "table")),
                   *k = json_string_value(json_object_get(o, "key")),
                   *r = json_string_value(json_object_get(o, "reason"));
        if (lv != NULL && m != NULL && strcmp(lv, level) == 0 && strcmp(m, msg) == 0 &&
            (table == NULL || (t != NULL && strcmp(t, table) == 0)) &&
            (key == NULL || (k != NULL && strstr(k, key) != NULL)) &&
            (reason == NULL || (r != NULL && strstr(r, reason) != NULL)))
            n++;
        json_decref(o);
        line += len + (end != NULL);
    }
    return n;
}

/* A bad row and what load must say about it: stores' tests damage a store in each of
 * these ways (SQL of their own) and check both answers. */
typedef struct {
    const char *name;
    const char *table, *key, *reason; /* the log line's (key and reason: substrings) */
    int left_out;                     /* rows --skip-bad-rows leaves out */
    int polls, ballots, requests, retracted; /* what that load then hands over */
} bad_kind_t;

/* Loads the damaged store s twice and checks both answers: without skip_bad_rows the
 * load fails with TLY_EINVAL and an error line names the row; with it the load returns
 * the rows left out, a warn line names each, and the callbacks saw the rest. */
static void check_bad_kind(tly_store_t **sp, const bad_kind_t *k)
{
    log_capture_t cap;
    bad_seen_t seen = {0};
    log_capture_start(&cap);
    int rc = bad_load(*sp, &seen, 0);
    char *log = log_capture_end(&cap);
    cr_assert_eq(rc, TLY_EINVAL, "%s: load returned %d", k->name, rc);
    cr_assert_eq(log_count(log, "error", "store: bad row", k->table, k->key, k->reason), 1,
                 "%s: no error line naming table %s, key %s, reason %s", k->name, k->table, k->key, k->reason);
    cr_assert_eq(log_count(log, "error", "store: not loaded: it has bad rows", NULL, NULL, NULL), 1, "%s", k->name);
    free(log);

    tly_store_close(*sp); /* a load is the first thing an open store does */
    *sp = open_store();
    seen = (bad_seen_t){0};
    log_capture_start(&cap);
    rc = bad_load(*sp, &seen, 1);
    log = log_capture_end(&cap);
    cr_assert_eq(rc, k->left_out, "%s: load with skip_bad_rows returned %d", k->name, rc);
    cr_assert_eq(log_count(log, "warn", "store: bad row left out", k->table, k->key, k->reason), 1, "%s", k->name);
    cr_assert_eq(log_count(log, "warn", "store: bad row left out", NULL, NULL, NULL), k->left_out, "%s", k->name);
    cr_assert_eq(log_count(log, "error", "store: bad row", NULL, NULL, NULL), 0, "%s", k->name);
    cr_assert_eq(seen.polls, k->polls, "%s", k->name);
    cr_assert_eq(seen.ballots, k->ballots, "%s", k->name);
    cr_assert_eq(seen.requests, k->requests, "%s", k->name);
    cr_assert_eq(seen.retracted, k->retracted, "%s", k->name);
    free(log);
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
