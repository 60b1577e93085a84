//! Fault tests against real brokers, counting every envelope:
//!
//! - three member processes share a topic; one is killed with SIGKILL mid-stream and a
//!   fourth joins later; 10,000 envelopes over 50 aggregates with injected handler
//!   failures. Every event is handled, each aggregate in order across the handovers (the
//!   order checker over the records of every process). Run with and without the completed
//!   records in the commit metadata: the duplicates of both are printed.
//! - the broker is killed with SIGKILL mid-stream and restarted (a broker of the test's
//!   own): every acknowledged publish is handled, in order per aggregate.
//!
//! The members are this test binary, run again as children on the ignored test `member`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // Test code.

mod support;

use support::broker::Broker;

use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::process::{self, ChildTest, now_nanos};
use dualbus_core::conformance::{OrderChecker, event, mix, unique_topic, wait_for};
use dualbus_core::{Backoff, DomainBus, Event, HandleError, PoolConfig, Topic, handler_fn};
use dualbus_kafka::{Kafka, KafkaConfig};

const AGGREGATES: usize = 50;
const VERSIONS: u64 = 200;
const IN_FLIGHT: usize = 256;
const GROUP: &str = "faults";

fn aggregate(i: usize) -> String {
    format!("agg-{i:02}")
}

fn config(bootstrap: &str, with_completed: bool) -> KafkaConfig {
    let mut c = support::fast_config(bootstrap);
    c.topics.partitions = 8;
    c.consumer.completed_in_metadata = with_completed;
    c
}

async fn bus(config: KafkaConfig) -> DomainBus {
    DomainBus::builder(Kafka::connect(config).await.expect("connect"))
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

/// Records of every member (the crash of `killed` at `killed_at`), checked; returns the
/// duplicates.
fn check(
    checker: &OrderChecker,
    members: &[ChildTest],
    killed: u32,
    killed_at: u128,
    quiet_at: u128,
) -> usize {
    let summary = process::check_children(checker, members, &[(killed, killed_at)], quiet_at)
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    assert_eq!(
        summary.published,
        AGGREGATES * VERSIONS as usize + 1,
        "and the warm-up"
    );
    summary.duplicates
}

async fn kill_and_join(bootstrap: &str, with_completed: bool) -> usize {
    let topic = unique_topic("kafka-faults").to_string();
    let start = || {
        ChildTest::spawn(
            "member",
            "DUALBUS_KAFKA_FAULTS",
            format!("{bootstrap} {topic} {with_completed}"),
        )
    };
    let publisher = bus(config(bootstrap, with_completed)).await;
    // The topic exists before the members subscribe.
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
    let t = Topic::new(topic.as_str()).expect("topic");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while publisher
        .transport()
        .pending(&t, GROUP)
        .await
        .expect("pending")
        != Some(0)
    {
        assert!(std::time::Instant::now() < deadline, "still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quiet_at = now_nanos();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let duplicates = check(&checker, &members, 1, killed_at, quiet_at);
    let joiner = members[3].ends();
    println!(
        "completed records in the metadata: {with_completed}; duplicates {duplicates}; member 1 handled {victim_before} before the kill; the joiner handled {joiner}; per member {:?}",
        members.iter().map(ChildTest::ends).collect::<Vec<_>>()
    );
    assert!(joiner > 0, "the joiner got no partition");
    publisher.close().await.expect("close");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_a_topic_through_a_kill_and_a_join() {
    let Some(bootstrap) = support::shared_bootstrap() else {
        return;
    };
    let with = kill_and_join(&bootstrap, true).await;
    let without = kill_and_join(&bootstrap, false).await;
    println!(
        "duplicates after a SIGKILL and a join: {with} with the completed records in the commit metadata, {without} without"
    );
    // What a killed member can leave to be done again: its in-flight window and what it
    // completed since its last commit (100 ms apart), per handover.
    assert!(with <= 4 * IN_FLIGHT, "{with} duplicates");
}

/// A member: run only as a child process of the tests above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of members_share_a_topic_through_a_kill_and_a_join"]
async fn member() {
    let Some([bootstrap, topic, with_completed]) =
        process::child_args("DUALBUS_KAFKA_FAULTS").and_then(|a| <[String; 3]>::try_from(a).ok())
    else {
        return;
    };
    let bus = bus(config(&bootstrap, with_completed == "true")).await;
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
async fn a_broker_restart_mid_stream_loses_nothing() {
    // Needs the broker's jars (cached by scripts/kafka.sh) and Java, as the shared broker.
    if support::shared_bootstrap().is_none() {
        return;
    }
    let mut broker = tokio::task::spawn_blocking(Broker::start)
        .await
        .expect("start");
    let mut c = config(&broker.bootstrap(), true);
    c.topics.partitions = 4;
    // Publishes wait out the restart (librdkafka retries within the delivery timeout).
    c.producer.delivery_timeout = Duration::from_secs(120);
    let publisher = bus(c.clone()).await;
    let consumer = bus(c).await;
    let topic = unique_topic("kafka-restart").to_string();
    publisher
        .publish(&topic, &event("warm-up", 1))
        .await
        .expect("publish");
    let checker = Arc::new(OrderChecker::new());
    checker.published("warm-up", 1);
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
    wait_for(|| checker.distinct_ends() >= 1_000).await;
    tokio::task::block_in_place(|| broker.kill());
    let restart = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(2));
        broker.run();
        broker
    });
    // Published while the broker is down: they wait in the producer and go out after the
    // restart.
    publish(&publisher, &topic, 41..=VERSIONS, &checker).await;
    let _broker = restart.await.expect("restart");
    let total = AGGREGATES * VERSIONS as usize + 1;
    wait_for(|| checker.distinct_ends() == total).await;
    let t = Topic::new(topic.as_str()).expect("topic");
    while consumer.transport().pending(&t, GROUP).await.ok().flatten() != Some(0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    checker.quiescent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = checker
        .check()
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    println!("broker restart: {summary:?}");
    assert_eq!(summary.published, total);
    sub.shutdown().await;
    publisher.close().await.expect("close");
    consumer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_for_a_session_stops_its_partitions() {
    if support::shared_bootstrap().is_none() {
        return;
    }
    let broker = tokio::task::spawn_blocking(Broker::start)
        .await
        .expect("start");
    let mut c = config(&broker.bootstrap(), true);
    c.topics.partitions = 2;
    c.producer.delivery_timeout = Duration::from_secs(120);
    let bus = bus(c).await;
    let topic = unique_topic("kafka-cut-off").to_string();
    let checker = Arc::new(OrderChecker::new());
    let aggs: Vec<String> = (0..5).map(aggregate).collect();
    let publish_versions = |versions: std::ops::RangeInclusive<u64>| {
        let (bus, topic, checker, aggs) = (&bus, &topic, checker.clone(), &aggs);
        async move {
            for v in versions {
                for a in aggs {
                    bus.publish(topic, &event(a, v)).await.expect("publish");
                    checker.published(a, v);
                }
            }
        }
    };
    publish_versions(1..=1).await;
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }),
        ))
        .await
        .expect("subscribe");
    publish_versions(2..=10).await;
    wait_for(|| checker.distinct_ends() == 50).await;
    assert!(!sub.active_partitions().is_empty());
    // The broker stops answering: after a session timeout (3 s here) without a commit
    // taken, the member stops its partitions by itself.
    broker.signal("STOP");
    let cut = std::time::Instant::now();
    wait_for(|| sub.active_partitions().is_empty()).await;
    let stopped_after = cut.elapsed();
    broker.signal("CONT");
    wait_for(|| !sub.active_partitions().is_empty()).await;
    let back_after = cut.elapsed();
    publish_versions(11..=20).await;
    wait_for(|| checker.distinct_ends() == 100).await;
    let t = Topic::new(topic.as_str()).expect("topic");
    while bus.transport().pending(&t, GROUP).await.ok().flatten() != Some(0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    checker.quiescent();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = checker
        .check()
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    println!(
        "cut off: partitions stopped after {stopped_after:?}, owned again after {back_after:?}; {summary:?}"
    );
    // A session after the last commit taken, which was at most a third of a session
    // before the broker stopped.
    assert!(
        stopped_after >= Duration::from_millis(1500),
        "stopped before a session passed: {stopped_after:?}"
    );
    sub.shutdown().await;
    bus.close().await.expect("close");
}
