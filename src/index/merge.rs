//! Which segments a compaction merges ([`Bm25Index::compact`](super::Bm25Index::compact)), size
//! tiered: what was written since the last full merge is merged on its own while it is small
//! against the largest segment, and everything is merged into one once it is not (or once the
//! largest segment holds many deleted chunks). A small upload to a large collection then costs a
//! merge of its own size, not a rewrite of the whole index, and the full rewrites come at most
//! once per [`SMALL_SHARE`]-fold growth: the cost per chunk stays bounded, and a search visits at
//! most two segments after any write run.

/// The other segments are merged on their own while they hold less than the largest segment's
/// chunks divided by this (and its deleted chunks are below the same share).
pub(super) const SMALL_SHARE: u32 = 8;

/// A searchable segment: its chunks including deleted ones, and the deleted ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct SegmentSize<Id> {
    pub(super) id: Id,
    pub(super) max_doc: u32,
    pub(super) deleted: u32,
}

/// The segments to merge into one (empty: nothing to do).
pub(super) fn to_merge<Id: Copy>(segments: &[SegmentSize<Id>]) -> Vec<Id> {
    let Some(largest) = segments.iter().max_by_key(|s| s.max_doc) else {
        return Vec::new();
    };
    if segments.len() < 2 {
        return Vec::new();
    }
    let rest: Vec<&SegmentSize<Id>> = segments
        .iter()
        .filter(|s| !std::ptr::eq(*s, largest))
        .collect();
    let rest_docs: u64 = rest.iter().map(|s| u64::from(s.max_doc)).sum();
    let share = u64::from(largest.max_doc / SMALL_SHARE);
    let small = rest_docs < share && u64::from(largest.deleted) < share;
    if !small {
        return segments.iter().map(|s| s.id).collect();
    }
    if rest.len() < 2 {
        return Vec::new();
    }
    rest.iter().map(|s| s.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(docs: &[(u32, u32)]) -> Vec<SegmentSize<usize>> {
        docs.iter()
            .enumerate()
            .map(|(id, &(max_doc, deleted))| SegmentSize {
                id,
                max_doc,
                deleted,
            })
            .collect()
    }

    #[test]
    fn small_writes_merge_among_themselves_and_large_ones_merge_everything() {
        // One segment, or a large one and one small one: nothing to do.
        assert!(to_merge(&sizes(&[(1000, 0)])).is_empty());
        assert!(to_merge(&sizes(&[(1000, 0), (10, 0)])).is_empty());
        // Several small ones beside a large one: the small ones only.
        assert_eq!(to_merge(&sizes(&[(10, 0), (1000, 0), (20, 0)])), vec![0, 2]);
        // Together at least an eighth of the largest: all of them.
        assert_eq!(
            to_merge(&sizes(&[(100, 0), (1000, 0), (30, 0)])),
            vec![0, 1, 2]
        );
        assert_eq!(to_merge(&sizes(&[(1000, 0), (125, 0)])), vec![0, 1]);
        // Many deleted chunks in the largest: all of them, to purge those.
        assert_eq!(to_merge(&sizes(&[(1000, 200), (10, 0)])), vec![0, 1]);
        // Segments of one size (an ingest of many batches): all of them.
        assert_eq!(to_merge(&sizes(&[(5, 0), (5, 0), (5, 0)])), vec![0, 1, 2]);
    }
}
