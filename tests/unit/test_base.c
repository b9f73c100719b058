/*
 * test_base.c: base64url, RFC 3339 time, UTF-8 validation, ids and allocation failure
 * injection. These are what tokens, ids, timestamps in the API and poll titles are made
 * of; a mistake here shows up to users as a rejected token, a wrong closing time or a
 * title that breaks the page.
 */
#include "base/base.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- base64url ---------------------------------------------------------------- */

Test(b64url, rfc4648_vectors)
{
    /* RFC 4648 section 10, in the URL alphabet without padding */
    static const struct {
        const char *in, *out;
    } v[] = {{"", ""},         {"f", "Zg"},         {"fo", "Zm8"},          {"foo", "Zm9v"},
             {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}, {"\xfb\xff", "-_8"}};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(v); i++) {
        char enc[32];
        uint8_t dec[32];
        size_t n = strlen(v[i].in);
        cr_assert_eq(tly_b64url_encode((const uint8_t *)v[i].in, n, enc), strlen(v[i].out));
        cr_assert_str_eq(enc, v[i].out);
        cr_assert_eq(tly_b64url_decode(v[i].out, strlen(v[i].out), dec), (int)n);
        cr_assert_arr_eq(dec, v[i].in, n);
    }
}

Test(b64url, round_trip_all_lengths)
{
    uint8_t in[300], dec[300 + 8];
    char enc[4 * (300 + 2) / 3 + 1 + 8];
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (uint8_t)(i * 167 + 13); /* every byte value occurs */
    for (size_t n = 0; n <= sizeof(in); n++) {
        memset(enc, '#', sizeof(enc));
        size_t elen = tly_b64url_encode(in, n, enc);
        cr_assert_eq(elen, (4 * n + 2) / 3, "n=%zu", n);
        cr_assert_eq(enc[elen], '\0');
        cr_assert_leq(elen + 1, 4 * (n + 2) / 3 + 1, "the documented buffer size is enough");
        cr_assert_eq(strspn(enc, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), elen);

        memset(dec, 0xA5, sizeof(dec));
        cr_assert_eq(tly_b64url_decode(enc, elen, dec), (int)n, "n=%zu", n);
        cr_assert_arr_eq(dec, in, n);
        /* nothing written past the decoded bytes */
        cr_assert_eq(dec[n], 0xA5);
    }
}

Test(b64url, decode_rejects)
{
    uint8_t out[64];
    const char *bad[] = {
        "Z",        /* a lone character carries no whole byte */
        "Zm9vY",    /* 4k+1 characters */
        "A",        /* 4k+1 characters whose stray bits happen to be zero */
        "Zm9vA",    /* the same after a whole group */
        "Zg==",     /* padding */
        "Zm8=",     /* padding */
        "+_8",      /* standard alphabet */
        "-/8",      /* standard alphabet */
        "Zm 9v",    /* whitespace */
        "Zm9v\n",   /* newline */
        "Zh",       /* non-canonical: low bits of the last character set */
        "Zm9",      /* non-canonical: "Zm8" is the encoding of "fo" */
        "-_9",      /* non-canonical */
        "Zm9v.Zm9v" /* the JWT separator is not part of the alphabet */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++)
        cr_assert_eq(tly_b64url_decode(bad[i], strlen(bad[i]), out), TLY_EINVAL, "%s", bad[i]);
    /* a NUL inside the given length */
    cr_assert_eq(tly_b64url_decode("Zm\0v", 4, out), TLY_EINVAL);
    /* the length is honoured: what follows is not read */
    cr_assert_eq(tly_b64url_decode("Zm9v!!!!", 4, out), 3);
}

/* ---- RFC 3339 time ------------------------------------------------------------ */

Test(time, format_known)
{
    char s[TLY_TIME_LEN];
    tly_time_format(0, s);
    cr_assert_str_eq(s, "1970-01-01T00:00:00.000Z");
    tly_time_format(INT64_C(1775390400123), s);
    cr_assert_str_eq(s, "2026-04-05T12:00:00.123Z");
    tly_time_format(-1, s);
    cr_assert_str_eq(s, "1969-12-31T23:59:59.999Z");
    tly_time_format(INT64_C(951782400000), s);
    cr_assert_str_eq(s, "2000-02-29T00:00:00.000Z");
}

Test(time, round_trip)
{
    const int64_t v[] = {0,
                         1,
                         999,
                         1000,
                         INT64_C(951782400000),     /* 2000-02-29 */
                         INT64_C(1709164800000),    /* 2024-02-29 */
                         INT64_C(1775390400123),    /* 2026-04-05 */
                         INT64_C(4107542399999),    /* 2100-02-28T23:59:59.999 */
                         INT64_C(253402300799999)}; /* 9999-12-31T23:59:59.999 */
    for (size_t i = 0; i < TLY_ARRAY_SIZE(v); i++) {
        char s[TLY_TIME_LEN];
        int64_t back = -1;
        tly_time_format(v[i], s);
        cr_assert_eq(strlen(s), TLY_TIME_LEN - 1);
        cr_assert_eq(tly_time_parse(s, &back), 0, "%s", s);
        cr_assert_eq(back, v[i], "%s", s);
    }
    /* every day of a leap year and of a common one, at a time with milliseconds */
    for (int64_t ms = INT64_C(1704067200000) + 45296789; ms < INT64_C(1767225600000); ms += 86400000) {
        char s[TLY_TIME_LEN];
        int64_t back = -1;
        tly_time_format(ms, s);
        cr_assert_eq(tly_time_parse(s, &back), 0, "%s", s);
        cr_assert_eq(back, ms, "%s", s);
    }
}

Test(time, parse_forms)
{
    int64_t ms;
    cr_assert_eq(tly_time_parse("2026-04-05T12:00:00Z", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400000));
    cr_assert_eq(tly_time_parse("2026-04-05t12:00:00z", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400000));
    cr_assert_eq(tly_time_parse("2026-04-05T12:00:00.5Z", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400500));
    cr_assert_eq(tly_time_parse("2026-04-05T12:00:00.123456789Z", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400123));
    cr_assert_eq(tly_time_parse("2026-04-05T14:00:00+02:00", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400000));
    cr_assert_eq(tly_time_parse("2026-04-05T06:30:00-05:30", &ms), 0);
    cr_assert_eq(ms, INT64_C(1775390400000));
    cr_assert_eq(tly_time_parse("2024-02-29T00:00:00Z", &ms), 0);
    cr_assert_eq(tly_time_parse("2000-02-29T00:00:00Z", &ms), 0);
}

Test(time, parse_rejects)
{
    const char *bad[] = {
        "2026-13-01T00:00:00Z",  /* bad month */
        "2026-00-01T00:00:00Z",  /* bad month */
        "2026-02-30T00:00:00Z",  /* Feb 30 */
        "2024-02-30T00:00:00Z",  /* Feb 30 in a leap year */
        "2026-02-29T00:00:00Z",  /* Feb 29 in a common year */
        "1900-02-29T00:00:00Z",  /* century, not a leap year */
        "2026-04-31T00:00:00Z",  /* April has 30 days */
        "2026-04-00T00:00:00Z",  /* day 0 */
        "2026-04-05T12:00:00",   /* missing Z */
        "2026-04-05T12:00:00.5", /* missing Z after a fraction */
        "2026-04-05T12:00:00Z ", /* trailing garbage */
        "2026-04-05T12:00:00ZZ", /* trailing garbage */
        "2026-04-05T24:00:00Z",  /* hour 24 */
        "2026-04-05T12:60:00Z",  /* minute 60 */
        "2026-04-05T12:00:00.Z", /* empty fraction */
        "2026-04-05T12:00:00+0200",
        "2026-04-05T12:00:00+24:00",
        "2026-04-05",
        "2026-4-05T12:00:00Z",
        "2026-04-05 12:00:00Z",
        "+2026-04-05T12:00:00Z",
        "",
        "2026-04-05T12:00:00.1234567890Z", /* more than nanoseconds */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++) {
        int64_t ms = 42;
        cr_assert_eq(tly_time_parse(bad[i], &ms), TLY_EINVAL, "%s", bad[i]);
        cr_assert_eq(ms, 42, "output untouched on failure: %s", bad[i]);
    }
}

/* ---- UTF-8 -------------------------------------------------------------------- */

static long u8len(const char *s)
{
    return tly_utf8_length(s, strlen(s));
}

Test(utf8, valid)
{
    cr_assert_eq(u8len(""), 0);
    cr_assert_eq(u8len("abc"), 3);
    cr_assert_eq(u8len("h\xc3\xa9llo"), 5);         /* é */
    cr_assert_eq(u8len("\xc2\x80"), 1);             /* U+0080, smallest 2-byte */
    cr_assert_eq(u8len("\xe0\xa0\x80"), 1);         /* U+0800, smallest 3-byte */
    cr_assert_eq(u8len("\xe2\x82\xac"), 1);         /* € */
    cr_assert_eq(u8len("\xed\x9f\xbf"), 1);         /* U+D7FF, just below surrogates */
    cr_assert_eq(u8len("\xee\x80\x80"), 1);         /* U+E000, just above */
    cr_assert_eq(u8len("\xef\xbf\xbf"), 1);         /* U+FFFF */
    cr_assert_eq(u8len("\xf0\x90\x80\x80"), 1);     /* U+10000, smallest 4-byte */
    cr_assert_eq(u8len("\xf0\x9f\x97\xb3\xef\xb8\x8f"), 2); /* ballot box + VS16 */
    cr_assert_eq(u8len("\xf4\x8f\xbf\xbf"), 1);     /* U+10FFFF, largest */
    cr_assert_eq(tly_utf8_length("a\0b", 3), 3);    /* NUL is valid UTF-8 */
}

Test(utf8, invalid)
{
    const char *bad[] = {
        "\xc0\x80",         /* overlong NUL (C0 80) */
        "\xc1\xbf",         /* overlong */
        "\xe0\x80\x80",     /* overlong 3-byte */
        "\xe0\x9f\xbf",     /* overlong 3-byte, largest */
        "\xf0\x8f\xbf\xbf", /* overlong 4-byte */
        "\xed\xa0\x80",     /* surrogate U+D800 (ED A0 80) */
        "\xed\xbf\xbf",     /* surrogate U+DFFF */
        "\xed\xa0\xbd\xed\xb8\x80", /* CESU-8 surrogate pair */
        "\xf4\x90\x80\x80", /* above U+10FFFF */
        "\xf5\x80\x80\x80", /* lead byte never valid */
        "\xff",
        "\xfe",
        "\x80",             /* lone continuation */
        "a\xbf",            /* lone continuation after ASCII */
        "\xe2\x82",         /* truncated 3-byte */
        "\xf0\x9f\x98",     /* truncated 4-byte */
        "abc\xc3",          /* truncated at the end */
        "\xc3\x28",         /* continuation missing */
        "\xe2\x28\xa1",     /* continuation missing */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++)
        cr_assert_eq(u8len(bad[i]), -1, "#%zu", i);
    /* truncated by the length, though the buffer holds the rest */
    cr_assert_eq(tly_utf8_length("\xe2\x82\xac", 2), -1);
    cr_assert_eq(tly_utf8_length("a\xf0\x9f\x98\x80", 4), -1);
}

/* ---- text: blank, trim, comparison keys ------------------------------------------ */

static bool blank(const char *s) { return tly_text_is_blank(s, strlen(s)); }

Test(text, blank_is_whitespace_ignorable_format_and_control_only)
{
    const char *blanks[] = {
        "",
        " \t\r\n\f\v",
        "\xc2\xa0",                 /* U+00A0 no-break space */
        "\xe3\x80\x80",             /* U+3000 ideographic space */
        "\xe2\x80\x83\xe2\x80\xaf", /* U+2003 em space, U+202F narrow no-break space */
        "\xe2\x80\xa8",             /* U+2028 line separator */
        "\xe2\x80\x8b",             /* U+200B zero width space (not White_Space) */
        "\xe2\x80\x8c\xe2\x80\x8d", /* U+200C ZWNJ, U+200D ZWJ */
        "\xe2\x81\xa0",             /* U+2060 word joiner */
        "\xef\xbb\xbf",             /* U+FEFF BOM / zero width no-break space */
        "\xc2\xad",                 /* U+00AD soft hyphen */
        "\xe1\xa0\x8e",             /* U+180E Mongolian vowel separator */
        "\xe2\x80\x8e\xe2\x80\xae", /* U+200E LRM, U+202E RLO */
        "\xef\xb8\x8f",             /* U+FE0F variation selector 16, alone */
        "\xe3\x85\xa4",             /* U+3164 Hangul filler */
        "\xf3\xa0\x80\xa0",         /* U+E0020 tag space */
        "\x07\x1b\xc2\x9b",         /* controls: BEL, ESC, U+009B */
        " \xc2\xa0\xe2\x80\x8b\xe3\x80\x80\xef\xbb\xbf ",
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(blanks); i++)
        cr_assert(blank(blanks[i]), "#%zu is blank", i);
    const char *visible[] = {
        "a",
        "\xc2\xa0" "a",
        "\xe2\x80\x8b" "." "\xe2\x80\x8b",
        "\xf0\x9f\x98\x80",     /* an emoji */
        "\xe2\x9d\xa4\xef\xb8\x8f", /* heart + VS16 */
        "\xcc\x81",             /* a combining accent alone still marks the page */
        "\xe3\x85\x8f",         /* U+314F Hangul letter A */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(visible); i++)
        cr_assert_not(blank(visible[i]), "#%zu is not blank", i);
}

/* tly_text_trim of s, as a string. */
static char *trimmed(const char *s)
{
    static char out[64];
    size_t start, n = tly_text_trim(s, strlen(s), &start);
    cr_assert_lt(n, sizeof out);
    memcpy(out, s + start, n);
    out[n] = '\0';
    return out;
}

Test(text, trim_takes_white_space_off_both_ends_only)
{
    cr_assert_str_eq(trimmed("  Go  "), "Go");
    cr_assert_str_eq(trimmed("\t\n New  York \r\n"), "New  York", "inside: as typed");
    cr_assert_str_eq(trimmed("\xc2\xa0\xe3\x80\x80" "Caf\xc3\xa9\xe2\x80\x83"), "Caf\xc3\xa9");
    cr_assert_str_eq(trimmed("   "), "");
    cr_assert_str_eq(trimmed(""), "");
    /* a variation selector or ZWJ at the end may belong to an emoji: kept */
    cr_assert_str_eq(trimmed("I \xe2\x9d\xa4\xef\xb8\x8f "), "I \xe2\x9d\xa4\xef\xb8\x8f");
    cr_assert_str_eq(trimmed("\xe2\x80\x8bx\xe2\x80\x8b"), "\xe2\x80\x8bx\xe2\x80\x8b", "not White_Space");
    cr_assert_str_eq(trimmed("e\xcc\x81 "), "e\xcc\x81", "NFD kept as typed");
}

/* tly_text_key of s, checked for its NUL; the caller frees. */
static char *key(const char *s)
{
    size_t n = 0;
    char *k = tly_text_key(s, strlen(s), &n);
    cr_assert_not_null(k);
    cr_assert_eq(strlen(k), n);
    return k;
}

static void assert_same(const char *a, const char *b, bool same)
{
    char *ka = key(a), *kb = key(b);
    if (same)
        cr_assert_str_eq(ka, kb, "\"%s\" and \"%s\" read the same", a, b);
    else
        cr_assert_str_neq(ka, kb, "\"%s\" and \"%s\" differ", a, b);
    tly_free(ka);
    tly_free(kb);
}

Test(text, key_ignores_case_spacing_invisibles_and_normalization)
{
    assert_same("Yes", "yes", true);
    assert_same("Yes", "YES ", true);
    assert_same("Yes", "\xc2\xa0yes\xe3\x80\x80", true);
    assert_same("Yes", "Y\xe2\x80\x8b" "es", true);          /* a zero width space inside */
    assert_same("Yes", "\xef\xbb\xbfYes\xe2\x81\xa0", true); /* BOM, word joiner */
    assert_same("Caf\xc3\xa9", "Cafe\xcc\x81", true);        /* NFC and NFD */
    assert_same("CAF\xc3\x89", "cafe\xcc\x81", true);
    assert_same("Stra\xc3\x9f" "e", "STRASSE", true);         /* full case folding */
    assert_same("\xce\xa3\xce\xa3", "\xcf\x83\xcf\x82", true); /* capital sigma, final sigma */
    assert_same("New York", "New  York", true);
    assert_same("New York", "New\xc2\xa0York", true);
    assert_same("New York", "new\t york", true);
    assert_same("\xe2\x9d\xa4\xef\xb8\x8f", "\xe2\x9d\xa4", true); /* emoji or text style: one heart */
    assert_same("\xef\xac\x81" "ne", "FINE", true);                /* the fi ligature folds to "fi" */

    assert_same("Go", "Go!", false);
    assert_same("ab", "a b", false);
    assert_same("1", "\xd9\xa1", false);          /* ASCII one, Arabic-Indic one */
    assert_same("x2", "x\xc2\xb2", false);        /* superscript two is not NFC's to fold */
    assert_same("C", "C#", false);

    char *k = key(" \xe2\x80\x8b ");
    cr_assert_str_eq(k, "", "a blank text has the empty key");
    tly_free(k);
    k = key("  Hello,\xc2\xa0 W\xc3\x96RLD  ");
    cr_assert_str_eq(k, "hello, w\xc3\xb6rld");
    tly_free(k);
}

Test(text, key_out_of_memory_is_null)
{
    for (long n = 0; n < 2; n++) {
        size_t len = 7;
        tly_alloc_fail_after(n);
        char *k = tly_text_key("Hello", 5, &len);
        tly_alloc_fail_after(-1);
        cr_assert_null(k, "allocation %ld failing", n);
    }
    size_t len;
    char *k = tly_text_key("Hello", 5, &len);
    cr_assert_str_eq(k, "hello");
    tly_free(k);
}

/* ---- ids and allocation ------------------------------------------------------- */

Test(random_id, shape)
{
    char a[64], b[64];
    tly_random_id(a, "p_", 16);
    tly_random_id(b, "p_", 16);
    cr_assert_eq(strlen(a), 2 + 22);
    cr_assert(strncmp(a, "p_", 2) == 0);
    cr_assert_eq(strspn(a + 2, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), 22);
    cr_assert_str_neq(a, b);
}

/* Ids come from a per-thread keystream refilled every few hundred bytes: no id repeats
 * across refills, across threads, or across the reseed from the kernel (1,024 refills
 * of 480 bytes each: 30,000 16-byte ids cross it). */
#define IDS_PER_THREAD 40000
static char ids[2 * IDS_PER_THREAD][24]; /* the main thread's, then the other's: one array for qsort */

static void *make_ids(void *arg)
{
    char(*out)[24] = arg;
    for (size_t i = 0; i < IDS_PER_THREAD; i++)
        tly_random_id(out[i], "", 16);
    return NULL;
}

static int cmp_id(const void *a, const void *b) { return strcmp(a, b); }

Test(random_id, distinct_across_refills_and_threads)
{
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, make_ids, ids + IDS_PER_THREAD), 0);
    make_ids(ids);
    pthread_join(t, NULL);
    qsort(ids, 2 * IDS_PER_THREAD, sizeof(ids[0]), cmp_id);
    for (size_t i = 1; i < 2 * IDS_PER_THREAD; i++)
        cr_assert_str_neq(ids[i - 1], ids[i], "id %zu repeats", i);
}

Test(alloc, fail_after)
{
    tly_alloc_fail_after(2);
    void *p1 = tly_malloc(8), *p2 = tly_strdup("x"), *p3 = tly_malloc(8), *p4 = tly_calloc(1, 8);
    tly_alloc_fail_after(-1);
    cr_assert_not_null(p1);
    cr_assert_not_null(p2);
    cr_assert_null(p3);
    cr_assert_null(p4);
    void *p5 = tly_malloc(8);
    cr_assert_not_null(p5);
    tly_free(p1);
    tly_free(p2);
    tly_free(p5);
}

Test(alloc, fail_every)
{
    /* every third call fails, whichever of the three allocators it is, then never again */
    tly_alloc_fail_every(3);
    void *p[9];
    for (int i = 0; i < 9; i++)
        p[i] = i % 3 == 0 ? tly_malloc(8) : i % 3 == 1 ? tly_calloc(2, 4) : tly_realloc(NULL, 8);
    tly_alloc_fail_every(0);
    for (int i = 0; i < 9; i++) {
        if (i % 3 == 2)
            cr_assert_null(p[i], "allocation %d should have failed", i + 1);
        else
            cr_assert_not_null(p[i], "allocation %d should have succeeded", i + 1);
        tly_free(p[i]);
    }
    void *q = tly_malloc(8);
    cr_assert_not_null(q, "0 switches it off");
    tly_free(q);
}

/* Many threads taking from one budget: exactly `budget` allocations succeed. A plain
 * load-then-decrement let two threads that both saw 1 take the budget to -1, which
 * switched injection off for everyone. */
#include <pthread.h>
#include <stdatomic.h>

static atomic_int budget_ok;

static void *budget_worker(void *arg)
{
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        void *p = tly_malloc(8);
        if (p != NULL)
            atomic_fetch_add(&budget_ok, 1);
        tly_free(p);
    }
    return NULL;
}

Test(alloc, fail_after_is_exact_across_threads)
{
    pthread_t t[4];
    atomic_store(&budget_ok, 0);
    tly_alloc_fail_after(1000);
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, budget_worker, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    tly_alloc_fail_after(-1);
    cr_assert_eq(atomic_load(&budget_ok), 1000);
}

Test(alloc, failures_are_counted_per_thread)
{
    uint64_t before = tly_alloc_failures();
    void *p = tly_malloc(8);
    cr_assert_eq(tly_alloc_failures(), before, "a success does not count");
    tly_alloc_fail_after(0);
    cr_assert_null(tly_malloc(8));
    cr_assert_null(tly_realloc(p, 16), "a failed realloc leaves p alone");
    tly_alloc_fail_after(-1);
    cr_assert_eq(tly_alloc_failures(), before + 2);
    tly_free(p);
}

Test(base, hex_round_trip_and_malformed_input)
{
    const uint8_t in[] = {0x00, 0x7f, 0xa5, 0xff};
    char out[9];
    uint8_t back[4];
    tly_hex_encode(in, sizeof in, out);
    cr_assert_str_eq(out, "007fa5ff");
    cr_assert_eq(tly_hex_decode("007FA5ff", 8, back, sizeof back), 4);
    cr_assert_arr_eq(back, in, sizeof in);
    cr_assert_eq(tly_hex_decode("abc", 3, back, sizeof back), -1, "odd length");
    cr_assert_eq(tly_hex_decode("zz", 2, back, sizeof back), -1, "not hex");
    cr_assert_eq(tly_hex_decode("0011223344", 10, back, sizeof back), -1, "longer than cap");
    cr_assert_eq(tly_hex_decode("", 0, back, sizeof back), 0);
}

/* ---- join codes ------------------------------------------------------------------ */

Test(join_code, random_codes_use_the_alphabet_and_differ)
{
    char seen[2000][TLY_JOIN_CODE_LEN + 1];
    for (int i = 0; i < 2000; i++) {
        tly_join_code_random(seen[i]);
        cr_assert_eq(strlen(seen[i]), TLY_JOIN_CODE_LEN);
        cr_assert_eq(strspn(seen[i], TLY_JOIN_CODE_ALPHABET), TLY_JOIN_CODE_LEN, "%s", seen[i]);
        cr_assert_eq(strpbrk(seen[i], "0O1I"), NULL, "no look-alikes: %s", seen[i]);
    }
    qsort(seen, 2000, sizeof(seen[0]), cmp_id);
    int same = 0;
    for (int i = 1; i < 2000; i++)
        same += strcmp(seen[i - 1], seen[i]) == 0;
    cr_assert_leq(same, 1, "2,000 draws of 2^30 codes: a repeat is a 1-in-500 event, two repeats are not");
}

Test(join_code, read_as_people_type_it)
{
    char out[TLY_JOIN_CODE_LEN + 1];
    static const struct {
        const char *in, *out;
    } ok[] = {{"ABCDEF", "ABCDEF"}, {"abcdef", "ABCDEF"}, {"aBc-DeF", "ABCDEF"}, {"abc def", "ABCDEF"},
              {"-2345-67-", "234567"}, {"zzzzzz", "ZZZZZZ"}};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(ok); i++) {
        cr_assert(tly_join_code_read(ok[i].in, strlen(ok[i].in), out), "%s", ok[i].in);
        cr_assert_str_eq(out, ok[i].out);
    }
    static const char *const bad[] = {"",        "ABCDE",   "ABCDEFG", "ABCDE0",  "ABCDEO", "ABCDE1",
                                      "abcdei",  "ABC_DE",  "ABC.DE",  "ABCDÉF",  "ABC%20", "------"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++)
        cr_assert(!tly_join_code_read(bad[i], strlen(bad[i]), out), "%s", bad[i]);
    cr_assert(!tly_join_code_read("ABC\0EF", 6, out), "a NUL is no letter");
    cr_assert(!tly_join_code_read("ABCDEFABCDEF", 12, out), "no write past the code");
}
