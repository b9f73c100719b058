// Join codes (issue 17 item 3): every open poll (active or draft) has a short code a room
// can type, six characters of an alphabet without 0/O/1/I, read whatever the case; GET
// /j/{code} redirects to the poll's page, GET /v1/join/{code} returns the poll. Codes are
// unique among open polls; a closed poll gives its code back. Both stores (make test-api,
// make test-api-pg), restarts included.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, api, createPoll, assertError, assertStatus } from './harness.mjs';

const WEB_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../web');
const CODE = /^[23456789ABCDEFGHJKLMNPQRSTUVWXYZ]{6}$/;

let server, owner;
before(async () => {
  server = await startServer({ args: ['--web-root', WEB_ROOT] });
  owner = server.mint('join-owner');
});
after(async () => { await server?.close(); });

const join = (s, code, token) => api(s, 'GET', `/v1/join/${code}`, { token });
const page = (s, code) => api(s, 'GET', `/j/${code}`);
/** The code as a person might type it: lower case, a hyphen in the middle. */
const typed = (code) => `${code.slice(0, 3).toLowerCase()}-${code.slice(3).toLowerCase()}`;

test('a new poll has a join code; /j/{code} in any case redirects to its page; /v1/join/{code} returns it', async () => {
  const poll = await createPoll(server, owner, { title: 'Lunch?' });
  assert.match(poll.join_code, CODE);
  for (const code of [poll.join_code, poll.join_code.toLowerCase(), typed(poll.join_code)]) {
    const r = await page(server, code);
    assert.equal(r.status, 302, `GET /j/${code}`);
    assert.equal(r.headers.get('location'), `/p/${poll.poll_id}`);
    assert.equal(r.headers.get('cache-control'), 'no-store');
    const j = await join(server, code);
    assertStatus(j, 200, `GET /v1/join/${code}`);
    assert.deepEqual(j.json, (await api(server, 'GET', `/v1/polls/${poll.poll_id}`)).json, 'the poll, as by its id');
  }
  // GET /v1/polls/{id} and the owner's list show it too
  assert.equal((await api(server, 'GET', `/v1/polls/${poll.poll_id}`)).json.join_code, poll.join_code);
  const mine = await api(server, 'GET', '/v1/polls?mine=1&limit=100', { token: owner });
  assert.equal(mine.json.items.find((p) => p.poll_id === poll.poll_id).join_code, poll.join_code);
});

test('codes are unique among open polls', async () => {
  const other = server.mint('join-owner-many');
  const polls = await Promise.all(Array.from({ length: 200 }, () => createPoll(server, other)));
  const codes = polls.map((p) => p.join_code);
  for (const c of codes) assert.match(c, CODE);
  assert.equal(new Set(codes).size, 200);
  for (const p of polls.slice(0, 20)) assert.equal((await join(server, p.join_code)).json.poll_id, p.poll_id);
});

test('an unknown, malformed or ambiguous code: 404 POLL_NOT_FOUND, and the web app\'s page for /j', async () => {
  const poll = await createPoll(server, owner);
  // a code with the look-alikes left out of the alphabet can never be one
  const lookalike = `${poll.join_code.slice(0, 5)}0`;
  for (const code of ['ZZZZZZ', 'ABC', 'ABCDEFG', lookalike, 'O0I1OI', '%20', 'ABC_DE']) {
    if (code === 'ZZZZZZ' && poll.join_code === 'ZZZZZZ') continue;
    assertError(await join(server, code), 404, 'POLL_NOT_FOUND');
    const r = await page(server, code);
    assert.equal(r.status, 404, `GET /j/${code}`);
    assert.match(r.headers.get('content-type'), /^text\/html/, 'the app says so in its own page');
    assert.match(r.text, /<html/i);
  }
  // without the web UI's index.html, the error envelope
  const bare = await startServer({ args: ['--web-root', fs.mkdtempSync(path.join(os.tmpdir(), 'tally-noweb-'))] });
  try {
    assertError(await page(bare, 'ZZZZZZ'), 404, 'POLL_NOT_FOUND');
  } finally {
    await bare.close();
  }
});

test('a draft has a code too: its owner reads it by code, others get 404 from the API; /j still leads to the page', async () => {
  const draft = await createPoll(server, owner, { status: 'draft' });
  assert.equal(draft.status, 'draft');
  assert.match(draft.join_code, CODE);
  assertStatus(await join(server, draft.join_code, owner), 200);
  assertError(await join(server, draft.join_code), 404, 'POLL_NOT_FOUND');
  assertError(await join(server, draft.join_code, server.mint('someone-else')), 404, 'POLL_NOT_FOUND');
  const r = await page(server, draft.join_code);
  assert.equal(r.status, 302);
  assert.equal(r.headers.get('location'), `/p/${draft.poll_id}`);
  // opening it keeps its code
  const open = await api(server, 'PATCH', `/v1/polls/${draft.poll_id}`, { token: owner, body: { status: 'active' } });
  assertStatus(open, 200);
  assert.equal(open.json.join_code, draft.join_code);
  assertStatus(await join(server, draft.join_code), 200);
});

test('closing a poll gives its code back: null in the poll, 404 by code', async () => {
  const poll = await createPoll(server, owner);
  const closed = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { status: 'closed' } });
  assertStatus(closed, 200);
  assert.equal(closed.json.join_code, null);
  assertError(await join(server, poll.join_code), 404, 'POLL_NOT_FOUND');
  assert.equal((await page(server, poll.join_code)).status, 404);
  assert.equal((await api(server, 'GET', `/v1/polls/${poll.poll_id}`)).json.join_code, null);
});

test('a poll whose end_time passes reads without a code and is not found by it', async () => {
  const poll = await createPoll(server, owner, { end_time: new Date(Date.now() + 1500).toISOString() });
  assert.match(poll.join_code, CODE);
  const deadline = Date.now() + 10_000;
  let p;
  do {
    await new Promise((r) => setTimeout(r, 100));
    p = (await api(server, 'GET', `/v1/polls/${poll.poll_id}`)).json;
  } while (p.status !== 'closed' && Date.now() < deadline);
  assert.equal(p.status, 'closed');
  assert.equal(p.join_code, null);
  assertError(await join(server, poll.join_code), 404, 'POLL_NOT_FOUND');
  assert.equal((await page(server, poll.join_code)).status, 404);
});

test('a deleted poll\'s code leads nowhere', async () => {
  const poll = await createPoll(server, owner);
  assert.equal((await api(server, 'DELETE', `/v1/polls/${poll.poll_id}`, { token: owner })).status, 204);
  assertError(await join(server, poll.join_code), 404, 'POLL_NOT_FOUND');
});

test('codes survive a restart; a closed poll stays without one; a poll stored without a code gets one on its next change', async () => {
  const s = await startServer();
  try {
    const tok = s.mint('join-restart');
    const open = await createPoll(s, tok, { title: 'open' });
    const draft = await createPoll(s, tok, { title: 'draft', status: 'draft' });
    const closing = await createPoll(s, tok, { title: 'closing' });
    const legacy = await createPoll(s, tok, { title: 'from before codes' });
    assertStatus(await api(s, 'PATCH', `/v1/polls/${closing.poll_id}`, { token: tok, body: { status: 'closed' } }), 200);
    await s.stop();
    // what a store from before join codes holds for an open poll: none
    const sql = `UPDATE polls SET join_code = NULL WHERE poll_id = '${legacy.poll_id}'`;
    if (s.store) execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', s.store, '-c', sql]);
    else execFileSync('sqlite3', [path.join(s.dataDir, 'tally.db'), sql]);
    await s.restart();
    for (const p of [open, draft]) {
      const j = await join(s, p.join_code, tok);
      assertStatus(j, 200, p.title);
      assert.equal(j.json.poll_id, p.poll_id);
      assert.equal(j.json.join_code, p.join_code);
    }
    assert.equal((await page(s, typed(open.join_code))).headers.get('location'), `/p/${open.poll_id}`);
    assert.equal((await api(s, 'GET', `/v1/polls/${closing.poll_id}`)).json.join_code, null);
    assertError(await join(s, closing.join_code), 404, 'POLL_NOT_FOUND');
    assert.equal((await api(s, 'GET', `/v1/polls/${legacy.poll_id}`)).json.join_code, null);
    const changed = await api(s, 'PATCH', `/v1/polls/${legacy.poll_id}`, { token: tok, body: { title: 'renamed' } });
    assertStatus(changed, 200);
    assert.match(changed.json.join_code, CODE);
    assert.notEqual(changed.json.join_code, open.join_code);
    await s.restart();
    assert.equal((await join(s, changed.json.join_code)).json.poll_id, legacy.poll_id, 'the new code was stored');
  } finally {
    await s.close();
  }
});

test('lookups are limited per address (--rate-join-ip), in words', async () => {
  const s = await startServer({ env: { TALLY_RATE_LIMITS: 'on' }, args: ['--rate-join-ip', '3'] });
  try {
    const poll = await createPoll(s, s.mint('join-limits'));
    assertStatus(await join(s, poll.join_code), 200);
    assert.equal((await page(s, poll.join_code)).status, 302);
    assertError(await join(s, 'ZZZZZ'), 404, 'POLL_NOT_FOUND'); // a miss counts as much as a hit
    const r = await join(s, poll.join_code);
    assertError(r, 429, 'RATE_LIMITED');
    assert.match(r.json.error.message, /^Too many join codes tried from this network\. Try again in \d+ seconds\.$/);
    assert.equal(r.json.error.limit, 'join');
  } finally {
    await s.close();
  }
});
