// Many instances on one PostgreSQL and one Redis, behind nginx (scripts/cluster.sh):
// exactly-once ballots however voters retry and race across instances, live results
// across instances, and no acknowledged vote lost when an instance is killed or Redis or
// PostgreSQL restart under load.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { api, mintToken, sleep } from '../api/harness.mjs';
import { openSse } from '../live/client.mjs';
import { startCluster } from './cluster.mjs';

const run = promisify(execFile);
let c;
before(async () => { c = await startCluster(); });
after(async () => { if (c) await c.stop(); });

const tok = (sub) => mintToken(c.secret, sub);

async function newPoll(overrides = {}) {
  const owner = tok(`owner-${Math.random().toString(36).slice(2)}`);
  const res = await api(c.lb, 'POST', '/v1/polls', {
    token: owner,
    body: { title: 'Cluster poll', options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }], ...overrides },
  });
  assert.equal(res.status, 201, res.text);
  return { poll: res.json, owner };
}

function vote(server, voter, pollId, optionId, key, extra = {}) {
  const headers = key ? { 'Idempotency-Key': key, ...extra } : extra;
  return api(server, 'POST', `/v1/polls/${pollId}/votes`, { token: tok(voter), body: { option_id: optionId }, headers });
}

/** Runs fn(i) for i in [0, n) with at most `width` at once. */
async function pool(n, width, fn) {
  let next = 0;
  const out = new Array(n);
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < n) {
      const i = next++;
      out[i] = await fn(i);
    }
  }));
  return out;
}

/** Polls fn until it returns truthy or ms pass; returns the last value. */
async function eventually(fn, ms, what) {
  const end = Date.now() + ms;
  let v;
  while (Date.now() < end) {
    v = await fn();
    if (v) return v;
    await sleep(100);
  }
  assert.fail(`${what}: not within ${ms} ms (last: ${JSON.stringify(v)})`);
}

async function storeCounts(pollId) {
  const [[ballots]] = await c.sql(`SELECT count(*) FROM ballots WHERE poll_id = '${pollId}'`);
  const [[counted]] = await c.sql(`SELECT coalesce(sum(ballots), 0) FROM poll_counts WHERE poll_id = '${pollId}'`);
  const drift = await c.sql(
    `SELECT oc.position, oc.votes, (SELECT count(*) FROM ballots b WHERE b.poll_id = oc.poll_id
       AND EXISTS (SELECT 1 FROM generate_series(0, length(b.choices) - 1) i
                   WHERE get_byte(b.choices, i) = oc.position)) AS real
     FROM option_counts oc WHERE oc.poll_id = '${pollId}'`);
  return { ballots: Number(ballots), counted: Number(counted), drift: drift.filter((r) => r[1] !== r[2]) };
}

async function totalsEverywhere(pollId, want) {
  for (const n of c.nodes) {
    await eventually(async () => {
      const r = await api(n, 'GET', `/v1/polls/${pollId}/results`);
      return r.status === 200 && r.json.total_votes === want;
    }, 5000, `${n.name} shows ${want} ballots`);
  }
}

test('5,000 voters at once, retries spread over the instances: 5,000 ballots, counters equal', async () => {
  const { poll } = await newPoll();
  const opts = poll.options.map((o) => o.option_id);
  const N = 5000;
  const results = await pool(N, 96, async (i) => {
    const voter = `voter-${i}`;
    const key = `k-${i}`;
    const opt = opts[i % 3];
    const first = c.nodes[i % 3];
    const tries = [vote(first, voter, poll.poll_id, opt, key)];
    // a third of the voters send the same request to a second instance at the same time
    if (i % 3 === 0) tries.push(vote(c.nodes[(i + 1) % 3], voter, poll.poll_id, opt, key));
    const answers = await Promise.all(tries);
    // and every voter retries once more through another instance (a lost reply)
    answers.push(await vote(c.nodes[(i + 2) % 3], voter, poll.poll_id, opt, key));
    return answers;
  });
  const ids = new Set();
  for (const [i, answers] of results.entries()) {
    for (const a of answers) assert.equal(a.status, 200, `voter ${i}: ${a.status} ${a.text}`);
    const vids = new Set(answers.map((a) => a.json.vote_id));
    assert.equal(vids.size, 1, `voter ${i} got several vote ids: ${[...vids]}`);
    ids.add([...vids][0]);
  }
  assert.equal(ids.size, N);
  const s = await storeCounts(poll.poll_id);
  assert.equal(s.ballots, N);
  assert.equal(s.counted, N);
  assert.deepEqual(s.drift, []);
  await totalsEverywhere(poll.poll_id, N);
});

test('one voter hammering every instance at once gets one ballot', async () => {
  const { poll } = await newPoll();
  const opt = poll.options[0].option_id;
  const answers = await Promise.all(Array.from({ length: 30 }, (_, i) =>
    vote(c.nodes[i % 3], 'hammer', poll.poll_id, opt)));
  const ok = answers.filter((a) => a.status === 200);
  assert.equal(ok.length, 1, answers.map((a) => a.status).join(','));
  for (const a of answers.filter((x) => x.status !== 200)) {
    assert.equal(a.status, 409, a.text);
    assert.equal(a.json.error.code, 'ALREADY_VOTED');
  }
  assert.equal((await storeCounts(poll.poll_id)).ballots, 1);
  await totalsEverywhere(poll.poll_id, 1);
});

test('a watcher on one instance sees votes cast on the others within a second', async () => {
  const { poll } = await newPoll();
  const s = await openSse(c.nodes[0], `/v1/polls/${poll.poll_id}/live`, {});
  assert.equal(s.status, 200);
  try {
    await s.waitFor((e) => e.json?.total_votes === 0, 2000, 'the first state');
    const t0 = Date.now();
    assert.equal((await vote(c.nodes[1], 'w1', poll.poll_id, poll.options[0].option_id)).status, 200);
    await s.waitFor((e) => e.json?.total_votes === 1, 1500, 'the vote from instance 2');
    assert.equal((await vote(c.nodes[2], 'w2', poll.poll_id, poll.options[1].option_id)).status, 200);
    await s.waitFor((e) => e.json?.total_votes === 2, 1500, 'the vote from instance 3');
    assert.ok(Date.now() - t0 < 3000);
    const m = await api(c.nodes[0], 'GET', '/metrics');
    const followed = Number(/^tally_follow_ops_total (\d+)$/m.exec(m.text)?.[1]);
    assert.ok(followed >= 2, `tally_follow_ops_total ${followed}`);
    assert.match(m.text, /^tally_bus_up 1$/m);
  } finally {
    s.close?.();
  }
});

test('a poll made on one instance can be voted on, changed and read at once on another', async () => {
  const owner = tok('owner-fresh');
  const created = await api(c.nodes[0], 'POST', '/v1/polls', {
    token: owner,
    body: { title: 'Fresh', options: [{ text: 'A' }, { text: 'B' }], settings: { allow_vote_change: true } },
  });
  assert.equal(created.status, 201, created.text);
  const p = created.json;
  const cast = await vote(c.nodes[1], 'fresh-voter', p.poll_id, p.options[0].option_id);
  assert.equal(cast.status, 200, cast.text);
  const changed = await api(c.nodes[2], 'PUT', `/v1/polls/${p.poll_id}/votes/me`,
    { token: tok('fresh-voter'), body: { option_id: p.options[1].option_id } });
  assert.equal(changed.status, 200, changed.text);
  const closed = await api(c.nodes[1], 'PATCH', `/v1/polls/${p.poll_id}`, { token: owner, body: { status: 'closed' } });
  assert.equal(closed.status, 200, closed.text);
  for (const n of c.nodes) {
    await eventually(async () => {
      const r = await api(n, 'GET', `/v1/polls/${p.poll_id}/results`);
      return r.status === 200 && r.json.status === 'closed' && r.json.options.find((o) => o.option_id ===
        p.options[1].option_id).votes === 1;
    }, 3000, `${n.name} shows the change and the close`);
  }
});

test('a poll made on one instance is found by its join code at once on the others; closed on one, its code leads nowhere on any', async () => {
  const owner = tok('owner-code');
  const created = await api(c.nodes[0], 'POST', '/v1/polls', { token: owner, body: { title: 'Code', options: [{ text: 'A' }, { text: 'B' }] } });
  assert.equal(created.status, 201, created.text);
  const p = created.json;
  assert.match(p.join_code, /^[23456789ABCDEFGHJKLMNPQRSTUVWXYZ]{6}$/);
  // at once: an instance that has not followed the feed yet catches up before it answers
  const byCode = await api(c.nodes[1], 'GET', `/v1/join/${p.join_code.toLowerCase()}`);
  assert.equal(byCode.status, 200, byCode.text);
  assert.equal(byCode.json.poll_id, p.poll_id);
  const page = await api(c.nodes[2], 'GET', `/j/${p.join_code}`);
  assert.equal(page.status, 302);
  assert.equal(page.headers.get('location'), `/p/${p.poll_id}`);
  assert.equal((await api(c.lb, 'GET', `/j/${p.join_code}`)).headers.get('location'), `/p/${p.poll_id}`, 'through nginx');
  const closed = await api(c.nodes[1], 'PATCH', `/v1/polls/${p.poll_id}`, { token: owner, body: { status: 'closed' } });
  assert.equal(closed.status, 200, closed.text);
  assert.equal(closed.json.join_code, null);
  for (const n of c.nodes) {
    await eventually(async () => (await api(n, 'GET', `/v1/join/${p.join_code}`)).status === 404, 3000,
      `${n.name} no longer finds the closed poll by its code`);
  }
  const [[stored]] = await c.sql(`SELECT coalesce(join_code, 'none') FROM polls WHERE poll_id = '${p.poll_id}'`);
  assert.equal(stored, 'none', 'the store freed the code');
});

test('a ballot retracted on one instance stays retracted when its first POST is retried on another', async () => {
  const { poll } = await newPoll({ settings: { allow_vote_change: true } });
  const [a] = poll.options.map((o) => o.option_id);
  const first = await vote(c.nodes[0], 'retractor', poll.poll_id, a, 'retract-key');
  assert.equal(first.status, 200, first.text);
  const gone = await api(c.nodes[1], 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok('retractor') });
  assert.equal(gone.status, 204, gone.text);
  // the instance that cast it and a third one both learn the retraction from the feed
  for (const n of [c.nodes[0], c.nodes[2]]) {
    const late = await eventually(async () => {
      const r = await vote(n, 'retractor', poll.poll_id, a, 'retract-key');
      return r.status === 409 ? r : null;
    }, 3000, `${n.name} refuses the late retry`);
    assert.equal(late.json.error.code, 'VOTE_RETRACTED', late.text);
  }
  assert.equal((await storeCounts(poll.poll_id)).ballots, 0);
});

test('a poll closing by its end_time mid-load: every instance serves the same final results, with every acknowledged ballot', async () => {
  const end = Date.now() + 2500;
  const { poll } = await newPoll({ end_time: new Date(end).toISOString() });
  const opts = poll.options.map((o) => o.option_id);
  // ballots go to one instance, results are read from the others: they settle the final
  // tally while the voting instance still has ballots on their way to the store
  const [voteNode, ...readers] = c.nodes;
  const watcher = await openSse(readers[1], `/v1/polls/${poll.poll_id}/live`, {});
  assert.equal(watcher.status, 200);
  const acked = new Map();
  let refused = 0;
  let n = 0;
  const voters = Array.from({ length: 16 }, async () => {
    while (Date.now() < end + 500) {
      const voter = `closer-${n++}`;
      const r = await vote(voteNode, voter, poll.poll_id, opts[n % opts.length], `key-${voter}`);
      if (r.status === 200) acked.set(voter, r.json.vote_id);
      else if (r.status === 409 && r.json.error.code === 'POLL_NOT_ACTIVE') refused++;
      else assert.fail(`${voter}: ${r.status} ${r.text}`);
    }
  });
  const reads = readers.map(async (node) => {
    while (Date.now() < end + 500) {
      const r = await api(node, 'GET', `/v1/polls/${poll.poll_id}/results`);
      assert.equal(r.status, 200, r.text);
      await sleep(10);
    }
  });
  await Promise.all([...voters, ...reads]);
  assert.ok(acked.size > 0 && refused > 0, `${acked.size} acknowledged, ${refused} refused`);

  const finals = [];
  for (const node of c.nodes) {
    const r = await eventually(async () => {
      const x = await api(node, 'GET', `/v1/polls/${poll.poll_id}/results`);
      return x.status === 200 && x.json.final === true ? x : null;
    }, 5000, `${node.name} serves final results`);
    const { votes_last_minute: _, ...final } = r.json;
    finals.push(final);
  }
  assert.deepEqual(finals[1], finals[0], 'the same final results everywhere');
  assert.deepEqual(finals[2], finals[0], 'the same final results everywhere');
  assert.equal(finals[0].total_votes, acked.size, 'every acknowledged ballot, and no other, is in the final results');
  assert.equal(await checkAcked(poll.poll_id, acked), acked.size);
  const [[stored]] = await c.sql(`SELECT final_results FROM polls WHERE poll_id = '${poll.poll_id}'`);
  assert.equal(JSON.parse(stored).total_votes, acked.size);
  // a watcher's last message is the final results, and then the stream says it is over
  try {
    const last = await watcher.waitFor((e) => e.json?.final === true, 5000, 'the final results on the stream');
    assert.equal(last.json.total_votes, acked.size);
    await watcher.waitFor((e) => e.event === 'closed', 2000, 'the closed event');
  } finally {
    watcher.close?.();
  }
});

/** Votes through nginx until `stop` is set, retrying each voter (same key) until it gets
 *  an answer that is not 5xx or a dropped connection; returns the acknowledged voters. */
function loadThroughLb(pollId, opts, prefix, stop) {
  const acked = new Map();
  let errors = 0;
  let i = 0;
  const worker = async () => {
    while (!stop.done) {
      const n = i++;
      const voter = `${prefix}-${n}`;
      for (let attempt = 0; attempt < 200 && !stop.done; attempt++) {
        let r;
        try {
          r = await vote(c.lb, voter, pollId, opts[n % opts.length], `key-${voter}`);
        } catch {
          errors++;
          await sleep(50);
          continue;
        }
        if (r.status === 200) {
          acked.set(voter, r.json.vote_id);
          break;
        }
        if (r.status >= 500) {
          errors++;
          await sleep(50);
          continue;
        }
        assert.fail(`${voter}: ${r.status} ${r.text}`);
      }
    }
  };
  const done = Promise.all(Array.from({ length: 16 }, worker));
  return { acked, done, errors: () => errors };
}

async function checkAcked(pollId, acked) {
  const rows = await c.sql(`SELECT voter_id, vote_id FROM ballots WHERE poll_id = '${pollId}'`);
  const stored = new Map(rows.map(([v, id]) => [v, id]));
  for (const [voter, id] of acked) assert.equal(stored.get(voter), id, `acknowledged ${voter} missing or changed`);
  const s = await storeCounts(pollId);
  assert.equal(s.ballots, stored.size);
  assert.equal(s.counted, stored.size);
  assert.deepEqual(s.drift, []);
  return stored.size;
}

/** Runs body(load) while loadThroughLb votes on the poll; the load stops when body ends,
 *  however it ends, and a voter's failure stops the load and fails the test. */
async function underLoad(poll, prefix, body) {
  const stop = { done: false };
  const load = loadThroughLb(poll.poll_id, poll.options.map((o) => o.option_id), prefix, stop);
  load.done.catch(() => { stop.done = true; });
  try {
    await body(load);
  } finally {
    stop.done = true;
    await load.done.catch(() => {});
  }
  await load.done;
  return load;
}

test('kill -9 of one instance mid-load loses no acknowledged vote', async () => {
  const { poll } = await newPoll();
  let victim;
  try {
    const load = await underLoad(poll, 'k9', async () => {
      await sleep(1500);
      // the one that takes the poll's ballots from nginx: the others take none of them
      victim = c.voteTarget(poll.poll_id);
      assert.ok(victim, 'nginx sent ballots of the poll to an instance');
      await c.kill(victim.name, 'KILL');
      await sleep(1500);
      await c.start(victim.name);
      await sleep(1500);
    });
    assert.ok(load.acked.size > 100, `only ${load.acked.size} votes acknowledged`);
    const n = await checkAcked(poll.poll_id, load.acked);
    await totalsEverywhere(poll.poll_id, n);
  } finally {
    if (victim) await c.ensureRunning(victim.name);
  }
});

test('Redis stopped and started again mid-load: votes go on, live results come back', async () => {
  const { poll } = await newPoll();
  let n;
  try {
    const load = await underLoad(poll, 'rd', async (l) => {
      await sleep(1000);
      await c.stopService('redis');
      const during = l.acked.size;
      await sleep(2000);
      assert.ok(l.acked.size > during, 'votes were accepted while Redis was down');
      await c.startService('redis');
      await sleep(2000);
    });
    n = await checkAcked(poll.poll_id, load.acked);
  } finally {
    await c.ensureRunning('redis');
  }
  await totalsEverywhere(poll.poll_id, n);
  const s = await openSse(c.nodes[0], `/v1/polls/${poll.poll_id}/live`, {});
  try {
    await s.waitFor((e) => e.json?.total_votes === n, 2000, 'the current state');
    assert.equal((await vote(c.nodes[2], 'after-redis', poll.poll_id, poll.options[0].option_id)).status, 200);
    await s.waitFor((e) => e.json?.total_votes === n + 1, 1500, 'a vote from another instance');
  } finally {
    s.close?.();
  }
});

test('PostgreSQL restarted mid-load: 503 with Retry-After meanwhile, nothing acknowledged lost', async () => {
  const { poll } = await newPoll();
  try {
    const load = await underLoad(poll, 'pg', async () => {
      await sleep(1000);
      await c.stopService('pg');
      await sleep(300);
      const r = await vote(c.nodes[0], 'while-down', poll.poll_id, poll.options[0].option_id, 'wd');
      assert.equal(r.status, 503, r.text);
      assert.ok(r.headers.get('retry-after'), 'Retry-After');
      assert.equal(r.json.error.code, 'UNAVAILABLE');
      await sleep(1000);
      await c.startService('pg');
      await sleep(4000);
    });
    assert.ok(load.errors() > 0, 'the outage was seen');
    const n = await checkAcked(poll.poll_id, load.acked);
    await totalsEverywhere(poll.poll_id, n);
  } finally {
    await c.ensureRunning('pg');
  }
});

async function requestState(server, voter, pollId, rid) {
  const r = await api(server, 'GET', `/v1/polls/${pollId}/votes/requests/${rid}`, { token: tok(voter) });
  return r.status === 200 ? r.json : { state: `HTTP ${r.status}` };
}

test('async votes: into the ingest log (202), retried across instances, one killed: each applied once', async () => {
  const { poll } = await newPoll();
  const opts = poll.options.map((o) => o.option_id);
  const N = 1500;
  const async = { Prefer: 'respond-async' };
  let killed = false;
  let accepted;
  try {
    accepted = await pool(N, 48, async (i) => {
      if (i === 500 && !killed) {
        killed = true;
        await c.kill('tally-3', 'KILL');
      }
      const voter = `async-${i}`;
      const key = `ak-${i}`;
      // a request in flight to the instance being killed fails: sent again elsewhere
      const send = async (k) => {
        for (let t = 0; ; t++) {
          const live = killed ? c.nodes.slice(0, 2) : c.nodes;
          try {
            return await vote(live[(k + t) % live.length], voter, poll.poll_id, opts[i % 3], key, async);
          } catch (e) {
            if (t > 5) throw e;
          }
        }
      };
      const a = await send(i);
      assert.equal(a.status, 202, `voter ${i}: ${a.status} ${a.text}`);
      assert.equal(a.json.status, 'accepted');
      // the same request again on another instance: its first answer, the same request id
      // (from the log's dedup key while in the log, from memory once applied)
      const b = await send(i + 1);
      assert.equal(b.status, 202, `voter ${i} retry: ${b.status} ${b.text}`);
      assert.equal(b.json.request_id, a.json.request_id);
      return a.json.request_id;
    });
    await c.start('tally-3'); // its unacknowledged entries are claimed by the others meanwhile
  } finally {
    await c.ensureRunning('tally-3');
  }
  // one deadline for all of them: a stuck ingest fails the test in a minute, not N times 20 s
  const deadline = Date.now() + 60_000;
  for (let i = 0; i < N; i += 1) {
    await eventually(async () => {
      const s = await requestState(c.nodes[i % 3], `async-${i}`, poll.poll_id, accepted[i]);
      return s.state === 'completed' ? s : null;
    }, Math.max(1000, deadline - Date.now()), `request of voter ${i} completed`);
  }
  const s = await storeCounts(poll.poll_id);
  assert.equal(s.ballots, N);
  assert.equal(s.counted, N);
  assert.deepEqual(s.drift, []);
  const [[reqs]] = await c.sql(`SELECT count(*) FROM vote_requests WHERE poll_id = '${poll.poll_id}' AND state = 'completed'`);
  assert.equal(Number(reqs), N);
  await totalsEverywhere(poll.poll_id, N);
});

test('an async ballot the ingest log refuses goes straight into the store (202 once durable); retries, retractions and closes work as ever', async () => {
  const { poll, owner } = await newPoll({ settings: { allow_vote_change: true } });
  const opt = poll.options[0].option_id;
  const async = { Prefer: 'respond-async' };
  const redis = (...args) => run('redis-cli', ['-u', c.info.redis, ...args]);
  // Redis up but refusing writes: the log's script fails, the instance stays "up"
  await redis('CONFIG', 'SET', 'min-replicas-to-write', '1');
  try {
    const a = await vote(c.nodes[0], 'fallback-1', poll.poll_id, opt, 'fb-1', async);
    assert.equal(a.status, 202, a.text);
    const [[n]] = await c.sql(`SELECT count(*) FROM ballots WHERE poll_id = '${poll.poll_id}' AND voter_id = 'fallback-1'`);
    assert.equal(Number(n), 1, 'durable in the store when answered');
    assert.match(c.nodes[0].logs(), /ingest log unavailable, vote stored directly/);
    const st = await requestState(c.nodes[0], 'fallback-1', poll.poll_id, a.json.request_id);
    assert.equal(st.state, 'completed');
    // the same request again: its first answer (the 202 with the same request_id, as any
    // retry of an async vote gets), not a second ballot
    const again = await vote(c.nodes[0], 'fallback-1', poll.poll_id, opt, 'fb-1', async);
    assert.equal(again.status, 202, again.text);
    assert.equal(again.json.request_id, a.json.request_id);
    assert.equal((await storeCounts(poll.poll_id)).ballots, 1);
    // retracted, then the first request retried: refused as on the synchronous path
    const gone = await api(c.nodes[0], 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok('fallback-1') });
    assert.equal(gone.status, 204, gone.text);
    const late = await vote(c.nodes[0], 'fallback-1', poll.poll_id, opt, 'fb-1', async);
    assert.equal(late.status, 409, late.text);
    assert.equal(late.json.error.code, 'VOTE_RETRACTED');
    const closed = await api(c.nodes[0], 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { status: 'closed' } });
    assert.equal(closed.status, 200, closed.text);
    const shut = await vote(c.nodes[0], 'fallback-2', poll.poll_id, opt, 'fb-2', async);
    assert.equal(shut.status, 409, shut.text);
    assert.equal(shut.json.error.code, 'POLL_NOT_ACTIVE');
  } finally {
    await redis('CONFIG', 'SET', 'min-replicas-to-write', '0');
  }
});

test('an async ballot the log took before the end_time counts if it reaches the store before the final results, and fails POLL_NOT_ACTIVE after them', async () => {
  const end = Date.now() + 1000;
  const { poll } = await newPoll({ end_time: new Date(end).toISOString() });
  await sleep(end - Date.now() + 300);
  // entries as a consumer that took its time finds them: taken (202) before the close,
  // with the status hash the log's script writes beside each
  const enqueue = async (rid, voter) => {
    await run('redis-cli', ['-u', c.info.redis, 'HSET', `tally:req:${rid}`, 'state', 'pending', 'p', poll.poll_id,
      'v', voter]);
    await run('redis-cli', ['-u', c.info.redis, 'XADD', 'tally:ingest', '*', 'r', rid, 'p', poll.poll_id,
      'v', voter, 'c', '01', 's', '', 'k', '', 'h', '00'.repeat(16), 'i', '', 'm', '', 't', String(end - 500)]);
  };
  await enqueue('r_before_final', 'before-final');
  const done = await eventually(async () => {
    const x = await requestState(c.nodes[0], 'before-final', poll.poll_id, 'r_before_final');
    return x.state !== 'pending' && !x.state.startsWith('HTTP') ? x : null;
  }, 10_000, 'the entry applied');
  assert.equal(done.state, 'completed', JSON.stringify(done));
  for (const n of c.nodes) {
    const r = await eventually(async () => {
      const x = await api(n, 'GET', `/v1/polls/${poll.poll_id}/results`);
      return x.json?.final === true ? x : null;
    }, 5000, `${n.name} serves final results`);
    assert.equal(r.json.total_votes, 1, r.text);
    assert.equal(r.json.options[1].votes, 1, r.text);
  }
  await enqueue('r_after_final', 'after-final');
  const failed = await eventually(async () => {
    const x = await requestState(c.nodes[1], 'after-final', poll.poll_id, 'r_after_final');
    return x.state === 'failed' ? x : null;
  }, 10_000, 'the second entry failed');
  assert.equal(failed.error.code, 'POLL_NOT_ACTIVE');
  assert.equal((await storeCounts(poll.poll_id)).ballots, 1);
});

test('an async ballot of a voter who already voted fails ALREADY_VOTED; a broken entry goes to the dead letters', async () => {
  const { poll } = await newPoll();
  const opt = poll.options[0].option_id;
  assert.equal((await vote(c.nodes[0], 'sync-first', poll.poll_id, opt)).status, 200);
  const a = await vote(c.nodes[1], 'sync-first', poll.poll_id, opt, 'x1', { Prefer: 'respond-async' });
  // memory of instance 2 may already know the ballot (409) or not yet (202, then failed)
  if (a.status === 202) {
    const st = await eventually(async () => {
      const x = await requestState(c.nodes[2], 'sync-first', poll.poll_id, a.json.request_id);
      return x.state === 'failed' ? x : null;
    }, 10_000, 'the request failed');
    assert.equal(st.error.code, 'ALREADY_VOTED');
  } else {
    assert.equal(a.status, 409, a.text);
  }
  await run('redis-cli', ['-u', c.info.redis, 'XADD', 'tally:ingest', '*', 'r', 'r_broken', 'p', poll.poll_id]);
  const dead = await eventually(async () => {
    const { stdout } = await run('redis-cli', ['-u', c.info.redis, 'XRANGE', 'tally:ingest:dead', '-', '+']);
    return stdout.includes('r_broken') ? stdout : null;
  }, 10_000, 'the broken entry in tally:ingest:dead');
  assert.match(dead, /malformed entry/);
  await eventually(async () => {
    const { stdout: pending } = await run('redis-cli', ['-u', c.info.redis, 'XPENDING', 'tally:ingest', 'tally']);
    return /^0/.test(pending.trim());
  }, 15_000, 'every entry acknowledged');
});
