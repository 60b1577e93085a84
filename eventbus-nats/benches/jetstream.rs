//! JetStream: the domain bus against raw async-nats doing the same work, in one run,
//! against one nats-server.
//!
//! 1. Publish with acks: `DomainBus::publish_batch` against plain pipelined `publish`
//!    futures (the same encoded bytes and headers, `Nats-Msg-Id` included, the same window
//!    of acks in flight); and one publish at a time (latency to the server's ack).
//! 2. Consume and ack: a subscription through the keyed pool against a plain pull-consumer
//!    loop that acks every message, both reading the same stored envelopes.
//! 3. Skew: one aggregate gets 1% of the stored events and its handler sleeps 10 ms per
//!    event, with `max_per_key` 20 so that its backlog goes far past the cap: throughput of
//!    the other aggregates with and without the slow one (`-- --only=skew` runs only this).
//!
//! `cargo bench -p dualbus-nats --bench jetstream` starts its own nats-server (file storage
//! in a temporary directory) on a loopback port (the binary from `DUALBUS_NATS_SERVER`,
//! else the one `scripts/nats-server.sh` builds), or uses `DUALBUS_BENCH_NATS_URL`. Add
//! `-- --quick` for a short run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use dualbus_core::pool::PoolConfig;
use dualbus_core::{
    Codec, DomainBus, EncodedMessage, Envelope, Event, HandleError, HandlerFn, HeaderStyle,
    Subscription, handler_fn,
};
use dualbus_nats::jetstream::stream_name;
use dualbus_nats::subject::event_subject;
use dualbus_nats::{JetStream, NatsConfig};
use futures::StreamExt as _;
use support::setup;

mod support;

const WINDOW: usize = 512;
const AGGREGATES: usize = 1000;

fn envelopes(n: usize, size: usize, round: usize) -> Vec<Envelope> {
    let body = Bytes::from(vec![b'x'; size]);
    (0..n)
        .map(|i| {
            let a = format!("agg-{round}-{}", i % AGGREGATES);
            Envelope::unchecked(a, "BenchEvent", (i / AGGREGATES) as u64 + 1, body.clone())
        })
        .collect()
}

/// The bytes and headers the bus would send, with the deduplication id as the bus sets it.
fn wire(envelopes: &[Envelope]) -> Vec<(String, async_nats::HeaderMap, Bytes)> {
    envelopes
        .iter()
        .map(|e| {
            let m: EncodedMessage = Codec::CloudEvents
                .encode(e, HeaderStyle::HyphenPercentEncoded, "bench")
                .unwrap();
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in m.headers.iter() {
                h.insert(k, v);
            }
            if let Some(id) = &m.id {
                h.insert("Nats-Msg-Id", id.as_str());
            }
            (m.key, h, m.payload)
        })
        .collect()
}

fn pct(mut l: Vec<Duration>, p: f64) -> Duration {
    if l.is_empty() {
        return Duration::ZERO;
    }
    l.sort_unstable();
    l[((l.len() - 1) as f64 * p) as usize]
}

async fn transport(url: &str) -> JetStream {
    JetStream::connect(NatsConfig::new([url])).await.unwrap()
}

fn bus(t: JetStream) -> DomainBus {
    DomainBus::builder(t).source("bench").build().unwrap()
}

/// Batch publish through the bus: envelopes per second.
async fn bus_batch(url: &str, topic: &str, es: &[Envelope]) -> f64 {
    let bus = bus(transport(url).await);
    // Create the stream outside the measurement.
    bus.publish(topic, &Envelope::unchecked("warm", "W", 1, "w"))
        .await
        .unwrap();
    let t = Instant::now();
    for chunk in es.chunks(10_000) {
        for r in bus.publish_batch(topic, chunk).await.unwrap() {
            r.unwrap();
        }
    }
    let rate = es.len() as f64 / t.elapsed().as_secs_f64();
    bus.close().await.unwrap();
    rate
}

/// The topic's stream as the bus lays it out, made by the raw client.
async fn raw_stream(js: &jetstream::Context, topic: &str) {
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream_name("DUALBUS_", topic),
        subjects: vec![format!("{topic}.*.*")],
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The same bytes through plain async-nats, pipelined with the same window.
async fn raw_batch(url: &str, topic: &str, es: &[Envelope]) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(65_536)
        .backpressure_on_inflight(true)
        .build(client);
    raw_stream(&js, topic).await;
    let msgs = wire(es);
    let t = Instant::now();
    let mut pending = VecDeque::with_capacity(WINDOW);
    for (key, h, p) in msgs {
        if pending.len() >= WINDOW {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().unwrap();
            ack.await.unwrap();
        }
        let subject = event_subject(topic, 0, &key);
        pending.push_back(js.publish_with_headers(subject, h, p).await.unwrap());
    }
    for ack in pending {
        ack.await.unwrap();
    }
    es.len() as f64 / t.elapsed().as_secs_f64()
}

/// One publish at a time, each waiting for its ack: latencies.
async fn bus_single(url: &str, topic: &str, es: &[Envelope]) -> Vec<Duration> {
    let bus = bus(transport(url).await);
    bus.publish(topic, &Envelope::unchecked("warm", "W", 1, "w"))
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(es.len());
    for e in es {
        let t = Instant::now();
        bus.publish(topic, e).await.unwrap();
        lat.push(t.elapsed());
    }
    bus.close().await.unwrap();
    lat
}

async fn raw_single(url: &str, topic: &str, es: &[Envelope]) -> Vec<Duration> {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    raw_stream(&js, topic).await;
    let mut lat = Vec::with_capacity(es.len());
    for (key, h, p) in wire(es) {
        let t = Instant::now();
        js.publish_with_headers(event_subject(topic, 0, &key), h, p)
            .await
            .unwrap()
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat
}

/// Consume `n` stored envelopes through the keyed pool: envelopes per second.
async fn bus_consume(url: &str, topic: &str, group: &str, n: u64) -> f64 {
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let handler = handler_fn(move |_e: Event| {
        h.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, HandleError>(()))
    });
    let bus = bus(transport(url).await);
    let (took, _) = consume(bus, topic, group, handler, |s| s.stats().acked >= n).await;
    assert!(handled.load(Ordering::Relaxed) >= n);
    n as f64 / took.as_secs_f64()
}

/// Subscribes `bus` to `topic` in `group` with `handler` and waits until `done`. Returns the
/// time taken and the subscription's peak of deferred deliveries; closes the bus.
async fn consume<F, Fut>(
    bus: DomainBus,
    topic: &str,
    group: &str,
    handler: HandlerFn<F>,
    done: impl Fn(&Subscription) -> bool,
) -> (Duration, u64)
where
    F: Fn(Event) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandleError>> + Send + 'static,
{
    let t = Instant::now();
    let sub = bus
        .subscribe(topic)
        .group(group)
        .start(handler)
        .await
        .unwrap();
    while !done(&sub) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let took = t.elapsed();
    let peak = sub.stats().peak_deferred;
    drop(sub);
    bus.close().await.unwrap();
    (took, peak)
}

/// A plain pull consumer acking every message.
async fn raw_consume(url: &str, topic: &str, group: &str, n: u64) -> f64 {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream(stream_name("DUALBUS_", topic)).await.unwrap();
    let t = Instant::now();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(group.to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .unwrap();
    let mut got = 0;
    while got < n {
        let m = messages.next().await.unwrap().unwrap();
        m.ack().await.unwrap();
        got += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `max_per_key` in the skew comparison (the slow aggregate's backlog goes far past it).
const SKEW_CAP: usize = 20;

/// Events where `agg-0` gets 1% and 1,000 other aggregates share the rest.
fn skewed(n: usize) -> Vec<Envelope> {
    let mut versions = std::collections::HashMap::new();
    (0..n)
        .map(|i| {
            let a = if i % 100 == 0 { 0 } else { 1 + (i % 1000) };
            let v = versions.entry(a).or_insert(0u64);
            *v += 1;
            Envelope::unchecked(format!("agg-{a}"), "BenchEvent", *v, r#"{"amount":42}"#)
        })
        .collect()
}

/// Consumes the stored skewed events through the keyed pool; `agg-0`'s handler sleeps
/// 10 ms per event when `slow`. Returns the other aggregates' events per second (until the
/// last of them is handled) and the pool's peak of deferred deliveries.
async fn skew_consume(url: &str, topic: &str, group: &str, others: u64, slow: bool) -> (f64, u64) {
    let bus = DomainBus::builder(transport(url).await)
        .source("bench")
        .pool(PoolConfig {
            max_per_key: SKEW_CAP,
            ..PoolConfig::default()
        })
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let handler = handler_fn(move |e: Event| {
        let h = h.clone();
        async move {
            if e.aggregate_id == "agg-0" {
                if slow {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } else {
                h.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, HandleError>(())
        }
    });
    let (took, peak) = consume(bus, topic, group, handler, |_| {
        handled.load(Ordering::Relaxed) >= others
    })
    .await;
    (others as f64 / took.as_secs_f64(), peak)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only_skew = std::env::args().any(|a| a == "--only=skew");
    let Some((url, _server, rt)) = setup() else {
        return;
    };
    let n = if quick { 20_000 } else { 100_000 };
    let single = if quick { 1_000 } else { 5_000 };
    let rounds = if quick { 1 } else { 5 };
    let version = rt.block_on(async {
        let c = async_nats::connect(url.as_str()).await.unwrap();
        c.server_info().version
    });
    println!(
        "JetStream (file storage), nats-server {version}, {url}, {AGGREGATES} aggregates, CloudEvents headers, median of {rounds} rounds"
    );
    rt.block_on(async {
        let sizes: &[usize] = if only_skew { &[] } else { &[16, 1024] };
        for &size in sizes {
            let (mut b, mut r, mut bs, mut rs, mut bc, mut rc) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for round in 0..rounds {
                let es = envelopes(n, size, round);
                let tb = format!("bench-b-{size}-{round}-{}", std::process::id());
                let tr = format!("bench-r-{size}-{round}-{}", std::process::id());
                b.push(bus_batch(&url, &tb, &es).await);
                r.push(raw_batch(&url, &tr, &es).await);
                let one = envelopes(single, size, round + 100);
                bs.extend(bus_single(&url, &format!("{tb}-1"), &one).await);
                rs.extend(raw_single(&url, &format!("{tr}-1"), &one).await);
                // Both read the envelopes the bus stored (plus its warm-up event).
                let stored = n as u64 + 1;
                bc.push(bus_consume(&url, &tb, "bench-bus", stored).await);
                rc.push(raw_consume(&url, &tb, "bench-raw", stored).await);
            }
            let (b, r, bc, rc) = (median(b), median(r), median(bc), median(rc));
            println!("  {size:>5} B  publish, batch   bus {b:>9.0}/s   raw {r:>9.0}/s   ratio {:.2}x", b / r);
            println!(
                "  {size:>5} B  publish, one     bus p50 {:>8.1?} p99 {:>8.1?}   raw p50 {:>8.1?} p99 {:>8.1?}",
                pct(bs.clone(), 0.5),
                pct(bs, 0.99),
                pct(rs.clone(), 0.5),
                pct(rs, 0.99)
            );
            println!("  {size:>5} B  consume + ack   bus {bc:>9.0}/s   raw {rc:>9.0}/s   ratio {:.2}x", bc / rc);
        }
        let n_skew = if quick { 5_000 } else { 20_000 };
        let evs = skewed(n_skew);
        let others = evs.iter().filter(|e| e.aggregate_id != "agg-0").count() as u64;
        let topic = format!("bench-skew-{}", std::process::id());
        bus_batch(&url, &topic, &evs).await;
        println!(
            "  skew: {n_skew} stored events, agg-0 gets 1% ({}) and sleeps 10 ms per event, max_per_key {SKEW_CAP}",
            n_skew - others as usize
        );
        let (mut fast, mut slow, mut peaks) = (vec![], vec![], vec![]);
        for round in 0..rounds.max(3) {
            fast.push(skew_consume(&url, &topic, &format!("fast-{round}"), others, false).await.0);
            let (rate, peak) = skew_consume(&url, &topic, &format!("slow-{round}"), others, true).await;
            slow.push(rate);
            peaks.push(peak);
        }
        let (fast, slow) = (median(fast), median(slow));
        let peak = peaks.iter().max().copied().unwrap_or(0);
        println!(
            "  skew: others without slow {fast:>9.0}/s, with slow {slow:>9.0}/s: {:.1}% kept; agg-0 up to {peak} deferred ({:.1}x the cap)",
            100.0 * slow / fast,
            peak as f64 / SKEW_CAP as f64
        );
    });
}
