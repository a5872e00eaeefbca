//! Settings: the compiled-in `config/default.toml`, then `config/$DOMAINRAG_ENV.toml`, then
//! `--config FILE`, then `DOMAINRAG__SECTION__KEY` environment variables, then the global CLI flags.
//!
//! Every struct denies unknown keys, and [`Settings::validate`] refuses values that would only fail
//! later, naming the key and the fix. This module reads files and the environment; it opens nothing
//! else (no models, no indexes).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Errors while loading or validating settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or variable could not be parsed, or a key is unknown or of the wrong type.
    #[error("invalid configuration: {0}")]
    Parse(#[from] config::ConfigError),
    /// The explicit `--config` file does not exist.
    #[error("config file {path} does not exist")]
    MissingFile { path: PathBuf },
    /// A value parsed but is not acceptable.
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub paths: PathsConfig,
    pub embedding: EmbeddingConfig,
    pub vectors: VectorsConfig,
    pub collection_defaults: CollectionDefaults,
    pub ingest: IngestConfig,
    pub generate: GenerateConfig,
    pub rag: RagConfig,
    pub answers: AnswersConfig,
    pub server: ServerConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    pub model_dir: PathBuf,
    pub onnx_file: String,
    pub ort_library: PathBuf,
    pub dimension: usize,
    pub max_length: usize,
    pub batch_size: usize,
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorBackend {
    Edge,
    Qdrant,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VectorsConfig {
    pub backend: VectorBackend,
    /// Candidates the embedded store's HNSW search explores (higher: closer to exact, slower).
    pub hnsw_ef: usize,
    /// Whether the embedded store's HNSW segments keep int8 copies of the vectors to search with.
    pub quantization: VectorQuantization,
    /// With int8 vectors: a search re-scores this many times `k` of them with the full vectors.
    pub oversampling: f64,
    pub qdrant: QdrantConfig,
}

impl VectorsConfig {
    /// The oversampling a search uses when the vectors are quantized, else `None`.
    pub fn int8_oversampling(&self) -> Option<f64> {
        (self.quantization == VectorQuantization::Int8).then_some(self.oversampling)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorQuantization {
    /// Full f32 vectors only.
    None,
    /// int8 scalars beside the f32 vectors (a quarter of their size), re-scored with the f32 ones.
    Int8,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QdrantConfig {
    pub url: String,
    /// Empty means no key.
    #[serde(default)]
    pub api_key: Option<String>,
    pub collection_prefix: String,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionDefaults {
    pub chunking: ChunkingConfig,
    pub bm25: Bm25Config,
    pub fusion: FusionConfig,
}

/// How documents are cut into chunks. Kept per collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingConfig {
    pub max_words: usize,
    pub overlap_words: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FusionMethod {
    Rrf,
    Weighted,
}

/// How a query is scored by BM25. Kept per collection; `collection tune` picks them from the
/// collection's own questions.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bm25Config {
    /// Weight of a match in a document's title against one in its text (0: titles are not
    /// searched). Titles that are ids or file names say nothing; headings say a lot.
    pub title_weight: f32,
    /// Weight of a match in a chunk's window (its text between its neighbours' in the same
    /// document) against one in its own text (0: windows not searched). A collection saved
    /// before windows existed has none set and keeps 0 until it is set or tuned.
    #[serde(default)]
    pub window_weight: f32,
    /// Weight of two adjacent words of a query found side by side in a chunk's text against one
    /// word found there (0: pairs not searched). A collection saved before pairs existed has none
    /// set and keeps 0 until it is set or tuned.
    #[serde(default)]
    pub pair_weight: f32,
    /// BM25's term-frequency saturation: how much a word said again adds (0: nothing, the
    /// match alone counts). A collection saved before this was a setting has 1.2, tantivy's.
    #[serde(default = "Bm25Config::default_k1")]
    pub k1: f32,
    /// BM25's length normalisation: 0 scores a match the same in a short chunk and a long one,
    /// 1 scales it fully by the chunk's length against the average (0.75 when not saved).
    #[serde(default = "Bm25Config::default_b")]
    pub b: f32,
}

impl Bm25Config {
    /// What collections created before BM25 had settings were searched with (`collection.json`
    /// without a `bm25` section keeps it until it is set or tuned).
    pub const BEFORE_SETTINGS: Bm25Config = Bm25Config {
        title_weight: 1.0,
        window_weight: 0.0,
        pair_weight: 0.0,
        k1: 1.2,
        b: 0.75,
    };

    fn default_k1() -> f32 {
        Self::BEFORE_SETTINGS.k1
    }

    fn default_b() -> f32 {
        Self::BEFORE_SETTINGS.b
    }

    /// Checks the BM25 settings; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.title_weight.is_finite() && (0.0..=10.0).contains(&self.title_weight)) {
            return Err(("bm25.title_weight", "must be between 0 and 10".into()));
        }
        if !(self.window_weight.is_finite() && (0.0..=10.0).contains(&self.window_weight)) {
            return Err(("bm25.window_weight", "must be between 0 and 10".into()));
        }
        if !(self.pair_weight.is_finite() && (0.0..=10.0).contains(&self.pair_weight)) {
            return Err(("bm25.pair_weight", "must be between 0 and 10".into()));
        }
        if !(self.k1.is_finite() && (0.0..=5.0).contains(&self.k1)) {
            return Err(("bm25.k1", "must be between 0 and 5".into()));
        }
        if !(self.b.is_finite() && (0.0..=1.0).contains(&self.b)) {
            return Err(("bm25.b", "must be between 0 and 1".into()));
        }
        Ok(())
    }
}

/// A change to some of a collection's BM25 settings (what a CLI flag or an API request names);
/// the settings it leaves out keep their value.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bm25Change {
    pub title_weight: Option<f32>,
    pub window_weight: Option<f32>,
    pub pair_weight: Option<f32>,
    pub k1: Option<f32>,
    pub b: Option<f32>,
}

impl Bm25Change {
    /// Set what this change names in `to` (checked afterwards, with the rest of the settings).
    pub fn apply(self, to: &mut Bm25Config) {
        let Bm25Change {
            title_weight,
            window_weight,
            pair_weight,
            k1,
            b,
        } = self;
        for (value, slot) in [
            (title_weight, &mut to.title_weight),
            (window_weight, &mut to.window_weight),
            (pair_weight, &mut to.pair_weight),
            (k1, &mut to.k1),
            (b, &mut to.b),
        ] {
            if let Some(v) = value {
                *slot = v;
            }
        }
    }
}

impl Default for Bm25Config {
    fn default() -> Self {
        Bm25Config::BEFORE_SETTINGS
    }
}

/// Everything a search of one collection is scored with: BM25's settings and the fusion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SearchSettings {
    pub bm25: Bm25Config,
    pub fusion: FusionConfig,
}

impl std::fmt::Display for SearchSettings {
    /// `title weight 0.5, window weight 2, pair weight 0.75, k1 1.2, b 0.75, weighted 1/1, 50
    /// candidates` (or `rrf k 60 bm25 x1`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fusion = &self.fusion;
        let bm25 = &self.bm25;
        write!(
            f,
            "title weight {}, window weight {}, pair weight {}, k1 {}, b {}, ",
            bm25.title_weight, bm25.window_weight, bm25.pair_weight, bm25.k1, bm25.b
        )?;
        match fusion.method {
            FusionMethod::Weighted => {
                write!(f, "weighted {}/{}", fusion.bm25_weight, fusion.dense_weight)?
            }
            FusionMethod::Rrf => write!(f, "rrf k {} bm25 x{}", fusion.rrf_k, fusion.bm25_weight)?,
        }
        write!(f, ", {} candidates", fusion.candidates)
    }
}

/// How BM25 and dense results are fused. Kept per collection.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    pub method: FusionMethod,
    pub rrf_k: f32,
    pub bm25_weight: f32,
    pub dense_weight: f32,
    pub candidates: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub batch_docs: usize,
    pub writer_heap_mb: usize,
}

/// The LLM and how it samples.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// `mistralrs` (merged model per adapter) or `native` (domainrag's engine, `crate::engine`).
    pub engine: String,
    pub base_model_dir: PathBuf,
    pub dtype: String,
    /// In-situ quantisation of the linear layers after loading (and after merging an adapter):
    /// `none` or one of [`ISQ_TYPES`].
    pub isq: String,
    /// Native engine: how resident LoRA matrices are kept, `f32`, `f16` (half the memory) or `q8`
    /// (8-bit blocks, 0.28x; CPU only); computed in f32 either way.
    pub lora_dtype: String,
    /// Threads for the matrix kernels (0 = one per core).
    pub threads: usize,
    pub max_resident_adapters: usize,
    /// Finished sequences whose KV cache mistral.rs keeps for prompt-prefix reuse (0 = off).
    /// Only a GPU build may set it: see [`Settings::validate`].
    pub prefix_cache_sequences: usize,
    pub max_concurrent: usize,
    pub queue_depth: usize,
    pub max_tokens: usize,
    /// An answer may not repeat a run of this many of its own tokens (0 = off).
    pub no_repeat_ngram: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Native engine: KV cache tokens of all running sequences together (prompt + max_tokens
    /// each); requests beyond wait.
    pub kv_budget_tokens: usize,
    /// Native engine: rows of one forward step (a long prompt is read in chunks of this, between
    /// decode steps of the others).
    pub step_tokens: usize,
    /// Native engine: seed of sampling when the temperature is above 0 (0 = from the clock).
    pub seed: u64,
    /// glibc's heap blocks of at least this many KiB get a mapping of their own, returned to the
    /// kernel when freed (0 = glibc's dynamic threshold); see [`crate::heap::serve`].
    pub heap_mmap_threshold_kib: usize,
    /// MiB of freed mapped blocks kept for reuse until an answer ends; see
    /// [`crate::heap::serve`].
    pub heap_block_cache_mib: usize,
}

/// The in-situ quantisation types `generate.isq` accepts (GGML block formats that mistral.rs
/// runs on CPU and CUDA).
pub const ISQ_TYPES: &[&str] = &[
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k",
];

/// How retrieved chunks become the prompt.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RagConfig {
    pub max_sources: usize,
    pub context_tokens: usize,
    /// Longest question answered (tokens); longer ones are invalid input.
    pub max_question_tokens: usize,
    /// The adapter that answers for a collection without one of its own, when it is registered
    /// ("" = none: the base model answers).
    pub house_adapter: String,
    /// Answers may cite only the sources given, each once per run of citations
    /// (`crate::engine::cite`).
    pub cite_only_given_sources: bool,
}

/// The answer log, feedback and experiments (`answerlog`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersConfig {
    /// Log answers (off: no answer log, no feedback, no experiments; for teams whose questions
    /// must not be kept).
    pub enabled: bool,
    /// Logged answers (with their feedback) older than this are deleted (0 = kept forever).
    pub retention_days: u64,
    /// Answers each arm of an experiment needs before a difference between arms is reported.
    pub min_per_arm: usize,
    /// Score each logged answer's faithfulness to its sources in the background (the `eval
    /// answers` scorer; one embedding call per answer).
    pub score_faithfulness: bool,
}

/// The HTTP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub max_json_bytes: usize,
    pub max_upload_bytes: usize,
    pub request_timeout_secs: u64,
    pub shutdown_timeout_secs: u64,
    /// Finished background jobs remembered (with their files under `<data_dir>/jobs/`).
    pub jobs_kept: usize,
    /// API keys required on every route but health and the UI shell (`access`). Off is allowed on
    /// loopback addresses only.
    pub auth: bool,
    /// Host names (without port) requests may carry besides loopback names and the bound address;
    /// `*` accepts any (DNS rebinding protection off).
    pub allowed_hosts: Vec<String>,
    /// Size at which `audit.jsonl` is rotated to `audit.jsonl.1`.
    pub audit_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
}

/// Where settings come from besides the compiled-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `config/` directory holding `$DOMAINRAG_ENV.toml`; `None` skips it.
    pub config_dir: Option<PathBuf>,
    /// Value of `DOMAINRAG_ENV`.
    pub env_name: Option<String>,
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// Whether to read `DOMAINRAG__*` variables (off in tests that must not see the caller's env).
    pub read_env: bool,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--models-dir`.
    pub models_dir: Option<PathBuf>,
}

impl Sources {
    /// The sources a normal process uses: `./config`, `DOMAINRAG_ENV`, the environment.
    pub fn from_process(
        file: Option<PathBuf>,
        data_dir: Option<PathBuf>,
        models_dir: Option<PathBuf>,
    ) -> Self {
        Sources {
            config_dir: Some(PathBuf::from("config")),
            env_name: std::env::var("DOMAINRAG_ENV")
                .ok()
                .filter(|s| !s.is_empty()),
            file,
            read_env: true,
            data_dir,
            models_dir,
        }
    }
}

impl Settings {
    /// Load and validate settings from `sources`.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let (Some(dir), Some(env)) = (&sources.config_dir, &sources.env_name) {
            let path = dir.join(format!("{env}.toml"));
            builder = builder.add_source(config::File::from(path).required(false));
        }
        if let Some(file) = &sources.file {
            if !file.exists() {
                return Err(ConfigError::MissingFile { path: file.clone() });
            }
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        if sources.read_env {
            builder = builder.add_source(
                config::Environment::with_prefix("DOMAINRAG")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("server.allowed_hosts"),
            );
        }
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        if let Some(dir) = &sources.data_dir {
            settings.paths.data_dir = dir.clone();
        }
        if let Some(dir) = &sources.models_dir {
            settings.paths.models_dir = dir.clone();
        }
        if settings
            .vectors
            .qdrant
            .api_key
            .as_deref()
            .is_some_and(str::is_empty)
        {
            settings.vectors.qdrant.api_key = None;
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Refuse values that would fail later, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_string(),
            })
        };
        if self.paths.data_dir.as_os_str().is_empty() {
            return invalid(
                "paths.data_dir",
                "is empty; set a directory for collections",
            );
        }
        if self.embedding.dimension == 0 {
            return invalid(
                "embedding.dimension",
                "must be > 0 (384 for all-MiniLM-L6-v2)",
            );
        }
        if !(8..=8192).contains(&self.embedding.max_length) {
            return invalid("embedding.max_length", "must be between 8 and 8192 tokens");
        }
        if self.embedding.batch_size == 0 {
            return invalid("embedding.batch_size", "must be > 0");
        }
        if !(1.0..=16.0).contains(&self.vectors.oversampling) {
            return invalid("vectors.oversampling", "must be between 1 and 16");
        }
        if self.embedding.onnx_file.is_empty() {
            return invalid(
                "embedding.onnx_file",
                "is empty; name the .onnx file in model_dir",
            );
        }
        if self.vectors.backend == VectorBackend::Qdrant
            && !(self.vectors.qdrant.url.starts_with("http://")
                || self.vectors.qdrant.url.starts_with("https://"))
        {
            return invalid(
                "vectors.qdrant.url",
                "must start with http:// or https:// (the gRPC port, usually 6334)",
            );
        }
        if self.ingest.batch_docs == 0 {
            return invalid("ingest.batch_docs", "must be > 0");
        }
        if self.ingest.writer_heap_mb < 15 {
            return invalid(
                "ingest.writer_heap_mb",
                "must be at least 15 (tantivy's minimum)",
            );
        }
        if !["f32", "bf16", "f16", "auto"].contains(&self.generate.dtype.as_str()) {
            return invalid("generate.dtype", "must be one of f32, bf16, f16, auto");
        }
        if !["mistralrs", "native"].contains(&self.generate.engine.as_str()) {
            return invalid("generate.engine", "must be mistralrs or native");
        }
        if self.generate.engine == "native"
            && (!["none", "q8_0", "q4_0"].contains(&self.generate.isq.as_str())
                || self.generate.dtype != "f32")
        {
            return invalid(
                "generate.engine",
                "native loads f32 weights and quantises them to q8_0, q4_0 or not: set \
                 generate.dtype = \"f32\" and generate.isq to \"none\", \"q8_0\" or \"q4_0\"",
            );
        }
        if !["f32", "f16", "q8"].contains(&self.generate.lora_dtype.as_str()) {
            return invalid("generate.lora_dtype", "must be f32, f16 or q8");
        }
        if self.generate.engine != "native" && self.generate.lora_dtype != "f32" {
            return invalid(
                "generate.lora_dtype",
                "only the native engine keeps adapters unmerged; mistralrs merges them into f32 \
                 weights: set it to \"f32\" or generate.engine = \"native\"",
            );
        }
        if self.generate.kv_budget_tokens < 256 {
            return invalid("generate.kv_budget_tokens", "must be at least 256");
        }
        if !(1..=8192).contains(&self.generate.step_tokens) {
            return invalid("generate.step_tokens", "must be between 1 and 8192");
        }
        if self.generate.isq != "none" && !ISQ_TYPES.contains(&self.generate.isq.as_str()) {
            return invalid(
                "generate.isq",
                &format!("must be none or one of {}", ISQ_TYPES.join(", ")),
            );
        }
        if self.generate.threads > 1024 {
            return invalid(
                "generate.threads",
                "must be between 0 (one per core) and 1024",
            );
        }
        if self.answers.min_per_arm < 2 {
            return invalid(
                "answers.min_per_arm",
                "must be at least 2 (an interval needs two answers per arm)",
            );
        }
        if self.generate.max_resident_adapters == 0 {
            return invalid("generate.max_resident_adapters", "must be > 0");
        }
        if self.generate.prefix_cache_sequences > 0 && !cfg!(feature = "cuda") {
            // mistral.rs 0.8.1 evicts its prefix cache only from GPU memory: on CPU every
            // finished sequence's KV cache stays forever (~68 MiB per RAG answer), issue 13.
            return invalid(
                "generate.prefix_cache_sequences",
                "must be 0 on a CPU build: mistral.rs bounds its prefix cache only on a GPU, \
                 on CPU it would keep every answer's KV cache until the server runs out of memory",
            );
        }
        if self.generate.heap_mmap_threshold_kib > crate::heap::MAX_MMAP_THRESHOLD_KIB {
            return invalid(
                "generate.heap_mmap_threshold_kib",
                "must be between 0 (glibc's dynamic threshold) and 32768 (32 MiB, glibc's largest)",
            );
        }
        if self.generate.heap_block_cache_mib > crate::heap::MAX_BLOCK_CACHE_MIB {
            return invalid(
                "generate.heap_block_cache_mib",
                "must be between 0 (map every block afresh) and 65536 (64 GiB)",
            );
        }
        if self.generate.max_concurrent == 0 {
            return invalid("generate.max_concurrent", "must be > 0");
        }
        if self.generate.no_repeat_ngram > 64 {
            return invalid(
                "generate.no_repeat_ngram",
                "must be between 0 (off) and 64 tokens",
            );
        }
        if !(1..=32_768).contains(&self.generate.max_tokens) {
            return invalid("generate.max_tokens", "must be between 1 and 32768");
        }
        if !(self.generate.temperature.is_finite()
            && (0.0..=5.0).contains(&self.generate.temperature))
        {
            return invalid("generate.temperature", "must be between 0 and 5");
        }
        if !(self.generate.top_p > 0.0 && self.generate.top_p <= 1.0) {
            return invalid("generate.top_p", "must be in (0, 1]");
        }
        if self.rag.max_question_tokens < 16 {
            return invalid("rag.max_question_tokens", "must be at least 16");
        }
        if self.rag.max_sources == 0 {
            return invalid("rag.max_sources", "must be > 0");
        }
        if self.rag.context_tokens < 64 {
            return invalid("rag.context_tokens", "must be at least 64");
        }
        if self.server.bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid("server.bind", "must be an address like 127.0.0.1:8080");
        }
        if self.server.max_json_bytes < 1024 || self.server.max_upload_bytes < 1024 {
            return invalid(
                "server.max_json_bytes",
                "and max_upload_bytes must be at least 1024",
            );
        }
        if self.server.audit_max_bytes < 4096 {
            return invalid("server.audit_max_bytes", "must be at least 4096");
        }
        if self
            .server
            .allowed_hosts
            .iter()
            .any(|h| h.is_empty() || h.contains(['/', ' ']))
        {
            return invalid(
                "server.allowed_hosts",
                "must be host names or addresses without scheme, path or spaces (or \"*\")",
            );
        }
        if self.server.jobs_kept == 0 {
            return invalid("server.jobs_kept", "must be at least 1");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                "is not a valid filter (try \"info\" or \"domainrag=debug\")",
            );
        }
        self.collection_defaults
            .chunking
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        self.collection_defaults
            .fusion
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        self.collection_defaults
            .bm25
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        Ok(())
    }

    /// The embedding model directory, resolved against `models_dir`.
    pub fn embedding_model_dir(&self) -> PathBuf {
        resolve(&self.paths.models_dir, &self.embedding.model_dir)
    }

    /// The LLM's model directory, resolved against `models_dir`.
    pub fn generate_base_dir(&self) -> PathBuf {
        resolve(&self.paths.models_dir, &self.generate.base_model_dir)
    }

    /// The ONNX Runtime library, resolved against `models_dir`.
    pub fn ort_library(&self) -> PathBuf {
        resolve(&self.paths.models_dir, &self.embedding.ort_library)
    }
}

impl ChunkingConfig {
    /// Checks the chunking settings; the error names the key (relative to the chunking section).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_words < 8 {
            return Err(("chunking.max_words", "must be at least 8".into()));
        }
        if self.overlap_words >= self.max_words {
            return Err((
                "chunking.overlap_words",
                format!("must be smaller than max_words ({})", self.max_words),
            ));
        }
        Ok(())
    }
}

impl FusionConfig {
    /// Checks the fusion settings; the error names the key (relative to the fusion section).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.rrf_k.is_finite() && self.rrf_k >= 0.0) {
            return Err(("fusion.rrf_k", "must be a finite number >= 0".into()));
        }
        for (key, w) in [
            ("fusion.bm25_weight", self.bm25_weight),
            ("fusion.dense_weight", self.dense_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err((key, "must be a finite number >= 0".into()));
            }
        }
        if self.bm25_weight == 0.0 && self.dense_weight == 0.0 {
            return Err((
                "fusion.bm25_weight",
                "and dense_weight cannot both be 0".into(),
            ));
        }
        if !(1..=10_000).contains(&self.candidates) {
            return Err(("fusion.candidates", "must be between 1 and 10000".into()));
        }
        Ok(())
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources_with_file(body: &str) -> (tempfile::TempDir, Sources) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("extra.toml");
        std::fs::write(&file, body).expect("write config");
        let sources = Sources {
            file: Some(file),
            ..Sources::default()
        };
        (dir, sources)
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load(&Sources::default()).expect("defaults are valid");
        assert_eq!(s.embedding.dimension, 384);
        assert_eq!(s.vectors.backend, VectorBackend::Edge);
        assert_eq!(s.vectors.qdrant.api_key, None);
        assert_eq!(
            s.embedding_model_dir(),
            PathBuf::from("data/models/all-MiniLM-L6-v2")
        );
    }

    #[test]
    fn every_file_in_config_dir_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("config dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let sources = Sources {
                    file: Some(path.clone()),
                    ..Sources::default()
                };
                Settings::load(&sources)
                    .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let (_d, sources) = sources_with_file("[embedding]\nbatchsize = 3\n");
        let err = Settings::load(&sources)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    #[test]
    fn unknown_section_is_refused_by_name() {
        let (_d, sources) = sources_with_file("[retrieval]\nk = 3\n");
        let err = Settings::load(&sources)
            .expect_err("unknown section")
            .to_string();
        assert!(err.contains("retrieval"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused_by_name() {
        let (_d, sources) = sources_with_file("[embedding]\nbatch_size = \"many\"\n");
        let err = Settings::load(&sources)
            .expect_err("wrong type")
            .to_string();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (body, key) in [
            ("[embedding]\nbatch_size = 0\n", "embedding.batch_size"),
            ("[generate]\nisq = \"q9\"\n", "generate.isq"),
            ("[generate]\nlora_dtype = \"bf16\"\n", "generate.lora_dtype"),
            ("[vectors]\noversampling = 0.5\n", "vectors.oversampling"),
            ("[vectors]\nquantization = \"int4\"\n", "quantization"),
            (
                "[generate]\nheap_block_cache_mib = 17592186044416\n",
                "generate.heap_block_cache_mib",
            ),
            (
                "[generate]\nengine = \"mistralrs\"\nlora_dtype = \"f16\"\n",
                "generate.lora_dtype",
            ),
            (
                "[collection_defaults.chunking]\nmax_words = 50\noverlap_words = 50\n",
                "chunking.overlap_words",
            ),
            ("[collection_defaults.bm25]\nk1 = 6.0\n", "bm25.k1"),
            ("[collection_defaults.bm25]\nb = 1.5\n", "bm25.b"),
            (
                "[collection_defaults.fusion]\nrrf_k = -1.0\n",
                "fusion.rrf_k",
            ),
            ("[collection_defaults.fusion]\nmethod = \"max\"\n", "method"),
            (
                "[vectors]\nbackend = \"qdrant\"\n[vectors.qdrant]\nurl = \"localhost\"\n",
                "vectors.qdrant.url",
            ),
            ("[log]\nlevel = \"=[\"\n", "log.level"),
        ] {
            let (_d, sources) = sources_with_file(body);
            let err = Settings::load(&sources).expect_err(body).to_string();
            assert!(err.contains(key), "{body} -> {err}");
        }
        // The prefix cache is unbounded on CPU in mistral.rs (issue 13): refused there.
        if !cfg!(feature = "cuda") {
            let (_d, sources) = sources_with_file("[generate]\nprefix_cache_sequences = 16\n");
            let err = Settings::load(&sources).expect_err("refused").to_string();
            assert!(err.contains("generate.prefix_cache_sequences"), "{err}");
        }
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let sources = Sources {
            file: Some(PathBuf::from("/nonexistent/domainrag.toml")),
            ..Sources::default()
        };
        let err = Settings::load(&sources)
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("/nonexistent/domainrag.toml"), "{err}");
    }

    #[test]
    fn cli_flags_override_files() {
        let (_d, mut sources) = sources_with_file("[paths]\ndata_dir = \"from-file\"\n");
        sources.data_dir = Some(PathBuf::from("from-flag"));
        let s = Settings::load(&sources).expect("valid");
        assert_eq!(s.paths.data_dir, PathBuf::from("from-flag"));
    }
}
