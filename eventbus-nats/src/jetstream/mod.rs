//! The domain-event transport on JetStream.
//!
//! - One stream per domain topic, named `<prefix><encoded topic>` (default prefix
//!   `DUALBUS_`), taking the subjects `<topic>.*`; an event is published on
//!   `<topic>.<encoded aggregate id>` and stored by the stream's subject transform on
//!   `<topic>.<partition>.<encoded aggregate id>` (see [`crate::subject`];
//!   [`JetStreamConfig::partitions`]). Streams are created at first use; an existing stream
//!   whose settings differ is a configuration error unless
//!   [`StreamSettings::update_existing`] is set, and one of another partitioning always is.
//! - Publishing waits for the server's acknowledgement; `Nats-Msg-Id` carries the event id,
//!   so a retried publish within the stream's duplicate window is stored once.
//! - A domain subscription is a durable pull consumer named after the group, with explicit
//!   acks, unlimited server-side deliveries (attempts are counted by the keyed pool, which
//!   dead-letters itself) and an ack wait the pool keeps extending for what it holds.
//! - Consumer groups: each partition has a durable consumer per group and a lease (a key in
//!   the KV bucket `<prefix>LEASES`, expiring after [`ConsumerSettings::lease_ttl`] unless
//!   renewed); the core coordinator shares the partitions among the live members, and a
//!   member pulls a partition only while it holds its lease, after resetting the consumer
//!   to its ack floor: whatever an earlier owner left unacknowledged is delivered again,
//!   first and in order. A topic of one partition has one active subscriber and standbys.

mod ack;
mod config;
pub mod coordination;
mod inbound;
mod lease;
mod pinned;
mod plan;
mod provision;
mod publish;
mod pull;
mod replay;
mod reread;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use dualbus_core::{
    DomainCapabilities, DomainSubscription, DomainTransport, Error, HeaderStyle, InboundMessage,
    OutboundMessage, Position, Receipt, Result, SubscriptionSpec, Topic,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{BACKEND, NatsConfig, headers, unavailable};

pub use config::{
    ConsumerSettings, JetStreamConfig, Layout, MAX_PARTITIONS, Retention, Storage, StreamSettings,
    TopicSettings,
};
pub use plan::{consumer_name, stream_name};

use config::validate;
use lease::HeldLease;
use plan::Plan;

fn api_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::backend(BACKEND, true, e)
}

fn timeout(operation: &'static str, after: Duration) -> Error {
    Error::Timeout { operation, after }
}

/// The JetStream domain transport.
///
/// Clones share the connection; `close` closes it for every clone.
#[derive(Clone)]
pub struct JetStream {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: JetStreamConfig,
    caps: DomainCapabilities,
    closed: AtomicBool,
    /// Cancelled by `close`: every subscription's delivery stream ends.
    shutdown: CancellationToken,
    /// Streams known to exist with our settings, by topic.
    streams: tokio::sync::Mutex<HashMap<String, stream::Stream>>,
    /// Topics whose stream is known to be in place, with their plan: the publish fast path.
    ready: parking_lot::RwLock<HashMap<String, Arc<Plan>>>,
    /// The lease bucket, once opened.
    leases: tokio::sync::OnceCell<(kv::Store, Duration)>,
    /// The member bucket, once opened.
    members: tokio::sync::OnceCell<(kv::Store, Duration)>,
    /// Leases held by this client's subscriptions, by key.
    held: Mutex<HashMap<String, HeldLease>>,
}

impl std::fmt::Debug for JetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStream")
            .field("state", &self.inner.client.connection_state())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl JetStream {
    /// Connects to the servers with `config.jetstream` as the JetStream settings.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let js_config = config.jetstream.clone();
        validate(&js_config)?;
        let client = crate::config::connect_client(&config).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(js_config.request_timeout)
            .ack_timeout(js_config.request_timeout)
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone());
        // JetStream must be enabled on the server: a clear error now, not at first publish.
        match tokio::time::timeout(js_config.request_timeout, js.query_account()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Error::config(
                    "nats.urls",
                    format!("JetStream is not available on the server ({e}); start it with -js"),
                ));
            }
            Err(_) => return Err(timeout("JetStream account info", js_config.request_timeout)),
        }
        let mut caps = DomainCapabilities::new(BACKEND);
        caps.durable = js_config.stream.storage == Storage::File;
        caps.ordered_per_key = true;
        // A topic's partitions are shared by the members of a group (a topic of one
        // partition, or of the subject layout, has one active member).
        caps.consumer_groups = true;
        caps.replay = true;
        caps.dedup = true;
        caps.expected_version = true;
        caps.max_payload = client.server_info().max_payload;
        // Every publish carries `Nats-Msg-Id`; an append also the expected subject sequence
        // (a u64: up to 20 digits).
        caps.wire = headers::WIRE
            .with_id_header(headers::MSG_ID)
            .with_append_header(headers::EXPECTED_LAST_SUBJECT_SEQUENCE, 20);
        caps.header_style = HeaderStyle::HyphenPercentEncoded;
        caps.ack_deadline = Some(js_config.consumer.ack_wait);
        // Past `max_ack_pending` the server stops delivering to the whole consumer: the
        // pool's bounds must be reached first (the bus checks it at subscribe).
        caps.max_unacked = usize::try_from(js_config.consumer.max_ack_pending).ok();
        caps.reread = true;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config: js_config,
                caps,
                closed: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                streams: tokio::sync::Mutex::new(HashMap::new()),
                ready: parking_lot::RwLock::new(HashMap::new()),
                leases: tokio::sync::OnceCell::new(),
                members: tokio::sync::OnceCell::new(),
                held: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The underlying `async-nats` client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context (for what the bus does not cover).
    pub fn context(&self) -> &jetstream::Context {
        &self.inner.js
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("nats connection"))
        } else {
            Ok(())
        }
    }

    fn plan(&self, topic: &str) -> Plan {
        Plan::of(&self.inner.config, topic)
    }
}

#[async_trait]
impl DomainTransport for JetStream {
    fn capabilities(&self) -> &DomainCapabilities {
        &self.inner.caps
    }

    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        self.publish_inner(topic, message, None).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        self.publish_batch_inner(topic, messages).await
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.subscribe_inner(spec).await
    }

    async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        self.replay_inner(topic, key).await
    }

    async fn last_for_key(&self, topic: &Topic, key: &str) -> Result<Option<InboundMessage>> {
        self.last_for_key_inner(topic, key).await
    }

    async fn publish_if_last(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        self.publish_if_last_inner(topic, message, expected).await
    }

    async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
        self.pending_inner(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.shutdown.cancel();
        // Free the groups of our subscriptions before the connection goes.
        self.release_held().await;
        self.inner.client.drain().await.map_err(unavailable)
    }
}

fn not_per_aggregate() -> Error {
    Error::NotSupported {
        operation: "append with an expected version on a topic of the subject layout (the aggregate id is only in the body)",
        backend: BACKEND,
    }
}
