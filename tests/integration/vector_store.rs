//! One conformance suite for every `VectorStore` backend: the embedded qdrant-edge store always,
//! a remote Qdrant server when `QDRANT_URL` names one (no Qdrant server binary can be installed on
//! these machines, so it is skipped with a printed reason otherwise).

use std::sync::Arc;

use domainrag::chunk::chunk_key;
use domainrag::config::{Settings, Sources, VectorBackend};
use domainrag::vectors::{self, VectorPoint, VectorStore};

fn unit(dim: usize, hot: usize) -> Vec<f32> {
    let mut v = vec![0.01; dim];
    v[hot] = 1.0;
    let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn chunk_id(chunk: &str) -> String {
    format!("{chunk:0<32}")
}

fn point(chunk: &str, doc: &str, hot: usize) -> VectorPoint {
    VectorPoint {
        chunk_id: chunk_id(chunk),
        doc_id: doc.into(),
        vector: unit(8, hot),
    }
}

async fn conformance(store: Arc<dyn VectorStore>) {
    assert_eq!(store.count().await.expect("count"), 0);
    store
        .upsert(vec![
            point("a1", "a", 0),
            point("a2", "a", 1),
            point("b1", "b", 2),
        ])
        .await
        .expect("upsert");
    assert_eq!(store.count().await.expect("count"), 3);
    let hits = store.search(unit(8, 1), 2).await.expect("search");
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].key, chunk_key(&chunk_id("a2")));
    assert!(hits[0].score > hits[1].score);
    // Same chunk again replaces, never duplicates.
    store
        .upsert(vec![point("a2", "a", 1)])
        .await
        .expect("upsert again");
    assert_eq!(store.count().await.expect("count"), 3);
    store.delete_docs(vec!["a".into()]).await.expect("delete");
    assert_eq!(store.count().await.expect("count"), 1);
    let hits = store.search(unit(8, 0), 5).await.expect("search");
    assert_eq!(hits.len(), 1, "only document b's point is left");
    assert_eq!(hits[0].key, chunk_key(&chunk_id("b1")));
    let err = store
        .search(vec![1.0; 3], 1)
        .await
        .expect_err("wrong dimension");
    assert!(err.to_string().contains("dimensions"), "{err}");
    store.flush().await.expect("flush");
    store.drop_store().await.expect("drop");
}

#[tokio::test]
async fn embedded_edge_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings::load(&Sources::default()).expect("defaults");
    let store = vectors::open(&settings.vectors, "conformance", dir.path(), 8)
        .await
        .expect("open edge");
    conformance(store).await;
}

#[tokio::test]
async fn remote_qdrant_store_conforms() {
    let Ok(url) = std::env::var("QDRANT_URL") else {
        eprintln!("skipped: QDRANT_URL is not set (no Qdrant server can be installed here)");
        return;
    };
    let mut settings = Settings::load(&Sources::default()).expect("defaults");
    settings.vectors.backend = VectorBackend::Qdrant;
    settings.vectors.qdrant.url = url;
    settings.vectors.qdrant.api_key = std::env::var("QDRANT_API_KEY").ok();
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!("conformance-{}", std::process::id());
    let store = vectors::open(&settings.vectors, &name, dir.path(), 8)
        .await
        .expect("connect to qdrant");
    conformance(store).await;
}
