// Embeds in a real browser (issue 21): a page of another origin (another loopback port)
// carries the share page's one-line <script> snippet; the poll appears in an iframe of
// /embed/{id}, a voter votes inside it (anonymously, with the proof of work in the
// frame's worker) and sees the results move, and the frame is sized by postMessage. Every
// other page of the app, framed the same way, is refused by the browser
// (frame-ancestors 'none').
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { launch, DESKTOP } from './helpers.mjs';
import { api, createPoll, castVote, optionByText } from '../api/harness.mjs';

let env, site, siteUrl;
const pages = new Map(); // path -> html of the other origin's pages
before(async () => {
  env = await launch();
  site = http.createServer((req, res) => {
    const html = pages.get(req.url);
    res.writeHead(html ? 200 : 404, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end(html ?? 'not found');
  });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  // the same address, another port: another origin
  siteUrl = `http://127.0.0.1:${site.address().port}`;
});
after(async () => {
  await env?.close();
  await new Promise((r) => site?.close(r) ?? r());
});

test('the share page\'s snippet on another origin: vote inside the frame, the results move, the frame is sized', async () => {
  const owner = env.server.mint('embed-owner');
  const poll = await createPoll(env.server, owner, {
    title: 'Which talk next?', options: [{ text: 'Storage' }, { text: 'Networks' }, { text: 'Compilers' }],
    settings: { allow_anonymous: true },
  });
  // the owner copies the snippet from the share page
  const sharer = await env.open(DESKTOP);
  await sharer.addInitScript(([tok, id]) => {
    localStorage.setItem('tally.user', JSON.stringify({ user_id: id, username: 'owner', token: tok }));
  }, [owner, 'embed-owner']);
  await sharer.goto(env.url(`/p/${poll.poll_id}/share`));
  const snippet = await sharer.getByLabel('Embed code').inputValue();
  assert.equal(snippet, `<script src="${env.server.url}/embed.js" data-tally-poll="${poll.poll_id}" async></script>`);

  pages.set('/article', `<!doctype html><html><head><title>A blog post</title></head><body>
    <h1>Our conference</h1><p>Tell us what you want to hear.</p>
    ${snippet}
    <p>Thanks for voting.</p></body></html>`);
  const reader = await env.open(DESKTOP);
  await reader.goto(`${siteUrl}/article`);
  const iframe = reader.locator(`iframe[data-tally-poll="${poll.poll_id}"]`);
  await iframe.waitFor();
  const frame = reader.frameLocator(`iframe[data-tally-poll="${poll.poll_id}"]`);
  await frame.getByRole('heading', { name: 'Which talk next?' }).waitFor();
  await frame.locator('.results[data-state="live"]').waitFor();
  assert.equal(await frame.locator('.results').getAttribute('data-total'), '0');

  // someone else votes elsewhere: the frame's results move by themselves
  assert.equal((await castVote(env.server, env.server.mint('other-voter'), poll.poll_id, { option_id: optionByText(poll, 'Storage') })).status, 200);
  await frame.locator('.results[data-total="1"]').waitFor({ timeout: 10_000 });

  // the reader votes inside the frame
  await frame.getByRole('radio', { name: 'Compilers' }).check();
  await frame.getByRole('button', { name: 'Vote', exact: true }).click();
  await frame.getByText(/You voted/).waitFor({ timeout: 30_000 });
  await frame.locator('.results[data-total="2"]').waitFor({ timeout: 10_000 });
  const row = frame.locator('.bar-row', { hasText: 'Compilers' });
  assert.equal(await row.getAttribute('data-votes'), '1');
  const results = await api(env.server, 'GET', `/v1/polls/${poll.poll_id}/results`);
  assert.equal(results.json.total_votes, 2, 'the vote in the frame is counted');

  // the frame is as tall as its content says (postMessage), not the snippet's first guess
  await reader.waitForFunction((id) => {
    const f = document.querySelector(`iframe[data-tally-poll="${id}"]`);
    return f && f.style.height !== '420px';
  }, poll.poll_id, { timeout: 10_000 });
  const frameHeight = await iframe.evaluate((f) => f.getBoundingClientRect().height);
  const contentHeight = await frame.locator('html').evaluate((el) => el.getBoundingClientRect().height);
  assert.ok(Math.abs(frameHeight - Math.ceil(contentHeight)) <= 2, `iframe ${frameHeight}px, content ${contentHeight}px`);
  assert.deepEqual(reader.rec.pageErrors, [], 'no script errors');
  const csp = reader.rec.consoleErrors.filter((t) => /Content Security Policy/i.test(t));
  assert.deepEqual(csp, [], 'the embed breaks no CSP');
});

test('every other page refuses to be framed by another origin', async () => {
  const owner = env.server.mint('frame-owner');
  const poll = await createPoll(env.server, owner, { title: 'Framed?' });
  const paths = ['/', `/p/${poll.poll_id}`, `/p/${poll.poll_id}/share`, `/p/${poll.poll_id}/results`,
    `/p/${poll.poll_id}/present`, '/mine', '/j', '/r'];
  const page = await env.open(DESKTOP);
  for (const p of paths) {
    const key = `/frame-${paths.indexOf(p)}`;
    pages.set(key, `<!doctype html><html><body><iframe id="f" src="${env.server.url}${p}" width="600" height="400"></iframe></body></html>`);
    page.rec.consoleErrors.length = 0;
    const refused = page.waitForEvent('console', { predicate: (m) => /frame-ancestors/.test(m.text()), timeout: 10_000 });
    await page.goto(`${siteUrl}${key}`);
    await refused;
    // nothing of the app runs in the frame: its document is not the app's
    const child = page.frames().find((f) => f !== page.mainFrame());
    assert.ok(child, `${p}: a child frame`);
    assert.notEqual(child.url(), `${env.server.url}${p}`, `${p} loaded in the frame`);
  }
  // and the embed page is the one that does load
  pages.set('/frame-embed', `<!doctype html><html><body><iframe id="f" src="${env.server.url}/embed/${poll.poll_id}" width="600" height="400"></iframe></body></html>`);
  await page.goto(`${siteUrl}/frame-embed`);
  await page.frameLocator('#f').getByRole('heading', { name: 'Framed?' }).waitFor();
});
