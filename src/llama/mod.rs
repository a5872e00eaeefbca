//! The Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, tied or separate
//! LM head) over the frozen f32 weights of a converted HF directory, written once for training
//! and serving. [`Weights::forward`] runs the layers over a set of rows (token ids, each at its
//! own position) and leaves two things to its caller through [`Hooks`]: what an adapter does to
//! each linear layer's input and output (the trainer's LoRA `Var`s with dropout; the engine's
//! resident adapters, a different one per group of rows), and attention (the trainer's causal attention
//! over one sequence; the engine's attention of each sequence over its KV cache).
//!
//! `ops` holds the fused CPU ops, `simd` the vector dot products under them, `quant` the 8- and
//! 4-bit weights, `qgemm` their prompt-chunk products. Knows nothing of prompts, tokenizers,
//! adapters' files or scheduling.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

pub(crate) mod ops;
pub(crate) mod qgemm;
pub mod quant;
pub(crate) mod simd;

use quant::{QFormat, QMatrix};

/// The linear modules of a layer, in the order of its forward pass (the index a [`Hooks`] call
/// names).
pub const LINEAR_MODULES: &[&str] = &crate::adapters::LORA_MODULES;

/// Index of each module in [`LINEAR_MODULES`].
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

/// The fields of an HF `config.json` the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// `(in_features, out_features)` of linear module `m` (an index into [`LINEAR_MODULES`]).
    pub fn linear_dims(&self, m: usize) -> (usize, usize) {
        let attention = self.num_attention_heads * self.head_dim();
        let key_value = self.kv_heads() * self.head_dim();
        match m {
            Q => (self.hidden_size, attention),
            K | V => (self.hidden_size, key_value),
            O => (attention, self.hidden_size),
            GATE | UP => (self.hidden_size, self.intermediate_size),
            _ => (self.intermediate_size, self.hidden_size),
        }
    }
}

/// `mlp` or `self_attn`: where a linear module sits in the HF weight names.
pub fn module_group(module: &str) -> &'static str {
    if ["gate_proj", "up_proj", "down_proj"].contains(&module) {
        "mlp"
    } else {
        "self_attn"
    }
}

/// The HF path of linear module `m` of layer `layer` (`model.layers.3.self_attn.q_proj`).
pub fn module_path(layer: usize, m: usize) -> String {
    let module = LINEAR_MODULES[m];
    format!("model.layers.{layer}.{}.{module}", module_group(module))
}

/// A linear layer's frozen weight `(out_features, in_features)`.
#[derive(Debug)]
pub enum Linear {
    F32(Tensor),
    /// Blockwise 8- or 4-bit (serving only, [`Weights::quantize`]).
    Quant(QMatrix),
}

impl Linear {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Linear::F32(w) => w.dims2(),
            Linear::Quant(q) => Ok((q.rows, q.cols)),
        }
    }

    /// `x·Wᵀ` (only `x` gets a gradient).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::F32(w) => ops::frozen_linear(x, w),
            Linear::Quant(q) => q.linear(x),
        }
    }

    /// `[x·Wᵢᵀ]` for sibling linears that read the same rows `x` on the CPU (q/k/v, gate/up), as
    /// one parallel pass over all their weight rows instead of one per module (and quantised
    /// weights quantise `x` once); each product is the one [`Linear::forward`] gives. `None` where
    /// that does not apply (another device, mixed formats, more rows than a decode step's with
    /// f32 weights or without [`quant::from_codes`]). No gradient reaches `x`: serving only.
    pub fn forward_stacked(
        linears: &[&Linear],
        x: &Tensor,
    ) -> candle_core::Result<Option<Vec<Tensor>>> {
        let (m, k) = x.dims2()?;
        let quantised = linears.iter().all(|l| matches!(l, Linear::Quant(_)));
        if !x.device().is_cpu() || (m > ops::FEW_ROWS && !(quantised && quant::from_codes(m))) {
            return Ok(None);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut widths = Vec::with_capacity(linears.len());
        let out = if let Some(ws) = linears
            .iter()
            .map(|l| match l {
                Linear::F32(w) => Some(w),
                Linear::Quant(_) => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            let guards = ws
                .iter()
                .map(|w| w.storage_and_layout())
                .collect::<Vec<_>>();
            let mut slices = Vec::with_capacity(ws.len());
            for (storage, layout) in &guards {
                let Some(values) = ops::f32_values(storage, layout) else {
                    return Ok(None);
                };
                if values.len() % k != 0 {
                    candle_core::bail!("stacked linear: a weight is not {k} wide");
                }
                widths.push(values.len() / k);
                slices.push(values);
            }
            ops::few_rows_linear_stacked(&xs, &slices, m, k)
        } else if let Some(qs) = linears
            .iter()
            .map(|l| match l {
                Linear::Quant(q) if q.cols == k => Some(q),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            widths.extend(qs.iter().map(|q| q.rows));
            quant::stacked(&qs, &xs, m)
        } else {
            return Ok(None);
        };
        split_columns(&out, m, &widths, x.device()).map(Some)
    }
}

/// The `(m, wᵢ)` column blocks of a row-major `(m, Σwᵢ)` matrix, as tensors.
fn split_columns(
    out: &[f32],
    m: usize,
    widths: &[usize],
    device: &Device,
) -> candle_core::Result<Vec<Tensor>> {
    let n: usize = widths.iter().sum();
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let mut part = Vec::with_capacity(m * w);
            for row in out.chunks_exact(n) {
                part.extend_from_slice(&row[at..at + w]);
            }
            at += w;
            Tensor::from_vec(part, (m, w), device)
        })
        .collect()
}

/// One decoder layer's frozen weights.
#[derive(Debug)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// In [`LINEAR_MODULES`] order.
    pub linears: Vec<Linear>,
}

/// The frozen base model.
#[derive(Debug)]
pub struct Weights {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub lm_head: Linear,
    pub norm: Tensor,
    pub layers: Vec<LayerWeights>,
    pub device: Device,
}

/// What the caller of [`Weights::forward`] decides.
pub trait Hooks {
    /// What linear module `m` of `layer` reads, given its input rows `x`: `None` (the default)
    /// reads `x` as it is; an adapter may change it first ((IA)³ scales a feed-forward module's
    /// input channels).
    fn input(
        &mut self,
        _layer: usize,
        _m: usize,
        _x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    /// The output of linear module `m` of `layer` for the rows `x`, given the base's `y = x·Wᵀ`:
    /// `y` itself, or `y` plus an adapter's update.
    fn linear(
        &mut self,
        layer: usize,
        m: usize,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor>;

    /// Whether sibling modules that read the same input (q/k/v, gate/up) may be multiplied in
    /// one pass ([`Linear::forward_stacked`]): only where nothing needs a gradient through the
    /// base's products (serving). Each module's hooks still run as for a product of its own.
    fn stacked_products(&self) -> bool {
        false
    }

    /// Attention of the rows: `q` `(heads, rows, head_dim)`, `k` and `v`
    /// `(kv_heads, rows, head_dim)`, rotary embeddings applied. Returns `(rows, heads * head_dim)`.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor>;
}

impl Weights {
    /// Load `config.json` and `model.safetensors` from `dir` onto `device` as f32.
    pub fn load(dir: &Path, device: &Device) -> candle_core::Result<Weights> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
        let config: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("config.json: {e}")))?;
        if let Some(scaling) = config.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            candle_core::bail!("rope_scaling {scaling} is not supported");
        }
        let mut weights = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        let mut take = |name: &str| -> candle_core::Result<Tensor> {
            weights
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("model.safetensors has no {name}")))?
                .to_dtype(DType::F32)
        };
        let embed = take("model.embed_tokens.weight")?;
        let lm_head = Linear::F32(if config.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight")?
        });
        let norm = take("model.norm.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut linears = Vec::with_capacity(LINEAR_MODULES.len());
            for m in 0..LINEAR_MODULES.len() {
                linears.push(Linear::F32(take(&format!("{}.weight", module_path(i, m)))?));
            }
            layers.push(LayerWeights {
                input_norm: take(&format!("model.layers.{i}.input_layernorm.weight"))?,
                post_norm: take(&format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                linears,
            });
        }
        Ok(Weights {
            config,
            embed,
            lm_head,
            norm,
            layers,
            device: device.clone(),
        })
    }

    /// Final hidden states `(rows, hidden)` of `ids`, row `i` at position `positions[i]`.
    pub fn forward(
        &self,
        ids: &[u32],
        positions: &[u32],
        hooks: &mut dyn Hooks,
    ) -> candle_core::Result<Tensor> {
        self.forward_embedded(self.embed(ids)?, positions, hooks)
    }

    /// Like [`Weights::forward`], from input embeddings `(rows, hidden)` instead of token ids
    /// (prompt tuning's virtual tokens have embeddings of their own).
    pub fn forward_embedded(
        &self,
        embedded: Tensor,
        positions: &[u32],
        hooks: &mut dyn Hooks,
    ) -> candle_core::Result<Tensor> {
        let rope = self.rope(positions)?;
        let mut h = embedded;
        for l in 0..self.layers.len() {
            h = self.layer(l, &h, &rope, hooks)?;
        }
        self.final_norm(&h)
    }

    /// The rotary tables `(cos, sin)` of `positions`, for [`Weights::layer`].
    pub fn rope(&self, positions: &[u32]) -> candle_core::Result<(Tensor, Tensor)> {
        let c = &self.config;
        ops::rope_tables(positions, c.head_dim(), c.rope_theta, &self.device)
    }

    /// Decoder layer `l` over the rows `h` `(rows, hidden)` at the positions of `rope`: the
    /// residual stream after it.
    pub fn layer(
        &self,
        l: usize,
        h: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        hooks: &mut dyn Hooks,
    ) -> candle_core::Result<Tensor> {
        let rows = h.dim(0)?;
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let eps = c.rms_norm_eps;
        let layer = &self.layers[l];
        // Module `m` over `x`, or over `changed` where the input hook changed `x`.
        let lin_with = |hooks: &mut dyn Hooks, m: usize, x: &Tensor, changed: Option<Tensor>| {
            let x = changed.as_ref().unwrap_or(x);
            let y = layer.linears[m].forward(x)?;
            hooks.linear(l, m, x, y)
        };
        let lin = |hooks: &mut dyn Hooks, m: usize, x: &Tensor| {
            let changed = hooks.input(l, m, x)?;
            lin_with(hooks, m, x, changed)
        };
        // Modules `ms` reading the same `x`: stacked in one pass when the hooks allow it and
        // none of them changes its input, else one product each.
        let lin_all = |hooks: &mut dyn Hooks, ms: &[usize], x: &Tensor| {
            if !hooks.stacked_products() {
                return ms.iter().map(|&m| lin(hooks, m, x)).collect();
            }
            let inputs = ms
                .iter()
                .map(|&m| hooks.input(l, m, x))
                .collect::<candle_core::Result<Vec<_>>>()?;
            if inputs.iter().all(Option::is_none) {
                let linears: Vec<&Linear> = ms.iter().map(|&m| &layer.linears[m]).collect();
                if let Some(ys) = Linear::forward_stacked(&linears, x)? {
                    return ms
                        .iter()
                        .zip(ys)
                        .map(|(&m, y)| hooks.linear(l, m, x, y))
                        .collect::<candle_core::Result<Vec<_>>>();
                }
            }
            ms.iter()
                .zip(inputs)
                .map(|(&m, changed)| lin_with(hooks, m, x, changed))
                .collect()
        };
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((rows, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let x = ops::rms_norm(h, &layer.input_norm, eps)?;
        let [q, k, v]: [Tensor; 3] = lin_all(hooks, &[Q, K, V], &x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q/k/v: three products expected".into()))?;
        let q = heads(q, nh)?;
        let k = heads(k, nkv)?;
        let v = heads(v, nkv)?;
        let q = ops::apply_rope(&q, cos, sin)?;
        let k = ops::apply_rope(&k, cos, sin)?;
        let y = hooks.attend(l, &q, &k, &v)?;
        let h = (h + lin(hooks, O, &y)?)?;
        let x = ops::rms_norm(&h, &layer.post_norm, eps)?;
        let [gate, up]: [Tensor; 2] = lin_all(hooks, &[GATE, UP], &x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate/up: two products expected".into()))?;
        let m = (gate.silu()? * up)?;
        h + lin(hooks, DOWN, &m)?
    }

    /// The final RMSNorm of the residual stream (what [`Weights::logits_at`] reads).
    pub fn final_norm(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        ops::rms_norm(h, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `(P, vocab)` at rows `rows` of the hidden states `(T, hidden)`.
    pub fn logits_at(&self, hidden: &Tensor, rows: &[u32]) -> candle_core::Result<Tensor> {
        let pos = Tensor::from_slice(rows, rows.len(), &self.device)?;
        let sel = hidden.index_select(&pos, 0)?;
        self.lm_head.forward(&sel)
    }

    /// Every frozen f32 tensor (for checks that training leaves them alone).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.embed, &self.norm];
        let linears = self.layers.iter().flat_map(|l| &l.linears);
        for linear in linears.chain([&self.lm_head]) {
            if let Linear::F32(w) = linear {
                out.push(w);
            }
        }
        for layer in &self.layers {
            out.push(&layer.input_norm);
            out.push(&layer.post_norm);
        }
        out
    }

    /// Replace every linear layer and the LM head by its blockwise quantised form (the embedding
    /// table stays f32 for lookups). Serving only.
    pub fn quantize(&mut self, format: QFormat) -> candle_core::Result<()> {
        let linears = self.layers.iter_mut().flat_map(|l| l.linears.iter_mut());
        for linear in linears.chain([&mut self.lm_head]) {
            if let Linear::F32(w) = linear {
                *linear = Linear::Quant(QMatrix::quantize(w, format)?);
            }
        }
        Ok(())
    }
}

/// Per-layer keys and values of virtual tokens (prompt and prefix tuning): `k[l]`, `v[l]` are
/// `(kv_heads, tokens, head_dim)`, keys as attention reads them.
#[derive(Debug, Clone)]
pub struct VirtualKv {
    pub tokens: usize,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl VirtualKv {
    /// From one table `(tokens, layers * 2 * kv_heads * head_dim)`, row `t` holding per layer
    /// its key, then its value (the layout peft saves prefix tuning in). Differentiable: the
    /// trainer's table is a variable.
    pub fn from_table(config: &LlamaConfig, table: &Tensor) -> candle_core::Result<VirtualKv> {
        let (tokens, width) = table.dims2()?;
        let (kv_heads, head_dim) = (config.kv_heads(), config.head_dim());
        let kv = kv_heads * head_dim;
        if width != config.num_hidden_layers * 2 * kv {
            candle_core::bail!(
                "a prefix table {width} wide does not fit {} layers of {kv_heads} key/value \
                 heads of {head_dim}",
                config.num_hidden_layers
            );
        }
        let part = |i: usize| -> candle_core::Result<Tensor> {
            table
                .narrow(1, i * kv, kv)?
                .reshape((tokens, kv_heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let layers = 0..config.num_hidden_layers;
        Ok(VirtualKv {
            tokens,
            k: layers
                .clone()
                .map(|l| part(2 * l))
                .collect::<Result<_, _>>()?,
            v: layers.map(|l| part(2 * l + 1)).collect::<Result<_, _>>()?,
        })
    }

    /// The one table [`VirtualKv::from_table`] reads.
    pub fn to_table(&self) -> candle_core::Result<Tensor> {
        let row = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.transpose(0, 1)?.contiguous()?.reshape((self.tokens, ()))
        };
        let mut parts = Vec::with_capacity(2 * self.k.len());
        for (k, v) in self.k.iter().zip(&self.v) {
            parts.push(row(k)?);
            parts.push(row(v)?);
        }
        Tensor::cat(&parts, 1)
    }
}

impl Weights {
    /// The keys and values every layer computes for `embedded` `(tokens, hidden)` at positions
    /// `0..tokens`, the base alone (what virtual tokens read before a prompt leave in a cache).
    pub fn virtual_kv(&self, embedded: Tensor) -> candle_core::Result<VirtualKv> {
        let tokens = embedded.dim(0)?;
        let positions: Vec<u32> = (0..tokens as u32).collect();
        let mut keep = KeepKeysAndValues::default();
        self.forward_embedded(embedded, &positions, &mut keep)?;
        Ok(VirtualKv {
            tokens,
            k: keep.k,
            v: keep.v,
        })
    }

    /// Input embeddings `(ids, hidden)` of token ids.
    pub fn embed(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let ids_t = Tensor::from_slice(ids, ids.len(), &self.device)?;
        self.embed.index_select(&ids_t, 0)
    }
}

/// The base alone over one sequence, keeping each layer's keys and values.
#[derive(Default)]
struct KeepKeysAndValues {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Hooks for KeepKeysAndValues {
    fn linear(&mut self, _: usize, _: usize, _: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        Ok(y)
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.k.push(k.contiguous()?);
        self.v.push(v.contiguous()?);
        causal_self_attention(q, k, v)
    }
}

/// Attention of one whole sequence over itself (causal), the training case: `q`
/// `(heads, T, head_dim)`, `k`, `v` `(kv_heads, T, head_dim)`; returns `(T, heads * head_dim)`.
pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (nh, t, hd) = q.dims3()?;
    let nkv = k.dim(0)?;
    let (k, v) = if nkv == nh {
        (k.clone(), v.clone())
    } else {
        let rep = nh / nkv;
        let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.unsqueeze(1)?
                .broadcast_as((nkv, rep, t, hd))?
                .reshape((nh, t, hd))
        };
        (expand(k)?, expand(v)?)
    };
    // The CPU's attention op masks in place; elsewhere plain ops add this mask.
    let mask = if q.device().is_cpu() {
        None
    } else {
        Some(ops::causal_mask(t, q.device())?)
    };
    let att = ops::causal_attention_probs(q, &k, 1.0 / (hd as f64).sqrt(), mask.as_ref())?;
    att.matmul(&v)?.transpose(0, 1)?.reshape((t, nh * hd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, shape: (usize, usize)) -> candle_core::Result<Tensor> {
        let data = (0..shape.0 * shape.1)
            .map(|_| rng.uniform() - 0.5)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// Stacked products are exactly the products one module at a time (same kernel, same input),
    /// for f32, q8_0 and q4_0 weights of three heights, one decode row and five.
    #[test]
    fn stacked_products_equal_one_module_at_a_time() -> candle_core::Result<()> {
        let mut rng = Rng::new(8);
        let k = 96;
        let ws = [
            random(&mut rng, (70, k))?,
            random(&mut rng, (32, k))?,
            random(&mut rng, (130, k))?,
        ];
        for format in [None, Some(quant::QFormat::Q8_0), Some(quant::QFormat::Q4_0)] {
            let linears = ws
                .iter()
                .map(|w| {
                    Ok(match format {
                        None => Linear::F32(w.clone()),
                        Some(f) => Linear::Quant(QMatrix::quantize(w, f)?),
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let refs: Vec<&Linear> = linears.iter().collect();
            for m in [1, 5] {
                let x = random(&mut rng, (m, k))?;
                let stacked = Linear::forward_stacked(&refs, &x)?.expect("a few CPU rows stack");
                for (l, y) in linears.iter().zip(&stacked) {
                    let want = l.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want, "{format:?} m={m}");
                }
            }
        }
        // More rows than the decode kernels take: not stacked.
        let x = random(&mut rng, (ops::FEW_ROWS + 1, k))?;
        let f32s: Vec<Linear> = ws.iter().map(|w| Linear::F32(w.clone())).collect();
        let refs: Vec<&Linear> = f32s.iter().collect();
        assert!(Linear::forward_stacked(&refs, &x)?.is_none());
        Ok(())
    }
}
