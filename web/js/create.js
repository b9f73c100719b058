// One poll form for three pages: create (/), ask again (/?copy=<poll_id>: a new poll that
// starts from another's question and options, since a closed poll cannot be reopened) and
// edit (/p/<id>/edit: PATCH with only the fields that changed). The form checks every
// field before sending and marks all that are wrong at once, in words (never API field
// names), with a summary that links to each; the server's own refusals are put next to
// the field they name. What the contract does not let change is shown locked, with why.
import { h, field, newId, statusLine, busyStatus, localToIso, isoToLocal, setFieldError, typeName } from './dom.js';
import { request, getUser, getDevice, ensureDevice, pollPath, ownerToken, identityToken } from './api.js';
import { navigate, flash } from './app.js';
import { t, tn, errorText } from './i18n.js';

const TYPES = ['single', 'multiple', 'approval', 'ranked', 'score'];
const VIS = ['always', 'after_vote', 'after_close', 'owner_only'];

/** How the server compares option texts: case folded, NFC, spaces collapsed, invisibles gone. */
const sameKey = (s) => s.normalize('NFC').replace(/\p{Cf}/gu, '').replace(/\s+/gu, ' ').trim().toLowerCase();

export async function render(main) {
  document.title = t('create.doc_title');
  const copyId = new URLSearchParams(location.search).get('copy');
  let source = null;
  if (copyId) {
    try { source = await request('GET', pollPath(copyId), { token: identityToken() }); } catch { /* gone: start empty */ }
  }
  main.append(
    h('h1', { id: 'create-h1', text: t('create.heading') }),
    h('p', { class: 'lead', text: source ? t('create.lead_copy', { title: source.title }) : t('create.lead') }));
  const form = pollForm({ mode: 'create', source });
  main.append(form.el);
}

export async function renderEdit(main, { id }) {
  // a draft is visible to its owner only: ask as the account, then as this browser's device
  let poll = null;
  let err = null;
  for (const tok of [getUser()?.token, getDevice()?.token, null]) {
    try { poll = await request('GET', pollPath(id), { token: tok || undefined }); break; } catch (e) { err = e; }
  }
  if (!poll) {
    const { pollError } = await import('./poll.js');
    return pollError(main, err);
  }
  document.title = t('edit.doc_title', { title: poll.title });
  const token = ownerToken(poll);
  main.append(h('p', { class: 'crumbs' }, h('a', { href: `/p/${id}`, 'data-link': '', text: t('results.back') })),
    h('h1', { id: 'create-h1', text: t('edit.heading') }));
  if (!token) {
    main.append(h('p', { class: 'alert is-error', role: 'alert', text: t('edit.not_owner') }));
    return;
  }
  // options and choice limits cannot change once a ballot exists: ask the results
  let votes = null;
  try { votes = (await request('GET', pollPath(id, '/results'), { token })).total_votes ?? null; } catch { /* unknown: the server says on save */ }
  const form = pollForm({ mode: 'edit', source: poll, token, votes });
  main.append(form.el);
}

/**
 * The form. mode 'create' | 'edit'; source: a poll to start from; token: the owner's
 * (edit); votes: how many ballots the poll has (edit; null when unknown).
 */
function pollForm({ mode, source, token, votes }) {
  const edit = mode === 'edit';
  const closed = edit && source.status === 'closed';
  const locked = { options: null, limits: null, times: null };
  const top = statusLine('alert', 'alert');
  top.setAttribute('tabindex', '-1');
  const s0 = source?.settings || {};

  // ---- title, description ----
  const title = field({ label: t('form.question'), input: h('input', { type: 'text', name: 'title', required: true, maxlength: '300', autocomplete: 'off', placeholder: t('form.question_ph'), value: source?.title || '' }) });
  const desc = field({ label: t('form.description'), input: h('textarea', { name: 'description', rows: '2', maxlength: '5000' }) });
  desc.input.value = source?.description || '';

  // ---- type ----
  const typeName0 = newId('type');
  const typeError = h('p', { class: 'field-error', id: `${typeName0}-err`, hidden: true });
  const startType = TYPES.includes(source?.type) ? source.type : 'single';
  const typeFs = h('fieldset', { class: 'types', 'aria-describedby': typeError.id },
    h('legend', { text: t('form.type') }),
    edit ? h('p', { class: 'locked-note', text: t('edit.type_fixed') }) : null,
    TYPES.map((val) => {
      const id = `${typeName0}-${val}`;
      return h('div', { class: 'choice' },
        h('input', { type: 'radio', name: typeName0, id, value: val, checked: val === startType, disabled: edit }),
        h('label', { for: id }, h('strong', { text: typeName(val) }), h('span', { class: 'hint', text: t(`type_help.${val}`) })));
    }), typeError);
  const typeValue = () => typeFs.querySelector('input:checked').value;

  // ---- options ----
  const optList = h('ol', { class: 'option-list' });
  const optError = h('p', { class: 'field-error', id: newId('opts-err'), hidden: true });
  const optNote = h('p', { class: 'locked-note', hidden: true });
  const addBtn = h('button', { type: 'button', class: 'secondary add-option', text: t('form.add_option') });
  const optFs = h('fieldset', { class: 'options', 'aria-describedby': optError.id },
    h('legend', { text: t('form.options') }),
    h('p', { class: 'hint', text: t('form.options_hint') }),
    optNote, optList, optError, addBtn);

  const optionRows = () => [...optList.children];
  function renumber() {
    const rows = optionRows();
    rows.forEach((li, i) => {
      const n = i + 1;
      const input = li.querySelector('input');
      li.querySelector('label').textContent = t('form.option_n', { i: n });
      input.placeholder = t('form.option_n', { i: n });
      const label = input.value.trim() || t('form.option_n', { i: n });
      li.querySelector('.up').setAttribute('aria-label', t('common.move_x_up', { x: label }));
      li.querySelector('.down').setAttribute('aria-label', t('common.move_x_down', { x: label }));
      li.querySelector('.remove').setAttribute('aria-label', t('form.remove_x', { x: label }));
      li.querySelector('.up').disabled = i === 0;
      li.querySelector('.down').disabled = i === rows.length - 1;
      li.querySelector('.remove').disabled = rows.length <= 2;
    });
    addBtn.disabled = rows.length >= 100;
    syncChoices();
  }
  function addOption(text = '', focus = false) {
    const id = newId('opt');
    const input = h('input', { type: 'text', id, maxlength: '200', autocomplete: 'off', value: text, 'aria-describedby': `${id}-err` });
    const err = h('p', { class: 'field-error', id: `${id}-err`, hidden: true });
    const li = h('li', { class: 'option-row' },
      h('div', { class: 'option-main' },
        h('label', { for: id, class: 'sr-only' }),
        input,
        h('button', { type: 'button', class: 'icon secondary up', title: t('common.move_up'), text: '↑', onclick: () => move(li, -1, 'up') }),
        h('button', { type: 'button', class: 'icon secondary down', title: t('common.move_down'), text: '↓', onclick: () => move(li, 1, 'down') }),
        h('button', { type: 'button', class: 'icon secondary danger remove', title: t('form.remove'), text: '×', onclick: () => remove(li) })),
      err);
    li.setErr = (msg) => setFieldError(input, err, msg);
    input.addEventListener('input', () => { li.setErr(null); renumber(); });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { // Enter in an option adds the next one instead of submitting
        e.preventDefault();
        if (locked.options) return;
        const rows = optionRows();
        if (rows[rows.length - 1] === li) addOption('', true);
        else rows[rows.indexOf(li) + 1].querySelector('input').focus();
      }
    });
    optList.append(li);
    renumber();
    if (focus) input.focus();
    return li;
  }
  function move(li, dir, cls) {
    const rows = optionRows();
    const i = rows.indexOf(li);
    const j = i + dir;
    if (j < 0 || j >= rows.length) return;
    if (dir < 0) optList.insertBefore(li, rows[j]);
    else optList.insertBefore(rows[j], li);
    renumber();
    const btn = li.querySelector(`.${cls}`);
    (btn.disabled ? li.querySelector('input') : btn).focus();
  }
  function remove(li) {
    const rows = optionRows();
    if (rows.length <= 2) return;
    const i = rows.indexOf(li);
    li.remove();
    renumber();
    const next = optionRows()[Math.min(i, optionRows().length - 1)];
    next.querySelector('input').focus();
  }
  addBtn.addEventListener('click', () => addOption('', true));

  // ---- settings ----
  const vis = field({ label: t('form.visibility'), input: h('select', { name: 'results_visibility' }, VIS.map((v) => h('option', { value: v, text: t(`vis.${v}`) }))) });
  vis.input.value = VIS.includes(s0.results_visibility) ? s0.results_visibility : 'always';
  const during = checkbox(t('form.during'), s0.show_results_during_voting ?? true, t('form.during_hint'));
  const change = checkbox(t('form.change'), s0.allow_vote_change ?? false);
  const anon = checkbox(t('form.anon'), s0.allow_anonymous ?? true, t('form.anon_hint'));
  const nOpts0 = source?.options?.length || 0;
  // an unset limit reads as the default: min 1, max every option
  const minStart = source && source.type !== 'single' && s0.min_choices > 1 ? String(s0.min_choices) : '';
  const maxStart = source && source.type !== 'single' && s0.max_choices && s0.max_choices < nOpts0 ? String(s0.max_choices) : '';
  const minC = field({ label: t('form.min'), hint: t('form.min_hint'), input: h('input', { type: 'number', name: 'min_choices', min: '1', max: '100', inputmode: 'numeric', value: minStart }) });
  const maxC = field({ label: t('form.max'), hint: t('form.max_hint'), input: h('input', { type: 'number', name: 'max_choices', min: '1', max: '100', inputmode: 'numeric', value: maxStart }) });
  const maxS = field({ label: t('form.max_score'), hint: t('form.max_score_hint'), input: h('input', { type: 'number', name: 'max_score', min: '1', max: '100', value: String(s0.max_score || 5), inputmode: 'numeric' }) });
  const limitsNote = h('p', { class: 'locked-note', hidden: true });
  const choicesBox = h('div', { class: 'grid2' }, minC.wrap, maxC.wrap);
  const start = field({ label: t('form.start'), hint: t('form.start_hint'), input: h('input', { type: 'datetime-local', name: 'start_time', value: edit ? isoToLocal(source.start_time) : '' }) });
  const end = field({ label: t('form.end'), hint: t('form.end_hint'), input: h('input', { type: 'datetime-local', name: 'end_time', value: edit ? isoToLocal(source.end_time) : '' }) });
  const timesNote = h('p', { class: 'locked-note', hidden: true });
  const draft = checkbox(edit ? t('edit.keep_draft') : t('form.draft'), edit && source.status === 'draft');
  draft.wrap.hidden = edit && source.status !== 'draft';

  const settingsFs = h('fieldset', { class: 'settings' },
    h('legend', { text: t('form.settings') }),
    vis.wrap, during.wrap, change.wrap, anon.wrap, limitsNote, choicesBox, maxS.wrap,
    timesNote, h('div', { class: 'grid2' }, start.wrap, end.wrap), draft.wrap);

  function syncChoices() {
    const ty = typeValue();
    choicesBox.hidden = ty === 'single';
    maxS.wrap.hidden = ty !== 'score';
    const n = optionRows().length;
    maxC.input.max = String(n);
    minC.input.max = String(n);
  }
  typeFs.addEventListener('change', () => { typeError.hidden = true; syncChoices(); });

  /** Options and limits read-only, with the reason (a ballot exists; the poll is closed). */
  function lockOptions(reason) {
    locked.options = reason;
    optNote.textContent = reason;
    optNote.hidden = false;
    for (const li of optionRows()) {
      li.querySelector('input').readOnly = true;
      for (const b of li.querySelectorAll('button')) b.hidden = true;
    }
    addBtn.hidden = true;
  }
  function lockLimits(reason) {
    locked.limits = reason;
    limitsNote.textContent = reason;
    limitsNote.hidden = false;
    for (const f of [minC, maxC, maxS]) f.input.disabled = true;
  }
  function lockTimes(reason) {
    locked.times = reason;
    timesNote.textContent = reason;
    timesNote.hidden = false;
    start.input.disabled = true;
    end.input.disabled = true;
  }

  // ---- submit ----
  const submitText = edit ? t('edit.save') : t('form.create');
  const submit = h('button', { type: 'submit', class: 'primary big', text: submitText });
  const preparing = busyStatus();
  const user = getUser();
  let who = null;
  if (!edit) {
    who = user
      ? h('p', { class: 'hint', text: t('create.signed_in', { name: user.username }) })
      : h('p', { class: 'hint' }, ...tn('create.anonymous', { link: h('a', { href: '/mine', 'data-link': '', text: t('create.sign_in_link') }) }));
  }
  const actions = h('div', { class: 'actions' }, submit,
    edit ? h('a', { class: 'button secondary', href: `/p/${source.poll_id}`, 'data-link': '', text: t('common.cancel') }) : null);
  const form = h('form', { class: 'create', novalidate: true, 'aria-labelledby': 'create-h1' },
    top, title.wrap, desc.wrap, typeFs, optFs, settingsFs, who, actions, preparing);

  const fieldMap = {
    title, description: desc,
    'settings.results_visibility': vis, 'settings.min_choices': minC, 'settings.max_choices': maxC,
    'settings.max_score': maxS, start_time: start, end_time: end,
    'settings.allow_vote_change': change, 'settings.allow_anonymous': anon,
    'settings.show_results_during_voting': during,
  };
  function clearErrors() {
    top.set(null);
    for (const f of Object.values(fieldMap)) f.setError(null);
    optionRows().forEach((li) => li.setErr(null));
    setFieldError(null, optError, null);
    setFieldError(null, typeError, null);
  }
  /** Shows msg next to the field named (API name); returns the element to focus, or null. */
  function showError(fieldName, msg) {
    const m = /^options\[(\d+)\](?:\.(\w+))?$/.exec(fieldName || '');
    if (m) {
      const li = optionRows()[Number(m[1])];
      if (li) { li.setErr(msg); return li.querySelector('input'); }
    }
    if (fieldName === 'options') { setFieldError(null, optError, msg); return optionRows()[0]?.querySelector('input'); }
    if (fieldName === 'type') { setFieldError(null, typeError, msg); return typeFs.querySelector('input:checked'); }
    const f = fieldMap[fieldName] || fieldMap[`settings.${fieldName}`];
    if (f) { f.setError(msg); return f.input; }
    return null;
  }
  /** The alert above the form: how many fields to fix, each a link that focuses it. */
  function summarize(list) {
    top.set(null);
    top.classList.add('is-error');
    top.hidden = false;
    top.replaceChildren(h('strong', { text: t('form.summary', { n: list.length }) }),
      h('ul', { class: 'error-list' }, list.map(([el, msg]) => h('li', {}, el
        ? h('a', { href: `#${el.id}`, onclick: (e) => { e.preventDefault(); el.focus(); }, text: msg })
        : msg))));
  }

  /** The body to send, and every problem found ([apiField, message]). */
  function buildBody() {
    const errors = [];
    const ty = typeValue();
    const body = { title: title.input.value.trim(), type: ty };
    const titleLen = [...body.title].length;
    if (!body.title || !/[^\p{Cf}\s]/u.test(body.title)) errors.push(['title', t('form.err.title_blank')]);
    else if (titleLen > 300) errors.push(['title', t('form.err.title_long', { n: titleLen })]);
    const d = desc.input.value;
    body.description = d.trim() ? d : null;
    const texts = optionRows().map((li) => li.querySelector('input').value);
    const seen = new Map();
    texts.forEach((x, i) => {
      const k = sameKey(x);
      const len = [...x.trim()].length;
      if (!k) errors.push([`options[${i}].text`, t('form.err.option_blank', { i: i + 1 })]);
      else if (len > 200) errors.push([`options[${i}].text`, t('form.err.option_long', { i: i + 1, n: len })]);
      else if (seen.has(k)) errors.push([`options[${i}].text`, t('form.err.option_dup', { i: i + 1, j: seen.get(k) + 1 })]);
      else seen.set(k, i);
    });
    if (texts.length < 2) errors.push(['options', t('form.err.too_few')]);
    body.options = texts.map((text, i) => ({ text: text.trim(), display_order: i }));
    const settings = {
      results_visibility: vis.input.value,
      show_results_during_voting: during.input.checked,
      allow_vote_change: change.input.checked,
      allow_anonymous: anon.input.checked,
    };
    const n = texts.length;
    if (ty !== 'single' && !locked.limits) {
      const mn = minC.input.value === '' ? null : Number(minC.input.value);
      const mx = maxC.input.value === '' ? null : Number(maxC.input.value);
      const minOk = mn === null || (Number.isInteger(mn) && mn >= 1 && mn <= n);
      const maxOk = mx === null || (Number.isInteger(mx) && mx >= 1 && mx <= n);
      if (!minOk) errors.push(['settings.min_choices', t('form.err.min_range', { n })]);
      if (!maxOk) errors.push(['settings.max_choices', t('form.err.max_range', { n })]);
      if (minOk && maxOk && mn !== null && mx !== null && mn > mx) errors.push(['settings.max_choices', t('form.err.max_below_min', { min: mn })]);
      settings.min_choices = mn ?? 1;
      settings.max_choices = mx ?? n;
    }
    if (ty === 'score' && !locked.limits) {
      const ms = Number(maxS.input.value);
      if (maxS.input.value === '' || !Number.isInteger(ms) || ms < 1 || ms > 100) errors.push(['settings.max_score', t('form.err.max_score')]);
      else settings.max_score = ms;
    }
    body.settings = settings;
    if (!locked.times) {
      const st = localToIso(start.input.value);
      const et = localToIso(end.input.value);
      const startInvalid = st === undefined || (start.input.validity && start.input.validity.badInput);
      const endInvalid = et === undefined || (end.input.validity && end.input.validity.badInput);
      if (startInvalid) errors.push(['start_time', t('form.err.time_invalid')]);
      body.start_time = st || null;
      if (endInvalid) errors.push(['end_time', t('form.err.time_invalid')]);
      else if (et) {
        const unchanged = edit && source.end_time && Date.parse(source.end_time) === Date.parse(et);
        if (!unchanged && Date.parse(et) <= Date.now()) errors.push(['end_time', t('form.err.end_past')]);
        else if (st && Date.parse(et) <= Date.parse(st)) errors.push(['end_time', t('form.err.end_before_start')]);
      }
      body.end_time = et || null;
    }
    body.status = draft.input.checked ? 'draft' : 'active';
    return { body, errors };
  }

  /** Edit: only what changed (options are replaced wholesale, so only when they changed). */
  function diff(body) {
    const out = {};
    if (body.title !== source.title) out.title = body.title;
    if ((body.description || null) !== (source.description || null)) out.description = body.description;
    const oldTexts = source.options.map((o) => o.text);
    const newTexts = body.options.map((o) => o.text);
    const optionsChanged = !locked.options && JSON.stringify(oldTexts) !== JSON.stringify(newTexts);
    if (optionsChanged) out.options = body.options;
    const settings = {};
    for (const [k, v] of Object.entries(body.settings)) {
      if (locked.limits && (k === 'min_choices' || k === 'max_choices' || k === 'max_score')) continue;
      if (s0[k] !== v) settings[k] = v;
    }
    if (Object.keys(settings).length) out.settings = settings;
    if (!locked.times) {
      const same = (a, b) => (a ? Date.parse(a) : null) === (b ? Date.parse(b) : null);
      if (!same(body.start_time, source.start_time)) out.start_time = body.start_time;
      if (!same(body.end_time, source.end_time)) out.end_time = body.end_time;
    }
    if (source.status === 'draft' && body.status === 'active') out.status = 'active';
    return out;
  }

  let idemKey = null;
  let lastBody = null;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors();
    const { body, errors } = buildBody();
    if (errors.length) {
      const marked = errors.map(([f, msg]) => [showError(f, msg), msg]);
      summarize(marked);
      top.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = edit ? t('edit.saving') : t('form.creating');
    try {
      if (edit) {
        const change = diff(body);
        if (Object.keys(change).length) await request('PATCH', pollPath(source.poll_id), { token, body: change });
        flash(Object.keys(change).length ? t('edit.saved') : t('edit.nothing'));
        navigate(`/p/${source.poll_id}`);
        return;
      }
      if (!body.description) delete body.description;
      if (!body.start_time) delete body.start_time;
      if (!body.end_time) delete body.end_time;
      // the same key for a retry of the same body, so a lost answer never creates two polls
      const bodyText = JSON.stringify(body);
      if (bodyText !== lastBody) { idemKey = crypto.randomUUID(); lastBody = bodyText; }
      const tok = getUser()?.token || (await ensureDevice({ onWork: () => preparing.busy(t('create.preparing')) })).token;
      preparing.busy(null);
      const poll = await request('POST', '/v1/polls', { body, token: tok, headers: { 'Idempotency-Key': idemKey } });
      navigate(`/p/${poll.poll_id}/share`);
    } catch (err) {
      if (err.code === 'POLL_HAS_VOTES') {
        lockOptions(t('edit.locked_votes_unknown'));
        lockLimits(t('edit.locked_limits'));
      }
      const msg = errorText(err);
      const el = showError(err.field, msg);
      if (el) summarize([[el, msg]]);
      else top.set(msg, 'error');
      top.focus();
    } finally {
      preparing.busy(null);
      submit.disabled = false;
      submit.textContent = submitText;
    }
  });

  const startOptions = source?.options?.length ? source.options.map((o) => o.text) : ['', ''];
  for (const text of startOptions) addOption(text);
  if (edit) {
    if (closed) {
      lockOptions(t('edit.locked_closed'));
      lockTimes(t('edit.times_closed'));
    } else if (votes > 0) {
      lockOptions(t('edit.locked_votes', { n: votes }));
      lockLimits(t('edit.locked_limits'));
    }
  }
  syncChoices();
  return { el: form };
}

function checkbox(label, checked, hint) {
  const id = newId('cb');
  const input = h('input', { type: 'checkbox', id, checked });
  const err = h('p', { class: 'field-error', id: `${id}-err`, hidden: true });
  const hintEl = hint ? h('span', { class: 'hint', id: `${id}-hint`, text: hint }) : null;
  input.setAttribute('aria-describedby', [hintEl ? `${id}-hint` : null, `${id}-err`].filter(Boolean).join(' '));
  const wrap = h('div', { class: 'field check' }, input, h('label', { for: id }, label, hintEl ? h('br') : null, hintEl), err);
  return { wrap, input, setError: (m) => setFieldError(input, err, m) };
}
