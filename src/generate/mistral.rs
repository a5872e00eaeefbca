//! The mistral.rs path (`generate.engine = "mistralrs"`): one base `Model`, plus a pool of
//! LoRA-adapted models. mistral.rs 0.8.1 merges a LoRA adapter into the weights when it loads it,
//! and ignores per-request adapter selection, so each adapter in use is its own merged `Model`;
//! at most `generate.max_resident_adapters` are kept (least recently used evicted); `load` builds
//! them.
//!
//! Owns mistral.rs: no mistral.rs type leaves this module and `load`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use mistralrs::{Model, RequestBuilder, Response, TextMessageRole};
use tokio::sync::{Mutex, OwnedSemaphorePermit, mpsc};

use super::{ChatMessage, GenEvent, GenerateError, Role, Sampling, hubview, load, repetition};
use crate::adapters::AdapterRegistry;
use crate::config::GenerateConfig;
use crate::engine::cite::CitationVocab;

fn role(role: Role) -> TextMessageRole {
    match role {
        Role::System => TextMessageRole::System,
        Role::User => TextMessageRole::User,
        Role::Assistant => TextMessageRole::Assistant,
    }
}

/// The base model and the merged adapter models.
pub(super) struct MistralPool {
    config: GenerateConfig,
    base_dir: PathBuf,
    registry: AdapterRegistry,
    base: Arc<Model>,
    /// Resident adapter models, least recently used first.
    adapters: Mutex<Vec<(String, Arc<Model>)>>,
    /// Serialises adapter builds so two requests for the same cold adapter build it once.
    building: Mutex<()>,
    /// Every token's text for the citation rule, read from the base's tokenizer on first use
    /// (`None`: it could not be read, and the rule is off).
    citations: std::sync::OnceLock<Option<Arc<CitationVocab>>>,
    /// Adapter pool lookups served by a resident model / that had to build one.
    pub(super) pool_hits: AtomicU64,
    pub(super) pool_misses: AtomicU64,
}

impl MistralPool {
    pub(super) fn new(
        config: GenerateConfig,
        base_dir: PathBuf,
        registry: AdapterRegistry,
        base: Model,
    ) -> MistralPool {
        let pool = MistralPool {
            config,
            base_dir,
            registry,
            base: Arc::new(base),
            adapters: Mutex::new(Vec::new()),
            building: Mutex::new(()),
            citations: std::sync::OnceLock::new(),
            pool_hits: AtomicU64::new(0),
            pool_misses: AtomicU64::new(0),
        };
        // At load, not in the first request (decoding every token takes a moment).
        pool.citation_vocab();
        pool
    }

    /// Names of the adapters resident now, least recently used first.
    pub(super) async fn resident_adapters(&self) -> Vec<String> {
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
        let info = self.registry.get(name)?;
        if info.kind != crate::adapters::AdapterKind::Lora {
            return Err(GenerateError::UnsupportedKind {
                name: name.to_string(),
                kind: info.kind.label(),
                engine: "mistralrs",
            });
        }
        let started = Instant::now();
        let model = Arc::new(
            load::model(
                &self.config,
                &self.base_dir,
                Some(hubview::link(&self.registry, name)?),
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
    pub(super) async fn preload(&self, adapters: &[String]) -> Result<(), GenerateError> {
        for name in adapters.iter().take(self.config.max_resident_adapters) {
            match self.model_for(Some(name)).await {
                Ok(_) => {}
                // Its requests are refused with the reason; the rest of the server serves.
                Err(e @ GenerateError::UnsupportedKind { .. }) => {
                    tracing::warn!(adapter = %name, error = %e, "adapter not preloaded");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Evict an adapter's model (after it is removed from the registry).
    pub(super) async fn evict(&self, name: &str) {
        self.adapters.lock().await.retain(|(n, _)| n != name);
    }

    /// The token ids serving feeds the base model for `messages`: the model's chat template with
    /// the generation prompt, tokenised by its tokenizer.
    pub(super) async fn tokenize_chat(
        &self,
        messages: Vec<ChatMessage>,
    ) -> Result<Vec<u32>, GenerateError> {
        let mut text = mistralrs::TextMessages::new();
        for m in messages {
            text = text.add_message(role(m.role), m.content);
        }
        self.tokenize(either::Either::Left(text), true).await
    }

    /// Token ids of `text` alone (no special tokens added).
    pub(super) async fn tokenize_text(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.tokenize(either::Either::Right(text.to_string()), false)
            .await
    }

    /// Tokenise through the base model's engine, on a task of its own: mistral.rs 0.8.1's engine
    /// thread panics ("Sender disconnected unexpectedly!") when the caller of a tokenisation has
    /// gone by the time it answers, which kills the model for every later request. A caller that
    /// is dropped (a cancelled job, a client that left) leaves the task to take the answer.
    async fn tokenize(
        &self,
        input: either::Either<mistralrs::TextMessages, String>,
        chat: bool,
    ) -> Result<Vec<u32>, GenerateError> {
        let base = Arc::clone(&self.base);
        tokio::spawn(async move { base.tokenize(input, None, chat, chat, None).await })
            .await
            .map_err(|e| GenerateError::Generation(format!("tokenisation task failed: {e}")))?
            .map_err(|e| GenerateError::Generation(e.to_string()))
    }

    /// The token that ends an assistant turn: what the chat template appends after an assistant
    /// message (generation stops there).
    pub(super) async fn end_of_turn_token(&self) -> Result<u32, GenerateError> {
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

    /// The token texts of the base's tokenizer, for the citation rule.
    fn citation_vocab(&self) -> Option<Arc<CitationVocab>> {
        self.citations
            .get_or_init(|| {
                let path = self.base_dir.join("tokenizer.json");
                match tokenizers::Tokenizer::from_file(&path) {
                    Ok(t) => Some(Arc::new(CitationVocab::from_tokenizer(&t))),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e,
                            "cannot read the tokenizer; answers may cite sources not given");
                        None
                    }
                }
            })
            .clone()
    }

    /// Stream a chat completion from the model of `adapter`, holding `permit` until it ends.
    pub(super) async fn stream(
        &self,
        permit: OwnedSemaphorePermit,
        adapter: Option<&str>,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<mpsc::Receiver<GenEvent>, GenerateError> {
        let model = self.model_for(adapter).await?;
        let mut request = RequestBuilder::new().set_sampler_max_len(sampling.max_tokens);
        if sampling.temperature > 0.0 {
            request = request
                .set_sampler_temperature(sampling.temperature)
                .set_sampler_topp(sampling.top_p)
                .set_sampler_topk(0);
        }
        if sampling.no_repeat_ngram > 0 || sampling.cite_sources > 0 {
            // Without the tokenizer's texts (logged at load) the citation rule bans nothing.
            let vocab = self.citation_vocab().unwrap_or_default();
            request = request.add_logits_processor(Arc::new(repetition::DecodingRules::new(
                sampling.no_repeat_ngram,
                sampling.cite_sources,
                vocab,
            )));
        }
        for m in messages {
            request = request.add_message(role(m.role), m.content);
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _permit = permit;
            // Runs when this task ends, however it ends (done, error, caller gone).
            let _release = crate::heap::ReleaseFreedOnDrop;
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
}
