//! Fault tests of the JetStream domain bus: servers of their own, killed and restarted
//! mid-stream.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dualbus_core::conformance::{OrderChecker, event, unique_topic, wait_for};
use dualbus_core::{DomainBus, DomainTransport as _, Event, HandleError, handler_fn};
use dualbus_nats::JetStream;
use support::{Server, fast_config, server_binary};

const AGGREGATES: usize = 50;
const VERSIONS: u64 = 200;

async fn connect(url: &str) -> DomainBus {
    // The first connection after a restart may race the server's JetStream recovery.
    let mut tries = 0;
    loop {
        match JetStream::connect(fast_config(url.to_owned())).await {
            Ok(t) => {
                return DomainBus::builder(t)
                    .source("faults")
                    .build()
                    .expect("build domain bus");
            }
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// 10,000 envelopes over 50 aggregates while the server is killed (SIGKILL) and restarted
/// twice: every acknowledged publish is handled at least once and the order checker finds
/// each aggregate's events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_lose_nothing_and_keep_order() {
    let Some(bin) = server_binary() else { return };
    let mut server = Server::start(bin);
    let url = server.url();
    let publisher = connect(&url).await;
    let consumer = connect(&url).await;
    let topic = unique_topic("faults-restart");
    let checker = OrderChecker::new();
    let sub = consumer
        .subscribe(&topic)
        .observer(checker.observer(0))
        .start(checker.wrap(
            0,
            handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }),
        ))
        .await
        .expect("subscribe");

    let published = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..AGGREGATES {
        let bus = publisher.clone();
        let topic = topic.clone();
        let checker = checker.clone();
        let published = published.clone();
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let a = format!("agg-{i}");
            for v in 1..=VERSIONS {
                // One envelope, one event id: a retry after an unclear failure is
                // deduplicated by the server.
                let e = event(&a, v);
                loop {
                    match bus.publish(&topic, &e).await {
                        Ok(_) => break,
                        Err(err) => {
                            assert!(err.is_retryable(), "publish {a} v{v}: {err}");
                            failures.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                checker.published(&a, v);
                published.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let total = AGGREGATES * VERSIONS as usize;
    let run = async {
        for at in [total / 3, 2 * total / 3] {
            wait_for(|| published.load(Ordering::Relaxed) >= at).await;
            server.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
            eprintln!(
                "server restarted after {} publishes",
                published.load(Ordering::Relaxed)
            );
        }
        for t in tasks {
            t.await.expect("publisher task");
        }
        wait_for(|| checker.distinct_ends() == total).await;
        loop {
            match consumer.transport().pending(&topic, "faults").await {
                Ok(Some(0)) => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    // Every 10 s, where the run is: which side a stall is on.
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if let Ok(c) = async_nats::connect(url.as_str()).await {
                let js = async_nats::jetstream::new(c);
                let name = dualbus_nats::jetstream::stream_name("DUALBUS_", topic.as_str());
                if let Ok(mut st) = js.get_stream(name).await {
                    let c: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                        st.get_consumer("faults").await;
                    if let Ok(mut c) = c {
                        eprintln!(
                            "consumer: {:?}",
                            c.info().await.map(|i| (
                                i.delivered.stream_sequence,
                                i.ack_floor.stream_sequence,
                                i.num_ack_pending,
                                i.num_pending,
                                i.num_waiting,
                                i.num_redelivered
                            ))
                        );
                    }
                    eprintln!("stream: {:?}", st.info().await.map(|i| i.state.messages));
                }
            }
            eprintln!(
                "progress: {} published, {} handled; pending {:?}; {:?}",
                published.load(Ordering::Relaxed),
                checker.distinct_ends(),
                tokio::time::timeout(
                    Duration::from_secs(2),
                    consumer.transport().pending(&topic, "faults")
                )
                .await,
                sub.stats()
            );
        }
    };
    tokio::select! {
        () = run => {}
        () = watch => {}
        () = tokio::time::sleep(Duration::from_secs(300)) => panic!("the run did not finish within 300 s"),
    }
    checker.quiescent();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = checker
        .check()
        .unwrap_or_else(|v| panic!("order checker: {v}"));
    eprintln!(
        "handled {} events ({} duplicates); {} publish attempts failed and were retried",
        total,
        summary.duplicates,
        failures.load(Ordering::Relaxed)
    );
    let report = sub.shutdown().await;
    eprintln!("{report:?}");
    publisher.close().await.expect("close");
    consumer.close().await.expect("close");
}
