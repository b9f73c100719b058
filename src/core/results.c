/*
 * results.c: percentages, the results object of API.md (with instant-runoff rounds and
 * the Condorcet winner for ranked polls, sums and means for score polls), and who may
 * see it.
 *
 * The rendered object is cached in the poll as a compact string and rebuilt only when
 * a count changed (results_dirty) or the effective status moved (an end_time passed),
 * so a burst of readers and live subscribers costs one render per change; once a poll
 * is closed its final results are rendered once and kept (final_json). Ranked polls
 * walk every committed ballot when they render (O(ballots * ranking length)); score
 * polls do so only when score_sum could not be allocated.
 */
#include "core/core_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* ---- percentages ---- */

void tly_percentages(const uint64_t *votes, size_t n, uint64_t total, bool largest_remainder, int *pct_tenths)
{
    if (total == 0) {
        for (size_t i = 0; i < n; i++)
            pct_tenths[i] = 0;
        return;
    }
    if (!largest_remainder) {
        /* round half up: floor(1000 * v / total + 1/2) */
        for (size_t i = 0; i < n; i++)
            pct_tenths[i] = (int)((votes[i] * 2000 + total) / (2 * total));
        return;
    }
    /*
     * Largest remainder (Hamilton): every option gets the floor of its share of 1000
     * tenths, then the tenths left over go one each to the largest remainders, ties to
     * the lower index. An option with no remainder never gets one, so inconsistent
     * input (counts not summing to total) cannot invent percentages.
     */
    uint64_t given = 0;
    for (size_t i = 0; i < n; i++) {
        pct_tenths[i] = (int)(votes[i] * 1000 / total);
        given += (uint64_t)pct_tenths[i];
    }
    uint64_t left = given < 1000 ? 1000 - given : 0;
    bool got[TLY_MAX_OPTIONS] = {false};
    while (left > 0) {
        size_t best = n;
        uint64_t best_rem = 0;
        for (size_t i = 0; i < n && i < TLY_MAX_OPTIONS; i++) {
            uint64_t rem = votes[i] * 1000 % total;
            if (!got[i] && rem > best_rem) {
                best = i;
                best_rem = rem;
            }
        }
        if (best == n)
            break;
        got[best] = true;
        pct_tenths[best]++;
        left--;
    }
}

/* ---- ranked: instant-runoff and Condorcet ---- */

#define NONE SIZE_MAX

typedef struct {
    const uint8_t *choices;
    uint8_t n, pos;
    size_t next; /* next ballot currently counted for the same option */
} irv_ballot_t;

/*
 * Instant-runoff as API.md describes it. Each round counts every continuing ballot for
 * its highest-ranked continuing option; a ballot whose options are all eliminated is
 * exhausted and leaves the count. The round in which one option holds a strict majority
 * of the continuing ballots is the last, and that option wins. Otherwise the round
 * eliminates:
 *   - every continuing option with no votes at all, when there are any (eliminating
 *     them one at a time would give the same result, only with more rounds), or else
 *   - the one option with the fewest votes; among those tied, the one with the fewest
 *     first preferences (round 1); among those still tied, the one listed last in
 *     display order.
 * Eliminated ballots move to their next continuing choice, so the whole count costs
 * O(total ranking length), not O(rounds * ballots). No ballots: no rounds, no winner.
 */
static int add_irv(const tly_poll_t *p, irv_ballot_t *b, size_t nb, json_t *out)
{
    size_t n = p->noptions;
    size_t head[TLY_MAX_OPTIONS];
    uint64_t count[TLY_MAX_OPTIONS] = {0}, first[TLY_MAX_OPTIONS];
    bool out_of_race[TLY_MAX_OPTIONS] = {false};
    for (size_t i = 0; i < n; i++)
        head[i] = NONE;
    uint64_t continuing = 0;
    for (size_t i = 0; i < nb; i++) {
        uint8_t top = b[i].choices[0];
        b[i].next = head[top];
        head[top] = i;
        count[top]++;
        continuing++;
    }
    memcpy(first, count, sizeof(first));
    json_t *rounds = json_array();
    if (rounds == NULL || json_object_set_new(out, "rounds", rounds) != 0)
        return TLY_ENOMEM;
    json_t *winner = json_null();
    size_t remaining = n;
    while (nb > 0 && continuing > 0) {
        json_t *counts = json_object(), *elim = json_array();
        json_t *round = json_pack("{s:o, s:o}", "counts", counts, "eliminated", elim);
        if (round == NULL || json_array_append_new(rounds, round) != 0)
            return TLY_ENOMEM;
        size_t top = NONE, zeros = 0;
        for (size_t i = 0; i < n; i++) {
            if (out_of_race[i])
                continue;
            if (json_object_set_new(counts, p->options[i].option_id, json_integer((json_int_t)count[i])) != 0)
                return TLY_ENOMEM;
            if (top == NONE || count[i] > count[top])
                top = i;
            zeros += count[i] == 0;
        }
        if (count[top] * 2 > continuing || remaining == 1) {
            winner = json_string(p->options[top].option_id);
            break;
        }
        bool drop[TLY_MAX_OPTIONS] = {false};
        if (zeros > 0) {
            for (size_t i = 0; i < n; i++)
                drop[i] = !out_of_race[i] && count[i] == 0;
        } else {
            size_t loser = NONE;
            for (size_t i = 0; i < n; i++) {
                if (out_of_race[i])
                    continue;
                if (loser == NONE || count[i] < count[loser] || (count[i] == count[loser] && first[i] <= first[loser]))
                    loser = i; /* `<=` on first: the later option loses a full tie */
            }
            drop[loser] = true;
        }
        for (size_t i = 0; i < n; i++) {
            if (!drop[i])
                continue;
            if (json_array_append_new(elim, json_string(p->options[i].option_id)) != 0)
                return TLY_ENOMEM;
            out_of_race[i] = true;
            remaining--;
        }
        for (size_t i = 0; i < n; i++) {
            if (!drop[i])
                continue;
            size_t k = head[i];
            head[i] = NONE;
            count[i] = 0;
            while (k != NONE) {
                size_t next = b[k].next;
                while (b[k].pos < b[k].n && out_of_race[b[k].choices[b[k].pos]])
                    b[k].pos++;
                if (b[k].pos == b[k].n) {
                    continuing--; /* exhausted */
                } else {
                    uint8_t to = b[k].choices[b[k].pos];
                    b[k].next = head[to];
                    head[to] = k;
                    count[to]++;
                }
                k = next;
            }
        }
    }
    return json_object_set_new(out, "winner", winner) == 0 ? 0 : TLY_ENOMEM;
}

/*
 * The Condorcet winner: the option that more ballots rank above X than X above it, for
 * every other option X. A ballot ranks each listed option above every unlisted one and
 * says nothing between two unlisted ones. With above[a][b] the ballots listing both and
 * a first, and listed[a] the ballots listing a, the ballots preferring a to b are
 * listed[a] - above[b][a] (those listing a, less those listing b before it), so only the
 * pairs within each ranking need counting.
 */
static int add_condorcet(const tly_poll_t *p, const irv_ballot_t *b, size_t nb, json_t *out)
{
    size_t n = p->noptions;
    uint64_t *above = tly_calloc(n * n, sizeof(uint64_t));
    uint64_t listed[TLY_MAX_OPTIONS] = {0};
    if (above == NULL)
        return TLY_ENOMEM;
    for (size_t k = 0; k < nb; k++) {
        for (size_t i = 0; i < b[k].n; i++) {
            listed[b[k].choices[i]]++;
            for (size_t j = i + 1; j < b[k].n; j++)
                above[b[k].choices[i] * n + b[k].choices[j]]++;
        }
    }
    json_t *winner = json_null();
    for (size_t a = 0; a < n && nb > 0; a++) {
        bool beats_all = true;
        for (size_t x = 0; x < n && beats_all; x++)
            if (x != a && listed[a] - above[x * n + a] <= listed[x] - above[a * n + x])
                beats_all = false;
        if (beats_all) {
            winner = json_string(p->options[a].option_id);
            break;
        }
    }
    tly_free(above);
    return json_object_set_new(out, "condorcet_winner", winner) == 0 ? 0 : TLY_ENOMEM;
}

static int add_ranked(const tly_poll_t *p, json_t *out)
{
    size_t nb = 0;
    irv_ballot_t *b = tly_malloc((p->total_votes ? p->total_votes : 1) * sizeof(*b));
    if (b == NULL)
        return TLY_ENOMEM;
    for (const tly_vote_t *v = p->votes; v != NULL && nb < p->total_votes; v = v->hh.next) {
        if (v->state != TLY_VOTE_COMMITTED || v->nchoices == 0)
            continue;
        const uint8_t *c = core_vote_choices(v);
        bool ok = true;
        for (size_t i = 0; i < v->nchoices; i++)
            ok = ok && c[i] < p->noptions;
        if (!ok)
            continue;
        b[nb].choices = c;
        b[nb].n = v->nchoices;
        b[nb].pos = 0;
        nb++;
    }
    int rc = add_irv(p, b, nb, out);
    if (rc == 0)
        rc = add_condorcet(p, b, nb, out);
    tly_free(b);
    return rc;
}

/* ---- rendering ---- */

/* Score sums and counts of ballots that scored each option, from score_sum when the
 * poll keeps it, otherwise from the ballots. */
static void score_tally(const tly_poll_t *p, uint64_t *sum, uint64_t *rated)
{
    size_t n = p->noptions;
    if (p->score_sum != NULL) {
        memcpy(sum, p->score_sum, n * sizeof(uint64_t));
        memcpy(rated, p->score_sum + n, n * sizeof(uint64_t));
        return;
    }
    memset(sum, 0, n * sizeof(uint64_t));
    memset(rated, 0, n * sizeof(uint64_t));
    for (const tly_vote_t *v = p->votes; v != NULL; v = v->hh.next) {
        if (v->state != TLY_VOTE_COMMITTED)
            continue;
        const uint8_t *c = core_vote_choices(v), *s = core_vote_scores(v);
        for (size_t i = 0; i < v->nchoices; i++)
            if (c[i] < n) {
                sum[c[i]] += s[i];
                rated[c[i]]++;
            }
    }
}

static json_t *build_results(const tly_poll_t *p, tly_poll_status_t status)
{
    size_t n = p->noptions < TLY_MAX_OPTIONS ? p->noptions : TLY_MAX_OPTIONS;
    uint64_t votes[TLY_MAX_OPTIONS], sum[TLY_MAX_OPTIONS] = {0}, rated[TLY_MAX_OPTIONS] = {0};
    int pct[TLY_MAX_OPTIONS];
    for (size_t i = 0; i < n; i++)
        votes[i] = p->options[i].votes;
    tly_percentages(votes, n, p->total_votes, p->type == TLY_TYPE_SINGLE, pct);
    if (p->type == TLY_TYPE_SCORE)
        score_tally(p, sum, rated);

    char as_of[TLY_TIME_LEN];
    tly_time_format(p->as_of != 0 ? p->as_of : p->created_at, as_of);
    json_t *opts = json_array();
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:o}", "poll_id", p->poll_id, "status", tly_poll_status_name(status),
                          "total_votes", (json_int_t)p->total_votes, "as_of", as_of, "options", opts);
    if (o == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *opt = json_pack("{s:s, s:s, s:I, s:f}", "option_id", p->options[i].option_id, "label",
                                p->options[i].text ? p->options[i].text : "", "votes", (json_int_t)votes[i],
                                "percentage", pct[i] / 10.0);
        if (opt != NULL && p->type == TLY_TYPE_SCORE) {
            /* mean over the ballots that scored the option, two decimals, half up */
            uint64_t hundredths = rated[i] ? (sum[i] * 200 + rated[i]) / (2 * rated[i]) : 0;
            if (json_object_set_new(opt, "score_sum", json_integer((json_int_t)sum[i])) != 0 ||
                json_object_set_new(opt, "score_mean", json_real((double)hundredths / 100.0)) != 0) {
                json_decref(opt);
                opt = NULL;
            }
        }
        if (json_array_append_new(opts, opt) != 0)
            goto fail;
    }
    if (p->type == TLY_TYPE_RANKED && add_ranked(p, o) != 0)
        goto fail;
    return o;
fail:
    json_decref(o);
    return NULL;
}

/*
 * Numbers are printed with 5 significant digits: every real here is a percentage with
 * one decimal or a mean with two, at most 100, so the text is exactly the rounded value
 * (33.3, not 33.299999999999997).
 */
#define RESULTS_DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(5))

/*
 * The served string is the results object with `,"votes_last_minute":N}` in place of
 * its closing brace. The buffer keeps SUFFIX_ROOM bytes after the object's prefix, so a
 * new N (the minute slid) rewrites only the suffix: reads stay O(1) without rendering
 * the object again, and the pointer handed out stays the same.
 */
#define VLM_MEMBER ",\"votes_last_minute\":"
#define SUFFIX_ROOM (sizeof(VLM_MEMBER) - 1 + 20 + sizeof("}")) /* 20: the digits of UINT64_MAX */

/* o as compact text in a new buffer with SUFFIX_ROOM spare bytes; NULL on OOM. */
static char *dump_with_room(json_t *o, size_t *len)
{
    size_t size = json_dumpb(o, NULL, 0, RESULTS_DUMP_FLAGS);
    char *buf = size > 1 ? tly_malloc(size + SUFFIX_ROOM) : NULL;
    if (buf == NULL || json_dumpb(o, buf, size, RESULTS_DUMP_FLAGS) != size) {
        tly_free(buf);
        return NULL;
    }
    buf[size] = '\0';
    *len = size;
    return buf;
}

const char *tly_results_render(tly_poll_t *p, int64_t now, size_t *len)
{
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    if (status == TLY_STATUS_CLOSED && p->final_json == NULL && p->pending_votes == 0 && !p->final_by_store &&
        tly_poll_freeze_results(p, now) == TLY_ENOMEM)
        return NULL;
    bool final = status == TLY_STATUS_CLOSED && p->final_json != NULL;
    bool fresh = p->results_json != NULL && p->results_final == final &&
                 (final || (!p->results_dirty && p->results_status == (int)status));
    if (!fresh) {
        char *buf;
        size_t size;
        if (final) {
            size = strlen(p->final_json);
            if ((buf = tly_malloc(size + SUFFIX_ROOM)) == NULL)
                return NULL;
            memcpy(buf, p->final_json, size + 1);
        } else {
            json_t *o = build_results(p, status);
            buf = o != NULL ? dump_with_room(o, &size) : NULL;
            json_decref(o);
            if (buf == NULL)
                return NULL;
            p->results_dirty = false;
        }
        tly_free(p->results_json);
        p->results_json = buf;
        p->results_prefix_len = size - 1; /* without the closing brace */
        p->results_vlm = UINT64_MAX;      /* no suffix written yet */
        p->results_final = final;
        p->results_status = (int)status;
    }
    uint64_t vlm = tly_poll_votes_last_minute(p, now);
    if (vlm != p->results_vlm) {
        int n = snprintf(p->results_json + p->results_prefix_len, SUFFIX_ROOM, VLM_MEMBER "%" PRIu64 "}", vlm);
        p->results_len = p->results_prefix_len + (size_t)n;
        p->results_vlm = vlm;
    }
    if (len != NULL)
        *len = p->results_len;
    return p->results_json;
}

/* ---- final results ---- */

int tly_poll_render_final(tly_poll_t *p, int64_t now, char **out)
{
    if (tly_poll_effective_status(p, now) != TLY_STATUS_CLOSED || p->pending_votes > 0)
        return TLY_ESTATE;
    json_t *o = build_results(p, TLY_STATUS_CLOSED);
    if (o == NULL || json_object_set_new(o, "final", json_true()) != 0) {
        json_decref(o);
        return TLY_ENOMEM;
    }
    size_t size;
    *out = dump_with_room(o, &size);
    json_decref(o);
    return *out != NULL ? 0 : TLY_ENOMEM;
}

int tly_poll_freeze_results(tly_poll_t *p, int64_t now)
{
    if (p->final_json != NULL)
        return 0;
    return tly_poll_render_final(p, now, &p->final_json);
}

const char *tly_poll_final_results(tly_poll_t *p) { return p->final_json; }

static bool json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int tly_poll_set_final_results(tly_poll_t *p, const char *json)
{
    if (json == NULL)
        return TLY_EINVAL;
    json_error_t err;
    json_t *o = json_loads(json, 0, &err);
    if (o == NULL)
        return json_error_code(&err) == json_error_out_of_memory ? TLY_ENOMEM : TLY_EINVAL;
    bool is_object = json_is_object(o);
    json_decref(o);
    if (!is_object)
        return TLY_EINVAL;
    /* trimmed, it is "{...}": the closing brace is the last byte, as the splice needs */
    size_t start = 0, end = strlen(json);
    while (json_space(json[start]))
        start++;
    while (end > start && json_space(json[end - 1]))
        end--;
    char *copy = tly_strndup(json + start, end - start);
    if (copy == NULL)
        return TLY_ENOMEM;
    tly_free(p->final_json);
    p->final_json = copy;
    if (p->results_final) {
        tly_free(p->results_json); /* served from the old final text: copy again */
        p->results_json = NULL;
    }
    return 0;
}

/* ---- visibility ---- */

bool tly_results_visible(const tly_poll_t *p, const char *caller_id, bool has_voted, int64_t now)
{
    if (caller_id != NULL && p->owner_id != NULL && strcmp(caller_id, p->owner_id) == 0)
        return true;
    bool closed = tly_poll_effective_status(p, now) == TLY_STATUS_CLOSED;
    /* hiding results during voting overrides every mode until the poll closes */
    if (!p->settings.show_results_during_voting && !closed)
        return false;
    switch (p->settings.results_visibility) {
    case TLY_VIS_ALWAYS:
        return true;
    case TLY_VIS_AFTER_VOTE:
        return has_voted || closed;
    case TLY_VIS_AFTER_CLOSE:
        return closed;
    case TLY_VIS_OWNER_ONLY:
    default:
        return false;
    }
}
