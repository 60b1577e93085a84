//! Tests against bytes other implementations wrote: jxt-core (the Go peer) and the official
//! CloudEvents SDK, stored under `tests/data/` (see the READMEs there).

use bytes::Bytes;
use chrono::TimeZone as _;
use serde_json::Value;

use super::*;
use crate::headers::Headers;
use crate::message::Position;

fn message(headers: Headers, body: &str) -> InboundMessage {
    InboundMessage {
        topic: "orders".into(),
        key: None,
        headers,
        payload: Bytes::from(body.to_owned()),
        position: Position {
            partition: 0,
            offset: 1,
        },
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture is JSON")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

// ---- jxt-core ----

const ENCODED: &str = include_str!("../../tests/data/jxt-core/v1.7.5-encoded.json");
const BODIES: [&str; 2] = [
    include_str!("../../tests/data/jxt-core/v1.1.35-bodies.json"),
    include_str!("../../tests/data/jxt-core/v1.7.5-bodies.json"),
];

/// The one case whose version (2^63, wrapped by Go to -2^63) jxt-core cannot carry.
const WRAPPED_VERSION: &str = "e-u64";

#[test]
fn jxt_core_bytes_decode_and_encode_to_the_same_bytes() {
    let fixture = parse(ENCODED);
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 17);
    for case in cases {
        let id = str_of(case, "event_id");
        if id == WRAPPED_VERSION {
            continue;
        }
        let bytes = str_of(case, "jxt_core_bytes");
        let e = Codec::decode(&message(Headers::new(), bytes))
            .unwrap_or_else(|err| panic!("{id}: {err}"));
        assert_eq!(e.event_id, id);
        assert_eq!(e.aggregate_id, str_of(case, "aggregate_id"));
        for style in [
            HeaderStyle::HyphenPercentEncoded,
            HeaderStyle::UnderscorePlain,
        ] {
            let m = Codec::JxtJson
                .encode(&e, style, "")
                .unwrap_or_else(|err| panic!("{id}: {err}"));
            assert_eq!(std::str::from_utf8(&m.payload).unwrap(), bytes, "{id}");
        }
    }
}

#[test]
fn jxt_core_wrapped_version_is_refused_both_ways() {
    let fixture = parse(ENCODED);
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["event_id"] == WRAPPED_VERSION)
        .unwrap();
    let err = Codec::decode(&message(Headers::new(), str_of(case, "jxt_core_bytes"))).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Invalid { name, .. } if name == "event_version"),
        "{err}"
    );
    // The envelope jxt-core was given: ours refuses it at encode instead of wrapping.
    let e = Envelope::new("o-4", "T", 1 << 63, "{}")
        .unwrap()
        .with_event_id("e-u64");
    for codec in [Codec::JxtJson, Codec::JxtJsonStringTenant] {
        let err = codec
            .encode(&e, HeaderStyle::UnderscorePlain, "s")
            .unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::InvalidEnvelope(EnvelopeError::Unencodable {
                    field: "event_version",
                    ..
                })
            ),
            "{err}"
        );
    }
}

/// Bodies jxt-core refuses and we read: documented in docs/wire-format.md ("What we accept
/// beyond jxt-core").
const ACCEPTED_BEYOND_JXT_CORE: [(&str, &str); 4] = [
    ("v1.1.35", "probe: tenant_id number 42"),
    ("v1.7.5", "probe: tenant_id string \"42\""),
    ("v1.1.35", "probe: aggregate id with space"),
    ("v1.7.5", "probe: aggregate id with space"),
];

#[test]
fn jxt_core_bodies_are_read_as_jxt_core_reads_them() {
    for text in BODIES {
        let fixture = parse(text);
        let version = str_of(&fixture, "jxt_core_version");
        for case in fixture["cases"].as_array().unwrap() {
            let name = str_of(case, "name");
            let ours = Codec::decode(&message(Headers::new(), str_of(case, "body")));
            let beyond = ACCEPTED_BEYOND_JXT_CORE.contains(&(version, name));
            match (case["jxt_core_accepts"].as_bool().unwrap(), &ours) {
                (true, Err(err)) => panic!("{version} {name}: jxt-core accepts, we refuse: {err}"),
                (false, Ok(_)) if !beyond => {
                    panic!("{version} {name}: jxt-core refuses, we accept (undocumented)")
                }
                (false, Err(_)) if beyond => {
                    panic!("{version} {name}: documented as accepted, but refused")
                }
                _ => {}
            }
        }
    }
}

#[test]
fn jxt_core_bodies_decode_to_their_values() {
    let fixture = parse(BODIES[1]);
    let decode = |name: &str| {
        let case = fixture["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name}"));
        Codec::decode(&message(Headers::new(), str_of(case, "body"))).unwrap()
    };
    // A local UTC offset: the same instant, in UTC.
    let e = decode("full, local +08:00 time, tenant int 7");
    assert_eq!(
        e.occurred_at,
        chrono::Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 5).unwrap()
            + chrono::Duration::milliseconds(120)
    );
    assert_eq!(e.tenant_id.as_deref(), Some("7"));
    assert_eq!(e.aggregate_id, "order:1/a_b.c-d");
    assert_eq!(
        e.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(&e.payload[..], br#"{"total":42,"note":"a<b"}"#);
    // Keys in upper case.
    let e = decode("probe: upper-case keys");
    assert_eq!(
        (
            e.event_id.as_str(),
            e.aggregate_id.as_str(),
            e.event_type.as_str()
        ),
        ("p", "o-1", "T")
    );
    assert_eq!(&e.payload[..], b"{}");
    // No timestamp: Go's zero time, which jxt-core holds for it.
    let e = decode("probe: no timestamp");
    assert_eq!(
        e.occurred_at,
        chrono::Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap()
    );
    let again = Codec::JxtJson
        .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
    assert!(
        std::str::from_utf8(&again.payload)
            .unwrap()
            .contains(r#""timestamp":"0001-01-01T00:00:00Z""#)
    );
    let e = decode("html-escaped event type, string payload");
    assert_eq!(e.event_type, "T<&>");
    assert_eq!(&e.payload[..], br#""text""#);
}

// ---- CloudEvents ----

/// The event every CloudEvents fixture carries.
fn expected() -> Envelope {
    Envelope::unchecked(
        "order-1",
        "OrderCreated",
        3,
        r#"{"total": 42, "note": "a<b"}"#,
    )
    .with_event_id("0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
    .with_occurred_at(
        chrono::Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 5).unwrap()
            + chrono::Duration::milliseconds(120),
    )
    .with_source("orders-service")
    .with_correlation_id("checkout 7 \"ü\" 100%")
    .with_causation_id("cmd-1")
    .with_tenant_id("42")
    .with_content_type("application/json")
}

fn ce_message(text: &str) -> InboundMessage {
    let fixture = parse(text);
    let headers: Headers = fixture["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut m = message(headers, str_of(&fixture, "body"));
    m.key = fixture["key"].as_str().map(str::to_owned);
    m
}

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!("../../tests/data/cloudevents/", $name)),
        )
    };
}

#[test]
fn cloudevents_sdk_messages_decode_to_the_event() {
    for ((name, text), mode) in [
        (fixture!("sdk-http-binary.json"), Codec::CloudEvents),
        (fixture!("sdk-kafka-binary.json"), Codec::CloudEvents),
        (
            fixture!("sdk-http-structured.json"),
            Codec::CloudEventsStructured,
        ),
        (
            fixture!("sdk-kafka-structured.json"),
            Codec::CloudEventsStructured,
        ),
    ] {
        let m = ce_message(text);
        assert_eq!(Codec::detect(&m), Some(mode), "{name}");
        let e = Codec::decode(&m).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(e, expected(), "{name}");
    }
    // Data that is not JSON: text as a JSON string, bytes as `data_base64`.
    let (_, text) = fixture!("sdk-http-structured-text.json");
    let e = Codec::decode(&ce_message(text)).unwrap();
    let mut want = expected().with_content_type("text/plain");
    want.payload = Bytes::from("hello ü");
    assert_eq!(e, want);
    let (_, text) = fixture!("sdk-http-structured-bytes.json");
    let e = Codec::decode(&ce_message(text)).unwrap();
    want.content_type = Some("application/octet-stream".into());
    want.payload = Bytes::from_static(&[0, 1, 0xfe, 0xff]);
    assert_eq!(e, want);
}

#[test]
fn nats_draft_messages_decode_to_the_event() {
    for (name, text) in [
        fixture!("nats-datacontenttype.json"),
        fixture!("nats-quoted.json"),
        fixture!("nats-1.0.2-structured.json"),
    ] {
        let e = Codec::decode(&ce_message(text)).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(e, expected(), "{name}");
    }
    let (_, text) = fixture!("nats-1.0.2-structured.json");
    assert_eq!(
        Codec::detect(&ce_message(text)),
        Some(Codec::CloudEventsStructured)
    );
}

#[test]
fn nats_binary_mode_writes_the_drafts_names() {
    let (_, text) = fixture!("nats-datacontenttype.json");
    let want = ce_message(text);
    let m = Codec::CloudEvents
        .encode(&expected(), HeaderStyle::HyphenPercentEncoded, "x")
        .unwrap();
    assert_eq!(m.headers, want.headers);
    assert_eq!(m.payload, want.payload);
}
