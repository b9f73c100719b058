// The single-page app: a small router over history.pushState. Every page module exports
// a render function (main, params) → optional cleanup function.
import { h, announce, statusLine } from './dom.js';
import { getUser, setUser, forgetDevice } from './api.js';
import { t, lang } from './i18n.js';

// [path pattern, module, parameter names, exported render function]
const ID = '([A-Za-z0-9_-]+)';
const routes = [
  [/^\/(?:new)?$/, () => import('./create.js'), [], 'render'],
  [/^\/mine$/, () => import('./mine.js'), [], 'render'],
  [new RegExp(`^/p/${ID}$`), () => import('./poll.js'), ['id'], 'render'],
  [new RegExp(`^/p/${ID}/share$`), () => import('./share.js'), ['id'], 'render'],
  [new RegExp(`^/p/${ID}/results$`), () => import('./results-page.js'), ['id'], 'render'],
  [new RegExp(`^/p/${ID}/present$`), () => import('./present.js'), ['id'], 'render'],
  [new RegExp(`^/p/${ID}/edit$`), () => import('./create.js'), ['id'], 'renderEdit'],
  [/^\/r$/, () => import('./receipt.js'), [], 'render'],
  [new RegExp(`^/r/${ID}$`), () => import('./receipt.js'), ['receipt'], 'render'],
  [/^\/j$/, () => import('./join.js'), [], 'render'],
  [new RegExp(`^/j/${ID}$`), () => import('./join.js'), ['code'], 'render'],
];

let cleanup = null;
let renderSeq = 0;
let flashMsg = null;

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  render(true);
}

/** A message for the next page shown ("Your changes are saved."), at its top. */
export function flash(msg, kind = 'ok') { flashMsg = { msg, kind }; }

async function render(focus) {
  const seq = ++renderSeq;
  if (cleanup) { try { cleanup(); } catch { /* ignore */ } cleanup = null; }
  document.body.classList.remove('presenting');
  const main = document.getElementById('main');
  const path = location.pathname.replace(/\/+$/, '') || '/';
  let fn = null;
  const params = {};
  for (const [re, load, names, name] of routes) {
    const m = re.exec(path);
    if (m) {
      names.forEach((n, i) => { params[n] = m[i + 1]; });
      fn = (await load())[name];
      break;
    }
  }
  if (seq !== renderSeq) return;
  main.replaceChildren();
  updateNav(path);
  const shown = flashMsg;
  flashMsg = null;
  if (!fn) {
    document.title = t('app.not_found_title');
    main.append(h('h1', { tabindex: '-1', text: t('app.not_found') }),
      h('p', {}, t('app.not_found_text'), ' ', h('a', { href: '/', 'data-link': '', text: t('app.create_link') })));
  } else {
    try {
      cleanup = (await fn(main, params)) || null;
    } catch (e) {
      main.append(h('p', { class: 'alert is-error', role: 'alert', text: t('app.went_wrong', { why: e.message }) }));
    }
  }
  if (seq !== renderSeq) return;
  if (shown) {
    const note = statusLine('status flash', 'status');
    note.set(shown.msg, shown.kind);
    const h1 = main.querySelector('h1');
    if (h1) h1.after(note); else main.prepend(note);
  }
  if (focus) {
    const h1 = main.querySelector('h1');
    if (h1) { h1.setAttribute('tabindex', '-1'); h1.focus({ preventScroll: true }); }
    window.scrollTo(0, 0);
    announce(shown ? `${document.title}. ${shown.msg}` : document.title);
  }
}

function updateNav(path) {
  for (const a of document.querySelectorAll('header.site nav a')) {
    const href = a.getAttribute('href');
    const here = href === path || (path === '/new' && href === '/') || (href === '/j' && path.startsWith('/j/'));
    if (here) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
}

export function updateWhoami() {
  const el = document.getElementById('whoami');
  if (!el) return;
  const u = getUser();
  el.replaceChildren();
  if (u) {
    el.append(h('span', { class: 'who', text: u.username || t('auth.signed_in') }), ' ',
      h('button', { type: 'button', class: 'link-button', text: t('auth.log_out'), onclick: () => { setUser(null); forgetDevice(); navigate('/mine'); } }));
  }
}

/** The page's own text (index.html) in the chosen language. */
function translateShell() {
  document.documentElement.lang = lang;
  for (const el of document.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll('[data-i18n-aria]')) el.setAttribute('aria-label', t(el.dataset.i18nAria));
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

translateShell();
updateWhoami();
render(false);
