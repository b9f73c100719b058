// Hand-written live-results clients for the tests (and bench/live.mjs): Server-Sent Events
// and WebSocket (RFC 6455) over node:net, so that these tests need no npm package and can
// write any frame they like, including broken ones. Only 127.0.0.1 is ever contacted.
//
//   const s = await openSse(server, `/v1/polls/${id}/live`, { token, lastEventId });
//   s.status, s.headers, s.json (the body when the answer is not 200)
//   const ev = await s.next(1000);            // {event, id, data, json, t} or null
//   const ev = await s.waitFor((e) => e.json?.total_votes === 3, 2000, 'three votes');
//   await s.waitClosed(2000); s.ended (chunked stream finished), s.closed
//
//   const w = await openWs(server, `/v1/polls/${id}/ws`, { token });
//   w.status (101 on success), w.headers, w.json (the body when refused)
//   const m = await w.next(1000);             // {type:'text', data, json, t} or null
//   w.sendJson({type:'ping'}); w.sendFrame({opcode: 1, payload, mask: false});
//   const { code, reason } = await w.waitClosed(2000);
//
// Times (`t`) are process.hrtime milliseconds (CLOCK_MONOTONIC: comparable between the
// processes of one machine).
import crypto from 'node:crypto';
import net from 'node:net';

export const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

function portOf(server) {
  return typeof server === 'number' ? server : server.port;
}

function requestHead(port, path, headers, version = '1.1') {
  let head = `GET ${path} HTTP/${version}\r\n`;
  if (!Object.keys(headers).some((k) => k.toLowerCase() === 'host')) head += `Host: 127.0.0.1:${port}\r\n`;
  for (const [k, v] of Object.entries(headers)) if (v !== undefined && v !== null) head += `${k}: ${v}\r\n`;
  return head + '\r\n';
}

function parseHead(buf) {
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return null;
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
  const headers = {};
  for (const line of lines.slice(1)) {
    const i = line.indexOf(':');
    if (i < 0) continue;
    const k = line.slice(0, i).trim().toLowerCase();
    const v = line.slice(i + 1).trim();
    headers[k] = k in headers ? `${headers[k]}, ${v}` : v;
  }
  return { status: m ? Number(m[1]) : -1, statusLine: lines[0], headers, rest: buf.subarray(end + 4) };
}

function tryJson(s) {
  try { return JSON.parse(s); } catch { return null; }
}

/** An ordered queue of received items with a read cursor and timed waits. */
class Inbox {
  constructor() {
    this.items = [];
    this.cursor = 0;
    this.waiters = new Set();
    this.closed = false;
  }
  push(item) {
    this.items.push(item);
    this._wake();
  }
  _wake() {
    for (const w of [...this.waiters]) w();
  }
  /** The next item after the cursor, or null after `ms` (or when the source closed). */
  next(ms = 2000) {
    return this.waitFor(() => true, ms, null, true);
  }
  /**
   * The first item after the cursor that matches pred (the cursor moves past it). On
   * timeout: null when soft, else an error naming `what` and what did arrive.
   */
  waitFor(pred, ms = 2000, what = 'a matching message', soft = false) {
    return new Promise((resolve, reject) => {
      let timer = null;
      const check = () => {
        while (this.cursor < this.items.length) {
          const it = this.items[this.cursor++];
          if (pred(it)) { done(); resolve(it); return true; }
        }
        if (this.closed) {
          done();
          if (soft) resolve(null);
          else reject(new Error(`connection closed before ${what}; received: ${this.describe()}`));
          return true;
        }
        return false;
      };
      const done = () => { clearTimeout(timer); this.waiters.delete(check); };
      if (check()) return;
      this.waiters.add(check);
      timer = setTimeout(() => {
        done();
        if (soft) resolve(null);
        else reject(new Error(`no ${what} within ${ms} ms; received: ${this.describe()}`));
      }, ms);
    });
  }
  /** Items after the cursor (marks them read). */
  drain() {
    const out = this.items.slice(this.cursor);
    this.cursor = this.items.length;
    return out;
  }
  describe(n = 6) {
    const tail = this.items.slice(-n).map((it) => JSON.stringify(it.event ? { event: it.event, id: it.id, data: it.data } : it.data ?? it)
      .slice(0, 300));
    return `${this.items.length} item(s)${this.items.length > n ? ', the last ' + n : ''}: ${tail.join(' | ')}`;
  }
}

class Conn {
  constructor(sock) {
    this.sock = sock;
    this.inbox = new Inbox();
    this.status = null;
    this.headers = {};
    this.json = null;
    this.body = '';
    this.closed = false;
    this.error = null;
    this._closeWaiters = [];
  }
  get events() { return this.inbox.items; }
  next(ms) { return this.inbox.next(ms); }
  waitFor(pred, ms, what) { return this.inbox.waitFor(pred, ms, what); }
  drain() { return this.inbox.drain(); }
  _onClose() {
    this.closed = true;
    this.inbox.closed = true;
    this.inbox._wake();
    for (const r of this._closeWaiters.splice(0)) r(true);
  }
  /** Resolves true when the server closed the connection, false after ms. */
  waitClosed(ms = 2000) {
    if (this.closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => { this._closeWaiters = this._closeWaiters.filter((r) => r !== done); resolve(false); }, ms);
      const done = (v) => { clearTimeout(t); resolve(v); };
      this._closeWaiters.push(done);
    });
  }
  close() {
    this.sock.destroy();
  }
}

// ---------------------------------------------------------------------------------------
// Server-Sent Events

export class SseConn extends Conn {
  constructor(sock) {
    super(sock);
    this.ended = false;    // the chunked body finished (0\r\n\r\n)
    this.retry = [];       // retry: values in order
    this.comments = [];    // {text, t} for ":" lines (pings)
    this.raw = '';         // the decoded body text (first 64 KiB), for assertions
    this._buf = Buffer.alloc(0);
    this._text = '';
    this._ev = { event: '', data: [], id: null };
    this.lastId = null;
  }
  _feedBody(t) {
    // chunked transfer coding
    for (;;) {
      const le = this._buf.indexOf('\r\n');
      if (le < 0) return;
      const size = parseInt(this._buf.subarray(0, le).toString('latin1'), 16);
      if (Number.isNaN(size)) { this.error = 'bad chunk size'; this.sock.destroy(); return; }
      if (size === 0) {
        this.ended = true;
        this._buf = this._buf.subarray(le + 2);
        return;
      }
      if (this._buf.length < le + 2 + size + 2) return;
      const chunk = this._buf.subarray(le + 2, le + 2 + size).toString('utf8');
      this._buf = this._buf.subarray(le + 2 + size + 2);
      if (this.raw.length < 65536) this.raw += chunk;
      this._feedText(chunk, t);
    }
  }
  _feedText(s, t) {
    this._text += s;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this._text);
      if (!m) return;
      // a lone \r at the end may be the first half of \r\n
      if (m[0] === '\r' && m.index === this._text.length - 1) return;
      const line = this._text.slice(0, m.index);
      this._text = this._text.slice(m.index + m[0].length);
      this._line(line, t);
    }
  }
  _line(line, t) {
    const ev = this._ev;
    if (line === '') {
      if (ev.data.length > 0) {
        const data = ev.data.join('\n');
        this.inbox.push({ event: ev.event || 'message', id: ev.id, data, json: tryJson(data), t });
      }
      this._ev = { event: '', data: [], id: null };
      return;
    }
    if (line[0] === ':') { this.comments.push({ text: line.slice(1).trim(), t }); return; }
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'event') ev.event = value;
    else if (field === 'data') ev.data.push(value);
    else if (field === 'id') { ev.id = value; this.lastId = value; }
    else if (field === 'retry') this.retry.push(Number(value));
  }
}

/**
 * Opens GET `path` as an event stream. Resolves once the response head arrived (or the
 * connection failed): check `.status`. Non-200 answers are read whole into .body/.json.
 * opts: { token, lastEventId, headers, timeout }
 */
export function openSse(server, path, opts = {}) {
  const port = portOf(server);
  const headers = { Accept: 'text/event-stream', ...(opts.headers || {}) };
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  if (opts.lastEventId !== undefined) headers['Last-Event-ID'] = opts.lastEventId;
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const c = new SseConn(sock);
    let head = null;
    let pre = Buffer.alloc(0);
    let settled = false;
    const settle = () => { if (!settled) { settled = true; clearTimeout(timer); resolve(c); } };
    const timer = setTimeout(() => { c.error = c.error || 'timeout waiting for the response head'; sock.destroy(); settle(); },
      opts.timeout ?? 10_000);
    sock.setNoDelay(true);
    sock.on('connect', () => sock.write(requestHead(port, path, headers)));
    sock.on('data', (d) => {
      const t = nowMs();
      if (!head) {
        pre = Buffer.concat([pre, d]);
        head = parseHead(pre);
        if (!head) return;
        c.status = head.status;
        c.headers = head.headers;
        if (c.status !== 200) {
          pre = head.rest;
          const n = Number(c.headers['content-length'] ?? -1);
          if (n >= 0 && pre.length >= n) {
            c.body = pre.subarray(0, n).toString('utf8');
            c.json = tryJson(c.body);
            settle();
            sock.destroy();
          }
          return;
        }
        c._buf = head.rest;
        c._feedBody(t);
        settle();
        return;
      }
      if (c.status !== 200) {
        pre = Buffer.concat([pre, d]);
        const n = Number(c.headers['content-length'] ?? -1);
        if (n >= 0 && pre.length >= n) {
          c.body = pre.subarray(0, n).toString('utf8');
          c.json = tryJson(c.body);
          settle();
          sock.destroy();
        }
        return;
      }
      c._buf = c._buf.length ? Buffer.concat([c._buf, d]) : d;
      c._feedBody(t);
    });
    sock.on('error', (e) => { c.error = e.code || e.message; });
    sock.on('close', () => {
      if (head && c.status !== 200 && !c.body) { c.body = pre.toString('utf8'); c.json = tryJson(c.body); }
      c._onClose();
      settle();
    });
  });
}

// ---------------------------------------------------------------------------------------
// WebSocket

export const OP = { CONT: 0, TEXT: 1, BINARY: 2, CLOSE: 8, PING: 9, PONG: 10 };

/**
 * One frame as bytes. mask: true (a random key), false (unmasked), or a 4-byte Buffer.
 * len: override the length field (to lie about it).
 */
export function encodeFrame({ opcode = OP.TEXT, payload = Buffer.alloc(0), fin = true, mask = true, rsv = 0 } = {}) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(payload, 'utf8');
  const n = body.length;
  const key = mask === true ? crypto.randomBytes(4) : Buffer.isBuffer(mask) ? mask : null;
  let head;
  if (n < 126) {
    head = Buffer.alloc(2);
    head[1] = n;
  } else if (n < 65536) {
    head = Buffer.alloc(4);
    head[1] = 126;
    head.writeUInt16BE(n, 2);
  } else {
    head = Buffer.alloc(10);
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(n), 2);
  }
  head[0] = (fin ? 0x80 : 0) | ((rsv & 7) << 4) | (opcode & 0x0f);
  if (!key) return Buffer.concat([head, body]);
  head[1] |= 0x80;
  const masked = Buffer.alloc(n);
  for (let i = 0; i < n; i++) masked[i] = body[i] ^ key[i & 3];
  return Buffer.concat([head, key, masked]);
}

export function closePayload(code, reason = '') {
  const b = Buffer.alloc(2 + Buffer.byteLength(reason));
  b.writeUInt16BE(code, 0);
  b.write(reason, 2);
  return b;
}

export class WsConn extends Conn {
  constructor(sock) {
    super(sock);
    this.closeCode = null;   // from the server's close frame (1005 when it had none)
    this.closeReason = null;
    this.pings = [];         // server pings, {payload, t}
    this.pongs = [];         // pong frames received
    this.maskedFrames = 0;   // frames the server masked (it must not)
    this.badFrames = [];     // protocol violations seen in the server's frames
    this.autoPong = true;
    this._buf = Buffer.alloc(0);
    this._frag = null;
  }
  sendRaw(buf) { if (!this.sock.destroyed) this.sock.write(buf); }
  sendFrame(f) { this.sendRaw(encodeFrame(f)); }
  sendText(s) { this.sendFrame({ opcode: OP.TEXT, payload: s }); }
  sendJson(o) { this.sendText(JSON.stringify(o)); }
  sendClose(code = 1000, reason = '') { this.sendFrame({ opcode: OP.CLOSE, payload: closePayload(code, reason) }); }
  /** Resolves {code, reason, closed} once the server closed the TCP connection (or after ms). */
  async waitClosed(ms = 2000) {
    const closed = await super.waitClosed(ms);
    return { code: this.closeCode, reason: this.closeReason, closed };
  }
  _feed(t) {
    for (;;) {
      const b = this._buf;
      if (b.length < 2) return;
      const fin = (b[0] & 0x80) !== 0;
      const rsv = (b[0] >> 4) & 7;
      const opcode = b[0] & 0x0f;
      const masked = (b[1] & 0x80) !== 0;
      let len = b[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (b.length < 4) return;
        len = b.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (b.length < 10) return;
        len = Number(b.readBigUInt64BE(2));
        off = 10;
      }
      let key = null;
      if (masked) {
        if (b.length < off + 4) return;
        key = b.subarray(off, off + 4);
        off += 4;
      }
      if (b.length < off + len) return;
      let payload = Buffer.from(b.subarray(off, off + len));
      this._buf = b.subarray(off + len);
      if (masked) {
        this.maskedFrames++;
        for (let i = 0; i < payload.length; i++) payload[i] ^= key[i & 3];
      }
      if (rsv) this.badFrames.push(`rsv bits ${rsv}`);
      this._frame({ fin, opcode, payload }, t);
    }
  }
  _frame({ fin, opcode, payload }, t) {
    if (opcode === OP.PING) {
      this.pings.push({ payload, t });
      if (this.autoPong) this.sendFrame({ opcode: OP.PONG, payload });
      return;
    }
    if (opcode === OP.PONG) { this.pongs.push({ payload, t }); return; }
    if (opcode === OP.CLOSE) {
      if (this.closeCode === null) {
        this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this.closeReason = payload.length > 2 ? payload.subarray(2).toString('utf8') : '';
        this.inbox.push({ type: 'close', code: this.closeCode, reason: this.closeReason, t });
      }
      return;
    }
    if (opcode === OP.CONT) {
      if (!this._frag) { this.badFrames.push('continuation without a start'); return; }
      this._frag.parts.push(payload);
    } else {
      if (this._frag) this.badFrames.push('new data frame inside a fragmented message');
      this._frag = { opcode, parts: [payload] };
    }
    if (!fin) return;
    const whole = Buffer.concat(this._frag.parts);
    const op = this._frag.opcode;
    this._frag = null;
    if (op === OP.TEXT) {
      const data = whole.toString('utf8');
      this.inbox.push({ type: 'text', data, json: tryJson(data), t });
    } else {
      this.inbox.push({ type: 'binary', data: whole, t });
    }
  }
}

/**
 * Opens a WebSocket on `path`. Resolves after the handshake answer: `.status` is 101 on
 * success (then Sec-WebSocket-Accept is checked: `.acceptOk`), else the answer's body is
 * in .body/.json. opts: { token, headers (override/remove handshake headers with null;
 * Host: null sends none), timeout, key, httpVersion ('1.1'), extra (bytes sent in the
 * same write as the handshake: a body, frames) }
 */
export function openWs(server, path, opts = {}) {
  const port = portOf(server);
  const key = opts.key ?? crypto.randomBytes(16).toString('base64');
  const headers = {
    Upgrade: 'websocket', Connection: 'Upgrade', 'Sec-WebSocket-Key': key, 'Sec-WebSocket-Version': '13',
  };
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  for (const [k, v] of Object.entries(opts.headers || {})) {
    for (const existing of Object.keys(headers)) if (existing.toLowerCase() === k.toLowerCase()) delete headers[existing];
    if (v !== null || k.toLowerCase() === 'host') headers[k] = v; // a null Host: none is sent
  }
  const expectAccept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const c = new WsConn(sock);
    let head = null;
    let pre = Buffer.alloc(0);
    let settled = false;
    const settle = () => { if (!settled) { settled = true; clearTimeout(timer); resolve(c); } };
    const timer = setTimeout(() => { c.error = c.error || 'timeout waiting for the handshake answer'; sock.destroy(); settle(); },
      opts.timeout ?? 10_000);
    sock.setNoDelay(true);
    sock.on('connect', () => {
      const hs = Buffer.from(requestHead(port, path, headers, opts.httpVersion), 'latin1');
      sock.write(opts.extra ? Buffer.concat([hs, Buffer.from(opts.extra)]) : hs);
    });
    sock.on('data', (d) => {
      const t = nowMs();
      if (head && c.status === 101) {
        c._buf = c._buf.length ? Buffer.concat([c._buf, d]) : d;
        c._feed(t);
        return;
      }
      pre = Buffer.concat([pre, d]);
      if (!head) {
        head = parseHead(pre);
        if (!head) return;
        c.status = head.status;
        c.headers = head.headers;
        if (c.status === 101) {
          c.acceptOk = c.headers['sec-websocket-accept'] === expectAccept;
          c._buf = head.rest;
          settle();
          c._feed(t);
          return;
        }
        pre = head.rest;
      }
      const n = Number(c.headers['content-length'] ?? -1);
      if (n >= 0 && pre.length >= n) {
        c.body = pre.subarray(0, n).toString('utf8');
        c.json = tryJson(c.body);
        settle();
        sock.destroy();
      }
    });
    sock.on('error', (e) => { c.error = e.code || e.message; });
    sock.on('close', () => {
      if (head && c.status !== 101 && !c.body) { c.body = pre.toString('utf8'); c.json = tryJson(c.body); }
      c._onClose();
      settle();
    });
  });
}

/** The results messages of a connection (SSE `results` events or WS `results` messages), as objects. */
export function resultsOf(conn, items = conn.events) {
  if (conn instanceof WsConn) {
    return items.filter((m) => m.type === 'text' && m.json?.type === 'results')
      .map((m) => ({ seq: m.json.seq, data: m.json.data, t: m.t }));
  }
  return items.filter((e) => e.event === 'results').map((e) => ({ seq: Number(e.id), data: e.json, t: e.t }));
}

/** Waits for the next results message (either transport) matching pred(data). */
export async function waitResults(conn, pred, ms, what = 'a matching results message') {
  const isWs = conn instanceof WsConn;
  const m = await conn.waitFor((it) => (isWs
    ? it.type === 'text' && it.json?.type === 'results' && pred(it.json.data)
    : it.event === 'results' && it.json && pred(it.json)), ms, what);
  return isWs ? { seq: m.json.seq, data: m.json.data, t: m.t } : { seq: Number(m.id), data: m.json, t: m.t };
}

/** The next message of either transport, normalised to {kind, seq, data, t}, or null. */
export async function nextMessage(conn, ms) {
  const m = await conn.next(ms);
  if (!m) return null;
  if (conn instanceof WsConn) {
    if (m.type === 'close') return { kind: 'close', code: m.code, t: m.t };
    return { kind: m.json?.type ?? m.type, seq: m.json?.seq, data: m.json?.data, raw: m.data, t: m.t };
  }
  return { kind: m.event, seq: m.id === null ? undefined : Number(m.id), data: m.json, raw: m.data, t: m.t };
}
