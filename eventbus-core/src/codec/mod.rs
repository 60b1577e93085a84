//! Wire codecs for envelopes: CloudEvents (binary mode by default, or structured mode) and
//! jxt JSON mode.
//!
//! A consumer detects the codec per message (never by "has headers"), so all of them can
//! share a topic: a `content-type` starting with `application/cloudevents` is structured
//! mode, a `ce-specversion` or `ce_specversion` header binary mode; without `ce-` headers
//! and content type, a JSON body with `specversion` is structured mode (the released NATS
//! binding 1.0.2 sends no headers at all) and one with jxt-core's fields a jxt envelope.
//! See `docs/wire-format.md` for the byte-level description.

mod cloudevents;
mod json;
mod jxt;
mod structured;
pub(crate) mod time;

use crate::envelope::{Envelope, EnvelopeError};
use crate::message::{EncodedMessage, InboundMessage};

pub use cloudevents::{CE_EXTENSIONS, SPEC_VERSION};
pub use jxt::jxt_compatible_id;

/// How a backend names CloudEvents attributes in its headers, named after what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeaderStyle {
    /// `ce-` prefix (hyphen), `datacontenttype` as `ce-datacontenttype`, values
    /// percent-encoded as the NATS binding draft (1.0.3) asks for. Used by NATS, Redis and
    /// memory.
    #[default]
    HyphenPercentEncoded,
    /// `ce_` prefix (underscore), `datacontenttype` as `content-type`, plain UTF-8 values,
    /// `partitionkey` extension (Kafka binding 1.0.2).
    UnderscorePlain,
}

/// Which wire format a publisher writes. Consumers read all of them, detected per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// CloudEvents 1.0 binary content mode: payload as the body, attributes as headers.
    #[default]
    CloudEvents,
    /// CloudEvents 1.0 structured content mode: the event in the JSON event format as the
    /// body (`content-type: application/cloudevents+json`), application headers beside it.
    /// JSON payloads are embedded as `data`, others as `data_base64`.
    CloudEventsStructured,
    /// jxt-core's JSON envelope (for sharing topics with Go services built on jxt-core), as
    /// its current releases read it: `tenant_id` as a JSON number (v1.1.36 and later), so a
    /// tenant id must be the decimal form of an `i64`. Carries JSON payloads only; the
    /// event version must fit an `i64`.
    JxtJson,
    /// Like [`Codec::JxtJson`], with `tenant_id` as a JSON string, for jxt-core up to
    /// v1.1.35.
    JxtJsonStringTenant,
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
    /// The message looks like a CloudEvent (the text says why) but has no `specversion`.
    #[error("looks like a CloudEvent ({0}) but has no specversion")]
    NoSpecVersion(String),
    /// Neither a CloudEvent (in any mode) nor a jxt JSON envelope; the text says why.
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
    /// The envelope is validated first; then each codec refuses what it cannot carry
    /// ([`EnvelopeError::Unencodable`]): the jxt codecs a non-JSON payload and a version
    /// above `i64::MAX`, [`Codec::JxtJson`] a tenant id that is not the decimal form of an
    /// `i64`.
    pub fn encode(
        self,
        envelope: &Envelope,
        style: HeaderStyle,
        default_source: &str,
    ) -> Result<EncodedMessage, crate::Error> {
        envelope.validate()?;
        match self {
            Self::CloudEvents => cloudevents::encode(envelope, style, default_source),
            Self::CloudEventsStructured => structured::encode(envelope, style, default_source),
            Self::JxtJson => jxt::encode(envelope, jxt::Tenant::Number, default_source),
            Self::JxtJsonStringTenant => jxt::encode(envelope, jxt::Tenant::String, default_source),
        }
    }

    /// Decodes a message of any codec, detected per message (see the module documentation).
    ///
    /// A jxt body without `timestamp` decodes to 0001-01-01T00:00:00Z, Go's zero time, which
    /// is what jxt-core holds for it.
    pub fn decode(message: &InboundMessage) -> Result<Envelope, DecodeError> {
        let envelope = match Wire::of(message)? {
            Wire::Binary(style) => cloudevents::decode(message, style)?,
            Wire::Structured(members) => structured::decode(message, &members)?,
            Wire::Jxt(body, members) => jxt::decode(message, body, &members)?,
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// Which codec wrote `message`, as [`Codec::decode`] detects it; `None` for a message it
    /// would refuse before reading any field. Both jxt codecs are reported as
    /// [`Codec::JxtJson`].
    pub fn detect(message: &InboundMessage) -> Option<Self> {
        Some(match Wire::of(message).ok()? {
            Wire::Binary(_) => Self::CloudEvents,
            Wire::Structured(_) => Self::CloudEventsStructured,
            Wire::Jxt(..) => Self::JxtJson,
        })
    }

    /// Whether this is one of the jxt JSON codecs.
    pub fn is_jxt(self) -> bool {
        matches!(self, Self::JxtJson | Self::JxtJsonStringTenant)
    }
}

/// What a message is, with its body parsed when that was needed to tell.
enum Wire<'a> {
    Binary(HeaderStyle),
    Structured(json::Members<'a>),
    Jxt(&'a str, json::Members<'a>),
}

impl<'a> Wire<'a> {
    fn of(m: &'a InboundMessage) -> Result<Self, DecodeError> {
        let content_type = m.headers.get_ignore_case(cloudevents::CONTENT_TYPE);
        if content_type.map(structured::announced_by).transpose()? == Some(true) {
            let members = std::str::from_utf8(&m.payload)
                .map_err(|e| e.to_string())
                .and_then(|body| json::members(body).map_err(|e| e.to_string()))
                .map_err(|e| DecodeError::invalid("body", format!("not a JSON object ({e})")))?;
            return Ok(Self::Structured(members));
        }
        if let Some(style) = cloudevents::detect(&m.headers) {
            return Ok(Self::Binary(style));
        }
        if let Some((name, _)) = m.headers.iter().find(|(n, _)| cloudevents::is_ce_header(n)) {
            return Err(DecodeError::NoSpecVersion(format!(
                "it has a `{name}` header"
            )));
        }
        let unknown =
            |why: String| DecodeError::UnknownFormat(format!("no CloudEvents headers, {why}"));
        let body = std::str::from_utf8(&m.payload)
            .map_err(|e| unknown(format!("and the body is not UTF-8 ({e})")))?;
        let members = json::members(body)
            .map_err(|e| unknown(format!("and the body is not a JSON object ({e})")))?;
        let has = |name| json::get(&members, name).is_some();
        if has("specversion") {
            return match content_type {
                None => Ok(Self::Structured(members)),
                Some(ct) => Err(unknown(format!(
                    "and the JSON body has `specversion` but content-type {ct:?} is not {}",
                    structured::MEDIA_TYPE
                ))),
            };
        }
        if members.iter().any(|(name, _)| jxt::is_field(name)) {
            return Ok(Self::Jxt(body, members));
        }
        if has("id") && has("type") {
            return Err(DecodeError::NoSpecVersion(
                "its JSON body has `id` and `type`".to_owned(),
            ));
        }
        Err(unknown(
            "and the JSON body has neither `specversion` nor any field of jxt's envelope"
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod interop_tests;
#[cfg(test)]
mod tests;
