// The ballot form of each poll type (single, multiple, approval: choices; ranked: an
// order by drag and drop or buttons; score: a score per option), shared by the poll page
// (poll.js) and the embed (embed.js). No page of its own, so importing it starts nothing.
import { h, newId, announce } from './dom.js';
import { t } from './i18n.js';

const minMax = (poll) => {
  const n = poll.options.length;
  const s = poll.settings || {};
  if (poll.type === 'single') return [1, 1];
  return [s.min_choices || 1, Math.min(s.max_choices || n, n)];
};

function choiceHint(poll) {
  const [mn, mx] = minMax(poll);
  switch (poll.type) {
    case 'single': return t('ballot.hint.single');
    case 'multiple':
    case 'approval': {
      const k = poll.type;
      if (mn === mx) return t(`ballot.hint.${k}_exactly`, { n: mn });
      if (mn === 1 && mx >= poll.options.length) return t(`ballot.hint.${k}_any`);
      return t(`ballot.hint.${k}_range`, { min: mn, max: mx });
    }
    case 'ranked':
      return mx < poll.options.length ? t('ballot.hint.ranked_top', { n: mx }) : t('ballot.hint.ranked');
    case 'score': {
      const ms = poll.settings?.max_score || 5;
      return t('ballot.hint.score', { max: ms }) + (mx < poll.options.length ? ` ${t('ballot.hint.score_at_most', { n: mx })}` : '');
    }
    default: return '';
  }
}

/**
 * The ballot form for the poll's type. Returns {el, ballot() → body | throws Error(msg), focus()}.
 * `initial` is a ballot to start from (changing a vote).
 */
export function ballotForm(poll, initial) {
  const name = newId('ballot');
  const [mn, mx] = minMax(poll);
  const err = h('p', { class: 'field-error', id: `${name}-err`, hidden: true, role: 'alert' });
  const hintId = `${name}-hint`;
  const legend = h('legend', { text: t('ballot.legend') });
  const hint = h('p', { class: 'hint', id: hintId, text: choiceHint(poll) });
  const fs = h('fieldset', { class: ['ballot', `ballot-${poll.type}`], 'aria-describedby': `${hintId} ${err.id}` }, legend, hint);
  const setErr = (msg) => { err.textContent = msg || ''; err.hidden = !msg; fs.toggleAttribute('aria-invalid', !!msg); };
  let ballot;
  let focus;

  if (poll.type === 'single' || poll.type === 'multiple' || poll.type === 'approval') {
    const single = poll.type === 'single';
    const chosen = new Set(initial?.option_ids || (initial?.option_id ? [initial.option_id] : []));
    const list = h('div', { class: 'choices' }, poll.options.map((o) => {
      const id = `${name}-${o.option_id}`;
      return h('div', { class: 'choice big' },
        h('input', { type: single ? 'radio' : 'checkbox', name, id, value: o.option_id, checked: chosen.has(o.option_id) }),
        h('label', { for: id, text: o.text }));
    }));
    fs.append(list);
    list.addEventListener('change', () => setErr(null));
    ballot = () => {
      const ids = [...list.querySelectorAll('input:checked')].map((i) => i.value);
      if (single) {
        if (ids.length !== 1) throw new Error(t('ballot.err.choose_one'));
        return { option_id: ids[0] };
      }
      if (ids.length < mn) throw new Error(t('ballot.err.at_least', { n: mn }));
      if (ids.length > mx) throw new Error(t('ballot.err.at_most', { n: mx }));
      return { option_ids: ids };
    };
    focus = () => (list.querySelector('input:checked') || list.querySelector('input')).focus();
  } else if (poll.type === 'ranked') {
    const byId = new Map(poll.options.map((o) => [o.option_id, o]));
    let order = poll.options.map((o) => o.option_id);
    if (initial?.ranking?.length) {
      const first = initial.ranking.filter((id) => byId.has(id));
      order = [...first, ...order.filter((id) => !first.includes(id))];
    }
    const list = h('ol', { class: 'rank-list' });
    const liFor = new Map();
    for (const id of order) {
      const o = byId.get(id);
      const pos = h('span', { class: 'rank-pos', 'aria-hidden': 'true' });
      const up = h('button', { type: 'button', class: 'icon secondary up', text: '↑', title: t('common.move_up'), 'aria-label': t('common.move_x_up', { x: o.text }) });
      const down = h('button', { type: 'button', class: 'icon secondary down', text: '↓', title: t('common.move_down'), 'aria-label': t('common.move_x_down', { x: o.text }) });
      const li = h('li', { class: 'rank-item', draggable: 'true', 'data-option-id': id },
        h('span', { class: 'grip', 'aria-hidden': 'true', text: '⠿' }), pos,
        h('span', { class: 'rank-label', text: o.text }), h('span', { class: 'rank-buttons' }, up, down));
      up.addEventListener('click', () => moveBy(li, -1, 'up'));
      down.addEventListener('click', () => moveBy(li, 1, 'down'));
      liFor.set(id, li);
      list.append(li);
    }
    const cutoff = mx < poll.options.length ? mx : null;
    function refresh() {
      [...list.children].forEach((li, i) => {
        li.querySelector('.rank-pos').textContent = `${i + 1}.`;
        li.querySelector('.up').disabled = i === 0;
        li.querySelector('.down').disabled = i === list.children.length - 1;
        li.classList.toggle('beyond', cutoff !== null && i >= cutoff);
      });
    }
    function moveBy(li, dir, cls) {
      const items = [...list.children];
      const i = items.indexOf(li);
      const j = i + dir;
      if (j < 0 || j >= items.length) return;
      if (dir < 0) list.insertBefore(li, items[j]); else list.insertBefore(items[j], li);
      refresh();
      const btn = li.querySelector(`.${cls}`);
      (btn.disabled ? li.querySelector(dir < 0 ? '.down' : '.up') : btn).focus();
      announce(t('ballot.position', { x: li.querySelector('.rank-label').textContent, i: j + 1, n: items.length }));
    }
    // drag and drop (mouse); the buttons do the same from the keyboard or on touch screens
    let dragging = null;
    list.addEventListener('dragstart', (e) => {
      dragging = e.target.closest('.rank-item');
      if (!dragging) return;
      dragging.classList.add('dragging');
      e.dataTransfer.effectAllowed = 'move';
      e.dataTransfer.setData('text/plain', dragging.dataset.optionId);
    });
    list.addEventListener('dragover', (e) => {
      if (!dragging) return;
      e.preventDefault();
      const over = e.target.closest('.rank-item');
      if (!over || over === dragging) return;
      const box = over.getBoundingClientRect();
      const after = e.clientY > box.top + box.height / 2;
      list.insertBefore(dragging, after ? over.nextSibling : over);
      refresh();
    });
    list.addEventListener('drop', (e) => { e.preventDefault(); });
    list.addEventListener('dragend', () => {
      if (!dragging) return;
      dragging.classList.remove('dragging');
      const items = [...list.children];
      announce(t('ballot.position', { x: dragging.querySelector('.rank-label').textContent, i: items.indexOf(dragging) + 1, n: items.length }));
      dragging = null;
    });
    fs.append(list);
    refresh();
    ballot = () => {
      const ids = [...list.children].map((li) => li.dataset.optionId);
      return { ranking: ids.slice(0, mx) };
    };
    focus = () => list.querySelector('button:not([disabled])').focus();
  } else if (poll.type === 'score') {
    const ms = poll.settings?.max_score || 5;
    const optional = mx < poll.options.length; // some options must stay unscored
    const init = initial?.scores || {};
    const rows = poll.options.map((o) => {
      const group = `${name}-${o.option_id}`;
      let control;
      if (ms <= 10) {
        const values = [...(optional ? [''] : []), ...Array.from({ length: ms + 1 }, (_, i) => String(i))];
        const start = o.option_id in init ? String(init[o.option_id]) : (optional ? '' : '0');
        control = h('div', { class: 'score-radios' }, values.map((v) => {
          const id = `${group}-${v || 'none'}`;
          return h('span', { class: 'score-pill' },
            h('input', { type: 'radio', name: group, id, value: v, checked: v === start }),
            h('label', { for: id, text: v === '' ? '–' : v, 'aria-label': v === '' ? t('ballot.no_score') : undefined }));
        }));
        control.value = () => control.querySelector('input:checked')?.value ?? '';
        return h('fieldset', { class: 'score-row', 'data-option-id': o.option_id },
          h('legend', { text: o.text }), control);
      }
      const id = `${group}-range`;
      const out = h('output', { for: id });
      const input = h('input', { type: 'range', id, min: '0', max: String(ms), step: '1', value: String(init[o.option_id] ?? 0) });
      const sync = () => { out.textContent = input.value; input.setAttribute('aria-valuetext', t('ballot.x_of_y', { x: input.value, y: ms })); };
      input.addEventListener('input', sync);
      sync();
      control = h('div', { class: 'score-slider' }, input, out);
      control.value = () => input.value;
      return h('div', { class: 'score-row', 'data-option-id': o.option_id },
        h('label', { for: id, text: o.text }), control);
    });
    const wrap = h('div', { class: 'score-list' }, rows);
    wrap.addEventListener('change', () => setErr(null));
    fs.append(wrap);
    ballot = () => {
      const scores = {};
      rows.forEach((r, i) => {
        const v = r.querySelector('.score-radios, .score-slider').value();
        if (v !== '') scores[poll.options[i].option_id] = Number(v);
      });
      const k = Object.keys(scores).length;
      if (k < mn) throw new Error(t('ballot.err.score_at_least', { n: mn }));
      if (k > mx) throw new Error(t('ballot.err.score_at_most', { n: mx }));
      return { scores };
    };
    focus = () => (wrap.querySelector('input:checked') || wrap.querySelector('input')).focus();
  }
  fs.append(err);
  return { el: fs, ballot, focus, setErr };
}
