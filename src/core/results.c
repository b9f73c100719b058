/*
 * results.c: percentages, the results object of API.md (with instant-runoff rounds and
 * the Condorcet winner for ranked polls, sums and means for score polls), and who may
 * see it.
 *
 * The rendered object is cached in the poll as a compact string and rebuilt only when
 * a count changed (results_dirty) or the effective status moved (an end_time passed),
 * so a burst of readers and live subscribers costs one render per change; once a poll
 * is closed its final results are rendered once and kept (final_json).
 *
 * What a render costs: O(options) for every type but ranked (score polls walk the
 * ballots only when score_sum could not be allocated). A ranked poll adds the Condorcet
 * winner, O(options^2) from pairwise counts kept as ballots are counted, changed and
 * retracted (O(ranking length^2) each time, paid once per ballot, not per render), and
 * the instant-runoff count, which must walk every committed ranking: O(total ranking
 * length + rounds * options) per render, about 10 ms for 30,000 rankings of 100
 * options on the machine of docs/PERFORMANCE.md. So that such a count need not run on
 * the loop thread, it can also run as a job (tly_results_job_t) on a snapshot of the
 * rankings (ranked.c); the API does that for big polls (src/api/results.c).
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

typedef char option_id_t[TLY_OPTION_ID_LEN + 1];

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
 * O(total ranking length + rounds * options), not O(rounds * ballots). No ballots: no
 * rounds, no winner.
 */
static int add_irv(size_t n, const option_id_t *ids, irv_ballot_t *b, size_t nb, json_t *out)
{
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
            if (json_object_set_new(counts, ids[i], json_integer((json_int_t)count[i])) != 0)
                return TLY_ENOMEM;
            if (top == NONE || count[i] > count[top])
                top = i;
            zeros += count[i] == 0;
        }
        if (count[top] * 2 > continuing || remaining == 1) {
            winner = json_string(ids[top]);
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
            if (json_array_append_new(elim, json_string(ids[i])) != 0)
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
 * pairs within each ranking need counting. Those counts are p->ranked_pairs, kept as
 * ballots come and go (O(length^2) a ballot, paid when it is counted); reading them here
 * is O(options^2), whatever the number of ballots. The winner as a JSON string, or null
 * when there is none; NULL when out of memory.
 */
static json_t *condorcet_winner(tly_poll_t *p)
{
    size_t n = p->noptions;
    if (p->total_votes == 0)
        return json_null();
    if (p->ranked_pairs == NULL && core_ranked_pairs_build(p) != 0)
        return NULL;
    const uint64_t *above = p->ranked_pairs, *listed = p->ranked_pairs + n * n;
    for (size_t a = 0; a < n; a++) {
        bool beats_all = true;
        for (size_t x = 0; x < n && beats_all; x++)
            if (x != a && listed[a] - above[x * n + a] <= listed[x] - above[a * n + x])
                beats_all = false;
        if (beats_all)
            return json_string(p->options[a].option_id);
    }
    return json_null();
}

/* The rankings of r (rows in use) as instant-runoff ballots into b (room for r->rows);
 * returns how many. */
static size_t irv_ballots(const core_rankings_t *r, irv_ballot_t *b)
{
    size_t nb = 0;
    for (size_t i = 0; i < r->rows; i++) {
        const uint8_t *row = core_rankings_row(r, i);
        if (row[0] == 0)
            continue;
        b[nb].choices = row + 1;
        b[nb].n = row[0];
        b[nb].pos = 0;
        nb++;
    }
    return nb;
}

/* Adds "rounds" and "winner" (the count of r) and then "condorcet_winner" (stolen) to
 * out. */
static int add_ranked_members(const core_rankings_t *r, size_t n, const option_id_t *ids, json_t *condorcet,
                              json_t *out)
{
    int rc = TLY_ENOMEM;
    irv_ballot_t *b = tly_malloc((r->rows ? r->rows : 1) * sizeof(*b));
    if (b != NULL && condorcet != NULL)
        rc = add_irv(n, ids, b, irv_ballots(r, b), out);
    tly_free(b);
    if (rc == 0 && json_object_set_new(out, "condorcet_winner", condorcet) != 0)
        rc = TLY_ENOMEM;
    else if (rc != 0)
        json_decref(condorcet);
    return rc;
}

/* The ranked members of p's results, counted here and now (the loop's own render). */
static int add_ranked(tly_poll_t *p, json_t *out)
{
    if (p->ranked == NULL && core_ranked_build(p) != 0)
        return TLY_ENOMEM;
    option_id_t ids[TLY_MAX_OPTIONS];
    for (size_t i = 0; i < p->noptions && i < TLY_MAX_OPTIONS; i++)
        memcpy(ids[i], p->options[i].option_id, sizeof(ids[i]));
    return add_ranked_members(core_ranked_rankings(p), p->noptions, ids, condorcet_winner(p), out);
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

/* The results object without the ranked members, O(options). */
static json_t *build_base(const tly_poll_t *p, tly_poll_status_t status)
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
    return o;
fail:
    json_decref(o);
    return NULL;
}

static json_t *build_results(tly_poll_t *p, tly_poll_status_t status)
{
    json_t *o = build_base(p, status);
    if (o != NULL && p->type == TLY_TYPE_RANKED && add_ranked(p, o) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
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

/* Writes votes_last_minute at now after the cached rendering's prefix, when it moved. */
static void write_vlm(tly_poll_t *p, int64_t now, size_t *len)
{
    uint64_t vlm = tly_poll_votes_last_minute(p, now);
    if (vlm != p->results_vlm) {
        int n = snprintf(p->results_json + p->results_prefix_len, SUFFIX_ROOM, VLM_MEMBER "%" PRIu64 "}", vlm);
        p->results_len = p->results_prefix_len + (size_t)n;
        p->results_vlm = vlm;
    }
    if (len != NULL)
        *len = p->results_len;
}

/* Whether tly_results_render at now serves (or freezes, once) the final results. */
static bool renders_final(const tly_poll_t *p, tly_poll_status_t status)
{
    return status == TLY_STATUS_CLOSED && (p->final_json != NULL || (p->pending_votes == 0 && !p->final_by_store));
}

/* Whether the cached rendering is what tly_results_render would serve at status. */
static bool cache_fresh(const tly_poll_t *p, tly_poll_status_t status, bool final)
{
    return p->results_json != NULL && p->results_final == final &&
           (final || (!p->results_dirty && p->results_status == (int)status));
}

const char *tly_results_render(tly_poll_t *p, int64_t now, size_t *len)
{
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    if (status == TLY_STATUS_CLOSED && p->final_json == NULL && p->pending_votes == 0 && !p->final_by_store &&
        tly_poll_freeze_results(p, now) == TLY_ENOMEM)
        return NULL;
    bool final = status == TLY_STATUS_CLOSED && p->final_json != NULL;
    if (!cache_fresh(p, status, final)) {
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
        p->results_rgen = p->results_gen;
        p->results_seq = p->seq;
    }
    write_vlm(p, now, len);
    return p->results_json;
}

/* ---- counting off the loop ---- */

size_t tly_results_render_cost(const tly_poll_t *p, int64_t now)
{
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    if (p->type != TLY_TYPE_RANKED || renders_final(p, status) || cache_fresh(p, status, false))
        return 0;
    const core_rankings_t *r = core_ranked_rankings(p);
    return r != NULL ? r->rows + r->cells : (size_t)p->total_votes * p->noptions;
}

struct tly_results_job {
    json_t *base;             /* the results object up to its options, made from p */
    json_t *condorcet;        /* the Condorcet winner (string or null), from p's pairs */
    core_rankings_t rankings; /* a snapshot of p's rankings */
    size_t noptions;
    option_id_t ids[TLY_MAX_OPTIONS];
    uint64_t seq, gen;
    int status;
    char *text; /* the rendering, with SUFFIX_ROOM spare bytes, once run */
    size_t len;
    bool ran;
};

tly_results_job_t *tly_results_job_new(tly_poll_t *p, int64_t now)
{
    tly_results_job_t *j = tly_calloc(1, sizeof(*j));
    if (j == NULL)
        return NULL;
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    j->status = (int)status;
    j->seq = p->seq;
    j->gen = p->results_gen;
    j->noptions = p->noptions < TLY_MAX_OPTIONS ? p->noptions : TLY_MAX_OPTIONS;
    for (size_t i = 0; i < j->noptions; i++)
        memcpy(j->ids[i], p->options[i].option_id, sizeof(j->ids[i]));
    if ((j->base = build_base(p, status)) == NULL)
        goto fail;
    if (p->type == TLY_TYPE_RANKED) {
        if ((j->condorcet = condorcet_winner(p)) == NULL)
            goto fail;
        if (p->ranked == NULL && core_ranked_build(p) != 0)
            goto fail;
        if (core_rankings_snapshot(p, &j->rankings) != 0)
            goto fail;
    }
    return j;
fail:
    tly_results_job_free(j);
    return NULL;
}

int tly_results_job_run(tly_results_job_t *j)
{
    if (j->ran) /* base is spent either way */
        return j->text != NULL ? 0 : TLY_ENOMEM;
    j->ran = true;
    if (j->condorcet != NULL) {
        json_t *condorcet = j->condorcet;
        j->condorcet = NULL; /* stolen, whatever the outcome */
        if (add_ranked_members(&j->rankings, j->noptions, j->ids, condorcet, j->base) != 0)
            return TLY_ENOMEM;
    }
    core_rankings_release(&j->rankings); /* read: p may write those chunks again */
    j->text = dump_with_room(j->base, &j->len);
    return j->text != NULL ? 0 : TLY_ENOMEM;
}

uint64_t tly_results_job_seq(const tly_results_job_t *j) { return j->seq; }

bool tly_results_job_install(tly_poll_t *p, tly_results_job_t *j)
{
    if (j->text == NULL || p->results_final)
        return false;
    /* the newer rendering stays: by the changes it shows, then by status (which only
     * moves forward while the counts stand still: a draft opens, an end_time passes) */
    if (p->results_json != NULL &&
        (j->gen < p->results_rgen || (j->gen == p->results_rgen && j->status <= p->results_status)))
        return false;
    tly_free(p->results_json);
    p->results_json = j->text;
    j->text = NULL;
    p->results_prefix_len = j->len - 1;
    p->results_vlm = UINT64_MAX;
    p->results_final = false;
    p->results_status = j->status;
    p->results_rgen = j->gen;
    p->results_seq = j->seq;
    p->results_dirty = p->results_gen != j->gen;
    return true;
}

void tly_results_job_free(tly_results_job_t *j)
{
    if (j == NULL)
        return;
    json_decref(j->base);
    json_decref(j->condorcet);
    core_rankings_release(&j->rankings);
    tly_free(j->text);
    tly_free(j);
}

const char *tly_results_cached(tly_poll_t *p, int64_t now, uint64_t min_seq, uint64_t *seq, size_t *len)
{
    if (p->results_json == NULL || p->results_final || p->results_seq < min_seq ||
        p->results_status != (int)tly_poll_effective_status(p, now))
        return NULL;
    if (seq != NULL)
        *seq = p->results_seq;
    write_vlm(p, now, len);
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
