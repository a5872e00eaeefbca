//! `domainrag bench ...`: search latency, LLM speed, engine comparison and ingest throughput,
//! each printed as a table or JSON and optionally written to a file; plus the synthetic adapters
//! the generation benchmarks load.
//!
//! Printing and setup only: the measurements belong to `crate::bench`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::adapters::{AdapterRegistry, BaseModelInfo};
use crate::bench;
use crate::collection::Catalog;
use crate::config::Settings;
use crate::embed::Embedder;
use crate::eval::{self, QuestionFormat};
use crate::ingest::{Format, Ingestor};

use super::Bar;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Search latency per mode, with and without query embedding.
    Search {
        #[arg(long, short)]
        collection: String,
        #[arg(long, value_enum)]
        format: QuestionFormat,
        #[arg(long)]
        questions: PathBuf,
        /// Number of queries per mode.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, short, default_value_t = 10)]
        k: usize,
        /// Write the JSON here (it is also printed with --json).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// LLM speed of one engine: load time, TTFT and decode tokens/s (base vs adapter), adapter
    /// switch latency, memory with 1/2/4 (native: also all) adapters resident, a never-used
    /// adapter's TTFT, throughput with 1/4/8 concurrent requests, 8 requests over 4 adapters.
    Generate {
        /// Completion tokens per request.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// `native` or `mistralrs` (default: the configured `generate.engine`).
        #[arg(long)]
        engine: Option<String>,
        /// Synthetic adapters registered for the run (at least 5; each after the first 4 is
        /// asked for once, beside a base request, for the never-used TTFT ratio).
        #[arg(long, default_value_t = 10)]
        adapters: usize,
        /// Their LoRA rank.
        #[arg(long, default_value_t = 8)]
        adapter_rank: usize,
        /// Their modules: `attention` (q/k/v/o) or `all` (also the MLP, as `train` does).
        #[arg(long, default_value = "attention")]
        adapter_modules: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Generation speed of mistral.rs configurations (isq types, with and without a LoRA
    /// adapter) side by side with llama.cpp on the same GGUF model, prompts and threads.
    Engines {
        /// `generate.isq` values to compare (`none` = unquantised).
        #[arg(long, value_delimiter = ',', default_value = "none,q8_0,q4k")]
        isq: Vec<String>,
        /// Skip the runs with a LoRA adapter (a synthetic rank-8 adapter on q/k/v/o).
        #[arg(long)]
        no_adapter: bool,
        /// Skip domainrag's native engine.
        #[arg(long)]
        no_native: bool,
        /// Skip mistral.rs's configurations (the native engine against llama.cpp only).
        #[arg(long)]
        no_mistralrs: bool,
        /// Also run this GGUF through mistral.rs's GGUF loader (base only).
        #[arg(long)]
        mistralrs_gguf: Option<PathBuf>,
        /// Python with llama-cpp-python (made by benches/llama-cpp-venv.sh); omit to skip the peer.
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// The GGUF llama.cpp loads.
        #[arg(
            long,
            default_value = "data/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        )]
        peer_gguf: PathBuf,
        /// SQuAD JSON the RAG-sized prompts are built from.
        #[arg(long, default_value = "data/squad/squaddev_v1.1.json")]
        squad: PathBuf,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Ingest throughput: ingest into a fresh throwaway collection and report chunks/s.
    Ingest {
        #[arg(long, value_enum, default_value = "auto")]
        format: Format,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// `domainrag bench search|generate|engines|ingest`.
pub(super) async fn run(catalog: &Catalog, settings: &Settings, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Search {
            collection,
            format,
            questions,
            n,
            k,
            out,
            json,
        } => {
            let qs = eval::load_questions(&questions, format)?;
            let embedder = Embedder::load_async(settings).await?;
            let col = catalog.open(&collection).await?;
            let result = bench::search_latency(&col, &embedder, &qs, n, k).await?;
            emit_bench(&result, &bench::search_table(&result), out, json)
        }
        BenchCmd::Generate {
            max_tokens,
            engine,
            adapters,
            adapter_rank,
            adapter_modules,
            out,
            json,
        } => {
            let mut bench_settings = settings.clone();
            bench_settings.generate.max_resident_adapters = 4;
            bench_settings.generate.max_concurrent = 8;
            if let Some(engine) = engine {
                bench_settings.generate.engine = engine;
            }
            bench_settings.validate()?;
            let kind = SyntheticKind::parse(adapter_rank, &adapter_modules)?;
            let names = synthetic_adapters(settings, adapters.max(5), &kind)?;
            let desc = format!("{} x rank {adapter_rank} on {adapter_modules}", names.len());
            let result = bench::generate_speed(&bench_settings, &names, &desc, max_tokens).await?;
            emit_bench(&result, &bench::generate_table(&result), out, json)
        }
        BenchCmd::Engines {
            isq,
            no_adapter,
            no_native,
            no_mistralrs,
            mistralrs_gguf,
            peer_python,
            peer_gguf,
            squad,
            reps,
            max_tokens,
            out,
            json,
        } => {
            for value in &isq {
                if value != "none" && !crate::config::ISQ_TYPES.contains(&value.as_str()) {
                    bail!(
                        "--isq {value}: must be none or one of {}",
                        crate::config::ISQ_TYPES.join(", ")
                    );
                }
            }
            let adapter = if no_adapter {
                None
            } else {
                synthetic_adapters(settings, 1, &SyntheticKind::parse(8, "attention")?)?.pop()
            };
            let threads = if settings.generate.threads > 0 {
                settings.generate.threads
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            };
            let plan = bench::engines::EnginesPlan {
                isq,
                adapter,
                mistralrs_gguf,
                peer: peer_python.map(|p| (p, peer_gguf)),
                reps,
                max_tokens,
                threads,
                native: !no_native,
                mistralrs: !no_mistralrs,
            };
            let result = bench::engines::run(settings, &squad, &plan).await?;
            emit_bench(&result, &bench::engines::table(&result), out, json)
        }
        BenchCmd::Ingest {
            format,
            out,
            json,
            paths,
        } => {
            let scratch =
                std::env::temp_dir().join(format!("domainrag-bench-{}", std::process::id()));
            let mut bench_settings = settings.clone();
            bench_settings.paths.data_dir = scratch.clone();
            let scratch_catalog = Catalog::new(&bench_settings);
            let name = "bench-ingest";
            scratch_catalog
                .create(scratch_catalog.default_settings(name))
                .await?;
            let report = {
                // The ingestor (and the store it holds) must be gone before its files are removed:
                // dropping the embedded store flushes it.
                let embedder = Embedder::load_async(&bench_settings).await?;
                let col = scratch_catalog.open(name).await?;
                let ingestor = Ingestor::new(col, embedder, bench_settings.ingest.batch_docs);
                let bar = Bar::new(!json);
                ingestor.ingest_paths(&paths, format, &bar).await
            };
            let cleanup = std::fs::remove_dir_all(&scratch);
            let report = report?;
            cleanup.with_context(|| format!("removing {}", scratch.display()))?;
            let result = serde_json::json!({
                "files": report.files,
                "documents": report.documents,
                "chunks": report.chunks,
                "failures": report.failures_total,
                "seconds": report.seconds,
                "chunks_per_second": report.chunks_per_second(),
                "vector_backend": settings.vectors.backend,
            });
            let table = format!(
                "| files | documents | chunks | seconds | chunks/s |\n|---|---|---|---|---|\n| {} | {} | {} | {:.1} | {:.1} |\n",
                report.files,
                report.documents,
                report.chunks,
                report.seconds,
                report.chunks_per_second()
            );
            emit_bench(&result, &table, out, json)
        }
    }
}

/// `n` fixed synthetic adapters `bench-lora-1..n` (deterministic weights, rank 8 on q/k/v/o),
/// registered if missing: the speed of a merged adapter model does not depend on what the
/// adapter learned.
/// Shape of the synthetic bench adapters.
struct SyntheticKind {
    rank: usize,
    modules: &'static [&'static str],
    tag: String,
}

impl SyntheticKind {
    fn parse(rank: usize, modules: &str) -> Result<SyntheticKind> {
        let (modules, short): (&'static [&'static str], &str) = match modules {
            "attention" => (&["q_proj", "k_proj", "v_proj", "o_proj"], ""),
            "all" => (&crate::adapters::LORA_MODULES, "-all"),
            other => anyhow::bail!("--adapter-modules must be attention or all, not {other:?}"),
        };
        anyhow::ensure!((1..=256).contains(&rank), "--adapter-rank must be 1..=256");
        // The first shape keeps the names earlier runs registered.
        let tag = if rank == 8 && short.is_empty() {
            String::new()
        } else {
            format!("-r{rank}{short}")
        };
        Ok(SyntheticKind { rank, modules, tag })
    }
}

/// Register `n` deterministic synthetic adapters of `kind` (once per data dir).
fn synthetic_adapters(settings: &Settings, n: usize, kind: &SyntheticKind) -> Result<Vec<String>> {
    let registry = AdapterRegistry::new(&settings.paths.data_dir);
    let base = BaseModelInfo::from_dir(&settings.generate_base_dir())?;
    let mut names = Vec::new();
    for i in 1..=n {
        let name = format!("bench-lora{}-{i}", kind.tag);
        if registry.get(&name).is_err() {
            let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
            crate::adapters::write_test_adapter(
                &dir,
                &base,
                kind.rank,
                2.0 * kind.rank as f64,
                kind.modules,
                &layers,
                |j| ((j * (7919 + i) % 17) as f32 - 8.0) * 0.01,
            )
            .with_context(|| format!("writing {}", dir.display()))?;
            registry.add(&name, &dir, &base)?;
            std::fs::remove_dir_all(&dir).ok();
        }
        names.push(name);
    }
    Ok(names)
}

/// Print a benchmark as JSON (`--json`) or its table, and write the JSON to `out` if given.
fn emit_bench<T: serde::Serialize>(
    result: &T,
    table: &str,
    out: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let text = serde_json::to_string_pretty(result)?;
    if let Some(out) = out {
        std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        print!("{table}");
    }
    Ok(())
}
