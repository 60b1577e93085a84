//! Core NATS: the simple bus against raw async-nats sending the same bytes and headers, in
//! one run, against one nats-server.
//!
//! `cargo bench -p dualbus-nats --bench core` starts its own nats-server on a loopback port
//! (the binary from `DUALBUS_NATS_SERVER`, else the one `scripts/nats-server.sh` builds), or
//! uses `DUALBUS_BENCH_NATS_URL`. Add `-- --quick` for a short run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dualbus_core::{HandleError, Headers, Message, SimpleBus, handler_fn};
use dualbus_nats::{Nats, NatsConfig};
use futures::StreamExt as _;
use support::setup;

mod support;

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
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn recv(&self, payload: &[u8]) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[..8]);
        let i = u64::from_le_bytes(b) as usize;
        self.lat[i].store(
            self.now()
                .saturating_sub(self.sent[i].load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.done.fetch_add(1, Ordering::Release);
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l: Vec<u64> = self
            .lat
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|x| *x > 0)
            .collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        Duration::from_nanos(l[((l.len() - 1) as f64 * p) as usize])
    }
}

fn payload(i: usize, size: usize) -> Bytes {
    let mut v = vec![0u8; size.max(8)];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

fn headers() -> Headers {
    let mut h = Headers::new();
    h.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    h.insert("x-tenant", "42");
    h
}

/// Waits for `n` deliveries; core NATS is at-most-once, so a slow consumer may lose some:
/// stop after a quiet second and report what arrived.
async fn wait(stamps: &Stamps, n: usize) -> usize {
    let mut last = 0;
    let mut quiet = Instant::now();
    loop {
        let d = stamps.done.load(Ordering::Acquire);
        if d >= n {
            return d;
        }
        if d != last {
            last = d;
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(1) {
            return d;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn raw(url: &str, n: usize, size: usize) -> (Duration, usize, Arc<Stamps>) {
    let client = async_nats::connect(url).await.unwrap();
    let subject = format!("bench.raw.{size}");
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    let stamps = Stamps::new(n);
    let s = stamps.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            s.recv(&m.payload);
        }
    });
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers().iter() {
        map.insert(k, v);
    }
    let payloads: Vec<Bytes> = (0..n).map(|i| payload(i, size)).collect();
    let t = Instant::now();
    for (i, p) in payloads.into_iter().enumerate() {
        stamps.sent[i].store(stamps.now(), Ordering::Relaxed);
        client
            .publish_with_headers(subject.clone(), map.clone(), p)
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let got = wait(&stamps, n).await;
    let elapsed = t.elapsed();
    reader.abort();
    (elapsed, got, stamps)
}

async fn bus(url: &str, n: usize, size: usize) -> (Duration, usize, Arc<Stamps>) {
    let nats = Nats::connect(NatsConfig::new([url])).await.unwrap();
    let bus = SimpleBus::builder(nats).build().unwrap();
    let topic = format!("bench.bus.{size}");
    let stamps = Stamps::new(n);
    let s = stamps.clone();
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |m: Message| {
            s.recv(&m.payload);
            std::future::ready(Ok::<_, HandleError>(()))
        }))
        .await
        .unwrap();
    let h = headers();
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(topic.as_str(), payload(i, size)).with_headers(h.clone()))
        .collect();
    let t = Instant::now();
    for (i, m) in messages.into_iter().enumerate() {
        stamps.sent[i].store(stamps.now(), Ordering::Relaxed);
        bus.publish_message(m).await.unwrap();
    }
    let got = wait(&stamps, n).await;
    let elapsed = t.elapsed();
    drop(sub);
    bus.close().await.unwrap();
    (elapsed, got, stamps)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Some((url, _server, rt)) = setup() else {
        return;
    };
    let n = if quick { 20_000 } else { 100_000 };
    let rounds = if quick { 1 } else { 5 };
    println!(
        "core NATS publish -> subscribe, {n} messages with 2 headers, {url}, median of {rounds} rounds"
    );
    rt.block_on(async {
        for size in [16usize, 1024] {
            let mut raws = Vec::new();
            let mut buses = Vec::new();
            for _ in 0..rounds {
                raws.push(raw(&url, n, size).await);
                buses.push(bus(&url, n, size).await);
            }
            raws.sort_by_key(|r| r.0);
            buses.sort_by_key(|r| r.0);
            let (r, b) = (&raws[rounds / 2], &buses[rounds / 2]);
            let rate = |x: &(Duration, usize, Arc<Stamps>)| x.1 as f64 / x.0.as_secs_f64();
            for (name, x) in [("bus (SimpleBus on Nats)", b), ("raw async-nats", r)] {
                println!(
                    "  {size:>5} B  {name:<24} {:>9.0} msg/s  delivered {}/{n}  p50 {:>9.1?}  p99 {:>9.1?}",
                    rate(x),
                    x.1,
                    x.2.pct(0.5),
                    x.2.pct(0.99)
                );
            }
            println!("  {size:>5} B  ratio bus/raw {:.2}x", rate(b) / rate(r));
        }
    });
}
