//! PDF text extraction. pdf-extract (over lopdf) inflates streams without any bound: a small file
//! whose pages reference one compressed stream thousands of times grows to gigabytes, and some
//! files make it panic or recurse without end. So when the binary names itself as the helper
//! ([`use_helper`], done by `main`), each PDF is read in a child process (`domainrag
//! __extract-pdf`, bytes in, text out) limited to [`MEMORY_LIMIT`] of address space and
//! [`TIME_LIMIT`]; whatever the file does to it, the ingest gets an error for that file and goes
//! on. Without a helper (the library inside tests) extraction runs in this process, panics caught.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::load::LoadError;

/// The argument that makes the binary the PDF helper.
pub const HELPER_ARG: &str = "__extract-pdf";
/// Address space of the helper: far above what a real PDF needs, far below the machine.
pub const MEMORY_LIMIT: u64 = 1 << 30;
/// How long the helper may take for one file.
pub const TIME_LIMIT: Duration = Duration::from_secs(120);
/// Most text taken from one PDF.
const MAX_TEXT: u64 = 256 << 20;
/// Exit codes of the helper besides 0 (text on stdout).
const EXIT_NO_TEXT: u8 = 4;
const EXIT_ERROR: u8 = 3;

static HELPER: OnceLock<PathBuf> = OnceLock::new();

/// Read PDFs through `exe` (this binary) in a bounded child process from now on.
pub fn use_helper(exe: PathBuf) {
    let _ = HELPER.set(exe);
}

/// The text layer of a PDF.
pub(super) fn extract(bytes: &[u8]) -> Result<String, LoadError> {
    if !bytes.starts_with(b"%PDF") {
        return Err(LoadError::Pdf("missing %PDF header".into()));
    }
    match HELPER.get() {
        Some(exe) => isolated(exe, bytes),
        None => in_process(bytes),
    }
}

/// pdf-extract in this process; a panic is this file's error.
fn in_process(bytes: &[u8]) -> Result<String, LoadError> {
    let result = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes));
    match result {
        Ok(Ok(text)) if !text.trim().is_empty() => Ok(text),
        Ok(Ok(_)) => Err(LoadError::NoText),
        Ok(Err(e)) => Err(LoadError::Pdf(e.to_string())),
        Err(_) => Err(LoadError::Pdf("the PDF parser failed on this file".into())),
    }
}

/// The helper's `main`: PDF bytes on stdin, the text on stdout.
pub fn helper_main() -> ExitCode {
    let mut bytes = Vec::new();
    if std::io::stdin().read_to_end(&mut bytes).is_err() {
        return ExitCode::from(EXIT_ERROR);
    }
    match in_process(&bytes) {
        Ok(text) => match std::io::stdout().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(EXIT_ERROR),
        },
        Err(LoadError::NoText) => ExitCode::from(EXIT_NO_TEXT),
        Err(e) => {
            eprint!("{e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn isolated(exe: &PathBuf, bytes: &[u8]) -> Result<String, LoadError> {
    let failed = |m: String| LoadError::Pdf(m);
    let mut command = Command::new(exe);
    command
        .arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: MEMORY_LIMIT,
                rlim_max: MEMORY_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        failed(format!(
            "cannot start the PDF reader {}: {e}",
            exe.display()
        ))
    })?;
    // Feed and drain on threads: either pipe can fill while the other waits.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>, max: u64| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(max).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _), MAX_TEXT);
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _), 4096);
    let deadline = Instant::now() + TIME_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let _ = writer.join();
    let text = stdout.join().unwrap_or_default();
    let message = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    match status.map(|s| (s.success(), s.code())) {
        None => Err(failed(format!(
            "reading it took longer than {} s",
            TIME_LIMIT.as_secs()
        ))),
        Some((true, _)) => Ok(String::from_utf8_lossy(&text).into_owned()),
        Some((_, Some(code))) if code == i32::from(EXIT_NO_TEXT) => Err(LoadError::NoText),
        Some((_, Some(code))) if code == i32::from(EXIT_ERROR) && !message.is_empty() => {
            Err(failed(message))
        }
        Some(_) => Err(failed(format!(
            "the PDF reader stopped on this file: it needs more than {} MiB to read, or breaks \
             the parser",
            MEMORY_LIMIT >> 20
        ))),
    }
}
