//! The workers: each takes a scheduled key from the ready queue (holding a running slot)
//! and runs the key's events one at a time, up to a budget before it lets other keys run.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use super::attempt::process;
use super::keys::{Item, Key};
use crate::guard::Guarded;

/// Takes the next item of `key`, or unschedules the key when its queue is empty.
fn next_item(sh: &Shared, key: &Key) -> Option<Item> {
    let taken = sh.state.lock().sched.take(key)?;
    if taken.made_space && sh.control.is_none() {
        sh.space.notify_waiters();
    }
    Some(taken.item)
}

/// After an item finished: forget it, and reschedule or unschedule its key. Returns whether
/// the caller goes on with the key (it has more work and `budget_left`).
pub(super) fn finish(sh: &Shared, item: Item, budget_left: bool) -> bool {
    let key = item.key.clone();
    let (finished, idle) = {
        let mut st = sh.state.lock();
        let finished = st.sched.finish(&item.id(), &key);
        // Shutdown waits for an empty pool; a drain waits for one partition's handlers.
        let idle = finished.empty || (st.grouped && st.draining());
        (finished, idle)
    };
    drop(item);
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
            let Some(item) = next_item(&sh, &key) else {
                break;
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
            if !finish(&sh, item, budget > 0) {
                break;
            }
        }
        drop(slot);
    }
}
