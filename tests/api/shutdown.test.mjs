// Graceful shutdown (issue 7 item 6): SIGTERM under load answers what is in flight,
// acknowledges nothing it did not store, closes live streams with a retry hint, exits 0
// within 10 s; and /metrics is valid Prometheus text (promtool, when installed).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startServer, api, createPoll, request } from './harness.mjs';

test('SIGTERM under load: every acknowledged vote is stored, none counted without an ack', async () => {
  const server = await startServer();
  try {
    const owner = server.mint('shutdown-owner');
    const poll = await createPoll(server, owner, { title: 'shutdown', options: [{ text: 'a' }, { text: 'b' }] });
    const opt = poll.options[0].option_id;
    // a live stream open during shutdown gets a retry hint before it ends
    const sse = new Promise((resolve) => {
      http.get(`${server.url}/v1/polls/${poll.poll_id}/live`, (res) => {
        let text = '';
        res.on('data', (d) => { text += d; });
        res.on('end', () => resolve(text));
        res.on('error', () => resolve(text));
      }).on('error', () => resolve(''));
    });
    await new Promise((r) => setTimeout(r, 300));
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    const N = 1500;
    const outcomes = new Array(N);
    let acks = 0;
    const votes = [];
    for (let i = 0; i < N; i++) {
      votes.push(request(server, 'POST', `/v1/polls/${poll.poll_id}/votes`,
        { token: server.mint(`sd-${i}`), body: { option_id: opt }, agent, timeout: 15_000 })
        .then((r) => { outcomes[i] = r.status; if (r.status === 200) acks++; }, () => { outcomes[i] = 'error'; }));
    }
    // stop in the middle of the load: once some votes are acknowledged (however slow the machine)
    for (const t0 = Date.now(); acks < 20 && Date.now() - t0 < 20_000;) await new Promise((r) => setTimeout(r, 5));
    const t0 = Date.now();
    const stopped = server.stop();
    await Promise.all(votes);
    const exit = await stopped;
    agent.destroy();
    assert.equal(exit.code, 0, 'exit status 0');
    assert.ok(Date.now() - t0 < 10_000, 'exits within 10 s');
    const acked = outcomes.map((s, i) => [s, i]).filter(([s]) => s === 200).map(([, i]) => i);
    assert.ok(acked.length > 0, 'some votes were acknowledged before the stop');
    assert.ok(outcomes.every((s) => s === 200 || s === 'error' || s === 503),
      `every vote got 200, 503, or no answer: ${[...new Set(outcomes)]}`);
    const text = await sse;
    assert.match(text, /retry: \d+/, 'the live stream got a retry hint');

    await server.restart();
    const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`);
    // acknowledged ⊆ stored; stored ballots beyond the acknowledged ones can only be votes
    // whose answer was lost with the connection, never ones the server refused
    assert.ok(res.json.total_votes >= acked.length, `${res.json.total_votes} stored ≥ ${acked.length} acknowledged`);
    for (const i of acked.slice(0, 200)) {
      const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: server.mint(`sd-${i}`) });
      assert.equal(me.json.has_voted, true, `acknowledged voter sd-${i} is stored`);
    }
    const refused = outcomes.map((s, i) => [s, i]).filter(([s]) => s === 503).map(([, i]) => i);
    for (const i of refused.slice(0, 50)) {
      const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: server.mint(`sd-${i}`) });
      assert.equal(me.json.has_voted, false, `a vote answered 503 (sd-${i}) is not stored`);
    }
  } finally {
    await server.close();
  }
});

function promtool() {
  for (const dir of (process.env.PATH || '').split(':')) {
    if (fs.existsSync(path.join(dir, 'promtool'))) return path.join(dir, 'promtool');
  }
  return null;
}

test('GET /metrics is valid Prometheus text format (promtool check metrics)', { skip: promtool() ? false : 'promtool is not installed (Debian package prometheus; make test installs it)' }, async () => {
  const server = await startServer();
  try {
    const owner = server.mint('metrics-owner');
    const poll = await createPoll(server, owner, { title: 'm', options: [{ text: 'a' }, { text: 'b' }] });
    await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token: server.mint('m1'), body: { option_id: poll.options[0].option_id } });
    await api(server, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token: server.mint('m1'), body: { option_id: poll.options[0].option_id } });
    await api(server, 'GET', '/v1/nope');
    const r = await api(server, 'GET', '/metrics');
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
    for (const name of ['tally_http_requests_total', 'tally_http_request_duration_seconds_bucket', 'tally_votes_total',
      'tally_store_batch_size_bucket', 'tally_store_commit_seconds_bucket', 'tally_live_subscribers', 'tally_store_queue_depth']) {
      assert.ok(r.text.includes(name), `has ${name}`);
    }
    assert.match(r.text, /tally_votes_total\{outcome="recorded"\} 1/);
    assert.match(r.text, /tally_votes_total\{outcome="ALREADY_VOTED"\} 1/);
    const file = path.join(os.tmpdir(), `tally-metrics-${process.pid}.txt`);
    fs.writeFileSync(file, r.text);
    try {
      // promtool reads the exposition on stdin and exits non-zero on a format error or lint
      // problem (names, units, HELP); both fail the test with its output
      try {
        execFileSync(promtool(), ['check', 'metrics'], { input: r.text, stdio: ['pipe', 'pipe', 'pipe'] });
      } catch (e) {
        assert.fail(`promtool check metrics: ${e.stdout || ''}${e.stderr || ''}`);
      }
    } finally {
      fs.rmSync(file, { force: true });
    }
  } finally {
    await server.close();
  }
});
