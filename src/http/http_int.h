/*
 * Private to src/http: h2o and picohttpparser declarations.
 */
#ifndef TALLY_HTTP_INT_H
#define TALLY_HTTP_INT_H

#include <h2o.h>
#include <sys/types.h>
#include <uthash.h>

#include "http/http.h"

/*
 * picohttpparser is compiled into libh2o-evloop and its symbols are exported, but
 * Debian does not install its header; these are the two entry points we use, as
 * declared by picohttpparser.h of the h2o 2.2 release.
 */
struct phr_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};
int phr_parse_request(const char *buf, size_t len, const char **method, size_t *method_len, const char **path,
                      size_t *path_len, int *minor_version, struct phr_header *headers, size_t *num_headers,
                      size_t last_len);
struct phr_chunked_decoder {
    size_t bytes_left_in_chunk;
    char consume_trailer;
    char _hex_count;
    char _state;
};
ssize_t phr_decode_chunked(struct phr_chunked_decoder *decoder, char *buf, size_t *bufsz);

struct tly_loop {
    h2o_evloop_t *h2o;
    h2o_multithread_queue_t *queue;
    void (*turn_end)(void *arg); /* tly_loop_on_turn_end */
    void *turn_end_arg;
};

/* A tly_timer_t's private words hold one of these. */
typedef struct {
    h2o_timeout_entry_t entry;
    tly_loop_t *loop;
} timer_priv_t;

/* ---- connections (server.c), shared with ws.c ---- */

/* open connections per client address, for the per-IP cap */
typedef struct ip_conns {
    UT_hash_handle hh;
    char key[INET6_ADDRSTRLEN + 8]; /* tly_addr_key */
    size_t n;
} ip_conns_t;

#define MAX_HEADERS 64
#define MAX_RESP_HEADERS 24

typedef enum { ST_HEAD, ST_BODY, ST_HANDLING, ST_WRITING, ST_LINGER, ST_STREAMING, ST_WEBSOCKET } conn_state_t;

typedef struct conn conn_t;

struct tly_req {
    conn_t *conn;
    tly_method_t method;
    tly_str_t method_name, path, query;
    struct phr_header headers[MAX_HEADERS];
    size_t nheaders;
    tly_str_t body;
    int minor_version;
    bool keepalive;
    uint64_t start;
    struct {
        const char *name, *value;
    } resp_headers[MAX_RESP_HEADERS];
    size_t nresp;
    const char *route, *note;
    bool client_known; /* client: tly_req_client has looked */
    char client[INET6_ADDRSTRLEN];
};

struct conn {
    tly_server_t *server;
    h2o_socket_t *sock; /* NULL once closed */
    conn_t *prev, *next;
    h2o_mem_pool_t pool;
    conn_state_t state;
    tly_req_t req;
    size_t head_len; /* bytes of the request head in sock->input */
    size_t content_length;
    bool chunked;
    struct phr_chunked_decoder dec;
    size_t chunk_prev; /* bytes of input already decoded (head + body so far) */
    /* The request being handled, copied out of sock->input at dispatch (own_request), so
     * that reading goes on meanwhile: a read may move the input buffer. Reused from one
     * request to the next; req_owned says the copy holds this request. */
    char *req_copy;
    size_t req_copy_cap;
    bool req_owned;
    bool read_paused; /* reading stopped while a request is handled (too much piled up) */
    bool peer_done;   /* the client half-closed while its request was handled */
    bool sent_continue;
    bool close_after_write;
    bool linger; /* after an early error: drain input before closing */
    bool idle;   /* waiting between requests on the idle timeout */
    h2o_timeout_entry_t timeout;
    char peer[INET6_ADDRSTRLEN];
    struct ip_conns *ipc; /* its address's connection count */
    char *out;
    size_t out_len, out_cap;
    bool out_failed; /* an append found no memory: `out` is not the whole response */
    /* streaming: `out` is being written while `pend` collects what comes next */
    char *pend;
    size_t pend_len, pend_cap;
    bool writing, stream_ended;
    /* an HTTP/1.0 client: the stream goes out unframed and closing the connection ends
     * it (such a client does not know chunked coding, RFC 9112 6.1) */
    bool stream_unframed;
    tly_stream_cb_t stream;
    struct ws *ws; /* ST_WEBSOCKET: the wslay side, ws.c */
};

/* Drops the request being handled from the input, if dispatch did not (a WebSocket
 * handshake's bytes, before its frames). */
void http_conn_drop_request(conn_t *c);
void http_on_read(h2o_socket_t *sock, const char *err);
/* Tells the application a response started (logs, metrics). */
void http_notify_response(conn_t *c, int status);
void http_conn_close(conn_t *c);
void http_conn_free(conn_t *c);
/* Swaps the pending output in and writes it, one write in flight at a time. */
void http_stream_flush(conn_t *c);
int http_pend_append(conn_t *c, const char *s, size_t n);
const char *http_date(void);
/* Whether any `name` header lists `token` (comma-separated, ASCII case-insensitive). */
bool http_req_has_token(tly_req_t *req, const char *name, const char *token);
/* How many `name` headers the request has. */
size_t http_req_header_count(tly_req_t *req, const char *name);
/* Ends a streamed or WebSocket connection whose last bytes are written: on_close runs
 * now, then the socket is half-closed and what the client still sends is read and
 * dropped until it closes too (at most 2 s): closing with unread input would make the
 * kernel send a reset that can destroy those last bytes (a close frame) unread. */
void http_conn_linger(conn_t *c);
/* The loop the connection runs on (for its timers). */
tly_loop_t *http_conn_loop(conn_t *c);
/* ws.c: the connection's reads and completed writes while in ST_WEBSOCKET */
void http_ws_on_read(conn_t *c);
void http_ws_on_written(conn_t *c);
void http_ws_free(conn_t *c);
/* tly_req_stream_abort of a WebSocket: closes now, or, inside on_text, once wslay returns. */
void http_ws_abort(conn_t *c);

#endif
