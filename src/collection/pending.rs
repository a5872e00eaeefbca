//! The pending-write record of a collection (`pending.json`): which documents a multi-step write
//! (an ingest batch, a document delete) is changing across the three stores (vectors, BM25,
//! ledger). It is written before the first store is touched and removed once the ledger records
//! the outcome, so a process killed in between leaves it behind, and the next open of the
//! collection repairs exactly those documents ([`repair`]) before anything reads them.
//!
//! The repair rolls back rather than forward (the embeddings of an interrupted batch are gone):
//! a document the ledger already records with the hash the write gave it is kept (its vectors
//! were flushed and its chunks committed before the ledger was written); every other document of
//! the record is removed from all three stores, so they agree again, and the next ingest of the
//! same files stores them whole. Repairing twice is harmless, so a kill during the repair is too.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Catalog, Collection, CollectionError, Ledger};
use crate::index::IndexError;

pub(crate) const PENDING_FILE: &str = "pending.json";

/// The documents one write is changing.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PendingWrite {
    /// Document id -> the content hash the write stores (`None`: the write deletes it).
    pub(crate) docs: BTreeMap<String, Option<String>>,
}

impl PendingWrite {
    /// The documents that need repair: all but those the ledger records as the write left them.
    fn unfinished(&self, ledger: &Ledger) -> Vec<String> {
        self.docs
            .iter()
            .filter(|(doc_id, hash)| {
                let stored = ledger.get(*doc_id).map(|e| &e.content_hash);
                hash.is_none() || stored != hash.as_ref()
            })
            .map(|(doc_id, _)| doc_id.clone())
            .collect()
    }
}

/// Record `write` before its first store is touched.
pub(crate) fn begin(collection: &Collection, write: &PendingWrite) -> Result<(), CollectionError> {
    let path = collection.dir.join(PENDING_FILE);
    let bytes = serde_json::to_vec(write).expect("pending write serialises to JSON");
    super::write_atomic(&path, &bytes).map_err(Catalog::io_err(collection.name(), &path))
}

/// The write is recorded in the ledger: forget it.
pub(crate) fn end(collection: &Collection) -> Result<(), CollectionError> {
    let path = collection.dir.join(PENDING_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Catalog::io_err(collection.name(), &path)(e)),
    }
}

fn read(dir: &Path, name: &str) -> Result<Option<PendingWrite>, CollectionError> {
    let path = dir.join(PENDING_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Catalog::io_err(name, &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| CollectionError::Corrupt {
            name: name.to_string(),
            path,
            source,
        })
}

/// Repair what a killed write left, if anything; returns the documents removed (to be ingested
/// again).
pub(crate) async fn repair(collection: &Arc<Collection>) -> Result<Vec<String>, CollectionError> {
    let Some(write) = read(&collection.dir, collection.name())? else {
        return Ok(Vec::new());
    };
    // The BM25 writer lock first: a remote vector store can be open in two processes at once,
    // and the record of a write another process is still making is that process's to finish.
    let index = Arc::clone(&collection.index);
    match tokio::task::spawn_blocking(move || index.open_writer()).await? {
        Err(IndexError::Locked { .. }) => {
            tracing::info!(collection = %collection.name(), "another process is writing: its pending write is left to it");
            return Ok(Vec::new());
        }
        opened => opened?,
    }
    let undo = write.unfinished(&collection.ledger());
    if !undo.is_empty() {
        super::write::purge(collection, &undo, ["repair.vectors", "repair.bm25"]).await?;
        collection.update_ledger(undo.iter().map(|id| (id.clone(), None)).collect())?;
        tracing::warn!(
            collection = %collection.name(),
            documents = undo.len(),
            "an interrupted write was rolled back: ingest its documents again"
        );
    }
    end(collection)?;
    let index = Arc::clone(&collection.index);
    tokio::task::spawn_blocking(move || index.close_writer()).await??;
    Ok(undo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::DocumentEntry;

    fn entry(hash: &str) -> DocumentEntry {
        DocumentEntry {
            title: String::new(),
            source: String::new(),
            content_hash: hash.to_string(),
            chunks: 1,
            ingested_at: 0,
        }
    }

    #[test]
    fn only_documents_the_ledger_records_as_written_are_kept() {
        let mut write = PendingWrite::default();
        for (doc, hash) in [
            ("done", Some("new")),
            ("old", Some("new")),
            ("absent", Some("new")),
        ] {
            write.docs.insert(doc.into(), hash.map(String::from));
        }
        write.docs.insert("deleted".into(), None);
        write.docs.insert("not-yet-deleted".into(), None);
        let ledger: Ledger = [("done", "new"), ("old", "old"), ("not-yet-deleted", "h")]
            .into_iter()
            .map(|(doc, hash)| (doc.to_string(), entry(hash)))
            .collect();
        let bytes = serde_json::to_vec(&write).expect("json");
        let write: PendingWrite = serde_json::from_slice(&bytes).expect("parse");
        assert_eq!(
            write.unfinished(&ledger),
            ["absent", "deleted", "not-yet-deleted", "old"]
        );
    }
}
