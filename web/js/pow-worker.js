// Module worker that solves a proof-of-work challenge off the page's main thread.
// Started from api.js as new Worker(<same-origin URL>, {type: 'module'}) (the CSP's
// script-src 'self' covers workers). Receives {challenge, difficulty}; posts back {nonce},
// or {error} when it cannot.
import { solve } from './pow.js';

self.addEventListener('message', async (e) => {
  const { challenge, difficulty } = e.data || {};
  try {
    const nonce = await solve(challenge, difficulty);
    self.postMessage({ nonce });
  } catch (err) {
    self.postMessage({ error: String(err?.message || err) });
  }
});
