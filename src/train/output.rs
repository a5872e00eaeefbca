//! A trained adapter leaving the trainer: its PEFT files (`adapter_config.json` as peft writes it
//! for the method, `adapter_model.safetensors` under peft's names and shapes, the training record)
//! and its registration.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::model::{LlamaLora, VirtualSpec};
use super::{TrainError, TrainRecord, Trained, io};
use crate::adapters::{AdapterInfo, AdapterKind, AdapterRegistry, BaseModelInfo};

/// Write `model`'s adapter (LoRA, (IA)³, prompt or prefix tuning) as a PEFT adapter directory,
/// with `record` as `training.json`.
pub fn write_peft(
    dir: &Path,
    model: &LlamaLora,
    base: &BaseModelInfo,
    record: Option<&TrainRecord>,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config = peft_config(model, base)?;
    let path = dir.join("adapter_config.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&config).expect("json serialises"),
    )
    .map_err(|e| io(&path, e))?;
    let tensors: std::collections::HashMap<String, Tensor> = model
        .peft_tensors()?
        .into_iter()
        .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    if let Some(record) = record {
        let path = dir.join("training.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(record).expect("json serialises"),
        )
        .map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// The `adapter_config.json` of `model`'s adapter, as peft writes it for that method.
fn peft_config(model: &LlamaLora, base: &BaseModelInfo) -> Result<serde_json::Value, TrainError> {
    if let Some(spec) = model.spec() {
        return Ok(serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.id,
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "target_modules": spec.targets,
        }));
    }
    if let Some(spec) = model.ia3_spec() {
        return Ok(serde_json::json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.id,
            "target_modules": spec.targets,
            "feedforward_modules": spec.feedforward,
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "inference_mode": true,
        }));
    }
    if let Some(virt) = model.virtual_tokens() {
        return Ok(virtual_tokens_config(&virt.spec, &model.config, base));
    }
    Err(TrainError::Option {
        option: "--targets",
        problem: "the model has no adapter to write".into(),
    })
}

/// peft's config of prompt tuning (text initialisation) or prefix tuning (trained through the
/// reparameterisation MLP or not; sized by the key/value heads, as peft does for grouped-query
/// attention).
fn virtual_tokens_config(
    spec: &VirtualSpec,
    config: &crate::llama::LlamaConfig,
    base: &BaseModelInfo,
) -> serde_json::Value {
    let mut out = serde_json::json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.id,
        "num_virtual_tokens": spec.tokens,
        "num_transformer_submodules": 1,
        "num_layers": config.num_hidden_layers,
        "inference_mode": true,
    });
    let fields = out.as_object_mut().expect("an object");
    let extra = if spec.kind == AdapterKind::Prefix {
        let kv = config.kv_heads() * config.head_dim();
        serde_json::json!({
            "peft_type": "PREFIX_TUNING",
            "token_dim": kv,
            "num_attention_heads": config.kv_heads(),
            "encoder_hidden_size": if spec.projection > 0 { spec.projection } else { kv },
            "prefix_projection": spec.projection > 0,
        })
    } else {
        serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "token_dim": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": spec.init_text,
            "tokenizer_name_or_path": base.id,
        })
    };
    fields.extend(extra.as_object().expect("an object").clone());
    out
}

/// Register a trained adapter under `name` (replacing an existing one when `replace`).
pub fn register(
    registry: &AdapterRegistry,
    name: &str,
    trained: &Trained,
    base: &BaseModelInfo,
    replace: bool,
) -> Result<AdapterInfo, TrainError> {
    let info = if replace {
        registry.replace(name, &trained.dir, base)?
    } else {
        registry.add(name, &trained.dir, base)?
    };
    registry.set_training_record(name, &trained.dir.join("training.json"))?;
    Ok(info)
}
