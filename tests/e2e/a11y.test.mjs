// axe-core over every page of the app, in the light and the dark theme: no serious or
// critical finding (contrast, names, labels, ARIA, landmarks, ...). The pages are taken in
// the states people see: empty and with errors, before and after voting, open and closed.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, assertAccessible, painted, DESKTOP, PHONE } from './helpers.mjs';
import { api, createPoll, castVote, assertStatus } from '../api/harness.mjs';

let env;
before(async () => { env = await launch({ powDifficulty: 0 }); });
after(async () => { await env?.close(); });

const OPTIONS = ['Lisbon', 'Kraków', 'Tallinn', 'A longer option that wraps onto a second line on a phone'];

/** A poll of each type with a few ballots, one closed poll, a receipt and a user. */
async function fixtures() {
  const owner = env.server.mint('a11y-owner');
  const polls = {};
  for (const type of ['single', 'multiple', 'approval', 'ranked', 'score']) {
    polls[type] = await createPoll(env.server, owner, { title: `Accessible ${type} poll?`, type, options: OPTIONS.map((text) => ({ text })), settings: { allow_anonymous: true, allow_vote_change: true } });
  }
  const ids = (type) => polls[type].options.map((o) => o.option_id);
  let receipt = null;
  for (let v = 0; v < 5; v++) {
    const tok = env.server.mint(`a11y-voter-${v}`);
    const r = await castVote(env.server, tok, polls.single.poll_id, { option_id: ids('single')[v % 3] });
    assertStatus(r, 200);
    receipt = r.json.receipt;
    assertStatus(await castVote(env.server, tok, polls.ranked.poll_id, { ranking: [ids('ranked')[v % 4], ids('ranked')[(v + 1) % 4]] }), 200);
    assertStatus(await castVote(env.server, tok, polls.score.poll_id, { scores: { [ids('score')[0]]: v % 6, [ids('score')[1]]: 5 - (v % 6) } }), 200);
  }
  const closed = await createPoll(env.server, owner, { title: 'A closed poll', options: OPTIONS.map((text) => ({ text })) });
  assertStatus(await castVote(env.server, env.server.mint('a11y-closer'), closed.poll_id, { option_id: closed.options[1].option_id }), 200);
  assertStatus(await api(env.server, 'PATCH', `/v1/polls/${closed.poll_id}`, { token: owner, body: { status: 'closed' } }), 200);
  return { polls, closed, receipt };
}

let fx;
for (const scheme of ['light', 'dark']) {
  test(`axe-core: every page, ${scheme} theme, no serious or critical finding`, async (t) => {
    fx ??= await fixtures();
    const { polls, closed, receipt } = fx;
    const minor = new Map();
    const check = async (page, what) => {
      await painted(page);
      for (const v of await assertAccessible(page, `${what} (${scheme})`)) minor.set(`${v.impact} ${v.id}`, what);
    };

    // a visitor without an account
    const page = await env.open(DESKTOP, { colorScheme: scheme });
    await page.goto(env.url('/'));
    await page.getByLabel('Question').waitFor();
    await check(page, 'create');
    await page.getByRole('button', { name: 'Create poll' }).click();
    await page.locator('form.create > p[role="alert"]:not([hidden])').waitFor();
    await check(page, 'create with errors');
    for (const type of Object.keys(polls)) {
      await page.goto(env.url(`/p/${polls[type].poll_id}`));
      await page.getByRole('button', { name: 'Vote', exact: true }).waitFor();
      await page.locator('.results[data-state="live"]').waitFor();
      await check(page, `vote page, ${type}`);
    }
    // voted, with the receipt
    await page.goto(env.url(`/p/${polls.single.poll_id}`));
    await page.getByRole('radio', { name: 'Tallinn' }).check();
    await page.getByRole('button', { name: 'Vote', exact: true }).click();
    await page.getByRole('heading', { name: /You voted/ }).waitFor();
    await check(page, 'voted');
    for (const [path, ready, what] of [
      [`/p/${polls.ranked.poll_id}/results`, '.results .rounds-table', 'results, ranked'],
      [`/p/${polls.score.poll_id}/results`, '.results[data-state="live"]', 'results, score'],
      [`/p/${closed.poll_id}`, '.results[data-final="true"][data-total="1"]', 'closed poll'],
      [`/p/${polls.single.poll_id}/share`, '.share img.qr[src]', 'share'],
      [`/p/${polls.ranked.poll_id}/present`, '.results-present .rounds-table', 'presenter, ranked'],
      [`/r/${receipt}`, '.receipt-result[data-counted="true"]', 'receipt, counted'],
      ['/r/unknownreceipt', '.receipt-result[data-counted="false"]', 'receipt, not found'],
      ['/j', '.join-form', 'join'],
      ['/j/ABC123', '.join-form .field-error:not([hidden])', 'join, unknown code'],
      ['/mine', 'form[aria-label="Sign up"]', 'my polls: sign up / log in'],
      ['/nowhere', 'h1', 'not found'],
    ]) {
      await page.goto(env.url(path));
      await page.locator(ready).first().waitFor();
      await check(page, what);
    }
    // the login form's errors
    await page.goto(env.url('/mine'));
    await page.locator('form[aria-label="Log in"]').getByRole('button', { name: 'Log in' }).click();
    await page.locator('form[aria-label="Log in"] .field-error:not([hidden])').first().waitFor();
    await check(page, 'log in with errors');

    // the owner: sign up, a poll with a vote, My polls with its audit log, the edit page
    const owner = await env.open(DESKTOP, { colorScheme: scheme });
    await owner.goto(env.url('/mine'));
    const form = owner.locator('form[aria-label="Sign up"]');
    await form.getByLabel('Username').fill(`a11y_${scheme}`);
    await form.getByLabel('Password').fill('correct horse battery');
    await form.getByRole('button', { name: 'Sign up' }).click();
    await owner.getByText('Signed in as').waitFor();
    const mine = await owner.evaluate(() => JSON.parse(localStorage.getItem('tally.user')));
    const own = await createPoll(env.server, mine.token, { title: 'Owned and voted', options: OPTIONS.map((text) => ({ text })) });
    assertStatus(await castVote(env.server, env.server.mint(`a11y-v-${scheme}`), own.poll_id, { option_id: own.options[0].option_id }), 200);
    await owner.goto(env.url('/mine'));
    const item = owner.locator('.poll-item', { hasText: 'Owned and voted' });
    await item.getByRole('button', { name: 'Audit log' }).click();
    await item.locator('table.audit').waitFor();
    await check(owner, 'my polls, signed in, audit log open');
    await owner.goto(env.url(`/p/${own.poll_id}`));
    await owner.getByRole('region', { name: 'Manage this poll' }).getByRole('button', { name: 'Delete', exact: true }).click();
    await owner.getByRole('button', { name: 'Delete poll' }).waitFor();
    await check(owner, 'poll page, owner, confirming a delete');
    await owner.goto(env.url(`/p/${own.poll_id}/edit`));
    await owner.locator('fieldset.options .locked-note:not([hidden])').waitFor();
    await check(owner, 'edit, options locked');

    // a phone
    const phone = await env.open(PHONE, { isMobile: true, colorScheme: scheme });
    await phone.goto(env.url(`/p/${polls.ranked.poll_id}`));
    await phone.getByRole('button', { name: 'Vote', exact: true }).waitFor();
    await check(phone, 'vote page, ranked, phone');

    for (const [k, what] of minor) t.diagnostic(`minor axe finding: ${k} (first on ${what})`);
    for (const p of [page, owner, phone]) env.assertClean(p);
  });
}
