/*
 * static.c: the web UI's files: the copy compiled into the binary (web/ at build time,
 * scripts/embed-web.sh), or with --web-root the files of that directory, read per
 * request (they are small; the page cache makes that cheap), so the app can be changed
 * or replaced without a rebuild. Paths without a file extension that match no file get
 * index.html, so the app's own routes (/p/<poll_id>) load the app.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/api_int.h"
#include "base/base.h"

#define STATIC_MAX (4 << 20)

static const char *content_type(const char *path)
{
    static const struct {
        const char *ext, *type;
    } types[] = {{".html", "text/html; charset=utf-8"},
                 {".js", "text/javascript; charset=utf-8"},
                 {".mjs", "text/javascript; charset=utf-8"},
                 {".css", "text/css; charset=utf-8"},
                 {".svg", "image/svg+xml"},
                 {".png", "image/png"},
                 {".ico", "image/x-icon"},
                 {".json", "application/json; charset=utf-8"},
                 {".txt", "text/plain; charset=utf-8"},
                 {".woff2", "font/woff2"}};
    const char *dot = strrchr(path, '.');
    if (dot != NULL && strchr(dot, '/') == NULL)
        for (size_t i = 0; i < TLY_ARRAY_SIZE(types); i++)
            if (strcmp(dot, types[i].ext) == 0)
                return types[i].type;
    return "application/octet-stream";
}

static bool safe_path(tly_str_t p)
{
    if (p.len == 0 || p.ptr[0] != '/')
        return false;
    for (size_t i = 0; i < p.len; i++) {
        char c = p.ptr[i];
        if (c == '\0' || c == '\\' || c == '%')
            return false;
        if (c == '.' && i > 0 && p.ptr[i - 1] == '/') /* no "..", no hidden files */
            return false;
    }
    return true;
}

/* A file of the directory at path (NUL-terminated, in request memory), or NULL. */
static char *read_file(tly_req_t *req, const char *file, size_t *len)
{
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > STATIC_MAX) {
        close(fd);
        return NULL;
    }
    char *buf = tly_req_alloc(req, (size_t)st.st_size + 1);
    ssize_t n = buf ? read(fd, buf, (size_t)st.st_size) : -1;
    close(fd);
    if (n != st.st_size)
        return NULL;
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

/* The web app's file at rel ("/index.html"; a safe_path): from --web-root when it is
 * set, else the compiled-in copy (static memory). NUL-terminated; NULL when there is
 * none. */
static const char *web_file(tly_app_t *app, tly_req_t *req, tly_str_t rel, size_t *len)
{
    const char *root = app->conf->web_root;
    if (root[0] != '\0') {
        char file[4096];
        snprintf(file, sizeof(file), "%s%.*s", root, (int)rel.len, rel.ptr);
        return read_file(req, file, len);
    }
    for (size_t i = 0; i < api_web_nfiles; i++) {
        const api_web_file_t *f = &api_web_files[i];
        if (strlen(f->path) == rel.len && memcmp(f->path, rel.ptr, rel.len) == 0) {
            *len = f->len;
            return (const char *)f->data;
        }
    }
    return NULL;
}

/* Every page of the web app refuses to be framed (frame-ancestors 'none'): only
 * /embed/{poll_id} (embed.c) is made for that. */
static void send(tly_req_t *req, int status, const char *type, const char *body, size_t len)
{
    tly_req_add_header(req, "Content-Security-Policy",
                       "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'");
    tly_req_add_header(req, "X-Content-Type-Options", "nosniff");
    tly_req_add_header(req, "Referrer-Policy", "no-referrer");
    tly_req_add_header(req, "Cache-Control", "no-cache");
    tly_req_respond(req, status, type, body, len);
}

static bool try_send(tly_app_t *app, tly_req_t *req, tly_str_t rel, int status)
{
    size_t len;
    const char *buf = web_file(app, req, rel, &len);
    if (buf == NULL)
        return false;
    char name[1024];
    snprintf(name, sizeof(name), "%.*s", (int)rel.len, rel.ptr);
    send(req, status, content_type(name), buf, len);
    return true;
}

bool api_static_index(tly_app_t *app, tly_req_t *req, int status)
{
    return try_send(app, req, TLY_STR_LIT("/index.html"), status);
}

/* /p/{poll_id}: index.html with the poll's Open Graph and Twitter card tags and its
 * oEmbed link in the head, for link previews (which run no script). */
static bool send_poll_page(tly_app_t *app, tly_req_t *req, tly_str_t id)
{
    size_t len, hlen;
    const char *html = web_file(app, req, TLY_STR_LIT("/index.html"), &len);
    if (html == NULL)
        return false;
    const char *head = api_poll_page_head(app, req, id, &hlen);
    const char *end = head != NULL ? strstr(html, "</head>") : NULL;
    char *out = end != NULL ? tly_req_alloc(req, len + hlen + 1) : NULL;
    if (out == NULL) { /* no poll anyone may see, or no memory for the tags */
        send(req, 200, "text/html; charset=utf-8", html, len);
        return true;
    }
    size_t at = (size_t)(end - html);
    memcpy(out, html, at);
    memcpy(out + at, head, hlen);
    memcpy(out + at + hlen, html + at, len - at);
    send(req, 200, "text/html; charset=utf-8", out, len + hlen);
    return true;
}

/* "/p/{id}" exactly: the id, or an empty string */
static tly_str_t poll_page_id(tly_str_t path)
{
    if (path.len <= 3 || memcmp(path.ptr, "/p/", 3) != 0 || memchr(path.ptr + 3, '/', path.len - 3) != NULL)
        return (tly_str_t){NULL, 0};
    return (tly_str_t){path.ptr + 3, path.len - 3};
}

void api_static_get(tly_req_t *req, const tly_params_t *params, void *arg)
{
    tly_app_t *app = arg;
    tly_str_t path = tly_req_path(req);
    if (safe_path(path) && path.len < 1024) {
        tly_str_t id = poll_page_id(path);
        if (id.len > 0 && send_poll_page(app, req, id))
            return;
        if (try_send(app, req, path.len == 1 ? TLY_STR_LIT("/index.html") : path, 200))
            return;
        const char *last = memrchr(path.ptr, '/', path.len);
        bool has_ext = last && memchr(last, '.', path.len - (size_t)(last - path.ptr)) != NULL;
        if (!has_ext && try_send(app, req, TLY_STR_LIT("/index.html"), 200))
            return;
    }
    api_respond_error(req, 404, "NOT_FOUND", "no such page", NULL);
}

bool api_web_root_ok(const char *root)
{
    char file[4096];
    struct stat st;
    snprintf(file, sizeof(file), "%s/index.html", root);
    return stat(file, &st) == 0 && S_ISREG(st.st_mode);
}
