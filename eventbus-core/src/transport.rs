//! The small traits a backend implements: it moves bytes, headers and acknowledgements,
//! and reports what it can do. Every semantic (envelopes, ordering, retry, dead letter)
//! lives above these traits, in this crate, once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::codec::HeaderStyle;
use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::message::{
    EncodedMessage, InboundMessage, Message, OutboundMessage, Position, Receipt, SimpleOutbound,
};
use crate::topic::Topic;

/// What a domain transport can do. The domain bus refuses what its backend cannot honour.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomainCapabilities {
    /// Short backend name, used in errors and logs.
    pub backend: &'static str,
    /// Messages survive a restart of the broker (and of this process).
    pub durable: bool,
    /// Messages with one key are delivered in publish order (within a partition).
    pub ordered_per_key: bool,
    /// Partitioned consumer groups: several members share one domain topic with order kept
    /// per key across members and handovers.
    pub consumer_groups: bool,
    /// [`DomainTransport::replay`] is available.
    pub replay: bool,
    /// The broker drops a republished message with the same event id.
    pub dedup: bool,
    /// Largest message the backend accepts, in bytes, counted as
    /// [`DomainCapabilities::wire`] says (payload, headers and the backend's own framing).
    pub max_payload: usize,
    /// How the backend counts a message against `max_payload`.
    pub wire: WireOverhead,
    /// How CloudEvents attributes are named in this backend's headers.
    pub header_style: HeaderStyle,
    /// After how long without an ack or progress signal the broker redelivers a message.
    /// The keyed pool sends progress signals well before it for the messages it holds.
    pub ack_deadline: Option<Duration>,
    /// The most deliveries of one subscription the broker hands out unacknowledged before
    /// it stops delivering to the whole subscription (JetStream: the consumer's
    /// `max_ack_pending`), if it has such a limit. The domain bus refuses a pool whose
    /// `max_in_flight + max_deferred` exceeds it, so that the pool's own bounds are always
    /// reached first.
    pub max_unacked: Option<usize>,
    /// [`DomainTransport::last_for_key`] and [`DomainTransport::publish_if_last`] are
    /// available: appends checked against an aggregate's expected version.
    pub expected_version: bool,
    /// Domain subscriptions offer [`DomainSubscription::reread`]: the pool keeps deferred
    /// deliveries without their bodies.
    pub reread: bool,
}

impl DomainCapabilities {
    /// Nothing offered, 1 MiB messages; backends switch on what they have.
    pub fn new(backend: &'static str) -> Self {
        Self {
            backend,
            durable: false,
            ordered_per_key: false,
            consumer_groups: false,
            replay: false,
            dedup: false,
            max_payload: 1024 * 1024,
            wire: WireOverhead::PLAIN,
            header_style: HeaderStyle::HyphenPercentEncoded,
            ack_deadline: None,
            max_unacked: None,
            expected_version: false,
            reread: false,
        }
    }

    /// The size of `message` as the backend counts it against
    /// [`DomainCapabilities::max_payload`], for a write of kind `write`.
    pub fn wire_size(&self, message: &EncodedMessage, write: Write) -> usize {
        self.wire.size(
            &message.headers,
            message.payload.len(),
            message.id.as_deref(),
            write,
        )
    }

    /// [`Error::PayloadTooLarge`] if `message` does not fit the backend's limit: the one
    /// size check of every domain write, run when core builds the [`OutboundMessage`].
    pub fn check_size(&self, message: &EncodedMessage, write: Write) -> Result<()> {
        fits(self.wire_size(message, write), self.max_payload)
    }
}

/// What a simple transport can do. The simple bus refuses what its backend cannot honour.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimpleCapabilities {
    /// Short backend name, used in errors and logs.
    pub backend: &'static str,
    /// Queue groups: each message to exactly one member of the group.
    pub queue_groups: bool,
    /// [`SimpleTransport::request`] is available.
    pub request_reply: bool,
    /// Largest message the backend accepts, in bytes, counted as
    /// [`SimpleCapabilities::wire`] says (payload, headers and the backend's own framing).
    pub max_payload: usize,
    /// How the backend counts a message against `max_payload`.
    pub wire: WireOverhead,
}

impl SimpleCapabilities {
    /// Nothing offered, 1 MiB messages; backends switch on what they have.
    pub fn new(backend: &'static str) -> Self {
        Self {
            backend,
            queue_groups: false,
            request_reply: false,
            max_payload: 1024 * 1024,
            wire: WireOverhead::PLAIN,
        }
    }

    /// [`Error::PayloadTooLarge`] if a message with `headers` and a payload of `payload`
    /// bytes does not fit the backend's limit: the one size check of every simple write,
    /// run when core builds the [`SimpleOutbound`].
    pub fn check_size(&self, headers: &Headers, payload: usize) -> Result<()> {
        fits(
            self.wire.size(headers, payload, None, Write::Publish),
            self.max_payload,
        )
    }
}

fn fits(size: usize, max: usize) -> Result<()> {
    if size > max {
        Err(Error::PayloadTooLarge { size, max })
    } else {
        Ok(())
    }
}

/// Which write a message size is checked for: the backend may add headers to some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Write {
    /// A publish (single or batch; a dead letter too).
    Publish,
    /// A publish checked against the aggregate's last position
    /// ([`DomainTransport::publish_if_last`]).
    Append,
}

/// How a backend counts a message against its size limit: the framing of its header block
/// and the headers it adds itself. Each backend states it once, in its
/// [`DomainCapabilities::wire`] or [`SimpleCapabilities::wire`]; core checks every write against it, so a message over the
/// limit is [`Error::PayloadTooLarge`] before it reaches the broker, never a backend error.
///
/// The size is `payload + Σ(name + value + per_header)` over the message's headers and
/// the added ones, plus `header_block` when there is at least one header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireOverhead {
    /// Bytes a non-empty header block costs beyond its headers (NATS: `NATS/1.0\r\n` and
    /// the closing `\r\n`, 12).
    pub header_block: usize,
    /// Bytes each header costs beyond its name and value (NATS: `: ` and `\r\n`, 4).
    pub per_header: usize,
    /// The header the backend adds carrying [`OutboundMessage::id`], if any
    /// (JetStream: `Nats-Msg-Id`).
    pub id_header: Option<&'static str>,
    /// The header the backend adds on an [`Write::Append`], with the longest value it
    /// writes there (JetStream: `Nats-Expected-Last-Subject-Sequence`, up to 20 digits).
    pub append_header: Option<(&'static str, usize)>,
}

impl WireOverhead {
    /// Four bytes per header, no block framing, nothing added (memory's count).
    pub const PLAIN: Self = Self::new(0, 4);

    /// Framing only; nothing added.
    pub const fn new(header_block: usize, per_header: usize) -> Self {
        Self {
            header_block,
            per_header,
            id_header: None,
            append_header: None,
        }
    }

    /// Same, with the header that carries the message id.
    #[must_use]
    pub const fn with_id_header(mut self, name: &'static str) -> Self {
        self.id_header = Some(name);
        self
    }

    /// Same, with the header added on appends and its longest value.
    #[must_use]
    pub const fn with_append_header(mut self, name: &'static str, max_value_len: usize) -> Self {
        self.append_header = Some((name, max_value_len));
        self
    }

    /// The size of a message with these parts, as the backend counts it.
    pub fn size(&self, headers: &Headers, payload: usize, id: Option<&str>, write: Write) -> usize {
        let entry = |name: usize, value: usize| name + value + self.per_header;
        let mut count = headers.len();
        let mut size = payload
            + headers
                .iter()
                .map(|(n, v)| entry(n.len(), v.len()))
                .sum::<usize>();
        if let (Some(name), Some(id)) = (self.id_header, id) {
            size += entry(name.len(), id.len());
            count += 1;
        }
        if let (Write::Append, Some((name, len))) = (write, self.append_header) {
            size += entry(name.len(), len);
            count += 1;
        }
        if count > 0 {
            size += self.header_block;
        }
        size
    }
}

/// Acknowledgement of one delivered message: what every broker can keep (JetStream, Kafka,
/// Redis Streams, memory). See `docs/adr/0002-ack-contract.md` for why it is these three.
///
/// Implementations must be cheap to call repeatedly and safe to call from any task.
/// After `ack` or `release`, later calls have no effect on the broker (they may return an
/// error).
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// The message was handled (or dead-lettered): the broker may forget it. Kafka: the
    /// offset counts toward the partition's contiguous commit.
    async fn ack(&self) -> Result<()>;

    /// Give the message back without handling it, to be delivered again after about
    /// `delay` (the pool's wish: a backend may round it up, and says so in its
    /// documentation). A released message that comes back is not a failed attempt.
    /// JetStream: a `-NAK` with the delay; memory: a redelivery deadline.
    async fn release(&self, delay: Duration) -> Result<()>;

    /// Still working on it: keep the broker from redelivering it for another ack deadline
    /// (JetStream: `+WPI`; memory: the deadline pushed back). The default does nothing, for
    /// brokers whose redelivery is not per message (Kafka).
    async fn progress(&self) -> Result<()> {
        Ok(())
    }
}

/// One message delivered by a domain transport, with its acknowledgement handle.
pub struct Delivery {
    /// The raw message.
    pub message: InboundMessage,
    /// How many times the broker delivered this message, from 1.
    pub delivery_count: u32,
    /// The ownership epoch of the message's partition when it was delivered (consumer
    /// groups; 0 otherwise). The pool drops deliveries of an epoch it no longer owns.
    pub epoch: u64,
    acker: Arc<dyn Acker>,
    unreadable: Option<String>,
}

impl Delivery {
    /// A delivery with its acknowledgement handle.
    pub fn new(message: InboundMessage, delivery_count: u32, acker: Arc<dyn Acker>) -> Self {
        Self {
            message,
            delivery_count,
            epoch: 0,
            acker,
            unreadable: None,
        }
    }

    /// Same delivery, marked as a message the backend's client library cannot read (its
    /// headers were decoded lossily by the backend). The pool never hands it to the
    /// handler: it dead-letters it with kind
    /// [`DeadLetterKind::Unreadable`](crate::DeadLetterKind::Unreadable) and `reason`, then
    /// acknowledges it.
    #[must_use]
    pub fn unreadable(mut self, reason: impl Into<String>) -> Self {
        self.unreadable = Some(reason.into());
        self
    }

    /// Why the message is unreadable, if it was marked so.
    pub fn unreadable_reason(&self) -> Option<&str> {
        self.unreadable.as_deref()
    }

    /// Same delivery, delivered under ownership `epoch` of its partition.
    #[must_use]
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The acknowledgement handle (shared: the pool extends deadlines from another task).
    pub fn acker(&self) -> &Arc<dyn Acker> {
        &self.acker
    }

    /// Where the message sits in the broker.
    pub fn position(&self) -> Position {
        self.message.position
    }

    /// Acknowledges the message.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Gives the message back, to be delivered again after about `delay`.
    pub async fn release(&self, delay: Duration) -> Result<()> {
        self.acker.release(delay).await
    }

    /// Extends the redelivery deadline.
    pub async fn progress(&self) -> Result<()> {
        self.acker.progress().await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_count", &self.delivery_count)
            .field("epoch", &self.epoch)
            .field("unreadable", &self.unreadable)
            .finish_non_exhaustive()
    }
}

/// Where a new durable subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// At the first message the topic still holds (Kafka `earliest`, Redis group at `0`).
    #[default]
    Earliest,
    /// Only messages published after the subscription was created.
    Latest,
}

/// What a domain subscription asks of the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionSpec {
    /// The topic.
    pub topic: Topic,
    /// The durable consumer (group) name: acknowledged progress is kept under it.
    pub group: String,
    /// Where a new durable consumer starts.
    pub start: StartPosition,
    /// On a backend with one active subscriber per group (no partitioned groups), whether a
    /// subscriber that finds the group taken waits as a standby and takes over when the
    /// active one's lease is released or expires (`true`, the default), or fails at once
    /// with [`Error::Conflict`] (`false`). Backends with partitioned groups ignore it.
    pub standby: bool,
}

impl SubscriptionSpec {
    /// A spec starting at the earliest message, standing by when the group is taken.
    pub fn new(topic: Topic, group: impl Into<String>) -> Self {
        Self {
            topic,
            group: group.into(),
            start: StartPosition::Earliest,
            standby: true,
        }
    }

    /// Same spec standing by (`true`) or failing with [`Error::Conflict`] (`false`) when the
    /// group is taken (see [`SubscriptionSpec::standby`]).
    #[must_use]
    pub fn standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// Same spec with another start position.
    #[must_use]
    pub fn starting_at(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
}

/// Stop and resume delivering one partition of a consumer-group subscription: the pool
/// pauses a revoked partition while it drains.
///
/// Pausing must not make the broker consider the consumer dead (Kafka: pause and keep
/// polling; JetStream: keep a small keepalive pull).
pub trait PartitionControl: Send + Sync + 'static {
    /// Deliver nothing more from `partition` until resumed. Messages already delivered stay.
    fn pause(&self, partition: u32);
    /// Resume delivering `partition`.
    fn resume(&self, partition: u32);
}

/// A change of partition ownership in a consumer group, for this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GroupEvent {
    /// This member owns `partition` under `epoch` from now on. Nothing of the partition is
    /// delivered before the pool asked for the rewind ([`GroupControl::rewind`]).
    Assigned {
        /// The partition.
        partition: u32,
        /// The new ownership epoch (grows with every change of owner).
        epoch: u64,
    },
    /// The group moves `partition` elsewhere: stop pulling it, drain it, then
    /// [`GroupControl::release`] it.
    Revoked {
        /// The partition.
        partition: u32,
        /// The epoch being revoked.
        epoch: u64,
    },
    /// Ownership is already gone (crash detected, lease or pin lost, Kafka
    /// `assignment_lost`): no more acknowledgements and no new handlers for it.
    Lost {
        /// The partition.
        partition: u32,
        /// The epoch that was lost.
        epoch: u64,
    },
}

/// What a consumer-group member asks of its transport beyond [`PartitionControl`].
#[async_trait]
pub trait GroupControl: PartitionControl {
    /// Deliver `partition` from its first unacknowledged message (the ack floor) under
    /// ownership `epoch`: the mandatory rewind at every takeover. Resolves when later
    /// deliveries of the partition start there.
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()>;
    /// The member drained `partition` (revoked under `epoch`): give up ownership.
    async fn release(&self, partition: u32, epoch: u64) -> Result<()>;
}

/// The group side of a subscription: ownership events and their control.
pub struct GroupMembership {
    /// Assignments, revocations and losses, in the order they happened.
    pub events: BoxStream<'static, GroupEvent>,
    /// Rewind and release.
    pub control: Arc<dyn GroupControl>,
}

impl fmt::Debug for GroupMembership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupMembership").finish_non_exhaustive()
    }
}

/// A live domain subscription: the deliveries, a way to read a delivered message again by
/// its position if the backend has one, and the group membership if the backend has
/// consumer groups.
///
/// Dropping it ends the subscription on the broker side (for groups: the member leaves);
/// unacknowledged messages are redelivered later (to this durable consumer or group).
#[non_exhaustive]
pub struct DomainSubscription {
    /// Deliveries in broker order per partition. An `Err` item is a transient problem
    /// (logged; the stream goes on); the stream ends when the subscription is closed.
    pub deliveries: BoxStream<'static, Result<Delivery>>,
    /// Reads a delivered message again by its position. With it, the pool keeps the
    /// deliveries of an aggregate over its `max_per_key` cap as position and
    /// acknowledgement handle only, and reads their bodies again when the aggregate's turn
    /// comes; without it, it keeps them whole (see [`PoolConfig::max_deferred`]).
    ///
    /// [`PoolConfig::max_deferred`]: crate::pool::PoolConfig::max_deferred
    pub reread: Option<Arc<dyn Reread>>,
    /// Group membership: the partitions this subscriber owns, when the backend has
    /// [`DomainCapabilities::consumer_groups`], or its one partition (0) while it is the
    /// active subscriber, when the backend has one active subscriber per group with standbys.
    /// Without it every partition counts as owned for the subscription's lifetime.
    pub group: Option<GroupMembership>,
}

impl DomainSubscription {
    /// A subscription with only a delivery stream.
    pub fn new(deliveries: BoxStream<'static, Result<Delivery>>) -> Self {
        Self {
            deliveries,
            reread: None,
            group: None,
        }
    }

    /// Same subscription with a way to read delivered messages again.
    #[must_use]
    pub fn with_reread(mut self, reread: Arc<dyn Reread>) -> Self {
        self.reread = Some(reread);
        self
    }

    /// Same subscription with group membership.
    #[must_use]
    pub fn with_group(mut self, group: GroupMembership) -> Self {
        self.group = Some(group);
        self
    }
}

impl fmt::Debug for DomainSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainSubscription")
            .field("reread", &self.reread.is_some())
            .field("group", &self.group.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads a message of a subscription's topic again by its position (memory: its log;
/// JetStream: message get by stream sequence; Redis Streams: by entry id; Kafka: by offset).
#[async_trait]
pub trait Reread: Send + Sync + 'static {
    /// The message stored at `position`, as it was delivered (key, headers, payload).
    /// A permanent error if the broker no longer holds it (deleted, expired); a retryable
    /// one if it could not be asked now ([`Error::is_retryable`]).
    async fn reread(&self, position: Position) -> Result<InboundMessage>;
}

/// A durable, acknowledged transport for domain events (JetStream, Kafka, Redis Streams,
/// memory).
///
/// Contract:
/// - `publish` resolves only when the broker accepted the message (durable backends:
///   persisted). Messages of one key published one after another are stored in that order.
/// - `subscribe` delivers messages of one partition in stored order; unacknowledged
///   messages come back after the ack deadline, after `release`, or to the next subscriber of
///   the same durable name. A backend without consumer groups keeps one subscriber of a
///   durable name active: another waits as a standby (with the rewind when it takes over),
///   or, when [`SubscriptionSpec::standby`] is off, is refused with [`Error::Conflict`].
/// - The delivery stream may go unpolled for a long time: the pool stops polling it while
///   it holds `max_in_flight` deliveries (or `max_deferred` deferred ones), for as long as
///   its handlers take. Meanwhile the backend keeps the subscription and its group session
///   alive (Kafka: pause every assigned partition and keep polling, since
///   `max.poll.interval.ms` would otherwise expel the member; JetStream: the consumer
///   stays, deliveries wait on the server) and loses nothing.
/// - After `close`, every operation returns [`Error::Closed`]; closing twice is harmless.
///
/// What crosses this seam is checked by core once: a [`Topic`] is a valid topic name and an
/// [`OutboundMessage`] has valid headers and fits [`DomainCapabilities::max_payload`] as
/// [`DomainCapabilities::wire`] counts it. A backend checks only what is its own (how it
/// encodes a key into a subject, a stream key or a partition).
#[async_trait]
pub trait DomainTransport: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> &DomainCapabilities;

    /// Publishes one encoded message to `topic`; resolves when the broker accepted it.
    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt>;

    /// Publishes many messages, pipelined where the backend can; one result per message,
    /// in order. Messages of one key are stored in the order given. The default publishes
    /// one after another.
    async fn publish_batch(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            out.push(self.publish(topic, m).await);
        }
        out
    }

    /// Opens a durable subscription.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription>;

    /// Every stored message with routing key `key` on `topic`, in order.
    /// Available when [`DomainCapabilities::replay`] is set.
    async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        let _ = (topic, key);
        Err(Error::NotSupported {
            operation: "replay",
            backend: self.capabilities().backend,
        })
    }

    /// The last stored message with routing key `key` on `topic`, if any.
    /// Available when [`DomainCapabilities::expected_version`] is set.
    async fn last_for_key(&self, topic: &Topic, key: &str) -> Result<Option<InboundMessage>> {
        let _ = (topic, key);
        Err(Error::NotSupported {
            operation: "last message of a key",
            backend: self.capabilities().backend,
        })
    }

    /// Publishes `message` only if the last stored message with its key is still the one at
    /// `expected` (`None`: no message with this key yet), atomically on the broker;
    /// otherwise [`Error::Conflict`]. Available when [`DomainCapabilities::expected_version`] is
    /// set.
    ///
    /// `message` was checked for [`Write::Append`]: its size counts the header the backend
    /// adds for the condition ([`WireOverhead::append_header`]).
    async fn publish_if_last(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        let _ = (topic, message, expected);
        Err(Error::NotSupported {
            operation: "conditional publish",
            backend: self.capabilities().backend,
        })
    }

    /// How many messages of `topic` the durable consumer `group` has not yet acknowledged
    /// (unread plus delivered-unacked), if the backend can tell.
    async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
        let _ = (topic, group);
        Ok(None)
    }

    /// Closes the connection. Idempotent.
    async fn close(&self) -> Result<()>;
}

/// A fast, non-persistent transport for simple messages (memory, core NATS, Redis pub/sub).
///
/// Contract: at-most-once fan-out to every current subscriber; subscribers of one queue
/// group share the messages (each to exactly one member). After `close`, every operation
/// returns [`Error::Closed`]; closing twice is harmless. Topics and messages arrive checked
/// ([`Topic`], [`SimpleOutbound`]).
#[async_trait]
pub trait SimpleTransport: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> &SimpleCapabilities;

    /// Publishes a message to its topic. Core checked it (topic, headers, size).
    async fn publish(&self, message: SimpleOutbound) -> Result<()>;

    /// Subscribes to `topic`, alone or as a member of `queue_group`. The stream ends when
    /// the transport is closed; dropping it unsubscribes.
    async fn subscribe(
        &self,
        topic: &Topic,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>>;

    /// Sends `message` and waits up to `timeout` for one reply.
    ///
    /// The default subscribes to a fresh inbox topic and publishes with `reply_to` set;
    /// backends with a native request (core NATS) override it.
    async fn request(&self, message: SimpleOutbound, timeout: Duration) -> Result<Message> {
        request_via_inbox(self, message, timeout).await
    }

    /// Closes the connection. Idempotent.
    async fn close(&self) -> Result<()>;
}

/// Request-reply over plain publish and subscribe: a fresh inbox topic, `reply_to`, and a
/// timeout. The default of [`SimpleTransport::request`].
pub async fn request_via_inbox<T: SimpleTransport + ?Sized>(
    transport: &T,
    message: SimpleOutbound,
    timeout: Duration,
) -> Result<Message> {
    use futures::StreamExt as _;
    let inbox = Topic::new(format!("_inbox.{}", uuid::Uuid::now_v7().simple()))?;
    let mut replies = transport.subscribe(&inbox, None).await?;
    transport
        .publish(message.with_reply_to(inbox.as_str()))
        .await?;
    match tokio::time::timeout(timeout, replies.next()).await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(Error::closed("transport")),
        Err(_) => Err(Error::Timeout {
            operation: "request",
            after: timeout,
        }),
    }
}

macro_rules! forward_domain {
    ($ty:ty) => {
        #[async_trait]
        #[deny(clippy::missing_trait_methods)]
        impl<T: DomainTransport + ?Sized> DomainTransport for $ty {
            fn capabilities(&self) -> &DomainCapabilities {
                (**self).capabilities()
            }
            async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
                (**self).publish(topic, message).await
            }
            async fn publish_batch(
                &self,
                topic: &Topic,
                messages: Vec<OutboundMessage>,
            ) -> Vec<Result<Receipt>> {
                (**self).publish_batch(topic, messages).await
            }
            async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
                (**self).subscribe(spec).await
            }
            async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
                (**self).replay(topic, key).await
            }
            async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
                (**self).pending(topic, group).await
            }
            async fn last_for_key(
                &self,
                topic: &Topic,
                key: &str,
            ) -> Result<Option<InboundMessage>> {
                (**self).last_for_key(topic, key).await
            }
            async fn publish_if_last(
                &self,
                topic: &Topic,
                message: OutboundMessage,
                expected: Option<Position>,
            ) -> Result<Receipt> {
                (**self).publish_if_last(topic, message, expected).await
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
        }
    };
}

macro_rules! forward_simple {
    ($ty:ty) => {
        #[async_trait]
        #[deny(clippy::missing_trait_methods)]
        impl<T: SimpleTransport + ?Sized> SimpleTransport for $ty {
            fn capabilities(&self) -> &SimpleCapabilities {
                (**self).capabilities()
            }
            async fn publish(&self, message: SimpleOutbound) -> Result<()> {
                (**self).publish(message).await
            }
            async fn subscribe(
                &self,
                topic: &Topic,
                queue_group: Option<&str>,
            ) -> Result<BoxStream<'static, Message>> {
                (**self).subscribe(topic, queue_group).await
            }
            async fn request(&self, message: SimpleOutbound, timeout: Duration) -> Result<Message> {
                (**self).request(message, timeout).await
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
        }
    };
}

forward_domain!(Arc<T>);
forward_domain!(Box<T>);
forward_simple!(Arc<T>);
forward_simple!(Box<T>);

/// A shared domain transport, as the buses hold it.
pub type DynDomainTransport = Arc<dyn DomainTransport>;
/// A shared simple transport, as the buses hold it.
pub type DynSimpleTransport = Arc<dyn SimpleTransport>;
