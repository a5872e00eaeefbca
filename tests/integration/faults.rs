//! The crash suite: the real binary killed with SIGKILL at each step of its multi-step writes
//! (ingest batches, document deletes, collection create and delete, adapter replace) through its
//! kill points (`domainrag::killpoint`), and with `kill -9` from outside at moments spread over a
//! server's ingest of an upload. After every kill the next start must find the ledger, BM25 and
//! the vectors agreeing, and one re-ingest must give back exactly what a clean run stores: no
//! document lost, none resurrected, no chunk or vector too many.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use domainrag::adapters::{AdapterRegistry, BaseModelInfo, write_test_adapter};
use domainrag::killpoint;
use serde_json::Value;

use crate::cli::ok;
use crate::helpers::{models_dir, serve};

/// Documents in the corpus, and per ingest batch: an ingest writes 4 batches.
const DOCS: usize = 12;
const BATCH_DOCS: &str = "3";

/// The steps of one ingest batch, in order.
const BATCH_POINTS: [&str; 6] = [
    "ingest.pending",
    "ingest.vectors_deleted",
    "ingest.vectors_upserted",
    "ingest.vectors_flushed",
    "ingest.bm25",
    "write.ledger",
];

fn run(data: &Path, kill_at: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_domainrag"));
    command
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models_dir())
        .args(args)
        .env("DOMAINRAG__INGEST__BATCH_DOCS", BATCH_DOCS)
        .env_remove("RUST_LOG")
        .env_remove("DOMAINRAG_ENV")
        .env_remove(killpoint::ENV);
    if let Some(point) = kill_at {
        command.env(killpoint::ENV, point);
    }
    command.output().expect("binary runs")
}

/// Run with a kill point that must be reached: the process has to die by SIGKILL there.
fn run_killed(data: &Path, point: &str, args: &[&str]) {
    let out = run(data, Some(point), args);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "kill point {point} not reached by {args:?}: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ingest_args<'a>(collection: &'a str, corpus: &'a Path) -> [&'a str; 5] {
    let corpus = corpus.to_str().expect("utf-8 path");
    ["ingest", "-c", collection, "--no-progress", corpus]
}

const WORDS: [&str; 23] = [
    "vacuum",
    "index",
    "table",
    "query",
    "planner",
    "tuple",
    "storage",
    "backup",
    "restore",
    "replica",
    "lock",
    "transaction",
    "commit",
    "snapshot",
    "column",
    "schema",
    "trigger",
    "function",
    "sequence",
    "partition",
    "cluster",
    "statistics",
    "buffer",
];

/// The corpus as version `v` (1 or 2), one JSONL file: the same document ids with other text
/// and other lengths (1-3 chunks each), so every batch of an ingest replaces documents.
fn write_corpus(path: &Path, v: usize) {
    let mut lines = String::new();
    for i in 0..DOCS {
        let words = 60 + ((i * 37 + v * 53) % 5) * 70 + (v - 1) * 90;
        let text: Vec<&str> = (0..words)
            .map(|w| WORDS[(i * 7 + w * 13 + v) % WORDS.len()])
            .collect();
        let record = serde_json::json!({
            "id": format!("doc-{i}"),
            "title": format!("Document {i}"),
            "text": format!("Marker kqz{i}x{v}. {}.", text.join(" ")),
        });
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).expect("write corpus");
}

/// What a collection holds: chunks per document in its ledger, and the BM25 and vector counts.
#[derive(Debug, PartialEq)]
struct Stored {
    docs: BTreeMap<String, usize>,
    chunks: u64,
    vectors: u64,
}

/// What the collection holds as the next start sees it (opening it repairs it), checked to agree:
/// the ledger's chunks = BM25's chunks = vectors.
fn stored(data: &Path, collection: &str, context: &str) -> Stored {
    let shown = ok(&run(
        data,
        None,
        &["collection", "show", collection, "--json"],
    ));
    let shown: Value = serde_json::from_str(&shown).expect("show prints JSON");
    let dir = data.join("collections").join(collection);
    assert!(
        !dir.join("pending.json").exists(),
        "{context}: the interrupted write was not repaired"
    );
    let ledger: BTreeMap<String, Value> = match std::fs::read(dir.join("documents.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).expect("the ledger parses"),
        Err(_) => BTreeMap::new(),
    };
    let docs: BTreeMap<String, usize> = ledger
        .iter()
        .map(|(id, e)| (id.clone(), e["chunks"].as_u64().expect("chunks") as usize))
        .collect();
    let s = Stored {
        chunks: shown["stats"]["chunks"].as_u64().expect("chunks"),
        vectors: shown["stats"]["vectors"].as_u64().expect("vectors"),
        docs,
    };
    let ledger_chunks = s.docs.values().sum::<usize>() as u64;
    assert_eq!(
        (ledger_chunks, s.vectors),
        (s.chunks, s.chunks),
        "{context}: ledger, BM25 and vectors disagree: {s:?}"
    );
    assert_eq!(shown["stats"]["documents"], s.docs.len());
    s
}

/// Clean ingests of both versions into `collection`, leaving version 1 stored: what every kill
/// must come back to.
fn clean_runs(data: &Path, collection: &str, corpus: &Path) -> BTreeMap<usize, Stored> {
    let mut clean = BTreeMap::new();
    for v in [2, 1] {
        write_corpus(corpus, v);
        ok(&run(data, None, &ingest_args(collection, corpus)));
        clean.insert(v, stored(data, collection, &format!("clean v{v}")));
    }
    assert_eq!(clean[&1].docs.len(), DOCS);
    assert_ne!(
        clean[&1].chunks, clean[&2].chunks,
        "the versions chunk alike"
    );
    clean
}

#[test]
fn an_ingest_killed_at_any_step_is_repaired_and_completed_by_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let corpus = dir.path().join("corpus.jsonl");
    ok(&run(&data, None, &["collection", "create", "f"]));
    let clean = clean_runs(&data, "f", &corpus);
    let mut kills = 0;
    // Each step of each of the 4 batches of a re-ingest replacing every document; then the end
    // of an ingest (HNSW built, writer not yet released).
    let mut v = 1;
    let points = (1..=4)
        .flat_map(|nth| BATCH_POINTS.map(|p| format!("{p}:{nth}")))
        .chain(["ingest.optimized".to_string()]);
    for point in points {
        v = 3 - v;
        write_corpus(&corpus, v);
        run_killed(&data, &point, &ingest_args("f", &corpus));
        stored(&data, "f", &point);
        ok(&run(&data, None, &ingest_args("f", &corpus)));
        assert_eq!(stored(&data, "f", &point), clean[&v], "{point}: re-ingest");
        kills += 1;
    }
    // Killed again while the next start repairs: the repair is redone whole.
    v = 3 - v;
    write_corpus(&corpus, v);
    run_killed(&data, "ingest.bm25:2", &ingest_args("f", &corpus));
    for point in ["repair.vectors", "repair.bm25"] {
        run_killed(&data, point, &["collection", "show", "f"]);
    }
    stored(&data, "f", "repair");
    ok(&run(&data, None, &ingest_args("f", &corpus)));
    assert_eq!(stored(&data, "f", "repair"), clean[&v]);
    kills += 3;
    // The first ingest into an empty collection, killed in its second batch.
    write_corpus(&corpus, 1);
    for (k, point) in BATCH_POINTS.iter().enumerate() {
        let name = format!("new{k}");
        ok(&run(&data, None, &["collection", "create", &name]));
        let point = format!("{point}:2");
        run_killed(&data, &point, &ingest_args(&name, &corpus));
        let partial = stored(&data, &name, &point);
        assert!(partial.docs.len() < DOCS, "{point}: {partial:?}");
        ok(&run(&data, None, &ingest_args(&name, &corpus)));
        assert_eq!(stored(&data, &name, &point), clean[&1], "{point}: new");
        kills += 1;
    }
    assert_eq!(kills, 34);
}

/// The installed weights of adapter `name`.
fn installed_weights(data: &Path, name: &str) -> Vec<u8> {
    let dir = AdapterRegistry::new(data).dir(name);
    std::fs::read(dir.join("adapter_model.safetensors")).expect("the adapter's weights")
}

fn hidden_registry_entries(data: &Path) -> Vec<String> {
    std::fs::read_dir(AdapterRegistry::new(data).root())
        .expect("the adapter registry")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn collection_create_and_delete_and_adapter_replace_survive_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus, 1);
    // Killed right after the settings were written: the collection opens (its stores are made
    // then) and takes documents.
    run_killed(
        &data,
        "collection.create.settings",
        &["collection", "create", "c"],
    );
    ok(&run(&data, None, &ingest_args("c", &corpus)));
    let whole = stored(&data, "c", "create");
    assert_eq!(whole.docs.len(), DOCS);
    for point in ["collection.delete.closed", "collection.delete.retired"] {
        run_killed(&data, point, &["collection", "delete", "c"]);
        let listed = ok(&run(&data, None, &["collection", "list", "--json"]));
        let listed: Value = serde_json::from_str(&listed).expect("json");
        let names: Vec<&str> = listed
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        // Before the rename the collection is whole; after it, gone.
        if point.ends_with("closed") {
            assert_eq!(stored(&data, "c", point), whole);
            ok(&run(&data, None, &["collection", "delete", "c"]));
        } else {
            assert!(!names.contains(&"c"), "{point}: {names:?}");
        }
        // A new collection of the name starts empty: nothing of the old one comes back.
        ok(&run(&data, None, &["collection", "create", "c"]));
        let fresh = stored(&data, "c", point);
        assert!(
            fresh.docs.is_empty() && fresh.chunks == 0,
            "{point}: {fresh:?}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(data.join("collections"))
            .expect("catalog")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".deleted-"))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
        ok(&run(&data, None, &ingest_args("c", &corpus)));
    }

    let base = BaseModelInfo::from_dir(&models_dir().join("SmolLM2-135M-Instruct-hf"))
        .expect("base model");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
    for (path, value) in [(&old, 0.01), (&new, 0.02)] {
        write_test_adapter(path, &base, 4, 8.0, &["q_proj"], &layers, |i| {
            value * (i % 7) as f32
        })
        .expect("write adapter");
    }
    let weights = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).expect("read");
    let (old_weights, new_weights) = (weights(&old), weights(&new));
    let (old_arg, new_arg) = (old.to_str().expect("utf-8"), new.to_str().expect("utf-8"));
    ok(&run(&data, None, &["adapters", "add", "a1", old_arg]));
    // Killed with the new adapter staged, and right after the two were swapped: the next
    // command finds one whole adapter (the new one only once swapped in).
    for (point, expect_new) in [("adapter.staged", false), ("adapter.replace.swapped", true)] {
        run_killed(
            &data,
            point,
            &["adapters", "add", "a1", new_arg, "--replace"],
        );
        ok(&run(&data, None, &["adapters", "show", "a1"]));
        let installed = installed_weights(&data, "a1");
        let expected = if expect_new {
            &new_weights
        } else {
            &old_weights
        };
        assert!(
            installed == *expected,
            "{point}: not the whole expected adapter"
        );
        assert!(
            hidden_registry_entries(&data).is_empty(),
            "{point}: {:?}",
            hidden_registry_entries(&data)
        );
        ok(&run(
            &data,
            None,
            &["adapters", "add", "a1", old_arg, "--replace"],
        ));
    }
}

/// Delete document `doc` through the API.
async fn delete_doc(client: &reqwest::Client, base: &str, doc: &str) -> reqwest::Result<u16> {
    let url = format!("{base}/api/collections/f/documents/{doc}");
    Ok(client.delete(url).send().await?.status().as_u16())
}

/// Whether a BM25 search for `word` finds document `doc`.
fn bm25_finds(data: &Path, word: &str, doc: &str) -> bool {
    let out = ok(&run(
        data,
        None,
        &["search", "-c", "f", "--mode", "bm25", "--json", word],
    ));
    let hits: Value = serde_json::from_str(&out).expect("search prints JSON");
    hits["results"]
        .as_array()
        .expect("hits")
        .iter()
        .any(|h| h["doc_id"] == doc)
}

#[tokio::test]
async fn a_server_killed_mid_delete_or_mid_ingest_loses_and_resurrects_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let corpus = dir.path().join("corpus.jsonl");
    ok(&run(&data, None, &["collection", "create", "f"]));
    let clean = clean_runs(&data, "f", &corpus);
    let client = crate::helpers::http_client()
        .build()
        .expect("client builds");
    let batch = [("DOMAINRAG__INGEST__BATCH_DOCS", BATCH_DOCS)];
    let victims = ["doc-0", "doc-1"];
    // Each step of the first and of the second delete: a delete that began is finished by the
    // repair, in all three stores, and stays finished.
    for point in [
        "delete.pending",
        "delete.vectors",
        "delete.bm25",
        "write.ledger",
        "delete.optimized",
    ] {
        for nth in 1..=2 {
            let spec = format!("{point}:{nth}");
            let env = [batch[0], (killpoint::ENV, spec.as_str())];
            let (mut server, base) = serve(&data, &env).await;
            for (j, victim) in victims[..nth].iter().enumerate() {
                let answer = delete_doc(&client, &base, victim).await;
                if j + 1 < nth {
                    assert_eq!(answer.ok(), Some(204), "{spec}");
                } else {
                    assert!(answer.is_err(), "{spec}: the server answered {answer:?}");
                }
            }
            let status = server.wait().expect("reaped");
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{spec}");
            let s = stored(&data, "f", &spec);
            assert_eq!(s.docs.len(), DOCS - nth, "{spec}");
            for (k, victim) in victims[..nth].iter().enumerate() {
                assert!(!s.docs.contains_key(*victim), "{spec}: {victim} is back");
                assert!(!bm25_finds(&data, &format!("kqz{k}x1"), victim), "{spec}");
            }
            ok(&run(&data, None, &ingest_args("f", &corpus)));
            assert_eq!(stored(&data, "f", &spec), clean[&1], "{spec}: re-ingest");
        }
    }
    // kill -9 from outside at moments spread over an uploaded file's ingest (versions
    // alternating, so each ingest replaces every document).
    let upload = |v: usize| {
        write_corpus(&corpus, v);
        reqwest::multipart::Form::new().part(
            "files",
            reqwest::multipart::Part::bytes(std::fs::read(&corpus).expect("corpus"))
                .file_name("corpus.jsonl"),
        )
    };
    let (mut server, base) = serve(&data, &batch).await;
    let started = Instant::now();
    let job: Value = client
        .post(format!("{base}/api/collections/f/documents"))
        .multipart(upload(2))
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("job");
    let job_url = format!("{base}/api/jobs/{}", job["id"].as_str().expect("job id"));
    loop {
        let j: Value = client
            .get(&job_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["status"] != "queued" && j["status"] != "running" {
            assert_eq!(j["status"], "done", "{j}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_time = started.elapsed();
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");
    assert_eq!(stored(&data, "f", "upload"), clean[&2]);
    for k in 0..8u32 {
        let v = if k % 2 == 0 { 1 } else { 2 };
        let (mut server, base) = serve(&data, &batch).await;
        let accepted = client
            .post(format!("{base}/api/collections/f/documents"))
            .multipart(upload(v))
            .send()
            .await
            .expect("upload");
        assert_eq!(accepted.status().as_u16(), 202);
        tokio::time::sleep(ingest_time * k / 7).await;
        server.kill().expect("SIGKILL");
        server.wait().expect("reaped");
        let context = format!("kill -9 at {k}/7 of an ingest");
        stored(&data, "f", &context);
        ok(&run(&data, None, &ingest_args("f", &corpus)));
        assert_eq!(stored(&data, "f", &context), clean[&v], "{context}");
    }
}
