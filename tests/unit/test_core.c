/*
 * test_core.c: the polling domain. Validation limits and the field each error names,
 * defaults per type, ballots of every type, counting, percentages, results JSON,
 * instant-runoff, visibility, the registry and its listing order, and allocation
 * failure.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "base/base.h"
#include "core/core.h"

/* 2026-04-05T12:00:00Z */
#define NOW INT64_C(1775390400000)
#define HOUR INT64_C(3600000)

static json_t *J(const char *text)
{
    json_error_t err;
    json_t *v = json_loads(text, 0, &err);
    cr_assert_not_null(v, "bad test JSON: %s: %s", err.text, text);
    return v;
}

/* A create body of `type` with n options "o0".."o<n-1>". */
static json_t *body_n(const char *type, size_t n)
{
    json_t *opts = json_array();
    for (size_t i = 0; i < n; i++) {
        char t[32];
        snprintf(t, sizeof(t), "o%zu", i);
        json_array_append_new(opts, json_pack("{s:s}", "text", t));
    }
    return json_pack("{s:s, s:s, s:o}", "title", "Best?", "type", type, "options", opts);
}

static tly_poll_t *create(json_t *body, const char **field, const char **msg)
{
    static char buf[256];
    const char *f = NULL, *m = NULL;
    tly_poll_t *p = tly_poll_from_json(body, "owner1", NOW, &f, &m, buf, sizeof(buf));
    if (field)
        *field = f;
    if (msg)
        *msg = m;
    json_decref(body);
    return p;
}

static tly_poll_t *create_ok(json_t *body)
{
    const char *f, *m;
    tly_poll_t *p = create(body, &f, &m);
    cr_assert_not_null(p, "create failed: %s: %s", f ? f : "(null)", m ? m : "(null)");
    return p;
}

static void create_fails(json_t *body, const char *want_field)
{
    const char *f = NULL, *m = NULL;
    tly_poll_t *p = create(body, &f, &m);
    cr_assert_null(p, "expected an error on %s", want_field);
    cr_assert_not_null(f);
    cr_assert_not_null(m, "an error needs a message");
    cr_assert_str_eq(f, want_field);
}

static json_t *with(json_t *body, const char *key, json_t *v)
{
    json_object_set_new(body, key, v);
    return body;
}

static json_t *with_settings(json_t *body, const char *settings)
{
    return with(body, "settings", J(settings));
}

static char *repeat(const char *unit, size_t n)
{
    size_t u = strlen(unit);
    char *s = malloc(u * n + 1);
    for (size_t i = 0; i < n; i++)
        memcpy(s + i * u, unit, u);
    s[u * n] = '\0';
    return s;
}

/* ---- poll validation ---- */

Test(poll, title_limit_in_code_points)
{
    char *ok = repeat("\xc3\xa9", 300), *bad = repeat("\xc3\xa9", 301), *emoji = repeat("\xf0\x9f\x98\x80", 300);
    tly_poll_t *p = create_ok(with(body_n("single", 2), "title", json_string(ok)));
    cr_assert_str_eq(p->title, ok);
    tly_poll_free(p);
    tly_poll_free(create_ok(with(body_n("single", 2), "title", json_string(emoji))));
    create_fails(with(body_n("single", 2), "title", json_string(bad)), "title");
    free(ok);
    free(bad);
    free(emoji);
}

Test(poll, title_required_and_not_blank)
{
    json_t *b = body_n("single", 2);
    json_object_del(b, "title");
    create_fails(b, "title");
    create_fails(with(body_n("single", 2), "title", json_string("")), "title");
    create_fails(with(body_n("single", 2), "title", json_string(" \t\n ")), "title");
    create_fails(with(body_n("single", 2), "title", json_integer(5)), "title");
    create_fails(with(body_n("single", 2), "title", json_null()), "title");
}

Test(poll, description_limit)
{
    char *ok = repeat("\xe2\x82\xac", 5000), *bad = repeat("a", 5001);
    tly_poll_t *p = create_ok(with(body_n("single", 2), "description", json_string(ok)));
    cr_assert_str_eq(p->description, ok);
    tly_poll_free(p);
    p = create_ok(with(body_n("single", 2), "description", json_null()));
    cr_assert_null(p->description);
    tly_poll_free(p);
    create_fails(with(body_n("single", 2), "description", json_string(bad)), "description");
    create_fails(with(body_n("single", 2), "description", json_true()), "description");
    free(ok);
    free(bad);
}

Test(poll, option_count_limits)
{
    create_fails(body_n("single", 1), "options");
    create_fails(body_n("single", 101), "options");
    create_fails(body_n("single", 0), "options");
    tly_poll_t *p = create_ok(body_n("single", 100));
    cr_assert_eq(p->noptions, 100);
    tly_poll_free(p);
    p = create_ok(body_n("single", 2));
    cr_assert_eq(p->noptions, 2);
    tly_poll_free(p);
    json_t *b = body_n("single", 2);
    json_object_del(b, "options");
    create_fails(b, "options");
    create_fails(with(body_n("single", 2), "options", json_string("a,b")), "options");
}

Test(poll, option_text_rules)
{
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\"},{\"text\":\"\"}]")), "options[1].text");
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\"},{\"text\":\"   \"}]")), "options[1].text");
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\"},{\"text\":\"b\"},{\"text\":\"a\"}]")),
                 "options[2].text");
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\"},{\"text\":7}]")), "options[1].text");
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\"},{}]")), "options[1].text");
    create_fails(with(body_n("single", 2), "options", J("[\"a\",\"b\"]")), "options[0]");
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"a\",\"display_order\":\"1\"},{\"text\":\"b\"}]")),
                 "options[0].display_order");
    /* exact match only: case differs, so these are distinct */
    tly_poll_free(create_ok(with(body_n("single", 2), "options", J("[{\"text\":\"Go\"},{\"text\":\"go\"}]"))));
    char *t200 = repeat("\xc3\xa9", 200), *t201 = repeat("x", 201);
    json_t *b = body_n("single", 2);
    json_object_set_new(json_array_get(json_object_get(b, "options"), 0), "text", json_string(t200));
    tly_poll_free(create_ok(b));
    b = body_n("single", 2);
    json_object_set_new(json_array_get(json_object_get(b, "options"), 1), "text", json_string(t201));
    create_fails(b, "options[1].text");
    free(t200);
    free(t201);
}

Test(poll, options_sorted_by_display_order_stably)
{
    tly_poll_t *p = create_ok(with(body_n("single", 2), "options",
                                   J("[{\"text\":\"a\",\"display_order\":2},{\"text\":\"b\",\"display_order\":1},"
                                     "{\"text\":\"c\",\"display_order\":1},{\"text\":\"d\"}]")));
    cr_assert_eq(p->noptions, 4);
    cr_assert_str_eq(p->options[0].text, "b");
    cr_assert_str_eq(p->options[1].text, "c");
    cr_assert_str_eq(p->options[2].text, "a");
    cr_assert_str_eq(p->options[3].text, "d");
    cr_assert_eq(p->options[3].display_order, 3); /* missing: the array index */
    tly_poll_free(p);
}

Test(poll, type_and_status)
{
    create_fails(body_n("plurality", 2), "type");
    create_fails(with(body_n("single", 2), "type", json_integer(1)), "type");
    create_fails(with(body_n("single", 2), "status", json_string("closed")), "status");
    create_fails(with(body_n("single", 2), "status", json_string("open")), "status");
    create_fails(with(body_n("single", 2), "status", json_false()), "status");
    tly_poll_t *p = create_ok(with(body_n("single", 2), "status", json_string("draft")));
    cr_assert_eq(p->status, TLY_STATUS_DRAFT);
    cr_assert_not(tly_poll_accepts_votes(p, NOW));
    tly_poll_free(p);
}

Test(poll, times)
{
    create_fails(with(body_n("single", 2), "start_time", json_string("tomorrow")), "start_time");
    create_fails(with(body_n("single", 2), "end_time", json_integer(1775390400)), "end_time");
    create_fails(with(with(body_n("single", 2), "start_time", json_string("2026-04-07T00:00:00Z")), "end_time",
                      json_string("2026-04-06T00:00:00Z")),
                 "end_time");
    create_fails(with(with(body_n("single", 2), "start_time", json_string("2026-04-07T00:00:00Z")), "end_time",
                      json_string("2026-04-07T00:00:00Z")),
                 "end_time");
    create_fails(with(body_n("single", 2), "end_time", json_string("2026-04-05T11:59:59Z")), "end_time");
    tly_poll_t *p = create_ok(with(with(body_n("single", 2), "start_time", json_string("2026-04-05T13:00:00Z")),
                                   "end_time", json_string("2026-04-12T10:00:00+02:00")));
    cr_assert_eq(p->start_time, NOW + HOUR);
    cr_assert_eq(p->end_time, NOW + (6 * 24 + 20) * HOUR);
    cr_assert_not(tly_poll_accepts_votes(p, NOW), "not started yet");
    cr_assert(tly_poll_accepts_votes(p, NOW + HOUR));
    cr_assert_eq(tly_poll_effective_status(p, p->end_time - 1), TLY_STATUS_ACTIVE);
    cr_assert_eq(tly_poll_effective_status(p, p->end_time), TLY_STATUS_CLOSED);
    cr_assert_not(tly_poll_accepts_votes(p, p->end_time));
    tly_poll_free(p);
}

Test(poll, settings_types_and_limits)
{
    create_fails(with(body_n("single", 2), "settings", json_string("x")), "settings");
    create_fails(with_settings(body_n("single", 2), "{\"allow_anonymous\":\"yes\"}"), "settings.allow_anonymous");
    create_fails(with_settings(body_n("single", 2), "{\"show_results_during_voting\":1}"),
                 "settings.show_results_during_voting");
    create_fails(with_settings(body_n("single", 2), "{\"allow_vote_change\":null}"), "settings.allow_vote_change");
    create_fails(with_settings(body_n("single", 2), "{\"results_visibility\":\"public\"}"),
                 "settings.results_visibility");
    create_fails(with_settings(body_n("single", 3), "{\"max_choices\":2}"), "settings.max_choices");
    create_fails(with_settings(body_n("single", 3), "{\"min_choices\":0}"), "settings.min_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"min_choices\":3,\"max_choices\":2}"),
                 "settings.min_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"max_choices\":4}"), "settings.max_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"min_choices\":0}"), "settings.min_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"min_choices\":4}"), "settings.min_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"max_choices\":\"2\"}"), "settings.max_choices");
    create_fails(with_settings(body_n("multiple", 3), "{\"max_choices\":99999999999999}"), "settings.max_choices");
    create_fails(with_settings(body_n("score", 3), "{\"max_score\":0}"), "settings.max_score");
    create_fails(with_settings(body_n("score", 3), "{\"max_score\":101}"), "settings.max_score");
    create_fails(with_settings(body_n("score", 3), "{\"max_score\":2.5}"), "settings.max_score");
    tly_poll_t *p = create_ok(with_settings(body_n("score", 3), "{\"max_score\":100}"));
    cr_assert_eq(p->settings.max_score, 100);
    tly_poll_free(p);
    p = create_ok(with_settings(body_n("multiple", 4), "{\"min_choices\":2,\"max_choices\":3,"
                                                      "\"results_visibility\":\"after_vote\",\"allow_anonymous\":true}"));
    cr_assert_eq(p->settings.min_choices, 2);
    cr_assert_eq(p->settings.max_choices, 3);
    cr_assert_eq(p->settings.results_visibility, TLY_VIS_AFTER_VOTE);
    cr_assert(p->settings.allow_anonymous);
    tly_poll_free(p);
}

Test(poll, body_must_be_object_and_ignores_server_fields)
{
    create_fails(J("[1,2]"), "body");
    json_t *b = body_n("single", 2);
    json_object_set_new(b, "poll_id", json_string("chosen-by-client"));
    json_object_set_new(b, "owner_id", json_string("someone-else"));
    json_object_set_new(b, "created_at", json_string("2000-01-01T00:00:00Z"));
    json_object_set_new(b, "total_votes", json_integer(1000));
    json_object_set_new(b, "whatever", json_integer(1));
    tly_poll_t *p = create_ok(b);
    cr_assert_str_neq(p->poll_id, "chosen-by-client");
    cr_assert_str_eq(p->owner_id, "owner1");
    cr_assert_eq(p->created_at, NOW);
    cr_assert_eq(p->total_votes, 0);
    tly_poll_free(p);
}

Test(poll, defaults_per_type)
{
    static const struct {
        const char *type;
        tly_poll_type_t t;
        int min, max, max_score;
    } cases[] = {
        {"single", TLY_TYPE_SINGLE, 1, 1, 0},     {"multiple", TLY_TYPE_MULTIPLE, 1, 4, 0},
        {"approval", TLY_TYPE_APPROVAL, 1, 4, 0}, {"ranked", TLY_TYPE_RANKED, 1, 4, 0},
        {"score", TLY_TYPE_SCORE, 1, 4, 5},
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(cases); i++) {
        tly_poll_t *p = create_ok(body_n(cases[i].type, 4));
        cr_assert_eq(p->type, cases[i].t);
        cr_assert_eq(p->settings.min_choices, cases[i].min, "%s", cases[i].type);
        cr_assert_eq(p->settings.max_choices, cases[i].max, "%s", cases[i].type);
        cr_assert_eq(p->settings.max_score, cases[i].max_score, "%s", cases[i].type);
        cr_assert(p->settings.show_results_during_voting);
        cr_assert_eq(p->settings.results_visibility, TLY_VIS_ALWAYS);
        cr_assert_not(p->settings.allow_anonymous);
        cr_assert_not(p->settings.allow_vote_change);
        cr_assert_eq(p->status, TLY_STATUS_ACTIVE);
        cr_assert(tly_poll_accepts_votes(p, NOW));
        tly_poll_free(p);
    }
    json_t *b = body_n("single", 2);
    json_object_del(b, "type");
    tly_poll_t *p = create_ok(b);
    cr_assert_eq(p->type, TLY_TYPE_SINGLE);
    tly_poll_free(p);
}

static bool url_safe(const char *s)
{
    for (; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_'))
            return false;
    return true;
}

Test(poll, id_formats)
{
    tly_poll_t *p = create_ok(body_n("single", 3)), *q = create_ok(body_n("single", 3));
    cr_assert_eq(strlen(p->poll_id), 16);
    cr_assert(url_safe(p->poll_id));
    cr_assert_str_neq(p->poll_id, q->poll_id);
    for (size_t i = 0; i < p->noptions; i++) {
        cr_assert_eq(strlen(p->options[i].option_id), TLY_OPTION_ID_LEN);
        cr_assert(url_safe(p->options[i].option_id));
        cr_assert_eq(tly_poll_option_index(p, p->options[i].option_id), (int)i);
    }
    cr_assert_eq(tly_poll_option_index(p, "nope"), -1);
    tly_ballot_t b = {.nchoices = 1, .choices = {0}};
    tly_vote_t *v = tly_vote_new(&b, "voter", NULL, NULL, NULL, NOW);
    cr_assert_eq(strlen(v->vote_id), 18);
    cr_assert_eq(strncmp(v->vote_id, "v_", 2), 0);
    cr_assert(url_safe(v->vote_id + 2));
    cr_assert_eq(strlen(v->receipt), 22);
    cr_assert(url_safe(v->receipt));
    tly_vote_t *w = tly_vote_new(&b, "voter", "key", "v_given", "rcpt", NOW);
    cr_assert_str_eq(w->vote_id, "v_given");
    cr_assert_str_eq(w->receipt, "rcpt");
    cr_assert_str_eq(w->idem_key, "key");
    tly_vote_free(v);
    tly_vote_free(w);
    tly_poll_free(p);
    tly_poll_free(q);
}

Test(poll, to_json_shape)
{
    tly_poll_t *p = create_ok(with(with_settings(body_n("score", 3), "{\"max_score\":7}"), "end_time",
                                   json_string("2026-04-06T00:00:00Z")));
    json_t *o = tly_poll_to_json(p, NOW);
    cr_assert_not_null(o);
    cr_assert_str_eq(json_string_value(json_object_get(o, "poll_id")), p->poll_id);
    cr_assert_str_eq(json_string_value(json_object_get(o, "owner_id")), "owner1");
    cr_assert_str_eq(json_string_value(json_object_get(o, "title")), "Best?");
    cr_assert(json_is_null(json_object_get(o, "description")));
    cr_assert_str_eq(json_string_value(json_object_get(o, "type")), "score");
    cr_assert(json_is_null(json_object_get(o, "start_time")));
    cr_assert_str_eq(json_string_value(json_object_get(o, "end_time")), "2026-04-06T00:00:00.000Z");
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "active");
    cr_assert_str_eq(json_string_value(json_object_get(o, "created_at")), "2026-04-05T12:00:00.000Z");
    cr_assert_not_null(json_object_get(o, "updated_at"));
    cr_assert_null(json_object_get(o, "total_votes"), "counts are not part of the poll object");
    json_t *opts = json_object_get(o, "options");
    cr_assert_eq(json_array_size(opts), 3);
    json_t *o1 = json_array_get(opts, 1);
    cr_assert_str_eq(json_string_value(json_object_get(o1, "option_id")), p->options[1].option_id);
    cr_assert_str_eq(json_string_value(json_object_get(o1, "text")), "o1");
    cr_assert_eq(json_integer_value(json_object_get(o1, "display_order")), 1);
    json_t *s = json_object_get(o, "settings");
    cr_assert(json_is_true(json_object_get(s, "show_results_during_voting")));
    cr_assert_str_eq(json_string_value(json_object_get(s, "results_visibility")), "always");
    cr_assert(json_is_false(json_object_get(s, "allow_anonymous")));
    cr_assert(json_is_false(json_object_get(s, "allow_vote_change")));
    cr_assert_eq(json_integer_value(json_object_get(s, "min_choices")), 1);
    cr_assert_eq(json_integer_value(json_object_get(s, "max_choices")), 3);
    cr_assert_eq(json_integer_value(json_object_get(s, "max_score")), 7);
    json_decref(o);
    /* closed at read time once end_time passed; max_score only on score polls */
    o = tly_poll_to_json(p, p->end_time);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "closed");
    json_decref(o);
    tly_poll_free(p);
    p = create_ok(body_n("single", 2));
    o = tly_poll_to_json(p, NOW);
    cr_assert_null(json_object_get(json_object_get(o, "settings"), "max_score"));
    json_decref(o);
    tly_poll_free(p);
}

/* ---- PATCH ---- */

static int patch(tly_poll_t *p, const char *body, const char **field)
{
    char buf[256];
    const char *f = NULL, *m = NULL;
    json_t *b = J(body);
    int rc = tly_poll_patch(p, b, NOW + 1000, &f, &m, buf, sizeof(buf));
    json_decref(b);
    if (rc != 0 && rc != TLY_ENOMEM)
        cr_assert_not_null(m, "an error needs a message");
    static char fieldbuf[256];
    snprintf(fieldbuf, sizeof(fieldbuf), "%s", f ? f : "");
    if (field)
        *field = fieldbuf;
    return rc;
}

Test(patch, fields_and_validation)
{
    tly_poll_t *p = create_ok(with(body_n("multiple", 3), "description", json_string("d")));
    const char *f;
    cr_assert_eq(patch(p, "{\"title\":\"New\",\"description\":null}", &f), 0);
    cr_assert_str_eq(p->title, "New");
    cr_assert_null(p->description);
    cr_assert_eq(p->updated_at, NOW + 1000);
    cr_assert(p->results_dirty);
    cr_assert_eq(patch(p, "{\"title\":\"\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "title");
    cr_assert_str_eq(p->title, "New", "unchanged on error");
    cr_assert_eq(patch(p, "{\"title\":\"Other\",\"settings\":{\"min_choices\":3,\"max_choices\":2}}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "settings.min_choices");
    cr_assert_str_eq(p->title, "New", "nothing applied when any field fails");
    cr_assert_eq(patch(p, "{\"settings\":{\"max_choices\":2}}", &f), 0);
    cr_assert_eq(p->settings.max_choices, 2);
    cr_assert_eq(p->settings.min_choices, 1);
    cr_assert_eq(patch(p, "{\"type\":\"single\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "type");
    cr_assert_eq(patch(p, "{\"type\":\"multiple\"}", &f), 0);
    cr_assert_eq(patch(p, "{\"end_time\":\"2026-04-05T11:00:00Z\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "end_time");
    cr_assert_eq(patch(p, "{\"end_time\":\"2026-05-01T00:00:00Z\",\"start_time\":\"2026-04-01T00:00:00Z\"}", &f), 0);
    cr_assert_neq(p->end_time, 0);
    cr_assert_eq(patch(p, "{\"start_time\":\"2026-06-01T00:00:00Z\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "start_time");
    cr_assert_eq(patch(p, "{\"end_time\":null,\"start_time\":null}", &f), 0);
    cr_assert_eq(p->end_time, 0);
    cr_assert_eq(p->start_time, 0);
    cr_assert_eq(patch(p, "{\"status\":\"paused\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "status");
    tly_poll_free(p);
}

Test(patch, status_transitions)
{
    tly_poll_t *p = create_ok(with(body_n("single", 2), "status", json_string("draft")));
    cr_assert_eq(patch(p, "{\"status\":\"draft\"}", NULL), 0);
    cr_assert_eq(patch(p, "{\"status\":\"active\"}", NULL), 0);
    cr_assert_eq(p->status, TLY_STATUS_ACTIVE);
    cr_assert_eq(patch(p, "{\"status\":\"draft\"}", NULL), TLY_ESTATE);
    cr_assert_eq(patch(p, "{\"status\":\"closed\"}", NULL), 0);
    cr_assert_eq(patch(p, "{\"status\":\"active\"}", NULL), TLY_ESTATE);
    cr_assert_eq(p->status, TLY_STATUS_CLOSED);
    tly_poll_free(p);
    p = create_ok(with(body_n("single", 2), "status", json_string("draft")));
    cr_assert_eq(patch(p, "{\"status\":\"closed\"}", NULL), 0);
    tly_poll_free(p);
}

Test(patch, options_only_without_votes)
{
    tly_poll_t *p = create_ok(body_n("multiple", 3));
    char old_id[TLY_OPTION_ID_LEN + 1];
    strcpy(old_id, p->options[0].option_id);
    const char *f;
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"x\"},{\"text\":\"x\"}]}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "options[1].text");
    cr_assert_eq(p->noptions, 3);
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"x\"},{\"text\":\"y\"},{\"text\":\"z\"},{\"text\":\"w\"}]}", &f),
                 0);
    cr_assert_eq(p->noptions, 4);
    cr_assert_str_eq(p->options[3].text, "w");
    cr_assert_eq(p->settings.max_choices, 4, "the default max follows the option count");
    cr_assert_eq(tly_poll_option_index(p, old_id), -1, "new options get new ids");
    /* a vote exists (pending is enough): options are frozen */
    tly_ballot_t b = {.nchoices = 1, .choices = {0}};
    tly_poll_add_vote(NULL, p, tly_vote_new(&b, "v1", NULL, NULL, NULL, NOW));
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"a\"},{\"text\":\"b\"}]}", &f), TLY_EEXIST);
    cr_assert_eq(p->noptions, 4);
    cr_assert_eq(patch(p, "{\"title\":\"still fine\"}", &f), 0);
    tly_poll_free(p);
}

/* ---- ballots ---- */

static tly_ballot_result_t ballot(const tly_poll_t *p, const char *body, tly_ballot_t *out, const char **field)
{
    json_t *b = J(body);
    const char *f = NULL, *m = NULL;
    tly_ballot_result_t r = tly_ballot_parse(p, b, out, &f, &m);
    json_decref(b);
    if (r != TLY_BALLOT_OK) {
        cr_assert_not_null(f);
        cr_assert_not_null(m);
    }
    if (field)
        *field = f;
    return r;
}

/* A body with option ids substituted: "$0" .. "$9" become p's option ids. */
static const char *ids(const tly_poll_t *p, const char *tmpl)
{
    static char out[4096];
    size_t o = 0;
    for (const char *s = tmpl; *s && o < sizeof(out) - 16; s++) {
        if (s[0] == '$' && s[1] >= '0' && s[1] <= '9') {
            size_t i = (size_t)(s[1] - '0');
            o += (size_t)snprintf(out + o, sizeof(out) - o, "%s", i < p->noptions ? p->options[i].option_id : "zz");
            s++;
        } else {
            out[o++] = *s;
        }
    }
    out[o] = '\0';
    return out;
}

Test(ballot, single)
{
    tly_poll_t *p = create_ok(body_n("single", 3));
    tly_ballot_t b;
    const char *f;
    cr_assert_eq(ballot(p, ids(p, "{\"option_id\":\"$2\",\"client_meta\":{\"ua\":\"x\"}}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(b.nchoices, 1);
    cr_assert_eq(b.choices[0], 2);
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$1\"]}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(b.choices[0], 1);
    cr_assert_eq(ballot(p, "{\"option_id\":\"nope\"}", &b, &f), TLY_BALLOT_UNKNOWN_OPTION);
    cr_assert_str_eq(f, "option_id");
    cr_assert_eq(ballot(p, "{\"option_id\":3}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "option_id");
    cr_assert_eq(ballot(p, "{}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "option_id");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",\"$1\"]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "option_ids");
    cr_assert_eq(ballot(p, "{\"option_ids\":[]}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"option_id\":\"$0\",\"option_ids\":[\"$0\"]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, "[1]", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "body");
    tly_poll_free(p);
}

Test(ballot, multiple)
{
    tly_poll_t *p = create_ok(with_settings(body_n("multiple", 4), "{\"min_choices\":2,\"max_choices\":3}"));
    tly_ballot_t b, c;
    const char *f;
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$3\",\"$0\",\"$2\"]}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(b.nchoices, 3);
    cr_assert_eq(b.choices[0], 0, "sorted ascending");
    cr_assert_eq(b.choices[1], 2);
    cr_assert_eq(b.choices[2], 3);
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$2\",\"$3\",\"$0\"]}"), &c, &f), TLY_BALLOT_OK);
    cr_assert_eq(memcmp(&b, &c, sizeof(b)), 0, "same set, same ballot");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",\"$0\"]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "option_ids");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\"]}"), &b, &f), TLY_BALLOT_INVALID, "too few");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",\"$1\",\"$2\",\"$3\"]}"), &b, &f), TLY_BALLOT_INVALID,
                 "too many");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",\"bogus\"]}"), &b, &f), TLY_BALLOT_UNKNOWN_OPTION);
    cr_assert_str_eq(f, "option_ids");
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":\"$0\"}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",1]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"option_id\":\"$0\"}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "option_ids");
    tly_poll_free(p);
    p = create_ok(body_n("approval", 3));
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\",\"$1\",\"$2\"]}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(ballot(p, "{\"option_ids\":[]}", &b, &f), TLY_BALLOT_INVALID);
    tly_poll_free(p);
}

Test(ballot, ranked)
{
    tly_poll_t *p = create_ok(body_n("ranked", 4));
    tly_ballot_t b;
    const char *f;
    cr_assert_eq(ballot(p, ids(p, "{\"ranking\":[\"$2\",\"$0\",\"$3\"]}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(b.nchoices, 3);
    cr_assert_eq(b.choices[0], 2, "rank order kept");
    cr_assert_eq(b.choices[1], 0);
    cr_assert_eq(b.choices[2], 3);
    cr_assert_eq(ballot(p, ids(p, "{\"ranking\":[\"$2\",\"$2\"]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "ranking");
    cr_assert_eq(ballot(p, ids(p, "{\"ranking\":[\"$2\",\"x\"]}"), &b, &f), TLY_BALLOT_UNKNOWN_OPTION);
    cr_assert_str_eq(f, "ranking");
    cr_assert_eq(ballot(p, "{\"ranking\":[]}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"option_ids\":[\"$0\"]}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "ranking");
    tly_poll_free(p);
}

Test(ballot, score)
{
    tly_poll_t *p = create_ok(body_n("score", 3));
    tly_ballot_t b;
    const char *f;
    cr_assert_eq(ballot(p, ids(p, "{\"scores\":{\"$2\":5,\"$0\":0}}"), &b, &f), TLY_BALLOT_OK);
    cr_assert_eq(b.nchoices, 2);
    cr_assert_eq(b.choices[0], 0);
    cr_assert_eq(b.scores[0], 0);
    cr_assert_eq(b.choices[1], 2);
    cr_assert_eq(b.scores[1], 5);
    cr_assert_eq(ballot(p, ids(p, "{\"scores\":{\"$0\":6}}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_str_eq(f, "scores");
    cr_assert_eq(ballot(p, ids(p, "{\"scores\":{\"$0\":-1}}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"scores\":{\"$0\":2.5}}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, ids(p, "{\"scores\":{\"$0\":\"3\"}}"), &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, "{\"scores\":{\"nope\":1}}", &b, &f), TLY_BALLOT_UNKNOWN_OPTION);
    cr_assert_str_eq(f, "scores");
    cr_assert_eq(ballot(p, "{\"scores\":{}}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, "{\"scores\":[1]}", &b, &f), TLY_BALLOT_INVALID);
    cr_assert_eq(ballot(p, "{}", &b, &f), TLY_BALLOT_INVALID);
    tly_poll_free(p);
}

Test(ballot, to_json_round_trip)
{
    static const struct {
        const char *type, *body;
    } cases[] = {
        {"single", "{\"option_id\":\"$1\"}"},
        {"multiple", "{\"option_ids\":[\"$0\",\"$2\"]}"},
        {"ranked", "{\"ranking\":[\"$2\",\"$0\"]}"},
        {"score", "{\"scores\":{\"$0\":3,\"$2\":0}}"},
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(cases); i++) {
        tly_poll_t *p = create_ok(body_n(cases[i].type, 3));
        tly_ballot_t b;
        const char *body = ids(p, cases[i].body);
        cr_assert_eq(ballot(p, body, &b, NULL), TLY_BALLOT_OK);
        tly_vote_t *v = tly_vote_new(&b, "x", NULL, NULL, NULL, NOW);
        json_t *got = tly_ballot_to_json(p, v), *want = J(body);
        cr_assert(json_equal(got, want), "%s", cases[i].type);
        json_t *oids = tly_vote_option_ids(p, v);
        size_t want_n = strcmp(cases[i].type, "single") == 0 ? 1 : strcmp(cases[i].type, "score") == 0 ? 1 : 2;
        cr_assert_eq(json_array_size(oids), want_n, "%s", cases[i].type);
        if (strcmp(cases[i].type, "ranked") == 0)
            cr_assert_str_eq(json_string_value(json_array_get(oids, 0)), p->options[2].option_id);
        json_decref(got);
        json_decref(want);
        json_decref(oids);
        tly_vote_free(v);
        tly_poll_free(p);
    }
}

/* ---- votes and counting ---- */

static tly_vote_t *cast(tly_registry_t *r, tly_poll_t *p, const char *voter, const char *tmpl)
{
    tly_ballot_t b;
    const char *f = NULL;
    cr_assert_eq(ballot(p, ids(p, tmpl), &b, &f), TLY_BALLOT_OK, "ballot %s: %s", tmpl, f ? f : "");
    tly_vote_t *v = tly_vote_new(&b, voter, NULL, NULL, NULL, NOW);
    cr_assert_not_null(v);
    tly_poll_add_vote(r, p, v);
    tly_poll_commit_vote(p, v, NOW + 5);
    return v;
}

Test(votes, counting_single_and_maps)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("single", 3));
    tly_registry_add_poll(r, p);
    tly_vote_t *a = cast(r, p, "alice", "{\"option_id\":\"$0\"}");
    cast(r, p, "bob", "{\"option_id\":\"$0\"}");
    cast(r, p, "carol", "{\"option_id\":\"$2\"}");
    cr_assert_eq(p->total_votes, 3);
    cr_assert_eq(p->options[0].votes, 2);
    cr_assert_eq(p->options[1].votes, 0);
    cr_assert_eq(p->options[2].votes, 1);
    cr_assert_eq(p->seq, 3);
    cr_assert_eq(p->as_of, NOW + 5);
    cr_assert(p->results_dirty);
    cr_assert_eq(tly_poll_find_vote(p, "alice"), a);
    cr_assert_null(tly_poll_find_vote(p, "dave"));
    cr_assert_eq(tly_registry_find_receipt(r, a->receipt), a);
    cr_assert_eq(a->poll, p);
    tly_poll_commit_vote(p, a, NOW + 6);
    cr_assert_eq(p->total_votes, 3, "committing twice counts once");

    /* a pending vote is in the dedup map but not counted; dropping it removes it */
    tly_ballot_t b = {.nchoices = 1, .choices = {1}};
    tly_vote_t *d = tly_vote_new(&b, "dave", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(r, p, d);
    char receipt[TLY_RECEIPT_LEN + 1];
    strcpy(receipt, d->receipt);
    cr_assert_eq(tly_poll_find_vote(p, "dave"), d);
    cr_assert_eq(p->options[1].votes, 0);
    tly_poll_drop_vote(r, p, d);
    cr_assert_null(tly_poll_find_vote(p, "dave"));
    cr_assert_null(tly_registry_find_receipt(r, receipt));
    cr_assert_eq(p->total_votes, 3);

    /* retraction uncounts */
    strcpy(receipt, a->receipt);
    tly_poll_retract_vote(r, p, a, NOW + 10);
    cr_assert_eq(p->total_votes, 2);
    cr_assert_eq(p->options[0].votes, 1);
    cr_assert_eq(p->seq, 4);
    cr_assert_null(tly_poll_find_vote(p, "alice"));
    cr_assert_null(tly_registry_find_receipt(r, receipt));

    /* removing the poll removes its receipts */
    tly_vote_t *c = tly_poll_find_vote(p, "carol");
    strcpy(receipt, c->receipt);
    tly_registry_remove_poll(r, p);
    cr_assert_null(tly_registry_find_receipt(r, receipt));
    tly_registry_free(r);
}

Test(votes, counting_other_types)
{
    tly_poll_t *p = create_ok(body_n("multiple", 3));
    cast(NULL, p, "a", "{\"option_ids\":[\"$0\",\"$1\"]}");
    cast(NULL, p, "b", "{\"option_ids\":[\"$1\"]}");
    cr_assert_eq(p->total_votes, 2);
    cr_assert_eq(p->options[0].votes, 1);
    cr_assert_eq(p->options[1].votes, 2);
    cr_assert_eq(p->options[2].votes, 0);
    tly_poll_free(p);

    p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$2\",\"$0\"]}");
    cast(NULL, p, "b", "{\"ranking\":[\"$0\",\"$2\",\"$1\"]}");
    cr_assert_eq(p->options[0].votes, 1);
    cr_assert_eq(p->options[1].votes, 0);
    cr_assert_eq(p->options[2].votes, 1);
    tly_poll_free(p);

    p = create_ok(body_n("score", 3));
    cast(NULL, p, "a", "{\"scores\":{\"$0\":5,\"$1\":0}}");
    tly_vote_t *b = cast(NULL, p, "b", "{\"scores\":{\"$0\":2,\"$2\":4}}");
    cr_assert_eq(p->total_votes, 2);
    cr_assert_eq(p->options[0].votes, 2);
    cr_assert_eq(p->options[1].votes, 0, "a score of 0 is not a vote for it");
    cr_assert_eq(p->options[2].votes, 1);
    cr_assert_eq(p->score_sum[0], 7);
    cr_assert_eq(p->score_sum[3 + 0], 2);
    cr_assert_eq(p->score_sum[3 + 1], 1);
    tly_poll_retract_vote(NULL, p, b, NOW);
    cr_assert_eq(p->score_sum[0], 5);
    cr_assert_eq(p->options[2].votes, 0);
    tly_poll_free(p);
}

/* ---- percentages ---- */

static void pct(const uint64_t *votes, size_t n, uint64_t total, bool lr, const int *want)
{
    int got[TLY_MAX_OPTIONS];
    tly_percentages(votes, n, total, lr, got);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got[i], want[i], "option %zu: got %d want %d", i, got[i], want[i]);
}

Test(percentages, largest_remainder)
{
    pct((uint64_t[]){1, 1, 1}, 3, 3, true, (int[]){334, 333, 333});
    pct((uint64_t[]){2, 1}, 2, 3, true, (int[]){667, 333});
    pct((uint64_t[]){1, 2}, 2, 3, true, (int[]){333, 667});
    pct((uint64_t[]){0, 0}, 2, 0, true, (int[]){0, 0});
    pct((uint64_t[]){1, 0, 0, 0, 0, 0, 0}, 7, 1, true, (int[]){1000, 0, 0, 0, 0, 0, 0});
    pct((uint64_t[]){1, 1, 1, 1, 1, 1}, 6, 6, true, (int[]){167, 167, 167, 167, 166, 166});
    pct((uint64_t[]){1, 1}, 2, 2, true, (int[]){500, 500});
    /* sums are exactly 100.0 for many splits */
    for (uint64_t a = 0; a < 12; a++)
        for (uint64_t b = 0; b < 12; b++)
            for (uint64_t c = 0; c < 12; c++) {
                uint64_t v[3] = {a, b, c};
                int got[3];
                if (a + b + c == 0)
                    continue;
                tly_percentages(v, 3, a + b + c, true, got);
                cr_assert_eq(got[0] + got[1] + got[2], 1000);
            }
}

Test(percentages, independent_half_up)
{
    pct((uint64_t[]){1, 1, 1}, 3, 3, false, (int[]){333, 333, 333});
    pct((uint64_t[]){2, 1}, 2, 2, false, (int[]){1000, 500});
    pct((uint64_t[]){1, 1, 1}, 3, 8, false, (int[]){125, 125, 125});
    pct((uint64_t[]){1}, 1, 16, false, (int[]){63});  /* 6.25 -> 6.3 */
    pct((uint64_t[]){1}, 1, 6, false, (int[]){167}); /* 16.67 */
    pct((uint64_t[]){0, 0}, 2, 0, false, (int[]){0, 0});
}

/* ---- results ---- */

static json_t *results(tly_poll_t *p, int64_t now, const char **raw)
{
    size_t len = 0;
    const char *s = tly_results_render(p, now, &len);
    cr_assert_not_null(s);
    cr_assert_eq(strlen(s), len);
    if (raw)
        *raw = s;
    return J(s);
}

Test(results, shape_and_exact_decimals)
{
    tly_poll_t *p = create_ok(with(body_n("single", 3), "end_time", json_string("2026-04-06T00:00:00Z")));
    cast(NULL, p, "a", "{\"option_id\":\"$0\"}");
    cast(NULL, p, "b", "{\"option_id\":\"$1\"}");
    cast(NULL, p, "c", "{\"option_id\":\"$2\"}");
    const char *raw;
    json_t *o = results(p, NOW, &raw);
    cr_assert(strstr(raw, "\"percentage\":33.4") != NULL, "%s", raw);
    cr_assert(strstr(raw, "\"percentage\":33.3}") != NULL, "%s", raw);
    cr_assert(strstr(raw, "33.29") == NULL && strstr(raw, "33.30") == NULL, "%s", raw);
    cr_assert_str_eq(json_string_value(json_object_get(o, "poll_id")), p->poll_id);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "active");
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 3);
    cr_assert_str_eq(json_string_value(json_object_get(o, "as_of")), "2026-04-05T12:00:00.005Z");
    json_t *opts = json_object_get(o, "options");
    cr_assert_eq(json_array_size(opts), 3);
    double sum = 0;
    for (size_t i = 0; i < 3; i++) {
        json_t *e = json_array_get(opts, i);
        cr_assert_str_eq(json_string_value(json_object_get(e, "option_id")), p->options[i].option_id);
        cr_assert_str_eq(json_string_value(json_object_get(e, "label")), p->options[i].text);
        cr_assert_eq(json_integer_value(json_object_get(e, "votes")), 1);
        cr_assert(json_is_real(json_object_get(e, "percentage")));
        sum += json_real_value(json_object_get(e, "percentage"));
    }
    cr_assert_float_eq(sum, 100.0, 1e-9);
    cr_assert_null(json_object_get(o, "rounds"));
    json_decref(o);

    /* cached until something changes; the status moves when end_time passes */
    const char *again = tly_results_render(p, NOW, NULL);
    cr_assert_eq(again, raw, "no re-render without a change");
    o = results(p, p->end_time, NULL);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "closed");
    json_decref(o);
    cast(NULL, p, "d", "{\"option_id\":\"$0\"}");
    o = results(p, NOW, &raw);
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 4);
    cr_assert(strstr(raw, "\"percentage\":50.0") != NULL || strstr(raw, "\"percentage\":50") != NULL, "%s", raw);
    json_decref(o);
    tly_poll_free(p);
}

Test(results, empty_poll)
{
    tly_poll_t *p = create_ok(body_n("multiple", 2));
    const char *raw;
    json_t *o = results(p, NOW, &raw);
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 0);
    cr_assert_str_eq(json_string_value(json_object_get(o, "as_of")), "2026-04-05T12:00:00.000Z");
    json_t *e = json_array_get(json_object_get(o, "options"), 1);
    cr_assert_eq(json_real_value(json_object_get(e, "percentage")), 0.0);
    json_decref(o);
    tly_poll_free(p);
}

Test(results, multiple_is_share_of_ballots)
{
    tly_poll_t *p = create_ok(body_n("multiple", 3));
    cast(NULL, p, "a", "{\"option_ids\":[\"$0\",\"$1\"]}");
    cast(NULL, p, "b", "{\"option_ids\":[\"$0\"]}");
    cast(NULL, p, "c", "{\"option_ids\":[\"$0\",\"$2\"]}");
    json_t *o = results(p, NOW, NULL);
    json_t *opts = json_object_get(o, "options");
    cr_assert_float_eq(json_real_value(json_object_get(json_array_get(opts, 0), "percentage")), 100.0, 1e-9);
    cr_assert_float_eq(json_real_value(json_object_get(json_array_get(opts, 1), "percentage")), 33.3, 1e-9);
    cr_assert_float_eq(json_real_value(json_object_get(json_array_get(opts, 2), "percentage")), 33.3, 1e-9);
    json_decref(o);
    tly_poll_free(p);
}

Test(results, score_sum_and_mean)
{
    tly_poll_t *p = create_ok(body_n("score", 3));
    cast(NULL, p, "a", "{\"scores\":{\"$0\":5,\"$1\":0}}");
    cast(NULL, p, "b", "{\"scores\":{\"$0\":2,\"$2\":4}}");
    cast(NULL, p, "c", "{\"scores\":{\"$0\":4}}");
    const char *raw;
    json_t *o = results(p, NOW, &raw);
    json_t *opts = json_object_get(o, "options");
    json_t *e0 = json_array_get(opts, 0), *e1 = json_array_get(opts, 1), *e2 = json_array_get(opts, 2);
    cr_assert_eq(json_integer_value(json_object_get(e0, "score_sum")), 11);
    cr_assert_float_eq(json_real_value(json_object_get(e0, "score_mean")), 3.67, 1e-9);
    cr_assert(strstr(raw, "\"score_mean\":3.67") != NULL, "%s", raw);
    cr_assert_eq(json_integer_value(json_object_get(e1, "score_sum")), 0);
    cr_assert_float_eq(json_real_value(json_object_get(e1, "score_mean")), 0.0, 1e-9);
    cr_assert_eq(json_integer_value(json_object_get(e2, "votes")), 1);
    cr_assert_float_eq(json_real_value(json_object_get(e2, "score_mean")), 4.0, 1e-9);
    cr_assert_float_eq(json_real_value(json_object_get(e0, "percentage")), 100.0, 1e-9);
    json_decref(o);
    /* the same numbers when the poll keeps no running sums (rebuilt from the ballots) */
    tly_free(p->score_sum);
    p->score_sum = NULL;
    p->results_dirty = true;
    o = results(p, NOW, NULL);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(json_object_get(o, "options"), 0), "score_sum")),
                 11);
    json_decref(o);
    tly_poll_free(p);
}

/* The Tennessee capital example of Wikipedia's "Instant-runoff voting" (and
 * "Condorcet method") articles, as 100 ballots. */
Test(results, irv_tennessee)
{
    tly_poll_t *p = create_ok(with(body_n("ranked", 4), "options",
                                   J("[{\"text\":\"Memphis\"},{\"text\":\"Nashville\"},{\"text\":\"Chattanooga\"},"
                                     "{\"text\":\"Knoxville\"}]")));
    static const struct {
        int n;
        const char *ranking;
    } groups[] = {
        {42, "{\"ranking\":[\"$0\",\"$1\",\"$2\",\"$3\"]}"},
        {26, "{\"ranking\":[\"$1\",\"$2\",\"$3\",\"$0\"]}"},
        {15, "{\"ranking\":[\"$2\",\"$3\",\"$1\",\"$0\"]}"},
        {17, "{\"ranking\":[\"$3\",\"$2\",\"$1\",\"$0\"]}"},
    };
    int k = 0;
    for (size_t g = 0; g < TLY_ARRAY_SIZE(groups); g++)
        for (int i = 0; i < groups[g].n; i++) {
            char voter[32];
            snprintf(voter, sizeof(voter), "voter%d", k++);
            cast(NULL, p, voter, groups[g].ranking);
        }
    const char *M = p->options[0].option_id, *N = p->options[1].option_id, *C = p->options[2].option_id,
               *K = p->options[3].option_id;
    json_t *o = results(p, NOW, NULL);
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 100);
    cr_assert_str_eq(json_string_value(json_object_get(o, "winner")), K);
    cr_assert_str_eq(json_string_value(json_object_get(o, "condorcet_winner")), N);
    json_t *opts = json_object_get(o, "options");
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(opts, 0), "votes")), 42);
    cr_assert_float_eq(json_real_value(json_object_get(json_array_get(opts, 3), "percentage")), 17.0, 1e-9);
    json_t *rounds = json_object_get(o, "rounds");
    cr_assert_eq(json_array_size(rounds), 3);
    json_t *r1 = json_array_get(rounds, 0), *r2 = json_array_get(rounds, 1), *r3 = json_array_get(rounds, 2);
    json_t *c1 = json_object_get(r1, "counts"), *c2 = json_object_get(r2, "counts"), *c3 = json_object_get(r3, "counts");
    cr_assert_eq(json_integer_value(json_object_get(c1, M)), 42);
    cr_assert_eq(json_integer_value(json_object_get(c1, N)), 26);
    cr_assert_eq(json_integer_value(json_object_get(c1, C)), 15);
    cr_assert_eq(json_integer_value(json_object_get(c1, K)), 17);
    cr_assert_eq(json_array_size(json_object_get(r1, "eliminated")), 1);
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(r1, "eliminated"), 0)), C);
    cr_assert_eq(json_object_size(c2), 3);
    cr_assert_eq(json_integer_value(json_object_get(c2, K)), 32);
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(r2, "eliminated"), 0)), N);
    cr_assert_eq(json_object_size(c3), 2);
    cr_assert_eq(json_integer_value(json_object_get(c3, M)), 42);
    cr_assert_eq(json_integer_value(json_object_get(c3, K)), 58);
    cr_assert_eq(json_array_size(json_object_get(r3, "eliminated")), 0);
    json_decref(o);
    tly_poll_free(p);
}

Test(results, irv_edge_cases)
{
    /* no ballots: no rounds, no winners */
    tly_poll_t *p = create_ok(body_n("ranked", 3));
    json_t *o = results(p, NOW, NULL);
    cr_assert_eq(json_array_size(json_object_get(o, "rounds")), 0);
    cr_assert(json_is_null(json_object_get(o, "winner")));
    cr_assert(json_is_null(json_object_get(o, "condorcet_winner")));
    json_decref(o);

    /* a full tie: the option listed later is eliminated; options nobody ranked first go
     * together in one round */
    cast(NULL, p, "a", "{\"ranking\":[\"$0\"]}");
    cast(NULL, p, "b", "{\"ranking\":[\"$1\"]}");
    o = results(p, NOW, NULL);
    json_t *rounds = json_object_get(o, "rounds");
    cr_assert_eq(json_array_size(rounds), 3);
    json_t *e1 = json_object_get(json_array_get(rounds, 0), "eliminated");
    cr_assert_str_eq(json_string_value(json_array_get(e1, 0)), p->options[2].option_id);
    json_t *e2 = json_object_get(json_array_get(rounds, 1), "eliminated");
    cr_assert_str_eq(json_string_value(json_array_get(e2, 0)), p->options[1].option_id);
    cr_assert_str_eq(json_string_value(json_object_get(o, "winner")), p->options[0].option_id);
    cr_assert(json_is_null(json_object_get(o, "condorcet_winner")), "1:1 is no Condorcet win");
    json_decref(o);
    tly_poll_free(p);

    /* a Condorcet cycle (rock, paper, scissors) has no Condorcet winner */
    p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$0\",\"$1\",\"$2\"]}");
    cast(NULL, p, "b", "{\"ranking\":[\"$1\",\"$2\",\"$0\"]}");
    cast(NULL, p, "c", "{\"ranking\":[\"$2\",\"$0\",\"$1\"]}");
    o = results(p, NOW, NULL);
    cr_assert(json_is_null(json_object_get(o, "condorcet_winner")));
    cr_assert(json_is_string(json_object_get(o, "winner")));
    json_decref(o);
    tly_poll_free(p);

    /* exhausted ballots leave the count: majority of continuing ballots */
    p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$0\"]}");
    cast(NULL, p, "b", "{\"ranking\":[\"$0\"]}");
    cast(NULL, p, "c", "{\"ranking\":[\"$1\"]}");
    cast(NULL, p, "d", "{\"ranking\":[\"$1\"]}");
    cast(NULL, p, "e", "{\"ranking\":[\"$2\"]}");
    o = results(p, NOW, NULL);
    rounds = json_object_get(o, "rounds");
    cr_assert_eq(json_array_size(rounds), 3);
    json_t *last = json_object_get(json_array_get(rounds, 2), "counts");
    cr_assert_eq(json_object_size(last), 1);
    cr_assert_str_eq(json_string_value(json_object_get(o, "winner")), p->options[0].option_id);
    json_decref(o);
    tly_poll_free(p);
}

/* ---- visibility ---- */

Test(visibility, matrix)
{
    static const struct {
        const char *vis;
        bool show_during;
        /* owner, stranger, voter, anonymous: while active, then closed */
        bool active[4], closed[4];
    } cases[] = {
        {"always", true, {1, 1, 1, 1}, {1, 1, 1, 1}},
        {"after_vote", true, {1, 0, 1, 0}, {1, 1, 1, 1}},
        {"after_close", true, {1, 0, 0, 0}, {1, 1, 1, 1}},
        {"owner_only", true, {1, 0, 0, 0}, {1, 0, 0, 0}},
        {"always", false, {1, 0, 0, 0}, {1, 1, 1, 1}},
        {"after_vote", false, {1, 0, 0, 0}, {1, 1, 1, 1}},
        {"owner_only", false, {1, 0, 0, 0}, {1, 0, 0, 0}},
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(cases); i++) {
        char settings[128];
        snprintf(settings, sizeof(settings), "{\"results_visibility\":\"%s\",\"show_results_during_voting\":%s}",
                 cases[i].vis, cases[i].show_during ? "true" : "false");
        tly_poll_t *p = create_ok(
            with(with_settings(body_n("single", 2), settings), "end_time", json_string("2026-04-06T00:00:00Z")));
        for (int closed = 0; closed < 2; closed++) {
            int64_t t = closed ? p->end_time : NOW;
            const bool *want = closed ? cases[i].closed : cases[i].active;
            cr_assert_eq(tly_results_visible(p, "owner1", false, t), want[0], "%s owner closed=%d", settings, closed);
            cr_assert_eq(tly_results_visible(p, "stranger", false, t), want[1], "%s stranger closed=%d", settings,
                         closed);
            cr_assert_eq(tly_results_visible(p, "voter", true, t), want[2], "%s voter closed=%d", settings, closed);
            cr_assert_eq(tly_results_visible(p, NULL, false, t), want[3], "%s anonymous closed=%d", settings, closed);
        }
        /* closing by status works like closing by time */
        p->status = TLY_STATUS_CLOSED;
        cr_assert_eq(tly_results_visible(p, "stranger", false, NOW), cases[i].closed[1]);
        tly_poll_free(p);
    }
}

/* ---- registry ---- */

static tly_poll_t *poll_at(int64_t created, const char *owner)
{
    json_t *b = body_n("single", 2);
    const char *f, *m;
    char buf[64];
    tly_poll_t *p = tly_poll_from_json(b, owner, created, &f, &m, buf, sizeof(buf));
    json_decref(b);
    cr_assert_not_null(p);
    return p;
}

Test(registry, owner_listing_newest_first_with_cursor)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *mine[6];
    /* added out of order, as a store might load them */
    static const int order[6] = {2, 0, 5, 1, 4, 3};
    for (int i = 0; i < 6; i++) {
        mine[order[i]] = poll_at(NOW + order[i] * 1000, "alice");
        tly_registry_add_poll(r, mine[order[i]]);
    }
    tly_registry_add_poll(r, poll_at(NOW + 2500, "bob"));
    cr_assert_eq(tly_registry_find_poll(r, mine[3]->poll_id), mine[3]);
    cr_assert_null(tly_registry_find_poll(r, "AAAAAAAAAAAAAAAA"));

    tly_poll_t *out[10];
    bool more;
    size_t n = tly_registry_list_owner(r, "alice", NULL, out, 4, &more);
    cr_assert_eq(n, 4);
    cr_assert(more);
    for (size_t i = 0; i < 4; i++)
        cr_assert_eq(out[i], mine[5 - i]);
    n = tly_registry_list_owner(r, "alice", out[3]->poll_id, out, 4, &more);
    cr_assert_eq(n, 2);
    cr_assert_not(more);
    cr_assert_eq(out[0], mine[1]);
    cr_assert_eq(out[1], mine[0]);
    n = tly_registry_list_owner(r, "alice", NULL, out, 6, &more);
    cr_assert_eq(n, 6);
    cr_assert_not(more);
    n = tly_registry_list_owner(r, "nobody", NULL, out, 6, &more);
    cr_assert_eq(n, 0);
    n = tly_registry_list_owner(r, "bob", mine[2]->poll_id, out, 6, &more);
    cr_assert_eq(n, 0, "a cursor from another owner lists nothing");

    /* removal keeps the order (head, middle, tail) */
    tly_registry_remove_poll(r, mine[5]);
    tly_registry_remove_poll(r, mine[2]);
    tly_registry_remove_poll(r, mine[0]);
    n = tly_registry_list_owner(r, "alice", NULL, out, 10, &more);
    cr_assert_eq(n, 3);
    cr_assert_eq(out[0], mine[4]);
    cr_assert_eq(out[1], mine[3]);
    cr_assert_eq(out[2], mine[1]);
    /* a new poll after removing the tail still lands in order */
    tly_poll_t *old = poll_at(NOW - 1000, "alice");
    tly_registry_add_poll(r, old);
    n = tly_registry_list_owner(r, "alice", NULL, out, 10, &more);
    cr_assert_eq(n, 4);
    cr_assert_eq(out[3], old);
    tly_registry_remove_poll(r, mine[4]);
    tly_registry_remove_poll(r, mine[3]);
    tly_registry_remove_poll(r, mine[1]);
    tly_registry_remove_poll(r, old);
    n = tly_registry_list_owner(r, "alice", NULL, out, 10, &more);
    cr_assert_eq(n, 0);
    tly_registry_free(r);
}

Test(registry, same_created_at_orders_by_poll_id_desc)
{
    tly_registry_t *r = tly_registry_new();
    for (int i = 0; i < 20; i++)
        tly_registry_add_poll(r, poll_at(NOW, "alice"));
    tly_poll_t *out[20];
    bool more;
    size_t n = tly_registry_list_owner(r, "alice", NULL, out, 20, &more);
    cr_assert_eq(n, 20);
    for (size_t i = 1; i < n; i++)
        cr_assert(strcmp(out[i - 1]->poll_id, out[i]->poll_id) > 0);
    tly_registry_free(r);
}

/* ---- allocation failure ---- */

Test(oom, create_patch_vote_render_fail_cleanly)
{
    for (long budget = 0; budget < 40; budget++) {
        json_t *b = with(body_n("score", 4), "description", json_string("d"));
        const char *f = "x", *m = "x";
        char buf[64];
        tly_alloc_fail_after(budget);
        tly_poll_t *p = tly_poll_from_json(b, "owner1", NOW, &f, &m, buf, sizeof(buf));
        tly_alloc_fail_after(-1);
        json_decref(b);
        if (p == NULL) {
            cr_assert_null(f, "out of memory is not a validation error");
            cr_assert_null(m);
            continue;
        }
        cast(NULL, p, "a", "{\"scores\":{\"$0\":3}}");
        json_t *pb = J("{\"title\":\"t\",\"description\":\"e\"}");
        tly_alloc_fail_after(budget);
        int rc = tly_poll_patch(p, pb, NOW, &f, &m, buf, sizeof(buf));
        tly_alloc_fail_after(-1);
        json_decref(pb);
        cr_assert(rc == 0 || rc == TLY_ENOMEM);
        if (rc == TLY_ENOMEM)
            cr_assert_str_eq(p->title, "Best?", "unchanged after a failed patch");
        tly_ballot_t bal = {.nchoices = 1, .choices = {1}, .scores = {2}};
        tly_alloc_fail_after(budget);
        tly_vote_t *v = tly_vote_new(&bal, "voter", "idem", NULL, NULL, NOW);
        const char *s = tly_results_render(p, NOW, NULL);
        tly_alloc_fail_after(-1);
        tly_vote_free(v);
        (void)s;
        tly_poll_free(p);
    }
}
