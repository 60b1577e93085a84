//! The group coordinator: one loop, written once, that turns a registry of live members and
//! a store of partition leases into the ownership events the pool consumes.
//!
//! Every member runs its own coordinator. It keeps the member registered, looks at the live
//! members whenever the registry or the lease store reports a change (and every
//! [`CoordinatorConfig::poll`] without one), and for each partition:
//! - held by this member: the lease is renewed every [`CoordinatorConfig::renew`]; a lease
//!   that cannot be renewed is [`GroupEvent::Lost`]. With [`Placement::Balanced`], a
//!   partition whose rendezvous owner is now another member is [`GroupEvent::Revoked`]:
//!   the pool drains it and releases it through the returned control, which gives the lease
//!   back.
//! - not held, and this member is its rendezvous owner among the live members: the lease is
//!   taken and the partition [`GroupEvent::Assigned`] under the lease's epoch, the fencing
//!   token.
//!
//! Members may briefly disagree about the member set (a join not seen everywhere yet); the
//! lease decides: a partition is assigned only to the member holding its lease, and a new
//! holder gets a greater epoch than every holder before it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::{self, BoxStream};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::transport::{GroupControl, GroupEvent, GroupMembership, PartitionControl};

/// The live members of one consumer group, as a backend keeps them (memory: in process;
/// NATS: a key-value bucket whose entries expire; Redis: keys with a time to live).
///
/// A member is live from [`join`](Self::join) until [`leave`](Self::leave), or until it
/// stops sending heartbeats for the registry's expiry time (`group.member_timeout`).
#[async_trait]
pub trait MemberRegistry: Send + Sync + 'static {
    /// Registers `member` as live.
    async fn join(&self, member: &str) -> Result<()>;
    /// Keeps `member` live. `Ok(false)` when it had expired meanwhile: the coordinator
    /// joins again.
    async fn heartbeat(&self, member: &str) -> Result<bool>;
    /// The live members, in any order.
    async fn members(&self) -> Result<Vec<String>>;
    /// Removes `member` (a clean stop).
    async fn leave(&self, member: &str) -> Result<()>;
    /// Yields after changes of the member set (joins, leaves, expiries) where the backend
    /// can watch them; the default yields nothing, and coordinators then find changes by
    /// polling ([`CoordinatorConfig::poll`]).
    fn changes(&self) -> BoxStream<'static, ()> {
        stream::pending().boxed()
    }
}

/// The leases of one consumer group's partitions, as a backend keeps them. A lease names
/// its holder and the epoch it was taken under; every new holder of a partition gets a
/// greater epoch than any before it (the fencing token handlers and acknowledgements are
/// checked against).
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes `partition` for `member` if no one holds it (or its holder's lease expired).
    /// Returns the new epoch, or `None` when another member holds it.
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>>;
    /// Keeps `member`'s lease of `partition` under `epoch`. `Ok(false)` when it is gone
    /// (expired, taken by another member): the partition is lost.
    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool>;
    /// Gives the lease of `partition` up, if `member` still holds it under `epoch`.
    async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()>;
    /// Yields after leases were released or expired where the backend can watch them; the
    /// default yields nothing (see [`MemberRegistry::changes`]).
    fn changes(&self) -> BoxStream<'static, ()> {
        stream::pending().boxed()
    }
}

/// Which member a partition goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Placement {
    /// Each partition goes to its owner in the bounded-load rendezvous assignment of the
    /// live members ([`assignment`](super::assignment)): every member gets its share, and
    /// a member that joins takes it from the others (revoked, drained, released, then
    /// assigned to it).
    #[default]
    Balanced,
    /// A partition stays with its holder while its lease lives; a free one goes to the first
    /// live member that takes its lease. With one partition, every member but the holder is
    /// a standby that takes over when the holder's lease is released or expires (the
    /// holder's registration may outlive it: a standby does not wait for that).
    Sticky,
}

/// How a coordinator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// The number of partitions of the topic (at least 1).
    pub partitions: u32,
    /// Which member a partition goes to.
    pub placement: Placement,
    /// How often leases are renewed and heartbeats sent; `None` when neither expires (the
    /// store learns of a member's end by other means, as memory does in process).
    pub renew: Option<Duration>,
    /// How often the member set is looked at without a reported change; `None` when the
    /// registry and the lease store report every change.
    pub poll: Option<Duration>,
    /// Whether a member that gets no partition at its first look stays (a standby, or a
    /// member of a group with more members than partitions: `true`, the default), or leaves
    /// at once and [`Coordinator::join`] fails with [`Error::Conflict`](crate::Error::Conflict).
    pub standby: bool,
}

impl CoordinatorConfig {
    /// `partitions` partitions, balanced, nothing renewed, no polling.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: partitions.max(1),
            placement: Placement::Balanced,
            renew: None,
            poll: None,
            standby: true,
        }
    }

    /// Same configuration standing by (`true`) or failing when the first look assigns
    /// nothing (`false`).
    #[must_use]
    pub fn standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// Same configuration with `placement`.
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Same configuration renewing leases and heartbeats every `every`.
    #[must_use]
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew = Some(every);
        self
    }

    /// Same configuration looking at the member set every `every`.
    #[must_use]
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll = Some(every);
        self
    }
}

/// A lease this member holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    revoking: bool,
}

/// What the coordinator task and the control it hands out share.
struct Shared {
    member: Arc<str>,
    registry: Arc<dyn MemberRegistry>,
    leases: Arc<dyn LeaseStore>,
    config: CoordinatorConfig,
    held: Mutex<BTreeMap<u32, Held>>,
    events: async_channel::Sender<GroupEvent>,
    /// Released partitions: look again at once.
    wake: Notify,
}

impl Shared {
    fn emit(&self, event: GroupEvent) {
        // Unbounded; closed only when the pool dropped the stream (then nobody listens).
        let _ = self.events.try_send(event);
    }

    /// One look at the group: takes the partitions this member should own and are free,
    /// revokes those it should not own any more (balanced placement).
    async fn step(&self) -> Result<()> {
        let live = self.registry.members().await?;
        if !live.iter().any(|m| **m == *self.member) {
            // Expired while alive (a pause longer than the timeout): join again.
            self.registry.join(&self.member).await?;
            return Ok(());
        }
        let me = Some(&*self.member);
        let balanced = self.config.placement == Placement::Balanced;
        let members: Vec<&str> = live.iter().map(String::as_str).collect();
        let assigned = super::assignment(self.config.partitions, &members);
        let owner_of = |partition: u32| {
            assigned
                .iter()
                .find(|(_, owned)| owned.binary_search(&partition).is_ok())
                .map(|(m, _)| *m)
        };
        for partition in 0..self.config.partitions {
            let desired = owner_of(partition);
            // Held: `Some`, with the epoch to revoke now if it is to move (marked revoking
            // under the same lock, so that it is revoked once).
            let held = self.held.lock().get_mut(&partition).map(|h| {
                let revoke = balanced && desired != me && !h.revoking;
                h.revoking |= revoke;
                revoke.then_some(h.epoch)
            });
            match held {
                Some(Some(epoch)) => self.emit(GroupEvent::Revoked { partition, epoch }),
                Some(None) => {}
                None if desired == me || !balanced => {
                    if let Some(epoch) = self.leases.acquire(partition, &self.member).await? {
                        self.held.lock().insert(
                            partition,
                            Held {
                                epoch,
                                revoking: false,
                            },
                        );
                        self.emit(GroupEvent::Assigned { partition, epoch });
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Renews every held lease and the member's registration; a lease that cannot be
    /// renewed is lost.
    async fn renew(&self) -> Result<()> {
        // Leases first, each on its own: a failing registry must not keep them from being
        // renewed (or from being found lost).
        self.renew_leases().await;
        if !self.registry.heartbeat(&self.member).await? {
            self.registry.join(&self.member).await?;
        }
        Ok(())
    }

    async fn renew_leases(&self) {
        let held: Vec<(u32, u64)> = self
            .held
            .lock()
            .iter()
            .map(|(p, h)| (*p, h.epoch))
            .collect();
        // All at once: one renewal waiting on an unreachable server must not hold up the
        // others until their leases expire.
        let renewed = futures::future::join_all(
            held.iter()
                .map(|&(partition, epoch)| self.leases.renew(partition, &self.member, epoch)),
        )
        .await;
        for ((partition, epoch), renewed) in held.into_iter().zip(renewed) {
            match renewed {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The store says when a lease whose renewals keep failing counts as lost.
                    tracing::warn!(member = %self.member, partition, error = %e, "renewing a lease failed");
                    continue;
                }
            }
            // Released meanwhile by the pool (then nothing is lost), or gone.
            let lost = {
                let mut held = self.held.lock();
                let still = held.get(&partition).is_some_and(|h| h.epoch == epoch);
                if still {
                    held.remove(&partition);
                }
                still
            };
            if lost {
                tracing::warn!(member = %self.member, partition, epoch, "partition lease lost");
                self.emit(GroupEvent::Lost { partition, epoch });
            }
        }
    }

    /// Gives up everything: the leases still held and the registration.
    async fn leave(&self) {
        let held: Vec<(u32, Held)> = std::mem::take(&mut *self.held.lock()).into_iter().collect();
        for (partition, h) in held {
            if let Err(e) = self.leases.release(partition, &self.member, h.epoch).await {
                tracing::warn!(member = %self.member, partition, error = %e, "releasing a lease at leave failed; it expires");
            }
        }
        if let Err(e) = self.registry.leave(&self.member).await {
            tracing::warn!(member = %self.member, error = %e, "leaving the group failed; the registration expires");
        }
    }
}

/// Runs group coordination for one member: see the module docs.
pub struct Coordinator;

impl Coordinator {
    /// Registers `member` in `registry` and starts its coordination on the current tokio
    /// runtime. The returned membership is what the pool consumes: its events come from
    /// the leases this member takes, loses and is to give back; its control is `control`
    /// (the backend's pause, resume and rewind) whose release also gives the lease back.
    /// Dropping the events stream (the pool stopped) ends the coordination: the leases
    /// still held are released and the member leaves.
    ///
    /// The first look at the group happens before this returns, so free partitions this
    /// member owns are assigned by the time the pool starts.
    pub async fn join(
        member: impl Into<String>,
        registry: Arc<dyn MemberRegistry>,
        leases: Arc<dyn LeaseStore>,
        control: Arc<dyn GroupControl>,
        config: CoordinatorConfig,
    ) -> Result<GroupMembership> {
        let member: Arc<str> = Arc::from(member.into());
        let (tx, rx) = async_channel::unbounded();
        let sh = Arc::new(Shared {
            member,
            registry,
            leases,
            config,
            held: Mutex::new(BTreeMap::new()),
            events: tx,
            wake: Notify::new(),
        });
        // Watch before joining, so that no change after the first look goes unseen.
        let changes = stream::select(sh.registry.changes(), sh.leases.changes()).boxed();
        sh.registry.join(&sh.member).await?;
        if let Err(e) = sh.step().await {
            sh.leave().await;
            return Err(e);
        }
        if !sh.config.standby && sh.held.lock().is_empty() {
            sh.leave().await;
            return Err(Error::Conflict(format!(
                "member {} got no partition: every one of the {} is held by another member",
                sh.member, sh.config.partitions
            )));
        }
        let stop = CancellationToken::new();
        tokio::spawn(run(sh.clone(), changes, stop.clone()));
        let guard = stop.drop_guard();
        let events = stream::unfold((rx, guard), |(rx, guard)| async move {
            let event = rx.recv().await.ok()?;
            Some((event, (rx, guard)))
        });
        Ok(GroupMembership {
            events: events.boxed(),
            control: Arc::new(LeasedControl { sh, inner: control }),
        })
    }
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Coordinator")
    }
}

/// The coordination loop of one member, until `stop`.
async fn run(sh: Arc<Shared>, mut changes: BoxStream<'static, ()>, stop: CancellationToken) {
    let tick = |d: Option<Duration>| {
        d.map(|d| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        })
    };
    let mut renew = tick(sh.config.renew);
    let mut poll = tick(sh.config.poll);
    let mut changes_open = true;
    loop {
        let look = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            // Renewals first: a stream of changes must not starve them.
            () = tick_of(&mut renew) => false,
            () = sh.wake.notified() => true,
            c = changes.next(), if changes_open => {
                changes_open = c.is_some();
                true
            }
            () = tick_of(&mut poll) => true,
        };
        let r = if look {
            sh.step().await
        } else {
            sh.renew().await
        };
        if let Err(e) = r {
            // Looked at again at the next change, renewal or poll.
            tracing::warn!(member = %sh.member, error = %e, "group coordination step failed");
        }
    }
    sh.leave().await;
}

/// The next tick of `interval`, or never.
async fn tick_of(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The backend's partition control, with release also giving the lease back.
struct LeasedControl {
    sh: Arc<Shared>,
    inner: Arc<dyn GroupControl>,
}

impl PartitionControl for LeasedControl {
    fn pause(&self, partition: u32) {
        self.inner.pause(partition);
    }

    fn resume(&self, partition: u32) {
        self.inner.resume(partition);
    }
}

#[async_trait]
impl GroupControl for LeasedControl {
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        self.inner.rewind(partition, epoch).await
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        let held = {
            let mut held = self.sh.held.lock();
            let ours = held.get(&partition).is_some_and(|h| h.epoch == epoch);
            if ours {
                held.remove(&partition);
            }
            ours
        };
        let stopped = self.inner.release(partition, epoch).await;
        if held {
            // Given back even when the backend's release failed: the partition is no
            // longer this member's either way.
            let released = self
                .sh
                .leases
                .release(partition, &self.sh.member, epoch)
                .await;
            // This member may own it again (the member that outranked it left meanwhile).
            self.sh.wake.notify_one();
            released?;
        }
        stopped
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use futures::stream::BoxStream;
    use tokio::sync::watch;

    use super::*;
    use crate::group::assignment;

    /// A registry and lease store in process whose leases can be made to expire.
    #[derive(Default)]
    struct Store {
        state: Mutex<StoreState>,
        changes: Option<watch::Sender<u64>>,
    }

    #[derive(Default)]
    struct StoreState {
        members: BTreeSet<String>,
        leases: HashMap<u32, (String, u64)>,
        epochs: HashMap<u32, u64>,
    }

    impl Store {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                state: Mutex::default(),
                changes: Some(watch::channel(0).0),
            })
        }

        fn changed(&self) {
            if let Some(c) = &self.changes {
                c.send_modify(|v| *v += 1);
            }
        }

        /// The lease of `partition` ends as if its holder had stopped renewing it.
        fn expire(&self, partition: u32) {
            self.state.lock().leases.remove(&partition);
            self.changed();
        }

        fn holder(&self, partition: u32) -> Option<(String, u64)> {
            self.state.lock().leases.get(&partition).cloned()
        }
    }

    #[async_trait]
    impl MemberRegistry for Store {
        async fn join(&self, member: &str) -> Result<()> {
            self.state.lock().members.insert(member.to_owned());
            self.changed();
            Ok(())
        }
        async fn heartbeat(&self, member: &str) -> Result<bool> {
            Ok(self.state.lock().members.contains(member))
        }
        async fn members(&self) -> Result<Vec<String>> {
            Ok(self.state.lock().members.iter().cloned().collect())
        }
        async fn leave(&self, member: &str) -> Result<()> {
            self.state.lock().members.remove(member);
            self.changed();
            Ok(())
        }
        fn changes(&self) -> BoxStream<'static, ()> {
            let Some(c) = &self.changes else {
                return stream::pending().boxed();
            };
            stream::unfold(c.subscribe(), |mut rx| async move {
                rx.changed().await.ok()?;
                Some(((), rx))
            })
            .boxed()
        }
    }

    #[async_trait]
    impl LeaseStore for Store {
        async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
            let mut st = self.state.lock();
            if st.leases.contains_key(&partition) {
                return Ok(None);
            }
            let epoch = st.epochs.entry(partition).or_default();
            *epoch += 1;
            let epoch = *epoch;
            st.leases.insert(partition, (member.to_owned(), epoch));
            Ok(Some(epoch))
        }
        async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
            Ok(self.state.lock().leases.get(&partition) == Some(&(member.to_owned(), epoch)))
        }
        async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()> {
            let mut st = self.state.lock();
            if st.leases.get(&partition) == Some(&(member.to_owned(), epoch)) {
                st.leases.remove(&partition);
                drop(st);
                self.changed();
            }
            Ok(())
        }
    }

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

    async fn join(store: &Arc<Store>, member: &str, config: CoordinatorConfig) -> GroupMembership {
        Coordinator::join(
            member,
            store.clone(),
            store.clone(),
            Arc::new(NoControl),
            config,
        )
        .await
        .expect("join")
    }

    /// The next event, waiting on the (paused) clock.
    async fn next(m: &mut GroupMembership) -> GroupEvent {
        tokio::time::timeout(Duration::from_secs(60), m.events.next())
            .await
            .expect("an event within a minute")
            .expect("the stream goes on")
    }

    /// Nothing more comes while the clock moves `d`.
    async fn quiet(m: &mut GroupMembership, d: Duration) {
        if let Ok(e) = tokio::time::timeout(d, m.events.next()).await {
            panic!("unexpected {e:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn balanced_members_share_partitions_through_revoke_and_release() {
        const P: u32 = 8;
        let store = Store::new();
        let mut a = join(&store, "a", CoordinatorConfig::new(P)).await;
        for _ in 0..P {
            assert!(matches!(
                next(&mut a).await,
                GroupEvent::Assigned { epoch: 1, .. }
            ));
        }
        let mut b = join(&store, "b", CoordinatorConfig::new(P)).await;
        let moving: Vec<u32> = assignment(P, &["a", "b"])["b"].clone();
        assert_eq!(moving.len(), P as usize / 2, "b gets its share");
        // "a" is told to give up exactly the partitions whose owner is now "b"...
        let mut revoked = Vec::new();
        for _ in &moving {
            match next(&mut a).await {
                GroupEvent::Revoked { partition, epoch } => {
                    assert_eq!(epoch, 1);
                    revoked.push(partition);
                }
                e => panic!("expected a revocation, got {e:?}"),
            }
        }
        revoked.sort_unstable();
        assert_eq!(revoked, moving);
        // ...and "b" gets none of them before "a" released them.
        quiet(&mut b, Duration::from_secs(1)).await;
        for p in &moving {
            assert_eq!(store.holder(*p).map(|h| h.0).as_deref(), Some("a"));
            a.control.release(*p, 1).await.expect("release");
            assert_eq!(
                next(&mut b).await,
                GroupEvent::Assigned {
                    partition: *p,
                    epoch: 2
                }
            );
        }
        quiet(&mut a, Duration::from_secs(1)).await;
        // "b" stops: its partitions come back to "a" under new epochs.
        drop(b);
        let mut back = Vec::new();
        for _ in &moving {
            match next(&mut a).await {
                GroupEvent::Assigned { partition, epoch } => {
                    assert_eq!(epoch, 3);
                    back.push(partition);
                }
                e => panic!("expected an assignment, got {e:?}"),
            }
        }
        back.sort_unstable();
        assert_eq!(back, moving);
    }

    #[tokio::test(start_paused = true)]
    async fn sticky_standby_takes_over_when_the_holder_leaves() {
        let store = Store::new();
        let config = CoordinatorConfig::new(1).placement(Placement::Sticky);
        // Whichever member the assignment prefers, the first holder keeps it.
        let first = if assignment(1, &["a", "b"])["a"] == [0] {
            "b"
        } else {
            "a"
        };
        let second = if first == "a" { "b" } else { "a" };
        let mut holder = join(&store, first, config).await;
        assert_eq!(
            next(&mut holder).await,
            GroupEvent::Assigned {
                partition: 0,
                epoch: 1
            }
        );
        // Failing fast instead of standing by: refused, and gone from the registry.
        let refused = Coordinator::join(
            "c",
            store.clone(),
            store.clone(),
            Arc::new(NoControl),
            config.standby(false),
        )
        .await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        assert!(!store.state.lock().members.contains("c"));
        let mut standby = join(&store, second, config).await;
        quiet(&mut holder, Duration::from_secs(1)).await;
        quiet(&mut standby, Duration::from_secs(1)).await;
        drop(holder);
        assert_eq!(
            next(&mut standby).await,
            GroupEvent::Assigned {
                partition: 0,
                epoch: 2
            }
        );
        assert_eq!(store.holder(0), Some((second.to_owned(), 2)));
        assert!(
            !store.state.lock().members.contains(first),
            "the holder left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_cannot_be_renewed_is_lost_and_taken_again_when_free() {
        let store = Store::new();
        let config = CoordinatorConfig::new(1).renew_every(Duration::from_millis(100));
        let mut a = join(&store, "a", config).await;
        assert_eq!(
            next(&mut a).await,
            GroupEvent::Assigned {
                partition: 0,
                epoch: 1
            }
        );
        // Taken by someone else meanwhile (an expiry and a faster member).
        store.expire(0);
        store.acquire(0, "x").await.expect("acquire");
        assert_eq!(
            next(&mut a).await,
            GroupEvent::Lost {
                partition: 0,
                epoch: 1
            }
        );
        // Free again: "a", its rendezvous owner, takes it under a new epoch.
        store.release(0, "x", 2).await.expect("release");
        assert_eq!(
            next(&mut a).await,
            GroupEvent::Assigned {
                partition: 0,
                epoch: 3
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_change_reports_polling_finds_free_partitions() {
        let store = Arc::new(Store::default());
        let config = CoordinatorConfig::new(1).poll_every(Duration::from_millis(500));
        store.acquire(0, "x").await.expect("acquire");
        let mut a = join(&store, "a", config).await;
        quiet(&mut a, Duration::from_millis(100)).await;
        store.release(0, "x", 1).await.expect("release");
        assert_eq!(
            next(&mut a).await,
            GroupEvent::Assigned {
                partition: 0,
                epoch: 2
            }
        );
    }
}
