/*
 * auth.c (api): register, login, anonymous device tokens, me. Register and login sent
 * with an anonymous device token link the device to the account (link.c).
 *
 * Password hashing takes tens of milliseconds by design, so it runs on the worker
 * threads; the loop only reserves the username (so two concurrent registrations of one
 * name cannot both succeed) and commits the account through the store.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

user_t *api_user_find(tly_app_t *app, const char *user_id)
{
    user_t *u;
    HASH_FIND(hh_id, app->users_by_id, user_id, strlen(user_id), u);
    return u;
}

static user_t *user_find_name(tly_app_t *app, const char *name_key)
{
    user_t *u;
    HASH_FIND(hh_name, app->users_by_name, name_key, strlen(name_key), u);
    return u;
}

user_t *api_user_find_name(tly_app_t *app, const char *username)
{
    char key[72];
    size_t n = strlen(username);
    if (n >= sizeof(key))
        return NULL;
    for (size_t i = 0; i <= n; i++)
        key[i] = (username[i] >= 'A' && username[i] <= 'Z') ? (char)(username[i] + 32) : username[i];
    return user_find_name(app, key);
}

void api_user_add(tly_app_t *app, user_t *u)
{
    HASH_ADD_KEYPTR(hh_id, app->users_by_id, u->user_id, strlen(u->user_id), u);
    HASH_ADD_KEYPTR(hh_name, app->users_by_name, u->name_key, strlen(u->name_key), u);
}

static void user_remove(tly_app_t *app, user_t *u)
{
    HASH_DELETE(hh_id, app->users_by_id, u);
    HASH_DELETE(hh_name, app->users_by_name, u);
    tly_free(u->user_id);
    tly_free(u->username);
    tly_free(u->name_key);
    tly_free(u->password_hash);
    tly_free(u);
}

/* {"<id_field>": sub, "token", "expires_at"}, and "linked" when linked is not NULL
 * (stolen). */
static void respond_token(tly_app_t *app, tly_req_t *req, int status, const char *id_field, const char *sub,
                          bool anonymous, json_t *linked)
{
    int64_t now = tly_now_ms() / 1000, exp = now + app->conf->token_ttl;
    char token[TLY_JWT_MAX + 1], expires[TLY_TIME_LEN];
    int src = tly_jwt_sign(app->secret, app->secret_len, sub, anonymous, now, exp, token);
    if (src == TLY_ENOMEM) {
        json_decref(linked);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    if (src < 0) {
        json_decref(linked);
        api_respond_error(req, 500, "INTERNAL", "could not sign a token", NULL);
        return;
    }
    tly_time_format(exp * 1000, expires);
    json_t *body = json_pack("{s:s, s:s, s:s}", id_field, sub, "token", token, "expires_at", expires);
    if (linked != NULL && body != NULL)
        json_object_set_new(body, "linked", linked);
    else
        json_decref(linked);
    api_respond_json(req, status, body);
}

void api_respond_token(tly_app_t *app, tly_req_t *req, int status, const char *user_id, json_t *linked)
{
    respond_token(app, req, status, "user_id", user_id, false, linked);
}

/*
 * The device a register or login request links (link.c): the subject of the anonymous
 * device token in its Authorization header, in request memory. NULL when there is none
 * to link: no header, or one that is not a valid anonymous token (expired, malformed,
 * an account's token): the credentials in the body are what authenticates these
 * routes, so such a header links nothing and is otherwise ignored, as before.
 */
static const char *bearer_device(tly_app_t *app, tly_req_t *req)
{
    tly_str_t h = tly_req_header(req, "authorization");
    tly_claims_t claims;
    if (h.ptr == NULL || h.len < 7 || strncasecmp(h.ptr, "Bearer ", 7) != 0 ||
        tly_jwt_verifier_check(app->jwt, h.ptr + 7, h.len - 7, tly_now_ms() / 1000, &claims) != 0 || !claims.anonymous)
        return NULL;
    return tly_req_strdup(req, (tly_str_t){claims.sub, strlen(claims.sub)});
}

static bool valid_username(const char *s, size_t n)
{
    if (n < 3 || n > 32)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
              c == '-'))
            return false;
    }
    return true;
}

/* Reads {username, password} with the limits of registration. Answers 400 on failure. */
static bool read_credentials(tly_req_t *req, json_t *body, bool check_strength, const char **username,
                             const char **password, size_t *pwlen)
{
    json_t *u = json_object_get(body, "username"), *p = json_object_get(body, "password");
    if (!json_is_string(u)) {
        api_respond_validation(req, "username", "username must be a string");
        return false;
    }
    if (!json_is_string(p)) {
        api_respond_validation(req, "password", "password must be a string");
        return false;
    }
    *username = json_string_value(u);
    *password = json_string_value(p);
    *pwlen = json_string_length(p);
    if (check_strength) {
        if (!valid_username(*username, json_string_length(u))) {
            api_respond_validation(req, "username", "username must be 3 to 32 letters, digits, '_', '.' or '-'");
            return false;
        }
        long cps = tly_utf8_length(*password, *pwlen);
        if (cps < 8 || *pwlen > 1024 || memchr(*password, '\0', *pwlen) != NULL) {
            api_respond_validation(req, "password", "password must be 8 to 1024 characters");
            return false;
        }
        json_t *e = json_object_get(body, "email");
        if (e != NULL && !json_is_null(e) &&
            (!json_is_string(e) || json_string_length(e) > 254 || strchr(json_string_value(e), '@') == NULL)) {
            api_respond_validation(req, "email", "email must be an address like name@example.org");
            return false;
        }
    } else if (*pwlen > 1024 || json_string_length(u) > 64) {
        return true; /* checked as a failed login by the caller */
    }
    return true;
}

/* ---- register ---- */

typedef struct {
    work_t work;
    tly_store_op_t op;
    tly_app_t *app;
    tly_req_t *req;
    user_t *user;
    char *password;
    size_t pwlen;
    char *email;
    char hash[TLY_PWHASH_LEN];
    int rc;
    const char *device; /* a device to link once the account exists (request memory) */
} signup_t;

static void register_free(signup_t *r)
{
    if (r->password) {
        memset(r->password, 0, r->pwlen);
        tly_free(r->password);
    }
    tly_free(r->email);
    tly_free(r);
}

static void register_committed(tly_store_op_t *op)
{
    signup_t *r = op->ctx;
    tly_app_t *app = r->app;
    api_end_async(app);
    if (op->result == 0) {
        r->user->committed = true;
        if (r->device != NULL)
            api_link_device(app, r->req, 201, r->device, r->user->user_id, true);
        else
            respond_token(app, r->req, 201, "user_id", r->user->user_id, false, NULL);
    } else {
        user_remove(app, r->user);
        if (op->result == TLY_EEXIST)
            api_respond_error(r->req, 409, "USERNAME_TAKEN", "that username is taken", NULL);
        else
            api_respond_store_error(r->req, op->result);
    }
    register_free(r);
}

static void register_hash(work_t *w)
{
    signup_t *r = (signup_t *)w;
    r->rc = tly_password_hash(r->password, r->pwlen, r->hash);
}

static void register_hashed(work_t *w)
{
    signup_t *r = (signup_t *)w;
    if (r->rc != 0 || (r->user->password_hash = tly_strdup(r->hash)) == NULL) {
        api_end_async(r->app);
        user_remove(r->app, r->user);
        tly_req_add_header(r->req, "Retry-After", "1");
        api_respond_error(r->req, 503, "UNAVAILABLE", "out of memory", NULL);
        register_free(r);
        return;
    }
    r->op.type = TLY_OP_USER_INSERT;
    r->op.ctx = r;
    r->op.done = register_committed;
    r->op.u.user = (tly_user_row_t){.user_id = r->user->user_id,
                                    .username = r->user->username,
                                    .password_hash = r->user->password_hash,
                                    .email = r->email,
                                    .created_at = tly_now_ms()};
    tly_store_submit(r->app->store, &r->op);
}

void api_auth_register(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (!api_limit(app, req, API_LIMIT_AUTH, NULL))
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    const char *username, *password;
    size_t pwlen;
    signup_t *r = NULL;
    if (!read_credentials(req, body, true, &username, &password, &pwlen))
        goto done;
    char key[40];
    size_t n = strlen(username);
    for (size_t i = 0; i <= n; i++)
        key[i] = (username[i] >= 'A' && username[i] <= 'Z') ? (char)(username[i] + 32) : username[i];
    if (user_find_name(app, key) != NULL) {
        api_respond_error(req, 409, "USERNAME_TAKEN", "that username is taken", NULL);
        goto done;
    }
    /* a device already linked is its account's: a new account cannot take it over */
    const char *device = bearer_device(app, req);
    if (device != NULL && api_linked_user(app, device) != NULL) {
        api_respond_error(req, 409, "DEVICE_LINKED", "this device token belongs to another account; sign up without it",
                          NULL);
        goto done;
    }
    r = tly_calloc(1, sizeof(*r));
    user_t *u = tly_calloc(1, sizeof(*u));
    if (r == NULL || u == NULL) {
        tly_free(u);
        goto oom;
    }
    r->user = u;
    u->user_id = tly_malloc(24);
    u->username = tly_strdup(username);
    u->name_key = tly_strdup(key);
    r->password = tly_strndup(password, pwlen);
    r->pwlen = pwlen;
    json_t *e = json_object_get(body, "email");
    r->email = json_is_string(e) ? tly_strdup(json_string_value(e)) : NULL;
    if (u->user_id == NULL || u->username == NULL || u->name_key == NULL || r->password == NULL) {
        tly_free(u->user_id);
        tly_free(u->username);
        tly_free(u->name_key);
        tly_free(u);
        goto oom;
    }
    tly_random_id(u->user_id, "u_", 12);
    api_user_add(app, u); /* reserves the name until the insert commits or fails */
    r->app = app;
    r->req = req;
    r->device = device;
    r->work.run = register_hash;
    r->work.done = register_hashed;
    api_begin_async(app);
    api_work_submit(app, &r->work);
    json_decref(body);
    return;
oom:
    if (r)
        register_free(r);
    tly_req_add_header(req, "Retry-After", "1");
    api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
done:
    json_decref(body);
}

/* ---- login ---- */

typedef struct {
    work_t work;
    tly_app_t *app;
    tly_req_t *req;
    char *password;
    size_t pwlen;
    char *hash; /* NULL for an unknown user: verify against a dummy */
    char *user_id;
    const char *device; /* a device to link once the password is verified (request memory) */
    bool ok;
} login_t;

static void login_verify(work_t *w)
{
    login_t *l = (login_t *)w;
    if (l->hash != NULL)
        l->ok = tly_password_verify(l->hash, l->password, l->pwlen);
    else
        tly_password_dummy_verify(l->password, l->pwlen);
}

static void login_done(work_t *w)
{
    login_t *l = (login_t *)w;
    api_end_async(l->app);
    if (l->ok && l->device != NULL)
        api_link_device(l->app, l->req, 200, l->device, l->user_id, false);
    else if (l->ok)
        respond_token(l->app, l->req, 200, "user_id", l->user_id, false, NULL);
    else
        api_respond_error(l->req, 401, "INVALID_CREDENTIALS", "unknown username or wrong password", NULL);
    memset(l->password, 0, l->pwlen);
    tly_free(l->password);
    tly_free(l->hash);
    tly_free(l->user_id);
    tly_free(l);
}

void api_auth_login(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (!api_limit(app, req, API_LIMIT_AUTH, NULL))
        return;
    json_t *body = api_parse_body(req, false);
    if (body == NULL)
        return;
    const char *username, *password;
    size_t pwlen;
    if (!read_credentials(req, body, false, &username, &password, &pwlen))
        goto done;
    char key[72];
    size_t n = strlen(username);
    user_t *u = NULL;
    if (n < sizeof(key)) {
        for (size_t i = 0; i <= n; i++)
            key[i] = (username[i] >= 'A' && username[i] <= 'Z') ? (char)(username[i] + 32) : username[i];
        u = user_find_name(app, key);
        if (u != NULL && !u->committed)
            u = NULL;
    }
    if (u == NULL && api_resync(app, req)) /* registered on another instance a moment ago? */
        goto done;
    login_t *l = tly_calloc(1, sizeof(*l));
    if (l == NULL || (l->password = tly_strndup(password, pwlen > 1024 ? 1024 : pwlen)) == NULL ||
        (u != NULL &&
         ((l->hash = tly_strdup(u->password_hash)) == NULL || (l->user_id = tly_strdup(u->user_id)) == NULL))) {
        if (l) {
            tly_free(l->password);
            tly_free(l->hash);
            tly_free(l);
        }
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        goto done;
    }
    l->pwlen = pwlen > 1024 ? 1024 : pwlen;
    l->app = app;
    l->req = req;
    l->device = bearer_device(app, req);
    l->work.run = login_verify;
    l->work.done = login_done;
    api_begin_async(app);
    api_work_submit(app, &l->work);
done:
    json_decref(body);
}

/* ---- anonymous device tokens, behind a proof of work ----
 *
 * A device token costs the client a small search: find a nonce such that
 * SHA-256(challenge ":" nonce) starts with `difficulty` zero bits, so that minting
 * thousands of voters costs real CPU while one person notices little. The difficulty is
 * the address's (api_pow_difficulty, limits.c): --pow-difficulty (14: about 16,000
 * hashes, a fraction of a second in a phone's Web Worker) while the address is quiet, up
 * to --pow-max-difficulty as its recent challenges pile up. A room of a few hundred
 * phones behind one address stays at the base; a script minting thousands pays hundreds
 * of times the work per token (docs/PERFORMANCE.md, "The proof of work's curve").
 *
 * Challenges are stateless until answered: "<expiry>.<random>.<difficulty>.<mac>", the
 * mac an HMAC under the server secret of those three and of the address it was issued
 * to (its rate-limit key: the IPv4 address or IPv6 /64), so it is answered at the
 * difficulty it was issued at, from that address only. Every challenge counts toward
 * the address's level when it is issued, not when answered: challenges fetched ahead
 * at a quiet moment cost what they cost as they were fetched. An answered challenge is
 * remembered until it expires, so that it buys one token: here, and with a bus in Redis
 * too, so that it buys one token across the instances.
 */

#define POW_TTL_S 300
#define POW_MAX_USED 1000000 /* answered challenges remembered at most (~100 B each) */

static void pow_mac(tly_app_t *app, const char *body, size_t len, const char *addr_key, char out[24])
{
    unsigned char mac[32];
    unsigned int maclen = sizeof(mac);
    char msg[400];
    int n = snprintf(msg, sizeof(msg), "pow\n%.*s\n%s", (int)len, body, addr_key);
    if (n < 0 || (size_t)n >= sizeof(msg))
        n = (int)sizeof(msg) - 1; /* keys are bounded (TLY_LIMIT_KEY_MAX): not reached */
    HMAC(EVP_sha256(), app->secret, (int)app->secret_len, (const unsigned char *)msg, (size_t)n, mac, &maclen);
    tly_b64url_encode(mac, 16, out);
}

static void challenge_answer(tly_app_t *app, tly_req_t *req, int difficulty)
{
    int64_t exp = tly_now_ms() / 1000 + POW_TTL_S;
    char rnd[24], body[96], mac[24], challenge[128], expires[TLY_TIME_LEN], key[TLY_LIMIT_KEY_MAX + 1];
    tly_addr_key(tly_req_client(req), key, sizeof(key));
    tly_random_id(rnd, "", 12);
    int n = snprintf(body, sizeof(body), "%lld.%s.%d", (long long)exp, rnd, difficulty);
    pow_mac(app, body, (size_t)n, key, mac);
    snprintf(challenge, sizeof(challenge), "%s.%s", body, mac);
    tly_time_format(exp * 1000, expires);
    tly_req_add_header(req, "Cache-Control", "no-store");
    api_respond_json(req, 200,
                     json_pack("{s:s, s:i, s:s, s:s}", "challenge", challenge, "difficulty", difficulty, "algorithm",
                               "sha256-leading-zero-bits", "expires_at", expires));
}

/* Not rate limited itself: a challenge is an HMAC, cheap to make and worthless unsolved;
 * what it costs the address is a higher difficulty for its next ones, and the token it
 * buys is limited per address too (POST /v1/auth/anonymous). */
void api_auth_challenge(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    char key[TLY_LIMIT_KEY_MAX + 1];
    tly_addr_key(tly_req_client(req), key, sizeof(key));
    api_pow_difficulty(app, req, key, challenge_answer);
}

static void pow_forget_expired(tly_app_t *app, int64_t now_s)
{
    while (app->pow_head != NULL && (app->pow_head->expires < now_s || app->pow_count > POW_MAX_USED)) {
        pow_used_t *u = app->pow_head;
        app->pow_head = u->next;
        if (app->pow_head == NULL)
            app->pow_tail = NULL;
        HASH_DEL(app->pow_used, u);
        tly_free(u);
        app->pow_count--;
    }
}

void api_pow_free(tly_app_t *app)
{
    pow_used_t *u, *tmp;
    HASH_ITER(hh, app->pow_used, u, tmp) {
        HASH_DEL(app->pow_used, u);
        tly_free(u);
    }
    app->pow_head = app->pow_tail = NULL;
    app->pow_count = 0;
}

static int leading_zero_bits(const unsigned char *h, size_t n)
{
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        if (h[i] == 0) {
            bits += 8;
            continue;
        }
        for (unsigned char m = 0x80; m && !(h[i] & m); m >>= 1)
            bits++;
        break;
    }
    return bits;
}

static void pow_refuse(tly_req_t *req)
{
    api_respond_error(req, 403, "POW_FAILED",
                      "the challenge is unknown, expired, already used, was issued to another network, or the nonce "
                      "does not solve it; ask for a new one",
                      NULL);
}

/* Checks the body's answer. Returns true with the challenge's random part in rnd and
 * its expiry in *exp (now remembered here as used), or false after answering 400/403. */
static bool pow_check(tly_app_t *app, tly_req_t *req, char rnd[24], int64_t *exp)
{
    json_t *body = api_parse_body(req, true);
    if (body == NULL)
        return false;
    json_t *jc = json_object_get(body, "challenge"), *jn = json_object_get(body, "nonce");
    bool ok = false;
    if (!json_is_string(jc) || json_string_length(jc) > 200) {
        api_respond_validation(req, "challenge",
                               "an anonymous token needs a solved challenge: POST /v1/auth/challenge first");
        goto done;
    }
    const char *nonce = json_string_value(jn);
    size_t nlen = json_is_string(jn) ? json_string_length(jn) : 0;
    bool nonce_ok = nlen >= 1 && nlen <= 64;
    for (size_t i = 0; nonce_ok && i < nlen; i++)
        nonce_ok = nonce[i] >= 0x21 && nonce[i] <= 0x7e;
    if (!nonce_ok) {
        api_respond_validation(req, "nonce", "nonce must be 1 to 64 printable ASCII characters");
        goto done;
    }
    /* "<exp>.<rand>.<difficulty>.<mac>", the mac bound to the caller's address */
    const char *c = json_string_value(jc), *last = strrchr(c, '.');
    char exp_s[24] = "", mac[24], key[TLY_LIMIT_KEY_MAX + 1];
    long difficulty = -1;
    rnd[0] = '\0';
    bool shape = last != NULL && sscanf(c, "%20[0-9].%20[A-Za-z0-9_-].%ld.", exp_s, rnd, &difficulty) == 3;
    if (shape) {
        tly_addr_key(tly_req_client(req), key, sizeof(key));
        pow_mac(app, c, (size_t)(last - c), key, mac);
        shape = strlen(last + 1) == strlen(mac) && sodium_memcmp(last + 1, mac, strlen(mac)) == 0;
    }
    int64_t now_s = tly_now_ms() / 1000;
    pow_forget_expired(app, now_s);
    pow_used_t *used = NULL;
    if (shape)
        HASH_FIND_STR(app->pow_used, rnd, used);
    unsigned char h[32];
    char buf[300];
    int n = snprintf(buf, sizeof(buf), "%s:%.*s", c, (int)nlen, nonce);
    crypto_hash_sha256(h, (const unsigned char *)buf, (size_t)n);
    *exp = strtoll(exp_s, NULL, 10);
    /* a challenge below today's base (issued before a restart with a higher one) is
     * refused; one above it was issued at a busy moment and is answered at that */
    if (!shape || *exp < now_s || used != NULL || difficulty < app->conf->pow_difficulty || difficulty > 64 ||
        leading_zero_bits(h, sizeof(h)) < difficulty) {
        pow_refuse(req);
        goto done;
    }
    pow_used_t *u = tly_calloc(1, sizeof(*u));
    if (u != NULL) {
        snprintf(u->nonce_id, sizeof(u->nonce_id), "%s", rnd);
        u->expires = *exp;
        HASH_ADD_STR(app->pow_used, nonce_id, u);
        if (app->pow_tail)
            app->pow_tail->next = u;
        else
            app->pow_head = u;
        app->pow_tail = u;
        app->pow_count++;
    }
    ok = true;
done:
    json_decref(body);
    return ok;
}

static void anonymous_token(tly_app_t *app, tly_req_t *req)
{
    char voter_id[32];
    tly_random_id(voter_id, "anon_", 15);
    respond_token(app, req, 201, "voter_id", voter_id, true, NULL);
}

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
} pow_claim_t;

/* Redis's answer to the claim of an answered challenge: "OK" it was the first use
 * anywhere; nil another instance took it first. Anything else (Redis gone meanwhile):
 * this instance's memory has checked it, as without a bus. */
static void pow_claimed(void *arg, const tly_bus_reply_t *reply)
{
    pow_claim_t *cl = arg;
    tly_app_t *app = cl->app;
    api_end_async(app);
    if (app->closing) {
        tly_req_add_header(cl->req, "Retry-After", "1");
        api_respond_error(cl->req, 503, "UNAVAILABLE", "the server is shutting down", NULL);
    } else if (reply->type == TLY_BUS_NIL) {
        pow_refuse(cl->req);
    } else {
        anonymous_token(app, cl->req);
    }
}

void api_auth_anonymous(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (!api_limit(app, req, API_LIMIT_ANON, NULL))
        return;
    if (app->conf->pow_difficulty <= 0) {
        anonymous_token(app, req);
        return;
    }
    char rnd[24];
    int64_t exp;
    if (!pow_check(app, req, rnd, &exp))
        return;
    pow_claim_t *cl;
    if (app->bus != NULL && tly_bus_up(app->bus) && (cl = tly_req_alloc(req, sizeof(*cl))) != NULL) {
        char key[64], ttl[24];
        snprintf(key, sizeof(key), "tally:pow:used:%s", rnd);
        int64_t left = exp - tly_now_ms() / 1000 + 1;
        snprintf(ttl, sizeof(ttl), "%lld", (long long)(left > 1 ? left : 1));
        const char *argv[] = {"SET", key, "1", "NX", "EX", ttl};
        *cl = (pow_claim_t){.app = app, .req = req};
        api_begin_async(app);
        if (tly_bus_command_argv(app->bus, pow_claimed, cl, TLY_ARRAY_SIZE(argv), argv, NULL) == 0)
            return;
        api_end_async(app);
    }
    anonymous_token(app, req);
}

/* ---- me ---- */

void api_auth_me(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    user_t *u = caller.anonymous ? NULL : api_user_find(app, caller.id);
    json_t *o = json_pack("{s:s, s:o, s:b}", "user_id", caller.id, "username",
                          u && u->committed ? json_string(u->username) : json_null(), "anonymous", caller.anonymous);
    if (o != NULL && caller.device != NULL) /* a device token linked to the account */
        json_object_set_new(o, "device_id", json_string(caller.device));
    api_respond_json(req, 200, o);
}
