// Anonymous device tokens behind a proof of work (issue 7 item 2).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { startServer, api, assertError } from './harness.mjs';

let server;
before(async () => { server = await startServer({ args: ['--pow-difficulty', '12'] }); });
after(async () => { await server?.close(); });

function zeroBits(buf) {
  let bits = 0;
  for (const b of buf) {
    if (b === 0) { bits += 8; continue; }
    bits += Math.clz32(b) - 24;
    break;
  }
  return bits;
}

function solve(challenge, difficulty) {
  for (let i = 0; ; i++) {
    const nonce = i.toString(36);
    if (zeroBits(crypto.createHash('sha256').update(`${challenge}:${nonce}`).digest()) >= difficulty) return nonce;
  }
}

test('challenge → solve → anonymous token that works', async () => {
  const ch = await api(server, 'POST', '/v1/auth/challenge');
  assert.equal(ch.status, 200);
  assert.equal(ch.json.difficulty, 12);
  assert.equal(ch.json.algorithm, 'sha256-leading-zero-bits');
  assert.match(ch.json.challenge, /^[A-Za-z0-9._-]+$/);
  const nonce = solve(ch.json.challenge, 12);
  const r = await api(server, 'POST', '/v1/auth/anonymous', { body: { challenge: ch.json.challenge, nonce } });
  assert.equal(r.status, 201, r.text);
  const me = await api(server, 'GET', '/v1/auth/me', { token: r.json.token });
  assert.equal(me.json.anonymous, true);
  // a challenge answers once
  assertError(await api(server, 'POST', '/v1/auth/anonymous', { body: { challenge: ch.json.challenge, nonce } }),
    403, 'POW_FAILED');
});

test('no proof, a wrong nonce, or a forged challenge get no token', async () => {
  assertError(await api(server, 'POST', '/v1/auth/anonymous'), 400, 'VALIDATION_ERROR', { field: 'challenge' });
  const ch = (await api(server, 'POST', '/v1/auth/challenge')).json;
  assertError(await api(server, 'POST', '/v1/auth/anonymous', { body: { challenge: ch.challenge } }),
    400, 'VALIDATION_ERROR', { field: 'nonce' });
  // a nonce that does not reach the difficulty
  let bad = 0;
  while (zeroBits(crypto.createHash('sha256').update(`${ch.challenge}:x${bad}`).digest()) >= 12) bad++;
  assertError(await api(server, 'POST', '/v1/auth/anonymous', { body: { challenge: ch.challenge, nonce: `x${bad}` } }),
    403, 'POW_FAILED');
  // lowering the difficulty inside the challenge breaks its MAC
  const [exp, rnd, , mac] = ch.challenge.split('.');
  const forged = `${exp}.${rnd}.0.${mac}`;
  assertError(await api(server, 'POST', '/v1/auth/anonymous', { body: { challenge: forged, nonce: '1' } }),
    403, 'POW_FAILED');
});

test('--pow-difficulty 0: no proof needed', async () => {
  const free = await startServer();
  try {
    assert.equal((await api(free, 'POST', '/v1/auth/anonymous')).status, 201);
    assert.equal((await api(free, 'POST', '/v1/auth/challenge')).json.difficulty, 0);
  } finally {
    await free.close();
  }
});
