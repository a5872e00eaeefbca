//! What an adapter is checked against and what the registry records of it: the base model's
//! identity and layer shapes ([`BaseModelInfo`], from its HF `config.json`), the
//! parameter-efficient method ([`AdapterKind`]) and a registered adapter's record
//! ([`AdapterInfo`], `domainrag-adapter.json`). Plain data and the rules that read it; no files
//! are written here.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AdapterError, io};

/// What adapters are checked against: the base model's identity and layer sizes, from its HF
/// `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelInfo {
    /// The model directory's name, e.g. `SmolLM2-135M-Instruct-hf`.
    pub id: String,
    /// sha256 (hex) of its `config.json`.
    pub sha256: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl BaseModelInfo {
    /// Read `<dir>/config.json`. `num_key_value_heads` defaults to the attention heads and
    /// `head_dim` to `hidden_size / num_attention_heads`, as in transformers.
    pub fn from_dir(dir: &Path) -> Result<BaseModelInfo, AdapterError> {
        let path = dir.join("config.json");
        let problem = |problem: String| AdapterError::BaseModel {
            path: path.clone(),
            problem,
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(problem(
                    "missing: is the base model supplied (scripts/fetch-models.sh)?".to_string(),
                ));
            }
            Err(source) => return Err(io(&path, source)),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| problem(format!("not valid JSON: {e}")))?;
        let Some(fields) = value.as_object() else {
            return Err(problem("not a JSON object".to_string()));
        };
        let optional = |key: &str| -> Result<Option<usize>, AdapterError> {
            match fields.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| problem(format!("`{key}` must be a positive integer, got {v}"))),
            }
        };
        let required = |key: &str| -> Result<usize, AdapterError> {
            optional(key)?.ok_or_else(|| problem(format!("`{key}` is missing")))
        };
        let hidden_size = required("hidden_size")?;
        let intermediate_size = required("intermediate_size")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = optional("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match optional("head_dim")? {
            Some(head_dim) => head_dim,
            None if hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(problem(format!(
                    "no `head_dim`, and hidden_size {hidden_size} is not a multiple of \
                     num_attention_heads {num_attention_heads}"
                )));
            }
        };
        // `dir` may be `.` or end in `..`, which have no file name of their own.
        let id = match dir.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| dir.display().to_string()),
        };
        Ok(BaseModelInfo {
            id,
            sha256: hex::encode(Sha256::digest(&bytes)),
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
        })
    }

    /// `(in_features, out_features)` of a llama linear module; `None` for any other name.
    pub(super) fn module_dims(&self, module: &str) -> Option<(usize, usize)> {
        let attention = self.num_attention_heads * self.head_dim;
        let key_value = self.num_key_value_heads * self.head_dim;
        Some(match module {
            "q_proj" => (self.hidden_size, attention),
            "k_proj" | "v_proj" => (self.hidden_size, key_value),
            "o_proj" => (attention, self.hidden_size),
            "gate_proj" | "up_proj" => (self.hidden_size, self.intermediate_size),
            "down_proj" => (self.intermediate_size, self.hidden_size),
            _ => return None,
        })
    }
}

/// The parameter-efficient method of an adapter (PEFT's `peft_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Low-rank updates of linear layers (`LORA`): `y += (alpha / r)·x·Aᵀ·Bᵀ`.
    #[default]
    Lora,
    /// (IA)³ (`IA3`): learned per-channel scales of linear layers' outputs (or, for
    /// `feedforward_modules`, inputs).
    Ia3,
    /// Prompt tuning (`PROMPT_TUNING`): learned input embeddings of virtual tokens read before
    /// the prompt.
    Prompt,
    /// Prefix tuning (`PREFIX_TUNING`): a learned key and value per virtual token in every
    /// layer, attended to before the prompt.
    Prefix,
}

impl AdapterKind {
    /// How the kind is written for people.
    pub fn label(self) -> &'static str {
        match self {
            AdapterKind::Lora => "LoRA",
            AdapterKind::Ia3 => "(IA)³",
            AdapterKind::Prompt => "prompt tuning",
            AdapterKind::Prefix => "prefix tuning",
        }
    }

    /// Whether the adapter is virtual tokens before the prompt (prompt or prefix tuning) rather
    /// than a change of linear layers.
    pub fn learns_virtual_tokens(self) -> bool {
        matches!(self, AdapterKind::Prompt | AdapterKind::Prefix)
    }
}

/// A registered adapter, persisted as `domainrag-adapter.json` in its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    /// Records written before adapters had kinds are LoRA.
    #[serde(default)]
    pub kind: AdapterKind,
    /// [`BaseModelInfo::id`] of the model it was checked against.
    pub base_model: String,
    /// [`BaseModelInfo::sha256`] of that model's `config.json`.
    pub base_sha256: String,
    /// LoRA rank (`r`) and `lora_alpha`; mistral.rs scales the update by `alpha / rank`. 0 for
    /// other kinds.
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    /// (IA)³: the targets whose input is scaled rather than their output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feedforward_modules: Vec<String>,
    /// Prompt and prefix tuning: the virtual tokens every request with this adapter reads first
    /// (they take room in the KV cache); 0 for other kinds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub virtual_tokens: usize,
    /// Size of `adapter_model.safetensors`.
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// `base_model_name_or_path` from the PEFT config, when it has one (informational only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterInfo {
    /// The method and its size for people: `LoRA r16 alpha 32`, `(IA)³`.
    pub fn method(&self) -> String {
        match self.kind {
            AdapterKind::Lora => format!("LoRA r{} alpha {}", self.rank, self.alpha),
            AdapterKind::Ia3 => AdapterKind::Ia3.label().to_string(),
            AdapterKind::Prompt | AdapterKind::Prefix => {
                format!(
                    "{}, {} virtual tokens",
                    self.kind.label(),
                    self.virtual_tokens
                )
            }
        }
    }

    /// Its target modules for people: `q_proj,v_proj`, or `-` for the kinds that target none
    /// (prompt and prefix tuning).
    pub fn targets(&self) -> String {
        if self.target_modules.is_empty() {
            "-".to_string()
        } else {
            self.target_modules.join(",")
        }
    }

    /// Whether the adapter was checked against exactly this base model config.
    pub fn fits(&self, base: &BaseModelInfo) -> bool {
        self.base_sha256 == base.sha256
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
