// Keep-alive: a quiet stream gets a `: ping` comment (SSE) or a ping frame (WS) every 15 s.
// This file waits about 16 s.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand } from '../api/harness.mjs';
import { nextMessage } from './client.mjs';
import { subscribe, voteNew, sleep, nowMs } from './util.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

test('SSE `: ping` and WS ping frames after 15 s without a message; the streams stay usable', { timeout: 40_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const s = await subscribe(server, 'sse', poll.poll_id);
  const w = await subscribe(server, 'ws', poll.poll_id);
  try {
    const t0 = nowMs();
    await nextMessage(s, 1000);
    await nextMessage(w, 1000);
    while (nowMs() - t0 < 18_000 && (s.comments.length === 0 || w.pings.length === 0)) await sleep(100);
    assert.equal(s.comments.length, 1, `one ": ping" comment within 18 s: ${JSON.stringify(s.comments)}`);
    assert.equal(s.comments[0].text, 'ping');
    assert.equal(w.pings.length, 1, 'one WS ping frame within 18 s');
    for (const [what, t] of [['SSE', s.comments[0].t], ['WS', w.pings[0].t]]) {
      const after = t - t0;
      assert.ok(after >= 14_000 && after <= 17_500, `${what}: the ping comes 15 s after the last message (${after.toFixed(0)} ms)`);
    }
    assert.equal(await nextMessage(s, 10), null, 'a ping is not an event');
    await voteNew(server, poll, 0);
    assert.equal((await nextMessage(s, 1000))?.data?.total_votes, 1, 'SSE still streams after the ping');
    assert.equal((await nextMessage(w, 1000))?.data?.total_votes, 1, 'WS still streams after the ping (our pong was accepted)');
  } finally { s.close(); w.close(); }
});
