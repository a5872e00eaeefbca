//! A/B testing over real HTTP with the native engine and two registered adapters: a 50/50
//! experiment, 200 questions from 40 simulated users whose feedback favours the candidate, sticky
//! assignment, the report's interval, blind comparisons, promotion; feedback and the log's export, deletion with a
//! document, and the log surviving a SIGKILL of the real `serve` binary.

use std::collections::HashMap;
use std::path::Path;

use domainrag::adapters::{AdapterRegistry, BaseModelInfo, LORA_MODULES, write_test_adapter};
use reqwest::Method;
use serde_json::{Value, json};

use crate::app::spawn_app_tuned;
use crate::helpers::{models_dir, serve};

/// Register a small synthetic LoRA adapter named `name` in `data_dir`'s registry.
pub(crate) fn register(data_dir: &Path, name: &str, seed: usize) {
    let base = BaseModelInfo::from_dir(&models_dir().join("SmolLM2-135M-Instruct-hf")).unwrap();
    let src = tempfile::tempdir().expect("tempdir");
    let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
    write_test_adapter(
        src.path(),
        &base,
        4,
        8.0,
        &LORA_MODULES[..2],
        &layers,
        |i| (((i * 7919 + seed * 104_729) % 13) as f32 - 6.0) * 0.01,
    )
    .expect("write adapter");
    AdapterRegistry::new(data_dir)
        .add(name, src.path(), &base)
        .expect("adapter is valid");
}

const QUESTIONS: [&str; 5] = [
    "How do I reset my password?",
    "What is a partial index?",
    "How do I back up the database?",
    "What does VACUUM do?",
    "How do I restore a backup?",
];

#[tokio::test]
async fn an_experiment_splits_users_reports_the_favoured_arm_and_promotes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    register(dir.path(), "arm-a", 1);
    register(dir.path(), "arm-b", 2);
    let app = spawn_app_tuned(dir.path(), |s| {
        s.generate.engine = "native".into();
        s.generate.max_tokens = 8;
        s.generate.max_concurrent = 4;
        s.generate.queue_depth = 64;
        s.rag.max_sources = 2;
        s.rag.context_tokens = 300;
    })
    .await;
    app.corpus("ab").await;
    let (status, _) = app
        .send(
            Method::PATCH,
            "/api/collections/ab",
            json!({"adapter": "arm-a"}),
        )
        .await;
    assert_eq!(status, 200);

    // Bad starts are refused by name, nothing is started.
    for (body, code) in [
        (json!({"candidate": "nope", "share": 0.5}), 404),
        (json!({"candidate": "arm-b", "share": 1.5}), 400),
        (json!({"candidate": "arm-a", "share": 0.5}), 400),
    ] {
        let (s, v) = app
            .send(Method::POST, "/api/collections/ab/experiment", body.clone())
            .await;
        assert_eq!(s, code, "{body} -> {v}");
    }
    let (s, e) = app
        .send(
            Method::POST,
            "/api/collections/ab/experiment",
            json!({"candidate": "arm-b", "share": 0.5}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(e["control"], "arm-a");
    let (s, _) = app
        .send(
            Method::POST,
            "/api/collections/ab/experiment",
            json!({"candidate": "arm-b", "share": 0.5}),
        )
        .await;
    assert_eq!(s, 409, "one experiment at a time");

    // 40 users x 5 questions, 8 at a time; each user rates what they got.
    let mut arm_of_user: HashMap<usize, String> = HashMap::new();
    let mut adapter_of_arm: HashMap<String, String> = HashMap::new();
    let requests: Vec<(usize, usize)> = (0..200).map(|i| (i % 40, i / 40)).collect();
    for batch in requests.chunks(8) {
        let answers = futures::future::join_all(batch.iter().map(|&(user, i)| {
            let app = &app;
            async move {
                let (s, a) = app
                    .send(
                        Method::POST,
                        "/api/collections/ab/ask",
                        json!({"question": QUESTIONS[i % 5], "user": format!("user-{user}")}),
                    )
                    .await;
                assert_eq!(s, 200, "{a}");
                (user, i, a)
            }
        }))
        .await;
        for (user, i, a) in answers {
            let arm = a["experiment"]["arm"]
                .as_str()
                .expect("assigned")
                .to_string();
            let adapter = a["adapter"].as_str().expect("an adapter").to_string();
            let previous = arm_of_user.insert(user, arm.clone());
            assert!(previous.is_none_or(|p| p == arm), "user {user} changed arm");
            let known = adapter_of_arm.entry(arm.clone()).or_insert(adapter.clone());
            assert_eq!(*known, adapter, "arm {arm} answered with one adapter");
            // Candidate users like 4 of their 5 answers, control users 1 of 5.
            let up = if arm == "candidate" { i < 4 } else { i < 1 };
            let id = a["answer_id"].as_str().expect("answer id");
            let (s, f) = app
                .send(
                    Method::POST,
                    &format!("/api/answers/{id}/feedback"),
                    json!({"rating": if up { "up" } else { "down" }}),
                )
                .await;
            assert_eq!(s, 200, "{f}");
        }
    }
    assert_eq!(adapter_of_arm["candidate"], "arm-b");
    assert_eq!(adapter_of_arm["control"], "arm-a");
    let candidates = arm_of_user.values().filter(|a| *a == "candidate").count();
    // Binomial(40, 0.5): 4 standard deviations (3.16 each) around 20.
    assert!((8..=32).contains(&candidates), "{candidates} of 40 users");

    // An explicit adapter bypasses the experiment.
    let (_, direct) = app
        .send(
            Method::POST,
            "/api/collections/ab/ask",
            json!({"question": QUESTIONS[0], "adapter": null, "user": "user-0"}),
        )
        .await;
    assert_eq!(direct["experiment"], Value::Null);
    assert_eq!(direct["adapter"], Value::Null);

    // Blind comparisons: both arms answer, unlabelled; this user always prefers the candidate.
    for question in &QUESTIONS[..4] {
        let (s, cmp) = app
            .send(
                Method::POST,
                "/api/collections/ab/compare",
                json!({"question": question, "user": "blind-user"}),
            )
            .await;
        assert_eq!(s, 200, "{cmp}");
        let sides = cmp["answers"].as_array().expect("two sides");
        assert_eq!(sides.len(), 2);
        assert!(
            sides
                .iter()
                .all(|a| a.get("adapter").is_none() && a.get("experiment").is_none())
        );
        let (_, logged) = app.get("/api/collections/ab/answers?limit=5").await;
        let arm_of = |id: &Value| {
            logged
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["id"] == *id)
                .map(|a| a["arm"].clone())
                .expect("both sides are logged")
        };
        let pick = if arm_of(&sides[0]["answer_id"]) == "candidate" {
            "a"
        } else {
            "b"
        };
        assert_ne!(
            arm_of(&sides[0]["answer_id"]),
            arm_of(&sides[1]["answer_id"])
        );
        let id = cmp["comparison_id"].as_str().unwrap();
        let (s, _) = app
            .send(
                Method::POST,
                &format!("/api/collections/ab/compare/{id}"),
                json!({"preferred": pick}),
            )
            .await;
        assert_eq!(s, 204);
    }

    let (s, status) = app.get("/api/collections/ab/experiment").await;
    assert_eq!(s, 200);
    let report = &status["running"];
    assert_eq!(report["enough_data"], true, "{report}");
    assert_eq!(
        report["arms"]["arm-b"]["answers"].as_u64().unwrap()
            + report["arms"]["arm-a"]["answers"].as_u64().unwrap(),
        200
    );
    assert_eq!(report["arms"]["arm-b"]["thumbs_up_rate"], 0.8);
    let thumbs = &report["difference"]["thumbs_up_rate"];
    assert!(
        thumbs["ci95"]["low"].as_f64().expect("interval") > 0.0,
        "{thumbs}"
    );
    assert_eq!(thumbs["significant"], true);
    assert_eq!(report["blind"]["comparisons"], 4);
    assert_eq!(report["blind"]["candidate_preferred"], 4);
    assert_eq!(report["blind"]["candidate_win_rate"], 1.0);
    let metrics = app.text("/metrics").await;
    assert!(
        metrics.contains(
            "domainrag_experiment_thumbs_up_rate{collection=\"ab\",arm=\"candidate\",adapter=\"arm-b\"} 0.8"
        ),
        "{metrics}"
    );

    // The adapter under test cannot be removed while the experiment runs.
    let r = app
        .client
        .delete(format!("{}/api/adapters/arm-b", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);

    let (s, stopped) = app
        .send(
            Method::POST,
            "/api/collections/ab/experiment/stop",
            json!({"decision": "promote"}),
        )
        .await;
    assert_eq!(s, 200, "{stopped}");
    assert_eq!(stopped["decision"], "promote");
    let (_, c) = app.get("/api/collections/ab").await;
    assert_eq!(c["adapter"], "arm-b");
    let (_, after) = app.get("/api/collections/ab/experiment").await;
    assert_eq!(after["running"], Value::Null);
    assert_eq!(after["experiments"][0]["decision"], "promote");
    let (s, _) = app
        .send(
            Method::POST,
            "/api/collections/ab/compare",
            json!({"question": QUESTIONS[0]}),
        )
        .await;
    assert_eq!(s, 409, "no experiment, no comparison");

    // The log: 209 answers exported (200 + 1 direct + 4 x 2 blind); deleting a document deletes
    // the answers given from it.
    let export = app.text("/api/collections/ab/answers/export").await;
    let logged: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(logged.len(), 209);
    assert!(
        logged
            .iter()
            .all(|a| !a["sources"].as_array().unwrap().is_empty())
    );
    let rated = logged
        .iter()
        .filter(|a| a["feedback"]["rating"].is_string())
        .count();
    assert_eq!(rated, 200);
    // A JSONL document (its id is a plain path segment; file documents are ids with slashes).
    let doc = logged
        .iter()
        .flat_map(|a| a["sources"].as_array().unwrap())
        .map(|s| s["doc_id"].as_str().unwrap().to_string())
        .find(|d| !d.contains('/'))
        .expect("answers given from a JSONL document");
    let from_doc = logged
        .iter()
        .filter(|a| {
            a["sources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["doc_id"] == doc.as_str())
        })
        .count();
    let r = app
        .client
        .delete(format!("{}/api/collections/ab/documents/{doc}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (_, left) = app.get("/api/collections/ab/answers?limit=500").await;
    assert_eq!(left.as_array().unwrap().len(), 209 - from_doc);

    // Feedback on an unknown answer, an empty one, and one for another team's collection.
    let (s, _) = app
        .send(
            Method::POST,
            "/api/answers/ab.0123456789abcdef0123456789abcdef/feedback",
            json!({"rating": "up"}),
        )
        .await;
    assert_eq!(s, 404);
    let id = left[0]["id"].as_str().unwrap();
    let (s, v) = app
        .send(
            Method::POST,
            &format!("/api/answers/{id}/feedback"),
            json!({}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let reader = app
        .server
        .state
        .keys
        .create(domainrag::access::keys::KeySpec {
            name: "other team".into(),
            role: domainrag::access::Role::Reader,
            collections: vec!["other".into()],
        })
        .unwrap()
        .token;
    let r = crate::app::client_with_key(&reader)
        .post(format!("{}/api/answers/{id}/feedback", app.base))
        .json(&json!({"rating": "down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    app.server.stop().await.expect("stops");

    // What users liked or corrected trains the next adapter.
    let out = dir.path().join("from-log.jsonl");
    let built = crate::cli::domainrag(
        dir.path(),
        &[
            "triplets",
            "build",
            "--from-log",
            "-c",
            "ab",
            "--feedback",
            "positive",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    crate::cli::ok(&built);
    let triplets = std::fs::read_to_string(&out).expect("triplets");
    let first: Value = serde_json::from_str(triplets.lines().next().unwrap()).unwrap();
    assert!(
        first["context"]
            .as_str()
            .unwrap()
            .starts_with("Sources:\n[1] ")
    );
    let few = dir.path().join("few.jsonl");
    std::fs::write(
        &few,
        triplets.lines().take(4).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    crate::cli::ok(&crate::cli::domainrag(
        dir.path(),
        &[
            "train",
            "-c",
            "ab",
            "--triplets",
            few.to_str().unwrap(),
            "--name",
            "from-log",
            "--epochs",
            "1",
            "--batch",
            "2",
            "--rank",
            "4",
            "--val-split",
            "0",
            "--no-progress",
        ],
    ));
    assert!(AdapterRegistry::new(dir.path()).contains("from-log"));

    // Deleting the collection deletes its log: a new collection of that name starts empty.
    crate::cli::ok(&crate::cli::domainrag(
        dir.path(),
        &["collection", "delete", "ab"],
    ));
    crate::cli::ok(&crate::cli::domainrag(
        dir.path(),
        &["collection", "create", "ab"],
    ));
    let exported = crate::cli::ok(&crate::cli::domainrag(
        dir.path(),
        &["answers", "export", "-c", "ab"],
    ));
    assert_eq!(exported, "");
}

#[tokio::test]
async fn acknowledged_feedback_survives_a_sigkill_of_the_server() {
    let (_dir, data) = crate::cli::docs_collection();
    let (mut server, base) = serve(&data, &[]).await;
    let client = crate::helpers::http_client()
        .build()
        .expect("client builds");
    let mut ids = Vec::new();
    for (i, q) in QUESTIONS.iter().take(3).enumerate() {
        let a: Value = client
            .post(format!("{base}/api/collections/docs/ask"))
            .json(&json!({"question": q}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = a["answer_id"].as_str().expect("answer id").to_string();
        let r = client
            .post(format!("{base}/api/answers/{id}/feedback"))
            .json(&json!({"rating": "down", "correction": format!("Corrected answer {i} [1].")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        ids.push(id);
    }
    // SIGKILL right after the last acknowledgement: no shutdown, no flush.
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");

    let (mut server, base) = serve(&data, &[]).await;
    let listed: Vec<Value> = client
        .get(format!("{base}/api/collections/docs/answers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let a = listed
            .iter()
            .find(|a| a["id"] == id.as_str())
            .expect("logged");
        assert_eq!(a["feedback"]["rating"], "down");
        assert_eq!(
            a["feedback"]["correction"],
            format!("Corrected answer {i} [1].")
        );
    }
    // The CLI reads the same log while the server holds it.
    let out = crate::cli::ok(&crate::cli::domainrag(
        &data,
        &["answers", "export", "-c", "docs"],
    ));
    assert_eq!(out.lines().count(), 3);
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");

    // Shadow replay: the logged questions through an arm offline, corrections as references.
    let report = data.join("replay.json");
    crate::cli::ok(&crate::cli::domainrag(
        &data,
        &[
            "eval",
            "answers",
            "-c",
            "docs",
            "--from-log",
            "--limit",
            "1",
            "--adapter",
            "none",
            "--json",
            report.to_str().unwrap(),
        ],
    ));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["questions"], 1);
    let replayed = &report["per_question"]["none"][0];
    assert_eq!(replayed["query"], QUESTIONS[2], "newest first");
    assert_eq!(replayed["gold_answers"][0], "Corrected answer 2 [1].");
}
