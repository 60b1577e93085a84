//! The dispatcher: pulls deliveries while permits last, follows group events first,
//! decodes, admits each delivery to its key's queue (deferred when the key is at its cap,
//! waiting for a deferred slot when all are taken), and starts handlers of idle keys inline.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::attempt::{AttemptFuture, Handler, event, process_with};
use super::group::{lose_all, next_event, on_group_event};
use super::keys::{Admitted, AdmittedDeferred, Entry, Item, Key, Thin};
use super::lifecycle::Streams;
use super::stats::bump;
use super::worker::finish;
use super::{PoolEvent, Shared, observe};
use crate::codec::Codec;
use crate::guard::{Call, Guarded};
use crate::handler::Event;
use crate::message::Position;
use crate::transport::{Delivery, GroupEvent};

/// An event the dispatcher started inline whose handler did not finish at once.
type Started = std::pin::Pin<Box<dyn std::future::Future<Output = Item> + Send>>;

pub(super) async fn dispatch(
    sh: Arc<Shared>,
    mut deliveries: futures::stream::BoxStream<'static, crate::Result<Delivery>>,
    mut events: Option<futures::stream::BoxStream<'static, GroupEvent>>,
) -> Streams {
    let mut handler = Guarded::new(sh.p.handler.clone());
    let mut inline = InlineBudget::default();
    loop {
        // Ownership changes first: they decide what may be pulled and handled.
        if let Some(ev) = events.as_mut() {
            match ev.next().now_or_never() {
                Some(Some(event)) => {
                    on_group_event(&sh, event).await;
                    continue;
                }
                Some(None) => {
                    // The group ended (transport closed): no partition is owned any more.
                    lose_all(&sh);
                    events = None;
                    continue;
                }
                None => {}
            }
        }
        let permit = tokio::select! {
            biased;
            () = sh.stop_pulling.cancelled() => break,
            Some(event) = next_event(&mut events) => {
                on_group_event(&sh, event).await;
                continue;
            }
            p = sh.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            () = sh.stop_pulling.cancelled() => break,
            Some(event) = next_event(&mut events) => {
                drop(permit);
                on_group_event(&sh, event).await;
                continue;
            }
            n = deliveries.next() => n,
        };
        let delivery = match next {
            None => break,
            Some(Err(e)) => {
                bump(&sh.counters.transport_errors);
                tracing::warn!(topic = %sh.p.topic, error = %e, "delivery stream reported an error");
                continue;
            }
            Some(Ok(d)) => d,
        };
        bump(&sh.counters.received);
        if !sh
            .state
            .lock()
            .accepts(delivery.position().partition, delivery.epoch)
        {
            // A partition this member does not own (any more): not ours to handle or ack.
            bump(&sh.counters.stale_dropped);
            continue;
        }
        let decoded = Codec::decode(&delivery.message).map(Arc::new);
        let key = match &decoded {
            Ok(e) => Key::Envelope(e.clone()),
            Err(_) => Key::Raw(match &delivery.message.key {
                Some(k) if !k.is_empty() => Arc::from(k.as_str()),
                _ => {
                    let p = delivery.position();
                    Arc::from(format!("\u{0}malformed:{}:{}", p.partition, p.offset))
                }
            }),
        };
        if sh.hard_stop.is_cancelled() {
            // Dropped (a crash) while this delivery was on its way in: start nothing more;
            // unacknowledged, it is redelivered.
            break;
        }
        let item = Item {
            delivery,
            decoded,
            key,
            _permit: permit,
        };
        // An inline start needs a free running slot: the dispatcher never waits for one.
        let slot = if inline.allowed() {
            sh.running.clone().try_acquire_owned().ok()
        } else {
            None
        };
        let admitted = sh.state.lock().sched.admit(item, slot);
        match admitted {
            Admitted::Duplicate(position) => duplicate(&sh, position),
            Admitted::Start(item, slot) => {
                run_inline(&sh, &mut handler, &mut inline, item, slot);
            }
            Admitted::Queued { schedule } => ready(&sh, schedule),
            Admitted::OverCap(item) => {
                if !defer(&sh, item).await {
                    break;
                }
            }
        }
    }
    sh.stop_pulling.cancel();
    Streams {
        _deliveries: deliveries,
        _events: events,
    }
}

/// Defers an item whose key is at its cap: its in-flight permit goes back to the other
/// aggregates and it waits for a deferred slot (all taken: the pool stops pulling, for every
/// partition alike); then it is queued without its body when the backend can read it again.
/// `false` if the pool stopped meanwhile (the delivery is handed back).
async fn defer(sh: &Shared, item: Item) -> bool {
    let Item {
        delivery,
        decoded,
        key,
        _permit,
    } = item;
    drop(_permit);
    let slot = tokio::select! {
        biased;
        () = sh.stop_pulling.cancelled() => None,
        p = sh.deferred.clone().acquire_owned() => p.ok(),
    };
    let Some(slot) = slot else {
        let _ = delivery.release(Duration::ZERO).await;
        return false;
    };
    let entry = if let Some(reread) = sh
        .reread
        .as_ref()
        .filter(|_| delivery.unreadable_reason().is_none())
    {
        drop(decoded);
        Entry::Thin(Thin::new(delivery, &key, slot, reread.clone()))
    } else {
        Entry::Whole(Item {
            delivery,
            decoded,
            key,
            _permit: slot,
        })
    };
    let admitted = sh.state.lock().sched.admit_deferred(entry);
    match admitted {
        AdmittedDeferred::Duplicate(position) => duplicate(sh, position),
        AdmittedDeferred::Queued { schedule } => ready(sh, schedule),
    }
    true
}

/// A delivery held already (same position, same epoch) came again: dropped.
fn duplicate(sh: &Shared, position: Position) {
    bump(&sh.counters.duplicates_dropped);
    observe(sh, &PoolEvent::DuplicateDropped { position });
}

/// Puts a key that had no work before in the ready queue.
fn ready(sh: &Shared, schedule: Option<Key>) {
    if let Some(key) = schedule {
        // Unbounded and only closed at shutdown, when nothing is scheduled any more.
        let _ = sh.ready_tx.try_send(key);
    }
}

/// Gives an item the dispatcher meant to start inline to the workers: its key is scheduled
/// already, so the item goes first in the key's queue.
fn hand_to_workers(sh: &Shared, item: Item) {
    let key: Key = sh.state.lock().sched.put_back(item);
    let _ = sh.ready_tx.try_send(key);
}

/// Whether the dispatcher may start handlers itself. Starting inline saves a hand-off to a
/// worker for handlers that finish at once; handlers that keep the CPU busy would serialize
/// on the dispatcher, so inline starts stop while their average cost is high, with a probe
/// every 256 deliveries.
#[derive(Default)]
struct InlineBudget {
    /// Exponential moving average of an inline start, in nanoseconds.
    avg_ns: u64,
    skipped: u32,
}

/// Inline starts costing more than this on average go to the workers instead.
const INLINE_LIMIT_NS: u64 = 20_000;

impl InlineBudget {
    fn allowed(&mut self) -> bool {
        if self.avg_ns <= INLINE_LIMIT_NS {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= 256 {
            self.skipped = 0;
            return true;
        }
        false
    }

    fn record(&mut self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.avg_ns = self.avg_ns - self.avg_ns / 8 + ns / 8;
    }
}

/// Starts `item` on the dispatcher: the first attempt is polled once; if it is not done, the
/// rest runs as a task of its own holding `slot` (the key stays scheduled, so its order
/// holds). The dispatcher never waits for the handler: a service that is not ready at once
/// gets the item through a worker.
fn run_inline(
    sh: &Arc<Shared>,
    handler: &mut Handler,
    budget: &mut InlineBudget,
    item: Item,
    slot: OwnedSemaphorePermit,
) {
    let t0 = Instant::now();
    let first = match &item.decoded {
        Ok(envelope) => {
            let Some(first) = try_start(handler, event(sh, &item, envelope, 1)) else {
                drop(slot);
                hand_to_workers(sh, item);
                budget.record(t0.elapsed());
                return;
            };
            Some(first)
        }
        Err(_) => None,
    };
    let owner = sh.clone();
    let mut started: Started = Box::pin(async move {
        let mut lazy = None;
        process_with(&owner, &mut lazy, &item, first).await;
        item
    });
    match (&mut started).now_or_never() {
        Some(item) => {
            finish(sh, &item.id(), item.key.clone(), false);
            drop(item);
            drop(slot);
        }
        None => {
            let owner = sh.clone();
            sh.continuations.spawn(async move {
                tokio::select! {
                    biased;
                    // Cut off at the shutdown deadline: shutdown returns it unacknowledged.
                    () = owner.hard_stop.cancelled() => {}
                    item = started => {
                        finish(&owner, &item.id(), item.key.clone(), false);
                        drop(item);
                    }
                }
                drop(slot);
            });
        }
    }
    budget.record(t0.elapsed());
}

/// Calls the handler for one attempt if its service is ready at once; `None` if it is not
/// (the waiting service is then replaced by a fresh clone, see [`Guarded::ready_now`]).
fn try_start(handler: &mut Handler, event: Event) -> Option<AttemptFuture> {
    match handler.ready_now()? {
        Ok(()) => Some(handler.call(event)),
        Err(e) => Some(Call::failed(e)),
    }
}
