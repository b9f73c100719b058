// The proof of work an anonymous device token costs: find a nonce such that
// SHA-256(UTF-8(challenge + ":" + nonce)) starts with `difficulty` zero bits
// (algorithm "sha256-leading-zero-bits" of POST /v1/auth/challenge).
// Used by the Web Worker in pow-worker.js, and on the page itself only where a module
// worker cannot start.

export const ALGORITHM = 'sha256-leading-zero-bits';

/** Leading zero bits of a digest. */
export function zeroBits(bytes) {
  let bits = 0;
  for (const b of bytes) {
    if (b === 0) { bits += 8; continue; }
    return bits + Math.clz32(b) - 24;
  }
  return bits;
}

/**
 * Tries the nonces 0, 1, 2, … (base 36) until one solves the challenge; resolves with it.
 * `batch` digests are started together and awaited once (crypto.subtle.digest is
 * asynchronous: one await per hash would spend most of the time in the event loop).
 */
export async function solve(challenge, difficulty, { batch = 4096, start = 0 } = {}) {
  if (typeof challenge !== 'string' || !challenge) throw new Error('no challenge to solve');
  difficulty = Number(difficulty);
  if (!Number.isInteger(difficulty) || difficulty < 0 || difficulty > 64) throw new Error(`unsupported difficulty ${difficulty}`);
  if (!globalThis.crypto?.subtle) throw new Error('this browser offers no SHA-256 here (crypto.subtle needs HTTPS)');
  const prefix = new TextEncoder().encode(challenge + ':');
  for (let n = start; ; n += batch) {
    const pending = new Array(batch);
    for (let i = 0; i < batch; i++) {
      const nonce = (n + i).toString(36); // ASCII, so one byte per character
      const buf = new Uint8Array(prefix.length + nonce.length);
      buf.set(prefix);
      for (let j = 0; j < nonce.length; j++) buf[prefix.length + j] = nonce.charCodeAt(j);
      pending[i] = crypto.subtle.digest('SHA-256', buf);
    }
    const digests = await Promise.all(pending);
    for (let i = 0; i < batch; i++) {
      if (zeroBits(new Uint8Array(digests[i])) >= difficulty) return (n + i).toString(36);
    }
  }
}
