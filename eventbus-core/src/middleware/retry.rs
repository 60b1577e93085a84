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
    // A response of another length is a defect of a layer inside this one: handed on as
    // it is, for the bus to report.
    if results.len() != envelopes.len() {
        return results;
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;
    use tower::ServiceExt as _;

    use super::*;
    use crate::envelope::Envelope;
    use crate::message::Position;
    use crate::pipeline::SimpleBody;
    use crate::topic::Topic;

    fn unavailable() -> Error {
        Error::Unavailable {
            backend: "test",
            source: "connection reset".into(),
        }
    }

    fn backoff() -> Backoff {
        Backoff::new(4, Duration::from_millis(1), Duration::from_millis(5))
    }

    fn event(aggregate: &str, version: u64) -> Envelope {
        Envelope::new(aggregate, "T", version, "{}").unwrap()
    }

    fn request(body: PublishBody) -> PublishRequest {
        PublishRequest::new(Topic::new("t").unwrap(), "test", body)
    }

    type Calls = Arc<Mutex<Vec<Vec<String>>>>;

    /// Answers with `answer(call number, request)`; records each request's events as
    /// `aggregate/version` (or the kind for other writes).
    fn inner<F>(
        answer: F,
    ) -> (
        impl Service<PublishRequest, Response = PublishResponse, Error = Error, Future = impl Send>
        + Clone
        + Send
        + 'static,
        Calls,
    )
    where
        F: Fn(usize, &PublishRequest) -> Result<PublishResponse> + Clone + Send + Sync + 'static,
    {
        let calls: Calls = Arc::default();
        let c = calls.clone();
        let svc = tower::service_fn(move |req: PublishRequest| {
            let seen = match &req.body {
                PublishBody::Batch(b) => b
                    .iter()
                    .map(|e| format!("{}/{}", e.aggregate_id, e.event_version))
                    .collect(),
                _ => vec![req.kind().to_string()],
            };
            let n = {
                let mut c = c.lock();
                c.push(seen);
                c.len()
            };
            let r = answer(n, &req);
            async move { r }
        });
        (svc, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn events_and_appends_are_retried_until_they_succeed() {
        let bodies = [
            PublishBody::Event(event("a", 1)),
            PublishBody::Append {
                envelope: event("a", 1),
                expected_version: 0,
            },
        ];
        for body in bodies {
            let (svc, calls) = inner(|n, _| {
                if n < 3 {
                    Err(unavailable())
                } else {
                    Ok(PublishResponse::Receipt(Receipt::accepted()))
                }
            });
            let r = PublishRetryLayer::new(backoff())
                .layer(svc)
                .oneshot(request(body))
                .await;
            assert!(matches!(r, Ok(PublishResponse::Receipt(_))));
            assert_eq!(calls.lock().len(), 3);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unsafe_kinds_pass_through_once() {
        let bodies = [
            PublishBody::Message(SimpleBody::new(Default::default(), "x")),
            PublishBody::Request {
                body: SimpleBody::new(Default::default(), "x"),
                timeout: Duration::from_secs(1),
            },
            PublishBody::Reply(SimpleBody::new(Default::default(), "x")),
        ];
        for body in bodies {
            let kind = request(body.clone()).kind();
            assert!(!kind.retry_safe());
            let (svc, calls) = inner(|_, _| Err(unavailable()));
            let e = PublishRetryLayer::new(backoff())
                .layer(svc)
                .oneshot(request(body))
                .await
                .expect_err("not retried");
            assert!(e.is_retryable());
            assert_eq!(calls.lock().len(), 1, "{kind}");
        }
        // A dead letter is safe to repeat but the pool's to retry: passed through too.
        let record = crate::message::EncodedMessage {
            key: "a".into(),
            headers: Default::default(),
            payload: "x".into(),
            id: Some("dlq:t:0:1".into()),
        };
        let body = PublishBody::DeadLetter(crate::pipeline::DeadLetter::new(
            record,
            Default::default(),
            crate::pool::DeadLetterKind::Permanent,
        ));
        let (svc, calls) = inner(|_, _| Err(unavailable()));
        PublishRetryLayer::new(backoff())
            .layer(svc)
            .oneshot(request(body))
            .await
            .expect_err("not retried");
        assert_eq!(calls.lock().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let (svc, calls) = inner(|_, _| Err(Error::Conflict("moved".into())));
        let e = PublishRetryLayer::new(backoff())
            .layer(svc)
            .oneshot(request(PublishBody::Event(event("a", 1))))
            .await
            .expect_err("a conflict");
        assert!(matches!(e, Error::Conflict(_)));
        assert_eq!(calls.lock().len(), 1);
    }

    /// `a` fails retryably at v2 (v3 stored anyway), `b` fails for good at v1, `c` is
    /// stored: only `a` is republished, from v2 on, and its new results replace the old.
    #[tokio::test(start_paused = true)]
    async fn a_batch_republishes_each_failed_aggregate_from_its_first_failure() {
        let batch = vec![
            event("a", 1),
            event("a", 2),
            event("b", 1),
            event("c", 1),
            event("a", 3),
            event("b", 2),
        ];
        let at = |o: u128| {
            Ok(Receipt::at(Position {
                partition: 0,
                offset: o,
            }))
        };
        let (svc, calls) = inner(move |n, req| {
            let PublishBody::Batch(b) = &req.body else {
                unreachable!("a batch")
            };
            Ok(PublishResponse::Batch(if n == 1 {
                vec![
                    at(1),
                    Err(unavailable()),
                    Err(Error::Conflict("refused".into())),
                    at(2),
                    at(3),
                    Err(unavailable()),
                ]
            } else if n == 2 {
                // The first retry fails again for v2 only.
                b.iter()
                    .map(|e| {
                        if e.event_version == 2 {
                            Err(unavailable())
                        } else {
                            at(10)
                        }
                    })
                    .collect()
            } else {
                (0..b.len()).map(|i| at(20 + i as u128)).collect()
            }))
        });
        let response = PublishRetryLayer::new(backoff())
            .layer(svc)
            .oneshot(request(PublishBody::Batch(batch)))
            .await
            .expect("a batch response");
        let PublishResponse::Batch(results) = response else {
            panic!("a batch")
        };
        let calls = calls.lock().clone();
        assert_eq!(
            calls,
            vec![
                vec!["a/1", "a/2", "b/1", "c/1", "a/3", "b/2"],
                vec!["a/2", "a/3"],
                vec!["a/2", "a/3"],
            ]
        );
        let offsets: Vec<Option<u128>> = results
            .iter()
            .map(|r| r.as_ref().ok().and_then(|r| r.position).map(|p| p.offset))
            .collect();
        assert_eq!(
            offsets,
            vec![Some(1), Some(20), None, Some(2), Some(21), None]
        );
        assert!(matches!(results[2], Err(Error::Conflict(_))));
        assert!(
            results[5].as_ref().is_err_and(Error::is_retryable),
            "b is left as it was"
        );
    }

    /// A layer inside that answers a batch with fewer results: handed on, not indexed.
    #[tokio::test(start_paused = true)]
    async fn a_short_batch_response_is_handed_on() {
        let (svc, calls) = inner(|_, _| Ok(PublishResponse::Batch(vec![Err(unavailable())])));
        let response = PublishRetryLayer::new(backoff())
            .layer(svc)
            .oneshot(request(PublishBody::Batch(vec![
                event("a", 1),
                event("a", 2),
            ])))
            .await
            .expect("a batch response");
        assert_eq!(calls.lock().len(), 1);
        assert_eq!(response.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_stops_when_attempts_run_out() {
        let (svc, calls) = inner(|_, req| {
            Ok(PublishResponse::Batch(
                (0..req.len()).map(|_| Err(unavailable())).collect(),
            ))
        });
        let response = PublishRetryLayer::new(backoff())
            .layer(svc)
            .oneshot(request(PublishBody::Batch(vec![
                event("a", 1),
                event("a", 2),
            ])))
            .await
            .expect("a batch response");
        assert_eq!(calls.lock().len(), 4, "four attempts in all");
        assert!(matches!(response, PublishResponse::Batch(r) if r.iter().all(Result::is_err)));
    }
}
