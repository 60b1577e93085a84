//! # dualbus-redis
//!
//! The Redis backend of [dualbus](https://crates.io/crates/dualbus), on the `redis` crate
//! and its tokio connection manager (RESP3): the **domain-event bus** on Redis Streams and
//! the **simple-message bus** on Redis pub/sub.
//!
//! ## Domain bus ([`RedisStreams`])
//!
//! - A topic is one stream per partition (`dualbus:{orders:3}`), the partition the core
//!   hash of the aggregate id. Every publish is one script: `XADD`, then the aggregate's
//!   last entry in a hash, so that an append checked against the expected version is
//!   atomic. A batch is one pipeline.
//! - Consumer groups run on core's coordinator with the registry and leases of
//!   [`coordination`]. Every read, claim and acknowledgement checks the partition's lease
//!   token in a script; a new owner claims every pending entry of the partition before it
//!   reads new ones. Durable only when the server syncs its log on every write
//!   (`appendfsync always`): the transport reads that at connect.
//!
//! ## Simple bus ([`RedisPubSub`])
//!
//! - **Topics** are pub/sub channels of the same name, one channel per topic (no patterns).
//! - **Headers** and the reply topic travel in a versioned binary frame in front of the
//!   payload, because pub/sub carries one string per message and nothing else. The frame
//!   is documented byte by byte in [`frame`] and `docs/backends/redis.md`, for other
//!   languages. A message without the frame (a `PUBLISH` from another client) is
//!   delivered as it is, without headers.
//! - **At most once**, by Redis' design: a message reaches the subscriptions that exist
//!   when it is published. While a subscriber is disconnected, messages are lost for it;
//!   its subscriptions are restored by themselves when it reconnects.
//! - **Request-reply** through an inbox channel (`_inbox.<id>`) with a timeout.
//! - **Queue groups** are not offered: pub/sub has no way to give a message to one of
//!   several subscribers, and the bus refuses them rather than fake them.
//!
//! ```no_run
//! # async fn run() -> dualbus_core::Result<()> {
//! use dualbus_core::{DomainBus, Envelope, Message, SimpleBus};
//! use dualbus_redis::{RedisConfig, RedisPubSub, RedisStreams};
//!
//! let config = RedisConfig::new("redis://127.0.0.1:6379");
//! let domain = DomainBus::builder(RedisStreams::connect(config.clone()).await?)
//!     .source("orders-service")
//!     .build()?;
//! domain
//!     .publish("orders", &Envelope::new("order-1", "OrderPlaced", 1, "{}")?)
//!     .await?;
//! let simple = SimpleBus::builder(RedisPubSub::connect(config).await?).build()?;
//! simple.publish("notifications", "hello").await?;
//! # Ok(()) }
//! ```
//!
//! Secrets (the password, a password in the URL) never appear in `Debug` output or in
//! errors.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
pub mod coordination;
pub mod frame;
mod pubsub;
pub mod streams;

pub use config::{
    DEFAULT_MAX_MESSAGE_BYTES, Reconnect, RedisConfig, SERVER_MAX_BULK, StreamsSettings,
};
pub use dualbus_core::config::{Secret, redact_url, redact_urls};
pub use pubsub::RedisPubSub;
/// The `redis` crate this backend is built on (for what the bus does not cover).
pub use redis;
pub use streams::RedisStreams;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "redis";

/// Our error for an error of the `redis` crate: the connection (refused, dropped, timed
/// out) and the server's transient refusals (`LOADING`, `BUSY`, `TRYAGAIN`,
/// `MASTERDOWN`, `READONLY` after a failover) are [`dualbus_core::Error::Unavailable`] (retryable); the rest (a wrong
/// password, a command refused) are permanent backend errors.
pub(crate) fn redis_error(e: redis::RedisError) -> dualbus_core::Error {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY")
        );
    if transient {
        dualbus_core::Error::Unavailable {
            backend: BACKEND,
            source: Box::new(e),
        }
    } else {
        dualbus_core::Error::backend(BACKEND, false, e)
    }
}

/// One connection attempt, so that a wrong password or an unreachable server is an error
/// at once: the connection manager's own first connection repeats every failure
/// (`reconnect.retries` times, with backoff) before it reports one.
pub(crate) async fn probe(
    client: &redis::Client,
    config: &RedisConfig,
) -> dualbus_core::Result<()> {
    let c = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&c)
        .await
        .map(drop)
        .map_err(redis_error)
}
