//! The domain-event transport on JetStream.
//!
//! - One stream per domain topic, named `<prefix><encoded topic>` (default prefix
//!   `DUALBUS_`), taking the subjects `<topic>.*.*`; an event is stored on
//!   `<topic>.<partition>.<encoded aggregate id>` (see [`crate::subject`]). Streams are
//!   created at first use; an existing stream whose settings differ is a configuration error
//!   unless [`StreamSettings::update_existing`] is set.
//! - Publishing waits for the server's acknowledgement; `Nats-Msg-Id` carries the event id,
//!   so a retried publish within the stream's duplicate window is stored once.
//! - A domain subscription is a durable pull consumer named after the group, with explicit
//!   acks, unlimited server-side deliveries (attempts are counted by the keyed pool, which
//!   dead-letters itself) and an ack wait the pool keeps extending for what it holds.
//! - One active subscriber per durable consumer: a subscriber holds a lease (a key in the
//!   KV bucket `<prefix>LEASES`, expiring after [`ConsumerSettings::lease_ttl`] unless
//!   renewed). A second subscriber gets [`Error::Conflict`]. Every subscriber, before its
//!   first pull, resets the consumer to its ack floor: whatever an earlier holder left
//!   unacknowledged is delivered again, first and in order.

use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use dualbus_core::{
    Acker, Capabilities, Delivery, DomainSubscription, DomainTransport, Error, HeaderStyle,
    Headers, InboundMessage, OutboundMessage, Position, Receipt, Result, StartPosition,
    SubscriptionSpec, Write, validate_topic,
};
use futures::StreamExt as _;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::subject::{encode_key, event_subject, parse_subject, stream_subjects};
use crate::{BACKEND, NatsConfig, to_nats_headers, unavailable, unreadable};

/// `Nats-Msg-Id`: the publish deduplication id.
const MSG_ID: &str = "Nats-Msg-Id";
/// `Nats-Expected-Last-Subject-Sequence`: the conditional publish.
const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

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
    /// Most deliveries the server hands out unacknowledged. Default 10,000.
    pub max_ack_pending: i64,
    /// Messages asked for per pull request. Default 256.
    pub batch: usize,
    /// The single-active-subscriber lease: a crashed subscriber's group is free again after
    /// this long. Default 10 s. The lease bucket keeps the value it was created with.
    #[serde(with = "dualbus_core::config::duration")]
    pub lease_ttl: Duration,
    /// Update an existing consumer whose settings differ, instead of refusing to start.
    pub update_existing: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            batch: 256,
            lease_ttl: Duration::from_secs(10),
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
    /// Per-topic settings. A topic without an entry that falls inside the subjects of a
    /// configured topic's `stream` uses that topic's layout and stream (so its dead-letter
    /// topic lands beside it); any other topic is partitioned on its own stream.
    pub topics: BTreeMap<String, TopicSettings>,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            stream: StreamSettings::default(),
            consumer: ConsumerSettings::default(),
            request_timeout: Duration::from_secs(5),
            publish_window: 512,
            topics: BTreeMap::new(),
        }
    }
}

/// Where a topic lives: its layout, stream and subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    layout: Layout,
    stream: String,
    /// The stream is configured by name (shared with others): not checked against our
    /// stream settings.
    shared: bool,
    /// Subjects of the stream when we create it.
    subjects: Vec<String>,
}

impl Plan {
    fn of(config: &JetStreamConfig, topic: &str) -> Self {
        let own = |layout: Layout| Self {
            layout,
            stream: stream_name(&config.stream.prefix, topic),
            shared: false,
            subjects: vec![match layout {
                Layout::Partitioned => stream_subjects(topic),
                Layout::Subject => topic.to_owned(),
            }],
        };
        let shared = |t: &str, s: &TopicSettings, name: &String| Self {
            layout: s.layout,
            stream: name.clone(),
            shared: true,
            subjects: if s.stream_subjects.is_empty() {
                vec![match s.layout {
                    Layout::Partitioned => stream_subjects(t),
                    Layout::Subject => t.to_owned(),
                }]
            } else {
                s.stream_subjects.clone()
            },
        };
        if let Some(s) = config.topics.get(topic) {
            return match &s.stream {
                Some(name) => shared(topic, s, name),
                None => own(s.layout),
            };
        }
        for (t, s) in &config.topics {
            if let Some(name) = &s.stream {
                let p = shared(t, s, name);
                if p.subjects
                    .iter()
                    .any(|pattern| subject_matches(pattern, topic))
                {
                    return Self {
                        layout: s.layout,
                        ..p
                    };
                }
            }
        }
        own(Layout::Partitioned)
    }

    /// The subject an event of `key` is published on.
    fn subject(&self, topic: &str, key: &str) -> String {
        match self.layout {
            Layout::Partitioned => event_subject(topic, 0, key),
            Layout::Subject => topic.to_owned(),
        }
    }

    /// The subjects of `topic` within its stream.
    fn filter(&self, topic: &str) -> String {
        match self.layout {
            Layout::Partitioned => stream_subjects(topic),
            Layout::Subject => topic.to_owned(),
        }
    }

    /// The durable consumer of `group` for `topic`: on a shared stream the topic is part of
    /// the name, as several topics share the stream.
    fn consumer(&self, topic: &str, group: &str) -> String {
        if self.shared {
            format!("{}_{}", consumer_name(group), encode_key(topic))
        } else {
            consumer_name(group)
        }
    }
}

/// Whether the subject `pattern` (with `*` and `>` wildcards) matches the literal `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for p in pattern.split('.') {
        match (p, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// The stream name of a topic: the prefix and the topic's subject-token encoding (dots
/// become `%2E`), so that distinct topics never share a stream.
pub fn stream_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}{}", encode_key(topic))
}

/// The durable consumer name of a group (its subject-token encoding).
pub fn consumer_name(group: &str) -> String {
    encode_key(group)
}

/// The lease key of a durable consumer (KV keys take no `%`: it becomes `=`).
fn lease_key(stream: &str, consumer: &str) -> String {
    format!("{stream}.{consumer}").replace('%', "=")
}

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
    caps: Capabilities,
    closed: AtomicBool,
    /// Cancelled by `close`: every subscription's delivery stream ends.
    shutdown: CancellationToken,
    /// Streams known to exist with our settings, by topic.
    streams: tokio::sync::Mutex<HashMap<String, stream::Stream>>,
    /// Topics whose stream is known to be in place, with their plan: the publish fast path.
    ready: parking_lot::RwLock<HashMap<String, Arc<Plan>>>,
    /// The lease bucket, once opened.
    leases: tokio::sync::OnceCell<(kv::Store, Duration)>,
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
        let client = crate::connect_client(&config).await?;
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
        let mut caps = Capabilities::new(BACKEND);
        caps.durable = js_config.stream.storage == Storage::File;
        caps.ordered_per_key = true;
        caps.replay = true;
        caps.dedup = true;
        caps.expected_version = true;
        caps.max_payload = client.server_info().max_payload;
        // Every publish carries `Nats-Msg-Id`; an append also the expected subject sequence
        // (a u64: up to 20 digits).
        caps.wire = crate::WIRE
            .with_id_header(MSG_ID)
            .with_append_header(EXPECTED_LAST_SUBJECT_SEQUENCE, 20);
        caps.header_style = HeaderStyle::Nats;
        caps.ack_deadline = Some(js_config.consumer.ack_wait);
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

    fn stream_config(&self, topic: &str, plan: &Plan) -> stream::Config {
        let s = &self.inner.config.stream;
        stream::Config {
            name: plan.stream.clone(),
            subjects: plan.subjects.clone(),
            storage: s.storage.into(),
            retention: match s.retention {
                Retention::Limits => RetentionPolicy::Limits,
                Retention::Interest => RetentionPolicy::Interest,
                Retention::WorkQueue => RetentionPolicy::WorkQueue,
            },
            num_replicas: s.replicas,
            max_age: s.max_age,
            max_bytes: s.max_bytes,
            max_messages: s.max_msgs,
            duplicate_window: s.duplicate_window,
            description: Some(format!("dualbus domain topic {topic}")),
            ..stream::Config::default()
        }
    }

    /// The stream of `topic`, created if missing, checked against our settings if not.
    async fn stream(&self, topic: &str) -> Result<stream::Stream> {
        let mut streams = self.inner.streams.lock().await;
        if let Some(s) = streams.get(topic) {
            return Ok(s.clone());
        }
        let plan = self.plan(topic);
        let want = self.stream_config(topic, &plan);
        let s = match self.inner.js.get_stream(&want.name).await {
            Ok(existing) if plan.shared => {
                let have = &existing.cached_info().config.subjects;
                let probe = plan.subject(topic, "probe");
                if !have.iter().any(|p| subject_matches(p, &probe)) {
                    return Err(Error::config(
                        format!("nats.jetstream.topics.{topic}.stream"),
                        format!(
                            "stream {} (subjects {have:?}) does not take the subject {probe} of topic {topic}",
                            want.name
                        ),
                    ));
                }
                existing
            }
            Ok(existing) => {
                let have = &existing.cached_info().config;
                let diff = stream_differences(have, &want);
                if diff.is_empty() {
                    existing
                } else if self.inner.config.stream.update_existing {
                    self.inner
                        .js
                        .update_stream(want.clone())
                        .await
                        .map_err(|e| {
                            Error::config(
                                "nats.jetstream.stream",
                                format!("updating stream {}: {e}", want.name),
                            )
                        })?;
                    self.inner
                        .js
                        .get_stream(&want.name)
                        .await
                        .map_err(api_error)?
                } else {
                    return Err(Error::config(
                        "nats.jetstream.stream",
                        format!(
                            "stream {} exists with other settings ({}); set update_existing to update it",
                            want.name,
                            diff.join(", ")
                        ),
                    ));
                }
            }
            Err(e) if is_not_found(&e) => {
                self.inner
                    .js
                    .create_stream(want.clone())
                    .await
                    .map_err(|e| {
                        Error::config(
                            "nats.jetstream.stream",
                            format!("creating stream {}: {e}", want.name),
                        )
                    })?
            }
            Err(e) => return Err(connection_or_api(e)),
        };
        streams.insert(topic.to_owned(), s.clone());
        Ok(s)
    }

    /// The stream of `topic` if it exists (read paths do not create it).
    async fn existing_stream(&self, topic: &str) -> Result<Option<stream::Stream>> {
        if let Some(s) = self.inner.streams.lock().await.get(topic) {
            return Ok(Some(s.clone()));
        }
        let name = self.plan(topic).stream;
        match self.inner.js.get_stream(&name).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(connection_or_api(e)),
        }
    }

    fn check_message(
        &self,
        topic: &str,
        message: &OutboundMessage,
        write: Write,
    ) -> Result<async_nats::HeaderMap> {
        validate_topic(topic)?;
        if message.key.is_empty() {
            return Err(dualbus_core::EnvelopeError::Blank {
                field: "aggregate_id",
            }
            .into());
        }
        self.inner.caps.check_size(message, write)?;
        let mut headers = to_nats_headers(&message.headers)?;
        if let Some(id) = &message.id {
            dualbus_core::validate_header(MSG_ID, id)?;
            headers.insert(MSG_ID, id.as_str());
        }
        Ok(headers)
    }

    /// The plan of `topic` once its stream is in place (created or checked on first use).
    async fn ready(&self, topic: &str) -> Result<Arc<Plan>> {
        if let Some(p) = self.inner.ready.read().get(topic) {
            return Ok(p.clone());
        }
        self.stream(topic).await?;
        let plan = Arc::new(self.plan(topic));
        self.inner
            .ready
            .write()
            .insert(topic.to_owned(), plan.clone());
        Ok(plan)
    }

    async fn send(
        &self,
        topic: &str,
        plan: &Plan,
        message: OutboundMessage,
        mut headers: async_nats::HeaderMap,
        expected: Option<Option<Position>>,
    ) -> Result<PublishAckFuture> {
        if let Some(expected) = expected {
            let seq = expected.map_or(0, |p| p.offset);
            headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string().as_str());
        }
        let subject = plan.subject(topic, &message.key);
        self.inner
            .js
            .publish_with_headers(subject, headers, message.payload)
            .await
            .map_err(|e| publish_error(e, self.inner.config.request_timeout, &message.key))
    }

    async fn publish_inner(
        &self,
        topic: &str,
        message: OutboundMessage,
        expected: Option<Option<Position>>,
    ) -> Result<Receipt> {
        self.check_open()?;
        let write = if expected.is_some() {
            Write::Append
        } else {
            Write::Publish
        };
        let headers = self.check_message(topic, &message, write)?;
        let plan = self.ready(topic).await?;
        let key = message.key.clone();
        let ack = self.send(topic, &plan, message, headers, expected).await?;
        self.settle(topic, ack, &key).await
    }

    /// Awaits the server's ack. A stream deleted behind our back is forgotten, so that the
    /// next publish creates it again.
    async fn settle(&self, topic: &str, ack: PublishAckFuture, key: &str) -> Result<Receipt> {
        let ack = ack.await;
        if let Err(e) = &ack
            && matches!(e.kind(), PublishErrorKind::StreamNotFound)
        {
            self.inner.ready.write().remove(topic);
            self.inner.streams.lock().await.remove(topic);
        }
        receipt(ack, self.inner.config.request_timeout, key)
    }

    async fn lease_bucket(&self) -> Result<(kv::Store, Duration)> {
        let r = self
            .inner
            .leases
            .get_or_try_init(|| async {
                let bucket = format!("{}LEASES", self.inner.config.stream.prefix);
                let wanted = self.inner.config.consumer.lease_ttl;
                let store = match self.inner.js.get_key_value(&bucket).await {
                    Ok(s) => s,
                    Err(_) => self
                        .inner
                        .js
                        .create_key_value(kv::Config {
                            bucket: bucket.clone(),
                            description: "dualbus single-active-subscriber leases".into(),
                            history: 1,
                            max_age: wanted,
                            storage: self.inner.config.stream.storage.into(),
                            num_replicas: self.inner.config.stream.replicas,
                            ..kv::Config::default()
                        })
                        .await
                        .map_err(api_error)?,
                };
                let ttl = store.status().await.map_err(api_error)?.max_age();
                if ttl != wanted {
                    tracing::warn!(
                        bucket,
                        ?ttl,
                        ?wanted,
                        "the lease bucket exists with another TTL; using it"
                    );
                }
                if ttl.is_zero() {
                    return Err(Error::config(
                        "nats.jetstream.consumer.lease_ttl",
                        format!(
                            "the lease bucket {bucket} has no max age: leases would never expire"
                        ),
                    ));
                }
                Ok::<_, Error>((store, ttl))
            })
            .await?;
        Ok(r.clone())
    }

    /// The durable consumer of `spec`, created if missing, checked if not.
    async fn consumer(
        &self,
        stream: &stream::Stream,
        spec: &SubscriptionSpec,
    ) -> Result<PullConsumer> {
        let c = &self.inner.config.consumer;
        let plan = self.plan(&spec.topic);
        let name = plan.consumer(&spec.topic, &spec.group);
        let want = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: plan.filter(&spec.topic),
            description: Some(format!("dualbus group {} on {}", spec.group, spec.topic)),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            // Attempts are counted by the pool, which dead-letters: a server-side limit
            // would silently move the ack floor past a message.
            max_deliver: -1,
            max_ack_pending: c.max_ack_pending,
            deliver_policy: match spec.start {
                StartPosition::Latest => DeliverPolicy::New,
                _ => DeliverPolicy::All,
            },
            ..pull::Config::default()
        };
        let existing = match stream.get_consumer::<pull::Config>(&name).await {
            Ok(c) => Some(c),
            // Classify the failure: missing (create it) or anything else.
            Err(e) => match stream.consumer_info(&name).await {
                Err(i) if is_consumer_not_found(&i) => None,
                _ => return Err(Error::backend(BACKEND, true, e)),
            },
        };
        match existing {
            Some(existing) => {
                let have = &existing.cached_info().config;
                let mut diff = Vec::new();
                differ(&mut diff, "ack_wait", &have.ack_wait, &want.ack_wait);
                differ(
                    &mut diff,
                    "max_ack_pending",
                    &have.max_ack_pending,
                    &want.max_ack_pending,
                );
                differ(
                    &mut diff,
                    "filter_subject",
                    &have.filter_subject,
                    &want.filter_subject,
                );
                if have.max_deliver > 0 {
                    diff.push(format!("max_deliver {} (want unlimited)", have.max_deliver));
                }
                if have.ack_policy != AckPolicy::Explicit {
                    diff.push("ack_policy (want explicit)".to_owned());
                }
                if diff.is_empty() {
                    Ok(existing)
                } else if c.update_existing {
                    let mut update = want;
                    // The start of an existing consumer cannot change.
                    update.deliver_policy = have.deliver_policy;
                    stream.update_consumer(update).await.map_err(|e| {
                        Error::config(
                            "nats.jetstream.consumer",
                            format!("updating consumer {name}: {e}"),
                        )
                    })
                } else {
                    Err(Error::config(
                        "nats.jetstream.consumer",
                        format!(
                            "consumer {name} exists with other settings ({}); set update_existing to update it",
                            diff.join(", ")
                        ),
                    ))
                }
            }
            None => stream.create_consumer(want).await.map_err(|e| {
                Error::config(
                    "nats.jetstream.consumer",
                    format!("creating consumer {name}: {e}"),
                )
            }),
        }
    }

    /// Takes the single-active-subscriber lease of a durable consumer.
    async fn acquire_lease(
        &self,
        stream: &str,
        consumer: &str,
        spec: &SubscriptionSpec,
    ) -> Result<Lease> {
        let (store, ttl) = self.lease_bucket().await?;
        let key = lease_key(stream, consumer);
        let token = uuid::Uuid::now_v7().to_string();
        // A subscription of this client on the same consumer holds the lease until it has
        // stopped (after its last handler): one that was just dropped releases it in the
        // background. Wait for that, up to the request timeout, instead of reporting a
        // conflict with ourselves; a subscription still live gets the conflict after it.
        let ours = self.inner.held.lock().get(&key).map(|h| h.released.clone());
        if let Some(released) = ours {
            let _ =
                tokio::time::timeout(self.inner.config.request_timeout, released.cancelled()).await;
        }
        match store.create(&key, Bytes::from(token.clone())).await {
            Ok(revision) => {
                let held = HeldLease {
                    token,
                    cancel: CancellationToken::new(),
                    released: CancellationToken::new(),
                };
                let lease = Lease {
                    store,
                    key: key.clone(),
                    token: held.token.clone(),
                    revision,
                    ttl,
                    cancel: held.cancel.clone(),
                    released: held.released.clone(),
                    transport: Arc::downgrade(&self.inner),
                };
                self.inner.held.lock().insert(key, held);
                Ok(lease)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(Error::Conflict(format!(
                    "another subscriber of group {:?} on topic {:?} is active (JetStream allows one per durable consumer until consumer groups); its lease ends when it closes or {ttl:?} after it stopped",
                    spec.group, spec.topic
                )))
            }
            Err(e) => Err(api_error(e)),
        }
    }
}

fn validate(c: &JetStreamConfig) -> Result<()> {
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
    if c.request_timeout.is_zero() {
        return Err(Error::config(
            "nats.jetstream.request_timeout",
            "must be positive",
        ));
    }
    Ok(())
}

/// Notes `name` in `diff` when the existing value differs from the wanted one.
fn differ<T: PartialEq + std::fmt::Debug>(diff: &mut Vec<String>, name: &str, have: &T, want: &T) {
    if have != want {
        diff.push(format!("{name} {have:?} (want {want:?})"));
    }
}

fn stream_differences(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut d = Vec::new();
    differ(&mut d, "subjects", &have.subjects, &want.subjects);
    differ(&mut d, "storage", &have.storage, &want.storage);
    differ(&mut d, "retention", &have.retention, &want.retention);
    differ(
        &mut d,
        "replicas",
        &have.num_replicas.max(1),
        &want.num_replicas,
    );
    differ(&mut d, "max_age", &have.max_age, &want.max_age);
    differ(&mut d, "max_bytes", &have.max_bytes, &want.max_bytes);
    differ(&mut d, "max_msgs", &have.max_messages, &want.max_messages);
    differ(
        &mut d,
        "duplicate_window",
        &have.duplicate_window,
        &want.duplicate_window,
    );
    d
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn is_consumer_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    match e.kind() {
        jetstream::context::ConsumerInfoErrorKind::NotFound => true,
        jetstream::context::ConsumerInfoErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        }
        _ => false,
    }
}

fn connection_or_api(e: jetstream::context::GetStreamError) -> Error {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::Request => unavailable(e),
        _ => api_error(e),
    }
}

fn publish_error(e: jetstream::context::PublishError, after: Duration, key: &str) -> Error {
    match e.kind() {
        PublishErrorKind::TimedOut => {
            timeout("publish (the message may or may not be stored)", after)
        }
        PublishErrorKind::BrokenPipe => unavailable(e),
        PublishErrorKind::WrongLastSequence => Error::Conflict(format!(
            "aggregate {key:?} has a newer event than the expected one"
        )),
        PublishErrorKind::MaxPayloadExceeded => Error::backend(BACKEND, false, e),
        _ => Error::backend(BACKEND, true, e),
    }
}

fn receipt(
    ack: std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    after: Duration,
    key: &str,
) -> Result<Receipt> {
    let ack = ack.map_err(|e| publish_error(e, after, key))?;
    let r = Receipt::at(Position {
        partition: 0,
        offset: u128::from(ack.sequence),
    });
    Ok(if ack.duplicate { r.as_duplicate() } else { r })
}

/// A lease of this client, as the transport tracks it.
struct HeldLease {
    /// Which acquisition (a new subscription takes a new token).
    token: String,
    /// Cancelled when its subscription ends: the lease is being released.
    cancel: CancellationToken,
    /// Cancelled once the lease is released on the server.
    released: CancellationToken,
}

/// A held single-active-subscriber lease, renewed until dropped or lost.
struct Lease {
    store: kv::Store,
    key: String,
    token: String,
    revision: u64,
    ttl: Duration,
    cancel: CancellationToken,
    released: CancellationToken,
    transport: std::sync::Weak<Inner>,
}

impl Lease {
    /// Gives the lease up at once (a subscription that ended, or could not start).
    async fn release(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(
            self.ttl,
            self.store
                .delete_expect_revision(&self.key, Some(self.revision)),
        )
        .await;
        self.forget();
    }

    /// Stops tracking the lease as this client's (released, or lost to another holder).
    fn forget(&self) {
        if let Some(inner) = self.transport.upgrade() {
            let mut held = inner.held.lock();
            if held.get(&self.key).is_some_and(|h| h.token == self.token) {
                held.remove(&self.key);
            }
        }
        self.released.cancel();
    }

    /// Renews the lease at a third of its TTL until `cancel`; cancels `lost` if it could not
    /// be renewed within the TTL or another holder took it.
    fn keep(mut self, lost: CancellationToken) -> LeaseGuard {
        let guard = LeaseGuard {
            cancel: self.cancel.clone(),
        };
        tokio::spawn(async move {
            let mut renewed = Instant::now();
            let period = self.ttl / 3;
            loop {
                tokio::select! {
                    () = self.cancel.cancelled() => break,
                    () = tokio::time::sleep(period) => {}
                }
                match tokio::time::timeout(
                    period,
                    self.store
                        .update(&self.key, Bytes::from_static(b"held"), self.revision),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        self.revision = r;
                        renewed = Instant::now();
                    }
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        tracing::error!(key = %self.key, "single-active-subscriber lease lost to another subscriber; stopping");
                        lost.cancel();
                        self.forget();
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(key = %self.key, error = %e, "lease renewal failed; retrying")
                    }
                    Err(_) => tracing::warn!(key = %self.key, "lease renewal timed out; retrying"),
                }
                if renewed.elapsed() >= self.ttl {
                    tracing::error!(key = %self.key, "single-active-subscriber lease expired (server unreachable); stopping");
                    lost.cancel();
                    self.forget();
                    return;
                }
            }
            // Released: free the group for the next subscriber at once.
            self.release().await;
        });
        guard
    }
}

/// Releases the lease when the subscription is dropped.
struct LeaseGuard {
    cancel: CancellationToken,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Acknowledgements of one JetStream delivery.
struct JsAcker(jetstream::message::Acker);

impl JsAcker {
    async fn send(&self, kind: AckKind) -> Result<()> {
        self.0.ack_with(kind).await.map_err(|e| Error::Unavailable {
            backend: BACKEND,
            source: e,
        })
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack).await
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        self.send(AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
    }

    async fn term(&self) -> Result<()> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<()> {
        self.send(AckKind::Progress).await
    }
}

fn headers_of(map: Option<&async_nats::HeaderMap>) -> Headers {
    let Some(h) = map else {
        return Headers::new();
    };
    let mut headers = Headers::with_capacity(h.len());
    for (name, values) in h.iter() {
        if let Some(v) = values.last() {
            headers.insert(name.to_string(), v.as_str());
        }
    }
    headers
}

fn inbound(
    topic: &str,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
    seq: u64,
) -> InboundMessage {
    let (partition, key) = match parse_subject(topic, subject) {
        Some((p, k)) => (p, Some(k)),
        None => (0, None),
    };
    InboundMessage {
        topic: topic.to_owned(),
        key,
        headers: headers_of(headers),
        payload,
        position: Position {
            partition,
            offset: u128::from(seq),
        },
    }
}

/// A message read through the message-get API, its headers decoded lossily.
fn stored_inbound(topic: &str, m: &unreadable::Stored) -> InboundMessage {
    InboundMessage {
        headers: m.headers(),
        ..inbound(topic, &m.subject, None, m.payload.clone(), m.seq)
    }
}

/// A delivery; `redelivered` marks a message delivered before (a rewind does not count as a
/// redelivery on the server, so that the pool and handlers still see it as one).
fn delivery(topic: &str, m: jetstream::Message, high_water: &mut u64) -> Result<Delivery> {
    let (seq, delivered) = match m.info() {
        Ok(i) => (i.stream_sequence, i.delivered),
        Err(e) => {
            return Err(Error::backend(BACKEND, true, e));
        }
    };
    let delivered = if seq <= *high_water {
        delivered.max(2)
    } else {
        *high_water = seq;
        delivered
    };
    let (m, acker) = m.split();
    let message = inbound(
        topic,
        m.subject.as_str(),
        m.headers.as_ref(),
        m.payload,
        seq,
    );
    Ok(Delivery::new(
        message,
        u32::try_from(delivered).unwrap_or(u32::MAX).max(1),
        Arc::new(JsAcker(acker)),
    ))
}

/// State of a subscription's delivery stream.
struct Pulling {
    topic: String,
    js: jetstream::Context,
    consumer: PullConsumer,
    batch: usize,
    ack_wait: Duration,
    messages: Option<pull::Stream>,
    /// Connections of the client when `messages` was opened.
    opened_at: u64,
    /// Rewind the consumer to its ack floor before the next pull.
    rewind: bool,
    /// The highest stream sequence delivered before: anything at or below it comes again.
    high_water: u64,
    /// The highest stream sequence the client read since the last rewind: a message the
    /// client cannot read is after it.
    last_read: u64,
    /// An unreadable message found after a reconnect, until the consumer is past it.
    poison: Option<Poison>,
    /// Deliveries read ahead (the bounded pulls before an unreadable message).
    ready: VecDeque<Result<Delivery>>,
    /// Ticks while waiting for messages, to look at the connection count.
    watch: tokio::time::Interval,
    stats: Arc<async_nats::Statistics>,
    /// Cancelled when the lease is lost or the transport closes: the stream ends.
    lost: CancellationToken,
    _lease: LeaseGuard,
}

/// How the consumer gets past an unreadable message `S` (see [`crate::unreadable`]).
///
/// Only an acknowledgement can move a JetStream consumer past a message without delivering
/// it, and only while the message is pending (a rewind forgets pending acks) and every
/// message before it is acknowledged (else the next rewind brings it back). So:
/// - ack floor `S - 1` and `S` pending: hand the pool a delivery for it (marked unreadable),
///   wait until the pool dead-lettered it, acknowledge it with a hand-built ack subject, and
///   only then rewind (the floor is now past it);
/// - messages before it still unacknowledged: rewind, deliver exactly the messages before
///   it (bounded pulls), wait until they are acknowledged, then pull normally: the client
///   reads `S` once more (its connection drops again), which makes it pending with the
///   floor at `S - 1`: the first case.
///
/// Nothing is ever deleted from the stream: other groups and other languages' readers
/// share it.
struct Poison {
    stored: unreadable::Stored,
    why: &'static str,
    /// The last message this consumer delivers before it: once the ack floor reached it,
    /// nothing unacknowledged is in front of it.
    last_before: u64,
    phase: Phase,
}

enum Phase {
    /// Hand the pool its delivery next.
    Hand,
    /// Wait until the pool settled it, then acknowledge it and rewind.
    Settling(CancellationToken),
    /// Deliver these messages before it (stream sequences still to come).
    Before(std::collections::BTreeSet<u64>),
    /// Wait until everything before it is acknowledged.
    Floor,
}

/// What to do next while getting past an unreadable message.
enum Step {
    /// Return this delivery.
    Deliver(Delivery),
    /// Look again (read-ahead deliveries, a rewind, or a wait).
    Again,
    /// Pull as usual.
    Pull,
}

/// The acknowledgement of an unreadable message: tells the stream that the pool settled it
/// (dead-lettered it). The stream acknowledges it on the server itself.
struct SettledAcker(CancellationToken);

#[async_trait]
impl Acker for SettledAcker {
    async fn ack(&self) -> Result<()> {
        self.0.cancel();
        Ok(())
    }

    async fn nack(&self, _delay: Duration) -> Result<()> {
        Ok(())
    }

    async fn term(&self) -> Result<()> {
        self.0.cancel();
        Ok(())
    }

    async fn in_progress(&self) -> Result<()> {
        Ok(())
    }
}

impl Pulling {
    fn connects(&self) -> u64 {
        self.stats.connects.load(Ordering::Acquire)
    }

    fn stream_name(&self) -> &str {
        &self.consumer.cached_info().stream_name
    }

    async fn open(&self) -> Result<pull::Stream> {
        self.consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .expires(self.expires())
            .heartbeat(
                self.ack_wait
                    .clamp(Duration::from_millis(500), Duration::from_secs(5))
                    / 2,
            )
            .messages()
            .await
            .map_err(unavailable)
    }

    fn expires(&self) -> Duration {
        self.ack_wait
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Waits a little after a failure, unless the subscription ends meanwhile.
    async fn pause(&self) -> bool {
        tokio::select! {
            () = self.lost.cancelled() => false,
            () = tokio::time::sleep(Duration::from_millis(250)) => true,
        }
    }

    /// The consumer's ack floor and last delivered stream sequence.
    async fn floor_and_delivered(&mut self) -> Result<(u64, u64)> {
        let info = self.consumer.info().await.map_err(|e| {
            Error::backend(BACKEND, true, format!("reading the consumer's state: {e}"))
        })?;
        Ok((
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        ))
    }

    /// Whether a stored message is one this consumer delivers.
    fn filtered(&self, subject: &str) -> bool {
        let c = &self.consumer.cached_info().config;
        if c.filter_subject.is_empty() && c.filter_subjects.is_empty() {
            return true;
        }
        subject_matches(&c.filter_subject, subject)
            || c.filter_subjects
                .iter()
                .any(|f| subject_matches(f, subject))
    }

    /// The first message in `from..=to` this consumer delivers that the client cannot read,
    /// and the sequences of those it delivers before it; at most `limit` of them are read.
    /// Steps over the stream by the consumer's filter, so messages of other subjects in a
    /// shared stream cost nothing.
    async fn scan(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<(Option<(unreadable::Stored, &'static str)>, Vec<u64>)> {
        let c = &self.consumer.cached_info().config;
        let filter = if c.filter_subject.is_empty() {
            ">"
        } else {
            c.filter_subject.as_str()
        };
        let stream = self.stream_name();
        let mut readable = Vec::new();
        let mut seq = from;
        while seq <= to && readable.len() < limit {
            let which = unreadable::Which::NextOn(seq, filter);
            let Some(m) = unreadable::get(&self.js, stream, which).await? else {
                break;
            };
            if m.seq > to {
                break;
            }
            seq = m.seq + 1;
            if !self.filtered(&m.subject) {
                continue;
            }
            if let Some(why) = m.problem() {
                return Ok((Some((m, why)), readable));
            }
            readable.push(m.seq);
        }
        Ok((None, readable))
    }

    /// After a reconnect: finds a message the client cannot read among those the server
    /// delivered after the last one read.
    async fn detect(&mut self, floor: u64, delivered: u64) -> Result<()> {
        if self.poison.is_some() {
            return Ok(());
        }
        let from = self.last_read.max(floor) + 1;
        // Bounded: what the server can have sent beyond the last message read.
        if let (Some((stored, why)), _) = self.scan(from, delivered + 1, 2 * self.batch + 1).await?
        {
            tracing::warn!(
                topic = %self.topic, stream = self.stream_name(), seq = stored.seq,
                subject = %stored.subject, why,
                "a stored message the client cannot read (it drops the connection); it goes to the dead letter"
            );
            self.poison = Some(Poison {
                stored,
                why,
                last_before: floor,
                phase: Phase::Floor,
            });
        }
        Ok(())
    }

    /// The rewind after a reconnect, with an unreadable message in the way or not.
    async fn rewind(&mut self) -> Result<()> {
        let (floor, delivered) = self.floor_and_delivered().await?;
        self.detect(floor, delivered).await?;
        self.high_water = self.high_water.max(delivered);
        if let Some(seq) = self.poison.as_ref().map(|p| p.stored.seq) {
            if floor >= seq {
                // Acknowledged already: nothing in the way any more.
                self.poison = None;
            } else {
                let (earlier, before) = self.scan(floor + 1, seq - 1, usize::MAX).await?;
                let Some(p) = &mut self.poison else {
                    return Ok(());
                };
                if let Some((stored, why)) = earlier {
                    // An earlier one (read in an earlier pass, then rewound): that first.
                    p.stored = stored;
                    p.why = why;
                    return Box::pin(self.rewind()).await;
                }
                if before.is_empty() && delivered >= seq {
                    // Pending, with nothing unacknowledged before it: settle it and ack it;
                    // the rewind comes after that.
                    if !matches!(p.phase, Phase::Settling(_)) {
                        p.phase = Phase::Hand;
                    }
                    self.rewind = false;
                    return Ok(());
                }
                // Deliver exactly the messages before it first, then wait for their acks.
                p.last_before = before.last().copied().unwrap_or(floor);
                p.phase = Phase::Before(before.into_iter().collect());
            }
        }
        // After a reconnect the server may have lost acks (ours in flight, or its own
        // state after a crash) and will redeliver what it lost only after the ack wait,
        // while new messages flow at once: the takeover trap. Rewinding to the ack floor
        // delivers everything unacknowledged again, in order, before anything new.
        self.consumer.reset(None).await.map_err(|e| {
            Error::backend(
                BACKEND,
                true,
                format!("rewinding the consumer to its ack floor: {e}"),
            )
        })?;
        self.last_read = floor;
        self.rewind = false;
        Ok(())
    }

    /// One step of getting past an unreadable message, if one is in the way.
    async fn poison_step(&mut self) -> Result<Step> {
        let Some(p) = &mut self.poison else {
            return Ok(Step::Pull);
        };
        match &mut p.phase {
            Phase::Hand => {
                let settled = CancellationToken::new();
                let message = stored_inbound(&self.topic, &p.stored);
                let delivery =
                    Delivery::new(message, 1, Arc::new(SettledAcker(settled.clone()))).unreadable(
                        format!("the NATS client cannot read this message: {}", p.why),
                    );
                p.phase = Phase::Settling(settled);
                Ok(Step::Deliver(delivery))
            }
            Phase::Settling(settled) => {
                let settled = settled.clone();
                let seq = p.stored.seq;
                tokio::select! {
                    () = self.lost.cancelled() => return Err(Error::closed("subscription")),
                    () = settled.cancelled() => {}
                }
                // Dead-lettered: acknowledge it while it is still pending (a hand-built
                // ack subject: there is no delivery to ack through), then rewind.
                let subject = format!(
                    "$JS.ACK.{}.{}.1.{seq}.0.0.0",
                    self.stream_name(),
                    self.consumer.cached_info().name
                );
                // A request: the server answers once the ack is applied, so the rewind
                // below sees the floor past it. No answer means it was not pending any more
                // (the next rewind finds it again if it is still in the way).
                if let Err(e) = self.js.client().request(subject, Bytes::new()).await {
                    tracing::debug!(topic = %self.topic, seq, error = %e, "the ack of an unreadable message was not confirmed");
                }
                self.poison = None;
                self.messages = None;
                self.rewind = true;
                Ok(Step::Again)
            }
            Phase::Before(remaining) => {
                if remaining.is_empty() {
                    p.phase = Phase::Floor;
                    return Ok(Step::Again);
                }
                let n = remaining.len().min(self.batch);
                let mut batch = self
                    .consumer
                    .batch()
                    .max_messages(n)
                    .expires(self.expires())
                    .messages()
                    .await
                    .map_err(unavailable)?;
                let connects = self.connects();
                let mut got = 0;
                while let Some(m) = batch.next().await {
                    if self.connects() != connects {
                        self.rewind = true;
                        return Ok(Step::Again);
                    }
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            self.rewind = true;
                            return Err(Error::backend(BACKEND, true, e));
                        }
                    };
                    let d = delivery(&self.topic, m, &mut self.high_water)?;
                    let seq = u64::try_from(d.position().offset).unwrap_or(u64::MAX);
                    self.last_read = self.last_read.max(seq);
                    got += 1;
                    if let Some(Poison {
                        phase: Phase::Before(remaining),
                        ..
                    }) = &mut self.poison
                    {
                        remaining.remove(&seq);
                    }
                    self.ready.push_back(Ok(d));
                }
                if self.connects() != connects {
                    self.rewind = true;
                    return Ok(Step::Again);
                }
                if got == 0 {
                    // The rest is gone from the stream (or comes as redeliveries).
                    if let Some(p) = &mut self.poison {
                        p.phase = Phase::Floor;
                    }
                }
                Ok(Step::Again)
            }
            Phase::Floor => {
                // Pulling resumes once everything before it is acknowledged: the client
                // then reads it once more, which makes it pending with the floor before it.
                let last_before = p.last_before;
                let (floor, _) = self.floor_and_delivered().await?;
                if floor >= last_before {
                    return Ok(Step::Pull);
                }
                tokio::select! {
                    () = self.lost.cancelled() => return Err(Error::closed("subscription")),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                Ok(Step::Again)
            }
        }
    }

    /// The next delivery, an error to report, or `None` at the end.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.lost.is_cancelled() {
                return None;
            }
            if let Some(d) = self.ready.pop_front() {
                return Some(d);
            }
            if self.messages.is_some() && self.connects() != self.opened_at {
                self.messages = None;
                self.rewind = true;
            }
            if self.rewind {
                self.messages = None;
                if let Err(e) = self.rewind().await {
                    if !self.pause().await {
                        return None;
                    }
                    return Some(Err(e));
                }
            }
            match self.poison_step().await {
                Ok(Step::Deliver(d)) => return Some(Ok(d)),
                Ok(Step::Again) => continue,
                Ok(Step::Pull) => {}
                Err(e) => {
                    if !self.pause().await {
                        return None;
                    }
                    return Some(Err(e));
                }
            }
            if self.messages.is_none() {
                let connects = self.connects();
                match self.open().await {
                    Ok(m) => {
                        self.messages = Some(m);
                        self.opened_at = connects;
                    }
                    Err(e) => {
                        self.rewind = true;
                        if !self.pause().await {
                            return None;
                        }
                        return Some(Err(e));
                    }
                }
                continue;
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let next = tokio::select! {
                biased;
                () = self.lost.cancelled() => return None,
                n = messages.next() => n,
                // The client reconnects on its own and the pull goes on: notice a reconnect
                // even while nothing arrives (a message the client cannot read drops the
                // connection each time it is sent, and never arrives).
                _ = self.watch.tick() => continue,
            };
            match next {
                Some(Ok(m)) => {
                    if self.connects() != self.opened_at {
                        // Read across a reconnect: the rewind delivers it again, in order.
                        // (Not counted as read: the pull goes on after a reconnect past a
                        // message the client could not read.)
                        continue;
                    }
                    if let Ok(info) = m.info() {
                        self.last_read = self.last_read.max(info.stream_sequence);
                    }
                    return Some(delivery(&self.topic, m, &mut self.high_water));
                }
                Some(Err(e)) => {
                    if !matches!(e.kind(), pull::MessagesErrorKind::MissingHeartbeat) {
                        self.messages = None;
                        self.rewind = true;
                    }
                    if self.lost.is_cancelled() {
                        return None;
                    }
                    return Some(Err(unavailable(e)));
                }
                None => {
                    self.messages = None;
                    self.rewind = true;
                }
            }
        }
    }
}

#[async_trait]
impl DomainTransport for JetStream {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<Receipt> {
        self.publish_inner(topic, message, None).await
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        let n = messages.len();
        let mut out: Vec<Option<Result<Receipt>>> = (0..n).map(|_| None).collect();
        let prepared = match self.check_open() {
            Ok(()) => self.ready(topic).await,
            Err(e) => Err(e),
        };
        let plan = match prepared {
            Ok(p) => p,
            Err(e) => return (0..n).map(|_| Err(clone_error(&e))).collect(),
        };
        let window = self.inner.config.publish_window;
        // Keys with a failed event: their later events in this batch are not sent, so an
        // aggregate's stored events never skip one.
        let mut failed_keys: HashMap<String, usize> = HashMap::new();
        let mut pending: VecDeque<(usize, String, PublishAckFuture)> = VecDeque::new();
        for (i, message) in messages.into_iter().enumerate() {
            if pending.len() >= window
                && let Some((j, key, ack)) = pending.pop_front()
            {
                let r = self.settle(topic, ack, &key).await;
                if r.is_err() {
                    failed_keys.entry(key).or_insert(j);
                }
                out[j] = Some(r);
            }
            if let Some(first) = failed_keys.get(&message.key) {
                out[i] = Some(Err(Error::backend(
                    BACKEND,
                    true,
                    format!(
                        "not sent: event {first} of this batch for aggregate {:?} failed",
                        message.key
                    ),
                )));
                continue;
            }
            let key = message.key.clone();
            let sent = match self.check_message(topic, &message, Write::Publish) {
                Ok(h) => self.send(topic, &plan, message, h, None).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(ack) => pending.push_back((i, key, ack)),
                Err(e) => {
                    failed_keys.entry(key).or_insert(i);
                    out[i] = Some(Err(e));
                }
            }
        }
        for (j, key, ack) in pending {
            out[j] = Some(self.settle(topic, ack, &key).await);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::backend(BACKEND, true, "not sent"))))
            .collect()
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_open()?;
        validate_topic(&spec.topic)?;
        if spec.group.is_empty() {
            return Err(Error::config("domain.group.name", "must not be empty"));
        }
        let plan = self.plan(&spec.topic);
        let stream = self.stream(&spec.topic).await?;
        let mut consumer = self.consumer(&stream, &spec).await?;
        let stream_name = stream.cached_info().config.name.clone();
        let lease = self
            .acquire_lease(
                &stream_name,
                &plan.consumer(&spec.topic, &spec.group),
                &spec,
            )
            .await?;
        // The takeover rewind: whatever an earlier subscriber left unacknowledged comes
        // first, in stream order, before anything new.
        let (high_water, floor) = match consumer.info().await {
            Ok(info) => (
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence,
            ),
            Err(e) => {
                lease.release().await;
                return Err(api_error(e));
            }
        };
        if let Err(e) = consumer.reset(None).await {
            lease.release().await;
            return Err(Error::backend(
                BACKEND,
                true,
                format!(
                    "resetting consumer {} to its ack floor (nats-server 2.14 or later is needed): {e}",
                    plan.consumer(&spec.topic, &spec.group)
                ),
            ));
        }
        let lost = self.inner.shutdown.child_token();
        let guard = lease.keep(lost.clone());
        let c = &self.inner.config.consumer;
        let state = Pulling {
            topic: spec.topic.clone(),
            js: self.inner.js.clone(),
            consumer,
            batch: c.batch,
            ack_wait: c.ack_wait,
            messages: None,
            opened_at: 0,
            rewind: false,
            high_water,
            last_read: floor,
            poison: None,
            ready: VecDeque::new(),
            watch: {
                let mut w = tokio::time::interval(Duration::from_millis(100));
                w.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                w
            },
            stats: self.inner.client.statistics(),
            lost,
            _lease: guard,
        };
        let deliveries = futures::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed();
        Ok(DomainSubscription::new(deliveries))
    }

    async fn replay(&self, topic: &str, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_open()?;
        validate_topic(topic)?;
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(Vec::new());
        };
        let plan = self.plan(topic);
        // Message by message through the JSON message-get API, never through a consumer:
        // a stored message the client cannot read would drop the connection (see
        // `unreadable`); here its headers are decoded lossily instead.
        // Subject layout: the whole topic, filtered by the body's aggregate id below.
        let subject = plan.subject(topic, key);
        let name = &stream.cached_info().config.name;
        let mut out = Vec::new();
        let mut seq = 1;
        while let Some(m) = unreadable::get(
            &self.inner.js,
            name,
            unreadable::Which::NextOn(seq, &subject),
        )
        .await?
        {
            seq = m.seq + 1;
            let mut message = stored_inbound(topic, &m);
            match plan.layout {
                Layout::Partitioned => out.push(message),
                Layout::Subject => {
                    if dualbus_core::Codec::decode(&message).is_ok_and(|e| e.aggregate_id == key) {
                        message.key = Some(key.to_owned());
                        out.push(message);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn last_for_key(&self, topic: &str, key: &str) -> Result<Option<InboundMessage>> {
        self.check_open()?;
        validate_topic(topic)?;
        let plan = self.plan(topic);
        if plan.layout == Layout::Subject {
            return Err(not_per_aggregate());
        }
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(None);
        };
        let subject = plan.subject(topic, key);
        let name = &stream.cached_info().config.name;
        Ok(
            unreadable::get(&self.inner.js, name, unreadable::Which::LastOn(&subject))
                .await?
                .map(|m| stored_inbound(topic, &m)),
        )
    }

    async fn publish_if_last(
        &self,
        topic: &str,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        if self.plan(topic).layout == Layout::Subject {
            return Err(not_per_aggregate());
        }
        self.publish_inner(topic, message, Some(expected)).await
    }

    async fn pending(&self, topic: &str, group: &str) -> Result<Option<u64>> {
        self.check_open()?;
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(None);
        };
        match stream
            .consumer_info(self.plan(topic).consumer(topic, group))
            .await
        {
            Ok(info) => Ok(Some(info.num_pending + info.num_ack_pending as u64)),
            Err(e) if is_consumer_not_found(&e) => Ok(None),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.shutdown.cancel();
        // Free the groups of our subscriptions before the connection goes.
        let held: Vec<(String, HeldLease)> = self.inner.held.lock().drain().collect();
        if let Some((store, _)) = self.inner.leases.get() {
            for (key, lease) in held {
                lease.cancel.cancel();
                let _ = tokio::time::timeout(self.inner.config.request_timeout, store.delete(&key))
                    .await;
                lease.released.cancel();
            }
        }
        self.inner.client.drain().await.map_err(unavailable)
    }
}

fn not_per_aggregate() -> Error {
    Error::NotSupported {
        operation: "append with an expected version on a topic of the subject layout (the aggregate id is only in the body)",
        backend: BACKEND,
    }
}

/// The same failure for every message of a batch that could not start.
fn clone_error(e: &Error) -> Error {
    match e.kind() {
        dualbus_core::ErrorKind::Closed => Error::closed("nats connection"),
        _ => Error::backend(BACKEND, e.is_retryable(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_valid() {
        assert_eq!(stream_name("DUALBUS_", "orders"), "DUALBUS_orders");
        assert_eq!(stream_name("DUALBUS_", "orders.v1"), "DUALBUS_orders%2Ev1");
        assert_ne!(stream_name("P_", "a.b"), stream_name("P_", "a_b"));
        assert_eq!(consumer_name("billing.v2"), "billing%2Ev2");
        let k = lease_key("DUALBUS_orders%2Ev1", "billing");
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
            "{k}"
        );
    }

    #[test]
    fn subject_patterns() {
        assert!(subject_matches("business.>", "business.orders"));
        assert!(subject_matches("business.>", "business.orders.dlq"));
        assert!(!subject_matches("business.>", "business"));
        assert!(subject_matches("orders.*.*", "orders.0.k"));
        assert!(!subject_matches("orders.*.*", "orders.dlq.0.k"));
        assert!(!subject_matches("orders.*.*", "orders.0"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.x"));
    }

    #[test]
    fn plans_follow_the_topic_settings() {
        let mut c = JetStreamConfig::default();
        let own = Plan::of(&c, "orders");
        assert_eq!(own.layout, Layout::Partitioned);
        assert_eq!(own.stream, "DUALBUS_orders");
        assert_eq!(own.subjects, ["orders.*.*"]);
        assert_eq!(own.subject("orders", "a.b"), "orders.0.a%2Eb");
        assert_eq!(own.consumer("orders", "billing"), "billing");
        let jxt = TopicSettings {
            layout: Layout::Subject,
            stream: Some("BUSINESS_STREAM".into()),
            stream_subjects: vec!["business.>".into()],
        };
        c.topics.insert("business.orders".into(), jxt);
        let p = Plan::of(&c, "business.orders");
        assert_eq!(p.layout, Layout::Subject);
        assert_eq!(p.stream, "BUSINESS_STREAM");
        assert_eq!(p.subject("business.orders", "order-1"), "business.orders");
        assert_eq!(p.filter("business.orders"), "business.orders");
        assert_eq!(
            p.consumer("business.orders", "billing"),
            "billing_business%2Eorders"
        );
        // Its dead-letter topic falls inside the shared stream: same layout and stream.
        let dlq = Plan::of(&c, "business.orders.dlq");
        assert_eq!(dlq.layout, Layout::Subject);
        assert_eq!(dlq.stream, "BUSINESS_STREAM");
        // Other topics keep their own streams.
        assert_eq!(Plan::of(&c, "orders"), own);
    }

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
    }
}
