//! Errors of the bus and of handlers, with retryable / permanent classification.

use std::fmt;
use std::time::Duration;

use crate::envelope::EnvelopeError;

/// A boxed error from a backend client, a handler or a codec.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every fallible bus operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without downcasting. See [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something the bus refuses (topic, envelope, header, payload, config).
    InvalidInput,
    /// The bus, the subscription or the connection was closed.
    Closed,
    /// An operation did not finish in time.
    Timeout,
    /// The backend does not offer this operation or guarantee.
    NotSupported,
    /// The broker could not be reached or refused the operation for now.
    Unavailable,
    /// A conflicting state: e.g. a second active consumer on one durable subscription,
    /// or an append whose expected version did not match.
    Conflict,
    /// A message on the wire could not be decoded.
    Malformed,
    /// A request found nobody to answer it.
    NoResponders,
    /// Any other error from a backend client.
    Backend,
}

/// The error of every bus operation.
///
/// Classify it with [`Error::kind`] and [`Error::is_retryable`]; backend client errors are
/// kept as sources and never leak their types into this API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic name is empty, too long or uses characters outside `[A-Za-z0-9_-]` and `.`.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The refused topic.
        topic: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An envelope failed validation (on publish or on receive).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(#[from] EnvelopeError),
    /// A header name or value that some backend could not carry.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name (possibly the offending one).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The payload (with headers) exceeds what the backend accepts.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Size of the refused message.
        size: usize,
        /// The backend's limit.
        max: usize,
    },
    /// A malformed message was read from the wire.
    #[error("malformed message: {0}")]
    Malformed(#[from] crate::codec::DecodeError),
    /// The bus, subscription or connection is closed.
    #[error("{what} is closed")]
    Closed {
        /// What was closed ("bus", "subscription", ...).
        what: &'static str,
    },
    /// An operation timed out.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// The limit that passed.
        after: Duration,
    },
    /// The backend does not support the operation.
    #[error("{operation} is not supported by the {backend} backend")]
    NotSupported {
        /// The operation.
        operation: &'static str,
        /// The backend's name.
        backend: &'static str,
    },
    /// A conflicting state (second active consumer, expected version mismatch, ...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A request found no responder.
    #[error("no responders on topic {topic:?}")]
    NoResponders {
        /// The topic the request went to.
        topic: String,
    },
    /// A configuration error; `path` names the key (e.g. `domain.pool.max_in_flight`).
    #[error("configuration error at `{path}`: {message}")]
    Config {
        /// The key path, dot separated; empty for the root.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The broker is unreachable or temporarily refuses work (retryable).
    #[error("{backend} is unavailable: {source}")]
    Unavailable {
        /// The backend's name.
        backend: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend error.
    #[error("{backend} error: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// Whether repeating the operation may succeed.
        retryable: bool,
        /// The client's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidTopic { .. }
            | Self::InvalidEnvelope(_)
            | Self::InvalidHeader { .. }
            | Self::PayloadTooLarge { .. }
            | Self::Config { .. } => ErrorKind::InvalidInput,
            Self::Malformed(_) => ErrorKind::Malformed,
            Self::Closed { .. } => ErrorKind::Closed,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::NotSupported { .. } => ErrorKind::NotSupported,
            Self::Conflict(_) => ErrorKind::Conflict,
            Self::NoResponders { .. } => ErrorKind::NoResponders,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// Whether repeating the same operation later may succeed.
    ///
    /// Timeouts, unavailability, missing responders and backend errors flagged retryable are;
    /// bad input, closed buses and unsupported operations are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unavailable { .. } | Self::NoResponders { .. } => true,
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Whether this error is permanent (the opposite of [`Error::is_retryable`]).
    pub fn is_permanent(&self) -> bool {
        !self.is_retryable()
    }

    /// Shorthand for [`Error::Closed`].
    pub fn closed(what: &'static str) -> Self {
        Self::Closed { what }
    }

    /// Shorthand for a [`Error::Config`] error.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Backend`].
    pub fn backend(backend: &'static str, retryable: bool, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            retryable,
            source: source.into(),
        }
    }

    /// The same failure again, for each message of a batch the backend refused as a whole
    /// (an error owns its source and cannot be cloned): [`Error::Closed`] as it is, any
    /// other as an [`Error::Backend`] of `backend` with the same text and retryability.
    #[must_use]
    pub fn for_each_in_batch(&self, backend: &'static str) -> Self {
        match self {
            Self::Closed { what } => Self::Closed { what },
            other => Self::backend(backend, other.is_retryable(), other.to_string()),
        }
    }

    /// The source error as `E`, if it is one (escape hatch for backend-specific handling).
    pub fn try_downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Self::Unavailable { source, .. } | Self::Backend { source, .. } => {
                source.downcast_ref::<E>()
            }
            _ => None,
        }
    }
}

/// Whether a handler failure may succeed on another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Retry in place with backoff, up to the retry policy's attempts.
    Retryable,
    /// Do not retry: dead-letter at once.
    Permanent,
}

/// The error a handler returns.
///
/// `?` on any `std::error::Error` gives a *retryable* error; use [`HandleError::permanent`]
/// for failures that no retry can fix (a malformed payload, a rule violation). Like
/// `anyhow::Error`, this type does not itself implement `std::error::Error`, which is what
/// lets `?` convert every error into it.
pub struct HandleError {
    disposition: Disposition,
    source: BoxError,
}

impl HandleError {
    /// A failure that may succeed on a later attempt.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self {
            disposition: Disposition::Retryable,
            source: source.into(),
        }
    }

    /// A failure no retry can fix: the message goes to the dead letter at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            disposition: Disposition::Permanent,
            source: source.into(),
        }
    }

    /// Retryable or permanent.
    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.disposition == Disposition::Retryable
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, owned.
    pub fn into_source(self) -> BoxError {
        self.source
    }

    /// Same error, other disposition.
    #[must_use]
    pub fn with_disposition(mut self, disposition: Disposition) -> Self {
        self.disposition = disposition;
        self
    }
}

impl fmt::Debug for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleError")
            .field("disposition", &self.disposition)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.disposition {
            Disposition::Retryable => "retryable",
            Disposition::Permanent => "permanent",
        };
        write!(f, "{kind} handler error: {}", self.source)
    }
}

impl<E> From<E> for HandleError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self::retryable(error)
    }
}

/// A message as an error type, for handlers that fail with plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl HandleError {
    /// A retryable error from a text.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::retryable(Failure(message.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(
            Error::Timeout {
                operation: "publish",
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(Error::closed("bus").is_permanent());
        assert_eq!(Error::closed("bus").kind(), ErrorKind::Closed);
        let again = Error::closed("bus").for_each_in_batch("x");
        assert!(matches!(again, Error::Closed { what: "bus" }), "{again}");
        let timeout = Error::Timeout {
            operation: "publish",
            after: Duration::from_secs(1),
        };
        let again = timeout.for_each_in_batch("x");
        assert!(again.is_retryable() && again.to_string().contains(&timeout.to_string()));
        let bad = Error::config("a", "b").for_each_in_batch("x");
        assert!(
            bad.is_permanent() && bad.to_string().contains("`a`"),
            "{bad}"
        );
        assert!(Error::backend("x", true, Failure("t".into())).is_retryable());
        assert!(!Error::backend("x", false, Failure("t".into())).is_retryable());
    }

    #[test]
    fn question_mark_gives_retryable() {
        fn parse() -> Result<u32, HandleError> {
            let n: u32 = "x".parse()?;
            Ok(n)
        }
        let e = parse().unwrap_err();
        assert!(e.is_retryable());
        assert!(e.to_string().starts_with("retryable handler error"));
        let p = HandleError::permanent(Failure("bad".into()));
        assert_eq!(p.disposition(), Disposition::Permanent);
    }
}
