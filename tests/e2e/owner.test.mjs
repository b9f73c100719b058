// The owner's controls in the app: edit (PATCH; options locked with the reason once a vote
// exists), close (then "Final results", no last-minute count), no reopen but "ask again",
// delete with confirmation; the receipt check page; join codes; My polls before and after
// signing up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launch, createPollUI, DESKTOP } from './helpers.mjs';
import { api, castVote, assertStatus, assertError, createPoll, results } from '../api/harness.mjs';

let env;
before(async () => { env = await launch({ powDifficulty: 0 }); });
after(async () => { await env?.close(); });

const getPoll = async (id) => (await api(env.server, 'GET', `/v1/polls/${id}`)).json;

test('edit, close (final results), ask again, delete: the owner’s controls on the poll page', async () => {
  const owner = await env.open(DESKTOP);
  const id = await createPollUI(owner, env, { title: 'Lunch?', options: ['Pizza', 'Sushi'] });
  await owner.goto(env.url(`/p/${id}`));
  const manage = owner.getByRole('region', { name: 'Manage this poll' });
  await manage.waitFor();

  // edit before any vote: everything may change
  await manage.getByRole('link', { name: 'Edit' }).click();
  await owner.getByRole('heading', { name: 'Edit the poll' }).waitFor();
  assert.equal(await owner.getByLabel('Question').inputValue(), 'Lunch?');
  assert.ok(await owner.locator('input[type=radio][value="single"]').isDisabled(), 'the type can be changed');
  await owner.getByLabel('Question').fill('Lunch on Friday?');
  await owner.getByRole('button', { name: '+ Add option' }).click();
  await owner.getByLabel('Option 3', { exact: true }).fill('Tacos');
  await owner.getByLabel('Who can see the results').selectOption('after_vote');
  const patches = [];
  owner.on('request', (r) => { if (r.method() === 'PATCH') patches.push(JSON.parse(r.postData())); });
  await owner.getByRole('button', { name: 'Save changes' }).click();
  await owner.waitForURL(env.url(`/p/${id}`));
  await owner.getByRole('status').filter({ hasText: 'Your changes are saved.' }).waitFor();
  // only what changed was sent
  assert.deepEqual(patches, [{
    title: 'Lunch on Friday?',
    options: [{ text: 'Pizza', display_order: 0 }, { text: 'Sushi', display_order: 1 }, { text: 'Tacos', display_order: 2 }],
    settings: { results_visibility: 'after_vote' },
  }]);
  const edited = await getPoll(id);
  assert.equal(edited.title, 'Lunch on Friday?');
  assert.deepEqual(edited.options.map((o) => o.text), ['Pizza', 'Sushi', 'Tacos']);

  // a vote: now the options are locked, and the page says why
  assertStatus(await castVote(env.server, env.server.mint('lunch-voter'), id, { option_id: edited.options[2].option_id }), 200);
  await owner.goto(env.url(`/p/${id}/edit`));
  await owner.getByText('The options cannot change: someone has voted, and their ballot was made for these options.').waitFor();
  assert.equal(await owner.getByLabel('Option 1', { exact: true }).getAttribute('readonly'), '');
  assert.equal(await owner.getByRole('button', { name: '+ Add option' }).count(), 0);
  await owner.getByLabel('Question').fill('Lunch on Friday at noon?');
  patches.length = 0;
  await owner.getByRole('button', { name: 'Save changes' }).click();
  await owner.getByRole('status').filter({ hasText: 'Your changes are saved.' }).waitFor();
  assert.deepEqual(patches, [{ title: 'Lunch on Friday at noon?' }]);

  // close, with a confirmation first
  await owner.getByRole('region', { name: 'Manage this poll' }).getByRole('button', { name: 'Close now' }).click();
  await owner.getByText('Close this poll? No more votes will be taken, and a closed poll cannot be reopened.').waitFor();
  await owner.getByRole('button', { name: 'Close poll' }).click();
  await owner.getByRole('alert').filter({ hasText: 'The poll is closed.' }).waitFor();
  assert.equal((await getPoll(id)).status, 'closed');
  // final results, and no "live" or "last minute" about them
  await owner.getByRole('heading', { name: 'Final results' }).waitFor();
  await owner.reload();
  await owner.getByRole('heading', { name: 'Final results' }).waitFor();
  await owner.locator('.results[data-total="1"]').waitFor();
  const text = await owner.locator('main').textContent();
  assert.doesNotMatch(text, /Live results|in the last minute/);
  assert.match(text, /This poll is closed\. No more votes are taken\./);
  // no reopen (the contract forbids it); ask again starts a new poll from this one
  await owner.getByText('A closed poll cannot be reopened: its final results are frozen.').waitFor();
  await owner.getByRole('link', { name: 'Ask again as a new poll' }).click();
  await owner.getByText('A new poll with the question and options of “Lunch on Friday at noon?”').waitFor();
  assert.equal(await owner.getByLabel('Question').inputValue(), 'Lunch on Friday at noon?');
  assert.deepEqual(await owner.locator('.option-row input[type=text]').evaluateAll((els) => els.map((e) => e.value)), ['Pizza', 'Sushi', 'Tacos']);
  await owner.getByRole('button', { name: 'Create poll' }).click();
  await owner.waitForURL(/\/share$/);
  const again = /\/p\/([A-Za-z0-9_-]+)\/share$/.exec(owner.url())[1];
  assert.notEqual(again, id);
  assert.equal((await getPoll(again)).status, 'active');

  // a closed poll's edit page: options and times locked, with why
  await owner.goto(env.url(`/p/${id}/edit`));
  await owner.getByText('The poll is closed: its options are part of its final results and cannot change.').waitFor();
  assert.ok(await owner.getByLabel('Closes at (optional)').isDisabled());

  // delete: Cancel keeps it, confirming deletes it
  await owner.goto(env.url(`/p/${id}`));
  const del = owner.getByRole('region', { name: 'Manage this poll' }).getByRole('button', { name: 'Delete', exact: true });
  await del.click();
  await owner.getByRole('button', { name: 'Cancel' }).click();
  assert.equal((await api(env.server, 'GET', `/v1/polls/${id}`)).status, 200);
  await del.click();
  await owner.getByText('Delete this poll and all its votes? This cannot be undone.').waitFor();
  await owner.getByRole('button', { name: 'Delete poll' }).click();
  await owner.waitForURL(env.url('/mine'));
  await owner.getByRole('status').filter({ hasText: 'The poll “Lunch on Friday at noon?” was deleted.' }).waitFor();
  assert.equal((await api(env.server, 'GET', `/v1/polls/${id}`)).status, 404);

  // someone else sees no owner controls
  const other = await env.open(DESKTOP);
  await other.goto(env.url(`/p/${again}`));
  await other.getByRole('button', { name: 'Vote', exact: true }).waitFor();
  assert.equal(await other.getByRole('region', { name: 'Manage this poll' }).count(), 0);
  await other.goto(env.url(`/p/${again}/edit`));
  await other.getByText('Only the poll’s owner can edit it.').waitFor();
  env.assertClean(owner); env.assertClean(other);
});

test('a vote that arrives while the owner edits: the refusal is shown at the options, and they lock', async () => {
  const owner = await env.open(DESKTOP);
  const id = await createPollUI(owner, env, { title: 'Race?', options: ['Left', 'Right'] });
  await owner.goto(env.url(`/p/${id}/edit`));
  await owner.getByLabel('Option 2', { exact: true }).waitFor();
  assertStatus(await castVote(env.server, env.server.mint('racer'), id, { option_id: (await getPoll(id)).options[0].option_id }), 200);
  await owner.getByLabel('Option 2', { exact: true }).fill('Straight on');
  await owner.getByRole('button', { name: 'Save changes' }).click();
  const msg = 'The options and the number of choices cannot change once someone has voted: the ballots cast were made for them.';
  await owner.locator('form.create > p[role="alert"]').getByText(msg).waitFor();
  await owner.locator('fieldset.options').getByText('The options cannot change: someone has voted, and their ballot was made for these options.').waitFor();
  assert.deepEqual((await getPoll(id)).options.map((o) => o.text), ['Left', 'Right']);
  env.assertClean(owner);
});

test('the receipt check page: from the vote page, by hand, and an unknown receipt', async () => {
  const owner = await env.open(DESKTOP);
  const id = await createPollUI(owner, env, { title: 'Receipts?', options: ['Keep', 'Toss'] });
  const voter = await env.open(DESKTOP);
  await voter.goto(env.url(`/p/${id}`));
  await voter.getByRole('radio', { name: 'Keep' }).check();
  await voter.getByRole('button', { name: 'Vote', exact: true }).click();
  const receipt = await voter.locator('.receipt-code').textContent();
  await voter.getByText('Keep it to check later that your ballot is counted.').waitFor();
  await voter.getByRole('link', { name: 'Check it now' }).click();
  await voter.waitForURL(env.url(`/r/${receipt}`));
  await voter.getByRole('heading', { name: '✓ Counted' }).waitFor();
  assert.equal(await voter.locator('.receipt-result dd a').textContent(), 'Receipts?');
  assert.equal(await voter.getByLabel('Receipt', { exact: true }).inputValue(), receipt);
  const recorded = (await api(env.server, 'GET', `/v1/receipts/${receipt}`)).json.recorded_at;
  const when = new Intl.DateTimeFormat('en-US', { dateStyle: 'medium', timeStyle: 'short' }).format(new Date(recorded));
  assert.equal(await voter.locator('.receipt-result dd').nth(1).textContent(), when);
  // by hand, from the footer: a mistyped one is not found, a malformed one is refused
  const c = await env.open(DESKTOP);
  await c.goto(env.url('/'));
  await c.getByRole('link', { name: 'Check a receipt' }).click();
  await c.getByLabel('Receipt', { exact: true }).fill('not a receipt!');
  await c.getByRole('button', { name: 'Check' }).click();
  await c.getByText('A receipt has only letters, digits, “-” and “_”. Check what you typed.').waitFor();
  await c.getByLabel('Receipt', { exact: true }).fill(`${receipt}x`);
  await c.getByRole('button', { name: 'Check' }).click();
  await c.getByRole('heading', { name: 'Not found' }).waitFor();
  await c.getByLabel('Receipt', { exact: true }).fill(receipt);
  await c.getByRole('button', { name: 'Check' }).click();
  await c.getByRole('heading', { name: '✓ Counted' }).waitFor();
  env.assertClean(voter); env.assertClean(c);
});

test('join codes: shown when the poll has one, typed in any case; an unknown code says so', async () => {
  const owner = await env.open(DESKTOP);
  const id = await createPollUI(owner, env, { title: 'Join me', options: ['In', 'Out'] });
  const poll = await getPoll(id);
  const p = await env.open(DESKTOP);
  if (poll.join_code) {
    // the share page shows it big; typed in lower case it leads to the poll
    await owner.locator('.join-code-box .big-code').getByText(poll.join_code.toUpperCase()).waitFor();
    await p.goto(env.url('/j'));
    await p.getByLabel('Join code').fill(poll.join_code.toLowerCase());
    await p.getByRole('button', { name: 'Go to the poll' }).click();
    await p.waitForURL(env.url(`/p/${id}`));
  } else {
    // a server without join codes: the share page offers the link only
    assert.equal(await owner.locator('.join-code-box').count(), 0);
    await owner.getByLabel('Link to the poll').waitFor();
  }
  // "1" is not in the code alphabet, so ABC123 names no poll on any server
  await p.goto(env.url('/j'));
  await p.getByLabel('Join code').fill('abc 123');
  await p.getByRole('button', { name: 'Go to the poll' }).click();
  await p.waitForURL(env.url('/j/ABC123'));
  await p.getByText('No open poll has the code ABC123. Check it, or ask for the link.').waitFor();
  env.assertClean(owner); env.assertClean(p, { allowConsole: [] });
});

test('My polls: polls made in this browser before signing up stay listed once and manageable after', async () => {
  const a = await env.open(DESKTOP);
  const id = await createPollUI(a, env, { title: 'Made before signing up', options: ['One', 'Two'] });
  await a.goto(env.url('/mine'));
  const section = a.getByRole('region', { name: 'Polls created in this browser' });
  await section.getByRole('link', { name: 'Made before signing up' }).waitFor();
  // signing up sends the device token, so that the server can link the device
  const device = await a.evaluate(() => JSON.parse(localStorage.getItem('tally.device')).token);
  const register = a.waitForRequest((r) => r.method() === 'POST' && new URL(r.url()).pathname === '/v1/auth/register');
  const form = a.locator('form[aria-label="Sign up"]');
  await form.getByLabel('Username').fill('before_after');
  await form.getByLabel('Password').fill('correct horse battery');
  await form.getByRole('button', { name: 'Sign up' }).click();
  assert.equal((await register).headers().authorization, `Bearer ${device}`);
  await a.getByText('Signed in as').waitFor();
  // the server linked the device: the poll is the account's, listed once, under My polls
  const user = await a.evaluate(() => JSON.parse(localStorage.getItem('tally.user')));
  await a.locator('main').getByText('What this browser did before is now your account’s: 1 poll and 0 votes.').waitFor();
  const item = a.getByRole('region', { name: 'My polls' }).locator('.poll-item', { hasText: 'Made before signing up' });
  await item.waitFor();
  assert.equal(await a.locator('.poll-item', { hasText: 'Made before signing up' }).count(), 1);
  assert.equal((await getPoll(id)).owner_id, user.user_id);
  await item.getByRole('button', { name: 'Close now' }).click();
  await item.getByRole('button', { name: 'Close poll' }).click();
  await item.getByText('The poll is closed.').waitFor();
  assert.equal((await getPoll(id)).status, 'closed');
  await item.getByText('A closed poll cannot be reopened').waitFor();
  env.assertClean(a);
});

// Issue 17: one person, one ballot across sign-up. The app sends its device token with the
// sign-up, the server links the device to the new account, and the ballot the device cast
// is the account's from then on.
test('one person, one ballot: vote anonymously, sign up, and the account has voted (a second ballot is 409, the total stays 1)', async () => {
  const poll = await createPoll(env.server, env.server.mint('link-owner'), {
    title: 'Tea or coffee?', options: [{ text: 'Tea' }, { text: 'Coffee' }], settings: { allow_anonymous: true },
  });
  const a = await env.open(DESKTOP);
  await a.goto(env.url(`/p/${poll.poll_id}`));
  await a.getByRole('radio', { name: 'Tea' }).check();
  await a.getByRole('button', { name: 'Vote', exact: true }).click();
  await a.getByRole('heading', { name: /You voted/ }).waitFor();
  assert.equal((await results(env.server, poll.poll_id)).json.total_votes, 1);

  await a.goto(env.url('/mine'));
  const form = a.locator('form[aria-label="Sign up"]');
  await form.getByLabel('Username').fill('one_ballot');
  await form.getByLabel('Password').fill('correct horse battery');
  await form.getByRole('button', { name: 'Sign up' }).click();
  await a.getByText('Signed in as').waitFor();
  await a.locator('main').getByText('What this browser did before is now your account’s: 0 polls and 1 vote.').waitFor();

  // the poll page, now as the account: it has voted
  await a.goto(env.url(`/p/${poll.poll_id}`));
  await a.getByRole('heading', { name: /You voted/ }).waitFor();
  const token = await a.evaluate(() => JSON.parse(localStorage.getItem('tally.user')).token);
  const again = await castVote(env.server, token, poll.poll_id, { option_id: poll.options[1].option_id });
  assertError(again, 409, 'ALREADY_VOTED');
  assert.equal((await results(env.server, poll.poll_id)).json.total_votes, 1);
  env.assertClean(a);
});
