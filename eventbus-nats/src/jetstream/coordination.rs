//! A consumer group's member registry and partition leases on NATS key-value buckets, for
//! the core [`Coordinator`](dualbus_core::group::Coordinator).
//!
//! - **Members**: one key per live member, `<stream>.<consumer>.<member>`, in a bucket whose
//!   max age is the member timeout. A heartbeat rewrites the key (compare-and-set on its
//!   revision, so a member learns that it had expired); a member that stops writing expires.
//! - **Leases**: one key per partition, created only when absent (the revision of the
//!   create is the epoch: the bucket's sequence, so every new holder's epoch is greater),
//!   renewed by compare-and-set, released by a delete on the holder's revision, expired by
//!   the bucket's max age (the lease TTL) when its holder stops renewing.
//!
//! Both report changes through a watch of their keys. On buckets created with limit
//! markers (nats-server 2.11 and later) an expiry is reported too, as a marker the server
//! writes, so a standby takes over as soon as the lease expires; on older buckets an
//! expiry is only found by polling ([`CoordinatorConfig::poll`]).
//!
//! [`CoordinatorConfig::poll`]: dualbus_core::group::CoordinatorConfig::poll

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use dualbus_core::group::{LeaseStore, MemberRegistry};
use dualbus_core::{Error, Result};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use parking_lot::Mutex;

use super::api_error;

/// How long the server keeps an expiry marker (its minimum).
const MARKER_TTL: Duration = Duration::from_secs(1);

/// A key-value key from names that may hold `%` (KV keys take no `%`: it becomes `=`).
fn kv_key(parts: &[&str]) -> String {
    parts.join(".").replace('%', "=")
}

/// Opens the bucket `name`, or creates it with entries that expire after `max_age`, limit
/// markers on and `replicas` copies (on a cluster: the replicas of the streams it
/// coordinates, so that it survives what they survive). Returns the store and the max age
/// it has (an existing bucket keeps its own, with a warning when it differs).
///
/// `setting` names the configuration key of `max_age` in errors.
pub async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
    setting: &str,
) -> Result<(kv::Store, Duration)> {
    let store = match js.get_key_value(name).await {
        Ok(s) => s,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                description: description.to_owned(),
                history: 1,
                max_age,
                limit_markers: Some(MARKER_TTL),
                num_replicas: replicas.max(1),
                ..kv::Config::default()
            })
            .await
            .map_err(api_error)?,
    };
    let age = store.status().await.map_err(api_error)?.max_age();
    if age.is_zero() {
        return Err(Error::config(
            setting,
            format!("the bucket {name} has no max age: its entries would never expire"),
        ));
    }
    if age != max_age {
        tracing::warn!(bucket = name, ?age, wanted = ?max_age, "the bucket exists with another max age; using it");
    }
    Ok((store, age))
}

/// Changes of the keys under `filter` (a watch), as the coordinator takes them. The watch
/// reports changes from its opening on, so the stream also yields once when it is open (a
/// change before that is then seen by the look that follows). A watch that cannot be
/// opened ends the stream: the coordinator then finds changes by polling.
fn watch(store: &kv::Store, filter: String) -> BoxStream<'static, ()> {
    let store = store.clone();
    futures::stream::once(async move {
        match store.watch(&filter).await {
            Ok(w) => futures::stream::once(async {}).chain(w.map(|_| ())).boxed(),
            Err(e) => {
                tracing::warn!(filter, error = %e, "cannot watch the group's keys; polling instead");
                futures::stream::empty().boxed()
            }
        }
    })
    .flatten()
    .boxed()
}

/// The live members of one group (a stream's durable consumer) in a key-value bucket.
pub struct KvRegistry {
    store: kv::Store,
    /// `<stream>.<consumer>.`
    prefix: String,
    /// The revision of each member's key as this process last wrote it.
    revisions: Mutex<HashMap<String, u64>>,
}

impl KvRegistry {
    /// The registry of group `consumer` of `stream` in `store` (see [`open_bucket`]).
    pub fn new(store: kv::Store, stream: &str, consumer: &str) -> Self {
        Self {
            store,
            prefix: format!("{}.", kv_key(&[stream, consumer])),
            revisions: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, member: &str) -> String {
        format!("{}{}", self.prefix, kv_key(&[member]))
    }
}

impl std::fmt::Debug for KvRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegistry")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl MemberRegistry for KvRegistry {
    async fn join(&self, member: &str) -> Result<()> {
        let rev = self
            .store
            .put(self.key(member), Bytes::from(member.to_owned()))
            .await
            .map_err(api_error)?;
        self.revisions.lock().insert(member.to_owned(), rev);
        Ok(())
    }

    async fn heartbeat(&self, member: &str) -> Result<bool> {
        let Some(rev) = self.revisions.lock().get(member).copied() else {
            return Ok(false);
        };
        match self
            .store
            .update(self.key(member), Bytes::from(member.to_owned()), rev)
            .await
        {
            Ok(rev) => {
                self.revisions.lock().insert(member.to_owned(), rev);
                Ok(true)
            }
            // Expired (or written by someone else): the caller joins again.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.revisions.lock().remove(member);
                Ok(false)
            }
            Err(e) => Err(api_error(e)),
        }
    }

    async fn members(&self) -> Result<Vec<String>> {
        let mut keys = self.store.keys().await.map_err(api_error)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(api_error)?;
            if let Some(m) = k.strip_prefix(&self.prefix) {
                out.push(m.to_owned());
            }
        }
        Ok(out)
    }

    async fn leave(&self, member: &str) -> Result<()> {
        self.revisions.lock().remove(member);
        self.store.delete(self.key(member)).await.map_err(api_error)
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        watch(&self.store, format!("{}>", self.prefix))
    }
}

/// A lease this process holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    /// The revision of the last write (the create or a renewal).
    revision: u64,
    /// When the last write was acknowledged.
    renewed: Instant,
}

/// The partition leases of one group (a stream's durable consumer) in a key-value bucket
/// whose max age is the lease TTL.
pub struct KvLeases {
    store: kv::Store,
    /// `<stream>.<consumer>`: the key of the only lease of a single-active group (the key
    /// earlier releases used), and the prefix of `<stream>.<consumer>.<partition>`.
    base: String,
    single: bool,
    ttl: Duration,
    held: Mutex<HashMap<u32, Held>>,
    /// Per partition, its renewals, releases and checks one at a time: a release racing a
    /// renewal would find the revision moved and leave the lease to expire. (Partitions
    /// apart: one renewal waiting on the server must not hold up the others.)
    writes: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
}

impl KvLeases {
    /// The leases of group `consumer` of `stream` in `store` (see [`open_bucket`]), whose
    /// entries expire after `ttl`. `single`: the group has one partition, whose lease is the
    /// key `<stream>.<consumer>` itself.
    pub fn new(
        store: kv::Store,
        stream: &str,
        consumer: &str,
        single: bool,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            base: kv_key(&[stream, consumer]),
            single,
            ttl,
            held: Mutex::new(HashMap::new()),
            writes: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this process holds `partition`'s lease under `epoch` with time to spare: its
    /// last renewal was sent less than two thirds of the TTL ago (the point where a lease
    /// whose renewals fail counts as lost, see [`LeaseStore::renew`]). No request.
    pub(crate) fn valid(&self, partition: u32, epoch: u64) -> bool {
        self.held_under(partition, epoch)
            .is_some_and(|h| self.fresh(&h))
    }

    /// The lease of `partition` this process holds under `epoch`.
    fn held_under(&self, partition: u32, epoch: u64) -> Option<Held> {
        self.held
            .lock()
            .get(&partition)
            .copied()
            .filter(|h| h.epoch == epoch)
    }

    /// Whether `h` was last renewed less than two thirds of the TTL ago.
    fn fresh(&self, h: &Held) -> bool {
        h.renewed.elapsed() < self.ttl * 2 / 3
    }

    /// Whether the server still has `partition`'s lease as this process last wrote it under
    /// `epoch` (and it is [`valid`](Self::valid)): no other member can have taken it.
    pub(crate) async fn holds(&self, partition: u32, epoch: u64) -> Result<bool> {
        let writes = self.writes(partition);
        let _write = writes.lock().await;
        let Some(h) = self.held_under(partition, epoch).filter(|h| self.fresh(h)) else {
            return Ok(false);
        };
        match self.store.entry(self.key(partition)).await {
            Ok(Some(e)) => Ok(e.operation == kv::Operation::Put && e.revision == h.revision),
            Ok(None) => Ok(false),
            Err(e) => Err(api_error(e)),
        }
    }

    /// The lock of `partition`'s writes.
    fn writes(&self, partition: u32) -> Arc<tokio::sync::Mutex<()>> {
        self.writes.lock().entry(partition).or_default().clone()
    }

    /// The key of `partition`'s lease.
    pub(crate) fn key(&self, partition: u32) -> String {
        if self.single {
            self.base.clone()
        } else {
            format!("{}.{partition}", self.base)
        }
    }
}

impl std::fmt::Debug for KvLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvLeases")
            .field("base", &self.base)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LeaseStore for KvLeases {
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
        match self
            .store
            .create(self.key(partition), Bytes::from(member.to_owned()))
            .await
        {
            Ok(revision) => {
                self.held.lock().insert(
                    partition,
                    Held {
                        epoch: revision,
                        revision,
                        renewed: Instant::now(),
                    },
                );
                Ok(Some(revision))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(api_error(e)),
        }
    }

    /// A lease whose renewals failed for two thirds of the TTL counts as lost even without
    /// an answer from the server: it expires there a third of the TTL later, and another
    /// member may then take it. Each renewal waits at most a sixth of the TTL.
    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
        let writes = self.writes(partition);
        let _write = writes.lock().await;
        let Some(h) = self.held_under(partition, epoch) else {
            return Ok(false);
        };
        // The server's copy is at most this old once the update is acknowledged.
        let sent = Instant::now();
        let r = tokio::time::timeout(
            self.ttl / 6,
            self.store.update(
                self.key(partition),
                Bytes::from(member.to_owned()),
                h.revision,
            ),
        )
        .await;
        let e = match r {
            Ok(Ok(revision)) => {
                if let Some(h) = self.held.lock().get_mut(&partition) {
                    h.revision = revision;
                    h.renewed = sent;
                }
                return Ok(true);
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.held.lock().remove(&partition);
                return Ok(false);
            }
            Ok(Err(e)) => api_error(e),
            Err(_) => Error::Timeout {
                operation: "renewing a group lease",
                after: self.ttl / 6,
            },
        };
        // Lost well before the server may expire it (a third of the TTL early): another
        // member must never find it free while this one still delivers.
        if !self.fresh(&h) {
            tracing::warn!(partition, error = %e, "the lease could not be renewed for two thirds of its TTL");
            self.held.lock().remove(&partition);
            return Ok(false);
        }
        Err(e)
    }

    async fn release(&self, partition: u32, _member: &str, epoch: u64) -> Result<()> {
        let writes = self.writes(partition);
        let _write = writes.lock().await;
        let held = {
            let mut held = self.held.lock();
            match held.get(&partition) {
                Some(h) if h.epoch == epoch => held.remove(&partition),
                _ => None,
            }
        };
        let Some(h) = held else {
            return Ok(());
        };
        match self
            .store
            .delete_expect_revision(self.key(partition), Some(h.revision))
            .await
        {
            Ok(()) => Ok(()),
            // Expired or taken meanwhile: nothing of ours to release.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let filter = if self.single {
            self.base.clone()
        } else {
            format!("{}.>", self.base)
        };
        watch(&self.store, filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys() {
        let k = kv_key(&["DUALBUS_orders%2Ev1", "billing"]);
        assert_eq!(k, "DUALBUS_orders=2Ev1.billing");
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
            "{k}"
        );
    }
}
