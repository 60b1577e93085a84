//! A consumer group's shared state: its members, the owners of its partitions with their
//! ownership epochs (the leases the core coordinator takes and gives back), and the
//! redelivery timers of its cursors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::cursor::Cursor;

/// The current owner of a partition.
#[derive(Debug, Clone, Copy)]
pub(super) struct Owner {
    pub(super) member: u64,
    pub(super) epoch: u64,
    /// The owner asked for the rewind: the partition is delivered.
    pub(super) rewound: bool,
}

#[derive(Debug)]
pub(super) struct Member {
    /// The name rendezvous hashing ranks.
    pub(super) name: String,
    /// Joined through the coordinator (counted among the live members).
    pub(super) live: bool,
    pub(super) wake: Arc<Notify>,
}

#[derive(Debug, Default)]
pub(super) struct GroupState {
    pub(super) cursors: Vec<Cursor>,
    /// Redelivery deadlines: `(deadline, partition, offset)`, one per pending message.
    pub(super) timers: BTreeSet<(Instant, u32, u64)>,
    /// Round-robin start for fairness between partitions.
    pub(super) rr: usize,
    pub(super) members: BTreeMap<u64, Member>,
    pub(super) next_member: u64,
    pub(super) owners: Vec<Option<Owner>>,
    /// The last epoch handed out, per partition.
    pub(super) epochs: Vec<u64>,
}

impl GroupState {
    pub(super) fn set_deadline(&mut self, partition: u32, offset: u64, deadline: Instant) -> bool {
        let Some(p) = self
            .cursors
            .get_mut(partition as usize)
            .and_then(|c| c.pending.get_mut(&offset))
        else {
            return false;
        };
        self.timers.remove(&(p.deadline, partition, offset));
        p.deadline = deadline;
        self.timers.insert((deadline, partition, offset));
        true
    }

    pub(super) fn settle(&mut self, partition: u32, offset: u64) {
        if let Some(c) = self.cursors.get_mut(partition as usize) {
            if let Some(p) = c.pending.get(&offset) {
                self.timers.remove(&(p.deadline, partition, offset));
            }
            c.settle(offset);
        }
    }

    /// Whether `member` owns `partition` under `epoch`.
    pub(super) fn owned_by(&self, partition: u32, member: u64, epoch: u64) -> bool {
        self.owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == member && o.epoch == epoch)
    }

    /// Whether `member` consumes `partition` now (owned, rewound, not revoked, not paused).
    pub(super) fn consumes(&self, partition: u32, member: u64) -> bool {
        let owned = self
            .owners
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|o| o.member == member && o.rewound);
        owned && !self.cursors[partition as usize].paused
    }

    /// The member named `name`.
    pub(super) fn member_id(&self, name: &str) -> Option<u64> {
        self.members
            .iter()
            .find(|(_, m)| m.name == name)
            .map(|(id, _)| *id)
    }

    pub(super) fn wake_members(&self) {
        for m in self.members.values() {
            m.wake.notify_one();
        }
    }
}

#[derive(Debug)]
pub(super) struct Group {
    pub(super) state: Mutex<GroupState>,
    /// Bumped at every change of the live members or of a partition's owner: the
    /// coordinators of the members look again.
    pub(super) changes: watch::Sender<u64>,
}

impl Group {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(GroupState::default()),
            changes: watch::channel(0).0,
        }
    }

    /// Tells every member's coordinator to look again.
    pub(super) fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}
