//! The group coordinator on Redis (member registry and partition leases, each operation a
//! script) against a real redis-server, through core's coordination scenarios: a standby
//! takes over when the holder dies, balanced members split partitions through revoke and
//! release, an expired member learns it; and a lease is fenced by its token.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dualbus_core::GroupMembership;
use dualbus_core::conformance::coordination::{self, Join, NoControl};
use dualbus_core::group::{Coordinator, CoordinatorConfig, LeaseStore, Placement};
use dualbus_redis::coordination::{DEFAULT_PREFIX, RedisLeases, RedisRegistry};
use redis::aio::ConnectionManager;

const TTL: Duration = Duration::from_secs(2);

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

/// Members of one group on a topic of their own.
fn join(url: String) -> Join {
    let topic = topic();
    Arc::new(move |name, partitions, placement| {
        let (url, topic) = (url.clone(), topic.clone());
        Box::pin(async move { member(&url, &topic, &name, partitions, placement).await })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_holder_dies() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let took = coordination::standby_takes_over_when_the_holder_dies(join(url), TTL).await;
    println!("takeover: {took:?} after the holder's crash (TTL {TTL:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_members_split_partitions_through_revoke_and_release() {
    let Some(url) = support::shared_url() else {
        return;
    };
    coordination::balanced_members_split_partitions_through_revoke_and_release(join(url), TTL)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_member_learns_it_at_its_heartbeat() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let registry = RedisRegistry::new(conn(&url).await, DEFAULT_PREFIX, &topic(), "g", timeout);
    coordination::an_expired_member_learns_it_at_its_heartbeat(&registry, timeout).await;
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
