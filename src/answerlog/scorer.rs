//! Online faithfulness: each logged answer is judged against its sources by the scorer `eval
//! answers` uses (`eval::answers::judge`), in one background task, after the answer has been
//! returned, so the asker never waits for it. The queue is bounded: under a burst the answers that
//! do not fit are left unscored (their faithfulness stays unknown) rather than piling up memory.
//! `pending` counts the answers queued or being scored, for `/metrics` (and for a soak that reads
//! memory only while the scorer is idle).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::{AnswerLog, blocking};
use crate::embed::Embedder;
use crate::rag::Answer;

/// Answers waiting to be scored, at most.
const QUEUE: usize = 256;

struct Job {
    log: AnswerLog,
    id: String,
    question: String,
    answer: Answer,
}

/// The background scorer's handle.
#[derive(Debug)]
pub struct Scorer {
    tx: Option<mpsc::Sender<Job>>,
    /// Answers left unscored because the queue was full.
    skipped: Arc<AtomicU64>,
    /// Answers queued or being scored now.
    pending: Arc<AtomicU64>,
}

impl Scorer {
    /// Start the scoring task (none when `enabled` is false). Needs a Tokio runtime.
    pub fn start(embedder: Arc<Embedder>, enabled: bool) -> Scorer {
        let skipped = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        if !enabled {
            return Scorer {
                tx: None,
                skipped,
                pending,
            };
        }
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let in_task = pending.clone();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                score(&embedder, job).await;
                in_task.fetch_sub(1, Ordering::Relaxed);
            }
        });
        Scorer {
            tx: Some(tx),
            skipped,
            pending,
        }
    }

    /// Answers left unscored so far because the queue was full.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Answers queued or being scored now.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queue answer `id` for scoring (skipped when the queue is full or scoring is off).
    pub fn submit(&self, log: AnswerLog, id: String, question: String, answer: Answer) {
        let Some(tx) = &self.tx else { return };
        let job = Job {
            log,
            id,
            question,
            answer,
        };
        // Counted before the send, so that the task's decrement can never run first.
        self.pending.fetch_add(1, Ordering::Relaxed);
        if tx.try_send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Judge one answer and store its faithfulness (failures are logged, the answer stays unscored).
async fn score(embedder: &Arc<Embedder>, job: Job) {
    let faithfulness = match crate::eval::answers::judge(embedder, &job.question, &job.answer).await
    {
        Ok(j) => j.faithfulness,
        Err(e) => {
            tracing::warn!(answer = %job.id, error = %e, "scoring an answer failed");
            return;
        }
    };
    let (log, id) = (job.log, job.id);
    if let Err(e) = blocking(move || log.set_faithfulness(&id, faithfulness)).await {
        tracing::warn!(error = %e, "storing an answer's faithfulness failed");
    }
}
