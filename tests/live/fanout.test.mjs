// 2,000 concurrent subscribers of one poll (1,000 SSE + 1,000 WebSocket, raw sockets) all
// receive the final count after a burst of 500 votes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand, castVote } from '../api/harness.mjs';
import { openSse, openWs, resultsOf } from './client.mjs';
import { livePath, wsPath, nowMs } from './util.mjs';

const SUBSCRIBERS = 2000;
const VOTES = 500;
const DEADLINE_MS = 10_000;

let server, ownerTok;
before(async () => {
  // the default --live-max-per-ip is 2000: every subscriber here comes from 127.0.0.1
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

/** The highest total_votes a connection has received. */
function maxTotal(c) {
  let best = -1;
  for (const m of resultsOf(c)) if (m.data && m.data.total_votes > best) best = m.data.total_votes;
  return best;
}

test(`${SUBSCRIBERS} subscribers (half SSE, half WS) all get the final count after ${VOTES} votes`, { timeout: 120_000 }, async () => {
  const poll = await createPoll(server, ownerTok);
  const conns = [];
  try {
    // subscribe in batches so the accept queue never overflows
    for (let i = 0; i < SUBSCRIBERS; i += 200) {
      const batch = [];
      for (let j = i; j < Math.min(SUBSCRIBERS, i + 200); j++) {
        batch.push(j % 2 ? openWs(server, wsPath(poll.poll_id)) : openSse(server, livePath(poll.poll_id)));
      }
      conns.push(...(await Promise.all(batch)));
    }
    const refused = conns.filter((c) => c.status !== (c.constructor.name === 'WsConn' ? 101 : 200));
    assert.equal(refused.length, 0, `${refused.length} refused, e.g. ${refused[0]?.status} ${refused[0]?.error || ''} ${refused[0]?.body || ''}`);
    // everyone has the first state (total 0)
    const t0 = Date.now();
    while (conns.some((c) => maxTotal(c) < 0) && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 50));
    const noFirst = conns.filter((c) => maxTotal(c) < 0).length;
    assert.equal(noFirst, 0, `${noFirst} subscribers got no first state`);

    // the burst: 500 voters, 50 requests in flight
    const ids = poll.options.map((o) => o.option_id);
    let next = 0;
    const statuses = {};
    const worker = async () => {
      while (next < VOTES) {
        const i = next++;
        const r = await castVote(server, server.mint(`burst-${i}-${rand()}`), poll.poll_id, { option_id: ids[i % ids.length] });
        statuses[r.status] = (statuses[r.status] || 0) + 1;
      }
    };
    const burstStart = nowMs();
    await Promise.all(Array.from({ length: 50 }, worker));
    const lastAck = nowMs();
    assert.deepEqual(statuses, { 200: VOTES }, 'every vote recorded');

    while (nowMs() - lastAck < DEADLINE_MS && conns.some((c) => maxTotal(c) < VOTES)) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const allDone = nowMs() - lastAck;
    const missing = conns.filter((c) => maxTotal(c) < VOTES);
    const closed = conns.filter((c) => c.closed).length;
    assert.equal(missing.length, 0, `${missing.length} of ${SUBSCRIBERS} subscribers did not see total_votes ${VOTES} ` +
      `within ${DEADLINE_MS} ms (e.g. max ${missing.slice(0, 5).map(maxTotal)}; ${closed} connections closed)`);

    // coalesced and monotonic on every connection
    let msgs = 0;
    for (const c of conns) {
      const totals = resultsOf(c).map((m) => m.data.total_votes);
      msgs += totals.length;
      for (let i = 1; i < totals.length; i++) assert.ok(totals[i] >= totals[i - 1], `counts never go down: ${totals}`);
      assert.ok(totals.length < 60, `coalesced: ${totals.length} messages for ${VOTES} votes`);
    }
    process.stderr.write(`# fan-out: burst ${(lastAck - burstStart).toFixed(0)} ms; all ${SUBSCRIBERS} had the final count ` +
      `${allDone.toFixed(0)} ms after the last vote's 200; ${(msgs / SUBSCRIBERS).toFixed(1)} messages per subscriber\n`);
  } finally {
    for (const c of conns) c.close();
  }
});
