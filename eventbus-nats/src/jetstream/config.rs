//! The JetStream settings: streams, durable consumers and per-topic layouts, and their
//! validation.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use dualbus_core::{Error, Result};
use serde::Deserialize;

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Storage {
    /// On disk: messages survive a server restart. The default.
    #[default]
    File,
    /// In memory: lost when the server stops.
    Memory,
}

impl From<Storage> for StorageType {
    fn from(s: Storage) -> Self {
        match s {
            Storage::File => Self::File,
            Storage::Memory => Self::Memory,
        }
    }
}

/// When a stream forgets a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Retention {
    /// By the limits (age, bytes, count) only. The default: replay needs it.
    #[default]
    Limits,
    /// Once every consumer acknowledged it.
    Interest,
    /// Once one consumer acknowledged it (one consumer per subject set).
    WorkQueue,
}

/// Settings of the streams the transport creates, one per domain topic.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamSettings {
    /// Prefix of stream names (and of the lease bucket). Default `DUALBUS_`.
    pub prefix: String,
    /// File (default) or memory storage.
    pub storage: Storage,
    /// Replicas in a cluster. Default 1.
    pub replicas: usize,
    /// Retention policy. Default limits.
    pub retention: Retention,
    /// Oldest message kept; zero keeps them forever (the default).
    #[serde(with = "dualbus_core::config::duration")]
    pub max_age: Duration,
    /// Largest stream size in bytes; -1 (the default) for no limit.
    pub max_bytes: i64,
    /// Most messages kept; -1 (the default) for no limit.
    pub max_msgs: i64,
    /// How long the server remembers `Nats-Msg-Id`s for deduplication. Default 2 minutes.
    #[serde(with = "dualbus_core::config::duration")]
    pub duplicate_window: Duration,
    /// Update an existing stream whose settings differ, instead of refusing to start.
    pub update_existing: bool,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            prefix: "DUALBUS_".to_owned(),
            storage: Storage::File,
            replicas: 1,
            retention: Retention::Limits,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_msgs: -1,
            duplicate_window: Duration::from_secs(120),
            update_existing: false,
        }
    }
}

/// Settings of the durable consumers behind domain subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// After how long without an ack or progress signal the server redelivers. The keyed
    /// pool signals progress for everything it holds at a third of it. Default 30 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub ack_wait: Duration,
    /// Most deliveries the server hands out unacknowledged; past it the server stops
    /// delivering to the whole consumer. The keyed pool holds up to `max_in_flight +
    /// max_deferred` unacknowledged deliveries (50,000 by default), so this must be at
    /// least that: the bus refuses a pool that does not fit. Default 50,000.
    pub max_ack_pending: i64,
    /// Messages asked for per pull request. Default 256.
    pub batch: usize,
    /// The partition leases of groups: a crashed member's partitions are free again after
    /// this long. Default 10 s. The lease bucket keeps the value it was created with.
    #[serde(with = "dualbus_core::config::duration")]
    pub lease_ttl: Duration,
    /// A subscriber's registration in its group expires this long after its last
    /// heartbeat (the facade's `domain.group.member_timeout`). Default 10 s. The member
    /// bucket keeps the value it was created with.
    #[serde(with = "dualbus_core::config::duration")]
    pub member_timeout: Duration,
    /// Update an existing consumer whose settings differ, instead of refusing to start.
    pub update_existing: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 50_000,
            batch: 256,
            lease_ttl: Duration::from_secs(10),
            member_timeout: Duration::from_secs(10),
            update_existing: false,
        }
    }
}

/// How a topic's events map to subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Layout {
    /// `<topic>.<partition>.<encoded aggregate id>` (see [`crate::subject`]): replay and
    /// appends per aggregate on the server. The default.
    #[default]
    Partitioned,
    /// The subject is the topic itself and the aggregate id travels only in the body, as
    /// jxt-core publishes: for sharing a topic with services that use that layout. Replay
    /// reads the whole topic; appends with an expected version are not available.
    Subject,
}

/// Settings of one topic (or of every topic inside its stream's subjects).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicSettings {
    /// The subject layout.
    pub layout: Layout,
    /// An existing stream to use instead of the transport's own (e.g. jxt-core's
    /// `BUSINESS_STREAM`). It is not checked against the stream settings, only for covering
    /// the topic's subjects; if missing it is created with `stream_subjects`.
    pub stream: Option<String>,
    /// The subjects of `stream` when it has to be created. Default: the topic's own.
    pub stream_subjects: Vec<String>,
    /// The topic's partition count, overriding [`JetStreamConfig::partitions`]; see there.
    pub partitions: Option<u32>,
}

/// JetStream settings of the domain transport.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct JetStreamConfig {
    /// The streams.
    pub stream: StreamSettings,
    /// The durable consumers.
    pub consumer: ConsumerSettings,
    /// How long a publish waits for the server's acknowledgement, and the timeout of
    /// JetStream API calls. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub request_timeout: Duration,
    /// Publishes of one batch awaiting their acknowledgement at once. Default 512.
    pub publish_window: usize,
    /// Partitions of a topic's stream (the facade's `domain.group.partitions`): the server
    /// stores each event under `<topic>.<partition>.<token>` by its subject transform, and a
    /// consumer group spreads the partitions over its members. Default 16, at most
    /// [`MAX_PARTITIONS`]. It is part of the stream: a stream created with another count is
    /// refused with the migration to follow (see `docs/backends/nats.md`).
    pub partitions: u32,
    /// Per-topic settings. A topic without an entry that falls inside the subjects of a
    /// configured topic's `stream` uses that topic's layout and stream (so its dead-letter
    /// topic lands beside it); any other topic is partitioned on its own stream.
    pub topics: BTreeMap<String, TopicSettings>,
    /// Whether a new owner rewinds a partition's consumer to its ack floor (always, except
    /// in the conformance suite's mutant check).
    #[serde(skip)]
    pub(crate) rewind: bool,
}

impl JetStreamConfig {
    /// **Test only**: a new owner of a partition does *not* rewind its consumer at the
    /// takeover (it still moves the pin), so the earlier owner's unacknowledged messages
    /// come back only after the ack wait. This is the naive handover the conformance
    /// suite's order checker must catch.
    #[cfg(feature = "conformance")]
    #[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
    #[must_use]
    pub fn without_rewind(mut self) -> Self {
        self.rewind = false;
        self
    }
}

/// The most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            stream: StreamSettings::default(),
            consumer: ConsumerSettings::default(),
            request_timeout: Duration::from_secs(5),
            publish_window: 512,
            partitions: 16,
            topics: BTreeMap::new(),
            rewind: true,
        }
    }
}

pub(super) fn validate(c: &JetStreamConfig) -> Result<()> {
    if c.consumer.ack_wait < Duration::from_millis(100) {
        return Err(Error::config(
            "nats.jetstream.consumer.ack_wait",
            "must be at least 100ms",
        ));
    }
    if c.consumer.lease_ttl < Duration::from_millis(300) {
        return Err(Error::config(
            "nats.jetstream.consumer.lease_ttl",
            "must be at least 300ms",
        ));
    }
    if c.consumer.member_timeout < Duration::from_millis(300) {
        return Err(Error::config(
            "nats.jetstream.consumer.member_timeout",
            "must be at least 300ms",
        ));
    }
    if c.consumer.batch == 0 {
        return Err(Error::config(
            "nats.jetstream.consumer.batch",
            "must be at least 1",
        ));
    }
    if c.consumer.max_ack_pending == 0 {
        return Err(Error::config(
            "nats.jetstream.consumer.max_ack_pending",
            "must be positive (or -1 for no limit)",
        ));
    }
    if c.publish_window == 0 {
        return Err(Error::config(
            "nats.jetstream.publish_window",
            "must be at least 1",
        ));
    }
    if c.stream.replicas == 0 {
        return Err(Error::config(
            "nats.jetstream.stream.replicas",
            "must be at least 1",
        ));
    }
    if c.stream.prefix.is_empty()
        || !c
            .stream
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::config(
            "nats.jetstream.stream.prefix",
            "must be non-empty and of [A-Za-z0-9_-]",
        ));
    }
    let partitions = std::iter::once(("nats.jetstream.partitions".to_owned(), c.partitions)).chain(
        c.topics.iter().filter_map(|(t, s)| {
            s.partitions
                .map(|p| (format!("nats.jetstream.topics.{t}.partitions"), p))
        }),
    );
    for (path, p) in partitions {
        if !(1..=MAX_PARTITIONS).contains(&p) {
            return Err(Error::config(
                path,
                format!("must be 1 to {MAX_PARTITIONS}, not {p}"),
            ));
        }
    }
    if c.request_timeout.is_zero() {
        return Err(Error::config(
            "nats.jetstream.request_timeout",
            "must be positive",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused() {
        let mut c = JetStreamConfig::default();
        assert!(validate(&c).is_ok());
        c.consumer.batch = 0;
        assert!(matches!(validate(&c), Err(Error::Config { .. })));
        let mut c = JetStreamConfig::default();
        c.stream.prefix = "a.b".into();
        assert!(matches!(validate(&c), Err(Error::Config { .. })));
        let mut c = JetStreamConfig::default();
        c.consumer.lease_ttl = Duration::from_millis(1);
        assert!(matches!(validate(&c), Err(Error::Config { .. })));
        for (p, ok) in [
            (0, false),
            (1, true),
            (1023, true),
            (1024, true),
            (1025, false),
        ] {
            let c = JetStreamConfig {
                partitions: p,
                ..JetStreamConfig::default()
            };
            assert_eq!(validate(&c).is_ok(), ok, "{p} partitions");
            let mut c = JetStreamConfig::default();
            c.topics.insert(
                "orders".into(),
                TopicSettings {
                    partitions: Some(p),
                    ..TopicSettings::default()
                },
            );
            match validate(&c) {
                Ok(()) => assert!(ok, "{p} partitions of a topic accepted"),
                Err(Error::Config { path, .. }) => {
                    assert!(!ok);
                    assert_eq!(path, "nats.jetstream.topics.orders.partitions");
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut c = JetStreamConfig::default();
        for (ms, ok) in [(299, false), (300, true), (301, true)] {
            c.consumer.member_timeout = Duration::from_millis(ms);
            match validate(&c) {
                Ok(()) => assert!(ok, "{ms} ms accepted"),
                Err(Error::Config { path, .. }) => {
                    assert!(!ok, "{ms} ms refused");
                    assert_eq!(path, "nats.jetstream.consumer.member_timeout");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
