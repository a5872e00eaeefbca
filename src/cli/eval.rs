//! `domainrag eval ...`: answer quality per arm (base model and adapters) and retrieval quality
//! per mode (bm25, dense, hybrid), printed as tables and optionally written as JSON or HTML.
//!
//! Printing only: the metrics belong to `crate::eval`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::adapters::AdapterRegistry;
use crate::collection::Catalog;
use crate::config::Settings;
use crate::embed::Embedder;
use crate::eval::{self, ContextMode, QuestionFormat};
use crate::ingest::Progress;
use crate::retrieve::Mode;

use super::{Bar, SettingsArgs, gold_paragraphs, load_rag, sample_questions};

#[derive(Debug, Subcommand)]
pub enum EvalCmd {
    /// Answer quality per arm (base model and adapters): EM, F1, faithfulness, relevance,
    /// hallucination and abstention rates, cost, bootstrap 95% intervals.
    Answers {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: QuestionFormat,
        #[arg(
            long,
            required_unless_present = "from_log",
            conflicts_with = "from_log"
        )]
        questions: Option<PathBuf>,
        /// Shadow replay: the collection's logged questions (newest first, distinct; --sample N
        /// of them, default 200) replayed through each arm offline. A user's correction, or an
        /// answer rated up, is the reference where there is one.
        #[arg(long)]
        from_log: bool,
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
        /// Also write each question's metrics per mode here (JSON lines: id, mode, metrics),
        /// to compare two runs question by question.
        #[arg(long, value_name = "FILE")]
        per_question: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// `domainrag eval answers` and `domainrag eval retrieval`.
pub(super) async fn run(catalog: &Catalog, settings: &Settings, cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Answers {
            collection,
            format,
            questions,
            from_log,
            adapters,
            sample,
            seed,
            limit,
            json,
            html,
            context,
        } => {
            let (mut qs, gold) = match &questions {
                Some(path) if !from_log => {
                    let qs = eval::load_questions(path, format)?;
                    let qs = match sample {
                        Some(n) => sample_questions(qs, n, seed),
                        None => qs,
                    };
                    (qs, gold_paragraphs(context, format, path)?)
                }
                _ => {
                    let log = crate::answerlog::AnswerLog::new(
                        &catalog.dir_of(&collection),
                        &settings.answers,
                    );
                    let qs = log.replay_questions(sample.unwrap_or(200))?;
                    if qs.is_empty() {
                        anyhow::bail!("collection {collection} has no logged questions to replay");
                    }
                    (qs, None)
                }
            };
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
            let (embedder, rag) = load_rag(settings).await?;
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
        EvalCmd::Retrieval {
            collection,
            format,
            questions,
            limit,
            fusion,
            per_question,
            json,
        } => {
            let mut qs = eval::load_questions(&questions, format)?;
            if let Some(limit) = limit {
                qs.truncate(limit);
            }
            let embedder = Embedder::load_async(settings).await?;
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
                &settings_for_run.search(),
                &|n| bar.advance(n as u64, ""),
            )
            .await?;
            bar.finish();
            if let Some(path) = per_question {
                std::fs::write(&path, report.per_question_jsonl())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} questions, collection {collection}, {}\n\
                     | mode | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 |\n|---|---|---|---|---|---|",
                    report.questions,
                    settings_for_run.search()
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
    }
}
