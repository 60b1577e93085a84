//! What handlers receive, and how closures become handlers.
//!
//! A handler is a [`tower::Service`] that takes an [`Event`] (domain bus) or a [`Message`]
//! (simple bus) and returns `Result<(), HandleError>`. Wrap a closure with [`handler_fn`].
//! Layers ([`crate::middleware`]) wrap one attempt each; retry and dead letter belong to the
//! keyed pool.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::Service;

use crate::envelope::Envelope;
use crate::error::HandleError;
use crate::message::{Message, Position};
use crate::topic::Topic;

/// A domain event as a handler sees it: the envelope and where it stands in delivery.
///
/// Derefs to [`Envelope`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// The decoded envelope (shared between attempts).
    pub envelope: Arc<Envelope>,
    /// The topic it was read from.
    pub topic: Topic,
    /// The attempt of this delivery by the pool, from 1.
    pub attempt: u32,
    /// How many times the broker delivered the message, from 1.
    pub delivery_count: u32,
    /// The message's place in the broker.
    pub position: Position,
    /// The ownership epoch of the message's partition in a consumer group (0 without
    /// groups). It grows with every change of owner: a handler that writes elsewhere can
    /// make its writes conditional on it to fence off a paused former owner.
    pub epoch: u64,
    /// Per-attempt data from the handler layers to the handler (a span, a timer), keyed
    /// by type; empty at the start of every attempt.
    pub extensions: crate::pipeline::Extensions,
}

impl Event {
    /// A new event (for tests of handlers and for backends' own tools).
    pub fn new(envelope: Arc<Envelope>, topic: Topic, position: Position) -> Self {
        Self {
            envelope,
            topic,
            attempt: 1,
            delivery_count: 1,
            position,
            epoch: 0,
            extensions: crate::pipeline::Extensions::new(),
        }
    }

    /// Same event, other attempt numbers.
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32, delivery_count: u32) -> Self {
        self.attempt = attempt;
        self.delivery_count = delivery_count;
        self
    }
}

impl Deref for Event {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

/// A boxed, cloneable domain handler, as the pool runs it.
pub type BoxEventHandler = tower::util::BoxCloneSyncService<Event, (), HandleError>;
/// A boxed, cloneable simple handler.
pub type BoxMessageHandler = tower::util::BoxCloneSyncService<Message, (), HandleError>;
/// A boxed, cloneable request handler: returns the reply payload.
pub type BoxRequestHandler = tower::util::BoxCloneSyncService<Message, bytes::Bytes, HandleError>;

/// A handler made from a closure `Fn(Req) -> impl Future<Output = Result<Resp, HandleError>>`.
#[derive(Clone, Copy, Debug)]
pub struct HandlerFn<F> {
    f: F,
}

/// Turns a closure into a handler.
///
/// ```
/// use dualbus_core::{handler_fn, Event, HandleError};
/// let handler = handler_fn(|event: Event| async move {
///     println!("{} v{}", event.aggregate_id, event.event_version);
///     Ok::<_, HandleError>(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn { f }
}

impl<F, Fut, Req, Resp> Service<Req> for HandlerFn<F>
where
    F: Fn(Req) -> Fut,
    Fut: Future<Output = Result<Resp, HandleError>>,
{
    type Response = Resp;
    type Error = HandleError;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Fut {
        (self.f)(req)
    }
}

/// Calls a cloneable service once (clone, ready, call): the pool's way to run one attempt.
pub(crate) fn call_once<S, Req>(
    service: &S,
    req: Req,
) -> BoxFuture<'static, Result<S::Response, S::Error>>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    Req: Send + 'static,
{
    use tower::ServiceExt as _;
    Box::pin(service.clone().oneshot(req))
}
