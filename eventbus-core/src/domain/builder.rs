//! Building a [`DomainBus`]: transport, source, codec, pool and retry defaults, dead letters,
//! hooks and layers.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use parking_lot::Mutex;
use tower::Service;

use crate::codec::Codec;
use crate::error::{Error, HandleError, Result};
use crate::handler::{BoxEventHandler, Event};
use crate::message::Receipt;
use crate::middleware::Hook;
use crate::pool::{DeadLetterPolicy, PoolConfig};
use crate::retry::Backoff;
use crate::topic::{group_from_source, validate_group};
use crate::transport::{DomainTransport, DynDomainTransport};

use super::{
    BoxPublishService, DomainBus, HandlerLayerFn, Inner, PublishLayerFn, PublishRequest,
    TransportPublish,
};

/// Builds a [`DomainBus`].
#[must_use]
pub struct DomainBusBuilder {
    transport: DynDomainTransport,
    source: String,
    codec: Codec,
    pool: PoolConfig,
    retry: Backoff,
    dead_letter: DeadLetterPolicy,
    hooks: Vec<Arc<dyn Hook>>,
    handler_layers: Vec<HandlerLayerFn>,
    publish_layers: Vec<PublishLayerFn>,
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
            source: "dualbus".to_owned(),
            codec: Codec::CloudEvents,
            pool: PoolConfig::default(),
            retry: Backoff::default(),
            dead_letter: DeadLetterPolicy::default(),
            hooks: Vec::new(),
            handler_layers: Vec::new(),
            publish_layers: Vec::new(),
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

    /// Adds a hook run around every publish and handler attempt.
    pub fn hook(mut self, hook: Arc<dyn Hook>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Cuts off each handler attempt after `after` (a retryable failure).
    pub fn handler_timeout(mut self, after: Duration) -> Self {
        self.handler_timeout = Some(after);
        self
    }

    /// Adds a layer around each handler attempt (innermost first added).
    pub fn handler_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxEventHandler> + Send + Sync + 'static,
        L::Service:
            Service<Event, Response = (), Error = HandleError> + Clone + Send + Sync + 'static,
        <L::Service as Service<Event>>::Future: Send + 'static,
    {
        self.handler_layers.push(Arc::new(move |inner| {
            BoxEventHandler::new(layer.layer(inner))
        }));
        self
    }

    /// Adds a layer around each publish (e.g. [`crate::middleware::PublishRetryLayer`]).
    pub fn publish_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxPublishService> + Send + Sync + 'static,
        L::Service: Service<PublishRequest, Response = Receipt, Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<PublishRequest>>::Future: Send + 'static,
    {
        self.publish_layers.push(Arc::new(move |inner| {
            BoxPublishService::new(layer.layer(inner))
        }));
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
                "the domain bus runs on a non-durable backend: events live only as long as this process"
            );
        }
        // Without publish layers the transport is called directly (no boxing per publish).
        let publish = (!self.publish_layers.is_empty()).then(|| {
            let mut publish = BoxPublishService::new(TransportPublish(self.transport.clone()));
            for layer in &self.publish_layers {
                publish = layer(publish);
            }
            publish
        });
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
                hooks: self.hooks.into(),
                handler_layers: self.handler_layers,
                handler_timeout: self.handler_timeout,
                publish,
                closed: AtomicBool::new(false),
                pools: Mutex::new(Vec::new()),
            }),
        })
    }
}
