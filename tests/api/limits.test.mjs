// Rate limits (issue 7 item 1): token buckets per IP and per voter, RateLimit-* headers
// on every limited route, 429 RATE_LIMITED with Retry-After, `--rate-limits off`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, api, createPoll, assertError } from './harness.mjs';

let server;
before(async () => {
  // limits on, small enough to hit quickly
  server = await startServer({
    env: { TALLY_RATE_LIMITS: 'on' },
    args: ['--rate-auth-ip', '3', '--rate-anon-ip', '4', '--rate-poll-user', '2', '--rate-vote-ip', '2',
      '--rate-vote-voter', '3'],
  });
});
after(async () => { await server?.close(); });

function assertHeaders(res, limit) {
  assert.equal(res.headers.get('ratelimit-limit'), String(limit), 'RateLimit-Limit');
  assert.match(res.headers.get('ratelimit-remaining') ?? '', /^\d+$/, 'RateLimit-Remaining');
  assert.match(res.headers.get('ratelimit-reset') ?? '', /^\d+$/, 'RateLimit-Reset');
}

test('anonymous tokens: limited per IP with headers, then 429 with Retry-After', async () => {
  const seen = [];
  for (let i = 0; i < 4; i++) {
    const r = await api(server, 'POST', '/v1/auth/anonymous');
    assert.equal(r.status, 201);
    assertHeaders(r, 4);
    seen.push(Number(r.headers.get('ratelimit-remaining')));
  }
  assert.deepEqual(seen, [3, 2, 1, 0], 'remaining counts down');
  const r = await api(server, 'POST', '/v1/auth/anonymous');
  assertError(r, 429, 'RATE_LIMITED');
  assertHeaders(r, 4);
  assert.ok(Number(r.headers.get('retry-after')) >= 1, 'Retry-After in whole seconds');
});

test('auth routes: the limit is checked before parsing (malformed bodies count too)', async () => {
  for (let i = 0; i < 3; i++) {
    const r = await api(server, 'POST', '/v1/auth/login', { raw: '{nope' });
    assertError(r, 400, 'INVALID_JSON');
    assertHeaders(r, 3);
  }
  const r = await api(server, 'POST', '/v1/auth/register', { body: { username: 'someone', password: 'long enough pw' } });
  assertError(r, 429, 'RATE_LIMITED');
});

test('poll creation: limited per user, not per IP', async () => {
  const a = server.mint('limit-owner-a'), b = server.mint('limit-owner-b');
  const body = { title: 'limits', options: [{ text: 'x' }, { text: 'y' }] };
  for (let i = 0; i < 2; i++) assert.equal((await api(server, 'POST', '/v1/polls', { token: a, body })).status, 201);
  assertError(await api(server, 'POST', '/v1/polls', { token: a, body }), 429, 'RATE_LIMITED');
  assert.equal((await api(server, 'POST', '/v1/polls', { token: b, body })).status, 201, 'another user is unaffected');
});

test('votes: authenticated voters are limited per voter, so many voters on one IP still vote', async () => {
  const poll = await createPoll(server, server.mint('limit-owner-c'), { title: 'v', options: [{ text: 'x' }, { text: 'y' }] });
  const opt = poll.options[0].option_id;
  for (let i = 0; i < 20; i++) {
    const r = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token: server.mint(`lv-${i}`), body: { option_id: opt } });
    assert.equal(r.status, 200, `voter ${i} on the same IP`);
    assertHeaders(r, 3);
  }
  const one = server.mint('lv-0');
  // lv-0 has used 1 of 3; two more requests (409s) use the rest, the next is limited
  for (let i = 0; i < 2; i++) {
    assertError(await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token: one, body: { option_id: opt } }), 409, 'ALREADY_VOTED');
  }
  assertError(await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token: one, body: { option_id: opt } }), 429, 'RATE_LIMITED');
});

test('votes: anonymous voters are limited per IP', async () => {
  const poll = await createPoll(server, server.mint('limit-owner-d'),
    { title: 'anon', options: [{ text: 'x' }, { text: 'y' }], settings: { allow_anonymous: true } });
  const opt = poll.options[0].option_id;
  for (let i = 0; i < 2; i++) {
    const r = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
      { token: server.mint(`anon_l${i}`, { anon: true }), body: { option_id: opt } });
    assert.equal(r.status, 200);
    assertHeaders(r, 2);
  }
  const r = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
    { token: server.mint('anon_l9', { anon: true }), body: { option_id: opt } });
  assertError(r, 429, 'RATE_LIMITED');
});

test('GET /metrics counts the refusals', async () => {
  const r = await api(server, 'GET', '/metrics');
  assert.equal(r.status, 200);
  assert.match(r.text, /tally_rate_limited_total\{route="\/v1\/auth\/anonymous"\} [1-9]/);
});

test('--rate-limits off: no limits and no headers', async () => {
  const off = await startServer({ args: ['--rate-limits', 'off', '--rate-anon-ip', '1'] });
  try {
    for (let i = 0; i < 5; i++) {
      const r = await api(off, 'POST', '/v1/auth/anonymous');
      assert.equal(r.status, 201);
      assert.equal(r.headers.get('ratelimit-limit'), null);
    }
  } finally {
    await off.close();
  }
});
