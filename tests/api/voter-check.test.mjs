// settings.voter_check: "token" (one ballot per voter, the default), "ip" (one ballot per
// client address per poll, whoever the token names) and "token+ip" (both rules).
//
// The server listens on 127.0.0.1 only. Other client addresses come from binding the
// client's socket to another loopback address (all of 127/8 is loopback on Linux), so a
// connection from 127.0.0.2 to 127.0.0.1 is a second voter address without leaving the host.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import {
  startServer, api, assertError, assertStatus, rand, createPoll, results, describe, storeContents,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const newVoter = () => server.mint(`voter-${rand()}`);

/**
 * One request on a fresh connection from client address `from` (a loopback address).
 * Returns {status, json, text, method, path, headers}.
 */
function from(addr, method, urlPath, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  let payload;
  if (body !== undefined) {
    payload = JSON.stringify(body);
    h['content-type'] = 'application/json';
    h['content-length'] = Buffer.byteLength(payload);
  }
  if (token) h.authorization = `Bearer ${token}`;
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port: server.port, localAddress: addr, agent: false, method, path: urlPath, headers: h,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json = null;
        try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
        resolve({ status: res.statusCode, headers: res.headers, json, text, method, path: `${urlPath} from ${addr}` });
      });
    });
    req.setTimeout(30_000, () => req.destroy(new Error(`${method} ${urlPath} from ${addr}: timed out`)));
    req.on('error', (e) => reject(new Error(`${method} ${urlPath} from ${addr}: ${e.message}`)));
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

const vote = (addr, poll, token, body = { option_id: poll.options[0].option_id }, headers) =>
  from(addr, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token, body, headers });
const change = (addr, poll, token, optionIndex) =>
  from(addr, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`, { token, body: { option_id: poll.options[optionIndex].option_id } });
const retract = (addr, poll, token) => from(addr, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token });

async function total(poll) {
  const res = await results(server, poll.poll_id, ownerTok);
  assertStatus(res, 200, 'results');
  return res.json.total_votes;
}

/** 409 ALREADY_VOTED because of the address rule, naming the ballot from that address. */
function assertAddressTaken(res, voteId) {
  const e = assertError(res, 409, 'ALREADY_VOTED');
  assert.equal(e.vote_id, voteId, `error.vote_id names the ballot from that address: ${describe(res)}`);
  assert.equal(e.rule, 'ip', `error.rule says it is the address rule: ${describe(res)}`);
}

/** 409 ALREADY_VOTED because this voter already voted (the token rule). */
function assertVoterTaken(res, voteId) {
  const e = assertError(res, 409, 'ALREADY_VOTED');
  assert.equal(e.vote_id, voteId, `error.vote_id is the voter's own ballot: ${describe(res)}`);
  assert.equal(e.rule, undefined, `the voter rule carries no error.rule: ${describe(res)}`);
}

// ---- the setting itself ---------------------------------------------------------------------

test('voter_check: token by default, set at creation, anything else is 400 on settings.voter_check', async () => {
  const p = await createPoll(server, ownerTok);
  assert.equal(p.settings.voter_check, 'token', 'default');
  for (const v of ['token', 'ip', 'token+ip']) {
    const q = await createPoll(server, ownerTok, { settings: { voter_check: v } });
    assert.equal(q.settings.voter_check, v);
    const got = await api(server, 'GET', `/v1/polls/${q.poll_id}`);
    assert.equal(got.json.settings.voter_check, v, 'read back');
  }
  for (const bad of ['cookie', 'IP', 'ip+token', '', 1, null, true, ['ip']]) {
    const res = await api(server, 'POST', '/v1/polls', {
      token: ownerTok, body: { title: 'x', options: [{ text: 'A' }, { text: 'B' }], settings: { voter_check: bad } },
    });
    assertError(res, 400, 'VALIDATION_ERROR', { field: 'settings.voter_check' });
  }
});

test('voter_check changes by PATCH only while the poll has no ballot (409 POLL_HAS_VOTES)', async () => {
  const p = await createPoll(server, ownerTok);
  const patch = (settings) => api(server, 'PATCH', `/v1/polls/${p.poll_id}`, { token: ownerTok, body: { settings } });
  let res = await patch({ voter_check: 'ip' });
  assertStatus(res, 200, 'no ballot yet');
  assert.equal(res.json.settings.voter_check, 'ip');
  assertError(await patch({ voter_check: 'sometimes' }), 400, 'VALIDATION_ERROR', { field: 'settings.voter_check' });

  assertStatus(await vote('127.0.0.1', p, await newVoter()), 200, 'a ballot');
  assertError(await patch({ voter_check: 'token' }), 409, 'POLL_HAS_VOTES');
  assertError(await patch({ voter_check: 'token+ip' }), 409, 'POLL_HAS_VOTES');
  assertError(await patch({ voter_check: 'nope' }), 400, 'VALIDATION_ERROR', { field: 'settings.voter_check' });
  res = await patch({ voter_check: 'ip', allow_vote_change: true });
  assertStatus(res, 200, 'the current value is not a change');
  assert.equal(res.json.settings.voter_check, 'ip');
  assert.equal(res.json.settings.allow_vote_change, true);
});

// ---- the rules ------------------------------------------------------------------------------

test('token (default): two voters from one address both vote', async () => {
  const p = await createPoll(server, ownerTok);
  assertStatus(await vote('127.0.0.1', p, await newVoter()), 200, 'first voter');
  assertStatus(await vote('127.0.0.1', p, await newVoter()), 200, 'second voter, same address');
  assert.equal(await total(p), 2);
});

test('ip: a second voter from the same address gets 409 ALREADY_VOTED with that ballot; another address votes',
  async () => {
    const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
    const [a, b, c] = [await newVoter(), await newVoter(), await newVoter()];
    const first = await vote('127.0.0.1', p, a);
    assertStatus(first, 200, 'first ballot from 127.0.0.1');
    assertAddressTaken(await vote('127.0.0.1', p, b), first.json.vote_id);
    assertAddressTaken(await vote('127.0.0.1', p, b, { option_id: p.options[1].option_id }), first.json.vote_id);

    const second = await vote('127.0.0.2', p, b);
    assertStatus(second, 200, 'the same voter from 127.0.0.2');
    assertAddressTaken(await vote('127.0.0.2', p, c), second.json.vote_id);
    // A voter holds one ballot whatever the address (ballots belong to voters).
    assertVoterTaken(await vote('127.0.0.3', p, a), first.json.vote_id);
    // The voter's own second ballot from its address is the voter rule (checked first).
    assertVoterTaken(await vote('127.0.0.1', p, a), first.json.vote_id);
    assert.equal(await total(p), 2);
    const me = await from('127.0.0.1', 'GET', `/v1/polls/${p.poll_id}/votes/me`, { token: b });
    assert.equal(me.json.has_voted, true);
    assert.equal(me.json.vote_id, second.json.vote_id, 'the refused ballot did not replace anything');
  });

test('ip: an Idempotency-Key retry of the voter who holds the address replays the first answer', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  const a = await newVoter();
  const key = `k-${rand()}`;
  const first = await vote('127.0.0.5', p, a, undefined, { 'Idempotency-Key': key });
  assertStatus(first, 200, 'first');
  const retry = await vote('127.0.0.5', p, a, undefined, { 'Idempotency-Key': key });
  assertStatus(retry, 200, 'retry replays');
  assert.equal(retry.json.vote_id, first.json.vote_id);
  assert.equal(retry.json.receipt, first.json.receipt);
  // the same key from another voter at that address is still the address rule
  assertAddressTaken(await vote('127.0.0.5', p, await newVoter(), undefined, { 'Idempotency-Key': key }),
    first.json.vote_id);
});

test('ip: addresses count per poll', async () => {
  const p1 = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  const p2 = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  assertStatus(await vote('127.0.0.1', p1, await newVoter()), 200, 'poll 1 from 127.0.0.1');
  assertStatus(await vote('127.0.0.1', p2, await newVoter()), 200, 'poll 2 from 127.0.0.1');
});

test('ip: anonymous device tokens from one address get one ballot', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip', allow_anonymous: true } });
  const t1 = (await api(server, 'POST', '/v1/auth/anonymous')).json?.token;
  const t2 = (await api(server, 'POST', '/v1/auth/anonymous')).json?.token;
  assert.ok(t1 && t2, 'anonymous tokens');
  const first = await vote('127.0.0.1', p, t1);
  assertStatus(first, 200, 'first anonymous ballot');
  assertAddressTaken(await vote('127.0.0.1', p, t2), first.json.vote_id);
  assertStatus(await vote('127.0.0.2', p, t2), 200, 'from another address');
});

test('ip: concurrent ballots of many voters from one address: exactly one is accepted', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  const voters = await Promise.all(Array.from({ length: 8 }, () => newVoter()));
  const answers = await Promise.all(voters.map((t) => vote('127.0.0.4', p, t)));
  const ok = answers.filter((r) => r.status === 200);
  assert.equal(ok.length, 1, `one ballot accepted: ${answers.map((r) => r.status)}`);
  for (const r of answers) if (r.status !== 200) assertAddressTaken(r, ok[0].json.vote_id);
  assert.equal(await total(p), 1);
});

test('ip: Prefer: respond-async is refused the same way, before anything is stored (409, not a 202)', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  const first = await vote('127.0.0.6', p, await newVoter(), undefined, { Prefer: 'respond-async' });
  assertStatus(first, 202, 'async accepted');
  const second = await vote('127.0.0.6', p, await newVoter(), undefined, { Prefer: 'respond-async' });
  const e = assertError(second, 409, 'ALREADY_VOTED');
  assert.equal(e.rule, 'ip');
  assert.equal(await total(p), 1);
});

test('token+ip: both rules', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'token+ip' } });
  const [a, b] = [await newVoter(), await newVoter()];
  const first = await vote('127.0.0.1', p, a);
  assertStatus(first, 200, 'a from 127.0.0.1');
  assertAddressTaken(await vote('127.0.0.1', p, b), first.json.vote_id);
  assertVoterTaken(await vote('127.0.0.2', p, a), first.json.vote_id);
  const second = await vote('127.0.0.2', p, b);
  assertStatus(second, 200, 'b from 127.0.0.2');
  assertAddressTaken(await vote('127.0.0.2', p, await newVoter()), second.json.vote_id);
  assert.equal(await total(p), 2);
});

test('a change keeps the address; a retraction frees it', async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip', allow_vote_change: true } });
  const [a, b] = [await newVoter(), await newVoter()];
  const first = await vote('127.0.0.1', p, a);
  assertStatus(first, 200, 'a');
  assertAddressTaken(await vote('127.0.0.1', p, b), first.json.vote_id);

  // a change (even from another address) is not a new ballot: the address stays taken
  assertStatus(await change('127.0.0.3', p, a, 1), 200, 'a changes');
  assertAddressTaken(await vote('127.0.0.1', p, b), first.json.vote_id);
  assertStatus(await vote('127.0.0.3', p, await newVoter()), 200, 'the changing address was not taken');

  const gone = await retract('127.0.0.1', p, a);
  assert.equal(gone.status, 204, describe(gone));
  const bv = await vote('127.0.0.1', p, b);
  assertStatus(bv, 200, 'after the retraction another voter votes from that address');
  assertAddressTaken(await vote('127.0.0.1', p, a), bv.json.vote_id);
  assert.equal(await total(p), 2);
});

test('the address rule survives a restart, and the store holds no address', { timeout: 60_000 }, async () => {
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip', allow_vote_change: true } });
  const t = await createPoll(server, ownerTok, { settings: { voter_check: 'token+ip' } });
  const [a, b, c] = [await newVoter(), await newVoter(), await newVoter()];
  const first = await vote('127.0.0.1', p, a);
  assertStatus(first, 200, 'a from 127.0.0.1');
  const other = await vote('127.0.0.2', p, c);
  assertStatus(other, 200, 'c from 127.0.0.2');
  const tf = await vote('127.0.0.7', t, a);
  assertStatus(tf, 200, 'a in the token+ip poll');

  const stopped = await server.stop();
  assert.equal(stopped.code, 0, 'clean exit');
  // Not one file of the data directory (database, WAL) holds a client address in text,
  // nor (on PostgreSQL) a dump of the server's database.
  for (const { name: f, bytes } of storeContents(server)) {
    for (const ip of ['127.0.0.1', '127.0.0.2', '127.0.0.7']) {
      assert.equal(bytes.indexOf(ip), -1, `${f} contains ${ip}`);
    }
  }
  await server.restart();

  assert.equal((await api(server, 'GET', `/v1/polls/${p.poll_id}`)).json.settings.voter_check, 'ip');
  assertAddressTaken(await vote('127.0.0.1', p, b), first.json.vote_id);
  assertAddressTaken(await vote('127.0.0.2', p, b), other.json.vote_id);
  assertAddressTaken(await vote('127.0.0.7', t, b), tf.json.vote_id);
  assertVoterTaken(await vote('127.0.0.8', t, a), tf.json.vote_id);
  assertStatus(await vote('127.0.0.3', p, b), 200, 'a fresh address still votes');

  // a retraction after the restart frees the address loaded from the store
  const gone = await retract('127.0.0.9', p, a);
  assert.equal(gone.status, 204, describe(gone));
  assertStatus(await vote('127.0.0.1', p, await newVoter()), 200, 'freed');
  assert.equal(await total(p), 3);
});

test('X-Forwarded-For names the voter only when the connection comes from a --trusted-proxies address', async () => {
  const xff = (addr) => ({ 'X-Forwarded-For': addr });
  // without the option, a header any client can write changes nothing: one address here
  const p = await createPoll(server, ownerTok, { settings: { voter_check: 'ip' } });
  assertStatus(await vote('127.0.0.1', p, newVoter(), undefined, xff('203.0.113.1')), 200, 'first');
  assertError(await vote('127.0.0.1', p, newVoter(), undefined, xff('203.0.113.2')), 409, 'ALREADY_VOTED');

  // behind a trusted balancer (127.0.0.1 here), the address it appended is the voter's
  const lb = await startServer({ args: ['--trusted-proxies', '127.0.0.1/32, ::1'] });
  try {
    const owner = await lb.token(`owner-${rand()}`);
    const q = await createPoll(lb, owner, { settings: { voter_check: 'ip' } });
    const cast = (token, chain, addr = '127.0.0.1') => new Promise((resolve, reject) => {
      const payload = JSON.stringify({ option_id: q.options[0].option_id });
      const req = http.request({
        host: '127.0.0.1', port: lb.port, localAddress: addr, agent: false, method: 'POST',
        path: `/v1/polls/${q.poll_id}/votes`,
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', 'x-forwarded-for': chain },
      }, (res) => {
        let text = '';
        res.on('data', (c) => { text += c; });
        res.on('end', () => resolve({ status: res.statusCode, text, json: JSON.parse(text), headers: res.headers }));
      });
      req.on('error', reject);
      req.end(payload);
    });
    assertStatus(await cast(lb.mint(`v-${rand()}`), '203.0.113.1'), 200, 'voter at 203.0.113.1');
    assertStatus(await cast(lb.mint(`v-${rand()}`), '203.0.113.2'), 200, 'another address: another voter');
    // the same address again, whatever the client prepended to the header
    assertError(await cast(lb.mint(`v-${rand()}`), '198.51.100.1, 203.0.113.1'), 409, 'ALREADY_VOTED');
    // a connection from an address that is not a trusted proxy: its header is ignored
    assertStatus(await cast(lb.mint(`v-${rand()}`), '203.0.113.3', '127.0.0.7'), 200, 'untrusted peer 127.0.0.7');
    assertError(await cast(lb.mint(`v-${rand()}`), '203.0.113.4', '127.0.0.7'), 409, 'ALREADY_VOTED');
  } finally {
    await lb.close();
  }
});
