/*
 * test_auth.c: bearer tokens and passwords. What a user would notice: a token we issued
 * works until it expires and then stops; a token anyone else made, or one of ours that
 * was altered, never works; a password works and a wrong one does not.
 *
 * Attack tokens are built by forge(), which signs arbitrary header and payload JSON with
 * HMAC-SHA256 under the real key. forge_control checks that forge() makes tokens the
 * server accepts, so a rejection in the other tests is the server's check working and
 * not a broken forgery.
 */
#include "auth/auth.h"
#include "base/base.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

#define NOW INT64_C(1775390400) /* 2026-04-05T12:00:00Z */
#define HS256_JWT "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"

static const uint8_t key[32] = "0123456789abcdef0123456789abcdef";
static const uint8_t other_key[32] = "fedcba9876543210fedcba9876543210";

/* Verifies at NOW both ways, one-shot and with a prepared verifier (the vote path's), and
 * asserts that they agree on the outcome and the claims. */
static int verify(const char *tok, tly_claims_t *c)
{
    int rc = tly_jwt_verify(key, sizeof(key), tok, strlen(tok), NOW, c);
    tly_jwt_verifier_t *v = NULL;
    tly_claims_t c2;
    cr_assert_eq(tly_jwt_verifier_new(key, sizeof(key), &v), 0);
    /* twice: the prepared state must come back intact after each token */
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(tly_jwt_verifier_check(v, tok, strlen(tok), NOW, &c2), rc, "verifier disagrees on %s", tok);
        cr_assert_eq(memcmp(c, &c2, sizeof(c2)), 0, "verifier's claims differ for %s", tok);
    }
    tly_jwt_verifier_free(v);
    return rc;
}

/* base64url of a string into out, returns out's length */
static size_t b64(const char *s, size_t n, char *out)
{
    return tly_b64url_encode((const uint8_t *)s, n, out);
}

/* Builds b64(header).b64(payload).b64(HMAC-SHA256(k, first two)) in out (4096 bytes). */
static void forge(const uint8_t *k, size_t klen, const char *header, const char *payload, char *out)
{
    size_t o = b64(header, strlen(header), out);
    out[o++] = '.';
    o += b64(payload, strlen(payload), out + o);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    cr_assert_not_null(HMAC(EVP_sha256(), k, (int)klen, (const unsigned char *)out, o, mac, &maclen));
    out[o++] = '.';
    tly_b64url_encode(mac, maclen, out + o);
}

/* forge under the right key, then verify at NOW */
static int forge_verify(const char *header, const char *payload, tly_claims_t *c)
{
    char tok[4096];
    forge(key, sizeof(key), header, payload, tok);
    return verify(tok, c);
}

#define GOOD_PAYLOAD "{\"sub\":\"v_alice\",\"iat\":1775390000,\"exp\":1775394000}"

Test(jwt, round_trip)
{
    char tok[TLY_JWT_MAX + 1];
    int n = tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW - 10, NOW + 3600, tok);
    cr_assert_gt(n, 0);
    cr_assert_eq((size_t)n, strlen(tok));
    cr_assert(strncmp(tok, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.", 37) == 0, "header: %s", tok);

    tly_claims_t c;
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, (size_t)n, NOW, &c), 0);
    cr_assert_str_eq(c.sub, "v_alice");
    cr_assert_eq(c.iat, NOW - 10);
    cr_assert_eq(c.exp, NOW + 3600);
    cr_assert_not(c.anonymous);
}

Test(jwt, token_need_not_be_nul_terminated)
{
    char tok[TLY_JWT_MAX + 16];
    int n = tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW, NOW + 60, tok);
    cr_assert_gt(n, 0);
    /* what follows the token in the buffer is not part of it */
    memcpy(tok + n, ".AAAA", 6);
    tly_claims_t c;
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, (size_t)n, NOW, &c), 0);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, (size_t)n - 1, NOW, &c), TLY_EAUTH);
}

Test(jwt, anonymous_claim)
{
    char tok[TLY_JWT_MAX + 1];
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "d_0f3a", true, NOW, NOW + 60, tok), 0);
    tly_claims_t c;
    cr_assert_eq(verify(tok, &c), 0);
    cr_assert(c.anonymous);
    cr_assert_str_eq(c.sub, "d_0f3a");

    /* only a JSON true means anonymous */
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"anon\":false}", &c), 0);
    cr_assert_not(c.anonymous);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"anon\":1}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"anon\":\"true\"}", &c), TLY_EAUTH);
}

Test(jwt, forge_control)
{
    tly_claims_t c;
    cr_assert_eq(forge_verify(HS256_JWT, GOOD_PAYLOAD, &c), 0);
    cr_assert_str_eq(c.sub, "v_alice");
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\"}", GOOD_PAYLOAD, &c), 0, "typ is optional");
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"kid\":\"k1\"}", GOOD_PAYLOAD, &c), 0);
}

/* Attack 1: alg none with an empty signature, built from a payload we really issued. */
Test(jwt, alg_none_rejected)
{
    char tok[TLY_JWT_MAX + 1], forged[4096];
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW, NOW + 60, tok), 0);
    const char *payload = strchr(tok, '.') + 1;
    const char *dot2 = strchr(payload, '.');

    size_t o = b64("{\"alg\":\"none\"}", 14, forged);
    forged[o++] = '.';
    memcpy(forged + o, payload, (size_t)(dot2 - payload));
    o += (size_t)(dot2 - payload);
    forged[o++] = '.';
    forged[o] = '\0';

    tly_claims_t c;
    cr_assert_eq(verify(forged, &c), TLY_EAUTH);
    cr_assert_eq(c.sub[0], '\0', "claims are cleared on failure");

    /* nor with the original signature kept, nor with "typ" added */
    forged[o] = '\0';
    strcat(forged, dot2 + 1);
    cr_assert_eq(verify(forged, &c), TLY_EAUTH);
    char tok2[4096];
    forge(key, sizeof(key), "{\"alg\":\"none\",\"typ\":\"JWT\"}", GOOD_PAYLOAD, tok2);
    cr_assert_eq(verify(tok2, &c), TLY_EAUTH);
    forge(key, sizeof(key), "{\"alg\":\"None\"}", GOOD_PAYLOAD, tok2);
    cr_assert_eq(verify(tok2, &c), TLY_EAUTH);
}

/* Attack 2: a well-formed token signed with some other key. */
Test(jwt, wrong_key_rejected)
{
    char tok[TLY_JWT_MAX + 1];
    cr_assert_gt(tly_jwt_sign(other_key, sizeof(other_key), "v_alice", false, NOW, NOW + 60, tok), 0);
    tly_claims_t c;
    cr_assert_eq(verify(tok, &c), TLY_EAUTH);
    /* a prefix of the right key is a different key */
    cr_assert_gt(tly_jwt_sign(key, sizeof(key) - 1, "v_alice", false, NOW, NOW + 60, tok), 0);
    cr_assert_eq(verify(tok, &c), TLY_EAUTH);
}

/* Attack 3: algorithm confusion. The header names another algorithm but the signature
 * is a perfectly valid HMAC-SHA256 under our key (what an attacker gets by handing a
 * public key to a library that lets the header choose). */
Test(jwt, alg_confusion_rejected)
{
    tly_claims_t c;
    cr_assert_eq(forge_verify("{\"alg\":\"RS256\",\"typ\":\"JWT\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS512\",\"typ\":\"JWT\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"hs256\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256 \"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":[\"HS256\"]}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"typ\":\"JWT\"}", GOOD_PAYLOAD, &c), TLY_EAUTH, "alg missing");
    /* a second "alg" must not override the first */
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"alg\":\"RS256\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"RS256\",\"alg\":\"HS256\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
}

/* Attack 4: a token we issued, after it expired. exp is exclusive, no leeway. */
Test(jwt, expired_rejected)
{
    char tok[TLY_JWT_MAX + 1];
    tly_claims_t c;
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW - 3600, NOW + 1, tok), 0);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, strlen(tok), NOW, &c), 0);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, strlen(tok), NOW + 1, &c), TLY_EAUTH);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, strlen(tok), NOW + 86400, &c), TLY_EAUTH);
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW - 3600, NOW - 1, tok), 0);
    cr_assert_eq(verify(tok, &c), TLY_EAUTH);
}

Test(jwt, header_rules)
{
    tly_claims_t c;
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"typ\":\"JWS\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"typ\":\"jwt\"}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"typ\":null}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}", GOOD_PAYLOAD, &c),
                 TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\",\"crit\":[]}", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("[\"HS256\"]", GOOD_PAYLOAD, &c), TLY_EAUTH, "header not an object");
    cr_assert_eq(forge_verify("\"HS256\"", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\"} ", GOOD_PAYLOAD, &c), 0, "trailing whitespace is JSON");
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\"}x", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("{\"alg\":\"HS256\"", GOOD_PAYLOAD, &c), TLY_EAUTH);
    cr_assert_eq(forge_verify("", GOOD_PAYLOAD, &c), TLY_EAUTH);
}

Test(jwt, exp_rules)
{
    tly_claims_t c;
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"iat\":1775390000}", &c), TLY_EAUTH, "missing exp");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":\"1775394000\"}", &c), TLY_EAUTH, "string");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":null}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":true}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":[1775394000]}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000.5}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1e300}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":99999999999999999999}", &c), TLY_EAUTH);
    /* a second exp must not extend the first */
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1,\"exp\":1775394000}", &c), TLY_EAUTH);

    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000.0}", &c), 0, "integral real");
    cr_assert_eq(c.exp, 1775394000);
    cr_assert_eq(c.iat, 0, "iat is optional");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1.775394e9}", &c), 0);
    cr_assert_eq(c.exp, 1775394000);

    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"iat\":\"x\"}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"nbf\":1775390401}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"nbf\":1775390400}", &c), 0);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000,\"nbf\":\"0\"}", &c), TLY_EAUTH);
}

Test(jwt, payload_rules)
{
    tly_claims_t c;
    cr_assert_eq(forge_verify(HS256_JWT, "[1775394000]", &c), TLY_EAUTH, "payload not an object");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"exp\":1775394000}", &c), TLY_EAUTH, "missing sub");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"\",\"exp\":1775394000}", &c), TLY_EAUTH, "empty sub");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":42,\"exp\":1775394000}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\\u0000b\",\"exp\":1775394000}", &c), TLY_EAUTH, "NUL");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"sub\":\"b\",\"exp\":1775394000}", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"a\",\"exp\":1775394000} x", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "", &c), TLY_EAUTH);
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"\xc3\xa9l\xc3\xa8ve\",\"exp\":1775394000}", &c), 0);
    cr_assert_str_eq(c.sub, "\xc3\xa9l\xc3\xa8ve");
    cr_assert_eq(forge_verify(HS256_JWT, "{\"sub\":\"\xc3\x28\",\"exp\":1775394000}", &c), TLY_EAUTH, "not UTF-8");
}

Test(jwt, sub_length)
{
    char sub[TLY_SUB_MAX + 2], tok[TLY_JWT_MAX + 1], payload[512];
    tly_claims_t c;
    memset(sub, 'x', TLY_SUB_MAX);
    sub[TLY_SUB_MAX] = '\0';
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), sub, false, NOW, NOW + 60, tok), 0);
    cr_assert_eq(verify(tok, &c), 0);
    cr_assert_str_eq(c.sub, sub);

    sub[TLY_SUB_MAX] = 'x';
    sub[TLY_SUB_MAX + 1] = '\0';
    cr_assert_eq(tly_jwt_sign(key, sizeof(key), sub, false, NOW, NOW + 60, tok), TLY_EINVAL);
    cr_assert_eq(tok[0], '\0');
    snprintf(payload, sizeof(payload), "{\"sub\":\"%s\",\"exp\":1775394000}", sub);
    cr_assert_eq(forge_verify(HS256_JWT, payload, &c), TLY_EAUTH);

    cr_assert_eq(tly_jwt_sign(key, sizeof(key), "", false, NOW, NOW + 60, tok), TLY_EINVAL);
    cr_assert_eq(tly_jwt_sign(key, 0, "a", false, NOW, NOW + 60, tok), TLY_EINVAL, "empty key");

    /* worst case for escaping: every byte a quote or backslash, anonymous, huge numbers */
    memset(sub, '"', TLY_SUB_MAX);
    sub[TLY_SUB_MAX] = '\0';
    int n = tly_jwt_sign(key, sizeof(key), sub, true, INT64_MIN, INT64_MAX, tok);
    cr_assert_gt(n, 0);
    cr_assert_leq(n, TLY_JWT_MAX);
    cr_assert_eq(verify(tok, &c), 0);
    cr_assert_str_eq(c.sub, sub);
    cr_assert_eq(c.iat, INT64_MIN);
    cr_assert_eq(c.exp, INT64_MAX);
}

Test(jwt, sub_control_characters)
{
    char tok[TLY_JWT_MAX + 1];
    tly_claims_t c;
    const char *bad[] = {"a\nb", "a\tb", "\x01", "a\x1b[31m", "a\x7f", "a\xc2\x85" /* U+0085 NEL */,
                         "a\xc3\x28" /* not UTF-8 */};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++)
        cr_assert_eq(tly_jwt_sign(key, sizeof(key), bad[i], false, NOW, NOW + 60, tok), TLY_EINVAL, "#%zu", i);

    const char *bad_json[] = {"a\\nb", "a\\u0001", "a\\u001b", "a\\u007f", "a\\u0085", "\\u009f"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad_json); i++) {
        char payload[256];
        snprintf(payload, sizeof(payload), "{\"sub\":\"%s\",\"exp\":1775394000}", bad_json[i]);
        cr_assert_eq(forge_verify(HS256_JWT, payload, &c), TLY_EAUTH, "%s", payload);
    }
    /* U+00A0 is printable enough; the C1 check must not catch its neighbours */
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "a\xc2\xa0" "b", false, NOW, NOW + 60, tok), 0);
    cr_assert_eq(verify(tok, &c), 0);
}

Test(jwt, malformed_base64url)
{
    char tok[TLY_JWT_MAX + 1], bad[TLY_JWT_MAX + 8];
    tly_claims_t c;
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW, NOW + 60, tok), 0);
    size_t payload_at = (size_t)(strchr(tok, '.') - tok) + 1;
    const char repl[] = {'+', '/', '=', '*', ' ', '\n'};
    for (size_t i = 0; i < sizeof(repl); i++) {
        strcpy(bad, tok);
        bad[payload_at + 3] = repl[i];
        cr_assert_eq(verify(bad, &c), TLY_EAUTH, "'%c'", repl[i]);
    }
    /* standard base64 padding on the signature */
    snprintf(bad, sizeof(bad), "%s=", tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    /* a NUL inside the token */
    strcpy(bad, tok);
    bad[payload_at + 3] = '\0';
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), bad, strlen(tok), NOW, &c), TLY_EAUTH);
}

/* Any single-character change to a token we issued makes it invalid: base64url is
 * decoded strictly (no non-zero trailing bits), so no two spellings mean the same. */
Test(jwt, every_single_change_rejected)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";
    char tok[TLY_JWT_MAX + 1], bad[TLY_JWT_MAX + 1];
    tly_claims_t c;
    int n = tly_jwt_sign(key, sizeof(key), "v_alice", true, NOW, NOW + 60, tok);
    cr_assert_gt(n, 0);
    for (int i = 0; i < n; i++) {
        for (size_t a = 0; a < sizeof(alphabet) - 1; a++) {
            if (alphabet[a] == tok[i])
                continue;
            memcpy(bad, tok, (size_t)n + 1);
            bad[i] = alphabet[a];
            cr_assert_eq(tly_jwt_verify(key, sizeof(key), bad, (size_t)n, NOW, &c), TLY_EAUTH, "pos %d '%c'", i,
                         alphabet[a]);
        }
    }
}

Test(jwt, segment_count)
{
    char tok[TLY_JWT_MAX + 1], bad[TLY_JWT_MAX + 64];
    tly_claims_t c;
    int n = tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW, NOW + 60, tok);
    cr_assert_gt(n, 0);
    char *dot2 = strrchr(tok, '.');

    /* two segments only: header.payload, with or without a trailing dot */
    snprintf(bad, sizeof(bad), "%.*s", (int)(dot2 - tok), tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    snprintf(bad, sizeof(bad), "%.*s", (int)(dot2 - tok + 1), tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    cr_assert_eq(verify("", &c), TLY_EAUTH);
    cr_assert_eq(verify(".", &c), TLY_EAUTH);
    cr_assert_eq(verify("..", &c), TLY_EAUTH);
    cr_assert_eq(verify("...", &c), TLY_EAUTH);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), NULL, 0, NOW, &c), TLY_EAUTH);

    /* a valid token followed by a garbage segment, or by an empty one */
    snprintf(bad, sizeof(bad), "%s.eyJhbGciOiJub25lIn0", tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    snprintf(bad, sizeof(bad), "%s.", tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    /* or a garbage segment in front (JWE has five segments) */
    snprintf(bad, sizeof(bad), "eyJ9.%s", tok);
    cr_assert_eq(verify(bad, &c), TLY_EAUTH);
    /* a payload whose signature is valid but with a fourth segment after it */
    char forged[4096];
    forge(key, sizeof(key), HS256_JWT, GOOD_PAYLOAD, forged);
    cr_assert_eq(verify(forged, &c), 0);
    strcat(forged, ".AAAA");
    cr_assert_eq(verify(forged, &c), TLY_EAUTH);
}

Test(jwt, oversize_token)
{
    /* a correctly signed token just over the limit, and the same shape just under */
    char payload[2048], tok[4096];
    tly_claims_t c;
    size_t fixed = strlen("{\"sub\":\"a\",\"exp\":1775394000,\"pad\":\"\"}");
    size_t hlen = (4 * strlen(HS256_JWT) + 2) / 3;
    int found_over = 0, found_under = 0;
    for (size_t pad = 600; pad < 900; pad++) {
        char padding[1024];
        memset(padding, 'p', pad);
        padding[pad] = '\0';
        snprintf(payload, sizeof(payload), "{\"sub\":\"a\",\"exp\":1775394000,\"pad\":\"%s\"}", padding);
        size_t len = hlen + 1 + (4 * (fixed + pad) + 2) / 3 + 1 + 43;
        forge(key, sizeof(key), HS256_JWT, payload, tok);
        cr_assert_eq(strlen(tok), len);
        if (len == TLY_JWT_MAX) {
            cr_assert_eq(verify(tok, &c), 0);
            found_under = 1;
        } else if (len > TLY_JWT_MAX) {
            cr_assert_eq(verify(tok, &c), TLY_EAUTH, "len %zu", len);
            found_over = 1;
        }
    }
    cr_assert(found_over && found_under);

    /* a very long header.payload.signature of garbage, and a huge length */
    char big[8192];
    memset(big, 'A', sizeof(big));
    big[100] = '.';
    big[200] = '.';
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), big, sizeof(big), NOW, &c), TLY_EAUTH);
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), big, SIZE_MAX, NOW, &c), TLY_EAUTH);
}

Test(password, hash_and_verify, .timeout = 60)
{
    char h1[TLY_PWHASH_LEN], h2[TLY_PWHASH_LEN];
    const char pw[] = "correct horse battery staple";
    cr_assert_eq(tly_password_hash(pw, strlen(pw), h1), 0);
    cr_assert(strncmp(h1, "$argon2id$", 10) == 0, "%s", h1);
    cr_assert_lt(strnlen(h1, sizeof(h1)), sizeof(h1));

    cr_assert(tly_password_verify(h1, pw, strlen(pw)));
    cr_assert_not(tly_password_verify(h1, "correct horse battery stapl", strlen(pw) - 1));
    cr_assert_not(tly_password_verify(h1, "Correct horse battery staple", strlen(pw)));
    cr_assert_not(tly_password_verify(h1, "", 0));
    /* the length is what counts, not a NUL */
    cr_assert_not(tly_password_verify(h1, "correct horse battery staple!", strlen(pw) + 1));

    /* salted: the same password hashes differently, and both verify */
    cr_assert_eq(tly_password_hash(pw, strlen(pw), h2), 0);
    cr_assert_str_neq(h1, h2);
    cr_assert(tly_password_verify(h2, pw, strlen(pw)));

    /* passwords may contain NUL bytes */
    const char nul_pw[] = {'a', '\0', 'b'};
    cr_assert_eq(tly_password_hash(nul_pw, sizeof(nul_pw), h2), 0);
    cr_assert(tly_password_verify(h2, nul_pw, sizeof(nul_pw)));
    cr_assert_not(tly_password_verify(h2, "a", 1));
}

Test(password, malformed_hash, .timeout = 60)
{
    char h[TLY_PWHASH_LEN];
    cr_assert_not(tly_password_verify("", "x", 1));
    cr_assert_not(tly_password_verify("$argon2id$garbage", "x", 1));
    cr_assert_not(tly_password_verify(NULL, "x", 1));
    /* not NUL-terminated within TLY_PWHASH_LEN */
    memset(h, 'a', sizeof(h));
    cr_assert_not(tly_password_verify(h, "x", 1));
}

static void *dummy_thread(void *arg)
{
    tly_password_dummy_verify("guess", 5);
    return arg;
}

Test(password, dummy_verify, .timeout = 60)
{
    /* the first calls race to build the dummy hash; all of them must return. How long
     * they take is for bench/, not for a test */
    pthread_t t[4];
    for (size_t i = 0; i < TLY_ARRAY_SIZE(t); i++)
        cr_assert_eq(pthread_create(&t[i], NULL, dummy_thread, NULL), 0);
    for (size_t i = 0; i < TLY_ARRAY_SIZE(t); i++)
        cr_assert_eq(pthread_join(t[i], NULL), 0);
    tly_password_dummy_verify(NULL, 0);
    tly_password_dummy_verify("", 0);
}

/* jansson's allocations fail one after another. Signing then either gives the token or
 * TLY_ENOMEM; verifying gives 0 or TLY_EAUTH (jansson reports some allocation failures
 * as syntax errors, so verify does not promise TLY_ENOMEM). Either way nothing crashes,
 * leaks (run under ASan) or comes back half-filled. */
static long jansson_budget;
static void *failing_malloc(size_t n)
{
    return jansson_budget-- > 0 ? malloc(n) : NULL;
}

Test(jwt, out_of_memory)
{
    char tok[TLY_JWT_MAX + 1], other[4096];
    tly_claims_t c;
    int n = tly_jwt_sign(key, sizeof(key), "v_alice", true, NOW, NOW + 60, tok);
    cr_assert_gt(n, 0);
    /* the same claims in an order tly_jwt_sign never writes: jansson reads this one */
    forge(key, sizeof(key), HS256_JWT, "{\"exp\":1775390460,\"anon\":true,\"sub\":\"v_alice\",\"iat\":1775390400}",
          other);
    json_set_alloc_funcs(failing_malloc, free);

    /* our own tokens are read without allocating at all */
    jansson_budget = 0;
    cr_assert_eq(tly_jwt_verify(key, sizeof(key), tok, (size_t)n, NOW, &c), 0);
    cr_assert_str_eq(c.sub, "v_alice");

    int verified = 0, signed_ok = 0, refused = 0, enomem = 0;
    for (long budget = 0; budget < 200 && !(verified && signed_ok); budget++) {
        jansson_budget = budget;
        int rc = tly_jwt_verify(key, sizeof(key), other, strlen(other), NOW, &c);
        cr_assert(rc == 0 || rc == TLY_EAUTH, "budget %ld: rc %d", budget, rc);
        if (rc == 0) {
            cr_assert_str_eq(c.sub, "v_alice");
            cr_assert(c.anonymous);
            verified = 1;
        } else {
            cr_assert_eq(c.sub[0], '\0');
            refused++;
        }

        char tok2[TLY_JWT_MAX + 1];
        jansson_budget = budget;
        rc = tly_jwt_sign(key, sizeof(key), "v_alice", true, NOW, NOW + 60, tok2);
        cr_assert(rc == n || rc == TLY_ENOMEM, "budget %ld: rc %d", budget, rc);
        if (rc == n) {
            cr_assert_str_eq(tok2, tok);
            signed_ok = 1;
        } else {
            cr_assert_eq(tok2[0], '\0');
            enomem++;
        }
    }
    json_set_alloc_funcs(malloc, free);
    cr_assert(verified && signed_ok);
    cr_assert(refused > 0 && enomem > 0, "the failure paths were reached");
}

/* Tokens in exactly the form tly_jwt_sign writes are read without jansson; the same
 * claims in any other form are read by jansson, and both readings agree on every claim
 * and on what they refuse. */
Test(jwt, our_form_and_any_form_read_alike)
{
    static const char *payloads[] = {
        "{\"sub\":\"v_alice\",\"iat\":1775390400,\"exp\":1775390460}",
        "{\"sub\":\"v_alice\",\"iat\":1775390400,\"exp\":1775390460,\"anon\":true}",
        "{\"sub\":\"v_alice\",\"iat\":1775390400,\"exp\":1775390400}",       /* expired: exp == now */
        "{\"sub\":\"\",\"iat\":1775390400,\"exp\":1775390460}",               /* empty sub */
        "{\"sub\":\"a\\u0001b\",\"iat\":1775390400,\"exp\":1775390460}",     /* escape: jansson's */
        "{\"sub\":\"a\\\"b\",\"iat\":1775390400,\"exp\":1775390460}",       /* escaped quote */
        "{\"sub\":\"caf\xc3\xa9\",\"iat\":0,\"exp\":1775390460}",             /* UTF-8, iat 0 */
        "{\"sub\":\"caf\xc3\",\"iat\":1775390400,\"exp\":1775390460}",         /* bad UTF-8 */
        "{\"sub\":\"v\",\"iat\":01,\"exp\":1775390460}",                      /* leading zero */
        "{\"sub\":\"v\",\"iat\":1,\"exp\":1775390460,\"anon\":false}",       /* anon false */
        "{\"sub\":\"v\",\"iat\":1,\"exp\":1775390460} ",                     /* trailing space */
        "{\"sub\":\"v\",\"iat\":1,\"exp\":17753904600000000000}",            /* too big */
        "{\"sub\":\"v\",\"iat\":1,\"exp\":1775390460,\"exp\":1}",            /* duplicate key */
    };
    static const int want[] = {0, 0, TLY_EAUTH, TLY_EAUTH, TLY_EAUTH, 0, 0, TLY_EAUTH, TLY_EAUTH, 0, 0, TLY_EAUTH, TLY_EAUTH};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(payloads); i++) {
        tly_claims_t c;
        int rc = forge_verify(HS256_JWT, payloads[i], &c);
        cr_assert_eq(rc, want[i], "payload %zu: %d", i, rc);
        if (rc == 0)
            cr_assert_eq(c.exp, 1775390460, "payload %zu", i);
    }
}

/* The prepared verifier refuses an empty key and tokens signed under another key, and
 * a refused token leaves it able to accept the next good one. */
Test(jwt, verifier_key_and_reuse)
{
    tly_jwt_verifier_t *v = NULL;
    cr_assert_eq(tly_jwt_verifier_new(key, 0, &v), TLY_EINVAL);
    cr_assert_null(v);
    cr_assert_eq(tly_jwt_verifier_new(key, sizeof(key), &v), 0);
    char good[TLY_JWT_MAX + 1], bad[TLY_JWT_MAX + 1];
    tly_claims_t c;
    cr_assert_gt(tly_jwt_sign(key, sizeof(key), "v_alice", false, NOW, NOW + 60, good), 0);
    cr_assert_gt(tly_jwt_sign(other_key, sizeof(other_key), "v_alice", false, NOW, NOW + 60, bad), 0);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(tly_jwt_verifier_check(v, bad, strlen(bad), NOW, &c), TLY_EAUTH);
        cr_assert_eq(tly_jwt_verifier_check(v, good, strlen(good), NOW, &c), 0);
        cr_assert_str_eq(c.sub, "v_alice");
    }
    tly_jwt_verifier_free(v);
}
