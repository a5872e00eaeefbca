//! The answer log over HTTP: how `/api/.../ask` and `/v1` answer through it (experiment
//! assignment before generation, logging after), feedback on an answer, the log's listing and
//! JSONL export, the collection's experiment (status, start, stop) and blind comparisons of its
//! arms.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::guard::Caller;
use super::{ApiError, AppState};
use crate::access::Action;
use crate::answerlog::{
    self, AnswerLog, Arm, Decision, Experiment, Feedback, LogError, Provenance, Who, blocking,
};
use crate::collection::Collection;
use crate::generate::ChatMessage;
use crate::rag::{self, AdapterChoice, Answer};

type State = web::Data<AppState>;

impl From<LogError> for ApiError {
    fn from(e: LogError) -> ApiError {
        ApiError::from_kind(e.kind(), &e)
    }
}

/// An answer being given: where it is logged and what to log with it.
pub(crate) struct Ticket {
    log: AnswerLog,
    provenance: Provenance,
}

/// The answer's id and experiment arm, sent with the answer.
#[derive(Debug, Serialize)]
pub(crate) struct Logged<'a> {
    /// None when the answer log is off (`answers.enabled = false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) answer_id: Option<&'a str>,
    pub(crate) experiment: Option<ArmView>,
    #[serde(flatten)]
    pub(crate) answer: &'a Answer,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ArmView {
    pub(crate) id: i64,
    pub(crate) arm: Arm,
}

impl Ticket {
    /// The answer's id, when it is logged.
    pub(crate) fn id(&self) -> Option<&str> {
        self.log.enabled().then_some(self.provenance.id.as_str())
    }

    /// What goes out with `answer`.
    pub(crate) fn view<'a>(&'a self, answer: &'a Answer) -> Logged<'a> {
        Logged {
            answer_id: self.id(),
            experiment: self
                .provenance
                .assigned
                .map(|(id, arm)| ArmView { id, arm }),
            answer,
        }
    }

    /// Log the finished answer and queue it for scoring. A log failure is reported and counted,
    /// not returned: the asker has the answer.
    pub(crate) async fn log(&self, state: &AppState, answer: &Answer) {
        let (log, p, a) = (self.log.clone(), self.provenance.clone(), answer.clone());
        if !self.log.enabled() || from_deleted_document(state, &self.provenance.id, answer).await {
            return;
        }
        let started = std::time::Instant::now();
        let recorded = blocking(move || log.record(&p, &a)).await;
        state.metrics.count_log_time(started);
        match recorded {
            Ok(()) => state.scorer.submit(
                self.log.clone(),
                self.provenance.id.clone(),
                self.provenance.question.clone(),
                answer.clone(),
            ),
            Err(e) => {
                tracing::error!(answer = %self.provenance.id, error = %e, "logging an answer failed");
                state
                    .metrics
                    .answer_log_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Whether `answer` was given from a document deleted while it was being written: deleting a
/// document deletes the answers logged from it, so one finishing after the delete is not logged.
async fn from_deleted_document(state: &AppState, answer_id: &str, answer: &Answer) -> bool {
    let Ok(name) = answerlog::collection_of(answer_id) else {
        return false;
    };
    match state.app.collection(name).await {
        Ok(c) => answer.sources.iter().any(|s| !c.has_document(&s.doc_id)),
        Err(_) => true,
    }
}

impl AppState {
    /// Start answering `question` in `c` for `who`: an experiment may assign the adapter, then
    /// retrieval and generation start. The ticket logs the answer once it is complete.
    pub(crate) async fn begin_answer(
        &self,
        c: &Collection,
        who: Who,
        history: &[ChatMessage],
        question: &str,
        choice: AdapterChoice,
    ) -> Result<(rag::AnswerStream, Ticket), ApiError> {
        let log = self.app.answer_log(c.name());
        let assignment = {
            let (log, who) = (log.clone(), who.clone());
            let started = std::time::Instant::now();
            let assigned = blocking(move || log.assign(choice, &who)).await;
            self.metrics.count_log_time(started);
            assigned?
        };
        let stream = self
            .rag
            .answer_stream_with_history(c, history, question, &assignment.choice)
            .await?;
        let provenance = Provenance {
            id: answerlog::new_answer_id(c.name()),
            question: question.to_string(),
            who,
            assigned: assignment.assigned,
            comparison: None,
        };
        Ok((stream, Ticket { log, provenance }))
    }
}

async fn feedback(
    state: State,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Feedback>,
) -> Result<HttpResponse, ApiError> {
    let collection = answerlog::collection_of(&id)?;
    caller.0.require(Action::Read, Some(collection))?;
    state.app.collection(collection).await?;
    let log = state.app.answer_log(collection);
    let who = Who {
        key_id: caller.0.key_id.clone(),
        user: None,
    };
    let (id, feedback) = (id.into_inner(), body.into_inner());
    let stored = {
        let id = id.clone();
        blocking(move || {
            log.feedback(&id, &feedback, &who)?;
            log.get(&id)
        })
        .await?
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "answer_id": id, "feedback": stored.feedback,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
}

async fn list_answers(
    state: State,
    name: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    state.app.collection(&name).await?;
    let log = state.app.answer_log(&name);
    let (limit, offset) = (page.limit.unwrap_or(50).min(500), page.offset.unwrap_or(0));
    let answers = blocking(move || log.list(limit, offset)).await?;
    Ok(HttpResponse::Ok().json(answers))
}

async fn export_answers(state: State, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.app.collection(&name).await?;
    let log = state.app.answer_log(&name);
    // Streamed: a line at a time from the blocking pool, a few lines buffered (a long log never
    // sits in memory whole). A client that leaves stops the export.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let sent = log.export(&mut |line| {
            tx.blocking_send(Ok(web::Bytes::from(line + "\n")))
                .map_err(|_| LogError::Invalid("export: the client left".into()))
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "answer log export ended early");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let mut rx = rx;
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{name}-answers.jsonl\""),
        ))
        .streaming(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}

async fn experiment_status(
    state: State,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.app.collection(&name).await?;
    let log = state.app.answer_log(&name);
    let min = state.app.settings.answers.min_per_arm;
    let (running, all) = blocking(move || {
        let running = match log.running_experiment()? {
            Some(_) => Some(log.experiment_report(&name, None, min)?),
            None => None,
        };
        Ok((running, log.experiments()?))
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"running": running, "experiments": all})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    candidate: String,
    share: f64,
}

async fn start_experiment(
    state: State,
    name: web::Path<String>,
    body: web::Json<StartRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let control = state.rag.resolve_adapter(&AdapterChoice::Collection, &c);
    let log = state.app.answer_log(&name);
    let body = body.into_inner();
    // Loaded before the experiment starts: a candidate that cannot load starts nothing.
    if state.app.registry.contains(&body.candidate) {
        state
            .generator
            .preload(std::slice::from_ref(&body.candidate))
            .await?;
    }
    let state2 = state.clone();
    let experiment: Experiment = blocking(move || {
        answerlog::experiment::start(
            &log,
            &state2.app.registry,
            control,
            &body.candidate,
            body.share,
        )
    })
    .await?;
    Ok(HttpResponse::Created().json(experiment))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopRequest {
    decision: Decision,
}

async fn stop_experiment(
    state: State,
    name: web::Path<String>,
    body: web::Json<StopRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let log = state.app.answer_log(&name);
    let state2 = state.clone();
    let decision = body.decision;
    let experiment = blocking(move || {
        answerlog::experiment::stop(&log, decision, |candidate| {
            c.update_settings(&state2.app.catalog, |s| {
                s.adapter = Some(candidate.to_string())
            })
            .map(|_| ())
        })
    })
    .await?;
    Ok(HttpResponse::Ok().json(experiment))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareRequest {
    question: String,
    #[serde(default)]
    user: Option<String>,
}

/// One side of a blind comparison: the answer without the adapter or arm that wrote it.
#[derive(Debug, Serialize)]
struct Side<'a> {
    label: &'static str,
    answer_id: &'a str,
    answer: &'a str,
    citations: &'a [rag::Citation],
    sources: &'a [rag::Source],
    timings_ms: &'a rag::Timings,
}

/// Answer `question` with both arms of the running experiment, in an order drawn here, and
/// record the comparison (see `answerlog::compare`).
async fn compare(
    state: State,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<CompareRequest>,
) -> Result<HttpResponse, ApiError> {
    let c = state.app.collection(&name).await?;
    let body = body.into_inner();
    if body.question.trim().is_empty() {
        return Err(ApiError::bad_request("`question` is empty"));
    }
    let log = state.app.answer_log(&name);
    if !log.enabled() {
        return Err(LogError::Conflict(
            "the answer log is off (answers.enabled = false): no comparisons".into(),
        )
        .into());
    }
    let experiment = {
        let log = log.clone();
        blocking(move || log.running_experiment()).await?
    }
    .ok_or_else(|| {
        ApiError::from(LogError::Conflict(
            "a blind comparison answers with both arms of a running experiment: start one first"
                .into(),
        ))
    })?;
    let who = Who {
        key_id: caller.0.key_id.clone(),
        user: body.user,
    };
    let comparison = uuid::Uuid::new_v4().simple().to_string();
    let order = if uuid::Uuid::new_v4().as_bytes()[0] & 1 == 0 {
        [Arm::Control, Arm::Candidate]
    } else {
        [Arm::Candidate, Arm::Control]
    };
    let side = |arm: Arm| {
        let (state, c, log, who) = (&state, &c, log.clone(), who.clone());
        let (question, comparison) = (body.question.clone(), comparison.clone());
        let choice = match experiment.adapter_of(arm) {
            Some(a) => AdapterChoice::Named(a.to_string()),
            None => AdapterChoice::Base,
        };
        async move {
            let stream = state.rag.answer_stream(c, &question, &choice).await?;
            let answer = super::api::tracked_answer(state, stream, |_| {}).await?;
            let ticket = Ticket {
                log,
                provenance: Provenance {
                    id: answerlog::new_answer_id(c.name()),
                    question,
                    who,
                    assigned: Some((experiment.id, arm)),
                    comparison: Some(comparison),
                },
            };
            ticket.log(state, &answer).await;
            Ok::<_, ApiError>((ticket.provenance.id, answer))
        }
    };
    let (a, b) = futures::try_join!(side(order[0]), side(order[1]))?;
    {
        let (log, id, who, ids) = (log, comparison.clone(), who, (a.0.clone(), b.0.clone()));
        blocking(move || log.record_comparison(&id, experiment.id, &who, &ids.0, &ids.1)).await?;
    }
    fn view<'a>(label: &'static str, (id, answer): &'a (String, Answer)) -> Side<'a> {
        Side {
            label,
            answer_id: id,
            answer: &answer.answer,
            citations: &answer.citations,
            sources: &answer.sources,
            timings_ms: &answer.timings_ms,
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "comparison_id": comparison,
        "answers": [view("A", &a), view("B", &b)],
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferRequest {
    preferred: answerlog::compare::Preference,
}

async fn prefer(
    state: State,
    path: web::Path<(String, String)>,
    body: web::Json<PreferRequest>,
) -> Result<HttpResponse, ApiError> {
    let (name, id) = path.into_inner();
    state.app.collection(&name).await?;
    let log = state.app.answer_log(&name);
    let preferred = body.preferred;
    blocking(move || log.prefer(&id, preferred)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Answer-log and experiment routes (under `/api`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/answers/{id}/feedback", web::post().to(feedback))
        .route("/collections/{name}/answers", web::get().to(list_answers))
        .route(
            "/collections/{name}/answers/export",
            web::get().to(export_answers),
        )
        .route(
            "/collections/{name}/experiment",
            web::get().to(experiment_status),
        )
        .route(
            "/collections/{name}/experiment",
            web::post().to(start_experiment),
        )
        .route(
            "/collections/{name}/experiment/stop",
            web::post().to(stop_experiment),
        )
        .route("/collections/{name}/compare", web::post().to(compare))
        .route("/collections/{name}/compare/{id}", web::post().to(prefer));
}

/// `/metrics` lines of every running experiment: per arm answers, ratings, thumbs-up rate,
/// faithfulness and median latency, labelled by collection, arm and adapter.
pub(crate) async fn experiment_metrics(state: &AppState) -> String {
    let Ok(names) = state.app.catalog.list() else {
        return String::new();
    };
    let mut rows = Vec::new();
    for name in names {
        let log = state.app.answer_log(&name);
        let figures = blocking(move || {
            let Some(e) = log.running_experiment()? else {
                return Ok(None);
            };
            Ok(Some(answerlog::stats::arm_figures(&e, &log.samples(e.id)?)))
        })
        .await;
        if let Ok(Some(arms)) = figures {
            rows.extend(arms.into_iter().map(|(label, f)| (name.clone(), label, f)));
        }
    }
    let mut out = String::new();
    type Value = fn(&answerlog::stats::ArmFigures) -> Option<f64>;
    let series: [(&str, Value); 5] = [
        ("answers", |f| Some(f.answers as f64)),
        ("rated", |f| Some(f.rated as f64)),
        ("thumbs_up_rate", |f| f.thumbs_up_rate),
        ("faithfulness", |f| f.faithfulness),
        ("latency_ms_median", |f| Some(f.latency_ms)),
    ];
    for (metric, value) in series {
        out.push_str(&format!("# TYPE domainrag_experiment_{metric} gauge\n"));
        for (collection, label, f) in &rows {
            if let Some(v) = value(f) {
                out.push_str(&format!(
                    "domainrag_experiment_{metric}{{collection=\"{collection}\",arm=\"{}\",adapter=\"{label}\"}} {v}\n",
                    f.arm.as_str()
                ));
            }
        }
    }
    out
}
