//! Benchmarks that write numbers (JSON + a short table), never pass/fail: search latency per
//! retrieval mode with and without query embedding, and ingest throughput.
//!
//! Latency percentiles are over individual queries run one after another (the single-user
//! latency); the machine is shared, so rerun and compare medians rather than trusting one run.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::collection::Collection;
use crate::embed::Embedder;
use crate::eval::Question;
use crate::retrieve::{Mode, RetrieveError, Retriever, search_with_vector};

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
    pub queries: usize,
    pub k: usize,
    /// Embedding one query alone.
    pub embed_query: Latency,
    pub modes: std::collections::BTreeMap<String, ModeLatency>,
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
    let mut modes = std::collections::BTreeMap::new();
    for mode in Mode::ALL {
        let mut with = Vec::with_capacity(n);
        let mut without = Vec::with_capacity(n);
        for (q, v) in queries.iter().zip(&vectors) {
            let t = Instant::now();
            retriever.search(collection, q, mode, k).await?;
            with.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let vector = if mode == Mode::Bm25 { None } else { v.clone() };
            search_with_vector(collection, q, vector, mode, k, &collection.settings.fusion).await?;
            without.push(t.elapsed().as_secs_f64() * 1e3);
        }
        modes.insert(
            mode.name().to_string(),
            ModeLatency {
                with_embedding: Latency::from_samples(with),
                without_embedding: Latency::from_samples(without),
            },
        );
    }
    Ok(SearchBench {
        collection: collection.name().to_string(),
        chunks,
        queries: n,
        k,
        embed_query: Latency::from_samples(embed_ms),
        modes,
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
    out
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
