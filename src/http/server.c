/*
 * server.c: HTTP/1.1 connections on h2o sockets.
 *
 * A connection handles one request at a time: it reads and parses a head, reads the
 * body, hands the request to the application and reads nothing more until the response
 * is written (pipelined requests wait in the socket buffer). Request strings point into
 * the socket's input buffer, which is why reading stops while a request is handled:
 * h2o may move that buffer when it grows.
 *
 * Errors found here (bad syntax, oversize head, URI or body, smuggling attempts) are
 * answered with the application's error rendering and the connection is closed, since
 * after such a request the framing of the stream can no longer be trusted.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"
#include "http/http_int.h"

struct tly_server {
    tly_loop_t *loop;
    tly_server_conf_t conf;
    h2o_socket_t *listener;
    int port;
    conn_t *conns;
    size_t nconns;
    ip_conns_t *ips;
    h2o_timeout_t head_timeout, idle_timeout, linger_timeout;
    bool accepting;
    /* running out of descriptors (accept_starved) */
    int spare_fd;                  /* kept open to be given up for one accept; -1 if none */
    h2o_timeout_t backoff_timeout; /* how long accepting pauses when even that fails */
    h2o_timeout_entry_t backoff;   /* linked while paused */
    uint64_t fd_limit;             /* the soft RLIMIT_NOFILE at start; 0 = unlimited */
    char busy[512];                /* the whole 503 for a connection without room */
    size_t busy_len;
};

static void conn_process(conn_t *c);

bool tly_str_eq(tly_str_t a, const char *b)
{
    size_t n = strlen(b);
    return a.len == n && memcmp(a.ptr, b, n) == 0;
}

bool tly_str_ieq(tly_str_t a, const char *b)
{
    size_t n = strlen(b);
    if (a.len != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        char x = a.ptr[i], y = b[i];
        if (x >= 'A' && x <= 'Z')
            x += 32;
        if (y >= 'A' && y <= 'Z')
            y += 32;
        if (x != y)
            return false;
    }
    return true;
}

const char *tly_http_reason(int status)
{
    /* one line a case: it reads as a table */
    /* clang-format off */
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: return "Unknown";
    }
    /* clang-format on */
}

/* ---- output buffer ---- */

/* What a connection gets when there is no memory for its answer: static, so that it
 * needs none. */
static const char oom_response[] = "HTTP/1.1 503 Service Unavailable\r\n"
                                   "Content-Type: application/json; charset=utf-8\r\n"
                                   "Retry-After: 1\r\nConnection: close\r\nContent-Length: 58\r\n\r\n"
                                   "{\"error\":{\"code\":\"UNAVAILABLE\",\"message\":\"out of memory\"}}";

static int out_reserve(conn_t *c, size_t more)
{
    if (c->out_len + more <= c->out_cap)
        return 0;
    size_t cap = c->out_cap ? c->out_cap : 1024;
    while (cap < c->out_len + more)
        cap *= 2;
    char *p = tly_realloc(c->out, cap);
    if (p == NULL)
        return TLY_ENOMEM;
    c->out = p;
    c->out_cap = cap;
    return 0;
}

static void out_append(conn_t *c, const char *s, size_t n)
{
    if (n == 0)
        return; /* `out` may still be NULL (nothing reserved yet) */
    if (out_reserve(c, n) != 0) {
        c->out_failed = true;
        return;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

static void out_puts(conn_t *c, const char *s) { out_append(c, s, strlen(s)); }

/* RFC 7231 Date, cached for the second */
const char *http_date(void)
{
    static __thread time_t cached;
    static __thread char buf[40];
    time_t now = time(NULL);
    if (now != cached) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(buf, sizeof(buf), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        cached = now;
    }
    return buf;
}

/* ---- timeouts ---- */

static void set_timeout(conn_t *c, h2o_timeout_t *t)
{
    if (h2o_timeout_is_linked(&c->timeout))
        h2o_timeout_unlink(&c->timeout);
    if (t != NULL)
        h2o_timeout_link(c->server->loop->h2o, t, &c->timeout);
}

static void on_timeout(h2o_timeout_entry_t *entry)
{
    conn_t *c = (conn_t *)((char *)entry - offsetof(conn_t, timeout));
    /* A head that does not arrive in time (slowloris) or an idle keep-alive connection:
     * either way the client has nothing we are waiting to answer, so just close. */
    http_conn_close(c);
}

/* ---- writing ---- */

/* The bytes of sock->input the current request takes: its head and its body (chunked:
 * as decoded in place). */
static size_t request_extent(conn_t *c)
{
    size_t n = c->head_len + (c->chunked ? c->chunk_prev - c->head_len : c->content_length);
    return n > c->sock->input->size ? c->sock->input->size : n;
}


static void on_write_complete(h2o_socket_t *sock, const char *err)
{
    conn_t *c = sock->data;
    if (err == NULL && c->linger) {
        /* The client may still be sending a body we refused; closing now would make the
         * kernel answer with a reset that can destroy our response before the client
         * reads it. Half-close, discard what arrives, and close on EOF or after 2 s. */
        shutdown(h2o_socket_get_fd(sock), SHUT_WR);
        c->state = ST_LINGER;
        set_timeout(c, &c->server->linger_timeout);
        h2o_socket_read_start(sock, http_on_read);
        return;
    }
    if (err != NULL || c->close_after_write) {
        http_conn_close(c);
        return;
    }
    /* drop the finished request from the input (unless dispatch did) and look for the
     * next one */
    if (!c->req_owned)
        h2o_buffer_consume(&c->sock->input, request_extent(c));
    c->req_owned = false;
    h2o_mem_clear_pool(&c->pool);
    c->state = ST_HEAD;
    c->head_len = c->content_length = c->chunk_prev = 0;
    c->chunked = c->sent_continue = false;
    c->out_len = 0;
    if (c->sock->input->size > 0) {
        set_timeout(c, &c->server->head_timeout);
        conn_process(c);
    } else {
        c->idle = true;
        set_timeout(c, &c->server->idle_timeout);
    }
    /* reading stopped (dispatch could not copy the request, or too much piled up): resume
     * it unless the next request is already being handled or answered; a pipelined
     * request whose body is still arriving (ST_BODY) needs it too */
    if (c->sock != NULL && c->read_paused && (c->state == ST_HEAD || c->state == ST_BODY)) {
        c->read_paused = false;
        h2o_socket_read_start(c->sock, http_on_read);
    }
}

/* Writes the response in `out`; when part of it found no memory (a head with a
 * Content-Length and no body would leave the client waiting), the static 503 instead,
 * and the connection closes after it. */
static void send_out(conn_t *c)
{
    c->state = ST_WRITING;
    h2o_iovec_t buf = h2o_iovec_init(c->out, c->out_len);
    if (c->out_failed) {
        c->out_failed = false;
        c->out_len = 0;
        c->close_after_write = true;
        buf = h2o_iovec_init(oom_response, sizeof(oom_response) - 1);
    }
    h2o_socket_write(c->sock, &buf, 1, on_write_complete);
}

static void write_head(conn_t *c, int status, const char *content_type, size_t content_length, bool keepalive,
                       const tly_req_t *req)
{
    char line[160];
    snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\nDate: %s\r\n", status, tly_http_reason(status), http_date());
    out_puts(c, line);
    if (content_type != NULL) {
        out_puts(c, "Content-Type: ");
        out_puts(c, content_type);
        out_puts(c, "\r\n");
    }
    if (status != 204 && status != 304) {
        snprintf(line, sizeof(line), "Content-Length: %zu\r\n", content_length);
        out_puts(c, line);
    }
    if (req != NULL) {
        for (size_t i = 0; i < req->nresp; i++) {
            out_puts(c, req->resp_headers[i].name);
            out_puts(c, ": ");
            out_puts(c, req->resp_headers[i].value);
            out_puts(c, "\r\n");
        }
    }
    /* HTTP/1.0 closes after each response unless the answer says keep-alive too */
    if (!keepalive)
        out_puts(c, "Connection: close\r\n");
    else if (req != NULL && req->minor_version == 0)
        out_puts(c, "Connection: keep-alive\r\n");
    out_puts(c, "\r\n");
}

/* Answers an error found before the request reached the application, then closes.
 * message: what was wrong, for the client (static text), or NULL for the status's own. */
static void send_error_and_close_msg(conn_t *c, int status, const char *message)
{
    char body[512];
    size_t n = c->server->conf.render_error ? c->server->conf.render_error(status, message, body, sizeof(body)) : 0;
    h2o_socket_read_stop(c->sock);
    set_timeout(c, NULL);
    c->close_after_write = true;
    c->linger = true;
    c->out_len = 0;
    write_head(c, status, "application/json; charset=utf-8", n, false, NULL);
    out_append(c, body, n);
    send_out(c);
}

static void send_error_and_close(conn_t *c, int status) { send_error_and_close_msg(c, status, NULL); }

/* ---- parsing ---- */

static tly_method_t method_of(tly_str_t m)
{
    static const struct {
        const char *name;
        tly_method_t m;
    } table[] = {{"GET", TLY_M_GET},     {"HEAD", TLY_M_HEAD},     {"POST", TLY_M_POST},      {"PUT", TLY_M_PUT},
                 {"PATCH", TLY_M_PATCH}, {"DELETE", TLY_M_DELETE}, {"OPTIONS", TLY_M_OPTIONS}};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(table); i++)
        if (tly_str_eq(m, table[i].name))
            return table[i].m;
    return TLY_M_OTHER;
}

static bool header_has_token(tly_str_t v, const char *token)
{
    /* comma-separated list, case-insensitive */
    size_t i = 0;
    while (i < v.len) {
        while (i < v.len && (v.ptr[i] == ' ' || v.ptr[i] == '\t' || v.ptr[i] == ','))
            i++;
        size_t start = i;
        while (i < v.len && v.ptr[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (v.ptr[end - 1] == ' ' || v.ptr[end - 1] == '\t'))
            end--;
        if (tly_str_ieq((tly_str_t){v.ptr + start, end - start}, token))
            return true;
    }
    return false;
}

/*
 * Fields a request may carry once. RFC 9110 5.3 lets a field repeat only when its value
 * is a list; two copies of one of these are ambiguous instead (which Host names the
 * target, which credential is the caller's, which key identifies a retry, which event a
 * stream resumes after), and a proxy in front may have acted on the other copy than we
 * would. So a second copy is refused with 400, never one picked silently. List fields
 * (Connection, Prefer, Upgrade, If-None-Match, X-Forwarded-For, ...) may repeat: their
 * fields are one list. Content-Length and Transfer-Encoding are framing, checked on
 * their own. docs/openapi.yaml lists these; Host must stay first.
 */
static const struct {
    const char *name, *twice;
} singletons[] = {
    {"host", "the request has more than one Host header"},
    {"authorization", "the request has more than one Authorization header"},
    {"content-type", "the request has more than one Content-Type header"},
    {"idempotency-key", "the request has more than one Idempotency-Key header"},
    {"last-event-id", "the request has more than one Last-Event-ID header"},
    {"sec-websocket-key", "the request has more than one Sec-WebSocket-Key header"},
    {"sec-websocket-version", "the request has more than one Sec-WebSocket-Version header"},
};

static bool is_alnum(char ch) { return (ch >= '0' && ch <= '9') || ((ch | 32) >= 'a' && (ch | 32) <= 'z'); }

/* RFC 3986 unreserved, sub-delims or '%' (a pct-encoded octet is checked by the caller) */
static bool is_host_char(char ch) { return is_alnum(ch) || (ch != '\0' && strchr("-._~!$&'()*+,;=%", ch) != NULL); }

/* Whether a Host value is uri-host [":" port] (RFC 9112 3.2, RFC 3986 3.2.2): a
 * reg-name or IPv4 address, or an IP literal in brackets, then an optional port of
 * digits. Empty is valid (a target without an authority). */
static bool host_valid(tly_str_t v)
{
    size_t i = 0;
    if (v.len > 0 && v.ptr[0] == '[') {
        /* IPv6address or IPvFuture: hex digits, ':' and '.' / unreserved, sub-delims, ':' */
        for (i = 1; i < v.len && v.ptr[i] != ']'; i++)
            if (v.ptr[i] == '%' || !(is_host_char(v.ptr[i]) || v.ptr[i] == ':'))
                return false;
        if (i == v.len || i == 1)
            return false;
        i++;
    } else {
        for (; i < v.len && v.ptr[i] != ':'; i++) {
            if (!is_host_char(v.ptr[i]))
                return false;
            if (v.ptr[i] == '%') {
                if (i + 2 >= v.len || !isxdigit((unsigned char)v.ptr[i + 1]) || !isxdigit((unsigned char)v.ptr[i + 2]))
                    return false;
                i += 2;
            }
        }
    }
    if (i == v.len)
        return true;
    if (v.ptr[i] != ':')
        return false;
    for (i++; i < v.len; i++)
        if (v.ptr[i] < '0' || v.ptr[i] > '9')
            return false;
    return true;
}

bool http_req_has_token(tly_req_t *req, const char *name, const char *token)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (tly_str_ieq((tly_str_t){req->headers[i].name, req->headers[i].name_len}, name) &&
            header_has_token((tly_str_t){req->headers[i].value, req->headers[i].value_len}, token))
            return true;
    return false;
}

size_t http_req_header_count(tly_req_t *req, const char *name)
{
    size_t n = 0;
    for (size_t i = 0; i < req->nheaders; i++)
        if (tly_str_ieq((tly_str_t){req->headers[i].name, req->headers[i].name_len}, name))
            n++;
    return n;
}

static void rebase(const char **p, const char *from, size_t n, char *to)
{
    if (*p != NULL && *p >= from && *p <= from + n)
        *p = to + (*p - from);
}

/*
 * Copies the request out of the input buffer into the connection's own buffer, points
 * the request's strings at the copy and drops the request from the input, so that
 * reading can go on while the request is handled: a read may move the input buffer (h2o
 * compacts or reallocates it), and a vote waits for its commit. Stopping and resuming
 * reading around every request cost two epoll_ctl calls a request. Returns false when
 * the copy finds no memory: the request then stays where it is and reading stops.
 */
static bool own_request(conn_t *c)
{
    tly_req_t *req = &c->req;
    size_t n = request_extent(c);
    const char *from = c->sock->input->bytes;
    if (n > c->req_copy_cap) {
        size_t cap = n < 1024 ? 1024 : n;
        char *p = tly_realloc(c->req_copy, cap);
        if (p == NULL)
            return false;
        c->req_copy = p;
        c->req_copy_cap = cap;
    }
    memcpy(c->req_copy, from, n);
    rebase(&req->method_name.ptr, from, n, c->req_copy);
    rebase(&req->path.ptr, from, n, c->req_copy);
    rebase(&req->query.ptr, from, n, c->req_copy);
    rebase(&req->body.ptr, from, n, c->req_copy);
    for (size_t i = 0; i < req->nheaders; i++) {
        rebase(&req->headers[i].name, from, n, c->req_copy);
        rebase(&req->headers[i].value, from, n, c->req_copy);
    }
    h2o_buffer_consume(&c->sock->input, n);
    c->req_owned = true;
    return true;
}

void http_conn_drop_request(conn_t *c)
{
    if (!c->req_owned)
        h2o_buffer_consume(&c->sock->input, request_extent(c));
    c->req_owned = true; /* gone from the input either way */
}

static void dispatch(conn_t *c)
{
    c->state = ST_HANDLING;
    set_timeout(c, NULL);
    if (!own_request(c)) {
        h2o_socket_read_stop(c->sock);
        c->read_paused = true;
    }
    c->req.start = tly_mono_us(); /* not the loop's cached ms: latencies are microseconds */
    c->req.route = c->req.note = NULL;
    c->server->conf.handler(&c->req, c->server->conf.arg);
}

static void read_body(conn_t *c)
{
    h2o_buffer_t *in = c->sock->input;
    if (c->chunked) {
        size_t bufsz = in->size - c->chunk_prev;
        if (bufsz == 0)
            return;
        ssize_t ret = phr_decode_chunked(&c->dec, in->bytes + c->chunk_prev, &bufsz);
        in->size = c->chunk_prev + bufsz;
        c->chunk_prev = in->size;
        if (ret != -1 && in->size - c->head_len > c->server->conf.body_max) {
            send_error_and_close(c, 413);
            return;
        }
        if (ret == -2)
            return;
        if (ret == -1) {
            send_error_and_close(c, 400);
            return;
        }
        c->req.body = (tly_str_t){in->bytes + c->head_len, in->size - c->head_len};
        in->size += (size_t)ret; /* the bytes after the body belong to the next request */
        dispatch(c);
        return;
    }
    if (in->size - c->head_len < c->content_length)
        return;
    c->req.body = (tly_str_t){in->bytes + c->head_len, c->content_length};
    dispatch(c);
}

static void parse_head(conn_t *c)
{
    h2o_buffer_t *in = c->sock->input;
    tly_req_t *req = &c->req;
    const tly_server_conf_t *conf = &c->server->conf;
    const char *method, *path;
    size_t method_len, path_len;
    req->nheaders = MAX_HEADERS;
    int ret = phr_parse_request(in->bytes, in->size, &method, &method_len, &path, &path_len, &req->minor_version,
                                req->headers, &req->nheaders, 0);
    if (ret == -2) {
        /* incomplete: is it already too long? a request line without its end yet is a URI
         * problem; otherwise the headers are */
        if (in->size > conf->head_max) {
            const char *eol = memchr(in->bytes, '\n', in->size);
            send_error_and_close(c, eol == NULL && in->size > conf->uri_max ? 414 : 431);
        }
        return;
    }
    if (ret == -1) {
        /* too many headers also lands here; tell it apart from garbage */
        send_error_and_close(c, req->nheaders == MAX_HEADERS ? 431 : 400);
        return;
    }
    if (path_len > conf->uri_max) {
        send_error_and_close(c, 414);
        return;
    }
    if ((size_t)ret > conf->head_max) {
        send_error_and_close(c, 431);
        return;
    }
    c->head_len = (size_t)ret;
    req->conn = c;
    req->method_name = (tly_str_t){method, method_len};
    req->method = method_of(req->method_name);
    const char *q = memchr(path, '?', path_len);
    req->path = (tly_str_t){path, q ? (size_t)(q - path) : path_len};
    req->query = q ? (tly_str_t){q + 1, path_len - (size_t)(q - path) - 1} : (tly_str_t){"", 0};
    req->body = (tly_str_t){"", 0};
    req->nresp = 0;
    req->client_known = false;
    /* picohttpparser takes a request line that starts with a space as an empty method;
     * HTTP's method is a token of at least one character (RFC 9112 3.1) */
    if (method_len == 0 || path_len == 0 || path[0] != '/') {
        send_error_and_close(c, 400);
        return;
    }

    /* framing: reject anything ambiguous (request smuggling) */
    int ncl = 0, nte = 0;
    unsigned nsingle[TLY_ARRAY_SIZE(singletons)] = {0};
    tly_str_t cl = {0}, te = {0}, host = {0}, expect = {0};
    bool conn_close = false, conn_keepalive = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        tly_str_t name = {req->headers[i].name, req->headers[i].name_len};
        tly_str_t value = {req->headers[i].value, req->headers[i].value_len};
        if (name.ptr == NULL) { /* obsolete line folding */
            send_error_and_close(c, 400);
            return;
        }
        if (tly_str_ieq(name, "content-length")) {
            ncl++;
            cl = value;
        } else if (tly_str_ieq(name, "transfer-encoding")) {
            nte++;
            te = value;
        } else if (tly_str_ieq(name, "connection")) {
            /* a list: its values may come in several fields, and all of them count */
            conn_close = conn_close || header_has_token(value, "close");
            conn_keepalive = conn_keepalive || header_has_token(value, "keep-alive");
        } else if (tly_str_ieq(name, "expect")) {
            expect = value;
        } else {
            for (size_t k = 0; k < TLY_ARRAY_SIZE(singletons); k++) {
                if (tly_str_ieq(name, singletons[k].name)) {
                    nsingle[k]++;
                    if (k == 0)
                        host = value;
                    break;
                }
            }
        }
    }
    if (ncl > 1 || nte > 1 || (ncl && nte) || (nte && !tly_str_ieq(te, "chunked")) ||
        (nte && req->minor_version == 0)) {
        send_error_and_close(c, 400);
        return;
    }
    for (size_t k = 0; k < TLY_ARRAY_SIZE(singletons); k++) {
        if (nsingle[k] > 1) {
            send_error_and_close_msg(c, 400, singletons[k].twice);
            return;
        }
    }
    /* RFC 9112 3.2: an HTTP/1.1 request without Host, or any request whose Host is not a
     * host[:port], is answered 400 (HTTP/1.0 predates Host and may leave it out) */
    if (nsingle[0] == 0 && req->minor_version >= 1) {
        send_error_and_close_msg(c, 400, "an HTTP/1.1 request needs a Host header");
        return;
    }
    if (nsingle[0] == 1 && !host_valid(host)) {
        send_error_and_close_msg(c, 400, "the Host header is not a host name or address with an optional port");
        return;
    }
    c->chunked = nte == 1;
    c->content_length = 0;
    if (ncl) {
        if (cl.len == 0 || cl.len > 18) {
            send_error_and_close(c, cl.len > 18 ? 413 : 400);
            return;
        }
        size_t n = 0;
        for (size_t i = 0; i < cl.len; i++) {
            if (cl.ptr[i] < '0' || cl.ptr[i] > '9') {
                send_error_and_close(c, 400);
                return;
            }
            n = n * 10 + (size_t)(cl.ptr[i] - '0');
        }
        if (n > conf->body_max) {
            send_error_and_close(c, 413);
            return;
        }
        c->content_length = n;
    }
    req->keepalive = !conn_close && (req->minor_version >= 1 || conn_keepalive);
    c->state = ST_BODY;
    if (c->chunked) {
        memset(&c->dec, 0, sizeof(c->dec));
        c->dec.consume_trailer = 1;
        c->chunk_prev = c->head_len;
    }
    bool body_pending = c->chunked ? true : in->size - c->head_len < c->content_length;
    if (body_pending && expect.len != 0) {
        if (!tly_str_ieq(expect, "100-continue")) {
            send_error_and_close(c, 400);
            return;
        }
        if (!c->sent_continue && req->minor_version >= 1) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            /* best effort and tiny: a blocking-free send on the raw fd; if it cannot be
             * written now the client sends the body after its own timeout anyway */
            ssize_t w = send(h2o_socket_get_fd(c->sock), cont, sizeof(cont) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
            (void)w;
            c->sent_continue = true;
        }
    }
    read_body(c);
}

static void conn_process(conn_t *c)
{
    if (c->state == ST_HEAD)
        parse_head(c);
    else if (c->state == ST_BODY)
        read_body(c);
}

void http_on_read(h2o_socket_t *sock, const char *err)
{
    conn_t *c = sock->data;
    if (err == h2o_socket_error_closed && (c->state == ST_HANDLING || c->state == ST_WRITING)) {
        /* the client has sent all it will (a half-close) and waits for the answer: stop
         * reading, answer, then close */
        h2o_socket_read_stop(sock);
        c->read_paused = false;
        c->close_after_write = true;
        c->peer_done = true;
        return;
    }
    if (err != NULL) {
        http_conn_close(c);
        return;
    }
    if (c->state == ST_WEBSOCKET) {
        http_ws_on_read(c);
        return;
    }
    if (c->state == ST_LINGER || c->state == ST_STREAMING) {
        h2o_buffer_consume(&sock->input, sock->input->size);
        return;
    }
    if (c->state == ST_HANDLING || c->state == ST_WRITING) {
        /* a pipelined request, read while this one is handled: it waits in the input
         * until the answer is out. So that a client cannot pile up more than a request
         * can be, reading stops past that (and resumes with the next request). */
        if (sock->input->size > c->server->conf.head_max + c->server->conf.body_max) {
            h2o_socket_read_stop(sock);
            c->read_paused = true;
        }
        return;
    }
    if (c->idle) {
        /* the first byte of a new request: from now on the head must arrive in time */
        c->idle = false;
        set_timeout(c, &c->server->head_timeout);
    }
    conn_process(c);
}

/* ---- connection lifecycle ---- */

void http_conn_free(conn_t *c)
{
    tly_server_t *s = c->server;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    if (c->ipc != NULL && --c->ipc->n == 0) {
        HASH_DEL(s->ips, c->ipc);
        tly_free(c->ipc);
    }
    http_ws_free(c);
    h2o_mem_clear_pool(&c->pool);
    tly_free(c->req_copy);
    tly_free(c->out);
    tly_free(c->pend);
    tly_free(c);
}

void http_conn_close(conn_t *c)
{
    set_timeout(c, NULL);
    if ((c->state == ST_STREAMING || c->state == ST_WEBSOCKET) && c->stream.on_close != NULL) {
        void (*cb)(tly_req_t *, void *) = c->stream.on_close;
        c->stream.on_close = NULL;
        c->stream.on_drain = NULL;
        cb(&c->req, c->stream.arg);
    }
    if (c->sock != NULL) {
        h2o_socket_close(c->sock);
        c->sock = NULL;
    }
    /* a request the application still holds keeps the connection object alive; it is
     * freed when the application answers (tly_req_respond) */
    if (c->state != ST_HANDLING)
        http_conn_free(c);
}

/*
 * Answers a connection the server will not keep with a whole response from memory that
 * needs nothing more (a 503), best effort, and leaves the closing to the caller: the
 * client gets a retry hint at once rather than a silent close or a wait in the listen
 * queue. What the client already sent is read and dropped first: closing a socket with
 * unread input makes the kernel send a reset that can overtake the answer.
 */
static void turn_away(int fd, const char *response, size_t len)
{
    char drain[4096];
    for (int i = 0; i < 16 && recv(fd, drain, sizeof(drain), MSG_DONTWAIT) > 0; i++)
        ;
    ssize_t w = send(fd, response, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w;
    shutdown(fd, SHUT_WR);
}

static void on_accept(h2o_socket_t *listener, const char *err);

static void on_backoff_end(h2o_timeout_entry_t *entry)
{
    tly_server_t *s = (tly_server_t *)((char *)entry - offsetof(tly_server_t, backoff));
    if (s->spare_fd < 0)
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (s->listener != NULL)
        h2o_socket_read_start(s->listener, on_accept);
}

/* Stops accepting for backoff_timeout; on_backoff_end resumes. */
static void accept_pause(tly_server_t *s)
{
    h2o_socket_read_stop(s->listener);
    if (!h2o_timeout_is_linked(&s->backoff))
        h2o_timeout_link(s->loop->h2o, &s->backoff_timeout, &s->backoff);
}

/*
 * accept found no descriptor for a waiting connection (EMFILE: this process's limit;
 * ENFILE: the system's). The connection stays queued and the listener readable, so the
 * loop would call on_accept again at once, and again, forever: 100% CPU, and the clients
 * in the queue wait for nothing. Instead the spare descriptor kept for this moment is
 * given up, the waiting connections are accepted into it one at a time and each turned
 * away with the 503, and the spare is taken back. When that cannot be done (no spare, or
 * another thread took the freed descriptor first), accepting pauses for a while; the
 * listen queue keeps the clients meanwhile. Either way nothing is retried at once.
 */
static void accept_starved(tly_server_t *s)
{
    int lfd = h2o_socket_get_fd(s->listener), failed = EMFILE;
    if (s->spare_fd >= 0) {
        close(s->spare_fd);
        s->spare_fd = -1;
        for (int i = 0; i < 64; i++) {
            int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                failed = errno;
                break;
            }
            turn_away(fd, s->busy, s->busy_len);
            close(fd);
            failed = 0;
        }
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (s->spare_fd >= 0 && failed != EMFILE && failed != ENFILE)
            return; /* the queue is empty (EAGAIN), or more wait and the loop comes back */
    }
    accept_pause(s);
}

void http_conn_linger(conn_t *c)
{
    set_timeout(c, NULL);
    if (c->stream.on_close != NULL) {
        void (*cb)(tly_req_t *, void *) = c->stream.on_close;
        c->stream.on_close = NULL;
        c->stream.on_drain = NULL;
        cb(&c->req, c->stream.arg);
    }
    http_ws_free(c);
    c->state = ST_LINGER;
    shutdown(h2o_socket_get_fd(c->sock), SHUT_WR);
    h2o_buffer_consume(&c->sock->input, c->sock->input->size);
    set_timeout(c, &c->server->linger_timeout);
    h2o_socket_read_start(c->sock, http_on_read);
}

tly_loop_t *http_conn_loop(conn_t *c) { return c->server->loop; }

static void on_accept(h2o_socket_t *listener, const char *err)
{
    tly_server_t *s = listener->data;
    if (err != NULL)
        return;
    for (int i = 0; i < 64; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept(listener);
        if (sock == NULL) {
            /* h2o returns NULL only when accept failed, errno still accept's; EAGAIN: no
             * one waits. Out of descriptors or kernel memory, retrying at once would spin. */
            if (errno == EMFILE || errno == ENFILE)
                accept_starved(s);
            else if (errno == ENOBUFS || errno == ENOMEM)
                accept_pause(s);
            return;
        }
        if (!s->accepting || s->nconns >= s->conf.max_connections) {
            turn_away(h2o_socket_get_fd(sock), s->busy, s->busy_len);
            h2o_socket_close(sock);
            continue;
        }
        conn_t *c = tly_calloc(1, sizeof(*c));
        if (c == NULL) {
            /* no memory for the connection: the static 503, which needs none */
            turn_away(h2o_socket_get_fd(sock), oom_response, sizeof(oom_response) - 1);
            h2o_socket_close(sock);
            continue;
        }
        int one = 1;
        setsockopt(h2o_socket_get_fd(sock), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        c->server = s;
        c->sock = sock;
        sock->data = c;
        h2o_mem_init_pool(&c->pool);
        c->timeout.cb = on_timeout;
        struct sockaddr_storage ss;
        socklen_t len = h2o_socket_getpeername(sock, (struct sockaddr *)&ss);
        if (len == 0 || h2o_socket_getnumerichost((struct sockaddr *)&ss, len, c->peer) == SIZE_MAX)
            strcpy(c->peer, "unknown");
        if (s->conf.max_connections_per_ip > 0) {
            /* IPv6 hosts usually hold a whole /64: count them by it */
            char key[INET6_ADDRSTRLEN + 8];
            tly_addr_key(c->peer, key, sizeof(key));
            ip_conns_t *ic;
            HASH_FIND_STR(s->ips, key, ic);
            if (ic != NULL && ic->n >= s->conf.max_connections_per_ip) {
                h2o_socket_close(sock);
                tly_free(c);
                continue;
            }
            if (ic == NULL && (ic = tly_calloc(1, sizeof(*ic))) != NULL) {
                memcpy(ic->key, key, sizeof(ic->key));
                HASH_ADD_STR(s->ips, key, ic);
            }
            if (ic != NULL) {
                ic->n++;
                c->ipc = ic;
            }
        }
        c->next = s->conns;
        if (s->conns)
            s->conns->prev = c;
        s->conns = c;
        s->nconns++;
        set_timeout(c, &s->head_timeout);
        h2o_socket_read_start(sock, http_on_read);
    }
}

static int parse_listen(const char *listen, struct sockaddr_storage *ss, socklen_t *len, char *err)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon == listen || strlen(colon + 1) == 0) {
        snprintf(err, 256, "listen address must be host:port, got \"%s\"", listen);
        return -1;
    }
    size_t hlen = (size_t)(colon - listen);
    if (listen[0] == '[' && hlen >= 2 && listen[hlen - 1] == ']') {
        listen++;
        hlen -= 2;
    }
    if (hlen >= sizeof(host)) {
        snprintf(err, 256, "listen host too long");
        return -1;
    }
    memcpy(host, listen, hlen);
    host[hlen] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535) {
        snprintf(err, 256, "bad port in \"%s\"", colon + 1);
        return -1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0) {
        snprintf(err, 256, "cannot resolve \"%.64s\": %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    return 0;
}

int tly_listen_check(const char *listen, char *err)
{
    struct sockaddr_storage ss;
    socklen_t len;
    return parse_listen(listen, &ss, &len, err);
}

/*
 * Descriptors kept free beyond those open when the server starts, for what opens files
 * later without a connection to show for it: the export's store reader (SQLite: the
 * database, its WAL and shared memory) and SQLite's temporary files for large sorts; a
 * web file being read; the PostgreSQL and Redis connections (writer, follower, readers,
 * the bus's two), each of which may hold a new socket and the resolver's files while
 * reconnecting; a connection being turned away while the table is full. About 25 at
 * worst; the rest is margin.
 */
#define FD_HEADROOM 32

/* The descriptors this process has open: /proc/self/fd where there is one, otherwise
 * probed one by one below the limit (at most 65536 probes). */
static size_t fds_open(uint64_t limit)
{
    size_t n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (e->d_name[0] != '.')
                n++;
        closedir(d);
        return n > 0 ? n - 1 : 0; /* not the directory's own */
    }
    for (uint64_t fd = 0; fd < limit && fd < 65536; fd++)
        if (fcntl((int)fd, F_GETFD) != -1)
            n++;
    return n;
}

int tly_fd_limit_raise(uint64_t *before, uint64_t *after)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return -errno;
    *before = *after = rl.rlim_cur == RLIM_INFINITY ? 0 : (uint64_t)rl.rlim_cur;
    if (rl.rlim_cur == rl.rlim_max)
        return 0;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return -errno;
    *after = rl.rlim_cur == RLIM_INFINITY ? 0 : (uint64_t)rl.rlim_cur;
    return 0;
}

tly_server_t *tly_server_new(tly_loop_t *loop, const char *listen_addr, const tly_server_conf_t *conf, char *err)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int fd = -1;
    tly_server_t *s = NULL;
    if (parse_listen(listen_addr, &ss, &sslen, err) != 0)
        goto fail;
    if ((fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
        snprintf(err, 256, "socket: %s", strerror(errno));
        goto fail;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, sslen) != 0) {
        snprintf(err, 256, "bind %s: %s", listen_addr, strerror(errno));
        goto fail;
    }
    if (listen(fd, 4096) != 0) {
        snprintf(err, 256, "listen: %s", strerror(errno));
        goto fail;
    }
    if ((s = tly_calloc(1, sizeof(*s))) == NULL) {
        snprintf(err, 256, "out of memory");
        goto fail;
    }
    s->loop = loop;
    s->conf = *conf;
    s->accepting = true;
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    /* Every connection holds a descriptor: more connections than the open-file limit
     * leaves room for would only turn into failing accepts, so the cap comes down to
     * what fits beside what is open now (the store, the bus, the loop's own, this
     * listener and the spare) and FD_HEADROOM. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        s->fd_limit = (uint64_t)rl.rlim_cur;
        uint64_t used = (uint64_t)fds_open(s->fd_limit) + FD_HEADROOM;
        if (s->fd_limit <= used) {
            snprintf(err, 256, "the open-file limit (%llu) leaves no descriptor for connections: %llu are open or kept",
                     (unsigned long long)s->fd_limit, (unsigned long long)used);
            goto fail;
        }
        if (s->conf.max_connections > s->fd_limit - used)
            s->conf.max_connections = (size_t)(s->fd_limit - used);
    }
    static const char busy_msg[] = "the server has no room for another connection; retry shortly";
    char body[256];
    size_t body_len = conf->render_error ? conf->render_error(503, busy_msg, body, sizeof(body)) : 0;
    int n = snprintf(s->busy, sizeof(s->busy),
                     "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                     "Retry-After: 1\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n%.*s",
                     body_len, (int)body_len, body);
    s->busy_len = n > 0 && (size_t)n < sizeof(s->busy) ? (size_t)n : 0;
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    getsockname(fd, (struct sockaddr *)&bound, &blen);
    s->port = h2o_socket_getport((struct sockaddr *)&bound);
    h2o_timeout_init(loop->h2o, &s->head_timeout, conf->head_timeout_ms);
    h2o_timeout_init(loop->h2o, &s->idle_timeout, conf->idle_timeout_ms);
    h2o_timeout_init(loop->h2o, &s->linger_timeout, 2000);
    h2o_timeout_init(loop->h2o, &s->backoff_timeout, 100);
    s->backoff.cb = on_backoff_end;
    s->listener = h2o_evloop_socket_create(loop->h2o, fd, H2O_SOCKET_FLAG_DONT_READ);
    s->listener->data = s;
    h2o_socket_read_start(s->listener, on_accept);
    return s;
fail:
    if (fd >= 0)
        close(fd);
    if (s != NULL && s->spare_fd >= 0)
        close(s->spare_fd);
    tly_free(s);
    return NULL;
}

int tly_server_port(tly_server_t *s) { return s->port; }

size_t tly_server_connections(tly_server_t *s) { return s->nconns; }

size_t tly_server_max_connections(tly_server_t *s, uint64_t *fd_limit)
{
    if (fd_limit != NULL)
        *fd_limit = s->fd_limit;
    return s->conf.max_connections;
}

void tly_server_stop_accepting(tly_server_t *s)
{
    if (!s->accepting)
        return;
    s->accepting = false;
    if (h2o_timeout_is_linked(&s->backoff))
        h2o_timeout_unlink(&s->backoff);
    if (s->listener != NULL) {
        h2o_socket_read_stop(s->listener);
        h2o_socket_close(s->listener);
        s->listener = NULL;
    }
    /* idle keep-alive connections have nothing in flight: close them now */
    for (conn_t *c = s->conns, *next; c != NULL; c = next) {
        next = c->next;
        if (c->state == ST_HEAD && c->sock != NULL && c->sock->input->size == 0)
            http_conn_close(c);
    }
}

void tly_server_free(tly_server_t *s)
{
    if (s == NULL)
        return;
    tly_server_stop_accepting(s);
    while (s->conns != NULL) {
        conn_t *c = s->conns;
        c->state = ST_HEAD;
        http_conn_close(c);
    }
    h2o_timeout_dispose(s->loop->h2o, &s->head_timeout);
    h2o_timeout_dispose(s->loop->h2o, &s->idle_timeout);
    h2o_timeout_dispose(s->loop->h2o, &s->linger_timeout);
    h2o_timeout_dispose(s->loop->h2o, &s->backoff_timeout);
    if (s->spare_fd >= 0)
        close(s->spare_fd);
    tly_free(s);
}

/* ---- request accessors ---- */

tly_method_t tly_req_method(tly_req_t *req) { return req->method; }
tly_str_t tly_req_method_name(tly_req_t *req) { return req->method_name; }
tly_str_t tly_req_path(tly_req_t *req) { return req->path; }
tly_str_t tly_req_query(tly_req_t *req) { return req->query; }
tly_str_t tly_req_body(tly_req_t *req) { return req->body; }
const char *tly_req_peer(tly_req_t *req) { return req->conn->peer; }

const char *tly_req_client(tly_req_t *req)
{
    if (req->conn->server->conf.trusted_proxies.n == 0)
        return req->conn->peer; /* the default: no header is believed */
    if (!req->client_known) {
        req->client_known = true;
        tly_str_t xff = {NULL, 0}; /* the last one: the hop nearest to us appended to it */
        for (size_t i = 0; i < req->nheaders; i++)
            if (tly_str_ieq((tly_str_t){req->headers[i].name, req->headers[i].name_len}, "x-forwarded-for"))
                xff = (tly_str_t){req->headers[i].value, req->headers[i].value_len};
        if (!tly_proxies_client(&req->conn->server->conf.trusted_proxies, req->conn->peer, xff, req->client,
                                sizeof(req->client)))
            snprintf(req->client, sizeof(req->client), "%s", req->conn->peer);
    }
    return req->client;
}
uint64_t tly_req_start(tly_req_t *req) { return req->start; }
void tly_req_set_route(tly_req_t *req, const char *route) { req->route = route; }
const char *tly_req_route(tly_req_t *req) { return req->route; }
void tly_req_set_note(tly_req_t *req, const char *note) { req->note = note; }
const char *tly_req_note(tly_req_t *req) { return req->note; }

void http_notify_response(conn_t *c, int status)
{
    if (c->server->conf.on_response != NULL)
        c->server->conf.on_response(&c->req, status, c->server->conf.arg);
}
bool tly_req_client_gone(tly_req_t *req) { return req->conn->sock == NULL; }

tly_str_t tly_req_header_nth(tly_req_t *req, const char *name, size_t n)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (tly_str_ieq((tly_str_t){req->headers[i].name, req->headers[i].name_len}, name) && n-- == 0)
            return (tly_str_t){req->headers[i].value, req->headers[i].value_len};
    return (tly_str_t){NULL, 0};
}

tly_str_t tly_req_header(tly_req_t *req, const char *name) { return tly_req_header_nth(req, name, 0); }

void *tly_req_alloc(tly_req_t *req, size_t n) { return h2o_mem_alloc_pool(&req->conn->pool, n); }

char *tly_req_strdup(tly_req_t *req, tly_str_t s)
{
    char *p = tly_req_alloc(req, s.len + 1);
    if (p == NULL)
        return NULL;
    if (s.len)
        memcpy(p, s.ptr, s.len);
    p[s.len] = '\0';
    return p;
}

bool tly_req_query_param(tly_req_t *req, const char *name, tly_str_t *out)
{
    tly_str_t q = req->query;
    size_t nlen = strlen(name), i = 0;
    while (i < q.len) {
        size_t start = i;
        while (i < q.len && q.ptr[i] != '&')
            i++;
        const char *kv = q.ptr + start;
        size_t kvlen = i - start;
        i++;
        const char *eq = memchr(kv, '=', kvlen);
        size_t klen = eq ? (size_t)(eq - kv) : kvlen;
        if (klen != nlen || memcmp(kv, name, nlen) != 0)
            continue;
        const char *v = eq ? eq + 1 : kv + kvlen;
        size_t vlen = eq ? kvlen - klen - 1 : 0;
        char *d = tly_req_alloc(req, vlen + 1);
        size_t o = 0;
        for (size_t j = 0; j < vlen; j++) {
            uint8_t byte;
            if (v[j] == '%' && j + 2 < vlen && tly_hex_decode(v + j + 1, 2, &byte, 1) == 1) {
                d[o++] = (char)byte;
                j += 2;
            } else if (v[j] == '+') {
                d[o++] = ' ';
            } else {
                d[o++] = v[j];
            }
        }
        d[o] = '\0';
        *out = (tly_str_t){d, o};
        return true;
    }
    return false;
}

void tly_req_add_header(tly_req_t *req, const char *name, const char *value)
{
    if (req->nresp == MAX_RESP_HEADERS)
        return;
    req->resp_headers[req->nresp].name = tly_req_strdup(req, (tly_str_t){name, strlen(name)});
    req->resp_headers[req->nresp].value = tly_req_strdup(req, (tly_str_t){value, strlen(value)});
    req->nresp++;
}

void tly_req_respond(tly_req_t *req, int status, const char *content_type, const char *body, size_t len)
{
    conn_t *c = req->conn;
    if (c->sock == NULL) {
        /* the client left while we worked; the connection waited only for this */
        http_notify_response(c, status);
        http_conn_free(c);
        return;
    }
    /* after a refused WebSocket handshake the client may already be sending frames,
     * which are no next request */
    bool keepalive = req->keepalive && c->server->accepting && !tly_req_wants_websocket(req);
    c->close_after_write = !keepalive || c->peer_done;
    c->out_len = 0;
    write_head(c, status, content_type, len, keepalive && !c->peer_done, req);
    if (req->method != TLY_M_HEAD && status != 204 && status != 304)
        out_append(c, body, len);
    if (c->out_failed)
        tly_req_set_note(req, "UNAVAILABLE"); /* logged and counted as what the client gets */
    http_notify_response(c, c->out_failed ? 503 : status);
    send_out(c);
}

/* ---- streamed responses ---- */

static void on_stream_written(h2o_socket_t *sock, const char *err)
{
    conn_t *c = sock->data;
    c->writing = false;
    if (err != NULL) {
        http_conn_close(c);
        return;
    }
    c->out_len = 0;
    if (c->state == ST_WEBSOCKET) {
        http_ws_on_written(c);
        return;
    }
    if (c->pend_len > 0) {
        http_stream_flush(c);
        return;
    }
    if (c->stream_ended) {
        http_conn_close(c);
        return;
    }
    if (c->stream.on_drain != NULL)
        c->stream.on_drain(&c->req, c->stream.arg);
}

/* Swaps the pending buffer in and writes it; one write in flight at a time. */
void http_stream_flush(conn_t *c)
{
    if (c->writing || c->sock == NULL || c->pend_len == 0)
        return;
    char *tmp = c->out;
    size_t cap = c->out_cap;
    c->out = c->pend;
    c->out_cap = c->pend_cap;
    c->out_len = c->pend_len;
    c->pend = tmp;
    c->pend_cap = cap;
    c->pend_len = 0;
    c->writing = true;
    h2o_iovec_t buf = h2o_iovec_init(c->out, c->out_len);
    h2o_socket_write(c->sock, &buf, 1, on_stream_written);
}

static int pend_reserve(conn_t *c, size_t n)
{
    if (c->pend_len + n > c->pend_cap) {
        size_t cap = c->pend_cap ? c->pend_cap : 1024;
        while (cap < c->pend_len + n)
            cap *= 2;
        char *p = tly_realloc(c->pend, cap);
        if (p == NULL)
            return TLY_ENOMEM;
        c->pend = p;
        c->pend_cap = cap;
    }
    return 0;
}

int http_pend_append(conn_t *c, const char *s, size_t n)
{
    if (pend_reserve(c, n) != 0)
        return TLY_ENOMEM;
    memcpy(c->pend + c->pend_len, s, n);
    c->pend_len += n;
    return 0;
}

void tly_req_stream_start(tly_req_t *req, int status, const char *content_type, const tly_stream_cb_t *cb)
{
    /* An HTTP/1.0 client cannot read chunked coding (RFC 9112 6.1: it must not get it):
     * for it the body goes out as it is and the end of the connection ends it. Every
     * stream closes its connection at its end anyway. */
    static const char chunked_tail[] = "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    static const char close_tail[] = "Connection: close\r\n\r\n";
    conn_t *c = req->conn;
    c->stream_unframed = req->minor_version == 0;
    const char *tail = c->stream_unframed ? close_tail : chunked_tail;
    size_t tail_len = c->stream_unframed ? sizeof(close_tail) - 1 : sizeof(chunked_tail) - 1;
    size_t head = 160 + (content_type != NULL ? strlen(content_type) + 16 : 0) + tail_len;
    for (size_t i = 0; i < req->nresp; i++)
        head += strlen(req->resp_headers[i].name) + strlen(req->resp_headers[i].value) + 4;
    c->pend_len = 0;
    if (c->sock != NULL && pend_reserve(c, head) != 0) {
        /* No memory for the head: the static 503 instead (a head cut short would leave
         * the client misreading the stream). The stream has ended: the owner's writes
         * are dropped, and it hears on_close once the 503 is written, as for any end. */
        tly_req_set_note(req, "UNAVAILABLE");
        http_notify_response(c, 503);
        c->stream = *cb;
        c->stream_ended = true;
        c->state = ST_STREAMING;
        c->writing = true;
        h2o_iovec_t buf = h2o_iovec_init(oom_response, sizeof(oom_response) - 1);
        h2o_socket_write(c->sock, &buf, 1, on_stream_written);
        return;
    }
    http_notify_response(c, status);
    c->stream = *cb;
    c->stream_ended = false;
    if (c->sock == NULL) {
        /* gone already: tell the owner at once, then release */
        c->state = ST_STREAMING;
        tly_stream_cb_t copy = c->stream;
        c->stream.on_close = NULL;
        if (copy.on_close)
            copy.on_close(req, copy.arg);
        http_conn_free(c);
        return;
    }
    c->state = ST_STREAMING;
    c->out_len = 0;
    c->pend_len = 0;
    char line[160];
    snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\nDate: %s\r\n", status, tly_http_reason(status), http_date());
    http_pend_append(c, line, strlen(line));
    if (content_type != NULL) {
        snprintf(line, sizeof(line), "Content-Type: %s\r\n", content_type);
        http_pend_append(c, line, strlen(line));
    }
    for (size_t i = 0; i < req->nresp; i++) {
        http_pend_append(c, req->resp_headers[i].name, strlen(req->resp_headers[i].name));
        http_pend_append(c, ": ", 2);
        http_pend_append(c, req->resp_headers[i].value, strlen(req->resp_headers[i].value));
        http_pend_append(c, "\r\n", 2);
    }
    http_pend_append(c, tail, tail_len);
    if (req->method == TLY_M_HEAD) {
        /* HEAD: the head of the stream only; the owner hears on_close when it is sent */
        c->stream_ended = true;
        h2o_socket_read_start(c->sock, http_on_read);
        http_stream_flush(c);
        return;
    }
    /* the request's strings live in the input buffer, which reading may now move */
    req->nheaders = 0;
    req->body = (tly_str_t){"", 0};
    req->path = req->query = (tly_str_t){"", 0};
    h2o_buffer_consume(&c->sock->input, c->sock->input->size);
    h2o_socket_read_start(c->sock, http_on_read);
    http_stream_flush(c);
}

int tly_req_stream_write(tly_req_t *req, const char *data, size_t len)
{
    conn_t *c = req->conn;
    if (c->sock == NULL || c->stream_ended || len == 0)
        return 0;
    if (c->stream_unframed) {
        if (http_pend_append(c, data, len) != 0)
            return TLY_ENOMEM;
        http_stream_flush(c);
        return 0;
    }
    char size[24];
    int n = snprintf(size, sizeof(size), "%zx\r\n", len);
    if (http_pend_append(c, size, (size_t)n) != 0 || http_pend_append(c, data, len) != 0 ||
        http_pend_append(c, "\r\n", 2) != 0)
        return TLY_ENOMEM;
    http_stream_flush(c);
    return 0;
}

size_t tly_req_stream_pending(tly_req_t *req)
{
    conn_t *c = req->conn;
    return c->pend_len + (c->writing ? c->out_len : 0);
}

void tly_req_stream_end(tly_req_t *req)
{
    conn_t *c = req->conn;
    if (c->sock == NULL || c->stream_ended)
        return;
    c->stream_ended = true;
    if (!c->stream_unframed)
        http_pend_append(c, "0\r\n\r\n", 5);
    if (!c->writing)
        http_stream_flush(c);
    if (!c->writing) /* nothing could be queued: close now rather than never */
        http_conn_close(c);
}

void tly_req_stream_abort(tly_req_t *req)
{
    conn_t *c = req->conn;
    if (c->state == ST_WEBSOCKET) {
        http_ws_abort(c);
        return;
    }
    if (c->state != ST_STREAMING)
        return;
    if (c->stream_unframed && c->sock != NULL) {
        /* Unframed, a plain close would read as the complete body: a reset instead
         * (SO_LINGER with a zero timeout), so the client sees the stream broke, as a
         * chunked one's missing last chunk tells it. */
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(h2o_socket_get_fd(c->sock), SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    http_conn_close(c);
}
