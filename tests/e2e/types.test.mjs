// A poll of every type created through the UI, voted on through the UI, and its results.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, createPollUI, shot, noHorizontalScroll, DESKTOP, PHONE } from './helpers.mjs';
import { api } from '../api/harness.mjs';

let env;
before(async () => { env = await launch(); });
after(async () => { await env?.close(); });

async function getPoll(id) {
  const r = await api(env.server, 'GET', `/v1/polls/${id}`);
  assert.equal(r.status, 200);
  return r.json;
}
const vote = (page) => page.getByRole('button', { name: 'Vote', exact: true }).click();
const voted = (page) => page.getByRole('heading', { name: /You voted/ }).waitFor();

test('single', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Single?', type: 'single', options: ['Yes', 'No'] });
  const poll = await getPoll(id);
  assert.equal(poll.type, 'single');
  assert.equal(poll.settings.allow_anonymous, true);
  await a.goto(env.url(`/p/${id}`));
  await a.getByRole('radio', { name: 'No' }).check();
  await vote(a); await voted(a);
  await a.locator('.results[data-total="1"]').waitFor();
  env.assertClean(a);
  assert.equal(env.assertProofOfWork(a), 1);
});

test('multiple with min/max choices, validation mirrored in the page', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Toppings?', type: 'multiple', options: ['Cheese', 'Olives', 'Basil', 'Ham'], minChoices: 2, maxChoices: 3 });
  const poll = await getPoll(id);
  assert.equal(poll.type, 'multiple');
  assert.equal(poll.settings.min_choices, 2);
  assert.equal(poll.settings.max_choices, 3);
  await a.goto(env.url(`/p/${id}`));
  await a.getByRole('checkbox', { name: 'Cheese' }).check();
  await vote(a);
  await a.getByText('Choose at least 2 options.').waitFor();
  await a.getByRole('checkbox', { name: 'Basil' }).check();
  await vote(a); await voted(a);
  const r = await api(env.server, 'GET', `/v1/polls/${id}/results`);
  assert.equal(r.json.total_votes, 1);
  env.assertClean(a);
});

test('approval', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Acceptable dates?', type: 'approval', options: ['Mon', 'Tue', 'Wed'] });
  assert.equal((await getPoll(id)).type, 'approval');
  await a.goto(env.url(`/p/${id}`));
  await a.getByRole('checkbox', { name: 'Mon' }).check();
  await a.getByRole('checkbox', { name: 'Wed' }).check();
  await vote(a); await voted(a);
  await a.locator('.bar-row[data-votes="1"]').nth(1).waitFor();
  env.assertClean(a);
});

test('ranked: drag to reorder, the rounds shown', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Rank the languages', type: 'ranked', options: ['C', 'Go', 'Rust', 'Zig'] });
  assert.equal((await getPoll(id)).type, 'ranked');
  await a.goto(env.url(`/p/${id}`));
  const items = a.locator('.rank-item');
  await items.first().waitFor();
  // drag Zig (last) onto the top of C (first)
  await a.locator('.rank-item', { hasText: 'Zig' }).dragTo(a.locator('.rank-item', { hasText: 'C' }).first(), { targetPosition: { x: 20, y: 3 } });
  const order = await a.locator('.rank-label').allTextContents();
  assert.equal(order[0], 'Zig', `after dragging: ${order}`);
  await shot(a, 'vote-ranked-desktop');
  await vote(a); await voted(a);
  assert.deepEqual(await a.locator('.voted .summary li').allTextContents(), order);
  const b = await env.open();
  await b.goto(env.url(`/p/${id}`));
  await b.getByRole('button', { name: 'Move Go up' }).click();
  await vote(b); await voted(b);
  await a.locator('.results[data-total="2"]').waitFor();
  await a.locator('.rounds .rounds-table tbody tr').first().waitFor();
  assert.ok(await a.locator('.winner').isVisible());
  // a row per option, a column per round
  assert.equal(await a.locator('.rounds-table tbody tr').count(), 4);
  await a.goto(env.url(`/p/${id}/results`));
  await a.locator('.results[data-total="2"] .rounds-table').waitFor();
  await shot(a, 'results-ranked-desktop');
  env.assertClean(a); env.assertClean(b);
  assert.equal(env.assertProofOfWork(b), 1);
});

test('score: radio rows, means in the results', async () => {
  const a = await env.open();
  const id = await createPollUI(a, env, { title: 'Rate the talks', type: 'score', options: ['Keynote', 'Workshop', 'Panel'], maxScore: 4 });
  const poll = await getPoll(id);
  assert.equal(poll.type, 'score');
  assert.equal(poll.settings.max_score, 4);
  await a.goto(env.url(`/p/${id}`));
  const row = (label) => a.locator('fieldset.score-row', { hasText: label });
  await row('Keynote').getByRole('radio', { name: '4', exact: true }).check();
  await row('Workshop').getByRole('radio', { name: '2', exact: true }).check();
  await shot(a, 'vote-score-desktop');
  await vote(a); await voted(a);
  await a.locator('.bar-row', { hasText: 'Keynote' }).getByText(/4\.00 \/ 4 avg/).waitFor();
  const p = await env.open(PHONE, { isMobile: true });
  await p.goto(env.url(`/p/${id}`));
  await p.locator('fieldset.score-row').first().waitFor();
  await noHorizontalScroll(p, 'score vote page');
  env.assertClean(a); env.assertClean(p);
});

test('the create form marks every invalid field at once, in words a person uses', async () => {
  const a = await env.open();
  await a.goto(env.url('/'));
  await a.locator('input[type=radio][value="multiple"]').check();
  await a.getByLabel('Option 2', { exact: true }).fill('Same');
  await a.getByRole('button', { name: '+ Add option' }).click();
  await a.getByLabel('Option 3', { exact: true }).fill(' same ');
  await a.getByLabel('Minimum choices').fill('5');
  await a.getByLabel('Maximum choices').fill('0');
  await a.getByLabel('Closes at (optional)').fill('2020-01-01T10:00');
  await a.getByRole('button', { name: 'Create poll' }).click();
  const summary = a.locator('form.create > p[role="alert"]');
  await summary.getByText('Please fix the 6 fields marked below:').waitFor();
  const expected = [
    ['Question', 'Enter the question.'],
    ['Option 1', 'Enter the text of option 1, or remove it.'],
    ['Option 3', 'Option 3 is the same as option 2.'],
    ['Minimum choices', 'The minimum number of choices must be a whole number from 1 to 3 (the number of options).'],
    ['Maximum choices', 'The maximum number of choices must be a whole number from 1 to 3 (the number of options).'],
    ['Closes at (optional)', 'The closing time must be in the future.'],
  ];
  assert.deepEqual(await summary.locator('li').allTextContents(), expected.map(([, m]) => m));
  for (const [label, msg] of expected) {
    const input = a.getByLabel(label, { exact: true });
    assert.equal(await input.getAttribute('aria-invalid'), 'true', `${label} is not marked`);
    // the message is next to the field and read with it
    const errId = (await input.getAttribute('aria-describedby')).split(' ').pop();
    assert.equal(await a.locator(`[id="${errId}"]`).textContent(), msg);
  }
  // no API field names in what the page says
  assert.doesNotMatch(await a.locator('main').textContent(), /_choices|max_score|end_time|start_time|options\[/);
  // nothing was sent; a summary link takes the focus to its field
  assert.deepEqual(a.rec.posts.filter((p) => p.path === '/v1/polls'), []);
  await summary.getByRole('link', { name: 'Option 3 is the same as option 2.' }).click();
  assert.equal(await a.evaluate(() => document.activeElement.value), ' same ');
  // fixed, it goes through
  await a.getByLabel('Question').fill('Fixed?');
  await a.getByLabel('Option 1', { exact: true }).fill('One');
  await a.getByLabel('Option 3', { exact: true }).fill('Three');
  await a.getByLabel('Minimum choices').fill('2');
  await a.getByLabel('Maximum choices').fill('3');
  await a.getByLabel('Closes at (optional)').fill('');
  await a.getByRole('button', { name: 'Create poll' }).click();
  await a.waitForURL(/\/share$/);
  env.assertClean(a);
});

test('errors only the server finds are shown next to the field they name', async () => {
  const a = await env.open();
  await api(env.server, 'POST', '/v1/auth/register', { body: { username: 'taken_name', password: 'longenough' } });
  await a.goto(env.url('/mine'));
  const form = a.locator('form[aria-label="Sign up"]');
  await form.getByLabel('Username').fill('taken_name');
  await form.getByLabel('Password').fill('longenough');
  await form.getByRole('button', { name: 'Sign up' }).click();
  await form.getByText('That username is taken. Choose another, or log in.').waitFor();
  assert.equal(await form.getByLabel('Username').getAttribute('aria-invalid'), 'true');
  env.assertClean(a);
});
