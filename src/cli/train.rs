//! `domainrag triplets build|synth` and `domainrag train`: turning question/answer pairs (or a
//! collection's own documents) into (query, context, answer) triplets with serving's retriever,
//! then training a LoRA adapter on them and registering it, with a progress bar showing loss,
//! tokens/s and learning rate.
//!
//! Argument handling and printing only: triplets, tokenisation and the training loop belong to
//! `crate::train`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::ProgressBar;

use crate::adapt::{TrainOutcome, TrainRequest, TripletSource, Workbench};
use crate::adapters::AdapterRegistry;
use crate::collection::Catalog;
use crate::config::Settings;
use crate::eval::{self, ContextMode, QuestionFormat};
use crate::ingest::Progress;
use crate::train::synth::SynthReport;
use crate::train::{Method, TrainOptions, Triplet};

use super::{Bar, gold_paragraphs, load_rag, progress_bar, sample_questions};

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
        #[arg(
            long,
            required_unless_present = "from_log",
            conflicts_with = "from_log"
        )]
        questions: Option<PathBuf>,
        /// Learn from the collection's answer log instead: answers users rated up (as given)
        /// and answers they corrected (the correction), with the sources given then.
        #[arg(long)]
        from_log: bool,
        /// With --from-log: `positive` (rated up), `corrected`, or `either`.
        #[arg(long, value_enum, default_value = "either", requires = "from_log")]
        feedback: FeedbackArg,
        /// With --from-log: keep emails, phone numbers and secrets in questions and answers
        /// (masked by default).
        #[arg(long, requires = "from_log")]
        keep_pii: bool,
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
    /// Write triplets from the collection's own documents: questions drafted by extraction rules
    /// from its chunks (definitions, purposes, instructions), answered by the sentence that
    /// holds the answer and its citation, kept only when serving's retriever finds the source
    /// for the question (see `train::synth`). Prints what was kept and dropped, by reason.
    Synth {
        #[arg(long, short)]
        collection: String,
        /// Triplets wanted (fewer when the chunks run out).
        #[arg(long, default_value_t = 300)]
        n: usize,
        #[arg(long)]
        out: PathBuf,
        /// Also write the report (counts by reason, rate) as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Put each question's sources in a random order (as `triplets build` does).
        #[arg(long)]
        shuffle_sources: bool,
        /// Order in which chunks are read (and sources shuffled).
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// Which logged answers `triplets build --from-log` learns from.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FeedbackArg {
    Positive,
    Corrected,
    Either,
}

impl From<FeedbackArg> for crate::answerlog::FeedbackFilter {
    fn from(f: FeedbackArg) -> Self {
        match f {
            FeedbackArg::Positive => Self::Positive,
            FeedbackArg::Corrected => Self::Corrected,
            FeedbackArg::Either => Self::Either,
        }
    }
}

/// `domainrag train` (defaults: see `TrainOptions::default`).
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The collection the adapter is for (recorded; `--assign` sets it as its adapter).
    #[arg(long, short)]
    pub collection: String,
    /// Triplets JSONL (`{"query", "context", "answer"}`, from `triplets build` or `synth`).
    #[arg(
        long,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub triplets: Option<PathBuf>,
    /// Instead of --triplets: synthesise this many triplets from the collection's own
    /// documents first (as `triplets synth` does; written into the training directory).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Adapter name (must be new unless --replace).
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub replace: bool,
    /// Make it the collection's adapter once trained.
    #[arg(long)]
    pub assign: bool,
    /// lora (low-rank updates), ia3 ((IA)³: per-channel scales; far fewer parameters, wants a
    /// larger --lr, e.g. 3e-3), prompt (prompt tuning: learned input embeddings of
    /// --virtual-tokens before the prompt) or prefix (prefix tuning: a learned key and value per
    /// virtual token in every layer).
    #[arg(long, default_value = "lora")]
    pub method: Method,
    /// prompt/prefix: how many virtual tokens (each takes room in every request's KV cache).
    #[arg(long, default_value_t = 20)]
    pub virtual_tokens: usize,
    /// prompt/prefix: the text the virtual tokens start from (prompt: its token embeddings;
    /// prefix: the keys and values the base computes over it).
    #[arg(long, default_value = crate::train::DEFAULT_INIT_TEXT)]
    pub init_text: String,
    /// prefix: train the keys and values through peft's reparameterisation MLP of this hidden
    /// width (it starts at random; 0 = train them directly from --init-text's).
    #[arg(long, default_value_t = 0)]
    pub prefix_projection: usize,
    /// LoRA rank and alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Linear modules to adapt (default: all seven for LoRA; k_proj,v_proj,down_proj for ia3).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// ia3: the targets scaled on their input (default: down_proj when targeted).
    #[arg(long, value_delimiter = ',')]
    pub feedforward: Option<Vec<String>>,
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
    /// Keep only each layer's input and recompute its activations in the backward pass (true:
    /// the memory of one layer instead of all, for one more forward pass).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = TrainOptions::default().gradient_checkpointing)]
    pub gradient_checkpointing: bool,
    /// Train on the GPU (builds with `--features cuda`).
    #[arg(long)]
    pub gpu: bool,
    #[arg(long)]
    pub no_progress: bool,
}

/// `domainrag triplets build`.
pub(super) async fn triplets(
    catalog: &Catalog,
    settings: &Settings,
    cmd: TripletsCmd,
) -> Result<()> {
    match cmd {
        TripletsCmd::Build {
            from_log: true,
            collection,
            feedback,
            keep_pii,
            out,
            shuffle_sources,
            seed,
            ..
        } => {
            let col = catalog.open(&collection).await?;
            let log =
                crate::answerlog::AnswerLog::new(&catalog.dir_of(&collection), &settings.answers);
            let (_, rag) = load_rag(settings).await?;
            let options = crate::train::from_log::FromLog {
                filter: feedback.into(),
                mask_pii: !keep_pii,
                shuffle: shuffle_sources.then_some(seed),
            };
            let (triplets, report) =
                crate::train::from_log::build(&rag, &col, &log, options).await?;
            eprintln!("{}", serde_json::to_string_pretty(&report)?);
            if triplets.is_empty() {
                bail!(
                    "no logged answer of {collection} has the feedback asked for: nothing to write"
                );
            }
            crate::train::write_triplets(&out, &triplets)?;
            println!("wrote {} triplets to {}", triplets.len(), out.display());
            Ok(())
        }
        TripletsCmd::Build {
            collection,
            format,
            questions,
            out,
            context,
            sample,
            shuffle_sources,
            seed,
            ..
        } => {
            let questions = questions.context("--questions is required without --from-log")?;
            let mut qs = eval::load_questions(&questions, format)?;
            if let Some(n) = sample {
                qs = sample_questions(qs, n, seed);
            }
            let gold = gold_paragraphs(context, format, &questions)?;
            let col = catalog.open(&collection).await?;
            let (_, rag) = load_rag(settings).await?;
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
            crate::train::write_triplets(&out, &triplets)?;
            eprintln!("{}", serde_json::to_string_pretty(&report)?);
            println!("wrote {} triplets to {}", triplets.len(), out.display());
            Ok(())
        }
        TripletsCmd::Synth {
            collection,
            n,
            out,
            report,
            shuffle_sources,
            seed,
        } => {
            let col = catalog.open(&collection).await?;
            let (_, rag) = load_rag(settings).await?;
            let (triplets, synth_report) = synthesize(&rag, &col, n, seed, shuffle_sources).await?;
            crate::train::write_triplets(&out, &triplets)?;
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_string_pretty(&synth_report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("wrote {} triplets to {}", triplets.len(), out.display());
            Ok(())
        }
    }
}

/// Synthesise with a progress bar, then print the report.
async fn synthesize(
    rag: &crate::rag::Rag,
    col: &crate::collection::Collection,
    n: usize,
    seed: u64,
    shuffle: bool,
) -> Result<(Vec<Triplet>, SynthReport)> {
    let bar = Bar::new(true);
    bar.start(n as u64);
    let result =
        crate::train::synth::synthesize(rag, col, n, seed, shuffle, &|k| bar.advance(k as u64, ""))
            .await?;
    bar.finish();
    eprintln!("{}", serde_json::to_string_pretty(&result.1)?);
    if result.0.len() < n {
        eprintln!(
            "warning: {} of {n} triplets: the collection's chunks ran out (see dropped reasons)",
            result.0.len()
        );
    }
    Ok(result)
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

/// `domainrag train`: train a LoRA adapter (Ctrl-C keeps the best checkpoint), register it, and
/// with `--assign` make it the collection's adapter.
pub(super) async fn train_command(
    catalog: &Catalog,
    settings: &Settings,
    a: TrainArgs,
) -> Result<()> {
    let request = train_request(&a)?;
    crate::adapt::check(&AdapterRegistry::new(&settings.paths.data_dir), &request)?;
    let col = catalog.open(&a.collection).await?;
    let (_, rag) = load_rag(settings).await?;
    let registry = AdapterRegistry::new(&settings.paths.data_dir);
    let bench = Workbench {
        rag: &rag,
        catalog,
        registry: &registry,
        base_dir: settings.generate_base_dir(),
        training_dir: settings.paths.data_dir.join("training"),
    };
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
    let synth_bar = Bar::new(a.synthetic.is_some() && !a.no_progress);
    synth_bar.start(a.synthetic.unwrap_or(0) as u64);
    let bar = TrainBar(progress_bar(
        !a.no_progress,
        "{bar:30} {pos}/{len} eta {eta} {msg}",
    ));
    let out = crate::adapt::train_adapter(
        &bench,
        &col,
        request,
        &|k| synth_bar.advance(k as u64, ""),
        Box::new(bar),
        stop,
    )
    .await?;
    print_outcome(&a.collection, &out)
}

/// The request `train` makes of `adapt` from its flags.
fn train_request(a: &TrainArgs) -> Result<TrainRequest> {
    let d = TrainOptions::for_method(a.method);
    let targets = a.targets.clone().unwrap_or(d.targets);
    let options = TrainOptions {
        method: a.method,
        rank: a.rank,
        alpha: a.alpha,
        feedforward: a
            .feedforward
            .clone()
            .unwrap_or_else(|| a.method.default_feedforward(&targets)),
        targets,
        virtual_tokens: a.virtual_tokens,
        init_text: a.init_text.clone(),
        prefix_projection: a.prefix_projection,
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
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let source = match (&a.triplets, a.synthetic) {
        (Some(path), _) => TripletSource::File(path.clone()),
        (None, Some(n)) => TripletSource::Synthetic { n, seed: a.seed },
        (None, None) => bail!("give --triplets FILE or --synthetic N"),
    };
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
    Ok(TrainRequest {
        name: a.name.clone(),
        source,
        options,
        replace: a.replace,
        assign: a.assign,
        keep_when_stopped: true,
        device,
    })
}

fn print_outcome(collection: &str, out: &TrainOutcome) -> Result<()> {
    if let Some(report) = &out.synth {
        eprintln!("{}", serde_json::to_string_pretty(report)?);
        eprintln!("synthetic triplets: {}", out.triplets_file.display());
    }
    if out.too_long > 0 {
        eprintln!(
            "dropped {} of {} triplets longer than --max-len",
            out.too_long, out.triplets
        );
    }
    let (info, r) = (&out.adapter, &out.record);
    println!(
        "trained adapter {} ({}, targets {}): {} steps, best validation loss {}, {:.0} tokens/s, {:.0} s, peak RSS {:.0} MiB{}",
        info.name,
        info.method(),
        info.targets(),
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
    println!("checkpoints: {}", out.checkpoints.display());
    if out.assigned {
        println!("collection {collection} now answers with {}", info.name);
    }
    Ok(())
}
