/*
 * store.c: the one interface of store.h over its two backends (sqlite.c, pg.c), chosen
 * by the URL the store is opened with. What a backend does not have (a SQLite store is
 * never shared) has its obvious meaning here.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/base.h"
#include "obs/obs.h"
#include "store/store_int.h"

const uint64_t tly_store_batch_bounds[TLY_STORE_HIST] = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000};
const uint64_t tly_store_commit_us_bounds[TLY_STORE_HIST] = {100,   250,   500,   1000,   2500,   5000,
                                                             10000, 25000, 50000, 100000, 250000, 1000000};

int tly_store_hist_bucket(const uint64_t *bounds, uint64_t v)
{
    int i = 0;
    while (i < TLY_STORE_HIST && v > bounds[i])
        i++;
    return i;
}

/* An exclusive flock on DATA_DIR/lock, held until the descriptor is closed (the kernel
 * drops it when the process dies, kill -9 included); the holder's PID is written into
 * the file for the message a second process gives. */
int tly_store_lock_dir(const char *data_dir, int *out)
{
    char path[4096], pid[24];
    *out = -1;
    int mrc = tly_mkdir_p(data_dir);
    if (mrc != 0) {
        tly_log(TLY_LOG_ERROR, "store: cannot create the data directory", "data_dir", data_dir, "error",
                strerror(errno), NULL);
        return mrc;
    }
    snprintf(path, sizeof path, "%s/lock", data_dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        tly_log(TLY_LOG_ERROR, "store: cannot open the data directory's lock file", "path", path, "error",
                strerror(errno), NULL);
        return TLY_EIO;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        close(fd);
        if (err == EWOULDBLOCK) {
            tly_log(TLY_LOG_ERROR, "store: another tally process uses this data directory", "data_dir", data_dir,
                    "pid", pid[0] ? pid : "unknown", NULL);
            return TLY_ESTATE;
        }
        tly_log(TLY_LOG_ERROR, "store: cannot lock the data directory", "path", path, "error", strerror(err), NULL);
        return TLY_EIO;
    }
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)len, 0) != len) {
        /* the lock holds without the PID in it; only a second process's message lacks it */
        tly_log(TLY_LOG_WARN, "store: cannot write the PID into the lock file", "path", path, NULL);
    }
    *out = fd;
    return 0;
}

static bool is_pg_url(const char *url)
{
    return url != NULL && (strncmp(url, "postgres://", 11) == 0 || strncmp(url, "postgresql://", 13) == 0);
}

int tly_store_open(const tly_store_conf_t *conf, tly_store_t **out)
{
    *out = NULL;
    if (conf == NULL)
        return TLY_EINVAL;
    if (conf->url != NULL && conf->url[0] != '\0' && !is_pg_url(conf->url))
        return TLY_EINVAL;
    if (!is_pg_url(conf->url)) {
        int rc = tly_store_sqlite.open(conf, out); /* locks the directory itself */
        if (rc == 0)
            (*out)->lock_fd = -1;
        return rc;
    }
    /* PostgreSQL is shared by instances, but each instance's data directory (its
     * secret, its logs) is still one process's: the lock before the first connection. */
    int fd = -1;
    if (conf->data_dir != NULL && conf->data_dir[0] != '\0') {
        int rc = tly_store_lock_dir(conf->data_dir, &fd);
        if (rc != 0)
            return rc;
    }
    int rc = tly_store_pg.open(conf, out);
    if (rc != 0) {
        if (fd >= 0)
            close(fd);
        return rc;
    }
    (*out)->lock_fd = fd;
    return 0;
}

int tly_store_load(tly_store_t *s, const tly_store_load_cb_t *cb, void *ctx) { return s->be->load(s, cb, ctx); }

void tly_store_submit_list(tly_store_t *s, tly_store_op_t *first) { s->be->submit_list(s, first); }

void tly_store_submit(tly_store_t *s, tly_store_op_t *op)
{
    op->next = NULL;
    if (s->holding && pthread_equal(s->holder, pthread_self())) {
        if (s->held_tail != NULL)
            s->held_tail->next = op;
        else
            s->held_head = op;
        s->held_tail = op;
        return;
    }
    s->be->submit_list(s, op);
}

void tly_store_hold(tly_store_t *s)
{
    s->holder = pthread_self();
    s->holding = 1;
}

void tly_store_release(tly_store_t *s)
{
    tly_store_op_t *first = s->held_head;
    s->held_head = s->held_tail = NULL;
    if (first != NULL)
        s->be->submit_list(s, first);
}

void tly_store_reap(tly_store_t *s) { s->be->reap(s); }

int tly_store_writable(tly_store_t *s) { return s->be->writable(s); }

void tly_store_follow(tly_store_t *s, void (*cb)(void *ctx, const tly_store_op_t *op), void *ctx)
{
    if (s->be->follow != NULL)
        s->be->follow(s, cb, ctx);
}

int tly_store_shared(tly_store_t *s) { return s->be->shared != NULL && s->be->shared(s); }

void tly_store_sync(tly_store_t *s, void (*cb)(void *arg), void *arg)
{
    if (s->be->sync != NULL) {
        s->be->sync(s, cb, arg);
        return;
    }
    cb(arg); /* not shared: nothing can be missing */
}

int64_t tly_store_applied_seq(tly_store_t *s) { return s->be->applied_seq != NULL ? s->be->applied_seq(s) : 0; }

void tly_store_poke(tly_store_t *s)
{
    if (s->be->poke != NULL)
        s->be->poke(s);
}

void tly_store_close(tly_store_t *s)
{
    if (s == NULL)
        return;
    tly_store_release(s);
    s->holding = 0;
    int fd = s->lock_fd;
    s->be->close(s);
    if (fd >= 0)
        close(fd); /* last: nothing of ours uses the directory now */
}

tly_store_reader_t *tly_store_reader_open(tly_store_t *s) { return s->be->reader_open(s); }

void tly_store_reader_close(tly_store_reader_t *r)
{
    if (r != NULL)
        r->be->reader_close(r);
}

int tly_store_audit_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                         void (*cb)(void *ctx, const tly_audit_row_t *row), void *ctx)
{
    return r->be->audit_page(r, poll_id, after_seq, limit, cb, ctx);
}

int tly_store_ballots_page(tly_store_reader_t *r, const char *poll_id, int64_t after_seq, size_t limit,
                           void (*cb)(void *ctx, const tly_ballot_row_t *row, int64_t seq), void *ctx)
{
    return r->be->ballots_page(r, poll_id, after_seq, limit, cb, ctx);
}

int tly_store_generate_ballots(tly_store_t *s, const char *poll_id, size_t noptions, size_t n)
{
    return s->be->generate_ballots(s, poll_id, noptions, n);
}

void tly_store_stats(tly_store_t *s, tly_store_stats_t *out) { s->be->stats(s, out); }

int tly_store_reconcile(tly_store_reader_t *r, int repair, void (*drift)(void *ctx, const tly_store_drift_t *d),
                        void (*actual)(void *ctx, const char *poll_id, int position, int64_t count), void *ctx)
{
    if (r->be->reconcile == NULL)
        return 0; /* no counters beside the ballots: nothing can drift */
    return r->be->reconcile(r, repair, drift, actual, ctx);
}

void tly_store_stop_thread(pthread_mutex_t *mu, pthread_cond_t *cv, int *stop, pthread_t t, int started)
{
    pthread_mutex_lock(mu);
    *stop = 1;
    pthread_cond_signal(cv);
    pthread_mutex_unlock(mu);
    if (started)
        pthread_join(t, NULL);
}
