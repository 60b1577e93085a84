//! Fault tests of the domain bus on Redis Streams against real servers, counting every
//! envelope:
//!
//! - three member processes share a topic; one is killed with SIGKILL mid-stream and a
//!   fourth joins later; 10,000 envelopes over 50 aggregates with injected handler
//!   failures. Every event is handled, each aggregate in order across the handovers (the
//!   order checker over the records of every process).
//! - the server (`appendonly yes`, `appendfsync always`: declared durable) is killed with
//!   SIGKILL mid-stream and restarted: every acknowledged publish is handled, in order per
//!   aggregate, and the bus resumes by itself.
//!
//! The members are this test binary, run again as children on the ignored test `member`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::process::{self, ChildTest, now_nanos};
use dualbus_core::conformance::{OrderChecker, event, mix, unique_topic, wait_for};
use dualbus_core::{
    Backoff, DomainBus, DomainTransport as _, Event, HandleError, PoolConfig, Topic, handler_fn,
};
use dualbus_redis::{RedisConfig, RedisStreams};

const AGGREGATES: usize = 50;
const VERSIONS: u64 = 200;
const IN_FLIGHT: usize = 256;
const GROUP: &str = "faults";

fn aggregate(i: usize) -> String {
    format!("agg-{i:02}")
}

fn config(url: &str) -> RedisConfig {
    let mut c = support::fast_config(url);
    c.streams.partitions = 8;
    c.streams.lease_ttl = Duration::from_secs(2);
    c.streams.member_timeout = Duration::from_secs(2);
    c
}

async fn bus(config: RedisConfig) -> DomainBus {
    DomainBus::builder(RedisStreams::connect(config).await.expect("connect"))
        .source(GROUP)
        .retry(Backoff::new(
            20,
            Duration::from_millis(1),
            Duration::from_millis(10),
        ))
        .pool(PoolConfig {
            max_in_flight: IN_FLIGHT,
            ..PoolConfig::default()
        })
        .build()
        .expect("build")
}

/// Publishes versions `versions` of every aggregate in one pipelined batch (each
/// aggregate's versions in order), noting each receipt.
async fn publish(
    bus: &DomainBus,
    topic: &str,
    versions: std::ops::RangeInclusive<u64>,
    checker: &OrderChecker,
) {
    let events: Vec<_> = versions
        .flat_map(|v| (0..AGGREGATES).map(move |i| event(&aggregate(i), v)))
        .collect();
    for (e, r) in events
        .iter()
        .zip(bus.publish_batch(topic, &events).await.expect("batch"))
    {
        r.expect("publish");
        checker.published(&e.aggregate_id, e.event_version);
    }
}

async fn settle(bus: &DomainBus, topic: &str) {
    let t = Topic::new(topic).expect("topic");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while bus.transport().pending(&t, GROUP).await.ok().flatten() != Some(0) {
        assert!(std::time::Instant::now() < deadline, "still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_a_topic_through_a_kill_and_a_join() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let topic = unique_topic("redis-faults").to_string();
    let start = || ChildTest::spawn("member", "DUALBUS_REDIS_FAULTS", format!("{url} {topic}"));
    let publisher = bus(config(&url)).await;
    publisher
        .publish(&topic, &event("warm-up", 1))
        .await
        .expect("publish");
    let checker = OrderChecker::new();
    checker.published("warm-up", 1);
    let mut members: Vec<ChildTest> = (0..3).map(|_| start()).collect();
    for m in &members {
        wait_for(|| m.said("ready")).await;
    }
    let handled = |members: &[ChildTest]| members.iter().map(ChildTest::ends).sum::<usize>();
    publish(&publisher, &topic, 1..=80, &checker).await;
    // Killed with a backlog: its partitions hold unfinished work.
    wait_for(|| handled(&members) >= 1_000 && members[1].ends() >= 100).await;
    let victim_before = members[1].ends();
    members[1].child.kill().expect("kill -9 member 1");
    let killed_at = now_nanos();
    let _ = members[1].child.wait();
    publish(&publisher, &topic, 81..=140, &checker).await;
    members.push(start());
    wait_for(|| members[3].said("ready")).await;
    publish(&publisher, &topic, 141..=VERSIONS, &checker).await;
    let total = AGGREGATES * VERSIONS as usize + 1;
    wait_for(|| process::distinct_ends(&members) == total).await;
    settle(&publisher, &topic).await;
    let quiet_at = now_nanos();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = process::check_children(&checker, &members, &[(1, killed_at)], quiet_at)
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    assert_eq!(summary.published, total, "and the warm-up");
    let joiner = members[3].ends();
    println!(
        "duplicates {}; member 1 handled {victim_before} before the kill; the joiner handled {joiner}; per member {:?}",
        summary.duplicates,
        members.iter().map(ChildTest::ends).collect::<Vec<_>>()
    );
    assert!(joiner > 0, "the joiner got no partition");
    // What a killed member can leave to be done again: its in-flight window.
    assert!(summary.duplicates <= 2 * IN_FLIGHT, "{summary:?}");
    publisher.close().await.expect("close");
}

/// A member: run only as a child process of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of members_share_a_topic_through_a_kill_and_a_join"]
async fn member() {
    let Some([url, topic]) =
        process::child_args("DUALBUS_REDIS_FAULTS").and_then(|a| <[String; 2]>::try_from(a).ok())
    else {
        return;
    };
    let bus = bus(config(&url)).await;
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| async move {
            process::report_start(&e);
            // Injected failures (retried in place) and some slow events.
            let roll = mix(7, &e.aggregate_id, e.event_version, e.attempt);
            if roll.is_multiple_of(11) {
                process::report_fail(&e);
                return Err(HandleError::msg("injected failure"));
            }
            if e.event_version.is_multiple_of(25) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            process::report_end(&e);
            Ok::<_, HandleError>(())
        }))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    // Ready once it owns partitions (the group's first assignment reached it).
    wait_for(|| !sub.active_partitions().is_empty()).await;
    println!("ready");
    std::future::pending::<()>().await;
    drop(sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_kill_mid_stream_loses_no_acknowledged_publish() {
    if support::shared_url().is_none() {
        return;
    }
    let mut server = tokio::task::spawn_blocking(|| {
        support::Server::start(&["--appendonly", "yes", "--appendfsync", "always"])
    })
    .await
    .expect("start");
    let c = config(&server.url());
    let probe = RedisStreams::connect(c.clone()).await.expect("connect");
    assert!(
        probe.capabilities().durable,
        "appendonly yes + appendfsync always is declared durable"
    );
    let publisher = bus(c.clone()).await;
    let consumer = bus(c).await;
    let topic = unique_topic("redis-server-kill").to_string();
    let checker = Arc::new(OrderChecker::new());
    let sub = consumer
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }),
        ))
        .await
        .expect("subscribe");
    publish(&publisher, &topic, 1..=40, &checker).await;
    wait_for(|| checker.distinct_ends() >= 500).await;
    server = tokio::task::spawn_blocking(move || {
        server.kill();
        std::thread::sleep(Duration::from_secs(1));
        server.run();
        server
    })
    .await
    .expect("restart");
    // Publishes after the restart: the first ones may meet a connection still reconnecting.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match publisher
            .transport()
            .pending(&Topic::new(topic.as_str()).expect("topic"), GROUP)
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    publish(&publisher, &topic, 41..=VERSIONS, &checker).await;
    let total = AGGREGATES * VERSIONS as usize;
    wait_for(|| checker.distinct_ends() == total).await;
    settle(&consumer, &topic).await;
    checker.quiescent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = checker
        .check()
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    println!("server kill: {summary:?}");
    assert_eq!(summary.published, total);
    sub.shutdown().await;
    publisher.close().await.expect("close");
    consumer.close().await.expect("close");
    drop(server);
}
