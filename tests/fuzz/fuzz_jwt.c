/*
 * fuzz_jwt.c: libFuzzer harness for bearer-token verification (tly_jwt_verify).
 *
 * Two modes, chosen by the first byte:
 *   >= 8 (every real token starts with 'e'): the whole input is the token, verified
 *        with a fixed key at a fixed time. Signatures cannot be guessed, so this mode
 *        exercises framing, base64url and the signature check; tokens in the seed
 *        corpus that are correctly signed also reach the claims.
 *   <  8: the rest of the input is JSON that the harness encodes and signs correctly
 *        under the key (with OpenSSL's HMAC: tly_jwt_sign only signs the claims it
 *        makes), so every input reaches the header and claim checks. Bit 2 set: the
 *        rest is "<header JSON>\n<payload JSON>"; clear: the rest is the payload and
 *        the header is {"alg":"HS256","typ":"JWT"}. Bits 0-1 pick `now` (a fixed time,
 *        0, INT64_MAX or INT64_MIN) so the time comparisons meet their edges. Here the
 *        harness also knows what the answer must be and compares it with an
 *        independent reading of auth.h's rules.
 *
 * In both modes an accepted token must have a header whose alg is exactly "HS256", a
 * correct HMAC-SHA256 under the key, an integral exp greater than now and claims equal
 * to the payload's; a refusal must leave *out zeroed. Anything else abort()s.
 */
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth/auth.h"
#include "base/base.h"

#define NOW INT64_C(1775390400) /* 2026-04-05T12:00:00Z, as in tests/unit/test_auth.c */
#define HS256_JWT "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);              \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

static const uint8_t key[32] = "0123456789abcdef0123456789abcdef";

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    json_set_alloc_funcs(tly_malloc, tly_free); /* as main.c does */
    json_object_seed(1);
    return 0;
}

/* ---- the harness's own base64url, so it does not test the code with itself ---- */

static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t enc(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = acc << 8 | in[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = b64chars[acc >> bits & 63];
        }
    }
    if (bits > 0)
        out[o++] = b64chars[acc << (6 - bits) & 63];
    return o;
}

/* Strict unpadded base64url (leftover bits zero); -1 when not. out: 3 * n / 4 + 1. */
static long dec(const char *in, size_t n, uint8_t *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    if (n % 4 == 1)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const char *c = in[i] ? memchr(b64chars, in[i], 64) : NULL;
        if (c == NULL)
            return -1;
        acc = acc << 6 | (uint32_t)(c - b64chars);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    if (bits > 0 && (acc & ((1u << bits) - 1)) != 0)
        return -1;
    return (long)o;
}

/* ---- what auth.h says an acceptable token is ---- */

static json_t *segment_json(const char *seg, size_t n)
{
    uint8_t *buf = malloc(n + 1);
    CHECK(buf != NULL);
    long len = dec(seg, n, buf);
    json_t *v = len > 0 ? json_loadb((const char *)buf, (size_t)len, JSON_REJECT_DUPLICATES, NULL) : NULL;
    free(buf);
    if (v != NULL && !json_is_object(v)) {
        json_decref(v);
        v = NULL;
    }
    return v;
}

/* "exp", "iat", "nbf": a JSON integer, or a real with an integral value that fits int64. */
static bool numeric_date(const json_t *v, int64_t *out)
{
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (!json_is_real(v))
        return false;
    double d = json_real_value(v);
    if (!isfinite(d) || floor(d) != d || d < -0x1p63 || d >= 0x1p63)
        return false;
    *out = (int64_t)d;
    return true;
}

static bool sub_ok(const char *s, size_t n)
{
    if (n == 0 || n > TLY_SUB_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7F)
            return false;
        if (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] >= 0x80 && (unsigned char)s[i + 1] <= 0x9F)
            return false; /* U+0080..U+009F */
    }
    return true; /* jansson strings are valid UTF-8 already */
}

/*
 * The expected answer for token (whose signature the caller knows to be right or
 * wrong): true and *want filled when the header and payload follow the rules.
 */
static bool expected(const char *tok, size_t len, bool sig_ok, int64_t now, tly_claims_t *want)
{
    memset(want, 0, sizeof(*want));
    if (!sig_ok || len == 0 || len > TLY_JWT_MAX)
        return false;
    const char *d1 = memchr(tok, '.', len);
    const char *d2 = d1 ? memchr(d1 + 1, '.', (size_t)(tok + len - d1 - 1)) : NULL;
    if (d2 == NULL || memchr(d2 + 1, '.', (size_t)(tok + len - d2 - 1)) != NULL)
        return false;
    bool ok = false;
    json_t *h = segment_json(tok, (size_t)(d1 - tok));
    json_t *p = segment_json(d1 + 1, (size_t)(d2 - d1 - 1));
    if (h == NULL || p == NULL)
        goto done;
    json_t *alg = json_object_get(h, "alg"), *typ = json_object_get(h, "typ");
    if (!json_is_string(alg) || strcmp(json_string_value(alg), "HS256") != 0 ||
        (typ != NULL && (!json_is_string(typ) || strcmp(json_string_value(typ), "JWT") != 0)) ||
        json_object_get(h, "crit") != NULL)
        goto done;
    json_t *sub = json_object_get(p, "sub"), *anon = json_object_get(p, "anon");
    json_t *iat = json_object_get(p, "iat"), *nbf = json_object_get(p, "nbf");
    int64_t exp = 0, iat_v = 0, nbf_v = 0;
    if (!json_is_string(sub) || !sub_ok(json_string_value(sub), json_string_length(sub)) ||
        !numeric_date(json_object_get(p, "exp"), &exp) || exp <= now || (iat && !numeric_date(iat, &iat_v)) ||
        (nbf && (!numeric_date(nbf, &nbf_v) || nbf_v > now)) || (anon && !json_is_boolean(anon)))
        goto done;
    memcpy(want->sub, json_string_value(sub), json_string_length(sub));
    want->exp = exp;
    want->iat = iat_v;
    want->anonymous = json_is_true(anon);
    ok = true;
done:
    json_decref(h);
    json_decref(p);
    return ok;
}

/* ---- what must hold whatever the input ---- */

static bool signature_is_right(const char *tok, size_t len)
{
    const char *d2 = NULL;
    for (size_t i = len; i > 0; i--)
        if (tok[i - 1] == '.') {
            d2 = tok + i - 1;
            break;
        }
    if (d2 == NULL)
        return false;
    uint8_t got[64], want[EVP_MAX_MD_SIZE];
    unsigned int wlen = 0;
    size_t slen = (size_t)(tok + len - d2 - 1);
    if (slen > 80 || dec(d2 + 1, slen, got) != 32)
        return false;
    CHECK(HMAC(EVP_sha256(), key, sizeof(key), (const uint8_t *)tok, (size_t)(d2 - tok), want, &wlen) != NULL);
    return wlen == 32 && memcmp(got, want, 32) == 0;
}

static void verify_and_check(const char *tok, size_t len, int64_t now, bool oracle)
{
    tly_claims_t got, want;
    memset(&got, 0xA5, sizeof(got)); /* garbage: a refusal must zero it */
    int rc = tly_jwt_verify(key, sizeof(key), tok, len, now, &got);
    CHECK(rc == 0 || rc == TLY_EAUTH);
    bool should = expected(tok, len, (rc == 0 || oracle) && signature_is_right(tok, len), now, &want);
    if (rc != 0) {
        static const tly_claims_t zero;
        CHECK(memcmp(&got, &zero, sizeof(zero)) == 0);
        if (oracle && should) {
            fprintf(stderr, "a token the rules accept was refused\n");
            abort();
        }
        return;
    }
    /* accepted: it must be ours, HS256, unexpired, and say what its payload says */
    CHECK(signature_is_right(tok, len));
    if (!should) {
        fprintf(stderr, "a token the rules refuse was accepted\n");
        abort();
    }
    const char *d1 = memchr(tok, '.', len);
    json_t *h = segment_json(tok, (size_t)(d1 - tok));
    CHECK(h != NULL);
    CHECK(json_is_string(json_object_get(h, "alg")));
    CHECK(strcmp(json_string_value(json_object_get(h, "alg")), "HS256") == 0);
    json_decref(h);
    CHECK(got.exp > now);
    CHECK(strnlen(got.sub, sizeof(got.sub)) <= TLY_SUB_MAX && got.sub[0] != '\0');
    CHECK(strcmp(got.sub, want.sub) == 0 && got.exp == want.exp && got.iat == want.iat &&
          got.anonymous == want.anonymous);
}

/* ---- structured mode: sign what the fuzzer wrote ---- */

static void structured(uint8_t mode, const uint8_t *data, size_t size)
{
    static const int64_t nows[4] = {NOW, 0, INT64_MAX, INT64_MIN};
    const uint8_t *hdr = (const uint8_t *)HS256_JWT, *pay = data;
    size_t hlen = sizeof(HS256_JWT) - 1, plen = size;
    if (mode & 4) {
        const uint8_t *nl = memchr(data, '\n', size);
        if (nl == NULL)
            return;
        hdr = data;
        hlen = (size_t)(nl - data);
        pay = nl + 1;
        plen = size - hlen - 1;
    }
    /* larger than TLY_JWT_MAX is refused before decoding; keep a little beyond it */
    if (hlen > TLY_JWT_MAX || plen > TLY_JWT_MAX)
        return;
    char tok[4 * (2 * TLY_JWT_MAX + 32) / 3 + 64];
    size_t o = enc(hdr, hlen, tok);
    tok[o++] = '.';
    o += enc(pay, plen, tok + o);
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    CHECK(HMAC(EVP_sha256(), key, sizeof(key), (const uint8_t *)tok, o, mac, &maclen) != NULL && maclen == 32);
    tok[o++] = '.';
    o += enc(mac, 32, tok + o);
    verify_and_check(tok, o, nows[mode & 3], true);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 0 && data[0] < 8) {
        structured(data[0], data + 1, size - 1);
        return 0;
    }
    /* libFuzzer's buffer is exactly `size` bytes, not NUL-terminated, like the
     * Authorization header value the server hands to verify */
    verify_and_check((const char *)data, size, NOW, false);
    return 0;
}
