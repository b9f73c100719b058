// /p/<id>/share: the join code (when the poll has one) big, the link with a copy button,
// and the QR code (rendered by the server).
import { h, statusLine, newId } from './dom.js';
import { call, pollPath, shareUrl, joinUrl, qrDataUrl, ownerToken } from './api.js';
import { pollError } from './poll.js';
import { t } from './i18n.js';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = t('share.doc_title', { title: poll.title });
  const code = typeof poll.join_code === 'string' && poll.join_code ? poll.join_code.toUpperCase() : null;
  const url = shareUrl(id);
  const inputId = newId('link');
  const input = h('input', { type: 'text', id: inputId, readonly: true, value: url, class: 'share-link' });
  const copied = statusLine('status', 'status');
  const copy = h('button', { type: 'button', class: 'primary', text: t('share.copy') });
  copy.addEventListener('click', async () => {
    let ok = false;
    try { await navigator.clipboard.writeText(url); ok = true; } catch {
      input.select();
      try { ok = document.execCommand('copy'); } catch { ok = false; }
    }
    copied.set(ok ? t('share.copied') : t('share.copy_by_hand'), ok ? 'ok' : 'error');
  });
  input.addEventListener('focus', () => input.select());
  const img = h('img', { class: 'qr', alt: t('share.qr_alt', { url }), width: '240', height: '240' });
  qrDataUrl(id, ownerToken(poll) || undefined).then((src) => { img.src = src; }).catch(() => { img.replaceWith(h('p', { class: 'hint', text: t('share.no_qr') })); });
  const codeBox = code
    ? h('p', { class: 'join-code-box' }, t('share.join_code'), ' ',
      // read letter by letter by screen readers, shown as one word
      h('span', { class: 'big-code' }, h('span', { 'aria-hidden': 'true', text: code }), h('span', { class: 'sr-only', text: code.split('').join(' ') })),
      h('span', { class: 'hint' }, t('share.join_at'), ' ', h('a', { href: joinUrl(code), text: joinUrl(code).replace(/^https?:\/\//, '') })))
    : null;
  // the one-line embed for a website (web/embed.js puts an iframe of /embed/<id> there)
  const snippet = `<script src="${location.origin}/embed.js" data-tally-poll="${id}" async></script>`;
  const embedId = newId('embed');
  const embedCode = h('textarea', { id: embedId, class: 'embed-code mono', readonly: true, rows: '2', text: snippet });
  embedCode.value = snippet;
  const embedCopied = statusLine('status', 'status');
  const copyEmbed = h('button', { type: 'button', class: 'secondary', text: t('share.copy_embed') });
  copyEmbed.addEventListener('click', async () => {
    let ok = false;
    try { await navigator.clipboard.writeText(snippet); ok = true; } catch {
      embedCode.select();
      try { ok = document.execCommand('copy'); } catch { ok = false; }
    }
    embedCopied.set(ok ? t('share.embed_copied') : t('share.copy_by_hand'), ok ? 'ok' : 'error');
  });
  embedCode.addEventListener('focus', () => embedCode.select());
  const embedBox = poll.status === 'draft' ? null : h('section', { class: 'embed-box', 'aria-labelledby': `${embedId}-h` },
    h('h2', { id: `${embedId}-h`, text: t('share.embed') }),
    h('p', { class: 'hint', text: t('share.embed_hint') }),
    h('label', { for: embedId, text: t('share.embed_code') }), embedCode,
    h('p', { class: 'actions' }, copyEmbed), embedCopied);
  main.append(
    h('h1', { text: poll.status === 'draft' ? t('share.draft_saved') : t('share.ready') }),
    h('p', { class: 'poll-title-small', text: poll.title }),
    h('div', { class: 'share' },
      h('div', { class: 'share-link-box' },
        codeBox,
        h('label', { for: inputId, text: t('share.link') }),
        h('div', { class: 'copy-row' }, input, copy), copied,
        h('p', { class: 'actions' },
          h('a', { class: 'button secondary', href: `/p/${id}`, 'data-link': '', text: t('share.open_vote') }),
          h('a', { class: 'button secondary', href: `/p/${id}/results`, 'data-link': '', text: t('share.live_results') }),
          h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: t('poll.presenter') }))),
      h('figure', { class: 'qr-box' }, img, h('figcaption', { text: t('share.scan') }))));
  if (embedBox) main.append(embedBox);
}
