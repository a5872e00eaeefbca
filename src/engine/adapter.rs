//! Adapters resident in the engine beside the one base: each registered adapter's own small
//! matrices, loaded once, never merged into the base, shared by every request that names it.
//!
//! [`AdapterWeights`] is the kind of adapter: LoRA (a low-rank update added to a linear layer's
//! output) or (IA)³ (per-channel scales of a linear layer's output, or of its input for
//! feed-forward modules). Kinds that add virtual tokens (prompt tuning) or per-layer key/value
//! prefixes (prefix tuning) fit beside them: the engine asks an adapter for what it does to each
//! linear layer ([`ResidentAdapter::lora`], [`ResidentAdapter::input_scale`],
//! [`ResidentAdapter::output_scale`]) and would ask the same way for prefix rows before a
//! sequence's first step.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapters::{AdapterInfo, AdapterKind};
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

/// One (IA)³ vector of a linear module: `y = (x ⊙ l)·Wᵀ` for a feed-forward module (`input`),
/// else `y = (x·Wᵀ) ⊙ l`.
#[derive(Debug)]
pub struct Ia3Scale {
    /// `(features,)`: the module's input or output channels.
    pub l: Tensor,
    pub input: bool,
}

/// What an adapter changes.
#[derive(Debug)]
pub enum AdapterWeights {
    /// Per layer, per linear module ([`LINEAR_MODULES`] order): the pair, or none for a module
    /// the adapter leaves alone.
    Lora(Vec<Vec<Option<LoraPair>>>),
    /// Per layer, per linear module: the scale, or none.
    Ia3(Vec<Vec<Option<Ia3Scale>>>),
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
            AdapterWeights::Ia3(_) => None,
        }
    }

    /// The (IA)³ scale of module `m`'s input channels, if the adapter has one.
    pub fn input_scale(&self, layer: usize, m: usize) -> Option<&Tensor> {
        self.ia3(layer, m).filter(|s| s.input).map(|s| &s.l)
    }

    /// The (IA)³ scale of module `m`'s output channels, if the adapter has one.
    pub fn output_scale(&self, layer: usize, m: usize) -> Option<&Tensor> {
        self.ia3(layer, m).filter(|s| !s.input).map(|s| &s.l)
    }

    fn ia3(&self, layer: usize, m: usize) -> Option<&Ia3Scale> {
        match &self.weights {
            AdapterWeights::Ia3(layers) => layers.get(layer)?.get(m)?.as_ref(),
            AdapterWeights::Lora(_) => None,
        }
    }

    /// Load a registered PEFT adapter (checked at registration: names, shapes, layout) from its
    /// directory, as f32 on `device`.
    pub fn load(
        info: &AdapterInfo,
        dir: &Path,
        config: &LlamaConfig,
        device: &Device,
    ) -> candle_core::Result<ResidentAdapter> {
        match info.kind {
            AdapterKind::Lora => Self::load_lora(info, dir, config, device),
            AdapterKind::Ia3 => Self::load_ia3(info, dir, config, device),
        }
    }

    /// An (IA)³ adapter: one vector per targeted module of every layer.
    fn load_ia3(
        info: &AdapterInfo,
        dir: &Path,
        config: &LlamaConfig,
        device: &Device,
    ) -> candle_core::Result<ResidentAdapter> {
        let mut bytes = 0;
        let layers = per_target(info, dir, config, device, |take, path, m| {
            let module = LINEAR_MODULES[m];
            let input = info.feedforward_modules.iter().any(|f| f == module);
            let l = take(format!("{path}.ia3_l"))?.flatten_all()?;
            let (in_f, out_f) = config.linear_dims(m);
            let want = if input { in_f } else { out_f };
            if l.elem_count() != want {
                candle_core::bail!(
                    "adapter {}: {path}.ia3_l has {} values, expected {want}",
                    info.name,
                    l.elem_count()
                );
            }
            bytes += 4 * want;
            Ok(Ia3Scale { l, input })
        })?;
        Ok(ResidentAdapter {
            name: info.name.clone(),
            weights: AdapterWeights::Ia3(layers),
            bytes,
        })
    }

    /// A LoRA adapter: one pair per targeted module of every layer.
    fn load_lora(
        info: &AdapterInfo,
        dir: &Path,
        config: &LlamaConfig,
        device: &Device,
    ) -> candle_core::Result<ResidentAdapter> {
        let scale = info.alpha / info.rank as f64;
        let mut bytes = 0;
        let layers = per_target(info, dir, config, device, |take, path, m| {
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
            Ok(pair)
        })?;
        Ok(ResidentAdapter {
            name: info.name.clone(),
            weights: AdapterWeights::Lora(layers),
            bytes,
        })
    }
}

/// What a tensor lookup of [`per_target`] is: by PEFT name, removed from the file's tensors, f32.
type Take<'a> = dyn FnMut(String) -> candle_core::Result<Tensor> + 'a;

/// Read the adapter's `adapter_model.safetensors` and build, for every layer and linear module
/// ([`LINEAR_MODULES`] order), `make(take, path, m)` for the modules it targets (`path` being
/// PEFT's `base_model.model.model.layers.{i}.{block}.{module}`) and `None` for the others.
fn per_target<T>(
    info: &AdapterInfo,
    dir: &Path,
    config: &LlamaConfig,
    device: &Device,
    mut make: impl FnMut(&mut Take<'_>, &str, usize) -> candle_core::Result<T>,
) -> candle_core::Result<Vec<Vec<Option<T>>>> {
    let mut tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), device)?;
    let mut take = |name: String| -> candle_core::Result<Tensor> {
        tensors
            .remove(&name)
            .ok_or_else(|| candle_core::Error::Msg(format!("adapter {}: no {name}", info.name)))?
            .to_dtype(DType::F32)
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        let mut row = Vec::with_capacity(LINEAR_MODULES.len());
        for (m, module) in LINEAR_MODULES.iter().enumerate() {
            if !info.target_modules.iter().any(|t| t == module) {
                row.push(None);
                continue;
            }
            let path = format!("base_model.model.{}", module_path(layer, m));
            row.push(Some(make(&mut take, &path, m)?));
        }
        layers.push(row);
    }
    Ok(layers)
}
