//! Dense vector storage for one collection's chunks, behind the [`VectorStore`] trait.
//!
//! Two real backends: the embedded qdrant-edge shard on disk in the data dir ([`edge`], the default)
//! and a remote Qdrant server over gRPC ([`remote`]). Both store one point per chunk: the point id is
//! the chunk's key ([`crate::chunk::chunk_key`], which the BM25 index stores too, so hits of both
//! meet on it), the payload carries `chunk_id` and `doc_id` so a whole document's points can be
//! deleted when it is re-ingested. A search reads no payload: hits are keys and scores. Chunk text lives in the BM25 index, never here.
//!
//! This module knows nothing about tantivy, embedding or fusion.

pub(crate) mod edge;
pub(crate) mod remote;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{VectorBackend, VectorsConfig};
use crate::error::ErrorKind;

/// One chunk's vector, ready to store.
#[derive(Debug, Clone)]
pub struct VectorPoint {
    /// The stable chunk id (hex content hash); the point id is derived from it.
    pub chunk_id: String,
    /// The document the chunk belongs to; used to delete a document's points.
    pub doc_id: String,
    /// The L2-normalised embedding.
    pub vector: Vec<f32>,
}

/// A nearest-neighbour hit.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorHit {
    /// The point id: the chunk's key ([`crate::chunk::chunk_key`]).
    pub key: u64,
    /// Cosine similarity, higher is closer.
    pub score: f32,
}

/// Errors of the vector backends.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// The embedded shard could not be opened, written or searched.
    #[error("vector store at {path}: {message}")]
    Edge { path: String, message: String },
    /// The remote Qdrant server refused or failed a request.
    #[error("qdrant server {url}, collection {collection}: {message}")]
    Remote {
        url: String,
        collection: String,
        message: String,
    },
    /// Another process (or another open handle) holds the embedded store.
    #[error(
        "vector store at {path} is in use by another domainrag process; the embedded store allows \
         one process at a time (wait for it, or serve the collection from one process)"
    )]
    InUse { path: String },
    /// A vector of the wrong size was given.
    #[error("vector has {got} dimensions, the collection stores {expected}")]
    Dimension { expected: usize, got: usize },
    /// A blocking task panicked or was cancelled.
    #[error("vector store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl VectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VectorError::Dimension { .. } => ErrorKind::InvalidInput,
            VectorError::InUse { .. } => ErrorKind::Conflict,
            VectorError::Remote { .. } => ErrorKind::Unavailable,
            VectorError::Edge { .. } | VectorError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// A search run on the calling thread (see [`VectorStore::blocking_search`]).
pub type BlockingSearch =
    Arc<dyn Fn(Vec<f32>, usize) -> Result<Vec<VectorHit>, VectorError> + Send + Sync>;

/// A collection's dense vector index. Implementations are cheap to share (`Arc`) and safe to call
/// from async code: blocking work happens on the blocking pool inside them.
#[async_trait]
pub trait VectorStore: Send + Sync + std::fmt::Debug {
    /// Insert or replace points (same chunk id, same point).
    async fn upsert(&self, points: Vec<VectorPoint>) -> Result<(), VectorError>;
    /// Remove every point of these documents.
    async fn delete_docs(&self, doc_ids: Vec<String>) -> Result<(), VectorError>;
    /// The `k` nearest points to `vector`, best first (approximate where an index is built).
    async fn search(&self, vector: Vec<f32>, k: usize) -> Result<Vec<VectorHit>, VectorError>;
    /// [`Self::search`] on the calling thread, where the store lives in this process (the
    /// embedded shard), for callers already on the blocking pool: a hybrid search then runs both
    /// retrievers and reads its results in one blocking task instead of handing work between
    /// threads. `None` where a search crosses the network (await [`Self::search`]).
    fn blocking_search(&self) -> Option<BlockingSearch> {
        None
    }
    /// The exact `k` nearest points, every vector compared (what [`Self::search`]'s recall is
    /// measured against).
    async fn search_exact(&self, vector: Vec<f32>, k: usize)
    -> Result<Vec<VectorHit>, VectorError>;
    /// Build the search index over what was written, where the store does that on request
    /// (a Qdrant server indexes by itself); returns whether anything was rebuilt.
    async fn optimize(&self) -> Result<bool, VectorError>;
    /// Number of points stored.
    async fn count(&self) -> Result<usize, VectorError>;
    /// Make everything written so far durable.
    async fn flush(&self) -> Result<(), VectorError>;
    /// Flush and close what the store holds open in this process, before its files are moved
    /// (the collection is being deleted); later calls fail. A server's store holds nothing here.
    async fn close(&self) -> Result<(), VectorError> {
        Ok(())
    }
    /// Remove the whole store (the collection is being deleted).
    async fn drop_store(&self) -> Result<(), VectorError>;
}

/// Open (creating if needed) the vector store of collection `name`, whose files live in `dir`.
pub async fn open(
    config: &VectorsConfig,
    name: &str,
    dir: &Path,
    dimension: usize,
) -> Result<Arc<dyn VectorStore>, VectorError> {
    match config.backend {
        VectorBackend::Edge => Ok(Arc::new(
            edge::EdgeStore::open(
                dir.join("vectors"),
                dimension,
                config.hnsw_ef,
                config.int8_oversampling(),
            )
            .await?,
        )),
        VectorBackend::Qdrant => Ok(Arc::new(
            remote::RemoteStore::connect(&config.qdrant, name, dimension).await?,
        )),
    }
}
