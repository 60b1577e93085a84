//! The group coordinator on NATS key-value buckets (member registry and partition leases)
//! against a real nats-server: a standby takes over when the holder dies, balanced members
//! split partitions through revoke and release, an expired member learns it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Test code.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig, MemberRegistry, Placement};
use dualbus_core::{GroupControl, GroupEvent, GroupMembership, PartitionControl, Result};
use dualbus_nats::jetstream::coordination::{KvLeases, KvRegistry, open_bucket};
use futures::StreamExt as _;

const TTL: Duration = Duration::from_secs(2);

struct NoControl;

impl PartitionControl for NoControl {
    fn pause(&self, _partition: u32) {}
    fn resume(&self, _partition: u32) {}
}

#[async_trait]
impl GroupControl for NoControl {
    async fn rewind(&self, _partition: u32, _epoch: u64) -> Result<()> {
        Ok(())
    }
    async fn release(&self, _partition: u32, _epoch: u64) -> Result<()> {
        Ok(())
    }
}

/// Buckets of their own for one test.
fn names() -> (String, String) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    (format!("T{id}LEASES"), format!("T{id}MEMBERS"))
}

/// A member on its own connection: joins the group through the coordinator.
async fn member(
    url: &str,
    (leases, members): &(String, String),
    name: &str,
    partitions: u32,
    placement: Placement,
) -> GroupMembership {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    let (lstore, ttl) = open_bucket(&js, leases, "test leases", TTL, 1, "test")
        .await
        .expect("leases");
    let (mstore, _) = open_bucket(&js, members, "test members", TTL, 1, "test")
        .await
        .expect("members");
    let registry = Arc::new(KvRegistry::new(mstore, "S", "g"));
    let leases = Arc::new(KvLeases::new(lstore, "S", "g", partitions == 1, ttl));
    let config = CoordinatorConfig::new(partitions)
        .placement(placement)
        .renew_every(ttl / 3)
        // Changes come from the buckets' watches (expiries too: limit markers); polling
        // so rarely that a missed change fails the tests' deadlines.
        .poll_every(ttl * 100);
    Coordinator::join(name, registry, leases, Arc::new(NoControl), config)
        .await
        .expect("join")
}

/// The next event within a generous deadline (a liveness bound, not a measurement).
async fn next(m: &mut GroupMembership) -> GroupEvent {
    tokio::time::timeout(TTL * 5, m.events.next())
        .await
        .expect("an event within five lease TTLs")
        .expect("the stream goes on")
}

#[tokio::test]
async fn standby_takes_over_when_the_holder_dies() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let buckets = names();
    // The holder runs on a runtime of its own: shutting it down is a crash (no release, no
    // leave, the connection gone), as kill -9 of its process would be.
    let (holder_rt, holder, first) = {
        let (url, buckets) = (url.clone(), buckets.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let (m, e) = rt.block_on(async {
                let mut m = member(&url, &buckets, "holder", 1, Placement::Sticky).await;
                let e = next(&mut m).await;
                (m, e)
            });
            (rt, m, e)
        })
        .join()
        .expect("the holder's thread")
    };
    let GroupEvent::Assigned { epoch: e1, .. } = first else {
        panic!("expected the holder to be assigned, got {first:?}");
    };
    let mut standby = member(&url, &buckets, "standby", 1, Placement::Sticky).await;
    // Held: the standby waits, whatever the rendezvous ranking of the two names.
    assert!(
        tokio::time::timeout(TTL, standby.events.next())
            .await
            .is_err(),
        "the standby took a held partition"
    );
    holder_rt.shutdown_background();
    let crashed = Instant::now();
    // The lease expires one TTL after the holder's last renewal, as the server stored it.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let renewed = js
        .get_key_value(&buckets.0)
        .await
        .expect("bucket")
        .entry("S.g")
        .await
        .expect("entry")
        .expect("the lease is still there")
        .created
        .unix_timestamp_nanos();
    let e = next(&mut standby).await;
    let took = crashed.elapsed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i128;
    let after_expiry =
        Duration::from_nanos(u64::try_from(now - renewed).unwrap_or(0)).saturating_sub(TTL);
    match e {
        GroupEvent::Assigned {
            partition: 0,
            epoch,
        } => assert!(epoch > e1, "{epoch} <= {e1}"),
        e => panic!("expected the standby to take over, got {e:?}"),
    }
    println!(
        "takeover: {took:?} after the holder's crash, {after_expiry:?} after its lease expired (TTL {TTL:?})"
    );
    drop(holder);
}

#[tokio::test]
async fn balanced_members_split_partitions_through_revoke_and_release() {
    let Some(url) = support::shared_url() else {
        return;
    };
    const P: u32 = 4;
    let buckets = names();
    let mut a = member(&url, &buckets, "a", P, Placement::Balanced).await;
    let mut epochs = std::collections::HashMap::new();
    for _ in 0..P {
        match next(&mut a).await {
            GroupEvent::Assigned { partition, epoch } => {
                epochs.insert(partition, epoch);
            }
            e => panic!("expected an assignment, got {e:?}"),
        }
    }
    let mut b = member(&url, &buckets, "b", P, Placement::Balanced).await;
    let moving: Vec<u32> = dualbus_core::group::assignment(P, &["a", "b"])["b"].clone();
    let mut revoked = Vec::new();
    for _ in &moving {
        match next(&mut a).await {
            GroupEvent::Revoked { partition, epoch } => {
                assert_eq!(epochs[&partition], epoch);
                revoked.push(partition);
            }
            e => panic!("expected a revocation, got {e:?}"),
        }
    }
    revoked.sort_unstable();
    assert_eq!(revoked, moving);
    for p in &moving {
        a.control.release(*p, epochs[p]).await.expect("release");
        match next(&mut b).await {
            GroupEvent::Assigned { partition, epoch } => {
                assert_eq!(partition, *p);
                assert!(epoch > epochs[p], "epochs grow with every holder");
            }
            e => panic!("expected an assignment, got {e:?}"),
        }
    }
}

#[tokio::test]
async fn an_expired_member_learns_it_at_its_heartbeat() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let (_, members) = names();
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    let (store, _) = open_bucket(
        &js,
        &members,
        "test members",
        Duration::from_secs(1),
        1,
        "test",
    )
    .await
    .expect("bucket");
    let registry = KvRegistry::new(store, "S", "g");
    registry.join("m1").await.expect("join");
    registry.join("m2").await.expect("join");
    assert!(registry.heartbeat("m1").await.expect("heartbeat"));
    let mut live = registry.members().await.expect("members");
    live.sort();
    assert_eq!(live, ["m1", "m2"]);
    registry.leave("m2").await.expect("leave");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
    // Past the member timeout without a heartbeat: expired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(registry.members().await.expect("members").is_empty());
    assert!(!registry.heartbeat("m1").await.expect("heartbeat"));
    registry.join("m1").await.expect("join again");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
}
