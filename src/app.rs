//! The application core: the operations on collections, documents and adapters that both edges
//! (`cli` and `http`) perform, each with its rules in one place. An edge parses its input, makes
//! one call here and formats the outcome.
//!
//! [`App`] owns the catalog, the adapter registry, the one open handle per collection (the
//! embedded vector store opens once per process) and one write lock per collection. The server
//! also hands it the generator, so that adding, replacing or removing an adapter reaches the
//! models it keeps resident; the CLI has none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, OnceCell};

use crate::access::{AccessError, Principal};
use crate::adapters::{AdapterError, AdapterInfo, AdapterRegistry, BaseModelInfo};
use crate::answerlog::{AnswerLog, LogError};
use crate::collection::{Catalog, Collection, CollectionError, CollectionSettings};
use crate::config::Settings;
use crate::embed::Embedder;
use crate::error::ErrorKind;
use crate::generate::Generator;
use crate::ingest::{Format, IngestError, IngestReport, Ingestor, Progress};
use crate::rag::AdapterChoice;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Collection(#[from] CollectionError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    AnswerLog(#[from] LogError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("no document {doc_id:?} in collection {collection:?}")]
    NoDocument { collection: String, doc_id: String },
}

impl AppError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AppError::Collection(e) => e.kind(),
            AppError::Adapter(e) => e.kind(),
            AppError::AnswerLog(e) => e.kind(),
            AppError::Ingest(e) => e.kind(),
            AppError::Access(e) => e.kind(),
            AppError::NoDocument { .. } => ErrorKind::NotFound,
        }
    }
}

/// A collection's write lock: one ingest, document delete or collection delete at a time.
pub type WriteLock = Arc<Mutex<()>>;

pub struct App {
    pub settings: Settings,
    pub catalog: Catalog,
    pub registry: AdapterRegistry,
    /// The server's generator (resident adapter models); `None` in the CLI.
    generator: Option<Arc<Generator>>,
    /// Open collections, one cell per name: the first caller opens it (which may rebuild an old
    /// index for minutes) while callers for other collections go on; a failed open is retried.
    open: Mutex<HashMap<String, Arc<OnceCell<Arc<Collection>>>>>,
    write_locks: Mutex<HashMap<String, WriteLock>>,
}

impl App {
    pub fn new(settings: Settings, generator: Option<Arc<Generator>>) -> App {
        App {
            catalog: Catalog::new(&settings),
            registry: AdapterRegistry::new(&settings.paths.data_dir),
            settings,
            generator,
            open: Mutex::new(HashMap::new()),
            write_locks: Mutex::new(HashMap::new()),
        }
    }

    /// Finish what a killed process left half-done in the data dir: collection deletes and adapter
    /// replaces. Only for the process that holds the data dir (a server, or the CLI when none is
    /// running).
    pub fn recover(&self) {
        self.catalog.sweep_deleted();
        self.registry.recover();
    }

    /// The open handle of collection `name` (opened, and repaired if a write was interrupted, on
    /// first use).
    pub async fn collection(&self, name: &str) -> Result<Arc<Collection>, CollectionError> {
        crate::collection::validate_name(name)?;
        let cell = Arc::clone(self.open.lock().await.entry(name.to_string()).or_default());
        cell.get_or_try_init(|| self.catalog.open(name))
            .await
            .cloned()
    }

    /// The write lock of collection `name`.
    pub async fn write_lock(&self, name: &str) -> WriteLock {
        Arc::clone(
            self.write_locks
                .lock()
                .await
                .entry(name.to_string())
                .or_default(),
        )
    }

    /// The answer log of collection `name`.
    pub fn answer_log(&self, name: &str) -> AnswerLog {
        AnswerLog::new(&self.catalog.dir_of(name), &self.settings.answers)
    }

    /// Create collection `name` with the configured defaults changed by `change`.
    pub async fn create_collection(
        &self,
        name: &str,
        change: impl FnOnce(&mut CollectionSettings),
    ) -> Result<Arc<Collection>, AppError> {
        crate::collection::validate_name(name)?;
        let mut settings = self.catalog.default_settings(name);
        change(&mut settings);
        self.check_adapter(&settings)?;
        self.catalog.create(settings).await?;
        Ok(self.collection(name).await?)
    }

    /// Change a collection's settings (chunking only while it holds no documents).
    pub async fn update_collection(
        &self,
        name: &str,
        change: impl FnOnce(&mut CollectionSettings),
    ) -> Result<(Arc<Collection>, CollectionSettings), AppError> {
        let c = self.collection(name).await?;
        let saved = c.update_settings_checked(&self.catalog, change, |s| {
            self.check_adapter(s).map_err(AppError::from)
        })?;
        Ok((c, saved))
    }

    /// Only registered adapters can be assigned to a collection.
    fn check_adapter(&self, settings: &CollectionSettings) -> Result<(), AdapterError> {
        match &settings.adapter {
            Some(adapter) => self.registry.get(adapter).map(drop),
            None => Ok(()),
        }
    }

    /// Add files (directories: the supported files in them) to collection `name`, one write at a
    /// time per collection; a bad file is a failure in the report and the rest go on.
    pub async fn ingest(
        &self,
        name: &str,
        paths: &[PathBuf],
        format: Format,
        embedder: Arc<Embedder>,
        progress: &dyn Progress,
    ) -> Result<IngestReport, AppError> {
        let c = self.collection(name).await?;
        let lock = self.write_lock(name).await;
        let _writing = lock.lock().await;
        let ingestor = Ingestor::new(c, embedder, self.settings.ingest.batch_docs);
        Ok(ingestor.ingest_paths(paths, format, progress).await?)
    }

    /// Delete a collection and everything in it; a damaged one (unreadable files) too.
    pub async fn delete_collection(&self, name: &str) -> Result<(), AppError> {
        let lock = self.write_lock(name).await;
        let _writing = lock.lock().await;
        let opened = self.collection(name).await;
        if opened.is_ok() {
            self.open.lock().await.remove(name);
        }
        Ok(self.catalog.delete_opened(name, opened).await?)
    }

    /// Delete one document: its chunks, vectors, ledger entry and uploaded file, and every
    /// answer the log gave from it.
    pub async fn delete_document(&self, name: &str, doc_id: &str) -> Result<(), AppError> {
        let c = self.collection(name).await?;
        let lock = self.write_lock(name).await;
        let _writing = lock.lock().await;
        if !c.has_document(doc_id) {
            return Err(AppError::NoDocument {
                collection: name.to_string(),
                doc_id: doc_id.to_string(),
            });
        }
        c.delete_documents(vec![doc_id.to_string()]).await?;
        let log = self.answer_log(name);
        let ids = [doc_id.to_string()];
        crate::answerlog::blocking(move || log.forget_documents(&ids)).await?;
        Ok(())
    }

    /// Validate and register the PEFT adapter in `dir` (replacing one of that name if asked);
    /// collections using it answer with the new weights from their next question.
    pub async fn add_adapter(
        &self,
        name: &str,
        dir: &Path,
        replace: bool,
    ) -> Result<AdapterInfo, AppError> {
        let base = BaseModelInfo::from_dir(&self.settings.generate_base_dir())?;
        let info = if replace {
            self.registry.replace(name, dir, &base)?
        } else {
            self.registry.add(name, dir, &base)?
        };
        if let Some(generator) = &self.generator {
            generator.adapter_registered(&info.name).await;
        }
        Ok(info)
    }

    /// Remove an adapter, refused while a collection or a running experiment uses it.
    pub async fn remove_adapter(&self, name: &str) -> Result<(), AppError> {
        let used_by = {
            let (catalog, answers, name) = (
                self.catalog.clone(),
                self.settings.answers.clone(),
                name.to_string(),
            );
            crate::answerlog::blocking(move || {
                crate::answerlog::users_of_adapter(&catalog, &answers, &name)
            })
            .await?
        };
        self.registry.remove(name, &used_by)?;
        if let Some(generator) = &self.generator {
            generator.evict(name).await;
        }
        Ok(())
    }

    /// The registered adapters `who` may see: all for an admin; for a team's key, those its
    /// collections use and `house` (the adapter answering for collections without their own).
    pub fn adapters_for(
        &self,
        who: &Principal,
        house: Option<String>,
    ) -> Result<Vec<AdapterInfo>, AppError> {
        let mut list = self.registry.list()?;
        if let Some(usable) = crate::access::usable_adapters(who, &self.catalog, house)? {
            list.retain(|a| usable.contains(&a.name));
        }
        Ok(list)
    }

    /// Refuse an adapter choice `who` may not make (an adapter it may not see is "not found"),
    /// or one that is not registered, before any work starts.
    pub fn check_choice(
        &self,
        who: &Principal,
        choice: &AdapterChoice,
        house: Option<String>,
    ) -> Result<(), AppError> {
        if let AdapterChoice::Named(a) = choice {
            let usable = crate::access::usable_adapters(who, &self.catalog, house)?;
            crate::access::require_adapter(&usable, a)?;
            self.registry.get(a)?;
        }
        Ok(())
    }

    /// Flush every open collection and release its index writer (shutdown).
    pub async fn close_all(&self) {
        let open = self.open.lock().await;
        for (name, c) in open.iter().filter_map(|(n, cell)| Some((n, cell.get()?))) {
            if let Err(e) = c.close().await {
                tracing::error!(collection = %name, error = %e, "closing collection failed");
            }
        }
    }
}
