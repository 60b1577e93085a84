//! Consumer groups on JetStream, in one run:
//!
//! 1. Members: one, two and three members of one group (each its own connection, all in
//!    this process: they share the machine's cores) consume a topic of 12 partitions; the
//!    events are published once the members have settled, and the time runs from the first
//!    publish until every event is acknowledged.
//! 2. Handover: two members consume a steady stream (2,000 events a second); one leaves
//!    gracefully (drain, acknowledge, release): the longest pause of the partitions it
//!    owned (from the leave until the other member handles their next event) and the
//!    events handled twice.
//! 3. Replicas: publish (batch) and consume with one member on one server (R1) and on a
//!    three-server cluster with the stream on three replicas (R3), all on this machine.
//!
//! `cargo bench -p dualbus-nats --bench groups` starts its own servers (see the jetstream
//! benchmark for which binary); `-- --quick` for a short run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualbus_core::{DomainBus, Envelope, Event, HandleError, Subscription, handler_fn};
use dualbus_nats::{JetStream, JetStreamConfig, NatsConfig};
use parking_lot::Mutex;
use support::{setup, start_cluster};

mod support;

const PARTITIONS: u32 = 12;
const AGGREGATES: usize = 600;

fn config(urls: Vec<String>, replicas: usize) -> NatsConfig {
    let mut js = JetStreamConfig::default();
    js.partitions = PARTITIONS;
    js.stream.replicas = replicas;
    js.consumer.lease_ttl = Duration::from_secs(5);
    js.consumer.member_timeout = Duration::from_secs(5);
    NatsConfig::new(urls).with_jetstream(js)
}

async fn bus(urls: &[String], replicas: usize) -> DomainBus {
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = loop {
        match JetStream::connect(config(urls.to_vec(), replicas)).await {
            Ok(t) => break t,
            // A cluster serves JetStream once it elected its leader.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    DomainBus::builder(t).source("bench").build().unwrap()
}

fn envelopes(n: usize, from_version: u64) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let v = from_version + (i / AGGREGATES) as u64;
            Envelope::new(
                format!("agg-{}", i % AGGREGATES),
                "Bench",
                v,
                vec![b'x'; 64],
            )
            .unwrap()
        })
        .collect()
}

/// What the members handled: (aggregate, version, partition, when, member).
type Log = Arc<Mutex<Vec<(String, u64, u32, Instant, usize)>>>;

async fn member(
    urls: &[String],
    topic: &str,
    replicas: usize,
    id: usize,
    log: &Log,
) -> (DomainBus, Subscription) {
    let bus = bus(urls, replicas).await;
    let log = log.clone();
    let sub = bus
        .subscribe(topic)
        .start(handler_fn(move |e: Event| {
            log.lock().push((
                e.aggregate_id.clone(),
                e.event_version,
                e.position.partition,
                Instant::now(),
                id,
            ));
            std::future::ready(Ok::<_, HandleError>(()))
        }))
        .await
        .unwrap();
    (bus, sub)
}

/// Waits until the members together own every partition, each owning some.
async fn settle(subs: &[&Subscription]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owned: Vec<usize> = subs.iter().map(|s| s.active_partitions().len()).collect();
        if owned.iter().sum::<usize>() == PARTITIONS as usize && owned.iter().all(|n| *n > 0) {
            return;
        }
        assert!(Instant::now() < deadline, "never settled: {owned:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn distinct(log: &Log) -> usize {
    log.lock()
        .iter()
        .map(|(a, v, ..)| (a.clone(), *v))
        .collect::<BTreeSet<_>>()
        .len()
}

/// Publishes `n` events once `members` members settled; events per second until all are
/// handled.
async fn members_rate(
    urls: &[String],
    replicas: usize,
    members: usize,
    n: usize,
    round: usize,
) -> f64 {
    let topic = format!(
        "bench-members-{members}-{replicas}-{round}-{}",
        std::process::id()
    );
    let log: Log = Arc::default();
    let mut running = Vec::new();
    for id in 0..members {
        running.push(member(urls, &topic, replicas, id, &log).await);
    }
    settle(&running.iter().map(|(_, s)| s).collect::<Vec<_>>()).await;
    let publisher = bus(urls, replicas).await;
    let es = envelopes(n, 1);
    let t = Instant::now();
    for chunk in es.chunks(5_000) {
        for r in publisher.publish_batch(&topic, chunk).await.unwrap() {
            r.unwrap();
        }
    }
    while distinct(&log) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    for (bus, sub) in running {
        drop(sub);
        bus.close().await.unwrap();
    }
    publisher.close().await.unwrap();
    rate
}

/// Two members and a steady stream; one leaves: the longest pause of its partitions and
/// the events handled twice.
async fn graceful_leave(urls: &[String], round: usize) -> (Duration, usize) {
    let topic = format!("bench-leave-{round}-{}", std::process::id());
    let log: Log = Arc::default();
    let a = member(urls, &topic, 1, 0, &log).await;
    let b = member(urls, &topic, 1, 1, &log).await;
    settle(&[&a.1, &b.1]).await;
    let moved: Vec<u32> = b.1.active_partitions();
    let publisher = bus(urls, 1).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, s, t) = (publisher.clone(), stop.clone(), topic.clone());
    let publishing = tokio::spawn(async move {
        let mut v = 1;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let es = envelopes(AGGREGATES, v);
            for e in &es {
                p.publish(&t, e).await.unwrap();
                // About 2,000 a second.
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            v += 1;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = Instant::now();
    let (bus_b, sub_b) = b;
    drop(sub_b);
    bus_b.close().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.await.unwrap();
    let log = log.lock().clone();
    // Per moved partition: the first event the remaining member handled on it after the
    // leave.
    let mut first: HashMap<u32, Instant> = HashMap::new();
    for (_, _, p, at, m) in &log {
        if *m == 0 && *at >= left && moved.contains(p) {
            first.entry(*p).or_insert(*at);
        }
    }
    let pause = moved
        .iter()
        .map(|p| {
            first
                .get(p)
                .map_or(Duration::MAX, |t| t.duration_since(left))
        })
        .max()
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let twice = log
        .iter()
        .filter(|(a, v, ..)| !seen.insert((a.clone(), *v)))
        .count();
    let (bus_a, sub_a) = a;
    drop(sub_a);
    bus_a.close().await.unwrap();
    publisher.close().await.unwrap();
    (pause, twice)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Some((url, _server, rt)) = setup() else {
        return;
    };
    let urls = vec![url.clone()];
    let n = if quick { 12_000 } else { 48_000 };
    let rounds = if quick { 1 } else { 3 };
    println!(
        "consumer groups on JetStream (file storage), {url}, {PARTITIONS} partitions, {AGGREGATES} aggregates, 64 B payloads, median of {rounds} rounds; every member and server on this machine"
    );
    rt.block_on(async {
        let mut one = 0.0;
        for members in 1..=3 {
            let mut rates = Vec::new();
            for round in 0..rounds {
                rates.push(members_rate(&urls, 1, members, n, round).await);
            }
            let rate = median(rates);
            if members == 1 {
                one = rate;
            }
            println!(
                "  {members} member(s): {rate:>8.0} events/s end to end ({:.2}x one member)",
                rate / one
            );
        }
        let mut pauses = Vec::new();
        let mut twice = Vec::new();
        for round in 0..rounds {
            let (p, t) = graceful_leave(&urls, round).await;
            pauses.push(p);
            twice.push(t);
        }
        pauses.sort();
        println!(
            "  graceful leave (2 members, ~2,000 events/s): longest pause of the moved partitions {:?} (median of {rounds}; all {pauses:?}), events handled twice {twice:?}",
            pauses[pauses.len() / 2]
        );
    });
    let Some((cluster, _servers)) = start_cluster() else {
        println!("  no cluster: R3 skipped");
        return;
    };
    rt.block_on(async {
        let n = if quick { 10_000 } else { 30_000 };
        let mut r1 = Vec::new();
        let mut r3 = Vec::new();
        for round in 0..rounds {
            r1.push(members_rate(&urls, 1, 1, n, 100 + round).await);
            r3.push(members_rate(&cluster, 3, 1, n, 100 + round).await);
        }
        let (r1, r3) = (median(r1), median(r3));
        println!(
            "  replicas, one member, end to end: R1 {r1:>8.0} events/s, R3 {r3:>8.0} events/s ({:.2}x)",
            r3 / r1
        );
    });
}
