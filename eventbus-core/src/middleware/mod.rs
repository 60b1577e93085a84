//! Layers that wrap one handler attempt or one write of the publish pipeline.
//!
//! Each layer has the shape of a [`tower::Layer`] with a matching [`tower::Service`]
//! wrapper. Handler layers take an [`Event`](crate::Event) or a [`Message`](crate::Message)
//! and return classified errors ([`crate::HandleError`]); publish layers take a
//! [`PublishRequest`](crate::pipeline::PublishRequest) (see [`crate::pipeline`]) and return
//! [`crate::Error`]s. Handler layers never loop over consumption: retry and dead letter
//! belong to the keyed pool. The publish side has its own [`PublishRetryLayer`] for
//! retryable write errors, on the kinds of write where a repeat is safe.

mod catch_panic;
mod hook;
mod retry;
mod timeout;

pub(crate) use catch_panic::panicked;
pub use catch_panic::{CatchPanic, CatchPanicLayer};
pub use hook::{
    BusKind, HandleInfo, HandleScope, Hook, HookLayer, HookService, HookedRequest, PublishInfo,
    PublishScope,
};
pub use retry::{PublishRetry, PublishRetryLayer};
pub use timeout::{FromTimeout, Timeout, TimeoutLayer};
