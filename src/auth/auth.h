/*
 * auth: bearer tokens and passwords. Tokens are JWTs signed with HMAC-SHA256 (OpenSSL)
 * under the server secret; the algorithm is pinned to HS256 whatever the header says,
 * `exp` is required and checked, and signatures are compared in constant time.
 * Passwords are hashed with argon2id (libsodium).
 *
 * Thread-safety: every function may be called from any thread. Password hashing is slow
 * on purpose (tens of ms): never call it on an event-loop thread.
 */
#ifndef TALLY_AUTH_H
#define TALLY_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TLY_JWT_MAX 1024 /* longest token accepted or produced */
#define TLY_SUB_MAX 128  /* longest subject (voter id), bytes */

typedef struct {
    char sub[TLY_SUB_MAX + 1];
    int64_t iat, exp; /* seconds since the epoch */
    bool anonymous;   /* claim "anon": true on device tokens from /v1/auth/anonymous */
} tly_claims_t;

/* Signs a token {"sub","iat","exp"[,"anon":true]} with header {"alg":"HS256","typ":"JWT"}.
 * Writes it NUL-terminated into out (TLY_JWT_MAX + 1 bytes) and returns its length, or
 * TLY_EINVAL when sub is empty, longer than TLY_SUB_MAX, not UTF-8 or has control
 * characters (C0, DEL, C1), or when the key is empty. TLY_ENOMEM if jansson or OpenSSL
 * cannot allocate. On failure out is "". */
int tly_jwt_sign(const uint8_t *key, size_t keylen, const char *sub, bool anonymous, int64_t iat, int64_t exp,
                 char *out);

/* Verifies token (len bytes, not necessarily NUL-terminated) at time `now` (seconds).
 * Accepts only header alg "HS256" (a "typ" other than "JWT" is rejected), a valid
 * HMAC-SHA256 signature over "header.payload" (constant-time compare), a payload with a
 * string `sub` of 1..TLY_SUB_MAX bytes without control characters and a numeric `exp`
 * greater than now (with no leeway); `nbf` when present must be <= now. Returns 0 and
 * fills *out, or TLY_EAUTH for anything else (alg none, wrong alg, bad signature,
 * malformed base64url or JSON, missing or past exp, oversize token; also when jansson or
 * OpenSSL cannot allocate, which jansson does not always tell apart from bad syntax).
 * "exp", "iat" and "nbf" are JSON integers or reals with an integral value; "anon", when
 * present, must be a boolean; duplicate keys and a "crit" header are rejected. The
 * signature is checked before any JSON is parsed. *out is zeroed on failure. */
int tly_jwt_verify(const uint8_t *key, size_t keylen, const char *token, size_t len, int64_t now, tly_claims_t *out);

/* A key prepared for verifying many tokens (the vote path verifies one per request):
 * tly_jwt_verifier_check accepts and refuses exactly what tly_jwt_verify does under the
 * same key, at a fraction of the cost. A verifier belongs to one thread at a time (it
 * holds an OpenSSL MAC context); the caller frees it with tly_jwt_verifier_free.
 * tly_jwt_verifier_new returns 0, TLY_EINVAL for an empty key, or TLY_ENOMEM. */
typedef struct tly_jwt_verifier tly_jwt_verifier_t;
int tly_jwt_verifier_new(const uint8_t *key, size_t keylen, tly_jwt_verifier_t **out);
void tly_jwt_verifier_free(tly_jwt_verifier_t *v);
int tly_jwt_verifier_check(tly_jwt_verifier_t *v, const char *token, size_t len, int64_t now, tly_claims_t *out);

#define TLY_PWHASH_LEN 128 /* crypto_pwhash_STRBYTES */
/* Hashes password with argon2id (libsodium's interactive limits) into out. 0 or TLY_ENOMEM
 * (TLY_EINVAL only for a password over libsodium's ~4 GiB limit). */
int tly_password_hash(const char *password, size_t len, char out[TLY_PWHASH_LEN]);
/* Whether password matches hash. Constant-time in the password's content. */
bool tly_password_verify(const char *hash, const char *password, size_t len);
/* Burns about the time of one verification, so that a login for an unknown user takes
 * as long as one with a wrong password. */
void tly_password_dummy_verify(const char *password, size_t len);

#endif
