//! Guarded handler calls: readiness, the call and the returned future of a handler service,
//! each with its panics caught, written once for both buses and the catch-panic layer.
//!
//! A panic in any of the three is a failed call ([`HandleError`] with the given
//! [`Disposition`]), never an unwinding task. After a panic in `poll_ready` the service is
//! replaced by a fresh clone of the one the guard was made from (its state may be broken).

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt as _;
use futures::future::CatchUnwind;
use tower::{Service, ServiceExt as _};

use crate::error::{Disposition, HandleError};
use crate::middleware::panicked;

/// A handler service and the fresh copy that replaces it after a panic in `poll_ready` (or
/// when a caller gives up waiting for readiness, see [`Guarded::ready_now`]).
pub(crate) struct Guarded<S, R> {
    fresh: S,
    current: S,
    _request: PhantomData<fn(R)>,
}

impl<S, R> Guarded<S, R>
where
    S: Service<R, Error = HandleError> + Clone,
{
    /// Guards `service`; its clones replace it when needed.
    pub(crate) fn new(service: S) -> Self {
        Self {
            current: service.clone(),
            fresh: service,
            _request: PhantomData,
        }
    }

    /// Waits until the service is ready; an error or a panic is a failed call.
    pub(crate) async fn ready(&mut self) -> Result<(), HandleError> {
        let outcome = AssertUnwindSafe(self.current.ready())
            .catch_unwind()
            .await
            .map(|r| r.map(drop));
        self.settle_ready(outcome)
    }

    /// Readiness if the service is ready at once; `None` if it is not. A service left
    /// waiting for readiness (a concurrency limit's permit, say) is replaced by a fresh
    /// clone, so that the caller does not sit on capacity it will not use.
    pub(crate) fn ready_now(&mut self) -> Option<Result<(), HandleError>> {
        let outcome = AssertUnwindSafe(self.current.ready())
            .catch_unwind()
            .now_or_never()
            .map(|o| o.map(|r| r.map(drop)));
        match outcome {
            Some(outcome) => Some(self.settle_ready(outcome)),
            None => {
                self.current = self.fresh.clone();
                None
            }
        }
    }

    /// Calls the service, which must have been ready. Panics become failed calls.
    pub(crate) fn call(&mut self, request: R) -> Call<S::Future> {
        call(&mut self.current, request, Disposition::Permanent)
    }

    /// Waits for readiness and calls: the whole guarded call. A failed readiness is a
    /// failed call.
    pub(crate) async fn ready_and_call(&mut self, request: R) -> Call<S::Future> {
        match self.ready().await {
            Ok(()) => self.call(request),
            Err(e) => Call::failed(e),
        }
    }

    fn settle_ready(
        &mut self,
        outcome: std::thread::Result<Result<(), HandleError>>,
    ) -> Result<(), HandleError> {
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(p) => {
                self.current = self.fresh.clone();
                Err(panicked(&*p, Disposition::Permanent))
            }
        }
    }
}

/// Calls a ready `service` with `request`: a panic in `call` or in the returned future is a
/// failed call with `disposition`.
pub(crate) fn call<S, R>(service: &mut S, request: R, disposition: Disposition) -> Call<S::Future>
where
    S: Service<R, Error = HandleError>,
{
    match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(request))) {
        Ok(fut) => Call {
            state: CallState::Running {
                fut: AssertUnwindSafe(fut).catch_unwind(),
                disposition,
            },
        },
        Err(p) => Call::failed(panicked(&*p, disposition)),
    }
}

pin_project_lite::pin_project! {
    /// The future of a guarded call: the service's future with its panic caught, or the
    /// failure of a call that could not start.
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct Call<F> {
        #[pin]
        state: CallState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = CallProj]
    enum CallState<F> {
        Running {
            #[pin]
            fut: CatchUnwind<AssertUnwindSafe<F>>,
            disposition: Disposition,
        },
        Failed {
            error: Option<HandleError>,
        },
    }
}

impl<F> Call<F> {
    /// A call that failed before it started.
    pub(crate) fn failed(error: HandleError) -> Self {
        Self {
            state: CallState::Failed { error: Some(error) },
        }
    }
}

impl<F, T> Future for Call<F>
where
    F: Future<Output = Result<T, HandleError>>,
{
    type Output = Result<T, HandleError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            CallProj::Running { fut, disposition } => match fut.poll(cx) {
                Poll::Ready(Ok(result)) => Poll::Ready(result),
                Poll::Ready(Err(p)) => Poll::Ready(Err(panicked(&*p, *disposition))),
                Poll::Pending => Poll::Pending,
            },
            CallProj::Failed { error } => Poll::Ready(Err(error.take().unwrap_or_else(|| {
                HandleError::permanent(crate::error::Failure(
                    "a failed handler call was polled after it completed".to_owned(),
                ))
            }))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Clone)]
    struct Flaky {
        readies: Arc<AtomicU32>,
        panic_ready_once: Arc<AtomicU32>,
    }

    impl Service<u32> for Flaky {
        type Response = ();
        type Error = HandleError;
        type Future = futures::future::BoxFuture<'static, Result<(), HandleError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
            self.readies.fetch_add(1, Ordering::SeqCst);
            if self.panic_ready_once.fetch_sub(1, Ordering::SeqCst) == 1 {
                panic!("ready broke");
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, n: u32) -> Self::Future {
            match n {
                0 => panic!("call broke"),
                1 => Box::pin(async { panic!("future broke") }),
                2 => Box::pin(async { Err(HandleError::retryable(Failure("no".into()))) }),
                _ => Box::pin(async { Ok(()) }),
            }
        }
    }

    fn flaky(panics: u32) -> Guarded<Flaky, u32> {
        Guarded::new(Flaky {
            readies: Arc::new(AtomicU32::new(0)),
            panic_ready_once: Arc::new(AtomicU32::new(panics)),
        })
    }

    #[tokio::test]
    async fn panics_in_each_step_are_failed_calls() {
        let mut g = flaky(0);
        for (n, want) in [
            (0, Some("call broke")),
            (1, Some("future broke")),
            (2, None),
            (3, None),
        ] {
            g.ready().await.unwrap();
            let result = g.call(n).await;
            match want {
                Some(text) => {
                    let e = result.unwrap_err();
                    assert!(e.to_string().contains(text), "{e}");
                    assert!(!e.is_retryable(), "panics are permanent");
                }
                None if n == 2 => assert!(result.unwrap_err().is_retryable()),
                None => result.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn a_panic_in_ready_is_a_failure_and_the_service_is_replaced() {
        let mut g = flaky(1);
        let e = g.ready().await.unwrap_err();
        assert!(e.to_string().contains("ready broke"), "{e}");
        assert!(!e.is_retryable());
        // The replacement is ready (the shared counter says the panic was used up).
        g.ready().await.unwrap();
        g.call(3).await.unwrap();
        assert_eq!(g.ready_now().map(|r| r.is_ok()), Some(true));
    }

    #[tokio::test]
    async fn retryable_disposition_is_kept() {
        let mut svc = flaky(0).current;
        let e = call(&mut svc, 0, Disposition::Retryable).await.unwrap_err();
        assert!(e.is_retryable());
        let e = call(&mut svc, 1, Disposition::Retryable).await.unwrap_err();
        assert!(e.is_retryable());
    }
}
