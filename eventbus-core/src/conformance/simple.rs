//! Simple-bus conformance tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{Backend, unique_topic, wait_for};
use crate::error::{Error, ErrorKind, HandleError};
use crate::handler::handler_fn;
use crate::headers::Headers;
use crate::message::Message;
use crate::simple::{SimpleBus, SimpleSubscription};

async fn bus(backend: &dyn Backend) -> SimpleBus {
    let t = backend.simple().await.expect("connect simple transport");
    crate::simple::SimpleBusBuilder::from_dyn(t)
        .build()
        .expect("build simple bus")
}

type Seen = Arc<Mutex<Vec<Message>>>;

async fn collect(bus: &SimpleBus, topic: &str, group: Option<&str>) -> (SimpleSubscription, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let mut b = bus.subscribe(topic);
    if let Some(g) = group {
        b = b.queue_group(g);
    }
    let sub = b
        .start(handler_fn(move |m: Message| {
            let s = s.clone();
            async move {
                s.lock().push(m);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .expect("subscribe");
    (sub, seen)
}

/// A subscriber is in place when a probe published after it arrives; probes are filtered
/// out of the counts by their `probe` header.
async fn ready(bus: &SimpleBus, topic: &str, seen: &[&Seen]) {
    let mut h = Headers::new();
    h.insert("probe", "1");
    loop {
        bus.publish_message(Message::new(topic, "probe").with_headers(h.clone()))
            .await
            .expect("publish probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if seen
            .iter()
            .all(|s| s.lock().iter().any(|m| m.headers.contains("probe")))
        {
            return;
        }
    }
}

fn payloads(seen: &Seen) -> Vec<Bytes> {
    seen.lock()
        .iter()
        .filter(|m| !m.headers.contains("probe"))
        .map(|m| m.payload.clone())
        .collect()
}

/// Payload and headers arrive intact, in a single subscriber's publish order.
pub async fn publish_subscribe(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-ps");
    let (_sub, seen) = collect(&bus, &topic, None).await;
    ready(&bus, &topic, &[&seen]).await;
    let mut headers = Headers::new();
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    headers.insert("x-tenant", "tenant ü 1");
    let payload = Bytes::from_static(b"\x00binary\xffpayload");
    bus.publish_message(
        Message::new(topic.as_str(), payload.clone()).with_headers(headers.clone()),
    )
    .await
    .expect("publish");
    wait_for(|| payloads(&seen).len() == 1).await;
    let got = seen
        .lock()
        .iter()
        .find(|m| !m.headers.contains("probe"))
        .cloned()
        .expect("one message");
    assert_eq!(got.payload, payload);
    assert_eq!(got.topic, topic);
    for (n, v) in headers.iter() {
        assert_eq!(got.headers.get(n), Some(v), "header {n} not intact");
    }
    bus.close().await.expect("close");
}

/// Every subscriber receives every message.
pub async fn fan_out(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-fan");
    let (_a, seen_a) = collect(&bus, &topic, None).await;
    let (_b, seen_b) = collect(&bus, &topic, None).await;
    ready(&bus, &topic, &[&seen_a, &seen_b]).await;
    const N: usize = 200;
    for i in 0..N {
        bus.publish(&topic, format!("m{i}")).await.expect("publish");
    }
    wait_for(|| payloads(&seen_a).len() >= N && payloads(&seen_b).len() >= N).await;
    for seen in [&seen_a, &seen_b] {
        let mut got: Vec<Bytes> = payloads(seen);
        got.sort();
        let mut want: Vec<Bytes> = (0..N).map(|i| Bytes::from(format!("m{i}"))).collect();
        want.sort();
        assert_eq!(got, want, "a subscriber missed or duplicated messages");
    }
    bus.close().await.expect("close");
}

/// Each message goes to exactly one member of a queue group, while a plain subscriber still
/// sees all. A backend without queue groups refuses them.
pub async fn queue_groups(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-queue");
    if !bus.capabilities().queue_groups {
        let e = bus
            .subscribe(&topic)
            .queue_group("workers")
            .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
            .await
            .expect_err("queue groups are not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(collect(&bus, &topic, Some("workers")).await);
    }
    let (_plain, all) = collect(&bus, &topic, None).await;
    // Probe until the group and the plain subscriber both receive.
    let group_seen: Vec<Seen> = members.iter().map(|(_, s)| s.clone()).collect();
    loop {
        let mut h = Headers::new();
        h.insert("probe", "1");
        bus.publish_message(Message::new(topic.as_str(), "probe").with_headers(h))
            .await
            .expect("probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let group_got = group_seen
            .iter()
            .any(|s| s.lock().iter().any(|m| m.headers.contains("probe")));
        if group_got && all.lock().iter().any(|m| m.headers.contains("probe")) {
            break;
        }
    }
    const N: usize = 300;
    for i in 0..N {
        bus.publish(&topic, format!("q{i}")).await.expect("publish");
    }
    wait_for(|| {
        group_seen.iter().map(|s| payloads(s).len()).sum::<usize>() >= N
            && payloads(&all).len() >= N
    })
    .await;
    tokio::time::sleep(backend.settings().quiet).await;
    let mut count: HashMap<Bytes, usize> = HashMap::new();
    for s in &group_seen {
        for p in payloads(s) {
            *count.entry(p).or_default() += 1;
        }
    }
    assert_eq!(count.len(), N, "the group missed messages");
    assert!(
        count.values().all(|c| *c == 1),
        "a message reached two group members"
    );
    assert_eq!(
        payloads(&all).len(),
        N,
        "the plain subscriber missed messages"
    );
    bus.close().await.expect("close");
}

/// Members of a queue group share the load: with a handler that takes a millisecond, each
/// of two members gets between 30% and 70% of 1,000 messages, and every message reaches
/// exactly one of them. (A member that took everything while the other idled would pass
/// the exactly-once check of [`queue_groups`] but fail this one.)
pub async fn queue_group_load_sharing(backend: &dyn Backend) {
    let bus = bus(backend).await;
    if !bus.capabilities().queue_groups {
        return;
    }
    let topic = unique_topic("simple-queue-share");
    let mut members = Vec::new();
    for _ in 0..2 {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let sub = bus
            .subscribe(&topic)
            .queue_group("sharing")
            .start(handler_fn(move |m: Message| {
                let s = s.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    s.lock().push(m);
                    Ok::<_, HandleError>(())
                }
            }))
            .await
            .expect("subscribe");
        members.push((sub, seen));
    }
    // Probe until the group receives (both members are in place once subscribe returned).
    loop {
        let mut h = Headers::new();
        h.insert("probe", "1");
        bus.publish_message(Message::new(topic.as_str(), "probe").with_headers(h))
            .await
            .expect("probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if members
            .iter()
            .any(|(_, s)| s.lock().iter().any(|m| m.headers.contains("probe")))
        {
            break;
        }
    }
    const N: usize = 1000;
    for i in 0..N {
        bus.publish(&topic, format!("s{i}")).await.expect("publish");
    }
    wait_for(|| {
        members
            .iter()
            .map(|(_, s)| payloads(s).len())
            .sum::<usize>()
            >= N
    })
    .await;
    tokio::time::sleep(backend.settings().quiet).await;
    let mut count: HashMap<Bytes, usize> = HashMap::new();
    for (_, s) in &members {
        for p in payloads(s) {
            *count.entry(p).or_default() += 1;
        }
    }
    assert_eq!(count.len(), N, "the group missed messages");
    assert!(
        count.values().all(|c| *c == 1),
        "a message reached two group members"
    );
    let shares: Vec<usize> = members.iter().map(|(_, s)| payloads(s).len()).collect();
    for share in &shares {
        assert!(
            (N * 3 / 10..=N * 7 / 10).contains(share),
            "the members got {shares:?} of {N} messages: the load is not shared"
        );
    }
    bus.close().await.expect("close");
}

/// A subscriber of one topic sees nothing of another.
pub async fn topic_isolation(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let a = unique_topic("simple-iso-a");
    let b = format!("{a}.b");
    let (_sa, seen_a) = collect(&bus, &a, None).await;
    let (_sb, seen_b) = collect(&bus, &b, None).await;
    ready(&bus, &a, &[&seen_a]).await;
    ready(&bus, &b, &[&seen_b]).await;
    for i in 0..50 {
        bus.publish(&a, format!("a{i}")).await.expect("publish a");
        bus.publish(&b, format!("b{i}")).await.expect("publish b");
    }
    wait_for(|| payloads(&seen_a).len() >= 50 && payloads(&seen_b).len() >= 50).await;
    tokio::time::sleep(backend.settings().quiet).await;
    assert!(
        payloads(&seen_a).iter().all(|p| p.starts_with(b"a")),
        "topic a got b's messages"
    );
    assert!(
        payloads(&seen_b).iter().all(|p| p.starts_with(b"b")),
        "topic b got a's messages"
    );
    assert_eq!(payloads(&seen_a).len(), 50);
    assert_eq!(payloads(&seen_b).len(), 50);
    bus.close().await.expect("close");
}

/// Request-reply answers, times out without a reply, and reports missing responders.
pub async fn request_reply(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-rr");
    if !bus.capabilities().request_reply {
        let e = bus
            .request(&topic, "x", Duration::from_millis(100))
            .await
            .expect_err("request-reply is not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    // Responders in a queue group where the backend has them (one answer per request);
    // one plain responder otherwise.
    let group = bus.capabilities().queue_groups.then_some("responders");
    let _server = bus
        .serve(
            &topic,
            group,
            handler_fn(|m: Message| async move {
                let mut reply = b"re:".to_vec();
                reply.extend_from_slice(&m.payload);
                Ok::<_, HandleError>(Bytes::from(reply))
            }),
        )
        .await
        .expect("serve");
    let mut answered = 0;
    for i in 0..20 {
        // The responder may need a moment to be in place: retry on no-responders.
        loop {
            match bus
                .request(&topic, format!("q{i}"), Duration::from_secs(2))
                .await
            {
                Ok(reply) => {
                    assert_eq!(reply.payload, Bytes::from(format!("re:q{i}")));
                    answered += 1;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::NoResponders || e.kind() == ErrorKind::Timeout => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("request failed: {e}"),
            }
        }
    }
    assert_eq!(answered, 20);
    // A responder that never answers: a timeout.
    let silent = unique_topic("simple-rr-silent");
    let (_s, _seen) = collect(&bus, &silent, None).await;
    let e = bus
        .request(&silent, "x", Duration::from_millis(200))
        .await
        .expect_err("nobody replies");
    assert!(matches!(e.kind(), ErrorKind::Timeout), "{e}");
    bus.close().await.expect("close");
}

/// Handler errors and panics are counted, not fatal: later messages are still handled.
pub async fn handler_failures(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-fail");
    let ok = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let (o, p) = (ok.clone(), probes.clone());
    let sub = bus
        .subscribe(&topic)
        .start(handler_fn(move |m: Message| {
            let (o, p) = (o.clone(), p.clone());
            async move {
                if m.headers.contains("probe") {
                    p.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                match &m.payload[..] {
                    b"fail" => Err(HandleError::msg("refused")),
                    b"panic" => panic!("handler bug"),
                    _ => {
                        o.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                }
            }
        }))
        .await
        .expect("subscribe");
    loop {
        let mut h = Headers::new();
        h.insert("probe", "1");
        bus.publish_message(Message::new(topic.as_str(), "p").with_headers(h))
            .await
            .expect("probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if probes.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    let base = sub.stats();
    for p in ["fail", "ok", "panic", "ok", "fail", "ok"] {
        bus.publish(&topic, p).await.expect("publish");
    }
    wait_for(|| sub.stats().received - base.received >= 6 && ok.load(Ordering::SeqCst) == 3).await;
    wait_for(|| sub.stats().failed - base.failed == 3).await;
    bus.close().await.expect("close");
}

/// Bad input gets a clear error, never a panic.
pub async fn bad_input(backend: &dyn Backend) {
    let bus = bus(backend).await;
    for topic in ["", "has space", "a..b", "wild*", "trailing."] {
        let e = bus
            .publish(topic, "x")
            .await
            .expect_err("bad topic accepted");
        assert!(matches!(e, Error::InvalidTopic { .. }), "{topic:?}: {e}");
        let e = bus
            .subscribe(topic)
            .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
            .await
            .expect_err("bad topic accepted");
        assert!(matches!(e, Error::InvalidTopic { .. }), "{topic:?}: {e}");
    }
    let max = bus.capabilities().max_payload;
    let e = bus
        .publish("big", vec![0u8; max + 1])
        .await
        .expect_err("oversized payload accepted");
    assert!(matches!(e, Error::PayloadTooLarge { .. }), "{e}");
    let mut h = Headers::new();
    h.insert("x-bad", "line\r\nbreak");
    let e = bus
        .publish_message(Message::new("t", "x").with_headers(h))
        .await
        .expect_err("CR/LF header accepted");
    assert!(matches!(e, Error::InvalidHeader { .. }), "{e}");
    bus.close().await.expect("close");
}

/// Double and concurrent close are safe; afterwards operations fail with `Closed`.
pub async fn close(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("simple-close");
    let (_sub, _seen) = collect(&bus, &topic, None).await;
    let (a, b) = tokio::join!(bus.close(), bus.close());
    a.expect("first close");
    b.expect("concurrent close");
    bus.close().await.expect("third close");
    let e = bus
        .publish(&topic, "x")
        .await
        .expect_err("publish after close");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    let e = bus
        .subscribe(&topic)
        .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
        .await
        .expect_err("subscribe after close");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    // A new client of the same broker is unaffected.
    let again = self::bus(backend).await;
    again
        .publish(&topic, "x")
        .await
        .expect("another client still publishes");
    again.close().await.expect("close");
}
