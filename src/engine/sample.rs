//! Choosing the next token from a row of logits: greedy, or temperature with nucleus (top-p)
//! sampling from a seeded generator; and the rule against looping answers, a "no repeat n-gram"
//! ban over the answer's own tokens ([`banned_next_tokens`]), and the rule that an answer cites
//! only the sources given ([`super::cite`]).
//!
//! Small models decoding greedily fall into loops ("25.1.3. Updating Planner Statistics [1]"
//! four times, to the token limit). Penalties over the whole context would also punish copying
//! from the sources, which is what a RAG answer should do; the rule looks at the generated tokens
//! alone. It is a token-level rule: the same words tokenised another way still repeat.

use super::cite::CitationVocab;
use crate::rng::Rng;

/// How one request samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// The answer may not repeat a run of this many of its own tokens (0 = no rule).
    pub no_repeat_ngram: usize,
    /// Sources the prompt numbers: citations may only name 1 to this (0 = no rule).
    pub cite_sources: usize,
}

/// The tokens that would complete an `n`-token run already present in `generated`: for each
/// earlier position where the last `n - 1` tokens occurred, the token that followed them.
pub fn banned_next_tokens(generated: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || generated.len() < n {
        return Vec::new();
    }
    let tail = &generated[generated.len() - (n - 1)..];
    let mut banned: Vec<u32> = generated
        .windows(n)
        .filter(|w| &w[..n - 1] == tail)
        .map(|w| w[n - 1])
        .collect();
    banned.sort_unstable();
    banned.dedup();
    banned
}

/// Every token the decoding rules forbid after `generated` (the answer so far): the no-repeat
/// n-gram rule (`no_repeat_ngram`, 0 = off) and the citation rule over `vocab`'s token texts
/// (`cite_sources`, 0 = off). The one place both engines take their bans from.
pub fn banned_tokens(
    generated: &[u32],
    no_repeat_ngram: usize,
    cite_sources: usize,
    vocab: &CitationVocab,
) -> Vec<u32> {
    let mut banned = banned_next_tokens(generated, no_repeat_ngram);
    banned.extend(vocab.banned(generated, cite_sources));
    banned
}

/// The next token after `generated` (the answer so far) given its `logits` (modified in place);
/// `vocab` holds the token texts the citation rule reads.
pub fn next_token(
    logits: &mut [f32],
    generated: &[u32],
    params: &SamplingParams,
    vocab: &CitationVocab,
    rng: &mut Rng,
) -> u32 {
    for t in banned_tokens(
        generated,
        params.no_repeat_ngram,
        params.cite_sources,
        vocab,
    ) {
        if let Some(v) = logits.get_mut(t as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    let total: f32 = probs.iter().map(|(_, p)| p).sum();
    if params.top_p < 1.0 {
        // Only a nucleus needs the order (sorting the vocabulary costs ~2 ms per token).
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    }
    // The smallest set of most likely tokens whose probability reaches top_p (all at 1).
    let cut = if params.top_p < 1.0 {
        params.top_p.clamp(0.0, 1.0) as f32 * total
    } else {
        f32::INFINITY
    };
    let mut kept = 0.0;
    let mut n = 0;
    for (_, p) in &probs {
        kept += p;
        n += 1;
        if kept >= cut {
            break;
        }
    }
    let probs = &probs[..n.max(1)];
    let mut r = rng.uniform() * probs.iter().map(|(_, p)| p).sum::<f32>();
    for (id, p) in probs {
        if r < *p {
            return *id;
        }
        r -= p;
    }
    probs[probs.len() - 1].0
}

/// Index of the largest value (the first of equal ones).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_only_what_would_repeat_a_run_of_the_answer() {
        // "a b c d a b" with n = 3: "a b" occurred before, followed by "c".
        assert_eq!(banned_next_tokens(&[1, 2, 3, 4, 1, 2], 3), vec![3]);
        // Every earlier continuation of the tail is banned, once each.
        assert_eq!(banned_next_tokens(&[1, 2, 3, 1, 2, 5, 1, 2], 3), vec![3, 5]);
        // Nothing to repeat yet, or the rule off.
        assert!(banned_next_tokens(&[1, 2, 3, 4], 3).is_empty());
        assert!(banned_next_tokens(&[1, 2], 3).is_empty());
        assert!(banned_next_tokens(&[1, 1, 1], 0).is_empty());
        // n = 1: no token may appear twice.
        assert_eq!(banned_next_tokens(&[7, 8], 1), vec![7, 8]);
    }

    #[test]
    fn greedy_takes_the_best_allowed_token() {
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            no_repeat_ngram: 2,
            cite_sources: 0,
        };
        let mut rng = Rng::new(1);
        assert_eq!(
            next_token(
                &mut [0.1, 3.0, 2.0],
                &[],
                &greedy,
                &CitationVocab::default(),
                &mut rng
            ),
            1
        );
        // The answer "1 0 1" may not go on with "0" ("1 0" occurred): the best allowed is 1.
        assert_eq!(
            next_token(
                &mut [5.0, 3.0, 2.0],
                &[1, 0, 1],
                &greedy,
                &CitationVocab::default(),
                &mut rng
            ),
            1
        );
    }

    #[test]
    fn greedy_cites_only_a_given_source() {
        let vocab = CitationVocab::new([" [", "1", "7"].map(String::from).to_vec());
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            no_repeat_ngram: 0,
            cite_sources: 2,
        };
        // After " [" the model prefers "7"; with 2 sources given it writes "1".
        let mut rng = Rng::new(1);
        let next = next_token(&mut [0.0, 1.0, 5.0], &[0], &greedy, &vocab, &mut rng);
        assert_eq!(next, 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            no_repeat_ngram: 0,
            cite_sources: 0,
        };
        // Token 2 alone holds more than half the mass: top_p 0.5 keeps only it.
        let logits = [0.0f32, 0.0, 4.0, 0.0];
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            assert_eq!(
                next_token(
                    &mut logits.clone(),
                    &[],
                    &params,
                    &CitationVocab::default(),
                    &mut rng
                ),
                2
            );
        }
        // Full nucleus: the same seed gives the same draws, and more than one token is drawn.
        let params = SamplingParams {
            top_p: 1.0,
            ..params
        };
        let flat = [0.0f32; 4];
        let draw = |seed| -> Vec<u32> {
            let mut rng = Rng::new(seed);
            (0..40)
                .map(|_| {
                    next_token(
                        &mut flat.clone(),
                        &[],
                        &params,
                        &CitationVocab::default(),
                        &mut rng,
                    )
                })
                .collect()
        };
        assert_eq!(draw(3), draw(3));
        let mut seen = draw(3);
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 1, "{seen:?}");
    }
}
