//! `collection tune`: a collection's BM25 and fusion settings chosen from questions with known
//! source documents (a team's QA pairs, or questions drafted from its own documents).
//!
//! The questions are split (seeded) into a tuning part and a held-out part. Each question's
//! candidate lists are fetched once: dense top [`DEPTH`] and BM25 top [`DEPTH`] for each title
//! weight of the grid; every fusion variant of the grid is then scored in memory on the tuning
//! part by nDCG@10 over documents (as `eval retrieval` scores). The best variant is applied only
//! when it also does at least as well as the current settings on the held-out part, on both
//! nDCG@10 and recall@5; otherwise the current settings stay. The report says how many variants
//! were tried and what each side scored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::collection::{Catalog, Collection, CollectionError};
use crate::config::{Bm25Config, FusionConfig, FusionMethod, SearchSettings};
use crate::embed::{EmbedError, Embedder};
use crate::error::ErrorKind;
use crate::eval::{Metrics, Question, mean, score_question};
use crate::retrieve::{RetrieveError, fuse};
use crate::rng::Rng;

/// Candidates fetched per retriever and question (the grid's largest `candidates`).
pub const DEPTH: usize = 100;
/// Chunks ranked per variant before documents are deduplicated (as `eval retrieval` does).
const RANKED: usize = 30;
/// Fewer questions than this cannot tell variants apart.
pub const MIN_QUESTIONS: usize = 20;

const TITLE_WEIGHTS: [f32; 5] = [0.0, 0.25, 0.5, 1.0, 2.0];
/// (bm25_weight, dense_weight) for the weighted sum of min-max normalised scores.
const WEIGHTED: [(f32, f32); 9] = [
    (1.0, 0.0),
    (4.0, 1.0),
    (2.0, 1.0),
    (1.5, 1.0),
    (1.0, 1.0),
    (0.75, 1.0),
    (0.5, 1.0),
    (0.25, 1.0),
    (0.0, 1.0),
];
const RRF_K: [f32; 4] = [10.0, 30.0, 60.0, 100.0];
const RRF_BM25_WEIGHT: [f32; 3] = [0.5, 1.0, 2.0];
const CANDIDATES: [usize; 3] = [20, 50, 100];

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(
        "tuning needs at least {MIN_QUESTIONS} questions with gold documents, got {0} \
         (give more QA pairs, or draft more with --synthetic)"
    )]
    TooFewQuestions(usize),
    #[error("--holdout must be between 0.1 and 0.9, got {0}")]
    InvalidHoldout(f64),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Collection(#[from] CollectionError),
    #[error(transparent)]
    Retrieve(#[from] RetrieveError),
}

impl TuneError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TuneError::TooFewQuestions(_) | TuneError::InvalidHoldout(_) => ErrorKind::InvalidInput,
            TuneError::Embed(e) => e.kind(),
            TuneError::Collection(e) => e.kind(),
            TuneError::Retrieve(e) => e.kind(),
        }
    }
}

/// What to tune on.
#[derive(Debug, Clone)]
pub struct TuneRequest {
    /// Questions with gold documents (others are left out).
    pub questions: Vec<Question>,
    /// Share of the questions held out to check the choice (0.1..=0.9).
    pub holdout: f64,
    pub seed: u64,
    /// Save the choice when it holds on the held-out part (false: report only).
    pub apply: bool,
}

/// One variant's settings and scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub settings: SearchSettings,
    pub tuning: Metrics,
    pub held_out: Metrics,
}

/// What `tune` did.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    pub collection: String,
    pub questions: usize,
    pub tuned_on: usize,
    pub held_out: usize,
    pub variants_tried: usize,
    /// What variants were ranked by on the tuning part.
    pub objective: &'static str,
    pub before: Scored,
    pub best: Scored,
    pub applied: bool,
    pub decision: String,
}

/// One question's candidate lists, chunk ids mapped to documents.
struct Candidates {
    /// BM25 top [`DEPTH`] per entry of the title-weight list.
    bm25: Vec<Vec<(String, f32)>>,
    dense: Vec<(String, f32)>,
    gold: Vec<String>,
}

/// Tune `collection`'s search settings on `req.questions` (see the module doc).
pub async fn tune(
    catalog: &Catalog,
    collection: &Collection,
    embedder: &Arc<Embedder>,
    req: TuneRequest,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<TuneReport, TuneError> {
    if !(0.1..=0.9).contains(&req.holdout) {
        return Err(TuneError::InvalidHoldout(req.holdout));
    }
    let mut questions: Vec<Question> = req
        .questions
        .into_iter()
        .filter(|q| !q.gold_doc_ids.is_empty())
        .collect();
    if questions.len() < MIN_QUESTIONS {
        return Err(TuneError::TooFewQuestions(questions.len()));
    }
    Rng::new(req.seed).shuffle(&mut questions);
    let held =
        ((questions.len() as f64 * req.holdout).round() as usize).clamp(1, questions.len() - 1);
    let current = collection.settings().search();
    let title_weights = title_weights(&current);
    let (lists, doc_of) =
        candidates(collection, embedder, &questions, &title_weights, progress).await?;
    let (held_out, tuning) = lists.split_at(held);
    let scorer = Scorer {
        title_weights: &title_weights,
        doc_of: &doc_of,
    };
    let variants = grid(&current);
    let best = variants
        .iter()
        .map(|v| (v, scorer.score(v, tuning)))
        // The first of equals wins: the current settings come first.
        .fold(
            None::<(&SearchSettings, Metrics)>,
            |acc, (v, m)| match acc {
                Some((_, ref best)) if best.ndcg_10 >= m.ndcg_10 => acc,
                _ => Some((v, m)),
            },
        )
        .map(|(v, m)| (*v, m))
        .expect("the grid holds the current settings");
    let scored = |settings: SearchSettings, tuning: Metrics| Scored {
        settings,
        held_out: scorer.score(&settings, held_out),
        tuning,
    };
    let before = scored(current, scorer.score(&current, tuning));
    let best = scored(best.0, best.1);
    let holds = best.held_out.ndcg_10 >= before.held_out.ndcg_10
        && best.held_out.recall_5 >= before.held_out.recall_5;
    let changed = best.settings != before.settings;
    let (applied, decision) = match (changed, holds, req.apply) {
        (false, _, _) => (false, "the current settings are the best found".to_string()),
        (true, false, _) => (
            false,
            "kept the current settings: the best on the tuning part did worse on the held-out part"
                .to_string(),
        ),
        (true, true, false) => (false, "not applied (report only)".to_string()),
        (true, true, true) => {
            collection.update_settings(catalog, |s| {
                s.bm25 = best.settings.bm25;
                s.fusion = best.settings.fusion;
            })?;
            (
                true,
                "applied: better on the tuning part, at least as good held out".to_string(),
            )
        }
    };
    Ok(TuneReport {
        collection: collection.name().to_string(),
        questions: questions.len(),
        tuned_on: tuning.len(),
        held_out: held_out.len(),
        variants_tried: variants.len(),
        objective: "ndcg@10",
        before,
        best,
        applied,
        decision,
    })
}

/// The report as a short table (Markdown).
pub fn table(r: &TuneReport) -> String {
    let mut out = format!(
        "collection {}: {} questions ({} tuned on, {} held out), {} variants tried, ranked by {}\n\
         | settings | | tuning R@5 | tuning nDCG@10 | held-out R@5 | held-out nDCG@10 |\n\
         |---|---|---|---|---|---|\n",
        r.collection, r.questions, r.tuned_on, r.held_out, r.variants_tried, r.objective
    );
    for (name, s) in [("before", &r.before), ("best", &r.best)] {
        out += &format!(
            "| {name} | {} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            s.settings,
            s.tuning.recall_5,
            s.tuning.ndcg_10,
            s.held_out.recall_5,
            s.held_out.ndcg_10
        );
    }
    out + &r.decision + "\n"
}

/// The grid's title weights, with the current one.
fn title_weights(current: &SearchSettings) -> Vec<f32> {
    let mut out = TITLE_WEIGHTS.to_vec();
    if !out.contains(&current.bm25.title_weight) {
        out.push(current.bm25.title_weight);
    }
    out
}

/// Every variant tried: the current settings first, then each title weight with each fusion.
fn grid(current: &SearchSettings) -> Vec<SearchSettings> {
    let mut fusions = Vec::new();
    for candidates in CANDIDATES {
        for (bm25_weight, dense_weight) in WEIGHTED {
            fusions.push(FusionConfig {
                method: FusionMethod::Weighted,
                rrf_k: current.fusion.rrf_k,
                bm25_weight,
                dense_weight,
                candidates,
            });
        }
        for rrf_k in RRF_K {
            for bm25_weight in RRF_BM25_WEIGHT {
                fusions.push(FusionConfig {
                    method: FusionMethod::Rrf,
                    rrf_k,
                    bm25_weight,
                    dense_weight: 1.0,
                    candidates,
                });
            }
        }
    }
    let mut out = vec![*current];
    for title_weight in TITLE_WEIGHTS {
        for fusion in &fusions {
            out.push(SearchSettings {
                bm25: Bm25Config { title_weight },
                fusion: *fusion,
            });
        }
    }
    out
}

/// Fetch every question's candidate lists and the documents of all chunks they name.
async fn candidates(
    collection: &Collection,
    embedder: &Arc<Embedder>,
    questions: &[Question],
    title_weights: &[f32],
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(Vec<Candidates>, HashMap<String, String>), TuneError> {
    let depth = DEPTH.max(collection.settings().fusion.candidates);
    let vectors = embedder
        .embed(questions.iter().map(|q| q.query.clone()).collect())
        .await?;
    let mut out = Vec::with_capacity(questions.len());
    for (q, v) in questions.iter().zip(vectors) {
        let dense = collection
            .vectors
            .search(v, depth)
            .await
            .map_err(CollectionError::from)?
            .into_iter()
            .map(|h| (h.chunk_id, h.score))
            .collect();
        let index = Arc::clone(&collection.index);
        let (query, weights) = (q.query.clone(), title_weights.to_vec());
        let bm25 = tokio::task::spawn_blocking(move || {
            weights
                .iter()
                .map(|&title_weight| index.search(&query, depth, &Bm25Config { title_weight }))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(RetrieveError::from)?
        .map_err(CollectionError::from)?;
        out.push(Candidates {
            bm25,
            dense,
            gold: q.gold_doc_ids.clone(),
        });
        progress(1);
    }
    let ids: Vec<String> = out
        .iter()
        .flat_map(|c| c.bm25.iter().flatten().chain(&c.dense))
        .map(|(id, _)| id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let index = Arc::clone(&collection.index);
    let records = tokio::task::spawn_blocking(move || index.get_chunks(&ids))
        .await
        .map_err(RetrieveError::from)?
        .map_err(CollectionError::from)?;
    let doc_of = records.into_iter().map(|(id, r)| (id, r.doc_id)).collect();
    Ok((out, doc_of))
}

/// Scores variants on candidate lists fetched once.
struct Scorer<'a> {
    title_weights: &'a [f32],
    doc_of: &'a HashMap<String, String>,
}

impl Scorer<'_> {
    /// Mean metrics of `settings` (hybrid search) over `questions`.
    fn score(&self, settings: &SearchSettings, questions: &[Candidates]) -> Metrics {
        let at = self
            .title_weights
            .iter()
            .position(|w| *w == settings.bm25.title_weight)
            .expect("candidates were fetched for every title weight of the grid");
        let per_question: Vec<Metrics> = questions
            .iter()
            .map(|c| {
                let n = settings.fusion.candidates;
                let bm25 = &c.bm25[at][..n.min(c.bm25[at].len())];
                let dense = &c.dense[..n.min(c.dense.len())];
                let mut seen = HashSet::new();
                let docs: Vec<String> = fuse(bm25, dense, &settings.fusion, RANKED)
                    .into_iter()
                    .filter_map(|f| self.doc_of.get(&f.chunk_id).cloned())
                    .filter(|d| seen.insert(d.clone()))
                    .collect();
                score_question(&docs, &c.gold)
            })
            .collect();
        mean(&per_question)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> SearchSettings {
        SearchSettings {
            bm25: Bm25Config { title_weight: 0.7 },
            fusion: FusionConfig {
                method: FusionMethod::Weighted,
                rrf_k: 60.0,
                bm25_weight: 1.0,
                dense_weight: 1.0,
                candidates: 50,
            },
        }
    }

    #[test]
    fn the_grid_starts_with_the_current_settings_and_every_variant_is_valid() {
        let grid = grid(&current());
        assert_eq!(grid[0], current());
        assert_eq!(
            grid.len(),
            1 + TITLE_WEIGHTS.len() * CANDIDATES.len() * (9 + 12)
        );
        for v in &grid {
            v.fusion.validate().expect("valid fusion");
            v.bm25.validate().expect("valid bm25");
        }
        let weights = title_weights(&current());
        assert!(weights.contains(&0.7), "the current weight is fetched too");
    }

    #[test]
    fn the_scorer_ranks_by_fused_documents() {
        let doc_of: HashMap<String, String> = [("c1", "d1"), ("c2", "d2"), ("c3", "d1")]
            .into_iter()
            .map(|(c, d)| (c.to_string(), d.to_string()))
            .collect();
        let list = |ids: &[&str]| -> Vec<(String, f32)> {
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.to_string(), 10.0 - i as f32))
                .collect()
        };
        // BM25 finds d2 first, dense finds d1 first.
        let c = Candidates {
            bm25: vec![list(&["c2", "c1"])],
            dense: list(&["c3", "c1", "c2"]),
            gold: vec!["d1".into()],
        };
        let scorer = Scorer {
            title_weights: &[0.7],
            doc_of: &doc_of,
        };
        let mut bm25_only = current();
        bm25_only.fusion.dense_weight = 0.0;
        assert_eq!(
            scorer.score(&bm25_only, std::slice::from_ref(&c)).recall_1,
            0.0
        );
        let mut dense_only = current();
        dense_only.fusion.bm25_weight = 0.0;
        let m = scorer.score(&dense_only, std::slice::from_ref(&c));
        assert_eq!(m.recall_1, 1.0);
        assert_eq!(m.ndcg_10, 1.0);
    }
}
