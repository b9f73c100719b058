// One person, one ballot, across sign-up and sign-in (issue 17): register and login sent
// with an anonymous device token (Authorization: Bearer) link the device to the account.
// Runs on both stores (make test-api, make test-api-pg).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, api, assertError, assertStatus, castVote, createPoll, results, rand, describe,
} from './harness.mjs';
import { openSse } from '../live/client.mjs';

let server;
let ownerTok; // a third person owning the polls, who may read their audit logs
before(async () => {
  server = await startServer();
  ownerTok = (await register(server, uname('owner'))).json.token;
});
after(async () => { await server?.close(); });

const uname = (p = 'u') => `${p}_${rand(5)}`;
const PASSWORD = 'correct horse battery';

async function device(srv = server) {
  const res = await api(srv, 'POST', '/v1/auth/anonymous');
  assertStatus(res, 201, 'anonymous token');
  return res.json; // {voter_id, token}
}
function register(srv, username, deviceToken) {
  return api(srv, 'POST', '/v1/auth/register', { body: { username, password: PASSWORD }, token: deviceToken });
}
function login(srv, username, deviceToken) {
  return api(srv, 'POST', '/v1/auth/login', { body: { username, password: PASSWORD }, token: deviceToken });
}
async function openPoll(srv = server, settings = {}, tok = ownerTok) {
  return createPoll(srv, tok, { settings: { allow_anonymous: true, ...settings } });
}
async function vote(srv, tok, poll, i, status = 200) {
  const res = await castVote(srv, tok, poll.poll_id, { option_id: poll.options[i].option_id });
  assertStatus(res, status, `vote for option ${i}`);
  return res.json;
}
async function totals(srv, poll) {
  const res = await results(srv, poll.poll_id);
  assertStatus(res, 200, 'results');
  return { total: res.json.total_votes, votes: res.json.options.map((o) => o.votes) };
}
async function audit(srv, poll) {
  const res = await api(srv, 'GET', `/v1/polls/${poll.poll_id}/audit?limit=100`, { token: ownerTok });
  assertStatus(res, 200, 'audit');
  return res.json.items;
}
function assertLinked(res, deviceId, { ballots, polls, retracted = [], keptBoth = [], already = false }) {
  assert.deepEqual(res.json.linked, {
    device_id: deviceId, ballots, polls, retracted, kept_both: keptBoth, already_linked: already,
  }, `what the link merged: ${describe(res)}`);
}

test('vote anonymously → register with the device token → vote again as the account: 409 ALREADY_VOTED, total 1',
  async () => {
    const poll = await openPoll();
    const dev = await device();
    const cast = await vote(server, dev.token, poll, 0);
    const reg = await register(server, uname('signup'), dev.token);
    assertStatus(reg, 201, 'register with a device token');
    assertLinked(reg, dev.voter_id, { ballots: 1, polls: 0 });
    const acc = reg.json.token;

    const again = await castVote(server, acc, poll.poll_id, { option_id: poll.options[1].option_id });
    assertError(again, 409, 'ALREADY_VOTED');
    assert.equal(again.json.error.vote_id, cast.vote_id, 'the device\'s ballot is the account\'s');
    assert.deepEqual(await totals(server, poll), { total: 1, votes: [1, 0, 0] });
    const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: acc });
    assertStatus(me, 200, 'votes/me as the account');
    assert.equal(me.json.has_voted, true);
    assert.equal(me.json.vote_id, cast.vote_id);
    assert.deepEqual(me.json.option_ids, [poll.options[0].option_id]);

    // the device token goes on as the same person
    const byDevice = await castVote(server, dev.token, poll.poll_id, { option_id: poll.options[2].option_id });
    assertError(byDevice, 409, 'ALREADY_VOTED');
    assert.equal(byDevice.json.error.vote_id, cast.vote_id);
    const whoami = await api(server, 'GET', '/v1/auth/me', { token: dev.token });
    assertStatus(whoami, 200, 'me with the linked device token');
    assert.deepEqual(whoami.json, {
      user_id: reg.json.user_id, username: whoami.json.username, anonymous: false, device_id: dev.voter_id,
    });
    assert.equal(typeof whoami.json.username, 'string');
    // a ballot the account casts elsewhere is the device token's too
    const other = await openPoll();
    const accCast = await vote(server, acc, other, 1);
    const dup = await castVote(server, dev.token, other.poll_id, { option_id: other.options[0].option_id });
    assertError(dup, 409, 'ALREADY_VOTED');
    assert.equal(dup.json.error.vote_id, accCast.vote_id);
  });

test('the same through login: an account that has not voted logs in with the device token', async () => {
  const username = uname('login');
  const acc = (await register(server, username)).json;
  const poll = await openPoll();
  const dev = await device();
  const cast = await vote(server, dev.token, poll, 2);
  const res = await login(server, username, dev.token);
  assertStatus(res, 200, 'login with a device token');
  assert.equal(res.json.user_id, acc.user_id);
  assertLinked(res, dev.voter_id, { ballots: 1, polls: 0 });
  const again = await castVote(server, res.json.token, poll.poll_id, { option_id: poll.options[0].option_id });
  assertError(again, 409, 'ALREADY_VOTED');
  assert.equal(again.json.error.vote_id, cast.vote_id);
  assert.deepEqual(await totals(server, poll), { total: 1, votes: [0, 0, 1] });
  // the older token of the account sees the ballot as its own too
  const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: acc.token });
  assert.equal(me.json.vote_id, cast.vote_id);
});

test('a poll created anonymously is listed under ?mine=1 after sign-up, owned by the account', async () => {
  const dev = await device();
  const made = await createPoll(server, dev.token, { title: `Anonymous ${rand()}` });
  const before = await api(server, 'GET', '/v1/polls?mine=1', { token: dev.token });
  assert.deepEqual(before.json.items.map((p) => p.poll_id), [made.poll_id]);
  const reg = await register(server, uname('maker'), dev.token);
  assertStatus(reg, 201, 'register');
  assertLinked(reg, dev.voter_id, { ballots: 0, polls: 1 });
  const mine = await api(server, 'GET', '/v1/polls?mine=1', { token: reg.json.token });
  assertStatus(mine, 200, 'my polls');
  assert.deepEqual(mine.json.items.map((p) => p.poll_id), [made.poll_id], 'My polls has it');
  assert.equal(mine.json.items[0].owner_id, reg.json.user_id);
  // the owner's powers are the account's (the device token is the account now)
  const patch = await api(server, 'PATCH', `/v1/polls/${made.poll_id}`, { token: reg.json.token, body: { title: 'Mine' } });
  assertStatus(patch, 200, 'the account edits the poll');
  const viaDevice = await api(server, 'GET', '/v1/polls?mine=1', { token: dev.token });
  assert.deepEqual(viaDevice.json.items.map((p) => p.poll_id), [made.poll_id]);
});

test('both voted before linking, the device first: its ballot stands, the account\'s is retracted and audited', async () => {
  const username = uname('both');
  const acc = (await register(server, username)).json;
  const poll = await openPoll();
  const sse = await openSse(server, `/v1/polls/${poll.poll_id}/live`);
  assert.equal(sse.status, 200);
  const dev = await device();
  const devCast = await vote(server, dev.token, poll, 0);
  const accCast = await vote(server, acc.token, poll, 1);
  assert.deepEqual(await totals(server, poll), { total: 2, votes: [1, 1, 0] });
  await sse.waitFor((e) => e.event === 'results' && e.json?.total_votes === 2, 5000, 'live: two ballots');

  const res = await login(server, username, dev.token);
  assertStatus(res, 200, 'login');
  assertLinked(res, dev.voter_id, {
    ballots: 1, polls: 0, retracted: [{ poll_id: poll.poll_id, vote_id: accCast.vote_id, ballot: 'account' }],
  });
  assert.deepEqual(await totals(server, poll), { total: 1, votes: [1, 0, 0] }, 'the account\'s ballot is uncounted');
  await sse.waitFor((e) => e.event === 'results' && e.json?.total_votes === 1, 5000, 'live: the retraction');
  sse.close();
  const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: res.json.token });
  assert.equal(me.json.vote_id, devCast.vote_id, 'the earlier ballot stands');
  const receipt = await api(server, 'GET', `/v1/receipts/${accCast.receipt}`);
  assertError(receipt, 404, 'RECEIPT_NOT_FOUND');

  const log = await audit(server, poll);
  assert.deepEqual(log.map((e) => e.event), ['cast', 'cast', 'revoked'], `audit: ${JSON.stringify(log)}`);
  assert.equal(new Set(log.map((e) => e.voter)).size, 1, 'one person: one pseudonym for every row');
});

test('both voted before linking, the account first: the device\'s ballot is retracted', async () => {
  const username = uname('accfirst');
  const acc = (await register(server, username)).json;
  const poll = await openPoll();
  const accCast = await vote(server, acc.token, poll, 1);
  const dev = await device();
  const devCast = await vote(server, dev.token, poll, 2);
  const res = await login(server, username, dev.token);
  assertStatus(res, 200, 'login');
  assertLinked(res, dev.voter_id, {
    ballots: 0, polls: 0, retracted: [{ poll_id: poll.poll_id, vote_id: devCast.vote_id, ballot: 'device' }],
  });
  assert.deepEqual(await totals(server, poll), { total: 1, votes: [0, 1, 0] });
  const me = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: dev.token });
  assert.equal(me.json.vote_id, accCast.vote_id, 'the device token sees the account\'s ballot');
  const log = await audit(server, poll);
  assert.deepEqual(log.map((e) => e.event), ['cast', 'cast', 'revoked']);
});

test('a poll closed before the link keeps both ballots (its results are final); the link says so', async () => {
  const username = uname('closed');
  const acc = (await register(server, username)).json;
  const poll = await openPoll();
  const dev = await device();
  await vote(server, dev.token, poll, 0);
  await vote(server, acc.token, poll, 1);
  const close = await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: ownerTok, body: { status: 'closed' } });
  assertStatus(close, 200, 'close');
  const res = await login(server, username, dev.token);
  assertStatus(res, 200, 'login');
  assertLinked(res, dev.voter_id, { ballots: 0, polls: 0, keptBoth: [poll.poll_id] });
  assert.deepEqual(await totals(server, poll), { total: 2, votes: [1, 1, 0] }, 'final results unchanged');
});

test('after the link the account changes and retracts the ballot the device cast', async () => {
  const dev = await device();
  const poll = await openPoll(server, { allow_vote_change: true });
  const cast = await vote(server, dev.token, poll, 0);
  const reg = await register(server, uname('changer'), dev.token);
  assertStatus(reg, 201, 'register');
  const acc = reg.json.token;
  const put = await api(server, 'PUT', `/v1/polls/${poll.poll_id}/votes/me`, {
    token: acc, body: { option_id: poll.options[1].option_id },
  });
  assertStatus(put, 200, 'change as the account');
  assert.equal(put.json.vote_id, cast.vote_id, 'the same ballot');
  assert.deepEqual(await totals(server, poll), { total: 1, votes: [0, 1, 0] });
  const del = await api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: acc });
  assertStatus(del, 204, 'retract as the account');
  assert.deepEqual(await totals(server, poll), { total: 0, votes: [0, 0, 0] });
  const byDevice = await api(server, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: dev.token });
  assert.equal(byDevice.json.has_voted, false, 'retracted for the device token too');
  await vote(server, dev.token, poll, 2); // one new ballot, the account's
  const dup = await castVote(server, acc, poll.poll_id, { option_id: poll.options[0].option_id });
  assertError(dup, 409, 'ALREADY_VOTED');
});

test('a linked device token is the account in a poll that needs a registered voter', async () => {
  const dev = await device();
  const reg = await register(server, uname('signedin'), dev.token);
  assertStatus(reg, 201, 'register');
  const poll = await createPoll(server, ownerTok); // allow_anonymous false
  const anon = await device();
  assertError(await castVote(server, anon.token, poll.poll_id, { option_id: poll.options[0].option_id }), 403,
    'FORBIDDEN');
  const cast = await vote(server, dev.token, poll, 0);
  const again = await castVote(server, reg.json.token, poll.poll_id, { option_id: poll.options[1].option_id });
  assertError(again, 409, 'ALREADY_VOTED');
  assert.equal(again.json.error.vote_id, cast.vote_id);
});

test('voter_check "ip": the linked ballot keeps its address; the account is refused as the same voter', async () => {
  const poll = await openPoll(server, { voter_check: 'ip', allow_vote_change: true });
  const dev = await device();
  const cast = await vote(server, dev.token, poll, 0);
  const reg = await register(server, uname('ipcheck'), dev.token);
  assertStatus(reg, 201, 'register');
  const dup = await castVote(server, reg.json.token, poll.poll_id, { option_id: poll.options[1].option_id });
  assertError(dup, 409, 'ALREADY_VOTED');
  assert.equal(dup.json.error.vote_id, cast.vote_id);
  assert.equal(dup.json.error.rule, undefined, 'refused as the same voter, not by the address rule');
  // retracted by the account, the ballot frees its address: the account may vote again
  assertStatus(await api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: reg.json.token }), 204,
    'retract');
  await vote(server, reg.json.token, poll, 1);
  assert.deepEqual(await totals(server, poll), { total: 1, votes: [0, 1, 0] });
});

test('a device linked to one account: logging into another is 409 DEVICE_LINKED, into the same one links nothing new',
  async () => {
    const a = uname('first');
    const b = uname('second');
    assertStatus(await register(server, b), 201, 'register b');
    const dev = await device();
    const poll = await openPoll();
    await vote(server, dev.token, poll, 0);
    const ra = await register(server, a, dev.token);
    assertStatus(ra, 201, 'register a with the device');

    const other = await login(server, b, dev.token);
    assertError(other, 409, 'DEVICE_LINKED');
    const signup = await register(server, uname('third'), dev.token);
    assertError(signup, 409, 'DEVICE_LINKED');
    const same = await login(server, a, dev.token);
    assertStatus(same, 200, 'login to the same account');
    assertLinked(same, dev.voter_id, { ballots: 0, polls: 0, already: true });
    assert.deepEqual(await totals(server, poll), { total: 1, votes: [1, 0, 0] });
    // without the device token, b logs in as ever
    const plain = await login(server, b);
    assertStatus(plain, 200, 'login without a token');
    assert.equal(plain.json.linked, undefined, 'no linked member when no device was sent');
  });

test('a bearer that is not an anonymous device token links nothing and is otherwise ignored', async () => {
  const username = uname('plain');
  const acc = (await register(server, username)).json;
  const other = (await register(server, uname('other'))).json;
  for (const tok of [other.token, 'not.a.token', server.mint('anon_forged', { anon: true, ttl: -10 })]) {
    const res = await login(server, username, tok);
    assertStatus(res, 200, `login with Authorization: Bearer ${tok.slice(0, 12)}…`);
    assert.equal(res.json.user_id, acc.user_id);
    assert.equal(res.json.linked, undefined, `nothing linked: ${describe(res)}`);
  }
  const me = await api(server, 'GET', '/v1/auth/me', { token: other.token });
  assert.equal(me.json.user_id, other.user_id, 'the other account stays itself');
});

test('a link survives a restart: ballots, polls, retractions and the device token as the account', async () => {
  const srv = await startServer();
  try {
    const owner = (await register(srv, uname('own'))).json.token;
    const username = uname('durable');
    const acc = (await register(srv, username)).json;
    const p1 = await createPoll(srv, owner, { settings: { allow_anonymous: true } });
    const p2 = await createPoll(srv, owner, { settings: { allow_anonymous: true } });
    const dev = await device(srv);
    const made = await createPoll(srv, dev.token);
    const c1 = await vote(srv, dev.token, p1, 0);
    const d2 = await vote(srv, dev.token, p2, 0);
    const a2 = await vote(srv, acc.token, p2, 1);
    const res = await login(srv, username, dev.token);
    assertStatus(res, 200, 'login');
    assertLinked(res, dev.voter_id, {
      ballots: 2, polls: 1, retracted: [{ poll_id: p2.poll_id, vote_id: a2.vote_id, ballot: 'account' }],
    });

    await srv.restart();
    for (const [poll, want, counts] of [[p1, c1, [1, 0, 0]], [p2, d2, [1, 0, 0]]]) {
      const dup = await castVote(srv, acc.token, poll.poll_id, { option_id: poll.options[2].option_id });
      assertError(dup, 409, 'ALREADY_VOTED');
      assert.equal(dup.json.error.vote_id, want.vote_id, 'after a restart the device\'s ballot is the account\'s');
      const byDevice = await castVote(srv, dev.token, poll.poll_id, { option_id: poll.options[2].option_id });
      assertError(byDevice, 409, 'ALREADY_VOTED');
      assert.deepEqual(await totals(srv, poll), { total: 1, votes: counts });
    }
    const mine = await api(srv, 'GET', '/v1/polls?mine=1', { token: acc.token });
    assert.deepEqual(mine.json.items.map((p) => p.poll_id), [made.poll_id]);
    const me = await api(srv, 'GET', '/v1/auth/me', { token: dev.token });
    assert.equal(me.json.user_id, acc.user_id, 'the device token is the account after a restart');
    const log = await api(srv, 'GET', `/v1/polls/${p2.poll_id}/audit?limit=100`, { token: owner });
    assert.deepEqual(log.json.items.map((e) => e.event), ['cast', 'cast', 'revoked']);
    assert.equal(new Set(log.json.items.map((e) => e.voter)).size, 1, 'one pseudonym after a restart too');
    const again = await login(srv, username, dev.token);
    assertLinked(again, dev.voter_id, { ballots: 0, polls: 0, already: true });
  } finally {
    await srv.close();
  }
});
