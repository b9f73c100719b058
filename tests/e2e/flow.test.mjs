// The main flow: create → share → vote from two browsers → live results → presenter mode.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, shot, createPollUI, noHorizontalScroll, DESKTOP, PHONE } from './helpers.mjs';

let env;
before(async () => { env = await launch(); });
after(async () => { await env?.close(); });

test('create → share → two voters → live results without reloading → presenter mode', async () => {
  const a = await env.open(DESKTOP);
  // the create page, filled in, for the screenshots
  await a.goto(env.url('/'));
  await a.getByLabel('Question').fill('Where should the team offsite be?');
  await a.getByLabel('Description (optional)').fill('Pick one; results are live.');
  await a.getByLabel('Option 1', { exact: true }).fill('Lisbon');
  await a.getByLabel('Option 2', { exact: true }).fill('Kraków');
  await a.getByRole('button', { name: '+ Add option' }).click();
  await a.getByLabel('Option 3', { exact: true }).fill('Tallinn');
  await a.getByLabel('Question').focus();
  await shot(a, 'create-desktop');

  const id = await createPollUI(a, env, { title: 'Where should the team offsite be?', description: 'Pick one; results are live.', options: ['Lisbon', 'Kraków', 'Tallinn', 'Valencia'] });
  // share page: link, copy button, QR code
  const link = await a.getByLabel('Link to the poll').inputValue();
  assert.equal(link, env.url(`/p/${id}`));
  await a.waitForFunction(() => { const i = document.querySelector('img.qr'); return i && i.complete && i.naturalWidth > 0; });
  await a.getByRole('button', { name: 'Copy link' }).click();
  await a.getByText(/Link copied|copy it with Ctrl\+C/).waitFor();
  await shot(a, 'share-desktop');

  // A watches the results page
  await a.goto(env.url(`/p/${id}/results`));
  await a.locator('.results[data-state="live"]').waitFor();
  assert.equal(await a.locator('.results').getAttribute('data-total'), '0');

  // B votes from another context (another device token)
  const b = await env.open(DESKTOP);
  await b.goto(env.url(`/p/${id}`));
  await b.getByRole('radio', { name: 'Tallinn' }).waitFor();
  await shot(b, 'vote-desktop');
  await b.getByRole('radio', { name: 'Tallinn' }).check();
  await b.getByRole('button', { name: 'Vote', exact: true }).click();
  await b.getByRole('heading', { name: /You voted/ }).waitFor();
  const receipt = await b.locator('.receipt-code').textContent();
  assert.match(receipt, /^[A-Za-z0-9_-]{10,}$/);

  // A sees B's vote without reloading
  await a.locator('.results[data-total="1"]').waitFor({ timeout: 5000 });
  const row = a.locator('.bar-row', { hasText: 'Tallinn' });
  assert.equal(await row.getAttribute('data-votes'), '1');
  assert.match(await row.locator('.bar-nums').textContent(), /1 · 100\.0%/);

  // a third voter, then A votes too: B (on its own page) sees both without reloading
  const c = await env.open(DESKTOP);
  await c.goto(env.url(`/p/${id}`));
  await c.getByRole('radio', { name: 'Lisbon' }).check();
  await c.getByRole('button', { name: 'Vote', exact: true }).click();
  await c.getByRole('heading', { name: /You voted/ }).waitFor();
  await a.goto(env.url(`/p/${id}`));
  await a.getByRole('radio', { name: 'Tallinn' }).check();
  await a.getByRole('button', { name: 'Vote', exact: true }).click();
  await a.getByRole('heading', { name: /You voted/ }).waitFor();
  await b.locator('.results[data-total="3"]').waitFor({ timeout: 5000 });
  assert.match(await b.locator('.recent').textContent(), /in the last minute/);
  await shot(b, 'voted-desktop');

  await a.goto(env.url(`/p/${id}/results`));
  await a.locator('.results[data-total="3"]').waitFor();
  await shot(a, 'results-desktop');

  // presenter mode
  await a.goto(env.url(`/p/${id}/present`));
  await a.locator('.present-title').waitFor();
  assert.equal(await a.locator('h1.present-title').textContent(), 'Where should the team offsite be?');
  await a.locator('.results-present[data-total="3"]').waitFor();
  await a.waitForFunction(() => { const i = document.querySelector('.present-join img.qr'); return i && i.complete && i.naturalWidth > 0; });
  assert.equal(await a.evaluate(() => document.body.classList.contains('presenting')), true);
  // a vote arrives while presenting
  const d = await env.open(DESKTOP);
  await d.goto(env.url(`/p/${id}`));
  await d.getByRole('radio', { name: 'Valencia' }).check();
  await d.getByRole('button', { name: 'Vote', exact: true }).click();
  await a.locator('.results-present[data-total="4"]').waitFor({ timeout: 5000 });
  await shot(a, 'presenter-desktop');

  // the same pages at phone width: readable, no horizontal scrolling
  const p = await env.open(PHONE, { isMobile: true });
  await p.goto(env.url('/'));
  await p.getByLabel('Question').fill('Where should the team offsite be?');
  await p.getByLabel('Option 1', { exact: true }).fill('Lisbon');
  await p.getByLabel('Option 2', { exact: true }).fill('Kraków');
  await p.getByLabel('Question').focus();
  await noHorizontalScroll(p, 'create');
  await shot(p, 'create-phone');
  await p.goto(env.url(`/p/${id}/share`));
  await p.waitForFunction(() => { const i = document.querySelector('img.qr'); return i && i.complete && i.naturalWidth > 0; });
  await noHorizontalScroll(p, 'share');
  await shot(p, 'share-phone');
  await p.goto(env.url(`/p/${id}`));
  await p.getByRole('radio', { name: 'Kraków' }).waitFor();
  await noHorizontalScroll(p, 'vote');
  await shot(p, 'vote-phone');
  await p.goto(env.url(`/p/${id}/results`));
  await p.locator('.results[data-total="4"]').waitFor();
  await noHorizontalScroll(p, 'results');
  await shot(p, 'results-phone');
  await p.goto(env.url(`/p/${id}/present`));
  await p.locator('.results-present[data-total="4"]').waitFor();
  await p.waitForFunction(() => { const i = document.querySelector('.present-join img.qr'); return i && i.complete && i.naturalWidth > 0; });
  await noHorizontalScroll(p, 'presenter');
  await shot(p, 'presenter-phone');

  for (const pg of [a, b, c, d, p]) env.assertClean(pg);
  // every anonymous voter (and the anonymous creator) paid one proof of work, in the worker
  for (const pg of [a, b, c, d]) assert.equal(env.assertProofOfWork(pg), 1);
});
