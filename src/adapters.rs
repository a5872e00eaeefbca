//! The LoRA adapter registry: fine-tuned adapters for the base model, kept in the data dir so
//! collections can answer with one.
//!
//! mistral.rs 0.8.1 resolves a LoRA adapter id only through the Hugging Face hub cache (a local
//! directory path is not accepted), so the registry lays every adapter out as a hub-cache repo that
//! mistral.rs reads offline, with `HF_HUB_CACHE` set to [`AdapterRegistry::hub_dir`]:
//!
//! ```text
//! <data_dir>/adapters/hub/models--domainrag--<name>/refs/main          ("local")
//! <data_dir>/adapters/hub/models--domainrag--<name>/snapshots/local/
//!     adapter_config.json  adapter_model.safetensors  domainrag-adapter.json
//! ```
//!
//! The adapter id handed to mistral.rs is `domainrag/<name>` ([`AdapterRegistry::model_id`]).
//!
//! Owns validating PEFT LoRA adapters against the base model's shapes *before* anything is copied
//! (a refused adapter leaves the registry unchanged), installing them atomically (staged in a hidden
//! directory next to the destination, then renamed), listing and removing them. It must not load
//! models or touch collections: which collections use an adapter is the caller's to say
//! (`used_by`), and loading belongs to `generate`. Calls are blocking file I/O; async callers go
//! through `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::collection::{now_secs, validate_name};
use crate::error::ErrorKind;

/// The PEFT files of an adapter, under the names mistral.rs asks the hub cache for.
const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Our record of an adapter, next to its PEFT files.
const INFO_FILE: &str = "domainrag-adapter.json";
/// The hub "owner" of every registered adapter: its model id is `domainrag/<name>`.
const HUB_OWNER: &str = "domainrag";
/// The single revision of every adapter repo; `refs/main` names it.
const REVISION: &str = "local";
/// How PEFT names the LoRA weights of a llama decoder layer.
const TENSOR_PREFIX: &str = "base_model.model.model.layers.";
/// The safetensors format caps its JSON header at 100 MB; larger is a broken or hostile file.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// The llama linear modules a LoRA may target, by the block that holds them.
const ATTENTION_MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP_MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// Every llama linear module a LoRA adapter can target, in a layer's forward order.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Errors of the adapter registry.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The name cannot be used as a directory and hub repo name.
    #[error(
        "invalid adapter name {name:?}: use 1-64 characters from a-z, 0-9, '-' and '_', \
         starting with a letter or digit"
    )]
    InvalidName { name: String },
    /// No adapter of that name is registered.
    #[error("adapter {name:?} is not registered")]
    NotFound { name: String },
    /// An adapter of that name is registered already.
    #[error("adapter {name:?} already exists; remove it first to replace it")]
    AlreadyExists { name: String },
    /// Collections still answer with the adapter.
    #[error(
        "adapter {name:?} is used by collection(s) {}; give them another adapter (or none) first",
        .collections.join(", ")
    )]
    InUse {
        name: String,
        collections: Vec<String>,
    },
    /// The offered files are not a LoRA adapter that fits the base model and mistral.rs.
    #[error("adapter {name:?} refused: {file}: {problem}")]
    Invalid {
        name: String,
        /// The file at fault (`adapter_config.json`, `adapter_model.safetensors`) or the source dir.
        file: String,
        problem: String,
    },
    /// The base model's `config.json` is missing or lacks what adapters are checked against.
    #[error("base model config {path}: {problem}")]
    BaseModel { path: PathBuf, problem: String },
    /// Reading or writing the registry or the offered files failed.
    #[error("adapter registry: cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A registered adapter's `domainrag-adapter.json` cannot be parsed.
    #[error("adapter registry: {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl AdapterError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdapterError::InvalidName { .. } | AdapterError::Invalid { .. } => {
                ErrorKind::InvalidInput
            }
            AdapterError::NotFound { .. } => ErrorKind::NotFound,
            AdapterError::AlreadyExists { .. } | AdapterError::InUse { .. } => ErrorKind::Conflict,
            AdapterError::BaseModel { .. } => ErrorKind::Unavailable,
            AdapterError::Io { .. } | AdapterError::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> AdapterError {
    AdapterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(name: &str, file: &str, problem: String) -> AdapterError {
    AdapterError::Invalid {
        name: name.to_string(),
        file: file.to_string(),
        problem,
    }
}

/// Adapter names follow the collection rules: they become directory and hub repo names.
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    validate_name(name).map_err(|_| AdapterError::InvalidName {
        name: name.to_string(),
    })
}

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
    fn module_dims(&self, module: &str) -> Option<(usize, usize)> {
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

/// A registered adapter, persisted as `domainrag-adapter.json` in its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    /// [`BaseModelInfo::id`] of the model it was checked against.
    pub base_model: String,
    /// [`BaseModelInfo::sha256`] of that model's `config.json`.
    pub base_sha256: String,
    /// LoRA rank (`r`) and `lora_alpha`; mistral.rs scales the update by `alpha / rank`.
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    /// Size of `adapter_model.safetensors`.
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// `base_model_name_or_path` from the PEFT config, when it has one (informational only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterInfo {
    /// Whether the adapter was checked against exactly this base model config.
    pub fn fits(&self, base: &BaseModelInfo) -> bool {
        self.base_sha256 == base.sha256
    }
}

/// The adapters of one data dir.
#[derive(Debug, Clone)]
pub struct AdapterRegistry {
    hub: PathBuf,
}

impl AdapterRegistry {
    pub fn new(data_dir: &Path) -> AdapterRegistry {
        AdapterRegistry {
            hub: data_dir.join("adapters").join("hub"),
        }
    }

    /// Finish what a killed `add`, `replace` or `remove` left: an old adapter moved aside by a
    /// replace whose new copy never arrived is put back (collections using it keep answering,
    /// and `serve` starts), staging and removal leftovers go. Directories of a process that is
    /// still running are left alone. Returns the adapters put back.
    pub fn recover(&self) -> Vec<String> {
        let mut restored = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.hub) else {
            return restored;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some((kind, name, pid)) = parse_work_dir(&file_name) else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue; // that process is still at work
            }
            let path = entry.path();
            let repo = self.repo_dir(name);
            if kind == "replacing" && !repo.exists() && std::fs::rename(&path, &repo).is_ok() {
                tracing::warn!(adapter = %name, "an interrupted replace left no adapter: the previous one is back");
                restored.push(name.to_string());
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove adapter leftovers");
            }
        }
        sync_dir(&self.hub);
        restored
    }

    /// The hub cache the adapters live in; the process sets `HF_HUB_CACHE` to it.
    pub fn hub_dir(&self) -> PathBuf {
        self.hub.clone()
    }

    /// The id mistral.rs loads the adapter by.
    pub fn model_id(&self, name: &str) -> String {
        format!("{HUB_OWNER}/{name}")
    }

    /// The hub-cache repo directory of an adapter.
    fn repo_dir(&self, name: &str) -> PathBuf {
        self.hub.join(format!("models--{HUB_OWNER}--{name}"))
    }

    /// Where an adapter's files are: `adapter_config.json`, `adapter_model.safetensors` and
    /// `domainrag-adapter.json`.
    pub fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.repo_dir(name).join("snapshots").join(REVISION)
    }

    /// All registered adapters, sorted by name.
    pub fn list(&self) -> Result<Vec<AdapterInfo>, AdapterError> {
        let entries = match std::fs::read_dir(&self.hub) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.hub, e)),
        };
        let prefix = format!("models--{HUB_OWNER}--");
        let mut infos = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.hub, e))?;
            let file_name = entry.file_name();
            // Staging and removal directories start with '.', so they never match.
            let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            // A repo without our record was not installed by `add`: not ours to list.
            if let Some(info) = self.read_info(name)? {
                infos.push(info);
            }
        }
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(infos)
    }

    /// One registered adapter.
    pub fn get(&self, name: &str) -> Result<AdapterInfo, AdapterError> {
        check_name(name)?;
        self.read_info(name)?.ok_or_else(|| AdapterError::NotFound {
            name: name.to_string(),
        })
    }

    /// Whether `name` is registered: one file-system lookup, no parsing (for per-request checks).
    pub fn contains(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.snapshot_dir(name).join(INFO_FILE).is_file()
    }

    fn read_info(&self, name: &str) -> Result<Option<AdapterInfo>, AdapterError> {
        let path = self.snapshot_dir(name).join(INFO_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AdapterError::Corrupt { path, source })
    }

    /// Check the PEFT LoRA adapter in `src` against `base` and install it as `name`.
    ///
    /// Everything is checked before anything is written, so a refused adapter leaves the registry
    /// as it was. The files are then staged in a hidden directory next to the destination and
    /// renamed into place, so a crash never leaves a half-installed adapter visible.
    pub fn add(
        &self,
        name: &str,
        src: &Path,
        base: &BaseModelInfo,
    ) -> Result<AdapterInfo, AdapterError> {
        self.install(name, src, base, false)
    }

    /// Like [`AdapterRegistry::add`], replacing an adapter of the same name if there is one (a
    /// retrained adapter keeps its name, so collections using it move to the new weights). The new
    /// adapter is validated and staged before the old one is moved away.
    pub fn replace(
        &self,
        name: &str,
        src: &Path,
        base: &BaseModelInfo,
    ) -> Result<AdapterInfo, AdapterError> {
        self.install(name, src, base, true)
    }

    /// Keep a training record (`training.json`) with a registered adapter.
    pub fn set_training_record(&self, name: &str, record: &Path) -> Result<(), AdapterError> {
        self.get(name)?;
        let dest = self.snapshot_dir(name).join("training.json");
        std::fs::copy(record, &dest).map_err(|e| io(&dest, e))?;
        Ok(())
    }

    /// The training record of an adapter trained by domainrag (`None` for uploaded adapters).
    pub fn training_record(&self, name: &str) -> Result<Option<serde_json::Value>, AdapterError> {
        self.get(name)?;
        let path = self.snapshot_dir(name).join("training.json");
        match std::fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn install(
        &self,
        name: &str,
        src: &Path,
        base: &BaseModelInfo,
        replace: bool,
    ) -> Result<AdapterInfo, AdapterError> {
        check_name(name)?;
        let repo = self.repo_dir(name);
        if repo.exists() && !replace {
            return Err(AdapterError::AlreadyExists {
                name: name.to_string(),
            });
        }
        if !src.is_dir() {
            return Err(invalid(
                name,
                &src.display().to_string(),
                format!("not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}"),
            ));
        }

        let config_path = src.join(CONFIG_FILE);
        let config_bytes = match std::fs::read(&config_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(invalid(
                    name,
                    CONFIG_FILE,
                    format!("missing from {}", src.display()),
                ));
            }
            Err(e) => return Err(io(&config_path, e)),
        };
        let lora = parse_peft_config(&config_bytes).map_err(|p| invalid(name, CONFIG_FILE, p))?;

        let weights_path = src.join(WEIGHTS_FILE);
        let header = read_safetensors_header(name, src, &weights_path)?;
        check_weights(&header.json, header.data_len, &lora, base)
            .map_err(|p| invalid(name, WEIGHTS_FILE, p))?;

        let info = AdapterInfo {
            name: name.to_string(),
            base_model: base.id.clone(),
            base_sha256: base.sha256.clone(),
            rank: lora.rank,
            alpha: lora.alpha,
            target_modules: lora.target_modules,
            size_bytes: header.file_len,
            created_at: now_secs(),
            base_model_name_or_path: lora.base_model_name_or_path,
        };

        std::fs::create_dir_all(&self.hub).map_err(|e| io(&self.hub, e))?;
        let staging = self.hub.join(format!(".adding-{name}-{}", unique_suffix()));
        std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
        let installed = stage(&staging, &config_bytes, &weights_path, &info).and_then(|()| {
            crate::killpoint::reach("adapter.staged");
            if replace && repo.exists() {
                let old = self
                    .hub
                    .join(format!(".replacing-{name}-{}", unique_suffix()));
                std::fs::rename(&repo, &old).map_err(|e| io(&repo, e))?;
                crate::killpoint::reach("adapter.replace.aside");
                let moved = self.move_into_place(&staging, &repo, name);
                if moved.is_err() {
                    // Put the old adapter back: a failed replace must not lose it.
                    let _ = std::fs::rename(&old, &repo);
                } else {
                    crate::killpoint::reach("adapter.replace.placed");
                    let _ = std::fs::remove_dir_all(&old);
                }
                moved
            } else {
                self.move_into_place(&staging, &repo, name)
            }
        });
        if installed.is_err() {
            // Best effort: the staging dir is hidden from `list`, and the error that matters is
            // the one being returned.
            let _ = std::fs::remove_dir_all(&staging);
        }
        installed.map(|()| info)
    }

    fn move_into_place(&self, staging: &Path, repo: &Path, name: &str) -> Result<(), AdapterError> {
        match std::fs::rename(staging, repo) {
            Ok(()) => {
                sync_dir(&self.hub);
                Ok(())
            }
            // Another `add` of the same name won the race.
            Err(_) if repo.exists() => Err(AdapterError::AlreadyExists {
                name: name.to_string(),
            }),
            Err(e) => Err(io(repo, e)),
        }
    }

    /// Remove an adapter. `used_by` names the collections that still answer with it; when there
    /// are any, nothing is removed.
    pub fn remove(&self, name: &str, used_by: &[String]) -> Result<(), AdapterError> {
        check_name(name)?;
        let repo = self.repo_dir(name);
        // The repo dir, not the record, decides: a repo left without its record must still be
        // removable, or its name could never be used again.
        if !repo.is_dir() {
            return Err(AdapterError::NotFound {
                name: name.to_string(),
            });
        }
        if !used_by.is_empty() {
            return Err(AdapterError::InUse {
                name: name.to_string(),
                collections: used_by.to_vec(),
            });
        }
        // Rename first so a crash mid-delete leaves a hidden leftover, not a half adapter.
        let doomed = self
            .hub
            .join(format!(".removing-{name}-{}", unique_suffix()));
        std::fs::rename(&repo, &doomed).map_err(|e| io(&repo, e))?;
        sync_dir(&self.hub);
        std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))
    }
}

/// Write the hub-cache repo for `info` into `staging`.
fn stage(
    staging: &Path,
    config_bytes: &[u8],
    weights_src: &Path,
    info: &AdapterInfo,
) -> Result<(), AdapterError> {
    let refs = staging.join("refs");
    std::fs::create_dir(&refs).map_err(|e| io(&refs, e))?;
    // hf-hub reads the ref verbatim (no trimming), so no trailing newline.
    let main_ref = refs.join("main");
    write_synced(&main_ref, REVISION.as_bytes()).map_err(|e| io(&main_ref, e))?;

    let snapshot = staging.join("snapshots").join(REVISION);
    std::fs::create_dir_all(&snapshot).map_err(|e| io(&snapshot, e))?;
    // The bytes that were validated, not a second read of the source.
    let config = snapshot.join(CONFIG_FILE);
    write_synced(&config, config_bytes).map_err(|e| io(&config, e))?;

    let weights = snapshot.join(WEIGHTS_FILE);
    let copied = std::fs::copy(weights_src, &weights).map_err(|e| io(weights_src, e))?;
    if copied != info.size_bytes {
        return Err(invalid(
            &info.name,
            WEIGHTS_FILE,
            format!(
                "changed while it was being added ({} bytes checked, {copied} copied); try again",
                info.size_bytes
            ),
        ));
    }
    File::open(&weights)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&weights, e))?;

    let record = snapshot.join(INFO_FILE);
    let json = serde_json::to_vec_pretty(info).expect("adapter info serialises to JSON");
    write_synced(&record, &json).map_err(|e| io(&record, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Persist a rename in `dir`. Best effort: not every platform can open and sync a directory, and
/// the rename itself has already happened.
fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// A name part that no other staging or removal directory of this or another process has.
/// `.<kind>-<name>-<pid>-<nanos>-<n>` (see [`unique_suffix`]) -> (kind, name, pid).
fn parse_work_dir(file_name: &str) -> Option<(&str, &str, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (kind, rest) = rest.split_once('-')?;
    if !matches!(kind, "adding" | "replacing" | "removing") {
        return None;
    }
    let mut parts = rest.rsplitn(4, '-');
    let (_n, _nanos, pid, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some((kind, name, pid.parse().ok()?))
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// What `add` needs from `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
struct PeftLora {
    rank: usize,
    alpha: f64,
    /// Without duplicates, in the config's order.
    target_modules: Vec<String>,
    base_model_name_or_path: Option<String>,
}

/// The block (`self_attn` or `mlp`) holding a llama linear module; `None` for any other name.
fn module_block(module: &str) -> Option<(&'static str, &'static str)> {
    if let Some(m) = ATTENTION_MODULES.iter().find(|m| **m == module) {
        return Some((*m, "self_attn"));
    }
    MLP_MODULES
        .iter()
        .find(|m| **m == module)
        .map(|m| (*m, "mlp"))
}

/// Check a PEFT `adapter_config.json`; the error is the problem, for [`AdapterError::Invalid`].
fn parse_peft_config(bytes: &[u8]) -> Result<PeftLora, String> {
    use serde_json::Value;

    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("not a JSON object".to_string());
    };
    match fields.get("peft_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "LORA" => {}
        Some(other) => {
            return Err(format!(
                "peft_type is {other}; only \"LORA\" adapters are supported"
            ));
        }
    }
    // mistral.rs 0.8.1 scales every LoRA by lora_alpha / r; these variants would load and then
    // compute something else than what was trained.
    for flag in ["use_rslora", "use_dora"] {
        if fields.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(format!(
                "`{flag}` is true; mistral.rs supports plain LoRA only (scale lora_alpha / r)"
            ));
        }
    }
    let rank = match fields.get("r") {
        None => return Err("`r` (the LoRA rank) is missing".to_string()),
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| format!("`r` must be a positive integer, got {v}"))?,
    };
    let alpha = match fields.get("lora_alpha") {
        None => return Err("`lora_alpha` is missing".to_string()),
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| format!("`lora_alpha` must be a number > 0, got {v}"))?,
    };
    let Some(listed) = fields
        .get("target_modules")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
    else {
        return Err("`target_modules` must be a non-empty list of module names".to_string());
    };
    let mut target_modules: Vec<String> = Vec::new();
    for item in listed {
        let Some(module) = item.as_str() else {
            return Err(format!(
                "`target_modules` entries must be strings, got {item}"
            ));
        };
        if module_block(module).is_none() {
            return Err(format!(
                "target module {module:?} is not supported; use llama linear modules: {}, {}",
                ATTENTION_MODULES.join(", "),
                MLP_MODULES.join(", ")
            ));
        }
        if !target_modules.iter().any(|t| t == module) {
            target_modules.push(module.to_string());
        }
    }
    let base_model_name_or_path = fields
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(PeftLora {
        rank,
        alpha,
        target_modules,
        base_model_name_or_path,
    })
}

/// The JSON header of a safetensors file and the sizes to check its offsets against.
#[derive(Debug)]
struct SafetensorsHeader {
    file_len: u64,
    /// Bytes after the header: where `data_offsets` point into.
    data_len: u64,
    json: Vec<u8>,
}

/// Read the header only: adapters can be large, and the tensor data is never interpreted here.
fn read_safetensors_header(
    name: &str,
    src: &Path,
    path: &Path,
) -> Result<SafetensorsHeader, AdapterError> {
    let refuse = |problem: String| invalid(name, WEIGHTS_FILE, problem);
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(format!("missing from {}", src.display())));
        }
        Err(e) => return Err(io(path, e)),
    };
    let meta = file.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(refuse("is not a regular file".to_string()));
    }
    let file_len = meta.len();
    if file_len < 8 {
        return Err(refuse(format!(
            "{file_len} bytes is too short for a safetensors file"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|e| io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len - 8 || header_len > MAX_HEADER_BYTES {
        return Err(refuse(format!(
            "header length {header_len} does not fit the {file_len}-byte file; not a \
             safetensors file?"
        )));
    }
    let mut json = vec![0u8; usize::try_from(header_len).expect("bounded by MAX_HEADER_BYTES")];
    file.read_exact(&mut json).map_err(|e| io(path, e))?;
    Ok(SafetensorsHeader {
        file_len,
        data_len: file_len - 8 - header_len,
        json,
    })
}

/// The tensors must tile the data exactly, in offset order, as the safetensors loader requires:
/// tensors that share bytes are accepted by nothing that reads the file later (they were once
/// registered, and then every answer with the adapter failed and the server would not restart).
fn check_layout(mut spans: Vec<(u64, u64, String)>, data_len: u64) -> Result<(), String> {
    spans.sort();
    let mut at = 0;
    for (begin, end, name) in &spans {
        if *begin < at {
            return Err(format!(
                "{name}: data_offsets [{begin}, {end}] overlap the tensor before it (which ends \
                 at {at}); each tensor needs bytes of its own"
            ));
        }
        if *begin > at {
            return Err(format!(
                "{name}: data_offsets start at {begin}, leaving bytes {at}..{begin} unused"
            ));
        }
        at = *end;
    }
    if at != data_len {
        return Err(format!(
            "the tensors end at byte {at} of {data_len} bytes of data: the file has trailing bytes"
        ));
    }
    Ok(())
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraPart {
    A,
    B,
}

impl LoraPart {
    fn suffix(self) -> &'static str {
        match self {
            LoraPart::A => "lora_A.weight",
            LoraPart::B => "lora_B.weight",
        }
    }
}

/// PEFT's name for one LoRA weight of a llama layer.
fn tensor_name(layer: usize, module: &str, part: LoraPart) -> String {
    let block = if MLP_MODULES.contains(&module) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("{TENSOR_PREFIX}{layer}.{block}.{module}.{}", part.suffix())
}

/// `(layer, module, part)` of a PEFT LoRA weight name; `None` for anything else.
fn parse_tensor_name(name: &str) -> Option<(usize, &'static str, LoraPart)> {
    let rest = name.strip_prefix(TENSOR_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    // Only the canonical spelling: mistral.rs looks weights up as `layers.3`, never `layers.03`.
    let canonical = !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && (layer == "0" || !layer.starts_with('0'));
    if !canonical {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let (module, expected_block) = module_block(module)?;
    if block != expected_block {
        return None;
    }
    let part = match rest {
        "lora_A.weight" => LoraPart::A,
        "lora_B.weight" => LoraPart::B,
        _ => return None,
    };
    Some((layer, module, part))
}

/// Check every tensor of the adapter against the config and the base model's shapes.
///
/// mistral.rs 0.8.1 applies `target_modules` to every decoder layer and fails to load when one
/// lacks its weights (PEFT's `layers_to_transform` is ignored), so every targeted module of every
/// layer needs its `lora_A` and `lora_B`.
fn check_weights(
    header: &[u8],
    data_len: u64,
    lora: &PeftLora,
    base: &BaseModelInfo,
) -> Result<(), String> {
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| format!("header is not a safetensors JSON header: {e}"))?;
    // (layer, module) -> (has lora_A, has lora_B)
    let mut found: BTreeMap<(usize, &'static str), (bool, bool)> = BTreeMap::new();
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let Some((layer, module, part)) = parse_tensor_name(&name) else {
            return Err(format!(
                "unexpected tensor {name}: only LoRA weights named \
                 {TENSOR_PREFIX}<layer>.<self_attn|mlp>.<module>.<lora_A|lora_B>.weight are \
                 supported"
            ));
        };
        if layer >= base.num_hidden_layers {
            return Err(format!(
                "{name}: layer {layer} is out of range; {} has {} layers (0-{})",
                base.id,
                base.num_hidden_layers,
                base.num_hidden_layers.saturating_sub(1)
            ));
        }
        if !lora.target_modules.iter().any(|t| t == module) {
            return Err(format!(
                "{name}: {module} is not in target_modules {:?} of {CONFIG_FILE}",
                lora.target_modules
            ));
        }
        let tensor: TensorEntry =
            serde_json::from_value(value).map_err(|e| format!("{name}: bad header entry: {e}"))?;
        let element_bytes: u64 = match tensor.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(format!("{name} has dtype {other}; use F32, F16 or BF16"));
            }
        };
        let (in_features, out_features) = base
            .module_dims(module)
            .expect("parse_tensor_name returns llama modules only");
        let expected = match part {
            LoraPart::A => vec![lora.rank, in_features],
            LoraPart::B => vec![out_features, lora.rank],
        };
        if tensor.shape != expected {
            return Err(format!(
                "{name} has shape {:?}, expected {expected:?} for {module} of {}",
                tensor.shape, base.id
            ));
        }
        let [begin, end] = tensor.data_offsets;
        if begin > end || end > data_len {
            return Err(format!(
                "{name}: data_offsets [{begin}, {end}] lie outside the {data_len} bytes of \
                 tensor data"
            ));
        }
        let needed = expected
            .iter()
            .try_fold(element_bytes, |acc, &d| acc.checked_mul(d as u64));
        if needed != Some(end - begin) {
            return Err(format!(
                "{name}: data_offsets [{begin}, {end}] hold {} bytes, but {} {expected:?} needs \
                 {}",
                end - begin,
                tensor.dtype,
                needed.map_or_else(|| "more than fits".to_string(), |n| n.to_string())
            ));
        }
        spans.push((begin, end, name.clone()));
        let halves = found.entry((layer, module)).or_default();
        match part {
            LoraPart::A => halves.0 = true,
            LoraPart::B => halves.1 = true,
        }
    }
    for (&(layer, module), &(has_a, has_b)) in &found {
        if !has_a {
            return Err(format!(
                "{} has no matching {}",
                tensor_name(layer, module, LoraPart::B),
                tensor_name(layer, module, LoraPart::A)
            ));
        }
        if !has_b {
            return Err(format!(
                "{} has no matching {}",
                tensor_name(layer, module, LoraPart::A),
                tensor_name(layer, module, LoraPart::B)
            ));
        }
    }
    if found.is_empty() {
        return Err("holds no LoRA weights".to_string());
    }
    check_layout(spans, data_len)?;
    for layer in 0..base.num_hidden_layers {
        for module in &lora.target_modules {
            if !found
                .keys()
                .any(|&(l, m)| l == layer && m == module.as_str())
            {
                return Err(format!(
                    "no LoRA weights for {module} of layer {layer}; mistral.rs applies \
                     target_modules to all {} layers of {}, so each needs lora_A and lora_B",
                    base.num_hidden_layers, base.id
                ));
            }
        }
    }
    Ok(())
}

/// Test and fixture helper, not used by the service: writes a PEFT LoRA adapter for `base` into
/// `dir` (created if needed), as `adapter_config.json` and `adapter_model.safetensors` with F32
/// `lora_A` (`[rank, in]`) and `lora_B` (`[out, rank]`) weights for each of `targets` in each of
/// `layers`. Element `i` of every tensor is `value(i)`, so the adapter is deterministic.
///
/// [`AdapterRegistry::add`] only accepts adapters that cover every layer of the base model (as
/// mistral.rs needs), so pass `0..num_hidden_layers` unless a test wants a refusal. Targets must be
/// llama linear modules.
pub fn write_test_adapter(
    dir: &Path,
    base: &BaseModelInfo,
    rank: usize,
    alpha: f64,
    targets: &[&str],
    layers: &[usize],
    value: impl Fn(usize) -> f32,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_peft_config(dir, base, rank, alpha, targets)?;
    let tensors = lora_tensors(base, rank, targets, layers)?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &value)
}

/// Names and shapes of the LoRA weights for `targets` in `layers`.
fn lora_tensors(
    base: &BaseModelInfo,
    rank: usize,
    targets: &[&str],
    layers: &[usize],
) -> std::io::Result<Vec<(String, Vec<usize>)>> {
    let mut tensors = Vec::new();
    for &layer in layers {
        for &module in targets {
            let Some((in_features, out_features)) = base.module_dims(module) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{module:?} is not a llama linear module"),
                ));
            };
            tensors.push((
                tensor_name(layer, module, LoraPart::A),
                vec![rank, in_features],
            ));
            tensors.push((
                tensor_name(layer, module, LoraPart::B),
                vec![out_features, rank],
            ));
        }
    }
    Ok(tensors)
}

/// An `adapter_config.json` as PEFT writes it for a causal LM.
fn write_peft_config(
    dir: &Path,
    base: &BaseModelInfo,
    rank: usize,
    alpha: f64,
    targets: &[&str],
) -> std::io::Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.id,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "target_modules": targets,
    });
    let bytes = serde_json::to_vec_pretty(&config).expect("JSON values serialise");
    std::fs::write(dir.join(CONFIG_FILE), bytes)
}

/// A safetensors file of F32 tensors, element `i` of each being `value(i)`.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    value: &dyn Fn(usize) -> f32,
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt" }),
    );
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let begin = data.len();
        let elements: usize = shape.iter().product();
        for i in 0..elements {
            data.extend_from_slice(&value(i).to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()] }),
        );
    }
    write_safetensors_raw(path, &serde_json::Value::Object(header), &data)
}

/// Header length, JSON header (space-padded to 8 bytes, as the safetensors writer does, so the
/// data stays aligned), data.
fn write_safetensors_raw(
    path: &Path,
    header: &serde_json::Value,
    data: &[u8],
) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(header).expect("JSON values serialise");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_MODULES: [&str; 7] = LORA_MODULES;
    const TARGETS: [&str; 2] = ["q_proj", "v_proj"];
    const LAYERS: [usize; 2] = [0, 1];

    /// head_dim differs from hidden / heads on purpose, so the shapes exercise it.
    fn tiny_base() -> BaseModelInfo {
        BaseModelInfo {
            id: "tiny-llama".to_string(),
            sha256: "ab".repeat(32),
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 6,
        }
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        registry: AdapterRegistry,
        src: PathBuf,
        base: BaseModelInfo,
    }

    /// A registry in a fresh data dir and a valid rank-4 adapter for q_proj and v_proj in `src`.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = tiny_base();
        let src = tmp.path().join("src-adapter");
        write_test_adapter(&src, &base, 4, 8.0, &TARGETS, &LAYERS, |_| 0.0).unwrap();
        Fixture {
            registry: AdapterRegistry::new(&tmp.path().join("data")),
            src,
            base,
            _tmp: tmp,
        }
    }

    /// Replace the fixture's weights with these tensors (zeroed F32).
    fn rewrite_weights(f: &Fixture, tensors: &[(String, Vec<usize>)]) {
        write_safetensors(&f.src.join(WEIGHTS_FILE), tensors, &|_| 0.0).unwrap();
    }

    fn hub_entries(registry: &AdapterRegistry) -> Vec<String> {
        match std::fs::read_dir(registry.hub_dir()) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("cannot read hub dir: {e}"),
        }
    }

    /// Add the fixture's adapter as "legal", expect a refusal, and check nothing was left behind.
    fn refused(f: &Fixture) -> AdapterError {
        let err = f
            .registry
            .add("legal", &f.src, &f.base)
            .expect_err("adapter should be refused");
        assert!(f.registry.list().unwrap().is_empty());
        assert!(
            hub_entries(&f.registry).is_empty(),
            "left behind: {:?}",
            hub_entries(&f.registry)
        );
        err
    }

    fn assert_invalid(err: &AdapterError, file: &str, needle: &str) {
        match err {
            AdapterError::Invalid {
                file: got, problem, ..
            } => {
                assert_eq!(got, file, "{err}");
                assert!(problem.contains(needle), "{needle:?} not in: {err}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn base_model_from_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("Tiny-Model-hf");
        std::fs::create_dir(&dir).unwrap();
        let config = br#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 8, "rope_scaling": null}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        let base = BaseModelInfo::from_dir(&dir).unwrap();
        assert_eq!(base.id, "Tiny-Model-hf");
        assert_eq!(base.sha256, hex::encode(Sha256::digest(config)));
        assert_eq!(base.num_key_value_heads, 8);
        assert_eq!(base.head_dim, 8);
        assert_eq!(base.module_dims("k_proj"), Some((64, 64)));

        let config = br#"{"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        let base = BaseModelInfo::from_dir(&dir).unwrap();
        assert_eq!((base.num_key_value_heads, base.head_dim), (3, 64));
        assert_eq!(base.module_dims("k_proj"), Some((576, 192)));
        assert_eq!(base.module_dims("down_proj"), Some((1536, 576)));
        assert_eq!(base.module_dims("lm_head"), None);

        std::fs::write(dir.join("config.json"), br#"{"hidden_size": 64}"#).unwrap();
        let err = BaseModelInfo::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("intermediate_size"), "{err}");

        let err = BaseModelInfo::from_dir(&tmp.path().join("absent")).unwrap_err();
        assert!(matches!(err, AdapterError::BaseModel { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn add_then_list_and_get() {
        let f = fixture();
        write_test_adapter(&f.src, &f.base, 4, 8.0, &ALL_MODULES, &LAYERS, |i| i as f32).unwrap();
        let info = f.registry.add("legal", &f.src, &f.base).unwrap();
        let size = std::fs::metadata(f.src.join(WEIGHTS_FILE)).unwrap().len();
        assert_eq!(info.name, "legal");
        assert_eq!(info.rank, 4);
        assert_eq!(info.alpha, 8.0);
        assert_eq!(info.target_modules, ALL_MODULES.map(String::from).to_vec());
        assert_eq!(info.size_bytes, size);
        assert_eq!(info.base_model, "tiny-llama");
        assert_eq!(info.base_model_name_or_path.as_deref(), Some("tiny-llama"));
        assert!(info.fits(&f.base));
        assert!(info.created_at > 0);

        assert_eq!(f.registry.list().unwrap(), vec![info.clone()]);
        assert_eq!(f.registry.get("legal").unwrap(), info);
        assert_eq!(f.registry.model_id("legal"), "domainrag/legal");

        // The hub-cache layout mistral.rs reads.
        let repo = f.registry.hub_dir().join("models--domainrag--legal");
        assert_eq!(
            std::fs::read_to_string(repo.join("refs").join("main")).unwrap(),
            "local"
        );
        let snapshot = repo.join("snapshots").join("local");
        assert_eq!(f.registry.snapshot_dir("legal"), snapshot);
        for file in [CONFIG_FILE, WEIGHTS_FILE, INFO_FILE] {
            assert!(snapshot.join(file).is_file(), "{file} missing");
        }
        assert_eq!(
            std::fs::read(snapshot.join(WEIGHTS_FILE)).unwrap(),
            std::fs::read(f.src.join(WEIGHTS_FILE)).unwrap()
        );
        assert_eq!(hub_entries(&f.registry), vec!["models--domainrag--legal"]);

        let err = f.registry.get("other").unwrap_err();
        assert!(matches!(err, AdapterError::NotFound { ref name } if name == "other"));
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn list_is_sorted() {
        let f = fixture();
        for name in ["zeta", "alpha", "mid"] {
            f.registry.add(name, &f.src, &f.base).unwrap();
        }
        let names: Vec<String> = f
            .registry
            .list()
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
    }

    #[test]
    fn refuses_bad_json() {
        let f = fixture();
        std::fs::write(f.src.join(CONFIG_FILE), "{\"r\": 4,").unwrap();
        assert_invalid(&refused(&f), CONFIG_FILE, "not valid JSON");
    }

    #[test]
    fn refuses_rank_zero() {
        let f = fixture();
        write_test_adapter(&f.src, &f.base, 0, 8.0, &TARGETS, &LAYERS, |_| 0.0).unwrap();
        assert_invalid(
            &refused(&f),
            CONFIG_FILE,
            "`r` must be a positive integer, got 0",
        );
    }

    #[test]
    fn refuses_unknown_target_module() {
        let f = fixture();
        write_peft_config(&f.src, &f.base, 4, 8.0, &["q_proj", "v_proj", "lm_head"]).unwrap();
        assert_invalid(&refused(&f), CONFIG_FILE, "\"lm_head\"");
    }

    #[test]
    fn refuses_wrong_shape() {
        let f = fixture();
        let mut tensors = lora_tensors(&f.base, 4, &TARGETS, &LAYERS).unwrap();
        let bad = tensor_name(1, "q_proj", LoraPart::A);
        for (name, shape) in &mut tensors {
            if *name == bad {
                *shape = vec![4, 100];
            }
        }
        rewrite_weights(&f, &tensors);
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight has shape [4, 100], \
             expected [4, 16] for q_proj of tiny-llama",
        );
    }

    #[test]
    fn refuses_shape_that_ignores_head_dim() {
        let f = fixture();
        let mut tensors = lora_tensors(&f.base, 4, &TARGETS, &LAYERS).unwrap();
        let bad = tensor_name(0, "v_proj", LoraPart::B);
        for (name, shape) in &mut tensors {
            if *name == bad {
                // kv_heads * (hidden / heads) instead of kv_heads * head_dim.
                *shape = vec![8, 4];
            }
        }
        rewrite_weights(&f, &tensors);
        assert_invalid(&refused(&f), WEIGHTS_FILE, "expected [12, 4] for v_proj");
    }

    #[test]
    fn refuses_missing_lora_b() {
        let f = fixture();
        let missing = tensor_name(1, "v_proj", LoraPart::B);
        let tensors: Vec<_> = lora_tensors(&f.base, 4, &TARGETS, &LAYERS)
            .unwrap()
            .into_iter()
            .filter(|(name, _)| *name != missing)
            .collect();
        rewrite_weights(&f, &tensors);
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            &format!("has no matching {missing}"),
        );
    }

    #[test]
    fn refuses_layer_out_of_range() {
        let f = fixture();
        write_test_adapter(&f.src, &f.base, 4, 8.0, &TARGETS, &[0, 1, 2], |_| 0.0).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "layer 2 is out of range");
    }

    #[test]
    fn refuses_adapter_missing_a_layer() {
        let f = fixture();
        write_test_adapter(&f.src, &f.base, 4, 8.0, &TARGETS, &[0], |_| 0.0).unwrap();
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            "no LoRA weights for q_proj of layer 1",
        );
    }

    #[test]
    fn refuses_weights_for_untargeted_module() {
        let f = fixture();
        let tensors = lora_tensors(&f.base, 4, &["q_proj", "v_proj", "o_proj"], &LAYERS).unwrap();
        rewrite_weights(&f, &tensors);
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            "o_proj is not in target_modules",
        );
    }

    #[test]
    fn refuses_unexpected_tensor() {
        let f = fixture();
        let mut tensors = lora_tensors(&f.base, 4, &TARGETS, &LAYERS).unwrap();
        tensors.push((
            "base_model.model.lm_head.lora_A.weight".to_string(),
            vec![4, 16],
        ));
        rewrite_weights(&f, &tensors);
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            "unexpected tensor base_model.model.lm_head.lora_A.weight",
        );
    }

    #[test]
    fn refuses_missing_files() {
        let f = fixture();
        std::fs::remove_file(f.src.join(WEIGHTS_FILE)).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "missing from");

        let f = fixture();
        std::fs::remove_file(f.src.join(CONFIG_FILE)).unwrap();
        assert_invalid(&refused(&f), CONFIG_FILE, "missing from");

        let f = fixture();
        let not_a_dir = f.src.join(CONFIG_FILE);
        let err = f.registry.add("legal", &not_a_dir, &f.base).unwrap_err();
        assert!(matches!(err, AdapterError::Invalid { .. }), "{err:?}");
        assert!(f.registry.list().unwrap().is_empty());
    }

    #[test]
    fn refuses_broken_safetensors() {
        let f = fixture();
        std::fs::write(f.src.join(WEIGHTS_FILE), [1u8, 2, 3]).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "too short");

        let f = fixture();
        let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(f.src.join(WEIGHTS_FILE), bytes).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "header length 1000000");

        // Offsets past the end of the data.
        let f = fixture();
        let name = tensor_name(0, "q_proj", LoraPart::A);
        let header = serde_json::json!({
            name.clone(): { "dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256] }
        });
        write_safetensors_raw(&f.src.join(WEIGHTS_FILE), &header, &[0u8; 16]).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "lie outside the 16 bytes");

        // Every tensor pointing at the same bytes (a well-formed header otherwise).
        let f = fixture();
        let weights = f.src.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value =
            serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let data = &bytes[8 + header_len..];
        let mut first: Option<serde_json::Value> = None;
        for (key, entry) in header.as_object_mut().unwrap() {
            if key == "__metadata__" {
                continue;
            }
            let offsets = first
                .get_or_insert_with(|| entry["data_offsets"].clone())
                .clone();
            let len = offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap();
            let own = entry["data_offsets"][1].as_u64().unwrap()
                - entry["data_offsets"][0].as_u64().unwrap();
            if own == len {
                entry["data_offsets"] = offsets;
            }
        }
        write_safetensors_raw(&weights, &header, data).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "overlap");

        // A dtype mistral.rs cannot use for LoRA weights.
        let f = fixture();
        let header = serde_json::json!({
            name: { "dtype": "I64", "shape": [4, 16], "data_offsets": [0, 512] }
        });
        write_safetensors_raw(&f.src.join(WEIGHTS_FILE), &header, &[0u8; 512]).unwrap();
        assert_invalid(&refused(&f), WEIGHTS_FILE, "dtype I64");
    }

    #[test]
    fn recover_puts_back_an_adapter_a_killed_replace_moved_aside_and_clears_leftovers() {
        let f = fixture();
        f.registry.add("support", &f.src, &f.base).unwrap();
        // A kill between a replace's two renames: the old copy aside, the new one staged.
        let aside = f.registry.hub.join(".replacing-support-999999999-1-0");
        std::fs::rename(f.registry.repo_dir("support"), &aside).unwrap();
        let staged = f.registry.hub.join(".adding-support-999999999-2-0");
        std::fs::create_dir_all(&staged).unwrap();
        assert!(f.registry.get("support").is_err());

        assert_eq!(f.registry.recover(), ["support"]);
        assert!(f.registry.get("support").is_ok());
        assert!(!aside.exists() && !staged.exists());
        // A live process's work is left alone.
        let mine = f
            .registry
            .hub
            .join(format!(".adding-x-{}-1-0", std::process::id()));
        std::fs::create_dir_all(&mine).unwrap();
        assert!(f.registry.recover().is_empty());
        assert!(mine.exists());
    }

    #[test]
    fn refuses_bad_name() {
        let f = fixture();
        for name in ["../x", "Legal", ""] {
            let err = f.registry.add(name, &f.src, &f.base).unwrap_err();
            assert!(
                matches!(err, AdapterError::InvalidName { .. }),
                "{name:?}: {err:?}"
            );
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
        assert!(f.registry.list().unwrap().is_empty());
        assert!(hub_entries(&f.registry).is_empty());
        assert!(
            !f._tmp
                .path()
                .join("data")
                .join("adapters")
                .join("x")
                .exists()
        );
    }

    #[test]
    fn refuses_duplicate_name() {
        let f = fixture();
        let first = f.registry.add("legal", &f.src, &f.base).unwrap();
        let err = f.registry.add("legal", &f.src, &f.base).unwrap_err();
        assert!(matches!(err, AdapterError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(f.registry.list().unwrap(), vec![first]);
        assert_eq!(hub_entries(&f.registry), vec!["models--domainrag--legal"]);
    }

    #[test]
    fn remove_refuses_while_in_use() {
        let f = fixture();
        f.registry.add("legal", &f.src, &f.base).unwrap();
        let users = vec!["contracts".to_string(), "policies".to_string()];
        let err = f.registry.remove("legal", &users).unwrap_err();
        assert!(matches!(err, AdapterError::InUse { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(err.to_string().contains("contracts, policies"), "{err}");
        assert_eq!(f.registry.list().unwrap().len(), 1);

        f.registry.remove("legal", &[]).unwrap();
        assert!(f.registry.list().unwrap().is_empty());
        assert!(hub_entries(&f.registry).is_empty());
        let err = f.registry.remove("legal", &[]).unwrap_err();
        assert!(matches!(err, AdapterError::NotFound { .. }), "{err:?}");
        // The name is free again.
        f.registry.add("legal", &f.src, &f.base).unwrap();
    }

    #[test]
    fn peft_config_rules() {
        let parse = |json: &str| parse_peft_config(json.as_bytes());
        let ok = parse(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules":
                ["q_proj", "v_proj", "q_proj"], "base_model_name_or_path": "HuggingFaceTB/x"}"#,
        )
        .unwrap();
        assert_eq!(ok.rank, 8);
        assert_eq!(ok.alpha, 16.0);
        assert_eq!(ok.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(
            ok.base_model_name_or_path.as_deref(),
            Some("HuggingFaceTB/x")
        );
        // peft_type and base_model_name_or_path are optional.
        let minimal = parse(r#"{"r": 2, "lora_alpha": 0.5, "target_modules": ["down_proj"]}"#);
        assert_eq!(minimal.unwrap().base_model_name_or_path, None);

        for (json, needle) in [
            ("[1]", "not a JSON object"),
            (
                r#"{"peft_type": "IA3", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
                "IA3",
            ),
            (r#"{"lora_alpha": 8, "target_modules": ["q_proj"]}"#, "`r`"),
            (
                r#"{"r": 2.5, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
                "`r`",
            ),
            (
                r#"{"r": 8, "target_modules": ["q_proj"]}"#,
                "`lora_alpha` is missing",
            ),
            (
                r#"{"r": 8, "lora_alpha": 0, "target_modules": ["q_proj"]}"#,
                "`lora_alpha`",
            ),
            (
                r#"{"r": 8, "lora_alpha": "8", "target_modules": ["q_proj"]}"#,
                "`lora_alpha`",
            ),
            (
                r#"{"r": 8, "lora_alpha": 8, "target_modules": []}"#,
                "`target_modules`",
            ),
            (
                r#"{"r": 8, "lora_alpha": 8, "target_modules": "q_proj"}"#,
                "`target_modules`",
            ),
            (
                r#"{"r": 8, "lora_alpha": 8, "target_modules": [3]}"#,
                "strings",
            ),
            (
                r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "use_rslora": true}"#,
                "use_rslora",
            ),
        ] {
            let problem = parse(json).expect_err(json);
            assert!(problem.contains(needle), "{json}: {problem}");
        }
    }

    #[test]
    fn tensor_names() {
        let name = tensor_name(12, "gate_proj", LoraPart::B);
        assert_eq!(
            name,
            "base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight"
        );
        assert_eq!(
            parse_tensor_name(&name),
            Some((12, "gate_proj", LoraPart::B))
        );
        for bad in [
            "base_model.model.model.layers.03.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.3.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector",
            "model.layers.3.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(parse_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_adapter_values_follow_the_function() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tiny_base();
        write_test_adapter(tmp.path(), &base, 2, 4.0, &["q_proj"], &[0], |i| {
            i as f32 * 0.5
        })
        .unwrap();
        let bytes = std::fs::read(tmp.path().join(WEIGHTS_FILE)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(header_len.is_multiple_of(8));
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let entry = &header[tensor_name(0, "q_proj", LoraPart::B)];
        assert_eq!(entry["shape"], serde_json::json!([24, 2]));
        let begin = entry["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
        let values: Vec<f32> = bytes[begin..begin + 12]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [0.0, 0.5, 1.0]);
    }
}
