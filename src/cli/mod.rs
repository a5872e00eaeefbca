//! The command line: argument definitions and one function per command, printing tables for people
//! and `--json` for programs (stdout), logs and progress to stderr.
//!
//! The edge of the program: it may use `anyhow`; everything below it returns typed errors.
//!
//! This file owns the top-level `Cli` and `Command`, settings loading, the dispatch in `run`, and
//! what several command groups share: the stderr progress bar, the answering pipeline, question
//! sampling and SQuAD gold paragraphs. Each group lives in its own file: `collection` (collections
//! and ingest), `query` (search, ask, serve), `adapters`, `keys`, `eval`, `bench`, `train` (triplets and
//! training), `experiment` (A/B tests and the answer log). The files under `cli/` parse arguments and print; the work itself is done by the
//! library modules they call.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::app::App;
use crate::config::{Settings, Sources};
use crate::embed::Embedder;
use crate::eval::{ContextMode, Question, QuestionFormat};
use crate::generate::{Generator, Sampling};
use crate::ingest::{Format, Progress};
use crate::rag::Rag;
use crate::retrieve::{Mode, Retriever};

mod adapters;
mod bench;
mod collection;
mod eval;
mod experiment;
mod keys;
mod query;
mod train;

pub use adapters::AdaptersCmd;
pub use bench::BenchCmd;
pub use collection::{CollectionCmd, SettingsArgs};
pub use eval::EvalCmd;
pub use experiment::{AnswersCmd, ExperimentCmd};
pub use keys::KeysCmd;
pub use train::{TrainArgs, TripletsCmd};

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
    /// API keys: create (admin, or reader/editor of collections), list, revoke.
    #[command(subcommand)]
    Keys(KeysCmd),
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
    /// A/B test a candidate adapter on a share of a collection's live traffic.
    #[command(subcommand)]
    Experiment(ExperimentCmd),
    /// The answer log: every answer given, with its sources, arm and feedback.
    #[command(subcommand)]
    Answers(AnswersCmd),
}

/// Load settings from the global flags.
pub fn settings(cli: &Cli) -> Result<Settings> {
    Ok(Settings::load(&Sources::from_process(
        cli.config.clone(),
        cli.data_dir.clone(),
        cli.models_dir.clone(),
    ))?)
}

/// What `command` would change that a running server keeps in memory (and would overwrite), if
/// anything: such commands are refused while a server holds the data dir (`datadir`).
fn changes_served_state(command: &Command) -> Option<&'static str> {
    match command {
        Command::Collection(
            CollectionCmd::Create { .. }
            | CollectionCmd::Set { .. }
            | CollectionCmd::Delete { .. }
            | CollectionCmd::Tune(_),
        ) => Some("create, change, tune or delete collections"),
        Command::Ingest { .. } => Some("ingest documents (upload them)"),
        Command::Adapters(AdaptersCmd::Add { .. } | AdaptersCmd::Remove { .. }) => {
            Some("add or remove adapters")
        }
        Command::Train(_) => Some("train adapters (POST /api/collections/NAME/train)"),
        Command::Experiment(cmd) if cmd.changes_settings() => {
            Some("promote an experiment's candidate (POST /api/collections/NAME/experiment/stop)")
        }
        _ => None,
    }
}

/// Run a parsed command.
pub async fn run(cli: Cli, settings: Settings) -> Result<()> {
    let app = App::new(settings, None);
    let data_dir = &app.settings.paths.data_dir;
    if let Some(what) = changes_served_state(&cli.command) {
        crate::datadir::refuse_if_served(data_dir, what)?;
    }
    // Finish what a killed process left half-done (a server did at its start, if one runs;
    // `serve` does it itself, in `AppState::load`, once it holds the data dir).
    if !matches!(cli.command, Command::Serve { .. }) {
        crate::datadir::unless_served(data_dir, || app.recover())?;
    }
    let (catalog, settings) = (&app.catalog, &app.settings);
    match cli.command {
        Command::Collection(cmd) => collection::run(&app, cmd).await,
        Command::Ingest {
            collection,
            format,
            no_progress,
            json,
            paths,
        } => collection::ingest(&app, collection, format, no_progress, json, paths).await,
        Command::Search {
            collection,
            mode,
            k,
            json,
            query,
        } => query::search(catalog, settings, collection, mode, k, json, query).await,
        Command::Serve { bind } => query::serve(settings.clone(), bind).await,
        Command::Ask {
            collection,
            adapter,
            no_adapter,
            json,
            question,
        } => query::ask(&app, collection, adapter, no_adapter, json, question).await,
        Command::Adapters(cmd) => adapters::run(&app, cmd).await,
        Command::Keys(cmd) => keys::run(settings, cmd),
        Command::Eval(cmd) => eval::run(catalog, settings, cmd).await,
        Command::Bench(cmd) => bench::run(catalog, settings, cmd).await,
        Command::Triplets(cmd) => train::triplets(catalog, settings, cmd).await,
        Command::Train(args) => train::train_command(catalog, settings, args).await,
        Command::Experiment(cmd) => experiment::run(catalog, settings, cmd),
        Command::Answers(cmd) => experiment::answers(catalog, settings, cmd),
    }
}

/// A reproducible random sample of `n` questions (Fisher-Yates with a fixed-seed xorshift).
fn sample_questions(mut qs: Vec<Question>, n: usize, seed: u64) -> Vec<Question> {
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
        (ContextMode::Gold, QuestionFormat::Squad) => crate::eval::squad_paragraphs(questions)
            .map(Some)
            .map_err(anyhow::Error::msg),
        (ContextMode::Gold, QuestionFormat::Jsonl) => {
            bail!("--context gold needs --format squad (the paragraphs come from the SQuAD file)")
        }
    }
}

/// The progress bar on stderr (hidden when not wanted or stderr is not a terminal).
struct Bar(ProgressBar);

/// A progress bar on stderr drawn with `template` (hidden when not `visible`).
fn progress_bar(visible: bool, template: &'static str) -> ProgressBar {
    let bar = if visible {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(template).expect("static template is valid"));
    bar
}

impl Bar {
    fn new(visible: bool) -> Bar {
        Bar(progress_bar(
            visible,
            "{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}",
        ))
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
