/*
 * test_store.c: the SQLite store. Each test opens a store in a fresh temporary
 * directory, writes through the group-commit writer, and (where durability is the
 * point) closes, reopens and loads everything back.
 *
 * The done callbacks run in tly_store_reap on the test thread; the store's notify
 * writes a byte to a pipe that the test waits on, as the event loop would. The rows,
 * callbacks and the scenarios that mean the same on PostgreSQL (test_store_pg.c) are in
 * store_helpers.h and store_scenarios.h; what only SQLite has (files, PRAGMAs, a VFS
 * that fails on demand, migrations of old files) is here.
 */
#include "base/base.h"
#include "store/store_int.h"
#define STORE_CHECKS_VOTERS 0 /* store_scenarios.h: one ballot a voter is memory's (migration 6) */
#include "store_scenarios.h"

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
#include <sys/stat.h>
#include <unistd.h>

static char dir[64];

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/tally-store-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    open_notify_pipe();
}

static void teardown(void)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    close_notify_pipe();
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

/* ---- round trip --------------------------------------------------------------------- */

Test(store, round_trip_every_field)
{
    tly_store_close(round_trip_scenario(open_store()));
}

Test(store, join_codes_unique_among_open_polls_and_freed_by_a_close)
{
    tly_store_close(join_code_scenario(open_store()));
}

/* ---- device links -------------------------------------------------------------------- */

Test(store, a_device_link_moves_ballots_and_polls_retracts_the_later_ballot_and_survives_restart)
{
    tly_store_close(link_scenario(open_store()));
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

/* ---- what load refuses ---------------------------------------------------------------- */

/* SQL on the test's database file, on a connection of the test's own (foreign keys off,
 * as in the sqlite3 shell: how a hand edit or a damaged file gets rows the schema would
 * refuse). */
static void exec_db(const char *sql)
{
    char path[160];
    sqlite3 *db;
    snprintf(path, sizeof path, "%s/data/nested/tally.db", dir);
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
    sqlite3_close(db);
}

/* Each way a row can fail to load, damaged into the fixture (bad_rows_fixture): the
 * load refuses, naming table, key and reason at error level; with skip_bad_rows it
 * leaves the row out (and whatever depends on it), naming each at warn level. */
static const bad_case_t sqlite_bad_cases[] = {
    {{"a choice outside the poll's options", "ballots", "seq=1 poll_id=poll1 voter_id=voter1",
      "choice position 7 is outside the poll's 3 options", 1, 2, 1, 1, 1},
     "UPDATE ballots SET choices = x'0007' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = x'0001' WHERE voter_id = 'voter1'"},
    {{"a choice named twice", "ballots", "seq=1 poll_id=poll1 voter_id=voter1", "choice position 1 is named twice", 1,
      2, 1, 1, 1},
     "UPDATE ballots SET choices = x'0101' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = x'0001' WHERE voter_id = 'voter1'"},
    {{"scores of another length than the choices", "ballots", "seq=1 poll_id=poll1 voter_id=voter1",
      "scores is not as long as choices", 1, 2, 1, 1, 1},
     "UPDATE ballots SET scores = x'010203' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET scores = NULL WHERE voter_id = 'voter1'"},
    {{"more choices than a byte can number", "ballots", "seq=1 poll_id=poll1 voter_id=voter1",
      "choices is longer than 255 bytes", 1, 2, 1, 1, 1},
     "UPDATE ballots SET choices = zeroblob(256) WHERE voter_id = 'voter1'",
     "UPDATE ballots SET choices = x'0001' WHERE voter_id = 'voter1'"},
    {{"an address hash that is not 16 bytes", "ballots", "seq=1 poll_id=poll1 voter_id=voter1",
      "ip_hash is not 16 bytes", 1, 2, 1, 1, 1},
     "UPDATE ballots SET ip_hash = x'0102' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET ip_hash = NULL WHERE voter_id = 'voter1'"},
    {{"a ballot's body hash that is not 16 bytes", "ballots", "seq=2 poll_id=poll2 voter_id=voter2",
      "body_hash is not 16 bytes", 1, 2, 1, 1, 1},
     "UPDATE ballots SET body_hash = x'01' WHERE voter_id = 'voter2'",
     "UPDATE ballots SET body_hash = NULL WHERE voter_id = 'voter2'"},
    {{"a ballot of a poll that does not exist", "ballots", "poll_id=ghost voter_id=voter9", "no poll with this poll_id",
      1, 2, 2, 1, 1},
     "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
     " VALUES('ghost', 'voter9', 'v_9', 'r_9', x'00', 1)",
     "DELETE FROM ballots WHERE poll_id = 'ghost'"},
    {{"a control byte in a key, escaped in the log", "ballots", "voter_id=vo\\x01ter1", "choice position 7", 1, 2, 1,
      1, 1},
     "UPDATE ballots SET voter_id = 'vo' || char(1) || 'ter1', choices = x'07' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET voter_id = 'voter1', choices = x'0001' WHERE voter_id = 'vo' || char(1) || 'ter1'"},
    {{"a long key, cut in the log", "ballots", "voter_id=voter10000000000000000000000000000000000000000000000000000000000...", "choice position 7", 1, 2,
      1, 1, 1},
     "UPDATE ballots SET voter_id = 'voter1' || hex(zeroblob(60)), choices = x'07' WHERE voter_id = 'voter1'",
     "UPDATE ballots SET voter_id = 'voter1', choices = x'0001' WHERE voter_id LIKE 'voter1%'"},
    /* a bad poll takes its ballots with it: 2 rows left out */
    {{"a poll whose option positions have a gap", "options", "poll_id=poll2 position=0",
      "option positions must run 0..0; position 0 is not there", 2, 1, 1, 1, 1},
     "DELETE FROM options WHERE poll_id = 'poll2' AND position = 0",
     "INSERT INTO options(poll_id, position, option_id, text, display_order) VALUES('poll2', 0, 'optX', 'Yes', 0)"},
    {{"a poll's body hash that is not 16 bytes", "polls", "poll_id=poll2", "body_hash is not 16 bytes", 2, 1, 1, 1, 1},
     "UPDATE polls SET body_hash = x'01' WHERE poll_id = 'poll2'",
     "UPDATE polls SET body_hash = NULL WHERE poll_id = 'poll2'"},
    {{"a request in no known state", "vote_requests", "request_id=req1", "state is not pending, completed or failed", 1,
      2, 2, 0, 1},
     "UPDATE vote_requests SET state = 'lost'", "UPDATE vote_requests SET state = 'completed'"},
    /* (audit rows cannot be updated: a new one, of a poll that is gone, so that the
     * mend may delete it) */
    {{"a retracted key's body hash that is not 16 bytes", "audit", "seq=", "body_hash is not 16 bytes", 1, 2, 2, 1, 1},
     "INSERT INTO audit(poll_id, voter_id, event, at, idem_key, body_hash)"
     " VALUES('gone', 'voter8', 'revoked', 1700000003000, 'k8', x'01')",
     "DELETE FROM audit WHERE poll_id = 'gone'"},
    {{"a user without a user_id", "users", "user_id=NULL", "user_id is NULL", 1, 2, 2, 1, 1},
     "INSERT INTO users(user_id, username, password_hash, created_at) VALUES(NULL, 'nobody', 'h', 1)",
     "DELETE FROM users WHERE user_id IS NULL"},
};

Test(store, a_bad_row_refuses_the_load_unless_left_out)
{
    bad_cases_scenario(sqlite_bad_cases, sizeof sqlite_bad_cases / sizeof sqlite_bad_cases[0], exec_db);
}

/* A second ballot of voter1 in poll1: the unique key tells a blob from text, the load
 * (which reads text) does not, so the callback sees voter1 twice. */
Test(store, a_row_a_callback_refuses_is_a_bad_row)
{
    refused_rows_scenario(exec_db, "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)"
                                   " VALUES('poll1', CAST('voter1' AS BLOB), 'v_1b', 'r_1b', x'02', 1)");
}

/*
 * A damaged index page: load never reads it (it walks the tables), so without the check
 * the store would load, and every later write through the index would fail. quick_check
 * finds it and the load fails with TLY_EIO, its report logged; skip_quick_check loads.
 */
Test(store, quick_check_refuses_a_damaged_index_page)
{
    char path[160];
    sqlite3 *db;
    sqlite3_stmt *st;
    bad_rows_fixture(open_store());

    snprintf(path, sizeof path, "%s/data/nested/tally.db", dir);
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    /* everything into the main file: the page written below is the one that is read */
    cr_assert_eq(sqlite3_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(db,
                                    "SELECT rootpage, (SELECT page_size FROM pragma_page_size)"
                                    " FROM sqlite_master WHERE name = 'ballots_poll_seq'",
                                    -1, &st, NULL),
                 SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    long page = sqlite3_column_int(st, 0), size = sqlite3_column_int(st, 1);
    sqlite3_finalize(st);
    sqlite3_close(db);
    cr_assert_gt(page, 1);

    /* the b-tree page header (type, free block, cell count, content start) becomes garbage */
    unsigned char junk[12];
    memset(junk, 0xee, sizeof junk);
    int fd = open(path, O_WRONLY);
    cr_assert_geq(fd, 0);
    cr_assert_eq(pwrite(fd, junk, sizeof junk, (off_t)(page - 1) * size), (ssize_t)sizeof junk);
    close(fd);

    tly_store_t *s = open_store();
    bad_seen_t seen = {0};
    log_capture_t cap;
    log_capture_start(&cap);
    int rc = bad_load(s, &seen, 0);
    char *log = log_capture_end(&cap);
    cr_assert_eq(rc, TLY_EIO);
    cr_assert(strstr(log, "\"msg\":\"store: PRAGMA quick_check found the database file damaged\"") != NULL);
    cr_assert(strstr(log, "\"report\":\"") != NULL && strstr(log, "\"report\":\"\"") == NULL, "with its report");
    free(log);

    tly_store_load_cb_t cb = {.ballot = bad_ballot, .skip_quick_check = 1};
    seen = (bad_seen_t){0};
    cr_assert_eq(tly_store_load(s, &cb, &seen), 0, "the tables themselves are whole");
    cr_assert_eq(seen.ballots, 2);
    tly_store_close(s);
}

/* ---- duplicates --------------------------------------------------------------------- */

/* The store refuses a second ballot from one address; a second ballot of a voter is
 * refused by memory (the API tests), not here: no index on a random key (migration 6). */
Test(store, duplicate_address_same_batch)
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 3);
    submit_wait(s, &p);
    duplicate_address_scenario(s);
    tly_store_close(s);
}

Test(store, duplicate_username_is_case_insensitive)
{
    tly_store_close(duplicate_username_scenario(open_store()));
}

Test(store, duplicate_poll_id)
{
    tly_store_close(duplicate_poll_id_scenario(open_store()));
}

/* ---- async requests ----------------------------------------------------------------- */

Test(store, ballot_with_request_writes_request_row)
{
    tly_store_close(request_row_scenario(open_store()));
}

/* ---- polls -------------------------------------------------------------------------- */

Test(store, poll_delete_removes_options_ballots_requests)
{
    tly_store_t *s = poll_delete_scenario(open_store());
    /* The options went too: a new poll with the same id takes fresh options. */
    tly_store_op_t p1b = poll_op("poll1", 2);
    submit_wait(s, &p1b);
    cr_assert_eq(p1b.result, 0);
    tly_store_close(s);
}

Test(store, poll_update_replaces_row_and_options)
{
    tly_store_t *s = open_store();
    poll_update_to_two_options(s);
    tly_store_close(poll_update_again_and_of_a_missing_poll(s));
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

Test(store, close_commits_queued_ops_and_runs_callbacks)
{
    tly_store_close(close_commits_queued_scenario(open_store()));
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

/* The hook behind TALLY_FAULT_FSYNC_AFTER (tests/crash/fsync.test.mjs): the n-th fsync
 * fails, the store latches, and a restart finds exactly what was acknowledged. */
Test(store, fault_fsync_hook_fails_the_nth_fsync)
{
    cr_assert_eq(tly_store_fault_fsync(0), TLY_EINVAL);
    cr_assert_eq(tly_store_fault_fsync(1000000), 0);
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    cr_assert_eq(p.result, 0);
    /* re-armed: a batch of one ballot costs one fsync of the WAL */
    cr_assert_eq(tly_store_fault_fsync(2), 0);
    tly_store_op_t b0 = ballot_op("poll1", "voter0", "v_0", "r_0");
    submit_wait(s, &b0);
    cr_assert_eq(b0.result, 0, "the first fsync succeeds");
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    submit_wait(s, &b1);
    cr_assert_eq(b1.result, TLY_EIO, "the second fails");
    cr_assert_not(tly_store_writable(s));
    tly_store_op_t b2 = ballot_op("poll1", "voter2", "v_2", "r_2");
    submit_wait(s, &b2);
    cr_assert_eq(b2.result, TLY_EIO, "later fsyncs would succeed, but the store stays latched");

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.ballots, 1, "only the acknowledged ballot (a clean close drops the failed batch)");
    cr_assert_str_eq(seen.ballot_vote_ids[0], "v_0");
    tly_store_close(s);
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

/* One process per data directory: a second open of the same directory (another process,
 * or this one: flock locks belong to the open file) is refused while the first is open,
 * and the lock file names the holder; once the first closes, the directory opens again. */
Test(store, a_second_open_of_one_data_directory_is_refused)
{
    tly_store_t *s = open_store(), *s2 = NULL;
    char sub[128], path[160], pid[32] = "";
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    tly_store_conf_t conf = {.data_dir = sub};
    cr_assert_eq(tly_store_open(&conf, &s2), TLY_ESTATE);
    cr_assert_null(s2);
    snprintf(path, sizeof path, "%s/lock", sub);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    cr_assert_not_null(fgets(pid, sizeof pid, f));
    fclose(f);
    cr_assert_eq(strtol(pid, NULL, 10), (long)getpid());
    tly_store_close(s);
    cr_assert_eq(tly_store_open(&conf, &s2), 0);
    tly_store_close(s2);
}

/* ---- schema migration --------------------------------------------------------------- */

static void db_file(char *path, size_t n)
{
    snprintf(path, n, "%s/data/nested/tally.db", dir);
}

/* A connection of the test's own, beside the store, as another process would have. */
static sqlite3 *raw_open(int flags)
{
    char path[160];
    sqlite3 *db = NULL;
    db_file(path, sizeof path);
    cr_assert_eq(sqlite3_open_v2(path, &db, flags, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

static long long raw_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    long long v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* The schema as version 1 of tally shipped it, frozen here: a data directory written by
 * that version looks like this whatever happens to the code. */
static const char v1_schema[] =
    "CREATE TABLE users(user_id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE COLLATE NOCASE,"
    "  password_hash TEXT NOT NULL, email TEXT, created_at INTEGER NOT NULL);"
    "CREATE TABLE polls(poll_id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, title TEXT NOT NULL,"
    "  description TEXT, type INTEGER NOT NULL, status INTEGER NOT NULL, start_time INTEGER,"
    "  end_time INTEGER, settings TEXT NOT NULL, created_at INTEGER, updated_at INTEGER,"
    "  idem_key TEXT, body_hash BLOB);"
    "CREATE INDEX polls_owner ON polls(owner_id, created_at);"
    "CREATE TABLE options(poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    "  position INTEGER NOT NULL, option_id TEXT NOT NULL, text TEXT NOT NULL,"
    "  display_order INTEGER NOT NULL, PRIMARY KEY(poll_id, position));"
    "CREATE TABLE ballots(seq INTEGER PRIMARY KEY,"
    "  poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE, voter_id TEXT NOT NULL,"
    "  vote_id TEXT NOT NULL UNIQUE, receipt TEXT NOT NULL UNIQUE, choices BLOB NOT NULL,"
    "  scores BLOB, recorded_at INTEGER NOT NULL, idem_key TEXT, body_hash BLOB,"
    "  client_meta TEXT, UNIQUE(poll_id, voter_id));"
    "CREATE TABLE vote_requests(request_id TEXT PRIMARY KEY, poll_id TEXT NOT NULL,"
    "  voter_id TEXT NOT NULL, state TEXT NOT NULL, vote_id TEXT, error TEXT,"
    "  created_at INTEGER NOT NULL);"
    "CREATE INDEX vote_requests_poll ON vote_requests(poll_id);";

Test(store, migration_1_to_2_upgrades_an_existing_file_in_place)
{
    char sub[128];
    snprintf(sub, sizeof sub, "%s/data", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);

    /* What tally version 1 left behind: WAL mode, user_version 1, some rows. */
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    cr_assert_eq(sqlite3_exec(db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, v1_schema, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_exec(db,
                              "INSERT INTO users VALUES('user1', 'Alice', 'h', NULL, 1);"
                              "INSERT INTO polls VALUES('poll1', 'user1', 'Old poll', NULL, 2, 1,"
                              "  NULL, NULL, '{}', 1700000000000, 1700000000000, NULL, NULL);"
                              "INSERT INTO options VALUES('poll1', 0, 'optA', 'A', 0);"
                              "INSERT INTO options VALUES('poll1', 1, 'optB', 'B', 1);"
                              "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices,"
                              "  scores, recorded_at) VALUES('poll1', 'voter1', 'v_1', 'r_1',"
                              "  x'0001', x'0509', 1700000001000);"
                              "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices,"
                              "  recorded_at) VALUES('poll1', 'voter2', 'v_2', 'r_2', x'01',"
                              "  1700000002000);"
                              "INSERT INTO vote_requests VALUES('req1', 'poll1', 'voter2',"
                              "  'completed', 'v_2', NULL, 1700000002000);"
                              "PRAGMA user_version = 1;",
                              NULL, NULL, NULL),
                 SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_close(db);

    tly_store_t *s = open_store();
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    cr_assert_eq(seen.users, 1);
    cr_assert_eq(seen.polls, 1);
    cr_assert_eq(seen.noptions[0], 2);
    cr_assert_str_eq(seen.final_results[0], "(null)");
    assert_ballot_ids(&seen, (const char *[]){"v_1", "v_2", NULL});
    cr_assert_eq(seen.requests, 1);

    /* The ballots cast under version 1 have their "cast" rows, in commit order. */
    audit_seen_t as;
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 2);
    cr_assert_str_eq(as.event[0], "cast");
    cr_assert_str_eq(as.voter[0], "voter1");
    cr_assert_eq(as.nchoices[0], 2);
    cr_assert_eq(as.choices[0][1], 1);
    cr_assert_eq(as.scores[0][1], 9);
    cr_assert_eq(as.at[0], 1700000001000);
    cr_assert_str_eq(as.voter[1], "voter2");
    cr_assert_not(as.has_scores[1]);
    cr_assert_lt(as.seq[0], as.seq[1]);

    /* And the upgraded file takes the new operations. */
    tly_store_op_t b3 = ballot_op("poll1", "voter3", "v_3", "r_3");
    submit_wait(s, &b3);
    cr_assert_eq(b3.result, 0);
    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter1", 1700000009000, 1);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = choices2;
    submit_wait(s, &ch);
    cr_assert_eq(ch.result, 0);
    tly_store_op_t up = poll_op("poll1", 2);
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.final_results = "{\"winner\":\"optA\"}";
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 4);
    cr_assert_str_eq(as.event[2], "cast");
    cr_assert_str_eq(as.event[3], "changed");
    tly_store_close(s);

    db = raw_open(SQLITE_OPEN_READONLY);
    cr_assert_eq(raw_int(db, "PRAGMA user_version"), TLY_STORE_SCHEMA_VERSION);
    sqlite3_close(db);
    s = reopen_load(open_store(), &seen);
    cr_assert_eq(seen.ballots, 3);
    cr_assert_str_eq(seen.final_results[0], "{\"winner\":\"optA\"}");
    tly_store_close(s);
}

/* Version 2 of the schema as it shipped (migration 2 on top of v1_schema), frozen here. */
static const char v2_upgrade[] =
    "ALTER TABLE polls ADD COLUMN final_results TEXT;"
    "CREATE TABLE audit(seq INTEGER PRIMARY KEY, poll_id TEXT NOT NULL, voter_id TEXT NOT NULL,"
    "  event TEXT NOT NULL CHECK(event IN ('cast','changed','revoked')), choices BLOB, scores BLOB,"
    "  at INTEGER NOT NULL);"
    "CREATE INDEX audit_poll_seq ON audit(poll_id, seq);"
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN"
    "  SELECT RAISE(ABORT, 'audit is append-only');"
    "END;"
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
    "  WHEN EXISTS(SELECT 1 FROM polls WHERE poll_id = OLD.poll_id) BEGIN"
    "  SELECT RAISE(ABORT, 'audit rows go only with their poll');"
    "END;";

/* Ballots as load hands them over, with their address hashes copied out. */
typedef struct {
    int n;
    char voter[16][32];
    int has_ip[16];
    uint8_t ip[16][16];
} ip_seen_t;

static int see_ip_ballot(void *ctx, const tly_ballot_row_t *b, const char **why)
{
    ip_seen_t *is = ctx;
    int i = is->n++;
    cr_assert_lt(i, 16);
    snprintf(is->voter[i], 32, "%s", b->voter_id);
    is->has_ip[i] = b->ip_hash != NULL;
    if (b->ip_hash != NULL)
        memcpy(is->ip[i], b->ip_hash, 16);
    return 0;
}

static void load_ips(tly_store_t *s, ip_seen_t *is)
{
    tly_store_load_cb_t cb = {.ballot = see_ip_ballot};
    memset(is, 0, sizeof *is);
    cr_assert_eq(tly_store_load(s, &cb, is), 0);
}

static const uint8_t ip_a[16] = {0xa1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const uint8_t ip_b[16] = {0xb2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

Test(store, migration_2_to_3_adds_ip_hash_and_keeps_one_ballot_per_address)
{
    char sub[128];
    snprintf(sub, sizeof sub, "%s/data", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);

    /* What tally with schema version 2 left behind: two ballots, no address column. */
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    cr_assert_eq(sqlite3_exec(db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, v1_schema, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_exec(db, v2_upgrade, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_exec(db,
                              "INSERT INTO polls VALUES('poll1', 'user1', 'Old poll', NULL, 2, 1,"
                              "  NULL, NULL, '{}', 1700000000000, 1700000000000, NULL, NULL, NULL);"
                              "INSERT INTO options VALUES('poll1', 0, 'optA', 'A', 0);"
                              "INSERT INTO options VALUES('poll1', 1, 'optB', 'B', 1);"
                              "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices,"
                              "  recorded_at) VALUES('poll1', 'voter1', 'v_1', 'r_1', x'00', 1700000001000);"
                              "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices,"
                              "  recorded_at) VALUES('poll1', 'voter2', 'v_2', 'r_2', x'01', 1700000002000);"
                              "INSERT INTO audit(poll_id, voter_id, event, choices, at)"
                              "  SELECT poll_id, voter_id, 'cast', choices, recorded_at FROM ballots;"
                              "PRAGMA user_version = 2;",
                              NULL, NULL, NULL),
                 SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_close(db);

    tly_store_t *s = open_store();
    ip_seen_t is;
    load_ips(s, &is);
    cr_assert_eq(is.n, 2);
    cr_assert_str_eq(is.voter[0], "voter1");
    cr_assert_not(is.has_ip[0], "ballots from before version 3 have no address hash");
    cr_assert_not(is.has_ip[1]);

    /* new ballots carry one; within a poll no two share it */
    tly_store_op_t b3 = ballot_op("poll1", "voter3", "v_3", "r_3");
    b3.u.ballot.ip_hash = ip_a;
    submit_wait(s, &b3);
    cr_assert_eq(b3.result, 0);
    tly_store_op_t b4 = ballot_op("poll1", "voter4", "v_4", "r_4");
    b4.u.ballot.ip_hash = ip_a;
    submit_wait(s, &b4);
    cr_assert_eq(b4.result, TLY_EEXIST, "a second ballot from one address is refused like a second voter's");
    /* ... with a request row saying so, in the same transaction */
    tly_store_op_t b4r = ballot_op("poll1", "voter4", "v_4", "r_4");
    b4r.u.ballot.ip_hash = ip_a;
    b4r.u.ballot.request_id = "req4";
    submit_wait(s, &b4r);
    cr_assert_eq(b4r.result, TLY_EEXIST);
    b4.u.ballot.ip_hash = ip_b;
    submit_wait(s, &b4);
    cr_assert_eq(b4.result, 0, "another address");
    tly_store_op_t b5 = ballot_op("poll1", "voter5", "v_5", "r_5"); /* no address: any number of them */
    submit_wait(s, &b5);
    cr_assert_eq(b5.result, 0);
    tly_store_op_t p2 = poll_op("poll2", 2);
    submit_wait(s, &p2);
    cr_assert_eq(p2.result, 0);
    tly_store_op_t c1 = ballot_op("poll2", "voter9", "v_9", "r_9");
    c1.u.ballot.ip_hash = ip_a;
    submit_wait(s, &c1);
    cr_assert_eq(c1.result, 0, "the same hash in another poll (hashes are per poll anyway)");

    /* a change keeps the address; a retraction frees it */
    tly_store_op_t ch = change_op(TLY_OP_BALLOT_REPLACE, "poll1", "voter3", 1700000009000, b3.u.ballot.seq);
    ch.u.ballot.nchoices = 1;
    ch.u.ballot.choices = choices2;
    submit_wait(s, &ch);
    cr_assert_eq(ch.result, 0);
    tly_store_op_t b6 = ballot_op("poll1", "voter6", "v_6", "r_6");
    b6.u.ballot.ip_hash = ip_a;
    submit_wait(s, &b6);
    cr_assert_eq(b6.result, TLY_EEXIST, "still held after the change");

    s = reopen_load(s, &(seen_t){0});
    load_ips(s, &is);
    cr_assert_eq(is.n, 6);
    cr_assert_str_eq(is.voter[2], "voter3");
    cr_assert(is.has_ip[2]);
    cr_assert_arr_eq(is.ip[2], ip_a, 16);
    cr_assert_str_eq(is.voter[3], "voter4");
    cr_assert_arr_eq(is.ip[3], ip_b, 16);
    cr_assert_str_eq(is.voter[4], "voter5");
    cr_assert_not(is.has_ip[4]);
    cr_assert_str_eq(is.voter[5], "voter9");
    cr_assert_arr_eq(is.ip[5], ip_a, 16);

    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter3", 1700000010000, b3.u.ballot.seq);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    b6.u.ballot.ip_hash = ip_a;
    submit_wait(s, &b6);
    cr_assert_eq(b6.result, 0, "a retraction frees the address");
    tly_store_close(s);

    db = raw_open(SQLITE_OPEN_READONLY);
    cr_assert_eq(raw_int(db, "PRAGMA user_version"), TLY_STORE_SCHEMA_VERSION);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM ballots WHERE ip_hash IS NOT NULL"), 3);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM vote_requests WHERE request_id = 'req4'"
                             " AND state = 'failed' AND error = 'ALREADY_VOTED'"),
                 1);
    sqlite3_close(db);
}

/* ---- the WAL check before open ------------------------------------------------------- */

/* Copies src (a file) to dst. */
static void copy_file(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    cr_assert_not_null(in, "%s", src);
    cr_assert_not_null(out, "%s", dst);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        cr_assert_eq(fwrite(buf, 1, n, out), n);
    fclose(in);
    fclose(out);
}

/* A store with a poll and three ballots, each its own commit, copied (database and WAL)
 * into dir/copy while the store is open and idle, as a crash would leave them: nothing
 * is checkpointed yet (the WAL holds every commit). Returns the WAL's page size and the
 * frame numbers of its commit frames in commits[] (n of them). */
static size_t wal_copy(uint32_t *page_size, long commits[16])
{
    tly_store_t *s = open_store();
    tly_store_op_t p = poll_op("poll1", 2);
    submit_wait(s, &p);
    const char *voters[] = {"voter1", "voter2", "voter3"}, *ids[] = {"v_1", "v_2", "v_3"}, *rcs[] = {"r_1", "r_2", "r_3"};
    for (int i = 0; i < 3; i++) {
        tly_store_op_t b = ballot_op("poll1", voters[i], ids[i], rcs[i]);
        submit_wait(s, &b);
        cr_assert_eq(b.result, 0);
    }
    char from[160], to[160];
    snprintf(to, sizeof to, "%s/copy", dir);
    cr_assert_eq(mkdir(to, 0700), 0);
    snprintf(from, sizeof from, "%s/data/nested/tally.db", dir);
    snprintf(to, sizeof to, "%s/copy/tally.db", dir);
    copy_file(from, to);
    snprintf(from, sizeof from, "%s/data/nested/tally.db-wal", dir);
    snprintf(to, sizeof to, "%s/copy/tally.db-wal", dir);
    copy_file(from, to);
    tly_store_close(s);

    FILE *f = fopen(to, "rb");
    uint8_t hdr[32], fh[24];
    cr_assert_eq(fread(hdr, 1, 32, f), 32);
    *page_size = (uint32_t)hdr[8] << 24 | (uint32_t)hdr[9] << 16 | (uint32_t)hdr[10] << 8 | hdr[11];
    size_t n = 0;
    for (long i = 0; fread(fh, 1, 24, f) == 24 && fseek(f, *page_size, SEEK_CUR) == 0; i++)
        if ((fh[4] | fh[5] | fh[6] | fh[7]) != 0 && n < 16)
            commits[n++] = i;
    fclose(f);
    cr_assert_geq(n, 4, "the poll and three ballots, each committed on its own");
    return n;
}

/* Flips a byte in the page of frame `frame` of the copy's WAL. */
static void damage_frame(uint32_t page_size, long frame)
{
    char path[160];
    snprintf(path, sizeof path, "%s/copy/tally.db-wal", dir);
    FILE *f = fopen(path, "r+b");
    cr_assert_not_null(f);
    long off = 32 + frame * (long)(24 + page_size) + 24 + 100;
    cr_assert_eq(fseek(f, off, SEEK_SET), 0);
    int c = fgetc(f);
    cr_assert_eq(fseek(f, off, SEEK_SET), 0);
    fputc(c ^ 0x5a, f);
    fclose(f);
}

static int open_copy(tly_store_t **s)
{
    char path[160];
    snprintf(path, sizeof path, "%s/copy", dir);
    tly_store_conf_t conf = {.data_dir = path};
    return tly_store_open(&conf, s);
}

/* A damaged frame in the middle of the WAL, with later commits (acknowledged: each was
 * fsynced after the damaged one) behind it: SQLite's recovery would stop at the damage
 * and drop them without a word; the store refuses to open instead. */
Test(store, a_damaged_wal_frame_before_later_commits_refuses_the_open)
{
    uint32_t ps;
    long commits[16];
    size_t n = wal_copy(&ps, commits);
    damage_frame(ps, commits[1]); /* voter1's commit; voter2's and voter3's follow */
    tly_store_t *s = NULL;
    cr_assert_eq(open_copy(&s), TLY_EIO);
    cr_assert_null(s);
    /* what the store would have served: SQLite alone opens it and sees fewer ballots */
    char path[160];
    snprintf(path, sizeof path, "%s/copy/tally.db", dir);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    cr_assert_lt(raw_int(db, "SELECT count(*) FROM ballots"), 3, "recovery drops the commits after the damage");
    sqlite3_close(db);
    (void)n;
}

/* Damage in the last transaction only, as a crash while it was being written leaves it
 * (a torn tail, never acknowledged): recovery's to drop, the store opens with every
 * commit before it. */
Test(store, a_torn_last_transaction_in_the_wal_opens_without_it)
{
    uint32_t ps;
    long commits[16];
    size_t n = wal_copy(&ps, commits);
    damage_frame(ps, commits[n - 1]);
    tly_store_t *s = NULL;
    cr_assert_eq(open_copy(&s), 0);
    seen_t seen = {0};
    cr_assert_eq(tly_store_load(s, &seen_cb, &seen), 0);
    assert_ballot_ids(&seen, (const char *[]){"v_1", "v_2", NULL});
    tly_store_close(s);
}

Test(store, a_newer_schema_is_refused)
{
    tly_store_close(open_store());
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE);
    cr_assert_eq(sqlite3_exec(db, "PRAGMA user_version = 99", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    char sub[128];
    tly_store_t *s = NULL;
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    tly_store_conf_t conf = {.data_dir = sub};
    cr_assert_lt(tly_store_open(&conf, &s), 0);
    cr_assert_null(s);
}

/* ---- ballot changes, retractions and the audit log ---------------------------------- */

Test(store, audit_records_cast_changed_revoked_in_order)
{
    tly_store_t *s = open_store();
    audit_cast_and_change(s);
    tly_store_close(audit_after_change(s));
}

Test(store, a_changed_ballot_keeps_its_first_cast_across_restarts)
{
    tly_store_close(first_cast_scenario(open_store()));
}

/* Versions 3 and 4 of the schema as they shipped, on top of v1_schema and v2_upgrade. */
static const char v3_v4_upgrade[] =
    "ALTER TABLE ballots ADD COLUMN ip_hash BLOB;"
    "CREATE UNIQUE INDEX ballots_poll_ip ON ballots(poll_id, ip_hash) WHERE ip_hash IS NOT NULL;"
    "ALTER TABLE audit ADD COLUMN idem_key TEXT;"
    "ALTER TABLE audit ADD COLUMN body_hash BLOB;"
    "CREATE INDEX audit_retracted_keys ON audit(seq) WHERE event = 'revoked' AND idem_key IS NOT NULL;";

/* A file schema version 4 left behind, with the history first_cast_scenario makes:
 * voter1 (key k1, scores) cast and changed twice, voter2 (k2) cast, voter3 (no key)
 * cast and changed, voter4 (k4) cast, changed and retracted, then cast again (k5) and
 * changed. Version 5 takes each changed ballot's first cast from the log; version 6
 * rebuilds the table around the same rows, their casts still in audit; load hands back
 * the casts of the changed ballots with a key, and the log reads as it did. */
Test(store, migrations_5_and_6_keep_first_casts_from_the_audit_log)
{
    char sub[128];
    snprintf(sub, sizeof sub, "%s/data", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);
    snprintf(sub, sizeof sub, "%s/data/nested", dir);
    cr_assert_eq(mkdir(sub, 0700), 0);
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    cr_assert_eq(sqlite3_exec(db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, v1_schema, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_exec(db, v2_upgrade, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_exec(db, v3_v4_upgrade, NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(
        sqlite3_exec(
            db,
            "INSERT INTO polls VALUES('poll1', 'user1', 'Old poll', NULL, 2, 1, NULL, NULL, '{}', 1, 1, NULL, NULL,"
            "  NULL);"
            "INSERT INTO options VALUES('poll1', 0, 'optA', 'A', 0), ('poll1', 1, 'optB', 'B', 1),"
            "  ('poll1', 2, 'optC', 'C', 2);"
            /* the current ballots (seq 1, 2, 3, 5: voter4's first ballot, seq 4, is gone) */
            "INSERT INTO ballots(seq, poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at, idem_key)"
            "  VALUES(1, 'poll1', 'voter1', 'v_1', 'r_1', x'02', x'03', 1700000003000, 'k1'),"
            "  (2, 'poll1', 'voter2', 'v_2', 'r_2', x'0001', NULL, 1700000001000, 'k2'),"
            "  (3, 'poll1', 'voter3', 'v_3', 'r_3', x'01', NULL, 1700000002000, NULL),"
            "  (5, 'poll1', 'voter4', 'v_5', 'r_5', x'01', NULL, 1700000006000, 'k5');"
            "INSERT INTO audit(poll_id, voter_id, event, choices, scores, at, idem_key) VALUES"
            "  ('poll1', 'voter1', 'cast', x'0001', x'0509', 1700000001000, NULL),"
            "  ('poll1', 'voter2', 'cast', x'0001', NULL, 1700000001000, NULL),"
            "  ('poll1', 'voter3', 'cast', x'0001', NULL, 1700000001000, NULL),"
            "  ('poll1', 'voter4', 'cast', x'0001', NULL, 1700000001000, NULL),"
            "  ('poll1', 'voter1', 'changed', x'01', x'03', 1700000002000, NULL),"
            "  ('poll1', 'voter3', 'changed', x'01', NULL, 1700000002000, NULL),"
            "  ('poll1', 'voter4', 'changed', x'02', NULL, 1700000002000, NULL),"
            "  ('poll1', 'voter1', 'changed', x'02', x'03', 1700000003000, NULL),"
            "  ('poll1', 'voter4', 'revoked', NULL, NULL, 1700000004000, 'k4'),"
            "  ('poll1', 'voter4', 'cast', x'0001', NULL, 1700000005000, NULL),"
            "  ('poll1', 'voter4', 'changed', x'01', NULL, 1700000006000, NULL);"
            "PRAGMA user_version = 4;",
            NULL, NULL, NULL),
        SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_close(db);

    casts_seen_t cs;
    tly_store_t *s = reopen_casts(open_store(), &cs);
    assert_final_casts(&cs);
    audit_seen_t as;
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 11, "the log as it was: every cast in it once");

    /* a retraction after the migration leaves the log as it was plus "revoked": the
     * retracted ballot's cast is in the log already */
    tly_store_op_t del = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter2", 1700000007000, 2);
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 12);
    cr_assert_str_eq(as.event[11], "revoked");
    tly_store_close(s);
    db = raw_open(SQLITE_OPEN_READONLY);
    cr_assert_eq(raw_int(db, "PRAGMA user_version"), TLY_STORE_SCHEMA_VERSION);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM ballots WHERE cast_at IS NOT NULL"), 3,
                 "voter1, voter3 (no key: kept, not loaded) and voter4");
    sqlite3_close(db);
}

Test(store, replace_and_delete_of_a_missing_ballot_fail_alone)
{
    tly_store_t *s = open_store();
    missing_ballot_changes_scenario(s);
    tly_store_close(s);
}

Test(store, audit_rows_cannot_be_changed_and_go_only_with_their_poll)
{
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 2), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    tly_store_op_t b1 = ballot_op("poll1", "voter1", "v_1", "r_1");
    tly_store_op_t b2 = ballot_op("poll2", "voter1", "v_2", "r_2");
    submit_wait(s, &b1);
    submit_wait(s, &b2);
    /* a retraction of each: their casts move to audit, and a "revoked" row follows each */
    tly_store_op_t c1 = change_op(TLY_OP_BALLOT_DELETE, "poll1", "voter1", 9, b1.u.ballot.seq);
    tly_store_op_t c2 = change_op(TLY_OP_BALLOT_DELETE, "poll2", "voter1", 9, b2.u.ballot.seq);
    submit_wait(s, &c1);
    submit_wait(s, &c2);
    cr_assert_eq(c1.result, 0);
    cr_assert_eq(c2.result, 0);

    /* Another connection (the store stays open: the writer is idle between batches). */
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM audit"), 4);
    int rc = sqlite3_exec(db, "UPDATE audit SET event = 'revoked'", NULL, NULL, NULL);
    cr_assert_eq(rc, SQLITE_CONSTRAINT, "UPDATE: %s", sqlite3_errmsg(db));
    rc = sqlite3_exec(db, "UPDATE audit SET at = at + 1 WHERE poll_id = 'poll1'", NULL, NULL, NULL);
    cr_assert_eq(rc, SQLITE_CONSTRAINT);
    rc = sqlite3_exec(db, "DELETE FROM audit WHERE poll_id = 'poll1'", NULL, NULL, NULL);
    cr_assert_eq(rc, SQLITE_CONSTRAINT, "DELETE: %s", sqlite3_errmsg(db));
    rc = sqlite3_exec(db, "DELETE FROM audit", NULL, NULL, NULL);
    cr_assert_eq(rc, SQLITE_CONSTRAINT);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM audit"), 4);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM audit WHERE event = 'cast'"), 2);

    /* Deleting the poll takes its history with it, and only its. */
    tly_store_op_t del = {.type = TLY_OP_POLL_DELETE, .u.poll.poll_id = "poll1"};
    submit_wait(s, &del);
    cr_assert_eq(del.result, 0);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM audit WHERE poll_id = 'poll1'"), 0);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM audit WHERE poll_id = 'poll2'"), 2);
    sqlite3_close(db);

    /* A poll re-created under the same id starts with an empty log. */
    tly_store_op_t p1b = poll_op("poll1", 2);
    submit_wait(s, &p1b);
    cr_assert_eq(p1b.result, 0);
    audit_seen_t as;
    read_audit(s, "poll1", &as);
    cr_assert_eq(as.n, 0);
    tly_store_close(s);
}

/* ---- final results ------------------------------------------------------------------ */

Test(store, final_results_round_trip)
{
    const char *json = "{\"method\":\"plurality\",\"winners\":[\"optA\"],\"counts\":[3,1]}";
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 2), p2 = poll_op("poll2", 2);
    p2.u.poll.final_results = "{\"closed\":true}"; /* insert writes it too */
    submit_wait(s, &p1);
    submit_wait(s, &p2);

    seen_t seen;
    s = reopen_load(s, &seen);
    cr_assert_eq(seen.polls, 2);
    cr_assert_str_eq(seen.final_results[0], "(null)");
    cr_assert_str_eq(seen.final_results[1], "{\"closed\":true}");

    tly_store_op_t up = poll_op("poll1", 2);
    up.type = TLY_OP_POLL_UPDATE;
    up.u.poll.status = 3;
    up.u.poll.final_results = json;
    submit_wait(s, &up);
    cr_assert_eq(up.result, 0);
    s = reopen_load(s, &seen);
    cr_assert_str_eq(seen.final_results[0], json);

    /* Final results are final: an update without them keeps them. */
    tly_store_op_t up2 = poll_op("poll1", 2);
    up2.type = TLY_OP_POLL_UPDATE;
    submit_wait(s, &up2);
    s = reopen_load(s, &seen);
    cr_assert_str_eq(seen.final_results[0], json);
    tly_store_close(s);
}

/* ---- paged reads -------------------------------------------------------------------- */

Test(store, pages_walk_every_row_once_in_seq_order)
{
    tly_store_t *s = open_store();
    pages_scenario(s);
    tly_store_close(s);
}

/* Each page query must search (poll_id, seq) indexes: a scan of the table or a sort
 * would make a page cost the size of the poll (or the store), and an export O(n^2). The
 * audit page merges a walk of the ballots (rows that are still their own cast event)
 * with one of the audit rows. */
Test(store, page_queries_search_the_seq_indexes)
{
    tly_store_close(open_store());
    sqlite3 *db = raw_open(SQLITE_OPEN_READONLY);
    const char *sqls[] = {tly_store_audit_page_sql, tly_store_ballots_page_sql};
    const char *index[][2] = {{"ballots_poll_seq", "audit_poll_seq"}, {"ballots_poll_seq", NULL}};
    for (int i = 0; i < 2; i++) {
        char q[1024];
        sqlite3_stmt *st;
        int searches = 0;
        snprintf(q, sizeof q, "EXPLAIN QUERY PLAN %s", sqls[i]);
        cr_assert_eq(sqlite3_prepare_v2(db, q, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
        while (sqlite3_step(st) == SQLITE_ROW) {
            const char *detail = (const char *)sqlite3_column_text(st, 3);
            cr_assert_null(strstr(detail, "SCAN"), "%s", detail);
            cr_assert_null(strstr(detail, "TEMP B-TREE"), "%s", detail);
            if (strstr(detail, "SEARCH") == NULL)
                continue; /* the merge and its arms */
            cr_assert_lt(searches, 2, "%s", detail);
            cr_assert_not_null(index[i][searches], "%s", detail);
            cr_assert_not_null(strstr(detail, index[i][searches]), "%s", detail);
            searches++;
        }
        cr_assert_eq(searches, index[i][1] != NULL ? 2 : 1);
        sqlite3_finalize(st);
    }
    sqlite3_close(db);
}

/* A reader on another thread (an export worker) walks the poll again and again while
 * the writer commits more ballots: it never fails, never sees a row twice or out of
 * order, and never holds the writer up. */
#define CONCURRENT 6000

typedef struct {
    tly_store_t *s;
    atomic_int stop;
    int open_failed, errors, bad_walks, walks, last_rows;
} bg_reader_t;

static void *read_in_background(void *arg)
{
    bg_reader_t *bg = arg;
    tly_store_reader_t *r = tly_store_reader_open(bg->s); /* opened on its own thread */
    if (r == NULL) {
        bg->open_failed = 1;
        return NULL;
    }
    unsigned char *seen = malloc(CONCURRENT);
    for (;;) {
        int stopping = atomic_load(&bg->stop), n;
        walk_t w = {.seen = seen, .nvoters = CONCURRENT};
        memset(seen, 0, CONCURRENT);
        while ((n = tly_store_ballots_page(r, "poll1", w.last_seq, 250, walk_ballot, &w)) > 0)
            ;
        if (n < 0)
            bg->errors++;
        int dup = 0;
        for (int i = 0; i < CONCURRENT; i++)
            dup += seen[i] > 1;
        if (w.out_of_order || w.foreign || dup)
            bg->bad_walks++;
        bg->walks++;
        bg->last_rows = w.rows;
        if (stopping) /* one full walk after the last commit */
            break;
    }
    free(seen);
    tly_store_reader_close(r);
    return NULL;
}

Test(store, reader_on_another_thread_while_the_writer_commits)
{
    tly_store_t *s = open_store();
    tly_store_op_t p1 = poll_op("poll1", 3), p2 = poll_op("poll2", 2);
    submit_wait(s, &p1);
    submit_wait(s, &p2);
    ids_t *ids = calloc(2 * CONCURRENT, sizeof *ids);
    tly_store_op_t *ops = calloc(2 * CONCURRENT, sizeof *ops);
    cr_assert(ids && ops);

    bg_reader_t bg = {.s = s};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, read_in_background, &bg), 0);
    /* Many small batches, so that commits land in the middle of the reader's walks. */
    for (int i = 0; i < CONCURRENT; i += 100)
        cast_range(s, i, i + 100, ids, ops + 2 * i);
    /* An event-loop thread may hold a reader of its own at the same time. */
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    walk_t w = {.seen = calloc(CONCURRENT, 1), .nvoters = CONCURRENT};
    while (tly_store_ballots_page(r, "poll1", w.last_seq, 1000, walk_ballot, &w) > 0)
        ;
    cr_assert_eq(w.rows, CONCURRENT);
    free(w.seen);
    tly_store_reader_close(r);

    atomic_store(&bg.stop, 1);
    pthread_join(th, NULL);
    cr_assert_not(bg.open_failed);
    cr_assert_eq(bg.errors, 0);
    cr_assert_eq(bg.bad_walks, 0);
    cr_assert_gt(bg.walks, 0);
    cr_assert_eq(bg.last_rows, CONCURRENT, "the walk after the last commit sees every ballot");
    fprintf(stderr, "store: %d background walks while %d ballots committed\n", bg.walks, CONCURRENT);
    tly_store_close(s);
    free(ids);
    free(ops);
}

/* ---- generated ballots -------------------------------------------------------------- */

Test(store, generate_ballots_for_tests_and_benchmarks)
{
    tly_store_t *s = generate_ballots_scenario(open_store());
    /* every generated ballot is its own cast event in the poll's log */
    audit_seen_t as;
    tly_store_reader_t *r = tly_store_reader_open(s);
    cr_assert_not_null(r);
    int64_t after = 0, casts = 0;
    int n;
    while ((n = tly_store_audit_page(r, "poll1", after, 16, see_audit, memset(&as, 0, sizeof as))) > 0) {
        for (int i = 0; i < n; i++)
            casts += strcmp(as.event[i], "cast") == 0;
        after = as.seq[n - 1];
    }
    cr_assert_eq(n, 0);
    cr_assert_eq(casts, 25002);
    tly_store_reader_close(r);
    sqlite3 *db = raw_open(SQLITE_OPEN_READONLY);
    cr_assert_eq(raw_int(db, "SELECT count(DISTINCT choices) FROM ballots WHERE voter_id LIKE 'gen%'"), 3);
    sqlite3_close(db);
    tly_store_close(s);
}

/* Migration 7 gives the polls open before it distinct codes, and the closed ones none. */
Test(store, migration_7_gives_open_polls_join_codes)
{
    tly_store_t *s = open_store();
    join_code_migration_setup(s);
    tly_store_close(s);
    /* the same rows as schema version 6 kept them: no column, no index (and none of
     * migration 8's device links) */
    sqlite3 *db = raw_open(SQLITE_OPEN_READWRITE);
    cr_assert_eq(sqlite3_exec(db,
                              "DROP INDEX polls_join_code; ALTER TABLE polls DROP COLUMN join_code;"
                              "DROP TABLE device_links; PRAGMA user_version = 6;",
                              NULL, NULL, NULL),
                 SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_close(db);
    tly_store_close(join_code_migration_check());
    db = raw_open(SQLITE_OPEN_READONLY);
    cr_assert_eq(raw_int(db, "PRAGMA user_version"), TLY_STORE_SCHEMA_VERSION);
    cr_assert_eq(raw_int(db, "SELECT count(*) FROM polls WHERE join_code IS NOT NULL"), MIGRATION_POLLS);
    sqlite3_close(db);
}
