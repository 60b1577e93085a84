//! The group coordinator on NATS key-value buckets (member registry and partition leases)
//! against a real nats-server, through core's coordination scenarios: a standby takes over
//! when the holder dies, balanced members split partitions through revoke and release, an
//! expired member learns it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Test code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dualbus_core::GroupMembership;
use dualbus_core::conformance::coordination::{self, Join, NoControl};
use dualbus_core::group::{Coordinator, CoordinatorConfig, Placement};
use dualbus_nats::jetstream::coordination::{KvLeases, KvRegistry, open_bucket};

const TTL: Duration = Duration::from_secs(2);

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

/// Members of one group (buckets of their own).
fn join(url: String) -> Join {
    let buckets = names();
    Arc::new(move |name, partitions, placement| {
        let (url, buckets) = (url.clone(), buckets.clone());
        Box::pin(async move { member(&url, &buckets, &name, partitions, placement).await })
    })
}

#[tokio::test]
async fn standby_takes_over_when_the_holder_dies() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let took = coordination::standby_takes_over_when_the_holder_dies(join(url), TTL).await;
    println!("takeover: {took:?} after the holder's crash (TTL {TTL:?})");
}

#[tokio::test]
async fn balanced_members_split_partitions_through_revoke_and_release() {
    let Some(url) = support::shared_url() else {
        return;
    };
    coordination::balanced_members_split_partitions_through_revoke_and_release(join(url), TTL)
        .await;
}

#[tokio::test]
async fn an_expired_member_learns_it_at_its_heartbeat() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let (_, members) = names();
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    let timeout = Duration::from_secs(1);
    let (store, _) = open_bucket(&js, &members, "test members", timeout, 1, "test")
        .await
        .expect("bucket");
    let registry = KvRegistry::new(store, "S", "g");
    coordination::an_expired_member_learns_it_at_its_heartbeat(&registry, timeout).await;
}
