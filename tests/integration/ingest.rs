//! Ingest through the library: every format, idempotent re-ingest, bad inputs, deletion.

use domainrag::ingest::{Format, NoProgress};
use domainrag::retrieve::{Mode, Retriever};

use crate::helpers::{TestCollection, doc_id, embedder, squad_json, write_corpus};

#[tokio::test]
async fn every_format_is_ingested_and_counted() {
    let t = TestCollection::new("formats").await;
    let inputs = t.inputs();
    write_corpus(&inputs);
    std::fs::write(inputs.join("notes.png"), b"\x89PNG not read").expect("write png");
    let report = t
        .ingestor()
        .await
        .ingest_paths(std::slice::from_ref(&inputs), Format::Auto, &NoProgress)
        .await
        .expect("ingest");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.files, 5);
    assert_eq!(report.skipped_files, 1, "the .png is skipped");
    assert_eq!(report.documents, 6, "5 files, the JSONL holds 2 documents");
    let col = t.open().await;
    let stats = col.stats().await.expect("stats");
    assert_eq!(stats.documents, 6);
    assert_eq!(stats.chunks, report.chunks);
    assert_eq!(stats.vectors, stats.chunks, "one vector per chunk");

    let ledger = col.ledger();
    assert_eq!(
        ledger[&doc_id(&inputs, "backup.html")].title,
        "Backup and Restore"
    );
    assert_eq!(
        ledger[&doc_id(&inputs, "partial-indexes.md")].title,
        "Partial indexes"
    );
    assert_eq!(ledger["faq-password"].title, "Password reset");
    assert_eq!(
        ledger[&doc_id(&inputs, "vacuum.txt")].title,
        "Routine vacuuming"
    );

    // The PDF's text layer was extracted and is searchable.
    let hits = Retriever::new(embedder().await)
        .search(&col, "widget division revenue", Mode::Bm25, 1)
        .await
        .expect("search");
    assert_eq!(hits[0].doc_id, doc_id(&inputs, "revenue.pdf"));
    assert!(hits[0].text.contains("twelve percent"), "{}", hits[0].text);
}

#[tokio::test]
async fn squad_paragraphs_become_documents() {
    let t = TestCollection::new("squad").await;
    let file = t.inputs().join("dev.json");
    std::fs::write(&file, squad_json()).expect("write squad");
    let report = t
        .ingestor()
        .await
        .ingest_paths(&[file], Format::Squad, &NoProgress)
        .await
        .expect("ingest");
    assert_eq!(report.documents, 3);
    let col = t.open().await;
    let hits = Retriever::new(embedder().await)
        .search(&col, "atomic number of oxygen", Mode::Hybrid, 3)
        .await
        .expect("search");
    assert_eq!(hits[0].doc_id, "squad:Oxygen:0");
    assert_eq!(hits[0].title, "Oxygen");
}

#[tokio::test]
async fn reingest_replaces_and_never_duplicates() {
    let t = TestCollection::new("reingest").await;
    let inputs = t.inputs();
    write_corpus(&inputs);
    let first = t
        .ingestor()
        .await
        .ingest_paths(std::slice::from_ref(&inputs), Format::Auto, &NoProgress)
        .await
        .expect("first ingest");
    let before = t.open().await.stats().await.expect("stats");

    // Same files again: nothing rewritten, nothing duplicated.
    let second = t
        .ingestor()
        .await
        .ingest_paths(std::slice::from_ref(&inputs), Format::Auto, &NoProgress)
        .await
        .expect("second ingest");
    assert_eq!(second.documents, 0);
    assert_eq!(second.unchanged, first.documents);
    let after = t.open().await.stats().await.expect("stats");
    assert_eq!(
        (after.documents, after.chunks, after.vectors),
        (before.documents, before.chunks, before.vectors)
    );

    // One file changed: its chunks are replaced, the old text is gone from both retrievers.
    std::fs::write(
        inputs.join("vacuum.txt"),
        "Autovacuum\n\nThe autovacuum launcher starts worker processes that analyze tables.",
    )
    .expect("rewrite");
    let third = t
        .ingestor()
        .await
        .ingest_paths(&[inputs.join("vacuum.txt")], Format::Auto, &NoProgress)
        .await
        .expect("third ingest");
    assert_eq!(third.documents, 1);
    let col = t.open().await;
    let stats = col.stats().await.expect("stats");
    assert_eq!(stats.documents, before.documents);
    assert_eq!(stats.vectors, stats.chunks);
    let retriever = Retriever::new(embedder().await);
    for mode in [Mode::Bm25, Mode::Hybrid] {
        let hits = retriever
            .search(&col, "dead tuples reclaims storage", mode, 10)
            .await
            .expect("search");
        assert!(
            hits.iter().all(|h| !h.text.contains("dead tuples")),
            "old chunk still found in {mode:?}"
        );
    }
    let hits = retriever
        .search(&col, "autovacuum launcher", Mode::Hybrid, 1)
        .await
        .expect("search");
    assert_eq!(hits[0].doc_id, doc_id(&inputs, "vacuum.txt"));
}

#[tokio::test]
async fn bad_inputs_fail_per_file_and_lose_nothing() {
    let t = TestCollection::new("corrupt").await;
    let inputs = t.inputs();
    write_corpus(&inputs);
    t.ingestor()
        .await
        .ingest_paths(std::slice::from_ref(&inputs), Format::Auto, &NoProgress)
        .await
        .expect("good ingest");
    let before = t.open().await.stats().await.expect("stats");

    let bad = t.dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("broken.pdf"),
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage",
    )
    .expect("w");
    std::fs::write(bad.join("latin1.txt"), b"caf\xe9 au lait").expect("w");
    std::fs::write(bad.join("empty.md"), b"").expect("w");
    std::fs::write(bad.join("blob.txt"), b"ELF\x00\x01\x02binary").expect("w");
    std::fs::write(
        bad.join("lines.jsonl"),
        "{\"id\": \"ok-line\", \"text\": \"a good line about kayaks\"}\nnot json\n",
    )
    .expect("w");
    // A stored document whose file is now corrupt keeps its stored version.
    std::fs::write(inputs.join("vacuum.txt"), b"\xff\xfe\x00garbage").expect("w");

    let report = t
        .ingestor()
        .await
        .ingest_paths(
            &[bad.clone(), inputs.join("vacuum.txt")],
            Format::Auto,
            &NoProgress,
        )
        .await
        .expect("ingest with bad files completes");
    let failed: Vec<(String, String)> = report
        .failures
        .iter()
        .map(|f| {
            (
                std::path::Path::new(&f.source)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                f.error.clone(),
            )
        })
        .collect();
    let reason = |name: &str| {
        failed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no failure for {name}: {failed:?}"))
    };
    assert!(
        reason("broken.pdf").contains("PDF"),
        "{}",
        reason("broken.pdf")
    );
    assert!(reason("latin1.txt").contains("UTF-8"));
    assert!(reason("empty.md").contains("empty"));
    assert!(reason("blob.txt").contains("binary"));
    assert!(reason("lines.jsonl").contains("line 2"));
    assert!(reason("vacuum.txt").contains("binary"));
    assert_eq!(report.documents, 1, "only the good JSONL line is written");

    let col = t.open().await;
    let after = col.stats().await.expect("stats");
    assert_eq!(after.documents, before.documents + 1);
    let hits = Retriever::new(embedder().await)
        .search(&col, "VACUUM dead tuples", Mode::Hybrid, 1)
        .await
        .expect("search");
    assert_eq!(
        hits[0].doc_id,
        doc_id(&inputs, "vacuum.txt"),
        "stored version kept"
    );
}

#[tokio::test]
async fn missing_input_is_an_error_naming_it() {
    let t = TestCollection::new("missing").await;
    let err = t
        .ingestor()
        .await
        .ingest_paths(&[t.dir.path().join("nope")], Format::Auto, &NoProgress)
        .await
        .expect_err("missing path");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn documents_and_collections_can_be_deleted() {
    let t = TestCollection::new("deletion").await;
    let inputs = t.inputs();
    write_corpus(&inputs);
    let ingestor = t.ingestor().await;
    ingestor
        .ingest_paths(std::slice::from_ref(&inputs), Format::Auto, &NoProgress)
        .await
        .expect("ingest");
    // One open handle per collection: the embedded store is locked by the handle that has it.
    let err = t
        .catalog
        .open(&t.name)
        .await
        .expect_err("locked while the ingestor holds it");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(ingestor);
    let col = t.open().await;
    col.delete_documents(vec!["faq-password".into()])
        .await
        .expect("delete doc");
    let stats = col.stats().await.expect("stats");
    assert_eq!(stats.documents, 5);
    assert_eq!(stats.vectors, stats.chunks);
    let hits = Retriever::new(embedder().await)
        .search(&col, "reset your password", Mode::Hybrid, 10)
        .await
        .expect("search");
    assert!(hits.iter().all(|h| h.doc_id != "faq-password"));
    drop(col);

    t.catalog.delete(&t.name).await.expect("delete collection");
    assert!(t.catalog.list().expect("list").is_empty());
    assert!(!t.catalog.dir_of(&t.name).exists());
    let err = t.catalog.open(&t.name).await.expect_err("gone");
    assert!(err.to_string().contains("does not exist"), "{err}");
}
