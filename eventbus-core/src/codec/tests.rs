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

fn inbound(m: &EncodedMessage) -> InboundMessage {
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
        .encode(
            &golden_envelope(),
            HeaderStyle::HyphenPercentEncoded,
            "orders-service",
        )
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
            // The NATS binding draft's name; Kafka's binding uses `content-type`.
            ("ce-datacontenttype", "application/json"),
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
        .encode(
            &golden_envelope(),
            HeaderStyle::UnderscorePlain,
            "orders-service",
        )
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
        .encode(&e, HeaderStyle::UnderscorePlain, "orders-service")
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&m.payload).unwrap(),
        concat!(
            r#"{"event_id":"0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","aggregate_id":"order-1","#,
            r#""event_type":"OrderCreated","event_version":3,"timestamp":"2026-03-01T12:30:05.12Z","#,
            r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","correlation_id":"checkout 7","#,
            r#""tenant_id":42,"payload":{"total": 42, "note": "a<b"}}"#
        )
    );
    // For jxt-core up to v1.1.35.
    let old = Codec::JxtJsonStringTenant
        .encode(&e, HeaderStyle::UnderscorePlain, "orders-service")
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&old.payload).unwrap(),
        std::str::from_utf8(&m.payload)
            .unwrap()
            .replace(r#""tenant_id":42"#, r#""tenant_id":"42""#)
    );
    assert_eq!(old.headers, m.headers);
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
    for style in [
        HeaderStyle::HyphenPercentEncoded,
        HeaderStyle::UnderscorePlain,
    ] {
        for codec in [Codec::CloudEvents, Codec::CloudEventsStructured] {
            let m = codec.encode(&original, style, "x").unwrap();
            let back = Codec::decode(&inbound(&m)).unwrap();
            assert_eq!(back, original, "{codec:?} {style:?}");
            assert_eq!(Codec::detect(&inbound(&m)), Some(codec));
        }
    }
    let with_trace = original.clone().with_trace_id("abc");
    for codec in [Codec::JxtJson, Codec::JxtJsonStringTenant] {
        let m = codec
            .encode(&with_trace, HeaderStyle::HyphenPercentEncoded, "x")
            .unwrap();
        let back = Codec::decode(&inbound(&m)).unwrap();
        assert_eq!(Codec::detect(&inbound(&m)), Some(Codec::JxtJson));
        // The payload is embedded verbatim; everything survives.
        assert_eq!(back, with_trace, "{codec:?}");
    }
}

#[test]
fn nats_percent_encoding() {
    let e = Envelope::new("aggregate ü \"1\" 100%", "T", 1, "x")
        .unwrap()
        .with_event_id("id")
        .with_occurred_at(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let m = Codec::CloudEvents
        .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
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
        .encode(&e, HeaderStyle::UnderscorePlain, "s")
        .unwrap();
    assert_eq!(k.headers.get("ce_subject"), Some("aggregate ü \"1\" 100%"));
}

#[test]
fn jxt_string_escaping_matches_go() {
    let e = Envelope::new("a", "T<&>", 1, "[\"\\u2028\", \"<\"]")
        .unwrap()
        .with_event_id("line\u{2028}sep")
        .with_occurred_at(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let m = Codec::JxtJson
        .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
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
    let style = HeaderStyle::HyphenPercentEncoded;
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
    assert!(matches!(jxt("{}"), DecodeError::UnknownFormat(_)));
    assert_eq!(
        jxt(r#"{"event_id":"e","payload":{}}"#),
        DecodeError::Missing("event_version")
    );
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
    assert!(matches!(
        Codec::JxtJson.encode(&not_json, style, "s").unwrap_err(),
        crate::Error::InvalidEnvelope(EnvelopeError::Unencodable {
            field: "payload",
            ..
        })
    ));
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

/// Header name and value pairs.
type Pairs<'a> = &'a [(&'static str, &'a str)];

fn raw(headers: Pairs<'_>, body: &str) -> InboundMessage {
    InboundMessage {
        topic: "t".into(),
        key: None,
        headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        payload: Bytes::from(body.to_owned()),
        position: Position {
            partition: 0,
            offset: 0,
        },
    }
}

#[test]
fn jxt_tenant_id_is_a_number_by_default() {
    let body = |codec: Codec, tenant: &str| {
        let e = Envelope::new("a", "T", 1, "{}")
            .unwrap()
            .with_event_id("e")
            .with_occurred_at(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
            .with_tenant_id(tenant);
        codec
            .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
    };
    let prefix = r#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1,"timestamp":"2026-01-01T00:00:00Z""#;
    assert_eq!(
        body(Codec::JxtJson, "42").unwrap(),
        format!(r#"{prefix},"tenant_id":42,"payload":{{}}}}"#)
    );
    assert_eq!(
        body(Codec::JxtJson, "-9223372036854775808").unwrap(),
        format!(r#"{prefix},"tenant_id":-9223372036854775808,"payload":{{}}}}"#)
    );
    // jxt-core's `int` with `omitempty`: 0 is no tenant.
    assert_eq!(
        body(Codec::JxtJson, "0").unwrap(),
        format!(r#"{prefix},"payload":{{}}}}"#)
    );
    for bad in ["tenant 9", "007", "+7", "-0", "1e3", "9223372036854775808"] {
        let err = body(Codec::JxtJson, bad).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::InvalidEnvelope(EnvelopeError::Unencodable {
                    field: "tenant_id",
                    ..
                })
            ),
            "{bad}: {err}"
        );
        // The error names the option.
        let text = err.to_string();
        assert!(
            text.contains("JxtJsonStringTenant") && text.contains("jxt_tenant_id"),
            "{text}"
        );
        assert_eq!(
            body(Codec::JxtJsonStringTenant, bad).unwrap(),
            format!(r#"{prefix},"tenant_id":"{bad}","payload":{{}}}}"#)
        );
    }
    // Both forms are read; a number outside jxt-core's int is refused.
    let read = |tenant: &str| {
        Codec::decode(&raw(
            &[],
            &format!(r#"{prefix},"tenant_id":{tenant},"payload":{{}}}}"#),
        ))
        .map(|e| e.tenant_id)
    };
    assert_eq!(read("42"), Ok(Some("42".into())));
    assert_eq!(read(r#""tenant 9""#), Ok(Some("tenant 9".into())));
    assert_eq!(read("0"), Ok(None));
    assert_eq!(read("null"), Ok(None));
    assert!(matches!(read("4.5"), Err(DecodeError::Invalid { .. })));
    assert!(matches!(
        read("9223372036854775808"),
        Err(DecodeError::Invalid { .. })
    ));
}

#[test]
fn jxt_version_fits_int64() {
    let e = Envelope::new("a", "T", i64::MAX as u64, "{}").unwrap();
    assert!(
        Codec::JxtJson
            .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
            .is_ok()
    );
    let e = Envelope::new("a", "T", i64::MAX as u64 + 1, "{}").unwrap();
    for codec in [Codec::JxtJson, Codec::JxtJsonStringTenant] {
        let err = codec
            .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
            .unwrap_err();
        assert!(err.to_string().contains("int64"), "{err}");
    }
    // CloudEvents carries any u64.
    let m = Codec::CloudEvents
        .encode(&e, HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
    assert_eq!(Codec::decode(&inbound(&m)).unwrap().event_version, 1 << 63);
}

#[test]
fn jxt_keys_in_any_case_later_duplicates_win() {
    let e = Codec::decode(&raw(
        &[],
        r#"{"Event_ID":"x","event_id":"e","AGGREGATE_id":"a","Event_Type":"T","EVENT_VERSION":2,"TimeStamp":"2026-01-01T00:00:00Z","Tenant_Id":3,"PAYLOAD": [1] ,"unknown":true}"#,
    ))
    .unwrap();
    assert_eq!(
        (
            e.event_id.as_str(),
            e.aggregate_id.as_str(),
            e.event_type.as_str(),
            e.event_version,
            e.tenant_id.as_deref()
        ),
        ("e", "a", "T", 2, Some("3"))
    );
    // Verbatim, with the whitespace around the value.
    assert_eq!(&e.payload[..], b" [1] ");
    // jxt-core folds ASCII letters only.
    assert_eq!(
        Codec::decode(&raw(
            &[],
            r#"{"event_ıd":"e","aggregate_id":"a","event_type":"T","event_version":1,"payload":{}}"#
        )),
        Err(DecodeError::Missing("event_id"))
    );
}

#[test]
fn nats_header_values_in_double_quotes_are_unescaped_first() {
    let good = Codec::CloudEvents
        .encode(&golden_envelope(), HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
    let mut m = inbound(&good);
    m.headers
        .insert("ce-correlationid", r#""a \"b\" \\ %C3%BC%25""#);
    m.headers.insert("ce-id", r#"  "id-1"  "#);
    let e = Codec::decode(&m).unwrap();
    assert_eq!(e.correlation_id.as_deref(), Some(r#"a "b" \ ü%"#));
    assert_eq!(e.event_id, "id-1");
    // Kafka values are taken as they are.
    let good = Codec::CloudEvents
        .encode(&golden_envelope(), HeaderStyle::UnderscorePlain, "s")
        .unwrap();
    let mut m = inbound(&good);
    m.headers.insert("ce_correlationid", r#""q%20""#);
    let e = Codec::decode(&m).unwrap();
    assert_eq!(e.correlation_id.as_deref(), Some(r#""q%20""#));
}

#[test]
fn nats_reads_content_type_and_header_names_in_any_case() {
    let good = Codec::CloudEvents
        .encode(&golden_envelope(), HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
    let mut m = inbound(&good);
    let ct = m.headers.remove("ce-datacontenttype").unwrap();
    m.headers.insert("Content-Type", ct);
    let spec = m.headers.remove("ce-specversion").unwrap();
    m.headers.insert("CE-SpecVersion", spec);
    assert_eq!(
        Codec::decode(&m).unwrap(),
        golden_envelope().with_source("s")
    );
}

#[test]
fn structured_mode_golden_and_round_trips() {
    let e = golden_envelope();
    let m = Codec::CloudEventsStructured
        .encode(&e, HeaderStyle::HyphenPercentEncoded, "orders-service")
        .unwrap();
    assert_eq!(
        pairs(&m.headers),
        vec![
            ("content-type", "application/cloudevents+json"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
        ]
    );
    assert_eq!(
        std::str::from_utf8(&m.payload).unwrap(),
        concat!(
            r#"{"specversion":"1.0","id":"0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","#,
            r#""source":"orders-service","type":"OrderCreated","subject":"order-1","#,
            r#""time":"2026-03-01T12:30:05.12Z","datacontenttype":"application/json","#,
            r#""aggregateversion":3,"correlationid":"checkout 7","causationid":"cmd-1","#,
            r#""tenantid":"42","data":{"total": 42, "note": "a<b"}}"#
        )
    );
    assert_eq!(m.key, "order-1");
    let k = Codec::CloudEventsStructured
        .encode(&e, HeaderStyle::UnderscorePlain, "orders-service")
        .unwrap();
    assert!(
        std::str::from_utf8(&k.payload)
            .unwrap()
            .contains(r#""tenantid":"42","partitionkey":"order-1","data":"#)
    );

    // Payloads of every kind come back unchanged; big versions travel as text.
    let cases = [
        e.clone(),
        e.clone().with_content_type("text/plain; charset=utf-8"),
        Envelope {
            content_type: None,
            payload: Bytes::from_static(b"\x00not json\xff"),
            ..e.clone()
        },
        Envelope {
            event_version: 1 << 40,
            ..e.clone()
        },
        e.clone().with_content_type("application/cloudevents+json"),
    ];
    for original in cases {
        for style in [
            HeaderStyle::HyphenPercentEncoded,
            HeaderStyle::UnderscorePlain,
        ] {
            let m = Codec::CloudEventsStructured
                .encode(&original, style, "s")
                .unwrap();
            let mut back = Codec::decode(&inbound(&m)).unwrap();
            assert_eq!(back, original.clone().with_source("s"), "{style:?}");
            // What a producer of the NATS binding 1.0.2 sends: the body alone.
            let mut bare = inbound(&m);
            bare.headers = Headers::new();
            back.headers = Headers::new();
            assert_eq!(Codec::decode(&bare).unwrap(), back);
        }
    }
    let text = Codec::CloudEventsStructured
        .encode(
            &e.clone().with_content_type("text/plain"),
            HeaderStyle::HyphenPercentEncoded,
            "s",
        )
        .unwrap();
    assert!(
        std::str::from_utf8(&text.payload)
            .unwrap()
            .contains(r#""data_base64":"eyJ0b3RhbCI6IDQyLCAibm90ZSI6ICJhPGIifQ==""#)
    );
    let big = Envelope {
        event_version: 1 << 40,
        ..e.clone()
    };
    let big = Codec::CloudEventsStructured
        .encode(&big, HeaderStyle::HyphenPercentEncoded, "s")
        .unwrap();
    assert!(
        std::str::from_utf8(&big.payload)
            .unwrap()
            .contains(r#""aggregateversion":"1099511627776""#)
    );
    // A `ce-` application header would make readers take it for binary mode.
    let reserved = e.clone().with_header("ce-trace", "x");
    assert!(
        Codec::CloudEventsStructured
            .encode(&reserved, HeaderStyle::HyphenPercentEncoded, "s")
            .is_err()
    );
}

#[test]
fn structured_mode_reads_what_the_json_format_allows() {
    let ct = [(
        "content-type",
        "Application/CloudEvents+JSON; charset=UTF-8",
    )];
    let base = r#""specversion":"1.0","id":"i","source":"s","type":"T","subject":"a","time":"2026-01-01T00:00:00Z""#;
    let e = Codec::decode(&raw(
        &ct,
        &format!(r#"{{{base},"aggregateversion":"7","data":"x"}}"#),
    ))
    .unwrap();
    // No datacontenttype: JSON, so a string is its JSON text.
    assert_eq!((e.event_version, &e.payload[..]), (7, &b"\"x\""[..]));
    let e = Codec::decode(&raw(
        &ct,
        &format!(r#"{{{base},"aggregateversion":7,"data_base64":"aGk="}}"#),
    ))
    .unwrap();
    assert_eq!(&e.payload[..], b"hi");
    for (body, err) in [
        (
            format!(r#"{{{base},"aggregateversion":7.5,"data":1}}"#),
            "aggregateversion",
        ),
        (
            format!(r#"{{{base},"aggregateversion":-1,"data":1}}"#),
            "aggregateversion",
        ),
        (
            format!(r#"{{{base},"aggregateversion":1,"data":1,"data_base64":"aGk="}}"#),
            "data",
        ),
        (
            format!(r#"{{{base},"aggregateversion":1,"data_base64":"%%"}}"#),
            "data_base64",
        ),
        (
            format!(r#"{{{base},"aggregateversion":1,"data":1,"causationid":[1]}}"#),
            "causationid",
        ),
    ] {
        let got = Codec::decode(&raw(&ct, &body)).unwrap_err();
        assert!(
            matches!(&got, DecodeError::Invalid { name, .. } if name == err),
            "{body}: {got}"
        );
    }
    assert_eq!(
        Codec::decode(&raw(&ct, &format!(r#"{{{base},"aggregateversion":1}}"#))),
        Err(DecodeError::Envelope(EnvelopeError::EmptyPayload))
    );
    assert_eq!(
        Codec::decode(&raw(&ct, r#"{"specversion":"0.3"}"#)),
        Err(DecodeError::SpecVersion("0.3".into()))
    );
    assert_eq!(
        Codec::decode(&raw(&ct, r#"{"specversion":"1.0","id":"i"}"#)),
        Err(DecodeError::Missing("subject"))
    );
}

#[test]
fn detection_names_what_the_message_is_not() {
    let cases: [(Pairs<'_>, &str, &str); 9] = [
        (
            &[("ce-id", "1"), ("ce-type", "T")],
            "{}",
            "looks like a CloudEvent (it has a `ce-id` header) but has no specversion",
        ),
        (
            &[],
            r#"{"id":"1","type":"T","source":"s"}"#,
            "looks like a CloudEvent (its JSON body has `id` and `type`) but has no specversion",
        ),
        (
            &[],
            "not json",
            "not a CloudEvents message and not a jxt JSON envelope: no CloudEvents headers, and the body is not a JSON object",
        ),
        (
            &[("X-Event-ID", "e")],
            "[1]",
            "not a CloudEvents message and not a jxt JSON envelope: no CloudEvents headers, and the body is not a JSON object",
        ),
        (
            &[],
            r#"{"hello":"world"}"#,
            "not a CloudEvents message and not a jxt JSON envelope: no CloudEvents headers, and the JSON body has neither `specversion` nor any field of jxt's envelope",
        ),
        (
            &[("content-type", "application/json")],
            r#"{"specversion":"1.0"}"#,
            "not a CloudEvents message and not a jxt JSON envelope: no CloudEvents headers, and the JSON body has `specversion` but content-type \"application/json\" is not application/cloudevents+json",
        ),
        (
            &[("content-type", "application/cloudevents-batch+json")],
            "[]",
            "attribute `content-type` is invalid: batched CloudEvents are not supported",
        ),
        (
            &[("content-type", "application/cloudevents+avro")],
            "x",
            "attribute `content-type` is invalid: \"application/cloudevents+avro\": only the JSON event format is supported",
        ),
        (
            &[("content-type", "application/cloudevents+json")],
            "x",
            "attribute `body` is invalid: not a JSON object",
        ),
    ];
    for (headers, body, want) in cases {
        let m = raw(headers, body);
        let got = Codec::decode(&m).unwrap_err().to_string();
        assert!(got.starts_with(want), "{headers:?} {body}:\n{got}\n{want}");
        assert_eq!(Codec::detect(&m), None);
    }
}
