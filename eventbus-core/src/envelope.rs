//! The domain-event envelope and its validation.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::headers::Headers;

/// Longest aggregate id accepted, in bytes.
pub const MAX_AGGREGATE_ID_LEN: usize = 256;
/// Longest event id, event type, source, correlation, causation or tenant id, in bytes.
pub const MAX_ID_LEN: usize = 1024;

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required text field is empty or only whitespace.
    #[error("{field} is empty")]
    Blank {
        /// The field's name.
        field: &'static str,
    },
    /// A text field is too long.
    #[error("{field} is {len} bytes long, more than the maximum of {max}")]
    TooLong {
        /// The field's name.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A text field contains a control character (CR, LF, NUL, ...).
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// The field's name.
        field: &'static str,
    },
    /// `event_version` is 0: versions start at 1.
    #[error("event_version must be at least 1")]
    ZeroVersion,
    /// The payload is empty.
    #[error("payload is empty")]
    EmptyPayload,
    /// The chosen codec cannot carry this field's value (e.g. a non-JSON payload in jxt
    /// JSON mode).
    #[error("{field} cannot be encoded: {reason}")]
    Unencodable {
        /// The field's name.
        field: &'static str,
        /// Why, and what to do instead.
        reason: &'static str,
    },
    /// A custom header is invalid or uses a name the codec reserves.
    #[error("header {name:?}: {reason}")]
    Header {
        /// The header name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
}

/// A domain event with its metadata.
///
/// `event_version` is the event's position in its aggregate's history (1, 2, 3, ...): the
/// number event sourcing and optimistic concurrency use, and that order checks rely on.
/// A payload schema version, where needed, belongs in the event type or the content type.
///
/// Validation ([`Envelope::validate`]) runs on construction, on publish and on receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of this event (UUIDv7 by default). Also used for publish deduplication.
    pub event_id: String,
    /// The aggregate (entity) the event belongs to; routing and ordering key.
    pub aggregate_id: String,
    /// The event's type, e.g. `OrderCreated`.
    pub event_type: String,
    /// Position of the event in its aggregate's history, from 1.
    pub event_version: u64,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// The producing service (CloudEvents `source`); filled from the bus when `None`.
    pub source: Option<String>,
    /// Correlation id (the business transaction).
    pub correlation_id: Option<String>,
    /// Id of the event or command that caused this one.
    pub causation_id: Option<String>,
    /// Tenant, for multi-tenant services.
    pub tenant_id: Option<String>,
    /// Trace id, carried in the body only by the jxt JSON codec (CloudEvents mode carries
    /// W3C `traceparent` headers instead).
    pub trace_id: Option<String>,
    /// Media type of the payload, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Application headers (they travel as message headers).
    pub headers: Headers,
    /// The event's data.
    pub payload: Bytes,
}

impl Envelope {
    /// A validated envelope with a fresh UUIDv7 event id and the current time.
    pub fn new(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Self, EnvelopeError> {
        let envelope = Self::unchecked(aggregate_id, event_type, event_version, payload);
        envelope.validate()?;
        Ok(envelope)
    }

    /// Like [`Envelope::new`] without validation (it still runs on publish).
    pub fn unchecked(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: u64,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            event_id: uuid::Uuid::now_v7().to_string(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            occurred_at: Utc::now(),
            source: None,
            correlation_id: None,
            causation_id: None,
            tenant_id: None,
            trace_id: None,
            content_type: None,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// Sets the event id.
    #[must_use]
    pub fn with_event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = id.into();
        self
    }

    /// Sets the time of the event.
    #[must_use]
    pub fn with_occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = at;
        self
    }

    /// Sets the source.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the tenant id.
    #[must_use]
    pub fn with_tenant_id(mut self, id: impl Into<String>) -> Self {
        self.tenant_id = Some(id.into());
        self
    }

    /// Sets the trace id (jxt JSON mode only).
    #[must_use]
    pub fn with_trace_id(mut self, id: impl Into<String>) -> Self {
        self.trace_id = Some(id.into());
        self
    }

    /// Sets the payload's media type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds an application header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks the rules every backend and codec relies on: non-blank ids and type, version
    /// at least 1, a non-empty payload, an aggregate id of at most 256 bytes, no control
    /// characters in text fields, and headers every backend can carry.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        check_text("event_id", &self.event_id, MAX_ID_LEN)?;
        check_text("aggregate_id", &self.aggregate_id, MAX_AGGREGATE_ID_LEN)?;
        check_text("event_type", &self.event_type, MAX_ID_LEN)?;
        for (field, value) in [
            ("source", &self.source),
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
            ("tenant_id", &self.tenant_id),
            ("trace_id", &self.trace_id),
            ("content_type", &self.content_type),
        ] {
            if let Some(v) = value {
                check_text(field, v, MAX_ID_LEN)?;
            }
        }
        if self.event_version == 0 {
            return Err(EnvelopeError::ZeroVersion);
        }
        if self.payload.is_empty() {
            return Err(EnvelopeError::EmptyPayload);
        }
        for (name, value) in self.headers.iter() {
            crate::headers::validate_header(name, value).map_err(|e| EnvelopeError::Header {
                name: name.to_owned(),
                reason: match e {
                    crate::Error::InvalidHeader { reason, .. } => reason,
                    _ => "invalid header",
                },
            })?;
        }
        Ok(())
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), EnvelopeError> {
    if value.trim().is_empty() {
        return Err(EnvelopeError::Blank { field });
    }
    if value.len() > max {
        return Err(EnvelopeError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(EnvelopeError::ControlCharacter { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates() {
        let e = Envelope::new("order-1", "OrderCreated", 1, &b"{}"[..]).unwrap();
        assert_eq!(e.event_id.len(), 36);
        assert_eq!(
            Envelope::new("", "T", 1, &b"x"[..]).unwrap_err(),
            EnvelopeError::Blank {
                field: "aggregate_id"
            }
        );
        assert_eq!(
            Envelope::new("  ", "T", 1, &b"x"[..]).unwrap_err(),
            EnvelopeError::Blank {
                field: "aggregate_id"
            }
        );
        assert_eq!(
            Envelope::new("a", "", 1, &b"x"[..]).unwrap_err(),
            EnvelopeError::Blank {
                field: "event_type"
            }
        );
        assert_eq!(
            Envelope::new("a", "T", 0, &b"x"[..]).unwrap_err(),
            EnvelopeError::ZeroVersion
        );
        assert_eq!(
            Envelope::new("a", "T", 1, Bytes::new()).unwrap_err(),
            EnvelopeError::EmptyPayload
        );
        assert!(matches!(
            Envelope::new("a".repeat(257), "T", 1, &b"x"[..]).unwrap_err(),
            EnvelopeError::TooLong { max: 256, .. }
        ));
        assert!(matches!(
            Envelope::new("a\nb", "T", 1, &b"x"[..]).unwrap_err(),
            EnvelopeError::ControlCharacter { .. }
        ));
        let bad_header = Envelope::unchecked("a", "T", 1, &b"x"[..]).with_header("x", "a\r\nb");
        assert!(matches!(
            bad_header.validate().unwrap_err(),
            EnvelopeError::Header { .. }
        ));
    }
}
