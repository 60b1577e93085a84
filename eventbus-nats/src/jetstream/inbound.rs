//! Stored and delivered JetStream messages as the bus's inbound messages and deliveries.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use dualbus_core::offsets::DeliveryCounter;
use dualbus_core::{Delivery, Error, InboundMessage, Position, Result};

use crate::subject::parse_subject;
use crate::{BACKEND, headers, unreadable};

use super::ack::JsAcker;
use super::pinned::PIN_HEADER;

/// The position's partition is the one the message was consumed from: the group's
/// partition, which is the subject's in a group of several partitions and 0 in a group of
/// one (whose one consumer reads every partition of the stream).
fn inbound(
    topic: &str,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
    seq: u64,
    partition: u32,
) -> InboundMessage {
    let key = parse_subject(topic, subject).map(|(_, k)| k);
    InboundMessage {
        topic: topic.to_owned(),
        key,
        // Delivered by a group's consumer, which is pinned.
        headers: headers::from_nats_pinned(headers, PIN_HEADER),
        payload,
        position: Position {
            partition,
            offset: u128::from(seq),
        },
    }
}

/// A message read through the message-get API, its headers decoded lossily, as consumed
/// from `partition`.
pub(super) fn stored_inbound(
    topic: &str,
    m: &unreadable::Stored,
    partition: u32,
) -> InboundMessage {
    InboundMessage {
        headers: m.headers(),
        ..inbound(topic, &m.subject, None, m.payload.clone(), m.seq, partition)
    }
}

/// A delivery, its count from `counts`: a message delivered before a rewind counts as
/// redelivered (the server's count starts again at 1 after a consumer reset), so that the
/// pool and handlers still see it as one.
pub(super) fn delivery(
    topic: &str,
    m: jetstream::Message,
    counts: &mut DeliveryCounter,
    partition: u32,
) -> Result<Delivery> {
    let (seq, delivered) = match m.info() {
        Ok(i) => (i.stream_sequence, i.delivered),
        Err(e) => {
            return Err(Error::backend(BACKEND, true, e));
        }
    };
    let delivered = counts.count(seq, u32::try_from(delivered).unwrap_or(u32::MAX));
    let (m, acker) = m.split();
    let message = inbound(
        topic,
        m.subject.as_str(),
        m.headers.as_ref(),
        m.payload,
        seq,
        partition,
    );
    Ok(Delivery::new(message, delivered, Arc::new(JsAcker(acker))))
}
