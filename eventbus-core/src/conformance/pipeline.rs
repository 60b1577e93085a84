//! The publish pipeline on every backend: a layer that records what it sees observes every
//! kind of write of both buses (domain events, batches, appends and dead letters; simple
//! messages, requests and replies), with the per-message results; what it adds to the
//! headers reaches the broker and the handlers; data it leaves in the extensions reaches
//! the layer inside it and, on the handler side, the handler.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tower::{Layer, Service};

use super::domain::{SOURCE, bus_with, finish, read_raw};
use super::{Backend, OrderChecker, event, unique_topic, wait_for};
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::message::Message;
use crate::pipeline::{PublishKind, PublishRequest, PublishResponse};
use crate::pool::dlq_headers;
use crate::simple::SimpleBusBuilder;

/// The header the recording layer adds to every message it sees: the write's kind.
pub const LAYER_HEADER: &str = "x-conformance-layer";

/// One write as the recording layer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Its kind.
    pub kind: PublishKind,
    /// Its topic.
    pub topic: String,
    /// Whether the outer layer's extension reached this (inner) layer.
    pub marked: bool,
    /// Whether the handler layer's extension came along (a reply written by a handler).
    pub from_handler: bool,
    /// Per message: stored (`Ok`) or the error's kind.
    pub results: Vec<Result<(), ErrorKind>>,
}

/// One handler call as the recording layer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The topic.
    pub topic: String,
    /// The value of [`LAYER_HEADER`] on the message: the kind of write that stored it.
    pub header: Option<String>,
    /// Whether the outer layer's extension reached this (inner) layer.
    pub marked: bool,
}

/// What the recording layers saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Writes, in the order they finished.
    pub writes: Mutex<Vec<Write>>,
    /// Handler calls, in the order they started.
    pub calls: Mutex<Vec<Call>>,
}

impl Seen {
    fn of(&self, kind: PublishKind) -> Vec<Write> {
        self.writes
            .lock()
            .iter()
            .filter(|w| w.kind == kind)
            .cloned()
            .collect()
    }
}

/// The outer layer's extension.
#[derive(Debug, Clone, Copy)]
struct Outer;

/// The inner handler layer's extension, for the handler (and a reply it writes).
#[derive(Debug, Clone, Copy)]
pub struct FromHandlerLayer;

/// A layer for both sides of both buses: the outer one only leaves a marker in the extensions;
/// the inner one records, adds [`LAYER_HEADER`] on writes and [`FromHandlerLayer`] on calls.
#[derive(Clone, Debug)]
pub struct Probe {
    seen: Arc<Seen>,
    outer: bool,
}

impl Probe {
    /// The pair of layers (outer, inner) recording into `seen`.
    pub fn pair(seen: &Arc<Seen>) -> (Self, Self) {
        let p = |outer| Self {
            seen: seen.clone(),
            outer,
        };
        (p(true), p(false))
    }
}

impl<S> Layer<S> for Probe {
    type Service = ProbeService<S>;
    fn layer(&self, inner: S) -> ProbeService<S> {
        ProbeService {
            inner,
            probe: self.clone(),
        }
    }
}

/// The service of [`Probe`].
#[derive(Clone, Debug)]
pub struct ProbeService<S> {
    inner: S,
    probe: Probe,
}

impl<S> Service<PublishRequest> for ProbeService<S>
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
        if self.probe.outer {
            req.extensions.insert(Outer);
            return Box::pin(self.inner.call(req));
        }
        let kind = req.kind();
        let topic = req.topic.to_string();
        let marked = req.extensions.get::<Outer>().is_some();
        let from_handler = req.extensions.get::<FromHandlerLayer>().is_some();
        let n = req.len();
        req.for_each_message(|_, headers| headers.insert(LAYER_HEADER, kind.as_str()));
        let seen = self.probe.seen.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let results = (0..n)
                .map(|i| match PublishResponse::outcome(&result, i) {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(e.kind()),
                    None => Err(ErrorKind::Backend),
                })
                .collect();
            seen.writes.lock().push(Write {
                kind,
                topic,
                marked,
                from_handler,
                results,
            });
            result
        })
    }
}

macro_rules! probe_handler {
    ($req:ty, $headers:ident) => {
        impl<S> Service<$req> for ProbeService<S>
        where
            S: Service<$req, Response = (), Error = HandleError>,
            S::Future: Send + 'static,
        {
            type Response = ();
            type Error = HandleError;
            type Future = BoxFuture<'static, Result<(), HandleError>>;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
                self.inner.poll_ready(cx)
            }

            fn call(&mut self, mut req: $req) -> Self::Future {
                if self.probe.outer {
                    req.extensions.insert(Outer);
                } else {
                    self.probe.seen.calls.lock().push(Call {
                        topic: req.topic.to_string(),
                        header: $headers(&req).get(LAYER_HEADER).map(str::to_owned),
                        marked: req.extensions.get::<Outer>().is_some(),
                    });
                    req.extensions.insert(FromHandlerLayer);
                }
                Box::pin(self.inner.call(req))
            }
        }
    };
}

fn event_headers(e: &Event) -> &crate::headers::Headers {
    &e.envelope.headers
}

fn message_headers(m: &Message) -> &crate::headers::Headers {
    &m.headers
}

probe_handler!(Event, event_headers);
probe_handler!(Message, message_headers);

/// A layer for any request type that logs `name:Request` (the request type's last path
/// segment, e.g. `a:PublishRequest`, `a:Event`) on every call: shows where a layer sits
/// and what it sees.
#[derive(Clone, Debug)]
pub struct Tag {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

impl Tag {
    /// A layer logging as `name` into `log`.
    pub fn new(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Self {
        Self {
            name,
            log: log.clone(),
        }
    }
}

impl<S> Layer<S> for Tag {
    type Service = TagService<S>;
    fn layer(&self, inner: S) -> TagService<S> {
        TagService {
            inner,
            tag: self.clone(),
        }
    }
}

/// The service of [`Tag`].
#[derive(Clone, Debug)]
pub struct TagService<S> {
    inner: S,
    tag: Tag,
}

impl<S: Service<R>, R> Service<R> for TagService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        let ty = std::any::type_name::<R>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        self.tag.log.lock().push(format!("{}:{ty}", self.tag.name));
        self.inner.call(req)
    }
}

/// Domain bus: an event, a batch of three, an append (or its refusal where the backend
/// does not declare appends) and a dead letter each pass the recording layer once, as
/// their kind, with one result per message; its header reaches the handler and the dead
/// letter; its extensions reach the inner layers and the handler.
pub async fn domain_writes(backend: &dyn Backend) {
    let seen = Arc::new(Seen::default());
    let (outer, inner) = Probe::pair(&seen);
    let bus = bus_with(backend, |b| {
        b.retry(super::domain::fast_retry(1))
            .layer(outer)
            .layer(inner)
    })
    .await;
    let topic = unique_topic("pipeline-domain");
    let checker = OrderChecker::new();
    let handler_saw: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let h = handler_saw.clone();
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(move |e: Event| {
                h.lock().push((
                    e.aggregate_id.clone(),
                    e.extensions.get::<FromHandlerLayer>().is_some(),
                ));
                async move {
                    if e.aggregate_id == "dead" {
                        Err(HandleError::permanent(crate::Failure("refused".into())))
                    } else {
                        Ok(())
                    }
                }
            }),
        ))
        .await
        .expect("subscribe");

    bus.publish(&topic, &event("single", 1))
        .await
        .expect("publish");
    checker.published("single", 1);
    let batch = [event("batch", 1), event("batch", 2), event("dead", 1)];
    for r in bus.publish_batch(&topic, &batch).await.expect("batch") {
        r.expect("batch entry");
    }
    checker.published("batch", 1);
    checker.published("batch", 2);
    checker.published("dead", 1);
    let appends = bus.capabilities().expected_version;
    let appended = bus.append(&topic, &event("append", 1), 0).await;
    if appends {
        appended.expect("append");
        checker.published("append", 1);
    } else {
        assert_eq!(
            appended.expect_err("not declared").kind(),
            ErrorKind::NotSupported
        );
    }
    let handled = if appends { 5 } else { 4 };
    wait_for(|| checker.distinct_ends() == handled).await;
    let summary = finish(backend, &bus, &topic, SOURCE, &checker).await;
    assert_eq!(summary.dead_lettered, 1);

    let event_writes = seen.of(PublishKind::Event);
    assert_eq!(event_writes.len(), 1, "{event_writes:?}");
    assert_eq!(event_writes[0].results, vec![Ok(())]);
    let batches = seen.of(PublishKind::Batch);
    assert_eq!(batches.len(), 1, "one request for the batch: {batches:?}");
    assert_eq!(batches[0].results, vec![Ok(()); 3], "per-message results");
    let append_writes = seen.of(PublishKind::Append);
    assert_eq!(append_writes.len(), 1, "{append_writes:?}");
    let want = if appends {
        Ok(())
    } else {
        Err(ErrorKind::NotSupported)
    };
    assert_eq!(append_writes[0].results, vec![want]);
    let dead = seen.of(PublishKind::DeadLetter);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].topic, format!("{topic}.dlq"));
    assert_eq!(dead[0].results, vec![Ok(())]);
    for w in seen.writes.lock().iter() {
        assert!(
            w.marked,
            "the outer layer's extension reached the inner one: {w:?}"
        );
        assert!(w.topic.starts_with(topic.as_str()), "{w:?}");
    }

    // The header the layer wrote reached every handler call, naming how it was written.
    let mut by_kind: HashMap<String, usize> = HashMap::new();
    for c in seen.calls.lock().iter() {
        assert!(
            c.marked,
            "handler-side extensions pass between layers: {c:?}"
        );
        *by_kind
            .entry(c.header.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let mut want: HashMap<String, usize> =
        HashMap::from([("event".to_owned(), 1), ("batch".to_owned(), 3)]);
    if appends {
        want.insert("append".to_owned(), 1);
    }
    assert_eq!(by_kind, want);
    let saw = handler_saw.lock().clone();
    assert_eq!(saw.len(), handled);
    assert!(
        saw.iter().all(|(_, ext)| *ext),
        "the layer's extension reached the handler: {saw:?}"
    );

    let records = read_raw(bus.transport(), &format!("{topic}.dlq"), 1).await;
    let h = |n| records[0].headers.get(n);
    assert_eq!(h(LAYER_HEADER), Some("dead_letter"), "{:?}", records[0]);
    assert_eq!(h(dlq_headers::KIND), Some("permanent"));
    drop(sub);
    bus.close().await.expect("close");
}

/// Simple bus: a message, a request and its reply each pass the recording layer once, as
/// their kind; the header reaches the subscriber and the requester; the reply carries the
/// extensions the handler layer left for the serving handler. Without request-reply the
/// request is refused after passing the layer.
pub async fn simple_writes(backend: &dyn Backend) {
    let seen = Arc::new(Seen::default());
    let (outer, inner) = Probe::pair(&seen);
    let t = backend.simple().await.expect("connect simple transport");
    let bus = SimpleBusBuilder::from_dyn(t)
        .layer(outer)
        .layer(inner)
        .build()
        .expect("build simple bus");
    let topic = unique_topic("pipeline-simple");
    let got: Arc<Mutex<Vec<Message>>> = Arc::default();
    let g = got.clone();
    let _sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |m: Message| {
            let g = g.clone();
            async move {
                g.lock().push(m);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    // Published until one arrives (the subscription may need a moment on a network broker).
    while got.lock().is_empty() {
        bus.publish(&topic, "hello").await.expect("publish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = got.lock()[0].clone();
    assert_eq!(m.headers.get(LAYER_HEADER), Some("message"));
    assert!(
        m.extensions.get::<FromHandlerLayer>().is_some(),
        "the handler layer's extension reached the handler"
    );
    let messages = seen.of(PublishKind::Message);
    assert!(!messages.is_empty());
    assert!(
        messages
            .iter()
            .all(|w| w.marked && w.results == vec![Ok(())] && w.topic == topic.as_str())
    );

    let rr = unique_topic("pipeline-rr");
    if bus.capabilities().request_reply {
        let _server = bus
            .serve(
                &rr,
                None,
                handler_fn(|m: Message| async move {
                    let reply: &'static [u8] = if m.extensions.get::<FromHandlerLayer>().is_some() {
                        b"pong"
                    } else {
                        b"no extension from the handler layer"
                    };
                    Ok::<_, HandleError>(Bytes::from_static(reply))
                }),
            )
            .await
            .expect("serve");
        let reply = loop {
            match bus.request(&rr, "ping", Duration::from_secs(2)).await {
                Ok(reply) => break reply,
                Err(e) if matches!(e.kind(), ErrorKind::NoResponders | ErrorKind::Timeout) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("request failed: {e}"),
            }
        };
        assert_eq!(reply.payload, Bytes::from_static(b"pong"));
        assert_eq!(reply.headers.get(LAYER_HEADER), Some("reply"));
        let requests = seen.of(PublishKind::Request);
        assert_eq!(
            requests.last().map(|w| w.results.clone()),
            Some(vec![Ok(())])
        );
        assert!(requests.iter().all(|w| w.topic == rr.as_str() && w.marked));
        let replies = seen.of(PublishKind::Reply);
        assert!(!replies.is_empty());
        for w in &replies {
            assert!(
                w.from_handler,
                "the reply carries the handler's extensions: {w:?}"
            );
            assert!(w.marked);
            assert_ne!(
                w.topic,
                rr.as_str(),
                "a reply goes to the requester's inbox"
            );
        }
        let calls = seen.calls.lock().clone();
        assert!(
            calls
                .iter()
                .any(|c| c.topic == rr.as_str() && c.header.as_deref() == Some("request"))
        );
    } else {
        let e = bus
            .request(&rr, "ping", Duration::from_millis(100))
            .await
            .expect_err("request-reply is not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
    }
    bus.close().await.expect("close");
}
