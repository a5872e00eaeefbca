//! Adapter training inside domainrag: (query, context, answer) triplets in, a PEFT adapter (LoRA,
//! which both engines serve, or (IA)³, prompt or prefix tuning, which the native engine serves)
//! out, registered with its training record.
//!
//! Each triplet becomes the exact token sequence serving will see: the chat messages
//! `rag::build_messages_from_context` makes, through the base model's own chat template and
//! tokenizer (mistral.rs tokenises), then the answer's tokens and the end-of-turn token. The loss
//! is the cross-entropy of the answer tokens only (the LM head runs only at those positions).
//! AdamW with linear warm-up and cosine decay, gradient accumulation over `batch` sequences,
//! global-norm clipping, a fixed seed. The best checkpoint by validation loss is kept; Ctrl-C stops
//! after the current step and keeps it.
//!
//! `model` owns the candle forward pass; `backprop` each step's gradients (plain or with layer
//! checkpointing) over the worker threads; `options` the hyper-parameters and their rules;
//! `output` the PEFT files of each method and registration;
//! `triplets` builds training data from question/answer pairs with the retriever, `synth` from a
//! collection's own documents.

mod backprop;
pub mod from_log;
pub mod model;
mod options;
mod output;
pub mod synth;
pub mod triplets;

pub use backprop::sequence_gradients;
pub use options::{DEFAULT_INIT_TEXT, Method, TrainOptions};
pub use output::{register, write_peft};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapters::{AdapterError, AdapterKind, BaseModelInfo};
use crate::error::ErrorKind;
use crate::generate::{GenerateError, Generator};
use crate::rag::build_messages_from_context;
use crate::rng::Rng;
use model::{Ia3Spec, LlamaLora, LoraSpec, VirtualSpec};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("triplets file {path}: {message}")]
    Triplets { path: PathBuf, message: String },
    #[error("invalid training option {option}: {problem}")]
    Option {
        option: &'static str,
        problem: String,
    },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("training diverged: the loss became {0} at step {1}; lower --lr")]
    Diverged(f32, usize),
    #[error("stopped before the first checkpoint; nothing was registered")]
    Interrupted,
}

impl TrainError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TrainError::Triplets { .. } | TrainError::Option { .. } => ErrorKind::InvalidInput,
            TrainError::Generate(e) => e.kind(),
            TrainError::Adapter(e) => e.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One training example as stored in a triplets JSONL file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triplet {
    pub query: String,
    /// The numbered sources exactly as the prompt shows them (`rag::format_sources`).
    pub context: String,
    /// The ideal answer, citations included.
    pub answer: String,
    /// Where a synthesised triplet came from (`triplets synth`); training ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// The chunk and rule a synthesised triplet was written from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub chunk_id: String,
    pub doc_id: String,
    pub rule: String,
}

/// Read a triplets JSONL file; every problem names its line.
pub fn read_triplets(path: &Path) -> Result<Vec<Triplet>, TrainError> {
    let err = |message: String| TrainError::Triplets {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let t: Triplet =
            serde_json::from_str(line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
        if t.query.trim().is_empty() || t.answer.trim().is_empty() {
            return Err(err(format!(
                "line {}: `query` and `answer` must not be empty",
                i + 1
            )));
        }
        out.push(t);
    }
    if out.is_empty() {
        return Err(err("no triplets".into()));
    }
    Ok(out)
}

/// Write triplets as JSONL (creating the directory), one object per line.
pub fn write_triplets(path: &Path, triplets: &[Triplet]) -> Result<(), TrainError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut text = String::new();
    for t in triplets {
        text.push_str(&serde_json::to_string(t).expect("triplets serialise"));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| io(path, e))
}

/// A tokenised example: the whole sequence and the positions whose next token is an answer token.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
}

/// Why examples were left out.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EncodeReport {
    pub kept: usize,
    pub too_long: usize,
}

/// Tokenise triplets as serving will see them (see the module doc).
pub async fn encode(
    generator: &Generator,
    triplets: &[Triplet],
    max_len: usize,
) -> Result<(Vec<Example>, EncodeReport), TrainError> {
    let end_of_turn = generator.end_of_turn_token().await?;
    let mut report = EncodeReport::default();
    let mut out = Vec::new();
    for t in triplets {
        let prompt = generator
            .tokenize_chat(build_messages_from_context(&t.query, &t.context))
            .await?;
        let mut answer = generator.tokenize_text(&t.answer).await?;
        answer.push(end_of_turn);
        if prompt.len() + answer.len() > max_len {
            report.too_long += 1;
            continue;
        }
        let start = prompt.len() as u32 - 1;
        let mut ids = prompt;
        ids.extend(&answer);
        let positions = (start..start + answer.len() as u32).collect();
        out.push(Example { ids, positions });
        report.kept += 1;
    }
    Ok((out, report))
}

/// The token ids prompt and prefix tuning start from (the init text as plain text, through the
/// serving tokenizer); none for the other methods.
pub async fn init_ids(
    generator: &Generator,
    options: &TrainOptions,
) -> Result<Vec<u32>, TrainError> {
    if !options.method.learns_virtual_tokens() {
        return Ok(Vec::new());
    }
    Ok(generator.tokenize_text(&options.init_text).await?)
}

/// AdamW (decoupled weight decay) over the LoRA variables.
struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i32,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    fn new(vars: Vec<Var>, weight_decay: f64) -> candle_core::Result<AdamW> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&self.m[i] / bc1)? / ((&self.v[i] / bc2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warm-up, cosine decay.
pub fn learning_rate(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One point of the loss curve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossPoint {
    pub step: usize,
    pub epoch: usize,
    pub train_loss: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
}

/// What training did, kept with the adapter.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRecord {
    pub base_model: String,
    pub base_sha256: String,
    pub triplets_file: String,
    pub triplets_sha256: String,
    pub options: TrainOptions,
    pub encode: EncodeReport,
    pub train_examples: usize,
    pub val_examples: usize,
    pub trainable_params: usize,
    pub steps: usize,
    pub best_step: usize,
    pub best_val_loss: Option<f32>,
    pub curve: Vec<LossPoint>,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
    pub interrupted: bool,
    pub device: String,
}

/// Progress, for the CLI's bar.
pub trait Progress: Send {
    fn start(&mut self, total_steps: usize);
    fn step(&mut self, step: usize, epoch: usize, loss: f32, tokens_per_s: f64, lr: f64);
    fn message(&mut self, text: &str);
    fn finish(&mut self);
}

/// Peak resident memory of this process, MiB.
fn peak_rss_mib() -> f64 {
    crate::telemetry::proc_status_mib("VmHWM")
}

/// Everything `train` needs.
pub struct TrainJob<'a> {
    pub base_dir: PathBuf,
    pub triplets_path: PathBuf,
    pub examples: Vec<Example>,
    pub encode: EncodeReport,
    pub options: TrainOptions,
    /// Prompt and prefix tuning: the token ids of `options.init_text` ([`init_ids`]).
    pub init_ids: Vec<u32>,
    /// Where checkpoints go (`best/`, `last/`).
    pub work_dir: PathBuf,
    pub device: Device,
    pub stop: Arc<AtomicBool>,
    pub progress: &'a mut dyn Progress,
}

/// The trained adapter: its directory (the best checkpoint) and record.
#[derive(Debug)]
pub struct Trained {
    pub dir: PathBuf,
    pub record: TrainRecord,
}

/// Train (blocking; run it off the async runtime).
pub fn train(job: TrainJob<'_>) -> Result<Trained, TrainError> {
    let started = Instant::now();
    let _heap = crate::heap::TrainingHeap::enter();
    let o = &job.options;
    o.validate()?;
    let base = BaseModelInfo::from_dir(&job.base_dir)?;
    let triplets_bytes =
        std::fs::read(&job.triplets_path).map_err(|e| io(&job.triplets_path, e))?;
    let triplets_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&triplets_bytes))
    };
    let model = match o.method {
        Method::Lora => {
            let spec = LoraSpec {
                rank: o.rank,
                alpha: o.alpha,
                targets: o.targets.clone(),
                dropout: o.dropout,
            };
            LlamaLora::load(&job.base_dir, &job.device, Some(spec), o.seed)?
        }
        Method::Ia3 => {
            let spec = Ia3Spec {
                targets: o.targets.clone(),
                feedforward: o.feedforward.clone(),
            };
            LlamaLora::load_ia3(&job.base_dir, &job.device, spec)?
        }
        Method::Prompt | Method::Prefix => {
            let spec = VirtualSpec {
                kind: if o.method == Method::Prompt {
                    AdapterKind::Prompt
                } else {
                    AdapterKind::Prefix
                },
                tokens: o.virtual_tokens,
                init_text: o.init_text.clone(),
                init_ids: job.init_ids.clone(),
                projection: o.prefix_projection,
                seed: o.seed,
            };
            LlamaLora::load_virtual(&job.base_dir, &job.device, spec)?
        }
    };

    // Split: a seeded shuffle, the first `val_split` for validation.
    let mut rng = Rng::new(o.seed ^ 0x5EED);
    let mut order: Vec<usize> = (0..job.examples.len()).collect();
    rng.shuffle(&mut order);
    let n_val = ((job.examples.len() as f64) * o.val_split).round() as usize;
    // One example is trained on, not held out (a first try on a tiny collection).
    let n_val = if o.val_split > 0.0 && job.examples.len() > 1 {
        n_val.max(1)
    } else {
        0
    };
    if job.examples.len() <= n_val {
        return Err(TrainError::Option {
            option: "--val-split",
            problem: format!("leaves no training examples out of {}", job.examples.len()),
        });
    }
    let val: Vec<Example> = order[..n_val]
        .iter()
        .map(|&i| job.examples[i].clone())
        .collect();
    let mut train_idx: Vec<usize> = order[n_val..].to_vec();

    let steps_per_epoch = train_idx.len().div_ceil(o.batch);
    let total_steps = steps_per_epoch * o.epochs;
    let vars = model.vars();
    let mut opt = AdamW::new(vars.clone(), o.weight_decay)?;
    let backprop = backprop::Backprop {
        model: &model,
        vars: &vars,
        examples: &job.examples,
        seed: o.seed,
        checkpoint: o.gradient_checkpointing,
    };
    let progress = job.progress;
    progress.start(total_steps);
    progress.message(&format!(
        "{} train / {} validation examples, {} trainable parameters, {} steps",
        train_idx.len(),
        val.len(),
        model.trainable_params(),
        total_steps
    ));

    let best_dir = job.work_dir.join("best");
    let last_dir = job.work_dir.join("last");
    let mut curve = Vec::new();
    let mut best: Option<(f32, usize)> = None;
    let mut step = 0usize;
    let mut tokens = 0usize;
    let mut train_time = 0.0f64;
    let mut interrupted = false;
    let record = |curve: &Vec<LossPoint>,
                  best: Option<(f32, usize)>,
                  step: usize,
                  tokens_per_s: f64,
                  interrupted: bool| TrainRecord {
        base_model: base.id.clone(),
        base_sha256: base.sha256.clone(),
        triplets_file: job.triplets_path.display().to_string(),
        triplets_sha256: triplets_sha256.clone(),
        options: o.clone(),
        encode: job.encode.clone(),
        train_examples: train_idx_len(&job.examples, n_val),
        val_examples: n_val,
        trainable_params: model.trainable_params(),
        steps: step,
        best_step: best.map_or(step, |b| b.1),
        best_val_loss: best.map(|b| b.0),
        curve: curve.clone(),
        tokens_per_s,
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        interrupted,
        device: format!("{:?}", job.device),
    };

    'epochs: for epoch in 1..=o.epochs {
        rng.shuffle(&mut train_idx);
        let mut epoch_loss = 0.0f32;
        let mut epoch_n = 0usize;
        for chunk in train_idx.chunks(o.batch) {
            let t0 = Instant::now();
            let (acc, losses) = backprop.batch(chunk, o.workers, step)?;
            let mut chunk_loss = 0.0f32;
            for value in losses {
                if !value.is_finite() {
                    return Err(TrainError::Diverged(value, step));
                }
                chunk_loss += value;
            }
            tokens += chunk
                .iter()
                .map(|&i| job.examples[i].ids.len())
                .sum::<usize>();
            let grads: Vec<Tensor> = acc
                .into_iter()
                .zip(&vars)
                .map(|(g, v)| g.map_or_else(|| v.zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            let norm = grads
                .iter()
                .map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>())
                .sum::<candle_core::Result<f32>>()?
                .sqrt() as f64;
            let grads = if norm > o.max_grad_norm {
                let scale = o.max_grad_norm / (norm + 1e-6);
                grads
                    .iter()
                    .map(|g| g * scale)
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                grads
            };
            let lr = learning_rate(o.lr, step, o.warmup_steps, total_steps);
            opt.step(&grads, lr)?;
            step += 1;
            train_time += t0.elapsed().as_secs_f64();
            let mean = chunk_loss / chunk.len() as f32;
            epoch_loss += chunk_loss;
            epoch_n += chunk.len();
            progress.step(step, epoch, mean, tokens as f64 / train_time.max(1e-9), lr);
            curve.push(LossPoint {
                step,
                epoch,
                train_loss: mean,
                val_loss: None,
            });
            if job.stop.load(Ordering::Relaxed) {
                interrupted = true;
                progress.message("stopping: Ctrl-C (the current step finished)");
                break 'epochs;
            }
        }
        let val_loss = if val.is_empty() {
            None
        } else {
            Some(backprop::mean_loss(&model, &val)?)
        };
        if let Some(last) = curve.last_mut() {
            last.val_loss = val_loss;
        }
        progress.message(&format!(
            "epoch {epoch}: train loss {:.4}{}, step {step}/{total_steps}, {:.0} tokens/s, {:.0} s training",
            epoch_loss / epoch_n.max(1) as f32,
            val_loss.map_or(String::new(), |v| format!(", validation loss {v:.4}")),
            tokens as f64 / train_time.max(1e-9),
            train_time
        ));
        // Without a validation set the latest epoch is the best one.
        let score = val_loss.unwrap_or(-(epoch as f32));
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, step));
            let rec = record(
                &curve,
                best,
                step,
                tokens as f64 / train_time.max(1e-9),
                false,
            );
            write_peft(&best_dir, &model, &base, Some(&rec))?;
        }
    }
    if interrupted && step > 0 {
        // The weights at the stop replace the best epoch when they validate better (or when no
        // epoch finished).
        let score = if val.is_empty() {
            f32::NEG_INFINITY
        } else {
            backprop::mean_loss(&model, &val)?
        };
        if let Some(last) = curve.last_mut() {
            last.val_loss = Some(score).filter(|s| s.is_finite());
        }
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, step));
            write_peft(&best_dir, &model, &base, None)?;
        }
    }
    progress.finish();
    let tokens_per_s = tokens as f64 / train_time.max(1e-9);
    let Some(best_point) = best else {
        return Err(TrainError::Interrupted);
    };
    let mut rec = record(&curve, Some(best_point), step, tokens_per_s, interrupted);
    if val.is_empty() {
        rec.best_val_loss = None;
    }
    if interrupted {
        // The weights at the stop, for inspection.
        write_peft(&last_dir, &model, &base, Some(&rec))?;
    }
    // The best checkpoint's record becomes the final one (with the whole curve).
    let path = best_dir.join("training.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&rec).expect("json serialises"),
    )
    .map_err(|e| io(&path, e))?;
    Ok(Trained {
        dir: best_dir,
        record: rec,
    })
}

fn train_idx_len(examples: &[Example], n_val: usize) -> usize {
    examples.len() - n_val
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((learning_rate(1.0, 0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, 9, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 110, 10, 110).abs() < 1e-12);
        let mut prev = f64::MAX;
        for s in 10..110 {
            let lr = learning_rate(1.0, s, 10, 110);
            assert!(lr <= prev);
            prev = lr;
        }
    }

    #[test]
    fn triplet_files_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"query\":\"q\",\"context\":\"c\",\"answer\":\"a\"}\n{\"query\":\"q\"}\n",
        )
        .unwrap();
        let e = read_triplets(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&p, "{\"query\":\"q\",\"context\":\"c\",\"answer\":\" \"}\n").unwrap();
        assert!(
            read_triplets(&p)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
    }

    #[test]
    fn adamw_moves_against_the_gradient() -> candle_core::Result<()> {
        let v = Var::from_vec(vec![1.0f32, -1.0], 2, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![v.clone()], 0.0)?;
        let g = Tensor::from_vec(vec![0.5f32, -0.5], 2, &Device::Cpu)?;
        opt.step(&[g], 0.1)?;
        let after = v.as_tensor().to_vec1::<f32>()?;
        // The first Adam step moves each coordinate by ~lr against the gradient's sign.
        assert!(
            (after[0] - 0.9).abs() < 1e-4 && (after[1] + 0.9).abs() < 1e-4,
            "{after:?}"
        );
        Ok(())
    }
}
