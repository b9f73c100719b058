// Sign up / log in forms. Errors from the server are shown next to the field they name.
// Signing up or in from a browser that holds an anonymous device token sends that token
// (Authorization: Bearer) so that the server links the device to the account: its ballots
// and polls become the account's, and one person keeps one ballot per poll.
import { h, field, statusLine } from './dom.js';
import { request, setUser, getDevice, forgetDevice } from './api.js';
import { t, errorText } from './i18n.js';

const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;

function authForm(kind, onDone) {
  const isReg = kind === 'register';
  const user = field({
    label: t('auth.username'),
    hint: isReg ? t('auth.username_hint') : null,
    input: h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true, maxlength: '32', autocapitalize: 'none', spellcheck: 'false' }),
  });
  const pass = field({
    label: t('auth.password'),
    hint: isReg ? t('auth.password_hint') : null,
    input: h('input', { type: 'password', name: 'password', autocomplete: isReg ? 'new-password' : 'current-password', required: true, maxlength: '1024' }),
  });
  const status = statusLine('alert', 'alert');
  const submit = h('button', { type: 'submit', class: 'primary', text: isReg ? t('auth.sign_up') : t('auth.log_in') });
  const form = h('form', { class: 'auth-form', novalidate: true, 'aria-label': isReg ? t('auth.sign_up') : t('auth.log_in') },
    h('h2', { text: isReg ? t('auth.new_here') : t('auth.have_account') }),
    user.wrap, pass.wrap, status, h('div', { class: 'actions' }, submit));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    user.setError(null); pass.setError(null); status.set(null);
    const username = user.input.value.trim();
    const password = pass.input.value;
    if (isReg && !USERNAME_RE.test(username)) user.setError(t('auth.username_bad'));
    if (!isReg && !username) user.setError(t('auth.username_missing'));
    if (isReg && (password.length < 8 || password.length > 1024)) pass.setError(t('auth.password_bad'));
    if (!isReg && !password) pass.setError(t('auth.password_missing'));
    const bad = form.querySelector('[aria-invalid="true"]');
    if (bad) { bad.focus(); return; }
    submit.disabled = true;
    try {
      const path = isReg ? '/v1/auth/register' : '/v1/auth/login';
      const device = getDevice();
      let r;
      for (let attempt = 0; ; attempt++) {
        try {
          r = await request('POST', path, { body: { username, password }, token: getDevice()?.token });
          break;
        } catch (e) {
          if (!device || attempt >= 3) throw e;
          if (e.status === 409 && e.code === 'LINK_IN_PROGRESS') {
            // this device's or account's last write is still committing: ask again
            await new Promise((res) => setTimeout(res, Math.max(1, e.retryAfter ?? 1) * 1000));
            continue;
          }
          // linked to another account already, or a token the server no longer takes
          // (request() forgets that one): sign in without it
          if ((e.status === 409 && e.code === 'DEVICE_LINKED') || (e.status === 401 && e.code !== 'INVALID_CREDENTIALS')) {
            forgetDevice();
            continue;
          }
          throw e;
        }
      }
      setUser({ user_id: r.user_id, username, token: r.token, expires_at: r.expires_at });
      onDone?.(mergedText(r));
    } catch (err) {
      if (err.field === 'username' || err.code === 'USERNAME_TAKEN') { user.setError(errorText(err)); user.input.focus(); }
      else if (err.field === 'password') { pass.setError(errorText(err)); pass.input.focus(); }
      else status.set(errorText(err), 'error');
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

/**
 * What the server says it merged when it linked this browser's device to the account
 * (`linked`: the device's ballots and polls now the account's, the later of two ballots
 * in one poll retracted, closed polls where both stay), in words; null when there was
 * nothing to merge or no device to link.
 */
export function mergedText(r) {
  const m = r && typeof r.linked === 'object' && r.linked ? r.linked : null;
  if (!m || m.already_linked) return null;
  const count = (v) => (Array.isArray(v) ? v.length : (typeof v === 'number' ? v : 0));
  const polls = count(m.polls);
  const ballots = count(m.ballots);
  const retracted = count(m.retracted);
  const kept = count(m.kept_both);
  const parts = [];
  if (polls || ballots) parts.push(t('auth.merged', { polls: t('auth.n_polls', { n: polls }), ballots: t('auth.n_votes', { n: ballots }) }));
  if (retracted) parts.push(t('auth.merged_retracted', { n: retracted }));
  if (kept) parts.push(t('auth.merged_kept_both', { n: kept }));
  return parts.length ? parts.join(' ') : null;
}

/** Both forms side by side (stacked on phones). onDone(mergedMessage|null). */
export function authPanel(onDone, intro) {
  return h('section', { class: 'auth-panel', 'aria-label': t('auth.panel') },
    intro ? h('p', { text: intro }) : null,
    h('div', { class: 'auth-grid' }, authForm('register', onDone), authForm('login', onDone)));
}
