//! A subscription's membership in its group: leaving on drop, pausing partitions, and the
//! rewind and release of the group protocol.

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::{Error, GroupControl, PartitionControl, Result};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::group::Group;

/// Leaves the group when the subscription's stream is dropped; the member's partitions go
/// to the others at once (the pool drops the stream only after its handlers stopped).
pub(super) struct MemberGuard {
    pub(super) group: Arc<Group>,
    pub(super) member: u64,
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        let mut st = self.group.state.lock();
        st.members.remove(&self.member);
        for o in st.owners.iter_mut() {
            if o.is_some_and(|o| o.member == self.member) {
                *o = None;
            }
        }
        st.rebalance();
        st.wake_members();
    }
}

pub(super) struct MemberControl {
    pub(super) group: Arc<Group>,
    pub(super) member: u64,
    pub(super) wake: Arc<Notify>,
    pub(super) rewind: bool,
}

impl MemberControl {
    /// Pauses or resumes a partition this member owns (any epoch); others are not its own.
    fn set_paused(&self, partition: u32, paused: bool) {
        let mut st = self.group.state.lock();
        let own = st
            .owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == self.member);
        if own {
            st.cursors[partition as usize].paused = paused;
        }
    }
}

impl PartitionControl for MemberControl {
    fn pause(&self, partition: u32) {
        self.set_paused(partition, true);
    }

    fn resume(&self, partition: u32) {
        self.set_paused(partition, false);
        self.wake.notify_one();
    }
}

#[async_trait]
impl GroupControl for MemberControl {
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        if !st.owned_by(partition, self.member, epoch) {
            return Err(Error::Conflict(format!(
                "partition {partition} is no longer owned under epoch {epoch}"
            )));
        }
        let p = partition as usize;
        if self.rewind {
            // Back to the first unacknowledged message: whatever an earlier owner left
            // unacknowledged comes first, now, instead of after its ack deadline.
            let pending: Vec<(Instant, u64)> = st.cursors[p]
                .pending
                .iter()
                .map(|(o, x)| (x.deadline, *o))
                .collect();
            for (deadline, offset) in pending {
                st.timers.remove(&(deadline, partition, offset));
            }
            let c = &mut st.cursors[p];
            for (offset, pending) in std::mem::take(&mut c.pending) {
                c.counts.rewound(offset, pending.deliveries);
            }
            c.next = c.acks.floor();
        }
        if let Some(o) = st.owners[p].as_mut() {
            o.rewound = true;
        }
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        if st.owned_by(partition, self.member, epoch) {
            st.owners[partition as usize] = None;
            st.rebalance();
            st.wake_members();
        }
        Ok(())
    }
}
