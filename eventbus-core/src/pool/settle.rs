//! Settling a delivery: the acknowledgement after success, and the dead letter (a full or
//! reduced copy with reason headers, retried while the broker fails) followed by the
//! acknowledgement. Nothing is sent for a partition this member no longer owns.

use std::time::Duration;

use bytes::Bytes;

use super::keys::Item;
use super::stats::bump;
use super::{DeadLetterKind, PoolEvent, Shared, dlq_headers, observe};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::headers::{Headers, validate_header};
use crate::message::{EncodedMessage, OutboundMessage};
use crate::transport::Write;

/// Whether the item's partition is still owned under the epoch it was delivered in. If
/// not, nothing more is sent for it (a stale acknowledgement or dead letter of an earlier
/// ownership epoch): the next owner handles the message.
fn still_owned(sh: &Shared, item: &Item) -> bool {
    let owned = sh
        .state
        .lock()
        .owns(item.delivery.position().partition, item.delivery.epoch);
    if !owned {
        bump(&sh.counters.stale_acks);
    }
    owned
}

pub(super) async fn ack(sh: &Shared, item: &Item, envelope: Option<&Envelope>) {
    let position = item.delivery.position();
    if !still_owned(sh, item) {
        return;
    }
    match item.delivery.ack().await {
        Ok(()) => {
            bump(&sh.counters.acked);
            observe(sh, &PoolEvent::Acked { envelope, position });
        }
        Err(error) => {
            bump(&sh.counters.ack_failures);
            tracing::warn!(topic = %sh.p.topic, ?position, %error, "ack failed; the broker will redeliver");
            observe(
                sh,
                &PoolEvent::AckFailed {
                    position,
                    error: &error,
                },
            );
        }
    }
}

/// Keeps header text printable and bounded.
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if out.trim().is_empty() {
        out = "unknown".to_owned();
    }
    out
}

/// The dead-letter record of `item`: a full copy (original headers and body) with the
/// `dualbus-dlq-*` headers, or, when that is over the broker's size limit, the first
/// reduced record that fits: without the original headers, then without the body (its
/// length in a header), then without both. Returns whether it was reduced; an error if
/// even the smallest record is over the limit (a limit below
/// the `dualbus-dlq-*` headers' [`BUDGET`](super::dlq_headers::BUDGET)).
fn dead_letter_message(
    sh: &Shared,
    item: &Item,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
) -> Result<(OutboundMessage, bool)> {
    let m = &item.delivery.message;
    let mut dlq = Headers::with_capacity(9);
    dlq.insert(dlq_headers::REASON, clip(reason, 1024));
    dlq.insert(dlq_headers::KIND, kind.as_str());
    dlq.insert(dlq_headers::ATTEMPTS, attempts.to_string());
    dlq.insert(dlq_headers::TOPIC, sh.p.topic.to_string());
    dlq.insert(dlq_headers::PARTITION, m.position.partition.to_string());
    dlq.insert(dlq_headers::OFFSET, m.position.offset.to_string());
    dlq.insert(
        dlq_headers::DELIVERY_COUNT,
        item.delivery.delivery_count.to_string(),
    );
    // One dead letter per source position: a retried dead-letter publish is stored once.
    let id = format!(
        "dlq:{}:{}:{}",
        sh.p.topic, m.position.partition, m.position.offset
    );
    let build = |keep_headers: bool, keep_body: bool| {
        let mut headers = Headers::with_capacity(m.headers.len() + dlq.len() + 2);
        if keep_headers {
            // The original headers that every backend can carry (a malformed message may
            // have others: they are dropped rather than blocking the dead letter).
            for (n, v) in m.headers.iter() {
                if validate_header(n, v).is_ok() && !n.starts_with("dualbus-dlq-") {
                    headers.insert(n.to_owned(), v);
                }
            }
        }
        for (n, v) in dlq.iter() {
            headers.insert(n.to_owned(), v);
        }
        match (keep_headers, keep_body) {
            (true, true) => {}
            (false, true) => headers.insert(dlq_headers::REDUCED, "headers"),
            (true, false) => headers.insert(dlq_headers::REDUCED, "body"),
            (false, false) => headers.insert(dlq_headers::REDUCED, "headers,body"),
        }
        if !keep_body {
            headers.insert(dlq_headers::ORIGINAL_LENGTH, m.payload.len().to_string());
        }
        EncodedMessage {
            key: item.key.to_string(),
            headers,
            payload: if keep_body {
                m.payload.clone()
            } else {
                Bytes::new()
            },
            id: Some(id.clone()),
        }
    };
    // Every header is valid: the original ones passed `validate_header`, the others are
    // constants with values core wrote (the reason clipped and cleaned by `clip`).
    let caps = sh.p.transport.capabilities();
    let check = |m| OutboundMessage::with_valid_headers(m, caps, Write::Publish);
    if let Ok(full) = check(build(true, true)) {
        return Ok((full, false));
    }
    for (keep_headers, keep_body) in [(false, true), (true, false)] {
        if let Ok(reduced) = check(build(keep_headers, keep_body)) {
            return Ok((reduced, true));
        }
    }
    check(build(false, false)).map(|m| (m, true))
}

/// The dead letter was refused for good (even the reduced record): retrying cannot help.
/// Nothing is acknowledged; the aggregate stays parked until the subscription stops or the
/// partition moves on.
async fn refused(sh: &Shared, position: crate::message::Position, error: &Error) {
    bump(&sh.counters.dead_letters_refused);
    tracing::error!(
        topic = %sh.p.topic, dead_letter_topic = %sh.p.dead_letter_topic,
        ?position, %error,
        "the dead letter was refused; the aggregate stays parked until the subscription stops"
    );
    sh.hard_stop.cancelled().await;
}

pub(super) async fn dead_letter(
    sh: &Shared,
    item: &Item,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
) {
    let position = item.delivery.position();
    if !still_owned(sh, item) {
        return;
    }
    let (message, reduced) = match dead_letter_message(sh, item, kind, reason, attempts) {
        Ok(built) => built,
        Err(error) => {
            // Even the smallest record is over the limit: nothing can be sent.
            bump(&sh.counters.dead_letter_failures);
            sh.state.lock().sched.set_parked(&item.id(), true);
            refused(sh, position, &error).await;
            return;
        }
    };
    let mut failures = 0u32;
    loop {
        match sh
            .p
            .transport
            .publish(&sh.p.dead_letter_topic, message.clone())
            .await
        {
            Ok(_) => break,
            Err(error) => {
                failures += 1;
                bump(&sh.counters.dead_letter_failures);
                if failures == 1 {
                    sh.state.lock().sched.set_parked(&item.id(), true);
                }
                if !error.is_retryable() {
                    refused(sh, position, &error).await;
                    return;
                }
                let delay =
                    sh.p.retry
                        .delay(failures.min(16))
                        .max(Duration::from_millis(10));
                tracing::warn!(
                    topic = %sh.p.topic, dead_letter_topic = %sh.p.dead_letter_topic, ?position,
                    %error, ?delay, "dead-letter publish failed; the aggregate stays parked"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
    if failures > 0 {
        sh.state.lock().sched.set_parked(&item.id(), false);
    }
    bump(&sh.counters.dead_lettered);
    if reduced {
        bump(&sh.counters.dead_letters_reduced);
    }
    let envelope = item.decoded.as_ref().ok().map(|e| &**e);
    tracing::info!(topic = %sh.p.topic, ?position, kind = kind.as_str(), reason, reduced, "message dead-lettered");
    observe(
        sh,
        &PoolEvent::DeadLettered {
            envelope,
            kind,
            reason,
            position,
        },
    );
    ack(sh, item, envelope).await;
}
