// mock-server.mjs owns a stand-in for the domainrag HTTP API (in memory, no models) that serves the
// real web/ files, so the UI and ui.test.mjs can be exercised without the Rust server or any model.
// It mimics the documented contract: JSON errors {"error": {code, message}}, 202 ingest jobs that
// progress over time, and SSE answers (token events, then done or error).
//   node mock-server.mjs [port]   serve until killed, printing the URL
//   node mock-server.mjs --run    serve on a free port, run ui.test.mjs against it, exit with its status
import http from 'node:http';
import { readFile, writeFile, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createHash } from 'node:crypto';

const here = path.dirname(fileURLToPath(import.meta.url));
const webDir = path.resolve(here, '../../web');
const STATIC = { '/': ['index.html', 'text/html; charset=utf-8'], '/app.js': ['app.js', 'text/javascript; charset=utf-8'], '/adapt.js': ['adapt.js', 'text/javascript; charset=utf-8'], '/style.css': ['style.css', 'text/css; charset=utf-8'] };
const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const now = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const ADAPTERS = [
  { name: 'support-lora', base_model: 'Qwen/Qwen2.5-0.5B-Instruct', rank: 8, alpha: 16, target_modules: ['q_proj', 'v_proj'], size_bytes: 4_400_000, created_at: now() - 86_400 },
];
const collections = new Map();
const jobs = new Map();
let jobSeq = 0;

function newCollection(name) {
  return {
    name, created_at: now(), adapter: null, embedding_model: 'bge-small-en-v1.5',
    chunking: { max_words: 60, overlap_words: 10 },
    fusion: { method: 'weighted', rrf_k: 60, bm25_weight: 0.4, dense_weight: 0.6, candidates: 50 },
    docs: new Map(), chunks: [],
  };
}
collections.set('demo', newCollection('demo'));
collections.get('demo').adapter = 'support-lora';

const summary = (c) => ({ name: c.name, documents: c.docs.size, chunks: c.chunks.length, adapter: c.adapter, fusion: c.fusion });
const detail = (c) => ({ ...summary(c), vectors: c.chunks.length, chunking: c.chunking, embedding_model: c.embedding_model, created_at: c.created_at });

function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}
const error = (res, status, code, message) => send(res, status, { error: { code, message } });

async function body(req) {
  const parts = [];
  for await (const p of req) parts.push(p);
  return Buffer.concat(parts);
}

function chunkText(text, maxWords) {
  const words = text.split(/\s+/).filter(Boolean);
  const out = [];
  for (let i = 0; i < words.length; i += maxWords) out.push(words.slice(i, i + maxWords).join(' '));
  return out;
}

function ingest(coll, job, files) {
  job.status = 'running';
  let i = 0;
  const step = () => {
    if (i >= files.length) { job.status = 'done'; job.finished_at = now(); job.cancellable = false; return; }
    const { name, text } = files[i++];
    if (!/\.(txt|md|markdown|html?|jsonl)$/i.test(name)) {
      job.result.failures.push({ source: name, error: 'unsupported file type' });
    } else if (!text.trim()) {
      job.result.failures.push({ source: name, error: 'no text found' });
    } else {
      const docId = `upload/${name}`;
      coll.chunks = coll.chunks.filter((c) => c.doc_id !== docId);
      const title = text.trim().split('\n')[0].replace(/^#+\s*/, '').slice(0, 80) || name;
      const pieces = chunkText(text, coll.chunking.max_words);
      pieces.forEach((t, n) => coll.chunks.push({
        chunk_id: createHash('sha256').update(`${docId}:${n}:${t}`).digest('hex').slice(0, 16),
        doc_id: docId, title, source: docId, text: t,
      }));
      coll.docs.set(docId, { doc_id: docId, title, source: docId, chunks: pieces.length, ingested_at: now() });
      job.result.documents += 1;
      job.result.chunks += pieces.length;
    }
    job.progress.done += 1;
    setTimeout(step, 300);
  };
  setTimeout(step, 300);
}

function retrieve(coll, question, k = 3) {
  const q = new Set(question.toLowerCase().match(/[a-z0-9]+/g) || []);
  return coll.chunks
    .map((c) => ({ c, score: (c.text.toLowerCase().match(/[a-z0-9]+/g) || []).filter((w) => q.has(w)).length }))
    .filter((x) => x.score > 0)
    .sort((a, b) => b.score - a.score)
    .slice(0, k)
    .map((x, i) => ({ n: i + 1, chunk_id: x.c.chunk_id, doc_id: x.c.doc_id, title: x.c.title, source: x.c.source, text: x.c.text, score: x.score / (q.size || 1) }));
}

async function ask(req, res, coll) {
  let input;
  try { input = JSON.parse((await body(req)).toString('utf8')); } catch (_) { return error(res, 400, 'invalid_input', 'body is not JSON'); }
  if (typeof input.question !== 'string' || !input.question.trim()) return error(res, 400, 'invalid_input', 'question must not be empty');
  const adapter = 'adapter' in input ? input.adapter : coll.adapter;
  if (adapter !== null && !ADAPTERS.some((a) => a.name === adapter)) return error(res, 404, 'not_found', `adapter ${adapter} not found`);
  const t0 = Date.now();
  const sources = retrieve(coll, input.question);
  const answer = sources.length
    ? `${adapter ? '' : '(base model) '}To do that: ${sources[0].text.split(/(?<=\.)\s/)[0]} [1]${sources.length > 1 ? `\nSee also [2].` : ''}`
    : "I don't know: the collection has no passage about that.";
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  res.write(': mock stream\n\n');
  const tokens = answer.match(/\S+\s*|\s+/g) || [];
  let first = 0;
  for (const t of tokens) {
    await sleep(15);
    if (!first) first = Date.now() - t0;
    res.write(`event: token\r\ndata: ${JSON.stringify({ text: t })}\r\n\r\n`);
  }
  const cited = [...new Set((answer.match(/\[(\d+)\]/g) || []).map((m) => Number(m.slice(1, -1))))];
  const done = {
    answer, adapter,
    citations: sources.filter((s) => cited.includes(s.n)).map(({ n, chunk_id, doc_id, title, source }) => ({ n, chunk_id, doc_id, title, source })),
    sources, prompt_tokens: 420, completion_tokens: tokens.length,
    timings_ms: { retrieve: 12.5, first_token: first, total: Date.now() - t0 },
  };
  res.end(`event: done\ndata: ${JSON.stringify(done)}\n\n`);
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://mock');
  const p = url.pathname;
  if (req.method === 'GET' && STATIC[p]) {
    const [file, type] = STATIC[p];
    res.writeHead(200, { 'Content-Type': type });
    return res.end(await readFile(path.join(webDir, file)));
  }
  if (p === '/api/collections' && req.method === 'GET') return send(res, 200, [...collections.values()].map(summary));
  if (p === '/api/collections' && req.method === 'POST') {
    let input;
    try { input = JSON.parse((await body(req)).toString('utf8')); } catch (_) { return error(res, 400, 'invalid_input', 'body is not JSON'); }
    if (typeof input.name !== 'string' || !NAME_RE.test(input.name)) return error(res, 400, 'invalid_input', `invalid collection name ${JSON.stringify(input.name)}`);
    if (collections.has(input.name)) return error(res, 409, 'conflict', `collection ${input.name} already exists`);
    const c = newCollection(input.name);
    collections.set(c.name, c);
    return send(res, 201, summary(c));
  }
  if (p === '/api/adapters' && req.method === 'GET') return send(res, 200, ADAPTERS);
  if (p === '/api/jobs' && req.method === 'GET') {
    const coll = url.searchParams.get('collection');
    return send(res, 200, [...jobs.values()].filter((j) => !coll || j.collection === coll).reverse());
  }
  let m = p.match(/^\/api\/jobs\/([^/]+)$/);
  if (m && req.method === 'GET') {
    const job = jobs.get(decodeURIComponent(m[1]));
    return job ? send(res, 200, job) : error(res, 404, 'not_found', `job ${m[1]} not found`);
  }
  m = p.match(/^\/api\/collections\/([^/]+)(\/documents|\/ask)?$/);
  if (m) {
    const coll = collections.get(decodeURIComponent(m[1]));
    if (!coll) return error(res, 404, 'not_found', `collection ${decodeURIComponent(m[1])} not found`);
    const sub = m[2] || '';
    if (!sub && req.method === 'GET') return send(res, 200, detail(coll));
    if (!sub && req.method === 'PATCH') {
      const input = JSON.parse((await body(req)).toString('utf8') || '{}');
      if (input.adapter !== null && !ADAPTERS.some((a) => a.name === input.adapter)) return error(res, 404, 'not_found', `adapter ${input.adapter} not found`);
      coll.adapter = input.adapter;
      return send(res, 200, summary(coll));
    }
    if (sub === '/documents' && req.method === 'GET') return send(res, 200, [...coll.docs.values()]);
    if (sub === '/documents' && req.method === 'POST') {
      const form = await new Request('http://mock/', { method: 'POST', headers: req.headers, body: await body(req) }).formData()
        .catch(() => null);
      const files = form ? form.getAll('files').filter((f) => typeof f === 'object') : [];
      if (!files.length) return error(res, 400, 'invalid_input', 'no parts named "files"');
      const loaded = await Promise.all(files.map(async (f) => ({ name: f.name, text: await f.text() })));
      const id = `job-${++jobSeq}`;
      const job = { id, kind: 'ingest', collection: coll.name, status: 'queued', progress: { done: 0, total: files.length, unit: 'files', message: '' },
        created_at: now(), started_at: now(), finished_at: null, error: null, result: { documents: 0, chunks: 0, failures: [] }, files: [], cancellable: false };
      jobs.set(id, job);
      ingest(coll, job, loaded);
      return send(res, 202, job);
    }
    if (sub === '/ask' && req.method === 'POST') return ask(req, res, coll);
  }
  return error(res, 404, 'not_found', `no route for ${req.method} ${p}`);
}

export function startMock(port = 0) {
  const server = http.createServer((req, res) => {
    handle(req, res).catch((err) => { if (!res.headersSent) error(res, 500, 'internal', String(err)); else res.end(); });
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

const FIXTURE = `Password resets

If you forgot your password, open the sign-in page and choose "Forgot password". Enter the email
address of your account and we send you a reset link that is valid for 30 minutes. Follow the link,
choose a new password of at least 12 characters and confirm it. All other sessions are signed out.

If the reset email does not arrive, check your spam folder or ask an administrator to reset the
password from the admin console under Users, Security, Reset password.
`;

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const runTest = process.argv.includes('--run');
  const port = runTest ? 0 : Number(process.argv[2] || 8787);
  const server = await startMock(port);
  const url = `http://127.0.0.1:${server.address().port}`;
  console.log(`mock domainrag at ${url}`);
  if (runTest) {
    let fixture = process.env.DOMAINRAG_FIXTURE;
    if (!fixture) {
      fixture = path.join(await mkdtemp(path.join(tmpdir(), 'domainrag-ui-')), 'password-reset.txt');
      await writeFile(fixture, FIXTURE);
    }
    const child = spawn(process.execPath, [path.join(here, 'ui.test.mjs')], {
      stdio: 'inherit', env: { ...process.env, DOMAINRAG_URL: url, DOMAINRAG_FIXTURE: fixture },
    });
    child.on('exit', (code) => { server.close(); process.exit(code ?? 1); });
  }
}
