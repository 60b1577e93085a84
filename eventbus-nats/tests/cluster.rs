//! A replicated JetStream: three nats-server processes in one cluster, the topic's stream,
//! its consumers and the group's buckets on three replicas. The server leading the stream
//! is killed with SIGKILL mid-stream and started again later: every acknowledged publish is
//! handled, each aggregate in order (the order checker), and the time without progress is
//! reported.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualbus_core::conformance::{OrderChecker, event, unique_topic, wait_for};
use dualbus_core::{DomainBus, Event, HandleError, handler_fn};
use dualbus_nats::{JetStream, JetStreamConfig, NatsConfig};
use parking_lot::Mutex;
use support::{Cluster, server_binary};

const AGGREGATES: usize = 20;
const VERSIONS: u64 = 60;

fn config(urls: Vec<String>) -> NatsConfig {
    let mut js = JetStreamConfig::default();
    js.stream.replicas = 3;
    js.partitions = 4;
    js.consumer.lease_ttl = Duration::from_secs(3);
    js.consumer.member_timeout = Duration::from_secs(3);
    // Longer than the test: only the rewinds bring back what a leader change lost.
    js.consumer.ack_wait = Duration::from_secs(120);
    js.request_timeout = Duration::from_secs(3);
    NatsConfig::new(urls).with_jetstream(js)
}

/// Connects once the cluster has elected its JetStream leader.
async fn connect(urls: &[String]) -> JetStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match JetStream::connect(config(urls.to_vec())).await {
            Ok(t) => return t,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the cluster never served JetStream: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Publishes `event(a, v)` until the cluster acknowledges it (the same event id: stored
/// once, however many attempts).
async fn publish(bus: &DomainBus, topic: &str, a: &str, v: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let e = event(a, v);
    loop {
        match bus.publish(topic, &e).await {
            Ok(_) => return,
            Err(err) => {
                assert!(err.is_retryable(), "{err}");
                assert!(Instant::now() < deadline, "never acknowledged: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_dies_mid_stream_and_nothing_is_lost_or_reordered() {
    let Some(bin) = server_binary() else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cluster = Cluster::start(&bin);
    let urls = cluster.urls();
    let topic = unique_topic("js-r3");

    let publisher = DomainBus::builder(connect(&urls).await)
        .source("r3")
        .build()
        .expect("build");
    let member = connect(&urls).await;
    let bus = DomainBus::builder(member)
        .source("r3")
        .build()
        .expect("build");
    let checker = OrderChecker::new();
    let progress = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let p = progress.clone();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |_e: Event| {
                let p = p.clone();
                async move {
                    p.lock().push(Instant::now());
                    Ok::<_, HandleError>(())
                }
            }),
        ))
        .await
        .expect("subscribe");

    let aggs: Vec<String> = (0..AGGREGATES).map(|i| format!("r3-{i:02}")).collect();
    let publish_round = |v: u64| {
        let (publisher, topic, aggs, checker) = (&publisher, &topic, &aggs, &checker);
        async move {
            let sends = aggs.iter().map(|a| async move {
                publish(publisher, topic, a, v).await;
                a
            });
            for a in futures::future::join_all(sends).await {
                checker.published(a, v);
            }
        }
    };
    for v in 1..=VERSIONS / 3 {
        publish_round(v).await;
    }
    wait_for(|| checker.distinct_ends() >= AGGREGATES * 10).await;

    // The server leading the stream dies.
    let js = async_nats::jetstream::new(
        async_nats::connect(urls[0].as_str())
            .await
            .expect("plain client"),
    );
    let stream_name = dualbus_nats::jetstream::stream_name("DUALBUS_", &topic);
    let mut stream = js.get_stream(&stream_name).await.expect("stream");
    let info = stream.info().await.expect("stream info");
    let cluster_info = info.cluster.clone().expect("a clustered stream");
    assert_eq!(info.config.num_replicas, 3);
    let leader = cluster_info.leader.clone().expect("a leader");
    // The group's buckets are replicated like the stream.
    for bucket in ["KV_DUALBUS_LEASES", "KV_DUALBUS_MEMBERS"] {
        let mut s = js.get_stream(bucket).await.expect("bucket stream");
        let replicas = s.info().await.expect("bucket info").config.num_replicas;
        assert_eq!(replicas, 3, "{bucket}");
    }
    let consumer = stream
        .consumer_info(format!("r3-{}", 0))
        .await
        .expect("consumer info")
        .clone();
    assert!(consumer.cluster.is_some(), "a replicated consumer");
    let killed = Instant::now();
    cluster.named(&leader).kill();
    println!("killed the stream leader {leader}");
    for v in VERSIONS / 3 + 1..=2 * VERSIONS / 3 {
        publish_round(v).await;
    }
    // Back, with its store.
    cluster.named(&leader).restart();
    for v in 2 * VERSIONS / 3 + 1..=VERSIONS {
        publish_round(v).await;
    }
    let total = AGGREGATES * usize::try_from(VERSIONS).expect("small");
    wait_for(|| checker.distinct_ends() == total).await;
    let transport = bus.transport().clone();
    let t = dualbus_core::Topic::new(topic.as_str()).expect("topic");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match transport.pending(&t, "r3").await {
            Ok(Some(0)) => break,
            _ => {
                assert!(Instant::now() < deadline, "still pending");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    checker.quiescent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = checker
        .check()
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    let stall = {
        let times = progress.lock();
        let mut longest = Duration::ZERO;
        let mut prev = killed;
        for t in times.iter().filter(|t| **t >= killed) {
            longest = longest.max(t.duration_since(prev));
            prev = *t;
        }
        longest
    };
    println!(
        "R3: {} events handled ({} duplicates); longest time without a handled event after the leader was killed: {stall:?}",
        summary.ends, summary.duplicates
    );
    assert_eq!(summary.published, total);
    drop(sub);
    bus.close().await.expect("close");
    publisher.close().await.expect("close");
    let _ = stream;
}
