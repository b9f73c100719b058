/*
 * store_scenarios.h: the scenarios that mean the same on every store backend, written
 * once against store.h and run by a Criterion test in each suite (test_store.c for
 * SQLite, test_store_pg.c for PostgreSQL), which adds what only its backend can check
 * (files and PRAGMAs, counter rows and query plans).
 *
 * Each scenario takes a store opened with open_store() and asserts as it goes. One that
 * restarts the store (closes, reopens, loads) returns the store it ends with, still open;
 * the test closes it. Some scenarios come in steps, so that a suite can check its
 * backend's own state in between. Header-only and static, like store_helpers.h.
 */
#ifndef TALLY_TESTS_STORE_SCENARIOS_H
#define TALLY_TESTS_STORE_SCENARIOS_H

/* STORE_CHECKS_VOTERS (defined by the including file): 1 when the store itself refuses a
 * second ballot of a voter, or a reused vote id or receipt (PostgreSQL, which instances
 * share); 0 when that is its one writer process's memory's to keep (SQLite since
 * migration 6), so the store refuses only a second ballot from one address. */
#ifndef STORE_CHECKS_VOTERS
#error "define STORE_CHECKS_VOTERS before including store_scenarios.h"
#endif

#include "store_helpers.h"

/* ---- round trip ------------------------------------------------------------------------ */

/* Two users, two polls, two ballots, every field set on one of each and unset on the
 * other; load must hand each back as it was written. */
static tly_store_op_t rt_ops[6];

static int rt_user(void *ctx, const tly_user_row_t *u, const char **why)
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
    return 0;
}

static int rt_poll(void *ctx, const tly_poll_row_t *p, const char **why)
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
    return 0;
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

static int rt_ballot(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    int *n = ctx;
    cr_assert_lt(n[2], 2);
    rt_ballot_check(b, &rt_ops[4 + n[2]].u.ballot);
    cr_assert_null(b->request_id);
    n[2]++;
    return 0;
}

static int rt_request(void *ctx, const tly_request_row_t *r, const char **why)
{
    ((int *)ctx)[3]++;
    return 0;
}

static const uint8_t rt_ip_hash[16] = {0x10, 0, 0xff, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0x99};

static void fill_rt_ops(void)
{
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
    rt_ops[2].u.poll.final_results = "{\"total\":0}";
    for (int i = 0; i < 16; i++)
        rt_ops[2].u.poll.body_hash[i] = (uint8_t)(i + 1);
    rt_ops[3] = poll_op("poll2", 2); /* NULL description, no times, no key, zero hash */
    rt_ops[3].u.poll.created_at = 0;
    rt_ops[3].u.poll.updated_at = 0;
    rt_ops[3].u.poll.type = 4;
    rt_ops[4] = ballot_op("poll1", "voter1", "v_1", "rcpt1");
    rt_ops[4].u.ballot.scores = scores2;
    rt_ops[4].u.ballot.idem_key = "idem-vote-1";
    rt_ops[4].u.ballot.client_meta = "{\"ua\":\"test \\\"q\\\" \xc3\xa9\"}";
    memset(rt_ops[4].u.ballot.body_hash, 0xab, 16);
    rt_ops[4].u.ballot.ip_hash = rt_ip_hash;
    rt_ops[5] = ballot_op("poll2", "voter1", "v_2", "rcpt2");
    rt_ops[5].u.ballot.nchoices = 1;
}

static tly_store_t *round_trip_scenario(tly_store_t *s)
{
    int target = ndone + 6;
    fill_rt_ops();
    /* poll1 gets its final results after its ballot, as a poll does when it closes (a
     * shared store takes no ballot for a poll that has them) */
    const char *final = rt_ops[2].u.poll.final_results;
    rt_ops[2].u.poll.final_results = NULL;
    for (int i = 0; i < 6; i++) {
        rt_ops[i].done = on_done;
        tly_store_submit(s, &rt_ops[i]);
    }
    wait_done(s, target);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(rt_ops[i].result, 0, "op %d: %d", i, rt_ops[i].result);
    rt_ops[2].u.poll.final_results = final;
    tly_store_op_t close = rt_ops[2];
    close.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &close);
    cr_assert_eq(close.result, 0);
    tly_store_close(s);

    s = open_store();
    int n[4] = {0};
    tly_store_load_cb_t cb = {.user = rt_user, .poll = rt_poll, .ballot = rt_ballot, .request = rt_request};
    cr_assert_eq(tly_store_load(s, &cb, n), 0);
    cr_assert_eq(n[0], 2);
    cr_assert_eq(n[1], 2);
    cr_assert_eq(n[2], 2);
    cr_assert_eq(n[3], 0);
    return s;
}

/* ---- duplicates ------------------------------------------------------------------------ */

/* One address, one ballot per poll, even within one batch (voter_check "ip"): the store
 * checks this itself whatever it does about voters. poll1 exists. */
static void duplicate_address_scenario(tly_store_t *s)
{
    static const uint8_t ipa[16] = {0xa1, 1, 2, 3};
    tly_store_op_t ipops[2] = {ballot_op("poll1", "voter5", "v_5", "r_5"), ballot_op("poll1", "voter6", "v_6", "r_6")};
    ipops[0].u.ballot.ip_hash = ipops[1].u.ballot.ip_hash = ipa;
    submit_chain(s, ipops, 2);
    cr_assert_eq(ipops[0].result, 0);
    cr_assert_eq(ipops[1].result, TLY_EEXIST);
}

#if STORE_CHECKS_VOTERS
/* A poll (three options: every position the ballots name exists), then the same (poll,
 * voter) twice in one batch: only the second ballot fails, and the batch commits (on
 * SQLite, ABORT backs out only the failing INSERT). */
static void duplicate_ballots_in_one_batch(tly_store_t *s)
{
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
}

/* After duplicate_ballots_in_one_batch: duplicates in later batches (the same voter, a
 * reused vote id or receipt, a second ballot from one address); a restart finds the
 * ballots that were accepted. */
static tly_store_t *duplicate_ballots_in_later_batches(tly_store_t *s)
{
    tly_store_op_t b3 = ballot_op("poll1", "voter1", "v_4", "r_4");
    submit_wait(s, &b3);
    cr_assert_eq(b3.result, TLY_EEXIST);
    tly_store_op_t b4 = ballot_op("poll1", "voter9", "v_1", "r_9"); /* reused vote id */
    submit_wait(s, &b4);
    cr_assert_eq(b4.result, TLY_EEXIST);
    tly_store_op_t b5 = ballot_op("poll1", "voter8", "v_8", "r_1"); /* reused receipt */
    submit_wait(s, &b5);
    cr_assert_eq(b5.result, TLY_EEXIST);
    duplicate_address_scenario(s);

    seen_t seen;
    s = reopen_load(s, &seen);
    assert_ballot_ids(&seen, (const char *[]){"v_1", "v_3", "v_5", NULL});
    return s;
}

#endif

static tly_store_t *duplicate_username_scenario(tly_store_t *s)
{
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
    return s;
}

static tly_store_t *duplicate_poll_id_scenario(tly_store_t *s)
{
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll1", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    cr_assert_eq(p1.result, 0);
    cr_assert_eq(p2.result, TLY_EEXIST);
    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 3, "the failed insert left no options behind");
    return s;
}

/* ---- async requests -------------------------------------------------------------------- */

/* A ballot with a request row writes it "completed" with the vote id; one the store
 * refuses (a second ballot of the voter where the store checks voters, else a second
 * from one address) writes it "failed" with ALREADY_VOTED, in the same transaction. */
static tly_store_t *request_row_scenario(tly_store_t *s)
{
    static const uint8_t ip[16] = {0xc3, 1, 2, 3};
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);

    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1.u.ballot.request_id = "req1";
    b1.u.ballot.ip_hash = ip;
    tly_store_op_t b2 = ballot_op("poll1", STORE_CHECKS_VOTERS ? "voter1" : "voter2", "v_2", "r_2");
    b2.u.ballot.request_id = "req2";
    b2.u.ballot.ip_hash = ip;
    submit_wait(s, &b1);
    submit_wait(s, &b2);
    cr_assert_eq(b1.result, 0);
    cr_assert_eq(b2.result, TLY_EEXIST);

    if (STORE_CHECKS_VOTERS) {
        /* A consumer replaying req1 after a crash: still a duplicate, and the request's
         * first outcome ("completed") is kept. */
        tly_store_op_t b1again = ballot_op("poll1", "voter1", "v_1", "r_1");
        b1again.u.ballot.request_id = "req1";
        submit_wait(s, &b1again);
        cr_assert_eq(b1again.result, TLY_EEXIST);
    }

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
    return s;
}

/* ---- polls ----------------------------------------------------------------------------- */

/* Deleting poll1 takes its ballots and request rows, not poll2's; a second delete finds
 * nothing. Returns the store after a restart, poll1 gone. */
static tly_store_t *poll_delete_scenario(tly_store_t *s)
{
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
    assert_ballot_ids(&seen, (const char *[]){"v_3", NULL});
    cr_assert_eq(seen.requests, 0);
    return s;
}

/* An update of poll1 to two options, a new title and status 2. */
static tly_store_op_t poll_update_op(void)
{
    tly_store_op_t up = poll_op("poll1", 2);
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.title = "New title";
    up.u.poll.status = 2;
    return up;
}

/* poll1 with three options and a ballot naming positions 0 and 2, then updated to two
 * options (position 2 goes) with final results. */
static void poll_update_to_two_options(tly_store_t *s)
{
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    tly_store_op_t b = ballot_op("poll1", "voter1", "v_1", "r_1"); /* positions 0 and 2 */
    submit_wait(s, &b);
    tly_store_op_t up = poll_update_op();
    up.u.poll.final_results = "{\"done\":true}";
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
}

/* After poll_update_to_two_options: an update replaces the row, except the final
 * results, which once stored are final (one without them, or with others, keeps them),
 * and an update of a poll that does not exist fails. A restart finds the last update's
 * row and options. */
static tly_store_t *poll_update_again_and_of_a_missing_poll(tly_store_t *s)
{
    tly_store_op_t up = poll_update_op();
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
    tly_store_op_t other = poll_update_op();
    other.u.poll.final_results = "{\"done\":false}";
    submit_wait(s, &other);
    cr_assert_eq(other.result, 0);
    tly_store_op_t missing = poll_op("nope", 2);
    missing.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &missing);
    cr_assert_eq(missing.result, TLY_ENOTFOUND);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 2);
    cr_assert_str_eq(seen.final_results[0], "{\"done\":true}", "final results are never cleared or replaced");
    return s;
}

/* ---- close ------------------------------------------------------------------------------ */

/* Ops still queued at close are committed and their done callbacks run (no reap; each
 * frees its op); a restart finds every ballot. */
static tly_store_t *close_commits_queued_scenario(tly_store_t *s)
{
    static char ids[200][3][24];
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
    tly_store_close(s); /* no reap: close finishes the queue and runs the callbacks */
    cr_assert_eq(ndone, target);
    seen_t seen = {0};
    s = open_store();
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    cr_assert_eq(seen.ballots, 200);
    return s;
}

/* ---- ballot changes, retractions and the audit log ------------------------------------- */

/* Two polls; in poll1 voter1 casts (with scores, key and hash), casts again where the
 * store checks voters (refused, and no audit row), voter3 casts, and voter1 changes the
 * ballot; voter1 also votes in poll2. */
static void audit_cast_and_change(tly_store_t *s)
{
    static const uint8_t c1[] = {2}, s1[] = {7};
    tly_store_op_t p = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p);
    submit_wait(s, &p2);

    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    b1.u.ballot.scores = scores2;
    b1.u.ballot.idem_key = "idem-cast";
    memset(b1.u.ballot.body_hash, 0x11, 16);
    submit_wait(s, &b1);
    cr_assert_eq(b1.result, 0);
    if (STORE_CHECKS_VOTERS) {
        tly_store_op_t dup = ballot_op("poll1", "voter1", "v_9", "r_9");
        submit_wait(s, &dup);
        cr_assert_eq(dup.result, TLY_EEXIST, "a duplicate writes no audit row (checked below)");
    }
    tly_store_op_t other = ballot_op("poll2", "voter1", "v_2", "r_2"); /* another poll's log */
    submit_wait(s, &other);
    tly_store_op_t b3 = ballot_op("poll1", "voter3", "v_3", "r_3");
    submit_wait(s, &b3);

    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter1", 1700000005000, b1.u.ballot.seq);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = c1;
    ch.u.ballot.scores = s1;
    ch.u.ballot.idem_key = "idem-change";
    memset(ch.u.ballot.body_hash, 0x22, 16);
    ch.u.ballot.vote_id = "ignored"; /* the ballot keeps its vote id and receipt */
    submit_wait(s, &ch);
    cr_assert_eq(ch.result, 0);
}

/* The changed ballot is current, under its old vote id, receipt and seq; a retraction
 * removes it, and the voter's next ballot comes after everyone else's. */
static void audit_current_ballots(tly_store_t *s)
{
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    ballots_seen_t bs = {0};
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

    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter1", 1700000006000, seq_voter1);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    memset(&bs, 0, sizeof bs);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 10, see_page_ballot, &bs), 1);
    cr_assert_str_eq(bs.voter[0], "voter3");

    /* A retracted voter may vote again: a new ballot, after everyone else's. */
    tly_store_op_t again = ballot_op("poll1", "voter1", "v_4", "r_4");
    again.u.ballot.recorded_at = 1700000007000;
    submit_wait(s, &again);
    cr_assert_eq(again.result, 0);
    memset(&bs, 0, sizeof bs);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 10, see_page_ballot, &bs), 2);
    cr_assert_str_eq(bs.vote_id[1], "v_4");
    cr_assert_gt(bs.seq[1], seq_voter1);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 0, see_page_ballot, &bs), 0);
    tly_store_reader_close(r);
}

/* poll1's log: cast, cast, changed, revoked, cast, in seq order, each row as it was. */
static void audit_check_poll1_rows(const audit_seen_t *as)
{
    const char *events[] = {"cast", "cast", "changed", "revoked", "cast"};
    const char *voters[] = {"voter1", "voter3", "voter1", "voter1", "voter1"};
    cr_assert_eq(as->n, 5);
    for (int i = 0; i < 5; i++) {
        cr_assert_str_eq(as->event[i], events[i], "row %d", i);
        cr_assert_str_eq(as->voter[i], voters[i], "row %d", i);
        cr_assert_str_eq(as->poll[i], "poll1");
        if (i > 0)
            cr_assert_gt(as->seq[i], as->seq[i - 1]);
    }
    cr_assert_eq(as->nchoices[0], 2);
    cr_assert_arr_eq(as->choices[0], choices2, 2);
    cr_assert_arr_eq(as->scores[0], scores2, 2);
    cr_assert_eq(as->at[0], 1700000001000);
    cr_assert_eq(as->nchoices[2], 1, "the changed row holds the new ballot");
    cr_assert_eq(as->choices[2][0], 2);
    cr_assert_eq(as->scores[2][0], 7);
    cr_assert_eq(as->at[2], 1700000005000);
    cr_assert_eq(as->nchoices[3], 0);
    cr_assert_not(as->has_choices[3], "revoked: no choices");
    cr_assert_not(as->has_scores[3]);
    cr_assert_eq(as->at[3], 1700000006000);
    cr_assert_not(as->has_scores[4]);
    cr_assert_eq(as->at[4], 1700000007000);
}

/* Each poll's log apart, and paged: after poll1's third row come its last two. */
static void audit_log_rows(tly_store_t *s)
{
    audit_seen_t as, tail = {0};
    read_audit(s, "poll1", &as);
    audit_check_poll1_rows(&as);
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    cr_assert_eq(tly_store_audit_page(r, "poll1", as.seq[2], 16, see_audit, &tail), 2);
    cr_assert_str_eq(tail.event[0], "revoked");
    cr_assert_eq(tly_store_audit_page(r, "poll3", 0, 16, see_audit, &tail), 0);
    tly_store_reader_close(r);
    read_audit(s, "poll2", &as);
    cr_assert_eq(as.n, 1);
}

/* After audit_cast_and_change: the retraction and the new ballot, the current ballots
 * and the log at each step, and a restart. */
static tly_store_t *audit_after_change(tly_store_t *s)
{
    audit_current_ballots(s);
    audit_log_rows(s);

    /* A restart replays the current ballots only: the audit log is not load's business. */
    seen_t seen;
    s = reopen_load(s, &seen);
    assert_ballot_ids(&seen, (const char *[]){"v_2", "v_3", "v_4", NULL});
    return s;
}

/* A change or retraction of a ballot that does not exist (no such voter, no such poll)
 * fails alone: the other ballot of the same batch commits, and nothing reaches the log. */
static void missing_ballot_changes_scenario(tly_store_t *s)
{
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b1);

    /* voter1's seq with another voter or poll: the seq alone names nothing */
    int64_t seq = b1.u.ballot.seq;
    tly_store_op_t ops[5] = {
        change_op(TLY_OP_BALLOT_REPLACE, "poll1", "nobody", 5, seq),
        change_op(TLY_OP_BALLOT_DELETE, "poll1", "nobody", 5, seq),
        change_op(TLY_OP_BALLOT_REPLACE, "nope", "voter1", 5, seq),
        change_op(TLY_OP_BALLOT_DELETE, "nope", "voter1", 5, seq),
        ballot_op("poll1", "voter2", "v_2", "r_2"),
    };
    ops[0].u.ballot.nchoices = ops[2].u.ballot.nchoices = 1;
    ops[0].u.ballot.choices = ops[2].u.ballot.choices = choices2;
    tly_store_stats_t before, after;
    tly_store_stats(s, &before);
    submit_chain(s, ops, 5);
    tly_store_stats(s, &after);
    cr_assert_eq(after.batches - before.batches, 1, "one batch");
    for (int i = 0; i < 4; i++)
        cr_assert_eq(ops[i].result, TLY_ENOTFOUND, "op %d: %d", i, ops[i].result);
    cr_assert_eq(ops[4].result, 0, "the batch's other ballot commits");

    audit_seen_t as;
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 2, "two casts, nothing else");
    read_audit(s, "nope", &as);
    cr_assert_eq(as.n, 0);
}

/* ---- the first cast of a changed ballot ------------------------------------------------- */

/* What load's cast callback handed back, by voter: voterN in slot N (0..7). */
typedef struct {
    int n;
    bool seen[8], has_scores[8];
    uint8_t nchoices[8], choices[8][4], scores[8][4];
    int64_t at[8];
} casts_seen_t;

static int see_cast(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    casts_seen_t *cs = ctx;
    cr_assert_str_eq(b->poll_id, "poll1");
    cr_assert(strncmp(b->voter_id, "voter", 5) == 0 && b->voter_id[5] >= '0' && b->voter_id[5] <= '7' &&
              b->voter_id[6] == '\0');
    cr_assert_null(b->vote_id, "a cast row carries only the ballot");
    cr_assert_leq(b->nchoices, 4);
    int i = b->voter_id[5] - '0';
    cr_assert_not(cs->seen[i], "one cast a ballot");
    cs->n++;
    cs->seen[i] = true;
    cs->nchoices[i] = b->nchoices;
    if (b->nchoices > 0)
        memcpy(cs->choices[i], b->choices, b->nchoices);
    cs->has_scores[i] = b->scores != NULL;
    if (b->scores != NULL)
        memcpy(cs->scores[i], b->scores, b->nchoices);
    cs->at[i] = b->recorded_at;
    return 0;
}

/* Closes, reopens and loads the casts of changed ballots. */
static tly_store_t *reopen_casts(tly_store_t *s, casts_seen_t *cs)
{
    tly_store_close(s);
    s = open_store();
    memset(cs, 0, sizeof *cs);
    tly_store_load_cb_t cb = {.cast = see_cast};
    cr_assert_eq(tly_store_load(s, &cb, cs), 0);
    return s;
}

/* What first_cast_scenario ends with: voter1's first cast, and voter4's new one. */
static void assert_final_casts(const casts_seen_t *cs)
{
    cr_assert_eq(cs->n, 2);
    cr_assert(cs->seen[1] && cs->seen[4]);
    cr_assert_arr_eq(cs->choices[1], choices2, 2, "the first cast, not the first change");
    cr_assert_arr_eq(cs->scores[1], scores2, 2);
    cr_assert_eq(cs->at[1], 1700000001000);
    cr_assert_eq(cs->nchoices[4], 2);
    cr_assert_arr_eq(cs->choices[4], choices2, 2);
    cr_assert_not(cs->has_scores[4]);
    cr_assert_eq(cs->at[4], 1700000005000, "the new ballot's cast");
}

static tly_store_op_t keyed_ballot(const char *voter, const char *vote_id, const char *receipt, const char *key)
{
    tly_store_op_t op = ballot_op("poll1", voter, vote_id, receipt);
    op.u.ballot.idem_key = key;
    return op;
}

static tly_store_op_t change_to(const tly_store_op_t *cast, const char *key, const uint8_t *choice, int64_t at)
{
    tly_store_op_t op = change_op(TLY_OP_BALLOT_REPLACE, "poll1", cast->u.ballot.voter_id, at, cast->u.ballot.seq);
    op.u.ballot.nchoices = 1;
    op.u.ballot.choices = choice;
    op.u.ballot.idem_key = key;
    return op;
}

/*
 * The first replace of a ballot keeps it as cast, later ones leave that copy alone, and
 * load hands it back for changed ballots with a key: voter1 (scores, changed twice)
 * gets its cast; voter2 (never changed) and voter3 (no key) get none; voter4 (changed,
 * retracted, cast again with a key) gets none for its new ballot, and once that is
 * changed, the new one's cast. A restart in between changes nothing.
 */
static tly_store_t *first_cast_scenario(tly_store_t *s)
{
    static const uint8_t one[] = {1}, two[] = {2};
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    tly_store_op_t b1 = keyed_ballot("voter1", "v_1", "r_1", "k1");
    b1.u.ballot.scores = scores2;
    tly_store_op_t b2 = keyed_ballot("voter2", "v_2", "r_2", "k2");
    tly_store_op_t b3 = keyed_ballot("voter3", "v_3", "r_3", NULL);
    tly_store_op_t b4 = keyed_ballot("voter4", "v_4", "r_4", "k4");
    tly_store_op_t *casts[] = {&b1, &b2, &b3, &b4};
    for (int i = 0; i < 4; i++) {
        submit_wait(s, casts[i]);
        cr_assert_eq(casts[i]->result, 0);
    }
    tly_store_op_t c1 = change_to(&b1, "k1", one, 1700000002000);
    static const uint8_t s1[] = {3};
    c1.u.ballot.scores = s1;
    tly_store_op_t c3 = change_to(&b3, NULL, one, 1700000002000);
    tly_store_op_t c4 = change_to(&b4, "k4", two, 1700000002000);
    tly_store_op_t *changes[] = {&c1, &c3, &c4};
    for (int i = 0; i < 3; i++) {
        submit_wait(s, changes[i]);
        cr_assert_eq(changes[i]->result, 0);
    }

    casts_seen_t cs;
    s = reopen_casts(s, &cs);
    cr_assert_eq(cs.n, 2, "voter1 and voter4: changed, with a key");
    cr_assert(cs.seen[1] && cs.seen[4]);
    cr_assert_eq(cs.nchoices[1], 2);
    cr_assert_arr_eq(cs.choices[1], choices2, 2);
    cr_assert(cs.has_scores[1]);
    cr_assert_arr_eq(cs.scores[1], scores2, 2);
    cr_assert_eq(cs.at[1], 1700000001000, "the cast's time, not the change's");
    cr_assert_eq(cs.nchoices[4], 2);
    cr_assert_arr_eq(cs.choices[4], choices2, 2);
    cr_assert_not(cs.has_scores[4]);

    /* a second change keeps the first cast */
    tly_store_op_t c1b = change_to(&b1, "k1", two, 1700000003000);
    c1b.u.ballot.scores = s1;
    submit_wait(s, &c1b);
    cr_assert_eq(c1b.result, 0);
    /* a retraction takes the copy with the ballot; a new ballot has none until changed */
    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter4", 1700000004000, b4.u.ballot.seq);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    tly_store_op_t b4b = keyed_ballot("voter4", "v_5", "r_5", "k5");
    b4b.u.ballot.recorded_at = 1700000005000;
    submit_wait(s, &b4b);
    cr_assert_eq(b4b.result, 0);
    s = reopen_casts(s, &cs);
    cr_assert_eq(cs.n, 1);
    cr_assert(cs.seen[1]);
    cr_assert_arr_eq(cs.choices[1], choices2, 2, "the first cast, not the first change");
    cr_assert_arr_eq(cs.scores[1], scores2, 2);
    cr_assert_eq(cs.at[1], 1700000001000);

    tly_store_op_t c4b = change_to(&b4b, "k5", one, 1700000006000);
    submit_wait(s, &c4b);
    cr_assert_eq(c4b.result, 0);
    s = reopen_casts(s, &cs);
    assert_final_casts(&cs);
    return s;
}

/* ---- paged reads ------------------------------------------------------------------------ */

#define PAGED 2500

/* One walk of poll1's ballots (pass 0) or audit rows (pass 1) in pages of 1000: every
 * voter once, in seq order, nothing of poll2. */
static void walk_poll1_in_pages(tly_store_reader_t *r, int pass)
{
    walk_t w = {.seen = calloc(PAGED, 1), .nvoters = PAGED};
    int pages = 0, n, expect[] = {1000, 1000, 500};
    cr_assert_not_null(w.seen);
    while ((n = pass == 0 ? tly_store_ballots_page(r, "poll1", w.last_seq, 1000, walk_ballot, &w)
                          : tly_store_audit_page(r, "poll1", w.last_seq, 1000, walk_audit, &w)) > 0) {
        cr_assert_lt(pages, 3);
        cr_assert_eq(n, expect[pages], "pass %d page %d: %d rows", pass, pages, n);
        pages++;
    }
    cr_assert_eq(n, 0, "pass %d ended with %d", pass, n);
    cr_assert_eq(pages, 3);
    cr_assert_eq(w.rows, PAGED);
    cr_assert_eq(w.out_of_order, 0);
    cr_assert_eq(w.foreign, 0, "only poll1's rows");
    for (int i = 0; i < PAGED; i++)
        cr_assert_eq(w.seen[i], 1, "pass %d: voter%d seen %d times", pass, i, w.seen[i]);
    free(w.seen);
}

/* PAGED voters each vote in poll1 and poll2 (their rows interleave); both of poll1's
 * page reads walk every row once in seq order. Beyond the end, a poll with no rows, a
 * zero limit: empty pages, not errors. */
static void pages_scenario(tly_store_t *s)
{
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    ids_t *ids = calloc(2 * PAGED, sizeof *ids);
    tly_store_op_t *ops = calloc(2 * PAGED, sizeof *ops);
    cr_assert(ids && ops);
    cast_range(s, 0, PAGED, ids, ops);

    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    walk_poll1_in_pages(r, 0);
    walk_poll1_in_pages(r, 1);
    walk_t w = {.seen = calloc(PAGED, 1), .nvoters = PAGED, .last_seq = INT64_MAX - 1};
    cr_assert_eq(tly_store_ballots_page(r, "poll1", INT64_MAX - 1, 10, walk_ballot, &w), 0);
    cr_assert_eq(tly_store_audit_page(r, "poll3", 0, 10, walk_audit, &w), 0);
    cr_assert_eq(tly_store_ballots_page(r, "poll1", 0, 0, walk_ballot, &w), 0);
    cr_assert_eq(w.rows, 0);
    free(w.seen);
    tly_store_reader_close(r);
    free(ids);
    free(ops);
}

/* ---- generated ballots ------------------------------------------------------------------ */

/* tly_store_generate_ballots fills a poll once (arguments checked), the writer works
 * beside it, and a restart loads every generated ballot. */
static tly_store_t *generate_ballots_scenario(tly_store_t *s)
{
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 3, 25001), 0);
    if (STORE_CHECKS_VOTERS) /* the same voters and ids again */
        cr_assert_eq(tly_store_generate_ballots(s, "poll1", 3, 10), TLY_EEXIST);
    cr_assert_eq(tly_store_generate_ballots(s, "nope", 3, 10), TLY_ENOTFOUND);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 0, 10), TLY_EINVAL);
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 257, 10), TLY_EINVAL);
    /* The writer still works beside it. */
    tly_store_op_t b = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b);
    cr_assert_eq(b.result, 0);

    tly_store_close(s);
    s = open_store();
    gen_seen_t g = {0};
    tly_store_load_cb_t cb = {.ballot = see_generated};
    cr_assert_eq(tly_store_load(s, &cb, &g), 0);
    cr_assert_eq(g.rows, 25002);
    cr_assert_eq(g.bad_choice, 1, "only voter1's two-choice ballot");
    return s;
}

/* ---- bad rows --------------------------------------------------------------------------- */

/* The store the bad-row tests damage, written through the writer: user1; poll1 (3
 * options) with voter1's ballot (with an address hash); poll2 (2 options) with voter2's;
 * voter3's ballot in poll1, cast by async request req1 with key k3 and then retracted
 * (so its request row and its retracted key stay). Intact, it loads as 1 user, 2 polls,
 * 2 ballots, 1 request, 1 retracted key, which this checks. Closes s. */
static void bad_rows_fixture(tly_store_t *s)
{
    tly_store_op_t ops[6];
    ops[0] = (tly_store_op_t){.type = TLY_OP_USER_INSERT,
                              .u.user = {"user1", "Alice", "$argon2id$v=19$x", NULL, 1699999999000}};
    ops[1] = poll_op("poll1", 3);
    ops[2] = poll_op("poll2", 2);
    ops[3] = ballot_op("poll1", "voter1", "v_1", "r_1");
    ops[3].u.ballot.ip_hash = rt_ip_hash;
    ops[4] = ballot_op("poll2", "voter2", "v_2", "r_2");
    ops[5] = ballot_op("poll1", "voter3", "v_3", "r_3");
    ops[5].u.ballot.request_id = "req1";
    ops[5].u.ballot.idem_key = "k3";
    submit_chain(s, ops, 6);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(ops[i].result, 0, "op %d: %d", i, ops[i].result);
    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter3", 1700000002000, ops[5].u.ballot.seq);
    del.u.ballot.idem_key = "k3";
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    tly_store_close(s);

    s = open_store();
    bad_seen_t seen = {0};
    cr_assert_eq(bad_load(s, &seen, 0), 0);
    cr_assert_eq(seen.users, 1);
    cr_assert_eq(seen.polls, 2);
    cr_assert_eq(seen.ballots, 2);
    cr_assert_eq(seen.requests, 1);
    cr_assert_eq(seen.retracted, 1);
    tly_store_close(s);
}

/* One damage of the fixture (SQL in the store's dialect), what load must say about it,
 * and the SQL that mends it. */
typedef struct {
    bad_kind_t kind;
    const char *damage, *mend;
} bad_case_t;

/* For each case: damage the fixture with exec(sql), check both loads, mend it and check
 * that it loads whole again. */
static void bad_cases_scenario(const bad_case_t *cases, size_t n, void (*exec)(const char *sql))
{
    bad_rows_fixture(open_store());
    for (size_t i = 0; i < n; i++) {
        exec(cases[i].damage);
        tly_store_t *s = open_store();
        check_bad_kind(&s, &cases[i].kind);
        tly_store_close(s);
        exec(cases[i].mend);
        s = open_store();
        bad_seen_t seen = {0};
        cr_assert_eq(bad_load(s, &seen, 0), 0, "%s: mended", cases[i].kind.name);
        cr_assert_eq(seen.ballots, 2, "%s: mended", cases[i].kind.name);
        tly_store_close(s);
    }
}

/* A row a callback refuses is a bad row like one that does not decode: here the second
 * ballot of voter1 in poll1 that dup_sql sneaks past the store's unique key (as
 * memory's check of the voter map refuses it); then every row refused, of which the
 * first 100 are named and the rest counted; then an allocation failure, which ends the
 * load with TLY_ENOMEM. */
static void refused_rows_scenario(void (*exec)(const char *sql), const char *dup_sql)
{
    bad_rows_fixture(open_store());
    exec(dup_sql);
    tly_store_t *s = open_store();
    log_capture_t cap;
    bad_seen_t seen = {.refuse_duplicates = 1};
    log_capture_start(&cap);
    int rc = bad_load(s, &seen, 0);
    char *log = log_capture_end(&cap);
    cr_assert_eq(rc, TLY_EINVAL);
    cr_assert_eq(log_count(log, "error", "store: bad row", "ballots", "poll_id=poll1 voter_id=voter1",
                           "the voter already has a ballot in this poll"),
                 1);
    free(log);
    tly_store_close(s);
    s = open_store();
    seen = (bad_seen_t){.refuse_duplicates = 1};
    cr_assert_eq(bad_load(s, &seen, 1), 1);
    cr_assert_eq(seen.ballots, 2);
    cr_assert_str_eq(seen.voters[0], "poll1/voter1");
    cr_assert_str_eq(seen.voters[1], "poll2/voter2");

    /* 150 more ballots: 158 rows (the duplicate too), all refused */
    cr_assert_eq(tly_store_generate_ballots(s, "poll1", 3, 150), 0);
    tly_store_close(s);
    s = open_store();
    seen = (bad_seen_t){.refuse_all = 1};
    log_capture_start(&cap);
    rc = bad_load(s, &seen, 0);
    log = log_capture_end(&cap);
    cr_assert_eq(rc, TLY_EINVAL);
    cr_assert_eq(log_count(log, "error", "store: bad row", NULL, NULL, NULL), 100, "the first 100 are named");
    cr_assert_eq(log_count(log, "error", "store: bad row", "users", "user_id=user1", "the test refuses every row"), 1);
    cr_assert_eq(log_count(log, "error", "store: bad row", "ballots", NULL, "its poll is a bad row"), 97);
    cr_assert(strstr(log, "\"bad_rows\":\"158\"") != NULL, "the rest are counted");
    free(log);
    tly_store_close(s);
    s = open_store();
    seen = (bad_seen_t){.refuse_all = 1};
    log_capture_start(&cap);
    rc = bad_load(s, &seen, 1);
    log = log_capture_end(&cap);
    cr_assert_eq(rc, 158);
    cr_assert_eq(log_count(log, "warn", "store: bad row left out", NULL, NULL, NULL), 158, "each one left out is named");
    cr_assert_eq(seen.users + seen.polls + seen.ballots + seen.requests + seen.retracted, 0);
    free(log);
    tly_store_close(s);

    s = open_store();
    seen = (bad_seen_t){.enomem = 1};
    cr_assert_eq(bad_load(s, &seen, 1), TLY_ENOMEM);
    tly_store_close(s);
}

/* ---- join codes ---------------------------------------------------------------------- */

/* A join code is unique among the polls that hold one, whether given by an insert or an
 * update (TLY_EEXIST, that op alone); a closed poll (by status, or with final results)
 * holds none whatever its update says, which frees the code; load gives codes back. */
static tly_store_t *join_code_scenario(tly_store_t *s)
{
    tly_store_op_t a = poll_op("pollA", 2), b = poll_op("pollB", 2), c = poll_op("pollC", 3);
    a.u.poll.join_code = "ABCDEF";
    submit_wait(s, &a);
    cr_assert_eq(a.result, 0);
    b.u.poll.join_code = "ABCDEF";
    submit_wait(s, &b);
    cr_assert_eq(b.result, TLY_EEXIST, "a second poll with a held code");
    b.u.poll.join_code = "234567"; /* drawn again */
    submit_wait(s, &b);
    cr_assert_eq(b.result, 0);
    c.u.poll.join_code = "345678";
    submit_wait(s, &c);
    cr_assert_eq(c.result, 0);

    tly_store_op_t ub = poll_op("pollB", 2);
    ub.type = TLY_OP_POLL_UPDATE;
    ub.u.poll.join_code = "ABCDEF";
    submit_wait(s, &ub);
    cr_assert_eq(ub.result, TLY_EEXIST, "an update to a code another poll holds");
    tly_store_op_t ua = poll_op("pollA", 2);
    ua.type = TLY_OP_POLL_UPDATE;
    ua.u.poll.title = "kept its code";
    ua.u.poll.join_code = "ABCDEF";
    submit_wait(s, &ua);
    cr_assert_eq(ua.result, 0);
    /* closing pollA frees ABCDEF, even though the update still names it */
    ua.u.poll.status = 2;
    submit_wait(s, &ua);
    cr_assert_eq(ua.result, 0);
    submit_wait(s, &ub);
    cr_assert_eq(ub.result, 0, "the code of a closed poll is free");
    /* final results are a close too */
    tly_store_op_t uc = poll_op("pollC", 3);
    uc.type = TLY_OP_POLL_UPDATE;
    uc.u.poll.join_code = "345678";
    uc.u.poll.final_results = "{\"final\":true}";
    submit_wait(s, &uc);
    cr_assert_eq(uc.result, 0);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 3);
    cr_assert_str_eq(seen.poll_ids[0], "pollA");
    cr_assert_str_eq(seen.join_codes[0], "", "closed: none");
    cr_assert_str_eq(seen.poll_ids[1], "pollB");
    cr_assert_str_eq(seen.join_codes[1], "ABCDEF");
    cr_assert_str_eq(seen.join_codes[2], "", "final results: none");
    /* pollC's old code is free again */
    tly_store_op_t d = poll_op("pollD", 2);
    d.u.poll.join_code = "345678";
    submit_wait(s, &d);
    cr_assert_eq(d.result, 0);
    return s;
}

/* The polls a store from before join codes holds: MIGRATION_POLLS open ones (the first
 * a draft), then one closed by status and one with final results. */
#define MIGRATION_POLLS 40
static char migration_ids[MIGRATION_POLLS + 2][16];

static void join_code_migration_setup(tly_store_t *s)
{
    for (int i = 0; i < MIGRATION_POLLS + 2; i++) {
        snprintf(migration_ids[i], sizeof migration_ids[i], "mig%03d", i);
        tly_store_op_t op = poll_op(migration_ids[i], 2);
        op.u.poll.status = i == 0 ? 0 : i == MIGRATION_POLLS ? 2 : 1;
        if (i == MIGRATION_POLLS + 1)
            op.u.poll.final_results = "{\"final\":true}";
        submit_wait(s, &op);
        cr_assert_eq(op.result, 0);
    }
}

/* After the migration: every open poll has a code of the alphabet, no two the same; the
 * closed ones none. */
static tly_store_t *join_code_migration_check(void)
{
    seen_t seen;
    tly_store_t *s = open_store();
    memset(&seen, 0, sizeof seen);
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    cr_assert_eq(seen.polls, MIGRATION_POLLS + 2);
    for (int i = 0; i < MIGRATION_POLLS; i++) {
        char out[TLY_JOIN_CODE_LEN + 1];
        cr_assert(tly_join_code_read(seen.join_codes[i], strlen(seen.join_codes[i]), out), "%s: \"%s\"",
                  seen.poll_ids[i], seen.join_codes[i]);
        cr_assert_str_eq(out, seen.join_codes[i], "stored as read");
        for (int j = 0; j < i; j++)
            cr_assert_str_neq(seen.join_codes[i], seen.join_codes[j]);
    }
    cr_assert_str_eq(seen.join_codes[MIGRATION_POLLS], "", "closed");
    cr_assert_str_eq(seen.join_codes[MIGRATION_POLLS + 1], "", "final results");
    /* and the index holds from here on */
    tly_store_op_t dup = poll_op("after", 2);
    dup.u.poll.join_code = seen.join_codes[3];
    submit_wait(s, &dup);
    cr_assert_eq(dup.result, TLY_EEXIST);
    return s;
}

/* ---- device links ------------------------------------------------------------------------ */

typedef struct {
    int n;
} retracted_seen_t;

static int link_see_retracted(void *ctx, const tly_retracted_row_t *r, const char **why)
{
    retracted_seen_t *rs = ctx;
    cr_assert(strcmp(r->idem_key, "acc-key") == 0 || strcmp(r->idem_key, "dev-key") == 0, "%s", r->idem_key);
    cr_assert_str_eq(r->voter_id, strcmp(r->idem_key, "acc-key") == 0 ? "u_acc" : "anon_dev");
    cr_assert_eq(r->at, 1700000009000);
    rs->n++;
    return 0;
}

/* What load handed back of a linked store: the links, each poll's owner, each ballot's
 * voter and vote id. */
typedef struct {
    int links, polls, ballots;
    char link_device[4][32], link_user[4][32];
    char poll_id[8][32], owner[8][32];
    char ballot_poll[16][32], ballot_voter[16][32], ballot_vote[16][32];
} link_seen_t;

static int link_see_user(void *ctx, const tly_user_row_t *u, const char **why) { return 0; }

static int link_see_link(void *ctx, const tly_device_link_row_t *l, const char **why)
{
    link_seen_t *ls = ctx;
    cr_assert_lt(ls->links, 4);
    snprintf(ls->link_device[ls->links], 32, "%s", l->device_id);
    snprintf(ls->link_user[ls->links], 32, "%s", l->user_id);
    cr_assert_eq(l->linked_at, 1700000009000);
    ls->links++;
    return 0;
}

static int link_see_poll(void *ctx, const tly_poll_row_t *p, const char **why)
{
    link_seen_t *ls = ctx;
    cr_assert_lt(ls->polls, 8);
    snprintf(ls->poll_id[ls->polls], 32, "%s", p->poll_id);
    snprintf(ls->owner[ls->polls], 32, "%s", p->owner_id);
    ls->polls++;
    return 0;
}

static int link_see_ballot(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    link_seen_t *ls = ctx;
    cr_assert_lt(ls->ballots, 16);
    snprintf(ls->ballot_poll[ls->ballots], 32, "%s", b->poll_id);
    snprintf(ls->ballot_voter[ls->ballots], 32, "%s", b->voter_id);
    snprintf(ls->ballot_vote[ls->ballots], 32, "%s", b->vote_id);
    ls->ballots++;
    return 0;
}

static const tly_store_load_cb_t link_cb = {
    .user = link_see_user, .link = link_see_link, .poll = link_see_poll, .ballot = link_see_ballot};

/* The voter of the ballot with this vote id in load's answer; NULL when it is not there. */
static const char *link_voter_of(const link_seen_t *ls, const char *vote_id)
{
    for (int i = 0; i < ls->ballots; i++)
        if (strcmp(ls->ballot_vote[i], vote_id) == 0)
            return ls->ballot_voter[i];
    return NULL;
}

static const char *link_owner_of(const link_seen_t *ls, const char *poll_id)
{
    for (int i = 0; i < ls->polls; i++)
        if (strcmp(ls->poll_id[i], poll_id) == 0)
            return ls->owner[i];
    return NULL;
}

static tly_store_op_t owned_poll(const char *poll_id, const char *owner, int64_t created_at)
{
    tly_store_op_t op = poll_op(poll_id, 2);
    op.u.poll.owner_id = owner;
    op.u.poll.created_at = created_at;
    return op;
}

static tly_store_op_t ballot_at(const char *poll_id, const char *voter, const char *vote_id, const char *receipt,
                                int64_t at)
{
    tly_store_op_t op = ballot_op(poll_id, voter, vote_id, receipt);
    op.u.ballot.recorded_at = at;
    return op;
}

/*
 * A device "anon_dev" linked to the account "u_acc". It voted in pl1 (alone), pl2 (before
 * the account), pl3 (after the account) and pl4 (both, a poll the caller says is
 * closed); pl6 is listed but holds no ballot of the device; it owns pl5 and pl7. The
 * link: one ballot moved, the account's retracted in pl2 and the device's kept, the
 * device's retracted in pl3, both kept in pl4, nothing in pl6, pl5 and pl7 the
 * account's. A second link of the device (to anyone) is refused. After a restart, load
 * gives back the link and everything as the link left it. *link_after: the feed
 * position the list was made at (the caller's tly_store_applied_seq).
 */
static tly_store_op_t link_scenario_op;
static tly_link_ballot_t link_scenario_ballots[5];

static void link_prepare(tly_store_t *s)
{
    tly_store_op_t u = {.type = TLY_OP_USER_INSERT, .u.user = {"u_acc", "Acc", "$argon2id$v=19$x", NULL, 1699990000000}};
    submit_wait(s, &u);
    cr_assert_eq(u.result, 0);
    static const char *const polls[] = {"pl1", "pl2", "pl3", "pl4", "pl6"};
    for (int i = 0; i < 5; i++) {
        tly_store_op_t p = owned_poll(polls[i], "someone", 1700000000000 + i);
        submit_wait(s, &p);
        cr_assert_eq(p.result, 0);
    }
    tly_store_op_t own5 = owned_poll("pl5", "anon_dev", 1700000000005), own7 = owned_poll("pl7", "anon_dev", 1700000000007);
    submit_wait(s, &own5);
    submit_wait(s, &own7);
    tly_store_op_t b[7] = {
        ballot_at("pl1", "anon_dev", "v_d1", "r_d1", 1700000001000),
        ballot_at("pl2", "anon_dev", "v_d2", "r_d2", 1700000001000),
        ballot_at("pl2", "u_acc", "v_u2", "r_u2", 1700000002000),
        ballot_at("pl3", "u_acc", "v_u3", "r_u3", 1700000001000),
        ballot_at("pl3", "anon_dev", "v_d3", "r_d3", 1700000002000),
        ballot_at("pl4", "anon_dev", "v_d4", "r_d4", 1700000001000),
        ballot_at("pl4", "u_acc", "v_u4", "r_u4", 1700000002000),
    };
    b[2].u.ballot.idem_key = "acc-key"; /* kept in the "revoked" rows of the retractions */
    b[4].u.ballot.idem_key = "dev-key";
    for (int i = 0; i < 7; i++) {
        submit_wait(s, &b[i]);
        cr_assert_eq(b[i].result, 0, "ballot %d", i);
    }
    link_scenario_ballots[0] = (tly_link_ballot_t){.poll_id = "pl1", .device_seq = b[0].u.ballot.seq};
    link_scenario_ballots[1] =
        (tly_link_ballot_t){.poll_id = "pl2", .device_seq = b[1].u.ballot.seq, .user_seq = b[2].u.ballot.seq};
    link_scenario_ballots[2] =
        (tly_link_ballot_t){.poll_id = "pl3", .device_seq = b[4].u.ballot.seq, .user_seq = b[3].u.ballot.seq};
    link_scenario_ballots[3] = (tly_link_ballot_t){
        .poll_id = "pl4", .device_seq = b[5].u.ballot.seq, .user_seq = b[6].u.ballot.seq, .closed = 1};
    link_scenario_ballots[4] = (tly_link_ballot_t){.poll_id = "pl6", .device_seq = b[0].u.ballot.seq};
    link_scenario_op = (tly_store_op_t){.type = TLY_OP_DEVICE_LINK};
    link_scenario_op.u.link = (tly_link_row_t){.device_id = "anon_dev",
                                               .user_id = "u_acc",
                                               .at = 1700000009000,
                                               .nballots = 5,
                                               .ballots = link_scenario_ballots,
                                               .after = tly_store_applied_seq(s)};
}

static int link_has_poll(const tly_link_row_t *l, const char *poll_id)
{
    for (size_t i = 0; i < l->npolls_moved; i++)
        if (strcmp(l->polls_moved[i], poll_id) == 0)
            return 1;
    return 0;
}

static tly_store_t *link_scenario(tly_store_t *s)
{
    link_prepare(s);
    tly_store_op_t *op = &link_scenario_op;
    submit_wait(s, op);
    cr_assert_eq(op->result, 0, "link: %d", op->result);
    const tly_link_row_t *l = &op->u.link;
    cr_assert_eq(l->ballots[0].outcome, TLY_LINK_MOVED);
    cr_assert_eq(l->ballots[1].outcome, TLY_LINK_KEPT_DEVICE, "the device voted first in pl2");
    cr_assert_eq(l->ballots[2].outcome, TLY_LINK_KEPT_ACCOUNT, "the account voted first in pl3");
    cr_assert_eq(l->ballots[3].outcome, TLY_LINK_KEPT_BOTH, "pl4 takes no changes");
    cr_assert_eq(l->ballots[4].outcome, TLY_LINK_GONE, "no ballot of the device in pl6");
    cr_assert_eq(l->npolls_moved, 2);
    cr_assert(link_has_poll(l, "pl5") && link_has_poll(l, "pl7"));
    tly_free(l->polls_moved);

    /* a device is linked once: again, or to another account, changes nothing */
    tly_store_op_t again = {.type = TLY_OP_DEVICE_LINK};
    again.u.link = (tly_link_row_t){.device_id = "anon_dev", .user_id = "u_other", .at = 1700000010000,
                                    .after = tly_store_applied_seq(s)};
    submit_wait(s, &again);
    cr_assert_eq(again.result, TLY_EEXIST);
    tly_free(again.u.link.polls_moved);

    /* the audit: a "revoked" row under whoever's ballot went, at the link's time */
    audit_seen_t as;
    read_audit(s, "pl2", &as);
    cr_assert_eq(as.n, 3, "two casts and the account's retraction");
    cr_assert_str_eq(as.event[2], "revoked");
    cr_assert_str_eq(as.voter[2], "u_acc");
    cr_assert_eq(as.at[2], 1700000009000);
    read_audit(s, "pl3", &as);
    cr_assert_eq(as.n, 3);
    cr_assert_str_eq(as.event[2], "revoked");
    cr_assert_str_eq(as.voter[2], "anon_dev");

    /* a restart sees the same */
    tly_store_close(s);
    s = open_store();
    link_seen_t ls = {0};
    cr_assert_eq(tly_store_load(s, &link_cb, &ls), 0);
    cr_assert_eq(ls.links, 1);
    cr_assert_str_eq(ls.link_device[0], "anon_dev");
    cr_assert_str_eq(ls.link_user[0], "u_acc");
    cr_assert_str_eq(link_owner_of(&ls, "pl5"), "u_acc");
    cr_assert_str_eq(link_owner_of(&ls, "pl7"), "u_acc");
    cr_assert_str_eq(link_owner_of(&ls, "pl1"), "someone");
    cr_assert_eq(ls.ballots, 5, "pl1, pl2, pl3 one each; pl4 both");
    cr_assert_str_eq(link_voter_of(&ls, "v_d1"), "u_acc");
    cr_assert_str_eq(link_voter_of(&ls, "v_d2"), "u_acc", "the device's earlier ballot is the account's");
    cr_assert_null(link_voter_of(&ls, "v_u2"));
    cr_assert_str_eq(link_voter_of(&ls, "v_u3"), "u_acc");
    cr_assert_null(link_voter_of(&ls, "v_d3"));
    cr_assert_str_eq(link_voter_of(&ls, "v_d4"), "anon_dev", "a closed poll keeps both as they were");
    cr_assert_str_eq(link_voter_of(&ls, "v_u4"), "u_acc");

    /* the keys of the retracted ballots' requests come back with them */
    retracted_seen_t rs = {0};
    tly_store_close(s);
    s = open_store();
    tly_store_load_cb_t rcb = {.retracted = link_see_retracted};
    cr_assert_eq(tly_store_load(s, &rcb, &rs), 0);
    cr_assert_eq(rs.n, 2);
    return s;
}

#endif
