//! Services that trace with `tracing` and `tracing-opentelemetry` (an HTTP framework's
//! request span, say): a publish inside a `tracing` span continues that span's trace, and a
//! `tracing` span opened inside a handler is a child of its `process` span.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dualbus_core::{Envelope, Event, HandleError, handler_fn};
use dualbus_memory::Memory;
use dualbus_otel::OtelConfig;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use support::*;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

// One thread: the subscriber set for this thread sees every task of the test.
#[tokio::test(flavor = "current_thread")]
async fn tracing_spans_and_bus_spans_form_one_trace() {
    let h = Harness::new(&OtelConfig::default());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(h.tracer_provider.tracer("http")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = domain_bus(Memory::new(), &h);
    let topic = unique("otel-bridge");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let sub = bus
        .subscribe(topic.as_str())
        .start(handler_fn(move |_e: Event| {
            let tx = tx.clone();
            async move {
                async {
                    tracing::info!("charging the card");
                }
                .instrument(tracing::info_span!("charge card"))
                .await;
                tx.send(()).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();

    let request = tracing::info_span!("POST /orders");
    let request_cx = request.context();
    let trace = request_cx.span().span_context().trace_id();
    let e = Envelope::new("o-1", "Placed", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e)
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;

    let spans = h.finished_spans();
    let root = span(&spans, trace, "POST /orders");
    let send = span(&spans, trace, &format!("send {topic}"));
    let process = span(&spans, trace, &format!("process {topic}"));
    let inner = span(&spans, trace, "charge card");
    assert_eq!(send.parent_span_id, root.span_context.span_id());
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(inner.parent_span_id, process.span_context.span_id());
}
