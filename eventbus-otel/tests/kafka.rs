//! The trace through a real Kafka broker: the W3C context in Kafka record headers beside
//! the CloudEvents `ce_` headers (`DUALBUS_TEST_KAFKA_BOOTSTRAP`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use dualbus_kafka::{Kafka, KafkaConfig};
use dualbus_otel::OtelConfig;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_kafka() {
    let Some(bootstrap) = server("DUALBUS_TEST_KAFKA_BOOTSTRAP") else {
        return;
    };
    let mut c = KafkaConfig::new([bootstrap.as_str()]);
    c.topics.partitions = 2;
    c.topics.replication = 1;
    c.consumer.session_timeout = Duration::from_secs(3);
    c.consumer.commit_interval = Duration::from_millis(100);
    c.request_timeout = Duration::from_secs(10);
    c.producer.linger = Duration::from_millis(1);
    let h = Harness::new(&OtelConfig::default());
    let kafka = Kafka::connect(c).await.unwrap();
    let bus = domain_bus(kafka, &h);
    let spans = domain_trace(&bus, &h, "kafka").await;
    // The receipt's offset is on the `send` span.
    assert!(
        spans
            .iter()
            .any(|s| s.name.starts_with("send ") && attr(s, "messaging.kafka.offset").is_some())
    );
    bus.close().await.unwrap();
}
