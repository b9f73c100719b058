// The live room (issue 17 item 1): hundreds of phones behind one address get in with the
// default limits, while an address that asks for thousands of anonymous device tokens
// pays more work for each. The proof of work's difficulty is the address's: it rises
// with its recent challenges (tly_pow_difficulty: 14 bits up to a backlog of 362, one
// more bit each time the backlog grows by sqrt(2), 22 from 4,096) and falls back as the
// backlog drains (--pow-rate a minute). A challenge is bound to the address and the
// difficulty it was issued at.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { startServer, api, createPoll, assertError } from './harness.mjs';

const servers = [];
after(async () => { await Promise.all(servers.map((s) => s.close())); });
async function serve(opts) {
  const s = await startServer(opts);
  servers.push(s);
  return s;
}

// What the server asks by default: limits on, the proof of work at its defaults.
const DEFAULTS = { env: { TALLY_RATE_LIMITS: 'on', TALLY_POW_DIFFICULTY: '14' } };

function zeroBits(buf) {
  let bits = 0;
  for (const b of buf) {
    if (b === 0) { bits += 8; continue; }
    bits += Math.clz32(b) - 24;
    break;
  }
  return bits;
}

/** A nonce for `challenge` at `difficulty` (what pow.test.mjs and the web app's pow.js do). */
function solve(challenge, difficulty) {
  for (let i = 0; ; i++) {
    const nonce = i.toString(36);
    if (zeroBits(crypto.createHash('sha256').update(`${challenge}:${nonce}`).digest()) >= difficulty) return nonce;
  }
}

// Phones solve in parallel, each on its own CPU; here two worker threads share the
// machine's cores (the solving is the same as solve()).
const SOLVER = `
const { parentPort } = require('node:worker_threads');
const crypto = require('node:crypto');
function zeroBits(buf) {
  let bits = 0;
  for (const b of buf) { if (b === 0) { bits += 8; continue; } bits += Math.clz32(b) - 24; break; }
  return bits;
}
parentPort.on('message', ({ id, challenge, difficulty }) => {
  for (let i = 0; ; i++) {
    const nonce = i.toString(36);
    if (zeroBits(crypto.createHash('sha256').update(challenge + ':' + nonce).digest()) >= difficulty) {
      parentPort.postMessage({ id, nonce });
      return;
    }
  }
});`;

function solverPool(n) {
  const workers = Array.from({ length: n }, () => new Worker(SOLVER, { eval: true }));
  const waiting = new Map();
  let next = 0;
  for (const w of workers) w.on('message', ({ id, nonce }) => { waiting.get(id)(nonce); waiting.delete(id); });
  return {
    solve(challenge, difficulty) {
      const id = next++;
      return new Promise((resolve) => {
        waiting.set(id, resolve);
        workers[id % n].postMessage({ id, challenge, difficulty });
      });
    },
    close: () => Promise.all(workers.map((w) => w.terminate())),
  };
}

const challenge = (s, headers) => api(s, 'POST', '/v1/auth/challenge', { headers });

test('5,000 challenges from one address in a minute: the difficulty rises past each threshold, other addresses stay at the base', async () => {
  const s = await serve({ ...DEFAULTS, args: ['--trusted-proxies', '127.0.0.1'] });
  const from = { 'X-Forwarded-For': '198.51.100.7' };
  const seen = new Array(5000);
  // a few requests in flight at once, as a script would; each challenge counts once
  let i = 0;
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (i < 5000) {
      const k = i++;
      const r = await challenge(s, from);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.algorithm, 'sha256-leading-zero-bits');
      seen[k] = r.json.difficulty;
    }
  }));
  // The backlog drains by 60 a minute, so at the k-th challenge it is between k - 60
  // (had the run taken a minute) and k: the thresholds below hold with that margin.
  const maxUpTo = (k) => Math.max(...seen.slice(0, k));
  const minFrom = (k) => Math.min(...seen.slice(k - 1));
  assert.equal(maxUpTo(256), 14, 'a room\'s worth of challenges costs the base');
  assert.ok(minFrom(600) >= 16, `after 600: ${minFrom(600)}`);
  assert.ok(minFrom(1100) >= 18, `after 1,100: ${minFrom(1100)}`);
  assert.ok(minFrom(2200) >= 20, `after 2,200: ${minFrom(2200)}`);
  assert.equal(minFrom(4200), 22, 'the top: 256 times the base work per token');
  assert.equal(Math.max(...seen), 22, 'never beyond --pow-max-difficulty');
  const at = (k) => seen[k - 1];
  assert.ok(at(1) < at(600) && at(600) < at(1100) && at(1100) < at(2200) && at(2200) < at(5000),
    `strictly growing: ${[1, 600, 1100, 2200, 5000].map(at).join(' < ')}`);
  // another address is not affected
  const other = await challenge(s, { 'X-Forwarded-For': '198.51.100.8' });
  assert.equal(other.json.difficulty, 14);
});

test('a challenge is bound to its address and to the difficulty it was issued at', async () => {
  const s = await serve({ env: { TALLY_POW_DIFFICULTY: '10' },
    args: ['--trusted-proxies', '127.0.0.1', '--pow-burst', '4', '--pow-max-difficulty', '12'] });
  const a = { 'X-Forwarded-For': '203.0.113.10' }, b = { 'X-Forwarded-For': '203.0.113.11' };
  const early = (await challenge(s, a)).json;
  assert.equal(early.difficulty, 10);
  const nonce = solve(early.challenge, early.difficulty);
  // from another address: refused (it was issued to a), and not used up by the refusal
  assertError(await api(s, 'POST', '/v1/auth/anonymous', { headers: b, body: { challenge: early.challenge, nonce } }),
    403, 'POW_FAILED');
  // the address asks for more: its difficulty rises...
  let last;
  for (let i = 0; i < 20; i++) last = (await challenge(s, a)).json;
  assert.equal(last.difficulty, 12);
  // ...and the early challenge is still answered at the difficulty it was issued at
  const r = await api(s, 'POST', '/v1/auth/anonymous', { headers: a, body: { challenge: early.challenge, nonce } });
  assert.equal(r.status, 201, r.text);
  // claiming the higher challenge was issued at the lower difficulty breaks its MAC
  const [exp, rnd, , mac] = last.challenge.split('.');
  const forged = `${exp}.${rnd}.10.${mac}`;
  assertError(await api(s, 'POST', '/v1/auth/anonymous',
    { headers: a, body: { challenge: forged, nonce: solve(forged, 10) } }), 403, 'POW_FAILED');
  const honest = await api(s, 'POST', '/v1/auth/anonymous',
    { headers: a, body: { challenge: last.challenge, nonce: solve(last.challenge, 12) } });
  assert.equal(honest.status, 201, honest.text);
});

test('the difficulty falls back to the base once the address slows down', async () => {
  // a quick backlog for the test: the base for 4, then up; drains by 600 a minute
  const s = await serve({ env: { TALLY_POW_DIFFICULTY: '8' },
    args: ['--pow-burst', '4', '--pow-rate', '600', '--pow-max-difficulty', '16'] });
  const burst = await Promise.all(Array.from({ length: 100 }, () => challenge(s)));
  const top = Math.max(...burst.map((r) => r.json.difficulty));
  assert.ok(top > 8, `a burst of 100 raised it (to ${top})`);
  // asked every 250 ms (4 a second against a drain of 10): back at the base soon
  const deadline = Date.now() + 30_000;
  let d = top;
  while (d !== 8 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    d = (await challenge(s)).json.difficulty;
  }
  assert.equal(d, 8, 'back at the base within 30 s');
});

test('--pow-max-difficulty at the base keeps it fixed; --rate-limits off does not turn the curve off', async () => {
  const fixed = await serve({ env: { TALLY_POW_DIFFICULTY: '8' }, args: ['--pow-burst', '1', '--pow-max-difficulty', '8'] });
  const adaptive = await serve({ env: { TALLY_POW_DIFFICULTY: '8', TALLY_RATE_LIMITS: 'off' }, args: ['--pow-burst', '1'] });
  let f, a;
  for (let i = 0; i < 20; i++) {
    f = (await challenge(fixed)).json.difficulty;
    a = (await challenge(adaptive)).json.difficulty;
  }
  assert.equal(f, 8);
  assert.equal(a, 16, 'a backlog of 20 over a burst of 1: 8 + floor(2 log2 20)');
});

// The room's minute is the server's: each phone solves its proof of work on its own CPU,
// all at once, so the solving is timed apart (here two threads stand in for 300 phones,
// and a busy machine must not make the room look slow). The server sees the whole room
// within seconds, a harder burst than a room arriving over a minute.
test('a room of 300 anonymous devices behind one address votes within 60 s with the default limits; all 300 counted', async () => {
  const s = await serve(DEFAULTS);
  const owner = s.mint('speaker-room');
  const poll = await createPoll(s, owner, {
    title: 'Which talk next?', options: [{ text: 'Storage' }, { text: 'Networks' }, { text: 'Compilers' }],
    settings: { allow_anonymous: true },
  });
  const N = 300;
  const statuses = {};
  const count = (k) => { statuses[k] = (statuses[k] || 0) + 1; };
  const each = (fn) => {
    let next = 0;
    return Promise.all(Array.from({ length: 16 }, async () => {
      while (next < N) { const k = next++; await fn(k); }
    }));
  };
  // 1. every phone opens the poll's page: a challenge each
  let t0 = Date.now();
  const challenges = new Array(N);
  await each(async (k) => {
    const ch = await challenge(s);
    assert.equal(ch.status, 200, ch.text);
    challenges[k] = ch.json;
  });
  let serverMs = Date.now() - t0;
  assert.deepEqual([...new Set(challenges.map((c) => c.difficulty))], [14], 'every phone is asked for the base');
  // 2. each phone solves its own, in parallel (not the server's time)
  const pool = solverPool(2);
  let nonces;
  try {
    nonces = await Promise.all(challenges.map((c) => pool.solve(c.challenge, c.difficulty)));
  } finally {
    await pool.close();
  }
  // 3. a device token each, and the ballot
  t0 = Date.now();
  await each(async (k) => {
    const tok = await api(s, 'POST', '/v1/auth/anonymous', { body: { challenge: challenges[k].challenge, nonce: nonces[k] } });
    count(`token ${tok.status}`);
    if (tok.status !== 201) return;
    const vote = await api(s, 'POST', `/v1/polls/${poll.poll_id}/votes`,
      { token: tok.json.token, body: { option_id: poll.options[k % 3].option_id } });
    count(`vote ${vote.status}`);
  });
  serverMs += Date.now() - t0;
  assert.deepEqual(statuses, { 'token 201': N, 'vote 200': N });
  const res = await api(s, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: owner });
  assert.equal(res.json.total_votes, N);
  assert.deepEqual(res.json.options.map((o) => o.votes), [100, 100, 100]);
  assert.ok(serverMs < 60_000, `the server took the room in ${serverMs} ms`);
});
