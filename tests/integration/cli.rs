//! The real binary, as a user runs it: the README's commands, JSON shapes, and clear errors.

use std::path::Path;
use std::process::{Command, Output};

use crate::helpers::{models_dir, squad_json, write_corpus};

pub(crate) fn domainrag(data_dir: &Path, args: &[&str]) -> Output {
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

pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// A temp dir holding `data/` with collection `docs` ingested from the fixture corpus.
pub(crate) fn docs_collection() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let inputs = dir.path().join("docs");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    write_corpus(&inputs);
    ok(&domainrag(&data, &["collection", "create", "docs"]));
    ok(&domainrag(
        &data,
        &[
            "ingest",
            "-c",
            "docs",
            "--no-progress",
            inputs.to_str().unwrap(),
        ],
    ));
    (dir, data)
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
    // `eval retrieval` and `bench search` over collection squad with its own questions.
    let on_squad = |command: &[&str], rest: &[&str]| {
        let questions = ["--collection", "squad", "--format", "squad", "--questions"];
        let args = [command, &questions, &[squad.to_str().unwrap()], rest].concat();
        domainrag(&data, &args)
    };
    let eval = json(&on_squad(&["eval", "retrieval"], &["--json"]));
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
    // `bench search`: every mode's latency, each part of a hybrid search, and the BM25 index
    // left in one segment by the ingest's end.
    let out = dir.path().join("search.json");
    ok(&on_squad(
        &["bench", "search"],
        &["--n", "20", "--out", out.to_str().unwrap()],
    ));
    let bench: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("bench search writes its JSON"))
            .expect("JSON");
    assert_eq!(bench["bm25_segments"], 1, "{bench}");
    for part in ["bm25_candidates", "dense_candidates", "fuse", "join"] {
        assert_eq!(bench["hybrid_parts"][part]["n"], 20, "{part}: {bench}");
    }
    assert_eq!(bench["modes"]["hybrid"]["without_embedding"]["n"], 20);

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
            "--k1",
            "0.9",
        ],
    ));
    let show = json(&domainrag(&data, &["collection", "show", "docs", "--json"]));
    assert_eq!(show["settings"]["fusion"]["method"], "weighted");
    // Settings read as written, not as the f64 nearest the stored f32.
    assert_eq!(show["settings"]["fusion"]["bm25_weight"], 0.4);
    assert_eq!(show["settings"]["bm25"]["k1"], 0.9);
    assert_eq!(show["stats"]["documents"], 6);
    // The human-readable form (TOML) of a collection without an adapter (TOML has no null).
    let text = ok(&domainrag(&data, &["collection", "show", "docs"]));
    assert!(
        text.contains("name = \"docs\"")
            && text.contains("k1 = 0.9\n")
            && !text.contains("adapter"),
        "{text}"
    );

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

#[test]
fn adapters_and_ask_from_the_command_line() {
    use domainrag::adapters::{BaseModelInfo, write_test_adapter};
    let (dir, data) = docs_collection();

    // A malformed adapter is refused and leaves the registry empty.
    let bad = dir.path().join("bad-adapter");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("adapter_config.json"), "{not json").expect("write");
    let out = domainrag(&data, &["adapters", "add", "broken", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adapter_config.json"));
    assert_eq!(
        json(&domainrag(&data, &["adapters", "list", "--json"])),
        serde_json::json!([])
    );

    let base =
        BaseModelInfo::from_dir(&models_dir().join("SmolLM2-135M-Instruct-hf")).expect("base");
    let good = dir.path().join("good-adapter");
    let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
    write_test_adapter(&good, &base, 4, 8.0, &["v_proj"], &layers, |i| {
        (i % 5) as f32 * 0.001
    })
    .expect("write adapter");
    ok(&domainrag(
        &data,
        &["adapters", "add", "support-v1", good.to_str().unwrap()],
    ));
    let list = json(&domainrag(&data, &["adapters", "list", "--json"]));
    assert_eq!(list[0]["name"], "support-v1");
    assert_eq!(list[0]["rank"], 4);

    // A collection without an adapter of its own answers with the house adapter once one is
    // registered, and says so.
    let before = json(&domainrag(
        &data,
        &["ask", "-c", "docs", "How do I reset my password?", "--json"],
    ));
    assert_eq!(
        before["adapter"],
        serde_json::Value::Null,
        "no house adapter yet"
    );
    ok(&domainrag(
        &data,
        &["adapters", "add", "house", good.to_str().unwrap()],
    ));
    let housed = json(&domainrag(
        &data,
        &["ask", "-c", "docs", "How do I reset my password?", "--json"],
    ));
    assert_eq!(housed["adapter"], "house");

    let out = domainrag(&data, &["collection", "set", "docs", "--adapter", "nope"]);
    assert!(!out.status.success(), "unknown adapters cannot be assigned");
    ok(&domainrag(
        &data,
        &["collection", "set", "docs", "--adapter", "support-v1"],
    ));
    let out = domainrag(&data, &["adapters", "remove", "support-v1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("docs"),
        "names the user"
    );

    let answer = json(&domainrag(
        &data,
        &["ask", "-c", "docs", "How do I reset my password?", "--json"],
    ));
    assert_eq!(answer["adapter"], "support-v1");
    for key in [
        "answer",
        "citations",
        "sources",
        "prompt_tokens",
        "completion_tokens",
        "timings_ms",
    ] {
        assert!(answer.get(key).is_some(), "missing {key}: {answer}");
    }
    assert_eq!(answer["sources"][0]["doc_id"], "faq-password");
    for key in [
        "n", "chunk_id", "doc_id", "title", "source", "text", "score",
    ] {
        assert!(
            answer["sources"][0].get(key).is_some(),
            "source lacks {key}"
        );
    }
    for key in ["retrieve", "first_token", "total"] {
        assert!(answer["timings_ms"][key].as_f64().is_some());
    }
    let base_answer = json(&domainrag(
        &data,
        &[
            "ask",
            "-c",
            "docs",
            "How do I reset my password?",
            "--no-adapter",
            "--json",
        ],
    ));
    assert_eq!(base_answer["adapter"], serde_json::Value::Null);

    ok(&domainrag(
        &data,
        &["collection", "set", "docs", "--no-adapter"],
    ));
    ok(&domainrag(&data, &["adapters", "remove", "support-v1"]));
    ok(&domainrag(&data, &["adapters", "remove", "house"]));
    assert_eq!(
        json(&domainrag(&data, &["adapters", "list", "--json"])),
        serde_json::json!([])
    );
}

/// A team with documents and no question/answer pairs: `triplets synth` drafts questions from the
/// fixture corpus and keeps those serving's retriever answers from their source; `train
/// --synthetic` goes from the collection alone to an assigned adapter that answers.
#[test]
fn synthetic_triplets_from_documents_train_an_adapter() {
    let (dir, data) = docs_collection();
    let out = dir.path().join("synth.jsonl");
    let report_path = dir.path().join("synth-report.json");
    ok(&domainrag(
        &data,
        &[
            "triplets",
            "synth",
            "-c",
            "docs",
            "--n",
            "10",
            "--out",
            out.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    let triplets: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .expect("triplets written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let questions: Vec<&str> = triplets
        .iter()
        .map(|t| t["query"].as_str().expect("query"))
        .collect();
    assert!(
        questions.contains(&"What is a partial index?"),
        "{questions:?}"
    );
    assert!(
        questions.contains(&"How do I reset my password?"),
        "{questions:?}"
    );
    let reset = triplets
        .iter()
        .find(|t| t["query"] == "How do I reset my password?")
        .expect("the reset question");
    // An instruction's answer starts at what to do, then says what it is for.
    assert!(
        reset["answer"].as_str().expect("answer").starts_with(
            "Open Settings, choose Security and click Reset password to reset your password. ["
        ),
        "{reset}"
    );
    for t in &triplets {
        // The answer is a sentence of a source in the context (its first word capitalised where
        // an instruction's answer starts mid-sentence, and the question's purpose after it where
        // it is one imperative sentence), cited by that source's number.
        let answer = t["answer"].as_str().expect("answer");
        let (answer, cite) = answer.rsplit_once(" [").expect("a citation");
        let purpose = t["query"]
            .as_str()
            .and_then(|q| q.strip_prefix("How do I "))
            .and_then(|q| q.strip_suffix('?'))
            .map(|p| p.replace("my ", "your "));
        let sentence = purpose
            .and_then(|p| answer.strip_suffix(&format!(" to {p}.")))
            .map(|said| format!("{said}."))
            .unwrap_or(answer.to_string());
        let n = cite.trim_end_matches(']');
        let context = t["context"].as_str().expect("context");
        let source = context
            .split(&format!("[{n}] "))
            .nth(1)
            .expect("the cited source is in the context");
        let source = source.split("\n\n").next().unwrap_or_default();
        assert!(
            source.to_lowercase().contains(&sentence.to_lowercase()),
            "{sentence:?} not in source {n}"
        );
        assert!(t["origin"]["rule"].is_string(), "{t}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("report"))
            .expect("report JSON");
    assert_eq!(report["kept"], triplets.len());
    assert!(report["chunks_read"].as_u64().expect("count") >= triplets.len() as u64);

    ok(&domainrag(
        &data,
        &[
            "train",
            "-c",
            "docs",
            "--synthetic",
            "10",
            "--name",
            "docs-synth",
            "--epochs",
            "1",
            "--batch",
            "1",
            "--val-split",
            "0",
            "--assign",
            "--no-progress",
        ],
    ));
    let answer = json(&domainrag(
        &data,
        &["ask", "-c", "docs", "What is a partial index?", "--json"],
    ));
    assert_eq!(answer["adapter"], "docs-synth");
    assert!(!answer["answer"].as_str().expect("text").is_empty());
}

/// README "Operations": a stopped data dir archived with tar and unpacked elsewhere is the same
/// appliance: collections with their counts and search results, keys, audit log.
#[test]
fn a_data_dir_backed_up_with_tar_restores_whole() {
    let (dir, data) = docs_collection();
    let key = ok(&domainrag(
        &data,
        &["keys", "create", "--admin", "--name", "ops"],
    ));
    let before = json(&domainrag(&data, &["collection", "show", "docs", "--json"]));
    let hits_before = json(&domainrag(
        &data,
        &["search", "-c", "docs", "--json", "reset password"],
    ));
    let archive = dir.path().join("backup.tar.gz");
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&data)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(tar.success());
    std::fs::remove_dir_all(&data).expect("lose the original");
    let restored = dir.path().join("restored");
    std::fs::create_dir_all(&restored).expect("mkdir");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&restored)
        .status()
        .expect("tar runs");
    assert!(untar.success());
    let after = json(&domainrag(
        &restored,
        &["collection", "show", "docs", "--json"],
    ));
    for field in ["documents", "chunks", "vectors"] {
        assert_eq!(after["stats"][field], before["stats"][field], "{field}");
    }
    assert!(after["stats"]["chunks"].as_u64().unwrap_or(0) > 0);
    let hits_after = json(&domainrag(
        &restored,
        &["search", "-c", "docs", "--json", "reset password"],
    ));
    assert_eq!(hits_after, hits_before);
    let keys = json(&domainrag(&restored, &["keys", "list", "--json"]));
    assert_eq!(
        keys[0]["id"],
        key.trim().split('_').nth(1).expect("id in the key")
    );
    assert!(restored.join("audit.jsonl").is_file());
}

/// A PDF that inflates one stream thousands of times (a few KB on disk, gigabytes when read) is
/// read by the bounded helper process: the file fails with a clear reason, the rest of the ingest
/// goes on, and the CLI itself never holds the inflated bytes.
#[test]
fn a_pdf_bomb_fails_alone_and_the_ingest_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    let bomb = crate::helpers::pdf_bomb(4000, 1 << 20);
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    std::fs::write(inputs.join("bomb.pdf"), bomb).expect("write");
    std::fs::write(
        inputs.join("fine.txt"),
        "Shipping\n\nOrders ship within two business days.",
    )
    .expect("write");
    ok(&domainrag(&data, &["collection", "create", "docs"]));
    let report = json(&domainrag(
        &data,
        &[
            "ingest",
            "-c",
            "docs",
            "--no-progress",
            "--json",
            inputs.to_str().unwrap(),
        ],
    ));
    assert_eq!(report["documents"], 1, "{report}");
    let failure = &report["failures"][0];
    assert!(
        failure["source"]
            .as_str()
            .unwrap_or_default()
            .ends_with("bomb.pdf"),
        "{report}"
    );
    assert!(
        failure["error"]
            .as_str()
            .unwrap_or_default()
            .contains("MiB to read"),
        "{report}"
    );
    let hits = json(&domainrag(
        &data,
        &["search", "-c", "docs", "--json", "when do orders ship"],
    ));
    assert!(hits.to_string().contains("two business days"), "{hits}");
}
