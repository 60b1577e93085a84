//! Replicas of one service sharing a topic through a consumer group on NATS JetStream,
//! each in its own process: start it several times, kill one, start another, and watch the
//! partitions move while every order's events stay in order.
//!
//! ```text
//! nats-server -js -sd /tmp/nats-scale &        # scripts/nats-server.sh builds one
//! cargo build -p dualbus --features nats --example nats_scale_out
//! ex=target/debug/examples/nats_scale_out
//! $ex replica a &  $ex replica b &  $ex replica c &
//! $ex publish 3000 &                            # 200 events a second over 24 orders
//! kill -9 %2                                    # replica b dies mid-stream
//! $ex replica d &                               # a new replica takes its share
//! ```
//!
//! Each replica prints the partitions it takes over and gives back, and checks every event
//! against a ledger all replicas share (a key-value bucket holding the last version handled
//! of each order): an event more than one past the last is a broken order, printed and
//! counted; one at or below it is a redelivery (at-least-once: the events a killed replica
//! handled but had not acknowledged). `publish N` publishes N events, then waits until the
//! ledger shows every order complete and prints the verdict. `replica NAME --idle SECS`
//! stops after SECS without an event. `NATS_URL` points elsewhere (default
//! `nats://127.0.0.1:4222`).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dualbus::nats::async_nats::jetstream::kv;
use dualbus::nats::{JetStream, NatsConfig};
use dualbus::{
    DomainBus, Envelope, Event, HandleError, PartitionState, PoolEvent, PoolObserver, handler_fn,
};

const TOPIC: &str = "scale.orders";
const GROUP: &str = "billing";
const ORDERS: u64 = 24;
const LEDGER: &str = "scale-ledger";

async fn connect() -> anyhow::Result<JetStream> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let mut config = NatsConfig::new([url.clone()]);
    // Quick failover for the demonstration: a dead replica's partitions move about three
    // seconds after it died.
    config.jetstream.consumer.lease_ttl = Duration::from_secs(3);
    config.jetstream.consumer.member_timeout = Duration::from_secs(3);
    config.jetstream.partitions = 8;
    JetStream::connect(config)
        .await
        .with_context(|| format!("JetStream at {url} (start: nats-server -js)"))
}

async fn ledger(js: &JetStream) -> anyhow::Result<kv::Store> {
    let context = js.context();
    Ok(match context.get_key_value(LEDGER).await {
        Ok(store) => store,
        Err(_) => {
            context
                .create_key_value(kv::Config {
                    bucket: LEDGER.to_owned(),
                    history: 1,
                    ..kv::Config::default()
                })
                .await?
        }
    })
}

/// The last version of `order` in the ledger (0 before its first event).
async fn last_version(ledger: &kv::Store, order: &str) -> anyhow::Result<u64> {
    Ok(match ledger.get(order).await? {
        Some(v) => std::str::from_utf8(&v)?.parse()?,
        None => 0,
    })
}

/// Prints a replica's partition moves.
struct Moves(String);

impl PoolObserver for Moves {
    fn on_event(&self, event: &PoolEvent<'_>) {
        if let PoolEvent::Partition {
            partition,
            epoch,
            state,
        } = event
        {
            let what = match state {
                PartitionState::Active => format!(
                    "owns partition {partition} (epoch {epoch}), rewound to its first unacknowledged event"
                ),
                PartitionState::Draining => format!("hands partition {partition} over: draining"),
                PartitionState::Revoked => format!("released partition {partition}"),
                PartitionState::Lost => format!("lost partition {partition}"),
                _ => return,
            };
            println!("[{}] {what}", self.0);
        }
    }
}

#[derive(Default)]
struct Counts {
    handled: AtomicU64,
    broken: AtomicU64,
    redeliveries: AtomicU64,
}

async fn replica(name: String, idle: Option<Duration>) -> anyhow::Result<()> {
    let js = connect().await?;
    let ledger = ledger(&js).await?;
    let bus = DomainBus::builder(js).source(GROUP).build()?;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let who = name.clone();
    let sub = bus
        .subscribe(TOPIC)
        .observer(Arc::new(Moves(name.clone())))
        .start(handler_fn(move |e: Event| {
            let (ledger, counts, who) = (ledger.clone(), c.clone(), who.clone());
            async move {
                let order = e.aggregate_id.clone();
                let last = last_version(&ledger, &order)
                    .await
                    .map_err(|err| HandleError::msg(format!("reading the ledger: {err}")))?;
                let v = e.event_version;
                if v > last + 1 {
                    counts.broken.fetch_add(1, Ordering::SeqCst);
                    println!("[{who}] ORDER BROKEN: {order} v{v} after v{last}");
                } else if v <= last {
                    counts.redeliveries.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                ledger
                    .put(&order, v.to_string().into())
                    .await
                    .map_err(|err| HandleError::msg(format!("writing the ledger: {err}")))?;
                let n = counts.handled.fetch_add(1, Ordering::SeqCst) + 1;
                if n % 500 == 0 {
                    println!("[{who}] handled {n} events");
                }
                Ok::<_, HandleError>(())
            }
        }))
        .await?;
    println!("[{name}] joined group {GROUP} on {TOPIC}");
    let mut last = 0;
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now =
            counts.handled.load(Ordering::SeqCst) + counts.redeliveries.load(Ordering::SeqCst);
        quiet = if now == last {
            quiet + Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        last = now;
        if idle.is_some_and(|idle| quiet >= idle) {
            break;
        }
    }
    // A graceful leave: the partitions are drained, acknowledged and released.
    drop(sub);
    bus.close().await?;
    println!(
        "[{name}] done: handled {}, broken orders {}, redeliveries {}",
        counts.handled.load(Ordering::SeqCst),
        counts.broken.load(Ordering::SeqCst),
        counts.redeliveries.load(Ordering::SeqCst)
    );
    Ok(())
}

async fn publish(events: u64, rate: u64) -> anyhow::Result<()> {
    let js = connect().await?;
    let ledger = ledger(&js).await?;
    let bus = DomainBus::builder(js).source("checkout").build()?;
    // Fresh order ids for every run: the stream and the ledger are durable.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let order = |i: u64| format!("o-{run}-{i:02}");
    let pause = Duration::from_secs(1) / u32::try_from(rate.max(1))?;
    for n in 0..events {
        let (i, v) = (n % ORDERS, n / ORDERS + 1);
        let e = Envelope::new(order(i), "OrderUpdated", v, format!(r#"{{"step":{v}}}"#))?;
        bus.publish(TOPIC, &e).await?;
        tokio::time::sleep(pause).await;
    }
    println!("published {events} events over {ORDERS} orders");
    let want = |i: u64| events / ORDERS + u64::from(i < events % ORDERS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut done = 0;
        for i in 0..ORDERS {
            if last_version(&ledger, &order(i)).await? == want(i) {
                done += 1;
            }
        }
        if done == ORDERS {
            println!("all {events} events handled: every order complete in the ledger");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "after two minutes, {done} of {ORDERS} orders are complete (are replicas running?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> anyhow::Result<Option<u64>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .with_context(|| format!("{name} needs a number"))?
                    .parse()?,
            )),
            None => Ok(None),
        }
    };
    match args.first().map(String::as_str) {
        Some("replica") => {
            let name = args.get(1).context("replica NAME")?.clone();
            replica(name, flag("--idle")?.map(Duration::from_secs)).await
        }
        Some("publish") => {
            let events = args.get(1).context("publish N")?.parse()?;
            publish(events, flag("--rate")?.unwrap_or(200)).await
        }
        _ => bail!(
            "usage: nats_scale_out replica NAME [--idle SECS] | publish N [--rate PER_SECOND]"
        ),
    }
}
