//! Each retrieval mode finds the expected document on the fixture corpus; fusion settings are the
//! collection's own.

use domainrag::config::FusionMethod;
use domainrag::retrieve::{Mode, Retriever, search_with_vector};

use crate::helpers::{TestCollection, doc_id, embedder};

async fn corpus() -> TestCollection {
    TestCollection::with_corpus("retrieval").await
}

#[tokio::test]
async fn every_mode_finds_the_expected_document() {
    let t = corpus().await;
    let inputs = t.inputs();
    let col = t.open().await;
    let retriever = Retriever::new(embedder().await);
    let cases = [
        (
            "how do I create a partial index with a predicate",
            doc_id(&inputs, "partial-indexes.md"),
        ),
        ("pg_dump archive restore", doc_id(&inputs, "backup.html")),
        ("reset my password", "faq-password".to_string()),
        ("how long does shipping take", "faq-shipping".to_string()),
        ("vacuum dead tuples", doc_id(&inputs, "vacuum.txt")),
    ];
    for mode in Mode::ALL {
        for (query, expected) in &cases {
            let hits = retriever
                .search(&col, query, mode, 3)
                .await
                .expect("search");
            assert_eq!(&hits[0].doc_id, expected, "{mode:?} {query:?}: {hits:#?}");
            let h = &hits[0];
            match mode {
                Mode::Bm25 => assert!(h.bm25_score.is_some() && h.dense_score.is_none()),
                Mode::Dense => assert!(h.dense_score.is_some() && h.bm25_score.is_none()),
                Mode::Hybrid => assert!(h.bm25_score.is_some() || h.dense_score.is_some()),
            }
            assert!(!h.text.is_empty() && !h.source.is_empty() && !h.title.is_empty());
        }
    }
}

#[tokio::test]
async fn dense_finds_a_paraphrase_with_no_shared_words() {
    let t = corpus().await;
    let col = t.open().await;
    let hits = Retriever::new(embedder().await)
        .search(&col, "I forgot my login credentials", Mode::Dense, 1)
        .await
        .expect("search");
    assert_eq!(hits[0].doc_id, "faq-password");
}

#[tokio::test]
async fn fusion_follows_the_collection_settings() {
    let t = corpus().await;
    let col = t.open().await;
    let embedder = embedder().await;
    let query = "archive of a database";
    let vector = embedder
        .embed(vec![query.into()])
        .await
        .expect("embed")
        .pop();

    let mut bm25_only = col.settings().search();
    bm25_only.fusion.dense_weight = 0.0;
    let fused = search_with_vector(&col, query, vector.clone(), Mode::Hybrid, 5, &bm25_only)
        .await
        .expect("hybrid");
    let bm25 = search_with_vector(&col, query, None, Mode::Bm25, 5, &bm25_only)
        .await
        .expect("bm25");
    let ids = |hits: &[domainrag::retrieve::SearchHit]| {
        hits.iter().map(|h| h.chunk_id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&fused)[..bm25.len()],
        ids(&bm25)[..],
        "dense weight 0: BM25 order"
    );

    let mut weighted = col.settings().search();
    weighted.fusion.method = FusionMethod::Weighted;
    let hits = search_with_vector(&col, query, vector, Mode::Hybrid, 5, &weighted)
        .await
        .expect("weighted");
    assert!(hits[0].score <= weighted.fusion.bm25_weight + weighted.fusion.dense_weight + 1e-6);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));

    // Settings persist per collection.
    let mut s = col.settings();
    s.fusion.method = FusionMethod::Weighted;
    s.fusion.bm25_weight = 0.3;
    t.catalog.save_settings(&s).expect("save");
    assert_eq!(
        t.catalog
            .settings(&t.name)
            .expect("read")
            .fusion
            .bm25_weight,
        0.3
    );
    s.fusion.candidates = 0;
    let err = t.catalog.save_settings(&s).expect_err("invalid");
    assert!(err.to_string().contains("fusion.candidates"), "{err}");
}

#[tokio::test]
async fn bad_queries_are_refused_clearly() {
    let t = corpus().await;
    let col = t.open().await;
    let retriever = Retriever::new(embedder().await);
    let err = retriever
        .search(&col, "   ", Mode::Hybrid, 5)
        .await
        .expect_err("empty");
    assert!(err.to_string().contains("empty"), "{err}");
    let err = retriever
        .search(&col, "x", Mode::Bm25, 0)
        .await
        .expect_err("k=0");
    assert!(err.to_string().contains("k must be"), "{err}");
    // Query syntax is never an error.
    retriever
        .search(&col, "C++ \"unbalanced AND (", Mode::Hybrid, 5)
        .await
        .expect("lenient");
}

#[tokio::test]
async fn a_vector_without_its_chunk_does_not_shorten_the_results() {
    // What an ingest killed between the vector store and the BM25 commit leaves: a point whose
    // chunk was never indexed, here nearer to the query than any real chunk.
    let t = corpus().await;
    let col = t.open().await;
    let query = "how do I create a partial index with a predicate";
    let vector = embedder()
        .await
        .embed(vec![query.into()])
        .await
        .expect("embed")
        .pop()
        .expect("one vector");
    let stray = "f".repeat(64);
    col.vectors
        .upsert(vec![domainrag::vectors::VectorPoint {
            chunk_id: stray.clone(),
            doc_id: "never-indexed".into(),
            vector: vector.clone(),
        }])
        .await
        .expect("upsert");
    let settings = col.settings().search();
    for mode in [Mode::Dense, Mode::Hybrid] {
        let hits = search_with_vector(&col, query, Some(vector.clone()), mode, 3, &settings)
            .await
            .expect("search");
        assert_eq!(hits.len(), 3, "{mode:?}: {hits:#?}");
        assert!(
            hits.iter()
                .all(|h| h.chunk_id != stray && h.doc_id != "never-indexed")
        );
    }
}
