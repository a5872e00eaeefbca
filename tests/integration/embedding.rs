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
