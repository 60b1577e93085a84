//! The Kafka settings (brokers, security, producer, consumer, topic provisioning) and
//! their translation into librdkafka properties, with secrets kept out of `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use dualbus_core::config::Secret;
use dualbus_core::{Error, Result};
use rdkafka::ClientConfig;
use serde::Deserialize;

/// How the client talks to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SecurityProtocol {
    /// No TLS, no authentication. The default.
    #[default]
    Plaintext,
    /// TLS (needs the crate feature `ssl`).
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS (needs the crate feature `ssl`).
    SaslSsl,
}

impl SecurityProtocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// The SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// `PLAIN`: user name and password (over TLS in production). The default.
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256` (needs the crate feature `ssl`: librdkafka's SCRAM uses OpenSSL).
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512` (needs the crate feature `ssl`).
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Authentication and encryption, passed through to librdkafka.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Security {
    /// `security.protocol`. Default plaintext.
    pub protocol: SecurityProtocol,
    /// `sasl.mechanism`, with a SASL protocol. Default `PLAIN`.
    pub sasl_mechanism: SaslMechanism,
    /// `sasl.username`.
    pub username: Option<String>,
    /// `sasl.password`.
    pub password: Option<Secret>,
    /// `ssl.ca.location`: PEM file of the certificate authorities to trust.
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`: the client certificate (mutual TLS).
    pub ssl_certificate_location: Option<String>,
    /// `ssl.key.location`: the client certificate's private key.
    pub ssl_key_location: Option<String>,
    /// `ssl.key.password`.
    pub ssl_key_password: Option<Secret>,
}

/// Compression of produced batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Compression {
    /// None. The default.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
        }
    }
}

/// Which partition a key goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Partitioner {
    /// murmur2 of the key, as the Java client places keys (and Go clients configured for
    /// murmur2): librdkafka's `murmur2_random`. The default.
    #[default]
    Murmur2Random,
    /// FNV-1a (32 bit) of the key, as sarama's default hash partitioner places keys (Go
    /// services built on sarama, jxt-core among them).
    SaramaFnv1a,
}

/// Producer settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProducerSettings {
    /// Idempotent producing (`enable.idempotence`, which implies `acks=all`): a retried
    /// batch is stored once and in order. Default on; turning it off is refused unless
    /// `acks` is set to something other than `all` too (say what you trade).
    pub idempotence: bool,
    /// `acks`: `all` (the default), `1` or `0`. Anything but `all` can lose acknowledged
    /// events when a broker fails; the domain bus then declares itself not durable.
    pub acks: String,
    /// `compression.type`. Default none.
    pub compression: Compression,
    /// `linger.ms`: how long a batch waits for more messages. Default 5 ms.
    #[serde(with = "dualbus_core::config::duration")]
    pub linger: Duration,
    /// `batch.size` in bytes. Default 1,000,000 (librdkafka's).
    pub batch_size: usize,
    /// `message.max.bytes`: the largest message librdkafka sends, which must not be above the
    /// broker's or the topic's `message.max.bytes` (1,048,588 by default). Default 1,000,000.
    pub max_message_bytes: usize,
    /// `delivery.timeout.ms`: how long a message may take to be acknowledged by the broker,
    /// retries included, before its publish fails. Default 30 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub delivery_timeout: Duration,
    /// How long a publish waits for room when the local queue
    /// (`queue.buffering.max.messages`) is full before it fails with a retryable error.
    /// The wait ends early when the publish is cancelled. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub queue_full_wait: Duration,
    /// Which partition a key goes to. Default `murmur2-random`.
    pub partitioner: Partitioner,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            idempotence: true,
            acks: "all".to_owned(),
            compression: Compression::None,
            linger: Duration::from_millis(5),
            batch_size: 1_000_000,
            max_message_bytes: 1_000_000,
            delivery_timeout: Duration::from_secs(30),
            queue_full_wait: Duration::from_secs(5),
            partitioner: Partitioner::Murmur2Random,
        }
    }
}

/// The consumer group protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum GroupProtocol {
    /// The broker-side protocol of KIP-848 (`group.protocol=consumer`, Kafka 4.0+): the
    /// broker computes assignments, session timeout and heartbeat interval are broker
    /// settings (`group.consumer.*`). The default.
    #[default]
    Consumer,
    /// The classic protocol with the `cooperative-sticky` assignor (older brokers).
    Classic,
}

/// Consumer settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// The group protocol. Default `consumer` (KIP-848).
    pub group_protocol: GroupProtocol,
    /// `group.remote.assignor` of the consumer protocol (`uniform` or `range`); `None` (the
    /// default) leaves it to the broker.
    pub remote_assignor: Option<String>,
    /// The group session timeout: the classic protocol's `session.timeout.ms`; with the
    /// consumer protocol the broker's `group.consumer.session.timeout.ms` (45 s by
    /// default), which this must mirror. A member that could not reach the group
    /// coordinator for this long stops its partitions locally (another member owns them
    /// by then). Default 45 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`. The member polls on its own thread, so only a revocation
    /// that waits for its drain comes near it. Default 300 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub max_poll_interval: Duration,
    /// How long a revocation waits for the pool to drain the revoked partitions before it
    /// commits what completed and lets them go. Must be below `max_poll_interval`.
    /// Default 30 s (the pool's own drain deadline is usually shorter).
    #[serde(with = "dualbus_core::config::duration")]
    pub revoke_timeout: Duration,
    /// How often completed offsets are committed (coalesced: one commit per interval for
    /// every partition whose floor moved). Default 500 ms. Revocations and closes commit
    /// at once.
    #[serde(with = "dualbus_core::config::duration")]
    pub commit_interval: Duration,
    /// `fetch.queue.backoff.ms`: librdkafka's pause when its fetch queue is full. Default
    /// 10 ms (librdkafka's 1 s stalls the consumer about 1 s per 100,000 queued messages).
    #[serde(with = "dualbus_core::config::duration")]
    pub fetch_queue_backoff: Duration,
    /// Records handed to the pool ahead of its demand. When the pool stops taking them,
    /// every assigned partition is paused and the member keeps polling. Default 1024.
    pub prefetch: usize,
    /// The broker's `offset.metadata.max.bytes` (4096 by default): the commit metadata
    /// (partition epoch, records completed out of order) is kept below it, and the
    /// out-of-order records are left out when they do not fit.
    pub metadata_max_bytes: usize,
    /// List the records completed above the committed offset in the commit metadata, so
    /// that the next owner does not handle them again. Default on; off commits the epoch
    /// and the delivered mark only.
    pub completed_in_metadata: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            group_protocol: GroupProtocol::Consumer,
            remote_assignor: None,
            session_timeout: Duration::from_secs(45),
            max_poll_interval: Duration::from_secs(300),
            revoke_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(500),
            fetch_queue_backoff: Duration::from_millis(10),
            prefetch: 1024,
            metadata_max_bytes: 4096,
            completed_in_metadata: true,
        }
    }
}

/// How topics are created at first use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicSettings {
    /// Create a missing topic at first publish or subscribe. Default on. An existing topic
    /// is used as it is.
    pub create: bool,
    /// Partitions of a created topic: at most this many members of a group share it.
    /// Default 16.
    pub partitions: u32,
    /// Partitions of particular created topics, by topic name (over `partitions`).
    pub partitions_of: BTreeMap<String, u32>,
    /// Replication factor of a created topic; -1 (the default) takes the broker's
    /// `default.replication.factor`.
    pub replication: i32,
    /// `retention.ms` of a created topic: `None` (the default) takes the broker's; event
    /// sourcing needs `forever` (-1).
    pub retention: Option<TopicRetention>,
    /// Further topic configs for created topics (e.g. `min.insync.replicas`).
    pub configs: BTreeMap<String, String>,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            create: true,
            partitions: 16,
            partitions_of: BTreeMap::new(),
            replication: -1,
            retention: None,
            configs: BTreeMap::new(),
        }
    }
}

/// How long a created topic keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum TopicRetention {
    /// `forever`: `retention.ms=-1`.
    Forever(Forever),
    /// A duration (`7d`, `12h`).
    For(#[serde(with = "dualbus_core::config::duration")] Duration),
}

/// The word `forever`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Forever {
    /// Keep records forever.
    Forever,
}

impl TopicRetention {
    /// The `retention.ms` value.
    pub fn as_millis(self) -> i64 {
        match self {
            Self::Forever(_) => -1,
            Self::For(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// Kafka settings.
///
/// `Debug` output shows no secret: [`Secret`]s print as `***`, and so do the values of
/// raw [`properties`](Self::properties) whose name says they hold one (`password`,
/// `secret`, `token`, `.pem`, `jaas`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`. Default that one.
    pub bootstrap_servers: Vec<String>,
    /// `client.id`. Default `dualbus`.
    pub client_id: String,
    /// Authentication and TLS.
    pub security: Security,
    /// Producer settings.
    pub producer: ProducerSettings,
    /// Consumer settings.
    pub consumer: ConsumerSettings,
    /// Topic provisioning.
    pub topics: TopicSettings,
    /// Timeout of metadata, admin and offset requests. Default 10 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub request_timeout: Duration,
    /// Raw librdkafka properties, applied last to every client (they win over the settings
    /// above). Names that librdkafka does not know are refused when the transport
    /// connects. Properties this crate must own (`enable.auto.commit`,
    /// `enable.auto.offset.store`, `group.id`, `auto.offset.reset`, `enable.partition.eof`,
    /// `group.protocol`, `partition.assignment.strategy`, and `partitioner` with sarama
    /// placement) are refused with a configuration error.
    pub properties: BTreeMap<String, String>,
    #[serde(skip)]
    pub(crate) rewind: bool,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) { "***" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("security", &self.security)
            .field("producer", &self.producer)
            .field("consumer", &self.consumer)
            .field("topics", &self.topics)
            .field("request_timeout", &self.request_timeout)
            .field("properties", &properties)
            .finish_non_exhaustive()
    }
}

/// Whether a librdkafka property holds a secret (its value never shown).
fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        ".pem",
        "jaas",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| n.contains(s))
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: vec!["127.0.0.1:9092".to_owned()],
            client_id: "dualbus".to_owned(),
            security: Security::default(),
            producer: ProducerSettings::default(),
            consumer: ConsumerSettings::default(),
            topics: TopicSettings::default(),
            request_timeout: Duration::from_secs(10),
            properties: BTreeMap::new(),
            rewind: true,
        }
    }
}

/// Properties the transport sets itself and a user may not override.
const OWNED: [&str; 7] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "auto.offset.reset",
    "enable.partition.eof",
    "group.protocol",
    "partition.assignment.strategy",
];

impl KafkaConfig {
    /// Settings for these bootstrap servers.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        Self {
            bootstrap_servers: servers.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Same settings with a raw librdkafka property.
    #[must_use]
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Same settings, but a member taking a partition over fetches from where the former
    /// owner had read (the highest delivered offset in the commit metadata) instead of its
    /// committed offset, and reads the skipped records only 5 s later: the naive takeover
    /// the conformance suite's mutant check must catch. Never use it elsewhere.
    #[cfg(feature = "conformance")]
    #[must_use]
    pub fn without_rewind(mut self) -> Self {
        self.rewind = false;
        self
    }

    /// Checks the settings; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.is_empty()
            || self.bootstrap_servers.iter().any(|s| s.trim().is_empty())
        {
            return Err(Error::config(
                "kafka.bootstrap_servers",
                "give at least one broker address, e.g. 127.0.0.1:9092",
            ));
        }
        let p = &self.producer;
        if !matches!(p.acks.as_str(), "all" | "-1" | "1" | "0") {
            return Err(Error::config(
                "kafka.producer.acks",
                format!("{:?} is not one of all, 1, 0", p.acks),
            ));
        }
        if p.idempotence && !matches!(p.acks.as_str(), "all" | "-1") {
            return Err(Error::config(
                "kafka.producer.acks",
                "an idempotent producer needs acks=all; turn kafka.producer.idempotence off to use another value",
            ));
        }
        if p.max_message_bytes < 1024 {
            return Err(Error::config(
                "kafka.producer.max_message_bytes",
                "at least 1024 bytes",
            ));
        }
        let c = &self.consumer;
        if c.revoke_timeout >= c.max_poll_interval {
            return Err(Error::config(
                "kafka.consumer.revoke_timeout",
                "must be below kafka.consumer.max_poll_interval, or the member is expelled while it drains",
            ));
        }
        if c.commit_interval.is_zero() {
            return Err(Error::config(
                "kafka.consumer.commit_interval",
                "must be above zero",
            ));
        }
        if c.prefetch == 0 {
            return Err(Error::config("kafka.consumer.prefetch", "at least 1"));
        }
        if c.metadata_max_bytes < 64 {
            return Err(Error::config(
                "kafka.consumer.metadata_max_bytes",
                "at least 64 bytes (the partition epoch must fit)",
            ));
        }
        if self.topics.partitions == 0 {
            return Err(Error::config("kafka.topics.partitions", "at least 1"));
        }
        for (topic, p) in &self.topics.partitions_of {
            if *p == 0 {
                return Err(Error::config(
                    format!("kafka.topics.partitions_of.{topic}"),
                    "at least 1",
                ));
            }
        }
        if self.topics.replication == 0 || self.topics.replication < -1 {
            return Err(Error::config(
                "kafka.topics.replication",
                "at least 1, or -1 for the broker's default",
            ));
        }
        for name in self.properties.keys() {
            if OWNED.contains(&name.as_str()) {
                return Err(Error::config(
                    format!("kafka.properties.{name}"),
                    "set by the transport itself (offsets are committed only for completed work)",
                ));
            }
            if name == "partitioner" && p.partitioner == Partitioner::SaramaFnv1a {
                return Err(Error::config(
                    "kafka.properties.partitioner",
                    "conflicts with kafka.producer.partitioner: sarama-fnv1a",
                ));
            }
        }
        let s = &self.security;
        if s.protocol.uses_sasl() && (s.username.is_none() || s.password.is_none()) {
            return Err(Error::config(
                "kafka.security.username",
                "SASL needs a user name and a password",
            ));
        }
        if !cfg!(feature = "ssl") {
            if s.protocol.uses_tls() {
                return Err(Error::config(
                    "kafka.security.protocol",
                    "TLS needs the `ssl` feature of dualbus-kafka",
                ));
            }
            if s.protocol.uses_sasl() && s.sasl_mechanism != SaslMechanism::Plain {
                return Err(Error::config(
                    "kafka.security.sasl_mechanism",
                    "SCRAM needs the `ssl` feature of dualbus-kafka (librdkafka's SCRAM uses OpenSSL)",
                ));
            }
        }
        Ok(())
    }

    /// The properties every client shares: brokers, identity, security, raw properties.
    pub(crate) fn common(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers.join(","));
        c.set("client.id", &self.client_id);
        let s = &self.security;
        c.set("security.protocol", s.protocol.as_str());
        if s.protocol.uses_sasl() {
            c.set("sasl.mechanism", s.sasl_mechanism.as_str());
            if let Some(u) = &s.username {
                c.set("sasl.username", u);
            }
            if let Some(p) = &s.password {
                c.set("sasl.password", p.expose());
            }
        }
        for (key, value) in [
            ("ssl.ca.location", &s.ssl_ca_location),
            ("ssl.certificate.location", &s.ssl_certificate_location),
            ("ssl.key.location", &s.ssl_key_location),
        ] {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        if let Some(p) = &s.ssl_key_password {
            c.set("ssl.key.password", p.expose());
        }
        // librdkafka logs through the `log` facade of rdkafka; errors come as events.
        c.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        c
    }

    fn raw(&self, c: &mut ClientConfig) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
    }

    /// The producer's properties.
    pub(crate) fn producer_config(&self) -> ClientConfig {
        let p = &self.producer;
        let mut c = self.common();
        c.set("enable.idempotence", p.idempotence.to_string());
        c.set("acks", &p.acks);
        c.set("compression.type", p.compression.as_str());
        c.set("linger.ms", millis(p.linger));
        c.set("batch.size", p.batch_size.to_string());
        c.set("message.max.bytes", p.max_message_bytes.to_string());
        c.set("delivery.timeout.ms", millis(p.delivery_timeout));
        if p.partitioner == Partitioner::Murmur2Random {
            c.set("partitioner", "murmur2_random");
        }
        self.raw(&mut c);
        c
    }

    /// A group member's properties.
    pub(crate) fn consumer_config(&self, group: &str) -> ClientConfig {
        let k = &self.consumer;
        let mut c = self.common();
        c.set("group.id", group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("enable.partition.eof", "false");
        c.set("auto.offset.reset", "earliest");
        c.set("max.poll.interval.ms", millis(k.max_poll_interval));
        c.set("fetch.queue.backoff.ms", millis(k.fetch_queue_backoff));
        match k.group_protocol {
            GroupProtocol::Consumer => {
                c.set("group.protocol", "consumer");
                if let Some(a) = &k.remote_assignor {
                    c.set("group.remote.assignor", a);
                }
            }
            GroupProtocol::Classic => {
                c.set("group.protocol", "classic");
                c.set("partition.assignment.strategy", "cooperative-sticky");
                c.set("session.timeout.ms", millis(k.session_timeout));
            }
        }
        self.raw(&mut c);
        c
    }

    /// A client that reads by offset outside any group (replay, reread, lag).
    pub(crate) fn reader_config(&self, group: &str) -> ClientConfig {
        let mut c = self.common();
        c.set("group.id", group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("enable.partition.eof", "true");
        c.set(
            "fetch.queue.backoff.ms",
            millis(self.consumer.fetch_queue_backoff),
        );
        self.raw(&mut c);
        c
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut c = KafkaConfig::default().with_property("sasl.oauthbearer.client.secret", "s3");
        c.security.protocol = SecurityProtocol::SaslPlaintext;
        c.security.username = Some("app".into());
        c.security.password = Some(Secret::new("s3cret"));
        c.security.ssl_key_password = Some(Secret::new("k3y"));
        c = c.with_property("ssl.key.pem", "-----BEGIN PRIVATE KEY-----");
        let text = format!("{c:?}");
        for secret in ["s3cret", "k3y", "BEGIN PRIVATE", "\"s3\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("app") && text.contains("***"), "{text}");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let bad = |f: fn(&mut KafkaConfig)| {
            let mut c = KafkaConfig::default();
            f(&mut c);
            match c.validate() {
                Err(Error::Config { path, .. }) => path,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            bad(|c| c.bootstrap_servers.clear()),
            "kafka.bootstrap_servers"
        );
        assert_eq!(bad(|c| c.producer.acks = "1".into()), "kafka.producer.acks");
        assert_eq!(
            bad(|c| c.producer.acks = "two".into()),
            "kafka.producer.acks"
        );
        assert_eq!(
            bad(|c| c.consumer.revoke_timeout = c.consumer.max_poll_interval),
            "kafka.consumer.revoke_timeout"
        );
        assert_eq!(bad(|c| c.topics.partitions = 0), "kafka.topics.partitions");
        assert_eq!(
            bad(|c| c.topics.replication = 0),
            "kafka.topics.replication"
        );
        assert_eq!(
            bad(|c| {
                c.properties
                    .insert("enable.auto.commit".into(), "true".into());
            }),
            "kafka.properties.enable.auto.commit"
        );
        assert_eq!(
            bad(|c| c.security.protocol = SecurityProtocol::SaslPlaintext),
            "kafka.security.username"
        );
        let mut ok = KafkaConfig::default();
        ok.producer.idempotence = false;
        ok.producer.acks = "1".into();
        ok.validate().expect("acks=1 without idempotence");
    }

    #[test]
    fn unknown_keys_are_refused_and_retention_reads_forever_or_a_duration() {
        let e = serde_json::from_str::<KafkaConfig>(r#"{"bootstrap_server": ["x:1"]}"#)
            .expect_err("typo");
        assert!(e.to_string().contains("bootstrap_server"), "{e}");
        let t: TopicSettings =
            serde_json::from_str(r#"{"retention": "forever", "partitions": 3}"#).unwrap();
        assert_eq!(t.retention.map(TopicRetention::as_millis), Some(-1));
        let t: TopicSettings = serde_json::from_str(r#"{"retention": "7d"}"#).unwrap();
        assert_eq!(
            t.retention.map(TopicRetention::as_millis),
            Some(604_800_000)
        );
        let p: ProducerSettings =
            serde_json::from_str(r#"{"partitioner": "sarama-fnv1a", "linger": "20ms"}"#).unwrap();
        assert_eq!(
            (p.partitioner, p.linger),
            (Partitioner::SaramaFnv1a, Duration::from_millis(20))
        );
    }
}
