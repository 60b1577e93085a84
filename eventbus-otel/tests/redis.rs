//! The trace through a real Redis: stream entry fields on the domain bus, the pub/sub
//! frame's headers on the simple bus (`DUALBUS_TEST_REDIS_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use dualbus_otel::OtelConfig;
use dualbus_redis::{RedisConfig, RedisPubSub, RedisStreams};
use support::*;

fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.connect_timeout = Duration::from_secs(2);
    c.response_timeout = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_redis_streams() {
    let Some(url) = server("DUALBUS_TEST_REDIS_URL") else {
        return;
    };
    let h = Harness::new(&OtelConfig::default());
    let streams = RedisStreams::connect(config(&url)).await.unwrap();
    let bus = domain_bus(streams, &h);
    domain_trace(&bus, &h, "redis").await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_redis_pubsub() {
    let Some(url) = server("DUALBUS_TEST_REDIS_URL") else {
        return;
    };
    let h = Harness::new(&OtelConfig::default());
    let pubsub = RedisPubSub::connect(config(&url)).await.unwrap();
    simple_trace(pubsub, &h, "redis").await;
}
