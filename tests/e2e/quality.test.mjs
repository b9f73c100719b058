// Escaping, keyboard-only voting, phone width, change/retract, and My polls.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, createPollUI, noHorizontalScroll, PHONE, DESKTOP } from './helpers.mjs';
import { api } from '../api/harness.mjs';

let env;
before(async () => { env = await launch(); });
after(async () => { await env?.close(); });

const XSS = '<img src=x onerror=alert(1)>';

test('an XSS title and option show as text and run nothing', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: XSS, options: [XSS + ' option', '<script>alert(2)</script>'] });
  for (const path of [`/p/${id}`, `/p/${id}/share`, `/p/${id}/results`, `/p/${id}/present`, '/mine']) {
    await a.goto(env.url(path));
    await a.getByText(XSS, { exact: true }).first().waitFor();
    assert.equal(await a.locator('img[src="x"]').count(), 0, `${path}: an <img src=x> was created`);
    assert.equal(await a.locator('main script').count(), 0);
  }
  await a.goto(env.url(`/p/${id}`));
  assert.equal(await a.locator('h1').textContent(), XSS);
  await a.getByRole('radio', { name: '<script>alert(2)</script>' }).check();
  await a.getByRole('button', { name: 'Vote', exact: true }).click();
  await a.getByRole('heading', { name: /You voted/ }).waitFor();
  // every script the page loads has run and every request it made is answered: an
  // injected script would have opened its dialog by then
  await a.waitForLoadState('networkidle');
  assert.deepEqual(a.rec.dialogs, []);
  env.assertClean(a);
});

test('keyboard only: rank with the buttons and vote without a mouse', async () => {
  const owner = await env.open();
  const id = await createPollUI(owner, env, { title: 'Keyboard ranked', type: 'ranked', options: ['Alpha', 'Beta', 'Gamma'] });
  const k = await env.open();
  await k.goto(env.url(`/p/${id}`));
  await k.locator('.rank-item').first().waitFor();
  // Tab from the top of the page to "Move Gamma up", press it twice
  let guard = 0;
  while (guard++ < 40) {
    await k.keyboard.press('Tab');
    const name = await k.evaluate(() => document.activeElement?.getAttribute('aria-label'));
    if (name === 'Move Gamma up') break;
  }
  assert.equal(await k.evaluate(() => document.activeElement?.getAttribute('aria-label')), 'Move Gamma up');
  // the focus ring is visible
  const outline = await k.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  assert.notEqual(outline, 'none');
  await k.keyboard.press('Enter');
  await k.keyboard.press('Space');
  assert.deepEqual(await k.locator('.rank-label').allTextContents(), ['Gamma', 'Alpha', 'Beta']);
  // Tab on to the Vote button and press Enter
  guard = 0;
  while (guard++ < 20) {
    await k.keyboard.press('Tab');
    if (await k.evaluate(() => document.activeElement?.textContent === 'Vote')) break;
  }
  await k.keyboard.press('Enter');
  await k.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.deepEqual(await k.locator('.voted .summary li').allTextContents(), ['Gamma', 'Alpha', 'Beta']);

  // single choice: arrow keys move between radios, Enter submits
  const id2 = await createPollUI(owner, env, { title: 'Keyboard single', options: ['One', 'Two', 'Three'] });
  await k.goto(env.url(`/p/${id2}`));
  await k.getByRole('radio', { name: 'One' }).waitFor();
  guard = 0;
  while (guard++ < 30) {
    await k.keyboard.press('Tab');
    if (await k.evaluate(() => document.activeElement?.type === 'radio')) break;
  }
  await k.keyboard.press('ArrowDown'); // → Two (checked)
  await k.keyboard.press('Enter'); // submits the form
  await k.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.deepEqual(await k.locator('.voted .summary li').allTextContents(), ['Two']);
  env.assertClean(k);
  assert.equal(env.assertProofOfWork(k), 1); // one device token for both polls
});

test('360 px wide: no horizontal scrolling on any page', async () => {
  const owner = await env.open();
  const long = 'A rather long question title with a verylongwordthatdoesnotbreakanywhereatallreally in it?';
  const id = await createPollUI(owner, env, { title: long, type: 'ranked', options: ['Supercalifragilisticexpialidocious-option', 'Short'] });
  const p = await env.open(PHONE, { isMobile: true });
  for (const path of ['/', '/mine', `/p/${id}`, `/p/${id}/share`, `/p/${id}/results`, `/p/${id}/present`, `/p/${id}/edit`, '/r', '/r/AbCdEf123', '/j', '/j/ABC123', '/nowhere']) {
    await p.goto(env.url(path));
    await p.locator('h1').first().waitFor();
    await p.evaluate(() => Promise.all([document.fonts.ready, ...document.getAnimations().map((x) => x.finished)]));
    await noHorizontalScroll(p, path);
  }
  await p.goto(env.url(`/p/${id}`));
  await p.getByRole('button', { name: 'Vote', exact: true }).click();
  await p.getByRole('heading', { name: /You voted/ }).waitFor();
  await noHorizontalScroll(p, 'you voted');
  env.assertClean(p);
});

test('change and retract a vote where allowed (or a clear message while the server lacks it)', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Changeable', options: ['First', 'Second'], voteChange: true });
  await a.goto(env.url(`/p/${id}`));
  await a.getByRole('radio', { name: 'First' }).check();
  await a.getByRole('button', { name: 'Vote', exact: true }).click();
  await a.getByRole('heading', { name: /You voted/ }).waitFor();
  await a.getByRole('button', { name: 'Change my vote' }).click();
  await a.getByRole('radio', { name: 'Second' }).check();
  await a.getByRole('button', { name: 'Update my vote' }).click();
  const outcome = await Promise.race([
    a.getByText('Changing a vote is not available on this server yet.').waitFor().then(() => 'unsupported'),
    a.locator('.voted .summary li', { hasText: 'Second' }).waitFor().then(() => 'changed'),
  ]);
  if (outcome === 'changed') {
    await a.getByRole('button', { name: 'Retract my vote' }).click();
    await a.getByRole('button', { name: 'Vote', exact: true }).waitFor();
    await a.locator('.results[data-total="0"]').waitFor();
  }
  env.assertClean(a);
});

test('my polls: sign up, list, extend, close, export, audit log', async () => {
  const a = await env.open(DESKTOP);
  await a.goto(env.url('/mine'));
  const form = a.locator('form[aria-label="Sign up"]');
  await form.getByLabel('Username').fill('owner_e2e');
  await form.getByLabel('Password').fill('correct horse battery');
  await form.getByRole('button', { name: 'Sign up' }).click();
  await a.getByText('Signed in as').waitFor();
  const id = await createPollUI(a, env, { title: 'Owned poll', options: ['X', 'Y'], anonymous: false });
  const poll = (await api(env.server, 'GET', `/v1/polls/${id}`)).json;
  assert.equal(poll.settings.allow_anonymous, false);
  await a.goto(env.url('/mine'));
  const item = a.locator('.poll-item', { hasText: 'Owned poll' });
  await item.waitFor();
  // extend
  await item.getByRole('button', { name: 'Set end time' }).click();
  const when = new Date(Date.now() + 2 * 86400_000);
  const pad = (n) => String(n).padStart(2, '0');
  await item.getByLabel(/Close the poll at/).fill(`${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())}T10:30`);
  await item.getByRole('button', { name: 'Save end time' }).click();
  await item.getByText(/The poll now closes/).waitFor();
  const after1 = (await api(env.server, 'GET', `/v1/polls/${id}`)).json;
  assert.ok(after1.end_time && Date.parse(after1.end_time) > Date.now() + 86400_000);
  // export and audit: a download or a clear "not available yet"
  const dl = a.waitForEvent('download', { timeout: 3000 }).catch(() => null);
  await item.getByRole('button', { name: 'Export CSV' }).click();
  await item.getByText(/Downloaded the CSV export|Export is not available/).waitFor();
  await dl;
  await item.getByRole('button', { name: 'Audit log' }).click();
  await item.locator('table.audit, .status.is-error').first().waitFor();
  // close
  await item.getByRole('button', { name: 'Close now' }).click();
  await item.getByRole('button', { name: 'Close poll' }).click();
  await item.getByText('The poll is closed.').waitFor();
  assert.equal((await api(env.server, 'GET', `/v1/polls/${id}`)).json.status, 'closed');
  // a voter without an account is asked to sign in (the poll is closed now, so use a new one)
  const id2 = await createPollUI(a, env, { title: 'Accounts only', options: ['X', 'Y'], anonymous: false });
  const b = await env.open();
  await b.goto(env.url(`/p/${id2}`));
  await b.getByText('This poll needs an account to vote.').waitFor();
  env.assertClean(a); env.assertClean(b);
});
