// Concurrency: one ballot per voter under races; many voters at once are all counted.
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

test('tokens minted in the test are accepted (sanity check for the bulk tests)', async () => {
  const sub = `minted-${rand()}`;
  const me = await api(server, 'GET', '/v1/auth/me', { token: server.mint(sub) });
  assertStatus(me, 200, 'in-test HS256 token');
  assert.equal(me.json.user_id, sub);
});

test('200 parallel ballots from one voter → exactly one 200, the rest 409 ALREADY_VOTED', { timeout: 120_000 },
  async () => {
    const poll = await createPoll(server, ownerTok);
    const ids = poll.options.map((o) => o.option_id);
    const tok = await server.token(`racer-${rand()}`);
    const all = await Promise.all(Array.from({ length: 200 },
      (_, i) => castVote(server, tok, poll.poll_id, { option_id: ids[i % 2] })));
    const ok = all.filter((r) => r.status === 200);
    assert.equal(ok.length, 1, `exactly one ballot recorded; statuses ${summarize(all)}`);
    const winner = ok[0].json;
    for (const r of all) {
      if (r.status === 200) continue;
      const e = assertError(r, 409, 'ALREADY_VOTED');
      assert.equal(e.vote_id, winner.vote_id, 'every 409 names the recorded vote');
    }
    const res = await results(server, poll.poll_id);
    assert.equal(res.json.total_votes, 1, 'one ballot counted');
    const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok });
    assert.deepEqual(me.json.option_ids, winner.option_ids, 'votes/me shows the winning ballot');
    assert.equal(me.json.vote_id, winner.vote_id);
    const counted = res.json.options.find((o) => o.option_id === winner.option_ids[0]);
    assert.equal(counted.votes, 1, 'the counted option is the one in the 200 response');
  });

test('parallel ballots from one voter with async and sync mixed → one ballot', { timeout: 120_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const ids = poll.options.map((o) => o.option_id);
  const tok = await server.token(`mixed-${rand()}`);
  const all = await Promise.all(Array.from({ length: 60 }, (_, i) => castVote(server, tok, poll.poll_id,
    { option_id: ids[i % 3] }, i % 2 ? { Prefer: 'respond-async' } : undefined)));
  for (const r of all) {
    assert.ok([200, 202, 409].includes(r.status), `unexpected status: ${describe(r)}`);
    if (r.status === 409) assertError(r, 409, 'ALREADY_VOTED');
  }
  // wait for accepted requests to settle
  const deadline = Date.now() + 5000;
  for (const r of all.filter((x) => x.status === 202)) {
    const loc = `/v1/polls/${poll.poll_id}/votes/requests/${r.json.request_id}`;
    let st;
    do {
      st = await api(server, 'GET', loc, { token: tok });
      if (st.json?.state && st.json.state !== 'pending') break;
      await new Promise((res) => setTimeout(res, 50));
    } while (Date.now() < deadline);
    assert.ok(['completed', 'failed'].includes(st.json?.state), `request settles: ${describe(st)}`);
  }
  const res = await results(server, poll.poll_id);
  assert.equal(res.json.total_votes, 1, `exactly one ballot whatever the mix; statuses ${summarize(all)}`);
});

test('2,000 distinct voters in parallel → all 200, total_votes 2000, per-option counts exact', { timeout: 300_000 },
  async () => {
    const poll = await createPoll(server, ownerTok, {
      options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }, { text: 'D' }],
    });
    const ids = poll.options.map((o) => o.option_id);
    const N = 2000;
    const sent = new Map(ids.map((id) => [id, 0]));
    const voters = Array.from({ length: N }, (_, i) => {
      const option = ids[(i * 7 + (i % 3)) % ids.length]; // an uneven spread
      sent.set(option, sent.get(option) + 1);
      return { tok: server.mint(`bulk-${i}-${rand(3)}`), option };
    });
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    try {
      const all = await Promise.all(voters.map((v) => request(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
        { agent, token: v.tok, body: { option_id: v.option } })));
      const bad = all.filter((r) => r.status !== 200);
      assert.equal(bad.length, 0, `all votes recorded; statuses ${summarize(all)}; first failure: ${bad[0] ? describe(bad[0]) : ''}`);
      const voteIds = new Set(all.map((r) => r.json.vote_id));
      assert.equal(voteIds.size, N, 'every vote has its own vote_id');
      const receipts = new Set(all.map((r) => r.json.receipt));
      assert.equal(receipts.size, N, 'every vote has its own receipt');
    } finally {
      agent.destroy();
    }
    const res = await results(server, poll.poll_id);
    assertStatus(res, 200);
    assert.equal(res.json.total_votes, N, 'total_votes equals the number of voters');
    for (const o of res.json.options) {
      assert.equal(o.votes, sent.get(o.option_id), `votes for ${o.label}: expected ${sent.get(o.option_id)}`);
    }
    const pctSum = Math.round(res.json.options.reduce((s, o) => s + o.percentage, 0) * 10) / 10;
    assert.equal(pctSum, 100, 'percentages sum to 100.0');
  });

test('1,000 voters on a multiple-choice poll in parallel → per-option counts exact', { timeout: 300_000 },
  async () => {
    const poll = await createPoll(server, ownerTok, { type: 'multiple' });
    const ids = poll.options.map((o) => o.option_id);
    const N = 1000;
    const sent = new Map(ids.map((id) => [id, 0]));
    const voters = Array.from({ length: N }, (_, i) => {
      const choice = ids.filter((_, k) => ((i + 1) >> k) & 1);
      const option_ids = choice.length ? choice : [ids[0]];
      for (const c of option_ids) sent.set(c, sent.get(c) + 1);
      return { tok: server.mint(`multi-${i}-${rand(3)}`), option_ids };
    });
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    try {
      const all = await Promise.all(voters.map((v) => request(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
        { agent, token: v.tok, body: { option_ids: v.option_ids } })));
      assert.equal(all.filter((r) => r.status !== 200).length, 0, `statuses ${summarize(all)}`);
    } finally {
      agent.destroy();
    }
    const res = await results(server, poll.poll_id);
    assert.equal(res.json.total_votes, N);
    for (const o of res.json.options) assert.equal(o.votes, sent.get(o.option_id), `votes for ${o.label}`);
  });

test('many voters racing twice each → exactly one ballot per voter', { timeout: 300_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const ids = poll.options.map((o) => o.option_id);
  const N = 300;
  const toks = Array.from({ length: N }, (_, i) => server.mint(`twice-${i}-${rand(3)}`));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  let all;
  try {
    all = await Promise.all(toks.flatMap((tok, i) => [0, 1].map((k) => request(server, 'POST',
      `/v1/polls/${poll.poll_id}/votes`, { agent, token: tok, body: { option_id: ids[(i + k) % 3] } })
      .then((r) => ({ i, r })))));
  } finally {
    agent.destroy();
  }
  const per = new Map();
  for (const { i, r } of all) {
    assert.ok(r.status === 200 || r.status === 409, describe(r));
    if (r.status === 200) per.set(i, (per.get(i) || 0) + 1);
  }
  assert.equal(per.size, N, 'every voter got one 200');
  for (const [i, n] of per) assert.equal(n, 1, `voter ${i} got ${n} ballots`);
  assert.equal((await results(server, poll.poll_id)).json.total_votes, N);
});
