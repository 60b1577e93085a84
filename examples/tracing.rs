//! One trace through both hops of a checkout, in-process (no server needed):
//!
//! `POST /checkout` (a root span, as an HTTP handler's) publishes `OrderPlaced` -> the
//! broker -> the keyed handler of `orders` (a `process orders` span) publishes
//! `PaymentRequested` -> the handler of `payments`.
//!
//! Spans are printed to standard output; with `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g.
//! `http://127.0.0.1:4318`) they go to that collector by OTLP over HTTP instead. The
//! example checks that both handlers saw the root's trace id in their context.
//!
//! Run with `cargo run --example tracing --features otel`.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use dualbus::otel::{ExporterKind, Otel, OtelConfig, Telemetry};
use dualbus::{Buses, Envelope, Event, HandleError, handler_fn};
use opentelemetry::trace::{FutureExt as _, TraceContextExt as _, Tracer as _};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let otlp = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let config = OtelConfig {
        exporter: if otlp {
            ExporterKind::Otlp
        } else {
            ExporterKind::Stdout
        },
        ..OtelConfig::default()
    };
    let telemetry = Telemetry::install(&config, "checkout-service")?;
    let buses = Buses::builder()
        .source("checkout-service")
        .otel(&Otel::from_config(&config))
        .build()?;

    // The trace id each handler runs in.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, String)>();
    let current_trace = || {
        opentelemetry::Context::current()
            .span()
            .span_context()
            .trace_id()
            .to_string()
    };

    let tx = seen_tx.clone();
    let payments = buses
        .domain()
        .subscribe("payments")
        .start(handler_fn(move |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send((e.event_type.clone(), current_trace())).ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await?;
    let domain = buses.domain().clone();
    let orders = buses
        .domain()
        .subscribe("orders")
        .start(handler_fn(move |e: Event| {
            let domain = domain.clone();
            let tx = seen_tx.clone();
            async move {
                tx.send((e.event_type.clone(), current_trace())).ok();
                // Published inside the `process orders` span: the trace goes on.
                let next = Envelope::new(e.aggregate_id.clone(), "PaymentRequested", 1, &b"{}"[..])
                    .map_err(HandleError::permanent)?
                    .with_correlation_id(e.event_id.clone());
                domain
                    .publish("payments", &next)
                    .await
                    .map_err(HandleError::retryable)?;
                Ok(())
            }
        }))
        .await?;

    let tracer = opentelemetry::global::tracer("checkout-http");
    let root = opentelemetry::Context::current_with_span(tracer.start("POST /checkout"));
    let trace_id = root.span().span_context().trace_id().to_string();
    let placed = Envelope::new("order-42", "OrderPlaced", 1, &br#"{"total":99}"#[..])?;
    buses
        .domain()
        .publish("orders", &placed)
        .with_context(root.clone())
        .await?;
    root.span().end();

    for _ in 0..2 {
        let (event_type, trace) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .context("a handler did not run in time")?
            .context("handlers stopped")?;
        ensure!(
            trace == trace_id,
            "{event_type} ran in trace {trace}, not {trace_id}"
        );
        eprintln!("{event_type} handled in trace {trace}");
    }
    orders.shutdown().await;
    payments.shutdown().await;
    buses.close().await?;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await??;
    eprintln!("one trace {trace_id}: POST /checkout -> orders -> payments");
    Ok(())
}
