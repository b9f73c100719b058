/*
 * fuzz_router.c: libFuzzer harness for the request router (tly_router_add/_match).
 *
 * The router holds tally's real route table (the patterns of add_routes() in
 * src/api/app.c, copied below: keep them in step). Input: the first byte picks the
 * method (byte % 8: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, other), the rest is
 * the path, raw bytes as the server would pass them (not decoded, not NUL-terminated).
 *
 * The answer is compared with an independent reading of http.h's rule (segments are
 * literals or "{name}" captures, a capture matches one non-empty segment, HEAD matches
 * GET routes, the first route in table order wins), and beyond that:
 *   FOUND:     the route accepts the method, every captured value lies inside the path,
 *              is non-empty and has no '/', and the pattern with its captures filled in
 *              is the path again; tly_params_get finds every capture;
 *   NO_METHOD: the mask is non-zero, is exactly the methods of the routes whose pattern
 *              matches, and excludes the method asked for; the Allow text lists it;
 *   NO_PATH:   no pattern matches.
 * Anything else abort()s.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "http/http.h"

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);              \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

static const struct {
    unsigned methods;
    const char *pattern;
} routes[] = {
    /* from add_routes() in src/api/app.c */
    {TLY_M_POST, "/v1/auth/register"},
    {TLY_M_POST, "/v1/auth/login"},
    {TLY_M_POST, "/v1/auth/anonymous"},
    {TLY_M_POST, "/v1/auth/challenge"},
    {TLY_M_GET, "/v1/auth/me"},
    {TLY_M_POST, "/v1/polls"},
    {TLY_M_GET, "/v1/polls"},
    {TLY_M_GET, "/v1/polls/{poll_id}"},
    {TLY_M_PATCH, "/v1/polls/{poll_id}"},
    {TLY_M_DELETE, "/v1/polls/{poll_id}"},
    {TLY_M_POST, "/v1/polls/{poll_id}/votes"},
    {TLY_M_GET, "/v1/polls/{poll_id}/votes/me"},
    {TLY_M_PUT, "/v1/polls/{poll_id}/votes/me"},
    {TLY_M_DELETE, "/v1/polls/{poll_id}/votes/me"},
    {TLY_M_GET, "/v1/polls/{poll_id}/audit"},
    {TLY_M_GET, "/v1/polls/{poll_id}/export"},
    {TLY_M_GET, "/v1/polls/{poll_id}/timeline"},
    {TLY_M_GET, "/v1/polls/{poll_id}/qr.svg"},
    {TLY_M_GET, "/v1/polls/{poll_id}/votes/requests/{request_id}"},
    {TLY_M_GET, "/v1/polls/{poll_id}/results"},
    {TLY_M_GET, "/v1/polls/{poll_id}/live"},
    {TLY_M_GET, "/v1/polls/{poll_id}/ws"},
    {TLY_M_GET, "/v1/receipts/{receipt}"},
    {TLY_M_GET, "/healthz"},
    {TLY_M_GET, "/readyz"},
    {TLY_M_GET, "/metrics"},
};
#define NROUTES TLY_ARRAY_SIZE(routes)

static const tly_method_t methods[8] = {TLY_M_GET,   TLY_M_HEAD,   TLY_M_POST,    TLY_M_PUT,
                                        TLY_M_PATCH, TLY_M_DELETE, TLY_M_OPTIONS, TLY_M_OTHER};

static tly_router_t *router;

static void handler(tly_req_t *req, const tly_params_t *params, void *arg)
{
    (void)req;
    (void)params;
    (void)arg;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    router = tly_router_new();
    CHECK(router != NULL);
    for (size_t i = 0; i < NROUTES; i++)
        CHECK(tly_router_add(router, routes[i].methods, routes[i].pattern, handler) == 0);
    return 0;
}

/* ---- the reference: http.h's rule, read independently ---- */

/* Whether path matches pattern; fills the capture names (pointers into the pattern, with
 * their lengths) and values in order. */
typedef struct {
    const char *name;
    size_t name_len;
    tly_str_t value;
} capture_t;

static bool ref_match(const char *pattern, tly_str_t path, capture_t *caps, size_t *ncaps)
{
    size_t pi = 0, i = 0, plen = strlen(pattern);
    *ncaps = 0;
    /* walk both, one segment at a time; both start each segment at a '/' */
    for (;;) {
        bool pat_more = pi < plen, path_more = i < path.len;
        if (!pat_more || !path_more)
            return !pat_more && !path_more;
        if (pattern[pi] != '/' || path.ptr[i] != '/')
            return false;
        size_t ps = ++pi, s = ++i;
        while (pi < plen && pattern[pi] != '/')
            pi++;
        while (i < path.len && path.ptr[i] != '/')
            i++;
        const char *seg = pattern + ps;
        size_t seglen = pi - ps;
        tly_str_t got = {path.ptr + s, i - s};
        if (seglen >= 2 && seg[0] == '{' && seg[seglen - 1] == '}') {
            if (got.len == 0 || *ncaps == 4)
                return false;
            caps[*ncaps].name = seg + 1;
            caps[*ncaps].name_len = seglen - 2;
            caps[*ncaps].value = got;
            (*ncaps)++;
        } else if (got.len != seglen || memcmp(got.ptr, seg, seglen) != 0) {
            return false;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    tly_method_t method = methods[data[0] % 8];
    unsigned want = method == TLY_M_HEAD ? (TLY_M_HEAD | TLY_M_GET) : (unsigned)method;
    /* libFuzzer's copy is exactly `size` bytes: reading past the path is caught */
    tly_str_t path = {(const char *)data + 1, size - 1};

    /* expected: the first route matching path and method; the methods of all that match */
    size_t first = NROUTES;
    unsigned mask = 0;
    capture_t caps[4], first_caps[4];
    size_t ncaps, first_ncaps = 0;
    for (size_t i = 0; i < NROUTES; i++) {
        if (!ref_match(routes[i].pattern, path, caps, &ncaps))
            continue;
        mask |= routes[i].methods;
        if (first == NROUTES && (routes[i].methods & want)) {
            first = i;
            memcpy(first_caps, caps, sizeof(caps));
            first_ncaps = ncaps;
        }
    }

    tly_route_fn fn = NULL;
    tly_params_t params;
    memset(&params, 0, sizeof(params));
    unsigned allowed = 0xdead;
    tly_route_result_t r = tly_router_match(router, method, path, &fn, &params, &allowed);

    if (first < NROUTES) {
        CHECK(r == TLY_ROUTE_FOUND);
        CHECK(fn == handler);
        CHECK(params.route != NULL && strcmp(params.route, routes[first].pattern) == 0);
        CHECK(params.n == first_ncaps);
        for (size_t k = 0; k < params.n; k++) {
            tly_str_t v = params.values[k];
            /* inside the path, non-empty, one segment */
            CHECK(v.len > 0 && v.ptr >= path.ptr && v.ptr + v.len <= path.ptr + path.len);
            CHECK(memchr(v.ptr, '/', v.len) == NULL);
            CHECK(v.ptr == first_caps[k].value.ptr && v.len == first_caps[k].value.len);
            CHECK(strlen(params.names[k]) == first_caps[k].name_len &&
                  memcmp(params.names[k], first_caps[k].name, first_caps[k].name_len) == 0);
            size_t len = 0;
            const char *got = tly_params_get(&params, params.names[k], &len);
            /* the first capture of that name: names are unique within a pattern */
            CHECK(got == v.ptr && len == v.len);
        }
        return 0;
    }
    if (mask != 0) {
        CHECK(r == TLY_ROUTE_NO_METHOD);
        CHECK(allowed != 0 && allowed == mask && (allowed & want) == 0);
        char allow[128];
        tly_methods_format(allowed, allow, sizeof(allow));
        CHECK(allow[0] != '\0' && strlen(allow) < sizeof(allow));
        CHECK(((allowed & TLY_M_GET) != 0) == (strstr(allow, "GET") != NULL));
        CHECK(((allowed & (TLY_M_GET | TLY_M_HEAD)) != 0) == (strstr(allow, "HEAD") != NULL));
        return 0;
    }
    CHECK(r == TLY_ROUTE_NO_PATH);
    CHECK(allowed == 0);
    return 0;
}
