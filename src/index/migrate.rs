//! The one-time rebuild of a BM25 index written before its schema had every field it has now (a
//! chunk's `key`, its `window`, its word `pairs`).
//!
//! Such an index is read whole from its own stored chunks into a new index beside it
//! (`<dir>.rebuild`), with the current schema (no chunk is embedded again); then the old directory is renamed away
//! (`<dir>.before-rebuild`), the new one into place, and the old one removed. Nothing is lost at
//! any step: until the first rename the old index is untouched, and [`recover`] (run before
//! every open) puts the old index back if a process died between the two renames, so the next
//! open rebuilds again. The old index's writer lock is held throughout, so no other process writes
//! to it meanwhile, and [`Bm25Index::open_or_create`](super::Bm25Index::open_or_create) holds the
//! directory's open lock ([`open_lock`]) around [`recover`] and the rebuild, so a second process
//! opening the collection meanwhile waits instead of "recovering" a rebuild in progress.

use std::path::{Path, PathBuf};

use tantivy::{DocAddress, Index, IndexWriter, TantivyDocument};

use super::window::windows;
use super::{Fields, IndexError, schema};

/// Where the new index is built.
fn rebuild_dir(dir: &Path) -> PathBuf {
    sibling(dir, "rebuild")
}

/// Where the old index waits between the two renames.
fn old_dir(dir: &Path) -> PathBuf {
    sibling(dir, "before-rebuild")
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// The lock file that serialises opening (recovery, rebuild, creation) of the index in `dir`
/// across processes.
pub(super) fn open_lock(dir: &Path) -> PathBuf {
    sibling(dir, "open.lock")
}

/// Put back an old index that a rebuild moved away and died before replacing; drop a half-built
/// new one. Call it holding [`open_lock`].
pub(super) fn recover(dir: &Path) -> std::io::Result<()> {
    let old = old_dir(dir);
    if old.exists() {
        if dir.join("meta.json").exists() {
            // The swap finished; only the removal of the old index did not (or stopped midway).
            std::fs::remove_dir_all(&old)?;
        } else if old.join("meta.json").exists() {
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            std::fs::rename(&old, dir)?;
        }
    }
    let rebuild = rebuild_dir(dir);
    if rebuild.exists() {
        std::fs::remove_dir_all(rebuild)?;
    }
    Ok(())
}

/// Rebuild the index in `dir` with the current schema (every chunk under its key, with its window
/// and pairs), then swap it in. Logs the chunks it copied and how long it took.
pub(super) fn rebuild(dir: &Path, writer_heap_bytes: usize) -> Result<(), IndexError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IndexError::Tantivy { path, source }
    };
    let started = std::time::Instant::now();
    check_space(dir)?;
    let old = Index::open_in_dir(dir).map_err(err(dir))?;
    // Held until the swap: no other process may write the old index meanwhile.
    let lock: IndexWriter<TantivyDocument> =
        old.writer(writer_heap_bytes).map_err(|e| match e {
            tantivy::TantivyError::LockFailure(..) => IndexError::Locked {
                path: dir.to_path_buf(),
            },
            source => IndexError::Tantivy {
                path: dir.to_path_buf(),
                source,
            },
        })?;
    let rebuild = rebuild_dir(dir);
    std::fs::create_dir_all(&rebuild).map_err(|e| err(&rebuild)(e.into()))?;
    let new = Index::create_in_dir(&rebuild, schema()).map_err(err(&rebuild))?;
    super::pairs::register(&new);
    let copied = copy_chunks(&old, &new, writer_heap_bytes).map_err(err(&rebuild))?;
    drop(new);
    let moved = old_dir(dir);
    std::fs::rename(dir, &moved).map_err(|e| err(dir)(e.into()))?;
    std::fs::rename(&rebuild, dir).map_err(|e| err(dir)(e.into()))?;
    drop(lock);
    drop(old);
    if let Err(e) = std::fs::remove_dir_all(&moved) {
        // The new index is in place; the next open's recover() removes what is left.
        tracing::warn!(path = %moved.display(), error = %e, "could not remove the index a rebuild replaced");
    }
    tracing::info!(
        path = %dir.display(),
        chunks = copied,
        seconds = started.elapsed().as_secs_f64(),
        "BM25 index rebuilt with the current fields (once, for an index an older domainrag wrote)"
    );
    Ok(())
}

/// Refuse a rebuild that would fill the disk: the new index (its text once more, plus the
/// windows and pairs) is written beside the old one, so it needs about 1.5 times the old one's
/// size.
fn check_space(dir: &Path) -> Result<(), IndexError> {
    let io = |e: std::io::Error| IndexError::Tantivy {
        path: dir.to_path_buf(),
        source: e.into(),
    };
    let need = crate::datadir::dir_bytes(dir).map_err(io)? / 2 * 3;
    let free = crate::datadir::free_bytes(dir).map_err(io)?;
    if free < need {
        return Err(IndexError::NoSpace {
            path: dir.to_path_buf(),
            need_mib: need.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    Ok(())
}

/// Copy every live chunk of `old` into `new` (with its key, window and pairs), a document at a
/// time, commit, and merge them into one segment. Two reads of each stored chunk (its document,
/// then the chunk), so memory holds the chunks' places and one document, never the collection's
/// text.
fn copy_chunks(old: &Index, new: &Index, writer_heap_bytes: usize) -> tantivy::Result<usize> {
    let from = Fields::of(&old.schema())?;
    let to = Fields::of(&new.schema())?;
    let searcher = old.reader()?.searcher();
    let mut places: Vec<(String, DocAddress)> = Vec::new();
    for (ord, segment) in searcher.segment_readers().iter().enumerate() {
        let ord = u32::try_from(ord).expect("fewer than 2^32 segments");
        for doc in segment.doc_ids_alive() {
            let addr = DocAddress::new(ord, doc);
            let stored: TantivyDocument = searcher.doc(addr)?;
            places.push((from.record(&stored).doc_id, addr));
        }
    }
    places.sort();
    let mut writer: IndexWriter<TantivyDocument> = new.writer(writer_heap_bytes)?;
    for document in places.chunk_by(|a, b| a.0 == b.0) {
        let chunks = document
            .iter()
            .map(|(_, addr)| Ok(from.record(&searcher.doc::<TantivyDocument>(*addr)?)))
            .collect::<tantivy::Result<Vec<_>>>()?;
        for (c, window) in chunks.iter().zip(windows(&chunks)) {
            writer.add_document(to.document(c, &window))?;
        }
    }
    writer.commit()?;
    // One segment, as a compaction leaves a collection: a search visits every segment.
    let segments = new.searchable_segment_ids()?;
    if segments.len() > 1 {
        writer.merge(&segments).wait()?;
    }
    writer.wait_merging_threads()?;
    Ok(places.len())
}

#[cfg(test)]
mod tests {
    use tantivy::schema::{STORED, STRING, Schema, TextFieldIndexing, TextOptions};

    use super::*;
    use crate::chunk::chunk_key;
    use crate::config::Bm25Config;
    use crate::index::{Bm25Index, ChunkRecord};

    /// The schema domainrag wrote before chunk keys (what older data dirs hold).
    fn schema_before_keys() -> Schema {
        let mut builder = Schema::builder();
        let stemmed = TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("en_stem")
                    .set_index_option(tantivy::schema::IndexRecordOption::WithFreqsAndPositions),
            )
            .set_stored();
        builder.add_text_field("chunk_id", STRING | STORED);
        builder.add_text_field("doc_id", STRING | STORED);
        builder.add_text_field("title", stemmed.clone());
        builder.add_text_field("source", STORED);
        builder.add_text_field("text", stemmed);
        builder.add_u64_field("ordinal", STORED);
        builder.add_text_field("metadata", STORED);
        builder.build()
    }

    fn chunk(n: u64, doc: &str, text: &str) -> ChunkRecord {
        ChunkRecord {
            chunk_id: format!("{n:016x}{}", "ab".repeat(24)),
            doc_id: doc.into(),
            title: format!("title of {doc}"),
            source: format!("/src/{doc}"),
            text: text.into(),
            ordinal: n,
            metadata: r#"{"team":"ops"}"#.into(),
        }
    }

    /// The schema domainrag wrote before word pairs: today's without the `pairs` field.
    fn schema_before_pairs() -> Schema {
        let mut builder = Schema::builder();
        for (_, entry) in schema().fields() {
            if entry.name() != super::super::PAIRS {
                builder.add_field(entry.clone());
            }
        }
        builder.build()
    }

    /// An index as an older domainrag left it: two documents, one chunk deleted.
    fn write_old_index(dir: &Path) -> Vec<ChunkRecord> {
        write_index(dir, schema_before_keys())
    }

    /// Two documents, one chunk deleted, in an index of `schema`.
    fn write_index(dir: &Path, schema: Schema) -> Vec<ChunkRecord> {
        std::fs::create_dir_all(dir).expect("dir");
        let index = Index::create_in_dir(dir, schema).expect("create");
        let fields = Fields::of(&index.schema()).expect("fields");
        assert!(fields.pairs.is_none());
        let mut writer: IndexWriter<TantivyDocument> = index.writer(20_000_000).expect("writer");
        let kept = vec![
            chunk(1, "a", "Vacuum reclaims storage occupied by dead tuples"),
            chunk(2, "b", "Partial indexes speed up queries"),
        ];
        for c in kept.iter().chain([&chunk(3, "gone", "deleted text")]) {
            writer.add_document(fields.document(c, "")).expect("add");
        }
        writer.commit().expect("commit");
        writer.delete_term(tantivy::Term::from_field_text(fields.doc_id, "gone"));
        writer.commit().expect("commit");
        writer.wait_merging_threads().expect("merge");
        kept
    }

    #[test]
    fn an_index_without_keys_is_rebuilt_once_with_every_live_chunk() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bm25");
        let kept = write_old_index(&dir);

        let index = Bm25Index::open_or_create(&dir, 20).expect("open migrates");
        assert_eq!(
            index.num_chunks().expect("count"),
            2,
            "the deleted chunk stays gone"
        );
        let hits = index
            .search("reclaim storage", 5, &Bm25Config::BEFORE_SETTINGS)
            .expect("search");
        assert_eq!(hits[0].0, chunk_key(&kept[0].chunk_id));
        let keys: Vec<u64> = kept.iter().map(|c| chunk_key(&c.chunk_id)).collect();
        let got = index.chunks_by_key(&keys).expect("by key");
        for c in &kept {
            assert_eq!(
                &got[&chunk_key(&c.chunk_id)],
                c,
                "every stored field is kept"
            );
        }
        assert!(!old_dir(&dir).exists() && !rebuild_dir(&dir).exists());
        drop(index);
        let again = Bm25Index::open_or_create(&dir, 20).expect("reopen");
        assert_eq!(again.num_chunks().expect("count"), 2);
    }

    #[test]
    fn an_index_without_pairs_is_rebuilt_once_and_searched_with_them() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bm25");
        let kept = write_index(&dir, schema_before_pairs());

        let index = Bm25Index::open_or_create(&dir, 20).expect("open migrates");
        assert!(index.fields.pairs.is_some());
        assert_eq!(index.num_chunks().expect("count"), 2);
        assert_eq!(index.num_segments(), 1);
        let pairs_only = Bm25Config {
            title_weight: 0.0,
            pair_weight: 1.0,
            ..Bm25Config::BEFORE_SETTINGS
        };
        let hits = index.search("dead tuples", 5, &pairs_only).expect("search");
        assert_eq!(hits[0].0, chunk_key(&kept[0].chunk_id));
        assert!(!old_dir(&dir).exists() && !rebuild_dir(&dir).exists());
    }

    #[test]
    fn a_rebuild_cut_between_its_renames_is_undone_and_redone() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bm25");
        write_old_index(&dir);
        // The process died after moving the old index away, with a half-built new one beside it.
        std::fs::rename(&dir, old_dir(&dir)).expect("move away");
        std::fs::create_dir_all(rebuild_dir(&dir)).expect("half-built");

        let index = Bm25Index::open_or_create(&dir, 20).expect("open recovers");
        assert_eq!(index.num_chunks().expect("count"), 2, "nothing lost");
        assert!(!old_dir(&dir).exists() && !rebuild_dir(&dir).exists());
    }

    #[test]
    fn the_leftovers_of_a_removal_cut_after_the_swap_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bm25");
        write_old_index(&dir);
        drop(Bm25Index::open_or_create(&dir, 20).expect("migrates"));
        // The removal of the replaced index stopped after deleting its meta.json.
        std::fs::create_dir_all(old_dir(&dir)).expect("leftover");
        std::fs::write(old_dir(&dir).join("segment.idx"), b"old bytes").expect("file");

        let index = Bm25Index::open_or_create(&dir, 20).expect("open");
        assert_eq!(index.num_chunks().expect("count"), 2);
        assert!(!old_dir(&dir).exists(), "the leftover is gone");
    }

    #[test]
    fn processes_opening_an_old_index_at_once_wait_for_one_rebuild() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bm25");
        write_old_index(&dir);
        // Each open takes the open lock (a file lock, per open file description), as another
        // process would.
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || Bm25Index::open_or_create(&dir, 20))
            })
            .collect();
        for open in opens {
            let index = open.join().expect("no panic").expect("every open succeeds");
            assert_eq!(index.num_chunks().expect("count"), 2, "nothing lost");
        }
        assert!(!old_dir(&dir).exists() && !rebuild_dir(&dir).exists());
    }
}
