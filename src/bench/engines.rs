//! `bench engines`: generation speed of domainrag's native engine and mistral.rs configurations
//! side by side with llama.cpp, on the same prompts (short questions and RAG-sized prompts built
//! exactly as `rag` builds them), the same thread count and greedy decoding.
//!
//! llama.cpp is a measuring stick only: `benches/llama_cpp_peer.py` runs it (from a venv made by
//! `benches/llama-cpp-venv.sh`), reading the prompts as JSON on stdin and writing one sample per
//! prompt on stdout. Repetitions are interleaved (every engine runs rep 1, then every engine runs
//! rep 2, ...) so that noise from other work on the machine spreads over all engines; each rep
//! uses different prompts so no engine answers from a cache of an identical earlier prompt.
//! Reported numbers are medians over reps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::median;
use crate::generate::{ChatMessage, GenerateError, Generator, Role, Sampling};
use crate::ingest::load::parse_squad;
use crate::rag::{Source, build_messages};

/// Errors of the engines benchmark.
#[derive(Debug, thiserror::Error)]
pub enum EnginesError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("cannot read the prompt data {path}: {message}")]
    Prompts { path: PathBuf, message: String },
    #[error("the llama.cpp peer failed: {0}")]
    Peer(String),
}

/// One prompt: its kind (`short` or `rag`) and its chat messages.
#[derive(Debug, Clone, Serialize)]
pub struct BenchPrompt {
    pub kind: String,
    pub messages: Vec<ChatMessage>,
}

/// One generation, as both engines report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub first_token_ms: f64,
    pub total_ms: f64,
    pub text: String,
}

impl Sample {
    /// Prompt tokens per second until the first token.
    fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / (self.first_token_ms / 1e3).max(1e-9)
    }
    /// Completion tokens per second after the first one.
    fn decode_tokens_per_s(&self) -> f64 {
        super::decode_rate(self.completion_tokens, self.first_token_ms, self.total_ms)
    }
}

/// Medians of one engine on one prompt kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    pub n: usize,
    pub prompt_tokens: f64,
    pub completion_tokens: f64,
    pub first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Samples whose text equals the reference engine's on the same prompt (greedy, so a
    /// configuration that computes the same model gives the same text).
    pub same_text_as_reference: usize,
    /// For an engine with an adapter: samples whose text differs from the same engine without
    /// it on the same prompt (the adapter is really applied).
    pub differs_without_adapter: Option<usize>,
}

/// One engine's result.
#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub engine: String,
    /// The engine whose texts this one is compared with.
    pub reference: String,
    pub kinds: BTreeMap<String, KindSummary>,
    /// Per-kind decode tok/s divided by llama.cpp's (when the peer ran).
    pub decode_vs_peer: BTreeMap<String, f64>,
    /// Per-kind time to first token divided by llama.cpp's (when the peer ran).
    pub ttft_vs_peer: BTreeMap<String, f64>,
    pub samples: Vec<(String, Sample)>,
}

/// The result of `bench engines`.
#[derive(Debug, Clone, Serialize)]
pub struct EnginesBench {
    pub threads: usize,
    pub reps: usize,
    pub max_tokens: usize,
    pub engines: Vec<EngineResult>,
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct EnginesPlan {
    /// `generate.isq` values to measure (`none` = the configured dtype, unquantised).
    pub isq: Vec<String>,
    /// A registered adapter to measure each configuration with (besides the base).
    pub adapter: Option<String>,
    /// A GGUF file to also run through mistral.rs's GGUF loader (base only; it cannot take
    /// an adapter).
    pub mistralrs_gguf: Option<PathBuf>,
    /// The llama.cpp peer: python interpreter with llama-cpp-python, and the GGUF it loads.
    pub peer: Option<(PathBuf, PathBuf)>,
    pub reps: usize,
    pub max_tokens: usize,
    pub threads: usize,
    /// Also measure domainrag's native engine (for the `isq` values it has: none, q8_0, q4_0; with the
    /// adapter when there is one).
    pub native: bool,
    /// Measure mistral.rs's configurations (off: the native engine and the peer only, the
    /// reference text then being native f32's).
    pub mistralrs: bool,
}

const SHORT_QUESTIONS: &[&str] = &[
    "Explain what a database index is and when to use one.",
    "What is the difference between a process and a thread?",
    "Why do airplanes fly higher than birds?",
    "Give three tips for writing clear documentation.",
    "What does a compiler do?",
    "How does a refrigerator keep food cold?",
    "What is the purpose of a version control system?",
    "Why is the sky blue?",
];

/// `reps` sets of prompts (one short and one RAG-sized prompt each). The RAG prompt of rep `r`
/// is built by `rag::build_messages` from three paragraphs of article `r` of a SQuAD file, asking
/// the first question of its first paragraph.
pub fn prompts(squad: &Path, reps: usize) -> Result<Vec<Vec<BenchPrompt>>, EnginesError> {
    let err = |message: String| EnginesError::Prompts {
        path: squad.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(squad).map_err(|e| err(e.to_string()))?;
    let file = parse_squad(&text).map_err(|e| err(e.to_string()))?;
    let articles: Vec<_> = file
        .data
        .iter()
        .filter(|a| a.paragraphs.len() >= 3 && !a.paragraphs[0].qas.is_empty())
        .collect();
    if articles.len() < reps {
        return Err(err(format!(
            "needs {reps} articles with 3 paragraphs, has {}",
            articles.len()
        )));
    }
    Ok((0..reps)
        .map(|r| {
            let a = articles[r];
            let sources: Vec<Source> = a.paragraphs[..3]
                .iter()
                .enumerate()
                .map(|(i, p)| Source {
                    n: i + 1,
                    chunk_id: String::new(),
                    doc_id: String::new(),
                    title: a.title.replace('_', " "),
                    source: String::new(),
                    text: p.context.clone(),
                    score: 0.0,
                })
                .collect();
            vec![
                BenchPrompt {
                    kind: "short".into(),
                    messages: vec![ChatMessage {
                        role: Role::User,
                        content: SHORT_QUESTIONS[r % SHORT_QUESTIONS.len()].into(),
                    }],
                },
                BenchPrompt {
                    kind: "rag".into(),
                    messages: build_messages(&a.paragraphs[0].qas[0].question, &sources),
                },
            ]
        })
        .collect())
}

/// Run the llama.cpp peer on `prompts`.
fn run_peer(
    python: &Path,
    gguf: &Path,
    prompts: &[BenchPrompt],
    threads: usize,
    max_tokens: usize,
) -> Result<Vec<Sample>, EnginesError> {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/llama_cpp_peer.py");
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(gguf)
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--max-tokens")
        .arg(max_tokens.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| EnginesError::Peer(format!("cannot run {}: {e}", python.display())))?;
    let input = serde_json::to_vec(prompts).map_err(|e| EnginesError::Peer(e.to_string()))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&input)
        .map_err(|e| EnginesError::Peer(e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| EnginesError::Peer(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(EnginesError::Peer(format!(
            "{} exited with {}: {}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| EnginesError::Peer(format!("unreadable output: {e}")))
}

/// Run the benchmark (see the module doc). `settings.generate` is the configuration the isq
/// values are applied to.
pub async fn run(
    settings: &crate::config::Settings,
    squad: &Path,
    plan: &EnginesPlan,
) -> Result<EnginesBench, EnginesError> {
    let prompt_sets = prompts(squad, plan.reps)?;
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: plan.max_tokens,
        // The raw engines, as llama.cpp runs them: no answer-repetition or citation rule.
        no_repeat_ngram: 0,
        cite_sources: 0,
    };
    // (label, generator, adapter, reference label)
    let mut engines: Vec<(String, Arc<Generator>, Option<String>, String)> = Vec::new();
    let base_label = |isq: &str| {
        if isq == "none" {
            format!("mistralrs {}", settings.generate.dtype)
        } else {
            format!("mistralrs {} isq {isq}", settings.generate.dtype)
        }
    };
    let reference = if plan.mistralrs {
        base_label("none")
    } else {
        "native f32".to_string()
    };
    for isq in plan.isq.iter().filter(|_| plan.mistralrs) {
        let mut s = settings.clone();
        s.generate.isq = isq.clone();
        s.generate.max_resident_adapters = 1;
        s.generate.max_concurrent = 1;
        let g = Generator::load(&s).await?;
        engines.push((base_label(isq), Arc::clone(&g), None, reference.clone()));
        if let Some(adapter) = &plan.adapter {
            g.preload(std::slice::from_ref(adapter)).await?;
            engines.push((
                format!("{} + lora", base_label(isq)),
                g,
                Some(adapter.clone()),
                format!("{reference} + lora"),
            ));
        }
    }
    // The native engine with each weight format it has among the requested ones.
    for isq in plan.isq.iter().filter(|_| plan.native) {
        let label = match isq.as_str() {
            "none" => "native f32",
            "q8_0" => "native q8_0",
            "q4_0" => "native q4_0",
            _ => continue,
        };
        let mut s = settings.clone();
        s.generate.engine = "native".into();
        s.generate.isq = isq.clone();
        s.generate.max_concurrent = 1;
        let g = Generator::load(&s).await?;
        engines.push((label.into(), Arc::clone(&g), None, reference.clone()));
        if let Some(adapter) = &plan.adapter {
            g.preload(std::slice::from_ref(adapter)).await?;
            engines.push((
                format!("{label} + lora"),
                g,
                Some(adapter.clone()),
                format!("{reference} + lora"),
            ));
        }
    }
    if let Some(gguf) = &plan.mistralrs_gguf {
        let g = Generator::load_gguf(settings, gguf).await?;
        engines.push(("mistralrs gguf".into(), g, None, reference.clone()));
    }
    let peer_label = "llama.cpp gguf".to_string();
    let mut samples: BTreeMap<String, Vec<(String, Sample)>> = BTreeMap::new();
    // Warm every engine once (first-call allocations, lazy initialisation).
    for (_, g, adapter, _) in &engines {
        g.complete(
            adapter.as_deref(),
            prompt_sets[0][0].messages.clone(),
            sampling,
        )
        .await?;
    }
    for set in &prompt_sets {
        if let Some((python, gguf)) = &plan.peer {
            let (python, gguf, set2) = (python.clone(), gguf.clone(), set.clone());
            let (threads, max_tokens) = (plan.threads, plan.max_tokens);
            let peer = tokio::task::spawn_blocking(move || {
                run_peer(&python, &gguf, &set2, threads, max_tokens)
            })
            .await
            .map_err(|e| EnginesError::Peer(e.to_string()))??;
            for (p, s) in set.iter().zip(peer) {
                samples
                    .entry(peer_label.clone())
                    .or_default()
                    .push((p.kind.clone(), s));
            }
        }
        for (label, g, adapter, _) in &engines {
            for p in set {
                let c = g
                    .complete(adapter.as_deref(), p.messages.clone(), sampling)
                    .await?;
                samples.entry(label.clone()).or_default().push((
                    p.kind.clone(),
                    Sample {
                        prompt_tokens: c.prompt_tokens,
                        completion_tokens: c.completion_tokens,
                        first_token_ms: c.first_token_ms,
                        total_ms: c.total_ms,
                        text: c.text,
                    },
                ));
            }
        }
    }
    let mut labels: Vec<(String, String)> = Vec::new();
    if plan.peer.is_some() {
        labels.push((peer_label.clone(), reference.clone()));
    }
    labels.extend(engines.iter().map(|(l, _, _, r)| (l.clone(), r.clone())));
    let mut results: Vec<EngineResult> = labels
        .into_iter()
        .map(|(engine, reference_label)| {
            let own = samples.get(&engine).cloned().unwrap_or_default();
            let refs = samples.get(&reference_label).cloned().unwrap_or_default();
            let without_adapter = engine
                .strip_suffix(" + lora")
                .and_then(|base| samples.get(base))
                .cloned();
            let mut kinds = BTreeMap::new();
            for kind in ["short", "rag"] {
                let mine: Vec<(usize, &Sample)> = own
                    .iter()
                    .enumerate()
                    .filter(|(_, (k, _))| k == kind)
                    .map(|(i, (_, s))| (i, s))
                    .collect();
                let f =
                    |get: fn(&Sample) -> f64| median(mine.iter().map(|(_, s)| get(s)).collect());
                kinds.insert(
                    kind.to_string(),
                    KindSummary {
                        n: mine.len(),
                        prompt_tokens: f(|s| s.prompt_tokens as f64),
                        completion_tokens: f(|s| s.completion_tokens as f64),
                        first_token_ms: f(|s| s.first_token_ms),
                        prefill_tokens_per_s: f(Sample::prefill_tokens_per_s),
                        decode_tokens_per_s: f(Sample::decode_tokens_per_s),
                        same_text_as_reference: mine
                            .iter()
                            .filter(|(i, s)| refs.get(*i).is_some_and(|(_, r)| r.text == s.text))
                            .count(),
                        differs_without_adapter: without_adapter.as_ref().map(|b| {
                            mine.iter()
                                .filter(|(i, s)| b.get(*i).is_some_and(|(_, r)| r.text != s.text))
                                .count()
                        }),
                    },
                );
            }
            EngineResult {
                engine,
                reference: reference_label,
                kinds,
                decode_vs_peer: BTreeMap::new(),
                ttft_vs_peer: BTreeMap::new(),
                samples: own,
            }
        })
        .collect();
    if let Some(peer) = results.iter().find(|r| r.engine == peer_label).cloned() {
        for r in &mut results {
            for (kind, s) in &r.kinds {
                if let Some(p) = peer.kinds.get(kind) {
                    r.decode_vs_peer.insert(
                        kind.clone(),
                        s.decode_tokens_per_s / p.decode_tokens_per_s.max(1e-9),
                    );
                    r.ttft_vs_peer
                        .insert(kind.clone(), s.first_token_ms / p.first_token_ms.max(1e-9));
                }
            }
        }
    }
    Ok(EnginesBench {
        threads: plan.threads,
        reps: plan.reps,
        max_tokens: plan.max_tokens,
        engines: results,
    })
}

/// A short table of the engines benchmark (medians).
pub fn table(b: &EnginesBench) -> String {
    let mut out = format!(
        "{} threads, greedy, up to {} tokens, medians of {} reps\n\
         | engine | prompt | prompt tok | TTFT ms | prefill tok/s | decode tok/s | decode vs llama.cpp | TTFT vs llama.cpp | same text as ref | adapter changes text |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        b.threads, b.max_tokens, b.reps
    );
    for e in &b.engines {
        for (kind, s) in &e.kinds {
            let ratio = |m: &BTreeMap<String, f64>| {
                m.get(kind)
                    .map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"))
            };
            out.push_str(&format!(
                "| {} | {kind} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} | {}/{} | {} |\n",
                e.engine,
                s.prompt_tokens,
                s.first_token_ms,
                s.prefill_tokens_per_s,
                s.decode_tokens_per_s,
                ratio(&e.decode_vs_peer),
                ratio(&e.ttft_vs_peer),
                s.same_text_as_reference,
                s.n,
                s.differs_without_adapter
                    .map_or_else(|| "-".to_string(), |d| format!("{d}/{}", s.n))
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_rates() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        let s = Sample {
            prompt_tokens: 100,
            completion_tokens: 11,
            first_token_ms: 500.0,
            total_ms: 1500.0,
            text: String::new(),
        };
        assert_eq!(s.prefill_tokens_per_s(), 200.0);
        assert_eq!(s.decode_tokens_per_s(), 10.0);
    }
}
