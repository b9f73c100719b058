/*
 * auth.c (api): register, login, anonymous device tokens, me.
 *
 * Password hashing takes tens of milliseconds by design, so it runs on the worker
 * threads; the loop only reserves the username (so two concurrent registrations of one
 * name cannot both succeed) and commits the account through the store.
 */
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

/* {"<id_field>": sub, "token", "expires_at"} */
static void respond_token(tly_app_t *app, tly_req_t *req, int status, const char *id_field, const char *sub,
                          bool anonymous)
{
    int64_t now = tly_now_ms() / 1000, exp = now + app->conf->token_ttl;
    char token[TLY_JWT_MAX + 1], expires[TLY_TIME_LEN];
    if (tly_jwt_sign(app->secret, app->secret_len, sub, anonymous, now, exp, token) < 0) {
        api_respond_error(req, 500, "INTERNAL", "could not sign a token", NULL);
        return;
    }
    tly_time_format(exp * 1000, expires);
    api_respond_json(req, status, json_pack("{s:s, s:s, s:s}", id_field, sub, "token", token, "expires_at", expires));
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
        respond_token(app, r->req, 201, "user_id", r->user->user_id, false);
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
    char *hash;    /* NULL for an unknown user: verify against a dummy */
    char *user_id;
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
    if (l->ok)
        respond_token(l->app, l->req, 200, "user_id", l->user_id, false);
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
    login_t *l = tly_calloc(1, sizeof(*l));
    if (l == NULL || (l->password = tly_strndup(password, pwlen > 1024 ? 1024 : pwlen)) == NULL ||
        (u != NULL && ((l->hash = tly_strdup(u->password_hash)) == NULL ||
                       (l->user_id = tly_strdup(u->user_id)) == NULL))) {
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
    l->work.run = login_verify;
    l->work.done = login_done;
    api_begin_async(app);
    api_work_submit(app, &l->work);
done:
    json_decref(body);
}

/* ---- anonymous device tokens ---- */

void api_auth_anonymous(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    if (!api_limit(app, req, API_LIMIT_ANON, NULL))
        return;
    char voter_id[32];
    tly_random_id(voter_id, "anon_", 15);
    respond_token(app, req, 201, "voter_id", voter_id, true);
}

/* ---- me ---- */

void api_auth_me(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return;
    user_t *u = caller.anonymous ? NULL : api_user_find(app, caller.id);
    api_respond_json(req, 200,
                     json_pack("{s:s, s:o, s:b}", "user_id", caller.id, "username",
                               u && u->committed ? json_string(u->username) : json_null(), "anonymous",
                               caller.anonymous));
}
