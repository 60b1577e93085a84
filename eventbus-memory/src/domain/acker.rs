//! The acknowledgement of one delivery, ignored once its ownership epoch has ended.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::{Acker, Result};
use tokio::time::Instant;

use super::group::{Group, GroupState};

pub(super) struct MemoryAcker {
    pub(super) group: Arc<Group>,
    pub(super) member: u64,
    pub(super) partition: u32,
    pub(super) offset: u64,
    pub(super) epoch: u64,
    pub(super) ack_wait: Duration,
}

impl MemoryAcker {
    /// A stale acknowledgement (of an ownership epoch that ended) is ignored, like a Kafka
    /// commit from a revoked member.
    fn current(&self, st: &GroupState) -> bool {
        st.owned_by(self.partition, self.member, self.epoch)
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) {
            st.settle(self.partition, self.offset);
        }
        Ok(())
    }

    /// Delivered again once `delay` has passed (exactly: memory does not round).
    async fn release(&self, delay: Duration) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) && st.set_deadline(self.partition, self.offset, Instant::now() + delay)
        {
            st.wake_members();
        }
        Ok(())
    }

    async fn progress(&self) -> Result<()> {
        let mut st = self.group.state.lock();
        if self.current(&st) {
            st.set_deadline(self.partition, self.offset, Instant::now() + self.ack_wait);
        }
        Ok(())
    }
}
