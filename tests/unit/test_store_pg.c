/*
 * test_store_pg.c: the PostgreSQL store. Needs a server: TALLY_TEST_PG is a libpq URI
 * of one on which the tests may CREATE DATABASE (e.g.
 * postgres://postgres@127.0.0.1:5432/postgres); without it every test is skipped. Each
 * test creates a fresh database with a random name and drops it afterwards.
 *
 * As in test_store.c, done callbacks run in tly_store_reap on the test thread and the
 * stores' notify writes a byte to a pipe the test waits on, as the event loop would.
 * Several stores on one database stand for several tally instances. The scenarios that
 * mean the same on SQLite are in store_scenarios.h; the tests here run them and check
 * what only PostgreSQL has (counter rows, the feed, partitions, query plans).
 */
#include "base/base.h"
#include "store/store_int.h"
#define STORE_CHECKS_VOTERS 1 /* store_scenarios.h: PostgreSQL keeps UNIQUE(poll_id, voter_id) */
#include "store_scenarios.h"

#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char admin_url[512], db_url[512], db_name[64];

ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    if (getenv("TALLY_TEST_PG") == NULL || getenv("TALLY_TEST_PG")[0] == '\0')
        fprintf(stderr, "test_store_pg: TALLY_TEST_PG is not set: PostgreSQL store tests skipped\n");
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
    open_notify_pipe();
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
    close_notify_pipe();
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

static const uint8_t choice0[] = {0}, choice1[] = {1}, choice2[] = {2};

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

Test(store_pg, round_trip_every_field)
{
    NEED_PG();
    tly_store_close(round_trip_scenario(open_store()));
    cr_assert_eq(db_int("SELECT max(version) FROM schema_version"), 6);
    cr_assert_eq(db_int("SELECT count(*) FROM pg_inherits WHERE inhparent = 'ballots'::regclass"), 16);
    cr_assert_eq(db_int("SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit'::regclass"), 16);
    assert_counters_exact();
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 0);
}

/* ---- duplicates ---------------------------------------------------------------------- */

Test(store_pg, duplicate_ballot_same_batch_and_later_batch)
{
    NEED_PG();
    tly_store_t *s = open_store();
    duplicate_ballots_in_one_batch(s);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 2,
                 "the duplicate did not move the counter");
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'poll1'"), 2);
    cr_assert_eq(db_int("SELECT count(*) FROM audit"), 2, "a duplicate writes no audit row");
    tly_store_close(duplicate_ballots_in_later_batches(s));
    assert_counters_exact();
}

Test(store_pg, duplicate_username_and_poll_id)
{
    NEED_PG();
    tly_store_t *s = duplicate_username_scenario(open_store());
    tly_store_close(duplicate_poll_id_scenario(s));
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts"), 3);
}

/* ---- async requests ------------------------------------------------------------------ */

Test(store_pg, ballot_with_request_writes_request_row)
{
    NEED_PG();
    tly_store_close(request_row_scenario(open_store()));
}

/* ---- polls ----------------------------------------------------------------------------- */

Test(store_pg, poll_delete_removes_everything_of_the_poll)
{
    NEED_PG();
    tly_store_t *s = poll_delete_scenario(open_store());
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
    poll_update_to_two_options(s);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts WHERE poll_id = 'poll1'"), 2);
    assert_counters_exact();
    tly_store_op_t back = poll_op("poll1", 3); /* position 2 is back: counted from the ballots */
    back.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &back);
    cr_assert_eq(back.result, 0);
    cr_assert_eq(db_int("SELECT count(*) FROM option_counts WHERE poll_id = 'poll1'"), 3);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 0);
    assert_counters_exact();
    tly_store_close(poll_update_again_and_of_a_missing_poll(s));
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

/* ---- what load refuses ---------------------------------------------------------------- */

static void exec_db(const char *sql)
{
    exec_on(db_url, sql, NULL, 0);
}

/* Each way a row of this store can fail to load, damaged into the fixture
 * (bad_rows_fixture) as test_store.c does it for SQLite; the answers are the same.
 * (Users: every column load requires is NOT NULL or the key here.) */
static const bad_case_t pg_bad_cases[] = {
    {{"a choice outside the poll's options", "ballots", "poll_id=poll1 voter_id=voter1",
      "choice position 7 is outside the poll's 3 options", 1, 2, 1, 1, 1},
     "UPDATE ballots SET choices = '\\x0007' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = '\\x0001' WHERE voter_id = 'voter1'"},
    {{"a choice named twice", "ballots", "poll_id=poll1 voter_id=voter1", "choice position 1 is named twice", 1, 2, 1,
      1, 1},
     "UPDATE ballots SET choices = '\\x0101' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = '\\x0001' WHERE voter_id = 'voter1'"},
    {{"scores of another length than the choices", "ballots", "poll_id=poll1 voter_id=voter1",
      "scores is not as long as choices", 1, 2, 1, 1, 1},
     "UPDATE ballots SET scores = '\\x010203' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET scores = NULL WHERE voter_id = 'voter1'"},
    {{"more choices than a byte can number", "ballots", "poll_id=poll1 voter_id=voter1",
      "choices is longer than 255 bytes", 1, 2, 1, 1, 1},
     "UPDATE ballots SET choices = decode(repeat('00', 256), 'hex') WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = '\\x0001' WHERE voter_id = 'voter1'"},
    {{"an address hash that is not 16 bytes", "ballots", "poll_id=poll1 voter_id=voter1", "ip_hash is not 16 bytes", 1,
      2, 1, 1, 1},
     "UPDATE ballots SET ip_hash = '\\x0102' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET ip_hash = NULL WHERE voter_id = 'voter1'"},
    {{"a ballot's body hash that is not 16 bytes", "ballots", "poll_id=poll2 voter_id=voter2",
      "body_hash is not 16 bytes", 1, 2, 1, 1, 1},
     "UPDATE ballots SET body_hash = '\\x01' WHERE voter_id = 'voter2'",
     "UPDATE ballots SET body_hash = NULL WHERE voter_id = 'voter2'"},
    /* no foreign key here (pg_schema.c says why): a ballot may name any poll */
    {{"a ballot of a poll that does not exist", "ballots", "poll_id=ghost voter_id=voter9", "no poll with this poll_id",
      1, 2, 2, 1, 1},
     "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
     " VALUES('ghost', 'voter9', 'v_9', 'r_9', '\\x00', 1)",
     "DELETE FROM ballots WHERE poll_id = 'ghost'"},
    {{"a control byte in a key, escaped in the log", "ballots", "voter_id=vo\\x01ter1", "choice position 7", 1, 2, 1,
      1, 1},
     "UPDATE ballots SET voter_id = 'vo' || chr(1) || 'ter1', choices = '\\x07' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET voter_id = 'voter1', choices = '\\x0001' WHERE voter_id = 'vo' || chr(1) || 'ter1'"},
    {{"a poll whose option positions have a gap", "options", "poll_id=poll2 position=0",
      "option positions must run 0..0; position 0 is not there", 2, 1, 1, 1, 1},
     "DELETE FROM options WHERE poll_id = 'poll2' AND position = 0",
     "INSERT INTO options(poll_id, position, option_id, text, display_order) VALUES('poll2', 0, 'optX', 'Yes', 0)"},
    {{"a poll's body hash that is not 16 bytes", "polls", "poll_id=poll2", "body_hash is not 16 bytes", 2, 1, 1, 1, 1},
     "UPDATE polls SET body_hash = '\\x01' WHERE poll_id = 'poll2'",
     "UPDATE polls SET body_hash = NULL WHERE poll_id = 'poll2'"},
    {{"a request in no known state", "vote_requests", "request_id=req1", "state is not pending, completed or failed", 1,
      2, 2, 0, 1},
     "UPDATE vote_requests SET state = 'lost'", "UPDATE vote_requests SET state = 'completed'"},
    {{"a retracted key's body hash that is not 16 bytes", "audit", "seq=", "body_hash is not 16 bytes", 1, 2, 2, 1, 1},
     "INSERT INTO audit(poll_id, voter_id, event, at, idem_key, body_hash)"
     " VALUES('gone', 'voter8', 'revoked', 1700000003000, 'k8', '\\x01')",
     "DELETE FROM audit WHERE poll_id = 'gone'"},
};

Test(store_pg, a_bad_row_refuses_the_load_unless_left_out)
{
    NEED_PG();
    bad_cases_scenario(pg_bad_cases, sizeof pg_bad_cases / sizeof pg_bad_cases[0], exec_db);
}

/* A second ballot of voter1 in poll1, once the primary key that forbids it is gone. */
Test(store_pg, a_row_a_callback_refuses_is_a_bad_row)
{
    NEED_PG();
    refused_rows_scenario(exec_db, "ALTER TABLE ballots DROP CONSTRAINT ballots_pkey;"
                                   "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
                                   " VALUES('poll1', 'voter1', 'v_1b', 'r_1b', '\\x02', 1)");
}

/* Bad rows left out, the store goes on as usual: it follows the feed from its load. */
Test(store_pg, a_load_that_leaves_rows_out_still_follows_the_feed)
{
    NEED_PG();
    bad_rows_fixture(open_store());
    exec_db("UPDATE ballots SET choices = '\\x0007' WHERE voter_id = 'voter1'");
    tly_store_t *s = open_store();
    bad_seen_t seen = {0};
    cr_assert_eq(bad_load(s, &seen, 1), 1);
    tly_store_op_t b = ballot_op("poll2", "voter4", "v_4", "r_4");
    submit_wait(s, &b);
    cr_assert_eq(b.result, 0);
    cr_assert_eq(tly_store_applied_seq(s), db_int("SELECT seq FROM feed_head"));
    tly_store_close(s);
}

/* ---- ballot changes, retractions, audit, pages ------------------------------------------- */

Test(store_pg, audit_records_cast_changed_revoked_in_order)
{
    NEED_PG();
    tly_store_t *s = open_store();
    audit_cast_and_change(s);
    /* voter1's ballot is now {2}, voter3's {0, 1} */
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 0"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 1"), 1);
    cr_assert_eq(db_int("SELECT votes FROM option_counts WHERE poll_id = 'poll1' AND position = 2"), 1);
    tly_store_close(audit_after_change(s));
    cr_assert_eq(db_int("SELECT count(*) FROM (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_no_update') t"), 1);
    assert_counters_exact();
}

Test(store_pg, a_changed_ballot_keeps_its_first_cast_across_restarts)
{
    NEED_PG();
    tly_store_close(first_cast_scenario(open_store()));
    assert_counters_exact();
}

Test(store_pg, migration_3_to_4_takes_first_casts_from_the_audit_log)
{
    NEED_PG();
    tly_store_close(first_cast_scenario(open_store()));
    /* the same history as schema version 3 kept it: no copies beside the ballots (and
     * none of what later versions add) */
    exec_on(db_url,
            "DROP TABLE device_links; DROP FUNCTION link_ballots(jsonb);"
            "DROP INDEX ballots_changed;"
            "ALTER TABLE ballots DROP COLUMN cast_choices, DROP COLUMN cast_scores, DROP COLUMN cast_at;"
            "DROP INDEX polls_join_code; ALTER TABLE polls DROP COLUMN join_code;" /* migration 5's (6: above) */
            "DELETE FROM schema_version; INSERT INTO schema_version VALUES (3);",
            NULL, 0);
    casts_seen_t cs;
    tly_store_t *s = reopen_casts(open_store(), &cs);
    assert_final_casts(&cs);
    tly_store_close(s);
    cr_assert_eq(db_int("SELECT max(version) FROM schema_version"), 6);
    cr_assert_eq(db_int("SELECT count(*) FROM ballots WHERE cast_at IS NOT NULL"), 3,
                 "voter1, voter3 (no key: kept, not loaded) and voter4");
}

Test(store_pg, replace_and_delete_of_a_missing_ballot_fail_alone)
{
    NEED_PG();
    tly_store_t *s = open_store();
    missing_ballot_changes_scenario(s);
    cr_assert_eq(db_int("SELECT count(*) FROM audit"), 2);
    tly_store_close(s);
    assert_counters_exact();
}

/* ---- device links ------------------------------------------------------------------------ */

Test(store_pg, a_device_link_moves_ballots_and_polls_retracts_the_later_ballot_and_survives_restart)
{
    NEED_PG();
    tly_store_t *s = link_scenario(open_store());
    tly_store_close(s);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'pl2'"), 1, "the retraction moved the counter");
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'pl3'"), 1);
    cr_assert_eq(db_int("SELECT ballots FROM poll_counts WHERE poll_id = 'pl4'"), 2);
    assert_counters_exact();
    /* the link is in the feed with what it did, for the other instances */
    cr_assert_eq(db_int("SELECT count(*) FROM feed WHERE ops::jsonb @> '[{\"t\": 7, \"device_id\": \"anon_dev\","
                        " \"ballots\": [{\"poll_id\": \"pl2\", \"outcome\": 2}], \"polls_moved\": [\"pl5\"]}]'"),
                 1);
}

/* Another instance that has not heard of a link writes under the device's id: its ballot
 * and its poll are refused (TLY_EAUTH) and write nothing; a change of the device's ballot
 * finds none. A link whose list was made before a later change of the device's ballots
 * is refused (TLY_ESTATE) and nothing of it is written. */
Test(store_pg, writes_under_a_linked_device_are_refused_and_a_stale_list_refuses_the_link)
{
    NEED_PG();
    tly_store_t *s = open_store();
    link_prepare(s);
    int64_t stale = link_scenario_op.u.link.after;
    tly_store_op_t late = ballot_at("pl6", "anon_dev", "v_d6", "r_d6", 1700000003000);
    submit_wait(s, &late);
    cr_assert_eq(late.result, 0);
    link_scenario_op.u.link.after = stale; /* the list does not know the ballot in pl6 */
    submit_wait(s, &link_scenario_op);
    cr_assert_eq(link_scenario_op.result, TLY_ESTATE);
    tly_free(link_scenario_op.u.link.polls_moved);
    cr_assert_eq(db_int("SELECT count(*) FROM device_links"), 0, "nothing of it written");
    cr_assert_eq(db_int("SELECT count(*) FROM ballots WHERE voter_id = 'anon_dev'"), 5);
    cr_assert_eq(db_int("SELECT count(*) FROM polls WHERE owner_id = 'anon_dev'"), 2);

    link_scenario_op.u.link.after = tly_store_applied_seq(s);
    link_scenario_ballots[4].device_seq = late.u.ballot.seq;
    submit_wait(s, &link_scenario_op);
    cr_assert_eq(link_scenario_op.result, 0);
    cr_assert_eq(link_scenario_ballots[4].outcome, TLY_LINK_MOVED, "pl6 is in the list now");
    tly_free(link_scenario_op.u.link.polls_moved);

    tly_store_op_t ops[4] = {
        ballot_at("pl6", "anon_dev", "v_x", "r_x", 1700000011000),
        owned_poll("pl8", "anon_dev", 1700000011000),
        change_op(TLY_OP_BALLOT_DELETE, "pl1", "anon_dev", 1700000011000, 0),
        ballot_at("pl6", "someone", "v_y", "r_y", 1700000011000),
    };
    ops[1].type = TLY_OP_POLL_INSERT;
    submit_chain(s, ops, 1);
    cr_assert_eq(ops[0].result, TLY_EAUTH, "a ballot under the device's id: %d", ops[0].result);
    submit_chain(s, &ops[1], 1);
    cr_assert_eq(ops[1].result, TLY_EAUTH, "a poll under the device's id: %d", ops[1].result);
    submit_chain(s, &ops[2], 2);
    cr_assert_eq(ops[2].result, TLY_ENOTFOUND, "the device's ballot is the account's now");
    cr_assert_eq(ops[3].result, 0, "others vote as before");
    cr_assert_eq(db_int("SELECT count(*) FROM polls WHERE poll_id = 'pl8'"), 0);
    cr_assert_eq(db_int("SELECT count(*) FROM ballots WHERE vote_id = 'v_x'"), 0);
    tly_store_close(s);
    assert_counters_exact();
}

/* ---- counters under a mix --------------------------------------------------------------- */

static const uint8_t set01[] = {0, 1}, set02[] = {0, 2}, set12[] = {1, 2}, set012[] = {0, 1, 2};
static const struct {
    const uint8_t *c;
    uint8_t n;
} sets3[] = {{choice0, 1}, {choice1, 1}, {choice2, 1}, {set01, 2}, {set12, 2}, {set02, 2}, {set012, 3}},
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
                ops[k] = change_op(kind < 8 ? TLY_OP_BALLOT_REPLACE : TLY_OP_BALLOT_DELETE, poll, ids[k][0], 5, 0);
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
    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter3", 9, 0);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = choice1;
    submit_wait(b, &ch);
    cr_assert_eq(ch.result, 0);
    tly_store_op_t dl = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter4", 9, 0);
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

/* ---- the final results of a closed poll (tly_poll_row_t.freeze) ------------------------ */

static void flag_sync(void *arg)
{
    *(int *)arg = 1;
}

static int flag_set(void *arg)
{
    return *(int *)arg;
}

/* Syncs s; the feed position it has applied then. */
static int64_t synced_position(tly_store_t *s)
{
    int flag = 0;
    tly_store_sync(s, flag_sync, &flag);
    pump_until(&s, 1, flag_set, &flag);
    return tly_store_applied_seq(s);
}

static tly_store_op_t freeze_op(const char *poll_id, const char *final, int64_t after)
{
    tly_store_op_t op = poll_op(poll_id, 2);
    op.type = TLY_OP_POLL_UPDATE;
    op.u.poll.final_results = final;
    op.u.poll.freeze = 1;
    op.u.poll.freeze_after = after;
    return op;
}

Test(store_pg, a_freeze_is_taken_once_only_if_nothing_changed_the_poll_since_and_then_ballots_are_refused)
{
    NEED_PG();
    tly_store_t *a = open_as("inst-a", 0), *b = open_as("inst-b", 0);
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(a, &p);
    tly_store_op_t v1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(a, &v1);
    cr_assert_eq(v1.result, 0);
    int64_t at = synced_position(a);
    cr_assert_gt(at, 0);

    /* another instance's ballot commits after that position: a tally computed there
     * misses it, and the store says so */
    tly_store_op_t v2 = ballot_op("poll1", "voter2", "v_2", "r_2");
    submit_wait(b, &v2);
    cr_assert_eq(v2.result, 0);
    tly_store_op_t stale = freeze_op("poll1", "{\"total_votes\":1}", at);
    submit_wait(a, &stale);
    cr_assert_eq(stale.result, TLY_ESTATE, "the poll changed after the freeze's position");
    cr_assert_eq(db_int("SELECT count(*) FROM polls WHERE final_results IS NOT NULL"), 0);

    /* caught up: taken; a second freeze (another instance's) is refused */
    tly_store_op_t fz = freeze_op("poll1", "{\"total_votes\":2}", synced_position(a));
    submit_wait(a, &fz);
    cr_assert_eq(fz.result, 0);
    tly_store_op_t late = freeze_op("poll1", "{\"total_votes\":9}", synced_position(b));
    submit_wait(b, &late);
    cr_assert_eq(late.result, TLY_EEXIST);

    /* from now on the poll's ballots stay as they are: a cast (alone, and in a batch
     * with other ops), a change, a retraction, an async cast whose request says why */
    tly_store_op_t v3 = ballot_op("poll1", "voter3", "v_3", "r_3");
    submit_wait(b, &v3);
    cr_assert_eq(v3.result, TLY_ESTATE);
    tly_store_op_t mixed[2] = {ballot_op("poll1", "voter5", "v_5", "r_5"), poll_op("poll2", 2)};
    submit_chain(a, mixed, 2);
    cr_assert_eq(mixed[0].result, TLY_ESTATE);
    cr_assert_eq(mixed[1].result, 0);
    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter1", 9, 0);
    ch.u.ballot.choices = choice1;
    ch.u.ballot.nchoices = 1;
    submit_wait(b, &ch);
    cr_assert_eq(ch.result, TLY_ESTATE);
    tly_store_op_t dl = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter2", 9, 0);
    submit_wait(a, &dl);
    cr_assert_eq(dl.result, TLY_ESTATE);
    tly_store_op_t v4 = ballot_op("poll1", "voter4", "v_4", "r_4");
    v4.u.ballot.request_id = "req_4";
    submit_wait(a, &v4);
    cr_assert_eq(v4.result, TLY_ESTATE);
    char text[64];
    exec_on(db_url, "SELECT state || ':' || error FROM vote_requests WHERE request_id = 'req_4'", text, sizeof text);
    cr_assert_str_eq(text, "failed:POLL_NOT_ACTIVE");

    /* an ordinary update (a new title) keeps the final results */
    tly_store_op_t up = poll_op("poll1", 2);
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.title = "renamed";
    submit_wait(b, &up);
    cr_assert_eq(up.result, 0);
    exec_on(db_url, "SELECT final_results FROM polls WHERE poll_id = 'poll1'", text, sizeof text);
    cr_assert_str_eq(text, "{\"total_votes\":2}");
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), 2);
    tly_store_close(a);
    tly_store_close(b);
    assert_counters_exact();
}

static int lock_waiters(void *arg)
{
    return db_int("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                  " AND wait_event_type = 'Lock'") > 0;
}

/* A ballot statement that waited for a freeze's lock sees the freeze once it commits. */
Test(store_pg, a_ballot_that_waited_for_a_freeze_is_refused)
{
    NEED_PG();
    tly_store_t *a = open_as("inst-a", 0);
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(a, &p);
    PGconn *c = PQconnectdb(db_url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK);
    const char *freeze[] = {"BEGIN", "SELECT 1 FROM polls WHERE poll_id = 'poll1' FOR UPDATE",
                            "UPDATE polls SET final_results = '{}' WHERE poll_id = 'poll1'"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(freeze); i++) {
        PGresult *res = PQexec(c, freeze[i]);
        cr_assert(PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK);
        PQclear(res);
    }
    tly_store_op_t v = ballot_op("poll1", "voter1", "v_1", "r_1");
    v.done = on_done;
    int target = ndone + 1;
    tly_store_submit(a, &v);
    pump_until(&a, 1, lock_waiters, NULL); /* the ballot statement waits for the row */
    PGresult *res = PQexec(c, "COMMIT");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);
    PQfinish(c);
    wait_done(a, target);
    cr_assert_eq(v.result, TLY_ESTATE);
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), 0);
    tly_store_close(a);
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

/* The page reads go through the (poll_id, seq) index of one partition. */
static void assert_page_plans_search_one_partition(void)
{
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

Test(store_pg, pages_walk_every_row_once_in_seq_order)
{
    NEED_PG();
    tly_store_t *s = open_store();
    pages_scenario(s);
    tly_store_close(s);
    assert_page_plans_search_one_partition();
}

Test(store_pg, close_commits_queued_ops_and_runs_callbacks)
{
    NEED_PG();
    tly_store_close(close_commits_queued_scenario(open_store()));
    cr_assert_eq(db_int("SELECT count(*) FROM ballots"), 200);
}

Test(store_pg, generate_ballots_for_tests_and_benchmarks)
{
    NEED_PG();
    tly_store_close(generate_ballots_scenario(open_store()));
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
    b[0].u.ballot.choices = set02;
    b[1].u.ballot.choices = choice1;
    b[1].u.ballot.nchoices = 1;
    b[2].u.ballot.choices = twice0; /* (a ballot load would refuse: reconcile reads the rows as they are) */
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
    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter2", 5, 0);
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

Test(store_pg, join_codes_unique_among_open_polls_and_freed_by_a_close)
{
    NEED_PG();
    tly_store_close(join_code_scenario(open_store()));
}

/* Migration 5 gives the polls open before it distinct codes, and the closed ones none. */
Test(store_pg, migration_5_gives_open_polls_join_codes)
{
    NEED_PG();
    tly_store_t *s = open_store();
    join_code_migration_setup(s);
    tly_store_close(s);
    exec_on(db_url,
            "DROP TABLE device_links; DROP FUNCTION link_ballots(jsonb);" /* migration 6's */
            "DROP INDEX polls_join_code; ALTER TABLE polls DROP COLUMN join_code;"
            "DELETE FROM schema_version; INSERT INTO schema_version VALUES (4);",
            NULL, 0);
    tly_store_close(join_code_migration_check());
    cr_assert_eq(db_int("SELECT max(version) FROM schema_version"), 6);
    cr_assert_eq(db_int("SELECT count(*) FROM polls WHERE join_code IS NOT NULL"), MIGRATION_POLLS);
}
