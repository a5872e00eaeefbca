//! Background jobs as the server runs them (ingest, synthesis, training, evaluation): ids, the
//! state machine (queued -> running -> done | failed | cancelled), progress, cancellation, a
//! result value and a directory for the files a job writes. Knows nothing of what a job does:
//! `http` starts the work and reports into a [`Job`] handle.
//!
//! The registry keeps the newest `max_kept` finished jobs (and every unfinished one) so a
//! long-running server's job list stays bounded; a forgotten job's files are removed with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Ingest,
    Synth,
    Train,
    Eval,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn finished(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Progress in the job's own unit (files, triplets, steps, answers).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobProgress {
    pub done: u64,
    pub total: u64,
    pub unit: String,
    /// The latest status line (e.g. "epoch 1 loss 0.41 120 tok/s").
    pub message: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub kind: JobKind,
    pub collection: String,
    pub status: JobStatus,
    pub progress: JobProgress,
    /// Unix seconds.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Set when `status` is `failed` (a message for the user).
    pub error: Option<String>,
    /// What the job produced (kind-specific JSON), when done (or cancelled with partial results).
    pub result: Option<serde_json::Value>,
    /// Files the job wrote, downloadable at `/api/jobs/{id}/files/{name}`.
    pub files: Vec<String>,
    /// Whether `POST /api/jobs/{id}/cancel` can stop it.
    pub cancellable: bool,
    /// Order of finishing (which finished jobs are the oldest).
    #[serde(skip)]
    finish_order: u64,
    #[serde(skip)]
    created_order: u64,
}

/// Creation and finishing order across all jobs of the process.
static ORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_order() -> u64 {
    ORDER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

/// Errors of the job registry.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0}")]
    NotFound(String),
    #[error("job {id} is {status:?} already; only queued or running jobs can be cancelled")]
    Finished { id: String, status: JobStatus },
    #[error("{0} jobs cannot be cancelled")]
    NotCancellable(&'static str),
    #[error("job {id} has no file {name:?}")]
    NoFile { id: String, name: String },
    #[error("job directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JobError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            JobError::NotFound(_) | JobError::NoFile { .. } => ErrorKind::NotFound,
            JobError::Finished { .. } | JobError::NotCancellable(_) => ErrorKind::Conflict,
            JobError::Io { .. } => ErrorKind::Internal,
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The handle the work holds: report progress, watch for cancellation, finish.
#[derive(Debug, Clone)]
pub struct Job {
    view: Arc<Mutex<JobView>>,
    cancel: tokio::sync::watch::Sender<bool>,
    dir: PathBuf,
}

impl Job {
    pub fn id(&self) -> String {
        self.with(|v| v.id.clone())
    }

    /// The directory this job's files go in (created on first use).
    pub fn dir(&self) -> Result<&Path, JobError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| JobError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Ok(&self.dir)
    }

    /// Record that the job wrote `name` in its directory.
    pub fn add_file(&self, name: &str) {
        self.with(|v| {
            if !v.files.iter().any(|f| f == name) {
                v.files.push(name.to_string());
            }
        });
    }

    pub fn view(&self) -> JobView {
        self.with(|v| v.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut JobView) -> T) -> T {
        f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Running, with `total` units of work.
    pub fn start(&self, total: u64) {
        self.with(|v| {
            v.status = JobStatus::Running;
            v.started_at.get_or_insert_with(now);
            v.progress.total = total;
        });
    }

    pub fn set_total(&self, total: u64) {
        self.with(|v| v.progress.total = total);
    }

    pub fn advance(&self, n: u64) {
        self.with(|v| v.progress.done += n);
    }

    pub fn set_done(&self, done: u64, message: String) {
        self.with(|v| {
            v.progress.done = done;
            v.progress.message = message;
        });
    }

    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        self.with(|v| v.progress.message = message);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves once the job is cancelled (never, otherwise).
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Done with `result`.
    pub fn succeed(&self, result: serde_json::Value) {
        self.end(JobStatus::Done, Some(result), None);
    }

    /// Failed with a message for the user.
    pub fn fail(&self, error: String) {
        self.end(JobStatus::Failed, None, Some(error));
    }

    /// Stopped on request, with whatever partial result there is.
    pub fn end_cancelled(&self, result: Option<serde_json::Value>) {
        self.end(JobStatus::Cancelled, result, None);
    }

    fn end(&self, status: JobStatus, result: Option<serde_json::Value>, error: Option<String>) {
        self.with(|v| {
            v.status = status;
            v.result = result;
            v.error = error;
            v.finished_at = Some(now());
            v.finish_order = next_order();
            v.cancellable = false;
        });
        self.save();
    }

    /// Keep the job's view as `job.json` in its directory, so a restarted server still lists it
    /// (best effort: a job that cannot be saved still runs).
    fn save(&self) {
        let view = self.view();
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(".job.json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec_pretty(&view).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, self.dir.join("job.json"))
        };
        if let Err(e) = write() {
            tracing::warn!(job = %view.id, error = %e, "could not save the job's state");
        }
    }
}

/// Jobs by id, bounded history.
#[derive(Debug)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Job>>,
    root: PathBuf,
    max_kept: usize,
}

impl Jobs {
    /// Jobs whose files live under `root/<id>/`; at most `max_kept` finished jobs are remembered.
    /// Jobs saved by an earlier run are listed again; one that was unfinished when that run
    /// stopped is marked failed.
    pub fn new(root: PathBuf, max_kept: usize) -> Jobs {
        let mut map = HashMap::new();
        let mut saved = load_saved(&root);
        saved.sort_by_key(|v| (v.created_at, v.finished_at));
        for mut view in saved {
            view.created_order = next_order();
            view.finish_order = next_order();
            let dir = root.join(&view.id);
            let interrupted = !view.status.finished();
            if interrupted {
                view.status = JobStatus::Failed;
                view.error = Some("the server stopped while this job was running".into());
                view.finished_at = Some(now());
                view.cancellable = false;
            }
            let job = Job {
                view: Arc::new(Mutex::new(view)),
                cancel: tokio::sync::watch::channel(false).0,
                dir,
            };
            if interrupted {
                job.save();
            }
            map.insert(job.id(), job);
        }
        let jobs = Jobs {
            jobs: Mutex::new(map),
            root,
            max_kept,
        };
        jobs.forget_oldest(&mut jobs.map());
        jobs
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new queued job.
    pub fn create(&self, kind: JobKind, collection: &str, cancellable: bool) -> Job {
        let id = uuid::Uuid::new_v4().to_string();
        let job = Job {
            view: Arc::new(Mutex::new(JobView {
                id: id.clone(),
                kind,
                collection: collection.to_string(),
                status: JobStatus::Queued,
                progress: JobProgress {
                    unit: unit(kind).to_string(),
                    ..JobProgress::default()
                },
                created_at: now(),
                started_at: None,
                finished_at: None,
                error: None,
                result: None,
                files: Vec::new(),
                cancellable,
                finish_order: 0,
                created_order: next_order(),
            })),
            cancel: tokio::sync::watch::channel(false).0,
            dir: self.root.join(&id),
        };
        job.save();
        let mut map = self.map();
        map.insert(id, job.clone());
        self.forget_oldest(&mut map);
        job
    }

    /// Drop the oldest finished jobs (and their files) beyond `max_kept`.
    fn forget_oldest(&self, map: &mut HashMap<String, Job>) {
        let mut finished: Vec<(u64, String)> = map
            .iter()
            .filter_map(|(id, j)| {
                j.with(|v| v.status.finished().then_some((v.finish_order, id.clone())))
            })
            .collect();
        if finished.len() <= self.max_kept {
            return;
        }
        finished.sort();
        let excess = finished.len() - self.max_kept;
        for (_, id) in finished.into_iter().take(excess) {
            if let Some(job) = map.remove(&id)
                && job.dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&job.dir)
            {
                tracing::warn!(job = %id, error = %e, "could not remove an old job's files");
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Job, JobError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Newest first; only `collection`'s when given.
    pub fn list(&self, collection: Option<&str>) -> Vec<JobView> {
        let mut map = self.map();
        self.forget_oldest(&mut map);
        let mut out: Vec<JobView> = map
            .values()
            .map(Job::view)
            .filter(|v| collection.is_none_or(|c| v.collection == c))
            .collect();
        out.sort_by_key(|v| std::cmp::Reverse(v.created_order));
        out
    }

    /// Ask job `id` to stop; its work notices at its next check and ends it as cancelled.
    pub fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        let job = self.get(id)?;
        let view = job.view();
        if view.status.finished() {
            return Err(JobError::Finished {
                id: id.to_string(),
                status: view.status,
            });
        }
        if !view.cancellable {
            return Err(JobError::NotCancellable(kind_name(view.kind)));
        }
        job.cancel.send_replace(true);
        job.set_message("cancelling");
        Ok(job.view())
    }

    /// The path of a file job `id` wrote (only names the job recorded).
    pub fn file(&self, id: &str, name: &str) -> Result<PathBuf, JobError> {
        let job = self.get(id)?;
        if !job.view().files.iter().any(|f| f == name) {
            return Err(JobError::NoFile {
                id: id.to_string(),
                name: name.to_string(),
            });
        }
        Ok(job.dir.join(name))
    }

    /// Jobs queued or running.
    pub fn running(&self) -> usize {
        self.map()
            .values()
            .filter(|j| !j.with(|v| v.status.finished()))
            .count()
    }
}

/// The views saved under `root/*/job.json` (unreadable ones are skipped with a warning).
fn load_saved(root: &Path) -> Vec<JobView> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join("job.json");
        if !path.is_file() {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<JobView>(&b).map_err(|e| e.to_string()))
        {
            Ok(view) if entry.file_name().to_str() == Some(view.id.as_str()) => out.push(view),
            Ok(_) => tracing::warn!(path = %path.display(), "job file names another job; skipped"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable job file; skipped")
            }
        }
    }
    out
}

fn unit(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Ingest => "files",
        JobKind::Synth => "triplets",
        JobKind::Train => "steps",
        JobKind::Eval => "answers",
    }
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Ingest => "ingest",
        JobKind::Synth => "synth",
        JobKind::Train => "train",
        JobKind::Eval => "eval",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_the_work_and_ends_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(dir.path().to_path_buf(), 10);
        let job = jobs.create(JobKind::Eval, "c", true);
        job.start(3);
        let waiter = {
            let job = job.clone();
            tokio::spawn(async move { job.cancelled().await })
        };
        assert!(!job.is_cancelled());
        jobs.cancel(&job.id()).unwrap();
        waiter.await.unwrap();
        assert!(job.is_cancelled());
        job.end_cancelled(None);
        let again = jobs.cancel(&job.id()).unwrap_err();
        assert_eq!(again.kind(), ErrorKind::Conflict, "{again}");
        assert_eq!(jobs.cancel("nope").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_restarted_registry_lists_saved_jobs_and_fails_unfinished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (done, running) = {
            let jobs = Jobs::new(dir.path().to_path_buf(), 10);
            let done = jobs.create(JobKind::Synth, "c", true);
            done.succeed(serde_json::json!({"kept": 3}));
            let running = jobs.create(JobKind::Train, "c", true);
            running.start(10);
            (done.id(), running.id())
        };
        let jobs = Jobs::new(dir.path().to_path_buf(), 10);
        let done = jobs.get(&done).unwrap().view();
        assert_eq!(done.status, JobStatus::Done);
        assert_eq!(done.result, Some(serde_json::json!({"kept": 3})));
        let running = jobs.get(&running).unwrap().view();
        assert_eq!(running.status, JobStatus::Failed);
        assert!(running.error.unwrap().contains("server stopped"));
    }

    #[test]
    fn ingest_jobs_refuse_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(dir.path().to_path_buf(), 10);
        let job = jobs.create(JobKind::Ingest, "c", false);
        let e = jobs.cancel(&job.id()).unwrap_err();
        assert!(e.to_string().contains("ingest"), "{e}");
    }

    #[test]
    fn history_is_bounded_and_old_files_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(dir.path().to_path_buf(), 2);
        let first = jobs.create(JobKind::Synth, "c", true);
        std::fs::write(first.dir().unwrap().join("t.jsonl"), "x").unwrap();
        first.add_file("t.jsonl");
        assert!(jobs.file(&first.id(), "t.jsonl").unwrap().is_file());
        assert!(jobs.file(&first.id(), "../etc").is_err());
        first.succeed(serde_json::json!({}));
        let running = jobs.create(JobKind::Train, "c", true);
        for _ in 0..3 {
            jobs.create(JobKind::Eval, "d", true)
                .succeed(serde_json::json!({}));
        }
        // The running job stays; of the finished ones only the newest two remain.
        assert!(jobs.get(&running.id()).is_ok());
        assert!(jobs.get(&first.id()).is_err());
        assert!(!dir.path().join(first.id()).exists());
        assert_eq!(jobs.list(None).len(), 3);
        assert_eq!(jobs.list(Some("c")).len(), 1);
        assert_eq!(jobs.running(), 1);
    }
}
