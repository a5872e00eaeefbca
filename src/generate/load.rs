//! Loading mistral.rs models: the base model (HF directory or GGUF) and merged adapter models,
//! each built on a fresh OS thread with its own runtime, because mistral.rs keeps the list of
//! applied LoRAs in a thread-local that is never cleared (a base model loaded on a thread that
//! loaded an adapter before would silently carry it). Knows the mistral.rs builder options; the
//! serving side (`generate`) only receives built models.

use mistralrs::{IsqType, Model, ModelDType, TextModelBuilder};

use super::GenerateError;
use crate::config::{GenerateConfig, Settings};

fn dtype(name: &str) -> ModelDType {
    match name {
        "bf16" => ModelDType::BF16,
        "f16" => ModelDType::F16,
        "auto" => ModelDType::Auto,
        _ => ModelDType::F32,
    }
}

/// The mistral.rs type of a validated `generate.isq` value (`None` for `none`).
fn isq(name: &str) -> Option<IsqType> {
    Some(match name {
        "q4_0" => IsqType::Q4_0,
        "q4_1" => IsqType::Q4_1,
        "q5_0" => IsqType::Q5_0,
        "q5_1" => IsqType::Q5_1,
        "q8_0" => IsqType::Q8_0,
        "q2k" => IsqType::Q2K,
        "q3k" => IsqType::Q3K,
        "q4k" => IsqType::Q4K,
        "q5k" => IsqType::Q5K,
        "q6k" => IsqType::Q6K,
        "q8k" => IsqType::Q8K,
        _ => return None,
    })
}

/// mistral.rs's prefix cache setting: `None` turns it off. It defaults to 16 sequences, a bound
/// it enforces only for GPU memory: on CPU it kept every finished sequence's KV cache (issue 13),
/// so `generate.prefix_cache_sequences` is 0 unless a GPU build sets it.
fn prefix_cache(config: &GenerateConfig) -> Option<usize> {
    (config.prefix_cache_sequences > 0).then_some(config.prefix_cache_sequences)
}

/// Build a model on a fresh OS thread with its own runtime (see the module doc for why).
async fn build_on_fresh_thread(
    what: String,
    builder: impl FnOnce() -> Result<Model, String> + Send + 'static,
) -> Result<Model, GenerateError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = what.clone();
    std::thread::Builder::new()
        .name(format!("load-{name}"))
        .spawn(move || {
            let _ = tx.send(builder());
        })
        .map_err(|e| GenerateError::Load {
            what: what.clone(),
            message: e.to_string(),
        })?;
    rx.await
        .map_err(|_| GenerateError::Load {
            what: what.clone(),
            message: "the loader thread panicked".into(),
        })?
        .map_err(|message| GenerateError::Load { what, message })
}

/// The base model from a GGUF file (with its tokenizer and chat template).
pub(super) async fn gguf_model(
    settings: &Settings,
    gguf: &std::path::Path,
) -> Result<Model, GenerateError> {
    let (Some(dir), Some(file)) = (gguf.parent(), gguf.file_name()) else {
        return Err(GenerateError::MissingBase {
            path: gguf.to_path_buf(),
        });
    };
    if !gguf.is_file() {
        return Err(GenerateError::MissingBase {
            path: gguf.to_path_buf(),
        });
    }
    let dir = dir.display().to_string();
    let file = file.to_string_lossy().into_owned();
    let max_seqs = settings.generate.max_concurrent;
    let prefix_cache = prefix_cache(&settings.generate);
    build_on_fresh_thread(gguf.display().to_string(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let builder = mistralrs::GgufModelBuilder::new(dir, vec![file])
                .with_max_num_seqs(max_seqs)
                .with_prefix_cache_n(prefix_cache);
            #[cfg(not(feature = "cuda"))]
            let builder = builder.with_force_cpu();
            builder.build().await.map_err(|e| format!("{e:#}"))
        })
    })
    .await
}

/// The base model from `base_dir`, with the adapter `adapter_id` merged in when given.
pub(super) async fn model(
    config: &GenerateConfig,
    base_dir: &std::path::Path,
    adapter_id: Option<String>,
) -> Result<Model, GenerateError> {
    let dir = base_dir.display().to_string();
    let dtype = dtype(&config.dtype);
    let isq = isq(&config.isq);
    let max_seqs = config.max_concurrent;
    let prefix_cache = prefix_cache(config);
    let what = adapter_id.clone().unwrap_or_else(|| dir.clone());
    build_on_fresh_thread(what, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let builder = TextModelBuilder::new(&dir)
                .with_dtype(dtype)
                .with_max_num_seqs(max_seqs)
                .with_prefix_cache_n(prefix_cache);
            // Quantised after the adapter is merged into the weights (mistral.rs merges in
            // the layer constructors, then quantises the loaded layers).
            let builder = match isq {
                Some(t) => builder.with_isq(t),
                None => builder,
            };
            // The CPU build never probes for accelerators; `--features cuda` uses the GPU.
            #[cfg(not(feature = "cuda"))]
            let builder = builder.with_force_cpu();
            match adapter_id {
                None => builder.build().await,
                Some(id) => {
                    mistralrs::LoraModelBuilder::from_text_model_builder(builder, [id])
                        .build()
                        .await
                }
            }
            .map_err(|e| format!("{e:#}"))
        })
    })
    .await
}
