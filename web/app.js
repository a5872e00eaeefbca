// app.js owns the behaviour of the domainrag web UI: calls to the JSON API (with the API key kept
// in this browser), the collection and
// adapter pickers, document upload with ingest-job polling, the streamed chat (SSE over fetch),
// citation chips and the source panel (the Adapt card is adapt.js's). No framework, no dependencies; all text goes in through
// textContent, never innerHTML.
'use strict';

(() => {
  const POLL_MS = 500;
  const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const STORE_KEY = 'domainrag.collection';
  const KEY_STORE = 'domainrag.apiKey';
  const SESSION_STORE = 'domainrag.session';
  const MAX_DOCS_SHOWN = 300;
  const FINISHED = ['done', 'failed', 'cancelled'];

  const $ = (id) => document.getElementById(id);
  const el = {
    banner: $('error-banner'), bannerText: $('error-text'), bannerClose: $('error-close'),
    layout: $('layout'),
    collection: $('collection-select'), info: $('collection-info'),
    adapter: $('adapter-select'), adapterSave: $('adapter-save'),
    uploadForm: $('upload-form'), uploadInput: $('upload-input'), uploadButton: $('upload-button'),
    job: $('job-status'),
    docsDetails: $('documents-details'), docsCount: $('documents-count'), docsList: $('documents-list'),
    createForm: $('create-form'), newName: $('new-collection-name'), createButton: $('create-collection'),
    messages: $('messages'), emptyChat: $('empty-chat'), clearChat: $('clear-chat'),
    askForm: $('ask-form'), question: $('question'), send: $('send'), stop: $('stop'),
    blind: $('blind'), blindLabel: $('blind-label'),
    keyDetails: $('key-details'), keyForm: $('key-form'), keyInput: $('api-key'),
    keyForget: $('key-forget'), keyState: $('key-state'),
    panel: $('source-panel'), panelTitle: $('source-title'), panelPath: $('source-path'),
    panelMeta: $('source-meta'), panelText: $('source-text'), panelClose: $('source-close'),
    backdrop: $('backdrop'),
  };

  const state = {
    collections: [],   // GET /api/collections
    adapters: [],      // GET /api/adapters
    current: null,     // GET /api/collections/{name} of the selected collection
    selectSeq: 0,      // guards against out-of-order collection loads
    jobActive: false,
    asking: null,      // AbortController of the answer being streamed
    panelReturnFocus: null,
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // Turns a non-2xx response into an ApiError carrying the server's {"error": {code, message}}.
  async function errorFrom(res) {
    let text = '';
    try { text = await res.text(); } catch (_) { /* body unreadable */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error) {
        return new ApiError(res.status, body.error.code || '', body.error.message || String(body.error));
      }
    } catch (_) { /* not JSON */ }
    const fallback = text.trim().slice(0, 300) || res.statusText || 'request failed';
    return new ApiError(res.status, '', `HTTP ${res.status}: ${fallback}`);
  }

  async function request(method, path, { json, body, signal, headers } = {}) {
    const init = { method, headers: { Accept: 'application/json', ...(headers || {}) }, signal };
    const key = localStorage.getItem(KEY_STORE);
    if (key) init.headers.Authorization = `Bearer ${key}`;
    if (json !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(json);
    } else if (body !== undefined) {
      init.body = body;
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new ApiError(0, 'network', 'Cannot reach the domainrag server. Is it running?');
    }
    if (!res.ok) {
      const err = await errorFrom(res);
      if (res.status === 401) {
        el.keyDetails.open = true;
        renderKeyState();
        err.message = `${err.message} Paste a key under "API key".`;
      }
      throw err;
    }
    return res;
  }

  // ---------------------------------------------------------------- API key

  function renderKeyState() {
    el.keyState.textContent = localStorage.getItem(KEY_STORE) ? '(set)' : '(none)';
  }

  async function useKey(e) {
    e.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    el.keyInput.value = '';
    el.keyDetails.open = false;
    renderKeyState();
    hideError();
    await reload();
  }

  async function forgetKey() {
    localStorage.removeItem(KEY_STORE);
    renderKeyState();
    await reload();
  }

  // A job's file, fetched with the key and saved (a plain link would not carry it).
  async function download(path, name) {
    try {
      const res = await request('GET', path, { headers: { Accept: '*/*' } });
      const url = URL.createObjectURL(await res.blob());
      const a = h('a', { href: url, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      showError(err, `Downloading ${name}`);
    }
  }

  async function api(method, path, options) {
    const res = await request(method, path, options);
    if (res.status === 204) return null;
    const text = await res.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      throw new ApiError(res.status, 'bad_response', `The server sent a response that is not JSON (${path}).`);
    }
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- helpers

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function showError(err, context) {
    if (err && err.name === 'AbortError') return;
    const message = (err && err.message) || String(err);
    const code = err && err.code ? ` (${err.code})` : '';
    el.bannerText.textContent = (context ? `${context}: ` : '') + message + code;
    el.banner.hidden = false;
    console.error(context || 'domainrag', err);
  }

  function hideError() {
    el.banner.hidden = true;
    el.bannerText.textContent = '';
  }

  function fmtMs(ms) {
    if (typeof ms !== 'number' || !isFinite(ms)) return '?';
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function fmtTime(seconds) {
    if (typeof seconds !== 'number' || !seconds) return '';
    return new Date(seconds * 1000).toLocaleString();
  }

  function fmtBytes(n) {
    if (typeof n !== 'number') return '';
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? '' : 's'}`;
  }

  function adapterLabel(name) {
    return name ? name : 'none (base model)';
  }

  function currentName() {
    return el.collection.value || '';
  }

  // ---------------------------------------------------------------- collections

  async function loadCollections(preferred) {
    const list = await api('GET', 'api/collections');
    state.collections = Array.isArray(list) ? list : [];
    const previous = preferred || currentName() || localStorage.getItem(STORE_KEY) || '';
    el.collection.replaceChildren();
    if (state.collections.length === 0) {
      el.collection.append(h('option', { value: '', text: 'No collections yet: create one below' }));
      el.collection.disabled = true;
      await selectCollection('');
      return;
    }
    for (const c of state.collections) {
      const detail = c.damaged ? `damaged: ${c.error}` : plural(c.documents, 'document');
      el.collection.append(h('option', { value: c.name, text: `${c.name} (${detail})` }));
    }
    el.collection.disabled = false;
    const names = state.collections.map((c) => c.name);
    const pick = names.includes(previous) ? previous : names[0];
    el.collection.value = pick;
    await selectCollection(pick);
  }

  async function selectCollection(name) {
    const seq = ++state.selectSeq;
    state.current = null;
    if (name) localStorage.setItem(STORE_KEY, name);
    renderInfo();
    updateControls();
    if (!name) {
      renderDocuments([]);
      document.dispatchEvent(new CustomEvent('domainrag:collection', { detail: { name: '' } }));
      return;
    }
    try {
      const [detail, docs] = await Promise.all([
        api('GET', `api/collections/${enc(name)}`),
        api('GET', `api/collections/${enc(name)}/documents`),
      ]);
      if (seq !== state.selectSeq) return;
      state.current = detail;
      renderInfo();
      renderAdapterOptions();
      renderDocuments(Array.isArray(docs) ? docs : []);
      document.dispatchEvent(new CustomEvent('domainrag:collection', { detail: { name } }));
    } catch (err) {
      if (seq !== state.selectSeq) return;
      showError(err, `Loading collection ${name}`);
    } finally {
      if (seq === state.selectSeq) updateControls();
    }
  }

  function renderInfo() {
    const c = state.current;
    el.info.replaceChildren();
    if (!c) return;
    const rows = [
      ['Documents', c.documents],
      ['Chunks', c.chunks],
      ['Vectors', c.vectors],
      ['Adapter', adapterLabel(c.adapter), 'collection-adapter'],
      ['Embedding', c.embedding_model],
    ];
    if (c.chunking && typeof c.chunking === 'object') {
      rows.push(['Chunking', `${c.chunking.max_words} words, ${c.chunking.overlap_words} overlap`]);
    }
    if (c.fusion && typeof c.fusion === 'object') {
      const f = c.fusion;
      let text = f.method || '';
      if (f.method === 'rrf' && f.rrf_k !== undefined) text += ` (k ${f.rrf_k})`;
      else if (f.bm25_weight !== undefined) text += ` (bm25 ${f.bm25_weight}, dense ${f.dense_weight})`;
      rows.push(['Fusion', text]);
    }
    if (c.bm25 && typeof c.bm25 === 'object') {
      const b = c.bm25;
      rows.push(['BM25', `title weight ${b.title_weight}, window weight ${b.window_weight}, pair weight ${b.pair_weight}, k1 ${b.k1}, b ${b.b}`]);
    }
    if (c.created_at) rows.push(['Created', fmtTime(c.created_at)]);
    for (const [key, value, testid] of rows) {
      if (value === undefined || value === null || value === '') continue;
      el.info.append(h('div', { class: 'fact' },
        h('dt', { text: key }), h('dd', { text: String(value), 'data-testid': testid })));
    }
  }

  function renderDocuments(docs) {
    el.docsList.replaceChildren();
    el.docsCount.textContent = currentName() ? `(${docs.length})` : '';
    if (docs.length === 0) {
      el.docsList.append(h('li', { class: 'muted', text: currentName() ? 'No documents yet.' : 'No collection selected.' }));
      return;
    }
    const sorted = docs.slice().sort((a, b) => (b.ingested_at || 0) - (a.ingested_at || 0));
    for (const d of sorted.slice(0, MAX_DOCS_SHOWN)) {
      el.docsList.append(h('li', { class: 'doc' },
        h('span', { class: 'doc-title', text: d.title || d.doc_id }),
        h('span', { class: 'doc-meta', text: `${plural(d.chunks, 'chunk')} · ${d.source || d.doc_id}`, title: fmtTime(d.ingested_at) }),
      ));
    }
    if (sorted.length > MAX_DOCS_SHOWN) {
      el.docsList.append(h('li', { class: 'muted', text: `and ${sorted.length - MAX_DOCS_SHOWN} more` }));
    }
  }

  async function createCollection(event) {
    event.preventDefault();
    const name = el.newName.value.trim();
    if (!NAME_RE.test(name)) {
      showError(new Error('Use 1 to 64 lowercase letters, digits, - or _, starting with a letter or digit.'),
        'Collection name');
      el.newName.focus();
      return;
    }
    el.createButton.disabled = true;
    try {
      await api('POST', 'api/collections', { json: { name } });
      hideError();
      el.newName.value = '';
      note(`Created collection ${name}.`);
      await loadCollections(name);
      el.uploadInput.focus();
    } catch (err) {
      showError(err, `Creating ${name}`);
    } finally {
      el.createButton.disabled = false;
    }
  }

  // ---------------------------------------------------------------- adapters

  async function loadAdapters() {
    try {
      const list = await api('GET', 'api/adapters');
      state.adapters = Array.isArray(list) ? list : [];
    } catch (err) {
      state.adapters = [];
      showError(err, 'Loading adapters');
    }
    renderAdapterOptions();
  }

  function renderAdapterOptions() {
    const keep = el.adapter.value || 'default';
    const collAdapter = state.current ? state.current.adapter : undefined;
    const defaultText = collAdapter === undefined
      ? 'collection default'
      : `collection default (${collAdapter ? collAdapter : 'base model'})`;
    el.adapter.replaceChildren(h('option', { value: 'default', text: defaultText }));
    for (const a of state.adapters) {
      const method = a.kind === 'ia3' ? '(IA)³'
        : (a.kind === 'prompt' || a.kind === 'prefix') ? `${a.kind} tuning, ${a.virtual_tokens} tokens`
          : (a.rank !== undefined ? `r${a.rank}` : '');
      const details = [method, fmtBytes(a.size_bytes)].filter(Boolean).join(', ');
      el.adapter.append(h('option', { value: `a:${a.name}`, text: details ? `${a.name} (${details})` : a.name }));
    }
    el.adapter.append(h('option', { value: 'none', text: 'none (base model)' }));
    const values = Array.from(el.adapter.options, (o) => o.value);
    el.adapter.value = values.includes(keep) ? keep : 'default';
    updateAdapterSave();
    document.dispatchEvent(new CustomEvent('domainrag:adapters'));
  }

  // The adapter the next question asks for: undefined = collection default, null = base model.
  function chosenAdapter() {
    const v = el.adapter.value;
    if (v === 'none') return null;
    if (v.startsWith('a:')) return v.slice(2);
    return undefined;
  }

  function describeChoice() {
    const a = chosenAdapter();
    if (a === undefined) {
      const d = state.current ? state.current.adapter : undefined;
      return d === undefined ? 'the collection default' : `the collection default (${adapterLabel(d)})`;
    }
    return adapterLabel(a);
  }

  function updateAdapterSave() {
    const a = chosenAdapter();
    const show = !!state.current && a !== undefined && a !== state.current.adapter;
    el.adapterSave.hidden = !show;
  }

  async function saveAdapterDefault() {
    const name = currentName();
    const adapter = chosenAdapter();
    if (!name || adapter === undefined) return;
    el.adapterSave.disabled = true;
    try {
      const updated = await api('PATCH', `api/collections/${enc(name)}`, { json: { adapter } });
      hideError();
      if (updated && typeof updated === 'object') state.current = { ...state.current, ...updated };
      el.adapter.value = 'default';
      renderInfo();
      renderAdapterOptions();
      note(`${name} now answers with ${adapterLabel(adapter)} by default.`);
    } catch (err) {
      showError(err, 'Setting the collection adapter');
    } finally {
      el.adapterSave.disabled = false;
    }
  }

  // ---------------------------------------------------------------- upload and ingest jobs

  async function upload(event) {
    event.preventDefault();
    const name = currentName();
    const files = Array.from(el.uploadInput.files || []);
    if (!name) { showError(new Error('Create or pick a collection first.'), 'Upload'); return; }
    if (files.length === 0) { showError(new Error('Choose one or more files first.'), 'Upload'); return; }
    const form = new FormData();
    for (const f of files) form.append('files', f, f.name);
    state.jobActive = true;
    updateControls();
    renderJob({ status: 'uploading', collection: name, progress: { done: 0, total: files.length } });
    try {
      const res = await api('POST', `api/collections/${enc(name)}/documents`, { body: form });
      if (!res || !res.id) throw new ApiError(0, 'bad_response', 'The server did not return a job id.');
      hideError();
      el.uploadInput.value = '';
      await pollJob(res.id, name);
    } catch (err) {
      renderJob({ status: 'failed', collection: name, error: err.message });
      showError(err, 'Upload');
    } finally {
      state.jobActive = false;
      updateControls();
    }
  }

  async function pollJob(id, collection) {
    let misses = 0;
    for (;;) {
      let job;
      try {
        job = await api('GET', `api/jobs/${enc(id)}`);
        misses = 0;
      } catch (err) {
        misses += 1;
        if (misses >= 5 || (err.status >= 400 && err.status < 500)) throw err;
      }
      if (job) {
        renderJob(job);
        if (FINISHED.includes(job.status)) break;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    // Counts changed: refresh the list and, if it is still selected, the collection.
    try {
      await loadCollections(currentName() || collection);
    } catch (err) {
      showError(err, 'Refreshing collections');
    }
  }

  function renderJob(job) {
    const status = job.status || 'unknown';
    el.job.dataset.state = status;
    if (job.id) el.job.dataset.jobId = job.id;
    const progress = job.progress || {};
    const result = job.result || {};
    const total = typeof progress.total === 'number' ? progress.total : 0;
    const done = typeof progress.done === 'number' ? progress.done : 0;
    const label = {
      uploading: 'Uploading…', queued: 'Queued', running: 'Ingesting…', done: 'Done', failed: 'Failed',
    }[status] || status;
    const nodes = [
      h('div', { class: 'job-head' },
        h('span', { class: `pill pill-${status}`, text: label }),
        h('span', { class: 'job-coll', text: job.collection ? `into ${job.collection}` : '' })),
    ];
    if (status !== 'failed' || total > 0) {
      nodes.push(h('progress', { max: String(Math.max(total, 1)), value: String(done), 'aria-label': 'Files ingested' }));
    }
    const counts = [`${done} / ${total} files`];
    if (typeof result.documents === 'number') counts.push(plural(result.documents, 'document'));
    if (typeof result.chunks === 'number') counts.push(plural(result.chunks, 'chunk'));
    nodes.push(h('p', { class: 'job-counts', 'data-testid': 'job-counts', text: counts.join(' · ') }));
    if (job.error) nodes.push(h('p', { class: 'job-error', 'data-testid': 'job-error', text: job.error }));
    const failures = Array.isArray(result.failures) ? result.failures : [];
    if (failures.length) {
      nodes.push(h('p', { class: 'job-error', text: `${failures.length} file${failures.length > 1 ? 's' : ''} could not be ingested:` }));
      nodes.push(h('ul', { class: 'failures', 'data-testid': 'job-failures' },
        ...failures.map((f) => h('li', {}, h('span', { class: 'mono', text: f.source }), ': ', f.error))));
    }
    el.job.replaceChildren(...nodes);
  }

  // ---------------------------------------------------------------- chat

  function hideEmpty() {
    if (el.emptyChat && el.emptyChat.isConnected) el.emptyChat.remove();
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
  }

  function scrollToEnd(force) {
    if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
  }

  function note(text) {
    if (!el.messages.querySelector('.msg')) return;
    el.messages.append(h('p', { class: 'note', text }));
    scrollToEnd(true);
  }

  function clearChat() {
    if (state.asking) state.asking.abort();
    closeSource();
    el.messages.replaceChildren(el.emptyChat);
    el.question.focus();
  }

  // Incremental text/event-stream parser: feed it decoded text, it calls onEvent(type, data).
  function sseParser(onEvent) {
    let buffer = '';
    let type = '';
    let data = [];
    const dispatch = () => {
      if (data.length) onEvent(type || 'message', data.join('\n'));
      type = '';
      data = [];
    };
    const line = (text) => {
      if (text === '') { dispatch(); return; }
      if (text.startsWith(':')) return;
      const colon = text.indexOf(':');
      const field = colon === -1 ? text : text.slice(0, colon);
      let value = colon === -1 ? '' : text.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    };
    return {
      push(chunk) {
        buffer += chunk;
        let start = 0;
        for (let i = 0; i < buffer.length; i++) {
          const c = buffer[i];
          if (c !== '\n' && c !== '\r') continue;
          if (c === '\r' && i === buffer.length - 1) break; // may be half of \r\n: wait for more
          line(buffer.slice(start, i));
          if (c === '\r' && buffer[i + 1] === '\n') i++;
          start = i + 1;
        }
        buffer = buffer.slice(start);
      },
      end() {
        if (buffer) { line(buffer.replace(/\r$/, '')); buffer = ''; }
        dispatch();
      },
    };
  }

  function addUserMessage(question) {
    hideEmpty();
    el.messages.append(h('article', { class: 'msg user', 'data-testid': 'user-message' },
      h('div', { class: 'msg-label', text: 'You' }),
      h('div', { class: 'msg-text', text: question })));
  }

  function addAnswer(collection) {
    const text = h('div', { class: 'answer-text', 'data-testid': 'answer-text' });
    const label = h('div', { class: 'msg-label', text: `Answer · ${collection} · ${describeChoice()}` });
    const status = h('p', { class: 'answer-status', role: 'status', text: 'Retrieving sources…' });
    const node = h('article', { class: 'msg answer', 'data-testid': 'answer', 'data-state': 'streaming', 'aria-busy': 'true' },
      label, text, status);
    el.messages.append(node);
    scrollToEnd(true);
    return { node, text, status, label, collection };
  }

  function sourceFor(answer, n, chunkId) {
    const sources = Array.isArray(answer.sources) ? answer.sources : [];
    return sources.find((s) => chunkId && s.chunk_id === chunkId)
      || sources.find((s) => s.n === n)
      || null;
  }

  // Renders the final answer text with [n] markers as buttons that open their source.
  function renderAnswerText(target, answer) {
    const text = typeof answer.answer === 'string' ? answer.answer : target.textContent;
    target.replaceChildren();
    const re = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      target.append(text.slice(last, m.index));
      const nums = m[1].split(',').map((s) => parseInt(s.trim(), 10));
      if (nums.every((n) => sourceFor(answer, n))) {
        for (const n of nums) {
          target.append(h('button', {
            type: 'button', class: 'cite-ref', text: `[${n}]`, 'aria-label': `Show source ${n}`,
            onclick: (e) => openSource(sourceFor(answer, n), e.currentTarget),
          }));
        }
      } else {
        target.append(m[0]);
      }
      last = re.lastIndex;
    }
    target.append(text.slice(last));
  }

  function finishAnswer(view, answer) {
    view.node.dataset.state = 'done';
    view.node.removeAttribute('aria-busy');
    view.node.dataset.adapter = answer.adapter || '';
    view.label.textContent = `Answer · ${view.collection} · ${adapterLabel(answer.adapter)}`;
    renderAnswerText(view.text, answer);
    if (!view.text.textContent.trim()) view.text.textContent = '(empty answer)';

    const citations = Array.isArray(answer.citations) ? answer.citations : [];
    const chips = h('div', { class: 'chips', role: 'list', 'aria-label': 'Citations' });
    for (const c of citations) {
      const src = sourceFor(answer, c.n, c.chunk_id);
      const title = c.title || (src && src.title) || c.source || c.doc_id || `source ${c.n}`;
      chips.append(h('button', {
        type: 'button', class: 'chip', role: 'listitem', 'data-testid': 'citation', 'data-n': String(c.n),
        title: c.source || '', text: `[${c.n}] ${title}`,
        onclick: (e) => openSource(src || { ...c, text: '' }, e.currentTarget),
      }));
    }
    view.status.remove();
    if (citations.length) {
      view.node.append(chips);
    } else {
      view.node.append(h('p', { class: 'muted small', text: 'No sources cited.' }));
    }

    const sources = Array.isArray(answer.sources) ? answer.sources : [];
    if (sources.length) {
      const list = h('div', { class: 'chips' });
      for (const s of sources) {
        list.append(h('button', {
          type: 'button', class: 'chip secondary', 'data-testid': 'source-chip', title: s.source || '',
          text: `[${s.n}] ${s.title || s.source || s.doc_id}`,
          onclick: (e) => openSource(s, e.currentTarget),
        }));
      }
      view.node.append(h('details', { class: 'retrieved' },
        h('summary', { text: plural(sources.length, 'retrieved passage') }), list));
    }

    const t = answer.timings_ms || {};
    const meta = [
      adapterLabel(answer.adapter),
      `${answer.prompt_tokens ?? '?'} prompt + ${answer.completion_tokens ?? '?'} completion tokens`,
      `retrieve ${fmtMs(t.retrieve)}`, `first token ${fmtMs(t.first_token)}`, `total ${fmtMs(t.total)}`,
    ];
    // The arm stays out of sight (a user who knew it would rate it differently); tests read it.
    if (answer.experiment) view.node.dataset.arm = answer.experiment.arm;
    view.node.append(h('p', { class: 'meta', 'data-testid': 'answer-meta', text: meta.join(' · ') }));
    if (typeof answer.answer_id === 'string') view.node.append(feedbackBar(answer.answer_id));
  }

  // A blind comparison: both arms of the running experiment answer; the user sees "A" and "B"
  // (order drawn by the server, adapters not named) and picks the better one.
  async function askBlind(question, collection) {
    addUserMessage(question);
    el.question.value = '';
    autosize();
    const status = h('p', { class: 'answer-status', role: 'status', text: 'Answering with both arms…' });
    const node = h('article', { class: 'msg answer blind', 'data-testid': 'comparison', 'aria-busy': 'true' },
      h('div', { class: 'msg-label', text: `Blind comparison · ${collection}` }), status);
    el.messages.append(node);
    scrollToEnd(true);
    state.asking = new AbortController();
    updateControls();
    try {
      const r = await api('POST', `api/collections/${enc(collection)}/compare`,
        { json: { question, user: sessionId() }, signal: state.asking.signal });
      status.remove();
      const sides = h('div', { class: 'sides' });
      for (const a of r.answers) {
        const text = h('div', { class: 'answer-text', 'data-testid': 'side-text' });
        renderAnswerText(text, a);
        sides.append(h('section', { class: 'side', 'data-testid': `side-${a.label}` },
          h('h3', { class: 'msg-label', text: `Answer ${a.label}` }), text));
      }
      const done = h('span', { class: 'muted small', role: 'status', 'data-testid': 'prefer-status' });
      const pick = (preferred, label) => h('button', {
        type: 'button', class: 'chip secondary', 'data-testid': `prefer-${preferred}`, text: label,
        onclick: async () => {
          try {
            await api('POST', `api/collections/${enc(collection)}/compare/${enc(r.comparison_id)}`, { json: { preferred } });
            done.textContent = 'Thanks, recorded.';
          } catch (err) { showError(err, 'Comparison'); }
        },
      });
      node.append(sides, h('div', { class: 'feedback' }, h('span', { class: 'muted small', text: 'Which is better?' }),
        pick('a', 'A'), pick('tie', 'Tie'), pick('b', 'B'), done));
    } catch (err) {
      status.className = 'answer-status error';
      status.textContent = `Error${err.code ? ` (${err.code})` : ''}: ${err.message}`;
    } finally {
      node.removeAttribute('aria-busy');
      state.asking = null;
      updateControls();
      scrollToEnd(false);
    }
  }

  // This browser's session: experiments keep one arm per session (sent as the ask's `user`).
  function sessionId() {
    let id = '';
    try { id = localStorage.getItem(SESSION_STORE) || ''; } catch (_) { /* storage off */ }
    if (!id) {
      id = (crypto.randomUUID && crypto.randomUUID()) || `s-${Date.now()}-${Math.random().toString(16).slice(2)}`;
      try { localStorage.setItem(SESSION_STORE, id); } catch (_) { /* storage off */ }
    }
    return id;
  }

  // Thumbs up/down and an optional correction or comment, sent to POST /api/answers/{id}/feedback.
  function feedbackBar(answerId) {
    const sent = { rating: null };
    const status = h('span', { class: 'muted small', role: 'status', 'data-testid': 'feedback-status' });
    const send = async (feedback) => {
      try {
        await api('POST', `api/answers/${enc(answerId)}/feedback`, { json: feedback });
        status.textContent = 'Thanks, saved.';
        return true;
      } catch (err) {
        status.textContent = '';
        showError(err, 'Feedback');
        return false;
      }
    };
    const thumb = (rating, label) => {
      const button = h('button', {
        type: 'button', class: 'chip secondary thumb', 'aria-pressed': 'false',
        'data-testid': `thumb-${rating}`, text: label,
      });
      button.addEventListener('click', async () => {
        if (await send({ rating })) {
          sent.rating = rating;
          for (const b of bar.querySelectorAll('.thumb')) b.setAttribute('aria-pressed', 'false');
          button.setAttribute('aria-pressed', 'true');
        }
      });
      return button;
    };
    const correction = h('textarea', {
      rows: '3', class: 'correction', 'data-testid': 'correction-text', maxlength: '4000',
      'aria-label': 'The answer you would have wanted',
      placeholder: 'The answer you would have wanted (cite sources like [1])',
    });
    const comment = h('input', {
      type: 'text', 'data-testid': 'feedback-comment', maxlength: '2000', 'aria-label': 'Comment',
      placeholder: 'Comment (optional)',
    });
    const form = h('form', { class: 'correction-form', hidden: '', 'data-testid': 'correction-form' },
      correction, comment,
      h('button', { type: 'submit', class: 'button', 'data-testid': 'correction-send', text: 'Send' }));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const text = correction.value.trim();
      const note = comment.value.trim();
      if (!text && !note) { correction.focus(); return; }
      const body = { rating: sent.rating };
      if (text) body.correction = text;
      if (note) body.comment = note;
      if (await send(body)) form.hidden = true;
    });
    const bar = h('div', { class: 'feedback', 'data-testid': 'feedback' },
      h('span', { class: 'muted small', text: 'Was this helpful?' }),
      thumb('up', '▲ Yes'), thumb('down', '▼ No'),
      h('button', {
        type: 'button', class: 'chip secondary', 'data-testid': 'correct-button', text: 'Correct it',
        onclick: () => { form.hidden = !form.hidden; if (!form.hidden) correction.focus(); },
      }),
      status, form);
    return bar;
  }

  function failAnswer(view, message, stateName) {
    view.node.dataset.state = stateName || 'error';
    view.node.removeAttribute('aria-busy');
    view.status.className = stateName === 'stopped' ? 'answer-status muted' : 'answer-status error';
    view.status.setAttribute('role', stateName === 'stopped' ? 'status' : 'alert');
    view.status.dataset.testid = 'answer-error';
    view.status.textContent = message;
  }

  async function ask(event) {
    if (event) event.preventDefault();
    if (state.asking) return;
    const question = el.question.value.trim();
    const collection = currentName();
    if (!question) { el.question.focus(); return; }
    if (!collection) { showError(new Error('Create or pick a collection first.'), 'Ask'); return; }

    if (el.blind.checked && !el.blindLabel.hidden) { await askBlind(question, collection); return; }
    const body = { question, stream: true, user: sessionId() };
    const adapter = chosenAdapter();
    if (adapter !== undefined) body.adapter = adapter;

    addUserMessage(question);
    const view = addAnswer(collection);
    el.question.value = '';
    autosize();
    const controller = new AbortController();
    state.asking = controller;
    updateControls();

    let finished = false;
    let streamed = '';
    const onEvent = (type, data) => {
      if (finished) return;
      let payload;
      try { payload = JSON.parse(data); } catch (_) { payload = null; }
      if (type === 'token') {
        const piece = payload && typeof payload.text === 'string' ? payload.text : '';
        if (!streamed) view.status.textContent = 'Writing…';
        streamed += piece;
        view.text.append(piece);
        scrollToEnd(false);
      } else if (type === 'done') {
        finished = true;
        if (!payload || typeof payload !== 'object') {
          failAnswer(view, 'The server sent an unreadable final answer.');
          return;
        }
        if (typeof payload.answer !== 'string') payload.answer = streamed;
        finishAnswer(view, payload);
      } else if (type === 'error') {
        finished = true;
        const e = payload && payload.error ? payload.error : {};
        failAnswer(view, `Error${e.code ? ` (${e.code})` : ''}: ${e.message || data}`);
      }
    };

    try {
      const res = await request('POST', `api/collections/${enc(collection)}/ask`, {
        json: body, signal: controller.signal, headers: { Accept: 'text/event-stream' },
      });
      const type = res.headers.get('content-type') || '';
      if (type.includes('application/json')) {
        // A server that answered without streaming: the body is the answer itself.
        onEvent('done', await res.text());
      } else if (!res.body) {
        throw new ApiError(0, 'bad_response', 'The server sent no answer stream.');
      } else {
        const parser = sseParser(onEvent);
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
          if (finished) { reader.cancel().catch(() => {}); break; }
        }
        parser.end();
      }
      if (!finished) failAnswer(view, 'The answer stream ended before the answer was complete.');
    } catch (err) {
      if (err && err.name === 'AbortError') {
        if (!finished) failAnswer(view, 'Stopped.', 'stopped');
      } else if (!finished) {
        failAnswer(view, `Error${err.code ? ` (${err.code})` : ''}: ${err.message}`);
        if (!el.question.value) { el.question.value = question; autosize(); }
      }
    } finally {
      state.asking = null;
      updateControls();
      scrollToEnd(false);
    }
  }

  // ---------------------------------------------------------------- source panel

  function openSource(source, trigger) {
    if (!source) return;
    state.panelReturnFocus = trigger || null;
    el.panelTitle.textContent = source.title || source.doc_id || `Source ${source.n}`;
    el.panelPath.textContent = source.source || source.doc_id || '';
    const meta = [];
    if (source.n !== undefined) meta.push(`[${source.n}]`);
    if (typeof source.score === 'number') meta.push(`score ${source.score.toFixed(3)}`);
    if (source.chunk_id) meta.push(`chunk ${source.chunk_id}`);
    el.panelMeta.textContent = meta.join(' · ');
    el.panelText.textContent = source.text || '(The passage text was not sent with this answer.)';
    el.panel.hidden = false;
    el.backdrop.hidden = false;
    el.layout.classList.add('with-source');
    el.panel.scrollTop = 0;
    el.panel.focus();
  }

  function closeSource() {
    if (el.panel.hidden) return;
    el.panel.hidden = true;
    el.backdrop.hidden = true;
    el.layout.classList.remove('with-source');
    const back = state.panelReturnFocus;
    state.panelReturnFocus = null;
    if (back && back.isConnected) back.focus();
  }

  // ---------------------------------------------------------------- controls

  function updateControls() {
    const hasCollection = !!currentName();
    const asking = !!state.asking;
    el.send.disabled = asking || !hasCollection;
    el.stop.hidden = !asking;
    el.uploadButton.disabled = !hasCollection || state.jobActive || !(el.uploadInput.files && el.uploadInput.files.length);
    el.uploadInput.disabled = !hasCollection || state.jobActive;
    updateAdapterSave();
  }

  function autosize() {
    const q = el.question;
    q.style.height = 'auto';
    q.style.height = `${Math.min(q.scrollHeight + 2, 240)}px`;
  }

  function bind() {
    el.bannerClose.addEventListener('click', hideError);
    el.collection.addEventListener('change', () => {
      const name = currentName();
      note(`Now asking ${name}.`);
      selectCollection(name);
    });
    el.adapter.addEventListener('change', () => {
      updateAdapterSave();
      note(`Answers now use ${describeChoice()}.`);
    });
    el.adapterSave.addEventListener('click', saveAdapterDefault);
    el.uploadInput.addEventListener('change', updateControls);
    el.uploadForm.addEventListener('submit', upload);
    el.createForm.addEventListener('submit', createCollection);
    el.askForm.addEventListener('submit', ask);
    el.stop.addEventListener('click', () => { if (state.asking) state.asking.abort(); });
    el.clearChat.addEventListener('click', clearChat);
    el.question.addEventListener('input', autosize);
    el.question.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        if (!state.asking) el.askForm.requestSubmit();
      }
    });
    el.keyForm.addEventListener('submit', useKey);
    el.keyForget.addEventListener('click', forgetKey);
    el.panelClose.addEventListener('click', closeSource);
    el.backdrop.addEventListener('click', closeSource);
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !el.panel.hidden) { e.preventDefault(); closeSource(); }
    });
  }

  async function reload() {
    await Promise.all([
      loadAdapters(),
      loadCollections().catch((err) => {
        el.collection.replaceChildren(h('option', { value: '', text: 'Could not load collections' }));
        showError(err, 'Loading collections');
      }),
    ]);
    updateControls();
  }

  async function start() {
    bind();
    renderKeyState();
    if (!localStorage.getItem(KEY_STORE)) el.keyDetails.open = true;
    updateControls();
    await reload();
    document.body.dataset.ready = 'true';
  }

  // Exposed for tests of the parser only; the UI does not use it.
  window.domainragSseParser = sseParser;
  // What adapt.js (the Adapt card) uses; it loads after this file.
  window.domainrag = {
    api, h, enc, showError, hideError, plural, download,
    current: currentName,
    // experiment.js: offer blind comparisons while an experiment runs.
    setBlindAvailable: (on) => { el.blindLabel.hidden = !on; if (!on) el.blind.checked = false; },
    collection: () => state.current,
    adapters: () => state.adapters,
    refresh: async () => {
      await loadAdapters();
      await loadCollections(currentName());
    },
  };
  start();
})();
