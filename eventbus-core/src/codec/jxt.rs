//! jxt-core's JSON envelope, byte-compatible with what jxt-core writes (jsoniter's
//! `ConfigCompatibleWithStandardLibrary`: struct field order, `omitempty`, HTML-safe string
//! escaping, a `RawMessage` payload written verbatim).

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::DecodeError;
use super::json::{self, Members};
use super::time::{format_rfc3339_nano, parse_rfc3339};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::Headers;
use crate::message::{EncodedMessage, InboundMessage};

/// Headers jxt-core writes beside the body on Kafka (we write them on every backend).
pub(super) const X_EVENT_ID: &str = "X-Event-ID";
pub(super) const X_AGGREGATE_ID: &str = "X-Aggregate-ID";
pub(super) const X_EVENT_VERSION: &str = "X-Event-Version";
pub(super) const X_EVENT_TYPE: &str = "X-Event-Type";
/// What the JSON body cannot carry travels in these headers.
pub(super) const X_CAUSATION_ID: &str = "X-Causation-ID";
pub(super) const X_EVENT_SOURCE: &str = "X-Event-Source";
pub(super) const X_CONTENT_TYPE: &str = "X-Content-Type";

const OWN_HEADERS: [&str; 7] = [
    X_EVENT_ID,
    X_AGGREGATE_ID,
    X_EVENT_VERSION,
    X_EVENT_TYPE,
    X_CAUSATION_ID,
    X_EVENT_SOURCE,
    X_CONTENT_TYPE,
];

/// The body's fields, in jxt-core's struct order.
const FIELDS: [&str; 9] = [
    "event_id",
    "aggregate_id",
    "event_type",
    "event_version",
    "timestamp",
    "trace_id",
    "correlation_id",
    "tenant_id",
    "payload",
];

/// How `tenant_id` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tenant {
    /// A JSON number (jxt-core's `int` since v1.1.36, 0 omitted).
    Number,
    /// A JSON string (jxt-core up to v1.1.35).
    String,
}

const TENANT_NOT_AN_INTEGER: &str = "jxt-core reads tenant_id as an integer since v1.1.36: use \
     the decimal form of an i64, or Codec::JxtJsonStringTenant (config \
     `domain.jxt_tenant_id: string`) for jxt-core up to v1.1.35";

/// Whether `name` is one of the body's fields, in jxt-core's manner: ASCII letters in any case
/// (its decoder, jsoniter, folds A-Z only).
pub(super) fn is_field(name: &str) -> bool {
    FIELDS.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// What a body without `timestamp` decodes to: Go's zero `time.Time`,
/// 0001-01-01T00:00:00Z, the value jxt-core itself holds (and would write) for it.
pub(super) fn missing_timestamp() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Whether jxt-core accepts this aggregate id: `[A-Za-z0-9:_./-]`, 1 to 256 characters.
pub fn jxt_compatible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_./-".contains(&b))
}

pub(super) fn encode(
    e: &Envelope,
    tenant: Tenant,
    default_source: &str,
) -> Result<EncodedMessage, crate::Error> {
    let unencodable = |field, reason| EnvelopeError::Unencodable { field, reason };
    let payload = std::str::from_utf8(&e.payload)
        .ok()
        .filter(|p| serde_json::from_str::<&RawValue>(p).is_ok())
        .ok_or(unencodable(
            "payload",
            "the jxt JSON codec carries JSON payloads only",
        ))?;
    if i64::try_from(e.event_version).is_err() {
        return Err(unencodable(
            "event_version",
            "jxt-core reads event_version as an int64: at most 9223372036854775807",
        )
        .into());
    }
    let mut body = String::with_capacity(160 + e.payload.len());
    body.push_str("{\"event_id\":");
    json::write_string(&mut body, &e.event_id, true);
    body.push_str(",\"aggregate_id\":");
    json::write_string(&mut body, &e.aggregate_id, true);
    body.push_str(",\"event_type\":");
    json::write_string(&mut body, &e.event_type, true);
    body.push_str(",\"event_version\":");
    body.push_str(&e.event_version.to_string());
    body.push_str(",\"timestamp\":\"");
    body.push_str(&format_rfc3339_nano(&e.occurred_at));
    body.push('"');
    if let Some(t) = &e.trace_id {
        body.push_str(",\"trace_id\":");
        json::write_string(&mut body, t, true);
    }
    if let Some(c) = &e.correlation_id {
        body.push_str(",\"correlation_id\":");
        json::write_string(&mut body, c, true);
    }
    match (&e.tenant_id, tenant) {
        (None, _) => {}
        (Some(t), Tenant::String) => {
            body.push_str(",\"tenant_id\":");
            json::write_string(&mut body, t, true);
        }
        (Some(t), Tenant::Number) => {
            let n = t
                .parse::<i64>()
                .ok()
                .filter(|n| n.to_string() == *t)
                .ok_or(unencodable("tenant_id", TENANT_NOT_AN_INTEGER))?;
            // `omitempty` on an `int`: jxt-core writes no tenant 0 (and reads none as 0).
            if n != 0 {
                body.push_str(",\"tenant_id\":");
                body.push_str(t);
            }
        }
    }
    // jxt-core marshals with jsoniter (ConfigCompatibleWithStandardLibrary), which writes a
    // RawMessage verbatim: no compaction, no escaping.
    body.push_str(",\"payload\":");
    body.push_str(payload);
    body.push('}');

    let mut h = Headers::with_capacity(6 + e.headers.len());
    h.push_unique(X_EVENT_ID, e.event_id.clone());
    h.push_unique(X_AGGREGATE_ID, e.aggregate_id.clone());
    h.push_unique(X_EVENT_VERSION, e.event_version.to_string());
    h.push_unique(X_EVENT_TYPE, e.event_type.clone());
    if let Some(c) = &e.causation_id {
        h.push_unique(X_CAUSATION_ID, c.clone());
    }
    let source = e.source.as_deref().unwrap_or(default_source);
    if !source.trim().is_empty() {
        h.push_unique(X_EVENT_SOURCE, source.to_owned());
    }
    if let Some(ct) = &e.content_type {
        h.push_unique(X_CONTENT_TYPE, ct.clone());
    }
    for (name, v) in e.headers.iter() {
        if OWN_HEADERS.iter().any(|o| o.eq_ignore_ascii_case(name))
            || super::cloudevents::is_ce_header(name)
        {
            return Err(EnvelopeError::Header {
                name: name.to_owned(),
                reason: "reserved by the codec",
            }
            .into());
        }
        h.insert(Cow::Owned(name.to_owned()), v);
    }
    Ok(EncodedMessage {
        key: e.aggregate_id.clone(),
        headers: h,
        payload: Bytes::from(body),
        id: Some(e.event_id.clone()),
    })
}

/// `tenant_id` is a number since jxt-core v1.1.36 and was a string before.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireTenant {
    Text(String),
    Number(serde_json::Number),
}

/// A member's value as `T`; `null` reads as absent, as Go leaves the field unset.
fn field<'de, T: Deserialize<'de>>(
    name: &'static str,
    value: Option<&'de RawValue>,
    expected: &str,
) -> Result<Option<T>, DecodeError> {
    match value {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Option<T>>(v.get())
            .map_err(|_| DecodeError::invalid(name, format!("{} is not {expected}", v.get()))),
    }
}

/// Decodes a body that has at least one of the envelope's fields. `members` are `body`'s.
pub(super) fn decode(
    m: &InboundMessage,
    body: &str,
    members: &Members<'_>,
) -> Result<Envelope, DecodeError> {
    // Keys in any ASCII case, a later duplicate winning: as jxt-core's decoder reads them.
    let mut values: [Option<&RawValue>; 9] = [None; 9];
    for (name, value) in members {
        if let Some(i) = FIELDS.iter().position(|f| f.eq_ignore_ascii_case(name)) {
            values[i] = Some(value);
        }
    }
    let [
        event_id,
        aggregate_id,
        event_type,
        event_version,
        timestamp,
        trace_id,
        correlation_id,
        tenant_id,
        payload,
    ] = values;
    let text = |name, value| field::<String>(name, value, "a string");
    let required = |name, value| text(name, value)?.ok_or(DecodeError::Missing(name));
    let non_empty = |name, value| -> Result<Option<String>, DecodeError> {
        Ok(text(name, value)?.filter(|s| !s.is_empty()))
    };

    let version: serde_json::Number = field(
        "event_version",
        event_version,
        "an integer (jxt-core's int64)",
    )?
    .ok_or(DecodeError::Missing("event_version"))?;
    let event_version = version
        .as_u64()
        .filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(|| {
            DecodeError::invalid(
                "event_version",
                format!("{version} is not an integer from 1 to 2^63-1 (jxt-core's int64)"),
            )
        })?;
    let occurred_at = match text("timestamp", timestamp)? {
        None => missing_timestamp(),
        Some(t) => parse_rfc3339(&t)
            .ok_or_else(|| DecodeError::invalid("timestamp", format!("{t:?} is not RFC 3339")))?,
    };
    let tenant_id = match field("tenant_id", tenant_id, "a string or an integer")? {
        None => None,
        Some(WireTenant::Text(t)) => Some(t).filter(|t| !t.is_empty()),
        Some(WireTenant::Number(n)) => match n.as_i64() {
            Some(0) => None,
            Some(_) => Some(n.to_string()),
            None => {
                return Err(DecodeError::invalid(
                    "tenant_id",
                    format!("{n} is not an integer (jxt-core's int)"),
                ));
            }
        },
    };
    // A JSON `null` payload is jxt-core's "payload is required" too.
    let payload = payload
        .filter(|p| p.get() != "null")
        .ok_or(DecodeError::Missing("payload"))?;
    let mut headers = Headers::new();
    for (name, v) in m.headers.iter() {
        if !OWN_HEADERS.iter().any(|o| o.eq_ignore_ascii_case(name)) {
            headers.insert(Cow::Owned(name.to_owned()), v);
        }
    }
    let header = |name| {
        m.headers
            .get_ignore_case(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Ok(Envelope {
        event_id: required("event_id", event_id)?,
        aggregate_id: required("aggregate_id", aggregate_id)?,
        event_type: required("event_type", event_type)?,
        event_version,
        occurred_at,
        source: header(X_EVENT_SOURCE),
        correlation_id: non_empty("correlation_id", correlation_id)?,
        causation_id: header(X_CAUSATION_ID),
        tenant_id,
        trace_id: non_empty("trace_id", trace_id)?,
        content_type: m.headers.get_ignore_case(X_CONTENT_TYPE).map(str::to_owned),
        headers,
        // The text between `"payload":` and the next `,` or `}`, whitespace included, so
        // that encoding the envelope again writes the same bytes.
        payload: Bytes::copy_from_slice(json::verbatim(body, payload).as_bytes()),
    })
}
