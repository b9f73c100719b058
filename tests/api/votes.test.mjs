// Votes on single and multiple polls: casting, one ballot per voter, idempotency, time
// windows, anonymous voters, receipts and async votes (Prefer: respond-async).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, assertIso, rand, sleep, isoIn, describe, createPoll, castVote,
  URL_SAFE,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const voter = () => server.token(`voter-${rand()}`);
const voteMe = (id, token) => api(server, 'GET', `/v1/polls/${id}/votes/me`, { token });

function assertRecorded(res, poll, optionIds) {
  assertStatus(res, 200, 'vote');
  const v = res.json;
  assert.equal(v.status, 'recorded', `status recorded: ${res.text}`);
  assert.equal(typeof v.vote_id, 'string', 'vote_id');
  assert.match(v.vote_id, URL_SAFE, 'vote_id is URL-safe');
  assert.equal(v.poll_id, poll.poll_id, 'poll_id');
  assert.deepEqual([...v.option_ids].sort(), [...optionIds].sort(), 'option_ids are the chosen options');
  assertIso(v.recorded_at, 'recorded_at');
  assert.equal(typeof v.receipt, 'string', 'receipt');
  assert.match(v.receipt, URL_SAFE, 'receipt is URL-safe');
  assert.ok(v.receipt.length >= 11, 'receipt is unguessable');
  return v;
}

// ---- single -----------------------------------------------------------------------------

test('single vote → 200 recorded; votes/me before and after', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const before = await voteMe(poll.poll_id, tok);
  assertStatus(before, 200, 'votes/me before voting');
  const { has_voted, option_ids, voted_at } = before.json;
  assert.deepEqual({ has_voted, option_ids, voted_at }, { has_voted: false, option_ids: [], voted_at: null },
    `not voted yet: ${before.text}`);
  if ('vote_id' in before.json) assert.equal(before.json.vote_id, null, 'no vote_id before voting');
  const opt = poll.options[1].option_id;
  const res = await castVote(server, tok, poll.poll_id, { option_id: opt });
  assert.equal(res.headers.get('content-type'), 'application/json; charset=utf-8');
  const v = assertRecorded(res, poll, [opt]);
  const after = await voteMe(poll.poll_id, tok);
  assertStatus(after, 200, 'votes/me after voting');
  assert.equal(after.json.has_voted, true);
  assert.deepEqual(after.json.option_ids, [opt]);
  assertIso(after.json.voted_at, 'voted_at');
  assert.equal(after.json.vote_id, v.vote_id, 'votes/me carries the vote_id');
});

test('votes/me requires a token; unknown poll → 404', async () => {
  const poll = await createPoll(server, ownerTok);
  assertError(await voteMe(poll.poll_id, null), 401, 'UNAUTHENTICATED');
  assertError(await voteMe('noSuchPoll12345', await voter()), 404, 'POLL_NOT_FOUND');
});

test('second ballot from the same voter → 409 ALREADY_VOTED with the first vote_id', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const [a, b] = poll.options.map((o) => o.option_id);
  const v = assertRecorded(await castVote(server, tok, poll.poll_id, { option_id: a }), poll, [a]);
  const same = await castVote(server, tok, poll.poll_id, { option_id: a });
  assert.equal(assertError(same, 409, 'ALREADY_VOTED').vote_id, v.vote_id, 'identical second ballot');
  const diff = await castVote(server, tok, poll.poll_id, { option_id: b });
  assert.equal(assertError(diff, 409, 'ALREADY_VOTED').vote_id, v.vote_id, 'different second ballot');
  const me = await voteMe(poll.poll_id, tok);
  assert.deepEqual(me.json.option_ids, [a], 'the first ballot stands');
});

test('vote without a token → 401; unknown poll → 404 POLL_NOT_FOUND', async () => {
  const poll = await createPoll(server, ownerTok);
  const res = await castVote(server, null, poll.poll_id, { option_id: poll.options[0].option_id });
  assertError(res, 401, 'UNAUTHENTICATED');
  assert.match(res.headers.get('www-authenticate') || '', /^Bearer/);
  assertError(await castVote(server, await voter(), 'noSuchPoll12345', { option_id: 'x' }), 404, 'POLL_NOT_FOUND');
});

test('single: bad bodies → 400 (INVALID_OPTION / VALIDATION_ERROR / INVALID_JSON); a rejected vote uses no ballot',
  async () => {
    const poll = await createPoll(server, ownerTok);
    const other = await createPoll(server, ownerTok);
    const tok = await voter();
    const id = poll.poll_id;
    assertError(await castVote(server, tok, id, { option_id: 'nope' }), 400, 'INVALID_OPTION');
    assertError(await castVote(server, tok, id, { option_id: other.options[0].option_id }), 400, 'INVALID_OPTION');
    assertError(await castVote(server, tok, id, {}), 400, 'VALIDATION_ERROR', { field: 'option_id' });
    assertError(await castVote(server, tok, id, { option_id: 5 }), 400, 'VALIDATION_ERROR', { field: 'option_id' });
    assertError(await castVote(server, tok, id, { option_id: null }), 400, 'VALIDATION_ERROR', { field: 'option_id' });
    assertError(await api(server, 'POST', `/v1/polls/${id}/votes`, { token: tok, raw: '[1]' }), 400,
      'VALIDATION_ERROR');
    assertError(await api(server, 'POST', `/v1/polls/${id}/votes`, { token: tok, raw: '{"option_id":' }), 400,
      'INVALID_JSON');
    const bad = Buffer.concat([Buffer.from('{"option_id":"'), Buffer.from([0xc3, 0x28]), Buffer.from('"}')]);
    assertError(await api(server, 'POST', `/v1/polls/${id}/votes`, { token: tok, raw: bad }), 400, 'INVALID_JSON');
    assert.equal((await voteMe(id, tok)).json.has_voted, false, 'no ballot after rejected votes');
    assertRecorded(await castVote(server, tok, id, { option_id: poll.options[0].option_id }), poll,
      [poll.options[0].option_id]);
  });

test('client_meta is accepted', async () => {
  const poll = await createPoll(server, ownerTok);
  const opt = poll.options[0].option_id;
  assertRecorded(await castVote(server, await voter(), poll.poll_id, { option_id: opt, client_meta: { ua: 'test' } }),
    poll, [opt]);
});

// ---- multiple -----------------------------------------------------------------------------

test('multiple: choice count within min..max; duplicates and unknown ids rejected', async () => {
  const poll = await createPoll(server, ownerTok, {
    type: 'multiple', options: [{ text: 'a' }, { text: 'b' }, { text: 'c' }, { text: 'd' }],
    settings: { min_choices: 2, max_choices: 3 },
  });
  const [a, b, c, d] = poll.options.map((o) => o.option_id);
  const tok = await voter();
  const id = poll.poll_id;
  assertError(await castVote(server, tok, id, { option_ids: [a] }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [] }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, b, c, d] }), 400, 'VALIDATION_ERROR',
    { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, a] }), 400, 'VALIDATION_ERROR');
  assertError(await castVote(server, tok, id, { option_ids: [a, b, a] }), 400, 'VALIDATION_ERROR');
  assertError(await castVote(server, tok, id, { option_ids: [a, 'nope'] }), 400, 'INVALID_OPTION');
  assertError(await castVote(server, tok, id, { option_ids: 'x' }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, 5] }), 400, 'VALIDATION_ERROR');
  assertError(await castVote(server, tok, id, {}), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assert.equal((await voteMe(id, tok)).json.has_voted, false, 'no ballot after rejected votes');
  const v = assertRecorded(await castVote(server, tok, id, { option_ids: [c, a] }), poll, [a, c]);
  const me = await voteMe(id, tok);
  assert.deepEqual([...me.json.option_ids].sort(), [a, c].sort());
  assert.equal(me.json.vote_id, v.vote_id);
  assertRecorded(await castVote(server, await voter(), id, { option_ids: [a, b, d] }), poll, [a, b, d]);
  assertError(await castVote(server, tok, id, { option_ids: [b, d] }), 409, 'ALREADY_VOTED');
});

test('multiple with defaults: 1..all options', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple' });
  const ids = poll.options.map((o) => o.option_id);
  assertRecorded(await castVote(server, await voter(), poll.poll_id, { option_ids: [ids[0]] }), poll, [ids[0]]);
  assertRecorded(await castVote(server, await voter(), poll.poll_id, { option_ids: ids }), poll, ids);
});

// ---- poll state and time window -----------------------------------------------------------

test('draft or closed poll → 409 POLL_NOT_ACTIVE', async () => {
  const draft = await createPoll(server, ownerTok, { status: 'draft' });
  assertError(await castVote(server, ownerTok, draft.poll_id, { option_id: draft.options[0].option_id }), 409,
    'POLL_NOT_ACTIVE');
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: ownerTok, body: { status: 'closed' } }),
    200, 'close');
  assertError(await castVote(server, tok, poll.poll_id, { option_id: poll.options[0].option_id }), 409,
    'POLL_NOT_ACTIVE');
  const dc = await createPoll(server, ownerTok, { status: 'draft' });
  assertStatus(await api(server, 'PATCH', `/v1/polls/${dc.poll_id}`, { token: ownerTok, body: { status: 'closed' } }),
    200, 'draft → closed');
  assertError(await castVote(server, tok, dc.poll_id, { option_id: dc.options[0].option_id }), 409,
    'POLL_NOT_ACTIVE');
});

test('end_time passing closes the poll without any call', async () => {
  const end = Date.now() + 1500;
  const poll = await createPoll(server, ownerTok, { end_time: new Date(end).toISOString() });
  const opt = poll.options[0].option_id;
  assertRecorded(await castVote(server, await voter(), poll.poll_id, { option_id: opt }), poll, [opt]);
  await sleep(Math.max(0, end - Date.now()) + 400);
  assertError(await castVote(server, await voter(), poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
  const g = await api(server, 'GET', `/v1/polls/${poll.poll_id}`);
  assertStatus(g, 200);
  assert.equal(g.json.status, 'closed', 'GET shows closed after end_time');
  const r = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`);
  assertStatus(r, 200);
  assert.equal(r.json.total_votes, 1, 'the vote before end_time is counted');
  assert.equal(r.json.status, 'closed', 'results show the poll closed after end_time');
});

test('start_time in the future → 409 POLL_NOT_ACTIVE until it passes', async () => {
  const start = Date.now() + 1500;
  const poll = await createPoll(server, ownerTok, { start_time: new Date(start).toISOString() });
  const opt = poll.options[0].option_id;
  const tok = await voter();
  assertError(await castVote(server, tok, poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
  await sleep(Math.max(0, start - Date.now()) + 400);
  assertRecorded(await castVote(server, tok, poll.poll_id, { option_id: opt }), poll, [opt]);
});

// ---- anonymous voters -------------------------------------------------------------------

test('anonymous token: 403 FORBIDDEN unless the poll allows anonymous voters', async () => {
  const anon = await api(server, 'POST', '/v1/auth/anonymous');
  assertStatus(anon, 201, 'anonymous token');
  const tok = anon.json.token;
  const closedToAnon = await createPoll(server, ownerTok, { settings: { allow_anonymous: false } });
  assertError(await castVote(server, tok, closedToAnon.poll_id, { option_id: closedToAnon.options[0].option_id }),
    403, 'FORBIDDEN');
  const open = await createPoll(server, ownerTok, { settings: { allow_anonymous: true } });
  const opt = open.options[0].option_id;
  assertRecorded(await castVote(server, tok, open.poll_id, { option_id: opt }), open, [opt]);
  assertError(await castVote(server, tok, open.poll_id, { option_id: opt }), 409, 'ALREADY_VOTED');
});

// ---- idempotency --------------------------------------------------------------------------

test('Idempotency-Key: same key and body → same vote_id and receipt; different body → 422', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const key = `vote-${rand()}`;
  const [a, b] = poll.options.map((o) => o.option_id);
  const r1 = assertRecorded(await castVote(server, tok, poll.poll_id, { option_id: a }, { 'Idempotency-Key': key }),
    poll, [a]);
  const again = await castVote(server, tok, poll.poll_id, { option_id: a }, { 'Idempotency-Key': key });
  const r2 = assertRecorded(again, poll, [a]);
  assert.equal(r2.vote_id, r1.vote_id, 'retry returns the same vote_id');
  assert.equal(r2.receipt, r1.receipt, 'retry returns the same receipt');
  assertError(await castVote(server, tok, poll.poll_id, { option_id: b }, { 'Idempotency-Key': key }), 422,
    'IDEMPOTENCY_KEY_REUSED');
  const otherKey = await castVote(server, tok, poll.poll_id, { option_id: a }, { 'Idempotency-Key': `${key}-2` });
  assert.equal(assertError(otherKey, 409, 'ALREADY_VOTED').vote_id, r1.vote_id, 'another key is a second ballot');
  const noKey = await castVote(server, tok, poll.poll_id, { option_id: a });
  assertError(noKey, 409, 'ALREADY_VOTED');
  const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`);
  assert.equal(res.json.total_votes, 1, 'one ballot counted');
});

test('Idempotency-Key: 255 characters accepted, 256 → 400 VALIDATION_ERROR', async () => {
  const poll = await createPoll(server, ownerTok);
  const opt = poll.options[0].option_id;
  const tok = await voter();
  assertError(await castVote(server, tok, poll.poll_id, { option_id: opt }, { 'Idempotency-Key': 'k'.repeat(256) }),
    400, 'VALIDATION_ERROR');
  assertRecorded(await castVote(server, tok, poll.poll_id, { option_id: opt }, { 'Idempotency-Key': 'k'.repeat(255) }),
    poll, [opt]);
});

// ---- receipts -----------------------------------------------------------------------------

test('receipt lookup → {counted: true, poll_id, recorded_at}; unknown → 404 RECEIPT_NOT_FOUND', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const v = assertRecorded(await castVote(server, tok, poll.poll_id, { option_id: poll.options[2].option_id }), poll,
    [poll.options[2].option_id]);
  const r = await api(server, 'GET', `/v1/receipts/${encodeURIComponent(v.receipt)}`, { token: tok });
  assertStatus(r, 200, 'receipt lookup');
  assert.equal(r.json.counted, true);
  assert.equal(r.json.poll_id, poll.poll_id);
  assertIso(r.json.recorded_at, 'receipt recorded_at');
  assert.equal(r.json.recorded_at, v.recorded_at, 'recorded_at matches the vote response');
  const reveals = Object.keys(r.json).filter((k) => !['counted', 'poll_id', 'recorded_at'].includes(k));
  for (const k of reveals) {
    assert.ok(!/option|voter|user|sub|ballot/i.test(k), `receipt lookup must reveal nothing else, has ${k}`);
  }
  assert.ok(!r.text.includes(poll.options[2].option_id), 'receipt lookup does not reveal the choice');
  assertError(await api(server, 'GET', '/v1/receipts/notARealReceipt123', { token: tok }), 404, 'RECEIPT_NOT_FOUND');
});

// ---- async votes --------------------------------------------------------------------------

async function waitRequest(location, token, ms = 5000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await api(server, 'GET', location, { token });
    assertStatus(last, 200, 'request status');
    if (last.json.state !== 'pending') return last.json;
    await sleep(50);
  }
  assert.fail(`request still not completed after ${ms} ms: ${describe(last)}`);
}

test('Prefer: respond-async → 202 accepted, request reaches completed; only the voter sees it', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const opt = poll.options[1].option_id;
  const res = await castVote(server, tok, poll.poll_id, { option_id: opt }, { Prefer: 'respond-async' });
  assertStatus(res, 202, 'async vote');
  assert.equal(res.json.status, 'accepted');
  assert.equal(res.json.poll_id, poll.poll_id);
  assert.equal(typeof res.json.request_id, 'string');
  assert.match(res.json.request_id, URL_SAFE);
  const expectedPath = `/v1/polls/${poll.poll_id}/votes/requests/${res.json.request_id}`;
  const loc = res.headers.get('location');
  assert.ok(loc && loc.endsWith(expectedPath), `Location must point at ${expectedPath}, got ${loc}`);
  const st = await waitRequest(expectedPath, tok);
  assert.equal(st.state, 'completed', `state: ${JSON.stringify(st)}`);
  assert.equal(st.request_id, res.json.request_id);
  assert.equal(typeof st.vote_id, 'string', 'completed request carries vote_id');
  const me = await voteMe(poll.poll_id, tok);
  assert.equal(me.json.has_voted, true);
  assert.deepEqual(me.json.option_ids, [opt]);
  assert.equal(me.json.vote_id, st.vote_id, 'the request vote_id is the recorded vote');
  assertError(await api(server, 'GET', expectedPath, { token: await voter() }), 404, 'REQUEST_NOT_FOUND');
  assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/requests/nope123`, { token: tok }), 404,
    'REQUEST_NOT_FOUND');
  // a second ballot after completion, async or not, is refused
  const again = await castVote(server, tok, poll.poll_id, { option_id: opt }, { Prefer: 'respond-async' });
  assert.equal(assertError(again, 409, 'ALREADY_VOTED').vote_id, st.vote_id);
});

test('a retry of a vote (same Idempotency-Key and body) gets the first answer again: an async one its 202 and request_id, also after a restart', async () => {
  const poll = await createPoll(server, ownerTok);
  const opt = poll.options[0].option_id;
  const [t1, t2] = [await voter(), await voter()];
  const k1 = { 'Idempotency-Key': `async-${rand()}` };
  const k2 = { 'Idempotency-Key': `direct-${rand()}` };
  const first = await castVote(server, t1, poll.poll_id, { option_id: opt }, { ...k1, Prefer: 'respond-async' });
  assertStatus(first, 202, 'async vote');
  const direct = await castVote(server, t2, poll.poll_id, { option_id: opt }, k2);
  assertStatus(direct, 200, 'direct vote');
  const retries = async (what) => {
    for (const extra of [{ Prefer: 'respond-async' }, {}]) {
      const again = await castVote(server, t1, poll.poll_id, { option_id: opt }, { ...k1, ...extra });
      assertStatus(again, 202, `${what}: the async vote's retry (${JSON.stringify(extra)})`);
      assert.equal(again.json.request_id, first.json.request_id);
      assert.equal(again.headers.get('location'), first.headers.get('location'));
      const d = await castVote(server, t2, poll.poll_id, { option_id: opt }, { ...k2, ...extra });
      assertStatus(d, 200, `${what}: the direct vote's retry (${JSON.stringify(extra)})`);
      assert.equal(d.json.vote_id, direct.json.vote_id);
    }
  };
  await retries('at once');
  await server.restart();
  await retries('after a restart');
  const r = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: ownerTok });
  assert.equal(r.json.total_votes, 2);
});

test('async votes: validation errors are returned directly', async () => {
  const poll = await createPoll(server, ownerTok);
  const tok = await voter();
  const pref = { Prefer: 'respond-async' };
  assertError(await castVote(server, tok, poll.poll_id, { option_id: 'nope' }, pref), 400, 'INVALID_OPTION');
  assertError(await castVote(server, tok, poll.poll_id, {}, pref), 400, 'VALIDATION_ERROR', { field: 'option_id' });
  assertError(await castVote(server, tok, 'noSuchPoll12345', { option_id: 'x' }, pref), 404, 'POLL_NOT_FOUND');
  const closed = await createPoll(server, ownerTok);
  assertStatus(await api(server, 'PATCH', `/v1/polls/${closed.poll_id}`, { token: ownerTok,
    body: { status: 'closed' } }), 200, 'close');
  assertError(await castVote(server, tok, closed.poll_id, { option_id: closed.options[0].option_id }, pref), 409,
    'POLL_NOT_ACTIVE');
  assertError(await castVote(server, null, poll.poll_id, { option_id: poll.options[0].option_id }, pref), 401,
    'UNAUTHENTICATED');
});
