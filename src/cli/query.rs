//! `domainrag search`, `domainrag ask` and `domainrag serve`: querying a collection from the
//! terminal (ranked chunks, or a streamed answer with its cited sources) and running the HTTP
//! appliance.
//!
//! Printing only: retrieval and answering belong to `crate::retrieve` and `crate::rag`, the server
//! to `crate::http`.

use anyhow::Result;

use crate::access::Principal;
use crate::app::App;
use crate::collection::Catalog;
use crate::config::Settings;
use crate::embed::Embedder;
use crate::rag::{self, AdapterChoice};
use crate::retrieve::{Mode, Retriever};

use super::load_rag;

/// `domainrag search`: the top `k` chunks, with their BM25 and dense scores.
pub(super) async fn search(
    catalog: &Catalog,
    settings: &Settings,
    collection: String,
    mode: Mode,
    k: usize,
    json: bool,
    query: String,
) -> Result<()> {
    let embedder = Embedder::load_async(settings).await?;
    let col = catalog.open(&collection).await?;
    let hits = Retriever::new(embedder)
        .search(&col, &query, mode, k)
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "results": hits }))?
        );
    } else if hits.is_empty() {
        println!("no results");
    } else {
        for (i, h) in hits.iter().enumerate() {
            let fmt = |s: Option<f32>| s.map_or("-".to_string(), |v| format!("{v:.3}"));
            println!(
                "{}. {} (score {:.4}, bm25 {}, dense {})\n   {}\n   {}\n",
                i + 1,
                h.title,
                h.score,
                fmt(h.bm25_score),
                fmt(h.dense_score),
                h.source,
                preview(&h.text, 220)
            );
        }
    }
    Ok(())
}

/// `domainrag serve`: the HTTP API, OpenAI-compatible chat and web UI, until SIGTERM/SIGINT.
pub(super) async fn serve(settings: Settings, bind: Option<String>) -> Result<()> {
    let bind = bind.unwrap_or_else(|| settings.server.bind.clone());
    crate::http::listen_addrs(&settings, &bind)?;
    let keys = crate::access::keys::KeyStore::new(&settings.paths.data_dir);
    if settings.server.auth && !keys.has_active()? {
        eprintln!(
            "no API keys yet: every request but /healthz will be refused. Make one with \
             `domainrag keys create --admin` (and `--role reader --collection NAME` for teams)"
        );
    }
    let state = crate::http::AppState::load(settings).await?;
    let server = crate::http::start(state, &bind).await?;
    eprintln!("domainrag serving on http://{}", server.addr);
    // actix stops on SIGTERM/SIGINT: no new connections, in-flight requests get
    // server.shutdown_timeout_secs, then collections are flushed.
    server.wait().await?;
    Ok(())
}

/// `domainrag ask`: stream an answer to stdout, then list the sources it cited.
pub(super) async fn ask(
    app: &App,
    collection: String,
    adapter: Option<String>,
    no_adapter: bool,
    json: bool,
    question: String,
) -> Result<()> {
    let choice = match (adapter, no_adapter) {
        (Some(name), _) => AdapterChoice::Named(name),
        (None, true) => AdapterChoice::Base,
        (None, false) => AdapterChoice::Collection,
    };
    // The operator at the command line may name any registered adapter.
    app.check_choice(&Principal::local(), &choice, None)?;
    let col = app.collection(&collection).await?;
    let (_, rag) = load_rag(&app.settings).await?;
    let stream = rag.answer_stream(&col, &question, &choice).await?;
    let answer = if json {
        rag::collect(stream, |_| {}).await?
    } else {
        use std::io::Write;
        let answer = rag::collect(stream, |t| {
            print!("{t}");
            let _ = std::io::stdout().flush();
        })
        .await?;
        println!();
        answer
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        if answer.citations.is_empty() {
            println!("\n(no sources cited)");
        } else {
            println!();
        }
        for c in &answer.citations {
            println!("[{}] {} ({})", c.n, c.title, c.source);
        }
    }
    Ok(())
}

fn preview(text: &str, max_chars: usize) -> String {
    let mut s: String = text.chars().take(max_chars).collect();
    if text.chars().count() > max_chars {
        s.push('…');
    }
    s.replace('\n', " ")
}
