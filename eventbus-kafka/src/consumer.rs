//! A domain subscription: one member of the Kafka consumer group, its librdkafka consumer
//! polled on a thread of its own.
//!
//! - **Assign** (in the rebalance callback): the committed offsets and their metadata are
//!   read; each partition gets the epoch after the committed one, starts at the committed
//!   offset (or the topic's start or end where nothing is committed), is assigned and
//!   paused at once; then `Assigned` goes to the pool. The pool's rewind commits the new
//!   epoch synchronously and resumes the partition: nothing is handled before the epoch
//!   is on the broker.
//! - **Revoke** (in the rebalance callback): `Revoked` goes to the pool, which stops
//!   starting work for the partition and drains it; the callback waits for its release (at
//!   most [`ConsumerSettings::revoke_timeout`](crate::ConsumerSettings::revoke_timeout)),
//!   commits the completed prefix synchronously, then lets the partition go.
//! - **Lost** (a revoke with `assignment_lost`): `Lost` goes to the pool; nothing is
//!   committed.
//! - **Commits**: every acknowledgement moves its partition's ack floor; the floors that
//!   moved are committed together every `commit_interval`, each with its metadata
//!   (epoch, highest delivered offset, records completed above the floor).
//! - **Backpressure**: when the pool takes no more records, every partition is paused and
//!   the thread keeps polling (heartbeats, rebalances) until it does.
//! - **Release** of a record (the pool gives it back): the partition is sought back to it
//!   after the delay; records completed meanwhile are skipped, records the pool still
//!   holds come again and are dropped by the pool as duplicates.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualbus_core::offsets::{AckFloor, DeliveryCounter};
use dualbus_core::{
    Acker, Delivery, DomainSubscription, Error, GroupControl, GroupEvent, GroupMembership,
    PartitionControl, Reread, Result, StartPosition, SubscriptionSpec,
};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::metadata::{self, CommitMeta};
use crate::reader::inbound;
use crate::{BACKEND, KafkaConfig, Logs, kafka_error};

/// When the mutant's naive takeover reads the former owner's unfinished records again.
const NAIVE_REDELIVERY: Duration = Duration::from_secs(5);

/// How long closing waits for a member's thread.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// How long a leaving member polls for its revocation before it closes the consumer.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

/// How long the pool may take no records before every partition is paused.
const PAUSE_AFTER: Duration = Duration::from_millis(100);

/// What the pool (or the transport) asks of the member's thread.
enum Cmd {
    Rewind(u32, u64, oneshot::Sender<Result<()>>),
    Release(u32, u64),
    Pause(u32),
    Resume(u32),
    Flush(oneshot::Sender<Result<()>>),
}

/// One partition as this member owns it.
struct Part {
    epoch: u64,
    floor: AckFloor,
    /// The floor (or the completed set) changed since the last commit.
    dirty: bool,
    delivered_through: Option<u64>,
    counter: DeliveryCounter,
    /// The pool rewound it: its epoch is committed and records may flow.
    rewound: bool,
    /// Paused by the pool (draining) or not yet rewound.
    held: bool,
}

/// A release's wish: seek `partition` back to `offset` at `due`.
struct Seek {
    due: Instant,
    partition: u32,
    offset: u64,
    epoch: u64,
}

/// State shared by the thread, the acknowledgement handles and the transport.
struct Shared {
    topic: String,
    group: String,
    config: Arc<KafkaConfig>,
    parts: Mutex<HashMap<u32, Part>>,
    /// The highest offset this member delivered of partitions it no longer owns: if it
    /// gets one back (a lost session, a rebalance), records at or below it count as
    /// redelivered even when its last commit did not say so.
    delivered_before: Mutex<HashMap<u32, u64>>,
    seeks: Mutex<Vec<Seek>>,
    stop: AtomicBool,
    finished: AtomicBool,
    /// An asynchronous commit failed: commit every partition again.
    recommit: AtomicBool,
    /// When the group coordinator last answered this member: a synchronous commit taken,
    /// or committed offsets read (the asynchronous commits' results never reach the
    /// context in practice, see `Ctx::commit_callback`).
    last_contact: Mutex<Instant>,
    metadata_overflows: Arc<AtomicU64>,
}

impl Shared {
    /// The group coordinator answered.
    fn touch(&self) {
        *self.last_contact.lock() = Instant::now();
    }

    /// Commits `list` synchronously, noting the contact.
    fn commit_sync(&self, c: &BaseConsumer<Ctx>, list: &TopicPartitionList) -> KafkaResult<()> {
        c.commit(list, CommitMode::Sync)?;
        self.touch();
        Ok(())
    }

    /// Drops partition `p` from `parts`, remembering how far it was delivered.
    fn forget(&self, parts: &mut HashMap<u32, Part>, p: u32) {
        if let Some(d) = parts.remove(&p).and_then(|st| st.delivered_through) {
            let mut before = self.delivered_before.lock();
            let e = before.entry(p).or_insert(d);
            *e = (*e).max(d);
        }
    }

    /// The commit list of the given partitions (all owned and rewound ones when `None`,
    /// else only those that changed unless `force`).
    fn commit_list(&self, only: Option<&[u32]>, force: bool) -> Option<TopicPartitionList> {
        let max = self.config.consumer.metadata_max_bytes;
        let mut parts = self.parts.lock();
        let mut tpl = TopicPartitionList::new();
        let mut any = false;
        for (p, st) in parts.iter_mut() {
            if only.is_some_and(|o| !o.contains(p)) || !st.rewound || !(st.dirty || force) {
                continue;
            }
            let floor = st.floor.floor();
            let meta = CommitMeta {
                epoch: st.epoch,
                delivered_through: st.delivered_through,
                completed: if self.config.consumer.completed_in_metadata {
                    st.floor.acked_above_offsets().collect()
                } else {
                    Vec::new()
                },
            };
            let encoded = metadata::encode(floor, &meta, max);
            if encoded.dropped {
                self.metadata_overflows.fetch_add(1, Ordering::Relaxed);
            }
            let (Ok(pi), Ok(off)) = (i32::try_from(*p), i64::try_from(floor)) else {
                continue;
            };
            if tpl
                .add_partition_offset(&self.topic, pi, Offset::Offset(off))
                .is_ok()
                && let Some(mut e) = tpl.find_partition(&self.topic, pi)
            {
                e.set_metadata(encoded.text);
                st.dirty = false;
                any = true;
            }
        }
        any.then_some(tpl)
    }
}

/// The consumer's context: rebalances, commit results.
struct Ctx {
    shared: Arc<Shared>,
    cmds: Mutex<mpsc::Receiver<Cmd>>,
    events: tmpsc::UnboundedSender<GroupEvent>,
    /// Partitions paused on the broker client now.
    paused: Mutex<HashSet<u32>>,
    /// The pool takes no more records: every partition is paused.
    backpressure: AtomicBool,
    /// Releases received (partition, epoch), waited for by a revocation.
    released: Mutex<HashSet<(u32, u64)>>,
    start: StartPosition,
}

impl rdkafka::ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        rdkafka::ClientContext::log(&Logs, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        rdkafka::ClientContext::error(&Logs, error, reason);
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer, tpl),
            other => {
                tracing::warn!(topic = %self.shared.topic, group = %self.shared.group, error = ?other, "rebalance error");
                // librdkafka asks the application to drop its assignment on an error.
                let lost = self.owned();
                self.lose(&lost);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign after a rebalance error failed");
                }
            }
        }
    }

    /// Results of asynchronous commits. Observed with rdkafka 0.39 and a `BaseConsumer`:
    /// it is not called. Neither contact nor commits depend on it: every owned partition is
    /// committed again each third of a session (see `commit_if_due`), so a failed
    /// asynchronous commit is repeated within that time.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.shared.touch(),
            Err(e) => {
                tracing::warn!(topic = %self.shared.topic, group = %self.shared.group, error = %e, "commit failed; committing again");
                self.shared.recommit.store(true, Ordering::Release);
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<u32> {
    tpl.elements_for_topic(topic)
        .iter()
        .filter_map(|e| u32::try_from(e.partition()).ok())
        .collect()
}

fn tpl_of(topic: &str, parts: impl IntoIterator<Item = u32>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        if let Ok(p) = i32::try_from(p) {
            tpl.add_partition(topic, p);
        }
    }
    tpl
}

impl Ctx {
    fn owned(&self) -> Vec<(u32, u64)> {
        self.shared
            .parts
            .lock()
            .iter()
            .map(|(p, s)| (*p, s.epoch))
            .collect()
    }

    /// Forgets `parts` and tells the pool they are lost.
    fn lose(&self, parts: &[(u32, u64)]) {
        let mut all = self.shared.parts.lock();
        for (p, epoch) in parts {
            self.shared.forget(&mut all, *p);
            let _ = self.events.send(GroupEvent::Lost {
                partition: *p,
                epoch: *epoch,
            });
        }
        drop(all);
        let mut paused = self.paused.lock();
        for (p, _) in parts {
            paused.remove(p);
        }
    }

    fn on_assign(&self, c: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let parts = partitions_of(tpl, &self.shared.topic);
        if parts.is_empty() {
            let _ = c.incremental_assign(tpl);
            return;
        }
        self.take(c, &parts, false);
    }

    /// Takes `parts` under new epochs: from the committed offsets and their metadata, paused
    /// until the pool's rewind. `adopt`: they are assigned on the client already (stopped
    /// here after a missed session that the broker did not act on), so they are sought
    /// back to the committed offsets instead of assigned.
    fn take(&self, c: &BaseConsumer<Self>, parts: &[u32], adopt: bool) {
        let topic = self.shared.topic.clone();
        let timeout = self.shared.config.request_timeout;
        // The committed offsets and their metadata; a failure is retried, then taken as
        // "nothing committed" only for the epoch (the start is then librdkafka's).
        let mut committed = None;
        for attempt in 0..3 {
            match c.committed_offsets(tpl_of(&topic, parts.iter().copied()), timeout) {
                Ok(t) => {
                    // The coordinator answered: contact, as a commit taken is.
                    self.shared.touch();
                    committed = Some(t);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%topic, attempt, error = %e, "reading committed offsets failed");
                }
            }
        }
        let mut assign = TopicPartitionList::new();
        let mut assigned = Vec::new();
        for p in parts {
            let Ok(pi) = i32::try_from(*p) else { continue };
            let (offset, meta) = committed
                .as_ref()
                .and_then(|t| t.find_partition(&topic, pi))
                .map_or((None, String::new()), |e| match e.offset() {
                    Offset::Offset(o) => (u64::try_from(o).ok(), e.metadata().to_owned()),
                    _ => (None, e.metadata().to_owned()),
                });
            let prior = offset.map_or_else(CommitMeta::default, |o| metadata::decode(o, &meta));
            let start = match offset {
                Some(o) => Some(o),
                None => {
                    // Nothing committed: the topic's start or end.
                    let (low, high) = c.fetch_watermarks(&topic, pi, timeout).unwrap_or((0, 0));
                    let at = if self.start == StartPosition::Latest {
                        high
                    } else {
                        low
                    };
                    u64::try_from(at).ok()
                }
            };
            let Some(start) = start else { continue };
            // The mutant's naive takeover: fetch from where the former owner had read,
            // not from what it completed; what it left unfinished is read again only
            // after a delay (as a broker's redelivery timeout would bring it).
            let fetch_from = match (offset, prior.delivered_through) {
                (Some(_), Some(d)) if !self.shared.config.rewind => {
                    self.shared.seeks.lock().push(Seek {
                        due: Instant::now() + NAIVE_REDELIVERY,
                        partition: *p,
                        offset: start,
                        epoch: prior.epoch + 1,
                    });
                    d + 1
                }
                _ => start,
            };
            let mut floor = AckFloor::new(start);
            for o in &prior.completed {
                floor.ack(*o);
            }
            // Delivered before: as far as the metadata knows, or as far as this member
            // delivered it before it lost the partition (past its last commit).
            let delivered = prior
                .delivered_through
                .max(self.shared.delivered_before.lock().get(p).copied());
            let mut counter = DeliveryCounter::new();
            if let Some(d) = delivered {
                counter.delivered_through(d);
            }
            let epoch = prior.epoch + 1;
            self.shared.parts.lock().insert(
                *p,
                Part {
                    epoch,
                    floor,
                    dirty: true,
                    delivered_through: delivered,
                    counter,
                    rewound: false,
                    held: true,
                },
            );
            let Ok(start_i) = i64::try_from(fetch_from) else {
                continue;
            };
            if assign
                .add_partition_offset(&topic, pi, Offset::Offset(start_i))
                .is_ok()
            {
                assigned.push((*p, epoch));
            }
        }
        if adopt {
            for e in assign.elements() {
                if let Err(err) = c.seek(&topic, e.partition(), e.offset(), timeout) {
                    tracing::error!(%topic, partition = e.partition(), error = %err, "seek to the committed offset failed");
                }
            }
        } else if let Err(e) = c.incremental_assign(&assign) {
            tracing::error!(%topic, error = %e, "incremental assign failed");
        }
        if let Err(e) = c.pause(&assign) {
            tracing::error!(%topic, error = %e, "pausing newly assigned partitions failed");
        }
        {
            let mut paused = self.paused.lock();
            paused.extend(assigned.iter().map(|(p, _)| *p));
        }
        tracing::debug!(%topic, group = %self.shared.group, ?assigned, adopt, "assigned");
        for (partition, epoch) in assigned {
            let _ = self.events.send(GroupEvent::Assigned { partition, epoch });
        }
    }

    fn on_revoke(&self, c: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let topic = self.shared.topic.clone();
        let parts = partitions_of(tpl, &topic);
        let revoked: Vec<(u32, u64)> = {
            let all = self.shared.parts.lock();
            parts
                .iter()
                .filter_map(|p| all.get(p).map(|s| (*p, s.epoch)))
                .collect()
        };
        if c.assignment_lost() {
            tracing::debug!(%topic, group = %self.shared.group, ?revoked, "assignment lost");
            self.lose(&revoked);
        } else {
            tracing::debug!(%topic, group = %self.shared.group, ?revoked, "revoked");
            let mut waiting: HashSet<(u32, u64)> = HashSet::new();
            for (partition, epoch) in &revoked {
                let event = GroupEvent::Revoked {
                    partition: *partition,
                    epoch: *epoch,
                };
                if self.events.send(event).is_ok() {
                    waiting.insert((*partition, *epoch));
                }
            }
            let deadline = Instant::now() + self.shared.config.consumer.revoke_timeout;
            loop {
                {
                    let released = self.released.lock();
                    waiting.retain(|w| !released.contains(w));
                }
                if waiting.is_empty() || self.shared.stop.load(Ordering::Acquire) {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!(%topic, ?waiting, "revoked partitions not drained within the revoke timeout; committing what completed");
                    break;
                }
                self.next_cmd(c, (deadline - now).min(Duration::from_millis(50)));
            }
            let ids: Vec<u32> = revoked.iter().map(|(p, _)| *p).collect();
            if let Some(list) = self.shared.commit_list(Some(&ids), true)
                && let Err(e) = self.shared.commit_sync(c, &list)
            {
                tracing::warn!(%topic, error = %e, "commit of revoked partitions failed");
            }
            let mut all = self.shared.parts.lock();
            for p in &ids {
                self.shared.forget(&mut all, *p);
            }
            drop(all);
            let mut released = self.released.lock();
            released.retain(|(p, _)| !ids.contains(p));
        }
        {
            let mut paused = self.paused.lock();
            for p in &parts {
                paused.remove(p);
            }
        }
        if let Err(e) = c.incremental_unassign(tpl) {
            tracing::warn!(%topic, error = %e, "incremental unassign failed");
        }
    }

    /// Waits up to `wait` for one command and runs it.
    fn next_cmd(&self, c: &BaseConsumer<Self>, wait: Duration) -> bool {
        let cmd = self.cmds.lock().recv_timeout(wait);
        match cmd {
            Ok(cmd) => {
                self.run(c, cmd);
                true
            }
            Err(_) => false,
        }
    }

    /// Runs every queued command.
    fn run_queued(&self, c: &BaseConsumer<Self>) {
        loop {
            let cmd = self.cmds.lock().try_recv();
            match cmd {
                Ok(cmd) => self.run(c, cmd),
                Err(_) => return,
            }
        }
    }

    fn run(&self, c: &BaseConsumer<Self>, cmd: Cmd) {
        match cmd {
            Cmd::Rewind(p, epoch, reply) => {
                let r = self.rewind(c, p, epoch);
                let _ = reply.send(r);
            }
            Cmd::Release(p, epoch) => {
                self.released.lock().insert((p, epoch));
            }
            Cmd::Pause(p) => {
                if let Some(st) = self.shared.parts.lock().get_mut(&p) {
                    st.held = true;
                }
                self.apply_pauses(c);
            }
            Cmd::Resume(p) => {
                if let Some(st) = self.shared.parts.lock().get_mut(&p)
                    && st.rewound
                {
                    st.held = false;
                }
                self.apply_pauses(c);
            }
            Cmd::Flush(reply) => {
                let r = match self.shared.commit_list(None, true) {
                    Some(list) => self.shared.commit_sync(c, &list).map_err(kafka_error),
                    None => Ok(()),
                };
                let _ = reply.send(r);
            }
        }
    }

    /// Commits the new epoch (with the floor and what completed above it) and lets the
    /// partition's records flow.
    fn rewind(&self, c: &BaseConsumer<Self>, p: u32, epoch: u64) -> Result<()> {
        {
            let mut all = self.shared.parts.lock();
            match all.get_mut(&p) {
                Some(st) if st.epoch == epoch => st.rewound = true,
                _ => {
                    return Err(Error::Conflict(format!(
                        "partition {p} of {} is no longer owned under epoch {epoch}",
                        self.shared.topic
                    )));
                }
            }
        }
        let list = self.shared.commit_list(Some(&[p]), true);
        if let Some(list) = list
            && let Err(e) = self.shared.commit_sync(c, &list)
        {
            if let Some(st) = self.shared.parts.lock().get_mut(&p) {
                st.rewound = false;
            }
            return Err(kafka_error(e));
        }
        if let Some(st) = self.shared.parts.lock().get_mut(&p) {
            st.held = false;
        }
        self.apply_pauses(c);
        Ok(())
    }

    /// Pauses and resumes partitions on the client so that it matches what is wanted:
    /// paused when held or under backpressure.
    fn apply_pauses(&self, c: &BaseConsumer<Self>) {
        let bp = self.backpressure.load(Ordering::Acquire);
        let want: HashMap<u32, bool> = self
            .shared
            .parts
            .lock()
            .iter()
            .map(|(p, s)| (*p, s.held || bp))
            .collect();
        let mut paused = self.paused.lock();
        let to_pause: Vec<u32> = want
            .iter()
            .filter(|(p, w)| **w && !paused.contains(p))
            .map(|(p, _)| *p)
            .collect();
        let to_resume: Vec<u32> = want
            .iter()
            .filter(|(p, w)| !**w && paused.contains(p))
            .map(|(p, _)| *p)
            .collect();
        let topic = &self.shared.topic;
        if !to_pause.is_empty() {
            match c.pause(&tpl_of(topic, to_pause.iter().copied())) {
                Ok(()) => paused.extend(to_pause),
                Err(e) => tracing::warn!(%topic, error = %e, "pause failed"),
            }
        }
        if !to_resume.is_empty() {
            match c.resume(&tpl_of(topic, to_resume.iter().copied())) {
                Ok(()) => {
                    for p in to_resume {
                        paused.remove(&p);
                    }
                }
                Err(e) => tracing::warn!(%topic, error = %e, "resume failed"),
            }
        }
    }

    fn set_backpressure(&self, c: &BaseConsumer<Self>, on: bool) {
        if self.backpressure.swap(on, Ordering::AcqRel) != on {
            self.apply_pauses(c);
        }
    }

    /// Seeks the partitions whose release delay passed back to the released records.
    /// Returns the partitions sought, with the offset.
    fn due_seeks(&self, c: &BaseConsumer<Self>) -> Vec<(u32, u64)> {
        let now = Instant::now();
        let due: Vec<Seek> = {
            let mut seeks = self.shared.seeks.lock();
            let (due, later): (Vec<Seek>, Vec<Seek>) = seeks.drain(..).partition(|s| s.due <= now);
            *seeks = later;
            due
        };
        let mut sought = Vec::new();
        for s in due {
            let owned = self
                .shared
                .parts
                .lock()
                .get(&s.partition)
                .is_some_and(|st| st.epoch == s.epoch);
            let (Ok(p), Ok(o)) = (i32::try_from(s.partition), i64::try_from(s.offset)) else {
                continue;
            };
            if owned {
                match c.seek(
                    &self.shared.topic,
                    p,
                    Offset::Offset(o),
                    Duration::from_secs(5),
                ) {
                    Ok(()) => sought.push((s.partition, s.offset)),
                    Err(e) => {
                        tracing::warn!(topic = %self.shared.topic, partition = p, error = %e, "seek back to a released record failed")
                    }
                }
            }
        }
        sought
    }
}

/// The acknowledgement handle of one record.
struct KafkaAcker {
    shared: Arc<Shared>,
    partition: u32,
    offset: u64,
    epoch: u64,
    count: u32,
}

impl KafkaAcker {
    fn not_owned(&self) -> Error {
        Error::Conflict(format!(
            "partition {} of {} is no longer owned under epoch {}",
            self.partition, self.shared.topic, self.epoch
        ))
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    /// Counts toward the partition's contiguous commit.
    async fn ack(&self) -> Result<()> {
        let mut parts = self.shared.parts.lock();
        match parts.get_mut(&self.partition) {
            Some(st) if st.epoch == self.epoch => {
                st.floor.ack(self.offset);
                st.counter.forget(self.offset);
                st.dirty = true;
                Ok(())
            }
            _ => Err(self.not_owned()),
        }
    }

    /// Kafka cannot deliver one record again: the partition is sought back to it after
    /// `delay` (records completed meanwhile are skipped).
    async fn release(&self, delay: Duration) -> Result<()> {
        {
            let mut parts = self.shared.parts.lock();
            match parts.get_mut(&self.partition) {
                Some(st) if st.epoch == self.epoch => st.counter.rewound(self.offset, self.count),
                _ => return Err(self.not_owned()),
            }
        }
        self.shared.seeks.lock().push(Seek {
            due: Instant::now() + delay,
            partition: self.partition,
            offset: self.offset,
            epoch: self.epoch,
        });
        Ok(())
    }
}

/// The pool's handle on the member's partitions.
struct Control {
    cmds: mpsc::Sender<Cmd>,
    timeout: Duration,
}

impl PartitionControl for Control {
    fn pause(&self, partition: u32) {
        let _ = self.cmds.send(Cmd::Pause(partition));
    }

    fn resume(&self, partition: u32) {
        let _ = self.cmds.send(Cmd::Resume(partition));
    }
}

#[async_trait]
impl GroupControl for Control {
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Rewind(partition, epoch, tx))
            .map_err(|_| Error::closed("kafka subscription"))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::closed("kafka subscription")),
            Err(_) => Err(Error::Timeout {
                operation: "rewind (commit of the new epoch)",
                after: self.timeout,
            }),
        }
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        self.cmds
            .send(Cmd::Release(partition, epoch))
            .map_err(|_| Error::closed("kafka subscription"))
    }
}

/// The transport's handle on a member: flush its commits, stop it.
#[derive(Clone)]
pub(crate) struct Member {
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Cmd>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Member {
    pub(crate) fn finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Commits what completed, now.
    pub(crate) async fn flush(&self) -> Result<()> {
        if self.finished() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Flush(tx)).is_err() {
            return Ok(());
        }
        match tokio::time::timeout(self.shared.config.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            // The thread ended meanwhile: it committed on its way out.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(Error::Timeout {
                operation: "commit",
                after: self.shared.config.request_timeout,
            }),
        }
    }

    /// Ends the member: its thread commits what completed and leaves the group. Waits for
    /// it at most [`STOP_WAIT`]: a thread stuck in librdkafka is left behind (with a
    /// warning) rather than blocking the caller.
    pub(crate) async fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        while !self.finished() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(topic = %self.shared.topic, group = %self.shared.group, "the consumer did not close within {STOP_WAIT:?}; left behind");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(t) = self.thread.lock().take() {
            // Finished: the join returns at once.
            let _ = t.join();
        }
    }
}

/// Starts a member of `spec.group` on `spec.topic`.
pub(crate) fn start(
    config: Arc<KafkaConfig>,
    spec: SubscriptionSpec,
    reread: Arc<dyn Reread>,
    metadata_overflows: Arc<AtomicU64>,
) -> Result<(Member, DomainSubscription)> {
    let topic = spec.topic.as_str().to_owned();
    let shared = Arc::new(Shared {
        topic: topic.clone(),
        group: spec.group.clone(),
        config: config.clone(),
        parts: Mutex::new(HashMap::new()),
        delivered_before: Mutex::new(HashMap::new()),
        seeks: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        recommit: AtomicBool::new(false),
        last_contact: Mutex::new(Instant::now()),
        metadata_overflows,
    });
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (event_tx, mut event_rx) = tmpsc::unbounded_channel();
    let (tx, mut rx) = tmpsc::channel::<Result<Delivery>>(config.consumer.prefetch);
    let ctx = Ctx {
        shared: shared.clone(),
        cmds: Mutex::new(cmd_rx),
        events: event_tx,
        paused: Mutex::new(HashSet::new()),
        backpressure: AtomicBool::new(false),
        released: Mutex::new(HashSet::new()),
        start: spec.start,
    };
    let consumer: BaseConsumer<Ctx> = config
        .consumer_config(&spec.group)
        .create_with_context(ctx)
        .map_err(|e| Error::config("kafka.properties", e.to_string()))?;
    consumer.subscribe(&[&topic]).map_err(kafka_error)?;
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("dualbus-kafka-{topic}"))
        .spawn(move || {
            run(&consumer, &thread_shared, &tx);
            drop(consumer);
            thread_shared.finished.store(true, Ordering::Release);
        })
        .map_err(|e| Error::backend(BACKEND, false, e))?;
    let member = Member {
        shared: shared.clone(),
        cmds: cmd_tx.clone(),
        thread: Arc::new(Mutex::new(Some(thread))),
    };
    let guard = StopOnDrop(shared);
    let deliveries = futures::stream::poll_fn(move |cx| {
        let _ = &guard;
        rx.poll_recv(cx)
    });
    let events = futures::stream::poll_fn(move |cx| event_rx.poll_recv(cx));
    let control = Arc::new(Control {
        cmds: cmd_tx,
        timeout: config.request_timeout * 2,
    });
    let subscription = DomainSubscription::new(Box::pin(deliveries))
        .with_reread(reread)
        .with_group(GroupMembership {
            events: Box::pin(events),
            control,
        });
    Ok((member, subscription))
}

/// Stops the member when its delivery stream is dropped.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

/// The member's thread: polls, hands records to the pool, commits.
fn run(c: &BaseConsumer<Ctx>, shared: &Arc<Shared>, tx: &tmpsc::Sender<Result<Delivery>>) {
    let ctx = c.context().clone();
    let interval = shared.config.consumer.commit_interval;
    let mut next_commit = Instant::now() + interval;
    let mut pending: Option<Delivery> = None;
    let mut overflow: VecDeque<Delivery> = VecDeque::new();
    let mut full_since: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Acquire) || tx.is_closed() {
            break;
        }
        ctx.run_queued(c);
        let sought = ctx.due_seeks(c);
        if !sought.is_empty() {
            // Records at or after a seek come again: drop the copies not handed over yet.
            let stale = |d: &Delivery| {
                sought.iter().any(|(p, o)| {
                    d.position().partition == *p && d.position().offset >= u128::from(*o)
                })
            };
            if pending.as_ref().is_some_and(stale) {
                pending = None;
            }
            overflow.retain(|d| !stale(d));
        }
        if let Some(d) = pending.take() {
            match tx.try_send(Ok(d)) {
                Ok(()) => {
                    full_since = None;
                    ctx.set_backpressure(c, false);
                }
                Err(tmpsc::error::TrySendError::Full(Ok(d))) => {
                    pending = Some(d);
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < PAUSE_AFTER {
                        // A pool that is only a little behind: wait for room without
                        // pausing (a pause drops librdkafka's fetched records, which a
                        // resume fetches again).
                        std::thread::sleep(Duration::from_millis(1));
                    } else {
                        ctx.set_backpressure(c, true);
                        // Keep polling: heartbeats and rebalances are served here.
                        if let Some(d) = poll_one(c, shared, Duration::from_millis(20)) {
                            overflow.push_back(d);
                        }
                    }
                    commit_if_due(c, shared, &mut next_commit, interval);
                    continue;
                }
                Err(_) => break,
            }
        }
        if let Some(d) = overflow.pop_front() {
            pending = Some(d);
            continue;
        }
        // Short: commands (a rewind, a pause) wait for the next turn of this loop.
        pending = poll_one(c, shared, Duration::from_millis(20));
        commit_if_due(c, shared, &mut next_commit, interval);
    }
    // On the way out: commit what completed, then leave the group while polling, so that
    // the revocation runs here (closing a consumer that still holds partitions was seen to
    // hang in librdkafka's unassign).
    if let Some(list) = shared.commit_list(None, true)
        && let Err(e) = c.commit(&list, CommitMode::Sync)
    {
        tracing::warn!(topic = %shared.topic, error = %e, "final commit failed");
    }
    c.unsubscribe();
    let deadline = Instant::now() + LEAVE_WAIT;
    while Instant::now() < deadline && c.assignment().is_ok_and(|a| a.count() > 0) {
        let _ = c.poll(Duration::from_millis(20));
    }
}

fn commit_if_due(c: &BaseConsumer<Ctx>, shared: &Shared, next: &mut Instant, interval: Duration) {
    let now = Instant::now();
    if now < *next {
        return;
    }
    *next = now + interval;
    let session = shared.config.consumer.session_timeout;
    // Contact is due every third of a session. Then every owned partition is committed
    // again, moved or not: an asynchronous commit that failed (its result never reaches
    // this thread) is repeated within that time.
    let contact_due = now.duration_since(*shared.last_contact.lock()) >= session / 3;
    let force = shared.recommit.swap(false, Ordering::AcqRel) || contact_due;
    if let Some(list) = shared.commit_list(None, force)
        && let Err(e) = c.commit(&list, CommitMode::Async)
    {
        tracing::warn!(topic = %shared.topic, error = %e, "commit failed");
        shared.recommit.store(true, Ordering::Release);
    }
    let ctx = c.context();
    // Ask the group coordinator for the committed offsets now and then (bounded by a third
    // of the session): an answer is the contact that keeps the partitions here.
    if contact_due {
        let owned: Vec<u32> = ctx.owned().into_iter().map(|(p, _)| p).collect();
        // Nothing owned: nothing to stop, so nothing to ask.
        if owned.is_empty()
            || c.committed_offsets(tpl_of(&shared.topic, owned), session / 3)
                .is_ok()
        {
            shared.touch();
        }
    }
    let silent = Instant::now().duration_since(*shared.last_contact.lock());
    if silent > session {
        let owned = ctx.owned();
        if !owned.is_empty() {
            // A whole session without a commit taken: the broker has fenced this member
            // (or will before it hears from it); another member may own these partitions
            // now. Stop them here at once rather than when librdkafka learns of it.
            tracing::warn!(topic = %shared.topic, group = %shared.group, ?silent, "no commit taken for a session timeout; the partitions are stopped here until the group gives them back");
            let ids: Vec<u32> = owned.iter().map(|(p, _)| *p).collect();
            ctx.lose(&owned);
            if let Err(e) = c.pause(&tpl_of(&shared.topic, ids)) {
                tracing::warn!(topic = %shared.topic, error = %e, "pausing stopped partitions failed");
            }
        }
        shared.touch();
    } else if silent < session / 3 {
        // Contact again, and no rebalance took the stopped partitions away: take them
        // back under new epochs, from the committed offsets.
        let stopped: Vec<u32> = match c.assignment() {
            Ok(a) => {
                let parts = shared.parts.lock();
                partitions_of(&a, &shared.topic)
                    .into_iter()
                    .filter(|p| !parts.contains_key(p))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        if !stopped.is_empty() {
            tracing::info!(topic = %shared.topic, group = %shared.group, ?stopped, "the group kept the stopped partitions; taking them back");
            ctx.take(c, &stopped, true);
        }
    }
}

/// Polls once; a record of an owned partition that is not completed already becomes a
/// delivery.
fn poll_one(c: &BaseConsumer<Ctx>, shared: &Arc<Shared>, wait: Duration) -> Option<Delivery> {
    match c.poll(wait)? {
        Ok(m) => {
            let partition = u32::try_from(m.partition()).ok()?;
            let offset = u64::try_from(m.offset()).ok()?;
            let (epoch, count) = {
                let mut parts = shared.parts.lock();
                let st = parts.get_mut(&partition)?;
                if !st.rewound || st.floor.is_acked(offset) {
                    return None;
                }
                let count = st.counter.count(offset, 1);
                st.delivered_through = Some(st.delivered_through.map_or(offset, |d| d.max(offset)));
                (st.epoch, count)
            };
            let (message, problem) = inbound(&shared.topic, &m);
            let acker = Arc::new(KafkaAcker {
                shared: shared.clone(),
                partition,
                offset,
                epoch,
                count,
            });
            let mut d = Delivery::new(message, count, acker).with_epoch(epoch);
            if let Some(why) = problem {
                d = d.unreadable(why);
            }
            Some(d)
        }
        Err(e) => {
            tracing::warn!(topic = %shared.topic, error = %e, "consumer error");
            None
        }
    }
}
