//! Event sourcing on Kafka: bank accounts whose events are appended per account, two group
//! members sharing the topic's partitions, and each account's balance rebuilt by replay.
//!
//! Start a broker, then run the example:
//!
//! ```text
//! scripts/kafka-broker.sh /tmp/kafka-example 9092 9093     # Apache Kafka 4.4 from Maven Central
//! cargo run -p dualbus --features kafka --example kafka_event_sourcing
//! ```
//!
//! `KAFKA_BOOTSTRAP` points elsewhere (default `127.0.0.1:9092`). The topic is created with
//! 6 partitions and `retention.ms=-1` (event sourcing keeps every event). Each account's
//! events are published in order (one batch); two members of the group `ledger` split the
//! partitions and project balances, each account's events strictly in order on whichever
//! member owns its partition; then one account's state is rebuilt from its history alone.
//! Topics are durable: each run uses fresh account ids.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use dualbus::kafka::{Forever, Kafka, KafkaConfig, TopicRetention};
use dualbus::{DomainBus, Envelope, Event, HandleError, handler_fn};
use parking_lot::Mutex;

const TOPIC: &str = "bank.accounts";

/// An account event's payload: a signed amount in cents.
fn amount(e: &[u8]) -> anyhow::Result<i64> {
    let v: serde_json::Value = serde_json::from_slice(e)?;
    v["cents"].as_i64().context("no cents")
}

/// The read model both members write (a table in a shared database in a real service):
/// per account, the last version applied and the balance.
type Projection = Arc<Mutex<HashMap<String, (u64, i64)>>>;

async fn member(
    config: &KafkaConfig,
    name: &str,
    projection: Projection,
) -> anyhow::Result<(DomainBus, dualbus::Subscription)> {
    let bus = DomainBus::builder(Kafka::connect(config.clone()).await?)
        .source("bank")
        .build()?;
    let name = name.to_owned();
    let subscription = bus
        .subscribe(TOPIC)
        .group("ledger")
        .start(handler_fn(move |e: Event| {
            let (projection, name) = (projection.clone(), name.clone());
            async move {
                let cents = amount(&e.payload).map_err(HandleError::permanent)?;
                let mut p = projection.lock();
                let (version, balance) = p.get(&e.aggregate_id).copied().unwrap_or((0, 0));
                if e.event_version <= version {
                    return Ok(()); // handled before a handover: nothing to do again
                }
                if e.event_version != version + 1 {
                    return Err(HandleError::permanent(dualbus::Failure(format!(
                        "{name}: {} v{} after v{version}",
                        e.aggregate_id, e.event_version
                    ))));
                }
                p.insert(e.aggregate_id.clone(), (e.event_version, balance + cents));
                Ok(())
            }
        }))
        .await?;
    Ok((bus, subscription))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let mut config = KafkaConfig::new([bootstrap.clone()]);
    config.topics.partitions = 6;
    config.topics.retention = Some(TopicRetention::Forever(Forever::Forever));
    config.producer.linger = Duration::from_millis(1);

    let writer = DomainBus::builder(
        Kafka::connect(config.clone())
            .await
            .with_context(|| format!("Kafka at {bootstrap} (start: scripts/kafka-broker.sh)"))?,
    )
    .source("bank")
    .build()?;

    // Two members of the group `ledger` share the topic's 6 partitions and one read model.
    let projection: Projection = Arc::default();
    let (bus_a, sub_a) = member(&config, "a", projection.clone()).await?;
    let (bus_b, sub_b) = member(&config, "b", projection.clone()).await?;

    // Ten accounts, twenty events each, appended in order per account.
    let run = run_id();
    let accounts: Vec<String> = (0..10).map(|i| format!("acct-{run}-{i}")).collect();
    let mut events = Vec::new();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for version in 1..=20u64 {
        for (i, account) in accounts.iter().enumerate() {
            let cents = if version % 4 == 0 {
                -300
            } else {
                100 * (i as i64 + 1)
            };
            *expected.entry(account.clone()).or_default() += cents;
            let kind = if cents < 0 { "Withdrawn" } else { "Deposited" };
            events.push(
                Envelope::new(
                    account.as_str(),
                    kind,
                    version,
                    format!(r#"{{"cents":{cents}}}"#),
                )?
                .with_content_type("application/json"),
            );
        }
    }
    for r in writer.publish_batch(TOPIC, &events).await? {
        r?;
    }
    println!(
        "appended {} events for {} accounts",
        events.len(),
        accounts.len()
    );

    // Wait until every account reached version 20.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = accounts
            .iter()
            .all(|acct| projection.lock().get(acct).is_some_and(|(v, _)| *v == 20));
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out: a {:?}, b {:?}", sub_a.stats(), sub_b.stats());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (na, nb) = (sub_a.stats().handled, sub_b.stats().handled);
    println!("member a handled {na} events, member b {nb} (the group split the partitions)");
    for acct in &accounts {
        let (_, balance) = projection.lock().get(acct).copied().context("projected")?;
        if balance != expected[acct] {
            bail!("{acct}: projected {balance}, expected {}", expected[acct]);
        }
    }
    println!("every projected balance matches the events appended");

    // Event sourcing: rebuild one account from its history alone.
    let account = &accounts[3];
    let history = writer.replay(TOPIC, account).await?;
    let mut balance = 0;
    for (i, e) in history.iter().enumerate() {
        if e.event_version != i as u64 + 1 {
            bail!("history out of order at {i}: v{}", e.event_version);
        }
        balance += amount(&e.payload)?;
    }
    println!(
        "rebuilt {account} from {} events: balance {balance} cents",
        history.len()
    );
    if balance != expected[account] || history.len() != 20 {
        bail!("replay gave {balance} over {} events", history.len());
    }

    sub_a.shutdown().await;
    sub_b.shutdown().await;
    bus_a.close().await?;
    bus_b.close().await?;
    writer.close().await?;
    Ok(())
}

/// A short id that differs between runs (topics are durable).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos % 0xffff_ffff_ffff)
}
