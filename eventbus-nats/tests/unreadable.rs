//! Messages the client library cannot read: a header value that is not UTF-8, written by a
//! raw client into a domain stream. async-nats drops its connection on such a frame; the
//! bus must still handle everything else in order, dead-letter the unreadable message,
//! keep publishing, and replay and append past it.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use dualbus_core::conformance::{event, next_raw, unique_topic, wait_for};
use dualbus_core::{DomainBus, DomainTransport, Event, HandleError, SubscriptionSpec, handler_fn};
use dualbus_nats::JetStream;
use dualbus_nats::subject::publish_subject;
use parking_lot::Mutex;
use support::{fast_config, shared_url};

/// Writes one message with a raw header block over a plain TCP connection (`HPUB`), the
/// way a producer in any language can, and waits for the server's `PONG`.
fn raw_hpub(url: &str, subject: &str, header_block: &[u8], body: &[u8]) {
    let addr = url.trim_start_matches("nats://");
    let mut s = TcpStream::connect(addr).expect("raw connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let mut frame = Vec::new();
    frame.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    );
    frame.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            header_block.len(),
            header_block.len() + body.len()
        )
        .as_bytes(),
    );
    frame.extend_from_slice(header_block);
    frame.extend_from_slice(body);
    frame.extend_from_slice(b"\r\nPING\r\n");
    s.write_all(&frame).expect("write");
    line.clear();
    r.read_line(&mut line).expect("PONG");
    assert_eq!(line.trim(), "PONG", "the server refused the frame: {line}");
}

/// CloudEvents headers of `aggregate` at `version`, plus one header whose value is Latin-1
/// (not UTF-8): what a producer in another language may well write.
fn poisoned_block(aggregate: &str, version: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"NATS/1.0\r\n");
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", &format!("poison-{aggregate}-{version}")[..]),
        ("ce-source", "latin1-producer"),
        ("ce-type", "TestEvent"),
        ("ce-time", "2026-03-01T12:30:05Z"),
        ("ce-subject", aggregate),
        ("ce-aggregateversion", &version.to_string()[..]),
    ] {
        b.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    b.extend_from_slice(b"X-Customer: Mu\xf1oz\r\n\r\n");
    b
}

/// Every expected version handled, each next one at most one step past the one before
/// (a rewind after a reconnect may hand some over again, in order), and nothing else.
fn in_order(seen: &[u64], expected: &[u64]) {
    let index = |v: &u64| {
        expected
            .iter()
            .position(|e| e == v)
            .unwrap_or_else(|| panic!("{v} handled, expected only {expected:?}: {seen:?}"))
    };
    let mut reached = None::<usize>;
    for v in seen {
        let i = index(v);
        let next = reached.map_or(0, |r| r + 1);
        assert!(i <= next, "{v} handled out of order: {seen:?}");
        reached = Some(reached.map_or(i, |r| r.max(i)));
    }
    assert_eq!(
        reached,
        Some(expected.len() - 1),
        "not all handled: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_dead_lettered_and_stops_nothing() {
    let Some(url) = shared_url() else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let t = JetStream::connect(fast_config(url.clone()))
        .await
        .expect("connect");
    let bus = DomainBus::builder(t.clone())
        .source("unreadable-tests")
        .build()
        .expect("build");
    let topic = unique_topic("js-unreadable");
    let aggregates = ["a-1", "a-2", "a-3"];
    for v in 1..=3 {
        for a in aggregates {
            bus.publish(&topic, &event(a, v)).await.expect("publish");
        }
    }
    // Version 4 of a-1 arrives unreadable; b-1 ends its history with one.
    raw_hpub(
        &url,
        &publish_subject(&topic, "a-1"),
        &poisoned_block("a-1", 4),
        br#"{"aggregate":"a-1","version":4}"#,
    );
    bus.publish(&topic, &event("b-1", 1))
        .await
        .expect("publish");
    raw_hpub(
        &url,
        &publish_subject(&topic, "b-1"),
        &poisoned_block("b-1", 2),
        br#"{"aggregate":"b-1","version":2}"#,
    );
    for v in 4..=6 {
        for a in aggregates {
            let v = if a == "a-1" { v + 1 } else { v };
            bus.publish(&topic, &event(a, v)).await.expect("publish");
        }
    }

    let handled: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let h = handled.clone();
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |e: Event| {
            let h = h.clone();
            async move {
                h.lock()
                    .entry(e.aggregate_id.clone())
                    .or_default()
                    .push(e.event_version);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    let distinct = |h: &HashMap<String, Vec<u64>>| {
        h.values()
            .map(|v| v.iter().collect::<std::collections::BTreeSet<_>>().len())
            .sum::<usize>()
    };
    wait_for(|| distinct(&handled.lock()) == 19 && sub.stats().dead_lettered == 2).await;
    {
        let h = handled.lock();
        in_order(&h["a-1"], &[1, 2, 3, 5, 6, 7]);
        in_order(&h["a-2"], &[1, 2, 3, 4, 5, 6]);
        in_order(&h["a-3"], &[1, 2, 3, 4, 5, 6]);
        in_order(&h["b-1"], &[1]);
    }
    let s = sub.stats();
    assert_eq!((s.unreadable, s.dead_lettered), (2, 2), "{s:?}");

    // Both are in the dead letter, marked unreadable, with their headers decoded lossily.
    let mut dlq = t
        .subscribe(SubscriptionSpec::new(
            topic.dead_letter(".dlq").expect("topic"),
            "inspect",
        ))
        .await
        .expect("subscribe dead letter");
    let mut dead = Vec::new();
    while dead.len() < 2 {
        match next_raw(&mut dlq).await {
            Some(Ok(d)) => {
                d.ack().await.expect("ack");
                dead.push(d.message);
            }
            Some(Err(_)) => {}
            None => panic!("dead-letter stream ended"),
        }
    }
    for m in &dead {
        assert_eq!(m.headers.get("dualbus-dlq-kind"), Some("unreadable"));
        assert_eq!(m.headers.get("X-Customer"), Some("Mu\u{fffd}oz"));
    }

    // Publishing on the same connection never stopped working; nothing is left pending.
    bus.publish(&topic, &event("a-2", 7))
        .await
        .expect("publish");
    wait_for(|| handled.lock()["a-2"].contains(&7)).await;
    loop {
        match t
            .pending(&topic, "unreadable-tests")
            .await
            .expect("pending")
        {
            Some(0) => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }

    // Replay reads past it (its headers decoded lossily), and an append after it works.
    let versions: Vec<u64> = bus
        .replay(&topic, "a-1")
        .await
        .expect("replay")
        .iter()
        .map(|e| e.event_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7]);
    bus.append(&topic, &event("b-1", 3), 2)
        .await
        .expect("append after an unreadable last event");
    drop(sub);
    bus.close().await.expect("close");
}
