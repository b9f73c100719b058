/*
 * sqlite_fault.c: test-only fault injection for the SQLite backend: a shim VFS whose
 * n-th fsync fails (tly_store_fault_fsync, store.h; main.c installs it only when
 * TALLY_FAULT_FSYNC_AFTER is set).
 */
#include "store/store.h"

#include "base/base.h"
#include "obs/obs.h"

#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>

/* ---- fault injection: a failing fsync (test hook) --------------------------------- */

/*
 * A shim VFS for tly_store_fault_fsync, which tests/crash/fsync.test.mjs reaches through
 * TALLY_FAULT_FSYNC_AFTER. Nothing here runs unless that hook was called: production
 * connections use SQLite's own VFS directly. Each file opened through the shim is the
 * real VFS's file placed right after our header; every method forwards to it, and
 * xSync of a database or WAL file counts. Version 2 methods (no xFetch), so SQLite does
 * not memory-map the database behind the shim's back (it would not anyway: mmap_size
 * is 0 by default).
 */
typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* lives right after this struct */
    int counted;        /* a database or WAL file: its fsyncs count */
} fault_file_t;

static sqlite3_vfs *fault_real_vfs;
static sqlite3_vfs fault_vfs;
static atomic_long fault_syncs_left; /* fsyncs until the failing one; <= 0: spent */

#define FAULT_REAL(f) (((fault_file_t *)(f))->real)

static int fault_close(sqlite3_file *f) { return FAULT_REAL(f)->pMethods->xClose(FAULT_REAL(f)); }
static int fault_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return FAULT_REAL(f)->pMethods->xRead(FAULT_REAL(f), b, n, o);
}
static int fault_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    return FAULT_REAL(f)->pMethods->xWrite(FAULT_REAL(f), b, n, o);
}
static int fault_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return FAULT_REAL(f)->pMethods->xTruncate(FAULT_REAL(f), size);
}
static int fault_sync(sqlite3_file *f, int flags)
{
    if (((fault_file_t *)f)->counted && atomic_fetch_sub(&fault_syncs_left, 1) == 1) {
        tly_log(TLY_LOG_WARN, "fault injection: this fsync fails with EIO", NULL);
        return SQLITE_IOERR_FSYNC;
    }
    return FAULT_REAL(f)->pMethods->xSync(FAULT_REAL(f), flags);
}
static int fault_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return FAULT_REAL(f)->pMethods->xFileSize(FAULT_REAL(f), size);
}
static int fault_lock(sqlite3_file *f, int l) { return FAULT_REAL(f)->pMethods->xLock(FAULT_REAL(f), l); }
static int fault_unlock(sqlite3_file *f, int l) { return FAULT_REAL(f)->pMethods->xUnlock(FAULT_REAL(f), l); }
static int fault_reserved(sqlite3_file *f, int *out)
{
    return FAULT_REAL(f)->pMethods->xCheckReservedLock(FAULT_REAL(f), out);
}
static int fault_fcntl(sqlite3_file *f, int op, void *arg)
{
    return FAULT_REAL(f)->pMethods->xFileControl(FAULT_REAL(f), op, arg);
}
static int fault_sector(sqlite3_file *f) { return FAULT_REAL(f)->pMethods->xSectorSize(FAULT_REAL(f)); }
static int fault_devchar(sqlite3_file *f) { return FAULT_REAL(f)->pMethods->xDeviceCharacteristics(FAULT_REAL(f)); }
static int fault_shmmap(sqlite3_file *f, int pg, int sz, int ext, void volatile **pp)
{
    return FAULT_REAL(f)->pMethods->xShmMap(FAULT_REAL(f), pg, sz, ext, pp);
}
static int fault_shmlock(sqlite3_file *f, int off, int n, int flags)
{
    return FAULT_REAL(f)->pMethods->xShmLock(FAULT_REAL(f), off, n, flags);
}
static void fault_shmbarrier(sqlite3_file *f) { FAULT_REAL(f)->pMethods->xShmBarrier(FAULT_REAL(f)); }
static int fault_shmunmap(sqlite3_file *f, int del) { return FAULT_REAL(f)->pMethods->xShmUnmap(FAULT_REAL(f), del); }

static const sqlite3_io_methods fault_methods = {
    .iVersion = 2,
    .xClose = fault_close,
    .xRead = fault_read,
    .xWrite = fault_write,
    .xTruncate = fault_truncate,
    .xSync = fault_sync,
    .xFileSize = fault_size,
    .xLock = fault_lock,
    .xUnlock = fault_unlock,
    .xCheckReservedLock = fault_reserved,
    .xFileControl = fault_fcntl,
    .xSectorSize = fault_sector,
    .xDeviceCharacteristics = fault_devchar,
    .xShmMap = fault_shmmap,
    .xShmLock = fault_shmlock,
    .xShmBarrier = fault_shmbarrier,
    .xShmUnmap = fault_shmunmap,
};

static int fault_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    fault_file_t *p = (fault_file_t *)f;
    p->real = (sqlite3_file *)(p + 1);
    p->counted = (flags & (SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_WAL)) != 0;
    int rc = fault_real_vfs->xOpen(fault_real_vfs, name, p->real, flags, out);
    /* No methods means SQLite will not call xClose: neither may we. */
    p->base.pMethods = p->real->pMethods != NULL ? &fault_methods : NULL;
    return rc;
}

int tly_store_fault_fsync(long n)
{
    if (n < 1)
        return TLY_EINVAL;
    if (fault_real_vfs == NULL) {
        if ((fault_real_vfs = sqlite3_vfs_find(NULL)) == NULL)
            return TLY_EIO;
        fault_vfs = *fault_real_vfs;
        fault_vfs.zName = "tally-fault-fsync";
        fault_vfs.szOsFile = (int)sizeof(fault_file_t) + fault_real_vfs->szOsFile;
        fault_vfs.xOpen = fault_open;
        fault_vfs.pNext = NULL;
        if (sqlite3_vfs_register(&fault_vfs, 1) != SQLITE_OK) /* the default from now on */
            return TLY_EIO;
    }
    atomic_store(&fault_syncs_left, n);
    return 0;
}
