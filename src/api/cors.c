/*
 * cors.c: Cross-Origin Resource Sharing for the API, granted to the origins of
 * --cors-origins only (none by default).
 *
 * Tokens travel in the Authorization header and never in a cookie (tally sets none), so
 * a page of another origin can only act with a token it was given: the browser never
 * attaches one by itself, which is what would make a grant open to cross-site request
 * forgery. That is also why no grant carries Access-Control-Allow-Credentials.
 *
 * A granted origin gets Access-Control-Allow-Origin (its own origin, or * when the list
 * is "*") and the response headers a client reads exposed. With a list of origins the
 * answer depends on the request's Origin, so every API response says Vary: Origin and a
 * shared cache keeps one copy per origin. A preflight (OPTIONS with
 * Access-Control-Request-Method) on a path of the API is answered 204 with the path's
 * methods and the request headers tally reads; to an origin not granted it is a plain
 * 204 with Allow, which the browser reads as a refusal.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "api/api_int.h"

static const char EXPOSED[] = "ETag, Location, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset";
static const char ALLOWED_HEADERS[] = "Authorization, Content-Type, Idempotency-Key, If-None-Match, Last-Event-ID, Prefer";

/* scheme://host[:port], nothing after: what a browser sends as Origin */
static bool origin_valid(const char *o, size_t n)
{
    size_t i;
    if (n > 8 && strncasecmp(o, "https://", 8) == 0)
        i = 8;
    else if (n > 7 && strncasecmp(o, "http://", 7) == 0)
        i = 7;
    else
        return false;
    if (o[i] == '[') { /* an IPv6 literal */
        while (i < n && o[i] != ']')
            if (!isxdigit((unsigned char)o[i]) && o[i] != ':' && o[i] != '[' && o[i] != '.')
                return false;
            else
                i++;
        if (i == n)
            return false;
        i++;
    } else {
        size_t start = i;
        while (i < n && (isalnum((unsigned char)o[i]) || o[i] == '-' || o[i] == '.'))
            i++;
        if (i == start)
            return false;
    }
    if (i < n && o[i] == ':') {
        size_t start = ++i;
        while (i < n && isdigit((unsigned char)o[i]))
            i++;
        if (i == start || i - start > 5)
            return false;
    }
    return i == n;
}

int api_cors_parse(const char *spec, api_cors_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const char *p = spec;
    while (*p != '\0') {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        size_t n = strcspn(p, ", \t");
        if (n == 1 && *p == '*') {
            out->any = true;
        } else if (!origin_valid(p, n) || n >= sizeof(out->origins[0])) {
            snprintf(err, errlen, "\"%.*s\" is not an origin (scheme://host[:port], no path), nor *",
                     (int)(n > 200 ? 200 : n), p);
            return -1;
        } else if (out->n == API_CORS_MAX) {
            snprintf(err, errlen, "at most %d origins", API_CORS_MAX);
            return -1;
        } else {
            memcpy(out->origins[out->n], p, n);
            out->origins[out->n][n] = '\0';
            out->n++;
        }
        p += n;
    }
    return 0;
}

static bool granted(const api_cors_t *c, tly_str_t origin)
{
    if (c->any)
        return true;
    for (size_t i = 0; i < c->n; i++)
        if (strlen(c->origins[i]) == origin.len && strncasecmp(c->origins[i], origin.ptr, origin.len) == 0)
            return true;
    return false;
}

bool api_cors_handle(tly_app_t *app, tly_req_t *req)
{
    const api_cors_t *c = &app->cors;
    bool preflight = tly_req_method(req) == TLY_M_OPTIONS;
    tly_str_t origin = tly_req_header(req, "origin");
    bool grant = (c->any || c->n > 0) && origin.ptr != NULL && granted(c, origin);
    if (c->n > 0 && !c->any)
        tly_req_add_header(req, "Vary", "Origin");
    if (grant) {
        char *o = c->any ? NULL : tly_req_strdup(req, origin);
        tly_req_add_header(req, "Access-Control-Allow-Origin", o != NULL ? o : "*");
        if (!preflight)
            tly_req_add_header(req, "Access-Control-Expose-Headers", EXPOSED);
    }
    if (!preflight)
        return false;
    tly_route_fn fn;
    tly_params_t params;
    unsigned allowed = 0;
    tly_router_match(app->router, TLY_M_OPTIONS, tly_req_path(req), &fn, &params, &allowed);
    if (allowed == 0) {
        api_respond_error(req, 404, "NOT_FOUND", "no such route", NULL);
        return true;
    }
    tly_req_set_route(req, "preflight");
    char methods[128];
    tly_methods_format(allowed | TLY_M_OPTIONS, methods, sizeof(methods));
    tly_req_add_header(req, "Allow", methods);
    if (grant && tly_req_header(req, "access-control-request-method").ptr != NULL) {
        tly_req_add_header(req, "Access-Control-Allow-Methods", methods);
        tly_req_add_header(req, "Access-Control-Allow-Headers", ALLOWED_HEADERS);
        tly_req_add_header(req, "Access-Control-Max-Age", "600");
    }
    tly_req_add_header(req, "Cache-Control", "no-store");
    tly_req_respond(req, 204, NULL, NULL, 0);
    return true;
}
