//! Building a [`DomainBus`]: transport, source, codec, pool and retry defaults, dead letters,
//! publish and handler layers (hooks among them).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use parking_lot::Mutex;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::handler::Event;
use crate::middleware::{Hook, HookLayer};
use crate::pipeline::domain::DomainSink;
use crate::pipeline::{HandlerLayer, Layers, Pipeline, PublishLayer};
use crate::pool::{DeadLetterPolicy, PoolConfig};
use crate::retry::Backoff;
use crate::topic::{group_from_source, validate_group};
use crate::transport::{DomainTransport, DynDomainTransport};

use super::{DomainBus, Inner};

/// The source (service name) of a bus that sets none.
pub const DEFAULT_SOURCE: &str = "dualbus";

/// Builds a [`DomainBus`].
#[must_use]
pub struct DomainBusBuilder {
    transport: DynDomainTransport,
    source: String,
    codec: Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    layers: Layers<Event>,
    handler_timeout: Option<Duration>,
    default_group: Option<String>,
}

impl fmt::Debug for DomainBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainBusBuilder")
            .field("backend", &self.transport.capabilities().backend)
            .field("source", &self.source)
            .field("codec", &self.codec)
            .field("pool", &self.pool)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl DomainBusBuilder {
    /// Defaults: source `dualbus`, CloudEvents codec, default pool, retry and dead letter.
    pub fn new(transport: impl DomainTransport) -> Self {
        Self::from_dyn(Arc::new(transport))
    }

    /// Same, from a shared transport.
    pub fn from_dyn(transport: DynDomainTransport) -> Self {
        Self {
            transport,
            source: DEFAULT_SOURCE.to_owned(),
            codec: Codec::CloudEvents,
            pool: PoolConfig::default(),
            retry: Backoff::default(),
            dead_letter: DeadLetterPolicy::default(),
            layers: Layers::default(),
            handler_timeout: None,
            default_group: None,
        }
    }

    /// The service name: CloudEvents `source` of published events and the default group of
    /// subscriptions (mapped to a valid group name if it is not one, see
    /// [`default_group`](Self::default_group)).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The consumer group of subscriptions that do not name one. Default: the source if it
    /// is a valid group name, else the source mapped to one by
    /// [`group_from_source`](crate::group_from_source) (`/orders/eu` gives `_orders_eu`).
    /// [`build`](Self::build) refuses a name that is not a valid group name (see
    /// [`validate_group`](crate::validate_group)) with [`Error::Config`] naming
    /// `domain.group.name`.
    pub fn default_group(mut self, group: impl Into<String>) -> Self {
        self.default_group = Some(group.into());
        self
    }

    /// The codec publishers write (consumers read both).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Pool limits of subscriptions (each subscription may override them).
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Retry policy of handlers.
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }

    /// Dead-letter naming.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = policy;
        self
    }

    /// Adds a hook around every write (one call per message) and every handler attempt:
    /// a [`HookLayer`] added as a publish layer and as a handler layer, in this place of
    /// their orders.
    pub fn hook(self, hook: Arc<dyn Hook>) -> Self {
        self.layer(HookLayer::new([hook]))
    }

    /// Cuts off each handler attempt after `after` (a retryable failure). The timeout wraps
    /// the handler alone, inside every handler layer, so that they see its error.
    pub fn handler_timeout(mut self, after: Duration) -> Self {
        self.handler_timeout = Some(after);
        self
    }

    /// Adds a layer around each handler attempt. The first layer added is outermost (it
    /// sees the event first and the outcome last), as in [`tower::ServiceBuilder`].
    pub fn handler_layer(mut self, layer: impl HandlerLayer<Event>) -> Self {
        self.layers.add_handler(layer);
        self
    }

    /// Adds a layer to the publish pipeline: around every write of this bus (events,
    /// batches, appends and the pool's dead letters; see [`crate::pipeline`]). The first
    /// layer added is outermost. E.g. [`crate::middleware::PublishRetryLayer`].
    pub fn publish_layer(mut self, layer: impl PublishLayer) -> Self {
        self.layers.add_publish(layer);
        self
    }

    /// Adds `layer` both to the publish pipeline and around each handler attempt (a layer
    /// that observes both sides, such as tracing or a [`HookLayer`]).
    pub fn layer<L: PublishLayer + HandlerLayer<Event>>(mut self, layer: L) -> Self {
        self.layers.add_both(layer);
        self
    }

    /// Validates the settings and builds the bus.
    pub fn build(self) -> Result<DomainBus> {
        if self.source.trim().is_empty() {
            return Err(Error::config("domain.source", "must not be empty"));
        }
        self.pool.validate()?;
        self.retry.validate()?;
        let caps = self.transport.capabilities();
        if !caps.durable {
            tracing::warn!(
                backend = caps.backend,
                "the domain bus runs on a non-durable backend: stored events may be lost when the broker (or, on memory, this process) stops"
            );
        }
        let pipeline = Pipeline::new(
            DomainSink::new(self.transport.clone(), self.codec, &self.source),
            &self.layers.publish,
        );
        // The default group: as set (and then a valid group name), or the source mapped to
        // one (see `group_from_source`).
        let default_group = match self.default_group {
            Some(g) => {
                validate_group("domain.group.name", &g)?;
                g
            }
            None => {
                let g = group_from_source(&self.source);
                if g != self.source {
                    tracing::info!(
                        source = %self.source,
                        group = %g,
                        "the source is not a valid group name: the default group is derived from it (set the group name to choose another)"
                    );
                }
                g
            }
        };
        Ok(DomainBus {
            inner: Arc::new(Inner {
                transport: self.transport,
                default_group,
                source: self.source,
                codec: self.codec,
                pool: self.pool,
                retry: self.retry,
                dead_letter: self.dead_letter,
                handler_layers: self.layers.handler,
                handler_timeout: self.handler_timeout,
                pipeline,
                closed: AtomicBool::new(false),
                pools: Mutex::new(Vec::new()),
            }),
        })
    }
}
