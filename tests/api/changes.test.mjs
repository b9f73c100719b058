// Changing (PUT .../votes/me) and retracting (DELETE .../votes/me) a ballot where
// allow_vote_change: counts move, the audit log records cast/changed/revoked in order with
// the right ballots, and everything that must be refused is.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, assertIso, rand, createPoll, castVote, results, URL_SAFE, sleep,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const newVoter = () => server.mint(`voter-${rand()}`);
const changeable = (more = {}) => ({ ...more, settings: { allow_vote_change: true, ...(more.settings || {}) } });
const put = (id, token, body) => api(server, 'PUT', `/v1/polls/${id}/votes/me`, { token, body });
const del = (id, token) => api(server, 'DELETE', `/v1/polls/${id}/votes/me`, { token });
const voteMe = (id, token) => api(server, 'GET', `/v1/polls/${id}/votes/me`, { token });
const close = (id) => api(server, 'PATCH', `/v1/polls/${id}`, { token: ownerTok, body: { status: 'closed' } });

async function counts(poll) {
  const res = await results(server, poll.poll_id, ownerTok);
  assertStatus(res, 200, 'results');
  return { total: res.json.total_votes, ...Object.fromEntries(res.json.options.map((o) => [o.label, o.votes])) };
}

/** Every audit item of a poll, walking the pages with the given limit. */
async function auditAll(poll, limit = 100) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < 1000; page++) {
    const q = `limit=${limit}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : '');
    const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/audit?${q}`, { token: ownerTok });
    assertStatus(res, 200, 'audit page');
    assert.ok(Array.isArray(res.json.items), `audit items: ${res.text}`);
    assert.ok(res.json.items.length <= limit, 'a page holds at most limit items');
    items.push(...res.json.items);
    cursor = res.json.next_cursor;
    if (cursor === null) return items;
    assert.equal(typeof cursor, 'string', 'next_cursor is a string or null');
  }
  assert.fail('audit pagination did not end');
}

function assertAuditItem(item) {
  assert.ok(['cast', 'changed', 'revoked'].includes(item.event), `event: ${JSON.stringify(item)}`);
  assert.equal(typeof item.voter, 'string', 'voter pseudonym');
  assert.match(item.voter, URL_SAFE);
  assertIso(item.at, 'audit at');
  if (item.event === 'revoked') assert.ok(item.ballot === null || item.ballot === undefined, 'revoked has no ballot');
  else assert.equal(typeof item.ballot, 'object', `ballot of ${item.event}`);
}

// ---- counts and audit ---------------------------------------------------------------------

test('change and retraction move the counts; audit shows cast/changed/revoked in order with the ballots',
  async () => {
    const poll = await createPoll(server, ownerTok, changeable());
    const [a, b, c] = poll.options.map((o) => o.option_id);
    const [v1, v2, v3] = [newVoter(), newVoter(), newVoter()];
    const id = poll.poll_id;
    assertStatus(await castVote(server, v1, id, { option_id: a }), 200);
    assertStatus(await castVote(server, v2, id, { option_id: a }), 200);
    assertStatus(await castVote(server, v3, id, { option_id: b }), 200);
    assert.deepEqual(await counts(poll), { total: 3, A: 2, B: 1, C: 0 });

    const ch = await put(id, v1, { option_id: b });
    assertStatus(ch, 200, 'change');
    assert.equal(ch.json.status, 'recorded');
    assert.deepEqual(ch.json.option_ids, [b]);
    assertIso(ch.json.recorded_at, 'recorded_at of the change');
    assert.deepEqual(await counts(poll), { total: 3, A: 1, B: 2, C: 0 }, 'after the change');
    const me1 = await voteMe(id, v1);
    assert.deepEqual(me1.json.option_ids, [b], 'votes/me shows the new ballot');

    const rm = await del(id, v2);
    assert.equal(rm.status, 204, `retraction → 204: ${rm.text}`);
    assert.equal(rm.text, '', '204 has no body');
    assert.deepEqual(await counts(poll), { total: 2, A: 0, B: 2, C: 0 }, 'after the retraction');
    const me2 = await voteMe(id, v2);
    assert.equal(me2.json.has_voted, false, 'votes/me after retraction');

    // voting again after retraction works
    assertStatus(await castVote(server, v2, id, { option_id: c }), 200, 'a new ballot after retraction');
    assert.deepEqual(await counts(poll), { total: 3, A: 0, B: 2, C: 1 }, 'after voting again');

    const items = await auditAll(poll);
    items.forEach(assertAuditItem);
    assert.deepEqual(items.map((i) => i.event), ['cast', 'cast', 'cast', 'changed', 'revoked', 'cast']);
    assert.deepEqual(items.map((i) => i.ballot ?? null),
      [{ option_id: a }, { option_id: a }, { option_id: b }, { option_id: b }, null, { option_id: c }]);
    const [p1, p2, p3] = [items[0].voter, items[1].voter, items[2].voter];
    assert.equal(new Set([p1, p2, p3]).size, 3, 'three voters, three pseudonyms');
    assert.deepEqual(items.map((i) => i.voter), [p1, p2, p3, p1, p2, p2], 'events carry their voter\'s pseudonym');
    for (let i = 1; i < items.length; i++) {
      assert.ok(items[i].seq > items[i - 1].seq, 'seq increases');
      assert.ok(Date.parse(items[i].at) >= Date.parse(items[i - 1].at), 'times do not go back');
    }
    assert.equal(items[3].at, ch.json.recorded_at, 'the changed event is at the change\'s recorded_at');
  });

test('each type: a change replaces the whole ballot; audit ballots are in the cast form', async () => {
  const cases = [
    { type: 'multiple', first: (o) => ({ option_ids: [o[0], o[1]] }), second: (o) => ({ option_ids: [o[2]] }),
      before: { A: 1, B: 1, C: 0 }, after: { A: 0, B: 0, C: 1 } },
    { type: 'approval', first: (o) => ({ option_ids: [o[0]] }), second: (o) => ({ option_ids: [o[1], o[2]] }),
      before: { A: 1, B: 0, C: 0 }, after: { A: 0, B: 1, C: 1 } },
    { type: 'ranked', first: (o) => ({ ranking: [o[0], o[1]] }), second: (o) => ({ ranking: [o[2], o[0]] }),
      before: { A: 1, B: 0, C: 0 }, after: { A: 0, B: 0, C: 1 } },
    { type: 'score', first: (o) => ({ scores: { [o[0]]: 5, [o[1]]: 1 } }), second: (o) => ({ scores: { [o[2]]: 4 } }),
      before: { A: 1, B: 1, C: 0 }, after: { A: 0, B: 0, C: 1 } },
  ];
  for (const k of cases) {
    const poll = await createPoll(server, ownerTok, changeable({ type: k.type }));
    const ids = poll.options.map((o) => o.option_id);
    const tok = newVoter();
    assertStatus(await castVote(server, tok, poll.poll_id, k.first(ids)), 200, `${k.type}: cast`);
    assert.deepEqual(await counts(poll), { total: 1, ...k.before }, `${k.type}: before the change`);
    assertStatus(await put(poll.poll_id, tok, k.second(ids)), 200, `${k.type}: change`);
    assert.deepEqual(await counts(poll), { total: 1, ...k.after }, `${k.type}: after the change`);
    const items = await auditAll(poll);
    assert.deepEqual(items.map((i) => [i.event, i.ballot]),
      [['cast', k.first(ids)], ['changed', k.second(ids)]], `${k.type}: audit`);
    if (k.type === 'score') {
      const r = (await results(server, poll.poll_id)).json;
      assert.deepEqual(r.options.map((o) => o.score_sum), [0, 0, 4], 'score sums follow the change');
    }
    if (k.type === 'ranked') {
      const r = (await results(server, poll.poll_id)).json;
      assert.equal(r.winner, ids[2], 'the IRV winner follows the change');
    }
  }
});

test('the receipt survives a change; after a retraction it no longer counts', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const cast = await castVote(server, tok, poll.poll_id, { option_id: a });
  assertStatus(cast, 200);
  const { receipt, vote_id } = cast.json;
  const ch = await put(poll.poll_id, tok, { option_id: b });
  assertStatus(ch, 200, 'change');
  assert.equal(ch.json.receipt, receipt, 'the change answers with the same receipt');
  assert.equal(ch.json.vote_id, vote_id, 'the change keeps the vote_id');
  const look = await api(server, 'GET', `/v1/receipts/${receipt}`);
  assertStatus(look, 200, 'receipt after the change');
  assert.equal(look.json.counted, true);
  assert.equal(look.json.poll_id, poll.poll_id);
  assertStatus(await del(poll.poll_id, tok), 204, 'retract');
  const gone = await api(server, 'GET', `/v1/receipts/${receipt}`);
  assert.ok(gone.status === 404 || gone.json?.counted === false,
    `a retracted ballot's receipt must not report counted: ${gone.status} ${gone.text}`);
});

// ---- refusals -----------------------------------------------------------------------------

test('without allow_vote_change: PUT and DELETE → 409 VOTE_CHANGE_NOT_ALLOWED, ballot untouched', async () => {
  const poll = await createPoll(server, ownerTok);
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }), 200);
  assertError(await put(poll.poll_id, tok, { option_id: b }), 409, 'VOTE_CHANGE_NOT_ALLOWED');
  assertError(await del(poll.poll_id, tok), 409, 'VOTE_CHANGE_NOT_ALLOWED');
  assertError(await put(poll.poll_id, newVoter(), { option_id: b }), 409, 'VOTE_CHANGE_NOT_ALLOWED');
  assert.deepEqual((await voteMe(poll.poll_id, tok)).json.option_ids, [a]);
  assert.deepEqual(await counts(poll), { total: 1, A: 1, B: 0, C: 0 });
  const items = await auditAll(poll);
  assert.deepEqual(items.map((i) => i.event), ['cast'], 'refused changes leave no audit events');
});

test('PUT/DELETE without a ballot → 404 VOTE_NOT_FOUND; again after a retraction', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  assertError(await put(poll.poll_id, tok, { option_id: a }), 404, 'VOTE_NOT_FOUND');
  assertError(await del(poll.poll_id, tok), 404, 'VOTE_NOT_FOUND');
  assert.equal((await voteMe(poll.poll_id, tok)).json.has_voted, false, 'PUT does not create a ballot');
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }), 200);
  assertStatus(await del(poll.poll_id, tok), 204);
  assertError(await del(poll.poll_id, tok), 404, 'VOTE_NOT_FOUND');
  assertError(await put(poll.poll_id, tok, { option_id: b }), 404, 'VOTE_NOT_FOUND');
  assert.deepEqual(await counts(poll), { total: 0, A: 0, B: 0, C: 0 });
  assert.deepEqual((await auditAll(poll)).map((i) => i.event), ['cast', 'revoked']);
});

test('PUT/DELETE: 401 without a token, 404 for an unknown poll', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  assertError(await put(poll.poll_id, null, { option_id: poll.options[0].option_id }), 401, 'UNAUTHENTICATED');
  assertError(await del(poll.poll_id, null), 401, 'UNAUTHENTICATED');
  assertError(await put('noSuchPoll12345', newVoter(), { option_id: 'x' }), 404, 'POLL_NOT_FOUND');
  assertError(await del('noSuchPoll12345', newVoter()), 404, 'POLL_NOT_FOUND');
});

test('a change is validated like a cast: 400 and the old ballot stands', async () => {
  const poll = await createPoll(server, ownerTok, changeable({ type: 'ranked' }));
  const [a, b, c] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  assertStatus(await castVote(server, tok, poll.poll_id, { ranking: [a, b] }), 200);
  assertError(await put(poll.poll_id, tok, { ranking: [b, b] }), 400, 'VALIDATION_ERROR', { fieldMatch: /^ranking/ });
  assertError(await put(poll.poll_id, tok, { ranking: [c, 'nope'] }), 400, 'INVALID_OPTION',
    { fieldMatch: /^ranking/ });
  assertError(await put(poll.poll_id, tok, { ranking: [] }), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assertError(await put(poll.poll_id, tok, {}), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assertError(await api(server, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok, raw: '{"ranking":' }),
    400, 'INVALID_JSON');
  const me = await voteMe(poll.poll_id, tok);
  assert.deepEqual(me.json.ballot ?? { ranking: me.json.option_ids }, { ranking: [a, b] }, 'the old ballot stands');
  assert.deepEqual((await auditAll(poll)).map((i) => i.event), ['cast'], 'no audit event for a refused change');

  const sp = await createPoll(server, ownerTok, changeable({ type: 'score' }));
  const s = sp.options.map((o) => o.option_id);
  assertStatus(await castVote(server, tok, sp.poll_id, { scores: { [s[0]]: 3 } }), 200);
  assertError(await put(sp.poll_id, tok, { scores: { [s[0]]: 6 } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await put(sp.poll_id, tok, { scores: { nope: 1 } }), 400, 'INVALID_OPTION', { fieldMatch: /^scores/ });
});

test('after close by PATCH: PUT and DELETE → 409 POLL_NOT_ACTIVE, counts frozen', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }), 200);
  assertStatus(await close(poll.poll_id), 200, 'close');
  assertError(await put(poll.poll_id, tok, { option_id: b }), 409, 'POLL_NOT_ACTIVE');
  assertError(await del(poll.poll_id, tok), 409, 'POLL_NOT_ACTIVE');
  assert.deepEqual(await counts(poll), { total: 1, A: 1, B: 0, C: 0 });
  assert.deepEqual((await voteMe(poll.poll_id, tok)).json.option_ids, [a]);
  assert.deepEqual((await auditAll(poll)).map((i) => i.event), ['cast']);
});

test('a draft: PUT/DELETE → 404 for a voter (drafts are invisible to non-owners)', async () => {
  const poll = await createPoll(server, ownerTok, changeable({ status: 'draft' }));
  assertError(await put(poll.poll_id, newVoter(), { option_id: poll.options[0].option_id }), 404, 'POLL_NOT_FOUND');
  assertError(await del(poll.poll_id, newVoter()), 404, 'POLL_NOT_FOUND');
});

// ---- audit endpoint -------------------------------------------------------------------------

test('audit: owner only (403 FORBIDDEN for a voter, 401 without a token); paginated by cursor', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b] = poll.options.map((o) => o.option_id);
  const toks = Array.from({ length: 5 }, () => newVoter());
  for (const t of toks) assertStatus(await castVote(server, t, poll.poll_id, { option_id: a }), 200);
  assertStatus(await put(poll.poll_id, toks[0], { option_id: b }), 200);
  assertStatus(await del(poll.poll_id, toks[1]), 204);
  const path = `/v1/polls/${poll.poll_id}/audit`;
  assertError(await api(server, 'GET', path, { token: toks[0] }), 403, 'FORBIDDEN');
  assertError(await api(server, 'GET', path), 401, 'UNAUTHENTICATED');
  assertError(await api(server, 'GET', '/v1/polls/noSuchPoll12345/audit', { token: ownerTok }), 404, 'POLL_NOT_FOUND');

  const first = await api(server, 'GET', path, { token: ownerTok });
  assertStatus(first, 200, 'audit default page');
  assert.equal(first.json.items.length, 7, 'default limit (20) holds all 7 events');
  assert.equal(first.json.next_cursor, null);
  const paged = await auditAll(poll, 2);
  assert.deepEqual(paged, first.json.items, 'pages of 2 walk the same events in the same order');
  const seqs = paged.map((i) => i.seq);
  assert.equal(new Set(seqs).size, seqs.length, 'no event twice');

  assertError(await api(server, 'GET', `${path}?limit=0`, { token: ownerTok }), 400, 'VALIDATION_ERROR',
    { field: 'limit' });
  assertError(await api(server, 'GET', `${path}?limit=101`, { token: ownerTok }), 400, 'VALIDATION_ERROR',
    { field: 'limit' });
  assertError(await api(server, 'GET', `${path}?limit=x`, { token: ownerTok }), 400, 'VALIDATION_ERROR',
    { field: 'limit' });
  assertError(await api(server, 'GET', `${path}?cursor=%21%21`, { token: ownerTok }), 400, 'VALIDATION_ERROR',
    { field: 'cursor' });
});

test('options stay frozen once a ballot was cast, even after every ballot was retracted (audit history)',
  async () => {
    const poll = await createPoll(server, ownerTok, changeable());
    const a = poll.options[0].option_id;
    const tok = newVoter();
    assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }), 200);
    assertStatus(await del(poll.poll_id, tok), 204);
    const patch = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`,
      { token: ownerTok, body: { options: [{ text: 'X' }, { text: 'Y' }] } });
    // were the options replaced, the audit log's cast event would name an option that did
    // not exist when it was cast
    assertError(patch, 409, 'POLL_HAS_VOTES');
    const items = await auditAll(poll);
    assert.deepEqual(items.map((i) => [i.event, i.ballot ?? null]), [['cast', { option_id: a }], ['revoked', null]]);
    const g = await api(server, 'GET', `/v1/polls/${poll.poll_id}`);
    assert.deepEqual(g.json.options.map((o) => o.option_id), poll.options.map((o) => o.option_id), 'options kept');
  });

test('Idempotency-Key: a retry of the first POST after a change replays it; after a retraction it casts nothing',
  async () => {
    const poll = await createPoll(server, ownerTok, changeable());
    const [a, b] = poll.options.map((o) => o.option_id);
    const tok = newVoter();
    const key = { 'Idempotency-Key': `cast-${rand()}` };
    const first = await castVote(server, tok, poll.poll_id, { option_id: a }, key);
    assertStatus(first, 200);
    assertStatus(await put(poll.poll_id, tok, { option_id: b }), 200, 'change');
    const retry = await castVote(server, tok, poll.poll_id, { option_id: a }, key);
    assertStatus(retry, 200, 'a retry after the change replays');
    assert.equal(retry.json.vote_id, first.json.vote_id, 'the same vote_id');
    assert.deepEqual(await counts(poll), { total: 1, A: 0, B: 1, C: 0 }, 'the retry does not undo the change');

    assertStatus(await del(poll.poll_id, tok), 204, 'retract');
    // a late retry of the very first request must not bring the retracted ballot back
    const late = await castVote(server, tok, poll.poll_id, { option_id: a }, key);
    assertError(late, 409, 'VOTE_RETRACTED');
    assert.deepEqual(await counts(poll), { total: 0, A: 0, B: 0, C: 0 },
      `the retracted ballot stays retracted after a retry of the first POST (${late.status} ${late.text})`);
    assert.deepEqual((await auditAll(poll)).map((i) => i.event), ['cast', 'changed', 'revoked']);
    // voting again on purpose, without the old key, works
    assertStatus(await castVote(server, tok, poll.poll_id, { option_id: b }), 200, 'a new ballot without the key');
  });

// ---- a retry of the first POST answers what that POST answered (issue 15, item 10) --------

const KINDS = [
  { type: 'single', first: ([a]) => ({ option_id: a }), then: ([, b]) => ({ option_id: b }), ids: ([a]) => [a] },
  { type: 'approval', first: ([a, b]) => ({ option_ids: [a, b] }), then: ([, , c]) => ({ option_ids: [c] }),
    ids: ([a, b]) => [a, b] },
  { type: 'score', first: ([a, b]) => ({ scores: { [a]: 0, [b]: 4 } }), then: ([a]) => ({ scores: { [a]: 2 } }),
    ids: ([, b]) => [b] },
];

/** Waits until this machine's clock (the server's too) has passed the time `iso`. */
async function clockPast(iso) {
  const t = Date.parse(iso);
  const deadline = Date.now() + 2000;
  while (Date.now() <= t && Date.now() < deadline) await sleep(1);
  assert.ok(Date.now() > t, `the clock passed ${iso}`);
}

for (const kind of KINDS) {
  test(`${kind.type}: after a change (two), a retry of the first POST returns its first response, ` +
    'the ballot and time as cast; after a restart and a kill -9 too', async () => {
    const poll = await createPoll(server, ownerTok, changeable({ type: kind.type }));
    const opts = poll.options.map((o) => o.option_id);
    const tok = newVoter();
    const key = { 'Idempotency-Key': `cast-${rand()}` };
    const first = await castVote(server, tok, poll.poll_id, kind.first(opts), key);
    assertStatus(first, 200, 'cast');
    assert.deepEqual(first.json.option_ids, kind.ids(opts));
    await clockPast(first.json.recorded_at); // so that the change's recorded_at differs from the cast's
    let ch = await put(poll.poll_id, tok, kind.then(opts));
    assertStatus(ch, 200, 'change');
    assert.notEqual(ch.json.recorded_at, first.json.recorded_at, 'the change has its own time');
    const countsAfter = await counts(poll);

    const replays = async (when) => {
      const retry = await castVote(server, tok, poll.poll_id, kind.first(opts), key);
      assertStatus(retry, 200, `retry ${when}`);
      assert.deepEqual(retry.json, first.json, `the retry ${when} gets the first response, field for field`);
      const me = (await voteMe(poll.poll_id, tok)).json;
      assert.deepEqual(me.option_ids, ch.json.option_ids, `votes/me ${when} still shows the change`);
      assert.equal(me.voted_at, ch.json.recorded_at, `voted_at ${when} is the change's time`);
      assert.deepEqual(await counts(poll), countsAfter, `the retry ${when} changes no count`);
    };
    await replays('after the change');
    // a second change keeps the first response what it was
    await clockPast(ch.json.recorded_at);
    const back = await put(poll.poll_id, tok, kind.first(opts));
    assertStatus(back, 200, 'a change back to the first ballot');
    await clockPast(back.json.recorded_at);
    ch = await put(poll.poll_id, tok, kind.then(opts));
    assertStatus(ch, 200, 'and away again');
    await replays('after a second change');
    await server.restart();
    await replays('after a restart');
    await server.kill9();
    await server.restart();
    await replays('after a kill -9');
    assertError(await castVote(server, tok, poll.poll_id, kind.then(opts), key), 422, 'IDEMPOTENCY_KEY_REUSED');
    assertError(await castVote(server, tok, poll.poll_id, kind.then(opts)), 409, 'ALREADY_VOTED');
  });
}

test('after a change and a retraction, a retry of the first POST gets 409 VOTE_RETRACTED (a restart too); ' +
  'once the voter has voted again, 409 ALREADY_VOTED naming the new ballot', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b, c] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const key = { 'Idempotency-Key': `cast-${rand()}` };
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }, key), 200);
  assertStatus(await put(poll.poll_id, tok, { option_id: b }), 200, 'change');
  assertStatus(await del(poll.poll_id, tok), 204, 'retract');
  assertError(await castVote(server, tok, poll.poll_id, { option_id: a }, key), 409, 'VOTE_RETRACTED');
  await server.restart();
  assertError(await castVote(server, tok, poll.poll_id, { option_id: a }, key), 409, 'VOTE_RETRACTED');
  assert.deepEqual(await counts(poll), { total: 0, A: 0, B: 0, C: 0 }, 'nothing cast by the retries');

  const again = await castVote(server, tok, poll.poll_id, { option_id: c }, { 'Idempotency-Key': `new-${rand()}` });
  assertStatus(again, 200, 'a new ballot with a new key');
  const err = assertError(await castVote(server, tok, poll.poll_id, { option_id: a }, key), 409, 'ALREADY_VOTED');
  assert.equal(err.vote_id, again.json.vote_id, 'the ballot the voter holds now');
  assert.deepEqual(await counts(poll), { total: 1, A: 0, B: 0, C: 1 });
});

async function waitCompleted(location, token) {
  const deadline = Date.now() + 5000;
  let last;
  while (Date.now() < deadline) {
    last = await api(server, 'GET', location, { token });
    assertStatus(last, 200, 'request status');
    if (last.json.state !== 'pending') break;
    await sleep(20);
  }
  assert.equal(last.json.state, 'completed', `the request completed within 5 s: ${last.text}`);
  return last.json;
}

test('async (202): after a change, a retry of the first POST (async or not) returns its 202 with the same ' +
  'request_id, whose status still names the ballot; after a restart too', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const key = `cast-${rand()}`;
  const async = { 'Idempotency-Key': key, Prefer: 'respond-async' };
  const first = await castVote(server, tok, poll.poll_id, { option_id: a }, async);
  assertStatus(first, 202, 'async cast');
  const location = `/v1/polls/${poll.poll_id}/votes/requests/${first.json.request_id}`;
  const done = await waitCompleted(location, tok);
  assertStatus(await put(poll.poll_id, tok, { option_id: b }), 200, 'change');

  const replays = async (when) => {
    for (const headers of [async, { 'Idempotency-Key': key }]) {
      const retry = await castVote(server, tok, poll.poll_id, { option_id: a }, headers);
      assertStatus(retry, 202, `retry ${when} (${headers.Prefer ? 'async' : 'sync'})`);
      assert.deepEqual(retry.json, first.json, `the first response again ${when}`);
      assert.equal(retry.headers.get('location'), first.headers.get('location'), `Location ${when}`);
    }
    assert.deepEqual(await waitCompleted(location, tok), done, `the request's status ${when}`);
    assert.deepEqual((await voteMe(poll.poll_id, tok)).json.option_ids, [b], `the change stands ${when}`);
    assert.deepEqual(await counts(poll), { total: 1, A: 0, B: 1, C: 0 }, `counts ${when}`);
  };
  await replays('after the change');
  await server.restart();
  await replays('after a restart');
});

test('a retracted ballot stays retracted when the POST that cast it is retried after a restart', async () => {
  const poll = await createPoll(server, ownerTok, changeable());
  const [a] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const key = { 'Idempotency-Key': `cast-${rand()}` };
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }, key), 200);
  assertStatus(await del(poll.poll_id, tok), 204, 'retract');
  await server.restart();
  const late = await castVote(server, tok, poll.poll_id, { option_id: a }, key);
  assertError(late, 409, 'VOTE_RETRACTED');
  const other = await castVote(server, tok, poll.poll_id, { option_id: a, client_meta: { x: 1 } }, key);
  assertError(other, 422, 'IDEMPOTENCY_KEY_REUSED');
  assert.deepEqual(await counts(poll), { total: 0, A: 0, B: 0, C: 0 }, 'nothing cast by the late retries');
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: a }), 200, 'a new ballot without the key');
});

test('the key of a retracted ballot is remembered for --retracted-key-ttl seconds (a restart too); then a retry casts a new ballot', async () => {
  const s = await startServer({ args: ['--retracted-key-ttl', '2'] });
  try {
    const poll = await createPoll(s, await s.token(`owner-${rand()}`), changeable());
    const [a] = poll.options.map((o) => o.option_id);
    const [t1, t2] = [s.mint(`voter-${rand()}`), s.mint(`voter-${rand()}`)];
    const [k1, k2] = [{ 'Idempotency-Key': `k1-${rand()}` }, { 'Idempotency-Key': `k2-${rand()}` }];
    for (const [t, k] of [[t1, k1], [t2, k2]]) {
      assertStatus(await castVote(s, t, poll.poll_id, { option_id: a }, k), 200);
      assertStatus(await api(s, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: t }), 204);
    }
    const retractedAt = Date.now();
    assertError(await castVote(s, t1, poll.poll_id, { option_id: a }, k1), 409, 'VOTE_RETRACTED');
    await s.restart();
    assertError(await castVote(s, t2, poll.poll_id, { option_id: a }, k2), 409, 'VOTE_RETRACTED'); // loaded again
    await sleep(Math.max(0, retractedAt + 2500 - Date.now()));
    assertStatus(await castVote(s, t1, poll.poll_id, { option_id: a }, k1), 200, 'past its time: a new ballot');
    await s.restart();
    assertStatus(await castVote(s, t2, poll.poll_id, { option_id: a }, k2), 200, 'past its time, not loaded');
    const r = await results(s, poll.poll_id);
    assert.equal(r.json.total_votes, 2);
  } finally {
    await s.close();
  }
});

test('changes and retractions survive a restart: counts, votes/me, receipts, audit', async () => {
  const poll = await createPoll(server, ownerTok, changeable({ type: 'approval' }));
  const [a, b, c] = poll.options.map((o) => o.option_id);
  const [v1, v2, v3] = [newVoter(), newVoter(), newVoter()];
  const id = poll.poll_id;
  const c1 = await castVote(server, v1, id, { option_ids: [a, b] });
  assertStatus(c1, 200);
  assertStatus(await castVote(server, v2, id, { option_ids: [a] }), 200);
  assertStatus(await castVote(server, v3, id, { option_ids: [c] }), 200);
  assertStatus(await put(id, v1, { option_ids: [c] }), 200);
  assertStatus(await del(id, v2), 204);
  const before = await counts(poll);
  assert.deepEqual(before, { total: 2, A: 0, B: 0, C: 2 });
  const auditBefore = await auditAll(poll);
  const meBefore = (await voteMe(id, v1)).json;

  await server.restart();
  assert.deepEqual(await counts(poll), before, 'counts after a restart');
  assert.deepEqual(await auditAll(poll), auditBefore, 'audit after a restart');
  const me1 = (await voteMe(id, v1)).json;
  assert.deepEqual(me1.option_ids, [c], 'the changed ballot after a restart');
  assert.equal(me1.vote_id, meBefore.vote_id, 'the vote_id after a restart');
  assert.equal(me1.voted_at, meBefore.voted_at, 'voted_at after a restart');
  assert.equal((await voteMe(id, v2)).json.has_voted, false, 'the retracted ballot stays retracted');
  const look = await api(server, 'GET', `/v1/receipts/${c1.json.receipt}`);
  assertStatus(look, 200, 'the receipt of a changed ballot after a restart');
  assert.equal(look.json.counted, true);
  assertStatus(await castVote(server, v2, id, { option_ids: [b] }), 200, 'the retracted voter votes again');
  assertError(await castVote(server, v1, id, { option_ids: [b] }), 409, 'ALREADY_VOTED');
  assert.deepEqual(await counts(poll), { total: 3, A: 0, B: 1, C: 2 });
});
