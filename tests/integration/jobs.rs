//! The adapter workflow as a team without shell access runs it, over real HTTP: synthesise
//! triplets from the collection's documents, train an adapter on them and assign it, evaluate it
//! against the base model, download the report; bad requests, queueing and cancelling.

use reqwest::Method;
use serde_json::{Value, json};

use crate::app::{App, spawn_app, spawn_app_at};

/// Collection `name`: the fixture corpus plus the partial-index page (the synthesis rules find a
/// definition there).
async fn docs_named(app: &App, name: &str) {
    app.corpus(name).await;
    let page = app.dir.join(format!("src-{name}/partial-indexes.md"));
    let (status, body) = app
        .upload(
            name,
            &[("partial-indexes.md", std::fs::read(page).expect("fixture"))],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let job = app.wait_job(body["id"].as_str().expect("id")).await;
    assert_eq!(job["status"], "done", "{job}");
}

async fn docs(app: &App) {
    docs_named(app, "docs").await;
}

async fn post(app: &App, path: &str, body: Value) -> (u16, Value) {
    app.send(Method::POST, path, body).await
}

/// Start a job and wait for it to end as `status`.
async fn run(app: &App, path: &str, body: Value, status: &str) -> Value {
    let (code, job) = post(app, path, body).await;
    assert_eq!(code, 202, "{job}");
    let job = app.wait_job(job["id"].as_str().expect("job id")).await;
    assert_eq!(job["status"], status, "{job}");
    job
}

fn questions(n: usize) -> Value {
    let all = [
        (
            "How do I reset my password?",
            "open Settings, choose Security and click Reset password",
        ),
        (
            "What does VACUUM reclaim?",
            "storage occupied by dead tuples",
        ),
        (
            "What is a partial index?",
            "an index built over a subset of a table",
        ),
        ("How long does courier delivery take?", "three to five days"),
    ];
    Value::Array(
        (0..n)
            .map(|i| {
                let (q, a) = all[i % all.len()];
                json!({"id": format!("q{i}"), "query": q, "answers": [a]})
            })
            .collect(),
    )
}

#[tokio::test]
async fn documents_to_a_compared_adapter_through_jobs() {
    // It answers with the adapter it trains: its server uses the process's adapter data dir.
    let _dir = crate::helpers::adapter_dir_server().await;
    let app = spawn_app_at(crate::helpers::adapter_data_dir(), 4, 8).await;
    docs_named(&app, "jobs-docs").await;

    // Synthesis: a report, examples to read, the triplets as a file.
    let synth = run(
        &app,
        "/api/collections/jobs-docs/synth",
        json!({"n": 10}),
        "done",
    )
    .await;
    assert_eq!(synth["kind"], "synth");
    let kept = synth["result"]["triplets"].as_u64().expect("count");
    assert!(kept >= 2, "{synth}");
    assert_eq!(synth["progress"]["done"].as_u64(), Some(kept));
    let examples = synth["result"]["examples"].as_array().expect("examples");
    assert!(
        examples
            .iter()
            .any(|e| e["query"] == "What is a partial index?"),
        "{examples:?}"
    );
    let id = synth["id"].as_str().expect("id");
    let file = app
        .client
        .get(format!("{}/api/jobs/{id}/files/triplets.jsonl", app.base))
        .send()
        .await
        .expect("download");
    assert_eq!(file.status().as_u16(), 200);
    let text = file.text().await.expect("text");
    assert_eq!(text.lines().count() as u64, kept);
    assert_eq!(
        app.get(&format!("/api/jobs/{id}/files/job.json")).await.0,
        404
    );
    assert_eq!(
        app.get(&format!("/api/jobs/{id}/files/..%2Fx")).await.0,
        404
    );

    // Training on that synth job's triplets, assigned to the collection.
    let train = run(
        &app,
        "/api/collections/jobs-docs/train",
        json!({"name": "jobs-docs-synth", "triplets_job": id, "epochs": 1, "batch": 1, "assign": true}),
        "done",
    )
    .await;
    assert_eq!(
        train["result"]["adapter"]["name"], "jobs-docs-synth",
        "{train}"
    );
    assert!(train["progress"]["total"].as_u64().expect("steps") >= 1);
    assert_eq!(
        app.get("/api/collections/jobs-docs").await.1["adapter"],
        "jobs-docs-synth"
    );
    // The same name again is refused before any work.
    let (code, e) = post(
        &app,
        "/api/collections/jobs-docs/train",
        json!({"name": "jobs-docs-synth", "synthetic": 5}),
    )
    .await;
    assert_eq!(code, 409, "{e}");

    // Evaluation: base vs the collection's adapter by default, a summary and an HTML report.
    let eval = run(
        &app,
        "/api/collections/jobs-docs/eval",
        json!({"questions": questions(2)}),
        "done",
    )
    .await;
    let arms = eval["result"]["arms"].as_object().expect("arms");
    assert!(
        arms.contains_key("none") && arms.contains_key("jobs-docs-synth"),
        "{eval}"
    );
    assert_eq!(eval["progress"]["done"], 4);
    let report = app
        .client
        .get(format!(
            "{}/api/jobs/{}/files/report.html",
            app.base,
            eval["id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("report");
    assert!(
        report.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );

    // The collection's job list, newest first.
    let (_, list) = app.get("/api/jobs?collection=jobs-docs").await;
    let kinds: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|j| j["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds[..3], ["eval", "train", "synth"], "{kinds:?}");
    app.server.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_job_requests_are_refused_with_the_reason() {
    let app = spawn_app(4, 8).await;
    docs(&app).await;
    let cases = [
        ("/api/collections/docs/synth", json!({"n": 0}), 400, "`n`"),
        (
            "/api/collections/docs/synth",
            json!({"count": 3}),
            400,
            "count",
        ),
        ("/api/collections/nope/synth", json!({}), 404, "nope"),
        (
            "/api/collections/docs/train",
            json!({"name": "x"}),
            400,
            "synthetic",
        ),
        (
            "/api/collections/docs/train",
            json!({"name": "x", "synthetic": 3, "triplets_job": "y"}),
            400,
            "exactly one",
        ),
        (
            "/api/collections/docs/train",
            json!({"name": "x", "triplets_job": "no-such-job"}),
            404,
            "no-such-job",
        ),
        (
            "/api/collections/docs/train",
            json!({"name": "../x", "synthetic": 3}),
            400,
            "name",
        ),
        (
            "/api/collections/docs/train",
            json!({"name": "x", "synthetic": 3, "lr": 0.0}),
            400,
            "lr",
        ),
        (
            "/api/collections/docs/eval",
            json!({"questions": []}),
            400,
            "empty",
        ),
        (
            "/api/collections/docs/eval",
            json!({"questions": [{"query": "q"}]}),
            400,
            "question 1",
        ),
        (
            "/api/collections/docs/eval",
            json!({"questions": questions(1), "arms": ["missing"]}),
            404,
            "missing",
        ),
        (
            "/api/collections/docs/eval",
            json!({"questions": questions(1), "arms": ["none", "none"]}),
            400,
            "twice",
        ),
        ("/api/jobs/nope/cancel", json!({}), 404, "nope"),
    ];
    for (path, body, status, names) in cases {
        let (code, e) = post(&app, path, body.clone()).await;
        assert_eq!(code, status, "{path} {body}: {e}");
        let message = e["error"]["message"].as_str().expect("message");
        assert!(message.contains(names), "{path} {body}: {message}");
    }
    // Ingest cannot be cancelled half-way; a finished job cannot be cancelled.
    let (_, list) = app.get("/api/jobs?collection=docs").await;
    let ingest = list[0]["id"].as_str().expect("id").to_string();
    let (code, e) = post(&app, &format!("/api/jobs/{ingest}/cancel"), json!({})).await;
    assert_eq!(code, 409, "{e}");
    assert!(app.get("/api/jobs").await.1.as_array().expect("list").len() >= 2);
    app.server.stop().await.expect("stop");
}

#[tokio::test]
async fn heavy_jobs_queue_and_cancel_stops_them() {
    let app = spawn_app(4, 8).await;
    docs(&app).await;
    let start = |n: usize| {
        let app = &app;
        async move {
            let (code, job) = post(
                app,
                "/api/collections/docs/eval",
                json!({"questions": questions(n), "arms": ["none"]}),
            )
            .await;
            assert_eq!(code, 202, "{job}");
            job["id"].as_str().expect("id").to_string()
        }
    };
    // The first evaluation holds the slot; the second waits for it.
    let first = start(40).await;
    let second = start(1).await;
    let (_, queued) = app.get(&format!("/api/jobs/{second}")).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    let (code, _) = post(&app, &format!("/api/jobs/{second}/cancel"), json!({})).await;
    assert_eq!(code, 202);
    let second = app.wait_job(&second).await;
    assert_eq!(second["status"], "cancelled", "{second}");
    assert!(second["started_at"].is_null(), "it never ran: {second}");

    let (code, _) = post(&app, &format!("/api/jobs/{first}/cancel"), json!({})).await;
    assert_eq!(code, 202);
    let first = app.wait_job(&first).await;
    assert_eq!(first["status"], "cancelled", "{first}");
    assert!(first["progress"]["done"].as_u64().expect("done") < 40);

    // A training job stops at its next step and registers nothing.
    let (code, job) = post(
        &app,
        "/api/collections/docs/train",
        json!({"name": "stopped", "synthetic": 10, "epochs": 50, "batch": 1}),
    )
    .await;
    assert_eq!(code, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    for _ in 0..600 {
        let (_, j) = app.get(&format!("/api/jobs/{id}")).await;
        if j["progress"]["done"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, _) = post(&app, &format!("/api/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(code, 202);
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(app.get("/api/adapters").await.1, json!([]));
    // The slot is free again: a new job runs.
    run(&app, "/api/collections/docs/synth", json!({"n": 2}), "done").await;
    app.server.stop().await.expect("stop");
}
