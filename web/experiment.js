// experiment.js owns the "A/B test" card of the web UI: the selected collection's running
// experiment (figures per arm with bars, the candidate-minus-control differences with their 95%
// intervals or "not enough data yet"), starting one (candidate adapter, share of users),
// promoting or rolling it back, and the experiments that ended. It uses window.domainrag from
// app.js and its "domainrag:collection" / "domainrag:adapters" events. Text goes in through
// textContent only.
'use strict';

(() => {
  const POLL_MS = 5000;
  const d = window.domainrag;
  const $ = (id) => document.getElementById(id);
  const el = {
    details: $('experiment-details'), status: $('experiment-status'),
    form: $('experiment-form'), candidate: $('experiment-candidate'), share: $('experiment-share'),
    actions: $('experiment-actions'), promote: $('experiment-promote'), rollback: $('experiment-rollback'),
    history: $('experiment-history'),
  };
  const state = { collection: '', data: null, timer: null, seq: 0 };
  const h = d.h;

  const pct = (x) => (typeof x === 'number' ? `${(x * 100).toFixed(1)}%` : '–');
  const num = (x, digits) => (typeof x === 'number' ? x.toFixed(digits) : '–');
  const signed = (x, digits) => (x >= 0 ? '+' : '') + x.toFixed(digits);
  const RATES = new Set(['thumbs_up_rate', 'abstention_rate', 'citation_rate', 'faithfulness']);

  // A figure as a <meter> (no inline styles: the CSP allows none).
  function bar(label, value, arm) {
    const v = typeof value === 'number' ? Math.max(0, Math.min(1, value)) : 0;
    return h('div', { class: 'bar-row' },
      h('span', { class: 'bar-label', text: label }),
      h('meter', { class: `bar bar-${arm}`, min: '0', max: '1', value: v.toFixed(3), 'aria-label': `${label}: ${pct(value)}` }),
      h('span', { class: 'bar-value', text: pct(value) }));
  }

  function renderRunning(report) {
    const e = report.experiment;
    const nodes = [h('p', { 'data-testid': 'experiment-summary',
      text: `Experiment ${e.id}: ${e.candidate} gets ${Math.round(e.share * 100)}% of users, ` +
        `${e.control || 'the base model'} the rest.` })];
    const table = h('table', { class: 'figures', 'data-testid': 'experiment-arms' },
      h('thead', {}, h('tr', {}, ...['Arm', 'Answers', 'Users', 'Rated', 'Thumbs up', 'Faithful', 'Cited',
        'Abstained', 'Median'].map((t) => h('th', { scope: 'col', text: t })))));
    const body = h('tbody');
    for (const [label, a] of Object.entries(report.arms)) {
      body.append(h('tr', { 'data-testid': 'experiment-arm', 'data-arm': a.arm },
        h('th', { scope: 'row', text: `${label} (${a.arm})` }),
        h('td', { text: String(a.answers) }), h('td', { text: String(a.users) }),
        h('td', { text: String(a.rated) }), h('td', { text: pct(a.thumbs_up_rate) }),
        h('td', { text: num(a.faithfulness, 2) }), h('td', { text: pct(a.citation_rate) }),
        h('td', { text: pct(a.abstention_rate) }), h('td', { text: `${Math.round(a.latency_ms)} ms` })));
    }
    table.append(body);
    nodes.push(h('div', { class: 'table-scroll' }, table));
    const chart = h('div', { class: 'bars', 'data-testid': 'experiment-chart' });
    for (const [label, a] of Object.entries(report.arms)) {
      chart.append(h('p', { class: 'small', text: label }),
        bar('thumbs up', a.thumbs_up_rate, a.arm), bar('faithful', a.faithfulness, a.arm));
    }
    nodes.push(chart);
    const diffs = h('ul', { class: 'diffs', 'data-testid': 'experiment-differences' });
    for (const [name, m] of Object.entries(report.difference)) {
      const rate = RATES.has(name);
      const text = m.difference === null
        ? `${name}: ${m.status} (${m.control_n} / ${m.candidate_n})`
        : `${name}: ${signed(rate ? m.difference * 100 : m.difference, 1)}${rate ? ' points' : ''} ` +
          `[${signed(rate ? m.ci95.low * 100 : m.ci95.low, 1)}, ${signed(rate ? m.ci95.high * 100 : m.ci95.high, 1)}]` +
          (m.significant ? ' (interval excludes 0)' : '');
      diffs.append(h('li', { class: m.significant ? 'significant' : '', text }));
    }
    nodes.push(h('p', { class: 'hint', text: 'Candidate minus control, 95% interval (users resampled):' }), diffs);
    const b = report.blind || {};
    if (b.comparisons) {
      nodes.push(h('p', { class: 'small', 'data-testid': 'experiment-blind',
        text: `Blind comparisons: ${b.comparisons} (candidate preferred ${b.candidate_preferred}, ` +
          `control ${b.control_preferred}, ties ${b.ties})` +
          (typeof b.candidate_win_rate === 'number' ? `; candidate wins ${pct(b.candidate_win_rate)}` : '') +
          (b.ci95 ? ` [${pct(b.ci95.low)}, ${pct(b.ci95.high)}]` : '') }));
    }
    if (!report.enough_data) {
      nodes.push(h('p', { class: 'muted small', 'data-testid': 'experiment-not-enough',
        text: `Not enough data yet: each arm needs ${report.min_per_arm} answers.` }));
    }
    return nodes;
  }

  function render() {
    const data = state.data;
    el.status.replaceChildren();
    el.history.replaceChildren();
    const running = data && data.running;
    d.setBlindAvailable(Boolean(running));
    el.form.hidden = !state.collection || Boolean(running);
    el.actions.hidden = !running;
    if (!state.collection) {
      el.status.append(h('p', { class: 'muted small', text: 'Pick a collection first.' }));
      return;
    }
    if (running) el.status.append(...renderRunning(running));
    else el.status.append(h('p', { class: 'muted small', text: 'No experiment is running.' }));
    for (const e of (data && data.experiments) || []) {
      if (!e.stopped_at) continue;
      el.history.append(h('li', { class: 'small', text: `Experiment ${e.id}: ${e.candidate} vs ` +
        `${e.control || 'base'}, ${e.decision === 'promote' ? 'promoted' : 'rolled back'}` }));
    }
  }

  function renderCandidates() {
    const current = el.candidate.value;
    el.candidate.replaceChildren(...d.adapters().map((a) => h('option', { value: a.name, text: a.name })));
    if (current) el.candidate.value = current;
  }

  async function load() {
    const name = state.collection;
    const seq = ++state.seq;
    if (!name) { state.data = null; render(); return; }
    try {
      const data = await d.api('GET', `api/collections/${d.enc(name)}/experiment`);
      if (seq !== state.seq) return;
      state.data = data;
      render();
    } catch (err) {
      if (seq === state.seq && err.status !== 404) d.showError(err, 'Experiment');
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(async () => {
      if (el.details.open && state.collection) await load();
      schedule();
    }, POLL_MS);
  }

  async function start(event) {
    event.preventDefault();
    const share = Number(el.share.value) / 100;
    if (!(share > 0 && share < 1)) { d.showError(new Error('The share is a percentage between 1 and 99.'), 'Experiment'); return; }
    if (!el.candidate.value) { d.showError(new Error('Register an adapter to test first.'), 'Experiment'); return; }
    try {
      await d.api('POST', `api/collections/${d.enc(state.collection)}/experiment`,
        { json: { candidate: el.candidate.value, share } });
      d.hideError();
      await load();
    } catch (err) {
      d.showError(err, 'Start experiment');
    }
  }

  async function stop(decision) {
    try {
      await d.api('POST', `api/collections/${d.enc(state.collection)}/experiment/stop`, { json: { decision } });
      d.hideError();
      await load();
      await d.refresh();
    } catch (err) {
      d.showError(err, decision === 'promote' ? 'Promote' : 'Roll back');
    }
  }

  el.form.addEventListener('submit', start);
  el.promote.addEventListener('click', () => stop('promote'));
  el.rollback.addEventListener('click', () => stop('rollback'));
  el.details.addEventListener('toggle', () => { if (el.details.open) load(); });
  document.addEventListener('domainrag:collection', (e) => { state.collection = e.detail.name; load(); });
  document.addEventListener('domainrag:adapters', renderCandidates);
  renderCandidates();
  state.collection = d.current() || '';
  load();
  schedule();
})();
