// Tiny DOM helpers. Every piece of text goes in through text nodes (textContent), never
// through innerHTML, so user-supplied strings (titles, options, usernames) show as text.
import { t } from './i18n.js';

export { fmtTime } from './i18n.js';

/**
 * h('div', {class: 'x', onclick: fn, for: 'id', hidden: true}, 'text', child, [more])
 * Attribute values are set with setAttribute (never `style`), properties starting with
 * `on` become listeners, `text` sets textContent, `dataset` fills data-*.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') el.textContent = String(v);
      else if (k === 'class') el.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'value') el.value = v;
      else if (k === 'checked') el.checked = !!v;
      else if (k === 'style') throw new Error('inline styles are not allowed by the CSP');
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let uid = 0;
export const newId = (p = 'f') => `${p}-${++uid}`;

export function announce(msg) {
  const a = document.getElementById('announcer');
  if (!a) return;
  a.textContent = '';
  // a fresh text node in the next frame makes screen readers repeat identical messages
  requestAnimationFrame(() => { a.textContent = msg; });
}

/** "2026-04-05T10:00" (datetime-local, local time) → RFC 3339 UTC, or null if empty. */
export function localToIso(v) {
  if (!v) return null;
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

/** RFC 3339 → value for a datetime-local input, in local time. */
export function isoToLocal(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** A labelled form field: {wrap, input, error, setError(msg)}. */
export function field({ label, input, hint, id }) {
  id = id || input.id || newId('in');
  input.id = id;
  const errId = `${id}-err`;
  const hintId = hint ? `${id}-hint` : null;
  const error = h('p', { class: 'field-error', id: errId, hidden: true });
  const describedBy = [hintId, errId].filter(Boolean).join(' ');
  input.setAttribute('aria-describedby', describedBy);
  const wrap = h('div', { class: 'field' },
    h('label', { for: id, text: label }),
    hint ? h('p', { class: 'hint', id: hintId, text: hint }) : null,
    input, error);
  const setError = (msg) => setFieldError(input, error, msg);
  return { wrap, input, error, setError };
}

export function setFieldError(input, errorEl, msg) {
  if (msg) {
    errorEl.textContent = msg;
    errorEl.hidden = false;
    if (input) input.setAttribute('aria-invalid', 'true');
  } else {
    errorEl.textContent = '';
    errorEl.hidden = true;
    if (input) input.removeAttribute('aria-invalid');
  }
}

/** A status/alert paragraph whose text can be set (empty hides it). */
export function statusLine(cls = 'status', role = 'status') {
  const el = h('p', { class: cls, role, hidden: true });
  el.set = (msg, kind) => {
    el.textContent = msg || '';
    el.hidden = !msg;
    el.classList.toggle('is-error', kind === 'error');
    el.classList.toggle('is-ok', kind === 'ok');
  };
  return el;
}

/**
 * A polite live region for work in progress ("Preparing…"), with a spinner while busy.
 * It stays in the page (empty and without height when idle) so that screen readers
 * announce the text when it is set. el.busy(msg) shows msg; el.busy(null) clears it.
 */
export function busyStatus() {
  const el = h('p', { class: 'busy-status', role: 'status', 'aria-live': 'polite' });
  el.busy = (msg) => {
    el.textContent = msg || '';
    el.classList.toggle('is-busy', !!msg);
  };
  return el;
}

/** The poll type's name in the page's language. */
export const typeName = (type) => t(`type.${type}`, null, type);

/**
 * Makes btn ask before it acts: a click shows the question with a confirming button and
 * Cancel in `box` (focus moves to the confirming button, and back to btn on Cancel).
 */
export function confirmThen(btn, box, question, yesText, fn) {
  btn.addEventListener('click', () => {
    const group = h('div', { class: 'confirm', role: 'group', 'aria-label': question }, h('span', { text: question }), ' ');
    const yes = h('button', { type: 'button', class: 'primary danger', text: yesText });
    const no = h('button', { type: 'button', class: 'secondary', text: t('common.cancel') });
    yes.addEventListener('click', async () => {
      group.remove();
      await fn();
      if (btn.isConnected) btn.focus();
    });
    no.addEventListener('click', () => { group.remove(); btn.focus(); });
    group.append(yes, ' ', no);
    box.replaceChildren(group);
    yes.focus();
  });
}
