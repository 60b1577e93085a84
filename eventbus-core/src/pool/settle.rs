//! Settling a delivery: the acknowledgement after success, and the dead letter (a full or
//! reduced copy with reason headers, retried while the broker fails) followed by the
//! acknowledgement. Nothing is sent for a partition this member no longer owns.

use std::time::Duration;

use super::keys::Item;
use super::stats::bump;
use super::{DeadLetterKind, PoolEvent, Shared, dlq_headers, observe};
use crate::envelope::Envelope;
use crate::error::Error;
use crate::headers::{Headers, validate_header};
use crate::message::EncodedMessage;
use crate::pipeline::DeadLetter;

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

/// The dead-letter record of `item` as the pipeline takes it: the original key, headers
/// (those every backend can carry) and body, with the `dualbus-dlq-*` headers. The sink
/// sends it whole or reduced to fit the broker's limit, after the publish layers.
fn dead_letter_of(
    sh: &Shared,
    item: &Item,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
) -> DeadLetter {
    let m = &item.delivery.message;
    // The original headers that every backend can carry (a malformed message may have
    // others: they are dropped rather than blocking the dead letter).
    let original: Headers = m
        .headers
        .iter()
        .filter(|(n, v)| validate_header(n, v).is_ok() && !n.starts_with("dualbus-dlq-"))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let mut headers = Headers::with_capacity(original.len() + 9);
    headers.extend(original.iter().map(|(n, v)| (n.to_owned(), v.to_owned())));
    headers.insert(dlq_headers::REASON, clip(reason, 1024));
    headers.insert(dlq_headers::KIND, kind.as_str());
    headers.insert(dlq_headers::ATTEMPTS, attempts.to_string());
    headers.insert(dlq_headers::TOPIC, sh.p.topic.to_string());
    headers.insert(dlq_headers::PARTITION, m.position.partition.to_string());
    headers.insert(dlq_headers::OFFSET, m.position.offset.to_string());
    headers.insert(
        dlq_headers::DELIVERY_COUNT,
        item.delivery.delivery_count.to_string(),
    );
    let record = EncodedMessage {
        key: item.key.to_string(),
        headers,
        payload: m.payload.clone(),
        // One dead letter per source position: a retried dead-letter publish is stored once.
        id: Some(format!(
            "dlq:{}:{}:{}",
            sh.p.topic, m.position.partition, m.position.offset
        )),
    };
    DeadLetter::new(record, original, kind)
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
    let record = dead_letter_of(sh, item, kind, reason, attempts);
    let mut failures = 0u32;
    let reduced = loop {
        match sh
            .p
            .pipeline
            .dead_letter(&sh.p.dead_letter_topic, record.clone())
            .await
        {
            Ok((_, reduced)) => break reduced.is_some(),
            Err(error) => {
                failures += 1;
                bump(&sh.counters.dead_letter_failures);
                if failures == 1 {
                    sh.state.lock().sched.set_parked(&item.id(), true);
                }
                // Permanent: e.g. even the smallest record is over the broker's limit.
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
    };
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
