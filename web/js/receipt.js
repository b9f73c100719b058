// /r and /r/<receipt>: check a vote receipt (GET /v1/receipts/{receipt}). The vote page
// tells voters to keep their receipt "to check later"; this is where they check it. The
// answer reveals only the poll and the time, never the ballot.
import { h, field, statusLine, fmtTime } from './dom.js';
import { request, pollPath } from './api.js';
import { navigate } from './app.js';
import { t, errorText } from './i18n.js';

const RECEIPT_RE = /^[A-Za-z0-9_-]{1,200}$/;

export async function render(main, { receipt } = {}) {
  document.title = t('receipt.doc_title');
  const f = field({
    label: t('receipt.label'),
    hint: t('receipt.hint'),
    input: h('input', { type: 'text', name: 'receipt', autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', value: receipt || '', maxlength: '200' }),
  });
  const form = h('form', { class: 'receipt-form', novalidate: true, 'aria-label': t('receipt.form') },
    h('div', { class: 'inline-form' }, f.wrap, h('button', { type: 'submit', class: 'primary', text: t('receipt.check') })));
  const out = h('section', { class: 'receipt-result', 'aria-live': 'polite' });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = f.input.value.trim();
    f.setError(null);
    if (!v) { f.setError(t('receipt.missing')); f.input.focus(); return; }
    if (!RECEIPT_RE.test(v)) { f.setError(t('receipt.malformed')); f.input.focus(); return; }
    navigate(`/r/${v}`);
  });
  main.append(h('h1', { text: t('receipt.heading') }), h('p', { class: 'lead', text: t('receipt.lead') }), form, out);
  if (!receipt) return;

  const status = statusLine('alert', 'alert');
  out.append(status);
  let r;
  try {
    r = await request('GET', `/v1/receipts/${encodeURIComponent(receipt)}`);
  } catch (e) {
    if (e.code === 'RECEIPT_NOT_FOUND' || e.status === 404) {
      out.replaceChildren(h('h2', { text: t('receipt.not_found') }), h('p', { text: t('receipt.not_found_text') }));
      out.dataset.counted = 'false';
    } else {
      status.set(errorText(e), 'error');
    }
    return;
  }
  let poll = null;
  try { poll = await request('GET', pollPath(r.poll_id)); } catch { /* deleted meanwhile, or a draft */ }
  out.dataset.counted = String(r.counted === true);
  out.replaceChildren(
    h('h2', { class: 'counted', text: r.counted ? t('receipt.counted') : t('receipt.not_counted') }),
    h('dl', {},
      h('dt', { text: t('receipt.poll') }),
      h('dd', {}, poll ? h('a', { href: `/p/${r.poll_id}`, 'data-link': '', text: poll.title }) : h('code', { text: r.poll_id })),
      h('dt', { text: t('receipt.recorded') }),
      h('dd', { text: r.recorded_at ? fmtTime(r.recorded_at) : '–' })),
    h('p', { class: 'hint', text: t('receipt.private') }));
}
