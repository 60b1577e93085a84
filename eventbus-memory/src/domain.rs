//! The domain transport: partitioned logs, durable consumer groups with members,
//! rendezvous assignment, ack deadlines, redelivery, an ack floor per partition and the
//! rewind at takeover.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dualbus_core::partition::partition_for;
use dualbus_core::{
    Acker, Capabilities, Delivery, DomainSubscription, DomainTransport, Error, GroupControl,
    GroupEvent, GroupMembership, Headers, InboundMessage, OutboundMessage, PartitionControl,
    Position, Receipt, Result, StartPosition, SubscriptionSpec, validate_topic,
};
use futures::StreamExt as _;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Memory;

#[derive(Debug)]
struct Stored {
    key: String,
    headers: Headers,
    payload: Bytes,
}

#[derive(Debug, Default)]
pub(crate) struct DomainBroker {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

#[derive(Debug)]
struct Topic {
    name: String,
    /// One append-only log per partition.
    logs: Mutex<Vec<Vec<Arc<Stored>>>>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

#[derive(Debug)]
struct Pending {
    deadline: Instant,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Cursor {
    /// Next offset to look at for a first delivery.
    next: u64,
    /// Delivered and not acknowledged.
    pending: BTreeMap<u64, Pending>,
    /// Every offset below it is acknowledged.
    floor: u64,
    /// Acknowledged offsets above the floor.
    acked: BTreeSet<u64>,
    /// Deliveries so far of messages that a rewind took back from an earlier owner, so that
    /// their delivery count goes on instead of starting again at 1.
    delivered_before: BTreeMap<u64, u32>,
    paused: bool,
}

impl Cursor {
    fn settle(&mut self, offset: u64) {
        self.pending.remove(&offset);
        self.delivered_before.remove(&offset);
        if offset >= self.floor {
            self.acked.insert(offset);
        }
        while self.acked.remove(&self.floor) {
            self.floor += 1;
        }
    }
}

/// The current owner of a partition.
#[derive(Debug, Clone, Copy)]
struct Owner {
    member: u64,
    epoch: u64,
    /// The owner asked for the rewind: the partition is delivered.
    rewound: bool,
    /// Revoked: waiting for the owner to drain and release it.
    revoking: bool,
}

#[derive(Debug)]
struct Member {
    /// The name rendezvous hashing ranks.
    name: String,
    events: async_channel::Sender<GroupEvent>,
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct GroupState {
    cursors: Vec<Cursor>,
    /// Redelivery deadlines: `(deadline, partition, offset)`, one per pending message.
    timers: BTreeSet<(Instant, u32, u64)>,
    /// Round-robin start for fairness between partitions.
    rr: usize,
    members: BTreeMap<u64, Member>,
    next_member: u64,
    owners: Vec<Option<Owner>>,
    /// The last epoch handed out, per partition.
    epochs: Vec<u64>,
}

impl GroupState {
    fn set_deadline(&mut self, partition: u32, offset: u64, deadline: Instant) -> bool {
        let Some(p) = self
            .cursors
            .get_mut(partition as usize)
            .and_then(|c| c.pending.get_mut(&offset))
        else {
            return false;
        };
        self.timers.remove(&(p.deadline, partition, offset));
        p.deadline = deadline;
        self.timers.insert((deadline, partition, offset));
        true
    }

    fn settle(&mut self, partition: u32, offset: u64) {
        if let Some(c) = self.cursors.get_mut(partition as usize) {
            if let Some(p) = c.pending.get(&offset) {
                self.timers.remove(&(p.deadline, partition, offset));
            }
            c.settle(offset);
        }
    }

    /// Whether `member` owns `partition` under `epoch`.
    fn owned_by(&self, partition: u32, member: u64, epoch: u64) -> bool {
        self.owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == member && o.epoch == epoch)
    }

    /// Whether `member` consumes `partition` now (owned, rewound, not revoked, not paused).
    fn consumes(&self, partition: u32, member: u64) -> bool {
        let owned = self
            .owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == member && o.rewound && !o.revoking);
        owned && !self.cursors[partition as usize].paused
    }

    /// Moves every partition toward its rendezvous owner among the live members: a free
    /// partition is assigned at once (new epoch); an owned one is revoked from its owner,
    /// who drains and releases it, and only then is it assigned.
    fn rebalance(&mut self) {
        let names: Vec<&str> = self.members.values().map(|m| m.name.as_str()).collect();
        let by_name: HashMap<&str, u64> = self
            .members
            .iter()
            .map(|(id, m)| (m.name.as_str(), *id))
            .collect();
        let mut sends: Vec<(u64, GroupEvent)> = Vec::new();
        for p in 0..self.owners.len() {
            let partition = p as u32;
            let desired = dualbus_core::group::owner(partition, names.iter().copied())
                .and_then(|n| by_name.get(n).copied());
            match self.owners[p] {
                Some(o) if Some(o.member) == desired => {}
                Some(mut o) if self.members.contains_key(&o.member) => {
                    if !o.revoking {
                        o.revoking = true;
                        self.owners[p] = Some(o);
                        sends.push((
                            o.member,
                            GroupEvent::Revoked {
                                partition,
                                epoch: o.epoch,
                            },
                        ));
                    }
                }
                _ => {
                    // Free, or its owner is gone: assign it.
                    self.owners[p] = None;
                    if let Some(member) = desired {
                        self.epochs[p] += 1;
                        let epoch = self.epochs[p];
                        self.owners[p] = Some(Owner {
                            member,
                            epoch,
                            rewound: false,
                            revoking: false,
                        });
                        self.cursors[p].paused = false;
                        sends.push((member, GroupEvent::Assigned { partition, epoch }));
                    }
                }
            }
        }
        for (member, event) in sends {
            if let Some(m) = self.members.get(&member) {
                // Unbounded: the member reads its events before anything else.
                let _ = m.events.try_send(event);
            }
        }
    }

    fn wake_members(&self) {
        for m in self.members.values() {
            m.wake.notify_one();
        }
    }
}

#[derive(Debug)]
struct Group {
    state: Mutex<GroupState>,
}

impl Topic {
    fn new(name: &str, partitions: usize) -> Self {
        Self {
            name: name.to_owned(),
            logs: Mutex::new((0..partitions).map(|_| Vec::new()).collect()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    fn partitions(&self) -> usize {
        self.logs.lock().len()
    }

    fn wake_all(&self) {
        for g in self.groups.lock().values() {
            g.state.lock().wake_members();
        }
    }
}

impl Memory {
    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.broker.domain.topics.lock();
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        let partitions = self.broker.config.partitions_of(name);
        topics
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Topic::new(name, partitions)))
            .clone()
    }

    fn check_domain_open(&self) -> Result<()> {
        if self.handle.domain_closed.is_cancelled() {
            Err(Error::closed("memory domain transport"))
        } else {
            Ok(())
        }
    }

    fn append(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        self.append_locked(topic.logs.lock(), message)
    }

    fn append_locked(
        &self,
        mut logs: parking_lot::MutexGuard<'_, Vec<Vec<Arc<Stored>>>>,
        message: OutboundMessage,
    ) -> Result<Receipt> {
        if message.key.is_empty() {
            return Err(Error::InvalidEnvelope(dualbus_core::EnvelopeError::Blank {
                field: "aggregate_id",
            }));
        }
        crate::check_size(
            &self.broker.domain_caps,
            &message.headers,
            message.payload.len(),
        )?;
        // `partition_for` is below the partition count, which is the number of logs.
        let partition = partition_for(&message.key, logs.len() as u32);
        let log = &mut logs[partition as usize];
        log.push(Arc::new(Stored {
            key: message.key,
            headers: message.headers,
            payload: message.payload,
        }));
        Ok(Receipt::at(Position {
            partition,
            offset: u128::from(log.len() as u64 - 1),
        }))
    }
}

#[async_trait]
impl DomainTransport for Memory {
    fn capabilities(&self) -> &Capabilities {
        &self.broker.domain_caps
    }

    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<Receipt> {
        self.check_domain_open()?;
        validate_topic(topic)?;
        let t = self.topic(topic);
        let receipt = self.append(&t, message)?;
        t.wake_all();
        Ok(receipt)
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        if let Err(e) = self
            .check_domain_open()
            .and_then(|()| validate_topic(topic))
        {
            let text = e.to_string();
            return messages
                .iter()
                .map(|_| {
                    Err(Error::backend(
                        "memory",
                        false,
                        dualbus_core::Failure(text.clone()),
                    ))
                })
                .collect();
        }
        let t = self.topic(topic);
        let out = messages.into_iter().map(|m| self.append(&t, m)).collect();
        t.wake_all();
        out
    }

    /// Joins the group `spec.group` as a new member. Partitions are assigned by rendezvous
    /// hashing over the live members; the stream of group events says which this member
    /// owns. Dropping the subscription leaves the group.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_domain_open()?;
        validate_topic(&spec.topic)?;
        let topic = self.topic(&spec.topic);
        let partitions = topic.partitions();
        let (events_tx, events_rx) = async_channel::unbounded();
        let wake = Arc::new(Notify::new());
        // Locks are taken in one order everywhere: logs, then groups, then a group's state.
        let log_lens: Vec<u64> = topic.logs.lock().iter().map(|l| l.len() as u64).collect();
        let (group, member) = {
            let mut groups = topic.groups.lock();
            let created = !groups.contains_key(&spec.group);
            let group = groups
                .entry(spec.group.clone())
                .or_insert_with(|| {
                    Arc::new(Group {
                        state: Mutex::new(GroupState::default()),
                    })
                })
                .clone();
            let mut st = group.state.lock();
            if created {
                st.cursors = (0..partitions).map(|_| Cursor::default()).collect();
                st.owners = vec![None; partitions];
                st.epochs = vec![0; partitions];
                if spec.start == StartPosition::Latest {
                    for (c, len) in st.cursors.iter_mut().zip(&log_lens) {
                        c.next = *len;
                        c.floor = *len;
                    }
                }
            }
            let member = st.next_member;
            st.next_member += 1;
            st.members.insert(
                member,
                Member {
                    name: format!("member-{member}"),
                    events: events_tx,
                    wake: wake.clone(),
                },
            );
            st.rebalance();
            drop(st);
            (group, member)
        };
        let control = Arc::new(MemberControl {
            group: group.clone(),
            member,
            wake: wake.clone(),
            rewind: self.broker.config.rewind,
        });
        let reader = Reader {
            topic,
            group: group.clone(),
            member,
            wake,
            ack_wait: self.broker.config.ack_wait,
        };
        let closed = self.handle.domain_closed.clone();
        let guard = MemberGuard { group, member };
        let stream = futures::stream::unfold((reader, guard), |(reader, guard)| async move {
            let d = reader.next().await;
            Some((Ok(d), (reader, guard)))
        })
        .take_until(closed.clone().cancelled_owned());
        let events = events_rx.take_until(closed.cancelled_owned());
        Ok(
            DomainSubscription::new(stream.boxed()).with_group(GroupMembership {
                events: events.boxed(),
                control,
            }),
        )
    }

    async fn replay(&self, topic: &str, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_domain_open()?;
        validate_topic(topic)?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let partition = partition_for(key, logs.len() as u32);
        Ok(logs[partition as usize]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key == key)
            .map(|(offset, s)| inbound(&t.name, s, partition, offset as u64))
            .collect())
    }

    async fn last_for_key(&self, topic: &str, key: &str) -> Result<Option<InboundMessage>> {
        self.check_domain_open()?;
        validate_topic(topic)?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let partition = partition_for(key, logs.len() as u32);
        Ok(last_of(&logs[partition as usize], key)
            .map(|(offset, s)| inbound(&t.name, s, partition, offset)))
    }

    async fn publish_if_last(
        &self,
        topic: &str,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        self.check_domain_open()?;
        validate_topic(topic)?;
        let t = self.topic(topic);
        let receipt = {
            // The check and the append under one lock: atomic.
            let logs = t.logs.lock();
            let partition = partition_for(&message.key, logs.len() as u32);
            let last =
                last_of(&logs[partition as usize], &message.key).map(|(offset, _)| Position {
                    partition,
                    offset: u128::from(offset),
                });
            if last != expected {
                return Err(Error::Conflict(format!(
                    "the last message of key {:?} is at {last:?}, not {expected:?}",
                    message.key
                )));
            }
            self.append_locked(logs, message)?
        };
        t.wake_all();
        Ok(receipt)
    }

    async fn pending(&self, topic: &str, group: &str) -> Result<Option<u64>> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let total: u64 = logs.iter().map(|l| l.len() as u64).sum();
        let Some(g) = t.groups.lock().get(group).cloned() else {
            return Ok(Some(total));
        };
        let st = g.state.lock();
        let n = st
            .cursors
            .iter()
            .zip(logs.iter())
            .map(|(c, l)| l.len() as u64 - c.floor - c.acked.len() as u64)
            .sum();
        Ok(Some(n))
    }

    async fn close(&self) -> Result<()> {
        self.handle.domain_closed.cancel();
        Ok(())
    }
}

/// The last message of `key` in a partition's log, with its offset.
fn last_of<'a>(log: &'a [Arc<Stored>], key: &str) -> Option<(u64, &'a Stored)> {
    log.iter()
        .enumerate()
        .rev()
        .find(|(_, s)| s.key == key)
        .map(|(offset, s)| (offset as u64, &**s))
}

fn inbound(topic: &str, s: &Stored, partition: u32, offset: u64) -> InboundMessage {
    InboundMessage {
        topic: topic.to_owned(),
        key: Some(s.key.clone()),
        headers: s.headers.clone(),
        payload: s.payload.clone(),
        position: Position {
            partition,
            offset: u128::from(offset),
        },
    }
}

/// Leaves the group when the subscription's stream is dropped; the member's partitions go
/// to the others at once (the pool drops the stream only after its handlers stopped).
struct MemberGuard {
    group: Arc<Group>,
    member: u64,
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        let mut st = self.group.state.lock();
        st.members.remove(&self.member);
        for o in st.owners.iter_mut() {
            if o.is_some_and(|o| o.member == self.member) {
                *o = None;
            }
        }
        st.rebalance();
        st.wake_members();
    }
}

struct MemberControl {
    group: Arc<Group>,
    member: u64,
    wake: Arc<Notify>,
    rewind: bool,
}

impl MemberControl {
    /// Pauses or resumes a partition this member owns (any epoch); others are not its own.
    fn set_paused(&self, partition: u32, paused: bool) {
        let mut st = self.group.state.lock();
        let own = st
            .owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == self.member);
        if own {
            st.cursors[partition as usize].paused = paused;
        }
    }
}

impl PartitionControl for MemberControl {
    fn pause(&self, partition: u32) {
        self.set_paused(partition, true);
    }

    fn resume(&self, partition: u32) {
        self.set_paused(partition, false);
        self.wake.notify_one();
    }
}

#[async_trait]
impl GroupControl for MemberControl {
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        if !st.owned_by(partition, self.member, epoch) {
            return Err(Error::Conflict(format!(
                "partition {partition} is no longer owned under epoch {epoch}"
            )));
        }
        let p = partition as usize;
        if self.rewind {
            // Back to the first unacknowledged message: whatever an earlier owner left
            // unacknowledged comes first, now, instead of after its ack deadline.
            let pending: Vec<(Instant, u64)> = st.cursors[p]
                .pending
                .iter()
                .map(|(o, x)| (x.deadline, *o))
                .collect();
            for (deadline, offset) in pending {
                st.timers.remove(&(deadline, partition, offset));
            }
            let c = &mut st.cursors[p];
            for (offset, pending) in std::mem::take(&mut c.pending) {
                c.delivered_before.insert(offset, pending.deliveries);
            }
            c.next = c.floor;
        }
        if let Some(o) = st.owners[p].as_mut() {
            o.rewound = true;
        }
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        if st.owned_by(partition, self.member, epoch) {
            st.owners[partition as usize] = None;
            st.rebalance();
            st.wake_members();
        }
        Ok(())
    }
}

struct Reader {
    topic: Arc<Topic>,
    group: Arc<Group>,
    member: u64,
    wake: Arc<Notify>,
    ack_wait: Duration,
}

impl Reader {
    /// Waits for the next delivery of a partition this member consumes: a due redelivery
    /// first, then new messages round-robin over partitions.
    async fn next(&self) -> Delivery {
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let now = Instant::now();
            let next_deadline = {
                let logs = self.topic.logs.lock();
                let mut st = self.group.state.lock();
                if let Some(d) = self.take(&logs, &mut st, now) {
                    return d;
                }
                st.timers
                    .iter()
                    .find(|(_, p, _)| st.consumes(*p, self.member))
                    .map(|(d, _, _)| *d)
            };
            match next_deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = &mut wake => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => wake.await,
            }
        }
    }

    fn take(
        &self,
        logs: &[Vec<Arc<Stored>>],
        st: &mut GroupState,
        now: Instant,
    ) -> Option<Delivery> {
        // Due redeliveries, earliest deadline first.
        let due = st
            .timers
            .iter()
            .take_while(|(d, _, _)| *d <= now)
            .find(|(_, p, _)| st.consumes(*p, self.member))
            .copied();
        if let Some((_, partition, offset)) = due {
            st.set_deadline(partition, offset, now + self.ack_wait);
            let epoch = st.owners[partition as usize]?.epoch;
            let p = st.cursors[partition as usize].pending.get_mut(&offset)?;
            p.deliveries += 1;
            let count = p.deliveries;
            let stored = logs[partition as usize].get(offset as usize)?;
            return Some(self.delivery(stored, partition, offset, count, epoch));
        }
        let n = st.cursors.len();
        for i in 0..n {
            let partition = (st.rr + i) % n;
            if !st.consumes(partition as u32, self.member) {
                continue;
            }
            let c = &mut st.cursors[partition];
            // Skip what was acknowledged (after a rewind: below the floor, or above it and
            // acknowledged) or is already out for delivery.
            c.next = c.next.max(c.floor);
            while c.next < logs[partition].len() as u64
                && (c.acked.contains(&c.next) || c.pending.contains_key(&c.next))
            {
                c.next += 1;
            }
            if c.next >= logs[partition].len() as u64 {
                continue;
            }
            let offset = c.next;
            c.next += 1;
            let deadline = now + self.ack_wait;
            let deliveries = c.delivered_before.remove(&offset).map_or(1, |n| n + 1);
            c.pending.insert(
                offset,
                Pending {
                    deadline,
                    deliveries,
                },
            );
            st.timers.insert((deadline, partition as u32, offset));
            st.rr = (partition + 1) % n;
            let epoch = st.owners[partition]?.epoch;
            let stored = &logs[partition][offset as usize];
            return Some(self.delivery(stored, partition as u32, offset, deliveries, epoch));
        }
        None
    }

    fn delivery(
        &self,
        stored: &Stored,
        partition: u32,
        offset: u64,
        count: u32,
        epoch: u64,
    ) -> Delivery {
        Delivery::new(
            inbound(&self.topic.name, stored, partition, offset),
            count,
            Arc::new(MemoryAcker {
                group: self.group.clone(),
                member: self.member,
                partition,
                offset,
                epoch,
                ack_wait: self.ack_wait,
            }),
        )
        .with_epoch(epoch)
    }
}

struct MemoryAcker {
    group: Arc<Group>,
    member: u64,
    partition: u32,
    offset: u64,
    epoch: u64,
    ack_wait: Duration,
}

impl MemoryAcker {
    /// A stale acknowledgement (of an ownership epoch that ended) is ignored, like a Kafka
    /// commit from a revoked member.
    fn current(&self, st: &GroupState) -> bool {
        st.owned_by(self.partition, self.member, self.epoch)
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) {
            st.settle(self.partition, self.offset);
        }
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) && st.set_deadline(self.partition, self.offset, Instant::now() + delay)
        {
            st.wake_members();
        }
        Ok(())
    }

    async fn term(&self) -> Result<()> {
        self.ack().await
    }

    async fn in_progress(&self) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) {
            st.set_deadline(self.partition, self.offset, Instant::now() + self.ack_wait);
        }
        Ok(())
    }
}
