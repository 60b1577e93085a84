//! Layers that wrap one handler attempt or one publish.
//!
//! Each layer has the shape of a [`tower::Layer`] with a matching [`tower::Service`]
//! wrapper. Layers return classified errors ([`crate::HandleError`] for handlers,
//! [`crate::Error`] for publishes) and never loop over consumption: retry and dead letter
//! belong to the keyed pool. The publish side has its own [`PublishRetryLayer`] for
//! retryable publish errors.

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
pub(crate) use hook::{finish_publish, publish_scopes};
pub use retry::{PublishRetry, PublishRetryLayer};
pub use timeout::{FromTimeout, Timeout, TimeoutLayer};
