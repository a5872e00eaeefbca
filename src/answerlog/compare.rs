//! Blind comparisons: one question answered by both arms of the running experiment, shown side by
//! side as "A" and "B" in an order drawn per comparison, without saying which adapter wrote which;
//! the user picks the better one (or a tie). Both answers are logged (with their arm and the
//! comparison's id) but kept out of the arms' live figures, since the user saw both arms. The
//! experiment's report adds the candidate's win rate over decided comparisons, with a bootstrap
//! 95% interval that resamples comparisons.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{AnswerLog, Arm, LogError, Who, now_ms};
use crate::eval::answers::{Interval, bootstrap_ci};

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

/// Summarise outcomes (one per comparison; ties as `None` with `decided` true).
pub fn blind_figures(outcomes: &[(bool, Outcome)]) -> BlindFigures {
    let wins: Vec<f64> = outcomes
        .iter()
        .filter_map(|(_, o)| o.map(|w| f64::from(u8::from(w))))
        .collect();
    let won = wins.iter().filter(|w| **w > 0.0).count();
    BlindFigures {
        comparisons: outcomes.len(),
        candidate_preferred: won,
        control_preferred: wins.len() - won,
        ties: outcomes.iter().filter(|(d, o)| *d && o.is_none()).count(),
        candidate_win_rate: (!wins.is_empty()).then(|| won as f64 / wins.len() as f64),
        ci95: (wins.len() >= 2).then(|| bootstrap_ci(&wins, 2000, 23)),
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
        self.write()?
            .execute(
                "INSERT INTO comparisons (id, experiment, unit, answer_a, answer_b, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, experiment, who.unit(), answer_a, answer_b, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Store the user's pick on comparison `id` (replacing an earlier one).
    pub fn prefer(&self, id: &str, preference: Preference) -> Result<(), LogError> {
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

    /// Each comparison of experiment `id`: (decided, the candidate won / lost / tied or open).
    pub fn preferences(&self, id: i64) -> Result<Vec<(bool, Outcome)>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(
                "SELECT c.preferred, a.arm FROM comparisons c JOIN answers a ON a.id = c.answer_a
                 WHERE c.experiment = ?1",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (preferred, arm_a) = row.map_err(|e| self.sql(e))?;
            let a_is_candidate = arm_a.as_deref().and_then(Arm::parse) == Some(Arm::Candidate);
            out.push(match preferred.as_deref() {
                Some("a") => (true, Some(a_is_candidate)),
                Some("b") => (true, Some(!a_is_candidate)),
                Some(_) => (true, None),
                None => (false, None),
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
        let outcomes = [
            (true, Some(true)),
            (true, Some(true)),
            (true, Some(false)),
            (true, None),
            (false, None),
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
        assert!(f.ci95.is_some());
        assert_eq!(blind_figures(&[]).candidate_win_rate, None);
    }
}
