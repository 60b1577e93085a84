//! Raw messages as they move through transports.

use bytes::Bytes;

use crate::headers::Headers;

/// A simple-bus message: topic, headers and raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published to.
    pub topic: String,
    /// Headers (trace context, application metadata).
    pub headers: Headers,
    /// The payload, opaque to the bus.
    pub payload: Bytes,
    /// Where a reply goes, for request-reply.
    pub reply_to: Option<String>,
}

impl Message {
    /// A message without headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            headers: Headers::new(),
            payload: payload.into(),
            reply_to: None,
        }
    }

    /// Same message with headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

/// What a domain transport publishes: a routing key (the aggregate id), headers and body,
/// already encoded by a codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// Routing key: the aggregate id. Decides the partition.
    pub key: String,
    /// Encoded headers.
    pub headers: Headers,
    /// Encoded body.
    pub payload: Bytes,
    /// A unique id of this message for publish deduplication (the event id; for a dead
    /// letter, derived from the original's position), or `None`. Backends with
    /// [`Capabilities::dedup`](crate::Capabilities::dedup) store a message with an id they
    /// saw within their window only once (JetStream: `Nats-Msg-Id`).
    pub id: Option<String>,
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
