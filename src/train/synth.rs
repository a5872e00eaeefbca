//! `triplets synth`: training triplets from a collection's own documents, for teams that have
//! documents but no question/answer pairs.
//!
//! Questions come from extraction rules over the sentences of the collection's chunks (no model
//! writes them, so nothing is invented): a definition ("A partial index is an index built over a
//! subset of a table; ...") gives "What is a partial index?", a purpose ("VACUUM is used to ...")
//! gives "What is VACUUM used for?", an instruction ("To create a partial index ..., use a
//! command such as ...", "If you want to ..., ...", "You can ... by ...") gives "How do I ...?".
//! The answer is the sentence itself (with the command or SQL it carries) and the number of its
//! source, the kind of answer a user of a manual wants: a sentence or two and a citation.
//!
//! Each draft passes these filters, in order, and the report counts what each dropped: the subject
//! is not vague ("This is ..."), the answer is 6..=80 words, the answer says more than the question
//! (at least 3 content words the question lacks), the question is new (not equal to or a
//! near-duplicate of a kept one, by content-word Jaccard), the answer sentence is new, and the
//! collection's own retriever, asked the question exactly as serving asks it, puts the source
//! chunk among the sources serving would give, with the sentence whole in it. The triplet's
//! context is those sources as the prompt shows them (with `shuffle`, in an order drawn from that
//! seed and renumbered, as `triplets build --shuffle-sources` does). Chunks are read in a random
//! order drawn from the seed, at most one triplet per chunk, until `n` are kept or the chunks run
//! out.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use unicode_segmentation::UnicodeSegmentation;

use super::triplets::shuffle_sources;
use super::{Origin, Triplet};
use crate::collection::Collection;
use crate::collection::CollectionError;
use crate::eval::answer_metrics::normalize;
use crate::index::{Bm25Index, ChunkRecord, IndexError};
use crate::rag::{Rag, RagError, format_sources};
use crate::retrieve::RetrieveError;
use crate::rng::Rng;

/// Answers shorter or longer than this (in words) are dropped.
pub const ANSWER_WORDS: std::ops::RangeInclusive<usize> = 6..=80;
/// New content words an answer must add to its question.
pub const MIN_NEW_WORDS: usize = 3;
/// Content-word Jaccard similarity from which two questions count as near-duplicates.
pub const NEAR_DUPLICATE: f64 = 0.8;
/// Chunks read from the index at a time.
const READ_BATCH: usize = 64;

/// Which rule wrote a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// "X is a ..." -> "What is X?"
    Definition,
    /// "X is used to ..." -> "What is X used for?"
    Purpose,
    /// "To do Y, ..." / "If you want to Y, ..." / "You can Y by ..." -> "How do I Y?"
    Instruction,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Definition => "definition",
            Rule::Purpose => "purpose",
            Rule::Instruction => "instruction",
        }
    }
}

/// A question drafted from one sentence, before the filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub question: String,
    /// The sentence (or two) that answers it, as it stands in the chunk.
    pub answer: String,
    /// What the question asks about (its first word decides whether it is vague).
    pub subject: String,
    pub rule: Rule,
}

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

/// Words that make a subject vague or a word carry no content.
const STOPWORDS: &[&str] = &[
    "a", "about", "all", "also", "an", "and", "another", "any", "are", "as", "at", "be", "been",
    "both", "but", "by", "can", "could", "do", "does", "each", "either", "for", "from", "had",
    "has", "have", "he", "her", "here", "his", "how", "however", "i", "if", "in", "into", "is",
    "it", "its", "may", "more", "most", "much", "must", "my", "no", "not", "of", "on", "one",
    "only", "or", "other", "our", "she", "should", "so", "some", "such", "than", "that", "the",
    "their", "them", "then", "there", "these", "they", "this", "those", "to", "was", "we", "were",
    "what", "when", "where", "which", "while", "who", "why", "will", "with", "would", "you",
    "your",
];

/// First words that make a subject vague: it points elsewhere instead of naming a thing.
const VAGUE_FIRST: &[&str] = &[
    "this",
    "that",
    "these",
    "those",
    "it",
    "its",
    "there",
    "here",
    "such",
    "each",
    "some",
    "any",
    "all",
    "both",
    "one",
    "other",
    "another",
    "which",
    "what",
    "their",
    "our",
    "your",
    "his",
    "her",
    "most",
    "many",
    "several",
    "no",
    "not",
    "if",
    "when",
    "in",
    "on",
    "for",
    "however",
    "also",
    "note",
    "he",
    "she",
    "they",
    "we",
    "i",
    "you",
    "example",
    "following",
    "result",
];

/// Words that point back into the text: a question holding one does not stand alone.
const POINTING: &[&str] = &[
    "this", "that", "these", "those", "it", "above", "below", "such",
];

fn is_stopword(w: &str) -> bool {
    STOPWORDS.contains(&w)
}

/// The content words of `text` (normalised, stopwords out).
pub fn content_words(text: &str) -> HashSet<String> {
    normalize(text)
        .split_whitespace()
        .filter(|w| !is_stopword(w))
        .map(str::to_string)
        .collect()
}

/// The sentences of a chunk, with the title it starts with (HTML pages repeat their heading at
/// the top of the text, glued to the first sentence) cut off.
pub fn sentences(title: &str, text: &str) -> Vec<String> {
    let mut body = text.trim();
    let title = title.trim();
    while !title.is_empty() && body.starts_with(title) {
        body = body[title.len()..].trim_start();
    }
    body.split_sentence_bounds()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

/// The drafts the rules find in one chunk, in sentence order.
pub fn drafts(chunk: &ChunkRecord) -> Vec<Draft> {
    let sents = sentences(&chunk.title, &chunk.text);
    let mut out = Vec::new();
    for (i, s) in sents.iter().enumerate() {
        // A sentence that introduces a command or example ("... such as this:") takes it along.
        let answer = match sents.get(i + 1) {
            Some(next) if s.ends_with(':') => format!("{s} {next}"),
            _ => s.clone(),
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        let found = definition(&words).or_else(|| instruction(&words));
        if let Some((question, subject, rule)) = found {
            out.push(Draft {
                question,
                answer,
                subject,
                rule,
            });
        }
    }
    out
}

fn lower(w: &str) -> String {
    w.to_lowercase()
}

/// A subject or clause word: no clause punctuation inside the phrase.
fn plain(words: &[&str]) -> bool {
    words
        .iter()
        .all(|w| !w.ends_with([',', ';', ':', '.', '!', '?']) && !w.starts_with('('))
}

/// "A partial index" -> "a partial index"; "Partial indexes" -> "partial indexes"; identifiers
/// and acronyms ("VACUUM", "pg_dump", "PostgreSQL") keep their case.
fn subject_phrase(words: &[&str]) -> String {
    let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    if let Some(first) = out.first_mut() {
        let mut chars = first.chars();
        let head = chars.next().unwrap_or(' ');
        let rest: String = chars.collect();
        if head.is_uppercase() && rest.chars().all(|c| c.is_lowercase()) {
            *first = format!("{}{rest}", head.to_lowercase());
        }
    }
    out.join(" ")
}

/// "X is/are a|an|the ..." -> "What is X?"; "X is/are used to|for ..." and "X can be used to ..."
/// -> "What is X used for?" (the subject is 1..=6 words).
fn definition(words: &[&str]) -> Option<(String, String, Rule)> {
    // Lower case only: "Is" starts a question of the text ("boolean Is the first cube ...").
    let verb = (1..=6.min(words.len().saturating_sub(2)))
        .find(|&i| matches!(words[i], "is" | "are" | "can"))?;
    let subject_words = &words[..verb];
    if !plain(subject_words) {
        return None;
    }
    let subject = subject_phrase(subject_words);
    let be = lower(words[verb]);
    let next: Vec<String> = words[verb + 1..].iter().take(3).map(|w| lower(w)).collect();
    let next: Vec<&str> = next.iter().map(String::as_str).collect();
    let (question, rule) = match (be.as_str(), next.as_slice()) {
        ("can", ["be", "used", "to" | "for", ..]) => {
            (format!("What can {subject} be used for?"), Rule::Purpose)
        }
        ("is" | "are", ["used", "to" | "for", ..]) => {
            (format!("What {be} {subject} used for?"), Rule::Purpose)
        }
        ("is" | "are", ["a" | "an" | "the", ..]) => {
            (format!("What {be} {subject}?"), Rule::Definition)
        }
        _ => return None,
    };
    Some((question, subject, rule))
}

/// "To Y, ..." / "If you want|need|wish to Y, ..." -> "How do I Y?"; "You can Y by ..." ->
/// "How can I Y?" (Y is 2..=12 words).
fn instruction(words: &[&str]) -> Option<(String, String, Rule)> {
    let lowered: Vec<String> = words.iter().map(|w| lower(w)).collect();
    let l: Vec<&str> = lowered.iter().map(String::as_str).collect();
    let (start, question_start) = match l.as_slice() {
        ["to", ..] => (1, "How do I"),
        ["if", "you", "want" | "need" | "wish", "to", ..] => (4, "How do I"),
        ["you", "can", ..] => (2, "How can I"),
        _ => return None,
    };
    let end = if question_start == "How can I" {
        l.iter().skip(start).position(|w| *w == "by")? + start
    } else {
        let comma = words.iter().skip(start).position(|w| w.ends_with(','))? + start;
        comma + 1
    };
    let clause: Vec<&str> = words[start..end].to_vec();
    if !(2..=12).contains(&clause.len()) {
        return None;
    }
    let mut clause_text = clause.join(" ");
    clause_text = clause_text.trim_end_matches(',').to_string();
    if !plain(&[clause_text.as_str()]) || clause_text.contains([';', ':', '(']) {
        return None;
    }
    let first = lower(clause[0]);
    if is_stopword(&first) {
        return None; // "To the ...", "To this end": not an action
    }
    if clause
        .iter()
        .any(|w| POINTING.contains(&lower(w).trim_end_matches(',')))
    {
        return None; // "To prevent this possibility": the question would not stand alone
    }
    // The manual speaks to the reader; the question is the reader's own.
    let asked: Vec<&str> = clause_text
        .split(' ')
        .map(|w| match w {
            "your" => "my",
            "yours" => "mine",
            "you" => "I",
            "yourself" => "myself",
            w => w,
        })
        .collect();
    Some((
        format!("{question_start} {}?", asked.join(" ")),
        clause_text,
        Rule::Instruction,
    ))
}

/// Why a draft is dropped before retrieval (None: it goes on).
pub fn reject(draft: &Draft) -> Option<&'static str> {
    let first = draft
        .subject
        .split_whitespace()
        .next()
        .map(lower)
        .unwrap_or_default();
    let subject_content = content_words(&draft.subject);
    if VAGUE_FIRST.contains(&first.as_str()) || subject_content.is_empty() {
        return Some("vague subject");
    }
    if glued_heading(&draft.subject) {
        return Some("heading glued to the subject");
    }
    let words = draft.answer.split_whitespace().count();
    if words < *ANSWER_WORDS.start() {
        return Some("answer too short");
    }
    if words > *ANSWER_WORDS.end() {
        return Some("answer too long");
    }
    let question_words = content_words(&draft.question);
    let new_words = content_words(&draft.answer)
        .difference(&question_words)
        .count();
    if new_words < MIN_NEW_WORDS {
        return Some("trivial: the answer restates the question");
    }
    None
}

/// Whether two capitalised words ("Setup", "Logical") follow each other in `subject`: chunk text
/// keeps no line breaks, so a section heading runs into the sentence after it ("Quick Setup
/// Logical replication is a method ..."). Multi-word proper names are lost with them.
fn glued_heading(subject: &str) -> bool {
    let capitalised = |w: &str| {
        let mut chars = w.chars();
        chars.next().is_some_and(char::is_uppercase)
            && chars.clone().next().is_some()
            && chars.all(char::is_lowercase)
    };
    let words: Vec<&str> = subject.split_whitespace().collect();
    words
        .windows(2)
        .any(|pair| capitalised(pair[0]) && capitalised(pair[1]))
}

/// Why `draft` is dropped before the retriever is asked: its own flaws, or repeating what was
/// kept (None: it may be used).
fn unusable(draft: &Draft, seen: &Seen) -> Option<&'static str> {
    reject(draft).or_else(|| seen.repeats(draft))
}

/// The questions and answers kept so far, for duplicate checks.
#[derive(Debug, Default)]
pub struct Seen {
    questions: HashSet<String>,
    answers: HashSet<String>,
    question_words: Vec<HashSet<String>>,
}

impl Seen {
    /// Why `draft` repeats what was kept (None: it is new).
    pub fn repeats(&self, draft: &Draft) -> Option<&'static str> {
        if self.questions.contains(&normalize(&draft.question)) {
            return Some("duplicate question");
        }
        if self.answers.contains(&normalize(&draft.answer)) {
            return Some("duplicate answer");
        }
        let words = content_words(&draft.question);
        let near = self
            .question_words
            .iter()
            .any(|seen| jaccard(seen, &words) >= NEAR_DUPLICATE);
        near.then_some("near-duplicate question")
    }

    pub fn keep(&mut self, draft: &Draft) {
        self.questions.insert(normalize(&draft.question));
        self.answers.insert(normalize(&draft.answer));
        self.question_words.push(content_words(&draft.question));
    }
}

fn jaccard(a: &HashSet<String>, b: &HashSet<String>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(b).count() as f64 / union as f64
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
    if !flat.contains(&draft.answer) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(title: &str, text: &str) -> ChunkRecord {
        ChunkRecord {
            chunk_id: "c".into(),
            doc_id: "d".into(),
            title: title.into(),
            source: String::new(),
            text: text.into(),
            ordinal: 0,
            metadata: "{}".into(),
        }
    }

    fn questions(title: &str, text: &str) -> Vec<(String, Rule)> {
        drafts(&chunk(title, text))
            .into_iter()
            .map(|d| (d.question, d.rule))
            .collect()
    }

    #[test]
    fn a_definition_after_a_glued_heading_becomes_a_what_is_question() {
        let c = chunk(
            "11.8. Partial Indexes",
            "11.8. Partial Indexes A partial index is an index built over a subset of a table; \
             the subset is defined by a conditional expression. The index contains entries only \
             for those table rows that satisfy the predicate.",
        );
        let d = drafts(&c);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].question, "What is a partial index?");
        assert_eq!(d[0].rule, Rule::Definition);
        assert!(d[0].answer.starts_with("A partial index is an index built"));
        assert_eq!(reject(&d[0]), None);
    }

    #[test]
    fn purposes_and_instructions() {
        assert_eq!(
            questions(
                "t",
                "VACUUM is used to reclaim storage occupied by dead tuples."
            ),
            [("What is VACUUM used for?".to_string(), Rule::Purpose)]
        );
        assert_eq!(
            questions(
                "t",
                "Partial indexes can be used to avoid indexing common values."
            ),
            [(
                "What can partial indexes be used for?".to_string(),
                Rule::Purpose
            )]
        );
        let d = drafts(&chunk(
            "t",
            "To create a partial index on client addresses, use a command such as this: \
             CREATE INDEX access_log_ix ON access_log (client_ip) WHERE NOT internal;",
        ));
        assert_eq!(
            d[0].question,
            "How do I create a partial index on client addresses?"
        );
        assert!(d[0].answer.contains("CREATE INDEX"), "{d:?}");
        assert_eq!(
            questions(
                "t",
                "If you want to keep the old data, rename the directory first."
            ),
            [("How do I keep the old data?".to_string(), Rule::Instruction)]
        );
        assert_eq!(
            questions(
                "t",
                "To reset your password, open Settings, choose Security and click Reset."
            ),
            [("How do I reset my password?".to_string(), Rule::Instruction)]
        );
        assert_eq!(
            questions(
                "t",
                "You can reclaim disk space by running VACUUM FULL on the table."
            ),
            [(
                "How can I reclaim disk space?".to_string(),
                Rule::Instruction
            )]
        );
    }

    #[test]
    fn sentences_without_a_pattern_give_nothing() {
        for text in [
            "The server was restarted on Tuesday.",
            "To date, no such feature exists.",
            "To this end, the planner keeps statistics.",
            "In most cases, the default is fine, and nothing is needed.",
            "Is it safe? Yes.",
            "cube <@ cube → boolean Is the first cube contained in the second?",
            "To prevent this possibility, use the following functions instead.",
            "To create an index that suits our example, use this command.",
        ] {
            assert_eq!(questions("t", text), [], "{text}");
        }
    }

    fn draft(question: &str, answer: &str, subject: &str) -> Draft {
        Draft {
            question: question.into(),
            answer: answer.into(),
            subject: subject.into(),
            rule: Rule::Definition,
        }
    }

    #[test]
    fn filters_drop_vague_short_long_and_trivial_drafts() {
        let good = draft(
            "What is a partial index?",
            "A partial index is an index built over a subset of a table.",
            "a partial index",
        );
        assert_eq!(reject(&good), None);
        let vague = draft(
            "What is this?",
            "This is a very long explanation of something else entirely.",
            "This",
        );
        assert_eq!(reject(&vague), Some("vague subject"));
        let glued = draft(
            "What is quick Setup Logical replication?",
            "Quick Setup Logical replication is a method of replicating data objects.",
            "quick Setup Logical replication",
        );
        assert_eq!(reject(&glued), Some("heading glued to the subject"));
        let short = draft("What is pg_dump?", "pg_dump is a tool.", "pg_dump");
        assert_eq!(reject(&short), Some("answer too short"));
        let long = draft(
            "What is pg_dump?",
            &format!("pg_dump is {}", "a very long tool ".repeat(30)),
            "pg_dump",
        );
        assert_eq!(reject(&long), Some("answer too long"));
        let trivial = draft(
            "What is the partial index of the table?",
            "The partial index is the partial index of the table, indeed.",
            "the partial index",
        );
        assert_eq!(
            reject(&trivial),
            Some("trivial: the answer restates the question")
        );
    }

    #[test]
    fn duplicates_and_near_duplicates_are_caught() {
        let mut seen = Seen::default();
        let a = draft(
            "What is a partial index?",
            "A partial index is an index built over a subset of a table.",
            "a partial index",
        );
        assert_eq!(seen.repeats(&a), None);
        seen.keep(&a);
        let same_question = draft(
            "what is a Partial Index ?",
            "Another sentence about indexes entirely different here.",
            "x",
        );
        assert_eq!(seen.repeats(&same_question), Some("duplicate question"));
        let same_answer = draft(
            "What are partial indexes?",
            "A partial index is an index built over a subset of a table.",
            "x",
        );
        assert_eq!(seen.repeats(&same_answer), Some("duplicate answer"));
        let near = draft(
            "Which is the partial index?",
            "Something else with enough words to count here.",
            "x",
        );
        assert_eq!(seen.repeats(&near), Some("near-duplicate question"));
        let other = draft(
            "What is VACUUM used for?",
            "VACUUM is used to reclaim storage occupied by dead tuples.",
            "VACUUM",
        );
        assert_eq!(seen.repeats(&other), None);
    }
}
