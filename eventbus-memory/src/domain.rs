//! The durable-like domain transport: partitioned logs, durable consumers with ack
//! deadlines, redelivery and an ack floor per partition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dualbus_core::partition::partition_for;
use dualbus_core::{
    Acker, Capabilities, Delivery, DomainSubscription, DomainTransport, Error, Headers,
    InboundMessage, OutboundMessage, PartitionControl, Position, Receipt, Result, StartPosition,
    SubscriptionSpec, validate_topic,
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
    consumers: Mutex<HashMap<String, Arc<Consumer>>>,
}

#[derive(Debug)]
struct Pending {
    deadline: Instant,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Cursor {
    /// Next offset never delivered.
    next: u64,
    /// Delivered and not acknowledged.
    pending: BTreeMap<u64, Pending>,
    /// Every offset below it is acknowledged.
    floor: u64,
    /// Acknowledged offsets above the floor.
    acked: BTreeSet<u64>,
    paused: bool,
}

impl Cursor {
    fn settle(&mut self, offset: u64) {
        self.pending.remove(&offset);
        if offset >= self.floor {
            self.acked.insert(offset);
        }
        while self.acked.remove(&self.floor) {
            self.floor += 1;
        }
    }
}

#[derive(Debug, Default)]
struct ConsumerState {
    active: bool,
    cursors: Vec<Cursor>,
    /// Redelivery deadlines: `(deadline, partition, offset)`, one per pending message.
    timers: BTreeSet<(Instant, u32, u64)>,
    /// Round-robin start for fairness between partitions.
    rr: usize,
}

impl ConsumerState {
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
}

#[derive(Debug, Default)]
struct Consumer {
    state: Mutex<ConsumerState>,
    wake: Notify,
}

impl Topic {
    fn new(name: &str, partitions: u32) -> Self {
        Self {
            name: name.to_owned(),
            logs: Mutex::new((0..partitions).map(|_| Vec::new()).collect()),
            consumers: Mutex::new(HashMap::new()),
        }
    }

    fn wake_all(&self) {
        for c in self.consumers.lock().values() {
            c.wake.notify_one();
        }
    }
}

impl Memory {
    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.broker.domain.topics.lock();
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        topics
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Topic::new(name, self.broker.config.partitions)))
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
        let partition = partition_for(&message.key, self.broker.config.partitions);
        let offset = {
            let mut logs = topic.logs.lock();
            let log = &mut logs[partition as usize];
            log.push(Arc::new(Stored {
                key: message.key,
                headers: message.headers,
                payload: message.payload,
            }));
            log.len() as u64 - 1
        };
        Ok(Receipt::at(Position {
            partition,
            offset: u128::from(offset),
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

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_domain_open()?;
        validate_topic(&spec.topic)?;
        let topic = self.topic(&spec.topic);
        let partitions = self.broker.config.partitions as usize;
        let consumer = {
            let mut consumers = topic.consumers.lock();
            let created = !consumers.contains_key(&spec.group);
            let consumer = consumers.entry(spec.group.clone()).or_default().clone();
            let mut st = consumer.state.lock();
            if st.active {
                return Err(Error::Conflict(format!(
                    "group {:?} on topic {:?} already has an active subscriber; the memory backend \
                     has no partitioned consumer groups yet, so a second member is refused rather \
                     than interleaving an aggregate's events",
                    spec.group, spec.topic
                )));
            }
            st.active = true;
            if created {
                st.cursors = (0..partitions).map(|_| Cursor::default()).collect();
                if spec.start == StartPosition::Latest {
                    let logs = topic.logs.lock();
                    for (c, log) in st.cursors.iter_mut().zip(logs.iter()) {
                        c.next = log.len() as u64;
                        c.floor = c.next;
                    }
                }
            }
            // Rewind: whatever an earlier subscriber left unacknowledged comes first, now,
            // in partition order, instead of after its ack deadline.
            let now = Instant::now();
            let pending: Vec<(u32, u64)> = st
                .cursors
                .iter()
                .enumerate()
                .flat_map(|(p, c)| c.pending.keys().map(move |o| (p as u32, *o)))
                .collect();
            for (p, o) in pending {
                st.set_deadline(p, o, now);
            }
            for c in &mut st.cursors {
                c.paused = false;
            }
            drop(st);
            consumer
        };
        let reader = Reader {
            topic,
            consumer: consumer.clone(),
            ack_wait: self.broker.config.ack_wait,
        };
        let closed = self.handle.domain_closed.clone();
        let guard = ActiveGuard(consumer.clone());
        let stream = futures::stream::unfold((reader, guard), |(reader, guard)| async move {
            let d = reader.next().await;
            Some((Ok(d), (reader, guard)))
        })
        .take_until(closed.cancelled_owned());
        Ok(DomainSubscription::new(stream.boxed()).with_control(Arc::new(Control(consumer))))
    }

    async fn replay(&self, topic: &str, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_domain_open()?;
        validate_topic(topic)?;
        let t = self.topic(topic);
        let partition = partition_for(key, self.broker.config.partitions);
        let logs = t.logs.lock();
        Ok(logs[partition as usize]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key == key)
            .map(|(offset, s)| inbound(&t.name, s, partition, offset as u64))
            .collect())
    }

    async fn pending(&self, topic: &str, group: &str) -> Result<Option<u64>> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let total: u64 = logs.iter().map(|l| l.len() as u64).sum();
        let Some(consumer) = t.consumers.lock().get(group).cloned() else {
            return Ok(Some(total));
        };
        let st = consumer.state.lock();
        let n = st
            .cursors
            .iter()
            .zip(logs.iter())
            .map(|(c, l)| (l.len() as u64 - c.next) + c.pending.len() as u64)
            .sum();
        Ok(Some(n))
    }

    async fn close(&self) -> Result<()> {
        self.handle.domain_closed.cancel();
        Ok(())
    }
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

/// Marks the consumer inactive when the subscription's stream is dropped.
struct ActiveGuard(Arc<Consumer>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.state.lock().active = false;
    }
}

struct Control(Arc<Consumer>);

impl PartitionControl for Control {
    fn pause(&self, partition: u32) {
        if let Some(c) = self.0.state.lock().cursors.get_mut(partition as usize) {
            c.paused = true;
        }
    }

    fn resume(&self, partition: u32) {
        if let Some(c) = self.0.state.lock().cursors.get_mut(partition as usize) {
            c.paused = false;
        }
        self.0.wake.notify_one();
    }
}

struct Reader {
    topic: Arc<Topic>,
    consumer: Arc<Consumer>,
    ack_wait: Duration,
}

impl Reader {
    /// Waits for the next delivery: a due redelivery first, then new messages round-robin
    /// over unpaused partitions.
    async fn next(&self) -> Delivery {
        loop {
            let wake = self.consumer.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let now = Instant::now();
            let next_deadline = {
                let logs = self.topic.logs.lock();
                let mut st = self.consumer.state.lock();
                if let Some(d) = self.take(&logs, &mut st, now) {
                    return d;
                }
                st.timers
                    .iter()
                    .find(|(_, p, _)| !st.cursors[*p as usize].paused)
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
        st: &mut ConsumerState,
        now: Instant,
    ) -> Option<Delivery> {
        // Due redeliveries, earliest deadline first.
        let due = st
            .timers
            .iter()
            .take_while(|(d, _, _)| *d <= now)
            .find(|(_, p, _)| !st.cursors[*p as usize].paused)
            .copied();
        if let Some((_, partition, offset)) = due {
            st.set_deadline(partition, offset, now + self.ack_wait);
            let p = st.cursors[partition as usize].pending.get_mut(&offset)?;
            p.deliveries += 1;
            let count = p.deliveries;
            let stored = logs[partition as usize].get(offset as usize)?;
            return Some(self.delivery(stored, partition, offset, count));
        }
        let n = st.cursors.len();
        for i in 0..n {
            let partition = (st.rr + i) % n;
            let c = &mut st.cursors[partition];
            if c.paused || c.next >= logs[partition].len() as u64 {
                continue;
            }
            let offset = c.next;
            c.next += 1;
            let deadline = now + self.ack_wait;
            c.pending.insert(
                offset,
                Pending {
                    deadline,
                    deliveries: 1,
                },
            );
            st.timers.insert((deadline, partition as u32, offset));
            st.rr = (partition + 1) % n;
            let stored = &logs[partition][offset as usize];
            return Some(self.delivery(stored, partition as u32, offset, 1));
        }
        None
    }

    fn delivery(&self, stored: &Stored, partition: u32, offset: u64, count: u32) -> Delivery {
        Delivery::new(
            inbound(&self.topic.name, stored, partition, offset),
            count,
            Arc::new(MemoryAcker {
                consumer: self.consumer.clone(),
                partition,
                offset,
                ack_wait: self.ack_wait,
            }),
        )
    }
}

struct MemoryAcker {
    consumer: Arc<Consumer>,
    partition: u32,
    offset: u64,
    ack_wait: Duration,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.consumer
            .state
            .lock()
            .settle(self.partition, self.offset);
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        let found = self.consumer.state.lock().set_deadline(
            self.partition,
            self.offset,
            Instant::now() + delay,
        );
        if found {
            self.consumer.wake.notify_one();
        }
        Ok(())
    }

    async fn term(&self) -> Result<()> {
        self.ack().await
    }

    async fn in_progress(&self) -> Result<()> {
        self.consumer.state.lock().set_deadline(
            self.partition,
            self.offset,
            Instant::now() + self.ack_wait,
        );
        Ok(())
    }
}
