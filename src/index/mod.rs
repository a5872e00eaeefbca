//! The BM25 index of one collection: a tantivy index on disk with English stemming, holding every
//! chunk's text and its document's metadata (the chunk store the other retrievers join against),
//! each chunk filed under its 64-bit key ([`crate::chunk::chunk_key`], a fast field): a search
//! returns keys and scores without reading a stored chunk, and only the results a caller keeps are
//! read ([`Bm25Index::chunks_by_key`]).
//!
//! One [`Bm25Index`] owns the collection's single `IndexWriter` (tantivy allows one per index; a
//! second process gets [`IndexError::Locked`]). Calls are blocking: async callers go through
//! `spawn_blocking`. Knows nothing of vectors or fusion. Query building is in [`query`]; scoring a
//! query's top `k` in [`topk`]; a chunk's window (its text between its neighbours') in [`window`]
//! and its word pairs in [`pairs`]; which segments a compaction merges in [`merge`]; the one-time
//! rebuild of an index written before keys, windows or pairs existed in [`migrate`].

mod bm25;
mod merge;
mod migrate;
mod pairs;
mod query;
mod topk;
mod window;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tantivy::collector::{Count, TopDocs};
use tantivy::columnar::Column;
use tantivy::query::{AllQuery, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::{DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::chunk::chunk_key;
use crate::config::Bm25Config;
use crate::error::ErrorKind;

pub use query::MAX_QUERY_WORDS;

/// Errors of the BM25 index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Another process holds the index writer.
    #[error("BM25 index at {path} is being written by another process; retry when it finishes")]
    Locked { path: PathBuf },
    /// Too little disk space for a rebuild of the index.
    #[error(
        "BM25 index at {path} must be rebuilt once for this version (about {need_mib} MiB), but \
         only {free_mib} MiB are free there; free some space and retry"
    )]
    NoSpace {
        path: PathBuf,
        need_mib: u64,
        free_mib: u64,
    },
    /// Tantivy failed to open, write or search the index.
    #[error("BM25 index at {path}: {source}")]
    Tantivy {
        path: PathBuf,
        #[source]
        source: tantivy::TantivyError,
    },
}

impl IndexError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IndexError::Locked { .. } => ErrorKind::Conflict,
            IndexError::NoSpace { .. } => ErrorKind::Unavailable,
            IndexError::Tantivy { .. } => ErrorKind::Internal,
        }
    }
}

/// A chunk as stored in the index.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    pub source: String,
    pub text: String,
    /// Position of the chunk in its document.
    pub ordinal: u64,
    /// The document's metadata, as JSON text (`{}` when none).
    pub metadata: String,
}

/// The name of the fast field holding each chunk's key.
const KEY: &str = "key";
/// The name of the indexed-only field holding each chunk's window ([`window`]).
const WINDOW: &str = "window";
/// The name of the indexed-only field holding each chunk's word pairs ([`pairs`]).
const PAIRS: &str = "pairs";

/// The fields of a chunk. `key` is `None` only in an index written before keys existed, which
/// [`migrate`] reads once to rebuild.
#[derive(Debug, Clone, Copy)]
struct Fields {
    chunk_id: Field,
    doc_id: Field,
    title: Field,
    source: Field,
    text: Field,
    ordinal: Field,
    metadata: Field,
    key: Option<Field>,
    window: Option<Field>,
    pairs: Option<Field>,
}

impl Fields {
    /// The fields of an index's schema, by name.
    fn of(schema: &Schema) -> tantivy::Result<Fields> {
        Ok(Fields {
            chunk_id: schema.get_field("chunk_id")?,
            doc_id: schema.get_field("doc_id")?,
            title: schema.get_field("title")?,
            source: schema.get_field("source")?,
            text: schema.get_field("text")?,
            ordinal: schema.get_field("ordinal")?,
            metadata: schema.get_field("metadata")?,
            key: schema.get_field(KEY).ok(),
            window: schema.get_field(WINDOW).ok(),
            pairs: schema.get_field(PAIRS).ok(),
        })
    }

    /// A chunk as a tantivy document (with its key, window and pairs, when the schema has them).
    fn document(&self, c: &ChunkRecord, window: &str) -> TantivyDocument {
        let mut doc = TantivyDocument::default();
        doc.add_text(self.chunk_id, &c.chunk_id);
        doc.add_text(self.doc_id, &c.doc_id);
        doc.add_text(self.title, &c.title);
        doc.add_text(self.source, &c.source);
        doc.add_text(self.text, &c.text);
        doc.add_u64(self.ordinal, c.ordinal);
        doc.add_text(self.metadata, &c.metadata);
        if let Some(key) = self.key {
            doc.add_u64(key, chunk_key(&c.chunk_id));
        }
        if let Some(field) = self.window {
            doc.add_text(field, window);
        }
        if let Some(field) = self.pairs {
            doc.add_text(field, &c.text);
        }
        doc
    }

    /// A stored document as a chunk.
    fn record(&self, doc: &TantivyDocument) -> ChunkRecord {
        ChunkRecord {
            chunk_id: text_of(doc, self.chunk_id),
            doc_id: text_of(doc, self.doc_id),
            title: text_of(doc, self.title),
            source: text_of(doc, self.source),
            text: text_of(doc, self.text),
            ordinal: doc
                .get_first(self.ordinal)
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            metadata: text_of(doc, self.metadata),
        }
    }
}

fn schema() -> Schema {
    let mut builder = Schema::builder();
    let analyzed = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let stemmed = analyzed.clone().set_stored();
    builder.add_text_field("chunk_id", STRING | STORED);
    builder.add_text_field("doc_id", STRING | STORED);
    builder.add_text_field("title", stemmed.clone());
    builder.add_text_field("source", STORED);
    builder.add_text_field("text", stemmed);
    builder.add_u64_field("ordinal", STORED);
    builder.add_text_field("metadata", STORED);
    builder.add_u64_field(KEY, INDEXED | FAST);
    builder.add_text_field(WINDOW, analyzed);
    builder.add_text_field(
        PAIRS,
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(pairs::TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqs),
        ),
    );
    builder.build()
}

/// Whether an index has every field of [`schema`] that a search or a write needs; one that does
/// not is rebuilt once ([`migrate`]).
fn is_current(schema: &Schema) -> bool {
    [KEY, WINDOW, PAIRS]
        .iter()
        .all(|name| schema.get_field(name).is_ok())
}

/// One collection's BM25 index and chunk store.
pub struct Bm25Index {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    /// The key field (always present once open: [`migrate`] adds it to an older index).
    key: Field,
    writer: Mutex<Option<IndexWriter<TantivyDocument>>>,
    writer_heap_bytes: usize,
}

impl std::fmt::Debug for Bm25Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bm25Index")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Bm25Index {
    /// Open the index in `dir`, creating it when the directory is empty or missing, and rebuilding
    /// it once with chunk keys when it was written before they existed ([`migrate`]).
    pub fn open_or_create(dir: &Path, writer_heap_mb: usize) -> Result<Bm25Index, IndexError> {
        let err = |source| IndexError::Tantivy {
            path: dir.to_path_buf(),
            source,
        };
        let writer_heap_bytes = writer_heap_mb * 1024 * 1024;
        // Held until the index is open: another process opening it meanwhile waits.
        let _opening = crate::datadir::FileLock::exclusive(&migrate::open_lock(dir))
            .map_err(|e| err(e.into()))?;
        migrate::recover(dir).map_err(|e| err(e.into()))?;
        std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
        let index = if dir.join("meta.json").exists() {
            let index = Index::open_in_dir(dir).map_err(err)?;
            if is_current(&index.schema()) {
                index
            } else {
                drop(index);
                migrate::rebuild(dir, writer_heap_bytes)?;
                Index::open_in_dir(dir).map_err(err)?
            }
        } else {
            Index::create_in_dir(dir, schema()).map_err(err)?
        };
        pairs::register(&index);
        let fields = Fields::of(&index.schema()).map_err(err)?;
        let key = fields
            .key
            .expect("a new or migrated index has the key field");
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(err)?;
        Ok(Bm25Index {
            path: dir.to_path_buf(),
            index,
            reader,
            fields,
            key,
            writer: Mutex::new(None),
            writer_heap_bytes,
        })
    }

    fn tantivy_err(&self, source: tantivy::TantivyError) -> IndexError {
        match source {
            tantivy::TantivyError::LockFailure(..) => IndexError::Locked {
                path: self.path.clone(),
            },
            source => IndexError::Tantivy {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Run `f` with the writer, opening it on first use.
    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut IndexWriter<TantivyDocument>, &Fields) -> tantivy::Result<T>,
    ) -> Result<T, IndexError> {
        let mut guard = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(
                self.index
                    .writer(self.writer_heap_bytes)
                    .map_err(|e| self.tantivy_err(e))?,
            );
        }
        let writer = guard.as_mut().expect("writer was just opened");
        f(writer, &self.fields).map_err(|e| self.tantivy_err(e))
    }

    /// Replace the chunks of each given document with `chunks` (documents not in `chunks` but in
    /// `doc_ids` end up with none), then commit, so a search sees all of it or none of it.
    pub fn replace_documents(
        &self,
        doc_ids: &[String],
        chunks: &[ChunkRecord],
    ) -> Result<(), IndexError> {
        for (chunk, other) in self.key_collisions(doc_ids, chunks) {
            tracing::warn!(%chunk, %other,
                "two chunks share a search key; one may be returned for the other");
        }
        self.with_writer(|writer, f| {
            for doc_id in doc_ids {
                writer.delete_term(Term::from_field_text(f.doc_id, doc_id));
            }
            for (c, window) in chunks.iter().zip(window::windows(chunks)) {
                writer.add_document(f.document(c, &window))?;
            }
            writer.commit()?;
            Ok(())
        })?;
        self.reader.reload().map_err(|e| self.tantivy_err(e))
    }

    /// The chunks (chunk id, the other's id) whose key another chunk already has, in this batch
    /// or among the live chunks not being replaced: a 64-bit collision of two chunk ids, after
    /// which a search would return one chunk for the other. Odds ~3e-6 at 10M chunks; warned
    /// about, not refused (the ingest goes on).
    fn key_collisions(&self, doc_ids: &[String], chunks: &[ChunkRecord]) -> Vec<(String, String)> {
        let replaced: HashSet<&str> = doc_ids.iter().map(String::as_str).collect();
        let searcher = self.reader.searcher();
        let mut batch: HashMap<u64, &str> = HashMap::with_capacity(chunks.len());
        let mut found = Vec::new();
        for c in chunks {
            let key = chunk_key(&c.chunk_id);
            let other = match batch.insert(key, &c.chunk_id) {
                Some(earlier) if earlier != c.chunk_id => Some(earlier.to_string()),
                _ => self
                    .live_chunk_id(&searcher, key, &replaced)
                    .filter(|id| *id != c.chunk_id),
            };
            found.extend(other.map(|o| (c.chunk_id.clone(), o)));
        }
        found
    }

    /// The chunk id filed under `key`, unless its document is among `replaced`.
    fn live_chunk_id(
        &self,
        searcher: &tantivy::Searcher,
        key: u64,
        replaced: &HashSet<&str>,
    ) -> Option<String> {
        let query = TermQuery::new(
            Term::from_field_u64(self.key, key),
            IndexRecordOption::Basic,
        );
        let top = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())
            .ok()?;
        let record = self.stored(searcher, top.first()?.1).ok()?;
        (!replaced.contains(record.doc_id.as_str())).then_some(record.chunk_id)
    }

    /// Take the writer (and with it the index's lock) now; [`IndexError::Locked`] when another
    /// process holds it.
    pub fn open_writer(&self) -> Result<(), IndexError> {
        self.with_writer(|_, _| Ok(()))
    }

    /// Remove every chunk of these documents and commit.
    pub fn delete_documents(&self, doc_ids: &[String]) -> Result<(), IndexError> {
        self.replace_documents(doc_ids, &[])
    }

    /// Wait for background merges and release the writer (before the process exits).
    pub fn close_writer(&self) -> Result<(), IndexError> {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            writer
                .wait_merging_threads()
                .map_err(|e| self.tantivy_err(e))?;
        }
        Ok(())
    }

    /// Merge searchable segments (background merges finished first) as [`merge::to_merge`]
    /// picks them, and release the writer; returns how many were merged (0: nothing to do).
    /// Called at the end of a write run: every query visits every segment (a term lookup and a
    /// scorer per query word and field, its own top-k), and an ingest of many batches leaves
    /// tens of them.
    pub fn compact(&self) -> Result<usize, IndexError> {
        self.close_writer()?;
        let metas = self
            .index
            .searchable_segment_metas()
            .map_err(|e| self.tantivy_err(e))?;
        let sizes: Vec<_> = metas
            .iter()
            .map(|m| merge::SegmentSize {
                id: m.id(),
                max_doc: m.max_doc(),
                deleted: m.num_deleted_docs(),
            })
            .collect();
        let ids = merge::to_merge(&sizes);
        if ids.is_empty() {
            return Ok(0);
        }
        self.with_writer(|writer, _| writer.merge(&ids).wait().map(|_| ()))?;
        self.close_writer()?;
        self.reader.reload().map_err(|e| self.tantivy_err(e))?;
        Ok(ids.len())
    }

    /// Number of segments searchable now.
    pub fn num_segments(&self) -> usize {
        self.reader.searcher().segment_readers().len()
    }

    /// Number of chunks searchable now.
    pub fn num_chunks(&self) -> Result<usize, IndexError> {
        self.reader
            .searcher()
            .search(&AllQuery, &Count)
            .map_err(|e| self.tantivy_err(e))
    }

    /// BM25 top `k` chunk keys for a free-text query, best first (see [`query::free_text`]).
    /// Reads keys from the fast field, never a stored chunk.
    pub fn search(
        &self,
        query: &str,
        k: usize,
        settings: &Bm25Config,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let clauses = query::free_text(&self.index, &self.fields, query, settings)
            .map_err(|e| self.tantivy_err(e))?;
        let params = topk::Bm25Params {
            k1: settings.k1,
            b: settings.b,
        };
        let top = topk::top_k(&searcher, &clauses, params, k).map_err(|e| self.tantivy_err(e))?;
        let mut columns: HashMap<u32, Column<u64>> = HashMap::new();
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let column = match columns.entry(addr.segment_ord) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(
                    searcher
                        .segment_reader(addr.segment_ord)
                        .fast_fields()
                        .u64(KEY)
                        .map_err(|e| self.tantivy_err(e))?,
                ),
            };
            if let Some(key) = column.first(addr.doc_id) {
                out.push((key, score));
            }
        }
        Ok(out)
    }

    /// The stored chunks at these positions, in the order asked. A position numbers the chunks
    /// searchable now, 0..[`Self::num_chunks`], in index order (stable until the next commit);
    /// positions past the end are left out. For sampling a collection without reading it whole.
    pub fn chunks_at(&self, positions: &[usize]) -> Result<Vec<ChunkRecord>, IndexError> {
        let searcher = self.reader.searcher();
        let mut addresses = Vec::new();
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let ord = u32::try_from(ord).expect("fewer than 2^32 segments");
            addresses.extend(
                segment
                    .doc_ids_alive()
                    .map(|doc| tantivy::DocAddress::new(ord, doc)),
            );
        }
        let mut out = Vec::with_capacity(positions.len());
        for &addr in positions.iter().filter_map(|&p| addresses.get(p)) {
            out.push(self.stored(&searcher, addr)?);
        }
        Ok(out)
    }

    /// The stored chunks under these keys (keys of no chunk are left out).
    pub fn chunks_by_key(&self, keys: &[u64]) -> Result<HashMap<u64, ChunkRecord>, IndexError> {
        let searcher = self.reader.searcher();
        let mut out = HashMap::with_capacity(keys.len());
        for &key in keys {
            let query = TermQuery::new(
                Term::from_field_u64(self.key, key),
                IndexRecordOption::Basic,
            );
            let top = searcher
                .search(&query, &TopDocs::with_limit(1).order_by_score())
                .map_err(|e| self.tantivy_err(e))?;
            if let Some(&(_, addr)) = top.first() {
                out.insert(key, self.stored(&searcher, addr)?);
            }
        }
        Ok(out)
    }

    fn stored(
        &self,
        searcher: &tantivy::Searcher,
        addr: DocAddress,
    ) -> Result<ChunkRecord, IndexError> {
        let doc: TantivyDocument = searcher.doc(addr).map_err(|e| self.tantivy_err(e))?;
        Ok(self.fields.record(&doc))
    }
}

fn text_of(doc: &TantivyDocument, field: Field) -> String {
    doc.get_first(field)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Bm25Config = Bm25Config::BEFORE_SETTINGS;

    /// Write document `doc` as its one chunk `id` (a commit of its own: a segment).
    fn write_one(index: &Bm25Index, doc: &str, id: &str, text: &str) {
        index
            .replace_documents(&[doc.to_string()], &[chunk(id, doc, text)])
            .expect("write");
    }

    fn chunk(id: &str, doc: &str, text: &str) -> ChunkRecord {
        ChunkRecord {
            chunk_id: id.into(),
            doc_id: doc.into(),
            title: format!("title of {doc}"),
            source: format!("/src/{doc}"),
            text: text.into(),
            ordinal: 0,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn stemmed_search_replace_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        index
            .replace_documents(
                &["a".into(), "b".into()],
                &[
                    chunk("c1", "a", "Creating partial indexes speeds up queries"),
                    chunk("c2", "b", "Vacuum reclaims storage occupied by dead tuples"),
                ],
            )
            .expect("write");
        let hits = index
            .search("create a partial index", 5, &S)
            .expect("search");
        assert_eq!(
            hits[0].0,
            chunk_key("c1"),
            "stemming matches create/creating, index/indexes"
        );
        assert_eq!(index.num_chunks().expect("count"), 2);

        // Replacing doc a with new chunks removes the old ones.
        index
            .replace_documents(
                &["a".into()],
                &[chunk("c3", "a", "Partial index definition")],
            )
            .expect("replace");
        assert_eq!(index.num_chunks().expect("count"), 2);
        let [k1, k2, k3] = ["c1", "c2", "c3"].map(chunk_key);
        assert!(index.chunks_by_key(&[k1]).expect("get").is_empty());
        let got = index.chunks_by_key(&[k3, k2]).expect("get");
        assert_eq!(got[&k3].chunk_id, "c3");
        assert_eq!(got[&k3].title, "title of a");
        assert_eq!(got[&k2].source, "/src/b");

        index.delete_documents(&["b".into()]).expect("delete");
        assert_eq!(index.num_chunks().expect("count"), 1);
        index.close_writer().expect("close");

        // Reopen from disk.
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("reopen");
        assert_eq!(index.num_chunks().expect("count"), 1);
    }

    #[test]
    fn chunks_sharing_a_key_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        // Chunk ids alike in their first 16 hex digits share a key.
        let (first, second, third) = (
            "00000000000000010a",
            "00000000000000010b",
            "00000000000000010c",
        );
        index
            .replace_documents(&["a".into()], &[chunk(first, "a", "one")])
            .expect("write");
        let b = [chunk(second, "b", "two"), chunk(third, "b", "three")];
        assert_eq!(
            index.key_collisions(&["b".into()], &b),
            vec![
                (second.to_string(), first.to_string()),
                (third.to_string(), second.to_string())
            ]
        );
        // Re-ingesting a document's own chunks, or replacing the holder, is no collision.
        let again = [chunk(first, "a", "one")];
        assert!(index.key_collisions(&["a".into()], &again).is_empty());
        assert!(index.key_collisions(&[], &again).is_empty());
        let replacing = [chunk(second, "a", "two")];
        assert!(index.key_collisions(&["a".into()], &replacing).is_empty());
    }

    #[test]
    fn chunks_at_reads_positions_over_live_chunks_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let docs = ["a", "b", "c"].map(String::from);
        let chunks = docs.each_ref().map(|d| chunk(&format!("c{d}"), d, d));
        index.replace_documents(&docs, &chunks).expect("write");
        index.delete_documents(&["b".into()]).expect("delete");
        let all = index.chunks_at(&[0, 1, 2, 99]).expect("read");
        let mut ids: Vec<&str> = all.iter().map(|c| c.chunk_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            ["ca", "cc"],
            "deleted and out-of-range positions are left out"
        );
        let one = index.chunks_at(&[1, 0]).expect("read");
        assert_eq!(one[0].chunk_id, all[1].chunk_id, "the order asked is kept");
        assert_eq!(one[1].chunk_id, all[0].chunk_id);
    }

    #[test]
    fn query_syntax_never_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        index
            .replace_documents(&["a".into()], &[chunk("c1", "a", "C++ templates")])
            .expect("write");
        for q in ["C++", "\"unbalanced", "title:(", "AND OR NOT", "   "] {
            index
                .search(q, 5, &S)
                .unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        assert_eq!(index.search("templates", 0, &S).expect("k=0"), vec![]);
        // Nothing is an operator: a leading `-` does not exclude, `field:` is just a word.
        assert_eq!(
            index.search("-templates", 5, &S).expect("minus")[0].0,
            chunk_key("c1")
        );
        assert_eq!(
            index.search("title: templates", 5, &S).expect("colon")[0].0,
            chunk_key("c1")
        );
        // Deep nesting once overflowed the parser's recursion and aborted the process.
        let nested = format!("{}templates{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(
            index.search(&nested, 5, &S).expect("nested")[0].0,
            chunk_key("c1")
        );
        // A pasted page: only the first MAX_QUERY_WORDS words count, and it still answers.
        let long = "filler ".repeat(50_000) + "templates";
        index.search(&long, 5, &S).expect("long query");
    }

    #[test]
    fn phrases_past_the_cap_count_as_their_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let words: Vec<String> = (0..100).map(|i| format!("w{i}_x")).collect();
        let settings = Bm25Config {
            window_weight: 0.0,
            title_weight: 0.0,
            ..S
        };
        let clauses = query::free_text(&index.index, &index.fields, &words.join(" "), &settings)
            .expect("clauses");
        let phrases = clauses.iter().filter(|c| c.terms.len() > 1).count();
        assert_eq!(phrases, query::MAX_PHRASES);
        let single = |w: &str| {
            clauses
                .iter()
                .find(|c| c.terms == [Term::from_field_text(index.fields.text, w)])
                .map(|c| c.weight)
        };
        assert_eq!(single("w99"), Some(1.0), "a word past the cap is its parts");
        assert_eq!(single("w0"), None, "a word within the cap is a phrase");
        assert_eq!(single("x"), Some((100 - query::MAX_PHRASES) as f32));
        // A phrase asked again is the same clause, however many came between.
        let again = format!("{} w0_x", words.join(" "));
        let clauses =
            query::free_text(&index.index, &index.fields, &again, &settings).expect("clauses");
        let w0 = clauses.iter().find(|c| {
            c.terms.len() == 2 && c.terms[0] == Term::from_field_text(index.fields.text, "w0")
        });
        assert_eq!(w0.map(|c| c.weight), Some(2.0));
    }

    #[test]
    fn a_word_the_analyzer_splits_is_a_phrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        index
            .replace_documents(
                &["a".into(), "b".into()],
                &[
                    chunk("c1", "a", "pg_dump writes an archive"),
                    chunk("c2", "b", "dump the pg tables, then pg again"),
                ],
            )
            .expect("write");
        let hits = index.search("pg_dump", 5, &S).expect("search");
        assert_eq!(hits.len(), 1, "only the adjacent pair matches: {hits:?}");
        assert_eq!(hits[0].0, chunk_key("c1"));
    }

    #[test]
    fn a_window_credits_words_across_a_chunk_boundary_of_the_same_document() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let mut second = chunk("a2", "a", "the battery lasts two days");
        second.ordinal = 1;
        index
            .replace_documents(
                &["a".into(), "b".into()],
                &[
                    chunk("a1", "a", "this phone has a bright screen"),
                    second,
                    chunk("b1", "b", "a phone whose battery lasts a week"),
                ],
            )
            .expect("write");
        let query = "bright screen battery";
        let text_only = index.search(query, 5, &S).expect("search");
        let windowed = Bm25Config {
            window_weight: 1.0,
            ..S
        };
        let with_window = index.search(query, 5, &windowed).expect("search");
        let score = |hits: &[(u64, f32)], id: &str| {
            hits.iter()
                .find(|(k, _)| *k == chunk_key(id))
                .map_or(0.0, |(_, s)| *s)
        };
        assert!(
            score(&with_window, "a1") > score(&text_only, "a1"),
            "a1's neighbour holds 'battery': {text_only:?} -> {with_window:?}"
        );
        assert!(
            (score(&with_window, "b1") - score(&text_only, "b1")).abs() > 0.0,
            "b1's window is its own text, searched once more"
        );
        assert_eq!(with_window[0].0, chunk_key("a1"), "{with_window:?}");
    }

    #[test]
    fn a_question_s_words_side_by_side_rank_above_the_same_words_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        index
            .replace_documents(
                &["a".into(), "b".into()],
                &[
                    chunk("apart", "a", "tuples of rows that are dead"),
                    chunk(
                        "side",
                        "b",
                        "vacuum removes dead tuples from pages of the table",
                    ),
                ],
            )
            .expect("write");
        let query = "What removes the dead tuples?";
        let words = Bm25Config {
            title_weight: 0.0,
            ..S
        };
        let apart_wins = index.search("dead tuples", 5, &words).expect("search");
        assert_eq!(
            apart_wins[0].0,
            chunk_key("apart"),
            "the shorter chunk: {apart_wins:?}"
        );
        let paired = Bm25Config {
            pair_weight: 0.5,
            ..words
        };
        let hits = index.search("dead tuples", 5, &paired).expect("search");
        assert_eq!(hits[0].0, chunk_key("side"), "{hits:?}");
        // Pairs come from the question's words in order: "the dead" and "dead tuples" (the
        // question mark and case aside); one-letter words and possessives do not break them.
        let clauses = query::free_text(&index.index, &index.fields, query, &paired).expect("q");
        let pairs: Vec<(String, f32)> = clauses
            .iter()
            .filter(|c| c.terms[0].field() == index.fields.pairs.expect("pairs"))
            .map(|c| {
                let text = c.terms[0].value().as_str().expect("text").to_string();
                (text, c.weight)
            })
            .collect();
        let want = ["what remov", "remov the", "the dead", "dead tupl"];
        assert_eq!(pairs, want.map(|p| (p.to_string(), 0.5)));
        let off = query::free_text(&index.index, &index.fields, query, &words).expect("q");
        assert!(
            off.iter()
                .all(|c| Some(c.terms[0].field()) != index.fields.pairs)
        );
    }

    #[test]
    fn possessives_match_the_bare_name_and_titles_weigh_as_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let mut titled = chunk("c1", "a", "an unrelated sentence about rivers");
        titled.title = "Beyoncé".into();
        index
            .replace_documents(
                &["a".into(), "b".into()],
                &[
                    titled,
                    chunk("c2", "b", "Beyoncé sang at the halftime show"),
                ],
            )
            .expect("write");
        // "Beyoncé's" was the phrase "beyoncé s" and matched neither chunk's text.
        let hits = index
            .search("Beyoncé's halftime show", 5, &S)
            .expect("search");
        assert_eq!(hits[0].0, chunk_key("c2"), "{hits:?}");
        let no_titles = Bm25Config {
            title_weight: 0.0,
            ..S
        };
        let hits = index.search("Beyoncé", 5, &no_titles).expect("search");
        assert_eq!(
            hits.len(),
            1,
            "the title is not searched at weight 0: {hits:?}"
        );
        let heavy = Bm25Config {
            title_weight: 5.0,
            ..S
        };
        let hits = index.search("Beyoncé", 5, &heavy).expect("search");
        assert_eq!(
            hits[0].0,
            chunk_key("c1"),
            "a heavy title outranks the text: {hits:?}"
        );
    }

    /// Small writes beside a large segment are merged among themselves, leaving the large one as
    /// it is; every chunk stays searchable.
    #[test]
    fn small_writes_beside_a_large_segment_merge_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let docs: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
        let chunks: Vec<_> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| chunk(&format!("c{i}"), d, &format!("chapter {i} of the manual")))
            .collect();
        index
            .replace_documents(&docs, &chunks)
            .expect("large write");
        assert_eq!(index.compact().expect("compact"), 0, "one segment");
        for word in ["vacuum", "replica", "toast"] {
            let text = format!("the {word} settings");
            write_one(
                &index,
                &format!("small-{word}"),
                &format!("s-{word}"),
                &text,
            );
        }
        assert_eq!(index.num_segments(), 4);
        assert_eq!(index.compact().expect("compact"), 3, "the three small ones");
        assert_eq!(index.num_segments(), 2);
        assert_eq!(index.num_chunks().expect("count"), 43);
        for word in ["vacuum", "replica", "toast"] {
            let hits = index.search(word, 3, &S).expect("search");
            assert_eq!(hits[0].0, chunk_key(&format!("s-{word}")), "{word}");
        }
    }

    /// Writes in several commits leave several segments; compacting merges them into one and
    /// every search answers as before (a second compaction has nothing to do).
    #[test]
    fn compaction_merges_segments_and_keeps_every_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("open");
        let words = ["vacuum", "index", "replica", "backup", "planner", "toast"];
        for (i, word) in words.iter().enumerate() {
            let text = format!("the {word} chapter covers {word} settings");
            write_one(&index, &format!("d{i}"), &format!("c{i}"), &text);
        }
        index.delete_documents(&["d5".into()]).expect("delete");
        let segments = index.num_segments();
        assert!(segments > 1, "one commit per write");
        let before: Vec<_> = words
            .iter()
            .map(|w| index.search(w, 3, &S).expect("search"))
            .collect();
        assert_eq!(index.compact().expect("compact"), segments);
        assert_eq!(index.num_segments(), 1);
        assert_eq!(index.num_chunks().expect("count"), 5);
        for (w, want) in words.iter().zip(&before) {
            assert_eq!(&index.search(w, 3, &S).expect("search"), want, "{w}");
        }
        assert_eq!(index.compact().expect("compact again"), 0);
    }
}
