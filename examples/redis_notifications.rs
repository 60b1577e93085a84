//! Domain events on Redis Streams (or NATS JetStream), notifications on Redis pub/sub: the
//! seed's shape, wired from one configuration.
//!
//! Start a server, then run the example:
//!
//! ```text
//! redis-server --port 6379 --save "" &         # Debian: apt-get install redis-server
//! cargo run -p dualbus --features nats,redis --example redis_notifications
//! ```
//!
//! With `-- --domain nats` the domain events go to NATS JetStream instead (start
//! `nats-server -js -sd /tmp/nats-example &`; `scripts/nats-server.sh` builds one).
//! `REDIS_URL` and `NATS_URL` point elsewhere (defaults `redis://127.0.0.1:6379`,
//! `nats://127.0.0.1:4222`). Each handled order event sends a notification on Redis
//! pub/sub; a price lookup goes out as a request and is answered by a responder on Redis;
//! and a notification published by another Redis client (a plain `PUBLISH`, no dualbus
//! frame) reaches the same subscriber without headers.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use dualbus::{Buses, Config, Envelope, Event, HandleError, Headers, Message, handler_fn};

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
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let args: Vec<String> = std::env::args().collect();
    let on_nats = args
        .windows(2)
        .any(|w| w[0] == "--domain" && w[1] == "nats");
    let domain = if on_nats {
        format!("  type: nats\n  nats: {{ urls: [\"{nats}\"] }}\n")
    } else {
        format!("  type: redis\n  group: {{ partitions: 4 }}\n  redis: {{ url: \"{redis}\" }}\n")
    };
    let config = Config::from_yaml(&format!(
        "domain:\n  source: shop\n{domain}simple:\n  type: redis\n  redis: {{ url: \"{redis}\" }}\n"
    ))?;
    let store = if on_nats {
        format!("NATS JetStream at {nats}")
    } else {
        format!("Redis Streams at {redis}")
    };
    let buses = Buses::from_config(&config)
        .await
        .with_context(|| format!("{store} and Redis pub/sub at {redis}"))?;
    println!("domain events on {store}, notifications on Redis pub/sub");

    // Notifications on Redis pub/sub.
    let notified = Arc::new(AtomicU64::new(0));
    let n = notified.clone();
    let notifications = buses
        .simple()
        .subscribe("shop.notifications")
        .start(handler_fn(move |m: Message| {
            let n = n.clone();
            async move {
                n.fetch_add(1, Ordering::Relaxed);
                let from = m.headers.get("x-from").unwrap_or("another client");
                println!(
                    "  [notify, from {from}] {}",
                    String::from_utf8_lossy(&m.payload)
                );
                Ok::<_, HandleError>(())
            }
        }))
        .await?;

    // A price service answering requests on Redis (one responder: pub/sub has no queue
    // groups).
    let _prices = buses
        .simple()
        .serve(
            "shop.prices",
            None,
            handler_fn(|m: Message| async move {
                let item = String::from_utf8_lossy(&m.payload).into_owned();
                Ok::<_, HandleError>(Bytes::from(format!("{item}: 40 EUR")))
            }),
        )
        .await?;

    // Order events; each handled one is announced on Redis pub/sub.
    let simple = buses.simple().clone();
    let subscription = buses
        .domain()
        .subscribe(TOPIC)
        .start(handler_fn(move |e: Event| {
            let simple = simple.clone();
            async move {
                let mut h = Headers::new();
                h.insert("x-from", "shop");
                let m = Message::new(
                    "shop.notifications",
                    format!("{} v{}: {}", e.aggregate_id, e.event_version, e.event_type),
                )
                .with_headers(h);
                simple
                    .publish_message(m)
                    .await
                    .map_err(HandleError::retryable)?;
                Ok(())
            }
        }))
        .await?;

    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or_default();
    let order = format!("order-{run}");
    let batch = vec![
        Envelope::new(order.as_str(), "OrderCreated", 1, r#"{"item":"teapot"}"#)?,
        Envelope::new(order.as_str(), "OrderPaid", 2, r#"{"amount":40}"#)?,
    ];
    for r in buses.domain().publish_batch(TOPIC, &batch).await? {
        r?;
    }
    let price = buses
        .simple()
        .request("shop.prices", "teapot", Duration::from_secs(5))
        .await?;
    println!(
        "price lookup over Redis: {}",
        String::from_utf8_lossy(&price.payload)
    );

    // Another Redis client publishes a plain payload (no dualbus frame).
    let client = dualbus::redis::redis::Client::open(redis.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let _: i64 = dualbus::redis::redis::cmd("PUBLISH")
        .arg("shop.notifications")
        .arg("restock: teapots are back")
        .query_async(&mut c)
        .await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while notified.load(Ordering::Relaxed) < 3 {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "timed out: {} notifications, {:?}",
                notified.load(Ordering::Relaxed),
                subscription.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscription.shutdown().await;
    drop(notifications);
    buses.close().await?;
    println!("2 order events handled in order, 3 notifications received on Redis pub/sub");
    Ok(())
}
