//! Text embedding with fastembed over a local ONNX model (all-MiniLM-L6-v2 by default): mean pooling,
//! L2-normalised vectors, batched, run on tokio's blocking pool.
//!
//! Owns loading ONNX Runtime dynamically from the configured library path (once per process) and the
//! model files from a plain local directory. Nothing here downloads anything.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};

use crate::config::Settings;
use crate::error::ErrorKind;

/// Errors of the embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The ONNX Runtime shared library is missing or cannot be loaded.
    #[error(
        "cannot load ONNX Runtime from {path}: {message}. Run scripts/fetch-models.sh, or set \
         embedding.ort_library (DOMAINRAG__EMBEDDING__ORT_LIBRARY) to your libonnxruntime.so"
    )]
    Runtime { path: PathBuf, message: String },
    /// A model file is missing or unreadable.
    #[error(
        "embedding model file {path} cannot be read: {source}. Run scripts/fetch-models.sh, or set \
         embedding.model_dir to a directory with model.onnx and tokenizer files"
    )]
    ModelFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// ONNX Runtime or the tokenizer refused the model.
    #[error("embedding model in {dir} failed to load: {message}")]
    Load { dir: PathBuf, message: String },
    /// The model's output size is not the configured dimension.
    #[error(
        "embedding model in {dir} produces {got}-dimensional vectors, embedding.dimension is {expected}"
    )]
    Dimension {
        dir: PathBuf,
        expected: usize,
        got: usize,
    },
    /// Inference failed.
    #[error("embedding failed: {0}")]
    Inference(String),
    /// The blocking task panicked or was cancelled.
    #[error("embedding task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl EmbedError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EmbedError::Runtime { .. } | EmbedError::ModelFile { .. } => ErrorKind::Unavailable,
            EmbedError::Load { .. } | EmbedError::Dimension { .. } => ErrorKind::Unavailable,
            EmbedError::Inference(_) | EmbedError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// Calls of at most this many texts are queries (a search, an answer's scoring): they go before
/// the next batch of a bulk call (an ingest), so a search never waits for a whole ingest batch.
const URGENT_TEXTS: usize = 8;

/// A loaded embedding model. Cheap to share behind an `Arc`; calls are serialised because ONNX
/// Runtime already spreads one batch over all configured threads. Bulk calls take the model one
/// batch at a time and step aside while an urgent (small) call waits.
pub struct Embedder {
    model: Mutex<TextEmbedding>,
    /// Urgent calls waiting for the model.
    urgent_waiting: std::sync::atomic::AtomicUsize,
    dimension: usize,
    batch_size: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dir", &self.dir)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

/// ONNX Runtime allows one environment per process; it is made on first use from the first library
/// path given and reused after that.
fn ort_environment(library: &Path) -> Result<ort::environment::Environment, EmbedError> {
    static ENV: OnceLock<Mutex<Option<ort::environment::Environment>>> = OnceLock::new();
    let cell = ENV.get_or_init(|| Mutex::new(None));
    let mut guard = cell
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(env) = guard.as_ref() {
        return Ok(env.clone());
    }
    let runtime_error = |message: String| EmbedError::Runtime {
        path: library.to_path_buf(),
        message,
    };
    if !library.is_file() {
        return Err(runtime_error("file not found".into()));
    }
    // ort's loader may panic on a library it cannot use (wrong version, not a shared object);
    // turn that into an error naming the path instead of taking the process down.
    let built = std::panic::catch_unwind(|| {
        ort::init_from(library)
            .map_err(|e| e.to_string())
            .and_then(|b| b.with_name("domainrag").build().map_err(|e| e.to_string()))
    })
    .map_err(|_| runtime_error("the library could not be initialised".into()))?
    .map_err(runtime_error)?;
    *guard = Some(built.clone());
    Ok(built)
}

impl Embedder {
    /// Load the configured model (blocking: reads files and initialises ONNX Runtime).
    pub fn load(settings: &Settings) -> Result<Embedder, EmbedError> {
        let dir = settings.embedding_model_dir();
        let environment = ort_environment(&settings.ort_library())?;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| EmbedError::ModelFile { path, source })
        };
        let tokenizer_files = TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        };
        let model =
            UserDefinedEmbeddingModel::new(read(&settings.embedding.onnx_file)?, tokenizer_files)
                .with_pooling(Pooling::Mean);
        // No CPU arena: ONNX Runtime's arena keeps memory for every batch shape it has run, and
        // embedding batches come in ever-new shapes (ingest batches, `eval answers` scoring a
        // question, answer, claims and source sentences at once). With the arena, RSS grew
        // +87 MiB per 100 random-shape batches in two runs and kept growing; without it, it
        // stayed flat (`benches/ort_memory.py`, README "Memory soak").
        let mut options = InitOptionsUserDefined::new()
            .with_max_length(settings.embedding.max_length)
            .with_environment(environment)
            .with_execution_providers(vec![
                ort::ep::CPU::default().with_arena_allocator(false).build(),
            ]);
        if settings.embedding.threads > 0 {
            options = options.with_intra_threads(settings.embedding.threads);
        }
        let model = TextEmbedding::try_new_from_user_defined(model, options).map_err(|e| {
            EmbedError::Load {
                dir: dir.clone(),
                message: e.to_string(),
            }
        })?;
        let embedder = Embedder {
            model: Mutex::new(model),
            urgent_waiting: std::sync::atomic::AtomicUsize::new(0),
            dimension: settings.embedding.dimension,
            batch_size: settings.embedding.batch_size,
            dir: dir.clone(),
        };
        let probe = embedder.embed_blocking(&["dimension probe"])?;
        let got = probe.first().map_or(0, Vec::len);
        if got != embedder.dimension {
            return Err(EmbedError::Dimension {
                dir,
                expected: embedder.dimension,
                got,
            });
        }
        Ok(embedder)
    }

    /// Load on the blocking pool.
    pub async fn load_async(settings: &Settings) -> Result<Arc<Embedder>, EmbedError> {
        let settings = settings.clone();
        Ok(Arc::new(
            tokio::task::spawn_blocking(move || Embedder::load(&settings)).await??,
        ))
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Embed `texts` on the calling thread (use from blocking contexts only).
    pub fn embed_blocking<S: AsRef<str> + Send + Sync>(
        &self,
        texts: &[S],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        // Batches are padded to their longest input: embedding in length order keeps similar
        // lengths together and wastes far less compute on padding; results go back in input order.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].as_ref().len());
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i].as_ref()).collect();
        let urgent = texts.len() <= URGENT_TEXTS;
        let mut embedded = Vec::with_capacity(texts.len());
        // The same batches fastembed would cut, one lock each (identical vectors).
        for batch in sorted.chunks(self.batch_size.max(1)) {
            let mut model = self.take_model(urgent);
            embedded.extend(
                model
                    .embed(batch, Some(self.batch_size))
                    .map_err(|e| EmbedError::Inference(e.to_string()))?,
            );
        }
        // A batch's activations are freed by now; hand the pages back (see `telemetry`).
        if texts.len() > 1 {
            crate::heap::release_freed_heap();
        }
        let mut out = vec![Vec::new(); texts.len()];
        for (vector, &i) in embedded.into_iter().zip(&order) {
            out[i] = vector;
        }
        Ok(out)
    }

    /// The model, for one batch: an urgent caller announces itself while it waits; a bulk caller
    /// lets announced ones go first (each waits at most one bulk batch).
    fn take_model(&self, urgent: bool) -> std::sync::MutexGuard<'_, TextEmbedding> {
        use std::sync::atomic::Ordering;
        let lock = || {
            self.model
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if urgent {
            self.urgent_waiting.fetch_add(1, Ordering::SeqCst);
            let guard = lock();
            self.urgent_waiting.fetch_sub(1, Ordering::SeqCst);
            return guard;
        }
        while self.urgent_waiting.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        lock()
    }

    /// Embed `texts` on the blocking pool.
    pub async fn embed(self: &Arc<Self>, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.embed_blocking(&texts)).await?
    }
}
