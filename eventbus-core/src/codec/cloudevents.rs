//! CloudEvents 1.0 binary content mode: attributes as headers, the payload as the body.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use super::time::{format_rfc3339_nano, parse_rfc3339};
use super::{DecodeError, HeaderStyle};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::Headers;
use crate::message::{EncodedMessage, InboundMessage};

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

/// The message's media type header: `datacontenttype` in Kafka's binary mode, and what
/// announces structured mode in every binding.
pub(super) const CONTENT_TYPE: &str = "content-type";

/// Attribute names with both prefixes, so that encoding allocates no name.
struct Names {
    specversion: &'static str,
    id: &'static str,
    source: &'static str,
    ty: &'static str,
    time: &'static str,
    subject: &'static str,
    datacontenttype: &'static str,
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
    // The NATS binding draft 1.0.3 maps it like any attribute (HTTP and Kafka do not).
    datacontenttype: "ce-datacontenttype",
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
    datacontenttype: CONTENT_TYPE,
    aggregateversion: "ce_aggregateversion",
    correlationid: "ce_correlationid",
    causationid: "ce_causationid",
    tenantid: "ce_tenantid",
    partitionkey: "ce_partitionkey",
};

fn names(style: HeaderStyle) -> &'static Names {
    match style {
        HeaderStyle::HyphenPercentEncoded => &NATS,
        HeaderStyle::UnderscorePlain => &KAFKA,
    }
}

/// The NATS binding draft: percent-encode space, `"`, `%`, controls and every non-ASCII byte.
const NATS_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// Which style wrote these headers, if any: by `specversion` only (names in any case, as
/// NATS and HTTP header names are case-insensitive).
pub(super) fn detect(headers: &Headers) -> Option<HeaderStyle> {
    if headers.get_ignore_case(NATS.specversion).is_some() {
        Some(HeaderStyle::HyphenPercentEncoded)
    } else if headers.get_ignore_case(KAFKA.specversion).is_some() {
        Some(HeaderStyle::UnderscorePlain)
    } else {
        None
    }
}

/// Whether `name` has a CloudEvents attribute prefix (`ce-` or `ce_`, any case).
pub(super) fn is_ce_header(name: &str) -> bool {
    name.get(..3)
        .is_some_and(|p| p.eq_ignore_ascii_case("ce-") || p.eq_ignore_ascii_case("ce_"))
}

/// Undoes RFC 7230 quoting (`"..."` with backslash escapes) of a whole header value, which
/// the NATS binding draft asks decoders to do before percent-decoding.
fn unquote(v: &str) -> Cow<'_, str> {
    let Some(inner) = v
        .trim_matches([' ', '\t'])
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
    else {
        return Cow::Borrowed(v);
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    Cow::Owned(out)
}

/// The text of a header value: NATS values are unquoted, then percent-decoded (and must be
/// UTF-8); Kafka values are plain.
fn decode_value(style: HeaderStyle, name: &str, v: &str) -> Result<String, DecodeError> {
    match style {
        HeaderStyle::UnderscorePlain => Ok(v.to_owned()),
        HeaderStyle::HyphenPercentEncoded => percent_decode_str(&unquote(v))
            .decode_utf8()
            .map(Cow::into_owned)
            .map_err(|_| DecodeError::invalid(name, "percent-encoding is not UTF-8")),
    }
}

fn value(style: HeaderStyle, v: &str) -> String {
    match style {
        HeaderStyle::HyphenPercentEncoded => utf8_percent_encode(v, NATS_ENCODE).to_string(),
        HeaderStyle::UnderscorePlain => v.to_owned(),
    }
}

fn is_reserved(n: &Names, name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE)
        || [
            n.datacontenttype,
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

/// The envelope's source, else the bus's: CloudEvents requires one.
pub(super) fn source<'a>(e: &'a Envelope, default: &'a str) -> Result<&'a str, EnvelopeError> {
    let source = e.source.as_deref().unwrap_or(default);
    if source.trim().is_empty() {
        Err(EnvelopeError::Blank { field: "source" })
    } else {
        Ok(source)
    }
}

/// `aggregateversion` from its text.
pub(super) fn parse_version(name: &str, text: &str) -> Result<u64, DecodeError> {
    text.parse::<u64>()
        .map_err(|_| DecodeError::invalid(name, format!("{text:?} is not a positive integer")))
}

/// `time` from its text.
pub(super) fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, DecodeError> {
    parse_rfc3339(text)
        .ok_or_else(|| DecodeError::invalid(name, format!("{text:?} is not RFC 3339")))
}

pub(super) fn encode(
    e: &Envelope,
    style: HeaderStyle,
    default_source: &str,
) -> Result<EncodedMessage, crate::Error> {
    let n = names(style);
    let source = source(e, default_source)?;
    let mut h = Headers::with_capacity(10 + e.headers.len());
    h.push_unique(n.specversion, SPEC_VERSION);
    h.push_unique(n.id, value(style, &e.event_id));
    h.push_unique(n.source, value(style, source));
    h.push_unique(n.ty, value(style, &e.event_type));
    h.push_unique(n.time, format_rfc3339_nano(&e.occurred_at));
    h.push_unique(n.subject, value(style, &e.aggregate_id));
    h.push_unique(n.aggregateversion, e.event_version.to_string());
    if style == HeaderStyle::UnderscorePlain {
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
        h.push_unique(n.datacontenttype, value(style, ct));
    }
    // The envelope's names are distinct (`Headers` keeps one value per name) and none is
    // reserved (checked here), so they cannot meet the attributes' names: appended as
    // they are, a static name without a copy.
    for (name, v) in e.headers.entries() {
        if is_reserved(n, name) {
            return Err(EnvelopeError::Header {
                name: name.to_string(),
                reason: "reserved for a CloudEvents attribute",
            }
            .into());
        }
        h.push_unique(name.clone(), v.clone());
    }
    Ok(EncodedMessage {
        key: e.aggregate_id.clone(),
        headers: h,
        payload: e.payload.clone(),
        id: Some(e.event_id.clone()),
    })
}

pub(super) fn decode(m: &InboundMessage, style: HeaderStyle) -> Result<Envelope, DecodeError> {
    let n = names(style);
    let get = |name: &'static str| -> Result<Option<String>, DecodeError> {
        m.headers
            .get_ignore_case(name)
            .map(|v| decode_value(style, name, v))
            .transpose()
    };
    let required = |name: &'static str| -> Result<String, DecodeError> {
        get(name)?.ok_or(DecodeError::Missing(name))
    };

    let spec = required(n.specversion)?;
    if spec != SPEC_VERSION {
        return Err(DecodeError::SpecVersion(spec));
    }
    let event_version = parse_version(n.aggregateversion, &required(n.aggregateversion)?)?;
    let occurred_at = parse_time(n.time, &required(n.time)?)?;
    let mut headers = Headers::new();
    for (name, v) in m.headers.iter() {
        if !is_reserved(n, name) {
            headers.insert(crate::headers::header_name(name), v);
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
        // NATS names it `ce-datacontenttype`; producers following HTTP's binding (the SDKs)
        // write `content-type` there too.
        content_type: match get(n.datacontenttype)? {
            Some(ct) => Some(ct),
            None => get(CONTENT_TYPE)?,
        },
        headers,
        payload: m.payload.clone(),
    })
}
