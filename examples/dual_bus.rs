//! An order and payment service on both buses, in-process (no server needed):
//!
//! - domain events (`OrderCreated`, `OrderPaid`, `OrderShipped`) for several orders on the
//!   domain bus, handled in order per order and in parallel across orders;
//! - the payment handler fails once for one order (retried in place), and the shipping
//!   handler refuses an order without an address (dead-lettered with a reason);
//! - notifications on the simple bus.
//!
//! Run with `cargo run --example dual_bus`.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use dualbus::{Backoff, Buses, Envelope, Event, Failure, HandleError, Message, handler_fn};
use tokio::sync::Mutex;

const ORDERS: [&str; 4] = ["order-1001", "order-1002", "order-1003", "order-1004"];

#[derive(Default)]
struct Tally {
    /// Last version handled per order: the handler checks that each event is the next one.
    last: Mutex<HashMap<String, u64>>,
    handled: AtomicU64,
    failures_injected: AtomicU64,
    notifications: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings only by default (RUST_LOG overrides): the bus warns once that the in-process
    // backend is not durable.
    tracing_subscriber::fmt()
        // Colours only on a terminal: piped or redirected output stays plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let buses = Buses::builder()
        .source("shop")
        .retry(Backoff::new(
            3,
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .build()?;

    let tally = Arc::new(Tally::default());

    // Notifications: raw payloads on the simple bus.
    let t = tally.clone();
    let notifications = buses
        .simple()
        .subscribe("notifications")
        .start(handler_fn(move |m: Message| {
            let t = t.clone();
            async move {
                t.notifications.fetch_add(1, Ordering::SeqCst);
                println!("  [notify]   {}", String::from_utf8_lossy(&m.payload));
                Ok::<_, HandleError>(())
            }
        }))
        .await?;

    // The order service: domain events, ordered per order.
    let t = tally.clone();
    let simple = buses.simple().clone();
    let orders = buses
        .domain()
        .subscribe("orders")
        .start(handler_fn(move |e: Event| {
            let (t, simple) = (t.clone(), simple.clone());
            async move { handle(&t, &simple, e).await }
        }))
        .await?;

    // Dead letters: read them back to show the reason.
    let dead: Arc<Mutex<Vec<String>>> = Arc::default();
    let d = dead.clone();
    let dead_letters = buses
        .domain()
        .subscribe("orders.dlq")
        .group("shop-audit")
        .start(handler_fn(move |e: Event| {
            let d = d.clone();
            async move {
                let reason = e
                    .headers
                    .get("dualbus-dlq-reason")
                    .unwrap_or("?")
                    .to_owned();
                println!(
                    "  [dlq]      {} v{} {}: {reason}",
                    e.aggregate_id, e.event_version, e.event_type
                );
                d.lock().await.push(e.aggregate_id.clone());
                Ok::<_, HandleError>(())
            }
        }))
        .await?;

    // Publish three events per order, interleaved across orders.
    let mut published = 0;
    for (version, event_type) in [(1, "OrderCreated"), (2, "OrderPaid"), (3, "OrderShipped")] {
        for order in ORDERS {
            let address = if order == "order-1003" {
                ""
            } else {
                "1 Main St"
            };
            let payload =
                serde_json::json!({ "order": order, "amount": 40, "address": address }).to_string();
            let envelope = Envelope::new(order, event_type, version, payload)?
                .with_content_type("application/json")
                .with_correlation_id(format!("checkout-{order}"));
            buses.domain().publish("orders", &envelope).await?;
            published += 1;
        }
    }
    println!(
        "published {published} domain events for {} orders",
        ORDERS.len()
    );

    // Wait until every event was handled or dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = orders.stats();
        if s.handled + s.dead_lettered == published {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while dead.lock().await.is_empty()
        || tally.notifications.load(Ordering::SeqCst) < tally.handled.load(Ordering::SeqCst)
    {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for notifications and dead letters");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let s = orders.stats();
    let report = orders.shutdown().await;
    drop((notifications, dead_letters));
    buses.close().await?;

    let last = tally.last.lock().await;
    println!();
    println!("summary");
    println!("  published:      {published}");
    println!("  handled:        {}", s.handled);
    println!(
        "  retried:        {} (injected failures: {})",
        s.retried,
        tally.failures_injected.load(Ordering::SeqCst)
    );
    println!(
        "  dead-lettered:  {} {:?}",
        s.dead_lettered,
        dead.lock().await
    );
    println!(
        "  notifications:  {}",
        tally.notifications.load(Ordering::SeqCst)
    );
    println!(
        "  shutdown:       drained {}, abandoned {}, dropped {}",
        report.drained, report.abandoned, report.dropped
    );
    if s.handled + s.dead_lettered != published || s.dead_lettered != 1 || s.retried < 1 {
        bail!("unexpected counts: {s:?}");
    }
    for order in ORDERS {
        let want = if order == "order-1003" { 2 } else { 3 };
        let got = last.get(order).copied().unwrap_or(0);
        if got != want {
            bail!("{order}: last handled version {got}, expected {want}");
        }
    }
    println!(
        "  per-aggregate order verified: every order's events were handled as v1, v2, v3 (order-1003's v3 dead-lettered)"
    );
    Ok(())
}

async fn handle(t: &Tally, simple: &dualbus::SimpleBus, e: Event) -> Result<(), HandleError> {
    // Order check: each event must be the next version of its order.
    {
        let last = t.last.lock().await;
        let prev = last.get(&e.aggregate_id).copied().unwrap_or(0);
        if e.event_version != prev + 1 {
            return Err(HandleError::permanent(Failure(format!(
                "{} v{} arrived after v{prev}",
                e.aggregate_id, e.event_version
            ))));
        }
    }
    let body: serde_json::Value = serde_json::from_slice(&e.payload)?;
    if e.event_type == "OrderShipped" && body["address"].as_str().unwrap_or_default().is_empty() {
        return Err(HandleError::permanent(Failure(
            "shipping refused: no address".into(),
        )));
    }
    if e.event_type == "OrderPaid" {
        // The payment gateway times out once for order-1002: a retryable error.
        if e.aggregate_id == "order-1002" && e.attempt == 1 {
            t.failures_injected.fetch_add(1, Ordering::SeqCst);
            println!(
                "  [orders]   {} v{} {} attempt {}: gateway timeout, will retry",
                e.aggregate_id, e.event_version, e.event_type, e.attempt
            );
            return Err(HandleError::msg("payment gateway timeout"));
        }
    }
    println!(
        "  [orders]   {} v{} {} (attempt {})",
        e.aggregate_id, e.event_version, e.event_type, e.attempt
    );
    t.last
        .lock()
        .await
        .insert(e.aggregate_id.clone(), e.event_version);
    t.handled.fetch_add(1, Ordering::SeqCst);
    simple
        .publish(
            "notifications",
            format!(
                "{} is now {}",
                e.aggregate_id,
                e.event_type.trim_start_matches("Order").to_lowercase()
            ),
        )
        .await?;
    Ok(())
}
