// Sign up / log in forms. Errors from the server are shown next to the field they name.
import { h, field, statusLine } from './dom.js';
import { request, setUser } from './api.js';

const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;

function authForm(kind, onDone) {
  const isReg = kind === 'register';
  const user = field({
    label: 'Username',
    hint: isReg ? '3 to 32 letters, digits, “_”, “.” or “-”.' : null,
    input: h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true, maxlength: '32', autocapitalize: 'none', spellcheck: 'false' }),
  });
  const pass = field({
    label: 'Password',
    hint: isReg ? 'At least 8 characters.' : null,
    input: h('input', { type: 'password', name: 'password', autocomplete: isReg ? 'new-password' : 'current-password', required: true, maxlength: '1024' }),
  });
  const status = statusLine('alert', 'alert');
  const submit = h('button', { type: 'submit', class: 'primary', text: isReg ? 'Sign up' : 'Log in' });
  const form = h('form', { class: 'auth-form', novalidate: true, 'aria-label': isReg ? 'Sign up' : 'Log in' },
    h('h2', { text: isReg ? 'New here? Sign up' : 'Have an account? Log in' }),
    user.wrap, pass.wrap, status, h('div', { class: 'actions' }, submit));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    user.setError(null); pass.setError(null); status.set(null);
    const username = user.input.value.trim();
    const password = pass.input.value;
    let bad = false;
    if (isReg && !USERNAME_RE.test(username)) { user.setError('username must be 3 to 32 letters, digits, “_”, “.” or “-”'); bad = true; }
    if (!isReg && !username) { user.setError('Enter your username'); bad = true; }
    if (isReg && (password.length < 8 || password.length > 1024)) { pass.setError('password must be 8 to 1024 characters'); bad = true; }
    if (!isReg && !password) { pass.setError('Enter your password'); bad = true; }
    if (bad) { form.querySelector('[aria-invalid]')?.focus(); return; }
    submit.disabled = true;
    try {
      const r = await request('POST', isReg ? '/v1/auth/register' : '/v1/auth/login', { body: { username, password } });
      setUser({ user_id: r.user_id, username, token: r.token, expires_at: r.expires_at });
      onDone?.();
    } catch (err) {
      if (err.field === 'username' || err.code === 'USERNAME_TAKEN') { user.setError(err.message); user.input.focus(); }
      else if (err.field === 'password') { pass.setError(err.message); pass.input.focus(); }
      else status.set(err.message, 'error');
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

/** Both forms side by side (stacked on phones). */
export function authPanel(onDone, intro) {
  return h('section', { class: 'auth-panel', 'aria-label': 'Sign up or log in' },
    intro ? h('p', { text: intro }) : null,
    h('div', { class: 'auth-grid' }, authForm('register', onDone), authForm('login', onDone)));
}
