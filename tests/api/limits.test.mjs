// Rate limits (issue 7 item 1): token buckets per IP and per voter, RateLimit-* headers
// on every limited route, 429 RATE_LIMITED with Retry-After, `--rate-limits off`.
// Issue 17: anonymous devices are held per device (strictly) and per address
// (generously); a refusal says the wait in words and whom the limit is for; the default
// poll creation limit fits a speaker (60 an hour).
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
  assert.match(r.json.error.message, /^Too many sign-in attempts from this network\. Try again in \d+ seconds\.$/);
  assert.equal(r.json.error.scope, 'address');
});

test('poll creation: limited per user, not per IP; the refusal says the wait in minutes, for this account', async () => {
  const a = server.mint('limit-owner-a'), b = server.mint('limit-owner-b');
  const body = { title: 'limits', options: [{ text: 'x' }, { text: 'y' }] };
  for (let i = 0; i < 2; i++) assert.equal((await api(server, 'POST', '/v1/polls', { token: a, body })).status, 201);
  const r = await api(server, 'POST', '/v1/polls', { token: a, body });
  assertError(r, 429, 'RATE_LIMITED');
  // 2 an hour: the next one in about 30 minutes. Retry-After stays in seconds.
  const retry = Number(r.headers.get('retry-after'));
  assert.ok(retry > 1700 && retry <= 1800, `Retry-After ${retry}`);
  const m = /^This account has created many polls in a short time\. Try again in about (\d+) minutes\.$/.exec(r.json.error.message);
  assert.ok(m, r.json.error.message);
  assert.equal(Number(m[1]), Math.round(retry / 60));
  assert.equal(r.json.error.scope, 'account');
  assert.equal(r.json.error.limit, 'poll');
  assert.equal((await api(server, 'POST', '/v1/polls', { token: b, body })).status, 201, 'another user is unaffected');
  // an anonymous device creating polls hears about "this device"
  const dev = server.mint('anon_limit_dev', { anon: true });
  for (let i = 0; i < 2; i++) assert.equal((await api(server, 'POST', '/v1/polls', { token: dev, body })).status, 201);
  const d = await api(server, 'POST', '/v1/polls', { token: dev, body });
  assertError(d, 429, 'RATE_LIMITED');
  assert.match(d.json.error.message, /^This device has created many polls in a short time\. Try again in about \d+ minutes\.$/);
  assert.equal(d.json.error.scope, 'device');
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

test('votes: anonymous devices together are limited per IP, with the bucket nearest to empty in the headers', async () => {
  const poll = await createPoll(server, server.mint('limit-owner-d'),
    { title: 'anon', options: [{ text: 'x' }, { text: 'y' }], settings: { allow_anonymous: true } });
  const opt = poll.options[0].option_id;
  for (let i = 0; i < 2; i++) {
    const r = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
      { token: server.mint(`anon_l${i}`, { anon: true }), body: { option_id: opt } });
    assert.equal(r.status, 200);
    assertHeaders(r, 2); // the address's 2, not the device's 3
  }
  const r = await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
    { token: server.mint('anon_l9', { anon: true }), body: { option_id: opt } });
  assertError(r, 429, 'RATE_LIMITED');
  assert.match(r.json.error.message, /^Too many ballots from this network\. Try again in \d+ seconds?\.$/);
  assert.equal(r.json.error.scope, 'address');
  assert.equal(r.json.error.limit, 'vote');
});

test('votes: one anonymous device is held to its own limit whatever its address allows', async () => {
  const roomy = await startServer({ env: { TALLY_RATE_LIMITS: 'on' }, args: ['--rate-vote-voter', '2'] });
  try {
    const owner = roomy.mint('limit-owner-e');
    const polls = [];
    for (let i = 0; i < 3; i++) {
      polls.push(await createPoll(roomy, owner,
        { title: `p${i}`, options: [{ text: 'x' }, { text: 'y' }], settings: { allow_anonymous: true } }));
    }
    const dev = roomy.mint('anon_one_device', { anon: true });
    for (let i = 0; i < 2; i++) {
      const r = await api(roomy, 'POST', `/v1/polls/${polls[i].poll_id}/votes`, { token: dev, body: { option_id: polls[i].options[0].option_id } });
      assert.equal(r.status, 200, r.text);
      assertHeaders(r, 2); // the device's bucket: the address's (600) has far more left
    }
    const r = await api(roomy, 'POST', `/v1/polls/${polls[2].poll_id}/votes`, { token: dev, body: { option_id: polls[2].options[0].option_id } });
    assertError(r, 429, 'RATE_LIMITED');
    assert.match(r.json.error.message, /^Too many ballots and changes from this device\. Try again in \d+ seconds\.$/);
    assert.equal(r.json.error.scope, 'device');
    assert.equal(r.json.error.limit, 'voter');
    // another device on the same address still votes
    const other = await api(roomy, 'POST', `/v1/polls/${polls[2].poll_id}/votes`,
      { token: roomy.mint('anon_other_device', { anon: true }), body: { option_id: polls[2].options[0].option_id } });
    assert.equal(other.status, 200, other.text);
  } finally {
    await roomy.close();
  }
});

test('the defaults fit a speaker: 60 polls an hour per account, then "about a minute"', async () => {
  const def = await startServer({ env: { TALLY_RATE_LIMITS: 'on' } });
  try {
    const owner = def.mint('speaker');
    const body = { title: 'question', options: [{ text: 'x' }, { text: 'y' }] };
    for (let i = 0; i < 60; i++) {
      const r = await api(def, 'POST', '/v1/polls', { token: owner, body });
      assert.equal(r.status, 201, `poll ${i + 1}: ${r.text}`);
      assertHeaders(r, 60);
    }
    const r = await api(def, 'POST', '/v1/polls', { token: owner, body });
    assertError(r, 429, 'RATE_LIMITED');
    // one more a minute: Retry-After (seconds) is 60 less the time the 60 took
    const retry = Number(r.headers.get('retry-after'));
    assert.ok(retry >= 1 && retry <= 60, `Retry-After ${retry}`);
    const wait = retry === 60 ? 'about a minute' : `${retry} second${retry === 1 ? '' : 's'}`;
    assert.equal(r.json.error.message, `This account has created many polls in a short time. Try again in ${wait}.`);
  } finally {
    await def.close();
  }
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
