//! The fusion of two ranked lists of chunk keys into one: reciprocal rank fusion or a weighted
//! sum of min-max normalised scores, with the collection's weights. Pure (property-tested).

use std::collections::HashMap;

use crate::config::{FusionConfig, FusionMethod};

/// A fused candidate before it is joined with its stored text.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// The chunk's key.
    pub key: u64,
    pub score: f32,
    pub bm25_score: Option<f32>,
    pub dense_score: Option<f32>,
}

/// Fuse two ranked lists of chunk keys (best first) into the top `k`.
pub fn fuse(bm25: &[(u64, f32)], dense: &[(u64, f32)], cfg: &FusionConfig, k: usize) -> Vec<Fused> {
    let mut by_id: HashMap<u64, Fused> = HashMap::with_capacity(bm25.len() + dense.len());
    let mut first_seen: Vec<u64> = Vec::with_capacity(bm25.len() + dense.len());
    for (list, weight, is_bm25) in [
        (bm25, cfg.bm25_weight, true),
        (dense, cfg.dense_weight, false),
    ] {
        let norm = Normaliser::new(list);
        for (rank, (id, raw)) in list.iter().enumerate() {
            let contribution = match cfg.method {
                FusionMethod::Rrf => weight / (cfg.rrf_k + rank as f32 + 1.0),
                FusionMethod::Weighted => weight * norm.apply(*raw),
            };
            let fused = by_id.entry(*id).or_insert_with(|| {
                first_seen.push(*id);
                Fused {
                    key: *id,
                    score: 0.0,
                    bm25_score: None,
                    dense_score: None,
                }
            });
            // A list may (in theory) repeat an id; only its best rank counts.
            let slot = if is_bm25 {
                &mut fused.bm25_score
            } else {
                &mut fused.dense_score
            };
            if slot.is_none() {
                *slot = Some(*raw);
                fused.score += contribution;
            }
        }
    }
    let mut out: Vec<Fused> = first_seen
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect();
    // Stable sort: ties keep BM25-then-dense first-seen order, so results are deterministic.
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out.truncate(k);
    out
}

/// Min-max normalisation of one list's scores to [0, 1] (a single score, or all equal, maps to 1).
struct Normaliser {
    min: f32,
    range: f32,
}

impl Normaliser {
    fn new(list: &[(u64, f32)]) -> Self {
        let min = list.iter().map(|(_, s)| *s).fold(f32::INFINITY, f32::min);
        let max = list
            .iter()
            .map(|(_, s)| *s)
            .fold(f32::NEG_INFINITY, f32::max);
        Normaliser {
            min,
            range: max - min,
        }
    }

    fn apply(&self, s: f32) -> f32 {
        if self.range > f32::EPSILON {
            (s - self.min) / self.range
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(method: FusionMethod, bm25_weight: f32, dense_weight: f32) -> FusionConfig {
        FusionConfig {
            method,
            rrf_k: 60.0,
            bm25_weight,
            dense_weight,
            candidates: 50,
        }
    }

    fn list(ids: &[u64]) -> Vec<(u64, f32)> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| (*id, 10.0 - i as f32))
            .collect()
    }

    #[test]
    fn rrf_rewards_agreement() {
        let fused = fuse(
            &list(&[A, B, C]),
            &list(&[C, B, D]),
            &cfg(FusionMethod::Rrf, 1.0, 1.0),
            10,
        );
        let ids: Vec<_> = fused.iter().map(|f| f.key).collect();
        // c (ranks 3 and 1) edges out b (2 and 2): 1/63 + 1/61 > 2/62.
        assert_eq!(ids, [C, B, A, D]);
        assert_eq!(fused[0].bm25_score, Some(8.0));
        assert_eq!(fused[0].dense_score, Some(10.0));
        assert_eq!(fused[3].bm25_score, None);
    }

    #[test]
    fn weighted_uses_normalised_scores() {
        let bm25 = vec![(A, 30.0), (B, 10.0)];
        let dense = vec![(B, 0.9), (A, 0.1)];
        let fused = fuse(&bm25, &dense, &cfg(FusionMethod::Weighted, 1.0, 2.0), 10);
        assert_eq!(fused[0].key, B);
        assert!((fused[0].score - 2.0).abs() < 1e-6);
        assert!((fused[1].score - 1.0).abs() < 1e-6);
    }

    const A: u64 = 10;
    const B: u64 = 11;
    const C: u64 = 12;
    const D: u64 = 13;

    fn ranked() -> impl Strategy<Value = Vec<(u64, f32)>> {
        proptest::collection::btree_set(0u32..60, 0..25).prop_flat_map(|ids| {
            let n = ids.len();
            (Just(ids), proptest::collection::vec(0.0f32..100.0, n)).prop_map(
                |(ids, mut scores)| {
                    scores.sort_by(|a, b| b.total_cmp(a));
                    ids.into_iter()
                        .map(u64::from)
                        .zip(scores)
                        .collect::<Vec<_>>()
                },
            )
        })
    }

    proptest! {
        #[test]
        fn fusion_properties(
            bm25 in ranked(),
            dense in ranked(),
            k in 1usize..40,
            weighted in any::<bool>(),
            wb in 0.0f32..3.0,
            wd in 0.01f32..3.0,
        ) {
            let method = if weighted { FusionMethod::Weighted } else { FusionMethod::Rrf };
            let fused = fuse(&bm25, &dense, &cfg(method, wb, wd), k);
            // At most k, no duplicates, every result came from an input list.
            let union: std::collections::HashSet<u64> =
                bm25.iter().chain(&dense).map(|(id, _)| *id).collect();
            prop_assert!(fused.len() <= k);
            prop_assert_eq!(fused.len(), union.len().min(k));
            let ids: std::collections::HashSet<u64> = fused.iter().map(|f| f.key).collect();
            prop_assert_eq!(ids.len(), fused.len());
            prop_assert!(ids.is_subset(&union));
            // Sorted by score, descending.
            prop_assert!(fused.windows(2).all(|w| w[0].score >= w[1].score));
            // Per-retriever scores are carried through unchanged.
            for f in &fused {
                let b = bm25.iter().find(|(id, _)| *id == f.key).map(|(_, s)| *s);
                let d = dense.iter().find(|(id, _)| *id == f.key).map(|(_, s)| *s);
                prop_assert_eq!(f.bm25_score, b);
                prop_assert_eq!(f.dense_score, d);
            }
        }

        #[test]
        fn rrf_with_one_retriever_keeps_its_order(bm25 in ranked(), k in 1usize..40) {
            let fused = fuse(&bm25, &[], &cfg(FusionMethod::Rrf, 1.0, 1.0), k);
            let got: Vec<u64> = fused.iter().map(|f| f.key).collect();
            let want: Vec<u64> = bm25.iter().take(k).map(|(id, _)| *id).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn rrf_is_symmetric_in_equal_weights(a in ranked(), b in ranked()) {
            let c = cfg(FusionMethod::Rrf, 1.0, 1.0);
            let x = fuse(&a, &b, &c, 100);
            let y = fuse(&b, &a, &c, 100);
            let sx: HashMap<_, _> = x.iter().map(|f| (f.key, f.score)).collect();
            for f in &y {
                prop_assert!((sx[&f.key] - f.score).abs() < 1e-6);
            }
        }

        #[test]
        fn top_of_both_lists_wins(rest_a in ranked(), rest_b in ranked(), weighted in any::<bool>()) {
            let method = if weighted { FusionMethod::Weighted } else { FusionMethod::Rrf };
            const WINNER: u64 = 1_000;
            let mut a = vec![(WINNER, 1000.0)];
            a.extend(rest_a);
            let mut b = vec![(WINNER, 1000.0)];
            b.extend(rest_b);
            let fused = fuse(&a, &b, &cfg(method, 1.0, 1.0), 5);
            prop_assert_eq!(fused[0].key, WINNER);
        }
    }
}
