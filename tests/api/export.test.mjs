// Export (CSV and JSON) and the audit log's view of voters: shapes, formula injection
// defused, per-poll pseudonyms (stable for a voter within a poll, different across polls,
// never the real voter id), and the timeline agreeing with the results.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import {
  startServer, api, request, assertError, assertStatus, assertIso, rand, createPoll, castVote, results, ISO_MS,
} from './harness.mjs';

let server, ownerTok;
before(async () => {
  server = await startServer();
  ownerTok = await server.token(`owner-${rand()}`);
});
after(async () => { await server?.close(); });

const BOM = '\uFEFF';
const realId = () => `real-voter-${rand(8)}`;
const put = (id, token, body) => api(server, 'PUT', `/v1/polls/${id}/votes/me`, { token, body });
const del = (id, token) => api(server, 'DELETE', `/v1/polls/${id}/votes/me`, { token });

/** RFC 4180: records end with CRLF; quoted fields may hold commas, quotes ("") and line breaks. */
function parseCsv(text) {
  const rows = [];
  let row = [];
  let cell = '';
  let i = 0;
  let quoted = false;
  while (i < text.length) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"') {
        if (text[i + 1] === '"') { cell += '"'; i += 2; continue; }
        quoted = false; i++; continue;
      }
      cell += ch; i++; continue;
    }
    if (ch === '"') {
      assert.equal(cell, '', `a quote may only open a field (at ${i}): ${JSON.stringify(text.slice(i - 20, i + 20))}`);
      quoted = true; i++; continue;
    }
    if (ch === ',') { row.push(cell); cell = ''; i++; continue; }
    if (ch === '\r' && text[i + 1] === '\n') { row.push(cell); rows.push(row); row = []; cell = ''; i += 2; continue; }
    assert.ok(ch !== '\r' && ch !== '\n', `a bare line break outside quotes at ${i}: ${JSON.stringify(text)}`);
    cell += ch; i++;
  }
  assert.equal(quoted, false, 'unterminated quoted field');
  assert.ok(row.length === 0 && cell === '', 'the last record ends with CRLF');
  return rows;
}

async function exportCsv(poll, token = ownerTok) {
  const res = await request(server, 'GET', `/v1/polls/${poll.poll_id}/export?format=csv`, { token });
  assertStatus(res, 200, 'CSV export');
  assert.match(res.headers.get('content-type'), /^text\/csv; ?charset=utf-8$/i);
  assert.match(res.headers.get('content-disposition') || '', /^attachment; *filename=/, 'a download');
  assert.ok(res.text.startsWith(BOM), `CSV starts with a UTF-8 BOM: ${JSON.stringify(res.text.slice(0, 10))}`);
  const rows = parseCsv(res.text.slice(1));
  return { res, text: res.text, header: rows[0], rows: rows.slice(1) };
}

async function exportJson(poll, token = ownerTok) {
  const res = await request(server, 'GET', `/v1/polls/${poll.poll_id}/export?format=json`, { token });
  assertStatus(res, 200, 'JSON export');
  assert.match(res.headers.get('content-type'), /^application\/json/);
  assert.ok(res.json, `JSON export parses: ${res.text.slice(0, 300)}`);
  return res.json;
}

async function auditAll(poll) {
  const items = [];
  let cursor = null;
  do {
    const q = cursor ? `&cursor=${encodeURIComponent(cursor)}` : '';
    const res = await api(server, 'GET', `/v1/polls/${poll.poll_id}/audit?limit=100${q}`, { token: ownerTok });
    assertStatus(res, 200, 'audit');
    items.push(...res.json.items);
    cursor = res.json.next_cursor;
  } while (cursor);
  return items;
}

const strip = ({ votes_last_minute: _v, as_of: _a, ...rest }) => rest;

// ---- CSV ----------------------------------------------------------------------------------

test('CSV: BOM, header voter,recorded_at,<options>, one row per ballot with 1 for a chosen option', async () => {
  const poll = await createPoll(server, ownerTok, { type: 'multiple' });
  const [a, b, c] = poll.options.map((o) => o.option_id);
  const ballots = [[a], [a, c], [b, c]];
  for (const option_ids of ballots) {
    assertStatus(await castVote(server, server.mint(realId()), poll.poll_id, { option_ids }), 200);
  }
  const { header, rows } = await exportCsv(poll);
  assert.deepEqual(header, ['voter', 'recorded_at', 'A', 'B', 'C']);
  assert.equal(rows.length, 3, 'one row per ballot');
  for (const r of rows) {
    assert.equal(r.length, 5, `every row has every column: ${JSON.stringify(r)}`);
    assert.match(r[0], /^p_[A-Za-z0-9_-]+$/, 'a pseudonymous voter id');
    assert.match(r[1], ISO_MS, 'recorded_at');
  }
  const chosen = rows.map((r) => r.slice(2).map((v) => (v === '' ? 0 : Number(v))));
  assert.deepEqual(chosen.map((x) => x.join('')).sort(), ['100', '101', '011'].sort(),
    'cells mark the chosen options');
  assert.equal(new Set(rows.map((r) => r[0])).size, 3, 'three voters, three pseudonyms');
});

test('CSV: ranked rows hold ranks, score rows hold scores', async () => {
  const rp = await createPoll(server, ownerTok, { type: 'ranked' });
  const [ra, , rc] = rp.options.map((o) => o.option_id);
  assertStatus(await castVote(server, server.mint(realId()), rp.poll_id, { ranking: [rc, ra] }), 200);
  let csv = await exportCsv(rp);
  assert.deepEqual(csv.rows.map((r) => r.slice(2)), [['2', '', '1']], 'C ranked 1st, A 2nd, B unranked');

  const sp = await createPoll(server, ownerTok, { type: 'score' });
  const [sa, sb] = sp.options.map((o) => o.option_id);
  assertStatus(await castVote(server, server.mint(realId()), sp.poll_id, { scores: { [sa]: 4, [sb]: 0 } }), 200);
  csv = await exportCsv(sp);
  assert.deepEqual(csv.rows.map((r) => r.slice(2)), [['4', '0', '']], 'scores; unscored blank');
});

test('CSV: formula injection defused; quotes, commas, line breaks and non-ASCII survive', async () => {
  const texts = ['=SUM(A1)', '+1', '-2', '@cmd', '\tTab', '\rCR', 'a, "b"', 'x\ny', 'été ☃', 'plain'];
  const poll = await createPoll(server, ownerTok, { options: texts.map((text) => ({ text })) });
  assertStatus(await castVote(server, server.mint(realId()), poll.poll_id,
    { option_id: poll.options[0].option_id }), 200);
  const { text, header, rows } = await exportCsv(poll);
  const dangerous = /^[=+\-@\t\r]/;
  // option texts are stored without white space at either end, a leading tab or CR too
  // (the test below gives the CSV one stored before that)
  const expected = texts.map((t) => t.trim()).map((t) => (dangerous.test(t) ? `'${t}` : t));
  assert.deepEqual(header.slice(2), expected, 'header cells: dangerous ones prefixed with an apostrophe');
  for (const cell of [...header, ...rows.flat()]) {
    assert.ok(!dangerous.test(cell), `no cell may start with = + - @ tab or CR: ${JSON.stringify(cell)}`);
  }
  const headLine = text.slice(1, text.indexOf('\r\n', text.indexOf('plain')));
  assert.ok(headLine.includes('"\'=SUM(A1)"'), `the defused cell is quoted: ${JSON.stringify(headLine)}`);
  assert.ok(headLine.includes('"a, ""b"""'), 'quotes doubled inside a quoted cell');
  assert.equal(rows.length, 1);
  assert.equal(rows[0].slice(2).join('|'), `1${'|'.repeat(texts.length - 1)}`, 'the ballot row');
});

test('CSV: option texts stored before texts were trimmed, starting with a tab or CR, are defused too', async () => {
  const poll = await createPoll(server, ownerTok, { options: [{ text: 'Tab' }, { text: 'CR' }, { text: 'plain' }] });
  assertStatus(await castVote(server, server.mint(realId()), poll.poll_id,
    { option_id: poll.options[0].option_id }), 200);
  // what an older tally could have stored: the texts as sent, a leading tab and CR kept
  await server.stop();
  const sql = (chr) => `UPDATE options SET text = ${chr}(9) || 'Tab' WHERE poll_id = '${poll.poll_id}' AND position = 0;`
    + ` UPDATE options SET text = ${chr}(13) || 'CR' WHERE poll_id = '${poll.poll_id}' AND position = 1;`;
  if (server.store) execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', server.store, '-c', sql('chr')]);
  else execFileSync('sqlite3', [path.join(server.dataDir, 'tally.db'), sql('char')]);
  await server.restart();
  const { header } = await exportCsv(poll);
  assert.deepEqual(header.slice(2), ["'\tTab", "'\rCR", 'plain'], 'prefixed with an apostrophe');
});

test('CSV is the default format; an unknown format → 400 naming format; empty poll → header only', async () => {
  const poll = await createPoll(server, ownerTok);
  const def = await request(server, 'GET', `/v1/polls/${poll.poll_id}/export`, { token: ownerTok });
  assertStatus(def, 200, 'export without format');
  assert.match(def.headers.get('content-type'), /^text\/csv/);
  assert.equal(def.text, `${BOM}voter,recorded_at,A,B,C\r\n`, 'no ballots: only the header');
  assertError(await request(server, 'GET', `/v1/polls/${poll.poll_id}/export?format=xml`, { token: ownerTok }), 400,
    'VALIDATION_ERROR', { field: 'format' });
  const j = await exportJson(poll);
  assert.deepEqual(j.ballots, [], 'no ballots in JSON');
  assertError(await request(server, 'GET', '/v1/polls/noSuchPoll12345/export', { token: ownerTok }), 404,
    'POLL_NOT_FOUND');
});

// ---- JSON ---------------------------------------------------------------------------------

test('JSON: {poll, results, timeline, ballots[{voter, ballot, recorded_at}]} matching results and audit',
  async () => {
    const poll = await createPoll(server, ownerTok, { type: 'ranked', settings: { allow_vote_change: true } });
    const [a, b, c] = poll.options.map((o) => o.option_id);
    const voters = [0, 1, 2, 3].map(() => server.mint(realId()));
    const cast = [{ ranking: [a, b] }, { ranking: [b] }, { ranking: [c, a, b] }, { ranking: [a] }];
    for (let i = 0; i < voters.length; i++) assertStatus(await castVote(server, voters[i], poll.poll_id, cast[i]), 200);
    assertStatus(await put(poll.poll_id, voters[1], { ranking: [c] }), 200, 'change');
    assertStatus(await del(poll.poll_id, voters[3]), 204, 'retract');
    const final = { 0: { ranking: [a, b] }, 1: { ranking: [c] }, 2: { ranking: [c, a, b] } };

    const j = await exportJson(poll);
    assert.deepEqual(Object.keys(j).sort(), ['ballots', 'poll', 'results', 'timeline']);
    assert.equal(j.poll.poll_id, poll.poll_id);
    assert.deepEqual(j.poll.options, poll.options);
    const r = await results(server, poll.poll_id);
    assert.deepEqual(strip(j.results), strip(r.json), 'the export carries the current results');
    assert.equal(j.ballots.length, 3, 'one entry per current ballot');
    for (const bl of j.ballots) {
      assert.deepEqual(Object.keys(bl).sort(), ['ballot', 'recorded_at', 'voter']);
      assertIso(bl.recorded_at, 'ballot recorded_at');
    }
    // map pseudonyms to voters through the audit log's cast events (cast in order)
    const audit = await auditAll(poll);
    const casts = audit.filter((e) => e.event === 'cast');
    const pseudo = casts.map((e) => e.voter);
    const byVoter = Object.fromEntries(j.ballots.map((bl) => [bl.voter, bl.ballot]));
    assert.deepEqual(byVoter, { [pseudo[0]]: final[0], [pseudo[1]]: final[1], [pseudo[2]]: final[2] },
      'each voter\'s current ballot under their pseudonym');
    const csv = await exportCsv(poll);
    assert.deepEqual(csv.rows.map((row) => row[0]).sort(), j.ballots.map((bl) => bl.voter).sort(),
      'CSV and JSON list the same voters');
    const tlSum = {};
    for (const it of j.timeline.items) for (const [k, n] of Object.entries(it.counts)) tlSum[k] = (tlSum[k] || 0) + n;
    for (const o of r.json.options) assert.equal(tlSum[o.option_id] || 0, o.votes, 'export timeline sums');
  });

// ---- pseudonyms ---------------------------------------------------------------------------

test('pseudonyms: stable per voter within a poll (audit, CSV, JSON, restart), different across polls; ' +
  'real voter ids never appear', async () => {
  const ids = [realId(), realId(), realId()];
  const toks = ids.map((sub) => server.mint(sub));
  const p1 = await createPoll(server, ownerTok, { settings: { allow_vote_change: true } });
  const p2 = await createPoll(server, ownerTok, { type: 'score' });
  const o1 = p1.options.map((o) => o.option_id);
  const o2 = p2.options.map((o) => o.option_id);
  for (let i = 0; i < 3; i++) {
    assertStatus(await castVote(server, toks[i], p1.poll_id, { option_id: o1[i] }), 200);
    assertStatus(await castVote(server, toks[i], p2.poll_id, { scores: { [o2[i]]: i + 1 } }), 200);
  }
  assertStatus(await put(p1.poll_id, toks[0], { option_id: o1[2] }), 200);
  assertStatus(await del(p1.poll_id, toks[1]), 204);
  assertStatus(await castVote(server, toks[1], p1.poll_id, { option_id: o1[0] }), 200);

  const a1 = await auditAll(p1);
  const a2 = await auditAll(p2);
  const ps1 = a1.slice(0, 3).map((e) => e.voter);
  const ps2 = a2.slice(0, 3).map((e) => e.voter);
  assert.equal(new Set(ps1).size, 3, 'distinct voters, distinct pseudonyms');
  assert.deepEqual(a1.map((e) => e.voter), [...ps1, ps1[0], ps1[1], ps1[1]], 'stable across events');
  for (let i = 0; i < 3; i++) {
    assert.notEqual(ps1[i], ps2[i], 'the same voter has another pseudonym in another poll');
    assert.ok(!ps2.includes(ps1[i]), 'no pseudonym is shared across polls');
  }
  const csv1 = await exportCsv(p1);
  const json1 = await exportJson(p1);
  const csv2 = await exportCsv(p2);
  const json2 = await exportJson(p2);
  assert.deepEqual(csv1.rows.map((r) => r[0]).sort(), [...ps1].sort(), 'CSV pseudonyms are the audit\'s');
  assert.deepEqual(json1.ballots.map((b) => b.voter).sort(), [...ps1].sort(), 'JSON pseudonyms are the audit\'s');
  assert.deepEqual(csv2.rows.map((r) => r[0]).sort(), [...ps2].sort());
  const again = await exportCsv(p1);
  assert.deepEqual(again.rows.map((r) => r[0]), csv1.rows.map((r) => r[0]), 'the same on a second export');

  const texts = [
    JSON.stringify(a1), JSON.stringify(a2), csv1.text, csv2.text, JSON.stringify(json1), JSON.stringify(json2),
  ];
  for (const id of ids) {
    for (const t of texts) assert.ok(!t.includes(id), `the real voter id ${id} must not appear in audit or export`);
  }

  await server.restart();
  const after1 = await auditAll(p1);
  assert.deepEqual(after1.map((e) => e.voter), a1.map((e) => e.voter), 'pseudonyms survive a restart');
  assert.deepEqual(after1, a1, 'the audit log is the same after a restart');
  const csvAfter = await exportCsv(p1);
  assert.deepEqual(csvAfter.rows, csv1.rows, 'the CSV export is the same after a restart');
});

// ---- timeline -----------------------------------------------------------------------------

test('timeline: for every bucket size the per-option sums equal the results counts, across changes', async () => {
  const cases = [
    { type: 'single', ballots: (o) => [{ option_id: o[0] }, { option_id: o[1] }, { option_id: o[1] }],
      change: (o) => ({ option_id: o[2] }) },
    { type: 'multiple', ballots: (o) => [{ option_ids: [o[0], o[1]] }, { option_ids: [o[1]] }, { option_ids: o }],
      change: (o) => ({ option_ids: [o[2]] }) },
    { type: 'ranked', ballots: (o) => [{ ranking: [o[0], o[1]] }, { ranking: [o[1]] }, { ranking: [o[2], o[0]] }],
      change: (o) => ({ ranking: [o[0]] }) },
    { type: 'score', ballots: (o) => [{ scores: { [o[0]]: 3, [o[1]]: 0 } }, { scores: { [o[1]]: 5 } },
      { scores: { [o[2]]: 1, [o[0]]: 2 } }], change: (o) => ({ scores: { [o[1]]: 0, [o[2]]: 4 } }) },
  ];
  for (const k of cases) {
    const poll = await createPoll(server, ownerTok, { type: k.type, settings: { allow_vote_change: true } });
    const o = poll.options.map((x) => x.option_id);
    const toks = k.ballots(o).map(() => server.mint(realId()));
    const bs = k.ballots(o);
    for (let i = 0; i < bs.length; i++) assertStatus(await castVote(server, toks[i], poll.poll_id, bs[i]), 200);
    assertStatus(await put(poll.poll_id, toks[0], k.change(o)), 200, `${k.type}: change`);
    assertStatus(await del(poll.poll_id, toks[1]), 204, `${k.type}: retract`);
    const r = await results(server, poll.poll_id);
    const want = Object.fromEntries(r.json.options.map((x) => [x.option_id, x.votes]));
    for (const [bucket, size] of [['10s', 10_000], ['1m', 60_000], ['1h', 3_600_000]]) {
      const t = await api(server, 'GET', `/v1/polls/${poll.poll_id}/timeline?bucket=${bucket}`);
      assertStatus(t, 200, `${k.type} timeline ${bucket}`);
      assert.equal(t.json.bucket, bucket);
      const sum = Object.fromEntries(o.map((id) => [id, 0]));
      let prev = -Infinity;
      for (const it of t.json.items) {
        assertIso(it.start, 'bucket start');
        const s = Date.parse(it.start);
        assert.equal(s % size, 0, `${bucket} buckets start on a ${bucket} boundary: ${it.start}`);
        assert.ok(s > prev, 'buckets in time order');
        prev = s;
        for (const [id, n] of Object.entries(it.counts)) {
          assert.ok(id in sum, `timeline counts only this poll's options: ${id}`);
          assert.ok(Number.isInteger(n) && n > 0, `a count is a positive integer: ${n}`);
          sum[id] += n;
        }
      }
      assert.deepEqual(sum, want, `${k.type}: ${bucket} timeline sums equal the results: ${t.text} vs ${r.text}`);
    }
  }
});

test('timeline: from/to select windows; bad parameters → 400 naming them', async () => {
  const poll = await createPoll(server, ownerTok);
  assertStatus(await castVote(server, server.mint(realId()), poll.poll_id, { option_id: poll.options[0].option_id }),
    200);
  const path = `/v1/polls/${poll.poll_id}/timeline`;
  const all = await api(server, 'GET', `${path}?bucket=10s`);
  assertStatus(all, 200);
  assert.equal(all.json.items.length, 1);
  const start = all.json.items[0].start;
  const future = new Date(Date.now() + 3_600_000).toISOString();
  const past = new Date(Date.now() - 3_600_000).toISOString();
  assert.deepEqual((await api(server, 'GET', `${path}?bucket=10s&from=${future}`)).json.items, [], 'from later');
  assert.deepEqual((await api(server, 'GET', `${path}?bucket=10s&to=${past}`)).json.items, [], 'to earlier');
  assert.deepEqual((await api(server, 'GET', `${path}?bucket=10s&from=${past}&to=${future}`)).json.items,
    all.json.items, 'a window around it');
  assert.deepEqual((await api(server, 'GET', `${path}?bucket=10s&from=${start}`)).json.items, all.json.items,
    'from is inclusive');
  assert.deepEqual((await api(server, 'GET', `${path}?bucket=10s&to=${start}`)).json.items, [], 'to is exclusive');
  const def = await api(server, 'GET', path);
  assertStatus(def, 200, 'default bucket');
  assert.ok(['10s', '1m', '1h'].includes(def.json.bucket));
  assertError(await api(server, 'GET', `${path}?bucket=5m`), 400, 'VALIDATION_ERROR', { field: 'bucket' });
  assertError(await api(server, 'GET', `${path}?bucket=10s&from=yesterday`), 400, 'VALIDATION_ERROR',
    { field: 'from' });
  assertError(await api(server, 'GET', `${path}?bucket=10s&to=2026-13-45`), 400, 'VALIDATION_ERROR', { field: 'to' });
  assertError(await api(server, 'GET', '/v1/polls/noSuchPoll12345/timeline'), 404, 'POLL_NOT_FOUND');
});
