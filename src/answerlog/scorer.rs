//! Online faithfulness: each logged answer is judged against its sources by the scorer `eval
//! answers` uses (`eval::answers::judge`), in one background task, after the answer has been
//! returned, so the asker never waits for it. The queue is bounded: under a burst the answers that
//! do not fit are left unscored (their faithfulness stays unknown) rather than piling up memory.

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
    pub skipped: Arc<AtomicU64>,
}

impl Scorer {
    /// Start the scoring task (none when `enabled` is false). Needs a Tokio runtime.
    pub fn start(embedder: Arc<Embedder>, enabled: bool) -> Scorer {
        let skipped = Arc::new(AtomicU64::new(0));
        if !enabled {
            return Scorer { tx: None, skipped };
        }
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let verdict =
                    crate::eval::answers::judge(&embedder, &job.question, &job.answer).await;
                let faithfulness = match verdict {
                    Ok(j) => j.faithfulness,
                    Err(e) => {
                        tracing::warn!(answer = %job.id, error = %e, "scoring an answer failed");
                        continue;
                    }
                };
                let (log, id) = (job.log, job.id);
                if let Err(e) = blocking(move || log.set_faithfulness(&id, faithfulness)).await {
                    tracing::warn!(error = %e, "storing an answer's faithfulness failed");
                }
            }
        });
        Scorer {
            tx: Some(tx),
            skipped,
        }
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
        if tx.try_send(job).is_err() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
