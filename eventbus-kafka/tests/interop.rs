//! Other Kafka clients on the bus's topics: `kcat` (Debian's, on librdkafka 2.0) reads our
//! records with key and headers intact and writes records the bus reads (and one whose
//! header name is not UTF-8, which it dead-letters); the Python `confluent-kafka` client
//! with the CloudEvents SDK reads our events as CloudEvents.
//!
//! `scripts/test.sh` installs kcat and a Python environment with both packages
//! (`DUALBUS_PYTHON`). Without them the tests are skipped, unless
//! `DUALBUS_TEST_REQUIRE_SERVERS` is set: then they fail.

#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)] // Test code.

mod support;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::{event, next_raw, unique_topic, wait_for};
use dualbus_core::pool::dlq_headers;
use dualbus_core::{DomainBus, DomainTransport, Event, HandleError, SubscriptionSpec, Topic};
use dualbus_kafka::Kafka;
use parking_lot::Mutex;

fn required() -> bool {
    std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some()
}

fn kcat() -> Option<&'static str> {
    let ok = Command::new("kcat")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match (ok, required()) {
        (true, _) => Some("kcat"),
        (false, true) => panic!("kcat is missing (scripts/test.sh installs it)"),
        (false, false) => {
            eprintln!("skipped: kcat is not installed");
            None
        }
    }
}

fn python() -> Option<String> {
    let py = std::env::var("DUALBUS_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = Command::new(&py)
        .args(["-c", "import confluent_kafka, cloudevents.v1.kafka"])
        .status()
        .is_ok_and(|s| s.success());
    match (ok, required()) {
        (true, _) => Some(py),
        (false, true) => {
            panic!("{py} lacks confluent-kafka or cloudevents (scripts/test.sh installs them)")
        }
        (false, false) => {
            eprintln!("skipped: no Python with confluent-kafka and cloudevents");
            None
        }
    }
}

async fn bus(bootstrap: &str) -> (DomainBus, Kafka) {
    let mut c = support::fast_config(bootstrap);
    c.topics.partitions = 1;
    let kafka = Kafka::connect(c).await.expect("connect");
    let bus = DomainBus::builder(kafka.clone())
        .source("interop-tests")
        .build()
        .expect("bus");
    (bus, kafka)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_reads_our_records() {
    let (Some(b), Some(kcat)) = (support::shared_bootstrap(), kcat()) else {
        return;
    };
    let (bus, _) = bus(&b).await;
    let topic = unique_topic("kcat-read");
    for v in 1..=3 {
        let e = event("order-7", v)
            .with_correlation_id("corr-1")
            .with_header("note", "café");
        bus.publish(topic.as_str(), &e).await.expect("publish");
    }
    let out = Command::new(kcat)
        .args([
            "-C",
            "-b",
            &b,
            "-t",
            topic.as_str(),
            "-o",
            "beginning",
            "-c",
            "3",
            "-e",
            "-q",
        ])
        .args(["-f", "%k\t%h\t%s\n"])
        .output()
        .expect("kcat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (v, line) in (1..).zip(lines) {
        let [key, headers, payload] = line.splitn(3, '\t').collect::<Vec<_>>()[..] else {
            panic!("{line}");
        };
        assert_eq!(key, "order-7");
        for h in [
            "ce_specversion=1.0",
            "ce_type=TestEvent",
            "ce_subject=order-7",
            "ce_source=interop-tests",
            &format!("ce_aggregateversion={v}"),
            "ce_correlationid=corr-1",
            "ce_partitionkey=order-7",
            "content-type=application/json",
            "note=café",
        ] {
            assert!(headers.split(',').any(|x| x == h), "{h} not in {headers}");
        }
        assert!(headers.contains("ce_id="), "{headers}");
        assert_eq!(
            payload,
            format!(r#"{{"aggregate":"order-7","version":{v}}}"#)
        );
    }
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_kcat_writes_are_read_or_dead_lettered() {
    let (Some(b), Some(kcat)) = (support::shared_bootstrap(), kcat()) else {
        return;
    };
    let (bus, kafka) = bus(&b).await;
    let topic = unique_topic("kcat-write");
    // The topic exists with our settings before kcat writes to it.
    bus.publish(topic.as_str(), &event("order-9", 1))
        .await
        .expect("publish");
    let produce = |key: &str, headers: Vec<OsString>, body: &str| {
        let mut cmd = Command::new(kcat);
        cmd.args(["-P", "-b", &b, "-t", topic.as_str(), "-k", key]);
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("kcat -P");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("write");
        assert!(child.wait().expect("kcat").success());
    };
    let ce = |v: u64, id: &str| -> Vec<OsString> {
        [
            "ce_specversion=1.0".to_owned(),
            format!("ce_id={id}"),
            "ce_source=kcat".to_owned(),
            "ce_type=OrderShipped".to_owned(),
            "ce_subject=order-9".to_owned(),
            format!("ce_aggregateversion={v}"),
            "ce_time=2026-12-02T10:00:00Z".to_owned(),
            "content-type=application/json".to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect()
    };
    produce("order-9", ce(2, "kcat-2"), r#"{"carrier":"post"}"#);
    // A header name that is not UTF-8 (Latin-1 bytes), then the next event.
    let mut bad = ce(3, "kcat-3");
    bad.push(OsString::from_vec(b"caf\xe9=1".to_vec()));
    produce("order-9", bad, r#"{"carrier":"other"}"#);
    produce("order-9", ce(3, "kcat-3b"), r#"{"carrier":"other"}"#);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let sub = bus
        .subscribe(topic.as_str())
        .group("kcat")
        .start(dualbus_core::handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                s.lock()
                    .push((e.event_version, e.event_type.clone(), e.event_id.clone()));
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    wait_for(|| seen.lock().len() == 3).await;
    let seen = seen.lock().clone();
    assert_eq!(seen[1], (2, "OrderShipped".to_owned(), "kcat-2".to_owned()));
    assert_eq!(seen[2].2, "kcat-3b");
    let dlq = Topic::new(format!("{}.dlq", topic.as_str())).expect("topic");
    let mut dead = kafka
        .subscribe(SubscriptionSpec::new(dlq, "dlq"))
        .await
        .expect("subscribe");
    let d = tokio::time::timeout(Duration::from_secs(30), next_raw(&mut dead))
        .await
        .expect("a dead letter")
        .expect("open")
        .expect("delivery");
    let h = &d.message.headers;
    assert_eq!(h.get(dlq_headers::KIND), Some("unreadable"), "{h:?}");
    assert_eq!(
        h.get(dlq_headers::REASON),
        Some("a header name is not UTF-8"),
        "{h:?}"
    );
    drop(dead);
    sub.shutdown().await;
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cloudevents_sdk_reads_our_events() {
    let (Some(b), Some(py)) = (support::shared_bootstrap(), python()) else {
        return;
    };
    let (bus, _) = bus(&b).await;
    let topic = unique_topic("python-read");
    let mut ids = Vec::new();
    for v in 1..=3 {
        let e = event("cart-3", v).with_correlation_id("corr-9");
        ids.push(e.event_id.clone());
        bus.publish(topic.as_str(), &e).await.expect("publish");
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/read_cloudevents.py"
    );
    let out = tokio::task::spawn_blocking({
        let (b, t) = (b.clone(), topic.as_str().to_owned());
        move || {
            Command::new(py)
                .args([script, &b, &t, "3"])
                .output()
                .expect("python")
        }
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("the script's JSON");
    assert_eq!(events.len(), 3, "{events:?}");
    for ((v, id), e) in (1..).zip(&ids).zip(&events) {
        let a = &e["attributes"];
        assert_eq!(e["key"], "cart-3");
        assert_eq!(a["id"], id.as_str());
        assert_eq!(a["specversion"], "1.0");
        assert_eq!(a["type"], "TestEvent");
        assert_eq!(a["source"], "interop-tests");
        assert_eq!(a["subject"], "cart-3");
        assert_eq!(a["partitionkey"], "cart-3");
        assert_eq!(a["aggregateversion"], v.to_string());
        assert_eq!(a["correlationid"], "corr-9");
        assert_eq!(a["datacontenttype"], "application/json");
        assert_eq!(e["data"]["version"], v);
    }
    bus.close().await.expect("close");
}
