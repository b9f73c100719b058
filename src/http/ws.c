/*
 * ws.c: WebSocket connections. The handshake is ours; framing, masking rules, UTF-8
 * checks, size limits, ping/pong and the closing handshake are libwslay's. wslay reads
 * from the socket's input buffer and writes into the connection's pending output, so it
 * shares the one-write-in-flight discipline of streamed responses.
 *
 * Three rules keep the connection's owner safe and its memory bounded:
 *
 *   - Frames are only ever processed from the loop (a socket read, or the connection's
 *     own zero-delay timer), never inside a call of the owner's: not in
 *     tly_req_ws_accept (frames that came with the handshake wait for the next loop
 *     turn), not in tly_ws_send_text. So on_close never runs inside such a call, and an
 *     owner may keep using its state after it returns.
 *   - Input is read only while less than WS_OUT_MAX bytes of output wait for the peer:
 *     every ping is answered by a pong, every text message by a reply, so a peer that
 *     sends without reading would otherwise make us queue replies without end. Past the
 *     bound the socket is not read until the peer has taken what is queued (TCP then
 *     stops the peer); what was already read waits in the input buffer.
 *   - wslay sees each frame header before its payload, and each control frame whole:
 *     ws_recv hands it the input one frame at a time and checks what wslay 1.1.1 does
 *     not answer the way RFC 6455 asks (see frame_check).
 */
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>
#include <wslay/wslay.h>

#include "base/base.h"
#include "http/http_int.h"

/* The output a connection may hold beyond what is on the wire before it stops reading. */
#define WS_OUT_MAX (64u * 1024)

struct ws {
    wslay_event_context_ptr ctx;
    conn_t *conn;
    tly_ws_cb_t cb;
    tly_timer_t later;   /* ws_later on the next loop turn; never re-armed from ws_later */
    uint64_t frame_left; /* bytes of the current frame not yet handed to wslay */
    size_t max_message;
    uint16_t fail_code; /* ws_recv found a frame to refuse: fail with this close code */
    bool in_recv;       /* inside wslay_event_recv: callbacks queue, ws_read writes after */
    bool paused;        /* input not read: WS_OUT_MAX of output waits for the peer */
    bool failing;       /* our own close frame is queued raw; nothing else is sent */
    bool broken;        /* wslay could not write (no memory): end at the next turn */
};

static size_t ws_out_bytes(conn_t *c)
{
    return c->pend_len + (c->writing ? c->out_len : 0) + wslay_event_get_queued_msg_length(c->ws->ctx);
}

/*
 * Looks at the frame header at the start of `b`. Returns 1 and the whole frame's size in
 * *size when ws_recv may hand it over, 0 when more input is needed first, or minus the
 * close code to refuse it with: 1009 for a data frame whose payload alone is over
 * max_payload (wslay would wait for the first payload byte to say so), 1002 for a frame
 * RFC 6455 forbids that wslay mishandles. wslay 1.1.1 refuses those frames (a control frame
 * that is fragmented or over 125 bytes, an extended length that is not minimal or has
 * its top bit set) by dropping the TCP connection without a close frame, and answers a
 * close frame of 1 byte with a normal close; RFC 6455 asks for 1002 in each case
 * (5.5, 5.2, 5.5.1, 7.1.7). A control frame is handed over whole, so that wslay sees its
 * payload in one piece: it validates the UTF-8 of a close reason per piece, from the
 * third byte of each.
 */
static int frame_check(const uint8_t *b, size_t avail, uint64_t max_payload, uint64_t *size)
{
    if (avail < 2)
        return 0;
    bool fin = (b[0] & 0x80) != 0, masked = (b[1] & 0x80) != 0;
    unsigned opcode = b[0] & 0x0f, len7 = b[1] & 0x7f;
    size_t head = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + (masked ? 4 : 0);
    if (opcode & 0x8) {
        if (!fin || len7 > 125 || (opcode == WSLAY_CONNECTION_CLOSE && len7 == 1))
            return -WSLAY_CODE_PROTOCOL_ERROR;
        if (avail < head + len7)
            return 0;
        *size = head + len7;
        return 1;
    }
    if (avail < head)
        return 0;
    uint64_t len = len7;
    if (len7 == 126) {
        len = (uint64_t)b[2] << 8 | b[3];
        if (len < 126)
            return -WSLAY_CODE_PROTOCOL_ERROR;
    } else if (len7 == 127) {
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | b[2 + i];
        if (len < 65536 || (len >> 63) != 0)
            return -WSLAY_CODE_PROTOCOL_ERROR;
    }
    if (len > max_payload)
        return -WSLAY_CODE_MESSAGE_TOO_BIG;
    *size = head + len;
    return 1;
}

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
    conn_t *c = user;
    struct ws *ws = c->ws;
    h2o_buffer_t *in = c->sock->input;
    if (ws->fail_code != 0 || in->size == 0)
        goto would_block;
    if (ws_out_bytes(c) >= WS_OUT_MAX) {
        ws->paused = true;
        goto would_block;
    }
    if (ws->frame_left == 0) {
        int rc = frame_check((const uint8_t *)in->bytes, in->size, ws->max_message, &ws->frame_left);
        if (rc < 0)
            ws->fail_code = (uint16_t)-rc;
        if (rc <= 0)
            goto would_block;
    }
    size_t n = in->size < len ? in->size : len;
    if (n > ws->frame_left)
        n = (size_t)ws->frame_left;
    memcpy(buf, in->bytes, n);
    h2o_buffer_consume(&c->sock->input, n);
    ws->frame_left -= n;
    return (ssize_t)n;
would_block:
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
}

/* Takes every frame whole: ws_fail may then append a frame of its own to what is pending,
 * and the bound on output is kept by not reading (ws_recv), not by refusing to write. */
static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags, void *user)
{
    conn_t *c = user;
    if (http_pend_append(c, (const char *)data, len) != 0) {
        c->ws->broken = true;
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

/* Fails the connection (RFC 6455 7.1.7) with a close frame of our own, written after what
 * is pending (whole frames only, see ws_send); wslay writes nothing more. */
static void ws_fail(conn_t *c, uint16_t code)
{
    struct ws *ws = c->ws;
    const char frame[4] = {(char)0x88, 2, (char)(code >> 8), (char)(code & 0xff)};
    wslay_event_shutdown_read(ws->ctx);
    wslay_event_shutdown_write(ws->ctx);
    ws->failing = true;
    if (http_pend_append(c, frame, sizeof(frame)) != 0)
        ws->broken = true;
}

/* Both sides are done (close frames exchanged, or ours sent after a failure). */
static bool ws_done(conn_t *c)
{
    struct ws *ws = c->ws;
    return !wslay_event_want_write(ws->ctx) &&
           (!wslay_event_get_read_enabled(ws->ctx) || !wslay_event_get_write_enabled(ws->ctx));
}

/* Moves what wslay queued to the socket, and ends the connection once both sides are
 * done: after its last bytes are written, half-closed, draining the peer (linger).
 * Loop contexts only: it may free c. */
static void ws_settle(conn_t *c)
{
    struct ws *ws = c->ws;
    if (ws->broken || (!ws->failing && wslay_event_send(ws->ctx) != 0)) {
        http_conn_close(c);
        return;
    }
    http_stream_flush(c);
    if (!c->writing && ws_done(c))
        http_conn_linger(c);
}

/* Runs wslay over the buffered input, then writes what it queued. Loop contexts only
 * (a read, the timer): it may free c. */
static void ws_read(conn_t *c)
{
    struct ws *ws = c->ws;
    if (ws->failing || !wslay_event_get_read_enabled(ws->ctx)) {
        /* a close frame is queued or sent: what the peer sends now is dropped */
        h2o_buffer_consume(&c->sock->input, c->sock->input->size);
    } else if (!ws->broken) {
        ws->in_recv = true;
        wslay_event_set_error(ws->ctx, 0);
        int rc = wslay_event_recv(ws->ctx);
        ws->in_recv = false;
        if (rc == WSLAY_ERR_CALLBACK_FAILURE && !ws->broken) {
            /* wslay's parser refused a frame frame_check let through: still a 1002 */
            ws->fail_code = WSLAY_CODE_PROTOCOL_ERROR;
        } else if (rc != 0) {
            http_conn_close(c);
            return;
        }
        if (ws->fail_code != 0)
            ws_fail(c, ws->fail_code);
        else if (ws->paused)
            h2o_socket_read_stop(c->sock);
    }
    ws_settle(c);
}

static void ws_later(tly_timer_t *t)
{
    struct ws *ws = (struct ws *)((char *)t - offsetof(struct ws, later));
    ws_read(ws->conn);
}

/* From the owner's calls: writes what is queued if nothing is in flight, but leaves
 * ending the connection, or noticing that it must end, to the loop. */
static void ws_kick(conn_t *c)
{
    struct ws *ws = c->ws;
    if (ws->in_recv || c->writing)
        return; /* ws_read or the completed write moves it */
    if (!ws->failing && !ws->broken && wslay_event_send(ws->ctx) != 0)
        ws->broken = true;
    http_stream_flush(c);
    if (ws->broken || (!c->writing && ws_done(c)))
        tly_timer_start(http_conn_loop(c), &ws->later, 0, ws_later);
}

void http_ws_on_read(conn_t *c) { ws_read(c); }

void http_ws_on_written(conn_t *c)
{
    struct ws *ws = c->ws;
    if (c->pend_len > 0 || (!ws->failing && wslay_event_want_write(ws->ctx)) || ws->broken) {
        ws_settle(c);
        return;
    }
    if (ws_done(c)) {
        /* close frame sent (or the peer's received and answered): done */
        http_conn_linger(c);
        return;
    }
    if (ws->paused) {
        /* the peer took what we owed it: read again, starting with what is buffered */
        ws->paused = false;
        h2o_socket_read_start(c->sock, http_on_read);
        if (c->sock->input->size > 0)
            tly_timer_start(http_conn_loop(c), &ws->later, 0, ws_later);
    }
    if (ws->cb.on_drain != NULL)
        ws->cb.on_drain(&c->req, ws->cb.arg);
}

void http_ws_abort(conn_t *c)
{
    if (c->ws->in_recv) {
        c->ws->broken = true; /* inside on_text: c must outlive wslay_event_recv */
        return;
    }
    http_conn_close(c);
}

void http_ws_free(conn_t *c)
{
    if (c->ws == NULL)
        return;
    tly_timer_stop(&c->ws->later);
    wslay_event_context_free(c->ws->ctx);
    tly_free(c->ws);
    c->ws = NULL;
}

bool tly_req_wants_websocket(tly_req_t *req) { return http_req_has_token(req, "upgrade", "websocket"); }

static int refuse(tly_req_t *req, int status, const char *code, const char *msg)
{
    char body[256];
    int n = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}", code, msg);
    tly_req_respond(req, status, "application/json; charset=utf-8", body, (size_t)n);
    return status == 400 ? TLY_EINVAL : TLY_ENOMEM;
}

/* Sec-WebSocket-Key: base64 of 16 bytes (RFC 6455 4.2.1), so 22 digits and "==". */
static bool key_ok(tly_str_t key)
{
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (key.len != 24 || key.ptr[22] != '=' || key.ptr[23] != '=')
        return false;
    for (size_t i = 0; i < 22; i++)
        if (key.ptr[i] == '\0' || strchr(digits, key.ptr[i]) == NULL)
            return false;
    return true;
}

/* Why the request is not an RFC 6455 opening handshake (4.2.1), or NULL when it is. */
static const char *handshake_error(tly_req_t *req)
{
    conn_t *c = req->conn;
    if (tly_req_method(req) != TLY_M_GET)
        return "a WebSocket handshake is a GET";
    if (req->minor_version < 1)
        return "a WebSocket handshake needs HTTP/1.1";
    if (http_req_header_count(req, "host") == 0)
        return "a WebSocket handshake needs a Host header";
    if (!http_req_has_token(req, "connection", "upgrade"))
        return "a WebSocket handshake needs Connection: Upgrade";
    if (c->chunked || c->content_length > 0)
        return "a WebSocket handshake has no body";
    if (http_req_header_count(req, "sec-websocket-key") != 1 || !key_ok(tly_req_header(req, "sec-websocket-key")))
        return "a WebSocket handshake needs one Sec-WebSocket-Key of 16 bytes in base64";
    tly_str_t version = tly_req_header(req, "sec-websocket-version");
    if (http_req_header_count(req, "sec-websocket-version") != 1 || !tly_str_eq(version, "13"))
        return "this server speaks WebSocket version 13";
    return NULL;
}

int tly_req_ws_accept(tly_req_t *req, const tly_ws_cb_t *cb)
{
    conn_t *c = req->conn;
    /* bytes after a refused handshake are frames, not a next request */
    req->keepalive = false;
    if (c->sock == NULL)
        return refuse(req, 503, "UNAVAILABLE", "the client is gone");
    const char *why = handshake_error(req);
    if (why != NULL) {
        tly_req_add_header(req, "Sec-WebSocket-Version", "13");
        return refuse(req, 400, "BAD_REQUEST", why);
    }
    /* Sec-WebSocket-Accept = base64(SHA-1(key + GUID)), RFC 6455 section 4.2.2 */
    tly_str_t key = tly_req_header(req, "sec-websocket-key");
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
        return refuse(req, 503, "UNAVAILABLE", "out of memory");
    }
    ws->max_message = cb->max_message ? cb->max_message : 4096;
    wslay_event_config_set_max_recv_msg_length(ws->ctx, ws->max_message);
    ws->cb = *cb;
    ws->conn = c;
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
    if (http_pend_append(c, head, (size_t)n) != 0)
        ws->broken = true; /* ends at the next loop turn, as the owner is told by on_close */
    /* the request is done with: what follows it in the input is frames, for wslay (the
     * head left the input at dispatch unless it could not be copied) */
    req->nheaders = 0;
    req->body = (tly_str_t){"", 0};
    req->path = req->query = (tly_str_t){"", 0};
    http_conn_drop_request(c);
    c->state = ST_WEBSOCKET;
    http_notify_response(c, 101);
    h2o_socket_read_start(c->sock, http_on_read);
    http_stream_flush(c);
    /* frames that came with the handshake are read on the next loop turn, once the
     * owner has finished setting up */
    if (c->sock->input->size > 0 || ws->broken)
        tly_timer_start(http_conn_loop(c), &ws->later, 0, ws_later);
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
    ws_kick(c);
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
    ws_kick(c);
    return 0;
}

void tly_ws_close(tly_req_t *req, uint16_t code, const char *reason)
{
    conn_t *c = req->conn;
    if (c->ws == NULL || c->sock == NULL)
        return;
    wslay_event_queue_close(c->ws->ctx, code, (const uint8_t *)reason, reason ? strlen(reason) : 0);
    ws_kick(c);
}
