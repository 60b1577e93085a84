//! Size limits: every write path at the broker's limit - 1, the limit and the limit + 1,
//! and dead letters of messages at the limit.

use bytes::Bytes;
use chrono::TimeZone as _;

use super::{Backend, OrderChecker, unique_topic, wait_for};
use crate::conformance::domain::{bus, bus_with, fast_retry, finish, read_raw};
use crate::domain::DomainBus;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::pipeline::{PublishKind, PublishRequest};
use crate::pool::dlq_headers;

/// An event whose encoded size depends only on `len`: fixed time, id length and aggregate
/// id length, so that one probe tells the overhead of every event of the test.
fn sized(aggregate: &str, version: u64, len: usize) -> Envelope {
    let at = chrono::Utc
        .with_ymd_and_hms(2026, 3, 1, 12, 30, 5)
        .single()
        .expect("a valid time");
    Envelope::unchecked(aggregate, "Sized", version, Bytes::from(vec![b'x'; len]))
        .with_occurred_at(at)
        .with_event_id(uuid::Uuid::now_v7().to_string())
}

/// The size the bus counts for an event of `len` payload bytes, from the error of one that
/// is certainly too large (a write that passes the check is never attempted here).
fn size_of(e: &Error) -> usize {
    match e {
        Error::PayloadTooLarge { size, .. } => *size,
        other => panic!("expected PayloadTooLarge, got {other}"),
    }
}

/// The payload length at which an event of `aggregate` is exactly at the limit for a
/// publish (`append` false) or an append.
async fn limit_len(bus: &DomainBus, topic: &str, aggregate: &str, append: bool) -> usize {
    let max = bus.capabilities().max_payload;
    let probe = max + 1;
    let e = if append {
        bus.append(topic, &sized(aggregate, 1, probe), 0).await
    } else {
        bus.publish(topic, &sized(aggregate, 1, probe)).await
    }
    .expect_err("a payload over the limit");
    let overhead = size_of(&e) - probe;
    assert!(overhead < max, "overhead {overhead} of a {max}-byte limit");
    max - overhead
}

fn too_large(r: Result<impl std::fmt::Debug, Error>, what: &str) {
    match r {
        Err(e @ Error::PayloadTooLarge { .. }) => {
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
        other => panic!("{what}: expected PayloadTooLarge, got {other:?}"),
    }
}

/// Publish, batch publish and append at the limit - 1 and the limit reach the broker and
/// come back whole; at the limit + 1 each is [`Error::PayloadTooLarge`], never a backend
/// error. The limit is [`DomainCapabilities::max_payload`](crate::DomainCapabilities::max_payload) as
/// the backend counts it ([`DomainCapabilities::wire`](crate::DomainCapabilities::wire)).
pub async fn size_limits(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-size");
    let at = limit_len(&bus, &topic, "single", false).await;

    bus.publish(&topic, &sized("single", 1, at - 1))
        .await
        .expect("publish at the limit - 1");
    bus.publish(&topic, &sized("single", 2, at))
        .await
        .expect("publish at the limit");
    too_large(
        bus.publish(&topic, &sized("single", 3, at + 1)).await,
        "publish at the limit + 1",
    );

    let results = bus
        .publish_batch(
            &topic,
            &[sized("batchd", 1, at - 1), sized("batchd", 2, at)],
        )
        .await
        .expect("a batch within the limit");
    for r in results {
        r.expect("batch publish at the limit - 1 and the limit");
    }
    too_large(
        bus.publish_batch(&topic, &[sized("batchd", 3, at + 1)])
            .await,
        "batch publish at the limit + 1",
    );

    let mut stored = vec![
        ("single", at - 1),
        ("single", at),
        ("batchd", at - 1),
        ("batchd", at),
    ];
    if bus.capabilities().expected_version {
        let at = limit_len(&bus, &topic, "append", true).await;
        bus.append(&topic, &sized("append", 1, at - 1), 0)
            .await
            .expect("append at the limit - 1");
        bus.append(&topic, &sized("append", 2, at), 1)
            .await
            .expect("append at the limit");
        too_large(
            bus.append(&topic, &sized("append", 3, at + 1), 2).await,
            "append at the limit + 1",
        );
        stored.push(("append", at - 1));
        stored.push(("append", at));
    }

    let mut got: Vec<(String, usize)> = read_raw(bus.transport(), &topic, stored.len())
        .await
        .iter()
        .map(|m| {
            let e = crate::codec::Codec::decode(m).expect("decodes");
            (e.aggregate_id, e.payload.len())
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, usize)> =
        stored.iter().map(|(a, n)| ((*a).to_owned(), *n)).collect();
    want.sort();
    assert_eq!(got, want, "every accepted write stored whole, nothing else");
    bus.close().await.expect("close");
}

/// A message at the size limit whose handler fails is dead-lettered as a reduced record
/// (body dropped, its length and the source position kept); one that leaves room for the
/// `dualbus-dlq-*` headers' budget is dead-lettered whole. Nothing retries forever.
pub async fn dead_letter_at_limit(backend: &dyn Backend) {
    dead_letter_at_limit_padded(backend, 0).await;
}

/// The same with a publish layer that adds a 600-byte header to every write, dead letters
/// included: the size check runs after the layers, so the publish limit shrinks by the
/// header's cost, and the dead letters still fit (whole with room for the budget and the
/// header, reduced at the limit), carrying the header.
pub async fn dead_letter_at_limit_with_layers(backend: &dyn Backend) {
    dead_letter_at_limit_padded(backend, 600).await;
}

/// The header the padding layer adds to events.
const PAD: &str = "x-conformance-pad";
/// The header the padding layer adds to dead letters.
const PAD_DLQ: &str = "x-conformance-pad-dlq";

async fn dead_letter_at_limit_padded(backend: &dyn Backend, pad: usize) {
    let plain = bus(backend).await;
    let bus = bus_with(backend, |b| {
        let b = b.retry(fast_retry(2));
        if pad == 0 {
            return b;
        }
        let value = "p".repeat(pad);
        b.publish_layer(tower::util::MapRequestLayer::new(
            move |mut req: PublishRequest| {
                let name = match req.kind() {
                    PublishKind::DeadLetter => PAD_DLQ,
                    _ => PAD,
                };
                req.for_each_message(|_, headers| headers.insert(name, value.as_str()));
                req
            },
        ))
    })
    .await;
    let topic = unique_topic("domain-dlq-size");
    let at = limit_len(&bus, &topic, "fullcp", false).await;
    let caps = bus.capabilities().clone();
    let cost = |name: &str| {
        if pad == 0 {
            0
        } else {
            name.len() + pad + caps.wire.per_header
        }
    };
    assert_eq!(
        limit_len(&plain, &topic, "fullcp", false).await - at,
        cost(PAD),
        "the size check counts the headers layers add"
    );
    // Room for every dead-letter header at its longest and the dead-letter pad, with the
    // backend's framing: exactly what a full copy needs.
    let roomy = at
        - dlq_headers::BUDGET
        - 9 * caps.wire.per_header
        - caps.wire.header_block
        - cost(PAD_DLQ);
    bus.publish(&topic, &sized("fullcp", 1, roomy))
        .await
        .expect("publish with room for the dead-letter headers");
    bus.publish(&topic, &sized("limits", 1, at))
        .await
        .expect("publish at the limit");
    let checker = OrderChecker::new();
    checker.published("fullcp", 1);
    checker.published("limits", 1);
    let sub = bus
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async move {
                Err::<(), _>(HandleError::permanent(crate::Failure(
                    "refused by the handler".into(),
                )))
            }),
        ))
        .await
        .expect("subscribe");
    wait_for(|| checker.distinct_ends() == 2).await;
    let summary = finish(backend, &bus, &topic, super::domain::SOURCE, &checker).await;
    assert_eq!(summary.dead_lettered, 2);
    let s = sub.stats();
    assert_eq!(
        (s.dead_lettered, s.dead_letters_reduced, s.acked),
        (2, 1, 2),
        "{s:?}"
    );
    let dlq = read_raw(bus.transport(), &format!("{topic}.dlq"), 2).await;
    for m in &dlq {
        let h = |n| m.headers.get(n).map(str::to_owned);
        assert_eq!(h(dlq_headers::TOPIC).as_deref(), Some(topic.as_str()));
        assert!(h(dlq_headers::PARTITION).is_some());
        assert!(h(dlq_headers::OFFSET).is_some());
        assert_eq!(h(dlq_headers::KIND).as_deref(), Some("permanent"));
        if pad > 0 {
            assert_eq!(
                h(PAD_DLQ).map(|v| v.len()),
                Some(pad),
                "the layer's header is kept"
            );
        }
        match m.key.as_deref() {
            Some("fullcp") | None if m.payload.len() == roomy => {
                assert_eq!(h(dlq_headers::REDUCED), None, "a full copy");
                let e = crate::codec::Codec::decode(m).expect("the original encoding");
                assert_eq!(e.aggregate_id, "fullcp");
            }
            _ => {
                assert_eq!(h(dlq_headers::REDUCED).as_deref(), Some("body"));
                assert!(m.payload.is_empty());
                assert_eq!(
                    h(dlq_headers::ORIGINAL_LENGTH).as_deref(),
                    Some(at.to_string().as_str())
                );
                // The original headers are kept: the record still names the event.
                let subject = m
                    .headers
                    .iter()
                    .any(|(_, v)| v == "limits" || v.contains("limits"));
                assert!(subject, "the original headers name the aggregate: {m:?}");
            }
        }
    }
    drop(sub);
    bus.close().await.expect("close");
}
