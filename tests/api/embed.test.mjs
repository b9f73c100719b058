// Embeds (issue 21): the embed page is the only page that may be framed; oEmbed answers
// with the fields the oEmbed spec (oembed.com, section 2.3.4) requires of a rich type;
// a poll's page carries the Open Graph tags the protocol requires (og:title, og:type,
// og:image, og:url) and a Twitter card, server-side, with an oEmbed discovery link; the
// results image they name is an SVG drawn by the server.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  startServer, api, assertStatus, assertError, describe, createPoll, castVote, optionByText, rand,
} from './harness.mjs';

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../web');
const PUBLIC = 'https://polls.example.org';
let server, owner;
before(async () => {
  server = await startServer({ args: ['--web-root', WEB, '--public-url', PUBLIC + '/'] });
  owner = server.mint(`embed-owner-${rand()}`);
});
after(async () => { await server?.close(); });

const csp = (r) => r.headers.get('content-security-policy') ?? '';
/** <meta property|name="key" content="..."> of an HTML head, unescaped */
function meta(html, key) {
  const re = new RegExp(`<meta (?:property|name)="${key.replace(/[.:]/g, '\\$&')}" content="([^"]*)">`);
  const m = re.exec(html);
  return m ? m[1].replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&amp;/g, '&') : null;
}

test('GET /embed/{id}: a page made to be framed (frame-ancestors *), with the question in it', async () => {
  const poll = await createPoll(server, owner, { title: 'Tea <or> "coffee" & cake?' });
  const r = await api(server, 'GET', `/embed/${poll.poll_id}`);
  assertStatus(r, 200);
  assert.equal(r.headers.get('content-type'), 'text/html; charset=utf-8');
  assert.match(csp(r), /frame-ancestors \*/);
  assert.doesNotMatch(csp(r), /frame-ancestors 'none'/);
  assert.match(csp(r), /script-src 'self'/, 'the embed still runs only its own scripts');
  assert.ok(r.text.includes('Tea &lt;or&gt; &quot;coffee&quot; &amp; cake?'), 'the title, escaped');
  assert.ok(r.text.includes('src="/js/embed.js"'));
  assertError(await api(server, 'GET', '/embed/AAAAAAAAAAAAAAAA'), 404, 'POLL_NOT_FOUND');
  const draft = await createPoll(server, owner, { status: 'draft' });
  assertError(await api(server, 'GET', `/embed/${draft.poll_id}`), 404, 'POLL_NOT_FOUND');
});

test('every other page refuses to be framed', async () => {
  const poll = await createPoll(server, owner);
  for (const p of ['/', `/p/${poll.poll_id}`, `/p/${poll.poll_id}/share`, `/p/${poll.poll_id}/results`,
    `/p/${poll.poll_id}/present`, '/mine', '/j', '/r', '/index.html', '/embed.js', '/js/embed.js']) {
    const r = await api(server, 'GET', p);
    assertStatus(r, 200, p);
    assert.match(csp(r), /frame-ancestors 'none'/, `${p}: ${csp(r)}`);
  }
});

test('oEmbed: a rich response with the spec\'s required fields, an iframe of the embed page', async () => {
  const poll = await createPoll(server, owner, { title: 'Best editor?' });
  const url = `${PUBLIC}/p/${poll.poll_id}`;
  const r = await api(server, 'GET', `/oembed?url=${encodeURIComponent(url)}&format=json`);
  assertStatus(r, 200);
  assert.match(r.headers.get('content-type'), /^application\/json/);
  const o = r.json;
  // required of every response, and of the rich type (oEmbed 2.3.4, 2.3.4.4)
  assert.equal(o.type, 'rich');
  assert.equal(o.version, '1.0');
  assert.equal(typeof o.html, 'string');
  assert.ok(Number.isInteger(o.width) && o.width > 0, `width ${o.width}`);
  assert.ok(Number.isInteger(o.height) && o.height > 0, `height ${o.height}`);
  // optional ones, as tally gives them
  assert.equal(o.title, 'Best editor?');
  assert.equal(o.provider_name, 'tally');
  assert.equal(o.provider_url, PUBLIC);
  assert.equal(o.thumbnail_url, `${PUBLIC}/v1/polls/${poll.poll_id}/results.svg`);
  assert.ok(Number.isInteger(o.thumbnail_width) && Number.isInteger(o.thumbnail_height), 'thumbnail size with the URL');
  const src = /<iframe src="([^"]+)" width="(\d+)" height="(\d+)"/.exec(o.html);
  assert.ok(src, o.html);
  assert.equal(src[1], `${PUBLIC}/embed/${poll.poll_id}`);
  assert.equal(Number(src[2]), o.width);
  assert.equal(Number(src[3]), o.height);
  // without format (json is the default), the embed URL itself, maxwidth/maxheight (2.2)
  const small = await api(server, 'GET', `/oembed?url=${encodeURIComponent(`${PUBLIC}/embed/${poll.poll_id}`)}&maxwidth=300&maxheight=200`);
  assertStatus(small, 200);
  assert.ok(small.json.width <= 300 && small.json.height <= 200, JSON.stringify(small.json));
  // the spec's errors: 501 for a format not offered, 404 for a URL that is no poll
  const xml = await api(server, 'GET', `/oembed?url=${encodeURIComponent(url)}&format=xml`);
  assertError(xml, 501, 'FORMAT_NOT_IMPLEMENTED');
  assertError(await api(server, 'GET', `/oembed?url=${encodeURIComponent(`${PUBLIC}/mine`)}`), 404, 'NOT_FOUND');
  assertError(await api(server, 'GET', `/oembed?url=${encodeURIComponent(`${PUBLIC}/p/AAAAAAAAAAAAAAAA`)}`), 404, 'POLL_NOT_FOUND');
  assertError(await api(server, 'GET', '/oembed'), 400, 'VALIDATION_ERROR', { field: 'url' });
  assertError(await api(server, 'GET', `/oembed?url=${encodeURIComponent(url)}&maxwidth=wide`), 400, 'VALIDATION_ERROR', { field: 'maxwidth' });
});

test("a poll's page: Open Graph's required tags, a Twitter card and the oEmbed link, in the served HTML", async () => {
  const title = 'Pizza <tonight> & "always"?';
  const poll = await createPoll(server, owner, { title, description: 'Friday plans' });
  const r = await api(server, 'GET', `/p/${poll.poll_id}`);
  assertStatus(r, 200);
  const head = r.text.slice(0, r.text.indexOf('</head>'));
  assert.ok(head.length > 0, 'a head');
  // the four properties Open Graph requires of every page (ogp.me, "Basic Metadata")
  assert.equal(meta(head, 'og:title'), title);
  assert.equal(meta(head, 'og:type'), 'website');
  assert.equal(meta(head, 'og:url'), `${PUBLIC}/p/${poll.poll_id}`);
  assert.equal(meta(head, 'og:image'), `${PUBLIC}/v1/polls/${poll.poll_id}/results.svg`);
  assert.equal(meta(head, 'og:description'), 'Friday plans');
  assert.equal(meta(head, 'twitter:card'), 'summary_large_image');
  assert.equal(meta(head, 'twitter:title'), title);
  assert.equal(meta(head, 'twitter:image'), meta(head, 'og:image'));
  assert.doesNotMatch(head, /<tonight>/, 'the title never as markup');
  const link = /<link rel="alternate" type="application\/json\+oembed" href="([^"]+)"/.exec(head);
  assert.ok(link, 'oEmbed discovery link');
  const href = link[1].replace(/&amp;/g, '&');
  assert.ok(href.startsWith(`${PUBLIC}/oembed?url=`), href);
  const discovered = await api(server, 'GET', href.slice(PUBLIC.length));
  assertStatus(discovered, 200, 'the discovery link answers');
  assert.equal(discovered.json.type, 'rich');
  // a draft or an unknown poll: the app's page as it is, no tags
  for (const id of [(await createPoll(server, owner, { status: 'draft' })).poll_id, 'AAAAAAAAAAAAAAAA']) {
    const p = await api(server, 'GET', `/p/${id}`);
    assertStatus(p, 200);
    assert.equal(meta(p.text, 'og:title'), null, `no tags for ${id}`);
  }
});

test('the results image: an SVG with the bars, counts only where everyone may see them', async () => {
  const poll = await createPoll(server, owner, { title: 'Tabs & spaces?', options: [{ text: 'Tabs' }, { text: 'Spaces <4>' }] });
  assertStatus(await castVote(server, server.mint(`v-${rand()}`), poll.poll_id, { option_id: optionByText(poll, 'Tabs') }), 200);
  const r = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results.svg`);
  assertStatus(r, 200);
  assert.equal(r.headers.get('content-type'), 'image/svg+xml');
  assert.match(r.headers.get('etag') ?? '', /^"/);
  assert.match(r.text, /^<svg xmlns="http:\/\/www.w3.org\/2000\/svg" width="1200" height="630"/);
  assert.ok(r.text.includes('Tabs &amp; spaces?') && r.text.includes('Spaces &lt;4&gt;'), 'texts escaped');
  assert.ok(r.text.includes('100.0% (1)'), describe(r));
  assert.ok(r.text.includes('1 vote'));
  const hidden = await createPoll(server, owner, { settings: { results_visibility: 'owner_only' } });
  assertStatus(await castVote(server, server.mint(`v-${rand()}`), hidden.poll_id, { option_id: optionByText(hidden, 'A') }), 200);
  const h = await api(server, 'GET', `/v1/polls/${hidden.poll_id}/results.svg`, { token: owner });
  assertStatus(h, 200);
  assert.doesNotMatch(h.text, /%/, 'no percentage of hidden results, even for the owner: the image is for everyone');
  assert.match(h.text, /Results are hidden/);
});
