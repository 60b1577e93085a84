//! The group coordinator on Redis (member registry and partition leases, each operation a
//! script) against a real redis-server: a standby takes over when the holder dies,
//! balanced members split partitions through revoke and release, an expired member learns
//! it, and a lease is fenced by its token.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig, LeaseStore, MemberRegistry, Placement};
use dualbus_core::{GroupControl, GroupEvent, GroupMembership, PartitionControl, Result};
use dualbus_redis::coordination::{DEFAULT_PREFIX, RedisLeases, RedisRegistry};
use futures::StreamExt as _;
use redis::aio::ConnectionManager;

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

async fn conn(url: &str) -> ConnectionManager {
    redis::Client::open(url)
        .expect("client")
        .get_connection_manager()
        .await
        .expect("connect")
}

/// A topic of one test.
fn topic() -> String {
    dualbus_core::conformance::unique_topic("coord").to_string()
}

/// A member on its own connection: joins the group through the coordinator.
async fn member(
    url: &str,
    topic: &str,
    name: &str,
    partitions: u32,
    placement: Placement,
) -> GroupMembership {
    let c = conn(url).await;
    let registry = Arc::new(RedisRegistry::new(
        c.clone(),
        DEFAULT_PREFIX,
        topic,
        "g",
        TTL,
    ));
    let leases = Arc::new(RedisLeases::new(c, DEFAULT_PREFIX, topic, "g", TTL));
    let config = CoordinatorConfig::new(partitions)
        .placement(placement)
        .renew_every(TTL / 3)
        // Redis reports no changes: members look again every quarter of the lease TTL.
        .poll_every(TTL / 4);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_holder_dies() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let topic = topic();
    // The holder runs on a runtime of its own: shutting it down is a crash (no release, no
    // leave, the connection gone), as kill -9 of its process would be.
    let (holder_rt, holder, first) = {
        let (url, topic) = (url.clone(), topic.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let (m, e) = rt.block_on(async {
                let mut m = member(&url, &topic, "holder", 1, Placement::Sticky).await;
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
    let mut standby = member(&url, &topic, "standby", 1, Placement::Sticky).await;
    // Held: the standby waits, whatever the rendezvous ranking of the two names.
    assert!(
        tokio::time::timeout(TTL, standby.events.next())
            .await
            .is_err(),
        "the standby took a held partition"
    );
    holder_rt.shutdown_background();
    let crashed = Instant::now();
    let e = next(&mut standby).await;
    match e {
        GroupEvent::Assigned {
            partition: 0,
            epoch,
        } => assert!(epoch > e1, "{epoch} <= {e1}"),
        e => panic!("expected the standby to take over, got {e:?}"),
    }
    println!(
        "takeover: {:?} after the holder's crash (TTL {TTL:?})",
        crashed.elapsed()
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_members_split_partitions_through_revoke_and_release() {
    let Some(url) = support::shared_url() else {
        return;
    };
    const P: u32 = 4;
    let topic = topic();
    let mut a = member(&url, &topic, "a", P, Placement::Balanced).await;
    let mut epochs = std::collections::HashMap::new();
    for _ in 0..P {
        match next(&mut a).await {
            GroupEvent::Assigned { partition, epoch } => {
                epochs.insert(partition, epoch);
            }
            e => panic!("expected an assignment, got {e:?}"),
        }
    }
    let mut b = member(&url, &topic, "b", P, Placement::Balanced).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_member_learns_it_at_its_heartbeat() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let registry = RedisRegistry::new(
        conn(&url).await,
        DEFAULT_PREFIX,
        &topic(),
        "g",
        Duration::from_secs(1),
    );
    registry.join("m1").await.expect("join");
    registry.join("m2").await.expect("join");
    assert!(registry.heartbeat("m1").await.expect("heartbeat"));
    let mut live = registry.members().await.expect("members");
    live.sort();
    assert_eq!(live, ["m1", "m2"]);
    registry.leave("m2").await.expect("leave");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
    // Past the member timeout without a heartbeat: expired.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(registry.members().await.expect("members").is_empty());
    assert!(!registry.heartbeat("m1").await.expect("heartbeat"));
    registry.join("m1").await.expect("join again");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_answers_only_to_its_token() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let topic = topic();
    let c = conn(&url).await;
    let leases = RedisLeases::new(
        c.clone(),
        DEFAULT_PREFIX,
        &topic,
        "g",
        Duration::from_millis(500),
    );
    let e1 = leases
        .acquire(0, "m1")
        .await
        .expect("acquire")
        .expect("free");
    assert_eq!(
        leases.acquire(0, "m2").await.expect("acquire"),
        None,
        "held"
    );
    // Another partition, its own epochs.
    assert_eq!(leases.acquire(1, "m2").await.expect("acquire"), Some(1));
    // A stale epoch or another member neither renews nor releases.
    assert!(!leases.renew(0, "m1", e1 + 1).await.expect("renew"));
    assert!(!leases.renew(0, "m2", e1).await.expect("renew"));
    leases.release(0, "m2", e1).await.expect("release");
    assert_eq!(
        leases.acquire(0, "m2").await.expect("acquire"),
        None,
        "still held"
    );
    assert!(leases.renew(0, "m1", e1).await.expect("renew"));
    // Expired: the next holder gets a greater epoch, and the old token is dead.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let e2 = leases
        .acquire(0, "m2")
        .await
        .expect("acquire")
        .expect("expired");
    assert!(e2 > e1);
    assert!(!leases.renew(0, "m1", e1).await.expect("renew"));
    leases.release(0, "m1", e1).await.expect("release");
    assert!(
        leases.renew(0, "m2", e2).await.expect("renew"),
        "the old holder's release did nothing"
    );
    leases.release(0, "m2", e2).await.expect("release");
    let e3 = leases
        .acquire(0, "m1")
        .await
        .expect("acquire")
        .expect("released");
    assert_eq!(e3, e2 + 1);
    // What is stored: the holder's token.
    let stored: String = redis::cmd("GET")
        .arg(leases.lease_key(0))
        .query_async(&mut c.clone())
        .await
        .expect("get");
    assert_eq!(stored, dualbus_redis::coordination::token("m1", e3));
}
