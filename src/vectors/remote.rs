//! The remote vector store: one collection on a Qdrant server, reached over gRPC with qdrant-client.
//!
//! Owns the server-side collection `<collection_prefix><name>` and every call to the server; no
//! qdrant-client type leaves this file. It must not touch any other collection on the server (only its
//! own name is created, written or deleted) and knows nothing about chunk text, embedding or fusion.
//!
//! Writes are sent with `wait=true`, so they are applied (and in the server's WAL) when they return:
//! the same read-your-writes behaviour as the embedded store, and [`VectorStore::flush`] has nothing
//! left to do.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::point_id::PointIdOptions;
use qdrant_client::qdrant::vectors_config::Config as VectorsConfigKind;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, Filter, PointStruct, Query, QueryPointsBuilder,
    ScoredPoint, SearchParamsBuilder, UpsertPointsBuilder, Value, VectorParamsBuilder,
};
use qdrant_client::{Payload, Qdrant};

use super::{VectorError, VectorHit, VectorPoint, VectorStore};
use crate::config::QdrantConfig;

/// Payload key holding the chunk id of a point.
const CHUNK_ID: &str = "chunk_id";
/// Payload key holding the document id of a point; deletes filter on it.
const DOC_ID: &str = "doc_id";

/// Points per upsert request, to keep each gRPC message and server-side batch small.
const UPSERT_BATCH: usize = 256;

/// A collection's vectors in a collection of a remote Qdrant server.
pub(crate) struct RemoteStore {
    client: Qdrant,
    url: String,
    collection: String,
    dimension: usize,
}

impl fmt::Debug for RemoteStore {
    // `Qdrant` has no Debug, and its config holds the API key, which must not reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStore")
            .field("url", &self.url)
            .field("collection", &self.collection)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// Connect to the server and make sure collection `<prefix><name>` exists with one unnamed cosine
    /// vector of `dimension` values and a keyword index on `doc_id`, creating both if needed.
    pub(crate) async fn connect(
        config: &QdrantConfig,
        name: &str,
        dimension: usize,
    ) -> Result<Self, VectorError> {
        let collection = format!("{}{name}", config.collection_prefix);
        let timeout = Duration::from_secs(config.timeout_secs);
        // The config file's default key is "", which means "no key", not an empty one.
        let api_key = config.api_key.clone().filter(|key| !key.is_empty());
        let client = Qdrant::from_url(&config.url)
            .api_key(api_key)
            .timeout(timeout)
            .connect_timeout(timeout)
            // The version check runs a blocking health check from inside `build` and prints to
            // stdout; the first request below reports an unreachable server instead.
            .skip_compatibility_check()
            .build()
            .map_err(|e| VectorError::Remote {
                url: config.url.clone(),
                collection: collection.clone(),
                message: format!("cannot build the client: {e}"),
            })?;
        let store = Self {
            client,
            url: config.url.clone(),
            collection,
            dimension,
        };
        store.ensure_collection().await?;
        Ok(store)
    }

    async fn ensure_collection(&self) -> Result<(), VectorError> {
        let exists = self
            .client
            .collection_exists(self.collection.as_str())
            .await
            .map_err(|e| self.error(format!("cannot check whether the collection exists: {e}")))?;
        if !exists {
            let created = self
                .client
                .create_collection(
                    CreateCollectionBuilder::new(self.collection.as_str()).vectors_config(
                        VectorParamsBuilder::new(self.dimension as u64, Distance::Cosine),
                    ),
                )
                .await;
            if let Err(e) = created {
                // Another process may have created it between the check and the create; its
                // layout is then checked below like any existing collection's.
                let exists_now = self
                    .client
                    .collection_exists(self.collection.as_str())
                    .await
                    .unwrap_or(false);
                if !exists_now {
                    return Err(self.error(format!("cannot create the collection: {e}")));
                }
            }
        }
        self.check_vectors().await?;
        // Also on existing collections, in case one was made without it; the server treats
        // re-creating an index of the same type as done.
        self.client
            .create_field_index(
                CreateFieldIndexCollectionBuilder::new(
                    self.collection.as_str(),
                    DOC_ID,
                    FieldType::Keyword,
                )
                .wait(true),
            )
            .await
            .map_err(|e| self.error(format!("cannot index {DOC_ID}: {e}")))?;
        Ok(())
    }

    /// The collection must hold one unnamed cosine vector of our dimension.
    async fn check_vectors(&self) -> Result<(), VectorError> {
        let info = self
            .client
            .collection_info(self.collection.as_str())
            .await
            .map_err(|e| self.error(format!("cannot read the collection's parameters: {e}")))?;
        let vectors = info
            .result
            .and_then(|info| info.config)
            .and_then(|config| config.params)
            .and_then(|params| params.vectors_config)
            .and_then(|vectors| vectors.config);
        match vectors {
            Some(VectorsConfigKind::Params(params)) => {
                if params.distance != Distance::Cosine as i32 {
                    let distance = Distance::try_from(params.distance)
                        .map_or("an unknown", |distance| distance.as_str_name());
                    return Err(self.error(format!(
                        "the collection uses {distance} distance, not Cosine"
                    )));
                }
                let size = usize::try_from(params.size).unwrap_or(usize::MAX);
                if size != self.dimension {
                    return Err(VectorError::Dimension {
                        expected: size,
                        got: self.dimension,
                    });
                }
                Ok(())
            }
            Some(VectorsConfigKind::ParamsMap(_)) => Err(self.error(
                "the collection has named vectors; it was not created by domainrag".to_owned(),
            )),
            None => Err(self
                .error("the server did not report the collection's vector parameters".to_owned())),
        }
    }

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

    fn error(&self, message: String) -> VectorError {
        VectorError::Remote {
            url: self.url.clone(),
            collection: self.collection.clone(),
            message,
        }
    }

    /// The hit of a scored point, or `None` (logged) for a UUID point id, which only a foreign
    /// writer could have stored (domainrag's ids are numbers: [`crate::chunk::chunk_key`]).
    fn hit(&self, point: ScoredPoint) -> Option<VectorHit> {
        match point.id.and_then(|id| id.point_id_options) {
            Some(PointIdOptions::Num(key)) => Some(VectorHit {
                key,
                score: point.score,
            }),
            _ => {
                tracing::warn!(collection = %self.collection, "vector point without a numeric id skipped");
                None
            }
        }
    }

    /// The `k` nearest points (every vector compared when `exact`).
    async fn query(
        &self,
        vector: Vec<f32>,
        k: usize,
        exact: bool,
    ) -> Result<Vec<VectorHit>, VectorError> {
        self.check_dimension(vector.len())?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let response = self
            .client
            .query(
                QueryPointsBuilder::new(self.collection.as_str())
                    .query(Query::new_nearest(vector))
                    .limit(k as u64)
                    .params(SearchParamsBuilder::default().exact(exact))
                    .with_payload(false),
            )
            .await
            .map_err(|e| self.error(format!("search failed: {e}")))?;
        Ok(response
            .result
            .into_iter()
            .filter_map(|point| self.hit(point))
            .collect())
    }
}

#[async_trait]
impl VectorStore for RemoteStore {
    async fn upsert(&self, points: Vec<VectorPoint>) -> Result<(), VectorError> {
        // Check every vector before sending any, so a bad batch leaves the collection untouched.
        for point in &points {
            self.check_dimension(point.vector.len())?;
        }
        if points.is_empty() {
            return Ok(());
        }
        let points: Vec<PointStruct> = points
            .into_iter()
            .map(|point| {
                let id = crate::chunk::chunk_key(&point.chunk_id);
                let payload = Payload::from([
                    (CHUNK_ID, Value::from(point.chunk_id)),
                    (DOC_ID, Value::from(point.doc_id)),
                ]);
                PointStruct::new(id, point.vector, payload)
            })
            .collect();
        self.client
            .upsert_points_chunked(
                UpsertPointsBuilder::new(self.collection.as_str(), points).wait(true),
                UPSERT_BATCH,
            )
            .await
            .map_err(|e| self.error(format!("cannot upsert points: {e}")))?;
        Ok(())
    }

    async fn delete_docs(&self, doc_ids: Vec<String>) -> Result<(), VectorError> {
        if doc_ids.is_empty() {
            return Ok(());
        }
        // A keyword list is a match-any condition, served by the `doc_id` index.
        let filter = Filter::must([Condition::matches(DOC_ID, doc_ids)]);
        self.client
            .delete_points(
                DeletePointsBuilder::new(self.collection.as_str())
                    .points(filter)
                    .wait(true),
            )
            .await
            .map_err(|e| self.error(format!("cannot delete points: {e}")))?;
        Ok(())
    }

    async fn search(&self, vector: Vec<f32>, k: usize) -> Result<Vec<VectorHit>, VectorError> {
        self.query(vector, k, false).await
    }

    async fn search_exact(
        &self,
        vector: Vec<f32>,
        k: usize,
    ) -> Result<Vec<VectorHit>, VectorError> {
        self.query(vector, k, true).await
    }

    async fn optimize(&self) -> Result<bool, VectorError> {
        // The server's optimisers index collections by themselves.
        Ok(false)
    }

    async fn count(&self) -> Result<usize, VectorError> {
        let response = self
            .client
            .count(CountPointsBuilder::new(self.collection.as_str()).exact(true))
            .await
            .map_err(|e| self.error(format!("cannot count points: {e}")))?;
        let count = response
            .result
            .ok_or_else(|| self.error("the server sent no count".to_owned()))?
            .count;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    async fn flush(&self) -> Result<(), VectorError> {
        // Every write waited for the server to apply it; durability is the server's WAL.
        Ok(())
    }

    async fn drop_store(&self) -> Result<(), VectorError> {
        self.client
            .delete_collection(self.collection.as_str())
            .await
            .map_err(|e| self.error(format!("cannot delete the collection: {e}")))?;
        Ok(())
    }
}
