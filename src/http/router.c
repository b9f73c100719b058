/*
 * router.c: (method, path pattern) -> handler. Routes are few (tens), so a linear scan
 * over pre-split patterns is both simplest and fast enough: matching compares a handful
 * of short segments.
 */
#include <stdio.h>
#include <string.h>

#include "base/base.h"
#include "http/http.h"

#define MAX_SEGMENTS 8

typedef struct {
    char *text; /* literal, or the capture name */
    size_t len;
    bool capture;
} segment_t;

typedef struct {
    unsigned methods;
    char *pattern;
    segment_t segs[MAX_SEGMENTS];
    size_t nsegs;
    tly_route_fn fn;
} route_t;

struct tly_router {
    route_t *routes;
    size_t n, cap;
};

tly_router_t *tly_router_new(void) { return tly_calloc(1, sizeof(tly_router_t)); }

void tly_router_free(tly_router_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->n; i++) {
        for (size_t j = 0; j < r->routes[i].nsegs; j++)
            tly_free(r->routes[i].segs[j].text);
        tly_free(r->routes[i].pattern);
    }
    tly_free(r->routes);
    tly_free(r);
}

int tly_router_add(tly_router_t *r, unsigned methods, const char *pattern, tly_route_fn fn)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        route_t *routes = tly_realloc(r->routes, cap * sizeof(*routes));
        if (routes == NULL)
            return TLY_ENOMEM;
        r->routes = routes;
        r->cap = cap;
    }
    route_t *rt = &r->routes[r->n];
    memset(rt, 0, sizeof(*rt));
    rt->methods = methods;
    rt->fn = fn;
    if ((rt->pattern = tly_strdup(pattern)) == NULL)
        return TLY_ENOMEM;
    const char *p = pattern;
    while (*p == '/') {
        p++;
        const char *end = strchr(p, '/');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (rt->nsegs == MAX_SEGMENTS)
            return TLY_EINVAL;
        segment_t *s = &rt->segs[rt->nsegs++];
        s->capture = len >= 2 && p[0] == '{' && p[len - 1] == '}';
        s->text = s->capture ? tly_strndup(p + 1, len - 2) : tly_strndup(p, len);
        if (s->text == NULL)
            return TLY_ENOMEM;
        s->len = s->capture ? len - 2 : len;
        p += len;
    }
    r->n++;
    return 0;
}

static bool match_path(const route_t *rt, tly_str_t path, tly_params_t *params)
{
    size_t i = 0, seg = 0;
    params->n = 0;
    while (i < path.len) {
        if (path.ptr[i] != '/')
            return false;
        i++;
        size_t start = i;
        while (i < path.len && path.ptr[i] != '/')
            i++;
        if (seg == rt->nsegs)
            return false;
        const segment_t *s = &rt->segs[seg++];
        tly_str_t got = {path.ptr + start, i - start};
        if (s->capture) {
            if (got.len == 0 || params->n == TLY_ARRAY_SIZE(params->names))
                return false;
            params->names[params->n] = s->text;
            params->values[params->n++] = got;
        } else if (got.len != s->len || memcmp(got.ptr, s->text, s->len) != 0) {
            return false;
        }
    }
    return seg == rt->nsegs;
}

tly_route_result_t tly_router_match(tly_router_t *r, tly_method_t method, tly_str_t path, tly_route_fn *fn,
                                    tly_params_t *params, unsigned *allowed)
{
    unsigned mask = 0;
    unsigned want = method == TLY_M_HEAD ? (TLY_M_HEAD | TLY_M_GET) : (unsigned)method;
    tly_params_t tmp;
    for (size_t i = 0; i < r->n; i++) {
        if (!match_path(&r->routes[i], path, &tmp))
            continue;
        mask |= r->routes[i].methods;
        if (r->routes[i].methods & want) {
            *fn = r->routes[i].fn;
            *params = tmp;
            params->route = r->routes[i].pattern;
            return TLY_ROUTE_FOUND;
        }
    }
    *allowed = mask;
    return mask ? TLY_ROUTE_NO_METHOD : TLY_ROUTE_NO_PATH;
}

void tly_methods_format(unsigned mask, char *buf, size_t cap)
{
    static const struct {
        unsigned m;
        const char *name;
    } names[] = {{TLY_M_GET, "GET"},     {TLY_M_HEAD, "HEAD"},     {TLY_M_POST, "POST"},      {TLY_M_PUT, "PUT"},
                 {TLY_M_PATCH, "PATCH"}, {TLY_M_DELETE, "DELETE"}, {TLY_M_OPTIONS, "OPTIONS"}};
    size_t o = 0;
    buf[0] = '\0';
    if (mask & TLY_M_GET)
        mask |= TLY_M_HEAD;
    for (size_t i = 0; i < TLY_ARRAY_SIZE(names); i++) {
        if (!(mask & names[i].m))
            continue;
        int n = snprintf(buf + o, cap - o, "%s%s", o ? ", " : "", names[i].name);
        if (n < 0 || (size_t)n >= cap - o)
            break;
        o += (size_t)n;
    }
}

const char *tly_params_get(const tly_params_t *p, const char *name, size_t *len)
{
    for (size_t i = 0; i < p->n; i++) {
        if (strcmp(p->names[i], name) == 0) {
            if (len)
                *len = p->values[i].len;
            return p->values[i].ptr;
        }
    }
    return NULL;
}
