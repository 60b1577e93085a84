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
//! - A key whose backlog reaches `max_per_key` pauses its partition (when the backend offers
//!   [`PartitionControl`]) or stops the dispatcher until the backlog shrinks.
//! - A failed attempt is retried in place (later events of the key wait), then dead-lettered
//!   with reason headers, then acknowledged. A dead-letter publish that fails is retried and
//!   the key stays parked: nothing is acknowledged that was neither handled nor dead-lettered.
//! - A ticker sends progress signals for every held delivery so that the broker does not
//!   redeliver work that waits behind a slow key; a redelivery of a held message is dropped.

mod group;
mod types;

pub use types::*;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt as _};

use self::group::{lose_all, next_event, on_group_event};
use crate::codec::{Codec, DecodeError};
use crate::envelope::Envelope;
use crate::error::{Disposition, HandleError};
use crate::handler::{BoxEventHandler, Event};
use crate::headers::{Headers, validate_header};
use crate::message::{OutboundMessage, Position};
use crate::middleware::panicked;
use crate::retry::Backoff;
use crate::transport::{
    Acker, Delivery, DomainSubscription, DynDomainTransport, GroupControl, GroupEvent,
    PartitionControl, Write,
};

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    malformed: AtomicU64,
    unreadable: AtomicU64,
    dead_letters_reduced: AtomicU64,
    dead_letters_refused: AtomicU64,
    acked: AtomicU64,
    ack_failures: AtomicU64,
    duplicates_dropped: AtomicU64,
    dead_letter_failures: AtomicU64,
    finished: AtomicU64,
    transport_errors: AtomicU64,
    stale_dropped: AtomicU64,
    stale_acks: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The routing key: the aggregate id, borrowed from the decoded envelope (no allocation),
/// or the raw key of a message that could not be decoded. Hashes and compares as the text.
#[derive(Clone)]
enum Key {
    Envelope(Arc<Envelope>),
    Raw(Arc<str>),
}

impl Key {
    fn as_str(&self) -> &str {
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

struct Item {
    delivery: Delivery,
    decoded: Result<Arc<Envelope>, DecodeError>,
    key: Key,
    _permit: OwnedSemaphorePermit,
}

/// A held delivery: its position under the ownership epoch it was delivered in. A
/// redelivery of the same position under a new epoch is a new delivery, not a duplicate.
type HeldId = (Position, u64);

impl Item {
    fn id(&self) -> HeldId {
        (self.delivery.position(), self.delivery.epoch)
    }
}

/// An event the dispatcher started inline whose handler did not finish at once.
type Started = Pin<Box<dyn Future<Output = Item> + Send>>;

#[derive(Default)]
struct KeyQueue {
    items: VecDeque<Item>,
    over_cap: bool,
}

struct Held {
    acker: Arc<dyn Acker>,
    since: Instant,
    started: bool,
    parked: bool,
}

#[derive(Debug, Clone, Copy)]
struct Part {
    state: PartitionState,
    epoch: u64,
}

#[derive(Default)]
struct State {
    keys: HashMap<Key, KeyQueue>,
    held: HashMap<HeldId, Held>,
    paused: HashMap<u32, usize>,
    peak: usize,
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

    fn holds_partition(&self, partition: u32) -> bool {
        self.held.keys().any(|(pos, _)| pos.partition == partition)
    }

    fn draining(&self) -> bool {
        self.parts
            .values()
            .any(|p| p.state == PartitionState::Draining)
    }
}

/// Everything the pool's tasks share.
pub(crate) struct PoolParams {
    pub(crate) topic: Arc<str>,
    pub(crate) dead_letter_topic: String,
    pub(crate) handler: BoxEventHandler,
    pub(crate) transport: DynDomainTransport,
    pub(crate) config: PoolConfig,
    pub(crate) retry: Backoff,
    pub(crate) observer: Option<Arc<dyn PoolObserver>>,
}

struct Shared {
    p: PoolParams,
    control: Option<Arc<dyn PartitionControl>>,
    group: Option<Arc<dyn GroupControl>>,
    state: Mutex<State>,
    ready_tx: async_channel::Sender<Key>,
    ready_rx: async_channel::Receiver<Key>,
    permits: Arc<Semaphore>,
    /// One per running handler (at most `max_concurrency`): a worker holds one while it
    /// runs a key, an event started inline holds one until it ends.
    running: Arc<Semaphore>,
    /// Events started inline whose handlers did not finish at once.
    continuations: TaskTracker,
    counters: Counters,
    space: Notify,
    idle: Notify,
    stop_pulling: CancellationToken,
    hard_stop: CancellationToken,
}

/// A running pool: its tasks and shared state.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    tasks: Mutex<Option<PoolTasks>>,
    report: tokio::sync::OnceCell<ShutdownReport>,
}

/// Pauses through a group's control.
struct GroupPause(Arc<dyn GroupControl>);

impl PartitionControl for GroupPause {
    fn pause(&self, partition: u32) {
        self.0.pause(partition);
    }
    fn resume(&self, partition: u32) {
        self.0.resume(partition);
    }
}

struct PoolTasks {
    dispatcher: JoinHandle<Streams>,
    workers: Vec<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("topic", &self.shared.p.topic)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Starts the dispatcher, the workers and the progress ticker on the current runtime.
    pub(crate) fn start(
        params: PoolParams,
        subscription: DomainSubscription,
        ack_deadline: Option<Duration>,
    ) -> Self {
        let (ready_tx, ready_rx) = async_channel::unbounded();
        let progress = params
            .config
            .progress_interval
            .or_else(|| ack_deadline.map(|d| (d / 3).max(Duration::from_millis(1))));
        let (events, group) = match subscription.group {
            Some(g) => (Some(g.events), Some(g.control)),
            None => (None, None),
        };
        // A group's control also pauses partitions.
        let control: Option<Arc<dyn PartitionControl>> = match (&group, subscription.control) {
            (Some(g), _) => Some(Arc::new(GroupPause(g.clone()))),
            (None, c) => c,
        };
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(params.config.max_in_flight)),
            running: Arc::new(Semaphore::new(params.config.max_concurrency)),
            continuations: TaskTracker::new(),
            control,
            state: Mutex::new(State {
                grouped: group.is_some(),
                ..State::default()
            }),
            group,
            p: params,
            ready_tx,
            ready_rx,
            counters: Counters::default(),
            space: Notify::new(),
            idle: Notify::new(),
            stop_pulling: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        });
        let dispatcher = tokio::spawn(dispatch(shared.clone(), subscription.deliveries, events));
        let workers = (0..shared.p.config.max_concurrency)
            .map(|_| tokio::spawn(worker(shared.clone())))
            .collect();
        let ticker = progress.map(|every| tokio::spawn(tick(shared.clone(), every)));
        Self {
            shared,
            tasks: Mutex::new(Some(PoolTasks {
                dispatcher,
                workers,
                ticker,
            })),
            report: tokio::sync::OnceCell::new(),
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        let (in_flight, peak) = {
            let st = self.shared.state.lock();
            (st.held.len() as u64, st.peak as u64)
        };
        PoolStats {
            received: c.received.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            unreadable: c.unreadable.load(Ordering::Relaxed),
            dead_letters_reduced: c.dead_letters_reduced.load(Ordering::Relaxed),
            dead_letters_refused: c.dead_letters_refused.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            ack_failures: c.ack_failures.load(Ordering::Relaxed),
            duplicates_dropped: c.duplicates_dropped.load(Ordering::Relaxed),
            dead_letter_failures: c.dead_letter_failures.load(Ordering::Relaxed),
            in_flight,
            peak_in_flight: peak,
            transport_errors: c.transport_errors.load(Ordering::Relaxed),
            stale_dropped: c.stale_dropped.load(Ordering::Relaxed),
            stale_acks: c.stale_acks.load(Ordering::Relaxed),
        }
    }

    /// The partitions this member knows of in its consumer group, sorted.
    pub(crate) fn partitions(&self) -> Vec<(u32, PartitionState, u64)> {
        let st = self.shared.state.lock();
        let mut v: Vec<_> = st
            .parts
            .iter()
            .map(|(p, s)| (*p, s.state, s.epoch))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// Whether the delivery stream ended (transport closed) and all held work finished.
    pub(crate) fn is_finished(&self) -> bool {
        self.shared.stop_pulling.is_cancelled() && self.shared.state.lock().held.is_empty()
    }

    /// Stops pulling, finishes held work within `deadline`, returns what was left.
    /// Idempotent: later and concurrent calls get the first call's report.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        *self
            .report
            .get_or_init(|| self.shutdown_inner(deadline))
            .await
    }

    async fn shutdown_inner(&self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let sh = &self.shared;
        let finished_before = sh.counters.finished.load(Ordering::Relaxed);
        sh.stop_pulling.cancel();
        let Some(tasks) = self.tasks.lock().take() else {
            return ShutdownReport::default();
        };
        // The streams stay open (a group member stays a member) until the end of the drain.
        let streams = tasks.dispatcher.await.ok();
        // Drain: wait until nothing is held, or the deadline.
        let drained_in_time = tokio::time::timeout(deadline, async {
            loop {
                let idle = sh.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if sh.state.lock().held.is_empty() {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok();
        let mut report = ShutdownReport {
            timed_out: !drained_in_time,
            ..ShutdownReport::default()
        };
        // Cut off what is still running, then return everything held unacknowledged.
        sh.hard_stop.cancel();
        sh.ready_tx.close();
        for w in tasks.workers {
            let _ = w.await;
        }
        sh.continuations.close();
        sh.continuations.wait().await;
        if let Some(t) = tasks.ticker {
            t.abort();
            let _ = t.await;
        }
        let (queued, held): (Vec<Item>, Vec<Held>) = {
            let mut st = sh.state.lock();
            let queued: Vec<Item> = st
                .keys
                .drain()
                .flat_map(|(_, q)| q.items.into_iter())
                .collect();
            (queued, st.held.drain().map(|(_, h)| h).collect())
        };
        for item in &queued {
            let _ = item.delivery.nack(Duration::ZERO).await;
        }
        for h in &held {
            if !h.started {
                report.dropped += 1;
            } else if h.parked {
                report.parked += 1;
            } else {
                report.abandoned += 1;
            }
            if h.started {
                let _ = h.acker.nack(Duration::ZERO).await;
            }
        }
        drop(queued);
        drop(streams);
        report.drained = sh.counters.finished.load(Ordering::Relaxed) - finished_before;
        report.elapsed = started.elapsed();
        report.stats = self.stats();
        report
    }
}

impl Pool {
    /// Stops at once, as a crash does: no new handler starts, running ones are cut off at
    /// their next poll, nothing more is acknowledged. Returns the tasks to wait for.
    fn stop_now(&self) -> Option<(PoolTasks, TaskTracker)> {
        self.shared.stop_pulling.cancel();
        self.shared.hard_stop.cancel();
        self.shared.ready_tx.close();
        let tasks = self.tasks.lock().take()?;
        for w in &tasks.workers {
            w.abort();
        }
        if let Some(t) = &tasks.ticker {
            t.abort();
        }
        let continuations = self.shared.continuations.clone();
        continuations.close();
        Some((tasks, continuations))
    }

    /// Stops at once like a crash (see [`Pool::stop_now`]) and resolves when no handler of
    /// this pool runs any more; the unacknowledged deliveries are left to the broker's
    /// redelivery.
    pub(crate) async fn abort(&self) {
        let Some((tasks, continuations)) = self.stop_now() else {
            return;
        };
        let streams = tasks.dispatcher.await.ok();
        for w in tasks.workers {
            let _ = w.await;
        }
        continuations.wait().await;
        drop(streams);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropped without shutdown (a crash): stop at once; unacknowledged work is
        // redelivered. The subscription's streams are dropped only after every handler
        // stopped, so that a group reassigns partitions only when nothing of this member
        // can run any more.
        let Some((tasks, continuations)) = self.stop_now() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let streams = tasks.dispatcher.await.ok();
                    for w in tasks.workers {
                        let _ = w.await;
                    }
                    continuations.wait().await;
                    drop(streams);
                });
            }
            Err(_) => tasks.dispatcher.abort(),
        }
    }
}

/// The streams a subscription holds; dropped only after every task of the pool ended, so
/// that a group member leaves only when none of its handlers can still run.
pub(crate) struct Streams {
    _deliveries: futures::stream::BoxStream<'static, crate::Result<Delivery>>,
    _events: Option<futures::stream::BoxStream<'static, GroupEvent>>,
}

async fn dispatch(
    sh: Arc<Shared>,
    mut deliveries: futures::stream::BoxStream<'static, crate::Result<Delivery>>,
    mut events: Option<futures::stream::BoxStream<'static, GroupEvent>>,
) -> Streams {
    let mut handler = sh.p.handler.clone();
    let mut inline = InlineBudget::default();
    loop {
        // Ownership changes first: they decide what may be pulled and handled.
        if let Some(ev) = events.as_mut() {
            match ev.next().now_or_never() {
                Some(Some(event)) => {
                    on_group_event(&sh, event).await;
                    continue;
                }
                Some(None) => {
                    // The group ended (transport closed): no partition is owned any more.
                    lose_all(&sh);
                    events = None;
                    continue;
                }
                None => {}
            }
        }
        let permit = tokio::select! {
            biased;
            () = sh.stop_pulling.cancelled() => break,
            Some(event) = next_event(&mut events) => {
                on_group_event(&sh, event).await;
                continue;
            }
            p = sh.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            () = sh.stop_pulling.cancelled() => break,
            Some(event) = next_event(&mut events) => {
                drop(permit);
                on_group_event(&sh, event).await;
                continue;
            }
            n = deliveries.next() => n,
        };
        let delivery = match next {
            None => break,
            Some(Err(e)) => {
                bump(&sh.counters.transport_errors);
                tracing::warn!(topic = %sh.p.topic, error = %e, "delivery stream reported an error");
                continue;
            }
            Some(Ok(d)) => d,
        };
        bump(&sh.counters.received);
        if !sh
            .state
            .lock()
            .accepts(delivery.position().partition, delivery.epoch)
        {
            // A partition this member does not own (any more): not ours to handle or ack.
            bump(&sh.counters.stale_dropped);
            continue;
        }
        let decoded = Codec::decode(&delivery.message).map(Arc::new);
        let key = match &decoded {
            Ok(e) => Key::Envelope(e.clone()),
            Err(_) => Key::Raw(match &delivery.message.key {
                Some(k) if !k.is_empty() => Arc::from(k.as_str()),
                _ => {
                    let p = delivery.position();
                    Arc::from(format!("\u{0}malformed:{}:{}", p.partition, p.offset))
                }
            }),
        };
        if sh.control.is_none() && !wait_for_space(&sh, &key).await {
            // Stopped while waiting: hand the delivery back.
            let _ = delivery.nack(Duration::ZERO).await;
            break;
        }
        if sh.hard_stop.is_cancelled() {
            // Dropped (a crash) while this delivery was on its way in: start nothing more;
            // unacknowledged, it is redelivered.
            break;
        }
        let item = Item {
            delivery,
            decoded,
            key,
            _permit: permit,
        };
        // An inline start needs a free running slot: the dispatcher never waits for one.
        let slot = if inline.allowed() {
            sh.running.clone().try_acquire_owned().ok()
        } else {
            None
        };
        if let Some((item, slot)) = enqueue(&sh, item, slot) {
            run_inline(&sh, &mut handler, &mut inline, item, slot);
        }
    }
    sh.stop_pulling.cancel();
    Streams {
        _deliveries: deliveries,
        _events: events,
    }
}

/// Without partition control, backpressure per key stops the whole dispatcher.
async fn wait_for_space(sh: &Shared, key: &Key) -> bool {
    loop {
        let space = sh.space.notified();
        tokio::pin!(space);
        space.as_mut().enable();
        let full = sh
            .state
            .lock()
            .keys
            .get(key)
            .is_some_and(|q| q.items.len() >= sh.p.config.max_per_key);
        if !full {
            return true;
        }
        tokio::select! {
            () = sh.stop_pulling.cancelled() => return false,
            () = space => {}
        }
    }
}

/// Adds a delivery to its key's queue. Given a running `slot`, when the key has no queued
/// or running work, the key is marked scheduled and the item is returned with the slot for
/// the dispatcher to start at once.
fn enqueue(
    sh: &Shared,
    item: Item,
    slot: Option<OwnedSemaphorePermit>,
) -> Option<(Item, OwnedSemaphorePermit)> {
    let id = item.id();
    let position = id.0;
    let partition = position.partition;
    let mut st = sh.state.lock();
    if st.held.contains_key(&id) {
        drop(st);
        bump(&sh.counters.duplicates_dropped);
        observe(sh, &PoolEvent::DuplicateDropped { position });
        return None;
    }
    let slot = slot.filter(|_| item.decoded.is_ok());
    st.held.insert(
        id,
        Held {
            acker: item.delivery.acker().clone(),
            since: Instant::now(),
            started: false,
            parked: false,
        },
    );
    if let Some(slot) = slot.filter(|_| !st.keys.contains_key(&item.key)) {
        st.keys.insert(item.key.clone(), KeyQueue::default());
        if let Some(h) = st.held.get_mut(&id) {
            h.started = true;
        }
        st.peak = st.peak.max(st.held.len());
        return Some((item, slot));
    }
    st.peak = st.peak.max(st.held.len());
    let cap = sh.p.config.max_per_key;
    let mut pause = false;
    let mut schedule = None;
    match st.keys.get_mut(&item.key) {
        Some(q) => {
            q.items.push_back(item);
            if q.items.len() >= cap && !q.over_cap && sh.control.is_some() {
                q.over_cap = true;
                pause = true;
            }
        }
        None => {
            let key = item.key.clone();
            let mut queue = KeyQueue::default();
            queue.items.push_back(item);
            st.keys.insert(key.clone(), queue);
            schedule = Some(key);
        }
    }
    if pause {
        let n = st.paused.entry(partition).or_insert(0);
        *n += 1;
        if *n == 1
            && let Some(c) = &sh.control
        {
            c.pause(partition);
        }
    }
    drop(st);
    if let Some(key) = schedule {
        // Unbounded and only closed at shutdown, when nothing is scheduled any more.
        let _ = sh.ready_tx.try_send(key);
    }
    None
}

/// Gives an item the dispatcher meant to start inline to the workers: its key is scheduled
/// already (by [`enqueue`]), so the item goes first in the key's queue.
fn hand_to_workers(sh: &Shared, item: Item) {
    let key = item.key.clone();
    {
        let mut st = sh.state.lock();
        if let Some(h) = st.held.get_mut(&item.id()) {
            h.started = false;
        }
        st.keys
            .entry(key.clone())
            .or_default()
            .items
            .push_front(item);
    }
    let _ = sh.ready_tx.try_send(key);
}

/// Takes the next item of `key`, or unschedules the key when its queue is empty.
fn next_item(sh: &Shared, key: &Key) -> Option<Item> {
    let mut st = sh.state.lock();
    let st = &mut *st;
    let q = st.keys.get_mut(key)?;
    let Some(item) = q.items.pop_front() else {
        st.keys.remove(key);
        return None;
    };
    let cap = sh.p.config.max_per_key;
    if q.over_cap && q.items.len() <= cap / 2 {
        q.over_cap = false;
        let partition = item.delivery.position().partition;
        if let Some(n) = st.paused.get_mut(&partition) {
            *n -= 1;
            if *n == 0 {
                st.paused.remove(&partition);
                if let Some(c) = &sh.control {
                    c.resume(partition);
                }
            }
        }
    }
    let was_full = q.items.len() + 1 >= cap;
    if let Some(h) = st.held.get_mut(&item.id()) {
        h.started = true;
    }
    if was_full && sh.control.is_none() {
        sh.space.notify_waiters();
    }
    Some(item)
}

/// After an item finished: forget it, and reschedule or unschedule its key.
fn finish(sh: &Shared, item: Item, budget_left: bool) -> bool {
    let key = item.key.clone();
    let mut st = sh.state.lock();
    st.held.remove(&item.id());
    // Shutdown waits for an empty pool; a drain waits for one partition's handlers.
    let idle = st.held.is_empty() || (st.grouped && st.draining());
    let more = match st.keys.get(&key) {
        Some(q) if q.items.is_empty() => {
            st.keys.remove(&key);
            false
        }
        Some(_) => true,
        None => false,
    };
    drop(st);
    drop(item);
    sh.counters.finished.fetch_add(1, Ordering::Relaxed);
    if idle {
        sh.idle.notify_waiters();
    }
    if more && !budget_left {
        // Fairness: let other scheduled keys run before this one continues.
        let _ = sh.ready_tx.try_send(key);
        return false;
    }
    more
}

/// Events of one key run back to back up to this many before the key yields its worker.
const KEY_BUDGET: u32 = 32;

async fn worker(sh: Arc<Shared>) {
    let mut handler = sh.p.handler.clone();
    loop {
        // A worker takes a key only with a running slot (events started inline hold slots
        // too), so that at most `max_concurrency` handlers run.
        let slot = tokio::select! {
            biased;
            () = sh.hard_stop.cancelled() => return,
            s = sh.running.acquire() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let key = tokio::select! {
            biased;
            () = sh.hard_stop.cancelled() => return,
            k = sh.ready_rx.recv() => match k {
                Ok(k) => k,
                Err(_) => return,
            },
        };
        let mut budget = KEY_BUDGET;
        loop {
            let Some(item) = next_item(&sh, &key) else {
                break;
            };
            let done = tokio::select! {
                biased;
                () = sh.hard_stop.cancelled() => false,
                () = process(&sh, &mut handler, &item, None) => true,
            };
            if !done {
                // Cut off at the shutdown deadline: shutdown returns it unacknowledged.
                return;
            }
            budget -= 1;
            if !finish(&sh, item, budget > 0) {
                break;
            }
        }
        drop(slot);
    }
}

/// Whether the dispatcher may start handlers itself. Starting inline saves a hand-off to a
/// worker for handlers that finish at once; handlers that keep the CPU busy would serialize
/// on the dispatcher, so inline starts stop while their average cost is high, with a probe
/// every 256 deliveries.
#[derive(Default)]
struct InlineBudget {
    /// Exponential moving average of an inline start, in nanoseconds.
    avg_ns: u64,
    skipped: u32,
}

/// Inline starts costing more than this on average go to the workers instead.
const INLINE_LIMIT_NS: u64 = 20_000;

impl InlineBudget {
    fn allowed(&mut self) -> bool {
        if self.avg_ns <= INLINE_LIMIT_NS {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= 256 {
            self.skipped = 0;
            return true;
        }
        false
    }

    fn record(&mut self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.avg_ns = self.avg_ns - self.avg_ns / 8 + ns / 8;
    }
}

/// Starts `item` on the dispatcher: the first attempt is polled once; if it is not done, the
/// rest runs as a task of its own holding `slot` (the key stays scheduled, so its order
/// holds). The dispatcher never waits for the handler: a service that is not ready at once
/// gets the item through a worker.
fn run_inline(
    sh: &Arc<Shared>,
    handler: &mut BoxEventHandler,
    budget: &mut InlineBudget,
    item: Item,
    slot: OwnedSemaphorePermit,
) {
    let t0 = Instant::now();
    let first = match &item.decoded {
        Ok(envelope) => {
            let Some(first) = try_start(sh, handler, event(sh, &item, envelope, 1)) else {
                drop(slot);
                hand_to_workers(sh, item);
                budget.record(t0.elapsed());
                return;
            };
            Some(first)
        }
        Err(_) => None,
    };
    let owner = sh.clone();
    let mut started: Started = Box::pin(async move {
        let mut lazy = None;
        process_with(&owner, &mut lazy, &item, first).await;
        item
    });
    match (&mut started).now_or_never() {
        Some(item) => {
            finish(sh, item, false);
            drop(slot);
        }
        None => {
            let owner = sh.clone();
            sh.continuations.spawn(async move {
                tokio::select! {
                    biased;
                    // Cut off at the shutdown deadline: shutdown returns it unacknowledged.
                    () = owner.hard_stop.cancelled() => {}
                    item = started => {
                        finish(&owner, item, false);
                    }
                }
                drop(slot);
            });
        }
    }
    budget.record(t0.elapsed());
}

/// Calls the handler for one attempt if its service is ready at once; `None` if it is not.
/// A service left waiting for readiness (a concurrency limit's permit, say) is replaced by
/// a fresh clone, so that the dispatcher does not sit on capacity it will not use.
fn try_start(sh: &Shared, handler: &mut BoxEventHandler, event: Event) -> Option<AttemptFuture> {
    let ready = AssertUnwindSafe(handler.ready())
        .catch_unwind()
        .now_or_never();
    let outcome = match ready {
        None => None,
        Some(Ok(Ok(svc))) => Some(Ok(call_guarded(svc, event))),
        Some(Ok(Err(e))) => Some(Ok(failed(e))),
        Some(Err(p)) => Some(Err(failed(panicked(&*p, Disposition::Permanent)))),
    };
    match outcome {
        Some(Ok(fut)) => Some(fut),
        Some(Err(fut)) => {
            *handler = sh.p.handler.clone();
            Some(fut)
        }
        None => {
            *handler = sh.p.handler.clone();
            None
        }
    }
}

fn event(sh: &Shared, item: &Item, envelope: &Arc<Envelope>, attempt: u32) -> Event {
    Event {
        envelope: envelope.clone(),
        topic: sh.p.topic.clone(),
        attempt,
        delivery_count: item.delivery.delivery_count,
        position: item.delivery.position(),
        epoch: item.delivery.epoch,
    }
}

type AttemptFuture = futures::future::BoxFuture<'static, Result<(), HandleError>>;

/// Calls the handler for one attempt. A panic in `poll_ready` or in `call` becomes a failed
/// attempt (and a service that panicked is replaced by a fresh clone).
async fn start_attempt(
    fresh: &BoxEventHandler,
    handler: &mut BoxEventHandler,
    event: Event,
) -> AttemptFuture {
    match AssertUnwindSafe(handler.ready()).catch_unwind().await {
        Ok(Ok(svc)) => call_guarded(svc, event),
        Ok(Err(e)) => failed(e),
        Err(p) => {
            *handler = fresh.clone();
            failed(panicked(&*p, Disposition::Permanent))
        }
    }
}

/// Calls a ready service; a panic in `call` becomes a failed attempt.
fn call_guarded(svc: &mut BoxEventHandler, event: Event) -> AttemptFuture {
    match std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(event))) {
        Ok(fut) => fut,
        Err(p) => failed(panicked(&*p, Disposition::Permanent)),
    }
}

fn failed(e: HandleError) -> AttemptFuture {
    Box::pin(async move { Err(e) })
}

/// Tells the observer, if any. An observer that panics loses that event and nothing else.
fn observe(sh: &Shared, event: &PoolEvent<'_>) {
    if let Some(o) = &sh.p.observer
        && std::panic::catch_unwind(AssertUnwindSafe(|| o.on_event(event))).is_err()
    {
        tracing::error!(topic = %sh.p.topic, "the pool observer panicked; the event is ignored");
    }
}

async fn process(
    sh: &Shared,
    handler: &mut BoxEventHandler,
    item: &Item,
    first: Option<AttemptFuture>,
) {
    let mut slot = None;
    process_in(sh, HandlerRef::Borrowed(handler), &mut slot, item, first).await;
}

async fn process_with(
    sh: &Shared,
    slot: &mut Option<BoxEventHandler>,
    item: &Item,
    first: Option<AttemptFuture>,
) {
    process_in(sh, HandlerRef::Lazy, slot, item, first).await;
}

/// The handler of one item's attempts: a worker's own, or one cloned from the pool's only
/// if a retry needs it.
enum HandlerRef<'a> {
    Borrowed(&'a mut BoxEventHandler),
    Lazy,
}

/// Runs an item to its end: attempts with in-place retry, then ack or dead letter.
async fn process_in(
    sh: &Shared,
    mut handler: HandlerRef<'_>,
    slot: &mut Option<BoxEventHandler>,
    item: &Item,
    mut first: Option<AttemptFuture>,
) {
    if let Some(reason) = item.delivery.unreadable_reason() {
        bump(&sh.counters.unreadable);
        dead_letter(sh, item, DeadLetterKind::Unreadable, reason, 0).await;
        return;
    }
    let envelope = match &item.decoded {
        Err(e) => {
            bump(&sh.counters.malformed);
            dead_letter(sh, item, DeadLetterKind::Malformed, &e.to_string(), 0).await;
            return;
        }
        Ok(e) => e.clone(),
    };
    let partition = item.delivery.position().partition;
    let epoch = item.delivery.epoch;
    let mut attempt = 1;
    loop {
        if !sh.state.lock().owns(partition, epoch) {
            // The partition moved on (lost, or drained past its deadline): no new attempt,
            // no acknowledgement; the next owner handles the message.
            return;
        }
        let fut = match first.take() {
            Some(f) => f,
            None => {
                let event = event(sh, item, &envelope, attempt);
                match &mut handler {
                    HandlerRef::Borrowed(h) => start_attempt(&sh.p.handler, h, event).await,
                    HandlerRef::Lazy => {
                        let h = slot.get_or_insert_with(|| sh.p.handler.clone());
                        start_attempt(&sh.p.handler, h, event).await
                    }
                }
            }
        };
        // A panic in the handler's future is a permanent failure of this attempt.
        let result = AssertUnwindSafe(fut)
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(panicked(&*p, Disposition::Permanent)));
        match result {
            Ok(()) => {
                bump(&sh.counters.handled);
                ack(sh, item, Some(&envelope)).await;
                return;
            }
            Err(error) => {
                if !error.is_retryable() {
                    let reason = error.to_string();
                    dead_letter(sh, item, DeadLetterKind::Permanent, &reason, attempt).await;
                    return;
                }
                if attempt >= sh.p.retry.attempts {
                    let reason = error.to_string();
                    dead_letter(sh, item, DeadLetterKind::Exhausted, &reason, attempt).await;
                    return;
                }
                let delay = sh.p.retry.delay(attempt);
                bump(&sh.counters.retried);
                observe(
                    sh,
                    &PoolEvent::Retrying {
                        envelope: &envelope,
                        attempt,
                        error: &error,
                        delay,
                    },
                );
                tracing::debug!(
                    topic = %sh.p.topic, aggregate_id = %envelope.aggregate_id,
                    version = envelope.event_version, attempt, ?delay, error = %error,
                    "handler failed; retrying in place"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// Whether the item's partition is still owned under the epoch it was delivered in. If
/// not, nothing more is sent for it (a stale acknowledgement or dead letter of an earlier
/// ownership epoch): the next owner handles the message.
fn still_owned(sh: &Shared, item: &Item) -> bool {
    let owned = sh
        .state
        .lock()
        .owns(item.delivery.position().partition, item.delivery.epoch);
    if !owned {
        bump(&sh.counters.stale_acks);
    }
    owned
}

async fn ack(sh: &Shared, item: &Item, envelope: Option<&Envelope>) {
    let position = item.delivery.position();
    if !still_owned(sh, item) {
        return;
    }
    match item.delivery.ack().await {
        Ok(()) => {
            bump(&sh.counters.acked);
            observe(sh, &PoolEvent::Acked { envelope, position });
        }
        Err(error) => {
            bump(&sh.counters.ack_failures);
            tracing::warn!(topic = %sh.p.topic, ?position, %error, "ack failed; the broker will redeliver");
            observe(
                sh,
                &PoolEvent::AckFailed {
                    position,
                    error: &error,
                },
            );
        }
    }
}

/// Keeps header text printable and bounded.
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if out.trim().is_empty() {
        out = "unknown".to_owned();
    }
    out
}

/// The dead-letter record of `item`: a full copy (original headers and body) with the
/// `dualbus-dlq-*` headers, or, when that is over the broker's size limit, the first
/// reduced record that fits: without the original headers, then without the body (its
/// length in a header), then without both. Returns whether it was reduced.
fn dead_letter_message(
    sh: &Shared,
    item: &Item,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
) -> (OutboundMessage, bool) {
    let m = &item.delivery.message;
    let mut dlq = Headers::with_capacity(9);
    dlq.insert(dlq_headers::REASON, clip(reason, 1024));
    dlq.insert(dlq_headers::KIND, kind.as_str());
    dlq.insert(dlq_headers::ATTEMPTS, attempts.to_string());
    dlq.insert(dlq_headers::TOPIC, sh.p.topic.to_string());
    dlq.insert(dlq_headers::PARTITION, m.position.partition.to_string());
    dlq.insert(dlq_headers::OFFSET, m.position.offset.to_string());
    dlq.insert(
        dlq_headers::DELIVERY_COUNT,
        item.delivery.delivery_count.to_string(),
    );
    // One dead letter per source position: a retried dead-letter publish is stored once.
    let id = format!(
        "dlq:{}:{}:{}",
        sh.p.topic, m.position.partition, m.position.offset
    );
    let build = |keep_headers: bool, keep_body: bool| {
        let mut headers = Headers::with_capacity(m.headers.len() + dlq.len() + 2);
        if keep_headers {
            // The original headers that every backend can carry (a malformed message may
            // have others: they are dropped rather than blocking the dead letter).
            for (n, v) in m.headers.iter() {
                if validate_header(n, v).is_ok() && !n.starts_with("dualbus-dlq-") {
                    headers.insert(n.to_owned(), v);
                }
            }
        }
        for (n, v) in dlq.iter() {
            headers.insert(n.to_owned(), v);
        }
        match (keep_headers, keep_body) {
            (true, true) => {}
            (false, true) => headers.insert(dlq_headers::REDUCED, "headers"),
            (true, false) => headers.insert(dlq_headers::REDUCED, "body"),
            (false, false) => headers.insert(dlq_headers::REDUCED, "headers,body"),
        }
        if !keep_body {
            headers.insert(dlq_headers::ORIGINAL_LENGTH, m.payload.len().to_string());
        }
        OutboundMessage {
            key: item.key.to_string(),
            headers,
            payload: if keep_body {
                m.payload.clone()
            } else {
                Bytes::new()
            },
            id: Some(id.clone()),
        }
    };
    let caps = sh.p.transport.capabilities();
    let fits = |message: &OutboundMessage| caps.check_size(message, Write::Publish).is_ok();
    let full = build(true, true);
    if fits(&full) {
        return (full, false);
    }
    for (keep_headers, keep_body) in [(false, true), (true, false)] {
        let reduced = build(keep_headers, keep_body);
        if fits(&reduced) {
            return (reduced, true);
        }
    }
    (build(false, false), true)
}

async fn dead_letter(sh: &Shared, item: &Item, kind: DeadLetterKind, reason: &str, attempts: u32) {
    let position = item.delivery.position();
    if !still_owned(sh, item) {
        return;
    }
    let (message, reduced) = dead_letter_message(sh, item, kind, reason, attempts);
    let mut failures = 0u32;
    loop {
        match sh
            .p
            .transport
            .publish(&sh.p.dead_letter_topic, message.clone())
            .await
        {
            Ok(_) => break,
            Err(error) => {
                failures += 1;
                bump(&sh.counters.dead_letter_failures);
                if failures == 1
                    && let Some(h) = sh.state.lock().held.get_mut(&item.id())
                {
                    h.parked = true;
                }
                if !error.is_retryable() {
                    // Refused for good (even the reduced record): retrying cannot help.
                    // Nothing is acknowledged; the aggregate waits until the subscription
                    // stops or the partition moves on.
                    bump(&sh.counters.dead_letters_refused);
                    tracing::error!(
                        topic = %sh.p.topic, dead_letter_topic = %sh.p.dead_letter_topic,
                        ?position, %error, size = sh.p.transport.capabilities().wire_size(&message, Write::Publish),
                        "the dead letter was refused by the broker; the aggregate stays parked until the subscription stops"
                    );
                    sh.hard_stop.cancelled().await;
                    return;
                }
                let delay =
                    sh.p.retry
                        .delay(failures.min(16))
                        .max(Duration::from_millis(10));
                tracing::warn!(
                    topic = %sh.p.topic, dead_letter_topic = %sh.p.dead_letter_topic, ?position,
                    %error, ?delay, "dead-letter publish failed; the aggregate stays parked"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
    if failures > 0
        && let Some(h) = sh.state.lock().held.get_mut(&item.id())
    {
        h.parked = false;
    }
    bump(&sh.counters.dead_lettered);
    if reduced {
        bump(&sh.counters.dead_letters_reduced);
    }
    let envelope = item.decoded.as_ref().ok().map(|e| &**e);
    tracing::info!(topic = %sh.p.topic, ?position, kind = kind.as_str(), reason, reduced, "message dead-lettered");
    observe(
        sh,
        &PoolEvent::DeadLettered {
            envelope,
            kind,
            reason,
            position,
        },
    );
    ack(sh, item, envelope).await;
}

async fn tick(sh: Arc<Shared>, every: Duration) {
    loop {
        tokio::select! {
            () = sh.hard_stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = Instant::now();
        let due: Vec<Arc<dyn Acker>> = {
            let mut st = sh.state.lock();
            st.held
                .values_mut()
                .filter(|h| now.duration_since(h.since) >= every)
                .map(|h| {
                    h.since = now;
                    h.acker.clone()
                })
                .collect()
        };
        for acker in due {
            if let Err(error) = acker.in_progress().await {
                tracing::debug!(topic = %sh.p.topic, %error, "progress signal failed");
            }
        }
    }
}
