//! Cutting a document's text into overlapping chunks for indexing and embedding.
//!
//! Sentences (Unicode sentence boundaries) are packed into chunks of at most `max_words` words; a
//! sentence longer than that is cut at word boundaries. Each chunk after the first repeats the
//! trailing whole sentences of the previous one, up to `overlap_words` words, so an answer that
//! straddles a boundary is still found whole. Pure functions: no I/O, no model.

use unicode_segmentation::UnicodeSegmentation;

use crate::config::ChunkingConfig;

/// A chunk of text and how many of its leading words repeat the previous chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    pub overlap_words: usize,
}

/// A run of words that is never split further (a sentence, or a piece of an over-long one).
type Unit<'a> = Vec<&'a str>;

fn units(text: &str, max_words: usize) -> Vec<Unit<'_>> {
    let mut out = Vec::new();
    for sentence in text.split_sentence_bounds() {
        let words: Vec<&str> = sentence.split_whitespace().collect();
        for piece in words.chunks(max_words) {
            if !piece.is_empty() {
                out.push(piece.to_vec());
            }
        }
    }
    out
}

/// Split `text` into chunks. Empty or whitespace-only text gives no chunks.
pub fn chunk_text(text: &str, cfg: &ChunkingConfig) -> Vec<Chunk> {
    let max = cfg.max_words.max(1);
    let units = units(text, max);
    let mut chunks = Vec::new();
    // Indexes into `units` of the current chunk, and how many of them are overlap.
    let mut current: Vec<usize> = Vec::new();
    let mut current_words = 0;
    let mut overlap_units = 0;
    for (i, unit) in units.iter().enumerate() {
        if current_words + unit.len() > max && current.len() > overlap_units {
            chunks.push(render(&units, &current, overlap_units));
            // Carry trailing whole units of the finished chunk, within the overlap budget and
            // leaving room for the unit that starts the new chunk.
            let budget = cfg.overlap_words.min(max - unit.len());
            let mut carried = Vec::new();
            let mut carried_words = 0;
            for &j in current.iter().rev() {
                if carried_words + units[j].len() > budget {
                    break;
                }
                carried_words += units[j].len();
                carried.push(j);
            }
            carried.reverse();
            overlap_units = carried.len();
            current = carried;
            current_words = carried_words;
        } else if current_words + unit.len() > max {
            // Only overlap in the chunk so far and it leaves no room: drop the overlap.
            current.clear();
            current_words = 0;
            overlap_units = 0;
        }
        current.push(i);
        current_words += unit.len();
    }
    if current.len() > overlap_units {
        chunks.push(render(&units, &current, overlap_units));
    }
    chunks
}

fn render(units: &[Unit<'_>], indexes: &[usize], overlap_units: usize) -> Chunk {
    let overlap_words = indexes[..overlap_units]
        .iter()
        .map(|&j| units[j].len())
        .sum();
    let text = indexes
        .iter()
        .flat_map(|&j| units[j].iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    Chunk {
        text,
        overlap_words,
    }
}

/// A chunk's 64-bit key: the first 8 bytes of its hex content hash (the chunk id). The vector
/// store's point id and the BM25 index's `key` field, so the hits of both retrievers meet on it
/// without reading either store's payload. 64 bits keep the collision odds small (~3e-6 at 10M
/// chunks); the index warns when one happens (`Bm25Index::replace_documents`).
pub fn chunk_key(chunk_id: &str) -> u64 {
    let prefix = chunk_id.get(..16).unwrap_or(chunk_id);
    u64::from_str_radix(prefix, 16).unwrap_or_else(|_| {
        // Not a hex id (should not happen: chunk ids are sha256 hex): FNV-1a of it, a hash that
        // stays the same across builds (keys are stored in both indexes).
        chunk_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_key_is_the_hash_prefix() {
        assert_eq!(chunk_key("00000000000000ffabc"), 255);
        assert_eq!(chunk_key("ffffffffffffffff"), u64::MAX);
    }

    #[test]
    fn chunk_key_of_non_hex_is_stable() {
        // FNV-1a 64 (published test vectors): the same key in every build and release.
        assert_eq!(chunk_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(chunk_key("foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(chunk_key("not-hex"), chunk_key("not-hex2"));
    }

    fn cfg(max_words: usize, overlap_words: usize) -> ChunkingConfig {
        ChunkingConfig {
            max_words,
            overlap_words,
        }
    }

    #[test]
    fn short_text_is_one_chunk() {
        let chunks = chunk_text("One sentence. Two sentences.", &cfg(50, 10));
        assert_eq!(
            chunks,
            vec![Chunk {
                text: "One sentence. Two sentences.".into(),
                overlap_words: 0
            }]
        );
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunk_text("  \n\t ", &cfg(50, 10)).is_empty());
        assert!(chunk_text("", &cfg(50, 10)).is_empty());
    }

    #[test]
    fn overlap_repeats_whole_sentences() {
        let text = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota. Kappa lambda mu.";
        let chunks = chunk_text(text, &cfg(6, 3));
        assert_eq!(chunks[0].text, "Alpha beta gamma. Delta epsilon zeta.");
        assert_eq!(chunks[1].text, "Delta epsilon zeta. Eta theta iota.");
        assert_eq!(chunks[1].overlap_words, 3);
    }

    #[test]
    fn long_sentence_is_cut_at_words() {
        let text = (0..25)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunk_text(&text, &cfg(10, 0));
        assert_eq!(chunks.len(), 3);
        assert!(
            chunks
                .iter()
                .all(|c| c.text.split_whitespace().count() <= 10)
        );
    }

    proptest! {
        #[test]
        fn chunks_cover_all_words_in_order_and_respect_limits(
            sentences in proptest::collection::vec(
                proptest::collection::vec("[a-zA-Z0-9]{1,8}", 1..30), 0..30),
            max_words in 8usize..64,
            overlap_frac in 0.0f64..0.9,
        ) {
            let overlap = ((max_words as f64) * overlap_frac) as usize;
            let text = sentences.iter().map(|s| format!("{}.", s.join(" "))).collect::<Vec<_>>().join(" ");
            let chunks = chunk_text(&text, &cfg(max_words, overlap));
            let mut rebuilt: Vec<String> = Vec::new();
            for c in &chunks {
                let words: Vec<&str> = c.text.split_whitespace().collect();
                prop_assert!(words.len() <= max_words);
                prop_assert!(c.overlap_words <= overlap);
                prop_assert!(c.overlap_words < words.len());
                rebuilt.extend(words[c.overlap_words..].iter().map(|w| w.to_string()));
            }
            let original: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            prop_assert_eq!(rebuilt, original);
            // Deterministic: same input, same chunks (chunk ids are content hashes).
            prop_assert_eq!(chunk_text(&text, &cfg(max_words, overlap)), chunks);
        }
    }
}
