//! Key scheduling: the per-key queues and the deliveries the pool holds. The dispatcher and
//! the workers change this state only through [`Schedule`]'s methods; the decisions it
//! returns (start, schedule, defer) are theirs to act on.
//!
//! A key with queued or running work is *scheduled*: it has an entry in `keys`, and its name
//! is in the ready queue or a worker (or an inline start) runs it. A key without work has no
//! entry, so idle keys cost nothing.
//!
//! A key whose queue reaches `max_per_key` gets its later deliveries *deferred*: they hold a
//! deferred slot instead of an in-flight permit, so the aggregate never takes the buffer
//! from the others, and they are kept without their body ([`Thin`]) when the backend can
//! read them again by position. Order holds because they queue behind the key's earlier
//! work like any other entry.

use std::collections::{HashMap, VecDeque, hash_map};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::stats;
use crate::codec::DecodeError;
use crate::envelope::Envelope;
use crate::message::Position;
use crate::transport::{Acker, Delivery, Reread};

/// The routing key: the aggregate id, borrowed from the decoded envelope (no allocation),
/// or the raw key of a message that could not be decoded (or is kept without its body).
/// Hashes and compares as the text.
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

    /// The same key without a reference to the envelope (which holds the body).
    fn detached(&self) -> Self {
        match self {
            Self::Envelope(e) => Self::Raw(Arc::from(e.aggregate_id.as_str())),
            Self::Raw(k) => Self::Raw(k.clone()),
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

/// A delivery on its way through the pool with its body, holding one of the
/// `max_in_flight` permits (or, deferred, one of the `max_deferred` slots).
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

/// A deferred delivery kept without its body: what it takes to read it again, handle it
/// and acknowledge it. It holds one of the `max_deferred` slots.
pub(super) struct Thin {
    pub(super) position: Position,
    pub(super) epoch: u64,
    pub(super) delivery_count: u32,
    pub(super) acker: Arc<dyn Acker>,
    pub(super) key: Key,
    pub(super) permit: OwnedSemaphorePermit,
    /// Where its body is read again.
    pub(super) reread: Arc<dyn Reread>,
}

impl Thin {
    /// Keeps `delivery` without its body, to be read again through `reread`.
    pub(super) fn new(
        delivery: Delivery,
        key: &Key,
        permit: OwnedSemaphorePermit,
        reread: Arc<dyn Reread>,
    ) -> Self {
        Self {
            reread,
            position: delivery.position(),
            epoch: delivery.epoch,
            delivery_count: delivery.delivery_count,
            acker: delivery.acker().clone(),
            key: key.detached(),
            permit,
        }
    }
}

/// What a key's queue holds.
pub(super) enum Entry {
    Whole(Item),
    Thin(Thin),
}

impl Entry {
    pub(super) fn id(&self) -> HeldId {
        match self {
            Self::Whole(i) => i.id(),
            Self::Thin(t) => (t.position, t.epoch),
        }
    }

    fn key(&self) -> &Key {
        match self {
            Self::Whole(i) => &i.key,
            Self::Thin(t) => &t.key,
        }
    }

    fn acker(&self) -> &Arc<dyn Acker> {
        match self {
            Self::Whole(i) => i.delivery.acker(),
            Self::Thin(t) => &t.acker,
        }
    }

    /// Gives the delivery back to the broker at once (shutdown).
    pub(super) async fn release(&self) {
        let _ = self.acker().release(Duration::ZERO).await;
    }
}

/// What the pool remembers of a delivery it holds (queued or running).
pub(super) struct Held {
    acker: Arc<dyn Acker>,
    since: Instant,
    started: bool,
    parked: bool,
    deferred: bool,
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
    fn new(acker: &Arc<dyn Acker>, started: bool, deferred: bool) -> Self {
        Self {
            acker: acker.clone(),
            since: Instant::now(),
            started,
            parked: false,
            deferred,
        }
    }

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
    /// Not taken: the key's queue is at `max_per_key`, the caller defers the item.
    OverCap(Item),
}

/// What [`Schedule::admit_deferred`] decided for a deferred delivery: the same as
/// [`Admitted`] without the two outcomes a deferred entry cannot have (it never starts at
/// once and is never over the cap).
pub(super) enum AdmittedDeferred {
    /// The same position under the same epoch is held already: dropped.
    Duplicate(Position),
    /// Queued behind the key's earlier work; `schedule` as in [`Admitted::Queued`].
    Queued { schedule: Option<Key> },
}

/// What [`Schedule::finish`] found.
pub(super) struct Finished {
    /// The key has more queued work.
    pub(super) more: bool,
    /// Nothing is held any more.
    pub(super) empty: bool,
}

/// Queues `entry` last in its key's queue `q`. Returns the key when it had no work before:
/// the caller puts it in the ready queue.
fn enqueue(q: hash_map::Entry<'_, Key, VecDeque<Entry>>, entry: Entry) -> Option<Key> {
    match q {
        hash_map::Entry::Occupied(mut q) => {
            q.get_mut().push_back(entry);
            None
        }
        hash_map::Entry::Vacant(q) => {
            let key = q.key().clone();
            q.insert(VecDeque::from([entry]));
            Some(key)
        }
    }
}

/// The per-key queues and the held deliveries. See the module docs.
pub(super) struct Schedule {
    keys: HashMap<Key, VecDeque<Entry>>,
    held: HashMap<HeldId, Held>,
    counts: stats::Held,
    max_per_key: usize,
}

impl Schedule {
    pub(super) fn new(max_per_key: usize) -> Self {
        Self {
            keys: HashMap::new(),
            held: HashMap::new(),
            counts: stats::Held::default(),
            max_per_key,
        }
    }

    /// Takes a new delivery. Given a running `slot`, when the key has no queued or running
    /// work and the delivery decoded, the key is scheduled and the item comes back with the
    /// slot for the caller to start at once. A delivery of a key whose queue is at
    /// `max_per_key` comes back to be deferred ([`Schedule::admit_deferred`]). One lookup
    /// in each map: this runs for every delivery.
    pub(super) fn admit(&mut self, item: Item, slot: Option<OwnedSemaphorePermit>) -> Admitted {
        let Self {
            keys,
            held,
            counts,
            max_per_key,
        } = self;
        let id = item.id();
        let held = match held.entry(id) {
            hash_map::Entry::Occupied(_) => return Admitted::Duplicate(id.0),
            hash_map::Entry::Vacant(v) => v,
        };
        match keys.entry(item.key.clone()) {
            hash_map::Entry::Occupied(q) => {
                if q.get().len() >= *max_per_key {
                    return Admitted::OverCap(item);
                }
                held.insert(Held::new(item.delivery.acker(), false, false));
                counts.add(false);
                let schedule = enqueue(hash_map::Entry::Occupied(q), Entry::Whole(item));
                Admitted::Queued { schedule }
            }
            hash_map::Entry::Vacant(q) => {
                let start = slot.filter(|_| item.decoded.is_ok());
                held.insert(Held::new(item.delivery.acker(), start.is_some(), false));
                counts.add(false);
                match start {
                    Some(slot) => {
                        q.insert(VecDeque::new());
                        Admitted::Start(item, slot)
                    }
                    None => Admitted::Queued {
                        schedule: enqueue(hash_map::Entry::Vacant(q), Entry::Whole(item)),
                    },
                }
            }
        }
    }

    /// Takes a deferred delivery (holding a deferred slot): queued behind its key's work,
    /// whatever the queue's length.
    pub(super) fn admit_deferred(&mut self, entry: Entry) -> AdmittedDeferred {
        let id = entry.id();
        match self.held.entry(id) {
            hash_map::Entry::Occupied(_) => return AdmittedDeferred::Duplicate(id.0),
            hash_map::Entry::Vacant(v) => {
                v.insert(Held::new(entry.acker(), false, true));
            }
        }
        self.counts.add(true);
        let schedule = enqueue(self.keys.entry(entry.key().clone()), entry);
        AdmittedDeferred::Queued { schedule }
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
            .push_front(Entry::Whole(item));
        key
    }

    /// The next entry of `key`, or `None` (and the key unscheduled) when its queue is empty.
    pub(super) fn take(&mut self, key: &Key) -> Option<Entry> {
        let q = self.keys.get_mut(key)?;
        let Some(entry) = q.pop_front() else {
            self.keys.remove(key);
            return None;
        };
        if let Some(h) = self.held.get_mut(&entry.id()) {
            h.started = true;
        }
        Some(entry)
    }

    /// A delivery of `key` ended: it is no longer held; the key stays scheduled if it has
    /// more work, else it is unscheduled.
    pub(super) fn finish(&mut self, id: &HeldId, key: &Key) -> Finished {
        self.forget(id);
        let more = match self.keys.get(key) {
            Some(q) if q.is_empty() => {
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

    fn forget(&mut self, id: &HeldId) {
        if let Some(h) = self.held.remove(id) {
            self.counts.remove(h.deferred);
        }
    }

    /// Removes the queued, never-started deliveries of `partition`. Returns them; they are
    /// no longer held.
    pub(super) fn drop_partition(&mut self, partition: u32) -> Vec<Entry> {
        let mut dropped = Vec::new();
        for q in self.keys.values_mut() {
            let mut i = 0;
            while i < q.len() {
                if q[i].id().0.partition == partition {
                    if let Some(entry) = q.remove(i) {
                        dropped.push(entry);
                    }
                } else {
                    i += 1;
                }
            }
        }
        for entry in &dropped {
            self.forget(&entry.id());
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

    /// Empties the schedule: the queued entries and everything held.
    pub(super) fn take_all(&mut self) -> (Vec<Entry>, Vec<Held>) {
        let queued = self.keys.drain().flat_map(|(_, q)| q.into_iter()).collect();
        self.counts.whole = 0;
        self.counts.deferred = 0;
        (queued, self.held.drain().map(|(_, h)| h).collect())
    }

    /// How many deliveries are held.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// How many deliveries are held whole and deferred, now and at most.
    pub(super) fn counts(&self) -> stats::Held {
        self.counts
    }

    /// The aggregates with queued or running work, and the longest of their queues (the
    /// deliveries waiting behind the running one). Walks every scheduled key: for periodic
    /// reports, not for the hot path.
    pub(super) fn key_queues(&self) -> super::KeyQueues {
        super::KeyQueues {
            keys: self.keys.len(),
            deepest: self.keys.values().map(VecDeque::len).max().unwrap_or(0),
        }
    }

    /// Whether a delivery of `partition` is held.
    pub(super) fn holds_partition(&self, partition: u32) -> bool {
        self.held.keys().any(|(pos, _)| pos.partition == partition)
    }
}
