// Live streams obey results_visibility for their caller, and accept the token as
// ?access_token= (EventSource cannot send headers).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand, signJwt, api } from '../api/harness.mjs';
import { nextMessage } from './client.mjs';
import {
  subscribe, voteNew, voteAs, setStatus, collectFor, assertCounts, assertHidden, livePath, wsPath,
} from './util.mjs';
import { openSse, openWs } from './client.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const vis = (results_visibility, more = {}) => ({ settings: { results_visibility, ...more } });

for (const kind of ['sse', 'ws']) {
  test(`${kind}: after_vote: a voter watching sees no counts, votes, then sees the counts`, async () => {
    const poll = await createPoll(server, ownerTok, vis('after_vote'));
    await voteNew(server, poll, 0);
    const voter = server.mint(`watcher-${rand()}`);
    const c = await subscribe(server, kind, poll.poll_id, { token: voter });
    try {
      const first = await nextMessage(c, 1000);
      assert.equal(first?.kind, 'results');
      assertHidden(first.data, poll, 'after_vote', 'before voting');
      assert.equal(first.data.status, 'active');

      await voteNew(server, poll, 1); // someone else votes: still nothing to see
      for (const m of await collectFor(c, 600)) {
        if (m.kind === 'results') assertHidden(m.data, poll, 'after_vote', 'after another voter voted');
      }

      const { ackAt } = await voteAs(server, poll, voter, 2);
      const m = await nextMessage(c, 1000);
      assert.ok(m, 'a message within 1 s of voting');
      assertCounts(m.data, poll, 'after voting');
      assert.equal(m.data.total_votes, 3);
      assert.deepEqual(m.data.options.map((o) => o.votes), [1, 1, 1]);
      assert.ok(m.t - ackAt < 1000);
    } finally { c.close(); }
  });
}

test('after_vote: an anonymous watcher stays hidden; the owner sees counts', async () => {
  const poll = await createPoll(server, ownerTok, vis('after_vote'));
  const anon = await subscribe(server, 'sse', poll.poll_id);
  const owner = await subscribe(server, 'ws', poll.poll_id, { token: ownerTok });
  try {
    assertHidden((await nextMessage(anon, 1000)).data, poll, 'after_vote', 'anonymous');
    assertCounts((await nextMessage(owner, 1000)).data, poll, 'owner');
    await voteNew(server, poll, 0);
    const o = await nextMessage(owner, 1000);
    assert.equal(o?.data?.total_votes, 1, 'the owner sees the vote');
    for (const m of await collectFor(anon, 600)) assertHidden(m.data, poll, 'after_vote', 'anonymous after a vote');
  } finally { anon.close(); owner.close(); }
});

test('owner_only: a non-owner who voted stays hidden; the owner sees counts', async () => {
  const poll = await createPoll(server, ownerTok, vis('owner_only'));
  const voter = server.mint(`v-${rand()}`);
  const s = await subscribe(server, 'sse', poll.poll_id, { token: voter });
  const w = await subscribe(server, 'ws', poll.poll_id, { token: voter });
  const own = await subscribe(server, 'sse', poll.poll_id, { token: ownerTok });
  try {
    assertHidden((await nextMessage(s, 1000)).data, poll, 'owner_only', 'non-owner (SSE)');
    assertHidden((await nextMessage(w, 1000)).data, poll, 'owner_only', 'non-owner (WS)');
    assertCounts((await nextMessage(own, 1000)).data, poll, 'owner');
    await voteAs(server, poll, voter, 1);
    const ownUpd = await nextMessage(own, 1000);
    assert.equal(ownUpd?.data?.total_votes, 1, 'the owner sees the vote within 1 s');
    for (const c of [s, w]) {
      for (const m of await collectFor(c, 700)) {
        assert.equal(m.kind, 'results');
        assertHidden(m.data, poll, 'owner_only', 'non-owner after voting');
      }
    }
  } finally { s.close(); w.close(); own.close(); }
});

for (const kind of ['sse', 'ws']) {
  test(`${kind}: after_close: hidden while active; the final message on close has the counts`, async () => {
    const poll = await createPoll(server, ownerTok, vis('after_close'));
    const voter = server.mint(`v-${rand()}`);
    const c = await subscribe(server, kind, poll.poll_id, { token: voter });
    try {
      assertHidden((await nextMessage(c, 1000)).data, poll, 'after_close', 'while active');
      await voteAs(server, poll, voter, 0);
      for (const m of await collectFor(c, 600)) assertHidden(m.data, poll, 'after_close', 'after voting');
      await setStatus(server, ownerTok, poll, 'closed');
      const fin = await nextMessage(c, 1000);
      assert.equal(fin?.kind, 'results');
      assertCounts(fin.data, poll, 'final message');
      assert.equal(fin.data.status, 'closed');
      assert.equal(fin.data.total_votes, 1);
      // (the end of the stream itself is close.test.mjs's)
    } finally { c.close(); }
  });
}

test('show_results_during_voting: false hides counts from non-owners until the close', async () => {
  const poll = await createPoll(server, ownerTok, vis('always', { show_results_during_voting: false }));
  const c = await subscribe(server, 'sse', poll.poll_id);
  try {
    const first = await nextMessage(c, 1000);
    assertHidden(first.data, poll, undefined, 'during voting');
    await voteNew(server, poll, 0);
    for (const m of await collectFor(c, 600)) assertHidden(m.data, poll, undefined, 'after a vote');
  } finally { c.close(); }
});

test('the owner changing results_visibility to always reaches a hidden watcher within 1 s', async () => {
  const poll = await createPoll(server, ownerTok, vis('owner_only'));
  await voteNew(server, poll, 0);
  const c = await subscribe(server, 'sse', poll.poll_id);
  try {
    assertHidden((await nextMessage(c, 1000)).data, poll, 'owner_only', 'before');
    const r = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: ownerTok, body: { settings: { results_visibility: 'always' } } });
    assert.equal(r.status, 200, r.text);
    const m = await nextMessage(c, 1000);
    assert.ok(m, 'a message within 1 s of the change');
    assertCounts(m.data, poll, 'after the change');
    assert.equal(m.data.total_votes, 1);
  } finally { c.close(); }
});

// ---- ?access_token= ----

for (const kind of ['sse', 'ws']) {
  test(`${kind}: ?access_token= identifies the caller like Authorization: Bearer`, async () => {
    const poll = await createPoll(server, ownerTok, vis('after_vote'));
    const voter = server.mint(`v-${rand()}`);
    await voteAs(server, poll, voter, 1);
    const anon = await subscribe(server, kind, poll.poll_id);
    const withTok = await subscribe(server, kind, poll.poll_id, { query: `?access_token=${encodeURIComponent(voter)}` });
    try {
      assertHidden((await nextMessage(anon, 1000)).data, poll, 'after_vote', 'without a token');
      const m = await nextMessage(withTok, 1000);
      assertCounts(m.data, poll, 'with ?access_token= of a voter who voted');
      assert.equal(m.data.total_votes, 1);
    } finally { anon.close(); withTok.close(); }
  });

  test(`${kind}: a bad, expired or wrongly signed access_token → 401 UNAUTHENTICATED`, async () => {
    const poll = await createPoll(server, ownerTok);
    const now = Math.floor(Date.now() / 1000);
    const cases = {
      garbage: 'abc',
      expired: signJwt({ alg: 'HS256', typ: 'JWT' }, { sub: 'x', iat: now - 7200, exp: now - 3600 }, server.secret),
      'other secret': signJwt({ alg: 'HS256', typ: 'JWT' }, { sub: 'x', iat: now, exp: now + 3600 }, 'not-the-secret'),
      'alg none': `${Buffer.from('{"alg":"none","typ":"JWT"}').toString('base64url')}.${Buffer.from(JSON.stringify({ sub: 'x', exp: now + 3600 })).toString('base64url')}.`,
    };
    for (const [name, tok] of Object.entries(cases)) {
      const q = `?access_token=${encodeURIComponent(tok)}`;
      const c = kind === 'ws' ? await openWs(server, wsPath(poll.poll_id, q)) : await openSse(server, livePath(poll.poll_id, q));
      assert.equal(c.status, 401, `${name}: expected 401, got ${c.status} ${c.body}`);
      assert.equal(c.json?.error?.code, 'UNAUTHENTICATED', `${name}: ${c.body}`);
      c.close();
    }
    // a bad bearer token is refused the same way
    const c = kind === 'ws'
      ? await openWs(server, wsPath(poll.poll_id), { token: 'abc' })
      : await openSse(server, livePath(poll.poll_id), { token: 'abc' });
    assert.equal(c.status, 401);
    c.close();
  });
}

test('a draft poll: 404 for others, the owner may watch it', async () => {
  const poll = await createPoll(server, ownerTok, { status: 'draft' });
  const anon = await openSse(server, livePath(poll.poll_id));
  assert.equal(anon.status, 404, `a draft is not visible to others: ${anon.status} ${anon.body}`);
  const own = await subscribe(server, 'sse', poll.poll_id, { query: `?access_token=${ownerTok}` });
  try {
    assert.equal((await nextMessage(own, 1000))?.data?.status, 'draft');
    await setStatus(server, ownerTok, poll, 'active');
    assert.equal((await nextMessage(own, 1000))?.data?.status, 'active', 'activation reaches the owner within 1 s');
  } finally { own.close(); }
});
