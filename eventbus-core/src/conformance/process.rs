//! Group members in separate processes, for tests that kill one with SIGKILL: the test
//! binary runs itself again as a child on an ignored test, and the child reports its
//! handler starts, failures and ends as lines on its standard output, with the system clock (shared
//! by the processes of one machine), before each acknowledgement. A killed child's lines
//! are in the pipe already, so the order checker sees all it did.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{EndKind, OrderChecker, Record, Summary, Violation};
use crate::handler::Event;

/// Nanoseconds since 1970 on the system clock.
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// A child process running this test binary's ignored test, and the lines it printed.
/// Dropping it kills the child.
#[derive(Debug)]
pub struct ChildTest {
    /// The process.
    pub child: Child,
    /// Its standard output, a line at a time, as it comes.
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl ChildTest {
    /// This test binary run again as a child process on the ignored test `test`, with
    /// `value` in the environment variable `var`.
    pub fn spawn(test: &str, var: &str, value: String) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                test,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(var, value)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a child process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().push(line);
            }
        });
        Self { child, lines }
    }

    /// Whether the child printed a line ending with `what` (the test harness may print
    /// `test name ... ` before the child's first line).
    pub fn said(&self, what: &str) -> bool {
        self.lines.lock().iter().any(|l| l.ends_with(what))
    }

    /// How many handler ends the child reported.
    pub fn ends(&self) -> usize {
        self.lines
            .lock()
            .iter()
            .filter(|l| l.starts_with("E "))
            .count()
    }

    /// The child's start and end records as member `m`, with their system-clock times.
    pub fn records(&self, m: u32) -> Vec<(u128, Record)> {
        let mut out = Vec::new();
        for line in self.lines.lock().iter() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["S", t, a, v, dc, attempt] => out.push((
                    t.parse().expect("time"),
                    Record::Start {
                        t: 0,
                        a: (*a).to_owned(),
                        v: v.parse().expect("version"),
                        m,
                        delivery_count: dc.parse().expect("count"),
                        attempt: attempt.parse().expect("attempt"),
                    },
                )),
                ["F", t, a, v] => out.push((
                    t.parse().expect("time"),
                    Record::Fail {
                        t: 0,
                        a: (*a).to_owned(),
                        v: v.parse().expect("version"),
                        m,
                    },
                )),
                ["E", t, a, v] => out.push((
                    t.parse().expect("time"),
                    Record::End {
                        t: 0,
                        a: (*a).to_owned(),
                        v: v.parse().expect("version"),
                        m,
                        kind: EndKind::Ok,
                    },
                )),
                _ => {}
            }
        }
        out
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The space-separated arguments a child process gets in `var` (`None` when it is not a
/// child).
pub fn child_args(var: &str) -> Option<Vec<String>> {
    let args = std::env::var(var).ok()?;
    Some(args.split(' ').map(str::to_owned).collect())
}

fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes()).expect("stdout");
    out.flush().expect("stdout");
}

/// Reports a handler start (in a child process), one whole line.
pub fn report_start(e: &Event) {
    line(&format!(
        "S {} {} {} {} {}\n",
        now_nanos(),
        e.aggregate_id,
        e.event_version,
        e.delivery_count,
        e.attempt
    ));
}

/// Reports a failed handler attempt (in a child process), one whole line.
pub fn report_fail(e: &Event) {
    line(&format!(
        "F {} {} {}\n",
        now_nanos(),
        e.aggregate_id,
        e.event_version
    ));
}

/// Reports a successful handler end (in a child process), one whole line, before the
/// acknowledgement.
pub fn report_end(e: &Event) {
    line(&format!(
        "E {} {} {}\n",
        now_nanos(),
        e.aggregate_id,
        e.event_version
    ));
}

/// How many distinct (aggregate, version) pairs the children reported handled.
pub fn distinct_ends(children: &[ChildTest]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for child in children {
        for (_, r) in child.records(0) {
            if let Record::End { a, v, .. } = r {
                seen.insert((a, v));
            }
        }
    }
    seen.len()
}

/// Runs the order checker over the records of every child (child `i` as member `i`) and
/// the crashes (`(member, time)`, system clock): records up to `quiet_at` are imported
/// before the run is marked quiescent, later ones after (C6 catches them).
pub fn check_children(
    checker: &OrderChecker,
    children: &[ChildTest],
    crashes: &[(u32, u128)],
    quiet_at: u128,
) -> Result<Summary, Violation> {
    let mut records: Vec<(u128, Record)> = Vec::new();
    for (m, child) in (0u32..).zip(children) {
        records.extend(child.records(m));
    }
    for (m, at) in crashes {
        records.push((*at, Record::Crash { t: 0, m: *m }));
    }
    records.sort_by_key(|(t, _)| *t);
    let after = records.partition_point(|(t, _)| *t <= quiet_at);
    let late = records.split_off(after);
    checker.import(records.into_iter().map(|(_, r)| r));
    checker.quiescent();
    checker.import(late.into_iter().map(|(_, r)| r));
    checker.check()
}
