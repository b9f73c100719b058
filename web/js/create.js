// Home: create a poll. Client-side checks mirror the server's; the server's own errors
// (error.field) are shown next to the field they name.
import { h, field, newId, statusLine, busyStatus, localToIso, setFieldError, TYPE_NAMES } from './dom.js';
import { request, getUser, ensureDevice } from './api.js';
import { navigate } from './app.js';

const TYPE_HELP = {
  single: 'Voters pick exactly one option.',
  multiple: 'Voters pick several options (between the minimum and maximum).',
  approval: 'Voters approve every option they find acceptable.',
  ranked: 'Voters rank options in order; the winner is found by instant runoff.',
  score: 'Voters give each option a score from 0 to the maximum.',
};

const VIS = [
  ['always', 'Always: anyone can see the results'],
  ['after_vote', 'After voting: only those who voted (everyone once closed)'],
  ['after_close', 'After the poll closes'],
  ['owner_only', 'Only me'],
];

export function render(main) {
  document.title = 'Create a poll · tally';
  const user = getUser();
  const top = statusLine('alert', 'alert');

  // ---- title, description ----
  const title = field({ label: 'Question', input: h('input', { type: 'text', name: 'title', required: true, maxlength: '300', autocomplete: 'off', placeholder: 'What should we have for lunch?' }) });
  const desc = field({ label: 'Description (optional)', input: h('textarea', { name: 'description', rows: '2', maxlength: '5000' }) });

  // ---- type ----
  const typeName = newId('type');
  const typeError = h('p', { class: 'field-error', id: `${typeName}-err`, hidden: true });
  const typeFs = h('fieldset', { class: 'types', 'aria-describedby': typeError.id },
    h('legend', { text: 'Poll type' }),
    Object.entries(TYPE_NAMES).map(([val, name], i) => {
      const id = `${typeName}-${val}`;
      return h('div', { class: 'choice' },
        h('input', { type: 'radio', name: typeName, id, value: val, checked: i === 0 }),
        h('label', { for: id }, h('strong', { text: name }), h('span', { class: 'hint', text: TYPE_HELP[val] })));
    }), typeError);
  const typeValue = () => typeFs.querySelector('input:checked').value;

  // ---- options ----
  const optList = h('ol', { class: 'option-list' });
  const optError = h('p', { class: 'field-error', id: newId('opts-err'), hidden: true });
  const addBtn = h('button', { type: 'button', class: 'secondary', text: '+ Add option' });
  const optFs = h('fieldset', { class: 'options', 'aria-describedby': optError.id },
    h('legend', { text: 'Options' }),
    h('p', { class: 'hint', text: '2 to 100 options, each up to 200 characters and different from the others.' }),
    optList, optError, addBtn);

  function optionRows() { return [...optList.children]; }
  function renumber() {
    optionRows().forEach((li, i) => {
      const n = i + 1;
      li.querySelector('label').textContent = `Option ${n}`;
      li.querySelector('input').placeholder = `Option ${n}`;
      const label = li.querySelector('input').value.trim() || `option ${n}`;
      li.querySelector('.up').setAttribute('aria-label', `Move ${label} up`);
      li.querySelector('.down').setAttribute('aria-label', `Move ${label} down`);
      li.querySelector('.remove').setAttribute('aria-label', `Remove ${label}`);
      li.querySelector('.up').disabled = i === 0;
      li.querySelector('.down').disabled = i === optionRows().length - 1;
      li.querySelector('.remove').disabled = optionRows().length <= 2;
    });
    addBtn.disabled = optionRows().length >= 100;
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
        h('button', { type: 'button', class: 'icon secondary up', title: 'Move up', text: '↑', onclick: () => move(li, -1, 'up') }),
        h('button', { type: 'button', class: 'icon secondary down', title: 'Move down', text: '↓', onclick: () => move(li, 1, 'down') }),
        h('button', { type: 'button', class: 'icon secondary danger remove', title: 'Remove', text: '×', onclick: () => remove(li) })),
      err);
    li.setErr = (msg) => setFieldError(input, err, msg);
    input.addEventListener('input', () => { li.setErr(null); renumber(); });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { // Enter in an option adds the next one instead of submitting
        e.preventDefault();
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
  const vis = field({ label: 'Who can see the results', input: h('select', { name: 'results_visibility' }, VIS.map(([v, t]) => h('option', { value: v, text: t }))) });
  const during = checkbox('Show results while voting is open', true, 'When off, only you see counts until the poll closes.');
  const change = checkbox('Let voters change or retract their vote', false);
  const anon = checkbox('Allow anonymous voting (no account needed)', true, 'Voters without an account get a device token automatically.');
  const minC = field({ label: 'Minimum choices', hint: 'Empty: 1.', input: h('input', { type: 'number', name: 'min_choices', min: '1', max: '100', inputmode: 'numeric' }) });
  const maxC = field({ label: 'Maximum choices', hint: 'Empty: all options.', input: h('input', { type: 'number', name: 'max_choices', min: '1', max: '100', inputmode: 'numeric' }) });
  const maxS = field({ label: 'Maximum score', hint: 'Each option is scored from 0 to this (1 to 100).', input: h('input', { type: 'number', name: 'max_score', min: '1', max: '100', value: '5', inputmode: 'numeric' }) });
  const choicesBox = h('div', { class: 'grid2' }, minC.wrap, maxC.wrap);
  const start = field({ label: 'Opens at (optional)', hint: 'Your local time. Empty: now.', input: h('input', { type: 'datetime-local', name: 'start_time' }) });
  const end = field({ label: 'Closes at (optional)', hint: 'Your local time. Empty: when you close it.', input: h('input', { type: 'datetime-local', name: 'end_time' }) });
  const draft = checkbox('Save as a draft (only you can see it until you publish)', false);

  const settingsFs = h('fieldset', { class: 'settings' },
    h('legend', { text: 'Settings' }),
    vis.wrap, during.wrap, change.wrap, anon.wrap, choicesBox, maxS.wrap,
    h('div', { class: 'grid2' }, start.wrap, end.wrap), draft.wrap);

  function syncChoices() {
    const t = typeValue();
    choicesBox.hidden = t === 'single';
    maxS.wrap.hidden = t !== 'score';
    const n = optionRows().length;
    maxC.input.max = String(n);
    minC.input.max = String(n);
  }
  typeFs.addEventListener('change', () => { typeError.hidden = true; syncChoices(); });

  // ---- submit ----
  const submit = h('button', { type: 'submit', class: 'primary big', text: 'Create poll' });
  const preparing = busyStatus();
  const who = user
    ? h('p', { class: 'hint', text: `You are signed in as ${user.username}; the poll will be listed in My polls.` })
    : h('p', { class: 'hint' }, 'You are not signed in: the poll belongs to this browser. ',
      h('a', { href: '/mine', 'data-link': '', text: 'Sign up or log in' }), ' to manage your polls from any device.');
  const form = h('form', { class: 'create', novalidate: true, 'aria-labelledby': 'create-h1' },
    top, title.wrap, desc.wrap, typeFs, optFs, settingsFs, who, h('div', { class: 'actions' }, submit), preparing);

  const fieldMap = {
    title: title, description: desc,
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
  /** Shows msg next to the field the server (or our own check) named; false if unknown. */
  function showError(fieldName, msg) {
    const m = /^options\[(\d+)\](?:\.(\w+))?$/.exec(fieldName || '');
    if (m) {
      const li = optionRows()[Number(m[1])];
      if (li) { li.setErr(msg); return li.querySelector('input'); }
    }
    if (fieldName === 'options') { setFieldError(null, optError, msg); return optionRows()[0]?.querySelector('input'); }
    if (fieldName === 'type') { setFieldError(null, typeError, msg); return typeFs.querySelector('input:checked'); }
    const f = fieldMap[fieldName];
    if (f) { f.setError(msg); return f.input; }
    return null;
  }

  function buildBody() {
    const errors = [];
    const t = typeValue();
    const body = { title: title.input.value, type: t };
    if (!body.title.trim()) errors.push(['title', 'title must not be blank']);
    else if ([...body.title].length > 300) errors.push(['title', 'title must be at most 300 characters']);
    const d = desc.input.value;
    if (d.trim()) body.description = d;
    const texts = optionRows().map((li) => li.querySelector('input').value);
    const seen = new Map();
    texts.forEach((x, i) => {
      const k = x.trim();
      if (!k) errors.push([`options[${i}].text`, 'option text must not be blank']);
      else if ([...x].length > 200) errors.push([`options[${i}].text`, 'option text must be at most 200 characters']);
      else if (seen.has(k)) errors.push([`options[${i}].text`, `the same text as option ${seen.get(k) + 1}`]);
      else seen.set(k, i);
    });
    if (texts.length < 2) errors.push(['options', 'a poll needs at least 2 options']);
    body.options = texts.map((text, i) => ({ text: text.trim(), display_order: i }));
    const settings = {
      results_visibility: vis.input.value,
      show_results_during_voting: during.input.checked,
      allow_vote_change: change.input.checked,
      allow_anonymous: anon.input.checked,
    };
    const n = texts.length;
    if (t !== 'single') {
      const mn = minC.input.value === '' ? null : Number(minC.input.value);
      const mx = maxC.input.value === '' ? null : Number(maxC.input.value);
      if (mn !== null && (!Number.isInteger(mn) || mn < 1 || mn > n)) errors.push(['settings.min_choices', `min_choices must be between 1 and the number of options (${n})`]);
      else if (mn !== null) settings.min_choices = mn;
      if (mx !== null && (!Number.isInteger(mx) || mx < 1 || mx > n)) errors.push(['settings.max_choices', `max_choices must be between 1 and the number of options (${n})`]);
      else if (mx !== null) settings.max_choices = mx;
      if (settings.min_choices && settings.max_choices && settings.min_choices > settings.max_choices) errors.push(['settings.max_choices', 'max_choices must be at least min_choices']);
    }
    if (t === 'score') {
      const ms = Number(maxS.input.value);
      if (maxS.input.value === '' || !Number.isInteger(ms) || ms < 1 || ms > 100) errors.push(['settings.max_score', 'max_score must be an integer from 1 to 100']);
      else settings.max_score = ms;
    }
    body.settings = settings;
    const st = localToIso(start.input.value);
    const et = localToIso(end.input.value);
    if (st === undefined) errors.push(['start_time', 'not a valid time']);
    else if (st) body.start_time = st;
    if (et === undefined) errors.push(['end_time', 'not a valid time']);
    else if (et) {
      if (Date.parse(et) <= Date.now()) errors.push(['end_time', 'end_time must be in the future']);
      else if (st && Date.parse(et) <= Date.parse(st)) errors.push(['end_time', 'end_time must be after start_time']);
      body.end_time = et;
    }
    body.status = draft.input.checked ? 'draft' : 'active';
    return { body, errors };
  }

  let idemKey = null;
  let lastBody = null;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors();
    const { body, errors } = buildBody();
    if (errors.length) {
      let first = null;
      for (const [f, msg] of errors) first = first || showError(f, msg);
      top.set(errors.length === 1 ? 'Please fix the field marked below.' : `Please fix the ${errors.length} fields marked below.`, 'error');
      (first || top).focus();
      return;
    }
    // the same key for a retry of the same body, so a lost answer never creates two polls
    const bodyText = JSON.stringify(body);
    if (bodyText !== lastBody) { idemKey = crypto.randomUUID(); lastBody = bodyText; }
    submit.disabled = true;
    submit.textContent = 'Creating…';
    try {
      const token = getUser()?.token || (await ensureDevice({ onWork: () => preparing.busy('Preparing your anonymous device token…') })).token;
      preparing.busy(null);
      const poll = await request('POST', '/v1/polls', { body, token, headers: { 'Idempotency-Key': idemKey } });
      navigate(`/p/${poll.poll_id}/share`);
    } catch (err) {
      const el = showError(err.field, err.message);
      top.set(el ? 'The server refused the poll: see the field marked below.' : err.message, 'error');
      (el || top).focus();
    } finally {
      preparing.busy(null);
      submit.disabled = false;
      submit.textContent = 'Create poll';
    }
  });

  main.append(
    h('h1', { id: 'create-h1', text: 'Create a poll' }),
    h('p', { class: 'lead', text: 'Ask a question, share the link or QR code, and watch the votes come in live.' }),
    form);
  addOption('');
  addOption('');
  syncChoices();
  top.setAttribute('tabindex', '-1');
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
