// /mine: sign up / log in, and the caller's polls with edit, close, extend, export, audit
// and delete. Without an account the polls are this browser's (its anonymous device
// token); once signed in, polls the device made before are listed too until the server
// has moved them to the account (linking does that on sign-up and log-in).
import { h, newId, statusLine, fmtTime, isoToLocal, localToIso, typeName, confirmThen } from './dom.js';
import { request, pollPath, getUser, getDevice, download, ApiError } from './api.js';
import { authPanel } from './auth.js';
import { navigate, flash } from './app.js';
import { t, errorText } from './i18n.js';

export async function render(main) {
  document.title = t('mine.doc_title');
  const user = getUser();
  const device = getDevice();
  main.append(h('h1', { text: t('mine.heading') }));
  if (!user) {
    main.append(authPanel((merged) => {
      if (merged) flash(merged);
      navigate('/mine', { replace: true });
    }, t('mine.intro')));
    if (!device) return;
    const section = pollSection(t('mine.browser_polls'), device.token, { hint: t('mine.browser_polls_hint') });
    main.append(section.el);
    await section.load();
    return;
  }
  main.append(h('p', { class: 'lead' }, t('mine.signed_in_as'), ' ', h('strong', { text: user.username }), '. ',
    h('a', { href: '/', 'data-link': '', text: t('app.create_link') })));
  const mine = pollSection(null, user.token, { empty: true });
  main.append(mine.el);
  await mine.load();
  // polls this browser made anonymously that are not (yet) the account's
  if (device && device.voter_id !== user.user_id) {
    const older = pollSection(t('mine.before_sign_in'), device.token, { hint: t('mine.before_sign_in_hint'), skip: mine.ids });
    main.append(older.el);
    await older.load();
  }
}

/**
 * A list of the polls `token` owns (GET /v1/polls?mine=1, paginated), with a heading when
 * `title` is given; hidden while empty unless opts.empty. ids: the poll ids listed so far.
 */
function pollSection(title, token, { hint, empty = false, skip = new Set() } = {}) {
  const headId = newId('ps');
  const list = h('ul', { class: 'poll-list' });
  const status = statusLine('alert', 'alert');
  const more = h('button', { type: 'button', class: 'secondary', text: t('mine.load_more'), hidden: true });
  const el = h('section', { class: 'poll-section', 'aria-labelledby': title ? headId : undefined, 'aria-label': title ? undefined : t('mine.heading') },
    title ? h('h2', { id: headId, text: title }) : null, hint ? h('p', { class: 'hint', text: hint }) : null, status, list, more);
  el.hidden = !empty;
  const ids = new Set();
  let cursor = null;
  async function load() {
    more.disabled = true;
    try {
      const q = `/v1/polls?mine=1&limit=20${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
      const r = await request('GET', q, { token });
      for (const p of r.items) {
        if (skip.has(p.poll_id) || ids.has(p.poll_id)) continue;
        ids.add(p.poll_id);
        list.append(pollItem(p, token, () => { ids.delete(p.poll_id); if (!ids.size) showEmpty(); }));
      }
      cursor = r.next_cursor;
      more.hidden = !cursor;
      if (ids.size) el.hidden = false;
      else if (!cursor) showEmpty();
    } catch (e) {
      el.hidden = false;
      status.set(errorText(e), 'error');
    } finally {
      more.disabled = false;
    }
  }
  function showEmpty() {
    if (!empty) { el.hidden = true; return; }
    list.replaceChildren(h('li', { class: 'empty' }, t('mine.no_polls'), ' ', h('a', { href: '/', 'data-link': '', text: t('app.create_link') })));
  }
  more.addEventListener('click', load);
  return { el, load, ids };
}

function pollItem(poll, token, onGone) {
  const id = poll.poll_id;
  const status = statusLine('status', 'status');
  const metaLine = h('p', { class: 'meta' });
  const noReopen = h('p', { class: 'hint', text: t('manage.no_reopen') });
  const setMeta = () => {
    noReopen.hidden = poll.status !== 'closed';
    const badge = h('span', { class: `badge badge-${poll.status}`, text: t(`status.${poll.status}`, null, poll.status) });
    metaLine.replaceChildren(badge, ' ', t('mine.meta', { type: typeName(poll.type), when: fmtTime(poll.created_at) }),
      poll.end_time ? ` · ${t(poll.status === 'closed' ? 'mine.closed_at' : 'mine.closes_at', { when: fmtTime(poll.end_time) })}` : '');
  };
  setMeta();
  const titleId = newId('pt');
  const li = h('li', { class: 'poll-item', 'aria-labelledby': titleId });
  const actions = h('div', { class: 'actions wrap-actions' });
  const extra = h('div', { class: 'poll-extra' });
  const call = (method, path, opts = {}) => request(method, path, { token, ...opts });

  const patch = async (body, okMsg) => {
    status.set(null);
    try {
      Object.assign(poll, await call('PATCH', pollPath(id), { body }));
      setMeta();
      renderActions();
      status.set(okMsg, 'ok');
    } catch (e) {
      status.set(errorText(e), 'error');
    }
  };

  function renderActions() {
    actions.replaceChildren(
      h('a', { class: 'button secondary', href: `/p/${id}/share`, 'data-link': '', text: t('poll.share') }),
      h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: t('mine.present') }),
      h('a', { class: 'button secondary', href: `/p/${id}/edit`, 'data-link': '', text: t('manage.edit') }));
    if (poll.status === 'draft') {
      const pub = h('button', { type: 'button', class: 'secondary', text: t('manage.publish') });
      pub.addEventListener('click', () => patch({ status: 'active' }, t('manage.published')));
      actions.append(pub);
    }
    if (poll.status !== 'closed') {
      const close = h('button', { type: 'button', class: 'secondary', text: t('manage.close') });
      confirmThen(close, extra, t('manage.close_q'), t('manage.close_yes'), () => patch({ status: 'closed' }, t('manage.closed')));
      const extend = h('button', { type: 'button', class: 'secondary', text: poll.end_time ? t('mine.extend') : t('mine.set_end'), 'aria-expanded': 'false' });
      extend.addEventListener('click', () => {
        const inId = newId('end');
        const input = h('input', { type: 'datetime-local', id: inId, value: isoToLocal(poll.end_time || new Date(Date.now() + 3600_000).toISOString()) });
        const err = h('p', { class: 'field-error', id: `${inId}-err`, hidden: true });
        input.setAttribute('aria-describedby', err.id);
        const save = h('button', { type: 'submit', class: 'primary', text: t('mine.save_end') });
        const form = h('form', { class: 'extend-form', novalidate: true },
          h('label', { for: inId, text: t('mine.end_label') }), h('div', { class: 'copy-row' }, input, save), err);
        form.addEventListener('submit', async (e) => {
          e.preventDefault();
          const iso = localToIso(input.value);
          const fail = (m) => { err.textContent = m; err.hidden = false; input.setAttribute('aria-invalid', 'true'); input.focus(); };
          if (!iso) return fail(t('form.err.time_missing'));
          if (Date.parse(iso) <= Date.now()) return fail(t('form.err.end_past'));
          try {
            Object.assign(poll, await call('PATCH', pollPath(id), { body: { end_time: iso } }));
            setMeta(); renderActions(); extra.replaceChildren();
            status.set(t('mine.now_closes', { when: fmtTime(poll.end_time) }), 'ok');
          } catch (ex) { fail(errorText(ex)); }
        });
        extra.replaceChildren(form);
        input.focus();
      });
      actions.append(close, extend);
    } else {
      actions.append(h('a', { class: 'button secondary', href: `/?copy=${encodeURIComponent(id)}`, 'data-link': '', text: t('manage.ask_again') }));
    }
    const csv = h('button', { type: 'button', class: 'secondary', text: t('mine.export') });
    csv.addEventListener('click', async () => {
      status.set(null);
      try {
        await download(pollPath(id, '/export?format=csv'), `tally-${id}.csv`, token);
        status.set(t('mine.exported'), 'ok');
      } catch (e) {
        status.set(notYet(e, t('mine.export_what')) || errorText(e), 'error');
      }
    });
    const audit = h('button', { type: 'button', class: 'secondary', text: t('mine.audit'), 'aria-expanded': 'false' });
    audit.addEventListener('click', () => showAudit(id, token, extra, status, audit));
    const del = h('button', { type: 'button', class: 'secondary danger', text: t('manage.delete') });
    confirmThen(del, extra, t('manage.delete_q'), t('manage.delete_yes'), async () => {
      try {
        await call('DELETE', pollPath(id));
        const next = li.nextElementSibling || li.previousElementSibling;
        li.remove();
        onGone();
        (next?.querySelector('a') || document.querySelector('main h1'))?.focus();
      } catch (e) { status.set(errorText(e), 'error'); }
    });
    actions.append(csv, audit, del);
  }
  renderActions();
  li.append(h('h2', { class: 'poll-item-title' }, h('a', { id: titleId, href: `/p/${id}`, 'data-link': '', text: poll.title })),
    metaLine, noReopen, actions, status, extra);
  return li;
}

function notYet(e, what) {
  if (e instanceof ApiError && (e.code === 'NOT_FOUND' || e.status === 405)) return t('mine.not_available', { what });
  return null;
}

async function showAudit(id, token, extra, status, btn) {
  if (btn.getAttribute('aria-expanded') === 'true') {
    extra.replaceChildren();
    btn.setAttribute('aria-expanded', 'false');
    return;
  }
  status.set(null);
  const tbody = h('tbody');
  const more = h('button', { type: 'button', class: 'secondary', text: t('mine.load_more'), hidden: true });
  const table = h('table', { class: 'audit' },
    h('caption', { text: t('audit.caption') }),
    h('thead', {}, h('tr', {}, ['audit.time', 'audit.event', 'audit.voter', 'audit.ballot'].map((k) => h('th', { scope: 'col', text: t(k) })))),
    tbody);
  let cursor = null;
  const load = async () => {
    const r = await request('GET', pollPath(id, `/audit?limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`), { token });
    for (const it of r.items || []) {
      tbody.append(h('tr', {},
        h('td', { text: fmtTime(it.at) }), h('td', { text: t(`audit.ev.${it.event}`, null, it.event) }), h('td', { class: 'mono', text: it.voter }),
        h('td', { class: 'mono', text: it.ballot ? JSON.stringify(it.ballot) : '' })));
    }
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: '4', text: t('audit.none') })));
    cursor = r.next_cursor;
    more.hidden = !cursor;
  };
  try {
    await load();
  } catch (e) {
    status.set(notYet(e, t('mine.audit_what')) || errorText(e), 'error');
    return;
  }
  more.addEventListener('click', () => load().catch((e) => status.set(errorText(e), 'error')));
  extra.replaceChildren(h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': t('mine.audit') }, table), more);
  btn.setAttribute('aria-expanded', 'true');
}
