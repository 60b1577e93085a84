//! One event's attempts: the guarded handler call, in-place retry with backoff while the
//! partition is still owned, then the acknowledgement or the dead letter.

use std::sync::Arc;

use super::keys::Item;
use super::settle::{ack, dead_letter};
use super::stats::bump;
use super::{DeadLetterKind, PoolEvent, Shared, observe};
use crate::envelope::Envelope;
use crate::guard::{Call, Guarded};
use crate::handler::{BoxEventHandler, Event};

/// The pool's handler, called through the guard (panics are failed attempts).
pub(super) type Handler = Guarded<BoxEventHandler, Event>;

/// One attempt's future.
pub(super) type AttemptFuture = Call<<BoxEventHandler as tower::Service<Event>>::Future>;

pub(super) fn event(sh: &Shared, item: &Item, envelope: &Arc<Envelope>, attempt: u32) -> Event {
    Event {
        envelope: envelope.clone(),
        topic: sh.p.topic.clone(),
        attempt,
        delivery_count: item.delivery.delivery_count,
        position: item.delivery.position(),
        epoch: item.delivery.epoch,
        extensions: crate::pipeline::Extensions::new(),
    }
}

pub(super) async fn process(
    sh: &Shared,
    handler: &mut Handler,
    item: &Item,
    first: Option<AttemptFuture>,
) {
    let mut slot = None;
    process_in(sh, HandlerRef::Borrowed(handler), &mut slot, item, first).await;
}

pub(super) async fn process_with(
    sh: &Shared,
    slot: &mut Option<Handler>,
    item: &Item,
    first: Option<AttemptFuture>,
) {
    process_in(sh, HandlerRef::Lazy, slot, item, first).await;
}

/// The handler of one item's attempts: a worker's own, or one cloned from the pool's only
/// if a retry needs it.
enum HandlerRef<'a> {
    Borrowed(&'a mut Handler),
    Lazy,
}

/// Runs an item to its end: attempts with in-place retry, then ack or dead letter.
async fn process_in(
    sh: &Shared,
    mut handler: HandlerRef<'_>,
    slot: &mut Option<Handler>,
    item: &Item,
    mut first: Option<AttemptFuture>,
) {
    if let Some(reason) = item.delivery.unreadable_reason() {
        bump(&sh.counters.unreadable);
        dead_letter(sh, item, DeadLetterKind::Unreadable, reason, 0).await;
        return;
    }
    let envelope = match &item.decoded {
        Err(e) => {
            bump(&sh.counters.malformed);
            dead_letter(sh, item, DeadLetterKind::Malformed, &e.to_string(), 0).await;
            return;
        }
        Ok(e) => e.clone(),
    };
    let partition = item.delivery.position().partition;
    let epoch = item.delivery.epoch;
    let mut attempt = 1;
    loop {
        if !sh.state.lock().owns(partition, epoch) {
            // The partition moved on (lost, or drained past its deadline): no new attempt,
            // no acknowledgement; the next owner handles the message.
            return;
        }
        let fut = match first.take() {
            Some(f) => f,
            None => {
                let event = event(sh, item, &envelope, attempt);
                match &mut handler {
                    HandlerRef::Borrowed(h) => h.ready_and_call(event).await,
                    HandlerRef::Lazy => {
                        let h = slot.get_or_insert_with(|| Guarded::new(sh.p.handler.clone()));
                        h.ready_and_call(event).await
                    }
                }
            }
        };
        // A panic in the handler (readiness, call or future) is a permanent failure of
        // this attempt: the guarded call caught it.
        match fut.await {
            Ok(()) => {
                bump(&sh.counters.handled);
                ack(sh, item, Some(&envelope)).await;
                return;
            }
            Err(error) => {
                if !error.is_retryable() {
                    let reason = error.to_string();
                    dead_letter(sh, item, DeadLetterKind::Permanent, &reason, attempt).await;
                    return;
                }
                if attempt >= sh.p.retry.attempts {
                    let reason = error.to_string();
                    dead_letter(sh, item, DeadLetterKind::Exhausted, &reason, attempt).await;
                    return;
                }
                let delay = sh.p.retry.delay(attempt);
                bump(&sh.counters.retried);
                observe(
                    sh,
                    &PoolEvent::Retrying {
                        envelope: &envelope,
                        attempt,
                        error: &error,
                        delay,
                    },
                );
                tracing::debug!(
                    topic = %sh.p.topic, aggregate_id = %envelope.aggregate_id,
                    version = envelope.event_version, attempt, ?delay, error = %error,
                    "handler failed; retrying in place"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}
