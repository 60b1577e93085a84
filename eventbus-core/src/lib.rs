//! # dualbus-core
//!
//! The stable heart of [dualbus](https://crates.io/crates/dualbus): the envelope and its
//! codecs, the small transport traits every backend implements, the two buses written once
//! on top of them (the domain-event bus with its keyed worker pool, and the simple-message
//! bus), middleware layers, typed errors, and the backend conformance suite.
//!
//! **Backend authors depend on `dualbus-core`; applications depend on `dualbus`**, the facade
//! that re-exports this crate and wires backends from cargo features and configuration.
//!
//! ## Quick start
//!
//! ```
//! # #[cfg(feature = "conformance")] {}
//! use dualbus_core::{Envelope, Codec, HeaderStyle};
//!
//! let event = Envelope::new("order-1", "OrderCreated", 1, r#"{"total":42}"#)?
//!     .with_content_type("application/json");
//! let wire = Codec::CloudEvents.encode(&event, HeaderStyle::HyphenPercentEncoded, "orders-service")?;
//! assert_eq!(wire.headers.get("ce-subject"), Some("order-1"));
//! # Ok::<(), dualbus_core::Error>(())
//! ```
//!
//! ## Pieces
//!
//! - [`Envelope`], validated on publish and on receive; [`Codec`]: CloudEvents binary mode
//!   (default) and jxt JSON mode, detected per message.
//! - [`DomainTransport`] and [`SimpleTransport`]: what a backend implements (bytes, headers,
//!   acks, capabilities). Nothing else. What crosses them is checked once, here: a
//!   [`Topic`], an [`OutboundMessage`] or a [`SimpleOutbound`] can only be made valid.
//! - [`DomainBus`]: publish envelopes; subscribe with a keyed pool (order per aggregate,
//!   retry in place, dead letter, ack after success). [`SimpleBus`]: raw payloads, concurrent
//!   handlers, queue groups, request-reply.
//! - [`pipeline`]: every write of both buses (events, batches, appends, dead letters,
//!   simple publishes, requests and replies) as one request type through one layered
//!   service. [`middleware`]: timeout, panic catching, hooks (trace context and metrics),
//!   publish retry.
//! - `conformance` (feature): the suite every backend runs.
//!
//! ## Features
//!
//! | feature | what |
//! |---|---|
//! | `conformance` | the backend conformance suite and the order checker (semver-exempt) |
//!
//! ## MSRV
//!
//! Rust 1.89. Raising it is a minor-version change, announced in the changelog.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codec;
pub mod config;
mod domain;
mod envelope;
mod error;
pub mod group;
mod guard;
mod handler;
mod headers;
mod message;
pub mod middleware;
pub mod offsets;
pub mod partition;
pub mod pipeline;
pub mod pool;
pub mod retry;
mod simple;
mod topic;
mod transport;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use codec::{Codec, DecodeError, HeaderStyle};
pub use domain::{
    DEFAULT_SOURCE, DomainBus, DomainBusBuilder, DomainSubscribeBuilder, Subscription,
    SubscriptionHandle,
};
pub use envelope::{Envelope, EnvelopeError, MAX_AGGREGATE_ID_LEN, MAX_ID_LEN};
pub use error::{BoxError, Disposition, Error, ErrorKind, Failure, HandleError, Result};
pub use handler::{
    BoxEventHandler, BoxMessageHandler, BoxRequestHandler, Event, HandlerFn, handler_fn,
};
pub use headers::{
    HeaderName, Headers, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, header_name, validate_header,
};
pub use message::{
    EncodedMessage, InboundMessage, Message, OutboundMessage, Position, Receipt, SimpleOutbound,
};
pub use pipeline::{
    BoxPublishService, Extensions, HandlerContext, HandlerLayer, PublishBody, PublishKind,
    PublishLayer, PublishRequest, PublishResponse,
};
pub use pool::{
    DeadLetterKind, DeadLetterPolicy, KeyQueues, PartitionState, PoolConfig, PoolEvent,
    PoolObserver, PoolStats, ShutdownReport,
};
pub use retry::Backoff;
pub use simple::{
    SimpleBus, SimpleBusBuilder, SimpleStats, SimpleSubscribeBuilder, SimpleSubscription,
};
pub use topic::{
    DEFAULT_DEAD_LETTER_SUFFIX, IntoTopic, MAX_TOPIC_LEN, Topic, dead_letter_topic,
    group_from_source, validate_group, validate_topic,
};
pub use transport::{
    Acker, Delivery, DomainCapabilities, DomainSubscription, DomainTransport, DynDomainTransport,
    DynSimpleTransport, GroupControl, GroupEvent, GroupMembership, PartitionControl, Reread,
    SimpleCapabilities, SimpleTransport, StartPosition, SubscriptionSpec, WireOverhead, Write,
    request_via_inbox,
};

/// Traits to import with `use dualbus_core::prelude::*`.
pub mod prelude {
    pub use crate::middleware::Hook;
    pub use crate::pool::PoolObserver;
    pub use crate::transport::{Acker, DomainTransport, PartitionControl, SimpleTransport};
}
