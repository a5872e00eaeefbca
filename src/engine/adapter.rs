//! Adapters resident in the engine beside the one base: each registered adapter's own small
//! matrices, loaded once, never merged into the base, shared by every request that names it.
//!
//! [`AdapterWeights`] is what an adapter does: LoRA (a low-rank update added to a linear layer's
//! output), (IA)³ (per-channel scales of a linear layer's output, or of its input for
//! feed-forward modules), or a [`VirtualKv`] prefix: keys and values of virtual tokens that a sequence
//! attends to before its prompt. Prefix tuning learns those keys and values directly; prompt
//! tuning learns the virtual tokens' input embeddings, whose keys and values are the base's and
//! so are computed once, when the adapter is loaded (virtual tokens at positions 0..n, the
//! prompt after them, as peft places them). The engine asks an adapter for what it does to each
//! linear layer ([`ResidentAdapter::lora`], [`ResidentAdapter::input_scale`],
//! [`ResidentAdapter::output_scale`]) and for its prefix ([`ResidentAdapter::kv_prefix`]) when a
//! sequence starts.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::kernels::Q8Matrix;
use crate::adapters::{AdapterInfo, AdapterKind};
use crate::llama::{LINEAR_MODULES, LlamaConfig, VirtualKv, Weights, module_path};

/// How LoRA matrices are kept resident (`generate.lora_dtype`): f32; f16 at half the memory; or
/// 8 bits in blocks of 32 with a scale each ([`Q8Matrix`], 0.28x the memory, CPU only). The
/// kernels widen them to f32, so compute stays f32. (IA)³ vectors and virtual tokens are small
/// and stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraDtype {
    F32,
    F16,
    Q8,
}

impl LoraDtype {
    /// The `generate.lora_dtype` value naming this; `None` for other values.
    pub fn from_setting(value: &str) -> Option<LoraDtype> {
        match value {
            "f32" => Some(LoraDtype::F32),
            "f16" => Some(LoraDtype::F16),
            "q8" => Some(LoraDtype::Q8),
            _ => None,
        }
    }
}

/// f16's largest finite value: a LoRA matrix with a value beyond it cannot be kept in f16.
const F16_MAX: f32 = 65504.0;

/// A LoRA matrix as kept: a tensor on the base's device (f32 or f16), or 8-bit on the CPU.
#[derive(Debug)]
pub enum LoraMatrix {
    Tensor(Tensor),
    Q8(Q8Matrix),
}

impl LoraMatrix {
    /// Bytes it takes.
    pub fn bytes(&self) -> usize {
        match self {
            LoraMatrix::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LoraMatrix::Q8(q) => q.bytes(),
        }
    }
}

/// One LoRA pair of a linear module, ready to apply: `y += (x·Aᵀ)·(scale·B)ᵀ`. Both row-major
/// and contiguous: the decode kernel takes `A`'s rows as dot-product operands and `(scale·B)ᵀ`'s
/// rows as update rows.
#[derive(Debug)]
pub struct LoraPair {
    /// `(rank, in_features)`: `A`.
    pub a: LoraMatrix,
    /// `(rank, out_features)`: `(scale·B)ᵀ`.
    pub b_t: LoraMatrix,
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
    /// Prompt or prefix tuning.
    Prefix(VirtualKv),
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
            _ => None,
        }
    }

    /// The keys and values a sequence with this adapter starts from, if it has any.
    pub fn kv_prefix(&self) -> Option<&VirtualKv> {
        match &self.weights {
            AdapterWeights::Prefix(prefix) => Some(prefix),
            _ => None,
        }
    }

    /// Virtual tokens a sequence with this adapter holds in its KV cache before its prompt.
    pub fn virtual_tokens(&self) -> usize {
        self.kv_prefix().map_or(0, |p| p.tokens)
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
            _ => None,
        }
    }

    /// Load a registered PEFT adapter (checked at registration: names, shapes, layout) from its
    /// directory, on the base's device, LoRA matrices as `lora_dtype`, the rest as f32 (prompt
    /// tuning's keys and values computed by the base).
    pub fn load(
        info: &AdapterInfo,
        dir: &Path,
        base: &Weights,
        lora_dtype: LoraDtype,
    ) -> candle_core::Result<ResidentAdapter> {
        let (config, device) = (&base.config, &base.device);
        match info.kind {
            AdapterKind::Lora => Self::load_lora(info, dir, config, device, lora_dtype),
            AdapterKind::Ia3 => Self::load_ia3(info, dir, config, device),
            AdapterKind::Prompt | AdapterKind::Prefix => Self::load_prefix(info, dir, base),
        }
    }

    /// A prompt- or prefix-tuning adapter: its table of virtual tokens, as keys and values.
    fn load_prefix(
        info: &AdapterInfo,
        dir: &Path,
        base: &Weights,
    ) -> candle_core::Result<ResidentAdapter> {
        let mut tensors =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &base.device)?;
        let table = tensors
            .remove("prompt_embeddings")
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("adapter {}: no prompt_embeddings", info.name))
            })?
            .to_dtype(DType::F32)?;
        let prefix = if info.kind == AdapterKind::Prompt {
            base.virtual_kv(table)?
        } else {
            VirtualKv::from_table(&base.config, &table)?
        };
        // What stays resident: the keys and values (for prompt tuning, not its embeddings).
        let bytes = 4 * prefix
            .k
            .iter()
            .chain(&prefix.v)
            .map(Tensor::elem_count)
            .sum::<usize>();
        if prefix.tokens != info.virtual_tokens {
            candle_core::bail!(
                "adapter {}: {} virtual tokens in its table, {} in its config",
                info.name,
                prefix.tokens,
                info.virtual_tokens
            );
        }
        Ok(ResidentAdapter {
            name: info.name.clone(),
            weights: AdapterWeights::Prefix(prefix),
            bytes,
        })
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

    /// A LoRA adapter: one pair per targeted module of every layer, kept as `dtype`.
    fn load_lora(
        info: &AdapterInfo,
        dir: &Path,
        config: &LlamaConfig,
        device: &Device,
        dtype: LoraDtype,
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
                a: kept_as(a.contiguous()?, dtype, info, path)?,
                b_t: kept_as((b * scale)?.t()?.contiguous()?, dtype, info, path)?,
                rank: info.rank,
            };
            bytes += pair.a.bytes() + pair.b_t.bytes();
            Ok(pair)
        })?;
        Ok(ResidentAdapter {
            name: info.name.clone(),
            weights: AdapterWeights::Lora(layers),
            bytes,
        })
    }
}

/// An f32 LoRA matrix kept as `dtype`; an error naming the module when a value does not fit f16,
/// or when 8 bits are asked of a matrix on a GPU (the CPU kernels alone read them).
fn kept_as(
    t: Tensor,
    dtype: LoraDtype,
    info: &AdapterInfo,
    path: &str,
) -> candle_core::Result<LoraMatrix> {
    match dtype {
        LoraDtype::F32 => Ok(LoraMatrix::Tensor(t)),
        LoraDtype::F16 => {
            let largest = t.abs()?.max_all()?.to_scalar::<f32>()?;
            // NaN fails this too.
            if largest.is_nan() || largest > F16_MAX {
                candle_core::bail!(
                    "adapter {}: {path} has a value of magnitude {largest}, beyond f16's range: \
                     set generate.lora_dtype = \"f32\"",
                    info.name
                );
            }
            Ok(LoraMatrix::Tensor(t.to_dtype(DType::F16)?))
        }
        LoraDtype::Q8 => {
            if !t.device().is_cpu() {
                candle_core::bail!(
                    "adapter {}: generate.lora_dtype = \"q8\" is for the CPU; on a GPU use \
                     \"f16\" or \"f32\"",
                    info.name
                );
            }
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                candle_core::bail!("adapter {}: {path} has a value {v}", info.name);
            }
            Ok(LoraMatrix::Q8(Q8Matrix::quantize(&values)))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, kv_heads: usize, head_dim: usize) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "rms_norm_eps": 1e-5, "vocab_size": 10
        }))
        .unwrap()
    }

    #[test]
    fn a_prefix_table_splits_as_peft_views_it_and_joins_back() {
        // peft: (tokens, layers * 2 * kv_heads * head_dim) viewed as
        // (tokens, layers * 2, kv_heads, head_dim), then [2l] is layer l's key, [2l + 1] its value.
        let (tokens, layers, kv_heads, head_dim) = (2, 2, 2, 3);
        let width = layers * 2 * kv_heads * head_dim;
        let values: Vec<f32> = (0..tokens * width).map(|i| i as f32).collect();
        let table = Tensor::from_vec(values, (tokens, width), &Device::Cpu).unwrap();
        let cfg = config(layers, kv_heads, head_dim);
        let prefix = VirtualKv::from_table(&cfg, &table).unwrap();
        assert_eq!((prefix.tokens, prefix.k.len(), prefix.v.len()), (2, 2, 2));
        for l in 0..layers {
            for (part, t) in [(2 * l, &prefix.k[l]), (2 * l + 1, &prefix.v[l])] {
                assert_eq!(t.dims(), [kv_heads, tokens, head_dim]);
                let got = t.to_vec3::<f32>().unwrap();
                for (h, rows) in got.iter().enumerate() {
                    for (tok, row) in rows.iter().enumerate() {
                        for (d, x) in row.iter().enumerate() {
                            let at = tok * width + (part * kv_heads + h) * head_dim + d;
                            assert_eq!(*x, at as f32, "layer {l} part {part} head {h}");
                        }
                    }
                }
            }
        }
        let back = prefix.to_table().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            back,
            table.to_vec2::<f32>().unwrap(),
            "to_table undoes from_table"
        );
        let wrong = VirtualKv::from_table(&config(3, kv_heads, head_dim), &table);
        assert!(
            wrong
                .unwrap_err()
                .to_string()
                .contains("does not fit 3 layers")
        );
    }

    #[test]
    fn virtual_tokens_take_kv_room_in_every_request_with_the_adapter() {
        let adapter = ResidentAdapter {
            name: "p".into(),
            weights: AdapterWeights::Prefix(VirtualKv {
                tokens: 8,
                k: Vec::new(),
                v: Vec::new(),
            }),
            bytes: 0,
        };
        let mut request = super::super::GenRequest {
            prompt: vec![1; 10],
            adapter: None,
            sampling: super::super::SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                no_repeat_ngram: 0,
                cite_sources: 0,
            },
            max_tokens: 5,
            seed: 0,
        };
        assert_eq!(request.kv_tokens(), 15);
        request.adapter = Some(std::sync::Arc::new(adapter));
        assert_eq!((request.virtual_tokens(), request.kv_tokens()), (8, 23));
    }
}
