// WebSocket clients that break the rules on purpose, over raw sockets (issue 15, items
// 1, 2 and 8): frames that come in the same write as the handshake, handshakes that
// RFC 6455 section 4.2.1 refuses, frames section 5 forbids, and a client that floods
// pings without ever reading. Each must end in the answer the RFC names (400 before the
// upgrade, a 1002 close frame after it), with memory bounded and the server alive.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { startServer, createPoll, rand, rawRequest, api } from '../api/harness.mjs';
import { openWs, encodeFrame, closePayload, OP, nextMessage, waitResults } from './client.mjs';
import { subscribe, voteNew, wsPath } from './util.mjs';

let server, ownerTok, poll;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
  poll = await createPoll(server, ownerTok);
});
after(async () => { await server?.close(); });

const KEY = 'dGhlIHNhbXBsZSBub25jZQ==';
const handshake = (pollId, more = '') => `GET ${wsPath(pollId)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n` +
  `Connection: Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n${more}\r\n`;

/** Raw frame bytes for the cases encodeFrame cannot write (lying length fields). */
function rawFrame(b0, lenBytes, payload = Buffer.alloc(0)) {
  const key = Buffer.from([1, 2, 3, 4]);
  const masked = Buffer.from(payload.map((x, i) => x ^ key[i & 3]));
  return Buffer.concat([Buffer.from([b0]), Buffer.from(lenBytes), key, masked]);
}
const len16 = (n) => [0x80 | 126, n >> 8, n & 0xff];
const len64 = (n) => {
  const b = Buffer.alloc(9);
  b[0] = 0x80 | 127;
  b.writeBigUInt64BE(BigInt(n), 1);
  return [...b];
};

/** Frames a server must fail with 1002 (RFC 6455 sections 5.2, 5.4, 5.5, 5.5.1, 7.4.1). */
const BAD_FRAMES = {
  'the bytes "hello" (not a frame: a fragmented close with RSV bits)': Buffer.from('hello'),
  'a ping with a 126-byte payload': encodeFrame({ opcode: OP.PING, payload: Buffer.alloc(126, 0x61) }),
  'a ping with a 125-byte payload behind a 64-bit length': rawFrame(0x89, len64(125), Buffer.alloc(125)),
  'a fragmented ping': encodeFrame({ opcode: OP.PING, payload: 'x', fin: false }),
  'a fragmented close': encodeFrame({ opcode: OP.CLOSE, payload: closePayload(1000), fin: false }),
  'a close frame of 1 byte': encodeFrame({ opcode: OP.CLOSE, payload: Buffer.from([0x03]) }),
  'a close with code 1005 (may not be sent)': encodeFrame({ opcode: OP.CLOSE, payload: closePayload(1005) }),
  'a close with code 999': encodeFrame({ opcode: OP.CLOSE, payload: closePayload(999) }),
  'a text frame whose 16-bit length says 5': rawFrame(0x81, len16(5), Buffer.from('hello')),
  'a text frame whose 64-bit length says 300': rawFrame(0x81, len64(300), Buffer.alloc(300, 0x20)),
  'a text frame whose 64-bit length has the top bit set': rawFrame(0x81, len64((1n << 63n) + 1n), Buffer.from('x')),
  'a frame with reserved opcode 3': encodeFrame({ opcode: 3, payload: 'x' }),
  'a frame with reserved control opcode 0xB': encodeFrame({ opcode: 0xb, payload: 'x' }),
  'a text frame with RSV1 set (no extension was agreed)': encodeFrame({ opcode: OP.TEXT, payload: '{}', rsv: 4 }),
  'an unmasked text frame': encodeFrame({ opcode: OP.TEXT, payload: '{"type":"ping"}', mask: false }),
  'a continuation frame with nothing to continue': encodeFrame({ opcode: OP.CONT, payload: 'x' }),
  'a text frame inside a fragmented message': Buffer.concat([encodeFrame({ opcode: OP.TEXT, payload: '{"ty', fin: false }),
    encodeFrame({ opcode: OP.TEXT, payload: 'pe":"ping"}' })]),
};

/** Waits for the server's close frame and the end of the TCP connection. */
async function assertClosedWith(w, code, what) {
  const r = await w.waitClosed(3000);
  assert.equal(r.code, code, `${what}: expected a close frame with ${code}, got ${r.code} (${r.reason}); ` +
    `received: ${w.inbox.describe()}`);
  assert.ok(r.closed, `${what}: the server ends the TCP connection after its close frame`);
  assert.deepEqual(w.badFrames, [], `${what}: the server's frames are well formed`);
  const after = w.events.slice(w.events.findIndex((m) => m.type === 'close') + 1);
  assert.deepEqual(after, [], `${what}: nothing follows the close frame`);
}

async function assertAlive(what) {
  assert.equal(server._crashed, null, `${what}: the server is still running`);
  const h = await api(server, 'GET', '/healthz');
  assert.equal(h.status, 200, `${what}: /healthz`);
}

for (const [name, bytes] of Object.entries(BAD_FRAMES)) {
  test(`in the handshake's write: ${name} → 101, then close 1002; the server lives`, async () => {
    const w = await openWs(server, wsPath(poll.poll_id), { key: KEY, extra: bytes });
    assert.equal(w.status, 101, `the handshake itself is valid: ${w.status} ${w.body}`);
    await assertClosedWith(w, 1002, name);
    await assertAlive(name);
  });

  test(`after the first message: ${name} → close 1002`, async () => {
    const w = await subscribe(server, 'ws', poll.poll_id);
    assert.equal((await nextMessage(w, 1000))?.kind, 'results');
    w.sendRaw(bytes);
    await assertClosedWith(w, 1002, name);
    await assertAlive(name);
  });
}

test('frames that fill several reads: a ping sent a byte at a time is answered, a bad one still gets 1002', async () => {
  const w = await subscribe(server, 'ws', poll.poll_id);
  assert.equal((await nextMessage(w, 1000))?.kind, 'results');
  const ping = encodeFrame({ opcode: OP.PING, payload: 'slow' });
  for (const b of ping) {
    w.sendRaw(Buffer.from([b]));
    await new Promise((r) => setImmediate(r));
  }
  const t0 = Date.now();
  while (w.pongs.length === 0 && Date.now() - t0 < 2000) await new Promise((r) => setTimeout(r, 10));
  assert.equal(w.pongs.length, 1, 'one pong');
  assert.equal(w.pongs[0].payload.toString(), 'slow');
  const bad = encodeFrame({ opcode: OP.PING, payload: Buffer.alloc(126) });
  for (const b of bad.subarray(0, 2)) {
    w.sendRaw(Buffer.from([b]));
    await new Promise((r) => setImmediate(r));
  }
  await assertClosedWith(w, 1002, 'a bad ping header split over two reads');
});

// ---- the handshake: a body, and what RFC 6455 section 4.2.1 requires ----

for (const [name, more, body] of [
  ['Content-Length: 5 and "hello"', 'Content-Length: 5\r\n', 'hello'],
  ['a chunked body', 'Transfer-Encoding: chunked\r\n', '5\r\nhello\r\n0\r\n\r\n'],
  ['a chunked body with a ping frame after it', 'Transfer-Encoding: chunked\r\n',
    Buffer.concat([Buffer.from('0\r\n\r\n'), encodeFrame({ opcode: OP.PING, payload: 'x' })])],
]) {
  test(`a handshake with ${name} → 400 BAD_REQUEST, no upgrade, the connection closed`, async () => {
    const r = await rawRequest(server, Buffer.concat([Buffer.from(handshake(poll.poll_id, more)), Buffer.from(body)]),
      { waitClose: true, timeout: 3000 });
    const res = r.responses[0];
    assert.ok(res, `an answer: ${r.raw.toString('latin1').slice(0, 300)}`);
    assert.equal(res.status, 400, r.raw.toString('latin1').slice(0, 300));
    assert.equal(res.json?.error?.code, 'BAD_REQUEST');
    assert.match(res.json?.error?.message ?? '', /no body/);
    assert.equal(r.responses.length, 1, 'one answer: what followed is not read as a request');
    assert.ok(r.closed, 'the server closes the connection after refusing');
    await assertAlive(name);
  });
}

const refusals = {
  'no Connection header': { headers: { Connection: null } },
  'Connection: keep-alive (no upgrade token)': { headers: { Connection: 'keep-alive' } },
  'HTTP/1.0': { httpVersion: '1.0' },
  // refused by the HTTP layer (RFC 9112 3.2) before it is read as a handshake: no
  // Sec-WebSocket-Version in the answer, which RFC 6455 asks for a bad version only
  'no Host header': { headers: { Host: null }, http: true },
  'a Sec-WebSocket-Key that is not base64': { key: '!!!!!!!!!!!!!!!!!!!!!!==' },
  'a Sec-WebSocket-Key of 15 bytes': { key: Buffer.alloc(15, 1).toString('base64') + '====' },
};
for (const [name, opts] of Object.entries(refusals)) {
  test(`a handshake with ${name} → 400 BAD_REQUEST (RFC 6455 4.2.1), Connection: close`, async () => {
    const w = await openWs(server, wsPath(poll.poll_id), opts);
    assert.equal(w.status, 400, `${name}: ${w.status} ${w.body}`);
    assert.equal(w.json?.error?.code, 'BAD_REQUEST', w.body);
    assert.equal(w.headers.connection, 'close');
    assert.equal(w.headers['sec-websocket-version'], opts.http ? undefined : '13');
  });
}

test('two Sec-WebSocket-Key headers → 400', async () => {
  const r = await rawRequest(server, handshake(poll.poll_id, `Sec-WebSocket-Key: ${KEY}\r\n`), { waitClose: true });
  assert.equal(r.responses[0]?.status, 400, r.raw.toString('latin1').slice(0, 300));
  assert.equal(r.responses[0].json?.error?.code, 'BAD_REQUEST');
});

test('Connection: keep-alive, Upgrade and Upgrade: WebSocket are a handshake (token lists, any case)', async () => {
  const w = await openWs(server, wsPath(poll.poll_id), { headers: { Connection: 'keep-alive, Upgrade', Upgrade: 'WebSocket' } });
  try {
    assert.equal(w.status, 101, `${w.status} ${w.body}`);
    assert.equal((await nextMessage(w, 1000))?.kind, 'results');
  } finally { w.close(); }
});

test('a refused upgrade (unknown poll) closes the connection: the frames behind it are not read as a request', async () => {
  const bytes = Buffer.concat([Buffer.from(handshake('no-such-poll')), encodeFrame({ opcode: OP.TEXT, payload: 'GET / HTTP/1.1' })]);
  const r = await rawRequest(server, bytes, { waitClose: true, timeout: 3000 });
  assert.equal(r.responses.length, 1, r.raw.toString('latin1').slice(0, 400));
  assert.equal(r.responses[0].status, 404);
  assert.equal(r.responses[0].headers.connection, 'close');
  assert.ok(r.closed);
});

// ---- a client that sends and never reads ----

/** Resident memory of a process in KiB (VmRSS), from /proc. */
function rssKiB(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m[1]);
}
/** Whether the binary is a sanitizer build (its allocator keeps freed memory in quarantine,
 *  so its resident size says nothing about what is live). */
function sanitized(pid) {
  return /libasan|libubsan/.test(fs.readFileSync(`/proc/${pid}/maps`, 'utf8'));
}

/** Writes `batch` until the kernel stops taking it: true when no 'drain' came within ms. */
async function writeUntilStalled(sock, batch, capBytes, ms) {
  let written = 0;
  while (written < capBytes) {
    const more = sock.write(batch);
    written += batch.length;
    if (!more) {
      const drained = await new Promise((resolve) => {
        const onDrain = () => { clearTimeout(t); resolve(true); };
        const t = setTimeout(() => { sock.off('drain', onDrain); resolve(false); }, ms);
        sock.once('drain', onDrain);
      });
      if (!drained) return { written, stalled: true };
    }
  }
  return { written, stalled: false };
}

test('pings from a client that never reads: the server stops reading (memory bounded), then answers every one',
  { timeout: 120_000 },
  async () => {
    const srv = await startServer(); // its own: its memory is measured
    try {
      const p = await createPoll(srv, srv.mint(`o-${rand()}`));
      const w = await subscribe(srv, 'ws', p.poll_id);
      assert.equal((await nextMessage(w, 1000))?.kind, 'results');
      const pid = srv.proc.pid;
      const before = rssKiB(pid);

      w.sock.pause(); // read nothing from now on: the pongs stay in the kernel's buffers
      const ping = encodeFrame({ opcode: OP.PING, payload: Buffer.alloc(125, 0x61), mask: Buffer.from([9, 8, 7, 6]) });
      const batch = Buffer.concat(Array(1024).fill(ping));
      const CAP = 512 * 1024 * 1024;
      const { written, stalled } = await writeUntilStalled(w.sock, batch, CAP, 2000);
      const grown = rssKiB(pid) - before;
      assert.ok(stalled, `the server must stop reading a client that does not read its pongs; it took ${written} bytes`);
      if (!sanitized(pid)) {
        // what one read brings (the kernel's receive buffer, at most 32 MiB here) plus 64 KiB of output
        assert.ok(grown < 80 * 1024, `the server's memory grew by ${grown} KiB for ${written} bytes of pings`);
      }

      const pings = written / ping.length;
      w.sock.resume();
      const deadline = Date.now() + 90_000;
      while (w.pongs.length < pings && !w.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.equal(w.pongs.length, pings, `one pong per ping (${pings} pings sent)`);
      assert.ok(w.pongs.every((x) => x.payload.length === 125), 'each pong carries its ping\'s payload');
      w.sendJson({ type: 'ping' });
      assert.equal((await w.waitFor((m) => m.json?.type === 'pong', 5000, 'a {"type":"pong"}'))?.json?.type, 'pong');
      await voteNew(srv, p, 0);
      await waitResults(w, (d) => d.total_votes === 1, 2000, 'the vote after the flood');
      w.close();
    } finally { await srv.close(); }
  });
