//! The exact BM25 top `k` of a disjunction of weighted clauses (terms, or phrases of several),
//! scored as [`super::bm25`] says (at tantivy's k1 1.2 / b 0.75: the scores and the top `k` that
//! tantivy's `BooleanQuery` of `Should` clauses gives under `TopDocs`), computed the way a
//! question's long disjunction is cheapest.
//!
//! A question of a dozen words over title, text and window is ~30 clauses, a third of them common
//! words with postings in most chunks. Tantivy's block-max WAND re-sorts every clause's cursor at
//! each document it evaluates, which at that width costs more than the postings themselves (two
//! thirds of a search's time in `block_wand` at 100k chunks). Here each segment is scored term at
//! a time into one accumulator per document, the clauses that can add most first, with the `k`
//! leading documents kept on the side. Once what the remaining (common) clauses could add is below
//! the `k`-th best score so far, no untouched document can enter the top `k`:
//! only the documents still within reach are completed, by seeking the remaining postings
//! (MaxScore), the `k` best first so that the bar is high before the rest are tried. When to stop
//! scoring whole lists is a cost rule: another list is accumulated while that is cheaper than the
//! seeks it saves. Pure over a [`Searcher`]: no I/O of its own; knows nothing of fields or chunks.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Mutex;

use tantivy::fieldnorm::FieldNormReader;
use tantivy::postings::{Postings, SegmentPostings, TermInfo};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::{DocAddress, DocId, DocSet, Score, Searcher, SegmentReader, Term};

pub(super) use super::bm25::Bm25Params;
use super::bm25::{Bm25, Phrase, Statistics};

/// One clause: a term, or a phrase of several terms (of one field), counted `weight` times.
#[derive(Debug, Clone)]
pub(super) struct Clause {
    pub(super) terms: Vec<Term>,
    pub(super) weight: Score,
}

/// What one seek into a long posting list costs against accumulating one posting: a tuning
/// constant (on the 100k-chunk benchmark collection a seek took ~100 ns and a posting ~4 ns before
/// [`Leaders`] made accumulating cheaper; since then 12, 24, 48 and 96 give the same times within
/// noise).
const SEEK_COST: usize = 24;

/// Documents one pass of [`count_at_least`] covers in about the time one posting takes to
/// accumulate (a vector compare of 8 scores against a scattered read-modify-write).
const SCAN_SHARE: usize = 32;

/// Accumulators (a segment's `max_doc` floats each) kept for the next searches: as many as ran at
/// once, up to [`POOLED`], whichever blocking thread runs them.
static POOL: Mutex<Vec<Vec<Score>>> = Mutex::new(Vec::new());

/// The most accumulators kept between searches.
const POOLED: usize = 4;

/// Run `f` with an accumulator from the pool (or a new one), and keep it for the next search.
fn with_accumulator<T>(f: impl FnOnce(&mut Vec<Score>) -> T) -> T {
    let mut acc = POOL
        .lock()
        .ok()
        .and_then(|mut pool| pool.pop())
        .unwrap_or_default();
    let out = f(&mut acc);
    if let Ok(mut pool) = POOL.lock()
        && pool.len() < POOLED
    {
        pool.push(acc);
    }
    out
}

/// The best `k` documents for `clauses` with their scores, best first (equal scores in document
/// order).
pub(super) fn top_k(
    searcher: &Searcher,
    clauses: &[Clause],
    params: Bm25Params,
    k: usize,
) -> tantivy::Result<Vec<(Score, DocAddress)>> {
    if k == 0 || clauses.is_empty() {
        return Ok(Vec::new());
    }
    let query = Prepared::new(searcher, clauses, params)?;
    let mut best = Vec::new();
    for (ord, segment) in searcher.segment_readers().iter().enumerate() {
        let hits = with_accumulator(|acc| query.segment_top_k(ord, segment, k, acc))?;
        best.extend(
            hits.into_iter()
                .map(|(doc, score)| (score, DocAddress::new(ord as u32, doc))),
        );
    }
    best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    best.truncate(k);
    Ok(best)
}

/// A term clause in one segment: its postings' place and how its matches score.
struct List {
    weight: Bm25,
    field: Field,
    info: TermInfo,
}

impl List {
    /// The most one match can add.
    fn bound(&self) -> Score {
        self.weight.max_score()
    }
}

/// The clauses with what every segment shares: their BM25 weights from the whole index's
/// statistics (as tantivy's `TermQuery` and `PhraseQuery` compute them) and each term clause's
/// postings per segment.
struct Prepared {
    /// Per segment, per term clause that occurs in it: its list (unsorted).
    lists: Vec<Vec<List>>,
    phrases: Vec<Phrase>,
}

impl Prepared {
    fn new(
        searcher: &Searcher,
        clauses: &[Clause],
        params: Bm25Params,
    ) -> tantivy::Result<Prepared> {
        let segments = searcher.segment_readers();
        let mut stats = Statistics::new(segments, params);
        let mut lists: Vec<Vec<List>> = segments.iter().map(|_| Vec::new()).collect();
        let mut phrases = Vec::new();
        for clause in clauses {
            let field = clause.terms[0].field();
            let [term] = clause.terms.as_slice() else {
                let mut idf = 0.0;
                for term in &clause.terms {
                    idf += stats.idf(stats.term(term)?.1);
                }
                phrases.push(Phrase {
                    terms: clause.terms.clone(),
                    weight: stats.bm25(field, idf, clause.weight)?,
                });
                continue;
            };
            let (infos, doc_freq) = stats.term(term)?;
            if doc_freq == 0 {
                continue;
            }
            let weight = stats.bm25(field, stats.idf(doc_freq), clause.weight)?;
            for (ord, info) in infos.into_iter().enumerate() {
                if let Some(info) = info {
                    lists[ord].push(List {
                        weight: weight.clone(),
                        field,
                        info,
                    });
                }
            }
        }
        Ok(Prepared { lists, phrases })
    }

    /// The best `k` live documents of segment `ord`, unordered, with their exact scores.
    fn segment_top_k(
        &self,
        ord: usize,
        segment: &SegmentReader,
        k: usize,
        acc: &mut Vec<Score>,
    ) -> tantivy::Result<Vec<(DocId, Score)>> {
        let mut lists: Vec<&List> = self.lists[ord].iter().collect();
        lists.sort_by(|a, b| b.bound().total_cmp(&a.bound()));
        // reach[i]: the most lists i.. can add to any document.
        let mut reach = vec![0.0; lists.len() + 1];
        for i in (0..lists.len()).rev() {
            reach[i] = reach[i + 1] + lists[i].bound();
        }
        acc.clear();
        acc.resize(segment.max_doc() as usize, 0.0);
        let mut leaders = Leaders::new(k, acc.len());
        let alive = segment.alive_bitset();
        for phrase in &self.phrases {
            phrase.for_each(segment, |doc, score| {
                if alive.is_none_or(|a| a.is_alive(doc)) {
                    leaders.add(acc, doc, score);
                }
            })?;
        }
        let mut done = 0;
        let mut bar = None;
        while done < lists.len() {
            bar = stop_before(&mut leaders, acc, &reach[done..], lists[done].info.doc_freq);
            if bar.is_some() {
                #[cfg(test)]
                tests::STOPPED.with(|s| s.set(s.get() + 1));
                break;
            }
            accumulate(segment, lists[done], acc, &mut leaders)?;
            done += 1;
        }
        // Untouched documents (0) are out of reach once there is a bar (reach[done] < bar).
        let cut = bar.map_or(Score::MIN_POSITIVE, |b| b - reach[done]);
        let candidates = at_least(acc, cut);
        complete(segment, &lists[done..], &reach[done..], candidates, k)
    }
}

/// Add every live match of `list` to the accumulator.
fn accumulate(
    segment: &SegmentReader,
    list: &List,
    acc: &mut [Score],
    leaders: &mut Leaders,
) -> tantivy::Result<()> {
    let norms = segment.get_fieldnorms_reader(list.field)?;
    let mut block = segment
        .inverted_index(list.field)?
        .read_block_postings_from_terminfo(&list.info, IndexRecordOption::WithFreqs)?;
    let alive = segment.alive_bitset();
    while block.block_len() > 0 {
        for (&doc, &freq) in block.docs().iter().zip(block.freqs()) {
            if alive.is_none_or(|a| a.is_alive(doc)) {
                let score = list.weight.score(norms.fieldnorm_id(doc), freq);
                leaders.add(acc, doc, score);
            }
        }
        block.advance();
    }
    Ok(())
}

/// The documents whose accumulated score is at least `cut`, in document order.
fn at_least(acc: &[Score], cut: Score) -> Vec<(DocId, Score)> {
    const LANES: usize = 64;
    let mut out = Vec::new();
    for (block, scores) in acc.chunks(LANES).enumerate() {
        // Whether any score of the block makes the cut, without stopping early: a fold the
        // compiler turns into vector compares.
        if scores.iter().fold(false, |any, &s| any | (s >= cut)) {
            for (lane, &s) in scores.iter().enumerate() {
                if s >= cut {
                    out.push(((block * LANES + lane) as DocId, s));
                }
            }
        }
    }
    out
}

/// The best `k` of `candidates` (document order, partial scores) once `lists` (best bound first,
/// `reach` their suffix sums) are added: the `k` best partial scores are completed first, which
/// sets a bar; every other candidate is completed only while it can still pass the bar.
fn complete(
    segment: &SegmentReader,
    lists: &[&List],
    reach: &[Score],
    mut candidates: Vec<(DocId, Score)>,
    k: usize,
) -> tantivy::Result<Vec<(DocId, Score)>> {
    if lists.is_empty() {
        return Ok(best(candidates, k));
    }
    let mut rest = Vec::new();
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        rest = candidates.split_off(k);
        candidates.sort_unstable_by_key(|c| c.0);
        rest.sort_unstable_by_key(|c| c.0);
    }
    let mut cursors = Cursors::open(segment, lists)?;
    let mut out = Vec::with_capacity(candidates.len() + k);
    for (doc, partial) in candidates {
        if let Some(score) = cursors.complete(doc, partial, reach, Score::MIN) {
            out.push((doc, score));
        }
    }
    if rest.is_empty() {
        return Ok(out);
    }
    let mut kept: BinaryHeap<Reverse<Ranked>> = out.iter().map(|c| Reverse(Ranked(c.1))).collect();
    let mut bar = kept.peek().map_or(Score::MIN, |r| r.0.0);
    let mut cursors = Cursors::open(segment, lists)?;
    for (doc, partial) in rest {
        if partial + reach[0] < bar {
            continue;
        }
        let Some(score) = cursors.complete(doc, partial, reach, bar) else {
            continue;
        };
        if score >= bar {
            out.push((doc, score));
            kept.pop();
            kept.push(Reverse(Ranked(score)));
            bar = kept.peek().map_or(Score::MIN, |r| r.0.0);
        }
    }
    Ok(best(out, k))
}

/// The best `k` of `hits`, best first, equal scores in document order.
fn best(mut hits: Vec<(DocId, Score)>, k: usize) -> Vec<(DocId, Score)> {
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    hits.truncate(k);
    hits
}

/// A score ordered by `total_cmp` (for the heap of the `k` best).
#[derive(PartialEq)]
struct Ranked(Score);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One forward cursor per remaining list, for documents visited in increasing order.
struct Cursors<'a> {
    lists: &'a [&'a List],
    postings: Vec<(SegmentPostings, FieldNormReader)>,
}

impl<'a> Cursors<'a> {
    fn open(segment: &SegmentReader, lists: &'a [&'a List]) -> tantivy::Result<Cursors<'a>> {
        let mut postings = Vec::with_capacity(lists.len());
        for list in lists {
            let inverted = segment.inverted_index(list.field)?;
            postings.push((
                inverted.read_postings_from_terminfo(&list.info, IndexRecordOption::WithFreqs)?,
                segment.get_fieldnorms_reader(list.field)?,
            ));
        }
        Ok(Cursors { lists, postings })
    }

    /// `doc`'s score with every list added to `partial`, or `None` as soon as it cannot reach
    /// `bar` (`reach[j]`: the most lists j.. can add).
    fn complete(
        &mut self,
        doc: DocId,
        partial: Score,
        reach: &[Score],
        bar: Score,
    ) -> Option<Score> {
        let mut score = partial;
        for (j, (postings, norms)) in self.postings.iter_mut().enumerate() {
            if score + reach[j] < bar {
                return None;
            }
            let mut at = postings.doc();
            if at < doc {
                at = postings.seek(doc);
            }
            if at == doc {
                score += self.lists[j]
                    .weight
                    .score(norms.fieldnorm_id(doc), postings.term_freq());
            }
        }
        Some(score)
    }
}

/// The bar to complete candidates against, when scoring whole lists should stop before the next
/// one (`reach[0]`: what it and the rest can add; `reach[1]`: the rest without it; `doc_freq`: its
/// length); `None` to accumulate it. Stopping needs the bar (the `k`-th best score so far) to be
/// out of every untouched document's reach, and to cost fewer seeks than accumulating the list
/// would save.
fn stop_before(
    leaders: &mut Leaders,
    acc: &[Score],
    reach: &[Score],
    doc_freq: u32,
) -> Option<Score> {
    // Counting passes over every document: before a list that short, accumulating it costs less
    // than deciding not to (and the decision comes again before the next one).
    if (doc_freq as usize).saturating_mul(SCAN_SHARE) < acc.len() {
        return None;
    }
    let bar = leaders.kth(acc)?;
    if reach[0] >= bar {
        return None;
    }
    let (now, after) = count_at_least(acc, bar - reach[0], bar - reach[1]);
    (now * SEEK_COST <= doc_freq as usize + after * SEEK_COST).then_some(bar)
}

/// How many scores are at least `a`, and how many at least `b` (one pass the compiler turns into
/// vector compares).
fn count_at_least(acc: &[Score], a: Score, b: Score) -> (usize, usize) {
    let (mut at_a, mut at_b) = (0u32, 0u32);
    for &s in acc {
        at_a += u32::from(s >= a);
        at_b += u32::from(s >= b);
    }
    (at_a as usize, at_b as usize)
}

/// The `k` documents with the highest accumulated scores, kept as scores (never negative) are
/// added: an addition costs one compare against a bound under the lowest kept score, and only a
/// document that passes it is looked at further. A kept document's score is not updated as it
/// gains (that would cost a heap operation per posting): scores kept lag behind the accumulator
/// and are brought up to date before the lowest is dropped and before the `k`-th best is read. So
/// every document not kept has at most the lowest kept score brought up to date, and that score is
/// the `k`-th best.
struct Leaders {
    k: usize,
    /// The kept documents, lowest (kept) score on top.
    heap: BinaryHeap<Reverse<(Ranked, DocId)>>,
    /// Which documents are kept, a bit per document.
    kept: Vec<u64>,
    /// At most the lowest kept score (up to date when last refreshed) once `k` are kept; below
    /// any score until then.
    low: Score,
}

impl Leaders {
    fn new(k: usize, docs: usize) -> Leaders {
        Leaders {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
            kept: vec![0; docs.div_ceil(64)],
            low: Score::NEG_INFINITY,
        }
    }

    /// Add `score` to document `doc`'s accumulator.
    #[inline]
    fn add(&mut self, acc: &mut [Score], doc: DocId, score: Score) {
        debug_assert!(score >= 0.0, "accumulated scores only grow");
        let slot = &mut acc[doc as usize];
        *slot += score;
        if *slot > self.low && !self.is_kept(doc) {
            self.offer(acc, doc);
        }
    }

    fn is_kept(&self, doc: DocId) -> bool {
        self.kept[doc as usize / 64] & (1u64 << (doc % 64)) != 0
    }

    fn set_kept(&mut self, doc: DocId, kept: bool) {
        let (word, bit) = (doc as usize / 64, 1u64 << (doc % 64));
        if kept {
            self.kept[word] |= bit;
        } else {
            self.kept[word] &= !bit;
        }
    }

    /// Keep `doc` (not kept, its score above `low`) unless, once the lowest kept score is brought
    /// up to date, it is no longer above it.
    #[inline(never)]
    fn offer(&mut self, acc: &[Score], doc: DocId) {
        let score = acc[doc as usize];
        if self.heap.len() == self.k {
            let lowest = self.refresh_lowest(acc);
            // Up to date: the tightest bound for the postings to come.
            self.low = lowest;
            if score <= lowest || score.is_nan() {
                return;
            }
            if let Some(Reverse((_, out))) = self.heap.pop() {
                self.set_kept(out, false);
            }
        }
        self.heap.push(Reverse((Ranked(score), doc)));
        self.set_kept(doc, true);
        if self.heap.len() == self.k {
            self.low = self.lowest();
        }
    }

    /// Bring the lowest kept score up to date (and each that comes to the top in its place), and
    /// return it.
    fn refresh_lowest(&mut self, acc: &[Score]) -> Score {
        while let Some(mut lowest) = self.heap.peek_mut() {
            let Reverse((kept, at)) = &mut *lowest;
            let now = acc[*at as usize];
            // A NaN (not a score BM25 gives) stops here rather than going round forever.
            if now <= kept.0 || now.is_nan() {
                break;
            }
            // Sifted into place when `lowest` is dropped.
            *kept = Ranked(now);
        }
        self.lowest()
    }

    /// The lowest score kept (as last brought up to date), or below any score when none is.
    fn lowest(&self) -> Score {
        self.heap.peek().map_or(Score::NEG_INFINITY, |r| r.0.0.0)
    }

    /// The `k`-th best accumulated score, once `k` documents have one.
    fn kth(&mut self, acc: &[Score]) -> Option<Score> {
        if self.heap.len() < self.k {
            return None;
        }
        let mut kept = std::mem::take(&mut self.heap).into_vec();
        for Reverse((score, doc)) in &mut kept {
            *score = Ranked(acc[*doc as usize]);
        }
        self.heap = BinaryHeap::from(kept);
        self.low = self.lowest();
        Some(self.low)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashMap;

    use tantivy::TERMINATED;
    use tantivy::collector::TopDocs;
    use tantivy::query::{BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, TermQuery};
    use tantivy::schema::{STRING, Schema, TextFieldIndexing, TextOptions};
    use tantivy::{Index, IndexWriter, doc};

    use super::*;
    use crate::rng::Rng;

    thread_local! {
        /// Searches that stopped accumulating whole lists and completed candidates by seeking.
        pub(super) static STOPPED: Cell<usize> = const { Cell::new(0) };
    }

    /// tantivy's own queries' parameters.
    const TANTIVY: Bm25Params = Bm25Params { k1: 1.2, b: 0.75 };

    /// The words of the documents that say a few common words many times.
    const DENSE: [&str; 2] = ["w1", "w2"];

    /// A word of a 300-word vocabulary, drawn with Zipf-like odds (word 0 is in nearly every
    /// document, as "the" is; the tail is rare).
    fn word(rng: &mut Rng) -> String {
        let u = rng.uniform().max(1e-6);
        format!("w{}", ((1.0 / u) as usize - 1).min(299))
    }

    /// 3,000 documents of 1..=120 words in two fields (every 25th one a few common words said
    /// many times), written in three segments (no merging), a tenth of them deleted afterwards.
    fn corpus(rng: &mut Rng) -> (Index, Field, Field) {
        let mut builder = Schema::builder();
        let id = builder.add_text_field("id", STRING);
        let text = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let a = builder.add_text_field("a", text.clone());
        let b = builder.add_text_field("b", text);
        let index = Index::create_in_ram(builder.build());
        let mut writer: IndexWriter = index
            .writer_with_num_threads(1, 15_000_000)
            .expect("writer");
        writer.set_merge_policy(Box::new(tantivy::indexer::NoMergePolicy));
        for n in 0..3000 {
            let len = 1 + (rng.next_u64() % 120) as usize;
            let mut words: Vec<String> = (0..len).map(|_| word(rng)).collect();
            if n % 25 == 0 {
                // Common words said many times, interleaved: such a document gets nearly all that
                // those words' clauses can give, so the bound on what lists left to seek can add
                // is nearly reached (queries that ask for exactly these words test that bound).
                let times = 20 + (rng.next_u64() % 40) as usize;
                words = DENSE
                    .iter()
                    .cycle()
                    .take(times)
                    .map(|w| w.to_string())
                    .collect();
                words.push(word(rng));
            }
            let short = words[..words.len().min(6)].join(" ");
            writer
                .add_document(doc!(id => n.to_string(), a => short, b => words.join(" ")))
                .expect("add");
            if n % 1000 == 999 {
                writer.commit().expect("commit");
            }
        }
        for n in (0..3000).step_by(10) {
            writer.delete_term(Term::from_field_text(id, &n.to_string()));
        }
        writer.commit().expect("commit deletes");
        (index, a, b)
    }

    /// What tantivy gives for the same clauses: a `BooleanQuery` of boosted `Should` clauses.
    fn tantivy_top(searcher: &Searcher, clauses: &[Clause], k: usize) -> Vec<(Score, DocAddress)> {
        let query = BooleanQuery::new(
            clauses
                .iter()
                .map(|c| {
                    let inner: Box<dyn Query> = match c.terms.as_slice() {
                        [term] => {
                            Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs))
                        }
                        terms => Box::new(PhraseQuery::new(terms.to_vec())),
                    };
                    let boosted: Box<dyn Query> = Box::new(BoostQuery::new(inner, c.weight));
                    (Occur::Should, boosted)
                })
                .collect(),
        );
        searcher
            .search(&query, &TopDocs::with_limit(k).order_by_score())
            .expect("tantivy search")
    }

    /// Same length, the same score at every rank, and the same documents wherever a score is
    /// clear of the last one kept (which of several equal scores make the cut may differ).
    fn assert_same(ours: &[(Score, DocAddress)], theirs: &[(Score, DocAddress)], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
        let close = |x: Score, y: Score| (x - y).abs() <= 1e-4 * x.abs().max(1.0);
        for (rank, (o, t)) in ours.iter().zip(theirs).enumerate() {
            assert!(close(o.0, t.0), "{what}: rank {rank}: {} vs {}", o.0, t.0);
        }
        let Some(last) = theirs.last().map(|t| t.0) else {
            return;
        };
        // Clear of the last score by ten times the tolerance, so that no tie reaches across.
        let sure = |hits: &[(Score, DocAddress)]| {
            let mut docs: Vec<DocAddress> = hits
                .iter()
                .filter(|h| h.0 - last > 1e-3 * last.abs().max(1.0))
                .map(|h| h.1)
                .collect();
            docs.sort();
            docs
        };
        let (ours, theirs) = (sure(ours), sure(theirs));
        let only = |x: &[DocAddress], y: &[DocAddress]| -> Vec<DocAddress> {
            x.iter().filter(|d| !y.contains(d)).copied().collect()
        };
        assert!(
            ours == theirs,
            "{what}: only ours {:?}, only tantivy's {:?}",
            only(&ours, &theirs),
            only(&theirs, &ours)
        );
    }

    #[test]
    fn the_top_k_is_tantivys_over_segments_deletes_weights_and_phrases() {
        let mut rng = Rng::new(7);
        let (index, a, b) = corpus(&mut rng);
        let reader = index.reader().expect("reader");
        let searcher = reader.searcher();
        assert_eq!(searcher.segment_readers().len(), 3);
        STOPPED.with(|s| s.set(0));
        for q in 0..300 {
            let mut clauses = Vec::new();
            if q % 3 == 0 {
                for field in [a, b] {
                    for w in DENSE {
                        clauses.push(Clause {
                            terms: vec![Term::from_field_text(field, w)],
                            weight: 1.0,
                        });
                    }
                }
            }
            for _ in 0..1 + rng.next_u64() % 24 {
                let field = if rng.uniform() < 0.3 { a } else { b };
                let weight = [0.5, 1.0, 2.0][(rng.next_u64() % 3) as usize];
                let words = if rng.uniform() < 0.08 {
                    2 + rng.next_u64() % 2
                } else {
                    1
                };
                let terms = (0..words)
                    .map(|_| Term::from_field_text(field, &word(&mut rng)))
                    .collect();
                clauses.push(Clause { terms, weight });
            }
            for k in [1, 10, 50, 400] {
                let ours = top_k(&searcher, &clauses, TANTIVY, k).expect("top k");
                assert_same(
                    &ours,
                    &tantivy_top(&searcher, &clauses, k),
                    &format!("query {q}, k {k}"),
                );
            }
        }
        let stopped = STOPPED.with(Cell::get);
        assert!(stopped > 100, "the seek path ran in {stopped} searches");
    }

    /// BM25 computed the plain way, in f64, every live document scored (term clauses only):
    /// what [`top_k`] must rank with parameters tantivy's queries cannot take.
    fn plain_top(
        searcher: &Searcher,
        clauses: &[Clause],
        params: Bm25Params,
        k: usize,
    ) -> Vec<(Score, DocAddress)> {
        let segments = searcher.segment_readers();
        let docs: u64 = segments.iter().map(|s| u64::from(s.max_doc())).sum();
        let (k1, b) = (f64::from(params.k1), f64::from(params.b));
        let mut scores: HashMap<DocAddress, f64> = HashMap::new();
        for clause in clauses {
            let [term] = clause.terms.as_slice() else {
                panic!("term clauses only");
            };
            let field = term.field();
            let doc_freq = searcher.doc_freq(term).expect("doc freq");
            let tokens: u64 = segments
                .iter()
                .map(|s| s.inverted_index(field).expect("field").total_num_tokens())
                .sum();
            let average = tokens as f64 / docs as f64;
            let idf = (1.0 + ((docs - doc_freq) as f64 + 0.5) / (doc_freq as f64 + 0.5)).ln();
            for (ord, segment) in segments.iter().enumerate() {
                let norms = segment.get_fieldnorms_reader(field).expect("norms");
                let Some(mut postings) = segment
                    .inverted_index(field)
                    .expect("field")
                    .read_postings(term, IndexRecordOption::WithFreqs)
                    .expect("postings")
                else {
                    continue;
                };
                let mut doc = postings.doc();
                while doc != TERMINATED {
                    if segment.alive_bitset().is_none_or(|a| a.is_alive(doc)) {
                        let tf = f64::from(postings.term_freq());
                        let length = f64::from(norms.fieldnorm(doc));
                        let saturated = tf / (tf + k1 * (1.0 - b + b * length / average));
                        *scores.entry(DocAddress::new(ord as u32, doc)).or_default() +=
                            idf * (1.0 + k1) * f64::from(clause.weight) * saturated;
                    }
                    doc = postings.advance();
                }
            }
        }
        let mut out: Vec<(Score, DocAddress)> =
            scores.into_iter().map(|(d, s)| (s as Score, d)).collect();
        out.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        out.truncate(k);
        out
    }

    #[test]
    fn other_k1_and_b_rank_as_plain_bm25() {
        let mut rng = Rng::new(11);
        let (index, a, b) = corpus(&mut rng);
        let searcher = index.reader().expect("reader").searcher();
        for params in [(0.0, 0.75), (2.0, 0.0), (0.9, 1.0), (5.0, 0.3)] {
            let params = Bm25Params {
                k1: params.0,
                b: params.1,
            };
            for q in 0..60 {
                let mut clauses = Vec::new();
                if q % 3 == 0 {
                    for w in DENSE {
                        clauses.push(Clause {
                            terms: vec![Term::from_field_text(b, w)],
                            weight: 1.0,
                        });
                    }
                }
                for _ in 0..1 + rng.next_u64() % 16 {
                    let field = if rng.uniform() < 0.3 { a } else { b };
                    clauses.push(Clause {
                        terms: vec![Term::from_field_text(field, &word(&mut rng))],
                        weight: [0.5, 1.0, 2.0][(rng.next_u64() % 3) as usize],
                    });
                }
                for k in [1, 10, 100] {
                    assert_same(
                        &top_k(&searcher, &clauses, params, k).expect("top k"),
                        &plain_top(&searcher, &clauses, params, k),
                        &format!("{params:?}, query {q}, k {k}"),
                    );
                }
            }
        }
    }

    #[test]
    fn nothing_to_match_is_nothing_found() {
        let mut rng = Rng::new(1);
        let (index, a, _) = corpus(&mut rng);
        let searcher = index.reader().expect("reader").searcher();
        let absent = Clause {
            terms: vec![Term::from_field_text(a, "absent")],
            weight: 1.0,
        };
        assert!(
            top_k(&searcher, &[absent], TANTIVY, 10)
                .expect("search")
                .is_empty()
        );
        assert!(
            top_k(&searcher, &[], TANTIVY, 10)
                .expect("search")
                .is_empty()
        );
    }

    #[test]
    fn the_leaders_give_the_kth_best_score() {
        let mut rng = Rng::new(3);
        for (k, ties) in [
            (1, false),
            (10, false),
            (50, false),
            (200, false),
            (10, true),
            (50, true),
        ] {
            let mut leaders = Leaders::new(k, 500);
            let mut acc = vec![0.0; 500];
            for step in 0..5000 {
                // Few documents gain often (a kept one's score goes stale), most rarely; whole
                // numbers make ties.
                let doc = if step % 3 == 0 {
                    rng.next_u64() % 20
                } else {
                    rng.next_u64() % 500
                } as DocId;
                let score = if ties {
                    (rng.next_u64() % 3) as Score
                } else {
                    rng.uniform() * 3.0
                };
                leaders.add(&mut acc, doc, score);
                // Between reads of the bar: no document left out is above one kept.
                let lowest_kept = (0..500)
                    .filter(|&d| leaders.is_kept(d))
                    .map(|d| acc[d as usize])
                    .fold(Score::INFINITY, Score::min);
                let highest_out = (0..500)
                    .filter(|&d| !leaders.is_kept(d))
                    .map(|d| acc[d as usize])
                    .fold(0.0, Score::max);
                if leaders.heap.len() == k {
                    assert!(highest_out <= lowest_kept, "k {k}, step {step}");
                }
                if step % 500 == 499 {
                    let mut sorted = acc.clone();
                    sorted.sort_by(|x, y| y.total_cmp(x));
                    assert_eq!(leaders.kth(&acc), Some(sorted[k - 1]), "k {k}, step {step}");
                }
            }
        }
        let mut leaders = Leaders::new(501, 500);
        let mut acc = vec![0.0; 500];
        for doc in 0..500 {
            leaders.add(&mut acc, doc, 1.0);
        }
        assert_eq!(leaders.kth(&acc), None);
    }

    #[test]
    fn a_nan_among_the_leaders_does_not_hang() {
        let mut leaders = Leaders::new(1, 2);
        let mut acc = vec![0.0; 2];
        leaders.add(&mut acc, 0, 1.0);
        acc[0] = Score::NAN;
        leaders.add(&mut acc, 1, 2.0);
        assert!(leaders.is_kept(1));
        assert_eq!(leaders.kth(&acc), Some(2.0));
    }

    #[test]
    fn counts_at_least_two_bars() {
        let acc = [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0];
        assert_eq!(count_at_least(&acc, 2.0, 0.5), (3, 6));
        assert_eq!(count_at_least(&acc, 9.0, Score::MIN_POSITIVE), (0, 6));
    }
}
