// Concurrency of vote changes: voters change (and some retract) their ballots in parallel
// while as many new voters cast theirs. Counts must move atomically (a change is never
// counted twice or not at all, as seen by concurrent readers), and the final counts must
// equal the expected ones, a recount from the audit log, and the export's rows.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import {
  startServer, api, request, assertError, assertStatus, rand, createPoll, castVote, results, describe,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

function summarize(list) {
  const m = {};
  for (const r of list) m[r.status] = (m[r.status] || 0) + 1;
  return JSON.stringify(m);
}

function tallyOf(ballots, ids) {
  const t = Object.fromEntries(ids.map((id) => [id, 0]));
  for (const b of ballots) t[b] += 1;
  return t;
}

async function auditAll(poll) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < 10_000; page++) {
    const q = cursor ? `&cursor=${encodeURIComponent(cursor)}` : '';
    const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/audit?limit=100${q}`, { token: ownerTok });
    assertStatus(res, 200, 'audit page');
    assert.ok(res.json.items.length <= 100);
    items.push(...res.json.items);
    cursor = res.json.next_cursor;
    if (cursor === null) return items;
  }
  assert.fail('audit pagination did not end');
}

/** Replays the audit log: cast/changed set a pseudonym's ballot, revoked removes it. */
function replay(items) {
  const current = new Map();
  for (const e of items) {
    if (e.event === 'cast') {
      assert.ok(!current.has(e.voter), `a cast while ${e.voter} already had a ballot (seq ${e.seq})`);
      current.set(e.voter, e.ballot.option_id);
    } else if (e.event === 'changed') {
      assert.ok(current.has(e.voter), `a change without a ballot for ${e.voter} (seq ${e.seq})`);
      current.set(e.voter, e.ballot.option_id);
    } else if (e.event === 'revoked') {
      assert.ok(current.delete(e.voter), `a retraction without a ballot for ${e.voter} (seq ${e.seq})`);
    } else {
      assert.fail(`unknown audit event ${JSON.stringify(e)}`);
    }
  }
  return current;
}

test('500 voters change and 100 retract in parallel while 500 others cast: counts move atomically and equal ' +
  'the audit recount and the export', { timeout: 120_000 }, async () => {
  const poll = await createPoll(server, ownerTok, {
    options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }, { text: 'D' }],
    settings: { allow_vote_change: true },
  });
  const ids = poll.options.map((o) => o.option_id);
  const path = `/v1/polls/${poll.poll_id}/votes`;
  const CHANGERS = 500;
  const RETRACTORS = 100;
  const NEWCOMERS = 500;
  const first = Array.from({ length: CHANGERS + RETRACTORS }, (_, i) => ({
    tok: server.mint(`first-${i}-${rand(3)}`), option: ids[i % 4],
  }));
  const newcomers = Array.from({ length: NEWCOMERS }, (_, i) => ({
    tok: server.mint(`new-${i}-${rand(3)}`), option: ids[(i * 3 + 1) % 4],
  }));
  const changers = first.slice(0, CHANGERS).map((v, i) => ({ ...v, to: ids[(i % 4 + 1 + (i % 3)) % 4] }));
  const retractors = first.slice(CHANGERS);

  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  try {
    // phase 1: everyone who will change or retract casts first
    const cast1 = await Promise.all(first.map((v) => request(server, 'POST', path,
      { agent, token: v.tok, body: { option_id: v.option } })));
    const bad1 = cast1.filter((r) => r.status !== 200);
    assert.equal(bad1.length, 0, `phase 1 all recorded; ${summarize(cast1)}; ${bad1[0] ? describe(bad1[0]) : ''}`);
    const r1 = await results(server, poll.poll_id);
    assert.equal(r1.json.total_votes, CHANGERS + RETRACTORS);

    // phase 2: changes, retractions and new casts interleaved, while a reader watches
    const ops = [];
    for (let i = 0; i < Math.max(CHANGERS, NEWCOMERS); i++) {
      if (i < CHANGERS) {
        const v = changers[i];
        ops.push(() => request(server, 'PUT', `${path}/me`, { agent, token: v.tok, body: { option_id: v.to } }));
      }
      if (i < NEWCOMERS) {
        const v = newcomers[i];
        ops.push(() => request(server, 'POST', path, { agent, token: v.tok, body: { option_id: v.option } }));
      }
      if (i < RETRACTORS) {
        const v = retractors[i];
        ops.push(() => request(server, 'DELETE', `${path}/me`, { agent, token: v.tok }));
      }
    }
    let done = false;
    const observations = [];
    const watcher = (async () => {
      while (!done) {
        const r = await results(server, poll.poll_id);
        assertStatus(r, 200, 'results while changing');
        const sum = r.json.options.reduce((s, o) => s + o.votes, 0);
        observations.push({ total: r.json.total_votes, sum });
        await new Promise((res) => setTimeout(res, 5));
      }
    })();
    let all;
    try {
      all = await Promise.all(ops.map((f) => f()));
    } finally {
      done = true;
      await watcher;
    }
    const puts = all.filter((r) => r.method === 'PUT');
    const dels = all.filter((r) => r.method === 'DELETE');
    const posts = all.filter((r) => r.method === 'POST');
    assert.equal(puts.filter((r) => r.status === 200).length, CHANGERS, `changes all 200: ${summarize(puts)}; ` +
      `${describe(puts.find((r) => r.status !== 200) || {})}`);
    assert.equal(dels.filter((r) => r.status === 204).length, RETRACTORS, `retractions all 204: ${summarize(dels)}`);
    assert.equal(posts.filter((r) => r.status === 200).length, NEWCOMERS, `new casts all 200: ${summarize(posts)}`);

    assert.ok(observations.length >= 3, `the reader saw the counts several times (${observations.length})`);
    for (const o of observations) {
      assert.equal(o.sum, o.total, `a single poll's option counts always sum to total_votes: ${JSON.stringify(o)}`);
      assert.ok(o.total >= CHANGERS && o.total <= CHANGERS + RETRACTORS + NEWCOMERS,
        `total_votes within bounds: ${JSON.stringify(o)}`);
    }
  } finally {
    agent.destroy();
  }

  // expected from what the clients were told
  const expected = tallyOf([...changers.map((v) => v.to), ...newcomers.map((v) => v.option)], ids);
  const res = await results(server, poll.poll_id);
  assertStatus(res, 200);
  const counted = Object.fromEntries(res.json.options.map((o) => [o.option_id, o.votes]));
  assert.equal(res.json.total_votes, CHANGERS + NEWCOMERS, 'total after the storm');
  assert.deepEqual(counted, expected, 'results equal what the voters were told');

  // recount from the audit log
  const items = await auditAll(poll);
  const events = {};
  for (const e of items) events[e.event] = (events[e.event] || 0) + 1;
  assert.deepEqual(events, { cast: CHANGERS + RETRACTORS + NEWCOMERS, changed: CHANGERS, revoked: RETRACTORS },
    'one audit event per successful request');
  const seqs = items.map((e) => e.seq);
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), 'audit in seq order, no event twice');
  const current = replay(items);
  assert.equal(current.size, CHANGERS + NEWCOMERS);
  assert.deepEqual(tallyOf([...current.values()], ids), counted, 'the audit recount equals the results');

  // the export's rows
  const csv = await request(server, 'GET', `/v1/polls/${poll.poll_id}/export?format=csv`, { token: ownerTok });
  assertStatus(csv, 200, 'CSV export');
  const lines = csv.text.replace(/^\uFEFF/, '').split('\r\n');
  assert.equal(lines.pop(), '', 'CSV ends with CRLF');
  const header = lines.shift().split(',');
  assert.deepEqual(header, ['voter', 'recorded_at', 'A', 'B', 'C', 'D']);
  assert.equal(lines.length, CHANGERS + NEWCOMERS, 'one CSV row per ballot');
  const csvBallots = new Map();
  for (const line of lines) {
    const cells = line.split(',');
    const chosen = cells.slice(2).map((c, i) => (c === '1' ? ids[i] : null)).filter(Boolean);
    assert.equal(chosen.length, 1, `one choice per single-choice row: ${line}`);
    assert.ok(!csvBallots.has(cells[0]), `one row per voter: ${cells[0]}`);
    csvBallots.set(cells[0], chosen[0]);
  }
  assert.deepEqual(new Map([...csvBallots].sort()), new Map([...current].sort()),
    'CSV rows are exactly the audit replay, voter by voter');

  const json = await request(server, 'GET', `/v1/polls/${poll.poll_id}/export?format=json`, { token: ownerTok });
  assertStatus(json, 200, 'JSON export');
  assert.equal(json.json.ballots.length, CHANGERS + NEWCOMERS);
  const jsonBallots = new Map(json.json.ballots.map((b) => [b.voter, b.ballot.option_id]));
  assert.deepEqual(new Map([...jsonBallots].sort()), new Map([...current].sort()), 'JSON ballots equal the replay');
  assert.deepEqual(json.json.results.options.map((o) => o.votes), ids.map((id) => counted[id]),
    'the export\'s results equal GET results');
});

test('parallel changes of one ballot: each one 200 or 409 VOTE_IN_PROGRESS; the last applied one stands',
  { timeout: 60_000 }, async () => {
    const poll = await createPoll(server, ownerTok, { settings: { allow_vote_change: true } });
    const ids = poll.options.map((o) => o.option_id);
    const tok = server.mint(`racer-${rand()}`);
    assertStatus(await castVote(server, tok, poll.poll_id, { option_id: ids[0] }), 200);
    const all = await Promise.all(Array.from({ length: 40 }, (_, i) => api(server, 'PUT',
      `/v1/polls/${poll.poll_id}/votes/me`, { token: tok, body: { option_id: ids[(i % 2) + 1] } })));
    for (const r of all) {
      if (r.status === 409) assertError(r, 409, 'VOTE_IN_PROGRESS');
      else assertStatus(r, 200, 'change');
    }
    const ok = all.filter((r) => r.status === 200).length;
    assert.ok(ok >= 1, `at least one change applied: ${summarize(all)}`);
    const items = await auditAll(poll);
    assert.equal(items.filter((e) => e.event === 'changed').length, ok, 'one changed event per 200');
    const last = replay(items);
    const res = await results(server, poll.poll_id);
    assert.equal(res.json.total_votes, 1, 'still one ballot');
    const counted = res.json.options.filter((o) => o.votes === 1).map((o) => o.option_id);
    assert.deepEqual(counted, [...last.values()], 'the counted option is the audit\'s last ballot');
    const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok });
    assert.deepEqual(me.json.option_ids, counted, 'votes/me agrees');
  });

test('parallel retractions and changes of one ballot: consistent end state', { timeout: 60_000 }, async () => {
  const poll = await createPoll(server, ownerTok, { settings: { allow_vote_change: true } });
  const ids = poll.options.map((o) => o.option_id);
  const tok = server.mint(`racer-${rand()}`);
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: ids[0] }), 200);
  const all = await Promise.all(Array.from({ length: 30 }, (_, i) => (i % 3 === 0
    ? api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok })
    : api(server, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok, body: { option_id: ids[1] } }))));
  for (const r of all) {
    assert.ok([200, 204, 404, 409].includes(r.status), `unexpected: ${describe(r)}`);
    if (r.status === 409) assertError(r, 409, 'VOTE_IN_PROGRESS');
    if (r.status === 404) assertError(r, 404, 'VOTE_NOT_FOUND');
  }
  const items = await auditAll(poll);
  const cur = replay(items);
  const res = await results(server, poll.poll_id);
  assert.equal(res.json.total_votes, cur.size, `results agree with the audit replay: ${summarize(all)}`);
  const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok });
  assert.equal(me.json.has_voted, cur.size === 1);
});
