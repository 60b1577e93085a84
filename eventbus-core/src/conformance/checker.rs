//! The order checker: records what handlers and the pool did on one global monotonic clock
//! and checks the delivery guarantees against it.
//!
//! Records: `S(a,v,m)` handler start, `E(a,v,m,ok|dlq)` handler end or dead letter (recorded
//! before the ack), `K(a,v)` ack confirmed, `X(m)` member crashed or restarted.
//! Checks (DESIGN.md section 5):
//! - **C1** every receipted `(a,v)` has an `E`.
//! - **C2** per aggregate, in time order of `E`, each next version `w <= previous + 1`,
//!   starting at 1: `4,5,6,5,6,7` is a replay and allowed; `4,6` and `4,5,6,5,7` are gaps.
//! - **C3** a repeated `E(a,v)` follows a redelivery (delivery count above 1, or a crash or
//!   restart in between); no `K(a,v)` before its first `S`.
//! - **C4** per aggregate, handler runs are disjoint, within a member and across the members
//!   of a group (a run lasts from `S` to its `E` or failure `F`, or to the member's crash
//!   `X`); nothing from a member after its `X`.
//! - **C5** (groups) duplicates stay within the in-flight window of the handovers:
//!   [`Summary::duplicates`] is reported for the test to bound.
//! - **C6** after the run is marked quiescent, no new `E`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tower::Service;

use crate::error::HandleError;
use crate::handler::Event;
use crate::pool::{PoolEvent, PoolObserver};

/// How a handling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// The handler succeeded.
    Ok,
    /// The message was dead-lettered.
    DeadLetter,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Handler start.
    Start {
        /// Clock tick.
        t: u64,
        /// Aggregate.
        a: String,
        /// Version.
        v: u64,
        /// Member.
        m: u32,
        /// Broker delivery count.
        delivery_count: u32,
        /// Pool attempt.
        attempt: u32,
    },
    /// Handler end (success) or dead letter.
    End {
        /// Clock tick.
        t: u64,
        /// Aggregate.
        a: String,
        /// Version.
        v: u64,
        /// Member.
        m: u32,
        /// How it ended.
        kind: EndKind,
    },
    /// Handler attempt failed (it may be retried or dead-lettered).
    Fail {
        /// Clock tick.
        t: u64,
        /// Aggregate.
        a: String,
        /// Version.
        v: u64,
        /// Member.
        m: u32,
    },
    /// Ack confirmed.
    Ack {
        /// Clock tick.
        t: u64,
        /// Aggregate.
        a: String,
        /// Version.
        v: u64,
    },
    /// Member crashed or restarted.
    Crash {
        /// Clock tick.
        t: u64,
        /// Member.
        m: u32,
    },
}

/// A broken guarantee, naming the aggregate and the offending sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which check (`C1`, `C2`, ...).
    pub check: &'static str,
    /// The aggregate.
    pub aggregate: String,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated for aggregate {:?}: {}",
            self.check, self.aggregate, self.detail
        )
    }
}

impl std::error::Error for Violation {}

/// What a passing check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Summary {
    /// Distinct receipted events.
    pub published: usize,
    /// `E` records (handled or dead-lettered, duplicates included).
    pub ends: usize,
    /// Repeated `E` records (replays after redelivery).
    pub duplicates: usize,
    /// Dead-letter ends.
    pub dead_lettered: usize,
}

#[derive(Default)]
struct Inner {
    records: Vec<Record>,
    published: BTreeMap<String, Vec<u64>>,
    quiescent_at: Option<u64>,
}

/// Records and checks; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct OrderChecker {
    clock: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for OrderChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderChecker")
            .field("records", &self.inner.lock().records.len())
            .finish()
    }
}

impl OrderChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn push(&self, make: impl FnOnce(u64) -> Record) {
        let mut inner = self.inner.lock();
        // Tick under the lock so that record order equals clock order.
        let t = self.tick();
        inner.records.push(make(t));
    }

    /// The broker receipted `(aggregate, version)`. Publishers must receipt one aggregate's
    /// versions in increasing order (checked: broker order matches version order).
    pub fn published(&self, aggregate: &str, version: u64) {
        let mut inner = self.inner.lock();
        let list = inner.published.entry(aggregate.to_owned()).or_default();
        assert!(
            list.last().is_none_or(|last| *last < version),
            "publisher stored {aggregate:?} v{version} after v{:?}: broker order differs from version order",
            list.last()
        );
        list.push(version);
    }

    /// Member `m` crashed or was restarted (its unacknowledged work may be redelivered).
    pub fn crash(&self, m: u32) {
        self.push(|t| Record::Crash { t, m });
    }

    /// Marks the end of the run: the broker shows nothing pending. [`OrderChecker::check`]
    /// then fails on any later `E` (C6).
    pub fn quiescent(&self) {
        let t = self.tick();
        self.inner.lock().quiescent_at = Some(t);
    }

    /// Wraps a handler so that its starts and successful ends are recorded for member `m`.
    pub fn wrap<H>(&self, m: u32, handler: H) -> Recorded<H> {
        Recorded {
            checker: self.clone(),
            m,
            inner: handler,
        }
    }

    /// The pool observer recording acks and dead letters for member `m`.
    pub fn observer(&self, m: u32) -> Arc<dyn PoolObserver> {
        Arc::new(Observer {
            checker: self.clone(),
            m,
        })
    }

    /// Adds records made elsewhere (other processes), in the order given: each gets the
    /// next tick of this checker's clock, whatever its own `t`. Sort them by a clock the
    /// processes share first.
    pub fn import(&self, records: impl IntoIterator<Item = Record>) {
        for r in records {
            self.push(|t| match r {
                Record::Start {
                    a,
                    v,
                    m,
                    delivery_count,
                    attempt,
                    ..
                } => Record::Start {
                    t,
                    a,
                    v,
                    m,
                    delivery_count,
                    attempt,
                },
                Record::End { a, v, m, kind, .. } => Record::End { t, a, v, m, kind },
                Record::Fail { a, v, m, .. } => Record::Fail { t, a, v, m },
                Record::Ack { a, v, .. } => Record::Ack { t, a, v },
                Record::Crash { m, .. } => Record::Crash { t, m },
            });
        }
    }

    /// Number of distinct `(a,v)` with an `E`.
    pub fn distinct_ends(&self) -> usize {
        let inner = self.inner.lock();
        let mut seen = std::collections::HashSet::new();
        for r in &inner.records {
            if let Record::End { a, v, .. } = r {
                seen.insert((a.clone(), *v));
            }
        }
        seen.len()
    }

    /// All records, in clock order.
    pub fn records(&self) -> Vec<Record> {
        self.inner.lock().records.clone()
    }

    /// Runs C1, C2, C3 and C6; the first violation found is returned.
    pub fn check(&self) -> Result<Summary, Violation> {
        let inner = self.inner.lock();
        let mut summary = Summary {
            published: inner.published.values().map(Vec::len).sum(),
            ..Summary::default()
        };
        // Per aggregate: ends in time order; first start per (a,v); crash times per member.
        let mut ends: HashMap<&str, Vec<(u64, u64, u32)>> = HashMap::new();
        let mut starts: HashMap<(&str, u64), Vec<StartRec>> = HashMap::new();
        let mut crashes: Vec<u64> = Vec::new();
        for r in &inner.records {
            match r {
                Record::Start {
                    t,
                    a,
                    v,
                    m,
                    delivery_count,
                    ..
                } => starts
                    .entry((a, *v))
                    .or_default()
                    .push((*t, *m, *delivery_count)),
                Record::End { t, a, v, m, kind } => {
                    summary.ends += 1;
                    if *kind == EndKind::DeadLetter {
                        summary.dead_lettered += 1;
                    }
                    ends.entry(a).or_default().push((*t, *v, *m));
                }
                Record::Ack { t, a, v } => {
                    let first = starts.get(&(a.as_str(), *v)).and_then(|s| s.first());
                    if first.is_none_or(|(ts, _, _)| ts > t) {
                        return Err(Violation {
                            check: "C3",
                            aggregate: a.clone(),
                            detail: format!("v{v} was acknowledged before any handler started it"),
                        });
                    }
                }
                Record::Crash { t, .. } => crashes.push(*t),
                Record::Fail { .. } => {}
            }
            if let (Some(q), Record::End { t, a, v, .. }) = (inner.quiescent_at, r)
                && *t > q
            {
                return Err(Violation {
                    check: "C6",
                    aggregate: a.clone(),
                    detail: format!("v{v} was handled again after the run was quiescent"),
                });
            }
        }
        // C4
        // Per aggregate: the member running it and the version.
        let mut running: HashMap<&str, (u32, u64)> = HashMap::new();
        let mut crashed: HashMap<u32, u64> = HashMap::new();
        for r in &inner.records {
            let (t, a, m, start, v) = match r {
                Record::Start { t, a, m, v, .. } => (*t, a.as_str(), *m, true, *v),
                Record::End { t, a, m, v, .. } | Record::Fail { t, a, m, v } => {
                    (*t, a.as_str(), *m, false, *v)
                }
                Record::Crash { t, m } => {
                    crashed.insert(*m, *t);
                    running.retain(|_, (r, _)| r != m);
                    continue;
                }
                Record::Ack { .. } => continue,
            };
            if let Some(x) = crashed.get(&m) {
                return Err(Violation {
                    check: "C4",
                    aggregate: a.to_owned(),
                    detail: format!("member {m} handled v{v} at t{t}, after it crashed at t{x}"),
                });
            }
            if start {
                match running.get(a) {
                    Some((other, w)) if *other != m => {
                        return Err(Violation {
                            check: "C4",
                            aggregate: a.to_owned(),
                            detail: format!(
                                "member {m} started v{v} while member {other} was still handling v{w}"
                            ),
                        });
                    }
                    Some((_, w)) => {
                        return Err(Violation {
                            check: "C4",
                            aggregate: a.to_owned(),
                            detail: format!(
                                "member {m} started v{v} while it was still handling v{w}"
                            ),
                        });
                    }
                    None => {}
                }
                running.insert(a, (m, v));
            } else if running.get(a).is_some_and(|(r, _)| *r == m) {
                running.remove(a);
            }
        }
        // C1
        for (a, versions) in &inner.published {
            let handled: std::collections::HashSet<u64> = ends
                .get(a.as_str())
                .map(|e| e.iter().map(|x| x.1).collect())
                .unwrap_or_default();
            if let Some(missing) = versions.iter().find(|v| !handled.contains(v)) {
                return Err(Violation {
                    check: "C1",
                    aggregate: a.clone(),
                    detail: format!(
                        "receipted v{missing} was never handled nor dead-lettered (handled: {})",
                        seq(&sorted(&handled))
                    ),
                });
            }
        }
        // C2 and C3
        for (a, list) in &ends {
            let mut prev = 0u64;
            let mut seen: HashMap<u64, u64> = HashMap::new();
            let versions: Vec<u64> = list.iter().map(|x| x.1).collect();
            for (i, (t, v, _m)) in list.iter().enumerate() {
                if *v > prev + 1 {
                    return Err(Violation {
                        check: "C2",
                        aggregate: (*a).to_owned(),
                        detail: format!(
                            "v{v} handled right after v{prev} (a gap); sequence of ends: {}",
                            seq(&versions[..=i])
                        ),
                    });
                }
                if let Some(prev_t) = seen.get(v) {
                    summary.duplicates += 1;
                    // The S that led to this E: the latest start of (a,v) before t.
                    let start = starts
                        .get(&(*a, *v))
                        .and_then(|s| s.iter().rev().find(|(ts, _, _)| ts < t).copied());
                    let redelivered = start.is_some_and(|(_, _, dc)| dc > 1)
                        || crashes.iter().any(|c| c > prev_t && c < t);
                    if !redelivered {
                        return Err(Violation {
                            check: "C3",
                            aggregate: (*a).to_owned(),
                            detail: format!(
                                "v{v} handled twice without a redelivery in between; sequence of ends: {}",
                                seq(&versions[..=i])
                            ),
                        });
                    }
                }
                seen.insert(*v, *t);
                prev = *v;
            }
        }
        Ok(summary)
    }
}

/// `(t, member, delivery_count)` of one start.
type StartRec = (u64, u32, u32);

fn sorted(set: &std::collections::HashSet<u64>) -> Vec<u64> {
    let mut v: Vec<u64> = set.iter().copied().collect();
    v.sort_unstable();
    v
}

fn seq(v: &[u64]) -> String {
    const MAX: usize = 40;
    let start = v.len().saturating_sub(MAX);
    let body: Vec<String> = v[start..].iter().map(u64::to_string).collect();
    if start > 0 {
        format!("...,{}", body.join(","))
    } else {
        body.join(",")
    }
}

struct Observer {
    checker: OrderChecker,
    m: u32,
}

impl PoolObserver for Observer {
    fn on_event(&self, event: &PoolEvent<'_>) {
        match event {
            PoolEvent::DeadLettered {
                envelope: Some(e), ..
            } => {
                let (a, v, m) = (e.aggregate_id.clone(), e.event_version, self.m);
                self.checker.push(|t| Record::End {
                    t,
                    a,
                    v,
                    m,
                    kind: EndKind::DeadLetter,
                });
            }
            PoolEvent::Acked {
                envelope: Some(e), ..
            } => {
                let (a, v) = (e.aggregate_id.clone(), e.event_version);
                self.checker.push(|t| Record::Ack { t, a, v });
            }
            _ => {}
        }
    }
}

/// A handler wrapped by [`OrderChecker::wrap`].
#[derive(Clone)]
pub struct Recorded<H> {
    checker: OrderChecker,
    m: u32,
    inner: H,
}

impl<H> fmt::Debug for Recorded<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorded")
            .field("m", &self.m)
            .finish_non_exhaustive()
    }
}

impl<H> Service<Event> for Recorded<H>
where
    H: Service<Event, Response = (), Error = HandleError>,
    H::Future: Send + 'static,
{
    type Response = ();
    type Error = HandleError;
    type Future = BoxFuture<'static, Result<(), HandleError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandleError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let (a, v, m) = (event.aggregate_id.clone(), event.event_version, self.m);
        let (dc, attempt) = (event.delivery_count, event.attempt);
        let a2 = a.clone();
        self.checker.push(|t| Record::Start {
            t,
            a: a2,
            v,
            m,
            delivery_count: dc,
            attempt,
        });
        let fut = self.inner.call(event);
        let checker = self.checker.clone();
        Box::pin(async move {
            let r = fut.await;
            if r.is_ok() {
                checker.push(|t| Record::End {
                    t,
                    a,
                    v,
                    m,
                    kind: EndKind::Ok,
                });
            } else {
                checker.push(|t| Record::Fail { t, a, v, m });
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(c: &OrderChecker, a: &str, v: u64, dc: u32) {
        end_by(c, a, v, dc, 0);
    }

    fn end_by(c: &OrderChecker, a: &str, v: u64, dc: u32, m: u32) {
        let a2 = a.to_owned();
        c.push(|t| Record::Start {
            t,
            a: a2,
            v,
            m,
            delivery_count: dc,
            attempt: 1,
        });
        let a = a.to_owned();
        c.push(|t| Record::End {
            t,
            a,
            v,
            m,
            kind: EndKind::Ok,
        });
    }

    #[test]
    fn imported_records_are_checked_in_the_order_given() {
        let start = |v| Record::Start {
            t: 0,
            a: "a".to_owned(),
            v,
            m: 1,
            delivery_count: 1,
            attempt: 1,
        };
        let end = |v| Record::End {
            t: 0,
            a: "a".to_owned(),
            v,
            m: 1,
            kind: EndKind::Ok,
        };
        let c = OrderChecker::new();
        c.published("a", 1);
        c.published("a", 2);
        c.import([start(1), end(1), start(2), end(2)]);
        assert_eq!(c.check().unwrap().ends, 2);
        let ticks: Vec<u64> = c
            .records()
            .iter()
            .map(|r| match r {
                Record::Start { t, .. } | Record::End { t, .. } => *t,
                _ => u64::MAX,
            })
            .collect();
        assert_eq!(ticks, [0, 1, 2, 3]);
        let swapped = OrderChecker::new();
        swapped.import([start(2), end(2), start(1), end(1)]);
        assert_eq!(swapped.check().unwrap_err().check, "C2");
    }

    #[test]
    fn replay_allowed_gaps_refused() {
        let c = OrderChecker::new();
        for v in 1..=6 {
            c.published("a", v);
        }
        for v in [1, 2, 3, 4, 5, 6] {
            end(&c, "a", v, 1);
        }
        for v in [5, 6] {
            end(&c, "a", v, 2);
        }
        assert_eq!(c.check().unwrap().duplicates, 2);

        let gap = OrderChecker::new();
        for v in [1, 2, 3, 4, 6, 5] {
            end(&gap, "a", v, 1);
        }
        let e = gap.check().unwrap_err();
        assert_eq!(e.check, "C2");
        assert!(e.detail.contains("1,2,3,4,6"), "{e}");

        let replay_gap = OrderChecker::new();
        for (v, dc) in [(1, 1), (2, 1), (3, 1), (2, 2), (4, 1)] {
            end(&replay_gap, "a", v, dc);
        }
        // 1,2,3,2,4: after the replayed 2 comes 4, skipping 3.
        assert_eq!(replay_gap.check().unwrap_err().check, "C2");
    }

    #[test]
    fn overlapping_members() {
        let start = |c: &OrderChecker, m: u32, v: u64| {
            c.push(|t| Record::Start {
                t,
                a: "a".into(),
                v,
                m,
                delivery_count: 1,
                attempt: 1,
            })
        };
        let end = |c: &OrderChecker, m: u32, v: u64| {
            c.push(|t| Record::End {
                t,
                a: "a".into(),
                v,
                m,
                kind: EndKind::Ok,
            })
        };
        // Member 1 starts while member 0 still runs the aggregate.
        let c = OrderChecker::new();
        start(&c, 0, 1);
        start(&c, 1, 1);
        end(&c, 1, 1);
        let e = c.check().unwrap_err();
        assert_eq!(e.check, "C4");
        assert!(
            e.detail.contains("member 1 started v1 while member 0"),
            "{e}"
        );
        // After member 0 crashed, member 1 may take over; member 0 must stay silent.
        let ok = OrderChecker::new();
        start(&ok, 0, 1);
        ok.crash(0);
        start(&ok, 1, 1);
        end(&ok, 1, 1);
        assert!(ok.check().is_ok());
        end(&ok, 0, 1);
        assert_eq!(ok.check().unwrap_err().check, "C4");
        // One member running two versions of an aggregate at once.
        let own = OrderChecker::new();
        start(&own, 0, 1);
        start(&own, 0, 2);
        end(&own, 0, 2);
        end(&own, 0, 1);
        let e = own.check().unwrap_err();
        assert_eq!(e.check, "C4");
        assert!(e.detail.contains("while it was still handling v1"), "{e}");
        // One after the other is fine.
        let seq = OrderChecker::new();
        for v in 1..=2 {
            start(&seq, 0, v);
            end(&seq, 0, v);
        }
        assert!(seq.check().is_ok());
    }

    #[test]
    fn missing_and_unexplained_duplicates() {
        let c = OrderChecker::new();
        c.published("a", 1);
        c.published("a", 2);
        end(&c, "a", 1, 1);
        let e = c.check().unwrap_err();
        assert_eq!((e.check, e.aggregate.as_str()), ("C1", "a"));

        let d = OrderChecker::new();
        end(&d, "a", 1, 1);
        end(&d, "a", 1, 1);
        assert_eq!(d.check().unwrap_err().check, "C3");
        let r = OrderChecker::new();
        end(&r, "a", 1, 1);
        r.crash(0);
        end_by(&r, "a", 1, 1, 1);
        assert!(r.check().is_ok());

        let q = OrderChecker::new();
        end(&q, "a", 1, 1);
        q.quiescent();
        end(&q, "a", 1, 2);
        assert_eq!(q.check().unwrap_err().check, "C6");

        let k = OrderChecker::new();
        k.push(|t| Record::Ack {
            t,
            a: "a".into(),
            v: 1,
        });
        assert_eq!(k.check().unwrap_err().check, "C3");
    }
}
