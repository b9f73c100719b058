/*
 * test_http.c: the http module. What a user would notice: a request the server cannot
 * frame or read unambiguously never reaches the application, and gets the server's own
 * error answer.
 *
 * Each test runs a real tly_server_t on 127.0.0.1 (port 0) on the test's thread and talks
 * to it over a socket: the request parsing is inside server.c, reachable only so.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"
#include "http/http.h"

static tly_loop_t *loop;
static tly_server_t *server;
static int handled; /* requests that reached the application */

static long fail_after = -1; /* >= 0: the response is 64 KiB, sent with allocations failing after that many */

static int stream_closed; /* on_close calls of streamed answers */

static void stream_on_close(tly_req_t *req, void *arg)
{
    stream_closed++;
}

static void handle(tly_req_t *req, void *arg)
{
    (void)arg;
    handled++;
    if (strncmp(tly_req_path(req).ptr, "/abort", 6) == 0) {
        /* a stream that breaks after it started (an export whose store read fails); the
         * piece still queued behind the head is dropped with it */
        tly_stream_cb_t cb = {.on_close = stream_on_close};
        tly_req_stream_start(req, 200, "text/plain", &cb);
        tly_req_stream_write(req, "partial", 7);
        tly_req_stream_abort(req);
        return;
    }
    if (strncmp(tly_req_path(req).ptr, "/stream", 7) == 0) {
        tly_stream_cb_t cb = {.on_close = stream_on_close};
        tly_alloc_fail_after(0);
        tly_req_stream_start(req, 200, "text/event-stream", &cb);
        tly_alloc_fail_after(-1);
        tly_req_stream_write(req, "data: x\n\n", 9); /* the owner goes on as if it had started */
        return;
    }
    if (fail_after < 0) {
        tly_req_respond(req, 200, "text/plain", "ok", 2);
        return;
    }
    static char big[65536];
    memset(big, 'x', sizeof(big));
    tly_alloc_fail_after(fail_after);
    tly_req_respond(req, 200, "text/plain", big, sizeof(big));
    tly_alloc_fail_after(-1);
}

static size_t render_error(int status, const char *message, char *buf, size_t cap)
{
    (void)message;
    int n = snprintf(buf, cap, "{\"status\":%d}", status);
    return n < 0 || (size_t)n >= cap ? 0 : (size_t)n;
}

static void start(void)
{
    loop = tly_loop_new();
    cr_assert_not_null(loop);
    tly_server_conf_t conf = {.body_max = 1024,
                              .head_max = 4096,
                              .uri_max = 1024,
                              .head_timeout_ms = 10000,
                              .idle_timeout_ms = 10000,
                              .max_connections = 16,
                              .handler = handle,
                              .render_error = render_error};
    char err[256];
    server = tly_server_new(loop, "127.0.0.1:0", &conf, err);
    cr_assert_not_null(server, "%s", err);
    handled = 0;
    fail_after = -1;
    stream_closed = 0;
}

static void stop(void)
{
    tly_server_free(server);
    tly_loop_free(loop);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int end_errno; /* how the last exchange ended: 0 a close, else recv's errno */

/* Sends req, half-closes, and returns (NUL-terminated in out) all the server wrote
 * until it closed the connection. */
static void exchange(const char *req, char *out, size_t cap)
{
    end_errno = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)tly_server_port(server)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(send(fd, req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
    shutdown(fd, SHUT_WR);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    size_t o = 0;
    int64_t deadline = mono_ms() + 5000;
    for (;;) {
        tly_loop_run_once(loop, 10);
        ssize_t n = recv(fd, out + o, cap - 1 - o, 0);
        if (n > 0)
            o += (size_t)n;
        else if (n == 0)
            break;
        else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            end_errno = errno;
            break;
        }
        cr_assert_lt(mono_ms(), deadline, "the server neither answered nor closed; got: %.*s", (int)o, out);
    }
    out[o] = '\0';
    close(fd);
}

static size_t count(const char *s, const char *needle)
{
    size_t n = 0;
    for (const char *p = strstr(s, needle); p != NULL; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* Found by tests/fuzz/fuzz_server (corpus: regress_empty_method*): picohttpparser reads
 * a request line that starts with a space as an empty method, and the server handed
 * such a request to the application instead of answering 400. */
Test(server, request_line_without_a_method_is_400, .init = start, .fini = stop)
{
    char out[4096];
    exchange(" /admin HTTP/1.1\r\nHost: a\r\n\r\n", out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 400 ", 13) == 0, "%s", out);
    cr_assert_eq(handled, 0);
}

Test(server, request_without_a_method_after_a_body_is_400, .init = start, .fini = stop)
{
    /* the body is 8 bytes, "0\r\n\r\nGET", so what follows starts with a space */
    char out[4096];
    exchange("POST /v1/polls HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
             out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 200 ", 13) == 0, "%s", out);
    cr_assert_eq(count(out, "HTTP/1.1 400 "), 1, "%s", out);
    cr_assert_eq(handled, 1, "only the POST reaches the application");
}

/* Reads what has arrived on fd (non-blocking) into out after *o, running the loop, until
 * `want` responses' status lines are there or 3 s pass. */
static void await_responses(int fd, char *out, size_t cap, size_t *o, size_t want)
{
    int64_t deadline = mono_ms() + 3000;
    while (count(out, "HTTP/1.1 ") < want && mono_ms() < deadline) {
        tly_loop_run_once(loop, 10);
        ssize_t n = recv(fd, out + *o, cap - 1 - *o, 0);
        if (n > 0) {
            *o += (size_t)n;
            out[*o] = '\0';
        } else if (n == 0) {
            break;
        }
    }
}

/* Found by tests/fuzz/fuzz_server (corpus: regress_pipelined_body_still_arriving): when a
 * pipelined request's head was in but its body was not, the server stopped reading after
 * answering the request before it, so the body never arrived and the request hung until
 * the header timeout closed the connection without an answer. */
Test(server, pipelined_request_whose_body_is_still_arriving_is_answered, .init = start, .fini = stop)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)tly_server_port(server)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    static const char first[] = "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                                "POST /v1/polls HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab";
    cr_assert_eq(send(fd, first, sizeof(first) - 1, MSG_NOSIGNAL), (ssize_t)(sizeof(first) - 1));
    char out[4096] = "";
    size_t o = 0;
    await_responses(fd, out, sizeof(out), &o, 1);
    cr_assert_eq(count(out, "HTTP/1.1 200 "), 1, "%s", out);
    cr_assert_eq(send(fd, "cde", 3, MSG_NOSIGNAL), 3);
    await_responses(fd, out, sizeof(out), &o, 2);
    cr_assert_eq(count(out, "HTTP/1.1 200 "), 2, "the POST is answered once its body is in: %s", out);
    cr_assert_eq(handled, 2);
    close(fd);
}

/* ---- client addresses (addr.c): what per-address limits count a voter as ---- */

static const char *client_of(const char *spec, const char *peer, const char *xff)
{
    static char out[64];
    tly_proxies_t px;
    char err[160];
    cr_assert_eq(tly_proxies_parse(spec, &px, err, sizeof(err)), 0, "%s", err);
    tly_str_t h = {xff, xff ? strlen(xff) : 0};
    if (!tly_proxies_client(&px, peer, h, out, sizeof(out)))
        snprintf(out, sizeof(out), "%s", peer);
    return out;
}

/* Found by tests/crash/oom.test.mjs (a GET /metrics without an answer now and then): when
 * the body found no memory after the head was written, the head went out alone, with
 * its Content-Length, and the client waited for a body that never came. Now the whole
 * answer is the static 503, and the connection closes. */
Test(server, a_response_without_memory_for_its_body_is_a_503_never_a_head_alone, .init = start, .fini = stop)
{
    static char out[70000];
    for (long n = 0; n <= 1; n++) { /* no memory for the head; for the body only */
        fail_after = n;
        exchange("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof(out));
        cr_assert(strncmp(out, "HTTP/1.1 503 ", 13) == 0, "n=%ld: %.200s", n, out);
        cr_assert_not_null(strstr(out, "\r\n\r\n{\"error\":{\"code\":\"UNAVAILABLE\""), "n=%ld: %.300s", n, out);
        cr_assert_eq(count(out, "HTTP/1.1 "), 1, "n=%ld: one answer", n);
    }
    fail_after = -1;
    exchange("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 200 ", 13) == 0, "and then as ever: %.200s", out);
}

/* The same for a stream whose head finds no memory: the static 503, never a head cut
 * short; the owner's writes are dropped and it hears on_close once, after the 503. */
Test(server, a_stream_without_memory_for_its_head_is_a_503_and_its_owner_hears_the_end, .init = start, .fini = stop)
{
    static char out[4096];
    exchange("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 503 ", 13) == 0, "%.200s", out);
    cr_assert_null(strstr(out, "data: x"), "%.300s", out);
    cr_assert_eq(stream_closed, 1);
}

/* An HTTP/1.0 client cannot read chunks, so its stream goes out unframed and the close
 * ends it; a stream that breaks must then end in a reset, or the client would take what
 * it got for the whole body. Over HTTP/1.1 the missing last chunk says so. */
Test(server, a_broken_stream_ends_in_a_reset_for_http_1_0_and_without_its_last_chunk_for_1_1, .init = start,
     .fini = stop)
{
    char out[4096];
    exchange("GET /abort HTTP/1.0\r\n\r\n", out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 200 ", 13) == 0, "%s", out);
    cr_assert_null(strstr(out, "Transfer-Encoding"), "%s", out);
    cr_assert_eq(end_errno, ECONNRESET, "HTTP/1.0: a reset, not a close (errno %d): %s", end_errno, out);
    cr_assert_eq(stream_closed, 1);

    exchange("GET /abort HTTP/1.1\r\nHost: a\r\n\r\n", out, sizeof(out));
    cr_assert_not_null(strstr(out, "Transfer-Encoding: chunked\r\n"), "%s", out);
    cr_assert_null(strstr(out, "0\r\n\r\n"), "no last chunk: %s", out);
    cr_assert_eq(end_errno, 0, "HTTP/1.1: a close (errno %d)", end_errno);
}

/* The highest descriptor this process has open. */
static int highest_fd(void)
{
    int top = -1;
    DIR *d = opendir("/proc/self/fd");
    cr_assert_not_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.' && atoi(e->d_name) > top && atoi(e->d_name) != dirfd(d))
            top = atoi(e->d_name);
    closedir(d);
    return top;
}

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Found by an adversarial run (issue 15, ulimit -n 128 and 200 connections): with the
 * descriptor table full, accept failed with EMFILE, the connection stayed queued and the
 * listener readable, and the loop retried at once, forever: 100% CPU, and the queued
 * clients waited for nothing. Now the spare descriptor kept for this is given up to turn
 * each waiting client away with a 503, and a client that comes once descriptors are free
 * again is served. (Here the limit drops after the server started, so that its cap of
 * 16 connections does not see it coming, as when something else uses the descriptors.) */
Test(server, out_of_descriptors_the_waiting_clients_get_a_503_and_the_loop_does_not_spin, .init = start,
     .fini = stop)
{
    enum { N = 8 };
    int cl[N + 1];
    for (int i = 0; i <= N; i++) /* the clients' own descriptors, before the limit drops */
        cl[i] = socket(AF_INET, SOCK_STREAM, 0);
    /* fill the holes below the highest descriptor, then leave two free for the server */
    int holes[64], nholes = 0, top = highest_fd();
    for (int f; nholes < 64 && (f = open("/dev/null", O_RDONLY)) >= 0;) {
        if (f > top) {
            close(f);
            break;
        }
        holes[nholes++] = f;
    }
    struct rlimit rl;
    cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
    rl.rlim_cur = (rlim_t)top + 1 + 2;
    cr_assert_eq(setrlimit(RLIMIT_NOFILE, &rl), 0, "%s", strerror(errno));

    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)tly_server_port(server)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    static const char req[] = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    for (int i = 0; i < N; i++) {
        cr_assert_eq(connect(cl[i], (struct sockaddr *)&sa, sizeof(sa)), 0, "%s", strerror(errno));
        cr_assert_eq(send(cl[i], req, sizeof(req) - 1, MSG_NOSIGNAL), (ssize_t)(sizeof(req) - 1));
        fcntl(cl[i], F_SETFL, fcntl(cl[i], F_GETFL) | O_NONBLOCK);
    }
    /* run the loop for 2 s, a late client arriving half-way; count what the clients get */
    static char got[N + 1][1024];
    size_t len[N + 1] = {0};
    bool ended[N + 1] = {false};
    double cpu0 = cpu_seconds();
    int64_t t0 = mono_ms(), late_at = t0 + 1000;
    bool late_sent = false;
    while (mono_ms() - t0 < 2000) {
        tly_loop_run_once(loop, 10);
        if (!late_sent && mono_ms() >= late_at) {
            cr_assert_eq(connect(cl[N], (struct sockaddr *)&sa, sizeof(sa)), 0, "%s", strerror(errno));
            cr_assert_eq(send(cl[N], req, sizeof(req) - 1, MSG_NOSIGNAL), (ssize_t)(sizeof(req) - 1));
            fcntl(cl[N], F_SETFL, fcntl(cl[N], F_GETFL) | O_NONBLOCK);
            late_sent = true;
        }
        for (int i = 0; i <= N; i++) {
            if (ended[i] || (i == N && !late_sent))
                continue;
            ssize_t n = recv(cl[i], got[i] + len[i], sizeof(got[i]) - 1 - len[i], 0);
            if (n > 0)
                len[i] += (size_t)n;
            else if (n == 0)
                ended[i] = true;
        }
    }
    double cpu = cpu_seconds() - cpu0, wall = (double)(mono_ms() - t0) / 1000;
    int served = 0, turned_away = 0;
    for (int i = 0; i <= N; i++) {
        got[i][len[i]] = '\0';
        if (strncmp(got[i], "HTTP/1.1 200 ", 13) == 0 && !ended[i])
            served++;
        if (strncmp(got[i], "HTTP/1.1 503 ", 13) == 0 && ended[i] &&
            strstr(got[i], "\r\n\r\n{\"status\":503}") != NULL)
            turned_away++;
    }
    cr_assert_eq(served, 2, "the two free descriptors hold two clients (served %d, turned away %d)", served,
                 turned_away);
    cr_assert_eq(turned_away, N + 1 - 2, "every other client gets a 503 and the close (%d)", turned_away);
    cr_assert_lt(cpu, wall / 2, "the loop does not spin: %.2f s of CPU in %.2f s", cpu, wall);

    /* the clients leave; a new one is served, the limit as low as ever */
    for (int i = 0; i <= N; i++)
        close(cl[i]);
    for (int i = 0; i < nholes; i++)
        close(holes[i]);
    int64_t deadline = mono_ms() + 3000;
    while (tly_server_connections(server) > 0 && mono_ms() < deadline)
        tly_loop_run_once(loop, 10);
    char out[4096];
    exchange("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", out, sizeof(out));
    cr_assert(strncmp(out, "HTTP/1.1 200 ", 13) == 0, "%s", out);
}

Test(addr, x_forwarded_for_counts_only_from_a_trusted_proxy)
{
    /* no proxies trusted: a header anyone can send changes nothing */
    cr_assert_str_eq(client_of("", "127.0.0.1", "203.0.113.9"), "127.0.0.1");
    /* the balancer appended the address it got the request from */
    cr_assert_str_eq(client_of("127.0.0.1", "127.0.0.1", "203.0.113.9"), "203.0.113.9");
    /* what the client wrote itself, left of it, proves nothing */
    cr_assert_str_eq(client_of("127.0.0.1", "127.0.0.1", "1.2.3.4, 203.0.113.9"), "203.0.113.9");
    /* a chain of trusted proxies (a CIDR, IPv6 too) is skipped from the right */
    cr_assert_str_eq(client_of("10.0.0.0/8, ::1", "::1", "198.51.100.7 ,10.1.2.3"), "198.51.100.7");
    cr_assert_str_eq(client_of("10.0.0.0/8,::1", "::1", "2001:db8::1, 10.1.2.3"), "2001:db8::1");
    /* all trusted: the leftmost; garbage stops the walk at what was believed so far */
    cr_assert_str_eq(client_of("10.0.0.0/8", "10.0.0.1", "10.9.9.9, 10.1.1.1"), "10.9.9.9");
    cr_assert_str_eq(client_of("10.0.0.0/8", "10.0.0.1", "203.0.113.5, bogus"), "10.0.0.1");
    /* a peer outside the list, or no header: the peer */
    cr_assert_str_eq(client_of("10.0.0.0/8", "192.0.2.1", "203.0.113.9"), "192.0.2.1");
    cr_assert_str_eq(client_of("127.0.0.1", "127.0.0.1", NULL), "127.0.0.1");
    /* an IPv4 peer on a dual-stack socket matches an IPv4 entry */
    cr_assert_str_eq(client_of("127.0.0.1", "::ffff:127.0.0.1", "203.0.113.9"), "203.0.113.9");
}

Test(addr, trusted_proxies_spec_errors)
{
    tly_proxies_t px;
    char err[160];
    cr_assert_eq(tly_proxies_parse("10.0.0.0/33", &px, err, sizeof(err)), -1);
    cr_assert(strstr(err, "prefix") != NULL, "%s", err);
    cr_assert_eq(tly_proxies_parse("example.com", &px, err, sizeof(err)), -1);
    cr_assert_eq(tly_proxies_parse("10.0.0.0/", &px, err, sizeof(err)), -1);
    cr_assert_eq(tly_proxies_parse(" 127.0.0.1 , ::1/128 ", &px, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(px.n, 2);
}

Test(addr, keys_count_ipv4_alike_and_ipv6_by_its_64)
{
    char a[64], b[64];
    tly_addr_key("192.0.2.1", a, sizeof(a));
    tly_addr_key("::ffff:192.0.2.1", b, sizeof(b));
    cr_assert_str_eq(a, "ip:192.0.2.1");
    cr_assert_str_eq(a, b);
    tly_addr_key("2001:db8:1:2:aaaa::1", a, sizeof(a));
    tly_addr_key("2001:db8:1:2:bbbb::9", b, sizeof(b));
    cr_assert_str_eq(a, b);
    cr_assert_str_eq(a, "ip6:2001:0db8:0001:0002::/64");
}
