// A damaged data directory (issue 15, item 9): tally must not start from a store it
// cannot load whole. A ballot row that names an option its poll does not have used to be
// skipped with a WARN (the total dropped, and its voter got has_voted:false but 409 with
// no vote_id); a damaged index page let the server start with /readyz 200 and then fail
// every write. Now:
//  - a bad row refuses the start (exit status 1) with an error line naming its table,
//    key and reason; with --skip-bad-rows (or TALLY_SKIP_BAD_ROWS) the server starts
//    without it and a warn line names it;
//  - PRAGMA quick_check runs at start: a damaged page refuses the start with its report;
//    with --skip-quick-check the server starts, and the damage then fails the first
//    write (which is why the check is on by default).
// The store is damaged with the sqlite3 command-line tool, as an operator's hand edit or
// a bad disk would, between two runs of the real binary.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  BIN, STORE, startServer, api, assertError, assertStatus, createPoll, castVote, results, freePort, tail,
} from '../api/harness.mjs';

const sq = spawnSync('sqlite3', ['-version'], { encoding: 'utf8' });
const skip = STORE !== 'sqlite' ? 'the data directory holds the store only with SQLite'
  : sq.error ? 'the sqlite3 command-line tool is not installed (make deps-test installs it)' : false;

const servers = [];
after(async () => {
  for (const s of servers.reverse()) await s.close();
});

/** Runs sql on the server's database with the sqlite3 shell; its output, trimmed. */
function sqlite(server, sql) {
  const r = spawnSync('sqlite3', [path.join(server.dataDir, 'tally.db'), sql], { encoding: 'utf8' });
  assert.equal(r.status, 0, `sqlite3 ${sql}: ${r.stderr}`);
  return r.stdout.trim();
}

/** JSON log lines of a run's output. */
function logLines(text) {
  return text.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
}

/**
 * Runs `tally serve` on the server's data directory and waits (20 s at most) for it to
 * exit, as a start that is refused does. Returns { code, signal, lines, text }.
 */
async function refusedStart(server, { args = [], env = {} } = {}) {
  const port = await freePort();
  const child = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', server.dataDir,
    '--secret', server.secret, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  child.stdout.on('data', (d) => { text += d; });
  child.stderr.on('data', (d) => { text += d; });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  let timeout;
  const timer = new Promise((resolve) => { timeout = setTimeout(resolve, 20_000, null); });
  const r = await Promise.race([exited, timer]);
  clearTimeout(timeout);
  if (r === null) {
    child.kill('SIGKILL');
    await exited;
    assert.fail(`tally serve did not exit within 20 s: it started from a damaged store:\n${tail(text)}`);
  }
  // under `make check-asan` a refused start must exit as cleanly as a stop
  assert.doesNotMatch(text, /(AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:)/, text);
  return { ...r, lines: logLines(text), text };
}

/** A poll (three options), three ballots (voter-a and voter-b on its first option, voter-c on its second); stopped. */
async function storeWithBallots(title) {
  const server = await startServer();
  servers.push(server);
  const owner = server.mint('datadir-owner');
  const poll = await createPoll(server, owner, { title });
  const [o0, o1] = poll.options.map((o) => o.option_id);
  for (const [voter, option] of [['voter-a', o0], ['voter-b', o0], ['voter-c', o1]]) {
    assertStatus(await castVote(server, server.mint(voter), poll.poll_id, { option_id: option }), 200, voter);
  }
  const stopped = await server.stop();
  assert.equal(stopped.code, 0);
  return { server, poll };
}

test('a ballot row naming an option its poll does not have refuses the start; --skip-bad-rows starts without it',
  { skip }, async () => {
    const { server, poll } = await storeWithBallots('out of range');
    sqlite(server, "UPDATE ballots SET choices = x'07' WHERE voter_id = 'voter-b'");
    const seq = sqlite(server, "SELECT seq FROM ballots WHERE voter_id = 'voter-b'");
    const key = `seq=${seq} poll_id=${poll.poll_id} voter_id=voter-b`;

    const run = await refusedStart(server);
    assert.equal(run.code, 1, `exit status of a refused start:\n${tail(run.text)}`);
    const bad = run.lines.filter((l) => l.msg === 'store: bad row');
    assert.deepEqual(bad.map((l) => [l.level, l.table, l.key, l.reason]),
      [['error', 'ballots', key, `choice position 7 is outside the poll's ${poll.options.length} options`]], run.text);
    const cannot = run.lines.find((l) => l.msg === 'cannot start');
    assert.equal(cannot?.level, 'error', run.text);
    assert.match(cannot.reason, /rows that do not load.*--skip-bad-rows/, run.text);

    const again = await startServer({ dataDir: server.dataDir, secret: server.secret, args: ['--skip-bad-rows'] });
    servers.push(again);
    const startLog = again.logs(); // the start's lines, before any request's
    const left = logLines(startLog).filter((l) => l.msg === 'store: bad row left out');
    assert.deepEqual(left.map((l) => [l.level, l.table, l.key]), [['warn', 'ballots', key]], startLog);
    const loaded = logLines(startLog).find((l) => l.msg === 'store loaded');
    assert.equal(loaded.bad_rows_left_out, '1');
    assert.equal(loaded.level, 'warn');
    const r = await results(again, poll.poll_id);
    assertStatus(r, 200, 'results');
    assert.equal(r.json.total_votes, 2, 'the row left out is not counted');
    assert.equal(sqlite(server, "SELECT count(*) FROM ballots WHERE voter_id = 'voter-b'"), '1',
      'a row left out stays in the store');
  });

test('a second ballot of one voter in a poll refuses the start; TALLY_SKIP_BAD_ROWS=true starts without it',
  { skip }, async () => {
    const { server, poll } = await storeWithBallots('duplicate voter');
    // The unique key tells a blob from text; tally reads both as the voter id "voter-a".
    sqlite(server, 'INSERT INTO ballots(poll_id, voter_id, vote_id, receipt, choices, recorded_at)' +
      ` VALUES('${poll.poll_id}', CAST('voter-a' AS BLOB), 'v_dup', 'r_dup', x'01', 1)`);
    const seq = sqlite(server, "SELECT seq FROM ballots WHERE vote_id = 'v_dup'");
    const key = `seq=${seq} poll_id=${poll.poll_id} voter_id=voter-a`;

    const run = await refusedStart(server);
    assert.equal(run.code, 1, run.text);
    const bad = run.lines.filter((l) => l.msg === 'store: bad row');
    assert.deepEqual(bad.map((l) => [l.level, l.table, l.key, l.reason]),
      [['error', 'ballots', key, 'the voter already has a ballot in this poll']], run.text);

    const again = await startServer({ dataDir: server.dataDir, secret: server.secret,
      env: { TALLY_SKIP_BAD_ROWS: 'true' } });
    servers.push(again);
    const startLog = again.logs();
    const left = logLines(startLog).filter((l) => l.msg === 'store: bad row left out');
    assert.deepEqual(left.map((l) => [l.table, l.key]), [['ballots', key]], startLog);
    const r = await results(again, poll.poll_id);
    assert.equal(r.json.total_votes, 3, 'the first ballot of voter-a counts, once');
    const me = await api(again, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: again.mint('voter-a') });
    assertStatus(me, 200, 'votes/me');
    assert.deepEqual(me.json.option_ids, [poll.options[0].option_id], 'voter-a\'s ballot is the first one');
  });

test('a damaged index page refuses the start with quick_check\'s report; --skip-quick-check starts and the ' +
  'first write fails', { skip }, async () => {
  const { server, poll } = await storeWithBallots('damaged index');
  sqlite(server, 'PRAGMA wal_checkpoint(TRUNCATE)'); // every page in the main file
  // The index of (poll_id, seq), which every ballot insert goes through (load reads the
  // table in seq order, not this index).
  assert.equal(sqlite(server, "SELECT group_concat(name) FROM pragma_index_info('ballots_poll_seq')"),
    'poll_id,seq');
  const root = Number(sqlite(server, "SELECT rootpage FROM sqlite_master WHERE name = 'ballots_poll_seq'"));
  const pageSize = Number(sqlite(server, 'PRAGMA page_size'));
  assert.ok(root > 1 && pageSize >= 512, `root page ${root}, page size ${pageSize}`);
  assert.ok(!fs.existsSync(path.join(server.dataDir, 'tally.db-wal')) ||
    fs.statSync(path.join(server.dataDir, 'tally.db-wal')).size === 0, 'no page left in the WAL');
  // The b-tree page header (type, first free block, cell count, content start) becomes garbage.
  const fd = fs.openSync(path.join(server.dataDir, 'tally.db'), 'r+');
  fs.writeSync(fd, Buffer.alloc(12, 0xee), 0, 12, (root - 1) * pageSize);
  fs.closeSync(fd);

  const run = await refusedStart(server);
  assert.equal(run.code, 1, run.text);
  const qc = run.lines.filter((l) => l.msg === 'store: PRAGMA quick_check found the database file damaged');
  assert.equal(qc.length, 1, run.text);
  assert.equal(qc[0].level, 'error');
  assert.match(qc[0].report, new RegExp(`Page ${root}\\b`), `the report names the damaged page: ${qc[0].report}`);
  assert.match(run.lines.find((l) => l.msg === 'cannot start')?.reason ?? '', /quick_check/, run.text);

  // Without the check the load itself goes through (it reads the tables, not this index)...
  const unchecked = await startServer({ dataDir: server.dataDir, secret: server.secret,
    args: ['--skip-quick-check'] });
  servers.push(unchecked);
  assert.equal(logLines(unchecked.logs()).some((l) => /quick_check/.test(l.msg)), false, 'no check ran');
  assertStatus(await api(unchecked, 'GET', '/readyz'), 200, 'ready, as far as it knows');
  assert.equal((await results(unchecked, poll.poll_id)).json.total_votes, 3);
  // ...and the first write through the index fails, after which the store takes none.
  const vote = await castVote(unchecked, unchecked.mint('voter-d'), poll.poll_id,
    { option_id: poll.options[1].option_id });
  assertError(vote, 503, 'UNAVAILABLE');
  assertStatus(await api(unchecked, 'GET', '/readyz'), 503, 'not ready once a write failed');
});
