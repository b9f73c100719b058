/*
 * sqlite_wal.c: a check of the WAL file before SQLite opens it.
 *
 * A commit is durable once its WAL frames are fsynced, and until a checkpoint copies
 * them back they exist only there. SQLite's recovery reads the WAL from its start and
 * stops at the first frame whose checksum does not follow from the frames before it,
 * keeping the transactions committed before that frame: right for a torn tail (the
 * commit being written when the power went, never acknowledged), silent data loss when
 * the damage is in the middle (a bad sector, a stray write) and later commits, which
 * were acknowledged, follow it. So before the store opens, this reads the WAL the way
 * recovery will (the format is SQLite's documented one: fileformat2.html, "WAL file
 * format") and refuses a WAL whose first bad frame is followed by a commit of a later
 * transaction with the same salts: that transaction's commit was fsynced after the
 * damaged one's (the writer waits for each commit before the next), so the damage is
 * not a torn tail.
 */
#include "store/sqlite_int.h"

#include "base/base.h"
#include "obs/obs.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define WAL_HEADER 32
#define FRAME_HEADER 24
#define MAGIC_LE 0x377f0682u /* checksums over little-endian words */
#define MAGIC_BE 0x377f0683u /* over big-endian words */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | (uint32_t)p[0];
}

/* The WAL checksum: over n bytes (a multiple of 8) as 32-bit words in pairs, continuing
 * from s[0], s[1]. */
static void wal_checksum(const uint8_t *p, size_t n, bool big, uint32_t s[2])
{
    uint32_t s0 = s[0], s1 = s[1];
    for (size_t i = 0; i + 8 <= n; i += 8) {
        s0 += (big ? be32(p + i) : le32(p + i)) + s1;
        s1 += (big ? be32(p + i + 4) : le32(p + i + 4)) + s0;
    }
    s[0] = s0;
    s[1] = s1;
}

static int refuse(const char *path, long long offset, long long frame, const char *why)
{
    char off[24], fr[24];
    snprintf(off, sizeof off, "%lld", offset);
    snprintf(fr, sizeof fr, "%lld", frame);
    tly_log(TLY_LOG_ERROR,
            "store: the WAL is damaged before commits that were acknowledged; SQLite would drop them silently, so "
            "the start is refused (restore the data directory from a copy)",
            "file", path, "offset", off, "frame", fr, "reason", why, NULL);
    return TLY_EIO;
}

int sq_wal_check(const char *wal_path)
{
    int rc = 0;
    uint8_t hdr[WAL_HEADER], fh[FRAME_HEADER], *page = NULL;
    FILE *f = fopen(wal_path, "rb");
    if (f == NULL)
        return errno == ENOENT ? 0 : TLY_EIO; /* no WAL: nothing committed lives only there */
    if (fread(hdr, 1, WAL_HEADER, f) != WAL_HEADER)
        goto out; /* shorter than a header: SQLite ignores it, and so nothing is in it */
    uint32_t magic = be32(hdr), page_size = be32(hdr + 8);
    bool big = magic == MAGIC_BE;
    uint32_t s[2] = {0, 0};
    wal_checksum(hdr, 24, big, s);
    if ((magic != MAGIC_LE && magic != MAGIC_BE) || page_size < 512 || page_size > 65536 ||
        (page_size & (page_size - 1)) != 0 || s[0] != be32(hdr + 24) || s[1] != be32(hdr + 28))
        goto out; /* a header SQLite would not take: it reads no frame of this WAL */
    if ((page = tly_malloc(page_size)) == NULL) {
        rc = TLY_ENOMEM;
        goto out;
    }
    /* bad: the first frame recovery does not take (another generation's salts or a
     * checksum that does not follow); frames of this generation after it tell damage
     * from the log's end: the first commit among them ends the bad frame's transaction,
     * a second one is a later transaction, fsynced after the damaged one was. */
    long long frame = 0, bad = -1;
    bool bad_txn_ended = false;
    for (;; frame++) {
        if (fread(fh, 1, FRAME_HEADER, f) != FRAME_HEADER || fread(page, 1, page_size, f) != page_size)
            break; /* the end (a partial frame is a torn tail) */
        bool ours = memcmp(fh + 8, hdr + 16, 8) == 0; /* this generation of the WAL */
        bool commit = be32(fh + 4) != 0;
        if (bad < 0) {
            uint32_t t[2] = {s[0], s[1]};
            wal_checksum(fh, 8, big, t);
            wal_checksum(page, page_size, big, t);
            if (ours && t[0] == be32(fh + 16) && t[1] == be32(fh + 20)) {
                s[0] = t[0];
                s[1] = t[1];
                continue;
            }
            bad = frame; /* recovery stops here */
            bad_txn_ended = ours && commit;
            continue;
        }
        if (!ours || !commit)
            continue; /* another generation's leftovers, or a frame within a transaction */
        if (!bad_txn_ended) {
            bad_txn_ended = true; /* the damaged frame's own transaction ends here */
            continue;
        }
        rc = refuse(wal_path, WAL_HEADER + bad * (long long)(FRAME_HEADER + page_size), bad,
                    "a frame recovery would stop at is followed by a later transaction's commit");
        goto out;
    }
    if (ferror(f))
        rc = TLY_EIO;
out:
    tly_free(page);
    fclose(f);
    return rc;
}
