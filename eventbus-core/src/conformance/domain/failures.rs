//! Handler and input failures: retry in place, and dead letters (with reason headers) of
//! exhausted, permanent and malformed messages, while other aggregates keep flowing.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::support::{
    SOURCE, aggregates, bus, bus_with, ce, fast_retry, finish, ok_handler, publish_interleaved,
    read_raw, subscribe_checked,
};
use crate::codec::{Codec, HeaderStyle};
use crate::conformance::{Backend, OrderChecker, event, unique_topic, wait_for};
use crate::error::HandleError;
use crate::handler::{Event, handler_fn};
use crate::headers::Headers;
use crate::message::{EncodedMessage, OutboundMessage};
use crate::pool::dlq_headers;
use crate::transport::DomainTransport;

/// A handler that fails twice then succeeds is retried in place and handled once.
pub async fn retry_then_success(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| b.retry(fast_retry(5))).await;
    let topic = unique_topic("domain-retry");
    let attempts: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let at = attempts.clone();
    let checker = OrderChecker::new();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |e: Event| {
                let at = at.clone();
                async move {
                    at.lock().push((e.event_version, e.attempt));
                    if e.event_version == 1 && e.attempt < 3 {
                        return Err(HandleError::msg("not yet"));
                    }
                    Ok(())
                }
            }),
        ))
        .await
        .expect("subscribe");
    publish_interleaved(&bus, &topic, &checker, &["r".to_owned()], 3).await;
    wait_for(|| checker.distinct_ends() == 3).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(
        *attempts.lock(),
        vec![(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)],
        "retry must be in place, later events wait"
    );
    let s = sub.stats();
    assert_eq!((s.retried, s.handled, s.dead_lettered), (2, 3, 0));
    drop(sub);
    bus.close().await.expect("close");
}

/// Exhausted and permanent failures go to the dead letter with reason headers, are acked,
/// and do not hold up other aggregates.
pub async fn dead_letter(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| b.retry(fast_retry(3))).await;
    let topic = unique_topic("domain-dlq");
    let checker = OrderChecker::new();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|e: Event| async move {
                match e.aggregate_id.as_str() {
                    "bad" => Err(HandleError::msg("database unavailable")),
                    "perm" => Err(HandleError::permanent(crate::Failure(
                        "invalid order".into(),
                    ))),
                    "boom" => panic!("handler bug"),
                    _ => Ok(()),
                }
            }),
        ))
        .await
        .expect("subscribe");
    let aggs: Vec<String> = ["good", "bad", "perm", "boom"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    publish_interleaved(&bus, &topic, &checker, &aggs, 2).await;
    wait_for(|| checker.distinct_ends() == 8).await;
    let summary = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(summary.dead_lettered, 6);
    let dlq = read_raw(bus.transport(), &format!("{topic}.dlq"), 6).await;
    let mut kinds: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for m in &dlq {
        let envelope = Codec::decode(m).expect("dead letter keeps the original encoding");
        let h = |n| m.headers.get(n).unwrap_or_default().to_owned();
        assert_eq!(h(dlq_headers::TOPIC), topic);
        assert!(!h(dlq_headers::REASON).is_empty());
        kinds
            .entry(envelope.aggregate_id.clone())
            .or_default()
            .push((h(dlq_headers::KIND), h(dlq_headers::ATTEMPTS)));
        if envelope.aggregate_id == "bad" {
            assert!(
                h(dlq_headers::REASON).contains("database unavailable"),
                "{}",
                h(dlq_headers::REASON)
            );
        }
        if envelope.aggregate_id == "boom" {
            assert!(
                h(dlq_headers::REASON).contains("panicked"),
                "{}",
                h(dlq_headers::REASON)
            );
        }
    }
    let want = |k: &str, n: &str| vec![(k.to_owned(), n.to_owned()), (k.to_owned(), n.to_owned())];
    assert_eq!(kinds["bad"], want("exhausted", "3"));
    assert_eq!(kinds["perm"], want("permanent", "1"));
    assert_eq!(kinds["boom"], want("permanent", "1"));
    assert!(!kinds.contains_key("good"));
    let s = sub.stats();
    assert_eq!((s.handled, s.dead_lettered, s.acked), (2, 6, 8));
    drop(sub);
    bus.close().await.expect("close");
}

fn valid_ce(style: HeaderStyle, aggregate: &str, version: &str) -> Headers {
    let mut h = Headers::new();
    for (n, v) in [
        ("specversion", "1.0"),
        ("id", "evt-1"),
        ("source", "tests"),
        ("type", "T"),
        ("time", "2026-01-01T00:00:00Z"),
        ("subject", aggregate),
        ("aggregateversion", version),
    ] {
        h.insert(ce(style, n), v);
    }
    h
}

/// A message written below the publisher's codec, checked for the transport as core checks
/// every write.
fn raw(
    t: &crate::DynDomainTransport,
    key: String,
    headers: Headers,
    payload: Bytes,
) -> OutboundMessage {
    let m = EncodedMessage {
        key,
        headers,
        payload,
        id: None,
    };
    OutboundMessage::new(m, t.capabilities(), crate::Write::Publish).expect("a raw message")
}

/// Each malformed input of the wire contract, injected below the publisher's validation,
/// goes to the dead letter with a reason while other aggregates keep flowing.
pub async fn malformed_input(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let t = bus.transport().clone();
    let style = t.capabilities().header_style;
    let topic = unique_topic("domain-malformed");
    let long_id = "x".repeat(300);
    let mut cases: Vec<(&str, Headers, Bytes)> = Vec::new();
    cases.push((
        "no codec",
        Headers::new(),
        Bytes::from_static(b"not json at all"),
    ));
    let mut h = valid_ce(style, "m-1", "1");
    h.insert(ce(style, "specversion"), "0.3");
    cases.push(("specversion", h, Bytes::from_static(b"{}")));
    let mut h = valid_ce(style, "m-2", "1");
    h.remove(&ce(style, "id"));
    cases.push(("missing id", h, Bytes::from_static(b"{}")));
    cases.push((
        "version text",
        valid_ce(style, "m-3", "abc"),
        Bytes::from_static(b"{}"),
    ));
    cases.push((
        "version zero",
        valid_ce(style, "m-4", "0"),
        Bytes::from_static(b"{}"),
    ));
    cases.push(("empty payload", valid_ce(style, "m-5", "1"), Bytes::new()));
    cases.push((
        "blank aggregate",
        valid_ce(style, " ", "1"),
        Bytes::from_static(b"{}"),
    ));
    let mut h = valid_ce(style, "m-7", "1");
    h.insert(ce(style, "time"), "yesterday");
    cases.push(("bad time", h, Bytes::from_static(b"{}")));
    cases.push((
        "long aggregate id",
        valid_ce(style, &long_id, "1"),
        Bytes::from_static(b"{}"),
    ));
    cases.push((
        "jxt missing type",
        Headers::new(),
        Bytes::from_static(br#"{"event_id":"e","aggregate_id":"m-9","event_version":1,"timestamp":"2026-01-01T00:00:00Z","payload":{}}"#),
    ));
    cases.push((
        "jxt negative version",
        Headers::new(),
        Bytes::from_static(br#"{"event_id":"e","aggregate_id":"m-10","event_type":"T","event_version":-1,"timestamp":"2026-01-01T00:00:00Z","payload":{}}"#),
    ));
    cases.push((
        "jxt null payload",
        Headers::new(),
        Bytes::from_static(br#"{"event_id":"e","aggregate_id":"m-11","event_type":"T","event_version":1,"timestamp":"2026-01-01T00:00:00Z","payload":null}"#),
    ));
    let n_bad = cases.len();
    let checker = OrderChecker::new();
    let aggs = aggregates("ok", 5);
    // Interleave: bad messages between good ones.
    for v in 1..=10u64 {
        for a in &aggs {
            bus.publish(&topic, &event(a, v)).await.expect("publish");
            checker.published(a, v);
        }
        if let Some((name, headers, payload)) = cases.get(v as usize - 1).cloned() {
            let key = format!("bad-key-{}", v);
            t.publish(&topic, raw(&t, key, headers, payload))
                .await
                .unwrap_or_else(|e| panic!("inject {name}: {e}"));
        }
    }
    for (name, headers, payload) in cases.iter().skip(10).cloned() {
        let key = format!("bad-{name}").replace(' ', "-");
        t.publish(&topic, raw(&t, key, headers, payload))
            .await
            .unwrap_or_else(|e| panic!("inject {name}: {e}"));
    }
    let sub = subscribe_checked(&bus, &topic, &checker, ok_handler()).await;
    wait_for(|| checker.distinct_ends() == 50 && sub.stats().malformed as usize == n_bad).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    let dlq = read_raw(&t, &format!("{topic}.dlq"), n_bad).await;
    for m in &dlq {
        assert_eq!(m.headers.get(dlq_headers::KIND), Some("malformed"));
        let reason = m.headers.get(dlq_headers::REASON).unwrap_or_default();
        assert!(reason.len() > 5, "dead letter without a reason: {m:?}");
        assert_eq!(m.headers.get(dlq_headers::ATTEMPTS), Some("0"));
    }
    let s = sub.stats();
    assert_eq!(s.handled, 50);
    assert_eq!(s.dead_lettered as usize, n_bad);
    drop(sub);
    bus.close().await.expect("close");
}
