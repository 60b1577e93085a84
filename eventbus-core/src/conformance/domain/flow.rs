//! Flow control: a bounded buffer under a slow handler, no head-of-line blocking across
//! aggregates, and a partition paused at the per-key cap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::support::{
    Gate, SOURCE, aggregates, bus_with, finish, publish_interleaved, subscribe_checked,
};
use crate::conformance::{Backend, OrderChecker, Record, event, unique_topic, wait_for};
use crate::error::HandleError;
use crate::handler::{Event, handler_fn};
use crate::pool::PoolConfig;

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
    let gate = Gate::default();
    let g = gate.clone();
    let handler = handler_fn(move |e: Event| {
        let g = g.clone();
        async move {
            if e.aggregate_id == "slow" {
                g.wait().await;
            }
            Ok::<_, HandleError>(())
        }
    });
    let sub = subscribe_checked(&bus, &topic, &checker, handler).await;
    let mut aggs = vec!["slow".to_owned()];
    aggs.extend(aggregates("fast", 20));
    publish_interleaved(&bus, &topic, &checker, &aggs, 5).await;
    // Every other aggregate completes while "slow" is blocked on its first event.
    wait_for(|| checker.distinct_ends() == 100).await;
    assert!(
        checker
            .records()
            .iter()
            .all(|r| !matches!(r, Record::End { a, .. } if a == "slow")),
        "the slow aggregate was not blocked"
    );
    gate.open();
    wait_for(|| checker.distinct_ends() == 105).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// A key whose backlog reaches `max_per_key` pauses its partition: the pool stops pulling
/// it while the other partitions keep flowing (when the backend can pause partitions).
pub async fn per_key_cap(backend: &dyn Backend) {
    const CAP: usize = 4;
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_per_key: CAP,
            max_in_flight: 1000,
            ..PoolConfig::default()
        })
    })
    .await;
    if !bus.capabilities().pause_partitions {
        return;
    }
    let topic = unique_topic("domain-perkey");
    let checker = OrderChecker::new();
    let gate = Gate::default();
    let partitions: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (g, parts) = (gate.clone(), partitions.clone());
    let handler = handler_fn(move |e: Event| {
        let (g, parts) = (g.clone(), parts.clone());
        async move {
            parts
                .lock()
                .insert(e.aggregate_id.clone(), e.position.partition);
            if e.aggregate_id == "hot" {
                g.wait().await;
            }
            Ok::<_, HandleError>(())
        }
    });
    let sub = subscribe_checked(&bus, &topic, &checker, handler).await;
    let others = aggregates("cool", 30);
    for v in 1..=40u64 {
        bus.publish(&topic, &event("hot", v))
            .await
            .expect("publish");
        checker.published("hot", v);
    }
    publish_interleaved(&bus, &topic, &checker, &others, 3).await;
    // Every aggregate outside the hot partition completes while "hot" is blocked...
    wait_for(|| {
        let parts = partitions.lock();
        let Some(hot) = parts.get("hot").copied() else {
            return false;
        };
        let ends = checker.records();
        others.iter().all(|a| match parts.get(a) {
            Some(p) if *p == hot => true,
            Some(_) => {
                ends.iter()
                    .filter(|r| matches!(r, Record::End { a: x, .. } if x == a))
                    .count()
                    == 3
            }
            None => false,
        })
    })
    .await;
    // ...and the hot partition stopped at the cap instead of buffering all 40 events.
    let held = sub.stats().in_flight as usize;
    assert!(
        held <= CAP + 1,
        "{held} deliveries held: the hot partition was not paused at {CAP}"
    );
    gate.open();
    wait_for(|| checker.distinct_ends() == 40 + 90).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}
