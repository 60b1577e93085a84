//! A group's place in one partition: the next offset, the deliveries out, the ack floor.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) deadline: Instant,
    pub(super) deliveries: u32,
}

#[derive(Debug, Default)]
pub(super) struct Cursor {
    /// Next offset to look at for a first delivery.
    pub(super) next: u64,
    /// Delivered and not acknowledged.
    pub(super) pending: BTreeMap<u64, Pending>,
    /// Every offset below it is acknowledged.
    pub(super) floor: u64,
    /// Acknowledged offsets above the floor.
    pub(super) acked: BTreeSet<u64>,
    /// Deliveries so far of messages that a rewind took back from an earlier owner, so that
    /// their delivery count goes on instead of starting again at 1.
    pub(super) delivered_before: BTreeMap<u64, u32>,
    pub(super) paused: bool,
}

impl Cursor {
    pub(super) fn settle(&mut self, offset: u64) {
        self.pending.remove(&offset);
        self.delivered_before.remove(&offset);
        if offset >= self.floor {
            self.acked.insert(offset);
        }
        while self.acked.remove(&self.floor) {
            self.floor += 1;
        }
    }
}
