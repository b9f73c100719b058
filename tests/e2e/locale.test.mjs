// The browser's language and colour scheme: a German browser gets the app in German with
// German dates and numbers; a language the app does not speak gets English text with that
// locale's dates; prefers-color-scheme: dark gets the dark theme (presenter mode is dark
// in both).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, shot, DESKTOP, painted } from './helpers.mjs';
import { createPoll, castVote, assertStatus } from '../api/harness.mjs';

let env;
before(async () => { env = await launch({ powDifficulty: 0 }); });
after(async () => { await env?.close(); });

const TZ = 'Europe/Berlin';
const dateIn = (locale, iso) => new Intl.DateTimeFormat(locale, { dateStyle: 'medium', timeStyle: 'short', timeZone: TZ }).format(new Date(iso));
const pctIn = (locale, p) => new Intl.NumberFormat(locale, { style: 'percent', minimumFractionDigits: 1, maximumFractionDigits: 1 }).format(p / 100);

async function votedPoll() {
  const end = new Date(Date.now() + 3 * 86400_000);
  end.setUTCSeconds(0, 0);
  const poll = await createPoll(env.server, env.server.mint('locale-owner'), {
    title: 'Kaffee oder Tee?', options: [{ text: 'Kaffee' }, { text: 'Tee' }],
    end_time: end.toISOString(), settings: { allow_anonymous: true },
  });
  for (let v = 0; v < 3; v++) {
    assertStatus(await castVote(env.server, env.server.mint(`locale-v${v}`), poll.poll_id, { option_id: poll.options[v === 0 ? 0 : 1].option_id }), 200);
  }
  return poll;
}

test('a German browser: German text, German dates and numbers', async () => {
  const poll = await votedPoll();
  const page = await env.open(DESKTOP, { locale: 'de-DE', timezoneId: TZ });
  await page.goto(env.url('/'));
  await page.getByRole('heading', { name: 'Umfrage erstellen' }).waitFor();
  assert.equal(await page.evaluate(() => document.documentElement.lang), 'de');
  assert.deepEqual(await page.locator('header.site nav a').allTextContents(), ['Neue Umfrage', 'Teilnehmen', 'Meine Umfragen']);
  assert.equal(await page.locator('.skip').textContent(), 'Zum Inhalt springen');
  // the form's own messages
  await page.getByRole('button', { name: 'Umfrage erstellen' }).click();
  const summary = page.locator('form.create > p[role="alert"]');
  await summary.getByText('Bitte korrigieren Sie die 3 markierten Felder:').waitFor();
  assert.deepEqual(await summary.locator('li').allTextContents(), [
    'Geben Sie die Frage ein.',
    'Geben Sie den Text von Option 1 ein oder entfernen Sie sie.',
    'Geben Sie den Text von Option 2 ein oder entfernen Sie sie.',
  ]);
  // the vote page: the closing date in German, the counts with German numbers
  await page.goto(env.url(`/p/${poll.poll_id}`));
  await page.getByRole('button', { name: 'Abstimmen', exact: true }).waitFor();
  assert.equal(await page.locator('.poll-head .meta').textContent(), `Einfachauswahl · endet ${dateIn('de-DE', poll.end_time)} · kein Konto nötig · Code ${poll.join_code}`);
  await page.locator('.results[data-total="3"]').waitFor();
  assert.equal(await page.locator('.results .total').textContent(), '3 Stimmen');
  assert.equal(await page.getByRole('heading', { level: 2 }).first().textContent(), 'Live-Ergebnisse');
  assert.equal(await page.locator('.bar-row', { hasText: 'Kaffee' }).locator('.bar-nums').textContent(), `1 · ${pctIn('de-DE', 33.3)}`);
  assert.equal(await page.locator('.bar-row', { hasText: 'Tee' }).locator('.bar-nums').textContent(), `2 · ${pctIn('de-DE', 66.7)}`);
  assert.match(pctIn('de-DE', 66.7), /^66,7\s%$/); // the comma, and the space before %
  // voting: the page's words and the receipt's date
  await page.getByRole('radio', { name: 'Tee' }).check();
  await page.getByRole('button', { name: 'Abstimmen', exact: true }).click();
  await page.getByRole('heading', { name: '✓ Sie haben abgestimmt' }).waitFor();
  const voted = await page.evaluate(() => document.querySelector('.voted .meta').textContent);
  assert.match(voted, /^Gespeichert am \d{2}\.\d{2}\.\d{4}, \d{2}:\d{2}$/);
  env.assertClean(page);
});

test('a language the app does not speak: English text, that locale’s dates', async () => {
  const poll = await votedPoll();
  const page = await env.open(DESKTOP, { locale: 'fr-FR', timezoneId: TZ });
  await page.goto(env.url(`/p/${poll.poll_id}`));
  await page.getByRole('button', { name: 'Vote', exact: true }).waitFor();
  assert.equal(await page.evaluate(() => document.documentElement.lang), 'en');
  assert.equal(await page.locator('.poll-head .meta').textContent(), `Single choice · closes ${dateIn('fr-FR', poll.end_time)} · no account needed · join code ${poll.join_code}`);
  await page.locator('.results[data-total="3"]').waitFor();
  assert.equal(await page.locator('.bar-row', { hasText: 'Tee' }).locator('.bar-nums').textContent(), `2 · ${pctIn('fr-FR', 66.7)}`);
  // and an English browser: English dates
  const en = await env.open(DESKTOP, { locale: 'en-US', timezoneId: TZ });
  await en.goto(env.url(`/p/${poll.poll_id}`));
  await en.getByRole('button', { name: 'Vote', exact: true }).waitFor();
  assert.equal(await en.locator('.poll-head .meta').textContent(), `Single choice · closes ${dateIn('en-US', poll.end_time)} · no account needed · join code ${poll.join_code}`);
  env.assertClean(page); env.assertClean(en);
});

test('prefers-color-scheme: dark renders the dark theme; light stays light; presenter mode is dark in both', async () => {
  const poll = await votedPoll();
  const colours = (page) => page.evaluate(() => {
    const cs = (sel) => { const s = getComputedStyle(document.querySelector(sel)); return { bg: s.backgroundColor, fg: s.color }; };
    return { body: cs('body'), input: cs('main input[type="text"], main input[type="radio"]'), link: getComputedStyle(document.querySelector('main a, footer a')).color };
  });
  const dark = await env.open(DESKTOP, { colorScheme: 'dark' });
  await dark.goto(env.url(`/p/${poll.poll_id}`));
  await dark.locator('.results[data-total="3"]').waitFor();
  const d = await colours(dark);
  assert.deepEqual(d.body, { bg: 'rgb(17, 24, 39)', fg: 'rgb(229, 231, 235)' });
  assert.equal(d.link, 'rgb(147, 197, 253)');
  await shot(dark, 'vote-dark-desktop');
  // form controls follow (color-scheme: light dark)
  assert.equal(await dark.evaluate(() => getComputedStyle(document.documentElement).colorScheme), 'light dark');
  await dark.goto(env.url('/'));
  await dark.getByLabel('Question').waitFor();
  assert.equal(await dark.evaluate(() => getComputedStyle(document.querySelector('#main input[name="title"]')).backgroundColor), 'rgb(11, 18, 32)');

  const light = await env.open(DESKTOP, { colorScheme: 'light' });
  await light.goto(env.url(`/p/${poll.poll_id}`));
  await light.locator('.results[data-total="3"]').waitFor();
  const l = await colours(light);
  assert.deepEqual(l.body, { bg: 'rgb(255, 255, 255)', fg: 'rgb(17, 24, 39)' });
  assert.equal(l.link, 'rgb(29, 78, 216)');

  for (const page of [light, dark]) {
    await page.goto(env.url(`/p/${poll.poll_id}/present`));
    await page.locator('.results-present[data-total="3"]').waitFor();
    await painted(page);
    assert.deepEqual(await page.evaluate(() => { const s = getComputedStyle(document.body); return [s.backgroundColor, s.color]; }), ['rgb(11, 18, 32)', 'rgb(249, 250, 251)']);
  }
  env.assertClean(dark); env.assertClean(light);
});
