// Subscriber limits: --live-max-per-ip and --live-max → 503 TOO_MANY_SUBSCRIBERS with
// Retry-After; a slot is free again once its subscriber is gone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand, api } from '../api/harness.mjs';
import { openSse, openWs, nextMessage, OP } from './client.mjs';
import { subscribe, livePath, wsPath, setStatus, sleep, voteNew } from './util.mjs';

let server, ownerTok, poll;
before(async () => {
  server = await startServer({ args: ['--live-max-per-ip', '3'] });
  ownerTok = server.mint(`owner-${rand()}`);
  poll = await createPoll(server, ownerTok);
});
after(async () => { await server?.close(); });

function assertRefused(c, what) {
  assert.equal(c.status, 503, `${what}: expected 503, got ${c.status} ${c.body}`);
  assert.equal(c.json?.error?.code, 'TOO_MANY_SUBSCRIBERS', `${what}: ${c.body}`);
  assert.match(c.headers['content-type'] || '', /^application\/json/);
  assert.match(c.headers['retry-after'] || '', /^\d+$/, `${what}: Retry-After in seconds: ${JSON.stringify(c.headers)}`);
  assert.ok(Number(c.headers['retry-after']) > 0);
}

/** Opens subscribers until one is accepted (a slot frees asynchronously), at most ms. */
async function subscribeEventually(kind, pollId, ms = 3000) {
  const end = Date.now() + ms;
  for (;;) {
    const c = kind === 'ws' ? await openWs(server, wsPath(pollId)) : await openSse(server, livePath(pollId));
    if (c.status === (kind === 'ws' ? 101 : 200)) return c;
    c.close();
    if (Date.now() > end) assert.fail(`no free slot within ${ms} ms: ${c.status} ${c.body}`);
    await sleep(50);
  }
}

test('--live-max-per-ip 3: the 4th subscriber from one address gets 503 TOO_MANY_SUBSCRIBERS', async () => {
  const open = [
    await subscribe(server, 'sse', poll.poll_id),
    await subscribe(server, 'ws', poll.poll_id),
    await subscribe(server, 'sse', poll.poll_id),
  ];
  try {
    for (const c of open) assert.equal((await nextMessage(c, 1000))?.kind, 'results');
    assertRefused(await openSse(server, livePath(poll.poll_id)), '4th (SSE)');
    assertRefused(await openWs(server, wsPath(poll.poll_id)), '4th (WS, refused before the upgrade)');
    const other = await createPoll(server, ownerTok);
    assertRefused(await openSse(server, livePath(other.poll_id)), '4th on another poll (the limit is per address)');
    // the refused ones did not take slots: the three still get updates
    await voteNew(server, poll, 0);
    for (const c of open) assert.equal((await nextMessage(c, 1000))?.data?.total_votes, 1);
  } finally { for (const c of open) c.close(); }
});

test('a slot is free again once a subscriber disconnects, ends by protocol error, or its poll closes', async () => {
  await sleep(100);
  const p = await createPoll(server, ownerTok);
  const a = await subscribeEventually('sse', p.poll_id);
  const b = await subscribeEventually('ws', p.poll_id);
  const c = await subscribeEventually('ws', p.poll_id);
  try {
    assertRefused(await openSse(server, livePath(p.poll_id)), 'full');
    a.close();                                                          // client hangs up
    const a2 = await subscribeEventually('sse', p.poll_id);
    b.sendFrame({ opcode: OP.TEXT, payload: 'x', mask: false });        // 1002
    assert.equal((await b.waitClosed(2000)).code, 1002);
    const b2 = await subscribeEventually('ws', p.poll_id);
    assertRefused(await openWs(server, wsPath(p.poll_id)), 'full again');
    await setStatus(server, ownerTok, p, 'closed');                      // all three end
    for (const x of [a2, b2, c]) assert.ok((await x.waitClosed(2000)) !== false);
    const q = await createPoll(server, ownerTok);
    const fresh = [];
    for (let i = 0; i < 3; i++) fresh.push(await subscribeEventually(i % 2 ? 'ws' : 'sse', q.poll_id));
    assertRefused(await openSse(server, livePath(q.poll_id)), 'full with new ones');
    for (const x of fresh) x.close();
  } finally { a.close(); b.close(); c.close(); }
});

test('--live-max 2 (total): the 3rd subscriber gets 503 TOO_MANY_SUBSCRIBERS', async () => {
  const srv = await startServer({ args: ['--live-max', '2', '--live-max-per-ip', '100'] });
  try {
    const owner = srv.mint(`owner-${rand()}`);
    const p = await createPoll(srv, owner);
    const a = await subscribe(srv, 'sse', p.poll_id);
    const b = await subscribe(srv, 'ws', p.poll_id);
    try {
      const c = await openWs(srv, wsPath(p.poll_id));
      assert.equal(c.status, 503, `3rd: ${c.status} ${c.body}`);
      assert.equal(c.json?.error?.code, 'TOO_MANY_SUBSCRIBERS');
      assert.ok(Number(c.headers['retry-after']) > 0, 'Retry-After');
    } finally { a.close(); b.close(); }
  } finally { await srv.close(); }
});

test('/metrics tally_live_subscribers counts open streams and drops when they end', async () => {
  const gauge = async () => {
    const m = await api(server, 'GET', '/metrics');
    const line = m.text.split('\n').find((l) => l.startsWith('tally_live_subscribers '));
    assert.ok(line, 'a tally_live_subscribers gauge');
    return Number(line.split(' ')[1]);
  };
  const until = async (n) => {
    const end = Date.now() + 3000;
    let g;
    while ((g = await gauge()) !== n && Date.now() < end) await sleep(50);
    return g;
  };
  assert.equal(await until(0), 0, 'no subscribers left from earlier tests');
  const p = await createPoll(server, ownerTok);
  const a = await subscribeEventually('sse', p.poll_id);
  const b = await subscribeEventually('ws', p.poll_id);
  try {
    assert.equal(await until(2), 2);
    a.close();
    assert.equal(await until(1), 1, 'a hang-up is noticed');
    b.sendClose(1000);
    assert.equal(await until(0), 0, 'a WS close is noticed');
  } finally { a.close(); b.close(); }
});
