#!/usr/bin/env node
// bench/ranked.mjs: what a big ranked poll costs everyone else (`make bench-ranked`).
//
//   node bench/ranked.mjs [--ballots 30000] [--options 100] [--seconds 10]
//                         [--idle-seconds 3] [--probe-ms 5] [--concurrency 32]
//                         [--subscribers 0] [--json out.json]
//                         [--max-seconds 300] [--bin build/tally]
//
// 1. Starts tally (loopback, a temporary data directory, a fresh secret, --rate-limits
//    off, --log-level warn) and creates a ranked poll with --options options.
// 2. Casts --ballots ballots over HTTP, each a full ranking (every option, in a random
//    order) from a new voter (an HS256 token minted with the server secret), over
//    --concurrency keep-alive connections (4 requests pipelined on each), and checks that
//    GET /results counts them all.
// 3. Idle: for --idle-seconds, a prober sends GET /healthz every --probe-ms ms (open loop,
//    over a few keep-alive connections of its own) and records each latency (send to
//    last byte).
// 4. Load: for --seconds, the prober goes on while one client alternates a vote (a new
//    voter, a random full ranking) and a GET /results of the poll, each request waiting
//    for the previous answer; every read must count the vote just acknowledged. With
//    --subscribers N, N live subscribers (Server-Sent Events) watch the poll meanwhile.
//
// Prints, for each phase, the /healthz latency (p50, p90, p99, max, count) and, under
// load, the vote and results-read latencies, the vote+read pairs per second and the CPU
// each side used (/proc: tally's threads, this client, and the other processes of the
// machine, which share its cores); the prober runs in a worker thread, so the load
// client's own JSON parsing does not delay its measurements. Exit status 1 when a read
// missed an acknowledged vote.
//
// Only 127.0.0.1 is contacted; the server is started and stopped by PID here; its data
// directory is removed at the end. A watchdog ends the run after --max-seconds.
import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- the prober (worker thread): GET /healthz every --probe-ms until told to stop -------
// Open loop: a probe is sent every interval whatever the previous ones are doing (on one
// of a few keep-alive connections), so the latencies are what a request arriving at a
// random moment sees, not a sample biased towards the moments the server is idle (a
// closed loop sends many probes while the loop is free and one while it is busy).
if (!isMainThread) {
  const { port, interval } = workerData;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
  let phase = null;
  let samples = [];
  let errors = 0;
  const probe = (into) => {
    const t0 = nowMs();
    const req = http.get({ host: '127.0.0.1', port, path: '/healthz', agent }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? into.push(nowMs() - t0) : errors++));
    });
    req.setTimeout(10_000, () => req.destroy(new Error('/healthz timed out')));
    req.on('error', () => errors++);
  };
  const timer = setInterval(() => { if (phase !== null) probe(samples); }, interval);
  parentPort.on('message', (m) => {
    if (m.phase !== undefined || m.stop) {
      const done = samples;
      const name = phase;
      setTimeout(() => { // the probes still in flight land in `done` meanwhile
        if (name !== null) parentPort.postMessage({ phase: name, samples: done, errors, done: !!m.stop });
        if (m.stop) { clearInterval(timer); process.exit(0); }
      }, 1000);
      phase = m.stop ? null : m.phase;
      samples = [];
    }
  });
}

const here = path.dirname(fileURLToPath(import.meta.url));
const args = parseArgs(process.argv.slice(2), {
  ballots: 30_000, options: 100, seconds: 10, 'idle-seconds': 3, 'probe-ms': 5, concurrency: 32, subscribers: 0,
  json: '',
  'max-seconds': 300, bin: process.env.TALLY_BIN || path.resolve(here, '../build/tally'),
});

function parseArgs(argv, defaults) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m || !(m[1] in defaults)) die(`unknown argument ${argv[i]}`);
    const v = m[2] !== undefined ? m[2] : argv[++i];
    out[m[1]] = typeof defaults[m[1]] === 'number' ? Number(v) : v;
  }
  return out;
}

function die(msg, code = 2) {
  process.stderr.write(`bench/ranked: ${msg}\n`);
  if (child && child.exitCode === null) child.kill('SIGKILL');
  process.exit(code);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

function mint(secret, sub) {
  const b = (x) => Buffer.from(JSON.stringify(x)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const h = b({ alg: 'HS256', typ: 'JWT' });
  const p = b({ sub, iat: now, exp: now + 3600 });
  return `${h}.${p}.${crypto.createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url')}`;
}

let child = null;
let log = '';

function request(agent, port, method, urlPath, token, body) {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  const headers = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (payload !== undefined) {
    headers['content-type'] = 'application/json';
    headers['content-length'] = Buffer.byteLength(payload);
  }
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, json, text });
      });
      res.on('error', reject);
    });
    req.setTimeout(30_000, () => req.destroy(new Error(`${method} ${urlPath} timed out`)));
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

/**
 * POSTs every request of `reqs` ({path, token, body: JSON text}) over `conns` keep-alive
 * connections, `depth` requests written ahead on each (HTTP/1.1 pipelining; answers come
 * in order); resolves with each one's status, in the order of `reqs`. Far lighter on
 * the client's CPU than node:http, which matters on a machine the server shares.
 */
function postAll(port, reqs, { conns = 32, depth = 4 } = {}) {
  return new Promise((resolve, reject) => {
    const out = new Array(reqs.length);
    let next = 0;
    let done = 0;
    const open = () => {
      const sock = net.connect({ host: '127.0.0.1', port });
      sock.setNoDelay(true);
      const inflight = [];
      let buf = Buffer.alloc(0);
      const fill = () => {
        while (inflight.length < depth && next < reqs.length) {
          const k = next++;
          const r = reqs[k];
          sock.write(`POST ${r.path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${r.token}\r\n` +
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
          out[inflight.shift()] = Number(head.slice(9, 12));
          buf = buf.subarray(headEnd + 4 + n);
          done++;
        }
        if (done === reqs.length) resolve(out);
        else fill();
      });
      sock.on('error', reject);
      sock.on('close', () => { if (inflight.length > 0) reject(new Error('a casting connection closed early')); });
    };
    for (let i = 0; i < conns; i++) open();
  });
}

/** Holds an SSE subscription to `path` open, reading and counting what arrives. */
function subscribe(port, path) {
  const sub = { bytes: 0, events: 0, sock: null };
  sub.sock = net.connect({ host: '127.0.0.1', port }, () =>
    sub.sock.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAccept: text/event-stream\r\n\r\n`));
  sub.sock.on('data', (d) => {
    sub.bytes += d.length;
    for (let i = d.indexOf('event: results'); i >= 0; i = d.indexOf('event: results', i + 1)) sub.events++;
  });
  sub.sock.on('error', () => {});
  return sub;
}

// ---- CPU accounting from /proc (clock ticks) ----
const HZ = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
function statTicks(path) { // utime + stime of a /proc/.../stat line
  const f = fs.readFileSync(path, 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return Number(rest[11]) + Number(rest[12]);
}
function threadTicks(pid) {
  const out = {};
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try { out[tid] = statTicks(`/proc/${pid}/task/${tid}/stat`); } catch { /* gone */ }
  }
  return out;
}
function machineBusy() { // all CPUs: everything but idle and iowait
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return f.reduce((a, x) => a + x, 0) - f[3] - f[4];
}
function cpuSnapshot(pid) {
  return { t: nowMs(), threads: threadTicks(pid), self: statTicks('/proc/self/stat'), busy: machineBusy() };
}
function cpuReport(pid, a, b) {
  const secs = (b.t - a.t) / 1000;
  const cores = (ticks) => Math.round((ticks / HZ / secs) * 100) / 100;
  let tally = 0;
  const threads = {};
  for (const [tid, t1] of Object.entries(b.threads)) {
    const d = t1 - (a.threads[tid] ?? 0);
    tally += d;
    if (d > 0) threads[tid === String(pid) ? 'loop' : `thread ${tid}`] = cores(d);
  }
  const client = b.self - a.self;
  return { tally: cores(tally), threads, client: cores(client), other: cores(b.busy - a.busy - tally - client) };
}

function shuffled(ids) {
  const a = ids.slice();
  for (let i = a.length - 1; i > 0; i--) {
    const j = crypto.randomInt(i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

function stats(samples) {
  const s = samples.slice().sort((a, b) => a - b);
  const q = (p) => (s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : NaN);
  const r = (x) => Math.round(x * 100) / 100;
  return { n: s.length, p50: r(q(0.5)), p90: r(q(0.9)), p99: r(q(0.99)), max: r(s.length ? s[s.length - 1] : NaN) };
}

const fmt = (st) => `p50 ${st.p50} ms, p90 ${st.p90} ms, p99 ${st.p99} ms, max ${st.max} ms (${st.n} requests` +
  `${st.errors ? `, ${st.errors} failed` : ''})`;

async function main() {
  const watchdog = setTimeout(() => die(`still running after ${args['max-seconds']} s`, 1), args['max-seconds'] * 1000);
  watchdog.unref();
  if (!fs.existsSync(args.bin)) die(`no tally binary at ${args.bin} (run make first)`);
  const dataDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tally-bench-ranked-'));
  const secret = crypto.randomBytes(24).toString('hex');
  const port = await freePort();
  child = spawn(args.bin, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--secret', secret,
    '--log-level', 'warn', '--rate-limits', 'off'], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (d) => { log = (log + d).slice(-20_000); });
  child.stderr.on('data', (d) => { log = (log + d).slice(-20_000); });
  const t0 = Date.now();
  const agent = new http.Agent({ keepAlive: true, maxSockets: args.concurrency });
  for (;;) {
    if (child.exitCode !== null) die(`tally exited during start:\n${log}`, 1);
    try {
      if ((await request(agent, port, 'GET', '/healthz')).status === 200) break;
    } catch { /* not yet */ }
    if (Date.now() - t0 > 10_000) die(`tally did not answer /healthz within 10 s:\n${log}`, 1);
    await sleep(50);
  }

  const owner = mint(secret, 'bench-owner');
  const options = Array.from({ length: args.options }, (_, i) => ({ text: `option ${i}` }));
  const created = await request(agent, port, 'POST', '/v1/polls', owner,
    { title: 'Big ranked poll', type: 'ranked', options });
  if (created.status !== 201) die(`create → ${created.status} ${created.text}`, 1);
  const pollId = created.json.poll_id;
  const ids = created.json.options.map((o) => o.option_id);

  // ---- 2. the ballots ----
  const reqs = Array.from({ length: args.ballots }, (_, k) => ({
    path: `/v1/polls/${pollId}/votes`, token: mint(secret, `voter-${k}`),
    body: JSON.stringify({ ranking: shuffled(ids) }),
  }));
  const tCast = nowMs();
  const statuses = await postAll(port, reqs, { conns: args.concurrency });
  const castMs = nowMs() - tCast;
  const failed = statuses.filter((st) => st !== 200).length;
  if (failed > 0) die(`${failed} ballots were not recorded`, 1);
  const counted = await request(agent, port, 'GET', `/v1/polls/${pollId}/results`);
  if (counted.json?.total_votes !== args.ballots) die(`results count ${counted.json?.total_votes}, want ${args.ballots}`, 1);
  process.stdout.write(`cast ${args.ballots} full rankings of ${args.options} options in ${(castMs / 1000).toFixed(1)} s ` +
    `(${Math.round(args.ballots / (castMs / 1000))}/s)\n`);

  // ---- 3, 4. the prober, idle then under load ----
  const prober = new Worker(fileURLToPath(import.meta.url), { workerData: { port, interval: args['probe-ms'] } });
  const results = {};
  const finished = new Promise((resolve) => {
    prober.on('message', (m) => {
      if (m.phase) results[m.phase] = { ...stats(m.samples), errors: m.errors };
      if (m.done) resolve();
    });
  });
  prober.postMessage({ phase: 'idle' });
  await sleep(args['idle-seconds'] * 1000);
  prober.postMessage({ phase: 'load' });

  const subs = Array.from({ length: args.subscribers }, () => subscribe(port, `/v1/polls/${pollId}/live`));
  const one = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const voteMs = [];
  const readMs = [];
  let total = args.ballots;
  let missed = 0;
  let pairs = 0;
  const cpu0 = cpuSnapshot(child.pid);
  const tLoad = nowMs();
  while (nowMs() - tLoad < args.seconds * 1000) {
    const ta = nowMs();
    const v = await request(one, port, 'POST', `/v1/polls/${pollId}/votes`, mint(secret, `loop-${pairs}`),
      { ranking: shuffled(ids) });
    const tb = nowMs();
    if (v.status !== 200) die(`vote → ${v.status} ${v.text}`, 1);
    total++;
    const r = await request(one, port, 'GET', `/v1/polls/${pollId}/results`);
    readMs.push(nowMs() - tb);
    voteMs.push(tb - ta);
    if (r.status !== 200) die(`results → ${r.status} ${r.text}`, 1);
    if (r.json.total_votes !== total) missed++;
    pairs++;
  }
  const loadS = (nowMs() - tLoad) / 1000;
  const cpu = cpuReport(child.pid, cpu0, cpuSnapshot(child.pid));
  prober.postMessage({ stop: true });
  await finished;
  for (const sub of subs) sub.sock.destroy();

  const out = {
    ballots: args.ballots, options: args.options, cast_per_s: Math.round(args.ballots / (castMs / 1000)),
    healthz_idle: results.idle, healthz_load: results.load,
    vote: stats(voteMs), read: stats(readMs), pairs_per_s: Math.round((pairs / loadS) * 10) / 10,
    reads_missing_the_vote: missed, subscribers: args.subscribers, cpu_under_load: cpu,
    live_events_per_subscriber: subs.length ? Math.round(subs.reduce((a, x) => a + x.events, 0) / subs.length) : 0,
  };
  process.stdout.write(`/healthz idle:       ${fmt(out.healthz_idle)}\n`);
  process.stdout.write(`/healthz under load: ${fmt(out.healthz_load)}\n`);
  process.stdout.write(`  the load: ${pairs} vote+read pairs, ${out.pairs_per_s}/s; vote ${fmt(out.vote)}\n`);
  process.stdout.write(`            results read ${fmt(out.read)}\n`);
  process.stdout.write(`  reads that missed the vote just acknowledged: ${missed}\n`);
  process.stdout.write(`  CPU under load (cores): tally ${cpu.tally} (${Object.entries(cpu.threads)
    .map(([k, v]) => `${k} ${v}`).join(', ')}), this client ${cpu.client}, other processes ${cpu.other}\n`);
  if (subs.length) {
    process.stdout.write(`  ${subs.length} live subscribers, ${out.live_events_per_subscriber} results events each\n`);
  }
  if (args.json) fs.writeFileSync(args.json, JSON.stringify(out, null, 2) + '\n');

  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
  await fsp.rm(dataDir, { recursive: true, force: true });
  process.exit(missed > 0 ? 1 : 0);
}

if (isMainThread) main().catch((e) => die(e.stack || String(e), 1));
