// The live results view: one bar per option (widths animate through a CSS transition),
// the total, votes in the last minute, and for ranked polls the instant-runoff rounds.
import { h } from './dom.js';
import { subscribeLive } from './api.js';

const VIS_TEXT = {
  after_vote: 'The results appear once you have voted.',
  after_close: 'The results appear when the poll closes.',
  owner_only: 'Only the poll’s owner can see the results.',
  always: 'The results appear when the poll closes.',
};

/**
 * createResults(poll, {present}) → {el, update(results), hidden(info), setState(s)}
 */
export function createResults(poll, opts = {}) {
  const labels = new Map(poll.options.map((o) => [o.option_id, o.text]));
  const isScore = poll.type === 'score';
  const maxScore = poll.settings?.max_score || 5;
  const total = h('span', { class: 'total-num', text: '0' });
  const totalWord = h('span', { text: ' votes' });
  const recent = h('span', { class: 'recent' });
  const state = h('span', { class: 'live-state', text: 'connecting…' });
  const summary = h('p', { class: 'totals' }, h('span', { class: 'total' }, total, totalWord), recent, h('span', { class: 'sep', 'aria-hidden': 'true', text: '·' }), state);
  const list = h('ul', { class: 'bars', 'aria-label': 'Results by option' });
  const note = h('p', { class: 'results-note', hidden: true });
  const winner = h('p', { class: 'winner', hidden: true });
  const rounds = h('div', { class: 'rounds', hidden: true });
  const el = h('section', { class: ['results', opts.present && 'results-present'], 'aria-label': 'Live results', 'data-state': 'connecting' },
    summary, note, list, winner, rounds);
  const rows = new Map();
  const seenTotals = []; // [time, total] for a client-side "last minute" when the server gives none

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

  function update(res) {
    el.dataset.state = 'live';
    note.hidden = true;
    list.hidden = false;
    const n = res.total_votes ?? 0;
    total.textContent = String(n);
    totalWord.textContent = n === 1 ? ' vote' : ' votes';
    el.dataset.total = String(n);
    // votes in the last minute: from the server when it says, else from what we saw
    const now = Date.now();
    seenTotals.push([now, n]);
    while (seenTotals.length > 1 && seenTotals[0][0] < now - 60_000) seenTotals.shift();
    const lastMin = typeof res.votes_last_minute === 'number' ? res.votes_last_minute
      : Math.max(0, n - (seenTotals.length > 1 ? seenTotals[0][1] : n));
    recent.textContent = ` · ${lastMin} in the last minute`;
    const opts = res.options || [];
    let best = -1;
    for (const o of opts) best = Math.max(best, isScore ? (o.score_mean ?? 0) : (o.votes ?? 0));
    const ordered = opts.map((o) => row(o).li);
    list.replaceChildren(...ordered); // keeps the same nodes, so widths animate
    for (const o of opts) {
      const r = row(o);
      let pct;
      if (isScore) {
        const mean = o.score_mean ?? 0;
        pct = maxScore ? (100 * mean) / maxScore : 0;
        r.nums.textContent = `${mean.toFixed(2)} / ${maxScore} avg · ${o.votes} ${o.votes === 1 ? 'vote' : 'votes'}`;
      } else {
        pct = o.percentage ?? 0;
        r.nums.textContent = `${o.votes} · ${pct.toFixed(1)}%`;
      }
      r.fill.style.width = `${Math.max(0, Math.min(100, pct))}%`; // CSSOM: allowed by the CSP
      r.li.classList.toggle('leading', n > 0 && (isScore ? (o.score_mean ?? 0) : o.votes) === best);
      r.li.dataset.votes = String(o.votes ?? 0);
    }
    if (poll.type === 'ranked') renderRounds(res);
    if (res.status === 'closed') setState('closed');
  }

  function renderRounds(res) {
    const rs = res.rounds || [];
    winner.hidden = !res.winner && !res.condorcet_winner;
    winner.replaceChildren();
    if (res.winner) winner.append(h('strong', { text: 'Instant-runoff winner: ' }), labels.get(res.winner) || res.winner);
    if (res.condorcet_winner) {
      if (res.winner) winner.append(h('br'));
      winner.append(h('strong', { text: 'Condorcet winner: ' }), labels.get(res.condorcet_winner) || res.condorcet_winner);
    }
    rounds.hidden = rs.length === 0;
    if (!rs.length) { rounds.replaceChildren(); return; }
    const items = rs.map((round, i) => {
      const counts = Object.entries(round.counts || {}).sort((a, b) => b[1] - a[1]);
      const sum = counts.reduce((s, [, c]) => s + c, 0) || 1;
      const elim = new Set(round.eliminated || []);
      return h('li', { class: 'round' },
        h('h4', { text: `Round ${i + 1}` }),
        h('ul', { class: 'round-counts' }, counts.map(([id, c]) => {
          const fill = h('span', { class: 'bar-fill' });
          fill.style.width = `${(100 * c) / sum}%`;
          return h('li', { class: ['round-row', elim.has(id) && 'eliminated'] },
            h('span', { class: 'bar-head' }, h('span', { class: 'bar-label', text: labels.get(id) || id }),
              h('span', { class: 'bar-nums', text: `${c}${elim.has(id) ? ' · eliminated' : ''}` })),
            h('span', { class: 'bar-track', 'aria-hidden': 'true' }, fill));
        })));
    });
    rounds.replaceChildren(h('h3', { text: 'Instant-runoff rounds' }), h('ol', { class: 'round-list' }, items));
  }

  function hidden(info) {
    el.dataset.state = 'hidden';
    list.hidden = true;
    winner.hidden = true;
    rounds.hidden = true;
    total.textContent = '–';
    recent.textContent = '';
    const v = info?.results_visibility || poll.settings?.results_visibility;
    note.textContent = poll.settings?.show_results_during_voting === false && v !== 'owner_only'
      ? 'The results appear when the poll closes.'
      : (VIS_TEXT[v] || 'The results are hidden for now.');
    note.hidden = false;
  }

  function setState(s) {
    const text = { live: 'live', reconnecting: 'reconnecting…', closed: 'final results', deleted: 'this poll was deleted' }[s] || s;
    state.textContent = text;
    state.dataset.state = s;
    if (s === 'closed') el.dataset.closed = 'true';
  }

  return { el, update, hidden, setState };
}

/** Connects a results view to the poll's live stream. Returns the subscription. */
export function connectResults(poll, view, { onClosed } = {}) {
  return subscribeLive(poll.poll_id, {
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
