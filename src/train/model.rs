//! The trainer's model: the shared Llama decoder ([`crate::llama`]) over the frozen f32 weights of
//! the converted HF directory, with an adapter to train: on chosen linear modules, LoRA A/B pairs
//! or (IA)³ vectors scaling a module's output (or, for feed-forward modules, its input); or
//! virtual tokens before the sequence, as prompt tuning's input embeddings (read at positions
//! 0..n, the sequence after them) or prefix tuning's keys and values in every layer (the sequence
//! at positions n.., as peft places both).
//!
//! Only the adapter's tensors are `Var`s; the base and its fused CPU ops are [`crate::llama`]'s,
//! whose hooks this model fills with its adapter (LoRA dropout while training) and causal
//! attention over the one sequence.
//!
//! Knows nothing of prompts, tokenizers or files beyond the model directory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapters::AdapterKind;
pub use crate::llama::LINEAR_MODULES;
use crate::llama::{self, Hooks, LlamaConfig, VirtualKv, Weights};
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

/// (IA)³ to train: the modules scaled, and those of them scaled on their input (feed-forward
/// modules; the others on their output).
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Spec {
    pub targets: Vec<String>,
    pub feedforward: Vec<String>,
}

/// One (IA)³ vector: `y = (x ⊙ l)·Wᵀ` when `input`, else `y = (x·Wᵀ) ⊙ l`; initialised to ones
/// (the base model's output, as peft does).
#[derive(Debug)]
pub struct Ia3 {
    /// `(features,)`.
    pub l: Var,
    pub input: bool,
}

/// Prompt or prefix tuning to train.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualSpec {
    /// [`AdapterKind::Prompt`] or [`AdapterKind::Prefix`].
    pub kind: AdapterKind,
    pub tokens: usize,
    /// The text the virtual tokens start from, and its token ids (repeated to fill `tokens`, as
    /// peft's text initialisation does).
    pub init_text: String,
    pub init_ids: Vec<u32>,
    /// Prefix tuning only: train the table through peft's reparameterisation MLP of this hidden
    /// width (0 = train the table itself). The MLP starts as peft's does, at random (from
    /// `seed`), and the init text is then not used.
    pub projection: usize,
    pub seed: u64,
}

/// Virtual tokens being trained: prompt tuning's embeddings `(tokens, hidden)`, or prefix
/// tuning's table `(tokens, layers * 2 * kv_heads * head_dim)` ([`VirtualKv::from_table`]) or,
/// with a projection, the MLP's input `(tokens, kv_heads * head_dim)`.
#[derive(Debug)]
pub struct VirtualTokens {
    pub spec: VirtualSpec,
    pub table: Var,
    pub projection: Option<PrefixMlp>,
}

impl VirtualTokens {
    /// The table the adapter is: `table`, or the MLP's output over it.
    pub fn effective_table(&self) -> candle_core::Result<Tensor> {
        match &self.projection {
            Some(mlp) => mlp.forward(self.table.as_tensor()),
            None => Ok(self.table.as_tensor().clone()),
        }
    }
}

/// peft's prefix reparameterisation: `Linear(kv, width) -> tanh -> Linear(width, table width)`.
#[derive(Debug)]
pub struct PrefixMlp {
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
}

impl PrefixMlp {
    /// torch's `nn.Linear` start: weights and biases uniform in `±1/sqrt(in)`.
    fn new(
        input: usize,
        width: usize,
        output: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> candle_core::Result<PrefixMlp> {
        let mut uniform = |shape: &[usize], fan_in: usize| -> candle_core::Result<Var> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect();
            Var::from_vec(values, shape, device)
        };
        Ok(PrefixMlp {
            w1: uniform(&[width, input], input)?,
            b1: uniform(&[width], input)?,
            w2: uniform(&[output, width], width)?,
            b2: uniform(&[output], width)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w1.t()?)?
            .broadcast_add(&self.b1)?
            .tanh()?
            .matmul(&self.w2.t()?)?
            .broadcast_add(&self.b2)
    }

    fn vars(&self) -> [Var; 4] {
        [
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }
}

/// The model (see the module doc).
#[derive(Debug)]
pub struct LlamaLora {
    pub config: LlamaConfig,
    weights: Weights,
    /// Per layer, per [`LINEAR_MODULES`] entry.
    loras: Vec<Vec<Option<Lora>>>,
    spec: Option<LoraSpec>,
    /// Per layer, per [`LINEAR_MODULES`] entry (empty for a LoRA model).
    ia3s: Vec<Vec<Option<Ia3>>>,
    ia3_spec: Option<Ia3Spec>,
    virtual_tokens: Option<VirtualTokens>,
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
            ia3s: Vec::new(),
            ia3_spec: None,
            virtual_tokens: None,
        })
    }

    /// Load the base with (IA)³ vectors per `spec`, all ones.
    pub fn load_ia3(dir: &Path, device: &Device, spec: Ia3Spec) -> candle_core::Result<LlamaLora> {
        for t in &spec.targets {
            if !LINEAR_MODULES.contains(&t.as_str()) {
                candle_core::bail!(
                    "unknown (IA)³ target {t:?}; expected some of {}",
                    LINEAR_MODULES.join(", ")
                );
            }
        }
        if let Some(f) = spec.feedforward.iter().find(|f| !spec.targets.contains(f)) {
            candle_core::bail!("feed-forward module {f:?} is not among the (IA)³ targets");
        }
        let weights = Weights::load(dir, device)?;
        let mut ia3s = Vec::with_capacity(weights.layers.len());
        for _ in &weights.layers {
            let mut row = Vec::with_capacity(LINEAR_MODULES.len());
            for (m, module) in LINEAR_MODULES.iter().enumerate() {
                if !spec.targets.iter().any(|t| t == module) {
                    row.push(None);
                    continue;
                }
                let input = spec.feedforward.iter().any(|f| f == module);
                let (in_f, out_f) = weights.config.linear_dims(m);
                let n = if input { in_f } else { out_f };
                row.push(Some(Ia3 {
                    l: Var::ones(n, DType::F32, device)?,
                    input,
                }));
            }
            ia3s.push(row);
        }
        Ok(LlamaLora {
            config: weights.config.clone(),
            loras: weights.layers.iter().map(|_| Vec::new()).collect(),
            weights,
            spec: None,
            ia3s,
            ia3_spec: Some(spec),
            virtual_tokens: None,
        })
    }

    /// Load the base with virtual tokens per `spec`: prompt tuning's start as the init text's
    /// token embeddings, prefix tuning's as the keys and values the base computes over it.
    pub fn load_virtual(
        dir: &Path,
        device: &Device,
        spec: VirtualSpec,
    ) -> candle_core::Result<LlamaLora> {
        if spec.tokens == 0 || spec.init_ids.is_empty() {
            candle_core::bail!("virtual tokens need a count > 0 and an init text with tokens");
        }
        let weights = Weights::load(dir, device)?;
        let ids: Vec<u32> = spec
            .init_ids
            .iter()
            .cycle()
            .take(spec.tokens)
            .copied()
            .collect();
        let mut projection = None;
        let table = match spec.kind {
            AdapterKind::Prompt => weights.embed(&ids)?,
            AdapterKind::Prefix if spec.projection > 0 => {
                let c = &weights.config;
                let kv = c.kv_heads() * c.head_dim();
                let mut rng = Rng::new(spec.seed);
                // nn.Embedding's start, N(0, 1), drawn as uniform with the same variance.
                let values: Vec<f32> = (0..spec.tokens * kv)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) * 3f32.sqrt())
                    .collect();
                let width = c.num_hidden_layers * 2 * kv;
                projection = Some(PrefixMlp::new(
                    kv,
                    spec.projection,
                    width,
                    &mut rng,
                    device,
                )?);
                Tensor::from_vec(values, (spec.tokens, kv), device)?
            }
            AdapterKind::Prefix => weights.virtual_kv(weights.embed(&ids)?)?.to_table()?,
            other => candle_core::bail!("{} does not learn virtual tokens", other.label()),
        };
        Ok(LlamaLora {
            config: weights.config.clone(),
            loras: weights.layers.iter().map(|_| Vec::new()).collect(),
            weights,
            spec: None,
            ia3s: Vec::new(),
            ia3_spec: None,
            virtual_tokens: Some(VirtualTokens {
                spec,
                table: Var::from_tensor(&table.detach())?,
                projection,
            }),
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

    pub fn ia3_spec(&self) -> Option<&Ia3Spec> {
        self.ia3_spec.as_ref()
    }

    pub fn virtual_tokens(&self) -> Option<&VirtualTokens> {
        self.virtual_tokens.as_ref()
    }

    /// The (IA)³ vectors by PEFT module path, in a fixed order.
    pub fn ia3s(&self) -> Vec<(String, &Ia3)> {
        let mut out = Vec::new();
        for (i, row) in self.ia3s.iter().enumerate() {
            for (m, ia3) in row.iter().enumerate() {
                if let Some(ia3) = ia3 {
                    out.push((llama::module_path(i, m), ia3));
                }
            }
        }
        out
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

    /// The trainable variables (A then B of each pair, in [`LlamaLora::loras`] order, then the
    /// (IA)³ vectors in [`LlamaLora::ia3s`] order, then the virtual tokens' table).
    pub fn vars(&self) -> Vec<Var> {
        let loras = self
            .loras()
            .into_iter()
            .flat_map(|(_, l)| [l.a.clone(), l.b.clone()]);
        loras
            .chain(self.ia3s().into_iter().map(|(_, v)| v.l.clone()))
            .chain(self.virtual_tokens.iter().flat_map(|v| {
                let mlp = v.projection.iter().flat_map(PrefixMlp::vars);
                std::iter::once(v.table.clone()).chain(mlp)
            }))
            .collect()
    }

    /// Number of trainable parameters.
    pub fn trainable_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Final hidden states `(T, hidden)` of one sequence. `dropout` (training only) draws the
    /// LoRA dropout masks from `rng`.
    pub fn hidden(&self, ids: &[u32], dropout: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let input = self.sequence_input(ids)?;
        let mut hooks = self.hooks(dropout, input.prefix.as_ref());
        let top =
            self.weights
                .forward_embedded(input.embedded.clone(), &input.positions, &mut hooks)?;
        input.sequence_rows(&top)
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
        self.cross_entropy(&hidden, ids, positions)
    }

    /// [`LlamaLora::loss`] from the hidden states `(T, hidden)` of `ids`.
    fn cross_entropy(
        &self,
        hidden: &Tensor,
        ids: &[u32],
        positions: &[u32],
    ) -> candle_core::Result<Tensor> {
        let logits = self.logits_at(hidden, positions)?;
        let targets: Vec<u32> = positions.iter().map(|&p| ids[p as usize + 1]).collect();
        let targets = Tensor::from_vec(targets, positions.len(), self.device())?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    }

    /// What the decoder reads for the sequence `ids` with this model's adapter: its embeddings
    /// (after prompt tuning's virtual tokens), their positions, prefix tuning's keys and values.
    pub(crate) fn sequence_input(&self, ids: &[u32]) -> candle_core::Result<SequenceInput> {
        let Some(virt) = &self.virtual_tokens else {
            return Ok(SequenceInput {
                embedded: self.weights.embed(ids)?,
                positions: (0..ids.len() as u32).collect(),
                skip: 0,
                prefix: None,
            });
        };
        let n = virt.spec.tokens;
        let after = (n as u32)..((n + ids.len()) as u32);
        if virt.spec.kind == AdapterKind::Prefix {
            return Ok(SequenceInput {
                embedded: self.weights.embed(ids)?,
                positions: after.collect(),
                skip: 0,
                prefix: Some(VirtualKv::from_table(
                    &self.config,
                    &virt.effective_table()?,
                )?),
            });
        }
        Ok(SequenceInput {
            embedded: Tensor::cat(&[virt.table.as_tensor(), &self.weights.embed(ids)?], 0)?,
            positions: (0..after.end).collect(),
            skip: n,
            prefix: None,
        })
    }

    /// The decoder's layer count.
    pub(crate) fn layers(&self) -> usize {
        self.weights.layers.len()
    }

    /// The rotary tables of `input`'s positions.
    pub(crate) fn rope(&self, input: &SequenceInput) -> candle_core::Result<(Tensor, Tensor)> {
        self.weights.rope(&input.positions)
    }

    /// Layer `l` with this model's adapter over the residual stream `h` of `input`.
    pub(crate) fn layer(
        &self,
        l: usize,
        h: &Tensor,
        rope: &(Tensor, Tensor),
        input: &SequenceInput,
        dropout: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let mut hooks = self.hooks(dropout, input.prefix.as_ref());
        self.weights.layer(l, h, rope, &mut hooks)
    }

    /// The loss of `ids` from the residual stream `top` after the last layer.
    pub(crate) fn head_loss(
        &self,
        top: &Tensor,
        input: &SequenceInput,
        ids: &[u32],
        positions: &[u32],
    ) -> candle_core::Result<Tensor> {
        let hidden = input.sequence_rows(&self.weights.final_norm(top)?)?;
        self.cross_entropy(&hidden, ids, positions)
    }

    fn hooks<'a>(
        &'a self,
        rng: Option<&'a mut Rng>,
        prefix: Option<&'a VirtualKv>,
    ) -> TrainHooks<'a> {
        TrainHooks {
            loras: &self.loras,
            ia3s: &self.ia3s,
            p: self.spec.as_ref().map_or(0.0, |s| s.dropout),
            rng,
            prefix,
        }
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

    /// The adapter's weights as PEFT names and shapes them
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`; `...ia3_l`, `[out, 1]`
    /// or `[1, in]` for a feed-forward module; `prompt_embeddings` for virtual tokens).
    pub fn peft_tensors(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        if let Some(virt) = &self.virtual_tokens {
            // With a projection peft saves the MLP's output, the table serving reads.
            out.insert(
                "prompt_embeddings".to_string(),
                virt.effective_table()?.detach(),
            );
        }
        for (path, ia3) in self.ia3s() {
            let l = ia3.l.as_detached_tensor();
            let n = l.elem_count();
            let shaped = if ia3.input {
                l.reshape((1, n))?
            } else {
                l.reshape((n, 1))?
            };
            out.insert(format!("base_model.model.{path}.ia3_l"), shaped);
        }
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
        Ok(out)
    }
}

/// One sequence as the decoder reads it ([`LlamaLora::sequence_input`]).
pub(crate) struct SequenceInput {
    /// Input embeddings `(rows, hidden)`: prompt tuning's virtual tokens, then the sequence's.
    pub embedded: Tensor,
    /// Each row's position.
    pub positions: Vec<u32>,
    /// Leading rows that are virtual tokens, not the sequence's.
    pub skip: usize,
    /// Prefix tuning's keys and values in every layer.
    pub prefix: Option<VirtualKv>,
}

impl SequenceInput {
    /// The sequence's own rows of `(rows, hidden)` states.
    fn sequence_rows(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        states.narrow(0, self.skip, self.positions.len() - self.skip)
    }
}

/// The trainer's side of the forward pass: its LoRA pairs or (IA)³ vectors, causal attention over
/// the sequence (after prefix tuning's keys and values, when it has them).
struct TrainHooks<'a> {
    loras: &'a [Vec<Option<Lora>>],
    ia3s: &'a [Vec<Option<Ia3>>],
    /// LoRA dropout while training.
    p: f32,
    rng: Option<&'a mut Rng>,
    prefix: Option<&'a VirtualKv>,
}

impl TrainHooks<'_> {
    fn ia3(&self, layer: usize, m: usize) -> Option<&Ia3> {
        self.ia3s.get(layer)?.get(m)?.as_ref()
    }
}

impl Hooks for TrainHooks<'_> {
    fn input(&mut self, layer: usize, m: usize, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.ia3(layer, m) {
            Some(ia3) if ia3.input => x.broadcast_mul(ia3.l.as_tensor()).map(Some),
            _ => Ok(None),
        }
    }

    fn linear(
        &mut self,
        layer: usize,
        m: usize,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        if let Some(ia3) = self.ia3(layer, m).filter(|v| !v.input) {
            return y.broadcast_mul(ia3.l.as_tensor());
        }
        let Some(lora) = self
            .loras
            .get(layer)
            .and_then(|r| r.get(m))
            .and_then(Option::as_ref)
        else {
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
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(prefix) = self.prefix else {
            return llama::causal_self_attention(q, k, v);
        };
        // The sequence's queries after as many zero queries as the prefix has keys: causal
        // attention over prefix + sequence then lets every query see the whole prefix; the
        // prefix's own rows are dropped.
        let (heads, t, head_dim) = q.dims3()?;
        let n = prefix.tokens;
        let k = Tensor::cat(&[&prefix.k[layer], k], 1)?;
        let v = Tensor::cat(&[&prefix.v[layer], v], 1)?;
        let pad = Tensor::zeros((heads, n, head_dim), q.dtype(), q.device())?;
        let q = Tensor::cat(&[&pad, q], 1)?;
        llama::causal_self_attention(&q, &k, &v)?.narrow(0, n, t)
    }
}
