//! Consumer-group ownership in the pool: the partition state machine (assigned ->
//! rewinding -> active -> draining -> revoked, plus lost), driven by the transport's group
//! events.

use std::sync::Arc;

use futures::StreamExt as _;

use super::{Part, Shared};
use crate::pool::{PartitionState, PoolEvent};
use crate::transport::GroupEvent;

/// The next group event, or never (so that `select!` skips this branch) without a group.
pub(super) async fn next_event(
    events: &mut Option<futures::stream::BoxStream<'static, GroupEvent>>,
) -> Option<GroupEvent> {
    match events {
        Some(ev) => ev.next().await,
        None => futures::future::pending().await,
    }
}

/// Applies one ownership change (DESIGN.md section 5: assigned -> rewinding -> active ->
/// draining -> revoked, plus lost).
pub(super) async fn on_group_event(sh: &Arc<Shared>, event: GroupEvent) {
    match event {
        GroupEvent::Assigned { partition, epoch } => {
            set_state(sh, partition, epoch, PartitionState::Assigned);
            set_state(sh, partition, epoch, PartitionState::Rewinding);
            let rewound = match &sh.group {
                Some(g) => g.rewind(partition, epoch).await,
                None => Ok(()),
            };
            match rewound {
                Ok(()) => {
                    if sh
                        .state
                        .lock()
                        .part_is(partition, epoch, PartitionState::Rewinding)
                    {
                        set_state(sh, partition, epoch, PartitionState::Active);
                    }
                }
                Err(error) => {
                    tracing::warn!(topic = %sh.p.topic, partition, epoch, %error, "rewind failed; the partition is not consumed");
                    set_state(sh, partition, epoch, PartitionState::Lost);
                }
            }
        }
        GroupEvent::Revoked { partition, epoch } => {
            if !sh.state.lock().part_epoch_is(partition, epoch) {
                return;
            }
            set_state(sh, partition, epoch, PartitionState::Draining);
            if let Some(g) = &sh.group {
                g.pause(partition);
            }
            let dropped = drop_queued(sh, partition);
            tracing::debug!(topic = %sh.p.topic, partition, epoch, dropped, "draining revoked partition");
            let sh2 = sh.clone();
            tokio::spawn(async move {
                let deadline = sh2.p.config.drain_deadline;
                let drained = tokio::time::timeout(deadline, async {
                    loop {
                        let idle = sh2.idle.notified();
                        tokio::pin!(idle);
                        idle.as_mut().enable();
                        if !sh2.state.lock().sched.holds_partition(partition) {
                            return;
                        }
                        idle.await;
                    }
                });
                tokio::select! {
                    () = sh2.hard_stop.cancelled() => return,
                    r = drained => if r.is_err() {
                        tracing::warn!(topic = %sh2.p.topic, partition, epoch, "drain deadline passed; handlers still running are abandoned");
                    }
                }
                // Only the drain of this ownership ends it: a partition lost, or assigned
                // again, in the meantime is not released.
                if !sh2
                    .state
                    .lock()
                    .part_is(partition, epoch, PartitionState::Draining)
                {
                    return;
                }
                set_state(&sh2, partition, epoch, PartitionState::Revoked);
                if let Some(g) = &sh2.group
                    && let Err(error) = g.release(partition, epoch).await
                {
                    tracing::warn!(topic = %sh2.p.topic, partition, epoch, %error, "release failed");
                }
            });
        }
        GroupEvent::Lost { partition, epoch } => {
            if !sh.state.lock().part_epoch_is(partition, epoch) {
                return;
            }
            set_state(sh, partition, epoch, PartitionState::Lost);
            drop_queued(sh, partition);
        }
    }
}

/// Every owned partition is lost (the group stream ended).
pub(super) fn lose_all(sh: &Shared) {
    let owned: Vec<(u32, u64)> = sh
        .state
        .lock()
        .parts
        .iter()
        .map(|(p, s)| (*p, s.epoch))
        .collect();
    for (p, e) in owned {
        set_state(sh, p, e, PartitionState::Lost);
        drop_queued(sh, p);
    }
}

pub(super) fn set_state(sh: &Shared, partition: u32, epoch: u64, state: PartitionState) {
    match state {
        PartitionState::Assigned => super::stats::bump(&sh.counters.partitions_acquired),
        PartitionState::Revoked => super::stats::bump(&sh.counters.partitions_released),
        PartitionState::Lost => super::stats::bump(&sh.counters.partitions_lost),
        _ => {}
    }
    sh.state
        .lock()
        .parts
        .insert(partition, Part { state, epoch });
    super::observe(
        sh,
        &PoolEvent::Partition {
            partition,
            epoch,
            state,
        },
    );
}

/// Drops the buffered, never-started deliveries of `partition`, unacknowledged (the next
/// owner rewinds to them). Returns how many.
pub(super) fn drop_queued(sh: &Shared, partition: u32) -> usize {
    let dropped = {
        let mut st = sh.state.lock();
        let dropped = st.sched.drop_partition(partition);
        if st.sched.held() == 0 {
            sh.idle.notify_waiters();
        }
        dropped
    };
    dropped.len()
}
