use std::any::Any;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::{Disposition, Failure, HandleError};

/// Turns a panic inside a handler into a [`HandleError`], so that a panicking handler is a
/// failed attempt, not a dead worker.
///
/// The domain and simple buses already catch panics around every handler call (in
/// `poll_ready`, in `call` and in the returned future) as *permanent* failures: a bug does
/// not heal on retry, so the message goes to the dead letter at once. This layer is the
/// option that makes panics **retryable** ([`CatchPanicLayer::retryable`]), and the way to
/// catch panics in handler stacks used outside the buses ([`CatchPanicLayer::new`]: permanent,
/// as the buses do). It catches panics in `call` and in the future; the buses' guard also
/// covers `poll_ready`.
#[derive(Debug, Clone, Copy)]
pub struct CatchPanicLayer {
    disposition: Disposition,
}

impl Default for CatchPanicLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CatchPanicLayer {
    /// Panics become permanent errors.
    pub fn new() -> Self {
        Self {
            disposition: Disposition::Permanent,
        }
    }

    /// Panics become retryable errors.
    pub fn retryable() -> Self {
        Self {
            disposition: Disposition::Retryable,
        }
    }
}

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic {
            inner,
            disposition: self.disposition,
        }
    }
}

/// The service made by [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
    disposition: Disposition,
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl<S, Req, Resp> Service<Req> for CatchPanic<S>
where
    S: Service<Req, Response = Resp, Error = HandleError>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = HandleError;
    type Future = BoxFuture<'static, Result<Resp, HandleError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Box::pin(crate::guard::call(&mut self.inner, req, self.disposition))
    }
}

pub(crate) fn panicked(payload: &(dyn Any + Send), disposition: Disposition) -> HandleError {
    HandleError::retryable(Failure(format!(
        "handler panicked: {}",
        panic_message(payload)
    )))
    .with_disposition(disposition)
}
