// Anonymous device tokens cost a proof of work: the page asks for a challenge, solves it in
// a module Web Worker (loaded from this origin under the CSP), says so in a status line, and
// retries once with a new challenge when the server refuses the answer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { launch, leadingZeroBits, POW_DIFFICULTY } from './helpers.mjs';
import { createPoll } from '../api/harness.mjs';

let env; // the server asks for POW_DIFFICULTY bits
let free; // a server with --pow-difficulty 0
let limited; // rate limits on: 2 requests a minute for anonymous tokens (challenge + token)
before(async () => {
  [env, free, limited] = await Promise.all([launch(), launch({ powDifficulty: 0 }),
    launch({ args: ['--rate-limits', 'true', '--rate-anon-ip', '1'] })]);
});
after(async () => { await Promise.all([env?.close(), free?.close(), limited?.close()]); });

async function anonPoll(e) {
  const owner = await e.server.token(`owner_${crypto.randomBytes(4).toString('hex')}`);
  return createPoll(e.server, owner, { title: 'Tea or coffee?', options: [{ text: 'Tea' }, { text: 'Coffee' }], settings: { allow_anonymous: true } });
}

/** A nonce that does not solve `challenge`. */
function wrongNonce(challenge) {
  for (let i = 0; ; i++) {
    const n = `wrong${i}`;
    if (leadingZeroBits(crypto.createHash('sha256').update(`${challenge}:${n}`).digest()) < POW_DIFFICULTY) return n;
  }
}

/** Records the statuses of the page's POST /v1/auth/* answers. */
function authStatuses(page) {
  const out = [];
  page.on('response', (r) => {
    const u = new URL(r.url());
    if (r.request().method() === 'POST' && u.pathname.startsWith('/v1/auth/')) out.push(`${u.pathname.slice(9)} ${r.status()}`);
  });
  return out;
}

test('the worker solves the challenge while a status says the ballot is being prepared', async () => {
  const poll = await anonPoll(env);
  const page = await env.open();
  const statuses = authStatuses(page);
  // hold the token request back a moment so that the status can be seen
  let release;
  const held = new Promise((r) => { release = r; });
  await page.route('**/v1/auth/anonymous', async (route) => { await held; await route.continue(); });
  const res = await page.goto(env.url(`/p/${poll.poll_id}`));
  // the worker runs under the page's CSP (script-src 'self', which workers fall back to)
  assert.match(res.headers()['content-security-policy'] || '', /script-src 'self'(;|$)/);
  await page.getByRole('radio', { name: 'Coffee' }).check();
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  const status = page.getByRole('status').filter({ hasText: 'Preparing your anonymous ballot…' });
  await status.waitFor({ state: 'visible' });
  assert.equal(await page.locator('form.vote-form').getAttribute('aria-busy'), 'true');
  assert.ok(await page.getByRole('button', { name: 'Vote', exact: true }).isDisabled(), 'Vote can be pressed twice');
  release();
  await page.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.equal(await status.count(), 0, 'the status stays after the vote');
  assert.deepEqual(statuses, ['challenge 200', 'anonymous 201']);
  await page.locator('.results[data-total="1"]').waitFor();
  env.assertClean(page);
  assert.equal(env.assertProofOfWork(page), 1);
});

test('a refused answer (403 POW_FAILED) is retried once with a new challenge', async () => {
  const poll = await anonPoll(env);
  const page = await env.open();
  const statuses = authStatuses(page);
  let tampered = 0;
  await page.route('**/v1/auth/anonymous', async (route) => {
    if (tampered++ > 0) return route.continue();
    const body = JSON.parse(route.request().postData());
    await route.continue({ postData: JSON.stringify({ ...body, nonce: wrongNonce(body.challenge) }) });
  });
  await page.goto(env.url(`/p/${poll.poll_id}`));
  await page.getByRole('radio', { name: 'Tea' }).check();
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  await page.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.deepEqual(statuses, ['challenge 200', 'anonymous 403', 'challenge 200', 'anonymous 201']);
  const challenges = page.rec.posts.filter((p) => p.path === '/v1/auth/anonymous').map((p) => JSON.parse(p.body).challenge);
  assert.equal(new Set(challenges).size, 2, 'the retry used the same challenge');
  env.assertClean(page);
  assert.equal(env.assertProofOfWork(page), 2);
});

test('refused twice: a clear message, and voting again works', async () => {
  const poll = await anonPoll(env);
  const page = await env.open();
  const statuses = authStatuses(page);
  const spoil = async (route) => {
    const body = JSON.parse(route.request().postData());
    await route.continue({ postData: JSON.stringify({ ...body, nonce: wrongNonce(body.challenge) }) });
  };
  await page.route('**/v1/auth/anonymous', spoil);
  await page.goto(env.url(`/p/${poll.poll_id}`));
  await page.getByRole('radio', { name: 'Tea' }).check();
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  const alert = page.locator('.vote-form p[role="alert"]:not([hidden])');
  await alert.waitFor();
  assert.equal(await alert.textContent(), 'Your anonymous ballot could not be prepared: the server did not accept its proof of work. Try again.');
  assert.deepEqual(statuses, ['challenge 200', 'anonymous 403', 'challenge 200', 'anonymous 403']);
  assert.equal(await page.getByRole('status').filter({ hasText: 'Preparing' }).count(), 0);
  await page.unroute('**/v1/auth/anonymous', spoil);
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  await page.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.deepEqual(statuses.slice(4), ['challenge 200', 'anonymous 201']);
  env.assertClean(page);
});

test('no worker can start: the page solves the challenge itself', async () => {
  const poll = await anonPoll(env);
  const page = await env.open();
  await page.route('**/js/pow-worker.js', (route) => route.fulfill({ status: 404, contentType: 'text/plain', body: 'gone' }));
  await page.goto(env.url(`/p/${poll.poll_id}`));
  await page.getByRole('radio', { name: 'Tea' }).check();
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  await page.getByRole('heading', { name: /You voted/ }).waitFor();
  env.assertClean(page);
  assert.equal(env.assertProofOfWork(page), 1);
});

test('difficulty 0: no worker, no waiting', async () => {
  const poll = await anonPoll(free);
  const page = await free.open();
  const statuses = authStatuses(page);
  await page.goto(free.url(`/p/${poll.poll_id}`));
  await page.getByRole('radio', { name: 'Tea' }).check();
  await page.getByRole('button', { name: 'Vote', exact: true }).click();
  await page.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.deepEqual(statuses, ['challenge 200', 'anonymous 201']);
  free.assertClean(page);
  assert.equal(free.assertProofOfWork(page, { difficulty: 0 }), 1);
});

test('rate limited (429): the wait is shown in words', async () => {
  const poll = await anonPoll(limited);
  const first = await limited.open();
  await first.goto(limited.url(`/p/${poll.poll_id}`));
  await first.getByRole('radio', { name: 'Tea' }).check();
  await first.getByRole('button', { name: 'Vote', exact: true }).click();
  await first.getByRole('heading', { name: /You voted/ }).waitFor();
  // the same address again: the challenge is free, the token it would buy is refused
  const second = await limited.open();
  const statuses = authStatuses(second);
  await second.goto(limited.url(`/p/${poll.poll_id}`));
  await second.getByRole('radio', { name: 'Coffee' }).check();
  const refused = second.waitForResponse((r) => new URL(r.url()).pathname === '/v1/auth/anonymous' && r.status() === 429);
  await second.getByRole('button', { name: 'Vote', exact: true }).click();
  const alert = second.locator('.vote-form p[role="alert"]:not([hidden])');
  await alert.waitFor();
  // the wait in words from Retry-After (seconds under a minute, else minutes), no "network"
  const wait = Number((await refused).headers()['retry-after']);
  assert.ok(Number.isInteger(wait) && wait >= 1 && wait <= 60, `Retry-After: ${wait}`);
  const words = wait < 60 ? `in ${wait} second${wait === 1 ? '' : 's'}` : 'in about a minute';
  assert.equal(await alert.textContent(), `Too many requests right now. Try again ${words}.`);
  assert.deepEqual(statuses.slice(-2), ['challenge 200', 'anonymous 429']);
  limited.assertClean(first); limited.assertClean(second);
  assert.equal(limited.assertProofOfWork(first), 1);
});
