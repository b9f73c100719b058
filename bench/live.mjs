#!/usr/bin/env node
// bench/live.mjs: live results under load (`make bench-live`).
//
//   node bench/live.mjs [--subscribers 19000] [--procs 4] [--rate 200] [--seconds 20]
//                       [--options 8] [--tick 250] [--ws-share 0.5] [--baseline-seconds 5]
//                       [--max-seconds 120] [--json out.json] [--bin build/tally]
//
// Starts tally (loopback, a temporary data directory, --log-level warn) and holds
// --subscribers concurrent live subscribers on one poll (a share --ws-share of them
// WebSocket, the rest Server-Sent Events), spread over --procs client processes (each process has its own open-file
// limit; the server's is 20,000 and cannot be raised here). Then casts votes at a steady
// --rate for --seconds, each from a new voter (an HS256 token minted with the server
// secret), and measures for every (vote, subscriber) pair the time from the vote's 200 to
// the first message that subscriber received containing the vote.
//
// How "containing the vote" is known exactly: the poll has --options options and vote k
// goes to option k mod options; a vote is sent only after the previous vote to the same
// option was answered, so the committed votes of each option are a prefix of the ones sent
// and the j-th vote to option o is in a message iff that message counts >= j votes for o.
// (Several votes are in flight at once, on different options.) Client and parent time
// stamps are process.hrtime (CLOCK_MONOTONIC), comparable on one machine. A message can be
// received before the parent reads the vote's 200 (the tick fired between the commit and
// the reply), so a few latencies are slightly negative.
//
// Also measured: the server's RSS (/proc/<pid>/status VmRSS) before subscribing and with
// everyone subscribed, and its CPU time (/proc/<pid>/stat utime+stime) while connecting,
// idle, voting without subscribers (a baseline on another poll) and voting with them.
//
// Votes: at most --options votes are in flight (one per option), so when the server answers
// slowly the achieved rate falls below --rate; a vote whose turn comes more than 5 s after
// the planned end is not sent (reported as "not sent"), and each request times out after 5 s.
//
// Everything is bounded: a watchdog stops the run after --max-seconds (120). Only
// 127.0.0.1 is contacted; the processes started here are stopped by PID. The server runs
// with --max-connections 19900 (its default, 19000, leaves no room for the voters).
import { spawn, fork, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- histogram: 0.1 ms buckets up to 20 s, plus under/overflow --------------------------
const BUCKET = 0.1;
const NBUCKETS = 200_000;
function newHist() { return { b: new Uint32Array(NBUCKETS), under: 0, over: 0, n: 0, min: Infinity, max: -Infinity, sum: 0 }; }
function histAdd(h, v) {
  h.n++; h.sum += v;
  if (v < h.min) h.min = v;
  if (v > h.max) h.max = v;
  if (v < 0) { h.under++; return; }
  const i = Math.floor(v / BUCKET);
  if (i >= NBUCKETS) h.over++; else h.b[i]++;
}
function histPack(h) {
  const sparse = [];
  for (let i = 0; i < NBUCKETS; i++) if (h.b[i]) sparse.push(i, h.b[i]);
  return { sparse, under: h.under, over: h.over, n: h.n, min: h.min, max: h.max, sum: h.sum };
}
function histMerge(into, p) {
  for (let i = 0; i < p.sparse.length; i += 2) into.b[p.sparse[i]] += p.sparse[i + 1];
  into.under += p.under; into.over += p.over; into.n += p.n; into.sum += p.sum;
  if (p.n) { into.min = Math.min(into.min, p.min); into.max = Math.max(into.max, p.max); }
}
function histQuantile(h, q) {
  if (!h.n) return NaN;
  const rank = Math.ceil(q * h.n);
  let seen = h.under;
  if (seen >= rank) return 0; // negative latencies count as 0 for quantiles
  for (let i = 0; i < NBUCKETS; i++) {
    seen += h.b[i];
    if (seen >= rank) return (i + 1) * BUCKET;
  }
  return h.max;
}

// ======================================================================================
// child: holds subscribers
// ======================================================================================

async function child() {
  const send = (m) => process.send(m);
  let cfg = null;
  const conns = [];              // {ws, sock, buf, msgs: [seq, t, ...], first, lastSeq}
  const states = new Map();      // seq -> {counts: Int32Array, total}
  let target = -1;
  let targetTimer = null;

  const learn = (seq, jsonText) => {
    if (states.has(seq)) return;
    try {
      const d = JSON.parse(jsonText);
      const data = d.type ? d.data : d;
      if (!data || !Array.isArray(data.options)) return;
      states.set(seq, { counts: Int32Array.from(data.options.map((o) => o.votes ?? 0)), total: data.total_votes ?? 0 });
    } catch { /* a partial message: learnt from another connection */ }
  };

  const onMessage = (c, seq, t, text) => {
    if (!states.has(seq)) learn(seq, text);
    c.msgs.push(seq, t);
    c.lastSeq = seq;
    if (!c.first) { c.first = true; firsts++; }
  };

  // SSE: the body is chunked; each event ends with a chunk "\n\n" (…"\n\n\r\n" on the wire)
  const feedSse = (c, t) => {
    for (;;) {
      const end = c.buf.indexOf('\n\n\r\n');
      if (end < 0) return;
      const msg = c.buf.slice(0, end);
      c.buf = c.buf.slice(end + 4);
      const ip = msg.indexOf('\nid: ');
      if (ip < 0 || msg.indexOf('event: results') < 0) {
        if (msg.indexOf('event: closed') >= 0 || msg.indexOf('event: deleted') >= 0) c.ended = true;
        continue;
      }
      const seq = parseInt(msg.slice(ip + 5, ip + 30), 10);
      let json = '';
      if (!states.has(seq)) {
        const j = msg.indexOf('{', ip);
        const k = msg.indexOf('\r\n', j);
        json = msg.slice(j, k < 0 ? msg.length : k);
      }
      onMessage(c, seq, t, json);
    }
  };

  const mask = Buffer.from([1, 2, 3, 4]);
  const pong = (c, payload) => {
    const p = Buffer.from(payload);
    for (let i = 0; i < p.length; i++) p[i] ^= mask[i & 3];
    c.sock.write(Buffer.concat([Buffer.from([0x8a, 0x80 | p.length]), mask, p]));
  };
  const feedWs = (c, t) => {
    for (;;) {
      const b = c.bbuf;
      if (b.length < 2) return;
      let len = b[1] & 0x7f;
      let off = 2;
      if (len === 126) { if (b.length < 4) return; len = b.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (b.length < 10) return; len = Number(b.readBigUInt64BE(2)); off = 10; }
      if (b.length < off + len) return;
      const op = b[0] & 0x0f;
      const payload = b.subarray(off, off + len);
      c.bbuf = b.subarray(off + len);
      if (op === 1) {
        const s = payload.toString('latin1');
        const i = s.indexOf('"seq":');
        if (i < 0 || !s.startsWith('{"type":"results"')) { if (s.startsWith('{"type":"closed"')) c.ended = true; continue; }
        const seq = parseInt(s.slice(i + 6, i + 30), 10);
        onMessage(c, seq, t, states.has(seq) ? '' : payload.toString('utf8'));
      } else if (op === 9) {
        pong(c, payload);
      } else if (op === 8) {
        c.ended = true;
      }
    }
  };

  let firsts = 0;
  let failed = 0;
  const failures = {};
  const open = (ws) => new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port: cfg.port });
    const c = { ws, sock, buf: '', bbuf: Buffer.alloc(0), head: false, msgs: [], first: false, lastSeq: -1, ended: false, closed: false };
    let pre = '';
    sock.setNoDelay(true);
    const fail = (why) => {
      failed++;
      failures[why] = (failures[why] || 0) + 1;
      sock.destroy();
      resolve(null);
    };
    sock.on('connect', () => {
      const p = ws ? `/v1/polls/${cfg.pollId}/ws` : `/v1/polls/${cfg.pollId}/live`;
      const extra = ws
        ? 'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n'
        : 'Accept: text/event-stream\r\n';
      sock.write(`GET ${p} HTTP/1.1\r\nHost: 127.0.0.1\r\n${extra}\r\n`);
    });
    sock.on('data', (d) => {
      const t = nowMs();
      if (!c.head) {
        pre += d.toString('latin1');
        const e = pre.indexOf('\r\n\r\n');
        if (e < 0) return;
        const status = Number(pre.slice(9, 12));
        if (status !== (ws ? 101 : 200)) {
          const m = /"code":"([A-Z_]+)"/.exec(pre);
          fail(`HTTP ${status}${m ? ' ' + m[1] : ''}`);
          return;
        }
        c.head = true;
        conns.push(c);
        resolve(c);
        const rest = pre.slice(e + 4);
        pre = '';
        if (ws) { c.bbuf = Buffer.from(rest, 'latin1'); feedWs(c, t); } else { c.buf = rest; feedSse(c, t); }
        return;
      }
      if (ws) { c.bbuf = c.bbuf.length ? Buffer.concat([c.bbuf, d]) : d; feedWs(c, t); }
      else { c.buf += d.toString('latin1'); feedSse(c, t); }
    });
    sock.on('error', (e) => { c.error = e.code || e.message; });
    sock.on('close', () => {
      c.closed = true;
      if (!c.head) fail(c.error || 'closed before the answer');
    });
  });

  const progress = () => send({ type: 'progress', connected: conns.length, firsts, failed, failures });

  const checkTarget = () => {
    let done = 0;
    for (const c of conns) {
      const st = states.get(c.lastSeq);
      if (st && st.total >= target) done++;
    }
    send({ type: 'target', done, of: conns.length });
  };

  const collect = ({ votes, windowFrom, windowTo, options }) => {
    // votes: [[option, j, ackTime], ...]; per option, ack times by j (1-based)
    const perOpt = Array.from({ length: options }, () => []);
    for (const [o, j, a] of votes) perOpt[o][j - 1] = a;
    const hist = { sse: newHist(), ws: newHist() };
    let missing = 0;
    let msgsInWindow = 0;
    let msgsSince = 0;
    let msgsTotal = 0;
    let unknownSeq = 0;
    for (const c of conns) {
      const m = c.msgs;
      const nm = m.length / 2;
      msgsTotal += nm;
      const counts = new Array(nm);
      for (let i = 0; i < nm; i++) {
        const t = m[2 * i + 1];
        if (t >= windowFrom && t <= windowTo) msgsInWindow++;
        if (t >= windowFrom) msgsSince++;
        const st = states.get(m[2 * i]);
        if (!st) unknownSeq++;
        counts[i] = st ? st.counts : null;
      }
      const h = c.ws ? hist.ws : hist.sse;
      for (let o = 0; o < options; o++) {
        const acks = perOpt[o];
        let p = 0;
        for (let j = 1; j <= acks.length; j++) {
          while (p < nm && (counts[p] === null || counts[p][o] < j)) p++;
          if (p >= nm) { missing += acks.length - j + 1; break; }
          histAdd(h, m[2 * p + 1] - acks[j - 1]);
        }
      }
    }
    send({
      type: 'collected', hist: { sse: histPack(hist.sse), ws: histPack(hist.ws) }, missing, msgsInWindow, msgsSince, msgsTotal,
      unknownSeq, closed: conns.filter((c) => c.closed).length, subscribers: conns.length,
    });
  };

  process.on('message', async (m) => {
    if (m.type === 'start') {
      cfg = m;
      const timer = setInterval(progress, 500);
      for (let i = 0; i < cfg.count; i += cfg.batch) {
        const batch = [];
        // WebSocket for a share cfg.wsShare of the subscribers, spread evenly
        for (let k = i; k < Math.min(cfg.count, i + cfg.batch); k++) batch.push(open(Math.floor((k + 1) * cfg.wsShare) > Math.floor(k * cfg.wsShare)));
        await Promise.all(batch);
      }
      // wait (bounded) for every first message
      const until = nowMs() + 15_000;
      while (firsts < conns.length && nowMs() < until) await sleep(50);
      clearInterval(timer);
      progress();
      send({ type: 'ready', connected: conns.length, ws: conns.filter((c) => c.ws).length, firsts, failed, failures });
    } else if (m.type === 'target') {
      target = m.total;
      clearInterval(targetTimer);
      targetTimer = setInterval(checkTarget, 100);
      checkTarget();
    } else if (m.type === 'collect') {
      clearInterval(targetTimer);
      collect(m);
    } else if (m.type === 'exit') {
      for (const c of conns) c.sock.destroy();
      process.exit(0);
    }
  });
  process.on('disconnect', () => process.exit(0));
  send({ type: 'hello' });
}

// ======================================================================================
// parent
// ======================================================================================

function parseArgs() {
  const o = { subscribers: 19000, procs: 4, rate: 200, seconds: 20, options: 8, tick: 250, maxSeconds: 120,
    bin: process.env.TALLY_BIN || path.resolve(here, '../build/tally'), batch: 250, baselineSeconds: 5, json: '', wsShare: 0.5 };
  const a = process.argv.slice(2);
  for (let i = 0; i < a.length; i++) {
    const k = a[i].replace(/^--/, '');
    const key = k.replace(/-([a-z])/g, (_, x) => x.toUpperCase());
    if (!(key in o)) { console.error(`unknown option ${a[i]}`); process.exit(2); }
    const v = a[++i];
    o[key] = typeof o[key] === 'number' ? Number(v) : v;
  }
  return o;
}

const HZ = (() => { try { return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100; } catch { return 100; } })();
function rssKiB(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}
function cpuMs(pid) {
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return ((Number(f[11]) + Number(f[12])) * 1000) / HZ; // utime + stime (fields 14, 15)
}
function fdCount(pid) { try { return fs.readdirSync(`/proc/${pid}/fd`).length; } catch { return NaN; } }

function b64url(x) { return Buffer.from(x).toString('base64url'); }
function mint(secret, sub) {
  const now = Math.floor(Date.now() / 1000);
  const h = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const p = b64url(JSON.stringify({ sub, iat: now, exp: now + 3600 }));
  const sig = crypto.createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url');
  return `${h}.${p}.${sig}`;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

function request(port, agent, method, p, token, body) {
  const data = body === undefined ? undefined : JSON.stringify(body);
  const headers = { 'content-type': 'application/json' };
  if (data !== undefined) headers['content-length'] = Buffer.byteLength(data);
  if (token) headers.authorization = `Bearer ${token}`;
  return new Promise((resolve) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, json, text });
      });
      res.on('error', (e) => resolve({ status: -1, text: String(e) }));
    });
    req.setTimeout(5_000, () => req.destroy(new Error("timeout")));
    req.on('error', (e) => resolve({ status: -1, text: e.message }));
    if (data !== undefined) req.write(data);
    req.end();
  });
}

/**
 * Casts tokens.length votes at `rate`/s on poll (options round-robin; a vote waits for the
 * previous vote to its option to be answered). Bounded: a vote whose turn comes after the
 * planned end plus `graceMs` is not sent, and an option whose vote failed or timed out gets
 * no further votes (a late commit of the failed one would make the per-option count
 * ambiguous).
 */
async function castVotes({ port, agent, poll, tokens, rate, options, log, graceMs = 5_000 }) {
  const n = tokens.length;
  const optIds = poll.options.map((o) => o.option_id);
  const lastOfOption = new Array(options).fill(Promise.resolve());
  const okPerOption = new Array(options).fill(0);
  const poisoned = new Array(options).fill(false);
  const votes = [];     // [option, j, ackTime]
  const lat = [];       // issue → ack, ms
  const statuses = {};
  let skipped = 0;
  let sent = 0;
  const t0 = nowMs();
  const lastDue = t0 + (n * 1000) / rate;
  const pending = [];
  const ticker = log && setInterval(() => log(`  ${sent} votes sent, ${lat.length} recorded, ${skipped} skipped, statuses ${JSON.stringify(statuses)}`), 5000);
  for (let k = 0; k < n; k++) {
    const due = t0 + (k * 1000) / rate;
    const wait = due - nowMs();
    if (wait > 1) await sleep(wait);
    const o = k % options;
    const p = lastOfOption[o].then(async () => {
      if (poisoned[o] || nowMs() > lastDue + graceMs) { skipped++; return; }
      sent++;
      const start = nowMs();
      const r = await request(port, agent, 'POST', `/v1/polls/${poll.poll_id}/votes`, tokens[k], { option_id: optIds[o] });
      const ack = nowMs();
      statuses[r.status] = (statuses[r.status] || 0) + 1;
      if (r.status === 200) {
        okPerOption[o]++;
        votes.push([o, okPerOption[o], ack]);
        lat.push(ack - start);
      } else {
        poisoned[o] = true;
      }
    });
    lastOfOption[o] = p;
    pending.push(p);
  }
  await Promise.all(pending);
  const t1 = nowMs();
  clearInterval(ticker);
  lat.sort((a, b) => a - b);
  const q = (x) => (lat.length ? lat[Math.min(lat.length - 1, Math.ceil(x * lat.length) - 1)] : NaN);
  return { votes, statuses, skipped, planned: n, t0, t1, achievedRate: (votes.length * 1000) / (t1 - t0),
    voteLatency: { p50: q(0.5), p99: q(0.99), max: lat[lat.length - 1] } };
}

async function parent() {
  const o = parseArgs();
  if (!fs.existsSync(o.bin)) { console.error(`bench-live: no server binary at ${o.bin} (run make)`); process.exit(1); }
  const started = nowMs();
  const log = (...a) => console.log(`[${((nowMs() - started) / 1000).toFixed(1).padStart(5)} s]`, ...a);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-live-'));
  const secret = crypto.randomBytes(24).toString('hex');
  const port = await freePort();
  const children = [];
  let server = null;
  let cleaning = false;

  const cleanup = async (code) => {
    if (cleaning) return;
    cleaning = true;
    for (const c of children) {
      try { c.send({ type: 'exit' }); } catch { /* gone */ }
    }
    await sleep(300);
    for (const c of children) if (c.exitCode === null && c.signalCode === null) { try { process.kill(c.pid, 'SIGKILL'); } catch { /* gone */ } }
    if (server && server.exitCode === null && server.signalCode === null) {
      try { process.kill(server.pid, 'SIGTERM'); } catch { /* gone */ }
      const until = nowMs() + 10_000;
      while (server.exitCode === null && server.signalCode === null && nowMs() < until) await sleep(100);
      if (server.exitCode === null && server.signalCode === null) { try { process.kill(server.pid, 'SIGKILL'); } catch { /* gone */ } }
    }
    fs.rmSync(dataDir, { recursive: true, force: true });
    process.exit(code);
  };
  const watchdog = setTimeout(() => {
    console.error(`bench-live: stopped by the watchdog after ${o.maxSeconds} s`);
    cleanup(1);
  }, o.maxSeconds * 1000);
  process.on('SIGINT', () => cleanup(130));
  process.on('SIGTERM', () => cleanup(143));

  try {
    // ---- server -------------------------------------------------------------------------
    const args = ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--secret', secret,
      '--log-level', 'warn', '--live-max', '20000', '--live-max-per-ip', '20000', '--live-tick', String(o.tick),
      // the default --max-connections (19000) would leave no room for the voters' connections
      '--max-connections', '19900', '--max-connections-per-ip', '0'];
    server = spawn(o.bin, args, { env: { ...process.env, TALLY_RATE_LIMITS: 'off' }, stdio: ['ignore', 'inherit', 'inherit'] });
    server.on('exit', (code, sig) => { if (!cleaning) { console.error(`bench-live: tally exited (code ${code}, signal ${sig})`); cleanup(1); } });
    const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
    for (let i = 0; ; i++) {
      const r = await request(port, agent, 'GET', '/healthz');
      if (r.status === 200) break;
      if (i > 100) throw new Error('tally did not become healthy in 10 s');
      await sleep(100);
    }
    const limits = fs.readFileSync(`/proc/${server.pid}/limits`, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
    log(`tally pid ${server.pid} on 127.0.0.1:${port}; ${limits.replace(/\s+/g, ' ').trim()}`);

    const owner = mint(secret, `owner-${crypto.randomBytes(4).toString('hex')}`);
    const mkPoll = async (title) => {
      const r = await request(port, agent, 'POST', '/v1/polls', owner, {
        title, options: Array.from({ length: o.options }, (_, i) => ({ text: `Option ${i + 1}` })),
      });
      if (r.status !== 201) throw new Error(`create poll: ${r.status} ${r.text}`);
      return r.json;
    };
    const poll = await mkPoll('Live benchmark');
    const basePoll = await mkPoll('Baseline (no subscribers)');
    const baseTokens = Array.from({ length: Math.round(o.rate * o.baselineSeconds) }, (_, i) => mint(secret, `base-${i}`));
    const tokens = Array.from({ length: Math.round(o.rate * o.seconds) }, (_, i) => mint(secret, `voter-${i}`));

    // ---- baseline: the same vote rate with nobody watching ------------------------------
    const cpuB0 = cpuMs(server.pid);
    const base = await castVotes({ port, agent, poll: basePoll, tokens: baseTokens, rate: o.rate, options: o.options });
    const cpuB1 = cpuMs(server.pid);
    const cpuPerVote = (cpuB1 - cpuB0) / base.votes.length;
    log(`baseline: ${base.votes.length} votes at ${base.achievedRate.toFixed(0)}/s, no subscribers: server CPU ` +
      `${(cpuPerVote * 1000).toFixed(0)} µs/vote; vote latency p50 ${base.voteLatency.p50.toFixed(1)} ms, p99 ${base.voteLatency.p99.toFixed(1)} ms`);

    // ---- subscribers ----------------------------------------------------------------------
    await sleep(500);
    const rss0 = rssKiB(server.pid);
    const cpu0 = cpuMs(server.pid);
    const per = Math.floor(o.subscribers / o.procs);
    const counts = Array.from({ length: o.procs }, (_, i) => per + (i < o.subscribers - per * o.procs ? 1 : 0));
    const progress = new Map();
    const ready = [];
    for (let i = 0; i < o.procs; i++) {
      const c = fork(fileURLToPath(import.meta.url), ['--child'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      children.push(c);
      c.on('exit', (code, sig) => { if (!cleaning && code !== 0) { console.error(`bench-live: client ${i} exited (${code}, ${sig})`); cleanup(1); } });
      ready.push(new Promise((resolve) => {
        c.on('message', (m) => {
          if (m.type === 'hello') { try { c.send({ type: 'start', port, pollId: poll.poll_id, count: counts[i], batch: o.batch, wsShare: o.wsShare }); } catch { /* gone */ } }
          else if (m.type === 'progress') progress.set(i, m);
          else if (m.type === 'ready') { progress.set(i, m); resolve(m); }
        });
      }));
    }
    const tSub0 = nowMs();
    const ticker = setInterval(() => {
      let connected = 0; let failed = 0;
      for (const m of progress.values()) { connected += m.connected; failed += m.failed; }
      log(`subscribing: ${connected} connected, ${failed} failed`);
    }, 5000);
    const readies = await Promise.all(ready);
    clearInterval(ticker);
    const tSub1 = nowMs();
    const connected = readies.reduce((s, m) => s + m.connected, 0);
    const wsCount = readies.reduce((s, m) => s + m.ws, 0);
    const firsts = readies.reduce((s, m) => s + m.firsts, 0);
    const failedSubs = readies.reduce((s, m) => s + m.failed, 0);
    const failures = {};
    for (const m of readies) for (const [k, v] of Object.entries(m.failures)) failures[k] = (failures[k] || 0) + v;
    log(`subscribed: ${connected} of ${o.subscribers} in ${((tSub1 - tSub0) / 1000).toFixed(1)} s ` +
      `(${firsts} had their first message; ${failedSubs} failed${failedSubs ? ' ' + JSON.stringify(failures) : ''}); ` +
      `server fds ${fdCount(server.pid)}`);
    if (connected < o.subscribers) throw new Error(`only ${connected} of ${o.subscribers} subscribers connected`);

    await sleep(2000);
    const rss1 = rssKiB(server.pid);
    const cpu1 = cpuMs(server.pid);
    await sleep(5000); // idle hold
    const cpu2 = cpuMs(server.pid);
    log(`holding ${connected}: RSS ${rss0} → ${rss1} KiB; idle 5 s: ${(cpu2 - cpu1).toFixed(0)} ms CPU`);

    // ---- votes while everyone watches ------------------------------------------------------
    const cpuV0 = cpuMs(server.pid);
    log(`voting: ${tokens.length} votes at ${o.rate}/s over ${o.options} options`);
    const run = await castVotes({ port, agent, poll, tokens, rate: o.rate, options: o.options, log });
    const finalTotal = run.votes.length;
    log(`votes done in ${((run.t1 - run.t0) / 1000).toFixed(1)} s: ${finalTotal} of ${run.planned} recorded ` +
      `(${run.achievedRate.toFixed(0)}/s), ${run.skipped} not sent (behind schedule or after a failure), statuses ` +
      `${JSON.stringify(run.statuses)}; vote latency p50 ${run.voteLatency.p50.toFixed(1)} ms, p99 ${run.voteLatency.p99.toFixed(1)} ms`);
    // wait (at most 10 s) until every subscriber has the final count
    const doneBy = new Map();
    const allDone = new Promise((resolve) => {
      for (const [i, c] of children.entries()) {
        c.on('message', (m) => {
          if (m.type !== 'target') return;
          doneBy.set(i, m);
          let d = 0;
          for (const x of doneBy.values()) d += x.done;
          if (d >= connected) resolve(true);
        });
        try { c.send({ type: 'target', total: finalTotal }); } catch { /* gone */ }
      }
      setTimeout(() => resolve(false), 10_000);
    });
    const complete = await allDone;
    const tDone = nowMs();
    const cpuV1 = cpuMs(server.pid);
    const rss2 = rssKiB(server.pid);
    let doneCount = 0;
    for (const x of doneBy.values()) doneCount += x.done;
    log(`${complete ? 'all' : 'NOT all'} subscribers have total_votes ${finalTotal} ` +
      `${(tDone - run.t1).toFixed(0)} ms after the last vote (${doneCount} of ${connected})`);

    // ---- collect --------------------------------------------------------------------------
    const collected = await Promise.all(children.map((c) => new Promise((resolve) => {
      c.on('message', (m) => { if (m.type === 'collected') resolve(m); });
      try { c.send({ type: 'collect', votes: run.votes, windowFrom: run.t0, windowTo: run.t1, options: o.options }); } catch { resolve(null); }
    })));
    const all = newHist(); const sse = newHist(); const ws = newHist();
    let missing = 0; let msgsWindow = 0; let msgsSince = 0; let msgsTotal = 0; let closedConns = 0; let unknownSeq = 0;
    for (const m of collected) {
      histMerge(all, m.hist.sse); histMerge(all, m.hist.ws);
      histMerge(sse, m.hist.sse); histMerge(ws, m.hist.ws);
      missing += m.missing; msgsWindow += m.msgsInWindow; msgsSince += m.msgsSince; msgsTotal += m.msgsTotal; closedConns += m.closed; unknownSeq += m.unknownSeq;
    }
    const windowS = (run.t1 - run.t0) / 1000;
    const msgsPerS = msgsWindow / windowS;
    const cpuVote = cpuV1 - cpuV0;
    const fmt = (h) => `p50 ${histQuantile(h, 0.5).toFixed(0)} ms, p99 ${histQuantile(h, 0.99).toFixed(0)} ms, max ${h.max.toFixed(0)} ms`;
    const result = {
      subscribers: connected, sse: connected - wsCount, ws: wsCount, procs: o.procs,
      tick_ms: o.tick, options: o.options, votes: finalTotal, votes_planned: run.planned, votes_not_sent: run.skipped,
      vote_statuses: run.statuses, vote_rate: +run.achievedRate.toFixed(1), vote_rate_planned: o.rate,
      vote_latency_ms: { baseline_p50: +base.voteLatency.p50.toFixed(2), baseline_p99: +base.voteLatency.p99.toFixed(2),
        p50: +run.voteLatency.p50.toFixed(2), p99: +run.voteLatency.p99.toFixed(2), max: +run.voteLatency.max.toFixed(2) },
      delivery_ms: { pairs: all.n, missing, negative: all.under, p50: +histQuantile(all, 0.5).toFixed(1),
        p99: +histQuantile(all, 0.99).toFixed(1), p999: +histQuantile(all, 0.999).toFixed(1), max: +all.max.toFixed(1),
        mean: +(all.sum / all.n).toFixed(1),
        sse: { p50: +histQuantile(sse, 0.5).toFixed(1), p99: +histQuantile(sse, 0.99).toFixed(1), max: +sse.max.toFixed(1) },
        ws: { p50: +histQuantile(ws, 0.5).toFixed(1), p99: +histQuantile(ws, 0.99).toFixed(1), max: +ws.max.toFixed(1) } },
      final_count_all_within_10s: complete, final_count_after_ms: +(tDone - run.t1).toFixed(0),
      messages: { during_votes: msgsWindow, per_s: +msgsPerS.toFixed(0), total: msgsTotal, closed_connections: closedConns, unknown_seq: unknownSeq },
      server: {
        rss_kib_before: rss0, rss_kib_subscribed: rss1, rss_kib_after_votes: rss2,
        kib_per_subscriber: +((rss1 - rss0) / connected).toFixed(2),
        kib_per_subscriber_after_votes: +((rss2 - rss0) / connected).toFixed(2),
        cpu_ms_connect: +(cpu1 - cpu0).toFixed(0), cpu_us_per_subscribe: +(((cpu1 - cpu0) * 1000) / connected).toFixed(1),
        cpu_ms_idle_5s: +(cpu2 - cpu1).toFixed(0),
        cpu_ms_voting: +cpuVote.toFixed(0), cpu_us_per_vote_baseline: +(cpuPerVote * 1000).toFixed(1),
        messages_measured_for_cpu: msgsSince,
        cpu_us_per_message: +((cpuVote * 1000) / Math.max(1, msgsSince)).toFixed(2),
        cpu_us_per_message_net_of_votes: +(((cpuVote - cpuPerVote * finalTotal) * 1000) / Math.max(1, msgsSince)).toFixed(2),
        cpu_share_voting: +(cpuVote / (tDone - run.t0)).toFixed(2),
      },
      targets: {}, command: `node bench/live.mjs ${process.argv.slice(2).join(' ')}`.trim(),
    };
    result.targets.p99_le_1s = result.delivery_ms.p99 <= 1000 && missing === 0;
    // ... which says little if the server could not take the votes at the planned rate
    result.targets.vote_rate_sustained = finalTotal >= 0.95 * run.planned;
    result.targets.kib_per_subscriber_le_16 = Math.max(result.server.kib_per_subscriber, result.server.kib_per_subscriber_after_votes) <= 16;

    console.log('');
    console.log(`live results: ${connected} subscribers (${result.sse} SSE + ${result.ws} WS over ${o.procs} client processes), ` +
      `tick ${o.tick} ms, ${finalTotal} of ${run.planned} planned votes recorded, at ${run.achievedRate.toFixed(0)}/s ` +
      `(planned ${o.rate}/s) on ${o.options} options`);
    console.log(`  vote-ack → delivery, all ${all.n} (vote, subscriber) pairs: ${fmt(all)}` +
      `${missing ? `; ${missing} pairs NEVER delivered` : ''}${all.under ? ` (${all.under} delivered before the ack was read)` : ''}`);
    console.log(`      SSE: ${fmt(sse)};  WS: ${fmt(ws)}`);
    console.log(`  every subscriber had the final count ${(tDone - run.t1).toFixed(0)} ms after the last vote's 200` +
      `${complete ? '' : ' (NOT all within 10 s)'}`);
    console.log(`  messages delivered while voting: ${msgsWindow} in ${windowS.toFixed(1)} s = ${msgsPerS.toFixed(0)}/s ` +
      `(${(msgsWindow / connected / windowS).toFixed(2)} per subscriber per second)`);
    console.log(`  vote latency (issue → 200): p50 ${run.voteLatency.p50.toFixed(1)} ms, p99 ${run.voteLatency.p99.toFixed(1)} ms ` +
      `(no subscribers: p50 ${base.voteLatency.p50.toFixed(1)} ms, p99 ${base.voteLatency.p99.toFixed(1)} ms)`);
    console.log(`  server RSS: ${rss0} KiB before, ${rss1} KiB subscribed (${result.server.kib_per_subscriber} KiB/subscriber), ` +
      `${rss2} KiB after the votes (${result.server.kib_per_subscriber_after_votes} KiB/subscriber)`);
    console.log(`  server CPU: ${result.server.cpu_us_per_subscribe} µs per subscribe; ${result.server.cpu_ms_idle_5s} ms in 5 s idle; ` +
      `${result.server.cpu_ms_voting} ms while voting = ${result.server.cpu_us_per_message} µs per delivered message ` +
      `(${result.server.cpu_us_per_message_net_of_votes} µs net of the ${result.server.cpu_us_per_vote_baseline} µs/vote baseline)`);
    console.log(`  targets: delivery p99 ≤ 1 s: ${result.targets.p99_le_1s ? 'met' : 'NOT met'} (${result.delivery_ms.p99} ms); ` +
      `≤ 16 KiB per subscriber: ${result.targets.kib_per_subscriber_le_16 ? 'met' : 'NOT met'}; planned vote rate ` +
      `${result.targets.vote_rate_sustained ? 'sustained' : `NOT sustained (${run.achievedRate.toFixed(0)} of ${o.rate}/s)`}`);
    console.log(`  machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model?.trim()}), ${Math.round(os.totalmem() / 2 ** 30)} GiB; ` +
      `tally, ${o.procs} client processes and the voter share it`);
    console.log(`RESULT ${JSON.stringify(result)}`);
    if (o.json) fs.writeFileSync(o.json, JSON.stringify(result, null, 2) + '\n');
    clearTimeout(watchdog);
    await cleanup(0);
  } catch (e) {
    console.error(`bench-live: ${e.stack || e.message}`);
    await cleanup(1);
  }
}

if (process.argv.includes('--child')) child();
else parent();
