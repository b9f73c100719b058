// The page's live results after the server goes away: it says it is reconnecting, and once
// the server is back (same address) it is live again by itself and shows what was voted
// meanwhile, without a reload.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createPoll, castVote, assertStatus } from '../api/harness.mjs';
import { launch, DESKTOP } from './helpers.mjs';

let env;
before(async () => { env = await launch(); });
after(async () => { await env?.close(); });

test('live results reconnect by themselves after the server is killed and started again', async () => {
  const { server } = env;
  const poll = await createPoll(server, server.mint('owner-reconnect'), { title: 'Still there?' });
  const [a, b] = poll.options.map((o) => o.option_id);
  assertStatus(await castVote(server, server.mint('before'), poll.poll_id, { option_id: a }), 200);
  const page = await env.open(DESKTOP);
  await page.goto(env.url(`/p/${poll.poll_id}/results`));
  await page.locator('.live-state[data-state="live"]').waitFor();
  await page.locator('.results[data-total="1"]').waitFor();

  await server.kill9();
  await page.locator('.live-state[data-state="reconnecting"]').waitFor({ timeout: 10_000 });
  await server.restart({ samePort: true });
  assertStatus(await castVote(server, server.mint('meanwhile'), poll.poll_id, { option_id: b }), 200);
  await page.locator('.results[data-total="2"]').waitFor({ timeout: 30_000 });
  await page.locator('.live-state[data-state="live"]').waitFor({ timeout: 5000 });

  // and it is live for real: the next vote shows within seconds
  assertStatus(await castVote(server, server.mint('after'), poll.poll_id, { option_id: b }), 200);
  await page.locator('.results[data-total="3"]').waitFor({ timeout: 5000 });
  assert.deepEqual(page.rec.pageErrors, []);
});
