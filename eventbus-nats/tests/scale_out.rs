//! Scale-out across processes: three member processes share a topic's partitions, one is
//! killed with SIGKILL mid-stream, a fourth joins later. 10,000 envelopes over 100
//! aggregates, some handlers slow. Every event is handled, each aggregate in order across
//! both handovers (the order checker over the records of every process), the joiner gets
//! partitions, and duplicates stay within the killed member's in-flight window.
//!
//! The members are this test binary, run again as children on the ignored test `member`.
//! Each prints a line per handler start and end, with the system clock (shared by the
//! processes of one machine), before the acknowledgement: a line of a killed member is in
//! the pipe already.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // Test code.

mod support;

use std::time::Duration;

use dualbus_core::conformance::OrderChecker;
use dualbus_core::conformance::process::{self, ChildTest, now_nanos};
use dualbus_core::conformance::{event, unique_topic, wait_for};
use dualbus_core::{DomainBus, Event, HandleError, PoolConfig, Topic, handler_fn};
use dualbus_nats::JetStream;
use support::{fast_config, shared_url};

const AGGREGATES: usize = 100;
const VERSIONS: u64 = 100;
/// The pool's in-flight bound in each member: the most a killed member can have handled
/// without its acknowledgement confirmed.
const IN_FLIGHT: usize = 256;
const GROUP: &str = "scale";

fn aggregate(i: usize) -> String {
    format!("agg-{i:03}")
}

async fn bus(url: &str, prefix: &str) -> DomainBus {
    let mut config = fast_config(url.to_owned());
    config.jetstream.stream.prefix = prefix.to_owned();
    config.jetstream.partitions = 16;
    config.jetstream.consumer.lease_ttl = Duration::from_secs(3);
    // Far longer than the test: only the rewind at takeover, never the ack wait, brings
    // back what the killed member left unacknowledged.
    config.jetstream.consumer.ack_wait = Duration::from_secs(120);
    config.jetstream.consumer.member_timeout = Duration::from_secs(3);
    let t = JetStream::connect(config).await.expect("connect");
    DomainBus::builder(t)
        .source(GROUP)
        .pool(PoolConfig {
            max_in_flight: IN_FLIGHT,
            ..PoolConfig::default()
        })
        .build()
        .expect("build")
}

/// A member process.
fn start_member(url: &str, prefix: &str, topic: &str) -> ChildTest {
    ChildTest::spawn(
        "member",
        "DUALBUS_SCALE_OUT",
        format!("{url} {prefix} {topic}"),
    )
}

/// Publishes versions `versions` of every aggregate, one version at a time across all
/// aggregates (each aggregate's versions in order), noting each receipt.
async fn publish(
    bus: &DomainBus,
    topic: &str,
    versions: std::ops::RangeInclusive<u64>,
    checker: &OrderChecker,
) {
    for v in versions {
        let sends = (0..AGGREGATES).map(|i| async move {
            let a = aggregate(i);
            bus.publish(topic, &event(&a, v)).await.expect("publish");
            (a, v)
        });
        for (a, v) in futures::future::join_all(sends).await {
            checker.published(&a, v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_a_topic_through_a_kill_and_a_join() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-scale").to_string();
    let prefix = format!("SO{}_", uuid::Uuid::now_v7().simple());
    let mut members: Vec<ChildTest> = (0..3)
        .map(|_| start_member(&url, &prefix, &topic))
        .collect();
    for m in &members {
        wait_for(|| m.said("ready")).await;
    }
    let bus = bus(&url, &prefix).await;
    let checker = OrderChecker::new();
    let handled = |members: &[ChildTest]| members.iter().map(ChildTest::ends).sum::<usize>();

    // Phase 1, then the kill while member 1 is busy.
    publish(&bus, &topic, 1..=40, &checker).await;
    wait_for(|| handled(&members) >= 2_000).await;
    let victim_before = members[1].ends();
    members[1].child.kill().expect("kill -9 member 1");
    let killed_at = now_nanos();
    let _ = members[1].child.wait();
    assert!(victim_before > 0, "member 1 never handled anything");

    // Phase 2 while its partitions move; then the joiner.
    publish(&bus, &topic, 41..=70, &checker).await;
    members.push(start_member(&url, &prefix, &topic));
    wait_for(|| members[3].said("ready")).await;
    publish(&bus, &topic, 71..=VERSIONS, &checker).await;

    let total = AGGREGATES * usize::try_from(VERSIONS).expect("small");
    wait_for(|| process::distinct_ends(&members) == total).await;
    let t: Topic = Topic::new(topic.as_str()).expect("topic");
    let transport = bus.transport().clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while transport.pending(&t, GROUP).await.expect("pending") != Some(0) {
        assert!(std::time::Instant::now() < deadline, "still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is pending: a handler end after this is a stray delivery (C6), which would
    // show in the next second.
    let quiet_at = now_nanos();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let summary = process::check_children(&checker, &members, &[(1, killed_at)], quiet_at)
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    let joiner = members[3].ends();
    println!(
        "handled {} (distinct {total}), duplicates {}; member 1 handled {victim_before} before the kill; the joiner handled {joiner}; per member: {:?}",
        summary.ends,
        summary.duplicates,
        members.iter().map(ChildTest::ends).collect::<Vec<_>>()
    );
    assert_eq!(summary.published, total);
    assert!(joiner > 0, "the joiner got no partition");
    assert!(
        summary.duplicates <= IN_FLIGHT,
        "{} duplicates: more than the killed member's in-flight window ({IN_FLIGHT})",
        summary.duplicates
    );
    bus.close().await.expect("close");
}

/// A member: run only as a child process of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of members_share_a_topic_through_a_kill_and_a_join"]
async fn member() {
    let Some([url, prefix, topic]) =
        process::child_args("DUALBUS_SCALE_OUT").and_then(|a| <[String; 3]>::try_from(a).ok())
    else {
        return;
    };
    let bus = bus(&url, &prefix).await;
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| async move {
            process::report_start(&e);
            // Slow on some events: handovers find handlers running.
            if e.event_version.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            process::report_end(&e);
            Ok::<_, HandleError>(())
        }))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    // Members with no partition yet are ready too: they stand by for their share.
    println!("ready");
    std::future::pending::<()>().await;
    drop(sub);
}
