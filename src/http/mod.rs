//! The HTTP appliance (actix-web): shared state, the error shape, health, metrics, the embedded web
//! UI, and server start/stop. Route groups live in [`api`] (collections, documents, search, ask,
//! adapters), [`jobs`] (synthesis, training, evaluation jobs and the job list) and [`openai`] (`/v1`).
//!
//! Handlers are thin: request DTO -> one call into `rag` / `retrieve` / `ingest` / `collection` ->
//! DTO back. No tantivy, Qdrant or mistral.rs types here. Nothing imports this module.

pub mod answers;
pub mod api;
pub mod guard;
pub mod jobs;
pub mod keys;
pub mod openai;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError, web};
use serde::Serialize;

use crate::access::AccessError;
use crate::access::audit::AuditLog;
use crate::access::keys::KeyStore;
use crate::adapters::AdapterError;
use crate::app::{App, AppError};
use crate::collection::CollectionError;
use crate::config::Settings;
use crate::embed::{EmbedError, Embedder};
use crate::error::ErrorKind;
use crate::generate::{GenerateError, Generator, Sampling};
use crate::ingest::IngestError;
use crate::rag::{Rag, RagError};
use crate::retrieve::{RetrieveError, Retriever};

/// An error as the API returns it: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// Map a domain error by its kind. 5xx bodies stay opaque; the cause goes to the log.
    pub fn from_kind(kind: ErrorKind, err: &dyn std::error::Error) -> ApiError {
        let status = match kind {
            ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            let mut chain = err.to_string();
            let mut source = err.source();
            while let Some(s) = source {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                source = s.source();
            }
            tracing::error!(error = %chain, "request failed");
            let message = match kind {
                ErrorKind::Unavailable => "a dependency is unavailable; retry later".to_string(),
                _ => "internal error".to_string(),
            };
            return ApiError::new(status, kind.code(), message);
        }
        ApiError::new(status, kind.code(), err.to_string())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(serde_json::json!({"error": {"code": self.code, "message": self.message}}))
    }
}

macro_rules! api_error_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for ApiError {
            fn from(e: $ty) -> ApiError {
                ApiError::from_kind(e.kind(), &e)
            }
        }
    )*};
}
api_error_from!(
    AppError,
    CollectionError,
    RetrieveError,
    IngestError,
    AdapterError,
    EmbedError,
    AccessError
);

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> ApiError {
        match e {
            GenerateError::Busy(n) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    format!("{n} answers are being generated; retry shortly"),
                )
            },
            e => ApiError::from_kind(e.kind(), &e),
        }
    }
}

impl From<RagError> for ApiError {
    fn from(e: RagError) -> ApiError {
        match e {
            RagError::Generate(g) => g.into(),
            RagError::Retrieve(r) => r.into(),
            RagError::InvalidInput(m) => ApiError::bad_request(m),
        }
    }
}

/// Counters for `/metrics` (Prometheus text format).
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors_4xx: AtomicU64,
    pub errors_5xx: AtomicU64,
    pub searches: AtomicU64,
    pub search_micros: AtomicU64,
    pub answers: AtomicU64,
    pub answer_micros: AtomicU64,
    pub retrieve_micros: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// Answers given but not logged (the answer log could not be written).
    pub answer_log_errors: AtomicU64,
    /// Time spent in the answer log on the asking path (experiment assignment before generation,
    /// the log write after it), summed over answers.
    pub answer_log_micros: AtomicU64,
}

impl Metrics {
    /// Add the time since `started` to the answer log's share of asking.
    pub(crate) fn count_log_time(&self, started: std::time::Instant) {
        self.answer_log_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn render(
        &self,
        resident_adapters: usize,
        jobs_running: usize,
        generator: crate::generate::GeneratorStats,
    ) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# TYPE domainrag_http_requests_total counter\ndomainrag_http_requests_total {}\n\
             # TYPE domainrag_http_errors_total counter\ndomainrag_http_errors_total{{class=\"4xx\"}} {}\ndomainrag_http_errors_total{{class=\"5xx\"}} {}\n\
             # TYPE domainrag_search_seconds summary\ndomainrag_search_seconds_count {}\ndomainrag_search_seconds_sum {}\n\
             # TYPE domainrag_answer_seconds summary\ndomainrag_answer_seconds_count {}\ndomainrag_answer_seconds_sum {}\n\
             # TYPE domainrag_answer_retrieve_seconds_sum counter\ndomainrag_answer_retrieve_seconds_sum {}\n\
             # TYPE domainrag_completion_tokens_total counter\ndomainrag_completion_tokens_total {}\n\
             # TYPE domainrag_generation_rejected_total counter\ndomainrag_generation_rejected_total {}\n\
             # TYPE domainrag_generation_in_flight gauge\ndomainrag_generation_in_flight {}\n\
             # TYPE domainrag_adapters_resident gauge\ndomainrag_adapters_resident {}\n\
             # TYPE domainrag_jobs_running gauge\ndomainrag_jobs_running {}\n\
             # TYPE domainrag_generation_queued gauge\ndomainrag_generation_queued {}\n\
             # TYPE domainrag_adapter_pool_total counter\ndomainrag_adapter_pool_total{{result=\"hit\"}} {}\ndomainrag_adapter_pool_total{{result=\"miss\"}} {}\n\
             # TYPE domainrag_answer_log_errors_total counter\ndomainrag_answer_log_errors_total {}\n\
             # TYPE domainrag_answer_log_seconds_sum counter\ndomainrag_answer_log_seconds_sum {}\n\
             # TYPE domainrag_heap_in_use_bytes gauge\ndomainrag_heap_in_use_bytes {}\n",
            g(&self.requests),
            g(&self.errors_4xx),
            g(&self.errors_5xx),
            g(&self.searches),
            g(&self.search_micros) as f64 / 1e6,
            g(&self.answers),
            g(&self.answer_micros) as f64 / 1e6,
            g(&self.retrieve_micros) as f64 / 1e6,
            g(&self.completion_tokens),
            g(&self.rejected_busy),
            generator.running,
            resident_adapters,
            jobs_running,
            generator.queued,
            generator.pool_hits,
            generator.pool_misses,
            g(&self.answer_log_errors),
            g(&self.answer_log_micros) as f64 / 1e6,
            crate::heap::in_use_bytes(),
        ) + &generator.engine.map(engine_metrics).unwrap_or_default()
    }
}

/// The background faithfulness scorer's queue.
fn scorer_metrics(s: &crate::answerlog::scorer::Scorer) -> String {
    format!(
        "# TYPE domainrag_answer_scoring_pending gauge\ndomainrag_answer_scoring_pending {}\n\
         # TYPE domainrag_answer_scoring_skipped_total counter\ndomainrag_answer_scoring_skipped_total {}\n",
        s.pending(),
        s.skipped(),
    )
}

/// The native engine's gauges and counters.
fn engine_metrics(e: crate::generate::EngineStats) -> String {
    format!(
        "# TYPE domainrag_engine_running gauge\ndomainrag_engine_running {}\n\
         # TYPE domainrag_engine_waiting gauge\ndomainrag_engine_waiting {}\n\
         # TYPE domainrag_engine_kv_reserved_tokens gauge\ndomainrag_engine_kv_reserved_tokens {}\n\
         # TYPE domainrag_engine_steps_total counter\ndomainrag_engine_steps_total {}\n\
         # TYPE domainrag_engine_step_rows_total counter\ndomainrag_engine_step_rows_total {}\n\
         # TYPE domainrag_engine_sequences_total counter\ndomainrag_engine_sequences_total{{end=\"finished\"}} {}\ndomainrag_engine_sequences_total{{end=\"cancelled\"}} {}\n\
         # TYPE domainrag_engine_adapter_bytes gauge\ndomainrag_engine_adapter_bytes {}\n",
        e.running,
        e.waiting,
        e.kv_reserved_tokens,
        e.steps,
        e.step_rows,
        e.finished,
        e.cancelled,
        e.adapter_bytes,
    )
}

/// What every handler shares: the application core and what only the server keeps.
pub struct AppState {
    /// Collections, documents and adapters (the operations the CLI performs too).
    pub app: App,
    pub embedder: Arc<Embedder>,
    pub generator: Arc<Generator>,
    pub rag: Rag,
    pub jobs: crate::jobs::Jobs,
    /// Synthesis, training and evaluation jobs take turns (one at a time).
    pub heavy_jobs: tokio::sync::Semaphore,
    pub metrics: Metrics,
    /// API keys (`server.auth`); shared with the blocking pool, where Argon2 runs.
    pub keys: Arc<KeyStore>,
    pub audit: AuditLog,
    /// Scores logged answers' faithfulness in the background.
    pub scorer: crate::answerlog::scorer::Scorer,
    /// Tells CLI commands (and a second server) that this data dir is served: taken before the
    /// recovery at load, released when the server stops ([`Server::wait`]).
    served: std::sync::Mutex<Option<crate::datadir::FileLock>>,
}

impl AppState {
    /// Claim the data dir (refused while another server holds it), finish what a killed process
    /// left half-done, load the embedder and the base model, preload the adapters collections use.
    pub async fn load(settings: Settings) -> anyhow::Result<Arc<AppState>> {
        let served = crate::datadir::hold_for_server(&settings.paths.data_dir)?;
        let embedder = Embedder::load_async(&settings).await?;
        let generator = Generator::load(&settings).await?;
        let app = App::new(settings, Some(Arc::clone(&generator)));
        app.recover();
        let settings = &app.settings;
        let rag = Rag::new(
            Retriever::new(Arc::clone(&embedder)),
            Arc::clone(&generator),
            settings.rag.clone(),
            Sampling::from_config(&settings.generate),
        );
        let house = rag.house_adapter();
        if house.is_none() && !settings.rag.house_adapter.is_empty() {
            tracing::warn!(
                adapter = %settings.rag.house_adapter,
                "house adapter not registered: collections without an adapter of their own \
                 answer with the base model (register it with `domainrag adapters add` or train it \
                 with `domainrag train --name`)"
            );
        }
        let mut in_use = Vec::new();
        for name in app.catalog.list()? {
            // A damaged collection is reported (listed as damaged, deletable), not fatal.
            let settings = match app.catalog.settings(&name) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(collection = %name, error = %e, "collection cannot be read");
                    continue;
                }
            };
            let adapter = settings.adapter.or_else(|| house.clone());
            if let Some(a) = adapter
                && !in_use.contains(&a)
            {
                in_use.push(a);
            }
        }
        generator.preload(&in_use).await?;
        generator.preload_registered().await?;
        let scorer = crate::answerlog::scorer::Scorer::start(
            Arc::clone(&embedder),
            settings.answers.score_faithfulness,
        );
        Ok(Arc::new(AppState {
            embedder,
            generator,
            rag,
            jobs: crate::jobs::Jobs::new(
                settings.paths.data_dir.join("jobs"),
                settings.server.jobs_kept,
            ),
            heavy_jobs: tokio::sync::Semaphore::new(1),
            metrics: Metrics::default(),
            keys: Arc::new(KeyStore::new(&settings.paths.data_dir)),
            audit: AuditLog::new(&settings.paths.data_dir, settings.server.audit_max_bytes),
            scorer,
            app,
            served: std::sync::Mutex::new(Some(served)),
        }))
    }
}

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const ADAPT_JS: &str = include_str!("../../web/adapt.js");
const EXPERIMENT_JS: &str = include_str!("../../web/experiment.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");
const OPENAPI_JSON: &str = include_str!("../../web/openapi.json");

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.app.catalog.list() {
        Ok(names) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ready",
            "collections": names.len(),
            "embedding_dimension": state.embedder.dimension(),
        })),
        Err(e) => ApiError::from(e).error_response(),
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let resident = state.generator.resident_adapters().await.len();
    let running = state.jobs.running();
    let body = state
        .metrics
        .render(resident, running, state.generator.stats())
        + &scorer_metrics(&state.scorer)
        + &answers::experiment_metrics(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

fn static_file(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok().content_type(content_type).body(body)
}

/// Health, metrics, UI and OpenAPI routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route(
            "/openapi.json",
            web::get().to(|| async { static_file(OPENAPI_JSON, "application/json") }),
        )
        .route(
            "/",
            web::get().to(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            web::get().to(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/adapt.js",
            web::get().to(|| async { static_file(ADAPT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/experiment.js",
            web::get()
                .to(|| async { static_file(EXPERIMENT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            web::get().to(|| async { static_file(STYLE_CSS, "text/css; charset=utf-8") }),
        );
}

/// JSON body errors as the API's error shape.
fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _| {
            let status = match &err {
                actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
                | actix_web::error::JsonPayloadError::Overflow { .. } => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                actix_web::error::JsonPayloadError::ContentType => {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE
                }
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, "invalid_input", format!("bad JSON body: {err}")).into()
        })
}

/// Multipart errors in the API's error shape; an upload over `server.max_upload_bytes` is 413.
fn multipart_error(
    err: actix_multipart::MultipartError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    let too_large = matches!(
        err,
        actix_multipart::MultipartError::Payload(actix_web::error::PayloadError::Overflow)
    );
    if too_large {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_input",
            "the upload is larger than this server accepts (server.max_upload_bytes): send fewer \
             or smaller files per request",
        )
        .into();
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_input",
        format!("bad upload: {err}"),
    )
    .into()
}

/// A running server.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub handle: actix_web::dev::ServerHandle,
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Wait until the server stops (SIGTERM/SIGINT or [`Server::stop`]), then flush collections
    /// and release the data dir.
    pub async fn wait(self) -> std::io::Result<()> {
        let result = self.task.await.map_err(std::io::Error::other)?;
        self.state.app.close_all().await;
        if let Ok(mut served) = self.state.served.lock() {
            served.take();
        }
        result
    }

    /// Stop gracefully: stop accepting, let in-flight requests finish (up to the shutdown timeout).
    pub async fn stop(self) -> std::io::Result<()> {
        self.handle.stop(true).await;
        self.wait().await
    }
}

/// The addresses `bind` names, if the server may listen there: without `server.auth` only
/// loopback ones, since anyone who can reach it could change everything. Checked before the
/// models load, so a refused start is quick.
pub fn listen_addrs(settings: &Settings, bind: &str) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(bind)
        .map_err(|e| anyhow::anyhow!("server.bind {bind:?}: {e}"))?
        .collect();
    if !settings.server.auth && addrs.iter().any(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "refusing to listen on {bind} with server.auth = false: anyone who can reach it could \
             delete collections and install adapters. Turn auth on (create a key with `domainrag \
             keys create --admin`) or bind a loopback address such as 127.0.0.1:8080"
        );
    }
    Ok(addrs)
}

/// Bind and start the server on `bind` (e.g. `127.0.0.1:8080`, or port 0 for tests).
pub async fn start(state: Arc<AppState>, bind: &str) -> anyhow::Result<Server> {
    let data = web::Data::from(Arc::clone(&state));
    let addrs = listen_addrs(&state.app.settings, bind)?;
    let gate = web::Data::new(guard::Gate::new(
        &state.app.settings.server.allowed_hosts,
        &addrs,
    ));
    let json_limit = state.app.settings.server.max_json_bytes;
    let upload_limit = state.app.settings.server.max_upload_bytes;
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            .app_data(gate.clone())
            .app_data(json_config(json_limit))
            .app_data(
                actix_multipart::form::MultipartFormConfig::default()
                    .total_limit(upload_limit)
                    .memory_limit(upload_limit)
                    .error_handler(multipart_error),
            )
            .wrap(actix_web::middleware::from_fn(guard::gate))
            .wrap(actix_web::middleware::from_fn(count_requests))
            .wrap(guard::headers())
            .configure(configure)
            .configure(api::configure)
            .configure(openai::configure)
            .default_service(web::to(|| async {
                Err::<HttpResponse, ApiError>(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route",
                ))
            }))
    })
    .shutdown_timeout(state.app.settings.server.shutdown_timeout_secs)
    .client_request_timeout(std::time::Duration::from_secs(
        state.app.settings.server.request_timeout_secs,
    ))
    .bind(bind)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("bound to no address"))?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%addr, "listening");
    Ok(Server {
        addr,
        handle,
        state,
        task,
    })
}

async fn count_requests(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?;
    if let Some(state) = state {
        state.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let status = res.status();
        if status.is_client_error() {
            state.metrics.errors_4xx.fetch_add(1, Ordering::Relaxed);
        } else if status.is_server_error() {
            state.metrics.errors_5xx.fetch_add(1, Ordering::Relaxed);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            state.metrics.rejected_busy.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(res)
}

/// Serialise for an SSE `data:` line.
pub(crate) fn sse_event(event: &str, data: &impl Serialize) -> web::Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    web::Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}
