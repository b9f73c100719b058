/*
 * embed.c: tally on other sites. A poll's embed page (GET /embed/{poll_id}), the only
 * page that may be framed by anyone (frame-ancestors *; every other page of the web app
 * keeps frame-ancestors 'none', static.c); oEmbed (GET /oembed?url=...&format=json, the
 * rich type with an iframe of the embed page); the Open Graph and Twitter card tags of a
 * poll's page (/p/{poll_id}), written into its HTML head by the server for the link
 * previews of chats and social sites, which do not run scripts; and the results image
 * those tags name (GET /v1/polls/{poll_id}/results.svg, 1200x630).
 *
 * Absolute URLs (what a preview or an oEmbed consumer needs) start with --public-url
 * when it is set, else "http://<Host>" (a Host that is not a plain host[:port] gives
 * "http://localhost"), as the QR code's link does (qr.c).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api_int.h"
#include "base/base.h"

#define HOST_MAX 255
#define EMBED_WIDTH 560

/* ---- a bounded text buffer in request memory ---- */

typedef struct {
    char *p;
    size_t len, cap;
    bool full; /* something did not fit */
} buf_t;

static bool buf_init(buf_t *b, tly_req_t *req, size_t cap)
{
    b->p = tly_req_alloc(req, cap);
    b->len = 0;
    b->cap = cap;
    b->full = b->p == NULL;
    if (b->p != NULL)
        b->p[0] = '\0';
    return b->p != NULL;
}

static void put(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(buf_t *b, const char *fmt, ...)
{
    if (b->full)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= b->cap - b->len) {
        b->full = true;
        b->p[b->len] = '\0';
        return;
    }
    b->len += (size_t)n;
}

/* s escaped for HTML text and attribute values (and XML), cut after max code points
 * with an ellipsis. */
static void put_esc(buf_t *b, const char *s, size_t max)
{
    size_t cps = 0;
    for (const unsigned char *c = (const unsigned char *)s; *c != '\0' && !b->full; c++) {
        if ((*c & 0xC0) != 0x80 && cps++ == max) {
            put(b, "\u2026");
            return;
        }
        switch (*c) {
        case '&': put(b, "&amp;"); break;
        case '<': put(b, "&lt;"); break;
        case '>': put(b, "&gt;"); break;
        case '"': put(b, "&quot;"); break;
        case '\'': put(b, "&#39;"); break;
        default:
            if (b->len + 1 < b->cap) {
                b->p[b->len++] = (char)*c;
                b->p[b->len] = '\0';
            } else {
                b->full = true;
            }
        }
    }
}

/* ---- where tally is, seen from outside ---- */

static bool host_ok(tly_str_t h)
{
    if (h.ptr == NULL || h.len == 0 || h.len > HOST_MAX)
        return false;
    for (size_t i = 0; i < h.len; i++) {
        char c = h.ptr[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == ':' ||
                  c == '-' || c == '[' || c == ']';
        if (!ok)
            return false;
    }
    return true;
}

void api_base_url(tly_app_t *app, tly_req_t *req, char *out, size_t cap)
{
    const char *pub = app->conf->public_url;
    if (pub != NULL && pub[0] != '\0') {
        size_t plen = strlen(pub);
        while (plen > 0 && pub[plen - 1] == '/')
            plen--;
        snprintf(out, cap, "%.*s", (int)plen, pub);
        return;
    }
    tly_str_t host = tly_req_header(req, "host");
    if (host_ok(host))
        snprintf(out, cap, "http://%.*s", (int)host.len, host.ptr);
    else
        snprintf(out, cap, "http://localhost");
}

/* A poll anyone may see (not a draft), by id; NULL when there is none. */
static tly_poll_t *public_poll(tly_app_t *app, const char *id, size_t len)
{
    if (len != TLY_POLL_ID_LEN)
        return NULL;
    char key[TLY_POLL_ID_LEN + 1];
    memcpy(key, id, len);
    key[len] = '\0';
    tly_poll_t *p = tly_registry_find_poll(app->registry, key);
    if (p == NULL || tly_poll_effective_status(p, tly_now_ms()) == TLY_STATUS_DRAFT)
        return NULL;
    return p;
}

/* The embed's height for p: the question, its options and the results under them, as
 * the embed page lays them out at EMBED_WIDTH (it then sizes itself by postMessage). */
static int embed_height(const tly_poll_t *p)
{
    int h = 200 + 88 * (int)(p->noptions > 12 ? 12 : p->noptions);
    return h;
}

/* ---- the embed page ---- */

static const char EMBED_CSP[] = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                "connect-src 'self'; frame-ancestors *; base-uri 'none'; form-action 'self'";

void api_embed_page(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    size_t len;
    const char *id = tly_params_get(params, "poll_id", &len);
    tly_poll_t *p = id != NULL ? public_poll(app, id, len) : NULL;
    if (p == NULL) {
        if (!api_resync(app, req))
            api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
        return;
    }
    buf_t b;
    if (!buf_init(&b, req, 8192)) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    put(&b, "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta name=\"color-scheme\" content=\"light dark\">\n<title>");
    put_esc(&b, p->title ? p->title : "", TLY_TITLE_MAX);
    put(&b, " \u00b7 tally</title>\n<link rel=\"icon\" href=\"/favicon.svg\" type=\"image/svg+xml\">\n"
            "<link rel=\"stylesheet\" href=\"/style.css\">\n"
            "<script type=\"module\" src=\"/js/embed.js\"></script>\n</head>\n"
            "<body class=\"embed\">\n<main id=\"main\" class=\"embed-main\" data-poll=\"%s\">\n"
            "<h1 class=\"poll-title\">",
        p->poll_id);
    put_esc(&b, p->title ? p->title : "", TLY_TITLE_MAX);
    put(&b, "</h1>\n<p class=\"muted\" id=\"boot\">Loading\u2026</p>\n"
            "<noscript><p><a href=\"/p/%s\" target=\"_blank\" rel=\"noopener\">Vote on tally</a></p></noscript>\n"
            "</main>\n<div class=\"sr-only\" id=\"announcer\" aria-live=\"polite\" aria-atomic=\"true\"></div>\n"
            "</body>\n</html>\n",
        p->poll_id);
    if (b.full) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    tly_req_add_header(req, "Content-Security-Policy", EMBED_CSP);
    tly_req_add_header(req, "X-Content-Type-Options", "nosniff");
    tly_req_add_header(req, "Referrer-Policy", "no-referrer");
    tly_req_add_header(req, "Cache-Control", "no-cache");
    tly_req_respond(req, 200, "text/html; charset=utf-8", b.p, b.len);
}

/* ---- the poll page's head: Open Graph, Twitter card, oEmbed discovery ---- */

const char *api_poll_page_head(tly_app_t *app, tly_req_t *req, tly_str_t poll_id, size_t *len)
{
    tly_poll_t *p = public_poll(app, poll_id.ptr, poll_id.len);
    if (p == NULL)
        return NULL;
    char base[512], page[600], image[600];
    api_base_url(app, req, base, sizeof(base));
    snprintf(page, sizeof(page), "%s/p/%s", base, p->poll_id);
    snprintf(image, sizeof(image), "%s/v1/polls/%s/results.svg", base, p->poll_id);
    const char *title = p->title ? p->title : "";
    buf_t b;
    if (!buf_init(&b, req, 16384))
        return NULL;
    put(&b, "<meta property=\"og:type\" content=\"website\">\n<meta property=\"og:site_name\" content=\"tally\">\n"
            "<meta property=\"og:title\" content=\"");
    put_esc(&b, title, TLY_TITLE_MAX);
    put(&b, "\">\n<meta property=\"og:description\" content=\"");
    char fallback[160];
    snprintf(fallback, sizeof(fallback), "A poll with %zu options. Vote, and watch the results move live.", p->noptions);
    const char *desc = p->description && p->description[0] ? p->description : fallback;
    put_esc(&b, desc, 200);
    put(&b, "\">\n<meta property=\"og:url\" content=\"");
    put_esc(&b, page, sizeof(page));
    put(&b, "\">\n<meta property=\"og:image\" content=\"");
    put_esc(&b, image, sizeof(image));
    put(&b, "\">\n<meta property=\"og:image:type\" content=\"image/svg+xml\">\n"
            "<meta property=\"og:image:width\" content=\"1200\">\n<meta property=\"og:image:height\" content=\"630\">\n"
            "<meta property=\"og:image:alt\" content=\"");
    put(&b, "Results of the poll: ");
    put_esc(&b, title, 120);
    put(&b, "\">\n<meta name=\"twitter:card\" content=\"summary_large_image\">\n<meta name=\"twitter:title\" content=\"");
    put_esc(&b, title, 70);
    put(&b, "\">\n<meta name=\"twitter:description\" content=\"");
    put_esc(&b, desc, 200);
    put(&b, "\">\n<meta name=\"twitter:image\" content=\"");
    put_esc(&b, image, sizeof(image));
    put(&b, "\">\n<link rel=\"alternate\" type=\"application/json+oembed\" href=\"%s/oembed?url=", base);
    /* the page URL as a query value: percent-encoded, then HTML-escaped (the &) */
    for (const char *c = page; *c != '\0'; c++) {
        bool plain = (*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '-' ||
                     *c == '_' || *c == '.' || *c == '~';
        put(&b, plain ? "%c" : "%%%02X", plain ? *c : (unsigned char)*c);
    }
    put(&b, "&amp;format=json\" title=\"");
    put_esc(&b, title, TLY_TITLE_MAX);
    put(&b, "\">\n");
    if (b.full)
        return NULL;
    *len = b.len;
    return b.p;
}

/* ---- oEmbed ---- */

/* The poll id of a tally poll URL (.../p/{id} or .../embed/{id}, any scheme and host:
 * behind proxies and CDNs the host is not ours to judge). */
static bool poll_of_url(tly_str_t url, tly_str_t *id)
{
    const char *s = url.ptr, *end = url.ptr + url.len;
    const char *scheme = memmem(s, url.len, "://", 3);
    if (scheme == NULL)
        return false;
    const char *path = memchr(scheme + 3, '/', (size_t)(end - scheme - 3));
    if (path == NULL)
        return false;
    const char *stop = path;
    while (stop < end && *stop != '?' && *stop != '#')
        stop++;
    size_t plen = (size_t)(stop - path);
    if (plen > 1 && path[plen - 1] == '/')
        plen--;
    size_t skip = plen > 3 && memcmp(path, "/p/", 3) == 0 ? 3 : plen > 7 && memcmp(path, "/embed/", 7) == 0 ? 7 : 0;
    if (skip == 0 || plen - skip != TLY_POLL_ID_LEN)
        return false;
    for (size_t i = skip; i < plen; i++) {
        char c = path[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return false;
    }
    *id = (tly_str_t){path + skip, plen - skip};
    return true;
}

/* A positive whole number query parameter, or def when absent; -1 when malformed. */
static long query_long(tly_req_t *req, const char *name, long def)
{
    tly_str_t v;
    if (!tly_req_query_param(req, name, &v))
        return def;
    char *end;
    long n = strtol(v.ptr, &end, 10);
    return v.len == 0 || *end != '\0' || n < 1 ? -1 : n;
}

void api_oembed(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_str_t url, format, id;
    if (!tly_req_query_param(req, "url", &url) || url.len == 0) {
        api_respond_validation(req, "url", "url (the poll page's URL) is required");
        return;
    }
    if (tly_req_query_param(req, "format", &format) && !tly_str_eq(format, "json")) {
        /* the oEmbed spec's answer to a format the provider does not offer */
        api_respond_error(req, 501, "FORMAT_NOT_IMPLEMENTED", "only format=json is offered", NULL);
        return;
    }
    long maxwidth = query_long(req, "maxwidth", 0), maxheight = query_long(req, "maxheight", 0);
    if (maxwidth < 0 || maxheight < 0) {
        api_respond_validation(req, maxwidth < 0 ? "maxwidth" : "maxheight", "maxwidth and maxheight must be positive");
        return;
    }
    if (!poll_of_url(url, &id)) {
        api_respond_error(req, 404, "NOT_FOUND", "url is not the URL of a tally poll (.../p/{poll_id})", NULL);
        return;
    }
    tly_poll_t *p = public_poll(app, id.ptr, id.len);
    if (p == NULL) {
        if (!api_resync(app, req))
            api_respond_error(req, 404, "POLL_NOT_FOUND", "no poll with that id", NULL);
        return;
    }
    long width = EMBED_WIDTH, height = embed_height(p);
    if (maxwidth > 0 && width > maxwidth)
        width = maxwidth;
    if (maxheight > 0 && height > maxheight)
        height = maxheight;
    char base[512], src[600], thumb[600];
    api_base_url(app, req, base, sizeof(base));
    snprintf(src, sizeof(src), "%s/embed/%s", base, p->poll_id);
    snprintf(thumb, sizeof(thumb), "%s/v1/polls/%s/results.svg", base, p->poll_id);
    buf_t html;
    if (!buf_init(&html, req, 4096)) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    put(&html, "<iframe src=\"");
    put_esc(&html, src, sizeof(src));
    put(&html, "\" width=\"%ld\" height=\"%ld\" style=\"border:0;max-width:100%%\" title=\"", width, height);
    put_esc(&html, p->title ? p->title : "", TLY_TITLE_MAX);
    put(&html, "\" loading=\"lazy\"></iframe>");
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:s, s:i, s:i, s:i}", "version", "1.0", "type",
                          "rich", "provider_name", "tally", "provider_url", base, "title", p->title ? p->title : "",
                          "html", html.p, "width", (json_int_t)width, "height", (json_int_t)height, "thumbnail_url",
                          thumb, "thumbnail_width", 1200, "thumbnail_height", 630, "cache_age", 3600);
    if (html.full) {
        json_decref(o);
        o = NULL;
    }
    api_respond_json(req, 200, o);
}

/* ---- the results image ---- */

void api_polls_results_svg(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    caller_t caller;
    if (!api_caller(app, req, false, &caller))
        return;
    tly_poll_t *p = api_find_poll(app, req, params, &caller);
    if (p == NULL)
        return;
    int64_t now = tly_now_ms();
    api_poll_settle(app, p, now);
    /* what everyone may see: the image is for previews, whoever fetches it */
    bool visible = tly_poll_effective_status(p, now) != TLY_STATUS_DRAFT && tly_results_visible(p, NULL, false, now);
    json_t *res = NULL;
    if (visible) {
        size_t rlen;
        const char *rjson = tly_results_render(p, now, &rlen);
        res = rjson != NULL ? json_loadb(rjson, rlen, 0, NULL) : NULL;
        if (res == NULL) {
            tly_req_add_header(req, "Retry-After", "1");
            api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
            return;
        }
    }
    buf_t b;
    if (!buf_init(&b, req, 16384)) {
        json_decref(res);
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    put(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"630\" viewBox=\"0 0 1200 630\" "
            "role=\"img\" aria-label=\"");
    put_esc(&b, p->title ? p->title : "", 120);
    put(&b, "\">\n<rect width=\"1200\" height=\"630\" fill=\"#ffffff\"/>\n"
            "<text x=\"60\" y=\"100\" font-family=\"sans-serif\" font-size=\"48\" font-weight=\"bold\" "
            "fill=\"#1b1f24\">");
    put_esc(&b, p->title ? p->title : "", 40);
    put(&b, "</text>\n");
    json_t *opts = res != NULL ? json_object_get(res, "options") : NULL;
    size_t shown = p->noptions < 6 ? p->noptions : 6;
    for (size_t i = 0; i < shown; i++) {
        int y = 170 + (int)i * 68;
        json_t *o = opts != NULL ? json_array_get(opts, i) : NULL;
        const char *label = p->options[i].text ? p->options[i].text : "";
        double pct = o != NULL ? json_number_value(json_object_get(o, "percentage")) : 0;
        long long votes = o != NULL ? (long long)json_integer_value(json_object_get(o, "votes")) : 0;
        if (o != NULL) {
            const char *l = json_string_value(json_object_get(o, "label"));
            if (l != NULL)
                label = l;
        }
        int w = (int)(pct / 100.0 * 1080.0 + 0.5);
        put(&b, "<rect x=\"60\" y=\"%d\" width=\"1080\" height=\"52\" rx=\"8\" fill=\"#eef1f5\"/>\n", y);
        if (visible && w > 0)
            put(&b, "<rect x=\"60\" y=\"%d\" width=\"%d\" height=\"52\" rx=\"8\" fill=\"#4f6bed\"/>\n", y, w);
        put(&b, "<text x=\"80\" y=\"%d\" font-family=\"sans-serif\" font-size=\"28\" fill=\"#1b1f24\">", y + 36);
        put_esc(&b, label, 48);
        put(&b, "</text>\n");
        if (visible)
            put(&b,
                "<text x=\"1120\" y=\"%d\" font-family=\"sans-serif\" font-size=\"28\" text-anchor=\"end\" "
                "fill=\"#1b1f24\">%.1f%% (%lld)</text>\n",
                y + 36, pct, votes);
    }
    const char *foot = visible ? "" : "Results are hidden for now \u00b7 ";
    long long total = res != NULL ? (long long)json_integer_value(json_object_get(res, "total_votes")) : 0;
    put(&b, "<text x=\"60\" y=\"600\" font-family=\"sans-serif\" font-size=\"24\" fill=\"#57606a\">%s", foot);
    if (p->noptions > shown)
        put(&b, "%zu more options \u00b7 ", p->noptions - shown);
    if (visible)
        put(&b, "%lld %s \u00b7 ", total, total == 1 ? "vote" : "votes");
    put(&b, "tally</text>\n</svg>\n");
    json_decref(res);
    if (b.full) {
        tly_req_add_header(req, "Retry-After", "1");
        api_respond_error(req, 503, "UNAVAILABLE", "out of memory", NULL);
        return;
    }
    tly_req_add_header(req, "X-Content-Type-Options", "nosniff");
    api_respond_cached_as(req, "image/svg+xml", b.p, b.len, visible ? api_results_cache(p, now) : api_poll_cache(p, now));
}
