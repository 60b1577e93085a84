//! The pool's public vocabulary: limits, dead-letter policy, events, partition states,
//! counters and the shutdown report.

use std::time::Duration;

use serde::Deserialize;

use crate::envelope::Envelope;
use crate::error::{Error, HandleError};
use crate::message::Position;
use crate::transport::DomainCapabilities;

/// Limits of the keyed pool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Handlers running at once (different aggregates). Default 256.
    pub max_concurrency: usize,
    /// Deliveries held whole (queued or running) at most; beyond it the pool stops pulling,
    /// for every partition alike. Default 10,000.
    pub max_in_flight: usize,
    /// Deliveries of one aggregate held whole at most. Its later deliveries are *deferred*
    /// (see `max_deferred`) until its backlog shrinks, so a slow aggregate never holds up
    /// the others. Default 1,000.
    pub max_per_key: usize,
    /// Deferred deliveries held at most: those of aggregates over `max_per_key`, kept as
    /// position and acknowledgement handle only when the backend can read a message again
    /// by its position ([`DomainSubscription::reread`]), whole otherwise, and read again
    /// when the aggregate's turn comes. Beyond it the pool stops pulling, for every
    /// partition alike: a bound on memory (and, on JetStream, on the consumer's
    /// `max_ack_pending`, which must be at least `max_in_flight + max_deferred`; the bus
    /// checks it). Default 40,000.
    ///
    /// [`DomainSubscription::reread`]: crate::DomainSubscription::reread
    pub max_deferred: usize,
    /// How long a graceful shutdown may take to finish buffered work. Default 10 s.
    #[serde(with = "crate::config::duration")]
    pub drain_deadline: Duration,
    /// How often held deliveries get a progress signal. Default: a third of the backend's
    /// ack deadline; none if the backend has no deadline.
    #[serde(with = "crate::config::duration::option")]
    pub progress_interval: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 256,
            max_in_flight: 10_000,
            max_per_key: 1_000,
            max_deferred: 40_000,
            drain_deadline: Duration::from_secs(10),
            progress_interval: None,
        }
    }
}

impl PoolConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_concurrency == 0 {
            return Err(Error::config("pool.max_concurrency", "must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::config("pool.max_in_flight", "must be at least 1"));
        }
        if self.max_per_key == 0 {
            return Err(Error::config("pool.max_per_key", "must be at least 1"));
        }
        if self.progress_interval == Some(Duration::ZERO) {
            return Err(Error::config("pool.progress_interval", "must not be zero"));
        }
        Ok(())
    }

    /// Checks that the pool's bounds are reached before the broker's limit of
    /// unacknowledged deliveries ([`DomainCapabilities::max_unacked`]): past that limit the
    /// broker stops delivering to every aggregate, which is the stall the pool's deferral
    /// exists to avoid.
    pub fn check_unacked_limit(&self, caps: &DomainCapabilities) -> Result<(), Error> {
        let held = self.max_in_flight.saturating_add(self.max_deferred);
        match caps.max_unacked {
            Some(limit) if held > limit => Err(Error::config(
                "pool.max_deferred",
                format!(
                    "max_in_flight + max_deferred is {held}, more than the {limit} unacknowledged \
                     deliveries {} hands out per subscription: lower them or raise the \
                     backend's limit",
                    caps.backend
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Where failed messages go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterPolicy {
    /// Suffix appended to the topic: `orders` -> `orders.dlq`. Default `.dlq`.
    pub suffix: String,
}

impl Default for DeadLetterPolicy {
    fn default() -> Self {
        Self {
            suffix: crate::topic::DEFAULT_DEAD_LETTER_SUFFIX.to_owned(),
        }
    }
}

/// Header names written on dead-lettered messages (the original headers are kept).
pub mod dlq_headers {
    /// Why: the handler's last error or the decode error.
    pub const REASON: &str = "dualbus-dlq-reason";
    /// `exhausted`, `permanent`, `malformed` or `unreadable`.
    pub const KIND: &str = "dualbus-dlq-kind";
    /// Handler attempts made (0 for malformed messages).
    pub const ATTEMPTS: &str = "dualbus-dlq-attempts";
    /// The source topic.
    pub const TOPIC: &str = "dualbus-dlq-topic";
    /// The source partition.
    pub const PARTITION: &str = "dualbus-dlq-partition";
    /// The source offset.
    pub const OFFSET: &str = "dualbus-dlq-offset";
    /// The broker's delivery count of the source message.
    pub const DELIVERY_COUNT: &str = "dualbus-dlq-delivery-count";
    /// Present when the record is reduced because the full copy was over the broker's size
    /// limit: `headers` (the original headers were dropped), `body` (the body was dropped)
    /// or `headers,body`.
    pub const REDUCED: &str = "dualbus-dlq-reduced";
    /// The original body's length in bytes, when the body was dropped.
    pub const ORIGINAL_LENGTH: &str = "dualbus-dlq-original-length";

    /// The most bytes the `dualbus-dlq-*` headers of one record take, names and values
    /// (the reason is clipped to 1,024 characters, up to 4 KiB in UTF-8; the topic to
    /// [`MAX_TOPIC_LEN`](crate::MAX_TOPIC_LEN)), before the backend's per-header framing.
    /// A message up to the broker's limit minus this budget (and that framing) is always
    /// dead-lettered as a full copy.
    pub const BUDGET: usize = REASON.len()
        + 4 * 1024
        + KIND.len()
        + 16
        + ATTEMPTS.len()
        + 10
        + TOPIC.len()
        + crate::topic::MAX_TOPIC_LEN
        + PARTITION.len()
        + 10
        + OFFSET.len()
        + 39
        + DELIVERY_COUNT.len()
        + 10
        + REDUCED.len()
        + 12
        + ORIGINAL_LENGTH.len()
        + 20;
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// Every attempt failed with a retryable error.
    Exhausted,
    /// The handler returned a permanent error (or panicked).
    Permanent,
    /// The message could not be decoded.
    Malformed,
    /// The backend's client library could not read the message (e.g. a header block that
    /// is not UTF-8): the transport handed it over with its headers decoded lossily.
    Unreadable,
}

impl DeadLetterKind {
    /// The value of the `dualbus-dlq-kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Permanent => "permanent",
            Self::Malformed => "malformed",
            Self::Unreadable => "unreadable",
        }
    }
}

/// Something the pool did, for observers (metrics, tests, the order checker).
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolEvent<'a> {
    /// A handler attempt failed and will be retried after `delay`.
    Retrying {
        /// The event.
        envelope: &'a Envelope,
        /// The failed attempt, from 1.
        attempt: u32,
        /// The error.
        error: &'a HandleError,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// A message was published to the dead letter (it is acknowledged next).
    DeadLettered {
        /// The event, if it could be decoded.
        envelope: Option<&'a Envelope>,
        /// Why.
        kind: DeadLetterKind,
        /// The reason text.
        reason: &'a str,
        /// Where it was.
        position: Position,
    },
    /// The broker confirmed an acknowledgement.
    Acked {
        /// The event, if it could be decoded.
        envelope: Option<&'a Envelope>,
        /// Where it was.
        position: Position,
    },
    /// An acknowledgement failed: the message will be redelivered.
    AckFailed {
        /// Where it was.
        position: Position,
        /// The error.
        error: &'a Error,
    },
    /// A redelivery of a message the pool already holds was dropped.
    DuplicateDropped {
        /// Where it was.
        position: Position,
    },
    /// A partition of a consumer group changed state.
    Partition {
        /// The partition.
        partition: u32,
        /// Its ownership epoch.
        epoch: u64,
        /// The new state.
        state: PartitionState,
    },
}

/// The life of a partition in a consumer-group member (DESIGN.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PartitionState {
    /// Ownership granted; nothing pulled yet.
    Assigned,
    /// The transport moves the partition back to its first unacknowledged message.
    Rewinding,
    /// Pulled and handled.
    Active,
    /// Revoked: not pulled; buffered deliveries dropped unacknowledged; started handlers
    /// finish within the drain deadline, then the partition is released.
    Draining,
    /// Released to the group.
    Revoked,
    /// Ownership gone without a drain: no acknowledgements, no new handlers.
    Lost,
}

/// Receives [`PoolEvent`]s. Called inline on the pool's tasks: keep it cheap.
pub trait PoolObserver: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &PoolEvent<'_>);
}

/// Counters of one subscription's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Deliveries received from the transport.
    pub received: u64,
    /// Events whose handler succeeded.
    pub handled: u64,
    /// Failed attempts that were retried.
    pub retried: u64,
    /// Messages published to the dead letter.
    pub dead_lettered: u64,
    /// Of those, messages that could not be decoded.
    pub malformed: u64,
    /// Of those, messages the backend's client could not read (marked by the transport).
    pub unreadable: u64,
    /// Dead letters stored as a reduced record (the full copy was over the size limit).
    pub dead_letters_reduced: u64,
    /// Dead letters the broker refused for good (even reduced): their aggregates stay
    /// parked until the subscription stops, nothing of them is acknowledged.
    pub dead_letters_refused: u64,
    /// Acknowledgements confirmed.
    pub acked: u64,
    /// Acknowledgements that failed (the broker redelivers those messages).
    pub ack_failures: u64,
    /// Redeliveries of held messages that were dropped.
    pub duplicates_dropped: u64,
    /// Failed dead-letter publishes (each is retried).
    pub dead_letter_failures: u64,
    /// Deliveries held whole now (queued or running), at most `max_in_flight`.
    pub in_flight: u64,
    /// The most deliveries held whole at once.
    pub peak_in_flight: u64,
    /// Deferred deliveries held now (of aggregates over `max_per_key`, waiting or
    /// running), at most `max_deferred`.
    pub deferred: u64,
    /// The most deferred deliveries held at once.
    pub peak_deferred: u64,
    /// Deferred deliveries read again from the broker by position.
    pub reread: u64,
    /// Transport errors reported by the delivery stream.
    pub transport_errors: u64,
    /// Deliveries of partitions this member did not own (any more), dropped unhandled.
    pub stale_dropped: u64,
    /// Acknowledgements skipped because the partition's ownership had moved on.
    pub stale_acks: u64,
    /// Consumer groups: partitions this member was given (one per new ownership epoch).
    pub partitions_acquired: u64,
    /// Consumer groups: partitions this member drained and gave back to the group.
    pub partitions_released: u64,
    /// Consumer groups: partitions this member lost without a drain (expired, fenced).
    pub partitions_lost: u64,
}

/// The per-aggregate queues of a pool at one moment
/// ([`SubscriptionHandle::key_queues`](crate::SubscriptionHandle::key_queues)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyQueues {
    /// Aggregates with queued or running work.
    pub keys: usize,
    /// The longest queue of one aggregate: deliveries waiting behind its running one.
    pub deepest: usize,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Deliveries finished (acknowledged) during the drain.
    pub drained: u64,
    /// Handlers cut off at the deadline; their messages stay unacknowledged.
    pub abandoned: u64,
    /// Buffered deliveries that never started; returned unacknowledged.
    pub dropped: u64,
    /// Deliveries whose dead-letter publish kept failing; unacknowledged.
    pub parked: u64,
    /// Whether the deadline passed before the drain finished.
    pub timed_out: bool,
    /// How long the shutdown took.
    pub elapsed: Duration,
    /// The pool's counters at the end.
    pub stats: PoolStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_must_fit_the_brokers_unacked_limit() {
        let mut caps = DomainCapabilities::new("test");
        let pool = PoolConfig {
            max_in_flight: 100,
            max_deferred: 400,
            ..PoolConfig::default()
        };
        assert!(pool.check_unacked_limit(&caps).is_ok(), "no limit");
        for (limit, ok) in [(499, false), (500, true), (501, true)] {
            caps.max_unacked = Some(limit);
            let r = pool.check_unacked_limit(&caps);
            assert_eq!(r.is_ok(), ok, "limit {limit}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("pool.max_deferred"), "{e}");
            }
        }
        // The defaults fit the default JetStream consumer (max_ack_pending 50,000).
        caps.max_unacked = Some(50_000);
        assert!(PoolConfig::default().check_unacked_limit(&caps).is_ok());
    }
}
