//! `triplets build`: question/answer pairs -> (query, context, answer) training triplets whose
//! context is what serving would put in the prompt for that query.
//!
//! The context comes from the collection's own hybrid retriever under the same source count and
//! token budget as `rag` (or, with `ContextMode::Gold`, the SQuAD paragraph the question was
//! asked on, as source [1]). The target answer is the first gold answer followed by the number of
//! the first source that contains it (`Paris [2]`), so the adapter learns to answer briefly from
//! the sources and cite them. Pairs are dropped (and counted) when a gold answer is missing, the
//! query and answer repeat an earlier pair, or no given source contains the answer (training on
//! those would teach the model to answer beyond its sources). With a shuffle seed, each
//! question's sources are put in a random order and renumbered, so the cited number is not
//! almost always [1].

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::Triplet;
use crate::collection::Collection;
use crate::eval::answer_metrics::normalize;
use crate::eval::{ContextMode, Question, gold_sources};
use crate::rag::{Rag, RagError, Source, format_sources};
use crate::rng::Rng;

/// What `build` kept and dropped.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BuildReport {
    pub questions: usize,
    pub kept: usize,
    /// Dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Where the kept triplets' contexts came from, when that varies (`--from-log`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contexts: BTreeMap<String, usize>,
}

impl BuildReport {
    pub(crate) fn drop(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    /// Keep a triplet.
    pub(crate) fn keep(
        &mut self,
        out: &mut Vec<Triplet>,
        query: String,
        sources: &[Source],
        answer: String,
    ) {
        out.push(Triplet {
            query,
            context: format_sources(sources),
            answer,
            origin: None,
        });
        self.kept += 1;
    }

    pub(crate) fn count_context(&mut self, how: &str) {
        *self.contexts.entry(how.to_string()).or_default() += 1;
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

/// `sources` in an order drawn from `rng`, numbered 1.. in that order.
pub fn shuffle_sources(mut sources: Vec<Source>, rng: &mut Rng) -> Vec<Source> {
    rng.shuffle(&mut sources);
    for (i, s) in sources.iter_mut().enumerate() {
        s.n = i + 1;
    }
    sources
}

/// Build triplets for `questions` (see the module doc). `paragraphs` is required for
/// `ContextMode::Gold`. `shuffle` (a seed) puts each question's sources in a random order.
pub async fn build(
    rag: &Rag,
    collection: &Collection,
    questions: &[Question],
    mode: ContextMode,
    paragraphs: Option<&HashMap<String, (String, String)>>,
    shuffle: Option<u64>,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<(Vec<Triplet>, BuildReport), RagError> {
    let mut report = BuildReport {
        questions: questions.len(),
        ..BuildReport::default()
    };
    let mut rng = shuffle.map(Rng::new);
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
        let sources = match rng.as_mut() {
            Some(rng) => shuffle_sources(sources, rng),
            None => sources,
        };
        let Some(answer) = target_answer(gold, &sources) else {
            report.drop("answer not in the given sources");
            continue;
        };
        report.keep(&mut out, q.query.clone(), &sources, answer);
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

    #[test]
    fn shuffled_sources_are_renumbered_and_the_target_follows_them() {
        let sources: Vec<Source> = (1..=5).map(|n| source(n, &format!("text {n}"))).collect();
        let mut rng = Rng::new(42);
        let mut positions = HashSet::new();
        for _ in 0..50 {
            let s = shuffle_sources(sources.clone(), &mut rng);
            assert_eq!(s.iter().map(|s| s.n).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
            let mut texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
            let pos = texts.iter().position(|t| *t == "text 1").unwrap() + 1;
            positions.insert(pos);
            assert_eq!(
                target_answer("text 1", &s).as_deref(),
                Some(format!("text 1 [{pos}]").as_str())
            );
            texts.sort_unstable();
            assert_eq!(texts, ["text 1", "text 2", "text 3", "text 4", "text 5"]);
        }
        // The first-ranked source lands in every position.
        assert_eq!(positions.len(), 5);
        // Same seed, same order.
        let a = shuffle_sources(sources.clone(), &mut Rng::new(7));
        let b = shuffle_sources(sources, &mut Rng::new(7));
        assert_eq!(a, b);
    }
}
