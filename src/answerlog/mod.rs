//! The answer log: every answer a collection gives, what its users thought of it, and the
//! experiments that route part of its traffic to a candidate adapter.
//!
//! One SQLite database per collection, `<collection dir>/answers.db` (WAL journal, `synchronous =
//! FULL`: a feedback call returns only after its row is on disk, so neither a SIGKILL nor a power
//! cut loses it). It lives in the collection's directory, so deleting the collection deletes its
//! log with it; deleting a document deletes every logged answer that was given from it (the
//! answer text may quote it), with that answer's sources and feedback. Answers older than
//! `answers.retention_days` are deleted as new ones are logged.
//!
//! What is stored per answer: id, time, question, the key and user as salted hashes (never the
//! key or the user name), the sources given (chunk id, document id, score: not their text), the
//! answer, the adapter that answered, the experiment arm, token counts, timings, whether it
//! abstained and how many sources it cited, and its faithfulness once the background scorer has
//! judged it. Connections are opened per call (a call is rare next to a generation), so the CLI
//! and a running server can share the file.
//!
//! `experiment` owns assignment of traffic to arms and the experiment records, `stats` the
//! per-arm figures and the difference between arms, `compare` blind side-by-side comparisons,
//! `scorer` the online faithfulness.

pub mod compare;
pub mod experiment;
pub mod scorer;
pub mod stats;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AnswersConfig;
use crate::error::ErrorKind;
use crate::rag::Answer;

pub use experiment::{Arm, Decision, Experiment};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("answer log {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("answer log task failed: {0}")]
    Task(String),
}

impl LogError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LogError::Sql { .. } | LogError::Task(_) => ErrorKind::Internal,
            LogError::NotFound(_) => ErrorKind::NotFound,
            LogError::Invalid(_) => ErrorKind::InvalidInput,
            LogError::Conflict(_) => ErrorKind::Conflict,
        }
    }
}

/// Who asked: the key and, when the client names one, its user or session (hashed before
/// storage). Experiments assign arms per `unit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub key_id: String,
    pub user: Option<String>,
}

impl Who {
    /// The stored, hashed identity of the key (`salt`: the log's secret, see `AnswerLog::salt`).
    pub fn key_hash(&self, salt: &str) -> String {
        short_hash(&[salt, "key", &self.key_id])
    }

    /// The stored, hashed identity experiments assign by: the user (or session) within its key,
    /// or the key alone when the client names no user.
    pub fn unit(&self, salt: &str) -> String {
        short_hash(&[
            salt,
            "user",
            &self.key_id,
            self.user.as_deref().unwrap_or(""),
        ])
    }
}

/// The first 16 hex digits of SHA-256 over `parts` (separated so that parts cannot run together).
/// With a secret first part this is a keyed hash: key ids are not secret, so without one a reader
/// of the log could hash every key id (and guessed user names) and match them.
pub(crate) fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// A new answer id: the collection's name, a dot, 32 hex digits (the name tells the feedback
/// route which log holds it).
pub fn new_answer_id(collection: &str) -> String {
    format!("{collection}.{}", uuid::Uuid::new_v4().simple())
}

/// The collection an answer id belongs to.
pub fn collection_of(answer_id: &str) -> Result<&str, LogError> {
    match answer_id.rsplit_once('.') {
        Some((c, id))
            if id.len() == 32
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && crate::collection::validate_name(c).is_ok() =>
        {
            Ok(c)
        }
        _ => Err(LogError::NotFound(format!("no answer {answer_id:?}"))),
    }
}

/// A thumbs up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rating {
    Up,
    Down,
}

/// What a user said about an answer. Sending feedback again replaces the fields it carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    #[serde(default)]
    pub rating: Option<Rating>,
    /// The answer the user would have wanted.
    #[serde(default)]
    pub correction: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// Longest correction or comment kept, in bytes.
pub const MAX_FEEDBACK_TEXT: usize = 16 * 1024;

impl Feedback {
    /// Refuse empty feedback and texts too long to keep.
    pub fn validate(&self) -> Result<(), LogError> {
        let blank = |t: &Option<String>| t.as_deref().is_none_or(|t| t.trim().is_empty());
        if self.rating.is_none() && blank(&self.correction) && blank(&self.comment) {
            return Err(LogError::Invalid(
                "feedback needs a `rating` (\"up\" or \"down\"), a `correction` or a `comment`"
                    .into(),
            ));
        }
        for (field, text) in [("correction", &self.correction), ("comment", &self.comment)] {
            if text.as_deref().is_some_and(|t| t.len() > MAX_FEEDBACK_TEXT) {
                return Err(LogError::Invalid(format!(
                    "`{field}` is longer than {MAX_FEEDBACK_TEXT} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// A source as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSource {
    pub n: usize,
    pub chunk_id: String,
    pub doc_id: String,
    pub score: f32,
}

/// One logged answer, as export and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedAnswer {
    pub id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub question: String,
    pub key: String,
    pub user: String,
    pub adapter: Option<String>,
    pub experiment: Option<i64>,
    pub arm: Option<Arm>,
    pub answer: String,
    pub sources: Vec<LoggedSource>,
    pub cited: usize,
    pub abstained: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: String,
    pub retrieve_ms: f64,
    pub first_token_ms: f64,
    pub total_ms: f64,
    pub faithfulness: Option<f64>,
    pub feedback: Option<Feedback>,
}

/// Where an answer came from, besides the answer itself.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub id: String,
    pub question: String,
    pub who: Who,
    /// The experiment and arm that chose the adapter, when one did.
    pub assigned: Option<(i64, Arm)>,
    /// The blind comparison this answer is one side of (`compare`).
    pub comparison: Option<String>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    question TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    unit TEXT NOT NULL,
    adapter TEXT,
    experiment INTEGER,
    arm TEXT,
    answer TEXT NOT NULL,
    cited INTEGER NOT NULL,
    abstained INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    retrieve_ms REAL NOT NULL,
    first_token_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    faithfulness REAL,
    scored INTEGER NOT NULL DEFAULT 0,
    comparison TEXT
);
CREATE INDEX IF NOT EXISTS answers_time ON answers(created_at);
CREATE INDEX IF NOT EXISTS answers_experiment ON answers(experiment, arm);
CREATE TABLE IF NOT EXISTS answer_sources (
    answer_id TEXT NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (answer_id, n)
);
CREATE INDEX IF NOT EXISTS answer_sources_doc ON answer_sources(doc_id);
CREATE TABLE IF NOT EXISTS feedback (
    answer_id TEXT PRIMARY KEY REFERENCES answers(id) ON DELETE CASCADE,
    rating INTEGER,
    correction TEXT,
    comment TEXT,
    key_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    experiment INTEGER NOT NULL,
    unit TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    preferred TEXT,
    decided_at INTEGER
);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    control TEXT,
    candidate TEXT NOT NULL,
    share REAL NOT NULL,
    salt TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    stopped_at INTEGER,
    decision TEXT
);
";

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// One collection's answer log.
#[derive(Debug, Clone)]
pub struct AnswerLog {
    path: PathBuf,
    retention_days: u64,
    /// `answers.enabled`: when off nothing is recorded and no experiment assigns.
    enabled: bool,
}

impl AnswerLog {
    /// The log of the collection stored in `collection_dir`.
    pub fn new(collection_dir: &Path, config: &AnswersConfig) -> AnswerLog {
        AnswerLog {
            path: collection_dir.join("answers.db"),
            retention_days: config.retention_days,
            enabled: config.enabled,
        }
    }

    /// Whether answers are logged (`answers.enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn disabled() -> LogError {
        LogError::Conflict(
            "the answer log is off (answers.enabled = false): no feedback or experiments".into(),
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> LogError {
        LogError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// A connection with the schema in place. Creates the file only when `create` (reads of a
    /// collection that never logged anything find nothing rather than creating a file).
    fn connect(&self, create: bool) -> Result<Option<Connection>, LogError> {
        if !create && !self.path.exists() {
            return Ok(None);
        }
        let conn = Connection::open(&self.path).map_err(|e| self.sql(e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| self.sql(e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(|e| self.sql(e))?;
        conn.execute_batch(SCHEMA).map_err(|e| self.sql(e))?;
        Ok(Some(conn))
    }

    fn write(&self) -> Result<Connection, LogError> {
        Ok(self.connect(true)?.expect("created"))
    }

    /// The log's secret salt for hashing keys and users, made once (random) with the file. It
    /// never leaves the database (export and the API do not show it).
    fn salt(&self, conn: &Connection) -> Result<String, LogError> {
        let read = || {
            conn.query_row("SELECT value FROM meta WHERE key = 'salt'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.sql(e))
        };
        // Read first: the asking path (experiment assignment) then takes no write lock.
        if let Some(salt) = read()? {
            return Ok(salt);
        }
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('salt', ?1)",
            [uuid::Uuid::new_v4().simple().to_string()],
        )
        .map_err(|e| self.sql(e))?;
        conn.query_row("SELECT value FROM meta WHERE key = 'salt'", [], |r| {
            r.get(0)
        })
        .map_err(|e| self.sql(e))
    }

    /// `who`'s unit as stored and assigned by (see [`Who::unit`]).
    pub(crate) fn unit_of(&self, conn: &Connection, who: &Who) -> Result<String, LogError> {
        Ok(who.unit(&self.salt(conn)?))
    }

    /// Log `answer` (one transaction: the answer and its sources), then delete answers past
    /// retention.
    pub fn record(&self, p: &Provenance, answer: &Answer) -> Result<(), LogError> {
        if !self.enabled {
            return Ok(());
        }
        let mut conn = self.write()?;
        let salt = self.salt(&conn)?;
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let (experiment, arm) = match p.assigned {
            Some((e, arm)) => (Some(e), Some(arm.as_str())),
            None => (None, None),
        };
        tx.execute(
            "INSERT INTO answers (id, created_at, question, key_hash, unit, adapter, experiment, arm,
                answer, cited, abstained, prompt_tokens, completion_tokens, finish_reason,
                retrieve_ms, first_token_ms, total_ms, comparison)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            params![
                p.id,
                now_ms(),
                p.question,
                p.who.key_hash(&salt),
                p.who.unit(&salt),
                answer.adapter,
                experiment,
                arm,
                answer.answer,
                answer.citations.len() as i64,
                crate::eval::answer_metrics::is_abstention(&answer.answer),
                answer.prompt_tokens as i64,
                answer.completion_tokens as i64,
                answer.finish_reason,
                answer.timings_ms.retrieve,
                answer.timings_ms.first_token,
                answer.timings_ms.total,
                p.comparison,
            ],
        )
        .map_err(|e| self.sql(e))?;
        for s in &answer.sources {
            tx.execute(
                "INSERT INTO answer_sources (answer_id, n, chunk_id, doc_id, score)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.id, s.n as i64, s.chunk_id, s.doc_id, f64::from(s.score)],
            )
            .map_err(|e| self.sql(e))?;
        }
        if self.retention_days > 0 {
            let cutoff = now_ms() - (self.retention_days as i64) * 86_400_000;
            tx.execute("DELETE FROM answers WHERE created_at < ?1", [cutoff])
                .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Store the background scorer's verdict on answer `id`.
    pub fn set_faithfulness(&self, id: &str, faithfulness: Option<f64>) -> Result<(), LogError> {
        // Never creates the file: the collection may have been deleted meanwhile.
        let Some(conn) = self.connect(false)? else {
            return Ok(());
        };
        conn.execute(
            "UPDATE answers SET faithfulness = ?2, scored = 1 WHERE id = ?1",
            params![id, faithfulness],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Store `feedback` on answer `id` from `who` (replacing earlier feedback on it).
    pub fn feedback(&self, id: &str, feedback: &Feedback, who: &Who) -> Result<(), LogError> {
        if !self.enabled {
            return Err(Self::disabled());
        }
        feedback.validate()?;
        let conn = self.write()?;
        let exists: Option<i64> = conn
            .query_row("SELECT 1 FROM answers WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))?;
        if exists.is_none() {
            return Err(LogError::NotFound(format!("no answer {id:?}")));
        }
        let rating = feedback.rating.map(|r| match r {
            Rating::Up => 1,
            Rating::Down => -1,
        });
        fn text(t: &Option<String>) -> Option<&str> {
            t.as_deref().map(str::trim).filter(|t| !t.is_empty())
        }
        let salt = self.salt(&conn)?;
        // What this call leaves out keeps its earlier value (a thumb after a correction keeps it).
        conn.execute(
            "INSERT INTO feedback (answer_id, rating, correction, comment, key_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(answer_id) DO UPDATE SET
                rating = COALESCE(excluded.rating, rating),
                correction = COALESCE(excluded.correction, correction),
                comment = COALESCE(excluded.comment, comment),
                key_hash = excluded.key_hash,
                created_at = excluded.created_at",
            params![
                id,
                rating,
                text(&feedback.correction),
                text(&feedback.comment),
                who.key_hash(&salt),
                now_ms()
            ],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// One logged answer.
    pub fn get(&self, id: &str) -> Result<LoggedAnswer, LogError> {
        let found = match self.connect(false)? {
            None => None,
            Some(conn) => self.select(&conn, "WHERE a.id = ?1", params![id])?.pop(),
        };
        found.ok_or_else(|| LogError::NotFound(format!("no answer {id:?}")))
    }

    /// Logged answers, newest first.
    pub fn list(&self, limit: usize, offset: usize) -> Result<Vec<LoggedAnswer>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        self.select(
            &conn,
            "ORDER BY a.created_at DESC, a.id LIMIT ?1 OFFSET ?2",
            params![limit as i64, offset as i64],
        )
    }

    /// Every logged answer with feedback matching `filter`, oldest first.
    pub fn with_feedback(&self, filter: FeedbackFilter) -> Result<Vec<LoggedAnswer>, LogError> {
        let Some(conn) = self.connect(false)? else {
            return Ok(Vec::new());
        };
        let clause = match filter {
            FeedbackFilter::Positive => "WHERE f.rating = 1",
            FeedbackFilter::Corrected => "WHERE f.correction IS NOT NULL",
            FeedbackFilter::Either => "WHERE f.rating = 1 OR f.correction IS NOT NULL",
        };
        self.select(&conn, &format!("{clause} ORDER BY a.created_at"), [])
    }

    /// Up to `limit` distinct logged questions, newest first, for replaying through other
    /// adapters (`eval answers --from-log`). A question's reference answer is its latest
    /// correction, else its latest answer rated up, else none (graded only on faithfulness,
    /// relevance and the like).
    pub fn replay_questions(&self, limit: usize) -> Result<Vec<crate::eval::Question>, LogError> {
        let mut out: Vec<crate::eval::Question> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let mut offset = 0;
        while out.len() < limit {
            let page = self.list(500, offset)?;
            offset += page.len();
            for a in &page {
                let key = crate::eval::answer_metrics::normalize(&a.question);
                let reference = a.feedback.as_ref().and_then(|f| {
                    f.correction
                        .clone()
                        .or_else(|| (f.rating == Some(Rating::Up)).then(|| a.answer.clone()))
                });
                match index.get(&key) {
                    Some(&i) => {
                        let q: &mut crate::eval::Question = &mut out[i];
                        if q.answers.is_empty()
                            && let Some(r) = reference
                        {
                            q.answers.push(r);
                        }
                    }
                    None if out.len() < limit => {
                        index.insert(key, out.len());
                        out.push(crate::eval::Question {
                            id: a.id.clone(),
                            query: a.question.clone(),
                            gold_doc_ids: Vec::new(),
                            answers: reference.into_iter().collect(),
                        });
                    }
                    None => {}
                }
            }
            if page.len() < 500 {
                break;
            }
        }
        Ok(out)
    }

    /// Every logged answer as one JSON line each (oldest first), handed to `line` one at a time
    /// (a consumer can stream them); returns how many. One read transaction: answers logged or
    /// deleted meanwhile neither shift nor repeat rows.
    pub fn export(
        &self,
        line: &mut dyn FnMut(String) -> Result<(), LogError>,
    ) -> Result<usize, LogError> {
        let Some(mut conn) = self.connect(false)? else {
            return Ok(0);
        };
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let (mut n, mut after) = (0, (i64::MIN, String::new()));
        loop {
            let page = self.select(
                &tx,
                "WHERE (a.created_at, a.id) > (?1, ?2) ORDER BY a.created_at, a.id LIMIT 500",
                params![after.0, after.1],
            )?;
            for a in &page {
                line(serde_json::to_string(a).expect("answers serialise"))?;
            }
            n += page.len();
            match page.last() {
                Some(last) if page.len() == 500 => after = (last.created_at, last.id.clone()),
                _ => return Ok(n),
            }
        }
    }

    /// Write [`Self::export`]'s lines to `out`.
    pub fn export_to(&self, out: &mut dyn std::io::Write) -> Result<usize, LogError> {
        self.export(&mut |l| {
            writeln!(out, "{l}").map_err(|e| LogError::Invalid(format!("export: {e}")))
        })
    }

    /// Delete every logged answer given from one of `doc_ids` (with its sources and feedback);
    /// returns how many.
    pub fn forget_documents(&self, doc_ids: &[String]) -> Result<usize, LogError> {
        let Some(mut conn) = self.connect(false)? else {
            return Ok(0);
        };
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let mut n = 0;
        for doc in doc_ids {
            n += tx
                .execute(
                    "DELETE FROM answers WHERE id IN
                     (SELECT answer_id FROM answer_sources WHERE doc_id = ?1)",
                    [doc],
                )
                .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(n)
    }

    fn select(
        &self,
        conn: &Connection,
        tail: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<LoggedAnswer>, LogError> {
        let sql = format!(
            "SELECT a.id, a.created_at, a.question, a.key_hash, a.unit, a.adapter, a.experiment,
                    a.arm, a.answer, a.cited, a.abstained, a.prompt_tokens, a.completion_tokens,
                    a.finish_reason, a.retrieve_ms, a.first_token_ms, a.total_ms, a.faithfulness,
                    f.answer_id, f.rating, f.correction, f.comment
             FROM answers a LEFT JOIN feedback f ON f.answer_id = a.id {tail}"
        );
        let mut stmt = conn.prepare(&sql).map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(args, |r| {
                let feedback = r.get::<_, Option<String>>(18)?.map(|_| {
                    Ok::<_, rusqlite::Error>(Feedback {
                        rating: match r.get::<_, Option<i64>>(19)? {
                            Some(1) => Some(Rating::Up),
                            Some(-1) => Some(Rating::Down),
                            _ => None,
                        },
                        correction: r.get(20)?,
                        comment: r.get(21)?,
                    })
                });
                Ok(LoggedAnswer {
                    id: r.get(0)?,
                    created_at: r.get(1)?,
                    question: r.get(2)?,
                    key: r.get(3)?,
                    user: r.get(4)?,
                    adapter: r.get(5)?,
                    experiment: r.get(6)?,
                    arm: r.get::<_, Option<String>>(7)?.and_then(|a| Arm::parse(&a)),
                    answer: r.get(8)?,
                    sources: Vec::new(),
                    cited: r.get::<_, i64>(9)? as usize,
                    abstained: r.get(10)?,
                    prompt_tokens: r.get::<_, i64>(11)? as usize,
                    completion_tokens: r.get::<_, i64>(12)? as usize,
                    finish_reason: r.get(13)?,
                    retrieve_ms: r.get(14)?,
                    first_token_ms: r.get(15)?,
                    total_ms: r.get(16)?,
                    faithfulness: r.get(17)?,
                    feedback: feedback.transpose()?,
                })
            })
            .map_err(|e| self.sql(e))?;
        let mut out: Vec<LoggedAnswer> = rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))?;
        let mut sources = conn
            .prepare(
                "SELECT n, chunk_id, doc_id, score FROM answer_sources WHERE answer_id = ?1 ORDER BY n",
            )
            .map_err(|e| self.sql(e))?;
        for a in &mut out {
            a.sources = sources
                .query_map([&a.id], |r| {
                    Ok(LoggedSource {
                        n: r.get::<_, i64>(0)? as usize,
                        chunk_id: r.get(1)?,
                        doc_id: r.get(2)?,
                        score: r.get::<_, f64>(3)? as f32,
                    })
                })
                .and_then(|rows| rows.collect())
                .map_err(|e| self.sql(e))?;
        }
        Ok(out)
    }
}

/// The collections that use adapter `name`: as their adapter, or in their running experiment
/// (as candidate or control). The one check before an adapter is removed (CLI and API).
pub fn users_of_adapter(
    catalog: &crate::collection::Catalog,
    config: &AnswersConfig,
    name: &str,
) -> Result<Vec<String>, LogError> {
    let names = catalog
        .list()
        .map_err(|e| LogError::Task(format!("listing collections: {e}")))?;
    let mut users = Vec::new();
    for c in names {
        if catalog.settings(&c).ok().and_then(|s| s.adapter).as_deref() == Some(name) {
            users.push(c.clone());
        }
        let running = AnswerLog::new(&catalog.dir_of(&c), config).running_experiment()?;
        if running.is_some_and(|e| e.candidate == name || e.control.as_deref() == Some(name)) {
            users.push(format!("{c} (its running experiment)"));
        }
    }
    Ok(users)
}

/// Which answers `triplets build --from-log` learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackFilter {
    /// Rated up: the answer as given.
    Positive,
    /// Corrected: the user's correction.
    Corrected,
    /// Both.
    Either,
}

/// Run `f` on the blocking pool (SQLite calls block on disk).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rag::{AdapterChoice, Citation, Source, Timings};

    fn config(retention_days: u64) -> AnswersConfig {
        AnswersConfig {
            enabled: true,
            retention_days,
            min_per_arm: 2,
            score_faithfulness: false,
        }
    }

    fn answer(doc: &str) -> Answer {
        let source = Source {
            n: 1,
            chunk_id: format!("chunk-of-{doc}"),
            doc_id: doc.into(),
            title: "T".into(),
            source: "s".into(),
            text: "text".into(),
            score: 0.5,
        };
        Answer {
            answer: "It is so [1].".into(),
            adapter: Some("a".into()),
            citations: vec![Citation {
                n: 1,
                chunk_id: source.chunk_id.clone(),
                doc_id: doc.into(),
                title: "T".into(),
                source: "s".into(),
            }],
            sources: vec![source],
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: "stop".into(),
            timings_ms: Timings {
                retrieve: 1.0,
                first_token: 2.0,
                total: 3.0,
            },
        }
    }

    fn provenance(question: &str) -> Provenance {
        Provenance {
            id: new_answer_id("docs"),
            question: question.into(),
            who: Who {
                key_id: "k1".into(),
                user: Some("alice@example.com".into()),
            },
            assigned: None,
            comparison: None,
        }
    }

    #[test]
    fn answers_and_feedback_persist_are_exported_and_go_with_their_documents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AnswerLog::new(dir.path(), &config(0));
        assert!(log.list(10, 0).expect("empty").is_empty());
        assert!(!log.path().exists(), "reading creates nothing");
        let (p1, p2) = (provenance("q1"), provenance("q2"));
        log.record(&p1, &answer("doc-a")).expect("record");
        log.record(&p2, &answer("doc-b")).expect("record");
        let up = Feedback {
            rating: Some(Rating::Up),
            correction: Some("  Better [1].  ".into()),
            comment: None,
        };
        log.feedback(&p1.id, &up, &p1.who).expect("feedback");
        assert_eq!(
            log.feedback("docs.0123", &up, &p1.who).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            log.feedback(&p1.id, &Feedback::default(), &p1.who)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );

        // A fresh handle (a restart) reads what was written.
        let reopened = AnswerLog::new(dir.path(), &config(0));
        let got = reopened.get(&p1.id).expect("get");
        assert_eq!(got.question, "q1");
        assert_eq!(got.cited, 1);
        assert_eq!(got.sources[0].doc_id, "doc-a");
        let fb = got.feedback.expect("feedback stored");
        assert_eq!(fb.rating, Some(Rating::Up));
        assert_eq!(fb.correction.as_deref(), Some("Better [1]."));
        // Hashed with the log's secret, never the key or user as given, nor their plain hash.
        assert_eq!(got.key.len(), 16);
        assert!(!got.user.contains("alice"));
        assert_ne!(got.key, short_hash(&["key", "k1"]));
        // A thumb later keeps the correction.
        let down = Feedback {
            rating: Some(Rating::Down),
            ..Feedback::default()
        };
        reopened.feedback(&p1.id, &down, &p1.who).expect("thumb");
        let fb = reopened.get(&p1.id).unwrap().feedback.unwrap();
        assert_eq!(fb.rating, Some(Rating::Down));
        assert_eq!(fb.correction.as_deref(), Some("Better [1]."));
        assert_eq!(
            reopened
                .with_feedback(FeedbackFilter::Corrected)
                .expect("liked")
                .len(),
            1
        );

        let mut out = Vec::new();
        assert_eq!(reopened.export_to(&mut out).expect("export"), 2);
        let lines: Vec<LoggedAnswer> = String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is an answer"))
            .collect();
        assert_eq!(lines[0].id, p1.id);

        assert_eq!(
            reopened
                .forget_documents(&["doc-a".into()])
                .expect("forget"),
            1
        );
        assert_eq!(
            reopened.get(&p1.id).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(reopened.list(10, 0).expect("list").len(), 1);
        assert!(
            reopened
                .with_feedback(FeedbackFilter::Either)
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn answers_past_retention_are_deleted_as_new_ones_arrive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AnswerLog::new(dir.path(), &config(30));
        let old = provenance("old");
        log.record(&old, &answer("d")).expect("record");
        let conn = Connection::open(log.path()).expect("open");
        conn.execute(
            "UPDATE answers SET created_at = ?1 WHERE id = ?2",
            params![now_ms() - 31 * 86_400_000, old.id],
        )
        .expect("age it");
        log.record(&provenance("new"), &answer("d"))
            .expect("record");
        let left: Vec<String> = log
            .list(10, 0)
            .expect("list")
            .into_iter()
            .map(|a| a.question)
            .collect();
        assert_eq!(left, ["new"]);
    }

    #[test]
    fn answer_ids_name_their_collection() {
        let id = new_answer_id("support-team");
        assert_eq!(collection_of(&id).expect("valid"), "support-team");
        for bad in [
            "",
            "x",
            "support.123",
            "Bad Name.0123456789abcdef0123456789abcdef",
            "../x.0123456789abcdef0123456789abcdef",
        ] {
            assert!(collection_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn experiments_assign_only_what_the_collection_decides_and_stop_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AnswerLog::new(dir.path(), &config(0));
        let who = provenance("q").who;
        let a = log.assign(AdapterChoice::Collection, &who).expect("assign");
        assert_eq!(a.assigned, None);
        let e = log
            .start_experiment(Some("a".into()), "b", 0.5)
            .expect("start");
        assert_eq!(
            log.start_experiment(None, "c", 0.5).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            AnswerLog::new(tempfile::tempdir().unwrap().path(), &config(0))
                .start_experiment(Some("b".into()), "b", 0.5)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
        let a = log.assign(AdapterChoice::Collection, &who).expect("assign");
        let (id, arm) = a.assigned.expect("assigned");
        assert_eq!(id, e.id);
        let expected = match arm {
            Arm::Candidate => AdapterChoice::Named("b".into()),
            Arm::Control => AdapterChoice::Named("a".into()),
        };
        assert_eq!(a.choice, expected);
        // An explicit choice bypasses the experiment.
        let b = log.assign(AdapterChoice::Base, &who).expect("assign");
        assert_eq!((b.choice, b.assigned), (AdapterChoice::Base, None));

        let stopped = experiment::stop(&log, Decision::Promote, |c| {
            assert_eq!(c, "b");
            Ok::<(), String>(())
        })
        .expect("stop");
        assert_eq!(stopped.decision, Some(Decision::Promote));
        assert_eq!(
            log.stop_experiment(Decision::Rollback).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let all = log.experiments().expect("list");
        assert_eq!(all[0].decision, Some(Decision::Promote));
        assert!(all[0].stopped_at.is_some());
    }
}
