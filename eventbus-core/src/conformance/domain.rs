//! Domain-bus conformance tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::TimeZone as _;
use futures::StreamExt as _;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Backend, OrderChecker, event, mix, unique_topic, wait_for};
use crate::codec::{Codec, HeaderStyle};
use crate::domain::{DomainBus, DomainBusBuilder, Subscription};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::headers::Headers;
use crate::message::{InboundMessage, OutboundMessage};
use crate::pool::{PoolConfig, dlq_headers};
use crate::retry::Backoff;
use crate::transport::{DomainTransport, DynDomainTransport, SubscriptionSpec};

pub(super) const SOURCE: &str = "conformance";

pub(super) fn fast_retry(attempts: u32) -> Backoff {
    Backoff::new(
        attempts,
        Duration::from_millis(1),
        Duration::from_millis(10),
    )
}

pub(super) async fn bus_with(
    backend: &dyn Backend,
    f: impl FnOnce(DomainBusBuilder) -> DomainBusBuilder,
) -> DomainBus {
    let t = backend.domain().await.expect("connect domain transport");
    f(DomainBusBuilder::from_dyn(t)
        .source(SOURCE)
        .retry(fast_retry(5)))
    .build()
    .expect("build domain bus")
}

pub(super) async fn bus(backend: &dyn Backend) -> DomainBus {
    bus_with(backend, |b| b).await
}

/// Publishes `versions` events for each aggregate, interleaved, receipting them in `checker`.
async fn publish_interleaved(
    bus: &DomainBus,
    topic: &str,
    checker: &OrderChecker,
    aggregates: &[String],
    versions: u64,
) {
    for v in 1..=versions {
        for a in aggregates {
            bus.publish(topic, &event(a, v)).await.expect("publish");
            checker.published(a, v);
        }
    }
}

fn aggregates(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Waits until the broker shows nothing pending for `group` (if it can tell), marks the run
/// quiescent, watches for stray redeliveries, then checks C1, C2, C3 and C6.
pub(super) async fn finish(
    backend: &dyn Backend,
    bus: &DomainBus,
    topic: &str,
    group: &str,
    checker: &OrderChecker,
) -> super::Summary {
    match super::settle_and_check(backend, bus.transport(), topic, group, checker).await {
        Ok(s) => s,
        Err(v) => panic!("order checker: {v}"),
    }
}

/// Subscribes, retrying while an earlier subscriber of the group is still letting go.
async fn subscribe_when_free<H>(
    bus: &DomainBus,
    topic: &str,
    f: impl Fn(crate::domain::DomainSubscribeBuilder) -> crate::domain::DomainSubscribeBuilder,
    handler: H,
) -> Subscription
where
    H: tower::Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
    H::Future: Send + 'static,
{
    loop {
        match f(bus.subscribe(topic)).start(handler.clone()).await {
            Ok(s) => return s,
            Err(e) if e.kind() == ErrorKind::Conflict => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("subscribe: {e}"),
        }
    }
}

/// Reads `n` raw messages of `topic` with a fresh group, acknowledging them.
pub(super) async fn read_raw(
    transport: &DynDomainTransport,
    topic: &str,
    n: usize,
) -> Vec<InboundMessage> {
    let mut sub = transport
        .subscribe(SubscriptionSpec::new(
            topic,
            format!("inspect-{}", uuid::Uuid::now_v7().simple()),
        ))
        .await
        .expect("subscribe raw");
    let mut out = Vec::new();
    while out.len() < n {
        match super::next_raw(&mut sub).await {
            Some(Ok(d)) => {
                d.ack().await.expect("ack raw");
                out.push(d.message);
            }
            Some(Err(_)) => {}
            None => panic!("raw stream ended after {} of {n} messages", out.len()),
        }
    }
    out
}

fn ok_handler() -> impl tower::Service<Event, Response = (), Error = HandleError, Future = impl Send>
+ Clone
+ Send
+ Sync {
    handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) })
}

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

/// Per-aggregate order under random handler failures and delays: 12 aggregates, 30 events
/// each, a fixed seed list (printed), judged by the order checker (C1, C2, C3, C6).
pub async fn order_under_failures(backend: &dyn Backend) {
    let seeds = backend.settings().seeds;
    for seed in 0..seeds {
        println!("order_under_failures: seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        let concurrency = rng.usize(2..=16);
        let bus = bus_with(backend, |b| {
            b.retry(fast_retry(12)).pool(PoolConfig {
                max_concurrency: concurrency,
                max_in_flight: rng.usize(16..=256),
                max_per_key: rng.usize(2..=16),
                ..PoolConfig::default()
            })
        })
        .await;
        let topic = unique_topic(&format!("domain-order-s{seed}"));
        let checker = OrderChecker::new();
        let handler = handler_fn(move |e: Event| async move {
            let roll = mix(seed, &e.aggregate_id, e.event_version, e.attempt);
            if roll.is_multiple_of(7) {
                tokio::time::sleep(Duration::from_micros(roll % 2000)).await;
            } else if roll.is_multiple_of(5) {
                tokio::task::yield_now().await;
            }
            if roll.is_multiple_of(4) {
                return Err(HandleError::msg(format!("injected failure (seed {seed})")));
            }
            Ok(())
        });
        let sub = bus
            .subscribe(&topic)
            .observer(checker.observer(0))
            .start(checker.wrap(0, handler))
            .await
            .expect("subscribe");
        let aggs = aggregates("agg", 12);
        publish_interleaved(&bus, &topic, &checker, &aggs, 30).await;
        wait_for(|| checker.distinct_ends() == 12 * 30).await;
        let summary = finish(backend, &bus, &topic, SOURCE, &checker).await;
        let stats = sub.stats();
        assert_eq!(summary.published, 360);
        assert!(stats.retried > 0, "seed {seed}: no failure was injected");
        assert_eq!(
            stats.handled + stats.dead_lettered,
            stats.acked + stats.ack_failures
        );
        println!(
            "order_under_failures: seed {seed} ok: {} events, {} retries, {} dead-lettered, {} duplicates",
            summary.published, stats.retried, summary.dead_lettered, summary.duplicates
        );
        drop(sub);
        bus.close().await.expect("close");
    }
}

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

/// Transport-level redelivery: after `nack`, and after the ack deadline passes.
pub async fn nack_and_deadline_redelivery(backend: &dyn Backend) {
    let t = backend.domain().await.expect("connect");
    let topic = unique_topic("domain-nack");
    let style = t.capabilities().header_style;
    let wire = Codec::CloudEvents
        .encode(&event("n-1", 1), style, SOURCE)
        .expect("encode");
    t.publish(&topic, wire).await.expect("publish");
    let mut sub = t
        .subscribe(SubscriptionSpec::new(&topic, "nack"))
        .await
        .expect("subscribe");
    let first = super::next_raw(&mut sub)
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(first.delivery_count, 1);
    first.nack(Duration::ZERO).await.expect("nack");
    let second = sub
        .deliveries
        .next()
        .await
        .expect("redelivery")
        .expect("ok");
    assert_eq!(second.position(), first.position());
    assert_eq!(second.delivery_count, 2);
    if let Some(deadline) = t.capabilities().ack_deadline {
        // No ack, no progress: the broker redelivers after the deadline.
        let third = sub
            .deliveries
            .next()
            .await
            .expect("redelivery after deadline")
            .expect("ok");
        assert_eq!(third.position(), first.position());
        assert_eq!(third.delivery_count, 3);
        third.ack().await.expect("ack");
        let more = tokio::time::timeout(deadline * 2, super::next_raw(&mut sub)).await;
        assert!(more.is_err(), "an acknowledged message came back: {more:?}");
    } else {
        second.ack().await.expect("ack");
    }
    drop(sub);
    assert_eq!(
        t.pending(&topic, "nack")
            .await
            .expect("pending")
            .unwrap_or(0),
        0
    );
    t.close().await.expect("close");
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

fn ce(style: HeaderStyle, name: &str) -> String {
    match style {
        HeaderStyle::Nats => format!("ce-{name}"),
        HeaderStyle::Kafka => format!("ce_{name}"),
    }
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
            t.publish(
                &topic,
                OutboundMessage {
                    key,
                    headers,
                    payload,
                    id: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("inject {name}: {e}"));
        }
    }
    for (name, headers, payload) in cases.iter().skip(10).cloned() {
        t.publish(
            &topic,
            OutboundMessage {
                key: format!("bad-{name}").replace(' ', "-"),
                headers,
                payload,
                id: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("inject {name}: {e}"));
    }
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, ok_handler()))
        .await
        .expect("subscribe");
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

/// Graceful shutdown, abrupt drop and resubscribe: nothing is lost, order holds across
/// the restarts.
pub async fn resubscribe(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: 40,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-resub");
    let checker = OrderChecker::new();
    let slow = handler_fn(|_e: Event| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, HandleError>(())
    });
    publish_interleaved(&bus, &topic, &checker, &aggregates("re", 10), 20).await;
    let first = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(0)),
        checker.wrap(0, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() >= 50).await;
    let report = first.shutdown().await;
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(
        report.abandoned + report.dropped + report.parked,
        0,
        "{report:?}"
    );
    checker.crash(0);
    let second = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() >= 100).await;
    second.abort().await;
    checker.crash(1);
    let third = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(2)),
        checker.wrap(2, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 200).await;
    let s = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(s.published, 200);
    drop(third);
    bus.close().await.expect("close");
}

/// Double and concurrent close are safe; afterwards every operation fails with `Closed`.
pub async fn close(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-close");
    let checker = OrderChecker::new();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, ok_handler()))
        .await
        .expect("subscribe");
    publish_interleaved(&bus, &topic, &checker, &aggregates("c", 2), 5).await;
    wait_for(|| checker.distinct_ends() == 10).await;
    let (a, b) = tokio::join!(bus.close(), bus.close());
    a.expect("close");
    b.expect("concurrent close");
    bus.close().await.expect("third close");
    assert!(bus.is_closed());
    let closed =
        |r: Result<(), Error>| assert_eq!(r.expect_err("after close").kind(), ErrorKind::Closed);
    closed(bus.publish(&topic, &event("c-0", 6)).await.map(|_| ()));
    closed(
        bus.publish_batch(&topic, &[event("c-0", 6)])
            .await
            .map(|_| ()),
    );
    closed(bus.subscribe(&topic).start(ok_handler()).await.map(|_| ()));
    closed(bus.replay(&topic, "c-0").await.map(|_| ()));
    assert!(sub.stats().acked >= 10);
    drop(sub);
    checker.check().expect("order");
    let again = self::bus(backend).await;
    again
        .publish(&topic, &event("c-0", 6))
        .await
        .expect("another client still publishes");
    again.close().await.expect("close");
}

/// Graceful shutdown finishes in-flight and buffered work: nothing abandoned, nothing
/// dropped, and a new subscriber handles exactly the rest.
pub async fn graceful_drain(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: 64,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-drain");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &aggregates("d", 30), 10).await;
    let slow = handler_fn(|_e: Event| async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, HandleError>(())
    });
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, slow))
        .await
        .expect("subscribe");
    wait_for(|| checker.distinct_ends() >= 50 && sub.stats().in_flight > 4).await;
    let report = sub.shutdown_within(Duration::from_secs(60)).await;
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(
        (report.abandoned, report.dropped, report.parked),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.drained > 0, "the drain finished nothing: {report:?}");
    assert_eq!(report.stats.acked, report.stats.handled, "{report:?}");
    assert_eq!(report.stats.in_flight, 0);
    let handled_first = report.stats.handled;
    if let Some(p) = bus
        .transport()
        .pending(&topic, SOURCE)
        .await
        .expect("pending")
    {
        assert_eq!(
            p,
            300 - handled_first,
            "acked work must not be pending, unacked must"
        );
    }
    checker.crash(0);
    let rest = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, slow),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 300).await;
    let s = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(s.duplicates, 0, "a drained event was handled again");
    assert_eq!(rest.stats().handled, 300 - handled_first);
    drop(rest);
    bus.close().await.expect("close");
}

/// At the drain deadline, a stuck handler is abandoned and buffered work is returned
/// unacknowledged; a new subscriber handles all of it, in order.
pub async fn drain_deadline(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-deadline");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &["stuck".to_owned()], 3).await;
    publish_interleaved(&bus, &topic, &checker, &aggregates("free", 4), 5).await;
    let started = Arc::new(AtomicBool::new(false));
    let st = started.clone();
    let stuck = handler_fn(move |e: Event| {
        let st = st.clone();
        async move {
            if e.aggregate_id == "stuck" {
                st.store(true, Ordering::SeqCst);
                futures::future::pending::<()>().await;
            }
            Ok::<_, HandleError>(())
        }
    });
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, stuck))
        .await
        .expect("subscribe");
    wait_for(|| {
        checker.distinct_ends() == 20
            && started.load(Ordering::SeqCst)
            && sub.stats().in_flight == 3
    })
    .await;
    let report = sub.shutdown_within(Duration::from_millis(100)).await;
    assert!(report.timed_out, "{report:?}");
    assert_eq!((report.abandoned, report.dropped), (1, 2), "{report:?}");
    checker.crash(0);
    let rest = subscribe_when_free(
        &bus,
        &topic,
        |b| b.observer(checker.observer(1)),
        checker.wrap(1, ok_handler()),
    )
    .await;
    wait_for(|| checker.distinct_ends() == 23).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(rest);
    bus.close().await.expect("close");
}

/// A slow handler does not make the buffer grow: at most `max_in_flight` deliveries held.
pub async fn backpressure(backend: &dyn Backend) {
    const MAX: usize = 20;
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 4,
            max_in_flight: MAX,
            max_per_key: 5,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-backpressure");
    let checker = OrderChecker::new();
    publish_interleaved(&bus, &topic, &checker, &aggregates("bp", 50), 10).await;
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, HandleError>(())
            }),
        ))
        .await
        .expect("subscribe");
    let mut samples = 0;
    while checker.distinct_ends() < 500 {
        let held = sub.stats().in_flight as usize;
        assert!(
            held <= MAX,
            "{held} deliveries held, more than max_in_flight {MAX}"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(samples > 1);
    let s = sub.stats();
    assert!(
        s.peak_in_flight as usize <= MAX,
        "peak {} > {MAX}",
        s.peak_in_flight
    );
    assert!(
        s.peak_in_flight > 4,
        "the buffer never filled: the test proved nothing"
    );
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// A blocked aggregate stalls no other aggregate, even with two workers (a fixed
/// hash-to-worker pool would stall about half of them).
pub async fn slow_key_does_not_stall_others(backend: &dyn Backend) {
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_concurrency: 2,
            ..PoolConfig::default()
        })
    })
    .await;
    let topic = unique_topic("domain-slowkey");
    let checker = OrderChecker::new();
    let gate = Arc::new(Notify::new());
    let open = Arc::new(AtomicBool::new(false));
    let (g, o) = (gate.clone(), open.clone());
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |e: Event| {
                let (g, o) = (g.clone(), o.clone());
                async move {
                    if e.aggregate_id == "slow" {
                        while !o.load(Ordering::SeqCst) {
                            let n = g.notified();
                            if o.load(Ordering::SeqCst) {
                                break;
                            }
                            n.await;
                        }
                    }
                    Ok::<_, HandleError>(())
                }
            }),
        ))
        .await
        .expect("subscribe");
    let mut aggs = vec!["slow".to_owned()];
    aggs.extend(aggregates("fast", 20));
    publish_interleaved(&bus, &topic, &checker, &aggs, 5).await;
    // Every other aggregate completes while "slow" is blocked on its first event.
    wait_for(|| checker.distinct_ends() == 100).await;
    assert!(
        checker
            .records()
            .iter()
            .all(|r| !matches!(r, super::Record::End { a, .. } if a == "slow")),
        "the slow aggregate was not blocked"
    );
    open.store(true, Ordering::SeqCst);
    gate.notify_waiters();
    wait_for(|| checker.distinct_ends() == 105).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
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

/// All events of one aggregate can be read back in order (if declared).
pub async fn replay(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-replay");
    if !bus.capabilities().replay {
        let e = bus
            .replay(&topic, "a")
            .await
            .expect_err("replay is not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    let checker = OrderChecker::new();
    let weird = "order/1 ü.*>%".to_owned();
    let aggs = vec![
        "a".to_owned(),
        "b".to_owned(),
        "a-b".to_owned(),
        weird.clone(),
    ];
    publish_interleaved(&bus, &topic, &checker, &aggs, 5).await;
    for a in &aggs {
        let got = bus.replay(&topic, a).await.expect("replay");
        let versions: Vec<u64> = got.iter().map(|e| e.event_version).collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "replay of {a:?}");
        assert!(
            got.iter().all(|e| &e.aggregate_id == a),
            "replay of {a:?} returned other aggregates"
        );
    }
    assert!(
        bus.replay(&topic, "unknown")
            .await
            .expect("replay")
            .is_empty()
    );
    let e = bus
        .replay(&topic, " ")
        .await
        .expect_err("blank aggregate id");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    bus.close().await.expect("close");
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
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, ok_handler()))
        .await
        .expect("subscribe");
    wait_for(|| checker.distinct_ends() == 200).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// Without consumer groups, a second active subscriber of one group is refused (or kept
/// standby): two members never interleave one aggregate.
pub async fn single_active_consumer(backend: &dyn Backend) {
    let bus = bus(backend).await;
    if bus.capabilities().consumer_groups {
        return;
    }
    let topic = unique_topic("domain-single");
    let checker = OrderChecker::new();
    let first = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(0, ok_handler()))
        .await
        .expect("subscribe");
    let other = self::bus(backend).await;
    match other
        .subscribe(&topic)
        .start(checker.wrap(1, ok_handler()))
        .await
    {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{e}"),
        Ok(standby) => {
            // A standby member: order must hold whichever member handles.
            publish_interleaved(&bus, &topic, &checker, &aggregates("s", 4), 10).await;
            wait_for(|| checker.distinct_ends() == 40).await;
            finish(backend, &bus, &topic, SOURCE, &checker).await;
            drop(standby);
        }
    }
    drop(first);
    bus.close().await.expect("close");
    other.close().await.expect("close");
}

/// Deliveries that wait longer than the backend's ack deadline (behind a slow event of
/// their aggregate, or in a slow handler) are kept alive by progress signals: the broker
/// redelivers none of them.
pub async fn deadline_extension(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let Some(deadline) = bus.capabilities().ack_deadline else {
        return;
    };
    let topic = unique_topic("domain-extend");
    let checker = OrderChecker::new();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |e: Event| async move {
                assert_eq!(
                    e.delivery_count, 1,
                    "{} v{} was redelivered while held",
                    e.aggregate_id, e.event_version
                );
                if e.aggregate_id == "slow" && e.event_version == 1 {
                    tokio::time::sleep(deadline * 3).await;
                }
                Ok::<_, HandleError>(())
            }),
        ))
        .await
        .expect("subscribe");
    publish_interleaved(
        &bus,
        &topic,
        &checker,
        &["slow".to_owned(), "other".to_owned()],
        4,
    )
    .await;
    wait_for(|| checker.distinct_ends() == 8).await;
    let s = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(s.duplicates, 0);
    assert_eq!(
        sub.stats().duplicates_dropped,
        0,
        "the broker redelivered held deliveries"
    );
    drop(sub);
    bus.close().await.expect("close");
}

/// A key whose backlog reaches `max_per_key` pauses its partition: the pool stops pulling
/// it while the other partitions keep flowing (when the backend can pause partitions).
pub async fn per_key_cap(backend: &dyn Backend) {
    const CAP: usize = 4;
    let bus = bus_with(backend, |b| {
        b.pool(PoolConfig {
            max_per_key: CAP,
            max_in_flight: 1000,
            ..PoolConfig::default()
        })
    })
    .await;
    if !bus.capabilities().pause_partitions {
        return;
    }
    let topic = unique_topic("domain-perkey");
    let checker = OrderChecker::new();
    let open = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Notify::new());
    let partitions: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (o, g, parts) = (open.clone(), gate.clone(), partitions.clone());
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |e: Event| {
                let (o, g, parts) = (o.clone(), g.clone(), parts.clone());
                async move {
                    parts
                        .lock()
                        .insert(e.aggregate_id.clone(), e.position.partition);
                    if e.aggregate_id == "hot" {
                        while !o.load(Ordering::SeqCst) {
                            let n = g.notified();
                            if o.load(Ordering::SeqCst) {
                                break;
                            }
                            n.await;
                        }
                    }
                    Ok::<_, HandleError>(())
                }
            }),
        ))
        .await
        .expect("subscribe");
    let others = aggregates("cool", 30);
    for v in 1..=40u64 {
        bus.publish(&topic, &event("hot", v))
            .await
            .expect("publish");
        checker.published("hot", v);
    }
    publish_interleaved(&bus, &topic, &checker, &others, 3).await;
    // Every aggregate outside the hot partition completes while "hot" is blocked...
    wait_for(|| {
        let parts = partitions.lock();
        let Some(hot) = parts.get("hot").copied() else {
            return false;
        };
        let ends = checker.records();
        others.iter().all(|a| match parts.get(a) {
            Some(p) if *p == hot => true,
            Some(_) => {
                ends.iter()
                    .filter(|r| matches!(r, super::Record::End { a: x, .. } if x == a))
                    .count()
                    == 3
            }
            None => false,
        })
    })
    .await;
    // ...and the hot partition stopped at the cap instead of buffering all 40 events.
    let held = sub.stats().in_flight as usize;
    assert!(
        held <= CAP + 1,
        "{held} deliveries held: the hot partition was not paused at {CAP}"
    );
    open.store(true, Ordering::SeqCst);
    gate.notify_waiters();
    wait_for(|| checker.distinct_ends() == 40 + 90).await;
    finish(backend, &bus, &topic, SOURCE, &checker).await;
    drop(sub);
    bus.close().await.expect("close");
}

/// Appends checked against an aggregate's expected version: the right version succeeds, a
/// stale one is a conflict naming the current version, and of two racing appends exactly
/// one wins (if declared).
pub async fn expected_version(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-expected");
    if !bus.capabilities().expected_version {
        let e = bus
            .append(&topic, &event("a", 1), 0)
            .await
            .expect_err("not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    bus.append(&topic, &event("acc", 1), 0)
        .await
        .expect("v1 on a new aggregate");
    bus.append(&topic, &event("acc", 2), 1)
        .await
        .expect("v2 after v1");
    // Another aggregate in the same topic does not count.
    bus.append(&topic, &event("other", 1), 0)
        .await
        .expect("v1 of another aggregate");
    let stale = bus
        .append(&topic, &event("acc", 2), 1)
        .await
        .expect_err("v2 exists");
    assert_eq!(stale.kind(), ErrorKind::Conflict, "{stale}");
    assert!(stale.to_string().contains("version 2"), "{stale}");
    let wrong = bus
        .append(&topic, &event("acc", 5), 2)
        .await
        .expect_err("must carry 3");
    assert_eq!(wrong.kind(), ErrorKind::InvalidInput, "{wrong}");
    // Two writers race for v3: exactly one wins.
    let other = self::bus(backend).await;
    let (mine, theirs) = (event("acc", 3), event("acc", 3));
    let (a, b) = tokio::join!(
        bus.append(&topic, &mine, 2),
        other.append(&topic, &theirs, 2)
    );
    let wins = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(wins, 1, "racing appends: {a:?} {b:?}");
    for r in [a, b] {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    // The broker-side check itself: two writers read the same last position, both publish
    // conditioned on it; the second must be refused even though its pre-check passed.
    let t = bus.transport();
    let last = t
        .last_for_key(&topic, "acc")
        .await
        .expect("last")
        .map(|m| m.position);
    assert!(last.is_some());
    let style = t.capabilities().header_style;
    let v4 = Codec::CloudEvents
        .encode(&event("acc", 4), style, SOURCE)
        .expect("encode");
    let v4b = Codec::CloudEvents
        .encode(&event("acc", 4), style, SOURCE)
        .expect("encode");
    t.publish_if_last(&topic, v4, last)
        .await
        .expect("first conditional publish");
    let e = t
        .publish_if_last(&topic, v4b, last)
        .await
        .expect_err("the position moved");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let none = Codec::CloudEvents
        .encode(&event("fresh", 1), style, SOURCE)
        .expect("encode");
    let taken = Codec::CloudEvents
        .encode(&event("acc", 1), style, SOURCE)
        .expect("encode");
    t.publish_if_last(&topic, none, None)
        .await
        .expect("no message of `fresh` yet");
    let e = t
        .publish_if_last(&topic, taken, None)
        .await
        .expect_err("`acc` has messages");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    if bus.capabilities().replay {
        let versions: Vec<u64> = bus
            .replay(&topic, "acc")
            .await
            .expect("replay")
            .iter()
            .map(|e| e.event_version)
            .collect();
        assert_eq!(
            versions,
            vec![1, 2, 3, 4],
            "the history has no duplicate or gap"
        );
    }
    bus.close().await.expect("close");
    other.close().await.expect("close");
}
