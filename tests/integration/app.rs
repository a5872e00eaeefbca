//! The test app: the server started on port 0 with a temp data dir (or the process-wide adapter
//! data dir, for tests that serve adapters they register) and the real models, auth on with an
//! admin key, and a client sending it with the calls the HTTP tests share (JSON requests, uploads,
//! waiting for a job).

use std::path::{Path, PathBuf};
use std::time::Duration;

use domainrag::access::Role;
use domainrag::access::keys::KeySpec;
use domainrag::config::Settings;
use domainrag::http::{AppState, Server};
use serde_json::Value;

use crate::helpers::{settings, write_corpus};

pub(crate) struct App {
    pub(crate) server: Server,
    pub(crate) base: String,
    /// Sends [`App::admin_key`] with every request.
    pub(crate) client: reqwest::Client,
    /// An admin key made for the test (auth is on, as by default).
    pub(crate) admin_key: String,
    /// The server's data dir.
    pub(crate) dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// A server on a fresh temp data dir.
pub(crate) async fn spawn_app(max_concurrent: usize, queue_depth: usize) -> App {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut app = spawn_app_at(temp.path(), max_concurrent, queue_depth).await;
    app._temp = Some(temp);
    app
}

/// A server on `dir` (the default engine: native). A test that answers with an adapter on
/// mistral.rs first calls `helpers::adapter_data_dir`, which points `HF_HUB_CACHE` (read once per
/// process) at a hub cache.
pub(crate) async fn spawn_app_at(dir: &Path, max_concurrent: usize, queue_depth: usize) -> App {
    spawn_app_tuned(dir, |s| {
        s.generate.max_concurrent = max_concurrent;
        s.generate.queue_depth = queue_depth;
    })
    .await
}

/// A server on `dir` with the tests' settings, changed by `tune`.
pub(crate) async fn spawn_app_tuned(dir: &Path, tune: impl FnOnce(&mut Settings)) -> App {
    let mut s = settings(dir);
    s.generate.max_tokens = 48;
    s.server.max_upload_bytes = 256 * 1024;
    tune(&mut s);
    let state = AppState::load(s).await.expect("state loads");
    let admin_key = state
        .keys
        .create(KeySpec {
            name: "tests".into(),
            role: Role::Admin,
            collections: vec![],
        })
        .expect("admin key")
        .token;
    let server = domainrag::http::start(state, "127.0.0.1:0")
        .await
        .expect("binds");
    let base = format!("http://{}", server.addr);
    App {
        server,
        base,
        client: client_with_key(&admin_key),
        admin_key,
        dir: dir.to_path_buf(),
        _temp: None,
    }
}

/// An HTTP client that sends `key` as its bearer token on every request.
pub(crate) fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("valid header"),
    );
    crate::helpers::http_client()
        .default_headers(headers)
        .build()
        .expect("client builds")
}

impl App {
    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    /// The body of `GET path` as text (metrics, JSONL exports).
    pub(crate) async fn text(&self, path: &str) -> String {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text body")
    }
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    pub(crate) async fn upload(&self, collection: &str, files: &[(&str, Vec<u8>)]) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new();
        for (name, bytes) in files {
            form = form.part(
                "files",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_string()),
            );
        }
        let r = self
            .client
            .post(format!(
                "{}/api/collections/{collection}/documents",
                self.base
            ))
            .multipart(form)
            .send()
            .await
            .expect("upload");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    pub(crate) async fn wait_job(&self, id: &str) -> Value {
        for _ in 0..6000 {
            let (_, job) = self.get(&format!("/api/jobs/{id}")).await;
            if ["done", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} did not finish");
    }
    /// A collection with the fixture corpus ingested through the upload route.
    pub(crate) async fn corpus(&self, name: &str) {
        let (status, _) = self
            .send(
                reqwest::Method::POST,
                "/api/collections",
                serde_json::json!({"name": name}),
            )
            .await;
        assert_eq!(status, 201);
        let src = self.dir.join(format!("src-{name}"));
        std::fs::create_dir_all(&src).expect("mkdir");
        write_corpus(&src);
        let files: Vec<(&str, Vec<u8>)> = ["faq.jsonl", "backup.html", "vacuum.txt"]
            .iter()
            .map(|f| (*f, std::fs::read(src.join(f)).expect("read")))
            .collect();
        let (status, body) = self.upload(name, &files).await;
        assert_eq!(status, 202, "{body}");
        let job = self.wait_job(body["id"].as_str().expect("job id")).await;
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["kind"], "ingest");
        assert_eq!(job["progress"]["done"], 3);
        assert_eq!(job["result"]["documents"], 4);
    }
}
