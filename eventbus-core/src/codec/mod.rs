//! Wire codecs for envelopes: CloudEvents binary mode (default) and jxt JSON mode.
//!
//! A consumer detects the codec per message by the presence of `ce_specversion` or
//! `ce-specversion` (never by "has headers"), so both codecs can share a topic.
//! See `docs/wire-format.md` for the byte-level description.

mod cloudevents;
mod jxt;
pub(crate) mod time;

use crate::envelope::{Envelope, EnvelopeError};
use crate::message::{InboundMessage, OutboundMessage};

pub use cloudevents::{CE_EXTENSIONS, SPEC_VERSION};
pub use jxt::jxt_compatible_id;

/// How a backend names CloudEvents attributes in its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeaderStyle {
    /// `ce-` prefix, values percent-encoded as the NATS binding draft (1.0.3) asks for.
    /// Used by NATS, Redis and memory.
    #[default]
    Nats,
    /// `ce_` prefix, plain UTF-8 values, `partitionkey` extension (Kafka binding 1.0.2).
    Kafka,
}

/// Which wire format a publisher writes. Consumers read both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// CloudEvents 1.0 binary content mode: payload as the body, attributes as headers.
    #[default]
    CloudEvents,
    /// jxt-core's JSON envelope (for sharing topics with Go services built on jxt-core).
    /// Carries JSON payloads only.
    JxtJson,
}

/// Why a message from the wire could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required attribute is missing.
    #[error("missing attribute `{0}`")]
    Missing(&'static str),
    /// An attribute has a value that cannot be used.
    #[error("attribute `{name}` is invalid: {reason}")]
    Invalid {
        /// The attribute (header or JSON field) name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The CloudEvents spec version is not 1.0.
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
    /// No CloudEvents headers and the body is not a jxt JSON envelope.
    #[error("not a CloudEvents message and not a jxt JSON envelope: {0}")]
    UnknownFormat(String),
    /// The decoded envelope failed validation.
    #[error("decoded envelope is invalid: {0}")]
    Envelope(#[from] EnvelopeError),
}

impl DecodeError {
    pub(crate) fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

impl Codec {
    /// Encodes `envelope` for a backend with the given header style.
    ///
    /// `default_source` fills the CloudEvents `source` when the envelope has none.
    /// The envelope is validated first; the jxt codec also refuses non-JSON payloads.
    pub fn encode(
        self,
        envelope: &Envelope,
        style: HeaderStyle,
        default_source: &str,
    ) -> Result<OutboundMessage, crate::Error> {
        envelope.validate()?;
        match self {
            Self::CloudEvents => cloudevents::encode(envelope, style, default_source),
            Self::JxtJson => jxt::encode(envelope, style, default_source),
        }
    }

    /// Decodes a message of either codec, detected by the `specversion` header.
    pub fn decode(message: &InboundMessage) -> Result<Envelope, DecodeError> {
        let envelope = if let Some(style) = cloudevents::detect(&message.headers) {
            cloudevents::decode(message, style)?
        } else {
            jxt::decode(message)?
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// Which codec wrote `message` (by its headers only).
    pub fn detect(message: &InboundMessage) -> Self {
        if cloudevents::detect(&message.headers).is_some() {
            Self::CloudEvents
        } else {
            Self::JxtJson
        }
    }
}

#[cfg(test)]
mod tests;
