//! The statistics of evaluation reports: means, medians and percentile bootstrap 95% intervals
//! (of a mean, of a ratio over clusters, of a difference between two groups), deterministic for a
//! seed so a report can be reproduced. `eval::answers` summarises arms with them; the answer log's
//! experiments and comparisons (`answerlog::stats`, `answerlog::compare`) too.

use serde::Serialize;

/// A mean with its bootstrap 95% interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// Deterministic xorshift for the bootstrap (reproducible reports, no RNG dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The mean of the values that are there; None when none is.
pub(crate) fn mean_of_some(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = xs.flatten().collect();
    (!present.is_empty()).then(|| mean(&present))
}

/// The median (0 for none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len().is_multiple_of(2) {
        (xs[mid - 1] + xs[mid]) / 2.0
    } else {
        xs[mid]
    }
}

/// Percentile bootstrap 95% interval of the mean of `xs` (`resamples` resamples, fixed seed).
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> Interval {
    if xs.is_empty() {
        return Interval {
            low: 0.0,
            high: 0.0,
        };
    }
    let mut rng = XorShift(seed | 1);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let sum: f64 = (0..xs.len())
                .map(|_| xs[(rng.next() % xs.len() as u64) as usize])
                .sum();
            sum / xs.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Interval {
        low: at(0.025),
        high: at(0.975),
    }
}

/// Percentile bootstrap 95% interval of `ratio(b) - ratio(a)` for two independent groups of
/// clusters, each cluster a `(sum, count)` and a group's ratio `Σ sum / Σ count`. Clusters (users,
/// whose answers are not independent of each other) are resampled whole, within each group.
pub fn bootstrap_difference(
    a: &[(f64, f64)],
    b: &[(f64, f64)],
    resamples: usize,
    seed: u64,
) -> Interval {
    let mut rng = XorShift(seed | 1);
    if a.is_empty() || b.is_empty() {
        return Interval {
            low: 0.0,
            high: 0.0,
        };
    }
    percentile_interval(
        (0..resamples)
            .map(|_| -draw_ratio(a, &mut rng) + draw_ratio(b, &mut rng))
            .collect(),
    )
}

/// Percentile bootstrap 95% interval of `Σ sum / Σ count` over clusters `(sum, count)`, the
/// clusters resampled whole.
pub fn bootstrap_ratio(clusters: &[(f64, f64)], resamples: usize, seed: u64) -> Interval {
    let mut rng = XorShift(seed | 1);
    if clusters.is_empty() {
        return Interval {
            low: 0.0,
            high: 0.0,
        };
    }
    percentile_interval(
        (0..resamples)
            .map(|_| draw_ratio(clusters, &mut rng))
            .collect(),
    )
}

/// One bootstrap draw of a group of clusters: its ratio `Σ sum / Σ count`.
fn draw_ratio(group: &[(f64, f64)], rng: &mut XorShift) -> f64 {
    let (mut sum, mut count) = (0.0, 0.0);
    for _ in 0..group.len() {
        let (s, c) = group[(rng.next() % group.len() as u64) as usize];
        sum += s;
        count += c;
    }
    if count > 0.0 { sum / count } else { 0.0 }
}

/// The 2.5th and 97.5th percentiles of bootstrap statistics.
fn percentile_interval(mut stats: Vec<f64>) -> Interval {
    if stats.is_empty() {
        return Interval {
            low: 0.0,
            high: 0.0,
        };
    }
    stats.sort_by(f64::total_cmp);
    let last = stats.len() - 1;
    let at = |q: f64| stats[((q * last as f64).round() as usize).min(last)];
    Interval {
        low: at(0.025),
        high: at(0.975),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_is_reproducible() {
        let xs: Vec<f64> = (0..200).map(|i| f64::from(i % 2)).collect();
        let ci = bootstrap_ci(&xs, 1000, 7);
        assert!(ci.low < 0.5 && ci.high > 0.5, "{ci:?}");
        assert!(ci.high - ci.low < 0.2);
        assert_eq!(ci, bootstrap_ci(&xs, 1000, 7));
        let constant = bootstrap_ci(&[1.0; 10], 100, 3);
        assert_eq!((constant.low, constant.high), (1.0, 1.0));
    }
}
