// Identity: register, login, anonymous device tokens, /v1/auth/me and JWT verification.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, assertIso, signJwt, b64url, rand, sleep, describe,
} from './harness.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.close(); });

const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
const uname = (prefix = 'u') => `${prefix}_${rand(5)}`;

function register(body) {
  return api(server, 'POST', '/v1/auth/register', { body });
}
function me(token, headers) {
  return api(server, 'GET', '/v1/auth/me', { token, headers });
}
function assertUnauthenticated(res) {
  assertError(res, 401, 'UNAUTHENTICATED');
  const wa = res.headers.get('www-authenticate');
  assert.ok(wa && /^Bearer\b/.test(wa), `401 must carry "WWW-Authenticate: Bearer...", got ${wa}: ${describe(res)}`);
}
function assertTokenResponse(json, idField, res) {
  assert.equal(typeof json[idField], 'string', `${idField} must be a string: ${describe(res)}`);
  assert.ok(json[idField].length > 0, `${idField} must not be empty`);
  assert.equal(typeof json.token, 'string', `token must be a string: ${describe(res)}`);
  assert.match(json.token, JWT_SHAPE, 'token must be a JWT (header.payload.signature)');
  assertIso(json.expires_at, 'expires_at');
  assert.ok(Date.parse(json.expires_at) > Date.now(), `expires_at must be in the future: ${json.expires_at}`);
}

// ---- register ------------------------------------------------------------------------

test('register → 201 {user_id, token, expires_at}; the token identifies the user on /v1/auth/me', async () => {
  const username = uname('alice');
  const res = await register({ username, password: 'correct horse battery' });
  assertStatus(res, 201, 'register');
  assert.match(res.headers.get('content-type') || '', /^application\/json/, 'JSON content type');
  assertTokenResponse(res.json, 'user_id', res);
  const m = await me(res.json.token);
  assertStatus(m, 200, 'GET /v1/auth/me with the register token');
  assert.deepEqual(m.json, { user_id: res.json.user_id, username, anonymous: false },
    `me for a registered user: ${m.text}`);
});

test('register accepts an optional email', async () => {
  const res = await register({ username: uname('mail'), password: 'password123', email: 'someone@example.com' });
  assertStatus(res, 201, 'register with email');
  assertTokenResponse(res.json, 'user_id', res);
});

test('register: username length and charset boundaries', async () => {
  for (const username of ['abc', 'a'.repeat(26) + rand(3), `A.b-c_${rand(2)}`]) {
    const res = await register({ username, password: 'password123' });
    assertStatus(res, 201, `username ${JSON.stringify(username)} (${username.length} chars) should be accepted`);
  }
  const bad = ['ab', 'a'.repeat(33), 'has space', 'héllo', 'semi;colon', 'slash/x', '', 'emoji😀x'];
  for (const username of bad) {
    const res = await register({ username, password: 'password123' });
    assertError(res, 400, 'VALIDATION_ERROR', { field: 'username' });
  }
});

test('register: missing or wrongly typed username/password → 400 VALIDATION_ERROR naming the field', async () => {
  assertError(await register({ password: 'password123' }), 400, 'VALIDATION_ERROR', { field: 'username' });
  assertError(await register({ username: 5, password: 'password123' }), 400, 'VALIDATION_ERROR', { field: 'username' });
  assertError(await register({ username: uname() }), 400, 'VALIDATION_ERROR', { field: 'password' });
  assertError(await register({ username: uname(), password: 12345678 }), 400, 'VALIDATION_ERROR', { field: 'password' });
});

test('register: password length boundaries (8..1024)', async () => {
  assertError(await register({ username: uname(), password: 'short12' }), 400, 'VALIDATION_ERROR', { field: 'password' });
  assertError(await register({ username: uname(), password: 'p'.repeat(1025) }), 400, 'VALIDATION_ERROR',
    { field: 'password' });
  assertStatus(await register({ username: uname(), password: 'exactly8' }), 201, '8-char password');
  assertStatus(await register({ username: uname(), password: 'p'.repeat(1024) }), 201, '1024-char password');
});

test('register: duplicate username (case-insensitive) → 409 USERNAME_TAKEN', async () => {
  const base = `Dup_${rand(4)}`;
  assertStatus(await register({ username: base, password: 'password123' }), 201, 'first registration');
  assertError(await register({ username: base, password: 'password456' }), 409, 'USERNAME_TAKEN');
  assertError(await register({ username: base.toLowerCase(), password: 'password456' }), 409, 'USERNAME_TAKEN');
  assertError(await register({ username: base.toUpperCase(), password: 'password456' }), 409, 'USERNAME_TAKEN');
});

test('register: concurrent registrations of one name → exactly one 201, the rest 409', async () => {
  const username = uname('race');
  const all = await Promise.all(Array.from({ length: 8 }, () => register({ username, password: 'password123' })));
  const created = all.filter((r) => r.status === 201);
  assert.equal(created.length, 1, `exactly one 201 expected: ${all.map((r) => r.status).join(',')}`);
  for (const r of all) if (r.status !== 201) assertError(r, 409, 'USERNAME_TAKEN');
});

test('register: malformed JSON → 400 INVALID_JSON; non-object body → 400 VALIDATION_ERROR', async () => {
  assertError(await api(server, 'POST', '/v1/auth/register', { raw: '{"username": "x",' }), 400, 'INVALID_JSON');
  assertError(await api(server, 'POST', '/v1/auth/register', { raw: '' }), 400, 'INVALID_JSON');
  assertError(await api(server, 'POST', '/v1/auth/register', { raw: '["a","b"]' }), 400, 'VALIDATION_ERROR');
  const badUtf8 = Buffer.concat([Buffer.from('{"username":"ab'), Buffer.from([0xc3, 0x28]),
    Buffer.from('cd","password":"password123"}')]);
  assertError(await api(server, 'POST', '/v1/auth/register', { raw: badUtf8 }), 400, 'INVALID_JSON');
});

// ---- login ---------------------------------------------------------------------------

test('login → 200 {user_id, token, expires_at} with the same user_id; token works', async () => {
  const username = uname('bob');
  const reg = await register({ username, password: 'hunter2hunter2' });
  assertStatus(reg, 201, 'register');
  const res = await api(server, 'POST', '/v1/auth/login', { body: { username, password: 'hunter2hunter2' } });
  assertStatus(res, 200, 'login');
  assertTokenResponse(res.json, 'user_id', res);
  assert.equal(res.json.user_id, reg.json.user_id, 'login returns the user_id given at registration');
  const m = await me(res.json.token);
  assertStatus(m, 200, 'me with login token');
  assert.deepEqual(m.json, { user_id: reg.json.user_id, username, anonymous: false });
});

test('login: wrong password and unknown user → both 401 INVALID_CREDENTIALS with the same message', async () => {
  const username = uname('carol');
  assertStatus(await register({ username, password: 'right-password' }), 201, 'register');
  const wrong = await api(server, 'POST', '/v1/auth/login', { body: { username, password: 'wrong-password' } });
  const unknown = await api(server, 'POST', '/v1/auth/login',
    { body: { username: uname('nobody'), password: 'right-password' } });
  const e1 = assertError(wrong, 401, 'INVALID_CREDENTIALS');
  const e2 = assertError(unknown, 401, 'INVALID_CREDENTIALS');
  assert.equal(e1.message, e2.message, 'unknown user and wrong password must give identical messages');
});

test('login: missing fields → 400 VALIDATION_ERROR; malformed JSON → 400 INVALID_JSON', async () => {
  assertError(await api(server, 'POST', '/v1/auth/login', { body: { password: 'xxxxxxxx' } }), 400,
    'VALIDATION_ERROR', { field: 'username' });
  assertError(await api(server, 'POST', '/v1/auth/login', { body: { username: 'someone' } }), 400,
    'VALIDATION_ERROR', { field: 'password' });
  assertError(await api(server, 'POST', '/v1/auth/login', { raw: '{nope' }), 400, 'INVALID_JSON');
});

// ---- anonymous -------------------------------------------------------------------------

test('anonymous → 201 {voter_id, token, expires_at}; me says anonymous with username null', async () => {
  const res = await api(server, 'POST', '/v1/auth/anonymous');
  assertStatus(res, 201, 'anonymous');
  assertTokenResponse(res.json, 'voter_id', res);
  const m = await me(res.json.token);
  assertStatus(m, 200, 'me with anonymous token');
  assert.deepEqual(m.json, { user_id: res.json.voter_id, username: null, anonymous: true },
    `me for an anonymous token: ${m.text}`);
  const res2 = await api(server, 'POST', '/v1/auth/anonymous');
  assertStatus(res2, 201, 'second anonymous');
  assert.notEqual(res2.json.voter_id, res.json.voter_id, 'each anonymous token is a new voter');
});

test('anonymous accepts an empty JSON object body too', async () => {
  const res = await api(server, 'POST', '/v1/auth/anonymous', { body: {} });
  assertStatus(res, 201, 'anonymous with {}');
  assertTokenResponse(res.json, 'voter_id', res);
});

// ---- tokens from `tally token` and crafted tokens --------------------------------------

test('a `tally token --sub X` token: me → {user_id: X, username: null, anonymous: false}', async () => {
  const sub = `ext-${rand()}`;
  const tok = await server.token(sub);
  const m = await me(tok);
  assertStatus(m, 200, 'me with tally token');
  assert.deepEqual(m.json, { user_id: sub, username: null, anonymous: false });
});

test('a token crafted in the test with the server secret (HS256) is accepted', async () => {
  const sub = `crafted-${rand()}`;
  const now = Math.floor(Date.now() / 1000);
  const tok = signJwt({ alg: 'HS256', typ: 'JWT' }, { sub, iat: now, exp: now + 600 }, server.secret);
  const m = await me(tok);
  assertStatus(m, 200, 'me with an in-test HS256 token');
  assert.equal(m.json.user_id, sub);
});

test('no token, garbage token or another scheme → 401 UNAUTHENTICATED with WWW-Authenticate: Bearer', async () => {
  assertUnauthenticated(await me());
  assertUnauthenticated(await me('not-a-jwt'));
  assertUnauthenticated(await me('a.b.c'));
  assertUnauthenticated(await me(undefined, { authorization: 'Bearer ' }));
  assertUnauthenticated(await me(undefined, { authorization: 'Basic dXNlcjpwYXNz' }));
});

test('JWT attacks are rejected with 401 UNAUTHENTICATED', async () => {
  const now = Math.floor(Date.now() / 1000);
  const sub = `victim-${rand()}`;
  const good = { sub, iat: now, exp: now + 600 };
  const cases = {
    'alg none, empty signature': `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(good)}.`,
    'alg none, no signature part': `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(good)}`,
    'alg None (case variant)': `${b64url({ alg: 'None', typ: 'JWT' })}.${b64url(good)}.`,
    'HS256 signed with another secret': signJwt({ alg: 'HS256', typ: 'JWT' }, good, 'another-secret-0123456789abcdef'),
    'RS256 header, HMAC signature with the server secret':
      signJwt({ alg: 'RS256', typ: 'JWT' }, good, server.secret),
    'RS256 header, junk signature':
      `${b64url({ alg: 'RS256', typ: 'JWT' })}.${b64url(good)}.${Buffer.from('x'.repeat(256)).toString('base64url')}`,
    'HS512 header signed with the server secret': signJwt({ alg: 'HS512', typ: 'JWT' }, good, server.secret),
    'expired (exp in the past), correctly signed':
      signJwt({ alg: 'HS256', typ: 'JWT' }, { sub, iat: now - 120, exp: now - 60 }, server.secret),
    'no exp, correctly signed': signJwt({ alg: 'HS256', typ: 'JWT' }, { sub, iat: now }, server.secret),
    'exp as a string, correctly signed':
      signJwt({ alg: 'HS256', typ: 'JWT' }, { sub, iat: now, exp: String(now + 600) }, server.secret),
    'no sub, correctly signed': signJwt({ alg: 'HS256', typ: 'JWT' }, { iat: now, exp: now + 600 }, server.secret),
  };
  // payload tampering: take a valid token and swap the payload
  const valid = signJwt({ alg: 'HS256', typ: 'JWT' }, good, server.secret);
  const [h, , s] = valid.split('.');
  cases['payload swapped after signing'] = `${h}.${b64url({ ...good, sub: 'admin' })}.${s}`;
  cases['signature truncated'] = valid.slice(0, -4);
  for (const [name, tok] of Object.entries(cases)) {
    const res = await me(tok);
    assert.equal(res.status, 401, `${name}: expected 401, got ${describe(res)}`);
    assertUnauthenticated(res);
  }
  // sanity: the untampered token works
  assertStatus(await me(valid), 200, 'the untampered token');
});

test('a `tally token --ttl 1` token stops working once it expires', async () => {
  const tok = await server.token(`short-${rand()}`, 1);
  // It may already be at its last second; only assert the expired side strictly.
  await sleep(2500);
  assertUnauthenticated(await me(tok));
});
