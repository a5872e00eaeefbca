//! `triplets synth`: training triplets from a collection's own documents, for teams that have
//! documents but no question/answer pairs.
//!
//! Questions come from extraction rules over the sentences of the collection's chunks (no model
//! writes them, so nothing is invented): a definition ("A partial index is an index built over a
//! subset of a table; ...") gives "What is a partial index?", a purpose ("VACUUM is used to ...")
//! gives "What is VACUUM used for?", an instruction ("To create a partial index ..., use a
//! command such as ...", "If you want to ..., ...", "You can ... by ...") gives "How do I ...?".
//! The answer is the sentence itself (with the command or SQL it carries) and the number of its
//! source, the kind of answer a user of a manual wants: a sentence or two and a citation. An
//! instruction's answer starts at what to do and, when it is one imperative sentence, says what it
//! is for after it: "To create a new row, use the INSERT command." answers "How do I create a new
//! row?" with "Use the INSERT command to create a new row." (a model trained to restate the
//! question first learns to stop after the restatement: "To find ..., you can use the [1]"). An
//! instruction that states a requirement ("To change a view's schema, you must also have CREATE
//! privilege on the new schema.") asks "What do I need to change a view's schema?".
//! Sentences are split where a period ends a word and the next word starts in lower case (a
//! definition list's next term: "... chosen instead. password The method password sends ..."), so an
//! answer does not run into the next entry.
//!
//! Each draft passes these filters, in order, and the report counts what each dropped: the subject
//! is not vague ("This is ...", a clause or a prepositional phrase), no heading ran into it, the
//! answer is 6..=80 words, its sentence is not cut by the chunk's end, it does not only point
//! elsewhere ("See Table 9.62.", "... discussed in the next few subsections."), an instruction's
//! answer is a sentence (not ", which means ..." after a comma that ended no purpose), the answer
//! says more than the question
//! (at least 3 content words the question lacks), the question is new (not equal to or a
//! near-duplicate of a kept one, by content-word Jaccard), what the answer says is new, and the
//! collection's own retriever, asked the question exactly as serving asks it, puts the source
//! chunk among the sources serving would give, with the sentence whole in it. The triplet's
//! context is those sources as the prompt shows them (with `shuffle`, in an order drawn from that
//! seed and renumbered, as `triplets build --shuffle-sources` does). Chunks are read in a random
//! order drawn from the seed, at most one triplet per chunk, until `n` are kept or the chunks run
//! out.

mod rules;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use self::rules::{Draft, Seen, drafts, reject};
use super::triplets::shuffle_sources;
use super::{Origin, Triplet};
use crate::collection::Collection;
use crate::collection::CollectionError;
use crate::index::{Bm25Index, ChunkRecord, IndexError};
use crate::rag::{Rag, RagError, format_sources};
use crate::retrieve::RetrieveError;
use crate::rng::Rng;

/// Chunks read from the index at a time.
const READ_BATCH: usize = 64;

/// What `synthesize` read, kept and dropped.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SynthReport {
    pub chunks_read: usize,
    /// Chunks in which no rule found a question.
    pub chunks_without_question: usize,
    pub drafts: usize,
    pub kept: usize,
    /// Kept, by rule.
    pub kept_by_rule: BTreeMap<String, usize>,
    /// Dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    pub seconds: f64,
    pub triplets_per_minute: f64,
}

impl SynthReport {
    fn drop(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }
}

/// Why `draft` is dropped before the retriever is asked: its own flaws, or repeating what was
/// kept (None: it may be used).
fn unusable(draft: &Draft, seen: &Seen) -> Option<&'static str> {
    reject(draft).or_else(|| seen.repeats(draft))
}

/// Synthesise up to `n` triplets from `collection`'s chunks (see the module doc).
pub async fn synthesize(
    rag: &Rag,
    collection: &Collection,
    n: usize,
    seed: u64,
    shuffle: bool,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(Vec<Triplet>, SynthReport), RagError> {
    let started = Instant::now();
    let mut report = SynthReport::default();
    let mut rng = Rng::new(seed);
    let mut shuffler = shuffle.then(|| Rng::new(seed ^ 0x5eed));
    let mut walk = ChunkWalk::new(collection, &mut rng).await?;
    let mut seen = Seen::default();
    let mut out = Vec::new();
    while out.len() < n
        && let Some(chunks) = walk.next_batch().await?
    {
        for chunk in chunks {
            if out.len() >= n {
                break;
            }
            report.chunks_read += 1;
            let drafts = drafts(&chunk);
            if drafts.is_empty() {
                report.chunks_without_question += 1;
            }
            for draft in drafts {
                report.drafts += 1;
                match triplet(rag, collection, &chunk, &draft, &seen, shuffler.as_mut()).await? {
                    Ok(t) => {
                        seen.keep(&draft);
                        *report
                            .kept_by_rule
                            .entry(draft.rule.name().to_string())
                            .or_default() += 1;
                        out.push(t);
                        progress(1);
                        break; // one per chunk: spread the set over the collection
                    }
                    Err(reason) => report.drop(reason),
                }
            }
        }
    }
    report.kept = out.len();
    report.seconds = started.elapsed().as_secs_f64();
    report.triplets_per_minute = report.kept as f64 * 60.0 / report.seconds.max(1e-9);
    Ok((out, report))
}

/// Up to `n` questions drafted from `collection`'s chunks (one per chunk, chunks in an order drawn
/// from `seed`), each naming the document of the chunk it was drafted from as its gold document;
/// for tuning retrieval. Unlike [`synthesize`], the retriever is not asked: a set that kept only
/// the questions today's retriever answers would reward today's settings.
pub async fn retrieval_questions(
    collection: &Collection,
    n: usize,
    seed: u64,
) -> Result<Vec<crate::eval::Question>, RagError> {
    let mut rng = Rng::new(seed);
    let mut walk = ChunkWalk::new(collection, &mut rng).await?;
    let mut seen = Seen::default();
    let mut out = Vec::new();
    while out.len() < n
        && let Some(chunks) = walk.next_batch().await?
    {
        for chunk in &chunks {
            if out.len() >= n {
                break;
            }
            let draft = drafts(chunk)
                .into_iter()
                .find(|d| unusable(d, &seen).is_none());
            if let Some(draft) = draft {
                seen.keep(&draft);
                out.push(crate::eval::Question {
                    id: format!("synthetic:{}", chunk.chunk_id),
                    query: draft.question,
                    gold_doc_ids: vec![chunk.doc_id.clone()],
                    answers: vec![draft.answer],
                });
            }
        }
    }
    Ok(out)
}

/// A collection's chunks, read [`READ_BATCH`] at a time in a random order.
struct ChunkWalk {
    index: Arc<Bm25Index>,
    order: Vec<usize>,
    next: usize,
}

impl ChunkWalk {
    async fn new(collection: &Collection, rng: &mut Rng) -> Result<ChunkWalk, RagError> {
        let index = Arc::clone(&collection.index);
        let total = read_index(Arc::clone(&index), move |i| i.num_chunks()).await?;
        let mut order: Vec<usize> = (0..total).collect();
        rng.shuffle(&mut order);
        Ok(ChunkWalk {
            index,
            order,
            next: 0,
        })
    }

    /// The next batch of chunks (None when all were read).
    async fn next_batch(&mut self) -> Result<Option<Vec<ChunkRecord>>, RagError> {
        if self.next >= self.order.len() {
            return Ok(None);
        }
        let end = (self.next + READ_BATCH).min(self.order.len());
        let positions = self.order[self.next..end].to_vec();
        self.next = end;
        let chunks = read_index(Arc::clone(&self.index), move |i| i.chunks_at(&positions)).await?;
        Ok(Some(chunks))
    }
}

/// The triplet for `draft`, or why it is dropped.
async fn triplet(
    rag: &Rag,
    collection: &Collection,
    chunk: &ChunkRecord,
    draft: &Draft,
    seen: &Seen,
    shuffler: Option<&mut Rng>,
) -> Result<Result<Triplet, &'static str>, RagError> {
    if let Some(reason) = unusable(draft, seen) {
        return Ok(Err(reason));
    }
    let sources = rag.sources(collection, &draft.question).await?;
    let sources = match shuffler {
        Some(rng) => shuffle_sources(sources, rng),
        None => sources,
    };
    let Some(source) = sources.iter().find(|s| s.chunk_id == chunk.chunk_id) else {
        return Ok(Err("source not retrieved for the question"));
    };
    let flat = source.text.split_whitespace().collect::<Vec<_>>().join(" ");
    if !flat.contains(&draft.passage) {
        return Ok(Err("answer not whole in its source"));
    }
    Ok(Ok(Triplet {
        query: draft.question.clone(),
        context: format_sources(&sources),
        answer: format!("{} [{}]", draft.answer, source.n),
        origin: Some(Origin {
            chunk_id: chunk.chunk_id.clone(),
            doc_id: chunk.doc_id.clone(),
            rule: draft.rule.name().to_string(),
        }),
    }))
}

/// Run a blocking index read off the async runtime.
async fn read_index<T: Send + 'static>(
    index: Arc<Bm25Index>,
    f: impl FnOnce(&Bm25Index) -> Result<T, IndexError> + Send + 'static,
) -> Result<T, RagError> {
    let result = tokio::task::spawn_blocking(move || f(&index))
        .await
        .map_err(RetrieveError::from)?;
    Ok(result
        .map_err(CollectionError::from)
        .map_err(RetrieveError::from)?)
}
