// /embed/<id>: the poll made to be framed on another site (a blog post, a newsroom page).
// The question, the ballot form (voting with this browser's device token where the poll
// allows anonymous votes, a link to the poll's page otherwise) and the live results,
// from the same modules as the poll page. The page tells its parent how tall it is
// (postMessage {type: 'tally:embed-size', poll_id, height}) whenever that changes, so
// the snippet (/embed.js) sizes the iframe and nothing scrolls inside it.
import { h, statusLine, busyStatus, announce } from './dom.js';
import { request, call, pollPath, getUser, ensureDevice, identityToken, setReceipt } from './api.js';
import { createResults, connectResults } from './results.js';
import { ballotForm } from './ballot.js';
import { t, lang, errorText } from './i18n.js';

const main = document.getElementById('main');
const id = main.dataset.poll;
document.documentElement.lang = lang;

function tellSize() {
  const height = Math.ceil(document.documentElement.getBoundingClientRect().height);
  if (window.parent !== window) window.parent.postMessage({ type: 'tally:embed-size', poll_id: id, height }, '*');
}
new ResizeObserver(tellSize).observe(document.documentElement);

const pageLink = (text) => h('a', { href: `/p/${encodeURIComponent(id)}`, target: '_blank', rel: 'noopener', text });

async function start() {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) {
    main.replaceChildren(h('p', { class: 'alert is-error', role: 'alert', text: e.status === 404 ? t('poll.not_found') : errorText(e) }));
    return;
  }
  const token = () => getUser()?.token || (poll.settings?.allow_anonymous ? identityToken() : null);
  const area = h('div', { class: 'vote-area' });
  const view = createResults(poll, { heading: 'h2' });
  main.replaceChildren(h('h1', { class: 'poll-title', text: poll.title }), area, view.el,
    h('p', { class: 'embed-foot' }, pageLink(t('embed.open'))));
  const sub = connectResults(poll, view, { token: () => token() || undefined });

  const open = () => poll.status === 'active' && (!poll.start_time || Date.parse(poll.start_time) <= Date.now()) &&
    (!poll.end_time || Date.parse(poll.end_time) > Date.now());

  async function refresh() {
    area.replaceChildren();
    const tok = token();
    let mine = null;
    if (tok) { try { mine = await request('GET', pollPath(id, '/votes/me'), { token: tok }); } catch { mine = null; } }
    if (mine?.has_voted) {
      area.append(h('p', { class: 'alert is-ok', role: 'status', text: t('poll.you_voted') }));
      return;
    }
    if (!open()) {
      area.append(h('p', { class: 'alert', role: 'status', text: t('poll.closed_msg') }));
      return;
    }
    if (!getUser() && !poll.settings?.allow_anonymous) {
      area.append(h('p', {}, t('embed.needs_account'), ' ', pageLink(t('embed.vote_there'))));
      return;
    }
    const form = ballotForm(poll);
    const status = statusLine('alert', 'alert');
    status.setAttribute('tabindex', '-1');
    const preparing = busyStatus();
    const submit = h('button', { type: 'submit', class: 'primary', text: t('poll.vote') });
    const f = h('form', { class: 'vote-form', novalidate: true, 'aria-label': t('poll.vote') },
      form.el, status, h('div', { class: 'actions' }, submit), preparing);
    const idemKey = crypto.randomUUID();
    f.addEventListener('submit', async (e) => {
      e.preventDefault();
      status.set(null);
      form.setErr(null);
      let body;
      try { body = form.ballot(); } catch (err) { form.setErr(err.message); form.focus(); return; }
      submit.disabled = true;
      try {
        const tok = getUser()?.token || (await ensureDevice({ onWork: () => preparing.busy(t('poll.preparing')) })).token;
        preparing.busy(null);
        const r = await request('POST', pollPath(id, '/votes'), { token: tok, body, headers: { 'Idempotency-Key': idemKey } });
        setReceipt(id, { receipt: r.receipt, vote_id: r.vote_id, recorded_at: r.recorded_at });
        sub.reopen(); // results shown after voting: the stream now knows who we are
        announce(t('poll.recorded'));
        await refresh();
      } catch (err) {
        if (err.code === 'ALREADY_VOTED') { await refresh(); return; }
        status.set(errorText(err), 'error');
        status.focus();
      } finally {
        submit.disabled = false;
        preparing.busy(null);
      }
    });
    area.append(f);
  }
  await refresh();
}

start().finally(tellSize);
