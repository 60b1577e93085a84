//! Consumer-group conformance tests: load sharing, graceful leave, the crash trap, joins
//! under load, and churn. Every run is judged by the order checker (C1 to C6).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::{
    Backend, OrderChecker, Record, Summary, Violation, event, mix, unique_topic, wait_for,
};
use crate::domain::{DomainBus, DomainBusBuilder, Subscription};
use crate::error::{ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::pool::PoolConfig;
use crate::retry::Backoff;

const SOURCE: &str = "conformance";
/// The pool's buffer in these tests: duplicates per handover stay below it (C5).
const IN_FLIGHT: usize = 64;

async fn member_bus(backend: &dyn Backend) -> DomainBus {
    let t = backend.domain().await.expect("connect domain transport");
    DomainBusBuilder::from_dyn(t)
        .source(SOURCE)
        .retry(Backoff::new(
            12,
            Duration::from_millis(1),
            Duration::from_millis(5),
        ))
        .pool(PoolConfig {
            max_concurrency: 8,
            max_in_flight: IN_FLIGHT,
            drain_deadline: Duration::from_secs(30),
            ..PoolConfig::default()
        })
        .build()
        .expect("build domain bus")
}

/// Whether the backend declares consumer groups (the group tests need them).
async fn has_groups(backend: &dyn Backend) -> bool {
    let t = backend.domain().await.expect("connect domain transport");
    let groups = t.capabilities().consumer_groups;
    t.close().await.expect("close");
    groups
}

type Handler = Arc<dyn Fn(Event) -> BoxFuture<'static, Result<(), HandleError>> + Send + Sync>;

/// A handler that fails now and then (retryable) and sometimes takes a little time.
fn flaky(seed: u64) -> Handler {
    Arc::new(move |e: Event| {
        Box::pin(async move {
            let roll = mix(seed, &e.aggregate_id, e.event_version, e.attempt);
            if roll.is_multiple_of(5) {
                tokio::time::sleep(Duration::from_micros(roll % 3000)).await;
            }
            if roll.is_multiple_of(8) {
                return Err(HandleError::msg("injected failure"));
            }
            Ok(())
        })
    })
}

/// One member of the group under test.
struct Member {
    id: u32,
    bus: DomainBus,
    sub: Option<Subscription>,
}

async fn join(
    backend: &dyn Backend,
    topic: &str,
    group: &str,
    checker: &OrderChecker,
    id: u32,
    handler: Handler,
) -> Member {
    let bus = member_bus(backend).await;
    let h = handler.clone();
    let sub = bus
        .subscribe(topic)
        .group(group)
        .observer(checker.observer(id))
        .start(checker.wrap(id, handler_fn(move |e: Event| h(e))))
        .await
        .expect("join the group");
    Member {
        id,
        bus,
        sub: Some(sub),
    }
}

impl Member {
    fn active(&self) -> usize {
        self.sub.as_ref().map_or(0, |s| s.active_partitions().len())
    }

    /// Leaves gracefully (drain, then leave).
    async fn leave(&mut self) {
        if let Some(s) = self.sub.take() {
            let report = s.shutdown().await;
            assert!(
                !report.timed_out,
                "member {} did not drain in time: {report:?}",
                self.id
            );
        }
    }

    /// Crashes: handlers are cut off, nothing is drained or acknowledged.
    async fn crash(&mut self, checker: &OrderChecker) {
        if let Some(s) = self.sub.take() {
            s.abort().await;
            checker.crash(self.id);
        }
    }

    async fn close(mut self) {
        self.leave().await;
        self.bus.close().await.expect("close");
    }
}

/// Handled (E) records per member.
fn ends_by(checker: &OrderChecker, m: u32) -> usize {
    checker
        .records()
        .iter()
        .filter(|r| matches!(r, Record::End { m: x, .. } if *x == m))
        .count()
}

/// Waits until every live member consumes at least one partition and none is in between
/// states (a group at rest).
async fn settled(members: &[&Member]) {
    wait_for(|| {
        members.iter().all(|m| {
            let Some(s) = &m.sub else { return true };
            let parts = s.partitions();
            m.active() > 0
                && parts.iter().all(|(_, st, _)| {
                    matches!(
                        st,
                        crate::pool::PartitionState::Active
                            | crate::pool::PartitionState::Revoked
                            | crate::pool::PartitionState::Lost
                    )
                })
        })
    })
    .await;
}

async fn publish_range(
    bus: &DomainBus,
    topic: &str,
    checker: &OrderChecker,
    aggregates: &[String],
    versions: std::ops::RangeInclusive<u64>,
) {
    for v in versions {
        for a in aggregates {
            bus.publish(topic, &event(a, v)).await.expect("publish");
            checker.published(a, v);
        }
    }
}

fn aggregates(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("g-{i}")).collect()
}

async fn finish(
    backend: &dyn Backend,
    bus: &DomainBus,
    topic: &str,
    group: &str,
    checker: &OrderChecker,
) -> Result<Summary, Violation> {
    super::settle_and_check(backend, bus.transport(), topic, group, checker).await
}

fn assert_ok(
    seed: u64,
    what: &str,
    r: Result<Summary, Violation>,
    max_duplicates: usize,
) -> Summary {
    match r {
        Ok(s) => {
            assert!(
                s.duplicates <= max_duplicates,
                "{what} seed {seed}: {} duplicates, more than the in-flight windows of the handovers ({max_duplicates}) (C5)",
                s.duplicates
            );
            println!(
                "{what}: seed {seed} ok: {} events, {} duplicates",
                s.published, s.duplicates
            );
            s
        }
        Err(v) => panic!("{what} seed {seed}: order checker: {v}"),
    }
}

/// Each envelope goes to one member, every member gets partitions, and a joiner receives
/// partitions and events.
pub async fn load_sharing(backend: &dyn Backend) {
    if !has_groups(backend).await {
        return;
    }
    for seed in 0..backend.settings().seeds {
        let topic = unique_topic("group-share");
        let group = format!("g-{seed}");
        let checker = OrderChecker::new();
        let mut members = Vec::new();
        for id in 0..3 {
            members.push(join(backend, &topic, &group, &checker, id, flaky(seed)).await);
        }
        settled(&members.iter().collect::<Vec<_>>()).await;
        let aggs = aggregates(30);
        publish_range(&members[0].bus, &topic, &checker, &aggs, 1..=10).await;
        wait_for(|| checker.distinct_ends() == 300).await;
        for m in &members {
            assert!(
                ends_by(&checker, m.id) > 0,
                "seed {seed}: member {} handled nothing",
                m.id
            );
        }
        members.push(join(backend, &topic, &group, &checker, 3, flaky(seed)).await);
        settled(&members.iter().collect::<Vec<_>>()).await;
        assert!(
            members[3].active() > 0,
            "seed {seed}: the joiner got no partition"
        );
        publish_range(&members[0].bus, &topic, &checker, &aggs, 11..=20).await;
        wait_for(|| checker.distinct_ends() == 600).await;
        assert!(
            ends_by(&checker, 3) > 0,
            "seed {seed}: the joiner handled nothing"
        );
        let r = finish(backend, &members[0].bus, &topic, &group, &checker).await;
        // Joins move partitions gracefully (drain, release, rewind to the ack floor).
        assert_ok(seed, "load_sharing", r, IN_FLIGHT);
        for m in members {
            m.close().await;
        }
    }
}

/// A member that leaves gracefully hands its partitions over; nothing is lost.
pub async fn graceful_leave(backend: &dyn Backend) {
    if !has_groups(backend).await {
        return;
    }
    for seed in 0..backend.settings().seeds {
        let topic = unique_topic("group-leave");
        let group = format!("g-{seed}");
        let checker = OrderChecker::new();
        let mut a = join(backend, &topic, &group, &checker, 0, flaky(seed)).await;
        let b = join(backend, &topic, &group, &checker, 1, flaky(seed)).await;
        settled(&[&a, &b]).await;
        let aggs = aggregates(20);
        publish_range(&b.bus, &topic, &checker, &aggs, 1..=10).await;
        wait_for(|| checker.distinct_ends() >= 60).await;
        a.leave().await;
        checker.crash(0);
        publish_range(&b.bus, &topic, &checker, &aggs, 11..=20).await;
        wait_for(|| checker.distinct_ends() == 400).await;
        let r = finish(backend, &b.bus, &topic, &group, &checker).await;
        assert_ok(seed, "graceful_leave", r, IN_FLIGHT);
        a.close().await;
        b.close().await;
    }
}

/// The takeover trap, made certain: the victim's handlers are held at a barrier until it
/// has started events on several aggregates, it crashes, and only then are newer events
/// published. Only the rewind (never an ack deadline) can bring the victim's unfinished
/// events back before the newer ones. Returns the checker's verdict.
pub async fn crash_trap_outcome(backend: &dyn Backend, seed: u64) -> Result<Summary, Violation> {
    let topic = unique_topic("group-trap");
    let group = format!("g-{seed}");
    let checker = OrderChecker::new();
    let barrier = Arc::new(Notify::new());
    let b = barrier.clone();
    // The victim finishes some events, then blocks on every later one.
    let victim_handler: Handler = Arc::new(move |e: Event| {
        let b = b.clone();
        Box::pin(async move {
            if e.event_version > 1 + mix(seed, &e.aggregate_id, 0, 0) % 2 {
                b.notified().await;
            }
            Ok(())
        })
    });
    let mut victim = join(backend, &topic, &group, &checker, 0, victim_handler).await;
    let survivor = join(backend, &topic, &group, &checker, 1, flaky(seed)).await;
    settled(&[&victim, &survivor]).await;
    let aggs = aggregates(24);
    publish_range(&survivor.bus, &topic, &checker, &aggs, 1..=4).await;
    // K of the victim's handlers blocked on aggregates of partitions it owns.
    let blocked = |checker: &OrderChecker| {
        let records = checker.records();
        let mut open = std::collections::HashSet::new();
        for r in &records {
            match r {
                Record::Start { a, m: 0, .. } => {
                    open.insert(a.clone());
                }
                Record::End { a, m: 0, .. } | Record::Fail { a, m: 0, .. } => {
                    open.remove(a);
                }
                _ => {}
            }
        }
        open.len()
    };
    wait_for(|| blocked(&checker) >= 4).await;
    victim.crash(&checker).await;
    publish_range(&survivor.bus, &topic, &checker, &aggs, 5..=8).await;
    wait_for(|| checker.distinct_ends() == 24 * 8).await;
    let r = finish(backend, &survivor.bus, &topic, &group, &checker).await;
    victim.bus.close().await.expect("close");
    survivor.close().await;
    r
}

/// The crash trap over every seed: a correct takeover passes C1 to C6.
pub async fn crash_trap(backend: &dyn Backend) {
    if !has_groups(backend).await {
        return;
    }
    for seed in 0..backend.settings().seeds {
        let r = crash_trap_outcome(backend, seed).await;
        assert_ok(seed, "crash_trap", r, IN_FLIGHT);
    }
}

/// Members join while events flow.
pub async fn join_during_load(backend: &dyn Backend) {
    if !has_groups(backend).await {
        return;
    }
    for seed in 0..backend.settings().seeds {
        let topic = unique_topic("group-join");
        let group = format!("g-{seed}");
        let checker = OrderChecker::new();
        let mut members = vec![join(backend, &topic, &group, &checker, 0, flaky(seed)).await];
        settled(&[&members[0]]).await;
        let aggs = aggregates(40);
        let publisher = member_bus(backend).await;
        for (step, id) in [(1u64, 1u32), (2, 2)] {
            publish_range(
                &publisher,
                &topic,
                &checker,
                &aggs,
                (step - 1) * 8 + 1..=step * 8,
            )
            .await;
            // Join while the last batch is being handled.
            wait_for(|| checker.distinct_ends() >= (step as usize - 1) * 320 + 100).await;
            members.push(join(backend, &topic, &group, &checker, id, flaky(seed)).await);
        }
        publish_range(&publisher, &topic, &checker, &aggs, 17..=24).await;
        wait_for(|| checker.distinct_ends() == 40 * 24).await;
        let r = finish(backend, &publisher, &topic, &group, &checker).await;
        assert_ok(seed, "join_during_load", r, 2 * IN_FLIGHT);
        for m in members {
            m.close().await;
        }
        publisher.close().await.expect("close");
    }
}

/// Many envelopes over many aggregates through two leaves, one crash and two joins.
/// `envelopes` is split over 100 aggregates.
pub async fn churn_with(
    backend: &dyn Backend,
    seed: u64,
    envelopes: usize,
) -> Result<Summary, Violation> {
    let topic = unique_topic("group-churn");
    let group = format!("g-{seed}");
    let checker = OrderChecker::new();
    let versions = (envelopes / 100).max(10) as u64;
    let total = 100 * versions as usize;
    let mut members = Vec::new();
    for id in 0..3 {
        members.push(join(backend, &topic, &group, &checker, id, flaky(seed)).await);
    }
    let publisher = member_bus(backend).await;
    let aggs = aggregates(100);
    let step = versions / 6;
    let mut published = 0u64;
    let mut next_id = 3;
    for phase in 0..6u64 {
        let upto = if phase == 5 {
            versions
        } else {
            (phase + 1) * step
        };
        publish_range(&publisher, &topic, &checker, &aggs, published + 1..=upto).await;
        published = upto;
        wait_for(|| checker.distinct_ends() >= (published as usize * 100) / 2).await;
        match phase {
            0 => members[0].leave().await,
            1 | 3 => {
                members.push(join(backend, &topic, &group, &checker, next_id, flaky(seed)).await);
                next_id += 1;
            }
            2 => members[1].crash(&checker).await,
            4 => members[2].leave().await,
            _ => {}
        }
        if phase == 0 || phase == 4 {
            checker.crash(if phase == 0 { 0 } else { 2 });
        }
    }
    wait_for(|| checker.distinct_ends() == total).await;
    let r = finish(backend, &publisher, &topic, &group, &checker).await;
    for m in members {
        m.close().await;
    }
    publisher.close().await.expect("close");
    r
}

/// 10,000 envelopes over 100 aggregates through two leaves, one crash and two joins, on the
/// first seed; the other seeds run the same churn with 2,000 envelopes.
pub async fn churn(backend: &dyn Backend) {
    if !has_groups(backend).await {
        return;
    }
    for seed in 0..backend.settings().seeds {
        let n = if seed == 0 { 10_000 } else { 2_000 };
        let r = churn_with(backend, seed, n).await;
        assert_ok(seed, "churn", r, 5 * IN_FLIGHT);
    }
}

/// A backend without consumer groups never lets two members interleave: a second member
/// stands by (the default), handles nothing while the first is active, and takes over (with
/// the rewind) when the first leaves; asked not to stand by, it is refused with `Conflict`.
pub async fn declared(backend: &dyn Backend) {
    if has_groups(backend).await {
        return;
    }
    let topic = unique_topic("group-none");
    let group = "g";
    let checker = OrderChecker::new();
    let mut a = join(backend, &topic, group, &checker, 0, flaky(0)).await;
    wait_for(|| a.active() > 0).await;
    let other = member_bus(backend).await;
    let e = other
        .subscribe(&topic)
        .group(group)
        .standby(false)
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .expect_err("a second member that does not stand by, without consumer groups");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    other.close().await.expect("close");
    let b = join(backend, &topic, group, &checker, 1, flaky(0)).await;
    let aggs = aggregates(10);
    publish_range(&b.bus, &topic, &checker, &aggs, 1..=10).await;
    wait_for(|| checker.distinct_ends() == 100).await;
    assert_eq!(ends_by(&checker, 1), 0, "the standby handled events");
    assert_eq!(b.active(), 0, "the standby owns a partition");
    a.leave().await;
    checker.crash(0);
    publish_range(&b.bus, &topic, &checker, &aggs, 11..=20).await;
    wait_for(|| checker.distinct_ends() == 200).await;
    assert!(ends_by(&checker, 1) >= 100, "the standby did not take over");
    let r = finish(backend, &b.bus, &topic, group, &checker).await;
    assert_ok(0, "declared", r, IN_FLIGHT);
    a.close().await;
    b.close().await;
}
