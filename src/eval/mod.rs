//! Retrieval evaluation: recall@1/5/10, MRR@10 and nDCG@10 of each retrieval mode over a question
//! set with known gold documents (SQuAD JSON, where the gold is the paragraph a question was asked
//! on, or JSONL `{"query", "gold_doc_ids": [...]}`).
//!
//! Metrics are computed over documents, not chunks: a document's rank is the rank of its best chunk.
//! Query embeddings are computed once, in batches, and shared by the dense and hybrid runs.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::collection::Collection;
use crate::config::SearchSettings;
use crate::embed::Embedder;
use crate::ingest::load::{parse_squad, squad_doc_id};
use crate::rag::Source;
use crate::retrieve::{Mode, RetrieveError, search_with_vector};

pub mod answer_metrics;
pub mod answers;
pub mod stats;

/// A question and the ids of the documents that answer it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    #[serde(default)]
    pub id: String,
    pub query: String,
    /// Documents that hold the answer; empty for answer-only sets (retrieval is not scored then).
    #[serde(default)]
    pub gold_doc_ids: Vec<String>,
    /// Gold answers (answer evaluation): spans or whole sentences; empty for retrieval-only sets.
    #[serde(default)]
    pub answers: Vec<String>,
}

/// Question file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuestionFormat {
    Squad,
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read questions from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("questions file {path}: {message}")]
    Parse { path: String, message: String },
    #[error(
        "no question names its gold documents (`gold_doc_ids`): retrieval cannot be scored; \
         `eval answers` scores answer-only question sets"
    )]
    NoGoldDocuments,
    #[error(transparent)]
    Retrieve(#[from] RetrieveError),
    #[error(transparent)]
    Rag(#[from] crate::rag::RagError),
    /// The scratch file that holds a run's scored answers until it ends (see `answers::Spill`).
    #[error("cannot keep the scored answers in a temporary file: {0}")]
    Scratch(#[source] std::io::Error),
}

/// Load questions from `path`.
pub fn load_questions(path: &Path, format: QuestionFormat) -> Result<Vec<Question>, EvalError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: p.clone(),
        source,
    })?;
    let parse_err = |message: String| EvalError::Parse {
        path: p.clone(),
        message,
    };
    let questions = match format {
        QuestionFormat::Squad => {
            let file = parse_squad(&text).map_err(|e| parse_err(e.to_string()))?;
            let mut out = Vec::new();
            for article in &file.data {
                for (n, paragraph) in article.paragraphs.iter().enumerate() {
                    for qa in &paragraph.qas {
                        out.push(Question {
                            id: qa.id.clone(),
                            query: qa.question.clone(),
                            gold_doc_ids: vec![squad_doc_id(&article.title, n)],
                            answers: qa.answers.iter().map(|a| a.text.clone()).collect(),
                        });
                    }
                }
            }
            out
        }
        QuestionFormat::Jsonl => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let q: Question = serde_json::from_str(l)
                    .map_err(|e| parse_err(format!("line {}: {e}", i + 1)))?;
                checked(q).map_err(|e| parse_err(format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_, _>>()?,
    };
    if questions.is_empty() {
        return Err(parse_err("no questions found".into()));
    }
    Ok(questions)
}

/// A question as scoring needs it: a query, and gold documents or answers (gold paths made
/// canonical).
fn checked(q: Question) -> Result<Question, String> {
    if q.query.trim().is_empty() || (q.gold_doc_ids.is_empty() && q.answers.is_empty()) {
        return Err("needs a non-empty `query`, and `gold_doc_ids` or `answers`".into());
    }
    Ok(with_canonical_gold_paths(q))
}

/// Questions given inline (the API's evaluation job), each checked as a JSONL line is; an error
/// names the question by its 1-based position.
pub fn checked_questions(questions: Vec<Question>) -> Result<Vec<Question>, String> {
    if questions.is_empty() {
        return Err("`questions` is empty".into());
    }
    questions
        .into_iter()
        .enumerate()
        .map(|(i, q)| checked(q).map_err(|e| format!("question {}: {e}", i + 1)))
        .collect()
}

/// Ingest names a file's document by its canonical path; a question set written by hand names
/// it by a path relative to where it is run (`data/demo/postgresql-15/x.html`). A gold id that is
/// an existing file is compared by its canonical path; any other id (JSONL `id`s, SQuAD ids) is
/// kept as written.
fn with_canonical_gold_paths(mut q: Question) -> Question {
    for id in &mut q.gold_doc_ids {
        let path = Path::new(id.as_str());
        if path.is_file()
            && let Ok(canonical) = std::fs::canonicalize(path)
        {
            *id = canonical.display().to_string();
        }
    }
    q
}

/// Where a triplet's context comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// The collection's hybrid retriever, as at serving time.
    Retrieved,
    /// The gold SQuAD paragraph as the only source.
    Gold,
}

/// Gold paragraphs of a SQuAD file by document id (`squad:<title>:<n>`), with their titles.
pub fn squad_paragraphs(path: &Path) -> Result<HashMap<String, (String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = parse_squad(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for article in &file.data {
        for (n, p) in article.paragraphs.iter().enumerate() {
            out.insert(
                squad_doc_id(&article.title, n),
                (article.title.clone(), p.context.clone()),
            );
        }
    }
    Ok(out)
}

/// The gold paragraph of `q` as source [1].
pub fn gold_sources(
    q: &Question,
    paragraphs: &HashMap<String, (String, String)>,
) -> Option<Vec<Source>> {
    let doc = q.gold_doc_ids.first()?;
    let (title, text) = paragraphs.get(doc)?;
    Some(vec![Source {
        n: 1,
        chunk_id: doc.clone(),
        doc_id: doc.clone(),
        title: title.clone(),
        source: String::new(),
        text: text.clone(),
        score: 1.0,
    }])
}

/// The metrics of one mode, averaged over questions.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Metrics {
    #[serde(rename = "recall@1")]
    pub recall_1: f64,
    #[serde(rename = "recall@5")]
    pub recall_5: f64,
    #[serde(rename = "recall@10")]
    pub recall_10: f64,
    #[serde(rename = "mrr@10")]
    pub mrr_10: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: f64,
}

/// Per-question metrics for a ranked list of document ids (deduplicated, best first).
pub fn score_question(ranked_docs: &[String], gold: &[String]) -> Metrics {
    let gold: HashSet<&str> = gold.iter().map(String::as_str).collect();
    let n_gold = gold.len().max(1) as f64;
    let recall = |k: usize| {
        ranked_docs
            .iter()
            .take(k)
            .filter(|d| gold.contains(d.as_str()))
            .count() as f64
            / n_gold
    };
    let first = ranked_docs
        .iter()
        .take(10)
        .position(|d| gold.contains(d.as_str()));
    let dcg: f64 = ranked_docs
        .iter()
        .take(10)
        .enumerate()
        .filter(|(_, d)| gold.contains(d.as_str()))
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum();
    let idcg: f64 = (0..gold.len().min(10))
        .map(|i| 1.0 / ((i + 2) as f64).log2())
        .sum();
    Metrics {
        recall_1: recall(1),
        recall_5: recall(5),
        recall_10: recall(10),
        mrr_10: first.map_or(0.0, |r| 1.0 / (r + 1) as f64),
        ndcg_10: if idcg > 0.0 { dcg / idcg } else { 0.0 },
    }
}

pub fn mean(all: &[Metrics]) -> Metrics {
    let n = all.len().max(1) as f64;
    let sum = |f: fn(&Metrics) -> f64| all.iter().map(f).sum::<f64>() / n;
    Metrics {
        recall_1: sum(|m| m.recall_1),
        recall_5: sum(|m| m.recall_5),
        recall_10: sum(|m| m.recall_10),
        mrr_10: sum(|m| m.mrr_10),
        ndcg_10: sum(|m| m.ndcg_10),
    }
}

/// The result of `eval retrieval`.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub questions: usize,
    pub modes: std::collections::BTreeMap<String, Metrics>,
    /// Per mode, each question's id and metrics (in the order asked), for comparisons paired by
    /// question ([`RetrievalReport::per_question_jsonl`]).
    #[serde(skip)]
    pub per_question: std::collections::BTreeMap<String, Vec<(String, Metrics)>>,
}

impl RetrievalReport {
    /// One JSON line per question and mode: `{"id", "mode", "recall@1", ..., "ndcg@10"}`.
    pub fn per_question_jsonl(&self) -> String {
        let mut out = String::new();
        for (mode, scores) in &self.per_question {
            for (id, m) in scores {
                let mut line = serde_json::to_value(m).expect("metrics serialise");
                line["id"] = id.clone().into();
                line["mode"] = mode.clone().into();
                out += &line.to_string();
                out.push('\n');
            }
        }
        out
    }
}

/// Evaluate each of `modes` on `questions`. `progress` is told after each question of each mode.
pub async fn evaluate(
    collection: &Collection,
    embedder: &Arc<Embedder>,
    questions: &[Question],
    modes: &[Mode],
    settings: &SearchSettings,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<RetrievalReport, EvalError> {
    let with_gold: Vec<&Question> = questions
        .iter()
        .filter(|q| !q.gold_doc_ids.is_empty())
        .collect();
    if with_gold.is_empty() {
        return Err(EvalError::NoGoldDocuments);
    }
    let questions = with_gold;
    let needs_vectors = modes.iter().any(|m| *m != Mode::Bm25);
    let vectors: Vec<Option<Vec<f32>>> = if needs_vectors {
        let texts = questions.iter().map(|q| q.query.clone()).collect();
        embedder
            .embed(texts)
            .await
            .map_err(RetrieveError::from)?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None; questions.len()]
    };
    let mut report = RetrievalReport {
        questions: questions.len(),
        modes: Default::default(),
        per_question: Default::default(),
    };
    // Chunks are fetched deeper than 10 so that 10 distinct documents remain after dedup.
    let depth = 30;
    for &mode in modes {
        let mut per_question = Vec::with_capacity(questions.len());
        for (q, v) in questions.iter().zip(&vectors) {
            let hits =
                search_with_vector(collection, &q.query, v.clone(), mode, depth, settings).await?;
            let mut seen = HashSet::new();
            let docs: Vec<String> = hits
                .into_iter()
                .filter(|h| seen.insert(h.doc_id.clone()))
                .map(|h| h.doc_id)
                .collect();
            per_question.push(score_question(&docs, &q.gold_doc_ids));
            progress(1);
        }
        report
            .modes
            .insert(mode.name().to_string(), mean(&per_question));
        let ids = questions.iter().map(|q| q.id.clone());
        report
            .per_question
            .insert(mode.name().to_string(), ids.zip(per_question).collect());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn metrics_of_a_single_gold() {
        let m = score_question(&s(&["x", "g", "y"]), &s(&["g"]));
        assert_eq!(m.recall_1, 0.0);
        assert_eq!(m.recall_5, 1.0);
        assert_eq!(m.mrr_10, 0.5);
        assert!((m.ndcg_10 - 1.0 / 3f64.log2()).abs() < 1e-12);
        let miss = score_question(&s(&["x"]), &s(&["g"]));
        assert_eq!(miss, Metrics::default());
        let top = score_question(&s(&["g"]), &s(&["g"]));
        assert_eq!(top.ndcg_10, 1.0);
        assert_eq!(top.recall_1, 1.0);
    }

    #[test]
    fn metrics_of_two_golds() {
        let m = score_question(&s(&["a", "x", "b"]), &s(&["a", "b"]));
        assert_eq!(m.recall_1, 0.5);
        assert_eq!(m.recall_5, 1.0);
        assert_eq!(m.mrr_10, 1.0);
        let ideal = 1.0 + 1.0 / 3f64.log2();
        assert!((m.ndcg_10 - (1.0 + 0.5) / ideal).abs() < 1e-12);
    }

    #[test]
    fn jsonl_questions_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.jsonl");
        std::fs::write(&path, "{\"query\": \"q\", \"gold_doc_ids\": [\"d\"]}\n\n").expect("write");
        let qs = load_questions(&path, QuestionFormat::Jsonl).expect("load");
        assert_eq!(
            qs,
            vec![Question {
                id: String::new(),
                query: "q".into(),
                gold_doc_ids: s(&["d"]),
                answers: vec![],
            }]
        );
        std::fs::write(&path, "{\"query\": \"q\", \"gold_doc_ids\": []}\n").expect("write");
        let err = load_questions(&path, QuestionFormat::Jsonl).expect_err("empty gold");
        assert!(err.to_string().contains("line 1"), "{err}");
        // Answer-only questions (reference sentences, no gold documents) are accepted.
        std::fs::write(
            &path,
            "{\"query\": \"q\", \"answers\": [\"Use VACUUM.\"]}\n",
        )
        .expect("write");
        let qs = load_questions(&path, QuestionFormat::Jsonl).expect("answer-only");
        assert!(qs[0].gold_doc_ids.is_empty());
    }

    #[test]
    fn gold_ids_that_are_files_compare_by_canonical_path() {
        // Relative to the working directory (the crate root under cargo test), as ingest sees it.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.jsonl");
        let line = r#"{"query": "q", "gold_doc_ids": ["Cargo.toml", "faq-1"]}"#;
        std::fs::write(&path, line).expect("write");
        let qs = load_questions(&path, QuestionFormat::Jsonl).expect("load");
        let canonical = std::fs::canonicalize("Cargo.toml").expect("exists");
        assert_eq!(
            qs[0].gold_doc_ids,
            [canonical.display().to_string(), "faq-1".to_string()]
        );
    }
}
