//! Helpers shared by the domain conformance tests (and the size-limit tests): building a
//! bus, publishing interleaved aggregates, settling a run, reading messages back raw.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::codec::HeaderStyle;
use crate::conformance::{Backend, OrderChecker, Summary, event, next_raw, settle_and_check};
use crate::domain::{DomainBus, DomainBusBuilder, Subscription};
use crate::error::HandleError;
use crate::handler::{Event, handler_fn};
use crate::message::InboundMessage;
use crate::retry::Backoff;
use crate::topic::Topic;
use crate::transport::{DynDomainTransport, SubscriptionSpec};

pub(in crate::conformance) const SOURCE: &str = "conformance";

pub(in crate::conformance) fn fast_retry(attempts: u32) -> Backoff {
    Backoff::new(
        attempts,
        Duration::from_millis(1),
        Duration::from_millis(10),
    )
}

pub(in crate::conformance) async fn bus_with(
    backend: &dyn Backend,
    f: impl FnOnce(DomainBusBuilder) -> DomainBusBuilder,
) -> DomainBus {
    let t = backend.domain().await.expect("connect domain transport");
    f(DomainBusBuilder::from_dyn(t)
        .source(SOURCE)
        .retry(fast_retry(5)))
    .build()
    .expect("build domain bus")
}

pub(in crate::conformance) async fn bus(backend: &dyn Backend) -> DomainBus {
    bus_with(backend, |b| b).await
}

/// Publishes `versions` events for each aggregate, interleaved, receipting them in `checker`.
pub(super) async fn publish_interleaved(
    bus: &DomainBus,
    topic: &str,
    checker: &OrderChecker,
    aggregates: &[String],
    versions: u64,
) {
    for v in 1..=versions {
        for a in aggregates {
            bus.publish(topic, &event(a, v)).await.expect("publish");
            checker.published(a, v);
        }
    }
}

pub(super) fn aggregates(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Waits until the broker shows nothing pending for `group` (if it can tell), marks the run
/// quiescent, watches for stray redeliveries, then checks C1, C2, C3 and C6.
pub(in crate::conformance) async fn finish(
    backend: &dyn Backend,
    bus: &DomainBus,
    topic: &str,
    group: &str,
    checker: &OrderChecker,
) -> Summary {
    match settle_and_check(backend, bus.transport(), topic, group, checker).await {
        Ok(s) => s,
        Err(v) => panic!("order checker: {v}"),
    }
}

/// Reads `n` raw messages of `topic` with a fresh group, acknowledging them.
pub(in crate::conformance) async fn read_raw(
    transport: &DynDomainTransport,
    topic: &str,
    n: usize,
) -> Vec<InboundMessage> {
    let mut sub = transport
        .subscribe(SubscriptionSpec::new(
            crate::Topic::new(topic).expect("topic"),
            format!("inspect-{}", uuid::Uuid::now_v7().simple()),
        ))
        .await
        .expect("subscribe raw");
    let mut out = Vec::new();
    while out.len() < n {
        match next_raw(&mut sub).await {
            Some(Ok(d)) => {
                d.ack().await.expect("ack raw");
                out.push(d.message);
            }
            Some(Err(_)) => {}
            None => panic!("raw stream ended after {} of {n} messages", out.len()),
        }
    }
    out
}

pub(super) fn ok_handler()
-> impl tower::Service<Event, Response = (), Error = HandleError, Future = impl Send>
+ Clone
+ Send
+ Sync {
    handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) })
}

pub(super) fn ce(style: HeaderStyle, name: &str) -> String {
    match style {
        HeaderStyle::HyphenPercentEncoded => format!("ce-{name}"),
        HeaderStyle::UnderscorePlain => format!("ce_{name}"),
    }
}

/// Subscribes `handler` to `topic` as member 0 of `checker`: its starts, ends, acks and dead
/// letters are recorded.
pub(in crate::conformance) async fn subscribe_checked<H>(
    bus: &DomainBus,
    topic: &Topic,
    checker: &OrderChecker,
    handler: H,
) -> Subscription
where
    H: tower::Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
    H::Future: Send + 'static,
{
    bus.subscribe(topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, handler))
        .await
        .expect("subscribe")
}

/// A gate handlers wait at until the test opens it (once open, it stays open).
#[derive(Clone, Default)]
pub(in crate::conformance) struct Gate {
    open: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Gate {
    /// Waits until the gate is open.
    pub(in crate::conformance) async fn wait(&self) {
        while !self.open.load(Ordering::SeqCst) {
            // Registered before the second look, so an `open` in between still wakes it.
            let opened = self.notify.notified();
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
    }

    /// Opens the gate for every waiter, present and future.
    pub(in crate::conformance) fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}
