// Linking a device to an account across instances (issue 17): the link is made on one
// instance; the others, whether or not they have followed the feed yet, treat the
// device and the account as one person: one ballot per poll, the later one retracted
// everywhere, no ballot left under the device's id.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { api, sleep } from '../api/harness.mjs';
import { startCluster } from './cluster.mjs';

let c;
// device tokens without the proof of work: what is tested here is what they do once issued
before(async () => { c = await startCluster({ env: { TALLY_POW_DIFFICULTY: '0' } }); });
after(async () => { if (c) await c.stop(); });

const rnd = () => Math.random().toString(36).slice(2, 10);
const PASSWORD = 'correct horse battery';

async function device(node) {
  const res = await api(node, 'POST', '/v1/auth/anonymous');
  assert.equal(res.status, 201, res.text);
  return res.json;
}

async function account(node) {
  const username = `acc_${rnd()}`;
  const res = await api(node, 'POST', '/v1/auth/register', { body: { username, password: PASSWORD } });
  assert.equal(res.status, 201, res.text);
  return { username, ...res.json };
}

function login(node, username, deviceToken) {
  return api(node, 'POST', '/v1/auth/login', { body: { username, password: PASSWORD }, token: deviceToken });
}

async function newPoll(node, token, settings = {}) {
  const res = await api(node, 'POST', '/v1/polls', {
    token,
    body: { title: 'Linked', options: [{ text: 'A' }, { text: 'B' }], settings: { allow_anonymous: true, ...settings } },
  });
  assert.equal(res.status, 201, res.text);
  return res.json;
}

function vote(node, token, poll, i) {
  return api(node, 'POST', `/v1/polls/${poll.poll_id}/votes`, { token, body: { option_id: poll.options[i].option_id } });
}

async function eventually(fn, ms, what) {
  const end = Date.now() + ms;
  let v;
  while (Date.now() < end) {
    v = await fn();
    if (v) return v;
    await sleep(100);
  }
  assert.fail(`${what}: not within ${ms} ms (last: ${JSON.stringify(v)})`);
}

async function totalsEverywhere(poll, want) {
  for (const n of c.nodes) {
    await eventually(async () => {
      const r = await api(n, 'GET', `/v1/polls/${poll.poll_id}/results`);
      return r.status === 200 && r.json.total_votes === want;
    }, 5000, `${n.name} shows ${want} ballots`);
  }
}

/** Runs fn with Redis stopped: without the bus the other instances read the feed every
 * 100 ms, so what fn sends right after a link reaches instances that have not followed it. */
async function withoutBus(fn) {
  await c.stopService('redis');
  try {
    return await fn();
  } finally {
    await c.ensureRunning('redis');
  }
}

async function ballotsOf(voter) {
  const [[n]] = await c.sql(`SELECT count(*) FROM ballots WHERE voter_id = '${voter}'`);
  return Number(n);
}

test('link on one instance, vote on another at once: 409 with the device\'s ballot, and a new poll is the account\'s',
  async () => {
    const [n0, n1, n2] = c.nodes;
    const owner = await account(n0);
    const acc = await account(n0);
    const poll = await newPoll(n0, owner.token);
    const dev = await device(n0);
    const cast = await vote(n1, dev.token, poll, 0);
    assert.equal(cast.status, 200, cast.text);
    const fresh = await newPoll(n0, owner.token); // nobody voted here yet
    const changeable = await newPoll(n0, owner.token, { allow_vote_change: true });
    const first = await vote(n1, dev.token, changeable, 0);
    assert.equal(first.status, 200, first.text);

    await withoutBus(async () => {
      const linked = await login(n0, acc.username, dev.token);
      assert.equal(linked.status, 200, linked.text);
      assert.equal(linked.json.linked.ballots, 2, linked.text);

      // straight after the answer, on instances that have not followed it yet: a change
      // by the device token of its ballot (the account's now), votes by both tokens
      const changed = await api(n2, 'PUT', `/v1/polls/${changeable.poll_id}/votes/me`,
        { token: dev.token, body: { option_id: changeable.options[1].option_id } });
      assert.equal(changed.status, 200, changed.text);
      assert.equal(changed.json.vote_id, first.json.vote_id, 'the same ballot, changed');
      const dupAccount = await vote(n1, acc.token, poll, 1);
      assert.equal(dupAccount.status, 409, dupAccount.text);
      assert.equal(dupAccount.json.error.code, 'ALREADY_VOTED');
      assert.equal(dupAccount.json.error.vote_id, cast.json.vote_id);
      const byDevice = await vote(n2, dev.token, fresh, 1); // cast as the account's
      assert.equal(byDevice.status, 200, byDevice.text);
      const dupFresh = await vote(n1, acc.token, fresh, 0);
      assert.equal(dupFresh.status, 409, dupFresh.text);
      assert.equal(dupFresh.json.error.vote_id, byDevice.json.vote_id);

      assert.equal(await ballotsOf(dev.voter_id), 0, 'no ballot left under the device\'s id');
      assert.equal(await ballotsOf(acc.user_id), 3);
      await totalsEverywhere(poll, 1);
      await totalsEverywhere(fresh, 1);
    });
  });

test('both voted on different instances before the link: the later ballot is retracted on every instance',
  async () => {
    const [n0, n1, n2] = c.nodes;
    const owner = await account(n0);
    const acc = await account(n1);
    const poll = await newPoll(n0, owner.token);
    const dev = await device(n2);
    const devCast = await vote(n2, dev.token, poll, 0);
    assert.equal(devCast.status, 200, devCast.text);
    const accCast = await vote(n1, acc.token, poll, 1);
    assert.equal(accCast.status, 200, accCast.text);
    await totalsEverywhere(poll, 2);

    const linked = await login(n0, acc.username, dev.token);
    assert.equal(linked.status, 200, linked.text);
    assert.deepEqual(linked.json.linked.retracted,
      [{ poll_id: poll.poll_id, vote_id: accCast.json.vote_id, ballot: 'account' }], linked.text);
    await totalsEverywhere(poll, 1);
    for (const n of c.nodes) {
      const me = await eventually(async () => {
        const r = await api(n, 'GET', `/v1/polls/${poll.poll_id}/votes/me`, { token: acc.token });
        return r.status === 200 && r.json.vote_id === devCast.json.vote_id ? r : null;
      }, 5000, `${n.name} files the device's ballot under the account`);
      assert.deepEqual(me.json.option_ids, [poll.options[0].option_id]);
    }
    const [[counted]] = await c.sql(`SELECT ballots FROM poll_counts WHERE poll_id = '${poll.poll_id}'`);
    assert.equal(Number(counted), 1, 'the counter row moved with the retraction');
  });

test('a poll made anonymously on one instance is the account\'s on every instance after the link', async () => {
  const [n0, n1, n2] = c.nodes;
  const acc = await account(n1);
  const dev = await device(n0);
  const made = await newPoll(n0, dev.token);
  const later = await withoutBus(async () => {
    const linked = await login(n1, acc.username, dev.token);
    assert.equal(linked.status, 200, linked.text);
    assert.equal(linked.json.linked.polls, 1, linked.text);
    // the device token making a poll at once on an instance that lags: the account's
    const p = await newPoll(n2, dev.token);
    assert.equal(p.owner_id, acc.user_id);
    return p;
  });
  for (const n of [n0, n1, n2]) {
    await eventually(async () => {
      const r = await api(n, 'GET', '/v1/polls?mine=1', { token: acc.token });
      const ids = r.status === 200 ? r.json.items.filter((p) => p.owner_id === acc.user_id).map((p) => p.poll_id) : [];
      return ids.includes(made.poll_id) && ids.includes(later.poll_id);
    }, 5000, `${n.name} lists both polls under the account`);
  }
  const [[left]] = await c.sql(`SELECT count(*) FROM polls WHERE owner_id = '${dev.voter_id}'`);
  assert.equal(Number(left), 0, 'no poll left under the device\'s id');
});

test('the device token voting on two instances while it is linked on a third: one ballot, under the account',
  async () => {
    const [n0, n1, n2] = c.nodes;
    const owner = await account(n0);
    const round = async (i) => {
      const acc = await account(n0);
      const poll = await newPoll(n0, owner.token);
      const dev = await device(n0);
      const answers = await Promise.all([
        login(n0, acc.username, dev.token),
        vote(n1, dev.token, poll, 0),
        vote(n2, dev.token, poll, 1),
        vote(n1, acc.token, poll, 1),
      ]);
      assert.equal(answers[0].status, 200, answers[0].text);
      const oks = answers.slice(1).filter((a) => a.status === 200);
      for (const a of answers.slice(1)) {
        assert.ok(a.status === 200 || (a.status === 409 && a.json.error.code === 'ALREADY_VOTED'),
          `round ${i}: ${a.status} ${a.text}`);
      }
      const standing = oks.length - answers[0].json.linked.retracted.length;
      assert.equal(standing, 1, `round ${i}: one ballot stands: ${answers.map((a) => a.text).join(' | ')}`);
      assert.equal(await ballotsOf(dev.voter_id), 0, `round ${i}: nothing under the device's id`);
      const [[n]] = await c.sql(`SELECT count(*) FROM ballots WHERE poll_id = '${poll.poll_id}'`);
      assert.equal(Number(n), 1, `round ${i}: one ballot in the store`);
      await totalsEverywhere(poll, 1);
    };
    for (let i = 0; i < 10; i++) await round(i);
    // and with the others lagging the link by up to a follow period
    await withoutBus(async () => {
      for (let i = 10; i < 20; i++) await round(i);
    });
  });
