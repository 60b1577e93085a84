use std::collections::HashMap;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt as _};

use crate::error::{Error, Result};
use crate::message::Receipt;
use crate::pipeline::{PublishBody, PublishKind, PublishRequest, PublishResponse};
use crate::retry::Backoff;

/// Retries writes of the publish pipeline that failed with a retryable error
/// ([`Error::is_retryable`]), with exponential backoff and jitter, up to a number of
/// attempts. Permanent errors (bad input, closed bus, a conflict) return at once.
///
/// Only kinds that are safe to repeat are retried ([`PublishKind::retry_safe`]):
///
/// | write | retried | why it is safe, or not |
/// |---|---|---|
/// | event | yes | the repeat carries the same event id: backends with [`dedup`](crate::DomainCapabilities::dedup) drop it, elsewhere consumers see a redelivery |
/// | batch | the failed aggregates | each aggregate with a retryable failure is republished from its first failure on, in order, as one smaller batch; its later events that the first try stored are copies (dropped by dedup, redelivered elsewhere); an aggregate with a permanent failure is left as it is |
/// | append | yes | a repeat that finds its own event id as the aggregate's last event returns that receipt, marked duplicate, instead of a conflict |
/// | dead letter | no | it carries an id, but the pool retries it itself, with the aggregate parked, until it is stored or refused |
/// | simple message, request, reply | no | no id: a repeat could deliver twice on an at-most-once bus, and a request may have been acted upon |
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

impl<S> Service<PublishRequest> for PublishRetry<S>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = PublishResponse;
    type Error = Error;
    type Future = BoxFuture<'static, Result<PublishResponse>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        if !req.kind().retry_safe() {
            return Box::pin(self.inner.call(req));
        }
        // Take the service that was driven to readiness; keep a clone for later attempts.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let backoff = self.backoff.clone();
        Box::pin(async move {
            let batch = req.kind() == PublishKind::Batch;
            let mut attempt = 1;
            let mut result = inner.call(req.clone()).await;
            loop {
                match result {
                    Err(e) if e.is_retryable() && attempt < backoff.attempts => {
                        tokio::time::sleep(backoff.delay(attempt)).await;
                        attempt += 1;
                        result = inner.ready().await?.call(req.clone()).await;
                    }
                    Ok(PublishResponse::Batch(results)) if batch => {
                        return Ok(PublishResponse::Batch(
                            retry_batch(&mut inner, &backoff, attempt, &req, results).await,
                        ));
                    }
                    other => return other,
                }
            }
        })
    }
}

/// Republishes, while attempts remain, each aggregate of a batch with a retryable failure
/// from its first failure on; the new results replace the old ones. A retry that fails as
/// a whole leaves the results it would have replaced.
async fn retry_batch<S>(
    inner: &mut S,
    backoff: &Backoff,
    mut attempt: u32,
    req: &PublishRequest,
    mut results: Vec<Result<Receipt>>,
) -> Vec<Result<Receipt>>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error>,
{
    let PublishBody::Batch(envelopes) = &req.body else {
        return results;
    };
    while attempt < backoff.attempts {
        let again = to_republish(envelopes, &results);
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt += 1;
        let retry = PublishRequest::new(
            req.topic.clone(),
            req.backend,
            PublishBody::Batch(again.iter().map(|&i| envelopes[i].clone()).collect()),
        )
        .with_extensions(req.extensions.clone());
        let response = match inner.ready().await {
            Ok(ready) => ready.call(retry).await,
            Err(e) => Err(e),
        };
        match response.and_then(|r| r.into_batch(again.len())) {
            Ok(retried) => {
                for (i, r) in again.into_iter().zip(retried) {
                    results[i] = r;
                }
            }
            Err(e) if e.is_retryable() => {}
            Err(_) => break,
        }
    }
    results
}

/// The indices to republish: for each aggregate whose failures are all retryable, every
/// event from its first failure on.
fn to_republish(envelopes: &[crate::Envelope], results: &[Result<Receipt>]) -> Vec<usize> {
    // Aggregate -> (its first failure, whether all its failures are retryable).
    let mut failed: HashMap<&str, (usize, bool)> = HashMap::new();
    for (i, (e, r)) in envelopes.iter().zip(results).enumerate() {
        if let Err(error) = r {
            let entry = failed.entry(e.aggregate_id.as_str()).or_insert((i, true));
            entry.1 &= error.is_retryable();
        }
    }
    envelopes
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            failed
                .get(e.aggregate_id.as_str())
                .is_some_and(|&(from, retryable)| retryable && *i >= from)
        })
        .map(|(i, _)| i)
        .collect()
}
