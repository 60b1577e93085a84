//! Kafka: the domain bus against raw rdkafka doing the same work, in one run, against one
//! broker.
//!
//! 1. Publish: `DomainBus::publish_batch` against a `FutureProducer` loop sending the same
//!    key, headers and bytes (the bus's CloudEvents encoding) with the same producer
//!    settings (idempotent, `acks=all`, `linger.ms=5`), every delivery report awaited.
//! 2. Consume and commit: a subscription through the keyed pool (a handler that does
//!    nothing, commits of the completed prefix) against a `StreamConsumer` loop storing
//!    each offset and committing every 500 ms, both reading the same stored records with
//!    `fetch.queue.backoff.ms=10`.
//!
//! Consume rates run from the first record handled to the last (the group join before it
//! is not counted). 16 B and 1 KiB payloads. `cargo bench -p dualbus-kafka --bench kafka` starts its own
//! broker (`scripts/kafka-broker.sh`: Java and the jars `scripts/kafka.sh` fetches), or uses
//! `DUALBUS_BENCH_KAFKA_BOOTSTRAP`. Add `-- --quick` for a short run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

#[path = "../tests/support/broker.rs"]
mod broker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dualbus_core::conformance::unique_topic;
use dualbus_core::{
    Codec, DomainBus, Envelope, Event, HandleError, HeaderStyle, PoolConfig, handler_fn,
};
use dualbus_kafka::rdkafka::ClientConfig;
use dualbus_kafka::rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use dualbus_kafka::rdkafka::message::{Header, OwnedHeaders};
use dualbus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use dualbus_kafka::{Kafka, KafkaConfig};
use futures::StreamExt as _;

const AGGREGATES: usize = 1000;
const PARTITIONS: u32 = 4;

fn envelopes(n: usize, size: usize) -> Vec<Envelope> {
    let body = Bytes::from(vec![b'x'; size]);
    (0..n)
        .map(|i| {
            let a = format!("agg-{}", i % AGGREGATES);
            Envelope::unchecked(a, "BenchEvent", (i / AGGREGATES) as u64 + 1, body.clone())
        })
        .collect()
}

/// The key, headers and bytes the bus sends for `envelopes`.
fn wire(envelopes: &[Envelope]) -> Vec<(String, OwnedHeaders, Bytes)> {
    envelopes
        .iter()
        .map(|e| {
            let m = Codec::CloudEvents
                .encode(e, HeaderStyle::UnderscorePlain, "bench")
                .unwrap();
            let mut h = OwnedHeaders::new_with_capacity(m.headers.len());
            for (k, v) in m.headers.iter() {
                h = h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            (m.key, h, m.payload)
        })
        .collect()
}

fn config(bootstrap: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new([bootstrap]);
    c.topics.partitions = PARTITIONS;
    c.topics.replication = 1;
    c
}

fn raw_producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap()
}

async fn bus_publish(bus: &DomainBus, topic: &str, events: &[Envelope]) -> Duration {
    let t = Instant::now();
    for chunk in events.chunks(10_000) {
        for r in bus.publish_batch(topic, chunk).await.unwrap() {
            r.unwrap();
        }
    }
    t.elapsed()
}

async fn raw_publish(
    p: &FutureProducer,
    topic: &str,
    records: &[(String, OwnedHeaders, Bytes)],
) -> Duration {
    let t = Instant::now();
    for chunk in records.chunks(10_000) {
        let futures: Vec<_> = chunk
            .iter()
            .map(|(k, h, b)| {
                p.send_result(
                    FutureRecord::to(topic)
                        .key(k.as_str())
                        .payload(b.as_ref())
                        .headers(h.clone()),
                )
                .map_err(|(e, _)| e)
                .unwrap()
            })
            .collect();
        for f in futures {
            f.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    t.elapsed()
}

async fn bus_consume(bootstrap: &str, topic: &str, n: u64) -> Duration {
    let bus = DomainBus::builder(Kafka::connect(config(bootstrap)).await.unwrap())
        .source("bench")
        .pool(PoolConfig {
            max_in_flight: 4096,
            max_concurrency: 256,
            ..PoolConfig::default()
        })
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let (h, f) = (handled.clone(), first.clone());
    let sub = bus
        .subscribe(topic)
        .group(format!("bus-{}", topic))
        .start(handler_fn(move |_e: Event| {
            let (h, f) = (h.clone(), f.clone());
            async move {
                f.get_or_init(Instant::now);
                h.fetch_add(1, Ordering::Relaxed);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    while handled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = first.get().expect("handled").elapsed();
    sub.shutdown().await;
    bus.close().await.unwrap();
    took
}

async fn raw_consume(bootstrap: &str, topic: &str, n: u64) -> Duration {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("raw-{topic}"))
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut stream = c.stream();
    let mut t = None;
    let mut seen = 0u64;
    let mut last_commit = Instant::now();
    while seen < n {
        let m = stream.next().await.unwrap().unwrap();
        t.get_or_insert_with(Instant::now);
        c.store_offset_from_message(&m).unwrap();
        seen += 1;
        if last_commit.elapsed() >= Duration::from_millis(500) {
            c.commit_consumer_state(CommitMode::Async).unwrap();
            last_commit = Instant::now();
        }
    }
    c.commit_consumer_state(CommitMode::Sync).unwrap();
    t.expect("consumed").elapsed()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn line(what: &str, n: usize, bus: Duration, raw: Duration) {
    let (b, r) = (rate(n, bus), rate(n, raw));
    let overhead = (bus.as_nanos() as f64 - raw.as_nanos() as f64) / n as f64;
    println!(
        "{what:<28} bus {b:>10.0}/s  raw {r:>10.0}/s  bus/raw {:.2}  overhead {overhead:>7.0} ns/msg",
        b / r
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 20_000 } else { 100_000 };
    let own;
    let bootstrap = match std::env::var("DUALBUS_BENCH_KAFKA_BOOTSTRAP") {
        Ok(b) => b,
        Err(_) => {
            own = tokio::task::spawn_blocking(broker::Broker::start)
                .await
                .unwrap();
            own.bootstrap()
        }
    };
    println!(
        "Kafka at {bootstrap}, {n} messages per run, {PARTITIONS} partitions, {AGGREGATES} aggregates"
    );
    let kafka = Kafka::connect(config(&bootstrap)).await.unwrap();
    let bus = DomainBus::builder(kafka).source("bench").build().unwrap();
    let raw = raw_producer(&bootstrap);
    for size in [16usize, 1024] {
        let events = envelopes(n, size);
        let records = wire(&events);
        let (bus_topic, raw_topic) = (unique_topic("bench-bus"), unique_topic("bench-raw"));
        // Topics created (and warmed) before timing.
        for t in [&bus_topic, &raw_topic] {
            bus.publish_batch(t.as_str(), &events[..10]).await.unwrap();
        }
        // Alternate the order so that neither side always runs on a warmer broker.
        let raw_t = raw_publish(&raw, raw_topic.as_str(), &records).await;
        let bus_t = bus_publish(&bus, bus_topic.as_str(), &events).await;
        line(&format!("publish {size} B"), n, bus_t, raw_t);
        let total = (n + 10) as u64;
        let bus_c = bus_consume(&bootstrap, bus_topic.as_str(), total).await;
        let raw_c = raw_consume(&bootstrap, raw_topic.as_str(), total).await;
        line(&format!("consume + commit {size} B"), n + 10, bus_c, raw_c);
    }
    bus.close().await.unwrap();
}
