//! `domainrag experiment start|status|stop` and `domainrag answers export`: a collection's A/B
//! test of a candidate adapter and its answer log, from the command line. Parsing and printing
//! only; the rules live in `crate::answerlog`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::adapters::AdapterRegistry;
use crate::answerlog::stats::ExperimentReport;
use crate::answerlog::{self, AnswerLog, Decision};
use crate::collection::Catalog;
use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum ExperimentCmd {
    /// Give a candidate adapter a share of the collection's traffic (requests that leave the
    /// adapter to the collection), against the adapter in service. Sticky per user.
    Start {
        #[arg(long, short)]
        collection: String,
        /// A registered adapter.
        #[arg(long)]
        candidate: String,
        /// The candidate's share of users, between 0 and 1.
        #[arg(long, default_value_t = 0.2)]
        share: f64,
        #[arg(long)]
        json: bool,
    },
    /// Live figures per arm and the difference between arms with its 95% interval.
    Status {
        #[arg(long, short)]
        collection: String,
        /// An earlier experiment (default: the running one).
        #[arg(long)]
        id: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// End the running experiment: --promote makes the candidate the collection's adapter,
    /// --rollback keeps the one in service. The decision is recorded.
    Stop {
        #[arg(long, short)]
        collection: String,
        #[arg(
            long,
            conflicts_with = "rollback",
            required_unless_present = "rollback"
        )]
        promote: bool,
        #[arg(long)]
        rollback: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AnswersCmd {
    /// Write the collection's answer log as JSONL (one answer per line, oldest first, with its
    /// sources, arm and feedback).
    Export {
        #[arg(long, short)]
        collection: String,
        /// File to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

impl ExperimentCmd {
    /// Whether this command changes what a running server holds in memory (a promotion changes
    /// the collection's settings).
    pub(super) fn changes_settings(&self) -> bool {
        matches!(self, ExperimentCmd::Stop { promote: true, .. })
    }
}

fn log_of(catalog: &Catalog, settings: &Settings, collection: &str) -> Result<AnswerLog> {
    catalog.settings(collection)?;
    Ok(AnswerLog::new(
        &catalog.dir_of(collection),
        &settings.answers,
    ))
}

pub(super) fn run(catalog: &Catalog, settings: &Settings, cmd: ExperimentCmd) -> Result<()> {
    match cmd {
        ExperimentCmd::Start {
            collection,
            candidate,
            share,
            json,
        } => {
            let log = log_of(catalog, settings, &collection)?;
            let registry = AdapterRegistry::new(&settings.paths.data_dir);
            let control = crate::rag::adapter_in_service(
                catalog.settings(&collection)?.adapter,
                &settings.rag.house_adapter,
                |a| registry.contains(a),
            );
            let e = answerlog::experiment::start(&log, &registry, control, &candidate, share)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!(
                    "experiment {} on {collection}: {} gets {:.0}% of users, {} the rest",
                    e.id,
                    e.candidate,
                    e.share * 100.0,
                    e.control.as_deref().unwrap_or("the base model")
                );
            }
            Ok(())
        }
        ExperimentCmd::Status {
            collection,
            id,
            json,
        } => {
            let log = log_of(catalog, settings, &collection)?;
            let report = log.experiment_report(&collection, id, settings.answers.min_per_arm)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", table(&report));
            }
            Ok(())
        }
        ExperimentCmd::Stop {
            collection,
            promote,
            json,
            ..
        } => {
            let log = log_of(catalog, settings, &collection)?;
            let decision = if promote {
                Decision::Promote
            } else {
                Decision::Rollback
            };
            let e = answerlog::experiment::stop(&log, decision, |candidate| {
                let mut s = catalog.settings(&collection)?;
                s.adapter = Some(candidate.to_string());
                catalog.save_settings(&s)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else if promote {
                println!(
                    "experiment {}: {} now answers for {collection}",
                    e.id, e.candidate
                );
            } else {
                println!(
                    "experiment {}: rolled back, {} keeps answering for {collection}",
                    e.id,
                    e.control.as_deref().unwrap_or("the base model")
                );
            }
            Ok(())
        }
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The status as a table: one row per arm, then the differences.
fn table(r: &ExperimentReport) -> String {
    let e = &r.experiment;
    let mut out = format!(
        "experiment {} on {}: candidate {} ({:.0}% of users) vs {}{}\n\n",
        e.id,
        r.collection,
        e.candidate,
        e.share * 100.0,
        e.control.as_deref().unwrap_or("none (base model)"),
        e.decision
            .map(|d| format!(", stopped: {}", d.as_str()))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "{:<24} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
        "arm",
        "answers",
        "users",
        "rated",
        "thumbs_up",
        "abstain",
        "cited",
        "faithful",
        "median_ms"
    ));
    for (label, a) in &r.arms {
        out.push_str(&format!(
            "{:<24} {:>8} {:>6} {:>6} {:>9} {:>9.3} {:>9.3} {:>9} {:>10.0}\n",
            format!("{label} ({})", a.arm.as_str()),
            a.answers,
            a.users,
            a.rated,
            opt(a.thumbs_up_rate, 3),
            a.abstention_rate,
            a.citation_rate,
            opt(a.faithfulness, 3),
            a.latency_ms
        ));
    }
    out.push_str("\ncandidate - control (95% interval, users resampled):\n");
    for (name, d) in &r.difference {
        match (d.difference, d.ci95) {
            (Some(v), Some(ci)) => out.push_str(&format!(
                "  {name:<18} {v:+.3}  [{:+.3}, {:+.3}]{}\n",
                ci.low,
                ci.high,
                if d.significant == Some(true) {
                    "  *"
                } else {
                    ""
                }
            )),
            _ => out.push_str(&format!(
                "  {name:<18} {} (control {}, candidate {})\n",
                d.status, d.control_n, d.candidate_n
            )),
        }
    }
    out
}

pub(super) fn answers(catalog: &Catalog, settings: &Settings, cmd: AnswersCmd) -> Result<()> {
    match cmd {
        AnswersCmd::Export { collection, out } => {
            let log = log_of(catalog, settings, &collection)?;
            let n = match &out {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    );
                    let n = log.export_to(&mut file)?;
                    file.flush()?;
                    n
                }
                None => log.export_to(&mut std::io::stdout().lock())?,
            };
            if n == 0 && out.is_some() {
                eprintln!("no answers logged for {collection}");
            } else if let Some(path) = out {
                eprintln!("wrote {n} answers to {}", path.display());
            }
            Ok(())
        }
    }
}
