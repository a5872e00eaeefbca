//! The trainer's model: a Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU
//! MLP, tied or separate LM head) in candle over the frozen f32 weights of the converted HF
//! directory, with LoRA A/B pairs on chosen linear modules.
//!
//! Only the LoRA matrices are `Var`s. The frozen linear layers, RMSNorm, RoPE, dropout and the
//! causal attention probabilities run as candle custom ops on CPU whose backward computes the
//! input gradient only and keeps as little as possible for it: candle's generic matmul backward
//! also computes the gradient of the (frozen) weight, which would double the cost of every
//! backward pass, and attention as separate ops keeps four `T x T` tensors per head and layer.
//! On other devices the same maths runs as plain tensor ops.
//!
//! Knows nothing of prompts, tokenizers or files beyond the model directory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{CpuStorage, D, DType, Device, Layout, Shape, Storage, Tensor, Var};
use rayon::prelude::*;
use serde::Deserialize;

/// The linear modules LoRA can target, in the order of a layer's forward pass.
pub const LINEAR_MODULES: &[&str] = &crate::adapters::LORA_MODULES;

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
}

/// `mlp` or `self_attn`: where a linear module sits in the HF weight names.
fn module_group(module: &str) -> &'static str {
    if ["gate_proj", "up_proj", "down_proj"].contains(&module) {
        "mlp"
    } else {
        "self_attn"
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// What to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Dropout on the LoRA branch's input while training (0 = none).
    pub dropout: f32,
}

/// One LoRA pair: `y += scale * B(A(dropout(x)))`.
#[derive(Debug)]
pub struct Lora {
    /// `(rank, in_features)`, Kaiming-uniform initialised.
    pub a: Var,
    /// `(out_features, rank)`, zero initialised.
    pub b: Var,
    pub scale: f64,
}

#[derive(Debug)]
struct Linear {
    /// `(out_features, in_features)`.
    w: Tensor,
    lora: Option<Lora>,
}

#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// In [`LINEAR_MODULES`] order.
    linears: Vec<Linear>,
}

/// The model (see the module doc).
#[derive(Debug)]
pub struct LlamaLora {
    pub config: LlamaConfig,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    layers: Vec<Layer>,
    device: Device,
    spec: Option<LoraSpec>,
}

/// A small, seedable generator (xorshift64*) for LoRA initialisation and dropout masks: candle's
/// CPU random tensors cannot be seeded, and a fixed seed must give the same adapter.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Shuffle `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

impl LlamaLora {
    /// Load `config.json` and `model.safetensors` from `dir` onto `device` (f32), with LoRA pairs
    /// per `spec` (none for `None`), initialised from `seed`.
    pub fn load(
        dir: &Path,
        device: &Device,
        spec: Option<LoraSpec>,
        seed: u64,
    ) -> candle_core::Result<LlamaLora> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
        let config: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("config.json: {e}")))?;
        if let Some(scaling) = config.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            candle_core::bail!("rope_scaling {scaling} is not supported by the trainer");
        }
        let mut weights = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        let mut take = |name: &str| -> candle_core::Result<Tensor> {
            weights
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("model.safetensors has no {name}")))?
                .to_dtype(DType::F32)
        };
        let embed = take("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight")?
        };
        let norm = take("model.norm.weight")?;
        if let Some(spec) = &spec {
            for t in &spec.targets {
                if !LINEAR_MODULES.contains(&t.as_str()) {
                    candle_core::bail!(
                        "unknown LoRA target {t:?}; expected some of {}",
                        LINEAR_MODULES.join(", ")
                    );
                }
            }
            if spec.rank == 0 {
                candle_core::bail!("LoRA rank must be > 0");
            }
        }
        let mut rng = Rng::new(seed);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut linears = Vec::new();
            for module in LINEAR_MODULES {
                let group = module_group(module);
                let w = take(&format!("model.layers.{i}.{group}.{module}.weight"))?;
                let lora = match &spec {
                    Some(s) if s.targets.iter().any(|t| t == module) => {
                        let (out_f, in_f) = w.dims2()?;
                        // PEFT: kaiming_uniform_(a=sqrt(5)) => U(-1/sqrt(in), 1/sqrt(in)).
                        let bound = 1.0 / (in_f as f32).sqrt();
                        let a: Vec<f32> = (0..s.rank * in_f)
                            .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                            .collect();
                        Some(Lora {
                            a: Var::from_vec(a, (s.rank, in_f), device)?,
                            b: Var::zeros((out_f, s.rank), DType::F32, device)?,
                            scale: s.alpha / s.rank as f64,
                        })
                    }
                    _ => None,
                };
                linears.push(Linear { w, lora });
            }
            layers.push(Layer {
                input_norm: take(&format!("model.layers.{i}.input_layernorm.weight"))?,
                post_norm: take(&format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                linears,
            });
        }
        Ok(LlamaLora {
            config,
            embed,
            lm_head,
            norm,
            layers,
            device: device.clone(),
            spec,
        })
    }

    /// Load the base with the LoRA weights of a PEFT adapter directory (written by
    /// `train::write_peft`) in place of fresh ones.
    pub fn load_with_adapter(
        dir: &Path,
        device: &Device,
        adapter_dir: &Path,
        spec: LoraSpec,
    ) -> candle_core::Result<LlamaLora> {
        let model = LlamaLora::load(dir, device, Some(spec), 0)?;
        let weights =
            candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), device)?;
        for (path, lora) in model.loras() {
            for (part, var) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
                let name = format!("base_model.model.{path}.{part}.weight");
                let t = weights
                    .get(&name)
                    .ok_or_else(|| candle_core::Error::Msg(format!("the adapter has no {name}")))?;
                var.set(t)?;
            }
        }
        Ok(model)
    }

    /// Every frozen base weight (for checks that training leaves them alone).
    pub fn frozen_tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.embed, &self.lm_head, &self.norm];
        for layer in &self.layers {
            out.push(&layer.input_norm);
            out.push(&layer.post_norm);
            out.extend(layer.linears.iter().map(|l| &l.w));
        }
        out
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn spec(&self) -> Option<&LoraSpec> {
        self.spec.as_ref()
    }

    /// The LoRA pairs by PEFT module path (`model.layers.{i}.self_attn.q_proj`), in a fixed order.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (module, linear) in LINEAR_MODULES.iter().zip(&layer.linears) {
                if let Some(lora) = &linear.lora {
                    let group = module_group(module);
                    out.push((format!("model.layers.{i}.{group}.{module}"), lora));
                }
            }
        }
        out
    }

    /// The trainable variables (A then B of each pair, in [`LlamaLora::loras`] order).
    pub fn vars(&self) -> Vec<Var> {
        self.loras()
            .into_iter()
            .flat_map(|(_, l)| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// Number of trainable parameters.
    pub fn trainable_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Final hidden states `(T, hidden)` of one sequence. `dropout` (training only) draws the
    /// LoRA dropout masks from `rng`.
    pub fn hidden(
        &self,
        ids: &[u32],
        mut dropout: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let t = ids.len();
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let ids_t = Tensor::from_slice(ids, t, &self.device)?;
        let mut h = self.embed.index_select(&ids_t, 0)?;
        let (cos, sin) = rope_tables(t, hd, c.rope_theta, &self.device)?;
        // The CPU's attention op masks in place; elsewhere plain ops add this mask.
        let mask = if self.device.is_cpu() {
            None
        } else {
            Some(causal_mask(t, &self.device)?)
        };
        let eps = c.rms_norm_eps;
        let p = self.spec.as_ref().map_or(0.0, |s| s.dropout);
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.input_norm, eps)?;
            let lin = |i: usize, x: &Tensor, rng: &mut Option<&mut Rng>| {
                layer.linears[i].forward(x, p, rng.as_deref_mut())
            };
            let q = lin(0, &x, &mut dropout)?;
            let k = lin(1, &x, &mut dropout)?;
            let v = lin(2, &x, &mut dropout)?;
            let q = q.reshape((t, nh, hd))?.transpose(0, 1)?.contiguous()?;
            let k = k.reshape((t, nkv, hd))?.transpose(0, 1)?.contiguous()?;
            let v = v.reshape((t, nkv, hd))?.transpose(0, 1)?.contiguous()?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            let (k, v) = if nkv == nh {
                (k, v)
            } else {
                let rep = nh / nkv;
                let expand = |x: Tensor| -> candle_core::Result<Tensor> {
                    x.unsqueeze(1)?
                        .broadcast_as((nkv, rep, t, hd))?
                        .reshape((nh, t, hd))
                };
                (expand(k)?, expand(v)?)
            };
            let att = causal_attention_probs(&q, &k, 1.0 / (hd as f64).sqrt(), mask.as_ref())?;
            let y = att.matmul(&v)?.transpose(0, 1)?.reshape((t, nh * hd))?;
            h = (h + lin(3, &y, &mut dropout)?)?;
            let x = rms_norm(&h, &layer.post_norm, eps)?;
            let gate = lin(4, &x, &mut dropout)?;
            let up = lin(5, &x, &mut dropout)?;
            let m = (gate.silu()? * up)?;
            h = (h + lin(6, &m, &mut dropout)?)?;
        }
        rms_norm(&h, &self.norm, eps)
    }

    /// Logits `(P, vocab)` at `positions` of the hidden states `(T, hidden)`.
    pub fn logits_at(&self, hidden: &Tensor, positions: &[u32]) -> candle_core::Result<Tensor> {
        let pos = Tensor::from_slice(positions, positions.len(), &self.device)?;
        let sel = hidden.index_select(&pos, 0)?;
        frozen_linear(&sel, &self.lm_head)
    }

    /// Mean cross-entropy of predicting `ids[i + 1]` at every position `i` in `positions`.
    pub fn loss(
        &self,
        ids: &[u32],
        positions: &[u32],
        dropout: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden(ids, dropout)?;
        let logits = self.logits_at(&hidden, positions)?;
        let targets: Vec<u32> = positions.iter().map(|&p| ids[p as usize + 1]).collect();
        let targets = Tensor::from_vec(targets, positions.len(), &self.device)?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    }

    /// Greedy continuation of `prompt` (no KV cache: every step reruns the sequence; for
    /// consistency checks, not serving). Stops after `max_new` tokens or at any of `stop`.
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
    ) -> candle_core::Result<(Vec<u32>, Vec<Vec<f32>>)> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        let mut logits_out = Vec::new();
        for _ in 0..max_new {
            let hidden = self.hidden(&ids, None)?.detach();
            let last = (ids.len() - 1) as u32;
            let logits = self
                .logits_at(&hidden, &[last])?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0);
            logits_out.push(logits);
            out.push(next);
            if stop.contains(&next) {
                break;
            }
            ids.push(next);
        }
        Ok((out, logits_out))
    }

    /// The LoRA weights as PEFT names them
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).
    pub fn peft_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (path, lora) in self.loras() {
            out.insert(
                format!("base_model.model.{path}.lora_A.weight"),
                lora.a.as_detached_tensor(),
            );
            out.insert(
                format!("base_model.model.{path}.lora_B.weight"),
                lora.b.as_detached_tensor(),
            );
        }
        out
    }
}

impl Linear {
    fn forward(&self, x: &Tensor, p: f32, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let y = frozen_linear(x, &self.w)?;
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        let x = match rng {
            Some(rng) if p > 0.0 => dropout(x, p, rng)?,
            _ => x.clone(),
        };
        // The scale folds into B (out x rank) instead of a pass over the (T x out) product.
        let b_scaled = (lora.b.as_tensor() * lora.scale)?;
        y + x.matmul(&lora.a.t()?)?.matmul(&b_scaled.t()?)?
    }
}

/// Elements per parallel chunk of the element-wise custom ops.
const ROWS_CHUNK: usize = 16 * 1024;

/// Inverted dropout. On the CPU the mask is never stored: it is a pure function of a seed and
/// the element index (a counter-based hash), recomputed by the backward pass; the op runs as one
/// pass each way and keeps no mask tensor in the graph.
fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let seed = rng.next_u64();
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Dropout { seed, p });
    }
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n).map(|i| Dropout { seed, p }.factor(i)).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

struct Dropout {
    seed: u64,
    p: f32,
}

impl Dropout {
    /// 0 or 1/(1-p) for element `i`: 16 bits of splitmix64(seed, i / 4) per element.
    fn factor(&self, i: usize) -> f32 {
        let mut z = self
            .seed
            .wrapping_add(((i / 4) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> (16 * (i % 4))) & 0xFFFF;
        if u < (self.p * 65536.0) as u64 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS_CHUNK)
            .zip(x.par_chunks(ROWS_CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| {
                for (k, (d, v)) in dst.iter_mut().zip(src).enumerate() {
                    *d = v * self.factor(c * ROWS_CHUNK + k);
                }
            });
        out
    }
}

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout-hashed"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        Ok((CpuStorage::F32(self.apply(x)), layout.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = host_f32(grad)?;
        Ok(Some(Tensor::from_vec(
            self.apply(&g),
            grad.shape(),
            grad.device(),
        )?))
    }
}

/// `cos`, `sin` tables `(T, head_dim)` for HF-layout (half-split) rotary embeddings.
fn rope_tables(
    t: usize,
    hd: usize,
    theta: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * hd);
    let mut sin = Vec::with_capacity(t * hd);
    for pos in 0..t {
        for j in 0..hd {
            let inv = 1.0 / theta.powf((2 * (j % half)) as f64 / hd as f64);
            let angle = pos as f64 * inv;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, hd), device)?,
        Tensor::from_vec(sin, (t, hd), device)?,
    ))
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `(heads, T, head_dim)`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Rope {
            cos: cos.clone(),
            sin: sin.clone(),
        });
    }
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rotary embedding as one pass (and its transpose as the backward pass).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotate every `(T, head_dim)` block of `x` by the tables; `sign = -1` rotates back (the
    /// transpose of the rotation, which is the backward pass).
    fn rotate(&self, x: &[f32], dims: &[usize], sign: f32) -> candle_core::Result<Vec<f32>> {
        let (t, hd) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = hd / 2;
        let cos = host_f32(&self.cos)?;
        let sin = host_f32(&self.sin)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_exact_mut(t * hd)
            .zip(x.par_chunks_exact(t * hd))
            .for_each(|(dst, block)| {
                for p in 0..t {
                    let row = &block[p * hd..(p + 1) * hd];
                    let d = &mut dst[p * hd..(p + 1) * hd];
                    for j in 0..half {
                        let (c, s) = (cos[p * hd + j], sign * sin[p * hd + j]);
                        let (x1, x2) = (row[j], row[j + half]);
                        d[j] = x1 * c - x2 * s;
                        d[j + half] = x2 * c + x1 * s;
                    }
                }
            });
        Ok(out)
    }
}

impl candle_core::CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-half-split"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        let out = self.rotate(x, layout.shape().dims(), 1.0)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = host_f32(grad)?;
        let dx = self.rotate(&g, grad.dims(), -1.0)?;
        Ok(Some(Tensor::from_vec(dx, grad.shape(), grad.device())?))
    }
}

fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// A tensor's values, row-major, as a host vector (the input of a fused backward loop).
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// The f32 data of a contiguous CPU storage.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("the trainer runs in f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// `x @ w.T` for a frozen `w (out, in)`: the backward gives `x` its gradient and nothing to `w`.
fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_matmul(&w.detach().t()?);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
}

struct FrozenLinear {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // One gemm straight on the storages: no copy of the input or the output.
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let m = layout.shape().elem_count() / k.max(1);
        let (n, wk) = self.w.dims2()?;
        if wk != k || layout.contiguous_offsets().is_none() {
            candle_core::bail!(
                "frozen-linear: input {:?} does not fit weight ({n}, {wk})",
                dims
            );
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU");
        };
        let lhs = Layout::contiguous_with_offset((m, k), layout.start_offset());
        let out = storage.matmul(w_cpu, (1, m, n, k), &lhs, &w_layout.transpose(0, 1)?)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(out_dims)))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// RMSNorm with a frozen scale `w`: `x / sqrt(mean(x^2) + eps) * w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&r)?.broadcast_mul(&w.detach());
    }
    x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps })
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl candle_core::CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-frozen"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        let w = self.w.to_vec1::<f32>()?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_exact_mut(n)
            .zip(x.par_chunks_exact(n))
            .for_each(|(dst, row)| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let r = 1.0 / (ms + self.eps as f32).sqrt();
                for ((d, v), g) in dst.iter_mut().zip(row).zip(&w) {
                    *d = v * r * g;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = r * gw - x * r^3 * mean(gw * x), with gw = grad * w: one fused pass on the CPU
        // (candle's element-wise ops run one thread each, eight of them would dominate).
        if x.device().is_cpu() {
            let n = self.w.dim(0)?;
            let w = self.w.to_vec1::<f32>()?;
            let xs = host_f32(x)?;
            let gs = host_f32(grad)?;
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_exact_mut(n)
                .zip(xs.par_chunks_exact(n).zip(gs.par_chunks_exact(n)))
                .for_each(|(dr, (xr, gr))| {
                    let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
                    let r = 1.0 / (ms + self.eps as f32).sqrt();
                    let dot = xr
                        .iter()
                        .zip(gr)
                        .zip(&w)
                        .map(|((x, g), w)| g * w * x)
                        .sum::<f32>()
                        / n as f32;
                    let k = r * r * r * dot;
                    for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(&w) {
                        *d = r * g * w - x * k;
                    }
                });
            return Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?));
        }
        let gw = grad.broadcast_mul(&self.w)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        Ok(Some(dx))
    }
}

/// Causal attention probabilities `softmax(q·kᵀ·scale + causal mask)`, shape `(heads, T, T)`,
/// for `q` and `k` of shape `(heads, T, head_dim)`. On the CPU this is one op: the scores are
/// scaled, masked and normalised in place in the matmul's output, and the backward pass needs
/// only the probabilities, so each layer keeps one `T x T` tensor per head for the backward pass
/// instead of four (scores, scaled, masked, probabilities: ~5 GB more per 1300-token sequence
/// across 30 layers, which is what a retrieved-context triplet is). `mask` (the additive causal
/// mask) is used off the CPU only, where plain tensor ops run.
fn causal_attention_probs(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !q.device().is_cpu() {
        let t = q.dim(1)?;
        let owned;
        let mask = match mask {
            Some(m) => m,
            None => {
                owned = causal_mask(t, q.device())?;
                &owned
            }
        };
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    q.contiguous()?
        .apply_op2(&k.contiguous()?, CausalProbs { scale })
}

struct CausalProbs {
    scale: f64,
}

impl candle_core::CustomOp2 for CausalProbs {
    fn name(&self) -> &'static str {
        "causal-attention-probs"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (h, t, d) = ql.shape().dims3()?;
        if kl.shape().dims3()? != (h, t, d)
            || ql.contiguous_offsets().is_none()
            || kl.contiguous_offsets().is_none()
        {
            candle_core::bail!(
                "causal-attention-probs: q {:?} and k {:?} must be the same contiguous (heads, T, head_dim)",
                ql.shape(),
                kl.shape()
            );
        }
        let CpuStorage::F32(mut scores) = qs.matmul(ks, (h, t, t, d), ql, &kl.transpose(1, 2)?)?
        else {
            candle_core::bail!("the trainer runs in f32");
        };
        let scale = self.scale as f32;
        scores
            .par_chunks_exact_mut(t)
            .enumerate()
            .for_each(|(r, row)| {
                // Row r is query position r % t: it sees keys 0..=i.
                let (live, future) = row.split_at_mut(r % t + 1);
                let mut max = f32::NEG_INFINITY;
                for v in live.iter_mut() {
                    *v *= scale;
                    max = max.max(*v);
                }
                let mut sum = 0.0;
                for v in live.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in live.iter_mut() {
                    *v *= inv;
                }
                future.fill(0.0);
            });
        Ok((CpuStorage::F32(scores), Shape::from((h, t, t))))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(scores) = scale * y * (g - sum(g * y)) in one fused pass (masked entries have y = 0),
        // then the two matmuls of q·kᵀ's backward.
        let t = y.dim(D::Minus1)?;
        let ys = host_f32(y)?;
        let gs = host_f32(grad)?;
        let scale = self.scale as f32;
        let mut ds = vec![0f32; ys.len()];
        ds.par_chunks_exact_mut(t)
            .zip(ys.par_chunks_exact(t).zip(gs.par_chunks_exact(t)))
            .enumerate()
            .for_each(|(r, (dr, (yr, gr)))| {
                let n = r % t + 1;
                let dot = yr[..n]
                    .iter()
                    .zip(&gr[..n])
                    .map(|(y, g)| y * g)
                    .sum::<f32>();
                for ((d, y), g) in dr[..n].iter_mut().zip(&yr[..n]).zip(&gr[..n]) {
                    *d = scale * y * (g - dot);
                }
            });
        let ds = Tensor::from_vec(ds, y.shape(), y.device())?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((Some(dq), Some(dk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    /// The custom ops' forward and backward agree with the same maths in plain tensor ops.
    #[test]
    fn custom_ops_match_plain_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() - 0.5).collect() };
        let x = Var::from_vec(rand(4 * 6), (4, 6), &dev)?;
        let w = Tensor::from_vec(rand(5 * 6), (5, 6), &dev)?;
        let g = Tensor::from_vec(rand(6), 6, &dev)?;
        let close = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        // The largest difference between d(sum(out * weights))/dx through each implementation.
        let input_grad_gap = |custom: &Tensor, plain: &Tensor, weights: &Tensor| {
            let gc = (custom * weights)?.sum_all()?.backward()?;
            let gp = (plain * weights)?.sum_all()?.backward()?;
            close(
                gc.get(x.as_tensor()).expect("custom grad"),
                gp.get(x.as_tensor()).expect("plain grad"),
            )
        };
        // Linear.
        let custom = frozen_linear(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        assert!(close(&custom, &plain)? < 1e-6);
        let gc = custom.sqr()?.sum_all()?.backward()?;
        let gp = plain.sqr()?.sum_all()?.backward()?;
        assert!(
            close(
                gc.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap()
            )? < 1e-5
        );
        // RMSNorm.
        let custom = rms_norm(x.as_tensor(), &g, 1e-5)?;
        let r = (x.as_tensor().sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        let plain = x.as_tensor().broadcast_mul(&r)?.broadcast_mul(&g)?;
        assert!(close(&custom, &plain)? < 1e-5);
        let weights = Tensor::from_vec(rand(4 * 6), (4, 6), &dev)?;
        assert!(input_grad_gap(&custom, &plain, &weights)? < 1e-5);
        // RoPE (heads=2, T=2, head_dim=6 from the 4x6 input).
        let xr = x.as_tensor().reshape((2, 2, 6))?;
        let (cos, sin) = rope_tables(2, 6, 10_000.0, &dev)?;
        let custom = apply_rope(&xr, &cos, &sin)?;
        let x1 = xr.narrow(D::Minus1, 0, 3)?;
        let x2 = xr.narrow(D::Minus1, 3, 3)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let plain = (xr.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        assert!(close(&custom, &plain)? < 1e-6);
        let wr = weights.reshape((2, 2, 6))?;
        assert!(input_grad_gap(&custom, &plain, &wr)? < 1e-5);
        Ok(())
    }

    /// The CPU's fused causal attention op against scores, scale, mask and softmax as plain
    /// ops: same probabilities, same gradients for q and k.
    #[test]
    fn causal_attention_matches_plain_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() - 0.5).collect() };
        let (h, t, d) = (3, 7, 4);
        let q = Var::from_vec(rand(h * t * d), (h, t, d), &dev)?;
        let k = Var::from_vec(rand(h * t * d), (h, t, d), &dev)?;
        let weights = Tensor::from_vec(rand(h * t * t), (h, t, t), &dev)?;
        let scale = 0.5;
        let custom = causal_attention_probs(q.as_tensor(), k.as_tensor(), scale, None)?;
        let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?
            .broadcast_add(&causal_mask(t, &dev)?)?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let plain = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let gap = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(gap(&custom, &plain)? < 1e-6);
        // Rows sum to one and nothing attends to the future.
        let sums = custom.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        assert_eq!(
            custom
                .i((.., 0, 1..))?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        let gc = (&custom * &weights)?.sum_all()?.backward()?;
        let gp = (&plain * &weights)?.sum_all()?.backward()?;
        for v in [&q, &k] {
            let (a, b) = (gc.get(v.as_tensor()), gp.get(v.as_tensor()));
            assert!(gap(a.expect("custom grad"), b.expect("plain grad"))? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn dropout_keeps_the_expected_fraction() -> candle_core::Result<()> {
        let x = Tensor::ones(100_000, DType::F32, &Device::Cpu)?;
        let y = dropout(&x, 0.25, &mut Rng::new(1))?;
        let kept = y
            .ne(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        // Inverted dropout keeps the mean.
        let mean = y.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        // The backward pass applies the same mask as the forward pass.
        let v = Var::ones(1000, DType::F32, &Device::Cpu)?;
        let y = dropout(v.as_tensor(), 0.3, &mut Rng::new(9))?;
        let g = y.sum_all()?.backward()?;
        let grad = g.get(v.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert_eq!(grad, y.to_vec1::<f32>()?);
        Ok(())
    }
}
