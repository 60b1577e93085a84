use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::Error;
use crate::retry::Backoff;

/// Retries a publish that failed with a retryable error ([`Error::is_retryable`]), with
/// exponential backoff and jitter, up to a number of attempts. Permanent errors (bad input,
/// closed bus) return at once.
///
/// Domain transports deduplicate by event id where they can ([`crate::DomainCapabilities::dedup`]);
/// elsewhere a retried publish whose first try did reach the broker is stored twice, which
/// consumers see as a redelivery.
#[derive(Debug, Clone)]
pub struct PublishRetryLayer {
    backoff: Backoff,
}

impl PublishRetryLayer {
    /// Retry with this backoff (its `attempts` include the first try).
    pub fn new(backoff: Backoff) -> Self {
        Self { backoff }
    }
}

impl<S> Layer<S> for PublishRetryLayer {
    type Service = PublishRetry<S>;
    fn layer(&self, inner: S) -> PublishRetry<S> {
        PublishRetry {
            inner,
            backoff: self.backoff.clone(),
        }
    }
}

/// The service made by [`PublishRetryLayer`].
#[derive(Debug, Clone)]
pub struct PublishRetry<S> {
    inner: S,
    backoff: Backoff,
}

impl<S, Req> Service<Req> for PublishRetry<S>
where
    S: Service<Req, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<'static, Result<S::Response, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use tower::ServiceExt as _;
        // Take the service that was driven to readiness; keep a clone for later attempts.
        let clone = self.inner.clone();
        let mut first = std::mem::replace(&mut self.inner, clone);
        let backoff = self.backoff.clone();
        Box::pin(async move {
            let mut attempt = 1;
            let mut result = first.call(req.clone()).await;
            loop {
                match result {
                    Err(e) if e.is_retryable() && attempt < backoff.attempts => {
                        tokio::time::sleep(backoff.delay(attempt)).await;
                        attempt += 1;
                        result = first.ready().await?.call(req.clone()).await;
                    }
                    other => return other,
                }
            }
        })
    }
}
