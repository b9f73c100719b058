/*
 * test_store_pg.c: the PostgreSQL store. Needs a server: TALLY_TEST_PG is a libpq URI
 * of one on which the tests may CREATE DATABASE (e.g.
 * postgres://postgres@127.0.0.1:5432/postgres); without it every test is skipped. Each
 * test creates a fresh database with a random name and drops it afterwards.
 *
 * As in test_store.c, done callbacks run in tly_store_reap on the test thread and the
 * stores' notify writes a byte to a pipe the test waits on, as the event loop would.
 * Several stores on one database stand for several tally instances.
 */
#include "base/base.h"
#include "store/store_int.h"

#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <fcntl.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char admin_url[512], db_url[512], db_name[64];
static int pipefd[2];
static int ndone;

ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    if (getenv("TALLY_TEST_PG") == NULL || getenv("TALLY_TEST_PG")[0] == '\0')
        fprintf(stderr, "test_store_pg: TALLY_TEST_PG is not set: PostgreSQL store tests skipped\n");
}

static void notify(void *arg)
{
    char c = 1;
    (void)!write(pipefd[1], &c, 1);
}

static void on_done(tly_store_op_t *op)
{
    ndone++;
}

/* Runs sql on url (no parameters); the first column of the first row, or "" . */
static void exec_on(const char *url, const char *sql, char *out, size_t n)
{
    PGconn *c = PQconnectdb(url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    PGresult *res = PQexec(c, sql);
    cr_assert(PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK, "%s: %s", sql,
              PQresultErrorMessage(res));
    if (out != NULL)
        snprintf(out, n, "%s", PQntuples(res) > 0 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    PQfinish(c);
}

static long long db_int(const char *sql)
{
    char buf[64];
    exec_on(db_url, sql, buf, sizeof buf);
    return strtoll(buf, NULL, 10);
}

static void setup(void)
{
    const char *u = getenv("TALLY_TEST_PG");
    cr_assert_eq(pipe2(pipefd, O_NONBLOCK | O_CLOEXEC), 0);
    ndone = 0;
    if (u == NULL || u[0] == '\0')
        return;
    snprintf(admin_url, sizeof admin_url, "%s", u);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    srand((unsigned)(ts.tv_nsec ^ getpid()));
    snprintf(db_name, sizeof db_name, "tally_test_%d_%d", getpid(), rand() % 1000000);
    /* The URI with its database replaced: postgres://who@where/<db>[?params]. */
    cr_assert_not_null(strstr(u, "://"), "TALLY_TEST_PG must be a postgres:// URI");
    const char *host = strstr(u, "://") + 3;
    const char *slash = strchr(host, '/');
    const char *q = strchr(host, '?');
    if (slash == NULL || (q != NULL && q < slash))
        slash = q != NULL ? q : u + strlen(u);
    snprintf(db_url, sizeof db_url, "%.*s/%s%s", (int)(slash - u), u, db_name, q ? q : "");
    char sql[128];
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", db_name);
    exec_on(admin_url, sql, NULL, 0);
}

static void teardown(void)
{
    close(pipefd[0]);
    close(pipefd[1]);
    if (db_name[0] != '\0') {
        char sql[128];
        snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)", db_name);
        exec_on(admin_url, sql, NULL, 0);
    }
}

TestSuite(store_pg, .init = setup, .fini = teardown, .timeout = 120);

#define NEED_PG()                                                                                  \
    do {                                                                                           \
        if (db_name[0] == '\0')                                                                    \
            cr_skip_test("TALLY_TEST_PG is not set");                                             \
    } while (0)

static tly_store_t *open_as(const char *origin, size_t batch_max)
{
    tly_store_t *s = NULL;
    tly_store_conf_t conf = {.url = db_url, .origin = origin, .batch_max = batch_max, .notify = notify};
    cr_assert_eq(tly_store_open(&conf, &s), 0);
    cr_assert_not_null(s);
    cr_assert(tly_store_writable(s));
    cr_assert(tly_store_shared(s));
    return s;
}

static tly_store_t *open_store(void)
{
    return open_as("test", 0);
}

/* Reaps every store in ss until cond(arg) holds (20 s at most). */
static void pump_until(tly_store_t **ss, int n, int (*cond)(void *), void *arg)
{
    char buf[256];
    for (int i = 0; i < n; i++)
        tly_store_reap(ss[i]);
    int64_t until = tly_now_ms() + 20000;
    while (!cond(arg)) {
        cr_assert_lt(tly_now_ms(), until, "timed out waiting");
        struct pollfd p = {.fd = pipefd[0], .events = POLLIN};
        poll(&p, 1, 50);
        while (read(pipefd[0], buf, sizeof buf) > 0)
            ;
        for (int i = 0; i < n; i++)
            tly_store_reap(ss[i]);
    }
}

static int done_reached(void *arg)
{
    return ndone >= *(int *)arg;
}

static void wait_done(tly_store_t *s, int target)
{
    pump_until(&s, 1, done_reached, &target);
}

static void submit_wait(tly_store_t *s, tly_store_op_t *op)
{
    int target = ndone + 1;
    op->done = on_done;
    tly_store_submit(s, op);
    wait_done(s, target);
}

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

/* ---- fixtures (as test_store.c) ------------------------------------------------------ */

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
static const uint8_t choice0[] = {0}, choice1[] = {1}, choice2[] = {2};

static tly_store_op_t ballot_op(const char *poll_id, const char *voter, const char *vote_id, const char *receipt)
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

static tly_store_op_t change_op(tly_op_type_t type, const char *poll_id, const char *voter, int64_t at)
{
    tly_store_op_t op = {.type = type};
    op.u.ballot.poll_id = poll_id;
    op.u.ballot.voter_id = voter;
    op.u.ballot.recorded_at = at;
    return op;
}

typedef struct {
    int users, polls, ballots, requests;
    char poll_ids[8][32];
    size_t noptions[8];
    char final_results[8][64];
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
        snprintf(seen->final_results[seen->polls], 64, "%s", p->final_results ? p->final_results : "(null)");
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

static tly_store_t *reopen_load(tly_store_t *s, seen_t *seen)
{
    tly_store_close(s);
    s = open_store();
    memset(seen, 0, sizeof *seen);
    cr_assert_eq(tly_store_load(s, &seen_cb, seen), 0);
    return s;
}

/* Counters are exactly what the current ballots say. */
static void assert_counters_exact(void)
{
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts oc WHERE votes <> (SELECT count(*) FROM ballots b"
                        " WHERE b.poll_id = oc.poll_id"
                        " AND position(set_byte('\\x00'::bytea, 0, oc.position) IN b.choices) > 0)"),
                 0, "option_counts drifted");
    cr_assert_eq(db_int("SELECT count(*) FROM poll_counts pc WHERE ballots <> (SELECT count(*) FROM ballots b"
                        " WHERE b.poll_id = pc.poll_id)"),
                 0, "poll_counts drifted");
    cr_assert_eq(db_int("SELECT count(*) FROM polls p WHERE NOT EXISTS"
                        " (SELECT 1 FROM poll_counts c WHERE c.poll_id = p.poll_id)"),
                 0, "a poll without its counter row");
}

/* ---- round trip ----------------------------------------------------------------------- */

static tly_store_op_t rt_ops[6];

static void rt_user(void *ctx, const tly_user_row_t *u)
{
    int *n = ctx;
    cr_assert_lt(n[0], 2);
    const tly_user_row_t *e = &rt_ops[n[0]].u.user;
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
    cr_assert(str_eq(p->final_results, e->final_results));
    cr_assert_eq(p->noptions, e->noptions);
    for (size_t i = 0; i < p->noptions; i++) {
        cr_assert_str_eq(p->options[i].option_id, e->options[i].option_id);
        cr_assert_str_eq(p->options[i].text, e->options[i].text);
        cr_assert_eq(p->options[i].display_order, e->options[i].display_order);
        cr_assert_eq(p->options[i].position, (int)i);
    }
    n[1]++;
}

static void rt_ballot_check(const tly_ballot_row_t *b, const tly_ballot_row_t *e)
{
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
    if (e->ip_hash == NULL)
        cr_assert_null(b->ip_hash);
    else
        cr_assert_arr_eq(b->ip_hash, e->ip_hash, 16);
}

static void rt_ballot(void *ctx, const tly_ballot_row_t *b)
{
    int *n = ctx;
    cr_assert_lt(n[2], 2);
    rt_ballot_check(b, &rt_ops[4 + n[2]].u.ballot);
    cr_assert_null(b->request_id);
    n[2]++;
}

static void rt_request(void *ctx, const tly_request_row_t *r)
{
    ((int *)ctx)[3]++;
}

static const uint8_t ip_hash1[16] = {0x10, 0, 0xff, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0x99};

static void fill_rt_ops(void)
{
    rt_ops[0] = (tly_store_op_t){.type = TLY_OP_USER_INSERT,
                                 .u.user = {"user1", "Alice", "$argon2id$v=19$x", "a@example.org", 1699999999000}};
    rt_ops[1] = (tly_store_op_t){.type = TLY_OP_USER_INSERT,
                                 .u.user = {"user2", "bob", "$argon2id$v=19$y", NULL, 1699999999500}};
    rt_ops[2] = poll_op("poll1", 3);
    rt_ops[2].u.poll.description = "Pick up to two";
    rt_ops[2].u.poll.start_time = 1700000000500;
    rt_ops[2].u.poll.end_time = 1800000000000;
    rt_ops[2].u.poll.idem_key = "idem-poll-1";
    rt_ops[2].u.poll.final_results = "{\"total\":0}";
    for (int i = 0; i < 16; i++)
        rt_ops[2].u.poll.body_hash[i] = (uint8_t)(i + 1);
    rt_ops[3] = poll_op("poll2", 2);
    rt_ops[3].u.poll.created_at = 0;
    rt_ops[3].u.poll.updated_at = 0;
    rt_ops[3].u.poll.type = 4;
    rt_ops[4] = ballot_op("poll1", "voter1", "v_1", "rcpt1");
    rt_ops[4].u.ballot.scores = scores2;
    rt_ops[4].u.ballot.idem_key = "idem-vote-1";
    rt_ops[4].u.ballot.client_meta = "{\"ua\":\"test \\\"q\\\" \xc3\xa9\"}";
    memset(rt_ops[4].u.ballot.body_hash, 0xab, 16);
    rt_ops[4].u.ballot.ip_hash = ip_hash1;
    rt_ops[5] = ballot_op("poll2", "voter1", "v_2", "rcpt2");
    rt_ops[5].u.ballot.nchoices = 1;
}

Test(store_pg, round_trip_every_field)
{
    NEED_PG();
    tly_store_t *s = open_store();
    fill_rt_ops();
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
    cr_assert_eq(db_int("SELECT max(version) FROM schema_version"), 2);
    cr_assert_eq(db_int("SELECT count(*) FROM pg_inherits WHERE inhparent = 'ballots'::regclass"), 16);
    cr_assert_eq(db_int("SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit'::regclass"), 16);
    assert_counters_exact();
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 0);
}

/* ---- duplicates ---------------------------------------------------------------------- */

Test(store_pg, duplicate_ballot_same_batch_and_later_batch)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    cr_assert_eq(p.result, 0);

    tly_store_stats_t before, after;
    tly_store_stats(s, &before);
    tly_store_op_t ops[3] = {ballot_op("poll1", "voter1", "v_1", "r_1"), ballot_op("poll1", "voter1", "v_2", "r_2"),
                             ballot_op("poll1", "voter2", "v_3", "r_3")};
    submit_chain(s, ops, 3);
    tly_store_stats(s, &after);
    cr_assert_eq(after.batches - before.batches, 1, "the three ballots were one batch");
    cr_assert_eq(after.last_batch_size, 3);
    cr_assert_eq(ops[0].result, 0);
    cr_assert_eq(ops[1].result, TLY_EEXIST);
    cr_assert_eq(ops[2].result, 0);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 2,
                 "the duplicate did not move the counter");
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll1'"), 2);
    cr_assert_eq(db_int("SELECT count(*) FROM audit"), 2, "a duplicate writes no audit row");

    tly_store_op_t b3 = ballot_op("poll1", "voter1", "v_4", "r_4");
    submit_wait(s, &b3);
    cr_assert_eq(b3.result, TLY_EEXIST);
    tly_store_op_t b4 = ballot_op("poll1", "voter9", "v_1", "r_9"); /* reused vote id */
    submit_wait(s, &b4);
    cr_assert_eq(b4.result, TLY_EEXIST);
    tly_store_op_t b5 = ballot_op("poll1", "voter8", "v_8", "r_1"); /* reused receipt */
    submit_wait(s, &b5);
    cr_assert_eq(b5.result, TLY_EEXIST);

    /* One address, one ballot per poll; a ballot without a hash is not limited. */
    static const uint8_t ipa[16] = {0xa1, 1, 2, 3};
    tly_store_op_t i1 = ballot_op("poll1", "voter5", "v_5", "r_5"), i2 = ballot_op("poll1", "voter6", "v_6", "r_6");
    i1.u.ballot.ip_hash = i2.u.ballot.ip_hash = ipa;
    tly_store_op_t ipops[2] = {i1, i2};
    submit_chain(s, ipops, 2);
    cr_assert_eq(ipops[0].result, 0);
    cr_assert_eq(ipops[1].result, TLY_EEXIST);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 3);
    cr_assert_str_eq(seen.ballot_vote_ids[0], "v_1");
    cr_assert_str_eq(seen.ballot_vote_ids[1], "v_3");
    cr_assert_str_eq(seen.ballot_vote_ids[2], "v_5");
    tly_store_close(s);
    assert_counters_exact();
}

Test(store_pg, duplicate_username_and_poll_id)
{
    NEED_PG();
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
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll1", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    cr_assert_eq(p1.result, 0);
    cr_assert_eq(p2.result, TLY_EEXIST);
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.users, 1);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 3, "the failed insert left no options behind");
    tly_store_close(s);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts"), 3);
}

/* ---- async requests ------------------------------------------------------------------ */

Test(store_pg, ballot_with_request_writes_request_row)
{
    NEED_PG();
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

/* ---- polls ----------------------------------------------------------------------------- */

Test(store_pg, poll_delete_removes_everything_of_the_poll)
{
    NEED_PG();
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
    cr_assert_eq(db_int("SELECT count(*) FROM audit WHERE poll_id = 'poll1'"), 0);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts WHERE poll_id = 'poll1'"), 0);
    cr_assert_eq(db_int("SELECT count(*) FROM poll_counts WHERE poll_id = 'poll1'"), 0);
    cr_assert_eq(db_int("SELECT count(*) FROM options WHERE poll_id = 'poll1'"), 0);
    tly_store_op_t p1b = poll_op("poll1", 2);
    submit_wait(s, &p1b);
    cr_assert_eq(p1b.result, 0);
    tly_store_close(s);
    assert_counters_exact();
}

Test(store_pg, poll_update_replaces_row_options_and_keeps_counters_right)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    tly_store_op_t b = ballot_op("poll1", "voter1", "v_1", "r_1"); /* positions 0 and 2 */
    submit_wait(s, &b);
    tly_store_op_t up = poll_op("poll1", 2); /* position 2 goes */
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.title = "New title";
    up.u.poll.status = 2;
    up.u.poll.final_results = "{\"done\":true}";
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts WHERE poll_id = 'poll1'"), 2);
    assert_counters_exact();
    tly_store_op_t back = poll_op("poll1", 3); /* position 2 is back: counted from the ballots */
    back.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &back);
    cr_assert_eq(back.result, 0);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 1);
    assert_counters_exact();
    up.u.poll.final_results = NULL;
    submit_wait(s, &up);
    tly_store_op_t missing = poll_op("nope", 2);
    missing.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &missing);
    cr_assert_eq(missing.result, TLY_ENOTFOUND);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 2);
    cr_assert_str_eq(seen.final_results[0], "(null)", "an update without final results clears them");
    tly_store_close(s);
}

Test(store_pg, ballot_for_unknown_poll_and_bad_ops_fail_alone)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    tly_store_op_t ops[5] = {ballot_op("nope", "voter1", "v_2", "r_2"), ballot_op("poll1", "voter1", "v_1", "r_1"),
                             ballot_op("poll1", "voter2", NULL, "r_3"), ballot_op("poll1", "voter3", "v_4", "r_4"),
                             ballot_op("poll1", "voter4", "v_5", "r_5")};
    ops[0].u.ballot.request_id = "req-bad";
    ops[3].u.ballot.client_meta = "\xff\xfe not utf-8";
    submit_chain(s, ops, 5);
    cr_assert_eq(ops[0].result, TLY_ENOTFOUND);
    cr_assert_eq(ops[1].result, 0);
    cr_assert_eq(ops[2].result, TLY_EINVAL);
    cr_assert_eq(ops[3].result, TLY_EINVAL);
    cr_assert_eq(ops[4].result, 0);
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 2);
    cr_assert_eq(seen.requests, 0, "nothing of the failed op was written");
    tly_store_close(s);
    assert_counters_exact();
}

/* A batch of ballots only is one statement; should the database refuse one ballot in it
 * (here a CHECK constraint added for the test), the batch runs again the long way and
 * only that ballot fails. */
Test(store_pg, ballot_the_database_refuses_fails_alone_in_a_batch_of_ballots)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    exec_on(db_url, "ALTER TABLE ballots ADD CONSTRAINT no_mallory CHECK (voter_id <> 'mallory')", NULL, 0);
    tly_store_op_t ops[4] = {ballot_op("poll1", "alice", "v_1", "r_1"), ballot_op("poll1", "mallory", "v_2", "r_2"),
                             ballot_op("poll1", "bob", "v_3", "r_3"), ballot_op("poll1", "alice", "v_4", "r_4")};
    submit_chain(s, ops, 4);
    cr_assert_eq(ops[0].result, 0);
    cr_assert_eq(ops[1].result, TLY_EINVAL);
    cr_assert_eq(ops[2].result, 0);
    cr_assert_eq(ops[3].result, TLY_EEXIST);
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), 2);
    cr_assert_eq(db_int("SELECT count(*) FROM audit"), 2);
    cr_assert_eq(db_int("SELECT count(*) FROM feed WHERE ops LIKE '%mallory%'"), 0);
    cr_assert_eq(db_int("SELECT count(*) FROM feed WHERE ops LIKE '%alice%' AND ops LIKE '%bob%'"), 1);
    tly_store_close(s);
    assert_counters_exact();
}

/* ---- ballot changes, retractions, audit, pages ------------------------------------------- */

typedef struct {
    int n;
    int64_t seq[16];
    char voter[16][32], vote_id[16][32], receipt[16][32], idem[16][32], event[16][16], poll[16][16];
    uint8_t nchoices[16], choices[16][8], scores[16][8];
    int has_scores[16], has_choices[16];
    int64_t at[16];
    uint8_t body_hash[16][16];
} rows_t;

static void see_page_ballot(void *ctx, const tly_ballot_row_t *b, int64_t seq)
{
    rows_t *bs = ctx;
    int i = bs->n++;
    cr_assert_lt(i, 16);
    bs->seq[i] = seq;
    snprintf(bs->voter[i], 32, "%s", b->voter_id);
    snprintf(bs->vote_id[i], 32, "%s", b->vote_id);
    snprintf(bs->receipt[i], 32, "%s", b->receipt);
    snprintf(bs->idem[i], 32, "%s", b->idem_key ? b->idem_key : "(null)");
    bs->nchoices[i] = b->nchoices;
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

static void see_audit(void *ctx, const tly_audit_row_t *a)
{
    rows_t *as = ctx;
    int i = as->n++;
    cr_assert_lt(i, 16);
    as->seq[i] = a->seq;
    snprintf(as->poll[i], 16, "%s", a->poll_id);
    snprintf(as->voter[i], 32, "%s", a->voter_id);
    snprintf(as->event[i], 16, "%s", a->event);
    as->nchoices[i] = a->nchoices;
    as->has_choices[i] = a->choices != NULL;
    as->has_scores[i] = a->scores != NULL;
    if (a->choices)
        memcpy(as->choices[i], a->choices, a->nchoices);
    if (a->scores)
        memcpy(as->scores[i], a->scores, a->nchoices);
    as->at[i] = a->at;
}

Test(store_pg, audit_records_cast_changed_revoked_in_order)
{
    NEED_PG();
    static const uint8_t c1[] = {2}, s1[] = {7};
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p);
    submit_wait(s, &p2);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1.u.ballot.scores = scores2;
    b1.u.ballot.idem_key = "idem-cast";
    memset(b1.u.ballot.body_hash, 0x11, 16);
    submit_wait(s, &b1);
    tly_store_op_t dup = ballot_op("poll1", "voter1", "v_9", "r_9");
    submit_wait(s, &dup);
    cr_assert_eq(dup.result, TLY_EEXIST);
    tly_store_op_t other = ballot_op("poll2", "voter1", "v_2", "r_2");
    submit_wait(s, &other);
    tly_store_op_t b3 = ballot_op("poll1", "voter3", "v_3", "r_3");
    submit_wait(s, &b3);

    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter1", 1700000005000);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = c1;
    ch.u.ballot.scores = s1;
    ch.u.ballot.idem_key = "idem-change";
    memset(ch.u.ballot.body_hash, 0x22, 16);
    ch.u.ballot.vote_id = "ignored";
    submit_wait(s, &ch);
    cr_assert_eq(ch.result, 0);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 2);

    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    rows_t bs = {0};
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 10, see_page_ballot, &bs), 2);
    cr_assert_str_eq(bs.voter[0], "voter1", "a change keeps the ballot's place");
    cr_assert_str_eq(bs.vote_id[0], "v_1");
    cr_assert_str_eq(bs.receipt[0], "r_1");
    cr_assert_eq(bs.nchoices[0], 1);
    cr_assert_eq(bs.choices[0][0], 2);
    cr_assert_eq(bs.scores[0][0], 7);
    cr_assert_eq(bs.at[0], 1700000005000);
    cr_assert_str_eq(bs.idem[0], "idem-change");
    cr_assert_eq(bs.body_hash[0][0], 0x22);
    cr_assert_str_eq(bs.voter[1], "voter3");
    int64_t seq_voter1 = bs.seq[0];

    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter1", 1700000006000);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    memset(&bs, 0, sizeof bs);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 10, see_page_ballot, &bs), 1);
    cr_assert_str_eq(bs.voter[0], "voter3");
    tly_store_op_t again = ballot_op("poll1", "voter1", "v_4", "r_4");
    again.u.ballot.recorded_at = 1700000007000;
    submit_wait(s, &again);
    cr_assert_eq(again.result, 0);
    memset(&bs, 0, sizeof bs);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 10, see_page_ballot, &bs), 2);
    cr_assert_str_eq(bs.vote_id[1], "v_4");
    cr_assert_gt(bs.seq[1], seq_voter1);

    rows_t as = {0};
    cr_assert_eq(tly_store_audit_page(r, "poll1", 0, 16, see_audit, &as), 5);
    const char *events[] = {"cast", "cast", "changed", "revoked", "cast"};
    const char *voters[] = {"voter1", "voter3", "voter1", "voter1", "voter1"};
    for (int i = 0; i < 5; i++) {
        cr_assert_str_eq(as.event[i], events[i], "row %d", i);
        cr_assert_str_eq(as.voter[i], voters[i], "row %d", i);
        cr_assert_str_eq(as.poll[i], "poll1");
        if (i > 0)
            cr_assert_gt(as.seq[i], as.seq[i - 1]);
    }
    cr_assert_eq(as.nchoices[0], 2);
    cr_assert_arr_eq(as.choices[0], choices2, 2);
    cr_assert_arr_eq(as.scores[0], scores2, 2);
    cr_assert_eq(as.at[0], 1700000001000);
    cr_assert_eq(as.nchoices[2], 1);
    cr_assert_eq(as.choices[2][0], 2);
    cr_assert_eq(as.scores[2][0], 7);
    cr_assert_eq(as.nchoices[3], 0);
    cr_assert_not(as.has_choices[3]);
    cr_assert_not(as.has_scores[3]);
    cr_assert_eq(as.at[3], 1700000006000);
    /* Paging: after the third row, the last two. */
    rows_t tail = {0};
    cr_assert_eq(tly_store_audit_page(r, "poll1", as.seq[2], 16, see_audit, &tail), 2);
    cr_assert_str_eq(tail.event[0], "revoked");
    memset(&as, 0, sizeof as);
    cr_assert_eq(tly_store_audit_page(r, "poll2", 0, 16, see_audit, &as), 1);
    cr_assert_eq(tly_store_audit_page(r, "poll3", 0, 16, see_audit, &as), 0);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 0, see_page_ballot, &bs), 0);
    tly_store_reader_close(r);
    cr_assert_eq(db_int("SELECT count(*) FROM (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_no_update') t"), 1);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 3);
    cr_assert_str_eq(seen.ballot_vote_ids[0], "v_2");
    cr_assert_str_eq(seen.ballot_vote_ids[1], "v_3");
    cr_assert_str_eq(seen.ballot_vote_ids[2], "v_4");
    tly_store_close(s);
    assert_counters_exact();
}

Test(store_pg, replace_and_delete_of_a_missing_ballot_fail_alone)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b1);
    tly_store_op_t ops[5] = {
        change_op(TLY_OP_BALLOT_REPLACE, "poll1", "nobody", 5), change_op(TLY_OP_BALLOT_DELETE, "poll1", "nobody", 5),
        change_op(TLY_OP_BALLOT_REPLACE, "nope", "voter1", 5),  change_op(TLY_OP_BALLOT_DELETE, "nope", "voter1", 5),
        ballot_op("poll1", "voter2", "v_2", "r_2"),
    };
    ops[0].u.ballot.nchoices = ops[2].u.ballot.nchoices = 1;
    ops[0].u.ballot.choices = ops[2].u.ballot.choices = choices2;
    submit_chain(s, ops, 5);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(ops[i].result, TLY_ENOTFOUND, "op %d: %d", i, ops[i].result);
    cr_assert_eq(ops[4].result, 0);
    cr_assert_eq(db_int("SELECT count(*) FROM audit"), 2);
    tly_store_close(s);
    assert_counters_exact();
}

/* ---- counters under a mix --------------------------------------------------------------- */

static const uint8_t set01[] = {0, 1}, set12[] = {1, 2}, set012[] = {0, 1, 2};
static const struct {
    const uint8_t *c;
    uint8_t n;
} sets3[] = {{choice0, 1}, {choice1, 1}, {choice2, 1}, {set01, 2}, {set12, 2}, {choices2, 2}, {set012, 3}},
  sets2[] = {{choice0, 1}, {choice1, 1}, {set01, 2}};

Test(store_pg, counters_equal_count_after_a_mix_with_duplicates)
{
    NEED_PG();
    enum { VOTERS = 40, ROUNDS = 8, PER = 120 };
    static tly_store_op_t ops[PER];
    static char ids[PER][3][32];
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    srand(42);
    int ok = 0, dup = 0, missing = 0;
    for (int r = 0; r < ROUNDS; r++) {
        for (int k = 0; k < PER; k++) {
            int two = rand() % 2, kind = rand() % 10;
            const char *poll = two ? "poll2" : "poll1";
            snprintf(ids[k][0], 32, "voter%d", rand() % VOTERS);
            snprintf(ids[k][1], 32, "v_%d_%d", r, k);
            snprintf(ids[k][2], 32, "r_%d_%d", r, k);
            if (kind < 6)
                ops[k] = ballot_op(poll, ids[k][0], ids[k][1], ids[k][2]);
            else
                ops[k] = change_op(kind < 8 ? TLY_OP_BALLOT_REPLACE : TLY_OP_BALLOT_DELETE, poll, ids[k][0], 5);
            int c = two ? rand() % 3 : rand() % 7;
            ops[k].u.ballot.choices = two ? sets2[c].c : sets3[c].c;
            ops[k].u.ballot.nchoices = two ? sets2[c].n : sets3[c].n;
            if (k > 0 && rand() % 8 == 0) { /* the same ballot again, in the same batch */
                ops[k] = ops[k - 1];
                ops[k].next = NULL;
            }
        }
        submit_chain(s, ops, PER);
        for (int k = 0; k < PER; k++) {
            cr_assert(ops[k].result == 0 || ops[k].result == TLY_EEXIST || ops[k].result == TLY_ENOTFOUND,
                      "op %d: %d", k, ops[k].result);
            ok += ops[k].result == 0;
            dup += ops[k].result == TLY_EEXIST;
            missing += ops[k].result == TLY_ENOTFOUND;
        }
        assert_counters_exact();
    }
    cr_assert_gt(ok, 0);
    cr_assert_gt(dup, 0);
    cr_assert_gt(missing, 0);
    cr_assert_eq(db_int("SELECT sum(ballots) FROM poll_counts"), db_int("SELECT count(*) FROM ballots"));
    tly_store_close(s);
}

/* ---- two instances on one database ------------------------------------------------------- */

typedef struct {
    int n;
    char key[512][40];
} followed_t;

static void key_of(int type, const char *vote_id, const char *poll_id, const char *user_id, const char *request_id,
                   const char *voter_id, char out[40])
{
    const char *k = type == TLY_OP_BALLOT_INSERT                                ? vote_id
                    : type == TLY_OP_USER_INSERT                                ? user_id
                    : type == TLY_OP_REQUEST                                    ? request_id
                    : type == TLY_OP_BALLOT_REPLACE || type == TLY_OP_BALLOT_DELETE ? voter_id
                                                                                : poll_id;
    snprintf(out, 40, "%d:%s", type, k ? k : "?");
}

static void follow_rec(void *ctx, const tly_store_op_t *op)
{
    followed_t *f = ctx;
    cr_assert_eq(op->result, 0);
    cr_assert_null(op->done);
    cr_assert_lt(f->n, 512);
    const char *poll = op->type <= TLY_OP_POLL_DELETE && op->type >= TLY_OP_POLL_INSERT ? op->u.poll.poll_id : NULL;
    key_of(op->type, op->type >= TLY_OP_BALLOT_INSERT ? op->u.ballot.vote_id : NULL, poll,
           op->type == TLY_OP_USER_INSERT ? op->u.user.user_id : NULL,
           op->type == TLY_OP_REQUEST ? op->u.request.request_id : NULL,
           op->type >= TLY_OP_BALLOT_INSERT ? op->u.ballot.voter_id : NULL, f->key[f->n]);
    f->n++;
}

/* What the other instances' follow callbacks must have seen: the ops of the feed rows
 * not written by `origin`, in feed order. */
static int expected_for(const char *origin, char keys[][40], int max)
{
    int n = 0;
    PGconn *c = PQconnectdb(db_url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK);
    PGresult *res = PQexec(c, "SELECT origin, ops FROM feed ORDER BY seq");
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    for (int i = 0; i < PQntuples(res); i++) {
        if (strcmp(PQgetvalue(res, i, 0), origin) == 0)
            continue;
        json_t *ops = json_loads(PQgetvalue(res, i, 1), 0, NULL);
        cr_assert_not_null(ops);
        for (size_t k = 0; k < json_array_size(ops); k++) {
            json_t *o = json_array_get(ops, k);
            cr_assert_lt(n, max);
            key_of((int)json_integer_value(json_object_get(o, "t")), json_string_value(json_object_get(o, "vote_id")),
                   json_string_value(json_object_get(o, "poll_id")), json_string_value(json_object_get(o, "user_id")),
                   json_string_value(json_object_get(o, "request_id")),
                   json_string_value(json_object_get(o, "voter_id")), keys[n++]);
        }
        json_decref(ops);
    }
    PQclear(res);
    PQfinish(c);
    return n;
}

static int synced;
static void on_sync(void *arg)
{
    synced++;
}

static int synced_reached(void *arg)
{
    return synced >= *(int *)arg;
}

static void sync_all(tly_store_t **ss, int n)
{
    int target = synced + n;
    for (int i = 0; i < n; i++)
        tly_store_sync(ss[i], on_sync, NULL);
    pump_until(ss, n, synced_reached, &target);
}

Test(store_pg, two_instances_follow_each_other_in_commit_order)
{
    NEED_PG();
    static followed_t fa, fb;
    static char ids[2][100][3][32];
    static tly_store_op_t ops[2][100];
    memset(&fa, 0, sizeof fa);
    memset(&fb, 0, sizeof fb);
    tly_store_t *a = open_as("inst-a", 16), *b = open_as("inst-b", 16);
    tly_store_t *both[2] = {a, b};
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(a, &seen_cb, &seen), 0);
    cr_assert_eq(tly_store_load(b, &seen_cb, &seen), 0);
    tly_store_follow(a, follow_rec, &fa);
    tly_store_follow(b, follow_rec, &fb);

    tly_store_op_t u = {.type = TLY_OP_USER_INSERT, .u.user = {"u1", "Alice", "h", NULL, 1}};
    submit_wait(a, &u);
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(b, &p);
    /* Both write at once, in many small batches (batch_max 16), so that their commits
     * interleave; some of B's ballots collide with A's voters. */
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 100; k++) {
            snprintf(ids[w][k][0], 32, "voter%d", w == 0 ? k : k + 80);
            snprintf(ids[w][k][1], 32, "v_%c_%d", 'a' + w, k);
            snprintf(ids[w][k][2], 32, "r_%c_%d", 'a' + w, k);
            ops[w][k] = ballot_op("poll1", ids[w][k][0], ids[w][k][1], ids[w][k][2]);
            if (w == 1 && k % 10 == 0)
                ops[w][k].u.ballot.request_id = ids[w][k][2]; /* async: a failed request row */
            ops[w][k].done = on_done;
        }
    int target = ndone + 200;
    for (int k = 0; k < 100; k++) {
        tly_store_submit(a, &ops[0][k]);
        tly_store_submit(b, &ops[1][k]);
    }
    pump_until(both, 2, done_reached, &target);
    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter3", 9);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = choice1;
    submit_wait(b, &ch);
    cr_assert_eq(ch.result, 0);
    tly_store_op_t dl = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter4", 9);
    submit_wait(a, &dl);
    cr_assert_eq(dl.result, 0);
    sync_all(both, 2);

    /* What each one's follow callback got is exactly the other's feed rows, in order. */
    static char for_a[512][40], for_b[512][40];
    int na = expected_for("inst-a", for_a, 512); /* B's ops */
    int nb = expected_for("inst-b", for_b, 512); /* A's ops */
    /* user, poll, 180 distinct voters' ballots, the change and the delete (and requests) */
    cr_assert_geq(na + nb, 184, "%d + %d", na, nb);
    cr_assert_eq(fa.n, na, "A saw %d of B's %d ops", fa.n, na);
    cr_assert_eq(fb.n, nb, "B saw %d of A's %d ops", fb.n, nb);
    for (int i = 0; i < na; i++)
        cr_assert_str_eq(fa.key[i], for_a[i], "A's op %d", i);
    for (int i = 0; i < nb; i++)
        cr_assert_str_eq(fb.key[i], for_b[i], "B's op %d", i);
    int requests = 0;
    for (int i = 0; i < fa.n; i++)
        requests += strncmp(fa.key[i], "-1:", 3) == 0;
    int lost = (ops[1][0].result == TLY_EEXIST) + (ops[1][10].result == TLY_EEXIST);
    cr_assert_eq(requests, lost, "B's failed async ballots reached A as requests");
    cr_assert_eq(db_int("SELECT count(*) - max(seq) FROM feed"), 0, "no gaps in the feed");
    tly_store_close(a);
    tly_store_close(b);
    assert_counters_exact();
}

typedef struct {
    followed_t *f;
    int seen_at_sync;
    int done;
} sync_probe_t;

static void probe_sync(void *arg)
{
    sync_probe_t *p = arg;
    p->seen_at_sync = p->f->n;
    p->done = 1;
}

static int probe_done(void *arg)
{
    return ((sync_probe_t *)arg)->done;
}

Test(store_pg, sync_delivers_what_the_other_instance_committed)
{
    NEED_PG();
    static followed_t fb;
    static char ids[5][3][24];
    memset(&fb, 0, sizeof fb);
    tly_store_t *a = open_as("inst-a", 0), *b = open_as("inst-b", 0);
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(b, &seen_cb, &seen), 0);
    tly_store_follow(b, follow_rec, &fb);
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(a, &p);
    for (int i = 0; i < 5; i++) {
        snprintf(ids[i][0], 24, "voter%d", i);
        snprintf(ids[i][1], 24, "v_%d", i);
        snprintf(ids[i][2], 24, "r_%d", i);
        tly_store_op_t op = ballot_op("poll1", ids[i][0], ids[i][1], ids[i][2]);
        submit_wait(a, &op);
        cr_assert_eq(op.result, 0);
        /* At once: the follower's periodic read is 100 ms away; the sync must not wait
         * for it, nor run before the row is delivered. */
        sync_probe_t probe = {.f = &fb};
        tly_store_sync(b, probe_sync, &probe);
        pump_until(&b, 1, probe_done, &probe);
        cr_assert_eq(probe.seen_at_sync, i + 2, "round %d: the poll and %d ballots", i, i + 1);
    }
    tly_store_close(a);
    tly_store_close(b);
}

Test(store_pg, concurrent_inserts_of_one_voter_from_two_instances_one_wins)
{
    NEED_PG();
    enum { N = 300 };
    static char ids[2][N][3][24];
    static tly_store_op_t ops[2][N];
    tly_store_t *a = open_as("inst-a", 32), *b = open_as("inst-b", 32);
    tly_store_t *both[2] = {a, b};
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(a, &p);
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < N; k++) {
            snprintf(ids[w][k][0], 24, "voter%d", k);
            snprintf(ids[w][k][1], 24, "v_%c_%d", 'a' + w, k);
            snprintf(ids[w][k][2], 24, "r_%c_%d", 'a' + w, k);
            ops[w][k] = ballot_op("poll1", ids[w][k][0], ids[w][k][1], ids[w][k][2]);
            ops[w][k].u.ballot.choices = w ? choice1 : choice0;
            ops[w][k].u.ballot.nchoices = 1;
            ops[w][k].done = on_done;
        }
    int target = ndone + 2 * N;
    for (int k = 0; k < N; k++) {
        tly_store_submit(a, &ops[0][k]);
        tly_store_submit(b, &ops[1][k]);
    }
    pump_until(both, 2, done_reached, &target);
    for (int k = 0; k < N; k++) {
        int r0 = ops[0][k].result, r1 = ops[1][k].result;
        cr_assert((r0 == 0 && r1 == TLY_EEXIST) || (r0 == TLY_EEXIST && r1 == 0), "voter%d: %d %d", k, r0, r1);
    }
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), N);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts"), N);
    tly_store_close(a);
    tly_store_close(b);
    assert_counters_exact();
}

/* ---- availability ------------------------------------------------------------------------ */

static void kill_connections(void)
{
    exec_on(db_url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            NULL, 0);
}

Test(store_pg, writable_drops_when_the_connection_is_killed_and_comes_back)
{
    NEED_PG();
    enum { N = 200 };
    static char ids[N][3][24];
    static tly_store_op_t ops[N];
    int nops = 0, acked = 0, failed = 0, saw_down = 0;
    tly_store_t *s = open_store();
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);

    kill_connections();
    int64_t until = tly_now_ms() + 15000;
    /* Keep voting through the outage: every op is either acknowledged (and then it must
     * be there) or fails with TLY_EIO (and then it must not be). */
    while (tly_now_ms() < until && nops < N) {
        snprintf(ids[nops][0], 24, "voter%d", nops);
        snprintf(ids[nops][1], 24, "v_%d", nops);
        snprintf(ids[nops][2], 24, "r_%d", nops);
        ops[nops] = ballot_op("poll1", ids[nops][0], ids[nops][1], ids[nops][2]);
        submit_wait(s, &ops[nops]);
        cr_assert(ops[nops].result == 0 || ops[nops].result == TLY_EIO, "%d", ops[nops].result);
        acked += ops[nops].result == 0;
        failed += ops[nops].result == TLY_EIO;
        nops++;
        if (!tly_store_writable(s))
            saw_down = 1;
        if (saw_down && tly_store_writable(s) && acked > 5)
            break;
        usleep(10000);
    }
    cr_assert(saw_down, "writable went to 0");
    cr_assert_gt(failed, 0, "the batch after the kill failed");
    cr_assert(tly_store_writable(s), "writable again after reconnecting");
    tly_store_op_t last = ballot_op("poll1", "last", "v_last", "r_last");
    submit_wait(s, &last);
    cr_assert_eq(last.result, 0);

    /* The follower reconnected too: a sync still completes. */
    int target = synced + 1;
    tly_store_sync(s, on_sync, NULL);
    pump_until(&s, 1, synced_reached, &target);

    memset(&seen, 0, sizeof seen);
    tly_store_close(s);
    for (int i = 0; i < nops; i++) {
        char sql[128];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM ballots WHERE vote_id = '%s'", ids[i][1]);
        cr_assert_eq(db_int(sql), ops[i].result == 0 ? 1 : 0, "op %d (result %d)", i, ops[i].result);
    }
    assert_counters_exact();
}

/* ---- pages, close, generated ballots ------------------------------------------------------- */

#define PAGED 2500

typedef struct {
    int64_t last_seq;
    int rows, out_of_order, foreign;
    unsigned char *seen;
} walk_t;

static void walk_note(walk_t *w, int64_t seq, const char *poll_id, const char *voter)
{
    int i;
    if (seq <= w->last_seq)
        w->out_of_order++;
    w->last_seq = seq;
    w->rows++;
    if (strcmp(poll_id, "poll1") != 0 || sscanf(voter, "voter%d", &i) != 1 || i < 0 || i >= PAGED)
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

Test(store_pg, pages_walk_every_row_once_in_seq_order)
{
    NEED_PG();
    static char ids[2 * PAGED][3][24];
    static tly_store_op_t ops[2 * PAGED];
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    for (int i = 0; i < 2 * PAGED; i++) {
        snprintf(ids[i][0], 24, "voter%d", i / 2);
        snprintf(ids[i][1], 24, "v_%d", i);
        snprintf(ids[i][2], 24, "r_%d", i);
        ops[i] = ballot_op(i % 2 ? "poll2" : "poll1", ids[i][0], ids[i][1], ids[i][2]);
    }
    submit_chain(s, ops, 2 * PAGED);
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    for (int pass = 0; pass < 2; pass++) {
        walk_t w = {.seen = calloc(PAGED, 1)};
        int pages = 0, n;
        while ((n = pass == 0 ? tly_store_ballots_page(r, "poll1", w.last_seq, 1000, walk_ballot, &w)
                              : tly_store_audit_page(r, "poll1", w.last_seq, 1000, walk_audit, &w)) > 0)
            pages++;
        cr_assert_eq(n, 0);
        cr_assert_eq(pages, 3);
        cr_assert_eq(w.rows, PAGED);
        cr_assert_eq(w.out_of_order, 0);
        cr_assert_eq(w.foreign, 0);
        for (int i = 0; i < PAGED; i++)
            cr_assert_eq(w.seen[i], 1, "pass %d: voter%d seen %d times", pass, i, w.seen[i]);
        free(w.seen);
    }
    tly_store_reader_close(r);
    tly_store_close(s);
    /* The page reads go through the (poll_id, seq) index of one partition. */
    PGconn *c = PQconnectdb(db_url);
    PQclear(PQexec(c, "ANALYZE ballots; ANALYZE audit"));
    const char *sqls[] = {tly_store_pg_audit_page_sql, tly_store_pg_ballots_page_sql};
    for (int i = 0; i < 2; i++) {
        char q[600], plan[4096] = "";
        const char *params[3] = {"poll1", "100", "20"};
        snprintf(q, sizeof q, "EXPLAIN %s", sqls[i]);
        PGresult *res = PQexecParams(c, q, 3, NULL, params, NULL, NULL, 0);
        cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(res));
        for (int k = 0; k < PQntuples(res); k++)
            strncat(plan, PQgetvalue(res, k, 0), sizeof plan - strlen(plan) - 1);
        PQclear(res);
        cr_assert_not_null(strstr(plan, "Index"), "%s", plan);
        cr_assert_null(strstr(plan, "Sort"), "%s", plan);
        cr_assert_null(strstr(plan, "Append"), "one partition: %s", plan);
    }
    PQfinish(c);
}

static void free_done(tly_store_op_t *op)
{
    ndone++;
    free(op);
}

Test(store_pg, close_commits_queued_ops_and_runs_callbacks)
{
    NEED_PG();
    static char ids[200][3][24];
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
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
    tly_store_close(s);
    cr_assert_eq(ndone, target);
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), 200);
}

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

Test(store_pg, generate_ballots_for_tests_and_benchmarks)
{
    NEED_PG();
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 3, 25001), 0);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 3, 10), TLY_EEXIST);
    cr_assert_eq(tly_store_generate_ballots(s, "nope", 3, 10), TLY_ENOTFOUND);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 0, 10), TLY_EINVAL);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 257, 10), TLY_EINVAL);
    tly_store_op_t b = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b);
    cr_assert_eq(b.result, 0);
    tly_store_close(s);
    s = open_store();
    gen_seen_t g = {0};
    tly_store_load_cb_t cb = {.ballot = see_generated};
    cr_assert_eq(tly_store_load(s, &cb, &g), 0);
    cr_assert_eq(g.rows, 25002);
    cr_assert_eq(g.bad_choice, 1);
    tly_store_close(s);
    cr_assert_eq(db_int("SELECT count(*) FROM audit WHERE event = 'cast'"), 25002);
    cr_assert_eq(db_int("SELECT count(DISTINCT choices) FROM ballots WHERE voter_id LIKE 'gen%'"), 3);
    assert_counters_exact();
}

Test(store_pg, two_instances_starting_at_once_migrate_once)
{
    NEED_PG();
    tly_store_t *a = NULL, *b = NULL;
    tly_store_conf_t ca = {.url = db_url, .origin = "a"}, cb = {.url = db_url, .origin = "b"};
    cr_assert_eq(tly_store_open(&ca, &a), 0);
    cr_assert_eq(tly_store_open(&cb, &b), 0);
    tly_store_close(a);
    tly_store_close(b);
    cr_assert_eq(db_int("SELECT count(*) FROM schema_version"), 1);
    tly_store_conf_t bad = {.url = "postgres://nobody@127.0.0.1:1/none", .origin = "x"};
    cr_assert_lt(tly_store_open(&bad, &a), 0);
    cr_assert_null(a);
}

/* ---- reconciliation: counter rows against the ballots -------------------------------- */

typedef struct {
    int ndrift, nactual;
    struct {
        char poll_id[32];
        int position;
        int64_t stored, actual;
    } drift[32];
    struct {
        char poll_id[32];
        int position;
        int64_t count;
    } actual[64];
} rec_seen_t;

static void rec_drift(void *ctx, const tly_store_drift_t *d)
{
    rec_seen_t *r = ctx;
    cr_assert_lt(r->ndrift, 32);
    snprintf(r->drift[r->ndrift].poll_id, 32, "%s", d->poll_id);
    r->drift[r->ndrift].position = d->position;
    r->drift[r->ndrift].stored = d->stored;
    r->drift[r->ndrift].actual = d->actual;
    r->ndrift++;
}

static void rec_actual(void *ctx, const char *poll_id, int position, int64_t count)
{
    rec_seen_t *r = ctx;
    cr_assert_lt(r->nactual, 64);
    snprintf(r->actual[r->nactual].poll_id, 32, "%s", poll_id);
    r->actual[r->nactual].position = position;
    r->actual[r->nactual].count = count;
    r->nactual++;
}

static int rec_run(tly_store_reader_t *rd, int repair, rec_seen_t *seen)
{
    memset(seen, 0, sizeof *seen);
    return tly_store_reconcile(rd, repair, rec_drift, rec_actual, seen);
}

/* The drift reported for (poll_id, position), or fails. */
static void rec_expect_drift(const rec_seen_t *r, const char *poll_id, int position, int64_t stored, int64_t actual)
{
    for (int i = 0; i < r->ndrift; i++)
        if (strcmp(r->drift[i].poll_id, poll_id) == 0 && r->drift[i].position == position) {
            cr_assert_eq(r->drift[i].stored, stored, "%s/%d stored", poll_id, position);
            cr_assert_eq(r->drift[i].actual, actual, "%s/%d actual", poll_id, position);
            return;
        }
    cr_assert_fail("no drift reported for %s/%d", poll_id, position);
}

/* poll1 (3 options): voter1 {0, 2}, voter2 {1}, voter3 {0, 0} (a position listed twice
 * counts once); poll2 (2 options): no ballots. */
static tly_store_t *rec_fixture(void)
{
    static const uint8_t twice0[] = {0, 0};
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    tly_store_op_t b[3] = {ballot_op("poll1", "voter1", "v_1", "r_1"), ballot_op("poll1", "voter2", "v_2", "r_2"),
                           ballot_op("poll1", "voter3", "v_3", "r_3")};
    b[1].u.ballot.choices = choice1;
    b[1].u.ballot.nchoices = 1;
    b[2].u.ballot.choices = twice0;
    b[2].u.ballot.nchoices = 2;
    submit_chain(s, b, 3);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(b[i].result, 0);
    assert_counters_exact();
    return s;
}

Test(store_pg, reconcile_reports_drift_and_repairs_it_only_when_asked)
{
    NEED_PG();
    tly_store_t *s = rec_fixture();
    tly_store_reader_t *rd = tly_store_reader_open(s);
    cr_assert_not_null(rd);
    rec_seen_t r;

    /* Nothing drifted: no drift, and every true count of every poll, in order. */
    cr_assert_eq(rec_run(rd, 0, &r), 0);
    cr_assert_eq(r.ndrift, 0);
    static const struct {
        const char *poll;
        int position;
        int64_t count;
    } want[] = {{"poll1", -1, 3}, {"poll1", 0, 2}, {"poll1", 1, 1}, {"poll1", 2, 1},
                {"poll2", -1, 0}, {"poll2", 0, 0}, {"poll2", 1, 0}};
    cr_assert_eq(r.nactual, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < r.nactual; i++) {
        cr_assert_str_eq(r.actual[i].poll_id, want[i].poll);
        cr_assert_eq(r.actual[i].position, want[i].position);
        cr_assert_eq(r.actual[i].count, want[i].count, "%s/%d", want[i].poll, want[i].position);
    }

    /* Corrupt: a counter too high, a missing option row, a poll without ballots counting
     * some, a missing poll row, and an orphan row of a poll that does not exist. */
    exec_on(db_url, "UPDATE option_counts SET votes = votes + 5 WHERE poll_id = 'poll1' AND position = 0", NULL, 0);
    exec_on(db_url, "DELETE FROM option_counts WHERE poll_id = 'poll1' AND position = 1", NULL, 0);
    exec_on(db_url, "UPDATE poll_counts SET ballots = 7 WHERE poll_id = 'poll2'", NULL, 0);
    exec_on(db_url, "DELETE FROM poll_counts WHERE poll_id = 'poll1'", NULL, 0);
    exec_on(db_url, "INSERT INTO option_counts VALUES ('ghost', 0, 3)", NULL, 0);

    /* Without repair: reported, nothing changed. */
    cr_assert_eq(rec_run(rd, 0, &r), 5);
    cr_assert_eq(r.ndrift, 5);
    rec_expect_drift(&r, "poll1", 0, 7, 2);
    rec_expect_drift(&r, "poll1", 1, 0, 1);
    rec_expect_drift(&r, "poll1", -1, 0, 3);
    rec_expect_drift(&r, "poll2", -1, 7, 0);
    rec_expect_drift(&r, "ghost", 0, 3, 0);
    for (int i = 0; i < r.nactual; i++) /* the true counts, not the rows; no orphan */
        cr_assert_str_neq(r.actual[i].poll_id, "ghost");
    cr_assert_eq(r.nactual, 7);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 7);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 0);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll2'"), 7);

    /* With repair: the same report, and the rows are the true counts afterwards. */
    cr_assert_eq(rec_run(rd, 1, &r), 5);
    rec_expect_drift(&r, "poll1", 0, 7, 2);
    rec_expect_drift(&r, "ghost", 0, 3, 0);
    assert_counters_exact();
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 1);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll1'"), 3);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll2'"), 0);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'ghost'"), 0);

    /* And then nothing is left; the writer keeps the repaired rows right. */
    cr_assert_eq(rec_run(rd, 0, &r), 0);
    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter2", 5);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    assert_counters_exact();
    cr_assert_eq(rec_run(rd, 0, &r), 0);
    tly_store_reader_close(rd);
    tly_store_close(s);
}

Test(store_pg, reconcile_does_nothing_while_another_holds_the_lock)
{
    NEED_PG();
    tly_store_t *s = rec_fixture();
    tly_store_reader_t *rd = tly_store_reader_open(s);
    cr_assert_not_null(rd);
    exec_on(db_url, "UPDATE option_counts SET votes = 9 WHERE poll_id = 'poll1' AND position = 2", NULL, 0);
    PGconn *other = PQconnectdb(db_url);
    cr_assert_eq(PQstatus(other), CONNECTION_OK);
    PQclear(PQexec(other, "BEGIN"));
    PGresult *res = PQexec(other, "SELECT pg_advisory_xact_lock(" TLY_STORE_PG_RECONCILE_LOCK ")");
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(res));
    PQclear(res);
    rec_seen_t r;
    cr_assert_eq(rec_run(rd, 1, &r), TLY_ESTATE);
    cr_assert_eq(r.ndrift + r.nactual, 0);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 9);
    PQclear(PQexec(other, "COMMIT"));
    PQfinish(other);
    cr_assert_eq(rec_run(rd, 1, &r), 1);
    rec_expect_drift(&r, "poll1", 2, 9, 1);
    assert_counters_exact();
    tly_store_reader_close(rd);
    tly_store_close(s);
}

typedef struct {
    tly_store_reader_t *rd;
    rec_seen_t seen;
    int rc;
} rec_thread_t;

static void *rec_thread(void *arg)
{
    rec_thread_t *t = arg;
    t->rc = rec_run(t->rd, 1, &t->seen);
    return NULL;
}

/* A repair running while another instance commits ballots (and moves the same counter
 * rows) neither loses nor double-counts them: counters move by the drift found. */
Test(store_pg, reconcile_repair_is_right_while_ballots_commit_meanwhile)
{
    NEED_PG();
    tly_store_t *s = rec_fixture();
    rec_thread_t t = {.rd = tly_store_reader_open(s)};
    cr_assert_not_null(t.rd);
    exec_on(db_url, "UPDATE option_counts SET votes = votes + 5 WHERE poll_id = 'poll1' AND position = 0", NULL, 0);
    exec_on(db_url, "UPDATE poll_counts SET ballots = ballots + 2 WHERE poll_id = 'poll1'", NULL, 0);
    /* "Another instance": a ballot for option 0 and its counters, not yet committed. */
    PGconn *other = PQconnectdb(db_url);
    cr_assert_eq(PQstatus(other), CONNECTION_OK);
    static const char *const steps[] = {
        "BEGIN",
        "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
        " VALUES ('poll1', 'late', 'v_late', 'r_late', '\\x00', 1)",
        "UPDATE option_counts SET votes = votes + 1 WHERE poll_id = 'poll1' AND position = 0",
        "UPDATE poll_counts SET ballots = ballots + 1 WHERE poll_id = 'poll1'",
    };
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        PGresult *res = PQexec(other, steps[i]);
        cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(res));
        PQclear(res);
    }
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, rec_thread, &t), 0);
    usleep(500 * 1000); /* the repair reads its snapshot and waits for the row locks */
    PQclear(PQexec(other, "COMMIT"));
    pthread_join(th, NULL);
    PQfinish(other);
    cr_assert_eq(t.rc, 2);
    rec_expect_drift(&t.seen, "poll1", 0, 7, 2); /* as of its snapshot: without "late" */
    rec_expect_drift(&t.seen, "poll1", -1, 5, 3);
    assert_counters_exact(); /* and yet right with it */
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 3);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll1'"), 4);
    tly_store_reader_close(t.rd);
    tly_store_close(s);
}

/* SQLite keeps no counter rows: nothing to reconcile, nothing called. */
Test(store_pg, reconcile_on_sqlite_is_a_no_op)
{
    char dir[] = "/tmp/tally-rec-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    tly_store_t *s = NULL;
    tly_store_conf_t conf = {.data_dir = dir, .notify = notify};
    cr_assert_eq(tly_store_open(&conf, &s), 0);
    tly_store_reader_t *rd = tly_store_reader_open(s);
    cr_assert_not_null(rd);
    rec_seen_t r;
    cr_assert_eq(rec_run(rd, 1, &r), 0);
    cr_assert_eq(r.ndrift + r.nactual, 0);
    tly_store_reader_close(rd);
    tly_store_close(s);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
