use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::{Error, HandleError};
use crate::handler::Event;
use crate::headers::Headers;
use crate::message::{Message, Receipt};
use crate::pipeline::{PublishKind, PublishRequest, PublishResponse};

/// Which bus a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusKind {
    /// The domain-event bus.
    Domain,
    /// The simple-message bus.
    Simple,
}

/// What a hook learns about one message of a write (a batch calls the hook once per
/// message).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PublishInfo<'a> {
    /// The bus.
    pub bus: BusKind,
    /// Which write: an event, a batch, an append, a dead letter, a simple message, a
    /// request or a reply.
    pub kind: PublishKind,
    /// The backend's name.
    pub backend: &'static str,
    /// The topic.
    pub topic: &'a str,
    /// The aggregate id (domain bus).
    pub key: Option<&'a str>,
    /// The event type (domain events).
    pub event_type: Option<&'a str>,
    /// The message id: the event id, or a dead letter's deduplication id.
    pub id: Option<&'a str>,
    /// The payload's size in bytes, before encoding.
    pub payload_len: usize,
}

/// What a hook learns about one handler attempt.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct HandleInfo<'a> {
    /// The bus.
    pub bus: BusKind,
    /// The topic.
    pub topic: &'a str,
    /// The aggregate id (domain bus).
    pub key: Option<&'a str>,
    /// The event type (domain bus).
    pub event_type: Option<&'a str>,
    /// The attempt, from 1 (always 1 on the simple bus).
    pub attempt: u32,
}

/// The part of a publish a hook keeps open until the broker answered.
pub trait PublishScope: Send {
    /// The publish finished.
    fn finish(self: Box<Self>, result: Result<&Receipt, &Error>);
}

/// The part of a handler attempt a hook keeps open until the handler returned.
pub trait HandleScope: Send {
    /// Runs the attempt inside the scope (e.g. with a span as the current context).
    /// The default runs it unchanged.
    fn wrap(
        &self,
        attempt: BoxFuture<'static, Result<(), HandleError>>,
    ) -> BoxFuture<'static, Result<(), HandleError>> {
        attempt
    }
    /// The attempt finished.
    fn finish(self: Box<Self>, result: Result<(), &HandleError>);
}

/// Reads and writes headers around every write and every handler attempt, on both buses:
/// the seam for tracing (W3C `traceparent`) and metrics, run by a [`HookLayer`] in the
/// publish pipeline and in the handler stack like any other layer.
///
/// Both methods are called on the hot path: keep them cheap. Returning `None` means the hook
/// has nothing to finish.
pub trait Hook: Send + Sync + 'static {
    /// Before a write, once per message: may add headers (they are checked after the last
    /// layer, and count against the broker's size limit).
    fn on_publish(
        &self,
        info: &PublishInfo<'_>,
        headers: &mut Headers,
    ) -> Option<Box<dyn PublishScope>> {
        let _ = (info, headers);
        None
    }

    /// Before a handler attempt: may read headers (e.g. extract the parent trace).
    fn on_handle(&self, info: &HandleInfo<'_>, headers: &Headers) -> Option<Box<dyn HandleScope>> {
        let _ = (info, headers);
        None
    }
}

/// Requests a [`HookLayer`] can describe to hooks.
pub trait HookedRequest {
    /// The description of this attempt.
    fn info(&self) -> HandleInfo<'_>;
    /// The message headers.
    fn headers(&self) -> &Headers;
}

impl HookedRequest for Event {
    fn info(&self) -> HandleInfo<'_> {
        HandleInfo {
            bus: BusKind::Domain,
            topic: &self.topic,
            key: Some(&self.envelope.aggregate_id),
            event_type: Some(&self.envelope.event_type),
            attempt: self.attempt,
        }
    }
    fn headers(&self) -> &Headers {
        &self.envelope.headers
    }
}

impl HookedRequest for Message {
    fn info(&self) -> HandleInfo<'_> {
        HandleInfo {
            bus: BusKind::Simple,
            topic: &self.topic,
            key: None,
            event_type: None,
            attempt: 1,
        }
    }
    fn headers(&self) -> &Headers {
        &self.headers
    }
}

/// Runs a set of [`Hook`]s around each write of the publish pipeline (one `on_publish` per
/// message) and each handler attempt.
#[derive(Clone)]
pub struct HookLayer {
    hooks: Arc<[Arc<dyn Hook>]>,
}

impl HookLayer {
    /// A layer running `hooks` in order (the first is outermost).
    pub fn new(hooks: impl IntoIterator<Item = Arc<dyn Hook>>) -> Self {
        Self {
            hooks: hooks.into_iter().collect(),
        }
    }
}

impl fmt::Debug for HookLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookLayer")
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl<S> Layer<S> for HookLayer {
    type Service = HookService<S>;
    fn layer(&self, inner: S) -> HookService<S> {
        HookService {
            inner,
            hooks: self.hooks.clone(),
        }
    }
}

/// The service made by [`HookLayer`].
#[derive(Clone)]
pub struct HookService<S> {
    inner: S,
    hooks: Arc<[Arc<dyn Hook>]>,
}

impl<S: fmt::Debug> fmt::Debug for HookService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookService")
            .field("inner", &self.inner)
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl<S, Req> Service<Req> for HookService<S>
where
    S: Service<Req, Response = (), Error = HandleError>,
    S::Future: Send + 'static,
    Req: HookedRequest,
{
    type Response = ();
    type Error = HandleError;
    type Future = BoxFuture<'static, Result<(), HandleError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.hooks.is_empty() {
            return Box::pin(self.inner.call(req));
        }
        let scopes: Vec<Box<dyn HandleScope>> = {
            let info = req.info();
            let headers = req.headers();
            self.hooks
                .iter()
                .filter_map(|h| h.on_handle(&info, headers))
                .collect()
        };
        let mut fut: BoxFuture<'static, Result<(), HandleError>> = Box::pin(self.inner.call(req));
        for scope in scopes.iter().rev() {
            fut = scope.wrap(fut);
        }
        Box::pin(async move {
            let result = fut.await;
            for scope in scopes.into_iter().rev() {
                scope.finish(result.as_ref().map(|_| ()));
            }
            result
        })
    }
}

impl<S> Service<PublishRequest> for HookService<S>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = PublishResponse;
    type Error = Error;
    type Future = BoxFuture<'static, Result<PublishResponse, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: PublishRequest) -> Self::Future {
        if self.hooks.is_empty() {
            return Box::pin(self.inner.call(req));
        }
        let mut scopes: Vec<(usize, Box<dyn PublishScope>)> = Vec::new();
        let mut index = 0;
        let hooks = &self.hooks;
        req.for_each_message(|info, headers| {
            for hook in hooks.iter() {
                if let Some(scope) = hook.on_publish(&info, headers) {
                    scopes.push((index, scope));
                }
            }
            index += 1;
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            // Innermost first; each message's scope gets that message's result.
            for (i, scope) in scopes.into_iter().rev() {
                match &result {
                    Ok(response) => match response.result(i) {
                        Some(Ok(receipt)) => scope.finish(Ok(&receipt)),
                        Some(Err(e)) => scope.finish(Err(e)),
                        None => scope.finish(Err(&Error::backend(
                            "publish pipeline",
                            false,
                            crate::error::Failure(format!(
                                "no result for message {i} of the write"
                            )),
                        ))),
                    },
                    Err(e) => scope.finish(Err(e)),
                }
            }
            result
        })
    }
}
