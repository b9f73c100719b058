// Every ballot type end to end: create, vote from several voters, read the results
// (instant-runoff rounds and the Condorcet winner for ranked polls, sums and means for
// score polls), and strict validation of each ballot shape.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, rand, createPoll, castVote, results, optionByText,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const newVoter = () => server.mint(`voter-${rand()}`);
const voteMe = (id, token) => api(server, 'GET', `/v1/polls/${id}/votes/me`, { token });

/** Casts each body from a new voter, all in parallel; every one must be recorded. */
async function voteAll(poll, bodies) {
  const toks = bodies.map(() => newVoter());
  const all = await Promise.all(bodies.map((b, i) => castVote(server, toks[i], poll.poll_id, b)));
  all.forEach((r, i) => assertStatus(r, 200, `ballot ${i} ${JSON.stringify(bodies[i])}`));
  return toks;
}

/** The results (visibility always), checked for the common shape. */
async function readResults(poll) {
  const res = await results(server, poll.poll_id);
  assertStatus(res, 200, 'results');
  const r = res.json;
  assert.equal(r.poll_id, poll.poll_id);
  assert.deepEqual(r.options.map((o) => o.option_id), poll.options.map((o) => o.option_id),
    'every option in display order');
  assert.ok(Number.isInteger(r.votes_last_minute) && r.votes_last_minute >= 0,
    `results carry votes_last_minute: ${res.text}`);
  return r;
}

const byLabel = (r, field) => Object.fromEntries(r.options.map((o) => [o.label, o[field]]));

/** Maps option ids to labels in a rounds array, for readable comparisons. */
function roundsByLabel(poll, rounds) {
  const label = (id) => poll.options.find((o) => o.option_id === id)?.text ?? `?${id}`;
  return rounds.map((rd) => ({
    counts: Object.fromEntries(Object.entries(rd.counts).map(([id, n]) => [label(id), n])),
    eliminated: rd.eliminated.map(label),
  }));
}

// ---- single and multiple ----------------------------------------------------------------

test('single: several voters, counts and percentages; unknown option → 400 INVALID_OPTION (option_id)', async () => {
  const poll = await createPoll(server, ownerTok);
  const [a, b] = poll.options.map((o) => o.option_id);
  await voteAll(poll, [{ option_id: a }, { option_id: b }, { option_id: a }, { option_id: a }]);
  const r = await readResults(poll);
  assert.equal(r.total_votes, 4);
  assert.deepEqual(byLabel(r, 'votes'), { A: 3, B: 1, C: 0 });
  assert.deepEqual(byLabel(r, 'percentage'), { A: 75, B: 25, C: 0 });
  assert.equal(r.votes_last_minute, 4, 'four ballots cast within the last minute');
  const tok = newVoter();
  assertError(await castVote(server, tok, poll.poll_id, { option_id: 'nope' }), 400, 'INVALID_OPTION',
    { field: 'option_id' });
  assertError(await castVote(server, tok, poll.poll_id, { option_ids: [a, b] }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^option_ids?/ });
  assert.equal((await voteMe(poll.poll_id, tok)).json.has_voted, false);
});

test('multiple: several voters, each choice counted, percentages of ballots', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple', settings: { max_choices: 2 } });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  await voteAll(poll, [{ option_ids: [a, b] }, { option_ids: [b] }, { option_ids: [c, b] }]);
  const r = await readResults(poll);
  assert.equal(r.total_votes, 3);
  assert.deepEqual(byLabel(r, 'votes'), { A: 1, B: 3, C: 1 });
  assert.deepEqual(byLabel(r, 'percentage'), { A: 33.3, B: 100, C: 33.3 });
  assertError(await castVote(server, newVoter(), poll.poll_id, { option_ids: [a, b, c] }), 400, 'VALIDATION_ERROR',
    { field: 'option_ids' });
});

// ---- approval ------------------------------------------------------------------------------

test('approval: any number within min..max; counts per option, percentages of ballots', async () => {
  const poll = await createPoll(server, ownerTok, {
    type: 'approval', options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }, { text: 'D' }],
  });
  assert.equal(poll.type, 'approval');
  assert.equal(poll.settings.min_choices, 1, 'approval default min_choices');
  assert.equal(poll.settings.max_choices, 4, 'approval default max_choices = number of options');
  const [a, b, c, d] = poll.options.map((o) => o.option_id);
  const toks = await voteAll(poll, [
    { option_ids: [a] }, { option_ids: [a, b, c, d] }, { option_ids: [d, b] }, { option_ids: [b] },
  ]);
  const r = await readResults(poll);
  assert.equal(r.total_votes, 4, 'total_votes counts ballots');
  assert.deepEqual(byLabel(r, 'votes'), { A: 2, B: 3, C: 1, D: 2 });
  assert.deepEqual(byLabel(r, 'percentage'), { A: 50, B: 75, C: 25, D: 50 });
  const me = await voteMe(poll.poll_id, toks[2]);
  assert.equal(me.json.has_voted, true);
  assert.deepEqual([...me.json.option_ids].sort(), [b, d].sort(), 'votes/me shows the approved options');
});

test('approval: strict validation → 400 naming option_ids', async () => {
  const poll = await createPoll(server, ownerTok, {
    type: 'approval', options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }, { text: 'D' }],
    settings: { min_choices: 2, max_choices: 3 },
  });
  const other = await createPoll(server, ownerTok, { type: 'approval' });
  const [a, b, c, d] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const id = poll.poll_id;
  assertError(await castVote(server, tok, id, { option_ids: [a, 'nope'] }), 400, 'INVALID_OPTION',
    { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, other.options[0].option_id] }), 400,
    'INVALID_OPTION', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, b, a] }), 400, 'VALIDATION_ERROR',
    { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a] }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, b, c, d] }), 400, 'VALIDATION_ERROR',
    { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [] }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: a }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_ids: [a, 7] }), 400, 'VALIDATION_ERROR',
    { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { ranking: [a, b] }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assertError(await castVote(server, tok, id, { option_id: a }), 400, 'VALIDATION_ERROR', { field: 'option_ids' });
  assert.equal((await voteMe(id, tok)).json.has_voted, false, 'no ballot after rejected ones');
  assertStatus(await castVote(server, tok, id, { option_ids: [c, a] }), 200, 'a valid approval ballot');
});

// ---- ranked ---------------------------------------------------------------------------------

const TENNESSEE = [
  { text: 'Memphis' }, { text: 'Nashville' }, { text: 'Chattanooga' }, { text: 'Knoxville' },
];

test('ranked: the Tennessee capital election (42/26/15/17) → IRV winner Knoxville, Condorcet winner Nashville',
  async () => {
    const poll = await createPoll(server, ownerTok, { type: 'ranked', options: TENNESSEE });
    assert.equal(poll.type, 'ranked');
    const M = optionByText(poll, 'Memphis');
    const N = optionByText(poll, 'Nashville');
    const C = optionByText(poll, 'Chattanooga');
    const K = optionByText(poll, 'Knoxville');
    const bodies = [
      ...Array(42).fill({ ranking: [M, N, C, K] }),
      ...Array(26).fill({ ranking: [N, C, K, M] }),
      ...Array(15).fill({ ranking: [C, K, N, M] }),
      ...Array(17).fill({ ranking: [K, C, N, M] }),
    ];
    await voteAll(poll, bodies);
    const r = await readResults(poll);
    assert.equal(r.total_votes, 100);
    assert.deepEqual(byLabel(r, 'votes'), { Memphis: 42, Nashville: 26, Chattanooga: 15, Knoxville: 17 },
      'votes are first preferences');
    assert.deepEqual(byLabel(r, 'percentage'), { Memphis: 42, Nashville: 26, Chattanooga: 15, Knoxville: 17 });
    assert.ok(Array.isArray(r.rounds), `ranked results carry rounds: ${JSON.stringify(r)}`);
    assert.deepEqual(roundsByLabel(poll, r.rounds), [
      { counts: { Memphis: 42, Nashville: 26, Chattanooga: 15, Knoxville: 17 }, eliminated: ['Chattanooga'] },
      { counts: { Memphis: 42, Nashville: 26, Knoxville: 32 }, eliminated: ['Nashville'] },
      { counts: { Memphis: 42, Knoxville: 58 }, eliminated: [] },
    ], 'instant-runoff rounds');
    assert.equal(r.winner, K, 'Knoxville wins the instant runoff although Memphis leads on first preferences');
    assert.equal(r.condorcet_winner, N, 'Nashville beats every other city head to head');
  });

test('ranked: partial rankings; exhausted ballots leave the count; full ties eliminate the later option', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'ranked' });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  // 2 × [A], 2 × [B], 1 × [C]: round 1 A2 B2 C1 → C out, its ballot is exhausted;
  // round 2 A2 B2 of 4 continuing, tied also on first preferences → B (later) out; A wins.
  await voteAll(poll, [{ ranking: [a] }, { ranking: [a] }, { ranking: [b] }, { ranking: [b] }, { ranking: [c] }]);
  const r = await readResults(poll);
  assert.equal(r.total_votes, 5);
  assert.deepEqual(byLabel(r, 'votes'), { A: 2, B: 2, C: 1 });
  assert.deepEqual(roundsByLabel(poll, r.rounds), [
    { counts: { A: 2, B: 2, C: 1 }, eliminated: ['C'] },
    { counts: { A: 2, B: 2 }, eliminated: ['B'] },
    { counts: { A: 2 }, eliminated: [] },
  ]);
  assert.equal(r.winner, a);
  assert.equal(r.condorcet_winner, null, 'A and B tie head to head: no Condorcet winner');
});

test('ranked: a partial ranking transfers to its next choice', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'ranked' });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  // 2 × [A], 2 × [B], 1 × [C, B]: C out, its ballot moves to B, B wins 3 of 5.
  await voteAll(poll, [{ ranking: [a] }, { ranking: [a] }, { ranking: [b] }, { ranking: [b] }, { ranking: [c, b] }]);
  const r = await readResults(poll);
  assert.deepEqual(roundsByLabel(poll, r.rounds), [
    { counts: { A: 2, B: 2, C: 1 }, eliminated: ['C'] },
    { counts: { A: 2, B: 3 }, eliminated: [] },
  ]);
  assert.equal(r.winner, b);
  assert.equal(r.condorcet_winner, b, 'B beats A 3:2 and C 4:1 head to head');
});

test('ranked: a Condorcet cycle → condorcet_winner null; IRV still decides by the written tie rule', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'ranked' });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  await voteAll(poll, [{ ranking: [a, b, c] }, { ranking: [b, c, a] }, { ranking: [c, a, b] }]);
  const r = await readResults(poll);
  assert.equal(r.condorcet_winner, null, 'A>B, B>C, C>A: a cycle');
  // round 1: 1/1/1, full tie → C (last in display order) out, its ballot goes to A
  assert.deepEqual(roundsByLabel(poll, r.rounds), [
    { counts: { A: 1, B: 1, C: 1 }, eliminated: ['C'] },
    { counts: { A: 2, B: 1 }, eliminated: [] },
  ]);
  assert.equal(r.winner, a);
});

test('ranked: no ballots → no rounds, both winners null', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'ranked' });
  const r = await readResults(poll);
  assert.equal(r.total_votes, 0);
  assert.deepEqual(r.rounds, []);
  assert.equal(r.winner, null);
  assert.equal(r.condorcet_winner, null);
  assert.equal(r.votes_last_minute, 0);
});

test('ranked: strict validation → 400 naming ranking', async () => {
  const poll = await createPoll(server, ownerTok, {
    type: 'ranked', options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }, { text: 'D' }],
    settings: { max_choices: 3 },
  });
  const [a, b, c, d] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const id = poll.poll_id;
  assertError(await castVote(server, tok, id, { ranking: [a, 'nope'] }), 400, 'INVALID_OPTION',
    { fieldMatch: /^ranking/ });
  assertError(await castVote(server, tok, id, { ranking: [a, b, a] }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^ranking/ });
  assertError(await castVote(server, tok, id, { ranking: [c, c] }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^ranking/ });
  assertError(await castVote(server, tok, id, { ranking: [a, b, c, d] }), 400, 'VALIDATION_ERROR',
    { field: 'ranking' });
  assertError(await castVote(server, tok, id, { ranking: [] }), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assertError(await castVote(server, tok, id, { ranking: a }), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assertError(await castVote(server, tok, id, { ranking: [a, 2] }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^ranking/ });
  assertError(await castVote(server, tok, id, { option_ids: [a, b] }), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assertError(await castVote(server, tok, id, {}), 400, 'VALIDATION_ERROR', { field: 'ranking' });
  assert.equal((await voteMe(id, tok)).json.has_voted, false, 'no ballot after rejected ones');
  const ok = await castVote(server, tok, id, { ranking: [c, a, d] });
  assertStatus(ok, 200, 'a valid partial ranking');
  const me = await voteMe(id, tok);
  assert.deepEqual(me.json.ballot ?? { ranking: me.json.option_ids }, { ranking: [c, a, d] },
    'the ranking keeps the voter\'s order');
});

// ---- score ----------------------------------------------------------------------------------

test('score: sums and means per option (mean over the ballots that scored it)', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'score', settings: { max_score: 10 } });
  assert.equal(poll.type, 'score');
  assert.equal(poll.settings.max_score, 10);
  const [a, b, c] = poll.options.map((o) => o.option_id);
  await voteAll(poll, [
    { scores: { [a]: 10, [b]: 0, [c]: 5 } },
    { scores: { [a]: 7, [c]: 2 } },
    { scores: { [a]: 0, [b]: 4 } },
    { scores: { [b]: 9, [c]: 9 } },
  ]);
  const r = await readResults(poll);
  assert.equal(r.total_votes, 4);
  assert.deepEqual(byLabel(r, 'score_sum'), { A: 17, B: 13, C: 16 });
  assert.deepEqual(byLabel(r, 'score_mean'), { A: 5.67, B: 4.33, C: 5.33 });
  assert.deepEqual(byLabel(r, 'votes'), { A: 2, B: 2, C: 3 }, 'votes: ballots scoring the option above 0');
  assert.deepEqual(byLabel(r, 'percentage'), { A: 50, B: 50, C: 75 });
});

test('score: every option fully scored by everyone; zero ballots → sums and means 0', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'score' });
  assert.equal(poll.settings.max_score, 5, 'default max_score');
  let r = await readResults(poll);
  assert.deepEqual(byLabel(r, 'score_sum'), { A: 0, B: 0, C: 0 });
  assert.deepEqual(byLabel(r, 'score_mean'), { A: 0, B: 0, C: 0 });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  await voteAll(poll, [
    { scores: { [a]: 5, [b]: 0, [c]: 2 } },
    { scores: { [a]: 4, [b]: 1, [c]: 2 } },
    { scores: { [a]: 0, [b]: 5, [c]: 3 } },
    { scores: { [a]: 3, [b]: 3, [c]: 3 } },
  ]);
  r = await readResults(poll);
  assert.deepEqual(byLabel(r, 'score_sum'), { A: 12, B: 9, C: 10 });
  assert.deepEqual(byLabel(r, 'score_mean'), { A: 3, B: 2.25, C: 2.5 });
});

test('score: strict validation → 400 naming scores', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'score' }); // max_score 5
  const other = await createPoll(server, ownerTok, { type: 'score' });
  const [a, b] = poll.options.map((o) => o.option_id);
  const tok = newVoter();
  const id = poll.poll_id;
  assertError(await castVote(server, tok, id, { scores: { [a]: 6 } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { [a]: 3, [b]: 600 } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { [a]: -1 } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { [a]: 2.5 } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { [a]: '3' } }), 400, 'VALIDATION_ERROR',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { nope: 3 } }), 400, 'INVALID_OPTION',
    { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: { [other.options[0].option_id]: 3 } }), 400,
    'INVALID_OPTION', { fieldMatch: /^scores/ });
  assertError(await castVote(server, tok, id, { scores: [3, 4] }), 400, 'VALIDATION_ERROR', { field: 'scores' });
  assertError(await castVote(server, tok, id, { scores: {} }), 400, 'VALIDATION_ERROR', { field: 'scores' });
  assertError(await castVote(server, tok, id, { option_ids: [a] }), 400, 'VALIDATION_ERROR', { field: 'scores' });
  assertError(await castVote(server, tok, id, {}), 400, 'VALIDATION_ERROR', { field: 'scores' });
  assert.equal((await voteMe(id, tok)).json.has_voted, false, 'no ballot after rejected ones');
  assertStatus(await castVote(server, tok, id, { scores: { [a]: 5, [b]: 0 } }), 200, 'scores at both bounds');
  const r = await readResults(poll);
  assert.equal(r.total_votes, 1);
  assert.deepEqual(byLabel(r, 'score_sum'), { A: 5, B: 0, C: 0 });
});

test('score: max_score outside its range at creation → 400 settings.max_score', async () => {
  for (const max_score of [0, -1, 1.5, 'ten']) {
    const res = await api(server, 'POST', '/v1/polls', {
      token: ownerTok,
      body: { title: 'bad max', type: 'score', options: [{ text: 'A' }, { text: 'B' }], settings: { max_score } },
    });
    assertError(res, 400, 'VALIDATION_ERROR', { fieldMatch: /max_score/ });
  }
});
