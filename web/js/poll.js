// /p/<id>: the vote page (one form per poll type), "you voted" with the receipt (and a
// link to check it), change and retract where the poll allows it, the results below (live
// while open, final once closed), and for the poll's owner: edit, close, delete.
import { h, append, statusLine, busyStatus, fmtTime, announce, typeName, confirmThen } from './dom.js';
import { ballotForm } from './ballot.js';
import { request, call, pollPath, getUser, ensureDevice, getReceipt, setReceipt, ownerToken, identityToken, joinUrl } from './api.js';
import { createResults, connectResults } from './results.js';
import { authPanel } from './auth.js';
import { t, errorText } from './i18n.js';
import { navigate, flash } from './app.js';

export { ballotForm };

export function pollError(main, e) {
  document.title = t('poll.not_found_title');
  const notFound = e.status === 404;
  main.append(h('h1', { text: notFound ? t('poll.not_found') : t('poll.load_failed') }),
    h('p', { class: 'alert is-error', role: 'alert', text: notFound ? t('poll.not_found_text') : errorText(e) }),
    h('p', {}, h('a', { href: '/', 'data-link': '', text: t('app.create_link') })));
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
