//! # dualbus-kafka
//!
//! The Apache Kafka backend of [dualbus](https://crates.io/crates/dualbus), on `rdkafka`
//! (librdkafka 2.12, compiled from source by `rdkafka-sys`): the **domain-event bus** on
//! Kafka topics.
//!
//! - **Publishing**: an idempotent producer with `acks=all`; the key is the aggregate id and
//!   the partition its murmur2 hash (`murmur2_random`, the Java client's placement), or
//!   FNV-1a as sarama places keys ([`Partitioner::SaramaFnv1a`]). The envelope travels as
//!   Kafka headers (the CloudEvents Kafka binding: `ce_` attributes, `content-type`) or as
//!   a jxt JSON body, as the bus's codec says. A publish resolves on the broker's delivery
//!   report; a batch is pipelined and keeps each aggregate's order.
//! - **Consumer groups**: a domain subscription is a member of the Kafka consumer group
//!   named after its group, on the broker-side protocol of KIP-848
//!   (`group.protocol=consumer`; classic with `cooperative-sticky` as an option). The
//!   broker's assignments reach the keyed pool as group events with a partition epoch
//!   kept in the commit metadata; a new owner resumes at the committed offset; a revoked
//!   partition is drained and committed inside the rebalance callback before it is given
//!   up; a lost one is abandoned without a commit. See [`consumer`](crate#consumer-groups).
//! - **Commits**: only completed work is committed: the contiguous prefix of completed
//!   offsets per partition, coalesced every [`ConsumerSettings::commit_interval`]. Records
//!   completed above that offset are listed in the commit metadata, so that the next owner
//!   does not handle them again.
//! - **Replay** of one aggregate scans its partition (found by the key's hash) from the
//!   start: it costs a read of the whole partition. Appends with an expected version are
//!   refused: Kafka has no conditional write.
//!
//! ```no_run
//! # async fn run() -> dualbus_core::Result<()> {
//! use dualbus_core::{DomainBus, Envelope};
//! use dualbus_kafka::{Kafka, KafkaConfig};
//!
//! let kafka = Kafka::connect(KafkaConfig::new(["127.0.0.1:9092"])).await?;
//! let domain = DomainBus::builder(kafka).source("orders-service").build()?;
//! domain
//!     .publish("orders", &Envelope::new("order-1", "OrderPlaced", 1, "{}")?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## Consumer groups
//!
//! Each subscription runs one librdkafka consumer polled on its own thread. Under
//! backpressure (the pool holds all it may), the thread pauses every assigned partition
//! and keeps polling, so the member stays in the group. A member that cannot reach the
//! group coordinator keeps its partitions until the broker fences it (a session timeout
//! later, when another member owns them): librdkafka reports the loss only when it
//! reaches the coordinator again. Its commits are refused from then on, so the broker
//! never takes its offsets; handlers it runs meanwhile may overlap the new owner's.
//!
//! Secrets (SASL password, key password, secret raw properties) never appear in `Debug`
//! output.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod consumer;
mod headers;
mod metadata;
pub mod partition;
mod publish;
mod reader;
mod topics;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use dualbus_core::{
    DomainCapabilities, DomainSubscription, DomainTransport, Error, HeaderStyle, InboundMessage,
    OutboundMessage, Receipt, Result, SubscriptionSpec, Topic,
};
use parking_lot::Mutex;
use rdkafka::admin::AdminClient;
use rdkafka::producer::FutureProducer;

pub use config::{
    Compression, ConsumerSettings, Forever, GroupProtocol, KafkaConfig, Partitioner,
    ProducerSettings, SaslMechanism, Security, SecurityProtocol, TopicRetention, TopicSettings,
};
pub use dualbus_core::config::Secret;
/// The Kafka client this crate is built on.
pub use rdkafka;

use consumer::Member;
use topics::Topics;

pub(crate) const BACKEND: &str = "kafka";

/// The logging context of every client: librdkafka's log lines and errors go to `tracing`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Logs;

impl rdkafka::ClientContext for Logs {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "dualbus_kafka::librdkafka", facility = fac, "{log_message}");
            }
            L::Warning => {
                tracing::warn!(target: "dualbus_kafka::librdkafka", facility = fac, "{log_message}");
            }
            L::Notice | L::Info => {
                tracing::info!(target: "dualbus_kafka::librdkafka", facility = fac, "{log_message}");
            }
            L::Debug => {
                tracing::debug!(target: "dualbus_kafka::librdkafka", facility = fac, "{log_message}");
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(target: "dualbus_kafka::librdkafka", %error, "{reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for Logs {}

/// The Kafka domain transport.
///
/// Clones share the producer; `close` closes it for every clone and ends every
/// subscription.
#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: Arc<KafkaConfig>,
    pub(crate) caps: DomainCapabilities,
    pub(crate) producer: FutureProducer<Logs>,
    pub(crate) topics: Topics,
    closed: AtomicBool,
    /// Commits whose out-of-order set did not fit the metadata limit.
    metadata_overflows: Arc<std::sync::atomic::AtomicU64>,
    /// Live members of this transport's subscriptions, by (topic, group).
    members: Mutex<HashMap<(String, String), Vec<Member>>>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A librdkafka error that may go away (a broker down, a timeout, a full queue).
pub(crate) fn kafka_error(e: rdkafka::error::KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode as C;
    let transient = matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::MessageTimedOut
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::QueueFull
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NetworkException
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::Resolve
                | C::UnknownTopicOrPartition
                | C::UnknownLeaderEpoch
                | C::RebalanceInProgress,
        )
    );
    if transient {
        Error::Unavailable {
            backend: BACKEND,
            source: Box::new(e),
        }
    } else {
        Error::backend(BACKEND, false, e)
    }
}

impl Kafka {
    /// Creates the producer and checks that a broker answers within
    /// [`KafkaConfig::request_timeout`]: an unreachable cluster is a clear
    /// [`Error::Unavailable`] now, not at the first publish.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let config = Arc::new(config);
        let producer: FutureProducer<Logs> = config
            .producer_config()
            .create_with_context(Logs)
            .map_err(|e| config_error(&e))?;
        let admin: AdminClient<Logs> = config
            .common()
            .create_with_context(Logs)
            .map_err(|e| config_error(&e))?;
        let topics = Topics::new(config.clone(), admin);
        topics.check_reachable(&producer).await?;
        let mut caps = DomainCapabilities::new(BACKEND);
        caps.durable = matches!(config.producer.acks.as_str(), "all" | "-1");
        caps.ordered_per_key = true;
        caps.consumer_groups = true;
        caps.replay = true;
        caps.max_payload = config
            .producer
            .max_message_bytes
            .saturating_sub(headers::RECORD_RESERVE);
        caps.wire = headers::WIRE;
        caps.header_style = HeaderStyle::UnderscorePlain;
        caps.reread = true;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                caps,
                producer,
                topics,
                closed: AtomicBool::new(false),
                metadata_overflows: Arc::default(),
                members: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The underlying producer.
    pub fn producer(&self) -> &FutureProducer<impl rdkafka::ClientContext> {
        &self.inner.producer
    }

    /// How many commits of this transport's subscriptions left out the records completed
    /// out of order because they did not fit `offset.metadata.max.bytes`
    /// ([`ConsumerSettings::metadata_max_bytes`]): after a rebalance those records are
    /// handled again.
    pub fn metadata_overflows(&self) -> u64 {
        self.inner.metadata_overflows.load(Ordering::Relaxed)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("kafka transport"))
        } else {
            Ok(())
        }
    }

    /// The live members of `topic` and `group` (forgetting the finished ones).
    fn members_of(&self, topic: &str, group: &str) -> Vec<Member> {
        let mut all = self.inner.members.lock();
        for list in all.values_mut() {
            list.retain(|m| !m.finished());
        }
        all.retain(|_, list| !list.is_empty());
        all.get(&(topic.to_owned(), group.to_owned()))
            .cloned()
            .unwrap_or_default()
    }
}

/// A property librdkafka refused.
fn config_error(e: &rdkafka::error::KafkaError) -> Error {
    Error::config("kafka.properties", e.to_string())
}

#[async_trait]
impl DomainTransport for Kafka {
    fn capabilities(&self) -> &DomainCapabilities {
        &self.inner.caps
    }

    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        self.check_open()?;
        self.publish_one(topic, message).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        if let Err(e) = self.check_open() {
            return messages
                .iter()
                .map(|_| Err(e.for_each_in_batch(BACKEND)))
                .collect();
        }
        self.publish_many(topic, messages).await
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_open()?;
        // The topic exists (created with our settings) before the member subscribes.
        self.inner.topics.ready(spec.topic.as_str()).await?;
        let (member, subscription) = consumer::start(
            self.inner.config.clone(),
            spec.clone(),
            self.reread(&spec.topic),
            self.inner.metadata_overflows.clone(),
        )?;
        self.inner
            .members
            .lock()
            .entry((spec.topic.as_str().to_owned(), spec.group.clone()))
            .or_default()
            .push(member);
        Ok(subscription)
    }

    async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_open()?;
        self.replay_key(topic, key).await
    }

    async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
        self.check_open()?;
        for m in self.members_of(topic.as_str(), group) {
            m.flush().await?;
        }
        self.lag(topic, group).await.map(Some)
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let members: Vec<Member> = self
            .inner
            .members
            .lock()
            .drain()
            .flat_map(|(_, m)| m)
            .collect();
        for m in members {
            m.stop().await;
        }
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.request_timeout;
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            producer.flush(timeout)
        })
        .await
        .map_err(|e| Error::backend(BACKEND, false, e))?
        .map_err(kafka_error)
    }
}
