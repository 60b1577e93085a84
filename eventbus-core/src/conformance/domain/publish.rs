//! Publishing: every envelope field survives the trip in every codec, a subscription sees
//! only its topic, a batch keeps each aggregate's order, and bad input is refused before
//! it reaches the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use chrono::TimeZone as _;
use parking_lot::Mutex;

use super::support::{
    SOURCE, aggregates, bus, bus_with, ce, finish, ok_handler, publish_interleaved,
    subscribe_checked,
};
use crate::codec::Codec;
use crate::conformance::{Backend, OrderChecker, event, unique_topic, wait_for};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::transport::DomainTransport;

/// Every envelope field survives the trip, in every codec.
pub async fn publish_subscribe(backend: &dyn Backend) {
    for codec in [
        Codec::CloudEvents,
        Codec::CloudEventsStructured,
        Codec::JxtJson,
        Codec::JxtJsonStringTenant,
    ] {
        let bus = bus_with(backend, |b| b.codec(codec)).await;
        let topic = unique_topic("domain-ps");
        let at = chrono::Utc
            .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
            .single()
            .expect("valid time")
            + chrono::Duration::nanoseconds(123_456_789);
        // jxt-core reads tenant ids as integers since v1.1.36.
        let tenant = if codec == Codec::JxtJson {
            "9"
        } else {
            "tenant 9"
        };
        let mut sent = Envelope::new(
            "order-1",
            "OrderCreated",
            1,
            r#"{"total": 42, "note": "a<b & ü"}"#,
        )
        .expect("valid")
        .with_occurred_at(at)
        .with_source("checkout")
        .with_correlation_id("corr-1")
        .with_causation_id("cmd-7")
        .with_tenant_id(tenant)
        .with_content_type("application/json")
        .with_header("x-custom", "value with space, ü and %")
        // Trace context as OpenTelemetry's W3C propagator writes it.
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tracestate", "vendor=a,other=b c");
        if codec.is_jxt() {
            sent = sent.with_trace_id("4bf92f3577b34da6a3ce929d0e0e4736");
        }
        bus.publish(&topic, &sent).await.expect("publish");
        let got: Arc<Mutex<Vec<Event>>> = Arc::default();
        let g = got.clone();
        let sub = bus
            .subscribe(&topic)
            .start(handler_fn(move |e: Event| {
                let g = g.clone();
                async move {
                    g.lock().push(e);
                    Ok::<_, HandleError>(())
                }
            }))
            .await
            .expect("subscribe");
        wait_for(|| sub.stats().acked == 1).await;
        let e = got.lock()[0].clone();
        let r = &*e.envelope;
        assert_eq!(r.event_id, sent.event_id, "{codec:?}");
        assert_eq!(r.aggregate_id, sent.aggregate_id);
        assert_eq!(r.event_type, sent.event_type);
        assert_eq!(r.event_version, 1);
        assert_eq!(r.occurred_at, at, "{codec:?}: time not exact");
        assert_eq!(r.source.as_deref(), Some("checkout"));
        assert_eq!(r.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(r.causation_id.as_deref(), Some("cmd-7"));
        assert_eq!(r.tenant_id, sent.tenant_id, "{codec:?}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            r.headers.get("x-custom"),
            Some("value with space, ü and %"),
            "{codec:?}"
        );
        assert_eq!(
            r.headers.get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "{codec:?}"
        );
        assert_eq!(
            r.headers.get("tracestate"),
            Some("vendor=a,other=b c"),
            "{codec:?}"
        );
        assert_eq!(e.topic.as_ref(), topic);
        assert_eq!((e.attempt, e.delivery_count), (1, 1));
        match codec {
            Codec::CloudEvents | Codec::CloudEventsStructured => {
                assert_eq!(r.payload, sent.payload);
                assert_eq!(r.trace_id, None);
            }
            _ => {
                // jxt JSON embeds the payload compactly, as Go's encoding/json does.
                let v: serde_json::Value =
                    serde_json::from_slice(&r.payload).expect("json payload");
                assert_eq!(v, serde_json::json!({"total": 42, "note": "a<b & ü"}));
                assert_eq!(r.trace_id, sent.trace_id);
            }
        }
        drop(sub);
        bus.close().await.expect("close");
    }
}

/// A subscription sees only its topic (not a sub-topic, not the dead letter).
pub async fn topic_isolation(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let a = unique_topic("domain-iso");
    let b = format!("{a}.child");
    let checker = OrderChecker::new();
    let seen_b = Arc::new(AtomicUsize::new(0));
    let sb = seen_b.clone();
    let sub_a = bus
        .subscribe(&a)
        .observer(checker.observer(0))
        .start(checker.wrap(0, ok_handler()))
        .await
        .expect("subscribe a");
    let sub_b = bus
        .subscribe(&b)
        .start(handler_fn(move |e: Event| {
            let sb = sb.clone();
            async move {
                assert!(
                    e.aggregate_id.starts_with("b-"),
                    "topic b received {}",
                    e.aggregate_id
                );
                sb.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe b");
    publish_interleaved(&bus, &a, &checker, &aggregates("a", 3), 10).await;
    for v in 1..=10 {
        bus.publish(&b, &event("b-0", v)).await.expect("publish b");
    }
    wait_for(|| checker.distinct_ends() == 30 && seen_b.load(Ordering::SeqCst) == 10).await;
    let s = finish(backend, &bus, &a, SOURCE, &checker).await;
    assert_eq!(s.published, 30);
    assert_eq!(
        seen_b.load(Ordering::SeqCst),
        10,
        "topic b got extra messages"
    );
    drop((sub_a, sub_b));
    bus.close().await.expect("close");
}

/// Bad input gets a clear error before anything reaches the broker.
pub async fn bad_input(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-bad");
    for t in ["", "a b", "a..b", ".a", "a>", "ü"] {
        let e = bus.publish(t, &event("a", 1)).await.expect_err("bad topic");
        assert!(matches!(e, Error::InvalidTopic { .. }), "{t:?}: {e}");
        let e = bus
            .subscribe(t)
            .start(ok_handler())
            .await
            .expect_err("bad topic");
        assert!(matches!(e, Error::InvalidTopic { .. }), "{t:?}: {e}");
    }
    let bad: Vec<(&str, Envelope)> = vec![
        ("empty aggregate id", Envelope::unchecked("", "T", 1, "{}")),
        (
            "blank aggregate id",
            Envelope::unchecked("  ", "T", 1, "{}"),
        ),
        (
            "long aggregate id",
            Envelope::unchecked("a".repeat(257), "T", 1, "{}"),
        ),
        ("empty type", Envelope::unchecked("a", "", 1, "{}")),
        ("version 0", Envelope::unchecked("a", "T", 0, "{}")),
        (
            "empty payload",
            Envelope::unchecked("a", "T", 1, Bytes::new()),
        ),
        (
            "empty event id",
            Envelope::unchecked("a", "T", 1, "{}").with_event_id(""),
        ),
        (
            "CR/LF header",
            Envelope::unchecked("a", "T", 1, "{}").with_header("x", "a\r\nb"),
        ),
        (
            "bad header name",
            Envelope::unchecked("a", "T", 1, "{}").with_header("a b", "v"),
        ),
        (
            "reserved header",
            Envelope::unchecked("a", "T", 1, "{}")
                .with_header(ce(bus.capabilities().header_style, "id"), "v"),
        ),
    ];
    for (what, e) in &bad {
        let err = bus.publish(&topic, e).await.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{what}: {err}");
        assert!(matches!(err, Error::InvalidEnvelope(_)), "{what}: {err}");
    }
    let max = bus.capabilities().max_payload;
    let big = Envelope::unchecked("a", "T", 1, vec![b'x'; max + 1]);
    let err = bus.publish(&topic, &big).await.expect_err("oversized");
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    let err = bus
        .publish_batch(
            &topic,
            &[event("a", 1), Envelope::unchecked("", "T", 2, "{}")],
        )
        .await
        .expect_err("a batch with an invalid envelope is refused whole");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let jxt = bus_with(backend, |b| b.codec(Codec::JxtJson)).await;
    let err = jxt
        .publish(&topic, &Envelope::unchecked("a", "T", 1, "not json"))
        .await
        .expect_err("jxt carries JSON only");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    // Nothing reached the broker.
    if let Some(p) = bus
        .transport()
        .pending(&topic, "inspect")
        .await
        .expect("pending")
    {
        assert_eq!(p, 0, "a refused publish reached the broker");
    }
    bus.close().await.expect("close");
    jxt.close().await.expect("close");
}

/// A batch keeps each aggregate's order; every receipt is reported.
pub async fn publish_batch_order(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-batch");
    let checker = OrderChecker::new();
    let aggs = aggregates("bt", 8);
    let mut batch = Vec::new();
    for v in 1..=25 {
        for a in &aggs {
            batch.push(event(a, v));
        }
    }
    let results = bus.publish_batch(&topic, &batch).await.expect("batch");
    assert_eq!(results.len(), 200);
    for (e, r) in batch.iter().zip(&results) {
        r.as_ref().expect("receipt");
        checker.published(&e.aggregate_id, e.event_version);
    }
    let sub = subscribe_checked(&bus, &topic, &checker, ok_handler()).await;
    wait_for(|| checker.distinct_ends() == 200).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}
