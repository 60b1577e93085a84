//! The simple-message transport on core NATS: at-most-once fan-out, queue groups and
//! request-reply.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::{
    Error, Message, Result, SimpleCapabilities, SimpleOutbound, SimpleTransport, Topic,
};
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::config::connect_client;
use crate::{BACKEND, NatsConfig, headers, unavailable};

/// A core-NATS client: the simple-message transport.
///
/// Clones share the connection; `close` closes it for every clone.
#[derive(Clone)]
pub struct Nats {
    client: async_nats::Client,
    caps: Arc<SimpleCapabilities>,
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

impl Nats {
    /// Connects to the servers. An unreachable server is [`Error::Unavailable`] after the
    /// connect timeout.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let client = connect_client(&config).await?;
        let mut caps = SimpleCapabilities::new(BACKEND);
        caps.queue_groups = true;
        caps.request_reply = true;
        caps.max_payload = client.server_info().max_payload;
        caps.wire = headers::WIRE;
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

fn from_nats(message: async_nats::Message) -> Message {
    let mut m = Message::new(message.subject.as_str(), message.payload)
        .with_headers(headers::from_nats(message.headers.as_ref()));
    m.reply_to = message.reply.map(|r| r.to_string());
    m
}

#[async_trait]
impl SimpleTransport for Nats {
    fn capabilities(&self) -> &SimpleCapabilities {
        &self.caps
    }

    async fn publish(&self, message: SimpleOutbound) -> Result<()> {
        self.check_open()?;
        let headers = headers::to_nats(message.headers());
        let message = message.into_message();
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
        topic: &Topic,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>> {
        self.check_open()?;
        let subject = topic.as_str().to_owned();
        let subscriber = match queue_group {
            Some(q) => self.client.queue_subscribe(subject, q.to_owned()).await,
            None => self.client.subscribe(subject).await,
        }
        .map_err(unavailable)?;
        // The server must know the subscription before this returns, or a publish right
        // after it could miss it.
        self.client.flush().await.map_err(unavailable)?;
        Ok(subscriber.map(from_nats).boxed())
    }

    async fn request(&self, message: SimpleOutbound, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let headers = headers::to_nats(message.headers());
        let message = message.into_message();
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
