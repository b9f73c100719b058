// Shared helpers of the live-results tests (tests/live/*.test.mjs).
import assert from 'node:assert/strict';
import { api, assertStatus, castVote, rand, sleep } from '../api/harness.mjs';
import { nowMs, openSse, openWs, nextMessage, WsConn } from './client.mjs';

export { nowMs, sleep };

export const livePath = (pollId, q = '') => `/v1/polls/${pollId}/live${q}`;
export const wsPath = (pollId, q = '') => `/v1/polls/${pollId}/ws${q}`;

/** Opens a subscriber of the given kind ('sse' or 'ws') and checks it was accepted. */
export async function subscribe(server, kind, pollId, opts = {}) {
  const c = kind === 'ws'
    ? await openWs(server, wsPath(pollId, opts.query || ''), opts)
    : await openSse(server, livePath(pollId, opts.query || ''), opts);
  const want = kind === 'ws' ? 101 : 200;
  assert.equal(c.status, want, `${kind} subscribe to ${pollId}: expected ${want}, got ${c.status} ${c.error || ''} ${c.body || ''}`);
  return c;
}

/** A vote from a fresh voter (token minted with the server secret). Returns {tok, res, ackAt}. */
export async function voteNew(server, poll, optionIndex = 0, { sub } = {}) {
  const tok = server.mint(sub || `voter-${rand()}`);
  const res = await castVote(server, tok, poll.poll_id, { option_id: poll.options[optionIndex].option_id });
  const ackAt = nowMs();
  assertStatus(res, 200, 'vote');
  return { tok, res, ackAt };
}

export async function voteAs(server, poll, tok, optionIndex = 0) {
  const res = await castVote(server, tok, poll.poll_id, { option_id: poll.options[optionIndex].option_id });
  const ackAt = nowMs();
  assertStatus(res, 200, 'vote');
  return { res, ackAt };
}

export async function setStatus(server, ownerTok, poll, status) {
  const res = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: ownerTok, body: { status } });
  assertStatus(res, 200, `PATCH status ${status}`);
  return { res, ackAt: nowMs() };
}

/** Every message (normalised by nextMessage) that arrives within ms. */
export async function collectFor(conn, ms) {
  const out = [];
  const end = nowMs() + ms;
  for (;;) {
    const left = end - nowMs();
    if (left <= 0) break;
    const m = await nextMessage(conn, left);
    if (!m) break;
    out.push(m);
  }
  return out;
}

/** Asserts the shape of a results object with counts. */
export function assertCounts(data, poll, what = 'results') {
  assert.ok(data && typeof data === 'object', `${what}: data must be an object, got ${JSON.stringify(data)}`);
  assert.equal(data.poll_id, poll.poll_id, `${what}: poll_id`);
  assert.notEqual(data.results_hidden, true, `${what}: must show counts: ${JSON.stringify(data)}`);
  assert.ok(Number.isInteger(data.total_votes), `${what}: total_votes must be an integer: ${JSON.stringify(data)}`);
  assert.deepEqual(data.options.map((o) => o.option_id), poll.options.map((o) => o.option_id), `${what}: options in order`);
  for (const o of data.options) {
    assert.ok(Number.isInteger(o.votes), `${what}: votes per option: ${JSON.stringify(o)}`);
    assert.equal(typeof o.percentage, 'number', `${what}: percentage per option: ${JSON.stringify(o)}`);
    assert.equal(typeof o.label, 'string', `${what}: label per option: ${JSON.stringify(o)}`);
  }
}

/** Asserts the state without counts sent to a caller who may not see them. */
export function assertHidden(data, poll, visibility, what = 'hidden state') {
  assert.ok(data && typeof data === 'object', `${what}: data must be an object, got ${JSON.stringify(data)}`);
  assert.equal(data.results_hidden, true, `${what}: results_hidden must be true: ${JSON.stringify(data)}`);
  assert.equal(data.poll_id, poll.poll_id, `${what}: poll_id`);
  assert.equal(typeof data.status, 'string', `${what}: status`);
  if (visibility) assert.equal(data.results_visibility, visibility, `${what}: results_visibility`);
  assert.ok(!('total_votes' in data), `${what}: must not carry total_votes: ${JSON.stringify(data)}`);
  assert.deepEqual(data.options, poll.options.map((o) => ({ option_id: o.option_id, label: o.text })),
    `${what}: options are [{option_id,label}] only: ${JSON.stringify(data)}`);
}

export const isWs = (c) => c instanceof WsConn;
