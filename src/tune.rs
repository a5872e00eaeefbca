//! `collection tune`: a collection's BM25 and fusion settings chosen from questions with known
//! source documents (a team's QA pairs, or questions drafted from its own documents).
//!
//! The questions are split (seeded) into a tuning part and a held-out part. Each question's
//! candidate lists are fetched once: dense top [`DEPTH`] and BM25 top [`DEPTH`] for each BM25
//! setting of the grid (title weight x window weight x pair weight x k1/b); every fusion variant of the grid is then scored in memory on the tuning
//! part by nDCG@10 over documents (as `eval retrieval` scores). The best variant is applied only
//! when the held-out part confirms it: its nDCG@10 gain over the current settings, paired by
//! question, has a 95% bootstrap interval above zero, and recall@5 does not fall. With thousands
//! of variants, the best on a few dozen questions is often best by luck (on questions drafted from
//! single sentences, lexical settings win that real questions do not want), and a held-out part
//! that merely did no worse let such choices through. The report says how many variants were
//! tried, what each side scored, and the held-out gain's interval.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::collection::{Catalog, Collection, CollectionError};
use crate::config::{Bm25Config, FusionConfig, FusionMethod, SearchSettings};
use crate::embed::{EmbedError, Embedder};
use crate::error::ErrorKind;
use crate::eval::stats::{Interval, bootstrap_ci};
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
const WINDOW_WEIGHTS: [f32; 3] = [0.0, 1.0, 2.0];
/// Word pairs off, and a new collection's weight (the best of nine on SQuAD dev and new_wiki).
const PAIR_WEIGHTS: [f32; 2] = [0.0, 0.75];
/// BM25's (k1, b): the default and two steps towards the best of 22 pairs on SQuAD dev and
/// new_wiki (which suits short passages better than long reviews).
const SATURATION: [(f32, f32); 3] = [(0.6, 1.0), (0.9, 0.9), (1.2, 0.75)];
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
    /// The best variant's nDCG@10 minus the current settings' on the held-out part, paired by
    /// question: a 95% bootstrap interval.
    pub held_out_gain: Interval,
    pub applied: bool,
    pub decision: String,
}

/// Resamples of the held-out gain's bootstrap, and their seed.
const RESAMPLES: usize = 2000;
const BOOTSTRAP_SEED: u64 = 7;

/// One question's candidate lists, chunk ids mapped to documents.
struct Candidates {
    /// BM25 top [`DEPTH`] per entry of the BM25 settings' list.
    bm25: Vec<Vec<(u64, f32)>>,
    dense: Vec<(u64, f32)>,
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
    let bm25_settings = bm25_settings(&current);
    let (lists, doc_of) =
        candidates(collection, embedder, &questions, &bm25_settings, progress).await?;
    let (held_out, tuning) = lists.split_at(held);
    let scorer = Scorer {
        bm25_settings: &bm25_settings,
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
    // Each side's held-out questions are scored once: their mean is reported, and the pairs
    // decide whether the change holds.
    let (held_before, held_best) = (
        scorer.per_question(&current, held_out),
        scorer.per_question(&best.0, held_out),
    );
    let (holds, held_out_gain) = confirmed(&held_before, &held_best);
    let before = Scored {
        settings: current,
        tuning: scorer.score(&current, tuning),
        held_out: mean(&held_before),
    };
    let best = Scored {
        settings: best.0,
        tuning: best.1,
        held_out: mean(&held_best),
    };
    let changed = best.settings != before.settings;
    let (applied, decision) = match (changed, holds, req.apply) {
        (false, _, _) => (false, "the current settings are the best found".to_string()),
        (true, false, _) => (
            false,
            format!(
                "kept the current settings: the held-out part did not confirm the best on the \
                 tuning part (nDCG@10 {:+.4}, 95% interval {:+.4}..{:+.4}; recall@5 {:+.4})",
                best.held_out.ndcg_10 - before.held_out.ndcg_10,
                held_out_gain.low,
                held_out_gain.high,
                best.held_out.recall_5 - before.held_out.recall_5
            ),
        ),
        (true, true, false) => (false, "not applied (report only)".to_string()),
        (true, true, true) => {
            collection.update_settings(catalog, |s| {
                s.bm25 = best.settings.bm25;
                s.fusion = best.settings.fusion;
            })?;
            (
                true,
                "applied: better on the tuning part, and on the held-out part with 95% confidence"
                    .to_string(),
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
        held_out_gain,
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
    out + &format!(
        "held-out nDCG@10 gain, paired: 95% interval {:+.4}..{:+.4}\n{}\n",
        r.held_out_gain.low, r.held_out_gain.high, r.decision
    )
}

/// Whether per-question metrics `best` (held out) confirm a change from `current`: nDCG@10's gain,
/// paired by question, with its 95% bootstrap interval above zero, and mean recall@5 not lower.
/// Returns the decision and that interval.
fn confirmed(current: &[Metrics], best: &[Metrics]) -> (bool, Interval) {
    let gains: Vec<f64> = best
        .iter()
        .zip(current)
        .map(|(b, c)| b.ndcg_10 - c.ndcg_10)
        .collect();
    let gain = bootstrap_ci(&gains, RESAMPLES, BOOTSTRAP_SEED);
    let recall_kept = mean(best).recall_5 >= mean(current).recall_5;
    (gain.low > 0.0 && recall_kept, gain)
}

/// The grid's BM25 settings: each title weight with each window weight, pair weight and (k1, b).
fn grid_bm25() -> Vec<Bm25Config> {
    let mut out = Vec::new();
    for title_weight in TITLE_WEIGHTS {
        for window_weight in WINDOW_WEIGHTS {
            for pair_weight in PAIR_WEIGHTS {
                for (k1, b) in SATURATION {
                    out.push(Bm25Config {
                        title_weight,
                        window_weight,
                        pair_weight,
                        k1,
                        b,
                    });
                }
            }
        }
    }
    out
}

/// The BM25 settings candidates are fetched for: the grid's, with the current ones.
fn bm25_settings(current: &SearchSettings) -> Vec<Bm25Config> {
    let mut out = grid_bm25();
    if !out.contains(&current.bm25) {
        out.push(current.bm25);
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
    for bm25 in grid_bm25() {
        for fusion in &fusions {
            out.push(SearchSettings {
                bm25,
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
    bm25_settings: &[Bm25Config],
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(Vec<Candidates>, HashMap<u64, String>), TuneError> {
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
            .map(|h| (h.key, h.score))
            .collect();
        let index = Arc::clone(&collection.index);
        let (query, settings) = (q.query.clone(), bm25_settings.to_vec());
        let bm25 = tokio::task::spawn_blocking(move || {
            settings
                .iter()
                .map(|bm25| index.search(&query, depth, bm25))
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
    let ids: Vec<u64> = out
        .iter()
        .flat_map(|c| c.bm25.iter().flatten().chain(&c.dense))
        .map(|(id, _)| *id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let index = Arc::clone(&collection.index);
    let records = tokio::task::spawn_blocking(move || index.chunks_by_key(&ids))
        .await
        .map_err(RetrieveError::from)?
        .map_err(CollectionError::from)?;
    let doc_of = records.into_iter().map(|(id, r)| (id, r.doc_id)).collect();
    Ok((out, doc_of))
}

/// Scores variants on candidate lists fetched once.
struct Scorer<'a> {
    bm25_settings: &'a [Bm25Config],
    doc_of: &'a HashMap<u64, String>,
}

impl Scorer<'_> {
    /// Mean metrics of `settings` (hybrid search) over `questions`.
    fn score(&self, settings: &SearchSettings, questions: &[Candidates]) -> Metrics {
        mean(&self.per_question(settings, questions))
    }

    /// Each question's metrics under `settings` (hybrid search).
    fn per_question(&self, settings: &SearchSettings, questions: &[Candidates]) -> Vec<Metrics> {
        let at = self
            .bm25_settings
            .iter()
            .position(|b| *b == settings.bm25)
            .expect("candidates were fetched for every BM25 setting of the grid");
        questions
            .iter()
            .map(|c| {
                let n = settings.fusion.candidates;
                let bm25 = &c.bm25[at][..n.min(c.bm25[at].len())];
                let dense = &c.dense[..n.min(c.dense.len())];
                let mut seen = HashSet::new();
                let docs: Vec<String> = fuse(bm25, dense, &settings.fusion, RANKED)
                    .into_iter()
                    .filter_map(|f| self.doc_of.get(&f.key).cloned())
                    .filter(|d| seen.insert(d.clone()))
                    .collect();
                score_question(&docs, &c.gold)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> SearchSettings {
        SearchSettings {
            bm25: Bm25Config {
                title_weight: 0.7,
                window_weight: 0.0,
                pair_weight: 0.0,
                k1: 1.2,
                b: 0.75,
            },
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
            1 + TITLE_WEIGHTS.len()
                * WINDOW_WEIGHTS.len()
                * PAIR_WEIGHTS.len()
                * SATURATION.len()
                * CANDIDATES.len()
                * (9 + 12)
        );
        for v in &grid {
            v.fusion.validate().expect("valid fusion");
            v.bm25.validate().expect("valid bm25");
        }
        let fetched = bm25_settings(&current());
        assert!(
            fetched.contains(&current().bm25),
            "the current BM25 settings are fetched too"
        );
        assert_eq!(
            fetched.len(),
            TITLE_WEIGHTS.len() * WINDOW_WEIGHTS.len() * PAIR_WEIGHTS.len() * SATURATION.len() + 1
        );
    }

    #[test]
    fn a_change_needs_a_held_out_gain_beyond_chance_and_no_recall_lost() {
        let m = |ndcg_10: f64| Metrics {
            ndcg_10,
            recall_5: 1.0,
            ..Metrics::default()
        };
        // `n` questions at 0.5, of which a change lifts `up` to 1 and drops `down` to 0.
        let change = |n: usize, up: usize, down: usize| {
            let current = vec![m(0.5); n];
            let mut changed = current.clone();
            changed[..up].iter_mut().for_each(|q| q.ndcg_10 = 1.0);
            changed[up..up + down]
                .iter_mut()
                .for_each(|q| q.ndcg_10 = 0.0);
            (current, changed)
        };
        // 40 questions, 3 up and 2 down: a mean gain of +0.0125, by chance.
        let (current, lucky) = change(40, 3, 2);
        let (holds, gain) = confirmed(&current, &lucky);
        assert!(!holds && gain.low < 0.0 && gain.high > 0.0, "{gain:?}");
        // 400 questions, 60 up and 10 down: confirmed.
        let (current, mut better) = change(400, 60, 10);
        let (holds, gain) = confirmed(&current, &better);
        assert!(holds && gain.low > 0.0, "{gain:?}");
        // The same gain with one question's recall@5 lost is not taken.
        better[100].recall_5 = 0.0;
        assert!(!confirmed(&current, &better).0);
    }

    #[test]
    fn the_scorer_ranks_by_fused_documents() {
        // Chunks 1 and 3 are of document d1, chunk 2 of d2.
        let doc_of: HashMap<u64, String> = [(1, "d1"), (2, "d2"), (3, "d1")]
            .into_iter()
            .map(|(c, d)| (c, d.to_string()))
            .collect();
        let list = |ids: &[u64]| -> Vec<(u64, f32)> {
            ids.iter()
                .enumerate()
                .map(|(i, id)| (*id, 10.0 - i as f32))
                .collect()
        };
        // BM25 finds d2 first, dense finds d1 first.
        let c = Candidates {
            bm25: vec![list(&[2, 1])],
            dense: list(&[3, 1, 2]),
            gold: vec!["d1".into()],
        };
        let scorer = Scorer {
            bm25_settings: &[current().bm25],
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
