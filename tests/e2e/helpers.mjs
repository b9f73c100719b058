// Browser test helpers: the real tally binary (started by ../api/harness.mjs) serving
// ../../web, and Debian's chromium driven by playwright-core. Only 127.0.0.1 is contacted;
// every page records its requests, dialogs, console errors (CSP violations) and page errors
// so each test can assert that nothing went to another origin and nothing ran that should not.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { startServer } from '../api/harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const WEB_ROOT = path.resolve(here, '../../web');
export const SHOTS = path.resolve(here, '../../docs/screenshots');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const DESKTOP = { width: 1280, height: 800 };
export const PHONE = { width: 360, height: 740 };
// Anonymous device tokens cost a proof of work (solved by the page in a Web Worker); the
// e2e servers ask for one so that every anonymous vote goes through the worker.
export const POW_DIFFICULTY = 14;

// What the harness turns off for tests about something else (rate limits, and the proof
// of work where no --pow-difficulty is given), given back: unset, so the server's own
// defaults apply. `launch({ serverDefaults: true })`.
const SERVER_DEFAULTS = { TALLY_RATE_LIMITS: undefined, TALLY_POW_DIFFICULTY: undefined };

/**
 * opts: {powDifficulty (default POW_DIFFICULTY), args: [more server flags],
 *        serverDefaults: true for the server as it ships (its default limits and proof of
 *        work: no --pow-difficulty, none of the harness's test settings)}
 */
export async function launch({ powDifficulty = POW_DIFFICULTY, args = [], serverDefaults = false } = {}) {
  const server = await startServer(serverDefaults
    ? { args: ['--web-root', WEB_ROOT, ...args], env: SERVER_DEFAULTS }
    : { args: ['--web-root', WEB_ROOT, '--pow-difficulty', String(powDifficulty), ...args] });
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      // launch() gives every run a fresh temporary profile (user data dir)
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  } catch (e) {
    await server.close();
    throw e;
  }
  const contexts = [];
  const env = {
    server,
    browser,
    url: (p = '/') => server.url + p,
    /**
     * A new browser context (separate storage = a separate voter) with one page.
     * locale: the browser's language (navigator.languages, Accept-Language; default en-US);
     * colorScheme: 'light' (default) or 'dark' (prefers-color-scheme).
     */
    async open(viewport = DESKTOP, { isMobile = false, locale = 'en-US', colorScheme = 'light', timezoneId } = {}) {
      const context = await browser.newContext({ viewport, isMobile, hasTouch: isMobile, deviceScaleFactor: 1, reducedMotion: 'no-preference', locale, colorScheme, timezoneId });
      const page = await context.newPage();
      const rec = { requests: [], posts: [], workers: [], dialogs: [], consoleErrors: [], pageErrors: [] };
      page.on('request', (r) => {
        rec.requests.push(r.url());
        if (r.method() === 'POST') rec.posts.push({ path: new URL(r.url()).pathname, body: r.postData() });
      });
      page.on('worker', (w) => rec.workers.push(w.url()));
      page.on('dialog', (d) => { rec.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
      page.on('console', (m) => { if (m.type() === 'error') rec.consoleErrors.push(m.text()); });
      page.on('pageerror', (e) => rec.pageErrors.push(String(e)));
      page.rec = rec;
      contexts.push({ context, page });
      return page;
    },
    /** No request left this origin, no dialog, no script error, no CSP violation. */
    assertClean(page, { allowConsole = [] } = {}) {
      const origin = new URL(server.url).origin;
      const foreign = page.rec.requests.filter((u) => !(u.startsWith(origin + '/') || u.startsWith('data:') || u.startsWith('blob:' + origin)));
      assert.deepEqual(foreign, [], 'requests to another origin');
      assert.deepEqual(page.rec.dialogs, [], 'dialogs fired');
      assert.deepEqual(page.rec.pageErrors, [], 'uncaught script errors');
      const csp = page.rec.consoleErrors.filter((t) => /Content Security Policy/i.test(t));
      assert.deepEqual(csp, [], 'CSP violations');
      const other = page.rec.consoleErrors.filter((t) => !/Content Security Policy/i.test(t) &&
        !/Failed to load resource/i.test(t) && !allowConsole.some((re) => re.test(t)));
      assert.deepEqual(other, [], 'console errors');
    },
    /**
     * Every anonymous device token this page got came the proof-of-work way: a challenge
     * first, then a nonce (found by the page's worker) whose SHA-256 has `difficulty` zero
     * bits. Returns how many tokens the page asked for.
     */
    assertProofOfWork(page, { difficulty = POW_DIFFICULTY } = {}) {
      const posts = page.rec.posts.filter((p) => p.path === '/v1/auth/challenge' || p.path === '/v1/auth/anonymous');
      const anon = posts.filter((p) => p.path === '/v1/auth/anonymous');
      assert.ok(anon.length > 0, 'the page asked for no anonymous token');
      posts.forEach((p, i) => {
        if (p.path !== '/v1/auth/anonymous') return;
        assert.equal(posts[i - 1]?.path, '/v1/auth/challenge', 'POST /v1/auth/anonymous without a challenge before it');
        const body = JSON.parse(p.body || 'null');
        assert.equal(typeof body?.challenge, 'string', `no challenge in ${p.body}`);
        if (difficulty === 0) return;
        assert.match(body.nonce, /^[\x21-\x7e]{1,64}$/, `nonce in ${p.body}`);
        const bits = leadingZeroBits(crypto.createHash('sha256').update(`${body.challenge}:${body.nonce}`, 'utf8').digest());
        assert.ok(bits >= difficulty, `the nonce in ${p.body} gives ${bits} zero bits, not ${difficulty}`);
      });
      const origin = new URL(server.url).origin;
      if (difficulty > 0) assert.ok(page.rec.workers.includes(`${origin}/js/pow-worker.js`), `no proof-of-work worker started: ${page.rec.workers}`);
      else assert.deepEqual(page.rec.workers, [], 'a worker started although no proof of work was asked for');
      return anon.length;
    },
    async close() {
      for (const { context } of contexts) await context.close().catch(() => {});
      await browser.close().catch(() => {});
      await server.close();
    },
  };
  return env;
}

export function leadingZeroBits(buf) {
  let bits = 0;
  for (const b of buf) {
    if (b === 0) { bits += 8; continue; }
    return bits + Math.clz32(b) - 24;
  }
  return bits;
}

/** Writes the README's screenshot `name` when TALLY_SCREENSHOTS is set (`make screenshots`);
 *  a plain test run leaves the tracked files alone. Waits for the page's CSS transitions
 *  (the bars) to finish first. */
export async function shot(page, name, { fullPage = true } = {}) {
  if (!process.env.TALLY_SCREENSHOTS) return;
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.evaluate(() => Promise.all(document.getAnimations().map((a) => a.finished)));
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage });
}

export async function noHorizontalScroll(page, what) {
  const want = page.viewportSize().width;
  const sw = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(sw <= want, `${what}: page is ${sw}px wide in a ${want}px viewport (horizontal scrolling)`);
}

/**
 * Fills the create form and submits it. opts: {title, options: [..], type, settings: {...}}
 * Returns the new poll's id (from the share page's URL).
 */
export async function createPollUI(page, env, { title, options = ['Red', 'Green', 'Blue'], type = 'single', description, anonymous = true, voteChange = false, minChoices, maxChoices, maxScore, visibility } = {}) {
  await page.goto(env.url('/'));
  await page.getByLabel('Question').fill(title);
  if (description) await page.getByLabel('Description (optional)').fill(description);
  await page.locator(`input[type=radio][value="${type}"]`).check();
  const rows = page.locator('.option-row input[type=text]');
  for (let i = 0; i < options.length; i++) {
    if (i >= (await rows.count())) await page.getByRole('button', { name: '+ Add option' }).click();
    await rows.nth(i).fill(options[i]);
  }
  const anon = page.getByLabel(/Allow anonymous voting/);
  if ((await anon.isChecked()) !== anonymous) await anon.click();
  if (voteChange) await page.getByLabel(/Let voters change/).check();
  if (visibility) await page.getByLabel('Who can see the results').selectOption(visibility);
  if (minChoices !== undefined) await page.getByLabel('Minimum choices').fill(String(minChoices));
  if (maxChoices !== undefined) await page.getByLabel('Maximum choices').fill(String(maxChoices));
  if (maxScore !== undefined) await page.getByLabel('Maximum score').fill(String(maxScore));
  await page.getByRole('button', { name: 'Create poll' }).click();
  await page.waitForURL(/\/p\/[A-Za-z0-9_-]+\/share$/);
  return /\/p\/([A-Za-z0-9_-]+)\/share$/.exec(page.url())[1];
}

const AXE_SOURCE = fs.readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

/**
 * Runs axe-core (WCAG 2.x A and AA rules and axe's best practices) over the page as it is
 * now and asserts that it finds nothing serious or critical. The script is evaluated
 * through the DevTools protocol, which the page's CSP does not govern (the app itself
 * never runs inline script). Returns every violation found, for a look at the minor ones.
 */
export async function assertAccessible(page, what) {
  await page.evaluate(AXE_SOURCE);
  const violations = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, targets: v.nodes.slice(0, 5).map((n) => `${n.target.join(' ')}: ${n.failureSummary?.split('\n').slice(1).join(' ')}`) }));
  });
  const bad = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  assert.deepEqual(bad.map((v) => `${v.impact} ${v.id} (${v.help}): ${v.targets.join(' | ')}`), [], `${what}: axe-core findings`);
  return violations;
}

/** Resolves after the page has painted twice (its requestAnimationFrame work is done). */
export const painted = (page) => page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r()))));
