//! The simple bus's sink: the end of its publish pipeline. It checks every message against
//! the backend (after the layers, so what they added is counted) and calls the transport.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower::Service;

use super::{Pipeline, PublishBody, PublishKind, PublishRequest, PublishResponse, SimpleBody};
use crate::error::{Error, Result};
use crate::handler::call_once;
use crate::message::{Message, Receipt, SimpleOutbound};
use crate::topic::Topic;
use crate::transport::{DynSimpleTransport, SimpleCapabilities};

/// Checks simple writes and hands them to the transport. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SimpleSink {
    transport: DynSimpleTransport,
}

impl SimpleSink {
    pub(crate) fn new(transport: DynSimpleTransport) -> Self {
        Self { transport }
    }

    pub(crate) fn caps(&self) -> &SimpleCapabilities {
        self.transport.capabilities()
    }

    /// The transport, for subscriptions and close.
    pub(crate) fn transport(&self) -> &DynSimpleTransport {
        &self.transport
    }

    /// Publishes `message` (a message or a reply); its topic is checked here.
    pub(crate) async fn publish(&self, message: Message) -> Result<()> {
        let message = SimpleOutbound::new(message, self.caps())?;
        self.transport.publish(message).await
    }

    /// Sends a request and waits up to `timeout` for its reply.
    pub(crate) async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        let caps = self.caps();
        if !caps.request_reply {
            return Err(Error::NotSupported {
                operation: "request-reply",
                backend: caps.backend,
            });
        }
        let message = SimpleOutbound::new(message, self.caps())?;
        self.transport.request(message, timeout).await
    }
}

/// The message a simple body makes on `topic`.
fn message(topic: &Topic, body: SimpleBody) -> Message {
    let mut m = Message::new(topic.as_str(), body.payload).with_headers(body.headers);
    m.reply_to = body.reply_to;
    m
}

impl Pipeline<SimpleSink> {
    /// Writes a simple message (`kind` [`PublishKind::Message`] or [`PublishKind::Reply`])
    /// through the layers.
    pub(crate) async fn publish(&self, message: Message, kind: PublishKind) -> Result<()> {
        let Some(layers) = self.layered() else {
            return self.sink.publish(message).await;
        };
        let (topic, body, extensions) = SimpleBody::split(message);
        let body = match kind {
            PublishKind::Reply => PublishBody::Reply(body),
            _ => PublishBody::Message(body),
        };
        let req = PublishRequest::new(Topic::new(topic)?, self.sink.caps().backend, body)
            .with_extensions(extensions);
        call_once(layers, req).await?.into_receipt(kind).map(drop)
    }

    /// Sends a request through the layers and waits up to `timeout` for its reply.
    pub(crate) async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        let Some(layers) = self.layered() else {
            return self.sink.request(message, timeout).await;
        };
        let (topic, body, extensions) = SimpleBody::split(message);
        let req = PublishRequest::new(
            Topic::new(topic)?,
            self.sink.caps().backend,
            PublishBody::Request { body, timeout },
        )
        .with_extensions(extensions);
        call_once(layers, req).await?.into_reply()
    }
}

impl Service<PublishRequest> for SimpleSink {
    type Response = PublishResponse;
    type Error = Error;
    type Future = BoxFuture<'static, Result<PublishResponse>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            let topic = &req.topic;
            match req.body {
                PublishBody::Message(b) | PublishBody::Reply(b) => {
                    sink.publish(message(topic, b)).await?;
                    Ok(PublishResponse::Receipt(Receipt::accepted()))
                }
                PublishBody::Request { body, timeout } => Ok(PublishResponse::Reply(
                    sink.request(message(topic, body), timeout).await?,
                )),
                _ => Err(Error::NotSupported {
                    operation: "a domain write on the simple bus",
                    backend: sink.caps().backend,
                }),
            }
        })
    }
}
