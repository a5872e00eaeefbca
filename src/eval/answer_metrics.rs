//! The text metrics of one answer: SQuAD normalisation, exact match and token F1, citation
//! markers stripped before scoring, claims (the answer's sentences that say something), token
//! coverage of a claim by a source, and abstention phrases. Pure functions; the answer evaluation
//! (`eval::answers`) and the triplet builder use them.

use std::collections::{BTreeMap, HashSet};

use unicode_segmentation::UnicodeSegmentation;

/// Words in a span that, seen twice in one answer, mark it as looping (issue 19's measure).
pub const LOOP_SPAN_WORDS: usize = 8;

/// Whether some run of `words` consecutive words (after SQuAD normalisation, citation markers
/// removed) occurs at least twice in `answer`, overlapping or not.
pub fn repeats_span(answer: &str, words: usize) -> bool {
    let normalized = normalize(&strip_citations(answer));
    let tokens: Vec<&str> = normalized.split_whitespace().collect();
    if words == 0 || tokens.len() <= words {
        return false;
    }
    let mut seen = HashSet::new();
    tokens.windows(words).any(|w| !seen.insert(w))
}

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `answer` without its citation markers (`[1]`, `[1, 3]`): they say where the answer came from,
/// they are not part of it, so EM and F1 score the text without them.
pub fn strip_citations(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close)
                if close > 0
                    && after[..close]
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
                    && after[..close].chars().any(|c| c.is_ascii_digit()) =>
            {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1.0 when the normalised prediction equals a normalised gold answer.
pub fn exact_match(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize(prediction);
    if golds.iter().any(|g| normalize(g) == p) {
        1.0
    } else {
        0.0
    }
}

/// The best token-level F1 against any gold answer.
pub fn f1(prediction: &str, golds: &[String]) -> f64 {
    let p: Vec<String> = normalize(prediction)
        .split_whitespace()
        .map(String::from)
        .collect();
    golds
        .iter()
        .map(|g| {
            let g: Vec<String> = normalize(g).split_whitespace().map(String::from).collect();
            if p.is_empty() || g.is_empty() {
                return if p == g { 1.0 } else { 0.0 };
            }
            let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
            for t in &g {
                *counts.entry(t).or_default() += 1;
            }
            let mut common = 0;
            for t in &p {
                if let Some(c) = counts.get_mut(t.as_str())
                    && *c > 0
                {
                    *c -= 1;
                    common += 1;
                }
            }
            if common == 0 {
                return 0.0;
            }
            let precision = common as f64 / p.len() as f64;
            let recall = common as f64 / g.len() as f64;
            2.0 * precision * recall / (precision + recall)
        })
        .fold(0.0, f64::max)
}

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "by", "for", "with",
    "from", "as", "is", "are", "was", "were", "be", "been", "being", "it", "its", "this", "that",
    "these", "those", "there", "here", "i", "you", "he", "she", "we", "they", "them", "his", "her",
    "their", "our", "your", "my", "me", "do", "does", "did", "has", "have", "had", "not", "no",
    "so", "than", "then", "can", "could", "will", "would", "should", "may", "might", "which",
    "what", "who", "whom", "when", "where", "why", "how", "also", "into", "about", "such", "all",
    "any", "some", "more", "most", "other", "up", "out", "over", "only", "very", "s", "t",
];

/// Normalised content tokens (stopwords removed).
pub fn content_tokens(text: &str) -> Vec<String> {
    normalize(text)
        .split_whitespace()
        .filter(|w| !STOPWORDS.contains(w))
        .map(String::from)
        .collect()
}

/// The answer's claims: its sentences without `[n]` markers, keeping those with content tokens.
pub fn claims(answer: &str) -> Vec<String> {
    let mut without_markers = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        without_markers.push_str(&rest[..open]);
        match rest[open..].find(']') {
            Some(close) => rest = &rest[open + close + 1..],
            None => {
                rest = &rest[open..];
                break;
            }
        }
    }
    without_markers.push_str(rest);
    without_markers
        .split_sentence_bounds()
        .map(str::trim)
        .filter(|s| !content_tokens(s).is_empty())
        .map(String::from)
        .collect()
}

/// Share of the claim's content tokens found in `source` (0 for a claim without content tokens).
pub fn token_coverage(claim: &str, source: &str) -> f64 {
    let c = content_tokens(claim);
    if c.is_empty() {
        return 0.0;
    }
    let s: HashSet<String> = content_tokens(source).into_iter().collect();
    c.iter().filter(|t| s.contains(*t)).count() as f64 / c.len() as f64
}

/// A claim counts as supported when one source covers this share of its content tokens...
pub const COVERAGE_THRESHOLD: f64 = 0.6;
/// ...or when its embedding is this close to a sentence of a source.
pub const SIMILARITY_THRESHOLD: f32 = 0.75;

/// Phrases that mark an abstention.
pub fn is_abstention(answer: &str) -> bool {
    let a = answer.to_lowercase();
    a.trim().is_empty()
        || [
            "i don't know",
            "i do not know",
            "don't know",
            "cannot answer",
            "can't answer",
            "not enough information",
            "no information",
            "the sources do not",
        ]
        .iter()
        .any(|p| a.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_are_not_part_of_the_answer() {
        assert_eq!(strip_citations("Paris [1]"), "Paris");
        assert_eq!(strip_citations("It is [2, 3] teal [1]."), "It is teal .");
        assert_eq!(strip_citations("array[i] and [x]"), "array[i] and [x]");
        assert_eq!(strip_citations("[ ] [1"), "[ ] [1");
        assert_eq!(
            exact_match(&strip_citations("Paris [1]"), &["Paris".into()]),
            1.0
        );
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn squad_normalisation_and_exact_match() {
        assert_eq!(normalize("The  Denver Broncos!"), "denver broncos");
        assert_eq!(
            exact_match("the Denver Broncos.", &s(&["Denver Broncos"])),
            1.0
        );
        assert_eq!(exact_match("Broncos", &s(&["Denver Broncos"])), 0.0);
        assert_eq!(exact_match("", &s(&["x"])), 0.0);
        assert_eq!(normalize("Café — Zürich"), "café zürich");
    }

    #[test]
    fn f1_takes_the_best_gold() {
        assert_eq!(
            f1("Denver Broncos", &s(&["Broncos", "Denver Broncos"])),
            1.0
        );
        let v = f1("the Denver team", &s(&["Denver Broncos"]));
        assert!((v - 0.5).abs() < 1e-12, "{v}"); // p=1/2, r=1/2
        assert_eq!(f1("", &s(&["Denver"])), 0.0);
        assert_eq!(f1("the a an", &s(&["the"])), 1.0, "both normalise to empty");
        assert_eq!(f1("x", &[]), 0.0);
    }

    #[test]
    fn claims_drop_markers_and_stopword_sentences() {
        let c = claims("Paris is the capital [1]. It is. The Seine runs through it [2][3].");
        assert_eq!(
            c,
            s(&["Paris is the capital .", "The Seine runs through it ."])
        );
        assert!(claims("").is_empty());
        assert!(claims("It is what it is.").is_empty());
    }

    #[test]
    fn looping_answers_are_spans_seen_twice() {
        let heading = "25.1.3. Updating Planner Statistics [1] ";
        assert!(repeats_span(&heading.repeat(3), 4));
        assert!(!repeats_span(heading, 4));
        // Citations and case do not hide a loop; a short answer cannot loop.
        assert!(repeats_span(
            "Use VACUUM to reclaim space [1]. use vacuum to reclaim space [2].",
            5
        ));
        assert!(!repeats_span("VACUUM reclaims storage.", 8));
        // Repeated words that never form the same run of `words` are fine.
        assert!(!repeats_span("a b c d e a b c x e a b y d e", 4));
        assert!(!repeats_span("anything at all", 0));
    }

    #[test]
    fn coverage_and_abstention() {
        assert_eq!(
            token_coverage("Paris is the capital", "The capital of France is Paris"),
            1.0
        );
        assert_eq!(token_coverage("Berlin is big", "Paris is the capital"), 0.0);
        assert_eq!(token_coverage("it is", "anything"), 0.0);
        assert!(is_abstention("I don't know."));
        assert!(is_abstention("   "));
        assert!(!is_abstention("Paris."));
    }
}
