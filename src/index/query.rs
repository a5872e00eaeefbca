//! Free text -> the weighted clauses of a BM25 query over a chunk's title, text, window and word
//! pairs, with no query syntax.
//!
//! Every clause is a term (or, for a word the analyzer splits, a phrase) that may match; a search
//! sums the scores of those that do ([`super::topk`]). Stopwords stay (dropping them, from the
//! query or from the index as well, ranked worse on SQuAD dev, new_wiki and Amazon).

use std::collections::hash_map::{Entry, HashMap};

use tantivy::{Index, Term};

use super::Fields;
use super::topk::Clause;
use crate::config::Bm25Config;

/// Words of a search query that count (a question is a few dozen; a pasted page is cut here).
pub const MAX_QUERY_WORDS: usize = 512;

/// Phrase clauses per field of one query (a question has a few split words, if any). A phrase is
/// an intersection of its terms' position lists; 512 phrases of two common words took 3.2 s to
/// search at 100k chunks. Words split past this many count as their separate terms.
pub(super) const MAX_PHRASES: usize = 32;

/// Free text as the clauses of disjunctive BM25 over title, text and window: each
/// whitespace-separated word, without an English possessive `'s` (the text's "Beyoncé's" indexes
/// "beyoncé" then "s", and a question's "Beyoncé's" must match a text that says "Beyoncé"),
/// through the field's own analyzer, is a term, or a phrase when it splits into several
/// (`pg_dump` -> "pg dump"). Title and window clauses are weighted by `settings.title_weight` and
/// `settings.window_weight`, and each two adjacent words of the text are a pair clause
/// ([`super::pairs`]) weighted by `settings.pair_weight` (each left out at 0). There is no query
/// syntax: nothing a user types is an
/// operator (`-Fc` is not a negation, `title:` not a field), and nothing nests, so no input can
/// overflow the stack (tantivy's parser recursed once per `(`: 100k of them aborted the
/// process). The first [`MAX_QUERY_WORDS`] words count, and at most [`MAX_PHRASES`] phrases per
/// field.
pub(super) fn free_text(
    index: &Index,
    fields: &Fields,
    text: &str,
    settings: &Bm25Config,
) -> tantivy::Result<Vec<Clause>> {
    let mut clauses: Vec<Clause> = Vec::new();
    // A word asked twice is one clause counted twice (the same sum, one pass over its postings).
    let mut seen: HashMap<Vec<Term>, usize> = HashMap::new();
    for (field, weight) in [
        (Some(fields.title), settings.title_weight),
        (Some(fields.text), 1.0),
        (fields.window, settings.window_weight),
    ] {
        let Some(field) = field.filter(|_| weight > 0.0) else {
            continue;
        };
        let mut analyzer = index.tokenizer_for_field(field)?;
        let mut phrases = 0;
        for word in text.split_whitespace().take(MAX_QUERY_WORDS) {
            let mut terms = Vec::new();
            let mut stream = analyzer.token_stream(without_possessive(word));
            while stream.advance() {
                terms.push(Term::from_field_text(field, &stream.token().text));
            }
            let new_phrase = terms.len() > 1 && !seen.contains_key(&terms);
            if new_phrase && phrases == MAX_PHRASES {
                // Past the cap, a split word's parts count as words of their own.
                for term in terms {
                    add(&mut clauses, &mut seen, vec![term], weight);
                }
                continue;
            }
            phrases += usize::from(new_phrase);
            if !terms.is_empty() {
                add(&mut clauses, &mut seen, terms, weight);
            }
        }
    }
    if let Some(field) = fields.pairs.filter(|_| settings.pair_weight > 0.0) {
        let words: Vec<&str> = text.split_whitespace().take(MAX_QUERY_WORDS).collect();
        let words = words.join(" ");
        let mut analyzer = index.tokenizer_for_field(field)?;
        let mut stream = analyzer.token_stream(&words);
        while stream.advance() {
            let pair = Term::from_field_text(field, &stream.token().text);
            add(&mut clauses, &mut seen, vec![pair], settings.pair_weight);
        }
    }
    Ok(clauses)
}

/// `terms` (one clause) counted `weight` more times: added to its clause when asked before.
fn add(
    clauses: &mut Vec<Clause>,
    seen: &mut HashMap<Vec<Term>, usize>,
    terms: Vec<Term>,
    weight: f32,
) {
    match seen.entry(terms) {
        Entry::Occupied(at) => clauses[*at.get()].weight += weight,
        Entry::Vacant(slot) => {
            clauses.push(Clause {
                terms: slot.key().clone(),
                weight,
            });
            slot.insert(clauses.len() - 1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn possessives_are_dropped_unless_nothing_is_left() {
        assert_eq!(
            without_possessive("'s"),
            "'s",
            "nothing is left to search otherwise"
        );
        assert_eq!(without_possessive("Mozart’s"), "Mozart");
        assert_eq!(without_possessive("Beyoncé's"), "Beyoncé");
        assert_eq!(without_possessive("its"), "its");
    }
}
