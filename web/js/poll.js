// /p/<id>: the vote page (one form per poll type), "you voted" with the receipt (and a
// link to check it), change and retract where the poll allows it, the results below (live
// while open, final once closed), and for the poll's owner: edit, close, delete.
import { h, append, newId, statusLine, busyStatus, fmtTime, announce, typeName, confirmThen } from './dom.js';
import { request, call, pollPath, getUser, ensureDevice, getReceipt, setReceipt, ownerToken, identityToken, joinUrl } from './api.js';
import { createResults, connectResults } from './results.js';
import { authPanel } from './auth.js';
import { t, errorText } from './i18n.js';
import { navigate, flash } from './app.js';

export function pollError(main, e) {
  document.title = t('poll.not_found_title');
  const notFound = e.status === 404;
  main.append(h('h1', { text: notFound ? t('poll.not_found') : t('poll.load_failed') }),
    h('p', { class: 'alert is-error', role: 'alert', text: notFound ? t('poll.not_found_text') : errorText(e) }),
    h('p', {}, h('a', { href: '/', 'data-link': '', text: t('app.create_link') })));
}

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

function ballotSummary(poll, mine) {
  const labels = new Map(poll.options.map((o) => [o.option_id, o.text]));
  const b = mine.ballot || {};
  if (poll.type === 'ranked') {
    const ids = b.ranking || mine.option_ids || [];
    return h('ol', { class: 'summary' }, ids.map((id) => h('li', { text: labels.get(id) || id })));
  }
  if (poll.type === 'score' && b.scores) {
    return h('ul', { class: 'summary' }, poll.options.filter((o) => o.option_id in b.scores)
      .map((o) => h('li', {}, `${o.text}: `, h('strong', { text: String(b.scores[o.option_id]) }))));
  }
  const ids = mine.option_ids || (b.option_id ? [b.option_id] : b.option_ids || []);
  return h('ul', { class: 'summary' }, ids.map((id) => h('li', { text: labels.get(id) || id })));
}


export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = t('poll.doc_title', { title: poll.title });
  const ownerTok = ownerToken(poll);
  // the voter: the account when signed in, else this browser's device (polls allowing it)
  const voterToken = () => getUser()?.token || (poll.settings?.allow_anonymous ? identityToken() : null);

  const meta = h('p', { class: 'meta' });
  const header = h('header', { class: 'poll-head' },
    h('h1', { class: 'poll-title', text: poll.title }),
    poll.description ? h('p', { class: 'poll-desc', text: poll.description }) : null,
    meta);
  const area = h('div', { class: 'vote-area' });
  const view = createResults(poll, { heading: 'h2' });
  const resultsBox = h('div', { class: 'results-box' }, view.el);
  const links = h('p', { class: 'actions poll-links' },
    h('a', { class: 'button secondary', href: `/p/${id}/share`, 'data-link': '', text: t('poll.share') }),
    h('a', { class: 'button secondary', href: `/p/${id}/results`, 'data-link': '', text: t('poll.results_page') }),
    ownerTok ? h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: t('poll.presenter') }) : null);
  const manage = ownerTok ? h('section', { class: 'owner-panel', 'aria-labelledby': 'manage-h' }) : null;
  append(main, [header, area, resultsBox, links, manage]);
  const sub = connectResults(poll, view, {
    token: () => ownerToken(poll) || voterToken() || undefined,
    onClosed: () => { if (poll.status !== 'closed') { poll.status = 'closed'; setMeta(); renderManage(); refresh(); } },
  });

  function setMeta() {
    const parts = [typeName(poll.type)];
    if (poll.status === 'closed') parts.push(t('poll.meta.closed'));
    else if (poll.status === 'draft') parts.push(t('poll.meta.draft'));
    else if (poll.end_time) parts.push(t('poll.meta.closes', { when: fmtTime(poll.end_time) }));
    if (poll.settings?.allow_anonymous) parts.push(t('poll.meta.no_account'));
    meta.replaceChildren(parts.join(' · '));
    if (poll.join_code && poll.status === 'active') {
      meta.append(' · ', t('poll.meta.join_code'), ' ', h('a', { href: joinUrl(poll.join_code), class: 'mono', text: poll.join_code.toUpperCase() }));
    }
  }
  setMeta();

  // ---- the owner's controls ----
  const status = statusLine('alert', 'alert'); // the owner's actions' outcome
  status.setAttribute('tabindex', '-1');
  function renderManage() {
    if (!manage) return;
    const box = h('div', { class: 'confirm-box' });
    const actions = h('div', { class: 'actions' });
    const patch = async (body, okMsg) => {
      status.set(null);
      try {
        Object.assign(poll, await request('PATCH', pollPath(id), { token: ownerTok, body }));
        setMeta();
        renderManage();
        status.set(okMsg, 'ok');
        await refresh();
      } catch (e) {
        status.set(errorText(e), 'error');
        status.focus();
      }
    };
    actions.append(h('a', { class: 'button secondary', href: `/p/${id}/edit`, 'data-link': '', text: t('manage.edit') }));
    if (poll.status === 'draft') {
      actions.append(h('button', { type: 'button', class: 'secondary', text: t('manage.publish'), onclick: () => patch({ status: 'active' }, t('manage.published')) }));
    }
    if (poll.status !== 'closed') {
      const close = h('button', { type: 'button', class: 'secondary', text: t('manage.close') });
      confirmThen(close, box, t('manage.close_q'), t('manage.close_yes'), () => patch({ status: 'closed' }, t('manage.closed')));
      actions.append(close);
    } else {
      actions.append(h('a', { class: 'button secondary', href: `/?copy=${encodeURIComponent(id)}`, 'data-link': '', text: t('manage.ask_again') }));
    }
    const del = h('button', { type: 'button', class: 'secondary danger', text: t('manage.delete') });
    confirmThen(del, box, t('manage.delete_q'), t('manage.delete_yes'), async () => {
      status.set(null);
      try {
        await request('DELETE', pollPath(id), { token: ownerTok });
        flash(t('manage.deleted', { title: poll.title }));
        navigate('/mine');
      } catch (e) { status.set(errorText(e), 'error'); status.focus(); }
    });
    actions.append(del);
    manage.replaceChildren();
    append(manage, [h('h2', { id: 'manage-h', text: t('manage.heading') }),
      poll.status === 'closed' ? h('p', { class: 'hint', text: t('manage.no_reopen') }) : null,
      actions, box, status]);
  }
  renderManage();

  async function myVote() {
    const tok = voterToken();
    if (!tok) return null;
    try { return await request('GET', pollPath(id, '/votes/me'), { token: tok }); } catch { return null; }
  }

  async function refresh() {
    const mine = await myVote();
    if (mine?.has_voted) showVoted(mine);
    else showForm(null);
  }

  function openState() {
    if (poll.status === 'closed') return t('poll.closed_msg');
    if (poll.status === 'draft') return t('poll.draft_msg');
    if (poll.start_time && Date.parse(poll.start_time) > Date.now()) return t('poll.opens_msg', { when: fmtTime(poll.start_time) });
    if (poll.end_time && Date.parse(poll.end_time) <= Date.now()) return t('poll.closed_msg');
    return null;
  }

  function showForm(changing) {
    area.replaceChildren();
    const closedMsg = openState();
    if (closedMsg && !changing) {
      area.append(h('p', { class: 'alert', role: 'status', text: closedMsg }));
      return;
    }
    if (!getUser() && !poll.settings?.allow_anonymous) {
      area.append(authPanel(() => refresh(), t('poll.needs_account')));
      return;
    }
    const form = ballotForm(poll, changing?.ballot);
    const status = statusLine('alert', 'alert');
    const preparing = busyStatus();
    const submit = h('button', { type: 'submit', class: 'primary big', text: changing ? t('poll.update_vote') : t('poll.vote') });
    const cancel = changing ? h('button', { type: 'button', class: 'secondary', text: t('common.cancel'), onclick: () => showVoted(changing) }) : null;
    const f = h('form', { class: 'vote-form', novalidate: true, 'aria-label': changing ? t('poll.change_aria') : t('poll.vote') },
      form.el, status, h('div', { class: 'actions' }, submit, cancel), preparing);
    let idemKey = crypto.randomUUID();
    let lastBody = null;
    f.addEventListener('submit', async (e) => {
      e.preventDefault();
      status.set(null);
      form.setErr(null);
      let body;
      try { body = form.ballot(); } catch (err) { form.setErr(err.message); form.focus(); return; }
      const text = JSON.stringify(body);
      if (text !== lastBody) { idemKey = crypto.randomUUID(); lastBody = text; }
      submit.disabled = true;
      try {
        // without an account: a device token, which costs a proof of work the first time
        const tok = getUser()?.token || (await ensureDevice({
          onWork: () => { preparing.busy(t('poll.preparing')); f.setAttribute('aria-busy', 'true'); },
        })).token;
        preparing.busy(null);
        f.removeAttribute('aria-busy');
        if (changing) {
          await request('PUT', pollPath(id, '/votes/me'), { token: tok, body });
        } else {
          const r = await request('POST', pollPath(id, '/votes'), { token: tok, body, headers: { 'Idempotency-Key': idemKey } });
          setReceipt(id, { receipt: r.receipt, vote_id: r.vote_id, recorded_at: r.recorded_at });
        }
        sub.reopen(); // the stream now knows who we are (results shown after voting)
        announce(changing ? t('poll.changed') : t('poll.recorded'));
        await refresh();
        area.querySelector('h2')?.focus();
      } catch (err) {
        if (err.code === 'ALREADY_VOTED') { await refresh(); return; }
        if ((err.status === 405 || err.status === 404) && changing && err.code !== 'POLL_NOT_FOUND') {
          status.set(t('poll.change_unsupported'), 'error');
        } else if (err.status === 400 && err.field) {
          form.setErr(errorText(err));
          form.focus();
        } else if (err.code === 'FORBIDDEN' && !getUser()) {
          status.set(t('poll.needs_account_short'), 'error');
        } else if (err.code === 'POW_FAILED') {
          status.set(t('poll.pow_failed'), 'error');
        } else {
          status.set(errorText(err), 'error');
        }
        if (!status.hidden) status.focus();
      } finally {
        submit.disabled = false;
        preparing.busy(null);
        f.removeAttribute('aria-busy');
      }
    });
    status.setAttribute('tabindex', '-1');
    area.append(f);
  }

  function showVoted(mine) {
    area.replaceChildren();
    const rec = getReceipt(id);
    const heading = h('h2', { tabindex: '-1', id: 'voted-h', text: t('poll.you_voted') });
    const box = h('section', { class: 'voted', 'aria-labelledby': 'voted-h' }, heading);
    box.append(h('p', { class: 'meta', text: mine.voted_at ? t('poll.recorded_at', { when: fmtTime(mine.voted_at) }) : t('poll.recorded_short') }));
    box.append(h('p', { text: t('poll.your_ballot') }), ballotSummary(poll, mine));
    if (rec?.receipt && (!mine.vote_id || !rec.vote_id || rec.vote_id === mine.vote_id)) {
      box.append(h('p', { class: 'receipt' }, t('poll.your_receipt'), ' ', h('code', { class: 'receipt-code', text: rec.receipt })),
        h('p', { class: 'hint' }, t('poll.keep_receipt'), ' ',
          h('a', { href: `/r/${encodeURIComponent(rec.receipt)}`, 'data-link': '', text: t('poll.check_receipt') })));
    }
    const status = statusLine('alert', 'alert');
    status.setAttribute('tabindex', '-1');
    if (poll.settings?.allow_vote_change && !openState()) {
      const change = h('button', { type: 'button', class: 'secondary', text: t('poll.change_vote'), onclick: () => showForm(mine) });
      const retract = h('button', { type: 'button', class: 'secondary danger', text: t('poll.retract_vote') });
      retract.addEventListener('click', async () => {
        status.set(null);
        retract.disabled = true;
        try {
          await request('DELETE', pollPath(id, '/votes/me'), { token: voterToken() });
          setReceipt(id, null);
          announce(t('poll.retracted'));
          showForm(null);
          area.querySelector('input, button')?.focus();
        } catch (err) {
          status.set(err.status === 405 || (err.status === 404 && err.code !== 'POLL_NOT_FOUND')
            ? t('poll.retract_unsupported') : errorText(err), 'error');
          status.focus();
        } finally { retract.disabled = false; }
      });
      box.append(h('div', { class: 'actions' }, change, retract));
    }
    box.append(status);
    area.append(box);
  }

  await refresh();
  return () => sub.close();
}
