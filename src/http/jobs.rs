//! Job routes: the adapter workflow as background jobs (synthesise triplets, train, evaluate),
//! plus listing, reading, cancelling jobs and downloading the files they wrote. Each job is one
//! call into the core (`train::synth`, `adapt`, `eval::answers`) on a spawned task reporting into
//! a `jobs::Job`; heavy jobs take turns (one at a time, the rest wait as `queued`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::guard::Caller;
use super::{ApiError, AppState};
use crate::access::{self, Action};
use crate::adapt::{AdaptError, TrainRequest, TripletSource, Workbench};
use crate::collection::Collection;
use crate::eval::Question;
use crate::jobs::{Job, JobError, JobKind, JobView};
use crate::train::{Method, TrainOptions, Triplet};

type State = web::Data<AppState>;

impl From<JobError> for ApiError {
    fn from(e: JobError) -> ApiError {
        ApiError::from_kind(e.kind(), &e)
    }
}

impl From<AdaptError> for ApiError {
    fn from(e: AdaptError) -> ApiError {
        ApiError::from_kind(e.kind(), &e)
    }
}

/// Synthesised triplets shown in a synth job's result, for a reader to judge.
const EXAMPLES_SHOWN: usize = 20;
/// Most triplets one synth job may write.
const MAX_SYNTH: usize = 5_000;
/// Most answers one evaluation job may generate (questions x arms).
const MAX_EVAL_ANSWERS: usize = 4_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    collection: Option<String>,
}

async fn list_jobs(state: State, caller: Caller, q: web::Query<ListQuery>) -> HttpResponse {
    let mut jobs = state.jobs.list(q.collection.as_deref());
    jobs.retain(|j| caller.0.can_see(&j.collection));
    HttpResponse::Ok().json(jobs)
}

/// Job `id` if the caller may do `action` on it; a job of a collection the key does not hold
/// does not exist for it.
fn job_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: Option<Action>,
) -> Result<JobView, ApiError> {
    let view = state.jobs.get(id)?.view();
    if !caller.0.can_see(&view.collection) {
        return Err(JobError::NotFound(id.to_string()).into());
    }
    let action = action.unwrap_or_else(|| access::action_to_run(view.kind));
    caller.0.require(action, Some(&view.collection))?;
    Ok(view)
}

async fn get_job(
    state: State,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(job_for(&state, &caller, &id, Some(Action::Read))?))
}

async fn cancel_job(
    state: State,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    job_for(&state, &caller, &id, None)?;
    Ok(HttpResponse::Accepted().json(state.jobs.cancel(&id)?))
}

async fn job_file(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, name) = path.into_inner();
    job_for(&state, &caller, &id, Some(Action::Read))?;
    let file = state.jobs.file(&id, &name)?;
    let body = tokio::fs::read(&file)
        .await
        .map_err(|e| ApiError::from_kind(crate::error::ErrorKind::Internal, &e))?;
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/x-ndjson",
    };
    // A report is a document of its own: inline styles, nothing else, no scripts, sandboxed.
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            actix_web::http::header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox",
        ))
        .body(body))
}

/// What a job's work returns: its result, or an error whose whole chain the job shows.
type Work = Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>;

/// How a running job stops when cancelled.
#[derive(Clone, Copy, PartialEq)]
enum OnCancel {
    /// Drop the work at its next await point (synthesis, evaluation).
    Drop,
    /// The work watches the job and stops itself (training finishes its step first).
    Watch,
}

/// Run `work` as `job` once the heavy-job slot is free (queued until then; cancelling a queued
/// job ends it without running).
fn spawn_heavy<F>(state: &State, job: Job, on_cancel: OnCancel, work: F)
where
    F: std::future::Future<Output = Work> + Send + 'static,
{
    let state = state.clone();
    tokio::spawn(async move {
        let slot = tokio::select! {
            slot = state.heavy_jobs.acquire() => slot,
            () = job.cancelled() => return job.end_cancelled(None),
        };
        let Ok(_slot) = slot else {
            return job.fail("the server is stopping".into());
        };
        let result = match on_cancel {
            OnCancel::Drop => tokio::select! {
                r = work => Some(r),
                () = job.cancelled() => None,
            },
            OnCancel::Watch => Some(work.await),
        };
        match result {
            Some(Ok(value)) => job.succeed(value),
            None => job.end_cancelled(None),
            Some(Err(_)) if job.is_cancelled() => job.end_cancelled(None),
            Some(Err(e)) => {
                let message = error_chain(e.as_ref());
                tracing::warn!(error = %message, "job failed");
                job.fail(message);
            }
        }
    });
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn accepted(job: &Job) -> HttpResponse {
    HttpResponse::Accepted().json(job.view())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SynthRequest {
    #[serde(default = "default_synth")]
    n: usize,
    #[serde(default)]
    shuffle_sources: bool,
    #[serde(default = "default_seed")]
    seed: u64,
}

fn default_synth() -> usize {
    300
}

fn default_seed() -> u64 {
    42
}

/// `POST /api/collections/{name}/synth`: synthesise triplets from the collection's chunks.
async fn synth(
    state: State,
    name: web::Path<String>,
    body: web::Json<SynthRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let body = body.into_inner();
    if body.n == 0 || body.n > MAX_SYNTH {
        return Err(ApiError::bad_request(format!(
            "`n` must be 1..={MAX_SYNTH}, got {}",
            body.n
        )));
    }
    let job = state.jobs.create(JobKind::Synth, c.name(), true);
    let (state2, job2) = (state.clone(), job.clone());
    spawn_heavy(&state, job.clone(), OnCancel::Drop, async move {
        job2.start(body.n as u64);
        let (triplets, report) = crate::train::synth::synthesize(
            &state2.rag,
            &c,
            body.n,
            body.seed,
            body.shuffle_sources,
            &|k| job2.advance(k as u64),
        )
        .await?;
        let path = job2.dir()?.join("triplets.jsonl");
        crate::train::write_triplets(&path, &triplets)?;
        job2.add_file("triplets.jsonl");
        Ok(serde_json::json!({
            "triplets": triplets.len(),
            "report": report,
            "examples": examples(&triplets),
        }))
    });
    Ok(accepted(&job))
}

fn examples(triplets: &[Triplet]) -> Vec<serde_json::Value> {
    triplets
        .iter()
        .take(EXAMPLES_SHOWN)
        .map(|t| {
            serde_json::json!({
                "query": t.query,
                "answer": t.answer,
                "doc_id": t.origin.as_ref().map(|o| o.doc_id.clone()),
            })
        })
        .collect()
}

/// `POST /api/collections/{name}/train` (defaults: `TrainOptions::default`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainBody {
    name: String,
    /// Synthesise this many triplets first ...
    #[serde(default)]
    synthetic: Option<usize>,
    /// ... or train on the triplets a finished synth job wrote.
    #[serde(default)]
    triplets_job: Option<String>,
    #[serde(default)]
    replace: bool,
    #[serde(default)]
    assign: bool,
    /// lora (the default), ia3, prompt or prefix, with that method's default targets.
    #[serde(default)]
    method: Method,
    /// prompt and prefix: how many virtual tokens and the text they start from.
    #[serde(default)]
    virtual_tokens: Option<usize>,
    #[serde(default)]
    init_text: Option<String>,
    /// prefix: the reparameterisation MLP's hidden width (0 = none).
    #[serde(default)]
    prefix_projection: Option<usize>,
    #[serde(default)]
    epochs: Option<usize>,
    #[serde(default)]
    lr: Option<f64>,
    #[serde(default)]
    batch: Option<usize>,
    #[serde(default)]
    rank: Option<usize>,
    #[serde(default)]
    alpha: Option<f64>,
    #[serde(default)]
    max_len: Option<usize>,
    #[serde(default)]
    val_split: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    #[serde(default)]
    gradient_checkpointing: Option<bool>,
}

impl TrainBody {
    fn request(self, state: &AppState) -> Result<TrainRequest, ApiError> {
        let d = TrainOptions::for_method(self.method);
        let options = TrainOptions {
            epochs: self.epochs.unwrap_or(d.epochs),
            lr: self.lr.unwrap_or(d.lr),
            batch: self.batch.unwrap_or(d.batch),
            rank: self.rank.unwrap_or(d.rank),
            alpha: self.alpha.unwrap_or(d.alpha),
            max_len: self.max_len.unwrap_or(d.max_len),
            val_split: self.val_split.unwrap_or(d.val_split),
            seed: self.seed.unwrap_or(d.seed),
            virtual_tokens: self.virtual_tokens.unwrap_or(d.virtual_tokens),
            init_text: self.init_text.unwrap_or_else(|| d.init_text.clone()),
            prefix_projection: self.prefix_projection.unwrap_or(d.prefix_projection),
            gradient_checkpointing: self
                .gradient_checkpointing
                .unwrap_or(d.gradient_checkpointing),
            ..d
        };
        let source = match (self.synthetic, self.triplets_job) {
            (Some(n), None) => TripletSource::Synthetic {
                n,
                seed: options.seed,
            },
            (None, Some(id)) => TripletSource::File(state.jobs.file(&id, "triplets.jsonl")?),
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of `synthetic` (a number of triplets to synthesise) or \
                     `triplets_job` (the id of a finished synth job)",
                ));
            }
        };
        let request = TrainRequest {
            name: self.name,
            source,
            options,
            replace: self.replace,
            assign: self.assign,
            keep_when_stopped: false,
            device: candle_core::Device::Cpu,
        };
        crate::adapt::check(&state.app.registry, &request)?;
        Ok(request)
    }
}

/// The training progress a job shows: step of total, loss, tokens/s.
struct TrainProgress(Job);

impl crate::train::Progress for TrainProgress {
    fn start(&mut self, total_steps: usize) {
        self.0.start(total_steps as u64);
    }
    fn step(&mut self, step: usize, epoch: usize, loss: f32, tokens_per_s: f64, lr: f64) {
        self.0.set_done(
            step as u64,
            format!("epoch {epoch} loss {loss:.4} {tokens_per_s:.0} tok/s lr {lr:.2e}"),
        );
    }
    fn message(&mut self, text: &str) {
        self.0.set_message(text);
    }
    fn finish(&mut self) {}
}

async fn train(
    state: State,
    name: web::Path<String>,
    body: web::Json<TrainBody>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let request = body.into_inner().request(&state)?;
    let job = state.jobs.create(JobKind::Train, c.name(), true);
    let (state2, job2) = (state.clone(), job.clone());
    spawn_heavy(&state, job.clone(), OnCancel::Watch, async move {
        job2.start(0);
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (job, stop) = (job2.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                job.cancelled().await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        job2.set_message(match request.source {
            TripletSource::Synthetic { .. } => "synthesising triplets",
            TripletSource::File(_) => "tokenising triplets",
        });
        let outcome = train_on(&state2, &c, request, &job2, stop).await;
        watcher.abort();
        Ok(serde_json::to_value(outcome?)?)
    });
    Ok(accepted(&job))
}

async fn train_on(
    state: &AppState,
    c: &Arc<Collection>,
    request: TrainRequest,
    job: &Job,
    stop: Arc<AtomicBool>,
) -> Result<crate::adapt::TrainOutcome, AdaptError> {
    let bench = Workbench {
        rag: &state.rag,
        catalog: &state.app.catalog,
        registry: &state.app.registry,
        base_dir: state.app.settings.generate_base_dir(),
        training_dir: state.app.settings.paths.data_dir.join("training"),
    };
    let progress = Box::new(TrainProgress(job.clone()));
    crate::adapt::train_adapter(&bench, c, request, &|_| {}, progress, stop).await
}

/// `POST /api/collections/{name}/eval`: answer `questions` with each arm and score them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    questions: Vec<Question>,
    /// Adapter names; `"none"` is the base model. Default: the base model and the collection's
    /// adapter (or the house adapter).
    #[serde(default)]
    arms: Vec<String>,
}

async fn evaluate(
    state: State,
    name: web::Path<String>,
    body: web::Json<EvalBody>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let body = body.into_inner();
    let questions =
        crate::eval::checked_questions(body.questions).map_err(ApiError::bad_request)?;
    let arms = eval_arms(&state, &c, body.arms)?;
    let answers = questions.len() * arms.len();
    if answers > MAX_EVAL_ANSWERS {
        return Err(ApiError::bad_request(format!(
            "{answers} answers ({} questions x {} arms) is over the limit of {MAX_EVAL_ANSWERS} \
             for one job; split the question set",
            questions.len(),
            arms.len()
        )));
    }
    let job = state.jobs.create(JobKind::Eval, c.name(), true);
    let (state2, job2) = (state.clone(), job.clone());
    spawn_heavy(&state, job.clone(), OnCancel::Drop, async move {
        job2.start(answers as u64);
        let report = crate::eval::answers::evaluate(
            &state2.rag,
            &state2.embedder,
            &c,
            &questions,
            &arms,
            None,
            &|n| job2.advance(n as u64),
        )
        .await?;
        let dir = job2.dir()?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
        std::fs::write(dir.join("report.html"), crate::eval::answers::html(&report))?;
        job2.add_file("report.json");
        job2.add_file("report.html");
        Ok(serde_json::json!({
            "questions": report.questions,
            "arms": report.arms,
            "table": crate::eval::answers::table(&report),
        }))
    });
    Ok(accepted(&job))
}

/// The arms to compare: named ones checked against the registry, or base vs the adapter the
/// collection answers with.
fn eval_arms(
    state: &AppState,
    c: &Collection,
    arms: Vec<String>,
) -> Result<Vec<Option<String>>, ApiError> {
    let arms: Vec<Option<String>> = if arms.is_empty() {
        let own = c.settings().adapter.or_else(|| state.rag.house_adapter());
        std::iter::once(None).chain(own.map(Some)).collect()
    } else {
        arms.into_iter()
            .map(|a| (a != "none").then_some(a))
            .collect()
    };
    for a in arms.iter().flatten() {
        state.app.registry.get(a)?;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = arms.iter().find(|a| !seen.insert(*a)) {
        return Err(ApiError::bad_request(format!(
            "arm {:?} is listed twice",
            dup.as_deref().unwrap_or("none")
        )));
    }
    Ok(arms)
}

/// Job routes (inside `/api`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/jobs", web::get().to(list_jobs))
        .route("/jobs/{id}", web::get().to(get_job))
        .route("/jobs/{id}/cancel", web::post().to(cancel_job))
        .route("/jobs/{id}/files/{name}", web::get().to(job_file))
        .route("/collections/{name}/synth", web::post().to(synth))
        .route("/collections/{name}/train", web::post().to(train))
        .route("/collections/{name}/eval", web::post().to(evaluate));
}
