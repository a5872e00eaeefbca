//! Kill points: named places between the steps of multi-step writes (an ingest batch, a document
//! delete, a collection delete, an adapter replace) where the crash suite
//! (`tests/integration/faults.rs`) makes the process SIGKILL itself, to check that a kill at that
//! exact point leaves a state the next start repairs.
//!
//! Inert unless the environment sets `DOMAINRAG_TEST_KILL_AT=<point>[:<n>]` (die the n-th time
//! the point is reached, the first by default); then each point costs one comparison. Operators
//! never set it. Owns nothing else.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the kill point.
pub const ENV: &str = "DOMAINRAG_TEST_KILL_AT";

struct Target {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| parse(&std::env::var(ENV).ok()?))
        .as_ref()
}

fn parse(spec: &str) -> Option<Target> {
    let (point, nth) = match spec.rsplit_once(':') {
        Some((point, n)) => (point, n.parse().ok().filter(|&n| n > 0)?),
        None => (spec, 1),
    };
    Some(Target {
        point: point.to_string(),
        nth,
        seen: AtomicU64::new(0),
    })
}

/// Mark `point` as reached; dies here, as a SIGKILL from outside would kill it, when the crash
/// suite asked for this point and occurrence.
pub fn reach(point: &str) {
    let Some(target) = target() else {
        return;
    };
    if target.point != point || target.seen.fetch_add(1, Ordering::SeqCst) + 1 != target.nth {
        return;
    }
    eprintln!("kill point {point} #{}: SIGKILL", target.nth);
    // SAFETY: kill(2) on our own pid with a signal number has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL to oneself is delivered before kill(2) returns; abort in case it somehow is not.
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_occurrence() {
        let t = parse("ingest.bm25:3").expect("valid");
        assert_eq!((t.point.as_str(), t.nth), ("ingest.bm25", 3));
        let t = parse("ingest.bm25").expect("valid");
        assert_eq!(t.nth, 1);
        assert!(parse("ingest.bm25:0").is_none());
        assert!(parse("ingest.bm25:x").is_none());
    }
}
