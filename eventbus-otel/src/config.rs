//! Settings of the OpenTelemetry layers and of [`Telemetry::install`](crate::Telemetry::install),
//! read from the facade's `otel` section or built in code.

use std::time::Duration;

use dualbus_core::Error;
use serde::Deserialize;

/// The `otel` section: whether the layers run, how traces are sampled and exported, and
/// which attributes spans carry. Unknown keys are refused.
///
/// ```yaml
/// otel:
///   enabled: true
///   install: true                  # set up the SDK; false: use the application's providers
///   service_name: orders-service   # default: the domain bus's source
///   sampler: parentbased_always_on # always_on | always_off | traceidratio | parentbased_*
///   sampler_ratio: 1.0             # for the ratio samplers
///   exporter: otlp                 # otlp | stdout | none
///   protocol: http                 # http (port 4318) | grpc (port 4317, feature `grpc`)
///   endpoint: http://127.0.0.1:4318 # default: OTEL_EXPORTER_OTLP_ENDPOINT, else the SDK's
///   create_spans: true             # batches: one `create` span per message
///   consumer_parent: parent        # parent | link
///   lag_interval: 10s              # how often consumer lag is asked of the broker
///   metrics_interval: 60s          # how often metrics are exported
///   attributes: { message_id: true, key: true, conversation_id: true, body_size: true }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelConfig {
    /// Whether the facade adds the layers. Default `true` when the section is present.
    pub enabled: bool,
    /// Whether the facade's `Buses::from_config` sets up OpenTelemetry's SDK with
    /// [`Telemetry::install`](crate::Telemetry::install) (`true`, the default), or uses the
    /// global providers the application set up itself (`false`).
    pub install: bool,
    /// The `service.name` resource attribute. Default: the domain bus's source.
    pub service_name: Option<String>,
    /// How root spans are sampled. Default `parentbased_always_on`.
    pub sampler: SamplerKind,
    /// The ratio of the ratio samplers, from 0 to 1. Default 1.
    pub sampler_ratio: f64,
    /// Where spans and metrics go. Default `otlp`.
    pub exporter: ExporterKind,
    /// The OTLP protocol. Default `http`.
    pub protocol: Protocol,
    /// The OTLP endpoint. Default: the `OTEL_EXPORTER_OTLP_ENDPOINT` variable, else
    /// `http://localhost:4318` (HTTP) or `http://localhost:4317` (gRPC).
    pub endpoint: Option<String>,
    /// Batches: a `create <topic>` span per message, linked from the batch's `send` span.
    /// Off: every message carries the `send` span's context. Default `true`.
    pub create_spans: bool,
    /// How a `process` span relates to the context the message carries. Default `parent`.
    pub consumer_parent: ConsumerParent,
    /// How often each subscription's consumer lag is asked of the broker. Default 10 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub lag_interval: Duration,
    /// How often metrics are exported by [`Telemetry::install`](crate::Telemetry::install).
    /// Default 60 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub metrics_interval: Duration,
    /// Optional span attributes.
    pub attributes: AttributeSettings,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            install: true,
            service_name: None,
            sampler: SamplerKind::ParentbasedAlwaysOn,
            sampler_ratio: 1.0,
            exporter: ExporterKind::Otlp,
            protocol: Protocol::Http,
            endpoint: None,
            create_spans: true,
            consumer_parent: ConsumerParent::Parent,
            lag_interval: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(60),
            attributes: AttributeSettings::default(),
        }
    }
}

impl OtelConfig {
    /// Checks the values; errors name the key under `otel`.
    pub fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.sampler_ratio) {
            return Err(Error::config(
                "otel.sampler_ratio",
                "must be between 0 and 1",
            ));
        }
        if self.lag_interval.is_zero() {
            return Err(Error::config("otel.lag_interval", "must not be zero"));
        }
        if self.metrics_interval.is_zero() {
            return Err(Error::config("otel.metrics_interval", "must not be zero"));
        }
        if let Some(s) = &self.service_name
            && s.trim().is_empty()
        {
            return Err(Error::config("otel.service_name", "must not be empty"));
        }
        if self.protocol == Protocol::Grpc && !cfg!(feature = "grpc") {
            return Err(Error::config(
                "otel.protocol",
                "grpc needs the `grpc` feature of dualbus-otel (`otel-grpc` of dualbus)",
            ));
        }
        if self.exporter == ExporterKind::Otlp && !cfg!(feature = "otlp") {
            return Err(Error::config(
                "otel.exporter",
                "otlp needs the `otlp` feature of dualbus-otel",
            ));
        }
        Ok(())
    }
}

/// How root spans are sampled (the OpenTelemetry SDK's samplers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SamplerKind {
    /// Every trace.
    AlwaysOn,
    /// No trace (contexts still travel, marked not sampled).
    AlwaysOff,
    /// A ratio of traces, by trace id.
    #[serde(rename = "traceidratio")]
    TraceIdRatio,
    /// The parent's decision; every root.
    ParentbasedAlwaysOn,
    /// The parent's decision; no root.
    ParentbasedAlwaysOff,
    /// The parent's decision; a ratio of roots.
    #[serde(rename = "parentbased_traceidratio")]
    ParentbasedTraceIdRatio,
}

/// Where [`Telemetry::install`](crate::Telemetry::install) sends spans and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExporterKind {
    /// OTLP to a collector.
    Otlp,
    /// Printed to standard output (development).
    Stdout,
    /// Nowhere (sampling decisions and propagation still happen).
    None,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Protocol {
    /// Protobuf over HTTP (port 4318).
    Http,
    /// gRPC (port 4317; feature `grpc`).
    Grpc,
}

/// How a `process` span relates to the context its message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConsumerParent {
    /// The message's context is the parent (one trace from publisher to handler) and a link.
    Parent,
    /// The `process` span starts a trace of its own, linked to the message's context.
    Link,
}

/// Span attributes that may be turned off (for cardinality or privacy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttributeSettings {
    /// `messaging.message.id` (the event id).
    pub message_id: bool,
    /// The aggregate id: `messaging.kafka.message.key` on Kafka, `dualbus.aggregate_id`
    /// elsewhere.
    pub key: bool,
    /// `messaging.message.conversation_id` (the envelope's correlation id).
    pub conversation_id: bool,
    /// `messaging.message.body.size`.
    pub body_size: bool,
}

impl Default for AttributeSettings {
    fn default() -> Self {
        Self {
            message_id: true,
            key: true,
            conversation_id: true,
            body_size: true,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let c = OtelConfig {
            sampler_ratio: 1.5,
            ..OtelConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("otel.sampler_ratio"), "{e}");
        let c = OtelConfig {
            lag_interval: Duration::ZERO,
            ..OtelConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("otel.lag_interval")
        );
        OtelConfig::default().validate().unwrap();
    }
}
