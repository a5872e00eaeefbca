//! The adapter registry: fine-tuned adapters for the base model (LoRA, (IA)³, prompt and prefix
//! tuning, all in PEFT's format), kept in the data dir so collections can answer with one.
//!
//! ```text
//! <data_dir>/adapters/<name>/
//!     adapter_config.json  adapter_model.safetensors  domainrag-adapter.json  [training.json]
//! ```
//!
//! (Versions before 2026-12 laid adapters out as a Hugging Face hub cache for mistral.rs;
//! `layout` moves such a registry into this one the first time it is opened. mistral.rs, which
//! still resolves adapters only through a hub cache, reads links to these directories that
//! `generate::hubview` makes.)
//!
//! Owns validating PEFT LoRA adapters against the base model's shapes *before* anything is copied
//! (a refused adapter leaves the registry unchanged), installing them atomically (staged in a hidden
//! directory next to the destination, then renamed, or swapped with the adapter it replaces, under
//! a lock beside the registry), listing and removing them. It must not load models or touch
//! collections: which collections use an adapter is the caller's to say (`used_by`), and loading
//! belongs to `generate`. Calls are blocking file I/O; async callers go through `spawn_blocking`.
//!
//! What a valid PEFT adapter is (its config, tensor names, safetensors header and layout) is
//! `peft`'s, and `prompt`'s for the kinds that learn virtual tokens (prompt and prefix tuning);
//! `fixture` writes adapters for tests and benchmarks.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::collection::{now_secs, validate_name};
use crate::error::ErrorKind;

mod fixture;
mod info;
mod layout;
mod peft;
mod prompt;

pub use fixture::{write_test_adapter, write_test_ia3_adapter, write_test_prompt_adapter};
pub use info::{AdapterInfo, AdapterKind, BaseModelInfo};
pub use peft::LORA_MODULES;
use peft::{check_finite, check_weights, parse_peft_config, read_safetensors_header};
pub use prompt::MAX_VIRTUAL_TOKENS;

/// The PEFT files of an adapter, under PEFT's names.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Our record of an adapter, next to its PEFT files.
const INFO_FILE: &str = "domainrag-adapter.json";
/// `<data_dir>/adapters.lock` (beside the registry, so listings of it hold adapters only): an
/// advisory lock held while an adapter's directory is placed, swapped or removed, so two installs
/// or removals of one name, by threads of this process or by another process (`train` beside
/// `serve`), never interleave: without it, two replaces of one name could each find the other's
/// work half done and fail with `AlreadyExists`.
const LOCK_FILE: &str = "adapters.lock";
/// Errors of the adapter registry.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The name cannot be used as a directory name.
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

/// Adapter names follow the collection rules: they become directory names.
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    validate_name(name).map_err(|_| AdapterError::InvalidName {
        name: name.to_string(),
    })
}

/// The adapters of one data dir.
#[derive(Debug, Clone)]
pub struct AdapterRegistry {
    /// `<data_dir>/adapters`: one directory per adapter, and hidden work directories.
    root: PathBuf,
}

impl AdapterRegistry {
    /// The registry of `data_dir`. A registry in the earlier hub-cache layout is moved into this
    /// one first (see `layout`; nothing to do, one `stat`, once moved).
    pub fn new(data_dir: &Path) -> AdapterRegistry {
        let root = data_dir.join("adapters");
        layout::move_from_hub_layout(&root);
        AdapterRegistry { root }
    }

    /// Finish what a killed `add`, `replace` or `remove` left: an old adapter moved aside by a
    /// replace whose new copy never arrived is put back (collections using it keep answering,
    /// and `serve` starts), staging and removal leftovers go. Directories of a process that is
    /// still running are left alone. Returns the adapters put back.
    pub fn recover(&self) -> Vec<String> {
        let mut restored = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
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
            let dir = self.dir(name);
            if kind == "replacing" && !dir.exists() && std::fs::rename(&path, &dir).is_ok() {
                tracing::warn!(adapter = %name, "an interrupted replace left no adapter: the previous one is back");
                restored.push(name.to_string());
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove adapter leftovers");
            }
        }
        sync_dir(&self.root);
        restored
    }

    /// `<data_dir>/adapters`, where every adapter has its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an adapter's files are: `adapter_config.json`, `adapter_model.safetensors`,
    /// `domainrag-adapter.json` (and `training.json` for an adapter trained here).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// All registered adapters, sorted by name.
    pub fn list(&self) -> Result<Vec<AdapterInfo>, AdapterError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.root, e)),
        };
        let mut infos = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.root, e))?;
            let file_name = entry.file_name();
            // Staging and removal directories start with '.', which no valid name does.
            let Some(name) = file_name.to_str().filter(|n| validate_name(n).is_ok()) else {
                continue;
            };
            // A directory without our record was not installed by `add`: not ours to list.
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
        check_name(name).is_ok() && self.dir(name).join(INFO_FILE).is_file()
    }

    fn read_info(&self, name: &str) -> Result<Option<AdapterInfo>, AdapterError> {
        let path = self.dir(name).join(INFO_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AdapterError::Corrupt { path, source })
    }

    /// Check the PEFT adapter in `src` against `base` and install it as `name`.
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
        let _held = self.lock()?;
        self.get(name)?;
        let dest = self.dir(name).join("training.json");
        std::fs::copy(record, &dest).map_err(|e| io(&dest, e))?;
        Ok(())
    }

    /// The training record of an adapter trained by domainrag (`None` for uploaded adapters).
    pub fn training_record(&self, name: &str) -> Result<Option<serde_json::Value>, AdapterError> {
        self.get(name)?;
        let path = self.dir(name).join("training.json");
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
        let dest = self.dir(name);
        if dest.exists() && !replace {
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
        let config = parse_peft_config(&config_bytes).map_err(|p| invalid(name, CONFIG_FILE, p))?;

        let weights_path = src.join(WEIGHTS_FILE);
        let header = read_safetensors_header(name, src, &weights_path)?;
        check_weights(&header.json, header.data_len, &config, base)
            .map_err(|p| invalid(name, WEIGHTS_FILE, p))?;
        check_finite(name, &weights_path, &header)?;

        let info = AdapterInfo {
            name: name.to_string(),
            kind: config.kind,
            base_model: base.id.clone(),
            base_sha256: base.sha256.clone(),
            rank: config.rank,
            alpha: config.alpha,
            target_modules: config.target_modules,
            feedforward_modules: config.feedforward_modules,
            virtual_tokens: config.virtual_tokens,
            size_bytes: header.file_len,
            created_at: now_secs(),
            base_model_name_or_path: config.base_model_name_or_path,
        };

        std::fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        let staging = self
            .root
            .join(format!(".adding-{name}-{}", unique_suffix()));
        std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
        let installed = stage(&staging, &config_bytes, &weights_path, &info).and_then(|()| {
            crate::killpoint::reach("adapter.staged");
            let _held = self.lock()?;
            self.place(&staging, &dest, name, replace)
        });
        if installed.is_err() {
            // Best effort: the staging dir is hidden from `list`, and the error that matters is
            // the one being returned.
            let _ = std::fs::remove_dir_all(&staging);
        }
        installed.map(|()| info)
    }

    /// Hold the registry's lock ([`LOCK_FILE`]) until the returned lock is dropped.
    fn lock(&self) -> Result<crate::datadir::FileLock, AdapterError> {
        let path = self.root.with_file_name(LOCK_FILE);
        crate::datadir::FileLock::exclusive(&path).map_err(|e| io(&path, e))
    }

    /// Move the staged adapter to `dest`; with `replace`, the adapter there is swapped for it in
    /// one step where the file system can ([`exchange`]), so a request that reads the adapter
    /// meanwhile finds the old or the new one, never none. The caller holds the lock.
    fn place(
        &self,
        staging: &Path,
        dest: &Path,
        name: &str,
        replace: bool,
    ) -> Result<(), AdapterError> {
        if !dest.exists() {
            return self.move_into_place(staging, dest, name);
        }
        if !replace {
            return Err(AdapterError::AlreadyExists {
                name: name.to_string(),
            });
        }
        if !exchange(staging, dest).map_err(|e| io(dest, e))? {
            return self.replace_by_renames(staging, dest, name);
        }
        sync_dir(&self.root);
        crate::killpoint::reach("adapter.replace.swapped");
        // The staging name now holds the old adapter (a leftover `recover` clears if killed).
        let _ = std::fs::remove_dir_all(staging);
        Ok(())
    }

    /// Replace where directories cannot be exchanged: the adapter at `dest` is moved aside, the
    /// staged one into place, and the old one away (or back, if the move failed).
    fn replace_by_renames(
        &self,
        staging: &Path,
        dest: &Path,
        name: &str,
    ) -> Result<(), AdapterError> {
        let old = self
            .root
            .join(format!(".replacing-{name}-{}", unique_suffix()));
        std::fs::rename(dest, &old).map_err(|e| io(dest, e))?;
        crate::killpoint::reach("adapter.replace.aside");
        let moved = self.move_into_place(staging, dest, name);
        if moved.is_err() {
            // Put the old adapter back: a failed replace must not lose it.
            let _ = std::fs::rename(&old, dest);
        } else {
            crate::killpoint::reach("adapter.replace.placed");
            let _ = std::fs::remove_dir_all(&old);
        }
        moved
    }

    fn move_into_place(&self, staging: &Path, dest: &Path, name: &str) -> Result<(), AdapterError> {
        match std::fs::rename(staging, dest) {
            Ok(()) => {
                sync_dir(&self.root);
                Ok(())
            }
            // A directory of that name made by hand, outside the lock.
            Err(_) if dest.exists() => Err(AdapterError::AlreadyExists {
                name: name.to_string(),
            }),
            Err(e) => Err(io(dest, e)),
        }
    }

    /// Remove an adapter. `used_by` names the collections that still answer with it; when there
    /// are any, nothing is removed.
    pub fn remove(&self, name: &str, used_by: &[String]) -> Result<(), AdapterError> {
        check_name(name)?;
        let dir = self.dir(name);
        let _held = self.lock()?;
        // The directory, not the record, decides: one left without its record must still be
        // removable, or its name could never be used again.
        if !dir.is_dir() {
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
            .root
            .join(format!(".removing-{name}-{}", unique_suffix()));
        std::fs::rename(&dir, &doomed).map_err(|e| io(&dir, e))?;
        sync_dir(&self.root);
        std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))
    }
}

/// Write the adapter's files for `info` into `staging`.
fn stage(
    staging: &Path,
    config_bytes: &[u8],
    weights_src: &Path,
    info: &AdapterInfo,
) -> Result<(), AdapterError> {
    // The bytes that were validated, not a second read of the source.
    let config = staging.join(CONFIG_FILE);
    write_synced(&config, config_bytes).map_err(|e| io(&config, e))?;

    let weights = staging.join(WEIGHTS_FILE);
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

    let record = staging.join(INFO_FILE);
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

/// Swap the directories `a` and `b` in one step (Linux `renameat2` with `RENAME_EXCHANGE`).
/// `Ok(false)` where the platform or file system cannot (nothing was changed then).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that live across the call; no other memory is touched.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if done == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

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

/// A name part that no other staging or removal directory of this or another process has.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::fixture::{
        lora_tensors, tiny_base, write_peft_config, write_safetensors, write_safetensors_raw,
    };
    use super::peft::{TensorPart, parse_peft_config, parse_tensor_name, tensor_name};
    use super::*;
    use sha2::{Digest, Sha256};

    const ALL_MODULES: [&str; 7] = LORA_MODULES;
    const TARGETS: [&str; 2] = ["q_proj", "v_proj"];
    const LAYERS: [usize; 2] = [0, 1];

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

    fn entries(registry: &AdapterRegistry) -> Vec<String> {
        match std::fs::read_dir(registry.root()) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("cannot read the registry: {e}"),
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
            entries(&f.registry).is_empty(),
            "left behind: {:?}",
            entries(&f.registry)
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

        // One plain directory per adapter.
        let dir = f._tmp.path().join("data").join("adapters").join("legal");
        assert_eq!(f.registry.dir("legal"), dir);
        for file in [CONFIG_FILE, WEIGHTS_FILE, INFO_FILE] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        assert_eq!(
            std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
            std::fs::read(f.src.join(WEIGHTS_FILE)).unwrap()
        );
        assert_eq!(entries(&f.registry), vec!["legal"]);

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
        let bad = tensor_name(1, "q_proj", TensorPart::A);
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
        let bad = tensor_name(0, "v_proj", TensorPart::B);
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
        let missing = tensor_name(1, "v_proj", TensorPart::B);
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

    /// An (IA)³ fixture on the tiny base: k/v output-scaled, down_proj input-scaled.
    fn ia3_fixture() -> Fixture {
        let f = fixture();
        std::fs::remove_dir_all(&f.src).unwrap();
        write_test_ia3_adapter(
            &f.src,
            &f.base,
            &["k_proj", "v_proj", "down_proj"],
            &["down_proj"],
            &LAYERS,
            |i| 1.0 + i as f32,
        )
        .unwrap();
        f
    }

    #[test]
    fn an_ia3_adapter_is_registered_with_its_kind_and_feedforward_modules() {
        let f = ia3_fixture();
        let info = f.registry.add("legal-ia3", &f.src, &f.base).unwrap();
        assert_eq!(info.kind, AdapterKind::Ia3);
        assert_eq!(info.target_modules, ["k_proj", "v_proj", "down_proj"]);
        assert_eq!(info.feedforward_modules, ["down_proj"]);
        assert_eq!((info.rank, info.alpha), (0, 0.0));
        assert_eq!(f.registry.get("legal-ia3").unwrap(), info);
        // A record written before adapters had kinds reads as LoRA.
        let mut old = serde_json::to_value(&info).unwrap();
        old.as_object_mut().unwrap().remove("kind");
        let old: AdapterInfo = serde_json::from_value(old).unwrap();
        assert_eq!(old.kind, AdapterKind::Lora);
    }

    #[test]
    fn ia3_vectors_must_match_what_they_scale() {
        let f = ia3_fixture();
        // down_proj is input-scaled: a column over its outputs is the wrong vector.
        let mut tensors = Vec::new();
        for &layer in &LAYERS {
            tensors.push((tensor_name(layer, "k_proj", TensorPart::Ia3), vec![12, 1]));
            tensors.push((tensor_name(layer, "v_proj", TensorPart::Ia3), vec![12, 1]));
            tensors.push((
                tensor_name(layer, "down_proj", TensorPart::Ia3),
                vec![16, 1],
            ));
        }
        rewrite_weights(&f, &tensors);
        assert_invalid(&refused(&f), WEIGHTS_FILE, "expected [1, 24] for down_proj");
        // LoRA weights in an (IA)³ adapter.
        let mut tensors = lora_tensors(&f.base, 4, &["k_proj"], &LAYERS).unwrap();
        tensors.truncate(1);
        rewrite_weights(&f, &tensors);
        assert_invalid(&refused(&f), WEIGHTS_FILE, "only (IA)³ weights named");
        // A layer without its vectors.
        let one_layer: Vec<_> = ["k_proj", "v_proj"]
            .iter()
            .map(|m| (tensor_name(0, m, TensorPart::Ia3), vec![12, 1]))
            .chain([(tensor_name(0, "down_proj", TensorPart::Ia3), vec![1, 24])])
            .collect();
        rewrite_weights(&f, &one_layer);
        assert_invalid(
            &refused(&f),
            WEIGHTS_FILE,
            "no (IA)³ weights for k_proj of layer 1",
        );
    }

    #[test]
    fn ia3_config_rules() {
        let parse = |json: &str| parse_peft_config(json.as_bytes());
        let ok = parse(
            r#"{"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                "feedforward_modules": ["down_proj"]}"#,
        )
        .unwrap();
        assert_eq!(ok.kind, AdapterKind::Ia3);
        assert_eq!(ok.feedforward_modules, ["down_proj"]);
        let none = parse(r#"{"peft_type": "IA3", "target_modules": ["k_proj"]}"#).unwrap();
        assert!(none.feedforward_modules.is_empty());
        for (json, needle) in [
            (
                r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}"#,
                "not in target_modules",
            ),
            (
                r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "fan_in_fan_out": true}"#,
                "fan_in_fan_out",
            ),
            (
                r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": "down_proj"}"#,
                "must be a list",
            ),
            (r#"{"peft_type": "IA3"}"#, "target_modules"),
            (
                r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 8}"#,
                "\"LORA\", \"IA3\", \"PROMPT_TUNING\" and \"PREFIX_TUNING\" adapters",
            ),
        ] {
            let err = parse(json).expect_err(json);
            assert!(err.contains(needle), "{json}: {err}");
        }
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
    fn refuses_a_nan_or_infinite_weight_and_keeps_the_adapter_it_would_replace() {
        for (bad, label) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
            let f = fixture();
            let tensors = lora_tensors(&f.base, 4, &TARGETS, &LAYERS).unwrap();
            let (last, _) = tensors.last().unwrap().clone();
            // Finite everywhere but one element of the last tensor in the file.
            let elements: Vec<usize> = tensors.iter().map(|(_, s)| s.iter().product()).collect();
            let before: usize = elements[..elements.len() - 1].iter().sum();
            let counter = std::cell::Cell::new(0usize);
            write_safetensors(&f.src.join(WEIGHTS_FILE), &tensors, &|_| {
                let at = counter.get();
                counter.set(at + 1);
                if at == before + 3 { bad } else { 0.5 }
            })
            .unwrap();
            let err = refused(&f);
            assert_invalid(
                &err,
                WEIGHTS_FILE,
                &format!("{last} holds a NaN or infinite value (element 3)"),
            );

            // A replacement that is refused leaves the registered adapter as it was.
            let good = f.src.with_file_name("good");
            write_test_adapter(&good, &f.base, 4, 8.0, &TARGETS, &LAYERS, |_| 0.0).unwrap();
            let kept = f.registry.add("legal", &good, &f.base).unwrap();
            let err = f.registry.replace("legal", &f.src, &f.base).unwrap_err();
            assert!(
                err.to_string().contains("NaN or infinite"),
                "{label}: {err}"
            );
            assert_eq!(f.registry.list().unwrap(), vec![kept], "{label}");
        }
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
        let name = tensor_name(0, "q_proj", TensorPart::A);
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
        let aside = f.registry.root.join(".replacing-support-999999999-1-0");
        std::fs::rename(f.registry.dir("support"), &aside).unwrap();
        let staged = f.registry.root.join(".adding-support-999999999-2-0");
        std::fs::create_dir_all(&staged).unwrap();
        assert!(f.registry.get("support").is_err());

        assert_eq!(f.registry.recover(), ["support"]);
        assert!(f.registry.get("support").is_ok());
        assert!(!aside.exists() && !staged.exists());
        // A live process's work is left alone.
        let mine = f
            .registry
            .root
            .join(format!(".adding-x-{}-1-0", std::process::id()));
        std::fs::create_dir_all(&mine).unwrap();
        assert!(f.registry.recover().is_empty());
        assert!(mine.exists());
    }

    /// Eight threads at once, each with a registry of its own (as `serve` and `train` have),
    /// doing `op` on the fixture's adapter; their results.
    fn at_once(
        f: &Fixture,
        op: fn(&AdapterRegistry, &Path, &BaseModelInfo) -> Result<AdapterInfo, AdapterError>,
    ) -> Vec<Result<AdapterInfo, AdapterError>> {
        let data_dir = f.registry.root.parent().unwrap();
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let registry = AdapterRegistry::new(data_dir);
                        barrier.wait();
                        op(&registry, &f.src, &f.base)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    #[test]
    fn replaces_of_one_name_at_once_all_succeed_and_it_never_goes_missing() {
        let f = fixture();
        f.registry.add("legal", &f.src, &f.base).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let missing = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut missing = 0;
                while !done.load(Ordering::Relaxed) {
                    missing += usize::from(f.registry.get("legal").is_err());
                }
                missing
            });
            for _round in 0..20 {
                for result in at_once(&f, |r, src, base| r.replace("legal", src, base)) {
                    assert!(result.is_ok(), "{result:?}");
                }
                assert_eq!(entries(&f.registry), vec!["legal"]);
            }
            done.store(true, Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert_eq!(
            missing, 0,
            "reads that found no adapter during the replaces"
        );
    }

    #[test]
    fn a_replace_without_exchange_moves_the_old_adapter_away() {
        let f = fixture();
        f.registry.add("legal", &f.src, &f.base).unwrap();
        let before = std::fs::read(f.registry.dir("legal").join(INFO_FILE)).unwrap();
        let staging = f.registry.root.join(".adding-legal-1-0-0");
        std::fs::create_dir(&staging).unwrap();
        let info = f.registry.get("legal").unwrap();
        let info = AdapterInfo {
            created_at: info.created_at + 1,
            ..info
        };
        stage(
            &staging,
            &std::fs::read(f.src.join(CONFIG_FILE)).unwrap(),
            &f.src.join(WEIGHTS_FILE),
            &info,
        )
        .unwrap();
        let _held = f.registry.lock().unwrap();
        f.registry
            .replace_by_renames(&staging, &f.registry.dir("legal"), "legal")
            .unwrap();
        assert_ne!(
            std::fs::read(f.registry.dir("legal").join(INFO_FILE)).unwrap(),
            before
        );
        assert_eq!(f.registry.get("legal").unwrap(), info);
        assert_eq!(entries(&f.registry), vec!["legal"]);
    }

    #[test]
    fn adds_of_one_name_at_once_install_it_once() {
        let f = fixture();
        for _round in 0..20 {
            let results = at_once(&f, |r, src, base| r.add("legal", src, base));
            assert_eq!(
                results.iter().filter(|r| r.is_ok()).count(),
                1,
                "{results:?}"
            );
            for result in results.iter().filter(|r| r.is_err()) {
                assert!(
                    matches!(result, Err(AdapterError::AlreadyExists { .. })),
                    "{result:?}"
                );
            }
            assert_eq!(entries(&f.registry), vec!["legal"]);
            f.registry.remove("legal", &[]).unwrap();
        }
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
        assert!(entries(&f.registry).is_empty());
        // "../x" would have been <data_dir>/x.
        assert!(!f._tmp.path().join("data").join("x").exists());
    }

    #[test]
    fn refuses_duplicate_name() {
        let f = fixture();
        let first = f.registry.add("legal", &f.src, &f.base).unwrap();
        let err = f.registry.add("legal", &f.src, &f.base).unwrap_err();
        assert!(matches!(err, AdapterError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(f.registry.list().unwrap(), vec![first]);
        assert_eq!(entries(&f.registry), vec!["legal"]);
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
        assert!(entries(&f.registry).is_empty());
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
                r#"{"peft_type": "MULTITASK_PROMPT_TUNING", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
                "MULTITASK_PROMPT_TUNING",
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
        let name = tensor_name(12, "gate_proj", TensorPart::B);
        assert_eq!(
            name,
            "base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight"
        );
        assert_eq!(
            parse_tensor_name(&name),
            Some((12, "gate_proj", TensorPart::B))
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
        let entry = &header[tensor_name(0, "q_proj", TensorPart::B)];
        assert_eq!(entry["shape"], serde_json::json!([24, 2]));
        let begin = entry["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
        let values: Vec<f32> = bytes[begin..begin + 12]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [0.0, 0.5, 1.0]);
    }
}
