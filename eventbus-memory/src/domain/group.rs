//! A consumer group's shared state: its members, the rendezvous assignment of partitions
//! with ownership epochs, and the redelivery timers of its cursors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dualbus_core::GroupEvent;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::cursor::Cursor;

/// The current owner of a partition.
#[derive(Debug, Clone, Copy)]
pub(super) struct Owner {
    pub(super) member: u64,
    pub(super) epoch: u64,
    /// The owner asked for the rewind: the partition is delivered.
    pub(super) rewound: bool,
    /// Revoked: waiting for the owner to drain and release it.
    revoking: bool,
}

#[derive(Debug)]
pub(super) struct Member {
    /// The name rendezvous hashing ranks.
    pub(super) name: String,
    pub(super) events: async_channel::Sender<GroupEvent>,
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
            .is_some_and(|o| o.member == member && o.rewound && !o.revoking);
        owned && !self.cursors[partition as usize].paused
    }

    /// Moves every partition toward its rendezvous owner among the live members: a free
    /// partition is assigned at once (new epoch); an owned one is revoked from its owner,
    /// who drains and releases it, and only then is it assigned.
    pub(super) fn rebalance(&mut self) {
        let names: Vec<&str> = self.members.values().map(|m| m.name.as_str()).collect();
        let by_name: HashMap<&str, u64> = self
            .members
            .iter()
            .map(|(id, m)| (m.name.as_str(), *id))
            .collect();
        let mut sends: Vec<(u64, GroupEvent)> = Vec::new();
        for p in 0..self.owners.len() {
            let partition = p as u32;
            let desired = dualbus_core::group::owner(partition, names.iter().copied())
                .and_then(|n| by_name.get(n).copied());
            match self.owners[p] {
                Some(o) if Some(o.member) == desired => {}
                Some(mut o) if self.members.contains_key(&o.member) => {
                    if !o.revoking {
                        o.revoking = true;
                        self.owners[p] = Some(o);
                        sends.push((
                            o.member,
                            GroupEvent::Revoked {
                                partition,
                                epoch: o.epoch,
                            },
                        ));
                    }
                }
                _ => {
                    // Free, or its owner is gone: assign it.
                    self.owners[p] = None;
                    if let Some(member) = desired {
                        self.epochs[p] += 1;
                        let epoch = self.epochs[p];
                        self.owners[p] = Some(Owner {
                            member,
                            epoch,
                            rewound: false,
                            revoking: false,
                        });
                        self.cursors[p].paused = false;
                        sends.push((member, GroupEvent::Assigned { partition, epoch }));
                    }
                }
            }
        }
        for (member, event) in sends {
            if let Some(m) = self.members.get(&member) {
                // Unbounded: the member reads its events before anything else.
                let _ = m.events.try_send(event);
            }
        }
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
}
