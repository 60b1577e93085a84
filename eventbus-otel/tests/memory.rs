//! The layers on the in-process backend: one trace across two hops, batches, retries and
//! dead letters in the trace, the size limit with trace headers, request-reply, the
//! link-only option, and metric values after a known workload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dualbus_core::{
    Codec, DomainBusBuilder, Envelope, Error, Event, HandleError, Message, SimpleBus, handler_fn,
};
use dualbus_memory::{Memory, MemoryConfig};
use dualbus_otel::{ConsumerParent, OtelConfig, SamplerKind};
use opentelemetry::trace::{FutureExt as _, SpanKind, TraceContextExt as _};
use support::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_publisher_through_two_handlers() {
    let h = Harness::new(&OtelConfig::default());
    let bus = domain_bus(Memory::new(), &h);
    domain_trace(&bus, &h, "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simple_bus_continues_the_publishers_trace() {
    let h = Harness::new(&OtelConfig::default());
    simple_trace(Memory::new(), &h, "memory").await;
}

/// In jxt JSON mode the envelope's `trace_id` travels in the body: it names the trace the
/// headers carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_trace_id_names_the_same_trace() {
    let h = Harness::new(&OtelConfig::default());
    let bus = DomainBusBuilder::new(Memory::new())
        .codec(Codec::JxtJson)
        .layer(h.otel.tracing())
        .build()
        .unwrap();
    let topic = unique("otel-jxt");
    let (sub, mut rx) = collecting(&bus, &topic).await;
    let root = h.root("job");
    let trace = root.span().span_context().trace_id();
    let e = Envelope::new("a-1", "Done", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e)
        .with_context(root.clone())
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;
    assert_eq!(got.trace_id.as_deref(), Some(trace.to_string().as_str()));
}

/// A batch is one CLIENT `send` span linking to a PRODUCER `create` span per message; each
/// message's `process` span is the child of its own `create` span. With `create_spans`
/// off, the messages carry the `send` span's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_links_one_send_span_to_a_create_span_per_message() {
    for create_spans in [true, false] {
        let config = OtelConfig {
            create_spans,
            ..OtelConfig::default()
        };
        let h = Harness::new(&config);
        let bus = domain_bus(Memory::new(), &h);
        let topic = unique("otel-batch");
        let (sub, mut rx) = collecting(&bus, &topic).await;
        let root = h.root("import");
        let trace = root.span().span_context().trace_id();
        let batch: Vec<Envelope> = (1..=3)
            .map(|v| Envelope::new(format!("agg-{v}"), "Imported", 1, &b"{}"[..]).unwrap())
            .collect();
        let results = bus
            .publish_batch(topic.as_str(), &batch)
            .with_context(root.clone())
            .await
            .unwrap();
        assert!(results.iter().all(Result::is_ok));
        for _ in 0..3 {
            tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .unwrap()
                .unwrap();
        }
        sub.shutdown().await;
        let spans = h.finished_spans();
        let send = span(&spans, trace, &format!("send {topic}"));
        assert_eq!(send.span_kind, SpanKind::Client);
        assert_eq!(
            attr(send, "messaging.batch.message_count").as_deref(),
            Some("3")
        );
        let creates: Vec<_> = spans
            .iter()
            .filter(|s| s.name == format!("create {topic}"))
            .collect();
        let processes: Vec<_> = spans
            .iter()
            .filter(|s| s.name == format!("process {topic}"))
            .collect();
        assert_eq!(processes.len(), 3);
        if create_spans {
            assert_eq!(creates.len(), 3);
            assert_eq!(send.links.links.len(), 3);
            for c in &creates {
                assert_eq!(c.span_kind, SpanKind::Producer);
                assert_eq!(c.span_context.trace_id(), trace);
                assert!(links_to(send, c));
                let p = processes
                    .iter()
                    .find(|p| p.parent_span_id == c.span_context.span_id())
                    .expect("each create span has its process span");
                assert_eq!(
                    attr(p, "messaging.message.id"),
                    attr(c, "messaging.message.id")
                );
            }
        } else {
            assert!(creates.is_empty());
            for p in &processes {
                assert_eq!(p.parent_span_id, send.span_context.span_id());
            }
        }
    }
}

/// A retried attempt and a dead-lettered event are in the trace (two `process` spans, the
/// second `ok`; a `process` span `dead_lettered` and a `send <topic>.dlq` span in the
/// publisher's trace), and the metrics count the workload exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_are_in_the_trace_and_the_metrics() {
    let h = Harness::new(&OtelConfig::default());
    let bus = domain_bus(Memory::new(), &h);
    let topic = unique("otel-failures");
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let c = calls.clone();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |e: Event| {
            let tx = tx.clone();
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                match (e.aggregate_id.as_str(), e.attempt) {
                    ("flaky", 1) => Err(HandleError::retryable(std::io::Error::other("busy"))),
                    ("poison", _) => {
                        tx.send("poison".into()).ok();
                        Err(HandleError::permanent(std::io::Error::other(
                            "cannot parse",
                        )))
                    }
                    (id, _) => {
                        tx.send(id.to_owned()).ok();
                        Ok(())
                    }
                }
            }
        }))
        .await
        .unwrap();
    let root = h.root("batch job");
    let trace = root.span().span_context().trace_id();
    for id in ["ok-1", "ok-2", "flaky", "poison"] {
        let e = Envelope::new(id, "Happened", 1, &b"{}"[..]).unwrap();
        bus.publish(topic.as_str(), &e)
            .with_context(root.clone())
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(
            tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // The dead letter is published after the attempt: wait until the pool says so.
    tokio::time::timeout(DEADLINE, async {
        while sub.stats().dead_lettered < 1 || sub.stats().acked < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    sub.shutdown().await;
    assert_eq!(
        calls.load(Ordering::Relaxed),
        5,
        "4 events, one retried once"
    );

    let spans = h.finished_spans();
    let processes: Vec<_> = spans
        .iter()
        .filter(|s| s.name == format!("process {topic}") && s.span_context.trace_id() == trace)
        .collect();
    assert_eq!(processes.len(), 5);
    let by_outcome = |o: &str| {
        processes
            .iter()
            .filter(|s| attr(s, "dualbus.outcome").as_deref() == Some(o))
            .count()
    };
    assert_eq!(
        (
            by_outcome("ok"),
            by_outcome("retried"),
            by_outcome("dead_lettered")
        ),
        (3, 1, 1)
    );
    let retried = processes
        .iter()
        .find(|s| attr(s, "dualbus.outcome").as_deref() == Some("retried"))
        .unwrap();
    assert_eq!(attr(retried, "dualbus.attempt").as_deref(), Some("1"));
    assert_eq!(attr(retried, "error.type").as_deref(), Some("retryable"));
    assert!(matches!(
        retried.status,
        opentelemetry::trace::Status::Error { .. }
    ));
    assert!(
        !retried.events.events.is_empty(),
        "the error is recorded as an event"
    );
    let second = processes
        .iter()
        .find(|s| {
            attr(s, "dualbus.aggregate_id").as_deref() == Some("flaky")
                && attr(s, "dualbus.attempt").as_deref() == Some("2")
        })
        .unwrap();
    assert_eq!(attr(second, "dualbus.outcome").as_deref(), Some("ok"));
    assert_eq!(
        second.parent_span_id, retried.parent_span_id,
        "both attempts continue the same send"
    );
    let poisoned = processes
        .iter()
        .find(|s| attr(s, "dualbus.outcome").as_deref() == Some("dead_lettered"))
        .unwrap();
    assert_eq!(attr(poisoned, "error.type").as_deref(), Some("permanent"));
    let dlq = span(&spans, trace, &format!("send {topic}.dlq"));
    assert_eq!(dlq.span_kind, SpanKind::Producer);
    assert_eq!(
        attr(dlq, "dualbus.publish.kind").as_deref(),
        Some("dead_letter")
    );
    assert_eq!(
        attr(dlq, "dualbus.dead_letter.kind").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        dlq.parent_span_id, poisoned.parent_span_id,
        "the dead letter continues the poisoned message's trace"
    );
    assert!(
        dlq.links
            .links
            .iter()
            .any(|l| l.span_context.span_id() == poisoned.parent_span_id)
    );

    // Metrics of the same workload.
    let t = topic.as_str();
    let dlq_topic = format!("{topic}.dlq");
    assert_eq!(
        h.metric(
            "messaging.client.sent.messages",
            &[("messaging.destination.name", t)]
        ),
        4
    );
    assert_eq!(
        h.metric(
            "messaging.client.sent.messages",
            &[("messaging.destination.name", &dlq_topic)]
        ),
        1
    );
    assert_eq!(
        h.metric(
            "messaging.client.operation.duration",
            &[
                ("messaging.destination.name", t),
                ("messaging.operation.type", "send")
            ]
        ),
        4
    );
    assert_eq!(
        h.metric(
            "messaging.client.consumed.messages",
            &[
                ("messaging.destination.name", t),
                ("messaging.consumer.group.name", "otel-tests")
            ]
        ),
        4
    );
    assert_eq!(
        h.metric(
            "messaging.process.duration",
            &[("messaging.destination.name", t)]
        ),
        5
    );
    assert_eq!(
        h.metric(
            "messaging.process.duration",
            &[
                ("messaging.destination.name", t),
                ("error.type", "retryable")
            ]
        ),
        1
    );
    assert_eq!(
        h.metric(
            "messaging.process.duration",
            &[
                ("messaging.destination.name", t),
                ("error.type", "permanent")
            ]
        ),
        1
    );
    assert_eq!(
        h.metric(
            "messaging.process.duration",
            &[
                ("messaging.destination.name", t),
                ("dualbus.outcome", "dead_lettered")
            ]
        ),
        1
    );
    assert_eq!(
        h.metric(
            "messaging.process.duration",
            &[("messaging.destination.name", t), ("dualbus.outcome", "ok")]
        ),
        3
    );
}

/// The pool's gauges and the lag are reported per subscription while it runs: partitions
/// owned and acquired, nothing in flight and no lag once every event was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_gauges_and_lag_are_reported_per_subscription() {
    let config = OtelConfig {
        lag_interval: Duration::from_millis(50),
        ..OtelConfig::default()
    };
    let h = Harness::new(&config);
    let memory = Memory::with_config(MemoryConfig::default().with_partitions(4)).unwrap();
    let bus = domain_bus(memory, &h);
    let topic = unique("otel-gauges");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |_e: Event| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    for v in 1..=5 {
        let e = Envelope::new("one-aggregate", "Step", v, &b"{}"[..]).unwrap();
        bus.publish(topic.as_str(), &e).await.unwrap();
    }
    let t = topic.as_str();
    let with = [
        ("messaging.destination.name", t),
        ("messaging.consumer.group.name", "otel-tests"),
    ];
    // Held: five deliveries of one aggregate, one running, four queued behind it; the
    // broker counts all five as not acknowledged.
    tokio::time::timeout(DEADLINE, async {
        while sub.stats().in_flight < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.metric("dualbus.pool.in_flight", &with), 5);
    assert_eq!(h.metric("dualbus.pool.keys", &with), 1);
    assert_eq!(h.metric("dualbus.pool.key_queue.depth", &with), 4);
    assert_eq!(h.metric("dualbus.consumer.lag", &with), 5);
    assert_eq!(h.metric("dualbus.consumer.partitions.owned", &with), 4);
    let mut h_with = with.to_vec();
    h_with.push(("dualbus.handover", "acquired"));
    assert_eq!(h.metric("dualbus.consumer.handovers", &h_with), 4);

    gate.add_permits(5);
    tokio::time::timeout(DEADLINE, async {
        while sub.stats().acked < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.metrics.reset();
    assert_eq!(h.metric("dualbus.pool.in_flight", &with), 0);
    assert_eq!(h.metric("dualbus.pool.key_queue.depth", &with), 0);
    assert_eq!(h.metric("dualbus.consumer.lag", &with), 0);

    assert_eq!(h.points("dualbus.pool.in_flight", &with), 1);

    // A second member joins: the first hands partitions over (released after a drain).
    let second = bus
        .subscribe(topic.as_str())
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        while sub.stats().partitions_released < 1
            || sub.active_partitions().len() + second.active_partitions().len() < 4
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let released = sub.stats().partitions_released;
    h.metrics.reset();
    let mut r_with = with.to_vec();
    r_with.push(("dualbus.handover", "released"));
    assert_eq!(h.metric("dualbus.consumer.handovers", &r_with), released);
    // Members of one group in one process share a series: their values add up.
    assert_eq!(h.points("dualbus.pool.in_flight", &with), 1);
    assert_eq!(h.metric("dualbus.consumer.partitions.owned", &with), 4);
    second.shutdown().await;

    // Once a subscription ended, its gauges are no longer reported.
    sub.shutdown().await;
    h.metrics.reset();
    assert_eq!(h.points("dualbus.pool.in_flight", &with), 0);
    assert_eq!(h.points("dualbus.consumer.partitions.owned", &with), 0);
    // A counter does not go down when its members stop.
    assert!(h.metric("dualbus.consumer.handovers", &h_with) >= 4 + released);
}

/// Trace headers count against the broker's limit: with tracing on, an event is refused
/// at one byte over the limit and sent at the limit, and the largest payload that fits is
/// smaller than without tracing by at least the `traceparent` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_count_against_the_size_limit() {
    const LIMIT: usize = 2048;
    let largest = |traced: bool| async move {
        let h = Harness::new(&OtelConfig::default());
        let memory = Memory::with_config(MemoryConfig::default().with_max_payload(LIMIT)).unwrap();
        let mut b = DomainBusBuilder::new(memory);
        if traced {
            b = b.layer(h.otel.tracing());
        }
        let bus = b.build().unwrap();
        let topic = unique("otel-size");
        let root = h.root("sizes");
        // One envelope, so that only the payload's size changes (ids and time stay).
        let template = Envelope::new("a", "Sized", 1, &b"x"[..]).unwrap();
        let sized = |size: usize| {
            let mut e = template.clone();
            e.payload = vec![b'x'; size].into();
            e
        };
        let mut fits = None;
        for size in (1..=LIMIT).rev() {
            let e = sized(size);
            match bus
                .publish(topic.as_str(), &e)
                .with_context(root.clone())
                .await
            {
                Ok(_) => {
                    fits = Some(size);
                    break;
                }
                Err(Error::PayloadTooLarge { .. }) => {}
                Err(other) => panic!("{other}"),
            }
        }
        let fits = fits.expect("some payload fits");
        // One over the largest that fits: refused, with a clear error.
        let over = sized(fits + 1);
        let e = bus
            .publish(topic.as_str(), &over)
            .with_context(root.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PayloadTooLarge { .. }), "{e}");
        fits
    };
    let with = largest(true).await;
    let without = largest(false).await;
    let traceparent = "traceparent".len() + 55;
    assert!(
        without >= with + traceparent,
        "largest payload {without} without tracing, {with} with it"
    );
}

/// Request-reply on the simple bus: the reply is sent inside the server's `process` span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_continues_the_request_trace() {
    let h = Harness::new(&OtelConfig::default());
    let bus = SimpleBus::builder(Memory::new())
        .layer(h.otel.tracing())
        .build()
        .unwrap();
    let topic = unique("otel-rpc");
    let server = bus
        .serve(
            topic.as_str(),
            None,
            handler_fn(|m: Message| async move { Ok::<_, HandleError>(m.payload) }),
        )
        .await
        .unwrap();
    let root = h.root("caller");
    let trace = root.span().span_context().trace_id();
    let reply = bus
        .request(topic.as_str(), &b"ping"[..], Duration::from_secs(5))
        .with_context(root.clone())
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"ping");
    server.shutdown(Duration::from_secs(5)).await;
    let spans = h.finished_spans();
    let send = span(&spans, trace, &format!("send {topic}"));
    assert_eq!(
        attr(send, "dualbus.publish.kind").as_deref(),
        Some("request")
    );
    let process = span(&spans, trace, &format!("process {topic}"));
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    let reply_span = spans
        .iter()
        .find(|s| {
            s.span_context.trace_id() == trace
                && attr(s, "dualbus.publish.kind").as_deref() == Some("reply")
        })
        .expect("a reply span");
    assert_eq!(reply_span.parent_span_id, process.span_context.span_id());
}

/// `consumer_parent: link`: the `process` span starts a trace of its own, linked to the
/// publisher's `send` span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_only_consumers_start_their_own_trace() {
    let config = OtelConfig {
        consumer_parent: ConsumerParent::Link,
        ..OtelConfig::default()
    };
    let h = Harness::new(&config);
    let bus = domain_bus(Memory::new(), &h);
    let topic = unique("otel-link");
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |_e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(()).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    let root = h.root("origin");
    let trace = root.span().span_context().trace_id();
    let e = Envelope::new("a", "Linked", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e)
        .with_context(root.clone())
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;
    let spans = h.finished_spans();
    let send = span(&spans, trace, &format!("send {topic}"));
    let process = spans
        .iter()
        .find(|s| s.name == format!("process {topic}"))
        .unwrap();
    assert_ne!(process.span_context.trace_id(), trace);
    assert_eq!(
        process.parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );
    assert!(links_to(process, send));
}

/// With sampling off nothing is recorded, yet the context still travels (marked not
/// sampled), so a downstream service that samples can join the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sampling_off_the_context_still_travels() {
    let config = OtelConfig {
        sampler: SamplerKind::AlwaysOff,
        ..OtelConfig::default()
    };
    let h = Harness::new(&config);
    let bus = domain_bus(Memory::new(), &h);
    let topic = unique("otel-off");
    let (sub, mut rx) = collecting(&bus, &topic).await;
    let e = Envelope::new("a", "Quiet", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e).await.unwrap();
    let got = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;
    let tp = got.headers.get("traceparent").expect("a traceparent");
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    assert!(h.finished_spans().is_empty());
}

/// Baggage set by the publisher travels in the `baggage` header and is in the handler's
/// context; a `tracestate` travels beside the `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baggage_and_tracestate_travel_with_the_trace() {
    use opentelemetry::baggage::BaggageExt as _;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    let h = Harness::new(&OtelConfig::default());
    let bus = domain_bus(Memory::new(), &h);
    let topic = unique("otel-baggage");
    let (tx, mut rx) = mpsc::unbounded_channel::<(Option<String>, Option<String>)>();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |e: Event| {
            let tx = tx.clone();
            async move {
                let cx = opentelemetry::Context::current();
                let tenant = cx.baggage().get("tenant").map(|v| v.to_string());
                let state = cx
                    .span()
                    .span_context()
                    .trace_state()
                    .get("vendor")
                    .map(str::to_owned);
                assert!(e.headers.contains("baggage"));
                tx.send((tenant, state)).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    // A remote parent with a trace state (as an upstream service would have sent it).
    let parent = SpanContext::new(
        opentelemetry::trace::TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
        opentelemetry::trace::SpanId::from(0xb7ad6b7169203331_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "abc")]).unwrap(),
    );
    let cx = opentelemetry::Context::new()
        .with_remote_span_context(parent)
        .with_baggage([opentelemetry::KeyValue::new("tenant", "t-7")]);
    let e = Envelope::new("a", "Carried", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e)
        .with_context(cx)
        .await
        .unwrap();
    let (tenant, state) = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;
    assert_eq!(tenant.as_deref(), Some("t-7"));
    assert_eq!(state.as_deref(), Some("abc"));
    let spans = h.finished_spans();
    let process = spans
        .iter()
        .find(|s| s.name == format!("process {topic}"))
        .unwrap();
    assert_eq!(
        process.span_context.trace_id(),
        opentelemetry::trace::TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128)
    );
}
