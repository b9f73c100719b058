/*
 * test_core.c: the polling domain. Validation limits and the field each error names,
 * defaults per type, ballots of every type, counting, percentages, results JSON,
 * instant-runoff, visibility, the registry and its listing order, vote changes, the
 * timelines and votes_last_minute, final results, and allocation failure.
 */
/* uthash's own consistency check (HASH_FSCK) for the maps a vote change moves */
#define HASH_DEBUG 1

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
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

/* A create body whose title is t (a C string, any bytes). */
static json_t *titled(const char *t) { return with(body_n("single", 2), "title", json_string(t)); }

/* A create body with these option texts (NULL-terminated). */
static json_t *options_of(const char *const *texts)
{
    json_t *opts = json_array();
    for (size_t i = 0; texts[i] != NULL; i++)
        json_array_append_new(opts, json_pack("{s:s}", "text", texts[i]));
    return with(body_n("single", 2), "options", opts);
}

Test(poll, title_of_invisible_or_space_characters_only_is_empty)
{
    const char *blank[] = {
        "\xc2\xa0",                                     /* U+00A0 */
        "\xe3\x80\x80\xe3\x80\x80",                     /* U+3000 */
        "\xe2\x80\x8b",                                 /* U+200B zero width space */
        "\xe2\x80\x8d\xef\xbb\xbf\xe2\x81\xa0",         /* ZWJ, BOM, word joiner */
        " \xc2\xa0\xe2\x80\x8b\t\xe2\x80\x83 ",         /* a mix */
        "\xe1\xa0\x8e",                                 /* U+180E */
        "\xe3\x85\xa4",                                 /* U+3164 Hangul filler */
        "\xe2\x80\xae\xc2\xad",                         /* RLO, soft hyphen */
        "\x01\x7f",                                     /* controls */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(blank); i++) {
        const char *f = NULL, *m = NULL;
        cr_assert_null(create(titled(blank[i]), &f, &m), "#%zu", i);
        cr_assert_str_eq(f, "title", "#%zu", i);
        cr_assert_not_null(strstr(m, "no visible character"), "#%zu: %s", i, m);
    }
    tly_poll_free(create_ok(titled("\xe2\x80\x8bX\xe2\x80\x8b"))); /* one visible character is enough */
}

Test(poll, title_and_option_texts_lose_white_space_at_the_ends_only)
{
    tly_poll_t *p = create_ok(titled(" \xc2\xa0 Best  language?\xe3\x80\x80\n"));
    cr_assert_str_eq(p->title, "Best  language?", "trimmed, and kept as typed inside");
    tly_poll_free(p);
    p = create_ok(titled("I \xe2\x9d\xa4\xef\xb8\x8f "));
    cr_assert_str_eq(p->title, "I \xe2\x9d\xa4\xef\xb8\x8f", "an emoji's variation selector stays");
    tly_poll_free(p);
    p = create_ok(options_of((const char *[]){"  Cafe\xcc\x81 ", "\tTea", NULL}));
    cr_assert_str_eq(p->options[0].text, "Cafe\xcc\x81", "not normalized: stored as typed");
    cr_assert_str_eq(p->options[1].text, "Tea");
    tly_poll_free(p);
    /* the length limit counts what is kept */
    char *t300 = repeat("x", 300), *padded = NULL;
    cr_assert(asprintf(&padded, "   %s   ", t300) > 0);
    p = create_ok(titled(padded));
    cr_assert_str_eq(p->title, t300);
    tly_poll_free(p);
    free(t300);
    free(padded);
}

Test(poll, option_texts_that_read_the_same_are_duplicates)
{
    const char *const dups[][4] = {
        {"Yes", "yes", NULL},
        {"Yes", "No", "YES ", NULL},
        {"Caf\xc3\xa9", "Cafe\xcc\x81", NULL},           /* NFC and NFD */
        {"Go", "Go\xe2\x80\x8b", NULL},                  /* a zero width space */
        {"New York", "New\xc2\xa0\xc2\xa0York", NULL},   /* spacing */
        {"Stra\xc3\x9f" "e", "STRASSE", NULL},           /* full case folding */
    };
    for (size_t i = 0; i < TLY_ARRAY_SIZE(dups); i++) {
        size_t last = 0;
        while (dups[i][last + 1] != NULL)
            last++;
        char field[32];
        snprintf(field, sizeof(field), "options[%zu].text", last);
        const char *f = NULL, *m = NULL;
        cr_assert_null(create(options_of(dups[i]), &f, &m), "case %zu", i);
        cr_assert_str_eq(f, field, "case %zu names the later one", i);
        cr_assert_not_null(strstr(m, "unique"), "%s", m);
    }
    /* distinct to a reader: accepted */
    tly_poll_free(create_ok(options_of((const char *[]){"Go", "Go!", "G o", "x2", "x\xc2\xb2", "C", "C#", NULL})));
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
    /* compared as a reader sees them: case differs only, so they are the same option */
    create_fails(with(body_n("single", 2), "options", J("[{\"text\":\"Go\"},{\"text\":\"go\"}]")),
                 "options[1].text");
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

/* Found by tests/fuzz/fuzz_ballot (corpus: regress_*_offset_*): an offset that carried a
 * time out of 1970..9999 UTC was accepted, and the poll then showed a start_time that
 * its own PATCH refused (1969-12-31T23:00:00.000Z) or an end_time other than the one
 * stored (9999-12-31T23:59:59.999Z, the formatter's ceiling). */
Test(poll, times_are_ones_the_poll_can_show_and_take_back)
{
    create_fails(with(body_n("single", 2), "start_time", json_string("1970-01-01T00:00:00+01:00")), "start_time");
    create_fails(with(body_n("single", 2), "end_time", json_string("9999-12-31T23:59:59-01:00")), "end_time");
    /* the first and last instants that can be written back still work, both ways */
    tly_poll_t *p = create_ok(with(with(body_n("single", 2), "start_time", json_string("1970-01-01T01:00:00.001+01:00")),
                                   "end_time", json_string("9999-12-31T23:59:59.999Z")));
    cr_assert_eq(p->start_time, 1);
    cr_assert_eq(p->end_time, INT64_C(253402300799999));
    json_t *shown = tly_poll_to_json(p, NOW);
    cr_assert_str_eq(json_string_value(json_object_get(shown, "start_time")), "1970-01-01T00:00:00.001Z");
    cr_assert_str_eq(json_string_value(json_object_get(shown, "end_time")), "9999-12-31T23:59:59.999Z");
    const char *f = NULL, *m = NULL;
    char buf[64];
    cr_assert_eq(tly_poll_patch(p, shown, NOW, &f, &m, buf, sizeof(buf)), 0, "%s: %s", f ? f : "", m ? m : "");
    cr_assert_eq(p->start_time, 1);
    cr_assert_eq(p->end_time, INT64_C(253402300799999));
    json_decref(shown);
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
    uint64_t seq = p->seq, edits = p->edits;
    cr_assert_eq(patch(p, "{\"title\":\"New\",\"description\":null}", &f), 0);
    cr_assert_str_eq(p->title, "New");
    cr_assert_null(p->description);
    cr_assert_eq(p->updated_at, NOW + 1000);
    cr_assert(p->results_dirty);
    /* live streams number states without counts by edits: a change to the poll moves it,
     * and only that (seq is the counts') */
    cr_assert_eq(p->edits, edits + 1);
    cr_assert_eq(p->seq, seq);
    cr_assert_eq(patch(p, "{\"title\":\"\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "title");
    cr_assert_str_eq(p->title, "New", "unchanged on error");
    cr_assert_eq(p->edits, edits + 1, "a refused change is no edit");
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

Test(patch, applies_the_same_text_rules)
{
    tly_poll_t *p = create_ok(body_n("single", 3));
    const char *f;
    cr_assert_eq(patch(p, "{\"title\":\"\\u3000\\u200b\"}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "title");
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"A\"},{\"text\":\"\\u00a0\"}]}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "options[1].text");
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"Maybe\"},{\"text\":\"maybe \"}]}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "options[1].text");
    cr_assert_str_eq(p->title, "Best?", "refused patches change nothing");
    cr_assert_str_eq(p->options[1].text, "o1");
    cr_assert_eq(patch(p, "{\"title\":\"  Renamed \\u00a0\",\"options\":[{\"text\":\" A\"},{\"text\":\"B \"}]}", &f),
                 0);
    cr_assert_str_eq(p->title, "Renamed");
    cr_assert_str_eq(p->options[0].text, "A");
    cr_assert_str_eq(p->options[1].text, "B");
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

/* ---- vote changes ---- */

#define MIN INT64_C(60000)

/* A committed vote of ballot b cast at `at` (recorded_at), committed at the same time. */
static tly_vote_t *cast_at(tly_registry_t *r, tly_poll_t *p, const char *voter, const tly_ballot_t *b, int64_t at)
{
    tly_vote_t *v = tly_vote_new(b, voter, NULL, NULL, NULL, at);
    cr_assert_not_null(v);
    tly_poll_add_vote(r, p, v);
    tly_poll_commit_vote(p, v, at);
    return v;
}

static tly_ballot_t parsed(const tly_poll_t *p, const char *tmpl)
{
    tly_ballot_t b;
    cr_assert_eq(ballot(p, ids(p, tmpl), &b, NULL), TLY_BALLOT_OK, "%s", tmpl);
    return b;
}

static tly_vote_t *change(tly_registry_t *r, tly_poll_t *p, tly_vote_t *v, const char *tmpl, int64_t now)
{
    tly_ballot_t b = parsed(p, tmpl);
    tly_vote_t *out = NULL;
    cr_assert_eq(tly_poll_change_vote(r, p, v, &b, now, &out), 0);
    cr_assert_not_null(out);
    return out;
}

static void assert_votes(const tly_poll_t *p, const uint64_t *want)
{
    for (size_t i = 0; i < p->noptions; i++)
        cr_assert_eq(p->options[i].votes, want[i], "option %zu: %llu, want %llu", i,
                     (unsigned long long)p->options[i].votes, (unsigned long long)want[i]);
}

/* The head of the receipt map, found from one of its votes. */
static tly_vote_t *receipts_head(tly_vote_t *any)
{
    tly_vote_t *v = any;
    while (v->hh_receipt.prev != NULL)
        v = v->hh_receipt.prev;
    return v;
}

/* Both maps are sound, and every vote of p is found under its voter and its receipt. */
static void assert_maps(tly_registry_t *r, tly_poll_t *p)
{
    HASH_FSCK(hh, p->votes, "votes");
    size_t n = 0;
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next, n++) {
        cr_assert_eq(tly_poll_find_vote(p, v->voter_id), v, "voter %s", v->voter_id);
        if (r != NULL)
            cr_assert_eq(tly_registry_find_receipt(r, v->receipt), v, "receipt of %s", v->voter_id);
    }
    cr_assert_eq(n, HASH_COUNT(p->votes));
    if (r != NULL && p->votes != NULL) {
        tly_vote_t *head = receipts_head(p->votes);
        HASH_FSCK(hh_receipt, head, "receipts");
    }
}

Test(change, single_moves_the_count_and_keeps_identity)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("single", 3));
    tly_registry_add_poll(r, p);
    tly_vote_t *a = cast(r, p, "alice", "{\"option_id\":\"$0\"}");
    cast(r, p, "bob", "{\"option_id\":\"$0\"}");
    char vote_id[TLY_VOTE_ID_LEN + 1], receipt[TLY_RECEIPT_LEN + 1];
    strcpy(vote_id, a->vote_id);
    strcpy(receipt, a->receipt);
    uint64_t seq = p->seq;
    tly_vote_t *a2 = change(r, p, a, "{\"option_id\":\"$2\"}", NOW + HOUR);
    cr_assert_eq(a2, a, "same size: changed in place");
    assert_votes(p, (uint64_t[]){1, 0, 1});
    cr_assert_eq(p->total_votes, 2, "a change is not a new ballot");
    cr_assert_eq(p->seq, seq + 1);
    cr_assert_eq(p->as_of, NOW + HOUR);
    cr_assert(p->results_dirty);
    cr_assert_str_eq(a2->vote_id, vote_id);
    cr_assert_str_eq(a2->receipt, receipt);
    cr_assert_str_eq(a2->voter_id, "alice");
    cr_assert_eq(a2->recorded_at, NOW + HOUR);
    cr_assert_eq(a2->state, TLY_VOTE_COMMITTED);
    assert_maps(r, p);
    json_t *o = results(p, NOW + HOUR, NULL);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(json_object_get(o, "options"), 2), "votes")), 1);
    json_decref(o);
    /* the same ballot again is still a change (the API may skip it) */
    change(r, p, a2, "{\"option_id\":\"$2\"}", NOW + HOUR + 1);
    assert_votes(p, (uint64_t[]){1, 0, 1});
    cr_assert_eq(p->seq, seq + 2);
    tly_registry_free(r);
}

Test(change, multiple_grows_and_shrinks_the_vote_keeping_both_maps)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("multiple", 4));
    tly_registry_add_poll(r, p);
    /* the changed vote first, in the middle and last in both maps */
    tly_vote_t *v[5];
    const char *names[5] = {"a", "b", "c", "d", "e"};
    for (int i = 0; i < 5; i++)
        v[i] = cast(r, p, names[i], "{\"option_ids\":[\"$0\"]}");
    assert_votes(p, (uint64_t[]){5, 0, 0, 0});
    int order[3] = {0, 2, 4};
    for (int k = 0; k < 3; k++) {
        int i = order[k];
        char receipt[TLY_RECEIPT_LEN + 1];
        strcpy(receipt, v[i]->receipt);
        tly_vote_t *w = change(r, p, v[i], "{\"option_ids\":[\"$1\",\"$2\",\"$3\"]}", NOW + MIN);
        v[i] = w;
        cr_assert_eq(w->nchoices, 3);
        cr_assert_eq(tly_poll_find_vote(p, names[i]), w);
        cr_assert_eq(tly_registry_find_receipt(r, receipt), w);
        cr_assert_eq(w->poll, p);
        assert_maps(r, p);
    }
    assert_votes(p, (uint64_t[]){2, 3, 3, 3});
    cr_assert_eq(p->total_votes, 5);
    /* fewer choices: in place */
    tly_vote_t *w = change(r, p, v[2], "{\"option_ids\":[\"$3\"]}", NOW + 2 * MIN);
    cr_assert_eq(w, v[2]);
    assert_votes(p, (uint64_t[]){2, 2, 2, 3});
    json_t *got = tly_ballot_to_json(p, w), *want = J(ids(p, "{\"option_ids\":[\"$3\"]}"));
    cr_assert(json_equal(got, want));
    json_decref(got);
    json_decref(want);
    /* retracting a moved vote and removing the poll leave nothing behind */
    tly_poll_retract_vote(r, p, v[0], NOW + 3 * MIN);
    assert_votes(p, (uint64_t[]){2, 1, 1, 2});
    assert_maps(r, p);
    tly_registry_remove_poll(r, p);
    tly_registry_free(r);
}

Test(change, ranked_moves_first_preferences_and_rounds)
{
    tly_poll_t *p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$0\",\"$1\"]}");
    cast(NULL, p, "b", "{\"ranking\":[\"$0\"]}");
    tly_vote_t *c = cast(NULL, p, "c", "{\"ranking\":[\"$1\"]}");
    assert_votes(p, (uint64_t[]){2, 1, 0});
    c = change(NULL, p, c, "{\"ranking\":[\"$2\",\"$1\",\"$0\"]}", NOW + MIN);
    assert_votes(p, (uint64_t[]){2, 0, 1});
    json_t *o = results(p, NOW + MIN, NULL);
    json_t *c1 = json_object_get(json_array_get(json_object_get(o, "rounds"), 0), "counts");
    cr_assert_eq(json_integer_value(json_object_get(c1, p->options[2].option_id)), 1);
    cr_assert_str_eq(json_string_value(json_object_get(o, "winner")), p->options[0].option_id);
    json_decref(o);
    assert_maps(NULL, p);
    tly_poll_free(p);
}

Test(change, score_moves_sums_and_votes)
{
    tly_poll_t *p = create_ok(body_n("score", 3));
    cast(NULL, p, "a", "{\"scores\":{\"$0\":5}}");
    tly_vote_t *b = cast(NULL, p, "b", "{\"scores\":{\"$0\":2,\"$2\":4}}");
    b = change(NULL, p, b, "{\"scores\":{\"$0\":0,\"$1\":3,\"$2\":1}}", NOW + MIN);
    assert_votes(p, (uint64_t[]){1, 1, 1});
    cr_assert_eq(p->score_sum[0], 5);
    cr_assert_eq(p->score_sum[1], 3);
    cr_assert_eq(p->score_sum[2], 1);
    cr_assert_eq(p->score_sum[3 + 0], 2, "a 0 score still rated the option");
    cr_assert_eq(p->score_sum[3 + 1], 1);
    cr_assert_eq(p->score_sum[3 + 2], 1);
    json_t *o = results(p, NOW + MIN, NULL);
    json_t *e0 = json_array_get(json_object_get(o, "options"), 0);
    cr_assert_float_eq(json_real_value(json_object_get(e0, "score_mean")), 2.5, 1e-9);
    json_decref(o);
    tly_poll_free(p);
}

Test(change, refuses_pending_foreign_and_bad_ballots_unchanged)
{
    tly_registry_t *r = tly_registry_new(), *other = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("single", 3)), *q = create_ok(body_n("single", 3));
    tly_registry_add_poll(r, p);
    tly_registry_add_poll(other, q);
    cast(other, q, "x", "{\"option_id\":\"$0\"}");
    tly_ballot_t b = {.nchoices = 1, .choices = {1}};
    tly_vote_t *pending = tly_vote_new(&b, "pending", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(r, p, pending);
    tly_vote_t *out = NULL;
    cr_assert_eq(tly_poll_change_vote(r, p, pending, &b, NOW, &out), TLY_ESTATE);
    cr_assert_eq(out, pending);
    tly_vote_t *v = cast(r, p, "v", "{\"option_id\":\"$0\"}");
    uint64_t seq = p->seq;
    tly_ballot_t bad = {.nchoices = 1, .choices = {3}};
    cr_assert_eq(tly_poll_change_vote(r, p, v, &bad, NOW, &out), TLY_EINVAL);
    cr_assert_eq(tly_poll_change_vote(r, q, v, &b, NOW, &out), TLY_EINVAL, "not q's vote");
    tly_ballot_t two = {.nchoices = 2, .choices = {1, 2}};
    cr_assert_eq(tly_poll_change_vote(NULL, p, v, &two, NOW, &out), TLY_EINVAL, "its registry is needed");
    cr_assert_eq(tly_poll_change_vote(other, p, v, &two, NOW, &out), TLY_EINVAL, "another registry");
    cr_assert_eq(out, v);
    cr_assert_eq(p->seq, seq);
    assert_votes(p, (uint64_t[]){1, 0, 0});
    assert_maps(r, p);
    tly_registry_free(r);
    tly_registry_free(other);
}

Test(oom, change_vote_fails_whole)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("multiple", 4));
    tly_registry_add_poll(r, p);
    tly_vote_t *v = cast(r, p, "a", "{\"option_ids\":[\"$0\"]}");
    cast(r, p, "b", "{\"option_ids\":[\"$0\"]}");
    tly_ballot_t b = parsed(p, "{\"option_ids\":[\"$1\",\"$2\"]}");
    uint64_t seq = p->seq;
    int64_t at = v->recorded_at;
    tly_vote_t *out = NULL;
    tly_alloc_fail_after(0);
    int rc = tly_poll_change_vote(r, p, v, &b, NOW + MIN, &out);
    tly_alloc_fail_after(-1);
    cr_assert_eq(rc, TLY_ENOMEM);
    cr_assert_eq(out, v);
    cr_assert_eq(v->nchoices, 1);
    cr_assert_eq(v->recorded_at, at);
    cr_assert_eq(p->seq, seq);
    assert_votes(p, (uint64_t[]){2, 0, 0, 0});
    assert_maps(r, p);
    /* the same change with memory works */
    out = change(r, p, v, "{\"option_ids\":[\"$1\",\"$2\"]}", NOW + MIN);
    assert_votes(p, (uint64_t[]){1, 1, 1, 0});
    assert_maps(r, p);
    tly_registry_free(r);
}

/* ---- the ballot as first cast ---- */

/* A committed vote of voter with an Idempotency-Key, cast at NOW. */
static tly_vote_t *cast_keyed(tly_registry_t *r, tly_poll_t *p, const char *voter, const char *key, const char *tmpl)
{
    tly_ballot_t b = parsed(p, tmpl);
    tly_vote_t *v = tly_vote_new(&b, voter, key, NULL, NULL, NOW);
    cr_assert_not_null(v);
    cr_assert_eq(tly_poll_add_vote(r, p, v), 0);
    tly_poll_commit_vote(p, v, NOW);
    return v;
}

/* tly_vote_cast_option_ids as a compact JSON string (the caller frees), and its time. */
static char *cast_ids(const tly_poll_t *p, const tly_vote_t *v, int64_t *at)
{
    json_t *a = tly_vote_cast_option_ids(p, v, at);
    cr_assert_not_null(a);
    char *s = json_dumps(a, JSON_COMPACT);
    json_decref(a);
    return s;
}

static void assert_cast(const tly_poll_t *p, const tly_vote_t *v, const char *tmpl_ids, int64_t want_at)
{
    int64_t at = 0;
    char *got = cast_ids(p, v, &at);
    cr_assert_str_eq(got, ids(p, tmpl_ids));
    cr_assert_eq(at, want_at);
    free(got);
}

Test(first_cast, a_change_keeps_the_ballot_as_cast_for_a_vote_with_a_key)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("multiple", 4));
    tly_registry_add_poll(r, p);
    tly_vote_t *v = cast_keyed(r, p, "a", "k1", "{\"option_ids\":[\"$0\"]}");
    tly_vote_t *plain = cast(r, p, "b", "{\"option_ids\":[\"$0\"]}");
    assert_cast(p, v, "[\"$0\"]", NOW); /* never changed: the ballot as it stands */

    /* more choices than before: the vote moves, the copy with it */
    v = change(r, p, v, "{\"option_ids\":[\"$1\",\"$2\",\"$3\"]}", NOW + MIN);
    assert_cast(p, v, "[\"$0\"]", NOW);
    json_t *now_ids = tly_vote_option_ids(p, v);
    char *s = json_dumps(now_ids, JSON_COMPACT);
    cr_assert_str_eq(s, ids(p, "[\"$1\",\"$2\",\"$3\"]"), "the vote itself holds the change");
    free(s);
    json_decref(now_ids);
    cr_assert_eq(v->recorded_at, NOW + MIN);
    /* a second change keeps the first cast */
    v = change(r, p, v, "{\"option_ids\":[\"$2\"]}", NOW + 2 * MIN);
    assert_cast(p, v, "[\"$0\"]", NOW);
    assert_maps(r, p);

    /* a vote without a key cannot be replayed: it keeps no copy */
    plain = change(r, p, plain, "{\"option_ids\":[\"$3\"]}", NOW + MIN);
    cr_assert_null(plain->cast);
    assert_cast(p, plain, "[\"$3\"]", NOW + MIN);
    tly_registry_free(r); /* frees the copies (the ASan build would see a leak) */
}

Test(first_cast, score_ballots_keep_their_scores_and_set_cast_checks_the_options)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("score", 3));
    tly_registry_add_poll(r, p);
    tly_vote_t *v = cast_keyed(r, p, "a", "k1", "{\"scores\":{\"$0\":0,\"$1\":3}}");
    v = change(r, p, v, "{\"scores\":{\"$0\":4,\"$1\":0,\"$2\":1}}", NOW + MIN);
    assert_cast(p, v, "[\"$1\"]", NOW); /* option ids of a score ballot: scored above 0 */

    /* load: the store's copy replaces whatever the vote had */
    tly_ballot_t first = {.nchoices = 2, .choices = {0, 2}, .scores = {2, 5}};
    cr_assert_eq(tly_vote_set_cast(v, &first, NOW - MIN), 0);
    assert_cast(p, v, "[\"$0\",\"$2\"]", NOW - MIN);
    tly_ballot_t outside = {.nchoices = 1, .choices = {3}, .scores = {1}};
    cr_assert_eq(tly_vote_set_cast(v, &outside, NOW), TLY_EINVAL);
    assert_cast(p, v, "[\"$0\",\"$2\"]", NOW - MIN);
    tly_ballot_t b = parsed(p, "{\"scores\":{\"$0\":1}}");
    tly_vote_t *loose = tly_vote_new(&b, "loose", "k", NULL, NULL, NOW);
    cr_assert_eq(tly_vote_set_cast(loose, &first, NOW), TLY_EINVAL, "not added to a poll");
    tly_alloc_fail_after(0);
    int rc = tly_vote_set_cast(v, &b, NOW);
    tly_alloc_fail_after(-1);
    cr_assert_eq(rc, TLY_ENOMEM);
    assert_cast(p, v, "[\"$0\",\"$2\"]", NOW - MIN);
    tly_vote_free(loose);
    tly_registry_free(r);
}

Test(oom, first_change_of_a_keyed_vote_fails_whole)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("multiple", 4));
    tly_registry_add_poll(r, p);
    tly_vote_t *v = cast_keyed(r, p, "a", "k1", "{\"option_ids\":[\"$0\"]}");
    tly_ballot_t small = parsed(p, "{\"option_ids\":[\"$1\"]}"), big = parsed(p, "{\"option_ids\":[\"$1\",\"$2\"]}");
    uint64_t seq = p->seq;
    tly_vote_t *out = NULL;
    /* the copy is the first allocation; a bigger ballot's vote the second */
    for (long n = 0; n < 2; n++) {
        tly_alloc_fail_after(n);
        int rc = tly_poll_change_vote(r, p, v, n == 0 ? &small : &big, NOW + MIN, &out);
        tly_alloc_fail_after(-1);
        cr_assert_eq(rc, TLY_ENOMEM, "allocation %ld", n);
        cr_assert_eq(out, v);
        cr_assert_null(v->cast, "no copy left behind");
        cr_assert_eq(v->recorded_at, NOW);
        cr_assert_eq(p->seq, seq);
        assert_votes(p, (uint64_t[]){1, 0, 0, 0});
    }
    assert_maps(r, p);
    v = change(r, p, v, "{\"option_ids\":[\"$1\",\"$2\"]}", NOW + MIN);
    assert_cast(p, v, "[\"$0\"]", NOW);
    tly_registry_free(r);
}

/* ---- timelines ---- */

/* Every item of p's timeline in [from, to), following "truncated" page by page. */
static json_t *timeline_all(const tly_poll_t *p, int64_t bucket, int64_t from, int64_t to)
{
    json_t *all = json_array();
    for (;;) {
        json_t *o = tly_timeline_json(p, bucket, from, to);
        cr_assert_not_null(o);
        json_t *items = json_object_get(o, "items");
        cr_assert(json_is_array(items));
        json_array_extend(all, items);
        bool truncated = json_is_true(json_object_get(o, "truncated"));
        cr_assert_eq(truncated, json_array_size(items) == TLY_TIMELINE_MAX_ITEMS, "truncated only when full");
        if (!truncated) {
            json_decref(o);
            return all;
        }
        int64_t last;
        cr_assert_eq(tly_time_parse(json_string_value(json_object_get(json_array_get(items, TLY_TIMELINE_MAX_ITEMS - 1),
                                                                      "start")),
                                    &last),
                     0);
        from = last + bucket;
        json_decref(o);
    }
}

static int64_t item_start(json_t *item)
{
    int64_t t = 0;
    cr_assert_eq(tly_time_parse(json_string_value(json_object_get(item, "start")), &t), 0);
    return t;
}

static json_int_t item_count(const tly_poll_t *p, json_t *item, size_t option)
{
    json_t *n = json_object_get(json_object_get(item, "counts"), p->options[option].option_id);
    return n == NULL ? 0 : json_integer_value(n);
}

Test(timeline, buckets_aligned_to_the_epoch_and_json_shape)
{
    cr_assert_eq(tly_timeline_bucket_ms("10s"), 10000);
    cr_assert_eq(tly_timeline_bucket_ms("1m"), 60000);
    cr_assert_eq(tly_timeline_bucket_ms("1h"), 3600000);
    cr_assert_eq(tly_timeline_bucket_ms("5m"), 0);
    cr_assert_eq(tly_timeline_bucket_ms(NULL), 0);

    tly_poll_t *p = create_ok(body_n("single", 3));
    json_t *o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, INT64_MAX), *empty = J("{\"bucket\":\"10s\",\"items\":[]}");
    cr_assert(json_equal(o, empty), "an empty poll has an empty timeline");
    json_decref(o);
    json_decref(empty);
    cr_assert_null(tly_timeline_json(p, 30000, 0, INT64_MAX), "only 10s, 1m and 1h");

    tly_ballot_t o0 = {.nchoices = 1, .choices = {0}}, o2 = {.nchoices = 1, .choices = {2}};
    /* 12:00:12.345, 12:00:19.999 and 12:00:20.000, 12:01:05, 13:30 */
    cast_at(NULL, p, "a", &o0, NOW + 12345);
    cast_at(NULL, p, "b", &o2, NOW + 19999);
    cast_at(NULL, p, "c", &o0, NOW + 20000);
    cast_at(NULL, p, "d", &o0, NOW + MIN + 5000);
    tly_vote_t *e = cast_at(NULL, p, "e", &o2, NOW + 90 * MIN);

    o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    json_t *want = J(ids(p, "{\"bucket\":\"10s\",\"items\":["
                            "{\"start\":\"2026-04-05T12:00:10.000Z\",\"counts\":{\"$0\":1,\"$2\":1}},"
                            "{\"start\":\"2026-04-05T12:00:20.000Z\",\"counts\":{\"$0\":1}},"
                            "{\"start\":\"2026-04-05T12:01:00.000Z\",\"counts\":{\"$0\":1}},"
                            "{\"start\":\"2026-04-05T13:30:00.000Z\",\"counts\":{\"$2\":1}}]}"));
    cr_assert(json_equal(o, want), "%s", json_dumps(o, JSON_COMPACT));
    json_decref(o);
    json_decref(want);
    o = tly_timeline_json(p, TLY_TIMELINE_1M, 0, INT64_MAX);
    want = J(ids(p, "{\"bucket\":\"1m\",\"items\":["
                    "{\"start\":\"2026-04-05T12:00:00.000Z\",\"counts\":{\"$0\":2,\"$2\":1}},"
                    "{\"start\":\"2026-04-05T12:01:00.000Z\",\"counts\":{\"$0\":1}},"
                    "{\"start\":\"2026-04-05T13:30:00.000Z\",\"counts\":{\"$2\":1}}]}"));
    cr_assert(json_equal(o, want), "%s", json_dumps(o, JSON_COMPACT));
    json_decref(o);
    json_decref(want);
    o = tly_timeline_json(p, TLY_TIMELINE_1H, 0, INT64_MAX);
    want = J(ids(p, "{\"bucket\":\"1h\",\"items\":["
                    "{\"start\":\"2026-04-05T12:00:00.000Z\",\"counts\":{\"$0\":3,\"$2\":1}},"
                    "{\"start\":\"2026-04-05T13:00:00.000Z\",\"counts\":{\"$2\":1}}]}"));
    cr_assert(json_equal(o, want), "%s", json_dumps(o, JSON_COMPACT));
    json_decref(o);
    json_decref(want);

    /* [from, to) on bucket starts: a bucket starting before `from` is not listed */
    json_t *items = timeline_all(p, TLY_TIMELINE_10S, NOW + 10000, NOW + MIN);
    cr_assert_eq(json_array_size(items), 2);
    cr_assert_eq(item_start(json_array_get(items, 0)), NOW + 10000);
    cr_assert_eq(item_start(json_array_get(items, 1)), NOW + 20000);
    json_decref(items);
    items = timeline_all(p, TLY_TIMELINE_10S, NOW + 10001, NOW + MIN + 1);
    cr_assert_eq(json_array_size(items), 2);
    cr_assert_eq(item_start(json_array_get(items, 0)), NOW + 20000);
    cr_assert_eq(item_start(json_array_get(items, 1)), NOW + MIN);
    json_decref(items);

    /* retracted away: a bucket left empty is not listed */
    tly_poll_retract_vote(NULL, p, e, NOW + 91 * MIN);
    items = timeline_all(p, TLY_TIMELINE_1H, 0, INT64_MAX);
    cr_assert_eq(json_array_size(items), 1);
    json_decref(items);
    tly_poll_free(p);
}

Test(timeline, counts_what_results_count_per_type)
{
    /* ranked: the first preference; score: options scored above 0 */
    tly_poll_t *p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$1\",\"$0\",\"$2\"]}");
    json_t *items = timeline_all(p, TLY_TIMELINE_1M, 0, INT64_MAX);
    cr_assert_eq(json_object_size(json_object_get(json_array_get(items, 0), "counts")), 1);
    cr_assert_eq(item_count(p, json_array_get(items, 0), 1), 1);
    json_decref(items);
    tly_poll_free(p);
    p = create_ok(body_n("score", 3));
    cast(NULL, p, "a", "{\"scores\":{\"$0\":0,\"$2\":4}}");
    cast(NULL, p, "b", "{\"scores\":{\"$0\":0}}");
    items = timeline_all(p, TLY_TIMELINE_1M, 0, INT64_MAX);
    cr_assert_eq(json_array_size(items), 1);
    cr_assert_eq(json_object_size(json_object_get(json_array_get(items, 0), "counts")), 1);
    cr_assert_eq(item_count(p, json_array_get(items, 0), 2), 1);
    json_decref(items);
    tly_poll_free(p);
}

Test(timeline, truncated_at_1000_items_and_pages)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    tly_ballot_t o1 = {.nchoices = 1, .choices = {1}};
    for (int i = 0; i < 1500; i++) {
        char voter[16];
        snprintf(voter, sizeof(voter), "v%d", i);
        cast_at(NULL, p, voter, &o1, NOW + i * INT64_C(10000) + 3);
    }
    json_t *o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    cr_assert_eq(json_array_size(json_object_get(o, "items")), 1000);
    cr_assert(json_is_true(json_object_get(o, "truncated")));
    json_decref(o);
    o = tly_timeline_json(p, TLY_TIMELINE_10S, NOW + 1000 * INT64_C(10000), INT64_MAX);
    cr_assert_eq(json_array_size(json_object_get(o, "items")), 500);
    cr_assert_null(json_object_get(o, "truncated"));
    json_decref(o);
    o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, NOW + 1000 * INT64_C(10000));
    cr_assert_eq(json_array_size(json_object_get(o, "items")), 1000);
    cr_assert_null(json_object_get(o, "truncated"), "exactly 1000 in range: nothing cut");
    json_decref(o);
    json_t *all = timeline_all(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    cr_assert_eq(json_array_size(all), 1500);
    for (size_t i = 0; i < 1500; i++)
        cr_assert_eq(item_start(json_array_get(all, i)), NOW + (int64_t)i * 10000);
    json_decref(all);
    tly_poll_free(p);
}

/* Sum of one option over a resolution's whole timeline. */
static uint64_t timeline_sum(const tly_poll_t *p, int64_t bucket, size_t option)
{
    json_t *all = timeline_all(p, bucket, 0, INT64_MAX);
    uint64_t sum = 0;
    for (size_t i = 0; i < json_array_size(all); i++)
        sum += (uint64_t)item_count(p, json_array_get(all, i), option);
    json_decref(all);
    return sum;
}

Test(timeline, bounds_drop_the_oldest_bucket)
{
    static const struct {
        int64_t size;
        size_t max;
    } res[3] = {{TLY_TIMELINE_10S, 8640}, {TLY_TIMELINE_1M, 10080}, {TLY_TIMELINE_1H, 8760}};
    for (size_t k = 0; k < 3; k++) {
        tly_poll_t *p = create_ok(body_n("single", 2));
        tly_ballot_t o0 = {.nchoices = 1, .choices = {0}};
        tly_vote_t *first = NULL;
        /* one more window than the bound, oldest first as the store replays them */
        for (size_t i = 0; i <= res[k].max; i++) {
            char voter[16];
            snprintf(voter, sizeof(voter), "v%zu", i);
            tly_vote_t *v = cast_at(NULL, p, voter, &o0, NOW + (int64_t)i * res[k].size);
            if (i == 0)
                first = v;
        }
        json_t *o = tly_timeline_json(p, res[k].size, 0, INT64_MAX);
        char from[TLY_TIME_LEN];
        tly_time_format(NOW + res[k].size, from);
        cr_assert_str_eq(json_string_value(json_object_get(o, "available_from")), from);
        json_decref(o);
        json_t *all = timeline_all(p, res[k].size, 0, INT64_MAX);
        cr_assert_eq(json_array_size(all), res[k].max, "resolution %zu", k);
        cr_assert_eq(item_start(json_array_get(all, 0)), NOW + res[k].size, "the oldest went");
        json_decref(all);
        cr_assert_eq(timeline_sum(p, res[k].size, 0), res[k].max);
        /* a coarser resolution still has the whole range */
        if (k < 2) {
            cr_assert_eq(timeline_sum(p, res[k + 1].size, 0), res[k].max + 1);
            o = tly_timeline_json(p, res[k + 1].size, 0, INT64_MAX);
            cr_assert_null(json_object_get(o, "available_from"));
            json_decref(o);
        }
        /* the dropped range no longer changes: retracting from it or casting into it */
        tly_poll_retract_vote(NULL, p, first, NOW + (int64_t)(res[k].max + 1) * res[k].size);
        cr_assert_eq(timeline_sum(p, res[k].size, 0), res[k].max);
        cast_at(NULL, p, "late", &o0, NOW + res[k].size - 1);
        cr_assert_eq(timeline_sum(p, res[k].size, 0), res[k].max);
        cr_assert_eq(p->options[0].votes, res[k].max + 1);
        /* the range still kept stays exact */
        tly_vote_t *last = tly_poll_find_vote(p, "v1");
        tly_poll_retract_vote(NULL, p, last, NOW + (int64_t)(res[k].max + 2) * res[k].size);
        cr_assert_eq(timeline_sum(p, res[k].size, 0), res[k].max - 1);
        tly_poll_free(p);
    }
}

Test(oom, timeline_drops_instead_of_failing)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    tly_ballot_t o0 = {.nchoices = 1, .choices = {0}};
    /* the very first bucket cannot be allocated: that range is given up, counts are not */
    tly_vote_t *a = tly_vote_new(&o0, "a", NULL, NULL, NULL, NOW + 5000);
    tly_poll_add_vote(NULL, p, a);
    tly_alloc_fail_after(0);
    tly_poll_commit_vote(p, a, NOW + 5000);
    tly_alloc_fail_after(-1);
    cr_assert_eq(p->options[0].votes, 1);
    json_t *o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    cr_assert_str_eq(json_string_value(json_object_get(o, "available_from")), "2026-04-05T12:00:10.000Z");
    cr_assert_eq(json_array_size(json_object_get(o, "items")), 0);
    json_decref(o);
    o = tly_timeline_json(p, TLY_TIMELINE_1H, 0, INT64_MAX);
    cr_assert_str_eq(json_string_value(json_object_get(o, "available_from")), "2026-04-05T13:00:00.000Z");
    json_decref(o);
    /* memory back: later windows are kept; retracting the lost ballot changes nothing kept */
    for (int i = 1; i <= 8; i++) {
        char voter[16];
        snprintf(voter, sizeof(voter), "v%d", i);
        cast_at(NULL, p, voter, &o0, NOW + i * INT64_C(10000));
    }
    tly_poll_retract_vote(NULL, p, a, NOW + 100000);
    cr_assert_eq(timeline_sum(p, TLY_TIMELINE_10S, 0), 8);
    /* the ring is full (8): growing fails, so the oldest bucket makes room */
    tly_vote_t *b = tly_vote_new(&o0, "b", NULL, NULL, NULL, NOW + 90000);
    tly_poll_add_vote(NULL, p, b);
    tly_alloc_fail_after(0);
    tly_poll_commit_vote(p, b, NOW + 90000);
    tly_alloc_fail_after(-1);
    json_t *all = timeline_all(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    cr_assert_eq(json_array_size(all), 8);
    cr_assert_eq(item_start(json_array_get(all, 0)), NOW + 20000);
    cr_assert_eq(item_start(json_array_get(all, 7)), NOW + 90000);
    json_decref(all);
    o = tly_timeline_json(p, TLY_TIMELINE_10S, 0, INT64_MAX);
    cr_assert_str_eq(json_string_value(json_object_get(o, "available_from")), "2026-04-05T12:00:20.000Z");
    json_decref(o);
    /* the failed first allocation gave up the whole first minute and hour too */
    cr_assert_eq(timeline_sum(p, TLY_TIMELINE_1M, 0), 4, "12:01:00 to 12:01:30");
    cr_assert_eq(timeline_sum(p, TLY_TIMELINE_1H, 0), 0);
    tly_poll_free(p);
}

/* ---- the invariant under random casts, changes and retractions ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;

static uint32_t rnd(uint32_t n)
{
    /* xorshift64*: the same sequence on every run */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Du) >> 32) % n;
}

static tly_ballot_t random_ballot(const tly_poll_t *p)
{
    tly_ballot_t b;
    memset(&b, 0, sizeof(b));
    size_t n = p->noptions, k = p->type == TLY_TYPE_SINGLE ? 1 : 1 + rnd((uint32_t)n);
    uint8_t perm[TLY_MAX_OPTIONS];
    for (size_t i = 0; i < n; i++)
        perm[i] = (uint8_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = rnd((uint32_t)(i + 1));
        uint8_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    b.nchoices = (uint8_t)k;
    for (size_t i = 0; i < k; i++)
        b.choices[i] = perm[i];
    if (p->type != TLY_TYPE_RANKED) /* sets are kept in ascending order */
        for (size_t i = 1; i < k; i++)
            for (size_t j = i; j > 0 && b.choices[j - 1] > b.choices[j]; j--) {
                uint8_t t = b.choices[j];
                b.choices[j] = b.choices[j - 1];
                b.choices[j - 1] = t;
            }
    if (p->type == TLY_TYPE_SCORE)
        for (size_t i = 0; i < k; i++)
            b.scores[i] = (uint8_t)rnd(6);
    return b;
}

typedef struct {
    int64_t *at;
    size_t n, cap;
} events_t;

static void event(events_t *e, int64_t t)
{
    if (e->n == e->cap) {
        e->cap = e->cap ? 2 * e->cap : 1024;
        e->at = realloc(e->at, e->cap * sizeof(*e->at));
        cr_assert_not_null(e->at);
    }
    e->at[e->n++] = t;
}

static int64_t fdiv(int64_t a, int64_t b)
{
    return a / b - (a % b != 0 && a < 0);
}

#define SPAN_BASE (NOW - 4 * HOUR)
#define SPAN_BUCKETS 6000 /* 10 s buckets from SPAN_BASE: the test stays well inside */

/* Recounts everything from the ballots and compares with what core kept. */
static void recount(tly_registry_t *r, tly_poll_t *p, const events_t *ev, int64_t now)
{
    size_t n = p->noptions;
    uint64_t votes[TLY_MAX_OPTIONS] = {0}, sum[TLY_MAX_OPTIONS] = {0}, rated[TLY_MAX_OPTIONS] = {0}, total = 0;
    static const int64_t sizes[3] = {TLY_TIMELINE_10S, TLY_TIMELINE_1M, TLY_TIMELINE_1H};
    static uint64_t buckets[3][SPAN_BUCKETS][8];
    cr_assert(n <= 8);
    memset(buckets, 0, sizeof(buckets));
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next) {
        if (v->state != TLY_VOTE_COMMITTED)
            continue;
        total++;
        for (size_t i = 0; i < v->nchoices; i++) {
            uint8_t c = v->data[i], s = v->data[v->nchoices + i];
            bool counted = p->type == TLY_TYPE_RANKED ? i == 0 : p->type == TLY_TYPE_SCORE ? s > 0 : true;
            if (p->type == TLY_TYPE_SCORE) {
                sum[c] += s;
                rated[c]++;
            }
            if (!counted)
                continue;
            votes[c]++;
            for (int k = 0; k < 3; k++) {
                int64_t idx = fdiv(v->recorded_at, sizes[k]) - fdiv(SPAN_BASE, sizes[k]);
                cr_assert(idx >= 0 && idx < SPAN_BUCKETS);
                buckets[k][idx][c]++;
            }
        }
    }
    cr_assert_eq(p->total_votes, total);
    assert_votes(p, votes);
    if (p->type == TLY_TYPE_SCORE)
        for (size_t i = 0; i < n; i++) {
            cr_assert_eq(p->score_sum[i], sum[i]);
            cr_assert_eq(p->score_sum[n + i], rated[i]);
        }
    for (int k = 0; k < 3; k++) {
        json_t *all = timeline_all(p, sizes[k], 0, INT64_MAX);
        uint64_t per_option[TLY_MAX_OPTIONS] = {0};
        size_t nonempty = 0;
        for (size_t b = 0; b < SPAN_BUCKETS; b++)
            for (size_t i = 0; i < n; i++)
                if (buckets[k][b][i] != 0) {
                    nonempty++;
                    break;
                }
        cr_assert_eq(json_array_size(all), nonempty, "resolution %d: %zu items, want %zu", k,
                     json_array_size(all), nonempty);
        for (size_t j = 0; j < json_array_size(all); j++) {
            json_t *item = json_array_get(all, j);
            int64_t start = item_start(item);
            cr_assert_eq(start % sizes[k], 0, "aligned to the epoch");
            int64_t idx = fdiv(start, sizes[k]) - fdiv(SPAN_BASE, sizes[k]);
            for (size_t i = 0; i < n; i++) {
                json_int_t got = item_count(p, item, i);
                cr_assert_eq((uint64_t)got, buckets[k][idx][i], "resolution %d bucket %lld option %zu", k,
                             (long long)start, i);
                per_option[i] += (uint64_t)got;
            }
        }
        for (size_t i = 0; i < n; i++)
            cr_assert_eq(per_option[i], p->options[i].votes, "sum of the timeline == votes (option %zu)", i);
        json_decref(all);
    }
    uint64_t last_minute = 0;
    int64_t sec = fdiv(now, 1000);
    for (size_t i = 0; i < ev->n; i++) {
        int64_t s = fdiv(ev->at[i], 1000);
        last_minute += s > sec - 60 && s <= sec;
    }
    cr_assert_eq(tly_poll_votes_last_minute(p, now), last_minute);
    json_t *o = results(p, now, NULL);
    cr_assert_eq((uint64_t)json_integer_value(json_object_get(o, "total_votes")), total);
    cr_assert_eq((uint64_t)json_integer_value(json_object_get(o, "votes_last_minute")), last_minute);
    json_decref(o);
    assert_maps(r, p);
}

static void random_operations(const char *type)
{
    rng_state = 0x9E3779B97F4A7C15u;
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n(type, 5));
    tly_registry_add_poll(r, p);
    events_t ev = {0};
    int64_t now = NOW;
    for (int op = 0; op < 10000; op++) {
        now += rnd(3000);
        char voter[16];
        snprintf(voter, sizeof(voter), "voter%u", rnd(300));
        tly_vote_t *v = tly_poll_find_vote(p, voter);
        if (v == NULL) {
            /* cast: usually just now; sometimes committed long after it was cast */
            int64_t at = rnd(20) == 0 ? now - (int64_t)rnd(2 * 3600) * 1000 : now - rnd(500);
            tly_ballot_t b = random_ballot(p);
            v = tly_vote_new(&b, voter, NULL, NULL, NULL, at);
            tly_poll_add_vote(r, p, v);
            if (rnd(10) != 0) {
                tly_poll_commit_vote(p, v, now);
                event(&ev, at);
            }
        } else if (v->state == TLY_VOTE_PENDING) {
            if (rnd(2) == 0) {
                tly_poll_commit_vote(p, v, now);
                event(&ev, v->recorded_at);
            } else {
                tly_poll_drop_vote(r, p, v);
            }
        } else if (rnd(10) < 6) {
            tly_ballot_t b = random_ballot(p);
            tly_vote_t *out = NULL;
            cr_assert_eq(tly_poll_change_vote(r, p, v, &b, now, &out), 0);
            cr_assert_eq(tly_poll_find_vote(p, voter), out);
            event(&ev, now);
        } else {
            tly_poll_retract_vote(r, p, v, now);
        }
        if (op % 1000 == 999)
            recount(r, p, &ev, now);
    }
    recount(r, p, &ev, now);
    free(ev.at);
    tly_registry_free(r);
}

Test(invariant, random_single, .timeout = 120)
{
    random_operations("single");
}

Test(invariant, random_multiple, .timeout = 120)
{
    random_operations("multiple");
}

Test(invariant, random_ranked, .timeout = 120)
{
    random_operations("ranked");
}

Test(invariant, random_score, .timeout = 120)
{
    random_operations("score");
}

/* ---- votes_last_minute ---- */

Test(votes_last_minute, slides_by_the_second)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    tly_ballot_t o0 = {.nchoices = 1, .choices = {0}}, o1 = {.nchoices = 1, .choices = {1}};
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW), 0);
    cast_at(NULL, p, "a", &o0, NOW);          /* second S */
    cast_at(NULL, p, "b", &o0, NOW + 999);    /* still S */
    tly_vote_t *c = cast_at(NULL, p, "c", &o0, NOW + 59999); /* S + 59 */
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 59999), 3);
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 60000), 1, "second S left the window");
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 118999), 1);
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 119000), 0, "S + 59 left it");
    /* a change counts as activity; a retraction does not subtract */
    tly_vote_t *out;
    cr_assert_eq(tly_poll_change_vote(NULL, p, c, &o1, NOW + 61000, &out), 0);
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 61000), 2);
    tly_poll_retract_vote(NULL, p, out, NOW + 62000);
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 62000), 2);
    /* the slot of a second two minutes later is reused; a late event from before it is
     * forgotten (it is outside every window from then on) */
    cast_at(NULL, p, "d", &o0, NOW + 180500); /* S + 180: S's slot */
    cast_at(NULL, p, "e", &o0, NOW + 500);    /* S again, arriving late */
    cr_assert_eq(tly_poll_votes_last_minute(p, NOW + 180500), 1);
    tly_poll_free(p);
}

Test(votes_last_minute, in_results_without_re_rendering)
{
    tly_poll_t *p = create_ok(body_n("ranked", 2));
    tly_ballot_t b = {.nchoices = 1, .choices = {0}};
    cast_at(NULL, p, "a", &b, NOW);
    const char *raw;
    json_t *o = results(p, NOW + 1000, &raw);
    cr_assert_eq(json_integer_value(json_object_get(o, "votes_last_minute")), 1);
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 1);
    json_decref(o);
    cr_assert(strstr(raw, ",\"votes_last_minute\":1}") != NULL, "the last member: %s", raw);
    /* the minute slides: same cache, new number */
    char *before = strdup(raw);
    o = results(p, NOW + 60000, NULL);
    const char *again = tly_results_render(p, NOW + 60000, NULL);
    cr_assert_eq(again, raw, "the cached rendering is reused");
    cr_assert(!p->results_dirty);
    cr_assert_eq(json_integer_value(json_object_get(o, "votes_last_minute")), 0);
    cr_assert(strstr(again, ",\"votes_last_minute\":0}") != NULL, "%s", again);
    cr_assert_eq(strncmp(before, again, strlen(before) - strlen("1}")), 0, "only the number changed");
    json_decref(o);
    free(before);
    tly_poll_free(p);
}

/* ---- final results ---- */

Test(final, frozen_when_end_time_passes_and_served_as_is)
{
    tly_poll_t *p = create_ok(with(body_n("single", 3), "end_time", json_string("2026-04-05T13:00:00Z")));
    cast(NULL, p, "a", "{\"option_id\":\"$0\"}");
    cast(NULL, p, "b", "{\"option_id\":\"$1\"}");
    cr_assert_null(tly_poll_final_results(p));
    cr_assert_eq(tly_poll_freeze_results(p, NOW), TLY_ESTATE, "still open");
    json_t *o = results(p, NOW, NULL);
    cr_assert_null(json_object_get(o, "final"));
    json_decref(o);

    const char *raw;
    o = results(p, p->end_time, &raw);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "closed");
    cr_assert(json_is_true(json_object_get(o, "final")));
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 2);
    cr_assert(json_is_integer(json_object_get(o, "votes_last_minute")));
    json_decref(o);
    const char *final = tly_poll_final_results(p);
    cr_assert_not_null(final, "rendering a closed poll froze it");
    cr_assert_null(strstr(final, "votes_last_minute"), "activity is not part of the final tally");
    json_t *f = J(final);
    cr_assert(json_is_true(json_object_get(f, "final")));
    cr_assert_str_eq(json_string_value(json_object_get(f, "status")), "closed");
    json_decref(f);
    cr_assert_eq(tly_poll_freeze_results(p, p->end_time), 0, "again: nothing changes");
    cr_assert_eq(tly_poll_final_results(p), final);

    /* never re-rendered: a count changing underneath (refused by the API) does not show */
    cast(NULL, p, "late", "{\"option_id\":\"$2\"}");
    o = results(p, p->end_time + HOUR, NULL);
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 2);
    cr_assert(json_is_true(json_object_get(o, "final")));
    json_decref(o);
    tly_poll_free(p);
}

Test(final, explicit_close_then_freeze_and_pending_ballots_count)
{
    tly_poll_t *p = create_ok(body_n("multiple", 2));
    cast(NULL, p, "a", "{\"option_ids\":[\"$0\",\"$1\"]}");
    cr_assert_eq(patch(p, "{\"status\":\"closed\"}", NULL), 0);
    /* a ballot accepted before the close is still in the writer queue */
    p->pending_votes = 1;
    cr_assert_eq(tly_poll_freeze_results(p, NOW + 2000), TLY_ESTATE);
    json_t *o = results(p, NOW + 2000, NULL);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "closed");
    cr_assert_null(json_object_get(o, "final"), "not final while a ballot is pending");
    json_decref(o);
    cast(NULL, p, "b", "{\"option_ids\":[\"$1\"]}");
    p->pending_votes = 0;
    cr_assert_eq(tly_poll_freeze_results(p, NOW + 3000), 0);
    o = results(p, NOW + 3000, NULL);
    cr_assert(json_is_true(json_object_get(o, "final")));
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 2);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(json_object_get(o, "options"), 1), "votes")), 2);
    json_decref(o);
    tly_poll_free(p);
}

Test(final, set_from_the_store)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    p->status = TLY_STATUS_CLOSED;
    cr_assert_eq(tly_poll_set_final_results(p, "[1]"), TLY_EINVAL);
    cr_assert_eq(tly_poll_set_final_results(p, "{\"a\":"), TLY_EINVAL);
    cr_assert_eq(tly_poll_set_final_results(p, NULL), TLY_EINVAL);
    cr_assert_null(tly_poll_final_results(p));
    const char *stored = " {\"poll_id\":\"x\",\"status\":\"closed\",\"total_votes\":7,\"final\":true}\n";
    cr_assert_eq(tly_poll_set_final_results(p, stored), 0);
    cr_assert_str_eq(tly_poll_final_results(p), "{\"poll_id\":\"x\",\"status\":\"closed\",\"total_votes\":7,\"final\":true}");
    size_t len;
    const char *s = tly_results_render(p, NOW, &len);
    cr_assert_str_eq(s, "{\"poll_id\":\"x\",\"status\":\"closed\",\"total_votes\":7,\"final\":true,\"votes_last_minute\":0}");
    cr_assert_eq(len, strlen(s));
    /* replaced: served from the new text */
    cr_assert_eq(tly_poll_set_final_results(p, "{\"total_votes\":8}"), 0);
    s = tly_results_render(p, NOW, NULL);
    cr_assert_str_eq(s, "{\"total_votes\":8,\"votes_last_minute\":0}");
    tly_poll_free(p);
}

/* Instances sharing a store: the final results are the store's. A render of the closed
 * poll shows the counts without freezing them; tly_poll_render_final offers what a
 * freeze would store and leaves the poll as it is; an adopted change without final
 * results keeps them. */
Test(final, by_the_store_never_frozen_on_a_render)
{
    tly_registry_t *reg = tly_registry_new();
    tly_registry_set_final_by_store(reg, true);
    tly_poll_t *p = create_ok(with(body_n("single", 2), "end_time", json_string("2026-04-05T13:00:00Z")));
    cr_assert_eq(tly_registry_add_poll(reg, p), 0);
    cr_assert(p->final_by_store);
    cast(NULL, p, "a", "{\"option_id\":\"$0\"}");
    json_t *o = results(p, p->end_time, NULL);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "closed");
    cr_assert_null(json_object_get(o, "final"), "not final until the store says so");
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 1);
    json_decref(o);
    cr_assert_null(tly_poll_final_results(p));

    char *offer = NULL;
    cr_assert_eq(tly_poll_render_final(p, p->end_time - 1, &offer), TLY_ESTATE, "still open");
    cr_assert_eq(tly_poll_render_final(p, p->end_time, &offer), 0);
    cr_assert_null(tly_poll_final_results(p), "the poll is unchanged");
    json_t *f = J(offer);
    cr_assert(json_is_true(json_object_get(f, "final")));
    cr_assert_eq(json_integer_value(json_object_get(f, "total_votes")), 1);
    json_decref(f);
    cr_assert_eq(tly_poll_set_final_results(p, offer), 0); /* the store took it */
    tly_free(offer);
    o = results(p, p->end_time, NULL);
    cr_assert(json_is_true(json_object_get(o, "final")));
    json_decref(o);

    /* another instance's change (a new title) without final results keeps them */
    tly_poll_t *from = create_ok(body_n("single", 2));
    from->status = TLY_STATUS_CLOSED;
    const char *kept = tly_poll_final_results(p);
    uint64_t edits = p->edits;
    tly_poll_adopt(p, from);
    cr_assert_eq(tly_poll_final_results(p), kept);
    cr_assert_eq(p->edits, edits + 1, "another instance's change is an edit here too");
    tly_registry_free(reg);
}

Test(oom, freeze_and_final_render_fail_cleanly)
{
    const char *types[2] = {"single", "ranked"};
    for (int t = 0; t < 2; t++) {
        tly_poll_t *p = create_ok(with(body_n(types[t], 2), "end_time", json_string("2026-04-05T13:00:00Z")));
        cast(NULL, p, "a", strcmp(types[t], "single") == 0 ? "{\"option_id\":\"$0\"}" : "{\"ranking\":[\"$0\"]}");
        tly_alloc_fail_after(0);
        int rc = tly_poll_freeze_results(p, p->end_time);
        const char *s = tly_results_render(p, p->end_time, NULL);
        int rc2 = tly_poll_set_final_results(p, "{\"x\":1}");
        tly_alloc_fail_after(-1);
        cr_assert_eq(rc, TLY_ENOMEM);
        cr_assert_null(s);
        cr_assert_eq(rc2, TLY_ENOMEM);
        cr_assert_null(tly_poll_final_results(p));
        json_t *o = results(p, p->end_time, NULL);
        cr_assert(json_is_true(json_object_get(o, "final")));
        json_decref(o);
        tly_poll_free(p);
    }
}

/* ---- review fixes ---- */

static int patch_at(tly_poll_t *p, const char *body, int64_t now, const char **field)
{
    char buf[256];
    const char *f = NULL, *m = NULL;
    json_t *b = J(body);
    int rc = tly_poll_patch(p, b, now, &f, &m, buf, sizeof(buf));
    json_decref(b);
    if (rc != 0 && rc != TLY_ENOMEM)
        cr_assert_not_null(m, "an error needs a message");
    static char fieldbuf[256];
    snprintf(fieldbuf, sizeof(fieldbuf), "%s", f ? f : "");
    if (field)
        *field = fieldbuf;
    return rc;
}

Test(patch, a_poll_closed_by_its_end_time_stays_closed)
{
    tly_poll_t *p = create_ok(with(body_n("single", 2), "end_time", json_string("2026-04-05T13:00:00Z")));
    const char *f;
    int64_t end = p->end_time, later = end + HOUR;
    /* still open: extending is fine */
    cr_assert_eq(patch_at(p, "{\"end_time\":\"2026-04-05T14:00:00Z\"}", NOW, &f), 0);
    cr_assert_eq(p->end_time, end + HOUR);
    end = p->end_time;
    later = end + HOUR;
    /* past it: closed, for good */
    cr_assert_eq(patch_at(p, "{\"end_time\":\"2026-04-05T16:00:00Z\"}", later, &f), TLY_ESTATE);
    cr_assert_str_eq(f, "end_time");
    cr_assert_eq(patch_at(p, "{\"end_time\":null}", later, &f), TLY_ESTATE);
    cr_assert_str_eq(f, "end_time");
    cr_assert_eq(patch_at(p, "{\"status\":\"active\"}", later, &f), TLY_ESTATE);
    cr_assert_str_eq(f, "status");
    cr_assert_eq(patch_at(p, "{\"status\":\"draft\"}", later, &f), TLY_ESTATE);
    cr_assert_eq(patch_at(p, "{\"status\":\"active\",\"end_time\":null}", later, &f), TLY_ESTATE);
    cr_assert_eq(patch_at(p, "{\"options\":[{\"text\":\"x\"},{\"text\":\"y\"}]}", later, &f), TLY_ESTATE,
                 "a closed poll's options are final too");
    cr_assert_eq(p->end_time, end, "unchanged");
    cr_assert_eq(tly_poll_effective_status(p, later), TLY_STATUS_CLOSED);
    /* what does not reopen it is fine: the same end_time, a title, closing for the record */
    cr_assert_eq(patch_at(p, "{\"end_time\":\"2026-04-05T14:00:00Z\",\"title\":\"t\"}", later, &f), 0);
    cr_assert_eq(patch_at(p, "{\"status\":\"closed\"}", later, &f), 0);
    cr_assert_eq(p->status, TLY_STATUS_CLOSED);
    cr_assert_eq(patch_at(p, "{\"end_time\":null}", later, &f), TLY_ESTATE, "closed by status too");
    tly_poll_free(p);
}

Test(patch, choice_limits_and_max_score_frozen_once_a_vote_exists)
{
    tly_poll_t *p = create_ok(with_settings(body_n("multiple", 4), "{\"min_choices\":1,\"max_choices\":3}"));
    const char *f;
    cr_assert_eq(patch(p, "{\"settings\":{\"max_choices\":4}}", &f), 0, "no votes yet");
    tly_ballot_t b = {.nchoices = 1, .choices = {0}};
    tly_vote_t *v = tly_vote_new(&b, "v1", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(NULL, p, v); /* pending is enough */
    cr_assert_eq(patch(p, "{\"settings\":{\"max_choices\":2}}", &f), TLY_EEXIST);
    cr_assert_str_eq(f, "settings.max_choices");
    cr_assert_eq(patch(p, "{\"settings\":{\"min_choices\":2}}", &f), TLY_EEXIST);
    cr_assert_str_eq(f, "settings.min_choices");
    cr_assert_eq(patch(p, "{\"settings\":{\"min_choices\":9}}", &f), TLY_EINVAL, "out of range is still a 400");
    cr_assert_eq(p->settings.max_choices, 4);
    cr_assert_eq(p->settings.min_choices, 1);
    cr_assert_eq(patch(p, "{\"settings\":{\"min_choices\":1,\"max_choices\":4}}", &f), 0, "the same values");
    cr_assert_eq(patch(p, "{\"settings\":{\"allow_vote_change\":true,\"results_visibility\":\"after_close\","
                          "\"allow_anonymous\":true,\"show_results_during_voting\":false}}",
                       &f),
                 0);
    cr_assert(p->settings.allow_vote_change);
    cr_assert(p->settings.allow_anonymous);
    cr_assert_eq(p->settings.results_visibility, TLY_VIS_AFTER_CLOSE);
    tly_poll_commit_vote(p, v, NOW);
    cr_assert_eq(patch(p, "{\"settings\":{\"max_choices\":3}}", &f), TLY_EEXIST, "committed too");
    tly_poll_retract_vote(NULL, p, v, NOW);
    cr_assert_eq(patch(p, "{\"settings\":{\"max_choices\":3}}", &f), 0, "no vote left");
    tly_poll_free(p);

    p = create_ok(body_n("score", 3));
    cast(NULL, p, "a", "{\"scores\":{\"$0\":3}}");
    cr_assert_eq(patch(p, "{\"settings\":{\"max_score\":10}}", &f), TLY_EEXIST);
    cr_assert_str_eq(f, "settings.max_score");
    cr_assert_eq(patch(p, "{\"settings\":{\"max_score\":500}}", &f), TLY_EINVAL);
    cr_assert_eq(patch(p, "{\"settings\":{\"max_score\":5}}", &f), 0);
    cr_assert_eq(p->settings.max_score, 5);
    tly_poll_free(p);
}

Test(patch, new_options_start_an_empty_timeline)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    tly_vote_t *v = cast(NULL, p, "a", "{\"option_id\":\"$1\"}");
    tly_poll_retract_vote(NULL, p, v, NOW);
    cr_assert_eq(patch(p, "{\"options\":[{\"text\":\"x\"},{\"text\":\"y\"},{\"text\":\"z\"}]}", NULL), 0);
    cast(NULL, p, "b", "{\"option_id\":\"$2\"}");
    json_t *all = timeline_all(p, TLY_TIMELINE_1M, 0, INT64_MAX);
    cr_assert_eq(json_array_size(all), 1);
    cr_assert_eq(item_count(p, json_array_get(all, 0), 2), 1);
    json_decref(all);
    tly_poll_free(p);
}

/* ---- settings.voter_check and the per-poll address set ---- */

Test(voter_check, values_default_and_errors)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    cr_assert_eq(p->settings.voter_check, TLY_VOTER_CHECK_TOKEN, "token by default");
    json_t *o = tly_poll_to_json(p, NOW);
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(o, "settings"), "voter_check")), "token");
    json_decref(o);
    tly_poll_free(p);

    static const struct {
        const char *name;
        tly_voter_check_t value;
    } ok[] = {{"token", TLY_VOTER_CHECK_TOKEN}, {"ip", TLY_VOTER_CHECK_IP}, {"token+ip", TLY_VOTER_CHECK_TOKEN_IP}};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(ok); i++) {
        char settings[64];
        snprintf(settings, sizeof(settings), "{\"voter_check\":\"%s\"}", ok[i].name);
        p = create_ok(with_settings(body_n("multiple", 3), settings));
        cr_assert_eq(p->settings.voter_check, ok[i].value, "%s", ok[i].name);
        cr_assert_str_eq(tly_voter_check_name(p->settings.voter_check), ok[i].name);
        cr_assert_eq(tly_voter_check_ip(p->settings.voter_check), ok[i].value != TLY_VOTER_CHECK_TOKEN);
        o = tly_poll_to_json(p, NOW);
        cr_assert_str_eq(json_string_value(json_object_get(json_object_get(o, "settings"), "voter_check")),
                         ok[i].name);
        json_decref(o);
        tly_poll_free(p);
    }
    static const char *const bad[] = {"{\"voter_check\":\"cookie\"}", "{\"voter_check\":\"IP\"}",
                                      "{\"voter_check\":\"ip+token\"}", "{\"voter_check\":\"\"}",
                                      "{\"voter_check\":1}", "{\"voter_check\":null}",
                                      "{\"voter_check\":[\"ip\"]}"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(bad); i++)
        create_fails(with_settings(body_n("single", 2), bad[i]), "settings.voter_check");
    cr_assert_str_eq(tly_voter_check_name((tly_voter_check_t)7), "unknown");
}

Test(voter_check, patch_only_while_the_poll_has_no_votes)
{
    tly_poll_t *p = create_ok(body_n("single", 2));
    const char *f;
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"ip\"}}", &f), 0, "no votes yet");
    cr_assert_eq(p->settings.voter_check, TLY_VOTER_CHECK_IP);
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"nope\"}}", &f), TLY_EINVAL);
    cr_assert_str_eq(f, "settings.voter_check");
    cr_assert_eq(p->settings.voter_check, TLY_VOTER_CHECK_IP, "unchanged by a refused PATCH");

    tly_ballot_t b = {.nchoices = 1, .choices = {0}};
    tly_vote_t *v = tly_vote_new(&b, "v1", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(NULL, p, v); /* pending is enough */
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"token\"}}", &f), TLY_EEXIST);
    cr_assert_str_eq(f, "settings.voter_check");
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"token+ip\",\"allow_vote_change\":true}}", &f),
                 TLY_EEXIST);
    cr_assert_not(p->settings.allow_vote_change, "nothing of a refused PATCH applies");
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"cookie\"}}", &f), TLY_EINVAL,
                 "out of range is still a 400");
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"ip\",\"allow_anonymous\":true}}", &f), 0,
                 "the same value is not a change");
    cr_assert(p->settings.allow_anonymous);
    tly_poll_commit_vote(p, v, NOW);
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"token\"}}", &f), TLY_EEXIST, "committed too");
    tly_poll_retract_vote(NULL, p, v, NOW);
    cr_assert_eq(patch(p, "{\"settings\":{\"voter_check\":\"token+ip\"}}", &f), 0, "no vote left");
    cr_assert_eq(p->settings.voter_check, TLY_VOTER_CHECK_TOKEN_IP);
    tly_poll_free(p);
}

static void ip_of(uint8_t out[TLY_IP_HASH_LEN], int n)
{
    memset(out, 0, TLY_IP_HASH_LEN);
    out[0] = 0xa5;
    out[15] = (uint8_t)n;
}

/* A pending vote of ballot "$0" added to p and given address n. */
static tly_vote_t *cast_from(tly_registry_t *r, tly_poll_t *p, const char *voter, int n)
{
    tly_ballot_t b = parsed(p, "{\"option_ids\":[\"$0\"]}");
    tly_vote_t *v = tly_vote_new(&b, voter, NULL, NULL, NULL, NOW);
    cr_assert_not_null(v);
    tly_poll_add_vote(r, p, v);
    uint8_t h[TLY_IP_HASH_LEN];
    ip_of(h, n);
    cr_assert_eq(tly_poll_set_vote_ip(p, v, h), 0);
    return v;
}

/* The set holds exactly the addresses of p's votes that have one, each to its vote. */
static void assert_ip_set(tly_poll_t *p, size_t want)
{
    size_t n = 0;
    cr_assert_eq(tly_poll_ip_count(p), want);
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next) {
        const uint8_t *h = tly_vote_ip_hash(v);
        if (h != NULL) {
            cr_assert_eq(tly_poll_find_ip(p, h), v, "address of %s", v->voter_id);
            n++;
        }
    }
    cr_assert_eq(n, want);
}

Test(voter_check, ip_set_pending_committed_dropped_retracted)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(with_settings(body_n("multiple", 3), "{\"voter_check\":\"ip\"}"));
    tly_registry_add_poll(r, p);
    uint8_t h1[TLY_IP_HASH_LEN], h2[TLY_IP_HASH_LEN], h3[TLY_IP_HASH_LEN];
    ip_of(h1, 1);
    ip_of(h2, 2);
    ip_of(h3, 3);
    cr_assert_null(tly_poll_find_ip(p, h1), "empty set");

    tly_vote_t *a = cast_from(r, p, "alice", 1);
    cr_assert_eq(tly_poll_find_ip(p, h1), a, "a pending vote holds its address");
    cr_assert_arr_eq(tly_vote_ip_hash(a), h1, TLY_IP_HASH_LEN);
    cr_assert_null(tly_poll_find_ip(p, h2));

    /* a second ballot from the same address, and misuse, change nothing */
    tly_ballot_t b = parsed(p, "{\"option_ids\":[\"$1\"]}");
    tly_vote_t *bob = tly_vote_new(&b, "bob", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(r, p, bob);
    cr_assert_eq(tly_poll_set_vote_ip(p, bob, h1), TLY_EEXIST);
    cr_assert_null(tly_vote_ip_hash(bob));
    cr_assert_eq(tly_poll_find_ip(p, h1), a);
    cr_assert_eq(tly_poll_set_vote_ip(p, a, h2), TLY_EINVAL, "one address per vote");
    cr_assert_null(tly_poll_find_ip(p, h2));
    tly_poll_t *q = create_ok(body_n("single", 2));
    cr_assert_eq(tly_poll_set_vote_ip(q, bob, h2), TLY_EINVAL, "not q's vote");
    cr_assert_eq(tly_poll_ip_count(q), 0);
    tly_poll_free(q);
    assert_ip_set(p, 1);

    /* bob from another address; a vote without an address (voter rule only) is fine */
    cr_assert_eq(tly_poll_set_vote_ip(p, bob, h2), 0);
    tly_vote_t *carol = cast(r, p, "carol", "{\"option_ids\":[\"$2\"]}");
    cr_assert_null(tly_vote_ip_hash(carol));
    assert_ip_set(p, 2);

    /* a failed commit drops the pending vote and frees its address */
    tly_poll_drop_vote(r, p, bob);
    cr_assert_null(tly_poll_find_ip(p, h2));
    assert_ip_set(p, 1);

    /* committing keeps it; retracting frees it, and that address may vote again */
    tly_poll_commit_vote(p, a, NOW);
    cr_assert_eq(tly_poll_find_ip(p, h1), a);
    tly_poll_retract_vote(r, p, a, NOW + 1);
    cr_assert_null(tly_poll_find_ip(p, h1));
    assert_ip_set(p, 0);
    tly_vote_t *dave = cast_from(r, p, "dave", 1);
    cr_assert_eq(tly_poll_find_ip(p, h1), dave);
    cr_assert_null(tly_poll_find_ip(p, h3));
    assert_ip_set(p, 1);
    /* removing the poll frees the set (ASan / valgrind would see a leak) */
    tly_registry_remove_poll(r, p);
    tly_registry_free(r);
}

Test(voter_check, a_change_keeps_the_address_even_when_the_vote_moves)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(with_settings(body_n("multiple", 4), "{\"voter_check\":\"token+ip\"}"));
    tly_registry_add_poll(r, p);
    tly_vote_t *v[4];
    const char *names[4] = {"a", "b", "c", "d"};
    for (int i = 0; i < 4; i++) {
        v[i] = cast_from(r, p, names[i], i + 1);
        tly_poll_commit_vote(p, v[i], NOW);
    }
    assert_ip_set(p, 4);
    uint8_t h[TLY_IP_HASH_LEN];
    for (int i = 0; i < 4; i += 3) {
        /* more choices than the vote holds: it is reallocated */
        tly_vote_t *w = change(r, p, v[i], "{\"option_ids\":[\"$1\",\"$2\",\"$3\"]}", NOW + MIN);
        cr_assert_neq(w, v[i], "moved");
        v[i] = w;
        ip_of(h, i + 1);
        cr_assert_eq(tly_poll_find_ip(p, h), w, "the address follows the moved vote");
        cr_assert_arr_eq(tly_vote_ip_hash(w), h, TLY_IP_HASH_LEN);
        assert_maps(r, p);
        assert_ip_set(p, 4);
    }
    /* in place */
    tly_vote_t *w = change(r, p, v[1], "{\"option_ids\":[\"$3\"]}", NOW + 2 * MIN);
    cr_assert_eq(w, v[1]);
    ip_of(h, 2);
    cr_assert_eq(tly_poll_find_ip(p, h), w);
    /* retracting a moved vote frees its address */
    tly_poll_retract_vote(r, p, v[0], NOW + 3 * MIN);
    ip_of(h, 1);
    cr_assert_null(tly_poll_find_ip(p, h));
    assert_ip_set(p, 3);
    tly_registry_free(r);
}

Test(oom, set_vote_ip_fails_cleanly)
{
    tly_poll_t *p = create_ok(with_settings(body_n("multiple", 3), "{\"voter_check\":\"ip\"}"));
    tly_ballot_t b = parsed(p, "{\"option_ids\":[\"$0\"]}");
    tly_vote_t *v = tly_vote_new(&b, "a", NULL, NULL, NULL, NOW);
    tly_poll_add_vote(NULL, p, v);
    uint8_t h[TLY_IP_HASH_LEN];
    ip_of(h, 9);
    tly_alloc_fail_after(0);
    int rc = tly_poll_set_vote_ip(p, v, h);
    tly_alloc_fail_after(-1);
    cr_assert_eq(rc, TLY_ENOMEM);
    cr_assert_null(tly_vote_ip_hash(v));
    cr_assert_null(tly_poll_find_ip(p, h));
    cr_assert_eq(tly_poll_ip_count(p), 0);
    cr_assert_eq(tly_poll_set_vote_ip(p, v, h), 0, "and with memory it works");
    cr_assert_eq(tly_poll_find_ip(p, h), v);
    tly_poll_free(p);
}

/* ---- ranked counts against a reference ----
 *
 * The instant-runoff rounds and the Condorcet winner are checked against a count written
 * the plain way (every round recounted from every ballot, every pair compared from
 * every ballot), on random elections with casts, changes, retractions and dropped pending
 * ballots, through both ways of rendering: on the calling thread (tly_results_render)
 * and through a job (snapshot, run, install), including jobs that run on another thread
 * while the poll goes on changing under them. */

#include <pthread.h>

#define RVOTERS 80

/* The test's own record of the ballots: what each voter has standing. */
typedef struct {
    int state; /* 0: none, 1: pending, 2: committed */
    tly_ballot_t b;
} rvoter_t;

typedef struct {
    rvoter_t v[RVOTERS];
} relection_t;

/* rounds, winner and condorcet_winner of the committed ballots of e, the plain way */
static json_t *ref_ranked(const tly_poll_t *p, const relection_t *e)
{
    size_t n = p->noptions;
    bool out[TLY_MAX_OPTIONS] = {false};
    uint64_t first[TLY_MAX_OPTIONS] = {0};
    json_t *rounds = json_array(), *winner = json_null();
    size_t nb = 0;
    for (size_t k = 0; k < RVOTERS; k++)
        nb += e->v[k].state == 2 && e->v[k].b.nchoices > 0;
    for (size_t round = 0, remaining = n; nb > 0; round++) {
        uint64_t count[TLY_MAX_OPTIONS] = {0}, continuing = 0;
        for (size_t k = 0; k < RVOTERS; k++) {
            const tly_ballot_t *b = &e->v[k].b;
            if (e->v[k].state != 2)
                continue;
            for (size_t i = 0; i < b->nchoices; i++)
                if (!out[b->choices[i]]) {
                    count[b->choices[i]]++;
                    continuing++;
                    break;
                }
        }
        if (round == 0)
            memcpy(first, count, sizeof(first));
        json_t *counts = json_object(), *elim = json_array();
        size_t top = SIZE_MAX;
        bool zeros = false;
        for (size_t i = 0; i < n; i++) {
            if (out[i])
                continue;
            json_object_set_new(counts, p->options[i].option_id, json_integer((json_int_t)count[i]));
            if (top == SIZE_MAX || count[i] > count[top])
                top = i;
            zeros = zeros || count[i] == 0;
        }
        json_array_append_new(rounds, json_pack("{s:o, s:o}", "counts", counts, "eliminated", elim));
        if (2 * count[top] > continuing || remaining == 1) {
            json_decref(winner);
            winner = json_string(p->options[top].option_id);
            break;
        }
        /* every option without votes; else the fewest votes, then the fewest first
         * preferences, then the one listed last */
        size_t loser = SIZE_MAX;
        for (size_t i = 0; i < n; i++) {
            if (out[i] || zeros)
                continue;
            if (loser == SIZE_MAX || count[i] < count[loser] ||
                (count[i] == count[loser] && (first[i] < first[loser] || (first[i] == first[loser] && i > loser))))
                loser = i;
        }
        bool drop[TLY_MAX_OPTIONS] = {false};
        for (size_t i = 0; i < n; i++)
            drop[i] = !out[i] && (zeros ? count[i] == 0 : i == loser);
        for (size_t i = 0; i < n; i++)
            if (drop[i]) {
                json_array_append_new(elim, json_string(p->options[i].option_id));
                out[i] = true;
                remaining--;
            }
    }
    /* a prefers a to b: ranks a, and b after a or not at all */
    json_t *condorcet = json_null();
    for (size_t a = 0; a < n && nb > 0; a++) {
        bool beats_all = true;
        for (size_t x = 0; x < n && beats_all; x++) {
            if (x == a)
                continue;
            uint64_t ax = 0, xa = 0;
            for (size_t k = 0; k < RVOTERS; k++) {
                const tly_ballot_t *b = &e->v[k].b;
                if (e->v[k].state != 2)
                    continue;
                for (size_t i = 0; i < b->nchoices; i++) {
                    if (b->choices[i] == a) {
                        ax++;
                        break;
                    }
                    if (b->choices[i] == x) {
                        xa++;
                        break;
                    }
                }
            }
            beats_all = ax > xa;
        }
        if (beats_all) {
            json_decref(condorcet);
            condorcet = json_string(p->options[a].option_id);
            break;
        }
    }
    return json_pack("{s:o, s:o, s:o}", "rounds", rounds, "winner", winner, "condorcet_winner", condorcet);
}

/* The ranked members of a rendering equal the reference, and so do the counts. */
static void assert_ranked(const tly_poll_t *p, const relection_t *e, const char *text, const char *what)
{
    json_t *got = J(text), *want = ref_ranked(p, e);
    const char *keys[3] = {"rounds", "winner", "condorcet_winner"};
    for (size_t i = 0; i < 3; i++) {
        json_t *g = json_object_get(got, keys[i]), *w = json_object_get(want, keys[i]);
        char *gs = json_dumps(g, JSON_COMPACT | JSON_ENCODE_ANY), *ws = json_dumps(w, JSON_COMPACT | JSON_ENCODE_ANY);
        cr_assert(g != NULL && json_equal(g, w), "%s: %s is %s, want %s", what, keys[i], gs ? gs : "(none)", ws);
        free(gs);
        free(ws);
    }
    uint64_t total = 0, firsts[TLY_MAX_OPTIONS] = {0};
    for (size_t k = 0; k < RVOTERS; k++)
        if (e->v[k].state == 2) {
            total++;
            if (e->v[k].b.nchoices > 0)
                firsts[e->v[k].b.choices[0]]++;
        }
    cr_assert_eq((uint64_t)json_integer_value(json_object_get(got, "total_votes")), total, "%s", what);
    json_t *opts = json_object_get(got, "options");
    for (size_t i = 0; i < p->noptions; i++)
        cr_assert_eq((uint64_t)json_integer_value(json_object_get(json_array_get(opts, i), "votes")), firsts[i],
                     "%s: option %zu", what, i);
    json_decref(got);
    json_decref(want);
}

/* A random ranking, often one of a few (so that ties and repeated ballots are common). */
static tly_ballot_t random_ranking(const tly_poll_t *p, const tly_ballot_t *pool, size_t npool)
{
    if (npool > 0 && rnd(2) == 0)
        return pool[rnd((uint32_t)npool)];
    tly_ballot_t b = random_ballot(p);
    if (rnd(3) == 0) /* short rankings exhaust */
        b.nchoices = (uint8_t)(1 + rnd(b.nchoices < 3 ? b.nchoices : 3));
    return b;
}

/* One random operation on voter k of p, mirrored in e. */
static void random_op(tly_registry_t *r, tly_poll_t *p, relection_t *e, const tly_ballot_t *pool, size_t npool,
                      int64_t now)
{
    size_t k = rnd(RVOTERS);
    char voter[16];
    snprintf(voter, sizeof(voter), "rv%zu", k);
    rvoter_t *rv = &e->v[k];
    tly_vote_t *v = tly_poll_find_vote(p, voter);
    cr_assert_eq(v != NULL, rv->state != 0);
    if (v == NULL) {
        rv->b = random_ranking(p, pool, npool);
        v = tly_vote_new(&rv->b, voter, NULL, NULL, NULL, now);
        cr_assert_eq(tly_poll_add_vote(r, p, v), 0);
        rv->state = 1;
        if (rnd(4) != 0) {
            tly_poll_commit_vote(p, v, now);
            rv->state = 2;
        }
    } else if (rv->state == 1) {
        if (rnd(3) != 0) {
            tly_poll_commit_vote(p, v, now);
            rv->state = 2;
        } else {
            tly_poll_drop_vote(r, p, v);
            rv->state = 0;
        }
    } else if (rnd(2) == 0) {
        tly_ballot_t b = random_ranking(p, pool, npool);
        tly_vote_t *out = NULL;
        cr_assert_eq(tly_poll_change_vote(r, p, v, &b, now, &out), 0);
        rv->b = b;
    } else {
        tly_poll_retract_vote(r, p, v, now);
        rv->state = 0;
    }
}

/* The job path gives what a render on the loop gives, byte for byte, and installs as
 * fresh. */
static void assert_job_matches(tly_poll_t *p, const relection_t *e, int64_t now)
{
    char *loop = strdup(tly_results_render(p, now, NULL));
    tly_results_job_t *same = tly_results_job_new(p, now);
    cr_assert_not_null(same);
    cr_assert_eq(tly_results_job_run(same), 0);
    cr_assert_eq(tly_results_job_run(same), 0, "a second run changes nothing");
    cr_assert_not(tly_results_job_install(p, same), "the same counts as the rendering held: kept");
    tly_free(p->results_json); /* as if none were held */
    p->results_json = NULL;
    cr_assert(tly_results_job_install(p, same));
    tly_results_job_free(same);
    cr_assert_str_eq(tly_results_cached(p, now, p->seq, NULL, NULL), loop);
    free(loop);

    tly_results_job_t *j = tly_results_job_new(p, now);
    cr_assert_not_null(j);
    cr_assert_eq(tly_results_job_seq(j), p->seq);
    cr_assert_eq(tly_results_job_run(j), 0);
    bool installed = tly_results_job_install(p, j);
    tly_results_job_free(j);
    size_t len;
    uint64_t seq = 0;
    const char *cached = tly_results_cached(p, now, p->seq, &seq, &len);
    if (!installed) { /* only when the render already held these counts */
        cr_assert_not_null(cached);
        cr_assert_eq(tly_results_render_cost(p, now), 0);
    }
    cr_assert_not_null(cached, "a job's rendering is served");
    cr_assert_eq(seq, p->seq);
    cr_assert_eq(tly_results_render_cost(p, now), 0, "nothing changed since: fresh");
    char *copy = strdup(cached);
    size_t len2;
    const char *rendered = tly_results_render(p, now, &len2);
    cr_assert_eq(rendered, cached, "served as it is, not rendered again");
    cr_assert_eq(len, len2);
    assert_ranked(p, e, copy, "job");
    free(copy);
}

static void ranked_election(size_t noptions, int ops, uint64_t seed)
{
    rng_state = seed;
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("ranked", noptions));
    cr_assert_eq(tly_registry_add_poll(r, p), 0);
    tly_ballot_t pool[4];
    for (size_t i = 0; i < 4; i++)
        pool[i] = random_ranking(p, NULL, 0);
    relection_t *e = calloc(1, sizeof(*e));
    int64_t now = NOW;
    for (int op = 0; op < ops; op++) {
        now += 1 + rnd(2000);
        random_op(r, p, e, pool, 4, now);
        if (op % 3 == 0) {
            const char *text = tly_results_render(p, now, NULL);
            cr_assert_not_null(text);
            char what[64];
            snprintf(what, sizeof(what), "%zu options, op %d", noptions, op);
            assert_ranked(p, e, text, what);
        } else if (op % 7 == 1) {
            assert_job_matches(p, e, now);
        }
    }
    free(e);
    tly_registry_free(r);
}

Test(ranked, random_elections_match_the_reference, .timeout = 120)
{
    static const size_t sizes[] = {2, 3, 4, 5, 7, 10, 100};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(sizes); i++)
        ranked_election(sizes[i], sizes[i] == 100 ? 300 : 1500, 0x5EED0000u + i);
}

/* A poll outside any registry builds its table and pairs on its first render. */
Test(ranked, a_poll_outside_a_registry_counts_on_first_render)
{
    rng_state = 7;
    tly_poll_t *p = create_ok(body_n("ranked", 6));
    relection_t *e = calloc(1, sizeof(*e));
    for (int op = 0; op < 200; op++)
        random_op(NULL, p, e, NULL, 0, NOW + op);
    const char *text = tly_results_render(p, NOW + 1000, NULL);
    assert_ranked(p, e, text, "first render");
    for (int op = 0; op < 200; op++)
        random_op(NULL, p, e, NULL, 0, NOW + 2000 + op);
    assert_job_matches(p, e, NOW + 3000);
    free(e);
    tly_poll_free(p);
}

/* A job counts the ballots of the moment it was made, whatever happens to the poll
 * before it runs: the chunks it holds are copied before the poll writes them. */
Test(ranked, a_job_counts_its_snapshot, .timeout = 120)
{
    rng_state = 11;
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("ranked", 9));
    tly_registry_add_poll(r, p);
    relection_t *e = calloc(1, sizeof(*e)), *then = calloc(1, sizeof(*then));
    int64_t now = NOW;
    for (int round = 0; round < 40; round++) {
        for (int op = 0; op < 30; op++)
            random_op(r, p, e, NULL, 0, ++now);
        tly_results_job_t *j = tly_results_job_new(p, now);
        cr_assert_not_null(j);
        *then = *e;
        uint64_t seq = p->seq;
        for (int op = 0; op < 30; op++) /* changes, retractions and casts after the snapshot */
            random_op(r, p, e, NULL, 0, ++now);
        cr_assert_eq(tly_results_job_run(j), 0);
        bool moved = p->seq != seq;
        cr_assert(tly_results_job_install(p, j) || !moved, "newer than what the poll held");
        tly_results_job_free(j);
        size_t len;
        uint64_t shown;
        const char *old = tly_results_cached(p, now, seq, &shown, &len);
        cr_assert_not_null(old, "the job's rendering serves reads made before its snapshot");
        cr_assert_eq(shown, seq);
        assert_ranked(p, then, old, "snapshot");
        if (moved) {
            cr_assert_null(tly_results_cached(p, now, p->seq, NULL, NULL), "but not reads made since");
            cr_assert_gt(tly_results_render_cost(p, now), 0, "stale");
        }
        const char *text = tly_results_render(p, now, NULL);
        cr_assert_not_null(text);
        assert_ranked(p, e, text, "after the snapshot");
        cr_assert_eq(tly_results_render_cost(p, now), 0);
    }
    free(e);
    free(then);
    tly_registry_free(r);
}

/* The results of p recounted in a new poll from p's committed ballots as they stand:
 * built from scratch by its first render, with no incremental count behind it. */
static json_t *recounted(tly_poll_t *p, int64_t now)
{
    tly_poll_t *q = create_ok(body_n("ranked", p->noptions));
    for (size_t i = 0; i < p->noptions; i++) /* the same ids, so the two compare */
        memcpy(q->options[i].option_id, p->options[i].option_id, sizeof(q->options[i].option_id));
    for (tly_vote_t *v = p->votes; v != NULL; v = v->hh.next) {
        if (v->state != TLY_VOTE_COMMITTED)
            continue;
        tly_ballot_t c;
        memset(&c, 0, sizeof(c));
        c.nchoices = v->nchoices;
        memcpy(c.choices, v->data, c.nchoices);
        cast_at(NULL, q, v->voter_id, &c, NOW);
    }
    json_t *o = J(tly_results_render(q, now, NULL));
    tly_poll_free(q);
    return o;
}

/* Rows as long as the poll's max_choices; a longer ranking (settings changed while the
 * poll had no ballot, or a stored one) lays the table out again; the pairs come with the
 * first ballot. The counts stay those of a poll laid out for every option. */
Test(ranked, rows_follow_max_choices)
{
    rng_state = 19;
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(with_settings(body_n("ranked", 10), "{\"max_choices\":3}"));
    tly_registry_add_poll(r, p);
    cr_assert_null(p->ranked_pairs, "no ballot, no pairs");
    cr_assert_not_null(tly_results_render(p, NOW, NULL));
    cr_assert_null(p->ranked_pairs, "nor after a render");
    for (int i = 0; i < 300; i++) {
        char voter[16];
        snprintf(voter, sizeof(voter), "a%d", i);
        tly_ballot_t b = random_ballot(p);
        b.nchoices = (uint8_t)(1 + rnd(3));
        cast_at(r, p, voter, &b, NOW);
    }
    cr_assert_not_null(p->ranked_pairs);
    json_t *got = J(tly_results_render(p, NOW, NULL)), *want = recounted(p, NOW);
    cr_assert(json_equal(json_object_get(got, "rounds"), json_object_get(want, "rounds")));
    cr_assert(json_equal(json_object_get(got, "condorcet_winner"), json_object_get(want, "condorcet_winner")));
    json_decref(got);
    json_decref(want);
    cr_assert_eq(tly_results_render_cost(p, NOW), 0);
    /* a stored ranking longer than max_choices: counted all the same */
    tly_ballot_t longer = random_ballot(p);
    longer.nchoices = 8;
    cast_at(r, p, "long", &longer, NOW);
    tly_results_job_t *j = tly_results_job_new(p, NOW);
    cr_assert_eq(tly_results_job_run(j), 0);
    cr_assert(tly_results_job_install(p, j));
    tly_results_job_free(j);
    got = J(tly_results_cached(p, NOW, p->seq, NULL, NULL));
    want = recounted(p, NOW);
    cr_assert(json_equal(json_object_get(got, "rounds"), json_object_get(want, "rounds")));
    json_decref(got);
    json_decref(want);
    tly_registry_free(r);

    /* max_choices raised while the poll has no ballot: longer rows from then on */
    r = tly_registry_new();
    p = create_ok(with_settings(body_n("ranked", 6), "{\"max_choices\":2}"));
    tly_registry_add_poll(r, p);
    json_t *patch = J("{\"settings\":{\"max_choices\":6}}");
    const char *f, *m;
    char buf[64];
    cr_assert_eq(tly_poll_patch(p, patch, NOW, &f, &m, buf, sizeof(buf)), 0);
    json_decref(patch);
    for (int i = 0; i < 50; i++) {
        char voter[16];
        snprintf(voter, sizeof(voter), "b%d", i);
        tly_ballot_t b = random_ballot(p);
        cast_at(r, p, voter, &b, NOW);
    }
    got = J(tly_results_render(p, NOW, NULL));
    want = recounted(p, NOW);
    cr_assert(json_equal(json_object_get(got, "rounds"), json_object_get(want, "rounds")));
    json_decref(got);
    json_decref(want);
    tly_registry_free(r);
}

typedef struct {
    tly_results_job_t *job;
    int rc;
} job_thread_t;

static void *run_job(void *arg)
{
    job_thread_t *t = arg;
    t->rc = tly_results_job_run(t->job);
    return NULL;
}

/* The same with the jobs running on another thread while this one changes the poll
 * (over several chunks of rankings), as the API runs them. */
Test(ranked, jobs_run_on_another_thread_while_the_poll_changes, .timeout = 120)
{
    rng_state = 13;
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("ranked", 12));
    tly_registry_add_poll(r, p);
    /* 1,500 standing ballots (six chunks) besides the random voters */
    relection_t *e = calloc(1, sizeof(*e));
    tly_vote_t *bulk[1500];
    for (int i = 0; i < 1500; i++) {
        char voter[16];
        snprintf(voter, sizeof(voter), "bulk%d", i);
        tly_ballot_t b = random_ballot(p);
        bulk[i] = cast_at(r, p, voter, &b, NOW);
    }
    for (int round = 0; round < 30; round++) {
        for (int op = 0; op < 20; op++)
            random_op(r, p, e, NULL, 0, NOW + round);
        /* the reference of the moment: the ballots recounted from scratch, right now */
        job_thread_t t = {.job = tly_results_job_new(p, NOW + round)};
        cr_assert_not_null(t.job);
        json_t *want = recounted(p, NOW + round);
        pthread_t th;
        cr_assert_eq(pthread_create(&th, NULL, run_job, &t), 0);
        for (int op = 0; op < 200; op++) { /* meanwhile: changes all over the chunks */
            int i = (int)rnd(1500);
            tly_ballot_t b = random_ballot(p);
            tly_vote_t *out;
            cr_assert_eq(tly_poll_change_vote(r, p, bulk[i], &b, NOW + round, &out), 0);
            bulk[i] = out;
            random_op(r, p, e, NULL, 0, NOW + round);
        }
        pthread_join(th, NULL);
        cr_assert_eq(t.rc, 0);
        cr_assert(tly_results_job_install(p, t.job));
        tly_results_job_free(t.job);
        json_t *got = J(tly_results_cached(p, NOW + round, 0, NULL, NULL));
        static const char *const keys[] = {"total_votes", "options", "rounds", "winner", "condorcet_winner"};
        for (size_t i = 0; i < TLY_ARRAY_SIZE(keys); i++)
            cr_assert(json_equal(json_object_get(got, keys[i]), json_object_get(want, keys[i])),
                      "the job shows the poll as it was when the job was made (%s)", keys[i]);
        json_decref(got);
        json_decref(want);
    }
    free(e);
    tly_registry_free(r);
}

/* The newer rendering stays, whichever order jobs finish in; final results are never
 * replaced; a job of a poll that is not ranked renders it too. */
Test(ranked, install_keeps_the_newest)
{
    tly_poll_t *p = create_ok(body_n("ranked", 3));
    cast(NULL, p, "a", "{\"ranking\":[\"$0\",\"$1\"]}");
    tly_results_job_t *older = tly_results_job_new(p, NOW);
    cast(NULL, p, "b", "{\"ranking\":[\"$1\"]}");
    tly_results_job_t *newer = tly_results_job_new(p, NOW);
    cr_assert_eq(tly_results_job_run(older), 0);
    cr_assert_eq(tly_results_job_run(newer), 0);
    cr_assert(tly_results_job_install(p, newer));
    cr_assert_not(tly_results_job_install(p, older), "older than what is installed");
    json_t *o = J(tly_results_cached(p, NOW, p->seq, NULL, NULL));
    cr_assert_eq(json_integer_value(json_object_get(o, "total_votes")), 2);
    json_decref(o);
    tly_results_job_free(older);
    tly_results_job_free(newer);
    /* a job never run, freed: nothing leaks (the sanitizer build checks) */
    tly_results_job_free(tly_results_job_new(p, NOW));
    /* once the poll is closed its final results are served, and no job replaces them */
    tly_results_job_t *before = tly_results_job_new(p, NOW);
    cr_assert_eq(tly_results_job_run(before), 0);
    json_t *close = J("{\"status\":\"closed\"}");
    const char *f, *m;
    char buf[64];
    cr_assert_eq(tly_poll_patch(p, close, NOW + 1, &f, &m, buf, sizeof(buf)), 0);
    json_decref(close);
    cr_assert_eq(tly_results_render_cost(p, NOW + 1), 0, "final results are served as they are");
    cr_assert_not_null(tly_results_render(p, NOW + 1, NULL));
    cr_assert_not(tly_results_job_install(p, before));
    cr_assert_null(tly_results_cached(p, NOW + 1, 0, NULL, NULL), "final results are tly_results_render's");
    tly_results_job_free(before);
    tly_poll_free(p);

    tly_poll_t *s = create_ok(body_n("score", 3));
    cast(NULL, s, "a", "{\"scores\":{\"$0\":4}}");
    cr_assert_eq(tly_results_render_cost(s, NOW), 0, "O(options)");
    tly_results_job_t *j = tly_results_job_new(s, NOW);
    cr_assert_eq(tly_results_job_run(j), 0);
    cr_assert(tly_results_job_install(s, j));
    tly_results_job_free(j);
    o = J(tly_results_cached(s, NOW, s->seq, NULL, NULL));
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(json_object_get(o, "options"), 0), "score_sum")),
                 4);
    json_decref(o);
    tly_poll_free(s);
}

/* The cost a caller weighs: every ranking's choices while the rendering is stale, 0
 * once it is fresh. */
Test(ranked, render_cost)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("ranked", 4));
    tly_registry_add_poll(r, p);
    cr_assert_eq(tly_results_render_cost(p, NOW), 0, "no ballot, nothing to count");
    cr_assert_not_null(tly_results_render(p, NOW, NULL));
    cr_assert_eq(tly_results_render_cost(p, NOW), 0);
    tly_vote_t *a = cast(r, p, "a", "{\"ranking\":[\"$0\",\"$1\",\"$2\"]}");
    cast(r, p, "b", "{\"ranking\":[\"$3\"]}");
    cr_assert_eq(tly_results_render_cost(p, NOW), 2 + 4, "two rows, four choices");
    cr_assert_not_null(tly_results_render(p, NOW, NULL));
    cr_assert_eq(tly_results_render_cost(p, NOW), 0);
    tly_poll_retract_vote(r, p, a, NOW);
    cr_assert_eq(tly_results_render_cost(p, NOW), 2 + 1, "an emptied row is still walked");
    cast(r, p, "c", "{\"ranking\":[\"$1\",\"$2\"]}");
    cr_assert_eq(tly_results_render_cost(p, NOW), 2 + 3, "and used again");
    tly_registry_free(r);
}

/* Out of memory while the table of rankings grows, copies a chunk a job holds or
 * remembers a row given back: the table is dropped and built again from the ballots by
 * the next count, which is exact; a job that cannot be made or run says so. */
Test(oom, ranked_table_and_jobs_fail_cleanly, .timeout = 120)
{
    for (long budget = 0; budget < 24; budget++) {
        rng_state = 17;
        tly_registry_t *r = tly_registry_new();
        tly_poll_t *p = create_ok(body_n("ranked", 5));
        tly_registry_add_poll(r, p);
        tly_vote_t *bulk[600], *pending[20];
        for (int i = 0; i < 600; i++) { /* three chunks */
            char voter[16];
            snprintf(voter, sizeof(voter), "bulk%d", i);
            tly_ballot_t b = random_ballot(p);
            bulk[i] = cast_at(r, p, voter, &b, NOW);
        }
        for (int i = 0; i < 20; i++) {
            char voter[16];
            snprintf(voter, sizeof(voter), "late%d", i);
            tly_ballot_t b = random_ballot(p);
            pending[i] = tly_vote_new(&b, voter, NULL, NULL, NULL, NOW);
            cr_assert_eq(tly_poll_add_vote(r, p, pending[i]), 0);
        }
        tly_results_job_t *held = tly_results_job_new(p, NOW); /* every chunk now shared */
        cr_assert_not_null(held);
        tly_alloc_fail_after(budget);
        /* what cannot fail for want of memory: commits, retractions and changes in place */
        for (int i = 0; i < 20; i++)
            tly_poll_commit_vote(p, pending[i], NOW + 1);
        for (int i = 0; i < 30; i++)
            tly_poll_retract_vote(r, p, bulk[20 * i], NOW + 2);
        for (int i = 0; i < 30; i++) {
            tly_vote_t *v = bulk[20 * i + 7], *out;
            tly_ballot_t b = random_ballot(p);
            b.nchoices = b.nchoices < v->nchoices ? b.nchoices : v->nchoices;
            cr_assert_eq(tly_poll_change_vote(r, p, v, &b, NOW + 3, &out), 0);
            cr_assert_eq(out, v, "in place");
        }
        tly_results_job_t *j = tly_results_job_new(p, NOW + 4);
        int rc = j != NULL ? tly_results_job_run(j) : TLY_ENOMEM;
        tly_alloc_fail_after(-1);
        json_t *want = recounted(p, NOW + 4);
        cr_assert(rc == 0 || rc == TLY_ENOMEM);
        if (rc == 0) {
            cr_assert(tly_results_job_install(p, j));
            json_t *got = J(tly_results_cached(p, NOW + 4, p->seq, NULL, NULL));
            cr_assert(json_equal(json_object_get(got, "rounds"), json_object_get(want, "rounds")), "budget %ld",
                      budget);
            json_decref(got);
        }
        tly_results_job_free(j);
        cr_assert_eq(tly_results_job_run(held), 0);
        tly_results_job_free(held);
        /* with memory again: a render on the loop is exact */
        const char *text = tly_results_render(p, NOW + 5, NULL);
        cr_assert_not_null(text);
        json_t *got = J(text);
        cr_assert(json_equal(json_object_get(got, "rounds"), json_object_get(want, "rounds")), "budget %ld", budget);
        cr_assert(json_equal(json_object_get(got, "condorcet_winner"), json_object_get(want, "condorcet_winner")));
        cr_assert(json_equal(json_object_get(got, "total_votes"), json_object_get(want, "total_votes")));
        json_decref(got);
        json_decref(want);
        tly_registry_free(r);
    }
}

/* ---- join codes in the registry ---- */

Test(registry, join_codes_find_their_poll_and_go_with_it)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *a = create_ok(body_n("single", 2)), *b = create_ok(body_n("single", 2)),
               *c = create_ok(body_n("single", 2));
    cr_assert_str_eq(a->join_code, "", "core gives none: the API draws them");
    snprintf(a->join_code, sizeof(a->join_code), "ABCDEF");
    snprintf(c->join_code, sizeof(c->join_code), "ABCDEF"); /* the same code, held already */
    cr_assert_eq(tly_registry_add_poll(r, a), 0);
    cr_assert_eq(tly_registry_add_poll(r, b), 0);
    cr_assert_eq(tly_registry_add_poll(r, c), 0);
    cr_assert_eq(tly_registry_find_code(r, "ABCDEF"), a);
    cr_assert_str_eq(c->join_code, "", "a code held by another poll is dropped from the newcomer");
    cr_assert_null(tly_registry_find_code(r, ""));
    cr_assert_null(tly_registry_find_code(r, NULL));

    cr_assert_eq(tly_registry_set_code(r, b, "ABCDEF"), TLY_EEXIST);
    cr_assert_str_eq(b->join_code, "");
    cr_assert_eq(tly_registry_set_code(r, b, "234567"), 0);
    cr_assert_eq(tly_registry_find_code(r, "234567"), b);
    cr_assert_eq(tly_registry_set_code(r, b, "234567"), 0, "again: no change");
    cr_assert_eq(tly_registry_set_code(r, b, "345678"), 0, "a new one frees the old");
    cr_assert_null(tly_registry_find_code(r, "234567"));
    cr_assert_eq(tly_registry_find_code(r, "345678"), b);

    /* closing: the code goes back, and another poll may take it */
    cr_assert_eq(tly_registry_set_code(r, a, NULL), 0);
    cr_assert_str_eq(a->join_code, "");
    cr_assert_null(tly_registry_find_code(r, "ABCDEF"));
    cr_assert_eq(tly_registry_set_code(r, c, "ABCDEF"), 0);
    cr_assert_eq(tly_registry_find_code(r, "ABCDEF"), c);

    /* the poll's JSON says it while open, and null once closed */
    json_t *j = tly_poll_to_json(c, NOW);
    cr_assert_str_eq(json_string_value(json_object_get(j, "join_code")), "ABCDEF");
    json_decref(j);
    c->end_time = NOW - 1;
    c->status = TLY_STATUS_ACTIVE;
    j = tly_poll_to_json(c, NOW);
    cr_assert(json_is_null(json_object_get(j, "join_code")), "past its end_time: closed, no code");
    json_decref(j);
    cr_assert_eq(tly_registry_find_code(r, "ABCDEF"), c, "held until settled: nobody else gets it meanwhile");

    tly_registry_remove_poll(r, c);
    cr_assert_null(tly_registry_find_code(r, "ABCDEF"), "a removed poll's code is free");
    tly_registry_remove_poll(r, b);
    cr_assert_null(tly_registry_find_code(r, "345678"));
    tly_registry_free(r); /* a is freed with it */
}

/* ---- device links: a ballot re-filed under the account, a poll handed over ---- */

Test(link, rekey_files_the_vote_under_the_account_and_keeps_everything_else)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *p = create_ok(body_n("multiple", 3));
    tly_registry_add_poll(r, p);
    /* enough votes for several buckets, so that the move crosses chains */
    char voter[32];
    for (int i = 0; i < 40; i++) {
        snprintf(voter, sizeof(voter), "voter%d", i);
        cast(r, p, voter, "{\"option_ids\":[\"$1\"]}");
    }
    tly_vote_t *d = cast_from(r, p, "anon_dev", 7);
    tly_poll_commit_vote(p, d, NOW + 6);
    char vote_id[TLY_VOTE_ID_LEN + 1], receipt[TLY_RECEIPT_LEN + 1];
    strcpy(vote_id, d->vote_id);
    strcpy(receipt, d->receipt);
    uint64_t seq = p->seq, total = p->total_votes;
    assert_votes(p, (uint64_t[]){1, 40, 0});

    cr_assert_eq(tly_poll_rekey_vote(p, d, "u_account"), 0);
    cr_assert_null(tly_poll_find_vote(p, "anon_dev"), "the device has no ballot of its own any more");
    cr_assert_eq(tly_poll_find_vote(p, "u_account"), d, "the same vote, filed under the account");
    cr_assert_str_eq(d->voter_id, "u_account");
    cr_assert_str_eq(d->vote_id, vote_id);
    cr_assert_str_eq(d->receipt, receipt);
    cr_assert_eq(tly_registry_find_receipt(r, receipt), d);
    cr_assert_eq(p->seq, seq, "counts do not move");
    cr_assert_eq(p->total_votes, total);
    assert_votes(p, (uint64_t[]){1, 40, 0});
    uint8_t h[TLY_IP_HASH_LEN];
    ip_of(h, 7);
    cr_assert_eq(tly_poll_find_ip(p, h), d, "its address stays with it");
    assert_maps(r, p);

    /* a voter who has a ballot in the poll cannot take another */
    cr_assert_eq(tly_poll_rekey_vote(p, d, "voter3"), TLY_EEXIST);
    cr_assert_eq(tly_poll_find_vote(p, "u_account"), d);
    /* a vote of another poll is not this poll's to move */
    tly_poll_t *q = create_ok(body_n("single", 2));
    tly_registry_add_poll(r, q);
    cr_assert_eq(tly_poll_rekey_vote(q, d, "someone"), TLY_EINVAL);
    /* out of memory: nothing changes */
    tly_alloc_fail_after(0);
    int rc = tly_poll_rekey_vote(p, d, "u_other");
    tly_alloc_fail_after(-1);
    cr_assert_eq(rc, TLY_ENOMEM);
    cr_assert_eq(tly_poll_find_vote(p, "u_account"), d);
    assert_maps(r, p);
    /* the only vote of a poll moves too (a delete and an add would free the table) */
    tly_vote_t *only = cast(r, q, "anon_q", "{\"option_id\":\"$0\"}");
    cr_assert_eq(tly_poll_rekey_vote(q, only, "u_account"), 0);
    cr_assert_eq(tly_poll_find_vote(q, "u_account"), only);
    assert_maps(r, q);
    /* and a retraction afterwards finds it where it is now */
    tly_poll_retract_vote(r, p, d, NOW + HOUR);
    cr_assert_null(tly_poll_find_vote(p, "u_account"));
    assert_votes(p, (uint64_t[]){0, 40, 0});
    assert_maps(r, p);
    tly_registry_free(r);
}

Test(link, set_owner_moves_a_poll_between_listings_in_order)
{
    tly_registry_t *r = tly_registry_new();
    tly_poll_t *dev[3], *acc[3];
    for (int i = 0; i < 3; i++) {
        dev[i] = poll_at(NOW + (2 * i) * 1000, "anon_dev");
        acc[i] = poll_at(NOW + (2 * i + 1) * 1000, "u_acc");
        tly_registry_add_poll(r, dev[i]);
        tly_registry_add_poll(r, acc[i]);
    }
    for (int i = 0; i < 3; i++)
        cr_assert_eq(tly_registry_set_owner(r, dev[i], "u_acc"), 0);
    tly_poll_t *out[10];
    bool more;
    cr_assert_eq(tly_registry_list_owner(r, "anon_dev", NULL, out, 10, &more), 0, "the device owns nothing now");
    size_t n = tly_registry_list_owner(r, "u_acc", NULL, out, 10, &more);
    cr_assert_eq(n, 6);
    /* newest first, the handed-over polls among the account's own at their times */
    tly_poll_t *want[6] = {acc[2], dev[2], acc[1], dev[1], acc[0], dev[0]};
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(out[i], want[i], "position %zu", i);
        cr_assert_str_eq(out[i]->owner_id, "u_acc");
    }
    /* out of memory before the change: nothing moves */
    tly_alloc_fail_after(0);
    int rc = tly_registry_set_owner(r, dev[0], "someone");
    tly_alloc_fail_after(-1);
    cr_assert_eq(rc, TLY_ENOMEM);
    cr_assert_str_eq(dev[0]->owner_id, "u_acc");
    cr_assert_eq(tly_registry_list_owner(r, "u_acc", NULL, out, 10, &more), 6);
    for (int i = 0; i < 3; i++) {
        tly_registry_remove_poll(r, dev[i]);
        tly_registry_remove_poll(r, acc[i]);
    }
    cr_assert_eq(tly_registry_list_owner(r, "u_acc", NULL, out, 10, &more), 0);
    tly_registry_free(r);
}

static void count_poll(void *ctx, tly_poll_t *p) { (*(int *)ctx)++; }

Test(link, each_poll_visits_every_poll_once)
{
    tly_registry_t *r = tly_registry_new();
    int n = 0;
    tly_registry_each_poll(r, count_poll, &n);
    cr_assert_eq(n, 0);
    for (int i = 0; i < 25; i++)
        tly_registry_add_poll(r, poll_at(NOW + i, i % 2 ? "a" : "b"));
    tly_registry_each_poll(r, count_poll, &n);
    cr_assert_eq(n, 25);
    tly_registry_free(r);
}
