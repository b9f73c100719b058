// RFC 6455 conformance of GET /v1/polls/{id}/ws, with the `ws` library (tests/node_modules)
// as the peer. The Autobahn fuzzing client, the usual suite, is not packaged by Debian
// (python3-autobahn is the WAMP library without the test cases), so these cases follow
// its sections, adapted to an endpoint that does not echo: tally answers the text
// message {"type":"ping"} with {"type":"pong"}, any other text with {"type":"error"},
// and accepts messages up to 4096 bytes. `ws` validates every frame the server sends
// (no mask, no RSV bit, control frames whole and short, UTF-8 text, close codes that may
// be sent) and reports a violation as an 'error' event, which fails the case. Frames a
// conforming client would never send are written raw to its socket.
//
// Where tally differs from current Autobahn expectations (docs/ARCHITECTURE.md, "Live
// results"): close codes 1012-1014 (registered with IANA after RFC 6455) are refused with
// 1002, as wslay 1.1.1 does and early Autobahn releases expected; messages are answered,
// not echoed; messages over 4096 bytes are refused with 1009.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { startServer, createPoll, rand } from '../api/harness.mjs';
import { encodeFrame, closePayload, OP } from './client.mjs';
import { wsPath } from './util.mjs';

let server, poll;
before(async () => {
  server = await startServer();
  poll = await createPoll(server, server.mint(`owner-${rand()}`));
});
after(async () => { await server?.close(); });

const PING = '{"type":"ping"}';
const PONG = '{"type":"pong"}';
const pingOf = (n) => PING.padEnd(n, ' '); // a {"type":"ping"} message of exactly n bytes

/** A `ws` client on the poll's stream that has received its first results message. */
function connect(opts = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${server.port}${wsPath(poll.poll_id)}`,
      { perMessageDeflate: false, maxPayload: 1 << 20, ...opts });
    const peer = { ws, messages: [], pongs: [], errors: [], close: null, ended: false };
    ws.on('message', (data, isBinary) => peer.messages.push(isBinary ? data : data.toString()));
    ws.on('pong', (d) => peer.pongs.push(Buffer.from(d)));
    ws.on('error', (e) => peer.errors.push(e.message));
    ws.on('close', (code, reason) => { peer.close = { code, reason: reason.toString() }; });
    ws.once('unexpected-response', (req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
    ws.once('open', async () => {
      try {
        await until(() => peer.messages.length > 0, 2000, 'the first results message', peer);
        assert.equal(JSON.parse(peer.messages.shift()).type, 'results');
        resolve(peer);
      } catch (e) { reject(e); }
    });
  });
}

async function until(pred, ms, what, peer) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) {
      throw new Error(`no ${what} within ${ms} ms; messages ${JSON.stringify(peer?.messages)}, pongs ${peer?.pongs.length}, ` +
        `close ${JSON.stringify(peer?.close)}, errors ${JSON.stringify(peer?.errors)}`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}

const raw = (peer, ...frames) => peer.ws._socket.write(Buffer.concat(frames));

/** The server's close frame carried `code`, the connection ended, and the server broke no rule. */
async function expectClose(peer, code) {
  await until(() => peer.close !== null, 3000, `a close with ${code}`, peer);
  assert.equal(peer.close.code, code, `close code: ${JSON.stringify(peer.close)}`);
  assert.deepEqual(peer.errors, [], 'the server\'s frames are valid RFC 6455 frames');
}

/** The server answered with exactly these messages (in order) and stays open. */
async function expectMessages(peer, msgs) {
  await until(() => peer.messages.length >= msgs.length, 2000, `${msgs.length} message(s)`, peer);
  peer.ws.send(PING); // a marker: nothing else comes before its answer
  await until(() => peer.messages.length >= msgs.length + 1, 2000, 'the marker\'s pong', peer);
  assert.deepEqual(peer.messages, [...msgs, PONG]);
  assert.equal(peer.close, null, 'still open');
  assert.deepEqual(peer.errors, []);
  peer.ws.close(1000);
  await expectClose(peer, 1000);
}

const cases = [];
const section = (name, list) => { for (const [title, run] of list) cases.push([`${name} ${title}`, run]); };

// ---- 1. Framing (text and binary messages of the lengths that change the header) ----
section('1 framing:', [
  ...[0, 15, 125, 126, 127, 128, 4095, 4096].map((n) => [`a text message of ${n} bytes`, async (p) => {
    p.ws.send(n === 0 ? '' : pingOf(n));
    await until(() => p.messages.length >= 1, 2000, 'a reply', p);
    const reply = JSON.parse(p.messages.shift());
    assert.equal(reply.type, n === 0 ? 'error' : 'pong', `the answer to ${n} bytes`);
    await expectMessages(p, []);
  }]),
  ['a binary message → 1003 (text only)', async (p) => { p.ws.send(Buffer.from([1, 2, 3])); await expectClose(p, 1003); }],
  ['an empty binary message → 1003', async (p) => { p.ws.send(Buffer.alloc(0)); await expectClose(p, 1003); }],
]);

// ---- 2. Pings and pongs ----
section('2 ping/pong:', [
  ['a ping without payload → a pong without payload', async (p) => {
    p.ws.ping();
    await until(() => p.pongs.length === 1, 2000, 'a pong', p);
    assert.equal(p.pongs[0].length, 0);
    await expectMessages(p, []);
  }],
  ['a ping with 125 bytes of binary payload → the same payload', async (p) => {
    const pl = Buffer.from(Array.from({ length: 125 }, (_, i) => (i * 7) & 0xff));
    p.ws.ping(pl);
    await until(() => p.pongs.length === 1, 2000, 'a pong', p);
    assert.deepEqual(p.pongs[0], pl);
    await expectMessages(p, []);
  }],
  ['a ping with 126 bytes → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.PING, payload: Buffer.alloc(126, 0x78) }));
    await expectClose(p, 1002);
  }],
  ['a ping of 125 bytes written one byte at a time → its pong', async (p) => {
    const frame = encodeFrame({ opcode: OP.PING, payload: Buffer.alloc(125, 0x79) });
    for (const b of frame) {
      raw(p, Buffer.from([b]));
      await new Promise((r) => setImmediate(r));
    }
    await until(() => p.pongs.length === 1, 2000, 'a pong', p);
    assert.equal(p.pongs[0].length, 125);
    await expectMessages(p, []);
  }],
  ['an unsolicited pong (with and without payload) is ignored', async (p) => {
    p.ws.pong();
    p.ws.pong('unsolicited');
    await expectMessages(p, []);
  }],
  ['ten pings → ten pongs, in order', async (p) => {
    for (let i = 0; i < 10; i++) p.ws.ping(`p${i}`);
    await until(() => p.pongs.length === 10, 2000, 'ten pongs', p);
    assert.deepEqual(p.pongs.map(String), Array.from({ length: 10 }, (_, i) => `p${i}`));
    await expectMessages(p, []);
  }],
]);

// ---- 3. Reserved bits (no extension is ever agreed) ----
section('3 reserved bits:', [1, 2, 3, 4, 5, 6, 7].flatMap((rsv) => [
  [`a text frame with RSV ${rsv} → 1002`, async (p) => { raw(p, encodeFrame({ opcode: OP.TEXT, payload: PING, rsv })); await expectClose(p, 1002); }],
  [`a ping with RSV ${rsv} → 1002`, async (p) => { raw(p, encodeFrame({ opcode: OP.PING, payload: 'x', rsv })); await expectClose(p, 1002); }],
]));

// ---- 4. Opcodes ----
section('4 opcodes:', [3, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf].map((op) => [
  `reserved opcode ${op} → 1002`, async (p) => { raw(p, encodeFrame({ opcode: op, payload: 'x' })); await expectClose(p, 1002); },
]));

// ---- 5. Fragmentation ----
section('5 fragmentation:', [
  ['a ping in two fragments → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.PING, payload: 'a', fin: false }), encodeFrame({ opcode: OP.CONT, payload: 'b' }));
    await expectClose(p, 1002);
  }],
  ['a pong in two fragments → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.PONG, payload: 'a', fin: false }), encodeFrame({ opcode: OP.CONT, payload: 'b' }));
    await expectClose(p, 1002);
  }],
  ['a text message in two fragments → its answer', async (p) => {
    p.ws.send('{"type"', { fin: false });
    p.ws.send(':"ping"}', { fin: true });
    await expectMessages(p, [PONG]);
  }],
  ['a text message in two fragments with a ping between → the pong, then the answer', async (p) => {
    p.ws.send('{"type"', { fin: false });
    p.ws.ping('between');
    p.ws.send(':"ping"}', { fin: true });
    await until(() => p.pongs.length === 1, 2000, 'the pong', p);
    assert.equal(String(p.pongs[0]), 'between');
    await expectMessages(p, [PONG]);
  }],
  ['15 fragments of one byte-ish with pings between each → 14 pongs and the answer', async (p) => {
    const parts = PING.match(/.{1,1}/g);
    parts.forEach((part, i) => {
      p.ws.send(part, { fin: i === parts.length - 1 });
      if (i < parts.length - 1) p.ws.ping(`f${i}`);
    });
    await until(() => p.pongs.length === parts.length - 1, 2000, 'the pongs', p);
    await expectMessages(p, [PONG]);
  }],
  ['a continuation frame (fin) with nothing to continue → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.CONT, payload: PING }));
    await expectClose(p, 1002);
  }],
  ['a continuation frame (not fin) with nothing to continue → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.CONT, payload: PING, fin: false }));
    await expectClose(p, 1002);
  }],
  ['a text frame while a fragmented message is open → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.TEXT, payload: '{"type"', fin: false }), encodeFrame({ opcode: OP.TEXT, payload: PING }));
    await expectClose(p, 1002);
  }],
  ['a close while a fragmented message is open → close 1000', async (p) => {
    p.ws.send('{"type"', { fin: false });
    p.ws.close(1000);
    await expectClose(p, 1000);
  }],
]);

// ---- 6. UTF-8 ----
const VALID = '{"type":"ping","x":"κόσμε € 𝄞"}';
const INVALID = {
  'a lone continuation byte': [0x80],
  'a truncated 2-byte sequence at the end': [0xc3],
  'an overlong 2-byte "/"': [0xc0, 0xaf],
  'an overlong 3-byte "/"': [0xe0, 0x80, 0xaf],
  'a UTF-16 surrogate (U+D800)': [0xed, 0xa0, 0x80],
  'U+110000 (past the last code point)': [0xf4, 0x90, 0x80, 0x80],
  'the byte 0xFE': [0xfe],
  'the byte 0xFF': [0xff],
};
section('6 UTF-8:', [
  ['valid multi-byte text (2, 3 and 4 bytes) → its answer', async (p) => { p.ws.send(VALID); await expectMessages(p, [PONG]); }],
  ['the same split at every byte into two fragments → an answer each', async (p) => {
    const b = Buffer.from(VALID);
    for (let i = 1; i < b.length; i++) {
      p.ws.send(b.subarray(0, i), { binary: false, fin: false });
      p.ws.send(b.subarray(i), { binary: false, fin: true });
    }
    await expectMessages(p, Array(b.length - 1).fill(PONG));
  }],
  ...Object.entries(INVALID).flatMap(([name, bytes]) => [
    [`${name} → 1007`, async (p) => {
      p.ws.send(Buffer.concat([Buffer.from('{"x":"'), Buffer.from(bytes), Buffer.from('"}')]), { binary: false });
      await expectClose(p, 1007);
    }],
    [`${name}, in the second of two fragments → 1007`, async (p) => {
      p.ws.send(Buffer.from('{"x":"'), { binary: false, fin: false });
      p.ws.send(Buffer.concat([Buffer.from(bytes), Buffer.from('"}')]), { binary: false, fin: true });
      await expectClose(p, 1007);
    }],
  ]),
]);

// ---- 7. Closing ----
const closeFrame = (payload) => encodeFrame({ opcode: OP.CLOSE, payload });
section('7 close:', [
  ['close 1000 → close 1000, the connection ends', async (p) => { p.ws.close(1000); await expectClose(p, 1000); }],
  ['close, then a text message in the same write → no answer to it', async (p) => {
    raw(p, closeFrame(closePayload(1000)), encodeFrame({ opcode: OP.TEXT, payload: PING }));
    await expectClose(p, 1000);
    assert.deepEqual(p.messages, []);
  }],
  ['close, then a ping → no pong', async (p) => {
    raw(p, closeFrame(closePayload(1000)), encodeFrame({ opcode: OP.PING, payload: 'late' }));
    await expectClose(p, 1000);
    assert.deepEqual(p.pongs, []);
  }],
  ['a close without payload → a close without payload (1005 to the client)', async (p) => {
    raw(p, closeFrame(Buffer.alloc(0)));
    await expectClose(p, 1005);
  }],
  ['a close of 1 byte → 1002', async (p) => { raw(p, closeFrame(Buffer.from([0x03]))); await expectClose(p, 1002); }],
  ['close 1000 with a reason → close 1000', async (p) => { p.ws.close(1000, 'bye now'); await expectClose(p, 1000); }],
  ['close 1000 with a 123-byte reason (the most) → close 1000', async (p) => {
    p.ws.close(1000, 'r'.repeat(123));
    await expectClose(p, 1000);
  }],
  ['close 1000 with a 124-byte reason (payload 126) → 1002', async (p) => {
    raw(p, closeFrame(closePayload(1000, 'r'.repeat(124))));
    await expectClose(p, 1002);
  }],
  ['a close reason that is not UTF-8 → 1007', async (p) => {
    raw(p, closeFrame(Buffer.concat([closePayload(1000), Buffer.from([0xce, 0xba, 0xe1, 0xbd])])));
    await expectClose(p, 1007);
  }],
  ...[1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999].map((code) => [
    `close ${code} (valid) → the same code back`, async (p) => { p.ws.close(code); await expectClose(p, code); },
  ]),
  ...[0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535].map((code) => [
    `close ${code} (may not be sent, or not known to wslay) → 1002`, async (p) => {
      raw(p, closeFrame(closePayload(code)));
      await expectClose(p, 1002);
    },
  ]),
]);

// ---- 9. Limits (tally's: 4096 bytes a message), 10. masking, 12. extensions ----
section('9 limits:', [
  ['4096 bytes in 64 fragments of 64 → its answer', async (p) => {
    const m = pingOf(4096);
    for (let i = 0; i < 64; i++) p.ws.send(m.slice(i * 64, i * 64 + 64), { fin: i === 63 });
    await expectMessages(p, [PONG]);
  }],
  ['4097 bytes in one frame → 1009', async (p) => { p.ws.send(pingOf(4097)); await expectClose(p, 1009); }],
  ['4097 bytes in 2 fragments → 1009', async (p) => {
    p.ws.send(pingOf(4097).slice(0, 4000), { fin: false });
    p.ws.send(pingOf(4097).slice(4000), { fin: true });
    await expectClose(p, 1009);
  }],
  ['a 64-bit length of 65536 → 1009, before the payload arrives', async (p) => {
    const frame = encodeFrame({ opcode: OP.TEXT, payload: Buffer.alloc(65536, 0x20) });
    raw(p, frame.subarray(0, 14)); // the header and the mask only
    await expectClose(p, 1009);
  }],
]);
section('10 masking:', [
  ['an unmasked text frame → 1002', async (p) => {
    raw(p, encodeFrame({ opcode: OP.TEXT, payload: PING, mask: false }));
    await expectClose(p, 1002);
  }],
  ['an unmasked ping → 1002', async (p) => { raw(p, encodeFrame({ opcode: OP.PING, mask: false })); await expectClose(p, 1002); }],
  ['an all-zero mask is still a mask → its answer', async (p) => {
    raw(p, encodeFrame({ opcode: OP.TEXT, payload: PING, mask: Buffer.alloc(4) }));
    await expectMessages(p, [PONG]);
  }],
]);

for (const [title, run] of cases) {
  test(title, async () => {
    const peer = await connect();
    try { await run(peer); } finally { peer.ws.terminate(); }
  });
}

test('12 extensions: permessage-deflate offered → not agreed; messages stay uncompressed and work', async () => {
  const peer = await connect({ perMessageDeflate: true });
  try {
    assert.equal(peer.ws.extensions, '', 'no Sec-WebSocket-Extensions in the 101');
    peer.ws.send(PING);
    await expectMessages(peer, [PONG]);
  } finally { peer.ws.terminate(); }
});
