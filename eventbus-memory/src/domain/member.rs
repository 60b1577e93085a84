//! A subscription's membership in its group: the member registry and the partition leases
//! the core coordinator runs on, leaving on drop, pausing partitions, and the rewind.

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::group::{LeaseStore, MemberRegistry};
use dualbus_core::{Error, GroupControl, PartitionControl, Result};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::group::{Group, Owner};

/// Leaves the group when the subscription's stream is dropped; the member's leases end at
/// once, as a lease ends when its holder's process dies (the pool drops the stream only
/// after its handlers stopped), and the other members' coordinators take the partitions.
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
        st.wake_members();
        drop(st);
        self.group.changed();
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

    /// Nothing to do here: the coordinator gives the lease back ([`Coordination`]).
    async fn release(&self, _partition: u32, _epoch: u64) -> Result<()> {
        Ok(())
    }
}

/// The group's member registry and partition leases, in process: members are live from
/// their join until they leave or their subscription is dropped (no expiry needed: the
/// group sees a member's end at once), and a partition's lease is its owner entry.
pub(super) struct Coordination {
    pub(super) group: Arc<Group>,
}

impl Coordination {
    fn set_live(&self, member: &str, live: bool) -> bool {
        let mut st = self.group.state.lock();
        let Some(id) = st.member_id(member) else {
            return false;
        };
        if let Some(m) = st.members.get_mut(&id) {
            m.live = live;
        }
        drop(st);
        self.group.changed();
        true
    }
}

#[async_trait]
impl MemberRegistry for Coordination {
    async fn join(&self, member: &str) -> Result<()> {
        if self.set_live(member, true) {
            Ok(())
        } else {
            Err(Error::closed("memory group member"))
        }
    }

    async fn heartbeat(&self, member: &str) -> Result<bool> {
        let st = self.group.state.lock();
        Ok(st
            .member_id(member)
            .and_then(|id| st.members.get(&id))
            .is_some_and(|m| m.live))
    }

    async fn members(&self) -> Result<Vec<String>> {
        let st = self.group.state.lock();
        Ok(st
            .members
            .values()
            .filter(|m| m.live)
            .map(|m| m.name.clone())
            .collect())
    }

    async fn leave(&self, member: &str) -> Result<()> {
        self.set_live(member, false);
        Ok(())
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let rx = self.group.changes.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
        .boxed()
    }
}

#[async_trait]
impl LeaseStore for Coordination {
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
        let mut st = self.group.state.lock();
        let Some(id) = st.member_id(member) else {
            return Err(Error::closed("memory group member"));
        };
        let p = partition as usize;
        if p >= st.owners.len() || st.owners[p].is_some() {
            return Ok(None);
        }
        st.epochs[p] += 1;
        let epoch = st.epochs[p];
        st.owners[p] = Some(Owner {
            member: id,
            epoch,
            rewound: false,
        });
        st.cursors[p].paused = false;
        Ok(Some(epoch))
    }

    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
        let st = self.group.state.lock();
        Ok(st
            .member_id(member)
            .is_some_and(|id| st.owned_by(partition, id, epoch)))
    }

    async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()> {
        let mut st = self.group.state.lock();
        let Some(id) = st.member_id(member) else {
            return Ok(());
        };
        if st.owned_by(partition, id, epoch) {
            st.owners[partition as usize] = None;
            st.wake_members();
            drop(st);
            self.group.changed();
        }
        Ok(())
    }
}
