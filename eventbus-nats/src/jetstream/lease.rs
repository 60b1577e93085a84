//! The single-active-subscriber lease: one subscriber per durable consumer, held as a key
//! of the lease bucket and renewed until released or lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use dualbus_core::{Error, Result, SubscriptionSpec};
use tokio_util::sync::CancellationToken;

use super::{Inner, JetStream, api_error};

/// The lease key of a durable consumer (KV keys take no `%`: it becomes `=`).
fn lease_key(stream: &str, consumer: &str) -> String {
    format!("{stream}.{consumer}").replace('%', "=")
}

impl JetStream {
    async fn lease_bucket(&self) -> Result<(kv::Store, Duration)> {
        let r = self
            .inner
            .leases
            .get_or_try_init(|| async {
                let bucket = format!("{}LEASES", self.inner.config.stream.prefix);
                let wanted = self.inner.config.consumer.lease_ttl;
                let store = match self.inner.js.get_key_value(&bucket).await {
                    Ok(s) => s,
                    Err(_) => self
                        .inner
                        .js
                        .create_key_value(kv::Config {
                            bucket: bucket.clone(),
                            description: "dualbus single-active-subscriber leases".into(),
                            history: 1,
                            max_age: wanted,
                            storage: self.inner.config.stream.storage.into(),
                            num_replicas: self.inner.config.stream.replicas,
                            ..kv::Config::default()
                        })
                        .await
                        .map_err(api_error)?,
                };
                let ttl = store.status().await.map_err(api_error)?.max_age();
                if ttl != wanted {
                    tracing::warn!(
                        bucket,
                        ?ttl,
                        ?wanted,
                        "the lease bucket exists with another TTL; using it"
                    );
                }
                if ttl.is_zero() {
                    return Err(Error::config(
                        "nats.jetstream.consumer.lease_ttl",
                        format!(
                            "the lease bucket {bucket} has no max age: leases would never expire"
                        ),
                    ));
                }
                Ok::<_, Error>((store, ttl))
            })
            .await?;
        Ok(r.clone())
    }

    /// Takes the single-active-subscriber lease of a durable consumer.
    pub(super) async fn acquire_lease(
        &self,
        stream: &str,
        consumer: &str,
        spec: &SubscriptionSpec,
    ) -> Result<Lease> {
        let (store, ttl) = self.lease_bucket().await?;
        let key = lease_key(stream, consumer);
        let token = uuid::Uuid::now_v7().to_string();
        // A subscription of this client on the same consumer holds the lease until it has
        // stopped (after its last handler): one that was just dropped releases it in the
        // background. Wait for that, up to the request timeout, instead of reporting a
        // conflict with ourselves; a subscription still live gets the conflict after it.
        let ours = self.inner.held.lock().get(&key).map(|h| h.released.clone());
        if let Some(released) = ours {
            let _ =
                tokio::time::timeout(self.inner.config.request_timeout, released.cancelled()).await;
        }
        match store.create(&key, Bytes::from(token.clone())).await {
            Ok(revision) => {
                let held = HeldLease {
                    token,
                    cancel: CancellationToken::new(),
                    released: CancellationToken::new(),
                };
                let lease = Lease {
                    store,
                    key: key.clone(),
                    token: held.token.clone(),
                    revision,
                    ttl,
                    cancel: held.cancel.clone(),
                    released: held.released.clone(),
                    transport: Arc::downgrade(&self.inner),
                };
                self.inner.held.lock().insert(key, held);
                Ok(lease)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(Error::Conflict(format!(
                    "another subscriber of group {:?} on topic {:?} is active (JetStream allows one per durable consumer until consumer groups); its lease ends when it closes or {ttl:?} after it stopped",
                    spec.group, spec.topic
                )))
            }
            Err(e) => Err(api_error(e)),
        }
    }

    /// Releases on the server every lease this client's subscriptions hold.
    pub(super) async fn release_held(&self) {
        let held: Vec<(String, HeldLease)> = self.inner.held.lock().drain().collect();
        if let Some((store, _)) = self.inner.leases.get() {
            for (key, lease) in held {
                lease.cancel.cancel();
                let _ = tokio::time::timeout(self.inner.config.request_timeout, store.delete(&key))
                    .await;
                lease.released.cancel();
            }
        }
    }
}

/// A lease of this client, as the transport tracks it.
pub(super) struct HeldLease {
    /// Which acquisition (a new subscription takes a new token).
    token: String,
    /// Cancelled when its subscription ends: the lease is being released.
    cancel: CancellationToken,
    /// Cancelled once the lease is released on the server.
    released: CancellationToken,
}

/// A held single-active-subscriber lease, renewed until dropped or lost.
pub(super) struct Lease {
    store: kv::Store,
    key: String,
    token: String,
    revision: u64,
    ttl: Duration,
    cancel: CancellationToken,
    released: CancellationToken,
    transport: std::sync::Weak<Inner>,
}

impl Lease {
    /// Gives the lease up at once (a subscription that ended, or could not start).
    pub(super) async fn release(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(
            self.ttl,
            self.store
                .delete_expect_revision(&self.key, Some(self.revision)),
        )
        .await;
        self.forget();
    }

    /// Stops tracking the lease as this client's (released, or lost to another holder).
    fn forget(&self) {
        if let Some(inner) = self.transport.upgrade() {
            let mut held = inner.held.lock();
            if held.get(&self.key).is_some_and(|h| h.token == self.token) {
                held.remove(&self.key);
            }
        }
        self.released.cancel();
    }

    /// Renews the lease at a third of its TTL until `cancel`; cancels `lost` if it could not
    /// be renewed within the TTL or another holder took it.
    pub(super) fn keep(mut self, lost: CancellationToken) -> LeaseGuard {
        let guard = LeaseGuard {
            cancel: self.cancel.clone(),
        };
        tokio::spawn(async move {
            let mut renewed = Instant::now();
            let period = self.ttl / 3;
            loop {
                tokio::select! {
                    () = self.cancel.cancelled() => break,
                    () = tokio::time::sleep(period) => {}
                }
                match tokio::time::timeout(
                    period,
                    self.store
                        .update(&self.key, Bytes::from_static(b"held"), self.revision),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        self.revision = r;
                        renewed = Instant::now();
                    }
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        tracing::error!(key = %self.key, "single-active-subscriber lease lost to another subscriber; stopping");
                        lost.cancel();
                        self.forget();
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(key = %self.key, error = %e, "lease renewal failed; retrying")
                    }
                    Err(_) => tracing::warn!(key = %self.key, "lease renewal timed out; retrying"),
                }
                if renewed.elapsed() >= self.ttl {
                    tracing::error!(key = %self.key, "single-active-subscriber lease expired (server unreachable); stopping");
                    lost.cancel();
                    self.forget();
                    return;
                }
            }
            // Released: free the group for the next subscriber at once.
            self.release().await;
        });
        guard
    }
}

/// Releases the lease when the subscription is dropped.
pub(super) struct LeaseGuard {
    cancel: CancellationToken,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.cancel.cancel();
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
