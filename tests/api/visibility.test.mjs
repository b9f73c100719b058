// results_visibility on every path that shows counts (results, timeline, the live SSE
// stream's first message, export, audit, the poll object itself) for a voter, a non-voter,
// the owner and an anonymous caller (no token), while active and after close.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import {
  startServer, api, request, assertError, assertStatus, rand, createPoll, castVote,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const newVoter = () => server.mint(`voter-${rand()}`);

/**
 * Opens GET `path` as an SSE stream with node:http and resolves with the first
 * `event: results` message ({status, event, id, data}), or with the error answer
 * ({status, json}) when the server does not stream. Gives up after `ms`.
 */
function firstSseEvent(path, token, ms = 3000) {
  return new Promise((resolve, reject) => {
    const headers = { accept: 'text/event-stream' };
    if (token) headers.authorization = `Bearer ${token}`;
    const req = http.get({ host: '127.0.0.1', port: server.port, path, headers }, (res) => {
      let buf = '';
      res.setEncoding('utf8');
      const done = (v) => { clearTimeout(timer); req.destroy(); resolve(v); };
      if (res.statusCode !== 200) {
        res.on('data', (d) => { buf += d; });
        res.on('end', () => {
          let json = null;
          try { json = JSON.parse(buf); } catch { /* not JSON */ }
          done({ status: res.statusCode, headers: res.headers, json, text: buf });
        });
        return;
      }
      assert.match(res.headers['content-type'] || '', /^text\/event-stream/, 'SSE content type');
      res.on('data', (d) => {
        buf += d.replace(/\r\n/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const ev = { event: 'message', id: null, data: '' };
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) continue;
            const i = line.indexOf(':');
            const k = i < 0 ? line : line.slice(0, i);
            const v = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
            if (k === 'event') ev.event = v;
            else if (k === 'id') ev.id = v;
            else if (k === 'data') data.push(v);
          }
          if (ev.event === 'results' && data.length) {
            done({ status: 200, event: ev.event, id: ev.id, data: JSON.parse(data.join('\n')) });
            return;
          }
        }
      });
    });
    const timer = setTimeout(() => { req.destroy(); reject(new Error(`no results event on ${path} within ${ms} ms`)); },
      ms);
    req.on('error', (e) => { if (!/aborted|socket hang up/.test(e.message)) reject(e); });
  });
}

/** No count of any kind anywhere in a JSON value. */
function assertNoCounts(v, what) {
  const bad = [];
  const walk = (x, path) => {
    if (Array.isArray(x)) x.forEach((y, i) => walk(y, `${path}[${i}]`));
    else if (x && typeof x === 'object') {
      for (const [k, y] of Object.entries(x)) {
        if (['votes', 'total_votes', 'percentage', 'score_sum', 'score_mean', 'rounds', 'winner', 'condorcet_winner',
          'counts', 'votes_last_minute'].includes(k)) bad.push(`${path}.${k}`);
        walk(y, `${path}.${k}`);
      }
    }
  };
  walk(v, '');
  assert.deepEqual(bad, [], `${what} must show no counts: ${JSON.stringify(v)}`);
}

const ROLES = ['owner', 'voter', 'non-voter', 'anonymous'];

function canSee(mode, role, closed, { during = true } = {}) {
  if (role === 'owner') return true;
  if (!during && !closed) return false;
  switch (mode) {
    case 'always': return true;
    case 'after_vote': return role === 'voter' || closed;
    case 'after_close': return closed;
    default: return false; // owner_only
  }
}

/** Checks every path for every role against the expected visibility. */
async function checkAllPaths(poll, toks, mode, closed, opts = {}) {
  const id = poll.poll_id;
  const state = closed ? 'closed' : 'active';
  for (const role of ROLES) {
    const tok = toks[role];
    const see = canSee(mode, role, closed, opts);
    const what = `${mode}, ${state}, ${role}`;

    const r = await api(server, 'GET', `/v1/polls/${id}/results`, { token: tok });
    if (see) {
      assertStatus(r, 200, `results (${what})`);
      assert.equal(r.json.total_votes, 1, `results count the one ballot (${what})`);
      assert.equal(r.json.status, state);
    } else {
      const e = assertError(r, 403, 'RESULTS_HIDDEN');
      assert.equal(e.results_visibility, mode, `the error names the visibility (${what})`);
      assertNoCounts(r.json, `403 results (${what})`);
    }

    const t = await api(server, 'GET', `/v1/polls/${id}/timeline?bucket=1m`, { token: tok });
    if (see) {
      assertStatus(t, 200, `timeline (${what})`);
      const sum = t.json.items.reduce((s, it) => s + Object.values(it.counts).reduce((x, y) => x + y, 0), 0);
      assert.equal(sum, 1, `the timeline counts the ballot (${what})`);
    } else {
      assertError(t, 403, 'RESULTS_HIDDEN');
      assertNoCounts(t.json, `403 timeline (${what})`);
    }

    const live = await firstSseEvent(`/v1/polls/${id}/live`, tok);
    assert.equal(live.status, 200, `live stream opens (${what}): ${JSON.stringify(live)}`);
    assert.equal(live.data.poll_id, id);
    assert.equal(live.data.status, state, `live status (${what})`);
    if (see) {
      assert.equal(live.data.total_votes, 1, `live first message has the counts (${what})`);
      assert.notEqual(live.data.results_hidden, true);
    } else {
      assert.equal(live.data.results_hidden, true, `live first message says hidden (${what})`);
      assertNoCounts(live.data, `live first message (${what})`);
    }

    const g = await api(server, 'GET', `/v1/polls/${id}`, { token: tok });
    assertStatus(g, 200, `poll (${what})`);
    assertNoCounts(g.json, `the poll object (${what})`);
    if (role === 'owner') {
      const list = await api(server, 'GET', '/v1/polls?mine=1&limit=100', { token: tok });
      assertStatus(list, 200, 'the owner\'s poll listing');
      assertNoCounts(list.json, `the poll listing (${what})`);
    }

    for (const p of [`/v1/polls/${id}/export?format=csv`, `/v1/polls/${id}/export?format=json`,
      `/v1/polls/${id}/audit`]) {
      const res = await request(server, 'GET', p, { token: tok });
      if (role === 'owner') assertStatus(res, 200, `${p} (${what})`);
      else if (role === 'anonymous') assertError(res, 401, 'UNAUTHENTICATED');
      else assertError(res, 403, 'FORBIDDEN');
      if (role !== 'owner') assert.ok(!res.text.includes(poll.options[0].option_id), `${p} leaks nothing (${what})`);
    }
  }
}

for (const mode of ['after_vote', 'after_close', 'owner_only']) {
  test(`${mode}: every path, every caller, while active and after close`, async () => {
    const poll = await createPoll(server, ownerTok, { settings: { results_visibility: mode } });
    const toks = { owner: ownerTok, voter: newVoter(), 'non-voter': newVoter(), anonymous: null };
    assertStatus(await castVote(server, toks.voter, poll.poll_id, { option_id: poll.options[0].option_id }), 200);
    await checkAllPaths(poll, toks, mode, false);
    assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`,
      { token: ownerTok, body: { status: 'closed' } }), 200, 'close');
    await checkAllPaths(poll, toks, mode, true);
  });
}

test('always: every path open to everyone (export and audit still owner-only)', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'always' } });
  const toks = { owner: ownerTok, voter: newVoter(), 'non-voter': newVoter(), anonymous: null };
  assertStatus(await castVote(server, toks.voter, poll.poll_id, { option_id: poll.options[0].option_id }), 200);
  await checkAllPaths(poll, toks, 'always', false);
});

test('show_results_during_voting: false hides counts from all but the owner until the poll closes', async () => {
  const poll = await createPoll(server, ownerTok,
    { settings: { results_visibility: 'always', show_results_during_voting: false } });
  const toks = { owner: ownerTok, voter: newVoter(), 'non-voter': newVoter(), anonymous: null };
  assertStatus(await castVote(server, toks.voter, poll.poll_id, { option_id: poll.options[0].option_id }), 200);
  const r = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: toks.voter });
  assertError(r, 403, 'RESULTS_HIDDEN');
  for (const role of ['voter', 'non-voter', 'anonymous']) {
    assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline`, { token: toks[role] }), 403,
      'RESULTS_HIDDEN');
    const live = await firstSseEvent(`/v1/polls/${poll.poll_id}/live`, toks[role]);
    assert.equal(live.data.results_hidden, true, `live hidden for ${role}`);
    assertNoCounts(live.data, `live for ${role}`);
  }
  assertStatus(await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: ownerTok }), 200, 'owner');
  assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`,
    { token: ownerTok, body: { status: 'closed' } }), 200, 'close');
  for (const role of ['voter', 'non-voter', 'anonymous']) {
    assertStatus(await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: toks[role] }), 200,
      `${role} after close`);
    assertStatus(await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline`, { token: toks[role] }), 200,
      `${role} timeline after close`);
  }
});

test('after_vote: an anonymous device token sees counts only after its own ballot', async () => {
  const poll = await createPoll(server, ownerTok,
    { settings: { results_visibility: 'after_vote', allow_anonymous: true } });
  const anon = await api(server, 'POST', '/v1/auth/anonymous');
  assertStatus(anon, 201, 'anonymous token');
  const tok = anon.json.token;
  assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: tok }), 403, 'RESULTS_HIDDEN');
  assert.equal((await firstSseEvent(`/v1/polls/${poll.poll_id}/live`, tok)).data.results_hidden, true);
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: poll.options[1].option_id }), 200);
  const r = await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: tok });
  assertStatus(r, 200, 'anonymous voter after voting');
  assert.equal(r.json.total_votes, 1);
  assert.equal((await firstSseEvent(`/v1/polls/${poll.poll_id}/live`, tok)).data.total_votes, 1);
  assertError(await request(server, 'GET', `/v1/polls/${poll.poll_id}/export`, { token: tok }), 403, 'FORBIDDEN');
  assertError(await request(server, 'GET', `/v1/polls/${poll.poll_id}/audit`, { token: tok }), 403, 'FORBIDDEN');
});

test('after_vote: a voter who retracted their ballot no longer sees the counts', async () => {
  const poll = await createPoll(server, ownerTok,
    { settings: { results_visibility: 'after_vote', allow_vote_change: true } });
  const tok = newVoter();
  assertStatus(await castVote(server, newVoter(), poll.poll_id, { option_id: poll.options[0].option_id }), 200);
  assertStatus(await castVote(server, tok, poll.poll_id, { option_id: poll.options[1].option_id }), 200);
  assertStatus(await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: tok }), 200, 'after voting');
  assertStatus(await api(server, 'DELETE', `/v1/polls/${poll.poll_id}/votes/me`, { token: tok }), 204, 'retract');
  assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}/results`, { token: tok }), 403, 'RESULTS_HIDDEN');
  assertError(await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline`, { token: tok }), 403, 'RESULTS_HIDDEN');
  const live = await firstSseEvent(`/v1/polls/${poll.poll_id}/live`, tok);
  assert.equal(live.data.results_hidden, true, 'live hidden after retraction');
});

test('a changed visibility applies to every path at once', async () => {
  const poll = await createPoll(server, ownerTok, { settings: { results_visibility: 'always' } });
  const voter = newVoter();
  assertStatus(await castVote(server, voter, poll.poll_id, { option_id: poll.options[0].option_id }), 200);
  assertStatus(await api(server, 'PATCH', `/v1/polls/${poll.poll_id}`,
    { token: ownerTok, body: { settings: { results_visibility: 'owner_only' } } }), 200, 'to owner_only');
  const toks = { owner: ownerTok, voter, 'non-voter': newVoter(), anonymous: null };
  await checkAllPaths(poll, toks, 'owner_only', false);
});
