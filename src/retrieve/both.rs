//! Two pieces of blocking work side by side, without waiting on a thread that is slow to start.
//!
//! [`both`] runs the first piece on the calling thread and offers the second to tokio's blocking
//! pool; when no pool thread has taken it by the time the first is done, the caller runs it as
//! well. Handing work to a sleeping thread costs a wake-up (20-30 us on this project's 2-vCPU
//! VM, over 200 us once the other vCPU has idled a few milliseconds), so a search that waited
//! for one could be slower than doing both pieces in turn; with the offer it is never much
//! slower than that, and side by side whenever the other core is quick to answer.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// `(first(), second())`, `first` on this thread, `second` on whichever thread gets to it first
/// (a blocking-pool thread or, after `first`, this one). A panic in either reaches the caller.
/// Outside a tokio runtime both run here, one after the other.
pub(crate) fn both<A, B>(
    first: impl FnOnce() -> A,
    second: impl FnOnce() -> B + Send + 'static,
) -> (A, B)
where
    B: Send + 'static,
{
    let offer = Arc::new(Offer {
        slot: Mutex::new(Slot::Offered(Box::new(second))),
        done: Condvar::new(),
    });
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let helper = Arc::clone(&offer);
        // Nothing awaits this task: the result comes back through the offer.
        drop(runtime.spawn_blocking(move || helper.run_if_offered()));
    }
    let a = first();
    let b = match offer.take() {
        Some(second) => second(),
        None => offer
            .wait()
            .unwrap_or_else(|payload| panic::resume_unwind(payload)),
    };
    (a, b)
}

/// The second piece of work and, once a helper has run it, its outcome.
struct Offer<B> {
    slot: Mutex<Slot<B>>,
    done: Condvar,
}

enum Slot<B> {
    Offered(Box<dyn FnOnce() -> B + Send>),
    Running,
    Done(std::thread::Result<B>),
}

impl<B> Offer<B> {
    /// The slot (no code runs under its lock, so a poisoned lock holds nothing half-done).
    fn slot(&self) -> MutexGuard<'_, Slot<B>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The work, unless someone took it already.
    fn take(&self) -> Option<Box<dyn FnOnce() -> B + Send>> {
        let mut slot = self.slot();
        match std::mem::replace(&mut *slot, Slot::Running) {
            Slot::Offered(work) => Some(work),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// A helper's part: run the work if it is still on offer, and leave its outcome.
    fn run_if_offered(&self) {
        if let Some(work) = self.take() {
            let outcome = panic::catch_unwind(AssertUnwindSafe(work));
            *self.slot() = Slot::Done(outcome);
            self.done.notify_one();
        }
    }

    /// The outcome of the work a helper took.
    fn wait(&self) -> std::thread::Result<B> {
        let mut slot = self.slot();
        loop {
            match std::mem::replace(&mut *slot, Slot::Running) {
                Slot::Done(outcome) => return outcome,
                other => *slot = other,
            }
            slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn outside_a_runtime_both_run_here_in_turn() {
        let here = std::thread::current().id();
        let (a, b) = both(|| 1, move || std::thread::current().id() == here);
        assert_eq!(a, 1);
        assert!(b, "no pool to offer the second piece to");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_piece_runs_once_and_a_helper_takes_the_second_while_the_first_is_long() {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut elsewhere = 0;
        for _ in 0..20 {
            let counted = Arc::clone(&runs);
            let (caller, helper) = tokio::task::spawn_blocking(move || {
                both(
                    || {
                        std::thread::sleep(Duration::from_millis(20));
                        std::thread::current().id()
                    },
                    move || {
                        counted.fetch_add(1, Ordering::SeqCst);
                        std::thread::current().id()
                    },
                )
            })
            .await
            .unwrap();
            elsewhere += usize::from(caller != helper);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 20);
        assert!(
            elsewhere > 0,
            "20 ms is ample time for a pool thread to start"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_helper_reaches_the_caller() {
        let outcome = tokio::task::spawn_blocking(|| {
            both(
                || std::thread::sleep(Duration::from_millis(50)),
                || panic!("second piece failed"),
            )
        })
        .await;
        let payload = outcome.unwrap_err().into_panic();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"second piece failed"));
    }
}
