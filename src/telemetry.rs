//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` or else the `log.level` setting.
//! Stdout is left to command output (tables, JSON), so `--json` output can be piped. Also the
//! process's own memory figures from `/proc`, for benchmarks and training records (the heap's own
//! figures and policy are `heap`'s).

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(level: &str) {
    // An empty RUST_LOG (as some shells export) counts as unset.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// A memory figure of this process from Linux `/proc/self/status` (`VmRSS` = resident now,
/// `VmHWM` = peak resident), in MiB; 0 where it cannot be read.
pub fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .map_or(0.0, |status| status_field_mib(&status, field))
}

/// Field `field` (a size in kB) of a `/proc/<pid>/status` text, in MiB; 0 when absent.
fn status_field_mib(status: &str, field: &str) -> f64 {
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This process's resident memory, from one read of `/proc/self/status`, in MiB (0 where it
/// cannot be read): all of it, and split into anonymous pages (heap, model weights, caches) and
/// file-backed ones (mapped binaries, indexes, model files).
#[derive(Debug, Clone, Copy)]
pub struct ProcMemory {
    pub rss_mib: f64,
    pub anon_mib: f64,
    pub file_mib: f64,
}

impl ProcMemory {
    pub fn read() -> ProcMemory {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        ProcMemory {
            rss_mib: status_field_mib(&status, "VmRSS"),
            anon_mib: status_field_mib(&status, "RssAnon"),
            file_mib: status_field_mib(&status, "RssFile"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_mib_and_missing_ones_are_zero() {
        let status = "Name:\tdomainrag\nVmRSS:\t  2048 kB\nRssAnon:\t 1024 kB\nRssFileX:\t9 kB\n";
        assert_eq!(status_field_mib(status, "VmRSS"), 2.0);
        assert_eq!(status_field_mib(status, "RssAnon"), 1.0);
        assert_eq!(
            status_field_mib(status, "RssFile"),
            0.0,
            "a prefix of another field"
        );
        let now = ProcMemory::read();
        assert!(now.rss_mib > 0.0 && now.anon_mib > 0.0 && now.anon_mib <= now.rss_mib);
    }
}
