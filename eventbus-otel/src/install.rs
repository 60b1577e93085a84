//! Setting up OpenTelemetry's SDK from an [`OtelConfig`]: a tracer and a meter provider
//! with the configured sampler and exporter, made global with the W3C propagators.

use std::fmt;

use dualbus_core::Error;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::config::{ExporterKind, OtelConfig, SamplerKind};

/// The SDK providers [`Telemetry::install`] set up. Keep it for the life of the service
/// and call [`Telemetry::shutdown`] at the end, which exports what is still buffered.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// The SDK sampler of a configured kind.
pub fn sampler(kind: SamplerKind, ratio: f64) -> Sampler {
    match kind {
        SamplerKind::AlwaysOn => Sampler::AlwaysOn,
        SamplerKind::AlwaysOff => Sampler::AlwaysOff,
        SamplerKind::TraceIdRatio => Sampler::TraceIdRatioBased(ratio),
        SamplerKind::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        SamplerKind::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        SamplerKind::ParentbasedTraceIdRatio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    }
}

impl Telemetry {
    /// Builds the providers `config` describes (sampler, exporter, `service.name` from
    /// `config.service_name` or else `default_service_name`), and makes them and the W3C
    /// trace-context and baggage propagators OpenTelemetry's globals, which the layers
    /// made by [`TracingLayer::new`](crate::TracingLayer::new) and
    /// [`MetricsLayer::new`](crate::MetricsLayer::new) use.
    ///
    /// OTLP goes over HTTP (protobuf, port 4318) unless `protocol: grpc` (feature `grpc`);
    /// the endpoint is `config.endpoint` (a base URL: the signal paths `/v1/traces` and
    /// `/v1/metrics` are added for HTTP), else the standard `OTEL_EXPORTER_OTLP_*`
    /// variables, else `http://localhost:4318`.
    pub fn install(config: &OtelConfig, default_service_name: &str) -> Result<Self, Error> {
        config.validate()?;
        let name = config
            .service_name
            .clone()
            .unwrap_or_else(|| default_service_name.to_owned());
        let resource = Resource::builder().with_service_name(name).build();
        let mut traces = SdkTracerProvider::builder()
            .with_sampler(sampler(config.sampler, config.sampler_ratio))
            .with_resource(resource.clone());
        let mut metrics = SdkMeterProvider::builder().with_resource(resource);
        match config.exporter {
            ExporterKind::Otlp => {
                #[cfg(feature = "otlp")]
                {
                    let (spans, meters) = otlp::exporters(config)?;
                    traces = traces.with_batch_exporter(spans);
                    metrics = metrics.with_reader(
                        PeriodicReader::builder(meters)
                            .with_interval(config.metrics_interval)
                            .build(),
                    );
                }
            }
            ExporterKind::Stdout => {
                traces = traces.with_simple_exporter(opentelemetry_stdout::SpanExporter::default());
                metrics = metrics.with_reader(
                    PeriodicReader::builder(opentelemetry_stdout::MetricExporter::default())
                        .with_interval(config.metrics_interval)
                        .build(),
                );
            }
            ExporterKind::None => {}
        }
        let telemetry = Self {
            tracer_provider: traces.build(),
            meter_provider: metrics.build(),
        };
        opentelemetry::global::set_tracer_provider(telemetry.tracer_provider.clone());
        opentelemetry::global::set_meter_provider(telemetry.meter_provider.clone());
        opentelemetry::global::set_text_map_propagator(crate::propagator());
        Ok(telemetry)
    }

    /// The tracer provider.
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer_provider
    }

    /// The meter provider.
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// Exports what is buffered. Blocks until the exporters are done (call it from a
    /// blocking context, e.g. `tokio::task::spawn_blocking`).
    pub fn flush(&self) -> Result<(), Error> {
        let t = self.tracer_provider.force_flush();
        let m = self.meter_provider.force_flush();
        t.and(m)
            .map_err(|e| Error::backend("opentelemetry", true, e))
    }

    /// Exports what is buffered and stops the providers. Blocks until the exporters are
    /// done (call it from a blocking context or at the very end of `main`).
    pub fn shutdown(&self) -> Result<(), Error> {
        let t = self.tracer_provider.shutdown();
        let m = self.meter_provider.shutdown();
        t.and(m)
            .map_err(|e| Error::backend("opentelemetry", true, e))
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use dualbus_core::Error;
    use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig as _};

    use crate::config::{OtelConfig, Protocol};

    fn build_error(e: opentelemetry_otlp::ExporterBuildError) -> Error {
        Error::config("otel.endpoint", e.to_string())
    }

    pub(super) fn exporters(config: &OtelConfig) -> Result<(SpanExporter, MetricExporter), Error> {
        let base = config.endpoint.as_deref().map(|e| e.trim_end_matches('/'));
        match config.protocol {
            Protocol::Http => {
                let mut s = SpanExporter::builder().with_http();
                let mut m = MetricExporter::builder().with_http();
                if let Some(b) = base {
                    s = s.with_endpoint(format!("{b}/v1/traces"));
                    m = m.with_endpoint(format!("{b}/v1/metrics"));
                }
                Ok((
                    s.build().map_err(build_error)?,
                    m.build().map_err(build_error)?,
                ))
            }
            Protocol::Grpc => grpc(base),
        }
    }

    #[cfg(feature = "grpc")]
    fn grpc(base: Option<&str>) -> Result<(SpanExporter, MetricExporter), Error> {
        let mut s = SpanExporter::builder().with_tonic();
        let mut m = MetricExporter::builder().with_tonic();
        if let Some(b) = base {
            s = s.with_endpoint(b);
            m = m.with_endpoint(b);
        }
        Ok((
            s.build().map_err(build_error)?,
            m.build().map_err(build_error)?,
        ))
    }

    #[cfg(not(feature = "grpc"))]
    fn grpc(_: Option<&str>) -> Result<(SpanExporter, MetricExporter), Error> {
        Err(Error::config(
            "otel.protocol",
            "grpc needs the `grpc` feature of dualbus-otel (`otel-grpc` of dualbus)",
        ))
    }
}
