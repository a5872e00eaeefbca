//! The Rust embedder reproduces the reference embeddings that scripts/check_embedding.py computed
//! with an independent numpy forward pass.

use crate::helpers::{embedder, models_dir};

#[tokio::test]
async fn rust_embeddings_match_the_numpy_reference() {
    let path = models_dir().join("all-MiniLM-L6-v2/reference_embeddings.json");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("reference file")).expect("json");
    let sentences = reference["sentences"].as_array().expect("sentences");
    assert!(sentences.len() >= 4);
    let texts: Vec<String> = sentences
        .iter()
        .map(|s| s["text"].as_str().expect("text").to_string())
        .collect();
    let got = embedder().await.embed(texts.clone()).await.expect("embed");
    for (s, v) in sentences.iter().zip(&got) {
        let want: Vec<f32> = s["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(v.len(), 384);
        let max_diff = v
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "{:?}: max abs diff {max_diff}", s["text"]);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised");
    }
}

/// A search's query embedding goes before the rest of a bulk (ingest) embedding instead of waiting
/// for all of it: with 4,000 texts in flight, one query finishes while the bulk is still running.
/// (Order of completion, seen by the threads themselves, not time, is asserted.)
#[tokio::test]
async fn a_query_does_not_wait_for_a_whole_bulk_embedding() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let embedder = embedder().await;
    let bulk_texts: Vec<String> = (0..4000)
        .map(|i| format!("paragraph {i} about vacuuming tables, partial indexes and backups"))
        .collect();
    let bulk_done = std::sync::Arc::new(AtomicBool::new(false));
    let bulk = {
        let (e, done) = (
            std::sync::Arc::clone(&embedder),
            std::sync::Arc::clone(&bulk_done),
        );
        std::thread::spawn(move || {
            let out = e.embed_blocking(&bulk_texts);
            done.store(true, Ordering::SeqCst);
            out.map(|v| v.len())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !bulk_done.load(Ordering::SeqCst),
        "the bulk call must still be running for this test to mean anything"
    );
    let query = embedder
        .embed_blocking(&["how do I reset my password"])
        .expect("query");
    let bulk_finished_first = bulk_done.load(Ordering::SeqCst);
    assert_eq!(query[0].len(), 384);
    assert!(
        !bulk_finished_first,
        "the query waited for the whole bulk embedding"
    );
    assert_eq!(bulk.join().expect("join").expect("bulk"), 4000);
}
