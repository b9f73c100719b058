// /p/<id>/results: the results on their own (live while the poll is open, final once closed).
import { h, typeName } from './dom.js';
import { call, pollPath, ownerToken, identityToken } from './api.js';
import { createResults, connectResults } from './results.js';
import { pollError } from './poll.js';
import { t } from './i18n.js';

export async function render(main, { id }) {
  let poll;
  try { poll = await call('GET', pollPath(id)); } catch (e) { return pollError(main, e); }
  document.title = t('results.doc_title', { title: poll.title });
  const view = createResults(poll, { heading: 'h2' });
  main.append(
    h('p', { class: 'crumbs' }, h('a', { href: `/p/${id}`, 'data-link': '', text: t('results.back') })),
    h('h1', { class: 'poll-title', text: poll.title }),
    h('p', { class: 'meta', text: typeName(poll.type) }),
    view.el,
    h('p', { class: 'actions' },
      h('a', { class: 'button secondary', href: `/p/${id}/share`, 'data-link': '', text: t('poll.share') }),
      h('a', { class: 'button secondary', href: `/p/${id}/present`, 'data-link': '', text: t('poll.presenter') })));
  const sub = connectResults(poll, view, { token: () => ownerToken(poll) || identityToken() });
  return () => sub.close();
}
