//! The simple-message bus: raw payloads, no persistence, handled concurrently.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::error::{Error, HandleError, Result};
use crate::guard::Guarded;
use crate::handler::{BoxMessageHandler, BoxRequestHandler};
use crate::message::Message;
use crate::middleware::{BusKind, Hook, HookLayer};
use crate::pipeline::simple::SimpleSink;
use crate::pipeline::{
    HandlerContext, HandlerLayer, Layers, Pipeline, PublishKind, PublishLayer, Stack,
};
use crate::topic::{IntoTopic, Topic, validate_group};
use crate::transport::{DynSimpleTransport, SimpleCapabilities, SimpleTransport};

/// Builds a [`SimpleBus`].
#[must_use]
pub struct SimpleBusBuilder {
    transport: DynSimpleTransport,
    layers: Layers<Message>,
    max_concurrency: usize,
}

impl fmt::Debug for SimpleBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleBusBuilder")
            .field("backend", &self.transport.capabilities().backend)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl SimpleBusBuilder {
    /// Defaults: 1,024 concurrent handlers per subscription.
    pub fn new(transport: impl SimpleTransport) -> Self {
        Self::from_dyn(Arc::new(transport))
    }

    /// Same, from a shared transport.
    pub fn from_dyn(transport: DynSimpleTransport) -> Self {
        Self {
            transport,
            layers: Layers::default(),
            max_concurrency: 1024,
        }
    }

    /// Adds a hook around every write (publishes, requests, replies) and every handler
    /// call: a [`HookLayer`] added as a publish layer and as a handler layer, in this
    /// place of their orders.
    pub fn hook(self, hook: Arc<dyn Hook>) -> Self {
        self.layer(HookLayer::new([hook]))
    }

    /// Adds a layer around each handler call (and each [`SimpleBus::serve`] handler, its
    /// reply included). The first layer added is outermost.
    pub fn handler_layer(mut self, layer: impl HandlerLayer<Message>) -> Self {
        self.layers.add_handler(layer);
        self
    }

    /// Adds a layer to the publish pipeline: around every publish, request and reply of
    /// this bus (see [`crate::pipeline`]). The first layer added is outermost.
    pub fn publish_layer(mut self, layer: impl PublishLayer) -> Self {
        self.layers.add_publish(layer);
        self
    }

    /// Adds `layer` both to the publish pipeline and around each handler call.
    pub fn layer<L: PublishLayer + HandlerLayer<Message>>(mut self, layer: L) -> Self {
        self.layers.add_both(layer);
        self
    }

    /// Handler calls running at once per subscription (default 1,024). When all are busy
    /// the subscription stops reading, and the backend's own buffering applies.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<SimpleBus> {
        if self.max_concurrency == 0 {
            return Err(Error::config(
                "simple.max_concurrency",
                "must be at least 1",
            ));
        }
        Ok(SimpleBus {
            inner: Arc::new(Inner {
                pipeline: Pipeline::new(SimpleSink::new(self.transport), &self.layers.publish),
                handler_layers: self.layers.handler,
                max_concurrency: self.max_concurrency,
                closed: AtomicBool::new(false),
                subscriptions: Mutex::new(Vec::new()),
            }),
        })
    }
}

struct Inner {
    pipeline: Pipeline<SimpleSink>,
    handler_layers: Stack<dyn HandlerLayer<Message>>,
    max_concurrency: usize,
    closed: AtomicBool,
    subscriptions: Mutex<Vec<std::sync::Weak<SubInner>>>,
}

/// The simple-message bus: at-most-once fan-out of raw payloads. Cheap to clone.
#[derive(Clone)]
pub struct SimpleBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimpleBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleBus")
            .field("backend", &self.capabilities().backend)
            .finish_non_exhaustive()
    }
}

impl SimpleBus {
    /// A builder over `transport`.
    pub fn builder(transport: impl SimpleTransport) -> SimpleBusBuilder {
        SimpleBusBuilder::new(transport)
    }

    /// What the backend offers.
    pub fn capabilities(&self) -> &SimpleCapabilities {
        self.inner.pipeline.sink.caps()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("simple bus"))
        } else {
            Ok(())
        }
    }

    /// Publishes `payload` to `topic` without headers.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<()> {
        self.publish_message(Message::new(topic, payload)).await
    }

    /// Publishes a message with headers, through the publish pipeline (its
    /// [`extensions`](Message::extensions) become the request's). Errors:
    /// [`Error::InvalidTopic`], [`Error::InvalidHeader`], [`Error::PayloadTooLarge`] and
    /// [`Error::Closed`] before anything is sent; the backend's errors after.
    pub async fn publish_message(&self, message: Message) -> Result<()> {
        self.check_open()?;
        self.inner
            .pipeline
            .publish(message, PublishKind::Message)
            .await
    }

    /// Sends a request and waits up to `timeout` for the reply.
    pub async fn request(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message> {
        self.check_open()?;
        self.inner
            .pipeline
            .request(Message::new(topic, payload), timeout)
            .await
    }

    /// Subscribes to `topic`; see [`SimpleSubscribeBuilder`]. An invalid topic is reported
    /// by [`SimpleSubscribeBuilder::start`].
    pub fn subscribe(&self, topic: impl IntoTopic) -> SimpleSubscribeBuilder {
        SimpleSubscribeBuilder {
            bus: self.clone(),
            topic: topic.into_topic(),
            queue: None,
            max_concurrency: self.inner.max_concurrency,
        }
    }

    fn check_request_reply(&self) -> Result<()> {
        let caps = self.capabilities();
        if caps.request_reply {
            Ok(())
        } else {
            Err(Error::NotSupported {
                operation: "request-reply",
                backend: caps.backend,
            })
        }
    }

    /// Answers requests on `topic` with `handler`'s reply payload. Members of one queue
    /// group share the requests.
    pub async fn serve<H>(
        &self,
        topic: impl IntoTopic,
        queue_group: Option<&str>,
        handler: H,
    ) -> Result<SimpleSubscription>
    where
        H: Service<Message, Response = Bytes, Error = HandleError> + Clone + Send + Sync + 'static,
        H::Future: Send + 'static,
    {
        self.check_request_reply()?;
        let handler = BoxRequestHandler::new(handler);
        let bus = self.clone();
        let reply = tower::service_fn(move |request: Message| {
            let handler = handler.clone();
            let bus = bus.clone();
            async move {
                let reply_to = request.reply_to.clone();
                // What the handler layers left for this call goes on with the reply.
                let extensions = request.extensions.clone();
                let payload = crate::handler::call_once(&handler, request).await?;
                let Some(to) = reply_to else {
                    return Ok(());
                };
                let mut reply = Message::new(to, payload);
                reply.extensions = extensions;
                bus.inner
                    .pipeline
                    .publish(reply, PublishKind::Reply)
                    .await
                    .map_err(|e| {
                        if e.is_retryable() {
                            HandleError::retryable(e)
                        } else {
                            HandleError::permanent(e)
                        }
                    })
            }
        });
        let mut b = self.subscribe(topic);
        if let Some(q) = queue_group {
            b = b.queue_group(q);
        }
        b.start(reply).await
    }

    /// Stops every subscription (in-flight handlers finish within `drain`) and closes the
    /// transport. Idempotent and safe to call concurrently.
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let subs: Vec<Arc<SubInner>> = self
            .inner
            .subscriptions
            .lock()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for s in subs {
            s.stop(Duration::from_secs(10)).await;
        }
        self.inner.pipeline.sink.transport().close().await
    }

    /// Whether [`SimpleBus::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

/// Options of one simple subscription.
#[must_use]
pub struct SimpleSubscribeBuilder {
    bus: SimpleBus,
    topic: Result<Topic>,
    queue: Option<String>,
    max_concurrency: usize,
}

impl fmt::Debug for SimpleSubscribeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleSubscribeBuilder")
            .field("topic", &self.topic)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl SimpleSubscribeBuilder {
    /// Join a queue group: each message goes to one member of the group. The name follows
    /// the rule of topic names ([`validate_group`](crate::validate_group)); another is
    /// refused by [`start`](Self::start) with [`Error::Config`] naming `queue_group`.
    pub fn queue_group(mut self, group: impl Into<String>) -> Self {
        self.queue = Some(group.into());
        self
    }

    /// Handler calls running at once for this subscription.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Subscribes and starts handling. A handler error or panic is counted and logged; the
    /// message is not redelivered (at-most-once).
    pub async fn start<H>(self, handler: H) -> Result<SimpleSubscription>
    where
        H: Service<Message, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
        H::Future: Send + 'static,
    {
        let bus = self.bus;
        bus.check_open()?;
        let topic = self.topic?;
        if self.max_concurrency == 0 {
            return Err(Error::config("max_concurrency", "must be at least 1"));
        }
        if let Some(q) = &self.queue {
            if !bus.capabilities().queue_groups {
                return Err(Error::NotSupported {
                    operation: "queue groups",
                    backend: bus.capabilities().backend,
                });
            }
            validate_group("queue_group", q)?;
        }
        let cx = HandlerContext {
            bus: BusKind::Simple,
            backend: bus.capabilities().backend,
            topic: &topic,
            group: self.queue.as_deref(),
            max_attempts: 1,
            subscription: None,
        };
        let svc = bus
            .inner
            .handler_layers
            .apply(BoxMessageHandler::new(handler), |layer, inner| {
                layer.layer_handler_in(inner, &cx)
            });
        let stream = bus
            .inner
            .pipeline
            .sink
            .transport()
            .subscribe(&topic, self.queue.as_deref())
            .await?;
        let inner = Arc::new(SubInner {
            stop: CancellationToken::new(),
            stats: SubCounters::default(),
            task: Mutex::new(None),
            topic,
        });
        let task = tokio::spawn(run_simple(inner.clone(), stream, svc, self.max_concurrency));
        *inner.task.lock() = Some(task);
        {
            let mut subs = bus.inner.subscriptions.lock();
            subs.retain(|w| w.strong_count() > 0);
            subs.push(Arc::downgrade(&inner));
        }
        Ok(SimpleSubscription { inner })
    }
}

#[derive(Default)]
struct SubCounters {
    received: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
}

struct SubInner {
    stop: CancellationToken,
    stats: SubCounters,
    task: Mutex<Option<JoinHandle<()>>>,
    topic: Topic,
}

impl SubInner {
    async fn stop(&self, deadline: Duration) {
        self.stop.cancel();
        let task = self.task.lock().take();
        if let Some(mut task) = task
            && tokio::time::timeout(deadline, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

/// Counters of a simple subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimpleStats {
    /// Messages received.
    pub received: u64,
    /// Handler calls that succeeded.
    pub handled: u64,
    /// Handler calls that failed or panicked (not redelivered).
    pub failed: u64,
}

/// A running simple subscription. Dropping it unsubscribes at once.
pub struct SimpleSubscription {
    inner: Arc<SubInner>,
}

impl fmt::Debug for SimpleSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleSubscription")
            .field("topic", &self.inner.topic)
            .field("stats", &self.stats())
            .finish()
    }
}

impl SimpleSubscription {
    /// Counters now.
    pub fn stats(&self) -> SimpleStats {
        let s = &self.inner.stats;
        SimpleStats {
            received: s.received.load(Ordering::Relaxed),
            handled: s.handled.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
        }
    }

    /// Unsubscribes and lets running handlers finish within `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> SimpleStats {
        self.inner.stop(deadline).await;
        self.stats()
    }
}

impl Drop for SimpleSubscription {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Some(t) = self.inner.task.lock().take() {
            t.abort();
        }
    }
}

async fn run_simple(
    inner: Arc<SubInner>,
    mut stream: futures::stream::BoxStream<'static, Message>,
    handler: BoxMessageHandler,
    max_concurrency: usize,
) {
    use futures::FutureExt as _;
    type Call = crate::guard::Call<<BoxMessageHandler as tower::Service<Message>>::Future>;
    let mut handler = Guarded::new(handler);
    let mut running: FuturesUnordered<Call> = FuturesUnordered::new();
    let record = |r: Result<(), HandleError>| match r {
        Ok(()) => {
            inner.stats.handled.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            inner.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %inner.topic, %error, "simple handler failed; message dropped (at-most-once)");
        }
    };
    loop {
        if running.len() >= max_concurrency {
            if let Some(r) = running.next().await {
                record(r);
            }
            continue;
        }
        let message = tokio::select! {
            biased;
            () = inner.stop.cancelled() => break,
            Some(r) = running.next(), if !running.is_empty() => {
                record(r);
                continue;
            }
            m = stream.next() => match m {
                Some(message) => message,
                None => break,
            },
        };
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        // Readiness is awaited while the running calls go on: a handler service with a
        // concurrency limit gets ready only when one of them finishes. A panic, in
        // `poll_ready`, in `call` or in the future, is a failed call (the guard's).
        let ready = loop {
            tokio::select! {
                biased;
                () = inner.stop.cancelled() => break None,
                Some(r) = running.next(), if !running.is_empty() => record(r),
                r = handler.ready() => break Some(r),
            }
        };
        let mut call = match ready {
            // Stopped: this message is not handled (at-most-once).
            None => break,
            Some(Err(e)) => {
                record(Err(e));
                continue;
            }
            Some(Ok(())) => handler.call(message),
        };
        // Most handlers finish at once: poll inline, keep the others running concurrently.
        match (&mut call).now_or_never() {
            Some(r) => record(r),
            None => running.push(call),
        }
    }
    drop(stream);
    while let Some(r) = running.next().await {
        record(r);
    }
}
