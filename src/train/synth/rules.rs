//! The extraction rules of `triplets synth` (see [`super`]): a chunk's sentences, the questions
//! the rules draft from them with the answers they give, and the filters a draft must pass
//! before the retriever is asked (vague or glued subjects, answer length, trivial answers,
//! duplicates). Pure functions of the text: no index, model or retriever.

use std::collections::HashSet;

use serde::Serialize;
use unicode_segmentation::UnicodeSegmentation;

use crate::eval::answer_metrics::normalize;
use crate::index::ChunkRecord;

/// Answers shorter or longer than this (in words) are dropped.
pub(super) const ANSWER_WORDS: std::ops::RangeInclusive<usize> = 6..=80;
/// New content words an answer must add to its question.
pub(super) const MIN_NEW_WORDS: usize = 3;
/// Content-word Jaccard similarity from which two questions count as near-duplicates.
pub(super) const NEAR_DUPLICATE: f64 = 0.8;

/// Which rule wrote a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Rule {
    /// "X is a ..." -> "What is X?"
    Definition,
    /// "X is used to ..." -> "What is X used for?"
    Purpose,
    /// "To do Y, ..." / "If you want to Y, ..." / "You can Y by ..." -> "How do I Y?"
    Instruction,
}

impl Rule {
    pub(super) fn name(self) -> &'static str {
        match self {
            Rule::Definition => "definition",
            Rule::Purpose => "purpose",
            Rule::Instruction => "instruction",
        }
    }
}

/// A question drafted from one sentence, before the filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Draft {
    pub(super) question: String,
    /// The sentence (or two) that answers it, as it stands in the chunk (the filters read it).
    pub(super) passage: String,
    /// What the triplet answers: the passage, less an instruction's restated purpose (with that
    /// purpose after it when it is one imperative sentence, see [`with_purpose`]).
    pub(super) answer: String,
    /// What the answer says, without any purpose: what duplicate answers are found by.
    pub(super) core: String,
    /// What the question asks about, as written in the chunk (its first word decides whether it
    /// is vague).
    pub(super) subject: String,
    pub(super) rule: Rule,
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
    // A preposition, conjunction or adverb first: the phrase is not a name ("Within each FSM page
    // is a binary tree", "Where interoperability ... is a concern", "Particularly important ...").
    "where",
    "within",
    "without",
    "while",
    "after",
    "before",
    "during",
    "at",
    "by",
    "from",
    "with",
    "under",
    "over",
    "between",
    "among",
    "through",
    "since",
    "because",
    "although",
    "though",
    "unless",
    "until",
    "whether",
    "thus",
    "hence",
    "therefore",
    "then",
    "now",
    "instead",
    "otherwise",
    "similarly",
    "furthermore",
    "moreover",
    "particularly",
    "especially",
    "generally",
    "usually",
    "typically",
    "normally",
];

/// Words that open a clause: a subject holding one is a clause, not a name ("assumption that a
/// null value is a valid value ...").
const CLAUSE_WORDS: &[&str] = &[
    "that", "which", "who", "whom", "whose", "where", "when", "whether", "if", "because",
];

/// First words of an answer that only points elsewhere ("See Table 9.62."): it does not answer.
const POINTERS: &[&str] = &["see", "refer", "consult", "cf."];

/// Phrases of an answer that leaves the answer to another part of the text ("It is essential to
/// understand the issues discussed in the next few subsections."), unless a colon brings it.
const POINTER_PHRASES: &[&str] = &[
    "below",
    "above",
    "subsection",
    "next section",
    "following section",
    "later section",
];

/// Words that start a section heading; one that ran into a subject makes it glued ("Description
/// pg_test_timing is a tool ...").
const HEADING_WORDS: &[&str] = &[
    "Description",
    "Synopsis",
    "Notes",
    "Note",
    "Examples",
    "Example",
    "Overview",
    "Introduction",
    "Tip",
    "Warning",
    "Caution",
    "Important",
    "Parameters",
    "Outputs",
    "Compatibility",
];

/// Words that point back into the text: a question holding one does not stand alone.
const POINTING: &[&str] = &[
    "this", "that", "these", "those", "it", "above", "below", "such",
];

fn is_stopword(w: &str) -> bool {
    STOPWORDS.contains(&w)
}

/// The content words of `text` (normalised, stopwords out).
pub(super) fn content_words(text: &str) -> HashSet<String> {
    normalize(text)
        .split_whitespace()
        .filter(|w| !is_stopword(w))
        .map(str::to_string)
        .collect()
}

/// The sentences of a chunk, with the title it starts with (HTML pages repeat their heading at
/// the top of the text, glued to the first sentence) cut off.
pub(super) fn sentences(title: &str, text: &str) -> Vec<String> {
    let mut body = text.trim();
    let title = title.trim();
    // The title as a whole word: "Indexes are ..." under the title "Index" keeps its first word.
    while let Some(rest) = body.strip_prefix(title).filter(|_| !title.is_empty())
        && (rest.is_empty() || rest.starts_with(char::is_whitespace))
    {
        body = rest.trim_start();
    }
    body.split_sentence_bounds()
        .flat_map(|s| split_run_on(&s.split_whitespace().collect::<Vec<_>>()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Abbreviations of 4+ letters that a lower-case word may follow within a sentence.
const ABBREVIATIONS: &[&str] = &[
    "approx", "resp", "incl", "esp", "misc", "corp", "prof", "dept",
];

/// `words` split after each word of 4+ letters ending in a period that a lower-case word follows:
/// Unicode sentence bounds keep "... instead. password The method ..." together (a lower-case
/// word after a period may follow an abbreviation), but in chunk text without line breaks that is
/// where a definition list's next term starts.
fn split_run_on(words: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..words.len().saturating_sub(1) {
        let Some(stem) = words[i].strip_suffix('.') else {
            continue;
        };
        let word_ends = stem.len() >= 4
            && stem.chars().all(|c| c.is_alphabetic())
            && !ABBREVIATIONS.contains(&lower(stem).as_str());
        if word_ends && words[i + 1].starts_with(|c: char| c.is_lowercase()) {
            out.push(words[start..=i].join(" "));
            start = i + 1;
        }
    }
    out.push(words[start..].join(" "));
    out
}

/// The drafts the rules find in one chunk, in sentence order.
pub(super) fn drafts(chunk: &ChunkRecord) -> Vec<Draft> {
    let sents = sentences(&chunk.title, &chunk.text);
    let mut out = Vec::new();
    for (i, s) in sents.iter().enumerate() {
        // A sentence that introduces a command or example ("... such as this:") takes it along.
        let passage = match sents.get(i + 1) {
            Some(next) if s.ends_with(':') => format!("{s} {next}"),
            _ => s.clone(),
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        let found = definition(&words)
            .map(|(question, subject, rule)| (question, subject, rule, 0))
            .or_else(|| instruction(&words));
        if let Some((question, subject, rule, skip)) = found {
            let core = answer_from(&passage, skip);
            let (question, answer) = match (skip, requirement(&core)) {
                (0, _) => (question, core.clone()),
                // "To change a view's schema, you must also have CREATE privilege on the new
                // schema." says what is needed, not how.
                (_, true) => match question.strip_prefix("How do I ") {
                    Some(action) => (format!("What do I need to {action}"), core.clone()),
                    None => (question, core.clone()),
                },
                (_, false) => (question, with_purpose(core.clone(), &subject)),
            };
            out.push(Draft {
                question,
                answer,
                core,
                passage,
                subject,
                rule,
            });
        }
    }
    out
}

/// Words an instruction's answer may start with that take a capital there ("use the INSERT
/// command" -> "Use ..."); any other first word ("psql", "pg_dump") keeps its case.
const ANSWER_STARTS: &[&str] = &[
    "add",
    "alter",
    "avoid",
    "apply",
    "assign",
    "build",
    "call",
    "change",
    "check",
    "choose",
    "configure",
    "connect",
    "consult",
    "copy",
    "create",
    "declare",
    "define",
    "delete",
    "drop",
    "edit",
    "enable",
    "execute",
    "first",
    "give",
    "grant",
    "include",
    "insert",
    "install",
    "invoke",
    "issue",
    "list",
    "look",
    "make",
    "modify",
    "open",
    "pass",
    "precede",
    "provide",
    "put",
    "read",
    "remove",
    "rename",
    "run",
    "see",
    "select",
    "set",
    "specify",
    "start",
    "stop",
    "supply",
    "turn",
    "type",
    "update",
    "use",
    "write",
];

/// `passage` less its first `skip` words, the first word capitalised when it is a plain word
/// (see [`ANSWER_STARTS`]; "you'll" counts as "you"); all of it when `skip` is 0.
fn answer_from(passage: &str, skip: usize) -> String {
    let words: Vec<&str> = passage.split_whitespace().skip(skip).collect();
    let Some((first, rest)) = words.split_first() else {
        return passage.to_string();
    };
    let stem = first.split(['\'', '’']).next().unwrap_or(first);
    let verb = first.trim_end_matches([':', ',']);
    let capital = is_stopword(stem) || ANSWER_STARTS.contains(&verb);
    let first = match capital {
        true => first[..1].to_uppercase() + &first[1..],
        false => first.to_string(),
    };
    std::iter::once(first.as_str())
        .chain(rest.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An instruction's answer that is one imperative sentence, with the purpose it serves after it:
/// "Use the INSERT command." + "create a new row" -> "Use the INSERT command to create a new row."
/// What to do comes first (a model trained on "To create a new row, use ..." learns to stop after
/// the restated purpose), and the answer still says what it is for. An answer that carries a
/// command after a colon, or does not start with a verb of [`ANSWER_STARTS`], is kept as it is.
fn with_purpose(answer: String, purpose: &str) -> String {
    let first = answer
        .split_whitespace()
        .next()
        .map(lower)
        .unwrap_or_default();
    let single = answer.ends_with('.') && !answer.contains([':', ';']);
    if !single || !ANSWER_STARTS.contains(&first.as_str()) {
        return answer;
    }
    format!("{} to {purpose}.", answer.trim_end_matches('.'))
}

/// Whether an instruction's answer states what the reader must be, have or own ("You must also
/// have CREATE privilege on ...", "You need to be a superuser"): a requirement, not a how.
fn requirement(answer: &str) -> bool {
    let words: Vec<String> = answer.split_whitespace().take(5).map(lower).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let rest = match words.as_slice() {
        ["you", "must", "also", rest @ ..] | ["you", "must", rest @ ..] => rest,
        ["you", "need", "to", rest @ ..] => rest,
        _ => return false,
    };
    matches!(rest.first(), Some(&("be" | "have" | "own")))
}

fn lower(w: &str) -> String {
    w.to_lowercase()
}

/// A subject or clause word: no clause punctuation inside the phrase, no brackets or quotes, and a
/// letter or digit in every word (") ] Description EXECUTE" is a syntax synopsis, not a subject).
fn plain(words: &[&str]) -> bool {
    words.iter().all(|w| {
        !w.ends_with([',', ';', ':', '.', '!', '?'])
            && !w.contains(['(', ')', '[', ']', '{', '}', '<', '>', '"', '|'])
            && w.chars().any(char::is_alphanumeric)
    })
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
    let written = subject_words.join(" ");
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
    Some((question, written, rule))
}

/// "To Y, Z" / "If you want|need|wish to Y, Z" -> "How do I Y?", answered from Z; "You can Y by
/// ..." -> "How can I Y?", answered by the whole sentence (Y is 2..=12 words). The last value is
/// how many words the answer leaves out.
fn instruction(words: &[&str]) -> Option<(String, String, Rule, usize)> {
    let lowered: Vec<String> = words.iter().map(|w| lower(w)).collect();
    let l: Vec<&str> = lowered.iter().map(String::as_str).collect();
    let (start, question_start) = match l.as_slice() {
        ["to", ..] => (1, "How do I"),
        ["if", "you", "want" | "need" | "wish", "to", ..] => (4, "How do I"),
        ["you", "can", ..] => (2, "How can I"),
        _ => return None,
    };
    // "You can Y by Z" states no purpose before what to do: its answer is the whole sentence.
    let by_form = question_start == "How can I";
    let end = if by_form {
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
    if !plain(&[clause_text.as_str()]) || clause_text.contains([';', ':', '(', ',', '“', '"']) {
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
    let skip = if by_form { 0 } else { end };
    Some((
        format!("{question_start} {}?", asked.join(" ")),
        clause_text,
        Rule::Instruction,
        skip,
    ))
}

/// Why a draft is dropped before retrieval (None: it goes on).
pub(super) fn reject(draft: &Draft) -> Option<&'static str> {
    let lowered: Vec<String> = draft.subject.split_whitespace().map(lower).collect();
    let first = lowered.first().map(String::as_str).unwrap_or_default();
    let names_a_thing = draft.rule != Rule::Instruction;
    // A lone letter other than "a" starts table or synopsis text, not a name ("e rest of RE").
    let lone_letter = first.chars().count() == 1 && first != "a";
    let a_clause = lowered
        .iter()
        .any(|w| CLAUSE_WORDS.contains(&w.as_str()) || POINTING.contains(&w.as_str()));
    if VAGUE_FIRST.contains(&first)
        || lone_letter
        || content_words(&draft.subject).is_empty()
        || lowered.iter().any(|w| w == "following")
        || (names_a_thing && (gerund_phrase(&lowered) || a_clause))
    {
        return Some("vague subject");
    }
    if glued_heading(&draft.subject) || (names_a_thing && repeats_a_word(&lowered)) {
        return Some("heading glued to the subject");
    }
    let words = draft.passage.split_whitespace().count();
    if words < *ANSWER_WORDS.start() {
        return Some("answer too short");
    }
    if words > *ANSWER_WORDS.end() {
        return Some("answer too long");
    }
    if !ends_a_sentence(&draft.passage) {
        return Some("sentence cut at the chunk's end");
    }
    let answer_first = draft.core.split_whitespace().next().unwrap_or_default();
    let core = lower(&draft.core);
    if POINTERS.contains(&lower(answer_first).as_str())
        || (!core.contains(':') && POINTER_PHRASES.iter().any(|p| core.contains(p)))
    {
        return Some("answer points elsewhere");
    }
    // "To Y PostgreSQL uses X, which means ..." split at the wrong comma: ", which means ...".
    let continues =
        answer_first.ends_with(',') || CLAUSE_WORDS.contains(&lower(answer_first).as_str());
    if draft.rule == Rule::Instruction && continues {
        return Some("answer is not a sentence");
    }
    let question_words = content_words(&draft.question);
    let new_words = content_words(&draft.passage)
        .difference(&question_words)
        .count();
    if new_words < MIN_NEW_WORDS {
        return Some("trivial: the answer restates the question");
    }
    None
}

/// Whether `passage` ends as a sentence does (".", "!", "?" or the ";" of a statement, before any
/// closing bracket or quote): chunks are cut by length, so their last sentence may stop midway
/// ("... it may be necessary to use data type formatting functions (such").
fn ends_a_sentence(passage: &str) -> bool {
    let end = passage.trim_end_matches([')', '"', '\'', '”', '’', ']']);
    end.ends_with(['.', '!', '?', ';'])
}

/// Whether a subject (its words in lower case) is an action, not a thing: "Creating a canonical
/// function is a bit tricky" would ask "What is creating a canonical function?".
fn gerund_phrase(words: &[String]) -> bool {
    matches!(words, [first, second, ..]
        if first.len() > 4 && first.ends_with("ing") && matches!(second.as_str(), "a" | "an" | "the"))
}

/// Whether a word comes twice in a subject (its words in lower case): a catalog or option list's
/// entry ran into the sentence ("typndims int4 typndims is the number of ...").
fn repeats_a_word(words: &[String]) -> bool {
    let distinct: HashSet<&String> = words.iter().collect();
    distinct.len() < words.len()
}

/// Whether two capitalised words ("Setup", "Logical") follow each other in `subject`, a
/// capitalised article or pronoun stands after its first word, or it starts with a heading word
/// ([`HEADING_WORDS`]): chunk text keeps no line breaks, so a section heading runs into the
/// sentence after it ("Quick Setup Logical replication is a method ...", "Scalar Subqueries A
/// scalar subquery is ..."). Multi-word proper names are lost with them.
fn glued_heading(subject: &str) -> bool {
    let capitalised = |w: &str| {
        let mut chars = w.chars();
        chars.next().is_some_and(char::is_uppercase)
            && chars.clone().next().is_some()
            && chars.all(char::is_lowercase)
    };
    let words: Vec<&str> = subject.split_whitespace().collect();
    // A capitalised article or pronoun inside it starts a sentence: "Pseudo-Types There are ...".
    let sentence_start = words.iter().skip(1).any(|w| {
        *w == "A"
            || (capitalised(w)
                && (is_stopword(&lower(w)) || VAGUE_FIRST.contains(&lower(w).as_str())))
    });
    let heading_first = words.len() > 1 && HEADING_WORDS.contains(&words[0]);
    sentence_start
        || heading_first
        || words
            .windows(2)
            .any(|pair| capitalised(pair[0]) && capitalised(pair[1]))
}

/// The questions and answers kept so far, for duplicate checks.
#[derive(Debug, Default)]
pub(super) struct Seen {
    questions: HashSet<String>,
    answers: HashSet<String>,
    question_words: Vec<HashSet<String>>,
}

impl Seen {
    /// Why `draft` repeats what was kept (None: it is new).
    pub(super) fn repeats(&self, draft: &Draft) -> Option<&'static str> {
        if self.questions.contains(&normalize(&draft.question)) {
            return Some("duplicate question");
        }
        if self.answers.contains(&normalize(&draft.core)) {
            return Some("duplicate answer");
        }
        let words = content_words(&draft.question);
        let near = self
            .question_words
            .iter()
            .any(|seen| jaccard(seen, &words) >= NEAR_DUPLICATE);
        near.then_some("near-duplicate question")
    }

    pub(super) fn keep(&mut self, draft: &Draft) {
        self.questions.insert(normalize(&draft.question));
        self.answers.insert(normalize(&draft.core));
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
        assert!(
            d[0].answer.starts_with("Use a command such as this:"),
            "{d:?}"
        );
        assert!(
            d[0].passage.starts_with("To create a partial index"),
            "{d:?}"
        );
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
    fn the_title_is_cut_off_only_as_a_whole_word() {
        assert_eq!(
            sentences("Index", "Index Index Indexes are sorted."),
            ["Indexes are sorted."]
        );
        assert_eq!(
            sentences("Index", "Indexes are sorted."),
            ["Indexes are sorted."]
        );
    }

    #[test]
    fn instruction_answers_start_at_what_to_do() {
        let answer = |text: &str| drafts(&chunk("t", text))[0].answer.clone();
        // One imperative sentence: what to do, then what it is for.
        assert_eq!(
            answer("To create a new row, use the INSERT command."),
            "Use the INSERT command to create a new row."
        );
        assert_eq!(
            answer("If you want to keep your old data, rename the directory first."),
            "Rename the directory first to keep your old data."
        );
        assert_eq!(
            answer(
                "To run the tests before installing, you'll need to build with configure \
                 --disable-rpath."
            ),
            "You'll need to build with configure --disable-rpath."
        );
        assert_eq!(
            answer("To list the databases, psql -l prints their names and owners."),
            "psql -l prints their names and owners."
        );
        assert_eq!(
            answer("To connect to a server, you must give its host name and port."),
            "You must give its host name and port."
        );
        // "You can Y by Z" does not restate a purpose first: the whole sentence answers.
        assert_eq!(
            answer("You can reclaim disk space by running VACUUM FULL on the table."),
            "You can reclaim disk space by running VACUUM FULL on the table."
        );
        assert_eq!(
            answer("A partial index is an index built over a subset of a table."),
            "A partial index is an index built over a subset of a table."
        );
    }

    #[test]
    fn a_definition_list_entry_ends_before_the_next_term() {
        let text = "If md5 is specified but the password is encrypted for SCRAM, then SCRAM-based \
                    authentication will automatically be chosen instead. password The method \
                    password sends the password in clear-text.";
        let s = sentences("t", text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].ends_with("chosen instead."), "{s:?}");
        assert!(s[1].starts_with("password The method"), "{s:?}");
        for kept in [
            "Use a tool, e.g. the psql client, to connect.",
            "Copy the files, etc. and then restart.",
            "It takes approx. five minutes to finish.",
            "See Section 11.8. for more.",
        ] {
            assert_eq!(sentences("t", kept), [kept], "{kept}");
        }
        // A definition's answer stops where the next term starts.
        let d = drafts(&chunk(
            "t",
            "trust The trust method is a method that lets anyone connect without a password. \
             password The method password sends the password in clear-text.",
        ));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].answer.ends_with("without a password."), "{d:?}");
    }

    #[test]
    fn synopses_and_glued_headings_give_no_question() {
        assert_eq!(
            questions(
                "t",
                ") ] Description EXECUTE is used to execute a previously prepared statement."
            ),
            []
        );
        let d = drafts(&chunk(
            "t",
            "Scalar Subqueries A scalar subquery is an ordinary SELECT query in parentheses that \
             returns exactly one row with one column.",
        ));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(reject(&d[0]), Some("heading glued to the subject"));
        let first = |text: &str| reject(&drafts(&chunk("t", text))[0]);
        assert_eq!(
            first("typndims int4 typndims is the number of array dimensions for a domain."),
            Some("heading glued to the subject")
        );
        assert_eq!(
            first("Creating a canonical function is a bit tricky, since it must come first."),
            Some("vague subject")
        );
        assert_eq!(
            first("The following environment variables can be used to specify defaults."),
            Some("vague subject")
        );
        assert_eq!(
            first("String functions are a family of functions that operate on text values."),
            None
        );
        assert_eq!(
            first("e rest of RE is an ERE i case-insensitive matching m historical synonym for n"),
            Some("vague subject")
        );
        // "You can Y by Z" with a parenthetical inside Y gives no question.
        assert_eq!(
            questions(
                "t",
                "You can specify the stop point, known as the target, either by time or by name."
            ),
            []
        );
    }

    #[test]
    fn clauses_pointers_and_cut_sentences_are_dropped() {
        let first = |text: &str| reject(&drafts(&chunk("t", text))[0]);
        for vague in [
            "Within each FSM page is a binary tree, stored in an array with one byte per node.",
            "Particularly important in this regard is the temporary-table schema, which is \
             searched first.",
            "assumption that a null value is a valid value of every data type.",
            "Where interoperability with other systems is a concern, for some data types, it \
             may be necessary to convert them.",
        ] {
            assert_eq!(first(vague), Some("vague subject"), "{vague}");
        }
        assert_eq!(
            first(
                "To distinguish which grouping a particular output row resulted from, see Table 9.62."
            ),
            Some("answer points elsewhere")
        );
        assert_eq!(
            first("Data type formatting functions are used to convert values to text (such"),
            Some("sentence cut at the chunk's end")
        );
        // An instruction's clause may hold "which": it is a purpose, not a name.
        assert_eq!(
            first("To find which statements take the most time, use the pg_stat_statements view."),
            None
        );
        assert_eq!(
            first("A table is the most common form of relation in PostgreSQL (see Section 5.1.)"),
            None
        );
    }

    #[test]
    fn a_requirement_is_asked_as_what_is_needed() {
        let d = drafts(&chunk(
            "t",
            "To change a view's schema, you must also have CREATE privilege on the new schema.",
        ));
        assert_eq!(d[0].question, "What do I need to change a view's schema?");
        assert_eq!(
            d[0].answer,
            "You must also have CREATE privilege on the new schema."
        );
        assert_eq!(reject(&d[0]), None);
        // "You must write ..." says how: it stays a how-to question.
        let d = drafts(&chunk(
            "t",
            "To use the PGXS infrastructure for your extension, you must write a simple makefile.",
        ));
        assert_eq!(
            d[0].question,
            "How do I use the PGXS infrastructure for my extension?"
        );
    }

    #[test]
    fn split_clauses_pointing_answers_and_headings_are_dropped() {
        let first = |text: &str| reject(&drafts(&chunk("t", text))[0]);
        assert_eq!(
            first(
                "To guarantee true serializability PostgreSQL uses predicate locking, which \
                 means that it keeps locks."
            ),
            Some("answer is not a sentence")
        );
        assert_eq!(
            first(
                "To set up manually-managed vacuuming properly, it is essential to understand \
                 the issues discussed in the next few subsections."
            ),
            Some("answer points elsewhere")
        );
        for glued in [
            "Pseudo-Types There are a few pseudo-types for special purposes.",
            "Description pg_test_timing is a tool to measure the timing overhead.",
        ] {
            assert_eq!(
                first(glued),
                Some("heading glued to the subject"),
                "{glued}"
            );
        }
    }

    #[test]
    fn the_same_answer_to_another_purpose_is_a_duplicate() {
        let mut seen = Seen::default();
        let a = &drafts(&chunk(
            "t",
            "To change a view's schema, you must also have CREATE privilege on the new schema.",
        ))[0];
        seen.keep(a);
        let b = &drafts(&chunk(
            "t",
            "To change a function's schema, you must also have CREATE privilege on the new schema.",
        ))[0];
        assert_eq!(seen.repeats(b), Some("duplicate answer"));
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
            passage: answer.into(),
            answer: answer.into(),
            core: answer.into(),
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
            "Quick Setup Logical replication",
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
