//! # dualbus-memory
//!
//! The in-process backend of [dualbus](https://crates.io/crates/dualbus): both transports
//! (domain and simple) on tokio, with no server. It is the **reference implementation** that
//! every other backend is measured against in the conformance suite, and the embedded default
//! of the facade.
//!
//! It fails the way a broker does: domain deliveries have an ack deadline and come back when
//! it passes or after a `nack`; each partition keeps an ack floor. Consumer groups are
//! in-process: a subscription joins its group as a member, partitions are assigned by
//! rendezvous hashing over the live members, a revoked partition is drained and released
//! before its next owner gets it, a member that is dropped (a crash) loses its partitions
//! at once, and every new owner rewinds a partition to its ack floor. It is **not
//! durable**: everything lives as long as the [`Memory`] broker value (and its clones)
//! lives.
//!
//! On the simple bus, every subscriber and every member of a queue group has a bounded
//! buffer of its own (`simple_buffer`). A queue group's messages are dealt at publish time,
//! round-robin over its members, skipping a member whose buffer is full: each message goes
//! to exactly one member, equally fast members get equal shares, and a member that stops
//! reading holds at most its buffer. A publisher waits only when every member's buffer is
//! full. A member that leaves hands the messages left in its buffer to the others.
//!
//! ```
//! use dualbus_memory::Memory;
//! use dualbus_core::{DomainBus, Envelope, SimpleBus, handler_fn, Event, HandleError};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> dualbus_core::Result<()> {
//! let broker = Memory::new();
//! let domain = DomainBus::builder(broker.clone()).source("orders-service").build()?;
//! domain.publish("orders", &Envelope::new("order-1", "OrderCreated", 1, "{}")?).await?;
//! let sub = domain
//!     .subscribe("orders")
//!     .start(handler_fn(|e: Event| async move {
//!         assert_eq!(e.aggregate_id, "order-1");
//!         Ok::<_, HandleError>(())
//!     }))
//!     .await?;
//! # let _ = sub;
//! let simple = SimpleBus::builder(broker).build()?;
//! simple.publish("notifications", "hello").await?;
//! # Ok(()) }
//! ```
//!
//! Both transport traits are implemented on [`Memory`]; calling their methods directly needs
//! the trait path (`DomainTransport::publish(&broker, ..)`), since both have a `publish`.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod domain;
mod simple;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::{DomainCapabilities, Error, HeaderStyle, SimpleCapabilities};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Settings of the in-process broker.
///
/// It is also the `memory:` section of the facade's configuration files (`domain.memory`,
/// `simple.memory`), read with serde: the keys `partitions`, `ack_wait` (a duration such as
/// `30s`, or milliseconds, see [`dualbus_core::config::duration`]), `max_payload` and
/// `simple_buffer`; a missing key keeps its default and an unknown key is an error.
/// [`MemoryConfig::topic_partitions`] is not a key of that section: the facade fills it from
/// its backend-neutral `topics.<name>.partitions`. Values are checked by
/// [`Memory::with_config`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Partitions per domain topic. Default 16.
    pub partitions: u32,
    /// Redelivery deadline of unacknowledged domain deliveries. Default 30 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub ack_wait: Duration,
    /// Largest payload plus headers accepted. Default 1 MiB.
    pub max_payload: usize,
    /// Buffered simple messages per subscriber (and per queue-group member) before
    /// publishers wait. Default 1,024.
    pub simple_buffer: usize,
    /// Partitions of particular topics, overriding `partitions` (not read from a
    /// configuration section; see [`MemoryConfig::with_topic_partitions`]).
    #[serde(skip)]
    pub topic_partitions: BTreeMap<String, u32>,
    /// Whether a new owner rewinds a partition to its ack floor (always, except in the
    /// conformance suite's mutant check).
    #[serde(skip)]
    pub(crate) rewind: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            ack_wait: Duration::from_secs(30),
            max_payload: 1024 * 1024,
            simple_buffer: 1024,
            topic_partitions: BTreeMap::new(),
            rewind: true,
        }
    }
}

impl MemoryConfig {
    /// Same settings with another partition count.
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Same settings with another ack deadline.
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Same settings with another payload limit.
    #[must_use]
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// Same settings with another simple-subscriber buffer.
    #[must_use]
    pub fn with_simple_buffer(mut self, simple_buffer: usize) -> Self {
        self.simple_buffer = simple_buffer;
        self
    }

    /// Same settings with `partitions` for `topic`.
    #[must_use]
    pub fn with_topic_partitions(mut self, topic: impl Into<String>, partitions: u32) -> Self {
        self.topic_partitions.insert(topic.into(), partitions);
        self
    }

    /// **Test only**: a new owner does *not* rewind a partition at takeover, so the old
    /// owner's unacknowledged messages come back only after their ack deadline. This is the
    /// naive handover the conformance suite's order checker must catch.
    #[cfg(feature = "conformance")]
    #[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
    #[must_use]
    pub fn without_rewind(mut self) -> Self {
        self.rewind = false;
        self
    }

    pub(crate) fn partitions_of(&self, topic: &str) -> usize {
        self.topic_partitions
            .get(topic)
            .copied()
            .unwrap_or(self.partitions) as usize
    }

    fn validate(&self) -> Result<(), Error> {
        if self.partitions == 0 || self.topic_partitions.values().any(|p| *p == 0) {
            return Err(Error::config("memory.partitions", "must be at least 1"));
        }
        if self.ack_wait.is_zero() {
            return Err(Error::config("memory.ack_wait", "must not be zero"));
        }
        if self.simple_buffer == 0 {
            return Err(Error::config("memory.simple_buffer", "must be at least 1"));
        }
        Ok(())
    }
}

/// An in-process broker and a client handle to it.
///
/// Clones share the broker *and* the handle (closing one closes all clones);
/// [`Memory::connect`] makes another client of the same broker with a lifecycle of its own,
/// the way a second process would connect to a real server.
#[derive(Clone, Debug)]
pub struct Memory {
    broker: Arc<Broker>,
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Broker {
    config: MemoryConfig,
    domain_caps: DomainCapabilities,
    simple_caps: SimpleCapabilities,
    domain: domain::DomainBroker,
    simple: simple::SimpleBroker,
}

/// Per-client lifecycle: each role closes on its own, so that a domain bus and a simple bus
/// may share one handle.
#[derive(Debug, Default)]
struct Handle {
    domain_closed: CancellationToken,
    simple_closed: CancellationToken,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory {
    /// A broker with default settings (16 partitions, 30 s ack deadline, 1 MiB payloads).
    pub fn new() -> Self {
        Self::build(MemoryConfig::default())
    }

    /// A broker with the given settings.
    pub fn with_config(config: MemoryConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: MemoryConfig) -> Self {
        let mut domain_caps = DomainCapabilities::new("memory");
        domain_caps.durable = false;
        domain_caps.ordered_per_key = true;
        domain_caps.consumer_groups = true;
        domain_caps.expected_version = true;
        domain_caps.replay = true;
        domain_caps.max_payload = config.max_payload;
        domain_caps.header_style = HeaderStyle::HyphenPercentEncoded;
        domain_caps.ack_deadline = Some(config.ack_wait);
        domain_caps.reread = true;
        let mut simple_caps = SimpleCapabilities::new("memory");
        simple_caps.queue_groups = true;
        simple_caps.request_reply = true;
        simple_caps.max_payload = config.max_payload;
        Self {
            broker: Arc::new(Broker {
                domain: domain::DomainBroker::default(),
                simple: simple::SimpleBroker::default(),
                domain_caps,
                simple_caps,
                config,
            }),
            handle: Arc::new(Handle::default()),
        }
    }

    /// Another client of the same broker, with its own open/closed state.
    #[must_use]
    pub fn connect(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            handle: Arc::new(Handle::default()),
        }
    }

    /// The broker's settings.
    pub fn config(&self) -> &MemoryConfig {
        &self.broker.config
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn section(json: &str) -> Result<MemoryConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn the_section_reads_durations_and_keeps_defaults() {
        let c = section(r#"{ "partitions": 8, "ack_wait": "30d" }"#).unwrap();
        assert_eq!(c.partitions, 8);
        assert_eq!(c.ack_wait, Duration::from_secs(30 * 86_400));
        let defaults = MemoryConfig::default();
        assert_eq!(c.max_payload, defaults.max_payload);
        assert_eq!(c.simple_buffer, defaults.simple_buffer);
        assert!(c.rewind, "skipped fields keep their defaults");
        assert_eq!(section("{}").unwrap(), defaults);
        let c = section(r#"{ "ack_wait": 250, "max_payload": 4096, "simple_buffer": 8 }"#).unwrap();
        assert_eq!(c.ack_wait, Duration::from_millis(250), "milliseconds");
        assert_eq!((c.max_payload, c.simple_buffer), (4096, 8));
    }

    #[test]
    fn the_section_refuses_unknown_and_internal_keys() {
        for key in ["partition", "rewind", "topic_partitions"] {
            let e = section(&format!(r#"{{ "{key}": 1 }}"#)).expect_err(key);
            assert!(e.to_string().contains("unknown field"), "{key}: {e}");
        }
        let e = section(r#"{ "ack_wait": "soon" }"#).expect_err("a bad duration");
        assert!(e.to_string().contains("30s"), "{e}");
    }

    #[test]
    fn with_config_checks_values() {
        let zero = section(r#"{ "partitions": 0 }"#).unwrap();
        match Memory::with_config(zero) {
            Err(Error::Config { path, .. }) => assert_eq!(path, "memory.partitions"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        let c = section(r#"{ "partitions": 4 }"#)
            .unwrap()
            .with_topic_partitions("payments", 2);
        let broker = Memory::with_config(c).unwrap();
        assert_eq!(broker.config().partitions_of("payments"), 2);
        assert_eq!(broker.config().partitions_of("orders"), 4);
    }
}
