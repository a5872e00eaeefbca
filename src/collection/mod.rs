//! Collections: named knowledge bases, each a directory under `<data_dir>/collections/<name>/` with
//! its settings (`collection.json`: embedding model, chunking, fusion, adapter), its document ledger
//! (`documents.json`: which documents are stored, their content hash and chunk count), its BM25
//! index (`bm25/`), with the embedded backend its vectors (`vectors/`), and while a write is
//! changing documents across those stores, its record (`pending.json`, see [`pending`]).
//!
//! Owns creating, listing, opening, updating and deleting collections and the atomic writes of their
//! JSON files. Searching and ingesting live in `retrieve` and `ingest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::{Bm25Config, ChunkingConfig, FusionConfig, SearchSettings, Settings};
use crate::error::ErrorKind;
use crate::index::{Bm25Index, IndexError};
use crate::killpoint;
use crate::vectors::{self, VectorError, VectorStore};

mod pending;
mod write;

const SETTINGS_FILE: &str = "collection.json";
const LEDGER_FILE: &str = "documents.json";

/// Errors about collections.
#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    #[error(
        "invalid collection name {name:?}: use 1-64 characters from a-z, 0-9, '-' and '_', \
         starting with a letter or digit"
    )]
    InvalidName { name: String },
    #[error("collection {name:?} does not exist (see `domainrag collection list`)")]
    NotFound { name: String },
    #[error("collection {name:?} already exists")]
    AlreadyExists { name: String },
    #[error("invalid setting for collection {name:?}: `{key}` {problem}")]
    InvalidSetting {
        name: String,
        key: &'static str,
        problem: String,
    },
    #[error(
        "collection {name:?} was built with {expected}-dimensional embeddings ({model}), the \
         configured embedding model gives {got}"
    )]
    EmbeddingMismatch {
        name: String,
        model: String,
        expected: usize,
        got: usize,
    },
    #[error("collection {name:?}: cannot read or write {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("collection {name:?}: {path} is corrupt: {source}")]
    Corrupt {
        name: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "collection {name:?} has a write that failed and could not be rolled back; it is \
         repaired when the collection is next opened (restart the server or rerun the command)"
    )]
    Unrepaired { name: String },
    #[error(
        "collection {name:?} already holds documents; chunking applies at ingest, so create a new \
         collection to change it"
    )]
    ChunkingFixed { name: String },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Vectors(#[from] VectorError),
    #[error("collection task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl CollectionError {
    /// Whether the collection's own files are unreadable (settings or ledger that do not parse,
    /// vectors of another model), as opposed to a busy lock or a missing collection: such a
    /// collection is listed as damaged and may be deleted without opening it.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            CollectionError::Corrupt { .. } | CollectionError::EmbeddingMismatch { .. }
        )
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectionError::InvalidName { .. } | CollectionError::InvalidSetting { .. } => {
                ErrorKind::InvalidInput
            }
            CollectionError::NotFound { .. } => ErrorKind::NotFound,
            CollectionError::AlreadyExists { .. } => ErrorKind::Conflict,
            CollectionError::EmbeddingMismatch { .. } | CollectionError::ChunkingFixed { .. } => {
                ErrorKind::Conflict
            }
            CollectionError::Unrepaired { .. } => ErrorKind::Unavailable,
            CollectionError::Index(e) => e.kind(),
            CollectionError::Vectors(e) => e.kind(),
            CollectionError::Io { .. }
            | CollectionError::Corrupt { .. }
            | CollectionError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// A collection's own settings, persisted in `collection.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionSettings {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The embedding model the vectors were made with (its directory name) and their size.
    pub embedding_model: String,
    pub dimension: usize,
    pub chunking: ChunkingConfig,
    /// Absent in collections created before BM25 had settings: they keep what they were searched
    /// with ([`Bm25Config::BEFORE_SETTINGS`]).
    #[serde(default)]
    pub bm25: Bm25Config,
    pub fusion: FusionConfig,
    /// The LoRA adapter answering for this collection, if any.
    #[serde(default)]
    pub adapter: Option<String>,
}

impl CollectionSettings {
    /// Checks chunking and fusion, naming the key.
    pub fn validate(&self) -> Result<(), CollectionError> {
        let invalid = |(key, problem)| CollectionError::InvalidSetting {
            name: self.name.clone(),
            key,
            problem,
        };
        self.chunking.validate().map_err(invalid)?;
        self.fusion.validate().map_err(invalid)?;
        self.bm25.validate().map_err(invalid)?;
        Ok(())
    }

    /// What a search of this collection is scored with.
    pub fn search(&self) -> SearchSettings {
        SearchSettings {
            bm25: self.bm25,
            fusion: self.fusion,
        }
    }
}

/// What the ledger knows of one stored document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentEntry {
    pub title: String,
    pub source: String,
    /// sha256 of the document's text and title; unchanged documents are skipped on re-ingest.
    pub content_hash: String,
    pub chunks: usize,
    pub ingested_at: u64,
}

/// Document id -> entry.
pub type Ledger = BTreeMap<String, DocumentEntry>;

/// Checks a collection name: it becomes a directory name and a Qdrant collection name.
pub fn validate_name(name: &str) -> Result<(), CollectionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(CollectionError::InvalidName {
            name: name.to_string(),
        })
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Directories of collections being deleted start with this (not a valid collection name).
const DELETED_PREFIX: &str = ".deleted-";

/// Write `bytes` to `path` atomically (temp file + rename), so a crash never leaves half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The set of collections in one data dir.
#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
    settings: Settings,
}

impl Catalog {
    pub fn new(settings: &Settings) -> Catalog {
        Catalog {
            root: settings.paths.data_dir.join("collections"),
            settings: settings.clone(),
        }
    }

    /// The data dir this catalog lives in.
    pub fn data_dir(&self) -> &Path {
        &self.settings.paths.data_dir
    }

    pub fn dir_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn io_err(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CollectionError {
        let (name, path) = (name.to_string(), path.to_path_buf());
        move |source| CollectionError::Io { name, path, source }
    }

    /// Names of all collections, sorted.
    pub fn list(&self) -> Result<Vec<String>, CollectionError> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(Self::io_err("*", &self.root)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(Self::io_err("*", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Not a collection: what a killed delete left (`.deleted-*`), anything else hidden.
            if validate_name(&name).is_ok() && entry.path().join(SETTINGS_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Read a collection's settings.
    pub fn settings(&self, name: &str) -> Result<CollectionSettings, CollectionError> {
        validate_name(name)?;
        let path = self.dir_of(name).join(SETTINGS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CollectionError::NotFound {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(Self::io_err(name, &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| CollectionError::Corrupt {
            name: name.to_string(),
            path,
            source,
        })
    }

    /// Persist changed settings of an existing collection (after validating them).
    pub fn save_settings(&self, settings: &CollectionSettings) -> Result<(), CollectionError> {
        settings.validate()?;
        let dir = self.dir_of(&settings.name);
        if !dir.join(SETTINGS_FILE).is_file() {
            return Err(CollectionError::NotFound {
                name: settings.name.clone(),
            });
        }
        let path = dir.join(SETTINGS_FILE);
        let bytes = serde_json::to_vec_pretty(settings).expect("settings serialise to JSON");
        write_atomic(&path, &bytes).map_err(Self::io_err(&settings.name, &path))
    }

    /// New settings for `name` from the configured defaults.
    pub fn default_settings(&self, name: &str) -> CollectionSettings {
        let model = self
            .settings
            .embedding
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.settings.embedding.model_dir.display().to_string());
        CollectionSettings {
            name: name.to_string(),
            created_at: now_secs(),
            embedding_model: model,
            dimension: self.settings.embedding.dimension,
            chunking: self.settings.collection_defaults.chunking,
            bm25: self.settings.collection_defaults.bm25,
            fusion: self.settings.collection_defaults.fusion,
            adapter: None,
        }
    }

    /// Create a collection with `settings` (its name included). Creates its indexes too, so a
    /// broken backend is reported now rather than at first ingest.
    pub async fn create(&self, settings: CollectionSettings) -> Result<(), CollectionError> {
        validate_name(&settings.name)?;
        settings.validate()?;
        let dir = self.dir_of(&settings.name);
        if dir.join(SETTINGS_FILE).exists() {
            return Err(CollectionError::AlreadyExists {
                name: settings.name.clone(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(Self::io_err(&settings.name, &dir))?;
        let path = dir.join(SETTINGS_FILE);
        let bytes = serde_json::to_vec_pretty(&settings).expect("settings serialise to JSON");
        write_atomic(&path, &bytes).map_err(Self::io_err(&settings.name, &path))?;
        killpoint::reach("collection.create.settings");
        let collection = self.open(&settings.name).await?;
        collection.close().await
    }

    /// Open a collection's indexes.
    pub async fn open(&self, name: &str) -> Result<Arc<Collection>, CollectionError> {
        let settings = self.settings(name)?;
        if settings.dimension != self.settings.embedding.dimension {
            return Err(CollectionError::EmbeddingMismatch {
                name: name.to_string(),
                model: settings.embedding_model.clone(),
                expected: settings.dimension,
                got: self.settings.embedding.dimension,
            });
        }
        let dir = self.dir_of(name);
        let heap = self.settings.ingest.writer_heap_mb;
        let bm25_dir = dir.join("bm25");
        let index = tokio::task::spawn_blocking(move || Bm25Index::open_or_create(&bm25_dir, heap))
            .await??;
        let vectors = vectors::open(&self.settings.vectors, name, &dir, settings.dimension).await?;
        let ledger_path = dir.join(LEDGER_FILE);
        let ledger = match std::fs::read(&ledger_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| CollectionError::Corrupt {
                    name: name.to_string(),
                    path: ledger_path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::new(),
            Err(e) => return Err(Self::io_err(name, &ledger_path)(e)),
        };
        let collection = Arc::new(Collection {
            name: settings.name.clone(),
            settings: std::sync::RwLock::new(settings),
            dir,
            index: Arc::new(index),
            vectors,
            ledger: Mutex::new(ledger),
        });
        pending::repair(&collection).await?;
        sweep_staged_uploads(&collection.dir);
        Ok(collection)
    }

    /// Delete a collection and everything stored in it.
    pub async fn delete(&self, name: &str) -> Result<(), CollectionError> {
        self.delete_opened(name, self.open(name).await).await
    }

    /// Delete a collection given the outcome of opening it: through its open handle, or, when it
    /// is damaged (see [`CollectionError::is_damage`]), without one. Any other failure to open it
    /// (not found, busy) is the answer.
    pub async fn delete_opened(
        &self,
        name: &str,
        opened: Result<Arc<Collection>, CollectionError>,
    ) -> Result<(), CollectionError> {
        match opened {
            Ok(collection) => self.delete_open(collection).await,
            Err(e) if e.is_damage() => {
                tracing::warn!(collection = %name, error = %e, "deleting a damaged collection");
                self.delete_unopened(name)
            }
            Err(e) => Err(e),
        }
    }

    /// Delete a collection through a handle that is already open (a server keeps one per
    /// collection; the embedded vector store cannot be opened twice).
    ///
    /// One rename takes the whole directory out of the catalog first, so a kill at any later point
    /// leaves no collection at all (the `.deleted-*` directory is removed at the next start, see
    /// [`Catalog::sweep_deleted`]): never one with its vectors gone and its documents kept, and
    /// never old data under the name for a new collection to find.
    async fn delete_open(&self, collection: Arc<Collection>) -> Result<(), CollectionError> {
        let name = collection.name().to_string();
        collection.index.close_writer()?;
        // The embedded store flushes and closes its files where they are, before the rename
        // moves them (flushing after it failed on the old path).
        if let Err(e) = collection.vectors.close().await {
            // Its files are being deleted: a store that cannot flush (a full disk) must not keep
            // the collection from going.
            tracing::warn!(collection = %name, error = %e, "the vector store could not be flushed before the delete");
        }
        killpoint::reach("collection.delete.closed");
        let trash = self.retire(&name)?;
        killpoint::reach("collection.delete.retired");
        // Embedded store: its files moved with the directory; a remote one is dropped on the server.
        if let Err(e) = collection.vectors.drop_store().await {
            tracing::error!(collection = %name, error = %e, "collection deleted, but its vector store could not be dropped");
        }
        drop(collection);
        std::fs::remove_dir_all(&trash).map_err(Self::io_err(&name, &trash))
    }

    /// Delete a collection that cannot be opened (damaged settings, ledger or index): its
    /// directory goes; a remote vector store of it, if any, is left for the operator.
    fn delete_unopened(&self, name: &str) -> Result<(), CollectionError> {
        validate_name(name)?;
        if !self.dir_of(name).join(SETTINGS_FILE).exists() {
            return Err(CollectionError::NotFound {
                name: name.to_string(),
            });
        }
        let trash = self.retire(name)?;
        std::fs::remove_dir_all(&trash).map_err(Self::io_err(name, &trash))
    }

    /// Rename the collection's directory out of the catalog; returns where it went.
    fn retire(&self, name: &str) -> Result<PathBuf, CollectionError> {
        let dir = self.dir_of(name);
        let trash = self.root.join(format!(
            "{DELETED_PREFIX}{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::rename(&dir, &trash).map_err(Self::io_err(name, &dir))?;
        Ok(trash)
    }

    /// Remove what deletes interrupted by a crash left behind (called at start, before any
    /// collection is opened).
    pub fn sweep_deleted(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(DELETED_PREFIX)
            {
                let path = entry.path();
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a deleted collection's leftovers");
                }
            }
        }
    }
}

/// Remove upload staging files (`uploads/.<name>.<uuid>.part`) that a killed process left: the
/// collection is opened before anything can upload into it, so none of them is in use.
fn sweep_staged_uploads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("uploads")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".part") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// An open collection: settings, BM25 index, vector store and document ledger.
#[derive(Debug)]
pub struct Collection {
    /// Changeable while open (adapter, fusion) through [`Collection::update_settings`].
    settings: std::sync::RwLock<CollectionSettings>,
    name: String,
    pub dir: PathBuf,
    pub index: Arc<Bm25Index>,
    pub vectors: Arc<dyn VectorStore>,
    ledger: Mutex<Ledger>,
}

/// Counts shown by `collection list` / `show`.
#[derive(Debug, Clone, Serialize)]
pub struct CollectionStats {
    pub documents: usize,
    pub chunks: usize,
    pub vectors: usize,
}

impl Collection {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of the current settings.
    pub fn settings(&self) -> CollectionSettings {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Validate, persist and apply new settings. The name cannot change, and chunking only while
    /// the collection holds no documents (it applies at ingest: changing it later would leave the
    /// stored chunks cut one way and new ones another).
    pub fn update_settings(
        &self,
        catalog: &Catalog,
        change: impl FnOnce(&mut CollectionSettings),
    ) -> Result<CollectionSettings, CollectionError> {
        self.update_settings_checked(catalog, change, |_| Ok(()))
    }

    /// [`Collection::update_settings`], refused when `check` refuses the changed settings; the
    /// change, the check and the write happen under one lock, so concurrent changes never undo
    /// each other.
    pub fn update_settings_checked<E: From<CollectionError>>(
        &self,
        catalog: &Catalog,
        change: impl FnOnce(&mut CollectionSettings),
        check: impl FnOnce(&CollectionSettings) -> Result<(), E>,
    ) -> Result<CollectionSettings, E> {
        let mut guard = self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = guard.clone();
        change(&mut next);
        next.name = self.name.clone();
        if next.chunking != guard.chunking && self.document_count() > 0 {
            return Err(CollectionError::ChunkingFixed {
                name: self.name.clone(),
            }
            .into());
        }
        check(&next)?;
        catalog.save_settings(&next)?;
        *guard = next.clone();
        Ok(next)
    }

    /// How many documents are stored.
    pub fn document_count(&self) -> usize {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether document `doc_id` is stored.
    pub fn has_document(&self, doc_id: &str) -> bool {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(doc_id)
    }

    /// A copy of the ledger.
    pub fn ledger(&self) -> Ledger {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Record documents as stored (or removed, with `None`) and persist the ledger.
    fn update_ledger(
        &self,
        changes: Vec<(String, Option<DocumentEntry>)>,
    ) -> Result<(), CollectionError> {
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (doc_id, entry) in changes {
            match entry {
                Some(entry) => ledger.insert(doc_id, entry),
                None => ledger.remove(&doc_id),
            };
        }
        let path = self.dir.join(LEDGER_FILE);
        let bytes = serde_json::to_vec(&*ledger).expect("ledger serialises to JSON");
        write_atomic(&path, &bytes).map_err(Catalog::io_err(self.name(), &path))
    }

    pub async fn stats(&self) -> Result<CollectionStats, CollectionError> {
        let index = Arc::clone(&self.index);
        let chunks = tokio::task::spawn_blocking(move || index.num_chunks()).await??;
        let documents = self.document_count();
        Ok(CollectionStats {
            documents,
            chunks,
            vectors: self.vectors.count().await?,
        })
    }

    /// Flush vectors and release the index writer.
    pub async fn close(&self) -> Result<(), CollectionError> {
        self.vectors.flush().await?;
        let index = Arc::clone(&self.index);
        tokio::task::spawn_blocking(move || index.close_writer()).await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["postgres", "a", "legal-v1", "x_2", "0abc"] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "Postgres", "-x", "a b", "../etc", "é", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
