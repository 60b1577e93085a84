//! # dualbus-nats
//!
//! The NATS backend of [dualbus](https://crates.io/crates/dualbus), on `async-nats`.
//!
//! - [`Nats`]: the **simple-message bus on core NATS**: at-most-once fan-out, queue groups
//!   (load sharing), native request-reply with no-responders detection. Topics map to
//!   subjects one to one (`notifications.email` is the subject `notifications.email`);
//!   headers travel as NATS headers.
//! - [`JetStream`]: the **domain-event bus on NATS JetStream**: one stream per topic,
//!   acknowledged and deduplicated publishes (`Nats-Msg-Id` = event id), pipelined batches
//!   that keep each aggregate's order, appends checked against the aggregate's version
//!   (`Nats-Expected-Last-Subject-Sequence`), replay by aggregate, and durable pull
//!   consumers under the keyed pool with one active subscriber per group (a lease) and a
//!   rewind to the ack floor at every takeover and reconnect. See [`jetstream`].
//! - [`subject`] fixes the subject layout (`<topic>.<partition>.<encoded aggregate id>`),
//!   which services in other languages must share.
//!
//! ```no_run
//! # async fn run() -> dualbus_core::Result<()> {
//! use dualbus_core::{DomainBus, Envelope, SimpleBus};
//! use dualbus_nats::{JetStream, Nats, NatsConfig};
//!
//! let config = NatsConfig::new(["nats://127.0.0.1:4222"]);
//! let domain = DomainBus::builder(JetStream::connect(config.clone()).await?)
//!     .source("orders-service")
//!     .build()?;
//! domain
//!     .publish("orders", &Envelope::new("order-1", "OrderPlaced", 1, "{}")?)
//!     .await?;
//! let simple = SimpleBus::builder(Nats::connect(config).await?).build()?;
//! simple.publish("notifications", "hello").await?;
//! # Ok(()) }
//! ```
//!
//! Secrets (token, password, nkey seed) never appear in `Debug` output, errors or logs,
//! including credentials given as user information in a server URL
//! (`nats://user:password@host:4222`, `nats://token@host:4222`): they are taken out of the
//! URL and passed as connect options, and shown URLs are redacted ([`redact_url`]). See
//! [`NatsConfig::urls`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod headers;
pub mod jetstream;
mod simple;
pub mod subject;
mod unreadable;

/// The NATS client this crate is built on (the version whose types
/// [`JetStream::context`] and [`Nats::client`] return).
pub use async_nats;
pub use config::{Credentials, NatsConfig, Secret, redact_url, redact_urls};
pub use jetstream::{JetStream, JetStreamConfig};
pub use simple::Nats;

use dualbus_core::Error;

pub(crate) const BACKEND: &str = "nats";

pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        source: Box::new(e),
    }
}
