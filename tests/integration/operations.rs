//! The application core (`domainrag::app::App`) that the CLI and the server both call: its rules
//! hold whichever edge asks (real tantivy, qdrant-edge and embedding model; no server, no LLM).

use domainrag::app::App;
use domainrag::error::ErrorKind;
use domainrag::ingest::{Format, Ingestor, NoProgress};

use crate::helpers::{embedder, settings, write_corpus};

#[tokio::test]
async fn collection_rules_hold_and_deletes_reach_every_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = App::new(settings(dir.path()), None);
    app.recover();

    // An adapter must be registered before a collection can use it; nothing is created otherwise.
    let Err(err) = app
        .create_collection("team", |s| s.adapter = Some("not-registered".into()))
        .await
    else {
        panic!("unregistered adapter refused")
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(app.catalog.list().expect("list").is_empty());

    let c = app
        .create_collection("team", |s| s.chunking.max_words = 60)
        .await
        .expect("create");
    assert_eq!(c.settings().chunking.max_words, 60);
    // Chunking may change while the collection is empty.
    app.update_collection("team", |s| s.chunking.max_words = 80)
        .await
        .expect("chunking of an empty collection");

    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    write_corpus(&inputs);
    Ingestor::new(
        app.collection("team").await.expect("open"),
        embedder().await,
        8,
    )
    .ingest_paths(&[inputs], Format::Auto, &NoProgress)
    .await
    .expect("ingest");

    // Once documents are stored, chunking is fixed; other settings still change and persist.
    let Err(err) = app
        .update_collection("team", |s| s.chunking.max_words = 20)
        .await
    else {
        panic!("chunking fixed")
    };
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let (_, s) = app
        .update_collection("team", |s| s.bm25.title_weight = 0.25)
        .await
        .expect("bm25 change");
    assert_eq!(s.bm25.title_weight, 0.25);
    assert_eq!(s.chunking.max_words, 80);
    assert_eq!(
        app.catalog
            .settings("team")
            .expect("saved")
            .bm25
            .title_weight,
        0.25
    );

    // A document delete reaches the ledger, BM25 and the vectors; an unknown one is "not found".
    let c = app.collection("team").await.expect("open");
    let before = c.stats().await.expect("stats");
    let Err(err) = app.delete_document("team", "no-such-doc").await else {
        panic!("unknown document")
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    app.delete_document("team", "faq-password")
        .await
        .expect("delete document");
    let after = c.stats().await.expect("stats");
    assert_eq!(after.documents, before.documents - 1);
    assert!(after.chunks < before.chunks);
    assert_eq!(after.vectors, after.chunks);
    assert!(!c.has_document("faq-password"));
    drop(c);

    // Removing an adapter nobody registered is "not found"; deleting the collection removes it.
    let Err(err) = app.remove_adapter("nope").await else {
        panic!("no adapter")
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    app.delete_collection("team").await.expect("delete");
    assert!(app.catalog.list().expect("list").is_empty());
    let Err(err) = app.collection("team").await else {
        panic!("gone")
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn a_damaged_collection_is_deleted_without_being_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let first = App::new(settings(dir.path()), None);
        first
            .create_collection("broken", |_| {})
            .await
            .expect("create");
        first
            .create_collection("fine", |_| {})
            .await
            .expect("create");
    }
    // A fresh core (as in the next process): one collection is damaged on disk, one is whole.
    let app = App::new(settings(dir.path()), None);
    std::fs::write(
        app.catalog.dir_of("broken").join("documents.json"),
        b"{ not json",
    )
    .expect("damage the ledger");
    let Err(err) = app.collection("broken").await else {
        panic!("damaged")
    };
    assert!(err.is_damage(), "{err}");
    app.delete_collection("broken")
        .await
        .expect("delete damaged");
    assert_eq!(app.catalog.list().expect("list"), ["fine"]);
    app.collection("fine").await.expect("the other opens");
}
