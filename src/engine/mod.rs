//! domainrag's own generation engine: one base model in memory, every adapter resident beside it
//! unmerged, requests for different adapters decoded together.
//!
//! A scheduler thread owns the running sequences. Each step it admits waiting requests while the
//! KV budget (`generate.kv_budget_tokens`, the prompt and the token limit of every running
//! sequence together) has room, then runs one forward pass over one row per decoding sequence
//! plus chunks of the prompts still being read (at most `generate.step_tokens` rows), samples
//! the next token of every sequence that has a row at its end, and streams the text. A request
//! whose receiver is dropped (the client went away) leaves at the next step and its cache is
//! freed then. `scheduler` runs that loop, `step` holds the batch maths (`kernels` its CPU decode
//! kernels), `adapter` the resident adapters, `sample` the token choice (`cite` its rule on citations), `chat` the tokenizer and
//! template.
//!
//! Knows nothing of retrieval, collections or the adapter registry's files beyond loading one
//! adapter directory it is given.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use candle_core::Device;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::adapters::AdapterInfo;
use crate::llama::Weights;
use crate::llama::quant::QFormat;

pub mod adapter;
pub mod chat;
pub mod cite;
mod kernels;
pub mod sample;
mod scheduler;
mod step;

pub use adapter::{LoraDtype, ResidentAdapter};
pub use chat::{ChatMessage, ChatTokenizer, Detokenizer, Role};
pub use sample::SamplingParams;
use scheduler::Scheduler;

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

/// How the base's linear layers are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    /// Blockwise 8-bit ([`crate::llama::quant`]).
    Q8_0,
    /// Blockwise 4-bit ([`crate::llama::quant`]).
    Q4_0,
}

impl Quant {
    /// The `generate.isq` value naming this (`none` for f32); `None` for other values.
    pub fn from_isq(isq: &str) -> Option<Quant> {
        match isq {
            "none" => Some(Quant::F32),
            "q8_0" => Some(Quant::Q8_0),
            "q4_0" => Some(Quant::Q4_0),
            _ => None,
        }
    }

    fn format(self) -> Option<QFormat> {
        match self {
            Quant::F32 => None,
            Quant::Q8_0 => Some(QFormat::Q8_0),
            Quant::Q4_0 => Some(QFormat::Q4_0),
        }
    }
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
        "the prompt ({prompt} tokens) and max_tokens ({max_tokens}) do not fit{}: {limit} tokens \
         at most ({why})",
        if *virtual_tokens > 0 { format!(" after the adapter's {virtual_tokens} virtual tokens") } else { String::new() }
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        /// The adapter's (prompt and prefix tuning), read before the prompt.
        virtual_tokens: usize,
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

impl GenRequest {
    /// KV cache tokens it needs at most: its adapter's virtual tokens (prompt and prefix
    /// tuning), its prompt and its token limit.
    pub fn kv_tokens(&self) -> usize {
        self.virtual_tokens() + self.prompt.len() + self.max_tokens
    }

    /// Its adapter's virtual tokens (prompt and prefix tuning; 0 for other kinds).
    pub fn virtual_tokens(&self) -> usize {
        self.adapter.as_ref().map_or(0, |a| a.virtual_tokens())
    }
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
    lora_dtype: LoraDtype,
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
    /// Load the base model of `dir` and its tokenizer, and start the scheduler thread; adapters
    /// loaded later keep their LoRA matrices as `lora_dtype`.
    pub fn start(
        dir: &Path,
        device: &Device,
        quant: Quant,
        lora_dtype: LoraDtype,
        limits: EngineLimits,
    ) -> Result<Engine, EngineError> {
        let load = |what: &str, message: String| EngineError::Load {
            what: format!("{what} from {}", dir.display()),
            message,
        };
        let mut weights =
            Weights::load(dir, device).map_err(|e| load("the base model", e.to_string()))?;
        if let Some(format) = quant.format() {
            weights
                .quantize(format)
                .map_err(|e| load(&format!("the base model as {format:?}"), e.to_string()))?;
        }
        let weights = Arc::new(weights);
        let chat =
            Arc::new(ChatTokenizer::load(dir).map_err(|e| load("the tokenizer", e.to_string()))?);
        // Now, not in the scheduler's first step (decoding every token takes a moment).
        chat.citation_vocab();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let scheduler = Scheduler::new(
            Arc::clone(&weights),
            Arc::clone(&chat),
            Arc::clone(&shared),
            limits,
        );
        let worker = std::thread::Builder::new()
            .name("domainrag-engine".into())
            .spawn(move || scheduler.run())
            .map_err(|e| load("the scheduler thread", e.to_string()))?;
        Ok(Engine {
            weights,
            chat,
            adapters: RwLock::new(HashMap::new()),
            lora_dtype,
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
            ResidentAdapter::load(info, dir, &self.weights, self.lora_dtype).map_err(|e| {
                EngineError::Load {
                    what: format!("adapter {}", info.name),
                    message: e.to_string(),
                }
            })?;
        self.write_adapters()
            .insert(info.name.clone(), Arc::new(adapter));
        // Loading read the file and made f32 intermediates, freed now between the matrices kept:
        // hand those pages back rather than leave them as holes that count as resident.
        crate::heap::release_freed_heap();
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
        let need = request.kv_tokens();
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
                    virtual_tokens: request.virtual_tokens(),
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
