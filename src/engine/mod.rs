//! domainrag's own generation engine: one base model in memory, every adapter resident beside it
//! unmerged, requests for different adapters decoded together.
//!
//! A scheduler thread owns the running sequences. Each step it admits waiting requests while the
//! KV budget (`generate.kv_budget_tokens`, the prompt and the token limit of every running
//! sequence together) has room, then runs one forward pass over one row per decoding sequence
//! plus chunks of the prompts still being read (at most `generate.step_tokens` rows), samples
//! the next token of every sequence that has a row at its end, and streams the text. A request
//! whose receiver is dropped (the client went away) leaves at the next step and its cache is
//! freed then. `step` holds the batch maths, `adapter` the resident adapters, `sample` the
//! token choice, `chat` the tokenizer and template.
//!
//! Knows nothing of retrieval, collections or the adapter registry's files beyond loading one
//! adapter directory it is given.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::adapters::AdapterInfo;
use crate::llama::Weights;
use crate::rng::Rng;

pub mod adapter;
pub mod chat;
mod kernels;
pub mod sample;
mod step;

pub use adapter::ResidentAdapter;
pub use chat::{ChatMessage, ChatTokenizer, Detokenizer, Role};
pub use sample::SamplingParams;
use step::{KvCache, Segment, StepHooks};

/// What a generation stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A piece of the answer.
    Token(String),
    /// The end, with token counts.
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: String,
    },
    /// Generation failed part-way.
    Error(String),
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// KV cache tokens of all running sequences together (prompt + token limit each).
    pub kv_budget_tokens: usize,
    /// Rows of one forward step (decode rows and prompt chunks).
    pub step_tokens: usize,
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load {what}: {message}")]
    Load { what: String, message: String },
    #[error(
        "the prompt ({prompt} tokens) and max_tokens ({max_tokens}) do not fit: {limit} tokens \
         at most ({why})"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
        why: &'static str,
    },
    #[error("the engine has stopped")]
    Stopped,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<ResidentAdapter>>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Seed of sampling when the temperature is above 0.
    pub seed: u64,
}

struct Queued {
    request: GenRequest,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// The queue the scheduler thread takes requests from.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    counters: Counters,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    running: AtomicU64,
    kv_reserved: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
}

/// Figures of the engine, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: u64,
    pub kv_reserved_tokens: u64,
    pub steps: u64,
    pub step_rows: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub resident_adapters: usize,
    pub adapter_bytes: usize,
}

/// The engine (see the module doc).
pub struct Engine {
    weights: Arc<Weights>,
    chat: Arc<ChatTokenizer>,
    adapters: RwLock<HashMap<String, Arc<ResidentAdapter>>>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Load the base model of `dir` and its tokenizer, and start the scheduler thread.
    pub fn start(dir: &Path, device: &Device, limits: EngineLimits) -> Result<Engine, EngineError> {
        let load = |what: &str, message: String| EngineError::Load {
            what: format!("{what} from {}", dir.display()),
            message,
        };
        let weights = Arc::new(
            Weights::load(dir, device).map_err(|e| load("the base model", e.to_string()))?,
        );
        let chat =
            Arc::new(ChatTokenizer::load(dir).map_err(|e| load("the tokenizer", e.to_string()))?);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let scheduler = Scheduler {
            weights: Arc::clone(&weights),
            chat: Arc::clone(&chat),
            shared: Arc::clone(&shared),
            limits,
            running: Vec::new(),
        };
        let worker = std::thread::Builder::new()
            .name("domainrag-engine".into())
            .spawn(move || scheduler.run())
            .map_err(|e| load("the scheduler thread", e.to_string()))?;
        Ok(Engine {
            weights,
            chat,
            adapters: RwLock::new(HashMap::new()),
            shared,
            limits,
            worker: Mutex::new(Some(worker)),
        })
    }

    pub fn chat(&self) -> &ChatTokenizer {
        &self.chat
    }

    /// The base model's shape.
    pub fn config(&self) -> &crate::llama::LlamaConfig {
        &self.weights.config
    }

    /// Load an adapter's matrices (replacing a resident one of the same name).
    pub fn load_adapter(&self, info: &AdapterInfo, dir: &Path) -> Result<(), EngineError> {
        let adapter =
            ResidentAdapter::load_lora(info, dir, &self.weights.config, &self.weights.device)
                .map_err(|e| EngineError::Load {
                    what: format!("adapter {}", info.name),
                    message: e.to_string(),
                })?;
        self.write_adapters()
            .insert(info.name.clone(), Arc::new(adapter));
        Ok(())
    }

    /// Forget an adapter (requests already running with it finish with it).
    pub fn remove_adapter(&self, name: &str) {
        self.write_adapters().remove(name);
    }

    /// A resident adapter.
    pub fn adapter(&self, name: &str) -> Option<Arc<ResidentAdapter>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of the resident adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn write_adapters(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<ResidentAdapter>>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a request; its events arrive on the receiver (dropping it cancels the request).
    pub fn submit(
        &self,
        request: GenRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, EngineError> {
        let need = request.prompt.len() + request.max_tokens;
        let context = self
            .weights
            .config
            .max_position_embeddings
            .unwrap_or(usize::MAX);
        for (limit, why) in [
            (context, "the model's context"),
            (self.limits.kv_budget_tokens, "generate.kv_budget_tokens"),
        ] {
            if need > limit {
                return Err(EngineError::TooLong {
                    prompt: request.prompt.len(),
                    max_tokens: request.max_tokens,
                    limit,
                    why,
                });
            }
        }
        let (events, rx) = mpsc::unbounded_channel();
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.stop {
            return Err(EngineError::Stopped);
        }
        queue.waiting.push_back(Queued { request, events });
        self.shared.wake.notify_one();
        Ok(rx)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let waiting = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .len();
        let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        EngineStats {
            waiting,
            running: c.running.load(Ordering::Relaxed),
            kv_reserved_tokens: c.kv_reserved.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            step_rows: c.step_rows.load(Ordering::Relaxed),
            finished: c.finished.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            resident_adapters: adapters.len(),
            adapter_bytes: adapters.values().map(|a| a.bytes).sum(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = worker.join();
        }
    }
}

/// A running request.
struct Sequence {
    request: GenRequest,
    events: mpsc::UnboundedSender<GenEvent>,
    cache: KvCache,
    /// Prompt tokens in the cache so far.
    read: usize,
    generated: Vec<u32>,
    detok: Detokenizer,
    rng: Rng,
    done: bool,
}

impl Sequence {
    fn adapter_name(&self) -> &str {
        self.request
            .adapter
            .as_ref()
            .map_or("", |a| a.name.as_str())
    }

    fn reserved(&self) -> usize {
        self.request.prompt.len() + self.request.max_tokens
    }

    /// The rows this sequence feeds the next step (`limit` rows at most for a prompt).
    fn next_rows(&self, limit: usize) -> (Vec<u32>, usize) {
        let prompt = &self.request.prompt;
        if self.read < prompt.len() {
            let n = (prompt.len() - self.read).min(limit);
            (prompt[self.read..self.read + n].to_vec(), self.read)
        } else {
            let last = *self.generated.last().unwrap_or(&0);
            (vec![last], self.cache.len())
        }
    }

    fn finish(&mut self, reason: &str) {
        self.done = true;
        let _ = self.events.send(GenEvent::Done {
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.generated.len(),
            finish_reason: reason.to_string(),
        });
    }

    /// Take the sampled `token`: stream its text, or stop.
    fn accept(&mut self, token: u32, chat: &ChatTokenizer) {
        self.generated.push(token);
        if token == chat.end_of_turn() {
            // Counted as generated (as mistral.rs and OpenAI count it), never shown.
            self.flush(chat);
            self.finish("stop");
            return;
        }
        match self.detok.push(chat, token) {
            Ok(Some(text)) => {
                let _ = self.events.send(GenEvent::Token(text));
            }
            Ok(None) => {}
            Err(e) => {
                self.fail(&e.to_string());
                return;
            }
        }
        if self.generated.len() >= self.request.max_tokens {
            self.flush(chat);
            self.finish("length");
        }
    }

    fn flush(&mut self, chat: &ChatTokenizer) {
        if let Ok(Some(text)) = self.detok.finish(chat) {
            let _ = self.events.send(GenEvent::Token(text));
        }
    }

    fn fail(&mut self, message: &str) {
        self.done = true;
        let _ = self.events.send(GenEvent::Error(message.to_string()));
    }
}

/// The scheduler thread's state.
struct Scheduler {
    weights: Arc<Weights>,
    chat: Arc<ChatTokenizer>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    running: Vec<Sequence>,
}

impl Scheduler {
    fn run(mut self) {
        while let Some(admitted) = self.wait_and_admit() {
            for queued in admitted {
                self.start(queued);
            }
            let before = self.running.len();
            self.running.retain(|s| !s.events.is_closed());
            let cancelled = before - self.running.len();
            self.shared
                .counters
                .cancelled
                .fetch_add(cancelled as u64, Ordering::Relaxed);
            // The step runs on a worker of rayon's pool, where the ops' parallel loops start
            // without a hand-over: from this thread each of the ~300 loops of a decode step
            // would wake a worker and sleep until it finished.
            if !self.running.is_empty()
                && let Err(e) = rayon::scope(|_| self.step())
            {
                tracing::error!(error = %e, "generation step failed");
                for s in &mut self.running {
                    s.fail(&format!("generation failed: {e}"));
                }
            }
            let before = self.running.len();
            self.running.retain(|s| !s.done);
            let finished = before - self.running.len();
            self.publish(finished as u64);
            if finished + cancelled > 0 {
                // Hand the finished sequences' caches back to the kernel (see telemetry).
                crate::telemetry::release_freed_heap();
            }
        }
        for s in &mut self.running {
            s.fail("the engine has stopped");
        }
    }

    fn publish(&self, finished: u64) {
        let c = &self.shared.counters;
        c.finished.fetch_add(finished, Ordering::Relaxed);
        c.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let reserved: usize = self.running.iter().map(Sequence::reserved).sum();
        c.kv_reserved.store(reserved as u64, Ordering::Relaxed);
    }

    /// Wait until there is work; take the waiting requests that fit the KV budget. `None` once
    /// the engine stops.
    fn wait_and_admit(&mut self) -> Option<Vec<Queued>> {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        while self.running.is_empty() && queue.waiting.is_empty() && !queue.stop {
            queue = self
                .shared
                .wake
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        if queue.stop {
            for q in queue.waiting.drain(..) {
                let _ = q
                    .events
                    .send(GenEvent::Error("the engine has stopped".into()));
            }
            return None;
        }
        let mut reserved: usize = self.running.iter().map(Sequence::reserved).sum();
        let mut admitted = Vec::new();
        while let Some(next) = queue.waiting.front() {
            let need = next.request.prompt.len() + next.request.max_tokens;
            if reserved + need > self.limits.kv_budget_tokens {
                break;
            }
            reserved += need;
            admitted.extend(queue.waiting.pop_front());
        }
        Some(admitted)
    }

    fn start(&mut self, queued: Queued) {
        let Queued { request, events } = queued;
        if events.is_closed() {
            return;
        }
        let capacity = request.prompt.len() + request.max_tokens;
        match KvCache::new(&self.weights.config, capacity, &self.weights.device) {
            Ok(cache) => {
                let rng = Rng::new(request.seed);
                self.running.push(Sequence {
                    request,
                    events,
                    cache,
                    read: 0,
                    generated: Vec::new(),
                    detok: Detokenizer::default(),
                    rng,
                    done: false,
                });
            }
            Err(e) => {
                let _ = events.send(GenEvent::Error(format!(
                    "cannot allocate the KV cache: {e}"
                )));
            }
        }
    }

    /// One forward pass over every running sequence's next rows.
    fn step(&mut self) -> candle_core::Result<()> {
        // Sequences sharing an adapter sit together, so their rows form one group.
        self.running
            .sort_by(|a, b| a.adapter_name().cmp(b.adapter_name()));
        let decoding = self
            .running
            .iter()
            .filter(|s| s.read >= s.request.prompt.len())
            .count();
        let mut budget = self.limits.step_tokens.saturating_sub(decoding).max(1);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        // (index in running, rows, whether the segment's last row is sampled)
        let mut plan = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            let prefill = s.read < s.request.prompt.len();
            if prefill && budget == 0 {
                continue;
            }
            let (rows, start) = s.next_rows(budget);
            if prefill {
                budget -= rows.len();
            }
            let first = ids.len();
            positions.extend((start..start + rows.len()).map(|p| p as u32));
            ids.extend_from_slice(&rows);
            let sampled = !prefill || s.read + rows.len() == s.request.prompt.len();
            plan.push((i, first..ids.len(), sampled));
        }
        let started = Instant::now();
        let hidden = {
            let mut groups: Vec<(std::ops::Range<usize>, Arc<ResidentAdapter>)> = Vec::new();
            for (i, rows, _) in &plan {
                let Some(adapter) = &self.running[*i].request.adapter else {
                    continue;
                };
                match groups.last_mut() {
                    Some((range, a)) if Arc::ptr_eq(a, adapter) && range.end == rows.start => {
                        range.end = rows.end;
                    }
                    _ => groups.push((rows.clone(), Arc::clone(adapter))),
                }
            }
            let mut segments = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, s) in self.running.iter_mut().enumerate() {
                if let Some((_, rows, _)) = planned.next_if(|(j, _, _)| *j == i) {
                    segments.push(Segment {
                        rows: rows.clone(),
                        cache: &mut s.cache,
                    });
                }
            }
            let mut hooks = StepHooks { segments, groups };
            self.weights.forward(&ids, &positions, &mut hooks)?
        };
        let sample_rows: Vec<u32> = plan
            .iter()
            .filter(|(_, _, sampled)| *sampled)
            .map(|(_, rows, _)| rows.end as u32 - 1)
            .collect();
        let logits = if sample_rows.is_empty() {
            Vec::new()
        } else {
            self.weights
                .logits_at(&hidden, &sample_rows)?
                .to_vec2::<f32>()?
        };
        let mut logits = logits.into_iter();
        for (i, rows, sampled) in plan {
            let s = &mut self.running[i];
            s.cache.advance(rows.len());
            if s.read < s.request.prompt.len() {
                s.read += rows.len();
            }
            if sampled && let Some(mut row) = logits.next() {
                let token =
                    sample::next_token(&mut row, &s.generated, &s.request.sampling, &mut s.rng);
                s.accept(token, &self.chat);
            }
        }
        let c = &self.shared.counters;
        c.steps.fetch_add(1, Ordering::Relaxed);
        c.step_rows.fetch_add(ids.len() as u64, Ordering::Relaxed);
        tracing::trace!(
            rows = ids.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        Ok(())
    }
}
