// /p/<id>/present: for a projector. Large question, QR code and the live chart.
import { h } from './dom.js';
import { call, pollPath, shareUrl, qrDataUrl } from './api.js';
import { createResults, connectResults } from './results.js';
import { pollError } from './poll.js';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = `Presenting: ${poll.title} · tally`;
  document.body.classList.add('presenting');
  const url = shareUrl(id);
  const view = createResults(poll, { present: true });
  const img = h('img', { class: 'qr', alt: `QR code for ${url}`, width: '320', height: '320' });
  qrDataUrl(id).then((src) => { img.src = src; }).catch(() => img.remove());
  const fsBtn = h('button', { type: 'button', class: 'secondary', text: 'Full screen' });
  fsBtn.addEventListener('click', () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else document.documentElement.requestFullscreen?.().catch(() => {});
  });
  const onFs = () => { fsBtn.textContent = document.fullscreenElement ? 'Exit full screen' : 'Full screen'; };
  document.addEventListener('fullscreenchange', onFs);
  main.append(h('div', { class: 'present' },
    h('div', { class: 'present-tools' },
      h('a', { class: 'button secondary', href: `/p/${id}`, 'data-link': '', text: '← Leave presenter mode' }), fsBtn),
    h('h1', { class: 'present-title', text: poll.title }),
    h('div', { class: 'present-body' },
      h('div', { class: 'present-chart' }, view.el),
      h('aside', { class: 'present-join', 'aria-label': 'How to vote' },
        img,
        h('p', { class: 'join-text', text: 'Vote at' }),
        h('p', { class: 'join-url', text: url.replace(/^https?:\/\//, '') })))));
  const sub = connectResults(poll, view);
  return () => {
    sub.close();
    document.removeEventListener('fullscreenchange', onFs);
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  };
}
