//! Key scheduling: the per-key queues, the deliveries the pool holds, and backpressure per
//! key. The dispatcher and the workers change this state only through [`Schedule`]'s
//! methods; the decisions it returns (start, schedule, pause, resume) are theirs to act on,
//! except pause and resume, which it sends to the partition control itself so that they
//! reach the broker in the order the counts changed.
//!
//! A key with queued or running work is *scheduled*: it has an entry in `keys`, and its name
//! is in the ready queue or a worker (or an inline start) runs it. A key without work has no
//! entry, so idle keys cost nothing.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::codec::DecodeError;
use crate::envelope::Envelope;
use crate::message::Position;
use crate::transport::{Acker, Delivery, PartitionControl};

/// The routing key: the aggregate id, borrowed from the decoded envelope (no allocation),
/// or the raw key of a message that could not be decoded. Hashes and compares as the text.
#[derive(Clone)]
pub(super) enum Key {
    Envelope(Arc<Envelope>),
    Raw(Arc<str>),
}

impl Key {
    pub(super) fn as_str(&self) -> &str {
        match self {
            Self::Envelope(e) => &e.aggregate_id,
            Self::Raw(k) => k,
        }
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Key {}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A delivery on its way through the pool, holding one of the `max_in_flight` permits.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    pub(super) decoded: Result<Arc<Envelope>, DecodeError>,
    pub(super) key: Key,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// A held delivery: its position under the ownership epoch it was delivered in. A
/// redelivery of the same position under a new epoch is a new delivery, not a duplicate.
pub(super) type HeldId = (Position, u64);

impl Item {
    pub(super) fn id(&self) -> HeldId {
        (self.delivery.position(), self.delivery.epoch)
    }
}

#[derive(Default)]
struct KeyQueue {
    items: VecDeque<Item>,
    over_cap: bool,
}

/// What the pool remembers of a delivery it holds (queued or running).
pub(super) struct Held {
    acker: Arc<dyn Acker>,
    since: Instant,
    started: bool,
    parked: bool,
}

/// How a held delivery ended when the pool stopped with it still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Left {
    /// Never started.
    Queued,
    /// Started, waiting for a dead-letter publish to succeed.
    Parked,
    /// Started and cut off.
    Running,
}

impl Held {
    pub(super) fn left(&self) -> Left {
        match (self.started, self.parked) {
            (false, _) => Left::Queued,
            (true, true) => Left::Parked,
            (true, false) => Left::Running,
        }
    }

    pub(super) fn acker(&self) -> &Arc<dyn Acker> {
        &self.acker
    }
}

/// What [`Schedule::admit`] decided for a new delivery.
// Moved once per delivery and never stored: boxing the item would cost an allocation on the
// hot path for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admitted {
    /// The same position under the same epoch is held already: dropped.
    Duplicate(Position),
    /// The key was idle: it is scheduled now and the caller starts the item at once with
    /// the running slot it offered.
    Start(Item, OwnedSemaphorePermit),
    /// Queued behind the key's earlier work; `schedule` is the key to put in the ready
    /// queue when it had no work before.
    Queued { schedule: Option<Key> },
}

/// What [`Schedule::take`] hands a worker.
pub(super) struct Taken {
    pub(super) item: Item,
    /// The key's backlog was at `max_per_key` before: a dispatcher waiting for space (no
    /// partition control) may go on.
    pub(super) made_space: bool,
}

/// What [`Schedule::finish`] found.
pub(super) struct Finished {
    /// The key has more queued work.
    pub(super) more: bool,
    /// Nothing is held any more.
    pub(super) empty: bool,
}

/// The per-key queues and the held deliveries. See the module docs.
pub(super) struct Schedule {
    keys: HashMap<Key, KeyQueue>,
    held: HashMap<HeldId, Held>,
    /// Keys over their cap per partition; the partition is paused while this is above 0.
    paused: HashMap<u32, usize>,
    peak: usize,
    max_per_key: usize,
    control: Option<Arc<dyn PartitionControl>>,
}

impl Schedule {
    /// Backpressure per key pauses partitions through `control` when there is one.
    pub(super) fn new(max_per_key: usize, control: Option<Arc<dyn PartitionControl>>) -> Self {
        Self {
            keys: HashMap::new(),
            held: HashMap::new(),
            paused: HashMap::new(),
            peak: 0,
            max_per_key,
            control,
        }
    }

    /// Takes a new delivery. Given a running `slot`, when the key has no queued or running
    /// work and the delivery decoded, the key is scheduled and the item comes back with the
    /// slot for the caller to start at once. A key whose backlog reaches `max_per_key`
    /// pauses its partition (with partition control).
    pub(super) fn admit(&mut self, item: Item, slot: Option<OwnedSemaphorePermit>) -> Admitted {
        let id = item.id();
        if self.held.contains_key(&id) {
            return Admitted::Duplicate(id.0);
        }
        let partition = id.0.partition;
        let slot = slot.filter(|_| item.decoded.is_ok());
        self.held.insert(
            id,
            Held {
                acker: item.delivery.acker().clone(),
                since: Instant::now(),
                started: false,
                parked: false,
            },
        );
        self.peak = self.peak.max(self.held.len());
        if let Some(slot) = slot.filter(|_| !self.keys.contains_key(&item.key)) {
            self.keys.insert(item.key.clone(), KeyQueue::default());
            if let Some(h) = self.held.get_mut(&id) {
                h.started = true;
            }
            return Admitted::Start(item, slot);
        }
        let cap = self.max_per_key;
        let mut pause = false;
        let mut schedule = None;
        match self.keys.get_mut(&item.key) {
            Some(q) => {
                q.items.push_back(item);
                if q.items.len() >= cap && !q.over_cap && self.control.is_some() {
                    q.over_cap = true;
                    pause = true;
                }
            }
            None => {
                let key = item.key.clone();
                let mut queue = KeyQueue::default();
                queue.items.push_back(item);
                self.keys.insert(key.clone(), queue);
                schedule = Some(key);
            }
        }
        if pause {
            let n = self.paused.entry(partition).or_insert(0);
            *n += 1;
            if *n == 1
                && let Some(c) = &self.control
            {
                c.pause(partition);
            }
        }
        Admitted::Queued { schedule }
    }

    /// Puts back an item the caller meant to start itself: its key is scheduled already
    /// (by [`Schedule::admit`]), so the item goes first in the key's queue. Returns the key
    /// to put in the ready queue.
    pub(super) fn put_back(&mut self, item: Item) -> Key {
        if let Some(h) = self.held.get_mut(&item.id()) {
            h.started = false;
        }
        let key = item.key.clone();
        self.keys
            .entry(key.clone())
            .or_default()
            .items
            .push_front(item);
        key
    }

    /// The next item of `key`, or `None` (and the key unscheduled) when its queue is empty.
    /// A key whose backlog fell to half its cap resumes its partition.
    pub(super) fn take(&mut self, key: &Key) -> Option<Taken> {
        let q = self.keys.get_mut(key)?;
        let Some(item) = q.items.pop_front() else {
            self.keys.remove(key);
            return None;
        };
        let cap = self.max_per_key;
        if q.over_cap && q.items.len() <= cap / 2 {
            q.over_cap = false;
            let partition = item.delivery.position().partition;
            if let Some(n) = self.paused.get_mut(&partition) {
                *n -= 1;
                if *n == 0 {
                    self.paused.remove(&partition);
                    if let Some(c) = &self.control {
                        c.resume(partition);
                    }
                }
            }
        }
        let was_full = q.items.len() + 1 >= cap;
        if let Some(h) = self.held.get_mut(&item.id()) {
            h.started = true;
        }
        Some(Taken {
            item,
            made_space: was_full,
        })
    }

    /// An item of `key` ended: it is no longer held; the key stays scheduled if it has more
    /// work, else it is unscheduled.
    pub(super) fn finish(&mut self, id: &HeldId, key: &Key) -> Finished {
        self.held.remove(id);
        let more = match self.keys.get(key) {
            Some(q) if q.items.is_empty() => {
                self.keys.remove(key);
                false
            }
            Some(_) => true,
            None => false,
        };
        Finished {
            more,
            empty: self.held.is_empty(),
        }
    }

    /// How many deliveries of `key` are queued.
    pub(super) fn backlog(&self, key: &Key) -> usize {
        self.keys.get(key).map_or(0, |q| q.items.len())
    }

    /// Whether `key`'s backlog is at its cap (the dispatcher waits without partition
    /// control).
    pub(super) fn is_full(&self, key: &Key) -> bool {
        self.backlog(key) >= self.max_per_key
    }

    /// Removes the queued, never-started deliveries of `partition` and forgets its pauses
    /// (a new assignment starts unpaused). Returns them; they are no longer held.
    pub(super) fn drop_partition(&mut self, partition: u32) -> Vec<Item> {
        let mut dropped = Vec::new();
        for q in self.keys.values_mut() {
            let before = dropped.len();
            let mut i = 0;
            while i < q.items.len() {
                if q.items[i].delivery.position().partition == partition {
                    if let Some(item) = q.items.remove(i) {
                        dropped.push(item);
                    }
                } else {
                    i += 1;
                }
            }
            if dropped.len() > before {
                q.over_cap = false;
            }
        }
        self.paused.remove(&partition);
        for item in &dropped {
            self.held.remove(&item.id());
        }
        dropped
    }

    /// Marks a held delivery as waiting for its dead letter (or not any more).
    pub(super) fn set_parked(&mut self, id: &HeldId, parked: bool) {
        if let Some(h) = self.held.get_mut(id) {
            h.parked = parked;
        }
    }

    /// The ackers of held deliveries whose last progress signal is `every` old, their clocks
    /// restarted.
    pub(super) fn due_progress(&mut self, now: Instant, every: Duration) -> Vec<Arc<dyn Acker>> {
        self.held
            .values_mut()
            .filter(|h| now.duration_since(h.since) >= every)
            .map(|h| {
                h.since = now;
                h.acker.clone()
            })
            .collect()
    }

    /// Empties the schedule: the queued items and everything held.
    pub(super) fn take_all(&mut self) -> (Vec<Item>, Vec<Held>) {
        let queued = self
            .keys
            .drain()
            .flat_map(|(_, q)| q.items.into_iter())
            .collect();
        (queued, self.held.drain().map(|(_, h)| h).collect())
    }

    /// How many deliveries are held.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// The most deliveries held at once.
    pub(super) fn peak(&self) -> usize {
        self.peak
    }

    /// Whether a delivery of `partition` is held.
    pub(super) fn holds_partition(&self, partition: u32) -> bool {
        self.held.keys().any(|(pos, _)| pos.partition == partition)
    }
}
