//! The process's global allocator: blocks of at least [`MAPPED_MIN`] bytes get an anonymous
//! mapping of their own, and when freed they wait in a small cache of mappings for the next
//! block of the same page-rounded size, up to a byte cap the heap policy sets
//! ([`set_cache_cap`]); [`drain`] unmaps what waits. Smaller blocks go to the system allocator
//! (glibc malloc).
//!
//! Why: a prompt chunk allocates and frees the same activation shapes layer after layer, a few
//! hundred KiB to tens of MiB each, ~1.5 GB per 512-row step on the demo model. glibc with its
//! pinned mmap threshold (kept for flat resident memory, see [`super::serve`]) mapped
//! each one afresh and page-faulted it in (zeroed) 4 KiB at a time: the kernel's share was as
//! large as the product's, and a 640-token prompt's TTFT was 1.97 s against 1.06 s with glibc's
//! dynamic threshold, which reuses freed blocks but let resident memory creep. Mappings reused
//! from a bounded cache, unmapped when an answer ends, keep both.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks of at least this many bytes get a mapping of their own (glibc's pinned threshold).
pub const MAPPED_MIN: usize = 256 << 10;

/// Mappings the cache holds at most (a fixed array: the allocator cannot allocate for itself).
const SLOTS: usize = 128;

const PAGE: usize = 4096;

/// The global allocator (registered in `lib.rs`).
pub struct Allocator;

/// Bytes of live mapped blocks (page-rounded).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Most bytes the cache may hold.
static CAP: AtomicUsize = AtomicUsize::new(0);

/// Freed mappings `(len, address)`, oldest first, and their bytes.
struct Cache {
    slots: [(usize, usize); SLOTS],
    used: usize,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [(0, 0); SLOTS],
    used: 0,
    bytes: 0,
});

/// Keep up to `bytes` of freed mappings for reuse; less than held unmaps the oldest.
pub fn set_cache_cap(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
    let evicted = lock().evict_to(bytes);
    evicted.unmap();
}

/// Unmap every cached mapping.
pub fn drain() {
    let evicted = lock().evict_to(0);
    evicted.unmap();
}

/// Bytes of live mapped blocks.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Bytes of freed mappings waiting in the cache.
pub fn cached_bytes() -> usize {
    lock().bytes
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    // A panic cannot happen while the lock is held (no allocation, no indexing out of bounds),
    // but a poisoned cache is still consistent: take it.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mappings taken out of the cache, unmapped after its lock is released.
struct Evicted {
    slots: [(usize, usize); SLOTS],
    used: usize,
}

impl Evicted {
    fn none() -> Evicted {
        Evicted {
            slots: [(0, 0); SLOTS],
            used: 0,
        }
    }

    fn unmap(&self) {
        for &(len, addr) in &self.slots[..self.used] {
            unmap(addr as *mut u8, len);
        }
    }
}

impl Cache {
    /// Take out a mapping of exactly `len` bytes, the most recently freed first.
    fn take(&mut self, len: usize) -> Option<*mut u8> {
        let i = (0..self.used).rev().find(|&i| self.slots[i].0 == len)?;
        let addr = self.slots[i].1;
        self.slots.copy_within(i + 1..self.used, i);
        self.used -= 1;
        self.bytes -= len;
        Some(addr as *mut u8)
    }

    /// Keep a freed mapping; `false` when it does not fit (the caller unmaps it). Older
    /// mappings make room for it.
    fn keep(&mut self, len: usize, addr: *mut u8, cap: usize) -> (bool, Evicted) {
        if len > cap {
            return (false, Evicted::none());
        }
        let mut evicted = self.evict_to(cap - len);
        if self.used == SLOTS {
            evicted.slots[evicted.used] = self.slots[0];
            evicted.used += 1;
            self.bytes -= self.slots[0].0;
            self.slots.copy_within(1.., 0);
            self.used -= 1;
        }
        self.slots[self.used] = (len, addr as usize);
        self.used += 1;
        self.bytes += len;
        (true, evicted)
    }

    /// Take out the oldest mappings until at most `bytes` are held.
    fn evict_to(&mut self, bytes: usize) -> Evicted {
        let mut out = Evicted::none();
        let mut n = 0;
        while self.bytes > bytes && n < self.used {
            out.slots[n] = self.slots[n];
            self.bytes -= self.slots[n].0;
            n += 1;
        }
        self.slots.copy_within(n..self.used, 0);
        self.used -= n;
        out.used = n;
        out
    }
}

fn mapped(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= MAPPED_MIN && layout.align() <= PAGE
}

fn page_len(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

/// A block of `size` bytes, zeroed if `zeroed`: from the cache, or a fresh mapping.
fn map_block(size: usize, zeroed: bool) -> *mut u8 {
    let len = page_len(size);
    // Taken on its own line: the lock is released before the block is zeroed.
    let cached = lock().take(len);
    if let Some(p) = cached {
        LIVE.fetch_add(len, Ordering::Relaxed);
        if zeroed {
            // SAFETY: the cached mapping is `len >= size` bytes, readable and writable.
            unsafe { std::ptr::write_bytes(p, 0, size) };
        }
        return p;
    }
    let p = map(len);
    if !p.is_null() {
        LIVE.fetch_add(len, Ordering::Relaxed);
    }
    p
}

fn free_block(p: *mut u8, size: usize) {
    let len = page_len(size);
    LIVE.fetch_sub(len, Ordering::Relaxed);
    let (kept, evicted) = lock().keep(len, p, CAP.load(Ordering::Relaxed));
    evicted.unmap();
    if !kept {
        unmap(p, len);
    }
}

#[cfg(target_os = "linux")]
fn map(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p as *mut u8
    }
}

#[cfg(target_os = "linux")]
fn unmap(p: *mut u8, len: usize) {
    // SAFETY: `p..p + len` is a mapping of this module's that nothing refers to any more.
    unsafe { libc::munmap(p as *mut libc::c_void, len) };
}

#[cfg(target_os = "linux")]
fn remap(p: *mut u8, old: usize, new: usize) -> *mut u8 {
    // SAFETY: `p..p + old` is a live mapping of this module's; on failure it stays as it was.
    let q = unsafe { libc::mremap(p as *mut libc::c_void, old, new, libc::MREMAP_MAYMOVE) };
    if q == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        q as *mut u8
    }
}

#[cfg(not(target_os = "linux"))]
fn map(_: usize) -> *mut u8 {
    unreachable!("mapped blocks are Linux only")
}

#[cfg(not(target_os = "linux"))]
fn unmap(_: *mut u8, _: usize) {}

#[cfg(not(target_os = "linux"))]
fn remap(_: *mut u8, _: usize, _: usize) -> *mut u8 {
    unreachable!("mapped blocks are Linux only")
}

// SAFETY: mapped blocks are page aligned (`mapped` admits alignments up to a page) and at least
// `size` bytes; the rest is the system allocator's. A block is freed by the path that allocated
// it: both decide by its layout alone, which the caller passes back unchanged.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            map_block(layout.size(), false)
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            map_block(layout.size(), true)
        } else {
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if mapped(layout) {
            free_block(p, layout.size());
        } else {
            // SAFETY: as above.
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with the same alignment.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(layout), mapped(new)) {
            // SAFETY: as above.
            (false, false) => unsafe { System.realloc(p, layout, new_size) },
            (true, true) => {
                let (old_len, new_len) = (page_len(layout.size()), page_len(new_size));
                if old_len == new_len {
                    return p;
                }
                let q = remap(p, old_len, new_len);
                if !q.is_null() {
                    LIVE.fetch_add(new_len, Ordering::Relaxed);
                    LIVE.fetch_sub(old_len, Ordering::Relaxed);
                }
                q
            }
            _ => {
                // SAFETY: `new` is a valid layout (above); the old block is `layout.size()` long
                // and freed by its own path once copied.
                unsafe {
                    let q = self.alloc(new);
                    if !q.is_null() {
                        std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed block's mapping serves the next block of its size (zeroed when asked), only up to
    /// the cap, and draining empties the cache. The global allocator is this one in tests too,
    /// and other tests run beside this one: only relations robust to their blocks are checked.
    #[test]
    #[cfg(target_os = "linux")]
    fn freed_mappings_are_reused_up_to_the_cap() {
        let a = Allocator;
        let size = 3 * MAPPED_MIN + 5;
        let layout = Layout::from_size_align(size, 64).unwrap();
        let mut cache = Cache {
            slots: [(0, 0); SLOTS],
            used: 0,
            bytes: 0,
        };
        let len = page_len(size);
        // The cache logic on its own: a fit, the oldest evicted for a newer one, a miss.
        let (kept, ev) = cache.keep(len, 0x1000 as *mut u8, 2 * len);
        assert!(kept && ev.used == 0);
        let (kept, ev) = cache.keep(len, 0x2000 as *mut u8, len);
        assert!(kept && ev.used == 1 && ev.slots[0].1 == 0x1000);
        assert_eq!(cache.take(len + PAGE), None);
        assert_eq!(cache.take(len), Some(0x2000 as *mut u8));
        assert_eq!((cache.used, cache.bytes), (0, 0));
        let (kept, _) = cache.keep(len, 0x3000 as *mut u8, len - 1);
        assert!(!kept);
        // Through the allocator: a block written, freed, and asked for again zeroed.
        // SAFETY: blocks of a valid layout, written within their size, freed once.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null() && (p as usize).is_multiple_of(PAGE));
            std::ptr::write_bytes(p, 7, size);
            let q = a.realloc(p, layout, size + 10 * PAGE);
            assert_eq!(*q.add(size - 1), 7);
            let grown = Layout::from_size_align(size + 10 * PAGE, 64).unwrap();
            let r = a.realloc(q, grown, 100);
            assert_eq!(*r, 7);
            a.dealloc(r, Layout::from_size_align(100, 64).unwrap());
            let z = a.alloc_zeroed(layout);
            assert!((0..size).all(|i| *z.add(i) == 0));
            a.dealloc(z, layout);
        }
        drain();
        assert_eq!(cached_bytes(), 0);
    }
}
