//! Writes that change documents across a collection's three stores (vectors, BM25, ledger):
//! begun with a pending-write record, finished by recording the outcome in the ledger, rolled
//! back when a step fails (see [`super::pending`] for the record and the repair). The document
//! delete lives here; the ingest batch (`crate::ingest`) runs through the same three calls.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{Collection, CollectionError, DocumentEntry, pending};
use crate::killpoint;

impl Collection {
    /// Record that the stores are about to change `docs` (document id -> the content hash it will
    /// have, `None` when it is being deleted), so that a kill before [`Collection::finish_write`]
    /// is repaired at the next open (see [`pending`]). One write at a time per collection.
    pub fn begin_write(
        &self,
        docs: BTreeMap<String, Option<String>>,
    ) -> Result<(), CollectionError> {
        if self.dir.join(pending::PENDING_FILE).exists() {
            return Err(CollectionError::Unrepaired {
                name: self.name.clone(),
            });
        }
        pending::begin(self, &pending::PendingWrite { docs })
    }

    /// Roll back the write begun by [`Collection::begin_write`] after one of its steps failed,
    /// so the stores agree again (see [`pending`]); when that fails too, the record stays and the
    /// next open repairs it, and no other write starts meanwhile.
    pub async fn abandon_write(self: &Arc<Self>) {
        if let Err(e) = pending::repair(self).await {
            tracing::error!(collection = %self.name, error = %e, "a failed write could not be rolled back");
        }
    }

    /// Record the outcome of the write begun by [`Collection::begin_write`] in the ledger, and
    /// forget the write.
    pub fn finish_write(
        &self,
        changes: Vec<(String, Option<DocumentEntry>)>,
    ) -> Result<(), CollectionError> {
        self.update_ledger(changes)?;
        killpoint::reach("write.ledger");
        pending::end(self)
    }

    /// Delete documents from all three stores, and the files of those that were uploaded into
    /// the collection (`uploads/`); then the vector store settles its index and the collection is
    /// flushed.
    pub async fn delete_documents(
        self: &Arc<Self>,
        doc_ids: Vec<String>,
    ) -> Result<(), CollectionError> {
        self.begin_write(doc_ids.iter().map(|id| (id.clone(), None)).collect())?;
        killpoint::reach("delete.pending");
        let stored = purge(self, &doc_ids, ["delete.vectors", "delete.bm25"]).await;
        let removed = doc_ids.iter().map(|id| (id.clone(), None)).collect();
        if let Err(e) = stored.and_then(|()| self.finish_write(removed)) {
            self.abandon_write().await;
            return Err(e);
        }
        remove_uploaded_originals(&self.dir, &doc_ids);
        self.settle("delete.optimized").await
    }

    /// End of a write run (an ingest, a delete): the vector store builds its index over what was
    /// written (HNSW once a segment is large enough; searches go on meanwhile), the BM25 index
    /// merges segments, size tiered (`Bm25Index::compact`; searches go on over the old ones
    /// meanwhile), `kill_point` is reached, then the collection is flushed and its index writer
    /// released.
    pub async fn settle(&self, kill_point: &str) -> Result<(), CollectionError> {
        self.vectors.optimize().await?;
        let index = Arc::clone(&self.index);
        let started = std::time::Instant::now();
        let merged = tokio::task::spawn_blocking(move || index.compact()).await??;
        if merged > 0 {
            tracing::info!(collection = %self.name, segments = merged,
                seconds = started.elapsed().as_secs_f64(), "BM25 segments merged");
        }
        killpoint::reach(kill_point);
        self.close().await
    }
}

/// Remove documents from the vector store (flushed: qdrant-edge does not replay its WAL) and from
/// BM25, reaching `kill_points` after each. The ledger is the caller's to change: a delete records
/// the removal as its outcome, a repair as its rollback.
pub(super) async fn purge(
    collection: &Collection,
    doc_ids: &[String],
    kill_points: [&str; 2],
) -> Result<(), CollectionError> {
    collection.vectors.delete_docs(doc_ids.to_vec()).await?;
    collection.vectors.flush().await?;
    killpoint::reach(kill_points[0]);
    let index = Arc::clone(&collection.index);
    let ids = doc_ids.to_vec();
    tokio::task::spawn_blocking(move || index.delete_documents(&ids)).await??;
    killpoint::reach(kill_points[1]);
    Ok(())
}

/// Delete the uploaded files (`<collection>/uploads/<name>`) that were these documents: a deleted
/// document's text must not stay on disk. Files elsewhere (ingested from the CLI) are the user's
/// own and are left alone.
fn remove_uploaded_originals(collection_dir: &Path, doc_ids: &[String]) {
    let Ok(uploads) = std::fs::canonicalize(collection_dir.join("uploads")) else {
        return;
    };
    for doc_id in doc_ids {
        let path = Path::new(doc_id);
        if path.parent() == Some(uploads.as_path())
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a deleted document's upload");
        }
    }
}
