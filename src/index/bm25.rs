//! How a clause's matches score: BM25 with a collection's `k1` and `b` over the whole index's
//! statistics, for terms and for phrases (words the analyzer split), whose occurrences are
//! counted here from their terms' positions. The weights are computed as tantivy's `Bm25Weight`
//! computes them (the same operations in the same order), so at tantivy's 1.2 / 0.75 the scores
//! are the same bits as tantivy's own queries'. Pure over a segment's postings; knows nothing of
//! which fields a query searches or how the best are found ([`super::topk`]).

use std::collections::HashMap;
use std::sync::Arc;

use tantivy::fieldnorm::FieldNormReader;
use tantivy::postings::{Postings, SegmentPostings, TermInfo};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::{DocId, DocSet, Score, SegmentReader, TERMINATED, Term};

/// BM25's parameters: term-frequency saturation `k1` and length normalisation `b` (tantivy's
/// own queries use 1.2 and 0.75).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bm25Params {
    pub(crate) k1: Score,
    pub(crate) b: Score,
}

/// How a clause's matches score: BM25 over the whole index's statistics, computed as tantivy's
/// `Bm25Weight` does (the same operations in the same order: with k1 1.2 and b 0.75 the same
/// bits as tantivy's own queries, which the tests check).
#[derive(Clone)]
pub(super) struct Bm25 {
    /// idf x (1 + k1) x the clause's weight.
    weight: Score,
    /// Per field-norm id: k1 x (1 - b + b x length / average length); one table per field.
    norm: Arc<[Score; 256]>,
}

impl Bm25 {
    #[inline]
    pub(super) fn score(&self, norm_id: u8, freq: u32) -> Score {
        let freq = freq as Score;
        self.weight * (freq / (freq + self.norm[norm_id as usize]))
    }

    /// The most one match can add (the limit as the term frequency grows).
    pub(super) fn max_score(&self) -> Score {
        self.score(255, 2_013_265_944)
    }
}

/// The index-wide statistics clauses are weighted with, gathered once per search.
pub(super) struct Statistics<'a> {
    segments: &'a [SegmentReader],
    docs: u64,
    params: Bm25Params,
    /// Per field, its norm table (see [`Bm25::norm`]).
    norms: HashMap<Field, Arc<[Score; 256]>>,
}

impl<'a> Statistics<'a> {
    pub(super) fn new(segments: &'a [SegmentReader], params: Bm25Params) -> Statistics<'a> {
        Statistics {
            segments,
            docs: segments.iter().map(|s| u64::from(s.max_doc())).sum(),
            params,
            norms: HashMap::new(),
        }
    }

    /// `term`'s postings in each segment, and in how many documents it occurs in all.
    pub(super) fn term(&self, term: &Term) -> tantivy::Result<(Vec<Option<TermInfo>>, u64)> {
        let mut infos = Vec::with_capacity(self.segments.len());
        for segment in self.segments {
            infos.push(segment.inverted_index(term.field())?.get_term_info(term)?);
        }
        let doc_freq = infos.iter().flatten().map(|i| u64::from(i.doc_freq)).sum();
        Ok((infos, doc_freq))
    }

    /// tantivy's idf: ln(1 + (N - n + 0.5) / (n + 0.5)).
    pub(super) fn idf(&self, doc_freq: u64) -> Score {
        let x = ((self.docs - doc_freq) as Score + 0.5) / (doc_freq as Score + 0.5);
        (1.0 + x).ln()
    }

    /// How a clause of `field` with this idf and weight scores.
    pub(super) fn bm25(&mut self, field: Field, idf: Score, boost: Score) -> tantivy::Result<Bm25> {
        let Bm25Params { k1, b } = self.params;
        let norm = match self.norms.get(&field) {
            Some(norm) => Arc::clone(norm),
            None => {
                let mut tokens = 0u64;
                for segment in self.segments {
                    tokens += segment.inverted_index(field)?.total_num_tokens();
                }
                let average = tokens as Score / self.docs as Score;
                let mut norm = [0.0; 256];
                for (id, slot) in norm.iter_mut().enumerate() {
                    let length = FieldNormReader::id_to_fieldnorm(id as u8) as Score;
                    *slot = k1 * (1.0 - b + b * length / average);
                }
                Arc::clone(self.norms.entry(field).or_insert(Arc::new(norm)))
            }
        };
        let mut weight = idf * (1.0 + k1);
        if boost != 1.0 {
            weight *= boost;
        }
        Ok(Bm25 { weight, norm })
    }
}

/// A phrase clause (a word the analyzer split): its terms in order and how its matches score,
/// the phrase's idf being the sum of its terms' (as in tantivy's `PhraseQuery`).
pub(super) struct Phrase {
    pub(super) terms: Vec<Term>,
    pub(super) weight: Bm25,
}

impl Phrase {
    /// `f(doc, score)` for every document of `segment` that holds the phrase (deleted ones too),
    /// its occurrences counted as the term frequency.
    pub(super) fn for_each(
        &self,
        segment: &SegmentReader,
        mut f: impl FnMut(DocId, Score),
    ) -> tantivy::Result<()> {
        let field = self.terms[0].field();
        let inverted = segment.inverted_index(field)?;
        let mut postings = Vec::with_capacity(self.terms.len());
        for term in &self.terms {
            match inverted.read_postings(term, IndexRecordOption::WithFreqsAndPositions)? {
                Some(list) => postings.push(list),
                None => return Ok(()),
            }
        }
        let norms = segment.get_fieldnorms_reader(field)?;
        let (mut starts, mut next) = (Vec::new(), Vec::new());
        let mut doc = postings[0].doc();
        while let Some(at) = all_at(&mut postings, doc) {
            let count = occurrences(&mut postings, &mut starts, &mut next);
            if count > 0 {
                f(at, self.weight.score(norms.fieldnorm_id(at), count));
            }
            doc = postings[0].advance();
        }
        Ok(())
    }
}

/// The first document at or after `doc` that every list holds, with every list on it (`None`
/// past the last).
fn all_at(lists: &mut [SegmentPostings], mut doc: DocId) -> Option<DocId> {
    let mut agreed = 0;
    let mut i = 0;
    while agreed < lists.len() {
        if doc == TERMINATED {
            return None;
        }
        let mut at = lists[i].doc();
        if at < doc {
            at = lists[i].seek(doc);
        }
        if at == doc {
            agreed += 1;
        } else {
            doc = at;
            agreed = 1;
        }
        i = (i + 1) % lists.len();
    }
    (doc != TERMINATED).then_some(doc)
}

/// How many times the lists' terms occur in a row, in order, in the document they are all on:
/// the positions of the first term from which the second follows at +1, the third at +2, ...
fn occurrences(lists: &mut [SegmentPostings], starts: &mut Vec<u32>, next: &mut Vec<u32>) -> u32 {
    lists[0].positions(starts);
    for (gap, list) in lists.iter_mut().enumerate().skip(1) {
        list.positions(next);
        let gap = gap as u32;
        let mut later = next
            .iter()
            .filter(|&&p| p >= gap)
            .map(|&p| p - gap)
            .peekable();
        starts.retain(|&start| {
            while later.next_if(|&p| p < start).is_some() {}
            later.peek() == Some(&start)
        });
        if starts.is_empty() {
            return 0;
        }
    }
    starts.len() as u32
}
