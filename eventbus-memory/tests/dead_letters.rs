//! Dead letters the broker refuses for good: the aggregate stays parked, counted once, with
//! no retry loop, while other aggregates go on.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Test code.

use std::time::Duration;

use dualbus_core::{Backoff, DomainBus, Envelope, Event, HandleError, handler_fn};
use dualbus_memory::{Memory, MemoryConfig};

async fn wait_for(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_dead_letter_parks_its_aggregate_without_retrying() {
    // So small a limit that the dead-letter headers alone (a long reason) cannot fit: even
    // the most reduced record is refused.
    let memory = Memory::with_config(MemoryConfig::default().with_max_payload(1500)).unwrap();
    let bus = DomainBus::builder(memory)
        .retry(Backoff::new(
            1,
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
    let sub = bus
        .subscribe("orders")
        .start(handler_fn(|e: Event| async move {
            if e.aggregate_id == "poisoned" {
                // A reason of 1,024 two-byte characters: 2 KiB of header.
                Err(HandleError::permanent(dualbus_core::Failure(
                    "é".repeat(2000),
                )))
            } else {
                Ok(())
            }
        }))
        .await
        .unwrap();
    let event = |a: &str, v| Envelope::new(a, "T", v, "{}").unwrap();
    bus.publish("orders", &event("poisoned", 1)).await.unwrap();
    bus.publish("orders", &event("poisoned", 2)).await.unwrap();
    bus.publish("orders", &event("healthy", 1)).await.unwrap();
    wait_for(|| sub.stats().dead_letters_refused == 1 && sub.stats().handled == 1).await;

    // An hour later: still one refused publish, nothing more tried, nothing acknowledged of
    // the parked aggregate (its second event waits behind the first).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let s = sub.stats();
    assert_eq!(
        (
            s.dead_letters_refused,
            s.dead_letter_failures,
            s.dead_lettered,
            s.handled,
            s.acked
        ),
        (1, 1, 0, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.in_flight, 2, "the parked event and the one behind it");
    let report = sub.shutdown_within(Duration::from_millis(100)).await;
    assert_eq!(report.parked, 1, "{report:?}");
    assert_eq!(
        bus.transport()
            .pending(&"orders".parse().unwrap(), "dualbus")
            .await
            .unwrap(),
        Some(2),
        "nothing of the parked aggregate was acknowledged"
    );
}
