//! One builder wiring the domain-event bus and the simple-message bus.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::middleware::{Hook, HookLayer};
use dualbus_core::{
    Backoff, Codec, DeadLetterPolicy, DomainBus, DomainBusBuilder, DomainTransport,
    DynDomainTransport, DynSimpleTransport, Event, HandlerLayer, Message, PoolConfig, PublishLayer,
    Result, SimpleBus, SimpleBusBuilder, SimpleTransport,
};

/// The two buses of a service: [`Buses::domain`] for domain events, [`Buses::simple`] for
/// simple messages. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Buses {
    domain: DomainBus,
    simple: SimpleBus,
    #[cfg(feature = "otel")]
    telemetry: Option<Arc<dualbus_otel::Telemetry>>,
}

impl Buses {
    /// A builder; with the `memory` feature, unset buses default to one shared in-process
    /// broker.
    pub fn builder() -> BusesBuilder {
        BusesBuilder::default()
    }

    /// The domain-event bus (envelopes, persisted, ordered per aggregate, at-least-once).
    pub fn domain(&self) -> &DomainBus {
        &self.domain
    }

    /// The simple-message bus (raw payloads, at-most-once, concurrent).
    pub fn simple(&self) -> &SimpleBus {
        &self.simple
    }

    /// The OpenTelemetry SDK set up by [`Buses::from_config`] (an `otel` section with
    /// `install: true`), if any.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn telemetry(&self) -> Option<&dualbus_otel::Telemetry> {
        self.telemetry.as_deref()
    }

    /// Drains the subscriptions of both buses and closes their transports. Idempotent.
    /// Telemetry set up by [`Buses::from_config`] exports what it still holds.
    pub async fn close(&self) -> Result<()> {
        let domain = self.domain.close().await;
        let simple = self.simple.close().await;
        #[cfg(feature = "otel")]
        if let Some(t) = self.telemetry.clone() {
            let flushed = tokio::task::spawn_blocking(move || t.flush())
                .await
                .map_err(|e| dualbus_core::Error::backend("opentelemetry", false, e))
                .and_then(|r| r);
            if let Err(e) = flushed {
                tracing::warn!(error = %e, "telemetry could not export what it held");
            }
        }
        domain.and(simple)
    }
}

/// Builds [`Buses`].
#[must_use]
#[derive(Default)]
pub struct BusesBuilder {
    domain: Option<DynDomainTransport>,
    simple: Option<DynSimpleTransport>,
    source: Option<String>,
    codec: Codec,
    pool: Option<PoolConfig>,
    retry: Option<Backoff>,
    dead_letter: Option<DeadLetterPolicy>,
    layers: Vec<LayerStep>,
    handler_timeout: Option<Duration>,
    simple_max_concurrency: Option<usize>,
    default_group: Option<String>,
    #[cfg(feature = "otel")]
    telemetry: Option<Arc<dualbus_otel::Telemetry>>,
}

impl fmt::Debug for BusesBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusesBuilder")
            .field(
                "domain",
                &self.domain.as_ref().map(|t| t.capabilities().backend),
            )
            .field(
                "simple",
                &self.simple.as_ref().map(|t| t.capabilities().backend),
            )
            .field("source", &self.source)
            .field("codec", &self.codec)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl BusesBuilder {
    /// The domain backend (NATS JetStream, Kafka, Redis Streams, memory).
    pub fn domain(mut self, transport: impl DomainTransport) -> Self {
        self.domain = Some(Arc::new(transport));
        self
    }

    /// The domain backend, shared.
    pub fn domain_dyn(mut self, transport: DynDomainTransport) -> Self {
        self.domain = Some(transport);
        self
    }

    /// The simple backend (memory, core NATS, Redis pub/sub).
    pub fn simple(mut self, transport: impl SimpleTransport) -> Self {
        self.simple = Some(Arc::new(transport));
        self
    }

    /// The simple backend, shared.
    pub fn simple_dyn(mut self, transport: DynSimpleTransport) -> Self {
        self.simple = Some(transport);
        self
    }

    /// The service name: CloudEvents `source` and default consumer group (mapped to a valid
    /// group name if it is not one, see [`dualbus_core::group_from_source`]). Default
    /// `dualbus`.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The consumer group of domain subscriptions that do not name one (default: the
    /// source). Must be a valid group name ([`dualbus_core::validate_group`]): `build`
    /// refuses another with an error naming `domain.group.name`.
    pub fn default_group(mut self, group: impl Into<String>) -> Self {
        self.default_group = Some(group.into());
        self
    }

    /// The codec domain publishers write (CloudEvents binary mode by default).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Keyed pool limits of domain subscriptions.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Retry policy of domain handlers.
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Dead-letter naming.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = Some(policy);
        self
    }

    /// A hook on both buses, around every write and every handler call: a [`HookLayer`]
    /// added with [`layer`](Self::layer).
    pub fn hook(self, hook: Arc<dyn Hook>) -> Self {
        self.layer(HookLayer::new([hook]))
    }

    /// A layer in the publish pipeline of both buses: around every write (domain events,
    /// batches, appends, dead letters; simple publishes, requests, replies). Layers keep
    /// the order they were added in, the first outermost. Each bus gets its own clone.
    pub fn publish_layer<L: PublishLayer + Clone>(mut self, layer: L) -> Self {
        self.layers.push(Box::new(move |d, s| {
            (d.publish_layer(layer.clone()), s.publish_layer(layer))
        }));
        self
    }

    /// A layer around every handler call of both buses (domain attempts, simple handlers).
    pub fn handler_layer<L>(mut self, layer: L) -> Self
    where
        L: HandlerLayer<Event> + HandlerLayer<Message> + Clone,
    {
        self.layers.push(Box::new(move |d, s| {
            (d.handler_layer(layer.clone()), s.handler_layer(layer))
        }));
        self
    }

    /// A layer on both sides of both buses: in the publish pipelines and around every
    /// handler call (tracing, metrics, hooks).
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: PublishLayer + HandlerLayer<Event> + HandlerLayer<Message> + Clone,
    {
        self.layers.push(Box::new(move |d, s| {
            (d.layer(layer.clone()), s.layer(layer))
        }));
        self
    }

    /// OpenTelemetry on both buses, in one call: the tracing layer (spans, W3C context in
    /// headers) outermost, then the metrics layer, on every write and handler call.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn otel(self, otel: &dualbus_otel::Otel) -> Self {
        self.layer(otel.tracing()).layer(otel.metrics())
    }

    /// Keeps `telemetry` with the buses: [`Buses::close`] has it export what it holds.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn telemetry(mut self, telemetry: dualbus_otel::Telemetry) -> Self {
        self.telemetry = Some(Arc::new(telemetry));
        self
    }

    /// Cuts off each domain handler attempt after `after` (a retryable failure).
    pub fn handler_timeout(mut self, after: Duration) -> Self {
        self.handler_timeout = Some(after);
        self
    }

    /// Concurrent handler calls per simple subscription.
    pub fn simple_max_concurrency(mut self, n: usize) -> Self {
        self.simple_max_concurrency = Some(n);
        self
    }

    /// Validates and builds both buses.
    pub fn build(self) -> Result<Buses> {
        let (domain_t, simple_t) = self.transports()?;
        let mut domain = DomainBusBuilder::from_dyn(domain_t).codec(self.codec);
        if let Some(s) = self.source {
            domain = domain.source(s);
        }
        if let Some(p) = self.pool {
            domain = domain.pool(p);
        }
        if let Some(r) = self.retry {
            domain = domain.retry(r);
        }
        if let Some(d) = self.dead_letter {
            domain = domain.dead_letter(d);
        }
        if let Some(t) = self.handler_timeout {
            domain = domain.handler_timeout(t);
        }
        if let Some(g) = self.default_group {
            domain = domain.default_group(g);
        }
        let mut simple = SimpleBusBuilder::from_dyn(simple_t);
        if let Some(n) = self.simple_max_concurrency {
            simple = simple.max_concurrency(n);
        }
        for step in self.layers {
            (domain, simple) = step(domain, simple);
        }
        Ok(Buses {
            domain: domain.build()?,
            simple: simple.build()?,
            #[cfg(feature = "otel")]
            telemetry: self.telemetry,
        })
    }

    #[cfg(feature = "memory")]
    fn transports(&self) -> Result<(DynDomainTransport, DynSimpleTransport)> {
        let embedded = dualbus_memory::Memory::new();
        Ok((
            self.domain
                .clone()
                .unwrap_or_else(|| Arc::new(embedded.clone())),
            self.simple.clone().unwrap_or_else(|| Arc::new(embedded)),
        ))
    }

    #[cfg(not(feature = "memory"))]
    fn transports(&self) -> Result<(DynDomainTransport, DynSimpleTransport)> {
        let missing = |which: &str| {
            dualbus_core::Error::config(
                which,
                "no backend given; call .domain(..) / .simple(..) or enable the `memory` feature of dualbus",
            )
        };
        Ok((
            self.domain.clone().ok_or_else(|| missing("domain"))?,
            self.simple.clone().ok_or_else(|| missing("simple"))?,
        ))
    }
}

/// Adds one layer to the two bus builders.
type LayerStep = Box<
    dyn FnOnce(DomainBusBuilder, SimpleBusBuilder) -> (DomainBusBuilder, SimpleBusBuilder) + Send,
>;
