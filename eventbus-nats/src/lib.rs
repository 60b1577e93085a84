//! # dualbus-nats
//!
//! The NATS backend of [dualbus](https://crates.io/crates/dualbus), on `async-nats`.
//!
//! - [`Nats`]: the **simple-message bus on core NATS**: at-most-once fan-out, queue groups
//!   (load sharing), native request-reply with no-responders detection. Topics map to
//!   subjects one to one (`notifications.email` is the subject `notifications.email`);
//!   headers travel as NATS headers.
//! - [`JetStream`]: the **domain-event bus on NATS JetStream**: one stream per topic,
//!   acknowledged and deduplicated publishes (`Nats-Msg-Id` = event id), pipelined batches
//!   that keep each aggregate's order, appends checked against the aggregate's version
//!   (`Nats-Expected-Last-Subject-Sequence`), replay by aggregate, and durable pull
//!   consumers under the keyed pool with one active subscriber per group (a lease) and a
//!   rewind to the ack floor at every takeover and reconnect. See [`jetstream`].
//! - [`subject`] fixes the subject layout (`<topic>.<partition>.<encoded aggregate id>`),
//!   which services in other languages must share.
//!
//! ```no_run
//! # async fn run() -> dualbus_core::Result<()> {
//! use dualbus_core::{DomainBus, Envelope, SimpleBus};
//! use dualbus_nats::{JetStream, Nats, NatsConfig};
//!
//! let config = NatsConfig::new(["nats://127.0.0.1:4222"]);
//! let domain = DomainBus::builder(JetStream::connect(config.clone()).await?)
//!     .source("orders-service")
//!     .build()?;
//! domain
//!     .publish("orders", &Envelope::new("order-1", "OrderPlaced", 1, "{}")?)
//!     .await?;
//! let simple = SimpleBus::builder(Nats::connect(config).await?).build()?;
//! simple.publish("notifications", "hello").await?;
//! # Ok(()) }
//! ```
//!
//! Secrets (token, password, nkey seed) never appear in `Debug` output or logs.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod jetstream;
pub mod subject;

pub use jetstream::{JetStream, JetStreamConfig};

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::{
    Capabilities, Error, Headers, Message, Result, SimpleTransport, validate_topic,
};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;

pub(crate) const BACKEND: &str = "nats";

/// A secret string: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Credentials {
    /// A token.
    pub token: Option<Secret>,
    /// A user name (with `password`).
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<Secret>,
    /// An nkey seed.
    pub nkey: Option<Secret>,
    /// A `.creds` file (JWT and nkey seed).
    pub creds_file: Option<PathBuf>,
}

/// Connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`. Default: that one.
    pub urls: Vec<String>,
    /// The client's name in the server's monitoring. Default `dualbus`.
    pub name: String,
    /// Authentication.
    pub credentials: Credentials,
    /// Require TLS.
    pub tls: bool,
    /// PEM file of the certificate authorities that sign the server's certificate (beside
    /// the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (mutual TLS; with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub tls_key_file: Option<PathBuf>,
    /// How long the first connection may take. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub connect_timeout: Duration,
    /// JetStream settings of the domain bus.
    pub jetstream: JetStreamConfig,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            name: "dualbus".to_owned(),
            credentials: Credentials::default(),
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(5),
            jetstream: JetStreamConfig::default(),
        }
    }
}

impl NatsConfig {
    /// Settings for these server URLs.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Same settings with a client name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Same settings with credentials.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Same settings with other JetStream settings.
    #[must_use]
    pub fn with_jetstream(mut self, jetstream: JetStreamConfig) -> Self {
        self.jetstream = jetstream;
        self
    }

    /// Same settings requiring TLS, with a certificate authority to trust (`None`: the
    /// system's roots only).
    #[must_use]
    pub fn with_tls(mut self, ca_file: Option<PathBuf>) -> Self {
        self.tls = true;
        self.tls_ca_file = ca_file;
        self
    }

    /// Same settings with a client certificate and key (mutual TLS).
    #[must_use]
    pub fn with_client_certificate(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls_cert_file = Some(cert);
        self.tls_key_file = Some(key);
        self
    }

    /// Same settings with another connect timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    async fn options(&self) -> Result<async_nats::ConnectOptions> {
        let c = &self.credentials;
        let mut o = match (&c.token, &c.user, &c.nkey, &c.creds_file) {
            (Some(t), None, None, None) => {
                async_nats::ConnectOptions::with_token(t.expose().to_owned())
            }
            (None, Some(u), None, None) => {
                let p = c
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default();
                async_nats::ConnectOptions::with_user_and_password(u.clone(), p)
            }
            (None, None, Some(seed), None) => {
                async_nats::ConnectOptions::with_nkey(seed.expose().to_owned())
            }
            (None, None, None, Some(path)) => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| Error::config("nats.credentials.creds_file", e.to_string()))?
            }
            (None, None, None, None) => async_nats::ConnectOptions::new(),
            _ => {
                return Err(Error::config(
                    "nats.credentials",
                    "give one of token, user (with password), nkey or creds_file",
                ));
            }
        };
        if self.tls {
            o = o.require_tls(true);
        }
        for (key, file) in [
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                return Err(Error::config(
                    key,
                    format!("{} is not a readable file", f.display()),
                ));
            }
        }
        if let Some(ca) = &self.tls_ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => o = o.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            _ => {
                return Err(Error::config(
                    "nats.tls_cert_file",
                    "give both tls_cert_file and tls_key_file, or neither",
                ));
            }
        }
        Ok(o.name(self.name.clone())
            .connection_timeout(self.connect_timeout))
    }
}

/// A core-NATS client: the simple-message transport.
///
/// Clones share the connection; `close` closes it for every clone.
#[derive(Clone)]
pub struct Nats {
    client: async_nats::Client,
    caps: Arc<Capabilities>,
    closed: Arc<AtomicBool>,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nats")
            .field("state", &self.client.connection_state())
            .field("max_payload", &self.caps.max_payload)
            .finish()
    }
}

/// Connects a client with the connection part of `config`.
pub(crate) async fn connect_client(config: &NatsConfig) -> Result<async_nats::Client> {
    if config.urls.is_empty() {
        return Err(Error::config("nats.urls", "give at least one server URL"));
    }
    let urls: Vec<async_nats::ServerAddr> = config
        .urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::config("nats.urls", format!("{u:?}: {e}")))
        })
        .collect::<Result<_>>()?;
    config
        .options()
        .await?
        .connect(urls)
        .await
        .map_err(unavailable)
}

pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        source: Box::new(e),
    }
}

impl Nats {
    /// Connects to the servers. An unreachable server is [`Error::Unavailable`] after the
    /// connect timeout.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let client = connect_client(&config).await?;
        let mut caps = Capabilities::new(BACKEND);
        caps.queue_groups = true;
        caps.request_reply = true;
        caps.max_payload = client.server_info().max_payload;
        Ok(Self {
            client,
            caps: Arc::new(caps),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The underlying `async-nats` client (for what the bus does not cover).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("nats connection"))
        } else {
            Ok(())
        }
    }
}

/// Our headers as NATS headers; checked first, so that no client call can panic on them.
pub(crate) fn to_nats_headers(headers: &Headers) -> Result<async_nats::HeaderMap> {
    headers.validate()?;
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers.iter() {
        map.insert(name, value);
    }
    Ok(map)
}

fn from_nats(message: async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(h) = &message.headers {
        for (name, values) in h.iter() {
            if let Some(v) = values.last() {
                headers.insert(name.to_string(), v.as_str());
            }
        }
    }
    Message {
        topic: message.subject.to_string(),
        headers,
        payload: message.payload,
        reply_to: message.reply.map(|r| r.to_string()),
    }
}

#[async_trait]
impl SimpleTransport for Nats {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn publish(&self, message: Message) -> Result<()> {
        self.check_open()?;
        validate_topic(&message.topic)?;
        let headers = to_nats_headers(&message.headers)?;
        let size = message.payload.len() + message.headers.encoded_len();
        if size > self.caps.max_payload {
            return Err(Error::PayloadTooLarge {
                size,
                max: self.caps.max_payload,
            });
        }
        let result = match message.reply_to {
            Some(reply) => {
                self.client
                    .publish_with_reply_and_headers(message.topic, reply, headers, message.payload)
                    .await
            }
            None => {
                self.client
                    .publish_with_headers(message.topic, headers, message.payload)
                    .await
            }
        };
        result.map_err(unavailable)
    }

    async fn subscribe(
        &self,
        topic: &str,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>> {
        self.check_open()?;
        validate_topic(topic)?;
        let subscriber = match queue_group {
            Some(q) => {
                self.client
                    .queue_subscribe(topic.to_owned(), q.to_owned())
                    .await
            }
            None => self.client.subscribe(topic.to_owned()).await,
        }
        .map_err(unavailable)?;
        // The server must know the subscription before this returns, or a publish right
        // after it could miss it.
        self.client.flush().await.map_err(unavailable)?;
        Ok(subscriber.map(from_nats).boxed())
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        validate_topic(&message.topic)?;
        let headers = to_nats_headers(&message.headers)?;
        let topic = message.topic.clone();
        let request = async_nats::Request::new()
            .payload(message.payload)
            .headers(headers)
            .timeout(Some(timeout));
        match self.client.send_request(message.topic, request).await {
            Ok(reply) => Ok(from_nats(reply)),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::NoResponders { topic },
                async_nats::RequestErrorKind::TimedOut => Error::Timeout {
                    operation: "request",
                    after: timeout,
                },
                _ => unavailable(e),
            }),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Drain: pending publishes are flushed and subscriptions end.
        self.client.drain().await.map_err(unavailable)
    }
}
