//! The tracing layer: `send`/`create` spans on every write, the W3C context injected into
//! the message headers, and a `process` span around every handler attempt that continues
//! the trace the message carries.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};

use dualbus_core::middleware::BusKind;
use dualbus_core::pipeline::SimpleBody;
use dualbus_core::{
    BoxPublishService, Envelope, Error, Event, HandleError, HandlerContext, HandlerLayer, Message,
    PublishBody, PublishLayer, PublishRequest, PublishResponse, Receipt,
};
use futures::future::BoxFuture;
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    FutureExt as _, Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt as _,
    Tracer as _, TracerProvider,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use parking_lot::RwLock;
use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::attrs::{self, *};
use crate::carrier::{Extract, Inject};
use crate::config::{AttributeSettings, ConsumerParent, OtelConfig};

/// The instrumentation scope of this crate's spans and metrics.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("dualbus")
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_schema_url(opentelemetry_semantic_conventions::SCHEMA_URL)
        .build()
}

/// Spans after the OpenTelemetry messaging conventions on both buses, and the W3C trace
/// context (`traceparent`, `tracestate`, `baggage`) carried in message headers.
///
/// Add it to a bus (or to both with the facade's builder) as a publish layer and a handler
/// layer at once:
///
/// - every single write is a `send <topic>` span of kind PRODUCER whose context is
///   injected into the message; a batch is one `send <topic>` span of kind CLIENT linking
///   to a `create <topic>` PRODUCER span per message, whose context that message carries
///   (or, with `create_spans` off, every message carries the `send` span's context);
/// - every handler attempt is a `process <topic>` span of kind CONSUMER, a child of the
///   context the message carries (configurable: a new trace with a link) and always
///   linked to it, with the attempt, the delivery count and the outcome (`ok`, `retried`,
///   `dead_lettered`); the handler runs with that span as the current context, so what it
///   publishes continues the trace;
/// - a dead letter is a `send <topic>.dlq` span in the trace of the message it copies.
///
/// The headers are added before the bus's final size check: they count against the
/// broker's limit. Which spans are recorded is the tracer provider's sampler's choice;
/// attributes are set only on recorded spans.
#[derive(Clone)]
pub struct TracingLayer {
    inner: Arc<Tracing>,
}

pub(crate) struct Tracing {
    tracer: BoxedTracer,
    propagator: TextMapCompositePropagator,
    create_spans: bool,
    consumer_parent: ConsumerParent,
    attributes: AttributeSettings,
}

impl fmt::Debug for TracingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingLayer")
            .field("create_spans", &self.inner.create_spans)
            .field("consumer_parent", &self.inner.consumer_parent)
            .field("attributes", &self.inner.attributes)
            .finish_non_exhaustive()
    }
}

impl Default for TracingLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TracingLayer {
    /// A layer on the global tracer provider, with the default settings.
    pub fn new() -> Self {
        Self::with_tracer(
            opentelemetry::global::tracer_with_scope(scope()),
            &OtelConfig::default(),
        )
    }

    /// A layer on the global tracer provider, with the span settings of `config`.
    pub fn from_config(config: &OtelConfig) -> Self {
        Self::with_tracer(opentelemetry::global::tracer_with_scope(scope()), config)
    }

    /// A layer on `provider` (e.g. an SDK provider with an in-memory exporter in tests),
    /// with the span settings of `config`.
    pub fn with_provider<P>(provider: &P, config: &OtelConfig) -> Self
    where
        P: TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        let tracer = provider.tracer_with_scope(scope());
        Self::with_tracer(BoxedTracer::new(Box::new(tracer)), config)
    }

    fn with_tracer(tracer: BoxedTracer, config: &OtelConfig) -> Self {
        Self {
            inner: Arc::new(Tracing {
                tracer,
                propagator: propagator(),
                create_spans: config.create_spans,
                consumer_parent: config.consumer_parent,
                attributes: config.attributes,
            }),
        }
    }
}

/// The span names of one topic.
#[derive(Clone)]
struct Names {
    send: Cow<'static, str>,
    create: Cow<'static, str>,
    process: Cow<'static, str>,
}

/// Topics whose span names are kept for the life of the process: a service's topics are
/// few and fixed, and a kept name spares an allocation per span. Past this many topics,
/// names are built per span.
const KEPT_NAMES: usize = 4096;

/// The span names of `topic`: kept ones, or built now.
fn names(topic: &str) -> Names {
    static KEPT: OnceLock<RwLock<HashMap<String, Names>>> = OnceLock::new();
    let kept = KEPT.get_or_init(RwLock::default);
    if let Some(n) = kept.read().get(topic) {
        return n.clone();
    }
    let made = |op: &str| format!("{op} {topic}");
    let mut map = kept.write();
    if map.len() >= KEPT_NAMES {
        return Names {
            send: Cow::Owned(made("send")),
            create: Cow::Owned(made("create")),
            process: Cow::Owned(made("process")),
        };
    }
    // Kept for the life of the process, by design (bounded by `KEPT_NAMES` topics).
    let keep =
        |op: &str| -> Cow<'static, str> { Cow::Borrowed(Box::leak(made(op).into_boxed_str())) };
    let n = Names {
        send: keep("send"),
        create: keep("create"),
        process: keep("process"),
    };
    map.insert(topic.to_owned(), n.clone());
    n
}

/// The propagators the layer writes and reads: W3C trace context and W3C baggage.
pub fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
}

/// The context new writes continue: the current OpenTelemetry context, or, when it holds
/// no span, the OpenTelemetry context of the current `tracing` span (for subscribers whose
/// OpenTelemetry layer does not activate contexts).
fn ambient() -> Context {
    let cx = Context::current();
    if cx.has_active_span() {
        return cx;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let from_tracing = tracing::Span::current().context();
    if from_tracing.has_active_span() {
        from_tracing
    } else {
        cx
    }
}

/// What one message of a write contributes to its span.
struct MessageAttrs<'a> {
    id: Option<&'a str>,
    key: Option<&'a str>,
    event_type: Option<&'a str>,
    conversation_id: Option<&'a str>,
    body_size: usize,
}

impl<'a> MessageAttrs<'a> {
    fn of_envelope(e: &'a Envelope) -> Self {
        Self {
            id: Some(&e.event_id),
            key: Some(&e.aggregate_id),
            event_type: Some(&e.event_type),
            conversation_id: e.correlation_id.as_deref(),
            body_size: e.payload.len(),
        }
    }

    fn of_simple(b: &SimpleBody) -> Self {
        Self {
            id: None,
            key: None,
            event_type: None,
            conversation_id: None,
            body_size: b.payload.len(),
        }
    }
}

impl Tracing {
    fn common(&self, backend: &'static str, topic: &str, op_type: &'static str) -> Vec<KeyValue> {
        vec![
            attrs::s(MESSAGING_SYSTEM, attrs::system(backend)),
            attrs::owned(MESSAGING_DESTINATION_NAME, topic),
            attrs::s(MESSAGING_OPERATION_TYPE, op_type),
            attrs::s(MESSAGING_OPERATION_NAME, op_type),
        ]
    }

    fn message_attrs(&self, backend: &'static str, m: &MessageAttrs<'_>, out: &mut Vec<KeyValue>) {
        let a = &self.attributes;
        if a.message_id
            && let Some(id) = m.id
        {
            out.push(attrs::owned(MESSAGING_MESSAGE_ID, id));
        }
        if a.key
            && let Some(k) = m.key
        {
            let name = if backend == "kafka" {
                MESSAGING_KAFKA_MESSAGE_KEY
            } else {
                DUALBUS_AGGREGATE_ID
            };
            out.push(attrs::owned(name, k));
        }
        if let Some(t) = m.event_type {
            out.push(attrs::owned(DUALBUS_EVENT_TYPE, t));
        }
        if a.conversation_id
            && let Some(c) = m.conversation_id
        {
            out.push(attrs::owned(MESSAGING_MESSAGE_CONVERSATION_ID, c));
        }
        if a.body_size {
            out.push(attrs::int(MESSAGING_MESSAGE_BODY_SIZE, m.body_size));
        }
    }

    fn start(
        &self,
        name: Cow<'static, str>,
        kind: SpanKind,
        parent: &Context,
        links: Vec<Link>,
    ) -> opentelemetry::global::BoxedSpan {
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_links(links)
            .start_with_context(&self.tracer, parent)
    }

    /// Starts the spans of a write, injects their contexts into its messages, and returns
    /// the `send` span's context to finish when the broker answered.
    fn on_publish(&self, req: &mut PublishRequest) -> Context {
        let kind = req.kind();
        let backend = req.backend;
        let topic = req.topic.as_str();
        let names = names(topic);
        // A dead letter continues the trace of the message it copies.
        let mut parent = ambient();
        let mut links = Vec::new();
        if let PublishBody::DeadLetter(d) = &req.body {
            let original = self.propagator.extract(&Extract(&d.original_headers));
            let sc = original.span().span_context().clone();
            if sc.is_valid() {
                links.push(Link::with_context(sc));
                if !parent.has_active_span() {
                    parent = original;
                }
            }
        }
        if let PublishBody::Batch(batch) = &mut req.body {
            let count = batch.len();
            let mut contexts = Vec::with_capacity(count);
            if self.create_spans {
                for e in batch.iter_mut() {
                    let mut span = self.start(
                        names.create.clone(),
                        SpanKind::Producer,
                        &parent,
                        Vec::new(),
                    );
                    if span.is_recording() {
                        let mut a = self.common(backend, topic, "create");
                        self.message_attrs(backend, &MessageAttrs::of_envelope(e), &mut a);
                        span.set_attributes(a);
                    }
                    let sc = span.span_context().clone();
                    let cx = parent.with_remote_span_context(sc.clone());
                    self.inject(&cx, e);
                    span.end();
                    contexts.push(Link::with_context(sc));
                }
            }
            let mut span = self.start(names.send.clone(), SpanKind::Client, &parent, contexts);
            if span.is_recording() {
                let mut a = self.common(backend, topic, "send");
                a.push(attrs::int(MESSAGING_BATCH_MESSAGE_COUNT, count));
                a.push(attrs::s(DUALBUS_PUBLISH_KIND, kind.as_str()));
                span.set_attributes(a);
            }
            let cx = parent.with_span(span);
            if !self.create_spans {
                for e in batch.iter_mut() {
                    self.inject(&cx, e);
                }
            }
            return cx;
        }
        let mut span = self.start(names.send, SpanKind::Producer, &parent, links);
        if span.is_recording() {
            let mut a = self.common(backend, topic, "send");
            a.push(attrs::s(DUALBUS_PUBLISH_KIND, kind.as_str()));
            a.push(attrs::s(
                DUALBUS_BUS,
                match kind.bus() {
                    BusKind::Domain => "domain",
                    BusKind::Simple => "simple",
                },
            ));
            match &req.body {
                PublishBody::Event(e) | PublishBody::Append { envelope: e, .. } => {
                    self.message_attrs(backend, &MessageAttrs::of_envelope(e), &mut a);
                }
                PublishBody::DeadLetter(d) => {
                    a.push(attrs::s(DUALBUS_DEAD_LETTER_KIND, d.kind.as_str()));
                    let m = MessageAttrs {
                        id: d.record.id.as_deref(),
                        key: Some(&d.record.key),
                        event_type: None,
                        conversation_id: None,
                        body_size: d.record.payload.len(),
                    };
                    self.message_attrs(backend, &m, &mut a);
                }
                PublishBody::Message(b)
                | PublishBody::Request { body: b, .. }
                | PublishBody::Reply(b) => {
                    self.message_attrs(backend, &MessageAttrs::of_simple(b), &mut a);
                }
                _ => {}
            }
            span.set_attributes(a);
        }
        let cx = parent.with_span(span);
        match &mut req.body {
            PublishBody::Event(e) | PublishBody::Append { envelope: e, .. } => self.inject(&cx, e),
            _ => req.for_each_message(|_, headers| {
                self.propagator.inject_context(&cx, &mut Inject(headers));
            }),
        }
        cx
    }

    /// Writes `cx` into an event's headers and its trace id into the envelope's `trace_id`
    /// (which the jxt JSON codec carries), so both name the same trace.
    fn inject(&self, cx: &Context, e: &mut Envelope) {
        self.propagator
            .inject_context(cx, &mut Inject(&mut e.headers));
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            e.trace_id = Some(sc.trace_id().to_string());
        }
    }
}

/// Records a write's outcome on its `send` span and ends it.
fn finish_publish(cx: &Context, backend: &'static str, result: &Result<PublishResponse, Error>) {
    let span = cx.span();
    if span.is_recording() {
        match result {
            Ok(PublishResponse::Batch(results)) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                    span.set_attribute(attrs::int(DUALBUS_BATCH_FAILED_COUNT, failed));
                    span.set_attribute(attrs::s(ERROR_TYPE, crate::error_type(e)));
                    span.set_status(Status::error(e.to_string()));
                }
            }
            Ok(r) => {
                if let Some(Ok(receipt)) = r.result(0) {
                    position_attrs(&span, backend, &receipt);
                }
            }
            Err(e) => {
                span.set_attribute(attrs::s(ERROR_TYPE, crate::error_type(e)));
                span.set_status(Status::error(e.to_string()));
            }
        }
    }
    span.end();
}

fn position_attrs(
    span: &opentelemetry::trace::SpanRef<'_>,
    backend: &'static str,
    receipt: &Receipt,
) {
    if let Some(p) = receipt.position {
        span.set_attribute(attrs::owned(
            MESSAGING_DESTINATION_PARTITION_ID,
            &p.partition.to_string(),
        ));
        if backend == "kafka" {
            span.set_attribute(attrs::int(MESSAGING_KAFKA_OFFSET, p.offset));
        }
    }
}

/// The service a [`TracingLayer`] puts around a publish pipeline or a handler.
#[derive(Clone)]
pub struct TracingService<S> {
    inner: S,
    tracing: Arc<Tracing>,
    handler: Option<Arc<HandlerSpans>>,
}

impl<S> fmt::Debug for TracingService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingService").finish_non_exhaustive()
    }
}

impl PublishLayer for TracingLayer {
    fn layer_publish(&self, inner: BoxPublishService) -> BoxPublishService {
        BoxPublishService::new(TracingService {
            inner,
            tracing: self.inner.clone(),
            handler: None,
        })
    }
}

impl<S> Service<PublishRequest> for TracingService<S>
where
    S: Service<PublishRequest, Response = PublishResponse, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = PublishResponse;
    type Error = Error;
    type Future = BoxFuture<'static, Result<PublishResponse, Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: PublishRequest) -> Self::Future {
        let backend = req.backend;
        let cx = self.tracing.on_publish(&mut req);
        let fut = self.inner.call(req).with_context(cx.clone());
        Box::pin(async move {
            let result = fut.await;
            finish_publish(&cx, backend, &result);
            result
        })
    }
}

/// What the `process` spans of one subscription share, built once.
struct HandlerSpans {
    name: Cow<'static, str>,
    common: Vec<KeyValue>,
    backend: &'static str,
    max_attempts: u32,
}

impl HandlerSpans {
    fn new(cx: &HandlerContext<'_>) -> Self {
        let mut common = vec![
            attrs::s(MESSAGING_SYSTEM, attrs::system(cx.backend)),
            attrs::shared(MESSAGING_DESTINATION_NAME, cx.topic.as_str()),
            attrs::s(MESSAGING_OPERATION_TYPE, "process"),
            attrs::s(MESSAGING_OPERATION_NAME, "process"),
        ];
        if let Some(g) = cx.group {
            common.push(attrs::shared(MESSAGING_CONSUMER_GROUP_NAME, g));
        }
        Self {
            name: names(cx.topic.as_str()).process,
            common,
            backend: cx.backend,
            max_attempts: cx.max_attempts,
        }
    }

    /// Without a subscription (a handler layered by hand): what the request tells.
    fn bare(topic: &str) -> Self {
        Self {
            name: names(topic).process,
            common: vec![
                attrs::owned(MESSAGING_DESTINATION_NAME, topic),
                attrs::s(MESSAGING_OPERATION_TYPE, "process"),
                attrs::s(MESSAGING_OPERATION_NAME, "process"),
            ],
            backend: "",
            max_attempts: 1,
        }
    }
}

impl Tracing {
    /// Starts the `process` span of a handler call on `headers`; returns the context the
    /// handler runs in.
    fn on_handle(
        &self,
        spans: &HandlerSpans,
        headers: &dualbus_core::Headers,
        extra: impl FnOnce(&mut Vec<KeyValue>),
    ) -> Context {
        let carried = self.propagator.extract(&Extract(headers));
        let remote: SpanContext = carried.span().span_context().clone();
        // A new trace gets its link at creation (samplers may read it); a child gets it
        // only if it is recorded, which spares an allocation per message otherwise.
        let (parent, links) = match self.consumer_parent {
            ConsumerParent::Parent => (carried.clone(), Vec::new()),
            ConsumerParent::Link if remote.is_valid() => {
                (Context::new(), vec![Link::with_context(remote.clone())])
            }
            ConsumerParent::Link => (Context::new(), Vec::new()),
        };
        let mut span = self
            .tracer
            .span_builder(spans.name.clone())
            .with_kind(SpanKind::Consumer)
            .with_links(links)
            .start_with_context(&self.tracer, &parent);
        if span.is_recording() {
            if self.consumer_parent == ConsumerParent::Parent && remote.is_valid() {
                span.add_link(remote, Vec::new());
            }
            let mut a = spans.common.clone();
            extra(&mut a);
            span.set_attributes(a);
        }
        // The carried context keeps its baggage; the span replaces the remote one.
        carried.with_span(span)
    }
}

fn finish_handle(cx: &Context, result: &Result<(), HandleError>, outcome: &'static str) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(attrs::s(DUALBUS_OUTCOME, outcome));
        if let Err(e) = result {
            span.set_attribute(attrs::s(ERROR_TYPE, crate::handle_error_type(e)));
            span.record_error(e.source() as &dyn std::error::Error);
            span.set_status(Status::error(e.to_string()));
        }
    }
    span.end();
}

/// What the layers read of a handler's request: a domain [`Event`] or a simple [`Message`].
pub(crate) trait Handled: Send + 'static {
    /// The topic it came from.
    fn topic(&self) -> &str;
    /// Its headers.
    fn headers(&self) -> &dualbus_core::Headers;
    /// The pool's attempt (a simple message has one).
    fn attempt(&self) -> u32;
    /// Whether it travels on the simple bus (no retries: its outcome is `ok` or `failed`).
    fn simple(&self) -> bool;
    /// Its own span attributes.
    fn span_attrs(&self, tracing: &Tracing, backend: &'static str, out: &mut Vec<KeyValue>);
}

impl Handled for Event {
    fn topic(&self) -> &str {
        self.topic.as_str()
    }
    fn headers(&self) -> &dualbus_core::Headers {
        &self.envelope.headers
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn simple(&self) -> bool {
        false
    }
    fn span_attrs(&self, tracing: &Tracing, backend: &'static str, a: &mut Vec<KeyValue>) {
        tracing.message_attrs(backend, &MessageAttrs::of_envelope(&self.envelope), a);
        a.push(attrs::owned(
            MESSAGING_DESTINATION_PARTITION_ID,
            &self.position.partition.to_string(),
        ));
        if backend == "kafka" {
            a.push(attrs::int(MESSAGING_KAFKA_OFFSET, self.position.offset));
        }
        a.push(attrs::int(DUALBUS_ATTEMPT, self.attempt));
        a.push(attrs::int(DUALBUS_DELIVERY_COUNT, self.delivery_count));
    }
}

impl Handled for Message {
    fn topic(&self) -> &str {
        &self.topic
    }
    fn headers(&self) -> &dualbus_core::Headers {
        &self.headers
    }
    fn attempt(&self) -> u32 {
        1
    }
    fn simple(&self) -> bool {
        true
    }
    fn span_attrs(&self, tracing: &Tracing, _backend: &'static str, a: &mut Vec<KeyValue>) {
        if tracing.attributes.body_size {
            a.push(attrs::int(MESSAGING_MESSAGE_BODY_SIZE, self.payload.len()));
        }
    }
}

/// The outcome of a handler call as the bus will treat it: on the domain bus `ok`,
/// `retried` or `dead_lettered` (by the attempt and the error's kind), on the simple bus
/// `ok` or `failed`.
pub(crate) fn outcome_of(
    simple: bool,
    result: &Result<(), HandleError>,
    attempt: u32,
    max_attempts: u32,
) -> &'static str {
    match (simple, result) {
        (_, Ok(())) => "ok",
        (true, Err(_)) => "failed",
        (false, Err(e)) if e.is_retryable() && attempt < max_attempts => "retried",
        (false, Err(_)) => "dead_lettered",
    }
}

impl<S, R> Service<R> for TracingService<S>
where
    S: Service<R, Response = (), Error = HandleError>,
    S::Future: Send + 'static,
    R: Handled,
{
    type Response = ();
    type Error = HandleError;
    type Future = BoxFuture<'static, Result<(), HandleError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), HandleError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let bare;
        let spans = match &self.handler {
            Some(h) => h.as_ref(),
            None => {
                bare = HandlerSpans::bare(req.topic());
                &bare
            }
        };
        let (simple, attempt, max_attempts) = (req.simple(), req.attempt(), spans.max_attempts);
        let backend = spans.backend;
        let cx = self.tracing.on_handle(spans, req.headers(), |a| {
            req.span_attrs(&self.tracing, backend, a);
        });
        let fut = self.inner.call(req).with_context(cx.clone());
        Box::pin(async move {
            let result = fut.await;
            finish_handle(
                &cx,
                &result,
                outcome_of(simple, &result, attempt, max_attempts),
            );
            result
        })
    }
}

impl<R> HandlerLayer<R> for TracingLayer
where
    R: Send + 'static,
    TracingService<BoxCloneSyncService<R, (), HandleError>>: Service<
            R,
            Response = (),
            Error = HandleError,
            Future = BoxFuture<'static, Result<(), HandleError>>,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    fn layer_handler(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
    ) -> BoxCloneSyncService<R, (), HandleError> {
        BoxCloneSyncService::new(TracingService {
            inner,
            tracing: self.inner.clone(),
            handler: None,
        })
    }

    fn layer_handler_in(
        &self,
        inner: BoxCloneSyncService<R, (), HandleError>,
        cx: &HandlerContext<'_>,
    ) -> BoxCloneSyncService<R, (), HandleError> {
        BoxCloneSyncService::new(TracingService {
            inner,
            tracing: self.inner.clone(),
            handler: Some(Arc::new(HandlerSpans::new(cx))),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn outcomes_follow_the_pools_decision() {
        let ok: Result<(), HandleError> = Ok(());
        let retryable = Err(HandleError::retryable(std::io::Error::other("busy")));
        let permanent = Err(HandleError::permanent(std::io::Error::other("bad")));
        assert_eq!(outcome_of(false, &ok, 1, 3), "ok");
        assert_eq!(outcome_of(false, &retryable, 1, 3), "retried");
        assert_eq!(outcome_of(false, &retryable, 2, 3), "retried");
        assert_eq!(outcome_of(false, &retryable, 3, 3), "dead_lettered");
        assert_eq!(outcome_of(false, &permanent, 1, 3), "dead_lettered");
        assert_eq!(outcome_of(true, &ok, 1, 1), "ok");
        assert_eq!(outcome_of(true, &retryable, 1, 1), "failed");
        assert_eq!(outcome_of(true, &permanent, 1, 1), "failed");
    }

    #[test]
    fn span_names_are_kept_per_topic() {
        let a = names("orders.kept");
        let b = names("orders.kept");
        assert_eq!(a.send, "send orders.kept");
        assert_eq!(a.create, "create orders.kept");
        assert_eq!(a.process, "process orders.kept");
        // The same kept text, not a new one.
        assert!(
            matches!((&a.send, &b.send), (Cow::Borrowed(x), Cow::Borrowed(y)) if std::ptr::eq(*x, *y))
        );
    }
}
