//! A group's place in one partition: the next offset, the deliveries out, the ack floor.

use std::collections::BTreeMap;

use dualbus_core::offsets::{AckFloor, DeliveryCounter};
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
    /// The acknowledged offsets: the contiguous floor and those above it.
    pub(super) acks: AckFloor,
    /// Delivery counts that go on across a rewind (taken from an earlier owner), so that
    /// they do not start again at 1.
    pub(super) counts: DeliveryCounter,
    pub(super) paused: bool,
}

impl Cursor {
    /// A cursor whose first offset to deliver (and ack floor) is `start`.
    pub(super) fn starting_at(start: u64) -> Self {
        Self {
            next: start,
            acks: AckFloor::new(start),
            ..Self::default()
        }
    }

    pub(super) fn settle(&mut self, offset: u64) {
        self.pending.remove(&offset);
        self.counts.forget(offset);
        self.acks.ack(offset);
    }
}
