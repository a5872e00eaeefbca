//! Free text -> a BM25 query over a chunk's title and text, with no query syntax.
//!
//! Every clause is a term (or, for a word the analyzer splits, a phrase) that may match: a
//! disjunction of term clauses is what tantivy scores with block-max WAND, which skips the blocks
//! of common words' long postings that cannot change the top `k`. Stopwords stay (dropping them,
//! from the query or from the index as well, ranked worse on SQuAD dev, new_wiki and Amazon).

use tantivy::query::{BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, TermQuery};
use tantivy::schema::IndexRecordOption;
use tantivy::{Index, Term};

use super::Fields;
use crate::config::Bm25Config;

/// Words of a search query that count (a question is a few dozen; a pasted page is cut here).
pub const MAX_QUERY_WORDS: usize = 512;

/// Free text as plain disjunctive BM25 over title, text and window: each whitespace-separated word,
/// without an English possessive `'s` (the text's "Beyoncé's" indexes "beyoncé" then "s", and a
/// question's "Beyoncé's" must match a text that says "Beyoncé"), through the field's own
/// analyzer, is a term, or a phrase when it splits into several (`pg_dump` -> "pg dump"). Title
/// and window clauses are weighted by `settings.title_weight` and `settings.window_weight` (left
/// out at 0). There is no query syntax:
/// nothing a user types is an operator (`-Fc` is not a negation, `title:` not a field), and
/// nothing nests, so no input can overflow the stack (tantivy's parser recursed once per `(`: 100k
/// of them aborted the process). The first [`MAX_QUERY_WORDS`] words count.
pub(super) fn free_text(
    index: &Index,
    fields: &Fields,
    text: &str,
    settings: &Bm25Config,
) -> tantivy::Result<BooleanQuery> {
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    for (field, weight) in [
        (Some(fields.title), settings.title_weight),
        (Some(fields.text), 1.0),
        (fields.window, settings.window_weight),
    ] {
        let Some(field) = field.filter(|_| weight > 0.0) else {
            continue;
        };
        let mut analyzer = index.tokenizer_for_field(field)?;
        for word in text.split_whitespace().take(MAX_QUERY_WORDS) {
            let mut terms = Vec::new();
            let mut stream = analyzer.token_stream(without_possessive(word));
            while stream.advance() {
                terms.push(Term::from_field_text(field, &stream.token().text));
            }
            let query: Box<dyn Query> = match terms.len() {
                0 => continue,
                1 => Box::new(TermQuery::new(
                    terms.remove(0),
                    IndexRecordOption::WithFreqs,
                )),
                _ => Box::new(PhraseQuery::new(terms)),
            };
            let query = if weight == 1.0 {
                query
            } else {
                Box::new(BoostQuery::new(query, weight))
            };
            clauses.push((Occur::Should, query));
        }
    }
    Ok(BooleanQuery::new(clauses))
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
