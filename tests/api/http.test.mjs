// The HTTP layer: health, content types, 404/405, size limits, request smuggling,
// malformed input, keep-alive.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startServer, api, request, rawRequest, assertError, assertStatus, describe, rand, BIN, freePort, sleep, tail,
  createPoll,
} from './harness.mjs';

let server, tok;
before(async () => {
  server = await startServer();
  tok = await server.token(`http-${rand()}`);
});
after(async () => { await server?.close(); });

const JSON_CT = 'application/json; charset=utf-8';

/** Builds an HTTP/1.1 request as bytes. headers: array of [name, value] (kept as given). */
function rawReq(method, target, headers = [], body = '') {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body, 'utf8');
  const head = `${method} ${target} HTTP/1.1\r\n` +
    headers.map(([k, v]) => `${k}: ${v}\r\n`).join('') + '\r\n';
  return Buffer.concat([Buffer.from(head, 'latin1'), b]);
}
const host = () => ['Host', `127.0.0.1:${server.port}`];
const auth = () => ['Authorization', `Bearer ${tok}`];

function rawDescribe(r) {
  return `responses: ${JSON.stringify(r.responses.map((x) => ({ status: x.status, headers: x.headers, text: x.text.slice(0, 300) })))}` +
    ` closed=${r.closed} timedOut=${r.timedOut} error=${r.error} raw=${JSON.stringify(r.raw.toString('latin1').slice(0, 600))}`;
}
function assertRawError(r, status, code) {
  assert.ok(r.responses.length >= 1, `expected a ${status} response, got none: ${rawDescribe(r)}`);
  const res = r.responses[0];
  assert.equal(res.status, status, `expected ${status} ${code ?? ''}: ${rawDescribe(r)}`);
  assert.ok((res.headers['content-type'] || '').startsWith('application/json'),
    `error must be JSON: ${rawDescribe(r)}`);
  assert.ok(res.json?.error && typeof res.json.error.message === 'string', `error envelope: ${rawDescribe(r)}`);
  if (code) assert.equal(res.json.error.code, code, `error.code: ${rawDescribe(r)}`);
  return res;
}

async function assertStillHealthy() {
  const h = await api(server, 'GET', '/healthz');
  assert.equal(h.status, 200, `server must still be healthy: ${describe(h)}`);
}

// ---- operations --------------------------------------------------------------------------

test('GET /healthz → 200 {"status":"ok"} as JSON', async () => {
  const res = await api(server, 'GET', '/healthz');
  assertStatus(res, 200);
  assert.deepEqual(res.json, { status: 'ok' });
  assert.equal(res.headers.get('content-type'), JSON_CT);
});

test('GET /readyz → 200', async () => {
  assertStatus(await api(server, 'GET', '/readyz'), 200);
});

test('JSON routes and their errors use Content-Type application/json; charset=utf-8', async () => {
  const anon = await api(server, 'POST', '/v1/auth/anonymous');
  assertStatus(anon, 201);
  assert.equal(anon.headers.get('content-type'), JSON_CT, 'success');
  const me = await api(server, 'GET', '/v1/auth/me', { token: tok });
  assert.equal(me.headers.get('content-type'), JSON_CT, 'GET /v1/auth/me');
  const e401 = await api(server, 'GET', '/v1/auth/me');
  assert.equal(e401.headers.get('content-type'), JSON_CT, '401');
  const e404 = await api(server, 'GET', '/v1/nope');
  assert.equal(e404.headers.get('content-type'), JSON_CT, '404');
  const e400 = await api(server, 'POST', '/v1/polls', { token: tok, raw: '{' });
  assert.equal(e400.headers.get('content-type'), JSON_CT, '400');
});

// ---- routing -------------------------------------------------------------------------------

test('unknown routes under /v1 → 404 NOT_FOUND as JSON', async () => {
  for (const p of ['/v1/nope', '/v1', '/v1/', '/v1/auth', '/v1/polls/abc/nope', '/v1/polls/abc/votes/me/x',
    '/v1/receipts', '/v1/auth/me/extra']) {
    const res = await api(server, 'GET', p);
    assertError(res, 404, 'NOT_FOUND');
    assert.ok(!/<html/i.test(res.text), `no HTML for ${p}`);
  }
  assertError(await api(server, 'POST', '/v1/unknown', { body: {} }), 404, 'NOT_FOUND');
});

function allowSet(res) {
  const allow = res.headers.get('allow');
  assert.ok(allow, `405 must carry an Allow header: ${describe(res)}`);
  return new Set(allow.split(',').map((s) => s.trim().toUpperCase()).filter(Boolean));
}

test('known path with a wrong method → 405 METHOD_NOT_ALLOWED with Allow', async () => {
  const cases = [
    ['PUT', '/v1/polls/somePollId123', ['GET', 'PATCH', 'DELETE']],
    ['POST', '/v1/polls/somePollId123', ['GET', 'PATCH', 'DELETE']],
    ['DELETE', '/v1/polls', ['GET', 'POST']],
    ['GET', '/v1/auth/login', ['POST']],
    ['GET', '/v1/auth/register', ['POST']],
    ['POST', '/v1/auth/me', ['GET']],
    ['DELETE', '/v1/polls/somePollId123/results', ['GET']],
    ['GET', '/v1/polls/somePollId123/votes', ['POST']],
  ];
  for (const [method, p, expected] of cases) {
    const res = await api(server, method, p, { token: tok });
    assertError(res, 405, 'METHOD_NOT_ALLOWED');
    assert.equal(res.headers.get('content-type'), JSON_CT, `${method} ${p} content type`);
    const allow = allowSet(res);
    for (const m of expected) assert.ok(allow.has(m), `${method} ${p}: Allow must list ${m}, got ${[...allow]}`);
    assert.ok(!allow.has(method), `${method} ${p}: Allow must not list ${method}, got ${[...allow]}`);
  }
});

// ---- body limit ----------------------------------------------------------------------------

function pollBodyOfSize(n) {
  const s = JSON.stringify({ title: 'size', options: [{ text: 'a' }, { text: 'b' }] });
  assert.ok(n >= s.length);
  return s.slice(0, -1) + ' '.repeat(n - s.length) + '}';
}

test('a 1 MiB body → 413 PAYLOAD_TOO_LARGE', async () => {
  const body = pollBodyOfSize(1 << 20);
  let res;
  try {
    res = await api(server, 'POST', '/v1/polls', { token: tok, raw: body });
  } catch (e) {
    // The server may close before reading the whole body; then read the response from a raw socket.
    const r = await rawRequest(server, rawReq('POST', '/v1/polls',
      [host(), auth(), ['Content-Type', 'application/json'], ['Content-Length', String(body.length)]], body),
    { timeout: 10_000 });
    assertRawError(r, 413, 'PAYLOAD_TOO_LARGE');
    await assertStillHealthy();
    return;
  }
  assertError(res, 413, 'PAYLOAD_TOO_LARGE');
  await assertStillHealthy();
});

test('body limit boundary: 65536 bytes accepted, 65537 → 413', async () => {
  const ok = await api(server, 'POST', '/v1/polls', { token: tok, raw: pollBodyOfSize(65536) });
  assertStatus(ok, 201, 'a 64 KiB body');
  let over;
  const body = pollBodyOfSize(65537);
  try {
    over = await api(server, 'POST', '/v1/polls', { token: tok, raw: body });
  } catch {
    const r = await rawRequest(server, rawReq('POST', '/v1/polls',
      [host(), auth(), ['Content-Type', 'application/json'], ['Content-Length', String(body.length)]], body));
    assertRawError(r, 413, 'PAYLOAD_TOO_LARGE');
    return;
  }
  assertError(over, 413, 'PAYLOAD_TOO_LARGE');
});

test('a chunked body over the limit → 413 PAYLOAD_TOO_LARGE', async () => {
  const chunk = 'x'.repeat(8192);
  const chunks = [];
  for (let i = 0; i < 16; i++) chunks.push(`${(8192).toString(16)}\r\n${chunk}\r\n`);
  chunks.push('0\r\n\r\n');
  const r = await rawRequest(server, rawReq('POST', '/v1/polls',
    [host(), auth(), ['Content-Type', 'application/json'], ['Transfer-Encoding', 'chunked']], chunks.join('')),
  { timeout: 10_000 });
  assertRawError(r, 413, 'PAYLOAD_TOO_LARGE');
  await assertStillHealthy();
});

test('a chunked body within the limit is accepted', async () => {
  const json = JSON.stringify({ title: 'chunked', options: [{ text: 'a' }, { text: 'b' }] });
  const half = Math.floor(json.length / 2);
  const parts = [json.slice(0, half), json.slice(half)];
  const body = parts.map((p) => `${Buffer.byteLength(p).toString(16)}\r\n${p}\r\n`).join('') + '0\r\n\r\n';
  const r = await rawRequest(server, rawReq('POST', '/v1/polls',
    [host(), auth(), ['Content-Type', 'application/json'], ['Transfer-Encoding', 'chunked']], body));
  assert.equal(r.responses[0]?.status, 201, `chunked create: ${rawDescribe(r)}`);
  assert.equal(r.responses[0].json.title, 'chunked');
});

// ---- head and URI limits ----------------------------------------------------------------------

test('request headers over 8 KiB → 431 HEADERS_TOO_LARGE', async () => {
  const one = await rawRequest(server, rawReq('GET', '/healthz', [host(), ['X-Big', 'a'.repeat(9000)]]));
  assertRawError(one, 431, 'HEADERS_TOO_LARGE');
  const many = [];
  for (let i = 0; i < 20; i++) many.push([`X-Filler-${i}`, 'b'.repeat(500)]);
  const r = await rawRequest(server, rawReq('GET', '/healthz', [host(), ...many]));
  assertRawError(r, 431, 'HEADERS_TOO_LARGE');
  await assertStillHealthy();
});

test('request headers under 8 KiB are fine', async () => {
  const some = [];
  for (let i = 0; i < 12; i++) some.push([`X-Filler-${i}`, 'c'.repeat(400)]); // ~5 KiB
  const r = await rawRequest(server, rawReq('GET', '/healthz', [host(), ...some]));
  assert.equal(r.responses[0]?.status, 200, `~5 KiB of headers: ${rawDescribe(r)}`);
});

test('request target over 2048 bytes → 414 URI_TOO_LONG; 2048 bytes is fine', async () => {
  const long = '/v1/polls/' + 'a'.repeat(2100);
  const r = await rawRequest(server, rawReq('GET', long, [host()]));
  assertRawError(r, 414, 'URI_TOO_LONG');
  const q = await rawRequest(server, rawReq('GET', '/healthz?' + 'q'.repeat(3000), [host()]));
  assertRawError(q, 414, 'URI_TOO_LONG');
  const target = '/v1/polls/' + 'a'.repeat(2048 - 10);
  assert.equal(target.length, 2048);
  const ok = await rawRequest(server, rawReq('GET', target, [host()]));
  assertRawError(ok, 404, 'POLL_NOT_FOUND');
  const over = await rawRequest(server, rawReq('GET', target + 'a', [host()]));
  assertRawError(over, 414, 'URI_TOO_LONG');
});

// ---- smuggling and framing -------------------------------------------------------------------

const smuggled = `GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n`;

test('Content-Length together with Transfer-Encoding → 400 BAD_REQUEST, connection closed', async () => {
  const body = `0\r\n\r\n${smuggled}`;
  const r = await rawRequest(server, rawReq('POST', '/v1/auth/anonymous',
    [host(), ['Content-Type', 'application/json'], ['Content-Length', String(body.length)],
      ['Transfer-Encoding', 'chunked']], body), { waitClose: true, timeout: 3000 });
  assertRawError(r, 400, 'BAD_REQUEST');
  assert.equal(r.responses.length, 1, `the smuggled request must not be answered: ${rawDescribe(r)}`);
  assert.ok(r.closed, `the server must close the connection after a framing error: ${rawDescribe(r)}`);
});

test('Transfer-Encoding before Content-Length → 400 BAD_REQUEST', async () => {
  const body = `0\r\n\r\n`;
  const r = await rawRequest(server, rawReq('POST', '/v1/auth/anonymous',
    [host(), ['Transfer-Encoding', 'chunked'], ['Content-Length', '5']], body), { timeout: 3000 });
  assertRawError(r, 400, 'BAD_REQUEST');
});

test('two different Content-Length headers → 400 BAD_REQUEST', async () => {
  const body = `{}\r\n${smuggled}`;
  const r = await rawRequest(server, rawReq('POST', '/v1/auth/anonymous',
    [host(), ['Content-Type', 'application/json'], ['Content-Length', '2'], ['Content-Length', String(body.length)]],
    body), { waitClose: true, timeout: 3000 });
  assertRawError(r, 400, 'BAD_REQUEST');
  assert.equal(r.responses.length, 1, `only one response: ${rawDescribe(r)}`);
});

test('two identical Content-Length headers → 400 BAD_REQUEST', async () => {
  const r = await rawRequest(server, rawReq('POST', '/v1/auth/anonymous',
    [host(), ['Content-Type', 'application/json'], ['Content-Length', '2'], ['Content-Length', '2']], '{}'),
  { timeout: 3000 });
  assertRawError(r, 400, 'BAD_REQUEST');
});

test('invalid Content-Length values → 400', async () => {
  for (const v of ['abc', '-1', '1 2', '0x10']) {
    const r = await rawRequest(server, rawReq('POST', '/v1/auth/anonymous',
      [host(), ['Content-Type', 'application/json'], ['Content-Length', v]], '{}'), { timeout: 3000 });
    assertRawError(r, 400);
  }
  await assertStillHealthy();
});

test('garbage request lines → 400, and the server keeps serving', async () => {
  for (const line of ['HELLO\r\n\r\n', 'GET\r\n\r\n', 'GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n',
    'GET /healthz HTTP/1.1\r\nBad Header Without Colon\r\n\r\n', '\x00\x01\x02\r\n\r\n']) {
    const r = await rawRequest(server, line, { timeout: 3000 });
    const status = r.responses[0]?.status;
    assert.ok(status === 400 || status === 505 || (status === undefined && r.closed),
      `${JSON.stringify(line)} → expected 400 (or 505 for the version) or a closed connection: ${rawDescribe(r)}`);
    assert.ok(status === undefined || status < 500 || status === 505, `never a 500: ${rawDescribe(r)}`);
  }
  await assertStillHealthy();
});

// ---- malformed JSON -------------------------------------------------------------------------

test('malformed JSON bodies → 400 INVALID_JSON, never a 500', async () => {
  const bad = ['', '{', '{"title":}', '{"title":"x",}', "{'title':'x'}", '{"title":"x"} trailing', 'NaN',
    '{"title":"unterminated}', '{"a":1,"a":}', '\u0000', '{"title":"x\\q"}'];
  for (const raw of bad) {
    const res = await api(server, 'POST', '/v1/polls', { token: tok, raw });
    assert.equal(res.status, 400, `${JSON.stringify(raw)}: ${describe(res)}`);
    assertError(res, 400, 'INVALID_JSON');
  }
});

test('invalid UTF-8 in JSON strings → 400 INVALID_JSON', async () => {
  const seqs = [[0xc3, 0x28], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xff], [0xe2, 0x82]];
  for (const bytes of seqs) {
    const raw = Buffer.concat([Buffer.from('{"title":"x'), Buffer.from(bytes),
      Buffer.from('y","options":[{"text":"a"},{"text":"b"}]}')]);
    const res = await api(server, 'POST', '/v1/polls', { token: tok, raw });
    assert.equal(res.status, 400, `bytes ${bytes.map((b) => b.toString(16))}: ${describe(res)}`);
    assertError(res, 400, 'INVALID_JSON');
  }
});

test('deeply nested JSON → 400, server survives', async () => {
  const raw = '{"title":' + '['.repeat(30000) + ']'.repeat(30000) + '}';
  const res = await api(server, 'POST', '/v1/polls', { token: tok, raw });
  assert.equal(res.status, 400, `deep nesting: ${describe(res)}`);
  assert.ok(['INVALID_JSON', 'VALIDATION_ERROR'].includes(res.json?.error?.code), describe(res));
  await assertStillHealthy();
});

test('valid JSON of the wrong shape → 400 VALIDATION_ERROR', async () => {
  for (const raw of ['[]', '[1,2]', 'null', '42', '"x"', 'true']) {
    const res = await api(server, 'POST', '/v1/polls', { token: tok, raw });
    assert.equal(res.status, 400, `${raw}: ${describe(res)}`);
    assertError(res, 400, 'VALIDATION_ERROR');
  }
});

// ---- keep-alive -------------------------------------------------------------------------------

test('keep-alive: several requests on one connection', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const ports = new Set();
    for (let i = 0; i < 6; i++) {
      const path = i % 2 ? '/v1/auth/me' : '/healthz';
      const res = await request(server, 'GET', path, { agent, token: tok });
      assert.equal(res.status, 200, `request ${i}: ${describe(res)}`);
      if (i > 0) assert.ok(res.reusedSocket, `request ${i} must reuse the connection`);
      ports.add(res.localPort);
    }
    assert.equal(ports.size, 1, 'all requests on one connection');
    // an error response keeps the connection usable too
    const e = await request(server, 'GET', '/v1/nope', { agent });
    assert.equal(e.status, 404);
    const after = await request(server, 'POST', '/v1/polls', { agent, token: tok,
      body: { title: 'ka', options: [{ text: 'a' }, { text: 'b' }] } });
    assert.equal(after.status, 201, describe(after));
    assert.ok(after.reusedSocket, 'connection reused after a 404');
  } finally {
    agent.destroy();
  }
});

test('pipelined requests are answered in order', async () => {
  const reqs = [
    rawReq('GET', '/healthz', [host()]),
    rawReq('GET', '/v1/nope', [host()]),
    rawReq('GET', '/readyz', [host()]),
  ];
  const r = await rawRequest(server, Buffer.concat(reqs), { responses: 3, timeout: 5000 });
  assert.deepEqual(r.responses.map((x) => x.status), [200, 404, 200], rawDescribe(r));
});

// A vote waits for its commit while the connection keeps reading (the request is copied
// out of the input): what the client sends meanwhile waits its turn, in order.
test('requests pipelined behind a vote that waits for its commit are answered in order, after it', async () => {
  const poll = await createPoll(server, tok);
  const [a, b] = [await server.token(`pipe-a-${rand()}`), await server.token(`pipe-b-${rand()}`)];
  const body = JSON.stringify({ option_id: poll.options[0].option_id });
  const vote = (t) => rawReq('POST', `/v1/polls/${poll.poll_id}/votes`, [host(), ['Authorization', `Bearer ${t}`],
    ['Content-Type', 'application/json'], ['Content-Length', String(body.length)]], body);
  const r = await rawRequest(server, Buffer.concat([
    vote(a),
    rawReq('GET', `/v1/polls/${poll.poll_id}/results`, [host()]),
    vote(b),
    rawReq('GET', `/v1/polls/${poll.poll_id}/results`, [host()]),
  ]), { responses: 4, timeout: 5000 });
  assert.deepEqual(r.responses.map((x) => x.status), [200, 200, 200, 200], rawDescribe(r));
  assert.equal(r.responses[0].json.status, 'recorded', rawDescribe(r));
  assert.equal(r.responses[1].json.total_votes, 1, 'the read after the first vote sees it, and not the second');
  assert.equal(r.responses[3].json.total_votes, 2, rawDescribe(r));
});

test('a client that sends its vote and then half-closes gets the answer, then the connection closes', async () => {
  const poll = await createPoll(server, tok);
  const t = await server.token(`halfclose-${rand()}`);
  const body = JSON.stringify({ option_id: poll.options[0].option_id });
  const out = await new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port: server.port });
    const chunks = [];
    const timer = setTimeout(() => { sock.destroy(); resolve({ raw: Buffer.concat(chunks), ended: false }); }, 5000);
    sock.on('connect', () => sock.end(rawReq('POST', `/v1/polls/${poll.poll_id}/votes`, [host(),
      ['Authorization', `Bearer ${t}`], ['Content-Type', 'application/json'], ['Content-Length', String(body.length)]],
    body)));
    sock.on('data', (c) => chunks.push(c));
    sock.on('end', () => { clearTimeout(timer); resolve({ raw: Buffer.concat(chunks), ended: true }); });
    sock.on('error', () => {});
  });
  const text = out.raw.toString('latin1');
  assert.match(text, /^HTTP\/1\.1 200 /, text);
  assert.match(text, /\r\nConnection: close\r\n/i, text);
  assert.match(text, /"status":"recorded"/, text);
  assert.ok(out.ended, 'the server closes once it has answered');
  const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: t });
  assert.equal(me.json.has_voted, true);
});

test('HTTP/1.0 request without Host is answered', async () => {
  const r = await rawRequest(server, 'GET /healthz HTTP/1.0\r\n\r\n', { timeout: 3000 });
  assert.equal(r.responses[0]?.status, 200, rawDescribe(r));
});

test('path traversal outside /v1 never serves files from outside the web root', async () => {
  for (const target of ['/../../../../../../etc/passwd', '/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd',
    '/..%2f..%2f..%2f..%2fetc%2fpasswd', '/static/../../../../etc/passwd']) {
    const r = await rawRequest(server, rawReq('GET', target, [host()]), { timeout: 3000 });
    const res = r.responses[0];
    assert.ok(res, `${target}: expected a response: ${rawDescribe(r)}`);
    assert.ok(res.status < 500, `${target}: never a 5xx: ${rawDescribe(r)}`);
    assert.ok(!/root:.*:0:0:/.test(res.text), `${target} must not serve /etc/passwd: ${rawDescribe(r)}`);
  }
  await assertStillHealthy();
});

test('percent-encoded and odd poll ids are just unknown polls', async () => {
  for (const id of ['%2e%2e', '%00', 'a%2fb', '%E2%82%AC', "'%20OR%201=1--"]) {
    const res = await api(server, 'GET', `/v1/polls/${id}`);
    assert.ok([400, 404].includes(res.status), `/v1/polls/${id}: ${describe(res)}`);
    assert.ok(res.json?.error?.code, `JSON error for /v1/polls/${id}: ${describe(res)}`);
  }
  await assertStillHealthy();
});

test('--max-connections-per-ip: connections beyond the cap from one address are closed at once', async () => {
  const net = await import('node:net');
  const capped = await startServer({ args: ['--max-connections-per-ip', '3'] });
  const socks = [];
  try {
    const open = () => new Promise((resolve) => {
      const s = net.connect(capped.port, '127.0.0.1');
      socks.push(s);
      let closed = false;
      s.on('close', () => { closed = true; });
      s.on('error', () => {});
      s.on('connect', () => setTimeout(() => resolve(() => closed), 200));
    });
    const states = [];
    for (let i = 0; i < 5; i++) states.push(await open());
    const closed = states.map((isClosed) => isClosed());
    // the harness's keep-alive health check may hold one of the 3 slots
    const firstClosed = closed.indexOf(true);
    assert.ok(firstClosed === 2 || firstClosed === 3, `the cap closes the 3rd or 4th connection: ${closed}`);
    assert.ok(closed.slice(firstClosed).every(Boolean), `every connection past the cap is closed: ${closed}`);
    socks[0].destroy();
    await new Promise((r) => setTimeout(r, 200));
    const again = await open();
    assert.equal(again(), false, 'a slot freed by a closed connection can be used again');
  } finally {
    socks.forEach((s) => s.destroy());
    await capped.close();
  }
});

test('slowloris: a request head that trickles in is cut off at --header-timeout; an idle keep-alive connection at --idle-timeout', async () => {
  const net = await import('node:net');
  const slow = await startServer({ args: ['--header-timeout', '1', '--idle-timeout', '2'] });
  try {
    const closedAfter = (write) => new Promise((resolve) => {
      const t0 = Date.now();
      const s = net.connect(slow.port, '127.0.0.1');
      let timer;
      s.on('connect', () => write(s, (t) => { timer = t; }));
      s.on('error', () => {});
      s.resume(); // read (and drop) the answer, or Node never sees the server's FIN
      s.on('close', () => { clearInterval(timer); resolve(Date.now() - t0); });
      setTimeout(() => s.destroy(), 8000);
    });
    // one header byte every 200 ms: never a complete head
    const trickle = await closedAfter((s, keep) => {
      s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n');
      keep(setInterval(() => { if (!s.destroyed) s.write('X'); }, 200));
    });
    assert.ok(trickle >= 900 && trickle < 4000, `the trickling connection is closed after about 1 s (${trickle} ms)`);
    // a complete request, then silence: closed after the idle timeout
    const idle = await closedAfter((s) => s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'));
    assert.ok(idle >= 1800 && idle < 5000, `the idle keep-alive connection is closed after about 2 s (${idle} ms)`);
  } finally {
    await slow.close();
  }
});

// ---- HTTP/1.0 and streamed answers (RFC 9112 6.1: never chunked to HTTP/1.0) ----------------

/**
 * Opens a raw connection, sends `data`, and collects what arrives. until(buf) says when to
 * stop waiting for more: returns {raw, ended (the server ended the stream with a FIN),
 * reset, timedOut, sock} with the socket still open unless it ended.
 */
function rawCollect(data, until, timeout = 5000) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port: server.port });
    const chunks = [];
    const out = { ended: false, reset: false, timedOut: false, sock };
    let done = false;
    const finish = (timedOut) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      out.timedOut = timedOut;
      out.raw = Buffer.concat(chunks);
      resolve(out);
    };
    const timer = setTimeout(() => finish(true), timeout);
    sock.on('connect', () => sock.write(data));
    sock.on('data', (c) => { chunks.push(c); if (until(Buffer.concat(chunks))) finish(false); });
    sock.on('end', () => { out.ended = true; finish(false); });
    sock.on('error', (e) => { out.reset = e.code === 'ECONNRESET'; finish(false); });
  });
}

/** Waits for the end of a connection rawCollect left open; the bytes that came meanwhile
 *  are appended to r.raw. */
function rawAwaitEnd(r, timeout = 5000) {
  return new Promise((resolve) => {
    const chunks = [r.raw];
    const timer = setTimeout(() => { r.timedOut = true; r.raw = Buffer.concat(chunks); resolve(r); }, timeout);
    r.sock.removeAllListeners('data').removeAllListeners('end');
    r.sock.on('data', (c) => chunks.push(c));
    r.sock.on('end', () => { clearTimeout(timer); r.ended = true; r.raw = Buffer.concat(chunks); resolve(r); });
  });
}

/** The head (status and lower-cased header map) and the bytes after it. */
function splitHead(raw) {
  const end = raw.indexOf('\r\n\r\n');
  assert.ok(end > 0, `a complete response head: ${JSON.stringify(raw.toString('latin1').slice(0, 400))}`);
  const lines = raw.subarray(0, end).toString('latin1').split('\r\n');
  const headers = {};
  for (const l of lines.slice(1)) {
    const i = l.indexOf(':');
    headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  return { status: Number(lines[0].split(' ')[1]), headers, body: raw.subarray(end + 4).toString('utf8') };
}

test('HTTP/1.0 GET /live: the event stream is not chunked; closing the connection ends it', async () => {
  const owner = await server.token(`owner10-${rand()}`);
  const poll = (await api(server, 'POST', '/v1/polls', {
    token: owner, body: { title: 'h10 live', options: [{ text: 'a' }, { text: 'b' }] },
  })).json;
  const r = await rawCollect(`GET /v1/polls/${poll.poll_id}/live HTTP/1.0\r\n\r\n`,
    (b) => b.includes('\n\n', b.indexOf('event: results')));
  assert.ok(!r.timedOut && !r.ended, `the first event arrives on an open stream: ${r.raw.toString('latin1')}`);
  const { status, headers, body } = splitHead(r.raw);
  assert.equal(status, 200);
  assert.equal(headers['content-type'], 'text/event-stream; charset=utf-8');
  assert.equal(headers['transfer-encoding'], undefined, `no Transfer-Encoding to HTTP/1.0: ${JSON.stringify(headers)}`);
  assert.equal(headers['content-length'], undefined);
  assert.equal(headers.connection, 'close');
  assert.match(body, /^retry: \d+\n\nevent: results\nid: \d+\ndata: \{/, `the events as they are, no chunk sizes: ${body}`);
  // closing the poll ends the stream: a `closed` event, then the server closes the connection
  const closed = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { status: 'closed' } });
  assertStatus(closed, 200, 'closing the poll');
  await rawAwaitEnd(r);
  assert.ok(r.ended && !r.timedOut, `the server ends the stream with a close: ${r.raw.toString('latin1')}`);
  const all = splitHead(r.raw).body;
  assert.match(all, /event: closed\n[^]*\n\n$/, `the last event is the close, and nothing follows it: ${all}`);
  assert.ok(!/\r\n0\r\n\r\n$/.test(all), 'no last-chunk marker');
});

test('HTTP/1.0 GET /export: the export is not chunked; the end of the connection ends it', async () => {
  const owner = await server.token(`owner10-${rand()}`);
  const poll = (await api(server, 'POST', '/v1/polls', {
    token: owner, body: { title: 'h10 export', options: [{ text: 'a' }, { text: 'b' }] },
  })).json;
  for (let i = 0; i < 3; i++) {
    const v = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, {
      token: await server.token(`v10-${rand()}`), body: { option_id: poll.options[i % 2].option_id },
    });
    assertStatus(v, 200, 'a vote');
  }
  for (const format of ['json', 'csv']) {
    const r = await rawCollect(`GET /v1/polls/${poll.poll_id}/export?format=${format} HTTP/1.0\r\n` +
      `Authorization: Bearer ${owner}\r\n\r\n`, () => false);
    assert.ok(r.ended && !r.timedOut && !r.reset, `${format}: the server ends the export with a close`);
    const { status, headers, body } = splitHead(r.raw);
    assert.equal(status, 200, `${format}: ${body.slice(0, 300)}`);
    assert.equal(headers['transfer-encoding'], undefined, `${format}: no Transfer-Encoding: ${JSON.stringify(headers)}`);
    assert.equal(headers.connection, 'close');
    if (format === 'json') {
      const doc = JSON.parse(body); // chunk sizes in the body would not parse
      assert.equal(doc.ballots.length, 3, `the three ballots: ${body.slice(0, 500)}`);
    } else {
      const lines = body.replace(/^\uFEFF/, '').trimEnd().split('\r\n');
      assert.equal(lines.length, 4, `a header line and three ballots: ${JSON.stringify(body)}`);
      assert.match(lines[0], /^voter,recorded_at,a,b$/);
    }
  }
  // HTTP/1.1 is still chunked
  const r = await rawRequest(server, rawReq('GET', `/v1/polls/${poll.poll_id}/export?format=json`,
    [host(), ['Authorization', `Bearer ${owner}`]]), { waitClose: true });
  assert.equal(r.responses[0]?.headers['transfer-encoding'], 'chunked', rawDescribe(r));
  assert.equal(r.responses[0].json.ballots.length, 3, rawDescribe(r));
});

test('HTTP/1.0 with Connection: keep-alive: the answer says keep-alive and the connection serves a second request', async () => {
  const one = 'GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n';
  const r = await rawRequest(server, [one, one], { responses: 2, gapMs: 50 });
  assert.equal(r.responses.length, 2, rawDescribe(r));
  for (const res of r.responses) {
    assert.equal(res.status, 200, rawDescribe(r));
    assert.equal(res.headers.connection, 'keep-alive', rawDescribe(r));
  }
  const plain = await rawRequest(server, 'GET /healthz HTTP/1.0\r\n\r\n', { waitClose: true });
  assert.equal(plain.responses[0]?.headers.connection, 'close', rawDescribe(plain));
  assert.ok(plain.closed, 'without keep-alive HTTP/1.0 closes after the answer');
});

// ---- Host and fields that may appear once (RFC 9112 3.2, RFC 9110 5.3) -------------------------

function assertBadHeader(r, what, headerName) {
  const res = assertRawError(r, 400, 'BAD_REQUEST');
  assert.ok(res.json.error.message.includes(headerName), `${what}: the message names ${headerName}: ${rawDescribe(r)}`);
  assert.equal(res.headers.connection, 'close', `${what}: ${rawDescribe(r)}`);
}

test('HTTP/1.1 without Host → 400 BAD_REQUEST naming Host; HTTP/1.0 without Host is still served', async () => {
  const r = await rawRequest(server, 'GET /healthz HTTP/1.1\r\n\r\n', { waitClose: true });
  assertBadHeader(r, 'no Host', 'Host');
  assert.ok(r.closed, 'the connection is closed after the answer');
  const old = await rawRequest(server, 'GET /healthz HTTP/1.0\r\n\r\n');
  assert.equal(old.responses[0]?.status, 200, rawDescribe(old));
});

test('two Host headers → 400 BAD_REQUEST, in HTTP/1.1 and 1.0, whether they agree or not', async () => {
  for (const [version, a, b] of [['1.1', 'x', 'y'], ['1.1', 'x', 'x'], ['1.0', 'a', 'b']]) {
    const r = await rawRequest(server, `GET /healthz HTTP/${version}\r\nHost: ${a}\r\nhost: ${b}\r\n\r\n`);
    assertBadHeader(r, `HTTP/${version} Host ${a}, ${b}`, 'Host');
  }
});

test('a Host that is not host[:port] → 400 BAD_REQUEST; every form of a valid one is served', async () => {
  for (const bad of ['a/b', 'a b', 'x@y', 'a:b', '[::1', '[]', 'a:80x', 'a%zz', 'a?q']) {
    const r = await rawRequest(server, `GET /healthz HTTP/1.1\r\nHost: ${bad}\r\n\r\n`);
    assertBadHeader(r, `Host: ${bad}`, 'Host');
  }
  for (const good of ['', 'x', `127.0.0.1:${server.port}`, '[::1]:8080', '[::1]', 'tally.example.org', 'a-b.c_d~e',
    'a:', 'xn--bcher-kva.example', 'h%41st']) {
    const r = await rawRequest(server, `GET /healthz HTTP/1.1\r\nHost: ${good}\r\n\r\n`);
    assert.equal(r.responses[0]?.status, 200, `Host: ${good}: ${rawDescribe(r)}`);
  }
});

test('a second Authorization, Content-Type, Idempotency-Key, Last-Event-ID or Sec-WebSocket-Key/-Version → 400 naming it', async () => {
  const poll = (await api(server, 'POST', '/v1/polls', {
    token: tok, body: { title: 'dup headers', options: [{ text: 'a' }, { text: 'b' }] },
  })).json;
  const ws = [host(), ['Upgrade', 'websocket'], ['Connection', 'Upgrade']];
  const key = ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='];
  const version = ['Sec-WebSocket-Version', '13'];
  const vote = JSON.stringify({ option_id: poll.options[0].option_id });
  const cases = [
    // the first credential valid, the second not: the request was answered with the first
    ['Authorization', rawReq('GET', '/v1/auth/me', [host(), auth(), ['authorization', 'Bearer x.y.z']])],
    ['Authorization', rawReq('GET', '/v1/auth/me', [host(), auth(), auth()])],
    ['Content-Type', rawReq('POST', `/v1/polls/${poll.poll_id}/votes`, [host(), auth(),
      ['Content-Type', 'application/json'], ['CONTENT-TYPE', 'text/plain'], ['Content-Length', String(vote.length)]], vote)],
    ['Idempotency-Key', rawReq('POST', `/v1/polls/${poll.poll_id}/votes`, [host(), auth(),
      ['Content-Type', 'application/json'], ['Idempotency-Key', 'k1'], ['Idempotency-Key', 'k2'],
      ['Content-Length', String(vote.length)]], vote)],
    ['Last-Event-ID', rawReq('GET', `/v1/polls/${poll.poll_id}/live`, [host(), ['Last-Event-ID', '1'],
      ['last-event-id', '2']])],
    ['Sec-WebSocket-Key', rawReq('GET', `/v1/polls/${poll.poll_id}/ws`, [...ws, key, ['Sec-WebSocket-Key',
      'AQIDBAUGBwgJCgsMDQ4PEA=='], version])],
    ['Sec-WebSocket-Version', rawReq('GET', `/v1/polls/${poll.poll_id}/ws`, [...ws, key, version, version])],
  ];
  for (const [name, bytes] of cases) {
    const r = await rawRequest(server, bytes);
    assertBadHeader(r, `two ${name}`, name);
  }
  // none of them reached a route: the poll has no ballot
  const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`);
  assertStatus(res, 200);
  assert.equal(res.json.total_votes, 0, 'the refused votes were not cast');
});

test('list fields may repeat: two Prefer fields are one list (respond-async in the second → 202), two Connection fields likewise', async () => {
  const poll = (await api(server, 'POST', '/v1/polls', {
    token: tok, body: { title: 'list headers', options: [{ text: 'a' }, { text: 'b' }] },
  })).json;
  const vote = JSON.stringify({ option_id: poll.options[1].option_id });
  const r = await rawRequest(server, rawReq('POST', `/v1/polls/${poll.poll_id}/votes`, [host(),
    ['Authorization', `Bearer ${await server.token(`pref-${rand()}`)}`], ['Content-Type', 'application/json'],
    ['Prefer', 'return=minimal'], ['Prefer', 'respond-async'], ['Content-Length', String(vote.length)]], vote));
  assert.equal(r.responses[0]?.status, 202, `respond-async in the second Prefer field: ${rawDescribe(r)}`);
  const c = await rawRequest(server, rawReq('GET', '/healthz', [host(), ['Connection', 'keep-alive'],
    ['Connection', 'close'], ['Accept', 'application/json'], ['Accept', 'text/plain']]), { waitClose: true });
  assert.equal(c.responses[0]?.status, 200, rawDescribe(c));
  assert.equal(c.responses[0].headers.connection, 'close', `close in the second Connection field: ${rawDescribe(c)}`);
  assert.ok(c.closed, 'and the connection is closed');
});

// ---- the open-file limit (each connection is a descriptor) --------------------------------------

/**
 * Starts `tally serve` (SQLite) under `sh -c '<limits>; exec tally ...'`, so that its
 * open-file limits are what the shell's ulimit made them. Resolves once it answers
 * /healthz (on a connection it then closes). Returns {port, proc, log(), cpu(), limits(),
 * stop()}.
 */
async function startLimited(limits) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-fd-'));
  const port = await freePort();
  const proc = spawn('sh', ['-c', `${limits} && exec "$0" "$@"`, BIN, 'serve', '--listen', `127.0.0.1:${port}`,
    '--data-dir', dataDir, '--secret', rand(24)],
  { env: { ...process.env, TALLY_RATE_LIMITS: 'off', TALLY_POW_DIFFICULTY: '0' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout.on('data', (d) => { log += d; });
  proc.stderr.on('data', (d) => { log += d; });
  const srv = {
    port,
    proc,
    log: () => log,
    /** CPU seconds (user + system) the server has used, from /proc/PID/stat. */
    cpu: () => {
      const f = fs.readFileSync(`/proc/${proc.pid}/stat`, 'utf8').split(') ')[1].split(' ');
      return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in USER_HZ (100 on Linux)
    },
    /** [soft, hard] of "Max open files" in /proc/PID/limits. */
    limits: () => {
      const line = fs.readFileSync(`/proc/${proc.pid}/limits`, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
      return line.split(/\s{2,}/).slice(1, 3).map(Number);
    },
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(t);
      }
      fs.rmSync(dataDir, { recursive: true, force: true });
      // a sanitizer build's report is a bug even when every answer was right
      assert.doesNotMatch(log, /AddressSanitizer|LeakSanitizer|runtime error:/, `a sanitizer report:\n${tail(log, 8000)}`);
      return proc.exitCode;
    },
  };
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`tally exited during start (${proc.exitCode}):\n${tail(log)}`);
    const r = await rawRequest(srv, 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
      { waitClose: true, timeout: 1000 });
    if (r.responses[0]?.status === 200 && r.closed) return srv;
    if (Date.now() > deadline) throw new Error(`tally did not answer /healthz within 10 s:\n${tail(log)}`);
    await sleep(50);
  }
}

/** Opens a connection, sends one keep-alive request, and reports its first answer and
 *  whether the server closed the connection after it. */
function holdOne(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const chunks = [];
    const st = { sock, status: null, json: null, headers: null, closed: false, answered: null };
    st.answered = new Promise((done) => {
      const check = () => {
        const [res] = parseFirst(Buffer.concat(chunks));
        if (res && st.status === null) {
          Object.assign(st, { status: res.status, json: res.json, headers: res.headers });
        }
        if (st.status !== null && (st.status !== 503 || st.closed)) done(st);
      };
      sock.on('data', (c) => { chunks.push(c); check(); });
      sock.on('end', () => { st.closed = true; check(); });
      sock.on('close', () => { st.closed = true; check(); if (st.status === null) done(st); });
    });
    sock.on('error', () => {});
    sock.on('connect', () => { sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'); resolve(st); });
  });
}
function parseFirst(buf) {
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return [];
  const head = splitHead(buf);
  const n = Number(head.headers['content-length'] ?? 0);
  if (Buffer.byteLength(head.body) < n) return [];
  let json = null;
  try { json = JSON.parse(head.body); } catch { /* not JSON */ }
  return [{ status: head.status, headers: head.headers, json }];
}

test('an open-file limit below --max-connections: the cap comes down with a warning, the clients past it get a quick 503, the server does not spin and serves again when they leave', async () => {
  // the hard limit too, so that raising the soft one cannot help
  const srv = await startLimited('ulimit -Sn 128 && ulimit -Hn 128');
  const socks = [];
  try {
    assert.deepEqual(srv.limits(), [128, 128], 'the limits the server runs with');
    const warn = srv.log().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
      .find((l) => l.msg === '--max-connections lowered to fit the open-file limit');
    assert.ok(warn, `a warning names the lowered cap:\n${tail(srv.log())}`);
    assert.equal(warn.level, 'warn');
    assert.equal(warn.max_connections, '19000');
    assert.equal(warn.fd_limit, '128');
    const cap = Number(warn.clamped_to);
    assert.ok(cap > 0 && cap < 128 - 3, `the cap leaves room for the server's own descriptors: ${cap}`);

    // 200 clients, each with a keep-alive request: the first `cap` are served and stay
    // open (the table is full), the rest get 503 UNAVAILABLE and a close at once
    for (let i = 0; i < 200; i++) socks.push(await holdOne(srv.port));
    let timer;
    const firstAnswers = await Promise.race([Promise.all(socks.map((s) => s.answered)),
      new Promise((r) => { timer = setTimeout(() => r(null), 15_000); })]);
    clearTimeout(timer);
    assert.ok(firstAnswers, 'every client gets an answer (none waits in the listen queue)');
    const served = socks.filter((s) => s.status === 200 && !s.closed).length;
    const away = socks.filter((s) => s.status === 503 && s.closed);
    assert.equal(served, cap, `the cap's worth of clients is served and kept (503s: ${away.length})`);
    assert.equal(away.length, 200 - cap, 'every other client is turned away');
    assert.equal(away[0].json?.error?.code, 'UNAVAILABLE', JSON.stringify(away[0].json));
    assert.equal(away[0].headers['retry-after'], '1');

    // with the table full, over more than 2 s in which more clients come and are turned
    // away, the server uses a fraction of one CPU (it spun at 100% retrying accept)
    const cpu0 = srv.cpu();
    const t0 = Date.now();
    const late = [];
    while (Date.now() - t0 < 2500) {
      late.push(await holdOne(srv.port));
      await late[late.length - 1].answered;
      await sleep(100);
    }
    const cpu = srv.cpu() - cpu0;
    const wall = (Date.now() - t0) / 1000;
    assert.ok(cpu < wall / 2, `${cpu} s of CPU in ${wall} s with the table full`);
    assert.ok(late.every((s) => s.status === 503 && s.closed), 'each late client is turned away at once');

    // the clients leave: a new one is served (once the server has seen them go)
    for (const s of socks) s.sock.destroy();
    const deadline = Date.now() + 5000;
    let r;
    do {
      r = await rawRequest(srv, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
      if (r.responses[0]?.status === 200) break;
      await sleep(50);
    } while (Date.now() < deadline);
    assert.equal(r.responses[0]?.status, 200, `served again: ${JSON.stringify(r.responses[0])}`);
  } finally {
    socks.forEach((s) => s.sock.destroy());
    assert.equal(await srv.stop(), 0, `a clean stop:\n${tail(srv.log())}`);
  }
});

test('a soft open-file limit below the hard one is raised to it at start', async () => {
  const srv = await startLimited('ulimit -Sn 128');
  try {
    const [soft, hard] = srv.limits();
    assert.equal(soft, hard, `the soft limit is the hard one (${soft} vs ${hard})`);
    if (hard !== 128) {
      const line = srv.log().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
        .find((l) => l.msg === 'open-file limit raised to the hard limit');
      assert.ok(line, `the raise is logged:\n${tail(srv.log())}`);
      assert.equal(line.from, '128');
    }
  } finally {
    assert.equal(await srv.stop(), 0);
  }
});
