//! Round-trip, golden (byte-exact) and bad-input tests of both codecs.

use bytes::Bytes;
use chrono::TimeZone as _;

use super::*;
use crate::headers::Headers;
use crate::message::Position;

fn golden_envelope() -> Envelope {
    let at = chrono::Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 5).unwrap()
        + chrono::Duration::nanoseconds(120_000_000);
    Envelope::new(
        "order-1",
        "OrderCreated",
        3,
        r#"{"total": 42, "note": "a<b"}"#,
    )
    .unwrap()
    .with_event_id("0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
    .with_occurred_at(at)
    .with_correlation_id("checkout 7")
    .with_causation_id("cmd-1")
    .with_tenant_id("42")
    .with_content_type("application/json")
    .with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
}

fn inbound(m: &OutboundMessage) -> InboundMessage {
    InboundMessage {
        topic: "orders".into(),
        key: Some(m.key.clone()),
        headers: m.headers.clone(),
        payload: m.payload.clone(),
        position: Position {
            partition: 0,
            offset: 7,
        },
    }
}

fn pairs(h: &Headers) -> Vec<(&str, &str)> {
    h.iter().collect()
}

#[test]
fn cloudevents_nats_golden() {
    let m = Codec::CloudEvents
        .encode(&golden_envelope(), HeaderStyle::Nats, "orders-service")
        .unwrap();
    assert_eq!(m.key, "order-1");
    assert_eq!(
        pairs(&m.headers),
        vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            ("ce-source", "orders-service"),
            ("ce-type", "OrderCreated"),
            ("ce-time", "2026-03-01T12:30:05.12Z"),
            ("ce-subject", "order-1"),
            ("ce-aggregateversion", "3"),
            ("ce-correlationid", "checkout%207"),
            ("ce-causationid", "cmd-1"),
            ("ce-tenantid", "42"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
        ]
    );
    assert_eq!(&m.payload[..], br#"{"total": 42, "note": "a<b"}"#);
}

#[test]
fn cloudevents_kafka_golden() {
    let m = Codec::CloudEvents
        .encode(&golden_envelope(), HeaderStyle::Kafka, "orders-service")
        .unwrap();
    assert_eq!(
        pairs(&m.headers),
        vec![
            ("ce_specversion", "1.0"),
            ("ce_id", "0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            ("ce_source", "orders-service"),
            ("ce_type", "OrderCreated"),
            ("ce_time", "2026-03-01T12:30:05.12Z"),
            ("ce_subject", "order-1"),
            ("ce_aggregateversion", "3"),
            ("ce_partitionkey", "order-1"),
            ("ce_correlationid", "checkout 7"),
            ("ce_causationid", "cmd-1"),
            ("ce_tenantid", "42"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
        ]
    );
    assert_eq!(m.key, "order-1");
}

#[test]
fn jxt_golden() {
    let e = golden_envelope().with_trace_id("4bf92f3577b34da6a3ce929d0e0e4736");
    let m = Codec::JxtJson
        .encode(&e, HeaderStyle::Kafka, "orders-service")
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&m.payload).unwrap(),
        concat!(
            r#"{"event_id":"0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","aggregate_id":"order-1","#,
            r#""event_type":"OrderCreated","event_version":3,"timestamp":"2026-03-01T12:30:05.12Z","#,
            r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","correlation_id":"checkout 7","#,
            r#""tenant_id":"42","payload":{"total": 42, "note": "a<b"}}"#
        )
    );
    assert_eq!(
        pairs(&m.headers),
        vec![
            ("X-Event-ID", "0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            ("X-Aggregate-ID", "order-1"),
            ("X-Event-Version", "3"),
            ("X-Event-Type", "OrderCreated"),
            ("X-Causation-ID", "cmd-1"),
            ("X-Event-Source", "orders-service"),
            ("X-Content-Type", "application/json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
        ]
    );
    assert_eq!(m.key, "order-1");
}

#[test]
fn round_trips() {
    let original = golden_envelope().with_source("checkout");
    for style in [HeaderStyle::Nats, HeaderStyle::Kafka] {
        let m = Codec::CloudEvents.encode(&original, style, "x").unwrap();
        let back = Codec::decode(&inbound(&m)).unwrap();
        assert_eq!(back, original, "{style:?}");
        assert_eq!(Codec::detect(&inbound(&m)), Codec::CloudEvents);
    }
    let with_trace = original.clone().with_trace_id("abc");
    let m = Codec::JxtJson
        .encode(&with_trace, HeaderStyle::Nats, "x")
        .unwrap();
    let back = Codec::decode(&inbound(&m)).unwrap();
    assert_eq!(Codec::detect(&inbound(&m)), Codec::JxtJson);
    // The payload is embedded verbatim; everything survives.
    assert_eq!(back, with_trace);
}

#[test]
fn nats_percent_encoding() {
    let e = Envelope::new("aggregate ü \"1\" 100%", "T", 1, "x")
        .unwrap()
        .with_event_id("id")
        .with_occurred_at(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let m = Codec::CloudEvents
        .encode(&e, HeaderStyle::Nats, "s")
        .unwrap();
    assert_eq!(
        m.headers.get("ce-subject"),
        Some("aggregate%20%C3%BC%20%221%22%20100%25")
    );
    assert_eq!(m.headers.get("ce-time"), Some("2026-01-01T00:00:00Z"));
    let back = Codec::decode(&inbound(&m)).unwrap();
    assert_eq!(back.aggregate_id, "aggregate ü \"1\" 100%");
    // Kafka values stay plain UTF-8.
    let k = Codec::CloudEvents
        .encode(&e, HeaderStyle::Kafka, "s")
        .unwrap();
    assert_eq!(k.headers.get("ce_subject"), Some("aggregate ü \"1\" 100%"));
}

#[test]
fn jxt_string_escaping_matches_go() {
    let e = Envelope::new("a", "T<&>", 1, "[\"\\u2028\", \"<\"]")
        .unwrap()
        .with_event_id("line\u{2028}sep")
        .with_occurred_at(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let m = Codec::JxtJson.encode(&e, HeaderStyle::Nats, "s").unwrap();
    let body = std::str::from_utf8(&m.payload).unwrap();
    assert!(
        body.contains(r#""event_type":"T\u003c\u0026\u003e""#),
        "{body}"
    );
    assert!(body.contains(r#""event_id":"line\u2028sep""#), "{body}");
    assert!(body.ends_with(r#""payload":["\u2028", "<"]}"#), "{body}");
}

#[test]
fn jxt_decoding_accepts_go_variants() {
    let msg = |body: &str| InboundMessage {
        topic: "business.orders".into(),
        key: None,
        headers: Headers::new(),
        payload: Bytes::from(body.to_owned()),
        position: Position {
            partition: 0,
            offset: 1,
        },
    };
    // tenant_id as a number, a local offset, and omitted optional fields.
    let e = Codec::decode(&msg(
        r#"{"event_id":"e1","aggregate_id":"o-1","event_type":"T","event_version":2,"timestamp":"2026-01-01T08:00:00.5+08:00","tenant_id":7,"payload":{"x":1}}"#,
    ))
    .unwrap();
    assert_eq!(e.tenant_id.as_deref(), Some("7"));
    assert_eq!(
        e.occurred_at,
        chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
            + chrono::Duration::milliseconds(500)
    );
    assert_eq!(&e.payload[..], br#"{"x":1}"#);
    assert_eq!((e.correlation_id, e.trace_id), (None, None));
    // Empty optional strings count as absent.
    let e = Codec::decode(&msg(
        r#"{"event_id":"e1","aggregate_id":"o-1","event_type":"T","event_version":1,"timestamp":"2026-01-01T00:00:00Z","trace_id":"","correlation_id":"","tenant_id":"","payload":"text"}"#,
    ))
    .unwrap();
    assert_eq!(
        (e.correlation_id, e.trace_id, e.tenant_id),
        (None, None, None)
    );
    assert_eq!(&e.payload[..], br#""text""#);
}

#[test]
fn bad_input_is_a_clear_error() {
    let style = HeaderStyle::Nats;
    let good = Codec::CloudEvents
        .encode(&golden_envelope(), style, "s")
        .unwrap();
    let with = |f: &dyn Fn(&mut Headers)| {
        let mut m = inbound(&good);
        f(&mut m.headers);
        Codec::decode(&m).unwrap_err()
    };
    assert_eq!(
        with(&|h| {
            h.remove("ce-id");
        }),
        DecodeError::Missing("ce-id")
    );
    assert_eq!(
        with(&|h| h.insert("ce-specversion", "0.3")),
        DecodeError::SpecVersion("0.3".into())
    );
    assert!(matches!(
        with(&|h| h.insert("ce-aggregateversion", "x")),
        DecodeError::Invalid { .. }
    ));
    assert!(matches!(
        with(&|h| h.insert("ce-aggregateversion", "-1")),
        DecodeError::Invalid { .. }
    ));
    assert_eq!(
        with(&|h| h.insert("ce-aggregateversion", "0")),
        DecodeError::Envelope(EnvelopeError::ZeroVersion)
    );
    assert!(matches!(
        with(&|h| h.insert("ce-time", "soon")),
        DecodeError::Invalid { .. }
    ));
    assert!(matches!(
        with(&|h| h.insert("ce-subject", "%FF")),
        DecodeError::Invalid { .. }
    ));
    assert_eq!(
        with(&|h| h.insert("ce-subject", "%20")),
        DecodeError::Envelope(EnvelopeError::Blank {
            field: "aggregate_id"
        })
    );
    let mut empty = inbound(&good);
    empty.payload = Bytes::new();
    assert_eq!(
        Codec::decode(&empty).unwrap_err(),
        DecodeError::Envelope(EnvelopeError::EmptyPayload)
    );

    let jxt = |body: &str| {
        Codec::decode(&InboundMessage {
            topic: "t".into(),
            key: None,
            headers: Headers::new(),
            payload: Bytes::from(body.to_owned()),
            position: Position {
                partition: 0,
                offset: 0,
            },
        })
        .unwrap_err()
    };
    assert!(matches!(jxt("garbage"), DecodeError::UnknownFormat(_)));
    assert!(matches!(jxt("{}"), DecodeError::Missing(_)));
    assert!(matches!(
        jxt(
            r#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1.5,"timestamp":"2026-01-01T00:00:00Z","payload":{}}"#
        ),
        DecodeError::Invalid { .. }
    ));
    assert_eq!(
        jxt(
            r#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1,"timestamp":"2026-01-01T00:00:00Z","payload":null}"#
        ),
        DecodeError::Missing("payload")
    );

    // Encoding refuses what the codec cannot carry.
    let not_json = Envelope::new("a", "T", 1, "not json").unwrap();
    assert!(Codec::JxtJson.encode(&not_json, style, "s").is_err());
    let reserved = golden_envelope().with_header("ce-id", "x");
    assert!(Codec::CloudEvents.encode(&reserved, style, "s").is_err());
    let reserved = golden_envelope().with_header("X-Event-ID", "x");
    assert!(Codec::JxtJson.encode(&reserved, style, "s").is_err());
    assert!(
        Codec::CloudEvents
            .encode(&golden_envelope(), style, " ")
            .is_err()
    );
}

#[test]
fn jxt_id_rule() {
    assert!(jxt_compatible_id("order:1/a_b.c-d"));
    assert!(!jxt_compatible_id("order 1"));
    assert!(!jxt_compatible_id("ü"));
    assert!(!jxt_compatible_id(&"a".repeat(257)));
}
