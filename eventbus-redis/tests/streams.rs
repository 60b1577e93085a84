//! Redis Streams specifics against a real server: entries other clients add to a domain
//! topic (dead-lettered with a reason), durability as the server is configured, pending
//! entries trimmed before a takeover (counted as lost), the partition count stored with a
//! topic, reserved field names, and the layout other clients see.

#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)] // Test code.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::{event, next_raw, unique_topic};
use dualbus_core::pool::dlq_headers;
use dualbus_core::{
    Delivery, DomainBus, DomainSubscription, DomainTransport, Event, HandleError, SubscriptionSpec,
    Topic, handler_fn,
};
use dualbus_redis::streams::{KEY_FIELD, PAYLOAD_FIELD};
use dualbus_redis::{RedisConfig, RedisStreams};

fn config(url: &str) -> RedisConfig {
    let mut c = support::fast_config(url);
    c.streams.partitions = 1;
    c.streams.lease_ttl = Duration::from_secs(2);
    c.streams.member_timeout = Duration::from_secs(2);
    c
}

async fn bus(t: RedisStreams) -> DomainBus {
    DomainBus::builder(t)
        .source("redis-tests")
        .build()
        .expect("bus")
}

async fn next(sub: &mut DomainSubscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), next_raw(sub))
        .await
        .expect("a delivery within 30 s")
        .expect("stream open")
        .expect("delivery")
}

/// An entry's fields, as another client reads them.
type Fields = Vec<(String, Vec<u8>)>;

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_other_clients_go_to_the_dead_letter_with_a_reason() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let t = RedisStreams::connect(config(&url)).await.expect("connect");
    let bus = bus(t.clone()).await;
    let topic = unique_topic("redis-foreign");
    bus.publish(topic.as_str(), &event("agg", 1))
        .await
        .expect("publish");
    // The layout other clients see: the stream of partition 0, the headers as fields, then
    // the key and the payload.
    let stream = format!("dualbus:{{{}:0}}", topic.as_str());
    let mut c = raw(&url).await;
    let fields: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("xrange");
    let (_, ours) = &fields[0];
    let names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"ce-type"), "{names:?}");
    assert_eq!(&names[names.len() - 2..], [KEY_FIELD, PAYLOAD_FIELD]);
    // Two entries of another client: a plain one, and one whose field is not UTF-8.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("order")
        .arg("1")
        .arg(KEY_FIELD)
        .arg("plain")
        .query_async(&mut c)
        .await
        .expect("xadd");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("ce-type")
        .arg(&b"caf\xe9"[..])
        .arg(KEY_FIELD)
        .arg("latin1")
        .arg(PAYLOAD_FIELD)
        .arg("{}")
        .query_async(&mut c)
        .await
        .expect("xadd");
    bus.publish(topic.as_str(), &event("agg", 2))
        .await
        .expect("publish");
    let handled = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = handled.clone();
    let sub = bus
        .subscribe(topic.as_str())
        .group("foreign")
        .start(handler_fn(move |e: Event| {
            let h = h.clone();
            async move {
                h.lock().push(e.event_version);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    let dlq = Topic::new(format!("{}.dlq", topic.as_str())).expect("dlq topic");
    let mut dead = t
        .subscribe(SubscriptionSpec::new(dlq, "dlq-reader"))
        .await
        .expect("dlq subscribe");
    let mut kinds = HashMap::new();
    for _ in 0..2 {
        let d = next(&mut dead).await;
        let h = &d.message.headers;
        kinds.insert(
            d.message.key.clone().expect("key"),
            (
                h.get(dlq_headers::KIND).expect("kind").to_owned(),
                h.get(dlq_headers::REASON).expect("reason").to_owned(),
            ),
        );
        d.ack().await.expect("ack");
    }
    println!("dead letters: {kinds:?}");
    assert_eq!(kinds["plain"].0, "malformed", "{kinds:?}");
    assert_eq!(kinds["latin1"].0, "unreadable", "{kinds:?}");
    assert!(kinds["latin1"].1.contains("not UTF-8"), "{kinds:?}");
    tokio::time::timeout(Duration::from_secs(30), async {
        while handled.lock().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both envelopes handled");
    assert_eq!(*handled.lock(), [1, 2]);
    drop(dead);
    sub.shutdown().await;
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_always_synced_log_the_transport_is_not_durable() {
    let Some(url) = support::shared_url() else {
        return;
    };
    // The shared test server runs without an append-only file.
    let t = RedisStreams::connect(config(&url)).await.expect("connect");
    assert!(!t.capabilities().durable);
    // A log synced every second still loses the last second at a crash.
    let server = tokio::task::spawn_blocking(|| {
        support::Server::start(&["--appendonly", "yes", "--appendfsync", "everysec"])
    })
    .await
    .expect("start");
    let t = RedisStreams::connect(config(&server.url()))
        .await
        .expect("connect");
    assert!(!t.capabilities().durable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_entries_trimmed_before_a_takeover_are_counted_as_lost() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let topic = unique_topic("redis-trimmed");
    let first = RedisStreams::connect(config(&url)).await.expect("connect");
    let bus = bus(first.clone()).await;
    for v in 1..=5 {
        bus.publish(topic.as_str(), &event("agg", v))
            .await
            .expect("publish");
    }
    // A member takes all five and dies without acknowledging them.
    let mut sub = first
        .subscribe(SubscriptionSpec::new(topic.clone(), "g"))
        .await
        .expect("subscribe");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next(&mut sub).await);
    }
    // Someone trims the stream under the pending entries: three of them go.
    let stream = format!("dualbus:{{{}:0}}", topic.as_str());
    let _: i64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(2)
        .query_async(&mut raw(&url).await)
        .await
        .expect("xtrim");
    drop(held);
    drop(sub);
    // The next owner claims the two left (delivered again) and counts the three as lost.
    let second = RedisStreams::connect(config(&url)).await.expect("connect");
    let mut sub = second
        .subscribe(SubscriptionSpec::new(topic.clone(), "g"))
        .await
        .expect("subscribe");
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    assert_eq!(a.delivery_count, 2, "claimed: delivered before");
    assert_eq!(b.delivery_count, 2);
    let mut versions = Vec::new();
    for d in [a, b] {
        let ev = dualbus_core::Codec::decode(&d.message).expect("decode");
        versions.push(ev.event_version);
        d.ack().await.expect("ack");
    }
    assert_eq!(versions, [4, 5]);
    assert_eq!(second.lost_entries(), 3);
    assert_eq!(second.pending(&topic, "g").await.expect("pending"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_keeps_its_partition_count_and_reserved_names_are_refused() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let topic = unique_topic("redis-partitions");
    let mut c = config(&url);
    c.streams.partitions = 3;
    let three = RedisStreams::connect(c).await.expect("connect");
    let bus3 = bus(three).await;
    bus3.publish(topic.as_str(), &event("a", 1))
        .await
        .expect("publish");
    let mut c = config(&url);
    c.streams.partitions = 7;
    let seven = RedisStreams::connect(c).await.expect("connect");
    let bus7 = bus(seven.clone()).await;
    // Keys land where the topic's three partitions put them, whatever this client says.
    for i in 0..30 {
        let key = format!("k-{i}");
        let r = bus7
            .publish(topic.as_str(), &event(&key, 1))
            .await
            .expect("publish");
        assert_eq!(
            r.position.expect("position").partition,
            dualbus_core::partition::partition_for(&key, 3),
            "{key}"
        );
    }
    // A header the entry layout reserves is refused before anything is written.
    for name in [KEY_FIELD, PAYLOAD_FIELD] {
        let mut m = dualbus_core::Codec::CloudEvents
            .encode(
                &event("a", 2),
                seven.capabilities().header_style,
                "redis-tests",
            )
            .expect("encode");
        m.headers.insert(name, "x");
        let m = dualbus_core::OutboundMessage::new(
            m,
            seven.capabilities(),
            dualbus_core::Write::Publish,
        )
        .expect("valid for core");
        let e = seven.publish(&topic, m).await.expect_err("reserved");
        assert!(
            matches!(&e, dualbus_core::Error::InvalidHeader { name: n, .. } if n == name),
            "{e}"
        );
    }
    assert_eq!(
        seven.replay(&topic, "a").await.expect("replay").len(),
        1,
        "nothing was written"
    );
}

/// The streams with `track_last` off: publishes are bare `XADD`s, appends are refused (and
/// declared absent), everything else holds.
struct Untracked(String);

#[async_trait::async_trait]
impl dualbus_core::conformance::Backend for Untracked {
    async fn domain(&self) -> dualbus_core::Result<dualbus_core::DynDomainTransport> {
        let mut c = config(&self.0);
        c.streams.partitions = 4;
        c.streams.track_last = false;
        Ok(Arc::new(RedisStreams::connect(c).await?))
    }

    async fn simple(&self) -> dualbus_core::Result<dualbus_core::DynSimpleTransport> {
        Ok(Arc::new(
            dualbus_redis::RedisPubSub::connect(support::fast_config(&self.0)).await?,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_last_entries_publishes_are_bare_and_appends_are_refused() {
    use dualbus_core::conformance::domain;
    let Some(url) = support::shared_url() else {
        return;
    };
    let backend = Untracked(url.clone());
    let t = dualbus_core::conformance::Backend::domain(&backend)
        .await
        .expect("connect");
    assert!(!t.capabilities().expected_version);
    domain::expected_version(&backend).await;
    domain::publish_subscribe(&backend).await;
    domain::publish_batch_order(&backend).await;
    domain::replay(&backend).await;
    // No last-entry hash is written.
    let topic = unique_topic("redis-untracked");
    let bus = bus(RedisStreams::connect({
        let mut c = config(&url);
        c.streams.track_last = false;
        c
    })
    .await
    .expect("connect"))
    .await;
    bus.publish(topic.as_str(), &event("a", 1))
        .await
        .expect("publish");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("dualbus:{{{}:0}}:last", topic.as_str()))
        .query_async(&mut raw(&url).await)
        .await
        .expect("exists");
    assert_eq!(exists, 0);
    assert_eq!(
        bus.replay(topic.as_str(), "a").await.expect("replay").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_after_the_subscription_ended_is_an_error_not_a_wait() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let t = RedisStreams::connect(config(&url)).await.expect("connect");
    let topic = unique_topic("redis-late-ack");
    bus(t.clone())
        .await
        .publish(topic.as_str(), &event("a", 1))
        .await
        .expect("publish");
    let mut sub = t
        .subscribe(SubscriptionSpec::new(topic.clone(), "g"))
        .await
        .expect("subscribe");
    let d = next(&mut sub).await;
    drop(sub);
    // The member leaves and its acknowledger ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = tokio::time::timeout(Duration::from_secs(10), d.ack())
        .await
        .expect("an answer, not a wait");
    let e = r.expect_err("the subscription is gone");
    assert!(
        matches!(
            e.kind(),
            dualbus_core::ErrorKind::Closed | dualbus_core::ErrorKind::Conflict
        ),
        "{e}"
    );
    // The entry is still pending: the next member gets it again.
    let mut again = t
        .subscribe(SubscriptionSpec::new(topic.clone(), "g"))
        .await
        .expect("subscribe");
    let d = next(&mut again).await;
    assert_eq!(d.delivery_count, 2);
    d.ack().await.expect("ack");
    assert_eq!(t.pending(&topic, "g").await.expect("pending"), Some(0));
}
