//! `triplets build`: question/answer pairs -> (query, context, answer) training triplets whose
//! context is what serving would put in the prompt for that query.
//!
//! The context comes from the collection's own hybrid retriever under the same source count and
//! token budget as `rag` (or, with `ContextMode::Gold`, the SQuAD paragraph the question was
//! asked on, as source [1]). The target answer is the first gold answer followed by the number of
//! the first source that contains it (`Paris [2]`), so the adapter learns to answer briefly from
//! the sources and cite them. Pairs are dropped (and counted) when a gold answer is missing, the
//! query and answer repeat an earlier pair, or no given source contains the answer (training on
//! those would teach the model to answer beyond its sources).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::Triplet;
use crate::collection::Collection;
use crate::eval::answers::normalize;
use crate::eval::{ContextMode, Question, gold_sources};
use crate::rag::{Rag, RagError, Source, format_sources};

/// What `build` kept and dropped.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BuildReport {
    pub questions: usize,
    pub kept: usize,
    /// Dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
}

impl BuildReport {
    fn drop(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }
}

/// The target answer for `gold` over `sources`: the answer and the first source containing it.
pub fn target_answer(gold: &str, sources: &[Source]) -> Option<String> {
    let needle = normalize(gold);
    if needle.is_empty() {
        return None;
    }
    let n = sources
        .iter()
        .find(|s| s.text.contains(gold.trim()) || normalize(&s.text).contains(&needle))?
        .n;
    Some(format!("{} [{n}]", gold.trim()))
}

/// Build triplets for `questions` (see the module doc). `paragraphs` is required for
/// `ContextMode::Gold`.
pub async fn build(
    rag: &Rag,
    collection: &Collection,
    questions: &[Question],
    mode: ContextMode,
    paragraphs: Option<&HashMap<String, (String, String)>>,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(Vec<Triplet>, BuildReport), RagError> {
    let mut report = BuildReport {
        questions: questions.len(),
        ..BuildReport::default()
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for q in questions {
        progress(1);
        let Some(gold) = q.answers.iter().find(|a| !a.trim().is_empty()) else {
            report.drop("no gold answer");
            continue;
        };
        if !seen.insert((normalize(&q.query), normalize(gold))) {
            report.drop("duplicate question and answer");
            continue;
        }
        let sources = match mode {
            ContextMode::Retrieved => rag.sources(collection, &q.query).await?,
            ContextMode::Gold => match paragraphs.and_then(|p| gold_sources(q, p)) {
                Some(s) => s,
                None => {
                    report.drop("gold paragraph not found");
                    continue;
                }
            },
        };
        let Some(answer) = target_answer(gold, &sources) else {
            report.drop("answer not in the given sources");
            continue;
        };
        out.push(Triplet {
            query: q.query.clone(),
            context: format_sources(&sources),
            answer,
        });
        report.kept += 1;
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(n: usize, text: &str) -> Source {
        Source {
            n,
            chunk_id: String::new(),
            doc_id: String::new(),
            title: "t".into(),
            source: String::new(),
            text: text.into(),
            score: 0.0,
        }
    }

    #[test]
    fn the_target_cites_the_first_source_with_the_answer() {
        let sources = [
            source(1, "Lyon is a city."),
            source(2, "The capital is Paris."),
        ];
        assert_eq!(
            target_answer("Paris", &sources).as_deref(),
            Some("Paris [2]")
        );
        assert_eq!(
            target_answer(" the Paris ", &sources).as_deref(),
            Some("the Paris [2]")
        );
        assert_eq!(target_answer("Berlin", &sources), None);
        assert_eq!(target_answer("  ", &sources), None);
    }
}
