//! A group's partitions and their leases, run by the core group coordinator: each partition
//! has a lease, a key of the lease bucket, taken and renewed through the coordinator, and
//! its own durable consumer, which the member pulls only while it holds the lease.
//!
//! With one partition (a topic of one partition, or of the subject layout) one subscriber
//! is active and the others stand by (sticky placement), taking over when the lease is
//! released or expires, or fail at once with `Conflict` when they asked to. With more, the
//! members share the partitions (balanced placement).

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig, LeaseStore, Placement};
use dualbus_core::{
    Error, GroupControl, GroupMembership, PartitionControl, Result, SubscriptionSpec,
};
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::coordination::{KvLeases, KvRegistry, open_bucket};
use super::{Inner, JetStream};

/// Which epoch this subscriber may deliver a partition's messages under: `Some` from the
/// pool's rewind at the assignment until the lease is released or lost. The partition's
/// pull loop pulls only while set.
pub(super) type Owned = watch::Receiver<Option<u64>>;

impl JetStream {
    /// The bucket `<prefix><suffix>` and the max age it has, opened once per transport.
    async fn bucket(
        &self,
        cell: &tokio::sync::OnceCell<(kv::Store, Duration)>,
        suffix: &str,
        description: &str,
        max_age: Duration,
        setting: &str,
    ) -> Result<(kv::Store, Duration)> {
        let r = cell
            .get_or_try_init(|| async {
                let bucket = format!("{}{suffix}", self.inner.config.stream.prefix);
                let replicas = self.inner.config.stream.replicas;
                open_bucket(
                    &self.inner.js,
                    &bucket,
                    description,
                    max_age,
                    replicas,
                    setting,
                )
                .await
            })
            .await?;
        Ok(r.clone())
    }

    /// The lease bucket and the lease TTL it has.
    async fn lease_bucket(&self) -> Result<(kv::Store, Duration)> {
        let c = &self.inner.config.consumer;
        self.bucket(
            &self.inner.leases,
            "LEASES",
            "dualbus single-active-subscriber leases",
            c.lease_ttl,
            "nats.jetstream.consumer.lease_ttl",
        )
        .await
    }

    /// The member bucket and the member timeout it has.
    async fn member_bucket(&self) -> Result<(kv::Store, Duration)> {
        let c = &self.inner.config.consumer;
        self.bucket(
            &self.inner.members,
            "MEMBERS",
            "dualbus group members",
            c.member_timeout,
            "nats.jetstream.consumer.member_timeout",
        )
        .await
    }

    /// Joins the group of durable `consumer` on `stream` with `partitions` partitions: the
    /// membership the pool consumes, and per partition the ownership its pull loop follows.
    pub(super) async fn join_group(
        &self,
        stream: &str,
        consumer: &str,
        spec: &SubscriptionSpec,
        partitions: u32,
    ) -> Result<(GroupMembership, Vec<Owned>, Arc<KvLeases>)> {
        let (store, ttl) = self.lease_bucket().await?;
        let kv = Arc::new(KvLeases::new(store, stream, consumer, partitions == 1, ttl));
        let keys: Vec<String> = (0..partitions).map(|p| kv.key(p)).collect();
        if !spec.standby {
            // A subscription of this client on the same consumer holds the lease until it
            // has stopped (after its last handler): one that was just dropped releases it in
            // the background. Wait for that, up to the request timeout, instead of reporting
            // a conflict with ourselves.
            let ours: Vec<CancellationToken> = {
                let held = self.inner.held.lock();
                keys.iter()
                    .filter_map(|k| held.get(k).map(|h| h.released.clone()))
                    .collect()
            };
            for released in ours {
                let _ =
                    tokio::time::timeout(self.inner.config.request_timeout, released.cancelled())
                        .await;
            }
        }
        let member = uuid::Uuid::now_v7().simple().to_string();
        let (members, member_timeout) = self.member_bucket().await?;
        let registry = Arc::new(KvRegistry::new(members, stream, consumer));
        let (epochs, owned): (Vec<Arc<Epoch>>, Vec<Owned>) = (0..partitions)
            .map(|_| {
                let (tx, rx) = watch::channel(None);
                let epoch = Arc::new(Epoch {
                    leased: Mutex::new(None),
                    owned: tx,
                });
                (epoch, rx)
            })
            .unzip();
        let epochs: Arc<[Arc<Epoch>]> = epochs.into();
        let leases = Arc::new(Leases {
            kv: kv.clone(),
            epochs: epochs.clone(),
            keys,
            member: member.clone(),
            transport: Arc::downgrade(&self.inner),
        });
        let control = Arc::new(Control { epochs });
        let config = CoordinatorConfig::new(partitions)
            .placement(if partitions == 1 {
                Placement::Sticky
            } else {
                Placement::Balanced
            })
            // Renewals carry the heartbeat: often enough for both to stay alive.
            .renew_every(ttl.min(member_timeout) / 3)
            .poll_every(ttl)
            .standby(spec.standby);
        match Coordinator::join(member, registry, leases, control, config).await {
            Ok(membership) => Ok((membership, owned, kv)),
            Err(Error::Conflict(_)) if partitions == 1 => Err(Error::Conflict(format!(
                "another subscriber of group {:?} on topic {:?} is active (the topic has one partition: one subscriber per group; subscribe as a standby to wait for it); its lease ends when it closes or {ttl:?} after it stopped",
                spec.group, spec.topic
            ))),
            Err(Error::Conflict(_)) => Err(Error::Conflict(format!(
                "the members of group {:?} on topic {:?} own all its {partitions} partitions (subscribe as a standby to wait for one)",
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
                // Only while it is still ours: it may have expired and been taken meanwhile.
                let release = async {
                    if let Ok(Some(e)) = store.entry(&key).await
                        && e.operation == kv::Operation::Put
                        && e.value == lease.member.as_bytes()
                    {
                        let _ = store.delete_expect_revision(&key, Some(e.revision)).await;
                    }
                };
                let _ = tokio::time::timeout(self.inner.config.request_timeout, release).await;
                lease.released.cancel();
            }
        }
    }
}

/// A lease of this client, as the transport tracks it.
pub(super) struct HeldLease {
    /// The epoch it was taken under.
    epoch: u64,
    /// The member holding it (the value of its key).
    member: String,
    /// Cancelled once the lease is released on the server (or lost).
    released: CancellationToken,
}

/// The lease's epoch as this subscriber holds it, and the epoch it delivers under. The pull
/// loop delivers only under an epoch whose lease is held: the rewind starts delivering only
/// for the lease held now, and the lease's end stops it, under one lock.
struct Epoch {
    /// The epoch of the lease held, if any.
    leased: Mutex<Option<u64>>,
    owned: watch::Sender<Option<u64>>,
}

impl Epoch {
    /// The lease of `epoch` is held from now on.
    fn leased(&self, epoch: u64) {
        *self.leased.lock() = Some(epoch);
    }

    /// The lease of `epoch` ended (released or lost): delivering under it stops.
    fn ended(&self, epoch: u64) {
        let mut leased = self.leased.lock();
        if *leased == Some(epoch) {
            *leased = None;
        }
        self.stop(epoch);
    }

    /// Delivering under `epoch` stops (if it is the one delivered under).
    fn stop(&self, epoch: u64) {
        self.owned.send_if_modified(|o| {
            let ours = *o == Some(epoch);
            if ours {
                *o = None;
            }
            ours
        });
    }

    /// Delivering under `epoch` starts, if its lease is still held.
    fn start(&self, epoch: u64) -> bool {
        let leased = self.leased.lock();
        if *leased != Some(epoch) {
            return false;
        }
        self.owned.send_replace(Some(epoch));
        true
    }
}

/// The leases of a group's partitions in the lease bucket, which also tell each partition's
/// pull loop when delivering must stop (released or lost) and let the transport release
/// them at close.
struct Leases {
    kv: Arc<KvLeases>,
    /// Per partition.
    epochs: Arc<[Arc<Epoch>]>,
    /// Per partition: its lease's key.
    keys: Vec<String>,
    /// This subscriber's member id, the value of its lease keys.
    member: String,
    transport: Weak<Inner>,
}

/// The epoch state of `partition`, if the group has it (the coordinator only asks for
/// partitions below the count it was given: the same count made `epochs`).
fn epoch_of(epochs: &[Arc<Epoch>], partition: u32) -> Result<&Arc<Epoch>> {
    usize::try_from(partition)
        .ok()
        .and_then(|p| epochs.get(p))
        .ok_or_else(|| Error::Conflict(format!("the group has no partition {partition}")))
}

impl Leases {
    fn key(&self, partition: u32) -> &str {
        usize::try_from(partition)
            .ok()
            .and_then(|p| self.keys.get(p))
            .map_or("", String::as_str)
    }

    /// Delivering `partition` under `epoch` ends, and the transport forgets the lease.
    fn ended(&self, partition: u32, epoch: u64) {
        if let Ok(e) = epoch_of(&self.epochs, partition) {
            e.ended(epoch);
        }
        if let Some(inner) = self.transport.upgrade() {
            let key = self.key(partition);
            let mut held = inner.held.lock();
            if held.get(key).is_some_and(|h| h.epoch == epoch)
                && let Some(h) = held.remove(key)
            {
                h.released.cancel();
            }
        }
    }
}

#[async_trait]
impl LeaseStore for Leases {
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
        // A closed transport takes no lease: nothing would renew or release it.
        let Some(inner) = self
            .transport
            .upgrade()
            .filter(|i| !i.shutdown.is_cancelled())
        else {
            return Ok(None);
        };
        let state = epoch_of(&self.epochs, partition)?;
        let epoch = self.kv.acquire(partition, member).await?;
        if let Some(epoch) = epoch {
            state.leased(epoch);
            inner.held.lock().insert(
                self.key(partition).to_owned(),
                HeldLease {
                    epoch,
                    member: self.member.clone(),
                    released: CancellationToken::new(),
                },
            );
        }
        Ok(epoch)
    }

    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
        let kept = self.kv.renew(partition, member, epoch).await?;
        if !kept {
            tracing::error!(key = %self.key(partition), partition, "partition lease lost (taken, or not renewed for its TTL); delivering it stops");
            self.ended(partition, epoch);
        }
        Ok(kept)
    }

    async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()> {
        self.ended(partition, epoch);
        self.kv.release(partition, member, epoch).await
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        self.kv.changes()
    }
}

/// The pool's control of a group's partitions: the rewind at an assignment lets the
/// partition's pull loop deliver (it rewinds the consumer to its ack floor first).
struct Control {
    epochs: Arc<[Arc<Epoch>]>,
}

impl PartitionControl for Control {
    /// Delivering the partition stops (the pool pauses a revoked partition).
    fn pause(&self, partition: u32) {
        if let Ok(e) = epoch_of(&self.epochs, partition) {
            e.owned.send_replace(None);
        }
    }

    /// Nothing: delivering starts again only with the next assignment's rewind.
    fn resume(&self, _partition: u32) {}
}

#[async_trait]
impl GroupControl for Control {
    /// Lets the partition's pull loop deliver under `epoch` (it rewinds the consumer
    /// first), unless the lease of `epoch` ended meanwhile: then the partition is lost.
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        if epoch_of(&self.epochs, partition)?.start(epoch) {
            Ok(())
        } else {
            Err(Error::Conflict(format!(
                "partition {partition}: the lease of epoch {epoch} ended before its rewind"
            )))
        }
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        epoch_of(&self.epochs, partition)?.stop(epoch);
        Ok(())
    }
}
