/*
 * http: the only module that knows h2o. An HTTP/1.1 server (keep-alive, pipelining,
 * Content-Length and chunked bodies, Expect: 100-continue) written on h2o's event loop
 * and sockets, with picohttpparser (exported by libh2o) parsing request heads. We do
 * not use h2o's own HTTP/1 handler because its errors (oversize heads, duplicate
 * Content-Length, oversize bodies) cannot be made to answer with tally's JSON error
 * envelope and status codes; owning the connection makes every limit ours.
 *
 * Also: the loop, timers and cross-thread wake-ups the rest of tally needs, and a
 * router from (method, path pattern) to handler.
 *
 * Threads: a tly_loop_t and every connection, request and timer on it belong to the
 * thread that runs the loop. Only tly_waker_wake may be called from other threads.
 */
#ifndef TALLY_HTTP_H
#define TALLY_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *ptr;
    size_t len;
} tly_str_t;

#define TLY_STR_LIT(s) ((tly_str_t){(s), sizeof(s) - 1})
bool tly_str_eq(tly_str_t a, const char *b);
bool tly_str_ieq(tly_str_t a, const char *b); /* ASCII case-insensitive */

/* ---- loop ---- */

typedef struct tly_loop tly_loop_t;
tly_loop_t *tly_loop_new(void);
/* Runs one iteration, waiting at most max_wait_ms for events, then the turn-end hook.
 * Returns 0 or -1. */
int tly_loop_run_once(tly_loop_t *loop, int32_t max_wait_ms);
/* Sets the one function run after the events of each iteration were handled (NULL: none):
 * work the handlers queued during the turn goes out once for all of them (the store's
 * writes: tly_store_hold). The loop's thread. */
void tly_loop_on_turn_end(tly_loop_t *loop, void (*cb)(void *arg), void *arg);
void tly_loop_free(tly_loop_t *loop);
/* Monotonic milliseconds as of the current loop iteration. */
uint64_t tly_loop_now(tly_loop_t *loop);

/* A waker runs cb on the loop thread soon after tly_waker_wake; wakes coalesce (many
 * wakes before the loop runs give one call). */
typedef struct tly_waker tly_waker_t;
tly_waker_t *tly_waker_new(tly_loop_t *loop, void (*cb)(void *arg), void *arg);
void tly_waker_wake(tly_waker_t *w); /* any thread */
void tly_waker_free(tly_waker_t *w);

/* A timer calls cb once, `ms` after tly_timer_start, unless stopped. Embed it anywhere;
 * zero-initialise it before first use. */
typedef struct tly_timer {
    void (*cb)(struct tly_timer *t);
    void *priv[6]; /* h2o timeout entry, opaque */
} tly_timer_t;
void tly_timer_start(tly_loop_t *loop, tly_timer_t *t, uint64_t ms, void (*cb)(tly_timer_t *t));
void tly_timer_stop(tly_timer_t *t);
bool tly_timer_active(const tly_timer_t *t);

/* A file-descriptor watch: on_ready runs on the loop thread while fd is readable (when
 * read is wanted) or once it is writable (when write is wanted), one call per readiness
 * with exactly one of readable/writable true. For clients that do their own reads and
 * writes on a socket the loop does not own (hiredis): the loop never reads, writes or
 * closes fd. tly_fdwatch_new makes fd non-blocking and returns NULL when out of memory;
 * nothing is wanted at first. A write no longer wanted may still be reported once. */
typedef struct tly_fdwatch tly_fdwatch_t;
tly_fdwatch_t *tly_fdwatch_new(tly_loop_t *loop, int fd, void (*on_ready)(void *arg, bool readable, bool writable),
                               void *arg);
void tly_fdwatch_want(tly_fdwatch_t *w, bool read, bool write);
/* Stops watching and releases w, leaving fd open for its owner to close. May be called
 * from inside on_ready. */
void tly_fdwatch_free(tly_fdwatch_t *w);

/* ---- outbound HTTP (client.c: libcurl's multi interface on the loop) ----
 *
 * POSTs to other servers (webhook deliveries), from the loop thread, never blocking it.
 * A request connects only to a public address (tly_addr_public) or one in the client's
 * allow-list, checked on the address actually connected to, after name resolution; no
 * proxy, no redirects, http and https only, 5 s to connect and 10 s in all.
 */
typedef struct tly_client tly_client_t;
typedef struct {
    int status;        /* the response's status; 0 when there was none */
    bool refused;      /* not connected: the address is not public nor allowed */
    const char *error; /* why there was no response (valid during the callback), or NULL */
} tly_client_result_t;
typedef void (*tly_client_done_fn)(void *arg, const tly_client_result_t *r);


typedef enum {
    TLY_M_GET = 1,
    TLY_M_HEAD = 2,
    TLY_M_POST = 4,
    TLY_M_PUT = 8,
    TLY_M_PATCH = 16,
    TLY_M_DELETE = 32,
    TLY_M_OPTIONS = 64,
    TLY_M_OTHER = 128
} tly_method_t;

typedef struct tly_req tly_req_t;
typedef struct tly_server tly_server_t;

/* ---- client addresses (addr.c) ---- */

/* The key an address (numeric, as tly_req_client gives it) counts under in per-address
 * limits: "ip:a.b.c.d" for IPv4 (also IPv4-mapped IPv6), "ip6:xxxx:...::/64" for IPv6,
 * whose hosts usually hold a whole /64. Writes at most cap bytes. Any thread. */
void tly_addr_key(const char *addr, char *out, size_t cap);

#define TLY_PROXIES_MAX 32
typedef struct {
    uint8_t addr[16]; /* IPv4 as IPv4-mapped IPv6 */
    unsigned bits;    /* prefix length over those 16 bytes */
} tly_cidr_t;
/* The reverse proxies whose X-Forwarded-For is believed (and any list of address ranges). */
typedef struct {
    tly_cidr_t v[TLY_PROXIES_MAX];
    size_t n;
} tly_proxies_t;

/* Whether the numeric address addr is in one of set's ranges. Any thread. */
bool tly_cidrs_contain(const tly_proxies_t *set, const char *addr);
/* Whether the numeric address addr is a public one: not loopback, private (RFC 1918,
 * unique local fc00::/7), link-local, shared (100.64/10), unspecified, multicast,
 * reserved or documentation space, nor an IPv4-mapped or NAT64 form of one. What an
 * outbound request may reach without an allow-list (tly_client_new). Any thread. */
bool tly_addr_public(const char *addr);

/* A client on loop whose requests may also reach the ranges of allow (NULL: none but
 * public addresses). Loop thread; NULL when out of memory. */
tly_client_t *tly_client_new(tly_loop_t *loop, const tly_proxies_t *allow);
/* POSTs body (copied; len bytes) to url with the given header lines ("Name: value"),
 * and calls done on the loop thread once it has an answer or failed. Returns 0, or
 * TLY_ENOMEM (done is then not called). */
int tly_client_post(tly_client_t *c, const char *url, const char *const *headers, size_t nheaders, const char *body,
                    size_t len, tly_client_done_fn done, void *arg);
size_t tly_client_in_flight(tly_client_t *c);
/* Drops what is in flight (without calling done) and frees c. */
void tly_client_free(tly_client_t *c);

/* Parses "addr[/bits], ..." (IPv4 or IPv6, comma or space separated; "" = none) into out.
 * Returns 0, or -1 with a reason in err. */
int tly_proxies_parse(const char *spec, tly_proxies_t *out, char *err, size_t errlen);
/* When peer is one of px and xff (an X-Forwarded-For value) names addresses: the
 * rightmost of them that is not a trusted proxy (the leftmost if all are) is the client;
 * copies it into out (cap bytes) and returns true. false: the peer is the client. */
bool tly_proxies_client(const tly_proxies_t *px, const char *peer, tly_str_t xff, char *out, size_t cap);

typedef struct {
    size_t body_max;               /* bytes; larger bodies get 413 */
    size_t head_max;               /* bytes of request line + headers; larger get 431 */
    size_t uri_max;                /* bytes of the request target; longer get 414 */
    uint64_t head_timeout_ms;      /* a request head must arrive within this (slowloris) */
    uint64_t idle_timeout_ms;      /* a keep-alive connection idle this long is closed */
    size_t max_connections;        /* further connections get a 503 and are closed at once;
                                    * lowered to what the open-file limit leaves room for */
    size_t max_connections_per_ip; /* the same, per client address (IPv6: per /64); 0 = none */
    tly_proxies_t trusted_proxies; /* whose X-Forwarded-For tly_req_client believes */
    /* Every parsed request goes here. The handler answers now or later with
     * tly_req_respond; until then the connection reads nothing more. */
    void (*handler)(tly_req_t *req, void *arg);
    void *arg;
    /* Called for errors the server answers itself (400, 413, 414, 431, and 503 for a
     * connection it has no room for) so they are rendered in the application's error
     * format: must write a body into buf (at most cap bytes) and return its length.
     * message says what was wrong (a static string, no quotes or backslashes), or is
     * NULL when the status says it all. */
    size_t (*render_error)(int status, const char *message, char *buf, size_t cap);
    /* Called once per request when its response starts (status line written or
     * queued), for logs and metrics. Optional. */
    void (*on_response)(tly_req_t *req, int status, void *arg);
} tly_server_conf_t;

/* Raises this process's soft limit on open files to its hard limit: each connection is
 * a descriptor, and a soft limit below the hard one (systemd's 1024) would cap the
 * server for nothing. *before and *after get the soft limit before and after (0 =
 * unlimited). Returns 0, or -errno when the limits cannot be read or set (the limit is
 * then as it was). Call at start, on the main thread, before tly_server_new. */
int tly_fd_limit_raise(uint64_t *before, uint64_t *after);

/* Checks that listen is an address tly_server_new can listen on ("host:port", the host
 * resolved), without opening anything: for checking arguments before anything is
 * created. Returns 0, or -1 with a reason in err (256 bytes). */
int tly_listen_check(const char *listen, char *err);

/* Listens on host:port ("127.0.0.1:8080", "[::1]:8080", "0.0.0.0:80"). Returns NULL and
 * writes a reason into err (256 bytes) on failure. conf is copied. */
tly_server_t *tly_server_new(tly_loop_t *loop, const char *listen, const tly_server_conf_t *conf, char *err);
/* Stops accepting; open connections finish their current request and close. */
void tly_server_stop_accepting(tly_server_t *s);
size_t tly_server_connections(tly_server_t *s);
/* The connections the server holds at most: conf.max_connections, or fewer when the
 * open-file limit at tly_server_new left room for fewer beside the descriptors open then
 * and a reserve for those opened later. *fd_limit (when not NULL) gets that limit (0 =
 * none). Loop thread. */
size_t tly_server_max_connections(tly_server_t *s, uint64_t *fd_limit);
void tly_server_free(tly_server_t *s);
/* The port actually bound (useful with port 0). */
int tly_server_port(tly_server_t *s);

/* ---- requests (loop thread only; valid until responded) ---- */

tly_method_t tly_req_method(tly_req_t *req);
tly_str_t tly_req_method_name(tly_req_t *req);
tly_str_t tly_req_path(tly_req_t *req);  /* without the query string, not decoded */
tly_str_t tly_req_query(tly_req_t *req); /* after '?', or empty */
/* The first query parameter `name`, percent-decoded into request memory. */
bool tly_req_query_param(tly_req_t *req, const char *name, tly_str_t *out);
/* The value of the first header named `name` (case-insensitive), or {NULL,0}. The
 * server refuses a request with two of a field that is not a list (Host, Authorization,
 * Content-Type, Idempotency-Key, Last-Event-ID, Sec-WebSocket-Key/-Version), so for
 * those the first is the only one. */
tly_str_t tly_req_header(tly_req_t *req, const char *name);
/* The value of the n-th (from 0) header named `name`, or {NULL,0}: a list field (Prefer,
 * Connection, ...) may come in several fields whose values together are the list. */
tly_str_t tly_req_header_nth(tly_req_t *req, const char *name, size_t n);
tly_str_t tly_req_body(tly_req_t *req);
/* The peer's numeric address ("127.0.0.1"): the TCP connection's other end. */
const char *tly_req_peer(tly_req_t *req);
/* The client's numeric address: the peer's, or when the peer is a trusted proxy (conf
 * trusted_proxies), the one its X-Forwarded-For names (tly_proxies_client). What
 * per-address limits and logs use. Valid for the request's lifetime. */
const char *tly_req_client(tly_req_t *req);
/* Memory that lives until the request is answered. NULL on allocation failure. */
void *tly_req_alloc(tly_req_t *req, size_t n);
/* A copy of s in request memory, NUL-terminated. */
char *tly_req_strdup(tly_req_t *req, tly_str_t s);
/* Monotonic microseconds (tly_mono_us) at which the request head was complete. */
uint64_t tly_req_start(tly_req_t *req);
/* Labels for logs and metrics: the route pattern that served the request and a note
 * (an error code); both must be static strings. NULL until set. */
void tly_req_set_route(tly_req_t *req, const char *route);
const char *tly_req_route(tly_req_t *req);
void tly_req_set_note(tly_req_t *req, const char *note);
const char *tly_req_note(tly_req_t *req);

/* Adds a response header (copied). */
void tly_req_add_header(tly_req_t *req, const char *name, const char *value);
/* Sends the response (body copied) and finishes the request. For HEAD, the body is
 * omitted but Content-Length kept. May be called after the client has gone (then it
 * only releases the request). Exactly once per request. */
void tly_req_respond(tly_req_t *req, int status, const char *content_type, const char *body, size_t len);
/* Whether the client is gone; a pending request can still be answered (no-op). */
bool tly_req_client_gone(tly_req_t *req);

/* ---- streamed responses (export, Server-Sent Events) ----
 *
 * A handler may answer with a stream instead of tly_req_respond: the status and headers
 * go out at once with chunked transfer encoding, then the body in pieces; to an HTTP/1.0
 * client, which cannot read chunks, the body goes out unframed and the connection's end
 * ends it (an aborted one ends with a reset, not a close). After
 * tly_req_stream_start the request's path, query, headers and body are no longer
 * available (the connection reads on to notice the client leaving), and the connection
 * closes when the stream ends.
 */
typedef struct {
    /* All queued data has been written: a good moment to produce more. */
    void (*on_drain)(tly_req_t *req, void *arg);
    /* The client is gone (or the server is freeing the connection); the request must
     * not be used after this returns. */
    void (*on_close)(tly_req_t *req, void *arg);
    void *arg;
} tly_stream_cb_t;

void tly_req_stream_start(tly_req_t *req, int status, const char *content_type, const tly_stream_cb_t *cb);
/* Queues data (copied). Returns 0, or TLY_ENOMEM. Never blocks; a producer that cares
 * about memory writes again only from on_drain, or checks tly_req_stream_pending. */
int tly_req_stream_write(tly_req_t *req, const char *data, size_t len);
/* Bytes queued and not yet written to the socket. */
size_t tly_req_stream_pending(tly_req_t *req);
/* Ends the stream (after queued data is written the connection closes; on_close runs). */
void tly_req_stream_end(tly_req_t *req);
/* Closes the connection now, dropping whatever is queued (a reader that stopped
 * reading); on_close runs before this returns. Also for WebSocket connections (called
 * from inside on_text, the connection closes, and on_close runs, when on_text returns). */
void tly_req_stream_abort(tly_req_t *req);

/* ---- WebSocket (RFC 6455, framing by libwslay) ----
 *
 * A GET with `Upgrade: websocket` may be accepted with tly_req_ws_accept: the server
 * answers 101 and the connection carries WebSocket messages from then on. wslay answers
 * pings, rejects unmasked client frames and every other frame RFC 6455 forbids (close
 * 1002), text that is not UTF-8 (1007) and messages over max_message bytes (1009). Like
 * streams, the request's strings are gone after accepting; on_close runs once when the
 * connection ends, and never inside tly_req_ws_accept or a tly_ws_* call: frames (also
 * those that came with the handshake) are read from the loop only. The connection reads
 * nothing more while 64 KiB of output wait for the peer (pongs, replies), so a peer
 * that sends without reading costs bounded memory.
 */
typedef struct {
    void (*on_text)(tly_req_t *req, const char *msg, size_t len, void *arg);
    void (*on_drain)(tly_req_t *req, void *arg);
    void (*on_close)(tly_req_t *req, void *arg);
    void *arg;
    size_t max_message;
} tly_ws_cb_t;

/* Whether the request asks for a WebSocket upgrade (any version). */
bool tly_req_wants_websocket(tly_req_t *req);
/* Completes the handshake. Returns 0, or TLY_EINVAL after answering 400 (not an RFC 6455
 * section 4.2.1 handshake: not a GET over HTTP/1.1 with Host, Connection: Upgrade, one
 * Sec-WebSocket-Key of 16 bytes and version 13; or it has a body), or TLY_ENOMEM after
 * answering 503. A refused handshake closes the connection after the answer. */
int tly_req_ws_accept(tly_req_t *req, const tly_ws_cb_t *cb);
/* Queues a text message. 0 or TLY_ENOMEM/TLY_ESTATE (closing). */
int tly_ws_send_text(tly_req_t *req, const char *data, size_t len);
size_t tly_ws_pending(tly_req_t *req);
/* Sends a ping frame (the peer's pong is handled by wslay). */
int tly_ws_ping(tly_req_t *req);
/* Starts the closing handshake with code and reason; the connection ends after it. */
void tly_ws_close(tly_req_t *req, uint16_t code, const char *reason);

/* ---- router ---- */

/* Patterns are paths whose segments are literals or "{name}" captures; a capture matches
 * one non-empty segment. */
typedef struct tly_router tly_router_t;
typedef struct {
    const char *names[4];
    tly_str_t values[4];
    size_t n;
    const char *route; /* the matched pattern */
} tly_params_t;
typedef void (*tly_route_fn)(tly_req_t *req, const tly_params_t *params, void *arg);

tly_router_t *tly_router_new(void);
void tly_router_free(tly_router_t *r);
/* methods: a mask of tly_method_t. Returns 0 or TLY_ENOMEM. */
int tly_router_add(tly_router_t *r, unsigned methods, const char *pattern, tly_route_fn fn);
typedef enum { TLY_ROUTE_FOUND, TLY_ROUTE_NO_PATH, TLY_ROUTE_NO_METHOD } tly_route_result_t;
/* Finds the route for (method, path). On NO_METHOD, *allowed is the mask of methods the
 * path accepts (for the Allow header). HEAD matches GET routes. */
tly_route_result_t tly_router_match(tly_router_t *r, tly_method_t method, tly_str_t path, tly_route_fn *fn,
                                    tly_params_t *params, unsigned *allowed);
/* Writes "GET, POST" style text for a method mask into buf. */
void tly_methods_format(unsigned mask, char *buf, size_t cap);
const char *tly_params_get(const tly_params_t *p, const char *name, size_t *len);

/* Reason phrase for a status code. */
const char *tly_http_reason(int status);

#endif
