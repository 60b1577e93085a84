//! Takeover across processes: the active subscriber's process is killed (SIGKILL), and a
//! standby in another process takes the group over once the lease expires, first handling
//! in order what the dead one left unacknowledged. The killed process is this test binary,
//! run again as its child on the ignored test `holder`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Test code.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualbus_core::conformance::process::{self, ChildTest};
use dualbus_core::conformance::{event, unique_topic, wait_for};
use dualbus_core::{DomainBus, Event, HandleError, handler_fn};
use dualbus_nats::JetStream;
use parking_lot::Mutex;
use support::{fast_config, shared_url};

/// The lease TTL in this test (fresh buckets: their own stream prefix).
const TTL: Duration = Duration::from_secs(3);

async fn bus(url: &str, prefix: &str) -> DomainBus {
    let mut config = fast_config(url.to_owned());
    config.jetstream.stream.prefix = prefix.to_owned();
    config.jetstream.consumer.lease_ttl = TTL;
    // One partition: one active subscriber, the other stands by (with more, the two would
    // share the partitions).
    config.jetstream.partitions = 1;
    let t = JetStream::connect(config).await.expect("connect");
    DomainBus::builder(t)
        .source("takeover")
        .build()
        .expect("build")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_process_takes_over_from_a_killed_one() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-kill").to_string();
    let prefix = format!("TK{}_", uuid::Uuid::now_v7().simple());
    let mut holder = ChildTest::spawn(
        "holder",
        "DUALBUS_TAKEOVER",
        format!("{url} {prefix} {topic}"),
    );
    let lines = holder.lines.clone();
    let said = |what: &'static str| {
        let lines = lines.clone();
        // The test harness may print "test holder ... " before the first line.
        move || lines.lock().iter().any(|l| l.ends_with(what))
    };
    wait_for(said("active")).await;

    let bus = bus(&url, &prefix).await;
    let seen = Arc::new(Mutex::new(Vec::<(u64, u32, Instant)>::new()));
    let s = seen.clone();
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                s.lock()
                    .push((e.event_version, e.delivery_count, Instant::now()));
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe as a standby");
    for v in 1..=5 {
        bus.publish(&topic, &event("agg", v))
            .await
            .expect("publish");
    }
    // The holder handles 1 and 2 and hangs in 3; the standby handles nothing meanwhile.
    wait_for(said("blocked 3")).await;
    assert!(
        seen.lock().is_empty(),
        "the standby handled events: {seen:?}",
        seen = seen.lock()
    );
    holder.child.kill().expect("kill -9 the holder");
    let killed = Instant::now();
    let _ = holder.child.wait();
    // The lease expires one TTL after the holder's last renewal, as the server stored it.
    let renewed = last_write(&url, &format!("{prefix}LEASES")).await;
    for v in 6..=10 {
        bus.publish(&topic, &event("agg", v))
            .await
            .expect("publish");
    }
    wait_for(|| seen.lock().iter().any(|(v, _, _)| *v == 10)).await;
    let seen = seen.lock().clone();
    // In order from the first event the holder left unacknowledged: v3, or earlier when
    // the holder's last acknowledgements were still on their way when it was killed
    // (at-least-once), and each of those delivered again.
    let versions: Vec<u64> = seen.iter().map(|(v, _, _)| *v).collect();
    let first = versions[0];
    assert!(first <= 3, "v3 was never acknowledged: {seen:?}");
    assert_eq!(versions, (first..=10).collect::<Vec<_>>(), "{seen:?}");
    assert!(
        seen.iter()
            .take_while(|(v, _, _)| *v <= 3)
            .all(|(_, n, _)| *n >= 2),
        "what the holder had was delivered to it before: {seen:?}"
    );
    let expired = renewed + TTL;
    println!(
        "standby took over {:?} after kill -9 of the holder's process, {:?} after its lease expired (lease TTL {TTL:?})",
        seen[0].2 - killed,
        std::time::SystemTime::now()
            .duration_since(expired)
            .unwrap_or_default()
            .saturating_sub(seen[0].2.elapsed())
    );
    drop(sub);
    bus.close().await.expect("close");
}

/// When the only key of `bucket` was last written, by the server's clock.
async fn last_write(url: &str, bucket: &str) -> std::time::SystemTime {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    let store = js.get_key_value(bucket).await.expect("bucket");
    let key = futures::StreamExt::next(&mut store.keys().await.expect("keys"))
        .await
        .expect("a lease")
        .expect("key");
    let created = store
        .entry(key)
        .await
        .expect("entry")
        .expect("the lease is still there")
        .created
        .unix_timestamp_nanos();
    std::time::UNIX_EPOCH + Duration::from_nanos(u64::try_from(created).expect("after 1970"))
}

/// The holder: run only as the child process of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_standby_process_takes_over_from_a_killed_one"]
async fn holder() {
    let Some([url, prefix, topic]) =
        process::child_args("DUALBUS_TAKEOVER").and_then(|a| <[String; 3]>::try_from(a).ok())
    else {
        return;
    };
    let bus = bus(&url, &prefix).await;
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| async move {
            if e.event_version == 3 {
                println!("blocked 3");
                std::future::pending::<()>().await;
            }
            Ok::<_, HandleError>(())
        }))
        .await
        .expect("subscribe");
    wait_for(|| !sub.active_partitions().is_empty()).await;
    println!("active");
    // Until killed.
    std::future::pending::<()>().await;
}
