//! One layer that sees every write of both buses, in-process (no server needed).
//!
//! Every write either bus makes to its broker (a domain event, a batch, an append, a dead
//! letter written by the keyed pool; a simple publish, a request and its reply) passes the
//! publish pipeline. This example adds one `tower` layer to both buses that
//!
//! - stamps every message with an `x-written-by` header (the handlers see it),
//! - counts writes and messages per kind, and failures, with the time each write took,
//! - leaves the write's start time in the request's extensions, where a layer inside it
//!   (here a second, tiny one) finds it.
//!
//! Run with `cargo run --example write_audit`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use dualbus::{
    Backoff, Buses, Envelope, Error, Event, Failure, HandleError, Message, PublishKind,
    PublishRequest, PublishResponse, handler_fn,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tower::{Layer, Service};

/// Of one kind of write: writes, messages, failed messages, and the writes' total time.
#[derive(Default, Clone, Copy)]
struct Tally {
    writes: u64,
    messages: u64,
    failed: u64,
    time: Duration,
}

#[derive(Default)]
struct Audit {
    per_kind: Mutex<BTreeMap<&'static str, Tally>>,
}

/// The outer layer: stamps, times and counts every write.
#[derive(Clone)]
struct AuditLayer(Arc<Audit>);

impl<S> Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> AuditService<S> {
        AuditService {
            inner,
            audit: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct AuditService<S> {
    inner: S,
    audit: Arc<Audit>,
}

/// When the write entered the pipeline: left in the extensions for the layers inside.
#[derive(Clone, Copy)]
struct Started(Instant);

impl<S> Service<PublishRequest> for AuditService<S>
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
        let kind = req.kind();
        let messages = req.len();
        let started = Instant::now();
        req.extensions.insert(Started(started));
        req.for_each_message(|_, headers| headers.insert("x-written-by", "write_audit"));
        let audit = self.audit.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let failed = (0..messages)
                .filter(|&i| !matches!(PublishResponse::outcome(&result, i), Some(Ok(_))))
                .count();
            let mut per_kind = audit.per_kind.lock();
            let entry = per_kind.entry(kind.as_str()).or_default();
            entry.writes += 1;
            entry.messages += messages as u64;
            entry.failed += failed as u64;
            entry.time += started.elapsed();
            result
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let audit = Arc::new(Audit::default());
    let saw_start = Arc::new(AtomicU64::new(0));
    let inner_saw = saw_start.clone();
    // Nanoseconds from the audit layer to the one inside it, over all writes.
    let from_outer = Arc::new(AtomicU64::new(0));
    let between = from_outer.clone();
    let buses = Buses::builder()
        .source("audited")
        .retry(Backoff::new(
            2,
            Duration::from_millis(10),
            Duration::from_millis(20),
        ))
        .publish_layer(AuditLayer(audit.clone()))
        // A layer inside the audit layer: it finds what the audit layer left for it.
        .publish_layer(tower::util::MapRequestLayer::new(
            move |req: PublishRequest| {
                if let Some(Started(at)) = req.extensions.get::<Started>() {
                    inner_saw.fetch_add(1, Ordering::Relaxed);
                    between.fetch_add(at.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                req
            },
        ))
        .build()?;
    let stamped = Arc::new(Mutex::new(0u64));

    // Domain events: the handler refuses order-3, which the pool dead-letters.
    let s = stamped.clone();
    let orders = buses
        .domain()
        .subscribe("orders")
        .start(handler_fn(move |e: Event| {
            if e.headers.get("x-written-by").is_some() {
                *s.lock() += 1;
            }
            async move {
                if e.aggregate_id == "order-3" {
                    return Err(HandleError::permanent(Failure("no such customer".into())));
                }
                Ok(())
            }
        }))
        .await?;
    let created = |id: &str| Envelope::new(id, "OrderCreated", 1, r#"{"total":42}"#);
    buses
        .domain()
        .publish("orders", &created("order-1")?)
        .await?;
    let batch = [created("order-2")?, created("order-3")?];
    for r in buses.domain().publish_batch("orders", &batch).await? {
        r?;
    }
    buses
        .domain()
        .append(
            "orders",
            &Envelope::new("order-1", "OrderPaid", 2, "{}")?,
            1,
        )
        .await?;

    // Simple messages: a publish, and a request with its reply.
    let s = stamped.clone();
    let notes = buses
        .simple()
        .subscribe("notes")
        .start(handler_fn(move |m: Message| {
            if m.headers.get("x-written-by").is_some() {
                *s.lock() += 1;
            }
            async { Ok::<_, HandleError>(()) }
        }))
        .await?;
    let _prices = buses
        .simple()
        .serve(
            "prices",
            None,
            handler_fn(|_m: Message| async { Ok::<_, HandleError>(Bytes::from_static(b"42")) }),
        )
        .await?;
    buses.simple().publish("notes", "order-1 created").await?;
    let price = buses
        .simple()
        .request("prices", "order-1", Duration::from_secs(1))
        .await?;

    // Wait for the four events (one dead-lettered) and the note.
    let deadline = Instant::now() + Duration::from_secs(10);
    while orders.stats().acked < 4 || notes.stats().handled < 1 {
        if Instant::now() > deadline {
            bail!(
                "not everything arrived: {:?} {:?}",
                orders.stats(),
                notes.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    println!("the reply to the price request: {:?}", price.payload);
    println!(
        "handlers saw the layer's header on {} of 5 messages",
        stamped.lock()
    );
    println!(
        "the inner layer found the outer one's start time on {} writes ({:?} between them in all)",
        saw_start.load(Ordering::Relaxed),
        Duration::from_nanos(from_outer.load(Ordering::Relaxed))
    );
    println!(
        "\n{:<12} {:>7} {:>9} {:>7} {:>12}",
        "write", "writes", "messages", "failed", "total time"
    );
    for kind in [
        PublishKind::Event,
        PublishKind::Batch,
        PublishKind::Append,
        PublishKind::DeadLetter,
        PublishKind::Message,
        PublishKind::Request,
        PublishKind::Reply,
    ] {
        let per_kind = audit.per_kind.lock();
        let t = per_kind.get(kind.as_str()).copied().unwrap_or_default();
        println!(
            "{:<12} {:>7} {:>9} {:>7} {:>12.1?}",
            kind.as_str(),
            t.writes,
            t.messages,
            t.failed,
            t.time
        );
    }
    drop((orders, notes));
    buses.close().await?;
    Ok(())
}
