//! Domain subscriptions: the options, the handler stack, the keyed pool started on the
//! transport's subscription, and the running [`Subscription`].

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tower::Service;

use crate::error::{Error, HandleError, Result};
use crate::handler::{BoxEventHandler, Event};
use crate::middleware::{BusKind, TimeoutLayer};
use crate::pipeline::HandlerContext;
use crate::pool::{
    KeyQueues, PartitionState, Pool, PoolConfig, PoolObserver, PoolParams, PoolStats,
    ShutdownReport,
};
use crate::retry::Backoff;
use crate::topic::{Topic, validate_group};
use crate::transport::{DomainTransport, DynDomainTransport, StartPosition, SubscriptionSpec};

use super::DomainBus;

/// Options of one domain subscription.
#[must_use]
pub struct DomainSubscribeBuilder {
    pub(super) bus: DomainBus,
    pub(super) topic: std::result::Result<Topic, Error>,
    pub(super) group: Option<String>,
    pub(super) pool: Option<PoolConfig>,
    pub(super) retry: Option<Backoff>,
    pub(super) start: StartPosition,
    pub(super) observer: Option<Arc<dyn PoolObserver>>,
    pub(super) standby: bool,
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
    /// [`start`](Self::start) refuses any other with [`Error::Config`](crate::Error::Config) naming `group`.
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

    /// On a backend with one active subscriber per group (JetStream until partitioned
    /// groups), whether this subscriber waits as a standby when another is active and takes
    /// over when that one stops or dies (`true`, the default), or fails at once with
    /// [`Error::Conflict`](crate::Error::Conflict) (`false`). Backends with partitioned
    /// groups share the partitions instead and ignore it.
    pub fn standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// Receives the pool's events (metrics, audits, the conformance order checker).
    pub fn observer(mut self, observer: Arc<dyn PoolObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Opens the subscription and starts handling with `handler`.
    ///
    /// The handler runs inside the bus's handler layers (hooks among them; the first added
    /// outermost), with the handler timeout directly around it; the pool catches panics
    /// around the whole stack (a panic is a permanent failure). Its dead letters go through
    /// the bus's publish pipeline.
    pub async fn start<H>(self, handler: H) -> Result<Subscription>
    where
        H: Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
        H::Future: Send + 'static,
    {
        let bus = self.bus;
        bus.check_open()?;
        let topic = self.topic?;
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
        pool.check_unacked_limit(bus.capabilities())?;
        let retry = self.retry.unwrap_or_else(|| bus.inner.retry.clone());
        retry.validate()?;
        let dlq = topic.dead_letter(&bus.inner.dead_letter.suffix)?;

        let mut svc = BoxEventHandler::new(handler);
        if let Some(t) = bus.inner.handler_timeout {
            svc = BoxEventHandler::new(tower::Layer::layer(&TimeoutLayer::new(t), svc));
        }
        let handle = SubscriptionHandle {
            inner: Arc::new(HandleInner {
                pool: OnceLock::new(),
                counts: OnceLock::new(),
                topic: topic.clone(),
                group: group.clone(),
                transport: bus.inner.transport.clone(),
            }),
        };
        let cx = HandlerContext {
            bus: BusKind::Domain,
            backend: bus.capabilities().backend,
            topic: &topic,
            group: Some(&group),
            max_attempts: retry.attempts,
            subscription: Some(&handle),
        };
        let svc = bus
            .inner
            .handler_layers
            .apply(svc, |layer, inner| layer.layer_handler_in(inner, &cx));

        let spec = SubscriptionSpec::new(topic.clone(), group.clone())
            .starting_at(self.start)
            .standby(self.standby);
        let subscription = bus.inner.transport.subscribe(spec).await?;
        let ack_deadline = bus.capabilities().ack_deadline;
        let drain_deadline = pool.drain_deadline;
        let pool = Arc::new(Pool::start(
            PoolParams {
                topic: topic.clone(),
                dead_letter_topic: dlq,
                handler: svc,
                pipeline: bus.inner.pipeline.clone(),
                config: pool,
                retry,
                observer: self.observer,
            },
            subscription,
            ack_deadline,
        ));
        // Set once, here, before anyone but the layers holds the handle.
        let _ = handle.inner.pool.set(Arc::downgrade(&pool));
        let _ = handle.inner.counts.set(pool.last_counts());
        {
            let mut pools = bus.inner.pools.lock();
            pools.retain(|w| w.strong_count() > 0);
            pools.push(Arc::downgrade(&pool));
        }
        Ok(Subscription {
            pool,
            topic,
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
    topic: Topic,
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

/// A running domain subscription as layers and reporters see it (metrics of its pool, its
/// partitions and its lag). Cheap to clone; it does not keep the subscription alive: once
/// the subscription is dropped, [`key_queues`](Self::key_queues) and
/// [`partitions`](Self::partitions) answer `None` and [`stats`](Self::stats) its last
/// counts.
#[derive(Clone)]
pub struct SubscriptionHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    pool: OnceLock<Weak<Pool>>,
    counts: OnceLock<crate::pool::LastCounts>,
    topic: Topic,
    group: String,
    transport: DynDomainTransport,
}

impl fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("topic", &self.inner.topic)
            .field("group", &self.inner.group)
            .field("running", &self.is_running())
            .finish()
    }
}

impl SubscriptionHandle {
    fn pool(&self) -> Option<Arc<Pool>> {
        self.inner.pool.get().and_then(Weak::upgrade)
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.inner.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.inner.transport.capabilities().backend
    }

    /// Whether the subscription still runs: started, not dropped, not finished.
    pub fn is_running(&self) -> bool {
        self.pool().is_some_and(|p| !p.is_finished())
    }

    /// The pool's counters now; once the subscription is gone, its last counts (with
    /// nothing held). `None` only before it started.
    pub fn stats(&self) -> Option<PoolStats> {
        match self.pool() {
            Some(p) => Some(p.stats()),
            None => self.inner.counts.get().map(|c| c.stats()),
        }
    }

    /// The per-aggregate queues now, while the subscription exists. Walks every aggregate
    /// with work: for periodic reports, not per message.
    pub fn key_queues(&self) -> Option<KeyQueues> {
        self.pool().map(|p| p.key_queues())
    }

    /// The partitions this member knows of, with their state and epoch, while the
    /// subscription exists (empty without consumer groups).
    pub fn partitions(&self) -> Option<Vec<(u32, PartitionState, u64)>> {
        self.pool().map(|p| p.partitions())
    }

    /// The group's backlog on the topic: messages not yet acknowledged (unread plus
    /// delivered-unacked), if the backend can tell
    /// ([`DomainTransport::pending`](crate::DomainTransport::pending)). Asks the broker.
    pub async fn pending(&self) -> Result<Option<u64>> {
        self.inner
            .transport
            .pending(&self.inner.topic, &self.inner.group)
            .await
    }
}
