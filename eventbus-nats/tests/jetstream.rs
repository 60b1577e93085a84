//! JetStream specifics beyond the conformance suite: the subject layout seen by plain
//! clients, malformed messages from plain clients, stream settings, the single-active
//! subscriber lease and its takeover, and outages.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use dualbus_core::conformance::{event, next_raw, unique_topic, wait_for};
use dualbus_core::{
    DomainBus, DomainTransport, ErrorKind, Event, HandleError, SubscriptionSpec, handler_fn,
};
use dualbus_nats::subject::{
    encode_key, event_subject, parse_subject, partition_of, publish_subject,
};
use dualbus_nats::{JetStream, JetStreamConfig, NatsConfig};
use futures::StreamExt as _;
use parking_lot::Mutex;
use support::{Server, fast_config, server_binary, shared_url};

async fn transport(url: &str) -> JetStream {
    JetStream::connect(fast_config(url.to_owned()))
        .await
        .expect("connect")
}

fn bus(t: JetStream) -> DomainBus {
    DomainBus::builder(t)
        .source("js-tests")
        .build()
        .expect("build")
}

async fn plain(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.expect("plain connect"))
}

/// Aggregate ids with characters special in subjects are stored on their encoded subject in
/// the partition the client computes, where a plain client finds them; a plain client that
/// publishes on the plain subject lands on the same stored subject; replay reads each
/// aggregate's history back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_aggregate_ids_are_encoded_and_replayed() {
    let Some(url) = shared_url() else { return };
    let t = transport(&url).await;
    let bus = bus(t.clone());
    let topic = unique_topic("js-keys");
    let ids = [
        "a.b",
        "a*b",
        "a>b",
        "with space",
        "ümlaut",
        "100%",
        "plain-id_1",
    ];
    for v in 1..=3 {
        for id in ids {
            bus.publish(&topic, &event(id, v)).await.expect("publish");
        }
    }
    let js = plain(&url).await;
    let stream = js
        .get_stream(dualbus_nats::jetstream::stream_name("DUALBUS_", &topic))
        .await
        .expect("stream");
    for id in ids {
        let p = partition_of(id, 16);
        let subject = event_subject(&topic, p, id);
        assert_eq!(subject, format!("{topic}.{p}.{}", encode_key(id)));
        let last = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .unwrap_or_else(|e| panic!("{id:?} not on {subject}: {e}"));
        assert!(last.headers.get("ce-subject").is_some(), "{id:?}");
        let history = t.replay(&topic, id).await.expect("replay");
        let versions: Vec<String> = history
            .iter()
            .map(|m| {
                assert_eq!(m.key.as_deref(), Some(id));
                let envelope = dualbus_core::Codec::decode(m).expect("decode");
                assert_eq!(envelope.aggregate_id, id);
                m.headers
                    .get("ce-aggregateversion")
                    .expect("version header")
                    .to_owned()
            })
            .collect();
        assert_eq!(versions, ["1", "2", "3"], "{id:?}");
    }
    // A plain client publishing on the plain subject: the server stores it where we look.
    for id in ids {
        let ack = js
            .publish(publish_subject(&topic, id), Bytes::from_static(b"plain"))
            .await
            .expect("plain publish")
            .await
            .expect("stored");
        let last = stream
            .get_last_raw_message_by_subject(&event_subject(&topic, partition_of(id, 16), id))
            .await
            .expect("on the computed subject");
        assert_eq!(last.sequence, ack.sequence, "{id:?}");
    }
    assert!(
        t.replay(&topic, "never-seen")
            .await
            .expect("replay")
            .is_empty()
    );
    assert!(
        t.replay(&unique_topic("js-none"), "x")
            .await
            .expect("replay of a topic without stream")
            .is_empty()
    );
    bus.close().await.expect("close");
}

/// Messages written by a plain client that the bus cannot read (no codec, broken
/// envelopes, subjects outside the layout) go to the dead letter with a reason; the good
/// ones around them are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_from_a_plain_client_are_dead_lettered() {
    let Some(url) = shared_url() else { return };
    let t = transport(&url).await;
    let bus = bus(t.clone());
    let topic = unique_topic("js-plain-bad");
    // The bus creates the stream; the plain client writes into it.
    bus.publish(&topic, &event("good", 1))
        .await
        .expect("publish");
    let js = plain(&url).await;
    let mut ce = async_nats::HeaderMap::new();
    ce.insert("ce-specversion", "1.0");
    ce.insert("ce-type", "T");
    ce.insert("ce-source", "plain");
    ce.insert("ce-subject", "bad-ce");
    ce.insert("ce-aggregateversion", "1");
    // ce-id missing.
    let cases: Vec<(String, Option<async_nats::HeaderMap>, &'static [u8])> = vec![
        (format!("{topic}.bad-none"), None, b"not an envelope"),
        (format!("{topic}.bad-ce"), Some(ce), b"{}"),
        (
            format!("{topic}.bad-jxt"),
            None,
            br#"{"event_id":"e","event_type":"T","event_version":1,"timestamp":"2026-01-01T00:00:00Z","payload":{}}"#,
        ),
        // A token that is not a valid encoding: no key.
        (format!("{topic}.bad%zz"), None, b"{}"),
    ];
    let n_bad = cases.len();
    for (subject, headers, body) in cases {
        let ack = match headers {
            Some(h) => js
                .publish_with_headers(subject.clone(), h, Bytes::from_static(body))
                .await
                .expect("plain publish"),
            None => js
                .publish(subject.clone(), Bytes::from_static(body))
                .await
                .expect("plain publish"),
        };
        ack.await.unwrap_or_else(|e| panic!("{subject}: {e}"));
    }
    bus.publish(&topic, &event("good", 2))
        .await
        .expect("publish");
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let h = h.clone();
            async move {
                h.lock().push((e.aggregate_id.clone(), e.event_version));
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    let mut dlq = t
        .subscribe(SubscriptionSpec::new(
            topic.dead_letter(".dlq").expect("topic"),
            "inspect",
        ))
        .await
        .expect("dlq subscribe");
    let mut reasons = Vec::new();
    while reasons.len() < n_bad {
        let d = tokio::time::timeout(Duration::from_secs(30), next_raw(&mut dlq))
            .await
            .expect("dead letters within 30 s")
            .expect("dlq stream open")
            .expect("dlq delivery");
        let h = &d.message.headers;
        assert_eq!(h.get("dualbus-dlq-kind"), Some("malformed"), "{h:?}");
        let reason = h.get("dualbus-dlq-reason").expect("reason").to_owned();
        assert!(!reason.is_empty());
        reasons.push(reason);
        d.ack().await.expect("ack");
    }
    eprintln!("dead-letter reasons: {reasons:#?}");
    wait_for(|| handled.lock().len() == 2).await;
    assert_eq!(
        *handled.lock(),
        [("good".to_owned(), 1), ("good".to_owned(), 2)]
    );
    drop(sub);
    drop(dlq);
    bus.close().await.expect("close");
}

/// An existing stream with other settings is a configuration error naming the difference,
/// unless updating is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_other_settings_is_refused_unless_update_is_asked() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-settings");
    let js = plain(&url).await;
    js.create_stream(jetstream::stream::Config {
        name: dualbus_nats::jetstream::stream_name("DUALBUS_", &topic),
        subjects: vec![format!("{topic}.*")],
        subject_transform: Some(partitioned(&topic, 16)),
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let t = transport(&url).await;
    let e = t
        .publish(&topic, outbound(&t, "k"))
        .await
        .expect_err("other settings");
    assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("max_age"), "{e}");
    let mut config = fast_config(url.clone());
    config.jetstream.stream.update_existing = true;
    let t2 = JetStream::connect(config).await.expect("connect");
    t2.publish(&topic, outbound(&t2, "k"))
        .await
        .expect("updated");
    t.close().await.expect("close");
    t2.close().await.expect("close");
}

/// The subject transform of a topic's stream with `partitions` partitions.
fn partitioned(topic: &str, partitions: u32) -> jetstream::stream::SubjectTransform {
    jetstream::stream::SubjectTransform {
        source: format!("{topic}.*"),
        destination: format!("{topic}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"),
    }
}

/// A stream of another partition count, or of the older layout without the transform, is
/// refused with the migration to follow, even with `update_existing`: changing the
/// partitioning moves aggregates between partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_another_partitioning_is_refused_with_the_migration() {
    let Some(url) = shared_url() else { return };
    let js = plain(&url).await;
    let older = unique_topic("js-older");
    js.create_stream(jetstream::stream::Config {
        name: dualbus_nats::jetstream::stream_name("DUALBUS_", &older),
        subjects: vec![format!("{older}.*.*")],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let four = unique_topic("js-four");
    js.create_stream(jetstream::stream::Config {
        name: dualbus_nats::jetstream::stream_name("DUALBUS_", &four),
        subjects: vec![format!("{four}.*")],
        subject_transform: Some(partitioned(&four, 4)),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let mut config = fast_config(url.clone());
    config.jetstream.stream.update_existing = true;
    config.jetstream.consumer.update_existing = true;
    let t = JetStream::connect(config.clone()).await.expect("connect");
    for topic in [&older, &four] {
        let e = t
            .publish(topic, outbound(&t, "k"))
            .await
            .expect_err("another partitioning");
        let text = e.to_string();
        assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
        assert!(text.contains("nats.jetstream.partitions"), "{text}");
        assert!(text.contains("drain"), "{text}");
        assert!(text.contains("16 partitions"), "{text}");
        let e = t
            .subscribe(SubscriptionSpec::new(topic.clone(), "g"))
            .await
            .expect_err("subscribing is refused too");
        assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
    }
    t.close().await.expect("close");
    // The topic's own count matches the stream: accepted, events land by that count.
    let mut settings = dualbus_nats::jetstream::TopicSettings::default();
    settings.partitions = Some(4);
    config.jetstream.topics.insert(four.to_string(), settings);
    let t = JetStream::connect(config).await.expect("connect");
    let stream = js
        .get_stream(dualbus_nats::jetstream::stream_name("DUALBUS_", &four))
        .await
        .expect("stream");
    for i in 0..64 {
        let key = format!("agg.{i}/ü");
        let r = t.publish(&four, outbound(&t, &key)).await.expect("publish");
        let seq = u64::try_from(r.position.expect("position").offset).expect("u64");
        let stored = stream.get_raw_message(seq).await.expect("stored");
        assert_eq!(
            parse_subject(&four, &stored.subject),
            Some((partition_of(&key, 4), key.clone())),
            "the server's partition is the client's"
        );
    }
    t.close().await.expect("close");
}

/// An event as the domain bus would hand it to `t`.
fn outbound(t: &JetStream, key: &str) -> dualbus_core::OutboundMessage {
    let encoded = dualbus_core::Codec::CloudEvents
        .encode(
            &event(key, 1),
            dualbus_core::HeaderStyle::HyphenPercentEncoded,
            "js-tests",
        )
        .expect("encode");
    dualbus_core::OutboundMessage::new(
        encoded,
        DomainTransport::capabilities(t),
        dualbus_core::Write::Publish,
    )
    .expect("checked")
}

/// Bad settings and a server without JetStream are clear errors at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_and_missing_jetstream_are_clear_errors() {
    let Some(url) = shared_url() else { return };
    let mut js = JetStreamConfig::default();
    js.consumer.batch = 0;
    let e = JetStream::connect(NatsConfig::new([url]).with_jetstream(js))
        .await
        .expect_err("batch 0");
    assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
    let Some(bin) = server_binary() else { return };
    // A server without -js.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = std::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = JetStream::connect(fast_config(format!("nats://127.0.0.1:{port}")))
        .await
        .expect_err("no JetStream");
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("-js"), "{e}");
}

/// A subscriber that dies without closing keeps its group until its lease expires; then
/// the standby takes over and first gets, in order, what the dead one left unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_after_a_crash_rewinds_to_the_ack_floor() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-takeover");
    let first = transport(&url).await;
    let b1 = bus(first.clone());
    for v in 1..=5 {
        b1.publish(&topic, &event("agg", v)).await.expect("publish");
    }
    // The first subscriber handles v1 and v2, then hangs in v3.
    let seen1 = Arc::new(Mutex::new(Vec::new()));
    let s1 = seen1.clone();
    let sub1 = b1
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let s1 = s1.clone();
            async move {
                s1.lock().push(e.event_version);
                if e.event_version == 3 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    wait_for(|| seen1.lock().len() == 3).await;
    // The process dies: its connection drops without a goodbye.
    first.client().drain().await.expect("drain");
    std::mem::forget(sub1);

    let second = transport(&url).await;
    let b2 = bus(second);
    let seen2 = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen2.clone();
    let handler = handler_fn(move |e: Event| {
        let s2 = s2.clone();
        async move {
            s2.lock().push((e.event_version, e.delivery_count));
            Ok::<_, HandleError>(())
        }
    });
    // The dead subscriber's lease is still held: a subscriber that does not stand by is
    // refused; one that does waits and takes over once the lease expired.
    let e = b2
        .subscribe(&topic)
        .standby(false)
        .start(handler.clone())
        .await
        .expect_err("the dead subscriber's lease was free at once");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let started = Instant::now();
    let sub2 = b2
        .subscribe(&topic)
        .start(handler.clone())
        .await
        .expect("subscribe as a standby");
    wait_for(|| seen2.lock().len() >= 3).await;
    eprintln!("took over after {:?}", started.elapsed());
    let seen = seen2.lock().clone();
    let versions: Vec<u64> = seen.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, [3, 4, 5], "{seen:?}");
    assert!(seen[0].1 >= 2, "v3 was delivered before: {seen:?}");
    drop(sub2);
    b2.close().await.expect("close");
}

/// While the server is down a publish fails within the request timeout with a retryable
/// error (never a success); after the restart the same transport publishes again, and a
/// simple-bus subscription receives again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_publishes_fail_clearly_and_clients_reconnect() {
    let Some(bin) = server_binary() else { return };
    let mut server = Server::start(bin);
    let url = server.url();
    let t = transport(&url).await;
    let topic = unique_topic("js-outage");
    t.publish(&topic, outbound(&t, "k")).await.expect("publish");
    let simple = dualbus_nats::Nats::connect(NatsConfig::new([url.clone()]))
        .await
        .expect("connect simple");
    let notes_topic = dualbus_core::Topic::new("notes").expect("topic");
    let mut notes = dualbus_core::SimpleTransport::subscribe(&simple, &notes_topic, None)
        .await
        .expect("subscribe");

    server.kill();
    let started = Instant::now();
    let e = t
        .publish(&topic, outbound(&t, "k"))
        .await
        .expect_err("no server");
    assert!(e.is_retryable(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    eprintln!("publish during the outage: {e}");

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match t.publish(&topic, outbound(&t, "k")).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("after restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no publish after the restart: {e}"),
        }
    }
    let got = async {
        loop {
            let note = dualbus_core::SimpleOutbound::new(
                dualbus_core::Message::new("notes", "after restart"),
                dualbus_core::SimpleTransport::capabilities(&simple),
            )
            .expect("checked");
            dualbus_core::SimpleTransport::publish(&simple, note)
                .await
                .expect("simple publish");
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(300), notes.next()).await
            {
                return m;
            }
        }
    };
    let m = tokio::time::timeout(Duration::from_secs(30), got)
        .await
        .expect("the subscription resumed");
    assert_eq!(&m.payload[..], b"after restart");
    t.close().await.expect("close");
}

/// A stream deleted behind the transport's back: the next publish fails clearly, the one
/// after it creates the stream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_created_again() {
    let Some(url) = shared_url() else { return };
    let t = transport(&url).await;
    let topic = unique_topic("js-deleted");
    t.publish(&topic, outbound(&t, "k")).await.expect("publish");
    plain(&url)
        .await
        .delete_stream(dualbus_nats::jetstream::stream_name("DUALBUS_", &topic))
        .await
        .expect("delete");
    let e = t
        .publish(&topic, outbound(&t, "k"))
        .await
        .expect_err("no stream");
    assert!(e.is_retryable(), "{e}");
    let r = t
        .publish(&topic, outbound(&t, "k"))
        .await
        .expect("recreated");
    assert_eq!(r.position.map(|p| p.offset), Some(1));
    // The same through batches.
    plain(&url)
        .await
        .delete_stream(dualbus_nats::jetstream::stream_name("DUALBUS_", &topic))
        .await
        .expect("delete");
    let failed = t.publish_batch(&topic, vec![outbound(&t, "k")]).await;
    let e = failed[0].as_ref().expect_err("no stream");
    assert!(e.is_retryable(), "{e}");
    let again = t.publish_batch(&topic, vec![outbound(&t, "k")]).await;
    let r = again[0].as_ref().expect("recreated by the batch");
    assert_eq!(r.position.map(|p| p.offset), Some(1));
    t.close().await.expect("close");
}

/// An existing durable consumer with other settings is a configuration error naming the
/// difference, unless updating is asked for; an unchanged one is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_other_settings_is_refused_unless_update_is_asked() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-consumer");
    // One partition: the group's one consumer is named after the group.
    let one = |mut c: NatsConfig| {
        c.jetstream.partitions = 1;
        c
    };
    let t = JetStream::connect(one(fast_config(url.clone())))
        .await
        .expect("connect");
    t.publish(&topic, outbound(&t, "k")).await.expect("publish");
    let stream = plain(&url)
        .await
        .get_stream(dualbus_nats::jetstream::stream_name("DUALBUS_", &topic))
        .await
        .expect("stream");
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("billing".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("create consumer");
    let e = t
        .subscribe(SubscriptionSpec::new(topic.clone(), "billing"))
        .await
        .expect_err("other settings");
    assert!(matches!(e, dualbus_core::Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("ack_wait"), "{e}");
    let mut config = one(fast_config(url.clone()));
    config.jetstream.consumer.update_existing = true;
    let t2 = JetStream::connect(config).await.expect("connect");
    let mut sub = t2
        .subscribe(SubscriptionSpec::new(topic.clone(), "billing"))
        .await
        .expect("updated");
    let d = tokio::time::timeout(Duration::from_secs(10), next_raw(&mut sub))
        .await
        .expect("a delivery")
        .expect("open")
        .expect("delivery");
    d.ack().await.expect("ack");
    drop(sub);
    let info = stream.consumer_info("billing").await.expect("info");
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
    t.close().await.expect("close");
    t2.close().await.expect("close");
}

/// Dropping a subscription and subscribing again at once, in the same process, succeeds
/// even for a subscriber that does not stand by: the new subscription waits for the old
/// one's lease release instead of reporting a conflict with itself. Repeated, so that the release is still on its way each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_right_after_a_drop_succeeds() {
    let Some(url) = shared_url() else { return };
    // One partition: one active subscriber per group.
    let single = || async {
        let mut c = fast_config(url.clone());
        c.jetstream.partitions = 1;
        JetStream::connect(c).await.expect("connect")
    };
    let mine = bus(single().await);
    let topic = unique_topic("js-resub");
    for round in 0..5 {
        let sub = mine
            .subscribe(&topic)
            .standby(false)
            .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
            .await
            .unwrap_or_else(|e| panic!("subscribe, round {round}: {e}"));
        drop(sub);
    }
    // Another client still sees the group taken while a subscription is live (and stands
    // by unless asked not to).
    let live = mine
        .subscribe(&topic)
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .expect("subscribe");
    let other = bus(single().await);
    let e = other
        .subscribe(&topic)
        .standby(false)
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .expect_err("the group is held");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    drop(live);
    mine.close().await.expect("close");
    other.close().await.expect("close");
}

/// The member timeout is the max age of the group's member bucket: a subscriber's
/// registration expires that long after its last heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_bucket_expires_after_the_member_timeout() {
    let Some(url) = shared_url() else { return };
    let prefix = format!("MT{}_", uuid::Uuid::now_v7().simple());
    let mut config = fast_config(url.clone());
    config.jetstream.stream.prefix = prefix.clone();
    config.jetstream.consumer.member_timeout = Duration::from_millis(1500);
    let b = bus(JetStream::connect(config).await.expect("connect"));
    let topic = unique_topic("js-members");
    let sub = b
        .subscribe(&topic)
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .expect("subscribe");
    let members = plain(&url)
        .await
        .get_key_value(format!("{prefix}MEMBERS"))
        .await
        .expect("the member bucket");
    let status = members.status().await.expect("status");
    assert_eq!(status.max_age(), Duration::from_millis(1500));
    let mut keys = members.keys().await.expect("keys");
    assert!(keys.next().await.is_some(), "the subscriber is registered");
    drop(sub);
    b.close().await.expect("close");
}

/// The pin of the consumer as the server reports it.
async fn pinned_client(js: &jetstream::Context, stream: &str, consumer: &str) -> Option<String> {
    let info = js
        .get_stream(stream)
        .await
        .expect("stream")
        .consumer_info(consumer)
        .await
        .expect("consumer info")
        .clone();
    info.priority_groups
        .first()
        .and_then(|g| g.pinned_client_id.clone())
}

/// The pin fences a former owner that missed the end of its lease. The lease moves on the
/// server to another holder, which moves the pin (`unpin`) and pulls with a plain client;
/// the former owner's next pull is refused (`423`), it asks the server whether the lease
/// is still its own, learns it is not and pulls no more, long before its next renewal
/// would have told it. It must not pull again without its pin id: that would take the pin
/// back. Everything published after the move reaches the new holder only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_fences_a_former_owner_that_missed_its_lease_end() {
    let Some(url) = shared_url() else { return };
    let topic = unique_topic("js-pin");
    let mut config = fast_config(url.clone());
    config.jetstream.partitions = 1;
    // Renewals every 10 s: the former owner does not find the loss by renewing during the
    // test.
    config.jetstream.consumer.lease_ttl = Duration::from_secs(30);
    let a = bus(JetStream::connect(config).await.expect("connect"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let sub = a
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                s.lock().push(e.event_version);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    a.publish(&topic, &event("agg", 1)).await.expect("publish");
    wait_for(|| seen.lock().len() == 1).await;

    let js = plain(&url).await;
    let stream_name = dualbus_nats::jetstream::stream_name("DUALBUS_", &topic);
    let consumer_name = dualbus_nats::jetstream::consumer_name("js-tests");
    let stream = js.get_stream(&stream_name).await.expect("stream");
    let pin_a = pinned_client(&js, &stream_name, &consumer_name)
        .await
        .expect("the first message pinned the owner");
    // The lease changes hands on the server while its holder lives on (as after a pause
    // longer than the lease), and the new holder moves the pin.
    let leases = js
        .get_key_value("DUALBUS_LEASES")
        .await
        .expect("lease bucket");
    let mut keys = leases.keys().await.expect("keys");
    let mut key = None;
    while let Some(k) = keys.next().await {
        let k = k.expect("key");
        if k.starts_with(&stream_name.replace('%', "=")) {
            key = Some(k);
        }
    }
    let key = key.expect("the lease key");
    leases
        .put(&key, Bytes::from_static(b"another member"))
        .await
        .expect("take the lease");
    stream
        .unpin_consumer(&consumer_name, "dualbus")
        .await
        .expect("unpin");
    for v in 2..=5 {
        a.publish(&topic, &event("agg", v)).await.expect("publish");
    }
    // The new holder pulls without a pin id and takes the pin with the first message.
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&consumer_name).await.expect("consumer");
    let mut messages = consumer
        .stream()
        .group("dualbus")
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("pull");
    let mut theirs = Vec::new();
    while theirs.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .expect("the new holder got nothing: the former owner took the pin back")
            .expect("a message")
            .expect("message");
        theirs.push(m.info().expect("info").stream_sequence);
        m.ack().await.expect("ack");
    }
    assert_eq!(theirs, [2, 3, 4, 5], "in stream order");
    assert_eq!(
        *seen.lock(),
        [1],
        "the former owner handled events after the pin moved"
    );
    let pin_now = pinned_client(&js, &stream_name, &consumer_name).await;
    assert!(pin_now.is_some() && pin_now != Some(pin_a), "{pin_now:?}");
    drop(sub);
    a.close().await.expect("close");
}
