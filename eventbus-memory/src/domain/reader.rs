//! A member's deliveries: due redeliveries first, then new messages round-robin over the
//! partitions it consumes.

use std::sync::Arc;
use std::time::Duration;

use dualbus_core::Delivery;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::acker::MemoryAcker;
use super::cursor::Pending;
use super::group::{Group, GroupState};
use super::log::{Stored, Topic, inbound};

pub(super) struct Reader {
    pub(super) topic: Arc<Topic>,
    pub(super) group: Arc<Group>,
    pub(super) member: u64,
    pub(super) wake: Arc<Notify>,
    pub(super) ack_wait: Duration,
}

impl Reader {
    /// Waits for the next delivery of a partition this member consumes: a due redelivery
    /// first, then new messages round-robin over partitions.
    pub(super) async fn next(&self) -> Delivery {
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let now = Instant::now();
            let next_deadline = {
                let logs = self.topic.logs.lock();
                let mut st = self.group.state.lock();
                if let Some(d) = self.take(&logs, &mut st, now) {
                    return d;
                }
                st.timers
                    .iter()
                    .find(|(_, p, _)| st.consumes(*p, self.member))
                    .map(|(d, _, _)| *d)
            };
            match next_deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = &mut wake => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => wake.await,
            }
        }
    }

    fn take(
        &self,
        logs: &[Vec<Arc<Stored>>],
        st: &mut GroupState,
        now: Instant,
    ) -> Option<Delivery> {
        // Due redeliveries, earliest deadline first.
        let due = st
            .timers
            .iter()
            .take_while(|(d, _, _)| *d <= now)
            .find(|(_, p, _)| st.consumes(*p, self.member))
            .copied();
        if let Some((_, partition, offset)) = due {
            st.set_deadline(partition, offset, now + self.ack_wait);
            let epoch = st.owners[partition as usize]?.epoch;
            let p = st.cursors[partition as usize].pending.get_mut(&offset)?;
            p.deliveries += 1;
            let count = p.deliveries;
            let stored = logs[partition as usize].get(offset as usize)?;
            return Some(self.delivery(stored, partition, offset, count, epoch));
        }
        let n = st.cursors.len();
        for i in 0..n {
            let partition = (st.rr + i) % n;
            if !st.consumes(partition as u32, self.member) {
                continue;
            }
            let c = &mut st.cursors[partition];
            // Skip what was acknowledged (after a rewind: below the floor, or above it and
            // acknowledged) or is already out for delivery.
            c.next = c.next.max(c.acks.floor());
            while c.next < logs[partition].len() as u64
                && (c.acks.is_acked(c.next) || c.pending.contains_key(&c.next))
            {
                c.next += 1;
            }
            if c.next >= logs[partition].len() as u64 {
                continue;
            }
            let offset = c.next;
            c.next += 1;
            let deadline = now + self.ack_wait;
            let deliveries = c.counts.count(offset, 1);
            c.pending.insert(
                offset,
                Pending {
                    deadline,
                    deliveries,
                },
            );
            st.timers.insert((deadline, partition as u32, offset));
            st.rr = (partition + 1) % n;
            let epoch = st.owners[partition]?.epoch;
            let stored = &logs[partition][offset as usize];
            return Some(self.delivery(stored, partition as u32, offset, deliveries, epoch));
        }
        None
    }

    fn delivery(
        &self,
        stored: &Stored,
        partition: u32,
        offset: u64,
        count: u32,
        epoch: u64,
    ) -> Delivery {
        Delivery::new(
            inbound(&self.topic.name, stored, partition, offset),
            count,
            Arc::new(MemoryAcker {
                group: self.group.clone(),
                member: self.member,
                partition,
                offset,
                epoch,
                ack_wait: self.ack_wait,
            }),
        )
        .with_epoch(epoch)
    }
}
