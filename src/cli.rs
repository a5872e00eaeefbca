//! The command line: argument definitions and one function per command, printing tables for people
//! and `--json` for programs (stdout), logs and progress to stderr.
//!
//! The edge of the program: it may use `anyhow`; everything below it returns typed errors.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::adapters::{AdapterRegistry, BaseModelInfo};
use crate::bench;
use crate::collection::{Catalog, CollectionSettings};
use crate::config::{FusionMethod, Settings, Sources};
use crate::embed::Embedder;
use crate::eval::ContextMode;
use crate::eval::{self, QuestionFormat};
use crate::generate::{Generator, Sampling};
use crate::ingest::{Format, Ingestor, Progress};
use crate::rag::{self, AdapterChoice, Rag};
use crate::retrieve::{Mode, Retriever};

#[derive(Debug, Parser)]
#[command(
    name = "domainrag",
    version,
    about = "On-prem RAG: collections, hybrid search, evaluation"
)]
pub struct Cli {
    /// Extra config file (TOML), applied after config/default.toml and config/$DOMAINRAG_ENV.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where collections live (default `data/`).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where model files live (default `data/models/`).
    #[arg(long, global = true, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, show, change or delete collections.
    #[command(subcommand)]
    Collection(CollectionCmd),
    /// Add files or directories to a collection (txt, md, html, pdf, jsonl; SQuAD with --format squad).
    Ingest {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum, default_value = "auto")]
        format: Format,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Search a collection.
    Search {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum, default_value = "hybrid")]
        mode: Mode,
        #[arg(long, short, default_value_t = 5)]
        k: usize,
        #[arg(long)]
        json: bool,
        query: String,
    },
    /// Run the appliance: HTTP API, OpenAI-compatible chat, web UI.
    Serve {
        /// Address to listen on (default: server.bind from config).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Answer a question from a collection with the local LLM (streams, then lists cited sources).
    Ask {
        #[arg(long, short)]
        collection: String,
        /// Answer with this adapter instead of the collection's.
        #[arg(long, conflicts_with = "no_adapter")]
        adapter: Option<String>,
        /// Answer with the base model.
        #[arg(long)]
        no_adapter: bool,
        #[arg(long)]
        json: bool,
        question: String,
    },
    /// Manage LoRA adapters (PEFT format).
    #[command(subcommand)]
    Adapters(AdaptersCmd),
    /// Evaluate retrieval quality.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Measure speed (writes JSON and prints a table).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Training data: (query, context, answer) triplets.
    #[command(subcommand)]
    Triplets(TripletsCmd),
    /// Train a LoRA adapter for the base model from triplets and register it.
    Train(TrainArgs),
}

#[derive(Debug, Subcommand)]
pub enum TripletsCmd {
    /// Turn question/answer pairs into triplets whose context is what serving would retrieve
    /// (same retriever, source numbering and token budget as `ask`).
    Build {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: QuestionFormat,
        /// Questions with gold answers (`{"query", "gold_doc_ids", "answers"}` JSONL, or SQuAD).
        #[arg(long)]
        questions: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `retrieved` (serving's sources) or `gold` (the SQuAD paragraph as source [1]).
        #[arg(long, value_enum, default_value = "retrieved")]
        context: ContextMode,
        /// Use a random sample of N questions (fixed --seed).
        #[arg(long)]
        sample: Option<usize>,
        /// Put each question's retrieved sources in a random order (fixed --seed) and number them
        /// in that order, so the source holding the answer is not almost always [1] (retrieval
        /// ranks it first for most questions) and the adapter learns to cite where the answer is.
        #[arg(long)]
        shuffle_sources: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// `domainrag train` (defaults: see `TrainOptions::default`).
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The collection the adapter is for (recorded; `--assign` sets it as its adapter).
    #[arg(long, short)]
    pub collection: String,
    /// Triplets JSONL (`{"query", "context", "answer"}`, from `triplets build`).
    #[arg(long)]
    pub triplets: PathBuf,
    /// Adapter name (must be new unless --replace).
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub replace: bool,
    /// Make it the collection's adapter once trained.
    #[arg(long)]
    pub assign: bool,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Sequences per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Longest sequence in tokens (prompt + answer); longer examples are dropped. The default
    /// fits the serving prompt: system line + rag.context_tokens (1200) of sources + question
    /// and answer.
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Sequences of a batch trained at once, each on its own thread (default: one per core;
    /// only matters with --batch > 1).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Train on the GPU (builds with `--features cuda`).
    #[arg(long)]
    pub gpu: bool,
    #[arg(long)]
    pub no_progress: bool,
}

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
    /// Change a collection's fusion settings (chunking is fixed once documents are stored).
    Set {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Delete a collection and everything in it.
    Delete { name: String },
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
    fn apply(&self, s: &mut CollectionSettings) {
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
        if let Some(v) = &self.adapter {
            s.adapter = Some(v.clone());
        }
        if self.no_adapter {
            s.adapter = None;
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AdaptersCmd {
    /// Validate and copy a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors).
    Add { name: String, dir: PathBuf },
    /// List adapters: name, base model, rank, alpha, targets, size, created.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one adapter, with its training record when domainrag trained it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an adapter (refused while a collection uses it).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum EvalCmd {
    /// Answer quality per arm (base model and adapters): EM, F1, faithfulness, relevance,
    /// hallucination and abstention rates, cost, bootstrap 95% intervals.
    Answers {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: QuestionFormat,
        #[arg(long)]
        questions: PathBuf,
        /// An arm: an adapter name, or `none` for the base model. Repeat; default `none`.
        #[arg(long = "adapter")]
        adapters: Vec<String>,
        /// Evaluate a random sample of N questions (fixed --seed).
        #[arg(long)]
        sample: Option<usize>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Evaluate only the first N questions (after sampling).
        #[arg(long)]
        limit: Option<usize>,
        /// Write the full JSON report here.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write a self-contained HTML report here.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// `retrieved` (the full pipeline) or `gold` (SQuAD only: the question's own paragraph
        /// as the only source).
        #[arg(long, value_enum, default_value = "retrieved")]
        context: ContextMode,
    },
    /// recall@1/5/10, MRR@10, nDCG@10 for bm25, dense and hybrid side by side.
    Retrieval {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum)]
        format: QuestionFormat,
        #[arg(long)]
        questions: PathBuf,
        /// Evaluate only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Override the collection's fusion for this run (to compare settings).
        #[command(flatten)]
        fusion: SettingsArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Search latency per mode, with and without query embedding.
    Search {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum)]
        format: QuestionFormat,
        #[arg(long)]
        questions: PathBuf,
        /// Number of queries per mode.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, short, default_value_t = 10)]
        k: usize,
        /// Write the JSON here (it is also printed with --json).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// LLM speed: load time, TTFT and decode tokens/s (base vs adapter), adapter switch latency,
    /// memory with 1/2/4 adapters resident, throughput with 1/4/8 concurrent requests.
    Generate {
        /// Completion tokens per request.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Generation speed of mistral.rs configurations (isq types, with and without a LoRA
    /// adapter) side by side with llama.cpp on the same GGUF model, prompts and threads.
    Engines {
        /// `generate.isq` values to compare (`none` = unquantised).
        #[arg(long, value_delimiter = ',', default_value = "none,q8_0,q4k")]
        isq: Vec<String>,
        /// Skip the runs with a LoRA adapter (a synthetic rank-8 adapter on q/k/v/o).
        #[arg(long)]
        no_adapter: bool,
        /// Also run this GGUF through mistral.rs's GGUF loader (base only).
        #[arg(long)]
        mistralrs_gguf: Option<PathBuf>,
        /// Python with llama-cpp-python (made by benches/llama-cpp-venv.sh); omit to skip the peer.
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// The GGUF llama.cpp loads.
        #[arg(
            long,
            default_value = "data/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        )]
        peer_gguf: PathBuf,
        /// SQuAD JSON the RAG-sized prompts are built from.
        #[arg(long, default_value = "data/squad/squaddev_v1.1.json")]
        squad: PathBuf,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Ingest throughput: ingest into a fresh throwaway collection and report chunks/s.
    Ingest {
        #[arg(long, value_enum, default_value = "auto")]
        format: Format,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Load settings from the global flags.
pub fn settings(cli: &Cli) -> Result<Settings> {
    Ok(Settings::load(&Sources::from_process(
        cli.config.clone(),
        cli.data_dir.clone(),
        cli.models_dir.clone(),
    ))?)
}

/// Run a parsed command.
pub async fn run(cli: Cli, settings: Settings) -> Result<()> {
    let catalog = Catalog::new(&settings);
    match cli.command {
        Command::Collection(cmd) => collection(&catalog, cmd).await,
        Command::Ingest {
            collection,
            format,
            no_progress,
            json,
            paths,
        } => {
            let embedder = Embedder::load_async(&settings).await?;
            let col = catalog.open(&collection).await?;
            let ingestor = Ingestor::new(col, embedder, settings.ingest.batch_docs);
            let bar = Bar::new(!no_progress);
            let report = ingestor.ingest_paths(&paths, format, &bar).await?;
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
                    report.failures.len(),
                    report.skipped_files,
                    report.seconds,
                    report.chunks_per_second()
                );
            }
            Ok(())
        }
        Command::Search {
            collection,
            mode,
            k,
            json,
            query,
        } => {
            let embedder = Embedder::load_async(&settings).await?;
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
        Command::Serve { bind } => {
            let bind = bind.unwrap_or_else(|| settings.server.bind.clone());
            let state = crate::http::AppState::load(settings).await?;
            let server = crate::http::start(state, &bind).await?;
            eprintln!("domainrag serving on http://{}", server.addr);
            // actix stops on SIGTERM/SIGINT: no new connections, in-flight requests get
            // server.shutdown_timeout_secs, then collections are flushed.
            server.wait().await?;
            Ok(())
        }
        Command::Ask {
            collection,
            adapter,
            no_adapter,
            json,
            question,
        } => {
            let choice = match (adapter, no_adapter) {
                (Some(name), _) => AdapterChoice::Named(name),
                (None, true) => AdapterChoice::Base,
                (None, false) => AdapterChoice::Collection,
            };
            let col = catalog.open(&collection).await?;
            let (_, rag) = load_rag(&settings).await?;
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
        Command::Adapters(cmd) => adapters(&catalog, &settings, cmd),
        Command::Eval(EvalCmd::Answers {
            collection,
            format,
            questions,
            adapters,
            sample,
            seed,
            limit,
            json,
            html,
            context,
        }) => {
            let mut qs = eval::load_questions(&questions, format)?;
            let gold = gold_paragraphs(context, format, &questions)?;
            if let Some(n) = sample {
                qs = sample_questions(qs, n, seed);
            }
            if let Some(limit) = limit {
                qs.truncate(limit);
            }
            let arms: Vec<Option<String>> = if adapters.is_empty() {
                vec![None]
            } else {
                adapters
                    .into_iter()
                    .map(|a| if a == "none" { None } else { Some(a) })
                    .collect()
            };
            let registry = AdapterRegistry::new(&settings.paths.data_dir);
            for a in arms.iter().flatten() {
                registry.get(a)?;
            }
            let col = catalog.open(&collection).await?;
            let (embedder, rag) = load_rag(&settings).await?;
            let bar = Bar::new(true);
            bar.start((qs.len() * arms.len()) as u64);
            let report =
                eval::answers::evaluate(&rag, &embedder, &col, &qs, &arms, gold.as_ref(), &|n| {
                    bar.advance(n as u64, "")
                })
                .await?;
            bar.finish();
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = html {
                std::fs::write(&path, eval::answers::html(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            print!("{}", eval::answers::table(&report));
            Ok(())
        }
        Command::Eval(EvalCmd::Retrieval {
            collection,
            format,
            questions,
            limit,
            fusion,
            json,
        }) => {
            let mut qs = eval::load_questions(&questions, format)?;
            if let Some(limit) = limit {
                qs.truncate(limit);
            }
            let embedder = Embedder::load_async(&settings).await?;
            let col = catalog.open(&collection).await?;
            let mut settings_for_run = col.settings();
            fusion.apply(&mut settings_for_run);
            settings_for_run.validate()?;
            let bar = Bar::new(!json);
            bar.start((qs.len() * Mode::ALL.len()) as u64);
            let report = eval::evaluate(
                &col,
                &embedder,
                &qs,
                &Mode::ALL,
                &settings_for_run.fusion,
                &|n| bar.advance(n as u64, ""),
            )
            .await?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} questions, collection {collection}, fusion {:?}\n\
                     | mode | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 |\n|---|---|---|---|---|---|",
                    report.questions, settings_for_run.fusion
                );
                for (mode, m) in &report.modes {
                    println!(
                        "| {mode} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                        m.recall_1, m.recall_5, m.recall_10, m.mrr_10, m.ndcg_10
                    );
                }
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Search {
            collection,
            format,
            questions,
            n,
            k,
            out,
            json,
        }) => {
            let qs = eval::load_questions(&questions, format)?;
            let embedder = Embedder::load_async(&settings).await?;
            let col = catalog.open(&collection).await?;
            let result = bench::search_latency(&col, &embedder, &qs, n, k).await?;
            emit_bench(&result, &bench::search_table(&result), out, json)
        }
        Command::Bench(BenchCmd::Generate {
            max_tokens,
            out,
            json,
        }) => {
            let mut bench_settings = settings.clone();
            bench_settings.generate.max_resident_adapters = 4;
            bench_settings.generate.max_concurrent = 8;
            let names = synthetic_adapters(&settings, 4)?;
            let result = bench::generate_speed(&bench_settings, &names, max_tokens).await?;
            emit_bench(&result, &bench::generate_table(&result), out, json)
        }
        Command::Triplets(TripletsCmd::Build {
            collection,
            format,
            questions,
            out,
            context,
            sample,
            shuffle_sources,
            seed,
        }) => {
            let mut qs = eval::load_questions(&questions, format)?;
            if let Some(n) = sample {
                qs = sample_questions(qs, n, seed);
            }
            let gold = gold_paragraphs(context, format, &questions)?;
            let col = catalog.open(&collection).await?;
            let (_, rag) = load_rag(&settings).await?;
            let bar = Bar::new(true);
            bar.start(qs.len() as u64);
            let shuffle = shuffle_sources.then_some(seed);
            let (triplets, report) = crate::train::triplets::build(
                &rag,
                &col,
                &qs,
                context,
                gold.as_ref(),
                shuffle,
                &|n| bar.advance(n as u64, ""),
            )
            .await?;
            bar.finish();
            let mut text = String::new();
            for t in &triplets {
                text.push_str(&serde_json::to_string(t)?);
                text.push('\n');
            }
            std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("{}", serde_json::to_string_pretty(&report)?);
            println!("wrote {} triplets to {}", triplets.len(), out.display());
            Ok(())
        }
        Command::Train(args) => train_command(&catalog, &settings, args).await,
        Command::Bench(BenchCmd::Engines {
            isq,
            no_adapter,
            mistralrs_gguf,
            peer_python,
            peer_gguf,
            squad,
            reps,
            max_tokens,
            out,
            json,
        }) => {
            for value in &isq {
                if value != "none" && !crate::config::ISQ_TYPES.contains(&value.as_str()) {
                    bail!(
                        "--isq {value}: must be none or one of {}",
                        crate::config::ISQ_TYPES.join(", ")
                    );
                }
            }
            let adapter = if no_adapter {
                None
            } else {
                synthetic_adapters(&settings, 1)?.pop()
            };
            let threads = if settings.generate.threads > 0 {
                settings.generate.threads
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            };
            let plan = bench::engines::EnginesPlan {
                isq,
                adapter,
                mistralrs_gguf,
                peer: peer_python.map(|p| (p, peer_gguf)),
                reps,
                max_tokens,
                threads,
            };
            let result = bench::engines::run(&settings, &squad, &plan).await?;
            emit_bench(&result, &bench::engines::table(&result), out, json)
        }
        Command::Bench(BenchCmd::Ingest {
            format,
            out,
            json,
            paths,
        }) => {
            let scratch =
                std::env::temp_dir().join(format!("domainrag-bench-{}", std::process::id()));
            let mut bench_settings = settings.clone();
            bench_settings.paths.data_dir = scratch.clone();
            let scratch_catalog = Catalog::new(&bench_settings);
            let name = "bench-ingest";
            scratch_catalog
                .create(scratch_catalog.default_settings(name))
                .await?;
            let report = {
                // The ingestor (and the store it holds) must be gone before its files are removed:
                // dropping the embedded store flushes it.
                let embedder = Embedder::load_async(&bench_settings).await?;
                let col = scratch_catalog.open(name).await?;
                let ingestor = Ingestor::new(col, embedder, bench_settings.ingest.batch_docs);
                let bar = Bar::new(!json);
                ingestor.ingest_paths(&paths, format, &bar).await
            };
            let cleanup = std::fs::remove_dir_all(&scratch);
            let report = report?;
            cleanup.with_context(|| format!("removing {}", scratch.display()))?;
            let result = serde_json::json!({
                "files": report.files,
                "documents": report.documents,
                "chunks": report.chunks,
                "failures": report.failures.len(),
                "seconds": report.seconds,
                "chunks_per_second": report.chunks_per_second(),
                "vector_backend": settings.vectors.backend,
            });
            let table = format!(
                "| files | documents | chunks | seconds | chunks/s |\n|---|---|---|---|---|\n| {} | {} | {} | {:.1} | {:.1} |\n",
                report.files,
                report.documents,
                report.chunks,
                report.seconds,
                report.chunks_per_second()
            );
            emit_bench(&result, &table, out, json)
        }
    }
}

/// A reproducible random sample of `n` questions (Fisher-Yates with a fixed-seed xorshift).
fn sample_questions(mut qs: Vec<eval::Question>, n: usize, seed: u64) -> Vec<eval::Question> {
    let mut state = seed | 1;
    for i in (1..qs.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        qs.swap(i, (state % (i as u64 + 1)) as usize);
    }
    qs.truncate(n);
    qs
}

/// Print a benchmark as JSON (`--json`) or its table, and write the JSON to `out` if given.
/// The embedder and the answering pipeline (base model loaded) as configured.
async fn load_rag(settings: &Settings) -> Result<(Arc<Embedder>, Rag)> {
    let embedder = Embedder::load_async(settings).await?;
    let generator = Generator::load(settings).await?;
    let rag = Rag::new(
        Retriever::new(Arc::clone(&embedder)),
        generator,
        settings.rag.clone(),
        Sampling::from_config(&settings.generate),
    );
    Ok((embedder, rag))
}

/// SQuAD paragraphs by document id, when the context is the gold one.
fn gold_paragraphs(
    context: ContextMode,
    format: QuestionFormat,
    questions: &std::path::Path,
) -> Result<Option<std::collections::HashMap<String, (String, String)>>> {
    match (context, format) {
        (ContextMode::Retrieved, _) => Ok(None),
        (ContextMode::Gold, QuestionFormat::Squad) => eval::squad_paragraphs(questions)
            .map(Some)
            .map_err(anyhow::Error::msg),
        (ContextMode::Gold, QuestionFormat::Jsonl) => {
            bail!("--context gold needs --format squad (the paragraphs come from the SQuAD file)")
        }
    }
}

/// The training progress bar: step, loss, tokens/s, learning rate.
struct TrainBar(ProgressBar);

impl crate::train::Progress for TrainBar {
    fn start(&mut self, total_steps: usize) {
        self.0.set_length(total_steps as u64);
    }
    fn step(&mut self, step: usize, epoch: usize, loss: f32, tokens_per_s: f64, lr: f64) {
        self.0.set_position(step as u64);
        self.0.set_message(format!(
            "epoch {epoch} loss {loss:.4} {tokens_per_s:.0} tok/s lr {lr:.2e}"
        ));
    }
    fn message(&mut self, text: &str) {
        // A hidden bar (`--no-progress`, logs) drops `println`; the epoch lines still belong in
        // the log.
        if self.0.is_hidden() {
            eprintln!("{text}");
        } else {
            self.0.println(text);
        }
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

async fn train_command(catalog: &Catalog, settings: &Settings, a: TrainArgs) -> Result<()> {
    use crate::train::{TrainJob, TrainOptions, encode, read_triplets, register, train};
    let options = TrainOptions {
        rank: a.rank,
        alpha: a.alpha,
        targets: a.targets.clone(),
        dropout: a.dropout,
        lr: a.lr,
        epochs: a.epochs,
        batch: a.batch,
        max_len: a.max_len,
        val_split: a.val_split,
        seed: a.seed,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        workers: a.workers.unwrap_or_else(|| TrainOptions::default().workers),
    };
    options.validate()?;
    let col = catalog.open(&a.collection).await?;
    let registry = AdapterRegistry::new(&settings.paths.data_dir);
    crate::adapters::check_name(&a.name)?;
    if !a.replace && registry.get(&a.name).is_ok() {
        bail!(
            "adapter {} already exists; choose a new --name or pass --replace",
            a.name
        );
    }
    let base_dir = settings.generate_base_dir();
    let base = BaseModelInfo::from_dir(&base_dir)?;
    let triplets = read_triplets(&a.triplets)?;
    // mistral.rs tokenises, with the base model's own chat template: the exact serving tokens.
    let (examples, encoded) = {
        let generator = Generator::load(settings).await?;
        encode(&generator, &triplets, options.max_len).await?
    };
    if encoded.too_long > 0 {
        eprintln!(
            "dropped {} of {} triplets longer than --max-len {}",
            encoded.too_long,
            triplets.len(),
            options.max_len
        );
    }
    let device = if a.gpu {
        #[cfg(feature = "cuda")]
        {
            candle_core::Device::new_cuda(0)?
        }
        #[cfg(not(feature = "cuda"))]
        bail!("--gpu needs a build with `--features cuda`")
    } else {
        candle_core::Device::Cpu
    };
    let work_dir = settings.paths.data_dir.join("training").join(format!(
        "{}-{}",
        a.name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nCtrl-C: finishing the current step, then keeping the best checkpoint");
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let visible = !a.no_progress;
    let triplets_path = a.triplets.clone();
    let trained = tokio::task::spawn_blocking(move || {
        let bar = if visible {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} eta {eta} {msg}")
                .expect("static template is valid"),
        );
        let mut bar = TrainBar(bar);
        train(TrainJob {
            base_dir,
            triplets_path,
            examples,
            encode: encoded,
            options,
            work_dir,
            device,
            stop,
            progress: &mut bar,
        })
    })
    .await??;
    let info = register(&registry, &a.name, &trained, &base, a.replace)?;
    let r = &trained.record;
    println!(
        "trained adapter {} (rank {}, alpha {}, {}): {} steps, best validation loss {}, {:.0} tokens/s, {:.0} s, peak RSS {:.0} MiB{}",
        info.name,
        info.rank,
        info.alpha,
        info.target_modules.join(","),
        r.steps,
        r.best_val_loss
            .map_or_else(|| "-".to_string(), |v| format!("{v:.4}")),
        r.tokens_per_s,
        r.wall_s,
        r.peak_rss_mib,
        if r.interrupted {
            " (stopped by Ctrl-C)"
        } else {
            ""
        }
    );
    println!(
        "checkpoints: {}",
        trained.dir.parent().unwrap_or(&trained.dir).display()
    );
    if a.assign {
        let name = a.name.clone();
        col.update_settings(catalog, move |s| s.adapter = Some(name))?;
        println!("collection {} now answers with {}", a.collection, a.name);
    }
    Ok(())
}

/// `n` fixed synthetic adapters `bench-lora-1..n` (deterministic weights, rank 8 on q/k/v/o),
/// registered if missing: the speed of a merged adapter model does not depend on what the
/// adapter learned.
fn synthetic_adapters(settings: &Settings, n: usize) -> Result<Vec<String>> {
    let registry = AdapterRegistry::new(&settings.paths.data_dir);
    let base = BaseModelInfo::from_dir(&settings.generate_base_dir())?;
    let mut names = Vec::new();
    for i in 1..=n {
        let name = format!("bench-lora-{i}");
        if registry.get(&name).is_err() {
            let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
            crate::adapters::write_test_adapter(
                &dir,
                &base,
                8,
                16.0,
                &["q_proj", "k_proj", "v_proj", "o_proj"],
                &layers,
                |j| ((j * (7919 + i) % 17) as f32 - 8.0) * 0.01,
            )
            .with_context(|| format!("writing {}", dir.display()))?;
            registry.add(&name, &dir, &base)?;
            std::fs::remove_dir_all(&dir).ok();
        }
        names.push(name);
    }
    Ok(names)
}

fn emit_bench<T: serde::Serialize>(
    result: &T,
    table: &str,
    out: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let text = serde_json::to_string_pretty(result)?;
    if let Some(out) = out {
        std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        print!("{table}");
    }
    Ok(())
}

fn adapters(catalog: &Catalog, settings: &Settings, cmd: AdaptersCmd) -> Result<()> {
    let registry = AdapterRegistry::new(&settings.paths.data_dir);
    match cmd {
        AdaptersCmd::Add { name, dir } => {
            let base = BaseModelInfo::from_dir(&settings.generate_base_dir())?;
            let info = registry.add(&name, &dir, &base)?;
            println!(
                "added adapter {} (rank {}, alpha {}, targets {}) for {}",
                info.name,
                info.rank,
                info.alpha,
                info.target_modules.join(","),
                info.base_model
            );
        }
        AdaptersCmd::List { json } => {
            let list = registry.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no adapters (add one with `domainrag adapters add NAME DIR`)");
            } else {
                println!(
                    "{:<20} {:<28} {:>4} {:>6} {:<40} {:>10} created",
                    "name", "base", "rank", "alpha", "targets", "bytes"
                );
                for a in list {
                    println!(
                        "{:<20} {:<28} {:>4} {:>6} {:<40} {:>10} {}",
                        a.name,
                        a.base_model,
                        a.rank,
                        a.alpha,
                        a.target_modules.join(","),
                        a.size_bytes,
                        a.created_at
                    );
                }
            }
        }
        AdaptersCmd::Show { name, json } => {
            let info = registry.get(&name)?;
            let training = registry.training_record(&name)?;
            let value = serde_json::json!({ "adapter": info, "training": training });
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "{}: base {}, rank {}, alpha {}, targets {}, {} bytes",
                    info.name,
                    info.base_model,
                    info.rank,
                    info.alpha,
                    info.target_modules.join(","),
                    info.size_bytes
                );
                match training {
                    Some(t) => println!(
                        "trained by domainrag: {} steps, best validation loss {}, {:.0} tokens/s, \
                         {:.0} s, triplets {} (sha256 {})",
                        t["steps"],
                        t["best_val_loss"]
                            .as_f64()
                            .map_or_else(|| "-".to_string(), |v| format!("{v:.4}")),
                        t["tokens_per_s"].as_f64().unwrap_or(0.0),
                        t["wall_s"].as_f64().unwrap_or(0.0),
                        t["triplets_file"].as_str().unwrap_or("?"),
                        t["triplets_sha256"].as_str().unwrap_or("?")
                    ),
                    None => println!("uploaded (no training record)"),
                }
            }
        }
        AdaptersCmd::Remove { name } => {
            let mut used_by = Vec::new();
            for c in catalog.list()? {
                if catalog.settings(&c)?.adapter.as_deref() == Some(name.as_str()) {
                    used_by.push(c);
                }
            }
            registry.remove(&name, &used_by)?;
            println!("removed adapter {name}");
        }
    }
    Ok(())
}

async fn collection(catalog: &Catalog, cmd: CollectionCmd) -> Result<()> {
    match cmd {
        CollectionCmd::Create { name, settings } => {
            crate::collection::validate_name(&name)?;
            let mut s = catalog.default_settings(&name);
            settings.apply(&mut s);
            if let Some(adapter) = &s.adapter {
                AdapterRegistry::new(catalog.data_dir()).get(adapter)?;
            }
            catalog.create(s).await?;
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
            let value = serde_json::json!({ "settings": col.settings(), "stats": stats });
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                // TOML has no null: unset settings (e.g. no adapter) are left out.
                println!("{}", toml::to_string_pretty(&without_nulls(value))?);
            }
        }
        CollectionCmd::Set { name, settings } => {
            let mut s = catalog.settings(&name)?;
            if settings.max_words.is_some() || settings.overlap_words.is_some() {
                let col = catalog.open(&name).await?;
                if col.stats().await?.documents > 0 {
                    bail!(
                        "collection {name} already holds documents; chunking applies at ingest, so \
                         create a new collection to change it"
                    );
                }
            }
            settings.apply(&mut s);
            if let Some(adapter) = &s.adapter {
                // Only registered adapters can be assigned.
                AdapterRegistry::new(catalog.data_dir()).get(adapter)?;
            }
            catalog.save_settings(&s)?;
            println!(
                "updated collection {name}: fusion {:?}, adapter {}",
                s.fusion,
                s.adapter.as_deref().unwrap_or("(none)")
            );
        }
        CollectionCmd::Delete { name } => {
            catalog.delete(&name).await?;
            println!("deleted collection {name}");
        }
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

fn preview(text: &str, max_chars: usize) -> String {
    let mut s: String = text.chars().take(max_chars).collect();
    if text.chars().count() > max_chars {
        s.push('…');
    }
    s.replace('\n', " ")
}

/// The progress bar on stderr (hidden when not wanted or stderr is not a terminal).
struct Bar(ProgressBar);

impl Bar {
    fn new(visible: bool) -> Bar {
        let bar = if visible {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
                .expect("static template is valid"),
        );
        Bar(bar)
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64, message: &str) {
        self.0.inc(n);
        if !message.is_empty() {
            self.0.set_message(message.to_string());
        }
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Shared handle type for callers that keep an embedder around.
pub type SharedEmbedder = Arc<Embedder>;
