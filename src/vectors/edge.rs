//! The embedded vector store: one qdrant-edge shard on disk per collection, in `<collection dir>/vectors`.
//!
//! Owns that directory and every call into qdrant-edge; no qdrant-edge type leaves this file. It must not
//! touch anything else in the collection directory (the BM25 index lives next to it) and knows nothing
//! about chunk text, embedding or fusion.
//!
//! qdrant-edge is synchronous, so every call runs on tokio's blocking pool. Two properties of the shard
//! shape this file:
//! - `EdgeShard::load` does not replay the write-ahead log: only what `EdgeShard::flush` wrote survives a
//!   crash or a restart. [`VectorStore::flush`] is therefore the durability point, and the shard also
//!   flushes itself when dropped.
//! - `EdgeShard::flush` takes the shard's internal locks with `try_lock` and panics if an update holds
//!   them, so flushing (and dropping the store) takes an exclusive guard, while updates, reads and
//!   index builds (`optimize`), which qdrant-edge synchronises internally, share it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, DEFAULT_VECTOR_NAME, Distance, EdgeConfig, EdgeShard,
    EdgeVectorParams, FieldCondition, FieldIndexOperations, Filter, JsonPath, Match, NamedQuery,
    PayloadFieldSchema, PayloadSchemaType, PointId, PointInsertOperations, PointOperations,
    PointStruct, PointStructPersisted, QuantizationConfig, QuantizationSearchParams, QueryEnum,
    QueryRequest, ScalarQuantizationConfig, ScalarType, ScoredPoint, ScoringQuery, SearchParams,
    UpdateOperation, VectorInternal, WithPayloadInterface, WithVector,
};
use serde_json::json;

use super::{BlockingSearch, VectorError, VectorHit, VectorPoint, VectorStore};

/// Payload key holding the chunk id of a point.
const CHUNK_ID: &str = "chunk_id";
/// Payload key holding the document id of a point; deletes filter on it.
const DOC_ID: &str = "doc_id";

/// Files qdrant-edge writes into a shard directory (`edge_config.json` and `segments/` in 0.7.1);
/// either one present means a shard was created here before.
const EDGE_CONFIG_FILE: &str = "edge_config.json";
const SEGMENTS_DIR: &str = "segments";

/// Points per update operation. Each operation is one write-ahead-log record, and a record must stay
/// well below the WAL segment size (32 MiB by default): 256 points of 4096 f32 are 4 MiB.
const UPSERT_BATCH: usize = 256;

/// A collection's vectors in an embedded qdrant-edge shard.
pub(crate) struct EdgeStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    dimension: usize,
    /// Candidates an HNSW search explores.
    hnsw_ef: usize,
    /// With int8 vectors: how many times `k` of them a search re-scores with the full vectors.
    int8_oversampling: Option<f64>,
    /// `None` once [`VectorStore::drop_store`] has closed and removed the shard.
    shard: RwLock<Option<EdgeShard>>,
}

/// Whether an operation may run alongside others (reads and updates) or needs the shard to itself
/// (flush, because of `EdgeShard::flush`'s `try_lock`).
#[derive(Clone, Copy)]
enum Access {
    Shared,
    Exclusive,
}

impl fmt::Debug for EdgeStore {
    // The shard's own Debug output lists every segment; the path and size say which store this is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeStore")
            .field("path", &self.inner.path)
            .field("dimension", &self.inner.dimension)
            .finish_non_exhaustive()
    }
}

impl EdgeStore {
    /// Open the shard in `dir`, creating it (and `dir`) when there is none yet. With
    /// `int8_oversampling`, HNSW segments keep int8 copies of their vectors for the search (see
    /// [`open_shard`]).
    ///
    /// An existing shard must hold one unnamed cosine vector of `dimension` values, else
    /// [`VectorError::Dimension`] (size differs) or [`VectorError::Edge`] (another layout).
    pub(crate) async fn open(
        dir: PathBuf,
        dimension: usize,
        hnsw_ef: usize,
        int8_oversampling: Option<f64>,
    ) -> Result<Self, VectorError> {
        let path = dir.clone();
        let int8 = int8_oversampling.is_some();
        let shard =
            tokio::task::spawn_blocking(move || open_shard(&path, dimension, int8)).await??;
        Ok(Self {
            inner: Arc::new(Inner {
                path: dir,
                dimension,
                hnsw_ef,
                int8_oversampling,
                shard: RwLock::new(Some(shard)),
            }),
        })
    }

    /// Run `op` on the shard on the blocking pool, under the guard `access` asks for.
    async fn run<T, F>(&self, access: Access, op: F) -> Result<T, VectorError>
    where
        T: Send + 'static,
        F: FnOnce(&Path, &EdgeShard) -> Result<T, VectorError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.with_shard(access, op)).await?
    }
}

impl Inner {
    fn check_dimension(&self, got: usize) -> Result<(), VectorError> {
        if got == self.dimension {
            Ok(())
        } else {
            Err(VectorError::Dimension {
                expected: self.dimension,
                got,
            })
        }
    }

    /// Drop the shard, which flushes it and closes its files (where they are: a caller that moves
    /// them closes first, or the flush panics on the old path). The store is going away, so a
    /// guard poisoned by an earlier panic is no reason to keep it open.
    fn close(&self) {
        let mut guard = self.shard.write().unwrap_or_else(PoisonError::into_inner);
        drop(guard.take());
    }

    /// `op` on the shard, on this thread, under the guard `access` asks for.
    fn with_shard<T>(
        &self,
        access: Access,
        op: impl FnOnce(&Path, &EdgeShard) -> Result<T, VectorError>,
    ) -> Result<T, VectorError> {
        let path = self.path.as_path();
        match access {
            Access::Shared => {
                let guard = self.shard.read().map_err(|_| poisoned(path))?;
                op(path, guard.as_ref().ok_or_else(|| dropped(path))?)
            }
            Access::Exclusive => {
                let guard = self.shard.write().map_err(|_| poisoned(path))?;
                op(path, guard.as_ref().ok_or_else(|| dropped(path))?)
            }
        }
    }

    /// How [`VectorStore::search`] searches. Segments without int8 vectors (small ones, or built
    /// before they were asked for) are searched with their full vectors whatever this says.
    fn search_params(&self) -> SearchParams {
        SearchParams {
            hnsw_ef: Some(self.hnsw_ef),
            quantization: self
                .int8_oversampling
                .map(|oversampling| QuantizationSearchParams {
                    ignore: false,
                    rescore: Some(true),
                    oversampling: Some(oversampling),
                }),
            ..SearchParams::default()
        }
    }

    /// The `k` nearest points, searched with `params`, on this thread.
    fn query(
        &self,
        vector: Vec<f32>,
        k: usize,
        params: SearchParams,
    ) -> Result<Vec<VectorHit>, VectorError> {
        self.check_dimension(vector.len())?;
        if k == 0 {
            return Ok(Vec::new());
        }
        self.with_shard(Access::Shared, move |path, shard| {
            // Segments below qdrant's full-scan threshold, and every segment before the first
            // optimisation, are searched exactly; HNSW segments with `params`.
            let points = shard
                .query(nearest(vector, k, params))
                .map_err(|e| edge_error(path, format!("search failed: {e}")))?;
            Ok(points
                .into_iter()
                .filter_map(|point| hit(path, point))
                .collect())
        })
    }
}

#[async_trait]
impl VectorStore for EdgeStore {
    async fn upsert(&self, points: Vec<VectorPoint>) -> Result<(), VectorError> {
        // Check every vector before writing any, so a bad batch leaves the store untouched.
        for point in &points {
            self.inner.check_dimension(point.vector.len())?;
        }
        if points.is_empty() {
            return Ok(());
        }
        self.run(Access::Shared, move |path, shard| {
            let mut batch = Vec::with_capacity(points.len().min(UPSERT_BATCH));
            for point in points {
                batch.push(persisted(point));
                if batch.len() == UPSERT_BATCH {
                    upsert_batch(path, shard, std::mem::take(&mut batch))?;
                }
            }
            if !batch.is_empty() {
                upsert_batch(path, shard, batch)?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_docs(&self, doc_ids: Vec<String>) -> Result<(), VectorError> {
        if doc_ids.is_empty() {
            return Ok(());
        }
        self.run(Access::Shared, move |path, shard| {
            // Match-any on the keyword field; the payload index created with the shard makes this
            // an index lookup, and qdrant falls back to reading payloads where a segment lacks it.
            let filter = Filter::new_must(Condition::Field(FieldCondition::new_match(
                payload_key(DOC_ID),
                Match::from(doc_ids),
            )));
            shard
                .update(UpdateOperation::PointOperation(
                    PointOperations::DeletePointsByFilter(filter),
                ))
                .map_err(|e| edge_error(path, format!("cannot delete points: {e}")))
        })
        .await
    }

    async fn search(&self, vector: Vec<f32>, k: usize) -> Result<Vec<VectorHit>, VectorError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.query(vector, k, inner.search_params())).await?
    }

    fn blocking_search(&self) -> Option<BlockingSearch> {
        let inner = Arc::clone(&self.inner);
        Some(Arc::new(move |vector, k| {
            inner.query(vector, k, inner.search_params())
        }))
    }

    async fn search_exact(
        &self,
        vector: Vec<f32>,
        k: usize,
    ) -> Result<Vec<VectorHit>, VectorError> {
        let params = SearchParams {
            exact: true,
            // Every full vector compared: the int8 copies are what is being checked against this.
            quantization: Some(QuantizationSearchParams {
                ignore: true,
                ..QuantizationSearchParams::default()
            }),
            ..SearchParams::default()
        };
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.query(vector, k, params)).await?
    }

    async fn optimize(&self) -> Result<bool, VectorError> {
        // Shared: qdrant builds the graph beside proxies of the segments, so searches and
        // updates go on meanwhile; a flush (exclusive) waits, since `EdgeShard::flush` panics
        // when it races the optimiser's segment swap.
        self.run(Access::Shared, |path, shard| {
            shard
                .optimize()
                .map_err(|e| edge_error(path, format!("cannot build the vector index: {e}")))
        })
        .await
    }

    async fn count(&self) -> Result<usize, VectorError> {
        self.run(Access::Shared, |path, shard| {
            shard
                .count(CountRequest {
                    filter: None,
                    exact: true,
                })
                .map_err(|e| edge_error(path, format!("cannot count points: {e}")))
        })
        .await
    }

    async fn flush(&self) -> Result<(), VectorError> {
        // `EdgeShard::flush` panics on I/O errors; the panic surfaces as `VectorError::Join` and
        // poisons the guard, so later calls fail instead of writing to a shard in an unknown state.
        self.run(Access::Exclusive, |_, shard| {
            shard.flush();
            Ok(())
        })
        .await
    }

    async fn close(&self) -> Result<(), VectorError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.close()).await?;
        Ok(())
    }

    async fn drop_store(&self) -> Result<(), VectorError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let path = inner.path.as_path();
            inner.close();
            match std::fs::remove_dir_all(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(edge_error(path, format!("cannot remove the store: {e}"))),
            }
        })
        .await?
    }
}

/// Load the shard at `path`, or create it when the directory holds none; `int8`: whether its HNSW
/// segments keep int8 copies of their vectors. A shard whose stored config says otherwise is
/// loaded with this one: its segments are rebuilt to match at the next `optimize` (qdrant's
/// config-mismatch optimiser, the end of an ingest), and searched as they are until then.
fn open_shard(path: &Path, dimension: usize, int8: bool) -> Result<EdgeShard, VectorError> {
    if holds_shard(path) {
        let config = match EdgeConfig::load(path) {
            Some(Ok(mut stored)) => {
                stored.quantization_config = quantization(int8);
                Some(stored)
            }
            Some(Err(e)) => {
                return Err(edge_error(
                    path,
                    format!("cannot read the shard's config: {e}"),
                ));
            }
            None => None,
        };
        let shard = EdgeShard::load(path, config).map_err(|e| {
            let message = e.to_string();
            // The shard's WAL is file-locked by whichever process (or handle) opened it first.
            if message.contains("WouldBlock") {
                VectorError::InUse {
                    path: path.display().to_string(),
                }
            } else {
                edge_error(path, format!("cannot load the shard: {message}"))
            }
        })?;
        check_layout(&shard, path, dimension)?;
        return Ok(shard);
    }
    if dimension == 0 {
        return Err(edge_error(
            path,
            "cannot create a shard for 0-dimensional vectors".to_owned(),
        ));
    }
    std::fs::create_dir_all(path)
        .map_err(|e| edge_error(path, format!("cannot create the directory: {e}")))?;
    // One unnamed dense vector, kept in RAM (and persisted in mmap files). `optimize` builds HNSW
    // (qdrant's defaults: m 16, ef_construct 100) over segments past qdrant's indexing threshold;
    // smaller ones are searched exactly. Payloads are only read for hits and deletes, so they stay
    // on disk.
    let mut config = EdgeConfig::builder()
        .vector(
            DEFAULT_VECTOR_NAME,
            EdgeVectorParams::builder(dimension, Distance::Cosine)
                .on_disk(false)
                .build(),
        )
        .on_disk_payload(true)
        .build();
    config.quantization_config = quantization(int8);
    let shard = EdgeShard::new(path, config)
        .map_err(|e| edge_error(path, format!("cannot create the shard: {e}")))?;
    shard
        .update(UpdateOperation::FieldIndexOperation(
            FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: payload_key(DOC_ID),
                field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
            }),
        ))
        .map_err(|e| edge_error(path, format!("cannot index {DOC_ID}: {e}")))?;
    // Loading does not replay the WAL, so write the new shard and its index out now.
    shard.flush();
    Ok(shard)
}

/// The shard-wide quantization: int8 scalars (the 0.99 quantile of the values sets their range),
/// kept in RAM, or none.
fn quantization(int8: bool) -> Option<QuantizationConfig> {
    int8.then(|| {
        QuantizationConfig::from(ScalarQuantizationConfig {
            r#type: ScalarType::Int8,
            quantile: Some(0.99),
            always_ram: Some(true),
        })
    })
}

/// Whether qdrant-edge has written a shard into `path` before.
fn holds_shard(path: &Path) -> bool {
    if path.join(EDGE_CONFIG_FILE).is_file() {
        return true;
    }
    std::fs::read_dir(path.join(SEGMENTS_DIR))
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
}

/// An existing shard must have the layout [`open_shard`] creates.
fn check_layout(shard: &EdgeShard, path: &Path, dimension: usize) -> Result<(), VectorError> {
    let config = shard.config();
    let Some(params) = config.vectors.get(DEFAULT_VECTOR_NAME) else {
        return Err(edge_error(
            path,
            "the shard has no unnamed dense vector; it was not written by domainrag".to_owned(),
        ));
    };
    if params.distance != Distance::Cosine {
        return Err(edge_error(
            path,
            format!("the shard uses {:?} distance, not Cosine", params.distance),
        ));
    }
    if params.size != dimension {
        return Err(VectorError::Dimension {
            expected: params.size,
            got: dimension,
        });
    }
    Ok(())
}

fn persisted(point: VectorPoint) -> PointStructPersisted {
    let id = crate::chunk::chunk_key(&point.chunk_id);
    let payload = json!({ CHUNK_ID: point.chunk_id, DOC_ID: point.doc_id });
    PointStruct::new(id, point.vector, payload).into()
}

fn upsert_batch(
    path: &Path,
    shard: &EdgeShard,
    batch: Vec<PointStructPersisted>,
) -> Result<(), VectorError> {
    shard
        .update(UpdateOperation::PointOperation(
            PointOperations::UpsertPoints(PointInsertOperations::PointsList(batch)),
        ))
        .map_err(|e| edge_error(path, format!("cannot upsert points: {e}")))
}

/// A top-`k` nearest-neighbour query on the unnamed vector, returning ids and scores only (the
/// payload stays on disk: reading it for every candidate was a third of a search's time).
fn nearest(vector: Vec<f32>, k: usize, params: SearchParams) -> QueryRequest {
    QueryRequest {
        prefetches: Vec::new(),
        query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
            query: VectorInternal::Dense(vector),
            using: None,
        }))),
        filter: None,
        score_threshold: None,
        limit: k,
        offset: 0,
        params: Some(params),
        with_vector: WithVector::Bool(false),
        with_payload: WithPayloadInterface::Bool(false),
    }
}

/// The hit of a scored point, or `None` (logged) for a UUID point id, which only a foreign writer
/// could have stored (domainrag's ids are numbers: [`crate::chunk::chunk_key`]).
fn hit(path: &Path, point: ScoredPoint) -> Option<VectorHit> {
    match point.id {
        PointId::NumId(key) => Some(VectorHit {
            key,
            score: point.score,
        }),
        PointId::Uuid(id) => {
            tracing::warn!(path = %path.display(), point = %id, "vector point with a UUID id skipped");
            None
        }
    }
}

fn payload_key(key: &str) -> JsonPath {
    key.parse()
        .expect("payload keys here are plain identifiers, which are valid JSON paths")
}

fn edge_error(path: &Path, message: String) -> VectorError {
    VectorError::Edge {
        path: path.display().to_string(),
        message,
    }
}

fn poisoned(path: &Path) -> VectorError {
    edge_error(
        path,
        "an earlier operation panicked; restart to reload the shard".to_owned(),
    )
}

fn dropped(path: &Path) -> VectorError {
    edge_error(path, "the store was dropped".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 4;

    /// A 64-hex-digit chunk id whose point id (first 16 digits) differs for every `n`.
    fn chunk_id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn key(n: u8) -> u64 {
        crate::chunk::chunk_key(&chunk_id(n))
    }

    fn point(n: u8, doc: &str, vector: [f32; DIM]) -> VectorPoint {
        VectorPoint {
            chunk_id: chunk_id(n),
            doc_id: doc.to_owned(),
            vector: vector.to_vec(),
        }
    }

    async fn store_with_three_points(dir: &Path) -> EdgeStore {
        let store = EdgeStore::open(dir.join("vectors"), DIM, 128, None)
            .await
            .expect("a new store opens");
        store
            .upsert(vec![
                point(1, "doc-a", [1.0, 0.0, 0.0, 0.0]),
                point(2, "doc-a", [0.0, 1.0, 0.0, 0.0]),
                point(3, "doc-b", [0.0, 0.0, 1.0, 0.0]),
            ])
            .await
            .expect("upsert succeeds");
        store
    }

    #[tokio::test]
    async fn a_new_store_is_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EdgeStore::open(dir.path().join("vectors"), DIM, 128, None)
            .await
            .expect("a new store opens");
        assert_eq!(store.count().await.expect("count"), 0);
        let hits = store
            .search(vec![1.0, 0.0, 0.0, 0.0], 5)
            .await
            .expect("search");
        assert!(hits.is_empty());
    }

    #[tokio::test]
    async fn search_returns_the_nearest_point_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;

        let hits = store
            .search(vec![0.1, 0.9, 0.2, 0.0], 2)
            .await
            .expect("search");

        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].key, key(2));
        assert_eq!(hits[1].key, key(3));
        assert!(hits[0].score > hits[1].score);
        // Cosine similarity of the query with the unit vector e2.
        let expected = 0.9 / (0.1f32 * 0.1 + 0.9 * 0.9 + 0.2 * 0.2).sqrt();
        assert!(
            (hits[0].score - expected).abs() < 1e-4,
            "score {} is not the cosine {expected}",
            hits[0].score
        );
    }

    #[tokio::test]
    async fn delete_docs_removes_only_that_documents_points() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;
        assert_eq!(store.count().await.expect("count"), 3);

        store
            .delete_docs(vec!["doc-a".to_owned()])
            .await
            .expect("delete");

        assert_eq!(store.count().await.expect("count"), 1);
        let hits = store
            .search(vec![1.0, 1.0, 1.0, 1.0], 10)
            .await
            .expect("search");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].key, key(3));

        store
            .delete_docs(vec!["no-such-doc".to_owned()])
            .await
            .expect("deleting an unknown document is fine");
        assert_eq!(store.count().await.expect("count"), 1);
    }

    #[tokio::test]
    async fn upserting_a_chunk_again_replaces_its_point() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;

        store
            .upsert(vec![point(1, "doc-c", [0.0, 0.0, 0.0, 1.0])])
            .await
            .expect("upsert");

        assert_eq!(store.count().await.expect("count"), 3);
        let hits = store
            .search(vec![0.0, 0.0, 0.0, 1.0], 1)
            .await
            .expect("search");
        assert_eq!(hits[0].key, key(1));
        // The point now belongs to doc-c: deleting doc-c removes it, doc-a keeps its other point.
        store
            .delete_docs(vec!["doc-c".to_owned()])
            .await
            .expect("delete");
        assert_eq!(store.count().await.expect("count"), 2);
    }

    #[tokio::test]
    async fn points_survive_flush_and_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = store_with_three_points(dir.path()).await;
            store.flush().await.expect("flush");
        }

        let store = EdgeStore::open(dir.path().join("vectors"), DIM, 128, None)
            .await
            .expect("the store reopens");

        assert_eq!(store.count().await.expect("count"), 3);
        let hits = store
            .search(vec![0.0, 0.0, 1.0, 0.0], 1)
            .await
            .expect("search");
        assert_eq!(hits[0].key, key(3));
        store
            .delete_docs(vec!["doc-b".to_owned()])
            .await
            .expect("delete after reopen");
        assert_eq!(store.count().await.expect("count"), 2);
    }

    #[tokio::test]
    async fn wrong_dimensions_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;

        let short = VectorPoint {
            chunk_id: chunk_id(9),
            doc_id: "doc-z".to_owned(),
            vector: vec![1.0; 3],
        };
        let err = store
            .upsert(vec![point(8, "doc-z", [1.0, 0.0, 0.0, 0.0]), short])
            .await
            .expect_err("a 3-dimensional vector is refused");
        assert!(matches!(
            err,
            VectorError::Dimension {
                expected: 4,
                got: 3
            }
        ));
        assert_eq!(
            store.count().await.expect("count"),
            3,
            "nothing of the bad batch is written"
        );

        let err = store
            .search(vec![1.0; 5], 1)
            .await
            .expect_err("a 5-dimensional query is refused");
        assert!(matches!(
            err,
            VectorError::Dimension {
                expected: 4,
                got: 5
            }
        ));

        store.flush().await.expect("flush");
        drop(store);
        let err = EdgeStore::open(dir.path().join("vectors"), 8, 128, None)
            .await
            .expect_err("reopening with another dimension fails");
        assert!(matches!(
            err,
            VectorError::Dimension {
                expected: 4,
                got: 8
            }
        ));
    }

    #[tokio::test]
    async fn drop_store_removes_the_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;

        store.drop_store().await.expect("drop");

        assert!(!dir.path().join("vectors").exists());
        assert!(matches!(store.count().await, Err(VectorError::Edge { .. })));
    }

    #[tokio::test]
    async fn a_store_closed_before_its_directory_moves_is_dropped_cleanly() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_three_points(dir.path()).await;
        // What a collection delete does: close, move the directory out of the catalog, drop.
        store.close().await.expect("close");
        assert!(matches!(store.count().await, Err(VectorError::Edge { .. })));
        std::fs::rename(dir.path().join("vectors"), dir.path().join("moved")).expect("move");
        store
            .drop_store()
            .await
            .expect("nothing left to flush at the old path");
        assert!(
            dir.path().join("moved").join("segments").is_dir(),
            "files kept as moved"
        );
    }

    const D: usize = 384;
    const N: usize = 8000;

    /// Clustered vectors, as embeddings of text are (uniform random vectors in 384 dimensions
    /// have no neighbourhoods for a graph to follow, and no embedding model makes them): `N`
    /// points around 64 centres, and queries near those centres.
    struct Clustered {
        seed: u64,
        centres: Vec<Vec<f32>>,
    }

    impl Clustered {
        fn new() -> Clustered {
            let mut c = Clustered {
                seed: 0x2545_f491_4f6c_dd1d,
                centres: Vec::new(),
            };
            c.centres = (0..64).map(|_| c.noise()).collect();
            c
        }

        fn noise(&mut self) -> Vec<f32> {
            (0..D)
                .map(|_| {
                    self.seed ^= self.seed << 13;
                    self.seed ^= self.seed >> 7;
                    self.seed ^= self.seed << 17;
                    (self.seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        }

        fn near(&mut self, centre: usize) -> Vec<f32> {
            let noise = self.noise();
            let c = &self.centres[centre % self.centres.len()];
            c.iter().zip(noise).map(|(c, n)| c + 0.5 * n).collect()
        }

        fn id(i: usize) -> String {
            format!("{i:016x}{}", "0".repeat(48))
        }

        fn points(&mut self) -> Vec<VectorPoint> {
            (0..N)
                .map(|i| VectorPoint {
                    chunk_id: Clustered::id(i),
                    doc_id: format!("doc-{}", i / 4),
                    vector: self.near(i),
                })
                .collect()
        }
    }

    /// Of 20 queries' top 10, how many the store's search shares with exact search.
    async fn overlap_with_exact(store: &EdgeStore, data: &mut Clustered) -> usize {
        let mut overlap = 0;
        for n in 0..20 {
            let q = data.near(n * 3);
            let approx = store.search(q.clone(), 10).await.expect("search");
            let exact = store.search_exact(q, 10).await.expect("exact");
            overlap += approx
                .iter()
                .filter(|a| exact.iter().any(|e| e.key == a.key))
                .count();
        }
        overlap
    }

    /// Whether a segment of the shard in `dir` holds int8 copies of its vectors.
    fn has_int8_vectors(dir: &Path) -> bool {
        std::fs::read_dir(dir.join(SEGMENTS_DIR))
            .expect("segments")
            .flatten()
            .any(|s| s.path().join("vector_storage/quantized.data").is_file())
    }

    /// Past qdrant's indexing threshold (~6,600 vectors of 384 values), `optimize` builds HNSW
    /// (with and without int8 vectors); its search finds what exact search finds, and writes
    /// after it still count.
    #[tokio::test]
    async fn optimize_builds_an_index_that_agrees_with_exact_search() {
        for int8 in [None, Some(2.0)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("vectors");
            let store = EdgeStore::open(path.clone(), D, 128, int8)
                .await
                .expect("a new store opens");
            let mut data = Clustered::new();
            store.upsert(data.points()).await.expect("upsert");
            assert!(
                store.optimize().await.expect("optimize"),
                "an index was built"
            );
            let indexed = {
                let guard = store.inner.shard.read().expect("guard");
                guard.as_ref().expect("open").info().indexed_vectors_count
            };
            assert!(indexed >= N / 2, "HNSW holds the vectors: {indexed}");
            assert_eq!(has_int8_vectors(&path), int8.is_some(), "int8 {int8:?}");
            store.flush().await.expect("flush");
            let overlap = overlap_with_exact(&store, &mut data).await;
            assert!(
                overlap >= 180,
                "int8 {int8:?}: recall@10 against exact: {overlap}/200"
            );

            // A point written after the build is found, a deleted document is gone.
            let fresh = data.noise();
            let new_point = VectorPoint {
                chunk_id: Clustered::id(N),
                doc_id: "doc-new".into(),
                vector: fresh.clone(),
            };
            store.upsert(vec![new_point]).await.expect("upsert after");
            assert_eq!(
                store.search(fresh, 1).await.expect("search")[0].key,
                crate::chunk::chunk_key(&Clustered::id(N))
            );
            store
                .delete_docs(vec!["doc-0".into()])
                .await
                .expect("delete");
            assert_eq!(store.count().await.expect("count"), N + 1 - 4);
            assert!(
                !store.optimize().await.expect("optimize again"),
                "nothing left to build"
            );
        }
    }

    /// A store built without int8 vectors and opened with them is rebuilt at its next
    /// `optimize`, keeps every point, and still agrees with exact search; and back again.
    #[tokio::test]
    async fn a_store_opened_with_other_quantization_is_rebuilt_to_match() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("vectors");
        let mut data = Clustered::new();
        {
            let store = EdgeStore::open(path.clone(), D, 128, None)
                .await
                .expect("open");
            store.upsert(data.points()).await.expect("upsert");
            assert!(store.optimize().await.expect("optimize"));
            store.flush().await.expect("flush");
        }
        assert!(!has_int8_vectors(&path));
        for int8 in [Some(2.0), None] {
            let store = EdgeStore::open(path.clone(), D, 128, int8)
                .await
                .expect("reopen");
            assert_eq!(store.count().await.expect("count"), N, "searchable before");
            assert!(
                store.optimize().await.expect("optimize"),
                "int8 {int8:?}: the segments were rebuilt"
            );
            assert_eq!(has_int8_vectors(&path), int8.is_some(), "int8 {int8:?}");
            assert_eq!(store.count().await.expect("count"), N, "every point kept");
            let overlap = overlap_with_exact(&store, &mut data).await;
            assert!(
                overlap >= 180,
                "int8 {int8:?}: recall@10 against exact: {overlap}/200"
            );
            store.flush().await.expect("flush");
        }
    }
}
