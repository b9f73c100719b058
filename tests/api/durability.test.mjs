// Durability: everything acknowledged survives a graceful restart and kill -9.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, rand, sleep, createPoll, castVote, results, describe,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const voteMe = (id, token) => api(server, 'GET', `/v1/polls/${id}/votes/me`, { token });

test('graceful restart (SIGTERM): polls, votes, receipts, users and results survive', { timeout: 60_000 }, async () => {
  const poll = await createPoll(server, ownerTok, { title: 'Durable', description: 'survives restarts' });
  const draft = await createPoll(server, ownerTok, { status: 'draft' });
  const gone = await createPoll(server, ownerTok);
  assert.equal((await api(server, 'DELETE', `/v1/polls/${gone.poll_id}`, { token: ownerTok })).status, 204);
  const username = `dur_${rand(4)}`;
  const reg = await api(server, 'POST', '/v1/auth/register', { body: { username, password: 'durable-pass' } });
  assertStatus(reg, 201, 'register');

  const [a, b] = poll.options.map((o) => o.option_id);
  const voters = [];
  for (const opt of [a, a, b]) {
    const tok = await server.token(`voter-${rand()}`);
    const res = await castVote(server, tok, poll.poll_id, { option_id: opt });
    assertStatus(res, 200, 'vote');
    voters.push({ tok, opt, vote: res.json });
  }
  // the registered user votes too
  const uv = await castVote(server, reg.json.token, poll.poll_id, { option_id: b });
  assertStatus(uv, 200, 'registered user votes');
  voters.push({ tok: reg.json.token, opt: b, vote: uv.json });
  const beforePoll = (await api(server, 'GET', `/v1/polls/${poll.poll_id}`)).json;
  const beforeRes = (await results(server, poll.poll_id)).json;
  const beforeMe = [];
  for (const v of voters) beforeMe.push((await voteMe(poll.poll_id, v.tok)).json);

  const stopped = await server.stop();
  assert.equal(stopped.killed, false, 'the server exits within 5 s of SIGTERM');
  assert.equal(stopped.code, 0, `the server exits 0 after SIGTERM (code ${stopped.code}, signal ${stopped.signal})`);
  await server.restart();

  const afterPoll = await api(server, 'GET', `/v1/polls/${poll.poll_id}`);
  assertStatus(afterPoll, 200, 'poll after restart');
  assert.deepEqual(afterPoll.json, beforePoll, 'poll unchanged');
  const d = await api(server, 'GET', `/v1/polls/${draft.poll_id}`, { token: ownerTok });
  assertStatus(d, 200, 'draft after restart (owner)');
  assert.equal(d.json.status, 'draft');
  assertError(await api(server, 'GET', `/v1/polls/${draft.poll_id}`), 404, 'POLL_NOT_FOUND');
  assertError(await api(server, 'GET', `/v1/polls/${gone.poll_id}`, { token: ownerTok }), 404, 'POLL_NOT_FOUND');

  const afterRes = await results(server, poll.poll_id);
  assertStatus(afterRes, 200);
  assert.equal(afterRes.json.total_votes, 4);
  assert.deepEqual(afterRes.json.options, beforeRes.options, 'results unchanged');
  for (let i = 0; i < voters.length; i++) {
    const v = voters[i];
    const me = await voteMe(poll.poll_id, v.tok);
    assertStatus(me, 200);
    assert.deepEqual(me.json, beforeMe[i], `votes/me unchanged for voter ${i}`);
    const again = await castVote(server, v.tok, poll.poll_id, { option_id: a });
    assert.equal(assertError(again, 409, 'ALREADY_VOTED').vote_id, v.vote.vote_id, 'still one ballot per voter');
    const rc = await api(server, 'GET', `/v1/receipts/${encodeURIComponent(v.vote.receipt)}`, { token: v.tok });
    assertStatus(rc, 200, 'receipt after restart');
    assert.equal(rc.json.counted, true);
    assert.equal(rc.json.poll_id, poll.poll_id);
  }

  const login = await api(server, 'POST', '/v1/auth/login', { body: { username, password: 'durable-pass' } });
  assertStatus(login, 200, 'login after restart');
  assert.equal(login.json.user_id, reg.json.user_id);
  assertError(await api(server, 'POST', '/v1/auth/register', { body: { username, password: 'another-pass' } }), 409,
    'USERNAME_TAKEN');
  // the old token still works
  const me = await api(server, 'GET', '/v1/auth/me', { token: reg.json.token });
  assertStatus(me, 200);
  assert.equal(me.json.username, username);
});

test('Idempotency-Key replay survives a restart', { timeout: 60_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await server.token(`idem-${rand()}`);
  const key = `k-${rand()}`;
  const opt = poll.options[0].option_id;
  const first = await castVote(server, tok, poll.poll_id, { option_id: opt }, { 'Idempotency-Key': key });
  assertStatus(first, 200);
  await server.restart();
  const again = await castVote(server, tok, poll.poll_id, { option_id: opt }, { 'Idempotency-Key': key });
  assertStatus(again, 200, 'same key and body after restart');
  assert.equal(again.json.vote_id, first.json.vote_id);
  assert.equal(again.json.receipt, first.json.receipt);
  assert.equal((await results(server, poll.poll_id)).json.total_votes, 1);
});

test('kill -9 right after acknowledged votes: every acknowledged vote is counted', { timeout: 90_000 }, async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple' });
  const ids = poll.options.map((o) => o.option_id);
  const acks = [];
  // several rounds of concurrent votes, then kill -9 immediately after the last acknowledgement
  for (let round = 0; round < 3; round++) {
    const batch = await Promise.all(Array.from({ length: 20 }, async (_, i) => {
      const sub = `crash-${round}-${i}-${rand(3)}`;
      const tok = server.mint(sub);
      const choice = [ids[(round + i) % ids.length]];
      const res = await castVote(server, tok, poll.poll_id, { option_ids: choice });
      return { tok, choice, res };
    }));
    for (const x of batch) {
      assert.equal(x.res.status, 200, `vote before the crash: ${describe(x.res)}`);
      acks.push(x);
    }
  }
  await server.kill9();
  await server.restart();
  const r = await results(server, poll.poll_id);
  assertStatus(r, 200, 'results after kill -9');
  assert.equal(r.json.total_votes, acks.length, `every acknowledged vote counted (${acks.length} × 200)`);
  const expected = new Map(ids.map((id) => [id, 0]));
  for (const a of acks) for (const c of a.choice) expected.set(c, expected.get(c) + 1);
  for (const o of r.json.options) assert.equal(o.votes, expected.get(o.option_id), `votes for ${o.label}`);
  for (const a of acks) {
    const me = await voteMe(poll.poll_id, a.tok);
    assert.equal(me.json.has_voted, true, `acknowledged voter must still have voted: ${describe(me)}`);
    assert.equal(me.json.vote_id, a.res.json.vote_id, 'same vote_id after the crash');
  }
});

test('kill -9 while votes are in flight: acknowledged votes counted, no double ballots', { timeout: 90_000 },
  async () => {
    const poll = await createPoll(server, ownerTok);
    const opt = poll.options[1].option_id;
    const toks = Array.from({ length: 100 }, (_, i) => server.mint(`inflight-${i}-${rand(3)}`));
    const pending = toks.map((tok) => castVote(server, tok, poll.poll_id, { option_id: opt })
      .then((res) => ({ tok, res }), (err) => ({ tok, err })));
    await sleep(30);
    await server.kill9();
    const outcomes = await Promise.all(pending);
    const acked = outcomes.filter((o) => o.res?.status === 200);
    for (const o of outcomes) {
      if (o.res) assert.ok(o.res.status === 200 || o.res.status >= 500 || o.res.status === 503,
        `unexpected answer before the crash: ${describe(o.res)}`);
    }
    await server.restart();
    const r = await results(server, poll.poll_id);
    assertStatus(r, 200);
    assert.ok(r.json.total_votes >= acked.length,
      `total_votes ${r.json.total_votes} must include all ${acked.length} acknowledged votes`);
    assert.ok(r.json.total_votes <= toks.length, `no more ballots than voters: ${r.json.total_votes}`);
    for (const o of acked) {
      const me = await voteMe(poll.poll_id, o.tok);
      assert.equal(me.json.has_voted, true, 'acknowledged vote survives');
      assert.equal(me.json.vote_id, o.res.json.vote_id);
    }
    // every voter can still only have one ballot
    const again = await Promise.all(toks.map((tok) => castVote(server, tok, poll.poll_id, { option_id: opt })));
    const newly = again.filter((x) => x.status === 200).length;
    for (const x of again) assert.ok(x.status === 200 || x.status === 409, describe(x));
    const r2 = await results(server, poll.poll_id);
    assert.equal(r2.json.total_votes, toks.length, 'after retrying everyone, exactly one ballot per voter');
    assert.equal(r.json.total_votes + newly, toks.length, 'retries only added the missing ballots');
  });

test('async (202) votes acknowledged before kill -9 are counted after restart', { timeout: 60_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const opt = poll.options[0].option_id;
  const toks = Array.from({ length: 10 }, (_, i) => server.mint(`async-crash-${i}-${rand(3)}`));
  const res = await Promise.all(toks.map((tok) => castVote(server, tok, poll.poll_id, { option_id: opt },
    { Prefer: 'respond-async' })));
  for (const r of res) assertStatus(r, 202, 'async vote');
  await server.kill9();
  await server.restart();
  const deadline = Date.now() + 5000;
  for (const tok of toks) {
    let me;
    do {
      me = await voteMe(poll.poll_id, tok);
      if (me.json?.has_voted) break;
      await sleep(100);
    } while (Date.now() < deadline);
    assert.equal(me.json?.has_voted, true, `a 202-acknowledged vote must be counted after kill -9: ${describe(me)}`);
  }
  assert.equal((await results(server, poll.poll_id)).json.total_votes, toks.length);
});
