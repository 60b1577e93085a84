//! jxt-core's JSON envelope, byte-compatible with what jxt-core writes (jsoniter's
//! `ConfigCompatibleWithStandardLibrary`: struct field order, `omitempty`, HTML-safe string
//! escaping, a `RawMessage` payload written verbatim).

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::time::{format_rfc3339_nano, parse_rfc3339};
use super::{DecodeError, HeaderStyle};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::Headers;
use crate::message::{InboundMessage, OutboundMessage};

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

/// Whether jxt-core accepts this aggregate id: `[A-Za-z0-9:_./-]`, 1 to 256 characters.
pub fn jxt_compatible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_./-".contains(&b))
}

/// Writes `s` as a JSON string the way Go's `encoding/json` and jsoniter's standard-library
/// configuration do (HTML-safe escaping of `<`, `>`, `&`, and of U+2028 / U+2029).
fn write_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub(super) fn encode(
    e: &Envelope,
    _style: HeaderStyle,
    default_source: &str,
) -> Result<OutboundMessage, crate::Error> {
    let payload = std::str::from_utf8(&e.payload)
        .ok()
        .filter(|p| serde_json::from_str::<&RawValue>(p).is_ok())
        .ok_or(EnvelopeError::Header {
            name: "payload".to_owned(),
            reason: "the jxt JSON codec carries JSON payloads only",
        })?;
    let mut body = String::with_capacity(160 + e.payload.len());
    body.push_str("{\"event_id\":");
    write_go_string(&mut body, &e.event_id);
    body.push_str(",\"aggregate_id\":");
    write_go_string(&mut body, &e.aggregate_id);
    body.push_str(",\"event_type\":");
    write_go_string(&mut body, &e.event_type);
    body.push_str(",\"event_version\":");
    body.push_str(&e.event_version.to_string());
    body.push_str(",\"timestamp\":\"");
    body.push_str(&format_rfc3339_nano(&e.occurred_at));
    body.push('"');
    if let Some(t) = &e.trace_id {
        body.push_str(",\"trace_id\":");
        write_go_string(&mut body, t);
    }
    if let Some(c) = &e.correlation_id {
        body.push_str(",\"correlation_id\":");
        write_go_string(&mut body, c);
    }
    if let Some(t) = &e.tenant_id {
        body.push_str(",\"tenant_id\":");
        write_go_string(&mut body, t);
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
            || name.to_ascii_lowercase().starts_with("ce_")
            || name.to_ascii_lowercase().starts_with("ce-")
        {
            return Err(EnvelopeError::Header {
                name: name.to_owned(),
                reason: "reserved by the codec",
            }
            .into());
        }
        h.insert(Cow::Owned(name.to_owned()), v);
    }
    Ok(OutboundMessage {
        key: e.aggregate_id.clone(),
        headers: h,
        payload: Bytes::from(body),
        id: Some(e.event_id.clone()),
    })
}

/// `tenant_id` has been a string in some jxt-core releases and a number in others.
#[derive(Deserialize)]
#[serde(untagged)]
enum Tenant {
    Text(String),
    Number(serde_json::Number),
}

#[derive(Deserialize)]
struct Wire<'a> {
    event_id: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    event_version: Option<serde_json::Number>,
    timestamp: Option<String>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<Tenant>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

pub(super) fn decode(m: &InboundMessage) -> Result<Envelope, DecodeError> {
    let w: Wire<'_> = serde_json::from_slice(&m.payload).map_err(|e| {
        DecodeError::UnknownFormat(format!(
            "no ce-specversion header and the body is not a jxt envelope: {e}"
        ))
    })?;
    let version = w
        .event_version
        .ok_or(DecodeError::Missing("event_version"))?;
    let event_version = version.as_u64().ok_or_else(|| {
        DecodeError::invalid(
            "event_version",
            format!("{version} is not a positive integer"),
        )
    })?;
    let timestamp = w.timestamp.ok_or(DecodeError::Missing("timestamp"))?;
    let occurred_at = parse_rfc3339(&timestamp).ok_or_else(|| {
        DecodeError::invalid("timestamp", format!("{timestamp:?} is not RFC 3339"))
    })?;
    // A JSON `null` payload deserializes as absent: both are "missing".
    let payload = w.payload.ok_or(DecodeError::Missing("payload"))?;
    let mut headers = Headers::new();
    for (name, v) in m.headers.iter() {
        if !OWN_HEADERS.iter().any(|o| o.eq_ignore_ascii_case(name)) {
            headers.insert(Cow::Owned(name.to_owned()), v);
        }
    }
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(Envelope {
        event_id: w.event_id.ok_or(DecodeError::Missing("event_id"))?,
        aggregate_id: w.aggregate_id.ok_or(DecodeError::Missing("aggregate_id"))?,
        event_type: w.event_type.ok_or(DecodeError::Missing("event_type"))?,
        event_version,
        occurred_at,
        source: non_empty(m.headers.get_ignore_case(X_EVENT_SOURCE).map(str::to_owned)),
        correlation_id: non_empty(w.correlation_id),
        causation_id: non_empty(m.headers.get_ignore_case(X_CAUSATION_ID).map(str::to_owned)),
        tenant_id: match w.tenant_id {
            None => None,
            Some(Tenant::Text(t)) => non_empty(Some(t)),
            Some(Tenant::Number(n)) => Some(n.to_string()),
        },
        trace_id: non_empty(w.trace_id),
        content_type: m.headers.get_ignore_case(X_CONTENT_TYPE).map(str::to_owned),
        headers,
        payload: Bytes::copy_from_slice(payload.get().as_bytes()),
    })
}
