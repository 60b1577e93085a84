use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::{Error, HandleError};

/// Errors that can stand for "took too long".
pub trait FromTimeout {
    /// The error for an operation cut off after `after`.
    fn from_timeout(after: Duration) -> Self;
}

impl FromTimeout for HandleError {
    /// A *retryable* handler error: the next attempt may be faster.
    fn from_timeout(after: Duration) -> Self {
        Self::retryable(Error::Timeout {
            operation: "handler attempt",
            after,
        })
    }
}

impl FromTimeout for Error {
    fn from_timeout(after: Duration) -> Self {
        Self::Timeout {
            operation: "publish",
            after,
        }
    }
}

/// Cuts off one handler attempt or one publish after a fixed time.
///
/// A cut-off attempt counts as a retryable failure; the pool retries it with backoff.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
}

impl TimeoutLayer {
    /// Cut off after `after`.
    pub fn new(after: Duration) -> Self {
        Self { after }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            after: self.after,
        }
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Error: FromTimeout,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let after = self.after;
        Box::pin(async move {
            match tokio::time::timeout(after, fut).await {
                Ok(result) => result,
                Err(_) => Err(S::Error::from_timeout(after)),
            }
        })
    }
}
