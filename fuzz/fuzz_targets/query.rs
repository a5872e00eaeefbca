//! Fuzz target: any text as a search of a small real tantivy BM25 index, with titles weighted and
//! not searched, windows and word pairs on and off. A query is free text (no syntax), so every input must give a result list (possibly
//! empty) of at most `k` chunks: no error, no panic, no stack overflow.

#![no_main]

use std::sync::OnceLock;

use domainrag::config::Bm25Config;
use domainrag::index::{Bm25Index, ChunkRecord};
use libfuzzer_sys::fuzz_target;

const K: usize = 5;

/// The index, built once per fuzzing process (its directory lives as long as the process).
fn index() -> &'static Bm25Index {
    static INDEX: OnceLock<(tempfile::TempDir, Bm25Index)> = OnceLock::new();
    &INDEX
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let index = Bm25Index::open_or_create(dir.path(), 15).expect("an index");
            let texts = [
                (
                    "pg_dump",
                    "pg_dump -Fc writes a custom-format archive of one database.",
                ),
                (
                    "Beyoncé",
                    "Beyoncé's first solo album was released in 2003.",
                ),
                (
                    "VACUUM",
                    "VACUUM (FULL, ANALYZE) reclaims storage: \"dead\" tuples + NOT NULL.",
                ),
                (
                    "数据库",
                    "数据库 PostgreSQL 支持事务。 Ünïcödé ﬁ ligatures and emoji 🐘.",
                ),
            ];
            let chunks: Vec<ChunkRecord> = texts
                .iter()
                .enumerate()
                .map(|(i, (title, text))| ChunkRecord {
                    chunk_id: format!("c{i}"),
                    doc_id: format!("d{i}"),
                    title: title.to_string(),
                    source: format!("doc{i}.txt"),
                    text: text.to_string(),
                    ordinal: 0,
                    metadata: "{}".into(),
                })
                .collect();
            let ids: Vec<String> = chunks.iter().map(|c| c.doc_id.clone()).collect();
            index.replace_documents(&ids, &chunks).expect("indexing");
            (dir, index)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let query = String::from_utf8_lossy(bytes);
    let settings = Bm25Config {
        title_weight: [0.0, 0.5, 1.0][usize::from(pick) % 3],
        window_weight: [0.0, 2.0][usize::from(pick / 3) % 2],
        // k1 0 makes every match its idf; b 0 and 1 are the ends of length normalisation.
        k1: [1.2, 0.0, 0.6, 5.0][usize::from(pick / 6) % 4],
        b: [0.75, 0.0, 1.0][usize::from(pick / 24) % 3],
        pair_weight: [0.0, 0.75][usize::from(pick / 72) % 2],
    };
    let hits = index()
        .search(&query, K, &settings)
        .expect("a free-text search never fails");
    assert!(hits.len() <= K);
    assert!(hits.iter().all(|(_, score)| score.is_finite()));
});
