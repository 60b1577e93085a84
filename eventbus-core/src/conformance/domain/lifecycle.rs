//! Subscription and client lifecycle: resubscribing after shutdown and abort, close, the
//! graceful drain and the drain deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::support::{
    SOURCE, aggregates, bus, bus_with, finish, ok_handler, publish_interleaved, subscribe_checked,
};
use crate::conformance::{Backend, OrderChecker, event, unique_topic, wait_for};
use crate::domain::{DomainBus, Subscription};
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::pool::PoolConfig;
use crate::transport::DomainTransport;

/// Subscribes, retrying while an earlier subscriber of the group is still letting go.
async fn subscribe_when_free<H>(
    bus: &DomainBus,
    topic: &str,
    f: impl Fn(crate::domain::DomainSubscribeBuilder) -> crate::domain::DomainSubscribeBuilder,
    handler: H,
) -> Subscription
where
    H: tower::Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
    H::Future: Send + 'static,
{
    loop {
        match f(bus.subscribe(topic)).start(handler.clone()).await {
            Ok(s) => return s,
            Err(e) if e.kind() == ErrorKind::Conflict => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("subscribe: {e}"),
        }
    }
}

/// Graceful shutdown, abrupt drop and resubscribe: nothing is lost, order holds across
/// the restarts.
pub async fn resubscribe(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: 40,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-resub");
    let checker = OrderChecker::new();
    let slow = handler_fn(|_e: Event| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, HandleError>(())
    });
    publish_interleaved(&bus, &topic, &checker, &aggregates("re", 10), 20).await;
    let first = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(0)),
        checker.wrap(0, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() >= 50).await;
    let report = first.shutdown().await;
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(
        report.abandoned + report.dropped + report.parked,
        0,
        "{report:?}"
    );
    checker.crash(0);
    let second = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() >= 100).await;
    second.abort().await;
    checker.crash(1);
    let third = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(2)),
        checker.wrap(2, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 200).await;
    let s = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(s.published, 200);
    drop(third);
    bus.close().await.expect("close");
}

/// Double and concurrent close are safe; afterwards every operation fails with `Closed`.
pub async fn close(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-close");
    let checker = OrderChecker::new();
    let sub = subscribe_checked(&bus, &topic, &checker, ok_handler()).await;
    publish_interleaved(&bus, &topic, &checker, &aggregates("c", 2), 5).await;
    wait_for(|| checker.distinct_ends() == 10).await;
    let (a, b) = tokio::join!(bus.close(), bus.close());
    a.expect("close");
    b.expect("concurrent close");
    bus.close().await.expect("third close");
    assert!(bus.is_closed());
    let closed =
        |r: Result<(), Error>| assert_eq!(r.expect_err("after close").kind(), ErrorKind::Closed);
    closed(bus.publish(&topic, &event("c-0", 6)).await.map(|_| ()));
    closed(
        bus.publish_batch(&topic, &[event("c-0", 6)])
            .await
            .map(|_| ()),
    );
    closed(bus.subscribe(&topic).start(ok_handler()).await.map(|_| ()));
    closed(bus.replay(&topic, "c-0").await.map(|_| ()));
    assert!(sub.stats().acked >= 10);
    drop(sub);
    checker.check().expect("order");
    let again = self::bus(backend).await;
    again
        .publish(&topic, &event("c-0", 6))
        .await
        .expect("another client still publishes");
    again.close().await.expect("close");
}

/// Graceful shutdown finishes in-flight and buffered work: nothing abandoned, nothing
/// dropped, and a new subscriber handles exactly the rest.
pub async fn graceful_drain(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: 64,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-drain");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &aggregates("d", 30), 10).await;
    let slow = handler_fn(|_e: Event| async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, HandleError>(())
    });
    let sub = subscribe_checked(&bus, &topic, &checker, slow).await;
    wait_for(|| checker.distinct_ends() >= 50 && sub.stats().in_flight > 4).await;
    let report = sub.shutdown_within(Duration::from_secs(60)).await;
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(
        (report.abandoned, report.dropped, report.parked),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.drained > 0, "the drain finished nothing: {report:?}");
    assert_eq!(report.stats.acked, report.stats.handled, "{report:?}");
    assert_eq!(report.stats.in_flight, 0);
    let handled_first = report.stats.handled;
    // Acked work must not be pending, unacked work must. A broker may apply the last
    // acknowledgements a moment after they were sent (a JetStream ack is a message of its
    // own): the count may come down to the unacked ones, never below them.
    let unacked = 300 - handled_first;
    while let Some(p) = bus
        .transport()
        .pending(&topic, SOURCE)
        .await
        .expect("pending")
    {
        assert!(
            p >= unacked,
            "{p} pending but {unacked} were never acknowledged: unacked work was forgotten"
        );
        if p == unacked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    checker.crash(0);
    let rest = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 300).await;
    let s = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(s.duplicates, 0, "a drained event was handled again");
    assert_eq!(rest.stats().handled, 300 - handled_first);
    drop(rest);
    bus.close().await.expect("close");
}

/// At the drain deadline, a stuck handler is abandoned and buffered work is returned
/// unacknowledged; a new subscriber handles all of it, in order.
pub async fn drain_deadline(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-deadline");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &["stuck".to_owned()], 3).await;
    publish_interleaved(&bus, &topic, &checker, &aggregates("free", 4), 5).await;
    let started = Arc::new(AtomicBool::new(false));
    let st = started.clone();
    let stuck = handler_fn(move |e: Event| {
        let st = st.clone();
        async move {
            if e.aggregate_id == "stuck" {
                st.store(true, Ordering::SeqCst);
                futures::future::pending::<()>().await;
            }
            Ok::<_, HandleError>(())
        }
    });
    let sub = subscribe_checked(&bus, &topic, &checker, stuck).await;
    wait_for(|| {
        checker.distinct_ends() == 20
            && started.load(Ordering::SeqCst)
            && sub.stats().in_flight == 3
    })
    .await;
    let report = sub.shutdown_within(Duration::from_millis(100)).await;
    assert!(report.timed_out, "{report:?}");
    assert_eq!((report.abandoned, report.dropped), (1, 2), "{report:?}");
    checker.crash(0);
    let rest = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, ok_handler()),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 23).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(rest);
    bus.close().await.expect("close");
}
