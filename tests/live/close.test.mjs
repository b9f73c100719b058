// The end of a live stream: the poll closes (PATCH, or its end_time passes) → the final
// results, then `closed`, then the stream ends; the poll is deleted → `deleted`, then the end.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand, api } from '../api/harness.mjs';
import { nextMessage, openSse, openWs } from './client.mjs';
import { subscribe, voteNew, setStatus, assertCounts, nowMs, sleep } from './util.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

test('SSE: PATCH status closed → the final results, `event: closed` / `data: {}`, and the stream ends', async () => {
  const poll = await createPoll(server, ownerTok);
  const s = await subscribe(server, 'sse', poll.poll_id);
  try {
    await nextMessage(s, 1000);
    await voteNew(server, poll, 1);
    assert.equal((await nextMessage(s, 1000))?.data?.total_votes, 1);
    const { ackAt } = await setStatus(server, ownerTok, poll, 'closed');
    const fin = await nextMessage(s, 1000);
    assert.ok(fin, 'the final message within 1 s of the close');
    assert.equal(fin.kind, 'results');
    assertCounts(fin.data, poll, 'final results');
    assert.equal(fin.data.status, 'closed');
    assert.equal(fin.data.total_votes, 1);
    assert.deepEqual(fin.data.options.map((o) => o.votes), [0, 1, 0]);
    assert.ok(fin.t - ackAt < 1000, `${(fin.t - ackAt).toFixed(0)} ms after the close`);
    const closed = await nextMessage(s, 1000);
    assert.equal(closed?.kind, 'closed', `then event: closed: ${JSON.stringify(closed)}`);
    assert.deepEqual(closed.data, {}, 'data: {}');
    assert.ok(await s.waitClosed(2000), 'the server ends the stream');
    assert.ok(s.ended, 'with the last chunk (0\\r\\n\\r\\n), not a cut connection');
    assert.equal(await nextMessage(s, 10), null, 'nothing after `closed`');
  } finally { s.close(); }
});

test('WS: PATCH status closed → the final results, then close 1000', async () => {
  const poll = await createPoll(server, ownerTok);
  const w = await subscribe(server, 'ws', poll.poll_id);
  try {
    await nextMessage(w, 1000);
    await voteNew(server, poll, 2);
    assert.equal((await nextMessage(w, 1000))?.data?.total_votes, 1);
    const { ackAt } = await setStatus(server, ownerTok, poll, 'closed');
    const fin = await nextMessage(w, 1000);
    assert.equal(fin?.kind, 'results', `the final results first: ${JSON.stringify(fin)}`);
    assert.equal(fin.data.status, 'closed');
    assert.equal(fin.data.total_votes, 1);
    assert.ok(fin.t - ackAt < 1000);
    const { code, closed } = await w.waitClosed(2000);
    assert.equal(code, 1000, 'a normal closure');
    assert.ok(closed, 'and the connection ends');
  } finally { w.close(); }
});

// Regression test (was a server bug). live.c queues {"type":"closed"}
// and then the close frame while the final results are still being written; wslay sends
// control frames (the close) ahead of queued data frames and drops what is queued after
// it, so WS subscribers never get {"type":"closed"} on a poll close.
test('WS: {"type":"closed","data":{}} comes between the final results and the close frame',
  async () => {
    const poll = await createPoll(server, ownerTok);
    const w = await subscribe(server, 'ws', poll.poll_id);
    try {
      await nextMessage(w, 1000);
      await setStatus(server, ownerTok, poll, 'closed');
      const kinds = [];
      for (let m; (m = await nextMessage(w, 1500));) kinds.push(m.kind === 'close' ? `close ${m.code}` : m.kind);
      assert.deepEqual(kinds, ['results', 'closed', 'close 1000']);
    } finally { w.close(); }
  });

for (const kind of ['sse', 'ws']) {
  test(`${kind}: subscribing to a closed poll → the final results at once, then the end`, async () => {
    const poll = await createPoll(server, ownerTok);
    await voteNew(server, poll, 0);
    await setStatus(server, ownerTok, poll, 'closed');
    const t0 = nowMs();
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      const fin = await nextMessage(c, 1000);
      assert.equal(fin?.kind, 'results');
      assert.ok(fin.t - t0 < 250, 'at once');
      assert.equal(fin.data.status, 'closed');
      assert.equal(fin.data.total_votes, 1);
      if (kind === 'sse') assert.equal((await nextMessage(c, 1000))?.kind, 'closed');
      const closed = await c.waitClosed(2000);
      assert.ok(kind === 'ws' ? closed.closed && closed.code === 1000 : closed, `the stream ends: ${JSON.stringify(closed)}`);
    } finally { c.close(); }
  });

  test(`${kind}: a poll whose end_time passes closes its streams without anyone calling anything`, { timeout: 15_000 }, async () => {
    const end = Date.now() + 1500;
    const poll = await createPoll(server, ownerTok, { end_time: new Date(end).toISOString() });
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      assert.equal((await nextMessage(c, 1000))?.data?.status, 'active');
      await voteNew(server, poll, 0);
      const msgs = [];
      for (let m; (m = await nextMessage(c, 4000)) && m.kind === 'results';) {
        msgs.push(m);
        if (m.data.status === 'closed') break;
      }
      const fin = msgs[msgs.length - 1];
      assert.equal(fin?.data?.status, 'closed', `the final message: ${JSON.stringify(msgs.map((m) => m.data.status))}`);
      assert.equal(fin.data.total_votes, 1);
      const late = Date.now() - end;
      assert.ok(late < 1000, `the close is pushed within 1 s of end_time (${late} ms)`);
      const closed = await c.waitClosed(2000);
      assert.ok(kind === 'ws' ? closed.closed : closed, 'the stream ends');
    } finally { c.close(); }
  });

  test(`${kind}: DELETE of the poll → deleted, then the end`, async () => {
    const poll = await createPoll(server, ownerTok);
    const c = await subscribe(server, kind, poll.poll_id);
    try {
      await nextMessage(c, 1000);
      const r = await api(server, 'DELETE', `/v1/polls/${poll.poll_id}`, { token: ownerTok });
      assert.equal(r.status, 204);
      const m = await nextMessage(c, 1000);
      assert.equal(m?.kind, 'deleted', `a deleted message within 1 s: ${JSON.stringify(m)}`);
      const closed = await c.waitClosed(2000);
      assert.ok(kind === 'ws' ? closed.closed && closed.code === 1000 : closed, `the stream ends: ${JSON.stringify(closed)}`);
      // and the poll is gone for new subscribers
      await sleep(50);
      const again = kind === 'ws'
        ? await openWs(server, `/v1/polls/${poll.poll_id}/ws`)
        : await openSse(server, `/v1/polls/${poll.poll_id}/live`);
      assert.equal(again.status, 404);
      again.close();
    } finally { c.close(); }
  });
}

test('closing one poll ends only its own streams', async () => {
  const p1 = await createPoll(server, ownerTok);
  const p2 = await createPoll(server, ownerTok);
  const a = await subscribe(server, 'sse', p1.poll_id);
  const b = await subscribe(server, 'ws', p2.poll_id);
  try {
    await nextMessage(a, 1000);
    await nextMessage(b, 1000);
    await setStatus(server, ownerTok, p1, 'closed');
    assert.ok(await a.waitClosed(2000));
    await voteNew(server, p2, 0);
    const m = await nextMessage(b, 1000);
    assert.equal(m?.data?.total_votes, 1, 'the other poll still streams');
    assert.ok(!b.closed);
  } finally { a.close(); b.close(); }
});

test('server shutdown (SIGTERM): SSE streams end with a short retry hint, WS closes with 1001; exit 0', { timeout: 30_000 }, async () => {
  const srv = await startServer();
  const owner = srv.mint(`owner-${rand()}`);
  const poll = await createPoll(srv, owner);
  const s = await subscribe(srv, 'sse', poll.poll_id);
  const w = await subscribe(srv, 'ws', poll.poll_id);
  try {
    await nextMessage(s, 1000);
    await nextMessage(w, 1000);
    const stopping = srv.stop();
    const [sClosed, wClosed] = await Promise.all([s.waitClosed(5000), w.waitClosed(5000)]);
    const r = await stopping;
    assert.ok(sClosed, 'the SSE stream ends');
    assert.ok(s.ended, 'with the last chunk, not a reset');
    assert.equal(s.retry[s.retry.length - 1], 1000, `a short retry hint so clients come back soon: ${s.retry}`);
    assert.equal(wClosed.code, 1001, `WS "going away": ${JSON.stringify(wClosed)}`);
    assert.equal(r.code, 0, `tally exits cleanly: ${JSON.stringify(r)}`);
    assert.ok(!r.killed, 'within 5 s of SIGTERM');
  } finally { s.close(); w.close(); await srv.close(); }
});
