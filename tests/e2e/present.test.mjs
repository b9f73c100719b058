// Presenter mode on a projector: a 12-option poll (and a ranked poll's rounds) fits the
// screen at 1280x720 and 1920x1080 with nothing to scroll; every option label, the join
// code (or the short link while the poll has none) and the QR code are inside the
// viewport; labels wrap between words, never inside one; the text is big enough to read.
// Writes the README's presenter screenshots.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createPoll, castVote, assertStatus } from '../api/harness.mjs';
import { launch, shot, painted, assertAccessible } from './helpers.mjs';

let env;
before(async () => { env = await launch({ powDifficulty: 0 }); });
after(async () => { await env?.close(); });

const SIZES = [{ width: 1280, height: 720 }, { width: 1920, height: 1080 }];

// twelve options a speaker might write: short ones, long sentences, and words too long
// for a narrow column
const LABELS = [
  'Yes',
  'No',
  'A four-day week with the same pay and the same hours spread differently',
  'Flexible hours, core time from ten to three',
  'Keep everything as it is today',
  'Remote Fridays for everyone who wants them, office the rest of the week',
  'Supercalifragilisticexpialidocious',
  'Compressed hours in summer only',
  'Ask every team separately and let each decide for itself what fits its work',
  'Job sharing',
  'Longer lunch breaks instead of shorter days',
  'Undecided: I would like to hear more about the options first',
];

async function twelveOptionPoll(type) {
  const owner = env.server.mint(`presenter-${type}`);
  const poll = await createPoll(env.server, owner, {
    title: type === 'ranked'
      ? 'Which working-time model should we try next year? Rank the ones you could live with'
      : 'Which working-time model should we try next year?',
    type,
    options: LABELS.map((text) => ({ text })),
    settings: { allow_anonymous: true },
  });
  const ids = poll.options.map((o) => o.option_id);
  // first preferences spread so that a ranked count needs several rounds
  const firsts = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11];
  for (let v = 0; v < firsts.length; v++) {
    const first = firsts[v];
    const body = type === 'ranked'
      ? { ranking: [ids[first], ...ids.filter((_, i) => i !== first).slice(v % 5, (v % 5) + 4)] }
      : { option_id: ids[first] };
    assertStatus(await castVote(env.server, env.server.mint(`voter-${type}-${v}`), poll.poll_id, body), 200);
  }
  return { poll, total: firsts.length };
}

/** Everything the room must read, measured in the page. */
function measure(page) {
  return page.evaluate(() => {
    const box = (el) => { const r = el.getBoundingClientRect(); return { top: r.top, left: r.left, bottom: r.bottom, right: r.right, width: r.width, height: r.height }; };
    const chart = document.querySelector('.present-chart');
    const labels = [...document.querySelectorAll('.present-chart .bar-label, .present-chart .round-label')]
      .filter((el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden')
      .map((el) => {
        // a word on two lines has client rects on two lines
        const node = el.firstChild;
        const text = node?.textContent || '';
        const split = [];
        const re = /\S+/g;
        let m;
        while ((m = re.exec(text))) {
          const range = document.createRange();
          range.setStart(node, m.index);
          range.setEnd(node, m.index + m[0].length);
          const rects = [...range.getClientRects()].filter((r) => r.width > 0);
          const tops = new Set(rects.map((r) => Math.round(r.top)));
          const wordWidth = rects.reduce((s, r) => s + r.width, 0);
          if (tops.size > 1 && wordWidth <= el.getBoundingClientRect().width + 1) split.push(m[0]);
        }
        return { text, box: box(el), fontSize: parseFloat(getComputedStyle(el).fontSize), split };
      });
    const join = document.querySelector('.present-join .join-code') || document.querySelector('.present-join .join-link');
    const qr = document.querySelector('.present-join img.qr');
    return {
      vw: innerWidth, vh: innerHeight,
      scrollW: document.documentElement.scrollWidth, scrollH: document.documentElement.scrollHeight,
      chart: box(chart), labels,
      join: join && { cls: join.className, text: (join.querySelector('[aria-hidden="true"]') || join).textContent, box: box(join), scrollW: join.scrollWidth, clientW: join.clientWidth },
      qr: qr && { box: box(qr), loaded: qr.complete && qr.naturalWidth > 0 },
      title: box(document.querySelector('.present-title')),
    };
  });
}

const inside = (b, o, what) => {
  assert.ok(b.top >= o.top - 1 && b.left >= o.left - 1 && b.bottom <= o.bottom + 1 && b.right <= o.right + 1,
    `${what} at ${JSON.stringify(b)} is not inside ${JSON.stringify(o)}`);
};

for (const type of ['single', 'ranked']) {
  test(`presenter mode, ${type}, 12 options: everything on screen at 1280x720 and 1920x1080`, async () => {
    const { poll, total } = await twelveOptionPoll(type);
    for (const size of SIZES) {
      const page = await env.open(size);
      await page.goto(env.url(`/p/${poll.poll_id}/present`));
      await page.locator(`.results-present[data-total="${total}"]`).waitFor();
      if (type === 'ranked') await page.locator('.results-present .rounds-table').waitFor();
      await page.waitForFunction(() => { const i = document.querySelector('.present-join img.qr'); return i && i.complete && i.naturalWidth > 0; });
      await painted(page);
      const m = await measure(page);
      const view = { top: 0, left: 0, bottom: m.vh, right: m.vw };
      const where = `${type} at ${size.width}x${size.height}`;
      // nothing to scroll
      assert.ok(m.scrollH <= m.vh, `${where}: the page is ${m.scrollH}px tall in a ${m.vh}px viewport`);
      assert.ok(m.scrollW <= m.vw, `${where}: the page is ${m.scrollW}px wide in a ${m.vw}px viewport`);
      // every option, once, inside the chart's box (which clips) and the viewport
      assert.deepEqual(m.labels.map((l) => l.text).sort(), [...LABELS].sort(), `${where}: the option labels shown`);
      for (const l of m.labels) {
        inside(l.box, view, `${where}: "${l.text}"`);
        inside(l.box, m.chart, `${where}: "${l.text}" (in the chart)`);
        assert.deepEqual(l.split, [], `${where}: "${l.text}" breaks inside a word`);
        // readable from the back of a room: at least 1/45 of the screen height
        assert.ok(l.fontSize >= m.vh / 45, `${where}: "${l.text}" is ${l.fontSize}px high`);
      }
      inside(m.title, view, `${where}: the question`);
      // how to join: the code when the poll has one, else the short link, and the QR code
      assert.ok(m.qr?.loaded, `${where}: the QR code`);
      inside(m.qr.box, view, `${where}: the QR code`);
      assert.ok(m.qr.box.width >= m.vh / 4, `${where}: the QR code is ${m.qr.box.width}px wide`);
      if (poll.join_code) {
        assert.match(m.join.cls, /join-code/);
        assert.equal(m.join.text, poll.join_code.toUpperCase());
      } else {
        assert.match(m.join.cls, /join-link/);
        assert.equal(m.join.text, `${new URL(env.server.url).host}/p/${poll.poll_id}`);
      }
      inside(m.join.box, view, `${where}: ${m.join.text}`);
      assert.ok(m.join.scrollW <= m.join.clientW + 1, `${where}: ${m.join.text} is cut (${m.join.scrollW} > ${m.join.clientW})`);
      if (type === 'single' || size.width === 1280) await shot(page, `presenter-12-${type}-${size.width}x${size.height}`, { fullPage: false });
      await assertAccessible(page, `presenter, ${where}`);
      env.assertClean(page);
    }
  });
}

test('presenter mode follows the votes: a new round appears and still fits', async () => {
  const owner = env.server.mint('presenter-live');
  const poll = await createPoll(env.server, owner, { type: 'ranked', title: 'Live rounds', options: LABELS.map((text) => ({ text })) });
  const ids = poll.options.map((o) => o.option_id);
  const page = await env.open(SIZES[0]);
  await page.goto(env.url(`/p/${poll.poll_id}/present`));
  await page.locator('.results-present[data-total="0"]').waitFor();
  // with no ballot the bars show every option
  await painted(page);
  assert.equal((await measure(page)).labels.length, 12);
  for (let v = 0; v < 12; v++) {
    assertStatus(await castVote(env.server, env.server.mint(`live-${v}`), poll.poll_id, { ranking: [ids[v % 6], ids[(v + 1) % 12]] }), 200);
  }
  await page.locator('.results-present[data-total="12"] .rounds-table').waitFor({ timeout: 5000 });
  await painted(page);
  const m = await measure(page);
  assert.equal(m.labels.length, 12);
  for (const l of m.labels) inside(l.box, m.chart, `"${l.text}" after the votes`);
  assert.ok(m.scrollH <= m.vh);
  env.assertClean(page);
});
