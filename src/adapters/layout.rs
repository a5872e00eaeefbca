//! The registry's layout across versions. Before 2026-12 every adapter lived in a Hugging Face
//! hub-cache repo, the layout mistral.rs 0.8.1 reads:
//!
//! ```text
//! <data_dir>/adapters/hub/models--domainrag--<name>/refs/main          ("local")
//! <data_dir>/adapters/hub/models--domainrag--<name>/snapshots/local/   (the adapter's files)
//! ```
//!
//! Now each adapter has a plain `<data_dir>/adapters/<name>/`, and only the mistral.rs engine sees
//! a hub cache (links that `generate::hubview` makes). [`move_from_hub_layout`] moves an old
//! registry into the new layout when the registry is opened: the old `hub/` is first renamed to a
//! hidden `.hub-moving/` (so an adapter named `hub` can exist afterwards), then each adapter's
//! directory is renamed out of it, then it is removed. Every step is a rename, so a process killed
//! half-way loses nothing: the next open goes on from `.hub-moving/`. Two processes opening the
//! registry at once race harmlessly (a rename that finds its source gone was done by the other).

use std::path::Path;

use super::{INFO_FILE, parse_work_dir, sync_dir};
use crate::collection::validate_name;

/// The old layout's hub cache, under the registry's root.
const OLD_HUB: &str = "hub";
/// Where the old hub cache is while its adapters are moved out.
const MOVING: &str = ".hub-moving";
/// The old repo directory of adapter `<name>`: `models--domainrag--<name>`.
const OLD_REPO_PREFIX: &str = "models--domainrag--";

/// Move the adapters of an old hub-cache registry under `root` into plain directories. Nothing to
/// do (two `stat`s) once moved. Failures are logged, never fatal: what could not be moved stays
/// in `.hub-moving/` and is tried again at the next open.
pub(super) fn move_from_hub_layout(root: &Path) {
    let old = root.join(OLD_HUB);
    let moving = root.join(MOVING);
    // An adapter named "hub" in the new layout has its record; the old hub cache never does.
    if old.is_dir() && !old.join(INFO_FILE).exists() {
        if let Err(e) = std::fs::rename(&old, &moving)
            && !moving.is_dir()
        {
            tracing::warn!(path = %old.display(), error = %e, "cannot move the adapter registry out of its old layout");
            return;
        }
        sync_dir(root);
    }
    if !moving.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(&moving) else {
        return;
    };
    let mut entries: Vec<(String, std::path::PathBuf)> = entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    // Registered adapters first; then an old adapter a killed replace had moved aside, where no
    // adapter of its name is registered (what the old `recover` would have put back).
    entries.sort_by_key(|(file_name, _)| file_name.starts_with('.'));
    let mut left = 0;
    for (file_name, path) in &entries {
        let name = match file_name.strip_prefix(OLD_REPO_PREFIX) {
            Some(name) => name,
            None => match parse_work_dir(file_name) {
                Some(("replacing", name, _)) => name,
                _ => continue,
            },
        };
        if validate_name(name).is_err() {
            continue;
        }
        let files = path.join("snapshots").join("local");
        let dest = root.join(name);
        if !files.join(INFO_FILE).is_file() || dest.exists() {
            continue;
        }
        match std::fs::rename(&files, &dest) {
            Ok(()) => tracing::info!(
                adapter = name,
                "adapter moved out of the old hub-cache layout"
            ),
            Err(_) if !files.exists() => {} // another process moved it
            Err(e) => {
                tracing::warn!(adapter = name, error = %e, "cannot move the adapter out of the old hub-cache layout");
                left += 1;
            }
        }
    }
    sync_dir(root);
    if left > 0 {
        tracing::warn!(path = %moving.display(), left, "adapters left in the old layout; tried again at the next start");
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(&moving)
        && moving.exists()
    {
        tracing::warn!(path = %moving.display(), error = %e, "cannot remove the emptied old adapter layout");
    }
    sync_dir(root);
}

#[cfg(test)]
mod tests {
    use super::super::fixture::tiny_base;
    use super::super::{AdapterRegistry, write_test_adapter};
    use super::*;

    /// Turn registered adapter `name` into what the old layout kept, under `<hub>/<entry>`.
    fn to_old_layout(registry: &AdapterRegistry, name: &str, hub: &str, entry: &str) {
        // Aside first: the adapter named "hub" becomes part of the old hub dir.
        let aside = registry.root().join(format!(".old-{name}"));
        std::fs::rename(registry.dir(name), &aside).unwrap();
        let repo = registry.root().join(hub).join(entry);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "local").unwrap();
        std::fs::create_dir_all(repo.join("snapshots")).unwrap();
        std::fs::rename(aside, repo.join("snapshots").join("local")).unwrap();
    }

    #[test]
    fn an_old_hub_cache_registry_is_moved_into_plain_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let base = tiny_base();
        let src = tmp.path().join("src");
        write_test_adapter(&src, &base, 4, 8.0, &["q_proj"], &[0, 1], |_| 0.0).unwrap();
        let registry = AdapterRegistry::new(&data);
        for name in ["legal", "support", "hub"] {
            registry.add(name, &src, &base).unwrap();
        }
        let before = registry.list().unwrap();
        // Old layout ("hub" first: until then its directory is the adapter's): "hub" and "legal"
        // registered, "support" moved aside by a killed replace,
        // plus staging leftovers.
        to_old_layout(&registry, "hub", OLD_HUB, "models--domainrag--hub");
        to_old_layout(&registry, "legal", OLD_HUB, "models--domainrag--legal");
        to_old_layout(
            &registry,
            "support",
            OLD_HUB,
            ".replacing-support-999999999-1-0",
        );
        std::fs::create_dir_all(registry.root().join("hub").join(".adding-x-999999999-1-0"))
            .unwrap();
        assert!(registry.list().unwrap().is_empty());

        let reopened = AdapterRegistry::new(&data);
        assert_eq!(reopened.list().unwrap(), before);
        let mut left: Vec<String> = std::fs::read_dir(reopened.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["hub", "legal", "support"]);

        // A kill right after the first rename: the next open goes on from there.
        to_old_layout(&registry, "legal", MOVING, "models--domainrag--legal");
        assert_eq!(registry.list().unwrap().len(), 2);
        // The adapter named "hub" is not taken for an old layout at the next open.
        assert_eq!(AdapterRegistry::new(&data).list().unwrap(), before);
    }
}
