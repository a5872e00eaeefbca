//! The native path (`generate.engine = "native"`): domainrag's own [`crate::engine`], one base and
//! every adapter resident beside it. Adapters are loaded from the registry at start (every
//! registered one that fits the base), on registration, or at their first request, and forgotten
//! when evicted (removed or replaced), so the next request reads the new files.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedSemaphorePermit, mpsc};

use super::{ChatMessage, GenEvent, GenerateError, Sampling};
use crate::adapters::{AdapterRegistry, BaseModelInfo};
use crate::config::GenerateConfig;
use crate::engine::{
    Engine, EngineLimits, GenRequest, LoraDtype, Quant, ResidentAdapter, SamplingParams,
};

pub(super) struct NativeBackend {
    engine: Arc<Engine>,
    registry: AdapterRegistry,
    base: BaseModelInfo,
    /// Serialises adapter loads so two requests for the same adapter load it once.
    loading: Mutex<()>,
    /// Seed of the next sampled request (0 in the config: from the clock).
    seeds: std::sync::atomic::AtomicU64,
}

fn engine_error(e: crate::engine::EngineError) -> GenerateError {
    match e {
        crate::engine::EngineError::Load { what, message } => GenerateError::Load { what, message },
        e @ crate::engine::EngineError::TooLong { .. } => GenerateError::TooLong(e.to_string()),
        e => GenerateError::Generation(e.to_string()),
    }
}

/// The first CUDA GPU in a `--features cuda` build (the engine's ops fall back from their CPU
/// kernels to candle's tensor ops there), else the CPU.
fn device() -> Result<candle_core::Device, GenerateError> {
    #[cfg(feature = "cuda")]
    {
        candle_core::Device::cuda_if_available(0).map_err(|e| GenerateError::Load {
            what: "the CUDA device".into(),
            message: e.to_string(),
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}

impl NativeBackend {
    /// Load the base model and start the engine (on a blocking thread).
    pub(super) async fn load(
        config: &GenerateConfig,
        base_dir: &Path,
        registry: AdapterRegistry,
    ) -> Result<NativeBackend, GenerateError> {
        let base = BaseModelInfo::from_dir(base_dir)?;
        let limits = EngineLimits {
            kv_budget_tokens: config.kv_budget_tokens,
            step_tokens: config.step_tokens,
        };
        let dir = base_dir.to_path_buf();
        let device = device()?;
        // `Settings::validate` lets only these through for the native engine.
        let quant = Quant::from_isq(&config.isq).unwrap_or(Quant::F32);
        let lora = LoraDtype::from_setting(&config.lora_dtype).unwrap_or(LoraDtype::F32);
        let engine =
            tokio::task::spawn_blocking(move || Engine::start(&dir, &device, quant, lora, limits))
                .await
                .map_err(|e| GenerateError::Generation(e.to_string()))?
                .map_err(engine_error)?;
        let seed = if config.seed == 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        } else {
            config.seed
        };
        Ok(NativeBackend {
            engine: Arc::new(engine),
            registry,
            base,
            loading: Mutex::new(()),
            seeds: std::sync::atomic::AtomicU64::new(seed),
        })
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The resident adapter `name`, loaded now if it is not.
    async fn adapter(&self, name: &str) -> Result<Arc<ResidentAdapter>, GenerateError> {
        if let Some(a) = self.engine.adapter(name) {
            return Ok(a);
        }
        let _loading = self.loading.lock().await;
        if let Some(a) = self.engine.adapter(name) {
            return Ok(a);
        }
        let info = self.registry.get(name)?;
        if !info.fits(&self.base) {
            return Err(GenerateError::Load {
                what: format!("adapter {name}"),
                message: format!(
                    "it was made for base model {}, not {}",
                    info.base_model, self.base.id
                ),
            });
        }
        let dir = self.registry.dir(name);
        let engine = Arc::clone(&self.engine);
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || engine.load_adapter(&info, &dir))
            .await
            .map_err(|e| GenerateError::Generation(e.to_string()))?
            .map_err(engine_error)?;
        tracing::info!(
            adapter = name,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "adapter loaded"
        );
        self.engine
            .adapter(name)
            .ok_or_else(|| GenerateError::Generation(format!("adapter {name} vanished")))
    }

    /// Load these adapters (an unknown or broken one is an error).
    pub(super) async fn preload(&self, adapters: &[String]) -> Result<(), GenerateError> {
        for name in adapters {
            self.adapter(name).await?;
        }
        Ok(())
    }

    /// Load every registered adapter made for this base; one that fails is logged and skipped.
    pub(super) async fn preload_registered(&self) -> Result<(), GenerateError> {
        for info in self.registry.list()? {
            if !info.fits(&self.base) {
                continue;
            }
            if let Err(e) = self.adapter(&info.name).await {
                tracing::warn!(adapter = info.name, error = %e, "adapter not loaded");
            }
        }
        Ok(())
    }

    pub(super) fn evict(&self, name: &str) {
        self.engine.remove_adapter(name);
    }

    /// Stream a chat completion, holding `permit` until it ends. Dropping the receiver cancels
    /// the request in the engine.
    pub(super) async fn stream(
        &self,
        permit: OwnedSemaphorePermit,
        adapter: Option<&str>,
        messages: Vec<ChatMessage>,
        sampling: Sampling,
    ) -> Result<mpsc::Receiver<GenEvent>, GenerateError> {
        let adapter = match adapter {
            Some(name) => Some(self.adapter(name).await?),
            None => None,
        };
        let prompt = self
            .engine
            .chat()
            .encode_chat(&messages)
            .map_err(|e| GenerateError::Generation(e.to_string()))?;
        let seed = self
            .seeds
            .fetch_add(0x9E37_79B9, std::sync::atomic::Ordering::Relaxed);
        let mut events = self
            .engine
            .submit(GenRequest {
                prompt,
                adapter,
                sampling: SamplingParams {
                    temperature: sampling.temperature,
                    top_p: sampling.top_p,
                    no_repeat_ngram: sampling.no_repeat_ngram,
                    cite_sources: sampling.cite_sources,
                },
                max_tokens: sampling.max_tokens,
                seed,
            })
            .map_err(engine_error)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _permit = permit;
            while let Some(event) = events.recv().await {
                let last = !matches!(event, GenEvent::Token(_));
                if tx.send(event).await.is_err() || last {
                    return; // dropping `events` cancels the request in the engine
                }
            }
        });
        Ok(rx)
    }
}
