//! The heap policy (`domainrag::heap`) in a process of its own: the mmap threshold is process-wide,
//! so this cannot share a process with tests that train (they raise it) or allocate concurrently.

use domainrag::heap::{TrainingHeap, mapped_mib, pin_mmap_threshold};

/// MiB of `mapped_mib` that one live allocation of `mib` MiB adds.
fn mapped_by_a_block(mib: usize) -> f64 {
    let before = mapped_mib();
    // black_box: the optimiser may otherwise drop an allocation nobody reads.
    let block = std::hint::black_box(vec![1u8; mib << 20]);
    let during = mapped_mib();
    drop(std::hint::black_box(block));
    during - before
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn serving_maps_big_blocks_and_training_keeps_them_in_the_heap_until_it_ends() {
    // glibc's dynamic threshold rises to a freed mapped block's size: after one 4 MiB block
    // comes and goes, the next is carved from the heap. Pinned, every one is mapped.
    pin_mmap_threshold(256);
    for _ in 0..3 {
        assert!(
            mapped_by_a_block(4) >= 4.0,
            "serving: a 4 MiB block is mapped"
        );
    }
    {
        let _training = TrainingHeap::enter();
        assert!(
            mapped_by_a_block(4) < 1.0,
            "training: a 4 MiB block comes from the heap"
        );
    }
    // The threshold decides only when a request cannot be served from free heap, and training
    // left up to 4 MiB of it: a larger block tells which threshold is in force.
    assert!(
        mapped_by_a_block(16) >= 16.0,
        "after training, the serving threshold is back"
    );
}
