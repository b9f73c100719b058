// Live results over SSE (/live) and WebSocket (/ws): the first state at once, an update
// within a second of a vote, coalescing (one message per tick, the latest state).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand } from '../api/harness.mjs';
import { nextMessage } from './client.mjs';
import { subscribe, voteNew, collectFor, assertCounts, nowMs, sleep } from './util.mjs';

const TICK = 250; // the default --live-tick

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

test('SSE: text/event-stream, no-store, X-Accel-Buffering: no, "retry: 2000" first', async () => {
  const poll = await createPoll(server, ownerTok);
  const s = await subscribe(server, 'sse', poll.poll_id);
  try {
    assert.match(s.headers['content-type'], /^text\/event-stream/, 'content type');
    assert.equal(s.headers['cache-control'], 'no-store');
    assert.equal(s.headers['x-accel-buffering'], 'no', 'so that nginx does not buffer the stream');
    const first = await s.waitFor((e) => e.event === 'results', 1000, 'the first results event');
    assert.ok(s.raw.startsWith('retry: 2000\n'), `the stream starts with a retry hint: ${JSON.stringify(s.raw.slice(0, 80))}`);
    assert.deepEqual(s.retry, [2000]);
    assert.match(first.id, /^\d+$/, `id is the sequence number: ${first.id}`);
  } finally { s.close(); }
});

for (const kind of ['sse', 'ws']) {
  test(`${kind}: the current state arrives at once, a vote within 1 s`, async () => {
    const poll = await createPoll(server, ownerTok);
    await voteNew(server, poll, 1); // a state that is not all zeros
    const t0 = nowMs();
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      const first = await nextMessage(c, 1000);
      assert.ok(first, 'a first message within 1 s');
      assert.equal(first.kind, 'results', `the first message is the results: ${JSON.stringify(first)}`);
      // (that it is sent on subscribing rather than on the next tick: resume.test.mjs, with a long tick)
      assert.ok(first.t - t0 < 1000, `the first state within 1 s (${(first.t - t0).toFixed(0)} ms)`);
      assertCounts(first.data, poll, 'first state');
      assert.equal(first.data.status, 'active');
      assert.equal(first.data.total_votes, 1);
      assert.deepEqual(first.data.options.map((o) => o.votes), [0, 1, 0]);
      assert.ok(Number.isInteger(first.seq) && first.seq > 0, `seq/id is a positive integer: ${first.seq}`);

      const { ackAt } = await voteNew(server, poll, 0);
      const upd = await nextMessage(c, 1000);
      assert.ok(upd, 'an update within 1 s of the vote');
      assert.equal(upd.kind, 'results');
      assert.equal(upd.data.total_votes, 2, `the update carries the vote: ${JSON.stringify(upd.data)}`);
      assert.deepEqual(upd.data.options.map((o) => o.votes), [1, 1, 0]);
      assert.ok(upd.t - ackAt < 1000, `delivered ${(upd.t - ackAt).toFixed(0)} ms after the vote's 200`);
      assert.ok(upd.seq > first.seq, `the sequence grows: ${first.seq} → ${upd.seq}`);

      // nothing changes: nothing more is sent (pings come after 15 s only)
      const more = await collectFor(c, 3 * TICK);
      assert.deepEqual(more, [], `no messages without a change: ${JSON.stringify(more).slice(0, 300)}`);
    } finally { c.close(); }
  });

  test(`${kind}: 10 quick votes are coalesced; the last message shows all 10`, async () => {
    const poll = await createPoll(server, ownerTok);
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      const first = await nextMessage(c, 1000);
      assert.equal(first?.data?.total_votes, 0);
      await Promise.all(Array.from({ length: 10 }, (_, i) => voteNew(server, poll, i % 3)));
      const msgs = await collectFor(c, 1000 + 2 * TICK);
      assert.ok(msgs.length >= 1, 'at least one update');
      assert.ok(msgs.every((m) => m.kind === 'results'), `only results messages: ${msgs.map((m) => m.kind)}`);
      assert.ok(msgs.length <= 4, `10 votes within a tick or two must give far fewer than 10 messages, got ${msgs.length}: ` +
        msgs.map((m) => m.data.total_votes).join(','));
      const last = msgs[msgs.length - 1];
      assert.equal(last.data.total_votes, 10, 'the last message is the latest state');
      assert.deepEqual(last.data.options.map((o) => o.votes), [4, 3, 3]);
      let prev = first;
      for (const m of msgs) {
        assert.ok(m.data.total_votes >= prev.data.total_votes, 'counts never go down');
        assert.ok(m.seq > prev.seq, `the sequence grows with every message: ${prev.seq} → ${m.seq}`);
        prev = m;
      }
    } finally { c.close(); }
  });

  test(`${kind}: votes paced over 1.5 s: at most one message per tick, always the latest`, { timeout: 30_000 }, async () => {
    const poll = await createPoll(server, ownerTok);
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      await nextMessage(c, 1000);
      const start = nowMs();
      let acked = 0;
      const votes = [];
      for (let i = 0; i < 30; i++) {
        votes.push(voteNew(server, poll, i % 3).then(() => { acked++; }));
        await sleep(50);
      }
      await Promise.all(votes);
      const span = nowMs() - start;
      const msgs = await collectFor(c, 1000);
      const totals = msgs.map((m) => m.data.total_votes);
      assert.equal(totals[totals.length - 1], 30, `the last message shows every vote: ${totals}`);
      for (let i = 1; i < totals.length; i++) assert.ok(totals[i] >= totals[i - 1], `counts never go down: ${totals}`);
      const maxMsgs = Math.ceil((span + 1000) / TICK) + 1;
      assert.ok(msgs.length <= maxMsgs, `${msgs.length} messages over ${span.toFixed(0)} ms + 1 s is more than one per tick (${maxMsgs})`);
      assert.ok(msgs.length < 30, `fewer messages than votes: ${msgs.length}`);
      // (no check of single gaps: a descheduled test process reads two messages at once)
    } finally { c.close(); }
  });
}

test('SSE and WS subscribers of one poll see the same states', async () => {
  const poll = await createPoll(server, ownerTok);
  const s = await subscribe(server, 'sse', poll.poll_id);
  const w = await subscribe(server, 'ws', poll.poll_id);
  try {
    const a = await nextMessage(s, 1000);
    const b = await nextMessage(w, 1000);
    assert.equal(a.seq, b.seq);
    assert.deepEqual(b.data, a.data);
    await voteNew(server, poll, 2);
    const a2 = await nextMessage(s, 1000);
    const b2 = await nextMessage(w, 1000);
    assert.equal(a2.seq, b2.seq, 'the SSE id and the WS seq are the same number');
    assert.deepEqual(a2.data.options, b2.data.options);
    assert.equal(a2.data.total_votes, 1);
  } finally { s.close(); w.close(); }
});

test('subscribers of another poll are not told about this one', async () => {
  const p1 = await createPoll(server, ownerTok);
  const p2 = await createPoll(server, ownerTok);
  const c = await subscribe(server, 'sse', p2.poll_id);
  try {
    await nextMessage(c, 1000);
    await voteNew(server, p1, 0);
    const msgs = await collectFor(c, 3 * TICK);
    assert.deepEqual(msgs, [], 'a vote on another poll sends nothing');
  } finally { c.close(); }
});
