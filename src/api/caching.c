/*
 * caching.c: HTTP caching of polls and results (ETag, Cache-Control, 304).
 *
 * The ETag is a hash of the body itself (BLAKE2b, 128 bits): a rendering that did not
 * change gives the same tag on every instance and across restarts, and one that did
 * (a vote, a poll that closed when its end_time passed, a setting) never repeats a tag,
 * with nothing to keep in step with the renderer. A results body is rendered once per
 * change and hashed per read; hashing a few KB costs about a microsecond.
 *
 * Cache-Control says who may keep the body:
 *  - public, max-age=1: the same for everyone (a poll that is not a draft; results whose
 *    visibility shows them to everyone now), so a CDN or a proxy may serve it for a
 *    second and revalidate it with If-None-Match afterwards;
 *  - public, max-age=3600: a closed poll's final results, which never change again.
 *    An hour, not a year: a poll can still be deleted, or its results hidden, after it
 *    closed, and a cache then shows the old ones for at most that long;
 *  - private, no-cache: anything that depends on who asks (a draft, which only its owner
 *    sees; results under owner_only or after_vote, or hidden while voting): only the
 *    caller's browser keeps it, and asks again every time (a 304 saves the body).
 */
#include <sodium.h>
#include <string.h>

#include "api/api_int.h"

#define ETAG_BYTES 16

/* `"` + base64url(16 bytes) + `"` */
static void etag_of(const char *body, size_t len, char out[32])
{
    uint8_t h[ETAG_BYTES];
    crypto_generichash(h, sizeof(h), (const unsigned char *)body, len, NULL, 0);
    out[0] = '"';
    sodium_bin2base64(out + 1, 30, h, sizeof(h), sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    size_t n = strlen(out);
    out[n] = '"';
    out[n + 1] = '\0';
}

/* Whether If-None-Match (a list of entity tags, or "*") names tag, compared weakly
 * (RFC 9110 13.1.2: a W/ prefix does not matter for If-None-Match). */
static bool none_match_hits(tly_str_t inm, const char *tag)
{
    size_t tlen = strlen(tag);
    const char *p = inm.ptr, *end = inm.ptr + inm.len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        if (p == end)
            break;
        if (*p == '*')
            return true;
        if (end - p >= 2 && p[0] == 'W' && p[1] == '/')
            p += 2;
        const char *q = p;
        if (q < end && *q == '"') {
            q++;
            while (q < end && *q != '"')
                q++;
            if (q < end)
                q++; /* the closing quote */
        } else {
            while (q < end && *q != ',')
                q++;
        }
        if ((size_t)(q - p) == tlen && memcmp(p, tag, tlen) == 0)
            return true;
        p = q;
    }
    return false;
}

static const char *cache_control(api_cache_t policy)
{
    switch (policy) {
    case API_CACHE_PUBLIC:
        return "public, max-age=1";
    case API_CACHE_FINAL:
        return "public, max-age=3600";
    case API_CACHE_PRIVATE:
    default:
        return "private, no-cache";
    }
}

void api_respond_cached(tly_req_t *req, const char *json, size_t len, api_cache_t policy)
{
    api_respond_cached_as(req, "application/json; charset=utf-8", json, len, policy);
}

void api_respond_cached_as(tly_req_t *req, const char *type, const char *body, size_t len, api_cache_t policy)
{
    char tag[32];
    etag_of(body, len, tag);
    tly_req_add_header(req, "ETag", tag);
    tly_req_add_header(req, "Cache-Control", cache_control(policy));
    tly_str_t inm = tly_req_header(req, "if-none-match");
    if (inm.ptr != NULL && none_match_hits(inm, tag)) {
        tly_req_respond(req, 304, NULL, NULL, 0);
        return;
    }
    tly_req_respond(req, 200, type, body, len);
}

api_cache_t api_poll_cache(tly_poll_t *p, int64_t now)
{
    return tly_poll_effective_status(p, now) == TLY_STATUS_DRAFT ? API_CACHE_PRIVATE : API_CACHE_PUBLIC;
}

api_cache_t api_results_cache(tly_poll_t *p, int64_t now)
{
    tly_poll_status_t status = tly_poll_effective_status(p, now);
    if (status == TLY_STATUS_DRAFT)
        return API_CACHE_PRIVATE;
    /* what anyone, signed in or not, voted or not, sees: only then may a shared cache
     * hand it to everyone; after_vote and owner_only depend on the caller by definition */
    tly_visibility_t v = p->settings.results_visibility;
    if ((v != TLY_VIS_ALWAYS && v != TLY_VIS_AFTER_CLOSE) || !tly_results_visible(p, NULL, false, now))
        return API_CACHE_PRIVATE;
    if (status == TLY_STATUS_CLOSED && tly_poll_final_results(p) != NULL)
        return API_CACHE_FINAL;
    return API_CACHE_PUBLIC;
}
