//! The OpenAI-compatible `/v1` routes: `model` names a collection (`collection` uses its adapter,
//! `collection:adapter` a given adapter, `collection:base` the base model). The last user message
//! is the question; earlier turns condition it. Responses have the usual OpenAI shapes plus
//! `citations`.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::api::{tokio_stream_from, tracked_answer, while_client_listens};
use super::guard::Caller;
use super::{ApiError, AppState};
use crate::access::Action;
use crate::answerlog::Who;
use crate::collection::now_secs;
use crate::generate::{ChatMessage, Role};
use crate::rag::AdapterChoice;

type State = web::Data<AppState>;

async fn models(state: State, caller: Caller) -> Result<HttpResponse, ApiError> {
    let created = now_secs();
    let mut data = Vec::new();
    let adapters = state
        .app
        .adapters_for(&caller.0, state.rag.house_adapter())?;
    for name in state.app.catalog.list()? {
        if !caller.0.can_see(&name) {
            continue;
        }
        data.push(serde_json::json!({"id": name, "object": "model", "created": created, "owned_by": "domainrag"}));
        data.push(serde_json::json!({"id": format!("{name}:base"), "object": "model", "created": created, "owned_by": "domainrag"}));
        for a in &adapters {
            data.push(serde_json::json!({
                "id": format!("{name}:{}", a.name), "object": "model", "created": created, "owned_by": "domainrag"
            }));
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// Unknown OpenAI parameters are accepted and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    /// The end user (OpenAI's field): hashed in the answer log, experiments assign arms by it.
    #[serde(default)]
    user: Option<String>,
}

fn text_of(content: &Option<serde_json::Value>) -> String {
    match content {
        Some(serde_json::Value::String(s)) => s.clone(),
        // The array form: [{"type": "text", "text": "..."}].
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

async fn chat_completions(
    state: State,
    caller: Caller,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let (collection, choice) = match body.model.split_once(':') {
        None => (body.model.as_str(), AdapterChoice::Collection),
        Some((c, "base")) => (c, AdapterChoice::Base),
        Some((c, a)) => (c, AdapterChoice::Named(a.to_string())),
    };
    caller.0.require(Action::Read, Some(collection))?;
    state
        .app
        .check_choice(&caller.0, &choice, state.rag.house_adapter())?;
    let c = state.app.collection(collection).await?;
    let mut history = Vec::new();
    for m in &body.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unsupported message role {other:?}"
                )));
            }
        };
        history.push(ChatMessage {
            role,
            content: text_of(&m.content),
        });
    }
    let last_user = history
        .iter()
        .rposition(|m| m.role == Role::User)
        .ok_or_else(|| ApiError::bad_request("`messages` has no user message"))?;
    let question = history.remove(last_user).content;
    history.truncate(last_user);
    if question.trim().is_empty() {
        return Err(ApiError::bad_request("the last user message is empty"));
    }
    let who = Who {
        key_id: caller.0.key_id.clone(),
        user: body.user.clone(),
    };
    let (stream, ticket) = state
        .begin_answer(&c, who, &history, &question, choice)
        .await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let answer_id = ticket.id().map(str::to_string);
    let created = now_secs();
    let model = body.model.clone();
    if !body.stream {
        let answer = tracked_answer(&state, stream, |_| {}).await?;
        ticket.log(&state, &answer).await;
        return Ok(HttpResponse::Ok().json(serde_json::json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "answer_id": answer_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
            "citations": answer.citations,
        })));
    }
    // Unbounded: at most `generate.max_tokens` chunks per answer, and none may be dropped.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<web::Bytes, std::io::Error>>();
    let state2 = Arc::clone(&state.into_inner());
    tokio::spawn(async move {
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            let v = serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "answer_id": answer_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            web::Bytes::from(format!("data: {v}\n\n"))
        };
        let _ = tx.send(Ok(chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        )));
        let tx_tokens = tx.clone();
        let answer = tracked_answer(&state2, stream, |t| {
            let _ = tx_tokens.send(Ok(chunk(serde_json::json!({ "content": t }), None)));
        });
        let Some(result) = while_client_listens(&tx, answer).await else {
            return;
        };
        match result {
            Ok(answer) => {
                ticket.log(&state2, &answer).await;
                let v = serde_json::json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "answer_id": answer_id,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                              "total_tokens": answer.prompt_tokens + answer.completion_tokens},
                    "citations": answer.citations,
                });
                let _ = tx.send(Ok(web::Bytes::from(format!("data: {v}\n\n"))));
            }
            Err(e) => {
                let e = ApiError::from(e);
                let v = serde_json::json!({"error": {"code": e.code, "message": e.message}});
                let _ = tx.send(Ok(web::Bytes::from(format!("data: {v}\n\n"))));
            }
        }
        let _ = tx.send(Ok(web::Bytes::from_static(b"data: [DONE]\n\n")));
    });
    Ok(HttpResponse::build(StatusCode::OK)
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(tokio_stream_from(rx)))
}

/// `/v1` routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .route("/models", web::get().to(models))
            .route("/chat/completions", web::post().to(chat_completions)),
    );
}
