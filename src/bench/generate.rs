//! `bench generate`: one engine's speed and memory with adapters. Load time and RSS of the base,
//! TTFT and decode rate of the base and of an adapter (medians of [`REPS`] requests), the cost of switching to an adapter, RSS
//! with 1..N adapters resident, a request for an adapter no request has used (TTFT, against the
//! base's), throughput of 1/4/8 concurrent base requests, and a mixed-adapter load: 8 concurrent
//! requests spread over 4 adapters. `benches/generate-engines.sh` runs it for both engines and
//! puts them side by side.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::rss_mib;
use crate::generate::{ChatMessage, Completion, GenerateError, Generator, Role, Sampling};

/// Requests behind each TTFT and decode figure.
pub const REPS: usize = 5;
/// Runs behind each throughput figure.
pub const THROUGHPUT_REPS: usize = 3;

/// Speed of one model on one prompt: per-field medians over `runs` requests.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeSpeed {
    pub first_token_ms: f64,
    pub total_ms: f64,
    pub completion_tokens: usize,
    /// Completion tokens per second after the first token.
    pub decode_tokens_per_s: f64,
    pub runs: usize,
}

impl DecodeSpeed {
    fn of(c: &Completion) -> DecodeSpeed {
        DecodeSpeed {
            first_token_ms: c.first_token_ms,
            total_ms: c.total_ms,
            completion_tokens: c.completion_tokens,
            decode_tokens_per_s: decode_rate(c.completion_tokens, c.first_token_ms, c.total_ms),
            runs: 1,
        }
    }

    fn median(runs: &[DecodeSpeed]) -> DecodeSpeed {
        let of = |f: fn(&DecodeSpeed) -> f64| super::median(runs.iter().map(f).collect());
        DecodeSpeed {
            first_token_ms: of(|s| s.first_token_ms),
            total_ms: of(|s| s.total_ms),
            completion_tokens: of(|s| s.completion_tokens as f64) as usize,
            decode_tokens_per_s: of(|s| s.decode_tokens_per_s),
            runs: runs.len(),
        }
    }
}

/// The median speed of `REPS` requests of `adapter` on `question`.
async fn speed(
    g: &Generator,
    adapter: Option<&str>,
    question: &str,
    sampling: Sampling,
) -> Result<DecodeSpeed, GenerateError> {
    let mut runs = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        runs.push(DecodeSpeed::of(
            &g.complete(adapter, user(question), sampling).await?,
        ));
    }
    Ok(DecodeSpeed::median(&runs))
}

/// Requests for adapters no request has used, each paired with a base request just before it.
struct NeverUsed {
    adapter: DecodeSpeed,
    base: DecodeSpeed,
    ttft_ratio: f64,
    ttft_ratio_ci95: Option<[f64; 3]>,
}

/// One base request, then one for each of `unused` (resident but never asked for on the native
/// engine; not resident at all in mistral.rs's pool of 4), on the same prompt. Single requests
/// vary by tens of percent on a shared machine: more adapters give more pairs.
async fn never_used_beside_base(
    g: &Generator,
    unused: &[String],
    question: &str,
    sampling: Sampling,
) -> Result<NeverUsed, GenerateError> {
    let (mut adapter, mut base, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for name in unused {
        let b = DecodeSpeed::of(&g.complete(None, user(question), sampling).await?);
        let a = DecodeSpeed::of(&g.complete(Some(name), user(question), sampling).await?);
        ratios.push(a.first_token_ms / b.first_token_ms);
        adapter.push(a);
        base.push(b);
    }
    Ok(NeverUsed {
        adapter: DecodeSpeed::median(&adapter),
        base: DecodeSpeed::median(&base),
        ttft_ratio_ci95: geometric_mean_ci95(&ratios),
        ttft_ratio: super::median(ratios),
    })
}

/// The geometric mean of `ratios` with its 95% interval (normal, on the logs); `None` below 3.
fn geometric_mean_ci95(ratios: &[f64]) -> Option<[f64; 3]> {
    let n = ratios.len();
    if n < 3 {
        return None;
    }
    let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
    let mean = logs.iter().sum::<f64>() / n as f64;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = 1.96 * (var / n as f64).sqrt();
    Some([(mean - half).exp(), mean.exp(), (mean + half).exp()])
}

/// Completion tokens per second after the first token (the first one is prefill's).
pub fn decode_rate(completion_tokens: usize, first_token_ms: f64, total_ms: f64) -> f64 {
    let seconds = (total_ms - first_token_ms) / 1e3;
    if seconds > 0.0 {
        completion_tokens.saturating_sub(1) as f64 / seconds
    } else {
        0.0
    }
}

/// The result of `bench generate`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// `native` or `mistralrs`.
    pub engine: String,
    /// `generate.isq` (weight quantisation).
    pub isq: String,
    /// `generate.lora_dtype` (how the native engine keeps LoRA matrices).
    pub lora_dtype: String,
    /// Rank and modules of the synthetic adapters.
    pub adapters: String,
    pub max_tokens: usize,
    pub base_load_s: f64,
    pub rss_after_base_mib: f64,
    /// RSS after the base alone has answered (its warm-up and measured runs), before any adapter
    /// is loaded: the base's working memory included, as it is in `rss_with_adapters_mib`.
    pub rss_base_served_mib: f64,
    pub base: DecodeSpeed,
    pub adapter: DecodeSpeed,
    /// Making the first adapter resident (mistral.rs: merge and load a model; native: read its
    /// matrices).
    pub adapter_cold_switch_s: f64,
    pub adapter_warm_switch_ms: f64,
    /// Resident memory with N adapters resident (mistral.rs keeps at most 4 merged models).
    pub rss_with_adapters_mib: BTreeMap<usize, f64>,
    /// Requests for adapters that no request has used yet (one each: every adapter after the
    /// first 4), on the same prompt as `base`.
    pub adapter_never_used: DecodeSpeed,
    /// A base request just before each of those, on the same prompt (the pair shares the
    /// machine's state, so their ratio is what switching costs, not drift over the run).
    pub base_beside_never_used: DecodeSpeed,
    /// Median over those pairs of the never-used adapter's TTFT / the base's beside it.
    pub never_used_ttft_ratio: f64,
    /// The same ratios' geometric mean with its 95% interval: `[low, mean, high]`.
    pub never_used_ttft_ratio_ci95: Option<[f64; 3]>,
    /// Total completion tokens per second with N concurrent requests (base model; median of
    /// [`THROUGHPUT_REPS`] runs, as the next).
    pub throughput_tokens_per_s: BTreeMap<usize, f64>,
    /// Their aggregate decode rate: completion tokens after each one's first, per second of the
    /// decode window (see `concurrent`); for one request, its decode rate.
    pub decode_throughput_tokens_per_s: BTreeMap<usize, f64>,
    /// Total completion tokens per second of 8 concurrent requests over 4 adapters (2 each).
    pub mixed_8_over_4_tokens_per_s: f64,
    /// Their aggregate decode rate, as `decode_throughput_tokens_per_s`.
    pub mixed_8_over_4_decode_tokens_per_s: f64,
    /// The same load against one request just before it, paired.
    pub mixed_8_over_4_against_one: MixedPairs,
}

fn user(q: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: Role::User,
        content: q.to_string(),
    }]
}

/// Throughput of requests run together (one run, or medians of several).
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// All completion tokens over the wall time from the requests' start to the last one's end
    /// (every prompt's prefill included).
    tokens_per_s: f64,
    /// Completion tokens after each request's first over the decode window: from the first
    /// first token to the last request's end (any prefill still running then included).
    decode_tokens_per_s: f64,
}

/// Run `jobs` (adapter, question) at once, [`THROUGHPUT_REPS`] times; the medians.
async fn concurrent(
    g: &Arc<Generator>,
    jobs: Vec<(Option<String>, String)>,
    sampling: Sampling,
) -> Result<Throughput, GenerateError> {
    let mut runs = Vec::with_capacity(THROUGHPUT_REPS);
    for rep in 0..THROUGHPUT_REPS {
        runs.push(together(g, &jobs, sampling, &format!("rep {rep}")).await?);
    }
    Ok(Throughput {
        tokens_per_s: super::median(runs.iter().map(|t| t.tokens_per_s).collect()),
        decode_tokens_per_s: super::median(runs.iter().map(|t| t.decode_tokens_per_s).collect()),
    })
}

/// One run of `jobs` (adapter, question) at once, each question marked by `mark` (a new prompt
/// each run, so no engine answers from a prompt cache).
async fn together(
    g: &Arc<Generator>,
    jobs: &[(Option<String>, String)],
    sampling: Sampling,
    mark: &str,
) -> Result<Throughput, GenerateError> {
    let t = Instant::now();
    let runs = jobs.iter().map(|(adapter, q)| {
        let g = Arc::clone(g);
        let (adapter, q) = (adapter.clone(), format!("{q} ({mark})"));
        async move { g.complete(adapter.as_deref(), user(&q), sampling).await }
    });
    let done = futures::future::join_all(runs)
        .await
        .into_iter()
        .collect::<Result<Vec<Completion>, _>>()?;
    let tokens: usize = done.iter().map(|c| c.completion_tokens).sum();
    Ok(Throughput {
        tokens_per_s: tokens as f64 / t.elapsed().as_secs_f64(),
        decode_tokens_per_s: decode_rate_together(&done),
    })
}

/// Mixed traffic against one request, paired: [`MIXED_PAIRS`] times one request, then the 8
/// over 4 adapters, back to back. A single request's rate moves by tens of percent between
/// minutes on a shared machine; each pair's ratio shares the machine's state.
async fn mixed_against_one(
    g: &Arc<Generator>,
    one: &[(Option<String>, String)],
    mixed: &[(Option<String>, String)],
    sampling: Sampling,
) -> Result<MixedPairs, GenerateError> {
    let (mut end_to_end, mut decode) = (Vec::new(), Vec::new());
    for pair in 0..MIXED_PAIRS {
        let mark = format!("pair {pair}");
        let a = together(g, one, sampling, &mark).await?;
        let b = together(g, mixed, sampling, &mark).await?;
        end_to_end.push(b.tokens_per_s / a.tokens_per_s);
        decode.push(b.decode_tokens_per_s / a.decode_tokens_per_s);
    }
    Ok(MixedPairs {
        end_to_end_ci95: geometric_mean_ci95(&end_to_end),
        decode_ci95: geometric_mean_ci95(&decode),
        end_to_end_median: super::median(end_to_end),
        decode_median: super::median(decode),
        pairs: MIXED_PAIRS,
    })
}

/// Pairs behind [`MixedPairs`].
pub const MIXED_PAIRS: usize = 8;

/// 8 requests over 4 adapters against one request just before them, as ratios of their
/// throughputs: medians and geometric means with 95% intervals (`[low, mean, high]`) over
/// [`MIXED_PAIRS`] pairs, end to end (prefill included) and of the decode rates.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPairs {
    pub end_to_end_median: f64,
    pub end_to_end_ci95: Option<[f64; 3]>,
    pub decode_median: f64,
    pub decode_ci95: Option<[f64; 3]>,
    pub pairs: usize,
}

/// [`decode_rate`] of requests that started together: their tokens after the first, over the
/// time from the earliest first token to the latest end (each request's times count from the
/// common start).
fn decode_rate_together(done: &[Completion]) -> f64 {
    let first = done
        .iter()
        .map(|c| c.first_token_ms)
        .fold(f64::MAX, f64::min);
    let end = done.iter().map(|c| c.total_ms).fold(0.0, f64::max);
    let tokens: usize = done
        .iter()
        .map(|c| c.completion_tokens.saturating_sub(1))
        .sum();
    if end > first {
        tokens as f64 / ((end - first) / 1e3)
    } else {
        0.0
    }
}

/// Measure the configured engine: see [`GenerateBench`]. `adapters` must name at least 5
/// registered adapters (RSS is read with 1, 2, 4 and, on the native engine, all of them
/// resident); the generator must allow 4 resident adapters and 8 concurrent requests.
pub async fn generate_speed(
    settings: &crate::config::Settings,
    adapters: &[String],
    adapters_desc: &str,
    max_tokens: usize,
) -> Result<GenerateBench, GenerateError> {
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens,
        no_repeat_ngram: 0,
        cite_sources: 0,
    };
    let question = "Explain what a database index is and when to use one.";
    let started = Instant::now();
    let g = Generator::load(settings).await?;
    let base_load_s = started.elapsed().as_secs_f64();
    let rss_after_base_mib = rss_mib();
    // Warm-up, then the measured base run.
    g.complete(None, user("Hi"), sampling).await?;
    let base = speed(&g, None, question, sampling).await?;
    let rss_base_served_mib = rss_mib();

    let t = Instant::now();
    g.preload(&adapters[..1]).await?;
    let adapter_cold_switch_s = t.elapsed().as_secs_f64();
    let adapter = speed(&g, Some(&adapters[0]), question, sampling).await?;
    let t = Instant::now();
    g.preload(&adapters[..1]).await?;
    let adapter_warm_switch_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut rss_with_adapters_mib = BTreeMap::new();
    let mut counts = vec![1, 2, 4];
    if g.engine_name() == "native" {
        counts.push(adapters.len());
    }
    for n in counts {
        g.preload(&adapters[..n]).await?;
        rss_with_adapters_mib.insert(n, rss_mib());
    }
    let never_used = never_used_beside_base(&g, &adapters[4..], question, sampling).await?;

    let (mut throughput_tokens_per_s, mut decode_throughput_tokens_per_s) =
        (BTreeMap::new(), BTreeMap::new());
    for n in [1usize, 4, 8] {
        let jobs = (0..n)
            .map(|i| (None, format!("{question} (variant {i})")))
            .collect();
        let t = concurrent(&g, jobs, sampling).await?;
        throughput_tokens_per_s.insert(n, t.tokens_per_s);
        decode_throughput_tokens_per_s.insert(n, t.decode_tokens_per_s);
    }
    let mixed_jobs: Vec<(Option<String>, String)> = (0..8)
        .map(|i| {
            let adapter = adapters[i % 4].clone();
            (Some(adapter), format!("{question} (variant {i})"))
        })
        .collect();
    let paired = mixed_against_one(
        &g,
        &[(None, format!("{question} (variant 0)"))],
        &mixed_jobs,
        sampling,
    )
    .await?;
    let mixed = concurrent(&g, mixed_jobs, sampling).await?;
    Ok(GenerateBench {
        engine: g.engine_name().to_string(),
        isq: settings.generate.isq.clone(),
        lora_dtype: settings.generate.lora_dtype.clone(),
        adapters: adapters_desc.to_string(),
        max_tokens,
        base_load_s,
        rss_after_base_mib,
        rss_base_served_mib,
        base,
        adapter,
        adapter_cold_switch_s,
        adapter_warm_switch_ms,
        rss_with_adapters_mib,
        adapter_never_used: never_used.adapter,
        base_beside_never_used: never_used.base,
        never_used_ttft_ratio: never_used.ttft_ratio,
        never_used_ttft_ratio_ci95: never_used.ttft_ratio_ci95,
        throughput_tokens_per_s,
        decode_throughput_tokens_per_s,
        mixed_8_over_4_tokens_per_s: mixed.tokens_per_s,
        mixed_8_over_4_decode_tokens_per_s: mixed.decode_tokens_per_s,
        mixed_8_over_4_against_one: paired,
    })
}

/// A short table of a generation benchmark.
pub fn generate_table(b: &GenerateBench) -> String {
    let mut out = format!(
        "engine {} (isq {}, LoRA {}), adapters {}; base load {:.2} s, RSS {:.0} MiB\n\
         | request | TTFT ms | decode tok/s | tokens |\n|---|---|---|---|\n",
        b.engine, b.isq, b.lora_dtype, b.adapters, b.base_load_s, b.rss_after_base_mib,
    );
    for (what, s) in [
        ("base", &b.base),
        ("adapter", &b.adapter),
        ("adapter never used before", &b.adapter_never_used),
        ("base, just before each of those", &b.base_beside_never_used),
    ] {
        out.push_str(&format!(
            "| {what} (median of {}) | {:.1} | {:.1} | {} |\n",
            s.runs, s.first_token_ms, s.decode_tokens_per_s, s.completion_tokens
        ));
    }
    out.push_str(&format!(
        "never-used adapter TTFT / the base's just before it: {:.3}x (median of {} pairs)",
        b.never_used_ttft_ratio, b.adapter_never_used.runs
    ));
    if let Some([lo, mean, hi]) = b.never_used_ttft_ratio_ci95 {
        out.push_str(&format!(
            "; geometric mean {mean:.3}x (95% CI {lo:.3}..{hi:.3})"
        ));
    }
    out.push_str(&format!(
        "\nadapter switch: cold {:.3} s, warm {:.3} ms\n",
        b.adapter_cold_switch_s, b.adapter_warm_switch_ms
    ));
    for (n, mib) in &b.rss_with_adapters_mib {
        out.push_str(&format!(
            "RSS with {n} adapter(s) resident: {mib:.0} MiB ({:.3}x the base alone once it has \
             answered, {:.3}x just after loading)\n",
            mib / b.rss_base_served_mib,
            mib / b.rss_after_base_mib
        ));
    }
    let one = |m: &BTreeMap<usize, f64>| m.get(&1).copied().unwrap_or(f64::NAN);
    let (single, single_decode) = (
        one(&b.throughput_tokens_per_s),
        one(&b.decode_throughput_tokens_per_s),
    );
    for (n, tps) in &b.throughput_tokens_per_s {
        let decode = b.decode_throughput_tokens_per_s[n];
        out.push_str(&format!(
            "{n} concurrent requests: {tps:.1} tokens/s total ({:.2}x one request), \
             {decode:.1} decode tokens/s ({:.2}x)\n",
            tps / single,
            decode / single_decode
        ));
    }
    out.push_str(&format!(
        "8 concurrent requests over 4 adapters: {:.1} tokens/s total ({:.2}x one request), \
         {:.1} decode tokens/s ({:.2}x)\n",
        b.mixed_8_over_4_tokens_per_s,
        b.mixed_8_over_4_tokens_per_s / single,
        b.mixed_8_over_4_decode_tokens_per_s,
        b.mixed_8_over_4_decode_tokens_per_s / single_decode
    ));
    let p = &b.mixed_8_over_4_against_one;
    let ci = |c: Option<[f64; 3]>| {
        c.map_or(String::new(), |[lo, mean, hi]| {
            format!(", geometric mean {mean:.2}x (95% CI {lo:.2}..{hi:.2})")
        })
    };
    out.push_str(&format!(
        "paired with one request just before ({} pairs): end to end median {:.2}x{}; decode \
         median {:.2}x{}\n",
        p.pairs,
        p.end_to_end_median,
        ci(p.end_to_end_ci95),
        p.decode_median,
        ci(p.decode_ci95)
    ));
    out
}
