//! Domain events on NATS JetStream and notifications on core NATS, against a local server.
//!
//! Start a server with JetStream, then run the example:
//!
//! ```text
//! nats-server -js -sd /tmp/nats-example &      # scripts/nats-server.sh builds one
//! cargo run -p dualbus --features nats --example nats_domain_events
//! ```
//!
//! `NATS_URL` points elsewhere (default `nats://127.0.0.1:4222`). The example publishes
//! three events for each of several orders in one pipelined batch, handles them in order per
//! order, appends one event checked against the order's expected version (and shows the
//! conflict of a stale append), replays one order's history from the stream, and sends a
//! notification per handled event on core NATS. Streams are durable: each run uses fresh
//! order ids.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use dualbus::nats::{JetStream, Nats, NatsConfig};
use dualbus::{Buses, Envelope, ErrorKind, Event, HandleError, Message, handler_fn};
use tokio::sync::Mutex;

const TOPIC: &str = "shop.orders";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Colours only on a terminal: piped or redirected output stays plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let config = NatsConfig::new([url.clone()]).with_name("shop");
    let domain = JetStream::connect(config.clone())
        .await
        .with_context(|| format!("JetStream at {url} (start: nats-server -js)"))?;
    let simple = Nats::connect(config).await?;
    let buses = Buses::builder()
        .source("shop")
        .domain(domain)
        .simple(simple)
        .build()?;

    let run = uuid_like();
    let orders: Vec<String> = (1..=4).map(|i| format!("order-{run}-{i}")).collect();

    // Notifications on core NATS.
    let notified = Arc::new(Mutex::new(0u64));
    let n = notified.clone();
    let notifications = buses
        .simple()
        .subscribe("shop.notifications")
        .start(handler_fn(move |m: Message| {
            let n = n.clone();
            async move {
                *n.lock().await += 1;
                println!("  [notify] {}", String::from_utf8_lossy(&m.payload));
                Ok::<_, HandleError>(())
            }
        }))
        .await?;

    // Order events on JetStream, in order per order.
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let (l, simple) = (last.clone(), buses.simple().clone());
    let subscription = buses
        .domain()
        .subscribe(TOPIC)
        .start(handler_fn(move |e: Event| {
            let (l, simple) = (l.clone(), simple.clone());
            async move {
                let mut last = l.lock().await;
                let prev = last.get(&e.aggregate_id).copied().unwrap_or(0);
                if e.event_version <= prev {
                    // A redelivery of something already handled: nothing to do again.
                    return Ok(());
                }
                if e.event_version != prev + 1 {
                    return Err(HandleError::permanent(dualbus::Failure(format!(
                        "{} v{} after v{prev}",
                        e.aggregate_id, e.event_version
                    ))));
                }
                last.insert(e.aggregate_id.clone(), e.event_version);
                let text = format!("{} is now {}", e.aggregate_id, e.event_type);
                simple
                    .publish("shop.notifications", text)
                    .await
                    .map_err(HandleError::retryable)?;
                Ok(())
            }
        }))
        .await?;

    // Three events per order, one pipelined batch: each order's events stay in order.
    let mut batch = Vec::new();
    for (version, kind) in [(1, "OrderCreated"), (2, "OrderPaid"), (3, "OrderPacked")] {
        for order in &orders {
            batch.push(
                Envelope::new(order.as_str(), kind, version, r#"{"amount":40}"#)?
                    .with_content_type("application/json"),
            );
        }
    }
    let receipts = buses.domain().publish_batch(TOPIC, &batch).await?;
    for r in &receipts {
        if let Err(e) = r {
            bail!("publish: {e}");
        }
    }
    println!("published {} events in one batch", receipts.len());

    // An append checked against the order's version: v4 after v3 succeeds once.
    let first = &orders[0];
    let shipped = Envelope::new(first.as_str(), "OrderShipped", 4, r#"{"carrier":"post"}"#)?;
    buses.domain().append(TOPIC, &shipped, 3).await?;
    let stale = Envelope::new(first.as_str(), "OrderShipped", 4, r#"{"carrier":"other"}"#)?;
    match buses.domain().append(TOPIC, &stale, 3).await {
        Err(e) if e.kind() == ErrorKind::Conflict => println!("stale append refused: {e}"),
        other => bail!("a stale append must conflict, got {other:?}"),
    }

    // Wait for every event (4 orders x 3, plus the append) and its notification.
    let want = receipts.len() + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (subscription.stats().handled as usize) < want || (*notified.lock().await as usize) < want
    {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out: {:?}", subscription.stats());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Event sourcing: read one order's history back from the stream.
    let history = buses.domain().replay(TOPIC, first).await?;
    let kinds: Vec<String> = history
        .iter()
        .map(|e| format!("v{} {}", e.event_version, e.event_type))
        .collect();
    println!("history of {first}: {}", kinds.join(", "));
    if history.len() != 4 {
        bail!(
            "expected 4 events in the history of {first}, found {}",
            history.len()
        );
    }

    let report = subscription.shutdown().await;
    drop(notifications);
    buses.close().await?;
    println!(
        "handled {want} events in order per order; shutdown drained {}, abandoned {}",
        report.drained, report.abandoned
    );
    Ok(())
}

/// A short id that differs between runs (streams are durable).
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos % 0xffff_ffff_ffff)
}
