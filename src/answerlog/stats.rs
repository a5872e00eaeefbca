//! An experiment's live figures: per arm (answers, users, thumbs-up rate, abstention and citation
//! rates, online faithfulness, latency, tokens) and the difference between arms with a bootstrap
//! 95% interval, or "not enough data yet" until each arm has `answers.min_per_arm` observations
//! of a figure.
//!
//! The interval resamples users, not answers: an arm is assigned per user, and one user's answers
//! (and ratings) are not independent of each other, so resampling answers would make the
//! interval too narrow.

use std::collections::{BTreeMap, HashMap};

use rusqlite::params;
use serde::Serialize;

use super::{AnswerLog, Arm, Experiment, LogError};
use crate::eval::stats::{Interval, bootstrap_difference, median};

/// One answer of an experiment, as the figures need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub arm: Arm,
    pub unit: String,
    /// +1 up, -1 down, None unrated.
    pub rating: Option<i64>,
    pub abstained: bool,
    pub cited: bool,
    pub faithfulness: Option<f64>,
    pub total_ms: f64,
    pub first_token_ms: f64,
    pub completion_tokens: f64,
}

/// One arm's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ArmFigures {
    pub arm: Arm,
    pub adapter: Option<String>,
    pub answers: usize,
    pub users: usize,
    pub rated: usize,
    /// Share of rated answers rated up (None before any rating).
    pub thumbs_up_rate: Option<f64>,
    pub abstention_rate: f64,
    /// Share of answers citing at least one source.
    pub citation_rate: f64,
    /// Mean over the answers scored so far that make claims (None before any).
    pub faithfulness: Option<f64>,
    pub faithfulness_scored: usize,
    /// Median answer time and time to first token.
    pub latency_ms: f64,
    pub first_token_ms: f64,
    pub completion_tokens: f64,
}

/// The candidate minus the control on one figure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricDifference {
    pub control_n: usize,
    pub candidate_n: usize,
    /// None until both arms have enough observations.
    pub difference: Option<f64>,
    pub ci95: Option<Interval>,
    /// Whether the interval excludes 0 (None until there is one).
    pub significant: Option<bool>,
    pub status: String,
}

/// What `experiment status --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExperimentReport {
    pub collection: String,
    pub experiment: Experiment,
    /// By the arm's adapter (`none`: the base model).
    pub arms: BTreeMap<String, ArmFigures>,
    /// Candidate minus control, per figure.
    pub difference: BTreeMap<String, MetricDifference>,
    /// Both arms have at least `min_per_arm` answers.
    pub enough_data: bool,
    pub min_per_arm: usize,
    /// Blind side-by-side comparisons (their answers are not in `arms`).
    pub blind: super::compare::BlindFigures,
}

/// Users each arm needs before an interval is drawn: a bootstrap over fewer clusters collapses
/// (two users per arm can give a zero-width interval).
pub const MIN_USERS: usize = 5;

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn figures(experiment: &Experiment, arm: Arm, samples: &[&Sample]) -> ArmFigures {
    let n = samples.len().max(1) as f64;
    let rated: Vec<i64> = samples.iter().filter_map(|s| s.rating).collect();
    let scored: Vec<f64> = samples.iter().filter_map(|s| s.faithfulness).collect();
    let mut users: Vec<&str> = samples.iter().map(|s| s.unit.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    ArmFigures {
        arm,
        adapter: experiment.adapter_of(arm).map(str::to_string),
        answers: samples.len(),
        users: users.len(),
        rated: rated.len(),
        thumbs_up_rate: mean(rated.iter().map(|&r| f64::from(u8::from(r > 0)))),
        abstention_rate: samples.iter().filter(|s| s.abstained).count() as f64 / n,
        citation_rate: samples.iter().filter(|s| s.cited).count() as f64 / n,
        faithfulness: mean(scored.iter().copied()),
        faithfulness_scored: scored.len(),
        latency_ms: median(samples.iter().map(|s| s.total_ms).collect()),
        first_token_ms: median(samples.iter().map(|s| s.first_token_ms).collect()),
        completion_tokens: mean(samples.iter().map(|s| s.completion_tokens)).unwrap_or(0.0),
    }
}

type Figure = fn(&Sample) -> Option<f64>;

/// The figures compared between arms, each a per-answer value (None: not observed on it).
const COMPARED: &[(&str, Figure)] = &[
    ("thumbs_up_rate", |s| {
        s.rating.map(|r| f64::from(u8::from(r > 0)))
    }),
    ("abstention_rate", |s| {
        Some(f64::from(u8::from(s.abstained)))
    }),
    ("citation_rate", |s| Some(f64::from(u8::from(s.cited)))),
    ("faithfulness", |s| s.faithfulness),
    // Means (the per-arm table shows medians): a difference of means is what the bootstrap
    // resamples.
    ("mean_latency_ms", |s| Some(s.total_ms)),
    ("completion_tokens", |s| Some(s.completion_tokens)),
];

/// Per-user `(sum, count)` of `figure` over `samples`.
fn clusters(samples: &[&Sample], figure: Figure) -> Vec<(f64, f64)> {
    let mut by_unit: HashMap<&str, (f64, f64)> = HashMap::new();
    for s in samples {
        if let Some(v) = figure(s) {
            let e = by_unit.entry(&s.unit).or_default();
            e.0 += v;
            e.1 += 1.0;
        }
    }
    let mut out: Vec<(&str, (f64, f64))> = by_unit.into_iter().collect();
    // Sorted so that the seeded bootstrap gives the same interval for the same log.
    out.sort_by(|a, b| a.0.cmp(b.0));
    out.into_iter().map(|(_, c)| c).collect()
}

fn ratio(clusters: &[(f64, f64)]) -> f64 {
    let (s, c) = clusters
        .iter()
        .fold((0.0, 0.0), |(s, c), x| (s + x.0, c + x.1));
    if c > 0.0 { s / c } else { 0.0 }
}

fn difference(
    control: &[&Sample],
    candidate: &[&Sample],
    figure: Figure,
    min: usize,
) -> MetricDifference {
    let (a, b) = (clusters(control, figure), clusters(candidate, figure));
    let count = |c: &[(f64, f64)]| c.iter().map(|x| x.1).sum::<f64>() as usize;
    let (control_n, candidate_n) = (count(&a), count(&b));
    if control_n < min || candidate_n < min || a.len() < MIN_USERS || b.len() < MIN_USERS {
        return MetricDifference {
            control_n,
            candidate_n,
            difference: None,
            ci95: None,
            significant: None,
            status: format!(
                "not enough data yet: each arm needs {min} answers with this figure from at least {MIN_USERS} users"
            ),
        };
    }
    let ci = bootstrap_difference(&a, &b, 2000, 17);
    MetricDifference {
        control_n,
        candidate_n,
        difference: Some(ratio(&b) - ratio(&a)),
        ci95: Some(ci),
        significant: Some(ci.low > 0.0 || ci.high < 0.0),
        status: "ok".into(),
    }
}

fn of(samples: &[Sample], arm: Arm) -> Vec<&Sample> {
    samples.iter().filter(|s| s.arm == arm).collect()
}

/// Each arm's figures, by the arm's adapter (`none`: the base model).
pub fn arm_figures(experiment: &Experiment, samples: &[Sample]) -> BTreeMap<String, ArmFigures> {
    [Arm::Control, Arm::Candidate]
        .into_iter()
        .map(|arm| {
            let label = experiment.arm_label(arm);
            (label, figures(experiment, arm, &of(samples, arm)))
        })
        .collect()
}

/// The report of `experiment` over `samples` (its answers).
pub fn report(
    collection: &str,
    experiment: &Experiment,
    samples: &[Sample],
    min_per_arm: usize,
) -> ExperimentReport {
    let (control, candidate) = (of(samples, Arm::Control), of(samples, Arm::Candidate));
    let arms = arm_figures(experiment, samples);
    let difference = COMPARED
        .iter()
        .map(|(name, f)| {
            (
                name.to_string(),
                difference(&control, &candidate, *f, min_per_arm),
            )
        })
        .collect();
    ExperimentReport {
        collection: collection.to_string(),
        experiment: experiment.clone(),
        arms,
        difference,
        enough_data: control.len() >= min_per_arm && candidate.len() >= min_per_arm,
        min_per_arm,
        blind: super::compare::BlindFigures::default(),
    }
}

impl AnswerLog {
    /// The answers of experiment `id`, as the figures need them.
    pub fn samples(&self, id: i64) -> Result<Vec<Sample>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(
                "SELECT a.arm, a.unit, f.rating, a.abstained, a.cited, a.faithfulness, a.total_ms,
                        a.first_token_ms, a.completion_tokens
                 FROM answers a LEFT JOIN feedback f ON f.answer_id = a.id
                 WHERE a.experiment = ?1 AND a.comparison IS NULL",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Sample {
                        arm: Arm::Control,
                        unit: r.get(1)?,
                        rating: r.get(2)?,
                        abstained: r.get(3)?,
                        cited: r.get::<_, i64>(4)? > 0,
                        faithfulness: r.get(5)?,
                        total_ms: r.get(6)?,
                        first_token_ms: r.get(7)?,
                        completion_tokens: r.get::<_, i64>(8)? as f64,
                    },
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (arm, sample) = row.map_err(|e| self.sql(e))?;
            if let Some(arm) = Arm::parse(&arm) {
                out.push(Sample { arm, ..sample });
            }
        }
        Ok(out)
    }

    /// The report of the running experiment, or of experiment `id`.
    pub fn experiment_report(
        &self,
        collection: &str,
        id: Option<i64>,
        min_per_arm: usize,
    ) -> Result<ExperimentReport, LogError> {
        let experiment = match id {
            None => self.running_experiment()?,
            Some(id) => self.experiments()?.into_iter().find(|e| e.id == id),
        }
        .ok_or_else(|| match id {
            None => super::experiment::no_experiment(),
            Some(id) => LogError::NotFound(format!("no experiment {id} on this collection")),
        })?;
        let samples = self.samples(experiment.id)?;
        let mut report = report(collection, &experiment, &samples, min_per_arm);
        report.blind = super::compare::blind_figures(&self.preferences(experiment.id)?);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(arm: Arm, user: usize, up: bool) -> Sample {
        Sample {
            arm,
            unit: format!("u{user}"),
            rating: Some(if up { 1 } else { -1 }),
            abstained: false,
            cited: true,
            faithfulness: Some(1.0),
            total_ms: 100.0,
            first_token_ms: 10.0,
            completion_tokens: 20.0,
        }
    }

    fn experiment() -> Experiment {
        serde_json::from_value::<Experiment>(serde_json::json!({
            "id": 1, "control": null, "candidate": "b", "share": 0.5, "started_at": 0,
            "stopped_at": null, "decision": null
        }))
        .expect("experiment")
    }

    #[test]
    fn a_favoured_arm_gets_an_interval_above_zero_and_too_few_answers_get_none() {
        let mut samples = Vec::new();
        for user in 0..20 {
            let arm = if user % 2 == 0 {
                Arm::Control
            } else {
                Arm::Candidate
            };
            for i in 0..10 {
                // Candidate users like 8 of 10 answers, control users 3 of 10.
                let up = if arm == Arm::Candidate { i < 8 } else { i < 3 };
                samples.push(sample(arm, user, up));
            }
        }
        let r = report("c", &experiment(), &samples, 20);
        assert!(r.enough_data);
        assert_eq!(r.arms["b"].answers, 100);
        assert_eq!(r.arms["none"].users, 10);
        assert!((r.arms["b"].thumbs_up_rate.unwrap() - 0.8).abs() < 1e-9);
        let d = &r.difference["thumbs_up_rate"];
        assert!((d.difference.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(d.significant, Some(true), "{d:?}");
        // Same figures on both sides: an interval that holds 0.
        assert_eq!(r.difference["citation_rate"].significant, Some(false));

        let few = report("c", &experiment(), &samples[..30], 20);
        assert!(!few.enough_data);
        assert!(few.difference["thumbs_up_rate"].difference.is_none());
        assert!(
            few.difference["thumbs_up_rate"]
                .status
                .contains("not enough data")
        );
    }
}
