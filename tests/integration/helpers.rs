//! Shared test setup: settings pointing at a temp data dir and the fetched models, a loaded
//! embedder shared by the whole binary, and small fixture builders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use domainrag::collection::{Catalog, Collection};
use domainrag::config::{Settings, Sources};
use domainrag::embed::Embedder;
use domainrag::generate::Generator;
use domainrag::ingest::Ingestor;
use tokio::sync::OnceCell;

/// An HTTP client for the test server that drops idle pooled connections after a second. actix
/// closes a keep-alive connection after 5 idle seconds; a pooled client that sends its next
/// request just as that happens gets `IncompleteMessage` (HTTP/1.1's keep-alive race, seen here
/// under load between two batches of answers). Dropping them well before the server does avoids
/// the race without giving up reuse within a burst.
pub fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(1))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("DOMAINRAG_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("data/models"));
    assert!(
        dir.join("all-MiniLM-L6-v2/model.onnx").is_file(),
        "models missing under {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    dir
}

/// Settings for a test: its own data dir, the shared models, no environment variables.
pub fn settings(data_dir: &Path) -> Settings {
    let sources = Sources {
        data_dir: Some(data_dir.to_path_buf()),
        models_dir: Some(models_dir()),
        ..Sources::default()
    };
    let mut s = Settings::load(&sources).expect("default settings are valid");
    // Small writer heap: many tests run at once.
    s.ingest.writer_heap_mb = 20;
    s
}

/// One embedder for the whole test binary (ONNX Runtime allows one environment per process).
pub async fn embedder() -> Arc<Embedder> {
    static EMBEDDER: OnceCell<Arc<Embedder>> = OnceCell::const_new();
    EMBEDDER
        .get_or_init(|| async {
            let dir = tempfile::tempdir().expect("tempdir");
            Embedder::load_async(&settings(dir.path()))
                .await
                .expect("embedder loads from data/models")
        })
        .await
        .clone()
}

/// The process-wide data dir of the tests that answer with adapters. Its first use points
/// `HF_HUB_CACHE` into it: mistral.rs resolves adapters only through that hub cache (offline),
/// where `generate::hubview` links them, and a process sets the variable once.
pub fn adapter_data_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = domainrag::generate::hubview::hub_cache_dir(dir.path());
        // SAFETY: set once, before any adapter model is built (the only reader); the binary's
        // main does the same before starting threads.
        unsafe {
            std::env::set_var("HF_HUB_CACHE", &hub);
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        dir
    })
    .path()
}

/// Held by every test that runs a server on [`adapter_data_dir`]: a server opens each collection
/// of its data dir, and the embedded vector store takes one opener at a time.
pub async fn adapter_dir_server() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// One generator on the mistral.rs engine (base model + merged adapter pool) for the whole test
/// binary: the reference the native engine and the trainer are compared against, and what the
/// tests of `generate.engine = "mistralrs"` use. Its adapter registry is [`adapter_data_dir`]'s.
pub async fn generator() -> Arc<Generator> {
    static GENERATOR: OnceCell<Arc<Generator>> = OnceCell::const_new();
    GENERATOR
        .get_or_init(|| async {
            let mut settings = settings(adapter_data_dir());
            settings.generate.engine = "mistralrs".into();
            Generator::load(&settings)
                .await
                .expect("base model loads from data/models")
        })
        .await
        .clone()
}

/// Greedy decoding of up to `max_tokens`, no repetition rule (token-for-token comparisons with
/// references).
pub fn greedy(max_tokens: usize) -> domainrag::generate::Sampling {
    domainrag::generate::Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens,
        no_repeat_ngram: 0,
        cite_sources: 0,
    }
}

/// One user message.
pub fn user(text: &str) -> Vec<domainrag::generate::ChatMessage> {
    vec![domainrag::generate::ChatMessage {
        role: domainrag::generate::Role::User,
        content: text.to_string(),
    }]
}

/// One generator on the native engine for the whole test binary, on [`adapter_data_dir`]'s
/// registry (the one [`generator`] uses).
pub async fn native_generator() -> Arc<Generator> {
    static NATIVE: OnceCell<Arc<Generator>> = OnceCell::const_new();
    NATIVE
        .get_or_init(|| async {
            let mut s = settings(adapter_data_dir());
            s.generate.engine = "native".into();
            s.generate.max_concurrent = 8;
            Generator::load(&s).await.expect("native engine loads")
        })
        .await
        .clone()
}

/// A native engine on the same data dir keeping LoRA matrices as `dtype` (`generate.lora_dtype`:
/// "f32", the default, is [`native_generator`]).
pub async fn native_lora_generator(dtype: &str) -> Arc<Generator> {
    static F16: OnceCell<Arc<Generator>> = OnceCell::const_new();
    static Q8: OnceCell<Arc<Generator>> = OnceCell::const_new();
    let cell = match dtype {
        "f32" => return native_generator().await,
        "f16" => &F16,
        "q8" => &Q8,
        other => panic!("no test engine keeps LoRA as {other}"),
    };
    cell.get_or_init(|| async {
        let mut s = settings(adapter_data_dir());
        s.generate.engine = "native".into();
        s.generate.lora_dtype = dtype.into();
        Generator::load(&s).await.expect("native engine loads")
    })
    .await
    .clone()
}

/// Held by every test that compares outputs of the shared generator: mistral.rs batches
/// concurrent requests to one model, and batched logits differ slightly from a lone request's, which
/// can flip a greedy token of a 135M model.
pub async fn exclusive_generation() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A temp data dir with one empty collection `name`.
pub struct TestCollection {
    pub dir: tempfile::TempDir,
    pub catalog: Catalog,
    pub name: String,
}

impl TestCollection {
    pub async fn new(name: &str) -> TestCollection {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = settings(dir.path());
        let catalog = Catalog::new(&settings);
        catalog
            .create(catalog.default_settings(name))
            .await
            .expect("create collection");
        TestCollection {
            dir,
            catalog,
            name: name.to_string(),
        }
    }

    /// A collection holding the fixture corpus of [`write_corpus`], ingested.
    pub async fn with_corpus(name: &str) -> TestCollection {
        let t = TestCollection::new(name).await;
        write_corpus(&t.inputs());
        t.ingestor()
            .await
            .ingest_paths(
                &[t.inputs()],
                domainrag::ingest::Format::Auto,
                &domainrag::ingest::NoProgress,
            )
            .await
            .expect("ingest the fixture corpus");
        t
    }

    pub async fn open(&self) -> Arc<Collection> {
        self.catalog
            .open(&self.name)
            .await
            .expect("open collection")
    }

    pub async fn ingestor(&self) -> Ingestor {
        Ingestor::new(self.open().await, embedder().await, 8)
    }

    /// A directory inside the temp dir for input files.
    pub fn inputs(&self) -> PathBuf {
        let p = self.dir.path().join("inputs");
        std::fs::create_dir_all(&p).expect("mkdir inputs");
        p
    }
}

/// A minimal, valid one-page PDF with `text` in Helvetica, built by hand (no PDF tool is installed
/// here); the xref offsets are computed so strict parsers accept it.
pub fn pdf_with_text(text: &str) -> Vec<u8> {
    let content = format!(
        "BT /F1 12 Tf 72 720 Td ({}) Tj ET",
        text.replace('(', "\\(").replace(')', "\\)")
    );
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{}\nendstream", content.len(), content),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{}\nendobj\n", i + 1, body).as_bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for off in offsets {
        out.extend(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A small PDF (a few KB) whose one page lists the same compressed content stream `refs` times;
/// the stream inflates to `inflated` bytes, so reading the page naively takes `refs * inflated`.
pub fn pdf_bomb(refs: usize, inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&b"0 0 m\n".repeat(inflated / 6))
        .expect("compress");
    let stream = z.finish().expect("compress");
    let contents = vec!["4 0 R"; refs].join(" ");
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    let mut object = |out: &mut Vec<u8>, body: &[u8]| {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", offsets.len()).as_bytes());
        out.extend(body);
        out.extend(b"\nendobj\n");
    };
    object(&mut out, b"<< /Type /Catalog /Pages 2 0 R >>");
    object(&mut out, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>");
    object(
        &mut out,
        format!("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents [{contents}] >>")
            .as_bytes(),
    );
    let mut body = format!(
        "<< /Length {} /Filter /FlateDecode >>\nstream\n",
        stream.len()
    )
    .into_bytes();
    body.extend(&stream);
    body.extend(b"\nendstream");
    object(&mut out, &body);
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", offsets.len() + 1).as_bytes());
    for off in &offsets {
        out.extend(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            offsets.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// The small fixture corpus: one file per format, each on its own topic.
/// Returns (file name, the doc id suffix to expect).
pub fn write_corpus(dir: &Path) {
    std::fs::write(
        dir.join("vacuum.txt"),
        "Routine vacuuming\n\nVACUUM reclaims storage occupied by dead tuples. In normal operation, \
         tuples that are deleted or obsoleted by an update are not physically removed from their \
         table; they remain present until a VACUUM is done. Therefore it is necessary to do VACUUM \
         periodically, especially on frequently-updated tables.",
    )
    .expect("write txt");
    std::fs::write(
        dir.join("partial-indexes.md"),
        "# Partial indexes\n\nA **partial index** is an index built over a subset of a table; the \
         subset is defined by a conditional expression called the predicate of the partial index. \
         Use `CREATE INDEX ... WHERE` to create one.\n",
    )
    .expect("write md");
    std::fs::write(
        dir.join("backup.html"),
        "<html><head><title>Backup and Restore</title><script>track()</script></head><body>\
         <h1>Backup and Restore</h1><p>The pg_dump utility writes an SQL dump of a database to an \
         archive file. Restore the archive with pg_restore or psql.</p></body></html>",
    )
    .expect("write html");
    std::fs::write(
        dir.join("revenue.pdf"),
        pdf_with_text(
            "Quarterly revenue of the widget division grew twelve percent year over year",
        ),
    )
    .expect("write pdf");
    std::fs::write(
        dir.join("faq.jsonl"),
        concat!(
            r#"{"id": "faq-password", "title": "Password reset", "text": "To reset your password, open Settings, choose Security and click Reset password. A reset link is emailed to you.", "metadata": {"team": "support"}}"#,
            "\n",
            r#"{"id": "faq-shipping", "title": "Shipping times", "text": "Orders ship within two business days; delivery by courier takes three to five days."}"#,
            "\n"
        ),
    )
    .expect("write jsonl");
}

/// The doc id a corpus file gets (its canonical path).
pub fn doc_id(dir: &Path, file: &str) -> String {
    std::fs::canonicalize(dir.join(file))
        .expect("fixture exists")
        .display()
        .to_string()
}

/// A small SQuAD-format file: two articles, three paragraphs, four questions.
pub fn squad_json() -> String {
    serde_json::json!({
        "version": "1.1",
        "data": [
            {"title": "Rhine", "paragraphs": [
                {"context": "The Rhine is a European river that begins in the Swiss canton of Graubünden and flows into the North Sea in the Netherlands.",
                 "qas": [{"id": "r1", "question": "Where does the Rhine begin?", "answers": [{"text": "Graubünden", "answer_start": 60}]}]},
                {"context": "The Rhine is about 1,230 kilometres long and is one of the major rivers of Europe, carrying barge traffic.",
                 "qas": [{"id": "r2", "question": "How long is the Rhine?", "answers": [{"text": "1,230 kilometres", "answer_start": 18}]}]}
            ]},
            {"title": "Oxygen", "paragraphs": [
                {"context": "Oxygen is a chemical element with symbol O and atomic number 8. It is a highly reactive nonmetal and oxidizing agent.",
                 "qas": [
                    {"id": "o1", "question": "What is the atomic number of oxygen?", "answers": [{"text": "8", "answer_start": 61}]},
                    {"id": "o2", "question": "Which element has the symbol O?", "answers": [{"text": "Oxygen", "answer_start": 0}]}
                 ]}
            ]}
        ]
    })
    .to_string()
}

/// `domainrag serve` on `data` at a free loopback port, auth off (loopback only), short answers,
/// with `env` added; returns the child and its base URL once `/readyz` says ready.
pub async fn serve(data: &Path, env: &[(&str, &str)]) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_domainrag"))
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models_dir())
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("DOMAINRAG__SERVER__AUTH", "false")
        .env("DOMAINRAG__GENERATE__MAX_TOKENS", "8")
        .env_remove("DOMAINRAG_ENV")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve starts");
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..600 {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return (child, base);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited before it was ready: {status}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not become ready");
}

/// A tool of the test venv that `scripts/test-deps.sh` installs (`make test` runs it first).
pub fn test_venv_bin(name: &str) -> PathBuf {
    let bin = std::env::var_os("DOMAINRAG_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/domainrag")))
        .expect("a cache dir")
        .join("test-venv/bin")
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: run scripts/test-deps.sh (make test does)",
        bin.display()
    );
    bin
}
