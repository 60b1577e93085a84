//! Sharing a NATS topic with jxt-core: the "subject = topic, aggregate id in the body"
//! layout on a shared stream, with jxt-core's JSON envelope.
//!
//! A plain client writes the bytes jxt-core writes (its envelope JSON on the subject named
//! by the topic, no headers); our bus publishes on the same topic in jxt JSON mode. Our
//! subscriber handles both, in order per aggregate; what our bus stored is jxt-core's
//! format on the topic's own subject.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use dualbus_core::conformance::{unique_topic, wait_for};
use dualbus_core::{Codec, DomainBus, Envelope, ErrorKind, Event, HandleError, handler_fn};
use dualbus_nats::JetStream;
use dualbus_nats::jetstream::{Layout, TopicSettings};
use parking_lot::Mutex;
use support::{fast_config, shared_url};

/// What jxt-core's `Envelope.ToBytes` writes (Go struct field order, `omitempty` on the
/// optional ids, the payload embedded as raw JSON).
fn jxt_bytes(aggregate: &str, version: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"event_id":"go-{aggregate}-{version}","aggregate_id":"{aggregate}","event_type":"OrderChanged","event_version":{version},"timestamp":"2026-03-01T12:30:05.123456789Z","payload":{{"by":"go","v":{version}}}}}"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_shared_with_jxt_core() {
    let Some(url) = shared_url() else { return };
    // A shared stream in jxt-core's manner (its default is BUSINESS_STREAM on `business.>`),
    // unique to this run.
    let root = unique_topic("biz").replace('-', "_");
    let stream = format!("{}_STREAM", root.to_uppercase());
    let topic = format!("{root}.orders");
    let mut config = fast_config(url.clone());
    let mut shared = TopicSettings::default();
    shared.layout = Layout::Subject;
    shared.stream = Some(stream.clone());
    shared.stream_subjects = vec![format!("{root}.>")];
    config.jetstream.topics.insert(topic.clone(), shared);
    let transport = JetStream::connect(config).await.expect("connect");
    let bus = DomainBus::builder(transport.clone())
        .source("orders-rs")
        .codec(Codec::JxtJson)
        .build()
        .expect("build");

    // The Go side publishes first (the stream is created by our bus, as jxt-core's
    // would be: a plain client publishing needs it).
    let js = jetstream::new(async_nats::connect(url.as_str()).await.expect("plain"));
    bus.publish(&topic, &rust_event("rs-0", 1))
        .await
        .expect("publish");
    let info = js.get_stream(&stream).await.expect("shared stream");
    assert_eq!(info.cached_info().config.subjects, [format!("{root}.>")]);

    let aggregates = ["go-1", "go-2", "mixed"];
    let mut ours = 0;
    for v in 1..=5u64 {
        for a in aggregates {
            if a == "mixed" && v % 2 == 0 {
                // Every other event of "mixed" comes from our bus.
                let r = bus
                    .publish(&topic, &rust_event(a, v))
                    .await
                    .expect("publish");
                ours = u64::try_from(r.position.expect("position").offset).expect("u64");
            } else {
                js.publish(topic.clone(), jxt_bytes(a, v))
                    .await
                    .expect("plain publish")
                    .await
                    .expect("stored");
            }
        }
    }

    // Our bus's message on the wire: jxt-core's JSON (golden-tested in dualbus-core) on the
    // topic's own subject, the aggregate id only in the body.
    let raw = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .get_raw_message(ours)
        .await
        .expect("our message");
    assert_eq!(raw.subject.as_str(), topic);
    let body = std::str::from_utf8(&raw.payload).expect("utf-8");
    assert!(
        body.starts_with(r#"{"event_id":""#)
            && body.contains(r#","aggregate_id":"mixed","event_type":"OrderChanged","event_version":4,"timestamp":""#)
            && body.ends_with(r#","correlation_id":"checkout-1","payload":{"by":"rust","v":4}}"#),
        "{body}"
    );
    assert!(
        raw.headers
            .iter()
            .all(|(k, _)| !k.to_string().starts_with("ce-")),
        "no CloudEvents headers in jxt mode"
    );

    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let s = seen.clone();
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                s.lock()
                    .entry(e.aggregate_id.clone())
                    .or_default()
                    .push(e.event_version);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    wait_for(|| seen.lock().values().map(Vec::len).sum::<usize>() == 16).await;
    let seen = seen.lock().clone();
    for a in aggregates {
        assert_eq!(seen[a], [1, 2, 3, 4, 5], "{a}: {seen:?}");
    }
    assert_eq!(seen["rs-0"], [1]);

    // Replay reads the whole topic and keeps one aggregate.
    let history = bus.replay(&topic, "mixed").await.expect("replay");
    let versions: Vec<u64> = history.iter().map(|e| e.event_version).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    // Appends need the aggregate on the subject: refused clearly here.
    let e = bus
        .append(&topic, &rust_event("mixed", 6), 5)
        .await
        .expect_err("no append on the subject layout");
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    drop(sub);
    bus.close().await.expect("close");
    let _ = js.delete_stream(&stream).await;
}

fn rust_event(aggregate: &str, version: u64) -> Envelope {
    Envelope::new(
        aggregate,
        "OrderChanged",
        version,
        format!(r#"{{"by":"rust","v":{version}}}"#),
    )
    .expect("valid")
    .with_correlation_id("checkout-1")
}
