/*
 * fuzz_ballot.c: libFuzzer harness for the JSON a client sends about polls and ballots.
 *
 * Every input is parsed once as JSON (json_loadb with the API's flags) and then used as
 *   1. a vote body, against one fixed poll of each type (built once at start-up);
 *   2. a poll-create body (tly_poll_from_json);
 *   3. a PATCH body, against fresh polls of each type and state (tly_poll_patch).
 * What would be a bug besides a sanitizer report or a leak (each abort()s):
 *   - a ballot accepted that breaks its poll's rules (count, range, duplicates, order),
 *     or one that does not survive tly_ballot_to_json and back unchanged;
 *   - a poll built or patched into a state the validation promises cannot exist;
 *   - a poll the server would echo (tly_poll_to_json) that it then refuses as a create
 *     or as a PATCH of itself, or reads back differently;
 *   - a failed PATCH that changed the poll, or one that changed what must not change
 *     (a closed poll's end_time and options, choice limits once a vote exists);
 *   - a refusal without a field and message (NULL/NULL means out of memory only).
 *
 * Option ids are random in tally; the fixed polls get known ids instead ("A0000000",
 * "A0000001", ...: the same scheme in every poll) so that the seeds and the dictionary
 * can name them.
 */
#include <jansson.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "core/core.h"

/* 2026-04-05T12:00:00Z, as in tests/unit/test_core.c */
#define NOW INT64_C(1775390400000)
#define HOUR INT64_C(3600000)

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);              \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

/* ---- polls the ballots are parsed against ---- */

static const char *const ballot_poll_bodies[] = {
    "{\"title\":\"Lunch\",\"type\":\"single\",\"options\":[{\"text\":\"Pizza\"},{\"text\":\"Sushi\"},"
    "{\"text\":\"Tacos\"}]}",
    "{\"title\":\"Toppings\",\"type\":\"multiple\",\"options\":[{\"text\":\"a\"},{\"text\":\"b\"},{\"text\":\"c\"},"
    "{\"text\":\"d\"},{\"text\":\"e\"}],\"settings\":{\"min_choices\":2,\"max_choices\":3}}",
    "{\"title\":\"Dates\",\"type\":\"approval\",\"options\":[{\"text\":\"Mon\"},{\"text\":\"Tue\"},"
    "{\"text\":\"Wed\"},{\"text\":\"Thu\"}]}",
    "{\"title\":\"Rank\",\"type\":\"ranked\",\"options\":[{\"text\":\"r0\"},{\"text\":\"r1\"},{\"text\":\"r2\"},"
    "{\"text\":\"r3\"},{\"text\":\"r4\"}],\"settings\":{\"max_choices\":3}}",
    "{\"title\":\"Rate\",\"type\":\"score\",\"options\":[{\"text\":\"s0\"},{\"text\":\"s1\"},{\"text\":\"s2\"},"
    "{\"text\":\"s3\"}],\"settings\":{\"max_score\":10,\"max_choices\":3}}",
    NULL, /* filled in: an approval poll with TLY_MAX_OPTIONS options, the bounds of every array */
};
#define NBALLOT_POLLS TLY_ARRAY_SIZE(ballot_poll_bodies)
static tly_poll_t *ballot_polls[NBALLOT_POLLS];

/* ---- templates for the PATCH targets, created fresh for every input ---- */

typedef struct {
    const char *body;
    int64_t patch_at;  /* when the PATCH is applied */
    const char *setup; /* a PATCH applied first (NULL: none) */
    bool with_vote;    /* a committed vote exists (choice limits and options frozen) */
} patch_target_t;

static const patch_target_t patch_targets[] = {
    {"{\"title\":\"Lunch\",\"type\":\"single\",\"options\":[{\"text\":\"Pizza\"},{\"text\":\"Sushi\"}],"
     "\"end_time\":\"2026-04-06T12:00:00Z\"}",
     NOW, NULL, false},
    {"{\"title\":\"Toppings\",\"type\":\"multiple\",\"status\":\"draft\",\"options\":[{\"text\":\"a\"},"
     "{\"text\":\"b\"},{\"text\":\"c\"},{\"text\":\"d\"}],\"settings\":{\"min_choices\":1,\"max_choices\":3}}",
     NOW, NULL, false},
    {"{\"title\":\"Rank\",\"type\":\"ranked\",\"description\":\"d\",\"options\":[{\"text\":\"r0\"},"
     "{\"text\":\"r1\"},{\"text\":\"r2\"},{\"text\":\"r3\"}],\"start_time\":\"2026-04-05T13:00:00Z\","
     "\"end_time\":\"2026-04-07T00:00:00Z\",\"settings\":{\"max_choices\":3}}",
     NOW, NULL, false},
    {"{\"title\":\"Rate\",\"type\":\"score\",\"options\":[{\"text\":\"s0\"},{\"text\":\"s1\"},{\"text\":\"s2\"}],"
     "\"settings\":{\"max_score\":5,\"results_visibility\":\"after_close\"}}",
     NOW, NULL, false},
    {"{\"title\":\"Dates\",\"type\":\"approval\",\"options\":[{\"text\":\"Mon\"},{\"text\":\"Tue\"},"
     "{\"text\":\"Wed\"}]}",
     NOW, NULL, true},
    /* active, but its end_time has passed when patched: effectively closed */
    {"{\"title\":\"Over\",\"type\":\"single\",\"options\":[{\"text\":\"x\"},{\"text\":\"y\"}],"
     "\"end_time\":\"2026-04-05T13:00:00Z\"}",
     NOW + 2 * HOUR, NULL, false},
    /* closed by status */
    {"{\"title\":\"Shut\",\"type\":\"multiple\",\"options\":[{\"text\":\"x\"},{\"text\":\"y\"},{\"text\":\"z\"}],"
     "\"end_time\":\"2026-04-06T00:00:00Z\"}",
     NOW, "{\"status\":\"closed\"}", false},
};
#define NPATCH_TARGETS TLY_ARRAY_SIZE(patch_targets)
static json_t *patch_bodies[NPATCH_TARGETS], *patch_setups[NPATCH_TARGETS];

static json_t *load(const char *text)
{
    json_error_t err;
    json_t *v = json_loads(text, 0, &err);
    if (v == NULL) {
        fprintf(stderr, "fuzz_ballot: bad built-in JSON: %s: %s\n", err.text, text);
        abort();
    }
    return v;
}

static tly_poll_t *create_or_die(json_t *body)
{
    const char *f = NULL, *m = NULL;
    char buf[128];
    tly_poll_t *p = tly_poll_from_json(body, "owner1", NOW, &f, &m, buf, sizeof(buf));
    if (p == NULL) {
        fprintf(stderr, "fuzz_ballot: built-in poll refused: %s: %s\n", f ? f : "-", m ? m : "-");
        abort();
    }
    return p;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* as main.c does: jansson allocates through tly_malloc */
    json_set_alloc_funcs(tly_malloc, tly_free);
    json_object_seed(1); /* the same hash order in every run, so a crash replays */
    if (sodium_init() < 0)
        abort();
    for (size_t i = 0; i < NBALLOT_POLLS; i++) {
        json_t *body;
        if (ballot_poll_bodies[i] != NULL) {
            body = load(ballot_poll_bodies[i]);
        } else {
            json_t *opts = json_array();
            for (size_t k = 0; k < TLY_MAX_OPTIONS; k++) {
                char t[16];
                snprintf(t, sizeof(t), "o%zu", k);
                json_array_append_new(opts, json_pack("{s:s}", "text", t));
            }
            body = json_pack("{s:s, s:s, s:o}", "title", "Many", "type", "approval", "options", opts);
        }
        tly_poll_t *p = create_or_die(body);
        json_decref(body);
        for (size_t k = 0; k < p->noptions; k++)
            snprintf(p->options[k].option_id, sizeof(p->options[k].option_id), "A%07zu", k);
        ballot_polls[i] = p;
    }
    for (size_t i = 0; i < NPATCH_TARGETS; i++) {
        patch_bodies[i] = load(patch_targets[i].body);
        patch_setups[i] = patch_targets[i].setup ? load(patch_targets[i].setup) : NULL;
    }
    return 0;
}

/* ---- invariants ---- */

static bool valid_text(const char *s, long max, bool may_be_blank)
{
    if (s == NULL)
        return false;
    size_t n = strlen(s);
    long cps = tly_utf8_length(s, n);
    if (cps < 0 || cps > max)
        return false;
    return may_be_blank || strspn(s, " \t\r\n\f\v") < n;
}

/* What tly_poll_from_json and tly_poll_patch promise about every poll they leave. */
static void check_poll(const tly_poll_t *p)
{
    CHECK(valid_text(p->title, TLY_TITLE_MAX, false));
    CHECK(p->description == NULL || valid_text(p->description, TLY_DESCRIPTION_MAX, true));
    CHECK((unsigned)p->type <= TLY_TYPE_SCORE);
    CHECK((unsigned)p->status <= TLY_STATUS_CLOSED);
    CHECK(p->noptions >= TLY_MIN_OPTIONS && p->noptions <= TLY_MAX_OPTIONS);
    for (size_t i = 0; i < p->noptions; i++) {
        const tly_option_t *o = &p->options[i];
        CHECK(valid_text(o->text, TLY_OPTION_TEXT_MAX, false));
        CHECK(strlen(o->option_id) == TLY_OPTION_ID_LEN);
        CHECK(i == 0 || p->options[i - 1].display_order <= o->display_order);
        for (size_t j = 0; j < i; j++) {
            CHECK(strcmp(p->options[j].option_id, o->option_id) != 0);
            CHECK(strcmp(p->options[j].text, o->text) != 0);
        }
    }
    const tly_settings_t *s = &p->settings;
    CHECK((unsigned)s->results_visibility <= TLY_VIS_OWNER_ONLY);
    if (p->type == TLY_TYPE_SINGLE) {
        CHECK(s->min_choices == 1 && s->max_choices == 1);
    } else {
        CHECK(s->min_choices >= 1 && s->min_choices <= s->max_choices);
        CHECK((size_t)s->max_choices <= p->noptions);
    }
    if (p->type == TLY_TYPE_SCORE) {
        CHECK(s->max_score >= 1 && s->max_score <= TLY_MAX_SCORE_LIMIT);
        CHECK(p->score_sum != NULL);
    } else {
        CHECK(s->max_score == 0);
    }
    CHECK(p->start_time == 0 || p->end_time == 0 || p->end_time > p->start_time);
}

/* Whether two polls say the same to a client (ids and times of creation aside). */
/* The same poll from NOW on. The status compared is the one clients see: a draft whose
 * start_time has come is echoed as "active", and reads back as an active poll with that
 * start_time, which behaves the same from then on. */
static bool same_poll(const tly_poll_t *a, const tly_poll_t *b)
{
    if (strcmp(a->title, b->title) != 0 || (a->description == NULL) != (b->description == NULL) ||
        (a->description != NULL && strcmp(a->description, b->description) != 0) || a->type != b->type ||
        tly_poll_effective_status(a, NOW) != tly_poll_effective_status(b, NOW) || a->start_time != b->start_time ||
        a->end_time != b->end_time ||
        memcmp(&a->settings, &b->settings, sizeof(a->settings)) != 0 || a->noptions != b->noptions)
        return false;
    for (size_t i = 0; i < a->noptions; i++)
        if (strcmp(a->options[i].text, b->options[i].text) != 0 ||
            a->options[i].display_order != b->options[i].display_order)
            return false;
    return true;
}

/* The poll as a client sees it, as text (owned by the caller), to tell whether p changed. */
static char *snapshot(const tly_poll_t *p, int64_t now)
{
    json_t *j = tly_poll_to_json(p, now);
    CHECK(j != NULL);
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(j);
    CHECK(s != NULL);
    return s;
}

/* ---- 1. ballots ---- */

static void check_ballot(const tly_poll_t *p, const tly_ballot_t *b)
{
    size_t min = p->settings.min_choices < 1 ? 1 : (size_t)p->settings.min_choices;
    size_t max = p->settings.max_choices < 1 ? p->noptions : (size_t)p->settings.max_choices;
    if (p->type == TLY_TYPE_SINGLE)
        min = max = 1;
    CHECK(b->nchoices >= min && b->nchoices <= max);
    bool seen[TLY_MAX_OPTIONS] = {false};
    for (size_t i = 0; i < b->nchoices; i++) {
        CHECK(b->choices[i] < p->noptions);
        CHECK(!seen[b->choices[i]]);
        seen[b->choices[i]] = true;
        if (p->type != TLY_TYPE_RANKED)
            CHECK(i == 0 || b->choices[i - 1] < b->choices[i]); /* canonical order */
        if (p->type == TLY_TYPE_SCORE)
            CHECK(b->scores[i] <= p->settings.max_score);
        else
            CHECK(b->scores[i] == 0);
    }
}

/* A stored vote is written back as JSON (GET votes/me, export): that must read back as
 * the very same ballot. */
static void check_round_trip(const tly_poll_t *p, const tly_ballot_t *b)
{
    tly_vote_t *v = tly_vote_new(b, "fuzz-voter", NULL, NULL, NULL, NOW);
    CHECK(v != NULL);
    json_t *j = tly_ballot_to_json(p, v);
    CHECK(j != NULL);
    tly_ballot_t again;
    const char *f = NULL, *m = NULL;
    CHECK(tly_ballot_parse(p, j, &again, &f, &m) == TLY_BALLOT_OK);
    CHECK(memcmp(b, &again, sizeof(again)) == 0);
    json_t *ids = tly_vote_option_ids(p, v);
    CHECK(ids != NULL && json_array_size(ids) <= b->nchoices);
    json_decref(ids);
    json_decref(j);
    tly_vote_free(v);
}

static void fuzz_ballots(json_t *body)
{
    for (size_t i = 0; i < NBALLOT_POLLS; i++) {
        const tly_poll_t *p = ballot_polls[i];
        tly_ballot_t b;
        const char *f = NULL, *m = NULL;
        tly_ballot_result_t r = tly_ballot_parse(p, body, &b, &f, &m);
        if (r == TLY_BALLOT_OK) {
            check_ballot(p, &b);
            check_round_trip(p, &b);
        } else {
            CHECK(r == TLY_BALLOT_INVALID || r == TLY_BALLOT_UNKNOWN_OPTION);
            CHECK(f != NULL && m != NULL);
        }
    }
}

/* ---- 2. create ---- */

static void fuzz_create(json_t *body)
{
    const char *f = NULL, *m = NULL;
    char buf[64];
    tly_poll_t *p = tly_poll_from_json(body, "owner1", NOW, &f, &m, buf, sizeof(buf));
    if (p == NULL) {
        CHECK(f != NULL && m != NULL); /* NULL and NULL would mean out of memory */
        return;
    }
    check_poll(p);
    CHECK(p->status == TLY_STATUS_DRAFT || p->status == TLY_STATUS_ACTIVE);
    CHECK(p->end_time == 0 || p->end_time > NOW);

    /* What the server answers (201, GET) it must accept back: as a new poll (a client
     * that duplicates a poll) and as a PATCH of the same poll, and both read the same. */
    json_t *echo = tly_poll_to_json(p, NOW);
    CHECK(echo != NULL);
    tly_poll_t *copy = tly_poll_from_json(echo, "owner1", NOW, &f, &m, buf, sizeof(buf));
    if (copy == NULL) {
        fprintf(stderr, "echoed poll refused as a create body: %s: %s\n", f, m);
        abort();
    }
    CHECK(same_poll(p, copy));
    /* a PATCH with options gives them new ids, so compare what the client wrote */
    int rc = tly_poll_patch(p, echo, NOW, &f, &m, buf, sizeof(buf));
    if (rc != 0) {
        fprintf(stderr, "echoed poll refused as its own PATCH (%d): %s: %s\n", rc, f, m);
        abort();
    }
    check_poll(p);
    CHECK(same_poll(p, copy));
    tly_poll_free(copy);
    json_decref(echo);

    size_t len = 0;
    CHECK(tly_results_render(p, NOW, &len) != NULL && len > 0);
    tly_poll_free(p);
}

/* ---- 3. PATCH ---- */

static void fuzz_patch(json_t *body)
{
    for (size_t i = 0; i < NPATCH_TARGETS; i++) {
        const patch_target_t *t = &patch_targets[i];
        const char *f = NULL, *m = NULL;
        char buf[64];
        tly_registry_t *r = NULL;
        tly_poll_t *p = create_or_die(patch_bodies[i]);
        if (patch_setups[i] != NULL && tly_poll_patch(p, patch_setups[i], NOW, &f, &m, buf, sizeof(buf)) != 0)
            abort();
        if (t->with_vote) {
            r = tly_registry_new();
            CHECK(r != NULL);
            tly_registry_add_poll(r, p);
            tly_ballot_t b = {.nchoices = 2, .choices = {0, 2}};
            tly_vote_t *v = tly_vote_new(&b, "voter1", NULL, NULL, NULL, NOW);
            CHECK(v != NULL);
            tly_poll_add_vote(r, p, v);
            tly_poll_commit_vote(p, v, NOW);
        }
        bool closed = tly_poll_effective_status(p, t->patch_at) == TLY_STATUS_CLOSED;
        tly_poll_t old = *p;
        char *before = snapshot(p, t->patch_at);

        f = m = NULL;
        int rc = tly_poll_patch(p, body, t->patch_at, &f, &m, buf, sizeof(buf));
        if (rc != 0) {
            CHECK(rc == TLY_EINVAL || rc == TLY_ESTATE || rc == TLY_EEXIST);
            CHECK(f != NULL && m != NULL);
            char *after = snapshot(p, t->patch_at);
            CHECK(strcmp(before, after) == 0); /* p is unchanged unless 0 is returned */
            free(after);
        } else {
            check_poll(p);
            CHECK(p->type == old.type);
            if (closed) {
                CHECK(p->end_time == old.end_time);
                CHECK(p->options == old.options); /* not even replaced by equal ones */
                CHECK(tly_poll_effective_status(p, t->patch_at) == TLY_STATUS_CLOSED);
            }
            if (t->with_vote) {
                CHECK(p->options == old.options);
                CHECK(p->settings.min_choices == old.settings.min_choices);
                CHECK(p->settings.max_choices == old.settings.max_choices);
                CHECK(p->settings.max_score == old.settings.max_score);
            }
            size_t len = 0;
            CHECK(tly_results_render(p, t->patch_at, &len) != NULL && len > 0);
        }
        free(before);
        if (r != NULL)
            tly_registry_free(r); /* frees p and its vote */
        else
            tly_poll_free(p);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the API's own flags (src/api/app.c): any JSON value, duplicate keys refused */
    json_t *body = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, NULL);
    if (body == NULL)
        return 0;
    fuzz_ballots(body);
    fuzz_create(body);
    fuzz_patch(body);
    json_decref(body);
    return 0;
}
