//! Experiments: a candidate adapter gets a share of a collection's traffic beside the adapter in
//! service (the control), until someone promotes or rolls it back.
//!
//! Assignment is sticky: an answer's arm is a hash of the experiment's salt and the asker's unit
//! (user or session within its key, see `Who::unit`), so the same user sees the same arm for the
//! whole experiment, and a new experiment draws afresh. Only requests that leave the adapter to
//! the collection are assigned; a request naming an adapter (or the base model) bypasses the
//! experiment and is logged without an arm. One experiment runs per collection at a time; each
//! is kept with its decision after it stops.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AnswerLog, LogError, Who, now_ms};
use crate::rag::AdapterChoice;

/// The side of an experiment an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    /// The adapter in service when the experiment started.
    Control,
    Candidate,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Control => "control",
            Arm::Candidate => "candidate",
        }
    }

    pub fn parse(s: &str) -> Option<Arm> {
        match s {
            "control" => Some(Arm::Control),
            "candidate" => Some(Arm::Candidate),
            _ => None,
        }
    }
}

/// How an experiment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The candidate became the collection's adapter.
    Promote,
    /// The control stays.
    Rollback,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Promote => "promote",
            Decision::Rollback => "rollback",
        }
    }
}

/// An experiment, running or ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: i64,
    /// The adapter in service at the start (`None`: the base model).
    pub control: Option<String>,
    pub candidate: String,
    /// Share of units assigned to the candidate.
    pub share: f64,
    pub started_at: i64,
    pub stopped_at: Option<i64>,
    pub decision: Option<Decision>,
    #[serde(skip)]
    salt: String,
}

impl Experiment {
    /// The arm of `unit` (a user's stored identity, `Who::unit`): a fixed point in [0, 1) drawn
    /// from the experiment's salt and the unit.
    pub fn arm_of(&self, unit: &str) -> Arm {
        let digest = Sha256::new()
            .chain_update(self.salt.as_bytes())
            .chain_update([0])
            .chain_update(unit.as_bytes())
            .finalize();
        let draw = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        if (draw as f64 / 2f64.powi(64)) < self.share {
            Arm::Candidate
        } else {
            Arm::Control
        }
    }

    /// The adapter an arm answers with.
    pub fn adapter_of(&self, arm: Arm) -> Option<&str> {
        match arm {
            Arm::Control => self.control.as_deref(),
            Arm::Candidate => Some(&self.candidate),
        }
    }

    /// The arm's name in reports: its adapter, or `none` for the base model.
    pub fn arm_label(&self, arm: Arm) -> String {
        self.adapter_of(arm).unwrap_or("none").to_string()
    }
}

/// What serves one request: the adapter choice to make, and the arm when an experiment chose it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub choice: AdapterChoice,
    pub assigned: Option<(i64, Arm)>,
}

/// Refuse a share that is not strictly between 0 and 1.
pub fn check_share(share: f64) -> Result<(), LogError> {
    if share.is_finite() && share > 0.0 && share < 1.0 {
        Ok(())
    } else {
        Err(LogError::Invalid(format!(
            "share {share} must be between 0 and 1 (exclusive): the candidate's part of the traffic"
        )))
    }
}

const COLUMNS: &str = "id, control, candidate, share, salt, started_at, stopped_at, decision";

fn experiment_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Experiment> {
    Ok(Experiment {
        id: r.get(0)?,
        control: r.get(1)?,
        candidate: r.get(2)?,
        share: r.get(3)?,
        salt: r.get(4)?,
        started_at: r.get(5)?,
        stopped_at: r.get(6)?,
        decision: r
            .get::<_, Option<String>>(7)?
            .and_then(|d| match d.as_str() {
                "promote" => Some(Decision::Promote),
                "rollback" => Some(Decision::Rollback),
                _ => None,
            }),
    })
}

impl AnswerLog {
    /// The running experiment, if any.
    pub fn running_experiment(&self) -> Result<Option<Experiment>, LogError> {
        match self.connect(false)? {
            Some(conn) => self.running_on(&conn),
            None => Ok(None),
        }
    }

    /// The running experiment, read on `conn`.
    fn running_on(&self, conn: &rusqlite::Connection) -> Result<Option<Experiment>, LogError> {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM experiments WHERE stopped_at IS NULL"),
            [],
            experiment_of,
        )
        .optional()
        .map_err(|e| self.sql(e))
    }

    /// Every experiment, newest first.
    pub fn experiments(&self) -> Result<Vec<Experiment>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM experiments ORDER BY id DESC"
            ))
            .map_err(|e| self.sql(e))?;
        stmt.query_map([], experiment_of)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))
    }

    /// Start an experiment of `candidate` against `control` (the adapter in service). The caller
    /// has checked that the candidate is registered.
    pub fn start_experiment(
        &self,
        control: Option<String>,
        candidate: &str,
        share: f64,
    ) -> Result<Experiment, LogError> {
        check_share(share)?;
        if !self.enabled() {
            return Err(Self::disabled());
        }
        if control.as_deref() == Some(candidate) {
            return Err(LogError::Invalid(format!(
                "{candidate:?} already answers for this collection: the candidate must be another adapter"
            )));
        }
        let mut conn = self.write()?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let running: Option<i64> = tx
            .query_row(
                "SELECT id FROM experiments WHERE stopped_at IS NULL",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        if let Some(id) = running {
            return Err(LogError::Conflict(format!(
                "experiment {id} is running on this collection: stop it first (promote or roll back)"
            )));
        }
        let salt = uuid::Uuid::new_v4().simple().to_string();
        tx.execute(
            "INSERT INTO experiments (control, candidate, share, salt, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![control, candidate, share, salt, now_ms()],
        )
        .map_err(|e| self.sql(e))?;
        let id = tx.last_insert_rowid();
        let experiment = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM experiments WHERE id = ?1"),
                [id],
                experiment_of,
            )
            .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(experiment)
    }

    /// Stop the running experiment with `decision` recorded, in one statement that only an
    /// experiment still running matches (two stops at once: one wins, the other is told).
    pub fn stop_experiment(&self, decision: Decision) -> Result<Experiment, LogError> {
        let running = self.running_experiment()?.ok_or_else(no_experiment)?;
        let stopped_at = now_ms();
        let changed = self
            .write()?
            .execute(
                "UPDATE experiments SET stopped_at = ?2, decision = ?3
                 WHERE id = ?1 AND stopped_at IS NULL",
                params![running.id, stopped_at, decision.as_str()],
            )
            .map_err(|e| self.sql(e))?;
        if changed == 0 {
            return Err(LogError::Conflict(format!(
                "experiment {} was stopped meanwhile",
                running.id
            )));
        }
        Ok(Experiment {
            stopped_at: Some(stopped_at),
            decision: Some(decision),
            ..running
        })
    }

    /// Undo [`Self::stop_experiment`] of experiment `id` (its promotion could not be applied).
    fn resume_experiment(&self, id: i64) -> Result<(), LogError> {
        self.write()?
            .execute(
                "UPDATE experiments SET stopped_at = NULL, decision = NULL WHERE id = ?1",
                [id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The adapter choice for a request that made `choice`: an experiment assigns requests that
    /// leave the adapter to the collection.
    pub fn assign(&self, choice: AdapterChoice, who: &Who) -> Result<Assignment, LogError> {
        let unassigned = |choice| Assignment {
            choice,
            assigned: None,
        };
        if choice != AdapterChoice::Collection || !self.enabled() {
            return Ok(unassigned(choice));
        }
        let Some(conn) = self.connect(false)? else {
            return Ok(unassigned(choice));
        };
        let Some(experiment) = self.running_on(&conn)? else {
            return Ok(unassigned(choice));
        };
        let arm = experiment.arm_of(&self.unit_of(&conn, who)?);
        let choice = match experiment.adapter_of(arm) {
            Some(a) => AdapterChoice::Named(a.to_string()),
            None => AdapterChoice::Base,
        };
        Ok(Assignment {
            choice,
            assigned: Some((experiment.id, arm)),
        })
    }
}

/// Start an experiment on `log`'s collection: `candidate` (a registered adapter) gets `share` of
/// the traffic left to the collection, against `control`, the adapter in service
/// (`rag::adapter_in_service`).
pub fn start(
    log: &AnswerLog,
    registry: &crate::adapters::AdapterRegistry,
    control: Option<String>,
    candidate: &str,
    share: f64,
) -> Result<Experiment, LogError> {
    if !registry.contains(candidate) {
        return Err(LogError::NotFound(format!(
            "no adapter {candidate:?} is registered (see `domainrag adapters list`)"
        )));
    }
    log.start_experiment(control, candidate, share)
}

/// Stop the running experiment. The experiment is claimed first (so a concurrent stop or start
/// cannot interleave); promoting then makes the candidate the collection's adapter through
/// `set_adapter`, and if that fails the experiment runs on as before.
pub fn stop<E: std::fmt::Display>(
    log: &AnswerLog,
    decision: Decision,
    set_adapter: impl FnOnce(&str) -> Result<(), E>,
) -> Result<Experiment, LogError> {
    let stopped = log.stop_experiment(decision)?;
    if decision == Decision::Promote
        && let Err(e) = set_adapter(&stopped.candidate)
    {
        log.resume_experiment(stopped.id)?;
        return Err(LogError::Task(format!(
            "promoting {:?} failed: {e}",
            stopped.candidate
        )));
    }
    Ok(stopped)
}

/// The error for stopping or reading an experiment that is not there.
pub fn no_experiment() -> LogError {
    LogError::NotFound("no experiment is running on this collection".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(share: f64) -> Experiment {
        Experiment {
            id: 1,
            control: None,
            candidate: "b".into(),
            share,
            started_at: 0,
            stopped_at: None,
            decision: None,
            salt: "s".into(),
        }
    }

    fn who(user: usize) -> String {
        Who {
            key_id: "k".into(),
            user: Some(format!("user-{user}")),
        }
        .unit("salt")
    }

    #[test]
    fn assignment_is_sticky_and_splits_by_the_share() {
        for share in [0.2, 0.5] {
            let e = experiment(share);
            let n = 4000;
            let candidates = (0..n)
                .filter(|&u| e.arm_of(&who(u)) == Arm::Candidate)
                .count();
            // Binomial: 4 standard deviations around n * share.
            let sd = (n as f64 * share * (1.0 - share)).sqrt();
            assert!(
                (candidates as f64 - n as f64 * share).abs() < 4.0 * sd,
                "share {share}: {candidates} of {n}"
            );
            for u in 0..50 {
                assert_eq!(e.arm_of(&who(u)), e.arm_of(&who(u)));
            }
        }
        let other_salt = Experiment {
            salt: "t".into(),
            ..experiment(0.5)
        };
        let moved = (0..200)
            .filter(|&u| experiment(0.5).arm_of(&who(u)) != other_salt.arm_of(&who(u)))
            .count();
        assert!(
            moved > 50,
            "a new experiment draws afresh ({moved} of 200 moved)"
        );
    }

    #[test]
    fn shares_outside_zero_and_one_are_refused() {
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            assert!(check_share(bad).is_err(), "{bad}");
        }
        assert!(check_share(0.2).is_ok());
    }
}
