// /p/<id>/share: the short link, a copy button and the QR code (rendered by the server).
import { h, statusLine, newId } from './dom.js';
import { call, pollPath, shareUrl, qrDataUrl } from './api.js';
import { pollError } from './poll.js';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = `Share: ${poll.title} · tally`;
  const url = shareUrl(id);
  const inputId = newId('link');
  const input = h('input', { type: 'text', id: inputId, readonly: true, value: url, class: 'share-link' });
  const copied = statusLine('status', 'status');
  const copy = h('button', { type: 'button', class: 'primary', text: 'Copy link' });
  copy.addEventListener('click', async () => {
    let ok = false;
    try { await navigator.clipboard.writeText(url); ok = true; } catch {
      input.select();
      try { ok = document.execCommand('copy'); } catch { ok = false; }
    }
    copied.set(ok ? 'Link copied.' : 'Select the link and copy it with Ctrl+C.', ok ? 'ok' : 'error');
  });
  input.addEventListener('focus', () => input.select());
  const img = h('img', { class: 'qr', alt: `QR code for ${url}`, width: '240', height: '240' });
  qrDataUrl(id).then((src) => { img.src = src; }).catch(() => { img.replaceWith(h('p', { class: 'hint', text: 'The QR code is not available.' })); });
  main.append(
    h('h1', { text: poll.status === 'draft' ? 'Your draft is saved' : 'Your poll is ready' }),
    h('p', { class: 'poll-title-small', text: poll.title }),
    h('div', { class: 'share' },
      h('div', { class: 'share-link-box' },
        h('label', { for: inputId, text: 'Link to the poll' }),
        h('div', { class: 'copy-row' }, input, copy), copied,
        h('p', { class: 'actions' },
          h('a', { class: 'button secondary', href: `/p/${id}`, 'data-link': '', text: 'Open the vote page' }),
          h('a', { class: 'button secondary', href: `/p/${id}/results`, 'data-link': '', text: 'Live results' }),
          h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: 'Presenter mode' }))),
      h('figure', { class: 'qr-box' }, img, h('figcaption', { text: 'Scan to vote' }))));
}
