/*
 * poll.c: polls. Building one from a create request, applying a PATCH, the poll object
 * of API.md, and the status rules. Validation is shared by create and PATCH so that
 * both accept and refuse exactly the same values.
 */
#include "core/core_int.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

static const char *const type_names[] = {"single", "multiple", "approval", "ranked", "score"};
static const char *const status_names[] = {"draft", "active", "closed"};
static const char *const vis_names[] = {"always", "after_vote", "after_close", "owner_only"};
static const char *const voter_check_names[] = {"token", "ip", "token+ip"};

const char *tly_poll_type_name(tly_poll_type_t t)
{
    return (unsigned)t < TLY_ARRAY_SIZE(type_names) ? type_names[t] : "unknown";
}

const char *tly_poll_status_name(tly_poll_status_t s)
{
    return (unsigned)s < TLY_ARRAY_SIZE(status_names) ? status_names[s] : "unknown";
}

const char *tly_visibility_name(tly_visibility_t v)
{
    return (unsigned)v < TLY_ARRAY_SIZE(vis_names) ? vis_names[v] : "unknown";
}

const char *tly_voter_check_name(tly_voter_check_t c)
{
    return (unsigned)c < TLY_ARRAY_SIZE(voter_check_names) ? voter_check_names[c] : "unknown";
}

/* Index of s in names, or -1 (also for a non-string). */
static int name_index(const char *const *names, size_t n, json_t *v)
{
    if (!json_is_string(v))
        return -1;
    const char *s = json_string_value(v);
    for (size_t i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0)
            return (int)i;
    return -1;
}

/* ---- errors ---- */

int core_fail(core_err_t *e, const char *field, const char *msg)
{
    if (e->field != NULL)
        *e->field = field;
    if (e->msg != NULL)
        *e->msg = msg;
    return TLY_EINVAL;
}

int core_fail_at(core_err_t *e, const char *array, size_t idx, const char *suffix, const char *msg)
{
    const char *field = array;
    if (e->buf != NULL && e->len > 0) {
        int n = snprintf(e->buf, e->len, "%s[%zu]%s", array, idx, suffix);
        if (n >= 0 && (size_t)n < e->len)
            field = e->buf;
    }
    return core_fail(e, field, msg);
}

int core_oom(core_err_t *e)
{
    core_fail(e, NULL, NULL);
    return TLY_ENOMEM;
}

/* ---- field checks ---- */

typedef struct {
    const char *type, *empty, *too_long;
} text_msgs_t;

static const text_msgs_t title_msgs = {
    "title must be a string",
    "title must not be empty: it has no visible character (only spaces, or invisible or format characters)",
    "title must be at most " CORE_STR(TLY_TITLE_MAX) " characters"};
static const text_msgs_t description_msgs = {
    "description must be a string or null", NULL,
    "description must be at most " CORE_STR(TLY_DESCRIPTION_MAX) " characters"};
static const text_msgs_t option_msgs = {
    "option text must be a string",
    "option text must not be empty: it has no visible character (only spaces, or invisible or format characters)",
    "option text must be at most " CORE_STR(TLY_OPTION_TEXT_MAX) " characters"};

/*
 * Checks user text: a JSON string of valid UTF-8 without NUL bytes. A name (a title or
 * an option text: m->empty set) loses the White_Space at either end (tly_text_trim;
 * the rest is kept as typed) and must keep a visible character (tly_text_is_blank:
 * spaces, zero-width and format characters alone are empty); a description is taken
 * as given. At most `max` code points, counted on what is kept. Returns the text kept
 * (inside v's string) with its length in *len, or NULL with *msg set.
 */
static const char *check_text(json_t *v, long max, const text_msgs_t *m, size_t *len, const char **msg)
{
    if (!json_is_string(v)) {
        *msg = m->type;
        return NULL;
    }
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (memchr(s, '\0', n) != NULL || tly_utf8_length(s, n) < 0) {
        *msg = "text must be valid UTF-8 without NUL characters";
        return NULL;
    }
    if (m->empty != NULL) {
        size_t start;
        n = tly_text_trim(s, n, &start);
        s += start;
        if (tly_text_is_blank(s, n)) {
            *msg = m->empty;
            return NULL;
        }
    }
    if (tly_utf8_length(s, n) > max) {
        *msg = m->too_long;
        return NULL;
    }
    *len = n;
    return s;
}

/* An optional time: absent or null gives 0 (unset). */
static int parse_time(json_t *v, int64_t *out)
{
    *out = 0;
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_string(v) || tly_time_parse(json_string_value(v), out) != 0)
        return TLY_EINVAL;
    return 0;
}

/* ---- options ---- */

static void options_free(tly_option_t *opts, size_t n)
{
    if (opts == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        tly_free(opts[i].text);
    tly_free(opts);
}

typedef struct {
    const char *text;
    size_t len;
    int order;
} option_item_t;

/*
 * Whether one of the n texts looks like another to a reader (tly_text_key: the same up
 * to case, spacing, invisible characters and Unicode normalization): the index of the
 * later one of the first such pair found into *dup. 0, or TLY_ENOMEM.
 */
static int find_duplicate(const option_item_t *items, size_t n, bool *found, size_t *dup)
{
    char *keys[TLY_MAX_OPTIONS];
    size_t lens[TLY_MAX_OPTIONS], made = 0;
    int rc = 0;
    *found = false;
    for (; made < n; made++)
        if ((keys[made] = tly_text_key(items[made].text, items[made].len, &lens[made])) == NULL) {
            rc = TLY_ENOMEM;
            goto done;
        }
    for (size_t i = 1; i < n && !*found; i++)
        for (size_t j = 0; j < i && !*found; j++)
            if (lens[i] == lens[j] && memcmp(keys[i], keys[j], lens[i]) == 0) {
                *found = true;
                *dup = i;
            }
done:
    for (size_t i = 0; i < made; i++)
        tly_free(keys[i]);
    return rc;
}

/*
 * Parses the options array: 2..100 objects {"text", "display_order"?}, display_order
 * defaulting to the array index. Texts are kept as check_text leaves them (trimmed) and
 * must differ to a reader (find_duplicate): "Yes", "yes " and "YES" are one option.
 * The result is sorted by display_order, stably (equal orders keep their array order),
 * with fresh option ids unique within the poll.
 */
static int parse_options(json_t *arr, core_err_t *e, tly_option_t **out, size_t *nout)
{
    if (!json_is_array(arr))
        return core_fail(e, "options", "options must be an array of {\"text\": ...} objects");
    size_t n = json_array_size(arr);
    if (n < TLY_MIN_OPTIONS || n > TLY_MAX_OPTIONS)
        return core_fail(e, "options",
                         "a poll needs " CORE_STR(TLY_MIN_OPTIONS) " to " CORE_STR(TLY_MAX_OPTIONS) " options");
    option_item_t items[TLY_MAX_OPTIONS];
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(arr, i);
        if (!json_is_object(o))
            return core_fail_at(e, "options", i, "", "each option must be an object with a text");
        json_t *t = json_object_get(o, "text");
        if (t == NULL)
            return core_fail_at(e, "options", i, ".text", "option text is required");
        const char *msg;
        const char *s = check_text(t, TLY_OPTION_TEXT_MAX, &option_msgs, &items[i].len, &msg);
        if (s == NULL)
            return core_fail_at(e, "options", i, ".text", msg);
        items[i].text = s;
        json_t *d = json_object_get(o, "display_order");
        if (d == NULL || json_is_null(d)) {
            items[i].order = (int)i;
        } else if (!json_is_integer(d) || json_integer_value(d) < INT_MIN || json_integer_value(d) > INT_MAX) {
            return core_fail_at(e, "options", i, ".display_order", "display_order must be an integer");
        } else {
            items[i].order = (int)json_integer_value(d);
        }
    }
    bool found;
    size_t dup;
    if (find_duplicate(items, n, &found, &dup) != 0)
        return core_oom(e);
    if (found)
        return core_fail_at(e, "options", dup, ".text",
                            "option texts must be unique: this one reads the same as an earlier option (compared "
                            "ignoring case, spacing and invisible characters)");
    /* insertion sort: stable, and n is at most 100 */
    for (size_t i = 1; i < n; i++) {
        option_item_t cur = items[i];
        size_t j = i;
        while (j > 0 && items[j - 1].order > cur.order) {
            items[j] = items[j - 1];
            j--;
        }
        items[j] = cur;
    }
    tly_option_t *opts = tly_calloc(n, sizeof(*opts));
    if (opts == NULL)
        return core_oom(e);
    for (size_t i = 0; i < n; i++) {
        opts[i].text = tly_strndup(items[i].text, items[i].len);
        if (opts[i].text == NULL) {
            options_free(opts, n);
            return core_oom(e);
        }
        opts[i].display_order = items[i].order;
        bool unique;
        do {
            tly_random_id(opts[i].option_id, "", 6);
            unique = true;
            for (size_t j = 0; j < i; j++)
                if (strcmp(opts[j].option_id, opts[i].option_id) == 0)
                    unique = false;
        } while (!unique);
    }
    *out = opts;
    *nout = n;
    return 0;
}

/* ---- settings ---- */

static int parse_bool(json_t *obj, const char *key, const char *field, core_err_t *e, bool *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    if (!json_is_boolean(v))
        return core_fail(e, field, "must be true or false");
    *out = json_is_true(v);
    return 0;
}

/* An integer setting, clamped into [-1, 1000] so that out-of-range values still fail
 * the range checks later without overflowing an int. */
static int parse_int(json_t *obj, const char *key, const char *field, core_err_t *e, int *out, bool *present)
{
    json_t *v = json_object_get(obj, key);
    if (present != NULL)
        *present = v != NULL;
    if (v == NULL)
        return 0;
    if (!json_is_integer(v))
        return core_fail(e, field, "must be an integer");
    json_int_t x = json_integer_value(v);
    *out = x < -1 ? -1 : x > 1000 ? 1000 : (int)x;
    return 0;
}

/* Applies a settings object (absent or null: nothing) on top of *s. */
static int parse_settings(json_t *obj, tly_poll_type_t type, core_err_t *e, tly_settings_t *s, bool *has_min,
                          bool *has_max)
{
    *has_min = *has_max = false;
    if (obj == NULL || json_is_null(obj))
        return 0;
    if (!json_is_object(obj))
        return core_fail(e, "settings", "settings must be an object");
    int rc;
    if ((rc = parse_bool(obj, "show_results_during_voting", "settings.show_results_during_voting", e,
                         &s->show_results_during_voting)) != 0 ||
        (rc = parse_bool(obj, "allow_anonymous", "settings.allow_anonymous", e, &s->allow_anonymous)) != 0 ||
        (rc = parse_bool(obj, "allow_vote_change", "settings.allow_vote_change", e, &s->allow_vote_change)) != 0)
        return rc;
    json_t *vis = json_object_get(obj, "results_visibility");
    if (vis != NULL) {
        int i = name_index(vis_names, TLY_ARRAY_SIZE(vis_names), vis);
        if (i < 0)
            return core_fail(e, "settings.results_visibility",
                             "results_visibility must be always, after_vote, after_close or owner_only");
        s->results_visibility = (tly_visibility_t)i;
    }
    json_t *vc = json_object_get(obj, "voter_check");
    if (vc != NULL) {
        int i = name_index(voter_check_names, TLY_ARRAY_SIZE(voter_check_names), vc);
        if (i < 0)
            return core_fail(e, "settings.voter_check", "voter_check must be token, ip or token+ip");
        s->voter_check = (tly_voter_check_t)i;
    }
    if ((rc = parse_int(obj, "min_choices", "settings.min_choices", e, &s->min_choices, has_min)) != 0 ||
        (rc = parse_int(obj, "max_choices", "settings.max_choices", e, &s->max_choices, has_max)) != 0)
        return rc;
    int max_score = s->max_score;
    if ((rc = parse_int(obj, "max_score", "settings.max_score", e, &max_score, NULL)) != 0)
        return rc;
    /* max_score means nothing for other types: type-checked above, then ignored */
    if (type == TLY_TYPE_SCORE) {
        if (max_score < 1 || max_score > TLY_MAX_SCORE_LIMIT)
            return core_fail(e, "settings.max_score", "max_score must be from 1 to " CORE_STR(TLY_MAX_SCORE_LIMIT));
        s->max_score = max_score;
    }
    return 0;
}

/* min/max choices against the type and the number of options. */
static int check_choices(tly_poll_type_t type, size_t noptions, const tly_settings_t *s, core_err_t *e)
{
    if (type == TLY_TYPE_SINGLE) {
        if (s->min_choices != 1)
            return core_fail(e, "settings.min_choices", "a single-choice poll takes exactly one choice");
        if (s->max_choices != 1)
            return core_fail(e, "settings.max_choices", "a single-choice poll takes exactly one choice");
        return 0;
    }
    if (s->min_choices < 1 || (size_t)s->min_choices > noptions)
        return core_fail(e, "settings.min_choices", "min_choices must be from 1 to the number of options");
    if (s->max_choices < 1 || (size_t)s->max_choices > noptions)
        return core_fail(e, "settings.max_choices", "max_choices must be from 1 to the number of options");
    if (s->min_choices > s->max_choices)
        return core_fail(e, "settings.min_choices", "min_choices must not exceed max_choices");
    return 0;
}

static void settings_defaults(tly_poll_type_t type, size_t noptions, tly_settings_t *s)
{
    s->show_results_during_voting = true;
    s->results_visibility = TLY_VIS_ALWAYS;
    s->allow_anonymous = false;
    s->allow_vote_change = false;
    s->min_choices = 1;
    s->max_choices = type == TLY_TYPE_SINGLE ? 1 : (int)noptions;
    s->max_score = type == TLY_TYPE_SCORE ? 5 : 0;
    s->voter_check = TLY_VOTER_CHECK_TOKEN;
}

/* ---- create ---- */

tly_poll_t *tly_poll_from_json(json_t *body, const char *owner_id, int64_t now, const char **err_field,
                               const char **err_msg, char *err_buf, size_t err_buf_len)
{
    core_err_t e = {err_field, err_msg, err_buf, err_buf_len};
    core_fail(&e, NULL, NULL);
    tly_option_t *opts = NULL;
    size_t nopts = 0;
    tly_poll_t *p = NULL;
    const char *msg;
    size_t title_len = 0, desc_len = 0;

    if (!json_is_object(body)) {
        core_fail(&e, "body", "the body must be a JSON object");
        goto fail;
    }
    json_t *v = json_object_get(body, "title");
    if (v == NULL) {
        core_fail(&e, "title", "title is required");
        goto fail;
    }
    const char *title = check_text(v, TLY_TITLE_MAX, &title_msgs, &title_len, &msg);
    if (title == NULL) {
        core_fail(&e, "title", msg);
        goto fail;
    }
    const char *desc = NULL;
    v = json_object_get(body, "description");
    if (v != NULL && !json_is_null(v) &&
        (desc = check_text(v, TLY_DESCRIPTION_MAX, &description_msgs, &desc_len, &msg)) == NULL) {
        core_fail(&e, "description", msg);
        goto fail;
    }
    tly_poll_type_t type = TLY_TYPE_SINGLE;
    v = json_object_get(body, "type");
    if (v != NULL && !json_is_null(v)) {
        int t = name_index(type_names, TLY_ARRAY_SIZE(type_names), v);
        if (t < 0) {
            core_fail(&e, "type", "type must be single, multiple, approval, ranked or score");
            goto fail;
        }
        type = (tly_poll_type_t)t;
    }
    tly_poll_status_t status = TLY_STATUS_ACTIVE;
    v = json_object_get(body, "status");
    if (v != NULL && !json_is_null(v)) {
        int s = name_index(status_names, TLY_ARRAY_SIZE(status_names), v);
        if (s != TLY_STATUS_DRAFT && s != TLY_STATUS_ACTIVE) {
            core_fail(&e, "status", "a new poll's status must be draft or active");
            goto fail;
        }
        status = (tly_poll_status_t)s;
    }
    int64_t start = 0, end = 0;
    if (parse_time(json_object_get(body, "start_time"), &start) != 0) {
        core_fail(&e, "start_time", "start_time must be an RFC 3339 time such as 2026-04-05T10:00:00Z, or null");
        goto fail;
    }
    if (parse_time(json_object_get(body, "end_time"), &end) != 0) {
        core_fail(&e, "end_time", "end_time must be an RFC 3339 time such as 2026-04-12T10:00:00Z, or null");
        goto fail;
    }
    if (start != 0 && end != 0 && end <= start) {
        core_fail(&e, "end_time", "end_time must be after start_time");
        goto fail;
    }
    if (end != 0 && end <= now) {
        core_fail(&e, "end_time", "end_time must be in the future");
        goto fail;
    }
    v = json_object_get(body, "options");
    if (v == NULL) {
        core_fail(&e, "options", "options are required");
        goto fail;
    }
    if (parse_options(v, &e, &opts, &nopts) != 0)
        goto fail;
    tly_settings_t settings;
    bool has_min, has_max;
    settings_defaults(type, nopts, &settings);
    if (parse_settings(json_object_get(body, "settings"), type, &e, &settings, &has_min, &has_max) != 0 ||
        check_choices(type, nopts, &settings, &e) != 0)
        goto fail;

    p = tly_calloc(1, sizeof(*p));
    if (p == NULL)
        goto oom;
    tly_random_id(p->poll_id, "", 12);
    p->owner_id = tly_strdup(owner_id != NULL ? owner_id : "");
    p->title = tly_strndup(title, title_len);
    p->description = desc != NULL ? tly_strndup(desc, desc_len) : NULL;
    p->options = opts;
    p->noptions = nopts;
    opts = NULL;
    if (p->owner_id == NULL || p->title == NULL || (desc != NULL && p->description == NULL))
        goto oom;
    if (type == TLY_TYPE_SCORE && (p->score_sum = tly_calloc(2 * nopts, sizeof(uint64_t))) == NULL)
        goto oom;
    p->type = type;
    p->status = status;
    p->created_at = p->updated_at = p->as_of = now;
    p->start_time = start;
    p->end_time = end;
    p->settings = settings;
    core_results_changed(p);
    return p;
oom:
    core_oom(&e);
fail:
    options_free(opts, nopts);
    tly_poll_free(p);
    return NULL;
}

/* ---- PATCH ---- */

static bool transition_allowed(tly_poll_status_t from, tly_poll_status_t to)
{
    return from == to || (from == TLY_STATUS_DRAFT && to != TLY_STATUS_DRAFT) ||
           (from == TLY_STATUS_ACTIVE && to == TLY_STATUS_CLOSED);
}

int tly_poll_patch(tly_poll_t *p, json_t *body, int64_t now, const char **err_field, const char **err_msg,
                   char *err_buf, size_t err_buf_len)
{
    core_err_t e = {err_field, err_msg, err_buf, err_buf_len};
    core_fail(&e, NULL, NULL);
    int rc = TLY_EINVAL;
    char *title = NULL, *desc = NULL;
    tly_option_t *opts = NULL;
    size_t nopts = 0;
    uint64_t *score_sum = NULL;
    const char *msg;
    size_t len;

    if (!json_is_object(body)) {
        core_fail(&e, "body", "the body must be a JSON object");
        goto fail;
    }
    json_t *v = json_object_get(body, "type");
    if (v != NULL && name_index(type_names, TLY_ARRAY_SIZE(type_names), v) != (int)p->type) {
        core_fail(&e, "type", "a poll's type cannot change");
        goto fail;
    }
    if ((v = json_object_get(body, "title")) != NULL) {
        const char *s = check_text(v, TLY_TITLE_MAX, &title_msgs, &len, &msg);
        if (s == NULL) {
            core_fail(&e, "title", msg);
            goto fail;
        }
        if ((title = tly_strndup(s, len)) == NULL)
            goto oom;
    }
    json_t *dv = json_object_get(body, "description");
    if (dv != NULL && !json_is_null(dv)) {
        const char *s = check_text(dv, TLY_DESCRIPTION_MAX, &description_msgs, &len, &msg);
        if (s == NULL) {
            core_fail(&e, "description", msg);
            goto fail;
        }
        if ((desc = tly_strndup(s, len)) == NULL)
            goto oom;
    }
    /* what readers see now: an active poll past its end_time is closed, for good */
    tly_poll_status_t current = tly_poll_effective_status(p, now);
    bool closed = current == TLY_STATUS_CLOSED;
    tly_poll_status_t status = p->status;
    if ((v = json_object_get(body, "status")) != NULL) {
        int s = name_index(status_names, TLY_ARRAY_SIZE(status_names), v);
        if (s < 0) {
            core_fail(&e, "status", "status must be draft, active or closed");
            goto fail;
        }
        if (!transition_allowed(current, (tly_poll_status_t)s)) {
            core_fail(&e, "status",
                      !closed                          ? "an active poll cannot go back to draft"
                      : p->status == TLY_STATUS_CLOSED ? "a closed poll cannot be reopened"
                                                       : "this poll closed when its end_time passed and cannot be "
                                                         "reopened");
            rc = TLY_ESTATE;
            goto fail;
        }
        status = (tly_poll_status_t)s;
    }
    int64_t start = p->start_time, end = p->end_time;
    json_t *sv = json_object_get(body, "start_time"), *ev = json_object_get(body, "end_time");
    if (sv != NULL && parse_time(sv, &start) != 0) {
        core_fail(&e, "start_time", "start_time must be an RFC 3339 time such as 2026-04-05T10:00:00Z, or null");
        goto fail;
    }
    if (ev != NULL && parse_time(ev, &end) != 0) {
        core_fail(&e, "end_time", "end_time must be an RFC 3339 time such as 2026-04-12T10:00:00Z, or null");
        goto fail;
    }
    /* moving end_time (later, or to null) would reopen a closed poll */
    if (ev != NULL && closed && end != p->end_time) {
        core_fail(&e, "end_time", "a closed poll's end_time cannot change");
        rc = TLY_ESTATE;
        goto fail;
    }
    if (start != 0 && end != 0 && end <= start) {
        if (ev != NULL)
            core_fail(&e, "end_time", "end_time must be after start_time");
        else
            core_fail(&e, "start_time", "start_time must be before end_time");
        goto fail;
    }
    /* closing early is done with status; a new end_time must lie ahead */
    if (ev != NULL && end != p->end_time && end != 0 && end <= now) {
        core_fail(&e, "end_time", "end_time must be in the future (set status to closed to close now)");
        goto fail;
    }
    bool has_votes = p->votes != NULL;
    size_t n = p->noptions;
    if ((v = json_object_get(body, "options")) != NULL) {
        if (has_votes) {
            core_fail(&e, "options", "options cannot change once a vote exists");
            rc = TLY_EEXIST;
            goto fail;
        }
        if (closed) {
            core_fail(&e, "options", "a closed poll's options cannot change");
            rc = TLY_ESTATE;
            goto fail;
        }
        if ((rc = parse_options(v, &e, &opts, &nopts)) != 0)
            goto fail;
        rc = TLY_EINVAL;
        n = nopts;
    }
    tly_settings_t settings = p->settings;
    bool has_min, has_max;
    if (parse_settings(json_object_get(body, "settings"), p->type, &e, &settings, &has_min, &has_max) != 0)
        goto fail;
    if (opts != NULL && p->type != TLY_TYPE_SINGLE && !has_max &&
        ((size_t)settings.max_choices == p->noptions || (size_t)settings.max_choices > n))
        settings.max_choices = (int)n; /* it was the default (all options): keep it so */
    if (check_choices(p->type, n, &settings, &e) != 0)
        goto fail;
    /* ballots already cast were validated against these: they stay as they are */
    if (has_votes) {
        const char *frozen = settings.min_choices != p->settings.min_choices   ? "settings.min_choices"
                             : settings.max_choices != p->settings.max_choices ? "settings.max_choices"
                             : settings.max_score != p->settings.max_score     ? "settings.max_score"
                                                                               : NULL;
        if (frozen != NULL) {
            core_fail(&e, frozen, "min_choices, max_choices and max_score cannot change once a vote exists");
            rc = TLY_EEXIST;
            goto fail;
        }
        /* the ballots standing were admitted under the old rule, and only ballots cast
         * under an address rule have their address in the set */
        if (settings.voter_check != p->settings.voter_check) {
            core_fail(&e, "settings.voter_check", "voter_check cannot change once a vote exists");
            rc = TLY_EEXIST;
            goto fail;
        }
    }
    if (opts != NULL && p->type == TLY_TYPE_SCORE && (score_sum = tly_calloc(2 * n, sizeof(uint64_t))) == NULL)
        goto oom;

    /* everything is valid and allocated: apply */
    if (title != NULL) {
        tly_free(p->title);
        p->title = title;
    }
    if (dv != NULL) {
        tly_free(p->description);
        p->description = desc;
    }
    if (opts != NULL) {
        options_free(p->options, p->noptions);
        p->options = opts;
        p->noptions = nopts;
        if (score_sum != NULL) {
            tly_free(p->score_sum);
            p->score_sum = score_sum;
        }
        tly_free(p->ranked_pairs); /* laid out per option too; come with the first ballot */
        p->ranked_pairs = NULL;
        core_timeline_reset(p); /* laid out per option; no ballot is counted in it */
    }
    p->status = status;
    p->start_time = start;
    p->end_time = end;
    p->settings = settings;
    /* the rankings' rows are as long as max_choices allows: laid out again while none is
     * counted (on failure the next count builds them) */
    if (p->type == TLY_TYPE_RANKED && p->ranked != NULL && p->total_votes == 0)
        (void)core_ranked_build(p);
    p->updated_at = now;
    core_results_changed(p);
    p->edits++;
    return 0;
oom:
    rc = core_oom(&e);
fail:
    tly_free(title);
    tly_free(desc);
    options_free(opts, nopts);
    tly_free(score_sum);
    return rc;
}

/* ---- another instance's change ---- */

#define SWAP(a, b)                                                                                                     \
    do {                                                                                                               \
        __typeof__(a) t_ = (a);                                                                                        \
        (a) = (b);                                                                                                     \
        (b) = t_;                                                                                                      \
    } while (0)

void tly_poll_adopt(tly_poll_t *p, tly_poll_t *from)
{
    SWAP(p->title, from->title);
    SWAP(p->description, from->description);
    if (from->final_json != NULL)
        SWAP(p->final_json, from->final_json);
    p->status = from->status;
    p->start_time = from->start_time;
    p->end_time = from->end_time;
    p->updated_at = from->updated_at;
    p->settings = from->settings;
    if (p->votes == NULL && p->total_votes == 0) {
        /* no ballot refers to an option position yet: the option list may change */
        SWAP(p->options, from->options);
        SWAP(p->noptions, from->noptions);
        tly_free(p->score_sum);
        p->score_sum = NULL; /* recomputed from the (no) ballots when rendering */
        /* laid out for the old options: the pairs come with the first ballot, the
         * rankings are laid out again (on failure the next count builds them) */
        tly_free(p->ranked_pairs);
        p->ranked_pairs = NULL;
        core_ranked_drop(p);
        if (p->type == TLY_TYPE_RANKED)
            (void)core_ranked_build(p);
        core_timeline_reset(p);
    } else {
        for (size_t i = 0; i < p->noptions && i < from->noptions; i++) {
            SWAP(p->options[i].text, from->options[i].text);
            p->options[i].display_order = from->options[i].display_order;
        }
    }
    core_results_changed(p);
    p->results_final = false;
    p->seq++;
    p->edits++;
    tly_poll_free(from);
}

#undef SWAP

/* ---- the rest ---- */

void tly_poll_free(tly_poll_t *p)
{
    if (p == NULL)
        return;
    core_ip_votes_clear(p);
    tly_vote_t *v, *tmp;
    HASH_ITER(hh, p->votes, v, tmp) {
        HASH_DELETE(hh, p->votes, v);
        tly_vote_free(v);
    }
    options_free(p->options, p->noptions);
    tly_free(p->owner_id);
    tly_free(p->title);
    tly_free(p->description);
    tly_free(p->idem_key);
    tly_free(p->results_json);
    tly_free(p->score_sum);
    tly_free(p->ranked_pairs);
    core_ranked_drop(p);
    tly_free(p->final_json);
    core_timeline_reset(p);
    tly_free(p);
}

tly_poll_status_t tly_poll_effective_status(const tly_poll_t *p, int64_t now)
{
    tly_poll_status_t s = p->status;
    /* a draft with a start_time is scheduled: it opens by itself when that time comes */
    if (s == TLY_STATUS_DRAFT && p->start_time != 0 && now >= p->start_time)
        s = TLY_STATUS_ACTIVE;
    if (s == TLY_STATUS_ACTIVE && p->end_time != 0 && now >= p->end_time)
        s = TLY_STATUS_CLOSED;
    return s;
}

bool tly_poll_accepts_votes(const tly_poll_t *p, int64_t now)
{
    return tly_poll_effective_status(p, now) == TLY_STATUS_ACTIVE && (p->start_time == 0 || now >= p->start_time);
}

int tly_poll_option_index(const tly_poll_t *p, const char *option_id)
{
    for (size_t i = 0; i < p->noptions; i++)
        if (strcmp(p->options[i].option_id, option_id) == 0)
            return (int)i;
    return -1;
}

static json_t *time_or_null(int64_t ms)
{
    if (ms == 0)
        return json_null();
    char buf[TLY_TIME_LEN];
    tly_time_format(ms, buf);
    return json_string(buf);
}

json_t *tly_poll_to_json(const tly_poll_t *p, int64_t now)
{
    json_t *opts = json_array();
    if (opts == NULL)
        return NULL;
    for (size_t i = 0; i < p->noptions; i++) {
        const tly_option_t *o = &p->options[i];
        if (json_array_append_new(opts, json_pack("{s:s, s:s, s:i}", "option_id", o->option_id, "text",
                                                  o->text ? o->text : "", "display_order", o->display_order)) != 0) {
            json_decref(opts);
            return NULL;
        }
    }
    const tly_settings_t *s = &p->settings;
    json_t *settings =
        json_pack("{s:b, s:s, s:b, s:b, s:i, s:i, s:s}", "show_results_during_voting", s->show_results_during_voting,
                  "results_visibility", tly_visibility_name(s->results_visibility), "allow_anonymous",
                  s->allow_anonymous, "allow_vote_change", s->allow_vote_change, "min_choices", s->min_choices,
                  "max_choices", s->max_choices, "voter_check", tly_voter_check_name(s->voter_check));
    if (settings != NULL && p->type == TLY_TYPE_SCORE &&
        json_object_set_new(settings, "max_score", json_integer(s->max_score)) != 0) {
        json_decref(settings);
        settings = NULL;
    }
    char created[TLY_TIME_LEN], updated[TLY_TIME_LEN];
    tly_time_format(p->created_at, created);
    tly_time_format(p->updated_at, updated);
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    /* a closed poll has no code, even while it still holds one until it is settled */
    json_t *code = p->join_code[0] != '\0' && status != TLY_STATUS_CLOSED ? json_string(p->join_code) : json_null();
    /* json_pack releases the "o" values itself when it fails */
    return json_pack("{s:s, s:s, s:s, s:o, s:s, s:o, s:o, s:o, s:s, s:o, s:s, s:s, s:o}", "poll_id", p->poll_id,
                     "owner_id", p->owner_id ? p->owner_id : "", "title", p->title ? p->title : "", "description",
                     p->description ? json_string(p->description) : json_null(), "type", tly_poll_type_name(p->type),
                     "options", opts, "start_time", time_or_null(p->start_time), "end_time", time_or_null(p->end_time),
                     "status", tly_poll_status_name(status), "settings", settings, "created_at", created, "updated_at",
                     updated, "join_code", code);
}
