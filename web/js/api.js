// The public HTTP API of tally, from the browser. Tokens live in localStorage:
//   tally.user   {user_id, username, token, expires_at}  (signed in)
//   tally.device {voter_id, token, expires_at}           (anonymous device token)
// Requests go to this origin only.
import { t, fmtWait } from './i18n.js';

const USER_KEY = 'tally.user';
const DEVICE_KEY = 'tally.device';
const RECEIPTS_KEY = 'tally.receipts';

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || t('err.http', { status }));
    this.status = status;
    this.code = e.code || (status === 0 ? 'NETWORK' : 'HTTP_' + status);
    this.field = e.field;
    this.detail = e;
  }
}

function load(key) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    if (v && v.token && (!v.expires_at || Date.parse(v.expires_at) > Date.now() + 30_000)) return v;
  } catch { /* corrupt or unavailable */ }
  return null;
}
function save(key, v) {
  try {
    if (v) localStorage.setItem(key, JSON.stringify(v));
    else localStorage.removeItem(key);
  } catch { /* private mode: tokens last for this page only */ }
  window.dispatchEvent(new CustomEvent('tally:auth'));
}

export const getUser = () => load(USER_KEY);
export const setUser = (u) => save(USER_KEY, u);
export const getDevice = () => load(DEVICE_KEY);
const setDevice = (d) => save(DEVICE_KEY, d);
/** Forgets this browser's device token: once linked to an account it acts as that account,
 *  so signing out must not leave it behind (a shared computer). */
export const forgetDevice = () => setDevice(null);

/** The token that identifies this browser: the account if signed in, else the device. */
export function identityToken() {
  return getUser()?.token || getDevice()?.token || null;
}

/**
 * A device token for anonymous voting, obtained once and kept. It costs a proof of work:
 * POST /v1/auth/challenge, solve it in a Web Worker (when its difficulty is above 0), then
 * POST /v1/auth/anonymous with the answer; a refused answer (403 POW_FAILED: the challenge
 * expired or was used meanwhile) is retried once with a new challenge.
 * opts.onWork() is called when the work starts (for a "preparing…" status).
 */
let devicePending = null;
export function ensureDevice(opts = {}) {
  const d = getDevice();
  if (d) return Promise.resolve(d);
  if (!devicePending) {
    devicePending = newDevice(opts).finally(() => { devicePending = null; });
  } else {
    opts.onWork?.(); // already under way for another caller
  }
  return devicePending;
}

async function newDevice({ onWork } = {}) {
  for (let attempt = 1; ; attempt++) {
    let ch;
    try {
      ch = await request('POST', '/v1/auth/challenge');
    } catch (e) {
      // a server from before proofs of work: tokens are free there
      if (e.status !== 404 && e.status !== 405) throw e;
      ch = { difficulty: 0 };
    }
    const body = {};
    if (ch.challenge) body.challenge = ch.challenge;
    if (ch.difficulty > 0) {
      if (ch.algorithm && ch.algorithm !== 'sha256-leading-zero-bits') throw powError(new Error(`unknown algorithm ${ch.algorithm}`));
      onWork?.();
      body.nonce = await solvePow(ch.challenge, ch.difficulty);
    }
    try {
      const r = await request('POST', '/v1/auth/anonymous', { body });
      setDevice(r);
      return r;
    } catch (e) {
      if (e.code === 'POW_FAILED' && attempt < 2) continue;
      if (e.code === 'POW_FAILED') e.message = t('err.pow_failed');
      throw e;
    }
  }
}

/**
 * Solves a challenge in a module Web Worker (on the page only if no worker can start);
 * resolves with the nonce. Exported for tests that drive the app's own steps one at a
 * time (tests/e2e/room.test.mjs: a room's phones solve side by side).
 */
export function solvePow(challenge, difficulty) {
  return new Promise((resolve, reject) => {
    let worker;
    let settled = false;
    const finish = (fn, v) => {
      if (settled) return;
      settled = true;
      worker?.terminate();
      fn(v);
    };
    const onPage = () => {
      worker?.terminate();
      worker = null;
      import('./pow.js').then((m) => m.solve(challenge, difficulty))
        .then((nonce) => finish(resolve, nonce), (e) => finish(reject, powError(e)));
    };
    try {
      worker = new Worker(new URL('./pow-worker.js', import.meta.url), { type: 'module', name: 'tally-pow' });
    } catch {
      onPage();
      return;
    }
    worker.addEventListener('message', (e) => {
      if (typeof e.data?.nonce === 'string') finish(resolve, e.data.nonce);
      else finish(reject, powError(new Error(e.data?.error || 'no answer')));
    });
    worker.addEventListener('error', (e) => { e.preventDefault(); if (!settled) onPage(); });
    worker.postMessage({ challenge, difficulty });
  });
}

function powError(e) {
  return new ApiError(0, { error: { code: 'POW_UNSOLVED', message: t('err.pow_unsolved', { why: e?.message || String(e) }) } });
}

/**
 * One JSON request. Resolves with the parsed body (null for 204); rejects with ApiError.
 * opts: {body, token, headers, raw: true to get the Response}
 */
export async function request(method, path, opts = {}) {
  const headers = { Accept: 'application/json', ...(opts.headers || {}) };
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  let body;
  if (opts.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body, cache: 'no-store', credentials: 'omit' });
  } catch (e) {
    throw new ApiError(0, { error: { code: 'NETWORK', message: t('err.network') } });
  }
  if (res.status === 401 && opts.token) forgetToken(opts.token);
  if (opts.raw && res.ok) return res;
  if (res.status === 204) return null;
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!res.ok) {
    const err = new ApiError(res.status, json);
    if (res.status === 429) {
      // the wait in words a person uses ("in about 12 minutes"), not the seconds of Retry-After
      const wait = Number(res.headers.get('Retry-After'));
      err.retryAfter = Number.isFinite(wait) && wait >= 0 ? wait : null;
      err.message = t('err.rate_limited', { wait: fmtWait(err.retryAfter ?? 60) });
    }
    throw err;
  }
  return json;
}

/** A token the server no longer accepts (expired, new secret) is dropped. */
function forgetToken(token) {
  if (getUser()?.token === token) setUser(null);
  if (getDevice()?.token === token) setDevice(null);
}

/** Like request() with the identity token (if any). */
export const call = (method, path, opts = {}) => request(method, path, { token: identityToken(), ...opts });

export const pollPath = (id, rest = '') => `/v1/polls/${encodeURIComponent(id)}${rest}`;

// ---- receipts of this browser's ballots (the server gives them only once) ----
export function getReceipt(pollId) {
  try { return (JSON.parse(localStorage.getItem(RECEIPTS_KEY)) || {})[pollId] || null; } catch { return null; }
}
export function setReceipt(pollId, r) {
  try {
    const all = JSON.parse(localStorage.getItem(RECEIPTS_KEY)) || {};
    if (r) all[pollId] = r; else delete all[pollId];
    localStorage.setItem(RECEIPTS_KEY, JSON.stringify(all));
  } catch { /* ignore */ }
}

/** Fetches a file with the Authorization header and saves it through a Blob URL. */
export async function download(path, filename, token = identityToken()) {
  const res = await request('GET', path, { token, raw: true, headers: { Accept: '*/*' } });
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** The poll's QR code as a data: URL (fetched with the token, so drafts work too). */
export async function qrDataUrl(pollId, token = identityToken()) {
  const res = await request('GET', pollPath(pollId, '/qr.svg'), { token, raw: true, headers: { Accept: 'image/svg+xml' } });
  const svg = await res.text();
  return 'data:image/svg+xml;base64,' + btoa(unescape(encodeURIComponent(svg)));
}

export const shareUrl = (pollId) => `${location.origin}/p/${encodeURIComponent(pollId)}`;

/** The address a room types: /j/<code> when the poll has a join code. */
export const joinUrl = (code) => `${location.origin}/j/${encodeURIComponent(code)}`;

/**
 * The token of the identity in this browser that owns the poll (the account, or the
 * anonymous device that created it), or null when neither does.
 */
export function ownerToken(poll) {
  const u = getUser();
  if (u && u.user_id === poll.owner_id) return u.token;
  const d = getDevice();
  if (d && d.voter_id === poll.owner_id) return d.token;
  return null;
}

/**
 * Live results over Server-Sent Events, reconnecting by itself.
 * handlers: {onResults(data), onClosed(), onDeleted(), onState('live'|'reconnecting'),
 *            token() → the token to watch with (default: this browser's identity)}
 * Returns {close(), reopen()} (reopen picks up a new token, e.g. after voting).
 */
export function subscribeLive(pollId, handlers) {
  let es = null;
  let stopped = false;
  let timer = null;
  let delay = 1000;
  const open = () => {
    clearTimeout(timer);
    timer = null;
    if (es) es.close();
    const tok = handlers.token ? handlers.token() : identityToken();
    const url = pollPath(pollId, '/live') + (tok ? `?access_token=${encodeURIComponent(tok)}` : '');
    const src = new EventSource(url);
    es = src;
    src.addEventListener('open', () => { delay = 1000; handlers.onState?.('live'); });
    src.addEventListener('results', (e) => {
      let data;
      try { data = JSON.parse(e.data); } catch { return; }
      handlers.onResults?.(data);
    });
    src.addEventListener('closed', () => {
      stopped = true;
      src.close();
      handlers.onClosed?.();
    });
    src.addEventListener('deleted', () => {
      stopped = true;
      src.close();
      handlers.onDeleted?.();
    });
    src.addEventListener('error', () => {
      if (stopped || es !== src) return;
      handlers.onState?.('reconnecting');
      // EventSource retries network errors itself; when it gives up (CLOSED: an HTTP
      // error such as 503 during a restart) we reopen after a growing delay.
      if (src.readyState === EventSource.CLOSED && !timer) {
        timer = setTimeout(open, delay);
        delay = Math.min(delay * 2, 15_000);
      }
    });
  };
  open();
  return {
    close() { stopped = true; clearTimeout(timer); if (es) es.close(); },
    reopen() { if (!stopped) open(); },
  };
}
