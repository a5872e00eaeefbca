//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` or else the `log.level` setting.
//! Stdout is left to command output (tables, JSON), so `--json` output can be piped. Also the
//! process's own memory: its figures, for benchmarks and training records, and handing freed heap
//! back to the kernel after each answer.

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

/// Bytes of live heap allocations (glibc's `mallinfo2`: in-use bytes of the arenas plus mmapped
/// blocks), in MiB; 0 elsewhere. Unlike RSS it does not move with what the allocator keeps free
/// or with how scattered the live allocations are: a series of it tells a leak of live objects
/// from allocator growth.
pub fn heap_in_use_mib() -> f64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics; it is thread-safe.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as f64 / (1024.0 * 1024.0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0.0
    }
}

/// Dropped at the end of each generation: hands the heap pages freed by that answer (its KV cache,
/// its activations) back to the kernel with glibc's `malloc_trim(0)`.
///
/// Why: an answer allocates and frees some tens of MiB (a ~1,500-token KV cache is ~68 MiB on
/// the demo model) from whichever allocator arena its threads use. glibc keeps freed memory
/// in the arena, and the arenas' high-water marks rose step by step over a 600-answer
/// `eval answers` run (+6..16 MiB per 100 answers after warm-up with nothing alive leaking;
/// `bench/soak/eval-report.json`). Trimming after every answer makes resident memory follow
/// what is alive. It costs a walk over the arenas and page faults when the next answer
/// reuses the pages: milliseconds against seconds of generation.
pub struct ReleaseFreedHeapOnDrop;

impl Drop for ReleaseFreedHeapOnDrop {
    fn drop(&mut self) {
        release_freed_heap();
    }
}

/// Return free heap pages of every allocator arena to the kernel (glibc); a no-op elsewhere.
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds as free; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
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

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn heap_in_use_counts_a_live_allocation() {
        let before = heap_in_use_mib();
        // black_box: the optimiser may otherwise drop an allocation nobody reads.
        let kept = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = heap_in_use_mib();
        drop(std::hint::black_box(kept));
        assert!(during - before >= 63.0, "{before} -> {during}");
    }
}
