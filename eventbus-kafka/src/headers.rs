//! Headers between the bus and Kafka records, and how a record counts against the
//! size limit.

use std::panic::{AssertUnwindSafe, catch_unwind};

use dualbus_core::{Headers, WireOverhead};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};

/// How a record counts against `message.max.bytes`, as librdkafka counts it: each header
/// costs its name, its value and two varint lengths (at most 5 bytes each: counted as 10),
/// with no block framing. The key and the record's own framing are kept out of the limit
/// the transport declares ([`RECORD_RESERVE`]).
pub(crate) const WIRE: WireOverhead = WireOverhead::new(0, 10);

/// Bytes of `message.max.bytes` kept for the key (an aggregate id: at most 256 bytes) and
/// the record's framing (length, attributes, timestamp and offset deltas, header count).
pub(crate) const RECORD_RESERVE: usize = 256 + 64;

/// Header names the bus writes on every record (the CloudEvents Kafka binding and trace
/// context): read back without allocating.
const KNOWN: [&str; 15] = [
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
    "ce_aggregateversion",
    "ce_partitionkey",
    "ce_correlationid",
    "ce_causationid",
    "ce_tenantid",
    "ce_dataschema",
    "content-type",
    "traceparent",
    "tracestate",
];

/// A header name, shared when it is one of [`KNOWN`].
fn name(n: &str) -> std::borrow::Cow<'static, str> {
    match KNOWN.iter().find(|k| **k == n) {
        Some(k) => std::borrow::Cow::Borrowed(k),
        None => std::borrow::Cow::Owned(n.to_owned()),
    }
}

/// The bus's headers as Kafka headers (values as UTF-8 bytes).
pub(crate) fn to_kafka(headers: &Headers) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers.iter() {
        out = out.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    out
}

/// A record's headers, or why the bus cannot read them: a value (or name) that is not
/// UTF-8. A header without a value reads as an empty value.
///
/// rdkafka panics on a header name that is not UTF-8 (any producer can write one); the
/// panic is caught here and the record reported unreadable.
pub(crate) fn from_kafka(headers: Option<&BorrowedHeaders>) -> Result<Headers, &'static str> {
    let Some(h) = headers else {
        return Ok(Headers::new());
    };
    let read = catch_unwind(AssertUnwindSafe(|| {
        let count = h.count();
        let mut out = Headers::with_capacity(count);
        for i in 0..count {
            let Some(header) = h.try_get(i) else {
                continue;
            };
            let Ok(value) = std::str::from_utf8(header.value.unwrap_or_default()) else {
                return Err("a header value is not UTF-8");
            };
            out.insert(name(header.key), value);
        }
        Ok(out)
    }));
    read.unwrap_or(Err("a header name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn headers_round_trip() {
        let h: Headers = [("ce_id", "1"), ("traceparent", "00-ab-cd-01"), ("x", "")]
            .into_iter()
            .collect();
        let k = to_kafka(&h);
        assert_eq!(k.count(), 3);
        assert_eq!(from_kafka(Some(k.as_borrowed())).unwrap(), h);
        assert_eq!(from_kafka(None).unwrap(), Headers::new());
    }

    #[test]
    fn values_that_are_not_utf8_are_refused() {
        let k = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some(&[0xff_u8, 0xfe][..]),
            })
            .insert(Header::<&[u8]> {
                key: "b",
                value: None,
            });
        assert_eq!(
            from_kafka(Some(k.as_borrowed())),
            Err("a header value is not UTF-8")
        );
    }
}
