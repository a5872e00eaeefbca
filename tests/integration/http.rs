//! The appliance over real HTTP: `spawn_app` starts the server on port 0 with a temp data dir and
//! the real models; every route group, bad input, streaming, the OpenAI client, back-pressure.

use std::time::Duration;

use serde_json::{Value, json};

use crate::app::spawn_app;
use crate::helpers::models_dir;

#[tokio::test]
async fn every_route_group_over_http() {
    let app = spawn_app(4, 8).await;
    use reqwest::Method;
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/readyz").await.1["status"], "ready");
    let (_, openapi) = app.get("/openapi.json").await;
    assert_eq!(openapi["openapi"], "3.0.3");
    let page = app
        .client
        .get(format!("{}/", app.base))
        .send()
        .await
        .expect("ui");
    assert!(page.text().await.expect("html").contains("<html"));

    app.corpus("docs").await;
    // Collections.
    assert_eq!(
        app.send(Method::POST, "/api/collections", json!({"name": "docs"}))
            .await
            .0,
        409
    );
    assert_eq!(
        app.send(Method::POST, "/api/collections", json!({"name": "../etc"}))
            .await
            .0,
        400
    );
    assert_eq!(
        app.send(Method::POST, "/api/collections", json!({"nom": "x"}))
            .await
            .0,
        400
    );
    let (status, c) = app.get("/api/collections/docs").await;
    assert_eq!(status, 200);
    assert_eq!(c["documents"], 4);
    assert_eq!(c["chunks"], c["vectors"]);
    assert_eq!(app.get("/api/collections/nope").await.0, 404);
    let (status, c) = app
        .send(Method::PATCH, "/api/collections/docs", json!({"fusion": {"method": "rrf", "rrf_k": 60.0, "bm25_weight": 1.0, "dense_weight": 1.0, "candidates": 20}}))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["fusion"]["method"], "rrf");
    // A BM25 setting named alone changes alone: windows and pairs stay on.
    let (status, c) = app
        .send(
            Method::PATCH,
            "/api/collections/docs",
            json!({"bm25": {"k1": 0.9}}),
        )
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["bm25"]["k1"], 0.9);
    assert_eq!(c["bm25"]["window_weight"], 2.0);
    assert_eq!(c["bm25"]["pair_weight"], 0.75);
    let (status, e) = app
        .send(
            Method::PATCH,
            "/api/collections/docs",
            json!({"bm25": {"pair_weight": -1.0}}),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bm25.pair_weight"),
        "{e}"
    );
    let (status, e) = app
        .send(
            Method::PATCH,
            "/api/collections/docs",
            json!({"adapter": "missing"}),
        )
        .await;
    assert_eq!(status, 404, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("missing"));
    assert_eq!(
        app.get("/api/collections")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Bad JSON and wrong types get the error shape.
    let r = app
        .client
        .post(format!("{}/api/collections/docs/search", app.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_input");

    // Search.
    let (status, res) = app
        .send(
            Method::POST,
            "/api/collections/docs/search",
            json!({"query": "pg_dump archive", "k": 2}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(res["results"][0]["title"], "Backup and Restore");
    assert_eq!(
        app.send(
            Method::POST,
            "/api/collections/docs/search",
            json!({"query": " "})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        app.send(
            Method::POST,
            "/api/collections/docs/search",
            json!({"query": "x", "k": 0})
        )
        .await
        .0,
        400
    );

    // Ask, JSON and streamed.
    let (status, answer) = app
        .send(
            Method::POST,
            "/api/collections/docs/ask",
            json!({"question": "How do I reset my password?"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer["answer"].as_str().unwrap().is_empty());
    assert_eq!(answer["sources"][0]["doc_id"], "faq-password");
    let r = app
        .client
        .post(format!("{}/api/collections/docs/ask", app.base))
        .json(&json!({"question": "How do I reset my password?", "stream": true, "adapter": null}))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let sse = r.text().await.expect("body");
    assert!(sse.contains("event: token"), "{sse}");
    let done = sse.split("event: done\ndata: ").nth(1).expect("done event");
    let done: Value = serde_json::from_str(done.trim()).expect("done json");
    assert_eq!(done["adapter"], Value::Null);
    assert!(done["timings_ms"]["total"].as_f64().unwrap() > 0.0);

    // A question longer than the model can take is the caller's mistake (400), on both routes,
    // in words and in bytes; the server answers the next question.
    for question in ["password ".repeat(2000), "(".repeat(200_000)] {
        let (status, e) = app
            .send(
                Method::POST,
                "/api/collections/docs/ask",
                json!({"question": question}),
            )
            .await;
        assert_eq!(status, 400, "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("rag.max_question_tokens"),
            "{e}"
        );
        let (status, _) = app
            .send(
                Method::POST,
                "/v1/chat/completions",
                json!({"model": "docs", "messages": [{"role": "user", "content": question}]}),
            )
            .await;
        assert_eq!(status, 400);
    }

    // Documents: list, bad uploads, delete.
    let (_, docs) = app.get("/api/collections/docs/documents").await;
    assert_eq!(docs.as_array().unwrap().len(), 4);
    let (status, e) = app.upload("docs", &[("../evil.txt", b"x".to_vec())]).await;
    assert_eq!(status, 400, "{e}");
    let (status, _) = app
        .upload("docs", &[("big.txt", vec![b'a'; 300 * 1024])])
        .await;
    assert_eq!(status, 413);
    assert_eq!(
        app.upload("nope", &[("a.txt", b"hello".to_vec())]).await.0,
        404
    );
    assert_eq!(
        app.get("/api/collections/docs/documents")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        4,
        "nothing stored changed"
    );
    let r = app
        .client
        .delete(format!(
            "{}/api/collections/docs/documents/faq-shipping",
            app.base
        ))
        .send()
        .await
        .expect("delete doc");
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.get("/api/collections/docs").await.1["documents"], 3);
    assert_eq!(app.get("/api/jobs/nope").await.0, 404);

    // Adapters: list, refused upload leaves the registry empty, delete unknown.
    assert_eq!(app.get("/api/adapters").await.1, json!([]));
    let form = reqwest::multipart::Form::new().text("name", "bad").part(
        "files",
        reqwest::multipart::Part::bytes(b"{oops".to_vec()).file_name("adapter_config.json"),
    );
    let r = app
        .client
        .post(format!("{}/api/adapters", app.base))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(app.get("/api/adapters").await.1, json!([]));
    let form = reqwest::multipart::Form::new().text("name", "x").part(
        "files",
        reqwest::multipart::Part::bytes(b"{}".to_vec()).file_name("../adapter_config.json"),
    );
    let r = app
        .client
        .post(format!("{}/api/adapters", app.base))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status().as_u16(), 400);
    let r = app
        .client
        .delete(format!("{}/api/adapters/nope", app.base))
        .send()
        .await
        .expect("del");
    assert_eq!(r.status().as_u16(), 404);

    // Metrics count what happened.
    let metrics = app.text("/metrics").await;
    assert!(
        metrics.contains("domainrag_answer_seconds_count 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("domainrag_search_seconds_count 1"),
        "{metrics}"
    );
    // The live heap holds at least the base model's weights (f32, over 500 MiB).
    let heap: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("domainrag_heap_in_use_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("domainrag_heap_in_use_bytes in /metrics");
    assert!(heap > 400 << 20, "heap in use {heap} bytes");
    // The background scorer reports its queue, and the two answers leave it.
    assert!(
        metrics.contains("domainrag_answer_scoring_skipped_total 0"),
        "{metrics}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let m = app.text("/metrics").await;
        if m.contains("domainrag_answer_scoring_pending 0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "scorer never idle: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Delete the collection.
    let r = app
        .client
        .delete(format!("{}/api/collections/docs", app.base))
        .send()
        .await
        .expect("del");
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.get("/api/collections/docs").await.0, 404);
    assert_eq!(
        app.get("/no/such/route").await.1["error"]["code"],
        "not_found"
    );
    app.server.stop().await.expect("graceful stop");
}

#[tokio::test]
async fn the_real_openai_client_works() {
    let python = crate::helpers::test_venv_bin("python");
    let app = spawn_app(4, 8).await;
    app.corpus("support").await;
    let script = crate::helpers::repo_root().join("tests/openai_client.py");
    let base = app.base.clone();
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(&base)
        .arg("support")
        .arg(&app.admin_key)
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.server.stop().await.expect("stop");
    let _ = models_dir();
}

#[tokio::test]
async fn requests_within_the_queue_depth_wait_instead_of_failing() {
    let app = spawn_app(1, 4).await;
    app.corpus("queued").await;
    let ask = || {
        app.client
            .post(format!("{}/api/collections/queued/ask", app.base))
            .json(&json!({"question": "How long does shipping take?"}))
            .send()
    };
    let (a, b, c) = tokio::join!(ask(), ask(), ask());
    for r in [a, b, c] {
        assert_eq!(r.expect("response").status().as_u16(), 200);
    }
    app.server.stop().await.expect("stop");
}

#[tokio::test]
async fn excess_generation_is_refused_with_429_and_health_stays_up() {
    // One generating, none waiting: the others are refused at once.
    let app = spawn_app(1, 0).await;
    app.corpus("busy").await;
    let ask = || {
        app.client
            .post(format!("{}/api/collections/busy/ask", app.base))
            .json(&json!({"question": "Explain how to reset a password in detail."}))
            .send()
    };
    let (a, b, c, health) = tokio::join!(ask(), ask(), ask(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.client.get(format!("{}/healthz", app.base)).send().await
    });
    let statuses: Vec<u16> = [a, b, c]
        .into_iter()
        .map(|r| r.expect("response").status().as_u16())
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(health.expect("health").status().as_u16(), 200);
    let r = ask().await.expect("after");
    assert_eq!(r.status().as_u16(), 200, "capacity is released");
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        !metrics.contains("domainrag_generation_rejected_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("domainrag_generation_queued 0"),
        "{metrics}"
    );
    app.server.stop().await.expect("stop");
}

/// A client that leaves in the middle of a streamed answer frees its generation slot: the answer
/// is cancelled (it never counts as answered) instead of running to `max_tokens` for nobody.
#[tokio::test]
async fn a_client_that_disconnects_mid_answer_frees_its_slot() {
    let temp = tempfile::tempdir().expect("tempdir");
    let app = crate::app::spawn_app_tuned(temp.path(), |s| {
        s.generate.max_concurrent = 1;
        s.generate.queue_depth = 0;
        s.generate.max_tokens = 4000;
    })
    .await;
    app.corpus("leave").await;
    let metric = |name: &'static str| {
        let app = &app;
        async move {
            let text = app
                .client
                .get(format!("{}/metrics", app.base))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .expect("metric present")
        }
    };
    let answered = metric("domainrag_answer_seconds_count ").await;
    let mut r = app.client
        .post(format!("{}/api/collections/leave/ask", app.base))
        .json(&json!({"question": "Explain in great detail, step by step, everything about password resets and shipping.", "stream": true}))
        .send().await.expect("ask");
    assert_eq!(r.status().as_u16(), 200);
    let first = r.chunk().await.expect("read").expect("a first event");
    assert!(
        String::from_utf8_lossy(&first).contains("event: "),
        "{first:?}"
    );
    drop(r); // the client goes away
    let mut freed = false;
    for _ in 0..300 {
        if metric("domainrag_generation_in_flight ").await == 0.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the answer still runs 30 s after its client left");
    assert_eq!(
        metric("domainrag_answer_seconds_count ").await,
        answered,
        "the abandoned answer ran to its end"
    );
    let again = app
        .client
        .post(format!("{}/api/collections/leave/ask", app.base))
        .json(&json!({"question": "How long does shipping take?"}))
        .send()
        .await
        .expect("ask again");
    assert_eq!(again.status().as_u16(), 200, "the slot is free again");
    app.server.stop().await.expect("stop");
}

/// The web UI in a real headless Chromium (Debian's, driven by playwright-core): create a
/// collection, upload a document, ask, see a streamed answer with a citation, open the source,
/// switch the adapter to none and ask again, rate and correct answers, run an experiment on the A/B
/// card, then the Adapt card. The screenshots land in `target/ui*.png`.
#[tokio::test]
async fn the_web_ui_works_in_headless_chromium() {
    let web = crate::helpers::repo_root().join("tests/web");
    assert!(
        web.join("node_modules/playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "browser test tools missing: run scripts/test-deps.sh (make test does)"
    );
    // The UI trains an adapter and answers with it: the process's adapter data dir (see app.rs).
    let _dir = crate::helpers::adapter_dir_server().await;
    let candidate = format!("ui-candidate-{}", std::process::id());
    crate::experiment::register(crate::helpers::adapter_data_dir(), &candidate, 3);
    let app = crate::app::spawn_app_at(crate::helpers::adapter_data_dir(), 4, 8).await;
    let fixture = app.dir.join("password-reset.txt");
    std::fs::write(
        &fixture,
        "Password reset\n\nTo reset your password, open Settings, choose Security and click Reset \
         password. A reset link is emailed to you and expires after one hour.",
    )
    .expect("fixture");
    let artifacts = crate::helpers::repo_root().join("target");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let out = tokio::process::Command::new("node")
        .arg(web.join("ui.test.mjs"))
        .env("DOMAINRAG_URL", &app.base)
        .env("DOMAINRAG_KEY", &app.admin_key)
        .env("DOMAINRAG_CANDIDATE", &candidate)
        .env("DOMAINRAG_FIXTURE", &fixture)
        .env("DOMAINRAG_ARTIFACTS", &artifacts)
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.server.stop().await.expect("stop");
}

/// A collection whose files are damaged is listed as such, does not take the others down, and
/// can be deleted through the API; what an interrupted delete left is gone after a restart; a
/// second server on the served data dir is refused and changes nothing.
#[tokio::test]
async fn a_damaged_collection_is_listed_and_deletable_and_leftovers_are_swept() {
    use reqwest::Method;
    let temp = tempfile::tempdir().expect("tempdir");
    let app = crate::app::spawn_app_at(temp.path(), 1, 4).await;
    for name in ["good", "broken"] {
        assert_eq!(
            app.send(Method::POST, "/api/collections", json!({"name": name}))
                .await
                .0,
            201
        );
    }
    app.server.stop().await.expect("stop");
    let collections = temp.path().join("collections");
    std::fs::write(collections.join("broken/collection.json"), "{oops").expect("damage it");
    // What a kill half-way through a delete leaves: the renamed directory.
    std::fs::create_dir_all(collections.join(".deleted-old-0123/vectors")).expect("leftover");

    let app = crate::app::spawn_app_at(temp.path(), 1, 4).await;
    assert!(
        !collections.join(".deleted-old-0123").exists(),
        "leftovers are swept at start"
    );
    // A second server on a served data dir is refused before it touches anything: what looks
    // half-done to it may be the running server's work in progress.
    std::fs::create_dir_all(collections.join(".deleted-live-4567")).expect("in progress");
    let Err(err) = domainrag::http::AppState::load(crate::helpers::settings(temp.path())).await
    else {
        panic!("a second server on a served data dir")
    };
    assert!(err.to_string().contains("already runs"), "{err}");
    assert!(
        collections.join(".deleted-live-4567").exists(),
        "left alone"
    );
    std::fs::remove_dir(collections.join(".deleted-live-4567")).expect("tidy");
    let (status, list) = app.get("/api/collections").await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().expect("array").clone();
    assert_eq!(list.len(), 2, "{list:?}");
    let broken = list.iter().find(|c| c["name"] == "broken").expect("listed");
    assert_eq!(broken["damaged"], true);
    assert!(
        broken["error"]
            .as_str()
            .unwrap_or_default()
            .contains("collection.json"),
        "{broken}"
    );
    assert_eq!(
        list.iter().find(|c| c["name"] == "good").expect("listed")["documents"],
        0
    );
    let (status, body) = app
        .send(Method::DELETE, "/api/collections/broken", json!({}))
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, list) = app.get("/api/collections").await;
    assert_eq!(list.as_array().expect("array").len(), 1);
    assert!(!collections.join("broken").exists());
    app.server.stop().await.expect("stop");
}
