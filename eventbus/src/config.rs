//! Configuration files (YAML or TOML) with environment overrides.
//!
//! ```yaml
//! domain:
//!   type: memory            # memory | nats | kafka | redis
//!   source: orders-service  # CloudEvents source; also the default group name (mapped to
//!                           # a valid one if it is not: `/orders` gives `_orders`)
//!   codec: cloudevents      # cloudevents | jxt
//!   cloudevents_mode: binary  # binary | structured (codec cloudevents only)
//!   # jxt_tenant_id: number   # number | string: jxt-core up to v1.1.35 (codec jxt only)
//!   memory: { partitions: 16, ack_wait: 30s }  # also max_payload (1 MiB), simple_buffer (1024)
//!                           # (see dualbus_memory::MemoryConfig)
//!   pool: { max_concurrency: 256, max_in_flight: 10000, max_per_key: 1000, max_deferred: 40000, drain_deadline: 10s }
//!   retry: { attempts: 5, initial_backoff: 100ms, max_backoff: 10s }
//!   dead_letter: { suffix: ".dlq" }
//!   handler_timeout: 30s
//!   group: { name: orders-service, partitions: 16, drain_deadline: 10s }
//!   # group names: [A-Za-z0-9_-] tokens separated by single dots, at most 200 bytes
//!   # partitions (here and per topic): memory and nats (part of a JetStream topic's
//!   #   stream: changing it needs a migration, see docs/backends/nats.md)
//!   # member_timeout: 10s: a member's registration expires this long after its last
//!   #   heartbeat (nats: the member bucket; memory sees a member's end at once)
//!   topics: { payments: { partitions: 32 } }   # per-topic overrides
//!   # type: nats, with (see dualbus_nats::NatsConfig):
//!   # nats:
//!   #   urls: ["nats://127.0.0.1:4222"]  # or nats://user:password@host:4222 (redacted in output)
//!   #   credentials: { token: ... }     # or user + password, nkey, creds_file (not with URL credentials)
//!   #   jetstream:
//!   #     stream: { storage: file, replicas: 1, retention: limits, max_age: 30d, duplicate_window: 2m }
//!   #     consumer: { ack_wait: 30s, max_ack_pending: 50000, batch: 256, lease_ttl: 10s }
//! simple:
//!   type: memory            # memory | nats | redis
//!   max_concurrency: 1024
//!   # memory: { simple_buffer: 1024 }  # a broker of its own; without it, the domain's is shared
//! ```
//!
//! Every key can be overridden from the environment with the prefix `DUALBUS__` and `__`
//! between levels: `DUALBUS__DOMAIN__TYPE=memory`, `DUALBUS__DOMAIN__POOL__MAX_IN_FLIGHT=500`.
//! Unknown keys are rejected with their path (`domain.pool.max_inflight`); a section for a
//! backend whose cargo feature is off is an error naming the feature. Durations are written
//! `250ms`, `30s`, `5m`, `30d` (or as a number of milliseconds).
//!
//! Each backend crate owns its section's type (`memory`: `dualbus_memory::MemoryConfig`,
//! `nats`: `dualbus_nats::NatsConfig`) and its constructor; [`crate::Buses::from_config`]
//! builds only the backends that `type` names (with memory on both buses and no
//! `simple.memory`, one broker serves both).
//!
//! `domain.group.member_timeout` goes to the group coordinator's member registry of the
//! backend: on `nats` it sets `jetstream.consumer.member_timeout` (overriding the `nats`
//! section's); memory sees a member's end at once and needs none.

use std::path::Path;
use std::time::Duration;

use dualbus_core::{Backoff, Codec, DeadLetterPolicy, Error, PoolConfig, Result};
use figment::Figment;
use figment::providers::{Env, Format as _, Toml, Yaml};
use serde::Deserialize;

use crate::backends::{self, Bus, Section};

/// The environment prefix of overrides.
pub const ENV_PREFIX: &str = "DUALBUS__";

/// Which backend a bus runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendKind {
    /// In-process (feature `memory`).
    #[default]
    Memory,
    /// NATS: JetStream for domain events, core NATS for simple messages (feature `nats`).
    Nats,
    /// Kafka (feature `kafka`, domain bus only).
    Kafka,
    /// Redis: Streams for domain events, pub/sub for simple messages (feature `redis`).
    Redis,
}

/// The codec, as written in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CodecKind {
    /// CloudEvents binary mode.
    #[default]
    Cloudevents,
    /// jxt-core's JSON envelope.
    Jxt,
}

/// How the CloudEvents codec writes (`cloudevents_mode`); both are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CloudEventsMode {
    /// Attributes as headers, the payload as the body.
    #[default]
    Binary,
    /// The whole event as a JSON body (`application/cloudevents+json`).
    Structured,
}

/// How the jxt codec writes `tenant_id` (`jxt_tenant_id`); both are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JxtTenantId {
    /// A JSON number, as jxt-core reads it since v1.1.36 (tenant ids must be integers).
    #[default]
    Number,
    /// A JSON string, for jxt-core up to v1.1.35.
    String,
}

/// The `group` section: consumer groups, backend-neutral.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupSection {
    /// The group of subscriptions that do not name one: `[A-Za-z0-9_-]` tokens separated
    /// by single dots, at most 200 bytes. Default: the source if it is such a name, else the
    /// source with every other character replaced by `_` (see
    /// [`dualbus_core::group_from_source`]; distinct sources may map to one name).
    pub name: Option<String>,
    /// Partitions per domain topic (Kafka: the topic's own). Default: the backend's (16 in
    /// memory and on NATS, where the count is part of the topic's stream).
    pub partitions: Option<u32>,
    /// How long a revoked partition (and a shutdown) may take to finish started handlers.
    /// Default: `pool.drain_deadline`.
    #[serde(with = "dualbus_core::config::duration::option")]
    pub drain_deadline: Option<Duration>,
    /// After how long without a heartbeat a member's registration in its group expires
    /// (at least 300 ms). NATS: the member bucket's max age
    /// (`jetstream.consumer.member_timeout`, which this overrides; default 10 s). Memory
    /// sees a member's end at once and ignores it.
    #[serde(with = "dualbus_core::config::duration::option")]
    pub member_timeout: Option<Duration>,
}

/// Per-topic settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicSection {
    /// Partitions of this topic, overriding `group.partitions`.
    pub partitions: Option<u32>,
}

/// A backend section, kept raw until its backend reads it (and so that the presence of a
/// section for a backend not in this build can be reported with the feature to enable).
/// Its `Debug` output shows no values: sections hold credentials.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Raw(figment::value::Value);

impl Raw {
    /// The value, for the backend that reads it.
    // Read by the backends of this build that keep their section raw; without any, only the
    // section's presence counts.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn value(&self) -> &figment::value::Value {
        &self.0
    }
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{ .. }")
    }
}

/// The `domain` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DomainSection {
    /// The backend.
    #[serde(rename = "type")]
    pub kind: BackendKind,
    /// The service name (CloudEvents source and default group, see [`GroupSection::name`]).
    pub source: Option<String>,
    /// The codec publishers write.
    pub codec: CodecKind,
    /// CloudEvents content mode publishers write (codec `cloudevents` only). Default binary.
    pub cloudevents_mode: Option<CloudEventsMode>,
    /// How jxt JSON mode writes `tenant_id` (codec `jxt` only). Default number.
    pub jxt_tenant_id: Option<JxtTenantId>,
    /// In-process backend settings ([`dualbus_memory::MemoryConfig`]). In a build without
    /// the `memory` feature the section is kept raw, and its presence is an error naming
    /// the feature.
    #[cfg(feature = "memory")]
    pub memory: Option<dualbus_memory::MemoryConfig>,
    /// In-process backend settings (feature `memory`, off in this build: a present section
    /// is an error naming the feature).
    #[cfg(not(feature = "memory"))]
    pub memory: Option<Raw>,
    /// NATS settings (feature `nats`).
    pub nats: Option<Raw>,
    /// Kafka settings (feature `kafka`).
    pub kafka: Option<Raw>,
    /// Redis settings (feature `redis`).
    pub redis: Option<Raw>,
    /// Consumer groups.
    pub group: GroupSection,
    /// Per-topic overrides, by topic name.
    pub topics: std::collections::BTreeMap<String, TopicSection>,
    /// Keyed pool limits.
    pub pool: PoolConfig,
    /// Handler retry.
    pub retry: Backoff,
    /// Dead-letter naming.
    pub dead_letter: DeadLetterPolicy,
    /// Cut-off of one handler attempt.
    #[serde(with = "dualbus_core::config::duration::option")]
    pub handler_timeout: Option<Duration>,
}

impl DomainSection {
    /// Its backend sections, by backend, in the order of [`BackendKind`].
    fn backend_sections(&self) -> [(BackendKind, Option<Section<'_>>); 4] {
        [
            (BackendKind::Memory, self.memory.as_ref().map(Section::from)),
            (BackendKind::Nats, self.nats.as_ref().map(Section::from)),
            (BackendKind::Kafka, self.kafka.as_ref().map(Section::from)),
            (BackendKind::Redis, self.redis.as_ref().map(Section::from)),
        ]
    }

    /// The codec publishers write, from `codec`, `cloudevents_mode` and `jxt_tenant_id`.
    pub fn wire_codec(&self) -> Codec {
        match (self.codec, self.cloudevents_mode, self.jxt_tenant_id) {
            (CodecKind::Jxt, _, Some(JxtTenantId::String)) => Codec::JxtJsonStringTenant,
            (CodecKind::Jxt, _, _) => Codec::JxtJson,
            (_, Some(CloudEventsMode::Structured), _) => Codec::CloudEventsStructured,
            _ => Codec::CloudEvents,
        }
    }
}

/// The `simple` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SimpleSection {
    /// The backend.
    #[serde(rename = "type")]
    pub kind: BackendKind,
    /// In-process backend settings ([`dualbus_memory::MemoryConfig`]): with them, the simple
    /// bus gets a broker of its own; without them, it shares the domain bus's memory broker
    /// (or, when the domain bus is elsewhere, takes `domain.memory`'s settings).
    #[cfg(feature = "memory")]
    pub memory: Option<dualbus_memory::MemoryConfig>,
    /// In-process backend settings (feature `memory`, off in this build: a present section
    /// is an error naming the feature).
    #[cfg(not(feature = "memory"))]
    pub memory: Option<Raw>,
    /// NATS settings (feature `nats`).
    pub nats: Option<Raw>,
    /// Redis settings (feature `redis`).
    pub redis: Option<Raw>,
    /// Concurrent handler calls per subscription.
    pub max_concurrency: usize,
}

impl SimpleSection {
    /// Its backend sections, by backend, in the order of [`BackendKind`] (Kafka has no
    /// simple bus).
    fn backend_sections(&self) -> [(BackendKind, Option<Section<'_>>); 3] {
        [
            (BackendKind::Memory, self.memory.as_ref().map(Section::from)),
            (BackendKind::Nats, self.nats.as_ref().map(Section::from)),
            (BackendKind::Redis, self.redis.as_ref().map(Section::from)),
        ]
    }
}

impl Default for SimpleSection {
    fn default() -> Self {
        Self {
            kind: BackendKind::Memory,
            memory: None,
            nats: None,
            redis: None,
            max_concurrency: 1024,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The domain-event bus.
    pub domain: DomainSection,
    /// The simple-message bus.
    pub simple: SimpleSection,
    /// OpenTelemetry on both buses (feature `otel`).
    #[cfg(feature = "otel")]
    pub otel: Option<dualbus_otel::OtelConfig>,
    /// OpenTelemetry (feature `otel`, off in this build: a present section is an error
    /// naming the feature).
    #[cfg(not(feature = "otel"))]
    pub otel: Option<Raw>,
}

impl Config {
    /// Reads a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file, then applies `DUALBUS__`
    /// environment overrides. A missing file is an error.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::config(
                "",
                format!("configuration file {} not found", path.display()),
            ));
        }
        let figment = match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Figment::from(Yaml::file(path)),
            Some("toml") => Figment::from(Toml::file(path)),
            _ => {
                return Err(Error::config(
                    "",
                    format!("{}: use a .yaml, .yml or .toml file", path.display()),
                ));
            }
        };
        Self::from_figment(figment.merge(env()))
    }

    /// Parses YAML text, then applies environment overrides.
    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::from_figment(Figment::from(Yaml::string(text)).merge(env()))
    }

    /// Parses TOML text, then applies environment overrides.
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_figment(Figment::from(Toml::string(text)).merge(env()))
    }

    /// Defaults plus environment overrides only.
    pub fn from_env() -> Result<Self> {
        Self::from_figment(Figment::new().merge(env()))
    }

    /// Extracts from any figment (for applications that merge their own providers).
    pub fn from_figment(figment: Figment) -> Result<Self> {
        let config: Self = figment.extract().map_err(figment_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values and backend sections against this build's features.
    pub fn validate(&self) -> Result<()> {
        #[cfg(feature = "otel")]
        if let Some(o) = &self.otel {
            o.validate()?;
        }
        #[cfg(not(feature = "otel"))]
        if self.otel.is_some() {
            return Err(Error::config(
                "otel",
                "this build has no OpenTelemetry: enable the `otel` feature of dualbus",
            ));
        }
        let d = &self.domain;
        let domain = backends::for_bus(Bus::Domain, d.kind)?;
        backends::check_sections(Bus::Domain, d.backend_sections())?;
        backends::check_partitions(domain, self)?;
        if let Some(s) = &d.source
            && s.trim().is_empty()
        {
            return Err(Error::config("domain.source", "must not be empty"));
        }
        if d.codec != CodecKind::Cloudevents && d.cloudevents_mode.is_some() {
            return Err(Error::config(
                "domain.cloudevents_mode",
                "applies to `codec: cloudevents` only",
            ));
        }
        if d.codec != CodecKind::Jxt && d.jxt_tenant_id.is_some() {
            return Err(Error::config(
                "domain.jxt_tenant_id",
                "applies to `codec: jxt` only",
            ));
        }
        d.pool.validate().map_err(|e| prefix("domain", e))?;
        if let Some(n) = &d.group.name {
            dualbus_core::validate_group("domain.group.name", n)?;
        }
        if d.group.partitions == Some(0) {
            return Err(Error::config(
                "domain.group.partitions",
                "must be at least 1",
            ));
        }
        if d.group
            .member_timeout
            .is_some_and(|t| t < Duration::from_millis(300))
        {
            return Err(Error::config(
                "domain.group.member_timeout",
                "must be at least 300ms",
            ));
        }
        for (topic, t) in &d.topics {
            dualbus_core::validate_topic(topic)
                .map_err(|e| Error::config(format!("domain.topics.{topic}"), e.to_string()))?;
            if t.partitions == Some(0) {
                return Err(Error::config(
                    format!("domain.topics.{topic}.partitions"),
                    "must be at least 1",
                ));
            }
        }
        d.retry.validate().map_err(|e| prefix("domain", e))?;
        let s = &self.simple;
        backends::for_bus(Bus::Simple, s.kind)?;
        backends::check_sections(Bus::Simple, s.backend_sections())?;
        if s.max_concurrency == 0 {
            return Err(Error::config(
                "simple.max_concurrency",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

fn env() -> Env {
    Env::prefixed(ENV_PREFIX).split("__")
}

/// `e` with its path under `section` (`memory.partitions` -> `domain.memory.partitions`).
pub(crate) fn prefix(section: &str, e: Error) -> Error {
    match e {
        Error::Config { path, message } => Error::config(format!("{section}.{path}"), message),
        other => other,
    }
}

/// Turns figment's error into ours, with the full key path (unknown keys included).
fn figment_error(e: figment::Error) -> Error {
    use figment::error::Kind;
    let mut path = e.path.join(".");
    let message = match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path usually ends with the field already; make sure it does.
            if e.path.last() != Some(field) {
                path = if path.is_empty() {
                    field.clone()
                } else {
                    format!("{path}.{field}")
                };
            }
            format!(
                "unknown key; expected one of: {}",
                expected
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Kind::UnknownVariant(v, expected) => format!(
            "unknown value `{v}`; expected one of: {}",
            expected
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => {
            let mut m = other.to_string();
            if let Some(meta) = &e.metadata {
                m.push_str(&format!(" (from {})", meta.name));
            }
            m
        }
    };
    Error::config(path, message)
}

impl crate::Buses {
    /// Builds both buses from configuration. With only in-process backends this needs no
    /// server; network backends connect here. Only the backends that `type` names are
    /// built (with memory on both buses and no `simple.memory` section, one broker serves
    /// both).
    pub async fn from_config(config: &Config) -> Result<Self> {
        config.validate()?;
        let (domain, simple) = backends::build(config).await?;
        let d = &config.domain;
        let mut pool = d.pool.clone();
        if let Some(deadline) = d.group.drain_deadline {
            pool.drain_deadline = deadline;
        }
        let mut b = Self::builder()
            .domain_dyn(domain)
            .simple_dyn(simple)
            .codec(d.wire_codec())
            .pool(pool)
            .retry(d.retry.clone())
            .dead_letter(d.dead_letter.clone())
            .simple_max_concurrency(config.simple.max_concurrency);
        if let Some(s) = &d.source {
            b = b.source(s.clone());
        }
        if let Some(t) = d.handler_timeout {
            b = b.handler_timeout(t);
        }
        if let Some(g) = &d.group.name {
            b = b.default_group(g.clone());
        }
        #[cfg(feature = "otel")]
        if let Some(o) = config.otel.as_ref().filter(|o| o.enabled) {
            if o.install {
                let service = d.source.as_deref().unwrap_or(dualbus_core::DEFAULT_SOURCE);
                b = b.telemetry(dualbus_otel::Telemetry::install(o, service)?);
            }
            b = b.otel(&dualbus_otel::Otel::from_config(o));
        }
        b.build()
    }
}
