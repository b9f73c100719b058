/*
 * persist.c: between the in-memory state (core) and the store's rows. A write carries its
 * own copy of the rows it stores, because the writer thread reads them while the loop
 * goes on changing the live objects.
 */
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

static char *settings_json(const tly_poll_t *p)
{
    const tly_settings_t *s = &p->settings;
    json_t *o = json_pack(
        "{s:b, s:s, s:b, s:b, s:i, s:i, s:i, s:s}", "show_results_during_voting", s->show_results_during_voting,
        "results_visibility", tly_visibility_name(s->results_visibility), "allow_anonymous", s->allow_anonymous,
        "allow_vote_change", s->allow_vote_change, "min_choices", s->min_choices, "max_choices", s->max_choices,
        "max_score", s->max_score, "voter_check", tly_voter_check_name(s->voter_check));
    char *out = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return out;
}

/* Settings stored before voter_check existed have none: they were "token". An unknown
 * voter_check is refused (the load fails) rather than read as a weaker rule. */
static int settings_parse(const char *text, tly_settings_t *s)
{
    json_t *o = json_loads(text, 0, NULL);
    if (o == NULL)
        return TLY_EINVAL;
    const char *vis = "always", *check = "token";
    int show = 1, anon = 0, change = 0, min = 1, max = 1, score = 0;
    int rc = json_unpack(o, "{s?b, s?s, s?b, s?b, s?i, s?i, s?i, s?s}", "show_results_during_voting", &show,
                         "results_visibility", &vis, "allow_anonymous", &anon, "allow_vote_change", &change,
                         "min_choices", &min, "max_choices", &max, "max_score", &score, "voter_check", &check);
    s->voter_check = TLY_VOTER_CHECK_TOKEN;
    bool known = false;
    for (int c = TLY_VOTER_CHECK_TOKEN; rc == 0 && c <= TLY_VOTER_CHECK_TOKEN_IP; c++)
        if (strcmp(check, tly_voter_check_name((tly_voter_check_t)c)) == 0) {
            s->voter_check = (tly_voter_check_t)c;
            known = true;
        }
    if (rc == 0 && !known)
        rc = -1;
    s->show_results_during_voting = show;
    s->allow_anonymous = anon;
    s->allow_vote_change = change;
    s->min_choices = min;
    s->max_choices = max;
    s->max_score = score;
    s->results_visibility = TLY_VIS_ALWAYS;
    for (int v = TLY_VIS_ALWAYS; v <= TLY_VIS_OWNER_ONLY; v++)
        if (strcmp(vis, tly_visibility_name((tly_visibility_t)v)) == 0)
            s->results_visibility = (tly_visibility_t)v;
    json_decref(o);
    return rc == 0 ? 0 : TLY_EINVAL;
}

/* Copies strings into one block so a poll op frees with one call. */
static char *scratch_put(char **cursor, const char *s)
{
    if (s == NULL)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = *cursor;
    memcpy(d, s, n);
    *cursor += n;
    return d;
}

poll_op_t *poll_op_new(tly_app_t *app, tly_op_type_t type, const tly_poll_t *p)
{
    poll_op_t *po = tly_calloc(1, sizeof(*po));
    char *settings = settings_json(p);
    if (po == NULL || settings == NULL)
        goto fail;
    size_t need = strlen(p->poll_id) + strlen(p->owner_id) + strlen(p->title) + strlen(settings) + 8;
    if (p->description)
        need += strlen(p->description) + 1;
    if (p->idem_key)
        need += strlen(p->idem_key) + 1;
    if (p->final_json)
        need += strlen(p->final_json) + 1;
    for (size_t i = 0; i < p->noptions; i++)
        need += strlen(p->options[i].option_id) + strlen(p->options[i].text) + 2;
    po->scratch = tly_malloc(need);
    po->options = tly_calloc(p->noptions ? p->noptions : 1, sizeof(*po->options));
    if (po->scratch == NULL || po->options == NULL)
        goto fail;
    char *cur = po->scratch;
    tly_poll_row_t *r = &po->op.u.poll;
    r->poll_id = scratch_put(&cur, p->poll_id);
    r->owner_id = scratch_put(&cur, p->owner_id);
    r->title = scratch_put(&cur, p->title);
    r->description = scratch_put(&cur, p->description);
    r->settings_json = scratch_put(&cur, settings);
    r->idem_key = scratch_put(&cur, p->idem_key);
    r->final_results = scratch_put(&cur, p->final_json);
    memcpy(po->join_code, p->join_code, sizeof(po->join_code));
    r->join_code = po->join_code[0] != '\0' ? po->join_code : NULL;
    memcpy(r->body_hash, p->body_hash, 16);
    r->type = (int)p->type;
    r->status = (int)p->status;
    r->start_time = p->start_time;
    r->end_time = p->end_time;
    r->created_at = p->created_at;
    r->updated_at = p->updated_at;
    for (size_t i = 0; i < p->noptions; i++) {
        po->options[i].option_id = scratch_put(&cur, p->options[i].option_id);
        po->options[i].text = scratch_put(&cur, p->options[i].text);
        po->options[i].display_order = p->options[i].display_order;
        po->options[i].position = (int)i;
    }
    r->noptions = p->noptions;
    r->options = po->options;
    po->op.type = type;
    po->app = app;
    free(settings);
    return po;
fail:
    free(settings);
    poll_op_free(po);
    return NULL;
}

void poll_op_free(poll_op_t *po)
{
    if (po == NULL)
        return;
    poll_op_free(po->before);
    tly_free(po->final);
    tly_free(po->scratch);
    tly_free(po->options);
    tly_free(po);
}

/* ---- rows -> memory (load, and other instances' changes: follow.c) ---- */

/* Each *_from_row below returns TLY_EINVAL for a row memory cannot hold, with *why (a
 * static string) saying why: load hands it back to the store, which names the row in
 * the log (store.h, tly_store_load); follow.c logs the refusal. */

static int user_from_row(tly_app_t *app, const tly_user_row_t *row, const char **why)
{
    /* Both maps are keyed by these: a second user under either key would shadow the
     * first (logins and tokens reaching the wrong account). */
    if (api_user_find(app, row->user_id) != NULL) {
        *why = "a second row with this user_id";
        return TLY_EINVAL;
    }
    if (api_user_find_name(app, row->username) != NULL) {
        *why = "another user has this username (letters compared case-insensitively)";
        return TLY_EINVAL;
    }
    user_t *u = tly_calloc(1, sizeof(*u));
    if (u == NULL)
        return TLY_ENOMEM;
    u->user_id = tly_strdup(row->user_id);
    u->username = tly_strdup(row->username);
    u->name_key = tly_strdup(row->username);
    u->password_hash = tly_strdup(row->password_hash);
    u->committed = true;
    if (!u->user_id || !u->username || !u->name_key || !u->password_hash) {
        tly_free(u->user_id);
        tly_free(u->username);
        tly_free(u->name_key);
        tly_free(u->password_hash);
        tly_free(u);
        return TLY_ENOMEM;
    }
    for (char *c = u->name_key; *c; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c += 32;
    api_user_add(app, u);
    return 0;
}

int api_user_from_row(tly_app_t *app, const tly_user_row_t *row)
{
    const char *why;
    return user_from_row(app, row, &why);
}

/* Why a poll row cannot be a poll in memory, before anything is built; or NULL. */
static const char *poll_row_misfit(const tly_poll_row_t *row)
{
    if (strlen(row->poll_id) > TLY_POLL_ID_LEN)
        return "poll_id is longer than a poll id (16 bytes)";
    if (row->type < TLY_TYPE_SINGLE || row->type > TLY_TYPE_SCORE)
        return "type is not a poll type";
    if (row->status < TLY_STATUS_DRAFT || row->status > TLY_STATUS_CLOSED)
        return "status is not a poll status";
    if (row->noptions > TLY_MAX_OPTIONS)
        return "more options than a poll may have";
    return NULL;
}

static tly_poll_t *poll_build(const tly_poll_row_t *row, int *rc, const char **why)
{
    *rc = TLY_EINVAL;
    if ((*why = poll_row_misfit(row)) != NULL)
        return NULL;
    *rc = TLY_ENOMEM;
    tly_poll_t *p = tly_calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    snprintf(p->poll_id, sizeof(p->poll_id), "%s", row->poll_id);
    p->owner_id = tly_strdup(row->owner_id);
    p->title = tly_strdup(row->title);
    p->description = row->description ? tly_strdup(row->description) : NULL;
    p->idem_key = row->idem_key ? tly_strdup(row->idem_key) : NULL;
    memcpy(p->body_hash, row->body_hash, 16);
    p->type = (tly_poll_type_t)row->type;
    p->status = (tly_poll_status_t)row->status;
    p->start_time = row->start_time;
    p->end_time = row->end_time;
    p->created_at = row->created_at;
    p->updated_at = row->updated_at;
    p->as_of = row->created_at;
    p->results_dirty = true;
    p->noptions = row->noptions;
    p->options = tly_calloc(row->noptions ? row->noptions : 1, sizeof(*p->options));
    if (p->owner_id == NULL || p->title == NULL || p->options == NULL) {
        tly_poll_free(p);
        return NULL;
    }
    if (settings_parse(row->settings_json, &p->settings) != 0) {
        tly_poll_free(p);
        *rc = TLY_EINVAL;
        *why = "settings is not a settings object this tally can read";
        return NULL;
    }
    for (size_t i = 0; i < row->noptions; i++) {
        const tly_option_row_t *o = &row->options[i];
        size_t pos = (size_t)o->position < row->noptions ? (size_t)o->position : i;
        snprintf(p->options[pos].option_id, sizeof(p->options[pos].option_id), "%s", o->option_id);
        p->options[pos].display_order = o->display_order;
        if ((p->options[pos].text = tly_strdup(o->text)) == NULL) {
            tly_poll_free(p);
            return NULL;
        }
    }
    /* the code an open poll holds (a closed one holds none; one that does not read as a
     * code is dropped: the poll works without, and gets a new one on its next change) */
    if (row->join_code == NULL || p->status == TLY_STATUS_CLOSED || row->final_results != NULL ||
        !tly_join_code_read(row->join_code, strlen(row->join_code), p->join_code))
        p->join_code[0] = '\0';
    if (row->final_results != NULL && (*rc = tly_poll_set_final_results(p, row->final_results)) != 0) {
        if (*rc == TLY_EINVAL)
            *why = "final_results is not results this tally can read";
        tly_poll_free(p);
        return NULL;
    }
    *rc = 0;
    return p;
}

tly_poll_t *api_poll_build(const tly_poll_row_t *row, int *rc)
{
    const char *why;
    return poll_build(row, rc, &why);
}

static int poll_from_row(tly_app_t *app, const tly_poll_row_t *row, const char **why)
{
    int rc;
    if (tly_registry_find_poll(app->registry, row->poll_id) != NULL) {
        *why = "a second row with this poll_id";
        return TLY_EINVAL;
    }
    tly_poll_t *p = poll_build(row, &rc, why);
    if (p == NULL)
        return rc;
    if (tly_registry_add_poll(app->registry, p) != 0) {
        tly_poll_free(p);
        return TLY_ENOMEM;
    }
    if (p->idem_key != NULL) {
        poll_idem_t *pi = tly_calloc(1, sizeof(*pi));
        size_t klen = strlen(p->owner_id) + strlen(p->idem_key) + 2;
        if (pi != NULL && (pi->key = tly_malloc(klen)) != NULL) {
            snprintf(pi->key, klen, "%s\n%s", p->owner_id, p->idem_key);
            memcpy(pi->poll_id, p->poll_id, sizeof(pi->poll_id));
            memcpy(pi->body_hash, p->body_hash, 16);
            pi->committed = true;
            HASH_ADD_KEYPTR(hh, app->poll_idem, pi->key, strlen(pi->key), pi);
        } else {
            tly_free(pi); /* a retry of the create would make a second poll; not fatal */
        }
    }
    return 0;
}

int api_poll_from_row(tly_app_t *app, const tly_poll_row_t *row)
{
    const char *why;
    return poll_from_row(app, row, &why);
}

void api_poll_adopt(tly_app_t *app, tly_poll_t *p, tly_poll_t *from)
{
    char code[TLY_JOIN_CODE_LEN + 1];
    memcpy(code, from->join_code, sizeof(code));
    tly_poll_adopt(p, from);
    /* another poll holding it here cannot be (the store keeps codes unique and memory
     * follows it in commit order); if one did, p goes without rather than take it */
    (void)tly_registry_set_code(app->registry, p, code);
}

/* Why a ballot row does not fit poll p (as memory holds it), or NULL. */
static const char *ballot_misfit(tly_poll_t *p, const tly_ballot_row_t *row)
{
    if (row->nchoices > p->noptions || row->nchoices > TLY_MAX_OPTIONS)
        return "more choices than the poll has options";
    for (size_t i = 0; i < row->nchoices; i++)
        if (row->choices[i] >= p->noptions)
            return "a choice outside the poll's options";
    /* A score poll's ballots carry a score per choice, no other ballot does: counting
     * reads them by the poll's type. */
    if (p->type == TLY_TYPE_SCORE && row->nchoices > 0 && row->scores == NULL)
        return "a score poll's ballot without scores";
    if (p->type != TLY_TYPE_SCORE && row->scores != NULL)
        return "scores on a poll that is not a score poll";
    if (tly_poll_find_vote(p, row->voter_id) != NULL)
        return "the voter already has a ballot in this poll";
    return NULL;
}

static int ballot_from_row(tly_app_t *app, tly_poll_t *p, const tly_ballot_row_t *row, const char **why)
{
    if ((*why = ballot_misfit(p, row)) != NULL)
        return TLY_EINVAL;
    tly_ballot_t b;
    b.nchoices = row->nchoices;
    for (size_t i = 0; i < row->nchoices; i++) {
        b.choices[i] = row->choices[i];
        b.scores[i] = row->scores ? row->scores[i] : 0;
    }
    tly_vote_t *v = tly_vote_new(&b, row->voter_id, row->idem_key, row->vote_id, row->receipt, row->recorded_at);
    if (v == NULL)
        return TLY_ENOMEM;
    memcpy(v->body_hash, row->body_hash, 16);
    v->store_seq = row->seq;
    if (tly_poll_add_vote(app->registry, p, v) != 0) {
        tly_vote_free(v);
        return TLY_ENOMEM;
    }
    /* the address set of voter_check comes back from the hashes kept with the ballots;
     * the store allows one ballot per hash and poll, so a second is a damaged store */
    int rc = row->ip_hash != NULL ? tly_poll_set_vote_ip(p, v, row->ip_hash) : 0;
    if (rc != 0) {
        tly_poll_drop_vote(app->registry, p, v);
        if (rc == TLY_ENOMEM)
            return TLY_ENOMEM;
        *why = "another ballot of the poll has this ip_hash";
        return TLY_EINVAL;
    }
    tly_poll_commit_vote(p, v, row->recorded_at);
    return 0;
}

int api_ballot_from_row(tly_app_t *app, tly_poll_t *p, const tly_ballot_row_t *row)
{
    const char *why;
    return ballot_from_row(app, p, row, &why);
}

int api_request_from_row(tly_app_t *app, const tly_request_row_t *row)
{
    vote_request_t *r;
    HASH_FIND_STR(app->requests, row->request_id, r);
    if (r != NULL)
        return 0; /* a request's first final outcome wins, as in the store */
    r = tly_calloc(1, sizeof(*r));
    if (r == NULL || (r->voter_id = tly_strdup(row->voter_id)) == NULL) {
        tly_free(r);
        return TLY_ENOMEM;
    }
    snprintf(r->request_id, sizeof(r->request_id), "%s", row->request_id);
    snprintf(r->poll_id, sizeof(r->poll_id), "%s", row->poll_id);
    snprintf(r->state, sizeof(r->state), "%s", row->state);
    snprintf(r->vote_id, sizeof(r->vote_id), "%s", row->vote_id ? row->vote_id : "");
    snprintf(r->error, sizeof(r->error), "%s", row->error ? row->error : "");
    HASH_ADD_STR(app->requests, request_id, r);
    /* completed: a retry of the request finds it by its ballot (replay). One request a
     * ballot: api_request_free unlinks r from this index only when r is the one in it. */
    if (r->vote_id[0] != '\0' && api_request_of_vote(app, r->vote_id) == NULL)
        HASH_ADD(hh_vote, app->requests_by_vote, vote_id, strlen(r->vote_id), r);
    return 0;
}

vote_request_t *api_request_of_vote(tly_app_t *app, const char *vote_id)
{
    vote_request_t *r;
    HASH_FIND(hh_vote, app->requests_by_vote, vote_id, strlen(vote_id), r);
    return r;
}

void api_request_free(tly_app_t *app, vote_request_t *r)
{
    HASH_DEL(app->requests, r);
    if (r->vote_id[0] != '\0' && api_request_of_vote(app, r->vote_id) == r)
        HASH_DELETE(hh_vote, app->requests_by_vote, r);
    tly_free(r->voter_id);
    tly_free(r);
}

/* A changed ballot's first cast, from the store (after its ballot): a retry of the POST
 * that cast it replays that. 0, TLY_EINVAL (no such ballot in memory, or a choice
 * outside the poll's options) or TLY_ENOMEM. */
/* The first cast of a changed ballot (its Idempotency-Key's answer). A ballot memory did
 * not take (left out as a bad row) has nothing to attach it to: 0. */
static int cast_from_row(tly_app_t *app, const tly_ballot_row_t *row, const char **why)
{
    tly_poll_t *p = tly_registry_find_poll(app->registry, row->poll_id);
    tly_vote_t *v = p != NULL ? tly_poll_find_vote(p, row->voter_id) : NULL;
    if (v == NULL)
        return 0;
    if (row->nchoices > TLY_MAX_OPTIONS) {
        *why = "the cast names more choices than a ballot may";
        return TLY_EINVAL;
    }
    tly_ballot_t b;
    b.nchoices = row->nchoices;
    for (size_t i = 0; i < row->nchoices; i++) {
        b.choices[i] = row->choices[i];
        b.scores[i] = row->scores ? row->scores[i] : 0;
    }
    return tly_vote_set_cast(v, &b, row->recorded_at);
}

/* ---- loading ---- */

typedef struct {
    tly_app_t *app;
    size_t users, links, polls, ballots, requests, retracted;
} load_t;

/* The store's load callbacks: TLY_EINVAL with *why for a row memory cannot hold, which
 * the store then reports (or leaves out, with --skip-bad-rows). */
static int load_user(void *ctx, const tly_user_row_t *row, const char **why)
{
    load_t *l = ctx;
    int rc = user_from_row(l->app, row, why);
    l->users += rc == 0;
    return rc;
}

static int load_link(void *ctx, const tly_device_link_row_t *row, const char **why)
{
    load_t *l = ctx;
    int rc = api_link_from_row(l->app, row, why);
    l->links += rc == 0;
    return rc;
}

static int load_poll(void *ctx, const tly_poll_row_t *row, const char **why)
{
    load_t *l = ctx;
    int rc = poll_from_row(l->app, row, why);
    l->polls += rc == 0;
    return rc;
}

static int load_ballot(void *ctx, const tly_ballot_row_t *row, const char **why)
{
    load_t *l = ctx;
    /* the store hands over only ballots of polls it handed over and this took */
    tly_poll_t *p = tly_registry_find_poll(l->app->registry, row->poll_id);
    int rc = TLY_EINVAL;
    if (p == NULL)
        *why = "no poll with this poll_id";
    else
        rc = ballot_from_row(l->app, p, row, why);
    l->ballots += rc == 0;
    return rc;
}

static int load_request(void *ctx, const tly_request_row_t *row, const char **why)
{
    load_t *l = ctx;
    int rc = api_request_from_row(l->app, row);
    l->requests += rc == 0;
    return rc;
}

static int load_retracted(void *ctx, const tly_retracted_row_t *row, const char **why)
{
    load_t *l = ctx;
    int rc = api_remember_retracted_key(l->app, row->poll_id, row->voter_id, row->idem_key, row->body_hash, row->at);
    l->retracted += rc == 0;
    return rc;
}

static int load_cast(void *ctx, const tly_ballot_row_t *row, const char **why)
{
    load_t *l = ctx;
    return cast_from_row(l->app, row, why);
}

int api_load(tly_app_t *app)
{
    load_t l = {.app = app};
    tly_store_load_cb_t cb = {.user = load_user,
                              .link = load_link,
                              .poll = load_poll,
                              .ballot = load_ballot,
                              .request = load_request,
                              .retracted = load_retracted,
                              .retracted_since = tly_now_ms() - app->conf->retracted_key_ttl * 1000,
                              .cast = load_cast,
                              .skip_bad_rows = app->conf->skip_bad_rows,
                              .skip_quick_check = app->conf->skip_quick_check};
    int64_t t0 = tly_now_ms();
    int rc = tly_store_load(app->store, &cb, &l);
    if (rc < 0)
        return rc;
    char users[24], links[24], polls[24], ballots[24], requests[24], retracted[24], left_out[24], ms[24];
    snprintf(users, sizeof(users), "%zu", l.users);
    snprintf(links, sizeof(links), "%zu", l.links);
    snprintf(polls, sizeof(polls), "%zu", l.polls);
    snprintf(ballots, sizeof(ballots), "%zu", l.ballots);
    snprintf(requests, sizeof(requests), "%zu", l.requests);
    snprintf(retracted, sizeof(retracted), "%zu", l.retracted);
    snprintf(left_out, sizeof(left_out), "%d", rc);
    snprintf(ms, sizeof(ms), "%lld", (long long)(tly_now_ms() - t0));
    /* rows left out (--skip-bad-rows): each was logged; this says the server runs
     * without them */
    tly_log(rc > 0 ? TLY_LOG_WARN : TLY_LOG_INFO, "store loaded", "users", users, "device_links", links, "polls", polls,
            "ballots", ballots, "requests", requests, "retracted_keys", retracted, "bad_rows_left_out", left_out, "ms",
            ms, NULL);
    return 0;
}
