//! `/api` routes: collections, documents (multipart upload ingested as background jobs), search,
//! ask (JSON or server-sent events), adapters. Job routes live in `http::jobs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_multipart::form::{MultipartForm, tempfile::TempFile, text::Text};
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::guard::Caller;
use super::{ApiError, AppState, sse_event};
use crate::answerlog::Who;
use crate::collection::{CollectionSettings, CollectionStats};
use crate::config::{Bm25Change, Bm25Config, ChunkingConfig, FusionConfig};
use crate::ingest::{Format, Progress};
use crate::rag::{self, AdapterChoice};
use crate::retrieve::{Mode, Retriever};

type State = web::Data<AppState>;

/// Collection as the API shows it.
#[derive(Debug, Serialize)]
pub struct CollectionView {
    pub name: String,
    pub documents: usize,
    pub chunks: usize,
    pub vectors: usize,
    pub adapter: Option<String>,
    pub bm25: Bm25Config,
    pub fusion: FusionConfig,
    pub chunking: ChunkingConfig,
    pub embedding_model: String,
    pub created_at: u64,
}

fn view(s: CollectionSettings, stats: CollectionStats) -> CollectionView {
    CollectionView {
        name: s.name,
        documents: stats.documents,
        chunks: stats.chunks,
        vectors: stats.vectors,
        adapter: s.adapter,
        bm25: s.bm25,
        fusion: s.fusion,
        chunking: s.chunking,
        embedding_model: s.embedding_model,
        created_at: s.created_at,
    }
}

/// A collection in the list: its view, or why it cannot be opened (it can still be deleted).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Listed {
    Open(Box<CollectionView>),
    Damaged {
        name: String,
        damaged: bool,
        error: String,
    },
}

async fn list_collections(state: State, caller: Caller) -> Result<HttpResponse, ApiError> {
    let mut out = Vec::new();
    for name in state.app.catalog.list()? {
        if !caller.0.can_see(&name) {
            continue;
        }
        match state.app.collection(&name).await {
            Ok(c) => out.push(Listed::Open(Box::new(view(c.settings(), c.stats().await?)))),
            Err(e) => {
                let error = e.to_string();
                tracing::error!(collection = %name, %error, "collection cannot be opened");
                out.push(Listed::Damaged {
                    name,
                    damaged: true,
                    error,
                });
            }
        }
    }
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCollection {
    name: String,
    #[serde(default)]
    chunking: Option<ChunkingConfig>,
    #[serde(default)]
    bm25: Option<Bm25Change>,
    #[serde(default)]
    fusion: Option<FusionConfig>,
    #[serde(default)]
    adapter: Option<String>,
}

async fn create_collection(
    state: State,
    body: web::Json<CreateCollection>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let c = state
        .app
        .create_collection(&body.name, |s| {
            if let Some(c) = body.chunking {
                s.chunking = c;
            }
            if let Some(a) = body.adapter {
                s.adapter = Some(a);
            }
            set_search(s, body.fusion, body.bm25);
        })
        .await?;
    Ok(HttpResponse::Created().json(view(c.settings(), c.stats().await?)))
}

async fn get_collection(state: State, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    Ok(HttpResponse::Ok().json(view(c.settings(), c.stats().await?)))
}

/// `adapter`: absent = unchanged, null = none, string = that adapter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateCollection {
    #[serde(default, deserialize_with = "some_option")]
    adapter: Option<Option<String>>,
    #[serde(default)]
    bm25: Option<Bm25Change>,
    #[serde(default)]
    fusion: Option<FusionConfig>,
}

/// Distinguishes a missing field (None) from an explicit null (Some(None)).
fn some_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn update_collection(
    state: State,
    name: web::Path<String>,
    body: web::Json<UpdateCollection>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let (c, s) = state
        .app
        .update_collection(&name, |s| {
            if let Some(a) = body.adapter {
                s.adapter = a;
            }
            set_search(s, body.fusion, body.bm25);
        })
        .await?;
    Ok(HttpResponse::Ok().json(view(s, c.stats().await?)))
}

/// The search settings a request names replace the collection's (absent: unchanged; in `bm25`,
/// each setting on its own, so a client that sets one weight does not turn windows or pairs off).
fn set_search(s: &mut CollectionSettings, fusion: Option<FusionConfig>, bm25: Option<Bm25Change>) {
    if let Some(f) = fusion {
        s.fusion = f;
    }
    if let Some(b) = bm25 {
        b.apply(&mut s.bm25);
    }
}

async fn delete_collection(
    state: State,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.app.delete_collection(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchRequest {
    query: String,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    k: Option<usize>,
}

async fn search(
    state: State,
    name: web::Path<String>,
    body: web::Json<SearchRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let started = Instant::now();
    let hits = Retriever::new(Arc::clone(&state.embedder))
        .search(
            &c,
            &body.query,
            body.mode.unwrap_or(Mode::Hybrid),
            body.k.unwrap_or(5),
        )
        .await?;
    state.metrics.searches.fetch_add(1, Ordering::Relaxed);
    state
        .metrics
        .search_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    Ok(HttpResponse::Ok().json(serde_json::json!({ "results": hits })))
}

/// `adapter`: absent = the collection's, null = base model, string = that adapter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskRequest {
    question: String,
    #[serde(default, deserialize_with = "some_option")]
    adapter: Option<Option<String>>,
    #[serde(default)]
    stream: bool,
    /// The end user or session asking (hashed in the answer log; experiments assign arms by it).
    #[serde(default)]
    user: Option<String>,
}

pub(crate) fn adapter_choice(adapter: Option<Option<String>>) -> AdapterChoice {
    match adapter {
        None => AdapterChoice::Collection,
        Some(None) => AdapterChoice::Base,
        Some(Some(a)) => AdapterChoice::Named(a),
    }
}

async fn ask(
    state: State,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<AskRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let body = body.into_inner();
    if body.question.trim().is_empty() {
        return Err(ApiError::bad_request("`question` is empty"));
    }
    let choice = adapter_choice(body.adapter);
    state
        .app
        .check_choice(&caller.0, &choice, state.rag.house_adapter())?;
    let who = Who {
        key_id: caller.0.key_id.clone(),
        user: body.user,
    };
    let (stream, ticket) = state
        .begin_answer(&c, who, &[], &body.question, choice)
        .await?;
    if !body.stream {
        let answer = tracked_answer(&state, stream, |_| {}).await?;
        ticket.log(&state, &answer).await;
        return Ok(HttpResponse::Ok().json(ticket.view(&answer)));
    }
    // Unbounded: at most `generate.max_tokens` token events per answer, and none may be dropped.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<web::Bytes, std::io::Error>>();
    let state2 = state.clone();
    tokio::spawn(async move {
        let tx_tokens = tx.clone();
        let answer = tracked_answer(&state2, stream, move |t| {
            let _ = tx_tokens.send(Ok(sse_event("token", &serde_json::json!({ "text": t }))));
        });
        let Some(result) = while_client_listens(&tx, answer).await else {
            return;
        };
        let event = match result {
            Ok(answer) => {
                ticket.log(&state2, &answer).await;
                sse_event("done", &ticket.view(&answer))
            }
            Err(e) => {
                let e = ApiError::from(e);
                sse_event(
                    "error",
                    &serde_json::json!({"error": {"code": e.code, "message": e.message}}),
                )
            }
        };
        let _ = tx.send(Ok(event));
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(tokio_stream_from(rx)))
}

/// Run `work` (an answer being streamed to the client behind `tx`) while the client is
/// connected. When it goes away the work is dropped, which stops generation and frees its slot
/// at the next token, instead of finishing an answer nobody reads.
pub(crate) async fn while_client_listens<T, E>(
    tx: &tokio::sync::mpsc::UnboundedSender<Result<web::Bytes, E>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        () = tx.closed() => {
            tracing::debug!("client disconnected: answer cancelled");
            None
        }
    }
}

/// Drain an answer stream, keeping the answer metrics (the in-flight gauge is the generator's
/// slots held: see `GeneratorStats::running`).
pub(crate) async fn tracked_answer(
    state: &AppState,
    stream: rag::AnswerStream,
    on_token: impl FnMut(&str),
) -> Result<rag::Answer, rag::RagError> {
    let m = &state.metrics;
    let answer = rag::collect(stream, on_token).await;
    if let Ok(answer) = &answer {
        m.answers.fetch_add(1, Ordering::Relaxed);
        m.answer_micros
            .fetch_add((answer.timings_ms.total * 1e3) as u64, Ordering::Relaxed);
        m.retrieve_micros
            .fetch_add((answer.timings_ms.retrieve * 1e3) as u64, Ordering::Relaxed);
        m.completion_tokens
            .fetch_add(answer.completion_tokens as u64, Ordering::Relaxed);
    }
    answer
}

/// A `futures::Stream` over an mpsc receiver, for streaming bodies.
pub(crate) fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An ingest job's progress: files done of total.
struct IngestProgress(crate::jobs::Job);

impl Progress for IngestProgress {
    fn start(&self, total: u64) {
        self.0.start(total);
    }
    fn advance(&self, n: u64, _: &str) {
        self.0.advance(n);
    }
    fn finish(&self) {}
}

#[derive(MultipartForm)]
struct Upload {
    #[multipart(rename = "files")]
    files: Vec<TempFile>,
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    #[serde(default)]
    format: Option<String>,
}

/// A safe file name from an upload: its last path component, no hidden or traversal names.
fn safe_file_name(name: Option<&str>) -> Result<String, ApiError> {
    let name = name.ok_or_else(|| ApiError::bad_request("an uploaded file has no file name"))?;
    let base = Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ApiError::bad_request(format!("invalid file name {name:?}")))?;
    if base != name || base.starts_with('.') || base.contains('\\') || base.len() > 200 {
        return Err(ApiError::bad_request(format!(
            "invalid file name {name:?}: use a plain name without directories"
        )));
    }
    Ok(base.to_string())
}

fn parse_format(s: Option<&str>) -> Result<Format, ApiError> {
    Ok(match s.unwrap_or("auto") {
        "auto" => Format::Auto,
        "txt" => Format::Txt,
        "md" => Format::Md,
        "html" => Format::Html,
        "pdf" => Format::Pdf,
        "jsonl" => Format::Jsonl,
        "squad" => Format::Squad,
        other => return Err(ApiError::bad_request(format!("unknown format {other:?}"))),
    })
}

async fn upload_documents(
    state: State,
    name: web::Path<String>,
    query: web::Query<UploadQuery>,
    form: MultipartForm<Upload>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let format = parse_format(query.format.as_deref())?;
    let form = form.into_inner();
    if form.files.is_empty() {
        return Err(ApiError::bad_request("no files: send parts named `files`"));
    }
    let mut names = Vec::new();
    for f in &form.files {
        names.push(safe_file_name(f.file_name.as_deref())?);
    }
    // Uploaded originals are kept in the collection, so re-uploading a file replaces its chunks.
    let dir = c.dir.join("uploads");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for (f, n) in form.files.into_iter().zip(names) {
        let dest = dir.join(&n);
        // A staging name of its own: two uploads of one file name at once must not share it.
        let tmp = dir.join(format!(".{n}.{}.part", uuid::Uuid::new_v4().simple()));
        let target = dest.clone();
        web::block(move || {
            let staged =
                std::fs::copy(f.file.path(), &tmp).and_then(|_| std::fs::rename(&tmp, &target));
            if staged.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            staged
        })
        .await
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
        paths.push(dest);
    }
    // Ingest cannot stop half-way without leaving a document half-replaced: not cancellable.
    let job = state
        .jobs
        .create(crate::jobs::JobKind::Ingest, c.name(), false);
    job.set_total(paths.len() as u64);
    let (state2, job2) = (state.clone(), job.clone());
    tokio::spawn(async move {
        let embedder = Arc::clone(&state2.embedder);
        let progress = IngestProgress(job2.clone());
        let result = state2
            .app
            .ingest(c.name(), &paths, format, embedder, &progress)
            .await;
        match result {
            Ok(report) => job2.succeed(serde_json::json!({
                "documents": report.documents + report.unchanged,
                "chunks": report.chunks,
                "failures": report.failures,
                "failures_total": report.failures_total,
            })),
            Err(e) => {
                tracing::error!(error = %e, "ingest job failed");
                job2.fail(e.to_string());
            }
        }
    });
    Ok(HttpResponse::Accepted().json(job.view()))
}

async fn list_documents(state: State, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let docs: Vec<_> = c
        .ledger()
        .into_iter()
        .map(|(doc_id, e)| {
            serde_json::json!({
                "doc_id": doc_id, "title": e.title, "source": e.source,
                "chunks": e.chunks, "ingested_at": e.ingested_at,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(docs))
}

async fn delete_document(
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, doc_id) = path.into_inner();
    state.app.delete_document(&name, &doc_id).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn list_adapters(state: State, caller: Caller) -> Result<HttpResponse, ApiError> {
    let list = state
        .app
        .adapters_for(&caller.0, state.rag.house_adapter())?;
    Ok(HttpResponse::Ok().json(list))
}

#[derive(MultipartForm)]
struct AdapterUpload {
    name: Text<String>,
    #[multipart(rename = "files")]
    files: Vec<TempFile>,
}

async fn add_adapter(
    state: State,
    form: MultipartForm<AdapterUpload>,
) -> Result<HttpResponse, ApiError> {
    let form = form.into_inner();
    let staging = tempfile_dir()?;
    for f in &form.files {
        let n = safe_file_name(f.file_name.as_deref())?;
        if n != "adapter_config.json" && n != "adapter_model.safetensors" {
            return Err(ApiError::bad_request(format!(
                "unexpected file {n:?}: send adapter_config.json and adapter_model.safetensors"
            )));
        }
        std::fs::copy(f.file.path(), staging.join(&n))
            .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
    }
    let result = state.app.add_adapter(&form.name, &staging, false).await;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(HttpResponse::Created().json(result?))
}

fn tempfile_dir() -> Result<PathBuf, ApiError> {
    let dir = std::env::temp_dir().join(format!("domainrag-adapter-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
    Ok(dir)
}

async fn delete_adapter(state: State, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.app.remove_adapter(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `/api` routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api")
            .configure(super::jobs::configure)
            .configure(super::keys::configure)
            .configure(super::answers::configure)
            .route("/collections", web::get().to(list_collections))
            .route("/collections", web::post().to(create_collection))
            .route("/collections/{name}", web::get().to(get_collection))
            .route("/collections/{name}", web::patch().to(update_collection))
            .route("/collections/{name}", web::delete().to(delete_collection))
            .route("/collections/{name}/search", web::post().to(search))
            .route("/collections/{name}/ask", web::post().to(ask))
            .route(
                "/collections/{name}/documents",
                web::get().to(list_documents),
            )
            .route(
                "/collections/{name}/documents",
                web::post().to(upload_documents),
            )
            .route(
                "/collections/{name}/documents/{doc_id}",
                web::delete().to(delete_document),
            )
            .route("/adapters", web::get().to(list_adapters))
            .route("/adapters", web::post().to(add_adapter))
            .route("/adapters/{name}", web::delete().to(delete_adapter)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_cannot_escape() {
        assert_eq!(safe_file_name(Some("a.txt")).expect("plain"), "a.txt");
        for bad in [
            "../a.txt",
            "/etc/passwd",
            "x/y.txt",
            ".hidden",
            "..",
            "a\\b.txt",
        ] {
            assert!(safe_file_name(Some(bad)).is_err(), "{bad}");
        }
        assert!(safe_file_name(None).is_err());
    }
}
