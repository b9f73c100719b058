/*
 * store_shapes: what one durable ballot costs the writer, for several ways of storing it,
 * measured side by side in one run (issue 16: decide the embedded store's design by
 * measuring the alternatives). Every candidate takes the same ballots in the same group
 * commits (BATCH ballots, then one fsync, as tally's writer does with 64 connections) and
 * is charged the process CPU, the wall time, the bytes handed to write(2) (/proc/self/io
 * wchar) and its fsyncs, divided by the ballots.
 *
 *   make bench-store                  # or: build/store-shapes [--ballots N] [--batch B]
 *                                     #        [--dir DIR] [--only NAME]
 *
 * Candidates (the ballot is tally's: a 16-char poll id, a random 22-char voter id, a
 * random vote_id and receipt, one choice, a time):
 *   sqlite-current  the schema of migrations 1-4: the ballot row with UNIQUE(vote_id),
 *                   UNIQUE(receipt), UNIQUE(poll_id, voter_id) and (poll_id, seq), plus an
 *                   audit "cast" row with its (poll_id, seq) index; WAL, synchronous=FULL
 *   sqlite-lean     the ballot row alone, with (poll_id, seq) as its only index (no index
 *                   on a random key, no audit row); WAL, synchronous=FULL
 *   journal         checksummed records appended to a pre-written (recycled) segment,
 *                   one pwrite + fdatasync a batch; nothing else
 *   journal+apply   the journal, and a second thread bringing sqlite-lean tables up to
 *                   date from it in transactions of up to 5,000 ballots with
 *                   synchronous=NORMAL (no fsync but the checkpoints')
 *   lmdb            one LMDB put a ballot, key poll_id + seq (appending), durable commit
 *   rocksdb         one RocksDB put a ballot into a WriteBatch, key poll_id + seq, written
 *                   with sync=true
 * The SQLite candidates checkpoint passively every 64 MiB of WAL, as tally's writer does.
 */

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <rocksdb/c.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define ID_LEN 22
#define POLL_ID "Xy12Ab34Cd56Ef78"
#define APPLY_MAX 5000
#define SEGMENT_BYTES (256u << 20)

typedef struct {
    char voter[ID_LEN + 1], vote_id[ID_LEN + 3], receipt[ID_LEN + 1];
    uint8_t choice;
    int64_t at;
} ballot_t;

static ballot_t *ballots;
static long nballots = 200000, batch = 64;
static const char *dir = "/tmp";

static void die(const char *what)
{
    fprintf(stderr, "store_shapes: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double cpu_s(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + (double)r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static double wall_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static long long wchar(void)
{
    char line[128];
    long long v = -1;
    FILE *f = fopen("/proc/self/io", "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "wchar: %lld", &v) == 1)
            break;
    fclose(f);
    return v;
}

static void random_id(char *out, size_t n)
{
    static const char a[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    for (size_t i = 0; i < n; i++)
        out[i] = a[random() & 63];
    out[n] = '\0';
}

/* ---- SQLite ---------------------------------------------------------------------- */

static const char current_schema[] =
    "CREATE TABLE polls(poll_id TEXT PRIMARY KEY);"
    "INSERT INTO polls VALUES('" POLL_ID "');"
    "CREATE TABLE ballots(seq INTEGER PRIMARY KEY, poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    " voter_id TEXT NOT NULL, vote_id TEXT NOT NULL UNIQUE, receipt TEXT NOT NULL UNIQUE, choices BLOB NOT NULL,"
    " scores BLOB, recorded_at INTEGER NOT NULL, idem_key TEXT, body_hash BLOB, client_meta TEXT, ip_hash BLOB,"
    " UNIQUE(poll_id, voter_id));"
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    "CREATE UNIQUE INDEX ballots_poll_ip ON ballots(poll_id, ip_hash) WHERE ip_hash IS NOT NULL;"
    "CREATE TABLE audit(seq INTEGER PRIMARY KEY, poll_id TEXT NOT NULL, voter_id TEXT NOT NULL,"
    " event TEXT NOT NULL CHECK(event IN ('cast','changed','revoked')), choices BLOB, scores BLOB,"
    " at INTEGER NOT NULL, idem_key TEXT, body_hash BLOB);"
    "CREATE INDEX audit_poll_seq ON audit(poll_id, seq);"
    "CREATE INDEX audit_retracted_keys ON audit(seq) WHERE event = 'revoked' AND idem_key IS NOT NULL;"
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'append-only'); END;";

static const char lean_schema[] =
    "CREATE TABLE polls(poll_id TEXT PRIMARY KEY);"
    "INSERT INTO polls VALUES('" POLL_ID "');"
    "CREATE TABLE ballots(seq INTEGER PRIMARY KEY, poll_id TEXT NOT NULL REFERENCES polls ON DELETE CASCADE,"
    " voter_id TEXT NOT NULL, vote_id TEXT NOT NULL, receipt TEXT NOT NULL, choices BLOB NOT NULL,"
    " scores BLOB, recorded_at INTEGER NOT NULL, idem_key TEXT, body_hash BLOB, client_meta TEXT, ip_hash BLOB);"
    "CREATE INDEX ballots_poll_seq ON ballots(poll_id, seq);"
    "CREATE UNIQUE INDEX ballots_poll_ip ON ballots(poll_id, ip_hash) WHERE ip_hash IS NOT NULL;";

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *ins, *aud;
    int frames, ckpt_frames, page_size;
} sq_t;

static int wal_hook(void *arg, sqlite3 *db, const char *name, int n)
{
    ((sq_t *)arg)->frames = n;
    return SQLITE_OK;
}

static void sq_exec(sqlite3 *db, const char *sql)
{
    char *err = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "store_shapes: %s: %s\n", sql, err);
        exit(1);
    }
}

static void sq_open(sq_t *s, const char *path, const char *schema, bool audit, bool full)
{
    memset(s, 0, sizeof *s);
    if (sqlite3_open(path, &s->db) != SQLITE_OK)
        die(path);
    sq_exec(s->db, "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -65536;"
                   "PRAGMA temp_store = MEMORY;");
    sq_exec(s->db, full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL");
    sq_exec(s->db, schema);
    sqlite3_wal_hook(s->db, wal_hook, s);
    s->page_size = 4096;
    sqlite3_prepare_v3(s->db,
                       "INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, scores, recorded_at,"
                       " idem_key, body_hash, client_meta, ip_hash) VALUES(?1, ?2, ?3, ?4, ?5, NULL, ?6, NULL, NULL,"
                       " NULL, NULL)",
                       -1, SQLITE_PREPARE_PERSISTENT, &s->ins, NULL);
    if (audit)
        sqlite3_prepare_v3(s->db,
                           "INSERT INTO audit(poll_id, voter_id, event, choices, scores, at) VALUES(?1, ?2, 'cast',"
                           " ?3, NULL, ?4)",
                           -1, SQLITE_PREPARE_PERSISTENT, &s->aud, NULL);
}

static void sq_insert(sq_t *s, const ballot_t *b)
{
    sqlite3_bind_text(s->ins, 1, POLL_ID, -1, SQLITE_STATIC);
    sqlite3_bind_text(s->ins, 2, b->voter, -1, SQLITE_STATIC);
    sqlite3_bind_text(s->ins, 3, b->vote_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s->ins, 4, b->receipt, -1, SQLITE_STATIC);
    sqlite3_bind_blob(s->ins, 5, &b->choice, 1, SQLITE_STATIC);
    sqlite3_bind_int64(s->ins, 6, b->at);
    if (sqlite3_step(s->ins) != SQLITE_DONE) {
        fprintf(stderr, "store_shapes: insert: %s\n", sqlite3_errmsg(s->db));
        exit(1);
    }
    sqlite3_reset(s->ins);
    if (s->aud == NULL)
        return;
    sqlite3_bind_text(s->aud, 1, POLL_ID, -1, SQLITE_STATIC);
    sqlite3_bind_text(s->aud, 2, b->voter, -1, SQLITE_STATIC);
    sqlite3_bind_blob(s->aud, 3, &b->choice, 1, SQLITE_STATIC);
    sqlite3_bind_int64(s->aud, 4, b->at);
    if (sqlite3_step(s->aud) != SQLITE_DONE) {
        fprintf(stderr, "store_shapes: audit: %s\n", sqlite3_errmsg(s->db));
        exit(1);
    }
    sqlite3_reset(s->aud);
}

static void sq_commit(sq_t *s)
{
    sq_exec(s->db, "COMMIT");
    if (s->frames < s->ckpt_frames)
        s->ckpt_frames = 0;
    if ((int64_t)(s->frames - s->ckpt_frames) * s->page_size >= (64 << 20)) {
        sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        s->ckpt_frames = s->frames;
    }
}

static void sq_close(sq_t *s)
{
    sqlite3_finalize(s->ins);
    sqlite3_finalize(s->aud);
    sqlite3_close(s->db);
}

static long sq_count(const char *path)
{
    sqlite3 *db;
    sqlite3_stmt *st;
    long n = -1;
    sqlite3_open(path, &db);
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM ballots", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

static long run_sqlite(const char *path, bool lean)
{
    sq_t s;
    sq_open(&s, path, lean ? lean_schema : current_schema, !lean, true);
    for (long i = 0; i < nballots; i += batch) {
        sq_exec(s.db, "BEGIN IMMEDIATE");
        for (long j = i; j < i + batch && j < nballots; j++)
            sq_insert(&s, &ballots[j]);
        sq_commit(&s);
    }
    sq_close(&s);
    return (nballots + batch - 1) / batch;
}

/* ---- the journal ------------------------------------------------------------------- */

/* A record: u32 length of what follows the header, u32 CRC-32 of it, u64 sequence, then
 * the fields as length-prefixed bytes. */
static size_t encode(uint8_t *out, uint64_t seq, const ballot_t *b)
{
    uint8_t *p = out + 16;
    const char *f[] = {POLL_ID, b->voter, b->vote_id, b->receipt};
    for (size_t i = 0; i < 4; i++) {
        size_t n = strlen(f[i]);
        *p++ = (uint8_t)n;
        memcpy(p, f[i], n);
        p += n;
    }
    *p++ = 1;
    *p++ = b->choice;
    memcpy(p, &b->at, 8);
    p += 8;
    uint32_t len = (uint32_t)(p - out - 16), crc = (uint32_t)crc32(0, out + 16, len);
    memcpy(out, &len, 4);
    memcpy(out + 4, &crc, 4);
    memcpy(out + 8, &seq, 8);
    return (size_t)(p - out);
}

static int journal_open(const char *path)
{
    /* a recycled segment: already written once, so appending into it changes no
     * file size and fdatasync has only data to flush */
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        die(path);
    static uint8_t zero[1 << 20];
    for (size_t off = 0; off < SEGMENT_BYTES; off += sizeof zero)
        if (write(fd, zero, sizeof zero) != (ssize_t)sizeof zero)
            die("segment");
    if (fsync(fd) != 0)
        die("segment fsync");
    return fd;
}

typedef struct {
    const char *db_path;
    atomic_long durable; /* ballots whose batch is fsynced */
    atomic_bool done;
    long applied;
} apply_t;

/* Applies what the journal made durable, in transactions of up to APPLY_MAX. It takes
 * the ballots from memory, as tally's writer would hand them over; reading the journal
 * back is what recovery does, not the steady state. */
static void *apply_main(void *arg)
{
    apply_t *a = arg;
    sq_t s;
    sq_open(&s, a->db_path, lean_schema, false, false);
    for (;;) {
        long durable = atomic_load(&a->durable);
        if (durable == a->applied) {
            if (atomic_load(&a->done) && durable == atomic_load(&a->durable))
                break;
            usleep(1000);
            continue;
        }
        long end = durable - a->applied > APPLY_MAX ? a->applied + APPLY_MAX : durable;
        sq_exec(s.db, "BEGIN IMMEDIATE");
        for (long j = a->applied; j < end; j++)
            sq_insert(&s, &ballots[j]);
        sq_commit(&s);
        a->applied = end;
    }
    sq_close(&s);
    return NULL;
}

static long run_journal(int fd, const char *db_path, long *backlog_max)
{
    uint8_t *buf = malloc((size_t)batch * 256);
    off_t off = 0;
    apply_t a = {.db_path = db_path};
    pthread_t t;
    if (db_path != NULL && pthread_create(&t, NULL, apply_main, &a) != 0)
        die("thread");
    *backlog_max = 0;
    for (long i = 0; i < nballots; i += batch) {
        size_t n = 0;
        for (long j = i; j < i + batch && j < nballots; j++)
            n += encode(buf + n, (uint64_t)j + 1, &ballots[j]);
        if (pwrite(fd, buf, n, off) != (ssize_t)n)
            die("journal write");
        if (fdatasync(fd) != 0)
            die("journal fdatasync");
        off += (off_t)n;
        long durable = i + batch < nballots ? i + batch : nballots;
        atomic_store(&a.durable, durable);
        if (db_path != NULL && durable - a.applied > *backlog_max)
            *backlog_max = durable - a.applied;
    }
    atomic_store(&a.done, true);
    if (db_path != NULL)
        pthread_join(t, NULL);
    free(buf);
    close(fd);
    return (nballots + batch - 1) / batch;
}

/* ---- LMDB and RocksDB -------------------------------------------------------------- */

static size_t seq_key(uint8_t *k, uint64_t seq)
{
    memcpy(k, POLL_ID, 16);
    for (int i = 0; i < 8; i++)
        k[16 + i] = (uint8_t)(seq >> (56 - 8 * i));
    return 24;
}

static long run_lmdb(const char *path)
{
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    uint8_t rec[256], key[24];
    if (mdb_env_create(&env) || mdb_env_set_mapsize(env, (size_t)8 << 30) ||
        mdb_env_open(env, path, MDB_NOSUBDIR, 0600))
        die("lmdb open");
    for (long i = 0; i < nballots; i += batch) {
        if (mdb_txn_begin(env, NULL, 0, &txn) || mdb_dbi_open(txn, NULL, 0, &dbi))
            die("lmdb txn");
        for (long j = i; j < i + batch && j < nballots; j++) {
            MDB_val k = {seq_key(key, (uint64_t)j + 1), key}, v = {encode(rec, (uint64_t)j + 1, &ballots[j]), rec};
            if (mdb_put(txn, dbi, &k, &v, MDB_APPEND))
                die("lmdb put");
        }
        if (mdb_txn_commit(txn))
            die("lmdb commit");
    }
    mdb_env_close(env);
    return (nballots + batch - 1) / batch;
}

static long run_rocksdb(const char *path)
{
    char *err = NULL;
    uint8_t rec[256], key[24];
    rocksdb_options_t *o = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(o, 1);
    rocksdb_t *db = rocksdb_open(o, path, &err);
    if (err != NULL) {
        fprintf(stderr, "store_shapes: rocksdb: %s\n", err);
        exit(1);
    }
    rocksdb_writeoptions_t *w = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(w, 1);
    for (long i = 0; i < nballots; i += batch) {
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        for (long j = i; j < i + batch && j < nballots; j++) {
            size_t kn = seq_key(key, (uint64_t)j + 1), vn = encode(rec, (uint64_t)j + 1, &ballots[j]);
            rocksdb_writebatch_put(wb, (const char *)key, kn, (const char *)rec, vn);
        }
        rocksdb_write(db, w, wb, &err);
        rocksdb_writebatch_destroy(wb);
        if (err != NULL) {
            fprintf(stderr, "store_shapes: rocksdb write: %s\n", err);
            exit(1);
        }
    }
    rocksdb_writeoptions_destroy(w);
    rocksdb_close(db);
    rocksdb_options_destroy(o);
    return (nballots + batch - 1) / batch;
}

/* ---- the runs ---------------------------------------------------------------------- */

static void row(const char *name, double cpu, double wall, long long bytes, long fsyncs, const char *note)
{
    printf("%-15s %12.2f %12.2f %14.0f %12.4f  %s\n", name, cpu * 1e6 / (double)nballots,
           wall * 1e6 / (double)nballots, (double)bytes / (double)nballots, (double)fsyncs / (double)nballots, note);
    fflush(stdout);
}

static bool wanted(const char *only, const char *name) { return only == NULL || strcmp(only, name) == 0; }

int main(int argc, char **argv)
{
    const char *only = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--ballots"))
            nballots = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--batch"))
            batch = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--dir"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--only"))
            only = argv[i + 1];
        else {
            fprintf(stderr, "usage: store-shapes [--ballots N] [--batch B] [--dir DIR] [--only NAME]\n");
            return 2;
        }
    }
    if (nballots < 1 || batch < 1) {
        fprintf(stderr, "store_shapes: --ballots and --batch must be positive\n");
        return 2;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s/store-shapes.XXXXXX", dir);
    if (mkdtemp(tmp) == NULL)
        die(tmp);
    srandom(1);
    if ((ballots = calloc((size_t)nballots, sizeof *ballots)) == NULL)
        die("ballots");
    for (long i = 0; i < nballots; i++) {
        random_id(ballots[i].voter, ID_LEN);
        memcpy(ballots[i].vote_id, "v_", 2);
        random_id(ballots[i].vote_id + 2, ID_LEN);
        random_id(ballots[i].receipt, ID_LEN);
        ballots[i].choice = (uint8_t)(i % 3);
        ballots[i].at = 1796000000000 + i;
    }
    printf("store_shapes: %ld ballots, %ld a commit, in %s (SQLite %s, LMDB %d.%d.%d, zlib %s)\n", nballots, batch,
           dir, sqlite3_libversion(), MDB_VERSION_MAJOR, MDB_VERSION_MINOR, MDB_VERSION_PATCH, zlibVersion());
    printf("%-15s %12s %12s %14s %12s\n", "candidate", "cpu us/ball", "wall us/ball", "written B/ball",
           "fsyncs/ball");

    static const char *names[] = {"sqlite-current", "sqlite-lean", "journal", "journal+apply", "lmdb", "rocksdb"};
    for (size_t c = 0; c < sizeof names / sizeof names[0]; c++) {
        if (!wanted(only, names[c]))
            continue;
        char path[4200], db_path[4200], note[128] = "";
        snprintf(path, sizeof path, "%s/%s", tmp, names[c]);
        snprintf(db_path, sizeof db_path, "%s/%s.db", tmp, names[c]);
        /* the journal's segment is written once before the clock starts: in use it is
         * recycled, never written for a ballot's sake */
        int fd = c == 2 || c == 3 ? journal_open(path) : -1;
        long long w0 = wchar();
        double c0 = cpu_s(), t0 = wall_s();
        long fsyncs = 0, backlog = 0;
        switch (c) {
        case 0:
        case 1:
            fsyncs = run_sqlite(db_path, c == 1);
            snprintf(note, sizeof note, "%ld rows", sq_count(db_path));
            break;
        case 2:
        case 3:
            fsyncs = run_journal(fd, c == 3 ? db_path : NULL, &backlog);
            if (c == 3)
                snprintf(note, sizeof note, "%ld rows applied, largest backlog %ld ballots", sq_count(db_path),
                         backlog);
            break;
        case 4:
            fsyncs = run_lmdb(path);
            break;
        case 5:
            fsyncs = run_rocksdb(path);
            break;
        }
        double cpu = cpu_s() - c0, wall = wall_s() - t0;
        long long bytes = wchar() - w0;
        row(names[c], cpu, wall, bytes, fsyncs, note);
    }
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    return system(cmd) == 0 ? 0 : 1;
}
