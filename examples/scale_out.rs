//! Three replicas of one service share a topic through a consumer group, in-process: one
//! crashes, another joins, partitions move, and every order's events stay in order.
//!
//! Run with `cargo run --example scale_out`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use dualbus::memory::{Memory, MemoryConfig};
use dualbus::{
    DomainBus, Envelope, Event, HandleError, PartitionState, PoolEvent, PoolObserver, Subscription,
    handler_fn,
};
use parking_lot::Mutex;

const ORDERS: usize = 24;
const EVENTS_PER_ORDER: u64 = 12;

/// What every replica shares for the final check: the last version handled per order.
#[derive(Default)]
struct Ledger {
    last: Mutex<HashMap<String, u64>>,
    gaps: AtomicU64,
    duplicates: AtomicU64,
}

/// Prints a replica's partition moves.
struct Moves(&'static str);

impl PoolObserver for Moves {
    fn on_event(&self, event: &PoolEvent<'_>) {
        if let PoolEvent::Partition {
            partition,
            epoch,
            state,
        } = event
        {
            match state {
                PartitionState::Active => println!(
                    "  [{}] owns partition {partition} (epoch {epoch}), rewound to its ack floor",
                    self.0
                ),
                PartitionState::Draining => {
                    println!("  [{}] hands partition {partition} over: draining", self.0)
                }
                PartitionState::Revoked => {
                    println!("  [{}] released partition {partition}", self.0)
                }
                _ => {}
            }
        }
    }
}

async fn replica(
    broker: &Memory,
    name: &'static str,
    ledger: Arc<Ledger>,
    handled: Arc<AtomicU64>,
) -> anyhow::Result<(DomainBus, Subscription)> {
    let bus = DomainBus::builder(broker.connect())
        .source("orders-service")
        .build()?;
    let sub = bus
        .subscribe("orders")
        .observer(Arc::new(Moves(name)))
        .start(handler_fn(move |e: Event| {
            let (ledger, handled) = (ledger.clone(), handled.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await; // some work
                let mut last = ledger.last.lock();
                let prev = last.get(&e.aggregate_id).copied().unwrap_or(0);
                if e.event_version == prev + 1 {
                    last.insert(e.aggregate_id.clone(), e.event_version);
                } else if e.event_version <= prev {
                    // At-least-once: a redelivery after the crash.
                    ledger.duplicates.fetch_add(1, Ordering::SeqCst);
                } else {
                    ledger.gaps.fetch_add(1, Ordering::SeqCst);
                    println!(
                        "  ORDER BROKEN: {} v{} after v{prev}",
                        e.aggregate_id, e.event_version
                    );
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await?;
    Ok((bus, sub))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = Memory::with_config(MemoryConfig::default().with_partitions(8))?;
    let publisher = DomainBus::builder(broker.connect())
        .source("checkout")
        .build()?;
    let ledger = Arc::new(Ledger::default());
    let counts: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();

    println!("three replicas join the group `orders-service`");
    let (a_bus, a) = replica(&broker, "A", ledger.clone(), counts[0].clone()).await?;
    let (b_bus, b) = replica(&broker, "B", ledger.clone(), counts[1].clone()).await?;
    let (c_bus, c) = replica(&broker, "C", ledger.clone(), counts[2].clone()).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let total = ORDERS as u64 * EVENTS_PER_ORDER;
    let handled = || counts.iter().map(|c| c.load(Ordering::SeqCst)).sum::<u64>();
    let mut b = Some(b);
    let mut d = None;
    for v in 1..=EVENTS_PER_ORDER {
        for o in 0..ORDERS {
            let e = Envelope::new(
                format!("order-{o:02}"),
                "OrderUpdated",
                v,
                format!(r#"{{"step":{v}}}"#),
            )?;
            publisher.publish("orders", &e).await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if v == 4 {
            println!("replica B crashes (no drain, no acks for its unfinished work)");
            drop(b.take());
        }
        if v == 8 {
            println!("replica D joins");
            d = Some(replica(&broker, "D", ledger.clone(), counts[3].clone()).await?);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ledger
        .last
        .lock()
        .values()
        .filter(|v| **v == EVENTS_PER_ORDER)
        .count()
        < ORDERS
    {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out with {} of {total} handled", handled());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (name, sub) in [("A", a), ("C", c)] {
        println!(
            "replica {name} owns partitions {:?}",
            sub.active_partitions()
        );
        sub.shutdown().await;
    }
    if let Some((d_bus, d)) = d {
        println!("replica D owns partitions {:?}", d.active_partitions());
        d.shutdown().await;
        d_bus.close().await?;
    }
    for bus in [a_bus, b_bus, c_bus, publisher] {
        bus.close().await?;
    }

    println!();
    println!("summary");
    println!("  published:  {total} events for {ORDERS} orders");
    for (name, c) in ["A", "B", "C", "D"].iter().zip(&counts) {
        println!("  replica {name}:  handled {}", c.load(Ordering::SeqCst));
    }
    println!(
        "  duplicates: {} (redeliveries after the crash)",
        ledger.duplicates.load(Ordering::SeqCst)
    );
    let gaps = ledger.gaps.load(Ordering::SeqCst);
    if gaps > 0 {
        bail!("{gaps} events arrived out of order");
    }
    println!(
        "  per-aggregate order verified: every order's events were handled as v1..v{EVENTS_PER_ORDER}, across the crash and the join"
    );
    Ok(())
}
