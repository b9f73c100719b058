/*
 * fuzz_ws.c: libFuzzer harness for the WebSocket path of src/http (ws.c and the parts of
 * server.c it uses): the opening handshake and the frames behind it in one buffer,
 * through the public API only, with an owner that behaves like the live results
 * (src/api/live.c): it keeps per-connection state that on_close frees, sends a message
 * right after accepting, answers text messages, closes or aborts on request.
 *
 * Like fuzz_server.c, it runs a real tly_server_t on 127.0.0.1 (port 0) on the fuzzer's
 * thread; for every input it connects, sends the input, half-closes and runs the loop
 * until the server has closed, then checks what the server sent.
 *
 * Input: the first byte says how: bit 7 set, a valid handshake for /ws goes first (so
 * that mutations land in the frames); bits 0-6: 0 sends everything at once, n > 0 in
 * pieces of n bytes with the loop run in between. The rest is what the client sends.
 *
 * A bug, besides a sanitizer report or a leak (each abort()s):
 *   - an owner callback for a connection whose on_close already ran, or on_close twice,
 *     or on_close inside tly_req_ws_accept or a tly_ws_* call;
 *   - after a 101, server bytes that are not well-formed server frames (RFC 6455 5.2:
 *     unmasked, no RSV bit, a known opcode, control frames whole and at most 125 bytes),
 *     a close frame that is not the last frame or whose code may not be sent, a text
 *     message that is not valid UTF-8;
 *   - a connection that does not end after the client's end of input, or that stays
 *     open after the client has gone.
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

#define MAX_MESSAGE 512
#define OUT_MAX (1u << 20) /* what the harness keeps of the server's answer */

static tly_loop_t *loop;
static tly_server_t *server;
static int port;

/* The owner's state per connection, freed by on_close (as live.c's subscriber is). */
typedef struct {
    uint32_t magic;
    tly_req_t *req;
    unsigned texts;
    bool want;    /* send one more message when the socket drains (as live.c's `want`) */
    bool in_call; /* inside accept or a tly_ws_* call made by the owner */
} owner_t;

#define MAGIC 0x0b5e55edu
static size_t owners; /* alive; 0 after every input */

static owner_t *owner_of(void *arg)
{
    owner_t *o = arg;
    CHECK(o != NULL && o->magic == MAGIC); /* a freed owner is poisoned by ASan anyway */
    return o;
}

static void on_text(tly_req_t *req, const char *msg, size_t len, void *arg)
{
    owner_t *o = owner_of(arg);
    CHECK(o->req == req && len <= MAX_MESSAGE);
    o->texts++;
    o->want = o->texts % 3 == 1;
    o->in_call = true;
    if (len >= 5 && memcmp(msg, "close", 5) == 0) {
        tly_ws_close(req, 1000, "bye");
    } else if (len >= 5 && memcmp(msg, "abort", 5) == 0) {
        o->in_call = false;
        tly_req_stream_abort(req); /* on_close runs once on_text has returned */
        return;
    } else if (len >= 4 && memcmp(msg, "ping", 4) == 0) {
        tly_ws_ping(req);
    } else {
        /* a reply per message, as live.c's {"type":"pong"} and error messages */
        static const char reply[] = "{\"type\":\"error\",\"note\":\"\xc3\xa9\"}";
        tly_ws_send_text(req, reply, sizeof(reply) - 1);
    }
    o->in_call = false;
}

static void on_drain(tly_req_t *req, void *arg)
{
    owner_t *o = owner_of(arg);
    CHECK(o->req == req && !o->in_call);
    if (o->want) {
        o->want = false;
        o->in_call = true;
        static const char more[] = "{\"type\":\"results\",\"seq\":2}";
        tly_ws_send_text(req, more, sizeof(more) - 1);
        o->in_call = false;
    }
}

static void on_close(tly_req_t *req, void *arg)
{
    owner_t *o = owner_of(arg);
    CHECK(o->req == req && !o->in_call);
    o->magic = 0;
    free(o);
    owners--;
}

static void handle(tly_req_t *req, void *arg)
{
    (void)arg;
    tly_str_t path = tly_req_path(req);
    if (!tly_str_eq(path, "/ws") || !tly_req_wants_websocket(req)) {
        tly_req_respond(req, 404, "text/plain", "no", 2);
        return;
    }
    owner_t *o = calloc(1, sizeof(*o));
    CHECK(o != NULL);
    o->magic = MAGIC;
    o->req = req;
    owners++;
    tly_ws_cb_t cb = {.on_text = on_text, .on_drain = on_drain, .on_close = on_close, .arg = o,
                      .max_message = MAX_MESSAGE};
    o->in_call = true;
    int rc = tly_req_ws_accept(req, &cb);
    o->in_call = false;
    if (rc != 0) {
        CHECK(o->magic == MAGIC); /* refused: on_close does not run, the owner frees */
        o->magic = 0;
        free(o);
        owners--;
        return;
    }
    /* the first message goes out at once, as live.c's offer() does after accepting */
    o->in_call = true;
    static const char first[] = "{\"type\":\"results\",\"seq\":1,\"data\":{}}";
    tly_ws_send_text(req, first, sizeof(first) - 1);
    o->in_call = false;
}

static size_t render_error(int status, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "{\"error\":{\"status\":%d}}", status);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    loop = tly_loop_new();
    CHECK(loop != NULL);
    tly_server_conf_t conf = {.body_max = 512,
                              .head_max = 2048,
                              .uri_max = 256,
                              .head_timeout_ms = 60000, /* the harness ends every input itself */
                              .idle_timeout_ms = 60000,
                              .max_connections = 64,
                              .handler = handle,
                              .render_error = render_error};
    char err[256];
    server = tly_server_new(loop, "127.0.0.1:0", &conf, err);
    if (server == NULL) {
        fprintf(stderr, "fuzz_ws: %s\n", err);
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

/* Reads what the server sent into out; returns true once it has closed (EOF or reset). */
static bool drain(int fd, uint8_t *out, size_t *len)
{
    uint8_t buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n > 0) {
            size_t keep = OUT_MAX - *len < (size_t)n ? OUT_MAX - *len : (size_t)n;
            memcpy(out + *len, buf, keep);
            *len += keep;
            continue;
        }
        if (n == 0)
            return true;
        if (errno == EINTR)
            continue;
        return errno != EAGAIN && errno != EWOULDBLOCK;
    }
}

static bool utf8_ok(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (len == 0 || i + len > n || (len == 2 && c < 0xc2))
            return false;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
        i += len;
    }
    return true;
}

static bool close_code_ok(unsigned code)
{
    return (code >= 1000 && code <= 1011 && code != 1004 && code != 1005 && code != 1006) ||
           (code >= 3000 && code <= 4999);
}

/* Checks the server's bytes after its 101 head: well-formed server frames, a close last. */
static void check_frames(const uint8_t *b, size_t n, bool cut)
{
    size_t off = 0;
    bool closed = false;
    while (off < n) {
        CHECK(!closed); /* nothing after a close frame */
        if (n - off < 2) {
            CHECK(cut);
            return;
        }
        uint8_t b0 = b[off], b1 = b[off + 1];
        unsigned opcode = b0 & 0x0f, len7 = b1 & 0x7f;
        CHECK((b0 & 0x70) == 0);                     /* no RSV bit: no extension */
        CHECK((b1 & 0x80) == 0);                     /* a server never masks */
        CHECK(opcode == 1 || opcode == 8 || opcode == 9 || opcode == 10);
        CHECK((b0 & 0x80) != 0);                     /* the server does not fragment */
        size_t head = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0);
        if (n - off < head) {
            CHECK(cut);
            return;
        }
        uint64_t len = len7;
        if (len7 == 126)
            len = (uint64_t)b[off + 2] << 8 | b[off + 3];
        else if (len7 == 127)
            for (int i = 0; i < 8; i++)
                len = (i ? len << 8 : 0) | b[off + 2 + i];
        if (opcode & 8)
            CHECK(len <= 125);
        if (n - off - head < len) {
            CHECK(cut);
            return;
        }
        const uint8_t *p = b + off + head;
        if (opcode == 1)
            CHECK(utf8_ok(p, (size_t)len));
        if (opcode == 8) {
            CHECK(len != 1);
            if (len >= 2) {
                CHECK(close_code_ok((unsigned)p[0] << 8 | p[1]));
                CHECK(utf8_ok(p + 2, (size_t)len - 2));
            }
            closed = true;
        }
        off += head + (size_t)len;
    }
}

static const char handshake[] = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool prefix = (data[0] & 0x80) != 0;
    size_t piece = data[0] & 0x7f;
    data++;
    size--;
    size_t total = (prefix ? sizeof(handshake) - 1 : 0) + size;
    if (total == 0)
        return 0;
    uint8_t *in = malloc(total);
    CHECK(in != NULL);
    if (prefix)
        memcpy(in, handshake, sizeof(handshake) - 1);
    if (size > 0)
        memcpy(in + (prefix ? sizeof(handshake) - 1 : 0), data, size);
    if (piece == 0)
        piece = total;

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    /* one source address per input: see fuzz_server.c (TIME_WAITs use up the ports) */
    static uint32_t source;
    source = source % 0xfffe + 1;
    struct sockaddr_in from = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | (source << 8) | 2u)};
    CHECK(bind(fd, (struct sockaddr *)&from, sizeof(from)) == 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
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

    static uint8_t out[OUT_MAX];
    size_t out_len = 0;
    bool closed = false;
    size_t off = 0;
    while (off < total && !closed) {
        size_t n = total - off < piece ? total - off : piece;
        ssize_t w = send(fd, in + off, n, MSG_NOSIGNAL);
        if (w > 0)
            off += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            break;
        tly_loop_run_once(loop, 0);
        tly_loop_run_once(loop, 0);
        closed = drain(fd, out, &out_len);
    }
    shutdown(fd, SHUT_WR);
    free(in);

    /* the server must end the connection once the client's input has ended: a close
     * handshake it started, the peer's EOF, or an HTTP answer */
    int64_t deadline = mono_ms() + 5000;
    while (!closed) {
        tly_loop_run_once(loop, 0);
        closed = drain(fd, out, &out_len);
        if (!closed && mono_ms() > deadline) {
            fprintf(stderr, "the server did not end the connection after the client's end of input\n");
            abort();
        }
    }
    close(fd);
    deadline = mono_ms() + 5000;
    while (tly_server_connections(server) > 0) {
        tly_loop_run_once(loop, 0);
        if (mono_ms() > deadline) {
            fprintf(stderr, "a connection outlived its client\n");
            abort();
        }
    }
    tly_loop_run_once(loop, 0); /* h2o frees closed sockets on the next turn */
    CHECK(owners == 0);

    static const char ok101[] = "HTTP/1.1 101 ";
    if (out_len >= sizeof(ok101) - 1 && memcmp(out, ok101, sizeof(ok101) - 1) == 0) {
        const uint8_t *end = memmem(out, out_len, "\r\n\r\n", 4);
        CHECK(end != NULL);
        size_t head = (size_t)(end - out) + 4;
        check_frames(out + head, out_len - head, out_len == OUT_MAX);
    }
    return 0;
}
