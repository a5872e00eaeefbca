//! Answer evaluation: does an adapter make a collection's answers better? Runs the RAG pipeline for
//! each arm (the base model, each adapter) over a question set and scores every answer offline:
//! exact match and token F1 (SQuAD normalisation), faithfulness (share of the answer's claims
//! supported by the given sources), answer relevance (question/answer embedding cosine),
//! hallucination and abstention rates, retrieval of the given contexts, cost, and bootstrap 95%
//! intervals (per arm and paired against the base).
//!
//! The per-answer text metrics live in `eval::answer_metrics`, the bootstrap in `eval::stats`;
//! this file runs the arms, scores with embeddings (`embed`), keeps the scored answers in a
//! scratch file until the run ends, summarises, and renders the report. The report also records
//! the process's memory after every answer, so a long run shows whether memory stays flat
//! (`benches/soak.py eval` reads it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufWriter, Seek, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use unicode_segmentation::UnicodeSegmentation;

use super::answer_metrics::{
    COVERAGE_THRESHOLD, LOOP_SPAN_WORDS, SIMILARITY_THRESHOLD, claims, exact_match, f1,
    is_abstention, repeats_span, strip_citations, token_coverage,
};
use super::stats::{Interval, bootstrap_ci, mean, mean_of_some, median};
use super::{EvalError, Question, score_question};
use crate::collection::Collection;
use crate::embed::Embedder;
use crate::rag::{AdapterChoice, Rag, RagError};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // Embeddings are L2-normalised.
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One claim's verdict, kept for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimEvidence {
    pub claim: String,
    pub supported: bool,
    /// Best token coverage by any source, and that source's number.
    pub coverage: f64,
    pub source: Option<usize>,
    /// Best embedding similarity to a source sentence.
    pub similarity: f32,
}

/// Everything measured for one question in one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuestionScore {
    pub id: String,
    pub query: String,
    pub answer: String,
    pub gold_answers: Vec<String>,
    pub sources: Vec<(usize, String, String)>,
    pub em: f64,
    pub f1: f64,
    /// None when the answer makes no claim (e.g. an abstention).
    pub faithfulness: Option<f64>,
    pub answer_relevance: f64,
    pub hallucinated: bool,
    pub abstained: bool,
    /// Abstained while the gold document was not among the sources (a right abstention).
    pub abstention_justified: bool,
    /// Retrieval of the given sources; None for a question without gold documents.
    pub recall_at_k: Option<f64>,
    pub mrr_10: Option<f64>,
    pub ndcg_10: Option<f64>,
    pub seconds: f64,
    pub first_token_ms: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Words in the answer (whitespace-separated, citation markers included).
    pub words: usize,
    /// Some span of [`LOOP_SPAN_WORDS`] words occurs twice in the answer.
    pub loops: bool,
    /// Generation stopped at `max_tokens`: the answer is cut off.
    pub cut_off: bool,
    pub claims: Vec<ClaimEvidence>,
}

/// An arm's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub em: f64,
    pub f1: f64,
    pub faithfulness: f64,
    pub answer_relevance: f64,
    pub hallucination_rate: f64,
    pub abstention_rate: f64,
    /// Over the questions with gold documents; None when there are none.
    #[serde(rename = "recall@k")]
    pub recall_at_k: Option<f64>,
    #[serde(rename = "mrr@10")]
    pub mrr_10: Option<f64>,
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: Option<f64>,
    pub seconds_per_answer: f64,
    pub completion_tokens_per_answer: f64,
    /// Share of answers with a [`LOOP_SPAN_WORDS`]-word span twice / cut off at `max_tokens` /
    /// either.
    pub loop_rate: f64,
    pub cut_off_rate: f64,
    pub degenerate_rate: f64,
    pub median_answer_words: f64,
    pub median_first_token_ms: f64,
    pub ci95: BTreeMap<String, Interval>,
    /// Paired difference (this arm - base) with its interval, for arms other than the base.
    pub vs_base: BTreeMap<String, (f64, Interval)>,
}

/// A per-question figure; None where the question does not have it.
type Metric = fn(&QuestionScore) -> Option<f64>;

/// Whether a question has reference answers to grade against (questions replayed from an answer
/// log often do not).
fn graded(q: &QuestionScore) -> bool {
    !q.gold_answers.is_empty()
}

const METRICS: &[(&str, Metric)] = &[
    ("em", |q| graded(q).then_some(q.em)),
    ("f1", |q| graded(q).then_some(q.f1)),
    ("faithfulness", |q| Some(q.faithfulness.unwrap_or(1.0))),
    ("answer_relevance", |q| Some(q.answer_relevance)),
    ("hallucination_rate", |q| {
        Some(f64::from(u8::from(q.hallucinated)))
    }),
    ("abstention_rate", |q| {
        Some(f64::from(u8::from(q.abstained)))
    }),
];

/// Summarise an arm (and compare it with `base`, paired by question, when given).
pub fn summarise(scores: &[QuestionScore], base: Option<&[QuestionScore]>) -> ArmSummary {
    let col = |f: fn(&QuestionScore) -> f64| scores.iter().map(f).collect::<Vec<f64>>();
    let some = |f: Metric| scores.iter().filter_map(f).collect::<Vec<f64>>();
    let with_claims: Vec<f64> = scores.iter().filter_map(|q| q.faithfulness).collect();
    let mut ci95 = BTreeMap::new();
    let mut vs_base = BTreeMap::new();
    for (i, (name, f)) in METRICS.iter().enumerate() {
        ci95.insert(
            name.to_string(),
            bootstrap_ci(&some(*f), 1000, 17 + i as u64),
        );
        if let Some(base) = base {
            let diffs: Vec<f64> = scores
                .iter()
                .zip(base)
                .filter_map(|(a, b)| Some(f(a)? - f(b)?))
                .collect();
            vs_base.insert(
                name.to_string(),
                (mean(&diffs), bootstrap_ci(&diffs, 1000, 101 + i as u64)),
            );
        }
    }
    ArmSummary {
        em: mean(&some(METRICS[0].1)),
        f1: mean(&some(METRICS[1].1)),
        faithfulness: mean(&with_claims),
        answer_relevance: mean(&col(|q| q.answer_relevance)),
        hallucination_rate: mean(&col(|q| f64::from(u8::from(q.hallucinated)))),
        abstention_rate: mean(&col(|q| f64::from(u8::from(q.abstained)))),
        recall_at_k: mean_of_some(scores.iter().map(|q| q.recall_at_k)),
        mrr_10: mean_of_some(scores.iter().map(|q| q.mrr_10)),
        ndcg_10: mean_of_some(scores.iter().map(|q| q.ndcg_10)),
        seconds_per_answer: mean(&col(|q| q.seconds)),
        completion_tokens_per_answer: mean(&col(|q| q.completion_tokens as f64)),
        loop_rate: mean(&col(|q| f64::from(u8::from(q.loops)))),
        cut_off_rate: mean(&col(|q| f64::from(u8::from(q.cut_off)))),
        degenerate_rate: mean(&col(|q| f64::from(u8::from(q.loops || q.cut_off)))),
        median_answer_words: median(col(|q| q.words as f64)),
        median_first_token_ms: median(col(|q| q.first_token_ms)),
        ci95,
        vs_base,
    }
}

impl ArmSummary {
    /// The headline metrics, in report order, with their `ci95` keys.
    pub fn headline(&self) -> [(&'static str, f64); 6] {
        [
            ("em", self.em),
            ("f1", self.f1),
            ("faithfulness", self.faithfulness),
            ("answer_relevance", self.answer_relevance),
            ("hallucination_rate", self.hallucination_rate),
            ("abstention_rate", self.abstention_rate),
        ]
    }
}

/// The whole evaluation, as `--json` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerReport {
    pub questions: usize,
    pub arms: BTreeMap<String, ArmSummary>,
    pub per_question: BTreeMap<String, Vec<QuestionScore>>,
    pub memory: MemorySeries,
}

/// Memory of the evaluating process, read after every answer (all arms, in run order), once the
/// heap the answer freed has been handed back. Resident pages split as Linux does: anonymous
/// (heap, model weights and caches: where a leak shows) and file-backed (the mapped index and
/// model files, which grow as new queries touch new pages, up to the files' size); and the heap
/// in use (glibc's `mallinfo2`: bytes of live allocations), which moves only when live objects
/// are kept, whatever the allocator holds free or how scattered the live ones are.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemorySeries {
    pub rss_mib_after_answer: Vec<f64>,
    pub rss_anon_mib_after_answer: Vec<f64>,
    pub rss_file_mib_after_answer: Vec<f64>,
    pub heap_in_use_mib_after_answer: Vec<f64>,
    pub peak_rss_mib: f64,
}

impl MemorySeries {
    /// Room for `answers` samples, reserved before the first answer (no series grows mid-run).
    fn with_capacity(answers: usize) -> MemorySeries {
        MemorySeries {
            rss_mib_after_answer: Vec::with_capacity(answers),
            rss_anon_mib_after_answer: Vec::with_capacity(answers),
            rss_file_mib_after_answer: Vec::with_capacity(answers),
            heap_in_use_mib_after_answer: Vec::with_capacity(answers),
            peak_rss_mib: 0.0,
        }
    }

    fn sample(&mut self) {
        use crate::telemetry::ProcMemory;
        crate::heap::release_freed_heap();
        let now = ProcMemory::read();
        self.rss_mib_after_answer.push(now.rss_mib);
        self.rss_anon_mib_after_answer.push(now.anon_mib);
        self.rss_file_mib_after_answer.push(now.file_mib);
        self.heap_in_use_mib_after_answer
            .push(crate::heap::in_use_mib());
    }
}

/// A run's scored answers, kept in an unnamed temporary file (deleted by the OS when closed)
/// until the run ends, one JSON line each.
///
/// Why not a `Vec`: each scored answer holds a few dozen small strings (its sources, claims, gold
/// answers), allocated while the next answer's generation and scoring allocate and free tens of
/// MiB around them. Kept in the heap, they land among those freed buffers and keep their pages
/// resident, so a long run's memory crept up by more than what it kept (issue 13: +15..21 MiB per
/// 100 answers after warm-up on the 300 x 2 soak, for some 10 KiB of text per answer). Spilled,
/// the run keeps nothing per answer in the heap; the report is read back once, at the end.
struct Spill {
    file: BufWriter<std::fs::File>,
    /// Each arm's name and how many answers it wrote, in run order.
    arms: Vec<(String, usize)>,
}

impl Spill {
    fn new() -> Result<Spill, EvalError> {
        let file = tempfile::tempfile().map_err(EvalError::Scratch)?;
        Ok(Spill {
            file: BufWriter::new(file),
            arms: Vec::new(),
        })
    }

    fn begin_arm(&mut self, name: String) {
        self.arms.push((name, 0));
    }

    fn push(&mut self, score: &QuestionScore) -> Result<(), EvalError> {
        serde_json::to_writer(&mut self.file, score).map_err(|e| EvalError::Scratch(e.into()))?;
        self.file.write_all(b"\n").map_err(EvalError::Scratch)?;
        if let Some((_, n)) = self.arms.last_mut() {
            *n += 1;
        }
        Ok(())
    }

    /// Every arm's scores, by arm name.
    fn read_back(self) -> Result<BTreeMap<String, Vec<QuestionScore>>, EvalError> {
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| EvalError::Scratch(e.into_error()))?;
        file.rewind().map_err(EvalError::Scratch)?;
        let mut lines = std::io::BufReader::new(file).lines();
        let mut out = BTreeMap::new();
        for (name, n) in self.arms {
            let mut scores = Vec::with_capacity(n);
            for _ in 0..n {
                let line = lines
                    .next()
                    .unwrap_or_else(|| Err(std::io::ErrorKind::UnexpectedEof.into()))
                    .map_err(EvalError::Scratch)?;
                scores.push(serde_json::from_str(&line).map_err(|e| EvalError::Scratch(e.into()))?);
            }
            out.insert(name, scores);
        }
        Ok(out)
    }
}

/// How an answer stands against the sources it was given, without a reference answer: what
/// `evaluate` scores offline and the answer log scores online.
#[derive(Debug, Clone)]
pub struct Judgement {
    /// None when the answer makes no claim (e.g. an abstention).
    pub faithfulness: Option<f64>,
    pub answer_relevance: f64,
    pub hallucinated: bool,
    pub abstained: bool,
    pub claims: Vec<ClaimEvidence>,
}

/// Judge `answer` to `query` against its sources (embeddings come from `embedder`).
pub async fn judge(
    embedder: &Arc<Embedder>,
    query: &str,
    answer: &crate::rag::Answer,
) -> Result<Judgement, RagError> {
    let claims_text = claims(&answer.answer);
    let source_sentences: Vec<(usize, String)> = answer
        .sources
        .iter()
        .flat_map(|s| {
            s.text
                .split_sentence_bounds()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| (s.n, t.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut texts = vec![query.to_string(), answer.answer.clone()];
    texts.extend(claims_text.iter().cloned());
    texts.extend(source_sentences.iter().map(|(_, t)| t.clone()));
    let vectors = embedder
        .embed(texts)
        .await
        .map_err(crate::retrieve::RetrieveError::from)?;
    let (qv, av) = (&vectors[0], &vectors[1]);
    let claim_vectors = &vectors[2..2 + claims_text.len()];
    let sentence_vectors = &vectors[2 + claims_text.len()..];
    let mut evidence = Vec::new();
    for (claim, cv) in claims_text.iter().zip(claim_vectors) {
        let (coverage, source) = answer
            .sources
            .iter()
            .map(|s| (token_coverage(claim, &s.text), Some(s.n)))
            .fold((0.0, None), |best, x| if x.0 > best.0 { x } else { best });
        let similarity = sentence_vectors
            .iter()
            .map(|sv| cosine(cv, sv))
            .fold(f32::MIN, f32::max)
            .max(0.0);
        evidence.push(ClaimEvidence {
            claim: claim.clone(),
            supported: coverage >= COVERAGE_THRESHOLD || similarity >= SIMILARITY_THRESHOLD,
            coverage,
            source,
            similarity,
        });
    }
    let abstained = is_abstention(&answer.answer);
    let faithfulness = if evidence.is_empty() || abstained {
        None
    } else {
        Some(evidence.iter().filter(|e| e.supported).count() as f64 / evidence.len() as f64)
    };
    Ok(Judgement {
        faithfulness,
        answer_relevance: f64::from(cosine(qv, av)),
        hallucinated: !abstained && evidence.iter().any(|e| !e.supported),
        abstained,
        claims: evidence,
    })
}

/// Score one answer against its question (embeddings come from `embedder`).
async fn score(
    embedder: &Arc<Embedder>,
    q: &Question,
    answer: &crate::rag::Answer,
) -> Result<QuestionScore, RagError> {
    let judgement = judge(embedder, &q.query, answer).await?;
    let abstained = judgement.abstained;
    let mut seen = HashSet::new();
    let given_docs: Vec<String> = answer
        .sources
        .iter()
        .filter(|s| seen.insert(s.doc_id.clone()))
        .map(|s| s.doc_id.clone())
        .collect();
    let has_gold = !q.gold_doc_ids.is_empty();
    let retrieval = has_gold.then(|| score_question(&given_docs, &q.gold_doc_ids));
    let gold_given = q.gold_doc_ids.iter().any(|g| given_docs.contains(g));
    Ok(QuestionScore {
        id: q.id.clone(),
        query: q.query.clone(),
        answer: answer.answer.clone(),
        gold_answers: q.answers.clone(),
        sources: answer
            .sources
            .iter()
            .map(|s| (s.n, s.title.clone(), s.text.clone()))
            .collect(),
        em: exact_match(&strip_citations(&answer.answer), &q.answers),
        f1: f1(&strip_citations(&answer.answer), &q.answers),
        hallucinated: judgement.hallucinated,
        faithfulness: judgement.faithfulness,
        answer_relevance: judgement.answer_relevance,
        abstained,
        // Without gold documents nobody knows whether the answer was there to give.
        abstention_justified: abstained && has_gold && !gold_given,
        recall_at_k: has_gold.then(|| {
            q.gold_doc_ids
                .iter()
                .filter(|g| given_docs.contains(g))
                .count() as f64
                / q.gold_doc_ids.len() as f64
        }),
        mrr_10: retrieval.as_ref().map(|r| r.mrr_10),
        ndcg_10: retrieval.as_ref().map(|r| r.ndcg_10),
        seconds: answer.timings_ms.total / 1e3,
        first_token_ms: answer.timings_ms.first_token,
        words: answer.answer.split_whitespace().count(),
        loops: repeats_span(&answer.answer, LOOP_SPAN_WORDS),
        cut_off: answer.finish_reason == "length",
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
        claims: judgement.claims,
    })
}

/// Evaluate each arm (`None` = base model) on `questions`. With `gold` (SQuAD paragraphs by
/// document id), each question is answered over its gold paragraph instead of retrieved sources.
pub async fn evaluate(
    rag: &Rag,
    embedder: &Arc<Embedder>,
    collection: &Collection,
    questions: &[Question],
    arms: &[Option<String>],
    gold: Option<&HashMap<String, (String, String)>>,
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<AnswerReport, EvalError> {
    let mut spill = Spill::new()?;
    let mut memory = MemorySeries::with_capacity(questions.len() * arms.len());
    for arm in arms {
        let choice = match arm {
            None => AdapterChoice::Base,
            Some(a) => AdapterChoice::Named(a.clone()),
        };
        spill.begin_arm(arm.clone().unwrap_or_else(|| "none".into()));
        for q in questions {
            let answer = match gold {
                None => rag.answer(collection, &q.query, &choice).await?,
                Some(paragraphs) => {
                    let sources = super::gold_sources(q, paragraphs).ok_or_else(|| {
                        RagError::InvalidInput(format!(
                            "question {:?}: its gold paragraph is not in the SQuAD file",
                            q.id
                        ))
                    })?;
                    rag.answer_with_sources(&q.query, sources, arm.clone())
                        .await?
                }
            };
            let scored = score(embedder, q, &answer).await?;
            drop(answer);
            spill.push(&scored)?;
            drop(scored);
            memory.sample();
            progress(1);
        }
    }
    let per_question = spill.read_back()?;
    let base = per_question.get("none").cloned();
    let arms = per_question
        .iter()
        .map(|(name, scores)| {
            let base = if name == "none" {
                None
            } else {
                base.as_deref()
            };
            (name.clone(), summarise(scores, base))
        })
        .collect();
    memory.peak_rss_mib = crate::telemetry::proc_status_mib("VmHWM");
    Ok(AnswerReport {
        questions: questions.len(),
        arms,
        per_question,
        memory,
    })
}

/// The summary table (Markdown).
pub fn table(report: &AnswerReport) -> String {
    let mut out = format!(
        "{} questions\n| arm | EM | F1 | faithfulness | relevance | hallucination | abstention | recall@k | loops | cut off | words (median) | TTFT ms (median) | s/answer |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        report.questions
    );
    for (name, a) in &report.arms {
        out.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2} |\n",
            a.em,
            a.f1,
            a.faithfulness,
            a.answer_relevance,
            a.hallucination_rate,
            a.abstention_rate,
            a.recall_at_k.map_or("-".to_string(), |r| format!("{r:.3}")),
            a.loop_rate,
            a.cut_off_rate,
            a.median_answer_words,
            a.median_first_token_ms,
            a.seconds_per_answer
        ));
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML report: the table, bar charts drawn as inline SVG, per-question details.
pub fn html(report: &AnswerReport) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>domainrag answer evaluation</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}\
         details{margin:.4em 0}.bad{color:#b00}.ok{color:#070}</style></head><body><h1>Answer evaluation</h1>",
    );
    out.push_str(&format!(
        "<p>{} questions per arm.</p><table><tr><th>arm</th>",
        report.questions
    ));
    let metric_names = METRICS.iter().map(|(name, _)| *name);
    for m in metric_names.clone() {
        out.push_str(&format!("<th>{m} (95% CI)</th>"));
    }
    out.push_str("</tr>");
    for (name, a) in &report.arms {
        out.push_str(&format!("<tr><td>{}</td>", esc(name)));
        for (m, v) in a.headline() {
            let ci = a.ci95.get(m).copied().unwrap_or(Interval {
                low: 0.0,
                high: 0.0,
            });
            out.push_str(&format!("<td>{v:.3} ({:.3}–{:.3})</td>", ci.low, ci.high));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table><h2>Charts</h2>");
    for (i, m) in metric_names.enumerate() {
        let bars: Vec<(&String, f64)> = report
            .arms
            .iter()
            .map(|(n, a)| (n, a.headline()[i].1))
            .collect();
        out.push_str(&format!(
            "<h3>{m}</h3><svg width=\"420\" height=\"{}\">",
            24 * bars.len() + 4
        ));
        for (j, (n, v)) in bars.iter().enumerate() {
            let w = (v.clamp(0.0, 1.0) * 300.0) as i64;
            out.push_str(&format!(
                "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"100\" y=\"{}\" width=\"{w}\" height=\"16\" fill=\"#4a7bd0\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{v:.3}</text>",
                j * 24 + 16,
                esc(n),
                j * 24 + 4,
                110 + w,
                j * 24 + 16
            ));
        }
        out.push_str("</svg>");
    }
    out.push_str("<h2>Per question</h2>");
    for (arm, scores) in &report.per_question {
        out.push_str(&format!("<h3>{}</h3>", esc(arm)));
        for q in scores {
            out.push_str(&format!(
                "<details><summary>{} — EM {:.0} F1 {:.2} faithfulness {} {}</summary><p><b>Answer:</b> {}</p><p><b>Gold:</b> {}</p><ul>",
                esc(&q.query),
                q.em,
                q.f1,
                q.faithfulness.map_or("n/a".into(), |f| format!("{f:.2}")),
                if q.hallucinated { "<span class=bad>unsupported claim</span>" } else { "" },
                esc(&q.answer),
                esc(&q.gold_answers.join(" | "))
            ));
            for c in &q.claims {
                out.push_str(&format!(
                    "<li class=\"{}\">{} (coverage {:.2} by [{}], similarity {:.2})</li>",
                    if c.supported { "ok" } else { "bad" },
                    esc(&c.claim),
                    c.coverage,
                    c.source.map_or("-".into(), |n| n.to_string()),
                    c.similarity
                ));
            }
            out.push_str("</ul><ol>");
            for (n, title, text) in &q.sources {
                out.push_str(&format!(
                    "<li value=\"{n}\"><b>{}</b>: {}</li>",
                    esc(title),
                    esc(text)
                ));
            }
            out.push_str("</ol></details>");
        }
    }
    out.push_str("</body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(id: &str, f1: f64) -> QuestionScore {
        QuestionScore {
            id: id.into(),
            query: format!("what is {id}?"),
            answer: "It is a thing. [1]".into(),
            gold_answers: vec!["a thing".into()],
            sources: vec![(1, "Title".into(), "A thing is a thing.".into())],
            em: 0.0,
            f1,
            faithfulness: Some(1.0),
            answer_relevance: 0.5,
            hallucinated: false,
            abstained: false,
            abstention_justified: false,
            recall_at_k: None,
            mrr_10: None,
            ndcg_10: None,
            seconds: 1.5,
            first_token_ms: 20.0,
            prompt_tokens: 100,
            completion_tokens: 8,
            words: 5,
            loops: false,
            cut_off: false,
            claims: vec![ClaimEvidence {
                claim: "It is a thing.".into(),
                supported: true,
                coverage: 1.0,
                source: Some(1),
                similarity: 0.9,
            }],
        }
    }

    #[test]
    fn spilled_scores_come_back_per_arm_in_order_and_whole() {
        let mut spill = Spill::new().expect("temp file");
        spill.begin_arm("none".into());
        for (id, f1) in [("q1", 0.25), ("q2", 0.5)] {
            spill.push(&scored(id, f1)).expect("write");
        }
        spill.begin_arm("legal".into());
        spill.push(&scored("q1", 1.0)).expect("write");
        spill.begin_arm("empty".into());
        let back = spill.read_back().expect("read back");
        let ids = |arm: &str| -> Vec<(String, f64)> {
            back[arm].iter().map(|q| (q.id.clone(), q.f1)).collect()
        };
        assert_eq!(ids("none"), [("q1".into(), 0.25), ("q2".into(), 0.5)]);
        assert_eq!(ids("legal"), [("q1".into(), 1.0)]);
        assert!(back["empty"].is_empty());
        let q = &back["legal"][0];
        assert_eq!(
            q.sources,
            [(1, "Title".into(), "A thing is a thing.".into())]
        );
        assert_eq!(q.claims[0].source, Some(1));
        assert_eq!(q.faithfulness, Some(1.0));
    }
}
