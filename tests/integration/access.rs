//! Keys, roles and browser safety over real HTTP: without a key every route but health, readiness
//! and the UI shell is 401; a reader of team A sees team B's collection as not existing on every
//! route (`/v1` included) and cannot change anything; an editor uploads but cannot install
//! adapters or keys; revoked keys stop working at once; cross-site and foreign-Host requests are
//! refused; every change and refusal is in the audit log. Also: `serve` will not listen on a
//! non-loopback address with auth off.

use reqwest::Method;
use serde_json::{Value, json};

use crate::app::{App, client_with_key, spawn_app};

/// A client and its key's status codes for one request.
async fn status(
    client: &reqwest::Client,
    app: &App,
    method: Method,
    path: &str,
    body: Value,
) -> u16 {
    client
        .request(method, format!("{}{path}", app.base))
        .json(&body)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

async fn make_key(app: &App, body: Value) -> (String, String) {
    let (code, k) = app.send(Method::POST, "/api/keys", body).await;
    assert_eq!(code, 201, "{k}");
    (
        k["token"].as_str().expect("token").to_string(),
        k["id"].as_str().expect("id").to_string(),
    )
}

/// Every collection-scoped route, with a body that would be valid.
fn team_routes(c: &str) -> Vec<(Method, String, Value)> {
    vec![
        (Method::GET, format!("/api/collections/{c}"), json!({})),
        (
            Method::PATCH,
            format!("/api/collections/{c}"),
            json!({"adapter": null}),
        ),
        (Method::DELETE, format!("/api/collections/{c}"), json!({})),
        (
            Method::GET,
            format!("/api/collections/{c}/documents"),
            json!({}),
        ),
        (
            Method::DELETE,
            format!("/api/collections/{c}/documents/x"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/api/collections/{c}/search"),
            json!({"query": "password"}),
        ),
        (
            Method::POST,
            format!("/api/collections/{c}/ask"),
            json!({"question": "password?"}),
        ),
        (
            Method::POST,
            format!("/api/collections/{c}/synth"),
            json!({"n": 1}),
        ),
        (
            Method::POST,
            format!("/api/collections/{c}/train"),
            json!({"name": "x"}),
        ),
        (
            Method::POST,
            format!("/api/collections/{c}/eval"),
            json!({}),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            json!({"model": c, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ]
}

#[tokio::test]
async fn keys_and_roles_guard_every_route() {
    let app = spawn_app(2, 8).await;
    app.corpus("teama").await;
    app.corpus("teamb").await;
    let anonymous = crate::helpers::http_client()
        .build()
        .expect("client builds");

    // No key: 401 everywhere but health, readiness and the static UI shell.
    for (method, path, body) in team_routes("teama").into_iter().chain([
        (Method::GET, "/api/collections".into(), json!({})),
        (
            Method::POST,
            "/api/collections".into(),
            json!({"name": "x"}),
        ),
        (Method::GET, "/api/adapters".into(), json!({})),
        (Method::GET, "/api/jobs".into(), json!({})),
        (Method::GET, "/api/keys".into(), json!({})),
        (Method::GET, "/v1/models".into(), json!({})),
        (Method::GET, "/metrics".into(), json!({})),
        (Method::GET, "/no/such/route".into(), json!({})),
    ]) {
        assert_eq!(
            status(&anonymous, &app, method.clone(), &path, body).await,
            401,
            "{method} {path}"
        );
    }
    for path in ["/healthz", "/readyz", "/", "/app.js", "/openapi.json"] {
        assert_eq!(
            status(&anonymous, &app, Method::GET, path, json!({})).await,
            200,
            "{path}"
        );
    }
    let bogus = client_with_key(
        "drk_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert_eq!(
        status(&bogus, &app, Method::GET, "/api/collections", json!({})).await,
        401
    );

    // A reader of team A.
    let (reader_key, _) = make_key(
        &app,
        json!({"name": "a-readers", "role": "reader", "collections": ["teama"]}),
    )
    .await;
    let reader = client_with_key(&reader_key);
    for (method, path, body) in team_routes("teamb") {
        assert_eq!(
            status(&reader, &app, method.clone(), &path, body).await,
            404,
            "reader A: {method} {path}"
        );
    }
    let names: Vec<String> = reader
        .get(format!("{}/api/collections", app.base))
        .send()
        .await
        .expect("list")
        .json::<Vec<Value>>()
        .await
        .expect("json")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["teama"]);
    let models: Value = reader
        .get(format!("{}/v1/models", app.base))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"teama") && !ids.iter().any(|m| m.starts_with("teamb")),
        "{ids:?}"
    );
    let jobs: Vec<Value> = reader
        .get(format!("{}/api/jobs", app.base))
        .send()
        .await
        .expect("jobs")
        .json()
        .await
        .expect("json");
    assert!(
        !jobs.is_empty() && jobs.iter().all(|j| j["collection"] == "teama"),
        "{jobs:?}"
    );
    let (_, all_jobs) = app.get("/api/jobs").await;
    let b_job = all_jobs
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["collection"] == "teamb")
        .expect("team B's ingest job");
    let b_job = b_job["id"].as_str().expect("id");
    assert_eq!(
        status(
            &reader,
            &app,
            Method::GET,
            &format!("/api/jobs/{b_job}"),
            json!({})
        )
        .await,
        404
    );
    assert_eq!(
        status(
            &reader,
            &app,
            Method::POST,
            &format!("/api/jobs/{b_job}/cancel"),
            json!({})
        )
        .await,
        404
    );
    // Its own collection: read yes, change no.
    assert_eq!(
        status(
            &reader,
            &app,
            Method::POST,
            "/api/collections/teama/search",
            json!({"query": "password"})
        )
        .await,
        200
    );
    assert_eq!(
        status(
            &reader,
            &app,
            Method::DELETE,
            "/api/collections/teama/documents/faq-password",
            json!({})
        )
        .await,
        403
    );
    assert_eq!(
        status(
            &reader,
            &app,
            Method::DELETE,
            "/api/collections/teama",
            json!({})
        )
        .await,
        403
    );
    let upload = reqwest::multipart::Form::new().part(
        "files",
        reqwest::multipart::Part::bytes(b"hello".to_vec()).file_name("a.txt"),
    );
    let r = reader
        .post(format!("{}/api/collections/teama/documents", app.base))
        .multipart(upload)
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status().as_u16(), 403);

    // An editor of team A: documents yes; collections, adapters, keys no.
    let (editor_key, editor_id) = make_key(
        &app,
        json!({"name": "a-editors", "role": "editor", "collections": ["teama"]}),
    )
    .await;
    let editor = client_with_key(&editor_key);
    assert_eq!(
        status(
            &editor,
            &app,
            Method::DELETE,
            "/api/collections/teama/documents/faq-password",
            json!({})
        )
        .await,
        204
    );
    assert_eq!(
        status(
            &editor,
            &app,
            Method::POST,
            "/api/collections",
            json!({"name": "mine"})
        )
        .await,
        403
    );
    assert_eq!(
        status(
            &editor,
            &app,
            Method::POST,
            "/api/keys",
            json!({"name": "x", "role": "admin"})
        )
        .await,
        403
    );
    assert_eq!(
        status(
            &editor,
            &app,
            Method::DELETE,
            "/api/adapters/anything",
            json!({})
        )
        .await,
        403
    );
    let adapter = reqwest::multipart::Form::new().text("name", "evil").part(
        "files",
        reqwest::multipart::Part::bytes(b"{}".to_vec()).file_name("adapter_config.json"),
    );
    let r = editor
        .post(format!("{}/api/adapters", app.base))
        .multipart(adapter)
        .send()
        .await
        .expect("adapter");
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(
        status(
            &editor,
            &app,
            Method::POST,
            "/api/collections/teama/train",
            json!({"name": "x"})
        )
        .await,
        403
    );
    assert_eq!(
        status(&editor, &app, Method::GET, "/metrics", json!({})).await,
        403
    );

    // Revoked: refused from the next request on.
    let (code, _) = app
        .send(Method::DELETE, &format!("/api/keys/{editor_id}"), json!({}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        status(&editor, &app, Method::GET, "/api/collections", json!({})).await,
        401
    );
    let (_, keys) = app.get("/api/keys").await;
    let listed = keys.to_string();
    assert!(
        !listed.contains(&editor_key[20..]) && !listed.contains("argon2"),
        "keys list leaks secrets or hashes"
    );

    // Browser safety: cross-site posts and foreign Host names are refused; headers everywhere.
    let origin = app.base.as_str();
    for (headers, name, expected) in [
        (vec![("Origin", "http://evil.example")], "csrf", 403),
        (vec![("Sec-Fetch-Site", "cross-site")], "csrf", 403),
        (
            vec![("Origin", origin), ("Sec-Fetch-Site", "same-origin")],
            "fromui",
            201,
        ),
    ] {
        let mut request = app.client.post(format!("{}/api/collections", app.base));
        for (header, value) in &headers {
            request = request.header(*header, *value);
        }
        let r = request
            .json(&json!({"name": name}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), expected, "{headers:?}");
    }
    let rebound = app
        .client
        .get(format!("{}/api/collections", app.base))
        .header("Host", "attacker.example")
        .send()
        .await
        .expect("rebind");
    assert_eq!(rebound.status().as_u16(), 400);
    let page = anonymous
        .get(format!("{}/", app.base))
        .send()
        .await
        .expect("ui");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("frame-ancestors 'none'")
    );

    // The audit log: who changed what, and who was refused.
    let audit = std::fs::read_to_string(app.dir.join("audit.jsonl")).expect("audit log");
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let find = |action: &str, status: u64| {
        lines
            .iter()
            .any(|l| l["action"] == action && l["status"] == status)
    };
    assert!(
        find("DELETE /api/collections/teama/documents/faq-password", 204),
        "{audit}"
    );
    assert!(
        find("DELETE /api/collections/teama/documents/faq-password", 403),
        "{audit}"
    );
    assert!(find("POST /api/collections", 201), "{audit}");
    assert!(
        lines
            .iter()
            .any(|l| l["key_name"] == "a-readers" && l["status"] == 404),
        "{audit}"
    );
    assert!(
        !audit.contains(&reader_key),
        "the audit log must not hold keys"
    );
    app.server.stop().await.expect("stop");
}

#[tokio::test]
async fn serve_will_not_listen_beyond_loopback_without_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .args([
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
            "serve",
            "--bind",
            "0.0.0.0:0",
        ])
        .arg("--models-dir")
        .arg(crate::helpers::models_dir())
        .env("DOMAINRAG__SERVER__AUTH", "false")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.auth = false"), "{stderr}");
}

#[tokio::test]
async fn an_api_key_made_by_the_cli_works_until_the_cli_revokes_it() {
    let app = spawn_app(1, 4).await;
    let bin = env!("CARGO_BIN_EXE_domainrag");
    let dir = app.dir.to_str().expect("utf-8");
    let made = std::process::Command::new(bin)
        .args([
            "--data-dir",
            dir,
            "keys",
            "create",
            "--role",
            "reader",
            "--collection",
            "notyet",
            "--name",
            "cli-made",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: Value = serde_json::from_slice(&made.stdout).expect("json");
    let client = client_with_key(made["token"].as_str().expect("token"));
    assert_eq!(
        status(&client, &app, Method::GET, "/api/collections", json!({})).await,
        200
    );
    let revoked = std::process::Command::new(bin)
        .args([
            "--data-dir",
            dir,
            "keys",
            "revoke",
            made["id"].as_str().expect("id"),
        ])
        .output()
        .expect("runs");
    assert!(revoked.status.success());
    assert_eq!(
        status(&client, &app, Method::GET, "/api/collections", json!({})).await,
        401
    );
    let bad = std::process::Command::new(bin)
        .args(["--data-dir", dir, "keys", "create", "--role", "reader"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at least one collection"));
    // Settings a running server holds in memory are not changed behind its back.
    let set = std::process::Command::new(bin)
        .args(["--data-dir", dir, "collection", "create", "behind-its-back"])
        .output()
        .expect("runs");
    assert!(!set.status.success());
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(stderr.contains("server is running"), "{stderr}");
    let audit = std::fs::read_to_string(app.dir.join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("keys revoke") && audit.contains("\"key_id\":\"cli\""),
        "{audit}"
    );
    app.server.stop().await.expect("stop");
}
