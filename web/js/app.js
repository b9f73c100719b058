// The single-page app: a small router over history.pushState. Every page module exports
// render(main, params) → optional cleanup function.
import { h, announce } from './dom.js';
import { getUser, setUser } from './api.js';

const routes = [
  [/^\/(?:new)?$/, () => import('./create.js'), []],
  [/^\/mine$/, () => import('./mine.js'), []],
  [/^\/p\/([A-Za-z0-9_-]+)$/, () => import('./poll.js'), ['id']],
  [/^\/p\/([A-Za-z0-9_-]+)\/share$/, () => import('./share.js'), ['id']],
  [/^\/p\/([A-Za-z0-9_-]+)\/results$/, () => import('./results-page.js'), ['id']],
  [/^\/p\/([A-Za-z0-9_-]+)\/present$/, () => import('./present.js'), ['id']],
];

let cleanup = null;
let renderSeq = 0;

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  render(true);
}

async function render(focus) {
  const seq = ++renderSeq;
  if (cleanup) { try { cleanup(); } catch { /* ignore */ } cleanup = null; }
  document.body.classList.remove('presenting');
  const main = document.getElementById('main');
  const path = location.pathname.replace(/\/+$/, '') || '/';
  let mod = null;
  let params = {};
  for (const [re, load, names] of routes) {
    const m = re.exec(path);
    if (m) {
      names.forEach((n, i) => { params[n] = m[i + 1]; });
      mod = await load();
      break;
    }
  }
  if (seq !== renderSeq) return;
  main.replaceChildren();
  updateNav(path);
  if (!mod) {
    document.title = 'Not found · tally';
    main.append(h('h1', { tabindex: '-1', text: 'Page not found' }),
      h('p', {}, 'There is nothing at this address. ', h('a', { href: '/', 'data-link': '', text: 'Create a poll' }), '.'));
  } else {
    try {
      cleanup = (await mod.render(main, params)) || null;
    } catch (e) {
      main.append(h('p', { class: 'alert is-error', role: 'alert', text: `Something went wrong: ${e.message}` }));
    }
  }
  if (focus && seq === renderSeq) {
    const h1 = main.querySelector('h1');
    if (h1) { h1.setAttribute('tabindex', '-1'); h1.focus({ preventScroll: true }); }
    window.scrollTo(0, 0);
    announce(document.title);
  }
}

function updateNav(path) {
  for (const a of document.querySelectorAll('header.site nav a')) {
    const here = a.getAttribute('href') === path || (path === '/new' && a.getAttribute('href') === '/');
    if (here) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
}

export function updateWhoami() {
  const el = document.getElementById('whoami');
  if (!el) return;
  const u = getUser();
  el.replaceChildren();
  if (u) {
    el.append(h('span', { class: 'who', text: u.username || 'signed in' }), ' ',
      h('button', { type: 'button', class: 'link-button', text: 'Log out', onclick: () => { setUser(null); navigate('/mine'); } }));
  }
}

document.addEventListener('click', (e) => {
  const a = e.target.closest && e.target.closest('a[data-link]');
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin) return;
  e.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener('popstate', () => render(true));
window.addEventListener('tally:auth', updateWhoami);
window.addEventListener('storage', updateWhoami);

updateWhoami();
render(false);
