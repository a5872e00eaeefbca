//! The engine's decoding rules as mistral.rs logits processors: [`CiteGiven`] (an answer cites
//! only the sources given, [`crate::engine::cite`]) and [`NoRepeatNgram`], against looping
//! answers: it forbids the answer from repeating any run of
//! `n` tokens it has already generated (a "no repeat n-gram" rule over the answer only). It is a
//! token-level rule: the same words tokenised another way still repeat (13% of 30 PostgreSQL
//! answers still repeated an 8-word span, `bench/demo/eval-base-rule-30.json`).
//!
//! Small models decoding greedily fall into loops ("25.1.3. Updating Planner Statistics [1]"
//! four times, to the token limit). Penalties over the whole context (mistral.rs's frequency,
//! presence and DRY penalties) would also punish copying from the sources, which is what a RAG
//! answer should do; this rule looks at the generated tokens alone. Owns nothing of mistral.rs but
//! its processor trait; the rule itself is the engine's [`banned_next_tokens`].

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use crate::engine::cite::CitationVocab;
use crate::engine::sample::banned_next_tokens;

/// `logits` with the `banned` tokens set to minus infinity.
fn mask(logits: &Tensor, banned: Vec<u32>) -> candle_core::Result<Tensor> {
    if banned.is_empty() {
        return Ok(logits.clone());
    }
    let mut values = logits.flatten_all()?.to_vec1::<f32>()?;
    for t in banned {
        if let Some(v) = values.get_mut(t as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(values, logits.shape(), logits.device())
}

/// The per-request processor. mistral.rs passes the whole context (prompt and answer so far); the
/// first call comes right after prefill, so the context's length then is the prompt's.
pub(super) struct NoRepeatNgram {
    n: usize,
    prompt_len: OnceLock<usize>,
}

impl NoRepeatNgram {
    pub(super) fn new(n: usize) -> NoRepeatNgram {
        NoRepeatNgram {
            n,
            prompt_len: OnceLock::new(),
        }
    }
}

impl mistralrs::CustomLogitsProcessor for NoRepeatNgram {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let prompt_len = *self.prompt_len.get_or_init(|| context.len());
        let generated = context.get(prompt_len..).unwrap_or_default();
        mask(logits, banned_next_tokens(generated, self.n))
    }
}

/// The per-request citation rule: `sources` sources given; the context's length at the first
/// call is the prompt's, as for [`NoRepeatNgram`].
pub(super) struct CiteGiven {
    vocab: Arc<CitationVocab>,
    sources: usize,
    prompt_len: OnceLock<usize>,
}

impl CiteGiven {
    pub(super) fn new(vocab: Arc<CitationVocab>, sources: usize) -> CiteGiven {
        CiteGiven {
            vocab,
            sources,
            prompt_len: OnceLock::new(),
        }
    }
}

impl mistralrs::CustomLogitsProcessor for CiteGiven {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let prompt_len = *self.prompt_len.get_or_init(|| context.len());
        let generated = context.get(prompt_len..).unwrap_or_default();
        mask(logits, self.vocab.banned(generated, self.sources))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs::CustomLogitsProcessor;

    #[test]
    fn the_processor_ignores_the_prompt_and_masks_the_answer_repeats() -> candle_core::Result<()> {
        let p = NoRepeatNgram::new(2);
        let logits = Tensor::new(&[0.5f32, 1.0, 2.0, 3.0], &candle_core::Device::Cpu)?;
        // First call: the prompt alone, which repeats "1 2" freely: nothing banned.
        let out = p.apply(&logits, &[1, 2, 1, 2])?.to_vec1::<f32>()?;
        assert_eq!(out, vec![0.5, 1.0, 2.0, 3.0]);
        // The answer so far is "3 1 3": "3" was followed by "1", so "1" is banned after "3".
        let out = p.apply(&logits, &[1, 2, 1, 2, 3, 1, 3])?.to_vec1::<f32>()?;
        assert_eq!(out, vec![0.5, f32::NEG_INFINITY, 2.0, 3.0]);
        Ok(())
    }

    #[test]
    fn the_citation_processor_bans_a_source_not_given() -> candle_core::Result<()> {
        let texts = [" [", "1", "3", "]"].map(String::from).to_vec();
        let p = CiteGiven::new(Arc::new(CitationVocab::new(texts)), 2);
        let logits = Tensor::new(&[0.5f32, 1.0, 2.0, 3.0], &candle_core::Device::Cpu)?;
        // The prompt (ids 0 1 3) is not read; the answer " [" may go on with 1, not with 3.
        p.apply(&logits, &[0, 1, 3])?;
        let out = p.apply(&logits, &[0, 1, 3, 0])?.to_vec1::<f32>()?;
        assert_eq!(out, vec![0.5, 1.0, f32::NEG_INFINITY, 3.0]);
        Ok(())
    }
}
