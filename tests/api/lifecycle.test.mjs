// Poll lifecycle by time and by PATCH: start_time opens, end_time closes without any call,
// closing freezes a final tally that survives a restart, end_time can be extended while
// active, options freeze once a vote exists, and a closed poll cannot be reopened.
// Time windows are short; no single sleep is longer than 3 s.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, rand, sleep, createPoll, castVote, results,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const newVoter = () => server.mint(`voter-${rand()}`);
const patch = (id, body) => api(server, 'PATCH', `/v1/polls/${id}`, { token: ownerTok, body });
const getPoll = (id) => api(server, 'GET', `/v1/polls/${id}`, { token: ownerTok });
const iso = (ms) => new Date(ms).toISOString();

/** Sleeps until `t` (ms since the epoch) plus a margin; never more than 3 s at once. */
async function sleepUntil(t, margin = 250) {
  const ms = t + margin - Date.now();
  assert.ok(ms <= 3000, `test bug: would sleep ${ms} ms`);
  if (ms > 0) await sleep(ms);
}

/** The results without the sliding votes_last_minute (not part of the frozen tally). */
function tally(r) {
  const { votes_last_minute: _ignored, ...rest } = r;
  return rest;
}

test('start_time passing opens the poll: votes refused before, accepted after, without any call', async () => {
  const start = Date.now() + 1200;
  const poll = await createPoll(server, ownerTok, { start_time: iso(start), settings: { allow_vote_change: true } });
  const opt = poll.options[0].option_id;
  const tok = newVoter();
  const early = await castVote(server, tok, poll.poll_id, { option_id: opt });
  assertError(early, 409, 'POLL_NOT_ACTIVE');
  assert.equal((await results(server, poll.poll_id)).json?.total_votes, 0, 'nothing counted before start_time');
  await sleepUntil(start);
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: opt }), 200, 'vote after start_time');
  const g = await getPoll(poll.poll_id);
  assert.equal(g.json.status, 'active', 'active once start_time passed');
  assert.equal((await results(server, poll.poll_id)).json.total_votes, 1);
});

test('end_time passing closes the poll without any call; results are final and stay identical after a restart',
  async () => {
    const end = Date.now() + 1500;
    const poll = await createPoll(server, ownerTok, {
      type: 'ranked', end_time: iso(end), settings: { allow_vote_change: true },
    });
    const [a, b, c] = poll.options.map((o) => o.option_id);
    const toks = [newVoter(), newVoter(), newVoter()];
    assertStatus(await castVote(server, toks[0], poll.poll_id, { ranking: [a, b] }), 200);
    assertStatus(await castVote(server, toks[1], poll.poll_id, { ranking: [b, c] }), 200);
    assertStatus(await castVote(server, toks[2], poll.poll_id, { ranking: [c, b] }), 200);
    assertStatus(await api(server, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`,
      { token: toks[2], body: { ranking: [b] } }), 200, 'a change before the end');
    const live = await results(server, poll.poll_id);
    assertStatus(live, 200);
    assert.equal(live.json.status, 'active');
    assert.notEqual(live.json.final, true, 'an active poll\'s results are not final');

    await sleepUntil(end);
    // the first request after end_time is a read of the results: nothing closed the poll
    const r1 = await results(server, poll.poll_id);
    assertStatus(r1, 200, 'results after end_time');
    assert.equal(r1.json.status, 'closed', 'closed by end_time');
    assert.equal(r1.json.final, true, `closed results are final: ${r1.text}`);
    assert.equal(r1.json.total_votes, 3);
    assert.deepEqual(r1.json.options.map((o) => o.votes), [1, 2, 0]);
    assert.equal(r1.json.winner, b);
    const g = await getPoll(poll.poll_id);
    assert.equal(g.json.status, 'closed', 'GET shows closed');

    const late = newVoter();
    assertError(await castVote(server, late, poll.poll_id, { ranking: [a] }), 409, 'POLL_NOT_ACTIVE');
    assertError(await api(server, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`,
      { token: toks[0], body: { ranking: [c] } }), 409, 'POLL_NOT_ACTIVE');
    assertError(await api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: toks[1] }), 409,
      'POLL_NOT_ACTIVE');

    const r2 = await results(server, poll.poll_id);
    assert.deepEqual(tally(r2.json), tally(r1.json), 'later reads serve the same final tally');
    const tl1 = await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline?bucket=10s`);
    assertStatus(tl1, 200, 'timeline');

    await server.restart();
    const r3 = await results(server, poll.poll_id);
    assertStatus(r3, 200, 'results after restart');
    assert.deepEqual(tally(r3.json), tally(r1.json), 'the final tally is identical after a restart');
    assert.equal((await getPoll(poll.poll_id)).json.status, 'closed', 'still closed after a restart');
    assertError(await castVote(server, newVoter(), poll.poll_id, { ranking: [a] }), 409, 'POLL_NOT_ACTIVE');
    const tl2 = await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline?bucket=10s`);
    assert.deepEqual(tl2.json, tl1.json, 'the timeline is the same after a restart');
  });

test('closing by PATCH freezes a final tally that survives a restart', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'score' });
  const [a, b] = poll.options.map((o) => o.option_id);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { scores: { [a]: 4, [b]: 1 } }), 200);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { scores: { [a]: 1 } }), 200);
  const closed = await patch(poll.poll_id, { status: 'closed' });
  assertStatus(closed, 200, 'close');
  assert.equal(closed.json.status, 'closed');
  const r1 = await results(server, poll.poll_id);
  assert.equal(r1.json.final, true, `final after PATCH close: ${r1.text}`);
  assert.equal(r1.json.status, 'closed');
  assert.deepEqual(r1.json.options.map((o) => o.score_sum), [5, 1, 0]);
  await server.restart();
  const r2 = await results(server, poll.poll_id);
  assertStatus(r2, 200);
  assert.deepEqual(tally(r2.json), tally(r1.json), 'identical after a restart');
});

test('draft → active → closed by PATCH; votes only while active', async () => {
  const poll = await createPoll(server, ownerTok, { status: 'draft' });
  assert.equal(poll.status, 'draft');
  const opt = poll.options[0].option_id;
  assertError(await castVote(server, ownerTok, poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
  const act = await patch(poll.poll_id, { status: 'active' });
  assertStatus(act, 200, 'draft → active');
  assert.equal(act.json.status, 'active');
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 200, 'vote while active');
  assertError(await patch(poll.poll_id, { status: 'draft' }), 409, 'INVALID_STATUS_TRANSITION');
  assertStatus(await patch(poll.poll_id, { status: 'closed' }), 200, 'active → closed');
  assertError(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
  assertError(await patch(poll.poll_id, { status: 'active' }), 409, 'INVALID_STATUS_TRANSITION');
  assertError(await patch(poll.poll_id, { status: 'draft' }), 409, 'INVALID_STATUS_TRANSITION');
  const r = await results(server, poll.poll_id);
  assert.equal(r.json.total_votes, 1);
  assert.equal(r.json.final, true);
});

test('PATCH extends the end_time of an active poll: it stays open past the old end and closes at the new one',
  async () => {
    const t0 = Date.now();
    const oldEnd = t0 + 1200;
    const newEnd = t0 + 2900;
    const poll = await createPoll(server, ownerTok, { end_time: iso(oldEnd) });
    const opt = poll.options[0].option_id;
    const ext = await patch(poll.poll_id, { end_time: iso(newEnd) });
    assertStatus(ext, 200, 'extend end_time');
    assert.equal(Date.parse(ext.json.end_time), newEnd, 'the new end_time is stored');
    assert.equal(ext.json.status, 'active');
    await sleepUntil(oldEnd);
    assert.equal((await getPoll(poll.poll_id)).json.status, 'active', 'still active past the old end_time');
    assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 200, 'vote past the old end');
    await sleepUntil(newEnd);
    assert.equal((await getPoll(poll.poll_id)).json.status, 'closed', 'closed at the new end_time');
    assertError(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
    const r = await results(server, poll.poll_id);
    assert.equal(r.json.total_votes, 1);
    assert.equal(r.json.final, true);
  });

test('PATCH end_time of an active poll into the past → 400 (closing is done with status)', async () => {
  const poll = await createPoll(server, ownerTok, { end_time: iso(Date.now() + 60_000) });
  assertError(await patch(poll.poll_id, { end_time: iso(Date.now() - 1000) }), 400, 'VALIDATION_ERROR',
    { field: 'end_time' });
  assert.equal((await getPoll(poll.poll_id)).json.status, 'active');
});

test('a poll whose end_time passed cannot be reopened: 409 INVALID_STATUS_TRANSITION', async () => {
  const end = Date.now() + 1000;
  const poll = await createPoll(server, ownerTok, { end_time: iso(end) });
  const opt = poll.options[0].option_id;
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 200);
  await sleepUntil(end);
  const later = iso(Date.now() + 60_000);
  assertError(await patch(poll.poll_id, { end_time: later }), 409, 'INVALID_STATUS_TRANSITION');
  assertError(await patch(poll.poll_id, { end_time: null }), 409, 'INVALID_STATUS_TRANSITION');
  assertError(await patch(poll.poll_id, { status: 'active' }), 409, 'INVALID_STATUS_TRANSITION');
  assertError(await patch(poll.poll_id, { status: 'active', end_time: later }), 409, 'INVALID_STATUS_TRANSITION');
  const g = await getPoll(poll.poll_id);
  assert.equal(g.json.status, 'closed', 'still closed');
  assert.equal(Date.parse(g.json.end_time), end, 'end_time unchanged');
  assertError(await castVote(server, newVoter(), poll.poll_id, { option_id: opt }), 409, 'POLL_NOT_ACTIVE');
  const r = await results(server, poll.poll_id);
  assert.equal(r.json.total_votes, 1);
  assert.equal(r.json.final, true);
});

test('options can change until a vote exists, then 409 POLL_HAS_VOTES (other fields still change)', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple' });
  const changed = await patch(poll.poll_id, { options: [{ text: 'X' }, { text: 'Y' }, { text: 'Z' }, { text: 'W' }] });
  assertStatus(changed, 200, 'options before any vote');
  assert.deepEqual(changed.json.options.map((o) => o.text), ['X', 'Y', 'Z', 'W']);
  const ids = changed.json.options.map((o) => o.option_id);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_ids: [ids[3]] }), 200, 'vote on new options');
  assertError(await patch(poll.poll_id, { options: [{ text: 'P' }, { text: 'Q' }] }), 409, 'POLL_HAS_VOTES');
  const retitled = await patch(poll.poll_id, { title: 'Renamed' });
  assertStatus(retitled, 200, 'title may still change');
  assert.equal(retitled.json.title, 'Renamed');
  assert.deepEqual(retitled.json.options.map((o) => o.option_id), ids, 'options unchanged');
  const r = await results(server, poll.poll_id);
  assert.deepEqual(r.json.options.map((o) => o.votes), [0, 0, 0, 1]);
});

test('end_time passing while the server is down: closed and final after the start', async () => {
  const end = Date.now() + 1200;
  const poll = await createPoll(server, ownerTok, { end_time: iso(end) });
  const [a, b] = poll.options.map((o) => o.option_id);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: a }), 200);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: b }), 200);
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: b }), 200);
  await server.stop();
  await sleepUntil(end);
  await server.restart();
  const r = await results(server, poll.poll_id);
  assertStatus(r, 200, 'results after the start');
  assert.equal(r.json.status, 'closed');
  assert.equal(r.json.final, true, `final: ${r.text}`);
  assert.deepEqual(r.json.options.map((o) => o.votes), [1, 2, 0]);
  assertError(await castVote(server, newVoter(), poll.poll_id, { option_id: a }), 409, 'POLL_NOT_ACTIVE');
  await server.restart();
  const again = await results(server, poll.poll_id);
  assert.deepEqual(tally(again.json), tally(r.json), 'the same final tally after another restart');
});

test('a draft with a start_time is scheduled: hidden until then, open by itself when it passes', async () => {
  const start = Date.now() + 1500;
  const poll = await createPoll(server, ownerTok, { status: 'draft', start_time: new Date(start).toISOString() });
  const voter = server.mint(`sched-${rand()}`);
  const vote = () => api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
    { token: voter, body: { option_id: poll.options[0].option_id } });
  assert.equal(poll.status, 'draft');
  assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}`), 404, 'POLL_NOT_FOUND');
  assertError(await vote(), 404, 'POLL_NOT_FOUND');
  await new Promise((r) => setTimeout(r, Math.max(0, start - Date.now()) + 200));
  const open = await api(server, 'GET', `/v1/polls/${poll.poll_id}`);
  assert.equal(open.status, 200, 'visible to everyone once started');
  assert.equal(open.json.status, 'active');
  assert.equal((await vote()).status, 200, 'accepts ballots without anyone calling anything');
});
