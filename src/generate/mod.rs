//! Text generation behind one interface, on one of two engines (`generate.engine`): domainrag's
//! own ([`crate::engine`] via `native`: one base model, every adapter resident unmerged, requests
//! for different adapters batched together) or mistral.rs (`mistral`, with `load`: one merged
//! model per adapter in a small pool; `hubview` shows it the registry's adapters as the hub cache
//! it reads them from). Both share the request slots (`generate.max_concurrent`,
//! `generate.queue_depth`), the chat types and the events a stream yields. `repetition` adapts
//! the engine's decoding rules (no looping, citing only given sources) to mistral.rs's logits
//! processors.
//!
//! Knows nothing of retrieval or prompts beyond the chat messages it is given.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

use crate::adapters::{AdapterError, AdapterRegistry};
use crate::config::{GenerateConfig, Settings};
use crate::error::ErrorKind;

pub mod hubview;
mod load;
mod mistral;
mod native;
pub mod repetition;

pub use crate::engine::{ChatMessage, EngineStats, GenEvent, Role};
use mistral::MistralPool;
use native::NativeBackend;

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "base model directory {path} is missing or incomplete (needs config.json, \
         model.safetensors, tokenizer.json, tokenizer_config.json); run scripts/fetch-models.sh or \
         set generate.base_model_dir"
    )]
    MissingBase { path: PathBuf },
    #[error("cannot load model {what}: {message}")]
    Load { what: String, message: String },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("the generator is busy ({0} requests in flight); retry shortly")]
    Busy(usize),
    #[error("{0}")]
    TooLong(String),
    /// An adapter of a kind this engine cannot apply.
    #[error(
        "adapter {name} is a {kind} adapter, which generate.engine = \"{engine}\" cannot serve; \
         the native engine serves every kind (generate.engine = \"native\")"
    )]
    UnsupportedKind {
        name: String,
        kind: &'static str,
        engine: &'static str,
    },
}

impl GenerateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            GenerateError::MissingBase { .. } | GenerateError::Load { .. } => {
                ErrorKind::Unavailable
            }
            GenerateError::Adapter(e) => e.kind(),
            GenerateError::Generation(_) => ErrorKind::Internal,
            GenerateError::Busy(_) => ErrorKind::Unavailable,
            GenerateError::TooLong(_) | GenerateError::UnsupportedKind { .. } => {
                ErrorKind::InvalidInput
            }
        }
    }
}

/// Sampling for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    /// The answer may not repeat a run of this many of its own tokens (0 = no rule); see
    /// [`repetition`].
    pub no_repeat_ngram: usize,
    /// Sources the prompt numbers: citations may only name 1 to this (0 = no rule); see
    /// [`crate::engine::cite`].
    pub cite_sources: usize,
}

impl Sampling {
    pub fn from_config(c: &GenerateConfig) -> Sampling {
        Sampling {
            temperature: c.temperature,
            top_p: c.top_p,
            max_tokens: c.max_tokens,
            no_repeat_ngram: c.no_repeat_ngram,
            cite_sources: 0,
        }
    }
}

/// The engine answering.
enum Backend {
    Mistral(Box<MistralPool>),
    Native(NativeBackend),
}

/// The generator: an engine and the request slots.
pub struct Generator {
    config: GenerateConfig,
    base_dir: PathBuf,
    registry: AdapterRegistry,
    backend: Backend,
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit now.
    waiting: AtomicUsize,
}

/// Counters of the generator, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GeneratorStats {
    /// Generations holding a slot now (a cancelled one until its engine task has let go).
    pub running: usize,
    pub queued: usize,
    /// mistral.rs's merged-model pool: lookups served by a resident model / that built one.
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// The native engine's figures (`None` on mistral.rs).
    pub engine: Option<EngineStats>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Load the base model on the configured engine (blocking work happens on its own thread).
    pub async fn load(settings: &Settings) -> Result<Arc<Generator>, GenerateError> {
        let config = &settings.generate;
        let base_dir = settings.generate_base_dir();
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            if !base_dir.join(file).is_file() {
                return Err(GenerateError::MissingBase { path: base_dir });
            }
        }
        let registry = AdapterRegistry::new(&settings.paths.data_dir);
        let backend = if config.engine == "native" {
            Backend::Native(NativeBackend::load(config, &base_dir, registry.clone()).await?)
        } else {
            let base = load::model(config, &base_dir, None).await?;
            Backend::Mistral(Box::new(MistralPool::new(
                config.clone(),
                base_dir.clone(),
                registry.clone(),
                base,
            )))
        };
        // Loading read the files and made intermediates, freed now: hand their pages back rather
        // than keep them (some cached for reuse, `heap::blocks`) until the first answer ends.
        crate::heap::release_freed_heap();
        Ok(Self::with_backend(settings, base_dir, registry, backend))
    }

    /// A generator whose base model is read from a GGUF file by mistral.rs's GGUF loader (with
    /// its tokenizer and chat template). Used by `bench engines` to measure that path; adapters
    /// still merge into the HF base directory, since mistral.rs 0.8.1 cannot apply a PEFT LoRA
    /// to a GGUF model.
    pub async fn load_gguf(
        settings: &Settings,
        gguf: &std::path::Path,
    ) -> Result<Arc<Generator>, GenerateError> {
        let base = load::gguf_model(settings, gguf).await?;
        let base_dir = settings.generate_base_dir();
        let registry = AdapterRegistry::new(&settings.paths.data_dir);
        let pool = MistralPool::new(
            settings.generate.clone(),
            base_dir.clone(),
            registry.clone(),
            base,
        );
        Ok(Self::with_backend(
            settings,
            base_dir,
            registry,
            Backend::Mistral(Box::new(pool)),
        ))
    }

    /// The generator over `backend`, sharing the registry its backend was given (opened once).
    fn with_backend(
        settings: &Settings,
        base_dir: PathBuf,
        registry: AdapterRegistry,
        backend: Backend,
    ) -> Arc<Generator> {
        let config = settings.generate.clone();
        Arc::new(Generator {
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            registry,
            config,
            base_dir,
            backend,
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    /// Which engine answers: `native` or `mistralrs`.
    pub fn engine_name(&self) -> &'static str {
        match self.backend {
            Backend::Mistral(_) => "mistralrs",
            Backend::Native(_) => "native",
        }
    }

    /// Names of the adapters resident now.
    pub async fn resident_adapters(&self) -> Vec<String> {
        match &self.backend {
            Backend::Mistral(pool) => pool.resident_adapters().await,
            Backend::Native(native) => native.engine().adapter_names(),
        }
    }

    /// Make these adapters resident now (at start, for the collections' adapters).
    pub async fn preload(&self, adapters: &[String]) -> Result<(), GenerateError> {
        match &self.backend {
            Backend::Mistral(pool) => pool.preload(adapters).await,
            Backend::Native(native) => native.preload(adapters).await,
        }
    }

    /// At start, after [`Generator::preload`]: the native engine loads every other registered
    /// adapter too (they cost megabytes, not a model copy each); mistral.rs builds nothing more.
    pub async fn preload_registered(&self) -> Result<(), GenerateError> {
        match &self.backend {
            Backend::Mistral(_) => Ok(()),
            Backend::Native(native) => native.preload_registered().await,
        }
    }

    /// Forget an adapter's resident copy (after it is removed from the registry).
    pub async fn evict(&self, name: &str) {
        match &self.backend {
            Backend::Mistral(pool) => pool.evict(name).await,
            Backend::Native(native) => native.evict(name),
        }
    }

    /// After `name` was registered or replaced: the old resident copy goes; the native engine
    /// loads the new one at once (a failure is logged; the next request reports it).
    pub async fn adapter_registered(&self, name: &str) {
        self.evict(name).await;
        if let Backend::Native(native) = &self.backend
            && let Err(e) = native.preload(&[name.to_string()]).await
        {
            tracing::warn!(adapter = name, error = %e, "registered adapter not loaded");
        }
    }

    /// Number of tokens of `text` in the base tokenizer (no special tokens).
    pub async fn count_tokens(&self, text: &str) -> Result<usize, GenerateError> {
        self.tokenize_text(text).await.map(|t| t.len())
    }

    /// The token ids serving feeds the base model for `messages`: the model's chat template with
    /// the generation prompt, tokenised by its tokenizer.
    pub async fn tokenize_chat(
        &self,
        messages: Vec<ChatMessage>,
    ) -> Result<Vec<u32>, GenerateError> {
        match &self.backend {
            Backend::Mistral(pool) => pool.tokenize_chat(messages).await,
            Backend::Native(native) => native
                .engine()
                .chat()
                .encode_chat(&messages)
                .map_err(|e| GenerateError::Generation(e.to_string())),
        }
    }

    /// Token ids of `text` alone (no special tokens added).
    pub async fn tokenize_text(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        match &self.backend {
            Backend::Mistral(pool) => pool.tokenize_text(text).await,
            Backend::Native(native) => native
                .engine()
                .chat()
                .encode_text(text)
                .map_err(|e| GenerateError::Generation(e.to_string())),
        }
    }

    /// The token that ends an assistant turn: what the chat template appends after an assistant
    /// message (generation stops there).
    pub async fn end_of_turn_token(&self) -> Result<u32, GenerateError> {
        match &self.backend {
            Backend::Mistral(pool) => pool.end_of_turn_token().await,
            Backend::Native(native) => Ok(native.engine().chat().end_of_turn()),
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> GeneratorStats {
        let (pool_hits, pool_misses, engine) = match &self.backend {
            Backend::Mistral(pool) => (
                pool.pool_hits.load(Ordering::Relaxed),
                pool.pool_misses.load(Ordering::Relaxed),
                None,
            ),
            Backend::Native(native) => (0, 0, Some(native.engine().stats())),
        };
        GeneratorStats {
            running: self
                .config
                .max_concurrent
                .saturating_sub(self.permits.available_permits()),
            queued: self.waiting.load(Ordering::Relaxed),
            pool_hits,
            pool_misses,
            engine,
        }
    }

    /// A generation slot: at most `generate.max_concurrent` run, up to `generate.queue_depth`
    /// more wait; past that the request is refused with `Busy` instead of piling up.
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, GenerateError> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        if queued >= self.config.queue_depth {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(GenerateError::Busy(self.config.max_concurrent + queued));
        }
        let permit = Arc::clone(&self.permits).acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        permit.map_err(|_| GenerateError::Generation("the generator is shutting down".into()))
    }

    /// Stream a chat completion with `adapter` (the base for `None`); waits for a slot (see
    /// `slot`). Dropping the receiver cancels the generation.
    pub async fn stream(
        &self,
        adapter: Option<&str>,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<mpsc::Receiver<GenEvent>, GenerateError> {
        let permit = self.slot().await?;
        match &self.backend {
            Backend::Mistral(pool) => pool.stream(permit, adapter, messages, sampling).await,
            Backend::Native(native) => native.stream(permit, adapter, messages, sampling).await,
        }
    }

    /// Generate a whole answer (collects the stream).
    pub async fn complete(
        &self,
        adapter: Option<&str>,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<Completion, GenerateError> {
        let started = Instant::now();
        let mut rx = self.stream(adapter, messages, sampling).await?;
        let mut text = String::new();
        let mut first_token_ms = None;
        while let Some(event) = rx.recv().await {
            match event {
                GenEvent::Token(t) => {
                    first_token_ms.get_or_insert(started.elapsed().as_secs_f64() * 1e3);
                    text.push_str(&t);
                }
                GenEvent::Done {
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => {
                    return Ok(Completion {
                        text,
                        prompt_tokens,
                        completion_tokens,
                        first_token_ms: first_token_ms.unwrap_or_default(),
                        total_ms: started.elapsed().as_secs_f64() * 1e3,
                    });
                }
                GenEvent::Error(e) => return Err(GenerateError::Generation(e)),
            }
        }
        Err(GenerateError::Generation(
            "the stream ended without a result".into(),
        ))
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub first_token_ms: f64,
    pub total_ms: f64,
}
