// ui.test.mjs owns the end-to-end browser test of the domainrag web UI: in headless Debian chromium
// it checks the security headers, enters an API key after the server refused it without one,
// creates a collection, uploads a fixture, waits for ingest, asks a question with the collection's
// default adapter and again with "none (base model)", and checks the streamed answers, the citation
// chips and the source panel; rates one answer up and corrects the other; runs a 50/50 experiment
// of DOMAINRAG_CANDIDATE on the A/B card, sees both arms, makes a blind comparison and rolls it
// back; then, in the Adapt card, drafts questions, trains an adapter, evaluates
// it and cancels an evaluation. Reads DOMAINRAG_URL (a running server), DOMAINRAG_KEY (an admin key)
// and DOMAINRAG_FIXTURE (a .txt about password resets); writes ${DOMAINRAG_ARTIFACTS:-target}/ui.png, ui-experiment.png and ui-adapt.png. Last line: "N passed, N failed".
import { chromium } from 'playwright-core';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

const CHROMIUM = process.env.DOMAINRAG_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.DOMAINRAG_ARTIFACTS || 'target';
// Ingest and generation run on CPU in CI: be patient, but not forever.
const INGEST_TIMEOUT_MS = Number(process.env.DOMAINRAG_UI_INGEST_TIMEOUT_MS || 300_000);
const ANSWER_TIMEOUT_MS = Number(process.env.DOMAINRAG_UI_ANSWER_TIMEOUT_MS || 600_000);
const QUESTION = 'How do I reset my password?';
// A registered adapter the experiment card tests against the collection's (DOMAINRAG_CANDIDATE).
const CANDIDATE = process.env.DOMAINRAG_CANDIDATE || '';

function fail(message) {
  throw new Error(message);
}

const normalize = (s) => s.toLowerCase().replace(/\s+/g, ' ').trim();

// True when the panel text shares a run of 6 consecutive words with the fixture: chunking may cut
// or re-join sentences, but a real passage of the fixture keeps such runs intact.
function sharesFixtureText(panelText, fixtureText) {
  const panel = normalize(panelText);
  const words = normalize(fixtureText).split(' ').filter(Boolean);
  if (words.length === 0) return false;
  if (words.length < 6) return panel.includes(words.join(' '));
  for (let i = 0; i + 6 <= words.length; i++) {
    if (panel.includes(words.slice(i, i + 6).join(' '))) return true;
  }
  return false;
}

// Waits until the n-th answer (0-based) leaves the streaming state; fails unless it is "done".
async function waitForAnswer(page, index) {
  const answer = page.locator('[data-testid="answer"]').nth(index);
  await answer.waitFor({ state: 'attached', timeout: 30_000 });
  await page.waitForFunction(
    (i) => {
      const a = document.querySelectorAll('[data-testid="answer"]')[i];
      return a && a.dataset.state !== 'streaming';
    },
    index,
    { timeout: ANSWER_TIMEOUT_MS, polling: 250 },
  );
  const state = await answer.getAttribute('data-state');
  if (state !== 'done') {
    fail(`answer ${index + 1} ended in state "${state}": ${(await answer.innerText()).trim()}`);
  }
  const text = (await answer.locator('[data-testid="answer-text"]').innerText()).trim();
  if (!text) fail(`answer ${index + 1} is empty`);
  return { answer, text };
}

async function askAndCapture(page, question, via) {
  const sent = page.waitForRequest((r) => r.method() === 'POST' && /\/api\/collections\/[^/]+\/ask$/.test(r.url()),
    { timeout: 30_000 });
  await page.fill('[data-testid="question"]', question);
  if (via === 'enter') await page.press('[data-testid="question"]', 'Enter');
  else await page.click('[data-testid="send"]');
  const request = await sent;
  return JSON.parse(request.postData() || '{}');
}

async function run(page, log) {
  const url = process.env.DOMAINRAG_URL;
  const fixture = process.env.DOMAINRAG_FIXTURE;
  if (!url) fail('DOMAINRAG_URL is not set (the base URL of a running domainrag server)');
  if (!fixture) fail('DOMAINRAG_FIXTURE is not set (a .txt file about password resets)');
  const fixtureText = await readFile(fixture, 'utf8');

  const key = process.env.DOMAINRAG_KEY;
  if (!key) fail('DOMAINRAG_KEY is not set (an API key the server accepts)');
  const response = await page.goto(url, { waitUntil: 'load' });
  const headers = response.headers();
  if (!/frame-ancestors 'none'/.test(headers['content-security-policy'] || '')) fail(`no CSP: ${JSON.stringify(headers)}`);
  if (headers['x-frame-options'] !== 'DENY' || headers['x-content-type-options'] !== 'nosniff') {
    fail(`security headers missing: ${JSON.stringify(headers)}`);
  }
  await page.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
  log('page loaded with CSP, X-Frame-Options and nosniff');

  // No key yet: the server answers 401 and the UI asks for one; with the key it loads.
  await page.waitForSelector('[data-testid="error-banner"]:not([hidden])', { timeout: 30_000 });
  const banner = await page.innerText('[data-testid="error-banner"]');
  if (!/API key/.test(banner)) fail(`expected the banner to ask for an API key, got: ${banner}`);
  await page.fill('[data-testid="api-key"]', key);
  await page.click('[data-testid="key-save"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="key-state"]').textContent === '(set)');
  await page.waitForSelector('[data-testid="error-banner"][hidden]', { state: 'attached', timeout: 30_000 });
  log('asked for a key, took it');

  // Create a collection.
  const name = `ui-${randomBytes(4).toString('hex')}`;
  await page.fill('[data-testid="new-collection-name"]', name);
  await page.click('[data-testid="create-collection"]');
  await page.waitForFunction(
    (n) => document.querySelector('[data-testid="collection-select"]').value === n
      && document.querySelector('[data-testid="collection-info"]').children.length > 0,
    name, { timeout: 30_000 },
  ).catch(async () => fail(`collection ${name} was not created/selected: ${await bannerText(page)}`));
  log(`created collection ${name}`);

  // Upload the fixture and wait for the ingest job.
  await page.setInputFiles('[data-testid="upload-input"]', fixture);
  await page.click('[data-testid="upload-button"]');
  await page.waitForFunction(
    () => ['done', 'failed'].includes(document.querySelector('[data-testid="job-status"]').dataset.state),
    null, { timeout: INGEST_TIMEOUT_MS, polling: 250 },
  ).catch(async () => fail(`ingest did not finish in ${INGEST_TIMEOUT_MS} ms: ${await jobText(page)}`));
  const jobState = await page.getAttribute('[data-testid="job-status"]', 'data-state');
  if (jobState !== 'done') fail(`ingest job ${jobState}: ${await jobText(page)} ${await bannerText(page)}`);
  const failures = await page.locator('[data-testid="job-failures"] li').count();
  if (failures > 0) fail(`ingest reported per-file failures: ${await jobText(page)}`);
  log(`ingest done: ${await jobText(page)}`);

  // Ask with the collection's default adapter (Enter sends): "adapter" must be absent.
  const firstBody = await askAndCapture(page, QUESTION, 'enter');
  if ('adapter' in firstBody) fail(`default-adapter ask sent "adapter": ${JSON.stringify(firstBody.adapter)}`);
  if (firstBody.stream !== true) fail('ask did not request streaming');
  const first = await waitForAnswer(page, 0);
  log(`answer 1 (${first.text.length} chars): ${first.text.slice(0, 120).replace(/\s+/g, ' ')}`);

  // Citations and the source panel.
  const chips = first.answer.locator('[data-testid="citation"]');
  const chipCount = await chips.count();
  if (chipCount < 1) fail(`answer 1 has no citation chips: ${first.text}`);
  const chipLabel = (await chips.first().innerText()).trim();
  if (!/^\[\d+\]\s+\S/.test(chipLabel)) fail(`citation chip label is not "[n] title": "${chipLabel}"`);
  await chips.first().click();
  const panel = page.locator('[data-testid="source-panel"]');
  await panel.waitFor({ state: 'visible', timeout: 5_000 });
  const panelText = await page.locator('[data-testid="source-text"]').innerText();
  if (!sharesFixtureText(panelText, fixtureText)) {
    fail(`source panel does not show the fixture's text; it shows: ${panelText.slice(0, 300)}`);
  }
  const panelPath = (await page.locator('[data-testid="source-path"]').innerText()).trim();
  log(`citation "${chipLabel}" opens ${panelPath || '(no path)'}`);
  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, 'ui.png'), fullPage: false });
  await page.keyboard.press('Escape');
  await panel.waitFor({ state: 'hidden', timeout: 5_000 });

  // Switch to the base model and ask again: "adapter" must be null, and the answer says so.
  await page.selectOption('[data-testid="adapter-select"]', 'none');
  const secondBody = await askAndCapture(page, QUESTION, 'click');
  if (!('adapter' in secondBody) || secondBody.adapter !== null) {
    fail(`base-model ask sent adapter ${JSON.stringify(secondBody.adapter)} instead of null`);
  }
  const second = await waitForAnswer(page, 1);
  const adapterUsed = await second.answer.getAttribute('data-adapter');
  if (adapterUsed) fail(`answer 2 was generated with adapter "${adapterUsed}", not the base model`);
  log(`answer 2 (base model, ${second.text.length} chars): ${second.text.slice(0, 120).replace(/\s+/g, ' ')}`);

  await feedback(page, log, name);
  await experiment(page, log);
  await adapt(page, log);
}

// Thumbs up on answer 1 and a correction of answer 2, read back from the answer log.
async function feedback(page, log, collection) {
  const first = page.locator('[data-testid="answer"]').nth(0);
  const sent = page.waitForResponse((r) => /\/api\/answers\/[^/]+\/feedback$/.test(r.url()));
  await first.locator('[data-testid="thumb-up"]').click();
  if ((await sent).status() !== 200) fail('thumbs up was not stored');
  await page.waitForFunction(() => document.querySelector('[data-testid="answer"] [data-testid="thumb-up"]')
    .getAttribute('aria-pressed') === 'true');
  const second = page.locator('[data-testid="answer"]').nth(1);
  await second.locator('[data-testid="correct-button"]').click();
  await second.locator('[data-testid="correction-text"]').fill('Open Settings, choose Security and click Reset password [1].');
  await second.locator('[data-testid="feedback-comment"]').fill('too long');
  await second.locator('[data-testid="correction-send"]').click();
  await second.locator('[data-testid="correction-form"]').waitFor({ state: 'hidden', timeout: 10_000 });
  const logged = await page.evaluate(async (c) => {
    const r = await fetch(`api/collections/${c}/answers`, { headers: { Authorization: `Bearer ${localStorage.getItem('domainrag.apiKey')}` } });
    return r.json();
  }, collection);
  const liked = logged.filter((a) => a.feedback && a.feedback.rating === 'up').length;
  const corrected = logged.filter((a) => a.feedback && /Reset password \[1\]/.test(a.feedback.correction || '')).length;
  if (liked !== 1 || corrected !== 1) fail(`the answer log holds ${liked} liked and ${corrected} corrected answers: ${JSON.stringify(logged).slice(0, 400)}`);
  log('feedback: a thumbs up and a correction are in the answer log');
}

// Start a 50/50 experiment of the candidate adapter the test registered, ask once, see both arms
// on the experiment card, roll it back.
async function experiment(page, log) {
  await page.selectOption('[data-testid="adapter-select"]', 'default');
  await page.click('#experiment-details > summary');
  await page.selectOption('[data-testid="experiment-candidate"]', CANDIDATE);
  await page.fill('[data-testid="experiment-share"]', '50');
  await page.click('[data-testid="experiment-start"]');
  await page.waitForSelector('[data-testid="experiment-arm"]', { timeout: 60_000 });
  await askAndCapture(page, QUESTION, 'click');
  const third = await waitForAnswer(page, 2);
  const arm = await third.answer.getAttribute('data-arm');
  if (!['control', 'candidate'].includes(arm)) fail(`the answer carries no experiment arm: ${arm}`);
  const meta = await third.answer.locator('[data-testid="answer-meta"]').innerText();
  if (/experiment|\b(control|candidate) arm\b/.test(meta)) fail(`the answer shows its arm to the user: ${meta}`);
  await page.click('#experiment-details > summary');
  await page.click('#experiment-details > summary');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('[data-testid="experiment-arm"]')];
    const answers = rows.map((r) => Number(r.children[1].textContent));
    return rows.length === 2 && answers.reduce((a, b) => a + b, 0) === 1;
  }, null, { timeout: 30_000 }).catch(async () => fail(`the experiment card does not show both arms with one answer: ${await page.locator('[data-testid="experiment-status"]').innerText()}`));
  // Blind A/B: both arms answer side by side, unlabelled; pick one.
  await page.locator('[data-testid="blind"]').check();
  await page.fill('[data-testid="question"]', QUESTION);
  await page.click('[data-testid="send"]');
  const comparison = page.locator('[data-testid="comparison"]').first();
  await comparison.locator('[data-testid="prefer-a"]').waitFor({ timeout: ANSWER_TIMEOUT_MS });
  if ((await comparison.locator('.side').count()) !== 2) fail('the blind comparison does not show two answers');
  await comparison.locator('[data-testid="prefer-a"]').click();
  await page.waitForFunction(() => (document.querySelector('[data-testid="prefer-status"]') || {}).textContent === 'Thanks, recorded.');
  await page.locator('[data-testid="blind"]').uncheck();
  await page.click('#experiment-details > summary');
  await page.click('#experiment-details > summary');
  await page.waitForSelector('[data-testid="experiment-blind"]', { timeout: 30_000 });
  const arms = await page.locator('[data-testid="experiment-arms"]').innerText();
  if (!arms.includes(CANDIDATE)) fail(`the experiment card does not name ${CANDIDATE}: ${arms}`);
  await page.locator('#experiment-card').screenshot({ path: path.join(ARTIFACTS, 'ui-experiment.png') });
  await page.click('[data-testid="experiment-rollback"]');
  await page.waitForSelector('[data-testid="experiment-history"] li', { timeout: 30_000 });
  log(`experiment: ${arms.replace(/\s+/g, ' ')}; rolled back`);
}

// Waits until the newest job of `kind` in the Adapt card's list ends; fails unless it ends as `want`.
async function waitForJob(page, kind, want) {
  const selector = `[data-testid="job-${kind}"]`;
  await page.waitForFunction(
    (sel) => {
      const j = document.querySelector(sel);
      return j && ['done', 'failed', 'cancelled'].includes(j.dataset.state);
    },
    selector, { timeout: ANSWER_TIMEOUT_MS, polling: 250 },
  ).catch(async () => fail(`${kind} job did not end: ${await page.locator(selector).first().innerText().catch(() => '(none)')}`));
  const job = page.locator(selector).first();
  const state = await job.getAttribute('data-state');
  if (state !== want) fail(`${kind} job ended ${state}, not ${want}: ${(await job.innerText()).trim()} ${await bannerText(page)}`);
  return job;
}

// The Adapt card: draft questions from the documents, train an adapter on them (it becomes the
// collection's default), evaluate it against the base model, and cancel a running evaluation.
async function adapt(page, log) {
  await page.click('#adapt-details > summary');
  await page.fill('[data-testid="synth-n"]', '5');
  await page.click('[data-testid="synth-button"]');
  const synth = await waitForJob(page, 'synth', 'done');
  const examples = await synth.locator('[data-testid="synth-examples"] li').count();
  if (examples < 1) fail(`the synth job shows no drafted questions: ${(await synth.innerText()).trim()}`);
  log(`drafted: ${(await synth.locator('.job-counts').first().innerText()).trim()}`);

  const adapter = `ui-${randomBytes(3).toString('hex')}`;
  await page.fill('[data-testid="train-name"]', adapter);
  await page.click('[data-testid="train-button"]');
  const train = await waitForJob(page, 'train', 'done');
  log(`trained: ${(await train.locator('[data-testid="train-result"]').innerText()).trim()}`);
  await page.waitForFunction(
    (a) => (document.querySelector('[data-testid="collection-adapter"]') || {}).textContent === a,
    adapter, { timeout: 30_000 },
  ).catch(() => fail(`the collection's adapter did not become ${adapter}`));

  const questions = path.join(await mkdtemp(path.join(tmpdir(), 'domainrag-ui-')), 'questions.jsonl');
  const line = (i) => JSON.stringify({ id: `q${i}`, query: QUESTION, answers: ['open Settings, choose Security and click Reset password'] });
  await writeFile(questions, `${line(0)}\n`);
  await page.setInputFiles('[data-testid="eval-file"]', questions);
  await page.click('[data-testid="eval-button"]');
  const evaluation = await waitForJob(page, 'eval', 'done');
  const rows = await evaluation.locator('[data-testid="eval-table"] tbody tr').count();
  if (rows !== 2) fail(`the evaluation table has ${rows} rows, not 2 (base and ${adapter})`);
  log(`evaluated: ${(await evaluation.locator('[data-testid="eval-table"]').innerText()).replace(/\s+/g, ' ')}`);

  await writeFile(questions, Array.from({ length: 30 }, (_, i) => line(i)).join('\n'));
  await page.setInputFiles('[data-testid="eval-file"]', questions);
  await page.click('[data-testid="eval-button"]');
  const cancel = page.locator('[data-testid="job-eval"]').first().locator('[data-testid="job-cancel"]');
  await cancel.waitFor({ state: 'visible', timeout: 30_000 });
  await cancel.click();
  await waitForJob(page, 'eval', 'cancelled');
  log('a running evaluation was cancelled');
  await page.locator('#adapt-card').screenshot({ path: path.join(ARTIFACTS, 'ui-adapt.png') });
}

async function bannerText(page) {
  const banner = page.locator('[data-testid="error-banner"]');
  return (await banner.isVisible().catch(() => false)) ? `error shown: ${(await banner.innerText()).trim()}` : '';
}

async function jobText(page) {
  return (await page.locator('[data-testid="job-status"]').innerText().catch(() => '')).replace(/\s+/g, ' ').trim();
}

async function main() {
  const log = (m) => console.log(`ui: ${m}`);
  if (!existsSync(CHROMIUM)) {
    console.error(`ui: ${CHROMIUM} not found (apt-get install -y chromium)`);
    console.log('0 passed, 1 failed');
    process.exit(1);
  }
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') log(`console error: ${m.text()}`); });
  let ok = false;
  try {
    await run(page, log);
    if (pageErrors.length) fail(`uncaught errors in the page: ${pageErrors.join(' | ')}`);
    ok = true;
  } catch (err) {
    console.error(`ui: FAILED: ${err && err.message ? err.message : err}`);
    try {
      await mkdir(ARTIFACTS, { recursive: true });
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui.png'), fullPage: true });
      log(`screenshot of the failure: ${path.join(ARTIFACTS, 'ui.png')}`);
    } catch (_) { /* the page may be gone */ }
  } finally {
    await browser.close().catch(() => {});
  }
  if (ok) log(`screenshot: ${path.join(ARTIFACTS, 'ui.png')}`);
  console.log(ok ? '1 passed, 0 failed' : '0 passed, 1 failed');
  process.exit(ok ? 0 : 1);
}

main().catch((err) => {
  console.error(`ui: FAILED: ${err && err.stack ? err.stack : err}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
});
