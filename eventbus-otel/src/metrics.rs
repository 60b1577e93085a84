//! The metrics layer: the messaging conventions' client and process metrics on every write
//! and handler attempt, and the keyed pool's gauges and consumer lag of every domain
//! subscription.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use dualbus_core::{
    BoxPublishService, Error, Event, HandleError, HandlerContext, HandlerLayer, Message,
    PartitionState, PublishLayer, PublishRequest, PublishResponse, SubscriptionHandle,
};
use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, MeterProvider, ObservableCounter, ObservableGauge,
};
use opentelemetry_semantic_conventions::metric::{
    MESSAGING_CLIENT_CONSUMED_MESSAGES, MESSAGING_CLIENT_OPERATION_DURATION,
    MESSAGING_CLIENT_SENT_MESSAGES, MESSAGING_PROCESS_DURATION,
};
use parking_lot::{Mutex, RwLock};
use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::attrs::{self, *};
use crate::config::OtelConfig;
use crate::trace::{Handled, outcome_of};

/// Names of this crate's own metrics (the conventions' are in
/// `opentelemetry_semantic_conventions::metric`).
pub mod names {
    /// Deliveries a subscription's pool holds whole (queued or running).
    pub const POOL_IN_FLIGHT: &str = "dualbus.pool.in_flight";
    /// Deferred deliveries a pool holds (of aggregates over `max_per_key`).
    pub const POOL_DEFERRED: &str = "dualbus.pool.deferred";
    /// Aggregates with queued or running work.
    pub const POOL_KEYS: &str = "dualbus.pool.keys";
    /// The longest per-aggregate queue: deliveries waiting behind the running one.
    pub const POOL_KEY_QUEUE_DEPTH: &str = "dualbus.pool.key_queue.depth";
    /// Partitions this member owns (assigned, rewinding, active or draining).
    pub const PARTITIONS_OWNED: &str = "dualbus.consumer.partitions.owned";
    /// Partition handovers of this member, by `dualbus.handover` (`acquired`, `released`,
    /// `lost`).
    pub const HANDOVERS: &str = "dualbus.consumer.handovers";
    /// Messages of the topic the group has not acknowledged (unread plus unacknowledged),
    /// as the broker tells.
    pub const LAG: &str = "dualbus.consumer.lag";
}

/// The attribute of [`names::HANDOVERS`].
pub const DUALBUS_HANDOVER: &str = "dualbus.handover";

/// Metrics after the OpenTelemetry messaging conventions, and the keyed pool's own.
///
/// On every write: `messaging.client.sent.messages` (per message) and
/// `messaging.client.operation.duration` (per write, operation `send`). On every handler
/// attempt: `messaging.client.consumed.messages` (per delivery, counted at its first
/// attempt) and `messaging.process.duration` (per attempt, with `error.type` and
/// `dualbus.outcome`). For every domain subscription, observed when metrics are
/// collected: the pool's in-flight and deferred deliveries, its busy aggregates and
/// deepest per-aggregate queue, the partitions owned and handed over, and the consumer
/// lag, which is asked of the broker every `lag_interval`. Names, units and attributes:
/// `docs/observability.md`.
#[derive(Clone)]
pub struct MetricsLayer {
    inner: Arc<Metrics>,
}

struct Metrics {
    sent: Counter<u64>,
    operation_duration: Histogram<f64>,
    consumed: Counter<u64>,
    process_duration: Histogram<f64>,
    watched: Arc<Mutex<Watchlist>>,
    lag_interval: Duration,
    /// By backend, then by topic.
    publish_attrs: RwLock<HashMap<&'static str, HashMap<String, Arc<PublishAttrs>>>>,
    _observers: Observers,
}

/// The observable instruments, kept with the layer.
#[allow(dead_code)]
struct Observers {
    in_flight: ObservableGauge<u64>,
    deferred: ObservableGauge<u64>,
    keys: ObservableGauge<u64>,
    depth: ObservableGauge<u64>,
    owned: ObservableGauge<u64>,
    handovers: ObservableCounter<u64>,
    lag: ObservableGauge<u64>,
}

/// A domain subscription whose gauges are reported.
struct Watched {
    handle: SubscriptionHandle,
    attrs: Arc<[KeyValue]>,
    /// The last lag the broker told; -1 until then (or when it cannot tell).
    lag: Arc<AtomicI64>,
}

/// The subscriptions being reported, and the handovers of those that ended (a counter
/// must not go down when a member stops).
#[derive(Default)]
struct Watchlist {
    running: Vec<Watched>,
    ended: Vec<(Arc<[KeyValue]>, [u64; 3])>,
}

/// Adds `counts` to the series `attrs` of `totals` (appending the series if new).
fn add_counts(
    totals: &mut Vec<(Arc<[KeyValue]>, [u64; 3])>,
    attrs: &Arc<[KeyValue]>,
    counts: [u64; 3],
) {
    match totals.iter_mut().find(|(a, _)| **a == **attrs) {
        Some((_, total)) => {
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        None => totals.push((attrs.clone(), counts)),
    }
}

fn handovers_of(s: &Watched) -> Option<[u64; 3]> {
    s.handle.stats().map(|st| {
        [
            st.partitions_acquired,
            st.partitions_released,
            st.partitions_lost,
        ]
    })
}

impl Watchlist {
    /// Moves the subscriptions that stopped out of the list, keeping their handovers.
    fn prune(&mut self) {
        let Self { running, ended } = self;
        running.retain(|s| {
            if s.handle.is_running() {
                return true;
            }
            if let Some(counts) = handovers_of(s) {
                add_counts(ended, &s.attrs, counts);
            }
            false
        });
    }

    /// `read` of every running subscription, combined per series: members of one group in
    /// one process share their attributes, so their values add up (`sum`) or the largest
    /// stands for them (`max`).
    fn series(
        &self,
        read: impl Fn(&Watched) -> Option<u64>,
        sum: bool,
    ) -> Vec<(Arc<[KeyValue]>, u64)> {
        let mut out: Vec<(Arc<[KeyValue]>, u64)> = Vec::new();
        for s in &self.running {
            let Some(v) = read(s) else { continue };
            match out.iter_mut().find(|(a, _)| **a == *s.attrs) {
                Some((_, t)) if sum => *t += v,
                Some((_, t)) => *t = (*t).max(v),
                None => out.push((s.attrs.clone(), v)),
            }
        }
        out
    }
}

impl fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsLayer")
            .field("subscriptions", &self.inner.watched.lock().running.len())
            .field("lag_interval", &self.inner.lag_interval)
            .finish_non_exhaustive()
    }
}

impl Default for MetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// The attribute sets of writes to one topic.
struct PublishAttrs {
    sent: Vec<KeyValue>,
    duration: Vec<KeyValue>,
}

/// At most this many topics keep their attribute sets cached.
const CACHED_TOPICS: usize = 1024;

impl MetricsLayer {
    /// A layer on the global meter provider, with the default lag interval (10 s).
    pub fn new() -> Self {
        Self::with_meter(
            opentelemetry::global::meter_with_scope(crate::trace::scope()),
            &OtelConfig::default(),
        )
    }

    /// A layer on the global meter provider, with the lag interval of `config`.
    pub fn from_config(config: &OtelConfig) -> Self {
        Self::with_meter(
            opentelemetry::global::meter_with_scope(crate::trace::scope()),
            config,
        )
    }

    /// A layer on `provider` (e.g. an SDK provider with an in-memory exporter in tests).
    pub fn with_provider<P: MeterProvider>(provider: &P, config: &OtelConfig) -> Self {
        Self::with_meter(provider.meter_with_scope(crate::trace::scope()), config)
    }

    fn with_meter(meter: Meter, config: &OtelConfig) -> Self {
        let watched: Arc<Mutex<Watchlist>> = Arc::default();
        let gauge = |name: &'static str,
                     unit: &'static str,
                     description: &'static str,
                     read: fn(&Watched) -> Option<u64>,
                     sum: bool| {
            let w = watched.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |o| {
                    let mut list = w.lock();
                    list.prune();
                    for (attrs, v) in list.series(read, sum) {
                        o.observe(v, &attrs);
                    }
                })
                .build()
        };
        let in_flight = gauge(
            names::POOL_IN_FLIGHT,
            "{message}",
            "Deliveries the keyed pool holds whole (queued or running)",
            |s| s.handle.stats().map(|st| st.in_flight),
            true,
        );
        let deferred = gauge(
            names::POOL_DEFERRED,
            "{message}",
            "Deferred deliveries of aggregates over max_per_key",
            |s| s.handle.stats().map(|st| st.deferred),
            true,
        );
        let keys = gauge(
            names::POOL_KEYS,
            "{aggregate}",
            "Aggregates with queued or running work",
            |s| s.handle.key_queues().map(|k| k.keys as u64),
            true,
        );
        let depth = gauge(
            names::POOL_KEY_QUEUE_DEPTH,
            "{message}",
            "The longest per-aggregate queue: deliveries waiting behind the running one",
            |s| s.handle.key_queues().map(|k| k.deepest as u64),
            false,
        );
        let owned = gauge(
            names::PARTITIONS_OWNED,
            "{partition}",
            "Partitions this member owns",
            |s| {
                s.handle.partitions().map(|ps| {
                    ps.iter()
                        .filter(|(_, st, _)| {
                            matches!(
                                st,
                                PartitionState::Assigned
                                    | PartitionState::Rewinding
                                    | PartitionState::Active
                                    | PartitionState::Draining
                            )
                        })
                        .count() as u64
                })
            },
            true,
        );
        let lag = gauge(
            names::LAG,
            "{message}",
            "Messages of the topic the group has not acknowledged, as the broker tells",
            |s| u64::try_from(s.lag.load(Ordering::Relaxed)).ok(),
            false,
        );
        let w = watched.clone();
        let handovers = meter
            .u64_observable_counter(names::HANDOVERS)
            .with_unit("{handover}")
            .with_description("Partitions this member acquired, released after a drain, or lost")
            .with_callback(move |o| {
                let mut list = w.lock();
                list.prune();
                // Per series: the running members' counts and those of ended ones.
                let mut totals = list.ended.clone();
                for s in &list.running {
                    if let Some(counts) = handovers_of(s) {
                        add_counts(&mut totals, &s.attrs, counts);
                    }
                }
                for (series, counts) in totals {
                    for (what, n) in ["acquired", "released", "lost"].into_iter().zip(counts) {
                        let mut a = series.to_vec();
                        a.push(attrs::s(DUALBUS_HANDOVER, what));
                        o.observe(n, &a);
                    }
                }
            })
            .build();
        Self {
            inner: Arc::new(Metrics {
                sent: meter
                    .u64_counter(MESSAGING_CLIENT_SENT_MESSAGES)
                    .with_unit("{message}")
                    .with_description("Messages a producer attempted to send")
                    .build(),
                operation_duration: meter
                    .f64_histogram(MESSAGING_CLIENT_OPERATION_DURATION)
                    .with_unit("s")
                    .with_description("Duration of send operations")
                    .with_boundaries(DURATION_BOUNDARIES.to_vec())
                    .build(),
                consumed: meter
                    .u64_counter(MESSAGING_CLIENT_CONSUMED_MESSAGES)
                    .with_unit("{message}")
                    .with_description("Messages delivered to a consumer")
                    .build(),
                process_duration: meter
                    .f64_histogram(MESSAGING_PROCESS_DURATION)
                    .with_unit("s")
                    .with_description("Duration of handler attempts")
                    .with_boundaries(DURATION_BOUNDARIES.to_vec())
                    .build(),
                watched,
                lag_interval: config.lag_interval,
                publish_attrs: RwLock::default(),
                _observers: Observers {
                    in_flight,
                    deferred,
                    keys,
                    depth,
                    owned,
                    handovers,
                    lag,
                },
            }),
        }
    }
}

/// The conventions' advice for messaging durations, in seconds.
const DURATION_BOUNDARIES: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

impl Metrics {
    fn publish_attrs(&self, backend: &'static str, topic: &str) -> Arc<PublishAttrs> {
        if let Some(a) = self
            .publish_attrs
            .read()
            .get(backend)
            .and_then(|topics| topics.get(topic))
        {
            return a.clone();
        }
        let sent = vec![
            attrs::s(MESSAGING_SYSTEM, attrs::system(backend)),
            attrs::s(MESSAGING_OPERATION_NAME, "send"),
            attrs::shared(MESSAGING_DESTINATION_NAME, topic),
        ];
        let mut duration = sent.clone();
        duration.push(attrs::s(MESSAGING_OPERATION_TYPE, "send"));
        let a = Arc::new(PublishAttrs { sent, duration });
        let mut map = self.publish_attrs.write();
        let topics = map.entry(backend).or_default();
        if topics.len() < CACHED_TOPICS {
            topics.insert(topic.to_owned(), a.clone());
        }
        a
    }

    fn record_publish(
        &self,
        a: &PublishAttrs,
        len: usize,
        elapsed: f64,
        result: &Result<PublishResponse, Error>,
    ) {
        let with_error = |base: &[KeyValue], e: &Error| {
            let mut v = base.to_vec();
            v.push(attrs::s(ERROR_TYPE, crate::error_type(e)));
            v
        };
        match result {
            Ok(r) => {
                let mut ok = 0u64;
                for i in 0..len {
                    match r.result(i) {
                        Some(Ok(_)) => ok += 1,
                        Some(Err(e)) => self.sent.add(1, &with_error(&a.sent, e)),
                        None => {}
                    }
                }
                if ok > 0 {
                    self.sent.add(ok, &a.sent);
                }
                self.operation_duration.record(elapsed, &a.duration);
            }
            Err(e) => {
                self.sent.add(len as u64, &with_error(&a.sent, e));
                self.operation_duration
                    .record(elapsed, &with_error(&a.duration, e));
            }
        }
    }

    /// Starts reporting `handle`'s gauges, and polls its lag while it runs.
    fn watch(&self, handle: &SubscriptionHandle, attrs: Arc<[KeyValue]>) {
        let lag = Arc::new(AtomicI64::new(-1));
        self.watched.lock().running.push(Watched {
            handle: handle.clone(),
            attrs,
            lag: lag.clone(),
        });
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime: consumer lag is not polled");
            return;
        };
        let handle = handle.clone();
        let every = self.lag_interval;
        rt.spawn(async move {
            loop {
                match handle.pending().await {
                    Ok(Some(n)) => lag.store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed),
                    // The backend cannot tell: nothing to poll.
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(topic = %handle.topic(), group = handle.group(), error = %e, "consumer lag unknown for now");
                        lag.store(-1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(every).await;
                if !handle.is_running() {
                    return;
                }
            }
        });
    }
}

/// The service a [`MetricsLayer`] puts around a publish pipeline or a handler.
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    handler: Option<Arc<HandlerAttrs>>,
}

impl<S> fmt::Debug for MetricsService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsService").finish_non_exhaustive()
    }
}

impl<S> Service<PublishRequest> for MetricsService<S>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = PublishResponse;
    type Error = Error;
    type Future = BoxFuture<'static, Result<PublishResponse, Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let a = self.metrics.publish_attrs(req.backend, req.topic.as_str());
        let len = req.len();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            metrics.record_publish(&a, len, start.elapsed().as_secs_f64(), &result);
            result
        })
    }
}

/// The attribute sets of one subscription's handler metrics, built once.
struct HandlerAttrs {
    consumed: Vec<KeyValue>,
    ok: Vec<KeyValue>,
    max_attempts: u32,
}

impl HandlerAttrs {
    fn new(cx: &HandlerContext<'_>) -> Self {
        let mut consumed = vec![
            attrs::s(MESSAGING_SYSTEM, attrs::system(cx.backend)),
            attrs::s(MESSAGING_OPERATION_NAME, "process"),
            attrs::shared(MESSAGING_DESTINATION_NAME, cx.topic.as_str()),
        ];
        if let Some(g) = cx.group {
            consumed.push(attrs::shared(MESSAGING_CONSUMER_GROUP_NAME, g));
        }
        let mut ok = consumed.clone();
        ok.push(attrs::s(DUALBUS_OUTCOME, "ok"));
        Self {
            consumed,
            ok,
            max_attempts: cx.max_attempts,
        }
    }

    fn bare(topic: &str) -> Self {
        let consumed = vec![
            attrs::s(MESSAGING_OPERATION_NAME, "process"),
            attrs::owned(MESSAGING_DESTINATION_NAME, topic),
        ];
        let mut ok = consumed.clone();
        ok.push(attrs::s(DUALBUS_OUTCOME, "ok"));
        Self {
            consumed,
            ok,
            max_attempts: 1,
        }
    }

    fn record(
        &self,
        m: &Metrics,
        elapsed: f64,
        result: &Result<(), HandleError>,
        outcome: &'static str,
    ) {
        match result {
            Ok(()) => m.process_duration.record(elapsed, &self.ok),
            Err(e) => {
                let mut a = self.consumed.clone();
                a.push(attrs::s(DUALBUS_OUTCOME, outcome));
                a.push(attrs::s(ERROR_TYPE, crate::handle_error_type(e)));
                m.process_duration.record(elapsed, &a);
            }
        }
    }
}

impl<S, R> Service<R> for MetricsService<S>
where
    S: Service<R, Response = (), Error = HandleError>,
    S::Future: Send + 'static,
    R: Handled,
{
    type Response = ();
    type Error = HandleError;
    type Future = BoxFuture<'static, Result<(), HandleError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), HandleError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let a = self
            .handler
            .clone()
            .unwrap_or_else(|| Arc::new(HandlerAttrs::bare(req.topic())));
        let (simple, attempt) = (req.simple(), req.attempt());
        // A delivery is consumed once, at its first attempt.
        if attempt == 1 {
            self.metrics.consumed.add(1, &a.consumed);
        }
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let outcome = outcome_of(simple, &result, attempt, a.max_attempts);
            a.record(&metrics, start.elapsed().as_secs_f64(), &result, outcome);
            result
        })
    }
}

impl PublishLayer for MetricsLayer {
    fn layer_publish(&self, inner: BoxPublishService) -> BoxPublishService {
        BoxPublishService::new(MetricsService {
            inner,
            metrics: self.inner.clone(),
            handler: None,
        })
    }
}

impl MetricsLayer {
    fn service<R>(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
        handler: Option<Arc<HandlerAttrs>>,
    ) -> MetricsService<BoxCloneSyncService<R, (), HandleError>> {
        MetricsService {
            inner,
            metrics: self.inner.clone(),
            handler,
        }
    }
}

impl HandlerLayer<Event> for MetricsLayer {
    fn layer_handler(
        &self,
        inner: BoxCloneSyncService<Event, (), HandleError>,
    ) -> BoxCloneSyncService<Event, (), HandleError> {
        BoxCloneSyncService::new(self.service(inner, None))
    }

    fn layer_handler_in(
        &self,
        inner: BoxCloneSyncService<Event, (), HandleError>,
        cx: &HandlerContext<'_>,
    ) -> BoxCloneSyncService<Event, (), HandleError> {
        let a = HandlerAttrs::new(cx);
        if let Some(handle) = cx.subscription {
            self.inner.watch(
                handle,
                a.consumed
                    .iter()
                    .filter(|kv| kv.key.as_str() != MESSAGING_OPERATION_NAME)
                    .cloned()
                    .collect(),
            );
        }
        BoxCloneSyncService::new(self.service(inner, Some(Arc::new(a))))
    }
}

impl HandlerLayer<Message> for MetricsLayer {
    fn layer_handler(
        &self,
        inner: BoxCloneSyncService<Message, (), HandleError>,
    ) -> BoxCloneSyncService<Message, (), HandleError> {
        BoxCloneSyncService::new(self.service(inner, None))
    }

    fn layer_handler_in(
        &self,
        inner: BoxCloneSyncService<Message, (), HandleError>,
        cx: &HandlerContext<'_>,
    ) -> BoxCloneSyncService<Message, (), HandleError> {
        BoxCloneSyncService::new(self.service(inner, Some(Arc::new(HandlerAttrs::new(cx)))))
    }
}
