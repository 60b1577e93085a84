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
        let caps = self.caps();
        let r = &dl.record;
        // The whole record, checked in full: layers may have written any header.
        match OutboundMessage::new(r.clone(), caps, Write::Publish) {
            Ok(full) => return Ok((full, None)),
            Err(Error::PayloadTooLarge { .. }) => {}
            Err(other) => return Err(other),
        }
        // An original header still as the original had it (not added or changed by a
        // layer): what the reduced forms leave out.
        let original = |n: &str, v: &str| dl.original_headers.get(n) == Some(v);
        // Every reduced form holds some of the record's headers, now known to be valid,
        // and the reduction headers: constant names, numbers or constants as values.
        let build = |keep_headers: bool, keep_body: bool| {
            let mut headers = Headers::with_capacity(r.headers.len() + 2);
            for (n, v) in r.headers.iter() {
                if keep_headers || !original(n, v) {
                    headers.insert(n.to_owned(), v);
                }
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
            OutboundMessage::with_valid_headers(message, caps, Write::Publish).map(|m| (m, reduced))
        };
        // Without original headers, dropping them changes nothing: only the body can go.
        let has_original = r.headers.iter().any(|(n, v)| original(n, v));
        if has_original {
            for (keep_headers, keep_body) in [(false, true), (true, false)] {
                if let Ok(fits) = build(keep_headers, keep_body) {
                    return Ok(fits);
                }
            }
        }
        build(!has_original, false)
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
                    // A layer that answered with a plain receipt: stored, reduction unknown.
                    PublishResponse::Receipt(receipt) => Ok((receipt, None)),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use async_trait::async_trait;

    use super::*;
    use crate::pool::DeadLetterKind;
    use crate::transport::{DomainSubscription, DomainTransport, SubscriptionSpec};

    /// A transport that only declares its limit.
    struct Limit(DomainCapabilities);

    #[async_trait]
    impl DomainTransport for Limit {
        fn capabilities(&self) -> &DomainCapabilities {
            &self.0
        }
        async fn publish(&self, _topic: &Topic, _message: OutboundMessage) -> Result<Receipt> {
            Ok(Receipt::accepted())
        }
        async fn subscribe(&self, _spec: SubscriptionSpec) -> Result<DomainSubscription> {
            Err(Error::closed("test transport"))
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    fn sink(max_payload: usize) -> DomainSink {
        let mut caps = DomainCapabilities::new("limit");
        caps.max_payload = max_payload;
        DomainSink::new(Arc::new(Limit(caps)), Codec::CloudEvents, "tests")
    }

    /// A record as the pool makes it, after a layer replaced the original `traceparent`
    /// and added a header of its own.
    fn dead_letter() -> DeadLetter {
        let original: Headers = [
            ("traceparent", "00-original"),
            ("x-app", "a".repeat(100).as_str()),
        ]
        .into_iter()
        .collect();
        let mut headers = original.clone();
        headers.insert(dlq_headers::KIND, "permanent");
        headers.insert(dlq_headers::REASON, "refused");
        headers.insert("traceparent", "00-layer");
        headers.insert("x-layer", "added");
        let record = EncodedMessage {
            key: "k".into(),
            headers,
            payload: Bytes::from(vec![b'x'; 200]),
            id: Some("dlq:t:0:1".into()),
        };
        DeadLetter::new(record, original, DeadLetterKind::Permanent)
    }

    /// From a roomy limit down to none, the record shrinks form by form, keeping what the
    /// layer added or changed in every form, and ends in a clear error, never a panic.
    #[test]
    fn dead_letters_shrink_form_by_form_keeping_what_layers_wrote() {
        let dl = dead_letter();
        let full = sink(usize::MAX).dead_letter_record(&dl).unwrap().0;
        let full_size =
            DomainCapabilities::new("x").wire_size(&full.clone().into_parts(), Write::Publish);
        let mut forms: Vec<Option<&'static str>> = Vec::new();
        let mut refused_below = None;
        for max in (0..=full_size + 1).rev() {
            match sink(max).dead_letter_record(&dl) {
                Ok((m, reduced)) => {
                    assert!(
                        refused_below.is_none(),
                        "a form fits at {max} after none did"
                    );
                    assert!(m.headers().get("x-layer") == Some("added"), "{reduced:?}");
                    assert_eq!(m.headers().get("traceparent"), Some("00-layer"));
                    assert_eq!(m.headers().get(dlq_headers::REDUCED), reduced);
                    let keeps_original = m.headers().contains("x-app");
                    assert_eq!(
                        keeps_original,
                        !matches!(reduced, Some("headers" | "headers,body"))
                    );
                    assert_eq!(
                        m.payload().is_empty(),
                        matches!(reduced, Some("body" | "headers,body"))
                    );
                    if forms.last() != Some(&reduced) {
                        forms.push(reduced);
                    }
                }
                Err(e) => {
                    assert!(matches!(e, Error::PayloadTooLarge { .. }), "{e}");
                    refused_below.get_or_insert(max);
                }
            }
        }
        assert_eq!(
            forms,
            vec![None, Some("headers"), Some("body"), Some("headers,body")]
        );
        assert!(refused_below.is_some());
    }

    /// A header a layer wrote that no backend can carry is an error naming it.
    #[test]
    fn an_invalid_header_from_a_layer_is_refused() {
        let mut dl = dead_letter();
        dl.record.headers.insert("bad header", "x");
        let e = sink(usize::MAX)
            .dead_letter_record(&dl)
            .expect_err("invalid");
        assert!(matches!(e, Error::InvalidHeader { .. }), "{e}");
    }
}
