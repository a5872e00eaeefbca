//! The BM25 index of one collection: a tantivy index on disk with English stemming, holding every
//! chunk's text and its document's metadata (the chunk store the other retrievers join against).
//!
//! One [`Bm25Index`] owns the collection's single `IndexWriter` (tantivy allows one per index; a
//! second process gets [`IndexError::Locked`]). Calls are blocking: async callers go through
//! `spawn_blocking`. Knows nothing of vectors or fusion.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tantivy::collector::{Count, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::config::Bm25Config;
use crate::error::ErrorKind;

/// Words of a search query that count (a question is a few dozen; a pasted page is cut here).
pub const MAX_QUERY_WORDS: usize = 512;

/// Errors of the BM25 index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Another process holds the index writer.
    #[error("BM25 index at {path} is being written by another process; retry when it finishes")]
    Locked { path: PathBuf },
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

#[derive(Debug, Clone, Copy)]
struct Fields {
    chunk_id: Field,
    doc_id: Field,
    title: Field,
    source: Field,
    text: Field,
    ordinal: Field,
    metadata: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let stemmed = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    let fields = Fields {
        chunk_id: builder.add_text_field("chunk_id", STRING | STORED),
        doc_id: builder.add_text_field("doc_id", STRING | STORED),
        title: builder.add_text_field("title", stemmed.clone()),
        source: builder.add_text_field("source", STORED),
        text: builder.add_text_field("text", stemmed),
        ordinal: builder.add_u64_field("ordinal", STORED),
        metadata: builder.add_text_field("metadata", STORED),
    };
    (builder.build(), fields)
}

/// One collection's BM25 index and chunk store.
pub struct Bm25Index {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
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
    /// Open the index in `dir`, creating it when the directory is empty or missing.
    pub fn open_or_create(dir: &Path, writer_heap_mb: usize) -> Result<Bm25Index, IndexError> {
        let err = |source| IndexError::Tantivy {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
        let (schema, fields) = schema();
        let index = if dir.join("meta.json").exists() {
            Index::open_in_dir(dir).map_err(err)?
        } else {
            Index::create_in_dir(dir, schema).map_err(err)?
        };
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
            writer: Mutex::new(None),
            writer_heap_bytes: writer_heap_mb * 1024 * 1024,
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
        self.with_writer(|writer, f| {
            for doc_id in doc_ids {
                writer.delete_term(Term::from_field_text(f.doc_id, doc_id));
            }
            for c in chunks {
                let mut doc = TantivyDocument::default();
                doc.add_text(f.chunk_id, &c.chunk_id);
                doc.add_text(f.doc_id, &c.doc_id);
                doc.add_text(f.title, &c.title);
                doc.add_text(f.source, &c.source);
                doc.add_text(f.text, &c.text);
                doc.add_u64(f.ordinal, c.ordinal);
                doc.add_text(f.metadata, &c.metadata);
                writer.add_document(doc)?;
            }
            writer.commit()?;
            Ok(())
        })?;
        self.reader.reload().map_err(|e| self.tantivy_err(e))
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

    /// Number of chunks searchable now.
    pub fn num_chunks(&self) -> Result<usize, IndexError> {
        self.reader
            .searcher()
            .search(&AllQuery, &Count)
            .map_err(|e| self.tantivy_err(e))
    }

    /// BM25 top `k` chunk ids for a free-text query, best first (see [`Self::free_text_query`]).
    pub fn search(
        &self,
        query: &str,
        k: usize,
        settings: &Bm25Config,
    ) -> Result<Vec<(String, f32)>, IndexError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let query = self.free_text_query(query, settings)?;
        let top = searcher
            .search(&query, &TopDocs::with_limit(k).order_by_score())
            .map_err(|e| self.tantivy_err(e))?;
        top.into_iter()
            .map(|(score, addr)| {
                let doc: TantivyDocument = searcher.doc(addr).map_err(|e| self.tantivy_err(e))?;
                Ok((text_of(&doc, self.fields.chunk_id), score))
            })
            .collect()
    }

    /// Free text as plain disjunctive BM25 over title and text: each whitespace-separated word,
    /// without an English possessive `'s` (the text's "Beyoncé's" indexes "beyoncé" then "s", and
    /// a question's "Beyoncé's" must match a text that says "Beyoncé"), through the field's own
    /// analyzer, is a term, or a phrase when it splits into several (`pg_dump` -> "pg dump").
    /// Title clauses are weighted by `settings.title_weight` (left out at 0). There is no query
    /// syntax: nothing a user types is an operator (`-Fc` is not a negation, `title:` not a
    /// field), and nothing nests, so no input can overflow the stack (tantivy's parser recursed
    /// once per `(`: 100k of them aborted the process). The first [`MAX_QUERY_WORDS`] words count.
    fn free_text_query(
        &self,
        text: &str,
        settings: &Bm25Config,
    ) -> Result<BooleanQuery, IndexError> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for (field, weight) in [
            (self.fields.title, settings.title_weight),
            (self.fields.text, 1.0),
        ] {
            if weight <= 0.0 {
                continue;
            }
            let mut analyzer = self
                .index
                .tokenizer_for_field(field)
                .map_err(|e| self.tantivy_err(e))?;
            for word in text.split_whitespace().take(MAX_QUERY_WORDS) {
                let mut terms = Vec::new();
                let mut stream = analyzer.token_stream(without_possessive(word));
                while stream.advance() {
                    terms.push(Term::from_field_text(field, &stream.token().text));
                }
                let query: Box<dyn Query> = match terms.len() {
                    0 => continue,
                    1 => Box::new(TermQuery::new(
                        terms.remove(0),
                        IndexRecordOption::WithFreqs,
                    )),
                    _ => Box::new(PhraseQuery::new(terms)),
                };
                let query = if weight == 1.0 {
                    query
                } else {
                    Box::new(BoostQuery::new(query, weight))
                };
                clauses.push((Occur::Should, query));
            }
        }
        Ok(BooleanQuery::new(clauses))
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
            let doc: TantivyDocument = searcher.doc(addr).map_err(|e| self.tantivy_err(e))?;
            out.push(self.record(&doc));
        }
        Ok(out)
    }

    /// The stored chunks for these ids (missing ids are left out).
    pub fn get_chunks(
        &self,
        chunk_ids: &[String],
    ) -> Result<HashMap<String, ChunkRecord>, IndexError> {
        let searcher = self.reader.searcher();
        let mut out = HashMap::with_capacity(chunk_ids.len());
        for id in chunk_ids {
            let query = TermQuery::new(
                Term::from_field_text(self.fields.chunk_id, id),
                IndexRecordOption::Basic,
            );
            let top = searcher
                .search(&query, &TopDocs::with_limit(1).order_by_score())
                .map_err(|e| self.tantivy_err(e))?;
            if let Some((_, addr)) = top.first() {
                let doc: TantivyDocument = searcher.doc(*addr).map_err(|e| self.tantivy_err(e))?;
                out.insert(id.clone(), self.record(&doc));
            }
        }
        Ok(out)
    }

    fn record(&self, doc: &TantivyDocument) -> ChunkRecord {
        let f = &self.fields;
        ChunkRecord {
            chunk_id: text_of(doc, f.chunk_id),
            doc_id: text_of(doc, f.doc_id),
            title: text_of(doc, f.title),
            source: text_of(doc, f.source),
            text: text_of(doc, f.text),
            ordinal: doc
                .get_first(f.ordinal)
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            metadata: text_of(doc, f.metadata),
        }
    }
}

/// `word` without a trailing English possessive (`'s`, `’s`).
fn without_possessive(word: &str) -> &str {
    ["'s", "’s", "'S", "’S"]
        .iter()
        .find_map(|suffix| word.strip_suffix(suffix))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(word)
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
            hits[0].0, "c1",
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
        assert!(index.get_chunks(&["c1".into()]).expect("get").is_empty());
        let got = index.get_chunks(&["c3".into(), "c2".into()]).expect("get");
        assert_eq!(got["c3"].title, "title of a");
        assert_eq!(got["c2"].source, "/src/b");

        index.delete_documents(&["b".into()]).expect("delete");
        assert_eq!(index.num_chunks().expect("count"), 1);
        index.close_writer().expect("close");

        // Reopen from disk.
        let index = Bm25Index::open_or_create(dir.path(), 20).expect("reopen");
        assert_eq!(index.num_chunks().expect("count"), 1);
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
        assert_eq!(index.search("-templates", 5, &S).expect("minus")[0].0, "c1");
        assert_eq!(
            index.search("title: templates", 5, &S).expect("colon")[0].0,
            "c1"
        );
        // Deep nesting once overflowed the parser's recursion and aborted the process.
        let nested = format!("{}templates{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(index.search(&nested, 5, &S).expect("nested")[0].0, "c1");
        // A pasted page: only the first MAX_QUERY_WORDS words count, and it still answers.
        let long = "filler ".repeat(50_000) + "templates";
        index.search(&long, 5, &S).expect("long query");
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
        assert_eq!(hits[0].0, "c1");
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
        assert_eq!(hits[0].0, "c2", "{hits:?}");
        let no_titles = Bm25Config { title_weight: 0.0 };
        let hits = index.search("Beyoncé", 5, &no_titles).expect("search");
        assert_eq!(
            hits.len(),
            1,
            "the title is not searched at weight 0: {hits:?}"
        );
        let heavy = Bm25Config { title_weight: 5.0 };
        let hits = index.search("Beyoncé", 5, &heavy).expect("search");
        assert_eq!(hits[0].0, "c1", "a heavy title outranks the text: {hits:?}");
        assert_eq!(
            without_possessive("'s"),
            "'s",
            "nothing is left to search otherwise"
        );
        assert_eq!(without_possessive("Mozart’s"), "Mozart");
    }
}
