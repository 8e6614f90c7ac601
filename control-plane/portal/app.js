// The Shoal admin portal: a single page that calls the REST API (/v1) with the bearer token
// the user logged in with (kept in sessionStorage, gone when the tab closes). The API decides
// what each role may do; the portal hides write controls from auditors and shows owners only
// their account because the API lists nothing else.

import { lineChart } from './chart.js';

const TOKEN_KEY = 'shoal.portal.token';
const session = { token: sessionStorage.getItem(TOKEN_KEY), me: null, accounts: new Map() };

// ---------------------------------------------------------------- DOM helpers

/** h('tag.class', {attr: v, onclick: f}, ...children): an element. */
function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split('.');
  const node = document.createElement(tag);
  if (classes.length) node.className = classes.join(' ');
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'text') node.textContent = v;
    else if (k in node && typeof v !== 'string') node[k] = v;
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) node.append(c);
  return node;
}

/** Replaces `node`'s children, skipping null, undefined and false (conditional parts). */
function render(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

let uid = 0;
/** A labelled form field: [label, control]. */
function field(label, control, hint) {
  control.id = control.id || `f${++uid}`;
  const wrap = h('div.field', {}, h('label', { for: control.id, text: label }), control);
  if (hint) {
    const hid = `${control.id}-hint`;
    control.setAttribute('aria-describedby', hid);
    wrap.append(h('small.hint', { id: hid, text: hint }));
  }
  return wrap;
}

function table(headers, rows, caption) {
  return h('div.table-wrap', { tabindex: 0, role: 'region', 'aria-label': caption || headers.join(', ') },
    h('table', {},
      caption ? h('caption', { text: caption }) : null,
      h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td.empty', { colspan: headers.length, text: 'Nothing to show.' })))));
}

function announce(text, kind = 'info') {
  const box = document.getElementById('status');
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(announce.timer);
  announce.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

function errorBox(err) {
  return h('p.error', { role: 'alert', text: err.message || String(err) });
}

function copyButton(getText, label = 'Copy') {
  return h('button.secondary', {
    type: 'button',
    text: label,
    onclick: async () => {
      const text = getText();
      try {
        await navigator.clipboard.writeText(text);
        announce('Copied to the clipboard.');
      } catch {
        announce('Could not copy: select the text and copy it by hand.', 'error');
      }
    },
  });
}

function downloadBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = h('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------------------------------------------------------------- formatting

const fmtInt = (n) => (n === null || n === undefined ? '—' : Math.round(n).toLocaleString('en-US'));
function fmtNum(n, digits = 2) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  if (n !== 0 && Math.abs(n) < 10 ** -digits) return n.toExponential(1);
  return n.toLocaleString('en-US', { maximumFractionDigits: digits });
}
function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${fmtNum(n, i ? 1 : 0)} ${units[i]}`;
}
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : '—');
const fmtPct = (v) => `${fmtNum(v, 1)}%`;

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, detail, problem) {
    super(detail);
    this.status = status;
    this.problem = problem || {};
  }

  /** The server does not have this route at all (an older Shoal). */
  get missingRoute() {
    return this.status === 404 && /route not found/i.test(this.message);
  }
}

/** Calls the API; JSON in, JSON out (or the Response when `raw`). */
async function api(path, { method = 'GET', body, accept = 'application/json', headers = {}, raw = false } = {}) {
  const init = { method, headers: { Accept: accept, ...headers } };
  if (session.token) init.headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `The control plane did not answer (${e.message}).`);
  }
  if (res.status === 401 && session.token && path !== '/v1/auth/login') {
    logout('Your token was not accepted any more: log in again.');
    throw new ApiError(401, 'Not logged in.');
  }
  if (!res.ok) {
    const problem = await res.json().catch(() => ({}));
    const where = problem.field ? ` (${problem.field})` : '';
    throw new ApiError(res.status, `${problem.detail || problem.title || res.statusText}${where}`, problem);
  }
  if (raw) return res;
  if (res.status === 204) return null;
  return res.json();
}

/** Every item of a paginated list (`{items, next_cursor}`), up to `max`. */
async function listAll(path, max = 1000) {
  const items = [];
  let cursor;
  do {
    const sep = path.includes('?') ? '&' : '?';
    const page = await api(`${path}${sep}limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

const qs = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== '' && v !== undefined && v !== null)).toString();

/** Usage points of a cache, or null when this server has no usage API. */
async function usage(cacheId, from, to, granularity) {
  try {
    const u = await api(`/v1/caches/${cacheId}/usage?${qs({ from: from.toISOString(), to: to.toISOString(), granularity })}`);
    return u.points || [];
  } catch (e) {
    if (e.missingRoute) return null;
    throw e;
  }
}

const canWrite = () => Boolean(session.me && session.me.can_write);

function accountName(id) {
  const a = session.accounts.get(id);
  return a ? a.name : id;
}

async function loadAccounts() {
  const list = await listAll('/v1/accounts');
  session.accounts = new Map(list.map((a) => [a.id, a]));
  return list;
}

// ---------------------------------------------------------------- login

async function loginRoute() {
  // The directory login exists on servers that document it.
  try {
    const doc = await (await fetch('/openapi.json')).json();
    return Boolean(doc.paths && doc.paths['/v1/auth/login'] && doc.paths['/v1/auth/login'].post);
  } catch {
    return false;
  }
}

async function showLogin(message) {
  document.getElementById('nav').hidden = true;
  document.getElementById('who').hidden = true;
  const view = document.getElementById('view');
  const tokenInput = h('input', { type: 'password', name: 'token', autocomplete: 'off', required: true, spellcheck: 'false' });
  const err = h('p.error', { role: 'alert', hidden: true });
  const fail = (e) => { err.textContent = e.message; err.hidden = false; };
  const tokenForm = h('form', {
    'aria-labelledby': 'login-token-h',
    onsubmit: async (e) => {
      e.preventDefault();
      await login(tokenInput.value.trim()).catch(fail);
    },
  },
  h('h2', { id: 'login-token-h', text: 'With an API token' }),
  field('API token', tokenInput, 'An admin, owner or auditor key, e.g. the contents of .shoal/admin.token.'),
  h('button', { type: 'submit', text: 'Log in' }));
  const forms = [tokenForm];
  if (await loginRoute()) {
    const user = h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true });
    const pass = h('input', { type: 'password', name: 'password', autocomplete: 'current-password', required: true });
    forms.unshift(h('form', {
      'aria-labelledby': 'login-user-h',
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const r = await api('/v1/auth/login', { method: 'POST', body: { username: user.value, password: pass.value } });
          await login(r.token || r.access_token);
        } catch (x) {
          if (x.status === 401) fail(new Error('Wrong user name or password.'));
          else if (x.status === 404) fail(new Error('This server has no directory configured: log in with an API token.'));
          else fail(x);
        }
      },
    },
    h('h2', { id: 'login-user-h', text: 'With your directory account' }),
    field('User name', user), field('Password', pass),
    h('button', { type: 'submit', text: 'Log in' })));
  }
  render(view, h('section.login', { 'aria-labelledby': 'login-h' },
    h('h1', { id: 'login-h', text: 'Log in to Shoal' }),
    message ? h('p.notice', { text: message }) : null,
    err, ...forms));
  (forms[0].querySelector('input')).focus();
}

async function login(token) {
  if (!token) throw new Error('Enter a token.');
  session.token = token;
  try {
    session.me = await api('/v1/me');
  } catch (e) {
    session.token = null;
    throw e.status === 401 ? new Error('That token was not accepted.') : e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  if (!location.hash.startsWith('#/')) location.hash = '#/overview';
  await route();
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.me = null;
  session.accounts = new Map();
  showLogin(message);
}

function showWho() {
  const me = session.me;
  const where = me.account_id ? ` of ${accountName(me.account_id)}` : ' (platform)';
  document.getElementById('who-text').textContent = `${me.role}${where}`;
  document.getElementById('who').hidden = false;
  document.getElementById('nav').hidden = false;
  // The engine's pools are the platform's: admins and platform auditors read them.
  document.getElementById('nav-pools').hidden = Boolean(me.account_id);
  for (const a of document.querySelectorAll('#nav a')) {
    const here = location.hash.startsWith(a.getAttribute('href'));
    if (here) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------- pages

const pages = [
  [/^#\/overview$/, overviewPage],
  [/^#\/caches\/([a-z0-9]+)$/, cachePage],
  [/^#\/caches\/([a-z0-9]+)\/access$/, accessPage],
  [/^#\/caches\/([a-z0-9]+)\/snapshots$/, snapshotsPage],
  [/^#\/billing$/, billingPage],
  [/^#\/audit$/, auditPage],
  [/^#\/pools$/, poolsPage],
  [/^#\/accounts$/, accountsPage],
];

async function route() {
  if (!session.token) return showLogin();
  if (!session.me) {
    try {
      session.me = await api('/v1/me');
    } catch (e) {
      return logout(e.status === 401 ? 'Log in again.' : e.message);
    }
  }
  if (!location.hash.startsWith('#/')) {
    history.replaceState(null, '', '#/overview');
  }
  const view = document.getElementById('view');
  const hash = location.hash.split('?')[0];
  const match = pages.map(([re, page]) => [hash.match(re), page]).find(([m]) => m);
  if (session.accounts.size === 0) await loadAccounts().catch(() => {});
  showWho();
  render(view, h('p.loading', { text: 'Loading…' }));
  view.setAttribute('aria-busy', 'true');
  try {
    if (!match) throw new Error('There is no such page.');
    const [m, page] = match;
    await page(view, ...m.slice(1));
  } catch (e) {
    if (!session.token) return;
    render(view, h('h1', { text: 'Something went wrong' }), errorBox(e));
  } finally {
    view.removeAttribute('aria-busy');
  }
  const h1 = view.querySelector('h1');
  if (h1) {
    document.title = `${h1.textContent} · Shoal`;
    h1.tabIndex = -1;
    if (route.moved) h1.focus();
  }
  route.moved = true;
}

function card(label, value, note) {
  return h('div.card', {}, h('div.card-label', { text: label }), h('div.card-value', { text: value }),
    note ? h('div.card-note', { text: note }) : null);
}

/** One cache's figures from its minute points of the last hour: rates over the last five
 * minutes (the running minute included, counted up to now), sums over the hour. */
function summarize(points, now) {
  if (!points) return null;
  const recent = points.filter((p) => Date.parse(p.start) > now - 5 * 60000);
  const seconds = recent.length ? Math.max(1, (now - Date.parse(recent[0].start)) / 1000) : 1;
  const stored = recent.filter((p) => p.storage_bytes > 0);
  const sum = (list, k) => list.reduce((s, p) => s + (p[k] || 0), 0);
  return {
    ecpuPerSecond: sum(recent, 'ecpu') / seconds,
    storage: stored.length ? stored[stored.length - 1].storage_bytes : 0,
    ecpuHour: sum(points, 'ecpu'),
    commandsHour: sum(points, 'commands'),
    throttledHour: sum(points, 'throttled'),
  };
}

async function overviewPage(view) {
  const caches = await listAll('/v1/caches');
  const now = Date.now();
  const from = new Date(now - 3600 * 1000);
  const to = new Date(now);
  const usages = await Promise.all(caches.slice(0, 200).map((c) => usage(c.id, from, to, 'minute').catch(() => null)));
  const stats = caches.map((c, i) => ({ cache: c, s: summarize(usages[i], now) }));
  const haveUsage = usages.some((u) => u !== null);
  const total = (k) => stats.reduce((s, x) => s + (x.s ? x.s[k] : 0), 0);
  const noData = 'no data';
  const list = await cacheList(new Map(stats.filter((x) => x.s).map((x) => [x.cache.id, x.s])), noData);
  render(view,
    h('h1', { text: 'Overview' }),
    h('div.cards', {},
      card('Accounts', fmtInt(session.accounts.size)),
      // (The overview sums up at most the first 1,000 caches; the list below has them all.)
      card('Caches', fmtInt(caches.length) + (caches.length >= 1000 ? '+' : '')),
      card('ECPU/s now', haveUsage ? fmtNum(total('ecpuPerSecond')) : noData, 'average, last 5 minutes'),
      card('Storage now', haveUsage ? fmtBytes(total('storage')) : noData),
      card('Throttled', haveUsage ? fmtInt(total('throttledHour')) : noData, 'commands, last hour')),
    haveUsage ? null : h('p.notice', { text: 'This server does not report usage yet: usage figures show “no data”.' }),
    h('h2', { text: 'Top caches by ECPU (last hour)' }),
    table(['Cache', 'Account', 'ECPU', 'Commands', 'Throttled'],
      stats.filter((x) => x.s && x.s.ecpuHour > 0).sort((a, b) => b.s.ecpuHour - a.s.ecpuHour).slice(0, 5)
        .map(({ cache: c, s }) => h('tr', {},
          h('td', {}, h('a', { href: `#/caches/${c.id}`, text: c.name })), h('td', { text: accountName(c.account_id) }),
          h('td.num', { text: fmtNum(s.ecpuHour) }), h('td.num', { text: fmtInt(s.commandsHour) }),
          h('td.num', { text: fmtInt(s.throttledHour) }))),
      'Top caches by ECPU in the last hour'),
    h('h2', { text: 'Caches' }),
    list,
    canWrite() ? createCacheForm() : null,
  );
}

/** Every cache, a page at a time, found by the start of its name: usable with 100,000
 * caches. Usage figures are shown for the caches the overview summed up. */
async function cacheList(statsById, noData) {
  const prefix = h('input', { name: 'name_prefix', placeholder: 'shop', autocomplete: 'off', pattern: '[A-Za-z0-9_\\-]{0,63}', maxlength: 63 });
  const results = h('div', { 'aria-live': 'polite' });
  const cursors = [];
  const show = async (cursor) => {
    let page;
    try {
      page = await api(`/v1/caches?${qs({ name_prefix: prefix.value.trim(), limit: 50, cursor })}`);
    } catch (e) {
      render(results, errorBox(e));
      return;
    }
    const rows = page.items.map((c) => {
      const s = statsById.get(c.id);
      return h('tr', {},
        h('td', {}, h('a', { href: `#/caches/${c.id}`, text: c.name })),
        h('td', { text: accountName(c.account_id) }),
        h('td', {}, h('span.badge', { 'data-status': c.status, text: c.status })),
        h('td', {}, h('code', { text: c.endpoint })),
        h('td.num', { text: s ? fmtNum(s.ecpuPerSecond) : noData }),
        h('td.num', { text: s ? fmtBytes(s.storage) : noData }),
        h('td.num', { text: s ? fmtInt(s.throttledHour) : noData }));
    });
    render(results,
      h('p.hint', { text: `Page ${cursors.length + 1}: ${page.items.length} cache${page.items.length === 1 ? '' : 's'}.` }),
      table(['Cache', 'Account', 'Status', 'Endpoint', 'ECPU/s', 'Storage', 'Throttled (1 h)'], rows, 'All caches'),
      h('div.toolbar', {},
        h('button.secondary', { type: 'button', text: 'Previous page', disabled: cursors.length === 0, onclick: () => { cursors.pop(); show(cursors[cursors.length - 1]); } }),
        h('button.secondary', { type: 'button', text: 'Next page', disabled: !page.next_cursor, onclick: () => { cursors.push(page.next_cursor); show(page.next_cursor); } })));
  };
  await show();
  return h('div', {},
    h('form.filters', {
      'aria-label': 'Find caches',
      onsubmit: (e) => { e.preventDefault(); cursors.length = 0; show(); },
    }, h('div.row', {}, field('Name starts with', prefix)), h('button', { type: 'submit', text: 'Find' })),
    results);
}

const EVICTION_POLICIES = ['volatile-lru', 'allkeys-lru', 'volatile-lfu', 'allkeys-lfu', 'volatile-ttl', 'volatile-random', 'allkeys-random', 'noeviction'];

/** "k=v, k2=v2" → {k: v, k2: v2}. */
function parseTags(text) {
  const tags = {};
  for (const part of text.split(',').map((t) => t.trim()).filter(Boolean)) {
    const at = part.indexOf('=');
    if (at < 1) throw new Error(`Tag "${part}" is not key=value.`);
    tags[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return tags;
}

function createCacheForm() {
  const name = h('input', { name: 'name', required: true, pattern: '[A-Za-z0-9_\\-]{1,63}', maxlength: 63 });
  const num = (n, min, max) => h('input', { type: 'number', name: n, min, max, inputmode: 'numeric' });
  const ecpu = num('ecpu_per_second', 1);
  const storage = num('data_storage_mb', 1);
  const conns = num('max_connections', 1);
  const databases = num('databases', 1, 16);
  const policy = h('select', { name: 'eviction_policy' }, EVICTION_POLICIES.map((p) => h('option', { value: p, text: p })));
  const placement = h('select', { name: 'placement' },
    ['shared', 'dedicated'].map((p) => h('option', { value: p, text: p })));
  const tags = h('input', { name: 'tags', autocomplete: 'off', placeholder: 'team=web, env=prod' });
  const err = h('p.error', { role: 'alert', hidden: true });
  return h('form.inline', {
    'aria-labelledby': 'new-cache-h',
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const limits = {};
        if (ecpu.value) limits.ecpu_per_second = Number(ecpu.value);
        if (storage.value) limits.data_storage_mb = Number(storage.value);
        if (conns.value) limits.max_connections = Number(conns.value);
        const body = { name: name.value, limits, eviction_policy: policy.value, tags: parseTags(tags.value) };
        if (placement.value !== 'shared') body.placement = placement.value;
        if (databases.value) body.databases = Number(databases.value);
        const c = await api('/v1/caches', { method: 'POST', body });
        location.hash = `#/caches/${c.id}`;
      } catch (x) {
        err.textContent = x.message;
        err.hidden = false;
      }
    },
  }, h('h2', { id: 'new-cache-h', text: 'New cache' }), err,
  field('Name', name, '1–63 letters, digits, - and _'),
  field('ECPU per second', ecpu, 'empty = no limit'),
  field('Data storage (MB)', storage, 'empty = the default (100)'),
  field('Max connections', conns, 'empty = default'),
  field('Databases', databases, '1–16, default 1'),
  field('Eviction policy', policy),
  field('Placement', placement, 'dedicated: a node of its own (Search, functions), billed per node-hour'),
  field('Tags', tags, 'key=value, comma-separated'),
  h('button', { type: 'submit', text: 'Create cache' }));
}

/** Deletes cache `c` after the user confirms by typing its name. */
function deleteCacheButton(c) {
  return h('button.danger', {
    type: 'button',
    text: 'Delete cache',
    onclick: async () => {
      const typed = prompt(`Delete cache ${c.name}? Its data is flushed, its connections closed and its tokens refused. Type its name to confirm.`);
      if (typed === null) return;
      if (typed !== c.name) return announce('The name did not match: nothing was deleted.', 'error');
      try {
        await api(`/v1/caches/${c.id}`, { method: 'DELETE' });
        announce(`Cache ${c.name} deleted.`);
        location.hash = '#/overview';
      } catch (e) { announce(e.message, 'error'); }
    },
  });
}

// ---------------------------------------------------------------- accounts

async function accountsPage(view) {
  const accounts = await loadAccounts();
  const box = h('div');
  const keysFor = async (a, where) => {
    const list = await api(`/v1/accounts/${a.id}/api-keys`);
    render(where, table(['Key', 'Name', 'Role', 'Created', ...(canWrite() ? ['Actions'] : [])], (list.items || []).map((k) => h('tr', {},
      h('td', {}, h('code', { text: k.id })), h('td', { text: k.name }), h('td', { text: k.role }), h('td', { text: fmtTime(k.created_at) }),
      canWrite() ? h('td.actions', {}, h('button.danger', {
        type: 'button',
        text: 'Revoke',
        'aria-label': `Revoke key ${k.name} of ${a.name}`,
        onclick: async () => {
          if (!confirm(`Revoke key ${k.name}? It stops working at once.`)) return;
          try {
            await api(`/v1/api-keys/${k.id}`, { method: 'DELETE' });
            announce('Key revoked.');
            await keysFor(a, where);
          } catch (e) { announce(e.message, 'error'); }
        },
      })) : null)), `API keys of ${a.name}`));
  };
  const draw = () => render(box, ...accounts.map((a) => {
    const keys = h('div');
    const keyName = h('input', { name: 'key-name', required: true, autocomplete: 'off', 'aria-label': `Name of a new key for ${a.name}` });
    const role = h('select', { name: 'key-role', 'aria-label': `Role of a new key for ${a.name}` }, ['owner', 'auditor'].map((r) => h('option', { value: r, text: r })));
    const form = canWrite() ? h('form.inline', {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const k = await api(`/v1/accounts/${a.id}/api-keys`, { method: 'POST', body: { name: keyName.value, role: role.value } });
          keyName.value = '';
          await keysFor(a, keys);
          showSecret(`New ${k.role} key ${k.name} for ${a.name} (shown once):`, k.token);
        } catch (x) { announce(x.message, 'error'); }
      },
    }, keyName, role, h('button', { type: 'submit', text: `Create a key for ${a.name}` })) : null;
    keysFor(a, keys).catch((e) => render(keys, errorBox(e)));
    return h('section', { 'aria-label': `Account ${a.name}` }, h('h2', { text: `${a.name}` }),
      h('p', {}, h('code', { text: a.id }), a.email ? ` · ${a.email}` : ''), keys, form);
  }));
  const name = h('input', { name: 'account-name', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9 _\\-]{1,63}' });
  const email = h('input', { name: 'account-email', type: 'email', autocomplete: 'off' });
  const isAdmin = session.me && session.me.role === 'admin';
  const create = isAdmin ? h('form.inline', {
    'aria-labelledby': 'new-account-h',
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const a = await api('/v1/accounts', { method: 'POST', body: email.value ? { name: name.value, email: email.value } : { name: name.value } });
        accounts.push(a);
        session.accounts.set(a.id, a);
        name.value = '';
        email.value = '';
        announce(`Account ${a.name} created.`);
        draw();
      } catch (x) { announce(x.message, 'error'); }
    },
  }, h('h2', { id: 'new-account-h', text: 'New account' }), field('Account name', name), field('Email', email, 'billing contact, optional'),
  h('button', { type: 'submit', text: 'Create account' })) : null;
  const rotate = isAdmin ? h('section', { 'aria-labelledby': 'signing-h' },
    h('h2', { id: 'signing-h', text: 'Token signing key' }),
    h('p', { text: 'A new key signs data-plane tokens from now on; tokens signed by the old key keep working until they expire.' }),
    h('button.secondary', {
      type: 'button',
      text: 'Rotate the signing key',
      onclick: async () => {
        if (!confirm('Rotate the signing key? New tokens are signed with a new key.')) return;
        try {
          const r = await api('/v1/signing-keys/rotate', { method: 'POST' });
          announce(`Signing key rotated: new tokens are signed by ${r.kid}.`);
        } catch (e) { announce(e.message, 'error'); }
      },
    })) : null;
  render(view, h('h1', { text: 'Accounts' }), h('div.minted', { hidden: true, 'aria-live': 'polite' }), create, box, rotate);
  draw();
}

// ---------------------------------------------------------------- cache detail

function cacheTabs(c, current) {
  return h('nav.tabs', { 'aria-label': 'Cache' },
    h('a', { href: `#/caches/${c.id}`, text: 'Usage and settings', 'aria-current': current === 'detail' ? 'page' : null }),
    h('a', { href: `#/caches/${c.id}/access`, text: 'Users and tokens', 'aria-current': current === 'access' ? 'page' : null }),
    h('a', { href: `#/caches/${c.id}/snapshots`, text: 'Snapshots', 'aria-current': current === 'snapshots' ? 'page' : null }));
}

// ---------------------------------------------------------------- snapshots

async function snapshotsPage(view, id) {
  const c = await api(`/v1/caches/${id}`);
  const box = h('div');
  const draw = async () => {
    const list = await api(`/v1/caches/${c.id}/snapshots`);
    const items = list.items || [];
    render(box, items.length === 0 ? h('p', { text: 'No snapshots yet.' }) : table(
      ['Name', 'Kind', 'Status', 'Keys', 'Size', 'Taken', 'Actions'],
      items.map((s) => h('tr', {},
        h('td', {}, h('code', { text: s.name })),
        h('td', { text: s.kind }),
        h('td', {}, h('span.badge', { 'data-status': s.status, text: s.status, title: s.error || '' })),
        h('td.num', { text: fmtInt(s.keys) }),
        h('td.num', { text: fmtBytes(s.bytes) }),
        h('td', { text: fmtTime(s.created_at) }),
        h('td.actions', {}, s.status !== 'available' || !canWrite() ? null : [
          h('button.secondary', {
            type: 'button',
            text: 'Download',
            'aria-label': `Download snapshot ${s.name} as RDB`,
            onclick: async () => {
              try {
                const res = await api(`/v1/snapshots/${s.id}/rdb`, { accept: 'application/octet-stream', raw: true });
                downloadBlob(await res.blob(), `${s.name}.rdb`);
              } catch (e) { announce(e.message, 'error'); }
            },
          }),
          restoreForm(s),
          h('button.danger', {
            type: 'button',
            text: 'Delete',
            'aria-label': `Delete snapshot ${s.name}`,
            onclick: async () => {
              if (!confirm(`Delete snapshot ${s.name}? Its file is removed.`)) return;
              try {
                await api(`/v1/snapshots/${s.id}`, { method: 'DELETE' });
                announce('Snapshot deleted.');
                await draw();
              } catch (e) { announce(e.message, 'error'); }
            },
          }),
        ]))),
      `Snapshots of ${c.name}`));
    // A snapshot being taken: look again shortly.
    if (items.some((s) => s.status === 'creating') && location.hash.endsWith('/snapshots')) {
      setTimeout(() => draw().catch(() => {}), 1000);
    }
  };
  const name = h('input', { name: 'snapshot-name', autocomplete: 'off', pattern: '[A-Za-z0-9_\\-]{1,63}', placeholder: 'optional' });
  const take = canWrite() ? h('form.inline', {
    'aria-labelledby': 'take-h',
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const s = await api(`/v1/caches/${c.id}/snapshots`, { method: 'POST', body: name.value ? { name: name.value } : {} });
        name.value = '';
        announce(`Snapshot ${s.name} is being taken.`);
        await draw();
      } catch (e) { announce(e.message, 'error'); }
    },
  }, h('h2', { id: 'take-h', text: 'Take a snapshot' }), field('Name', name, '1–63 letters, digits, - and _; default: the cache name and the time'),
  h('button', { type: 'submit', text: 'Take snapshot' })) : null;
  render(view,
    h('h1', { text: `Cache ${c.name}: snapshots` }),
    cacheTabs(c, 'snapshots'),
    h('p', { text: c.snapshot_window
      ? `A daily snapshot is taken from ${c.snapshot_window} UTC; the newest ${c.snapshot_retention_limit} are kept.`
      : 'No daily snapshot (set snapshot_window to take one every day).' }),
    take,
    h('section', { 'aria-labelledby': 'snapshots-h' }, h('h2', { id: 'snapshots-h', text: 'Snapshots' }), box));
  await draw();
}

/** Restores snapshot `s` into a new cache named by the user, then opens that cache. */
function restoreForm(s) {
  const name = h('input', { name: 'restore-name', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9_\\-]{1,63}', 'aria-label': `Name of a new cache restored from ${s.name}` });
  return h('form.inline', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const made = await api('/v1/caches', { method: 'POST', body: { name: name.value, from_snapshot: s.id } });
        announce(`Cache ${made.name} restored from ${s.name}.`);
        location.hash = `#/caches/${made.id}`;
      } catch (e) { announce(e.message, 'error'); }
    },
  }, name, h('button', { type: 'submit', text: 'Restore into a new cache' }));
}

const RANGES = [
  ['15m', 'Last 15 minutes', 15 * 60, 'minute'],
  ['1h', 'Last hour', 3600, 'minute'],
  ['6h', 'Last 6 hours', 6 * 3600, 'minute'],
  ['24h', 'Last 24 hours', 24 * 3600, 'hour'],
  ['7d', 'Last 7 days', 7 * 86400, 'hour'],
  ['30d', 'Last 30 days', 30 * 86400, 'hour'],
];

async function cachePage(view, id) {
  const c = await api(`/v1/caches/${id}`);
  const [host, port] = c.endpoint.split(':');
  const tokenText = h('code', { text: '<token>' });
  const cliText = () => `export REDISCLI_AUTH='${tokenText.textContent}'\nredis-cli -h ${host} -p ${port} PING`;
  const pyText = () => `import redis\n\nr = redis.Redis(host="${host}", port=${port}, password="${tokenText.textContent}",\n                protocol=3, decode_responses=True)\nr.set("greeting", "hello", ex=60)\nprint(r.get("greeting"))`;
  const cli = h('pre', {}, h('code', { text: cliText() }));
  const py = h('pre', {}, h('code', { text: pyText() }));
  const refreshSnippets = () => {
    cli.firstChild.textContent = cliText();
    py.firstChild.textContent = pyText();
  };
  const mint = canWrite() ? h('button', {
    type: 'button',
    text: 'Mint a 15-minute token for these snippets',
    onclick: async () => {
      try {
        const t = await api(`/v1/caches/${c.id}/tokens`, { method: 'POST', body: { ttl_seconds: 900 } });
        tokenText.textContent = t.token;
        refreshSnippets();
        announce(`Token minted; it expires at ${fmtTime(t.expires_at)}.`);
      } catch (e) {
        announce(e.message, 'error');
      }
    },
  }) : h('p.hint', { text: 'Ask an owner or admin for a token: auditors cannot mint them.' });

  const limits = c.limits || {};
  const details = h('dl.details', {},
    ...[
      ['Id', h('code', { text: c.id })],
      ['Account', accountName(c.account_id)],
      ['Status', h('span.badge', { 'data-status': c.status, text: c.status })],
      ['Pool', c.pool || '—'],
      ['Placement', c.placement || 'shared'],
      ['Endpoint', h('code', { text: c.endpoint })],
      ['Databases', String(c.databases)],
      ['Eviction policy', c.eviction_policy],
      ['ECPU per second limit', limits.ecpu_per_second ? fmtInt(limits.ecpu_per_second) : 'none'],
      ['Data storage limit', limits.data_storage_mb ? `${fmtInt(limits.data_storage_mb)} MB` : 'none'],
      ['Max connections', limits.max_connections ? fmtInt(limits.max_connections) : 'default'],
      ['Tags', Object.entries(c.tags || {}).map(([k, v]) => `${k}=${v}`).join(', ') || 'none'],
      ['Created', fmtTime(c.created_at)],
    ].flatMap(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]));

  const rangeSelect = h('select', { name: 'range' },
    RANGES.map(([v, label]) => h('option', { value: v, text: label, selected: v === '1h' })));
  const charts = h('div.charts', { 'aria-live': 'polite' });
  const drawCharts = async () => {
    const [, , seconds, granularity] = RANGES.find(([v]) => v === rangeSelect.value);
    const to = new Date();
    const from = new Date(to - seconds * 1000);
    render(charts, h('p.loading', { text: 'Loading usage…' }));
    let points;
    try {
      points = await usage(c.id, from, to, granularity);
    } catch (e) {
      render(charts, errorBox(e));
      return;
    }
    if (points === null) {
      render(charts, h('p.notice', { text: 'No data: this server does not report usage yet.' }));
      return;
    }
    const step = granularity === 'hour' ? 3600 : 60;
    const now = Date.now();
    const series = (f) => points.map((p) => ({ t: Date.parse(p.start), v: f(p) }));
    // Per second over the part of the period that has passed (the last one is still running).
    const perSecond = (p) => Math.max(1, Math.min(step, (now - Date.parse(p.start)) / 1000));
    const opts = { from: +from, to: +to };
    render(charts,
      lineChart({ ...opts, title: 'ECPU per second', points: series((p) => p.ecpu / perSecond(p)), format: (v) => fmtNum(v, 3), limit: limits.ecpu_per_second, limitLabel: 'ECPU/s limit' }),
      lineChart({ ...opts, title: `Commands per ${granularity}`, points: series((p) => p.commands), format: fmtInt, integer: true }),
      lineChart({ ...opts, title: 'Hit rate', points: series((p) => (p.hits + p.misses ? (100 * p.hits) / (p.hits + p.misses) : null)), format: fmtPct, empty: 'No reads in this time range.' }),
      // Storage is sampled a few times a minute: a running period without a sample yet is unknown, not empty.
      lineChart({ ...opts, title: 'Storage', points: series((p) => (!p.storage_bytes && Date.parse(p.start) + step * 1000 > now ? null : p.storage_bytes)), format: fmtBytes, limit: limits.data_storage_mb ? limits.data_storage_mb * 1e6 : undefined, limitLabel: 'storage limit' }),
      lineChart({ ...opts, title: 'Peak connections', points: series((p) => p.connections), format: fmtInt, integer: true }),
      lineChart({ ...opts, title: `Throttled commands per ${granularity}`, points: series((p) => p.throttled), format: fmtInt, integer: true }),
    );
  };
  rangeSelect.addEventListener('change', drawCharts);

  render(view,
    h('h1', { text: `Cache ${c.name}` }),
    cacheTabs(c, 'detail'),
    h('section', { 'aria-labelledby': 'usage-h' },
      h('div.section-head', {}, h('h2', { id: 'usage-h', text: 'Usage' }),
        h('div.toolbar', {}, field('Time range', rangeSelect), h('button.secondary', { type: 'button', text: 'Refresh', onclick: drawCharts }))),
      charts),
    h('div.columns', {},
      h('section', { 'aria-labelledby': 'details-h' }, h('h2', { id: 'details-h', text: 'Settings' }), details,
        canWrite() ? limitsForm(c) : null, canWrite() ? deleteCacheButton(c) : null),
      h('section', { 'aria-labelledby': 'connect-h' },
        h('h2', { id: 'connect-h', text: 'Connect' }),
        h('p', { text: 'Any Redis or Valkey client works: log in with a token as the password (user default).' }),
        mint,
        h('h3', { text: 'redis-cli' }), cli, copyButton(cliText, 'Copy redis-cli snippet'),
        h('h3', { text: 'Python (redis-py)' }), py, copyButton(pyText, 'Copy Python snippet'))),
  );
  await drawCharts();
}

function limitsForm(c) {
  const l = c.limits || {};
  const num = (name, v, max) => h('input', { type: 'number', name, min: 1, max, value: v ?? '', inputmode: 'numeric' });
  const ecpu = num('ecpu_per_second', l.ecpu_per_second);
  const storage = num('data_storage_mb', l.data_storage_mb);
  const conns = num('max_connections', l.max_connections);
  const err = h('p.error', { role: 'alert', hidden: true });
  const value = (input) => (input.value === '' ? null : Number(input.value));
  return h('form', {
    'aria-labelledby': 'limits-h',
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api(`/v1/caches/${c.id}`, {
          method: 'PATCH',
          headers: { 'If-Match': c.etag },
          body: { limits: { ecpu_per_second: value(ecpu), data_storage_mb: value(storage), max_connections: value(conns) } },
        });
        announce('Limits saved.');
        await route();
      } catch (x) {
        err.textContent = x.status === 412 ? 'Someone changed this cache since you opened it: reload and try again.' : x.message;
        err.hidden = false;
      }
    },
  },
  h('h3', { id: 'limits-h', text: 'Change limits' }), err,
  h('div.row', {}, field('ECPU per second', ecpu, 'empty = no limit'), field('Data storage (MB)', storage, 'empty = no limit'),
    field('Max connections', conns, 'empty = default')),
  h('button', { type: 'submit', text: 'Save limits' }));
}

// ---------------------------------------------------------------- users and tokens

async function accessPage(view, id) {
  const c = await api(`/v1/caches/${id}`);
  const tokensBox = h('div');
  const usersBox = h('div');
  const drawTokens = async () => {
    const { items } = await api(`/v1/caches/${c.id}/tokens`);
    render(tokensBox, table(['Token id', 'Access', 'Created', 'Expires', ...(canWrite() ? ['Action'] : [])],
      items.map((t) => h('tr', {},
        h('td', {}, h('code', { text: t.jti })),
        h('td', { text: `${t.permission || 'read-write'}${t.key_patterns ? ` on ${t.key_patterns.join(' ')}` : ', all keys'}` }),
        h('td', { text: fmtTime(t.created_at) }), h('td', { text: fmtTime(t.expires_at) }),
        canWrite() ? h('td.actions', {}, h('button.secondary', {
          type: 'button',
          text: 'Rotate',
          'aria-label': `Rotate token ${t.jti}`,
          onclick: async () => {
            // A new token with the same access for as long as this one had left, then this
            // one revoked.
            const left = Math.round((Date.parse(t.expires_at) - Date.now()) / 1000);
            const body = { ttl_seconds: Math.max(60, left), permission: t.permission || 'read-write' };
            if (t.key_patterns) body.key_patterns = t.key_patterns;
            try {
              const fresh = await api(`/v1/caches/${c.id}/tokens`, { method: 'POST', body });
              await api(`/v1/caches/${c.id}/tokens/${t.jti}`, { method: 'DELETE' });
              await drawTokens();
              showSecret(`Token ${t.jti} revoked; its replacement (shown once) expires ${fmtTime(fresh.expires_at)}:`, fresh.token);
            } catch (e) { announce(e.message, 'error'); }
          },
        }), h('button.danger', {
          type: 'button',
          text: 'Revoke',
          'aria-label': `Revoke token ${t.jti}`,
          onclick: async () => {
            if (!confirm(`Revoke token ${t.jti}? Connections using it are closed.`)) return;
            try {
              await api(`/v1/caches/${c.id}/tokens/${t.jti}`, { method: 'DELETE' });
              announce('Token revoked.');
              await drawTokens();
            } catch (e) { announce(e.message, 'error'); }
          },
        })) : null)), 'Active tokens'));
  };
  const ttl = h('select', { name: 'ttl' }, [[900, '15 minutes'], [3600, '1 hour'], [43200, '12 hours']]
    .map(([v, t]) => h('option', { value: v, text: t })));
  const permission = h('select', { name: 'permission' }, [['read-write', 'Read-write'], ['read-only', 'Read-only']]
    .map(([v, t]) => h('option', { value: v, text: t })));
  const patterns = h('input', { name: 'key_patterns', placeholder: 'app:* session:*' });
  const minted = h('div.minted', { hidden: true });
  const mintForm = canWrite() ? h('form.inline', {
    'aria-label': 'Mint a token',
    onsubmit: async (e) => {
      e.preventDefault();
      const body = { ttl_seconds: Number(ttl.value), permission: permission.value };
      const keys = patterns.value.split(/\s+/).filter(Boolean);
      if (keys.length) body.key_patterns = keys;
      try {
        const t = await api(`/v1/caches/${c.id}/tokens`, { method: 'POST', body });
        await drawTokens();
        showSecret(`New token (shown once), expires ${fmtTime(t.expires_at)}:`, t.token);
      } catch (x) { announce(x.message, 'error'); }
    },
  }, field('Lifetime', ttl), field('Permission', permission),
  field('Key patterns', patterns, 'Valkey glob patterns, space-separated; empty: all keys'),
  h('button', { type: 'submit', text: 'Mint token' })) : null;

  const drawUsers = async () => {
    let list;
    try {
      list = await api(`/v1/caches/${c.id}/users`);
    } catch (e) {
      if (e.missingRoute) {
        render(usersBox, h('p.notice', { text: 'This server does not manage cache users yet.' }));
        return;
      }
      throw e;
    }
    render(usersBox, usersTable(c, list.items || [], drawUsers), canWrite() ? userForm(c, drawUsers) : null);
  };
  render(view,
    h('h1', { text: `Cache ${c.name}: users and tokens` }),
    cacheTabs(c, 'access'),
    h('section', { 'aria-labelledby': 'tokens-h' }, h('h2', { id: 'tokens-h', text: 'Tokens' }),
      h('p', { text: 'Short-lived tokens log clients in (AUTH <token>). Revoked tokens are refused by every gateway within seconds.' }),
      mintForm, minted, tokensBox),
    h('section', { 'aria-labelledby': 'users-h' }, h('h2', { id: 'users-h', text: 'Users' }), usersBox),
  );
  await Promise.all([drawTokens(), drawUsers().catch((e) => render(usersBox, errorBox(e)))]);
}

/** A random password of 24 letters and digits (the server wants 16–128 printable characters). */
function randomPassword() {
  const alphabet = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789';
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join('');
}

function usersTable(c, users, redraw) {
  return table(['User', 'Access string', 'Passwords', 'Log in with', 'Created', ...(canWrite() ? ['Actions'] : [])], users.map((u) => {
    const name = u.username;
    const path = `/v1/caches/${c.id}/users/${encodeURIComponent(name)}`;
    return h('tr', {},
      h('td', {}, h('code', { text: name })),
      h('td', {}, h('code', { text: u.access_string })),
      h('td.num', { text: u.no_password_required ? 'none needed' : String(u.password_count) }),
      h('td', {}, h('code', { text: u.login || '' })),
      h('td', { text: fmtTime(u.created_at) }),
      canWrite() ? h('td.actions', {},
        h('button.secondary', {
          type: 'button',
          text: 'New password',
          'aria-label': `Set a new password for ${name}`,
          onclick: async () => {
            const password = randomPassword();
            if (!confirm(`Replace the passwords of ${name} with a new one? Open connections stay open; new logins need the new password.`)) return;
            try {
              await api(path, { method: 'PATCH', headers: { 'If-Match': u.etag }, body: { passwords: [password] } });
              await redraw();
              showSecret(`New password for ${name} (shown once)`, password);
            } catch (e) { announce(e.message, 'error'); }
          },
        }),
        h('button.danger', {
          type: 'button',
          text: 'Delete',
          'aria-label': `Delete user ${name}`,
          onclick: async () => {
            if (!confirm(`Delete user ${name}? Its connections are closed.`)) return;
            try {
              await api(path, { method: 'DELETE' });
              announce('User deleted.');
              await redraw();
            } catch (e) { announce(e.message, 'error'); }
          },
        })) : null);
  }), 'Cache users');
}

/** Shows a secret once, in the page's “shown once” box, with a copy button. */
function showSecret(title, secret) {
  const box = document.querySelector('.minted');
  const out = h('textarea', { readonly: true, rows: 2, text: secret });
  render(box, h('p', { text: title }), field('Secret', out), copyButton(() => secret, 'Copy'));
  box.hidden = false;
  out.focus();
  out.select();
}

function userForm(c, redraw) {
  const name = h('input', { name: 'username', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9_\\-]{1,64}' });
  const password = h('input', { type: 'text', name: 'password', required: true, autocomplete: 'off', minlength: 16, maxlength: 128, value: randomPassword(), spellcheck: 'false' });
  const access = h('input', { name: 'access_string', value: 'on ~* +@all', required: true, spellcheck: 'false' });
  const err = h('p.error', { role: 'alert', hidden: true });
  return h('form', {
    'aria-labelledby': 'new-user-h',
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api(`/v1/caches/${c.id}/users`, { method: 'POST', body: { username: name.value, passwords: [password.value], access_string: access.value } });
        announce(`User ${name.value} created.`);
        await redraw();
      } catch (x) {
        err.textContent = x.message;
        err.hidden = false;
      }
    },
  }, h('h3', { id: 'new-user-h', text: 'New user' }), err,
  h('div.row', {}, field('User name', name, '1–64 letters, digits, - and _'),
    field('Password', password, '16–128 characters; a random one is filled in: copy it now'),
    field('Access string', access, 'Valkey ACL rules, e.g. on ~app:* +@read')),
  h('button', { type: 'submit', text: 'Create user' }));
}

// ---------------------------------------------------------------- billing

const invoiceId = (inv) => inv.id || `${inv.account_id}-${inv.month}`;

async function billingPage(view) {
  const accounts = [...session.accounts.values()];
  const account = h('select', { name: 'account' },
    accounts.length > 1 ? h('option', { value: '', text: 'All accounts' }) : null,
    accounts.map((a) => h('option', { value: a.id, text: a.name })));
  const month = h('input', { type: 'month', name: 'month' });
  const list = h('div');
  const detail = h('div.invoice');
  const showList = async () => {
    render(detail);
    let page;
    try {
      page = await api(`/v1/invoices?${qs({ account_id: account.value, month: month.value })}`);
    } catch (e) {
      render(list, e.missingRoute ? h('p.notice', { text: 'This server does not produce invoices yet.' }) : errorBox(e));
      return;
    }
    const items = page.items || [];
    render(list, table(['Month', 'Account', 'Status', 'Total', ''], items.map((inv) => h('tr', {},
      h('td', { text: inv.month }), h('td', { text: accountName(inv.account_id) }),
      h('td', {}, h('span.badge', { 'data-status': inv.status, text: inv.status })),
      h('td.num', { text: `${inv.total} ${inv.currency || ''}` }),
      h('td', {}, h('button.secondary', {
        type: 'button',
        text: 'Open',
        'aria-label': `Open the invoice of ${accountName(inv.account_id)} for ${inv.month}`,
        onclick: () => showInvoice(invoiceId(inv)),
      })))), 'Invoices'));
  };
  const showInvoice = async (id) => {
    try {
      const inv = await api(`/v1/invoices/${encodeURIComponent(id)}`);
      render(detail, invoiceView(inv, id));
      detail.querySelector('h2').focus();
    } catch (e) {
      render(detail, errorBox(e));
    }
  };
  render(view,
    h('h1', { text: 'Billing' }),
    h('form.inline.noprint', {
      'aria-label': 'Find invoices',
      onsubmit: (e) => { e.preventDefault(); showList(); },
    }, field('Account', account), field('Month', month, 'empty = every month'), h('button', { type: 'submit', text: 'Show invoices' })),
    h('div.noprint', {}, list),
    detail,
    estimateForm(),
  );
  await showList();
}

function invoiceView(inv, id) {
  const download = async (accept, ext) => {
    try {
      const res = await api(`/v1/invoices/${encodeURIComponent(id)}`, { accept, raw: true });
      downloadBlob(await res.blob(), `invoice-${inv.account_id}-${inv.month}.${ext}`);
    } catch (e) { announce(e.message, 'error'); }
  };
  const lines = inv.lines || [];
  return h('article.printable', { 'aria-labelledby': 'inv-h' },
    h('h2', { id: 'inv-h', tabindex: -1, text: `Invoice ${inv.month}: ${accountName(inv.account_id)}` }),
    h('dl.details', {},
      h('dt', { text: 'Account' }), h('dd', {}, `${accountName(inv.account_id)} `, h('code', { text: inv.account_id })),
      h('dt', { text: 'Period' }), h('dd', { text: `${fmtTime(inv.period_start)} – ${fmtTime(inv.period_end)}` }),
      h('dt', { text: 'Status' }), h('dd', { text: inv.status }),
      h('dt', { text: 'Usage until' }), h('dd', { text: fmtTime(inv.usage_until) })),
    table(['Cache', 'Meter', 'Quantity', 'Unit', 'Unit price', 'Amount'], lines.map((l) => h('tr', {},
      h('td', { text: l.cache_name || l.cache_id }), h('td', { text: l.meter }), h('td.num', { text: l.quantity }),
      h('td', { text: l.unit }), h('td.num', { text: l.unit_price }), h('td.num', { text: l.amount }))), 'Invoice lines'),
    h('p.total', {}, `Subtotal ${inv.subtotal} ${inv.currency} · `, h('strong', { text: `Total ${inv.total} ${inv.currency}` })),
    h('div.toolbar.noprint', {},
      h('button', { type: 'button', text: 'Download CSV', onclick: () => download('text/csv', 'csv') }),
      h('button.secondary', { type: 'button', text: 'Download HTML', onclick: () => download('text/html', 'html') }),
      h('button.secondary', { type: 'button', text: 'Print', onclick: () => window.print() })));
}

function estimateForm() {
  const input = (name, value, attrs = {}) => h('input', { type: 'number', name, value, min: 0, step: 'any', required: true, ...attrs });
  const rps = input('requests_per_second', 1000);
  const req = input('avg_request_bytes', 100, { step: 1 });
  const rep = input('avg_reply_bytes', 500, { step: 1 });
  const gb = input('stored_gb', 1);
  const weight = input('command_weight', '', { required: false });
  const out = h('div.estimate', { 'aria-live': 'polite' });
  return h('section.noprint', { 'aria-labelledby': 'est-h' },
    h('h2', { id: 'est-h', text: 'Cost estimate' }),
    h('form', {
      'aria-labelledby': 'est-h',
      onsubmit: async (e) => {
        e.preventDefault();
        const body = {
          requests_per_second: rps.value,
          avg_request_bytes: Number(req.value),
          avg_reply_bytes: Number(rep.value),
          stored_gb: gb.value,
        };
        if (weight.value !== '') body.command_weight = weight.value;
        try {
          const est = await api('/v1/estimate', { method: 'POST', body });
          render(out,
            h('p.total', {}, h('strong', { text: `About ${est.monthly_cost} ${est.currency} a month` })),
            h('ol', {}, (est.steps || []).map((s) => h('li', { text: s.text }))));
        } catch (x) {
          render(out, x.missingRoute ? h('p.notice', { text: 'This server does not offer estimates yet.' }) : errorBox(x));
        }
      },
    },
    h('div.row', {}, field('Requests per second', rps), field('Average request size (bytes)', req),
      field('Average reply size (bytes)', rep), field('Data stored (GB)', gb),
      field('Command weight', weight, 'optional; 1 = a small GET or SET')),
    h('button', { type: 'submit', text: 'Estimate' })), out);
}

// ---------------------------------------------------------------- audit

// ---------------------------------------------------------------- engine pools

/** One node's row: name, address, role, health, memory. */
function nodeRow(n, shard) {
  const health = n.healthy ? n.health : 'down';
  return h('tr', {},
    h('td', { text: n.name || '—' }),
    h('td', {}, h('code', { text: n.addr })),
    shard === undefined ? null : h('td', {}, h('code', { text: shard.slice(0, 8), title: shard })),
    h('td', {}, h('span.badge', { 'data-status': n.role, text: n.role })),
    h('td', {}, h('span.badge', { 'data-status': health, text: health })),
    h('td.num', { text: fmtBytes(n.used_memory) }));
}

const slotText = (slots) => slots.map(([a, b]) => (a === b ? `${a}` : `${a}–${b}`)).join(', ') || 'none';

async function poolsPage(view) {
  const { items } = await api('/v1/engine/pools');
  const admin = session.me && session.me.role === 'admin';
  const scale = async (what, path, method) => {
    announce(`${what}: moving slots, this can take a while…`);
    try {
      await api(path, { method });
      announce(`${what}: done.`);
    } catch (e) {
      announce(e.message, 'error');
    }
    await route();
  };
  render(view,
    h('h1', { text: 'Engine pools' }),
    h('p.hint', { text: 'Where caches live: standalone nodes (a cache in databases of one node) or a Valkey cluster (a cache in one database number across every shard).' }),
    items.map((p) => h('section.pool', { 'aria-labelledby': `pool-${p.name}` },
      h('h2', { id: `pool-${p.name}`, text: `${p.name} ` },
        h('span.badge', { text: p.kind }), p.default ? h('span.badge', { text: 'default' }) : null),
      h('div.cards', {},
        card('Caches', fmtInt(p.caches)),
        card('State', p.ok ? 'ok' : 'degraded', p.kind === 'cluster' ? 'cluster_state' : 'every node answers'),
        p.kind === 'cluster' ? card('Shards', fmtInt(p.shards.length)) : null,
        card('Nodes', fmtInt(p.nodes.length)),
        card('Memory used', fmtBytes(p.nodes.reduce((s, n) => s + (n.used_memory || 0), 0)))),
      p.kind === 'cluster' ? table(['Shard', 'Slots', 'Slot count', 'Primary', 'Replicas', ''],
        p.shards.map((s) => h('tr', {},
          h('td', {}, h('code', { text: s.id.slice(0, 8), title: s.id })),
          h('td', { text: slotText(s.slots) }),
          h('td.num', { text: fmtInt(s.slot_count) }),
          h('td', { text: (s.nodes.find((n) => n.role === 'primary') || {}).name || '—' }),
          h('td.num', { text: fmtInt(s.nodes.filter((n) => n.role !== 'primary').length) }),
          h('td', {}, admin && p.shards.length > 1 ? h('button.secondary', {
            type: 'button',
            text: 'Drain and remove',
            onclick: () => {
              if (confirm(`Move shard ${s.id.slice(0, 8)}'s ${s.slot_count} slots to the other shards and remove it?`)) {
                scale(`Removing shard ${s.id.slice(0, 8)}`, `/v1/engine/pools/${encodeURIComponent(p.name)}/shards/${s.id}`, 'DELETE');
              }
            },
          }) : null))),
        `Shards of ${p.name}`) : null,
      p.kind === 'cluster'
        ? table(['Node', 'Address', 'Shard', 'Role', 'Health', 'Memory'],
          p.shards.flatMap((s) => s.nodes.map((n) => nodeRow(n, s.id))), `Nodes of ${p.name}`)
        : table(['Node', 'Address', 'Role', 'Health', 'Memory'], p.nodes.map((n) => nodeRow(n)), `Nodes of ${p.name}`),
      admin && p.kind === 'cluster' ? h('button', {
        type: 'button',
        text: 'Add a shard',
        onclick: () => scale(`Adding a shard to ${p.name}`, `/v1/engine/pools/${encodeURIComponent(p.name)}/shards`, 'POST'),
      }) : null)));
}

async function auditPage(view) {
  const actor = h('input', { name: 'actor', placeholder: 'key:…' });
  const action = h('input', { name: 'action', placeholder: 'cache.create' });
  const cache = h('input', { name: 'cache_id' });
  const outcome = h('select', { name: 'outcome' }, ['', 'success', 'failure', 'lockout'].map((v) => h('option', { value: v, text: v || 'any' })));
  const from = h('input', { type: 'datetime-local', name: 'from' });
  const to = h('input', { type: 'datetime-local', name: 'to' });
  const size = h('select', { name: 'limit' }, [25, 50, 100].map((n) => h('option', { value: n, text: String(n), selected: n === 50 })));
  const results = h('div', { 'aria-live': 'polite' });
  const chain = h('div.chain');
  const cursors = [];
  const iso = (input) => (input.value ? new Date(input.value).toISOString() : '');
  const filters = () => ({ actor: actor.value.trim(), action: action.value.trim(), cache_id: cache.value.trim(), outcome: outcome.value, from: iso(from), to: iso(to) });
  const search = async (cursor) => {
    let page;
    try {
      page = await api(`/v1/audit?${qs({ ...filters(), limit: size.value, cursor })}`);
    } catch (e) {
      render(results, errorBox(e));
      return;
    }
    const rows = page.items.map((r) => h('tr', {},
      h('td.num', { text: String(r.seq) }), h('td', { text: fmtTime(r.at) }), h('td', {}, h('code', { text: r.actor })),
      h('td', { text: r.action }), h('td', {}, h('code', { text: r.target })), h('td', {}, r.cache_id ? h('code', { text: r.cache_id }) : ''),
      h('td', {}, h('span.badge', { 'data-status': r.outcome, text: r.outcome })), h('td', { text: r.source }),
      h('td', {}, Object.keys(r.details || {}).length ? h('details', {}, h('summary', { text: 'details' }), h('pre', { text: JSON.stringify(r.details, null, 2) })) : '')));
    const pageNo = cursors.length + 1;
    render(results,
      h('p.hint', { text: `Page ${pageNo}: ${page.items.length} record${page.items.length === 1 ? '' : 's'}.` }),
      table(['#', 'Time', 'Actor', 'Action', 'Target', 'Cache', 'Outcome', 'Source', 'Details'], rows, 'Audit records'),
      h('div.toolbar', {},
        h('button.secondary', { type: 'button', text: 'Previous page', disabled: cursors.length === 0, onclick: () => { cursors.pop(); search(cursors[cursors.length - 1]); } }),
        h('button.secondary', { type: 'button', text: 'Next page', disabled: !page.next_cursor, onclick: () => { cursors.push(page.next_cursor); search(page.next_cursor); } }),
        h('button.secondary', { type: 'button', text: 'Export JSON lines', onclick: exportJsonl })));
  };
  const exportJsonl = async () => {
    try {
      const res = await api(`/v1/audit?${qs({ ...filters(), format: 'jsonl', limit: 1000 })}`, { accept: 'application/jsonl', raw: true });
      downloadBlob(await res.blob(), 'audit.jsonl');
    } catch (e) { announce(e.message, 'error'); }
  };
  const verify = async () => {
    render(chain, h('p.loading', { text: 'Verifying the hash chain…' }));
    try {
      const r = await api('/v1/audit/verify');
      render(chain, r.ok
        ? h('p.ok', { role: 'status', text: `Chain verified: all ${fmtInt(r.records)} records link up.` })
        : h('p.error', { role: 'alert', text: `Chain broken at record #${r.first_broken_seq}: ${r.reason || 'hash mismatch'}.` }));
    } catch (e) {
      render(chain, errorBox(e));
    }
  };
  render(view,
    h('h1', { text: 'Audit log' }),
    h('div.section-head', {}, chain, h('button.secondary', { type: 'button', text: 'Verify again', onclick: verify })),
    h('form.filters', {
      'aria-label': 'Filter the audit log',
      onsubmit: (e) => { e.preventDefault(); cursors.length = 0; search(); },
    },
    h('div.row', {}, field('Actor', actor), field('Action', action), field('Cache id', cache), field('Outcome', outcome),
      field('From', from), field('To', to), field('Per page', size)),
    h('button', { type: 'submit', text: 'Search' })),
    results,
  );
  await Promise.all([verify(), search()]);
}

// ---------------------------------------------------------------- start

document.getElementById('logout').addEventListener('click', () => logout('You are logged out.'));
window.addEventListener('hashchange', () => {
  if (location.hash.startsWith('#/')) route();
});
route();
