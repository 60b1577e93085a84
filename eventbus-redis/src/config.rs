//! The Redis settings (server, credentials, TLS, connections, message size) and their
//! translation into the `redis` crate's connection info, with secrets kept out of `Debug`
//! output.

use std::fmt;
use std::time::Duration;

use dualbus_core::config::{Secret, redact_url};
use dualbus_core::{Error, Result};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};
use serde::Deserialize;

use crate::frame;

/// The largest message the simple bus writes by default: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Redis' own limit on one string (`proto-max-bulk-len`, 512 MiB by default).
pub const SERVER_MAX_BULK: usize = 512 * 1024 * 1024;

const NO_TLS: &str =
    "TLS needs the crate feature `tls` of dualbus-redis (feature `redis-tls` of dualbus)";

/// How the client reconnects after the connection drops.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Reconnect {
    /// Attempts per reconnection before the commands waiting on it fail (the next command
    /// starts another round). Default 6.
    pub retries: usize,
    /// Delay before the first attempt, doubled after each. Default 100 ms.
    #[serde(with = "dualbus_core::config::duration")]
    pub min_delay: Duration,
    /// Longest delay between attempts. Default 2 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            retries: 6,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Settings of the domain bus on Redis Streams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamsSettings {
    /// Prefix of every key the domain bus writes. Default `dualbus:`.
    pub prefix: String,
    /// Partitions (streams) of a topic when it is first used; a topic keeps the count it
    /// was created with (stored in `<prefix>{<topic>}:meta`). Default 16, at most 1024.
    pub partitions: u32,
    /// How long a partition's lease lives without renewal: after a member's crash, its
    /// partitions move after at most this. Default 10 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub lease_ttl: Duration,
    /// How long a member stays registered without a heartbeat. Default 10 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub member_timeout: Duration,
    /// How long an owner's wait for new entries (`XREAD BLOCK`) lasts before it looks
    /// again at its partitions. Default 250 ms.
    #[serde(with = "dualbus_core::config::duration")]
    pub block: Duration,
    /// Entries read per partition and call (`XREADGROUP COUNT`). Default 256.
    pub read_count: usize,
    /// Deliveries a subscription holds before the pool takes them. Default 1024.
    pub prefetch: usize,
    /// `XADD MAXLEN ~ <n>` on every publish, off by default: on Redis 7.0 it trims entries
    /// whatever the groups have read (the group-aware trim arrives in Redis 8.2), so a
    /// slow group loses events. Set it only where that is acceptable.
    pub maxlen: Option<u64>,
    /// Keep each aggregate's last entry in a hash, written by the publish script with
    /// every entry: appends checked against an expected version need it. Off, a publish is
    /// a bare `XADD` (about three times cheaper for the server, which runs no script) and
    /// appends are refused. Default on.
    pub track_last: bool,
}

impl Default for StreamsSettings {
    fn default() -> Self {
        Self {
            prefix: crate::coordination::DEFAULT_PREFIX.to_owned(),
            partitions: 16,
            lease_ttl: Duration::from_secs(10),
            member_timeout: Duration::from_secs(10),
            block: Duration::from_millis(250),
            read_count: 256,
            prefetch: 1024,
            maxlen: None,
            track_last: true,
        }
    }
}

/// Settings of the Redis backend: the `redis` section of a bus in the facade's
/// configuration.
///
/// The server is given either as a `url` (`redis://`, `rediss://` for TLS) or as `host`
/// and `port`; credentials and the database may be in the URL or in their own fields (not
/// both).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: Option<String>,
    /// Server host (without `url`). Default `127.0.0.1` when neither is given.
    pub host: Option<String>,
    /// Server port (without `url`). Default 6379.
    pub port: Option<u16>,
    /// TLS (without `url`; with a URL, write `rediss://`). Needs the crate feature `tls`.
    pub tls: bool,
    /// ACL user name (Redis 6 and later).
    pub username: Option<String>,
    /// Password (`AUTH`).
    pub password: Option<Secret>,
    /// Database number (`SELECT`). Pub/sub ignores it: channels are server-wide.
    pub database: Option<i64>,
    /// Multiplexed connections that publishes are spread over. Each pipelines every
    /// command given to it, so one is enough for most services; more help when one
    /// connection's socket is the bottleneck. Default 1, at most 64.
    pub pool_size: usize,
    /// Timeout of each connection attempt. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub connect_timeout: Duration,
    /// Timeout of each command's reply. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub response_timeout: Duration,
    /// Reconnection after a dropped connection.
    pub reconnect: Reconnect,
    /// Largest message the simple bus publishes, frame included (see [`crate::frame`]).
    /// Default 1 MiB, at most 512 MiB (Redis' `proto-max-bulk-len`). Mind the server's
    /// `client-output-buffer-limit pubsub` (32 MB hard by default): a subscriber whose
    /// unread messages pass it is disconnected, and loses them.
    pub max_message_bytes: usize,
    /// Messages each subscription holds before its handlers take them. Past it, new
    /// messages of that subscription are dropped and counted
    /// ([`crate::RedisPubSub::dropped`]), as Redis drops a subscriber whose output buffer
    /// overflows: pub/sub is at most once. Default 65,536.
    pub subscription_buffer: usize,
    /// The domain bus on Streams.
    pub streams: StreamsSettings,
    /// Whether a new owner delivers its partition's pending entries first (always, except
    /// in the conformance suite's mutant check).
    #[serde(skip, default = "yes")]
    pub(crate) rewind: bool,
}

fn yes() -> bool {
    true
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            host: None,
            port: None,
            tls: false,
            username: None,
            password: None,
            database: None,
            pool_size: 1,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            reconnect: Reconnect::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            subscription_buffer: 65_536,
            streams: StreamsSettings::default(),
            rewind: true,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("database", &self.database)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("reconnect", &self.reconnect)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("streams", &self.streams)
            .finish()
    }
}

impl RedisConfig {
    /// The settings for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// Same, with a password.
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Same, with another message size limit.
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// The largest payload and headers core lets through, as [`frame::WIRE`] counts them:
    /// the limit less the frame's fixed bytes and the longest reply topic.
    pub(crate) fn max_payload(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(frame::FIXED + dualbus_core::MAX_TOPIC_LEN)
    }

    /// The same settings with the rewind at takeover broken: a new owner of a partition
    /// delivers the entries its former owner left pending a second late, after newer ones.
    /// A broken transport for the conformance suite's mutant check, which must catch it.
    /// Never use it elsewhere.
    #[cfg(feature = "conformance")]
    #[must_use]
    pub fn without_rewind(mut self) -> Self {
        self.rewind = false;
        self
    }

    /// Checks the settings without connecting: [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.connection_info().map(|_| ())?;
        if !(1..=64).contains(&self.pool_size) {
            return Err(Error::config("redis.pool_size", "between 1 and 64"));
        }
        let least = frame::FIXED + dualbus_core::MAX_TOPIC_LEN + 1024;
        if !(least..=SERVER_MAX_BULK).contains(&self.max_message_bytes) {
            return Err(Error::config(
                "redis.max_message_bytes",
                format!("between {least} and {SERVER_MAX_BULK} (Redis' proto-max-bulk-len)"),
            ));
        }
        if self.subscription_buffer == 0 {
            return Err(Error::config("redis.subscription_buffer", "at least 1"));
        }
        let st = &self.streams;
        if !(1..=1024).contains(&st.partitions) {
            return Err(Error::config(
                "redis.streams.partitions",
                "between 1 and 1024",
            ));
        }
        if st.read_count == 0 || st.prefetch == 0 {
            return Err(Error::config(
                "redis.streams.read_count",
                "read_count and prefetch must be at least 1",
            ));
        }
        if st.maxlen == Some(0) {
            return Err(Error::config(
                "redis.streams.maxlen",
                "at least 1 (or absent)",
            ));
        }
        if st.prefix.contains(['{', '}']) {
            return Err(Error::config(
                "redis.streams.prefix",
                "no braces (they mark hash tags)",
            ));
        }
        for (path, d) in [
            ("redis.streams.lease_ttl", st.lease_ttl),
            ("redis.streams.member_timeout", st.member_timeout),
            ("redis.streams.block", st.block),
            ("redis.connect_timeout", self.connect_timeout),
            ("redis.response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(path, "must be longer than zero"));
            }
        }
        if st.block >= self.response_timeout {
            return Err(Error::config(
                "redis.streams.block",
                "shorter than redis.response_timeout (the wait is a command)",
            ));
        }
        if self.reconnect.min_delay > self.reconnect.max_delay {
            return Err(Error::config(
                "redis.reconnect.min_delay",
                "longer than redis.reconnect.max_delay",
            ));
        }
        Ok(())
    }

    /// The connection info of the `redis` crate: RESP3 (pushes carry pub/sub messages on
    /// a connection that still takes commands).
    pub(crate) fn connection_info(&self) -> Result<ConnectionInfo> {
        let mut info = match (&self.url, &self.host) {
            (Some(_), Some(_)) => {
                return Err(Error::config("redis.host", "give either url or host/port"));
            }
            (Some(url), None) => {
                if self.port.is_some() || self.tls {
                    return Err(Error::config(
                        "redis.url",
                        "give the port and TLS (rediss://) in the URL",
                    ));
                }
                if url.trim_start().starts_with("rediss://") && !cfg!(feature = "tls") {
                    return Err(Error::config("redis.url", NO_TLS));
                }
                url.as_str().into_connection_info().map_err(|e| {
                    // The message of the `redis` crate, which never quotes the URL.
                    Error::config("redis.url", format!("{} ({})", e, redact_url(url)))
                })?
            }
            (None, host) => {
                let host = host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
                if host.trim().is_empty() {
                    return Err(Error::config("redis.host", "empty"));
                }
                let port = self.port.unwrap_or(6379);
                let addr = if self.tls {
                    tls_addr(host, port)?
                } else {
                    ConnectionAddr::Tcp(host, port)
                };
                addr.into_connection_info()
                    .map_err(|e| Error::config("redis.host", e.to_string()))?
            }
        };
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) && !cfg!(feature = "tls") {
            return Err(Error::config("redis.url", NO_TLS));
        }
        let mut redis = info.redis_settings().clone();
        let from_url = (redis.username().is_some(), redis.password().is_some());
        if let Some(user) = &self.username {
            if from_url.0 {
                return Err(Error::config("redis.username", "also given in the URL"));
            }
            redis = redis.set_username(user.clone());
        }
        if let Some(password) = &self.password {
            if from_url.1 {
                return Err(Error::config("redis.password", "also given in the URL"));
            }
            redis = redis.set_password(password.expose());
        }
        if let Some(db) = self.database {
            if redis.db() != 0 {
                return Err(Error::config("redis.database", "also given in the URL"));
            }
            if db < 0 {
                return Err(Error::config("redis.database", "not negative"));
            }
            redis = redis.set_db(db);
        }
        redis = redis.set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(redis);
        Ok(info)
    }
}

#[cfg(feature = "tls")]
fn tls_addr(host: String, port: u16) -> Result<ConnectionAddr> {
    Ok(ConnectionAddr::TcpTls {
        host,
        port,
        insecure: false,
        tls_params: None,
    })
}

#[cfg(not(feature = "tls"))]
fn tls_addr(_host: String, _port: u16) -> Result<ConnectionAddr> {
    Err(Error::config("redis.tls", NO_TLS))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut c = RedisConfig::new("redis://app:s3cret@db.example:6380/2");
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("app:***@db.example:6380/2"), "{text}");
        c = RedisConfig::default().with_password("s3cret");
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("***"), "{text}");
        // Nor in errors about the URL.
        let e = RedisConfig::new("redis://app:s3cret@db.example:notaport")
            .validate()
            .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn the_url_or_host_and_port() {
        let info = RedisConfig::new("redis://u:p@h:6380/3")
            .connection_info()
            .unwrap();
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("h".into(), 6380));
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().username(), Some("u"));
        let c = RedisConfig {
            host: Some("h".into()),
            port: Some(7000),
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            database: Some(4),
            ..RedisConfig::default()
        };
        let info = c.connection_info().unwrap();
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("h".into(), 7000));
        assert_eq!(info.redis_settings().db(), 4);
        assert_eq!(info.redis_settings().password(), Some("p"));
        assert_eq!(
            RedisConfig::default().connection_info().unwrap().addr(),
            &ConnectionAddr::Tcp("127.0.0.1".into(), 6379)
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        let cases: Vec<(RedisConfig, &str)> = vec![
            (
                RedisConfig {
                    host: Some("h".into()),
                    ..RedisConfig::new("redis://h")
                },
                "redis.host",
            ),
            (RedisConfig::new("http://h"), "redis.url"),
            (
                RedisConfig {
                    password: Some(Secret::new("x")),
                    ..RedisConfig::new("redis://:p@h")
                },
                "redis.password",
            ),
            (
                RedisConfig {
                    database: Some(-1),
                    ..RedisConfig::default()
                },
                "redis.database",
            ),
            (
                RedisConfig {
                    pool_size: 0,
                    ..RedisConfig::default()
                },
                "redis.pool_size",
            ),
            (
                RedisConfig::default().with_max_message_bytes(100),
                "redis.max_message_bytes",
            ),
            (
                RedisConfig::default().with_max_message_bytes(SERVER_MAX_BULK + 1),
                "redis.max_message_bytes",
            ),
            (
                RedisConfig {
                    connect_timeout: Duration::ZERO,
                    ..RedisConfig::default()
                },
                "redis.connect_timeout",
            ),
        ];
        for (c, path) in cases {
            let e = c.validate().unwrap_err();
            assert!(
                matches!(&e, Error::Config { path: p, .. } if p == path),
                "{path}: {e}"
            );
        }
        assert!(
            RedisConfig::default()
                .with_max_message_bytes(SERVER_MAX_BULK)
                .validate()
                .is_ok()
        );
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_without_the_feature_is_refused() {
        let e = RedisConfig::new("rediss://h").validate().unwrap_err();
        assert!(e.to_string().contains("feature `tls`"), "{e}");
        let c = RedisConfig {
            tls: true,
            ..RedisConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("feature"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_str::<RedisConfig>(r#"{"url":"redis://h","pool":3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `pool`"), "{e}");
        let c: RedisConfig = serde_json::from_str(
            r#"{"url":"redis://h","pool_size":4,"response_timeout":"2s","reconnect":{"retries":2}}"#,
        )
        .unwrap();
        assert_eq!(c.pool_size, 4);
        assert_eq!(c.response_timeout, Duration::from_secs(2));
        assert_eq!(c.reconnect.retries, 2);
    }
}
