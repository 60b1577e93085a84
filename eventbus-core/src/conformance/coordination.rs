//! Scenarios for a backend's member registry and lease store, run through the
//! [`Coordinator`](crate::group::Coordinator): a standby takes over when the holder dies,
//! balanced members split partitions through revoke and release, and an expired member
//! learns it at its heartbeat.
//!
//! A backend's test gives a [`Join`]: a function that joins a member of one group (its own
//! connection, its registry and leases, the coordinator) and returns the membership.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::future::BoxFuture;

use crate::error::Result;
use crate::group::{MemberRegistry, Placement};
use crate::transport::{GroupControl, GroupEvent, GroupMembership, PartitionControl};

/// Joins the member named by the first argument to the group under test, with that many
/// partitions and that placement; every call is a new connection.
pub type Join =
    Arc<dyn Fn(String, u32, Placement) -> BoxFuture<'static, GroupMembership> + Send + Sync>;

/// A control that does nothing: these scenarios look at the group events alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoControl;

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

/// The next event within five lease TTLs (a liveness bound, not a measurement).
pub async fn next(m: &mut GroupMembership, ttl: Duration) -> GroupEvent {
    tokio::time::timeout(ttl * 5, m.events.next())
        .await
        .expect("an event within five lease TTLs")
        .expect("the stream goes on")
}

/// A member of a one-partition topic holds it; a standby waits; the holder crashes (its
/// runtime ends: no release, no leave, its connection gone, as `kill -9` of its process);
/// the standby takes the partition under a greater epoch. Returns the time from the crash
/// to the takeover.
pub async fn standby_takes_over_when_the_holder_dies(join: Join, ttl: Duration) -> Duration {
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
    let j = join.clone();
    // The holder on a runtime of its own, driven until the crash.
    let holder = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let membership = rt.block_on(async move {
            let mut m = j("holder".to_owned(), 1, Placement::Sticky).await;
            let e = next(&mut m, ttl).await;
            let _ = first_tx.send(e);
            let _ = crash_rx.await;
            m
        });
        // The crash: the tasks end without leaving; the membership goes after them.
        rt.shutdown_background();
        drop(membership);
    });
    let first = tokio::task::spawn_blocking(move || first_rx.recv())
        .await
        .expect("join")
        .expect("the holder's first event");
    let GroupEvent::Assigned { epoch: e1, .. } = first else {
        panic!("expected the holder to be assigned, got {first:?}");
    };
    let mut standby = join("standby".to_owned(), 1, Placement::Sticky).await;
    // Held: the standby waits, whatever the rendezvous ranking of the two names.
    assert!(
        tokio::time::timeout(ttl, standby.events.next())
            .await
            .is_err(),
        "the standby took a held partition"
    );
    let _ = crash_tx.send(());
    let crashed = Instant::now();
    tokio::task::spawn_blocking(move || holder.join())
        .await
        .expect("join")
        .expect("the holder's thread");
    match next(&mut standby, ttl).await {
        GroupEvent::Assigned {
            partition: 0,
            epoch,
        } => assert!(epoch > e1, "{epoch} <= {e1}"),
        e => panic!("expected the standby to take over, got {e:?}"),
    }
    crashed.elapsed()
}

/// A member holds all four partitions; a second joins; the first is asked to give up the
/// partitions the balanced assignment moves, releases them one by one, and the second is
/// assigned each under a greater epoch.
pub async fn balanced_members_split_partitions_through_revoke_and_release(
    join: Join,
    ttl: Duration,
) {
    const P: u32 = 4;
    let mut a = join("a".to_owned(), P, Placement::Balanced).await;
    let mut epochs = std::collections::HashMap::new();
    for _ in 0..P {
        match next(&mut a, ttl).await {
            GroupEvent::Assigned { partition, epoch } => {
                epochs.insert(partition, epoch);
            }
            e => panic!("expected an assignment, got {e:?}"),
        }
    }
    let mut b = join("b".to_owned(), P, Placement::Balanced).await;
    let moving: Vec<u32> = crate::group::assignment(P, &["a", "b"])["b"].clone();
    let mut revoked = Vec::new();
    for _ in &moving {
        match next(&mut a, ttl).await {
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
        match next(&mut b, ttl).await {
            GroupEvent::Assigned { partition, epoch } => {
                assert_eq!(partition, *p);
                assert!(epoch > epochs[p], "epochs grow with every holder");
            }
            e => panic!("expected an assignment, got {e:?}"),
        }
    }
}

/// `registry` (with a member timeout of `timeout`): members join, beat and leave; one that
/// misses its heartbeats for longer than the timeout is gone, learns it at its next
/// heartbeat, and joins again.
pub async fn an_expired_member_learns_it_at_its_heartbeat(
    registry: &dyn MemberRegistry,
    timeout: Duration,
) {
    registry.join("m1").await.expect("join");
    registry.join("m2").await.expect("join");
    assert!(registry.heartbeat("m1").await.expect("heartbeat"));
    let mut live = registry.members().await.expect("members");
    live.sort();
    assert_eq!(live, ["m1", "m2"]);
    registry.leave("m2").await.expect("leave");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
    // Past the member timeout without a heartbeat: expired.
    tokio::time::sleep(timeout * 2 + Duration::from_millis(500)).await;
    assert!(registry.members().await.expect("members").is_empty());
    assert!(!registry.heartbeat("m1").await.expect("heartbeat"));
    registry.join("m1").await.expect("join again");
    assert_eq!(registry.members().await.expect("members"), ["m1"]);
}
