//! The process heap: what domainrag asks of its allocators (when big blocks are mapped on their
//! own, how many freed mappings wait for reuse, handing freed pages back to the kernel) and what it
//! reads from them (bytes in use). Owns the allocator policy: serving pins glibc's mmap threshold
//! and caps the cache of freed mappings ([`blocks`], the global allocator for blocks of 256 KiB
//! and more); training raises both for its duration and puts them back. Elsewhere than glibc the
//! glibc calls do nothing.

pub mod blocks;

pub use blocks::Allocator;

use std::sync::atomic::{AtomicUsize, Ordering};

/// glibc's largest mmap threshold on 64-bit (`DEFAULT_MMAP_THRESHOLD_MAX`), in KiB.
pub const MAX_MMAP_THRESHOLD_KIB: usize = 32 << 10;

/// The threshold this process was configured with (KiB; 0 = glibc's own, dynamic one).
static SERVING_THRESHOLD_KIB: AtomicUsize = AtomicUsize::new(0);

/// The largest cap of the cache of freed mapped blocks a configuration may set (MiB).
pub const MAX_BLOCK_CACHE_MIB: usize = 64 << 10;

/// The cap of the cache of freed mapped blocks this process was configured with (MiB).
static SERVING_CACHE_MIB: AtomicUsize = AtomicUsize::new(0);

/// Freed mapped blocks training keeps for its next steps, at most.
const TRAINING_CACHE_MIB: usize = 2048;

/// Serving's policy, set once at start before threads exist: glibc serves every allocation of at
/// least `kib` KiB (those of C libraries; Rust's blocks of 256 KiB and more are [`blocks`]') from
/// its own mapping, returned to the kernel when freed (`generate.heap_mmap_threshold_kib`; 0
/// leaves glibc's dynamic threshold), and up to `cache_mib` MiB of freed mapped blocks wait for
/// reuse until the next [`release_freed_heap`] (`generate.heap_block_cache_mib`).
///
/// Why: glibc starts at 128 KiB but raises its threshold to the size of each mapped block freed,
/// up to 32 MiB, so after a few answers every KV cache block and prefill activation (hundreds of
/// KiB to tens of MiB, a new size with each prompt length) is carved out of the arenas, whose
/// free space then fragments: over 300 answers resident memory grew by ~17 MiB per 100 answers
/// with the live heap flat (`bench/soak/eval.json`). A fixed threshold keeps those blocks out of
/// the arenas; the cache spares a prompt chunk from page-faulting each of them in afresh.
pub fn serve(kib: usize, cache_mib: usize) {
    SERVING_THRESHOLD_KIB.store(kib, Ordering::Relaxed);
    SERVING_CACHE_MIB.store(cache_mib, Ordering::Relaxed);
    if kib > 0 {
        set_mmap_threshold(kib);
    }
    blocks::set_cache_cap(cache_mib << 20);
}

/// For as long as it lives: keep freed blocks of up to 32 MiB in glibc's heap and up to 2 GiB of
/// freed mapped blocks in [`blocks`]' cache (training).
///
/// Every training step allocates and frees the same few hundred MB of activations; handed back
/// to the kernel on free, each step would page-fault them in again (zeroed by the kernel).
/// Keeping them in the heap measured ~10% more training tokens/s. Dropped, it puts the serving
/// policy back, so a server that ran a training job serves on as configured.
pub struct TrainingHeap {
    _private: (),
}

impl TrainingHeap {
    pub fn enter() -> TrainingHeap {
        set_mmap_threshold(MAX_MMAP_THRESHOLD_KIB);
        set_trim_threshold(1 << 30);
        blocks::set_cache_cap(TRAINING_CACHE_MIB << 20);
        TrainingHeap { _private: () }
    }
}

impl Drop for TrainingHeap {
    fn drop(&mut self) {
        let kib = SERVING_THRESHOLD_KIB.load(Ordering::Relaxed);
        // glibc's own threshold cannot be restored once set: the nearest is its 128 KiB start.
        set_mmap_threshold(if kib > 0 { kib } else { 128 });
        // glibc's default: trim the top of the heap once 128 KiB of it is free.
        set_trim_threshold(128 * 1024);
        blocks::set_cache_cap(SERVING_CACHE_MIB.load(Ordering::Relaxed) << 20);
        release_freed_heap();
    }
}

fn set_mmap_threshold(kib: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is safe to call at any time.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            (kib.min(MAX_MMAP_THRESHOLD_KIB) * 1024) as libc::c_int,
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = kib;
}

fn set_trim_threshold(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(
            libc::M_TRIM_THRESHOLD,
            bytes.min(libc::c_int::MAX as usize) as libc::c_int,
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Bytes of live heap allocations (glibc's `mallinfo2`: in-use bytes of the arenas plus mmapped
/// blocks, plus [`blocks`]' live mapped blocks); [`blocks`]' alone elsewhere. Unlike RSS it does
/// not move with what the allocator keeps free or with how scattered the live allocations are: a
/// series of it tells a leak of live objects from allocator growth.
pub fn in_use_bytes() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics; it is thread-safe.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd + blocks::live_bytes()) as u64
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        blocks::live_bytes() as u64
    }
}

/// [`in_use_bytes`] in MiB.
pub fn in_use_mib() -> f64 {
    in_use_bytes() as f64 / (1024.0 * 1024.0)
}

/// Bytes of live allocations that have a mapping of their own (glibc's `mallinfo2().hblkhd`:
/// blocks at or over the mmap threshold, and [`blocks`]' live ones), in MiB.
pub fn mapped_mib() -> f64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: as in `in_use_bytes`.
        let info = unsafe { libc::mallinfo2() };
        (info.hblkhd + blocks::live_bytes()) as f64 / (1024.0 * 1024.0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        blocks::live_bytes() as f64 / (1024.0 * 1024.0)
    }
}

/// Dropped at the end of each generation: hands the heap pages freed by that answer (its KV cache,
/// its activations) back to the kernel with glibc's `malloc_trim(0)`.
///
/// Why: an answer allocates and frees some tens of MiB (a ~1,500-token KV cache is ~68 MiB on
/// the demo model) from whichever allocator arena its threads use, and glibc keeps what is freed
/// below the mmap threshold in the arena. Trimming after every answer makes resident memory follow
/// what is alive. It costs a walk over the arenas and page faults when the next answer reuses the
/// pages: milliseconds against seconds of generation.
pub struct ReleaseFreedOnDrop;

impl Drop for ReleaseFreedOnDrop {
    fn drop(&mut self) {
        release_freed_heap();
    }
}

/// Return free heap pages of every allocator arena to the kernel (glibc), and unmap the freed
/// mapped blocks waiting for reuse.
pub fn release_freed_heap() {
    blocks::drain();
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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn in_use_counts_a_live_allocation() {
        let before = in_use_mib();
        // black_box: the optimiser may otherwise drop an allocation nobody reads.
        let kept = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = in_use_mib();
        drop(std::hint::black_box(kept));
        assert!(during - before >= 63.0, "{before} -> {during}");
    }
}
