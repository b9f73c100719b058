// A live stream whose caller may not see the counts (results_visibility, issue 15 item 3)
// must not leak them another way: its messages carry no count, their ids do not move with
// the ballots, and no message is sent per ballot. It changes only when the poll's status
// or visibility does. Ids stay monotonic for a caller whose visibility flips.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, createPoll, rand, api } from '../api/harness.mjs';
import { nextMessage, waitResults } from './client.mjs';
import { subscribe, voteNew, voteAs, setStatus, assertHidden, assertCounts } from './util.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = server.mint(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const HIDDEN_KEYS = ['options', 'poll_id', 'results_hidden', 'results_visibility', 'status'];

async function patch(poll, body) {
  const r = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: ownerTok, body });
  assert.equal(r.status, 200, `PATCH ${JSON.stringify(body)}: ${r.text}`);
}

/** Casts n ballots one at a time; after each, the owner's stream shows it (a tick passed). */
async function ballotsSeenByOwner(poll, owner, n) {
  let total = null;
  for (let i = 0; i < n; i++) {
    await voteNew(server, poll, i % poll.options.length);
    const m = await waitResults(owner, (d) => d.total_votes !== total && d.total_votes >= i + 1, 2000, `ballot ${i + 1} on the owner's stream`);
    total = m.data.total_votes;
  }
}

for (const kind of ['sse', 'ws']) {
  test(`${kind}: owner_only: ballots move neither the hidden stream's messages nor its id; a visibility change does`, async () => {
    const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'owner_only' } });
    const voter = server.mint(`v-${rand()}`);
    const owner = await subscribe(server, 'sse', poll.poll_id, { token: ownerTok });
    const hid = await subscribe(server, kind, poll.poll_id, { token: voter });
    const anon = await subscribe(server, kind, poll.poll_id);
    const conns = [owner, hid, anon];
    try {
      assertCounts((await nextMessage(owner, 1000)).data, poll, 'owner');
      const first = await nextMessage(hid, 1000);
      assert.equal(first?.kind, 'results');
      assertHidden(first.data, poll, 'owner_only', 'first hidden state');
      assert.deepEqual(Object.keys(first.data).sort(), HIDDEN_KEYS, 'a hidden state has these fields only');
      const a0 = await nextMessage(anon, 1000);
      assert.deepEqual(a0.data, first.data);
      assert.equal(a0.seq, first.seq, 'every hidden caller has the same id for the same state');

      await voteAs(server, poll, voter, 1); // the watcher's own ballot changes nothing for it
      await ballotsSeenByOwner(poll, owner, 5);

      // a new hidden subscriber now: the same id and state as before the six ballots
      const late = await subscribe(server, kind, poll.poll_id, { token: server.mint(`late-${rand()}`) });
      conns.push(late);
      const l0 = await nextMessage(late, 1000);
      assert.equal(l0.seq, first.seq, `six ballots later the hidden id is still ${first.seq}, got ${l0.seq}`);
      assert.deepEqual(l0.data, first.data);
      // and resuming with that id is being up to date
      const resumed = await subscribe(server, 'sse', poll.poll_id, { lastEventId: String(first.seq) });
      conns.push(resumed);

      // a visibility change among hidden ones: one message, then nothing else came before it
      await patch(poll, { settings: { results_visibility: 'after_close' } });
      for (const c of [hid, anon, late, resumed]) {
        const m = await nextMessage(c, 1000);
        assert.equal(m?.kind, 'results', `the visibility change is sent: ${JSON.stringify(m)}`);
        assertHidden(m.data, poll, 'after_close', 'after the change');
        assert.ok(m.seq > first.seq, `a new, larger id: ${first.seq} → ${m.seq}`);
      }
      for (const c of [hid, anon]) {
        const kinds = c.events.filter((e) => (e.event ?? e.json?.type) === 'results').length;
        assert.equal(kinds, 2, `two states in all (the first, the change), none per ballot: ${c.inbox.describe()}`);
      }
      assert.equal(resumed.events.filter((e) => e.event === 'results').length, 1,
        `the resumed client got only the change: ${resumed.inbox.describe()}`);
    } finally { for (const c of conns) c.close(); }
  });
}

test('an edit the hidden state does not show (the title) sends nothing; the close sends the closed state', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'owner_only' } });
  const owner = await subscribe(server, 'sse', poll.poll_id, { token: ownerTok });
  const hid = await subscribe(server, 'ws', poll.poll_id);
  try {
    await nextMessage(owner, 1000);
    const first = await nextMessage(hid, 1000);
    await ballotsSeenByOwner(poll, owner, 2);
    await patch(poll, { title: `renamed ${rand()}` });
    await waitResults(owner, (d) => d.total_votes === 2, 1000, 'the owner after the edit');
    await setStatus(server, ownerTok, poll, 'closed');
    const fin = await nextMessage(hid, 1500);
    assert.equal(fin?.kind, 'results', `the close: ${JSON.stringify(fin)}`);
    assertHidden(fin.data, poll, 'owner_only', 'closed, still hidden from non-owners');
    assert.equal(fin.data.status, 'closed');
    assert.ok(fin.seq > first.seq);
    assert.equal((await nextMessage(hid, 1000))?.kind, 'closed');
    const results = hid.events.filter((e) => e.json?.type === 'results');
    assert.equal(results.length, 2, `the first state and the closed one only: ${hid.inbox.describe()}`);
  } finally { owner.close(); hid.close(); }
});

test('a hidden watcher gets the counts within 1 s of the owner making them visible, ticks after subscribing', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'owner_only' } });
  const owner = await subscribe(server, 'sse', poll.poll_id, { token: ownerTok });
  const hid = await subscribe(server, 'sse', poll.poll_id);
  try {
    await nextMessage(owner, 1000);
    assertHidden((await nextMessage(hid, 1000)).data, poll, 'owner_only', 'before');
    await ballotsSeenByOwner(poll, owner, 1); // at least one tick has passed since subscribing
    await patch(poll, { settings: { results_visibility: 'always' } });
    const m = await nextMessage(hid, 1000);
    assert.ok(m, 'a message within 1 s of the change');
    assertCounts(m.data, poll, 'after the change');
    assert.equal(m.data.total_votes, 1);
  } finally { owner.close(); hid.close(); }
});

for (const kind of ['sse', 'ws']) {
  test(`${kind}: after_vote: ids grow while the caller's visibility flips (vote, others vote, retract)`, async () => {
    const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'after_vote', allow_vote_change: true } });
    const voter = server.mint(`v-${rand()}`);
    const c = await subscribe(server, kind, poll.poll_id, { token: voter });
    try {
      const hidden = await nextMessage(c, 1000);
      assertHidden(hidden.data, poll, 'after_vote', 'before voting');
      await voteAs(server, poll, voter, 0);
      const seen = await waitResults(c, (d) => d.total_votes === 1, 1500, 'the counts after voting');
      assert.ok(seen.seq > hidden.seq, `hidden ${hidden.seq} → visible ${seen.seq}`);
      await voteNew(server, poll, 1);
      const more = await waitResults(c, (d) => d.total_votes === 2, 1500, 'another ballot');
      assert.ok(more.seq > seen.seq, `${seen.seq} → ${more.seq}`);
      const del = await api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: voter });
      assert.equal(del.status, 204, del.text);
      const again = await waitResults(c, (d) => d.results_hidden === true, 1500, 'hidden again after the retraction');
      assertHidden(again.data, poll, 'after_vote', 'after retracting');
      assert.ok(again.seq > more.seq, `ids never go down on one connection: ${more.seq} → ${again.seq}`);
      assert.ok(hidden.seq < seen.seq && seen.seq < more.seq && more.seq < again.seq);
    } finally { c.close(); }
  });
}
