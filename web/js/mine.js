// /mine: sign up / log in, and the caller's polls with close, extend, export and audit.
import { h, newId, statusLine, fmtTime, isoToLocal, localToIso, TYPE_NAMES } from './dom.js';
import { call, pollPath, getUser, getDevice, download, ApiError } from './api.js';
import { authPanel } from './auth.js';
import { navigate } from './app.js';

export async function render(main) {
  document.title = 'My polls · tally';
  const user = getUser();
  main.append(h('h1', { text: 'My polls' }));
  if (!user) {
    main.append(authPanel(() => navigate('/mine', { replace: true }), 'Sign up or log in to keep your polls, close or extend them, export the votes and read the audit log.'));
    if (!getDevice()) return;
    main.append(h('h2', { text: 'Polls created in this browser' }));
  } else {
    main.append(h('p', { class: 'lead' }, `Signed in as `, h('strong', { text: user.username }), '. ',
      h('a', { href: '/', 'data-link': '', text: 'Create a poll' })));
  }
  const list = h('ul', { class: 'poll-list' });
  const status = statusLine('alert', 'alert');
  const more = h('button', { type: 'button', class: 'secondary', text: 'Load more', hidden: true });
  main.append(status, list, more);
  let cursor = null;
  async function load() {
    more.disabled = true;
    try {
      const q = `/v1/polls?mine=1&limit=20${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
      const r = await call('GET', q);
      for (const p of r.items) list.append(pollItem(p));
      if (!r.items.length && !cursor) list.append(h('li', { class: 'empty', text: 'No polls yet.' }));
      cursor = r.next_cursor;
      more.hidden = !cursor;
    } catch (e) {
      status.set(e.message, 'error');
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener('click', load);
  await load();
}

function pollItem(poll) {
  const id = poll.poll_id;
  const status = statusLine('status', 'status');
  const statusBadge = h('span', { class: `badge badge-${poll.status}`, text: poll.status });
  const metaLine = h('p', { class: 'meta' });
  const setMeta = () => {
    statusBadge.textContent = poll.status;
    statusBadge.className = `badge badge-${poll.status}`;
    metaLine.replaceChildren(statusBadge, ` ${TYPE_NAMES[poll.type] || poll.type} · created ${fmtTime(poll.created_at)}`,
      poll.end_time ? ` · ${poll.status === 'closed' ? 'closed' : 'closes'} ${fmtTime(poll.end_time)}` : '');
  };
  setMeta();
  const titleId = newId('pt');
  const li = h('li', { class: 'poll-item', 'aria-labelledby': titleId });
  const actions = h('div', { class: 'actions wrap-actions' });
  const extra = h('div', { class: 'poll-extra' });

  const patch = async (body, okMsg) => {
    status.set(null);
    try {
      Object.assign(poll, await call('PATCH', pollPath(id), { body }));
      setMeta();
      renderActions();
      status.set(okMsg, 'ok');
    } catch (e) {
      status.set(e.message, 'error');
    }
  };

  function confirmThen(btn, question, yesText, fn) {
    btn.addEventListener('click', () => {
      const box = h('div', { class: 'confirm', role: 'group', 'aria-label': question },
        h('span', { text: question }), ' ');
      const yes = h('button', { type: 'button', class: 'primary danger', text: yesText });
      const no = h('button', { type: 'button', class: 'secondary', text: 'Cancel' });
      yes.addEventListener('click', async () => { box.remove(); await fn(); btn.focus?.(); });
      no.addEventListener('click', () => { box.remove(); btn.focus(); });
      box.append(yes, ' ', no);
      extra.replaceChildren(box);
      yes.focus();
    });
  }

  function renderActions() {
    actions.replaceChildren(
      h('a', { class: 'button secondary', href: `/p/${id}/share`, 'data-link': '', text: 'Share' }),
      h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: 'Present' }));
    if (poll.status === 'draft') {
      const pub = h('button', { type: 'button', class: 'secondary', text: 'Publish' });
      pub.addEventListener('click', () => patch({ status: 'active' }, 'Published.'));
      actions.append(pub);
    }
    if (poll.status !== 'closed') {
      const close = h('button', { type: 'button', class: 'secondary', text: 'Close now' });
      confirmThen(close, 'Close this poll? No more votes will be taken.', 'Close poll', () => patch({ status: 'closed' }, 'The poll is closed.'));
      const extend = h('button', { type: 'button', class: 'secondary', text: poll.end_time ? 'Extend' : 'Set end time', 'aria-expanded': 'false' });
      extend.addEventListener('click', () => {
        const inId = newId('end');
        const input = h('input', { type: 'datetime-local', id: inId, value: isoToLocal(poll.end_time || new Date(Date.now() + 3600_000).toISOString()) });
        const err = h('p', { class: 'field-error', id: `${inId}-err`, hidden: true });
        input.setAttribute('aria-describedby', err.id);
        const save = h('button', { type: 'submit', class: 'primary', text: 'Save end time' });
        const form = h('form', { class: 'extend-form', novalidate: true },
          h('label', { for: inId, text: 'Close the poll at (your local time)' }), h('div', { class: 'copy-row' }, input, save), err);
        form.addEventListener('submit', async (e) => {
          e.preventDefault();
          const iso = localToIso(input.value);
          const fail = (m) => { err.textContent = m; err.hidden = false; input.setAttribute('aria-invalid', 'true'); input.focus(); };
          if (!iso) return fail('Enter a date and time.');
          if (Date.parse(iso) <= Date.now()) return fail('end_time must be in the future');
          try {
            Object.assign(poll, await call('PATCH', pollPath(id), { body: { end_time: iso } }));
            setMeta(); renderActions(); extra.replaceChildren();
            status.set(`The poll now closes ${fmtTime(poll.end_time)}.`, 'ok');
          } catch (ex) { fail(ex.message); }
        });
        extra.replaceChildren(form);
        input.focus();
      });
      actions.append(close, extend);
    }
    const csv = h('button', { type: 'button', class: 'secondary', text: 'Export CSV' });
    csv.addEventListener('click', async () => {
      status.set(null);
      try {
        await download(pollPath(id, '/export?format=csv'), `tally-${id}.csv`);
        status.set('Downloaded the CSV export.', 'ok');
      } catch (e) {
        status.set(notYet(e, 'Export') || e.message, 'error');
      }
    });
    const audit = h('button', { type: 'button', class: 'secondary', text: 'Audit log', 'aria-expanded': 'false' });
    audit.addEventListener('click', () => showAudit(id, extra, status, audit));
    const del = h('button', { type: 'button', class: 'secondary danger', text: 'Delete' });
    confirmThen(del, 'Delete this poll and all its votes? This cannot be undone.', 'Delete poll', async () => {
      try { await call('DELETE', pollPath(id)); li.remove(); } catch (e) { status.set(e.message, 'error'); }
    });
    actions.append(csv, audit, del);
  }
  renderActions();
  li.append(h('h2', { class: 'poll-item-title' }, h('a', { id: titleId, href: `/p/${id}`, 'data-link': '', text: poll.title })),
    metaLine, actions, status, extra);
  return li;
}

function notYet(e, what) {
  if (e instanceof ApiError && (e.code === 'NOT_FOUND' || e.status === 405)) return `${what} is not available on this server yet.`;
  return null;
}

async function showAudit(id, extra, status, btn) {
  if (btn.getAttribute('aria-expanded') === 'true') {
    extra.replaceChildren();
    btn.setAttribute('aria-expanded', 'false');
    return;
  }
  status.set(null);
  const tbody = h('tbody');
  const more = h('button', { type: 'button', class: 'secondary', text: 'Load more', hidden: true });
  const table = h('table', { class: 'audit' },
    h('caption', { text: 'Audit log, oldest first' }),
    h('thead', {}, h('tr', {}, ['Time', 'Event', 'Voter', 'Ballot'].map((t) => h('th', { scope: 'col', text: t })))),
    tbody);
  let cursor = null;
  const load = async () => {
    const r = await call('GET', pollPath(id, `/audit?limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`));
    for (const it of r.items || []) {
      tbody.append(h('tr', {},
        h('td', { text: fmtTime(it.at) }), h('td', { text: it.event }), h('td', { class: 'mono', text: it.voter }),
        h('td', { class: 'mono', text: it.ballot ? JSON.stringify(it.ballot) : '' })));
    }
    if (!tbody.children.length) tbody.append(h('tr', {}, h('td', { colspan: '4', text: 'No events yet.' })));
    cursor = r.next_cursor;
    more.hidden = !cursor;
  };
  try {
    await load();
  } catch (e) {
    status.set(notYet(e, 'The audit log') || e.message, 'error');
    return;
  }
  more.addEventListener('click', () => load().catch((e) => status.set(e.message, 'error')));
  extra.replaceChildren(h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': 'Audit log' }, table), more);
  btn.setAttribute('aria-expanded', 'true');
}
