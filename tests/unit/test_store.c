/*
 * test_store.c: the SQLite store. Each test opens a store in a fresh temporary
 * directory, writes through the group-commit writer, and (where durability is the
 * point) closes, reopens and loads everything back.
 *
 * The done callbacks run in tly_store_reap on the test thread; the store's notify
 * writes a byte to a pipe that the test waits on, as the event loop would.
 */
#include "base/base.h"
#include "store/store_int.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[64];
static int pipefd[2];
static atomic_int notifies;
static int ndone;

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

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/tally-store-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    cr_assert_eq(pipe2(pipefd, O_NONBLOCK | O_CLOEXEC), 0);
    atomic_store(&notifies, 0);
    ndone = 0;
}

static void teardown(void)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    close(pipefd[0]);
    close(pipefd[1]);
}

TestSuite(store, .init = setup, .fini = teardown);

static tly_store_t *open_store_max(size_t batch_max)
{
    char sub[128];
    tly_store_t *s = NULL;
    /* A nested directory that does not exist yet: open creates it (mkdir -p). */
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    tly_store_conf_t conf = {.data_dir = sub, .batch_max = batch_max, .notify = notify};
    cr_assert_eq(tly_store_open(&conf, &s), 0);
    cr_assert_not_null(s);
    cr_assert(tly_store_writable(s));
    return s;
}

static tly_store_t *open_store(void)
{
    return open_store_max(0);
}

/* Reaps until `target` done callbacks have run in total. */
static void wait_done(tly_store_t *s, int target)
{
    char buf[256];
    tly_store_reap(s);
    while (ndone < target) {
        struct pollfd p = {.fd = pipefd[0], .events = POLLIN};
        cr_assert_gt(poll(&p, 1, 20000), 0, "store did not notify (%d of %d done)", ndone, target);
        while (read(pipefd[0], buf, sizeof buf) > 0)
            ;
        tly_store_reap(s);
    }
}

static void submit_wait(tly_store_t *s, tly_store_op_t *op)
{
    int target = ndone + 1;
    op->done = on_done;
    tly_store_submit(s, op);
    wait_done(s, target);
}

static int str_eq(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* ---- fixtures ----------------------------------------------------------------------- */

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

/* Load callbacks that copy what they see (rows die after the callback). */
typedef struct {
    int users, polls, ballots, requests;
    char poll_ids[8][32];
    size_t noptions[8];
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

static const tly_store_load_cb_t seen_cb = {see_user, see_poll, see_ballot, see_request};

/* Closes, reopens and loads: what a restart would see. */
static tly_store_t *reopen_load(tly_store_t *s, seen_t *seen)
{
    tly_store_close(s);
    s = open_store();
    memset(seen, 0, sizeof *seen);
    cr_assert_eq(tly_store_load(s, &seen_cb, seen), 0);
    return s;
}

/* ---- round trip --------------------------------------------------------------------- */

static tly_store_op_t rt_ops[6];

static void rt_user(void *ctx, const tly_user_row_t *u)
{
    int *n = ctx;
    const tly_user_row_t *e = &rt_ops[n[0]].u.user;
    cr_assert_lt(n[0], 2);
    cr_assert_str_eq(u->user_id, e->user_id);
    cr_assert_str_eq(u->username, e->username);
    cr_assert_str_eq(u->password_hash, e->password_hash);
    cr_assert(str_eq(u->email, e->email));
    cr_assert_eq(u->created_at, e->created_at);
    n[0]++;
}

static void rt_poll(void *ctx, const tly_poll_row_t *p)
{
    int *n = ctx;
    cr_assert_lt(n[1], 2);
    const tly_poll_row_t *e = &rt_ops[2 + n[1]].u.poll;
    cr_assert_str_eq(p->poll_id, e->poll_id);
    cr_assert_str_eq(p->owner_id, e->owner_id);
    cr_assert_str_eq(p->title, e->title);
    cr_assert(str_eq(p->description, e->description));
    cr_assert_eq(p->type, e->type);
    cr_assert_eq(p->status, e->status);
    cr_assert_eq(p->start_time, e->start_time);
    cr_assert_eq(p->end_time, e->end_time);
    cr_assert_eq(p->created_at, e->created_at);
    cr_assert_eq(p->updated_at, e->updated_at);
    cr_assert_str_eq(p->settings_json, e->settings_json);
    cr_assert(str_eq(p->idem_key, e->idem_key));
    cr_assert_arr_eq(p->body_hash, e->body_hash, 16);
    cr_assert_eq(p->noptions, e->noptions);
    for (size_t i = 0; i < p->noptions; i++) {
        cr_assert_str_eq(p->options[i].option_id, e->options[i].option_id);
        cr_assert_str_eq(p->options[i].text, e->options[i].text);
        cr_assert_eq(p->options[i].display_order, e->options[i].display_order);
        cr_assert_eq(p->options[i].position, (int)i);
    }
    n[1]++;
}

static void rt_ballot(void *ctx, const tly_ballot_row_t *b)
{
    int *n = ctx;
    cr_assert_lt(n[2], 2);
    const tly_ballot_row_t *e = &rt_ops[4 + n[2]].u.ballot;
    cr_assert_str_eq(b->poll_id, e->poll_id);
    cr_assert_str_eq(b->voter_id, e->voter_id);
    cr_assert_str_eq(b->vote_id, e->vote_id);
    cr_assert_str_eq(b->receipt, e->receipt);
    cr_assert_eq(b->nchoices, e->nchoices);
    cr_assert_arr_eq(b->choices, e->choices, e->nchoices);
    if (e->scores == NULL)
        cr_assert_null(b->scores);
    else
        cr_assert_arr_eq(b->scores, e->scores, e->nchoices);
    cr_assert_eq(b->recorded_at, e->recorded_at);
    cr_assert(str_eq(b->idem_key, e->idem_key));
    cr_assert_arr_eq(b->body_hash, e->body_hash, 16);
    cr_assert(str_eq(b->client_meta, e->client_meta));
    cr_assert_null(b->request_id);
    n[2]++;
}

static void rt_request(void *ctx, const tly_request_row_t *r)
{
    ((int *)ctx)[3]++;
}

Test(store, round_trip_every_field)
{
    tly_store_t *s = open_store();

    rt_ops[0] = (tly_store_op_t){.type = TLY_OP_USER_INSERT,
                                 .u.user = {"user1", "Alice", "$argon2id$v=19$x", "a@example.org",
                                            1699999999000}};
    rt_ops[1] = (tly_store_op_t){.type = TLY_OP_USER_INSERT,
                                 .u.user = {"user2", "bob", "$argon2id$v=19$y", NULL, 1699999999500}};
    rt_ops[2] = poll_op("poll1", 3);
    rt_ops[2].u.poll.description = "Pick up to two";
    rt_ops[2].u.poll.start_time = 1700000000500;
    rt_ops[2].u.poll.end_time = 1800000000000;
    rt_ops[2].u.poll.idem_key = "idem-poll-1";
    for (int i = 0; i < 16; i++)
        rt_ops[2].u.poll.body_hash[i] = (uint8_t)(i + 1);
    rt_ops[3] = poll_op("poll2", 2); /* NULL description, no times, no key, zero hash */
    rt_ops[3].u.poll.created_at = 0;
    rt_ops[3].u.poll.updated_at = 0;
    rt_ops[3].u.poll.type = 4;
    rt_ops[4] = ballot_op("poll1", "voter1", "v_1", "rcpt1");
    rt_ops[4].u.ballot.scores = scores2;
    rt_ops[4].u.ballot.idem_key = "idem-vote-1";
    rt_ops[4].u.ballot.client_meta = "{\"ua\":\"test\"}";
    memset(rt_ops[4].u.ballot.body_hash, 0xab, 16);
    rt_ops[5] = ballot_op("poll2", "voter1", "v_2", "rcpt2");
    rt_ops[5].u.ballot.nchoices = 1;

    for (int i = 0; i < 6; i++) {
        rt_ops[i].done = on_done;
        tly_store_submit(s, &rt_ops[i]);
    }
    wait_done(s, 6);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(rt_ops[i].result, 0, "op %d: %d", i, rt_ops[i].result);
    tly_store_close(s);

    s = open_store();
    int n[4] = {0};
    tly_store_load_cb_t cb = {rt_user, rt_poll, rt_ballot, rt_request};
    cr_assert_eq(tly_store_load(s, &cb, n), 0);
    cr_assert_eq(n[0], 2);
    cr_assert_eq(n[1], 2);
    cr_assert_eq(n[2], 2);
    cr_assert_eq(n[3], 0);
    tly_store_close(s);
}

Test(store, schema_version_and_wal)
{
    char path[160];
    sqlite3 *db;
    sqlite3_stmt *st;
    tly_store_close(open_store());

    snprintf(path, sizeof path, "%s/data/nested/tally.db", dir);
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_eq(sqlite3_column_int(st, 0), TLY_STORE_SCHEMA_VERSION);
    cr_assert_geq(TLY_STORE_SCHEMA_VERSION, 1);
    sqlite3_finalize(st);
    cr_assert_eq(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_str_eq((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);
    sqlite3_close(db);

    /* Reopening an up-to-date store migrates nothing and still works. */
    tly_store_t *s = open_store();
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    tly_store_close(s);
}

/* ---- duplicates --------------------------------------------------------------------- */

Test(store, duplicate_ballot_same_batch_and_later_batch)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    cr_assert_eq(p.result, 0);

    /* Same (poll, voter) twice in one transaction: SQLite's ABORT backs out only the
     * failing INSERT, so the first ballot survives and the batch commits. */
    tly_store_stats_t before, after;
    tly_store_stats(s, &before);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    tly_store_op_t b2 = ballot_op("poll1", "voter1", "v_2", "r_2");
    tly_store_op_t other = ballot_op("poll1", "voter2", "v_3", "r_3");
    b1.done = b2.done = other.done = on_done;
    b1.next = &b2;
    b2.next = &other;
    other.next = NULL;
    tly_store_submit_list(s, &b1);
    wait_done(s, ndone + 3);
    tly_store_stats(s, &after);
    cr_assert_eq(after.batches - before.batches, 1, "the three ballots were one batch");
    cr_assert_eq(after.last_batch_size, 3);
    cr_assert_eq(b1.result, 0);
    cr_assert_eq(b2.result, TLY_EEXIST);
    cr_assert_eq(other.result, 0);

    /* And again in a later batch. */
    tly_store_op_t b3 = ballot_op("poll1", "voter1", "v_4", "r_4");
    submit_wait(s, &b3);
    cr_assert_eq(b3.result, TLY_EEXIST);
    /* A reused vote_id or receipt is a duplicate too. */
    tly_store_op_t b4 = ballot_op("poll1", "voter9", "v_1", "r_9");
    submit_wait(s, &b4);
    cr_assert_eq(b4.result, TLY_EEXIST);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 2);
    cr_assert_str_eq(seen.ballot_vote_ids[0], "v_1");
    cr_assert_str_eq(seen.ballot_vote_ids[1], "v_3");
    tly_store_close(s);
}

Test(store, duplicate_username_is_case_insensitive)
{
    tly_store_t *s = open_store();
    tly_store_op_t u1 = {.type = TLY_OP_USER_INSERT, .u.user = {"u1", "Alice", "h1", NULL, 1}};
    tly_store_op_t u2 = {.type = TLY_OP_USER_INSERT, .u.user = {"u2", "aLICE", "h2", NULL, 2}};
    tly_store_op_t u3 = {.type = TLY_OP_USER_INSERT, .u.user = {"u1", "carol", "h3", NULL, 3}};
    submit_wait(s, &u1);
    submit_wait(s, &u2);
    submit_wait(s, &u3);
    cr_assert_eq(u1.result, 0);
    cr_assert_eq(u2.result, TLY_EEXIST);
    cr_assert_eq(u3.result, TLY_EEXIST, "same user_id");
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.users, 1);
    tly_store_close(s);
}

Test(store, duplicate_poll_id)
{
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll1", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    cr_assert_eq(p1.result, 0);
    cr_assert_eq(p2.result, TLY_EEXIST);
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 3, "the failed insert left no options behind");
    tly_store_close(s);
}

/* ---- async requests ----------------------------------------------------------------- */

Test(store, ballot_with_request_writes_request_row)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);

    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1.u.ballot.request_id = "req1";
    tly_store_op_t b2 = ballot_op("poll1", "voter1", "v_2", "r_2");
    b2.u.ballot.request_id = "req2";
    submit_wait(s, &b1);
    submit_wait(s, &b2);
    cr_assert_eq(b1.result, 0);
    cr_assert_eq(b2.result, TLY_EEXIST);

    /* A consumer replaying req1 after a crash: still a duplicate, and the request's
     * first outcome ("completed") is kept. */
    tly_store_op_t b1again = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1again.u.ballot.request_id = "req1";
    submit_wait(s, &b1again);
    cr_assert_eq(b1again.result, TLY_EEXIST);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 1);
    cr_assert_eq(seen.requests, 2);
    cr_assert_str_eq(seen.req_ids[0], "req1");
    cr_assert_str_eq(seen.req_state[0], "completed");
    cr_assert_str_eq(seen.req_vote[0], "v_1");
    cr_assert_str_eq(seen.req_error[0], "(null)");
    cr_assert_str_eq(seen.req_ids[1], "req2");
    cr_assert_str_eq(seen.req_state[1], "failed");
    cr_assert_str_eq(seen.req_vote[1], "(null)");
    cr_assert_str_eq(seen.req_error[1], "ALREADY_VOTED");
    tly_store_close(s);
}

/* ---- polls -------------------------------------------------------------------------- */

Test(store, poll_delete_removes_options_ballots_requests)
{
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1.u.ballot.request_id = "req1";
    tly_store_op_t b2 = ballot_op("poll1", "voter2", "v_2", "r_2");
    tly_store_op_t b3 = ballot_op("poll2", "voter1", "v_3", "r_3");
    submit_wait(s, &b1);
    submit_wait(s, &b2);
    submit_wait(s, &b3);

    tly_store_op_t del = {.type = TLY_OP_POLL_DELETE, .u.poll.poll_id = "poll1"};
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    tly_store_op_t del_again = {.type = TLY_OP_POLL_DELETE, .u.poll.poll_id = "poll1"};
    submit_wait(s, &del_again);
    cr_assert_eq(del_again.result, TLY_ENOTFOUND);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_str_eq(seen.poll_ids[0], "poll2");
    cr_assert_eq(seen.ballots, 1);
    cr_assert_str_eq(seen.ballot_vote_ids[0], "v_3");
    cr_assert_eq(seen.requests, 0);

    /* The options went too: a new poll with the same id takes fresh options. */
    tly_store_op_t p1b = poll_op("poll1", 2);
    submit_wait(s, &p1b);
    cr_assert_eq(p1b.result, 0);
    tly_store_close(s);
}

Test(store, poll_update_replaces_row_and_options)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    tly_store_op_t up = poll_op("poll1", 2);
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.title = "New title";
    up.u.poll.status = 2;
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
    tly_store_op_t missing = poll_op("nope", 2);
    missing.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &missing);
    cr_assert_eq(missing.result, TLY_ENOTFOUND);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 2);
    tly_store_close(s);
}

Test(store, ballot_for_unknown_poll_fails_alone)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    tly_store_op_t good = ballot_op("poll1", "voter1", "v_1", "r_1");
    tly_store_op_t bad = ballot_op("nope", "voter1", "v_2", "r_2");
    bad.u.ballot.request_id = "req-bad";
    good.done = bad.done = on_done;
    bad.next = &good;
    good.next = NULL;
    tly_store_submit_list(s, &bad);
    wait_done(s, ndone + 2);
    cr_assert_eq(bad.result, TLY_ENOTFOUND);
    cr_assert_eq(good.result, 0);
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 1);
    cr_assert_eq(seen.requests, 0, "the savepoint undid the failed op as a whole");
    tly_store_close(s);
}

/* ---- group commit ------------------------------------------------------------------- */

#define MANY 10000

typedef struct {
    tly_store_t *s;
    tly_store_op_t *ops;
} submitter_t;

static void *submit_many(void *arg)
{
    submitter_t *t = arg;
    for (int i = 0; i < MANY; i++)
        tly_store_submit(t->s, &t->ops[i]);
    return NULL;
}

Test(store, many_ballots_from_another_thread_group_commit)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);

    tly_store_op_t *ops = calloc(MANY, sizeof *ops);
    char(*ids)[3][24] = calloc(MANY, sizeof *ids);
    cr_assert(ops && ids);
    for (int i = 0; i < MANY; i++) {
        snprintf(ids[i][0], 24, "voter%d", i);
        snprintf(ids[i][1], 24, "v_%d", i);
        snprintf(ids[i][2], 24, "r_%d", i);
        ops[i] = ballot_op("poll1", ids[i][0], ids[i][1], ids[i][2]);
        ops[i].done = on_done;
        ops[i].result = 12345;
    }
    tly_store_stats_t before, after;
    tly_store_stats(s, &before);
    int before_notifies = atomic_load(&notifies);
    submitter_t t = {s, ops};
    pthread_t th;
    int target = ndone + MANY;
    cr_assert_eq(pthread_create(&th, NULL, submit_many, &t), 0);
    wait_done(s, target);
    pthread_join(th, NULL);
    tly_store_stats(s, &after);

    for (int i = 0; i < MANY; i++)
        cr_assert_eq(ops[i].result, 0, "op %d: %d", i, ops[i].result);
    uint64_t batches = after.batches - before.batches;
    cr_assert_eq(after.ops - before.ops, MANY);
    cr_assert_lt(batches, MANY, "group commit: fewer batches than ops");
    int nn = atomic_load(&notifies) - before_notifies;
    cr_assert_eq((uint64_t)nn, batches, "one notify per batch");
    fprintf(stderr, "store: %d ballots in %llu batches (last %llu ops, commit %llu us)\n", MANY,
            (unsigned long long)batches, (unsigned long long)after.last_batch_size,
            (unsigned long long)after.last_commit_us);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, MANY);
    tly_store_close(s);
    free(ops);
    free(ids);
}

Test(store, batch_max_bounds_a_transaction)
{
    tly_store_t *s = open_store_max(10);
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    static tly_store_op_t ops[100];
    static char ids[100][3][24];
    for (int i = 0; i < 100; i++) {
        snprintf(ids[i][0], 24, "voter%d", i);
        snprintf(ids[i][1], 24, "v_%d", i);
        snprintf(ids[i][2], 24, "r_%d", i);
        ops[i] = ballot_op("poll1", ids[i][0], ids[i][1], ids[i][2]);
        ops[i].done = on_done;
        ops[i].next = i + 1 < 100 ? &ops[i + 1] : NULL;
    }
    tly_store_stats_t before, after;
    tly_store_stats(s, &before);
    tly_store_submit_list(s, &ops[0]);
    wait_done(s, ndone + 100);
    tly_store_stats(s, &after);
    cr_assert_geq(after.batches - before.batches, 10);
    cr_assert_leq(after.last_batch_size, 10);
    tly_store_close(s);
}

/* Done callbacks may free their op: the store must not touch it afterwards (ASan). */
static void free_done(tly_store_op_t *op)
{
    ndone++;
    free(op);
}

Test(store, close_commits_queued_ops_and_runs_callbacks)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    static char ids[200][3][24];
    int target = ndone + 200;
    for (int i = 0; i < 200; i++) {
        tly_store_op_t *op = malloc(sizeof *op);
        cr_assert_not_null(op);
        snprintf(ids[i][0], 24, "voter%d", i);
        snprintf(ids[i][1], 24, "v_%d", i);
        snprintf(ids[i][2], 24, "r_%d", i);
        *op = ballot_op("poll1", ids[i][0], ids[i][1], ids[i][2]);
        op->done = free_done;
        tly_store_submit(s, op);
    }
    tly_store_close(s); /* no reap: close finishes the queue and runs the callbacks */
    cr_assert_eq(ndone, target);
    seen_t seen = {0};
    s = open_store();
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    cr_assert_eq(seen.ballots, 200);
    tly_store_close(s);
}

/* ---- failure injection: a VFS that fails fsync or writes on demand -------------------- */

typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* lives right after this struct */
} ffile_t;

static sqlite3_vfs *real_vfs;
static sqlite3_vfs faulty_vfs;
static atomic_int fail_sync, fail_full;

#define REAL(f) (((ffile_t *)(f))->real)
static int f_close(sqlite3_file *f)
{
    return REAL(f)->pMethods->xClose(REAL(f));
}
static int f_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return REAL(f)->pMethods->xRead(REAL(f), b, n, o);
}
static int f_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    if (atomic_load(&fail_full))
        return SQLITE_FULL;
    return REAL(f)->pMethods->xWrite(REAL(f), b, n, o);
}
static int f_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return REAL(f)->pMethods->xTruncate(REAL(f), size);
}
static int f_sync(sqlite3_file *f, int flags)
{
    if (atomic_load(&fail_sync))
        return SQLITE_IOERR_FSYNC;
    return REAL(f)->pMethods->xSync(REAL(f), flags);
}
static int f_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return REAL(f)->pMethods->xFileSize(REAL(f), size);
}
static int f_lock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xLock(REAL(f), l);
}
static int f_unlock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xUnlock(REAL(f), l);
}
static int f_reserved(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}
static int f_fcntl(sqlite3_file *f, int op, void *arg)
{
    return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}
static int f_sector(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}
static int f_devchar(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}
static int f_shmmap(sqlite3_file *f, int pg, int sz, int ext, void volatile **pp)
{
    return REAL(f)->pMethods->xShmMap(REAL(f), pg, sz, ext, pp);
}
static int f_shmlock(sqlite3_file *f, int off, int n, int flags)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}
static void f_shmbarrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}
static int f_shmunmap(sqlite3_file *f, int del)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

/* Version 2 methods: no xFetch, so SQLite does not memory-map behind our back. */
static const sqlite3_io_methods faulty_methods = {
    .iVersion = 2,
    .xClose = f_close,
    .xRead = f_read,
    .xWrite = f_write,
    .xTruncate = f_truncate,
    .xSync = f_sync,
    .xFileSize = f_size,
    .xLock = f_lock,
    .xUnlock = f_unlock,
    .xCheckReservedLock = f_reserved,
    .xFileControl = f_fcntl,
    .xSectorSize = f_sector,
    .xDeviceCharacteristics = f_devchar,
    .xShmMap = f_shmmap,
    .xShmLock = f_shmlock,
    .xShmBarrier = f_shmbarrier,
    .xShmUnmap = f_shmunmap,
};

static int f_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    ffile_t *p = (ffile_t *)f;
    p->real = (sqlite3_file *)(p + 1);
    int rc = real_vfs->xOpen(real_vfs, name, p->real, flags, out);
    p->base.pMethods = p->real->pMethods != NULL ? &faulty_methods : NULL;
    return rc;
}

static void install_faulty_vfs(void)
{
    real_vfs = sqlite3_vfs_find(NULL);
    cr_assert_not_null(real_vfs);
    faulty_vfs = *real_vfs;
    faulty_vfs.zName = "faulty";
    faulty_vfs.szOsFile = (int)sizeof(ffile_t) + real_vfs->szOsFile;
    faulty_vfs.xOpen = f_open;
    faulty_vfs.pNext = NULL;
    cr_assert_eq(sqlite3_vfs_register(&faulty_vfs, 1), SQLITE_OK); /* the default now */
}

Test(store, disk_full_fails_the_batch_but_not_the_store)
{
    install_faulty_vfs();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);

    atomic_store(&fail_full, 1);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b1);
    cr_assert_eq(b1.result, TLY_EFULL);
    cr_assert(tly_store_writable(s));

    atomic_store(&fail_full, 0);
    tly_store_op_t b2 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b2);
    cr_assert_eq(b2.result, 0, "space is back: the same ballot commits");

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 1);
    tly_store_close(s);
    sqlite3_vfs_unregister(&faulty_vfs);
}

Test(store, failed_fsync_latches_the_store)
{
    install_faulty_vfs();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    tly_store_op_t b0 = ballot_op("poll1", "voter0", "v_0", "r_0");
    submit_wait(s, &b0);
    cr_assert_eq(b0.result, 0);

    atomic_store(&fail_sync, 1);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b1);
    cr_assert_eq(b1.result, TLY_EIO);
    cr_assert_not(tly_store_writable(s));

    /* Even with the disk healthy again nothing more is acknowledged or written. */
    atomic_store(&fail_sync, 0);
    tly_store_op_t b2 = ballot_op("poll1", "voter2", "v_2", "r_2");
    submit_wait(s, &b2);
    cr_assert_eq(b2.result, TLY_EIO);
    cr_assert_not(tly_store_writable(s));

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert(tly_store_writable(s), "a restart starts afresh");
    for (int i = 0; i < seen.ballots && i < 16; i++)
        cr_assert_str_neq(seen.ballot_vote_ids[i], "v_2", "written after the latch");
    tly_store_close(s);
    sqlite3_vfs_unregister(&faulty_vfs);
}

Test(store, open_rejects_a_path_that_is_a_file)
{
    char path[128];
    tly_store_t *s = NULL;
    snprintf(path, sizeof path, "%s/file", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fclose(f);
    tly_store_conf_t conf = {.data_dir = path};
    cr_assert_lt(tly_store_open(&conf, &s), 0);
    cr_assert_null(s);
}
