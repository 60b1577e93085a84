//! The domain bus's sink: the end of its publish pipeline. It encodes envelopes, checks
//! every message against the backend (after the layers, so what they added is counted),
//! and calls the transport.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use tower::Service;

use super::{DeadLetter, Pipeline, PublishBody, PublishKind, PublishRequest, PublishResponse};
use crate::codec::Codec;
use crate::envelope::{Envelope, EnvelopeError};
use crate::error::{Error, Result};
use crate::handler::call_once;
use crate::headers::Headers;
use crate::message::{EncodedMessage, OutboundMessage, Receipt};
use crate::pool::dlq_headers;
use crate::topic::Topic;
use crate::transport::{DomainCapabilities, DynDomainTransport, Write};

/// Encodes and checks domain writes, then hands them to the transport. Cheap to clone.
#[derive(Clone)]
pub(crate) struct DomainSink {
    transport: DynDomainTransport,
    codec: Codec,
    source: Arc<str>,
}

impl DomainSink {
    pub(crate) fn new(transport: DynDomainTransport, codec: Codec, source: &str) -> Self {
        Self {
            transport,
            codec,
            source: source.into(),
        }
    }

    fn caps(&self) -> &DomainCapabilities {
        self.transport.capabilities()
    }

    /// Encodes `envelope` and checks it for a write of kind `write`: the one place where a
    /// domain event becomes an [`OutboundMessage`].
    fn outbound(&self, envelope: &Envelope, write: Write) -> Result<OutboundMessage> {
        let caps = self.caps();
        let message = self
            .codec
            .encode(envelope, caps.header_style, &self.source)?;
        if self.codec.is_jxt() && !crate::codec::jxt_compatible_id(&envelope.aggregate_id) {
            tracing::warn!(
                aggregate_id = %envelope.aggregate_id,
                "aggregate id outside jxt-core's [A-Za-z0-9:_./-]{{1,256}}: jxt-core consumers will reject it"
            );
        }
        // The codec validated the envelope, its headers included (whoever wrote them), and
        // writes only constant header names besides.
        OutboundMessage::with_valid_headers(message, caps, write)
    }

    pub(crate) async fn publish(&self, topic: &Topic, envelope: &Envelope) -> Result<Receipt> {
        let message = self.outbound(envelope, Write::Publish)?;
        self.transport.publish(topic, message).await
    }

    /// Every envelope is encoded and checked before anything is sent.
    pub(crate) async fn publish_batch(
        &self,
        topic: &Topic,
        envelopes: &[Envelope],
    ) -> Result<Vec<Result<Receipt>>> {
        let messages = envelopes
            .iter()
            .map(|e| self.outbound(e, Write::Publish))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.transport.publish_batch(topic, messages).await)
    }

    /// The version check and the conditional publish (see [`crate::DomainBus::append`]).
    /// An append that finds its own event (by event id) as the aggregate's last one was
    /// stored by an earlier try: its receipt is returned, marked duplicate.
    pub(crate) async fn append(
        &self,
        topic: &Topic,
        envelope: &Envelope,
        expected_version: u64,
    ) -> Result<Receipt> {
        let caps = self.caps();
        if !caps.expected_version {
            return Err(Error::NotSupported {
                operation: "append with an expected version",
                backend: caps.backend,
            });
        }
        if envelope.event_version != expected_version + 1 {
            return Err(EnvelopeError::Header {
                name: "event_version".to_owned(),
                reason: "an append must carry the expected version + 1",
            }
            .into());
        }
        let message = self.outbound(envelope, Write::Append)?;
        let last = self
            .transport
            .last_for_key(topic, &envelope.aggregate_id)
            .await?;
        let (current, position) = match &last {
            None => (0, None),
            Some(m) => {
                let stored = Codec::decode(m)?;
                if stored.event_id == envelope.event_id
                    && stored.event_version == envelope.event_version
                {
                    return Ok(Receipt::at(m.position).as_duplicate());
                }
                (stored.event_version, Some(m.position))
            }
        };
        if current != expected_version {
            return Err(Error::Conflict(format!(
                "aggregate {:?} is at version {current}, not {expected_version}",
                envelope.aggregate_id
            )));
        }
        self.transport
            .publish_if_last(topic, message, position)
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::Conflict(format!(
                    "aggregate {:?} moved past version {expected_version} while appending",
                    envelope.aggregate_id
                )),
                other => other,
            })
    }

    /// Sends the dead-letter record whole, or the first reduced form that fits the broker's
    /// limit (see [`DeadLetter`]); returns what was left out.
    pub(crate) async fn dead_letter(
        &self,
        topic: &Topic,
        dead_letter: &DeadLetter,
    ) -> Result<(Receipt, Option<&'static str>)> {
        let (message, reduced) = self.dead_letter_record(dead_letter)?;
        let receipt = self.transport.publish(topic, message).await?;
        Ok((receipt, reduced))
    }

    fn dead_letter_record(
        &self,
        dl: &DeadLetter,
    ) -> Result<(OutboundMessage, Option<&'static str>)> {
        // Layers may have added any header to the record: checked once here. The original
        // headers passed `validate_header` when the pool took them; the reduction headers
        // are constants with numbers as values.
        dl.record.headers.validate()?;
        if let Some(id) = &dl.record.id {
            crate::headers::validate_header(self.caps().wire.id_header.unwrap_or("id"), id)?;
        }
        let build = |keep_headers: bool, keep_body: bool| {
            let r = &dl.record;
            let mut headers =
                Headers::with_capacity(dl.original_headers.len() + r.headers.len() + 2);
            if keep_headers {
                for (n, v) in dl.original_headers.iter() {
                    if !r.headers.contains(n) {
                        headers.insert(n.to_owned(), v);
                    }
                }
            }
            for (n, v) in r.headers.iter() {
                headers.insert(n.to_owned(), v);
            }
            let reduced = match (keep_headers, keep_body) {
                (true, true) => None,
                (false, true) => Some("headers"),
                (true, false) => Some("body"),
                (false, false) => Some("headers,body"),
            };
            if let Some(what) = reduced {
                headers.insert(dlq_headers::REDUCED, what);
            }
            if !keep_body {
                headers.insert(dlq_headers::ORIGINAL_LENGTH, r.payload.len().to_string());
            }
            let message = EncodedMessage {
                key: r.key.clone(),
                headers,
                payload: if keep_body {
                    r.payload.clone()
                } else {
                    Bytes::new()
                },
                id: r.id.clone(),
            };
            (message, reduced)
        };
        let caps = self.caps();
        let check = |(m, reduced)| {
            OutboundMessage::with_valid_headers(m, caps, Write::Publish).map(|m| (m, reduced))
        };
        // Without original headers, dropping them changes nothing: only the body can go.
        let has_original = !dl.original_headers.is_empty();
        if let Ok(fits) = check(build(true, true)) {
            return Ok(fits);
        }
        if has_original {
            if let Ok(fits) = check(build(false, true)) {
                return Ok(fits);
            }
            if let Ok(fits) = check(build(true, false)) {
                return Ok(fits);
            }
        }
        check(build(!has_original, false))
    }
}

impl Pipeline<DomainSink> {
    /// Writes a dead letter through the layers; returns the receipt and what was left out
    /// of the record.
    pub(crate) async fn dead_letter(
        &self,
        topic: &Topic,
        dead_letter: DeadLetter,
    ) -> Result<(Receipt, Option<&'static str>)> {
        match self.layered() {
            None => self.sink.dead_letter(topic, &dead_letter).await,
            Some(layers) => {
                let req = PublishRequest::new(
                    topic.clone(),
                    self.sink.caps().backend,
                    PublishBody::DeadLetter(dead_letter),
                );
                match call_once(layers, req).await? {
                    PublishResponse::DeadLetter { receipt, reduced } => Ok((receipt, reduced)),
                    other => Err(super::mismatch(PublishKind::DeadLetter, &other)),
                }
            }
        }
    }
}

impl Service<PublishRequest> for DomainSink {
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
            Ok(match &req.body {
                PublishBody::Event(e) => PublishResponse::Receipt(sink.publish(topic, e).await?),
                PublishBody::Batch(b) => {
                    PublishResponse::Batch(sink.publish_batch(topic, b).await?)
                }
                PublishBody::Append {
                    envelope,
                    expected_version,
                } => {
                    PublishResponse::Receipt(sink.append(topic, envelope, *expected_version).await?)
                }
                PublishBody::DeadLetter(d) => {
                    let (receipt, reduced) = sink.dead_letter(topic, d).await?;
                    PublishResponse::DeadLetter { receipt, reduced }
                }
                PublishBody::Message(_) | PublishBody::Request { .. } | PublishBody::Reply(_) => {
                    return Err(Error::NotSupported {
                        operation: "a simple-bus write on the domain bus",
                        backend: sink.caps().backend,
                    });
                }
            })
        })
    }
}
