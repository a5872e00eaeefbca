//! The heap policy (`domainrag::heap`) in a process of its own: the mmap threshold and the cache
//! of freed mapped blocks are process-wide, so this cannot share a process with tests that train
//! (they raise both) or allocate concurrently.

use domainrag::heap::blocks::cached_bytes;
use domainrag::heap::{TrainingHeap, mapped_mib, release_freed_heap, serve};

/// MiB of `mapped_mib` that one live allocation of `mib` MiB adds.
fn mapped_by_a_block(mib: usize) -> f64 {
    let before = mapped_mib();
    // black_box: the optimiser may otherwise drop an allocation nobody reads.
    let block = std::hint::black_box(vec![1u8; mib << 20]);
    let during = mapped_mib();
    drop(std::hint::black_box(block));
    during - before
}

/// MiB of `mapped_mib` that one live block of `mib` MiB from glibc's malloc adds (C libraries'
/// allocations, which the pinned threshold governs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped_by_a_malloc(mib: usize) -> f64 {
    let before = mapped_mib();
    // SAFETY: a block allocated, written within its size, and freed once.
    unsafe {
        // black_box: the optimiser knows malloc and may drop a block nobody reads.
        let p = std::hint::black_box(libc::malloc(mib << 20) as *mut u8);
        assert!(!p.is_null());
        std::ptr::write_bytes(p, 1, mib << 20);
        let during = mapped_mib();
        libc::free(std::hint::black_box(p) as *mut libc::c_void);
        during - before
    }
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn serving_reuses_freed_big_blocks_until_an_answer_ends_and_training_keeps_more() {
    serve(256, 8);
    // glibc's dynamic threshold rises to a freed mapped block's size: after one 4 MiB block
    // comes and goes, the next is carved from the heap. Pinned, every one is mapped.
    for _ in 0..3 {
        let got = mapped_by_a_malloc(4);
        assert!(got >= 4.0, "glibc maps a 4 MiB block: {got}");
    }
    // Rust's big blocks are mapped, and a freed one waits for the next of its size.
    assert!(mapped_by_a_block(4) >= 4.0, "a 4 MiB block is mapped");
    assert!(cached_bytes() >= 4 << 20, "a freed 4 MiB block is cached");
    let first = std::hint::black_box(vec![1u8; 4 << 20]);
    let at = first.as_ptr();
    drop(first);
    let second = std::hint::black_box(vec![0u8; 4 << 20]);
    assert_eq!(
        second.as_ptr(),
        at,
        "the next 4 MiB block reuses the mapping"
    );
    assert!(
        second.iter().all(|&v| v == 0),
        "a reused block asked zeroed is zeroed"
    );
    drop(second);
    // Up to the cap: a 16 MiB block does not fit in 8 MiB, and an answer's end drains the cache.
    drop(std::hint::black_box(vec![1u8; 16 << 20]));
    assert!(cached_bytes() <= 8 << 20, "the cache stays under its cap");
    release_freed_heap();
    assert_eq!(cached_bytes(), 0, "an answer's end drains the cache");
    {
        let _training = TrainingHeap::enter();
        drop(std::hint::black_box(vec![1u8; 16 << 20]));
        assert!(cached_bytes() >= 16 << 20, "training keeps a 16 MiB block");
    }
    assert_eq!(cached_bytes(), 0, "training's end drains the cache");
    drop(std::hint::black_box(vec![1u8; 16 << 20]));
    assert!(
        cached_bytes() <= 8 << 20,
        "after training, the serving cap is back"
    );
    assert!(
        mapped_by_a_malloc(16) >= 16.0,
        "and glibc's serving threshold"
    );
}
