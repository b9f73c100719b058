// Rate limits shared by the instances of a cluster: the buckets live in Redis, so a
// client spreading its requests over every instance gets the limit once; with Redis
// gone each instance's own buckets decide. The proof of work's backlog per address is
// such a bucket too, and an answered challenge buys one token across the instances.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { after, before, test } from 'node:test';

import { api, sleep } from '../api/harness.mjs';
import { startCluster } from './cluster.mjs';

let c;
before(async () => {
  c = await startCluster({
    env: { TALLY_RATE_LIMITS: 'on', TALLY_RATE_AUTH_IP: '6', TALLY_POW_DIFFICULTY: '8', TALLY_POW_BURST: '4' },
  });
});
after(async () => { if (c) await c.stop(); });

const login = (node) => api(node, 'POST', '/v1/auth/login', { body: { username: 'nobody-here', password: 'wrong password 1' } });

test('one client over three instances gets the limit once (Redis GCRA), with RateLimit headers', async () => {
  const answers = [];
  for (let i = 0; i < 12; i++) answers.push(await login(c.nodes[i % 3]));
  const limited = answers.filter((a) => a.status === 429);
  assert.equal(answers.length - limited.length, 6, answers.map((a) => a.status).join(','));
  for (const a of limited) {
    assert.equal(a.json.error.code, 'RATE_LIMITED');
    assert.ok(Number(a.headers.get('retry-after')) >= 1);
  }
  for (const a of answers) {
    assert.equal(a.headers.get('ratelimit-limit'), '6');
    assert.ok(a.headers.get('ratelimit-remaining') !== null);
  }
});

function solve(challenge, difficulty) {
  for (let i = 0; ; i++) {
    const h = crypto.createHash('sha256').update(`${challenge}:${i.toString(36)}`).digest();
    let bits = 0;
    for (const b of h) { if (b === 0) { bits += 8; continue; } bits += Math.clz32(b) - 24; break; }
    if (bits >= difficulty) return i.toString(36);
  }
}

test('the proof of work rises with an address\'s challenges over all the instances, not per instance', async () => {
  // the instances believe nginx's X-Forwarded-For, so a test can be an address of its own
  const from = { 'X-Forwarded-For': '192.0.2.40' };
  let last;
  for (let i = 0; i < 40; i++) {
    const r = await api(c.nodes[i % 3], 'POST', '/v1/auth/challenge', { headers: from });
    assert.equal(r.status, 200, r.text);
    last = r.json.difficulty;
  }
  // one backlog of ~40 (draining 1 a second): 8 + floor(2 log2(40 / 4)) = 14, at least
  // 13 whatever the drain; three backlogs of ~13 would say 8 + 3 = 11
  assert.ok(last >= 13, `difficulty ${last} after 40 challenges over 3 instances`);
});

test('an answered challenge buys one token across the instances', async () => {
  const from = { 'X-Forwarded-For': '192.0.2.41' };
  const ch = (await api(c.nodes[0], 'POST', '/v1/auth/challenge', { headers: from })).json;
  assert.equal(ch.difficulty, 8);
  const body = { challenge: ch.challenge, nonce: solve(ch.challenge, ch.difficulty) };
  const first = await api(c.nodes[1], 'POST', '/v1/auth/anonymous', { headers: from, body });
  assert.equal(first.status, 201, first.text);
  const again = await api(c.nodes[2], 'POST', '/v1/auth/anonymous', { headers: from, body });
  assert.equal(again.status, 403, again.text);
  assert.equal(again.json.error.code, 'POW_FAILED');
});

test('Redis down: each instance limits on its own; back up: shared again', async () => {
  await c.stopService('redis');
  await sleep(500);
  const statuses = [];
  for (let i = 0; i < 3; i++) statuses.push((await login(c.nodes[0])).status);
  assert.ok(statuses.every((s) => s === 401 || s === 429), statuses.join(','));
  await c.startService('redis');
  await sleep(3000);
  const r = await login(c.nodes[1]);
  assert.ok(r.status === 401 || r.status === 429, r.text);
});
