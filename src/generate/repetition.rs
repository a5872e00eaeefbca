//! The engine's decoding rules as one mistral.rs logits processor ([`DecodingRules`]): the
//! answer may not repeat a run of `n` tokens it has already generated (a "no repeat n-gram" rule
//! over the answer only), and it may cite only the sources given ([`crate::engine::cite`]). The
//! bans come from the engine's [`banned_tokens`], as the native engine's do.
//!
//! Small models decoding greedily fall into loops ("25.1.3. Updating Planner Statistics [1]"
//! four times, to the token limit). Penalties over the whole context (mistral.rs's frequency,
//! presence and DRY penalties) would also punish copying from the sources, which is what a RAG
//! answer should do; these rules look at the generated tokens alone. The no-repeat rule is
//! token-level: the same words tokenised another way still repeat (13% of 30 PostgreSQL answers
//! still repeated an 8-word span, `bench/demo/eval-base-rule-30.json`). Owns nothing of
//! mistral.rs but its processor trait.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use crate::engine::cite::CitationVocab;
use crate::engine::sample::banned_tokens;

/// The per-request processor. mistral.rs passes the whole context (prompt and answer so far); the
/// first call comes right after prefill, so the context's length then is the prompt's.
pub(super) struct DecodingRules {
    no_repeat_ngram: usize,
    cite_sources: usize,
    vocab: Arc<CitationVocab>,
    prompt_len: OnceLock<usize>,
}

impl DecodingRules {
    /// The rules of one request: no repeated run of `no_repeat_ngram` tokens and citations of
    /// `cite_sources` sources at most, read over `vocab` (each 0 = that rule off).
    pub(super) fn new(
        no_repeat_ngram: usize,
        cite_sources: usize,
        vocab: Arc<CitationVocab>,
    ) -> DecodingRules {
        DecodingRules {
            no_repeat_ngram,
            cite_sources,
            vocab,
            prompt_len: OnceLock::new(),
        }
    }
}

impl mistralrs::CustomLogitsProcessor for DecodingRules {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let prompt_len = *self.prompt_len.get_or_init(|| context.len());
        let generated = context.get(prompt_len..).unwrap_or_default();
        let banned = banned_tokens(
            generated,
            self.no_repeat_ngram,
            self.cite_sources,
            &self.vocab,
        );
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs::CustomLogitsProcessor;

    #[test]
    fn the_processor_ignores_the_prompt_and_masks_the_answer_repeats() -> candle_core::Result<()> {
        let p = DecodingRules::new(2, 0, Arc::default());
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
    fn the_processor_bans_a_source_not_given() -> candle_core::Result<()> {
        let texts = [" [", "1", "3", "]"].map(String::from).to_vec();
        let p = DecodingRules::new(0, 2, Arc::new(CitationVocab::new(texts)));
        let logits = Tensor::new(&[0.5f32, 1.0, 2.0, 3.0], &candle_core::Device::Cpu)?;
        // The prompt (ids 0 1 3) is not read; the answer " [" may go on with 1, not with 3.
        p.apply(&logits, &[0, 1, 3])?;
        let out = p.apply(&logits, &[0, 1, 3, 0])?.to_vec1::<f32>()?;
        assert_eq!(out, vec![0.5, 1.0, f32::NEG_INFINITY, 3.0]);
        Ok(())
    }
}
