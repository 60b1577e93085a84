//! Flow control: a bounded buffer under a slow handler, no head-of-line blocking across
//! aggregates, and a slow aggregate far over its per-key cap deferred without holding up
//! the others, within the `max_deferred` bound.

use std::time::Duration;

use super::support::{
    Gate, SOURCE, aggregates, bus_with, finish, publish_interleaved, subscribe_checked,
};
use crate::conformance::{Backend, OrderChecker, Record, event, unique_topic, wait_for};
use crate::domain::{DomainBus, Subscription};
use crate::error::HandleError;
use crate::handler::{Event, handler_fn};
use crate::pool::PoolConfig;
use crate::topic::Topic;

/// A slow handler does not make the buffer grow: at most `max_in_flight` deliveries held.
pub async fn backpressure(backend: &dyn Backend) {
    const MAX: usize = 20;
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: MAX,
            max_per_key: 5,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-backpressure");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &aggregates("bp", 50), 10).await;
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, HandleError>(())
            }),
        ))
        .await
        .expect("subscribe");
    let mut samples = 0;
    while checker.distinct_ends() < 500 {
        let held = sub.stats().in_flight as usize;
        assert!(
            held <= MAX,
            "{held} deliveries held, more than max_in_flight {MAX}"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(samples > 1);
    let s = sub.stats();
    assert!(
        s.peak_in_flight as usize <= MAX,
        "peak {} > {MAX}",
        s.peak_in_flight
    );
    assert!(
        s.peak_in_flight > 4,
        "the buffer never filled: the test proved nothing"
    );
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// A blocked aggregate stalls no other aggregate, even with two workers (a fixed
/// hash-to-worker pool would stall about half of them).
pub async fn slow_key_does_not_stall_others(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 2,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-slowkey");
    let checker = OrderChecker::new();
    let (gate, handler) = blocking("slow");
    let sub = subscribe_checked(&bus, &topic, &checker, handler).await;
    let mut aggs = vec!["slow".to_owned()];
    aggs.extend(aggregates("fast", 20));
    publish_interleaved(&bus, &topic, &checker, &aggs, 5).await;
    // Every other aggregate completes while "slow" is blocked on its first event.
    wait_for(|| checker.distinct_ends() == 100).await;
    assert_eq!(
        ends_of(&checker, "slow"),
        0,
        "the slow aggregate was not blocked"
    );
    gate.open();
    wait_for(|| checker.distinct_ends() == 105).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// A slow aggregate far over its `max_per_key` cap (10x) holds up no other aggregate, on
/// any partition: they all finish while it is still blocked on its first event, its later
/// events are deferred (not buffered whole), and they are handled in order afterwards.
pub async fn slow_aggregate_over_cap(backend: &dyn Backend) {
    const CAP: usize = 4;
    const HOT: u64 = 40;
    let pool = PoolConfig {
        max_per_key: CAP,
        ..PoolConfig::default()
    };
    let Blocked {
        bus,
        topic,
        checker,
        gate,
        sub,
    } = blocked_hot(backend, "domain-overcap", pool, HOT).await;
    let others = aggregates("cool", 30);
    publish_interleaved(&bus, &topic, &checker, &others, 3).await;
    // Every other aggregate completes while "hot" is blocked on its first event...
    wait_for(|| checker.distinct_ends() == others.len() * 3).await;
    assert_eq!(
        ends_of(&checker, "hot"),
        0,
        "the hot aggregate was not blocked"
    );
    // ...with the hot aggregate's backlog past the cap deferred, not held whole.
    wait_for(|| {
        let s = sub.stats();
        (s.in_flight + s.deferred) as usize == HOT as usize
    })
    .await;
    let s = sub.stats();
    assert!(
        s.in_flight as usize <= CAP + 1 && s.deferred as usize >= HOT as usize - 1 - CAP,
        "{} deliveries held whole and {} deferred: the hot aggregate's cap {CAP} was not kept",
        s.in_flight,
        s.deferred
    );
    gate.open();
    wait_for(|| checker.distinct_ends() == others.len() * 3 + HOT as usize).await;
    // The backend's declaration holds: deferred deliveries were kept without their bodies
    // and read again exactly when it says it can.
    let reread = sub.stats().reread as usize;
    if bus.capabilities().reread {
        assert!(
            reread >= HOT as usize - 1 - CAP,
            "only {reread} deferred deliveries were read again"
        );
    } else {
        assert_eq!(reread, 0, "a backend without reread read deliveries again");
    }
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// `max_deferred` bounds the deferred deliveries: with a blocked aggregate 10x past both
/// its cap and the bound, the pool holds at most `max_deferred` deferred ones (it stops
/// pulling at the bound) and everything is handled in order once the aggregate moves.
pub async fn deferred_bound(backend: &dyn Backend) {
    const CAP: usize = 2;
    const MAX_DEFERRED: usize = 4;
    const HOT: u64 = 46;
    let pool = PoolConfig {
        max_per_key: CAP,
        max_deferred: MAX_DEFERRED,
        ..PoolConfig::default()
    };
    let Blocked {
        bus,
        topic,
        checker,
        gate,
        sub,
    } = blocked_hot(backend, "domain-deferbound", pool, HOT).await;
    wait_for(|| sub.stats().deferred as usize == MAX_DEFERRED).await;
    // Stays at the bound while the aggregate is blocked.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let s = sub.stats();
        assert_eq!(ends_of(&checker, "hot"), 0);
        assert!(
            s.deferred as usize <= MAX_DEFERRED && s.in_flight as usize <= CAP + 1,
            "held {} whole and {} deferred: past the cap {CAP} or max_deferred {MAX_DEFERRED}",
            s.in_flight,
            s.deferred
        );
    }
    gate.open();
    wait_for(|| checker.distinct_ends() == HOT as usize).await;
    let s = sub.stats();
    assert_eq!(
        s.peak_deferred as usize, MAX_DEFERRED,
        "the bound was never reached"
    );
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// A pool whose bounds exceed the broker's limit of unacknowledged deliveries is refused
/// with a clear error when the backend has such a limit (past it the broker would stop
/// delivering to every aggregate); one that fits is accepted.
pub async fn unacked_limit(backend: &dyn Backend) {
    let probe = bus_with(backend, |b| b).await;
    let Some(limit) = probe.capabilities().max_unacked else {
        probe.close().await.expect("close");
        return;
    };
    probe.close().await.expect("close");
    let topic = unique_topic("domain-unacked");
    for (deferred, ok) in [(limit - 10, false), (limit - 11, true)] {
        let bus = bus_with(backend, |b| {
            b.pool(PoolConfig {
                max_in_flight: 11,
                max_deferred: deferred,
                ..PoolConfig::default()
            })
        })
        .await;
        let r = bus
            .subscribe(&topic)
            .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
            .await;
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(crate::Error::Config { path, .. }), false) => {
                assert_eq!(path, "pool.max_deferred");
            }
            (r, _) => panic!("max_deferred {deferred} with limit {limit}: {:?}", r.err()),
        }
        bus.close().await.expect("close");
    }
}

/// A gate and a handler that waits on it for every event of `blocked`.
fn blocking(blocked: &'static str) -> (Gate, crate::handler::BoxEventHandler) {
    let gate = Gate::default();
    let g = gate.clone();
    let handler = handler_fn(move |e: Event| {
        let g = g.clone();
        async move {
            if e.aggregate_id == blocked {
                g.wait().await;
            }
            Ok::<_, HandleError>(())
        }
    });
    (gate, crate::handler::BoxEventHandler::new(handler))
}

/// A subscription whose handler blocks aggregate "hot" until `gate` opens, with `hot`
/// events of it published.
struct Blocked {
    bus: DomainBus,
    topic: Topic,
    checker: OrderChecker,
    gate: Gate,
    sub: Subscription,
}

/// Subscribes on a new topic named after `name` with `pool` (and 64 in flight), a handler
/// that waits on the returned gate for every event of "hot", and publishes `hot` events of
/// it.
async fn blocked_hot(backend: &dyn Backend, name: &str, pool: PoolConfig, hot: u64) -> Blocked {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_in_flight: 64,
            ..pool
        })
    })
    .await;
    let topic = unique_topic(name);
    let checker = OrderChecker::new();
    let (gate, handler) = blocking("hot");
    let sub = subscribe_checked(&bus, &topic, &checker, handler).await;
    for v in 1..=hot {
        bus.publish(&topic, &event("hot", v))
            .await
            .expect("publish");
        checker.published("hot", v);
    }
    Blocked {
        bus,
        topic,
        checker,
        gate,
        sub,
    }
}

/// How many events of aggregate `a` ended.
fn ends_of(checker: &OrderChecker, a: &str) -> usize {
    checker
        .records()
        .iter()
        .filter(|r| matches!(r, Record::End { a: x, .. } if x == a))
        .count()
}
