//! Bookkeeping over a partition's offsets that every backend with acknowledgements needs:
//! the contiguous ack floor (what a Kafka member commits, where a takeover rewinds to) and
//! delivery counts that go on across a rewind.
//!
//! Offsets are the backend's positions within one partition (memory: log index; JetStream:
//! stream sequence; Kafka: offset). Keep one value of each type per partition.

use std::collections::{BTreeMap, BTreeSet};

/// The contiguous ack floor of one partition: every offset below [`AckFloor::floor`] is
/// acknowledged; acknowledgements above it wait in a set until the gap below them closes.
///
/// Memory holds one entry per acknowledged offset above the floor: as many as the
/// deliveries acknowledged out of order while an earlier one is still open (bounded by what
/// the pool holds, `max_in_flight + max_deferred`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckFloor {
    floor: u64,
    above: BTreeSet<u64>,
}

impl AckFloor {
    /// A floor at `floor`: every offset below it counts as acknowledged.
    pub fn new(floor: u64) -> Self {
        Self {
            floor,
            above: BTreeSet::new(),
        }
    }

    /// The first offset not acknowledged: everything below it is.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Whether `offset` is acknowledged (below the floor, or above it and acknowledged).
    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.floor || self.above.contains(&offset)
    }

    /// Records the acknowledgement of `offset`; returns whether the floor moved (a Kafka
    /// member then commits the new floor). Acknowledging twice, or below the floor, changes
    /// nothing.
    pub fn ack(&mut self, offset: u64) -> bool {
        if offset < self.floor {
            return false;
        }
        self.above.insert(offset);
        let before = self.floor;
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
        self.floor != before
    }

    /// How many offsets above the floor are acknowledged (waiting for the gap to close).
    pub fn acked_above(&self) -> usize {
        self.above.len()
    }

    /// The offsets above the floor that are acknowledged, ascending (what a Kafka member
    /// lists in its commit metadata so that the next owner skips them).
    pub fn acked_above_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.above.iter().copied()
    }
}

/// Delivery counts of one partition's messages that go on across a rewind, so that a
/// handler sees a message delivered before a takeover or reconnect as redelivered, not as
/// new (the broker's own count may start again at 1 after a consumer reset).
///
/// Two sources, as the backend knows them: exact counts carried over from the deliveries
/// the rewind took back ([`DeliveryCounter::rewound`]), and a high-water mark: a message at
/// or below the highest offset delivered before was delivered at least once already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryCounter {
    high_water: Option<u64>,
    carried: BTreeMap<u64, u32>,
}

impl DeliveryCounter {
    /// A counter that knows nothing was delivered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every offset up to and including `offset` was delivered before (a consumer's
    /// delivered position as the broker reports it at a rewind).
    pub fn delivered_through(&mut self, offset: u64) {
        self.high_water = Some(self.high_water.map_or(offset, |h| h.max(offset)));
    }

    /// `offset` was out `deliveries` times when a rewind took it back: its next delivery
    /// counts `deliveries + 1`.
    pub fn rewound(&mut self, offset: u64, deliveries: u32) {
        self.carried.insert(offset, deliveries);
        self.delivered_through(offset);
    }

    /// The delivery count to report for a delivery of `offset` whose count the broker gives
    /// as `broker_count` (1 for a first delivery as the broker sees it).
    pub fn count(&mut self, offset: u64, broker_count: u32) -> u32 {
        let broker_count = broker_count.max(1);
        if let Some(before) = self.carried.remove(&offset) {
            return broker_count.max(before.saturating_add(1));
        }
        match self.high_water {
            Some(h) if offset <= h => broker_count.max(2),
            _ => {
                self.high_water = Some(offset);
                broker_count
            }
        }
    }

    /// `offset` was acknowledged: nothing carried for it is needed any more.
    pub fn forget(&mut self, offset: u64) {
        self.carried.remove(&offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_moves_only_over_a_contiguous_prefix() {
        let mut f = AckFloor::new(10);
        assert!(!f.ack(12), "a gap at 10 and 11 holds the floor");
        assert!(!f.ack(11));
        assert_eq!((f.floor(), f.acked_above()), (10, 2));
        assert_eq!(f.acked_above_offsets().collect::<Vec<_>>(), [11, 12]);
        assert!(f.is_acked(11) && !f.is_acked(10) && f.is_acked(9));
        assert!(f.ack(10), "the gap closed: the floor jumps past 12");
        assert_eq!((f.floor(), f.acked_above()), (13, 0));
        assert!(!f.ack(12), "below the floor: no change");
        assert!(!f.ack(14));
        assert!(!f.ack(14), "twice: no change");
        assert_eq!((f.floor(), f.acked_above()), (13, 1));
    }

    #[test]
    fn floor_follows_random_ack_orders() {
        // Every permutation of 0..6: the floor is always the first missing offset.
        let mut orders = vec![vec![]];
        for n in 0..6u64 {
            orders = orders
                .into_iter()
                .flat_map(|o: Vec<u64>| {
                    (0..=o.len()).map(move |i| {
                        let mut o = o.clone();
                        o.insert(i, n);
                        o
                    })
                })
                .collect();
        }
        assert_eq!(orders.len(), 720);
        for order in orders {
            let mut f = AckFloor::default();
            let mut acked = BTreeSet::new();
            for o in order {
                f.ack(o);
                acked.insert(o);
                let expected = (0..).find(|x| !acked.contains(x)).unwrap_or(0);
                assert_eq!(f.floor(), expected);
            }
        }
    }

    #[test]
    fn counts_go_on_across_a_rewind() {
        let mut c = DeliveryCounter::new();
        assert_eq!(c.count(1, 1), 1);
        assert_eq!(c.count(2, 1), 1);
        // The consumer was reset: the broker counts 1 again for what it delivered before.
        assert_eq!(c.count(1, 1), 2);
        assert_eq!(
            c.count(3, 1),
            1,
            "past the high-water mark: a first delivery"
        );
        // Exact counts carried by a rewind win over the mark.
        c.rewound(2, 4);
        assert_eq!(c.count(2, 1), 5);
        assert_eq!(c.count(2, 1), 2, "carried once, then the mark");
        // The broker's own count wins when it is higher.
        assert_eq!(c.count(1, 7), 7);
        c.rewound(9, 1);
        c.forget(9);
        assert_eq!(c.count(9, 1), 2, "forgotten, but below the mark");
        let mut d = DeliveryCounter::new();
        d.delivered_through(5);
        d.delivered_through(3);
        assert_eq!((d.count(5, 1), d.count(6, 1)), (2, 1));
    }
}
