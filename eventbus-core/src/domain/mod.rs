//! The domain-event bus: envelopes, persisted, ordered per aggregate, at-least-once.
//!
//! Files: this one holds the bus (publish, batches, appends, replay, close) and the publish
//! pipeline's request type; `builder.rs` builds a bus; `subscribe.rs` opens subscriptions
//! (the handler stack and the keyed pool) and is the running subscription.

mod builder;
mod subscribe;

pub use builder::{DEFAULT_SOURCE, DomainBusBuilder};
pub use subscribe::{DomainSubscribeBuilder, Subscription, SubscriptionHandle};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::handler::{Event, call_once};
use crate::message::Receipt;
use crate::pipeline::domain::DomainSink;
use crate::pipeline::{HandlerLayer, Pipeline, PublishBody, PublishKind, PublishRequest, Stack};
use crate::pool::{DeadLetterPolicy, Pool, PoolConfig};
use crate::retry::Backoff;
use crate::topic::{IntoTopic, Topic};
use crate::transport::{DomainCapabilities, DomainTransport, DynDomainTransport, StartPosition};

struct Inner {
    transport: DynDomainTransport,
    source: String,
    default_group: String,
    codec: crate::codec::Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    handler_layers: Stack<dyn HandlerLayer<Event>>,
    handler_timeout: Option<Duration>,
    pipeline: Pipeline<DomainSink>,
    closed: AtomicBool,
    pools: Mutex<Vec<std::sync::Weak<Pool>>>,
}

/// The domain-event bus. Cheap to clone; clones share the transport and subscriptions.
#[derive(Clone)]
pub struct DomainBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for DomainBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainBus")
            .field("backend", &self.capabilities().backend)
            .field("source", &self.inner.source)
            .field("codec", &self.inner.codec)
            .finish_non_exhaustive()
    }
}

impl DomainBus {
    /// A builder over `transport`.
    pub fn builder(transport: impl DomainTransport) -> DomainBusBuilder {
        DomainBusBuilder::new(transport)
    }

    /// What the backend offers.
    pub fn capabilities(&self) -> &DomainCapabilities {
        self.inner.transport.capabilities()
    }

    /// The service name (default source and group).
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The underlying transport (for tools and tests that work below the bus).
    pub fn transport(&self) -> &DynDomainTransport {
        &self.inner.transport
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("domain bus"))
        } else {
            Ok(())
        }
    }

    /// A request through the layers for `body` on `topic`.
    fn request(&self, topic: Topic, body: PublishBody) -> PublishRequest {
        PublishRequest::new(topic, self.capabilities().backend, body)
    }

    /// Publishes one event to `topic` through the publish pipeline; resolves when the
    /// broker accepted it.
    ///
    /// Errors: [`Error::InvalidTopic`], [`Error::InvalidEnvelope`], [`Error::PayloadTooLarge`]
    /// and [`Error::Closed`] before anything is sent; the backend's errors after.
    pub async fn publish(&self, topic: impl IntoTopic, envelope: &Envelope) -> Result<Receipt> {
        self.check_open()?;
        let topic = topic.into_topic()?;
        let pipeline = &self.inner.pipeline;
        match pipeline.layered() {
            None => pipeline.sink.publish(&topic, envelope).await,
            Some(layers) => {
                let req = self.request(topic, PublishBody::Event(envelope.clone()));
                call_once(layers, req)
                    .await?
                    .into_receipt(PublishKind::Event)
            }
        }
    }

    /// Publishes many events, pipelined where the backend can, keeping each aggregate's
    /// events in the given order. Every envelope is validated before anything is sent.
    ///
    /// One result per envelope. If one fails, later events of the same aggregate in the
    /// batch may still have been stored: republish an aggregate's events from its first
    /// failure (backends with [`DomainCapabilities::dedup`] drop the copies), which is what
    /// [`PublishRetryLayer`](crate::middleware::PublishRetryLayer) does.
    ///
    /// The batch is one request of the publish pipeline: layers see it whole, with its
    /// per-event results.
    pub async fn publish_batch(
        &self,
        topic: impl IntoTopic,
        envelopes: &[Envelope],
    ) -> Result<Vec<Result<Receipt>>> {
        self.check_open()?;
        let topic = topic.into_topic()?;
        let pipeline = &self.inner.pipeline;
        match pipeline.layered() {
            None => pipeline.sink.publish_batch(&topic, envelopes).await,
            Some(layers) => {
                let req = self.request(topic, PublishBody::Batch(envelopes.to_vec()));
                call_once(layers, req).await?.into_batch(envelopes.len())
            }
        }
    }

    /// Appends `envelope` to its aggregate's history only if the aggregate is at
    /// `expected_version` (0: no event yet): optimistic concurrency for event sourcing.
    ///
    /// The envelope must carry `expected_version + 1`. The check and the publish are atomic
    /// on the broker: of two appends racing on one version, one succeeds and the other gets
    /// [`Error::Conflict`] naming the aggregate and its current version. An append that
    /// finds its own event (same event id and version) already stored, from an earlier try
    /// whose answer was lost, returns that event's receipt marked
    /// [`duplicate`](Receipt::duplicate). Needs [`DomainCapabilities::expected_version`].
    pub async fn append(
        &self,
        topic: impl IntoTopic,
        envelope: &Envelope,
        expected_version: u64,
    ) -> Result<Receipt> {
        self.check_open()?;
        let topic = topic.into_topic()?;
        let pipeline = &self.inner.pipeline;
        match pipeline.layered() {
            None => {
                pipeline
                    .sink
                    .append(&topic, envelope, expected_version)
                    .await
            }
            Some(layers) => {
                let req = self.request(
                    topic,
                    PublishBody::Append {
                        envelope: envelope.clone(),
                        expected_version,
                    },
                );
                call_once(layers, req)
                    .await?
                    .into_receipt(PublishKind::Append)
            }
        }
    }

    /// Starts a subscription to `topic`; see [`DomainSubscribeBuilder`].
    ///
    /// An invalid topic is reported by [`DomainSubscribeBuilder::start`].
    pub fn subscribe(&self, topic: impl IntoTopic) -> DomainSubscribeBuilder {
        DomainSubscribeBuilder {
            bus: self.clone(),
            topic: topic.into_topic(),
            group: None,
            pool: None,
            retry: None,
            start: StartPosition::Earliest,
            observer: None,
            standby: true,
        }
    }

    /// Every stored event of one aggregate on `topic`, in order (event sourcing replay).
    ///
    /// Needs [`DomainCapabilities::replay`]. A stored message that cannot be decoded is an error
    /// naming its position.
    pub async fn replay(&self, topic: impl IntoTopic, aggregate_id: &str) -> Result<Vec<Envelope>> {
        self.check_open()?;
        let topic = &topic.into_topic()?;
        if aggregate_id.trim().is_empty() {
            return Err(crate::envelope::EnvelopeError::Blank {
                field: "aggregate_id",
            }
            .into());
        }
        let raw = self.inner.transport.replay(topic, aggregate_id).await?;
        raw.iter()
            .map(|m| crate::codec::Codec::decode(m).map_err(Error::from))
            .collect()
    }

    /// Shuts down every subscription of this bus (graceful drain), then closes the
    /// transport. Idempotent and safe to call concurrently; afterwards every operation
    /// returns [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let pools: Vec<Arc<Pool>> = self
            .inner
            .pools
            .lock()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for pool in pools {
            pool.shutdown(self.inner.pool.drain_deadline).await;
        }
        self.inner.transport.close().await
    }

    /// Whether [`DomainBus::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}
