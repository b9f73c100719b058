#!/usr/bin/env node
// bench/pow.mjs: what an anonymous device token's proof of work costs (`make bench-pow`).
//
//   node bench/pow.mjs [--difficulties 14,16,18] [--runs 8]
//                      [--chromium /usr/bin/chromium] [--json out.json]
//
// 1. Node: SHA-256 hashes per second of `challenge ":" nonce` with crypto.createHash, the
//    way the API tests (and a script minting tokens) solve challenges, on one thread.
// 2. The browser: headless Chromium (Debian's, driven by playwright-core from
//    tests/node_modules) loads a page that starts the web app's own worker,
//    web/js/pow-worker.js, as the app does, and times --runs solves per difficulty, worker
//    start included, for a fresh random challenge each. (Chromium's CPU throttling, the
//    usual stand-in for a phone, does not slow a worker's crypto.subtle hashing in step:
//    tried at 4x, the rates moved by less than the run-to-run noise. A phone is not
//    emulated here; docs/PERFORMANCE.md says what is assumed for one.)
//
// Prints, per difficulty, the mean and the slowest solve, the mean hashes tried and the
// hashes per second (hashes tried / time). The expected hashes at difficulty d are 2^d;
// the number tried varies a lot from solve to solve (a geometric distribution), so read
// the rate, which does not, and multiply it out. Only 127.0.0.1 is contacted; the page
// is served from a throwaway HTTP server on a free loopback port.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(here, '..');
const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const difficulties = (args.difficulties || '14,16,18').split(',').map(Number);
const runs = Number(args.runs || 8);
const chromiumPath = args.chromium || process.env.CHROMIUM || '/usr/bin/chromium';

function nodeRate(seconds = 3) {
  const challenge = `${Math.floor(Date.now() / 1000) + 300}.${crypto.randomBytes(9).toString('base64url')}.14.${crypto.randomBytes(16).toString('base64url')}`;
  let n = 0;
  const t0 = process.hrtime.bigint();
  const until = t0 + BigInt(seconds * 1e9);
  let sink = 0;
  while (process.hrtime.bigint() < until) {
    for (let i = 0; i < 10000; i++, n++) sink ^= crypto.createHash('sha256').update(`${challenge}:${n.toString(36)}`).digest()[0];
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return { hashes: n, seconds: s, rate: n / s, sink };
}

const PAGE = `<!doctype html><meta charset="utf-8"><title>pow bench</title><script type="module">
window.solveOnce = (challenge, difficulty) => new Promise((resolve, reject) => {
  const t0 = performance.now();
  const w = new Worker('/js/pow-worker.js', { type: 'module' });
  w.onmessage = (e) => { w.terminate(); if (e.data.error) reject(new Error(e.data.error));
    else resolve({ ms: performance.now() - t0, hashes: parseInt(e.data.nonce, 36) + 1 }); };
  w.onerror = (e) => { w.terminate(); reject(new Error(e.message)); };
  w.postMessage({ challenge, difficulty });
});
</script>`;

async function browserRates() {
  const { chromium } = await import(path.join(ROOT, 'tests/node_modules/playwright-core/index.mjs'));
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      return res.end(PAGE);
    }
    const file = path.join(ROOT, 'web', path.normalize(url.pathname));
    if (!file.startsWith(path.join(ROOT, 'web') + path.sep) || !fs.existsSync(file)) {
      res.writeHead(404);
      return res.end();
    }
    res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
    res.end(fs.readFileSync(file));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  // "localhost": crypto.subtle needs a secure context, which localhost is
  const url = `http://localhost:${server.address().port}/`;
  const browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'] });
  const out = {};
  try {
    const page = await browser.newPage();
    await page.goto(url);
    for (const d of difficulties) {
      const samples = [];
      for (let r = 0; r < runs; r++) {
        const challenge = `${Math.floor(Date.now() / 1000) + 300}.${crypto.randomBytes(9).toString('base64url')}.${d}.${crypto.randomBytes(16).toString('base64url')}`;
        samples.push(await page.evaluate(([c, dd]) => window.solveOnce(c, dd), [challenge, d]));
      }
      const ms = samples.reduce((a, x) => a + x.ms, 0), hashes = samples.reduce((a, x) => a + x.hashes, 0);
      out[d] = { difficulty: d, runs, meanMs: ms / runs, maxMs: Math.max(...samples.map((x) => x.ms)),
        meanHashes: hashes / runs, rate: hashes / (ms / 1000) };
    }
  } finally {
    await browser.close();
    server.close();
  }
  return out;
}

const node = nodeRate();
console.log(`node crypto.createHash: ${Math.round(node.rate).toLocaleString('en')} hashes/s (one thread, ${node.hashes.toLocaleString('en')} in ${node.seconds.toFixed(1)} s)`);
for (const d of difficulties) {
  console.log(`  difficulty ${d}: ${(2 ** d / node.rate * 1000).toFixed(0)} ms expected per token`);
}
const browser = await browserRates();
console.log('chromium, web/js/pow-worker.js (crypto.subtle.digest in batches of 4096), worker start included:');
console.log('  bits  runs  mean ms  max ms  mean hashes  hashes/s  expected ms (2^d / rate)');
for (const r of Object.values(browser)) {
  console.log(`  ${String(r.difficulty).padEnd(4)}  ${String(r.runs).padEnd(4)}  ` +
    `${r.meanMs.toFixed(0).padStart(7)}  ${r.maxMs.toFixed(0).padStart(6)}  ${Math.round(r.meanHashes).toLocaleString('en').padStart(11)}  ` +
    `${Math.round(r.rate).toLocaleString('en').padStart(8)}  ${(2 ** r.difficulty / r.rate * 1000).toFixed(0).padStart(6)}`);
}
if (args.json) fs.writeFileSync(args.json, JSON.stringify({ node, browser }, null, 2));
