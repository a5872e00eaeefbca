//! Ingest: files -> documents -> chunks -> embeddings -> BM25 index + vector store + ledger.
//!
//! A document is replaced whole: its new chunks are made and embedded first, and only then are its
//! old chunks deleted and the new ones written, so a file that fails to load, chunk or embed leaves
//! what was stored before untouched. The store steps of a batch (vectors, BM25, ledger) run inside
//! the collection's pending write (`collection::pending`): a batch that fails or is killed half-way
//! is rolled back at once or at the next open, so the three stores always agree. Chunk ids are
//! content hashes, so re-ingesting the same file replaces its chunks instead of duplicating them,
//! and unchanged documents are skipped.

pub mod load;
pub mod pdf;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chunk::chunk_text;
use crate::collection::{Collection, CollectionError, DocumentEntry, now_secs};
use crate::embed::{EmbedError, Embedder};
use crate::error::ErrorKind;
use crate::index::ChunkRecord;
use crate::killpoint;
use crate::vectors::VectorPoint;
pub use load::{Document, Format, LoadError};

/// Errors that stop an ingest (per-file problems are collected in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("input {path} does not exist or cannot be read: {source}")]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Collection(#[from] CollectionError),
    #[error("ingest task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl IngestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IngestError::Input { .. } => ErrorKind::InvalidInput,
            IngestError::Embed(e) => e.kind(),
            IngestError::Collection(e) => e.kind(),
            IngestError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// One input that could not be ingested, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IngestFailure {
    pub source: String,
    pub error: String,
}

/// The summary of an ingest run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    /// Files read.
    pub files: usize,
    /// Files under the given directories that no loader reads (by extension).
    pub skipped_files: usize,
    /// Documents written (new or changed).
    pub documents: usize,
    /// Documents whose content had not changed since the last ingest.
    pub unchanged: usize,
    /// Chunks written.
    pub chunks: usize,
    /// The first [`MAX_FAILURES`] failures (of `failures_total`).
    pub failures: Vec<IngestFailure>,
    /// Files, records and documents that failed, all counted.
    pub failures_total: usize,
    pub seconds: f64,
}

/// Failures one report keeps with their message: job results and memory stay small whatever
/// the input.
pub const MAX_FAILURES: usize = 200;

impl IngestReport {
    /// Count a failure; keep its message while fewer than [`MAX_FAILURES`] are kept.
    pub fn fail(&mut self, source: &str, error: impl ToString) {
        self.failures_total += 1;
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(IngestFailure {
                source: source.to_string(),
                error: error.to_string(),
            });
        }
    }

    pub fn chunks_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.chunks as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Something to tell the user about progress (the CLI draws a bar; tests pass a no-op).
pub trait Progress: Send + Sync {
    fn start(&self, total_files: u64);
    fn advance(&self, files: u64, message: &str);
    fn finish(&self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64, _: &str) {}
    fn finish(&self) {}
}

/// Expand inputs: files as given (any extension, the format decides), directories walked
/// recursively for files whose extension a loader reads.
pub fn collect_files(
    inputs: &[PathBuf],
    format: Format,
) -> Result<(Vec<PathBuf>, usize), IngestError> {
    let mut files = Vec::new();
    let mut skipped = 0;
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|source| IngestError::Input {
            path: input.clone(),
            source,
        })?;
        if meta.is_file() {
            files.push(input.clone());
            continue;
        }
        for entry in walkdir::WalkDir::new(input)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| IngestError::Input {
                path: input.clone(),
                source: e.into(),
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let readable = match format {
                Format::Auto => Format::detect(entry.path()).is_some(),
                Format::Squad => entry.path().extension().is_some_and(|e| e == "json"),
                f => Format::detect(entry.path()) == Some(f),
            };
            if readable {
                files.push(entry.into_path());
            } else {
                skipped += 1;
            }
        }
    }
    Ok((files, skipped))
}

/// Content hash identifying a chunk: stable across runs for the same document and text.
pub fn chunk_id(doc_id: &str, ordinal: usize, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(doc_id.as_bytes());
    h.update([0]);
    h.update(ordinal.to_le_bytes());
    h.update(text.as_bytes());
    hex::encode(&h.finalize()[..16])
}

fn content_hash(doc: &Document) -> String {
    let mut h = Sha256::new();
    h.update(doc.title.as_bytes());
    h.update([0]);
    h.update(doc.text.as_bytes());
    h.update([0]);
    h.update(doc.metadata.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// A document prepared for writing.
struct Prepared {
    doc: Document,
    hash: String,
    chunks: Vec<ChunkRecord>,
}

/// Ingests files into one collection.
pub struct Ingestor {
    collection: Arc<Collection>,
    embedder: Arc<Embedder>,
    batch_docs: usize,
}

impl Ingestor {
    pub fn new(collection: Arc<Collection>, embedder: Arc<Embedder>, batch_docs: usize) -> Self {
        Ingestor {
            collection,
            embedder,
            batch_docs: batch_docs.max(1),
        }
    }

    /// Ingest every file under `inputs` as `format`.
    pub async fn ingest_paths(
        &self,
        inputs: &[PathBuf],
        format: Format,
        progress: &dyn Progress,
    ) -> Result<IngestReport, IngestError> {
        let started = Instant::now();
        let (files, skipped_files) = collect_files(inputs, format)?;
        let mut report = IngestReport {
            skipped_files,
            ..IngestReport::default()
        };
        progress.start(files.len() as u64);
        let mut pending: Vec<Document> = Vec::new();
        for path in files {
            let loaded = load_file(path.clone(), format).await?;
            report.files += 1;
            match loaded {
                Ok(loaded) => {
                    let source = path.display().to_string();
                    for e in &loaded.errors {
                        report.fail(&source, e);
                    }
                    let unkept = loaded.errors_total - loaded.errors.len();
                    if unkept > 0 {
                        report.fail(&source, format!("{unkept} more bad records not listed"));
                        report.failures_total += unkept - 1;
                    }
                    pending.extend(loaded.documents);
                }
                Err(e) => report.fail(&path.display().to_string(), e),
            }
            while pending.len() >= self.batch_docs {
                let batch: Vec<Document> = pending.drain(..self.batch_docs).collect();
                self.write_batch(batch, &mut report).await?;
            }
            progress.advance(
                1,
                &path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        if !pending.is_empty() {
            self.write_batch(std::mem::take(&mut pending), &mut report)
                .await?;
        }
        self.collection.settle("ingest.optimized").await?;
        progress.finish();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Ingest documents that are already in memory (used by loaders of other sources and tests).
    pub async fn ingest_documents(&self, docs: Vec<Document>) -> Result<IngestReport, IngestError> {
        let started = Instant::now();
        let mut report = IngestReport::default();
        for batch in docs.chunks(self.batch_docs) {
            self.write_batch(batch.to_vec(), &mut report).await?;
        }
        self.collection.settle("ingest.optimized").await?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Chunk, embed and write one batch of documents.
    async fn write_batch(
        &self,
        docs: Vec<Document>,
        report: &mut IngestReport,
    ) -> Result<(), IngestError> {
        let prepared = self.prepare(docs, report);
        if prepared.is_empty() {
            return Ok(());
        }
        // Embed title + text: the title often carries the topic a chunk's text leaves implicit.
        let inputs: Vec<String> = prepared
            .iter()
            .flat_map(|p| p.chunks.iter().map(|c| format!("{}\n{}", c.title, c.text)))
            .collect();
        let vectors = self.embedder.embed(inputs).await?;
        let mut vectors = vectors.into_iter();
        let mut points = Vec::new();
        for p in &prepared {
            for c in &p.chunks {
                let vector = vectors.next().expect("one embedding per chunk");
                points.push(VectorPoint {
                    chunk_id: c.chunk_id.clone(),
                    doc_id: c.doc_id.clone(),
                    vector,
                });
            }
        }
        let writing = prepared
            .iter()
            .map(|p| (p.doc.doc_id.clone(), Some(p.hash.clone())))
            .collect();
        self.collection.begin_write(writing)?;
        killpoint::reach("ingest.pending");
        if let Err(e) = self.store_batch(&prepared, points).await {
            self.collection.abandon_write().await;
            return Err(e);
        }
        report.documents += prepared.len();
        report.chunks += prepared.iter().map(|p| p.chunks.len()).sum::<usize>();
        Ok(())
    }

    /// Chunk the batch's new and changed documents (unchanged and empty ones are counted).
    fn prepare(&self, docs: Vec<Document>, report: &mut IngestReport) -> Vec<Prepared> {
        let ledger = self.collection.ledger();
        let chunking = self.collection.settings().chunking;
        // Later duplicates of a doc id in the same batch win, as they would across batches.
        let mut by_id: std::collections::BTreeMap<String, Document> = Default::default();
        for doc in docs {
            by_id.insert(doc.doc_id.clone(), doc);
        }
        let mut prepared = Vec::new();
        for doc in by_id.into_values() {
            let hash = content_hash(&doc);
            if ledger
                .get(&doc.doc_id)
                .is_some_and(|e| e.content_hash == hash)
            {
                report.unchanged += 1;
                continue;
            }
            let metadata = doc.metadata.to_string();
            let chunks: Vec<ChunkRecord> = chunk_text(&doc.text, &chunking)
                .into_iter()
                .enumerate()
                .map(|(i, c)| ChunkRecord {
                    chunk_id: chunk_id(&doc.doc_id, i, &c.text),
                    doc_id: doc.doc_id.clone(),
                    title: doc.title.clone(),
                    source: doc.source.clone(),
                    text: c.text,
                    ordinal: i as u64,
                    metadata: metadata.clone(),
                })
                .collect();
            if chunks.is_empty() {
                report.fail(&doc.source, LoadError::NoText);
                continue;
            }
            prepared.push(Prepared { doc, hash, chunks });
        }
        prepared
    }

    /// Replace the batch's documents in the vector store, then BM25, then the ledger (inside the
    /// pending write the caller began).
    async fn store_batch(
        &self,
        prepared: &[Prepared],
        points: Vec<VectorPoint>,
    ) -> Result<(), IngestError> {
        let doc_ids: Vec<String> = prepared.iter().map(|p| p.doc.doc_id.clone()).collect();
        let chunks: Vec<ChunkRecord> = prepared.iter().flat_map(|p| p.chunks.clone()).collect();
        let vectors_store = &self.collection.vectors;
        vectors_store
            .delete_docs(doc_ids.clone())
            .await
            .map_err(CollectionError::from)?;
        killpoint::reach("ingest.vectors_deleted");
        vectors_store
            .upsert(points)
            .await
            .map_err(CollectionError::from)?;
        killpoint::reach("ingest.vectors_upserted");
        // qdrant-edge does not replay its WAL on load: flush before the ledger records the batch,
        // or a crash would leave documents marked as stored whose vectors are gone.
        vectors_store.flush().await.map_err(CollectionError::from)?;
        killpoint::reach("ingest.vectors_flushed");
        let index = Arc::clone(&self.collection.index);
        tokio::task::spawn_blocking(move || index.replace_documents(&doc_ids, &chunks))
            .await?
            .map_err(CollectionError::from)?;
        killpoint::reach("ingest.bm25");
        let now = now_secs();
        let changes = prepared
            .iter()
            .map(|p| {
                (
                    p.doc.doc_id.clone(),
                    Some(DocumentEntry {
                        title: p.doc.title.clone(),
                        source: p.doc.source.clone(),
                        content_hash: p.hash.clone(),
                        chunks: p.chunks.len(),
                        ingested_at: now,
                    }),
                )
            })
            .collect();
        self.collection.finish_write(changes)?;
        Ok(())
    }
}

/// Read and parse one file on the blocking pool. The outer error is an I/O failure of the task;
/// the inner one is this file's problem.
async fn load_file(
    path: PathBuf,
    format: Format,
) -> Result<Result<load::Loaded, String>, IngestError> {
    Ok(tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
        let canonical = canonical(&path);
        load::load(&canonical, &bytes, format).map_err(|e| e.to_string())
    })
    .await?)
}

/// The canonical path is a file's document id, so the same file reached by two paths is one
/// document.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_stable_and_distinct() {
        let a = chunk_id("doc", 0, "text");
        assert_eq!(a, chunk_id("doc", 0, "text"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, chunk_id("doc", 1, "text"));
        assert_ne!(a, chunk_id("doc2", 0, "text"));
        assert_ne!(a, chunk_id("doc", 0, "text2"));
    }

    #[test]
    fn collect_files_walks_dirs_and_counts_skips() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        for name in ["a.txt", "sub/b.html", "c.png", "sub/d.md"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        let (files, skipped) =
            collect_files(&[dir.path().to_path_buf()], Format::Auto).expect("collect");
        assert_eq!(files.len(), 3);
        assert_eq!(skipped, 1);
        let missing = collect_files(&[dir.path().join("nope")], Format::Auto);
        assert!(matches!(missing, Err(IngestError::Input { .. })));
    }
}
