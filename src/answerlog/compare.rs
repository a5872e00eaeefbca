//! Blind comparisons: one question answered by both arms of the running experiment, shown side by
//! side as "A" and "B" in an order drawn per comparison, without saying which adapter wrote which;
//! the user picks the better one (or a tie). Both answers are logged (with their arm and the
//! comparison's id) but kept out of the arms' live figures, since the user saw both arms. The
//! experiment's report adds the candidate's win rate over decided comparisons, with a bootstrap
//! 95% interval that resamples comparisons.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{AnswerLog, Arm, LogError, Who, now_ms};
use std::collections::BTreeMap;

use crate::eval::stats::{Interval, bootstrap_ratio};

/// The user's pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preference {
    A,
    B,
    Tie,
}

impl Preference {
    fn as_str(self) -> &'static str {
        match self {
            Preference::A => "a",
            Preference::B => "b",
            Preference::Tie => "tie",
        }
    }
}

/// The blind comparisons of an experiment, summarised.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BlindFigures {
    pub comparisons: usize,
    pub candidate_preferred: usize,
    pub control_preferred: usize,
    pub ties: usize,
    /// Candidate wins over decided (non-tie) comparisons; None before any.
    pub candidate_win_rate: Option<f64>,
    pub ci95: Option<Interval>,
}

/// A comparison's outcome from the candidate's side: Some(true) won, Some(false) lost, None tie
/// or undecided.
pub type Outcome = Option<bool>;

/// One comparison as the figures need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferred {
    /// The user who compared (comparisons of one user are not independent).
    pub unit: String,
    pub decided: bool,
    pub outcome: Outcome,
}

/// Summarise comparisons. The interval resamples users (`MIN_USERS` at least), as the arms'
/// differences do.
pub fn blind_figures(comparisons: &[Preferred]) -> BlindFigures {
    let mut by_user: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for c in comparisons {
        if let Some(won) = c.outcome {
            let e = by_user.entry(&c.unit).or_default();
            e.0 += f64::from(u8::from(won));
            e.1 += 1.0;
        }
    }
    let (won, decided) = by_user
        .values()
        .fold((0.0, 0.0), |(w, n), c| (w + c.0, n + c.1));
    let clusters: Vec<(f64, f64)> = by_user.into_values().collect();
    BlindFigures {
        comparisons: comparisons.len(),
        candidate_preferred: won as usize,
        control_preferred: (decided - won) as usize,
        ties: comparisons
            .iter()
            .filter(|c| c.decided && c.outcome.is_none())
            .count(),
        candidate_win_rate: (decided > 0.0).then(|| won / decided),
        ci95: (clusters.len() >= super::stats::MIN_USERS)
            .then(|| bootstrap_ratio(&clusters, 2000, 23)),
    }
}

impl AnswerLog {
    /// Record comparison `id` between two logged answers shown as A and B to `who`.
    pub fn record_comparison(
        &self,
        id: &str,
        experiment: i64,
        who: &Who,
        answer_a: &str,
        answer_b: &str,
    ) -> Result<(), LogError> {
        if !self.enabled() {
            return Err(Self::disabled());
        }
        let conn = self.write()?;
        let unit = self.unit_of(&conn, who)?;
        conn.execute(
            "INSERT INTO comparisons (id, experiment, unit, answer_a, answer_b, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, experiment, unit, answer_a, answer_b, now_ms()],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Store the user's pick on comparison `id` (replacing an earlier one).
    pub fn prefer(&self, id: &str, preference: Preference) -> Result<(), LogError> {
        if !self.enabled() {
            return Err(Self::disabled());
        }
        let conn = self.write()?;
        let changed = conn
            .execute(
                "UPDATE comparisons SET preferred = ?2, decided_at = ?3 WHERE id = ?1",
                params![id, preference.as_str(), now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        if changed == 0 {
            return Err(LogError::NotFound(format!("no comparison {id:?}")));
        }
        Ok(())
    }

    /// Each comparison of experiment `id`: its user, whether it was decided, and the outcome.
    pub fn preferences(&self, id: i64) -> Result<Vec<Preferred>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(
                "SELECT c.preferred, a.arm, c.unit FROM comparisons c
                 JOIN answers a ON a.id = c.answer_a WHERE c.experiment = ?1",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (preferred, arm_a, unit) = row.map_err(|e| self.sql(e))?;
            let a_is_candidate = arm_a.as_deref().and_then(Arm::parse) == Some(Arm::Candidate);
            let (decided, outcome) = match preferred.as_deref() {
                Some("a") => (true, Some(a_is_candidate)),
                Some("b") => (true, Some(!a_is_candidate)),
                Some(_) => (true, None),
                None => (false, None),
            };
            out.push(Preferred {
                unit,
                decided,
                outcome,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_win_rate_counts_decided_comparisons_only() {
        let c = |user: usize, decided, outcome| Preferred {
            unit: format!("u{user}"),
            decided,
            outcome,
        };
        let mut outcomes = vec![
            c(0, true, Some(true)),
            c(1, true, Some(true)),
            c(2, true, Some(false)),
            c(3, true, None),
            c(4, false, None),
        ];
        let f = blind_figures(&outcomes);
        assert_eq!(
            (
                f.comparisons,
                f.candidate_preferred,
                f.control_preferred,
                f.ties
            ),
            (5, 2, 1, 1)
        );
        assert!((f.candidate_win_rate.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert!(f.ci95.is_none(), "3 users decided: too few for an interval");
        outcomes.extend((5..10).map(|u| c(u, true, Some(true))));
        assert!(blind_figures(&outcomes).ci95.is_some());
        assert_eq!(blind_figures(&[]).candidate_win_rate, None);
    }
}
