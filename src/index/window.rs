//! A chunk's window: its own text between its neighbours' in the same document, indexed (not
//! stored) as the `window` field, so BM25 can credit a chunk for the words of a question that
//! fall just across a chunk boundary (a long review or section cut into several chunks).
//! Pure functions: no I/O.

use std::collections::HashMap;

use super::ChunkRecord;

/// The window of each of `chunks` (same order): the previous chunk's text, the chunk's, and the
/// next chunk's, neighbours being the chunks of the same document at the adjacent ordinals that
/// are among `chunks` (a document is always written whole).
pub(super) fn windows(chunks: &[ChunkRecord]) -> Vec<String> {
    let mut by_place: HashMap<(&str, u64), &str> = HashMap::with_capacity(chunks.len());
    for c in chunks {
        by_place.insert((c.doc_id.as_str(), c.ordinal), c.text.as_str());
    }
    chunks
        .iter()
        .map(|c| {
            let doc = c.doc_id.as_str();
            let before = c
                .ordinal
                .checked_sub(1)
                .and_then(|o| by_place.get(&(doc, o)));
            let after = by_place.get(&(doc, c.ordinal + 1));
            [before.copied(), Some(c.text.as_str()), after.copied()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(doc: &str, ordinal: u64, text: &str) -> ChunkRecord {
        ChunkRecord {
            chunk_id: format!("{doc}-{ordinal}"),
            doc_id: doc.into(),
            title: String::new(),
            source: String::new(),
            text: text.into(),
            ordinal,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn a_window_is_the_chunk_between_its_neighbours_of_the_same_document() {
        let chunks = [
            chunk("b", 0, "only"),
            chunk("a", 2, "third"),
            chunk("a", 0, "first"),
            chunk("a", 1, "second"),
        ];
        assert_eq!(
            windows(&chunks),
            [
                "only",
                "second\nthird",
                "first\nsecond",
                "first\nsecond\nthird"
            ]
        );
    }
}
