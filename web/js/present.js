// /p/<id>/present: for a projector, read from the back of a room. The question, every
// option with its bar (a ranked poll's rounds once there are some) and how to join (the
// join code, or the short link when the poll has none, and the QR code) fit the screen
// without scrolling: on a landscape screen the layout is a fixed grid and each part's
// font size is the largest that fits its box (found by measuring), so 12 long options
// shrink the text instead of falling off the bottom. Labels wrap between words.
import { h } from './dom.js';
import { call, pollPath, shareUrl, qrDataUrl, ownerToken, identityToken } from './api.js';
import { createResults, connectResults } from './results.js';
import { pollError } from './poll.js';
import { t } from './i18n.js';

// Where the fitted projector layout applies (a phone held upright gets the page as a column)
const PROJECTOR = '(min-width: 48rem) and (min-aspect-ratio: 1/1)';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = t('present.doc_title', { title: poll.title });
  document.body.classList.add('presenting');
  const view = createResults(poll, { present: true });
  const code = typeof poll.join_code === 'string' && poll.join_code ? poll.join_code.toUpperCase() : null;

  const img = h('img', { class: 'qr', alt: t('present.qr_alt'), width: '320', height: '320' });
  qrDataUrl(id, ownerToken(poll) || undefined).then((src) => { img.src = src; fit(); }).catch(() => img.remove());
  const host = location.host;
  // the address in pieces that never break inside: a line may end only between them
  const piece = (s) => h('span', { class: 'nobreak', text: s });
  const join = code
    ? [h('p', { class: 'join-how', text: t('present.go_to') }),
      h('p', { class: 'join-url' }, piece(`${host}/j`)),
      h('p', { class: 'join-how', text: t('present.enter_code') }),
      h('p', { class: 'join-code' }, h('span', { class: 'nobreak', 'aria-hidden': 'true', text: code }),
        h('span', { class: 'sr-only', text: t('present.code_aria', { code: code.split('').join(' ') }) }))]
    : [h('p', { class: 'join-how', text: t('present.go_to') }),
      h('p', { class: 'join-url join-link' }, piece(host), h('wbr'), piece(`/p/${id}`))];

  const fsBtn = h('button', { type: 'button', class: 'secondary', text: t('present.fullscreen') });
  fsBtn.addEventListener('click', () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else document.documentElement.requestFullscreen?.().catch(() => {});
  });
  const onFs = () => { fsBtn.textContent = document.fullscreenElement ? t('present.exit_fullscreen') : t('present.fullscreen'); };
  document.addEventListener('fullscreenchange', onFs);

  const title = h('h1', { class: 'present-title', text: poll.title });
  const head = h('div', { class: 'present-head' }, title);
  const chart = h('div', { class: 'present-chart' }, view.el);
  const joinBox = h('div', { class: 'join-box' }, img, join);
  const aside = h('aside', { class: 'present-join', 'aria-label': t('present.how_to_vote') },
    joinBox,
    h('div', { class: 'present-tools' },
      h('a', { class: 'button secondary', href: `/p/${id}`, 'data-link': '', text: t('present.leave') }), fsBtn));
  const root = h('div', { class: ['present', code ? 'has-code' : 'has-link'], 'data-share-url': shareUrl(id) }, head, chart, aside);
  main.append(root);

  // ---- fitting ----
  const mq = window.matchMedia(PROJECTOR);
  const overflows = (el) => el.scrollHeight > el.clientHeight + 1 || el.scrollWidth > el.clientWidth + 1;
  /** The largest font size (px, whole) in [min, max] on `box` for which ok() holds. */
  const fitFont = (box, min, max, ok) => {
    let lo = Math.floor(min);
    let hi = Math.floor(max);
    let best = lo;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      box.style.fontSize = `${mid}px`; // CSSOM: allowed by the CSP
      if (ok()) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    box.style.fontSize = `${best}px`;
  };
  let pending = 0;
  function fit() {
    if (pending) return;
    pending = requestAnimationFrame(() => {
      pending = 0;
      const fitted = mq.matches;
      root.classList.toggle('fitted', fitted);
      for (const el of [title, chart, ...joinBox.querySelectorAll('.join-url, .join-code')]) el.style.fontSize = '';
      if (!fitted) return;
      const vh = window.innerHeight;
      const vw = window.innerWidth;
      const titleFits = () => title.scrollHeight <= vh * 0.18 && title.scrollWidth <= title.clientWidth + 1;
      const chartFits = () => !overflows(chart);
      // the join address and code: as big as the column is wide
      for (const el of joinBox.querySelectorAll('.join-url')) fitFont(el, 12, vh * 0.05, () => el.scrollWidth <= el.clientWidth + 1);
      for (const el of joinBox.querySelectorAll('.join-code')) fitFont(el, 16, vh * 0.13, () => el.scrollWidth <= el.clientWidth + 1);
      // the question (at most about a sixth of the height), then the results in what is
      // left; a question more than twice the size of the options gives way to them
      fitFont(title, 18, Math.min(vh * 0.07, vw * 0.04), titleFits);
      fitFont(chart, 10, Math.min(vh * 0.06, vw * 0.035), chartFits);
      const tf = parseFloat(title.style.fontSize);
      const cf = parseFloat(chart.style.fontSize);
      if (tf > 2 * cf && 2 * cf >= 18) {
        fitFont(title, 18, 2 * cf, titleFits);
        fitFont(chart, 10, Math.min(vh * 0.06, vw * 0.035), chartFits);
      }
      root.dataset.fit = String((Number(root.dataset.fit) || 0) + 1);
    });
  }
  const ro = new ResizeObserver(fit);
  ro.observe(root);
  mq.addEventListener('change', fit);
  const update = view.update;
  view.update = (res) => { update(res); fit(); };
  const hidden = view.hidden;
  view.hidden = (info) => { hidden(info); fit(); };
  fit();

  const sub = connectResults(poll, view, { token: () => ownerToken(poll) || identityToken() });
  return () => {
    sub.close();
    ro.disconnect();
    mq.removeEventListener('change', fit);
    cancelAnimationFrame(pending);
    document.removeEventListener('fullscreenchange', onFs);
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  };
}
