//! The buses against raw baselines doing the same work, in one run.
//!
//! `cargo bench -p dualbus --bench buses` (add `-- --quick` for a short run).
//!
//! 1. simple bus: publish -> handler, vs a raw `tokio::sync::mpsc` loop moving the same
//!    `Message` values;
//! 2. domain bus end to end (encode, memory transport, decode, keyed handler, ack) over
//!    10,000 aggregates, vs hash-to-N mpsc workers that encode and decode the same way;
//! 3. group handover on memory: time from a member crash to the first event handled on a
//!    moved partition, and duplicates per handover;
//! 4. skew: one aggregate gets 1% of the events and its handler sleeps 10 ms per event:
//!    throughput of the other aggregates with and without the slow one, for the keyed pool
//!    (`max_per_key` 20, so that the slow aggregate's backlog goes far past its cap) and
//!    for the hash-to-N baseline;
//! 5. layers: both buses with one pass-through layer on both sides (publish pipeline and
//!    handlers) against the same buses without layers: what the pipeline itself costs
//!    (the request, the envelope's clone, the boxed services).

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dualbus::memory::Memory;
use dualbus::{
    Codec, DomainBus, Envelope, Event, HandleError, HeaderStyle, Message, PoolConfig, SimpleBus,
    handler_fn,
};
use dualbus_core::{InboundMessage, Position};
use tower::layer::util::Identity;

struct Run {
    name: String,
    n: usize,
    elapsed: Duration,
    latencies: Vec<u64>,
    /// The keyed pool's peak of deferred deliveries (0 for baselines).
    peak_deferred: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.n as f64 / self.elapsed.as_secs_f64()
    }
    fn ns_per_msg(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.n as f64
    }
    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut l = self.latencies.clone();
        l.sort_unstable();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_nanos(l[i])
    }
}

/// The run with the median throughput.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

fn report(bus: &Run, raw: &Run) {
    report_as(bus, raw, "bus/raw");
}

fn report_as(bus: &Run, raw: &Run, ratio: &str) {
    for r in [bus, raw] {
        println!(
            "  {:<44} {:>10.0} msg/s  {:>8.0} ns/msg  p50 {:>10.1?}  p99 {:>10.1?}",
            r.name,
            r.rate(),
            r.ns_per_msg(),
            r.pct(0.50),
            r.pct(0.99)
        );
    }
    println!(
        "  ratio {ratio} {:.2}x, overhead {:+.0} ns/msg",
        bus.rate() / raw.rate(),
        bus.ns_per_msg() - raw.ns_per_msg()
    );
}

/// Nanoseconds since `start`, for latency stamps.
fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

struct Stamps {
    start: Instant,
    sent: Vec<AtomicU64>,
    lat: Vec<AtomicU64>,
    done: AtomicUsize,
}

impl Stamps {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            lat: (0..n).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicUsize::new(0),
        })
    }
    fn send(&self, i: usize) {
        self.sent[i].store(now_ns(self.start), Ordering::Relaxed);
    }
    fn recv(&self, i: usize) {
        let l = now_ns(self.start).saturating_sub(self.sent[i].load(Ordering::Relaxed));
        self.lat[i].store(l, Ordering::Relaxed);
        self.done.fetch_add(1, Ordering::Release);
    }
    async fn wait(&self, n: usize) {
        while self.done.load(Ordering::Acquire) < n {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    fn latencies(&self) -> Vec<u64> {
        self.lat.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }
}

fn index(payload: &[u8]) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[..8]);
    u64::from_le_bytes(b) as usize
}

async fn simple_bus(n: usize) -> Run {
    simple_bus_with(n, false).await
}

/// With `layered`, one pass-through layer on both sides.
async fn simple_bus_with(n: usize, layered: bool) -> Run {
    let mut builder = SimpleBus::builder(Memory::new());
    if layered {
        builder = builder.layer(Identity::new());
    }
    let bus = builder.build().unwrap();
    let stamps = Stamps::new(n);
    let s = stamps.clone();
    let sub = bus
        .subscribe("bench")
        .start(handler_fn(move |m: Message| {
            s.recv(index(&m.payload));
            std::future::ready(Ok::<_, HandleError>(()))
        }))
        .await
        .unwrap();
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new("bench", Bytes::from((i as u64).to_le_bytes().to_vec())))
        .collect();
    let t = Instant::now();
    for (i, m) in messages.into_iter().enumerate() {
        stamps.send(i);
        bus.publish_message(m).await.unwrap();
    }
    stamps.wait(n).await;
    let elapsed = t.elapsed();
    drop(sub);
    bus.close().await.unwrap();
    Run {
        name: format!(
            "simple bus (memory) publish -> handler{}",
            if layered { ", 1 layer" } else { "" }
        ),
        n,
        elapsed,
        latencies: stamps.latencies(),
        peak_deferred: 0,
    }
}

async fn simple_raw(n: usize) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(1024);
    let stamps = Stamps::new(n);
    let s = stamps.clone();
    let consumer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            s.recv(index(&m.payload));
        }
    });
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new("bench", Bytes::from((i as u64).to_le_bytes().to_vec())))
        .collect();
    let t = Instant::now();
    for (i, m) in messages.into_iter().enumerate() {
        stamps.send(i);
        tx.send(m).await.unwrap();
    }
    stamps.wait(n).await;
    let elapsed = t.elapsed();
    drop(tx);
    consumer.await.unwrap();
    Run {
        name: "raw tokio mpsc loop".into(),
        n,
        elapsed,
        latencies: stamps.latencies(),
        peak_deferred: 0,
    }
}

fn envelopes(n: usize, aggregates: usize) -> Vec<Envelope> {
    let at = chrono_now();
    (0..n)
        .map(|i| {
            let a = i % aggregates;
            let v = (i / aggregates) as u64 + 1;
            Envelope::unchecked(
                format!("agg-{a}"),
                "BenchEvent",
                v,
                Bytes::from_static(br#"{"amount":42,"note":"bench"}"#),
            )
            .with_event_id(i.to_string())
            .with_occurred_at(at)
            .with_content_type("application/json")
        })
        .collect()
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// How the handler of the domain benchmarks behaves.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// No work.
    Plain,
    /// `agg-0` sleeps 10 ms per event.
    SlowFirst,
}

async fn domain_bus(evs: &[Envelope], load: Load, count_only_others: bool) -> Run {
    domain_bus_with(
        evs,
        load,
        count_only_others,
        PoolConfig::default().max_per_key,
        false,
    )
    .await
}

/// With `layered`, one pass-through layer on both sides.
async fn domain_bus_with(
    evs: &[Envelope],
    load: Load,
    count_only_others: bool,
    max_per_key: usize,
    layered: bool,
) -> Run {
    let n = evs.len();
    let mut builder = DomainBus::builder(Memory::new())
        .source("bench")
        .pool(PoolConfig {
            max_in_flight: 10_000,
            max_per_key,
            ..PoolConfig::default()
        });
    if layered {
        builder = builder.layer(Identity::new());
    }
    let bus = builder.build().unwrap();
    let stamps = Stamps::new(n);
    let s = stamps.clone();
    let sub = bus
        .subscribe("bench")
        .start(handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                let slow = e.aggregate_id == "agg-0";
                if slow && load == Load::SlowFirst {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !(count_only_others && slow) {
                    s.recv(e.event_id.parse().unwrap());
                }
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    let target = if count_only_others {
        evs.iter().filter(|e| e.aggregate_id != "agg-0").count()
    } else {
        n
    };
    let t = Instant::now();
    for (i, e) in evs.iter().enumerate() {
        stamps.send(i);
        bus.publish("bench", e).await.unwrap();
    }
    stamps.wait(target).await;
    let elapsed = t.elapsed();
    let peak_deferred = sub.stats().peak_deferred;
    drop(sub);
    bus.close().await.unwrap();
    let mut latencies = stamps.latencies();
    latencies.retain(|l| *l > 0);
    Run {
        name: format!(
            "domain bus (memory, keyed pool, CloudEvents){}",
            if layered { ", 1 layer" } else { "" }
        ),
        n: target,
        elapsed,
        latencies,
        peak_deferred,
    }
}

/// jxt-core's design: each aggregate hashed to one of `workers` mpsc workers; the same
/// encoding and decoding as the bus, no broker and no acks.
async fn domain_raw(evs: &[Envelope], workers: usize, load: Load, count_only_others: bool) -> Run {
    let n = evs.len();
    let stamps = Stamps::new(n);
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    // The same total buffer as the pool's max_in_flight.
    let per_worker = (10_000 / workers).max(1);
    for _ in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<dualbus_core::EncodedMessage>(per_worker);
        let s = stamps.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let inbound = InboundMessage {
                    topic: "bench".into(),
                    key: Some(m.key),
                    headers: m.headers,
                    payload: m.payload,
                    position: Position {
                        partition: 0,
                        offset: 0,
                    },
                };
                let e = Codec::decode(&inbound).unwrap();
                let slow = e.aggregate_id == "agg-0";
                if slow && load == Load::SlowFirst {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !(count_only_others && slow) {
                    s.recv(e.event_id.parse().unwrap());
                }
            }
        }));
        senders.push(tx);
    }
    let target = if count_only_others {
        evs.iter().filter(|e| e.aggregate_id != "agg-0").count()
    } else {
        n
    };
    let t = Instant::now();
    for (i, e) in evs.iter().enumerate() {
        stamps.send(i);
        let m = Codec::CloudEvents
            .encode(e, HeaderStyle::HyphenPercentEncoded, "bench")
            .unwrap();
        let w = fnv(&m.key) % workers;
        senders[w].send(m).await.unwrap();
    }
    stamps.wait(target).await;
    let elapsed = t.elapsed();
    drop(senders);
    for t in tasks {
        t.await.unwrap();
    }
    let mut latencies = stamps.latencies();
    latencies.retain(|l| *l > 0);
    Run {
        name: format!("raw hash-to-{workers} mpsc workers"),
        n: target,
        elapsed,
        latencies,
        peak_deferred: 0,
    }
}

fn fnv(s: &str) -> usize {
    dualbus_core::partition::partition_for(s, u32::MAX) as usize
}

/// Events where `agg-0` gets 1% and 1,000 other aggregates share the rest.
fn skewed(n: usize) -> Vec<Envelope> {
    let at = chrono_now();
    let mut versions = std::collections::HashMap::new();
    (0..n)
        .map(|i| {
            let a = if i % 100 == 0 { 0 } else { 1 + (i % 1000) };
            let v = versions.entry(a).or_insert(0u64);
            *v += 1;
            Envelope::unchecked(
                format!("agg-{a}"),
                "BenchEvent",
                *v,
                Bytes::from_static(br#"{"amount":42}"#),
            )
            .with_event_id(i.to_string())
            .with_occurred_at(at)
        })
        .collect()
}

/// When a member crashed, and the partitions it owned.
type Crash = (Instant, Vec<u32>);

/// Crash one of two members under load; returns the time from the crash to the first event
/// handled on a partition the crashed member owned, and the events handled twice.
async fn handover() -> (Duration, usize) {
    use std::collections::HashMap;
    let broker =
        Memory::with_config(dualbus::memory::MemoryConfig::default().with_partitions(16)).unwrap();
    let seen: Arc<parking_lot::Mutex<HashMap<(String, u64), usize>>> = Arc::default();
    let crash_at: Arc<parking_lot::Mutex<Option<Crash>>> = Arc::default();
    let first_moved: Arc<parking_lot::Mutex<Option<Duration>>> = Arc::default();
    let member = |moved_probe: bool| {
        let (seen, crash_at, first_moved) = (seen.clone(), crash_at.clone(), first_moved.clone());
        handler_fn(move |e: Event| {
            let (seen, crash_at, first_moved) =
                (seen.clone(), crash_at.clone(), first_moved.clone());
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                *seen
                    .lock()
                    .entry((e.aggregate_id.clone(), e.event_version))
                    .or_insert(0) += 1;
                if moved_probe && let Some((t0, parts)) = &*crash_at.lock() {
                    let mut f = first_moved.lock();
                    if f.is_none() && parts.contains(&e.position.partition) {
                        *f = Some(t0.elapsed());
                    }
                }
                Ok::<_, HandleError>(())
            }
        })
    };
    let victim_bus = DomainBus::builder(broker.connect())
        .source("bench")
        .build()
        .unwrap();
    let survivor_bus = DomainBus::builder(broker.connect())
        .source("bench")
        .build()
        .unwrap();
    let victim = victim_bus
        .subscribe("handover")
        .start(member(false))
        .await
        .unwrap();
    let survivor = survivor_bus
        .subscribe("handover")
        .start(member(true))
        .await
        .unwrap();
    while victim.active_partitions().is_empty() || survivor.active_partitions().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let publisher = DomainBus::builder(broker.connect())
        .source("bench")
        .build()
        .unwrap();
    let aggregates = 200;
    for v in 1..=10u64 {
        for a in 0..aggregates {
            publisher
                .publish(
                    "handover",
                    &Envelope::unchecked(format!("agg-{a}"), "E", v, "{}"),
                )
                .await
                .unwrap();
        }
    }
    // Crash the victim while it has work in flight.
    while seen.lock().len() < aggregates * 3 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let parts = victim.active_partitions();
    *crash_at.lock() = Some((Instant::now(), parts));
    drop(victim);
    while seen.lock().len() < aggregates * 10 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let pause = first_moved.lock().unwrap_or_default();
    let dups = seen.lock().values().map(|n| n - 1).sum();
    drop(survivor);
    for b in [victim_bus, survivor_bus, publisher] {
        b.close().await.unwrap();
    }
    (pause, dups)
}

/// `max_per_key` in the skew comparison: low, so that the slow aggregate's backlog goes far
/// past it (at least 5x) in a short run. `--skew-cap=N` sets another.
const SKEW_CAP: usize = 20;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only=simple|domain|handover|layers|skew` runs one part (for profiling).
    let only = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_owned));
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (n_simple, n_domain, n_skew) = if quick {
        (50_000, 50_000, 5_000)
    } else {
        (500_000, 200_000, 50_000)
    };
    // Each comparison runs this many rounds, alternating, and reports the median of each side.
    let rounds = if quick { 3 } else { 5 };
    println!(
        "dualbus benchmarks ({} worker threads, {}, median of {rounds} rounds)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { "quick" } else { "full" }
    );
    rt.block_on(async {
        if run("simple") {
            println!("\n1. simple bus vs raw mpsc, {n_simple} messages of 8 bytes");
            let (mut raws, mut buses) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                raws.push(simple_raw(n_simple).await);
                buses.push(simple_bus(n_simple).await);
            }
            report(&median(buses), &median(raws));
        }

        if run("domain") {
            println!("\n2. domain bus end to end vs hash-to-N workers, {n_domain} envelopes over 10,000 aggregates");
            let evs = envelopes(n_domain, 10_000);
            let (mut raws, mut buses) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                raws.push(domain_raw(&evs, 64, Load::Plain, false).await);
                buses.push(domain_bus(&evs, Load::Plain, false).await);
            }
            report(&median(buses), &median(raws));
        }
        if run("handover") {
            println!("\n3. group handover on memory: 2 members, 200 aggregates x 10 events, one member crashes mid-stream");
            let mut pauses = Vec::new();
            let mut dups = Vec::new();
            for _ in 0..rounds {
                let (p, d) = handover().await;
                pauses.push(p);
                dups.push(d);
            }
            pauses.sort_unstable();
            dups.sort_unstable();
            println!(
                "  crash -> first event handled on a moved partition: median {:.1?} (min {:.1?}, max {:.1?}); duplicates per handover: median {} (max {})",
                pauses[pauses.len() / 2],
                pauses[0],
                pauses[pauses.len() - 1],
                dups[dups.len() / 2],
                dups[dups.len() - 1]
            );
        }
        if run("layers") {
            println!("\n5. one pass-through layer on both sides of both buses vs none, {n_simple} simple messages, {n_domain} envelopes");
            let evs = envelopes(n_domain, 10_000);
            let mut runs: [Vec<Run>; 4] = Default::default();
            for _ in 0..rounds {
                runs[0].push(simple_bus_with(n_simple, false).await);
                runs[1].push(simple_bus_with(n_simple, true).await);
                let max_per_key = PoolConfig::default().max_per_key;
                runs[2].push(domain_bus_with(&evs, Load::Plain, false, max_per_key, false).await);
                runs[3].push(domain_bus_with(&evs, Load::Plain, false, max_per_key, true).await);
            }
            let [simple_plain, simple_layered, domain_plain, domain_layered] = runs.map(median);
            report_as(&simple_layered, &simple_plain, "layered/plain");
            report_as(&domain_layered, &domain_plain, "layered/plain");
        }
        if !run("skew") {
            return;
        }

        let cap = std::env::args()
            .find_map(|a| a.strip_prefix("--skew-cap=").and_then(|n| n.parse().ok()))
            .unwrap_or(SKEW_CAP);
        println!("\n4. skew: {n_skew} events, agg-0 gets 1% ({}) and sleeps 10 ms per event, max_per_key {cap}; throughput of the others", n_skew / 100);
        let evs = skewed(n_skew);
        let mut runs: [Vec<Run>; 4] = Default::default();
        for _ in 0..rounds {
            runs[0].push(domain_bus_with(&evs, Load::Plain, true, cap, false).await);
            runs[1].push(domain_bus_with(&evs, Load::SlowFirst, true, cap, false).await);
            runs[2].push(domain_raw(&evs, 64, Load::Plain, true).await);
            runs[3].push(domain_raw(&evs, 64, Load::SlowFirst, true).await);
        }
        let [pool_fast, pool_slow, raw_fast, raw_slow] = runs.map(median);
        for (name, fast, slow) in [("keyed pool", &pool_fast, &pool_slow), ("hash-to-64 baseline", &raw_fast, &raw_slow)] {
            println!(
                "  {:<22} others without slow {:>9.0} msg/s, with slow {:>9.0} msg/s: {:>5.1}% kept (p99 {:.1?} -> {:.1?})",
                name,
                fast.rate(),
                slow.rate(),
                100.0 * slow.rate() / fast.rate(),
                fast.pct(0.99),
                slow.pct(0.99)
            );
        }
        println!(
            "  agg-0's backlog past its cap of {cap}: up to {} deferred deliveries ({:.1}x the cap)",
            pool_slow.peak_deferred,
            pool_slow.peak_deferred as f64 / cap as f64
        );
    });
}
