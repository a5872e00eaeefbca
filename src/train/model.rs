//! The trainer's model: the shared Llama decoder ([`crate::llama`]) over the frozen f32 weights of
//! the converted HF directory, with LoRA A/B pairs on chosen linear modules.
//!
//! Only the LoRA matrices are `Var`s; the base and its fused CPU ops are [`crate::llama`]'s, whose
//! hooks this model fills with its LoRA pairs (dropout while training) and causal attention over
//! the one sequence.
//!
//! Knows nothing of prompts, tokenizers or files beyond the model directory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

pub use crate::llama::LINEAR_MODULES;
use crate::llama::{self, Hooks, LlamaConfig, Weights};
use crate::rng::Rng;

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

/// The model (see the module doc).
#[derive(Debug)]
pub struct LlamaLora {
    pub config: LlamaConfig,
    weights: Weights,
    /// Per layer, per [`LINEAR_MODULES`] entry.
    loras: Vec<Vec<Option<Lora>>>,
    spec: Option<LoraSpec>,
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
        let weights = Weights::load(dir, device)?;
        let mut rng = Rng::new(seed);
        let mut loras = Vec::with_capacity(weights.layers.len());
        for layer in &weights.layers {
            let mut row = Vec::with_capacity(LINEAR_MODULES.len());
            for (module, w) in LINEAR_MODULES.iter().zip(&layer.linears) {
                let lora = match &spec {
                    Some(s) if s.targets.iter().any(|t| t == module) => {
                        let (out_f, in_f) = w.dims()?;
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
                row.push(lora);
            }
            loras.push(row);
        }
        Ok(LlamaLora {
            config: weights.config.clone(),
            weights,
            loras,
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
        self.weights.tensors()
    }

    pub fn device(&self) -> &Device {
        &self.weights.device
    }

    pub fn spec(&self) -> Option<&LoraSpec> {
        self.spec.as_ref()
    }

    /// The LoRA pairs by PEFT module path (`model.layers.{i}.self_attn.q_proj`), in a fixed order.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        let mut out = Vec::new();
        for (i, row) in self.loras.iter().enumerate() {
            for (m, lora) in row.iter().enumerate() {
                if let Some(lora) = lora {
                    out.push((llama::module_path(i, m), lora));
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
    pub fn hidden(&self, ids: &[u32], dropout: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let p = self.spec.as_ref().map_or(0.0, |s| s.dropout);
        let mut hooks = TrainHooks {
            loras: &self.loras,
            p,
            rng: dropout,
        };
        self.weights.forward(ids, &positions, &mut hooks)
    }

    /// Logits `(P, vocab)` at `positions` of the hidden states `(T, hidden)`.
    pub fn logits_at(&self, hidden: &Tensor, positions: &[u32]) -> candle_core::Result<Tensor> {
        self.weights.logits_at(hidden, positions)
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
        let targets = Tensor::from_vec(targets, positions.len(), self.device())?;
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

/// The trainer's side of the forward pass: its LoRA pairs, causal attention over the sequence.
struct TrainHooks<'a> {
    loras: &'a [Vec<Option<Lora>>],
    /// LoRA dropout while training.
    p: f32,
    rng: Option<&'a mut Rng>,
}

impl Hooks for TrainHooks<'_> {
    fn linear(
        &mut self,
        layer: usize,
        m: usize,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(lora) = &self.loras[layer][m] else {
            return Ok(y);
        };
        let x = match self.rng.as_deref_mut() {
            Some(rng) if self.p > 0.0 => llama::ops::dropout(x, self.p, rng)?,
            _ => x.clone(),
        };
        // The scale folds into B (out x rank) instead of a pass over the (T x out) product.
        let b_scaled = (lora.b.as_tensor() * lora.scale)?;
        y + x.matmul(&lora.a.t()?)?.matmul(&b_scaled.t()?)?
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        llama::causal_self_attention(q, k, v)
    }
}
