//! CloudEvents 1.0 binary content mode.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use super::time::{format_rfc3339_nano, parse_rfc3339};
use super::{DecodeError, HeaderStyle};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::Headers;
use crate::message::{InboundMessage, OutboundMessage};

/// The CloudEvents spec version written and accepted.
pub const SPEC_VERSION: &str = "1.0";

/// The extension attributes this codec writes (lowercase `[a-z0-9]`, at most 20 characters,
/// as CloudEvents asks): the aggregate's version, correlation, causation and tenant ids,
/// and (Kafka only) the partition key.
pub const CE_EXTENSIONS: [&str; 5] = [
    "aggregateversion",
    "correlationid",
    "causationid",
    "tenantid",
    "partitionkey",
];

/// The payload media type header of both bindings.
const CONTENT_TYPE: &str = "content-type";

/// Attribute names with both prefixes, so that encoding allocates no name.
struct Names {
    specversion: &'static str,
    id: &'static str,
    source: &'static str,
    ty: &'static str,
    time: &'static str,
    subject: &'static str,
    aggregateversion: &'static str,
    correlationid: &'static str,
    causationid: &'static str,
    tenantid: &'static str,
    partitionkey: &'static str,
}

const NATS: Names = Names {
    specversion: "ce-specversion",
    id: "ce-id",
    source: "ce-source",
    ty: "ce-type",
    time: "ce-time",
    subject: "ce-subject",
    aggregateversion: "ce-aggregateversion",
    correlationid: "ce-correlationid",
    causationid: "ce-causationid",
    tenantid: "ce-tenantid",
    partitionkey: "ce-partitionkey",
};

const KAFKA: Names = Names {
    specversion: "ce_specversion",
    id: "ce_id",
    source: "ce_source",
    ty: "ce_type",
    time: "ce_time",
    subject: "ce_subject",
    aggregateversion: "ce_aggregateversion",
    correlationid: "ce_correlationid",
    causationid: "ce_causationid",
    tenantid: "ce_tenantid",
    partitionkey: "ce_partitionkey",
};

fn names(style: HeaderStyle) -> &'static Names {
    match style {
        HeaderStyle::Nats => &NATS,
        HeaderStyle::Kafka => &KAFKA,
    }
}

/// The NATS binding draft: percent-encode space, `"`, `%`, controls and every non-ASCII byte.
const NATS_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// Which style wrote these headers, if any: by `specversion` only.
pub(super) fn detect(headers: &Headers) -> Option<HeaderStyle> {
    if headers.contains(NATS.specversion) {
        Some(HeaderStyle::Nats)
    } else if headers.contains(KAFKA.specversion) {
        Some(HeaderStyle::Kafka)
    } else {
        None
    }
}

fn value(style: HeaderStyle, v: &str) -> String {
    match style {
        HeaderStyle::Nats => utf8_percent_encode(v, NATS_ENCODE).to_string(),
        HeaderStyle::Kafka => v.to_owned(),
    }
}

fn is_reserved(n: &Names, name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE)
        || [
            n.specversion,
            n.id,
            n.source,
            n.ty,
            n.time,
            n.subject,
            n.aggregateversion,
            n.correlationid,
            n.causationid,
            n.tenantid,
            n.partitionkey,
        ]
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r))
}

pub(super) fn encode(
    e: &Envelope,
    style: HeaderStyle,
    default_source: &str,
) -> Result<OutboundMessage, crate::Error> {
    let n = names(style);
    let source = e.source.as_deref().unwrap_or(default_source);
    if source.trim().is_empty() {
        return Err(EnvelopeError::Blank { field: "source" }.into());
    }
    let mut h = Headers::with_capacity(10 + e.headers.len());
    h.push_unique(n.specversion, SPEC_VERSION);
    h.push_unique(n.id, value(style, &e.event_id));
    h.push_unique(n.source, value(style, source));
    h.push_unique(n.ty, value(style, &e.event_type));
    h.push_unique(n.time, format_rfc3339_nano(&e.occurred_at));
    h.push_unique(n.subject, value(style, &e.aggregate_id));
    h.push_unique(n.aggregateversion, e.event_version.to_string());
    if style == HeaderStyle::Kafka {
        h.push_unique(n.partitionkey, value(style, &e.aggregate_id));
    }
    for (name, v) in [
        (n.correlationid, &e.correlation_id),
        (n.causationid, &e.causation_id),
        (n.tenantid, &e.tenant_id),
    ] {
        if let Some(v) = v {
            h.push_unique(name, value(style, v));
        }
    }
    if let Some(ct) = &e.content_type {
        h.push_unique(CONTENT_TYPE, value(style, ct));
    }
    for (name, v) in e.headers.iter() {
        if is_reserved(n, name) {
            return Err(EnvelopeError::Header {
                name: name.to_owned(),
                reason: "reserved for a CloudEvents attribute",
            }
            .into());
        }
        h.insert(Cow::Owned(name.to_owned()), v);
    }
    Ok(OutboundMessage {
        key: e.aggregate_id.clone(),
        headers: h,
        payload: e.payload.clone(),
        id: Some(e.event_id.clone()),
    })
}

pub(super) fn decode(m: &InboundMessage, style: HeaderStyle) -> Result<Envelope, DecodeError> {
    let n = names(style);
    let get = |name: &'static str| -> Result<Option<String>, DecodeError> {
        match m.headers.get(name) {
            None => Ok(None),
            Some(v) => match style {
                HeaderStyle::Kafka => Ok(Some(v.to_owned())),
                HeaderStyle::Nats => percent_decode_str(v)
                    .decode_utf8()
                    .map(|s| Some(s.into_owned()))
                    .map_err(|_| DecodeError::invalid(name, "percent-encoding is not UTF-8")),
            },
        }
    };
    let required = |name: &'static str| -> Result<String, DecodeError> {
        get(name)?.ok_or(DecodeError::Missing(name))
    };

    let spec = required(n.specversion)?;
    if spec != SPEC_VERSION {
        return Err(DecodeError::SpecVersion(spec));
    }
    let version_text = required(n.aggregateversion)?;
    let event_version = version_text.parse::<u64>().map_err(|_| {
        DecodeError::invalid(
            n.aggregateversion,
            format!("{version_text:?} is not a positive integer"),
        )
    })?;
    let occurred_at = match get(n.time)? {
        Some(t) => parse_rfc3339(&t)
            .ok_or_else(|| DecodeError::invalid(n.time, format!("{t:?} is not RFC 3339")))?,
        None => return Err(DecodeError::Missing(n.time)),
    };
    let mut headers = Headers::new();
    for (name, v) in m.headers.iter() {
        if !is_reserved(n, name) {
            headers.insert(Cow::Owned(name.to_owned()), v);
        }
    }
    Ok(Envelope {
        event_id: required(n.id)?,
        aggregate_id: required(n.subject)?,
        event_type: required(n.ty)?,
        event_version,
        occurred_at,
        source: Some(required(n.source)?),
        correlation_id: get(n.correlationid)?,
        causation_id: get(n.causationid)?,
        tenant_id: get(n.tenantid)?,
        trace_id: None,
        content_type: match m.headers.get_ignore_case(CONTENT_TYPE) {
            None => None,
            Some(v) if style == HeaderStyle::Nats => Some(
                percent_decode_str(v)
                    .decode_utf8()
                    .map_err(|_| {
                        DecodeError::invalid(CONTENT_TYPE, "percent-encoding is not UTF-8")
                    })?
                    .into_owned(),
            ),
            Some(v) => Some(v.to_owned()),
        },
        headers,
        payload: m.payload.clone(),
    })
}
