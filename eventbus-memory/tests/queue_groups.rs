//! Queue groups of the simple bus on memory: members share the load, each message reaches
//! exactly one member, and a member that leaves hands its buffered messages to the others.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dualbus_core::{
    HandleError, Message, SimpleBus, SimpleOutbound, SimpleTransport, Topic, handler_fn,
};
use dualbus_memory::{Memory, MemoryConfig};
use futures::StreamExt as _;
use parking_lot::Mutex;

/// On a real clock, one thread: two members, a handler that takes 1 ms, 1,000 messages.
/// Each member gets between 30% and 70%, each message once. (With one channel shared by
/// the group, the first member to run took all 1,000: its subscription reads up to 1,024
/// messages into concurrent handlers before the other gets a turn.)
#[tokio::test]
async fn members_share_the_load() {
    share_the_load().await;
}

/// The same on two threads, where both members read at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_the_load_on_two_threads() {
    share_the_load().await;
}

async fn share_the_load() {
    let bus = SimpleBus::builder(Memory::new()).build().expect("build");
    let mut members = Vec::new();
    for _ in 0..2 {
        let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let s = seen.clone();
        let sub = bus
            .subscribe("work")
            .queue_group("workers")
            .start(handler_fn(move |m: Message| {
                let s = s.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    s.lock().push(m.payload);
                    Ok::<_, HandleError>(())
                }
            }))
            .await
            .expect("subscribe");
        members.push((sub, seen));
    }
    const N: usize = 1000;
    for i in 0..N {
        bus.publish("work", format!("m{i}")).await.expect("publish");
    }
    // A guard against a hang only (the handlers take about a millisecond, concurrently).
    tokio::time::timeout(Duration::from_secs(30), async {
        while members.iter().map(|(_, s)| s.lock().len()).sum::<usize>() < N {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every message handled");
    let mut count: HashMap<Bytes, usize> = HashMap::new();
    for (_, s) in &members {
        for p in s.lock().iter() {
            *count.entry(p.clone()).or_default() += 1;
        }
    }
    assert_eq!(count.len(), N, "messages were lost");
    assert!(
        count.values().all(|c| *c == 1),
        "a message reached two members"
    );
    let shares: Vec<usize> = members.iter().map(|(_, s)| s.lock().len()).collect();
    for share in &shares {
        assert!(
            (300..=700).contains(share),
            "the members got {shares:?} of {N}: the load is not shared"
        );
    }
    bus.close().await.expect("close");
}

/// Below the bus: a member that stops reading fills its buffer and gets no more (the
/// others take the rest, the publisher does not wait for it); when it leaves, what its
/// buffer held goes to the others. Nothing is lost, nothing duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_member_is_skipped_and_hands_over_when_it_leaves() {
    let broker =
        Memory::with_config(MemoryConfig::default().with_simple_buffer(8)).expect("config");
    let jobs = Topic::new("jobs").expect("topic");
    let stalled = SimpleTransport::subscribe(&broker, &jobs, Some("g"))
        .await
        .expect("subscribe");
    let mut active = SimpleTransport::subscribe(&broker, &jobs, Some("g"))
        .await
        .expect("subscribe");
    let got: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let g = got.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = active.next().await {
            g.lock().push(m.payload);
        }
    });
    const N: usize = 200;
    tokio::time::timeout(Duration::from_secs(30), async {
        for i in 0..N {
            let m = SimpleOutbound::new(
                Message::new("jobs", format!("j{i}")),
                SimpleTransport::capabilities(&broker),
            )
            .expect("checked");
            SimpleTransport::publish(&broker, m).await.expect("publish");
        }
    })
    .await
    .expect("the publisher is not held up by the stalled member");
    let wait_for = |n: usize| {
        let got = got.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                while got.lock().len() < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("messages arrive");
        }
    };
    // The stalled member holds at most its buffer; the active one got the rest.
    wait_for(N - 8).await;
    drop(stalled);
    wait_for(N).await;
    let mut payloads = got.lock().clone();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), N, "lost or duplicated after the hand-over");
    assert_eq!(got.lock().len(), N);
    reader.abort();
}
