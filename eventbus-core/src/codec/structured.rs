//! CloudEvents 1.0 structured content mode: the event in the JSON event format as the body,
//! announced by `content-type: application/cloudevents+json`.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::cloudevents::{
    CONTENT_TYPE, SPEC_VERSION, is_ce_header, parse_time, parse_version, source,
};
use super::json::{self, Members};
use super::time::format_rfc3339_nano;
use super::{DecodeError, HeaderStyle};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::Headers;
use crate::message::{EncodedMessage, InboundMessage};

/// The media type of the JSON event format.
pub(super) const MEDIA_TYPE: &str = "application/cloudevents+json";

/// Whether a `content-type` announces a structured CloudEvent (it starts with
/// `application/cloudevents`, any case); an error for the CloudEvents formats this codec
/// cannot read (batches, formats other than JSON).
pub(super) fn announced_by(content_type: &str) -> Result<bool, DecodeError> {
    let media = media_type(content_type);
    let Some(format) = media.strip_prefix("application/cloudevents") else {
        return Ok(false);
    };
    match format {
        "" | "+json" => Ok(true),
        f if f.starts_with("-batch") => Err(DecodeError::invalid(
            CONTENT_TYPE,
            "batched CloudEvents are not supported",
        )),
        _ => Err(DecodeError::invalid(
            CONTENT_TYPE,
            format!("{content_type:?}: only the JSON event format is supported"),
        )),
    }
}

/// The media type without parameters, lower case.
fn media_type(content_type: &str) -> String {
    let media = content_type.split(';').next().unwrap_or_default();
    media.trim().to_ascii_lowercase()
}

/// Whether data of this media type is JSON (`*/json`, `*/*+json`).
fn is_json(content_type: &str) -> bool {
    let media = media_type(content_type);
    media.ends_with("/json") || media.ends_with("+json")
}

fn attribute(out: &mut String, name: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
}

fn text_attribute(out: &mut String, name: &str, value: &str) {
    attribute(out, name);
    json::write_string(out, value, false);
}

pub(super) fn encode(
    e: &Envelope,
    style: HeaderStyle,
    default_source: &str,
) -> Result<EncodedMessage, crate::Error> {
    let mut body = String::with_capacity(256 + e.payload.len() * 4 / 3);
    body.push_str("{\"specversion\":\"1.0\"");
    text_attribute(&mut body, "id", &e.event_id);
    text_attribute(&mut body, "source", source(e, default_source)?);
    text_attribute(&mut body, "type", &e.event_type);
    text_attribute(&mut body, "subject", &e.aggregate_id);
    text_attribute(&mut body, "time", &format_rfc3339_nano(&e.occurred_at));
    if let Some(ct) = &e.content_type {
        text_attribute(&mut body, "datacontenttype", ct);
    }
    // A number where CloudEvents' Integer type (32 bits) holds it, else its decimal text.
    let version = e.event_version.to_string();
    if i32::try_from(e.event_version).is_ok() {
        attribute(&mut body, "aggregateversion");
        body.push_str(&version);
    } else {
        text_attribute(&mut body, "aggregateversion", &version);
    }
    for (name, value) in [
        ("correlationid", &e.correlation_id),
        ("causationid", &e.causation_id),
        ("tenantid", &e.tenant_id),
    ] {
        if let Some(v) = value {
            text_attribute(&mut body, name, v);
        }
    }
    if style == HeaderStyle::UnderscorePlain {
        text_attribute(&mut body, "partitionkey", &e.aggregate_id);
    }
    // JSON data (by its media type, `application/json` when there is none) is embedded as
    // it is; anything else travels as `data_base64`, so every payload comes back unchanged.
    let json_data = std::str::from_utf8(&e.payload).ok().filter(|p| {
        e.content_type.as_deref().is_none_or(is_json)
            && serde_json::from_str::<&RawValue>(p).is_ok()
    });
    match json_data {
        Some(data) => {
            attribute(&mut body, "data");
            body.push_str(data);
        }
        None => text_attribute(&mut body, "data_base64", &BASE64.encode(&e.payload)),
    }
    body.push('}');

    let mut h = Headers::with_capacity(1 + e.headers.len());
    h.push_unique(CONTENT_TYPE, MEDIA_TYPE);
    for (name, v) in e.headers.iter() {
        // A `ce-` header would make readers take the message for binary mode.
        if name.eq_ignore_ascii_case(CONTENT_TYPE) || is_ce_header(name) {
            return Err(EnvelopeError::Header {
                name: name.to_owned(),
                reason: "reserved by the CloudEvents codec",
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

/// An attribute value: CloudEvents types other than String (Integer, Boolean) are read as
/// their text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(serde_json::Number),
    Boolean(bool),
}

/// Decodes a structured CloudEvent whose body has the `members`.
pub(super) fn decode(m: &InboundMessage, members: &Members<'_>) -> Result<Envelope, DecodeError> {
    let get = |name: &'static str| -> Result<Option<String>, DecodeError> {
        let Some(raw) = json::get(members, name) else {
            return Ok(None);
        };
        match serde_json::from_str::<Option<Scalar>>(raw.get()) {
            Ok(None) => Ok(None),
            Ok(Some(Scalar::Text(s))) => Ok(Some(s)),
            Ok(Some(Scalar::Number(n))) => Ok(Some(n.to_string())),
            Ok(Some(Scalar::Boolean(b))) => Ok(Some(b.to_string())),
            Err(_) => Err(DecodeError::invalid(
                name,
                "not a string, number or boolean",
            )),
        }
    };
    let required = |name: &'static str| get(name)?.ok_or(DecodeError::Missing(name));

    let spec = required("specversion")?;
    if spec != SPEC_VERSION {
        return Err(DecodeError::SpecVersion(spec));
    }
    let content_type = get("datacontenttype")?;
    let data = json::get(members, "data").filter(|d| d.get() != "null");
    let payload = match (data, get("data_base64")?) {
        (Some(_), Some(_)) => {
            return Err(DecodeError::invalid(
                "data",
                "both data and data_base64 are present",
            ));
        }
        (Some(data), None) => match serde_json::from_str::<String>(data.get()) {
            // Text data of a media type that is not JSON travels as a JSON string.
            Ok(text) if !content_type.as_deref().is_none_or(is_json) => Bytes::from(text),
            _ => Bytes::copy_from_slice(data.get().as_bytes()),
        },
        (None, Some(b64)) => BASE64
            .decode(b64.as_bytes())
            .map(Bytes::from)
            .map_err(|e| DecodeError::invalid("data_base64", e.to_string()))?,
        (None, None) => Bytes::new(),
    };
    let mut headers = Headers::new();
    for (name, v) in m.headers.iter() {
        if !name.eq_ignore_ascii_case(CONTENT_TYPE) {
            headers.insert(Cow::Owned(name.to_owned()), v);
        }
    }
    Ok(Envelope {
        event_id: required("id")?,
        aggregate_id: required("subject")?,
        event_type: required("type")?,
        event_version: parse_version("aggregateversion", &required("aggregateversion")?)?,
        occurred_at: parse_time("time", &required("time")?)?,
        source: Some(required("source")?),
        correlation_id: get("correlationid")?,
        causation_id: get("causationid")?,
        tenant_id: get("tenantid")?,
        trace_id: None,
        content_type,
        headers,
        payload,
    })
}
