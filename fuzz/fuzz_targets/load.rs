//! Fuzz target: any bytes as any uploadable format (text, Markdown, HTML, JSON Lines, SQuAD JSON,
//! or by file name), then every loaded document through the chunker. Whatever the bytes, loading
//! returns documents or a per-file error (no panic, no stack overflow, bounded memory), and the
//! results keep the loader's and chunker's promises.

#![no_main]

use std::path::Path;

use domainrag::chunk::chunk_text;
use domainrag::config::ChunkingConfig;
use domainrag::ingest::load::{self, Format, MAX_RECORD_ERRORS};
use libfuzzer_sys::fuzz_target;

/// The first byte picks how the rest is read; `Auto` goes by the file name, as an upload does.
const CASES: [(&str, Format); 7] = [
    ("doc.txt", Format::Txt),
    ("doc.md", Format::Md),
    ("doc.html", Format::Html),
    ("doc.jsonl", Format::Jsonl),
    ("doc.json", Format::Squad),
    ("page.htm", Format::Auto),
    ("notes.markdown", Format::Auto),
];

/// Small enough that long inputs make many chunks, as the defaults do for a manual.
const CHUNKING: ChunkingConfig = ChunkingConfig {
    max_words: 24,
    overlap_words: 6,
};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let (name, format) = CASES[usize::from(pick) % CASES.len()];
    let Ok(loaded) = load::load(Path::new(name), bytes, format) else {
        return;
    };
    assert!(loaded.errors.len() <= MAX_RECORD_ERRORS);
    assert!(loaded.errors_total >= loaded.errors.len());
    for doc in &loaded.documents {
        assert!(!doc.doc_id.is_empty());
        for chunk in chunk_text(&doc.text, &CHUNKING) {
            let words = chunk.text.split_whitespace().count();
            assert!(words > 0, "an empty chunk");
            assert!(chunk.overlap_words < words, "a chunk that is all overlap");
            assert!(words <= CHUNKING.max_words, "a chunk over max_words");
        }
    }
});
