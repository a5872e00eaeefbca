//! The documents -> adapter workflow, one owner for what `domainrag train` and the API's train job
//! both do: get triplets (a file, or synthesised from the collection's own chunks), tokenise them
//! with serving's template, train on the blocking pool, register the best checkpoint (replacing
//! and evicting a resident copy when asked), and make it the collection's adapter.
//!
//! Stopping (the CLI's Ctrl-C, the API's cancel) sets the `stop` flag; the trainer finishes its
//! step and returns its best checkpoint, which is registered only when the request says
//! `keep_when_stopped`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde::Serialize;

use crate::adapters::{AdapterInfo, AdapterRegistry, BaseModelInfo};
use crate::collection::{Catalog, Collection, CollectionError};
use crate::error::ErrorKind;
use crate::rag::{Rag, RagError};
use crate::train::synth::SynthReport;
use crate::train::{
    Progress, TrainError, TrainJob, TrainOptions, TrainRecord, Triplet, encode, init_ids,
    read_triplets, register, train, write_triplets,
};

/// Where training data comes from.
#[derive(Debug, Clone)]
pub enum TripletSource {
    /// A triplets JSONL file (`triplets build` / `triplets synth` / an API synth job).
    File(PathBuf),
    /// Synthesise this many from the collection's chunks first (`train::synth`).
    Synthetic { n: usize, seed: u64 },
}

/// One training run.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub name: String,
    pub source: TripletSource,
    pub options: TrainOptions,
    /// Replace an existing adapter of that name (else the name must be new).
    pub replace: bool,
    /// Make it the collection's adapter once registered.
    pub assign: bool,
    /// Register the best checkpoint when stopped early (else register nothing).
    pub keep_when_stopped: bool,
    pub device: Device,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub adapter: AdapterInfo,
    pub record: TrainRecord,
    /// The run's directory (checkpoints `best/`, `last/`; synthetic triplets when synthesised).
    pub checkpoints: PathBuf,
    pub triplets_file: PathBuf,
    pub triplets: usize,
    /// Triplets longer than `max_len` tokens (not trained on).
    pub too_long: usize,
    pub synth: Option<SynthReport>,
    pub assigned: bool,
}

/// Errors of the workflow.
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Rag(#[from] RagError),
    #[error(transparent)]
    Collection(#[from] CollectionError),
    #[error("adapter {0} already exists; choose a new name or replace it")]
    Exists(String),
    #[error("no triplets could be synthesised from collection {collection}: {reasons}")]
    NoTriplets { collection: String, reasons: String },
    #[error("stopped before training finished; nothing was registered")]
    Stopped,
}

impl AdaptError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdaptError::Train(e) => e.kind(),
            AdaptError::Rag(e) => e.kind(),
            AdaptError::Collection(e) => e.kind(),
            AdaptError::Exists(_) => ErrorKind::Conflict,
            AdaptError::NoTriplets { .. } => ErrorKind::InvalidInput,
            AdaptError::Stopped => ErrorKind::Conflict,
        }
    }
}

/// What the workflow works with: serving's retrieval and generator (it tokenises and
/// synthesises), the catalog and the adapter registry, and where training runs are written.
pub struct Workbench<'a> {
    pub rag: &'a Rag,
    pub catalog: &'a Catalog,
    pub registry: &'a AdapterRegistry,
    /// The base model directory (the trainer loads its weights).
    pub base_dir: PathBuf,
    /// `<data_dir>/training`.
    pub training_dir: PathBuf,
}

/// Check a request before any work: a valid, free name and valid options.
pub fn check(registry: &AdapterRegistry, request: &TrainRequest) -> Result<(), AdaptError> {
    request.options.validate()?;
    crate::adapters::check_name(&request.name).map_err(TrainError::from)?;
    if !request.replace && registry.get(&request.name).is_ok() {
        return Err(AdaptError::Exists(request.name.clone()));
    }
    if let TripletSource::Synthetic { n: 0, .. } = request.source {
        return Err(TrainError::Option {
            option: "synthetic",
            problem: "must be at least 1".into(),
        }
        .into());
    }
    Ok(())
}

/// Synthesise (when asked), train, register and assign. `synth_progress` counts synthesised
/// triplets; `progress` sees the training steps.
pub async fn train_adapter(
    bench: &Workbench<'_>,
    collection: &Arc<Collection>,
    request: TrainRequest,
    synth_progress: &(dyn Fn(usize) + Send + Sync),
    mut progress: Box<dyn Progress>,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome, AdaptError> {
    check(bench.registry, &request)?;
    let base = BaseModelInfo::from_dir(&bench.base_dir).map_err(TrainError::from)?;
    let work_dir = bench.training_dir.join(format!(
        "{}-{}",
        request.name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    let (triplets_file, triplets, synth) = triplets(
        bench.rag,
        collection,
        &request.source,
        &work_dir,
        synth_progress,
    )
    .await?;
    let options = request.options.clone();
    let (examples, encoded) = encode(bench.rag.generator(), &triplets, options.max_len).await?;
    let init_ids = init_ids(bench.rag.generator(), &options).await?;
    let too_long = encoded.too_long;
    let (base_dir, path, device) = (
        bench.base_dir.clone(),
        triplets_file.clone(),
        request.device.clone(),
    );
    let trained = tokio::task::spawn_blocking(move || {
        train(TrainJob {
            base_dir,
            triplets_path: path,
            examples,
            encode: encoded,
            options,
            init_ids,
            work_dir,
            device,
            stop,
            progress: progress.as_mut(),
        })
    })
    .await
    .map_err(|e| TrainError::Model(candle_core::Error::Msg(format!("training thread: {e}"))))??;
    if trained.record.interrupted && !request.keep_when_stopped {
        return Err(AdaptError::Stopped);
    }
    let adapter = register(
        bench.registry,
        &request.name,
        &trained,
        &base,
        request.replace,
    )?;
    // A resident copy of the replaced adapter would keep answering with the old weights.
    bench
        .rag
        .generator()
        .adapter_registered(&request.name)
        .await;
    if request.assign {
        let name = request.name.clone();
        collection.update_settings(bench.catalog, move |s| s.adapter = Some(name))?;
    }
    Ok(TrainOutcome {
        adapter,
        checkpoints: trained.dir.parent().unwrap_or(&trained.dir).to_path_buf(),
        record: trained.record,
        triplets_file,
        triplets: triplets.len(),
        too_long,
        synth,
        assigned: request.assign,
    })
}

/// The run's triplets: read from a file, or synthesised and written into `work_dir`.
async fn triplets(
    rag: &Rag,
    collection: &Collection,
    source: &TripletSource,
    work_dir: &Path,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(PathBuf, Vec<Triplet>, Option<SynthReport>), AdaptError> {
    match source {
        TripletSource::File(path) => Ok((path.clone(), read_triplets(path)?, None)),
        TripletSource::Synthetic { n, seed } => {
            let (triplets, report) =
                crate::train::synth::synthesize(rag, collection, *n, *seed, false, progress)
                    .await?;
            if triplets.is_empty() {
                return Err(AdaptError::NoTriplets {
                    collection: collection.name().to_string(),
                    reasons: format!("{:?}", report.dropped),
                });
            }
            let path = work_dir.join("synthetic-triplets.jsonl");
            write_triplets(&path, &triplets)?;
            Ok((path, triplets, Some(report)))
        }
    }
}
