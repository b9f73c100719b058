// Results: counts, percentages and results_visibility.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, assertIso, rand, createPoll, castVote, results, describe,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const voter = () => server.token(`voter-${rand()}`);
const close = (id) => api(server, 'PATCH', `/v1/polls/${id}`, { token: ownerTok, body: { status: 'closed' } });

async function voteAs(poll, body) {
  const tok = await voter();
  const res = await castVote(server, tok, poll.poll_id, body);
  assertStatus(res, 200, 'vote');
  return tok;
}

function assertResultsShape(r, poll) {
  for (const k of ['poll_id', 'status', 'total_votes', 'as_of', 'options']) {
    assert.ok(k in r, `results must have ${k}: ${JSON.stringify(r)}`);
  }
  assert.equal(r.poll_id, poll.poll_id);
  assertIso(r.as_of, 'as_of');
  assert.ok(Number.isInteger(r.total_votes), 'total_votes is an integer');
  assert.deepEqual(r.options.map((o) => o.option_id), poll.options.map((o) => o.option_id),
    'results list every option in display order');
  for (const o of r.options) {
    assert.equal(o.label, poll.options.find((p) => p.option_id === o.option_id).text, 'label is the option text');
    assert.ok(Number.isInteger(o.votes) && o.votes >= 0, `votes is a count: ${JSON.stringify(o)}`);
    assert.equal(typeof o.percentage, 'number', `percentage is a number: ${JSON.stringify(o)}`);
    assert.equal(Math.round(o.percentage * 10) / 10, o.percentage, `one decimal place: ${o.percentage}`);
    const exact = r.total_votes ? (100 * o.votes) / r.total_votes : 0;
    assert.ok(Math.abs(o.percentage - exact) <= 0.1 + 1e-9,
      `percentage ${o.percentage} must be within 0.1 of ${exact.toFixed(3)} (${o.votes}/${r.total_votes})`);
  }
}

const sum = (r) => Math.round(r.options.reduce((s, o) => s + o.percentage, 0) * 10) / 10;
const counts = (r) => r.options.map((o) => o.votes);

test('results of a poll without votes: zeros', async () => {
  const poll = await createPoll(server, ownerTok);
  const res = await results(server, poll.poll_id);
  assertStatus(res, 200, 'results');
  assert.equal(res.headers.get('content-type'), 'application/json; charset=utf-8');
  assertResultsShape(res.json, poll);
  assert.equal(res.json.status, 'active');
  assert.equal(res.json.total_votes, 0);
  assert.deepEqual(counts(res.json), [0, 0, 0]);
  assert.deepEqual(res.json.options.map((o) => o.percentage), [0, 0, 0]);
});

test('single: counts and percentages (2:1:0 → 66.7, 33.3, 0.0)', async () => {
  const poll = await createPoll(server, ownerTok);
  const [a, b] = poll.options.map((o) => o.option_id);
  await voteAs(poll, { option_id: a });
  await voteAs(poll, { option_id: b });
  await voteAs(poll, { option_id: a });
  const res = await results(server, poll.poll_id);
  assertStatus(res, 200);
  assertResultsShape(res.json, poll);
  assert.equal(res.json.total_votes, 3);
  assert.deepEqual(counts(res.json), [2, 1, 0]);
  assert.deepEqual(res.json.options.map((o) => o.percentage), [66.7, 33.3, 0]);
  assert.equal(sum(res.json), 100, 'single-choice percentages sum to 100.0');
});

test('single: percentages sum to 100.0 when rounding would not (1:1:1 and 3:2:2)', async () => {
  const poll = await createPoll(server, ownerTok);
  const [a, b, c] = poll.options.map((o) => o.option_id);
  await voteAs(poll, { option_id: a });
  await voteAs(poll, { option_id: b });
  await voteAs(poll, { option_id: c });
  let res = await results(server, poll.poll_id);
  assertStatus(res, 200);
  assertResultsShape(res.json, poll);
  assert.deepEqual(counts(res.json), [1, 1, 1]);
  assert.equal(sum(res.json), 100, `1:1:1 percentages must sum to 100.0: ${res.text}`);
  for (const x of [a, a, b, c]) await voteAs(poll, { option_id: x });
  res = await results(server, poll.poll_id);
  assertResultsShape(res.json, poll);
  assert.deepEqual(counts(res.json), [3, 2, 2]);
  assert.equal(res.json.total_votes, 7);
  assert.equal(sum(res.json), 100, `3:2:2 percentages must sum to 100.0: ${res.text}`);
});

test('multiple: votes count choices, percentages are of ballots', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple' });
  const [a, b] = poll.options.map((o) => o.option_id);
  await voteAs(poll, { option_ids: [a, b] });
  await voteAs(poll, { option_ids: [a] });
  const res = await results(server, poll.poll_id);
  assertStatus(res, 200);
  assertResultsShape(res.json, poll);
  assert.equal(res.json.total_votes, 2, 'total_votes counts ballots');
  assert.deepEqual(counts(res.json), [2, 1, 0]);
  assert.deepEqual(res.json.options.map((o) => o.percentage), [100, 50, 0]);
});

test('results of an unknown poll → 404; of a draft → 404 for others, 200 for the owner', async () => {
  assertError(await results(server, 'noSuchPoll12345'), 404, 'POLL_NOT_FOUND');
  const draft = await createPoll(server, ownerTok, { status: 'draft' });
  assertError(await results(server, draft.poll_id), 404, 'POLL_NOT_FOUND');
  assertError(await results(server, draft.poll_id, await voter()), 404, 'POLL_NOT_FOUND');
  const own = await results(server, draft.poll_id, ownerTok);
  assertStatus(own, 200, 'owner sees draft results');
  assert.equal(own.json.status, 'draft');
  assert.equal(own.json.total_votes, 0);
});

// ---- visibility ----------------------------------------------------------------------------

test('results_visibility always: anyone, even without a token', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'always' } });
  await voteAs(poll, { option_id: poll.options[0].option_id });
  const anon = await results(server, poll.poll_id);
  assertStatus(anon, 200, 'no token');
  assert.equal(anon.json.total_votes, 1);
  assertStatus(await results(server, poll.poll_id, await voter()), 200, 'a non-voter');
});

test('results_visibility after_vote: hidden until the caller voted; owner always sees', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'after_vote' } });
  const tok = await voter();
  assertError(await results(server, poll.poll_id), 403, 'RESULTS_HIDDEN');
  assertError(await results(server, poll.poll_id, tok), 403, 'RESULTS_HIDDEN');
  assertStatus(await results(server, poll.poll_id, ownerTok), 200, 'owner before any vote');
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: poll.options[0].option_id }), 200, 'vote');
  const seen = await results(server, poll.poll_id, tok);
  assertStatus(seen, 200, 'voter after voting');
  assert.equal(seen.json.total_votes, 1);
  assertError(await results(server, poll.poll_id), 403, 'RESULTS_HIDDEN');
  assertError(await results(server, poll.poll_id, await voter()), 403, 'RESULTS_HIDDEN');
});

test('results_visibility after_close: hidden for all but the owner until closed', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'after_close' } });
  const tok = await voter();
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: poll.options[1].option_id }), 200, 'vote');
  assertError(await results(server, poll.poll_id, tok), 403, 'RESULTS_HIDDEN');
  assertError(await results(server, poll.poll_id), 403, 'RESULTS_HIDDEN');
  const own = await results(server, poll.poll_id, ownerTok);
  assertStatus(own, 200, 'owner while active');
  assert.equal(own.json.total_votes, 1);
  assertStatus(await close(poll.poll_id), 200, 'close');
  const after = await results(server, poll.poll_id);
  assertStatus(after, 200, 'anyone after close');
  assert.equal(after.json.status, 'closed');
  assert.equal(after.json.total_votes, 1);
  assert.deepEqual(counts(after.json), [0, 1, 0]);
  assertStatus(await results(server, poll.poll_id, tok), 200, 'voter after close');
});

test('results_visibility owner_only: only the owner, before and after close', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'owner_only' } });
  const tok = await voter();
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: poll.options[0].option_id }), 200, 'vote');
  assertError(await results(server, poll.poll_id, tok), 403, 'RESULTS_HIDDEN');
  assertError(await results(server, poll.poll_id), 403, 'RESULTS_HIDDEN');
  assertStatus(await results(server, poll.poll_id, ownerTok), 200, 'owner');
  assertStatus(await close(poll.poll_id), 200, 'close');
  assertError(await results(server, poll.poll_id, tok), 403, 'RESULTS_HIDDEN');
  assertError(await results(server, poll.poll_id), 403, 'RESULTS_HIDDEN');
  const own = await results(server, poll.poll_id, ownerTok);
  assertStatus(own, 200, 'owner after close');
  assert.equal(own.json.total_votes, 1);
});

test('changing results_visibility with PATCH takes effect', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'always' } });
  assertStatus(await results(server, poll.poll_id), 200);
  const p = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`,
    { token: ownerTok, body: { settings: { results_visibility: 'owner_only' } } });
  assertStatus(p, 200, 'patch visibility');
  const res = await results(server, poll.poll_id);
  assert.equal(res.status, 403, `after PATCH to owner_only: ${describe(res)}`);
  assertError(res, 403, 'RESULTS_HIDDEN');
});
