/*
 * base.c: allocation wrapper, time, ids, base64url, UTF-8 checks and text rules.
 */
#include "base.h"

#include <errno.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unicase.h>
#include <unictype.h>
#include <uninorm.h>
#include <unistr.h>

/* Injection, two independent modes (tests only; both off by default):
 * - alloc_budget: -1 means off; otherwise the number of allocations still allowed.
 * - alloc_every: 0 means off; otherwise every alloc_every-th allocation fails, counted
 *   by alloc_count over all threads (the event loop, workers and the store's writer all
 *   allocate), so the failures are spread evenly whatever thread hits them. */
static _Atomic long alloc_budget = -1;
static _Atomic long alloc_every = 0;
static _Atomic unsigned long alloc_count = 0;

/* Per thread, so that a caller can tell whether its own call failed (tly_alloc_failures). */
static _Thread_local uint64_t alloc_failures;

/* Counts a NULL from malloc, calloc or realloc (p is what it returned). */
static void *counted(void *p)
{
    if (p == NULL)
        alloc_failures++;
    return p;
}

uint64_t tly_alloc_failures(void) { return alloc_failures; }

static int alloc_injected(void)
{
    long every = atomic_load_explicit(&alloc_every, memory_order_relaxed);
    if (every > 0 && (atomic_fetch_add_explicit(&alloc_count, 1, memory_order_relaxed) + 1) % (unsigned long)every == 0)
        return 1;
    /* Take one from the budget only while it is positive: a plain load-then-subtract
     * lets two threads that both saw 1 drive it to -1, which would switch injection off. */
    long b = atomic_load_explicit(&alloc_budget, memory_order_relaxed);
    while (b > 0 &&
           !atomic_compare_exchange_weak_explicit(&alloc_budget, &b, b - 1, memory_order_relaxed, memory_order_relaxed))
        ;
    return b == 0;
}

static int alloc_should_fail(void)
{
    if (!alloc_injected())
        return 0;
    alloc_failures++;
    return 1;
}

void tly_alloc_fail_after(long n) { atomic_store(&alloc_budget, n < 0 ? -1 : n); }

void tly_alloc_fail_every(long n)
{
    atomic_store(&alloc_count, 0);
    atomic_store(&alloc_every, n > 0 ? n : 0);
}

void *tly_malloc(size_t n) { return alloc_should_fail() ? NULL : counted(malloc(n ? n : 1)); }

void *tly_calloc(size_t n, size_t size)
{
    return alloc_should_fail() ? NULL : counted(calloc(n ? n : 1, size ? size : 1));
}

void *tly_realloc(void *p, size_t n) { return alloc_should_fail() ? NULL : counted(realloc(p, n ? n : 1)); }

void tly_free(void *p) { free(p); }

char *tly_strndup(const char *s, size_t n)
{
    char *d = tly_malloc(n + 1);
    if (d == NULL)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *tly_strdup(const char *s) { return tly_strndup(s, strlen(s)); }

int64_t tly_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t tly_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

void tly_time_format(int64_t ms, char out[TLY_TIME_LEN])
{
    time_t secs = (time_t)(ms / 1000);
    int frac = (int)(ms % 1000);
    if (frac < 0) {
        frac += 1000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    /* strftime writes exactly 19 characters for years 1000..9999 */
    if (tm.tm_year + 1900 > 9999 || tm.tm_year + 1900 < 1000 ||
        strftime(out, TLY_TIME_LEN, "%Y-%m-%dT%H:%M:%S", &tm) != 19) {
        memcpy(out, "9999-12-31T23:59:59.999Z", TLY_TIME_LEN);
        return;
    }
    out[19] = '.';
    out[20] = (char)('0' + frac / 100);
    out[21] = (char)('0' + frac / 10 % 10);
    out[22] = (char)('0' + frac % 10);
    out[23] = 'Z';
    out[24] = '\0';
}

static int parse_digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return -1;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

int tly_time_parse(const char *s, int64_t *ms)
{
    const char *p = s;
    int year, mon, day, hour, min, sec, frac_ms = 0;
    if (parse_digits(&p, 4, &year) || *p++ != '-' || parse_digits(&p, 2, &mon) || *p++ != '-' ||
        parse_digits(&p, 2, &day) || (*p != 'T' && *p != 't') || (++p, parse_digits(&p, 2, &hour)) || *p++ != ':' ||
        parse_digits(&p, 2, &min) || *p++ != ':' || parse_digits(&p, 2, &sec))
        return TLY_EINVAL;
    if (*p == '.') {
        p++;
        int digits = 0;
        while (*p >= '0' && *p <= '9') {
            if (digits < 3)
                frac_ms = frac_ms * 10 + (*p - '0');
            digits++;
            p++;
        }
        if (digits == 0 || digits > 9)
            return TLY_EINVAL;
        for (int i = digits; i < 3; i++)
            frac_ms *= 10;
    }
    int offset_min = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p++ == '-' ? -1 : 1, oh, om;
        if (parse_digits(&p, 2, &oh) || *p++ != ':' || parse_digits(&p, 2, &om) || oh > 23 || om > 59)
            return TLY_EINVAL;
        offset_min = sign * (oh * 60 + om);
    } else {
        return TLY_EINVAL;
    }
    if (*p != '\0')
        return TLY_EINVAL;
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (year < 1970 || year > 9999 || mon < 1 || mon > 12 || day < 1 || day > mdays[mon - 1] || hour > 23 || min > 59 ||
        sec > 60)
        return TLY_EINVAL;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (mon == 2 && day == 29 && !leap)
        return TLY_EINVAL;
    /* days from civil (Howard Hinnant's algorithm) */
    int y = year - (mon <= 2);
    int era = y / 400;
    int yoe = y - era * 400;
    int doy = (153 * (mon + (mon > 2 ? -3 : 9)) + 2) / 5 + day - 1;
    int doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    int64_t days = (int64_t)era * 146097 + doe - 719468;
    int64_t secs = days * 86400 + hour * 3600 + min * 60 + (sec > 59 ? 59 : sec) - offset_min * 60;
    /* an offset can carry the instant out of 1970..9999 UTC, which tly_time_format cannot
     * write back (a poll would echo a start_time its own PATCH refuses): refuse it here */
    int64_t t = secs * 1000 + frac_ms;
    if (t < 0 || t > INT64_C(253402300799999)) /* 9999-12-31T23:59:59.999Z */
        return TLY_EINVAL;
    *ms = t;
    return 0;
}

static const char b64url_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t tly_b64url_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
        out[o++] = b64url_chars[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
    }
    out[o] = '\0';
    return o;
}

static int b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

int tly_b64url_decode(const char *in, size_t len, uint8_t *out)
{
    if (len % 4 == 1)
        return TLY_EINVAL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_value(in[i]);
        if (v < 0)
            return TLY_EINVAL;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    /* leftover bits must be zero for a canonical encoding */
    if (bits > 0 && (acc & ((1u << bits) - 1)) != 0)
        return TLY_EINVAL;
    return (int)o;
}

/*
 * Random bytes for ids without a system call each. A vote takes two ids (vote_id and
 * receipt), and the kernel's generator costs a getrandom call each (0.5 us here, in a
 * VM); a ChaCha20 keystream (libsodium's randombytes_buf_deterministic) costs a few ns a
 * byte. Each thread has its own keystream under a key from the kernel, with fast key
 * erasure: a refill's first 32 bytes become the next key and are never handed out, so
 * what is in memory cannot reproduce bytes already given. The key comes fresh from the
 * kernel every RNG_RESEED refills. tally never forks once it serves, so no fork check.
 */
#define RNG_RESEED 1024
static _Thread_local struct {
    uint8_t buf[512]; /* [0, 32): the next key; [pos, 512): bytes not handed out yet */
    size_t pos;
    unsigned refills;
} rng = {.pos = 512};

static void random_bytes(uint8_t *out, size_t n)
{
    while (n > 0) {
        if (rng.pos == sizeof(rng.buf)) {
            uint8_t key[32];
            if (rng.refills++ % RNG_RESEED == 0)
                randombytes_buf(key, sizeof(key));
            else
                memcpy(key, rng.buf, sizeof(key));
            randombytes_buf_deterministic(rng.buf, sizeof(rng.buf), key);
            sodium_memzero(key, sizeof(key));
            rng.pos = 32;
        }
        size_t take = sizeof(rng.buf) - rng.pos < n ? sizeof(rng.buf) - rng.pos : n;
        memcpy(out, rng.buf + rng.pos, take);
        sodium_memzero(rng.buf + rng.pos, take);
        rng.pos += take;
        out += take;
        n -= take;
    }
}

void tly_random_id(char *out, const char *prefix, size_t nbytes)
{
    uint8_t buf[64];
    if (nbytes > sizeof(buf))
        nbytes = sizeof(buf);
    random_bytes(buf, nbytes);
    size_t plen = strlen(prefix);
    memcpy(out, prefix, plen);
    tly_b64url_encode(buf, nbytes, out + plen);
}

void tly_join_code_random(char *out)
{
    uint8_t buf[TLY_JOIN_CODE_LEN];
    random_bytes(buf, sizeof(buf));
    for (size_t i = 0; i < TLY_JOIN_CODE_LEN; i++)
        out[i] = TLY_JOIN_CODE_ALPHABET[buf[i] & 31]; /* 32 symbols: no modulo bias */
    out[TLY_JOIN_CODE_LEN] = '\0';
}

bool tly_join_code_read(const char *in, size_t len, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '-' || c == ' ')
            continue;
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (c == '\0' || strchr(TLY_JOIN_CODE_ALPHABET, c) == NULL || n == TLY_JOIN_CODE_LEN)
            return false;
        out[n++] = c;
    }
    out[n] = '\0';
    return n == TLY_JOIN_CODE_LEN;
}

long tly_utf8_length(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    long count = 0;
    while (p < end) {
        unsigned c = *p;
        size_t need;
        uint32_t cp;
        if (c < 0x80) {
            p++;
            count++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            cp = c & 0x07;
        } else {
            return -1;
        }
        if ((size_t)(end - p) <= need)
            return -1;
        for (size_t i = 1; i <= need; i++) {
            if ((p[i] & 0xC0) != 0x80)
                return -1;
            cp = cp << 6 | (p[i] & 0x3F);
        }
        if ((need == 2 && cp < 0x800) || (need == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        p += need + 1;
        count++;
    }
    return count;
}

/* ---- text ---- */

static bool is_space(ucs4_t c) { return uc_is_property_white_space(c); }

static bool is_blank(ucs4_t c)
{
    return uc_is_property_white_space(c) || uc_is_property_default_ignorable_code_point(c) ||
           uc_is_general_category(c, UC_CATEGORY_Cf) || uc_is_general_category(c, UC_CATEGORY_Cc);
}

/* The code point at s[i] (i < len, valid UTF-8) into *c; returns its length in bytes. */
static size_t next_char(const char *s, size_t len, size_t i, ucs4_t *c)
{
    int n = u8_mbtouc(c, (const uint8_t *)s + i, len - i);
    return n > 0 ? (size_t)n : 1;
}

bool tly_text_is_blank(const char *s, size_t len)
{
    ucs4_t c;
    for (size_t i = 0; i < len;) {
        i += next_char(s, len, i, &c);
        if (!is_blank(c))
            return false;
    }
    return true;
}

size_t tly_text_trim(const char *s, size_t len, size_t *start)
{
    ucs4_t c;
    size_t i = 0;
    while (i < len) {
        size_t n = next_char(s, len, i, &c);
        if (!is_space(c))
            break;
        i += n;
    }
    *start = i;
    size_t end = i; /* the end of the last character that is not White_Space */
    while (i < len) {
        i += next_char(s, len, i, &c);
        if (!is_space(c))
            end = i;
    }
    return end - *start;
}

char *tly_text_key(const char *s, size_t len, size_t *keylen)
{
    /* blank characters out, and each run of White_Space one space between two visible
     * characters: never longer than s */
    char *visible = tly_malloc(len + 1), *key = NULL;
    if (visible == NULL)
        return NULL;
    size_t n = 0;
    bool space = false;
    ucs4_t c;
    for (size_t i = 0, k; i < len; i += k) {
        k = next_char(s, len, i, &c);
        if (is_space(c)) {
            space = n > 0;
        } else if (!is_blank(c)) {
            if (space)
                visible[n++] = ' ';
            space = false;
            memcpy(visible + n, s + i, k);
            n += k;
        }
    }
    /* Case folding may lengthen a text (U+0390 becomes three code points, 6 bytes from
     * 2) and composition shortens it: libunistring writes into buf when the result fits
     * and returns a buffer of its own (malloc'd) otherwise. */
    size_t cap = 3 * n + 16, flen = cap;
    uint8_t *buf = tly_malloc(cap), *folded = NULL;
    if (buf != NULL)
        folded = u8_casefold((const uint8_t *)visible, n, NULL, UNINORM_NFC, buf, &flen);
    if (folded == buf && folded != NULL && flen < cap) {
        key = (char *)buf; /* room for the NUL too */
    } else {
        if (folded != NULL && (key = tly_malloc(flen + 1)) != NULL)
            memcpy(key, folded, flen);
        if (folded != buf)
            free(folded);
        tly_free(buf);
    }
    tly_free(visible);
    if (key == NULL)
        return NULL;
    key[flen] = '\0';
    *keylen = flen;
    return key;
}

void tly_hex_encode(const uint8_t *in, size_t n, char *out) { sodium_bin2hex(out, 2 * n + 1, in, n); }

int tly_hex_decode(const char *in, size_t len, uint8_t *out, size_t cap)
{
    size_t n;
    const char *end;
    if (len % 2 != 0 || len / 2 > cap || sodium_hex2bin(out, cap, in, len, NULL, &n, &end) != 0 || end != in + len)
        return -1;
    return (int)n;
}

int tly_strlist_add(tly_strlist_t *l, const char *s)
{
    size_t n = strlen(s) + 1;
    if (l->len + n > l->cap) {
        size_t cap = l->cap ? l->cap : 256;
        while (cap < l->len + n)
            cap *= 2;
        char *buf = tly_realloc(l->buf, cap);
        if (buf == NULL)
            return TLY_ENOMEM;
        l->buf = buf;
        l->cap = cap;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
    l->n++;
    return 0;
}

int tly_strlist_take(tly_strlist_t *l, char ***out, size_t *n)
{
    int rc = 0;
    *out = NULL;
    *n = 0;
    if (l->n > 0) {
        char **v = tly_malloc(l->n * sizeof *v + l->len);
        if (v == NULL) {
            rc = TLY_ENOMEM;
        } else {
            char *ids = (char *)(v + l->n);
            memcpy(ids, l->buf, l->len);
            for (size_t i = 0; i < l->n; i++) {
                v[i] = ids;
                ids += strlen(ids) + 1;
            }
            *out = v;
            *n = l->n;
        }
    }
    tly_free(l->buf);
    *l = (tly_strlist_t){0};
    return rc;
}

/* mkdir -p with mode 0700 for what it creates; existing directories keep their mode. */
int tly_mkdir_p(const char *dir)
{
    int rc = TLY_EIO;
    struct stat sb;
    char *p = tly_strdup(dir);
    if (p == NULL)
        return TLY_ENOMEM;
    for (char *c = p + 1;; c++) {
        if (*c != '/' && *c != '\0')
            continue;
        char save = *c;
        *c = '\0';
        if (mkdir(p, 0700) != 0 && errno != EEXIST)
            goto fail;
        *c = save;
        if (save == '\0')
            break;
    }
    if (stat(p, &sb) != 0 || !S_ISDIR(sb.st_mode))
        goto fail;
    rc = 0;
fail:
    tly_free(p);
    return rc;
}
