/*
 * password.c: argon2id password hashes (libsodium), stored as the self-describing
 * "$argon2id$v=19$m=...,t=...,p=...$salt$hash" string so that the cost can be raised
 * later without a schema change.
 *
 * Costs are libsodium's "interactive" limits (64 MiB, 2 passes): tens of milliseconds
 * and 64 MiB per call, which is why none of this may run on an event-loop thread.
 */
#include "auth/auth.h"
#include "base/base.h"

#include <pthread.h>
#include <sodium.h>
#include <string.h>

_Static_assert(TLY_PWHASH_LEN == crypto_pwhash_STRBYTES, "TLY_PWHASH_LEN must match libsodium");

#define OPSLIMIT crypto_pwhash_OPSLIMIT_INTERACTIVE
#define MEMLIMIT crypto_pwhash_MEMLIMIT_INTERACTIVE

/* The hash that tly_password_dummy_verify checks against: made once, of a random
 * password nobody knows, with the same costs as real hashes so that checking it takes
 * as long as checking a real one. */
static pthread_once_t dummy_once = PTHREAD_ONCE_INIT;
static char dummy_hash[TLY_PWHASH_LEN];
static bool dummy_ready;

static void dummy_init(void)
{
    unsigned char secret[32];
    if (sodium_init() < 0)
        return;
    randombytes_buf(secret, sizeof(secret));
    dummy_ready = crypto_pwhash_str_alg(dummy_hash, (const char *)secret, sizeof(secret), OPSLIMIT, MEMLIMIT,
                                        crypto_pwhash_ALG_ARGON2ID13) == 0;
    sodium_memzero(secret, sizeof(secret));
}

/* Hashes password with a fresh random salt. Returns 0, TLY_ENOMEM when libsodium could
 * not initialise or allocate its 64 MiB, or TLY_EINVAL for a password longer than
 * libsodium accepts (about 4 GiB). Any thread but an event loop's. */
int tly_password_hash(const char *password, size_t len, char out[TLY_PWHASH_LEN])
{
    if (password == NULL) {
        if (len != 0)
            return TLY_EINVAL;
        password = "";
    }
    if (len > crypto_pwhash_PASSWD_MAX)
        return TLY_EINVAL;
    if (sodium_init() < 0)
        return TLY_ENOMEM;
    if (crypto_pwhash_str_alg(out, password, len, OPSLIMIT, MEMLIMIT, crypto_pwhash_ALG_ARGON2ID13) != 0)
        return TLY_ENOMEM;
    return 0;
}

/* True only when hash is a NUL-terminated libsodium hash string (within TLY_PWHASH_LEN
 * bytes) that password matches. A malformed hash, or failure to allocate, is false. */
bool tly_password_verify(const char *hash, const char *password, size_t len)
{
    if (hash == NULL || strnlen(hash, TLY_PWHASH_LEN) == TLY_PWHASH_LEN)
        return false;
    if (password == NULL) {
        if (len != 0)
            return false;
        password = "";
    }
    if (len > crypto_pwhash_PASSWD_MAX || sodium_init() < 0)
        return false;
    return crypto_pwhash_str_verify(hash, password, len) == 0;
}

/* Verifies password against the dummy hash and throws the answer away. The first call
 * also builds the dummy hash (one extra hashing, once per process). */
void tly_password_dummy_verify(const char *password, size_t len)
{
    if (password == NULL)
        password = "", len = 0;
    if (len > crypto_pwhash_PASSWD_MAX)
        len = crypto_pwhash_PASSWD_MAX;
    pthread_once(&dummy_once, dummy_init);
    if (dummy_ready) {
        (void)!crypto_pwhash_str_verify(dummy_hash, password, len);
        return;
    }
    /* no dummy hash (out of memory at init): hashing costs about the same as verifying */
    char scratch[TLY_PWHASH_LEN];
    if (sodium_init() >= 0)
        (void)!crypto_pwhash_str_alg(scratch, password, len, OPSLIMIT, MEMLIMIT, crypto_pwhash_ALG_ARGON2ID13);
}
