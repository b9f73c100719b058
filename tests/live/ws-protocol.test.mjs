// WebSocket (RFC 6455) on GET /v1/polls/{id}/ws: the handshake, ping/pong, the closing
// handshake and the close codes for protocol errors. Frames are written by hand.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { startServer, createPoll, rand, rawRequest, assertError } from '../api/harness.mjs';
import { openWs, encodeFrame, closePayload, OP, nextMessage } from './client.mjs';
import { subscribe, voteNew, wsPath, collectFor } from './util.mjs';

let server, ownerTok, poll;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
  poll = await createPoll(server, ownerTok);
});
after(async () => { await server?.close(); });

/** A subscriber that has read its first results message. */
async function ready() {
  const w = await subscribe(server, 'ws', poll.poll_id);
  const first = await nextMessage(w, 1000);
  assert.equal(first?.kind, 'results', `first message: ${JSON.stringify(first)}`);
  return w;
}

/** Waits for the server's close frame and the end of the TCP connection. */
async function closedWith(w, code, what) {
  const r = await w.waitClosed(3000);
  assert.equal(r.code, code, `${what}: expected close code ${code}, got ${r.code} (${r.reason}); messages: ${w.inbox.describe()}`);
  assert.ok(r.closed, `${what}: the server closes the TCP connection after the close frame`);
  return r;
}

test('handshake: 101 with the right Sec-WebSocket-Accept; server frames are unmasked', async () => {
  const w = await openWs(server, wsPath(poll.poll_id));
  try {
    assert.equal(w.status, 101, `status ${w.status}: ${w.body}`);
    assert.equal(w.headers.upgrade?.toLowerCase(), 'websocket');
    assert.match(w.headers.connection, /upgrade/i);
    assert.ok(w.acceptOk, `Sec-WebSocket-Accept must be base64(SHA-1(key + GUID)): ${w.headers['sec-websocket-accept']}`);
    const m = await nextMessage(w, 1000);
    assert.equal(m.kind, 'results');
    assert.equal(w.maskedFrames, 0, 'a server must not mask its frames');
    assert.deepEqual(w.badFrames, []);
    const msg = JSON.parse(m.raw);
    assert.deepEqual(Object.keys(msg).sort(), ['data', 'seq', 'type'], `{"type","seq","data"}: ${m.raw.slice(0, 200)}`);
  } finally { w.close(); }
});

test('a plain GET without Upgrade → 426 UPGRADE_REQUIRED with Upgrade: websocket', async () => {
  const r = await rawRequest(server, `GET ${wsPath(poll.poll_id)} HTTP/1.1\r\nHost: x\r\n\r\n`);
  const res = r.responses[0];
  assert.ok(res, `a response: ${r.raw.toString().slice(0, 300)}`);
  assertError({ ...res, headers: new Headers(res.headers) }, 426, 'UPGRADE_REQUIRED');
  assert.equal(res.headers.upgrade?.toLowerCase(), 'websocket');
});

test('an upgrade without Sec-WebSocket-Key or with version 8 → 400, not 101', async () => {
  const noKey = await openWs(server, wsPath(poll.poll_id), { headers: { 'Sec-WebSocket-Key': null } });
  assert.equal(noKey.status, 400, `no key: ${noKey.status} ${noKey.body}`);
  const v8 = await openWs(server, wsPath(poll.poll_id), { headers: { 'Sec-WebSocket-Version': '8' } });
  assert.equal(v8.status, 400, `version 8: ${v8.status} ${v8.body}`);
  assert.equal(v8.headers['sec-websocket-version'], '13', 'the answer names the supported version');
});

test('an unknown poll → 404 POLL_NOT_FOUND before any upgrade', async () => {
  const w = await openWs(server, wsPath('no-such-poll'));
  assert.equal(w.status, 404);
  assert.equal(w.json?.error?.code, 'POLL_NOT_FOUND');
});

test('{"type":"ping"} → {"type":"pong"}; the connection stays subscribed', async () => {
  const w = await ready();
  try {
    w.sendJson({ type: 'ping' });
    const pong = await nextMessage(w, 1000);
    assert.deepEqual(JSON.parse(pong?.raw ?? 'null'), { type: 'pong' });
    await voteNew(server, poll, 0);
    const upd = await nextMessage(w, 1000);
    assert.equal(upd?.kind, 'results', 'still subscribed after a ping');
  } finally { w.close(); }
});

test('an unknown message gets an error message, not a disconnect', async () => {
  const w = await ready();
  try {
    w.sendJson({ type: 'subscribe', poll: 'x' });
    const m = await nextMessage(w, 1000);
    assert.equal(m?.kind, 'error', `expected {"type":"error"}: ${JSON.stringify(m)}`);
    w.sendText('not json at all');
    const m2 = await nextMessage(w, 1000);
    assert.equal(m2?.kind, 'error');
    w.sendJson({ type: 'ping' });
    assert.equal((await nextMessage(w, 1000))?.kind, 'pong');
  } finally { w.close(); }
});

test('a control ping frame is answered by a pong with the same payload', async () => {
  const w = await ready();
  try {
    w.sendFrame({ opcode: OP.PING, payload: 'hello' });
    const t0 = Date.now();
    while (w.pongs.length === 0 && Date.now() - t0 < 1000) await new Promise((r) => setTimeout(r, 10));
    assert.equal(w.pongs.length, 1, 'one pong');
    assert.equal(w.pongs[0].payload.toString(), 'hello');
  } finally { w.close(); }
});

test('a message fragmented over three frames is reassembled (fragmented ping → pong)', async () => {
  const w = await ready();
  try {
    w.sendFrame({ opcode: OP.TEXT, payload: '{"type"', fin: false });
    w.sendFrame({ opcode: OP.PING, payload: 'x' }); // a control frame may come between fragments
    w.sendFrame({ opcode: OP.CONT, payload: ':"pi', fin: false });
    w.sendFrame({ opcode: OP.CONT, payload: 'ng"}', fin: true });
    const m = await nextMessage(w, 1000);
    assert.equal(m?.kind, 'pong', `reassembled message answered: ${JSON.stringify(m)}`);
  } finally { w.close(); }
});

test('a message of exactly 4096 bytes is accepted', async () => {
  const w = await ready();
  try {
    const msg = '{"type":"ping"}'.padEnd(4096, ' ');
    w.sendText(msg);
    const m = await nextMessage(w, 1000);
    assert.equal(m?.kind, 'pong', `4096 bytes is within the limit: ${JSON.stringify(m)}`);
  } finally { w.close(); }
});

test('client close 1000 → the server answers close 1000 and ends the connection', async () => {
  const w = await ready();
  w.sendClose(1000, 'bye');
  await closedWith(w, 1000, 'clean close');
});

test('an unmasked client frame → close 1002', async () => {
  const w = await ready();
  w.sendFrame({ opcode: OP.TEXT, payload: '{"type":"ping"}', mask: false });
  await closedWith(w, 1002, 'unmasked frame');
  assert.ok(!w.events.some((m) => m.json?.type === 'pong'), 'the unmasked message is not answered');
});

test('invalid UTF-8 in a text frame → close 1007', async () => {
  const w = await ready();
  w.sendFrame({ opcode: OP.TEXT, payload: Buffer.from([0x7b, 0x22, 0xc3, 0x28, 0x22, 0x7d]) }); // {"\xc3("}
  await closedWith(w, 1007, 'invalid UTF-8');
});

test('invalid UTF-8 split over fragments (an overlong encoding) → close 1007', async () => {
  const w = await ready();
  w.sendFrame({ opcode: OP.TEXT, payload: Buffer.from([0x61, 0xc0]), fin: false });
  w.sendFrame({ opcode: OP.CONT, payload: Buffer.from([0xaf, 0x62]), fin: true });
  await closedWith(w, 1007, 'overlong UTF-8 across fragments');
});

test('a single frame over 4096 bytes → close 1009', async () => {
  const w = await ready();
  w.sendText('{"type":"ping","pad":"' + 'x'.repeat(5000) + '"}');
  await closedWith(w, 1009, 'oversize frame');
});

test('a fragmented message over 4096 bytes in total → close 1009', async () => {
  const w = await ready();
  w.sendFrame({ opcode: OP.TEXT, payload: 'x'.repeat(3000), fin: false });
  w.sendFrame({ opcode: OP.CONT, payload: 'x'.repeat(3000), fin: true });
  await closedWith(w, 1009, 'oversize fragmented message');
});

test('a binary message → close 1003 (text only)', async () => {
  const w = await ready();
  w.sendFrame({ opcode: OP.BINARY, payload: Buffer.from([1, 2, 3]) });
  await closedWith(w, 1003, 'binary frame');
});

test('frames that came with the handshake are processed (ping in the same packet)', async () => {
  const key = crypto.randomBytes(16).toString('base64');
  const head = `GET ${wsPath(poll.poll_id)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
  // the close goes later: a close received at once may overtake queued messages (RFC 6455 §5.5.1)
  const bytes = [Buffer.concat([Buffer.from(head), encodeFrame({ opcode: OP.TEXT, payload: '{"type":"ping"}' })]),
    encodeFrame({ opcode: OP.CLOSE, payload: closePayload(1000) })];
  const r = await rawRequest(server, bytes, { waitClose: true, timeout: 3000, gapMs: 300 });
  const text = r.raw.toString('latin1');
  assert.match(text, /^HTTP\/1\.1 101 /, text.slice(0, 200));
  assert.ok(text.includes('{"type":"pong"}'), `the ping sent with the handshake is answered: ${JSON.stringify(text.slice(-200))}`);
  assert.ok(r.closed, 'and the close handshake completes');
});

test('the server stays healthy after protocol errors (new subscribers get updates)', async () => {
  const w = await ready();
  try {
    await voteNew(server, poll, 1);
    const msgs = await collectFor(w, 1000);
    assert.ok(msgs.some((m) => m.kind === 'results'), 'an update after the vote');
  } finally { w.close(); }
});
