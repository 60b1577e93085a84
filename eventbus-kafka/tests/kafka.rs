//! Kafka-specific behaviour against the test broker: key placement as other clients place
//! keys, records completed out of order not handled again after a restart (and how many
//! are when the commit metadata cannot hold them), and records of other producers on a
//! domain topic.

#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)] // Test code.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::{event, next_raw, unique_topic};
use dualbus_core::pool::dlq_headers;
use dualbus_core::{
    Delivery, DomainBus, DomainSubscription, DomainTransport, SubscriptionSpec, Topic,
};
use dualbus_kafka::partition::partition_of;
use dualbus_kafka::rdkafka::message::{Header, OwnedHeaders};
use dualbus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use dualbus_kafka::{Kafka, KafkaConfig, Partitioner};

async fn bus(config: KafkaConfig) -> DomainBus {
    DomainBus::builder(Kafka::connect(config).await.expect("connect"))
        .source("kafka-tests")
        .build()
        .expect("bus")
}

/// The next raw delivery within 30 s.
async fn next(sub: &mut DomainSubscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), next_raw(sub))
        .await
        .expect("a delivery within 30 s")
        .expect("stream open")
        .expect("delivery")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_where_the_java_client_puts_them() {
    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let mut c = support::fast_config(&b);
    c.topics.partitions = 7;
    let bus = bus(c).await;
    let topic = unique_topic("kafka-murmur2");
    for i in 0..60 {
        let key = format!("order-{}", i * 7919);
        let r = bus
            .publish(topic.as_str(), &event(&key, 1))
            .await
            .expect("publish");
        let p = r.position.expect("a position").partition;
        assert_eq!(
            p,
            partition_of(Partitioner::Murmur2Random, key.as_bytes(), 7),
            "{key}"
        );
    }
    bus.close().await.expect("close");
}

/// sarama's placement of fixed keys, written by `tests/fixtures/sarama/main.go` with sarama's
/// own `NewHashPartitioner`.
#[derive(serde::Deserialize)]
struct SaramaPlacement {
    counts: Vec<u32>,
    rows: Vec<SaramaRow>,
}

#[derive(serde::Deserialize)]
struct SaramaRow {
    key: String,
    partitions: Vec<u32>,
}

fn sarama_placement() -> SaramaPlacement {
    serde_json::from_str(include_str!("fixtures/sarama/placement.json")).expect("fixture")
}

#[test]
fn sarama_fnv1a_matches_sarama() {
    let g = sarama_placement();
    for row in &g.rows {
        for (n, expected) in g.counts.iter().zip(&row.partitions) {
            assert_eq!(
                partition_of(Partitioner::SaramaFnv1a, row.key.as_bytes(), *n),
                *expected,
                "{:?} over {n}",
                row.key
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sarama_placement_is_what_the_broker_stores() {
    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let g = sarama_placement();
    let column = g.counts.iter().position(|n| *n == 7).expect("7 partitions");
    let mut c = support::fast_config(&b);
    c.topics.partitions = 7;
    c.producer.partitioner = Partitioner::SaramaFnv1a;
    let bus = bus(c).await;
    let topic = unique_topic("kafka-sarama");
    for row in g.rows.iter().filter(|r| !r.key.is_empty()) {
        let r = bus
            .publish(topic.as_str(), &event(&row.key, 1))
            .await
            .expect("publish");
        assert_eq!(
            r.position.expect("position").partition,
            row.partitions[column],
            "{:?}",
            row.key
        );
    }
    // Replay finds the key's partition the same way.
    let history = bus
        .replay(topic.as_str(), "order-42")
        .await
        .expect("replay");
    assert_eq!(history.len(), 1);
    bus.close().await.expect("close");
}

/// Publishes `n` events of distinct aggregates to a one-partition topic, then acknowledges
/// every `ack_every`-th delivery except the first, commits (through `pending`) and
/// restarts the member. Returns how many of the acknowledged records came again.
async fn redone_after_restart(config: KafkaConfig, n: u64, ack_every: u64) -> (u64, u64) {
    let transport: Arc<Kafka> = Arc::new(Kafka::connect(config).await.expect("connect"));
    let bus = DomainBus::builder(transport.clone())
        .source("kafka-tests")
        .build()
        .expect("bus");
    let topic = unique_topic("kafka-ooo");
    let events: Vec<_> = (0..n).map(|i| event(&format!("a-{i}"), 1)).collect();
    for r in bus
        .publish_batch(topic.as_str(), &events)
        .await
        .expect("batch")
    {
        r.expect("publish");
    }
    let spec = SubscriptionSpec::new(Topic::new(topic.as_str()).expect("topic"), "ooo");
    let mut sub = transport.subscribe(spec.clone()).await.expect("subscribe");
    let mut acked = Vec::new();
    for _ in 0..n {
        let d = next(&mut sub).await;
        let o = u64::try_from(d.position().offset).expect("offset");
        if o > 0 && o % ack_every == 0 {
            d.ack().await.expect("ack");
            acked.push(o);
        }
    }
    let lag = transport
        .pending(&spec.topic, "ooo")
        .await
        .expect("pending")
        .expect("a lag");
    assert_eq!(lag, n, "offset 0 is open: nothing can be committed past it");
    drop(sub);
    // The same group again: offset 0 first, then only what was not completed.
    let mut sub = transport
        .subscribe(spec.clone())
        .await
        .expect("resubscribe");
    let mut redone = 0;
    let mut seen = 0;
    let open = n - u64::try_from(acked.len()).expect("count");
    while seen < open {
        let d = next(&mut sub).await;
        let o = u64::try_from(d.position().offset).expect("offset");
        if acked.contains(&o) {
            redone += 1;
        } else {
            seen += 1;
        }
        if o == 0 {
            assert!(d.delivery_count >= 2, "offset 0 was delivered before");
        }
        d.ack().await.expect("ack");
    }
    // One more event: the next delivery is it, not a completed record.
    bus.publish(topic.as_str(), &event("after", 1))
        .await
        .expect("publish");
    loop {
        let d = next(&mut sub).await;
        let o = u64::try_from(d.position().offset).expect("offset");
        d.ack().await.expect("ack");
        if o == n {
            break;
        }
        assert!(
            acked.contains(&o),
            "offset {o} came twice without a restart"
        );
        redone += 1;
    }
    drop(sub);
    bus.close().await.expect("close");
    (redone, transport.metadata_overflows())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_completed_out_of_order_are_not_handled_again() {
    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let mut c = support::fast_config(&b);
    c.topics.partitions = 1;
    // 299 of 300 records completed above an open offset 0: all listed in the metadata.
    let (redone, overflows) = redone_after_restart(c.clone(), 300, 1).await;
    println!("with the completed set in the metadata: {redone} records handled again");
    assert_eq!((redone, overflows), (0, 0));
    // Every third record completed over a span the metadata cannot hold in 64 bytes: the
    // set is left out (counted) and those records are handled again.
    c.consumer.metadata_max_bytes = 64;
    let (redone, overflows) = redone_after_restart(c, 300, 3).await;
    println!("without it (metadata over 64 bytes): {redone} records handled again");
    assert_eq!(redone, 99, "every completed record came again");
    assert!(overflows > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_other_producers_go_to_the_dead_letter_with_a_reason() {
    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let mut c = support::fast_config(&b);
    c.topics.partitions = 1;
    let kafka = Kafka::connect(c.clone()).await.expect("connect");
    let bus = DomainBus::builder(kafka.clone())
        .source("kafka-tests")
        .build()
        .expect("bus");
    let topic = unique_topic("kafka-foreign");
    // The topic exists once the bus published to it.
    bus.publish(topic.as_str(), &event("agg", 1))
        .await
        .expect("publish");
    let raw: FutureProducer = dualbus_kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .expect("raw producer");
    let send = |key: &'static str, value: &'static [u8], headers: OwnedHeaders| {
        let raw = raw.clone();
        let topic = topic.as_str().to_owned();
        async move {
            raw.send(
                FutureRecord::to(&topic)
                    .key(key)
                    .payload(value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("raw send");
        }
    };
    send("plain", br#"{"order": 1}"#, OwnedHeaders::new()).await;
    send(
        "latin1",
        b"{}",
        OwnedHeaders::new().insert(Header {
            key: "ce_type",
            value: Some(&b"caf\xe9"[..]),
        }),
    )
    .await;
    bus.publish(topic.as_str(), &event("agg", 2))
        .await
        .expect("publish");
    let handled = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = handled.clone();
    let sub = bus
        .subscribe(topic.as_str())
        .group("foreign")
        .start(dualbus_core::handler_fn(move |e: dualbus_core::Event| {
            let h = h.clone();
            async move {
                h.lock().push(e.event_version);
                Ok::<_, dualbus_core::HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    let dlq = Topic::new(format!("{}.dlq", topic.as_str())).expect("dlq topic");
    let mut dead = kafka
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
async fn a_full_local_queue_is_a_bounded_wait_then_a_retryable_error() {
    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let mut c = support::fast_config(&b);
    // Room for one record, which lingers 4 s before it is sent: everything below that
    // needs a full queue happens while the first record sits in it.
    c = c
        .with_property("queue.buffering.max.messages", "1")
        .with_property("linger.ms", "4000");
    c.producer.queue_full_wait = Duration::from_millis(300);
    let bus = bus(c).await;
    let topic = unique_topic("kafka-queue-full");
    // The topic exists before the queue fills.
    bus.publish(topic.as_str(), &event("warm-up", 1))
        .await
        .expect("warm-up");
    // The first record takes the only place in the queue: it is enqueued on the first
    // poll of `join!`, before the second publish starts.
    let (a, b, d) = (event("a", 1), event("b", 1), event("d", 1));
    let first = bus.publish(topic.as_str(), &a);
    let second = async {
        let started = std::time::Instant::now();
        let r = bus.publish(topic.as_str(), &b).await;
        (r, started.elapsed())
    };
    tokio::pin!(first);
    // The second publish gives up while the first record still fills the queue: the
    // wait is bounded by `queue_full_wait`, not by the queue's progress.
    let (second, waited) = tokio::select! {
        biased;
        r = &mut first => panic!("the first record left the queue before the second gave up: {r:?}"),
        r = second => r,
    };
    let e = second.expect_err("no room for a second record");
    assert_eq!(e.kind(), dualbus_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    // A publish waiting for room ends when it is dropped (cancelled), still while the
    // first record fills the queue.
    let cancelled = tokio::select! {
        biased;
        r = &mut first => panic!("the first record left the queue too early: {r:?}"),
        r = tokio::time::timeout(
            Duration::from_millis(50),
            bus.publish(topic.as_str(), &d),
        ) => r,
    };
    assert!(cancelled.is_err(), "the waiting publish was cancelled");
    first
        .await
        .unwrap_or_else(|e| panic!("the first record goes out after its linger: {e}"));
    // Room again (the queue's count drops just after the report: the wait covers that).
    bus.publish(topic.as_str(), &event("c", 1))
        .await
        .unwrap_or_else(|e| panic!("after the first left: {e}"));
    // Exactly the records that were accepted are on the topic.
    for (key, n) in [("warm-up", 1), ("a", 1), ("b", 0), ("c", 1), ("d", 0)] {
        let got = bus.replay(topic.as_str(), key).await.expect("replay");
        assert_eq!(got.len(), n, "{key}");
    }
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_protocol_passes_the_crash_trap() {
    use async_trait::async_trait;
    use dualbus_core::conformance::{Backend, groups};

    struct Classic(String);

    #[async_trait]
    impl Backend for Classic {
        async fn domain(&self) -> dualbus_core::Result<dualbus_core::DynDomainTransport> {
            let mut c = support::fast_config(&self.0);
            c.consumer.group_protocol = dualbus_kafka::GroupProtocol::Classic;
            // The broker's minimum for classic groups (`group.min.session.timeout.ms`).
            c.consumer.session_timeout = Duration::from_secs(6);
            Ok(Arc::new(Kafka::connect(c).await?))
        }

        async fn simple(&self) -> dualbus_core::Result<dualbus_core::DynSimpleTransport> {
            Err(dualbus_core::Error::NotSupported {
                operation: "simple messages",
                backend: "kafka",
            })
        }
    }

    let Some(b) = support::shared_bootstrap() else {
        return;
    };
    let summary = groups::crash_trap_outcome(&Classic(b), 3)
        .await
        .unwrap_or_else(|v| panic!("classic protocol: {v}"));
    println!("classic protocol, crash trap: {summary:?}");
}
