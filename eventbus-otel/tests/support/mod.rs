//! What the tests of this crate share: SDK providers with in-memory exporters, and the
//! trace scenarios every backend runs (one trace from publisher to handler, across a
//! follow-up publish to a second handler, through the broker's headers).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dualbus_core::{
    Backoff, DomainBus, DomainBusBuilder, DomainTransport, Envelope, Event, HandleError, Message,
    SimpleBus, SimpleTransport, handler_fn,
};
use dualbus_otel::{Otel, OtelConfig};
use opentelemetry::trace::{
    FutureExt as _, SpanId, SpanKind, TraceContextExt as _, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;

/// How long one scenario may take at most (a broker's group join included).
pub(crate) const DEADLINE: Duration = Duration::from_secs(90);

/// SDK providers whose spans and metrics stay in memory.
pub(crate) struct Harness {
    pub(crate) spans: InMemorySpanExporter,
    pub(crate) tracer_provider: SdkTracerProvider,
    pub(crate) metrics: InMemoryMetricExporter,
    pub(crate) meter_provider: SdkMeterProvider,
    pub(crate) otel: Otel,
}

impl Harness {
    pub(crate) fn new(config: &OtelConfig) -> Self {
        let spans = InMemorySpanExporter::default();
        let tracer_provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .with_sampler(dualbus_otel::sampler(config.sampler, config.sampler_ratio))
            .build();
        let metrics = InMemoryMetricExporter::default();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics.clone()).build())
            .build();
        let otel = Otel::with_providers(&tracer_provider, &meter_provider, config);
        Self {
            spans,
            tracer_provider,
            metrics,
            meter_provider,
            otel,
        }
    }

    /// A root span, as an HTTP handler's, and its context.
    pub(crate) fn root(&self, name: &'static str) -> Context {
        let tracer = self.tracer_provider.tracer("tests");
        Context::current_with_span(tracer.start(name))
    }

    pub(crate) fn finished_spans(&self) -> Vec<SpanData> {
        self.tracer_provider.force_flush().unwrap();
        self.spans.get_finished_spans().unwrap()
    }

    /// The summed value of metric `name`'s points (sums: their values; histograms: their
    /// counts) whose attributes include every one of `with`.
    pub(crate) fn metric(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        self.measure(name, with).0
    }

    /// How many data points of metric `name` carry every one of `with`.
    pub(crate) fn points(&self, name: &str, with: &[(&str, &str)]) -> usize {
        self.measure(name, with).1
    }

    fn measure(&self, name: &str, with: &[(&str, &str)]) -> (u64, usize) {
        self.meter_provider.force_flush().unwrap();
        let all = self.metrics.get_finished_metrics().unwrap();
        // Cumulative: the last export holds the totals.
        let Some(last) = all.last() else {
            return (0, 0);
        };
        let matches = |attrs: Vec<&KeyValue>| {
            with.iter().all(|(k, v)| {
                attrs
                    .iter()
                    .any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v)
            })
        };
        let mut total = 0;
        let mut points = 0;
        for scope in last.scope_metrics() {
            for m in scope.metrics() {
                if m.name() != name {
                    continue;
                }
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            if matches(p.attributes().collect()) {
                                total += p.value();
                                points += 1;
                            }
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            if matches(p.attributes().collect()) {
                                total += p.value();
                                points += 1;
                            }
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            if matches(p.attributes().collect()) {
                                total += p.count();
                                points += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        (total, points)
    }

    /// Whether metric `name` was exported at all.
    pub(crate) fn has_metric(&self, name: &str) -> bool {
        self.meter_provider.force_flush().unwrap();
        self.metrics
            .get_finished_metrics()
            .unwrap()
            .iter()
            .any(|rm| {
                rm.scope_metrics()
                    .any(|s| s.metrics().any(|m| m.name() == name))
            })
    }
}

/// A topic name no other test run uses.
pub(crate) fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The value of attribute `key` of a span, as text.
pub(crate) fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::I64(i) => i.to_string(),
            other => other.as_str().into_owned(),
        })
}

/// The one finished span named `name` in trace `trace`.
pub(crate) fn span<'a>(spans: &'a [SpanData], trace: TraceId, name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "spans named {name:?} in trace {trace}: {:?}",
        spans
            .iter()
            .map(|s| (&s.name, s.span_context.trace_id()))
            .collect::<Vec<_>>()
    );
    found[0]
}

pub(crate) fn links_to(span: &SpanData, target: &SpanData) -> bool {
    span.links
        .links
        .iter()
        .any(|l| l.span_context.span_id() == target.span_context.span_id())
}

/// A subscription to `topic` whose handler hands every event over, and the receiver.
pub(crate) async fn collecting(
    bus: &DomainBus,
    topic: &str,
) -> (dualbus_core::Subscription, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let sub = bus
        .subscribe(topic)
        .start(handler_fn(move |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(e).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    (sub, rx)
}

/// A domain bus on `transport` with both layers and quick retries.
pub(crate) fn domain_bus(transport: impl DomainTransport, h: &Harness) -> DomainBus {
    DomainBusBuilder::new(transport)
        .source("otel-tests")
        .retry(Backoff::new(
            3,
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .layer(h.otel.tracing())
        .layer(h.otel.metrics())
        .build()
        .unwrap()
}

/// The two-hop scenario: a root span (an HTTP handler's) publishes `OrderPlaced`; its
/// handler publishes `PaymentRequested`; a second handler receives it. Every span is in
/// the root's trace, each hop's `process` span is the child of the `send` span whose
/// context its message carried (and links to it), and the follow-up `send` is the child
/// of the first `process`. Returns the spans.
pub(crate) async fn domain_trace(bus: &DomainBus, h: &Harness, system: &str) -> Vec<SpanData> {
    let orders = unique("otel-orders");
    let payments = unique("otel-payments");
    let (second, mut rx) = collecting(bus, &payments).await;
    let follow_up = bus.clone();
    let to = payments.clone();
    let first = bus
        .subscribe(orders.as_str())
        .start(handler_fn(move |e: Event| {
            let bus = follow_up.clone();
            let to = to.clone();
            async move {
                let next = Envelope::new(e.aggregate_id.clone(), "PaymentRequested", 1, &b"{}"[..])
                    .unwrap()
                    .with_correlation_id(e.event_id.clone());
                bus.publish(to.as_str(), &next)
                    .await
                    .map_err(HandleError::retryable)?;
                Ok(())
            }
        }))
        .await
        .unwrap();

    let root = h.root("POST /orders");
    let trace = root.span().span_context().trace_id();
    let placed = Envelope::new("order-1", "OrderPlaced", 1, &b"{\"total\":3}"[..]).unwrap();
    bus.publish(orders.as_str(), &placed)
        .with_context(root.clone())
        .await
        .unwrap();
    root.span().end();
    let received = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("the follow-up event reached the second handler in time")
        .unwrap();
    first.shutdown().await;
    second.shutdown().await;
    assert_eq!(received.event_type, "PaymentRequested");
    assert_eq!(
        received.correlation_id.as_deref(),
        Some(placed.event_id.as_str())
    );

    let spans = h.finished_spans();
    let root_span = span(&spans, trace, "POST /orders");
    let send1 = span(&spans, trace, &format!("send {orders}"));
    let process1 = span(&spans, trace, &format!("process {orders}"));
    let send2 = span(&spans, trace, &format!("send {payments}"));
    let process2 = span(&spans, trace, &format!("process {payments}"));
    assert_eq!(send1.parent_span_id, root_span.span_context.span_id());
    assert_eq!(send1.span_kind, SpanKind::Producer);
    assert_eq!(process1.span_kind, SpanKind::Consumer);
    assert_eq!(process1.parent_span_id, send1.span_context.span_id());
    assert!(
        process1.parent_span_is_remote,
        "the parent came through the broker"
    );
    assert!(links_to(process1, send1));
    assert_eq!(send2.parent_span_id, process1.span_context.span_id());
    assert_eq!(process2.parent_span_id, send2.span_context.span_id());
    assert!(links_to(process2, send2));

    for s in [send1, process1, send2, process2] {
        assert_eq!(
            attr(s, "messaging.system").as_deref(),
            Some(system),
            "{}",
            s.name
        );
    }
    assert_eq!(
        attr(send1, "messaging.destination.name").as_deref(),
        Some(orders.as_str())
    );
    assert_eq!(
        attr(send1, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        attr(send1, "messaging.message.id").as_deref(),
        Some(placed.event_id.as_str())
    );
    assert_eq!(
        attr(process1, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attr(process1, "messaging.message.id").as_deref(),
        Some(placed.event_id.as_str())
    );
    assert_eq!(
        attr(process1, "messaging.consumer.group.name").as_deref(),
        Some("otel-tests")
    );
    assert_eq!(attr(process1, "dualbus.attempt").as_deref(), Some("1"));
    assert_eq!(
        attr(process1, "dualbus.delivery_count").as_deref(),
        Some("1")
    );
    assert_eq!(attr(process1, "dualbus.outcome").as_deref(), Some("ok"));
    assert!(attr(process1, "messaging.destination.partition.id").is_some());
    assert_eq!(
        attr(process2, "messaging.message.conversation_id").as_deref(),
        Some(placed.event_id.as_str())
    );
    let key_attr = if system == "kafka" {
        "messaging.kafka.message.key"
    } else {
        "dualbus.aggregate_id"
    };
    assert_eq!(attr(send1, key_attr).as_deref(), Some("order-1"));
    assert_eq!(attr(process1, key_attr).as_deref(), Some("order-1"));
    spans
}

/// The simple bus: a message published under a root span is handled in a `process`
/// span of the root's trace whose parent is the `send` span.
pub(crate) async fn simple_trace(transport: impl SimpleTransport, h: &Harness, system: &str) {
    let bus = SimpleBus::builder(transport)
        .layer(h.otel.tracing())
        .layer(h.otel.metrics())
        .build()
        .unwrap();
    let topic = unique("otel-notes");
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(m).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    // At-most-once: the subscription may take a moment to reach the server; publish
    // until one arrives, each under its own root.
    let mut roots: Vec<TraceId> = Vec::new();
    let received = tokio::time::timeout(DEADLINE, async {
        loop {
            let root = h.root("POST /notes");
            roots.push(root.span().span_context().trace_id());
            bus.publish(topic.as_str(), &b"hello"[..])
                .with_context(root.clone())
                .await
                .unwrap();
            root.span().end();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                return m;
            }
        }
    })
    .await
    .expect("a message arrived in time");
    assert!(received.headers.contains("traceparent"));
    sub.shutdown(Duration::from_secs(5)).await;
    bus.close().await.unwrap();
    let spans = h.finished_spans();
    let process = spans
        .iter()
        .find(|s| s.name == format!("process {topic}"))
        .expect("a process span");
    let trace = process.span_context.trace_id();
    assert!(
        roots.contains(&trace),
        "the process span continues a publisher's trace"
    );
    let send = span(&spans, trace, &format!("send {topic}"));
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(attr(send, "messaging.system").as_deref(), Some(system));
    assert_eq!(attr(process, "messaging.system").as_deref(), Some(system));
    assert_ne!(send.parent_span_id, SpanId::INVALID);
}

/// The address of a shared test server from `var` (set by `scripts/test.sh`); `None`
/// (the test skips) when unset, a failure when `DUALBUS_TEST_REQUIRE_SERVERS` is set.
pub(crate) fn server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) => Some(u),
        Err(_) if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => {
            panic!("{var} is not set but DUALBUS_TEST_REQUIRE_SERVERS is")
        }
        Err(_) => {
            eprintln!("skipped: {var} is not set");
            None
        }
    }
}
