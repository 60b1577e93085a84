//! The workers: each takes a scheduled key from the ready queue (holding a running slot)
//! and runs the key's events one at a time, up to a budget before it lets other keys run.
//! A deferred delivery kept without its body is read again from the broker first.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;
use super::attempt::process;
use super::keys::{Entry, HeldId, Item, Key, Thin};
use super::stats::bump;
use crate::codec::Codec;
use crate::guard::Guarded;
use crate::message::InboundMessage;
use crate::transport::Delivery;

/// Takes the next entry of `key`, or unschedules the key when its queue is empty.
fn next_entry(sh: &Shared, key: &Key) -> Option<Entry> {
    sh.state.lock().sched.take(key)
}

/// What reading a deferred delivery again gave.
enum Reread {
    /// The delivery with its body, or unreadable (the broker no longer holds the message).
    Read(Item),
    /// Its partition moved on (the next owner handles it): nothing to settle here.
    NotOwned(Thin),
    /// The pool stopped for good meanwhile: shutdown returns it unacknowledged.
    Stopped,
}

/// The body of a deferred delivery, read again from the broker. Retried while the broker
/// cannot be asked (later events of the key wait, as behind a failing handler). A message
/// the broker no longer holds becomes an unreadable delivery, which the pool dead-letters
/// (a record without body, with the reason).
async fn reread(sh: &Shared, thin: Thin) -> Reread {
    let mut failures = 0u32;
    let found = loop {
        if !sh.state.lock().owns(thin.position.partition, thin.epoch) {
            return Reread::NotOwned(thin);
        }
        match thin.reread.reread(thin.position).await {
            Ok(m) if m.position == thin.position => break Ok(m),
            Ok(m) => {
                break Err(format!(
                    "reading position {:?} again returned the message at {:?}",
                    thin.position, m.position
                ));
            }
            Err(e) if e.is_retryable() => {
                failures += 1;
                let delay =
                    sh.p.retry
                        .delay(failures.min(16))
                        .max(Duration::from_millis(10));
                tracing::warn!(topic = %sh.p.topic, position = ?thin.position, error = %e, ?delay, "reading a deferred delivery again failed; retrying");
                tokio::select! {
                    () = sh.hard_stop.cancelled() => return Reread::Stopped,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => break Err(format!("the message could not be read again: {e}")),
        }
    };
    bump(&sh.counters.reread);
    let (message, unreadable) = match found {
        Ok(m) => (m, None),
        Err(reason) => (
            InboundMessage {
                topic: sh.p.topic.to_string(),
                key: Some(thin.key.to_string()),
                headers: crate::headers::Headers::new(),
                payload: bytes::Bytes::new(),
                position: thin.position,
            },
            Some(reason),
        ),
    };
    let decoded = Codec::decode(&message).map(Arc::new);
    let mut delivery =
        Delivery::new(message, thin.delivery_count, thin.acker).with_epoch(thin.epoch);
    if let Some(reason) = unreadable {
        delivery = delivery.unreadable(reason);
    }
    Reread::Read(Item {
        delivery,
        decoded,
        key: thin.key,
        _permit: thin.permit,
    })
}

/// After a delivery finished: forget it, and reschedule or unschedule its key. Returns
/// whether the caller goes on with the key (it has more work and `budget_left`).
pub(super) fn finish(sh: &Shared, id: &HeldId, key: Key, budget_left: bool) -> bool {
    let (finished, idle) = {
        let mut st = sh.state.lock();
        let finished = st.sched.finish(id, &key);
        // Shutdown waits for an empty pool; a drain waits for one partition's handlers.
        let idle = finished.empty || (st.grouped && st.draining());
        (finished, idle)
    };
    sh.counters.finished.fetch_add(1, Ordering::Relaxed);
    if idle {
        sh.idle.notify_waiters();
    }
    if finished.more && !budget_left {
        // Fairness: let other scheduled keys run before this one continues.
        let _ = sh.ready_tx.try_send(key);
        return false;
    }
    finished.more
}

/// Events of one key run back to back up to this many before the key yields its worker.
const KEY_BUDGET: u32 = 32;

pub(super) async fn worker(sh: Arc<Shared>) {
    let mut handler = Guarded::new(sh.p.handler.clone());
    loop {
        // A worker takes a key only with a running slot (events started inline hold slots
        // too), so that at most `max_concurrency` handlers run.
        let slot = tokio::select! {
            biased;
            () = sh.hard_stop.cancelled() => return,
            s = sh.running.acquire() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let key = tokio::select! {
            biased;
            () = sh.hard_stop.cancelled() => return,
            k = sh.ready_rx.recv() => match k {
                Ok(k) => k,
                Err(_) => return,
            },
        };
        let mut budget = KEY_BUDGET;
        loop {
            let Some(entry) = next_entry(&sh, &key) else {
                break;
            };
            let item = match entry {
                Entry::Whole(item) => item,
                Entry::Thin(thin) => match reread(&sh, thin).await {
                    Reread::Read(item) => item,
                    Reread::NotOwned(thin) => {
                        // Forgotten unsettled, as a lost partition's running delivery.
                        let more = finish(&sh, &(thin.position, thin.epoch), thin.key, true);
                        if !more {
                            break;
                        }
                        continue;
                    }
                    Reread::Stopped => return,
                },
            };
            let done = tokio::select! {
                biased;
                () = sh.hard_stop.cancelled() => false,
                () = process(&sh, &mut handler, &item, None) => true,
            };
            if !done {
                // Cut off at the shutdown deadline: shutdown returns it unacknowledged.
                return;
            }
            budget -= 1;
            // Forgotten before its permit goes back: the counts never exceed the bounds.
            let more = finish(&sh, &item.id(), item.key.clone(), budget > 0);
            drop(item);
            if !more {
                break;
            }
        }
        drop(slot);
    }
}
