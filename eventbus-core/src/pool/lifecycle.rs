//! The pool's lifecycle: starting its tasks, snapshots, graceful shutdown with a drain
//! deadline, and the crash-like stop when it is aborted or dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::keys::{Left, Schedule};
use super::{
    PartitionState, PoolParams, PoolStats, Shared, ShutdownReport, State, dispatch, ticker, worker,
};
use crate::transport::{Delivery, DomainSubscription, GroupEvent};

/// A running pool: its tasks and shared state.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    tasks: Mutex<Option<PoolTasks>>,
    report: tokio::sync::OnceCell<ShutdownReport>,
}

struct PoolTasks {
    dispatcher: JoinHandle<Streams>,
    workers: Vec<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("topic", &self.shared.p.topic)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Starts the dispatcher, the workers and the progress ticker on the current runtime.
    pub(crate) fn start(
        params: PoolParams,
        subscription: DomainSubscription,
        ack_deadline: Option<Duration>,
    ) -> Self {
        let (ready_tx, ready_rx) = async_channel::unbounded();
        let progress = params
            .config
            .progress_interval
            .or_else(|| ack_deadline.map(|d| (d / 3).max(Duration::from_millis(1))));
        let (events, group) = match subscription.group {
            Some(g) => (Some(g.events), Some(g.control)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(params.config.max_in_flight)),
            deferred: Arc::new(Semaphore::new(params.config.max_deferred)),
            running: Arc::new(Semaphore::new(params.config.max_concurrency)),
            continuations: TaskTracker::new(),
            state: Mutex::new(State {
                sched: Schedule::new(params.config.max_per_key),
                grouped: group.is_some(),
                parts: HashMap::new(),
            }),
            reread: subscription.reread,
            group,
            p: params,
            ready_tx,
            ready_rx,
            counters: Arc::default(),
            idle: Notify::new(),
            stop_pulling: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        });
        let dispatcher = tokio::spawn(dispatch::dispatch(
            shared.clone(),
            subscription.deliveries,
            events,
        ));
        let workers = (0..shared.p.config.max_concurrency)
            .map(|_| tokio::spawn(worker::worker(shared.clone())))
            .collect();
        let ticker = progress.map(|every| tokio::spawn(ticker::tick(shared.clone(), every)));
        Self {
            shared,
            tasks: Mutex::new(Some(PoolTasks {
                dispatcher,
                workers,
                ticker,
            })),
            report: tokio::sync::OnceCell::new(),
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> PoolStats {
        let held = self.shared.state.lock().sched.counts();
        self.shared.counters.snapshot(held)
    }

    /// The pool's counters, readable after the pool is gone.
    pub(crate) fn last_counts(&self) -> super::stats::LastCounts {
        super::stats::LastCounts(self.shared.counters.clone())
    }

    /// The per-aggregate queues now.
    pub(crate) fn key_queues(&self) -> super::KeyQueues {
        self.shared.state.lock().sched.key_queues()
    }

    /// The partitions this member knows of in its consumer group, sorted.
    pub(crate) fn partitions(&self) -> Vec<(u32, PartitionState, u64)> {
        let st = self.shared.state.lock();
        let mut v: Vec<_> = st
            .parts
            .iter()
            .map(|(p, s)| (*p, s.state, s.epoch))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// Whether the delivery stream ended (transport closed) and all held work finished.
    pub(crate) fn is_finished(&self) -> bool {
        self.shared.stop_pulling.is_cancelled() && self.shared.state.lock().sched.held() == 0
    }

    /// Stops pulling, finishes held work within `deadline`, returns what was left.
    /// Idempotent: later and concurrent calls get the first call's report.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        *self
            .report
            .get_or_init(|| self.shutdown_inner(deadline))
            .await
    }

    async fn shutdown_inner(&self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let sh = &self.shared;
        let finished_before = sh.counters.finished();
        sh.stop_pulling.cancel();
        let Some(tasks) = self.tasks.lock().take() else {
            return ShutdownReport::default();
        };
        // The streams stay open (a group member stays a member) until the end of the drain.
        let streams = tasks.dispatcher.await.ok();
        // Drain: wait until nothing is held, or the deadline.
        let drained_in_time = tokio::time::timeout(deadline, async {
            loop {
                let idle = sh.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if sh.state.lock().sched.held() == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok();
        let mut report = ShutdownReport {
            timed_out: !drained_in_time,
            ..ShutdownReport::default()
        };
        // Cut off what is still running, then return everything held unacknowledged.
        sh.hard_stop.cancel();
        sh.ready_tx.close();
        for w in tasks.workers {
            let _ = w.await;
        }
        sh.continuations.close();
        sh.continuations.wait().await;
        if let Some(t) = tasks.ticker {
            t.abort();
            let _ = t.await;
        }
        let (queued, held) = sh.state.lock().sched.take_all();
        for entry in &queued {
            entry.release().await;
        }
        for h in &held {
            let left = h.left();
            match left {
                Left::Queued => report.dropped += 1,
                Left::Parked => report.parked += 1,
                Left::Running => report.abandoned += 1,
            }
            if left != Left::Queued {
                let _ = h.acker().release(Duration::ZERO).await;
            }
        }
        drop(queued);
        drop(streams);
        report.drained = sh.counters.finished() - finished_before;
        report.elapsed = started.elapsed();
        report.stats = self.stats();
        report
    }
}

impl Pool {
    /// Stops at once, as a crash does: no new handler starts, running ones are cut off at
    /// their next poll, nothing more is acknowledged. Returns the tasks to wait for.
    fn stop_now(&self) -> Option<(PoolTasks, TaskTracker)> {
        self.shared.stop_pulling.cancel();
        self.shared.hard_stop.cancel();
        self.shared.ready_tx.close();
        let tasks = self.tasks.lock().take()?;
        for w in &tasks.workers {
            w.abort();
        }
        if let Some(t) = &tasks.ticker {
            t.abort();
        }
        let continuations = self.shared.continuations.clone();
        continuations.close();
        Some((tasks, continuations))
    }

    /// Stops at once like a crash (see [`Pool::stop_now`]) and resolves when no handler of
    /// this pool runs any more; the unacknowledged deliveries are left to the broker's
    /// redelivery.
    pub(crate) async fn abort(&self) {
        let Some((tasks, continuations)) = self.stop_now() else {
            return;
        };
        let streams = tasks.dispatcher.await.ok();
        for w in tasks.workers {
            let _ = w.await;
        }
        continuations.wait().await;
        drop(streams);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropped without shutdown (a crash): stop at once; unacknowledged work is
        // redelivered. The subscription's streams are dropped only after every handler
        // stopped, so that a group reassigns partitions only when nothing of this member
        // can run any more.
        let Some((tasks, continuations)) = self.stop_now() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let streams = tasks.dispatcher.await.ok();
                    for w in tasks.workers {
                        let _ = w.await;
                    }
                    continuations.wait().await;
                    drop(streams);
                });
            }
            Err(_) => tasks.dispatcher.abort(),
        }
    }
}

/// The streams a subscription holds; dropped only after every task of the pool ended, so
/// that a group member leaves only when none of its handlers can still run.
pub(super) struct Streams {
    pub(super) _deliveries: futures::stream::BoxStream<'static, crate::Result<Delivery>>,
    pub(super) _events: Option<futures::stream::BoxStream<'static, GroupEvent>>,
}
