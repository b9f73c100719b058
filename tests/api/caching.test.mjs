// HTTP caching and CORS (issue 21): polls and results carry an ETag and a Cache-Control
// that is public only when the body is the same for everyone; If-None-Match gives 304;
// a closed poll's final results may be kept for long. CORS is granted to the origins of
// --cors-origins only, with preflight; nothing is ever put in a cookie.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertStatus, assertError, describe, createPoll, castVote, optionByText, rand,
} from './harness.mjs';

const ORIGIN = 'https://blog.example';
let server, owner, voter;
before(async () => {
  server = await startServer({ args: ['--cors-origins', `${ORIGIN}, http://127.0.0.1:9`] });
  owner = server.mint(`cache-owner-${rand()}`);
  voter = server.mint(`cache-voter-${rand()}`);
});
after(async () => { await server?.close(); });

const ETAG = /^"[A-Za-z0-9_-]{22}"$/;

async function revalidates(path, token) {
  const first = await api(server, 'GET', path, { token });
  assertStatus(first, 200, path);
  const tag = first.headers.get('etag');
  assert.match(tag ?? '', ETAG, `${path}: ETag: ${describe(first)}`);
  const again = await api(server, 'GET', path, { token, headers: { 'If-None-Match': tag } });
  assert.equal(again.status, 304, `${path} with If-None-Match of the current ETag: ${describe(again)}`);
  assert.equal(again.text, '', '304 has no body');
  assert.equal(again.headers.get('etag'), tag, '304 repeats the ETag');
  assert.equal(again.headers.get('cache-control'), first.headers.get('cache-control'), '304 repeats Cache-Control');
  // a list with the tag among others, and the weak form, match too (RFC 9110 13.1.2)
  const listed = await api(server, 'GET', path, { token, headers: { 'If-None-Match': `"other", W/${tag}` } });
  assert.equal(listed.status, 304, `${path} with the tag in a list, weak: ${describe(listed)}`);
  const other = await api(server, 'GET', path, { token, headers: { 'If-None-Match': '"not-this-one"' } });
  assertStatus(other, 200, `${path} with another ETag`);
  assert.equal(other.text, first.text);
  return first;
}

test('a poll: ETag, 304 on If-None-Match, public for a second; a draft is private', async () => {
  const poll = await createPoll(server, owner);
  const r = await revalidates(`/v1/polls/${poll.poll_id}`);
  assert.equal(r.headers.get('cache-control'), 'public, max-age=1');
  // the same body for a caller with a token: one tag for everyone
  const withToken = await api(server, 'GET', `/v1/polls/${poll.poll_id}`, { token: voter });
  assert.equal(withToken.headers.get('etag'), r.headers.get('etag'));
  // a change makes a new tag: the old one no longer gives 304
  assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { title: 'Renamed?' } }), 200);
  const after = await api(server, 'GET', `/v1/polls/${poll.poll_id}`, { headers: { 'If-None-Match': r.headers.get('etag') } });
  assertStatus(after, 200, 'after a change');
  assert.equal(after.json.title, 'Renamed?');
  assert.notEqual(after.headers.get('etag'), r.headers.get('etag'));

  const draft = await createPoll(server, owner, { status: 'draft' });
  const d = await revalidates(`/v1/polls/${draft.poll_id}`, owner);
  assert.equal(d.headers.get('cache-control'), 'private, no-cache');
});

test('results: public for a second when everyone may see them; the ETag moves with a vote', async () => {
  const poll = await createPoll(server, owner);
  const path = `/v1/polls/${poll.poll_id}/results`;
  const r = await revalidates(path);
  assert.equal(r.headers.get('cache-control'), 'public, max-age=1');
  assertStatus(await castVote(server, voter, poll.poll_id, { option_id: optionByText(poll, 'A') }), 200);
  const moved = await api(server, 'GET', path, { headers: { 'If-None-Match': r.headers.get('etag') } });
  assertStatus(moved, 200, 'after a vote the old ETag is stale');
  assert.equal(moved.json.total_votes, 1);
  assert.notEqual(moved.headers.get('etag'), r.headers.get('etag'));
  // HEAD: the same headers, no body
  const head = await api(server, 'HEAD', path);
  assert.equal(head.status, 200);
  assert.equal(head.headers.get('etag'), moved.headers.get('etag'));
});

test('results never public under owner_only or after_vote, nor while hidden during voting', async () => {
  for (const settings of [{ results_visibility: 'owner_only' }, { results_visibility: 'after_vote' },
    { results_visibility: 'after_close' }, { show_results_during_voting: false }]) {
    const poll = await createPoll(server, owner, { settings });
    const what = JSON.stringify(settings);
    const r = await revalidates(`/v1/polls/${poll.poll_id}/results`, owner);
    assert.equal(r.headers.get('cache-control'), 'private, no-cache', `${what}, read by the owner`);
    if (settings.results_visibility === 'after_vote') {
      assertStatus(await castVote(server, voter, poll.poll_id, { option_id: optionByText(poll, 'B') }), 200);
      const v = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: voter });
      assertStatus(v, 200, 'after_vote, read by a voter');
      assert.equal(v.headers.get('cache-control'), 'private, no-cache', `${what}, read by a voter`);
    }
  }
});

test("a closed poll's final results are public for an hour; after_close opens them to caches then", async () => {
  const poll = await createPoll(server, owner, { settings: { results_visibility: 'after_close' } });
  assertStatus(await castVote(server, voter, poll.poll_id, { option_id: optionByText(poll, 'C') }), 200);
  assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { status: 'closed' } }), 200);
  const r = await revalidates(`/v1/polls/${poll.poll_id}/results`);
  assert.equal(r.json.status, 'closed');
  assert.equal(r.headers.get('cache-control'), 'public, max-age=3600');
});

test('errors and writes are not cacheable', async () => {
  const r = await api(server, 'GET', '/v1/polls/AAAAAAAAAAAAAAAAAAAAAA/results');
  assertError(r, 404, 'POLL_NOT_FOUND');
  assert.equal(r.headers.get('cache-control'), 'no-store');
  assert.equal(r.headers.get('etag'), null);
  const c = await api(server, 'POST', '/v1/polls', { token: owner, body: { title: 'x?', options: [{ text: 'a' }, { text: 'b' }] } });
  assertStatus(c, 201);
  assert.equal(c.headers.get('cache-control'), 'no-store');
});

test('CORS: a granted origin gets Access-Control-Allow-Origin and Vary; another gets nothing', async () => {
  const poll = await createPoll(server, owner);
  const ok = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { headers: { Origin: ORIGIN } });
  assertStatus(ok, 200);
  assert.equal(ok.headers.get('access-control-allow-origin'), ORIGIN);
  assert.match(ok.headers.get('access-control-expose-headers') ?? '', /\bETag\b/);
  assert.equal(ok.headers.get('vary'), 'Origin');
  assert.equal(ok.headers.get('access-control-allow-credentials'), null, 'never credentials: tokens are headers');
  const no = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { headers: { Origin: 'https://evil.example' } });
  assertStatus(no, 200);
  assert.equal(no.headers.get('access-control-allow-origin'), null);
  assert.equal(no.headers.get('vary'), 'Origin', 'the answer depends on Origin, so caches must know');
  // errors carry the grant too, so the page can read the envelope
  const err = await api(server, 'POST', '/v1/polls', { headers: { Origin: ORIGIN }, body: {} });
  assertError(err, 401, 'UNAUTHENTICATED');
  assert.equal(err.headers.get('access-control-allow-origin'), ORIGIN);
});

test('CORS preflight: 204 with the methods and headers for a granted origin; a plain 204 otherwise', async () => {
  const pre = await api(server, 'OPTIONS', '/v1/polls/abc/votes', {
    headers: { Origin: ORIGIN, 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, content-type' },
  });
  assert.equal(pre.status, 204, describe(pre));
  assert.equal(pre.headers.get('access-control-allow-origin'), ORIGIN);
  const methods = (pre.headers.get('access-control-allow-methods') ?? '').split(',').map((s) => s.trim());
  assert.ok(methods.includes('POST'), `Allow-Methods: ${methods}`);
  const allowHeaders = (pre.headers.get('access-control-allow-headers') ?? '').toLowerCase();
  for (const h of ['authorization', 'content-type', 'idempotency-key', 'if-none-match']) {
    assert.ok(allowHeaders.includes(h), `Allow-Headers has ${h}: ${allowHeaders}`);
  }
  assert.equal(pre.headers.get('access-control-max-age'), '600');
  const refused = await api(server, 'OPTIONS', '/v1/polls/abc/votes', {
    headers: { Origin: 'https://evil.example', 'Access-Control-Request-Method': 'POST' },
  });
  assert.equal(refused.status, 204);
  assert.equal(refused.headers.get('access-control-allow-origin'), null);
  assert.equal(refused.headers.get('access-control-allow-methods'), null);
  assert.match(refused.headers.get('allow') ?? '', /POST/);
  assertError(await api(server, 'OPTIONS', '/v1/nope', { headers: { Origin: ORIGIN } }), 404, 'NOT_FOUND');
});

test('CORS is off by default; "*" grants any origin without Vary', async () => {
  const plain = await startServer();
  const star = await startServer({ args: ['--cors-origins', '*'] });
  try {
    const r = await api(plain, 'GET', '/v1/polls?mine=1', { headers: { Origin: ORIGIN } });
    assert.equal(r.headers.get('access-control-allow-origin'), null);
    const pre = await api(plain, 'OPTIONS', '/v1/polls', { headers: { Origin: ORIGIN, 'Access-Control-Request-Method': 'POST' } });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get('access-control-allow-origin'), null);
    const s = await api(star, 'GET', '/healthz');
    assert.equal(s.headers.get('access-control-allow-origin'), null, 'CORS is for the API (/v1), not the operations routes');
    const a = await api(star, 'GET', '/v1/auth/me', { headers: { Origin: 'https://anywhere.example' } });
    assert.equal(a.headers.get('access-control-allow-origin'), '*');
    assert.equal(a.headers.get('vary'), null);
  } finally {
    await plain.close();
    await star.close();
  }
});

test('a bad --cors-origins refuses the start', async () => {
  await assert.rejects(startServer({ args: ['--cors-origins', 'blog.example/path'] }), /--cors-origins/);
});

test('no response sets a cookie: tokens are bearer headers only', async () => {
  const reg = await api(server, 'POST', '/v1/auth/register', { body: { username: `u${rand()}`, password: 'correct horse battery' } });
  assertStatus(reg, 201);
  for (const r of [reg, await api(server, 'POST', '/v1/auth/anonymous', { body: {} }), await api(server, 'GET', '/')]) {
    assert.equal(r.headers.get('set-cookie'), null, describe(r));
  }
});
