//! One active subscriber per durable consumer: the group has one partition (0), whose lease
//! is a key of the lease bucket, taken and renewed through the core group coordinator.
//! Other subscribers of the group stand by and take over when the lease is released or
//! expires, or fail at once with `Conflict` when they asked to.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig, LeaseStore, MemberRegistry, Placement};
use dualbus_core::{
    Error, GroupControl, GroupMembership, PartitionControl, Result, SubscriptionSpec,
};
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::coordination::{KvLeases, KvRegistry, open_bucket};
use super::{Inner, JetStream};

/// The lease key of a durable consumer (KV keys take no `%`: it becomes `=`).
fn lease_key(stream: &str, consumer: &str) -> String {
    format!("{stream}.{consumer}").replace('%', "=")
}

/// Which epoch this subscriber may deliver under: `Some` from the pool's rewind at the
/// assignment until the lease is released or lost. The pull loop pulls only while set.
pub(super) type Owned = watch::Receiver<Option<u64>>;

impl JetStream {
    async fn lease_bucket(&self) -> Result<(kv::Store, Duration)> {
        let r = self
            .inner
            .leases
            .get_or_try_init(|| async {
                let bucket = format!("{}LEASES", self.inner.config.stream.prefix);
                open_bucket(
                    &self.inner.js,
                    &bucket,
                    "dualbus single-active-subscriber leases",
                    self.inner.config.consumer.lease_ttl,
                    "nats.jetstream.consumer.lease_ttl",
                )
                .await
            })
            .await?;
        Ok(r.clone())
    }

    /// The member bucket and the member timeout it has.
    async fn member_bucket(&self) -> Result<(kv::Store, Duration)> {
        let bucket = format!("{}MEMBERS", self.inner.config.stream.prefix);
        open_bucket(
            &self.inner.js,
            &bucket,
            "dualbus group members",
            self.inner.config.consumer.member_timeout,
            "nats.jetstream.consumer.member_timeout",
        )
        .await
    }

    /// Joins the single-active group of durable `consumer` on `stream`: the membership the
    /// pool consumes, and the ownership the pull loop follows.
    pub(super) async fn join_group(
        &self,
        stream: &str,
        consumer: &str,
        spec: &SubscriptionSpec,
    ) -> Result<(GroupMembership, Owned)> {
        let (store, ttl) = self.lease_bucket().await?;
        let key = lease_key(stream, consumer);
        if !spec.standby {
            // A subscription of this client on the same consumer holds the lease until it
            // has stopped (after its last handler): one that was just dropped releases it in
            // the background. Wait for that, up to the request timeout, instead of reporting
            // a conflict with ourselves.
            let ours = self.inner.held.lock().get(&key).map(|h| h.released.clone());
            if let Some(released) = ours {
                let _ =
                    tokio::time::timeout(self.inner.config.request_timeout, released.cancelled())
                        .await;
            }
        }
        let member = uuid::Uuid::now_v7().simple().to_string();
        let (members, member_timeout) = self.member_bucket().await?;
        let registry = Arc::new(KvRegistry::new(members, stream, consumer));
        let (owned_tx, owned_rx) = watch::channel(None);
        let owned_tx = Arc::new(owned_tx);
        let leases = Arc::new(SingleLease {
            kv: KvLeases::new(store, stream, consumer, true, ttl),
            owned: owned_tx.clone(),
            key,
            transport: Arc::downgrade(&self.inner),
        });
        let control = Arc::new(SingleControl { owned: owned_tx });
        let config = CoordinatorConfig::new(1)
            .placement(Placement::Sticky)
            // Renewals carry the heartbeat: often enough for both to stay alive.
            .renew_every(ttl.min(member_timeout) / 3)
            .poll_every(ttl)
            .standby(spec.standby);
        let registry: Arc<dyn MemberRegistry> = registry;
        match Coordinator::join(member, registry, leases, control, config).await {
            Ok(membership) => Ok((membership, owned_rx)),
            Err(Error::Conflict(_)) => Err(Error::Conflict(format!(
                "another subscriber of group {:?} on topic {:?} is active (JetStream keeps one per durable consumer until partitioned groups; subscribe as a standby to wait for it); its lease ends when it closes or {ttl:?} after it stopped",
                spec.group, spec.topic
            ))),
            Err(e) => Err(e),
        }
    }

    /// Releases on the server every lease this client's subscriptions hold.
    pub(super) async fn release_held(&self) {
        let held: Vec<(String, HeldLease)> = self.inner.held.lock().drain().collect();
        if let Some((store, _)) = self.inner.leases.get() {
            for (key, lease) in held {
                let _ = tokio::time::timeout(self.inner.config.request_timeout, store.delete(&key))
                    .await;
                lease.released.cancel();
            }
        }
    }
}

/// A lease of this client, as the transport tracks it.
pub(super) struct HeldLease {
    /// The epoch it was taken under.
    epoch: u64,
    /// Cancelled once the lease is released on the server (or lost).
    released: CancellationToken,
}

/// Delivering under `epoch` ends (if it is still the one delivered under).
fn end_epoch(owned: &watch::Sender<Option<u64>>, epoch: u64) {
    owned.send_if_modified(|o| {
        let ours = *o == Some(epoch);
        if ours {
            *o = None;
        }
        ours
    });
}

/// The lease of a single-active group: the bucket's lease, which also tells the pull loop
/// when delivering must stop (released or lost) and lets the transport release it at close.
struct SingleLease {
    kv: KvLeases,
    owned: Arc<watch::Sender<Option<u64>>>,
    key: String,
    transport: Weak<Inner>,
}

impl SingleLease {
    /// Delivering under `epoch` ends, and the transport forgets the lease.
    fn ended(&self, epoch: u64) {
        end_epoch(&self.owned, epoch);
        if let Some(inner) = self.transport.upgrade() {
            let mut held = inner.held.lock();
            if held.get(&self.key).is_some_and(|h| h.epoch == epoch)
                && let Some(h) = held.remove(&self.key)
            {
                h.released.cancel();
            }
        }
    }
}

#[async_trait]
impl LeaseStore for SingleLease {
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
        let epoch = self.kv.acquire(partition, member).await?;
        if let (Some(epoch), Some(inner)) = (epoch, self.transport.upgrade()) {
            inner.held.lock().insert(
                self.key.clone(),
                HeldLease {
                    epoch,
                    released: CancellationToken::new(),
                },
            );
        }
        Ok(epoch)
    }

    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
        let kept = self.kv.renew(partition, member, epoch).await?;
        if !kept {
            tracing::error!(key = %self.key, "single-active-subscriber lease lost (taken, or not renewed for its TTL); delivering stops");
            self.ended(epoch);
        }
        Ok(kept)
    }

    async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()> {
        self.ended(epoch);
        self.kv.release(partition, member, epoch).await
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        self.kv.changes()
    }
}

/// The pool's control of a single-active group: the rewind at the assignment lets the pull
/// loop deliver (it rewinds the consumer to its ack floor first).
struct SingleControl {
    owned: Arc<watch::Sender<Option<u64>>>,
}

impl PartitionControl for SingleControl {
    /// Delivering stops (the pool pauses a revoked partition; a single-active group is
    /// never revoked, only released or lost).
    fn pause(&self, _partition: u32) {
        self.owned.send_replace(None);
    }

    /// Nothing: delivering starts again only with the next assignment's rewind.
    fn resume(&self, _partition: u32) {}
}

#[async_trait]
impl GroupControl for SingleControl {
    async fn rewind(&self, _partition: u32, epoch: u64) -> Result<()> {
        self.owned.send_replace(Some(epoch));
        Ok(())
    }

    async fn release(&self, _partition: u32, epoch: u64) -> Result<()> {
        end_epoch(&self.owned, epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_are_valid_kv_keys() {
        let k = lease_key("DUALBUS_orders%2Ev1", "billing");
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
            "{k}"
        );
    }
}
