// /p/<id>/results: live results on their own.
import { h, TYPE_NAMES } from './dom.js';
import { call, pollPath } from './api.js';
import { createResults, connectResults } from './results.js';
import { pollError } from './poll.js';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = `Results: ${poll.title} · tally`;
  const view = createResults(poll);
  main.append(
    h('p', { class: 'crumbs' }, h('a', { href: `/p/${id}`, 'data-link': '', text: '← Back to the poll' })),
    h('h1', { class: 'poll-title', text: poll.title }),
    h('p', { class: 'meta', text: `${TYPE_NAMES[poll.type] || poll.type} · live results` }),
    view.el,
    h('p', { class: 'actions' },
      h('a', { class: 'button secondary', href: `/p/${id}/share`, 'data-link': '', text: 'Share' }),
      h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: 'Presenter mode' })));
  const sub = connectResults(poll, view);
  return () => sub.close();
}
