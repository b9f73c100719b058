/*
 * ballot.c: reading a vote body into a tly_ballot_t for each poll type, and writing a
 * stored vote back out as JSON.
 *
 * Choice sets (single, multiple, approval) and score maps are kept in ascending option
 * index order, so two ballots with the same content are byte-for-byte equal; a ranking
 * keeps the voter's order, which is its content.
 */
#include "core/core_int.h"

#include <string.h>

static tly_ballot_result_t bad(tly_ballot_result_t r, const char *field, const char *msg, const char **err_field,
                               const char **err_msg)
{
    if (err_field != NULL)
        *err_field = field;
    if (err_msg != NULL)
        *err_msg = msg;
    return r;
}

static void sort_choices(tly_ballot_t *b)
{
    for (size_t i = 1; i < b->nchoices; i++) {
        uint8_t c = b->choices[i], s = b->scores[i];
        size_t j = i;
        while (j > 0 && b->choices[j - 1] > c) {
            b->choices[j] = b->choices[j - 1];
            b->scores[j] = b->scores[j - 1];
            j--;
        }
        b->choices[j] = c;
        b->scores[j] = s;
    }
}

/* The choice-count limits of p's settings, made sane for a poll loaded with odd ones. */
static void choice_limits(const tly_poll_t *p, size_t *min, size_t *max)
{
    *min = p->settings.min_choices < 1 ? 1 : (size_t)p->settings.min_choices;
    *max = p->settings.max_choices < 1 ? p->noptions : (size_t)p->settings.max_choices;
    if (p->type == TLY_TYPE_SINGLE)
        *min = *max = 1;
}

/* An array of distinct option ids ("option_ids" or "ranking") within the choice limits. */
static tly_ballot_result_t parse_id_list(const tly_poll_t *p, json_t *arr, const char *field, tly_ballot_t *out,
                                         const char **err_field, const char **err_msg)
{
    if (!json_is_array(arr))
        return bad(TLY_BALLOT_INVALID, field, "must be an array of option ids", err_field, err_msg);
    size_t n = json_array_size(arr), min, max;
    choice_limits(p, &min, &max);
    if (n > TLY_MAX_OPTIONS || n > max)
        return bad(TLY_BALLOT_INVALID, field, "too many choices for this poll (see settings.max_choices)", err_field,
                   err_msg);
    bool seen[TLY_MAX_OPTIONS] = {false};
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_string(v))
            return bad(TLY_BALLOT_INVALID, field, "must be an array of option id strings", err_field, err_msg);
        int idx = tly_poll_option_index(p, json_string_value(v));
        if (idx < 0)
            return bad(TLY_BALLOT_UNKNOWN_OPTION, field, "no option with that id in this poll", err_field, err_msg);
        if (seen[idx])
            return bad(TLY_BALLOT_INVALID, field, "an option may appear only once", err_field, err_msg);
        seen[idx] = true;
        out->choices[out->nchoices++] = (uint8_t)idx;
    }
    if (n < min)
        return bad(TLY_BALLOT_INVALID, field, "too few choices for this poll (see settings.min_choices)", err_field,
                   err_msg);
    return TLY_BALLOT_OK;
}

static tly_ballot_result_t parse_single(const tly_poll_t *p, json_t *body, tly_ballot_t *out, const char **err_field,
                                        const char **err_msg)
{
    json_t *id = json_object_get(body, "option_id"), *ids = json_object_get(body, "option_ids");
    if (id != NULL && ids != NULL)
        return bad(TLY_BALLOT_INVALID, "option_ids", "send option_id or option_ids, not both", err_field, err_msg);
    if (ids != NULL)
        return parse_id_list(p, ids, "option_ids", out, err_field, err_msg);
    if (id == NULL)
        return bad(TLY_BALLOT_INVALID, "option_id", "option_id is required", err_field, err_msg);
    if (!json_is_string(id))
        return bad(TLY_BALLOT_INVALID, "option_id", "option_id must be a string", err_field, err_msg);
    int idx = tly_poll_option_index(p, json_string_value(id));
    if (idx < 0)
        return bad(TLY_BALLOT_UNKNOWN_OPTION, "option_id", "no option with that id in this poll", err_field, err_msg);
    out->choices[0] = (uint8_t)idx;
    out->nchoices = 1;
    return TLY_BALLOT_OK;
}

static tly_ballot_result_t parse_scores(const tly_poll_t *p, json_t *body, tly_ballot_t *out, const char **err_field,
                                        const char **err_msg)
{
    json_t *obj = json_object_get(body, "scores");
    if (obj == NULL)
        return bad(TLY_BALLOT_INVALID, "scores", "scores is required", err_field, err_msg);
    if (!json_is_object(obj))
        return bad(TLY_BALLOT_INVALID, "scores", "scores must be an object of option id to score", err_field, err_msg);
    size_t n = json_object_size(obj), min, max;
    choice_limits(p, &min, &max);
    if (n > TLY_MAX_OPTIONS || n > max)
        return bad(TLY_BALLOT_INVALID, "scores", "too many options scored (see settings.max_choices)", err_field,
                   err_msg);
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        int idx = tly_poll_option_index(p, key);
        if (idx < 0)
            return bad(TLY_BALLOT_UNKNOWN_OPTION, "scores", "no option with that id in this poll", err_field, err_msg);
        if (!json_is_integer(v))
            return bad(TLY_BALLOT_INVALID, "scores", "each score must be an integer", err_field, err_msg);
        json_int_t s = json_integer_value(v);
        if (s < 0 || s > p->settings.max_score || s > TLY_MAX_SCORE_LIMIT)
            return bad(TLY_BALLOT_INVALID, "scores", "each score must be from 0 to settings.max_score", err_field,
                       err_msg);
        out->choices[out->nchoices] = (uint8_t)idx;
        out->scores[out->nchoices] = (uint8_t)s;
        out->nchoices++;
    }
    if (n < min)
        return bad(TLY_BALLOT_INVALID, "scores", "too few options scored (see settings.min_choices)", err_field,
                   err_msg);
    sort_choices(out);
    return TLY_BALLOT_OK;
}

tly_ballot_result_t tly_ballot_parse(const tly_poll_t *p, json_t *body, tly_ballot_t *out, const char **err_field,
                                     const char **err_msg)
{
    memset(out, 0, sizeof(*out));
    bad(TLY_BALLOT_OK, NULL, NULL, err_field, err_msg);
    if (!json_is_object(body))
        return bad(TLY_BALLOT_INVALID, "body", "the body must be a JSON object", err_field, err_msg);
    tly_ballot_result_t r;
    switch (p->type) {
    case TLY_TYPE_SINGLE:
        r = parse_single(p, body, out, err_field, err_msg);
        break;
    case TLY_TYPE_MULTIPLE:
    case TLY_TYPE_APPROVAL: {
        json_t *ids = json_object_get(body, "option_ids");
        if (ids == NULL)
            return bad(TLY_BALLOT_INVALID, "option_ids", "option_ids is required", err_field, err_msg);
        r = parse_id_list(p, ids, "option_ids", out, err_field, err_msg);
        break;
    }
    case TLY_TYPE_RANKED: {
        json_t *ids = json_object_get(body, "ranking");
        if (ids == NULL)
            return bad(TLY_BALLOT_INVALID, "ranking", "ranking is required", err_field, err_msg);
        return parse_id_list(p, ids, "ranking", out, err_field, err_msg); /* order is the content */
    }
    case TLY_TYPE_SCORE:
        return parse_scores(p, body, out, err_field, err_msg);
    default:
        return bad(TLY_BALLOT_INVALID, "body", "this poll does not take ballots", err_field, err_msg);
    }
    if (r == TLY_BALLOT_OK)
        sort_choices(out);
    return r;
}

static json_t *option_id_json(const tly_poll_t *p, uint8_t idx)
{
    return json_string(idx < p->noptions ? p->options[idx].option_id : "");
}

json_t *tly_ballot_to_json(const tly_poll_t *p, const tly_vote_t *v)
{
    const uint8_t *c = core_vote_choices(v), *s = core_vote_scores(v);
    if (p->type == TLY_TYPE_SINGLE && v->nchoices == 1)
        return json_pack("{s:o}", "option_id", option_id_json(p, c[0]));
    if (p->type == TLY_TYPE_SCORE) {
        json_t *o = json_object();
        for (size_t i = 0; o != NULL && i < v->nchoices; i++)
            if (c[i] < p->noptions && json_object_set_new(o, p->options[c[i]].option_id, json_integer(s[i])) != 0) {
                json_decref(o);
                o = NULL;
            }
        return o == NULL ? NULL : json_pack("{s:o}", "scores", o);
    }
    json_t *arr = json_array();
    for (size_t i = 0; arr != NULL && i < v->nchoices; i++)
        if (json_array_append_new(arr, option_id_json(p, c[i])) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    if (arr == NULL)
        return NULL;
    return json_pack("{s:o}", p->type == TLY_TYPE_RANKED ? "ranking" : "option_ids", arr);
}

/* The option ids of a ballot of n choices c with scores s (see tly_vote_option_ids). */
static json_t *option_ids(const tly_poll_t *p, size_t n, const uint8_t *c, const uint8_t *s)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr != NULL && i < n; i++) {
        if (p->type == TLY_TYPE_SCORE && s[i] == 0)
            continue;
        if (json_array_append_new(arr, option_id_json(p, c[i])) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    return arr;
}

json_t *tly_vote_option_ids(const tly_poll_t *p, const tly_vote_t *v)
{
    return option_ids(p, v->nchoices, core_vote_choices(v), core_vote_scores(v));
}

json_t *tly_vote_cast_option_ids(const tly_poll_t *p, const tly_vote_t *v, int64_t *cast_at)
{
    const struct tly_vote_cast *c = v->cast;
    if (c == NULL) {
        *cast_at = v->recorded_at;
        return tly_vote_option_ids(p, v);
    }
    *cast_at = c->recorded_at;
    return option_ids(p, c->nchoices, c->data, c->data + c->nchoices);
}
