//! The trace through a real NATS server: JetStream headers on the domain bus, core NATS
//! headers on the simple bus (`DUALBUS_TEST_NATS_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use dualbus_nats::{JetStream, JetStreamConfig, Nats, NatsConfig};
use dualbus_otel::OtelConfig;
use support::*;

fn config(url: String) -> NatsConfig {
    let mut js = JetStreamConfig::default();
    js.consumer.ack_wait = Duration::from_secs(2);
    js.request_timeout = Duration::from_secs(5);
    NatsConfig::new([url]).with_jetstream(js)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_jetstream() {
    let Some(url) = server("DUALBUS_TEST_NATS_URL") else {
        return;
    };
    let h = Harness::new(&OtelConfig::default());
    let js = JetStream::connect(config(url)).await.unwrap();
    let bus = domain_bus(js, &h);
    domain_trace(&bus, &h, "nats").await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_core_nats() {
    let Some(url) = server("DUALBUS_TEST_NATS_URL") else {
        return;
    };
    let h = Harness::new(&OtelConfig::default());
    let nats = Nats::connect(config(url)).await.unwrap();
    simple_trace(nats, &h, "nats").await;
}
