//! Retrieval over one collection: BM25 top-k, dense top-k, and their fusion (reciprocal rank fusion
//! or weighted sum of min-max normalised scores), with the collection's own fusion settings.
//!
//! Both retrievers answer with chunk keys ([`crate::chunk::chunk_key`]) and scores, run side by
//! side, and are fused on the keys; only the `k` results kept are joined against the BM25 index's
//! chunk store for text and metadata. Owns the search flow, the fusion maths (`fusion`, pure,
//! property-tested) and how a search's pieces share threads (`both`); embedding and storage are
//! called, not owned.

mod both;
mod fusion;

use std::sync::Arc;

use serde::Serialize;

use crate::collection::{Collection, CollectionError};
use crate::config::{FusionConfig, SearchSettings};
use crate::embed::{EmbedError, Embedder};
use crate::error::ErrorKind;
use crate::index::Bm25Index;
use crate::vectors::{BlockingSearch, VectorError, VectorHit};
use both::both;
pub use fusion::{Fused, fuse};

/// Which retrievers to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bm25,
    Dense,
    Hybrid,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Bm25, Mode::Dense, Mode::Hybrid];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Bm25 => "bm25",
            Mode::Dense => "dense",
            Mode::Hybrid => "hybrid",
        }
    }

    fn needs_vector(self) -> bool {
        self != Mode::Bm25
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    #[error("k must be between 1 and 1000, got {0}")]
    InvalidK(usize),
    #[error("the query is empty")]
    EmptyQuery,
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Collection(#[from] CollectionError),
    #[error("retrieval task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl RetrieveError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RetrieveError::InvalidK(_) | RetrieveError::EmptyQuery => ErrorKind::InvalidInput,
            RetrieveError::Embed(e) => e.kind(),
            RetrieveError::Collection(e) => e.kind(),
            RetrieveError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// One result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SearchHit {
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    pub source: String,
    pub text: String,
    /// The score results are ranked by (the fused score in hybrid mode).
    pub score: f32,
    /// BM25 score, when BM25 found this chunk among its candidates.
    pub bm25_score: Option<f32>,
    /// Cosine similarity, when the dense retriever found this chunk among its candidates.
    pub dense_score: Option<f32>,
}

/// Searches collections.
#[derive(Debug, Clone)]
pub struct Retriever {
    embedder: Arc<Embedder>,
}

impl Retriever {
    pub fn new(embedder: Arc<Embedder>) -> Self {
        Retriever { embedder }
    }

    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// Search `collection` for `query`, embedding the query when the mode needs it.
    pub async fn search(
        &self,
        collection: &Collection,
        query: &str,
        mode: Mode,
        k: usize,
    ) -> Result<Vec<SearchHit>, RetrieveError> {
        if query.trim().is_empty() {
            return Err(RetrieveError::EmptyQuery);
        }
        let vector = if mode.needs_vector() {
            let mut v = self.embedder.embed(vec![query.to_string()]).await?;
            v.pop()
        } else {
            None
        };
        search_with_vector(
            collection,
            query,
            vector,
            mode,
            k,
            &collection.settings().search(),
        )
        .await
    }
}

/// Search with a query vector computed beforehand (evaluation and benchmarks embed queries in
/// batches). `vector` is required for dense and hybrid modes.
///
/// With a vector store in this process (the embedded shard) the whole search is one blocking
/// task: BM25 on that thread, the vector search offered to a second one ([`both::both`]), then
/// fusion and the stored chunks; each hand-over between threads costs a wake-up, which at
/// sub-millisecond searches is a sizeable share. A store behind the network is awaited beside
/// BM25 instead.
pub async fn search_with_vector(
    collection: &Collection,
    query: &str,
    vector: Option<Vec<f32>>,
    mode: Mode,
    k: usize,
    settings: &SearchSettings,
) -> Result<Vec<SearchHit>, RetrieveError> {
    if !(1..=1000).contains(&k) {
        return Err(RetrieveError::InvalidK(k));
    }
    let vector = match (mode, vector) {
        (Mode::Bm25, _) => None,
        (_, Some(v)) => Some(v),
        (_, None) => return Err(RetrieveError::EmptyQuery),
    };
    let search = Search {
        index: Arc::clone(&collection.index),
        query: query.to_string(),
        mode,
        k,
        settings: *settings,
    };
    match (vector, collection.vectors.blocking_search()) {
        (Some(vector), None) => {
            let bm25 = search.clone();
            let (bm25, dense) = tokio::try_join!(
                async { tokio::task::spawn_blocking(move || bm25.bm25()).await? },
                dense_keys(collection, Some(vector), search.candidates()),
            )?;
            let fused = search.fuse(bm25, dense);
            tokio::task::spawn_blocking(move || search.join(fused)).await?
        }
        (vector, store) => {
            let dense = vector.zip(store);
            tokio::task::spawn_blocking(move || search.run(dense)).await?
        }
    }
}

/// How many results each retriever is asked for, for `k` results in `mode`.
pub(crate) fn candidates(mode: Mode, k: usize, fusion: &FusionConfig) -> usize {
    match mode {
        Mode::Bm25 => k,
        Mode::Dense => k + SPARE,
        Mode::Hybrid => fusion.candidates.max(k + SPARE),
    }
}

/// Dense candidates asked for beyond `k`, so that dense hits without a stored chunk (dropped by
/// [`Search::join`]) do not leave a result list short.
const SPARE: usize = 8;

/// One search's question and settings, for the blocking pool.
#[derive(Clone)]
struct Search {
    index: Arc<Bm25Index>,
    query: String,
    mode: Mode,
    k: usize,
    settings: SearchSettings,
}

impl Search {
    /// How many results each retriever is asked for.
    fn candidates(&self) -> usize {
        candidates(self.mode, self.k, &self.settings.fusion)
    }

    /// The whole search on this thread (and, for a hybrid search, a helper): `dense` is the
    /// query vector and the store's own blocking search, absent in BM25 mode.
    fn run(
        self,
        dense: Option<(Vec<f32>, BlockingSearch)>,
    ) -> Result<Vec<SearchHit>, RetrieveError> {
        let n = self.candidates();
        let dense = dense.map(|(vector, store)| move || keys(store(vector, n)));
        let (bm25, dense) = match (self.mode, dense) {
            (Mode::Hybrid, Some(dense)) => both(|| self.bm25(), dense),
            (Mode::Dense, Some(dense)) => (Ok(Vec::new()), dense()),
            _ => (self.bm25(), Ok(Vec::new())),
        };
        let fused = self.fuse(bm25?, dense?);
        self.join(fused)
    }

    /// BM25's candidates (none in dense mode).
    fn bm25(&self) -> Result<Vec<(u64, f32)>, RetrieveError> {
        if self.mode == Mode::Dense {
            return Ok(Vec::new());
        }
        Ok(self
            .index
            .search(&self.query, self.candidates(), &self.settings.bm25)
            .map_err(CollectionError::from)?)
    }

    /// The candidates ranked as the mode says.
    fn fuse(&self, bm25: Vec<(u64, f32)>, dense: Vec<(u64, f32)>) -> Vec<Fused> {
        match self.mode {
            Mode::Bm25 => only(bm25, true),
            Mode::Dense => only(dense, false),
            Mode::Hybrid => fuse(&bm25, &dense, &self.settings.fusion, self.candidates()),
        }
    }

    /// The first `k` of `fused` (ranked) that have a stored chunk, with it. A dense hit whose
    /// chunk is not in the index (an ingest interrupted between the two stores) is skipped and
    /// the next one read in its place; only as many chunks as are missing are read each round.
    fn join(&self, fused: Vec<Fused>) -> Result<Vec<SearchHit>, RetrieveError> {
        let mut hits = Vec::with_capacity(self.k);
        let mut ranked = fused.into_iter();
        while hits.len() < self.k {
            let round: Vec<Fused> = ranked.by_ref().take(self.k - hits.len()).collect();
            if round.is_empty() {
                break;
            }
            let keys: Vec<u64> = round.iter().map(|f| f.key).collect();
            let mut records = self
                .index
                .chunks_by_key(&keys)
                .map_err(CollectionError::from)?;
            hits.extend(round.into_iter().filter_map(|f| {
                let r = records.remove(&f.key)?;
                Some(SearchHit {
                    chunk_id: r.chunk_id,
                    doc_id: r.doc_id,
                    title: r.title,
                    source: r.source,
                    text: r.text,
                    score: f.score,
                    bm25_score: f.bm25_score,
                    dense_score: f.dense_score,
                })
            }));
        }
        Ok(hits)
    }
}

/// A vector store's hits as keys and scores.
fn keys(hits: Result<Vec<VectorHit>, VectorError>) -> Result<Vec<(u64, f32)>, RetrieveError> {
    Ok(hits
        .map_err(CollectionError::from)?
        .into_iter()
        .map(|h| (h.key, h.score))
        .collect())
}

/// The vector store's top `n` keys for `vector` (none without one), awaited.
pub(crate) async fn dense_keys(
    collection: &Collection,
    vector: Option<Vec<f32>>,
    n: usize,
) -> Result<Vec<(u64, f32)>, RetrieveError> {
    let Some(vector) = vector else {
        return Ok(Vec::new());
    };
    keys(collection.vectors.search(vector, n).await)
}

/// One retriever's list as results, its score being the ranking score.
fn only(list: Vec<(u64, f32)>, is_bm25: bool) -> Vec<Fused> {
    list.into_iter()
        .map(|(key, s)| Fused {
            key,
            score: s,
            bm25_score: is_bm25.then_some(s),
            dense_score: (!is_bm25).then_some(s),
        })
        .collect()
}
