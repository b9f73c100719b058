// The results view: one bar per option (widths animate through a CSS transition), the
// total, votes in the last minute while the poll is open, and for ranked polls the
// instant-runoff rounds as a table (an option a row, a round a column). A closed poll's
// results are the final ones: the heading says so and the last-minute count goes.
import { h } from './dom.js';
import { subscribeLive } from './api.js';
import { t, fmtNum, fmtPct, fmtDecimal } from './i18n.js';

/**
 * createResults(poll, {present, heading}) → {el, update(results), hidden(info), setState(s), isFinal()}
 * present: the projector layout (ranked rounds instead of bars once there are rounds).
 * heading: 'h2' (or 'h3') to give the view its own "Live results" / "Final results" heading.
 */
export function createResults(poll, opts = {}) {
  const labels = new Map(poll.options.map((o) => [o.option_id, o.text]));
  const isScore = poll.type === 'score';
  const isRanked = poll.type === 'ranked';
  const maxScore = poll.settings?.max_score || 5;
  const title = opts.heading ? h(opts.heading, { class: 'results-heading', id: `results-h-${poll.poll_id}` }) : null;
  const total = h('span', { class: 'total', text: t('results.votes', { n: 0 }) });
  const recent = h('span', { class: 'recent' });
  const state = h('span', { class: 'live-state', text: t('results.connecting') });
  const summary = h('p', { class: 'totals' }, total, recent, h('span', { class: 'sep', 'aria-hidden': 'true', text: '·' }), state);
  const list = h('ul', { class: 'bars', 'aria-label': t('results.by_option') });
  const note = h('p', { class: 'results-note', hidden: true });
  const winner = h('p', { class: 'winner', hidden: true });
  const rounds = h('div', { class: 'rounds', hidden: true });
  const el = h('section', {
    class: ['results', opts.present && 'results-present', `results-${poll.type}`],
    'aria-labelledby': title ? title.id : undefined,
    'aria-label': title ? undefined : t('results.live'),
    'data-state': 'connecting',
  }, title, summary, note, list, winner, rounds);
  const rows = new Map();
  let lastMinute = 0;
  let final = poll.status === 'closed';

  function row(o) {
    let r = rows.get(o.option_id);
    if (!r) {
      const label = h('span', { class: 'bar-label', text: o.label ?? labels.get(o.option_id) ?? o.option_id });
      const nums = h('span', { class: 'bar-nums' });
      const fill = h('span', { class: 'bar-fill' });
      const track = h('span', { class: 'bar-track', 'aria-hidden': 'true' }, fill);
      const li = h('li', { class: 'bar-row', 'data-option-id': o.option_id }, h('span', { class: 'bar-head' }, label, nums), track);
      r = { li, label, nums, fill };
      rows.set(o.option_id, r);
    }
    return r;
  }

  /** Open: "Live results · 3 in the last minute"; closed: "Final results" and no rate. */
  function showPhase() {
    if (title) title.textContent = final ? t('results.final') : t('results.live');
    if (!title) el.setAttribute('aria-label', final ? t('results.final') : t('results.live'));
    const quiet = final || el.dataset.state === 'hidden'; // no rate for final or hidden counts
    recent.textContent = quiet ? '' : ` · ${t('results.last_minute', { n: lastMinute })}`;
    recent.hidden = quiet;
    el.dataset.final = String(final);
  }

  function update(res) {
    el.dataset.state = final ? 'closed' : 'live';
    note.hidden = true;
    const n = res.total_votes ?? 0;
    total.textContent = t('results.votes', { n });
    el.dataset.total = String(n);
    if (res.final === true || res.status === 'closed') final = true;
    lastMinute = typeof res.votes_last_minute === 'number' ? res.votes_last_minute : 0;
    const opts2 = res.options || [];
    let best = -1;
    for (const o of opts2) best = Math.max(best, isScore ? (o.score_mean ?? 0) : (o.votes ?? 0));
    list.replaceChildren(...opts2.map((o) => row(o).li)); // the same nodes, so widths animate
    for (const o of opts2) {
      const r = row(o);
      const votes = o.votes ?? 0;
      let pct;
      if (isScore) {
        const mean = o.score_mean ?? 0;
        pct = maxScore ? (100 * mean) / maxScore : 0;
        r.nums.textContent = t('results.score_nums', { mean: fmtDecimal(mean, 2), max: fmtNum(maxScore), votes: t('results.votes', { n: votes }) });
      } else {
        pct = o.percentage ?? 0;
        r.nums.textContent = `${fmtNum(votes)} · ${fmtPct(pct)}`;
      }
      r.fill.style.width = `${Math.max(0, Math.min(100, pct))}%`; // CSSOM: allowed by the CSP
      r.li.classList.toggle('leading', n > 0 && (isScore ? (o.score_mean ?? 0) : votes) === best);
      r.li.dataset.votes = String(votes);
    }
    let showRounds = false;
    if (isRanked) showRounds = renderRounds(res);
    // on a projector a ranked poll's rounds replace the first-preference bars (round 1 is them)
    list.hidden = !!opts.present && showRounds;
    showPhase();
    if (final) setState('closed');
  }

  /** The rounds as a table; returns whether there are any. */
  function renderRounds(res) {
    const rs = res.rounds || [];
    winner.hidden = !res.winner && !res.condorcet_winner;
    winner.replaceChildren();
    if (res.winner) winner.append(h('strong', { text: t('results.irv_winner') }), ' ', labels.get(res.winner) || res.winner);
    if (res.condorcet_winner) {
      if (res.winner) winner.append(h('br'));
      winner.append(h('strong', { text: t('results.condorcet_winner') }), ' ', labels.get(res.condorcet_winner) || res.condorcet_winner);
    }
    rounds.hidden = rs.length === 0;
    if (!rs.length) { rounds.replaceChildren(); return false; }
    rounds.replaceChildren(roundsTable(poll, rs, res.winner, labels, !!opts.present));
    return true;
  }

  function hidden(info) {
    el.dataset.state = 'hidden';
    list.hidden = true;
    winner.hidden = true;
    rounds.hidden = true;
    total.textContent = t('results.votes_hidden');
    recent.textContent = '';
    const v = info?.results_visibility || poll.settings?.results_visibility;
    note.textContent = poll.settings?.show_results_during_voting === false && v !== 'owner_only'
      ? t('results.hidden.after_close')
      : t(`results.hidden.${v}`, null, t('results.hidden.other'));
    note.hidden = false;
    showPhase();
  }

  function setState(s) {
    if (s === 'closed') final = true;
    if (final && s !== 'deleted') s = 'closed'; // a closed poll's stream reopening is still final
    state.textContent = t(`results.state.${s}`, null, s);
    state.dataset.state = s;
    if (s === 'closed') { el.dataset.closed = 'true'; showPhase(); }
  }

  showPhase();
  return { el, update, hidden, setState, isFinal: () => final };
}

/**
 * The instant-runoff rounds: a row per option (the winner first, then by how long each
 * lasted), a column per round; the round an option is eliminated in says so, later
 * rounds are empty for it.
 */
function roundsTable(poll, rs, winnerId, labels, present) {
  const outIn = new Map(); // option id → index of the round it was eliminated in
  rs.forEach((r, i) => { for (const id of r.eliminated || []) if (!outIn.has(id)) outIn.set(id, i); });
  const last = (id) => {
    for (let i = rs.length - 1; i >= 0; i--) if (rs[i].counts && id in rs[i].counts) return [i, rs[i].counts[id]];
    return [-1, 0];
  };
  const ids = poll.options.map((o) => o.option_id);
  ids.sort((a, b) => {
    if (a === winnerId) return -1;
    if (b === winnerId) return 1;
    const [ra, ca] = last(a);
    const [rb, cb] = last(b);
    const oa = outIn.has(a) ? outIn.get(a) : rs.length;
    const ob = outIn.has(b) ? outIn.get(b) : rs.length;
    return ob - oa || rb - ra || cb - ca;
  });
  const many = rs.length > 4;
  const head = h('tr', {}, h('th', { scope: 'col', class: 'round-opt', text: t('results.option') }),
    rs.map((_, i) => h('th', { scope: 'col', class: 'round-n' },
      h('span', { class: many ? 'sr-only' : 'round-word', text: t('results.round_word') }), fmtNum(i + 1))));
  const body = ids.map((id) => {
    const cells = rs.map((r, i) => {
      const counted = r.counts && id in r.counts;
      if (outIn.has(id) && i > outIn.get(id)) return h('td', { class: 'round-gone' }, h('span', { 'aria-hidden': 'true', text: '–' }), h('span', { class: 'sr-only', text: t('results.out') }));
      if (!counted) return h('td', { class: 'round-gone' }, h('span', { 'aria-hidden': 'true', text: '–' }), h('span', { class: 'sr-only', text: t('results.out') }));
      const c = r.counts[id];
      const out = outIn.get(id) === i;
      return h('td', { class: ['round-count', out && 'round-out'] }, fmtNum(c),
        out ? h('span', { class: 'out-mark' }, h('span', { 'aria-hidden': 'true', text: ' ✕' }), h('span', { class: 'sr-only', text: ` ${t('results.eliminated')}` })) : null);
    });
    return h('tr', { class: [id === winnerId && 'round-winner', outIn.has(id) && 'round-eliminated'], 'data-option-id': id },
      h('th', { scope: 'row', class: 'round-label', text: labels.get(id) || id }), cells);
  });
  const table = h('table', { class: ['rounds-table', many && 'many'] },
    h('caption', { text: t('results.rounds_caption') }), h('thead', {}, head), h('tbody', {}, body));
  if (present) return table;
  // on a narrow screen a long table scrolls on its own, not the page
  return h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': t('results.rounds_caption') }, table);
}

/** Connects a results view to the poll's live stream. Returns the subscription. */
export function connectResults(poll, view, { onClosed, token } = {}) {
  return subscribeLive(poll.poll_id, {
    token,
    onResults(data) {
      if (data.results_hidden) view.hidden(data);
      else view.update(data);
      if (data.status === 'closed') view.setState('closed');
    },
    onClosed() { view.setState('closed'); onClosed?.(); },
    onDeleted() { view.setState('deleted'); },
    onState(s) { view.setState(s); },
  });
}
