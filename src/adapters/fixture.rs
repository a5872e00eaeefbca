//! Adapters written for tests and benchmarks (not used by the service): PEFT LoRA, (IA)³,
//! prompt- and prefix-tuning files with deterministic values, for any base model's shapes.

use std::path::Path;

use super::peft::{TensorPart, tensor_name};
use super::{AdapterKind, BaseModelInfo, CONFIG_FILE, WEIGHTS_FILE, prompt};

/// Test and fixture helper, not used by the service: writes a PEFT LoRA adapter for `base` into
/// `dir` (created if needed), as `adapter_config.json` and `adapter_model.safetensors` with F32
/// `lora_A` (`[rank, in]`) and `lora_B` (`[out, rank]`) weights for each of `targets` in each of
/// `layers`. Element `i` of every tensor is `value(i)`, so the adapter is deterministic.
///
/// [`AdapterRegistry::add`] only accepts adapters that cover every layer of the base model (as
/// mistral.rs needs), so pass `0..num_hidden_layers` unless a test wants a refusal. Targets must be
/// llama linear modules.
pub fn write_test_adapter(
    dir: &Path,
    base: &BaseModelInfo,
    rank: usize,
    alpha: f64,
    targets: &[&str],
    layers: &[usize],
    value: impl Fn(usize) -> f32,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_peft_config(dir, base, rank, alpha, targets)?;
    let tensors = lora_tensors(base, rank, targets, layers)?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &value)
}

/// Like [`write_test_adapter`], a PEFT (IA)³ adapter: an `ia3_l` vector for each of `targets` in
/// each of `layers`, `[1, in]` for those in `feedforward` (input scaled), `[out, 1]` for the others.
pub fn write_test_ia3_adapter(
    dir: &Path,
    base: &BaseModelInfo,
    targets: &[&str],
    feedforward: &[&str],
    layers: &[usize],
    value: impl Fn(usize) -> f32,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.id,
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": false,
        "init_ia3_weights": true,
        "inference_mode": true,
    });
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&config).map_err(std::io::Error::other)?,
    )?;
    let mut tensors = Vec::new();
    for &layer in layers {
        for &module in targets {
            let (in_features, out_features) = base.module_dims(module).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{module:?} is not a llama linear module"),
                )
            })?;
            let shape = if feedforward.contains(&module) {
                vec![1, in_features]
            } else {
                vec![out_features, 1]
            };
            tensors.push((tensor_name(layer, module, TensorPart::Ia3), shape));
        }
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &value)
}

/// Like [`write_test_adapter`], a PEFT prompt- or prefix-tuning adapter (`kind`) of `tokens`
/// virtual tokens: its `prompt_embeddings` table, element `i` being `value(i)`.
pub fn write_test_prompt_adapter(
    dir: &Path,
    base: &BaseModelInfo,
    kind: AdapterKind,
    tokens: usize,
    value: impl Fn(usize) -> f32,
) -> std::io::Result<()> {
    let peft_type = match kind {
        AdapterKind::Prompt => "PROMPT_TUNING",
        AdapterKind::Prefix => "PREFIX_TUNING",
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} does not learn virtual tokens", other.label()),
            ));
        }
    };
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.id,
        "num_virtual_tokens": tokens,
        "num_transformer_submodules": 1,
        "num_layers": base.num_hidden_layers,
        "inference_mode": true,
    });
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&config).map_err(std::io::Error::other)?,
    )?;
    let shape = vec![tokens, prompt::row_width(kind, base)];
    write_safetensors(
        &dir.join(WEIGHTS_FILE),
        &[(prompt::TABLE.to_string(), shape)],
        &value,
    )
}

/// Names and shapes of the LoRA weights for `targets` in `layers`.
pub(super) fn lora_tensors(
    base: &BaseModelInfo,
    rank: usize,
    targets: &[&str],
    layers: &[usize],
) -> std::io::Result<Vec<(String, Vec<usize>)>> {
    let mut tensors = Vec::new();
    for &layer in layers {
        for &module in targets {
            let Some((in_features, out_features)) = base.module_dims(module) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{module:?} is not a llama linear module"),
                ));
            };
            tensors.push((
                tensor_name(layer, module, TensorPart::A),
                vec![rank, in_features],
            ));
            tensors.push((
                tensor_name(layer, module, TensorPart::B),
                vec![out_features, rank],
            ));
        }
    }
    Ok(tensors)
}

/// An `adapter_config.json` as PEFT writes it for a causal LM.
pub(super) fn write_peft_config(
    dir: &Path,
    base: &BaseModelInfo,
    rank: usize,
    alpha: f64,
    targets: &[&str],
) -> std::io::Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.id,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "target_modules": targets,
    });
    let bytes = serde_json::to_vec_pretty(&config).expect("JSON values serialise");
    std::fs::write(dir.join(CONFIG_FILE), bytes)
}

/// A safetensors file of F32 tensors, element `i` of each being `value(i)`.
pub(super) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    value: &dyn Fn(usize) -> f32,
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt" }),
    );
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let begin = data.len();
        let elements: usize = shape.iter().product();
        for i in 0..elements {
            data.extend_from_slice(&value(i).to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()] }),
        );
    }
    write_safetensors_raw(path, &serde_json::Value::Object(header), &data)
}

/// Header length, JSON header (space-padded to 8 bytes, as the safetensors writer does, so the
/// data stays aligned), data.
pub(super) fn write_safetensors_raw(
    path: &Path,
    header: &serde_json::Value,
    data: &[u8],
) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(header).expect("JSON values serialise");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes)
}

/// A tiny base model's shapes for unit tests; head_dim differs from hidden / heads on purpose,
/// so the shapes exercise it.
#[cfg(test)]
pub(super) fn tiny_base() -> BaseModelInfo {
    BaseModelInfo {
        id: "tiny-llama".to_string(),
        sha256: "ab".repeat(32),
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
    }
}
