//! `domainrag collection ...` and `domainrag ingest`: creating, listing, showing, changing and
//! deleting collections, the per-collection settings flags (`SettingsArgs`, also used by
//! `eval retrieval` to override fusion for one run), and adding files to a collection.
//!
//! Argument handling and printing only: storage and ingest belong to `crate::collection` and
//! `crate::ingest`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use crate::app::App;
use crate::collection::{Catalog, CollectionSettings};
use crate::config::{Bm25Change, FusionMethod, Settings};
use crate::embed::Embedder;
use crate::eval::QuestionFormat;
use crate::ingest::{Format, Progress};

use super::Bar;

#[derive(Debug, Subcommand)]
pub enum CollectionCmd {
    /// Create a collection (settings default to the config's collection_defaults).
    Create {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List collections with their counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one collection's settings and counts.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a collection's BM25 and fusion settings (chunking is fixed once documents are stored).
    Set {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Delete a collection and everything in it.
    Delete { name: String },
    /// Choose BM25 and fusion settings from questions with known source documents (QA pairs, or
    /// questions drafted from the collection's own documents); applied only when the choice also
    /// holds on a held-out part of the questions.
    Tune(TuneArgs),
}

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// The collection to tune.
    #[arg(long, short)]
    pub collection: String,
    /// QA pairs naming their gold documents (SQuAD JSON, or JSONL with `gold_doc_ids`).
    #[arg(long, requires = "format", conflicts_with = "synthetic")]
    pub questions: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub format: Option<QuestionFormat>,
    /// Draft this many questions from the collection's own documents instead.
    #[arg(long, required_unless_present = "questions")]
    pub synthetic: Option<usize>,
    /// Share of the questions held out to check the choice.
    #[arg(long, default_value_t = 0.5)]
    pub holdout: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Report what would change without saving it.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Default)]
pub struct SettingsArgs {
    /// Words per chunk.
    #[arg(long)]
    pub max_words: Option<usize>,
    /// Words repeated between consecutive chunks.
    #[arg(long)]
    pub overlap_words: Option<usize>,
    /// rrf or weighted.
    #[arg(long, value_parser = parse_fusion)]
    pub fusion: Option<FusionMethod>,
    #[arg(long)]
    pub rrf_k: Option<f32>,
    #[arg(long)]
    pub bm25_weight: Option<f32>,
    #[arg(long)]
    pub dense_weight: Option<f32>,
    /// Candidates fetched from each retriever before fusion.
    #[arg(long)]
    pub candidates: Option<usize>,
    /// Weight of a title match against a text match in BM25 (0: titles not searched).
    #[arg(long)]
    pub title_weight: Option<f32>,
    /// Weight of a match in a chunk's window (with its neighbours) against one in its own text
    /// in BM25 (0: windows not searched).
    #[arg(long)]
    pub window_weight: Option<f32>,
    /// Weight of two adjacent query words found side by side in a chunk's text against one word
    /// found there in BM25 (0: pairs not searched).
    #[arg(long)]
    pub pair_weight: Option<f32>,
    /// BM25's term-frequency saturation (0 to 5; 0: a word said again adds nothing).
    #[arg(long)]
    pub k1: Option<f32>,
    /// BM25's length normalisation (0: none, 1: full).
    #[arg(long)]
    pub b: Option<f32>,
    /// The LoRA adapter answering for the collection.
    #[arg(long, conflicts_with = "no_adapter")]
    pub adapter: Option<String>,
    /// Answer with the base model.
    #[arg(long)]
    pub no_adapter: bool,
}

fn parse_fusion(s: &str) -> Result<FusionMethod, String> {
    match s {
        "rrf" => Ok(FusionMethod::Rrf),
        "weighted" => Ok(FusionMethod::Weighted),
        other => Err(format!(
            "unknown fusion method {other:?}: use rrf or weighted"
        )),
    }
}

impl SettingsArgs {
    pub(super) fn apply(&self, s: &mut CollectionSettings) {
        if let Some(v) = self.max_words {
            s.chunking.max_words = v;
        }
        if let Some(v) = self.overlap_words {
            s.chunking.overlap_words = v;
        }
        if let Some(v) = self.fusion {
            s.fusion.method = v;
        }
        if let Some(v) = self.rrf_k {
            s.fusion.rrf_k = v;
        }
        if let Some(v) = self.bm25_weight {
            s.fusion.bm25_weight = v;
        }
        if let Some(v) = self.dense_weight {
            s.fusion.dense_weight = v;
        }
        if let Some(v) = self.candidates {
            s.fusion.candidates = v;
        }
        Bm25Change {
            title_weight: self.title_weight,
            window_weight: self.window_weight,
            pair_weight: self.pair_weight,
            k1: self.k1,
            b: self.b,
        }
        .apply(&mut s.bm25);
        if let Some(v) = &self.adapter {
            s.adapter = Some(v.clone());
        }
        if self.no_adapter {
            s.adapter = None;
        }
    }
}

/// `domainrag collection create|list|show|set|delete|tune`.
pub(super) async fn run(app: &App, cmd: CollectionCmd) -> Result<()> {
    let catalog = &app.catalog;
    match cmd {
        CollectionCmd::Tune(args) => tune(catalog, &app.settings, args).await?,
        CollectionCmd::Create { name, settings } => {
            app.create_collection(&name, |s| settings.apply(s)).await?;
            println!("created collection {name}");
        }
        CollectionCmd::List { json } => {
            let mut rows = Vec::new();
            for name in catalog.list()? {
                let col = catalog.open(&name).await?;
                let stats = col.stats().await?;
                rows.push(serde_json::json!({
                    "name": name,
                    "documents": stats.documents,
                    "chunks": stats.chunks,
                    "adapter": col.settings().adapter,
                    "fusion": col.settings().fusion.method,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no collections (create one with `domainrag collection create NAME`)");
            } else {
                println!(
                    "{:<24} {:>10} {:>10}  fusion",
                    "name", "documents", "chunks"
                );
                for r in rows {
                    println!(
                        "{:<24} {:>10} {:>10}  {}",
                        r["name"].as_str().unwrap_or_default(),
                        r["documents"],
                        r["chunks"],
                        r["fusion"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        CollectionCmd::Show { name, json } => {
            let col = catalog.open(&name).await?;
            let stats = col.stats().await?;
            // Through text, so that an f32 setting reads as written (k1 1.2, not the f64
            // 1.2000000476837158 a direct conversion gives).
            let settings: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&col.settings())?)?;
            let value = serde_json::json!({ "settings": settings, "stats": stats });
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                // TOML has no null: unset settings (e.g. no adapter) are left out.
                println!("{}", toml::to_string_pretty(&without_nulls(value))?);
            }
        }
        CollectionCmd::Set { name, settings } => {
            let (_, s) = app.update_collection(&name, |s| settings.apply(s)).await?;
            println!(
                "updated collection {name}: {}, adapter {}",
                s.search(),
                s.adapter.as_deref().unwrap_or("(none)")
            );
        }
        CollectionCmd::Delete { name } => {
            app.delete_collection(&name).await?;
            println!("deleted collection {name}");
        }
    }
    Ok(())
}

/// `domainrag collection tune`.
async fn tune(catalog: &Catalog, settings: &Settings, args: TuneArgs) -> Result<()> {
    let col = catalog.open(&args.collection).await?;
    let questions = match (&args.questions, args.format, args.synthetic) {
        (Some(path), Some(format), _) => crate::eval::load_questions(path, format)?,
        (_, _, Some(n)) => crate::train::synth::retrieval_questions(&col, n, args.seed).await?,
        _ => bail!("give --questions FILE --format F, or --synthetic N"),
    };
    let embedder = Embedder::load_async(settings).await?;
    let bar = Bar::new(!args.json);
    bar.start(questions.len() as u64);
    let request = crate::tune::TuneRequest {
        questions,
        holdout: args.holdout,
        seed: args.seed,
        apply: !args.dry_run,
    };
    let report = crate::tune::tune(catalog, &col, &embedder, request, &|n| {
        bar.advance(n as u64, "")
    })
    .await?;
    bar.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::tune::table(&report));
    }
    Ok(())
}

/// `domainrag ingest`: add files or directories to a collection.
pub(super) async fn ingest(
    app: &App,
    collection: String,
    format: Format,
    no_progress: bool,
    json: bool,
    paths: Vec<PathBuf>,
) -> Result<()> {
    app.collection(&collection).await?;
    let embedder = Embedder::load_async(&app.settings).await?;
    let bar = Bar::new(!no_progress);
    let report = app
        .ingest(&collection, &paths, format, embedder, &bar)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.failures {
            eprintln!("error: {}: {}", f.source, f.error);
        }
        println!(
            "ingested {} files into {collection}: {} documents written, {} unchanged, {} chunks, \
             {} failures, {} files skipped (unsupported type), {:.1} s ({:.0} chunks/s)",
            report.files,
            report.documents,
            report.unchanged,
            report.chunks,
            report.failures_total,
            report.skipped_files,
            report.seconds,
            report.chunks_per_second()
        );
    }
    Ok(())
}

/// `value` with every null object field removed, recursively.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(without_nulls).collect())
        }
        other => other,
    }
}
