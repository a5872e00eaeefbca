//! Text generation with mistral.rs: one base model, plus a pool of LoRA-adapted models.
//!
//! mistral.rs 0.8.1 merges a LoRA adapter into the weights when it loads it, and ignores per-request
//! adapter selection, so each adapter in use is its own merged `Model`; at most
//! `generate.max_resident_adapters` are kept (least recently used evicted); `load` builds them.
//! `repetition` forbids an answer to repeat a run of its own tokens (it curbs loops, not all).
//!
//! Owns mistral.rs: no mistral.rs type leaves this module. Knows nothing of retrieval or prompts
//! beyond the chat messages it is given.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use mistralrs::{Model, RequestBuilder, Response, TextMessageRole};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore, mpsc};

use crate::adapters::{AdapterError, AdapterRegistry};
use crate::config::{GenerateConfig, Settings};
use crate::error::ErrorKind;

mod load;
pub mod repetition;

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
        }
    }
}

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

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

/// Sampling for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    /// The answer may not repeat a run of this many of its own tokens (0 = no rule); see
    /// [`repetition`].
    pub no_repeat_ngram: usize,
}

impl Sampling {
    pub fn from_config(c: &GenerateConfig) -> Sampling {
        Sampling {
            temperature: c.temperature,
            top_p: c.top_p,
            max_tokens: c.max_tokens,
            no_repeat_ngram: c.no_repeat_ngram,
        }
    }
}

/// The base model and the adapter pool.
pub struct Generator {
    config: GenerateConfig,
    base_dir: PathBuf,
    registry: AdapterRegistry,
    base: Arc<Model>,
    /// Resident adapter models, least recently used first.
    adapters: Mutex<Vec<(String, Arc<Model>)>>,
    /// Serialises adapter builds so two requests for the same cold adapter build it once.
    building: Mutex<()>,
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit now.
    waiting: AtomicUsize,
    /// Adapter pool lookups served by a resident model / that had to build one.
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
}

/// Counters of the generator, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GeneratorStats {
    pub queued: usize,
    pub pool_hits: u64,
    pub pool_misses: u64,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

fn role(role: Role) -> TextMessageRole {
    match role {
        Role::System => TextMessageRole::System,
        Role::User => TextMessageRole::User,
        Role::Assistant => TextMessageRole::Assistant,
    }
}

impl Generator {
    /// Load the base model (blocking work happens on its own thread).
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
        let base = load::model(config, &base_dir, None).await?;
        Ok(Self::with_base(settings, base_dir, base))
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
        Ok(Self::with_base(
            settings,
            settings.generate_base_dir(),
            base,
        ))
    }

    fn with_base(settings: &Settings, base_dir: PathBuf, base: Model) -> Arc<Generator> {
        let config = settings.generate.clone();
        let registry = AdapterRegistry::new(&settings.paths.data_dir);
        Arc::new(Generator {
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            config,
            base_dir,
            registry,
            base: Arc::new(base),
            adapters: Mutex::new(Vec::new()),
            building: Mutex::new(()),
            waiting: AtomicUsize::new(0),
            pool_hits: AtomicU64::new(0),
            pool_misses: AtomicU64::new(0),
        })
    }

    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    /// Names of the adapters resident now, least recently used first.
    pub async fn resident_adapters(&self) -> Vec<String> {
        self.adapters
            .lock()
            .await
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The model serving `adapter` (the base for `None`), building it if it is not resident.
    async fn model_for(&self, adapter: Option<&str>) -> Result<Arc<Model>, GenerateError> {
        let Some(name) = adapter else {
            return Ok(Arc::clone(&self.base));
        };
        if let Some(model) = self.touch(name).await {
            self.pool_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(model);
        }
        let _building = self.building.lock().await;
        if let Some(model) = self.touch(name).await {
            self.pool_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(model);
        }
        self.pool_misses.fetch_add(1, Ordering::Relaxed);
        // Checked (and its files verified present) before the expensive build.
        self.registry.get(name)?;
        let started = Instant::now();
        let model = Arc::new(
            load::model(
                &self.config,
                &self.base_dir,
                Some(self.registry.model_id(name)),
            )
            .await?,
        );
        tracing::info!(
            adapter = name,
            seconds = started.elapsed().as_secs_f64(),
            "adapter model built"
        );
        let mut resident = self.adapters.lock().await;
        resident.push((name.to_string(), Arc::clone(&model)));
        while resident.len() > self.config.max_resident_adapters.max(1) {
            let (evicted, _) = resident.remove(0);
            // In-flight requests keep their `Arc`; the model is freed when they finish.
            tracing::info!(adapter = evicted, "adapter model evicted");
        }
        Ok(model)
    }

    /// The resident model for `name`, marked most recently used.
    async fn touch(&self, name: &str) -> Option<Arc<Model>> {
        let mut resident = self.adapters.lock().await;
        let pos = resident.iter().position(|(n, _)| n == name)?;
        let entry = resident.remove(pos);
        let model = Arc::clone(&entry.1);
        resident.push(entry);
        Some(model)
    }

    /// Build the models of these adapters now (at start, for the collections' adapters).
    pub async fn preload(&self, adapters: &[String]) -> Result<(), GenerateError> {
        for name in adapters.iter().take(self.config.max_resident_adapters) {
            self.model_for(Some(name)).await?;
        }
        Ok(())
    }

    /// Evict an adapter's model (after it is removed from the registry).
    pub async fn evict(&self, name: &str) {
        self.adapters.lock().await.retain(|(n, _)| n != name);
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
        let mut text = mistralrs::TextMessages::new();
        for m in messages {
            text = text.add_message(role(m.role), m.content);
        }
        self.base
            .tokenize(either::Either::Left(text), None, true, true, None)
            .await
            .map_err(|e| GenerateError::Generation(e.to_string()))
    }

    /// Token ids of `text` alone (no special tokens added).
    pub async fn tokenize_text(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.base
            .tokenize(
                either::Either::Right(text.to_string()),
                None,
                false,
                false,
                None,
            )
            .await
            .map_err(|e| GenerateError::Generation(e.to_string()))
    }

    /// The token that ends an assistant turn: what the chat template appends after an assistant
    /// message (generation stops there).
    pub async fn end_of_turn_token(&self) -> Result<u32, GenerateError> {
        let probe = |answer: &str| {
            vec![
                ChatMessage {
                    role: Role::User,
                    content: "q".into(),
                },
                ChatMessage {
                    role: Role::Assistant,
                    content: answer.into(),
                },
            ]
        };
        // The template renders `...answer<end>\n` or `...answer<end>`; the first token after the
        // answer's own tokens is the end-of-turn token.
        let mut text = mistralrs::TextMessages::new();
        for m in probe("zebra") {
            text = text.add_message(role(m.role), m.content);
        }
        let ids = self
            .base
            .tokenize(either::Either::Left(text), None, true, false, None)
            .await
            .map_err(|e| GenerateError::Generation(e.to_string()))?;
        let answer = self.tokenize_text("zebra").await?;
        let at = ids
            .windows(answer.len())
            .rposition(|w| w == answer.as_slice())
            .ok_or_else(|| GenerateError::Generation("cannot find the end-of-turn token".into()))?;
        ids.get(at + answer.len()).copied().ok_or_else(|| {
            GenerateError::Generation("the chat template ends without an end-of-turn token".into())
        })
    }

    /// Counters for metrics.
    pub fn stats(&self) -> GeneratorStats {
        GeneratorStats {
            queued: self.waiting.load(Ordering::Relaxed),
            pool_hits: self.pool_hits.load(Ordering::Relaxed),
            pool_misses: self.pool_misses.load(Ordering::Relaxed),
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

    /// Stream a chat completion from the model of `adapter` (waits for a slot; see `slot`).
    pub async fn stream(
        &self,
        adapter: Option<&str>,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<mpsc::Receiver<GenEvent>, GenerateError> {
        let permit = self.slot().await?;
        let model = self.model_for(adapter).await?;
        let mut request = RequestBuilder::new().set_sampler_max_len(sampling.max_tokens);
        if sampling.temperature > 0.0 {
            request = request
                .set_sampler_temperature(sampling.temperature)
                .set_sampler_topp(sampling.top_p)
                .set_sampler_topk(0);
        }
        if sampling.no_repeat_ngram > 0 {
            request = request.add_logits_processor(Arc::new(repetition::NoRepeatNgram::new(
                sampling.no_repeat_ngram,
            )));
        }
        for m in messages {
            request = request.add_message(role(m.role), m.content);
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _permit = permit;
            // Runs when this task ends, however it ends (done, error, caller gone).
            let _release = crate::telemetry::ReleaseFreedHeapOnDrop;
            let mut stream = match model.stream_chat_request(request).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(GenEvent::Error(e.to_string())).await;
                    return;
                }
            };
            let mut completion_tokens = 0;
            while let Some(response) = stream.next().await {
                match response {
                    Response::Chunk(chunk) => {
                        let choice = chunk.choices.first();
                        if let Some(text) = choice.and_then(|c| c.delta.content.clone()) {
                            completion_tokens += 1;
                            if !text.is_empty() && tx.send(GenEvent::Token(text)).await.is_err() {
                                return; // the caller went away: dropping the stream cancels it
                            }
                        }
                        let finish = choice.and_then(|c| c.finish_reason.clone());
                        if let Some(finish_reason) = finish {
                            let (prompt_tokens, completion) = chunk
                                .usage
                                .as_ref()
                                .map(|u| (u.prompt_tokens, u.completion_tokens))
                                .unwrap_or((0, completion_tokens));
                            let _ = tx
                                .send(GenEvent::Done {
                                    prompt_tokens,
                                    completion_tokens: completion,
                                    finish_reason,
                                })
                                .await;
                            return;
                        }
                    }
                    Response::Done(done) => {
                        let _ = tx
                            .send(GenEvent::Done {
                                prompt_tokens: done.usage.prompt_tokens,
                                completion_tokens: done.usage.completion_tokens,
                                finish_reason: done
                                    .choices
                                    .first()
                                    .map(|c| c.finish_reason.clone())
                                    .unwrap_or_default(),
                            })
                            .await;
                        return;
                    }
                    Response::InternalError(e) | Response::ValidationError(e) => {
                        let _ = tx.send(GenEvent::Error(e.to_string())).await;
                        return;
                    }
                    Response::ModelError(e, _) => {
                        let _ = tx.send(GenEvent::Error(e)).await;
                        return;
                    }
                    _ => {}
                }
            }
        });
        Ok(rx)
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
