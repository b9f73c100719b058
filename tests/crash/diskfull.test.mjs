// A full disk, for real (issue 7, item 7): tally's data directory is a 3 MiB tmpfs. With
// the disk filled to the brim by a filler file, every write is answered 507
// INSUFFICIENT_STORAGE (or 503) with Retry-After and never 200, and nothing acknowledged
// before is lost. Once the filler is deleted, votes succeed again without a restart; after
// a restart every acknowledged vote is counted and the database passes
// PRAGMA integrity_check.
//
// Needs root (mount -t tmpfs); skipped with the reason otherwise.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startServer, api, assertError, assertStatus, createPoll, castVote, results, describe,
} from '../api/harness.mjs';

let dir = null; // the mount point
let mounted = false;
let skip = null; // why the test cannot run here
let server = null;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-diskfull-'));
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=3m,mode=0700', 'tmpfs', dir], { encoding: 'utf8' });
  if (m.error || m.status !== 0) {
    skip = `cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): ${m.error?.message || m.stderr.trim()}`;
    return;
  }
  mounted = true;
  const sq = spawnSync('sqlite3', ['-version'], { encoding: 'utf8' });
  if (sq.error) skip = 'the sqlite3 command-line tool is not installed (make deps-test installs it)';
});

after(async () => {
  try {
    await server?.close();
  } finally {
    if (mounted) {
      const u = spawnSync('umount', [dir], { encoding: 'utf8' });
      if (u.status !== 0) spawnSync('umount', ['-l', dir]);
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** Writes the filler with dd until the file system has no block left (dd stops at ENOSPC). */
function fill(file) {
  const r = spawnSync('dd', ['if=/dev/zero', `of=${file}`, 'bs=64k'], { encoding: 'utf8' });
  assert.match(r.stderr, /No space left on device/, `dd should stop at ENOSPC: ${r.stderr}`);
  const st = fs.statfsSync(dir);
  assert.equal(st.bavail, 0, `the tmpfs is full (${st.bavail} blocks free)`);
}

function assertRefused(res, what) {
  assert.notEqual(res.status, 200, `${what}: never 200 on a full disk: ${describe(res)}`);
  assert.ok(res.status === 507 || res.status === 503, `${what}: 507 or 503 on a full disk: ${describe(res)}`);
  assertError(res, res.status, res.status === 507 ? 'INSUFFICIENT_STORAGE' : 'UNAVAILABLE');
  assert.ok(res.headers.get('retry-after'), `${what}: Retry-After: ${describe(res)}`);
  return res.status;
}

async function voteMe(srv, poll, token) {
  const res = await api(srv, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token });
  assertStatus(res, 200, 'votes/me');
  return res.json;
}

test('a full disk: 507 with Retry-After, nothing acknowledged lost, recovery when space returns, intact after restart',
  { timeout: 120_000 }, async (t) => {
    if (skip) {
      t.skip(skip);
      return;
    }
    server = await startServer({ dataDir: dir });
    const owner = server.mint('diskfull-owner');
    const poll = await createPoll(server, owner, { title: 'disk full' });
    const opts = poll.options.map((o) => o.option_id);
    const acked = []; // {tok, option, vote}
    const vote = async (name, i) => {
      const tok = server.mint(name);
      const option = opts[i % opts.length];
      const res = await castVote(server, tok, poll.poll_id, { option_id: option });
      if (res.status === 200) acked.push({ tok, option, vote: res.json });
      return { tok, option, res };
    };
    for (let i = 0; i < 20; i++) assertStatus((await vote(`before-${i}`, i)).res, 200, 'a vote before the disk fills');

    const filler = path.join(dir, 'filler');
    fill(filler);

    // Sequential votes first (one batch each), then concurrent ones (batches of several).
    const refused = [];
    const statuses = new Set();
    for (let i = 0; i < 10; i++) {
      const v = await vote(`full-${i}`, i);
      statuses.add(assertRefused(v.res, `vote ${i} on a full disk`));
      refused.push(v);
    }
    const burst = await Promise.all(Array.from({ length: 30 }, (_, i) => vote(`full-burst-${i}`, i)));
    for (const v of burst) {
      statuses.add(assertRefused(v.res, 'a concurrent vote on a full disk'));
      refused.push(v);
    }
    assert.ok(statuses.has(507), `a full disk is reported as 507 INSUFFICIENT_STORAGE (got ${[...statuses]})`);
    assertRefused(await api(server, 'POST', '/v1/polls', {
      token: owner, body: { title: 'no room', options: [{ text: 'x' }, { text: 'y' }] },
    }), 'creating a poll on a full disk');
    assertRefused(await api(server, 'POST', '/v1/auth/register', {
      body: { username: `full_${process.pid}`, password: 'a-long-password' },
    }), 'registering on a full disk');
    // A change of a poll the store refused does not stay in memory either: the poll is
    // what the store still has (and what a restart would show).
    assertRefused(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, {
      token: owner, body: { title: 'renamed on a full disk', status: 'closed' },
    }), 'changing a poll on a full disk');
    const unchanged = await api(server, 'GET', `/v1/polls/${poll.poll_id}`);
    assertStatus(unchanged, 200, 'the poll after a refused change');
    assert.equal(unchanged.json.title, 'disk full', 'the refused title is not shown');
    assert.equal(unchanged.json.status, 'active', 'the refused close is not in effect');
    assertRefused(await castVote(server, server.mint('after-refused-close'), poll.poll_id, { option_id: opts[0] }),
      'a ballot in the poll whose close was refused (refused for the disk, not as closed)');

    // Nothing acknowledged is lost, nothing refused is counted, reads go on.
    let r = await results(server, poll.poll_id);
    assertStatus(r, 200, 'results on a full disk');
    assert.equal(r.json.total_votes, acked.length, 'results count exactly the acknowledged votes');
    // A full disk is not a failed fsync: the store stays writable and ready.
    assertStatus(await api(server, 'GET', '/readyz'), 200, '/readyz on a full disk (the store recovers by itself)');
    const metrics = await api(server, 'GET', '/metrics');
    assert.match(metrics.text, /^tally_store_writable 1$/m, 'tally_store_writable stays 1 on a full disk');

    // Space returns: the same voters retry and succeed, without a restart.
    fs.rmSync(filler);
    for (const v of refused.slice(0, 10)) {
      const res = await castVote(server, v.tok, poll.poll_id, { option_id: v.option });
      assertStatus(res, 200, 'a refused voter retrying once space is back');
      acked.push({ tok: v.tok, option: v.option, vote: res.json });
    }
    for (let i = 0; i < 10; i++) assertStatus((await vote(`after-${i}`, i)).res, 200, 'a new vote once space is back');
    assertStatus(await api(server, 'POST', '/v1/polls', {
      token: owner, body: { title: 'room again', options: [{ text: 'x' }, { text: 'y' }] },
    }), 201, 'creating a poll once space is back');
    r = await results(server, poll.poll_id);
    assert.equal(r.json.total_votes, acked.length, 'results after recovery');
    const before = r.json.options.map((o) => o.votes);

    // Fill it again and stop while full: a clean stop on a full disk must not lose or
    // corrupt anything either.
    fill(filler);
    assertRefused((await vote('full-again', 0)).res, 'a vote on the disk full again');
    const stopped = await server.stop();
    assert.equal(stopped.code, 0, `exit code of a stop on a full disk: ${JSON.stringify(stopped)}`);
    fs.rmSync(filler);

    await server.restart();
    r = await results(server, poll.poll_id);
    assertStatus(r, 200, 'results after the restart');
    assert.equal(r.json.total_votes, acked.length, 'every acknowledged vote is counted after the restart, no other');
    assert.deepEqual(r.json.options.map((o) => o.votes), before, 'per-option counts unchanged');
    for (const a of acked) {
      const me = await voteMe(server, poll, a.tok);
      assert.equal(me.has_voted, true, 'an acknowledged vote after the restart');
      assert.deepEqual(me.option_ids, [a.option]);
    }
    for (const v of refused.slice(10)) {
      assert.equal((await voteMe(server, poll, v.tok)).has_voted, false, 'a refused vote is not counted');
    }
    await server.stop();

    const ic = spawnSync('sqlite3', [path.join(dir, 'tally.db'), 'PRAGMA integrity_check'], { encoding: 'utf8' });
    assert.equal(ic.status, 0, `sqlite3 failed: ${ic.stderr}`);
    assert.equal(ic.stdout.trim(), 'ok', `PRAGMA integrity_check: ${ic.stdout}`);
    const fk = spawnSync('sqlite3', [path.join(dir, 'tally.db'), 'PRAGMA foreign_key_check'], { encoding: 'utf8' });
    assert.equal(fk.stdout.trim(), '', `PRAGMA foreign_key_check: ${fk.stdout}`);
    // a ballot row is its own "cast" event in the poll's log (migration 6) unless its
    // cast was copied into audit (cast_in_audit)
    const n = spawnSync('sqlite3', [path.join(dir, 'tally.db'),
      `SELECT (SELECT count(*) FROM ballots WHERE poll_id = '${poll.poll_id}'),` +
      ` (SELECT count(*) FROM ballots WHERE poll_id = '${poll.poll_id}' AND cast_in_audit = 0)` +
      ` + (SELECT count(*) FROM audit WHERE poll_id = '${poll.poll_id}' AND event = 'cast')`], { encoding: 'utf8' });
    assert.equal(n.stdout.trim(), `${acked.length}|${acked.length}`, 'one ballot row and one cast event per acknowledged vote');
  });
