//! `triplets build --from-log`: what users liked or corrected becomes training triplets.
//!
//! From a collection's answer log (`answerlog`), each answer rated up gives (question, context,
//! the answer as given) and each corrected answer gives (question, context, the correction).
//! The context is the sources the answer was given from, in their order and numbering, when all
//! of those chunks are still stored ("given then"); otherwise what serving retrieves for the
//! question now, for answers that cite nothing (a citation would point at the wrong source). Emails, phone numbers and secrets (API keys, tokens) in questions and answers are
//! masked by default, since users type them into questions. Pairs repeating an earlier (question,
//! answer) are dropped; the report counts what was kept and why the rest was dropped.

use std::collections::HashSet;
use std::sync::Arc;

use super::Triplet;
use super::triplets::{BuildReport, shuffle_sources};
use crate::answerlog::{AnswerLog, FeedbackFilter, LoggedAnswer, blocking};
use crate::collection::Collection;
use crate::eval::answer_metrics::normalize;
use crate::rag::{Rag, RagError, Source};
use crate::rng::Rng;

/// What to learn from and how.
#[derive(Debug, Clone, Copy)]
pub struct FromLog {
    pub filter: FeedbackFilter,
    /// Mask emails, phone numbers and secrets in questions and answers.
    pub mask_pii: bool,
    /// Put each answer's sources in a random order (seed), renumbering citations to follow.
    pub shuffle: Option<u64>,
}

/// `text` with emails, phone numbers and secret-looking tokens replaced by `[email]`, `[phone]`
/// and `[secret]`.
pub fn mask_pii(text: &str) -> String {
    let mut out = Vec::new();
    for word in text.split_inclusive(char::is_whitespace) {
        let body = word.trim_end();
        let tail = &word[body.len()..];
        // Punctuation around a token stays (a sentence's final full stop, brackets).
        let start = body
            .find(|c: char| c.is_alphanumeric() || c == '+' || c == '(')
            .unwrap_or(body.len());
        let end = body
            .rfind(|c: char| c.is_alphanumeric())
            .map_or(start, |i| {
                i + body[i..].chars().next().map_or(1, char::len_utf8)
            });
        let (pre, core, post) = if start < end {
            (&body[..start], &body[start..end], &body[end..])
        } else {
            (body, "", "")
        };
        let masked = if is_email(core) {
            "[email]"
        } else if is_secret(core) {
            "[secret]"
        } else {
            core
        };
        out.push(format!("{pre}{masked}{post}{tail}"));
    }
    mask_phones(&out.concat())
}

fn is_email(s: &str) -> bool {
    let Some((user, domain)) = s.split_once('@') else {
        return false;
    };
    !user.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && s.chars()
            .all(|c| c.is_alphanumeric() || "@.-_+%".contains(c))
}

/// API keys and tokens: known prefixes, or a long run of letters and digits mixed.
fn is_secret(s: &str) -> bool {
    const PREFIXES: [&str; 7] = ["drk_", "sk-", "ghp_", "xoxb-", "xoxp-", "AKIA", "eyJ"];
    if s.len() >= 16 && PREFIXES.iter().any(|p| s.starts_with(p)) {
        return true;
    }
    let tokenish = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_=/+".contains(c));
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let letters = s.chars().filter(char::is_ascii_alphabetic).count();
    tokenish && s.len() >= 24 && digits >= 4 && letters >= 4
}

/// Runs of 9 to 15 digits, allowing the separators phone numbers are written with.
fn mask_phones(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i] == '+' || chars[i] == '(' || chars[i].is_ascii_digit();
        let after_word = i > 0 && chars[i - 1].is_alphanumeric();
        if starts && !after_word {
            let mut j = i;
            let mut digits = 0;
            while j < chars.len() && (chars[j].is_ascii_digit() || " -.()+".contains(chars[j])) {
                digits += usize::from(chars[j].is_ascii_digit());
                j += 1;
            }
            // Trailing separators are not part of the number.
            while j > i && !chars[j - 1].is_ascii_digit() {
                j -= 1;
            }
            let before_word = j < chars.len() && chars[j].is_alphanumeric();
            if (9..=15).contains(&digits) && !before_word {
                out.push_str("[phone]");
                i = j;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The sources `answer` was given from, when every one of their chunks is still stored.
async fn given_sources(
    collection: &Collection,
    answer: &LoggedAnswer,
) -> Result<Option<Vec<Source>>, RagError> {
    if answer.sources.is_empty() {
        return Ok(None);
    }
    let keys: Vec<u64> = answer
        .sources
        .iter()
        .map(|s| crate::chunk::chunk_key(&s.chunk_id))
        .collect();
    let index = Arc::clone(&collection.index);
    let records = tokio::task::spawn_blocking(move || index.chunks_by_key(&keys))
        .await
        .map_err(|e| RagError::InvalidInput(format!("reading chunks failed: {e}")))?
        .map_err(|e| RagError::Retrieve(crate::collection::CollectionError::from(e).into()))?;
    let mut sources = Vec::new();
    for s in &answer.sources {
        let Some(r) = records
            .get(&crate::chunk::chunk_key(&s.chunk_id))
            .filter(|r| r.chunk_id == s.chunk_id)
        else {
            return Ok(None);
        };
        sources.push(Source {
            n: s.n,
            chunk_id: r.chunk_id.clone(),
            doc_id: r.doc_id.clone(),
            title: r.title.clone(),
            source: r.source.clone(),
            text: r.text.clone(),
            score: s.score,
        });
    }
    Ok(Some(sources))
}

/// Citation numbers in `answer` renumbered from the order in `before` to that in `after`.
fn renumber(answer: &str, before: &[Source], after: &[Source]) -> String {
    let new_n = |n: usize| {
        let chunk = &before.iter().find(|s| s.n == n)?.chunk_id;
        Some(after.iter().find(|s| &s.chunk_id == chunk)?.n)
    };
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        let inside = &rest[..close];
        let numbers: Option<Vec<usize>> =
            inside.split(',').map(|p| p.trim().parse().ok()).collect();
        match numbers.map(|ns| ns.into_iter().map(new_n).collect::<Option<Vec<usize>>>()) {
            Some(Some(ns)) => out.push_str(
                &ns.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => out.push_str(inside),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// Build triplets from `log` (see the module doc).
pub async fn build(
    rag: &Rag,
    collection: &Collection,
    log: &AnswerLog,
    options: FromLog,
) -> Result<(Vec<Triplet>, BuildReport), RagError> {
    let answers = {
        let log = log.clone();
        blocking(move || log.with_feedback(options.filter))
            .await
            .map_err(|e| RagError::InvalidInput(e.to_string()))?
    };
    let mut report = BuildReport {
        questions: answers.len(),
        ..BuildReport::default()
    };
    let mut rng = options.shuffle.map(Rng::new);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for logged in &answers {
        let feedback = logged.feedback.clone().unwrap_or_default();
        let target = match (&feedback.correction, options.filter) {
            (Some(c), FeedbackFilter::Corrected | FeedbackFilter::Either) => c.clone(),
            _ => logged.answer.clone(),
        };
        let mask = |t: &str| {
            if options.mask_pii {
                mask_pii(t)
            } else {
                t.to_string()
            }
        };
        let (query, target) = (mask(&logged.question), mask(&target));
        if !seen.insert((normalize(&query), normalize(&target))) {
            report.drop("duplicate question and answer");
            continue;
        }
        let (sources, answer, how) = match given_sources(collection, logged).await? {
            Some(given) => {
                let (sources, answer) = match rng.as_mut() {
                    Some(rng) => {
                        let shuffled = shuffle_sources(given.clone(), rng);
                        let answer = renumber(&target, &given, &shuffled);
                        (shuffled, answer)
                    }
                    None => (given, target),
                };
                (sources, answer, "given then")
            }
            None => {
                // The answer's [n] named the sources given then; over other sources they would
                // teach wrong citations.
                if !crate::rag::parse_citations(&target, usize::MAX).is_empty() {
                    report.drop("its sources are gone and it cites them");
                    continue;
                }
                let sources = rag.sources(collection, &logged.question).await?;
                (sources, target, "retrieved now")
            }
        };
        if sources.is_empty() {
            report.drop("no sources");
            continue;
        }
        report.count_context(how);
        report.keep(&mut out, query, &sources, answer);
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_phones_and_secrets_are_masked_and_the_rest_kept() {
        assert_eq!(
            mask_pii("Mail jane.doe@example.com or call +1 (555) 123-4567."),
            "Mail [email] or call [phone]."
        );
        assert_eq!(
            mask_pii("my key drk_ab12cd34_0123456789abcdefXYZ fails"),
            "my key [secret] fails"
        );
        assert_eq!(
            mask_pii("token ghp_aBcD1234eFgH5678iJkL9012mNoP"),
            "token [secret]"
        );
        // Versions, years, short numbers, SQL and ordinary words are not PII.
        for keep in [
            "PostgreSQL 16.2 was released in 2024.",
            "Set work_mem to 64MB and max_connections to 100.",
            "SELECT * FROM users WHERE id = 42;",
            "Section 25.1.3 explains VACUUM [1].",
        ] {
            assert_eq!(mask_pii(keep), keep);
        }
    }

    fn source(n: usize, chunk: &str) -> Source {
        Source {
            n,
            chunk_id: chunk.into(),
            doc_id: String::new(),
            title: String::new(),
            source: String::new(),
            text: String::new(),
            score: 0.0,
        }
    }

    #[test]
    fn citations_follow_their_sources_when_shuffled() {
        let before = [source(1, "a"), source(2, "b"), source(3, "c")];
        let after = [source(1, "c"), source(2, "a"), source(3, "b")];
        assert_eq!(
            renumber("Yes [1], and [2, 3]; not [9] or [x].", &before, &after),
            "Yes [2], and [3, 1]; not [9] or [x]."
        );
    }
}
