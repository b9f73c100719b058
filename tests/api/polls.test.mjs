// Polls: create (validation, defaults, idempotency), get, patch, delete, list.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, assertIso, rand, sleep, isoIn, describe, createPoll, castVote,
  URL_SAFE,
} from './harness.mjs';

let server, owner, ownerTok, otherTok;
before(async () => {
  server = await startServer();
  owner = `owner-${rand()}`;
  ownerTok = await server.token(owner);
  otherTok = await server.token(`other-${rand()}`);
});
after(async () => { await server?.close(); });

const create = (body, token = ownerTok, headers) => api(server, 'POST', '/v1/polls', { token, body, headers });
const get = (id, token) => api(server, 'GET', `/v1/polls/${id}`, { token });
const patch = (id, body, token = ownerTok) => api(server, 'PATCH', `/v1/polls/${id}`, { token, body });
const del = (id, token = ownerTok) => api(server, 'DELETE', `/v1/polls/${id}`, { token });
const opts = (...texts) => texts.map((text) => ({ text }));

function assertPoll(p, what = 'poll') {
  const keys = ['poll_id', 'owner_id', 'title', 'description', 'type', 'options', 'start_time', 'end_time', 'status',
    'settings', 'created_at'];
  for (const k of keys) assert.ok(k in p, `${what} must have field ${k}: ${JSON.stringify(p)}`);
  assert.equal(typeof p.poll_id, 'string');
  assert.match(p.poll_id, URL_SAFE, 'poll_id must be URL-safe');
  assert.ok(p.poll_id.length >= 11, `poll_id must carry >= 64 random bits (>= 11 base64url chars): ${p.poll_id}`);
  assertIso(p.created_at, `${what}.created_at`);
  if (p.start_time !== null) assertIso(p.start_time, `${what}.start_time`);
  if (p.end_time !== null) assertIso(p.end_time, `${what}.end_time`);
  assert.ok(Array.isArray(p.options), 'options is an array');
  const ids = new Set();
  let prev = -Infinity;
  for (const o of p.options) {
    assert.deepEqual(Object.keys(o).sort(), ['display_order', 'option_id', 'text'],
      `option fields: ${JSON.stringify(o)}`);
    assert.equal(typeof o.option_id, 'string');
    assert.match(o.option_id, URL_SAFE, 'option_id must be URL-safe');
    assert.ok(!ids.has(o.option_id), `option ids must be unique: ${JSON.stringify(p.options)}`);
    ids.add(o.option_id);
    assert.ok(Number.isInteger(o.display_order), 'display_order is an integer');
    assert.ok(o.display_order >= prev, `options must be sorted by display_order: ${JSON.stringify(p.options)}`);
    prev = o.display_order;
  }
  const s = p.settings;
  assert.equal(typeof s, 'object');
  assert.equal(typeof s.show_results_during_voting, 'boolean', 'settings.show_results_during_voting');
  assert.ok(['always', 'after_vote', 'after_close', 'owner_only'].includes(s.results_visibility),
    `settings.results_visibility: ${s.results_visibility}`);
  assert.equal(typeof s.allow_anonymous, 'boolean', 'settings.allow_anonymous');
  assert.equal(typeof s.allow_vote_change, 'boolean', 'settings.allow_vote_change');
  assert.ok(Number.isInteger(s.min_choices), 'settings.min_choices');
  assert.ok(Number.isInteger(s.max_choices), 'settings.max_choices');
}

// ---- create ----------------------------------------------------------------------------

test('create minimal poll → 201 with Location, defaults and the full poll object', async () => {
  const before = Date.now();
  const res = await create({ title: 'Best language?', options: opts('Go', 'Rust', 'C') });
  assertStatus(res, 201, 'create');
  assert.equal(res.headers.get('content-type'), 'application/json; charset=utf-8');
  const p = res.json;
  assertPoll(p);
  assert.equal(res.headers.get('location'), `/v1/polls/${p.poll_id}`, 'Location header');
  assert.equal(p.owner_id, owner, 'owner_id is the token subject');
  assert.equal(p.title, 'Best language?');
  assert.equal(p.description, null, 'description is null when absent');
  assert.equal(p.type, 'single', 'type defaults to single');
  assert.equal(p.status, 'active', 'status defaults to active');
  assert.equal(p.end_time, null, 'end_time is null when absent');
  assert.deepEqual(p.options.map((o) => o.text), ['Go', 'Rust', 'C'], 'options keep the given order');
  assert.equal(p.settings.min_choices, 1, 'single: min_choices 1');
  assert.equal(p.settings.max_choices, 1, 'single: max_choices 1');
  // the settings' defaults, as docs/openapi.yaml states them
  assert.equal(p.settings.results_visibility, 'always', 'results_visibility defaults to always');
  assert.equal(p.settings.show_results_during_voting, true, 'show_results_during_voting defaults to true');
  assert.equal(p.settings.allow_anonymous, false, 'allow_anonymous defaults to false');
  assert.equal(p.settings.allow_vote_change, false, 'allow_vote_change defaults to false');
  const created = Date.parse(p.created_at);
  assert.ok(created >= before - 2000 && created <= Date.now() + 2000, `created_at is about now: ${p.created_at}`);
});

test('create with every field echoes them back; GET returns the same object without a token', async () => {
  const start = isoIn(-60_000);
  const end = isoIn(7 * 86400_000);
  const body = {
    title: 'Full poll', description: 'with everything', type: 'multiple',
    options: [{ text: 'Go', display_order: 0 }, { text: 'Rust', display_order: 1 }, { text: 'Zig', display_order: 2 }],
    start_time: start, end_time: end, status: 'active',
    settings: {
      show_results_during_voting: false, results_visibility: 'after_vote', allow_anonymous: true,
      allow_vote_change: false, min_choices: 1, max_choices: 2,
    },
  };
  const res = await create(body);
  assertStatus(res, 201, 'create');
  const p = res.json;
  assertPoll(p);
  assert.equal(p.title, body.title);
  assert.equal(p.description, body.description);
  assert.equal(p.type, 'multiple');
  assert.equal(p.start_time, start);
  assert.equal(p.end_time, end);
  assert.equal(p.status, 'active');
  assert.deepEqual(p.options.map(({ text, display_order }) => ({ text, display_order })), body.options);
  for (const [k, v] of Object.entries(body.settings)) assert.equal(p.settings[k], v, `settings.${k}`);
  const g = await get(p.poll_id);
  assertStatus(g, 200, 'GET poll without a token');
  assert.deepEqual(g.json, p, 'GET returns the created poll');
});

test('options are sorted by display_order', async () => {
  const res = await create({
    title: 'Order', options: [{ text: 'third', display_order: 2 }, { text: 'first', display_order: 0 },
      { text: 'second', display_order: 1 }],
  });
  assertStatus(res, 201);
  assert.deepEqual(res.json.options.map((o) => o.text), ['first', 'second', 'third']);
  assert.deepEqual(res.json.options.map((o) => o.display_order), [0, 1, 2]);
});

test('type defaults: multiple → min 1, max = number of options; score → max_score 5', async () => {
  const m = await create({ title: 'multi', type: 'multiple', options: opts('a', 'b', 'c', 'd') });
  assertStatus(m, 201, 'multiple');
  assert.equal(m.json.settings.min_choices, 1);
  assert.equal(m.json.settings.max_choices, 4);
  const a = await create({ title: 'approval', type: 'approval', options: opts('a', 'b', 'c') });
  assertStatus(a, 201, 'approval');
  assert.equal(a.json.settings.min_choices, 1);
  assert.equal(a.json.settings.max_choices, 3);
  const r = await create({ title: 'ranked', type: 'ranked', options: opts('a', 'b', 'c') });
  assertStatus(r, 201, 'ranked');
  assert.equal(r.json.settings.max_choices, 3);
  const s = await create({ title: 'score', type: 'score', options: opts('a', 'b') });
  assertStatus(s, 201, 'score');
  assert.equal(s.json.settings.max_score, 5, 'score polls default max_score to 5');
});

test('times without milliseconds are accepted and returned with milliseconds', async () => {
  const res = await create({ title: 'times', options: opts('a', 'b'), start_time: '2020-01-01T00:00:00Z',
    end_time: '2099-01-01T00:00:00Z' });
  assertStatus(res, 201);
  assert.equal(res.json.start_time, '2020-01-01T00:00:00.000Z');
  assert.equal(res.json.end_time, '2099-01-01T00:00:00.000Z');
});

test('create without a token → 401 UNAUTHENTICATED', async () => {
  const res = await create({ title: 'x', options: opts('a', 'b') }, null);
  assertError(res, 401, 'UNAUTHENTICATED');
  assert.match(res.headers.get('www-authenticate') || '', /^Bearer/, 'WWW-Authenticate: Bearer');
});

test('title limit is 300 characters (not bytes)', async () => {
  const t300 = 'ü'.repeat(300); // 600 bytes in UTF-8
  const ok = await create({ title: t300, options: opts('a', 'b') });
  assertStatus(ok, 201, '300-character multibyte title');
  assert.equal(ok.json.title, t300, 'title round-trips as UTF-8');
  const euro = '€'.repeat(300); // 900 bytes
  assertStatus(await create({ title: euro, options: opts('a', 'b') }), 201, '300 × € (3 bytes each)');
  assertError(await create({ title: 'ü'.repeat(301), options: opts('a', 'b') }), 400, 'VALIDATION_ERROR',
    { field: 'title' });
  assertError(await create({ title: 'x'.repeat(301), options: opts('a', 'b') }), 400, 'VALIDATION_ERROR',
    { field: 'title' });
});

test('option text limit is 200 characters; empty text is rejected', async () => {
  assertStatus(await create({ title: 't', options: opts('a', 'ö'.repeat(200)) }), 201, '200-char option text');
  assertError(await create({ title: 't', options: opts('a', 'ö'.repeat(201)) }), 400, 'VALIDATION_ERROR',
    { field: 'options[1].text' });
  assertError(await create({ title: 't', options: opts('a', '') }), 400, 'VALIDATION_ERROR',
    { field: 'options[1].text' });
});

test('2..100 options', async () => {
  const n = (k) => Array.from({ length: k }, (_, i) => ({ text: `option ${i}` }));
  assertError(await create({ title: 't', options: n(1) }), 400, 'VALIDATION_ERROR', { field: 'options' });
  assertError(await create({ title: 't', options: [] }), 400, 'VALIDATION_ERROR', { field: 'options' });
  assertError(await create({ title: 't', options: n(101) }), 400, 'VALIDATION_ERROR', { field: 'options' });
  const ok = await create({ title: 't', options: n(100) });
  assertStatus(ok, 201, '100 options');
  assert.equal(ok.json.options.length, 100);
  assertStatus(await create({ title: 't', options: n(2) }), 201, '2 options');
});

test('validation errors name the field', async () => {
  const base = { title: 'ok', options: opts('a', 'b', 'c') };
  const cases = [
    ['title missing', { options: base.options }, 'title'],
    ['title empty', { ...base, title: '' }, 'title'],
    ['title a number', { ...base, title: 5 }, 'title'],
    ['title null', { ...base, title: null }, 'title'],
    ['options a string', { ...base, options: 'x' }, 'options'],
    ['options missing', { title: 'ok' }, 'options'],
    ['option text a number', { ...base, options: [{ text: 'a' }, { text: 5 }] }, 'options[1].text'],
    ['option text missing', { ...base, options: [{ text: 'a' }, {}] }, 'options[1].text'],
    ['description a number', { ...base, description: 7 }, 'description'],
    ['unknown type', { ...base, type: 'plurality' }, 'type'],
    ['unknown status', { ...base, status: 'open' }, 'status'],
    ['settings not an object', { ...base, settings: 'x' }, 'settings'],
    ['unknown results_visibility', { ...base, settings: { results_visibility: 'sometimes' } },
      'settings.results_visibility'],
    ['max_choices a string', { ...base, type: 'multiple', settings: { max_choices: 'two' } }, 'settings.max_choices'],
    ['max_choices > options', { ...base, type: 'multiple', settings: { min_choices: 1, max_choices: 4 } },
      'settings.max_choices'],
    ['allow_anonymous a string', { ...base, settings: { allow_anonymous: 'yes' } }, 'settings.allow_anonymous'],
    ['end_time before start_time', { ...base, start_time: isoIn(3600_000), end_time: isoIn(1800_000) }, 'end_time'],
    ['end_time equal to start_time', { ...base, start_time: '2030-01-01T00:00:00.000Z',
      end_time: '2030-01-01T00:00:00.000Z' }, 'end_time'],
    ['start_time not a time', { ...base, start_time: 'tomorrow' }, 'start_time'],
    ['end_time month 13', { ...base, end_time: '2030-13-01T00:00:00Z' }, 'end_time'],
    ['end_time a number', { ...base, end_time: 1893456000 }, 'end_time'],
  ];
  for (const [name, body, field] of cases) {
    const res = await create(body);
    assert.equal(res.status, 400, `${name}: expected 400, got ${describe(res)}`);
    assertError(res, 400, 'VALIDATION_ERROR', { field });
  }
});

test('min_choices > max_choices → 400 VALIDATION_ERROR on a settings choice field', async () => {
  const res = await create({ title: 't', type: 'multiple', options: opts('a', 'b', 'c'),
    settings: { min_choices: 3, max_choices: 2 } });
  assertError(res, 400, 'VALIDATION_ERROR', { fieldMatch: /^settings\.(min|max)_choices$/ });
});

test('duplicate option texts → 400 VALIDATION_ERROR on options', async () => {
  const res = await create({ title: 't', options: opts('Same', 'Other', 'Same') });
  assertError(res, 400, 'VALIDATION_ERROR', { fieldMatch: /^options/ });
});

// ---- text as people see it (issue 15, item 11) -------------------------------------------

// Texts with no visible character: Unicode White_Space, default-ignorable and format characters.
const BLANK_TEXTS = [
  ['U+00A0 no-break space', '\u00a0'],
  ['U+3000 ideographic space', '\u3000\u3000'],
  ['U+200B zero width space', '\u200b'],
  ['ZWJ, BOM, word joiner', '\u200d\ufeff\u2060'],
  ['a mix with ASCII spaces', ' \u00a0\u200b\t\u2003 '],
  ['U+3164 Hangul filler', '\u3164'],
  ['right-to-left override and soft hyphen', '\u202e\u00ad'],
];

test('a title with no visible character → 400 VALIDATION_ERROR naming title, on create and on PATCH', async () => {
  const p = await createPoll(server, ownerTok);
  for (const [name, title] of BLANK_TEXTS) {
    const c = await create({ title, options: opts('a', 'b') });
    assertError(c, 400, 'VALIDATION_ERROR', { field: 'title' });
    assert.match(c.json.error.message, /no visible character/, `${name}: the message says why`);
    assertError(await patch(p.poll_id, { title }), 400, 'VALIDATION_ERROR', { field: 'title' });
  }
  assert.deepEqual((await get(p.poll_id)).json, p, 'refused patches change nothing');
});

test('an option text with no visible character → 400 VALIDATION_ERROR naming the option, on create and PATCH',
  async () => {
    const p = await createPoll(server, ownerTok);
    for (const [, text] of BLANK_TEXTS) {
      assertError(await create({ title: 't', options: opts('a', 'b', text) }), 400, 'VALIDATION_ERROR',
        { field: 'options[2].text' });
      assertError(await patch(p.poll_id, { options: opts(text, 'b') }), 400, 'VALIDATION_ERROR',
        { field: 'options[0].text' });
    }
    assert.deepEqual((await get(p.poll_id)).json, p, 'refused patches change nothing');
  });

test('option texts that read the same (case, surrounding or inner spacing, invisible characters, NFC vs NFD) → ' +
  '400 VALIDATION_ERROR naming the later option, on create and PATCH', async () => {
  const p = await createPoll(server, ownerTok);
  const cases = [
    ['case', ['Yes', 'No', 'yes']],
    ['a trailing space', ['Go', 'Rust', 'Go ']],
    ['NFC and NFD', ['Caf\u00e9', 'Tea', 'Cafe\u0301']],
    ['a zero width space', ['Go', 'Rust', 'G\u200bo']],
    ['no-break spaces inside', ['New York', 'Boston', 'new\u00a0\u00a0york']],
  ];
  for (const [name, texts] of cases) {
    const c = await create({ title: 't', options: opts(...texts) });
    assertError(c, 400, 'VALIDATION_ERROR', { field: 'options[2].text' });
    assert.match(c.json.error.message, /unique/, `${name}: the message says why`);
    assertError(await patch(p.poll_id, { options: opts(...texts) }), 400, 'VALIDATION_ERROR',
      { field: 'options[2].text' });
  }
  assert.deepEqual((await get(p.poll_id)).json, p, 'refused patches change nothing');
  const ok = await create({ title: 't', options: opts('Go', 'Go!', 'G o', 'C', 'C#', 'x2', 'x\u00b2') });
  assertStatus(ok, 201, 'texts a reader tells apart');
});

test('titles and option texts are stored trimmed of spaces at both ends (Unicode ones too), otherwise as typed',
  async () => {
    const c = await create({ title: ' \u00a0 Best  language?\u3000\n',
      options: opts('  Caf\u00e9 ', 'Cafe\u0301 au lait', '\tI \u2764\ufe0f Go\u2003') });
    assertStatus(c, 201);
    assert.equal(c.json.title, 'Best  language?');
    assert.deepEqual(c.json.options.map((o) => o.text), ['Caf\u00e9', 'Cafe\u0301 au lait', 'I \u2764\ufe0f Go'],
      'trimmed; NFD and emoji variation selectors kept as typed');
    assert.deepEqual((await get(c.json.poll_id)).json, c.json, 'GET shows the same');
    const r = await patch(c.json.poll_id, { title: '\u3000Renamed ', options: opts(' Yes', 'No ') });
    assertStatus(r, 200);
    assert.equal(r.json.title, 'Renamed');
    assert.deepEqual(r.json.options.map((o) => o.text), ['Yes', 'No']);
    // the 300-character limit counts what is kept
    assertStatus(await create({ title: `  ${'x'.repeat(300)}  `, options: opts('a', 'b') }), 201);
  });

test('non-object body → 400 VALIDATION_ERROR; malformed JSON and invalid UTF-8 → 400 INVALID_JSON', async () => {
  assertError(await api(server, 'POST', '/v1/polls', { token: ownerTok, raw: '[{"title":"x"}]' }), 400,
    'VALIDATION_ERROR');
  assertError(await api(server, 'POST', '/v1/polls', { token: ownerTok, raw: '"just a string"' }), 400,
    'VALIDATION_ERROR');
  assertError(await api(server, 'POST', '/v1/polls', { token: ownerTok, raw: '{"title":"x", "options": [' }), 400,
    'INVALID_JSON');
  const bad = Buffer.concat([Buffer.from('{"title":"bad '), Buffer.from([0xc3, 0x28]),
    Buffer.from(' utf8","options":[{"text":"a"},{"text":"b"}]}')]);
  assertError(await api(server, 'POST', '/v1/polls', { token: ownerTok, raw: bad }), 400, 'INVALID_JSON');
  const badOpt = Buffer.concat([Buffer.from('{"title":"t","options":[{"text":"a"},{"text":"'),
    Buffer.from([0xff, 0xfe]), Buffer.from('"}]}')]);
  assertError(await api(server, 'POST', '/v1/polls', { token: ownerTok, raw: badOpt }), 400, 'INVALID_JSON');
});

// ---- idempotency -------------------------------------------------------------------------

test('Idempotency-Key: same key and body → same poll (201 again); different body → 422', async () => {
  const key = `idem-${rand()}`;
  const body = { title: 'Idempotent poll', options: opts('a', 'b') };
  const r1 = await create(body, ownerTok, { 'Idempotency-Key': key });
  assertStatus(r1, 201, 'first create');
  const r2 = await create(body, ownerTok, { 'Idempotency-Key': key });
  assertStatus(r2, 201, 'retry with the same key and body');
  assert.equal(r2.json.poll_id, r1.json.poll_id, 'the retry returns the same poll');
  assert.equal(r2.headers.get('location'), `/v1/polls/${r1.json.poll_id}`);
  const r3 = await create({ ...body, title: 'Something else' }, ownerTok, { 'Idempotency-Key': key });
  assertError(r3, 422, 'IDEMPOTENCY_KEY_REUSED');
  // only one poll was created for the key
  const list = await api(server, 'GET', '/v1/polls?mine=1&limit=100', { token: ownerTok });
  assertStatus(list, 200);
  assert.equal(list.json.items.filter((p) => p.title === 'Idempotent poll').length, 1, 'exactly one poll created');
});

test('Idempotency-Key is scoped to the caller', async () => {
  const key = `shared-${rand()}`;
  const body = { title: 'Scoped key', options: opts('a', 'b') };
  const r1 = await create(body, ownerTok, { 'Idempotency-Key': key });
  const r2 = await create(body, otherTok, { 'Idempotency-Key': key });
  assertStatus(r1, 201);
  assertStatus(r2, 201);
  assert.notEqual(r2.json.poll_id, r1.json.poll_id, 'another caller with the same key gets its own poll');
  assert.notEqual(r2.json.owner_id, r1.json.owner_id);
});

test('Idempotency-Key longer than 255 characters → 400 VALIDATION_ERROR', async () => {
  const res = await create({ title: 'k', options: opts('a', 'b') }, ownerTok, { 'Idempotency-Key': 'k'.repeat(256) });
  assertError(res, 400, 'VALIDATION_ERROR');
});

// ---- get -------------------------------------------------------------------------------

test('GET unknown poll → 404 POLL_NOT_FOUND', async () => {
  assertError(await get('doesNotExist123'), 404, 'POLL_NOT_FOUND');
  assertError(await get('doesNotExist123', ownerTok), 404, 'POLL_NOT_FOUND');
});

test('a draft is visible only to its owner', async () => {
  const p = await createPoll(server, ownerTok, { status: 'draft' });
  assert.equal(p.status, 'draft');
  const mine = await get(p.poll_id, ownerTok);
  assertStatus(mine, 200, 'owner sees the draft');
  assert.equal(mine.json.status, 'draft');
  assertError(await get(p.poll_id), 404, 'POLL_NOT_FOUND');
  assertError(await get(p.poll_id, otherTok), 404, 'POLL_NOT_FOUND');
});

test('GET a closed poll works without a token', async () => {
  const p = await createPoll(server, ownerTok);
  assertStatus(await patch(p.poll_id, { status: 'closed' }), 200, 'close');
  const g = await get(p.poll_id);
  assertStatus(g, 200);
  assert.equal(g.json.status, 'closed');
});

// ---- patch -------------------------------------------------------------------------------

test('PATCH by the owner updates title and description → 200 with the updated poll', async () => {
  const p = await createPoll(server, ownerTok);
  const res = await patch(p.poll_id, { title: 'Renamed', description: 'now described' });
  assertStatus(res, 200, 'patch');
  assertPoll(res.json);
  assert.equal(res.json.title, 'Renamed');
  assert.equal(res.json.description, 'now described');
  assert.equal(res.json.poll_id, p.poll_id);
  assert.deepEqual(res.json.options, p.options, 'options unchanged');
  const g = await get(p.poll_id);
  assert.deepEqual(g.json, res.json, 'GET shows the update');
});

test('PATCH by another user → 403 FORBIDDEN; without a token → 401; unknown poll → 404', async () => {
  const p = await createPoll(server, ownerTok);
  assertError(await patch(p.poll_id, { title: 'hijack' }, otherTok), 403, 'FORBIDDEN');
  assertError(await patch(p.poll_id, { title: 'hijack' }, null), 401, 'UNAUTHENTICATED');
  assertError(await patch('noSuchPoll12345', { title: 'x' }), 404, 'POLL_NOT_FOUND');
  assert.equal((await get(p.poll_id)).json.title, p.title, 'title unchanged');
});

test('PATCH validates fields like create', async () => {
  const p = await createPoll(server, ownerTok);
  assertError(await patch(p.poll_id, { title: '' }), 400, 'VALIDATION_ERROR', { field: 'title' });
  assertError(await patch(p.poll_id, { title: 'x'.repeat(301) }), 400, 'VALIDATION_ERROR', { field: 'title' });
  assertError(await patch(p.poll_id, { status: 'paused' }), 400, 'VALIDATION_ERROR', { field: 'status' });
  assertError(await patch(p.poll_id, { settings: { results_visibility: 'never' } }), 400, 'VALIDATION_ERROR',
    { field: 'settings.results_visibility' });
  assertError(await patch(p.poll_id, { start_time: isoIn(3600_000), end_time: isoIn(1000_000) }), 400,
    'VALIDATION_ERROR', { field: 'end_time' });
  assertError(await api(server, 'PATCH', `/v1/polls/${p.poll_id}`, { token: ownerTok, raw: '{"title":' }), 400,
    'INVALID_JSON');
  assert.deepEqual((await get(p.poll_id)).json, p, 'rejected patches change nothing');
});

test('PATCH settings merges into the existing settings', async () => {
  const p = await createPoll(server, ownerTok, { type: 'multiple', settings: { min_choices: 1, max_choices: 2 } });
  const res = await patch(p.poll_id, { settings: { results_visibility: 'owner_only' } });
  assertStatus(res, 200);
  assert.equal(res.json.settings.results_visibility, 'owner_only');
  assert.equal(res.json.settings.max_choices, 2, 'other settings are kept');
  assert.equal(res.json.settings.min_choices, 1, 'other settings are kept');
});

test('status transitions: draft→active, draft→closed, active→closed; others → 409', async () => {
  const d1 = await createPoll(server, ownerTok, { status: 'draft' });
  const r1 = await patch(d1.poll_id, { status: 'active' });
  assertStatus(r1, 200, 'draft → active');
  assert.equal(r1.json.status, 'active');
  assertError(await patch(d1.poll_id, { status: 'draft' }), 409, 'INVALID_STATUS_TRANSITION');
  const r2 = await patch(d1.poll_id, { status: 'closed' });
  assertStatus(r2, 200, 'active → closed');
  assert.equal(r2.json.status, 'closed');
  assertError(await patch(d1.poll_id, { status: 'active' }), 409, 'INVALID_STATUS_TRANSITION');
  assertError(await patch(d1.poll_id, { status: 'draft' }), 409, 'INVALID_STATUS_TRANSITION');

  const d2 = await createPoll(server, ownerTok, { status: 'draft' });
  const r3 = await patch(d2.poll_id, { status: 'closed' });
  assertStatus(r3, 200, 'draft → closed');
  assert.equal(r3.json.status, 'closed');
  assert.equal((await get(d2.poll_id)).json.status, 'closed');
});

test('PATCH options before any vote → 200; after a vote → 409 POLL_HAS_VOTES', async () => {
  const p = await createPoll(server, ownerTok);
  const res = await patch(p.poll_id, { options: opts('X', 'Y') });
  assertStatus(res, 200, 'replace options with no votes');
  assert.deepEqual(res.json.options.map((o) => o.text), ['X', 'Y']);
  const voter = await server.token(`voter-${rand()}`);
  const v = await castVote(server, voter, p.poll_id, { option_id: res.json.options[0].option_id });
  assertStatus(v, 200, 'vote');
  assertError(await patch(p.poll_id, { options: opts('P', 'Q') }), 409, 'POLL_HAS_VOTES');
  assert.deepEqual((await get(p.poll_id)).json.options, res.json.options, 'options unchanged');
  const t = await patch(p.poll_id, { title: 'Title may still change' });
  assertStatus(t, 200, 'title change after votes');
});

test('PATCH options validates them', async () => {
  const p = await createPoll(server, ownerTok);
  assertError(await patch(p.poll_id, { options: opts('only one') }), 400, 'VALIDATION_ERROR', { field: 'options' });
  assertError(await patch(p.poll_id, { options: opts('a', '') }), 400, 'VALIDATION_ERROR',
    { field: 'options[1].text' });
});

// ---- delete ------------------------------------------------------------------------------

test('DELETE: owner only → 204; then the poll is gone', async () => {
  const p = await createPoll(server, ownerTok);
  assertError(await del(p.poll_id, otherTok), 403, 'FORBIDDEN');
  assertError(await del(p.poll_id, null), 401, 'UNAUTHENTICATED');
  assertStatus(await get(p.poll_id), 200, 'still there after refused deletes');
  const res = await del(p.poll_id);
  assert.equal(res.status, 204, `delete: ${describe(res)}`);
  assert.equal(res.text, '', '204 has no body');
  assertError(await get(p.poll_id), 404, 'POLL_NOT_FOUND');
  assertError(await get(p.poll_id, ownerTok), 404, 'POLL_NOT_FOUND');
  assertError(await del(p.poll_id), 404, 'POLL_NOT_FOUND');
  const voter = await server.token(`voter-${rand()}`);
  assertError(await castVote(server, voter, p.poll_id, { option_id: p.options[0].option_id }), 404, 'POLL_NOT_FOUND');
});

// ---- list ----------------------------------------------------------------------------------

test('GET /v1/polls?mine=1 requires a token', async () => {
  assertError(await api(server, 'GET', '/v1/polls?mine=1'), 401, 'UNAUTHENTICATED');
});

test('list: newest first, cursor pagination until next_cursor is null, only my polls', async () => {
  const me = await server.token(`lister-${rand()}`);
  const ids = [];
  for (let i = 0; i < 5; i++) {
    ids.push((await createPoll(server, me, { title: `list ${i}`, status: i === 2 ? 'draft' : 'active' })).poll_id);
    await sleep(5);
  }
  await createPoll(server, otherTok, { title: 'not mine' });
  const seen = [];
  let cursor = null;
  let pages = 0;
  do {
    const q = `/v1/polls?mine=1&limit=2${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const res = await api(server, 'GET', q, { token: me });
    assertStatus(res, 200, `list page ${pages}`);
    assert.ok(Array.isArray(res.json.items), 'items is an array');
    assert.ok('next_cursor' in res.json, 'next_cursor is present');
    assert.ok(res.json.items.length <= 2, `limit=2 gives at most 2 items, got ${res.json.items.length}`);
    for (const p of res.json.items) assertPoll(p, 'listed poll');
    seen.push(...res.json.items.map((p) => p.poll_id));
    cursor = res.json.next_cursor;
    pages++;
    assert.ok(pages <= 10, 'pagination terminates');
  } while (cursor !== null);
  assert.deepEqual(seen, [...ids].reverse(), 'all my polls (drafts included), newest first, each once');
});

test('list: default limit 20, limit=100 allowed', async () => {
  const me = await server.token(`many-${rand()}`);
  for (let i = 0; i < 22; i++) await createPoll(server, me, { title: `many ${i}` });
  const d = await api(server, 'GET', '/v1/polls?mine=1', { token: me });
  assertStatus(d, 200);
  assert.equal(d.json.items.length, 20, 'default page size is 20');
  assert.equal(typeof d.json.next_cursor, 'string', 'next_cursor is set when more remain');
  const next = await api(server, 'GET', `/v1/polls?mine=1&cursor=${encodeURIComponent(d.json.next_cursor)}`,
    { token: me });
  assertStatus(next, 200);
  assert.equal(next.json.items.length, 2, 'second page holds the rest');
  assert.equal(next.json.next_cursor, null);
  const all = await api(server, 'GET', '/v1/polls?mine=1&limit=100', { token: me });
  assertStatus(all, 200);
  assert.equal(all.json.items.length, 22);
  assert.equal(all.json.next_cursor, null);
});

test('list: deleted polls disappear', async () => {
  const me = await server.token(`deleter-${rand()}`);
  const a = await createPoll(server, me);
  const b = await createPoll(server, me);
  assert.equal((await del(b.poll_id, me)).status, 204);
  const res = await api(server, 'GET', '/v1/polls?mine=1', { token: me });
  assertStatus(res, 200);
  assert.deepEqual(res.json.items.map((p) => p.poll_id), [a.poll_id]);
});

test('list: invalid limit or cursor → 400 VALIDATION_ERROR naming it', async () => {
  for (const limit of ['0', '101', 'abc', '-1', '1.5']) {
    assertError(await api(server, 'GET', `/v1/polls?mine=1&limit=${limit}`, { token: ownerTok }), 400,
      'VALIDATION_ERROR', { field: 'limit' });
  }
  for (const cursor of ['garbage!!', '!!!', '{"a":1}']) {
    assertError(await api(server, 'GET', `/v1/polls?mine=1&cursor=${encodeURIComponent(cursor)}`, { token: ownerTok }),
      400, 'VALIDATION_ERROR', { field: 'cursor' });
  }
  assertStatus(await api(server, 'GET', '/v1/polls?mine=1&limit=1', { token: ownerTok }), 200, 'limit=1');
});
