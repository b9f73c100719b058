// Allocation failure on request paths (issue 7, item 7). With every n-th allocation
// failing (TALLY_FAULT_ALLOC_EVERY=n, read by main.c once the store is loaded and the
// server listens; tly_alloc_fail_every in src/base), a few hundred mixed requests each get
// either their normal answer or 503 UNAVAILABLE with the JSON error envelope and
// Retry-After: never a 500, never a 400 or 401 for a request that was fine, never a
// normal status with a broken body, never a connection closed without an answer, never
// a crash. Afterwards a restart without the fault finds the state consistent: every vote,
// change and retraction that was acknowledged is what the store holds, and the faulted
// server counted exactly what its store holds.
//
// The one answer that may legitimately break off is a streamed export: its status line
// (200) goes out before the ballots are read, so an allocation failure mid-stream can
// only end the stream short (src/api/audit.c, export_on_drain → tly_req_stream_abort),
// which the client sees as an incomplete chunked body. Those are counted apart; an
// export that does complete must be well formed.
//
// n is 50 and 150 (TALLY_OOM_EVERY=n runs just that one): at 50 some routes (results of a
// poll with many ballots) never get through, at 150 every route does now and then.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, api, request, createPoll, results, describe, sleep } from '../api/harness.mjs';

const EVERY = process.env.TALLY_OOM_EVERY ? [Number(process.env.TALLY_OOM_EVERY)] : [50, 150];
const ROUNDS = Number(process.env.TALLY_OOM_ROUNDS || 300);

/** Classifies one answer: 'ok' (a normal answer, well formed), '503', or 'bad'. */
function classify(res, ok, anomalies, label, shape) {
  if (ok.includes(res.status)) {
    const ct = res.headers.get('content-type') || '';
    if (ct.startsWith('application/json') && res.json === null) {
      anomalies.push(`${label}: ${res.status} with a body that is not JSON: ${describe(res)}`);
      return 'bad';
    }
    const missing = shape && res.status < 300 ? shape.filter((k) => !(k in (res.json || {}))) : [];
    if (missing.length) {
      anomalies.push(`${label}: ${res.status} without ${missing.join(', ')}: ${describe(res)}`);
      return 'bad';
    }
    return 'ok';
  }
  if (res.status === 503) {
    const ct = res.headers.get('content-type') || '';
    const err = res.json?.error;
    if (!ct.startsWith('application/json') || !err || err.code !== 'UNAVAILABLE' || typeof err.message !== 'string') {
      anomalies.push(`${label}: 503 without the {"error":{"code":"UNAVAILABLE"}} envelope: ${describe(res)}`);
      return 'bad';
    }
    if (!res.headers.get('retry-after')) {
      anomalies.push(`${label}: 503 without Retry-After: ${describe(res)}`);
      return 'bad';
    }
    return '503';
  }
  anomalies.push(`${label}: unexpected answer: ${describe(res)}`);
  return 'bad';
}

/** One line per kind of anomaly (route, status and body, ids masked), with a count. */
function summarize(anomalies) {
  const kinds = new Map();
  for (const a of anomalies) {
    const [head, ...body] = a.split('\n');
    const k = `${head.replace(/ \{.*$/, '')} ${body.join(' ').slice(0, 240)}`
      .replace(/\/v1\/polls\/[A-Za-z0-9_-]{16}/g, '/v1/polls/:id').replace(/[A-Za-z0-9_-]{16,}/g, '<id>')
      .replace(/oom_\d+_\w+/g, 'oom_user');
    kinds.set(k, (kinds.get(k) || 0) + 1);
  }
  return [...kinds].map(([k, n]) => `  ${n} × ${k}`).join('\n');
}

async function scenario(every) {
  // Setup without the fault: with a small n some requests (creating a poll with its
  // options, say) make more than n allocations and would never get through.
  const base = await startServer();
  const owner = base.mint('oom-owner');
  const polls = [];
  for (let i = 0; i < 3; i++) {
    const overrides = i === 2 ? { type: 'multiple', settings: { min_choices: 1, max_choices: 2 } }
      : { settings: { allow_vote_change: true } };
    polls.push(await createPoll(base, owner, { title: `oom ${i}`, ...overrides }));
  }
  const users = [];
  for (let i = 0; i < 3; i++) {
    const username = `oom_${process.pid}_u${i}`;
    const res = await api(base, 'POST', '/v1/auth/register', { body: { username, password: 'a-long-password' } });
    assert.equal(res.status, 201, describe(res));
    users.push({ username, token: res.json.token });
  }
  await base.stop();

  // The same data directory and secret, now with the fault (base.close() removes it).
  const server = await startServer({ dataDir: base.dataDir, secret: base.secret,
    env: { TALLY_FAULT_ALLOC_EVERY: String(every) } });
  const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  const anomalies = [];
  const counts = { ok: 0, 503: 0, bad: 0, aborted: 0 };
  const voters = []; // { tok, poll, state: 'voted' | 'none' | 'unknown', options, receipt, busy }
  let seq = 0;
  try {
    assert.match(server.logs(), /fault injection: failing allocations/, 'the hook is on');

    /** One request; ok: the statuses of a normal answer; shape: keys a normal answer has. */
    const send = async (method, path, { token, body, ok, shape }) => {
      const label = `${method} ${path}`;
      let res;
      try {
        res = await request(server, method, path, { token, body, agent, timeout: 30_000 });
      } catch (e) {
        anomalies.push(`${label}: no answer (${e.message})`);
        counts.bad++;
        return null;
      }
      counts[classify(res, ok, anomalies, label, shape)]++;
      return res;
    };
    const VOTED = ['vote_id', 'receipt', 'option_ids'];

    const vote = async () => {
      const p = polls[seq % polls.length];
      const v = { tok: server.mint(`oom-voter-${seq++}`), poll: p, state: 'unknown', options: null };
      v.options = p.type === 'multiple' ? [p.options[0].option_id, p.options[2].option_id]
        : [p.options[seq % 3].option_id];
      const body = p.type === 'multiple' ? { option_ids: v.options } : { option_id: v.options[0] };
      voters.push(v);
      const res = await send('POST', `/v1/polls/${p.poll_id}/votes`, { token: v.tok, body, ok: [200], shape: VOTED });
      // a 503 may come after the commit (the answer could not be built): unknown
      if (res?.status === 200 && res.json?.receipt) {
        v.state = 'voted';
        v.receipt = res.json.receipt;
      }
    };
    const pick = (pred) => voters.find((x) => !x.busy && x.state === 'voted' && pred(x));
    const actions = [
      async () => { // change a known ballot (single-choice polls)
        const v = pick((x) => x.poll.type !== 'multiple');
        if (!v) return;
        v.busy = true;
        const to = v.poll.options.find((o) => o.option_id !== v.options[0]).option_id;
        const res = await send('PUT', `/v1/polls/${v.poll.poll_id}/votes/me`,
          { token: v.tok, body: { option_id: to }, ok: [200], shape: VOTED });
        if (res?.status === 200) v.options = [to];
        else v.state = 'unknown';
        v.busy = false;
      },
      async () => { // retract a known ballot
        const v = pick((x) => x.poll.type !== 'multiple' && x.options.length === 1);
        if (!v) return;
        v.busy = true;
        const res = await send('DELETE', `/v1/polls/${v.poll.poll_id}/votes/me`, { token: v.tok, ok: [204] });
        v.state = res?.status === 204 ? 'none' : 'unknown';
        v.busy = false;
      },
      async () => {
        const v = voters[seq++ % Math.max(1, voters.length)];
        if (v) await send('GET', `/v1/polls/${v.poll.poll_id}/votes/me`, { token: v.tok, ok: [200], shape: ['has_voted'] });
      },
      async () => {
        await send('GET', `/v1/polls/${polls[seq++ % 3].poll_id}/results`,
          { ok: [200], shape: ['total_votes', 'options'] });
      },
      async () => { await send('GET', `/v1/polls/${polls[seq++ % 3].poll_id}`, { ok: [200], shape: ['poll_id', 'options'] }); },
      async () => {
        const body = { title: `made under oom ${seq++}`, options: [{ text: 'x' }, { text: 'y' }] };
        await send('POST', '/v1/polls', { token: owner, body, ok: [201], shape: ['poll_id', 'options'] });
      },
      async () => { await send('GET', '/v1/polls?mine=1&limit=5', { token: owner, ok: [200] }); },
      async () => {
        await send('PATCH', `/v1/polls/${polls[0].poll_id}`,
          { token: owner, body: { description: `d${seq++}` }, ok: [200], shape: ['poll_id', 'options'] });
      },
      async () => {
        if (users.length > 12) return;
        const username = `oom_${process.pid}_${seq++}`;
        const res = await send('POST', '/v1/auth/register',
          { body: { username, password: 'a-long-password' }, ok: [201], shape: ['token'] });
        if (res?.status === 201 && res.json?.token) users.push({ username, token: res.json.token });
      },
      async () => {
        const u = users[seq++ % users.length];
        await send('POST', '/v1/auth/login',
          { body: { username: u.username, password: 'a-long-password' }, ok: [200], shape: ['token'] });
        await send('GET', '/v1/auth/me', { token: u.token, ok: [200] });
      },
      async () => { await send('POST', '/v1/auth/anonymous', { ok: [201], shape: ['token'] }); },
      async () => { await send('POST', '/v1/auth/challenge', { ok: [200, 201], shape: ['challenge'] }); },
      async () => {
        await send('GET', `/v1/polls/${polls[seq++ % 3].poll_id}/audit?limit=5`, { token: owner, ok: [200] });
      },
      async () => { await send('GET', `/v1/polls/${polls[seq++ % 3].poll_id}/timeline`, { ok: [200] }); },
      async () => { await send('GET', `/v1/polls/${polls[seq++ % 3].poll_id}/qr.svg`, { ok: [200] }); },
      async () => {
        const v = pick((x) => x.receipt);
        if (v) await send('GET', `/v1/receipts/${encodeURIComponent(v.receipt)}`, { token: v.tok, ok: [200] });
      },
      async () => { // a streamed export: may break off mid-stream (see the top of this file)
        const p = polls[seq % 3];
        const fmt = seq++ % 2 ? 'json' : 'csv';
        const label = `GET export ${fmt}`;
        let res;
        try {
          res = await request(server, 'GET', `/v1/polls/${p.poll_id}/export?format=${fmt}`,
            { token: owner, agent, timeout: 30_000 });
        } catch {
          counts.aborted++;
          return;
        }
        const k = classify(res, [200], anomalies, label);
        counts[k]++;
        if (k !== 'ok') return;
        if (fmt === 'csv') { // every row as wide as the header (no cell may go missing)
          const rows = res.text.replace(/^\uFEFF/, '').split('\r\n').filter(Boolean);
          const width = rows[0].split(',').length;
          const bad = rows.filter((r) => r.split(',').length !== width);
          if (bad.length) anomalies.push(`${label}: 200 with rows narrower or wider than the header: ${bad[0]}`);
        } else if (!Array.isArray(res.json?.ballots)) {
          anomalies.push(`${label}: 200 without a ballots array: ${res.text.slice(0, 300)}`);
        }
      },
      async () => { await send('GET', '/metrics', { ok: [200] }); },
      async () => { await send('GET', '/readyz', { ok: [200] }); },
      async () => { await send('GET', '/healthz', { ok: [200] }); },
      async () => { await send('GET', '/v1/polls/nonexistent0000/results', { ok: [404] }); },
    ];

    // live subscribers while votes arrive: the fan-out allocates too
    const streams = polls.map((p) => new Promise((resolve) => {
      const req = http.get(`${server.url}/v1/polls/${p.poll_id}/live`, (res) => {
        res.on('data', () => {});
        res.on('end', () => resolve(`end ${res.statusCode}`));
        res.on('error', (e) => resolve(`error ${e.message}`));
      });
      req.on('error', (e) => resolve(`error ${e.message}`));
    }));

    // 4 clients at once; every other action is a vote
    let round = 0;
    await Promise.all(Array.from({ length: 4 }, async (_, w) => {
      while (round < ROUNDS) {
        const r = round++;
        await (r % 2 ? vote : actions[(r * 7 + w) % actions.length])();
      }
    }));

    assert.ok(server.proc.exitCode === null && server.proc.signalCode === null,
      `the server is still running:\n${server.logs()}`);
    let health;
    for (let i = 0; i < 200 && health?.status !== 200; i++) health = await api(server, 'GET', '/healthz');
    assert.equal(health.status, 200, `GET /healthz at the end (retried while 503): ${describe(health)}`);

    const problems = [];
    process.stderr.write(`[oom n=${every}] ${JSON.stringify(counts)}; ${voters.length} votes cast, ` +
      `${voters.filter((v) => v.state === 'voted').length} acknowledged and unchanged since\n`);
    if (anomalies.length) {
      problems.push(`${anomalies.length} answers that are neither normal nor 503 UNAVAILABLE:\n${summarize(anomalies)}`);
    }
    if (!(counts[503] > 0)) problems.push('no request hit an allocation failure');
    if (!(counts.ok > 0)) problems.push('no request got through');

    // What the faulted server counts (retrying its 503s; at a small n it may never answer).
    const memory = [];
    for (const p of polls) {
      let r;
      for (let i = 0; i < 200 && r?.status !== 200; i++) r = await results(server, p.poll_id);
      memory.push(r.status === 200 ? r.json : null);
    }
    agent.destroy();
    const stopped = await server.stop();
    if (stopped.killed || stopped.code !== 0) {
      problems.push(`SIGTERM under injection: ${JSON.stringify(stopped)}\n${server.logs()}`);
    }
    const ends = await Promise.all(streams.map((s) => Promise.race([s, sleep(2000).then(() => 'still open')])));
    if (ends.includes('still open')) problems.push(`live streams still open after the stop: ${ends}`);

    // Restart without the fault: every acknowledged ballot is there, nothing else differs.
    const restarted = await startServer({ dataDir: base.dataDir, secret: base.secret });
    try {
      for (const v of voters) {
        if (v.state === 'unknown') continue;
        const me = await api(restarted, 'GET', `/v1/polls/${v.poll.poll_id}/votes/me`, { token: v.tok });
        assert.equal(me.status, 200, describe(me));
        const held = me.json.has_voted ? JSON.stringify([...me.json.option_ids].sort()) : 'none';
        const acked = v.state === 'voted' ? JSON.stringify([...v.options].sort()) : 'none';
        if (held !== acked) problems.push(`acknowledged ${acked}, but the store holds ${held} (${describe(me)})`);
      }
      for (let i = 0; i < polls.length; i++) {
        const after = (await results(restarted, polls[i].poll_id)).json;
        const stored = after.options.map((o) => o.votes), counted = memory[i]?.options.map((o) => o.votes);
        if (counted && JSON.stringify(stored) !== JSON.stringify(counted)) {
          problems.push(`poll ${i}: the faulted server counted ${counted}, its store holds ${stored}`);
        }
        const known = voters.filter((v) => v.poll === polls[i] && v.state === 'voted').length;
        const maybe = voters.filter((v) => v.poll === polls[i] && v.state === 'unknown').length;
        if (after.total_votes < known || after.total_votes > known + maybe) {
          problems.push(`poll ${i}: ${after.total_votes} ballots after the restart; ${known} acknowledged, ` +
            `${maybe} unknown`);
        }
      }
    } finally {
      await restarted.close();
    }
    assert.deepEqual(problems, [], problems.join('\n'));
  } finally {
    agent.destroy();
    // a failure above must not be hidden by a complaint of close() about the same server
    const closing = await Promise.allSettled([server.close(), base.close()]);
    for (const c of closing) if (c.status === 'rejected') process.stderr.write(`[oom] ${c.reason.message}\n`);
  }
}

for (const every of EVERY) {
  test(`every ${every}th allocation fails: ${ROUNDS} mixed requests get their answer or 503, the server survives, ` +
    'a restart finds what was acknowledged', { timeout: 300_000 }, () => scenario(every));
}
