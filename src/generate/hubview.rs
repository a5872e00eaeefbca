//! The hub cache mistral.rs reads adapters from. mistral.rs 0.8.1 resolves a LoRA adapter id only
//! through the Hugging Face hub cache that `HF_HUB_CACHE` names (a directory path is not
//! accepted), while the registry keeps each adapter in a plain directory
//! (`<data_dir>/adapters/<name>/`). Before the mistral.rs engine loads an adapter, [`link`] lays
//! out a hub-cache repo for it whose snapshot is a symbolic link to that directory:
//!
//! ```text
//! $HF_HUB_CACHE/models--<owner>--<name>/refs/main            ("local")
//! $HF_HUB_CACHE/models--<owner>--<name>/snapshots/local  ->  <data_dir>/adapters/<name>
//! ```
//!
//! `<owner>` is derived from the registry's path, so registries of two data dirs in one process
//! (tests) never share a repo. The binary points `HF_HUB_CACHE` at [`hub_cache_dir`] of its data
//! dir; nothing there but links, rebuilt as needed, and nothing on the native engine's path.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::GenerateError;
use crate::adapters::AdapterRegistry;

/// The environment variable hf-hub reads the cache's location from, set once per process.
pub const HUB_CACHE_VAR: &str = "HF_HUB_CACHE";
/// The one revision of every linked adapter; `refs/main` names it.
const REVISION: &str = "local";

/// The hub cache the binary points mistral.rs at (`HF_HUB_CACHE`) for `data_dir`.
pub fn hub_cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("mistralrs-hub")
}

/// Make adapter `name` of `registry` loadable by mistral.rs: its repo in the hub cache, the
/// snapshot linked to the adapter's directory (replaced atomically, so a retrained adapter is
/// what the next build reads). Returns the id mistral.rs loads it by.
pub(super) fn link(registry: &AdapterRegistry, name: &str) -> Result<String, GenerateError> {
    let failed = |message: String| GenerateError::Load {
        what: format!("adapter {name}"),
        message,
    };
    let cache = std::env::var_os(HUB_CACHE_VAR)
        .map(PathBuf::from)
        .ok_or_else(|| {
            failed(format!(
                "{HUB_CACHE_VAR} is not set: mistral.rs reads adapters only from a hub cache"
            ))
        })?;
    let target = std::fs::canonicalize(registry.dir(name))
        .map_err(|e| failed(format!("{}: {e}", registry.dir(name).display())))?;
    let owner = owner(registry.root());
    let repo = cache.join(format!("models--{owner}--{name}"));
    let snapshots = repo.join("snapshots");
    let io = |path: &Path, e: std::io::Error| failed(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&snapshots).map_err(|e| io(&snapshots, e))?;
    std::fs::create_dir_all(repo.join("refs")).map_err(|e| io(&repo, e))?;
    // hf-hub reads the ref verbatim (no trimming), so no trailing newline.
    let main_ref = repo.join("refs").join("main");
    std::fs::write(&main_ref, REVISION).map_err(|e| io(&main_ref, e))?;
    let staged = snapshots.join(format!(".link-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&target, &staged).map_err(|e| io(&staged, e))?;
    let snapshot = snapshots.join(REVISION);
    std::fs::rename(&staged, &snapshot).map_err(|e| io(&snapshot, e))?;
    Ok(format!("{owner}/{name}"))
}

/// The hub "owner" of a registry's adapters: `domainrag-` and a hash of its path.
fn owner(root: &Path) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::canonicalize(root)
        .unwrap_or_else(|_| root.to_path_buf())
        .hash(&mut hasher);
    format!("domainrag-{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_an_adapter_directory_as_a_hub_repo() {
        let tmp = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::new(&tmp.path().join("data"));
        let dir = registry.dir("legal");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        // The variable is process-wide; only this test in the unit-test binary sets it.
        let cache = tmp.path().join("hub");
        // SAFETY: no other unit test reads or writes HF_HUB_CACHE.
        unsafe { std::env::set_var(HUB_CACHE_VAR, &cache) };
        let id = link(&registry, "legal").unwrap();
        let (owner, name) = id.split_once('/').unwrap();
        assert_eq!(name, "legal");
        let repo = cache.join(format!("models--{owner}--legal"));
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            "local"
        );
        let file = repo.join("snapshots/local/adapter_config.json");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "{}");
        // Linking again (a retrained adapter) replaces the link; another registry, another owner.
        assert_eq!(link(&registry, "legal").unwrap(), id);
        let other = AdapterRegistry::new(&tmp.path().join("other"));
        assert_ne!(owner, super::owner(other.root()));
    }
}
