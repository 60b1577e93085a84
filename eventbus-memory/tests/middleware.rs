//! Layers and hooks on real buses: timeout, publish retry, hooks on both buses, panics.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Test code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::PublishKind;
use dualbus_core::conformance::pipeline::Tag;
use dualbus_core::middleware::{
    HandleInfo, HandleScope, Hook, PublishInfo, PublishRetryLayer, PublishScope, TimeoutLayer,
};
use dualbus_core::{
    Backoff, DomainBus, DomainCapabilities, DomainSubscription, DomainTransport, Envelope, Error,
    ErrorKind, Event, HandleError, Headers, Message, OutboundMessage, PoolConfig, PoolEvent,
    PoolObserver, Receipt, Result, SimpleBus, SubscriptionSpec, Topic, handler_fn,
};
use dualbus_memory::Memory;
use parking_lot::Mutex;

async fn wait_for(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_cuts_off_an_attempt_and_the_pool_retries() {
    let bus = DomainBus::builder(Memory::new())
        .handler_timeout(Duration::from_secs(1))
        .retry(Backoff::new(
            3,
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    let sub = bus
        .subscribe("t")
        .start(handler_fn(move |e: Event| {
            let a = a.clone();
            async move {
                a.fetch_add(1, Ordering::SeqCst);
                if e.attempt == 1 {
                    // Longer than the timeout: cut off, retried.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    bus.publish("t", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .unwrap();
    wait_for(|| sub.stats().acked == 1).await;
    let s = sub.stats();
    assert_eq!((s.handled, s.retried, s.dead_lettered), (1, 1, 0));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

/// A domain transport whose first publishes fail with a retryable error.
struct Flaky {
    inner: Memory,
    failures: AtomicU32,
}

#[async_trait]
impl DomainTransport for Flaky {
    fn capabilities(&self) -> &DomainCapabilities {
        DomainTransport::capabilities(&self.inner)
    }
    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Unavailable {
                backend: "flaky",
                source: "connection reset".into(),
            });
        }
        DomainTransport::publish(&self.inner, topic, message).await
    }
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        DomainTransport::subscribe(&self.inner, spec).await
    }
    async fn close(&self) -> Result<()> {
        DomainTransport::close(&self.inner).await
    }
}

#[tokio::test(start_paused = true)]
async fn publish_retry_layer_retries_retryable_errors_only() {
    let memory = Memory::new();
    let flaky = Flaky {
        inner: memory.clone(),
        failures: AtomicU32::new(2),
    };
    let backoff = Backoff::new(3, Duration::from_millis(10), Duration::from_millis(50));
    let bus = DomainBus::builder(flaky)
        .publish_layer(PublishRetryLayer::new(backoff.clone()))
        .build()
        .unwrap();
    bus.publish("t", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .expect("third try succeeds");
    assert_eq!(
        DomainTransport::pending(&memory, &Topic::new("t").unwrap(), "x")
            .await
            .unwrap(),
        Some(1)
    );

    let flaky = Flaky {
        inner: Memory::new(),
        failures: AtomicU32::new(5),
    };
    let bus = DomainBus::builder(flaky)
        .publish_layer(PublishRetryLayer::new(backoff))
        .build()
        .unwrap();
    let e = bus
        .publish("t", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .expect_err("3 attempts");
    assert_eq!(e.kind(), ErrorKind::Unavailable);

    // Permanent errors from inside the pipeline (the sink's size check, a conflicting
    // append) are not retried: the layer inside the retry layer sees one call each.
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let plain = DomainBus::builder(Memory::new())
        .publish_layer(PublishRetryLayer::new(Backoff::new(
            3,
            Duration::from_millis(10),
            Duration::from_millis(50),
        )))
        .publish_layer(Tag::new("inner", &log))
        .publish_layer(TimeoutLayer::new(Duration::from_secs(1)))
        .build()
        .unwrap();
    let huge = Envelope::new("a", "T", 1, vec![b'x'; 2 * 1024 * 1024]).unwrap();
    let e = plain.publish("t", &huge).await.expect_err("too large");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(log.lock().len(), 1, "{:?}", log.lock());
    plain
        .append("t", &Envelope::new("b", "T", 1, "{}").unwrap(), 0)
        .await
        .unwrap();
    log.lock().clear();
    let e = plain
        .append("t", &Envelope::new("b", "T", 1, "{}").unwrap(), 0)
        .await
        .expect_err("another v1");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(log.lock().len(), 1, "{:?}", log.lock());
}

#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<(String, PublishKind, bool)>>,
    handled: Mutex<Vec<(String, Option<String>, bool)>>,
    wrapped: AtomicUsize,
}

struct PubScope(Arc<Recorder>, String, PublishKind);
impl PublishScope for PubScope {
    fn finish(self: Box<Self>, result: std::result::Result<&Receipt, &Error>) {
        self.0
            .published
            .lock()
            .push((self.1, self.2, result.is_ok()));
    }
}

struct HandScope(Arc<Recorder>, String, Option<String>);
impl HandleScope for HandScope {
    fn wrap(
        &self,
        attempt: futures::future::BoxFuture<'static, std::result::Result<(), HandleError>>,
    ) -> futures::future::BoxFuture<'static, std::result::Result<(), HandleError>> {
        self.0.wrapped.fetch_add(1, Ordering::SeqCst);
        attempt
    }
    fn finish(self: Box<Self>, result: std::result::Result<(), &HandleError>) {
        self.0.handled.lock().push((self.1, self.2, result.is_ok()));
    }
}

struct TraceHook(Arc<Recorder>);
impl Hook for TraceHook {
    fn on_publish(
        &self,
        info: &PublishInfo<'_>,
        headers: &mut Headers,
    ) -> Option<Box<dyn PublishScope>> {
        headers.insert(
            "traceparent",
            format!("00-{:032x}-{:016x}-01", info.payload_len, 7),
        );
        Some(Box::new(PubScope(
            self.0.clone(),
            info.topic.to_owned(),
            info.kind,
        )))
    }
    fn on_handle(&self, info: &HandleInfo<'_>, headers: &Headers) -> Option<Box<dyn HandleScope>> {
        Some(Box::new(HandScope(
            self.0.clone(),
            info.topic.to_owned(),
            headers.get("traceparent").map(str::to_owned),
        )))
    }
}

#[tokio::test]
async fn hooks_write_and_read_headers_on_both_buses() {
    let rec = Arc::new(Recorder::default());
    let memory = Memory::new();
    let domain = DomainBus::builder(memory.clone())
        .hook(Arc::new(TraceHook(rec.clone())))
        .build()
        .unwrap();
    let simple = SimpleBus::builder(memory)
        .hook(Arc::new(TraceHook(rec.clone())))
        .build()
        .unwrap();
    let d = domain
        .subscribe("orders")
        .start(handler_fn(|e: Event| async move {
            if e.event_version == 2 {
                return Err(HandleError::permanent(dualbus_core::Failure("no".into())));
            }
            Ok::<_, HandleError>(())
        }))
        .await
        .unwrap();
    let s = simple
        .subscribe("notes")
        .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    domain
        .publish("orders", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .unwrap();
    domain
        .publish("orders", &Envelope::new("a", "T", 2, "{}").unwrap())
        .await
        .unwrap();
    // The simple subscriber may need a moment; publish until it saw one.
    while s.stats().handled == 0 {
        simple.publish("notes", "hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(|| d.stats().acked == 2).await;
    let handled = rec.handled.lock().clone();
    let orders: Vec<_> = handled.iter().filter(|h| h.0 == "orders").collect();
    assert_eq!(orders.len(), 2);
    assert!(
        orders
            .iter()
            .all(|h| h.1.as_deref().is_some_and(|t| t.starts_with("00-"))),
        "trace context did not travel: {orders:?}"
    );
    assert_eq!(
        orders.iter().filter(|h| !h.2).count(),
        1,
        "the failed attempt is reported"
    );
    assert!(handled.iter().any(|h| h.0 == "notes" && h.1.is_some()));
    assert!(rec.wrapped.load(Ordering::SeqCst) >= 3);
    // A batch: one scope per message, each with its own result.
    let batch = [
        Envelope::new("b", "T", 1, "{}").unwrap(),
        Envelope::new("b", "T", 2, "{}").unwrap(),
    ];
    domain.publish_batch("orders", &batch).await.unwrap();
    wait_for(|| d.stats().acked == 4).await;
    let published = rec.published.lock().clone();
    let of = |topic: &str, kind| {
        published
            .iter()
            .filter(|p| p.0 == topic && p.1 == kind)
            .map(|p| p.2)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("orders", PublishKind::Event), vec![true, true]);
    assert_eq!(of("orders", PublishKind::Batch), vec![true, true]);
    // The dead letters of the failed v2s (of `a` and of `b`) pass the hook too.
    assert_eq!(of("orders.dlq", PublishKind::DeadLetter), vec![true, true]);
    assert!(!of("notes", PublishKind::Message).is_empty());
}

/// Layers of every kind, added to one builder, run in the order they were added (the
/// first outermost), hooks among them, on both sides of both buses.
#[tokio::test]
async fn layers_run_in_the_order_added() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let tag = |name| Tag::new(name, &log);
    let memory = Memory::new();
    let domain = DomainBus::builder(memory.clone())
        .layer(tag("a"))
        .publish_layer(tag("p"))
        .handler_layer(tag("h"))
        .layer(tag("b"))
        .build()
        .unwrap();
    let simple = SimpleBus::builder(memory)
        .layer(tag("a"))
        .publish_layer(tag("p"))
        .handler_layer(tag("h"))
        .layer(tag("b"))
        .build()
        .unwrap();
    let d = domain
        .subscribe("ordered")
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    let s = simple
        .subscribe("ordered")
        .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    domain
        .publish("ordered", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .unwrap();
    wait_for(|| d.stats().acked == 1).await;
    assert_eq!(
        log.lock().drain(..).collect::<Vec<_>>(),
        [
            "a:PublishRequest",
            "p:PublishRequest",
            "b:PublishRequest",
            "a:Event",
            "h:Event",
            "b:Event"
        ]
    );
    simple.publish("ordered", "x").await.unwrap();
    wait_for(|| s.stats().handled == 1).await;
    assert_eq!(
        log.lock().drain(..).collect::<Vec<_>>(),
        [
            "a:PublishRequest",
            "p:PublishRequest",
            "b:PublishRequest",
            "a:Message",
            "h:Message",
            "b:Message"
        ]
    );
}

/// A handler behind a tower concurrency limit: readiness comes only when a running call
/// finishes, so the subscription must keep polling its running calls while it waits.
#[tokio::test(start_paused = true)]
async fn simple_handler_behind_a_concurrency_limit() {
    let bus = SimpleBus::builder(Memory::new()).build().unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let handler = tower::ServiceBuilder::new()
        .concurrency_limit(2)
        .service(handler_fn(move |_m: Message| {
            let d = d.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }));
    let sub = bus.subscribe("limited").start(handler).await.unwrap();
    for i in 0..20 {
        bus.publish("limited", format!("m{i}")).await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        wait_for(|| done.load(Ordering::SeqCst) == 20),
    )
    .await
    .expect("every message handled, two at a time");
    assert_eq!(sub.stats().failed, 0);
    sub.shutdown(Duration::from_secs(1)).await;
}

/// The same on the domain bus: workers and handlers started by the dispatcher share a
/// concurrency-limited handler without a deadlock, and shutdown stays within its deadline.
#[tokio::test(start_paused = true)]
async fn domain_handler_behind_a_concurrency_limit() {
    let bus = DomainBus::builder(Memory::new())
        .handler_layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .build()
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let sub = bus
        .subscribe("limited")
        .start(handler_fn(move |_e: Event| {
            let d = d.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    for a in 0..20 {
        for v in 1..=3 {
            bus.publish(
                "limited",
                &Envelope::new(format!("a{a}"), "T", v, "{}").unwrap(),
            )
            .await
            .unwrap();
        }
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        wait_for(|| done.load(Ordering::SeqCst) == 60),
    )
    .await
    .expect("every event handled, one at a time");
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        sub.shutdown_within(Duration::from_secs(5)),
    )
    .await
    .expect("shutdown keeps its deadline");
    assert!(!report.timed_out, "{report:?}");
}

/// Handlers that yield before they finish, behind a concurrency limit of one, with one or two
/// workers: an event the dispatcher started must make progress while workers wait for the
/// limit, and each aggregate's events still run in order.
#[tokio::test(start_paused = true)]
async fn yielding_handlers_behind_a_limit_of_one() {
    for workers in [1, 2] {
        let bus = DomainBus::builder(Memory::new())
            .handler_layer(tower::limit::ConcurrencyLimitLayer::new(1))
            .pool(PoolConfig {
                max_concurrency: workers,
                ..PoolConfig::default()
            })
            .build()
            .unwrap();
        let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let s = seen.clone();
        let sub = bus
            .subscribe("limited")
            .start(handler_fn(move |e: Event| {
                let s = s.clone();
                async move {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    s.lock()
                        .push((e.envelope.aggregate_id.clone(), e.envelope.event_version));
                    Ok::<_, HandleError>(())
                }
            }))
            .await
            .unwrap();
        // Round robin over the aggregates: most deliveries find their key idle.
        for v in 1..=4 {
            for a in 0..25 {
                bus.publish(
                    "limited",
                    &Envelope::new(format!("a{a}"), "T", v, "{}").unwrap(),
                )
                .await
                .unwrap();
            }
        }
        tokio::time::timeout(
            Duration::from_secs(60),
            wait_for(|| seen.lock().len() == 100),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{workers} worker(s): {} of 100 handled; the pool stalled",
                seen.lock().len()
            )
        });
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        for (a, v) in seen.lock().iter() {
            let prev = last.insert(a.clone(), *v).unwrap_or(0);
            assert_eq!(*v, prev + 1, "{a}: v{v} after v{prev}");
        }
        let report = sub.shutdown_within(Duration::from_secs(5)).await;
        assert!(!report.timed_out, "{report:?}");
    }
}

/// A handler service that never gets ready.
#[derive(Clone)]
struct NeverReady;

impl tower::Service<Event> for NeverReady {
    type Response = ();
    type Error = HandleError;
    type Future = std::future::Ready<std::result::Result<(), HandleError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), HandleError>> {
        std::task::Poll::Pending
    }

    fn call(&mut self, _event: Event) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

/// Shutdown keeps its deadline even when the handler never gets ready: the work is handed
/// back unacknowledged and the broker still holds it.
#[tokio::test(start_paused = true)]
async fn shutdown_keeps_its_deadline_when_the_handler_never_gets_ready() {
    let broker = Memory::new();
    let bus = DomainBus::builder(broker.clone()).build().unwrap();
    let sub = bus.subscribe("stuck").start(NeverReady).await.unwrap();
    for v in 1..=3 {
        bus.publish("stuck", &Envelope::new("a", "T", v, "{}").unwrap())
            .await
            .unwrap();
    }
    wait_for(|| sub.stats().received == 3).await;
    let group = sub.group().to_owned();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        sub.shutdown_within(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown returns within its deadline");
    assert!(report.timed_out, "{report:?}");
    assert_eq!(report.stats.acked, 0, "{report:?}");
    assert_eq!(
        broker
            .pending(&Topic::new("stuck").unwrap(), &group)
            .await
            .unwrap(),
        Some(3),
        "nothing acknowledged: all three stay with the broker"
    );
}

/// An observer that panics loses its event and nothing else.
#[tokio::test(start_paused = true)]
async fn a_panicking_observer_does_not_stop_the_pool() {
    struct Panics;
    impl PoolObserver for Panics {
        fn on_event(&self, _event: &PoolEvent<'_>) {
            panic!("observer bug");
        }
    }
    let bus = DomainBus::builder(Memory::new()).build().unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let sub = bus
        .subscribe("observed")
        .observer(Arc::new(Panics))
        .start(handler_fn(move |_e: Event| {
            let d = d.clone();
            async move {
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    for v in 1..=5 {
        bus.publish("observed", &Envelope::new("a", "T", v, "{}").unwrap())
            .await
            .unwrap();
    }
    wait_for(|| sub.stats().acked == 5).await;
    assert_eq!(done.load(Ordering::SeqCst), 5);
    let report = sub.shutdown_within(Duration::from_secs(5)).await;
    assert!(!report.timed_out, "{report:?}");
}

/// `Subscription::abort` resolves only when no handler of the subscription runs or starts
/// any more, on a multi-threaded runtime with handlers finishing all the time; what was not
/// acknowledged comes to the next subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_resolves_after_the_last_handler() {
    let bus = DomainBus::builder(Memory::new()).build().unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let after_abort = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, a, s) = (running.clone(), after_abort.clone(), stopped.clone());
    let sub = bus
        .subscribe("aborted")
        .pool(PoolConfig {
            max_concurrency: 8,
            ..PoolConfig::default()
        })
        .start(handler_fn(move |_e: Event| {
            let (r, a, s) = (r.clone(), a.clone(), s.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
                if s.load(Ordering::SeqCst) {
                    a.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    for v in 1..=200u64 {
        for agg in 0..8 {
            bus.publish(
                "aborted",
                &Envelope::new(format!("a{agg}"), "T", v, "{}").unwrap(),
            )
            .await
            .unwrap();
        }
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        wait_for(|| running.load(Ordering::SeqCst) > 100),
    )
    .await
    .expect("handlers run");
    sub.abort().await;
    stopped.store(true, Ordering::SeqCst);
    let started = running.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        running.load(Ordering::SeqCst),
        started,
        "a handler started after abort"
    );
    assert_eq!(
        after_abort.load(Ordering::SeqCst),
        0,
        "a handler finished after abort"
    );
    // The rest is delivered to the next subscriber.
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let next = bus
        .subscribe("aborted")
        .start(handler_fn(move |_e: Event| {
            h.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandleError>(()) }
        }))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), wait_for(|| next.stats().acked > 0))
        .await
        .expect("the rest goes to the next subscriber");
    drop(next);
    bus.close().await.unwrap();
}
