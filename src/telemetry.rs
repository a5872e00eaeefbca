//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` or else the `log.level` setting.
//! Stdout is left to command output (tables, JSON), so `--json` output can be piped. Also the
//! process's own memory figures, for benchmarks and training records.

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
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
