/*
 * base: what every module of tally needs and nothing else: error codes, the one
 * allocation wrapper (so tests can inject failure), wall-clock time in RFC 3339,
 * random URL-safe identifiers, and UTF-8 text rules (validity, blank text, trimming,
 * the key texts are compared by), the Unicode parts from libunistring.
 *
 * Thread-safety: every function here may be called from any thread.
 */
#ifndef TALLY_BASE_H
#define TALLY_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Error codes: functions return 0 on success or one of these (negative). */
enum {
    TLY_OK = 0,
    TLY_ENOMEM = -1, /* allocation failed */
    TLY_EINVAL = -2, /* malformed input */
    TLY_ENOTFOUND = -3,
    TLY_EEXIST = -4, /* unique constraint: already there */
    TLY_EAUTH = -5,  /* authentication failed */
    TLY_EIO = -6,    /* storage or system error */
    TLY_ESTATE = -7, /* wrong state for the operation */
    TLY_EFULL = -8,  /* a bounded queue or table is full */
};

/* Allocation. Every allocation in tally goes through these so that tests can make
 * the n-th allocation fail (tly_alloc_fail_after). They return NULL on failure;
 * callers handle it (a request answers 503, startup exits). */
void *tly_malloc(size_t n);
void *tly_calloc(size_t n, size_t size);
void *tly_realloc(void *p, size_t n);
void tly_free(void *p);
char *tly_strdup(const char *s);
char *tly_strndup(const char *s, size_t n);
/* Make every allocation after the next `n` fail; n < 0 disables injection. For tests. */
void tly_alloc_fail_after(long n);
/* How many allocations through these wrappers have failed on the calling thread so far
 * (injected or real). Some libraries cannot report an allocation failure as such:
 * jansson's parser reports "invalid token" and its json_dumps may silently leave out a
 * piece of the text. A caller reads this before and after such a call and, when it
 * moved, treats the result as "out of memory" (503), not as bad input or good output. */
uint64_t tly_alloc_failures(void);
/* Make every n-th allocation fail from now on (counted over all threads: the n-th, 2n-th,
 * ... call of tly_malloc, tly_calloc or tly_realloc returns NULL); n <= 0 disables it.
 * Independent of tly_alloc_fail_after: an allocation fails when either says so. For
 * tests (TALLY_FAULT_ALLOC_EVERY, see main.c); any thread. */
void tly_alloc_fail_every(long n);

/* Wall-clock milliseconds since the Unix epoch. */
int64_t tly_now_ms(void);
/* mkdir -p with mode 0700 for what it creates (existing directories keep their mode).
 * Returns 0, or TLY_EIO (errno says why) / TLY_ENOMEM. Any thread. */
int tly_mkdir_p(const char *dir);

/* Monotonic microseconds (CLOCK_MONOTONIC: never steps back with the wall clock), for
 * durations. Any thread. */
uint64_t tly_mono_us(void);

/* What this binary is: its version (the VERSION file) and the commit it was built from
 * ("unknown" outside a git checkout), both written by the build (src/base/version.c). */
extern const char tly_version[];
extern const char tly_build_commit[];

#define TLY_TIME_LEN 25 /* "2026-04-05T12:00:01.234Z" plus NUL */
/* Formats ms since the epoch as RFC 3339 UTC with milliseconds into out. */
void tly_time_format(int64_t ms, char out[TLY_TIME_LEN]);
/* Parses RFC 3339 ("2026-04-05T10:00:00Z", optional fraction, "Z" or "+hh:mm")
 * into ms since the epoch. Returns 0 or TLY_EINVAL; instants outside
 * 1970-01-01T00:00:00Z..9999-12-31T23:59:59.999Z (after the offset) are refused, so
 * every time parsed can be written back by tly_time_format. */
int tly_time_parse(const char *s, int64_t *ms);

/* Fills out with `nbytes` random bytes encoded as base64url without padding, after
 * `prefix` (may be ""). out must hold strlen(prefix) + 4 * nbytes / 3 + 2 bytes. */
void tly_random_id(char *out, const char *prefix, size_t nbytes);

/* Lower-case hex of n bytes into out (2n + 1 bytes, NUL-terminated); libsodium's. */
void tly_hex_encode(const uint8_t *in, size_t n, char *out);
/* Decodes len hex digits (either case) into out, at most cap bytes. Returns the byte
 * count, or -1 for an odd length, a non-hex digit or more than cap bytes. */
int tly_hex_decode(const char *in, size_t len, uint8_t *out, size_t cap);
/* base64url without padding. encode writes a NUL-terminated string and returns its
 * length; out must hold 4 * (n + 2) / 3 + 1 bytes. decode returns the decoded
 * length or TLY_EINVAL; out must hold 3 * len / 4 + 1 bytes. */
size_t tly_b64url_encode(const uint8_t *in, size_t n, char *out);
/*
 * Join codes: what a room types to reach a poll. TLY_JOIN_CODE_LEN characters of an
 * alphabet of 32 that leaves out the look-alikes 0/O and 1/I (5 bits each: 30 bits, about
 * a billion codes), read without regard to case. The store's SQL uses the same alphabet
 * (the migration that gives existing polls theirs).
 */
#define TLY_JOIN_CODE_LEN 6
#define TLY_JOIN_CODE_ALPHABET "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"

/* A random code, NUL-terminated (out holds TLY_JOIN_CODE_LEN + 1). Any thread. */
void tly_join_code_random(char *out);

/* Reads what someone typed as a code: letters in either case, hyphens and spaces
 * ignored (a code may be written "ABC-DEF"). Writes the code as stored (upper case,
 * NUL-terminated, TLY_JOIN_CODE_LEN + 1 bytes) and returns true; false when it is not
 * TLY_JOIN_CODE_LEN characters of the alphabet (a 0, O, 1 or I never is). Pure. */
bool tly_join_code_read(const char *in, size_t len, char *out);

int tly_b64url_decode(const char *in, size_t len, uint8_t *out);

/* Validates UTF-8 (no overlongs, no surrogates) and returns the number of code points,
 * or -1 when invalid. */
long tly_utf8_length(const char *s, size_t len);

/*
 * Text as people see it. Every character property, normalization and case mapping here
 * is libunistring's (Unicode's own data), never a table of ours. s is valid UTF-8 of
 * len bytes (tly_utf8_length(s, len) >= 0); invalid input is the caller's bug.
 *
 * A blank character is one a reader does not see as a mark of its own: Unicode
 * White_Space (U+0020, U+00A0, U+3000, line breaks...), Default_Ignorable_Code_Point
 * (U+200B zero width space, U+200D ZWJ, U+2060 word joiner, U+FEFF BOM, soft hyphen,
 * variation selectors, Hangul fillers...), and the general categories Cf (format) and
 * Cc (control).
 */

/* Whether s has no character but blank ones (true for len 0). */
bool tly_text_is_blank(const char *s, size_t len);
/* s without White_Space at either end: sets *start to the bytes skipped at the front
 * and returns the length left. Other blank characters stay: at the end of a text a
 * variation selector, ZWJ or tag character may belong to the emoji sequence before
 * it, and at the front a format character to what follows. */
size_t tly_text_trim(const char *s, size_t len, size_t *start);
/*
 * The key by which two texts are "the same" to a reader: blank characters other than
 * White_Space dropped, each run of White_Space read as one space and none at either
 * end, then full Unicode case folding and canonical composition (NFC, so that "e" +
 * U+0301 and "\u00e9" are one letter). Equal keys: texts that look alike up to case,
 * spacing and invisible characters. Returns a NUL-terminated key of *keylen bytes,
 * allocated with tly_malloc (the caller frees it with tly_free), or NULL when out of
 * memory.
 */
char *tly_text_key(const char *s, size_t len, size_t *keylen);

/*
 * A list of strings gathered one by one into one block: an array of pointers, then the
 * strings (the shape of tly_link_row_t.polls_moved, store.h). Start from {0}; add copies
 * s; take hands the block over (NULL when the list is empty; the taker frees it with
 * tly_free) and frees what the list held, also when taking fails. Both return 0 or
 * TLY_ENOMEM. Any thread, one list at a time.
 */
typedef struct {
    char *buf;
    size_t len, cap, n;
} tly_strlist_t;
int tly_strlist_add(tly_strlist_t *l, const char *s);
int tly_strlist_take(tly_strlist_t *l, char ***out, size_t *n);

#define TLY_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
