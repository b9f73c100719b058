/*
 * audit.c: the owner-only views of a poll's ballots: the append-only audit log
 * (GET /v1/polls/{id}/audit) and the export (GET /v1/polls/{id}/export?format=csv|json).
 *
 * Both read the store, not memory: the audit log lives only there, and an export must
 * not hold a million ballots in memory. The export streams page by page: a page is read
 * only when the previous one has been written to the socket, so memory stays constant
 * however large the poll and however slow the client. Pages are read on the loop thread
 * (500 ballots take about half a millisecond), which keeps the code simple; the loop's
 * reader is a WAL reader, so it never waits for or delays the writer.
 *
 * Voters appear under a per-poll pseudonym (api_pseudonym), never their real id.
 */
#include <openssl/hmac.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"
#include "obs/obs.h"

#define EXPORT_PAGE 500

tly_store_reader_t *api_reader(tly_app_t *app)
{
    if (app->reader == NULL)
        app->reader = tly_store_reader_open(app->store);
    return app->reader;
}

void api_pseudonym(tly_app_t *app, const char *poll_id, const char *voter_id, char out[24])
{
    unsigned char mac[32];
    unsigned int len = sizeof(mac);
    char msg[TLY_POLL_ID_LEN + TLY_VOTER_ID_MAX + 16];
    /* The person's: rows written under a device before it was linked to an account (its
     * changes, a retraction) read as the account's, like its ballot, rewritten by the
     * link. Before the link they read as the device's, a pseudonym nobody can tie to the
     * account's without the secret. */
    int n = snprintf(msg, sizeof(msg), "voter\n%s\n%s", poll_id, api_person(app, voter_id));
    HMAC(EVP_sha256(), app->secret, (int)app->secret_len, (const unsigned char *)msg, (size_t)n, mac, &len);
    memcpy(out, "p_", 2);
    tly_b64url_encode(mac, 12, out + 2);
}

static bool owner_only(tly_app_t *app, tly_req_t *req, const tly_params_t *params, tly_poll_t **pp)
{
    caller_t caller;
    if (!api_caller(app, req, true, &caller))
        return false;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return false;
    if (!api_is_owner(p, &caller)) {
        api_respond_error(req, 403, "FORBIDDEN", "only the poll's owner may do that", NULL);
        return false;
    }
    *pp = p;
    return true;
}

/* The ballot of a stored row as JSON in the form it was cast. */
static json_t *row_ballot(const tly_poll_t *p, uint8_t n, const uint8_t *choices, const uint8_t *scores, int64_t at)
{
    if (choices == NULL)
        return json_null();
    tly_ballot_t b;
    b.nchoices = 0;
    for (uint8_t i = 0; i < n; i++) {
        if (choices[i] >= p->noptions)
            continue; /* cannot happen: options are frozen once a ballot exists */
        b.choices[b.nchoices] = choices[i];
        b.scores[b.nchoices++] = scores ? scores[i] : 0;
    }
    tly_vote_t *v = tly_vote_new(&b, "-", NULL, "v_-", "-", at);
    if (v == NULL)
        return NULL;
    json_t *j = tly_ballot_to_json(p, v);
    tly_vote_free(v);
    return j;
}

/* ---- audit log ---- */

typedef struct {
    tly_app_t *app;
    const tly_poll_t *poll;
    json_t *items;
    int64_t last_seq;
    int failed;
} audit_page_t;

static void audit_row(void *ctx, const tly_audit_row_t *row)
{
    audit_page_t *a = ctx;
    char pseudo[24], at[TLY_TIME_LEN];
    api_pseudonym(a->app, row->poll_id, row->voter_id, pseudo);
    tly_time_format(row->at, at);
    json_t *ballot = row_ballot(a->poll, row->nchoices, row->choices, row->scores, row->at);
    json_t *item = ballot ? json_pack("{s:I, s:s, s:s, s:o, s:s}", "seq", (json_int_t)row->seq, "event", row->event,
                                      "voter", pseudo, "ballot", ballot, "at", at)
                          : NULL;
    if (item == NULL || json_array_append_new(a->items, item) != 0)
        a->failed = 1;
    a->last_seq = row->seq;
}

static bool read_limit_cursor(tly_req_t *req, long *limit, int64_t *after)
{
    tly_str_t v;
    *limit = 20;
    *after = 0;
    if (tly_req_query_param(req, "limit", &v)) {
        char *end;
        *limit = strtol(v.ptr, &end, 10);
        if (v.len == 0 || *end != '\0' || *limit < 1 || *limit > 100) {
            api_respond_validation(req, "limit", "limit must be a whole number from 1 to 100");
            return false;
        }
    }
    if (tly_req_query_param(req, "cursor", &v) && v.len > 0) {
        char *end;
        long long c = strtoll(v.ptr, &end, 10);
        if (*end != '\0' || c < 0) {
            api_respond_validation(req, "cursor", "the cursor is not valid");
            return false;
        }
        *after = c;
    }
    return true;
}

void api_polls_audit(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_poll_t *p;
    long limit;
    int64_t after;
    if (!owner_only(app, req, params, &p) || !read_limit_cursor(req, &limit, &after))
        return;
    tly_store_reader_t *r = api_reader(app);
    audit_page_t a = {.app = app, .poll = p, .items = json_array()};
    /* one row more than asked tells whether a next page exists */
    int n = r && a.items ? tly_store_audit_page(r, p->poll_id, after, (size_t)limit + 1, audit_row, &a) : TLY_EIO;
    if (n < 0 || a.failed) {
        json_decref(a.items);
        api_respond_store_error(req, n < 0 ? n : TLY_EIO);
        return;
    }
    json_t *next = json_null();
    if ((size_t)n > (size_t)limit) {
        json_array_remove(a.items, (size_t)limit);
        json_t *last = json_array_get(a.items, (size_t)limit - 1);
        char cur[24];
        snprintf(cur, sizeof(cur), "%lld", (long long)json_integer_value(json_object_get(last, "seq")));
        next = json_string(cur);
    }
    api_respond_json(req, 200, json_pack("{s:o, s:o}", "items", a.items, "next_cursor", next));
}

/* ---- export ---- */

typedef struct {
    tly_app_t *app;
    tly_req_t *req;
    char poll_id[TLY_POLL_ID_LEN + 1];
    bool csv;
    bool first_ballot;
    int64_t after;
    char *line; /* one row being built */
    size_t cap;
    int failed;
    size_t rows;
} export_t;

static void export_free(export_t *e)
{
    tly_free(e->line);
    tly_free(e);
}

/* Appends a CSV cell, quoted when needed and defused against formula injection: a cell
 * a spreadsheet would evaluate (=, +, -, @, tab, CR first) gets a leading apostrophe. */
static void csv_cell(json_t *arr, const char *s) { json_array_append_new(arr, json_string(s)); }

static char *csv_line(json_t *cells)
{
    size_t need = 3; /* "\r\n" and the NUL */
    size_t i;
    json_t *c;
    if (cells == NULL) /* json_array() failed: an empty array would overflow `need` below */
        return NULL;
    json_array_foreach(cells, i, c) need += 2 * json_string_length(c) + 4;
    char *out = tly_malloc(need), *o = out;
    if (out == NULL)
        return NULL;
    json_array_foreach(cells, i, c)
    {
        const char *s = json_string_value(c);
        if (i > 0)
            *o++ = ',';
        bool danger = s[0] == '=' || s[0] == '+' || s[0] == '-' || s[0] == '@' || s[0] == '\t' || s[0] == '\r';
        bool quote = danger || strpbrk(s, ",\"\n\r") != NULL;
        if (quote)
            *o++ = '"';
        if (danger)
            *o++ = '\'';
        for (const char *q = s; *q; q++) {
            if (*q == '"')
                *o++ = '"';
            *o++ = *q;
        }
        if (quote)
            *o++ = '"';
    }
    *o++ = '\r';
    *o++ = '\n';
    *o = '\0';
    return out;
}

static void export_write(export_t *e, const char *s)
{
    if (tly_req_stream_write(e->req, s, strlen(s)) != 0)
        e->failed = 1;
}

static void export_ballot(void *ctx, const tly_ballot_row_t *row, int64_t seq)
{
    export_t *e = ctx;
    tly_poll_t *p = tly_registry_find_poll(e->app->registry, e->poll_id);
    e->after = seq;
    if (p == NULL)
        return;
    char pseudo[24], at[TLY_TIME_LEN];
    api_pseudonym(e->app, row->poll_id, row->voter_id, pseudo);
    tly_time_format(row->recorded_at, at);
    if (e->csv) {
        /* one column per option: 1 when chosen, the rank for ranked, the score for score */
        char vals[TLY_MAX_OPTIONS][8];
        memset(vals, 0, sizeof(vals));
        for (uint8_t i = 0; i < row->nchoices; i++) {
            uint8_t o = row->choices[i];
            if (o >= p->noptions)
                continue;
            if (p->type == TLY_TYPE_RANKED)
                snprintf(vals[o], sizeof(vals[o]), "%u", (unsigned)i + 1);
            else if (p->type == TLY_TYPE_SCORE)
                snprintf(vals[o], sizeof(vals[o]), "%u", row->scores ? (unsigned)row->scores[i] : 0u);
            else
                snprintf(vals[o], sizeof(vals[o]), "1");
        }
        json_t *cells = json_array();
        csv_cell(cells, pseudo);
        csv_cell(cells, at);
        for (size_t o = 0; o < p->noptions; o++)
            csv_cell(cells, vals[o]);
        char *line = json_array_size(cells) == 2 + p->noptions ? csv_line(cells) : NULL; /* no cell lost */
        json_decref(cells);
        if (line == NULL) {
            e->failed = 1;
            return;
        }
        export_write(e, line);
        tly_free(line);
    } else {
        json_t *b = row_ballot(p, row->nchoices, row->choices, row->scores, row->recorded_at);
        json_t *o = b ? json_pack("{s:s, s:o, s:s}", "voter", pseudo, "ballot", b, "recorded_at", at) : NULL;
        char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (s == NULL) {
            e->failed = 1;
            return;
        }
        if (!e->first_ballot)
            export_write(e, ",");
        e->first_ballot = false;
        export_write(e, s);
        free(s);
    }
    e->rows++;
}

static void export_on_close(tly_req_t *req, void *arg) { export_free(arg); }

static void export_on_drain(tly_req_t *req, void *arg)
{
    export_t *e = arg;
    tly_store_reader_t *r = api_reader(e->app);
    int n = r ? tly_store_ballots_page(r, e->poll_id, e->after, EXPORT_PAGE, export_ballot, e) : TLY_EIO;
    if (n < 0 || e->failed) {
        /* the status line is long gone: end the stream short so the client sees it broke */
        tly_log(TLY_LOG_ERROR, "export failed", "poll_id", e->poll_id, NULL);
        tly_req_stream_abort(req);
        return;
    }
    if (n == 0) {
        if (!e->csv)
            export_write(e, "]}\n");
        tly_req_stream_end(req);
    }
}

void api_polls_export(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_poll_t *p;
    if (!owner_only(app, req, params, &p))
        return;
    tly_str_t fmt;
    bool csv = true;
    if (tly_req_query_param(req, "format", &fmt)) {
        if (tly_str_eq(fmt, "json"))
            csv = false;
        else if (!tly_str_eq(fmt, "csv")) {
            api_respond_validation(req, "format", "format must be csv or json");
            return;
        }
    }
    int64_t now = tly_now_ms();
    api_poll_settle(app, p, now);
    export_t *e = tly_calloc(1, sizeof(*e));
    char *head = NULL;
    if (e == NULL)
        goto oom;
    e->app = app;
    e->req = req;
    e->csv = csv;
    e->first_ballot = true;
    memcpy(e->poll_id, p->poll_id, sizeof(e->poll_id));
    if (csv) {
        json_t *cells = json_array();
        csv_cell(cells, "voter");
        csv_cell(cells, "recorded_at");
        for (size_t o = 0; o < p->noptions; o++)
            csv_cell(cells, p->options[o].text);
        head = json_array_size(cells) == 2 + p->noptions ? csv_line(cells) : NULL;
        json_decref(cells);
    } else {
        /* {"poll":..., "results":..., "timeline":..., "ballots":[ streamed ]} */
        const char *results = tly_results_render(p, now, NULL);
        json_t *poll = tly_poll_to_json(p, now);
        json_t *timeline = tly_timeline_json(p, TLY_TIMELINE_1M, 0, INT64_MAX);
        char *ps = poll ? json_dumps(poll, JSON_COMPACT) : NULL;
        char *ts = timeline ? json_dumps(timeline, JSON_COMPACT) : NULL;
        json_decref(poll);
        json_decref(timeline);
        if (results && ps && ts) {
            size_t n = strlen(results) + strlen(ps) + strlen(ts) + 64;
            if ((head = tly_malloc(n)) != NULL)
                snprintf(head, n, "{\"poll\":%s,\"results\":%s,\"timeline\":%s,\"ballots\":[", ps, results, ts);
        }
        free(ps);
        free(ts);
    }
    if (head == NULL)
        goto oom;
    char disp[96];
    snprintf(disp, sizeof(disp), "attachment; filename=\"poll-%s.%s\"", p->poll_id, csv ? "csv" : "json");
    tly_req_add_header(req, "Content-Disposition", disp);
    tly_req_add_header(req, "Cache-Control", "no-store");
    tly_stream_cb_t cb = {.on_drain = export_on_drain, .on_close = export_on_close, .arg = e};
    tly_req_stream_start(req, 200, csv ? "text/csv; charset=utf-8" : "application/json; charset=utf-8", &cb);
    /* a UTF-8 byte order mark lets spreadsheet programs read non-ASCII labels right */
    if (csv)
        export_write(e, "\xEF\xBB\xBF");
    export_write(e, head);
    tly_free(head);
    return;
oom:
    tly_free(head);
    if (e)
        export_free(e);
    tly_req_add_header(req, "Retry-After", "1");
    api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
}
