/*
 * fuzz_server.c: libFuzzer harness for the HTTP/1.1 connection code of src/http/server.c
 * (request heads, framing, Content-Length and chunked bodies, Expect, pipelining,
 * keep-alive, the errors the server answers itself), driven through its public API only.
 *
 * The head and body parsing is static inside server.c and works on h2o sockets, so
 * there is no function to call with bytes. Instead the harness runs a real tly_server_t
 * on 127.0.0.1 (port 0) on the fuzzer's thread and, for every input, connects, sends the
 * input, half-closes, and runs the loop until the server has answered and closed. The
 * picohttpparser inside libh2o is h2o's and not instrumented; what the coverage sees is
 * tally's code around it.
 *
 * Input: the first byte is how the bytes are delivered: 0 all at once, n > 0 in pieces
 * of n bytes with the loop run in between (heads and chunked bodies split across reads);
 * the rest is what the client sends.
 *
 * A bug, besides a sanitizer report or a leak (each abort()s):
 *   - a request handed to the application with a path not starting with '/' or holding
 *     '?', a body over body_max, a Content-Length body of another length, both
 *     Content-Length and Transfer-Encoding, or a Transfer-Encoding other than chunked;
 *   - a method name the method code disagrees with;
 *   - a request with two Host, Authorization, Content-Type, Idempotency-Key,
 *     Last-Event-ID or Sec-WebSocket-Key/-Version fields;
 *   - a connection that neither answers nor closes after the client's end of input, or
 *     that stays open after the client has gone.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"
#include "http/http.h"

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);              \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

/* small limits, so that 413, 414 and 431 are a few mutations away */
#define BODY_MAX 512
#define HEAD_MAX 2048
#define URI_MAX 256

static tly_loop_t *loop;
static tly_server_t *server;
static int port;

static bool ieq(tly_str_t a, const char *b)
{
    return a.ptr != NULL && tly_str_ieq(a, b);
}

static void check_request(tly_req_t *req)
{
    static const struct {
        const char *name;
        tly_method_t m;
    } names[] = {{"GET", TLY_M_GET},     {"HEAD", TLY_M_HEAD},     {"POST", TLY_M_POST},      {"PUT", TLY_M_PUT},
                 {"PATCH", TLY_M_PATCH}, {"DELETE", TLY_M_DELETE}, {"OPTIONS", TLY_M_OPTIONS}};
    tly_str_t mname = tly_req_method_name(req);
    CHECK(mname.len > 0);
    tly_method_t want = TLY_M_OTHER;
    for (size_t i = 0; i < TLY_ARRAY_SIZE(names); i++)
        if (tly_str_eq(mname, names[i].name))
            want = names[i].m;
    CHECK(tly_req_method(req) == want);

    tly_str_t path = tly_req_path(req);
    CHECK(path.len > 0 && path.ptr[0] == '/' && memchr(path.ptr, '?', path.len) == NULL);
    CHECK(path.len <= URI_MAX);

    tly_str_t body = tly_req_body(req);
    CHECK(body.len <= BODY_MAX);
    tly_str_t cl = tly_req_header(req, "content-length"), te = tly_req_header(req, "transfer-encoding");
    CHECK(cl.ptr == NULL || te.ptr == NULL); /* request smuggling */
    CHECK(te.ptr == NULL || ieq(te, "chunked"));
    if (cl.ptr != NULL) {
        size_t n = 0;
        for (size_t i = 0; i < cl.len; i++) {
            CHECK(cl.ptr[i] >= '0' && cl.ptr[i] <= '9');
            n = n * 10 + (size_t)(cl.ptr[i] - '0');
        }
        CHECK(cl.len > 0 && body.len == n);
    } else if (te.ptr == NULL) {
        CHECK(body.len == 0);
    }
    /* fields that may come once never reach the application twice (which would it use?) */
    static const char *const singletons[] = {"host", "authorization", "content-type", "idempotency-key",
                                             "last-event-id", "sec-websocket-key", "sec-websocket-version"};
    for (size_t i = 0; i < TLY_ARRAY_SIZE(singletons); i++)
        CHECK(tly_req_header_nth(req, singletons[i], 1).ptr == NULL);
    /* query parameters are percent-decoded into request memory: never longer */
    static const char *const params[] = {"a", "from", "to", "bucket", ""};
    tly_str_t q = tly_req_query(req), v;
    for (size_t i = 0; i < TLY_ARRAY_SIZE(params); i++)
        if (tly_req_query_param(req, params[i], &v))
            CHECK(v.ptr != NULL && v.len <= q.len && v.ptr[v.len] == '\0');
}

static void handle(tly_req_t *req, void *arg)
{
    (void)arg;
    check_request(req);
    tly_str_t path = tly_req_path(req);
    tly_req_add_header(req, "X-Fuzz", "1");
    tly_req_respond(req, 200, "text/plain", path.ptr, path.len);
}

static size_t render_error(int status, const char *message, char *buf, size_t cap)
{
    (void)message;
    int n = snprintf(buf, cap, "{\"error\":{\"status\":%d}}", status);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    loop = tly_loop_new();
    CHECK(loop != NULL);
    tly_server_conf_t conf = {.body_max = BODY_MAX,
                              .head_max = HEAD_MAX,
                              .uri_max = URI_MAX,
                              .head_timeout_ms = 60000, /* the harness ends every input itself */
                              .idle_timeout_ms = 60000,
                              .max_connections = 64,
                              .handler = handle,
                              .render_error = render_error};
    char err[256];
    server = tly_server_new(loop, "127.0.0.1:0", &conf, err);
    if (server == NULL) {
        fprintf(stderr, "fuzz_server: %s\n", err);
        abort();
    }
    port = tly_server_port(server);
    return 0;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads what the server sent; returns true once it has closed (EOF or reset). */
static bool drain(int fd)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n > 0)
            continue;
        if (n == 0)
            return true;
        if (errno == EINTR)
            continue;
        return errno != EAGAIN && errno != EWOULDBLOCK;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t piece = data[0] ? data[0] : size;
    data++;
    size--;

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    /* The harness closes first, so every input leaves a TIME_WAIT behind on its side: at
     * thousands of inputs a second one source address runs out of ephemeral ports within
     * a minute (connect: EADDRNOTAVAIL). Each input comes from the next address of
     * 127.0.0.0/8 instead, all of them loopback. */
    static uint32_t source;
    source = source % 0xfffe + 1;
    struct sockaddr_in from = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | (source << 8) | 1u)};
    CHECK(bind(fd, (struct sockaddr *)&from, sizeof(from)) == 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) { /* the kernel accepts for us */
        /* libFuzzer's timeout alarm (a SIGALRM every second) interrupts a connect that
         * has to wait, as one did after ~125,000 inputs; the handshake goes on regardless */
        CHECK(errno == EINTR);
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        CHECK(poll(&pfd, 1, 5000) == 1);
        int err = 0;
        socklen_t errlen = sizeof(err);
        CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errlen) == 0 && err == 0);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

    bool closed = false;
    size_t off = 0;
    while (off < size && !closed) {
        size_t n = size - off < piece ? size - off : piece;
        ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL);
        if (w > 0)
            off += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            break; /* the server closed on an error it found: the rest is moot */
        /* let the server read this piece before the next one arrives */
        tly_loop_run_once(loop, 0);
        tly_loop_run_once(loop, 0);
        closed = drain(fd);
    }
    shutdown(fd, SHUT_WR);

    /* the server must answer what it has and close once it sees the end of input */
    int64_t deadline = mono_ms() + 5000;
    while (!closed) {
        tly_loop_run_once(loop, 0); /* spin: waiting would cost ms per input */
        closed = drain(fd);
        if (!closed && mono_ms() > deadline) {
            fprintf(stderr, "the server neither answered nor closed after the client's end of input\n");
            abort();
        }
    }
    close(fd);
    deadline = mono_ms() + 5000;
    while (tly_server_connections(server) > 0) {
        tly_loop_run_once(loop, 0); /* spin: waiting would cost ms per input */
        if (mono_ms() > deadline) {
            fprintf(stderr, "a connection outlived its client\n");
            abort();
        }
    }
    tly_loop_run_once(loop, 0); /* h2o frees closed sockets on the next turn */
    return 0;
}
