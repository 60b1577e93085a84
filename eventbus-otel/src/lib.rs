//! OpenTelemetry for the dualbus event bus.
//!
//! - [`TracingLayer`]: spans after the OpenTelemetry messaging conventions (v1.42.0) on
//!   both buses, one trace from publisher to handler across processes through the W3C
//!   `traceparent`/`tracestate`/`baggage` headers the layer writes into every message.
//! - [`MetricsLayer`]: the conventions' client and process metrics, and the keyed pool's
//!   in-flight deliveries, per-aggregate queues, partitions, handovers and consumer lag.
//! - [`Otel`]: both, from one [`OtelConfig`]; the facade adds it to both buses with one
//!   call. [`Telemetry::install`] sets up the SDK (sampler, OTLP over HTTP by default,
//!   gRPC behind the `grpc` feature, or stdout) for services that do not do it themselves.
//!
//! ```no_run
//! use dualbus_core::DomainBus;
//! use dualbus_otel::{Otel, OtelConfig, Telemetry};
//!
//! # fn main() -> Result<(), dualbus_core::Error> {
//! let config = OtelConfig::default();
//! let telemetry = Telemetry::install(&config, "orders-service")?;
//! let otel = Otel::from_config(&config);
//! let bus = DomainBus::builder(dualbus_memory::Memory::new())
//!     .layer(otel.tracing())
//!     .layer(otel.metrics())
//!     .build()?;
//! # drop(bus);
//! telemetry.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! Names, units and attributes: `docs/observability.md`.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod attrs;
mod carrier;
mod config;
mod install;
mod metrics;
mod trace;

pub use attrs::{
    DUALBUS_AGGREGATE_ID, DUALBUS_ATTEMPT, DUALBUS_BATCH_FAILED_COUNT, DUALBUS_BUS,
    DUALBUS_DEAD_LETTER_KIND, DUALBUS_DELIVERY_COUNT, DUALBUS_EVENT_TYPE, DUALBUS_OUTCOME,
    DUALBUS_PUBLISH_KIND,
};
pub use config::{
    AttributeSettings, ConsumerParent, ExporterKind, OtelConfig, Protocol, SamplerKind,
};
pub use install::{Telemetry, sampler};
pub use metrics::{DUALBUS_HANDOVER, MetricsLayer, MetricsService, names};
pub use trace::{TracingLayer, TracingService, propagator};

use dualbus_core::{Error, ErrorKind, HandleError};

/// Both layers, made from one configuration. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Otel {
    tracing: TracingLayer,
    metrics: MetricsLayer,
}

impl Default for Otel {
    fn default() -> Self {
        Self::from_config(&OtelConfig::default())
    }
}

impl Otel {
    /// The layers on OpenTelemetry's global providers (set them first, e.g. with
    /// [`Telemetry::install`]), with the span and lag settings of `config`.
    pub fn from_config(config: &OtelConfig) -> Self {
        Self {
            tracing: TracingLayer::from_config(config),
            metrics: MetricsLayer::from_config(config),
        }
    }

    /// The layers on these providers.
    pub fn with_providers<T, M>(
        tracer_provider: &T,
        meter_provider: &M,
        config: &OtelConfig,
    ) -> Self
    where
        T: opentelemetry::trace::TracerProvider,
        T::Tracer: Send + Sync + 'static,
        <T::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
        M: opentelemetry::metrics::MeterProvider,
    {
        Self {
            tracing: TracingLayer::with_provider(tracer_provider, config),
            metrics: MetricsLayer::with_provider(meter_provider, config),
        }
    }

    /// The tracing layer.
    pub fn tracing(&self) -> TracingLayer {
        self.tracing.clone()
    }

    /// The metrics layer.
    pub fn metrics(&self) -> MetricsLayer {
        self.metrics.clone()
    }
}

/// The `error.type` of a bus error: its kind in snake case (`invalid_input`, `timeout`,
/// `unavailable`, `payload_too_large` is `invalid_input`, ...).
pub fn error_type(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::Closed => "closed",
        ErrorKind::Timeout => "timeout",
        ErrorKind::NotSupported => "not_supported",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Conflict => "conflict",
        ErrorKind::Malformed => "malformed",
        ErrorKind::NoResponders => "no_responders",
        ErrorKind::Backend => "backend",
        _ => "_OTHER",
    }
}

/// The `error.type` of a handler error: `retryable` or `permanent`.
pub fn handle_error_type(e: &HandleError) -> &'static str {
    if e.is_retryable() {
        "retryable"
    } else {
        "permanent"
    }
}
