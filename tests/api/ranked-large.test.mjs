// A big ranked poll (issue 15, item 4): 100 options and 30,000 full rankings. Counting its
// instant-runoff rounds walks 3,000,000 ranked choices, about 10 ms of CPU, and the
// server no longer does that on the loop that answers everyone else (before, a render
// took over 100 ms there, the Condorcet count included, at every change read). Checked
// here, through the real server:
//   - the results equal a plain count written in this file (every round's counts and
//     eliminations, the winner, the Condorcet winner, the first preferences), after the
//     30,000 ballots and again after votes, changes and retractions;
//   - a read made after a vote's (change's, retraction's) answer shows it, every time;
//   - a live subscriber ends up with the same results, its event ids never going back;
//   - those reads were served by counts run on a worker thread (/metrics:
//     tally_ranked_counts_total), not on the loop;
//   - /healthz, probed every 20 ms from other connections while the poll is voted on and
//     read in a loop, answers every probe with 200 within 1 s (a functional deadline: the
//     latency itself is measured by bench/ranked.mjs, see docs/PERFORMANCE.md).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { startServer, api, request, assertStatus, rand } from './harness.mjs';
import { openSse } from '../live/client.mjs';

const OPTIONS = 100;
const BALLOTS = 30_000;
const LOOP = 45;

/** xorshift32: the same ballots on every run. */
function rng(seed) {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x % n;
  };
}

function fullRanking(rnd) {
  const a = Uint8Array.from({ length: OPTIONS }, (_, i) => i);
  for (let i = OPTIONS - 1; i > 0; i--) {
    const j = rnd(i + 1);
    const t = a[i]; a[i] = a[j]; a[j] = t;
  }
  return a;
}

/**
 * The ranked results of `ballots` (rankings as option indexes), counted the plain way:
 * each round counts every ballot for its first option still in the race; the round where
 * one option holds more than half the continuing ballots (or is the last one) is the last;
 * otherwise the round eliminates every option without votes when there are any, else the
 * one with the fewest votes, then the fewest first preferences, then the one listed last.
 * The Condorcet winner beats every other option head to head (a ranked option beats an
 * unranked one).
 */
function plainCount(ballots, ids) {
  const n = ids.length;
  const live = ballots.filter((b) => b.length > 0);
  const out = new Array(n).fill(false);
  const pos = new Int32Array(live.length);
  const rounds = [];
  let first = null;
  let winner = null;
  let remaining = n;
  while (live.length > 0) {
    const count = new Array(n).fill(0);
    let continuing = 0;
    for (let k = 0; k < live.length; k++) {
      const b = live[k];
      let p = pos[k];
      while (p < b.length && out[b[p]]) p++;
      pos[k] = p;
      if (p < b.length) { count[b[p]]++; continuing++; }
    }
    if (first === null) first = count.slice();
    const counts = {};
    let top = -1;
    let zeros = false;
    for (let i = 0; i < n; i++) {
      if (out[i]) continue;
      counts[ids[i]] = count[i];
      if (top < 0 || count[i] > count[top]) top = i;
      if (count[i] === 0) zeros = true;
    }
    const round = { counts, eliminated: [] };
    rounds.push(round);
    if (2 * count[top] > continuing || remaining === 1) { winner = ids[top]; break; }
    let loser = -1;
    for (let i = 0; i < n && !zeros; i++) {
      if (out[i]) continue;
      if (loser < 0 || count[i] < count[loser] ||
        (count[i] === count[loser] && (first[i] < first[loser] || (first[i] === first[loser] && i > loser)))) loser = i;
    }
    for (let i = 0; i < n; i++) {
      if (!out[i] && (zeros ? count[i] === 0 : i === loser)) {
        round.eliminated.push(ids[i]);
        out[i] = true;
        remaining--;
      }
    }
  }
  // head to head: a over x on every ballot ranking a before x, or a and not x
  const before = new Uint32Array(n * n);
  const listed = new Uint32Array(n);
  for (const b of live) {
    for (let i = 0; i < b.length; i++) {
      listed[b[i]]++;
      const row = b[i] * n;
      for (let j = i + 1; j < b.length; j++) before[row + b[j]]++;
    }
  }
  let condorcet = null;
  for (let a = 0; a < n && live.length > 0 && condorcet === null; a++) {
    let beatsAll = true;
    for (let x = 0; x < n && beatsAll; x++) {
      if (x === a) continue;
      const ax = before[a * n + x] + (listed[a] - before[a * n + x] - before[x * n + a]);
      const xa = before[x * n + a] + (listed[x] - before[a * n + x] - before[x * n + a]);
      beatsAll = ax > xa;
    }
    if (beatsAll) condorcet = ids[a];
  }
  const votes = new Array(n).fill(0);
  for (const b of live) votes[b[0]]++;
  return { total_votes: ballots.length, votes, rounds, winner, condorcet_winner: condorcet };
}

/**
 * POSTs every request of `reqs` ({path, token, body: JSON text}) over `conns` keep-alive
 * connections with up to `depth` requests written ahead on each (HTTP/1.1 pipelining: the
 * server answers them in order), and resolves with each one's {status, text}, in the
 * order of `reqs`. node:http costs several times more CPU a request, which on two cores
 * shared with the server made the client the slowest part of this test.
 */
function postAll(server, reqs, { conns = 32, depth = 4 } = {}) {
  return new Promise((resolve, reject) => {
    const out = new Array(reqs.length);
    let next = 0;
    let done = 0;
    const open = () => {
      const sock = net.connect({ host: '127.0.0.1', port: server.port });
      sock.setNoDelay(true);
      const inflight = [];
      let buf = Buffer.alloc(0);
      const fill = () => {
        while (inflight.length < depth && next < reqs.length) {
          const k = next++;
          const r = reqs[k];
          sock.write(`POST ${r.path} HTTP/1.1\r\nHost: 127.0.0.1:${server.port}\r\nAuthorization: Bearer ${r.token}\r\n` +
            `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(r.body)}\r\n\r\n${r.body}`);
          inflight.push(k);
        }
        if (inflight.length === 0) sock.end();
      };
      sock.on('connect', fill);
      sock.on('data', (d) => {
        buf = buf.length > 0 ? Buffer.concat([buf, d]) : d;
        for (;;) {
          const headEnd = buf.indexOf('\r\n\r\n');
          if (headEnd < 0) break;
          const head = buf.subarray(0, headEnd).toString('latin1');
          const length = /\r\ncontent-length: *(\d+)/i.exec(head);
          const n = length ? Number(length[1]) : 0;
          if (buf.length < headEnd + 4 + n) break;
          out[inflight.shift()] = { status: Number(head.slice(9, 12)), text: buf.toString('utf8', headEnd + 4, headEnd + 4 + n) };
          buf = buf.subarray(headEnd + 4 + n);
          done++;
        }
        if (done === reqs.length) resolve(out);
        else fill();
      });
      sock.on('error', (e) => reject(new Error(`casting: ${e.message}`)));
      sock.on('close', () => {
        if (inflight.length > 0) reject(new Error(`casting: the server closed a connection with ${inflight.length} requests unanswered`));
      });
    };
    for (let i = 0; i < conns; i++) open();
  });
}

const rankingBody = (ranking, ids) => `{"ranking":["${Array.from(ranking, (i) => ids[i]).join('","')}"]}`;

function assertResults(got, want, what) {
  assert.equal(got.total_votes, want.total_votes, `${what}: total_votes`);
  assert.deepEqual(got.options.map((o) => o.votes), want.votes, `${what}: first preferences`);
  assert.equal(got.rounds.length, want.rounds.length, `${what}: number of rounds`);
  for (let r = 0; r < want.rounds.length; r++) {
    assert.deepEqual(got.rounds[r], want.rounds[r], `${what}: round ${r + 1}`);
  }
  assert.equal(got.winner, want.winner, `${what}: winner`);
  assert.equal(got.condorcet_winner, want.condorcet_winner, `${what}: condorcet_winner`);
}

test(`a ranked poll of ${OPTIONS} options with ${BALLOTS} full rankings: exact results, every read shows the ` +
  'ballots acknowledged before it, and /healthz keeps answering', async () => {
  const server = await startServer();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
  const probeAgent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  let sse = null;
  try {
    const owner = server.mint(`owner-${rand()}`);
    const created = await api(server, 'POST', '/v1/polls', {
      token: owner,
      body: {
        title: 'Big ranked poll', type: 'ranked', settings: { allow_vote_change: true },
        options: Array.from({ length: OPTIONS }, (_, i) => ({ text: `option ${i}` })),
      },
    });
    assertStatus(created, 201, 'creating the poll');
    const pollId = created.json.poll_id;
    const ids = created.json.options.map((o) => o.option_id);
    const votesPath = `/v1/polls/${pollId}/votes`;
    const readResults = async (what) => {
      const r = await request(server, 'GET', `/v1/polls/${pollId}/results`, { agent });
      assertStatus(r, 200, what);
      return r.json;
    };

    // ---- 30,000 full rankings over 32 keep-alive connections ----
    const rnd = rng(0x15_04);
    const ballots = new Map(); // voter -> ranking (option indexes)
    for (let k = 0; k < BALLOTS; k++) ballots.set(`voter-${k}`, fullRanking(rnd));
    const cast = await postAll(server, [...ballots].map(([voter, ranking]) =>
      ({ path: votesPath, token: server.mint(voter), body: rankingBody(ranking, ids) })));
    const refused = cast.filter((r) => r.status !== 200);
    assert.deepEqual(refused.slice(0, 3), [], `every ballot recorded (${refused.length} not)`);
    assertResults(await readResults('results'), plainCount([...ballots.values()], ids), `${BALLOTS} ballots`);

    // ---- voted on and read in a loop, while /healthz is probed and a subscriber watches ----
    sse = await openSse(server, `/v1/polls/${pollId}/live`);
    assert.equal(sse.status, 200, 'the live stream');
    const probes = [];
    const prober = setInterval(() => {
      const t0 = performance.now();
      probes.push(request(server, 'GET', '/healthz', { agent: probeAgent, timeout: 10_000 })
        .then((r) => ({ status: r.status, ms: performance.now() - t0 }),
          (e) => ({ status: 0, ms: performance.now() - t0, error: e.message })));
    }, 20);
    const firsts = new Array(OPTIONS).fill(0);
    for (const b of ballots.values()) firsts[b[0]]++;
    const voters = [...ballots.keys()];
    for (let i = 0; i < LOOP; i++) {
      let what;
      if (i % 5 === 4) { // a change
        const voter = voters[rnd(voters.length)];
        const ranking = fullRanking(rnd);
        const r = await request(server, 'PUT', `${votesPath}/me`,
          { token: server.mint(voter), body: { ranking: Array.from(ranking, (k) => ids[k]) }, agent });
        assertStatus(r, 200, `the change of ${voter}`);
        firsts[ballots.get(voter)[0]]--;
        firsts[ranking[0]]++;
        ballots.set(voter, ranking);
        what = `a read after ${voter}'s change`;
      } else if (i % 5 === 2) { // a retraction
        const voter = voters.splice(rnd(voters.length), 1)[0];
        const r = await request(server, 'DELETE', `${votesPath}/me`, { token: server.mint(voter), agent });
        assertStatus(r, 204, `the retraction of ${voter}`);
        firsts[ballots.get(voter)[0]]--;
        ballots.delete(voter);
        what = `a read after ${voter}'s retraction`;
      } else { // a new voter
        const voter = `loop-${i}`;
        const ranking = fullRanking(rnd);
        const r = await request(server, 'POST', votesPath,
          { token: server.mint(voter), body: { ranking: Array.from(ranking, (k) => ids[k]) }, agent });
        assertStatus(r, 200, `the vote of ${voter}`);
        firsts[ranking[0]]++;
        ballots.set(voter, ranking);
        voters.push(voter);
        what = `a read after ${voter}'s vote`;
      }
      const got = await readResults(what);
      assert.equal(got.total_votes, ballots.size, `${what}: total_votes`);
      assert.deepEqual(got.options.map((o) => o.votes), firsts, `${what}: first preferences`);
      assert.equal(got.rounds[0].counts[ids[0]], firsts[0], `${what}: round 1 counts the first preferences`);
    }
    clearInterval(prober);
    const answered = await Promise.all(probes);
    const slow = answered.filter((p) => p.status !== 200 || p.ms >= 1000);
    assert.ok(answered.length > 0, 'the prober ran');
    assert.deepEqual(slow, [], `every /healthz probe answered 200 within 1 s (${answered.length} probes, the slowest ` +
      `${Math.max(...answered.map((p) => p.ms)).toFixed(1)} ms)`);

    // each of those reads needed a newer rendering than the last: each came from a count
    // on a worker (the metric is counted on the loop when a count is installed)
    const metrics = await request(server, 'GET', '/metrics', { agent });
    assertStatus(metrics, 200, '/metrics');
    const installed = /^tally_ranked_counts_total\{outcome="installed"\} (\d+)$/m.exec(metrics.text);
    assert.ok(installed && Number(installed[1]) >= LOOP,
      `at least ${LOOP} counts of the poll ran on a worker and were served: ${installed?.[0] ?? 'none'}`);
    assert.doesNotMatch(metrics.text, /^tally_ranked_counts_total\{outcome="failed"\}/m, 'no count failed');

    const want = plainCount([...ballots.values()], ids);
    assertResults(await readResults('the final read'), want, 'after the loop');
    const last = await sse.waitFor((e) => e.event === 'results' && e.json?.total_votes === want.total_votes &&
      e.json.rounds.length === want.rounds.length &&
      e.json.options.every((o, k) => o.votes === want.votes[k]), 10_000, 'the live stream catching up');
    assertResults(last.json, want, 'the live stream');
    const seen = sse.events.filter((e) => e.event === 'results').map((e) => Number(e.id));
    for (let k = 1; k < seen.length; k++) {
      assert.ok(seen[k] > seen[k - 1], `live event ids grow: ${seen[k - 1]} then ${seen[k]}`);
    }
  } finally {
    sse?.close();
    agent.destroy();
    probeAgent.destroy();
    await server.close();
  }
});
