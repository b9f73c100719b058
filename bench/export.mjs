#!/usr/bin/env node
// bench/export.mjs: export of a million ballots in constant memory (issue 4).
//
//   node bench/export.mjs [--ballots 1000000] [--options 4] [--limit-mib 100]
//                         [--rate-mib 0] [--bin build/tally] [--gen build/tally-genballots]
//
// 1. Starts tally (loopback, a temporary data directory, a fresh secret), creates a poll
//    with --options options over HTTP, and stops the server.
// 2. Writes --ballots ballots for that poll through the store layer, not HTTP, with the
//    generator tool (--gen, or $TALLY_GEN): a small C program that opens the store in the
//    data directory and calls tly_store_generate_ballots(store, poll_id, options, n):
//        tally-genballots --data-dir DIR --poll POLL_ID --options N --count N
// 3. Starts tally again on the same data directory (it loads the ballots), checks
//    GET /results counts them all, lets it settle and samples its RSS (/proc/<pid>/status
//    VmRSS) as the baseline.
// 4. Streams GET /export?format=csv and then ?format=json to the end, sampling the RSS
//    every 20 ms, and checks the row count (CSV: BOM, header + one CRLF row per ballot;
//    JSON: one {"voter": ...} per ballot) and that no real voter id (gen<i>) appears as
//    a voter. --rate-mib > 0 reads at most that many MiB/s (a slow client: the server's
//    memory must stay flat, not buffer the rest of the export).
// 5. Prints a JSON summary and exits 1 when a peak RSS exceeds baseline + --limit-mib.
//
// Only 127.0.0.1 is contacted; the server is started and stopped by PID here; the data
// directory is removed at the end. Bounded by --max-seconds (600).
import { spawn, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = parseArgs(process.argv.slice(2), {
  ballots: 1_000_000, options: 4, 'limit-mib': 100, 'rate-mib': 0, 'max-seconds': 600,
  bin: process.env.TALLY_BIN || path.resolve(here, '../build/tally'),
  gen: process.env.TALLY_GEN || path.resolve(here, '../build/tally-genballots'),
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
  process.stderr.write(`bench/export: ${msg}\n`);
  process.exit(code);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const MiB = 1024 * 1024;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

function rssBytes(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
}

function signJwt(payload, key) {
  const b = (x) => Buffer.from(JSON.stringify(x)).toString('base64url');
  const h = b({ alg: 'HS256', typ: 'JWT' });
  const p = b(payload);
  return `${h}.${p}.${crypto.createHmac('sha256', key).update(`${h}.${p}`).digest('base64url')}`;
}

let child = null;
let log = '';

async function startTally(dataDir, secret, waitMs) {
  const port = await freePort();
  log = '';
  child = spawn(args.bin, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--secret', secret,
    '--log-level', 'warn'], { env: { ...process.env, TALLY_RATE_LIMITS: 'off' }, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (d) => { log = (log + d).slice(-20_000); });
  child.stderr.on('data', (d) => { log = (log + d).slice(-20_000); });
  const url = `http://127.0.0.1:${port}`;
  const t0 = Date.now();
  while (Date.now() - t0 < waitMs) {
    if (child.exitCode !== null) die(`tally exited during start:\n${log}`, 1);
    try {
      const r = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1000) });
      await r.arrayBuffer();
      if (r.status === 200) return { url, port, pid: child.pid, startMs: Date.now() - t0 };
    } catch { /* not yet */ }
    await sleep(100);
  }
  die(`tally did not answer /healthz within ${waitMs} ms:\n${log}`, 1);
}

async function stopTally() {
  if (!child || child.exitCode !== null) return;
  const c = child;
  const exited = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  const t = setTimeout(() => c.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(t);
}

/** Streams GET path to the end, counting, while sampling the server's RSS. */
function streamExport(srv, urlPath, token, onChunk) {
  return new Promise((resolve, reject) => {
    let peak = rssBytes(srv.pid);
    const sampler = setInterval(() => {
      try { peak = Math.max(peak, rssBytes(srv.pid)); } catch { /* exited */ }
    }, 20);
    const t0 = Date.now();
    let bytes = 0;
    const req = http.get({ host: '127.0.0.1', port: srv.port, path: urlPath,
      headers: { authorization: `Bearer ${token}` } }, (res) => {
      if (res.statusCode !== 200) {
        clearInterval(sampler);
        reject(new Error(`${urlPath} → ${res.statusCode}`));
        res.resume();
        return;
      }
      res.on('data', (chunk) => {
        bytes += chunk.length;
        onChunk(chunk);
        if (args['rate-mib'] > 0) {
          const ahead = (bytes / (args['rate-mib'] * MiB)) * 1000 - (Date.now() - t0);
          if (ahead > 5) {
            res.pause();
            setTimeout(() => res.resume(), ahead);
          }
        }
      });
      res.on('end', () => {
        clearInterval(sampler);
        try { peak = Math.max(peak, rssBytes(srv.pid)); } catch { /* exited */ }
        resolve({ status: res.statusCode, bytes, ms: Date.now() - t0, peakRss: peak,
          contentType: res.headers['content-type'] });
      });
      res.on('error', (e) => { clearInterval(sampler); reject(e); });
    });
    req.on('error', (e) => { clearInterval(sampler); reject(e); });
  });
}

async function main() {
  if (!fs.existsSync(args.bin)) die(`tally binary not found at ${args.bin} (run make first)`);
  if (!fs.existsSync(args.gen)) {
    die(`generator not found at ${args.gen}. It is a small C program linked against build/libtally.a:\n` +
      '  open the store (tly_store_open with {.data_dir = DIR}), call\n' +
      '  tly_store_generate_ballots(store, POLL_ID, OPTIONS, COUNT), tly_store_close, exit 0 on success;\n' +
      '  usage: tally-genballots --data-dir DIR --poll POLL_ID --options N --count N\n' +
      'Build it (e.g. make build/tally-genballots) or pass --gen / TALLY_GEN.');
  }
  const watchdog = setTimeout(() => { stopTally(); die(`gave up after ${args['max-seconds']} s`, 1); },
    args['max-seconds'] * 1000);
  watchdog.unref();
  const dataDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tally-bench-export-'));
  const secret = crypto.randomBytes(24).toString('hex');
  const now = Math.floor(Date.now() / 1000);
  const owner = signJwt({ sub: `bench-owner-${crypto.randomBytes(4).toString('hex')}`, iat: now, exp: now + 7200 },
    secret);
  const summary = { ballots: args.ballots, options: args.options, rate_mib: args['rate-mib'] };
  try {
    // 1. a poll
    let srv = await startTally(dataDir, secret, 10_000);
    const options = Array.from({ length: args.options }, (_, i) => ({ text: `Option ${i + 1}` }));
    const cr = await fetch(`${srv.url}/v1/polls`, { method: 'POST',
      headers: { authorization: `Bearer ${owner}`, 'content-type': 'application/json' },
      body: JSON.stringify({ title: 'export bench', options, settings: { results_visibility: 'owner_only' } }) });
    const poll = await cr.json();
    if (cr.status !== 201) die(`creating the poll: ${cr.status} ${JSON.stringify(poll)}`, 1);
    await stopTally();

    // 2. ballots through the store layer
    const g0 = Date.now();
    await new Promise((resolve, reject) => execFile(args.gen, ['--data-dir', dataDir, '--poll', poll.poll_id,
      '--options', String(args.options), '--count', String(args.ballots)], { timeout: 600_000 },
    (err, stdout, stderr) => (err ? reject(new Error(`generator failed: ${err.message}\n${stderr}`)) : resolve())));
    summary.generate_ms = Date.now() - g0;
    summary.db_bytes = fs.statSync(path.join(dataDir, 'tally.db')).size;

    // 3. load and baseline
    srv = await startTally(dataDir, secret, 300_000);
    summary.load_ms = srv.startMs;
    const rr = await fetch(`${srv.url}/v1/polls/${poll.poll_id}/results`, { headers: { authorization: `Bearer ${owner}` } });
    const res = await rr.json();
    if (res.total_votes !== args.ballots) die(`results count ${res.total_votes}, expected ${args.ballots}`, 1);
    await sleep(1000);
    let base = 0;
    for (let i = 0; i < 10; i++) { base = Math.max(base, rssBytes(srv.pid)); await sleep(50); }
    summary.baseline_rss_mib = +(base / MiB).toFixed(1);

    // 4. the exports
    let lines = 0;
    let head = Buffer.alloc(0);
    let realIds = 0;
    let tail = '';
    const csv = await streamExport(srv, `/v1/polls/${poll.poll_id}/export?format=csv`, owner, (chunk) => {
      if (head.length < 400) head = Buffer.concat([head, chunk.subarray(0, 400)]);
      const s = tail + chunk.toString('latin1');
      const parts = s.split('\r\n');
      tail = parts.pop();
      lines += parts.length;
      for (const p of parts) if (p.startsWith('gen')) realIds++;
    });
    const expectHead = `\uFEFFvoter,recorded_at,${options.map((o) => o.text).join(',')}`;
    summary.csv = { ...csv, peak_rss_mib: +(csv.peakRss / MiB).toFixed(1),
      delta_mib: +((csv.peakRss - base) / MiB).toFixed(1), rows: lines - 1,
      header_ok: head.toString('utf8').startsWith(`${expectHead}\r\n`), complete: tail === '', real_ids: realIds };
    delete summary.csv.peakRss;

    let voters = 0;
    let carry = '';
    const PAT = '{"voter":"p_';
    const json = await streamExport(srv, `/v1/polls/${poll.poll_id}/export?format=json`, owner, (chunk) => {
      // the carry is shorter than the pattern, so a match using it ends in the new chunk:
      // nothing is counted twice
      const s = carry + chunk.toString('latin1');
      voters += s.split(PAT).length - 1;
      if (s.includes('"voter":"gen')) realIds++;
      carry = s.slice(-(PAT.length - 1));
    });
    summary.json = { ...json, peak_rss_mib: +(json.peakRss / MiB).toFixed(1),
      delta_mib: +((json.peakRss - base) / MiB).toFixed(1), ballots: voters, real_ids: realIds };
    delete summary.json.peakRss;
    summary.after_rss_mib = +(rssBytes(srv.pid) / MiB).toFixed(1);
  } finally {
    await stopTally();
    await fsp.rm(dataDir, { recursive: true, force: true });
  }

  const limit = args['limit-mib'];
  const failures = [];
  if (summary.csv.rows !== args.ballots) failures.push(`CSV has ${summary.csv.rows} rows`);
  if (!summary.csv.header_ok) failures.push('CSV header or BOM wrong');
  if (!summary.csv.complete) failures.push('CSV does not end with CRLF');
  if (summary.json.ballots !== args.ballots) failures.push(`JSON has ${summary.json.ballots} ballots`);
  if (summary.csv.real_ids || summary.json.real_ids) failures.push('a real voter id appears in the export');
  if (summary.csv.delta_mib >= limit) failures.push(`CSV export grew RSS by ${summary.csv.delta_mib} MiB`);
  if (summary.json.delta_mib >= limit) failures.push(`JSON export grew RSS by ${summary.json.delta_mib} MiB`);
  summary.limit_mib = limit;
  summary.ok = failures.length === 0;
  summary.failures = failures;
  process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  process.exit(summary.ok ? 0 : 1);
}

main().catch(async (e) => {
  await stopTally();
  die(`${e.stack || e}\n${log}`, 1);
});
