//! Benchmarks that write numbers (JSON + a short table), never pass/fail: search latency per
//! retrieval mode with and without query embedding, ingest throughput, generator speed and
//! memory; `engines` compares generator configurations with llama.cpp.
//!
//! Latency percentiles are over individual queries run one after another (the single-user
//! latency); the machine is shared, so rerun and compare medians rather than trusting one run.

pub mod engines;
pub mod generate;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

pub use generate::{DecodeSpeed, GenerateBench, decode_rate, generate_speed, generate_table};

use crate::collection::{Collection, CollectionError};
use crate::embed::Embedder;
use crate::eval::Question;
use crate::retrieve::{self, Mode, RetrieveError, Retriever, search_with_vector};

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_samples(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let pct = |p: f64| {
            if n == 0 {
                0.0
            } else {
                // Nearest-rank percentile.
                let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
                ms[rank.min(n) - 1]
            }
        };
        Latency {
            n,
            p50_ms: pct(50.0),
            p95_ms: pct(95.0),
            mean_ms: if n == 0 {
                0.0
            } else {
                ms.iter().sum::<f64>() / n as f64
            },
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// Latencies of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeLatency {
    /// Query embedded as part of the search (what a user waits for).
    pub with_embedding: Latency,
    /// Query vector computed beforehand (the index alone).
    pub without_embedding: Latency,
}

/// The result of `bench search`.
#[derive(Debug, Clone, Serialize)]
pub struct SearchBench {
    pub collection: String,
    pub chunks: usize,
    /// Segments of the BM25 index (each query visits every one).
    pub bm25_segments: usize,
    pub queries: usize,
    pub k: usize,
    /// Embedding one query alone.
    pub embed_query: Latency,
    pub modes: std::collections::BTreeMap<String, ModeLatency>,
    /// The vector store alone: its own search (HNSW where built) against an exact search of
    /// every vector, top 10 of the same query vectors.
    pub dense_index: DenseIndexBench,
    /// Where a hybrid search's time goes: each part alone, one after another.
    pub hybrid_parts: HybridParts,
}

/// The parts of a hybrid search, each timed alone over the same queries (pre-embedded): a hybrid
/// search runs the two retrievers side by side, then fuses and joins.
#[derive(Debug, Clone, Serialize)]
pub struct HybridParts {
    /// Candidates each retriever is asked for, as a hybrid search asks them (the collection's
    /// fusion setting, at least `k` + a spare).
    pub candidates: usize,
    /// BM25's top candidates' keys (the index alone, on the calling thread).
    pub bm25_candidates: Latency,
    /// The vector store's top candidates' keys.
    pub dense_candidates: Latency,
    /// Fusing the two lists.
    pub fuse: Latency,
    /// Reading the `k` results' stored chunks by key.
    pub join: Latency,
}

/// How the vector store's search compares with exact search.
#[derive(Debug, Clone, Serialize)]
pub struct DenseIndexBench {
    /// Mean share of the exact top 10 that the store's own search returns.
    pub recall_at_10_vs_exact: f64,
    pub search: Latency,
    pub exact: Latency,
}

/// Run `n` queries (cycling through `questions`) in each mode.
pub async fn search_latency(
    collection: &Collection,
    embedder: &Arc<Embedder>,
    questions: &[Question],
    n: usize,
    k: usize,
) -> Result<SearchBench, RetrieveError> {
    let queries: Vec<String> = questions
        .iter()
        .cycle()
        .take(n)
        .map(|q| q.query.clone())
        .collect();
    let retriever = Retriever::new(Arc::clone(embedder));
    let chunks = collection
        .stats()
        .await
        .map(|s| s.chunks)
        .map_err(RetrieveError::from)?;
    // Warm up caches (index pages, ONNX Runtime's first-run allocations).
    for q in queries.iter().take(20) {
        retriever.search(collection, q, Mode::Hybrid, k).await?;
    }
    let mut embed_ms = Vec::with_capacity(n);
    let mut vectors = Vec::with_capacity(n);
    for q in &queries {
        let t = Instant::now();
        let mut v = embedder.embed(vec![q.clone()]).await?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1e3);
        vectors.push(v.pop());
    }
    // Each pass runs every query once, so no timed search repeats the query just before it (a
    // repeat finds the index's pages for those terms and vectors already in the CPU caches).
    let settings = collection.settings().search();
    let mut modes = std::collections::BTreeMap::new();
    for mode in Mode::ALL {
        let mut without = Vec::with_capacity(n);
        for (q, v) in queries.iter().zip(&vectors) {
            let vector = if mode == Mode::Bm25 { None } else { v.clone() };
            let t = Instant::now();
            search_with_vector(collection, q, vector, mode, k, &settings).await?;
            without.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut with = Vec::with_capacity(n);
        for q in &queries {
            let t = Instant::now();
            retriever.search(collection, q, mode, k).await?;
            with.push(t.elapsed().as_secs_f64() * 1e3);
        }
        modes.insert(
            mode.name().to_string(),
            ModeLatency {
                with_embedding: Latency::from_samples(with),
                without_embedding: Latency::from_samples(without),
            },
        );
    }
    let hybrid_parts = hybrid_parts(collection, &queries, &vectors, k).await?;
    let dense_index = dense_vs_exact(collection, vectors.into_iter().flatten().collect()).await?;
    Ok(SearchBench {
        collection: collection.name().to_string(),
        chunks,
        bm25_segments: collection.index.num_segments(),
        queries: n,
        k,
        embed_query: Latency::from_samples(embed_ms),
        modes,
        dense_index,
        hybrid_parts,
    })
}

/// Time each part of a hybrid search alone (see [`HybridParts`]).
async fn hybrid_parts(
    collection: &Collection,
    queries: &[String],
    vectors: &[Option<Vec<f32>>],
    k: usize,
) -> Result<HybridParts, RetrieveError> {
    let settings = collection.settings().search();
    let candidates = retrieve::candidates(Mode::Hybrid, k, &settings.fusion);
    let index = &collection.index;
    let err = |e| RetrieveError::from(CollectionError::from(e));
    let mut parts: [Vec<f64>; 4] = Default::default();
    for (q, v) in queries.iter().zip(vectors) {
        let Some(v) = v else { continue };
        let t = Instant::now();
        let bm25 = index.search(q, candidates, &settings.bm25).map_err(err)?;
        parts[0].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let dense = retrieve::dense_keys(collection, Some(v.clone()), candidates).await?;
        parts[1].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let fused = retrieve::fuse(&bm25, &dense, &settings.fusion, candidates);
        parts[2].push(t.elapsed().as_secs_f64() * 1e3);
        let keys: Vec<u64> = fused.iter().take(k).map(|f| f.key).collect();
        let t = Instant::now();
        index.chunks_by_key(&keys).map_err(err)?;
        parts[3].push(t.elapsed().as_secs_f64() * 1e3);
    }
    let [bm25, dense, fuse, join] = parts.map(Latency::from_samples);
    Ok(HybridParts {
        candidates,
        bm25_candidates: bm25,
        dense_candidates: dense,
        fuse,
        join,
    })
}

/// The store's search against exact search, top 10, over `vectors`.
async fn dense_vs_exact(
    collection: &Collection,
    vectors: Vec<Vec<f32>>,
) -> Result<DenseIndexBench, RetrieveError> {
    const TOP: usize = 10;
    let store = &collection.vectors;
    let (mut search_ms, mut exact_ms, mut recall) = (Vec::new(), Vec::new(), 0.0);
    for v in &vectors {
        let t = Instant::now();
        let approx = store
            .search(v.clone(), TOP)
            .await
            .map_err(CollectionError::from)?;
        search_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let exact = store
            .search_exact(v.clone(), TOP)
            .await
            .map_err(CollectionError::from)?;
        exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let found = approx
            .iter()
            .filter(|a| exact.iter().any(|e| e.key == a.key))
            .count();
        recall += found as f64 / exact.len().max(1) as f64;
    }
    Ok(DenseIndexBench {
        recall_at_10_vs_exact: recall / vectors.len().max(1) as f64,
        search: Latency::from_samples(search_ms),
        exact: Latency::from_samples(exact_ms),
    })
}

/// A short Markdown table of a search benchmark.
pub fn search_table(b: &SearchBench) -> String {
    let mut out = format!(
        "search latency, collection {} ({} chunks), {} queries, k={}\n\
         | mode | p50 ms (with embedding) | p95 ms (with) | p50 ms (index only) | p95 ms (index only) |\n\
         |---|---|---|---|---|\n",
        b.collection, b.chunks, b.queries, b.k
    );
    for (mode, l) in &b.modes {
        out.push_str(&format!(
            "| {mode} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            l.with_embedding.p50_ms,
            l.with_embedding.p95_ms,
            l.without_embedding.p50_ms,
            l.without_embedding.p95_ms
        ));
    }
    out.push_str(&format!(
        "| (query embedding alone) | {:.2} | {:.2} | | |\n",
        b.embed_query.p50_ms, b.embed_query.p95_ms
    ));
    let d = &b.dense_index;
    out.push_str(&format!(
        "vector store: recall@10 against exact search {:.4}; p50 {:.2} ms (exact {:.2} ms), \
         p95 {:.2} ms (exact {:.2} ms)\n",
        d.recall_at_10_vs_exact, d.search.p50_ms, d.exact.p50_ms, d.search.p95_ms, d.exact.p95_ms
    ));
    let h = &b.hybrid_parts;
    out.push_str(&format!(
        "hybrid, each part alone (p50 ms, {} candidates, {} BM25 segments): BM25 {:.2}, dense {:.2}, \
         fuse {:.3}, join {:.2}\n",
        h.candidates,
        b.bm25_segments,
        h.bm25_candidates.p50_ms,
        h.dense_candidates.p50_ms,
        h.fuse.p50_ms,
        h.join.p50_ms
    ));
    out
}

/// Resident set size of this process, in MiB.
/// The median of `v` (0 when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn rss_mib() -> f64 {
    crate::telemetry::proc_status_mib("VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::from_samples((1..=100).map(f64::from).rev().collect());
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p95_ms, 95.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(l.mean_ms, 50.5);
        assert_eq!(Latency::from_samples(vec![]).n, 0);
        assert_eq!(Latency::from_samples(vec![3.0]).p95_ms, 3.0);
    }
}
