// rbee console: the fleet live from the queen's watch, spawn/delete/logs, and chat. Plain JS, no
// build step, nothing loaded from elsewhere.
'use strict';

const $ = (s) => document.querySelector(s);
const HDR = { 'X-Rbee-Console': '1' }; // every state-changing call sends it (cross-site guard)
const ROW_H = 26;

const st = {
  session: null,
  workers: new Map(),    // id -> worker, as shown
  staging: null,         // Map during a snapshot (after connect or RESET); swapped in at SYNCED
  hives: [],
  ids: [], idsDirty: true,
  shown: [], filterDirty: true, viewDirty: true,
  byState: new Map(), models: new Map(), byHive: new Map(), // counts
  selected: null,
  beats: new Map(),
  pendingSpawn: new Map(), // id -> t0
  gone: new Map(),         // id -> why, the last removals (a spawn's answer may come after its worker died)
  applied: [],           // ops applied since the last frame (for the trace)
};

// Test and measurement hooks: window.rbee.trace = [] makes every frame record [id, state, ms].
window.rbee = { trace: null, works: null, frames: 0, maxFrameWork: 0, resets: 0, minSize: null, st };

// ---------- session and login ----------

async function api(path, opts = {}) {
  const r = await fetch(path, { credentials: 'same-origin', ...opts, headers: { ...(opts.headers || {}), ...HDR } });
  let body = null;
  const ct = r.headers.get('Content-Type') || '';
  if (ct.includes('json')) body = await r.json().catch(() => null);
  return { ok: r.ok, status: r.status, body };
}

async function start() {
  const r = await api('/api/session');
  st.session = r.body || {};
  if (!st.session.open && !st.session.role) { showLogin(); return; }
  showApp();
}

function showLogin(msg) {
  $('#app').hidden = true;
  $('#login').hidden = false;
  $('#logout').hidden = true;
  $('#login-error').textContent = msg || '';
  $('#secret').focus();
}

function showApp() {
  $('#login').hidden = true;
  $('#app').hidden = false;
  const s = st.session;
  document.body.classList.toggle('role-chat', s.role === 'chat');
  $('#who').textContent = s.open ? 'open (loopback, no token)' : (s.role === 'chat' ? 'API key: watch and chat' : 'cluster token');
  $('#logout').hidden = !!s.open;
  $('#d-logs').disabled = !s.logs;
  $('#d-logs').title = s.logs ? '' : 'this queen cannot relay worker logs yet';
  $('#chat-send').disabled = !s.chat;
  if (!s.chat) $('#chat-status').textContent = 'This queen serves no OpenAI API (--http-listen off): no chat.';
  connect();
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const r = await api('/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ secret: $('#secret').value }) });
  $('#secret').value = '';
  if (!r.ok) { showLogin((r.body && r.body.error) || ('login failed: HTTP ' + r.status)); return; }
  st.session = r.body;
  showApp();
});

$('#logout').addEventListener('click', async () => {
  await api('/api/logout', { method: 'POST' });
  clearTimeout(retryTimer);
  if (es) { es.close(); es = null; }
  // Nothing of the fleet stays on screen for whoever logs in next.
  st.workers = new Map(); st.byState = new Map(); st.models = new Map(); st.byHive = new Map(); st.hives = [];
  st.idsDirty = true; st.selected = null;
  $('#detail').hidden = true;
  $('#chat-out').textContent = '';
  renderHives();
  schedule();
  st.session = { open: false, role: '' };
  setConn('out', 'logged out');
  showLogin();
});

// ---------- the live stream ----------

let es = null, backoff = 500, retryTimer = 0;

function setConn(state, text) {
  const c = $('#conn');
  c.dataset.state = state;
  c.textContent = text || state;
}

function connect() {
  clearTimeout(retryTimer);
  if (es) es.close();
  setConn('connecting', 'connecting…');
  st.staging = new Map(); // the snapshot comes first; keep showing the old table until SYNCED
  es = new EventSource('/api/events');
  es.addEventListener('workers', (ev) => { for (const o of JSON.parse(ev.data)) applyOp(o); schedule(); });
  es.addEventListener('hives', (ev) => { st.hives = JSON.parse(ev.data); renderHives(); });
  es.onerror = () => {
    es.close();
    es = null;
    setConn('lost', 'connection lost: reconnecting…');
    retryTimer = setTimeout(async () => {
      try {
        const r = await api('/api/session');
        if (r.ok) {
          st.session = r.body;
          if (!r.body.open && !r.body.role) { showLogin('Your session ended: log in again.'); return; }
          backoff = 500;
          connect();
          return;
        }
      } catch (e) { /* the queen is still away */ }
      backoff = Math.min(backoff * 2, 8000);
      es = null;
      setConn('lost', 'connection lost: retrying in ' + (backoff / 1000) + 's');
      retryTimer = setTimeout(() => es || connect(), backoff);
    }, backoff);
  };
}

function count(map, k, d) {
  const n = (map.get(k) || 0) + d;
  if (n <= 0) map.delete(k); else map.set(k, n);
}

function put(target, w) {
  const old = target.get(w.id);
  target.set(w.id, w);
  if (target !== st.workers) return;
  if (old) { count(st.byState, old.state, -1); count(st.models, old.model, -1); count(st.byHive, old.hive, -1); } else st.idsDirty = true;
  count(st.byState, w.state, 1);
  count(st.models, w.model, 1);
  count(st.byHive, w.hive, 1);
}

function drop(id) {
  const old = st.workers.get(id);
  if (!old) return;
  st.workers.delete(id);
  count(st.byState, old.state, -1);
  count(st.models, old.model, -1);
  count(st.byHive, old.hive, -1);
  st.idsDirty = true;
}

function applyOp(o) {
  switch (o.t) {
    case 'x': // RESET: the queen dropped changes for us; a fresh snapshot follows
      st.staging = new Map();
      window.rbee.resets++;
      return;
    case 's': // the snapshot is complete: swap it in, in one frame
      if (st.staging) {
        st.workers = new Map(); st.byState = new Map(); st.models = new Map(); st.byHive = new Map();
        for (const w of st.staging.values()) put(st.workers, w);
        st.staging = null;
        st.idsDirty = true;
        for (const [id, t0] of st.pendingSpawn) if (!st.workers.has(id)) spawnEnded(id, t0, null, 'gone while the console was reconnecting');
      }
      backoff = 500;
      setConn('live', 'live');
      return;
    case 'a':
    case 'u':
      if (st.staging) { st.staging.set(o.w.id, o.w); return; }
      put(st.workers, o.w);
      break;
    case 'r':
      if (st.staging) { st.staging.delete(o.w.id); return; }
      drop(o.w.id);
      st.gone.set(o.w.id, o.reason || 'removed');
      if (st.gone.size > 200) st.gone.delete(st.gone.keys().next().value);
      notice(`${o.w.id} (${o.w.model} on ${o.w.hive}) removed${o.reason ? ': ' + o.reason : ''}`);
      break;
  }
  st.filterDirty = true;
  if (window.rbee.trace) st.applied.push(o);
  const t0 = st.pendingSpawn.get(o.w.id);
  if (t0 !== undefined) {
    if (o.t === 'r') spawnEnded(o.w.id, t0, null, o.reason || 'removed');
    else if (o.w.state === 'READY' || o.w.state === 'BUSY') spawnEnded(o.w.id, t0, o.w);
    else $('#sp-status').textContent = `${o.w.id}: ${o.w.state}…`;
  }
  if (st.selected === o.w.id) renderDetail();
}

let rafPending = false;
function schedule() {
  if (!rafPending) { rafPending = true; requestAnimationFrame(frame); }
}

const filters = { hive: '', model: '', state: '', text: '' };
function matches(w) {
  return (!filters.hive || w.hive === filters.hive) && (!filters.model || w.model === filters.model) &&
    (!filters.state || w.state === filters.state) && (!filters.text || w.id.includes(filters.text));
}

// frame applies everything that arrived since the last frame: at most one filter pass over the
// workers and one repaint of the visible rows, however many changes came in.
function frame() {
  rafPending = false;
  const t0 = performance.now();
  if (st.idsDirty) {
    st.ids = Array.from(st.workers.keys()).sort();
    st.idsDirty = false;
    st.filterDirty = true;
    renderHives(); // worker counts per hive
    refreshChoices();
  }
  if (st.filterDirty) {
    const any = filters.hive || filters.model || filters.state || filters.text;
    st.shown = any ? st.ids.filter((id) => matches(st.workers.get(id))) : st.ids;
    st.filterDirty = false;
    st.viewDirty = true;
    renderCounts();
  }
  if (st.viewDirty) { renderRows(); st.viewDirty = false; }
  if (window.rbee.minSize !== null) window.rbee.minSize = Math.min(window.rbee.minSize, st.workers.size);
  const work = performance.now() - t0;
  window.rbee.frames++;
  if (work > window.rbee.maxFrameWork) window.rbee.maxFrameWork = work;
  if (window.rbee.works) window.rbee.works.push(work);
  if (window.rbee.trace && st.applied.length) {
    const now = Date.now();
    for (const o of st.applied) window.rbee.trace.push([o.w.id, o.t === 'r' ? 'REMOVED' : o.w.state, now]);
  }
  st.applied.length = 0;
}

// ---------- rendering ----------

function renderCounts() {
  const parts = [`${st.workers.size} workers`];
  for (const s of ['STARTING', 'READY', 'BUSY', 'UNHEALTHY', 'STOPPING', 'STALE']) {
    const n = st.byState.get(s);
    if (n) parts.push(`${n} ${s}`);
  }
  $('#counts').textContent = parts.join(' · ');
  $('#shown').textContent = st.shown.length === st.workers.size ? '' : `${st.shown.length} shown`;
}

const scroller = $('#wscroll'), spacer = $('#wspacer'), rowsEl = $('#wrows');
const pool = [];
scroller.addEventListener('scroll', () => { st.viewDirty = true; schedule(); }, { passive: true });
window.addEventListener('resize', () => { st.viewDirty = true; schedule(); });

function ago(ms) {
  if (!ms) return '';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm';
  if (s < 86400) return Math.floor(s / 3600) + 'h';
  return Math.floor(s / 86400) + 'd';
}

function makeRow() {
  const r = document.createElement('div');
  r.className = 'row';
  for (let i = 0; i < 10; i++) r.appendChild(document.createElement('span'));
  r.addEventListener('click', () => select(r.dataset.id));
  rowsEl.appendChild(r);
  return r;
}

function setCell(r, i, v) {
  const c = r.children[i];
  if (c.textContent !== v) c.textContent = v;
}

// renderRows draws only the rows in view (virtualised): the DOM holds a few dozen rows whatever
// the fleet's size.
function renderRows() {
  const total = st.shown.length;
  const h = total * ROW_H;
  if (spacer.style.height !== h + 'px') spacer.style.height = h + 'px';
  // As tall as its rows, up to half the window; then it scrolls.
  const box = Math.round(Math.max(3 * ROW_H, Math.min(window.innerHeight * 0.5, h + 2))) + 'px';
  if (scroller.style.height !== box) scroller.style.height = box;
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - 2);
  const n = Math.min(total - first, Math.ceil(scroller.clientHeight / ROW_H) + 5);
  rowsEl.style.transform = `translateY(${first * ROW_H}px)`;
  while (pool.length < n) pool.push(makeRow());
  for (let i = 0; i < pool.length; i++) {
    const r = pool[i];
    if (i >= n) { if (!r.hidden) r.hidden = true; continue; }
    const w = st.workers.get(st.shown[first + i]);
    if (r.hidden) r.hidden = false;
    if (r.dataset.id !== w.id) r.dataset.id = w.id;
    r.classList.toggle('sel', w.id === st.selected);
    setCell(r, 0, w.id); setCell(r, 1, w.hive); setCell(r, 2, w.model); setCell(r, 3, w.device);
    setCell(r, 4, w.state);
    if (r.children[4].dataset.s !== w.state) r.children[4].dataset.s = w.state;
    const why = w.status_message || '';
    if (r.children[4].title !== why) r.children[4].title = why; // why it is UNHEALTHY
    setCell(r, 5, w.pid ? String(w.pid) : ''); setCell(r, 6, w.port ? String(w.port) : '');
    setCell(r, 7, w.in_flight !== undefined ? `${w.in_flight}${w.concurrency ? '/' + w.concurrency : ''}` : '');
    setCell(r, 8, ago(st.beats.get(w.id) || w.beat)); setCell(r, 9, ago(w.created));
  }
}

function visibleIds() {
  return pool.filter((r) => !r.hidden && r.dataset.id).map((r) => r.dataset.id);
}

// Heartbeats are not changes (the watch leaves them out); ask for the rows on screen.
setInterval(async () => {
  if (document.hidden || !es) return;
  const ids = visibleIds();
  if (st.selected && !ids.includes(st.selected)) ids.push(st.selected);
  if (!ids.length) { st.viewDirty = true; schedule(); return; }
  const r = await api('/api/beats?ids=' + encodeURIComponent(ids.join(','))).catch(() => null);
  if (r && r.ok) for (const [id, ms] of Object.entries(r.body)) st.beats.set(id, ms);
  st.viewDirty = true;
  schedule();
  if (st.selected) renderDetail();
}, 1000);

function devicesText(h) {
  return h.devices.map((d) => d.memory_total ? `${d.name} (${gib(d.memory_used)}/${gib(d.memory_total)} GiB${d.description ? ', ' + d.description : ''})` : d.name).join(', ');
}
function gib(b) { return ((b || 0) / 2 ** 30).toFixed(1); }

function renderHives() {
  const tb = $('#hives tbody');
  tb.textContent = '';
  for (const h of st.hives) {
    const tr = document.createElement('tr');
    // No catalog (null): the hive runs any model with its worker binary.
    const models = h.models && h.models.length ? h.models.map((m) => m.name).join(', ') : 'any (no catalog)';
    // The count comes from the live table, not from the hive list (sent only when a hive changes).
    for (const v of [h.id, h.state, h.address, h.version || '', devicesText(h), models, String(st.byHive.get(h.id) || 0), String(h.free_ports)]) {
      const td = document.createElement('td');
      td.textContent = v;
      tr.appendChild(td);
    }
    tr.children[1].dataset.s = h.state;
    tb.appendChild(tr);
  }
  if (!st.hives.length) tb.innerHTML = '<tr><td colspan="8">no hive yet: start one (hive --queen …) or give the queen --hive ID=HOST:PORT</td></tr>';
  refreshChoices();
}

function setOptions(sel, values, keepFirst) {
  const want = values.join('\n');
  if (sel.dataset.v === want) return;
  sel.dataset.v = want;
  const cur = sel.value;
  // A <select> and a <datalist> alike: children are the options.
  while (sel.children.length > (keepFirst ? 1 : 0)) sel.lastElementChild.remove();
  for (const v of values) sel.appendChild(new Option(v, v));
  sel.value = cur;
}

function refreshChoices() {
  const hiveIds = st.hives.map((h) => h.id);
  setOptions($('#f-hive'), hiveIds, true);
  setOptions($('#sp-hive'), hiveIds, true);
  const models = new Set(st.models.keys());
  const devices = new Set(['cpu']);
  for (const h of st.hives) {
    for (const m of h.models || []) models.add(m.name);
    for (const d of h.devices) devices.add(d.name);
  }
  const ms = Array.from(models).filter(Boolean).sort();
  setOptions($('#f-model'), ms, true);
  setOptions($('#models'), ms, false);
  setOptions($('#devices'), Array.from(devices).sort(), false);
}

for (const [id, key] of [['#f-hive', 'hive'], ['#f-model', 'model'], ['#f-state', 'state'], ['#f-text', 'text']]) {
  $(id).addEventListener('input', (ev) => { filters[key] = ev.target.value.trim(); st.filterDirty = true; schedule(); });
}

function notice(text) {
  const li = document.createElement('li');
  li.textContent = new Date().toLocaleTimeString() + '  ' + text;
  const ol = $('#notices');
  ol.prepend(li);
  while (ol.children.length > 50) ol.lastChild.remove();
}

// ---------- spawn ----------

$('#spawn').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const body = { model: $('#sp-model').value.trim(), hive: $('#sp-hive').value, device: $('#sp-device').value.trim() };
  $('#sp-status').textContent = 'spawning…';
  const t0 = performance.now();
  const r = await api('/api/workers', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  if (!r.ok) { $('#sp-status').textContent = 'spawn failed: ' + ((r.body && r.body.error) || 'HTTP ' + r.status); return; }
  const w = r.body;
  if (st.gone.has(w.id)) { spawnEnded(w.id, t0, null, st.gone.get(w.id)); return; }
  const cur = st.workers.get(w.id);
  if (cur && (cur.state === 'READY' || cur.state === 'BUSY')) { spawnEnded(w.id, t0, cur); return; }
  st.pendingSpawn.set(w.id, t0);
  $('#sp-status').textContent = `${w.id} on ${w.hive}: ${w.state}…`;
});

function spawnEnded(id, t0, w, reason) {
  st.pendingSpawn.delete(id);
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  const msg = w ? `${id} READY on ${w.hive} in ${secs}s` : `${id} failed after ${secs}s: ${reason}`;
  $('#sp-status').textContent = msg;
  notice(msg);
}

// ---------- detail, delete, logs ----------

let logAbort = null;

function select(id) {
  if (st.selected !== id && logAbort) { logAbort.abort(); logAbort = null; }
  st.selected = id;
  $('#d-outcome').textContent = '';
  $('#d-log').textContent = '';
  $('#d-log').hidden = true;
  $('#d-logs').textContent = 'Follow log';
  $('#detail').hidden = false;
  renderDetail();
  st.viewDirty = true;
  schedule();
}

function renderDetail() {
  const id = st.selected;
  const w = st.workers.get(id);
  $('#d-title').textContent = id;
  const s = $('#d-state');
  s.textContent = w ? w.state : 'gone';
  s.dataset.s = w ? w.state : 'STALE';
  $('#d-delete').disabled = !w;
  if (!w) return;
  const beat = st.beats.get(id) || w.beat;
  $('#d-info').textContent = [`model ${w.model}`, `hive ${w.hive}`, `device ${w.device}`, w.pid ? `PID ${w.pid}` : 'no process yet',
    w.port ? `port ${w.port}` : '', w.address ? `address ${w.address}` : '', beat ? `last beat ${ago(beat)} ago` : 'no beat yet',
    `age ${ago(w.created)}`, w.status_message ? `status: ${w.status_message}` : ''].filter(Boolean).join(' · ');
}

$('#d-close').addEventListener('click', () => {
  if (logAbort) { logAbort.abort(); logAbort = null; }
  st.selected = null;
  $('#detail').hidden = true;
  st.viewDirty = true;
  schedule();
});

$('#d-delete').addEventListener('click', async () => {
  const id = st.selected;
  const grace = $('#d-grace').value.trim();
  $('#d-outcome').textContent = `deleting ${id}…`;
  const r = await api(`/api/workers/${encodeURIComponent(id)}` + (grace ? '?grace=' + encodeURIComponent(grace) : ''), { method: 'DELETE' });
  const msg = r.ok ? `${id} deleted: ${r.body.outcome}` : `delete of ${id} failed: ${(r.body && r.body.error) || 'HTTP ' + r.status}`;
  $('#d-outcome').textContent = msg;
  notice(msg);
});

// readSSE calls onEvent(type, data) for each event of a fetch response's body.
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let type = 'message', data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) type = line.slice(6).trim();
        else if (line.startsWith('data:')) data += line.slice(line[5] === ' ' ? 6 : 5);
      }
      if (data !== '' && onEvent(type, data) === false) { reader.cancel(); return; }
    }
  }
}

$('#d-logs').addEventListener('click', async () => {
  if (logAbort) { logAbort.abort(); logAbort = null; $('#d-logs').textContent = 'Follow log'; return; }
  const id = st.selected, pre = $('#d-log');
  pre.hidden = false;
  pre.textContent = '';
  logAbort = new AbortController();
  $('#d-logs').textContent = 'Stop following';
  try {
    const resp = await fetch(`/api/workers/${encodeURIComponent(id)}/logs?follow=1&tail=200`, { signal: logAbort.signal, headers: HDR });
    if (!resp.ok) {
      const b = await resp.json().catch(() => ({}));
      pre.textContent = `no log: ${b.error || 'HTTP ' + resp.status}`;
      return;
    }
    await readSSE(resp, (type, data) => {
      const text = JSON.parse(data);
      if (type === 'end') { pre.append(`\n[${text}]`); return false; }
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(text);
      if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-150000);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    });
  } catch (e) {
    if (e.name !== 'AbortError') pre.append(`\n[log stream broken: ${e.message}]`);
  } finally {
    if (st.selected === id) $('#d-logs').textContent = 'Follow log';
    logAbort = null;
  }
});

// ---------- chat ----------

$('#chat').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const model = $('#chat-model').value.trim(), prompt = $('#chat-prompt').value;
  const out = $('#chat-out'), status = $('#chat-status');
  out.textContent = '';
  $('#chat-send').disabled = true;
  const warm = Array.from(st.workers.values()).some((w) => w.model === model && (w.state === 'READY' || w.state === 'BUSY'));
  status.textContent = warm ? 'waiting for the first token…' : `${model} is cold: starting a worker, the first token waits for it…`;
  const t0 = performance.now();
  let first = 0, last = 0, tokens = 0;
  const stats = () => {
    const ttft = ((first - t0) / 1000).toFixed(2);
    const rate = tokens > 1 && last > first ? ((tokens - 1) / ((last - first) / 1000)).toFixed(1) : '–';
    return `time to first token ${ttft}s · ${tokens} tokens · ${rate} tokens/s`;
  };
  try {
    const resp = await fetch('/api/chat', {
      method: 'POST', headers: { ...HDR, 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify({ model, stream: true, messages: [{ role: 'user', content: prompt }] }),
    });
    if (!resp.ok) {
      const b = await resp.json().catch(() => ({}));
      status.textContent = 'chat failed: ' + ((b.error && (b.error.message || b.error)) || 'HTTP ' + resp.status);
      return;
    }
    await readSSE(resp, (type, data) => {
      if (data.trim() === '[DONE]') return false;
      const j = JSON.parse(data);
      if (j.error) { status.textContent = 'chat failed: ' + (j.error.message || JSON.stringify(j.error)); return false; }
      const c = j.choices && j.choices[0];
      const piece = c && ((c.delta && c.delta.content) || c.text || '');
      if (!piece) return;
      const now = performance.now();
      if (!first) first = now;
      last = now;
      tokens++;
      out.append(piece);
      status.textContent = stats();
    });
    status.textContent = first ? stats() + ' · done' : 'the answer was empty';
  } catch (e) {
    status.textContent = 'chat broken: ' + e.message;
  } finally {
    $('#chat-send').disabled = !st.session.chat;
  }
});

start();
