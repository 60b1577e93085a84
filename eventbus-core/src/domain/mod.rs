//! The domain-event bus: envelopes, persisted, ordered per aggregate, at-least-once.
//!
//! Files: this one holds the bus (publish, batches, appends, replay, close) and the publish
//! pipeline's request type; `builder.rs` builds a bus; `subscribe.rs` opens subscriptions
//! (the handler stack and the keyed pool) and is the running subscription.

mod builder;
mod subscribe;

pub use builder::DomainBusBuilder;
pub use subscribe::{DomainSubscribeBuilder, Subscription};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tower::Service;

use crate::codec::Codec;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::handler::BoxEventHandler;
use crate::message::{EncodedMessage, OutboundMessage, Receipt};
use crate::middleware::{BusKind, Hook, PublishInfo};
use crate::middleware::{finish_publish, publish_scopes};
use crate::pool::{DeadLetterPolicy, Pool, PoolConfig};
use crate::retry::Backoff;
use crate::topic::{IntoTopic, Topic};
use crate::transport::{
    DomainCapabilities, DomainTransport, DynDomainTransport, StartPosition, Write,
};

/// A request to publish one encoded message: what publish layers see.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublishRequest {
    /// The topic.
    pub topic: Topic,
    /// The encoded message, checked for the backend.
    pub message: OutboundMessage,
}

/// The boxed publish pipeline (layers over the transport's publish).
pub type BoxPublishService = tower::util::BoxCloneSyncService<PublishRequest, Receipt, Error>;

type HandlerLayerFn = Arc<dyn Fn(BoxEventHandler) -> BoxEventHandler + Send + Sync>;
type PublishLayerFn = Arc<dyn Fn(BoxPublishService) -> BoxPublishService + Send + Sync>;

/// The transport's publish as a service.
#[derive(Clone)]
struct TransportPublish(DynDomainTransport);

impl Service<PublishRequest> for TransportPublish {
    type Response = Receipt;
    type Error = Error;
    type Future = futures::future::BoxFuture<'static, Result<Receipt>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let t = self.0.clone();
        Box::pin(async move { t.publish(&req.topic, req.message).await })
    }
}

struct Inner {
    transport: DynDomainTransport,
    source: String,
    default_group: String,
    codec: Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    hooks: Arc<[Arc<dyn Hook>]>,
    handler_layers: Vec<HandlerLayerFn>,
    handler_timeout: Option<Duration>,
    publish: Option<BoxPublishService>,
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

    fn encode(&self, envelope: &Envelope) -> Result<EncodedMessage> {
        let caps = self.capabilities();
        let message = self
            .inner
            .codec
            .encode(envelope, caps.header_style, &self.inner.source)?;
        if self.inner.codec.is_jxt() && !crate::codec::jxt_compatible_id(&envelope.aggregate_id) {
            tracing::warn!(
                aggregate_id = %envelope.aggregate_id,
                "aggregate id outside jxt-core's [A-Za-z0-9:_./-]{{1,256}}: jxt-core consumers will reject it"
            );
        }
        Ok(message)
    }

    /// Encodes, runs the publish hooks and checks the result for the backend: everything
    /// before the broker.
    fn prepare(
        &self,
        topic: &Topic,
        envelope: &Envelope,
        write: Write,
    ) -> Result<(
        OutboundMessage,
        Vec<Box<dyn crate::middleware::PublishScope>>,
    )> {
        let mut message = self.encode(envelope)?;
        let caps = self.capabilities();
        let info = PublishInfo {
            bus: BusKind::Domain,
            backend: caps.backend,
            topic,
            key: Some(&envelope.aggregate_id),
            event_type: Some(&envelope.event_type),
            payload_len: message.payload.len(),
        };
        let scopes = publish_scopes(&self.inner.hooks, &info, &mut message.headers);
        let message = if scopes.is_empty() {
            // Only the codec wrote headers.
            OutboundMessage::with_valid_headers(message, caps, write)?
        } else {
            OutboundMessage::new(message, caps, write)?
        };
        Ok((message, scopes))
    }

    /// Publishes one event to `topic`; resolves when the broker accepted it.
    ///
    /// Errors: [`Error::InvalidTopic`], [`Error::InvalidEnvelope`], [`Error::PayloadTooLarge`]
    /// and [`Error::Closed`] before anything is sent; the backend's errors after.
    pub async fn publish(&self, topic: impl IntoTopic, envelope: &Envelope) -> Result<Receipt> {
        self.check_open()?;
        let topic = topic.into_topic()?;
        let (message, scopes) = self.prepare(&topic, envelope, Write::Publish)?;
        let result = match &self.inner.publish {
            None => self.inner.transport.publish(&topic, message).await,
            Some(publish) => {
                let req = PublishRequest {
                    topic: topic.clone(),
                    message,
                };
                crate::handler::call_once(publish, req).await
            }
        };
        finish_publish(scopes, result.as_ref());
        result
    }

    /// Publishes many events, pipelined where the backend can, keeping each aggregate's
    /// events in the given order. Every envelope is validated before anything is sent.
    ///
    /// One result per envelope. If one fails, later events of the same aggregate in the
    /// batch may still have been stored: republish an aggregate's events from its first
    /// failure (backends with [`DomainCapabilities::dedup`] drop the copies).
    ///
    /// Hooks run for every envelope; publish layers wrap single publishes only (the batch
    /// goes to the transport's pipelined batch publish as a whole).
    pub async fn publish_batch(
        &self,
        topic: impl IntoTopic,
        envelopes: &[Envelope],
    ) -> Result<Vec<Result<Receipt>>> {
        self.check_open()?;
        let topic = &topic.into_topic()?;
        let mut messages = Vec::with_capacity(envelopes.len());
        let mut scopes = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let (message, s) = self.prepare(topic, envelope, Write::Publish)?;
            scopes.push(s);
            messages.push(message);
        }
        let results = self.inner.transport.publish_batch(topic, messages).await;
        for (s, r) in scopes.into_iter().zip(&results) {
            finish_publish(s, r.as_ref());
        }
        Ok(results)
    }

    /// Appends `envelope` to its aggregate's history only if the aggregate is at
    /// `expected_version` (0: no event yet): optimistic concurrency for event sourcing.
    ///
    /// The envelope must carry `expected_version + 1`. The check and the publish are atomic
    /// on the broker: of two appends racing on one version, one succeeds and the other gets
    /// [`Error::Conflict`] naming the aggregate and its current version. Needs
    /// [`DomainCapabilities::expected_version`].
    pub async fn append(
        &self,
        topic: impl IntoTopic,
        envelope: &Envelope,
        expected_version: u64,
    ) -> Result<Receipt> {
        self.check_open()?;
        let topic = &topic.into_topic()?;
        let caps = self.capabilities();
        if !caps.expected_version {
            return Err(Error::NotSupported {
                operation: "append with an expected version",
                backend: caps.backend,
            });
        }
        if envelope.event_version != expected_version + 1 {
            return Err(crate::envelope::EnvelopeError::Header {
                name: "event_version".to_owned(),
                reason: "an append must carry the expected version + 1",
            }
            .into());
        }
        let (message, scopes) = self.prepare(topic, envelope, Write::Append)?;
        let last = self
            .inner
            .transport
            .last_for_key(topic, &envelope.aggregate_id)
            .await?;
        let (current, position) = match &last {
            None => (0, None),
            Some(m) => (Codec::decode(m)?.event_version, Some(m.position)),
        };
        if current != expected_version {
            return Err(Error::Conflict(format!(
                "aggregate {:?} is at version {current}, not {expected_version}",
                envelope.aggregate_id
            )));
        }
        let result = self
            .inner
            .transport
            .publish_if_last(topic, message, position)
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::Conflict(format!(
                    "aggregate {:?} moved past version {expected_version} while appending",
                    envelope.aggregate_id
                )),
                other => other,
            });
        finish_publish(scopes, result.as_ref());
        result
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
            .map(|m| Codec::decode(m).map_err(Error::from))
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
