//! The pool's counters and their snapshot ([`PoolStats`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::PoolStats;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) handled: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) unreadable: AtomicU64,
    pub(super) dead_letters_reduced: AtomicU64,
    pub(super) dead_letters_refused: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) ack_failures: AtomicU64,
    pub(super) duplicates_dropped: AtomicU64,
    pub(super) dead_letter_failures: AtomicU64,
    pub(super) finished: AtomicU64,
    pub(super) transport_errors: AtomicU64,
    pub(super) stale_dropped: AtomicU64,
    pub(super) stale_acks: AtomicU64,
    pub(super) reread: AtomicU64,
    pub(super) partitions_acquired: AtomicU64,
    pub(super) partitions_released: AtomicU64,
    pub(super) partitions_lost: AtomicU64,
}

/// How many deliveries the pool holds, whole and deferred, now and at most.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Held {
    pub(super) whole: usize,
    pub(super) peak_whole: usize,
    pub(super) deferred: usize,
    pub(super) peak_deferred: usize,
}

impl Held {
    /// One more delivery held, `deferred` or whole.
    pub(super) fn add(&mut self, deferred: bool) {
        if deferred {
            self.deferred += 1;
            self.peak_deferred = self.peak_deferred.max(self.deferred);
        } else {
            self.whole += 1;
            self.peak_whole = self.peak_whole.max(self.whole);
        }
    }

    /// One delivery, `deferred` or whole, no longer held.
    pub(super) fn remove(&mut self, deferred: bool) {
        if deferred {
            self.deferred = self.deferred.saturating_sub(1);
        } else {
            self.whole = self.whole.saturating_sub(1);
        }
    }
}

/// A pool's counters, kept by whoever reports on the pool after it stopped.
pub(crate) struct LastCounts(pub(super) std::sync::Arc<Counters>);

impl LastCounts {
    /// The counters now, with nothing held.
    pub(crate) fn stats(&self) -> PoolStats {
        self.0.snapshot(Held::default())
    }
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// A snapshot, with the held deliveries counted by the caller.
    pub(super) fn snapshot(&self, held: Held) -> PoolStats {
        PoolStats {
            received: self.received.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            unreadable: self.unreadable.load(Ordering::Relaxed),
            dead_letters_reduced: self.dead_letters_reduced.load(Ordering::Relaxed),
            dead_letters_refused: self.dead_letters_refused.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            ack_failures: self.ack_failures.load(Ordering::Relaxed),
            duplicates_dropped: self.duplicates_dropped.load(Ordering::Relaxed),
            dead_letter_failures: self.dead_letter_failures.load(Ordering::Relaxed),
            in_flight: held.whole as u64,
            peak_in_flight: held.peak_whole as u64,
            deferred: held.deferred as u64,
            peak_deferred: held.peak_deferred as u64,
            reread: self.reread.load(Ordering::Relaxed),
            transport_errors: self.transport_errors.load(Ordering::Relaxed),
            stale_dropped: self.stale_dropped.load(Ordering::Relaxed),
            stale_acks: self.stale_acks.load(Ordering::Relaxed),
            partitions_acquired: self.partitions_acquired.load(Ordering::Relaxed),
            partitions_released: self.partitions_released.load(Ordering::Relaxed),
            partitions_lost: self.partitions_lost.load(Ordering::Relaxed),
        }
    }

    /// Deliveries that ended (handled, dead-lettered, or stopped for good).
    pub(super) fn finished(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }
}
