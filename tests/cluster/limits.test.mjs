// Rate limits shared by the instances of a cluster: the buckets live in Redis, so a
// client spreading its requests over every instance gets the limit once; with Redis
// gone each instance's own buckets decide.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { api, sleep } from '../api/harness.mjs';
import { startCluster } from './cluster.mjs';

let c;
before(async () => {
  c = await startCluster({ env: { TALLY_RATE_LIMITS: 'on', TALLY_RATE_AUTH_IP: '6' } });
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
