// /j and /j/<code>: join a poll by its short code. The server answers GET /j/<code> with a
// redirect to the poll itself; this page serves a typed code (the form) and any /j/<code>
// the server hands to the app (GET /v1/join/{code} → the poll, then on to /p/<poll_id>).
import { h, field } from './dom.js';
import { request } from './api.js';
import { navigate } from './app.js';
import { t, errorText } from './i18n.js';

// case-insensitive; people type spaces, dashes and lower case
const clean = (s) => s.toUpperCase().replace(/[\s-]+/g, '');
const CODE_RE = /^[A-Z0-9]{4,12}$/;

export async function render(main, { code } = {}) {
  document.title = t('join.doc_title');
  const f = field({
    label: t('join.label'),
    hint: t('join.hint'),
    input: h('input', { type: 'text', name: 'code', autocomplete: 'off', autocapitalize: 'characters', spellcheck: 'false', maxlength: '16', class: 'code-input', value: code ? clean(code) : '' }),
  });
  const form = h('form', { class: 'join-form', novalidate: true, 'aria-label': t('join.form') },
    h('div', { class: 'inline-form' }, f.wrap, h('button', { type: 'submit', class: 'primary', text: t('join.go') })));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = clean(f.input.value);
    f.setError(null);
    if (!v) { f.setError(t('join.missing')); f.input.focus(); return; }
    if (!CODE_RE.test(v)) { f.setError(t('join.malformed')); f.input.focus(); return; }
    navigate(`/j/${v}`);
  });
  main.append(h('h1', { text: t('join.heading') }), form);
  if (!code) return;
  try {
    const poll = await request('GET', `/v1/join/${encodeURIComponent(clean(code))}`);
    if (poll?.poll_id) { navigate(`/p/${poll.poll_id}`, { replace: true }); return; }
    f.setError(t('join.not_found', { code: clean(code) }));
  } catch (e) {
    f.setError(e.status === 404 ? t('join.not_found', { code: clean(code) }) : errorText(e));
  }
}
