//! The domain-event bus: envelopes, persisted, ordered per aggregate, at-least-once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tower::Service;

use crate::codec::Codec;
use crate::envelope::Envelope;
use crate::error::{Error, HandleError, Result};
use crate::handler::{BoxEventHandler, Event};
use crate::message::{OutboundMessage, Receipt};
use crate::middleware::{BusKind, Hook, HookLayer, PublishInfo, TimeoutLayer};
use crate::middleware::{finish_publish, publish_scopes};
use crate::pool::{
    DeadLetterPolicy, Pool, PoolConfig, PoolObserver, PoolParams, PoolStats, ShutdownReport,
};
use crate::retry::Backoff;
use crate::topic::{dead_letter_topic, group_from_source, validate_group, validate_topic};
use crate::transport::{
    Capabilities, DomainTransport, DynDomainTransport, StartPosition, SubscriptionSpec, Write,
};

/// A request to publish one encoded message: what publish layers see.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublishRequest {
    /// The topic.
    pub topic: Arc<str>,
    /// The encoded message.
    pub message: OutboundMessage,
}

/// The boxed publish pipeline (layers over the transport's publish).
pub type BoxPublishService = tower::util::BoxCloneSyncService<PublishRequest, Receipt, Error>;

type HandlerLayerFn = Arc<dyn Fn(BoxEventHandler) -> BoxEventHandler + Send + Sync>;
type PublishLayerFn = Arc<dyn Fn(BoxPublishService) -> BoxPublishService + Send + Sync>;

/// The transport's publish as a service.
#[derive(Clone)]
struct TransportPublish(DynDomainTransport);

impl Service<PublishRequest> for TransportPublish {
    type Response = Receipt;
    type Error = Error;
    type Future = futures::future::BoxFuture<'static, Result<Receipt>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let t = self.0.clone();
        Box::pin(async move { t.publish(&req.topic, req.message).await })
    }
}

/// Builds a [`DomainBus`].
#[must_use]
pub struct DomainBusBuilder {
    transport: DynDomainTransport,
    source: String,
    codec: Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    hooks: Vec<Arc<dyn Hook>>,
    handler_layers: Vec<HandlerLayerFn>,
    publish_layers: Vec<PublishLayerFn>,
    handler_timeout: Option<Duration>,
    default_group: Option<String>,
}

impl fmt::Debug for DomainBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainBusBuilder")
            .field("backend", &self.transport.capabilities().backend)
            .field("source", &self.source)
            .field("codec", &self.codec)
            .field("pool", &self.pool)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl DomainBusBuilder {
    /// Defaults: source `dualbus`, CloudEvents codec, default pool, retry and dead letter.
    pub fn new(transport: impl DomainTransport) -> Self {
        Self::from_dyn(Arc::new(transport))
    }

    /// Same, from a shared transport.
    pub fn from_dyn(transport: DynDomainTransport) -> Self {
        Self {
            transport,
            source: "dualbus".to_owned(),
            codec: Codec::CloudEvents,
            pool: PoolConfig::default(),
            retry: Backoff::default(),
            dead_letter: DeadLetterPolicy::default(),
            hooks: Vec::new(),
            handler_layers: Vec::new(),
            publish_layers: Vec::new(),
            handler_timeout: None,
            default_group: None,
        }
    }

    /// The service name: CloudEvents `source` of published events and the default group of
    /// subscriptions (mapped to a valid group name if it is not one, see
    /// [`default_group`](Self::default_group)).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The consumer group of subscriptions that do not name one. Default: the source if it
    /// is a valid group name, else the source mapped to one by
    /// [`group_from_source`](crate::group_from_source) (`/orders/eu` gives `_orders_eu`).
    /// [`build`](Self::build) refuses a name that is not a valid group name (see
    /// [`validate_group`](crate::validate_group)) with [`Error::Config`] naming
    /// `domain.group.name`.
    pub fn default_group(mut self, group: impl Into<String>) -> Self {
        self.default_group = Some(group.into());
        self
    }

    /// The codec publishers write (consumers read both).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Pool limits of subscriptions (each subscription may override them).
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Retry policy of handlers.
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }

    /// Dead-letter naming.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = policy;
        self
    }

    /// Adds a hook run around every publish and handler attempt.
    pub fn hook(mut self, hook: Arc<dyn Hook>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Cuts off each handler attempt after `after` (a retryable failure).
    pub fn handler_timeout(mut self, after: Duration) -> Self {
        self.handler_timeout = Some(after);
        self
    }

    /// Adds a layer around each handler attempt (innermost first added).
    pub fn handler_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxEventHandler> + Send + Sync + 'static,
        L::Service:
            Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
        <L::Service as Service<Event>>::Future: Send + 'static,
    {
        self.handler_layers.push(Arc::new(move |inner| {
            BoxEventHandler::new(layer.layer(inner))
        }));
        self
    }

    /// Adds a layer around each publish (e.g. [`crate::middleware::PublishRetryLayer`]).
    pub fn publish_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxPublishService> + Send + Sync + 'static,
        L::Service: Service<PublishRequest, Response = Receipt, Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<PublishRequest>>::Future: Send + 'static,
    {
        self.publish_layers.push(Arc::new(move |inner| {
            BoxPublishService::new(layer.layer(inner))
        }));
        self
    }

    /// Validates the settings and builds the bus.
    pub fn build(self) -> Result<DomainBus> {
        if self.source.trim().is_empty() {
            return Err(Error::config("domain.source", "must not be empty"));
        }
        self.pool.validate()?;
        self.retry.validate()?;
        let caps = self.transport.capabilities();
        if !caps.durable {
            tracing::warn!(
                backend = caps.backend,
                "the domain bus runs on a non-durable backend: events live only as long as this process"
            );
        }
        // Without publish layers the transport is called directly (no boxing per publish).
        let publish = (!self.publish_layers.is_empty()).then(|| {
            let mut publish = BoxPublishService::new(TransportPublish(self.transport.clone()));
            for layer in &self.publish_layers {
                publish = layer(publish);
            }
            publish
        });
        // The default group: as set (and then a valid group name), or the source mapped to
        // one (see `group_from_source`).
        let default_group = match self.default_group {
            Some(g) => {
                validate_group("domain.group.name", &g)?;
                g
            }
            None => {
                let g = group_from_source(&self.source);
                if g != self.source {
                    tracing::info!(
                        source = %self.source,
                        group = %g,
                        "the source is not a valid group name: the default group is derived from it (set the group name to choose another)"
                    );
                }
                g
            }
        };
        Ok(DomainBus {
            inner: Arc::new(Inner {
                transport: self.transport,
                default_group,
                source: self.source,
                codec: self.codec,
                pool: self.pool,
                retry: self.retry,
                dead_letter: self.dead_letter,
                hooks: self.hooks.into(),
                handler_layers: self.handler_layers,
                handler_timeout: self.handler_timeout,
                publish,
                closed: AtomicBool::new(false),
                pools: Mutex::new(Vec::new()),
            }),
        })
    }
}

struct Inner {
    transport: DynDomainTransport,
    source: String,
    default_group: String,
    codec: Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    hooks: Arc<[Arc<dyn Hook>]>,
    handler_layers: Vec<HandlerLayerFn>,
    handler_timeout: Option<Duration>,
    publish: Option<BoxPublishService>,
    closed: AtomicBool,
    pools: Mutex<Vec<std::sync::Weak<Pool>>>,
}

/// The domain-event bus. Cheap to clone; clones share the transport and subscriptions.
#[derive(Clone)]
pub struct DomainBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for DomainBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainBus")
            .field("backend", &self.capabilities().backend)
            .field("source", &self.inner.source)
            .field("codec", &self.inner.codec)
            .finish_non_exhaustive()
    }
}

impl DomainBus {
    /// A builder over `transport`.
    pub fn builder(transport: impl DomainTransport) -> DomainBusBuilder {
        DomainBusBuilder::new(transport)
    }

    /// What the backend offers.
    pub fn capabilities(&self) -> &Capabilities {
        self.inner.transport.capabilities()
    }

    /// The service name (default source and group).
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The underlying transport (for tools and tests that work below the bus).
    pub fn transport(&self) -> &DynDomainTransport {
        &self.inner.transport
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("domain bus"))
        } else {
            Ok(())
        }
    }

    fn encode(&self, topic: &str, envelope: &Envelope) -> Result<OutboundMessage> {
        validate_topic(topic)?;
        let caps = self.capabilities();
        let message = self
            .inner
            .codec
            .encode(envelope, caps.header_style, &self.inner.source)?;
        if self.inner.codec.is_jxt() && !crate::codec::jxt_compatible_id(&envelope.aggregate_id) {
            tracing::warn!(
                aggregate_id = %envelope.aggregate_id,
                "aggregate id outside jxt-core's [A-Za-z0-9:_./-]{{1,256}}: jxt-core consumers will reject it"
            );
        }
        Ok(message)
    }

    /// Encodes, runs the publish hooks and checks the size: everything before the broker.
    fn prepare(
        &self,
        topic: &str,
        envelope: &Envelope,
        write: Write,
    ) -> Result<(
        OutboundMessage,
        Vec<Box<dyn crate::middleware::PublishScope>>,
    )> {
        let mut message = self.encode(topic, envelope)?;
        let caps = self.capabilities();
        let info = PublishInfo {
            bus: BusKind::Domain,
            backend: caps.backend,
            topic,
            key: Some(&envelope.aggregate_id),
            event_type: Some(&envelope.event_type),
            payload_len: message.payload.len(),
        };
        let scopes = publish_scopes(&self.inner.hooks, &info, &mut message.headers);
        if !scopes.is_empty() {
            message.headers.validate()?;
        }
        caps.check_size(&message, write)?;
        Ok((message, scopes))
    }

    /// Publishes one event to `topic`; resolves when the broker accepted it.
    ///
    /// Errors: [`Error::InvalidTopic`], [`Error::InvalidEnvelope`], [`Error::PayloadTooLarge`]
    /// and [`Error::Closed`] before anything is sent; the backend's errors after.
    pub async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<Receipt> {
        self.check_open()?;
        let (message, scopes) = self.prepare(topic, envelope, Write::Publish)?;
        let result = match &self.inner.publish {
            None => self.inner.transport.publish(topic, message).await,
            Some(publish) => {
                let req = PublishRequest {
                    topic: Arc::from(topic),
                    message,
                };
                crate::handler::call_once(publish, req).await
            }
        };
        finish_publish(scopes, result.as_ref());
        result
    }

    /// Publishes many events, pipelined where the backend can, keeping each aggregate's
    /// events in the given order. Every envelope is validated before anything is sent.
    ///
    /// One result per envelope. If one fails, later events of the same aggregate in the
    /// batch may still have been stored: republish an aggregate's events from its first
    /// failure (backends with [`Capabilities::dedup`] drop the copies).
    ///
    /// Hooks run for every envelope; publish layers wrap single publishes only (the batch
    /// goes to the transport's pipelined batch publish as a whole).
    pub async fn publish_batch(
        &self,
        topic: &str,
        envelopes: &[Envelope],
    ) -> Result<Vec<Result<Receipt>>> {
        self.check_open()?;
        let mut messages = Vec::with_capacity(envelopes.len());
        let mut scopes = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let (message, s) = self.prepare(topic, envelope, Write::Publish)?;
            scopes.push(s);
            messages.push(message);
        }
        let results = self.inner.transport.publish_batch(topic, messages).await;
        for (s, r) in scopes.into_iter().zip(&results) {
            finish_publish(s, r.as_ref());
        }
        Ok(results)
    }

    /// Appends `envelope` to its aggregate's history only if the aggregate is at
    /// `expected_version` (0: no event yet): optimistic concurrency for event sourcing.
    ///
    /// The envelope must carry `expected_version + 1`. The check and the publish are atomic
    /// on the broker: of two appends racing on one version, one succeeds and the other gets
    /// [`Error::Conflict`] naming the aggregate and its current version. Needs
    /// [`Capabilities::expected_version`].
    pub async fn append(
        &self,
        topic: &str,
        envelope: &Envelope,
        expected_version: u64,
    ) -> Result<Receipt> {
        self.check_open()?;
        let caps = self.capabilities();
        if !caps.expected_version {
            return Err(Error::NotSupported {
                operation: "append with an expected version",
                backend: caps.backend,
            });
        }
        if envelope.event_version != expected_version + 1 {
            return Err(crate::envelope::EnvelopeError::Header {
                name: "event_version".to_owned(),
                reason: "an append must carry the expected version + 1",
            }
            .into());
        }
        let (message, scopes) = self.prepare(topic, envelope, Write::Append)?;
        let last = self
            .inner
            .transport
            .last_for_key(topic, &envelope.aggregate_id)
            .await?;
        let (current, position) = match &last {
            None => (0, None),
            Some(m) => (Codec::decode(m)?.event_version, Some(m.position)),
        };
        if current != expected_version {
            return Err(Error::Conflict(format!(
                "aggregate {:?} is at version {current}, not {expected_version}",
                envelope.aggregate_id
            )));
        }
        let result = self
            .inner
            .transport
            .publish_if_last(topic, message, position)
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::Conflict(format!(
                    "aggregate {:?} moved past version {expected_version} while appending",
                    envelope.aggregate_id
                )),
                other => other,
            });
        finish_publish(scopes, result.as_ref());
        result
    }

    /// Starts a subscription to `topic`; see [`DomainSubscribeBuilder`].
    pub fn subscribe(&self, topic: &str) -> DomainSubscribeBuilder {
        DomainSubscribeBuilder {
            bus: self.clone(),
            topic: topic.to_owned(),
            group: None,
            pool: None,
            retry: None,
            start: StartPosition::Earliest,
            observer: None,
        }
    }

    /// Every stored event of one aggregate on `topic`, in order (event sourcing replay).
    ///
    /// Needs [`Capabilities::replay`]. A stored message that cannot be decoded is an error
    /// naming its position.
    pub async fn replay(&self, topic: &str, aggregate_id: &str) -> Result<Vec<Envelope>> {
        self.check_open()?;
        validate_topic(topic)?;
        if aggregate_id.trim().is_empty() {
            return Err(crate::envelope::EnvelopeError::Blank {
                field: "aggregate_id",
            }
            .into());
        }
        let raw = self.inner.transport.replay(topic, aggregate_id).await?;
        raw.iter()
            .map(|m| Codec::decode(m).map_err(Error::from))
            .collect()
    }

    /// Shuts down every subscription of this bus (graceful drain), then closes the
    /// transport. Idempotent and safe to call concurrently; afterwards every operation
    /// returns [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let pools: Vec<Arc<Pool>> = self
            .inner
            .pools
            .lock()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for pool in pools {
            pool.shutdown(self.inner.pool.drain_deadline).await;
        }
        self.inner.transport.close().await
    }

    /// Whether [`DomainBus::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

/// Options of one domain subscription.
#[must_use]
pub struct DomainSubscribeBuilder {
    bus: DomainBus,
    topic: String,
    group: Option<String>,
    pool: Option<PoolConfig>,
    retry: Option<Backoff>,
    start: StartPosition,
    observer: Option<Arc<dyn PoolObserver>>,
}

impl fmt::Debug for DomainSubscribeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainSubscribeBuilder")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl DomainSubscribeBuilder {
    /// The consumer group; default: the bus's default group (its source, the service name,
    /// unless set), so replicas of one service share the topic's partitions.
    ///
    /// A group name follows the rule of topic names (`[A-Za-z0-9_-]` tokens separated by
    /// single dots, at most 200 bytes; see [`validate_group`](crate::validate_group)):
    /// [`start`](Self::start) refuses any other with [`Error::Config`] naming `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Pool limits for this subscription.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Retry policy for this subscription.
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Where a new group starts (default: the earliest stored event).
    pub fn start_position(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Receives the pool's events (metrics, audits, the conformance order checker).
    pub fn observer(mut self, observer: Arc<dyn PoolObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Opens the subscription and starts handling with `handler`.
    ///
    /// The handler runs inside the bus's layers: hooks (outermost), the handler timeout and
    /// the added handler layers; the pool catches panics around the whole stack (a panic is a
    /// permanent failure).
    pub async fn start<H>(self, handler: H) -> Result<Subscription>
    where
        H: Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
        H::Future: Send + 'static,
    {
        let bus = self.bus;
        bus.check_open()?;
        validate_topic(&self.topic)?;
        // Checked here, once for every backend; the default group was checked at build.
        let group = match self.group {
            Some(g) => {
                validate_group("group", &g)?;
                g
            }
            None => bus.inner.default_group.clone(),
        };
        let pool = self.pool.unwrap_or_else(|| bus.inner.pool.clone());
        pool.validate()?;
        let retry = self.retry.unwrap_or_else(|| bus.inner.retry.clone());
        retry.validate()?;
        let dlq = dead_letter_topic(&self.topic, &bus.inner.dead_letter.suffix);
        validate_topic(&dlq)?;

        let mut svc = BoxEventHandler::new(handler);
        for layer in &bus.inner.handler_layers {
            svc = layer(svc);
        }
        if let Some(t) = bus.inner.handler_timeout {
            svc = BoxEventHandler::new(tower::Layer::layer(&TimeoutLayer::new(t), svc));
        }
        if !bus.inner.hooks.is_empty() {
            svc = BoxEventHandler::new(tower::Layer::layer(
                &HookLayer::new(bus.inner.hooks.iter().cloned()),
                svc,
            ));
        }

        let spec = SubscriptionSpec::new(self.topic.clone(), group.clone()).starting_at(self.start);
        let subscription = bus.inner.transport.subscribe(spec).await?;
        let ack_deadline = bus.capabilities().ack_deadline;
        let drain_deadline = pool.drain_deadline;
        let pool = Arc::new(Pool::start(
            PoolParams {
                topic: Arc::from(self.topic.as_str()),
                dead_letter_topic: dlq,
                handler: svc,
                transport: bus.inner.transport.clone(),
                config: pool,
                retry,
                observer: self.observer,
            },
            subscription,
            ack_deadline,
        ));
        {
            let mut pools = bus.inner.pools.lock();
            pools.retain(|w| w.strong_count() > 0);
            pools.push(Arc::downgrade(&pool));
        }
        Ok(Subscription {
            pool,
            topic: self.topic,
            group,
            drain_deadline,
        })
    }
}

/// A running domain subscription. Dropping it stops at once (unacknowledged work is
/// redelivered); [`Subscription::shutdown`] drains first.
#[derive(Debug)]
pub struct Subscription {
    pool: Arc<Pool>,
    topic: String,
    group: String,
    drain_deadline: Duration,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The durable group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The pool's counters now.
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Consumer groups: the partitions this member knows of, with their state and ownership
    /// epoch (empty without groups).
    pub fn partitions(&self) -> Vec<(u32, crate::pool::PartitionState, u64)> {
        self.pool.partitions()
    }

    /// The partitions this member owns and consumes now.
    pub fn active_partitions(&self) -> Vec<u32> {
        self.pool
            .partitions()
            .into_iter()
            .filter(|(_, s, _)| *s == crate::pool::PartitionState::Active)
            .map(|(p, _, _)| p)
            .collect()
    }

    /// Whether the transport ended the stream and all held work finished.
    pub fn is_finished(&self) -> bool {
        self.pool.is_finished()
    }

    /// Stops pulling, finishes buffered work within the pool's drain deadline, and reports.
    pub async fn shutdown(self) -> ShutdownReport {
        self.pool.shutdown(self.drain_deadline).await
    }

    /// Same with an explicit deadline.
    pub async fn shutdown_within(self, deadline: Duration) -> ShutdownReport {
        self.pool.shutdown(deadline).await
    }

    /// Stops at once, as dropping the subscription does (nothing is drained, nothing more
    /// is acknowledged; the broker redelivers what was not), and resolves once none of its
    /// handlers can run any more. A handler in the middle of a poll on another thread
    /// finishes that poll first: this is the point after which the subscription has
    /// certainly stopped.
    pub async fn abort(self) {
        self.pool.abort().await;
    }
}
