//! Adapters resident in the engine beside the one base: each registered adapter's own small
//! matrices, loaded once, never merged into the base, shared by every request that names it.
//!
//! [`AdapterWeights`] is the kind of adapter; LoRA is the one kind today. Kinds that add virtual
//! tokens (prompt tuning) or per-layer key/value prefixes (prefix tuning) fit beside it: the
//! engine asks an adapter for its linear update ([`ResidentAdapter::lora`]) and would ask the same
//! way for prefix rows before a sequence's first step.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapters::AdapterInfo;
use crate::llama::{LINEAR_MODULES, LlamaConfig, module_path};

/// One LoRA pair of a linear module, ready to apply: `y += (x·Aᵀ)·(scale·B)ᵀ`. Both row-major
/// and contiguous: the decode kernel takes `A`'s rows as dot-product operands and `(scale·B)ᵀ`'s
/// rows as update rows.
#[derive(Debug)]
pub struct LoraPair {
    /// `(rank, in_features)`: `A`.
    pub a: Tensor,
    /// `(rank, out_features)`: `(scale·B)ᵀ`.
    pub b_t: Tensor,
    pub rank: usize,
}

/// What an adapter changes.
#[derive(Debug)]
pub enum AdapterWeights {
    /// Per layer, per linear module ([`LINEAR_MODULES`] order): the pair, or none for a module
    /// the adapter leaves alone.
    Lora(Vec<Vec<Option<LoraPair>>>),
}

/// A loaded adapter.
#[derive(Debug)]
pub struct ResidentAdapter {
    pub name: String,
    pub weights: AdapterWeights,
    /// Bytes its tensors take.
    pub bytes: usize,
}

impl ResidentAdapter {
    /// The LoRA pair of module `m` of `layer`, if the adapter has one.
    pub fn lora(&self, layer: usize, m: usize) -> Option<&LoraPair> {
        match &self.weights {
            AdapterWeights::Lora(layers) => layers.get(layer)?.get(m)?.as_ref(),
        }
    }

    /// Load a registered PEFT LoRA adapter (checked at registration: names, shapes, layout) from
    /// its directory, as f32 on `device`.
    pub fn load_lora(
        info: &AdapterInfo,
        dir: &Path,
        config: &LlamaConfig,
        device: &Device,
    ) -> candle_core::Result<ResidentAdapter> {
        let mut tensors =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), device)?;
        let scale = info.alpha / info.rank as f64;
        let mut take = |name: String| -> candle_core::Result<Tensor> {
            tensors
                .remove(&name)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("adapter {}: no {name}", info.name))
                })?
                .to_dtype(DType::F32)
        };
        let mut bytes = 0;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let mut row = Vec::with_capacity(LINEAR_MODULES.len());
            for (m, module) in LINEAR_MODULES.iter().enumerate() {
                if !info.target_modules.iter().any(|t| t == module) {
                    row.push(None);
                    continue;
                }
                let path = format!("base_model.model.{}", module_path(layer, m));
                let a = take(format!("{path}.lora_A.weight"))?;
                let b = take(format!("{path}.lora_B.weight"))?;
                let (in_f, out_f) = config.linear_dims(m);
                if a.dims2()? != (info.rank, in_f) || b.dims2()? != (out_f, info.rank) {
                    candle_core::bail!(
                        "adapter {}: {path} has shapes {:?} and {:?}, expected ({}, {in_f}) and \
                         ({out_f}, {})",
                        info.name,
                        a.dims(),
                        b.dims(),
                        info.rank,
                        info.rank
                    );
                }
                let pair = LoraPair {
                    a: a.contiguous()?,
                    b_t: (b * scale)?.t()?.contiguous()?,
                    rank: info.rank,
                };
                bytes += 4 * (pair.a.elem_count() + pair.b_t.elem_count());
                row.push(Some(pair));
            }
            layers.push(row);
        }
        Ok(ResidentAdapter {
            name: info.name.clone(),
            weights: AdapterWeights::Lora(layers),
            bytes,
        })
    }
}
