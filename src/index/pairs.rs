//! Word pairs: the `pairs` field indexes each two adjacent words of a chunk's text (stemmed as the
//! text is, words of one letter left out) as one term, so BM25 can reward a chunk that says two
//! words of a question side by side ("makeup bag", "vacuum full") above one that has both apart.
//! A pair is one term with a short posting list, so this costs a search one more lookup per pair,
//! not the position intersections of phrase queries. Owns the pair tokenizer and its name; which
//! weight pair clauses get is the query's ([`super::query`]).

use tantivy::Index;
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, TextAnalyzer, Token,
    TokenStream, Tokenizer,
};

/// The name the pair tokenizer is registered under in every index.
pub(super) const TOKENIZER: &str = "en_stem_pairs";

/// Register the pair tokenizer with `index` (tokenizers are not saved with an index: every open
/// and create registers it before a writer or a query needs it).
pub(super) fn register(index: &Index) {
    index.tokenizers().register(TOKENIZER, PairTokenizer::new());
}

/// Adjacent words as pairs: the words of `en_stem` (tantivy's simple tokenizer, long words out,
/// lowercased, Snowball English stemmer) without those of one character (the "s" of "Beyoncé's",
/// the "t" of "don't"), each with the next joined by a space (which no word holds).
#[derive(Clone)]
pub(super) struct PairTokenizer {
    words: TextAnalyzer,
    pairs: Vec<Token>,
}

impl PairTokenizer {
    fn new() -> PairTokenizer {
        PairTokenizer {
            words: TextAnalyzer::builder(SimpleTokenizer::default())
                .filter(RemoveLongFilter::limit(40))
                .filter(LowerCaser)
                .filter(Stemmer::new(Language::English))
                .build(),
            pairs: Vec::new(),
        }
    }
}

impl Tokenizer for PairTokenizer {
    type TokenStream<'a> = PairStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> PairStream<'a> {
        self.pairs.clear();
        let mut stream = self.words.token_stream(text);
        let mut previous: Option<Token> = None;
        while stream.advance() {
            let word = stream.token();
            if word.text.chars().nth(1).is_none() {
                continue;
            }
            if let Some(first) = previous.take() {
                self.pairs.push(Token {
                    offset_from: first.offset_from,
                    offset_to: word.offset_to,
                    position: self.pairs.len(),
                    text: format!("{} {}", first.text, word.text),
                    position_length: 1,
                });
            }
            previous = Some(word.clone());
        }
        PairStream {
            pairs: &mut self.pairs,
            at: None,
        }
    }
}

/// The pairs of one text, in order.
pub(super) struct PairStream<'a> {
    pairs: &'a mut [Token],
    at: Option<usize>,
}

impl TokenStream for PairStream<'_> {
    fn advance(&mut self) -> bool {
        let next = self.at.map_or(0, |i| i + 1);
        self.at = Some(next.min(self.pairs.len()));
        next < self.pairs.len()
    }

    fn token(&self) -> &Token {
        &self.pairs[self.at.expect("advance() was called first")]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.pairs[self.at.expect("advance() was called first")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<String> {
        let mut tokenizer = PairTokenizer::new();
        let mut stream = tokenizer.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            out.push(stream.token().text.clone());
        }
        out
    }

    #[test]
    fn adjacent_stemmed_words_pair_up_without_one_letter_words() {
        assert_eq!(
            pairs("Beyoncé's Houses don't fit a Makeup-bag"),
            [
                "beyoncé hous",
                "hous don",
                "don fit",
                "fit makeup",
                "makeup bag"
            ]
        );
        assert!(pairs("one").is_empty());
        assert!(pairs("").is_empty());
        assert!(pairs("a b c").is_empty());
    }

    #[test]
    fn a_stream_past_its_end_stays_there() {
        let mut tokenizer = PairTokenizer::new();
        let mut stream = tokenizer.token_stream("red apples");
        assert!(stream.advance());
        assert_eq!(stream.token().text, "red appl");
        assert!(!stream.advance());
        assert!(!stream.advance());
    }
}
