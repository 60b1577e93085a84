//! Redis: both buses against the raw `redis` crate doing the same work, in one run,
//! against one server.
//!
//! Pub/sub:
//! Both sides publish the same payloads to a channel, 256 publishes in flight at a time on
//! one multiplexed connection, and count what one subscriber receives; the rate runs from
//! the first publish to the last message received. Bus: `SimpleBus::publish_message` (the
//! publish pipeline, the frame with one header) and a subscription whose handler counts.
//! Raw: `PUBLISH` of the payload with the same header in the same frame, and a RESP3
//! connection whose pushes are counted.
//!
//! Streams (one partition per topic here, so that the raw loop reads one stream as the
//! bus's members do):
//!
//! 1. Publish: `DomainBus::publish_batch` in chunks of 10,000 (CloudEvents encoding, the
//!    publish script: `XADD` and the aggregate's last entry) against pipelined `XADD`s of
//!    the same fields, encoded before the clock starts; and the bus with
//!    `streams.track_last` off (a bare `XADD`, no script) against the same raw run.
//! 2. Consume and acknowledge: a subscription through the keyed pool (a handler that does
//!    nothing) against a loop of `XREADGROUP COUNT 256` and one pipelined `XACK` per batch,
//!    both reading the same stored entries as a new group.
//!
//! 16 B and 1 KiB payloads. `cargo bench -p dualbus-redis --bench redis` starts its own
//! `redis-server` (from `PATH`), or uses `DUALBUS_BENCH_REDIS_URL`. Add `-- --quick` for a
//! short run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dualbus_core::conformance::unique_topic;
use dualbus_core::{
    Codec, DomainBus, DomainTransport as _, Envelope, Event, HandleError, Headers, Message,
    PoolConfig, SimpleBus, handler_fn,
};
use dualbus_redis::streams::{KEY_FIELD, PAYLOAD_FIELD};
use dualbus_redis::{RedisConfig, RedisPubSub, RedisStreams, frame};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use redis::aio::ConnectionManagerConfig;

const IN_FLIGHT: usize = 256;

fn headers() -> Headers {
    let mut h = Headers::new();
    h.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    h
}

async fn wait_count(count: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "received {} of {n}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn bus_run(url: &str, channel: &str, n: u64, payload: Bytes) -> Duration {
    let t = RedisPubSub::connect(RedisConfig::new(url)).await.unwrap();
    let bus = SimpleBus::builder(t.clone()).build().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let _sub = bus
        .subscribe(channel)
        .start(handler_fn(move |_m: Message| {
            c.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandleError>(()) }
        }))
        .await
        .unwrap();
    let h = headers();
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        if pending.len() >= IN_FLIGHT {
            let r: dualbus_core::Result<()> = pending.next().await.unwrap();
            r.unwrap();
        }
        let m = Message::new(channel, payload.clone()).with_headers(h.clone());
        pending.push(bus.publish_message(m));
    }
    while let Some(r) = pending.next().await {
        r.unwrap();
    }
    wait_count(&count, n).await;
    let took = start.elapsed();
    assert_eq!(t.dropped(), 0);
    bus.close().await.unwrap();
    took
}

/// Which raw publishing connection.
#[derive(Clone, Copy)]
enum Raw {
    /// A multiplexed connection: no reconnection, no reply timeout.
    Multiplexed,
    /// A connection manager with the bus's reply timeout (5 s) and reconnection, as the
    /// bus publishes.
    Manager,
}

async fn raw_run(url: &str, channel: &str, n: u64, payload: Bytes, raw: Raw) -> Duration {
    let client = redis::Client::open(format!("{url}?protocol=resp3")).unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let mut sub = client
        .get_connection_manager_with_config(ConnectionManagerConfig::new().set_push_sender(
            move |p: redis::PushInfo| {
                if p.kind == redis::PushKind::Message {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), redis::aio::SendError>(())
            },
        ))
        .await
        .unwrap();
    sub.subscribe(channel).await.unwrap();
    let framed = frame::encode(&headers(), None, &payload).unwrap();
    match raw {
        Raw::Multiplexed => {
            let publisher = client.get_multiplexed_async_connection().await.unwrap();
            raw_publish(publisher, channel, n, framed, &count).await
        }
        Raw::Manager => {
            let c =
                ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
            let publisher = client.get_connection_manager_with_config(c).await.unwrap();
            raw_publish(publisher, channel, n, framed, &count).await
        }
    }
}

async fn raw_publish<C: redis::aio::ConnectionLike + Clone + Send + 'static>(
    publisher: C,
    channel: &str,
    n: u64,
    framed: Bytes,
    count: &AtomicU64,
) -> Duration {
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        if pending.len() >= IN_FLIGHT {
            let r: redis::RedisResult<i64> = pending.next().await.unwrap();
            r.unwrap();
        }
        let mut p = publisher.clone();
        let bytes = framed.clone();
        let ch = channel.to_owned();
        pending.push(async move {
            redis::cmd("PUBLISH")
                .arg(ch)
                .arg(bytes.as_ref())
                .query_async::<i64>(&mut p)
                .await
        });
    }
    while let Some(r) = pending.next().await {
        r.unwrap();
    }
    wait_count(count, n).await;
    start.elapsed()
}

const AGGREGATES: usize = 1000;

fn envelopes(n: usize, size: usize) -> Vec<Envelope> {
    let body = Bytes::from(vec![b'x'; size]);
    (0..n)
        .map(|i| {
            let a = format!("agg-{}", i % AGGREGATES);
            Envelope::unchecked(a, "BenchEvent", (i / AGGREGATES) as u64 + 1, body.clone())
        })
        .collect()
}

/// The fields the bus writes for `events`.
fn fields(events: &[Envelope]) -> Vec<Vec<(String, Bytes)>> {
    events
        .iter()
        .map(|e| {
            let m = Codec::CloudEvents
                .encode(e, dualbus_core::HeaderStyle::HyphenPercentEncoded, "bench")
                .unwrap();
            let mut f: Vec<(String, Bytes)> = m
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect();
            f.push((KEY_FIELD.to_owned(), Bytes::from(m.key.clone())));
            f.push((PAYLOAD_FIELD.to_owned(), m.payload));
            f
        })
        .collect()
}

fn streams_config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.streams.partitions = 1;
    c
}

async fn bus_xadd(bus: &DomainBus, topic: &str, events: &[Envelope]) -> Duration {
    let t = Instant::now();
    for chunk in events.chunks(10_000) {
        for r in bus.publish_batch(topic, chunk).await.unwrap() {
            r.unwrap();
        }
    }
    t.elapsed()
}

async fn raw_xadd(url: &str, stream: &str, entries: &[Vec<(String, Bytes)>]) -> Duration {
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = Instant::now();
    for chunk in entries.chunks(10_000) {
        let mut pipe = redis::pipe();
        for fields in chunk {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            for (k, v) in fields {
                cmd.arg(k).arg(v.as_ref());
            }
        }
        let _: Vec<String> = pipe.query_async(&mut c).await.unwrap();
    }
    t.elapsed()
}

async fn bus_consume(url: &str, topic: &str, n: u64) -> Duration {
    let bus = DomainBus::builder(RedisStreams::connect(streams_config(url)).await.unwrap())
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
        .group(format!("bus-{topic}"))
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
    // Every acknowledgement reached the server.
    let t = dualbus_core::Topic::new(topic).unwrap();
    while bus
        .transport()
        .pending(&t, &format!("bus-{topic}"))
        .await
        .unwrap()
        != Some(0)
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = took.max(first.get().expect("handled").elapsed());
    sub.shutdown().await;
    bus.close().await.unwrap();
    took
}

async fn raw_consume(url: &str, stream: &str, n: u64) -> Duration {
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("raw")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();
    let t = Instant::now();
    let mut seen = 0u64;
    while seen < n {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c1")
            .arg("COUNT")
            .arg(256)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut c)
            .await
            .unwrap();
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids.into_iter().map(|e| e.id))
            .collect();
        if ids.is_empty() {
            continue;
        }
        seen += ids.len() as u64;
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg("raw")
            .arg(&ids)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    t.elapsed()
}

fn line(what: &str, n: usize, bus: Duration, raw: Duration) {
    let (b, r) = (n as f64 / bus.as_secs_f64(), n as f64 / raw.as_secs_f64());
    println!(
        "{what:<28} bus {b:>9.0}/s  raw {r:>9.0}/s  bus/raw {:.2}  overhead {:>7.0} ns/msg",
        b / r,
        (bus.as_secs_f64() - raw.as_secs_f64()) * 1e9 / n as f64
    );
}

async fn streams(url: &str, n: usize) {
    let transport = RedisStreams::connect(streams_config(url)).await.unwrap();
    let bus = DomainBus::builder(transport)
        .source("bench")
        .build()
        .unwrap();
    let mut untracked = streams_config(url);
    untracked.streams.track_last = false;
    let bare = DomainBus::builder(RedisStreams::connect(untracked).await.unwrap())
        .source("bench")
        .build()
        .unwrap();
    for size in [16usize, 1024] {
        let events = envelopes(n, size);
        let entries = fields(&events);
        let (bus_topic, raw_topic) = (unique_topic("bench-bus"), unique_topic("bench-raw"));
        let raw_stream = format!("bench-raw-stream-{}", raw_topic.as_str());
        let raw_t = raw_xadd(url, &raw_stream, &entries).await;
        let bus_t = bus_xadd(&bus, bus_topic.as_str(), &events).await;
        line(&format!("streams publish {size} B"), n, bus_t, raw_t);
        let bare_topic = unique_topic("bench-bare");
        let bare_t = bus_xadd(&bare, bare_topic.as_str(), &events).await;
        line(&format!("  without track_last {size} B"), n, bare_t, raw_t);
        let bus_c = bus_consume(url, bus_topic.as_str(), n as u64).await;
        let raw_c = raw_consume(url, &raw_stream, n as u64).await;
        line(&format!("streams consume + ack {size} B"), n, bus_c, raw_c);
    }
    bus.close().await.unwrap();
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn own_server() -> (Server, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Server(child), format!("redis://127.0.0.1:{port}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 50_000 } else { 200_000 };
    let (_server, url) = match std::env::var("DUALBUS_BENCH_REDIS_URL") {
        Ok(u) => (None, u),
        Err(_) => {
            let (s, u) = own_server();
            (Some(s), u)
        }
    };
    println!(
        "Redis pub/sub at {url}, {n} messages per run, {IN_FLIGHT} publishes in flight, one subscriber"
    );
    for run in 1..=2 {
        println!("run {run}");
        streams(&url, if quick { 20_000 } else { 100_000 }).await;
        for size in [16usize, 1024] {
            let payload = Bytes::from(vec![b'x'; size]);
            let bus = bus_run(&url, &format!("bench-bus-{run}-{size}"), n, payload.clone()).await;
            let raw = raw_run(
                &url,
                &format!("bench-raw-{run}-{size}"),
                n,
                payload.clone(),
                Raw::Multiplexed,
            )
            .await;
            let managed = raw_run(
                &url,
                &format!("bench-rawm-{run}-{size}"),
                n,
                payload,
                Raw::Manager,
            )
            .await;
            let rate = |d: Duration| n as f64 / d.as_secs_f64();
            println!(
                "publish -> receive {size:>5} B   bus {:>9.0}/s  raw {:>9.0}/s  bus/raw {:.2}  overhead {:>7.0} ns/msg   raw with a connection manager {:>9.0}/s  bus/that {:.2}",
                rate(bus),
                rate(raw),
                rate(bus) / rate(raw),
                (bus.as_secs_f64() - raw.as_secs_f64()) * 1e9 / n as f64,
                rate(managed),
                rate(bus) / rate(managed),
            );
        }
    }
}
