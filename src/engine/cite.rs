//! The rule that an answer cites only the sources it was given: with `n` numbered sources, a
//! citation (`[`, not right after a letter or digit, then a number) may only name a number from
//! 1 to `n`, and a run of citations (`[1] [2]`, `[1, 3]`, `[1][2]`, with only spaces and commas
//! between) may not name one twice; once a run has named all `n`, it may not open another
//! bracket. Without it a small model decoding greedily can count "[7] [1] [2] ... [20]" to the
//! token limit with five sources given (1 of 89 PostgreSQL answers did).
//!
//! A text-level rule applied per token: each candidate token that contains a digit or `[` is
//! tried on the answer's text so far and banned when it would break the rule. Brackets not
//! followed right away by a digit (`[ CONCURRENTLY ]`) and subscripts (`arr[7]`) are not
//! citations and are left alone. Owns [`CitationVocab`]: every token's text, decoded once per
//! tokenizer.

/// Sources above this many turn the rule off (the run's numbers are a 128-bit set).
const MAX_SOURCES: usize = 128;

/// Each token's text, and the tokens the rule may have to ban (those holding a digit or `[`).
#[derive(Debug, Default)]
pub struct CitationVocab {
    texts: Vec<Box<str>>,
    candidates: Vec<u32>,
}

impl CitationVocab {
    /// From the text of every token id, in id order (special tokens as "").
    pub fn new(texts: Vec<String>) -> CitationVocab {
        let candidates = texts
            .iter()
            .enumerate()
            .filter(|(_, t)| t.chars().any(|c| c == '[' || c.is_ascii_digit()))
            .map(|(i, _)| i as u32)
            .collect();
        CitationVocab {
            texts: texts.into_iter().map(String::into_boxed_str).collect(),
            candidates,
        }
    }

    /// From a tokenizer: each id decoded alone, special tokens left out.
    pub fn from_tokenizer(tokenizer: &tokenizers::Tokenizer) -> CitationVocab {
        let size = tokenizer.get_vocab_size(true) as u32;
        CitationVocab::new(
            (0..size)
                .map(|id| tokenizer.decode(&[id], true).unwrap_or_default())
                .collect(),
        )
    }

    /// The tokens that may not follow `generated` (the answer so far) when `sources` sources were
    /// given (0: no rule).
    pub fn banned(&self, generated: &[u32], sources: usize) -> Vec<u32> {
        if sources == 0 || sources > MAX_SOURCES || self.texts.is_empty() {
            return Vec::new();
        }
        let mut scan = Scan::default();
        for &t in generated {
            for c in self.text(t).chars() {
                scan.step(c, sources); // a break already generated is history, not a ban
            }
        }
        self.candidates
            .iter()
            .copied()
            .filter(|&t| {
                let mut s = scan;
                !self.text(t).chars().all(|c| s.step(c, sources))
            })
            .collect()
    }

    fn text(&self, token: u32) -> &str {
        self.texts.get(token as usize).map_or("", |t| t)
    }
}

/// Where the text stands: in prose, right after a citation's `[`, inside a number, or after a
/// separator inside a citation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Mode {
    #[default]
    Text,
    Open,
    Number(u32),
    Sep,
}

/// The state of a left-to-right reading of the answer.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    mode: Mode,
    /// The character before (a `[` right after a word character is a subscript).
    prev: char,
    /// Numbers named by the current run of citations (bit `i` = source `i + 1`).
    run: u128,
    /// A run of citations just ended, and only spaces and commas came since.
    after_run: bool,
}

impl Scan {
    /// Read `c`; false when it breaks the rule with `n` sources.
    fn step(&mut self, c: char, n: usize) -> bool {
        let ok = match self.mode {
            Mode::Text => self.prose(c, n),
            Mode::Open | Mode::Sep => self.in_citation(c, n),
            Mode::Number(v) => self.in_number(v, c, n),
        };
        self.prev = c;
        ok
    }

    fn prose(&mut self, c: char, n: usize) -> bool {
        let word = self.prev.is_alphanumeric() || self.prev == '_';
        if c == '[' && !word {
            if !self.after_run {
                self.run = 0;
            }
            self.mode = Mode::Open;
            return !(self.after_run && self.run == full(n));
        }
        if !(self.after_run && (c.is_whitespace() || c == ',')) {
            self.end_run();
        }
        true
    }

    fn in_citation(&mut self, c: char, n: usize) -> bool {
        if let Some(d) = c.to_digit(10) {
            self.mode = Mode::Number(d);
            return completable(d, n, self.run);
        }
        match (self.mode, c) {
            (Mode::Sep, ']') => self.close(),
            (Mode::Sep, c) if c.is_whitespace() || c == ',' || c == '-' => {}
            _ => {
                // "[ CONCURRENTLY ]", "[a": not a citation; the character is read as prose
                // (it may open one: "[[1]").
                self.mode = Mode::Text;
                self.end_run();
                return self.prose(c, n);
            }
        }
        true
    }

    fn in_number(&mut self, v: u32, c: char, n: usize) -> bool {
        if let Some(d) = c.to_digit(10) {
            let v = v.saturating_mul(10).saturating_add(d);
            self.mode = Mode::Number(v);
            return completable(v, n, self.run);
        }
        match c {
            ']' | ',' | '-' | ' ' => {
                if (1..=n as u32).contains(&v) {
                    self.run |= 1 << (v - 1);
                }
                if c == ']' {
                    self.close();
                } else {
                    self.mode = Mode::Sep;
                }
            }
            _ => {
                self.mode = Mode::Text; // "[1a": not a citation
                self.end_run();
                return self.prose(c, n);
            }
        }
        true
    }

    fn close(&mut self) {
        self.mode = Mode::Text;
        self.after_run = true;
    }

    fn end_run(&mut self) {
        self.after_run = false;
        self.run = 0;
    }
}

/// Every source number named (bits 0..n).
fn full(n: usize) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

/// Whether the digits read so far, `prefix`, can still become a source number from 1 to `n` that
/// the run has not named (with more digits, or as they are).
fn completable(prefix: u32, n: usize, run: u128) -> bool {
    prefix != 0
        && (1..=n as u32).any(|u| {
            let mut x = u;
            while x > prefix {
                x /= 10;
            }
            x == prefix && run & (1 << (u - 1)) == 0
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the given pieces, and the ids of a text made of them.
    fn vocab(pieces: &[&str]) -> CitationVocab {
        CitationVocab::new(pieces.iter().map(|p| p.to_string()).collect())
    }

    fn ids(v: &CitationVocab, pieces: &[&str]) -> Vec<u32> {
        pieces
            .iter()
            .map(|p| v.texts.iter().position(|t| &**t == *p).unwrap() as u32)
            .collect()
    }

    fn banned_texts(v: &CitationVocab, answer: &[&str], n: usize) -> Vec<String> {
        v.banned(&ids(v, answer), n)
            .into_iter()
            .map(|t| v.text(t).to_string())
            .collect()
    }

    const PIECES: &[&str] = &[
        "Use", " it", ".", " [", "[", "]", "1", "2", "3", "5", "7", "0", ", ", " ", "a", "arr",
        "12",
    ];

    #[test]
    fn only_numbers_of_given_sources_may_be_cited() {
        let v = vocab(PIECES);
        // After "Use it. [" with 5 sources: 7 and 0 are banned, and so is "12" (as a piece).
        assert_eq!(
            banned_texts(&v, &["Use", " it", ".", " ["], 5),
            vec!["7", "0", "12"]
        );
        // With 12 sources "1" may go on to 10, 11 or 12, not to 13 or beyond.
        assert_eq!(
            banned_texts(&v, &["Use", " it", ".", " [", "1"], 12),
            vec!["3", "5", "7", "12"]
        );
        assert_eq!(
            banned_texts(&v, &["Use", " it", ".", " [", "1"], 5),
            vec!["1", "2", "3", "5", "7", "0", "12"]
        );
    }

    #[test]
    fn a_run_of_citations_names_each_source_once_and_ends() {
        let v = vocab(PIECES);
        // "[1] [" : 1 is taken in this run.
        let run = ["Use", ".", " [", "1", "]", " ["];
        assert_eq!(banned_texts(&v, &run, 3), vec!["1", "5", "7", "0", "12"]);
        // "[1, 2, 3]" names all three: no further bracket in this run.
        let all = ["Use", ".", " [", "1", ", ", "2", ", ", "3", "]"];
        assert_eq!(banned_texts(&v, &all, 3), vec![" [", "["]);
        // Prose in between starts a new run: citing 1 again later is fine.
        let later = ["Use", ".", " [", "1", "]", " it", ".", " ["];
        assert_eq!(banned_texts(&v, &later, 3), vec!["5", "7", "0", "12"]);
    }

    #[test]
    fn brackets_that_are_not_citations_are_left_alone() {
        let v = vocab(PIECES);
        // A subscript: "arr[" is followed by any number.
        assert!(banned_texts(&v, &["arr", "["], 3).is_empty());
        // "[ a": the SQL synopsis style; digits after it are prose.
        assert!(banned_texts(&v, &["Use", " [", " ", "a", " "], 3).is_empty());
        // No sources (not a RAG prompt), or the rule off: nothing banned.
        assert!(banned_texts(&v, &["Use", " ["], 0).is_empty());
    }

    /// Every number inside a citation of `text` (read independently of [`Scan`]).
    fn cited_numbers(text: &str) -> Vec<u64> {
        let c: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for i in 0..c.len() {
            let word = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
            if c[i] != '[' || word {
                continue;
            }
            let mut j = i + 1;
            while j < c.len() && c[j].is_ascii_digit() {
                let start = j;
                while j < c.len() && c[j].is_ascii_digit() {
                    j += 1;
                }
                let digits: String = c[start..j].iter().collect();
                out.push(digits.parse().unwrap_or(u64::MAX));
                while j < c.len() && matches!(c[j], ',' | ' ' | '-') {
                    j += 1;
                }
            }
        }
        out
    }

    proptest::proptest! {
        /// Whatever the model prefers, an answer made only of allowed tokens cites 1..=n.
        #[test]
        fn answers_made_of_allowed_tokens_cite_only_given_sources(
            n in 1usize..7,
            preferences in proptest::collection::vec(proptest::collection::vec(0usize..20, 20), 60),
        ) {
            let pieces = [
                " [", "[", "]", ", ", "-", " ", "0", "1", "2", "3", "5", "7", "9", "12", "40",
                "[1", "3]", " x", ".", "a",
            ];
            let v = vocab(&pieces);
            let mut answer: Vec<u32> = Vec::new();
            for order in &preferences {
                let banned = v.banned(&answer, n);
                if let Some(&t) = order.iter().find(|&&t| !banned.contains(&(t as u32))) {
                    answer.push(t as u32);
                }
            }
            let text: String = answer.iter().map(|&t| v.text(t)).collect();
            for number in cited_numbers(&text) {
                proptest::prop_assert!((1..=n as u64).contains(&number), "{number} in {text:?}");
            }
        }
    }

    #[test]
    fn the_source_counting_loop_ends_after_the_last_source() {
        // The observed failure: "[1] [2] [3] [4] [5]" then "[6]"... with 5 sources.
        let v = vocab(&[" [", "]", "1", "2", "3", "4", "5", "6", "."]);
        let mut answer = vec!["."];
        for d in ["1", "2", "3", "4", "5"] {
            answer.extend([" [", d, "]"]);
        }
        assert_eq!(banned_texts(&v, &answer, 5), vec![" ["]);
    }
}
