// Test harness for the tally HTTP API tests: starts the real binary on a free port with a
// temporary data directory, and offers request helpers (fetch, node:http with an agent,
// raw sockets) and assertion helpers shared by the *.test.mjs files.
//
// Only 127.0.0.1 is ever contacted.
//
// The store: SQLite in the data directory by default. With TALLY_TEST_PG set to a
// PostgreSQL URI on which CREATE DATABASE works (scripts/services.sh starts one; `make
// test-api-pg`), every server started on a fresh data directory gets a fresh database of
// its own (`--store postgres://.../tally_t_<pid>_<random>`); a restart on the same data
// directory, or startServer({dataDir}) with a directory seen before, reuses it. The
// databases are dropped when their server is closed or the test process exits.
// `STORE` says which ('sqlite' or 'postgres') for the rare test that must know.

import { spawn, execFile, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { checkResponse, loadOpenApi } from './openapi.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.TALLY_BIN || path.resolve(here, '../../build/tally');

export const ISO_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
export const URL_SAFE = /^[A-Za-z0-9_-]+$/;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const rand = (n = 6) => crypto.randomBytes(n).toString('hex');
/** RFC 3339 UTC with milliseconds, `ms` from now. */
export const isoIn = (ms) => new Date(Date.now() + ms).toISOString();

// ---------------------------------------------------------------------------------------
// processes

const live = new Set(); // children still running, killed on exit as a safety net
const tempDirs = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
  for (const dir of tempDirs) {
    try { fs.rmSync(dir, { recursive: true, force: true }); } catch { /* ignore */ }
  }
  dropAllDatabasesSync();
});

// ---------------------------------------------------------------------------------------
// the store: SQLite (default) or one PostgreSQL database per data directory

export const PG_BASE = process.env.TALLY_TEST_PG || '';
export const STORE = PG_BASE ? 'postgres' : 'sqlite';
const pgDatabases = new Map(); // resolved data dir -> { name, uri }
const PSQL = ['-X', '-q', '-v', 'ON_ERROR_STOP=1'];

/** PG_BASE with its database replaced by `name`. */
function pgUri(name) {
  const u = new URL(PG_BASE);
  u.pathname = '/' + name;
  return u.toString();
}

function psql(sql) {
  return new Promise((resolve, reject) => {
    execFile('psql', [...PSQL, '-d', PG_BASE, '-c', sql], { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`psql ${JSON.stringify(sql)} on ${PG_BASE} failed: ${err.message}\n${stderr}`));
      resolve(stdout);
    });
  });
}

/** The --store URI for a data directory: null for SQLite; a database of its own on PG. */
async function storeFor(dataDir) {
  if (!PG_BASE) return null;
  const key = path.resolve(dataDir);
  let db = pgDatabases.get(key);
  if (!db) {
    const name = `tally_t_${process.pid}_${crypto.randomBytes(5).toString('hex')}`;
    await psql(`CREATE DATABASE ${name}`);
    db = { name, uri: pgUri(name) };
    pgDatabases.set(key, db);
  }
  return db.uri;
}

async function dropDatabase(dataDir) {
  const key = path.resolve(dataDir);
  const db = pgDatabases.get(key);
  if (!db) return;
  pgDatabases.delete(key);
  try {
    await psql(`DROP DATABASE IF EXISTS ${db.name} WITH (FORCE)`);
  } catch (e) {
    process.stderr.write(`[harness] could not drop database ${db.name}: ${e.message}\n`);
  }
}

function dropAllDatabasesSync() {
  if (!PG_BASE || pgDatabases.size === 0) return;
  const args = [...PSQL, '-d', PG_BASE];
  for (const { name } of pgDatabases.values()) args.push('-c', `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  pgDatabases.clear();
  try { execFileSync('psql', args, { timeout: 30_000, stdio: 'ignore' }); } catch { /* the server may be gone */ }
}

/**
 * Everything the server's store holds, as [{name, bytes}] (for tests that look for text
 * that must never be stored): the files of the data directory, and on PostgreSQL a
 * plain-text pg_dump of the server's database besides.
 */
export function storeContents(server) {
  const out = [];
  for (const f of fs.readdirSync(server.dataDir)) {
    const full = path.join(server.dataDir, f);
    if (fs.statSync(full).isFile()) out.push({ name: f, bytes: fs.readFileSync(full) });
  }
  if (server.store) {
    const bytes = execFileSync('pg_dump', ['--no-owner', '--no-privileges', '-d', server.store],
      { timeout: 60_000, maxBuffer: 1 << 30 });
    out.push({ name: `pg_dump ${new URL(server.store).pathname.slice(1)}`, bytes });
  }
  return out;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function waitExit(child, ms) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once('exit', () => { clearTimeout(t); resolve(true); });
  });
}

async function healthy(url) {
  try {
    const res = await fetch(url + '/healthz', { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer();
    return res.status === 200;
  } catch {
    return false;
  }
}

/**
 * Starts `tally serve` on a free port with a fresh (or given) data directory.
 * opts: { args: [extra flags], env: {extra environment}, dataDir, secret, printLogs }
 * Returns { url, port, dataDir, secret, store, proc, stop(), kill9(), restart({samePort}), close(),
 *           token(sub, ttl?), mint(sub, opts?), logs() }.
 * `store` is the --store URI given (PostgreSQL, with TALLY_TEST_PG), or null (SQLite).
 */
export async function startServer(opts = {}) {
  if (!fs.existsSync(BIN)) throw new Error(`tally binary not found at ${BIN} (run make first)`);
  const dataDir = opts.dataDir || (await fsp.mkdtemp(path.join(os.tmpdir(), 'tally-api-')));
  if (!opts.dataDir) tempDirs.add(dataDir);
  const secret = opts.secret || crypto.randomBytes(24).toString('hex');
  const ownStore = (opts.args || []).some((a) => a === '--store' || a.startsWith('--store='));
  const store = ownStore ? null : await storeFor(dataDir);
  const server = {
    url: null, port: null, dataDir, secret, store, proc: null,
    _log: '', _expectedExit: false, _crashed: null,
  };

  const launch = async (samePort) => {
    const port = samePort ? server.port : await freePort();
    const args = ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--secret', secret,
      ...(store ? ['--store', store] : []), ...(opts.args || [])];
    const env = { ...process.env, TALLY_RATE_LIMITS: 'off', TALLY_POW_DIFFICULTY: '0', ...(opts.env || {}) };
    const child = spawn(BIN, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(child);
    server._expectedExit = false;
    const append = (d) => {
      server._log += d.toString();
      if (server._log.length > 200_000) server._log = server._log.slice(-100_000);
    };
    child.stdout.on('data', append);
    child.stderr.on('data', append);
    child.on('exit', (code, signal) => {
      live.delete(child);
      if (!server._expectedExit) {
        server._crashed = { code, signal };
        process.stderr.write(`\n[harness] tally exited unexpectedly (code ${code}, signal ${signal}); output:\n` +
          tail(server._log) + '\n');
      }
    });
    server.proc = child;
    server.port = port;
    server.url = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`tally serve exited during start (code ${child.exitCode}, signal ${child.signalCode}):\n` +
          tail(server._log));
      }
      if (await healthy(server.url)) return;
      await sleep(50);
    }
    child.kill('SIGKILL');
    throw new Error(`tally serve did not answer GET /healthz with 200 within 10 s:\n${tail(server._log)}`);
  };

  /** SIGTERM, wait for exit (SIGKILL after 5 s). Returns {code, signal, killed}. */
  server.stop = async () => {
    const child = server.proc;
    if (!child || child.exitCode !== null || child.signalCode !== null) {
      return { code: child?.exitCode ?? null, signal: child?.signalCode ?? null, killed: false };
    }
    server._expectedExit = true;
    child.kill('SIGTERM');
    let killed = false;
    if (!(await waitExit(child, 5000))) {
      killed = true;
      child.kill('SIGKILL');
      await waitExit(child, 5000);
    }
    return { code: child.exitCode, signal: child.signalCode, killed };
  };
  /** SIGKILL (crash), wait for exit. */
  server.kill9 = async () => {
    const child = server.proc;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    server._expectedExit = true;
    child.kill('SIGKILL');
    await waitExit(child, 5000);
  };
  /** Stops (if running) and starts again with the same data dir and secret, on a new
   *  port, or with {samePort: true} on the same one (what a client that reconnects needs). */
  server.restart = async ({ samePort = false } = {}) => {
    await server.stop();
    await launch(samePort);
    return server;
  };
  /** Stops the server and removes its data directory; prints its log when asked to. */
  server.close = async () => {
    const r = await server.stop();
    // Under `make check-asan` the server is a sanitizer build: any report it printed is a
    // bug even when every request got the right answer.
    const report = /(AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:)/.exec(server._log);
    if (report) {
      throw new Error(`tally printed a sanitizer report:\n${tail(server._log, 8000)}`);
    }
    if (r.code !== 0 && r.code !== null && !r.killed) {
      throw new Error(`tally exited with code ${r.code} after SIGTERM:\n${tail(server._log)}`);
    }
    if (opts.printLogs || process.env.TALLY_TEST_LOGS) {
      process.stderr.write(`[harness] tally output:\n${tail(server._log)}\n`);
    }
    if (r.killed) process.stderr.write('[harness] tally did not exit within 5 s of SIGTERM; killed it\n');
    if (!opts.dataDir) {
      await fsp.rm(dataDir, { recursive: true, force: true });
      tempDirs.delete(dataDir);
      await dropDatabase(dataDir);
    }
    return r;
  };
  server.logs = () => tail(server._log);
  /** A token from `tally token` (the binary), for subject `sub`. */
  server.token = (sub, ttl) => new Promise((resolve, reject) => {
    const args = ['token', '--data-dir', dataDir, '--secret', secret, '--sub', sub];
    if (ttl !== undefined) args.push('--ttl', String(ttl));
    execFile(BIN, args, { timeout: 10_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`tally token failed: ${err.message}\n${stderr}`));
      const tok = stdout.trim();
      if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(tok)) {
        return reject(new Error(`tally token printed something that is not a JWT: ${JSON.stringify(stdout)}`));
      }
      resolve(tok);
    });
  });
  /** A token minted in-process with the server secret (for many voters). */
  server.mint = (sub, o = {}) => mintToken(secret, sub, o);

  await launch();
  return server;
}

export function tail(s, n = 4000) {
  return s.length > n ? '…' + s.slice(-n) : s;
}

// ---------------------------------------------------------------------------------------
// tokens

export const b64url = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');

/** header and payload are objects (or pre-encoded strings); key a string/Buffer. */
export function signJwt(header, payload, key) {
  const h = b64url(typeof header === 'string' ? header : JSON.stringify(header));
  const p = b64url(typeof payload === 'string' ? payload : JSON.stringify(payload));
  const sig = crypto.createHmac('sha256', key).update(`${h}.${p}`).digest('base64url');
  return `${h}.${p}.${sig}`;
}

export function mintToken(secret, sub, { ttl = 3600, anon = false } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const payload = { sub, iat: now, exp: now + ttl };
  if (anon) payload.anon = true;
  return signJwt({ alg: 'HS256', typ: 'JWT' }, payload, secret);
}

// ---------------------------------------------------------------------------------------
// requests

function buildHeaders({ body, token, headers, raw }) {
  const h = {};
  for (const [k, v] of Object.entries(headers || {})) h[k.toLowerCase()] = v;
  let payload;
  if (raw !== undefined) {
    payload = raw;
    if (!('content-type' in h)) h['content-type'] = 'application/json';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    if (!('content-type' in h)) h['content-type'] = 'application/json';
  }
  if (token) h.authorization = `Bearer ${token}`;
  return { h, payload };
}

/**
 * Every response api() and request() receive is checked against docs/openapi.yaml
 * (openapi.mjs): one the document does not describe fails the test that got it. With
 * TALLY_OPENAPI_REPORT=FILE the findings are appended to FILE (one JSON line each)
 * instead, to see them all after a run of the whole suite.
 */
loadOpenApi(); // parsed and compiled at import, so no test's timing pays for it

function documented(server, res) {
  const problem = checkResponse(res.method, res.path, res);
  if (!problem) return;
  if (process.env.TALLY_OPENAPI_REPORT) {
    fs.appendFileSync(process.env.TALLY_OPENAPI_REPORT, JSON.stringify({ problem }) + '\n');
    return;
  }
  throw new Error(`docs/openapi.yaml does not describe this response: ${problem}`);
}

function parseJson(text) {
  if (!text) return null;
  try { return JSON.parse(text); } catch { return null; }
}

/**
 * One request with the global fetch.
 * Returns {status, headers (Headers), json (parsed or null), text, method, path}.
 */
export async function api(server, method, urlPath, { body, token, headers, raw, timeout = 30_000 } = {}) {
  const { h, payload } = buildHeaders({ body, token, headers, raw });
  let res;
  try {
    res = await fetch(server.url + urlPath, {
      method, headers: h, body: payload, redirect: 'manual', signal: AbortSignal.timeout(timeout),
    });
  } catch (e) {
    const cause = e.cause ? ` (${e.cause.code || ''} ${e.cause.message || e.cause})` : '';
    const err = new Error(`${method} ${urlPath}: request failed: ${e.message}${cause}\n` +
      `server output tail:\n${server.logs ? server.logs() : ''}`);
    err.cause = e;
    throw err;
  }
  const text = await res.text();
  const out = { status: res.status, headers: res.headers, json: parseJson(text), text, method, path: urlPath };
  documented(server, out);
  return out;
}

/**
 * The same with node:http (for an http.Agent with keepAlive / maxSockets).
 * Returns the same shape as api(), plus `reusedSocket`, `localPort`.
 */
export function request(server, method, urlPath, { body, token, headers, raw, agent, timeout = 60_000 } = {}) {
  const { h, payload } = buildHeaders({ body, token, headers, raw });
  if (payload !== undefined) h['content-length'] = Buffer.byteLength(payload);
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port: server.port, method, path: urlPath, headers: h, agent,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        const hd = new Headers();
        for (let i = 0; i < res.rawHeaders.length; i += 2) hd.append(res.rawHeaders[i], res.rawHeaders[i + 1]);
        const out = {
          status: res.statusCode, headers: hd, json: parseJson(text), text, method, path: urlPath,
          reusedSocket: req.reusedSocket, localPort: req.socket?.localPort,
        };
        try { documented(server, out); } catch (e) { reject(e); return; }
        resolve(out);
      });
    });
    req.setTimeout(timeout, () => req.destroy(new Error(`${method} ${urlPath}: timed out after ${timeout} ms`)));
    req.on('error', (e) => reject(new Error(`${method} ${urlPath}: ${e.message}`)));
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

// ---------------------------------------------------------------------------------------
// raw sockets

/**
 * Parses as many complete HTTP/1.x responses as `buf` holds. With atEof, a response
 * without a length ends at the end of the stream.
 */
export function parseResponses(buf, atEof = false) {
  const out = [];
  let off = 0;
  while (off < buf.length) {
    const headEnd = buf.indexOf('\r\n\r\n', off, 'latin1');
    if (headEnd < 0) break;
    const lines = buf.subarray(off, headEnd).toString('latin1').split('\r\n');
    const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(lines[0]);
    if (!m) {
      out.push({ status: -1, bad: lines[0], headers: {}, body: Buffer.alloc(0), text: '', json: null });
      off = buf.length;
      break;
    }
    const status = Number(m[1]);
    const headers = {};
    for (const line of lines.slice(1)) {
      const i = line.indexOf(':');
      if (i < 0) continue;
      const k = line.slice(0, i).trim().toLowerCase();
      const v = line.slice(i + 1).trim();
      headers[k] = k in headers ? `${headers[k]}, ${v}` : v;
    }
    let pos = headEnd + 4;
    if (status >= 100 && status < 200) { off = pos; continue; }
    let body;
    if (/chunked/i.test(headers['transfer-encoding'] || '')) {
      const parts = [];
      let complete = false;
      for (;;) {
        const le = buf.indexOf('\r\n', pos, 'latin1');
        if (le < 0) break;
        const size = parseInt(buf.subarray(pos, le).toString('latin1'), 16);
        if (Number.isNaN(size)) break;
        if (size === 0) {
          const end = buf.indexOf('\r\n\r\n', le, 'latin1');
          // no trailers: "0\r\n\r\n"
          if (buf.subarray(le, le + 4).toString('latin1') === '\r\n\r\n') { pos = le + 4; complete = true; }
          else if (end >= 0) { pos = end + 4; complete = true; }
          break;
        }
        if (buf.length < le + 2 + size + 2) break;
        parts.push(buf.subarray(le + 2, le + 2 + size));
        pos = le + 2 + size + 2;
      }
      if (!complete) break;
      body = Buffer.concat(parts);
    } else if ('content-length' in headers) {
      const n = Number(headers['content-length']);
      if (buf.length < pos + n) break;
      body = buf.subarray(pos, pos + n);
      pos += n;
    } else if (status === 204 || status === 304) {
      body = Buffer.alloc(0);
    } else {
      if (!atEof) break;
      body = buf.subarray(pos);
      pos = buf.length;
    }
    const text = body.toString('utf8');
    out.push({ status, reason: m[2] || '', headers, body, text, json: parseJson(text) });
    off = pos;
  }
  return out;
}

/**
 * Sends exact bytes on a fresh connection and reads responses.
 * data: string (sent as UTF-8 unless it is latin1-only), Buffer, or an array of those
 * written in order (with `gapMs` between them).
 * Resolves when `responses` complete responses arrived, or the server closed the
 * connection, or `timeout` ms passed: {responses, raw, closed, timedOut, error}.
 */
export function rawRequest(server, data, { responses = 1, timeout = 5000, gapMs = 0, waitClose = false } = {}) {
  const pieces = (Array.isArray(data) ? data : [data]).map((d) => (Buffer.isBuffer(d) ? d : Buffer.from(d, 'utf8')));
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port: server.port });
    const chunks = [];
    let done = false;
    let error = null;
    let closed = false;
    const finish = (timedOut) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      const raw = Buffer.concat(chunks);
      sock.destroy();
      resolve({ responses: parseResponses(raw, closed), raw, closed, timedOut, error });
    };
    const timer = setTimeout(() => finish(true), timeout);
    sock.on('data', (c) => {
      chunks.push(c);
      if (!waitClose && parseResponses(Buffer.concat(chunks)).length >= responses) finish(false);
    });
    sock.on('error', (e) => { error = e.code || e.message; });
    sock.on('end', () => { closed = true; });
    sock.on('close', () => { closed = true; finish(false); });
    sock.on('connect', async () => {
      for (const p of pieces) {
        if (done || sock.destroyed) break;
        await new Promise((r) => sock.write(p, () => r()));
        if (gapMs) await sleep(gapMs);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------
// assertions and domain helpers

export function describe(res) {
  const h = res.headers instanceof Headers ? Object.fromEntries(res.headers) : res.headers;
  return `${res.method || ''} ${res.path || ''} → ${res.status} ${JSON.stringify(h)}\n${(res.text || '').slice(0, 1500)}`;
}

/** Asserts status, JSON content type, and the error envelope (code, message, field). */
export function assertError(res, status, code, { field, fieldMatch } = {}) {
  assert.equal(res.status, status, `expected ${status} ${code}, got: ${describe(res)}`);
  const ct = res.headers instanceof Headers ? res.headers.get('content-type') : res.headers['content-type'];
  assert.ok(ct && ct.startsWith('application/json'), `error response must be application/json; got ${ct}: ${describe(res)}`);
  assert.ok(res.json && typeof res.json === 'object' && res.json.error && typeof res.json.error === 'object',
    `expected {"error":{...}} envelope: ${describe(res)}`);
  assert.equal(res.json.error.code, code, `expected error.code ${code}: ${describe(res)}`);
  assert.equal(typeof res.json.error.message, 'string', `error.message must be a string: ${describe(res)}`);
  assert.ok(res.json.error.message.length > 0, `error.message must not be empty: ${describe(res)}`);
  if (field !== undefined) assert.equal(res.json.error.field, field, `expected error.field ${field}: ${describe(res)}`);
  if (fieldMatch !== undefined) {
    assert.match(String(res.json.error.field), fieldMatch, `expected error.field matching ${fieldMatch}: ${describe(res)}`);
  }
  return res.json.error;
}

export function assertStatus(res, status, msg = '') {
  assert.equal(res.status, status, `${msg}${msg ? ': ' : ''}expected ${status}, got: ${describe(res)}`);
  return res.json;
}

export function assertIso(v, what) {
  assert.equal(typeof v, 'string', `${what} must be an RFC 3339 string, got ${JSON.stringify(v)}`);
  assert.match(v, ISO_MS, `${what} must be RFC 3339 UTC with milliseconds, got ${v}`);
  assert.ok(!Number.isNaN(Date.parse(v)), `${what} must be a valid time, got ${v}`);
}

/** Creates a poll (3 options A, B, C by default) and returns the poll object. */
export async function createPoll(server, token, overrides = {}) {
  const body = { title: `Poll ${rand()}`, options: [{ text: 'A' }, { text: 'B' }, { text: 'C' }], ...overrides };
  const res = await api(server, 'POST', '/v1/polls', { token, body });
  assertStatus(res, 201, 'creating a poll');
  return res.json;
}

export function castVote(server, token, pollId, body, headers) {
  return api(server, 'POST', `/v1/polls/${pollId}/votes`, { token, body, headers });
}

export function results(server, pollId, token) {
  return api(server, 'GET', `/v1/polls/${pollId}/results`, { token });
}

export function optionByText(poll, text) {
  const o = poll.options.find((x) => x.text === text);
  assert.ok(o, `poll has no option ${text}: ${JSON.stringify(poll.options)}`);
  return o.option_id;
}
