//! The backend conformance suite (semver-exempt).
//!
//! Every backend runs the same behaviour tests with its declared capabilities
//! ([`DomainCapabilities`], [`SimpleCapabilities`]): implement
//! [`Backend`] for a constructor of your transports and expand [`conformance_tests!`](crate::conformance_tests) in an
//! integration test. Each test counts every message (published = handled or dead-lettered),
//! judges order with the [`OrderChecker`], and runs under an overall deadline so that a hang
//! fails fast. A capability a backend does not declare is checked the other way round: the
//! operation must fail with [`Error::NotSupported`].
//!
//! [`DomainCapabilities`]: crate::DomainCapabilities
//! [`SimpleCapabilities`]: crate::SimpleCapabilities
//! [`Error::NotSupported`]: crate::Error::NotSupported

// The suite is test code: a failed expectation is a failed test, reported by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod checker;
pub mod coordination;
pub mod domain;
pub mod group_names;
pub mod groups;
pub mod limits;
pub mod pipeline;
pub mod process;
pub mod simple;

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use checker::{EndKind, OrderChecker, Record, Recorded, Summary, Violation};

use crate::envelope::Envelope;
use crate::error::Result;
use crate::transport::{DynDomainTransport, DynSimpleTransport};

/// Limits of a conformance run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Overall deadline of each test. Default 120 s.
    pub deadline: Duration,
    /// How long "nothing more arrives" is watched for. Default 300 ms.
    pub quiet: Duration,
    /// Seeds of the randomized order test. Default 20.
    pub seeds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(120),
            quiet: Duration::from_millis(300),
            seeds: 20,
        }
    }
}

/// A backend under test: makes new clients of one broker.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A new domain client of the broker (every call: the same broker, a new connection).
    async fn domain(&self) -> Result<DynDomainTransport>;
    /// A new simple client of the broker.
    async fn simple(&self) -> Result<DynSimpleTransport>;
    /// Limits of the run.
    fn settings(&self) -> Settings {
        Settings::default()
    }
    /// Whether the broker can be reached. A test of an unavailable backend is skipped with
    /// a message (a laptop without the server); test scripts make missing servers fail
    /// instead, in the backend's constructor.
    fn available(&self) -> bool {
        true
    }
}

/// A topic no other test uses. Panics if `prefix` is not a valid start of a topic name.
pub fn unique_topic(prefix: &str) -> crate::Topic {
    crate::Topic::new(format!("{prefix}-{}", uuid::Uuid::now_v7().simple()))
        .expect("a valid topic prefix")
}

/// A test event with a JSON payload naming the aggregate and version.
pub fn event(aggregate: &str, version: u64) -> Envelope {
    let payload = format!(r#"{{"aggregate":"{aggregate}","version":{version}}}"#);
    Envelope::unchecked(aggregate, "TestEvent", version, Bytes::from(payload))
        .with_content_type("application/json")
}

/// A deterministic hash of a seed, an event and an attempt: decides injected failures and
/// delays, so that a seed replays the same run.
pub fn mix(seed: u64, aggregate: &str, version: u64, attempt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in aggregate
        .bytes()
        .chain(version.to_le_bytes())
        .chain(attempt.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Runs `fut` under the backend's deadline, panicking with `what` if it passes.
pub async fn with_deadline<F: Future<Output = ()>>(backend: &dyn Backend, what: &str, fut: F) {
    let deadline = backend.settings().deadline;
    if tokio::time::timeout(deadline, fut).await.is_err() {
        panic!("conformance test {what:?} did not finish within {deadline:?}");
    }
}

/// How long [`wait_for`] waits, in real time, before it fails the test.
pub const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// Polls `cond` every few milliseconds until it holds. Panics when it did not hold within
/// [`WAIT_LIMIT`] of real time (a test that would hang fails instead; a paused tokio clock
/// does not count against it).
pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "the condition waited for did not hold within {WAIT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the broker shows nothing pending for `group` (if it can tell), marks the run
/// quiescent, watches for stray redeliveries for [`Settings::quiet`], then runs the checks.
pub async fn settle_and_check(
    backend: &dyn Backend,
    transport: &crate::DynDomainTransport,
    topic: &str,
    group: &str,
    checker: &OrderChecker,
) -> std::result::Result<Summary, Violation> {
    let topic = crate::Topic::new(topic).expect("topic");
    loop {
        match transport.pending(&topic, group).await.expect("pending") {
            None | Some(0) => break,
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    checker.quiescent();
    tokio::time::sleep(backend.settings().quiet).await;
    checker.check()
}

/// The next delivery of a subscription used without the pool (raw), taking part in the
/// group protocol on the side: an assigned partition is rewound, a revoked one released.
pub async fn next_raw(sub: &mut crate::DomainSubscription) -> Option<Result<crate::Delivery>> {
    use futures::StreamExt as _;
    loop {
        let Some(group) = sub.group.as_mut() else {
            return sub.deliveries.next().await;
        };
        let event = tokio::select! {
            biased;
            Some(event) = group.events.next() => event,
            d = sub.deliveries.next() => return d,
        };
        let r = match event {
            crate::GroupEvent::Assigned { partition, epoch } => {
                group.control.rewind(partition, epoch).await
            }
            crate::GroupEvent::Revoked { partition, epoch } => {
                group.control.release(partition, epoch).await
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            eprintln!("raw consumer: group operation failed: {e}");
        }
    }
}

/// Expands to one `#[tokio::test]` per conformance test, each calling the suite function
/// with the backend built by `$make` (an expression evaluated per test).
///
/// `conformance_tests!(paused: make())` runs on tokio's paused clock (in-process backends);
/// `conformance_tests!(make())` on a real clock with two worker threads (network backends).
/// `simple:` or `domain:` after the clock choice expands only that bus's tests, for a
/// backend that offers one bus: `conformance_tests!(real, simple: make())`.
#[macro_export]
macro_rules! conformance_tests {
    (paused: $make:expr) => {
        $crate::conformance_tests!(@simple tokio::test(start_paused = true); $make);
        $crate::conformance_tests!(@domain tokio::test(start_paused = true); $make);
    };
    (paused, simple: $make:expr) => {
        $crate::conformance_tests!(@simple tokio::test(start_paused = true); $make);
    };
    (paused, domain: $make:expr) => {
        $crate::conformance_tests!(@domain tokio::test(start_paused = true); $make);
    };
    (real, simple: $make:expr) => {
        $crate::conformance_tests!(@simple tokio::test(flavor = "multi_thread", worker_threads = 2); $make);
    };
    (real, domain: $make:expr) => {
        $crate::conformance_tests!(@domain tokio::test(flavor = "multi_thread", worker_threads = 2); $make);
    };
    ($make:expr) => {
        $crate::conformance_tests!(@simple tokio::test(flavor = "multi_thread", worker_threads = 2); $make);
        $crate::conformance_tests!(@domain tokio::test(flavor = "multi_thread", worker_threads = 2); $make);
    };
    (@simple $attr:meta; $make:expr) => {
        $crate::conformance_tests!(@each $attr; $make;
            simple_publish_subscribe => simple::publish_subscribe,
            simple_fan_out => simple::fan_out,
            simple_queue_groups => simple::queue_groups,
            simple_queue_group_load_sharing => simple::queue_group_load_sharing,
            simple_bad_queue_group_names => group_names::bad_queue_group_names,
            simple_topic_isolation => simple::topic_isolation,
            simple_request_reply => simple::request_reply,
            simple_handler_failures => simple::handler_failures,
            simple_bad_input => simple::bad_input,
            simple_close => simple::close,
            simple_pipeline_writes => pipeline::simple_writes,
        );
    };
    (@domain $attr:meta; $make:expr) => {
        $crate::conformance_tests!(@each $attr; $make;
            domain_publish_subscribe => domain::publish_subscribe,
            domain_topic_isolation => domain::topic_isolation,
            domain_order_under_failures => domain::order_under_failures,
            domain_retry_then_success => domain::retry_then_success,
            domain_release_and_deadline_redelivery => domain::release_and_deadline_redelivery,
            domain_dead_letter => domain::dead_letter,
            domain_malformed_input => domain::malformed_input,
            domain_resubscribe => domain::resubscribe,
            domain_close => domain::close,
            domain_graceful_drain => domain::graceful_drain,
            domain_drain_deadline => domain::drain_deadline,
            domain_backpressure => domain::backpressure,
            domain_slow_key_does_not_stall_others => domain::slow_key_does_not_stall_others,
            domain_bad_input => domain::bad_input,
            domain_bad_group_names => group_names::bad_group_names,
            domain_replay => domain::replay,
            domain_publish_batch_order => domain::publish_batch_order,
            domain_single_active_consumer => domain::single_active_consumer,
            domain_deadline_extension => domain::deadline_extension,
            domain_slow_aggregate_over_cap => domain::slow_aggregate_over_cap,
            domain_deferred_bound => domain::deferred_bound,
            domain_unacked_limit => domain::unacked_limit,
            domain_expected_version => domain::expected_version,
            domain_size_limits => limits::size_limits,
            domain_dead_letter_at_limit => limits::dead_letter_at_limit,
            domain_dead_letter_at_limit_with_layers => limits::dead_letter_at_limit_with_layers,
            domain_pipeline_writes => pipeline::domain_writes,
            group_declared => groups::declared,
            group_load_sharing => groups::load_sharing,
            group_graceful_leave => groups::graceful_leave,
            group_crash_trap => groups::crash_trap,
            group_join_during_load => groups::join_during_load,
            group_churn => groups::churn,
        );
    };
    (@each $attr:meta; $make:expr; $($name:ident => $m:ident :: $f:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $name() {
                let backend = $make;
                if !$crate::conformance::Backend::available(&backend) {
                    eprintln!("skipped {}: the backend's server is not available", stringify!($name));
                    return;
                }
                $crate::conformance::with_deadline(&backend, stringify!($name), $crate::conformance::$m::$f(&backend)).await;
            }
        )*
    };
}
