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
//!   memory: { partitions: 16, ack_wait: 30s }
//!   pool: { max_concurrency: 256, max_in_flight: 10000, max_per_key: 1000, drain_deadline: 10s }
//!   retry: { attempts: 5, initial_backoff: 100ms, max_backoff: 10s }
//!   dead_letter: { suffix: ".dlq" }
//!   handler_timeout: 30s
//!   group: { name: orders-service, partitions: 16, drain_deadline: 10s, member_timeout: 5s }
//!   # group names: [A-Za-z0-9_-] tokens separated by single dots, at most 200 bytes
//!   topics: { payments: { partitions: 32 } }   # per-topic overrides
//!   # type: nats, with (see dualbus_nats::NatsConfig):
//!   # nats:
//!   #   urls: ["nats://127.0.0.1:4222"]  # or nats://user:password@host:4222 (redacted in output)
//!   #   credentials: { token: ... }     # or user + password, nkey, creds_file (not with URL credentials)
//!   #   jetstream:
//!   #     stream: { storage: file, replicas: 1, retention: limits, max_age: 30d, duplicate_window: 2m }
//!   #     consumer: { ack_wait: 30s, max_ack_pending: 10000, batch: 256, lease_ttl: 10s }
//! simple:
//!   type: memory            # memory | nats | redis
//!   max_concurrency: 1024
//! ```
//!
//! Every key can be overridden from the environment with the prefix `DUALBUS__` and `__`
//! between levels: `DUALBUS__DOMAIN__TYPE=memory`, `DUALBUS__DOMAIN__POOL__MAX_IN_FLIGHT=500`.
//! Unknown keys are rejected with their path (`domain.pool.max_inflight`); a section for a
//! backend whose cargo feature is off is an error naming the feature. Durations are written
//! `250ms`, `30s`, `5m`, `30d` (or as a number of milliseconds).

use std::path::Path;
use std::time::Duration;

use dualbus_core::{Backoff, Codec, DeadLetterPolicy, Error, PoolConfig, Result};
use figment::Figment;
use figment::providers::{Env, Format as _, Toml, Yaml};
use serde::Deserialize;

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

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Nats => "nats",
            Self::Kafka => "kafka",
            Self::Redis => "redis",
        }
    }
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

/// The `memory` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemorySection {
    /// Partitions per domain topic. Default 16.
    pub partitions: u32,
    /// Redelivery deadline. Default 30 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub ack_wait: Duration,
    /// Largest payload plus headers. Default 1 MiB.
    pub max_payload: usize,
    /// Simple-subscriber buffer. Default 1,024.
    pub simple_buffer: usize,
}

impl Default for MemorySection {
    fn default() -> Self {
        Self {
            partitions: 16,
            ack_wait: Duration::from_secs(30),
            max_payload: 1024 * 1024,
            simple_buffer: 1024,
        }
    }
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
    /// memory).
    pub partitions: Option<u32>,
    /// How long a revoked partition (and a shutdown) may take to finish started handlers.
    /// Default: `pool.drain_deadline`.
    #[serde(with = "dualbus_core::config::duration::option")]
    pub drain_deadline: Option<Duration>,
    /// After how long without a sign of life a member counts as gone (NATS and Redis
    /// registries; memory and Kafka detect departures themselves). Default 5 s.
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
pub struct Raw(
    // Read by the backends of this build; without any, only the section's presence counts.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))] figment::value::Value,
);

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
    /// In-process backend settings.
    pub memory: Option<MemorySection>,
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
    /// In-process backend settings.
    pub memory: Option<MemorySection>,
    /// NATS settings (feature `nats`).
    pub nats: Option<Raw>,
    /// Redis settings (feature `redis`).
    pub redis: Option<Raw>,
    /// Concurrent handler calls per subscription.
    pub max_concurrency: usize,
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
        let d = &self.domain;
        backend_available("domain", d.kind)?;
        section("domain", "nats", d.nats.is_some())?;
        #[cfg(feature = "nats")]
        if let Some(raw) = &d.nats {
            nats_config(raw, "domain")?;
        }
        if d.kind == BackendKind::Nats {
            // Partitioned consumer groups on JetStream are not offered yet: one active
            // subscriber per group and topic.
            if d.group.partitions.is_some() {
                return Err(Error::config(
                    "domain.group.partitions",
                    "the nats backend has no partitioned consumer groups yet (one active subscriber per group)",
                ));
            }
            if let Some(topic) = d
                .topics
                .iter()
                .find(|(_, t)| t.partitions.is_some())
                .map(|(t, _)| t)
            {
                return Err(Error::config(
                    format!("domain.topics.{topic}.partitions"),
                    "the nats backend has no partitioned consumer groups yet (one active subscriber per group)",
                ));
            }
        }
        section("domain", "kafka", d.kafka.is_some())?;
        section("domain", "redis", d.redis.is_some())?;
        section("domain", "memory", d.memory.is_some())?;
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
        if s.kind == BackendKind::Kafka {
            return Err(Error::config(
                "simple.type",
                "kafka offers no simple-message bus; use memory, nats or redis",
            ));
        }
        backend_available("simple", s.kind)?;
        section("simple", "nats", s.nats.is_some())?;
        #[cfg(feature = "nats")]
        if let Some(raw) = &s.nats {
            nats_config(raw, "simple")?;
        }
        section("simple", "redis", s.redis.is_some())?;
        section("simple", "memory", s.memory.is_some())?;
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

fn prefix(section: &str, e: Error) -> Error {
    match e {
        Error::Config { path, message } => Error::config(format!("{section}.{path}"), message),
        other => other,
    }
}

fn feature_enabled(name: &str) -> bool {
    match name {
        "memory" => cfg!(feature = "memory"),
        "nats" => cfg!(feature = "nats"),
        // Backends whose crates are not part of this build.
        _ => false,
    }
}

fn feature_error(path: String, name: &str) -> Error {
    Error::config(
        path,
        format!(
            "the {name} backend needs the cargo feature `{name}` of dualbus, which this build does not enable"
        ),
    )
}

fn backend_available(section: &str, kind: BackendKind) -> Result<()> {
    if feature_enabled(kind.name()) {
        Ok(())
    } else {
        Err(feature_error(format!("{section}.type"), kind.name()))
    }
}

fn section(parent: &str, name: &str, present: bool) -> Result<()> {
    if present && !feature_enabled(name) {
        Err(feature_error(format!("{parent}.{name}"), name))
    } else {
        Ok(())
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

/// The typed `nats` section.
#[cfg(feature = "nats")]
fn nats_config(raw: &Raw, parent: &str) -> Result<dualbus_nats::NatsConfig> {
    dualbus_nats::NatsConfig::deserialize(&raw.0).map_err(|e| {
        let mut path = format!("{parent}.nats");
        for p in &e.path {
            path.push('.');
            path.push_str(p);
        }
        if let figment::error::Kind::UnknownField(field, _) = &e.kind
            && e.path.last() != Some(field)
        {
            path.push('.');
            path.push_str(field);
        }
        Error::config(path, nats_message(&e.kind))
    })
}

/// The message of an error in a `nats` section, showing no secret: a string value (a URL
/// with a password, a token) is not quoted, and URLs in the message are redacted.
#[cfg(feature = "nats")]
fn nats_message(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let message = match kind {
        Kind::InvalidType(Actual::Str(_), expected) => {
            format!("invalid type: found a string, expected {expected}")
        }
        Kind::InvalidValue(Actual::Str(_), expected) => {
            format!("invalid value: a string, expected {expected}")
        }
        other => other.to_string(),
    };
    dualbus_nats::redact_urls(&message)
}

impl crate::Buses {
    /// Builds both buses from configuration. With only in-process backends this needs no
    /// server; network backends connect here.
    pub async fn from_config(config: &Config) -> Result<Self> {
        config.validate()?;
        let d = &config.domain;
        let mut pool = d.pool.clone();
        if let Some(deadline) = d.group.drain_deadline {
            pool.drain_deadline = deadline;
        }
        let mut b = Self::builder()
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
        #[cfg(feature = "memory")]
        {
            let memory = |m: &MemorySection| {
                let mut c = dualbus_memory::MemoryConfig::default()
                    .with_partitions(d.group.partitions.unwrap_or(m.partitions))
                    .with_ack_wait(m.ack_wait)
                    .with_max_payload(m.max_payload)
                    .with_simple_buffer(m.simple_buffer);
                for (topic, t) in &d.topics {
                    if let Some(p) = t.partitions {
                        c = c.with_topic_partitions(topic.clone(), p);
                    }
                }
                dualbus_memory::Memory::with_config(c)
            };
            let domain_memory = memory(d.memory.as_ref().unwrap_or(&MemorySection::default()))
                .map_err(|e| prefix("domain", e))?;
            // One broker for both buses unless the simple bus has settings of its own.
            let simple_memory = match &config.simple.memory {
                Some(m) => memory(m).map_err(|e| prefix("simple", e))?,
                None => domain_memory.clone(),
            };
            b = b.domain(domain_memory);
            if config.simple.kind == BackendKind::Memory {
                b = b.simple(simple_memory);
            }
        }
        #[cfg(feature = "nats")]
        if d.kind == BackendKind::Nats {
            let nats = match &d.nats {
                Some(raw) => nats_config(raw, "domain")?,
                None => dualbus_nats::NatsConfig::default(),
            };
            b = b.domain(dualbus_nats::JetStream::connect(nats).await?);
        }
        #[cfg(feature = "nats")]
        if config.simple.kind == BackendKind::Nats {
            let nats = match &config.simple.nats {
                Some(raw) => nats_config(raw, "simple")?,
                None => dualbus_nats::NatsConfig::default(),
            };
            b = b.simple(dualbus_nats::Nats::connect(nats).await?);
        }
        b.build()
    }
}
