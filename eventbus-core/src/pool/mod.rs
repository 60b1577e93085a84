//! The keyed worker pool: per-aggregate order, parallelism across aggregates, bounded
//! buffering with backpressure, in-place retry, dead letter, deadline extension and
//! graceful drain.
//!
//! Design (see `docs/architecture.md`):
//! - A dispatcher task pulls deliveries only while fewer than `max_in_flight` are held, decodes
//!   them and appends each to its key's queue. A key with a queue is *scheduled*: its name is
//!   in the ready queue or a worker is running it. A key without queued work has no entry
//!   (idle keys cost nothing).
//! - `max_concurrency` workers take scheduled keys from one shared ready queue and run the
//!   key's events one at a time, in arrival order. There is no fixed key-to-worker mapping,
//!   so a slow or retrying key occupies one worker and stalls no other key.
//! - A key whose backlog reaches `max_per_key` gets its later deliveries deferred: they give
//!   their in-flight permit back and take one of `max_deferred` slots, kept as position and
//!   acknowledgement handle when the backend can read them again ([`Reread`]), and are read
//!   again when the key's turn comes. A slow aggregate never holds up the others; only the
//!   two bounds stop pulling, for every partition alike.
//! - A failed attempt is retried in place (later events of the key wait), then dead-lettered
//!   with reason headers, then acknowledged. A dead-letter publish that fails is retried and
//!   the key stays parked: nothing is acknowledged that was neither handled nor dead-lettered.
//! - A ticker sends progress signals for every held delivery so that the broker does not
//!   redeliver work that waits behind a slow key; a redelivery of a held message is dropped.
//!
//! Files: `lifecycle.rs` starts and stops the pool; `dispatch.rs` pulls deliveries, admits them
//! and starts handlers inline; `keys.rs` is the key scheduling state; `worker.rs` runs scheduled
//! keys; `attempt.rs` runs one event's attempts with in-place retry; `settle.rs` acknowledges or
//! dead-letters; `ticker.rs` sends progress signals; `group.rs` follows partition ownership;
//! `stats.rs` counts.

mod attempt;
mod dispatch;
mod group;
mod keys;
mod lifecycle;
mod settle;
mod stats;
mod ticker;
mod types;
mod worker;

pub(crate) use lifecycle::Pool;
pub(crate) use stats::LastCounts;
pub use types::*;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::keys::{Key, Schedule};
use crate::handler::BoxEventHandler;
use crate::retry::Backoff;
use crate::topic::Topic;
use crate::transport::{GroupControl, Reread};

#[derive(Debug, Clone, Copy)]
struct Part {
    state: PartitionState,
    epoch: u64,
}

/// The pool's mutable state, behind one lock: the key schedule and, in a consumer group,
/// the partitions this member knows of.
struct State {
    sched: Schedule,
    /// Consumer groups only: the partitions this member knows of. Without a group every
    /// partition is owned.
    grouped: bool,
    parts: HashMap<u32, Part>,
}

impl State {
    /// Whether a new delivery of `partition` under `epoch` may be handled.
    fn accepts(&self, partition: u32, epoch: u64) -> bool {
        !self.grouped || self.part_is(partition, epoch, PartitionState::Active)
    }

    /// Whether a started delivery may run another attempt or be acknowledged.
    fn owns(&self, partition: u32, epoch: u64) -> bool {
        !self.grouped
            || self.parts.get(&partition).is_some_and(|p| {
                p.epoch == epoch
                    && matches!(p.state, PartitionState::Active | PartitionState::Draining)
            })
    }

    fn part_is(&self, partition: u32, epoch: u64, state: PartitionState) -> bool {
        self.parts
            .get(&partition)
            .is_some_and(|p| p.epoch == epoch && p.state == state)
    }

    fn part_epoch_is(&self, partition: u32, epoch: u64) -> bool {
        self.parts.get(&partition).is_some_and(|p| p.epoch == epoch)
    }

    fn draining(&self) -> bool {
        self.parts
            .values()
            .any(|p| p.state == PartitionState::Draining)
    }
}

/// Everything the pool's tasks share.
pub(crate) struct PoolParams {
    pub(crate) topic: Topic,
    pub(crate) dead_letter_topic: Topic,
    pub(crate) handler: BoxEventHandler,
    /// The bus's publish pipeline, for dead letters.
    pub(crate) pipeline: crate::pipeline::Pipeline<crate::pipeline::domain::DomainSink>,
    pub(crate) config: PoolConfig,
    pub(crate) retry: Backoff,
    pub(crate) observer: Option<Arc<dyn PoolObserver>>,
}

struct Shared {
    p: PoolParams,
    reread: Option<Arc<dyn Reread>>,
    group: Option<Arc<dyn GroupControl>>,
    state: Mutex<State>,
    ready_tx: async_channel::Sender<Key>,
    ready_rx: async_channel::Receiver<Key>,
    /// One per delivery held whole (`max_in_flight`).
    permits: Arc<Semaphore>,
    /// One per deferred delivery held (`max_deferred`).
    deferred: Arc<Semaphore>,
    /// One per running handler (at most `max_concurrency`): a worker holds one while it
    /// runs a key, an event started inline holds one until it ends.
    running: Arc<Semaphore>,
    /// Events started inline whose handlers did not finish at once.
    continuations: TaskTracker,
    counters: Arc<stats::Counters>,
    idle: Notify,
    stop_pulling: CancellationToken,
    hard_stop: CancellationToken,
}

/// Tells the observer, if any. An observer that panics loses that event and nothing else.
fn observe(sh: &Shared, event: &PoolEvent<'_>) {
    if let Some(o) = &sh.p.observer
        && std::panic::catch_unwind(AssertUnwindSafe(|| o.on_event(event))).is_err()
    {
        tracing::error!(topic = %sh.p.topic, "the pool observer panicked; the event is ignored");
    }
}
