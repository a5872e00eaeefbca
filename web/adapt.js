// adapt.js owns the "Adapt" card of the web UI: drafting training questions from the selected
// collection's documents (synth job), training an adapter on them (train job), comparing it with
// the base model on an uploaded question set (eval job), and the collection's job list with
// progress, cancel and results. It uses the helpers app.js exposes as window.domainrag and
// listens for its "domainrag:collection" event. All text goes in through textContent.
'use strict';

(() => {
  const POLL_MS = 1000;
  const FINISHED = ['done', 'failed', 'cancelled'];
  const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const JOB_KINDS = ['synth', 'train', 'eval'];
  const LABEL = { synth: 'Draft questions', train: 'Train adapter', eval: 'Evaluate' };
  const STATUS = { queued: 'Queued', running: 'Running', done: 'Done', failed: 'Failed', cancelled: 'Cancelled' };

  const d = window.domainrag;
  const $ = (id) => document.getElementById(id);
  const el = {
    card: $('adapt-card'),
    synthForm: $('synth-form'), synthN: $('synth-n'),
    trainForm: $('train-form'), trainName: $('train-name'), trainEpochs: $('train-epochs'),
    trainAssign: $('train-assign'), trainSource: $('train-source'),
    evalForm: $('eval-form'), evalFile: $('eval-file'), evalArm: $('eval-arm'),
    jobs: $('jobs-list'),
  };
  const state = { collection: '', jobs: [], timer: null, seen: new Map() };

  const latestSynth = () => state.jobs.find((j) => j.kind === 'synth' && j.status === 'done');

  // ------------------------------------------------------------ starting jobs

  async function start(kind, body) {
    const name = state.collection;
    if (!name) { d.showError(new Error('Pick a collection first.'), LABEL[kind]); return; }
    try {
      const job = await d.api('POST', `api/collections/${d.enc(name)}/${kind}`, { json: body });
      d.hideError();
      state.jobs.unshift(job);
      render();
      poll();
    } catch (err) {
      d.showError(err, LABEL[kind]);
    }
  }

  function synth(event) {
    event.preventDefault();
    const n = Number(el.synthN.value);
    if (!Number.isInteger(n) || n < 1 || n > 5000) {
      d.showError(new Error('Draft between 1 and 5000 questions.'), LABEL.synth);
      return;
    }
    start('synth', { n });
  }

  function train(event) {
    event.preventDefault();
    const name = el.trainName.value.trim();
    if (!NAME_RE.test(name)) {
      d.showError(new Error('Use 1 to 64 lowercase letters, digits, - or _, starting with a letter or digit.'), 'Adapter name');
      el.trainName.focus();
      return;
    }
    const epochs = Number(el.trainEpochs.value);
    if (!Number.isInteger(epochs) || epochs < 1 || epochs > 20) {
      d.showError(new Error('Epochs must be a whole number from 1 to 20.'), LABEL.train);
      return;
    }
    const source = latestSynth();
    const body = { name, epochs, assign: el.trainAssign.checked };
    if (source) body.triplets_job = source.id;
    else body.synthetic = Number(el.synthN.value) || 150;
    start('train', body);
  }

  // Parses a JSONL question set; an error names the line.
  function parseQuestions(text) {
    const out = [];
    text.split(/\r?\n/).forEach((line, i) => {
      if (!line.trim()) return;
      let q;
      try { q = JSON.parse(line); } catch (err) { throw new Error(`line ${i + 1} is not JSON: ${err.message}`); }
      if (!q || typeof q.query !== 'string') throw new Error(`line ${i + 1} has no "query"`);
      out.push({ id: q.id === undefined ? `line-${i + 1}` : String(q.id), query: q.query,
        answers: Array.isArray(q.answers) ? q.answers : [], gold_doc_ids: Array.isArray(q.gold_doc_ids) ? q.gold_doc_ids : [] });
    });
    if (out.length === 0) throw new Error('the file holds no questions');
    return out;
  }

  async function evaluate(event) {
    event.preventDefault();
    const file = el.evalFile.files && el.evalFile.files[0];
    if (!file) { d.showError(new Error('Choose a question set (JSONL) first.'), LABEL.eval); return; }
    let questions;
    try {
      questions = parseQuestions(await file.text());
    } catch (err) {
      d.showError(err, `Question set ${file.name}`);
      return;
    }
    const arm = el.evalArm.value;
    start('eval', arm ? { questions, arms: ['none', arm] } : { questions });
  }

  async function cancel(id) {
    try {
      await d.api('POST', `api/jobs/${d.enc(id)}/cancel`);
      poll();
    } catch (err) {
      d.showError(err, 'Cancel');
    }
  }

  // ------------------------------------------------------------ polling

  async function refresh() {
    const name = state.collection;
    if (!name) { state.jobs = []; render(); return; }
    const list = await d.api('GET', `api/jobs?collection=${d.enc(name)}`);
    if (name !== state.collection) return;
    state.jobs = (Array.isArray(list) ? list : []).filter((j) => JOB_KINDS.includes(j.kind));
    let trained = false;
    for (const j of state.jobs) {
      const before = state.seen.get(j.id);
      if (before && !FINISHED.includes(before) && j.status === 'done' && j.kind === 'train') trained = true;
      state.seen.set(j.id, j.status);
    }
    render();
    // A new adapter (maybe the collection's default now): reload the pickers.
    if (trained) await d.refresh();
  }

  function poll() {
    clearTimeout(state.timer);
    state.timer = setTimeout(async () => {
      try {
        await refresh();
      } catch (err) {
        d.showError(err, 'Loading jobs');
      }
      if (state.jobs.some((j) => !FINISHED.includes(j.status))) poll();
    }, POLL_MS);
  }

  // ------------------------------------------------------------ rendering

  const pct = (x) => (typeof x === 'number' ? `${(100 * x).toFixed(0)}%` : '–');
  const num = (x, digits = 3) => (typeof x === 'number' ? x.toFixed(digits) : '–');

  function synthResult(r) {
    const dropped = Object.entries((r.report && r.report.dropped) || {})
      .sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(', ');
    const nodes = [d.h('p', { class: 'job-counts', text: `${d.plural(r.triplets, 'question')} kept${dropped ? `; dropped: ${dropped}` : ''}` })];
    const examples = Array.isArray(r.examples) ? r.examples : [];
    if (examples.length) {
      nodes.push(d.h('details', { class: 'examples' },
        d.h('summary', { text: `Read ${examples.length} of them` }),
        d.h('ol', { 'data-testid': 'synth-examples' }, ...examples.map((e) => d.h('li', {},
          d.h('strong', { text: e.query }), ' ', d.h('span', { text: e.answer }))))));
    }
    return nodes;
  }

  function trainResult(r) {
    const a = r.adapter || {};
    const rec = r.record || {};
    const loss = typeof rec.best_val_loss === 'number' ? `, best validation loss ${rec.best_val_loss.toFixed(4)}` : '';
    const text = `Adapter ${a.name}: ${rec.steps} steps${loss}, ${Math.round(rec.wall_s || 0)} s` +
      (r.assigned ? '; now the collection\'s default.' : '.');
    return [d.h('p', { class: 'job-counts', 'data-testid': 'train-result', text })];
  }

  function evalResult(r) {
    const arms = Object.entries(r.arms || {});
    const rows = arms.map(([name, s]) => {
      const delta = s.vs_base && s.vs_base.f1;
      const vs = Array.isArray(delta) ? ` (${delta[0] >= 0 ? '+' : ''}${num(delta[0])}, CI ${num(delta[1].low)}..${num(delta[1].high)})` : '';
      return d.h('tr', {},
        d.h('th', { scope: 'row', text: name === 'none' ? 'base model' : name }),
        d.h('td', { text: num(s.f1) + vs }),
        d.h('td', { text: num(s.faithfulness) }),
        d.h('td', { text: pct(s.hallucination_rate) }),
        d.h('td', { text: pct(s.degenerate_rate) }));
    });
    return [d.h('table', { class: 'eval-table', 'data-testid': 'eval-table' },
      d.h('thead', {}, d.h('tr', {}, ...['arm', 'F1 (vs base)', 'faithful', 'halluc.', 'loops/cut'].map((t) => d.h('th', { scope: 'col', text: t })))),
      d.h('tbody', {}, ...rows))];
  }

  function jobItem(job) {
    const p = job.progress || {};
    const status = job.status || 'unknown';
    const head = d.h('div', { class: 'job-head' },
      d.h('span', { class: `pill pill-${status}`, text: STATUS[status] || status }),
      d.h('span', { class: 'job-kind', text: LABEL[job.kind] || job.kind }),
      job.cancellable && !FINISHED.includes(status)
        ? d.h('button', { type: 'button', class: 'link-button', 'data-testid': 'job-cancel', text: 'Cancel', onclick: () => cancel(job.id) })
        : null);
    const nodes = [head];
    if (!FINISHED.includes(status)) {
      nodes.push(d.h('progress', { max: String(Math.max(p.total || 0, 1)), value: String(p.done || 0), 'aria-label': `${LABEL[job.kind]} progress` }));
      nodes.push(d.h('p', { class: 'job-counts', text: [`${p.done || 0} / ${p.total || '?'} ${p.unit || ''}`, p.message].filter(Boolean).join(' · ') }));
    }
    if (job.error) nodes.push(d.h('p', { class: 'job-error', 'data-testid': 'job-error', text: job.error }));
    const r = job.result;
    if (status === 'done' && r) {
      if (job.kind === 'synth') nodes.push(...synthResult(r));
      if (job.kind === 'train') nodes.push(...trainResult(r));
      if (job.kind === 'eval') nodes.push(...evalResult(r));
    }
    const files = (job.files || []).filter((f) => f !== 'report.json');
    if (files.length) {
      nodes.push(d.h('p', { class: 'job-files' }, ...files.map((f) => d.h('button', {
        type: 'button', class: 'link-button', 'data-testid': `job-file-${f}`, text: f,
        onclick: () => d.download(`api/jobs/${d.enc(job.id)}/files/${d.enc(f)}`, f) }))));
    }
    return d.h('li', { class: 'job', 'data-testid': `job-${job.kind}`, dataset: { state: status, jobId: job.id } }, ...nodes);
  }

  function renderArms() {
    const keep = el.evalArm.value;
    const c = d.collection();
    const own = c && c.adapter;
    el.evalArm.replaceChildren(d.h('option', { value: '', text: own ? `collection default (${own})` : 'collection default' }));
    for (const a of d.adapters()) el.evalArm.append(d.h('option', { value: a.name, text: a.name }));
    const values = Array.from(el.evalArm.options, (o) => o.value);
    el.evalArm.value = values.includes(keep) ? keep : '';
  }

  function render() {
    const source = latestSynth();
    el.trainSource.textContent = source
      ? `Trains on the ${d.plural((source.result && source.result.triplets) || 0, 'question')} drafted last.`
      : 'No drafted questions yet: training drafts them first.';
    el.jobs.replaceChildren(...state.jobs.map(jobItem));
    const disabled = !state.collection;
    for (const form of [el.synthForm, el.trainForm, el.evalForm]) {
      for (const c of form.elements) c.disabled = disabled;
    }
    renderArms();
  }

  // ------------------------------------------------------------ wiring

  async function onCollection(name) {
    state.collection = name || '';
    state.jobs = [];
    render();
    try {
      await refresh();
      if (state.jobs.some((j) => !FINISHED.includes(j.status))) poll();
    } catch (err) {
      d.showError(err, 'Loading jobs');
    }
  }

  el.synthForm.addEventListener('submit', synth);
  el.trainForm.addEventListener('submit', train);
  el.evalForm.addEventListener('submit', evaluate);
  document.addEventListener('domainrag:collection', (e) => onCollection(e.detail.name));
  document.addEventListener('domainrag:adapters', renderArms);
  onCollection(d.current());
})();
