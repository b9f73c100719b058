/*
 * ws.c: WebSocket connections. The handshake is ours; framing, masking rules, UTF-8
 * checks, size limits, ping/pong and the closing handshake are libwslay's. wslay reads
 * from the socket's input buffer and writes into the connection's pending output, so it
 * shares the one-write-in-flight discipline of streamed responses.
 */
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>
#include <wslay/wslay.h>

#include "base/base.h"
#include "http/http_int.h"

struct ws {
    wslay_event_context_ptr ctx;
    tly_ws_cb_t cb;
    bool closed; /* on_close already ran */
};

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
    conn_t *c = user;
    h2o_buffer_t *in = c->sock->input;
    if (in->size == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = in->size < len ? in->size : len;
    memcpy(buf, in->bytes, n);
    h2o_buffer_consume(&c->sock->input, n);
    return (ssize_t)n;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags, void *user)
{
    conn_t *c = user;
    /* keep at most one frame's worth beyond what is on the wire: the application
     * offers messages only when the socket drained, so this bound is rarely reached */
    if (c->pend_len > (1u << 20)) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (http_pend_append(c, (const char *)data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static void ws_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg, void *user)
{
    conn_t *c = user;
    if (arg->opcode == WSLAY_TEXT_FRAME && c->ws->cb.on_text != NULL)
        c->ws->cb.on_text(&c->req, (const char *)arg->msg, arg->msg_length, c->ws->cb.arg);
    else if (arg->opcode == WSLAY_BINARY_FRAME)
        wslay_event_queue_close(ctx, WSLAY_CODE_UNSUPPORTED_DATA, (const uint8_t *)"text only", 9);
}

/* Moves what wslay queued to the socket, and closes once both sides are done. */
static void ws_pump(conn_t *c)
{
    struct ws *ws = c->ws;
    if (wslay_event_send(ws->ctx) != 0) {
        http_conn_close(c);
        return;
    }
    http_stream_flush(c);
    if (!c->writing && !wslay_event_want_write(ws->ctx) && !wslay_event_get_read_enabled(ws->ctx))
        http_conn_close(c);
}

void http_ws_on_read(conn_t *c)
{
    if (wslay_event_recv(c->ws->ctx) != 0) {
        http_conn_close(c);
        return;
    }
    ws_pump(c);
}

void http_ws_on_written(conn_t *c)
{
    struct ws *ws = c->ws;
    if (c->pend_len > 0 || wslay_event_want_write(ws->ctx)) {
        ws_pump(c);
        return;
    }
    if (!wslay_event_get_write_enabled(ws->ctx) || !wslay_event_get_read_enabled(ws->ctx)) {
        /* close frame sent (or the peer's received and answered): done */
        http_conn_close(c);
        return;
    }
    if (ws->cb.on_drain != NULL)
        ws->cb.on_drain(&c->req, ws->cb.arg);
}

void http_ws_free(conn_t *c)
{
    if (c->ws == NULL)
        return;
    wslay_event_context_free(c->ws->ctx);
    tly_free(c->ws);
    c->ws = NULL;
}

bool tly_req_wants_websocket(tly_req_t *req)
{
    tly_str_t up = tly_req_header(req, "upgrade");
    return up.ptr != NULL && tly_str_ieq(up, "websocket");
}

static size_t render_plain_error(conn_t *c, int status, const char *code, const char *msg)
{
    char body[256];
    int n = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}", code, msg);
    tly_req_respond(&c->req, status, "application/json; charset=utf-8", body, (size_t)n);
    return 0;
}

int tly_req_ws_accept(tly_req_t *req, const tly_ws_cb_t *cb)
{
    conn_t *c = req->conn;
    tly_str_t key = tly_req_header(req, "sec-websocket-key");
    tly_str_t version = tly_req_header(req, "sec-websocket-version");
    if (tly_req_method(req) != TLY_M_GET || key.ptr == NULL || key.len != 24 || version.ptr == NULL ||
        !tly_str_eq(version, "13")) {
        tly_req_add_header(req, "Sec-WebSocket-Version", "13");
        render_plain_error(c, 400, "BAD_REQUEST", "a WebSocket upgrade needs GET, Sec-WebSocket-Key and version 13");
        return TLY_EINVAL;
    }
    /* Sec-WebSocket-Accept = base64(SHA-1(key + GUID)), RFC 6455 section 4.2.2 */
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char concat[24 + sizeof(guid)];
    memcpy(concat, key.ptr, 24);
    memcpy(concat + 24, guid, sizeof(guid) - 1);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)concat, 24 + sizeof(guid) - 1, digest);
    char accept[32];
    EVP_EncodeBlock((unsigned char *)accept, digest, SHA_DIGEST_LENGTH);

    struct ws *ws = tly_calloc(1, sizeof(*ws));
    struct wslay_event_callbacks callbacks = {
        .recv_callback = ws_recv, .send_callback = ws_send, .on_msg_recv_callback = ws_on_msg};
    if (ws == NULL || wslay_event_context_server_init(&ws->ctx, &callbacks, c) != 0) {
        tly_free(ws);
        tly_req_add_header(req, "Retry-After", "1");
        render_plain_error(c, 503, "UNAVAILABLE", "out of memory");
        return TLY_ENOMEM;
    }
    wslay_event_config_set_max_recv_msg_length(ws->ctx, cb->max_message ? cb->max_message : 4096);
    ws->cb = *cb;
    c->ws = ws;
    c->stream.on_close = cb->on_close;
    c->stream.on_drain = NULL;
    c->stream.arg = cb->arg;
    c->out_len = c->pend_len = 0;
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\nDate: %s\r\n\r\n",
                     accept, http_date());
    http_pend_append(c, head, (size_t)n);
    /* the request's strings live in the input buffer that wslay now consumes */
    size_t consumed = c->head_len;
    req->nheaders = 0;
    req->body = (tly_str_t){"", 0};
    req->path = req->query = (tly_str_t){"", 0};
    h2o_buffer_consume(&c->sock->input, consumed > c->sock->input->size ? c->sock->input->size : consumed);
    c->state = ST_WEBSOCKET;
    http_notify_response(c, 101);
    h2o_socket_read_start(c->sock, http_on_read);
    http_stream_flush(c);
    /* frames may have arrived with the handshake */
    if (c->sock->input->size > 0)
        http_ws_on_read(c);
    return 0;
}

int tly_ws_send_text(tly_req_t *req, const char *data, size_t len)
{
    conn_t *c = req->conn;
    if (c->ws == NULL || c->sock == NULL)
        return TLY_ESTATE;
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)data, len};
    int rc = wslay_event_queue_msg(c->ws->ctx, &msg);
    if (rc == WSLAY_ERR_NOMEM)
        return TLY_ENOMEM;
    if (rc != 0)
        return TLY_ESTATE;
    if (!c->writing)
        ws_pump(c);
    return 0;
}

size_t tly_ws_pending(tly_req_t *req)
{
    conn_t *c = req->conn;
    if (c->ws == NULL)
        return 0;
    return c->pend_len + (c->writing ? c->out_len : 0) + (wslay_event_want_write(c->ws->ctx) ? 1 : 0);
}

int tly_ws_ping(tly_req_t *req)
{
    conn_t *c = req->conn;
    if (c->ws == NULL || c->sock == NULL)
        return TLY_ESTATE;
    struct wslay_event_msg msg = {WSLAY_PING, (const uint8_t *)"", 0};
    if (wslay_event_queue_msg(c->ws->ctx, &msg) != 0)
        return TLY_ESTATE;
    if (!c->writing)
        ws_pump(c);
    return 0;
}

void tly_ws_close(tly_req_t *req, uint16_t code, const char *reason)
{
    conn_t *c = req->conn;
    if (c->ws == NULL || c->sock == NULL)
        return;
    wslay_event_queue_close(c->ws->ctx, code, (const uint8_t *)reason, reason ? strlen(reason) : 0);
    if (!c->writing)
        ws_pump(c);
}
