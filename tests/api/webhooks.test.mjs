// Signed webhooks (issue 21), against a receiver on loopback (which the server may reach
// only because --webhook-allow lists it): the signature verifies with the webhook's
// secret; a delivery answered 500 is retried until it gets a 2xx; one that never does
// goes to the dead-letter list the owner reads; a private address is refused without
// the allow-list, both when the URL names it and when a name resolves to it; the events
// (results.changed at most once per min_interval, vote.threshold once, poll.closed with
// the final results) carry only committed counts; webhooks are the owner's alone and
// survive a restart.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import {
  startServer, api, assertStatus, assertError, createPoll, castVote, optionByText, rand,
} from './harness.mjs';

/** A webhook receiver on 127.0.0.1: records every request; answer(req) picks the status. */
async function receiver(answer = () => 200) {
  const got = [];
  const waiters = [];
  const srv = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const r = { headers: req.headers, body, json: JSON.parse(body), at: Date.now() };
      got.push(r);
      const status = answer(r, got.length);
      res.writeHead(status, { 'Content-Type': 'text/plain' });
      res.end('ok');
      for (const w of waiters.splice(0)) w();
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  return {
    got,
    url: `http://127.0.0.1:${srv.address().port}/hook`,
    port: srv.address().port,
    /** waits (15 s at most) until pred(got) holds */
    async until(pred, what) {
      const deadline = Date.now() + 15_000;
      while (!pred(got)) {
        const left = deadline - Date.now();
        if (left <= 0) assert.fail(`${what}: not within 15 s; received ${JSON.stringify(got.map((g) => g.json), null, 1).slice(0, 2000)}`);
        await new Promise((r) => { const t = setTimeout(r, Math.min(left, 200)); waiters.push(() => { clearTimeout(t); r(); }); });
      }
      return got;
    },
    close: () => new Promise((r) => srv.close(r)),
  };
}

/** Checks Tally-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body"> under secret. */
function verify(r, secret) {
  const m = /^t=(\d+),v1=([0-9a-f]{64})$/.exec(r.headers['tally-signature'] ?? '');
  assert.ok(m, `Tally-Signature: ${r.headers['tally-signature']}`);
  const expected = crypto.createHmac('sha256', secret).update(`${m[1]}.${r.body}`).digest('hex');
  assert.equal(m[2], expected, 'the signature is the HMAC of "t.body" under the secret');
  assert.ok(Math.abs(Number(m[1]) - Date.now() / 1000) < 300, 'a fresh timestamp');
  // a tampered body does not verify
  const forged = crypto.createHmac('sha256', secret).update(`${m[1]}.${r.body.replace('"', "'")}`).digest('hex');
  assert.notEqual(m[2], forged);
}

let server, owner;
before(async () => {
  server = await startServer({ args: ['--webhook-allow', '127.0.0.1/32', '--webhook-attempts', '3', '--webhook-backoff-ms', '100'] });
  owner = server.mint(`wh-owner-${rand()}`);
});
after(async () => { await server?.close(); });

const hooks = (poll, token = owner) => `/v1/polls/${poll.poll_id}/webhooks`;

test('results.changed: signed, after the commit, at most once per min_interval, the latest results', async () => {
  const rx = await receiver();
  try {
    const poll = await createPoll(server, owner);
    const reg = await api(server, 'POST', hooks(poll), { token: owner, body: { url: rx.url, events: ['results.changed'], min_interval: 1 } });
    assertStatus(reg, 201);
    const wh = reg.json;
    assert.match(wh.webhook_id, /^wh_[A-Za-z0-9_-]+$/);
    assert.match(wh.secret, /^whsec_[A-Za-z0-9_-]{40,}$/);
    assert.equal(reg.headers.get('location'), `/v1/polls/${poll.poll_id}/webhooks/${wh.webhook_id}`);
    assert.deepEqual(wh.events, ['results.changed']);
    assert.equal(wh.min_interval, 1);
    // three votes close together: the first change goes out at once, the rest within a
    // second after it, as one delivery with the latest counts
    for (const text of ['A', 'B', 'B']) {
      assertStatus(await castVote(server, server.mint(`v-${rand()}`), poll.poll_id, { option_id: optionByText(poll, text) }), 200);
    }
    const got = await rx.until((g) => g.some((r) => r.json.data.total_votes === 3), 'results.changed with all three votes');
    for (const r of got) {
      verify(r, wh.secret);
      assert.equal(r.headers['content-type'], 'application/json');
      assert.equal(r.headers['tally-event'], 'results.changed');
      assert.equal(r.headers['tally-delivery'], r.json.delivery_id);
      assert.equal(r.json.event, 'results.changed');
      assert.equal(r.json.poll_id, poll.poll_id);
      assert.equal(r.json.webhook_id, wh.webhook_id);
    }
    for (let i = 1; i < got.length; i++) {
      assert.ok(got[i].at - got[i - 1].at >= 900, `at most once a second: ${got.map((r) => r.at)}`);
    }
    // every delivered count was committed: the results show at least as many
    const now = (await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`)).json.total_votes;
    assert.ok(got.every((r) => r.json.data.total_votes <= now));
  } finally {
    await rx.close();
  }
});

test('a 500 is retried until a 2xx; the same delivery each time, signed anew', async () => {
  const rx = await receiver((r, n) => (n <= 2 ? 500 : 200));
  try {
    const poll = await createPoll(server, owner);
    const wh = (await api(server, 'POST', hooks(poll), { token: owner, body: { url: rx.url, events: ['vote.threshold'], threshold: 1 } })).json;
    assertStatus(await castVote(server, server.mint(`v-${rand()}`), poll.poll_id, { option_id: optionByText(poll, 'C') }), 200);
    const got = await rx.until((g) => g.length >= 3, 'three attempts');
    assert.equal(new Set(got.map((r) => r.json.delivery_id)).size, 1, 'one delivery, retried');
    for (const r of got) verify(r, wh.secret);
    assert.equal(got[2].json.event, 'vote.threshold');
    assert.equal(got[2].json.threshold, 1);
    assert.equal(got[2].json.data.total_votes, 1);
    const list = await api(server, 'GET', hooks(poll), { token: owner });
    assertStatus(list, 200);
    const item = list.json.items.find((i) => i.webhook_id === wh.webhook_id);
    assert.equal(item.delivered, 1);
    assert.deepEqual(item.dead_letters, []);
    assert.equal(item.secret, undefined, 'the secret is shown once, at registration');
  } finally {
    await rx.close();
  }
});

test('after --webhook-attempts failures the delivery is dead-lettered, visible to the owner', async () => {
  const rx = await receiver(() => 500);
  try {
    const poll = await createPoll(server, owner);
    const wh = (await api(server, 'POST', hooks(poll), { token: owner, body: { url: rx.url, events: ['poll.closed'] } })).json;
    assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`, { token: owner, body: { status: 'closed' } }), 200);
    await rx.until((g) => g.length >= 3, 'three attempts');
    let item;
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      item = (await api(server, 'GET', hooks(poll), { token: owner })).json.items[0];
      if (item.dead_letters.length > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(item.dead_letters.length, 1, JSON.stringify(item));
    const d = item.dead_letters[0];
    assert.equal(d.event, 'poll.closed');
    assert.equal(d.attempts, 3);
    assert.equal(d.last_status, 500);
    assert.equal(d.payload.data.final, true, 'the final results');
    assert.equal(d.delivery_id, rx.got[0].json.delivery_id);
    assert.equal(rx.got.length, 3, 'no attempt after the last');
    assert.equal(item.failed, 1);
    void wh;
  } finally {
    await rx.close();
  }
});

test('a private address is refused without --webhook-allow: named in the URL, or reached through a name', async () => {
  const plain = await startServer({ args: ['--webhook-backoff-ms', '100'] });
  const rx = await receiver();
  try {
    const own = plain.mint(`wh-${rand()}`);
    const poll = await createPoll(plain, own);
    for (const url of [rx.url, `http://10.1.2.3/hook`, `http://[::1]:${rx.port}/hook`, 'http://169.254.169.254/latest']) {
      assertError(await api(plain, 'POST', hooks(poll), { token: own, body: { url, events: ['results.changed'] } }), 400, 'VALIDATION_ERROR', { field: 'url' });
    }
    // a name is judged where it leads, when connecting: localhost is loopback
    const reg = await api(plain, 'POST', hooks(poll), { token: own, body: { url: `http://localhost:${rx.port}/hook`, events: ['vote.threshold'], threshold: 1 } });
    assertStatus(reg, 201);
    assertStatus(await castVote(plain, plain.mint(`v-${rand()}`), poll.poll_id, { option_id: optionByText(poll, 'A') }), 200);
    let item;
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      item = (await api(plain, 'GET', hooks(poll), { token: own })).json.items[0];
      if (item.dead_letters.length > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(item.dead_letters.length, 1, JSON.stringify(item));
    assert.match(item.dead_letters[0].last_error, /refused: .* is not a public address/);
    assert.equal(item.dead_letters[0].attempts, 1, 'no retry: the destination will not change');
    assert.equal(rx.got.length, 0, 'nothing reached the receiver');
  } finally {
    await rx.close();
    await plain.close();
  }
});

test('webhooks are the owner\'s: 401 without a token, 403 for anyone else; bad bodies name the field', async () => {
  const poll = await createPoll(server, owner);
  const other = server.mint(`other-${rand()}`);
  const body = { url: 'http://127.0.0.1:9/x', events: ['poll.closed'] };
  assertError(await api(server, 'POST', hooks(poll), { body }), 401, 'UNAUTHENTICATED');
  assertError(await api(server, 'POST', hooks(poll), { token: other, body }), 403, 'FORBIDDEN');
  assertError(await api(server, 'GET', hooks(poll), { token: other }), 403, 'FORBIDDEN');
  assertError(await api(server, 'POST', '/v1/polls/AAAAAAAAAAAAAAAA/webhooks', { token: owner, body }), 404, 'POLL_NOT_FOUND');
  for (const [b, field] of [[{ events: ['poll.closed'] }, 'url'], [{ url: 'ftp://x/y', events: ['poll.closed'] }, 'url'],
    [{ url: 'http://user:pw@example.org/', events: ['poll.closed'] }, 'url'],
    [{ url: 'http://example.org/', events: [] }, 'events'], [{ url: 'http://example.org/', events: ['vote.cast'] }, 'events'],
    [{ url: 'http://example.org/', events: ['poll.closed', 'poll.closed'] }, 'events'],
    [{ url: 'http://example.org/', events: ['vote.threshold'] }, 'threshold'],
    [{ url: 'http://example.org/', events: ['results.changed'], min_interval: 0 }, 'min_interval']]) {
    assertError(await api(server, 'POST', hooks(poll), { token: owner, body: b }), 400, 'VALIDATION_ERROR', { field });
  }
  const wh = (await api(server, 'POST', hooks(poll), { token: owner, body })).json;
  assertError(await api(server, 'DELETE', `${hooks(poll)}/${wh.webhook_id}`, { token: other }), 403, 'FORBIDDEN');
  assertStatus(await api(server, 'DELETE', `${hooks(poll)}/${wh.webhook_id}`, { token: owner }), 204);
  assertError(await api(server, 'DELETE', `${hooks(poll)}/${wh.webhook_id}`, { token: owner }), 404, 'WEBHOOK_NOT_FOUND');
  assert.deepEqual((await api(server, 'GET', hooks(poll), { token: owner })).json.items, []);
});

test('webhooks survive a restart; a deleted one is gone for good', async () => {
  const s = await startServer({ args: ['--webhook-allow', '127.0.0.1/32'] });
  const rx = await receiver();
  try {
    const own = s.mint(`wh-${rand()}`);
    const poll = await createPoll(s, own);
    const keep = (await api(s, 'POST', hooks(poll), { token: own, body: { url: rx.url, events: ['vote.threshold'], threshold: 1 } })).json;
    const drop = (await api(s, 'POST', hooks(poll), { token: own, body: { url: rx.url, events: ['poll.closed'] } })).json;
    assertStatus(await api(s, 'DELETE', `${hooks(poll)}/${drop.webhook_id}`, { token: own }), 204);
    await s.restart();
    const items = (await api(s, 'GET', hooks(poll), { token: own })).json.items;
    assert.deepEqual(items.map((i) => i.webhook_id), [keep.webhook_id]);
    assertStatus(await castVote(s, s.mint(`v-${rand()}`), poll.poll_id, { option_id: optionByText(poll, 'B') }), 200);
    const got = await rx.until((g) => g.length >= 1, 'the threshold after the restart');
    verify(got[0], keep.secret);
  } finally {
    await rx.close();
    await s.close();
  }
});
