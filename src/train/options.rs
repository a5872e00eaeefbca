//! What `train` is asked to fit and how: the method (LoRA, (IA)³, prompt or prefix tuning) with
//! its default targets or virtual tokens, and
//! the hyper-parameters with the rules they must meet (checked before anything loads; errors name
//! the command-line option).

use serde::Serialize;

use super::TrainError;
use super::model::LINEAR_MODULES;

/// The parameter-efficient method `train` fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank updates (`--rank`, `--alpha`, `--dropout`).
    #[default]
    Lora,
    /// (IA)³: per-channel scales of the targets' outputs, or inputs for `--feedforward` modules.
    Ia3,
    /// Prompt tuning: `--virtual-tokens` input embeddings read before the prompt, initialised
    /// from the embeddings of `--init-text`.
    Prompt,
    /// Prefix tuning: a key and a value per virtual token in every layer, initialised from the
    /// keys and values the base computes over `--init-text`.
    Prefix,
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Method, String> {
        match s {
            "lora" => Ok(Method::Lora),
            "ia3" => Ok(Method::Ia3),
            "prompt" => Ok(Method::Prompt),
            "prefix" => Ok(Method::Prefix),
            other => Err(format!(
                "unknown method {other:?}: use lora, ia3, prompt or prefix"
            )),
        }
    }
}

impl Method {
    /// Whether the method learns virtual tokens (prompt and prefix tuning) rather than changes
    /// of linear modules.
    pub fn learns_virtual_tokens(self) -> bool {
        matches!(self, Method::Prompt | Method::Prefix)
    }

    /// The modules a method targets unless told: every linear module for LoRA; keys, values and
    /// the MLP's down projection for (IA)³ (peft's default for llama); none for prompt and
    /// prefix tuning.
    pub fn default_targets(self) -> Vec<String> {
        let modules: &[&str] = match self {
            Method::Lora => LINEAR_MODULES,
            Method::Ia3 => &["k_proj", "v_proj", "down_proj"],
            Method::Prompt | Method::Prefix => &[],
        };
        modules.iter().map(|m| m.to_string()).collect()
    }

    /// (IA)³'s feed-forward modules (scaled on their input) among `targets` unless told: the MLP's
    /// down projection, as in peft; none for LoRA.
    pub fn default_feedforward(self, targets: &[String]) -> Vec<String> {
        match self {
            Method::Lora | Method::Prompt | Method::Prefix => Vec::new(),
            Method::Ia3 => targets
                .iter()
                .filter(|t| *t == "down_proj")
                .cloned()
                .collect(),
        }
    }
}

/// What prompt and prefix tuning start from unless told: the task in words.
pub const DEFAULT_INIT_TEXT: &str = "Answer the question in one or two sentences using only the numbered sources, and cite \
     them like [1].";

/// Hyper-parameters (see the README's training section for what each does).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOptions {
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// (IA)³: the targets scaled on their input.
    pub feedforward: Vec<String>,
    /// Prompt and prefix tuning: how many virtual tokens, and the text they start from.
    pub virtual_tokens: usize,
    pub init_text: String,
    /// Prefix tuning: train through peft's reparameterisation MLP of this hidden width (0 = no).
    pub prefix_projection: usize,
    pub dropout: f32,
    pub lr: f64,
    pub epochs: usize,
    /// Sequences per optimiser step (gradients are accumulated over them).
    pub batch: usize,
    /// Longest training sequence in tokens; longer examples are dropped (and reported).
    pub max_len: usize,
    pub val_split: f64,
    pub seed: u64,
    /// Linear warm-up steps, then cosine decay to 0.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Sequences of a batch trained at once on their own threads (1 = one after another).
    pub workers: usize,
    /// Keep only each layer's input in the forward pass and recompute its activations in the
    /// backward pass: the memory of one layer instead of all, for one more forward pass.
    pub gradient_checkpointing: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            method: Method::Lora,
            rank: 16,
            alpha: 32.0,
            targets: Method::Lora.default_targets(),
            feedforward: Vec::new(),
            virtual_tokens: 20,
            init_text: DEFAULT_INIT_TEXT.to_string(),
            prefix_projection: 0,
            dropout: 0.05,
            lr: 2e-4,
            epochs: 2,
            batch: 8,
            max_len: 2048,
            val_split: 0.1,
            seed: 7,
            warmup_steps: 20,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gradient_checkpointing: false,
        }
    }
}

impl TrainOptions {
    /// The defaults for `method`: its default targets (and feed-forward modules).
    pub fn for_method(method: Method) -> TrainOptions {
        let targets = method.default_targets();
        TrainOptions {
            method,
            feedforward: method.default_feedforward(&targets),
            targets,
            ..TrainOptions::default()
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.rank == 0 || self.rank > 1024 {
            return bad("--rank", "must be between 1 and 1024");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("--alpha", "must be > 0");
        }
        if self.method.learns_virtual_tokens() {
            return self
                .validate_virtual_tokens()
                .and_then(|()| self.validate_schedule());
        }
        if self.targets.is_empty() {
            return bad("--targets", "name at least one module");
        }
        for t in &self.targets {
            if !LINEAR_MODULES.contains(&t.as_str()) {
                return bad(
                    "--targets",
                    &format!("{t:?} is not one of {}", LINEAR_MODULES.join(", ")),
                );
            }
        }
        if let Some(f) = self.feedforward.iter().find(|f| !self.targets.contains(f)) {
            return bad(
                "--feedforward",
                &format!("{f:?} is not among --targets {}", self.targets.join(",")),
            );
        }
        if self.method == Method::Lora && !self.feedforward.is_empty() {
            return bad("--feedforward", "applies to --method ia3 only");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("--dropout", "must be in [0, 1)");
        }
        self.validate_schedule()
    }

    /// Prompt and prefix tuning's own options; the other methods' are refused.
    fn validate_virtual_tokens(&self) -> Result<(), TrainError> {
        let max = crate::adapters::MAX_VIRTUAL_TOKENS;
        if !(1..=max).contains(&self.virtual_tokens) {
            return bad("--virtual-tokens", &format!("must be between 1 and {max}"));
        }
        if self.init_text.trim().is_empty() {
            return bad("--init-text", "must not be empty");
        }
        if self.prefix_projection > 0 && self.method != Method::Prefix {
            return bad("--prefix-projection", "applies to --method prefix only");
        }
        if self.prefix_projection > 4096 {
            return bad("--prefix-projection", "must be at most 4096");
        }
        if !self.targets.is_empty() || !self.feedforward.is_empty() {
            return bad("--targets", "applies to --method lora and ia3 only");
        }
        Ok(())
    }

    /// The optimiser's and the data's options, the same for every method.
    fn validate_schedule(&self) -> Result<(), TrainError> {
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad("--lr", "must be in (0, 1)");
        }
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad("--epochs", &format!("must be between 1 and {MAX_EPOCHS}"));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad("--batch", &format!("must be between 1 and {MAX_BATCH}"));
        }
        if self.workers == 0 || self.workers > 256 {
            return bad("--workers", "must be between 1 and 256");
        }
        if self.max_len < 16 {
            return bad("--max-len", "must be at least 16");
        }
        if !(0.0..0.9).contains(&self.val_split) {
            return bad("--val-split", "must be in [0, 0.9)");
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad("--max-grad-norm", "must be > 0");
        }
        Ok(())
    }
}

/// The most passes over the triplets one run may ask for (a run of that many is days already).
const MAX_EPOCHS: usize = 1000;
/// The most sequences one step may take.
const MAX_BATCH: usize = 4096;

fn bad(option: &'static str, problem: &str) -> Result<(), TrainError> {
    Err(TrainError::Option {
        option,
        problem: problem.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(TrainOptions::default().validate().is_ok());
        let bad = TrainOptions {
            targets: vec!["qkv".into()],
            ..TrainOptions::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--targets")
        );
        let bad = TrainOptions {
            lr: 0.0,
            ..TrainOptions::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--lr"));
        // A train job asking for endless work would hold the one heavy-job slot until cancelled.
        for (epochs, batch, option) in [(MAX_EPOCHS + 1, 8, "--epochs"), (1, usize::MAX, "--batch")]
        {
            let bad = TrainOptions {
                epochs,
                batch,
                ..TrainOptions::default()
            };
            assert!(bad.validate().unwrap_err().to_string().contains(option));
        }
    }

    #[test]
    fn ia3_defaults_follow_peft_and_feedforward_modules_must_be_targets() {
        let targets = Method::Ia3.default_targets();
        assert_eq!(targets, ["k_proj", "v_proj", "down_proj"]);
        assert_eq!(Method::Ia3.default_feedforward(&targets), ["down_proj"]);
        let attention_only = vec!["q_proj".to_string(), "v_proj".to_string()];
        assert!(Method::Ia3.default_feedforward(&attention_only).is_empty());
        assert_eq!("ia3".parse::<Method>(), Ok(Method::Ia3));
        assert!(
            "p-tuning"
                .parse::<Method>()
                .unwrap_err()
                .contains("lora, ia3, prompt or prefix")
        );
        let ia3 = TrainOptions {
            method: Method::Ia3,
            targets: targets.clone(),
            feedforward: Method::Ia3.default_feedforward(&targets),
            ..TrainOptions::default()
        };
        assert!(ia3.validate().is_ok());
        {
            let bad = TrainOptions {
                feedforward: vec!["up_proj".to_string()],
                ..ia3.clone()
            };
            assert!(
                bad.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("--feedforward")
            );
        }
        let bad = TrainOptions {
            feedforward: vec!["down_proj".into()],
            ..TrainOptions::default()
        };
        assert!(
            bad.validate().unwrap_err().to_string().contains("ia3 only"),
            "a LoRA run refuses --feedforward"
        );
    }

    #[test]
    fn prompt_and_prefix_tuning_take_virtual_tokens_and_no_targets() {
        for method in [Method::Prompt, Method::Prefix] {
            let ok = TrainOptions::for_method(method);
            assert!(ok.targets.is_empty() && ok.feedforward.is_empty());
            assert!(ok.validate().is_ok(), "{method:?}");
            for (bad, option) in [
                (
                    TrainOptions {
                        virtual_tokens: 0,
                        ..ok.clone()
                    },
                    "--virtual-tokens",
                ),
                (
                    TrainOptions {
                        init_text: " ".into(),
                        ..ok.clone()
                    },
                    "--init-text",
                ),
                (
                    TrainOptions {
                        targets: vec!["q_proj".into()],
                        ..ok.clone()
                    },
                    "--targets",
                ),
                (
                    TrainOptions {
                        lr: 2.0,
                        ..ok.clone()
                    },
                    "--lr",
                ),
                (
                    TrainOptions {
                        prefix_projection: 5000,
                        ..ok.clone()
                    },
                    "--prefix-projection",
                ),
            ] {
                let err = bad.validate().unwrap_err().to_string();
                assert!(err.contains(option), "{method:?}: {err}");
            }
        }
        assert_eq!("prefix".parse::<Method>(), Ok(Method::Prefix));
        let mlp = TrainOptions {
            prefix_projection: 256,
            ..TrainOptions::for_method(Method::Prefix)
        };
        assert!(mlp.validate().is_ok());
        let prompt_mlp = TrainOptions {
            method: Method::Prompt,
            ..mlp
        };
        let err = prompt_mlp.validate().unwrap_err().to_string();
        assert!(err.contains("prefix only"), "{err}");
    }
}
