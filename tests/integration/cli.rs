//! The real binary, as a user runs it: the README's commands, JSON shapes, and clear errors.

use std::path::Path;
use std::process::{Command, Output};

use crate::helpers::{models_dir, squad_json, write_corpus};

fn domainrag(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--models-dir")
        .arg(models_dir())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("DOMAINRAG_ENV")
        .output()
        .expect("binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("stdout is one JSON document")
}

#[test]
fn create_ingest_search_eval_list_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let inputs = dir.path().join("docs");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    write_corpus(&inputs);
    ok(&domainrag(&data, &["collection", "create", "docs"]));
    let report = json(&domainrag(
        &data,
        &[
            "ingest",
            "--collection",
            "docs",
            "--json",
            inputs.to_str().unwrap(),
        ],
    ));
    assert_eq!(report["documents"], 6);

    let res = json(&domainrag(
        &data,
        &[
            "search",
            "--collection",
            "docs",
            "pg_dump archive",
            "--mode",
            "hybrid",
            "--k",
            "2",
            "--json",
        ],
    ));
    let results = res["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for key in [
        "chunk_id",
        "doc_id",
        "title",
        "source",
        "text",
        "score",
        "bm25_score",
        "dense_score",
    ] {
        assert!(
            results[0].get(key).is_some(),
            "missing {key}: {}",
            results[0]
        );
    }
    assert_eq!(results[0]["title"], "Backup and Restore");

    let squad = dir.path().join("dev.json");
    std::fs::write(&squad, squad_json()).expect("write squad");
    ok(&domainrag(&data, &["collection", "create", "squad"]));
    ok(&domainrag(
        &data,
        &[
            "ingest",
            "--collection",
            "squad",
            "--format",
            "squad",
            "--no-progress",
            squad.to_str().unwrap(),
        ],
    ));
    let eval = json(&domainrag(
        &data,
        &[
            "eval",
            "retrieval",
            "--collection",
            "squad",
            "--format",
            "squad",
            "--questions",
            squad.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(eval["questions"], 4);
    for mode in ["bm25", "dense", "hybrid"] {
        for metric in ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"] {
            let v = eval["modes"][mode][metric]
                .as_f64()
                .unwrap_or_else(|| panic!("{mode} {metric}: {eval}"));
            assert!((0.0..=1.0).contains(&v));
        }
        assert_eq!(
            eval["modes"][mode]["recall@5"], 1.0,
            "3 paragraphs: every gold is in the top 5"
        );
    }

    let list = json(&domainrag(&data, &["collection", "list", "--json"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["docs", "squad"]);
    ok(&domainrag(
        &data,
        &[
            "collection",
            "set",
            "docs",
            "--fusion",
            "weighted",
            "--bm25-weight",
            "0.4",
        ],
    ));
    let show = json(&domainrag(&data, &["collection", "show", "docs", "--json"]));
    assert_eq!(show["settings"]["fusion"]["method"], "weighted");
    assert_eq!(show["stats"]["documents"], 6);

    ok(&domainrag(&data, &["collection", "delete", "squad"]));
    let list = json(&domainrag(&data, &["collection", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "collection",
            "list",
        ])
        .env("DOMAINRAG__EMBEDDING__BATCHSIZE", "3")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("batchsize"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "collection",
            "list",
        ])
        .env("DOMAINRAG__INGEST__BATCH_DOCS", "0")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ingest.batch_docs"));
}

#[test]
fn missing_models_give_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    ok(&domainrag(&data, &["collection", "create", "c"]));
    let out = Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--models-dir",
            "/nonexistent/models",
            "search",
            "-c",
            "c",
            "hello",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/models/onnxruntime/libonnxruntime.so.1.32.0"),
        "{stderr}"
    );
    assert!(stderr.contains("fetch-models.sh"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_names_and_unknown_collections_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = domainrag(dir.path(), &["collection", "create", "Bad Name"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid collection name"));
    let out = domainrag(dir.path(), &["search", "-c", "nope", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    ok(&domainrag(dir.path(), &["collection", "create", "twice"]));
    let out = domainrag(dir.path(), &["collection", "create", "twice"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}
