//! # dualbus
//!
//! An event bus for Rust services, with **two buses behind one API**:
//!
//! - the **domain-event bus** (reliability first): events travel in an [`Envelope`], a broker
//!   persists them, and a keyed worker pool handles the events of one aggregate strictly in
//!   order while different aggregates run in parallel; at-least-once, acknowledged only after
//!   the handler succeeded or the event was dead-lettered after bounded retries;
//! - the **simple-message bus** (speed first): raw payloads, no persistence, concurrent
//!   handlers, queue groups and request-reply.
//!
//! ## Quick start
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dualbus::Result<()> {
//! use dualbus::{Buses, Envelope, Event, HandleError, Message, handler_fn};
//!
//! let buses = Buses::builder().source("orders-service").build()?; // in-memory by default
//!
//! let orders = buses
//!     .domain()
//!     .subscribe("orders")
//!     .start(handler_fn(|e: Event| async move {
//!         println!("{} v{} {}", e.aggregate_id, e.event_version, e.event_type);
//!         Ok::<_, HandleError>(())
//!     }))
//!     .await?;
//! buses.domain().publish("orders", &Envelope::new("order-1", "OrderCreated", 1, r#"{"total":42}"#)?).await?;
//!
//! let notes = buses
//!     .simple()
//!     .subscribe("notifications")
//!     .start(handler_fn(|m: Message| async move { Ok::<_, HandleError>(()) }))
//!     .await?;
//! buses.simple().publish("notifications", "order-1 created").await?;
//! # drop((orders, notes));
//! buses.close().await?;
//! # Ok(()) }
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! ```
//!
//! ## Backends
//!
#![cfg_attr(
    feature = "memory",
    doc = "- [`memory`]: in-process, both buses (the embedded default; not durable)."
)]
#![cfg_attr(
    not(feature = "memory"),
    doc = "- `memory` (feature off in this build): in-process, both buses."
)]
#![cfg_attr(
    feature = "nats",
    doc = "- [`nats`]: the domain bus on NATS JetStream and the simple bus on core NATS."
)]
#![cfg_attr(
    not(feature = "nats"),
    doc = "- `nats` (feature off in this build): the domain bus on NATS JetStream and the simple bus on core NATS."
)]
#![cfg_attr(
    feature = "kafka",
    doc = "- [`kafka`]: the domain bus on Kafka topics (consumer groups of the broker)."
)]
#![cfg_attr(
    not(feature = "kafka"),
    doc = "- `kafka` (feature off in this build): the domain bus on Kafka topics."
)]
#![cfg_attr(
    feature = "redis",
    doc = "- [`redis`]: the domain bus on Redis Streams and the simple bus on Redis pub/sub."
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "- `redis` (feature off in this build): the domain bus on Redis Streams and the simple bus on Redis pub/sub."
)]
//!
//! ## Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `memory` | yes | the in-process backend (`dualbus-memory`) |
//! | `config` | yes | [`Buses::from_config`] from YAML / TOML / `DUALBUS__` environment variables |
//! | `nats` | no | the NATS backend (`dualbus-nats`): domain bus on JetStream, simple bus on core NATS |
//! | `kafka` | no | the Kafka backend (`dualbus-kafka`, compiles librdkafka): domain bus on Kafka |
//! | `redis` | no | the Redis backend (`dualbus-redis`): domain bus on Streams, simple bus on pub/sub |
//! | `redis-tls` | no | `redis` with TLS (`rediss://`, rustls) |
//! | `otel` | no | OpenTelemetry (`dualbus-otel`): spans, W3C trace context in headers, metrics, OTLP over HTTP |
//! | `otel-grpc` | no | `otel` with OTLP over gRPC |
//! | `full` | no | everything |
//!
//! With no features at all the crate still builds: the core types and buses, with the
//! backend you bring (`Buses::builder().domain(..).simple(..)`).
//!
//! ## Guarantees
//!
//! See `docs/guarantees.md` in the repository: delivery, order, durability, and what happens
//! on handler error, crash and shutdown, per bus.
//!
//! ## MSRV
//!
//! Rust 1.89. Raising it is a minor-version change, announced in the changelog.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "config")]
mod backends;
mod buses;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;

pub use buses::{Buses, BusesBuilder};
#[cfg(feature = "config")]
pub use config::Config;

/// Layers around one handler attempt or one write of the publish pipeline.
pub use dualbus_core::middleware;
/// Every write of both buses as one request type through one layered service.
pub use dualbus_core::pipeline;
pub use dualbus_core::{
    Backoff, BoxError, BoxPublishService, Codec, DeadLetterKind, DeadLetterPolicy, Disposition,
    DomainBus, DomainBusBuilder, DomainCapabilities, DomainSubscribeBuilder, DomainTransport,
    Envelope, EnvelopeError, Error, ErrorKind, Event, Extensions, Failure, HandleError,
    HandlerLayer, HeaderStyle, Headers, IntoTopic, Message, PartitionState, PoolConfig, PoolEvent,
    PoolObserver, PoolStats, Position, PublishKind, PublishLayer, PublishRequest, PublishResponse,
    Receipt, Result, ShutdownReport, SimpleBus, SimpleBusBuilder, SimpleCapabilities, SimpleStats,
    SimpleSubscribeBuilder, SimpleSubscription, SimpleTransport, StartPosition, Subscription,
    Topic, handler_fn,
};

/// The in-process backend.
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use dualbus_memory as memory;

/// The NATS backend.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use dualbus_nats as nats;

/// The Kafka backend.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use dualbus_kafka as kafka;

/// The Redis backend.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use dualbus_redis as redis;

/// OpenTelemetry: tracing and metrics layers, SDK set-up.
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub use dualbus_otel as otel;

/// Traits to import with `use dualbus::prelude::*`.
pub mod prelude {
    pub use dualbus_core::prelude::*;
}
