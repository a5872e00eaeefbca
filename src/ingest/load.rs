//! Turning files into documents: plain text, Markdown, HTML (visible text and title), PDF (text
//! layer), JSON Lines (`id`, `text`, optional `title`, `metadata`) and SQuAD JSON (one document per
//! paragraph).
//!
//! Pure parsing: reads bytes given to it, returns documents or a per-file error that says what is
//! wrong. Never touches an index.

use std::path::Path;

use scraper::{ElementRef, Html, Node, Selector};
use serde::Deserialize;

/// A document ready to be chunked.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Stable identity: the canonical file path, the JSONL `id`, or `squad:<title>:<n>`.
    pub doc_id: String,
    pub title: String,
    /// Where it came from (file path; for JSONL and SQuAD the file, with the line or paragraph).
    pub source: String,
    pub text: String,
    /// Extra JSON metadata (`{}` when none).
    pub metadata: serde_json::Value,
}

/// How to read an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// By file extension (.txt .md .markdown .html .htm .pdf .jsonl).
    Auto,
    Txt,
    Md,
    Html,
    Pdf,
    Jsonl,
    /// SQuAD v1.1 JSON: each paragraph becomes a document.
    Squad,
}

impl Format {
    /// The format of `path` by extension, `None` for files auto-detection does not read.
    pub fn detect(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "txt" | "text" => Format::Txt,
            "md" | "markdown" => Format::Md,
            "html" | "htm" | "xhtml" => Format::Html,
            "pdf" => Format::Pdf,
            "jsonl" | "ndjson" => Format::Jsonl,
            _ => return None,
        })
    }
}

/// What went wrong reading one input.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoadError {
    #[error("empty file")]
    Empty,
    #[error("binary data, not text (a NUL byte at offset {offset})")]
    Binary { offset: usize },
    #[error("not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("no text could be extracted")]
    NoText,
    #[error("not a readable PDF: {0}")]
    Pdf(String),
    #[error("line {line}: {message}")]
    JsonLine { line: usize, message: String },
    #[error("not SQuAD JSON: {0}")]
    Squad(String),
    #[error("HTML nested deeper than {max} elements; real pages stay far below this")]
    TooDeep { max: usize },
    #[error(
        "unsupported file type (use --format to force one of txt, md, html, pdf, jsonl, squad)"
    )]
    Unsupported,
}

/// Per-record errors one file keeps (the rest are only counted): a file of a million bad lines
/// must not hold a million messages.
pub const MAX_RECORD_ERRORS: usize = 100;

/// The result of loading one file: documents, and per-record errors (JSONL lines) that did not
/// stop the rest (the first [`MAX_RECORD_ERRORS`] of `errors_total`).
#[derive(Debug, Default)]
pub struct Loaded {
    pub documents: Vec<Document>,
    pub errors: Vec<LoadError>,
    pub errors_total: usize,
}

impl Loaded {
    fn error(&mut self, e: LoadError) {
        self.errors_total += 1;
        if self.errors.len() < MAX_RECORD_ERRORS {
            self.errors.push(e);
        }
    }
}

/// Load the file at `path` (already read into `bytes`) as `format`.
pub fn load(path: &Path, bytes: &[u8], format: Format) -> Result<Loaded, LoadError> {
    let format = match format {
        Format::Auto => Format::detect(path).ok_or(LoadError::Unsupported)?,
        f => f,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(LoadError::Empty);
    }
    let source = path.display().to_string();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| source.clone());
    let single = |title: String, text: String| -> Result<Loaded, LoadError> {
        if text.trim().is_empty() {
            return Err(LoadError::NoText);
        }
        Ok(Loaded {
            documents: vec![Document {
                doc_id: source.clone(),
                title,
                source: source.clone(),
                text,
                metadata: serde_json::json!({}),
            }],
            errors: Vec::new(),
            errors_total: 0,
        })
    };
    match format {
        Format::Txt => {
            let text = text_of(bytes)?;
            let title = first_line(text).unwrap_or(stem);
            single(title, text.to_string())
        }
        Format::Md => {
            let text = text_of(bytes)?;
            let (title, body) = markdown(text);
            single(title.unwrap_or(stem), body)
        }
        Format::Html => {
            let text = text_of(bytes)?;
            if html_depth_exceeds(text, MAX_HTML_DEPTH) {
                return Err(LoadError::TooDeep {
                    max: MAX_HTML_DEPTH,
                });
            }
            let (title, body) = html(text);
            single(title.unwrap_or(stem), body)
        }
        Format::Pdf => {
            let text = super::pdf::extract(bytes)?;
            single(stem, text)
        }
        Format::Jsonl => jsonl(&source, text_of(bytes)?),
        Format::Squad => squad(&source, text_of(bytes)?),
        Format::Auto => unreachable!("resolved above"),
    }
}

fn text_of(bytes: &[u8]) -> Result<&str, LoadError> {
    if let Some(offset) = bytes.iter().take(8192).position(|&b| b == 0) {
        return Err(LoadError::Binary { offset });
    }
    std::str::from_utf8(bytes).map_err(|e| LoadError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })
}

fn first_line(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(120).collect())
}

/// Markdown: the first heading is the title; heading marks and emphasis are dropped from the
/// text so they do not pollute BM25 terms or embeddings.
fn markdown(text: &str) -> (Option<String>, String) {
    let mut title = None;
    let mut body = String::with_capacity(text.len());
    let mut in_front_matter = text.starts_with("---\n");
    for (i, line) in text.lines().enumerate() {
        if in_front_matter {
            if i > 0 && line.trim() == "---" {
                in_front_matter = false;
            }
            continue;
        }
        let trimmed = line.trim_start();
        let content = trimmed.trim_start_matches('#');
        let is_heading = content.len() < trimmed.len() && content.starts_with(' ');
        if is_heading && title.is_none() {
            title = Some(content.trim().to_string());
        }
        let line = if is_heading { content.trim() } else { line };
        body.push_str(&line.replace("**", "").replace('`', ""));
        body.push('\n');
    }
    (title, body)
}

/// Deepest element nesting an HTML file may have: browser parsers (WebKit, Blink) stop nesting at
/// this depth, and pages written by people or generators nest a few dozen levels. The HTML parser
/// checks scopes by walking the open elements, so nesting costs it time quadratic in the depth:
/// 4.4 MB of `<div>`s nested 4000 deep took ~10 s to read, nested 500 deep ~3 s (release build,
/// found by the `load` fuzz target, whose 15 kB seed of 3000 nested elements was its slowest).
pub const MAX_HTML_DEPTH: usize = 512;

/// Void elements and those whose end tag HTML lets a page leave out (`<p>`, `<li>`...): never
/// counted as nesting, so legacy pages with thousands of unclosed paragraphs still load.
const UNCOUNTED_ELEMENTS: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr", "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "thead", "tbody",
    "tfoot", "colgroup", "caption", "rb", "rt", "rtc", "rp", "html", "head", "body",
];

/// Whether the tags of `text` open more than `max` elements at once (a linear scan of start and
/// end tags, before parsing; comments and self-closing tags do not nest).
fn html_depth_exceeds(text: &str, max: usize) -> bool {
    let mut depth: usize = 0;
    let mut rest = text;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        let closing = rest.starts_with('/');
        let name_start = usize::from(closing);
        let name: String = rest[name_start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if name.is_empty() || UNCOUNTED_ELEMENTS.contains(&name.as_str()) {
            continue;
        }
        let self_closing = rest.find('>').is_some_and(|end| rest[..end].ends_with('/'));
        if closing {
            depth = depth.saturating_sub(1);
        } else if !self_closing {
            depth += 1;
            if depth > max {
                return true;
            }
        }
    }
    false
}

/// HTML: the `<title>` (or first `<h1>`) and the visible text, block elements on their own lines.
fn html(text: &str) -> (Option<String>, String) {
    let doc = Html::parse_document(text);
    let pick = |sel: &str| {
        let selector = Selector::parse(sel).expect("static selector is valid");
        doc.select(&selector)
            .next()
            .map(|e| squash(&e.text().collect::<String>()))
            .filter(|t| !t.is_empty())
    };
    let title = pick("title").or_else(|| pick("h1"));
    let body_sel = Selector::parse("body").expect("static selector is valid");
    let mut out = String::with_capacity(text.len() / 2);
    match doc.select(&body_sel).next() {
        Some(body) => visible_text(body, &mut out),
        None => visible_text(doc.root_element(), &mut out),
    }
    let body = out
        .lines()
        .map(squash)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    (title, body)
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

const SKIPPED_ELEMENTS: &[&str] = &[
    "script", "style", "noscript", "template", "head", "nav", "svg", "iframe", "button", "select",
];
const BLOCK_ELEMENTS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "li",
    "ul",
    "ol",
    "table",
    "tr",
    "td",
    "th",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "br",
    "dt",
    "dd",
    "dl",
    "hr",
    "header",
    "footer",
    "main",
    "aside",
    "figure",
    "figcaption",
];
/// Navigation bars of generated manuals (DocBook's, as in the PostgreSQL docs) repeat on every page.
const SKIPPED_CLASSES: &[&str] = &["navheader", "navfooter"];

/// One step of the walk in [`visible_text`].
enum Step<N> {
    Visit(N),
    EndBlock,
}

/// The visible text under `root`, block elements on their own lines. An explicit stack, not
/// recursion: a page nested 200k elements deep once overflowed the stack and aborted the process.
fn visible_text(root: ElementRef<'_>, out: &mut String) {
    let mut stack: Vec<Step<_>> = root.children().rev().map(Step::Visit).collect();
    while let Some(step) = stack.pop() {
        let node = match step {
            Step::EndBlock => {
                out.push('\n');
                continue;
            }
            Step::Visit(node) => node,
        };
        match node.value() {
            Node::Text(t) => out.push_str(t),
            Node::Element(e) => {
                let name = e.name();
                if SKIPPED_ELEMENTS.contains(&name)
                    || e.classes().any(|c| SKIPPED_CLASSES.contains(&c))
                    || e.attr("hidden").is_some()
                {
                    continue;
                }
                if BLOCK_ELEMENTS.contains(&name) {
                    out.push('\n');
                    stack.push(Step::EndBlock);
                }
                stack.extend(node.children().rev().map(Step::Visit));
            }
            _ => {}
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlRecord {
    id: serde_json::Value,
    text: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

fn jsonl(source: &str, text: &str) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| LoadError::JsonLine {
            line: line_no,
            message,
        };
        let record: JsonlRecord = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                loaded.error(err(e.to_string()));
                continue;
            }
        };
        let id = match record.id {
            serde_json::Value::String(s) if !s.trim().is_empty() => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                loaded.error(err("`id` must be a non-empty string or a number".into()));
                continue;
            }
        };
        if record.text.trim().is_empty() {
            loaded.error(err(format!("document {id:?} has empty `text`")));
            continue;
        }
        let metadata = record.metadata.unwrap_or_else(|| serde_json::json!({}));
        if !metadata.is_object() {
            loaded.error(err(format!(
                "document {id:?}: `metadata` must be an object"
            )));
            continue;
        }
        loaded.documents.push(Document {
            title: record.title.unwrap_or_else(|| id.clone()),
            doc_id: id,
            source: format!("{source}:{line_no}"),
            text: record.text,
            metadata,
        });
    }
    if loaded.documents.is_empty() && loaded.errors.is_empty() {
        return Err(LoadError::Empty);
    }
    Ok(loaded)
}

#[derive(Deserialize)]
pub(crate) struct SquadFile {
    pub data: Vec<SquadArticle>,
}

#[derive(Deserialize)]
pub(crate) struct SquadArticle {
    pub title: String,
    pub paragraphs: Vec<SquadParagraph>,
}

#[derive(Deserialize)]
pub(crate) struct SquadParagraph {
    pub context: String,
    #[serde(default)]
    pub qas: Vec<SquadQa>,
}

#[derive(Deserialize)]
pub(crate) struct SquadQa {
    #[serde(default)]
    pub id: String,
    pub question: String,
    #[serde(default)]
    pub answers: Vec<SquadAnswer>,
}

#[derive(Deserialize)]
pub(crate) struct SquadAnswer {
    pub text: String,
}

/// The document id of paragraph `n` of a SQuAD article; retrieval evaluation uses the same ids.
pub fn squad_doc_id(title: &str, n: usize) -> String {
    format!("squad:{title}:{n}")
}

pub(crate) fn parse_squad(text: &str) -> Result<SquadFile, LoadError> {
    serde_json::from_str(text).map_err(|e| LoadError::Squad(e.to_string()))
}

fn squad(source: &str, text: &str) -> Result<Loaded, LoadError> {
    let file = parse_squad(text)?;
    let mut loaded = Loaded::default();
    for article in file.data {
        let title = article.title.replace('_', " ");
        for (n, paragraph) in article.paragraphs.into_iter().enumerate() {
            loaded.documents.push(Document {
                doc_id: squad_doc_id(&article.title, n),
                title: title.clone(),
                source: format!("{source}#{}/{n}", article.title),
                text: paragraph.context,
                metadata: serde_json::json!({"questions": paragraph.qas.len()}),
            });
        }
    }
    if loaded.documents.is_empty() {
        return Err(LoadError::Squad("no paragraphs in `data`".into()));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(format!("/docs/{name}"))
    }

    #[test]
    fn html_title_and_visible_text() {
        let page = r#"<html><head><title>CREATE INDEX</title><style>p{}</style></head>
            <body><div class="navheader">Prev Up Next</div><h1>CREATE INDEX</h1>
            <p>Partial indexes <b>cover</b> a subset.</p><script>var x=1;</script>
            <nav>menu</nav><p>Second&nbsp;paragraph.</p></body></html>"#;
        let loaded = load(&p("a.html"), page.as_bytes(), Format::Auto).expect("html");
        let doc = &loaded.documents[0];
        assert_eq!(doc.title, "CREATE INDEX");
        assert_eq!(
            doc.text,
            "CREATE INDEX\nPartial indexes cover a subset.\nSecond paragraph."
        );
        assert_eq!(doc.doc_id, "/docs/a.html");
    }

    #[test]
    fn nesting_past_the_limit_is_refused_before_parsing() {
        let deep = format!("<html><body>{}x</body></html>", "<div>".repeat(200_000));
        let err = load(&p("deep.html"), deep.as_bytes(), Format::Auto).expect_err("too deep");
        assert_eq!(
            err,
            LoadError::TooDeep {
                max: MAX_HTML_DEPTH
            }
        );
        // Closed siblings, unclosed paragraphs, void and self-closing tags do not nest.
        let wide = "<div>a</div>".repeat(10_000)
            + &"<p>para".repeat(10_000)
            + &"<br><img src=x/><x-y/>".repeat(10_000);
        assert!(!html_depth_exceeds(&wide, 16));
        assert!(html_depth_exceeds(&"<section>".repeat(17), 16));
    }

    #[test]
    fn deeply_nested_html_loads_without_overflowing_the_stack() {
        let depth = MAX_HTML_DEPTH / 2 - 1;
        let page = format!(
            "<html><body>{}deep text{}<p>after</p></body></html>",
            "<div><span>".repeat(depth),
            "</span></div>".repeat(depth)
        );
        // On a small stack: the recursive walk this replaced used ~100 bytes a level.
        let loaded = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || load(&p("deep.html"), page.as_bytes(), Format::Auto))
            .expect("spawn")
            .join()
            .expect("no stack overflow")
            .expect("html");
        assert!(loaded.documents[0].text.starts_with("deep text"));
        assert!(loaded.documents[0].text.ends_with("after"));
    }

    #[test]
    fn markdown_title_and_front_matter() {
        let md = "---\nlayout: x\n---\n# Vacuum\n\nIt **reclaims** `space`.\n";
        let doc = &load(&p("v.md"), md.as_bytes(), Format::Auto)
            .expect("md")
            .documents[0];
        assert_eq!(doc.title, "Vacuum");
        assert!(doc.text.contains("It reclaims space."));
        assert!(!doc.text.contains("layout"));
    }

    #[test]
    fn txt_title_is_first_line() {
        let doc = &load(&p("t.txt"), b"\n  Hello world\nmore", Format::Auto)
            .expect("txt")
            .documents[0];
        assert_eq!(doc.title, "Hello world");
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        assert_eq!(
            load(&p("e.txt"), b"", Format::Auto).err(),
            Some(LoadError::Empty)
        );
        assert_eq!(
            load(&p("e.txt"), b" \n\t", Format::Auto).err(),
            Some(LoadError::Empty)
        );
        assert_eq!(
            load(&p("b.txt"), b"ab\0cd", Format::Auto).err(),
            Some(LoadError::Binary { offset: 2 })
        );
        assert_eq!(
            load(&p("u.txt"), b"ok \xff\xfe", Format::Auto).err(),
            Some(LoadError::InvalidUtf8 { offset: 3 })
        );
        assert_eq!(
            load(&p("x.docx"), b"data", Format::Auto).err(),
            Some(LoadError::Unsupported)
        );
        assert!(matches!(
            load(&p("bad.pdf"), b"%PDF-1.4 garbage garbage", Format::Auto).err(),
            Some(LoadError::Pdf(_))
        ));
        assert!(matches!(
            load(&p("bad.pdf"), b"not a pdf at all", Format::Auto).err(),
            Some(LoadError::Pdf(_))
        ));
    }

    #[test]
    fn jsonl_keeps_good_lines_and_reports_bad_ones() {
        let body = concat!(
            r#"{"id": "a", "text": "alpha", "title": "A", "metadata": {"k": 1}}"#,
            "\n",
            "{broken\n",
            r#"{"id": 7, "text": "seven"}"#,
            "\n",
            r#"{"id": "e", "text": "  "}"#,
            "\n"
        );
        let loaded = load(&p("d.jsonl"), body.as_bytes(), Format::Auto).expect("jsonl");
        let ids: Vec<_> = loaded.documents.iter().map(|d| d.doc_id.as_str()).collect();
        assert_eq!(ids, ["a", "7"]);
        assert_eq!(loaded.documents[0].metadata["k"], 1);
        assert_eq!(loaded.documents[1].title, "7");
        let lines: Vec<_> = loaded
            .errors
            .iter()
            .map(|e| match e {
                LoadError::JsonLine { line, .. } => *line,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, [2, 4]);
    }

    #[test]
    fn a_flood_of_bad_jsonl_lines_keeps_a_hundred_messages_and_counts_the_rest() {
        let mut body = "{oops\n".repeat(300_000);
        body.push_str(r#"{"id": "ok", "text": "still here"}"#);
        let loaded = load(&p("flood.jsonl"), body.as_bytes(), Format::Jsonl).expect("jsonl");
        assert_eq!(loaded.documents.len(), 1);
        assert_eq!(loaded.errors.len(), MAX_RECORD_ERRORS);
        assert_eq!(loaded.errors_total, 300_000);
    }

    #[test]
    fn squad_paragraphs_become_documents() {
        let body = r#"{"data": [{"title": "Super_Bowl_50", "paragraphs": [
            {"context": "Denver won.", "qas": [{"id": "q1", "question": "Who won?", "answers": [{"text": "Denver", "answer_start": 0}]}]},
            {"context": "It was in California.", "qas": []}]}]}"#;
        let loaded = load(&p("dev.json"), body.as_bytes(), Format::Squad).expect("squad");
        assert_eq!(loaded.documents.len(), 2);
        assert_eq!(loaded.documents[1].doc_id, "squad:Super_Bowl_50:1");
        assert_eq!(loaded.documents[0].title, "Super Bowl 50");
        assert!(load(&p("dev.json"), b"{\"x\": 1}", Format::Squad).is_err());
    }
}
