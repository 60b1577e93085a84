//! The publish pipeline: every write either bus makes to its broker, as one request type
//! through one layered service.
//!
//! A [`PublishRequest`] carries its kind in its [`PublishBody`]: a single event, a batch of
//! events (one request, so a layer sees the whole batch and its per-message results), a
//! conditional append, a dead letter written by the keyed pool, and the simple bus's
//! publishes, requests and replies. Layers ([`PublishLayer`]) wrap the bus's sink, which
//! encodes envelopes, checks every message against the backend (headers, size: after the
//! layers, so what they add is counted) and calls the transport. [`PublishRequest::extensions`]
//! carries data from one layer to the next.
//!
//! ```text
//!  DomainBus::publish / publish_batch / append ─┐
//!  the pool's dead letters ─────────────────────┤
//!  SimpleBus::publish / request / serve replies ┴─► layer 1 ─► … ─► layer n ─► sink ─► transport
//!                                                   (first added is outermost)  (encode, check)
//! ```
//!
//! Without layers a bus calls its sink directly: no request is built and nothing is boxed.

pub(crate) mod domain;
pub(crate) mod simple;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::envelope::Envelope;
use crate::error::{Error, HandleError, Result};
use crate::headers::Headers;
use crate::message::{EncodedMessage, Message, Receipt};
use crate::middleware::{BusKind, PublishInfo};
use crate::pool::DeadLetterKind;
use crate::topic::Topic;

/// Per-request data one layer leaves for the next (a span, a timer, a deadline), keyed by
/// type. The same type rides on handler requests ([`Event::extensions`](crate::Event::extensions),
/// [`Message::extensions`]) so that handler layers can pass data to the handler.
pub use http::Extensions;

/// The boxed publish pipeline: layers over a bus's sink.
pub type BoxPublishService = BoxCloneSyncService<PublishRequest, PublishResponse, Error>;

/// Which write a [`PublishRequest`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishKind {
    /// One event ([`DomainBus::publish`](crate::DomainBus::publish)).
    Event,
    /// Many events in one request ([`DomainBus::publish_batch`](crate::DomainBus::publish_batch)).
    Batch,
    /// An event appended only at an expected version ([`DomainBus::append`](crate::DomainBus::append)).
    Append,
    /// A dead-letter record written by the keyed pool.
    DeadLetter,
    /// A simple-bus message ([`SimpleBus::publish`](crate::SimpleBus::publish)).
    Message,
    /// A simple-bus request that waits for its reply ([`SimpleBus::request`](crate::SimpleBus::request)).
    Request,
    /// A reply to a simple-bus request ([`SimpleBus::serve`](crate::SimpleBus::serve)).
    Reply,
}

impl PublishKind {
    /// The bus that writes it.
    pub fn bus(self) -> BusKind {
        match self {
            Self::Event | Self::Batch | Self::Append | Self::DeadLetter => BusKind::Domain,
            Self::Message | Self::Request | Self::Reply => BusKind::Simple,
        }
    }

    /// A short name for logs and metrics: `event`, `batch`, `append`, `dead_letter`,
    /// `message`, `request`, `reply`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Batch => "batch",
            Self::Append => "append",
            Self::DeadLetter => "dead_letter",
            Self::Message => "message",
            Self::Request => "request",
            Self::Reply => "reply",
        }
    }

    /// Whether repeating the write after a retryable failure is safe, which is when a
    /// repeat is recognised by its event id: a domain event or batch (brokers with
    /// [`DomainCapabilities::dedup`](crate::DomainCapabilities::dedup) drop the copy; on
    /// others consumers see a redelivery with the same event id, which at-least-once
    /// allows) and an append (a repeat that finds its own event id as the aggregate's last
    /// event returns that event's receipt, marked duplicate, instead of a conflict).
    ///
    /// Not safe, so [`PublishRetryLayer`](crate::middleware::PublishRetryLayer) passes them
    /// through: simple-bus messages, requests and replies (no id; a repeat could deliver
    /// twice on an at-most-once bus, and a request may have been acted upon). Dead letters
    /// carry an id and are safe to repeat, but the pool retries them itself, with the
    /// aggregate parked, until they are stored or refused.
    pub fn retry_safe(self) -> bool {
        matches!(self, Self::Event | Self::Batch | Self::Append)
    }
}

impl fmt::Display for PublishKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`PublishRequest`] writes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PublishBody {
    /// One event. Layers may change it (its headers, its trace and correlation ids): the
    /// sink encodes it after them.
    Event(Envelope),
    /// Many events, published pipelined with each aggregate's order kept; the response is
    /// [`PublishResponse::Batch`] with one result per event, in order.
    Batch(Vec<Envelope>),
    /// An event appended only if its aggregate is at `expected_version`.
    Append {
        /// The event; it carries `expected_version + 1`.
        envelope: Envelope,
        /// The aggregate's version the append expects (0: no event yet).
        expected_version: u64,
    },
    /// A dead-letter record.
    DeadLetter(DeadLetter),
    /// A simple-bus message.
    Message(SimpleBody),
    /// A simple-bus request; the response is [`PublishResponse::Reply`].
    Request {
        /// The request.
        body: SimpleBody,
        /// How long to wait for the reply.
        timeout: Duration,
    },
    /// A reply to a simple-bus request; the request's topic is the requester's inbox.
    Reply(SimpleBody),
}

/// The headers and payload of a simple-bus write (its topic is the request's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimpleBody {
    /// Headers (trace context, application metadata).
    pub headers: Headers,
    /// The payload, opaque to the bus.
    pub payload: Bytes,
    /// Where replies go, for a message published with a reply address (a request gets
    /// its inbox from the transport).
    pub reply_to: Option<String>,
}

impl SimpleBody {
    /// A body with these headers and payload.
    pub fn new(headers: Headers, payload: impl Into<Bytes>) -> Self {
        Self {
            headers,
            payload: payload.into(),
            reply_to: None,
        }
    }

    /// The topic, body and per-call data of `message`.
    pub(crate) fn split(message: Message) -> (String, Self, Extensions) {
        let body = Self {
            headers: message.headers,
            payload: message.payload,
            reply_to: message.reply_to,
        };
        (message.topic, body, message.extensions)
    }
}

/// A dead-letter record as the keyed pool hands it to the pipeline.
///
/// The record is a copy of the original message (its key, its headers that every backend
/// can carry, its body) with the `dualbus-dlq-*` reason headers, and whatever layers add.
/// Layers see and may change every header; one that writes a header the original had (a
/// tracing layer's `traceparent`) replaces it in the record, and the original value stays
/// in [`original_headers`](Self::original_headers). The sink checks the record against
/// the broker's limit after the layers and, if it does not fit, sends the first reduced
/// form that does: without the original headers (those a layer left as they were), then
/// without the body (its length in `dualbus-dlq-original-length`), then without both,
/// marked in `dualbus-dlq-reduced`. What layers added or changed is kept in every form.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The record: key, headers (the original's and the reason headers), the original
    /// body, and the deduplication id `dlq:<topic>:<partition>:<offset>` (one record per
    /// source position).
    pub record: EncodedMessage,
    /// The original message's headers as they were (without any `dualbus-dlq-*` header and
    /// without headers some backend could not carry), e.g. its `traceparent`, to link the
    /// dead letter to it. Read only: the sink compares the record's headers with them.
    pub original_headers: Headers,
    /// Why the message was dead-lettered.
    pub kind: DeadLetterKind,
}

impl DeadLetter {
    pub(crate) fn new(
        record: EncodedMessage,
        original_headers: Headers,
        kind: DeadLetterKind,
    ) -> Self {
        Self {
            record,
            original_headers,
            kind,
        }
    }
}

/// One write through the publish pipeline: what publish layers see.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublishRequest {
    /// The topic (for a reply: the requester's inbox).
    pub topic: Topic,
    /// The backend's name ([`DomainCapabilities::backend`](crate::DomainCapabilities::backend)).
    pub backend: &'static str,
    /// What is written.
    pub body: PublishBody,
    /// Data layers pass to the layers inside them.
    pub extensions: Extensions,
}

impl PublishRequest {
    /// A request to write `body` to `topic` on `backend`, with no extensions.
    pub fn new(topic: Topic, backend: &'static str, body: PublishBody) -> Self {
        Self {
            topic,
            backend,
            body,
            extensions: Extensions::new(),
        }
    }

    /// Same request with these extensions.
    #[must_use]
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }

    /// Which write it is.
    pub fn kind(&self) -> PublishKind {
        match &self.body {
            PublishBody::Event(_) => PublishKind::Event,
            PublishBody::Batch(_) => PublishKind::Batch,
            PublishBody::Append { .. } => PublishKind::Append,
            PublishBody::DeadLetter(_) => PublishKind::DeadLetter,
            PublishBody::Message(_) => PublishKind::Message,
            PublishBody::Request { .. } => PublishKind::Request,
            PublishBody::Reply(_) => PublishKind::Reply,
        }
    }

    /// The bus that writes it.
    pub fn bus(&self) -> BusKind {
        self.kind().bus()
    }

    /// How many messages it writes (a batch: its length; otherwise 1).
    pub fn len(&self) -> usize {
        match &self.body {
            PublishBody::Batch(b) => b.len(),
            _ => 1,
        }
    }

    /// Whether it writes no message (an empty batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` for each message the request writes, in order, with what is known of it
    /// and its headers to read or add to (e.g. a W3C `traceparent`). Headers added here
    /// are checked by the sink, after every layer, and count against the broker's size
    /// limit.
    pub fn for_each_message(&mut self, mut f: impl FnMut(PublishInfo<'_>, &mut Headers)) {
        let kind = self.kind();
        let base = PublishInfo {
            bus: kind.bus(),
            kind,
            backend: self.backend,
            topic: self.topic.as_str(),
            key: None,
            event_type: None,
            id: None,
            payload_len: 0,
        };
        let mut domain = |e: &mut Envelope| {
            let info = PublishInfo {
                key: Some(&e.aggregate_id),
                event_type: Some(&e.event_type),
                id: Some(&e.event_id),
                payload_len: e.payload.len(),
                ..base
            };
            f(info, &mut e.headers);
        };
        match &mut self.body {
            PublishBody::Event(e) | PublishBody::Append { envelope: e, .. } => domain(e),
            PublishBody::Batch(b) => b.iter_mut().for_each(domain),
            PublishBody::DeadLetter(d) => {
                let info = PublishInfo {
                    key: Some(&d.record.key),
                    id: d.record.id.as_deref(),
                    payload_len: d.record.payload.len(),
                    ..base
                };
                f(info, &mut d.record.headers);
            }
            PublishBody::Message(b)
            | PublishBody::Request { body: b, .. }
            | PublishBody::Reply(b) => {
                let info = PublishInfo {
                    payload_len: b.payload.len(),
                    ..base
                };
                f(info, &mut b.headers);
            }
        }
    }
}

/// What the pipeline answers.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishResponse {
    /// An event, an append, a simple message or a reply was accepted.
    Receipt(Receipt),
    /// A batch: one result per event, in the request's order.
    Batch(Vec<Result<Receipt>>),
    /// A dead letter was stored; `reduced` names what was left out to fit the broker's
    /// limit (`headers`, `body` or `headers,body`), as its `dualbus-dlq-reduced` header says.
    DeadLetter {
        /// The broker's receipt.
        receipt: Receipt,
        /// What was left out, if anything.
        reduced: Option<&'static str>,
    },
    /// The reply to a request.
    Reply(Message),
}

impl PublishResponse {
    /// The number of messages this response reports on: a batch's length, else 1.
    pub fn len(&self) -> usize {
        match self {
            Self::Batch(b) => b.len(),
            _ => 1,
        }
    }

    /// Whether it reports on no message (an empty batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The result of message `index` (0 for a single write): its receipt, a batch entry's
    /// error, or `None` past the end. A reply counts as accepted.
    pub fn result(&self, index: usize) -> Option<std::result::Result<Receipt, &Error>> {
        match self {
            Self::Receipt(r) | Self::DeadLetter { receipt: r, .. } => {
                (index == 0).then_some(Ok(*r))
            }
            Self::Batch(b) => b.get(index).map(|r| r.as_ref().copied()),
            Self::Reply(_) => (index == 0).then_some(Ok(Receipt::accepted())),
        }
    }

    /// The outcome of message `index` of a write whose pipeline answered `result`: the
    /// whole write's error, or [`result`](Self::result) of its response.
    pub fn outcome(
        result: &Result<Self>,
        index: usize,
    ) -> Option<std::result::Result<Receipt, &Error>> {
        match result {
            Ok(response) => response.result(index),
            Err(e) => Some(Err(e)),
        }
    }

    /// The receipt of a single write; an error naming `kind` if a layer answered with
    /// another response.
    pub(crate) fn into_receipt(self, kind: PublishKind) -> Result<Receipt> {
        match self {
            Self::Receipt(r) | Self::DeadLetter { receipt: r, .. } => Ok(r),
            other => Err(mismatch(kind, &other)),
        }
    }

    pub(crate) fn into_batch(self, len: usize) -> Result<Vec<Result<Receipt>>> {
        match self {
            Self::Batch(b) if b.len() == len => Ok(b),
            other => Err(mismatch(PublishKind::Batch, &other)),
        }
    }

    pub(crate) fn into_reply(self) -> Result<Message> {
        match self {
            Self::Reply(m) => Ok(m),
            other => Err(mismatch(PublishKind::Request, &other)),
        }
    }
}

/// A layer answered a write with a response of another kind (or a batch of another
/// length): a defect of that layer, reported rather than guessed around.
fn mismatch(kind: PublishKind, got: &PublishResponse) -> Error {
    Error::backend(
        "publish pipeline",
        false,
        crate::error::Failure(format!(
            "a publish layer answered a {kind} write with {}",
            match got {
                PublishResponse::Receipt(_) => "a receipt".to_owned(),
                PublishResponse::Batch(b) => format!("a batch of {} results", b.len()),
                PublishResponse::DeadLetter { .. } => "a dead-letter receipt".to_owned(),
                PublishResponse::Reply(_) => "a reply".to_owned(),
            }
        )),
    )
}

/// A layer over the publish pipeline. Implemented for every [`tower::Layer`] whose service
/// takes a [`PublishRequest`] and answers a [`PublishResponse`] or an [`Error`].
pub trait PublishLayer: Send + Sync + 'static {
    /// Wraps `inner`.
    fn layer_publish(&self, inner: BoxPublishService) -> BoxPublishService;
}

impl<L> PublishLayer for L
where
    L: Layer<BoxPublishService> + Send + Sync + 'static,
    L::Service: Service<PublishRequest, Response = PublishResponse, Error = Error>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as Service<PublishRequest>>::Future: Send + 'static,
{
    fn layer_publish(&self, inner: BoxPublishService) -> BoxPublishService {
        BoxPublishService::new(self.layer(inner))
    }
}

/// What a handler layer learns, once, about the subscription whose handler it wraps:
/// enough to name spans and build metric attributes before the first message arrives.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct HandlerContext<'a> {
    /// The bus.
    pub bus: BusKind,
    /// The backend's name.
    pub backend: &'static str,
    /// The topic subscribed to.
    pub topic: &'a Topic,
    /// The consumer group (domain bus) or the queue group (simple bus), if any.
    pub group: Option<&'a str>,
    /// The attempts the pool makes before it dead-letters an event (1 on the simple bus,
    /// which does not retry).
    pub max_attempts: u32,
    /// The domain subscription (its pool's counters, partitions and lag), for layers that
    /// report on it; `None` on the simple bus.
    pub subscription: Option<&'a crate::SubscriptionHandle>,
}

/// A layer over handlers of requests `R` ([`Event`](crate::Event) on the domain bus,
/// [`Message`] on the simple bus). Implemented for every [`tower::Layer`] whose service
/// takes `R` and answers `()` or a [`HandleError`].
pub trait HandlerLayer<R>: Send + Sync + 'static {
    /// Wraps `inner`.
    fn layer_handler(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
    ) -> BoxCloneSyncService<R, (), HandleError>;

    /// Wraps `inner` for the subscription `cx` describes; the buses call this one. The
    /// default ignores `cx` and calls [`layer_handler`](Self::layer_handler).
    fn layer_handler_in(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
        cx: &HandlerContext<'_>,
    ) -> BoxCloneSyncService<R, (), HandleError> {
        let _ = cx;
        self.layer_handler(inner)
    }
}

impl<L, R> HandlerLayer<R> for L
where
    L: Layer<BoxCloneSyncService<R, (), HandleError>> + Send + Sync + 'static,
    L::Service: Service<R, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
    <L::Service as Service<R>>::Future: Send + 'static,
    R: 'static,
{
    fn layer_handler(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
    ) -> BoxCloneSyncService<R, (), HandleError> {
        BoxCloneSyncService::new(self.layer(inner))
    }
}

/// Layers in the order they were added; the first added is outermost (it sees a request
/// first and its response last), as in [`tower::ServiceBuilder`].
pub(crate) struct Stack<L: ?Sized>(Vec<Arc<L>>);

impl<L: ?Sized> Clone for Stack<L> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<L: ?Sized> Default for Stack<L> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<L: ?Sized> fmt::Debug for Stack<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} layers", self.0.len())
    }
}

impl<L: ?Sized> Stack<L> {
    pub(crate) fn push(&mut self, layer: Arc<L>) {
        self.0.push(layer);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Wraps `inner` in every layer, the first added outermost.
    pub(crate) fn apply<S>(&self, mut inner: S, wrap: impl Fn(&L, S) -> S) -> S {
        for layer in self.0.iter().rev() {
            inner = wrap(layer, inner);
        }
        inner
    }
}

/// What a bus builder collects: its publish layers and its layers over handlers of `R`.
pub(crate) struct Layers<R> {
    pub(crate) publish: Stack<dyn PublishLayer>,
    pub(crate) handler: Stack<dyn HandlerLayer<R>>,
}

impl<R> Default for Layers<R> {
    fn default() -> Self {
        Self {
            publish: Stack::default(),
            handler: Stack::default(),
        }
    }
}

impl<R: 'static> Layers<R> {
    pub(crate) fn add_publish(&mut self, layer: impl PublishLayer) {
        self.publish.push(Arc::new(layer));
    }

    pub(crate) fn add_handler(&mut self, layer: impl HandlerLayer<R>) {
        self.handler.push(Arc::new(layer));
    }

    /// One layer on both sides, shared.
    pub(crate) fn add_both<L: PublishLayer + HandlerLayer<R>>(&mut self, layer: L) {
        let layer = Arc::new(layer);
        self.publish.push(layer.clone());
        self.handler.push(layer);
    }
}

/// A bus's way to its broker: the layered service, or the sink alone when there are no
/// layers (then a write is not turned into a request at all).
#[derive(Clone)]
pub(crate) struct Pipeline<S> {
    pub(crate) sink: S,
    layered: Option<BoxPublishService>,
}

impl<S> Pipeline<S>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    pub(crate) fn new(sink: S, layers: &Stack<dyn PublishLayer>) -> Self {
        let layered = (!layers.is_empty()).then(|| {
            layers.apply(BoxPublishService::new(sink.clone()), |l, s| {
                l.layer_publish(s)
            })
        });
        Self { sink, layered }
    }

    /// The layered service, if there are layers.
    pub(crate) fn layered(&self) -> Option<&BoxPublishService> {
        self.layered.as_ref()
    }
}

impl<S> fmt::Debug for Pipeline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("layered", &self.layered.is_some())
            .finish_non_exhaustive()
    }
}
