//! Raw messages as they move through transports.

use bytes::Bytes;

use crate::envelope::EnvelopeError;
use crate::error::Result;
use crate::headers::{Headers, validate_header};
use crate::topic::validate_topic;
use crate::transport::{DomainCapabilities, SimpleCapabilities, Write};

/// A simple-bus message: topic, headers and raw payload.
///
/// Two messages are equal when their topic, headers, payload and reply address are:
/// [`extensions`](Self::extensions) hold per-call data, not content, and are not compared.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message {
    /// The topic it was published to.
    pub topic: String,
    /// Headers (trace context, application metadata).
    pub headers: Headers,
    /// The payload, opaque to the bus.
    pub payload: Bytes,
    /// Where a reply goes, for request-reply.
    pub reply_to: Option<String>,
    /// Per-call data, never sent: on publish it becomes the publish request's
    /// [`extensions`](crate::pipeline::PublishRequest::extensions); a handler receives what
    /// the handler layers put there.
    pub extensions: crate::pipeline::Extensions,
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic
            && self.headers == other.headers
            && self.payload == other.payload
            && self.reply_to == other.reply_to
    }
}

impl Eq for Message {}

impl Message {
    /// A message without headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            headers: Headers::new(),
            payload: payload.into(),
            reply_to: None,
            extensions: crate::pipeline::Extensions::new(),
        }
    }

    /// Same message with replies going to `reply_to` (request-reply).
    #[must_use]
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }

    /// Same message with headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

/// An envelope as a codec wrote it: routing key (the aggregate id), headers and body, not
/// yet checked against a backend. [`OutboundMessage::new`] checks it for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedMessage {
    /// Routing key: the aggregate id. Decides the partition.
    pub key: String,
    /// Encoded headers.
    pub headers: Headers,
    /// Encoded body.
    pub payload: Bytes,
    /// A unique id of this message for publish deduplication (the event id; for a dead
    /// letter, derived from the original's position), or `None`. Backends with
    /// [`DomainCapabilities::dedup`](crate::DomainCapabilities::dedup) store a message with
    /// an id they saw within their window only once (JetStream: `Nats-Msg-Id`).
    pub id: Option<String>,
}

/// What a domain transport publishes: an [`EncodedMessage`] checked for one backend.
///
/// Only [`OutboundMessage::new`] makes one, so a value proves that its headers are valid
/// ([`Headers::validate`]) and that it fits the backend's declared limit for the write it
/// was checked for ([`DomainCapabilities::check_size`](crate::DomainCapabilities::check_size)).
/// Backends read it and move its bytes; they do not check it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    inner: EncodedMessage,
    write: Write,
}

impl OutboundMessage {
    /// Checks `message` for a write of kind `write` to a backend with `caps`:
    /// [`Error::InvalidEnvelope`](crate::Error::InvalidEnvelope) for an empty key,
    /// [`Error::InvalidHeader`](crate::Error::InvalidHeader) for a header (or an id) no
    /// backend can carry, [`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge) over the backend's
    /// limit (its framing and the headers it adds counted as
    /// [`DomainCapabilities::wire`](crate::DomainCapabilities::wire) says).
    pub fn new(message: EncodedMessage, caps: &DomainCapabilities, write: Write) -> Result<Self> {
        check_headers(&message, caps)?;
        Self::with_valid_headers(message, caps, write)
    }

    /// [`OutboundMessage::new`] without the header check, for headers core wrote itself:
    /// a codec's output (its header names are constants and its values are checked when
    /// the envelope is), and dead letters (built from headers that passed
    /// [`validate_header`](crate::validate_header)).
    pub(crate) fn with_valid_headers(
        message: EncodedMessage,
        caps: &DomainCapabilities,
        write: Write,
    ) -> Result<Self> {
        debug_assert!(
            check_headers(&message, caps).is_ok(),
            "core wrote an invalid header"
        );
        if message.key.is_empty() {
            return Err(EnvelopeError::Blank {
                field: "aggregate_id",
            }
            .into());
        }
        caps.check_size(&message, write)?;
        Ok(Self {
            inner: message,
            write,
        })
    }

    /// Routing key: the aggregate id. Decides the partition.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.headers
    }

    /// The body.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// The deduplication id, if any (see [`EncodedMessage::id`]).
    pub fn id(&self) -> Option<&str> {
        self.inner.id.as_deref()
    }

    /// The write it was checked for.
    pub fn write(&self) -> Write {
        self.write
    }

    /// The parts, to move them into the backend's own message type.
    pub fn into_parts(self) -> EncodedMessage {
        self.inner
    }
}

/// The headers of `message`, and its id as the header that will carry it.
fn check_headers(message: &EncodedMessage, caps: &DomainCapabilities) -> Result<()> {
    message.headers.validate()?;
    if let Some(id) = &message.id {
        validate_header(caps.wire.id_header.unwrap_or("id"), id)?;
    }
    Ok(())
}

/// What a simple transport publishes: a [`Message`] checked for one backend.
///
/// Only [`SimpleOutbound::new`] makes one, so a value proves that its topic is a valid
/// [`Topic`](crate::Topic) name, its headers are valid and it fits the backend's declared
/// limit ([`SimpleCapabilities::check_size`](crate::SimpleCapabilities::check_size)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleOutbound {
    inner: Message,
}

impl SimpleOutbound {
    /// Checks `message` for a backend with `caps`:
    /// [`Error::InvalidTopic`](crate::Error::InvalidTopic),
    /// [`Error::InvalidHeader`](crate::Error::InvalidHeader) or
    /// [`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge) naming what is wrong.
    pub fn new(message: Message, caps: &SimpleCapabilities) -> Result<Self> {
        validate_topic(&message.topic)?;
        Self::with_valid_topic(message, caps)
    }

    /// [`SimpleOutbound::new`] for a message whose topic core checked already.
    pub(crate) fn with_valid_topic(message: Message, caps: &SimpleCapabilities) -> Result<Self> {
        message.headers.validate()?;
        caps.check_size(&message.headers, message.payload.len())?;
        Ok(Self { inner: message })
    }

    /// The topic (a valid topic name).
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.headers
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// Where a reply goes, for request-reply.
    pub fn reply_to(&self) -> Option<&str> {
        self.inner.reply_to.as_deref()
    }

    /// Same message with replies going to `inbox` (the reply address is not counted
    /// against the size limit: brokers carry it beside the message).
    #[must_use]
    pub fn with_reply_to(mut self, inbox: impl Into<String>) -> Self {
        self.inner.reply_to = Some(inbox.into());
        self
    }

    /// The message, to move it into the backend's own message type.
    pub fn into_message(self) -> Message {
        self.inner
    }
}

/// Where a message sits in the broker: a partition and an offset within it (a JetStream
/// stream sequence, a Kafka offset, a Redis entry id packed as `ms << 64 | seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// The partition (0 when the topic is not partitioned).
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u128,
}

/// Proof that the broker accepted (for durable backends: persisted) a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// Where the message was stored, if the backend reports it.
    pub position: Option<Position>,
    /// Whether the broker recognised the message as a duplicate of an earlier publish.
    pub duplicate: bool,
}

impl Receipt {
    /// A receipt with a position.
    pub fn at(position: Position) -> Self {
        Self {
            position: Some(position),
            duplicate: false,
        }
    }

    /// A receipt without a position (fire-and-forget backends).
    pub fn accepted() -> Self {
        Self {
            position: None,
            duplicate: false,
        }
    }

    /// Marks the receipt as a duplicate.
    #[must_use]
    pub fn as_duplicate(mut self) -> Self {
        self.duplicate = true;
        self
    }
}

/// A message read from a domain transport, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The topic it was read from.
    pub topic: String,
    /// The routing key, if the backend carries one (Kafka key, subject token, stream field).
    pub key: Option<String>,
    /// Raw headers.
    pub headers: Headers,
    /// Raw body.
    pub payload: Bytes,
    /// Where it sits in the broker.
    pub position: Position,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::error::Error;
    use crate::transport::WireOverhead;

    fn encoded(key: &str, headers: &[(&str, &str)], payload: usize) -> EncodedMessage {
        EncodedMessage {
            key: key.to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            payload: Bytes::from(vec![b'x'; payload]),
            id: None,
        }
    }

    /// A backend of 100 bytes counting 4 per header, adding `Id` and `Seq` (5 digits).
    fn domain_caps() -> DomainCapabilities {
        let mut caps = DomainCapabilities::new("test");
        caps.max_payload = 100;
        caps.wire = WireOverhead::new(0, 4)
            .with_id_header("Id")
            .with_append_header("Seq", 5);
        caps
    }

    #[test]
    fn an_outbound_message_is_checked_at_limit_minus_one_limit_and_plus_one() {
        let caps = domain_caps();
        // Header `h: v` costs 1 + 1 + 4 = 6 bytes; the payload fills the rest.
        for (payload, ok) in [(93, true), (94, true), (95, false)] {
            let r =
                OutboundMessage::new(encoded("k", &[("h", "v")], payload), &caps, Write::Publish);
            match (r, ok) {
                (Ok(m), true) => assert_eq!(m.payload().len(), payload),
                (Err(Error::PayloadTooLarge { size, max }), false) => {
                    assert_eq!((size, max), (payload + 6, 100));
                }
                (r, _) => panic!("{payload} bytes: {r:?}"),
            }
        }
        // An append adds `Seq` with 5 digits (3 + 5 + 4 = 12 bytes), an id `Id` (2 + 1 + 4).
        let append = |payload| {
            OutboundMessage::new(encoded("k", &[], payload), &caps, Write::Append)
                .map(|m| m.write())
        };
        assert_eq!(append(88).unwrap(), Write::Append);
        assert!(matches!(
            append(89),
            Err(Error::PayloadTooLarge { size: 101, .. })
        ));
        let mut with_id = encoded("k", &[], 93);
        with_id.id = Some("1".into());
        assert!(OutboundMessage::new(with_id.clone(), &caps, Write::Publish).is_ok());
        with_id.payload = Bytes::from(vec![b'x'; 94]);
        assert!(OutboundMessage::new(with_id, &caps, Write::Publish).is_err());
    }

    #[test]
    fn an_outbound_message_refuses_bad_headers_ids_and_keys() {
        let caps = domain_caps();
        for (name, value) in [("bad name", "v"), ("A", "line\r\nbreak"), ("", "v")] {
            let e = OutboundMessage::new(encoded("k", &[(name, value)], 1), &caps, Write::Publish)
                .expect_err(name);
            assert!(matches!(e, Error::InvalidHeader { .. }), "{name:?}: {e}");
        }
        let mut bad_id = encoded("k", &[], 1);
        bad_id.id = Some("id\n".into());
        let e = OutboundMessage::new(bad_id, &caps, Write::Publish).expect_err("id");
        assert!(
            matches!(&e, Error::InvalidHeader { name, .. } if name == "Id"),
            "the id is checked as the header that carries it: {e}"
        );
        let e = OutboundMessage::new(encoded("", &[], 1), &caps, Write::Publish).expect_err("key");
        assert!(matches!(e, Error::InvalidEnvelope(_)), "{e}");
        let m =
            OutboundMessage::new(encoded("k", &[("A", "b")], 3), &caps, Write::Publish).unwrap();
        assert_eq!(
            (m.key(), m.headers().get("A"), m.id()),
            ("k", Some("b"), None)
        );
        assert_eq!(m.into_parts(), encoded("k", &[("A", "b")], 3));
    }

    #[test]
    fn a_simple_outbound_is_checked_for_topic_headers_and_size() {
        let mut caps = SimpleCapabilities::new("test");
        caps.max_payload = 10;
        let message = |topic: &str, payload: usize| {
            Message::new(topic, vec![b'x'; payload])
                .with_headers([("h", "v")].into_iter().collect())
        };
        // `h: v` costs 6 bytes with memory's count.
        assert!(SimpleOutbound::new(message("t", 4), &caps).is_ok());
        assert!(matches!(
            SimpleOutbound::new(message("t", 5), &caps),
            Err(Error::PayloadTooLarge { size: 11, max: 10 })
        ));
        assert!(matches!(
            SimpleOutbound::new(message("a..b", 1), &caps),
            Err(Error::InvalidTopic { .. })
        ));
        let bad = Message::new("t", "x").with_headers([("A", "\0")].into_iter().collect());
        assert!(matches!(
            SimpleOutbound::new(bad, &caps),
            Err(Error::InvalidHeader { .. })
        ));
        let m = SimpleOutbound::new(message("t", 1), &caps)
            .unwrap()
            .with_reply_to("_inbox.1");
        assert_eq!(
            (m.topic(), m.reply_to(), m.payload().len()),
            ("t", Some("_inbox.1"), 1)
        );
        assert_eq!(m.into_message().reply_to.as_deref(), Some("_inbox.1"));
    }
}
