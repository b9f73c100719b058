// A failed fsync (issue 7, item 7): once an fsync of the database or its WAL fails, tally
// acknowledges nothing more. The vote whose batch hit the failure gets 503, never 200;
// every later write gets 503 too, even though later fsyncs would succeed again (as they
// may on Linux once the error was reported); /readyz says 503 and /metrics shows
// tally_store_writable 0. After a restart without the fault every vote acknowledged
// before the failure is counted and none of those refused after it.
//
// The failure is injected with TALLY_FAULT_FSYNC_AFTER=n (a test-only SQLite VFS shim in
// src/store/sqlite_fault.c, installed by main.c at start): the n-th fsync fails with EIO. Each
// vote below is cast alone and awaited, so each is a batch of its own and costs one
// fsync of the WAL; the votes before the failure all succeed, whatever number of fsyncs
// the start itself took, as long as it took fewer than n.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, createPoll, castVote, results, describe,
} from '../api/harness.mjs';

const FSYNC_AFTER = 40;

/** Casts sequential votes (voter prefix) until one is not 200. */
async function voteUntilRefused(server, poll, prefix) {
  const acked = [];
  const opts = poll.options.map((o) => o.option_id);
  for (let i = 0; i < FSYNC_AFTER + 10; i++) {
    const tok = server.mint(`${prefix}-${i}`);
    const res = await castVote(server, tok, poll.poll_id, { option_id: opts[i % opts.length] });
    if (res.status === 200) {
      acked.push({ tok, vote: res.json, option: opts[i % opts.length] });
      continue;
    }
    return { acked, refused: { tok, res } };
  }
  assert.fail(`no vote was refused within ${FSYNC_AFTER + 10} votes: the injected fsync failure never came`);
}

function assertUnavailable(res, what) {
  assertError(res, 503, 'UNAVAILABLE');
  assert.ok(res.headers.get('retry-after'), `${what}: a 503 carries Retry-After: ${describe(res)}`);
}

async function metric(server, name) {
  const res = await api(server, 'GET', '/metrics');
  assertStatus(res, 200, 'GET /metrics');
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(res.text);
  assert.ok(m, `/metrics has no ${name}:\n${res.text.slice(0, 2000)}`);
  return Number(m[1]);
}

async function voteMe(server, poll, token) {
  const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token });
  assertStatus(res, 200, 'votes/me');
  return res.json;
}

/** Everything the test checks after the failure, then the restart; `how` stops the server. */
async function scenario(how) {
  const server = await startServer({ env: { TALLY_FAULT_FSYNC_AFTER: String(FSYNC_AFTER) } });
  try {
    assert.match(server.logs(), /fault injection: a failing fsync/, 'the hook is on');
    const owner = server.mint('fsync-owner');
    const poll = await createPoll(server, owner, { title: `fsync ${how}` });
    assert.equal(await metric(server, 'tally_store_writable'), 1, 'writable before the failure');
    assertStatus(await api(server, 'GET', '/readyz'), 200, 'ready before the failure');

    const { acked, refused } = await voteUntilRefused(server, poll, 'before');
    assert.ok(acked.length >= 5, `only ${acked.length} votes before the failure: the start took more fsyncs ` +
      `than expected; raise FSYNC_AFTER`);
    assertUnavailable(refused.res, 'the vote whose batch failed to fsync');
    assert.match(server.logs(), /fault injection: this fsync fails with EIO/, 'it was the injected fsync');

    // Latched: later fsyncs would succeed, but nothing more is acknowledged.
    const later = [];
    for (let i = 0; i < 5; i++) {
      const tok = server.mint(`after-${i}`);
      const res = await castVote(server, tok, poll.poll_id, { option_id: poll.options[0].option_id });
      assertUnavailable(res, `vote ${i} after the failure`);
      later.push(tok);
    }
    // the refused voter retrying, and a burst of concurrent votes (batches of several)
    assertUnavailable(await castVote(server, refused.tok, poll.poll_id, { option_id: poll.options[0].option_id }),
      'the refused voter retrying');
    const burst = await Promise.all(Array.from({ length: 20 }, (_, i) => {
      const tok = server.mint(`burst-${i}`);
      later.push(tok);
      return castVote(server, tok, poll.poll_id, { option_id: poll.options[1].option_id });
    }));
    for (const res of burst) assertUnavailable(res, 'a concurrent vote after the failure');
    // other writes too
    assertUnavailable(await api(server, 'POST', '/v1/polls', {
      token: owner, body: { title: 'after', options: [{ text: 'x' }, { text: 'y' }] },
    }), 'creating a poll after the failure');
    assertUnavailable(await api(server, 'POST', '/v1/auth/register', {
      body: { username: 'after_failure', password: 'a-long-password' },
    }), 'registering after the failure');

    const ready = await api(server, 'GET', '/readyz');
    assert.equal(ready.status, 503, `/readyz after a failed fsync: ${describe(ready)}`);
    assert.ok(ready.headers.get('retry-after'), '/readyz 503 carries Retry-After');
    assert.equal(await metric(server, 'tally_store_writable'), 0, 'tally_store_writable after the failure');
    assert.ok(await metric(server, 'tally_store_failed_batches_total') >= 1, 'the failed batch is counted');
    // reads still work: what was acknowledged is still served
    const r = await results(server, poll.poll_id);
    assertStatus(r, 200, 'results after the failure');
    assert.equal(r.json.total_votes, acked.length, 'results count exactly the acknowledged votes');

    if (how === 'kill') await server.kill9();
    else {
      const stopped = await server.stop();
      assert.equal(stopped.code, 0, `exit code after SIGTERM with a failed store: ${JSON.stringify(stopped)}`);
    }
    // restart without the fault
    const restarted = await startServer({ dataDir: server.dataDir, secret: server.secret });
    try {
      assertStatus(await api(restarted, 'GET', '/readyz'), 200, 'ready again after a restart');
      for (const a of acked) {
        const me = await voteMe(restarted, poll, a.tok);
        assert.equal(me.has_voted, true, 'an acknowledged vote is counted after the restart');
        assert.deepEqual(me.option_ids, [a.option], 'the acknowledged ballot, unchanged');
        const rc = await api(restarted, 'GET', `/v1/receipts/${encodeURIComponent(a.vote.receipt)}`, { token: a.tok });
        assertStatus(rc, 200, 'the receipt of an acknowledged vote');
        assert.equal(rc.json.counted, true);
      }
      for (const tok of later) {
        assert.equal((await voteMe(restarted, poll, tok)).has_voted, false, 'a vote refused after the failure');
      }
      // The refused vote of the failing batch: its WAL frames were written, only their
      // fsync "failed". A clean stop checkpoints only committed frames and removes the
      // WAL, so it is gone; after kill -9, SQLite's recovery on the next open may find
      // those frames intact and count the vote. Either way it was never acknowledged.
      const inBatch = (await voteMe(restarted, poll, refused.tok)).has_voted ? 1 : 0;
      if (how === 'stop') assert.equal(inBatch, 0, 'after a clean stop the refused vote of the failed batch is gone');
      else {
        process.stderr.write(`[fsync] after kill -9 the vote of the failed batch is ${inBatch ? '' : 'not '}` +
          'counted (allowed: it was answered 503, not acknowledged)\n');
      }
      const after = await results(restarted, poll.poll_id);
      assertStatus(after, 200);
      assert.equal(after.json.total_votes, acked.length + inBatch,
        'every acknowledged vote is counted, and none refused after the failure');
      // writable again: the restart starts afresh
      assertStatus(await castVote(restarted, server.mint('after-restart'), poll.poll_id,
        { option_id: poll.options[0].option_id }), 200, 'a vote after the restart');
    } finally {
      await restarted.close();
    }
  } finally {
    await server.close();
  }
}

test('a failed fsync: 503 for the batch and everything after, /readyz 503, writable 0; clean restart keeps exactly the acknowledged votes',
  { timeout: 60_000 }, () => scenario('stop'));

test('a failed fsync, then kill -9: every acknowledged vote survives, nothing refused after the failure is counted',
  { timeout: 60_000 }, () => scenario('kill'));
