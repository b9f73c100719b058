// Reconciliation on a real cluster (scripts/cluster.sh): counter rows in PostgreSQL and
// live counters in Redis that drifted from the ballots are found by `tally reconcile`,
// put right by `tally reconcile --repair`, and put right by the instances themselves
// every --reconcile-interval seconds, which says so in /metrics.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { api, BIN, mintToken, sleep } from '../api/harness.mjs';
import { startCluster } from './cluster.mjs';

const run = promisify(execFile);

/** Polls fn until it returns truthy or ms pass; returns the last value. */
async function eventually(fn, ms, what) {
  const end = Date.now() + ms;
  let v;
  while (Date.now() < end) {
    v = await fn();
    if (v) return v;
    await sleep(200);
  }
  assert.fail(`${what}: not within ${ms} ms (last: ${JSON.stringify(v)})`);
}

async function redis(c, ...args) {
  const { stdout } = await run('redis-cli', ['-u', c.info.redis, '--no-raw', ...args], { timeout: 10_000 });
  return stdout;
}

/** The poll's Redis hash as {field: number}. */
async function redisCounts(c, pollId) {
  const { stdout } = await run('redis-cli', ['-u', c.info.redis, '--raw', 'HGETALL', `tally:counts:${pollId}`],
    { timeout: 10_000 });
  const lines = stdout.split('\n').filter((l) => l.length);
  const out = {};
  for (let i = 0; i + 1 < lines.length; i += 2) out[lines[i]] = Number(lines[i + 1]);
  return out;
}

/** a (Redis or rows) equals b (true counts); a field a has beyond b must be 0. */
const sameCounts = (a, b) => Object.keys(b).every((k) => a[k] === b[k])
  && Object.keys(a).every((k) => a[k] === (b[k] ?? 0));

/** True counts from the ballots: {ballots, '0': n, '1': n, ...} over the poll's options. */
async function trueCounts(c, pollId) {
  const rows = await c.sql(
    `SELECT o.position, (SELECT count(*) FROM ballots b WHERE b.poll_id = o.poll_id
       AND position(set_byte('\\x00'::bytea, 0, o.position) IN b.choices) > 0)
     FROM options o WHERE o.poll_id = '${pollId}' ORDER BY 1`);
  const [[ballots]] = await c.sql(`SELECT count(*) FROM ballots WHERE poll_id = '${pollId}'`);
  const out = { ballots: Number(ballots) };
  for (const [pos, n] of rows) out[pos] = Number(n);
  return out;
}

async function storedCounts(c, pollId) {
  const rows = await c.sql(`SELECT position, votes FROM option_counts WHERE poll_id = '${pollId}' ORDER BY 1`);
  const [[ballots]] = await c.sql(`SELECT ballots FROM poll_counts WHERE poll_id = '${pollId}'`);
  const out = { ballots: Number(ballots) };
  for (const [pos, n] of rows) out[pos] = Number(n);
  return out;
}

/** A poll of three options with 7 ballots (4 for A, 2 for B, 1 for C) through nginx; waits
 * until Redis's live counters have them all. */
async function pollWithBallots(c) {
  const owner = mintToken(c.secret, `owner-${Math.random().toString(36).slice(2)}`);
  const res = await api(c.lb, 'POST', '/v1/polls', {
    token: owner, body: { title: 'Reconcile', options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }] },
  });
  assert.equal(res.status, 201, res.text);
  const poll = res.json;
  const picks = [0, 0, 0, 0, 1, 1, 2];
  for (const [i, k] of picks.entries()) {
    const r = await api(c.nodes[i % c.nodes.length], 'POST', `/v1/polls/${poll.poll_id}/votes`, {
      token: mintToken(c.secret, `rv-${i}-${Math.random().toString(36).slice(2)}`),
      body: { option_id: poll.options[k].option_id },
    });
    assert.equal(r.status, 200, r.text);
  }
  const want = await trueCounts(c, poll.poll_id);
  assert.deepEqual(want, { ballots: 7, 0: 4, 1: 2, 2: 1 });
  await eventually(async () => sameCounts(await redisCounts(c, poll.poll_id), want), 5000,
    'Redis counts every ballot');
  return poll;
}

/** Runs `tally reconcile`; resolves {code, stdout, stderr} whatever the exit status. */
async function reconcile(c, ...extra) {
  try {
    const { stdout, stderr } = await run(BIN, ['reconcile', '--store', c.info.store, '--bus', c.info.redis, ...extra],
      { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    if (typeof e.code !== 'number') throw e;
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test('tally reconcile lists drifted counters (exit 1) and --repair puts them right (exit 0)', async () => {
  const c = await startCluster(); // the instances' own job: every 300 s, so not during this test
  try {
    const poll = await pollWithBallots(c);
    const id = poll.poll_id;
    const truth = await trueCounts(c, id);
    // drift: a counter row too high, a Redis field wrong, and one for a position the poll lacks
    await c.sql(`UPDATE option_counts SET votes = votes + 5 WHERE poll_id = '${id}' AND position = 1`);
    await redis(c, 'HSET', `tally:counts:${id}`, '0', '99', '9', '3');

    const check = await reconcile(c);
    assert.equal(check.code, 1, `${check.stdout}\n${check.stderr}`);
    assert.match(check.stdout, new RegExp(`drift store poll=${id} position=1 stored=7 actual=2 not-repaired`));
    assert.match(check.stdout, new RegExp(`drift redis poll=${id} position=0 stored=99 actual=4 not-repaired`));
    assert.match(check.stdout, new RegExp(`drift redis poll=${id} position=9 stored=3 actual=0 not-repaired`));
    assert.equal((await storedCounts(c, id))[1], 7, 'without --repair nothing changes');
    assert.equal((await redisCounts(c, id))[0], 99);

    const fix = await reconcile(c, '--repair');
    assert.equal(fix.code, 0, `${fix.stdout}\n${fix.stderr}`);
    assert.match(fix.stdout, new RegExp(`drift store poll=${id} position=1 stored=7 actual=2 repaired`));
    assert.match(fix.stdout, new RegExp(`drift redis poll=${id} position=0 stored=99 actual=4 repaired`));
    assert.deepEqual(await storedCounts(c, id), truth);
    assert.deepEqual(await redisCounts(c, id), truth); // field 9 is gone

    const again = await reconcile(c);
    assert.equal(again.code, 0, `${again.stdout}\n${again.stderr}`);
    assert.doesNotMatch(again.stdout, /^drift /m);

    // and the repaired counters keep counting: one more ballot moves both
    const r = await api(c.lb, 'POST', `/v1/polls/${id}/votes`, {
      token: mintToken(c.secret, 'after-repair'), body: { option_id: poll.options[2].option_id },
    });
    assert.equal(r.status, 200, r.text);
    const after = { ...truth, ballots: truth.ballots + 1, 2: truth[2] + 1 };
    assert.deepEqual(await trueCounts(c, id), after);
    assert.deepEqual(await storedCounts(c, id), after);
    await eventually(async () => sameCounts(await redisCounts(c, id), after), 5000, 'Redis counts the new ballot');
  } finally {
    await c.stop();
  }
});

/** Sums a metric over every instance's /metrics. */
async function metricSum(c, re) {
  let sum = 0;
  for (const n of c.nodes) {
    const r = await api(n, 'GET', '/metrics');
    assert.equal(r.status, 200);
    const m = r.text.match(re);
    if (m) sum += Number(m[1]);
  }
  return sum;
}

test('with --reconcile-interval 1 the instances repair drift by themselves within seconds', async () => {
  const c = await startCluster({ args: ['--reconcile-interval', '1'] });
  try {
    const poll = await pollWithBallots(c);
    const id = poll.poll_id;
    const truth = await trueCounts(c, id);
    await eventually(async () => await metricSum(c, /^tally_reconcile_runs_total (\d+)$/m) > 0, 10_000,
      'an instance ran a reconciliation');
    const storeBefore = await metricSum(c, /^tally_reconcile_repairs_total\{where="store"\} (\d+)$/m);
    const redisBefore = await metricSum(c, /^tally_reconcile_repairs_total\{where="redis"\} (\d+)$/m);

    await c.sql(`UPDATE option_counts SET votes = 40 WHERE poll_id = '${id}' AND position = 2`);
    await c.sql(`UPDATE poll_counts SET ballots = 0 WHERE poll_id = '${id}'`);
    await redis(c, 'HSET', `tally:counts:${id}`, '1', '-3');

    await eventually(async () => sameCounts(await storedCounts(c, id), truth), 10_000, 'counter rows repaired');
    await eventually(async () => sameCounts(await redisCounts(c, id), truth), 10_000, 'Redis counters repaired');
    await eventually(async () =>
      await metricSum(c, /^tally_reconcile_repairs_total\{where="store"\} (\d+)$/m) >= storeBefore + 2
      && await metricSum(c, /^tally_reconcile_repairs_total\{where="redis"\} (\d+)$/m) >= redisBefore + 1,
    5000, 'the repairs in /metrics');
    const ts = await metricSum(c, /^tally_reconcile_last_run_timestamp_seconds ([\d.]+)$/m);
    assert.ok(ts > Date.now() / 1000 - 60, `a recent last run (${ts})`);
    // one line per repair in the logs, naming the counter
    const logs = c.info.instances.map((n) => fs.readFileSync(n.log, 'utf8')).join('\n');
    assert.match(logs, new RegExp(`"msg":"reconcile repaired".*"where":"store".*"poll_id":"${id}"`));
    assert.match(logs, new RegExp(`"msg":"reconcile repaired".*"where":"redis".*"poll_id":"${id}"`));
  } finally {
    await c.stop();
  }
});
