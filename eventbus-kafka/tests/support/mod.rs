//! The test broker: its bootstrap address (a broker started by `scripts/test.sh`) and the
//! fast settings of the tests.

#![allow(dead_code, clippy::expect_used, clippy::panic)] // Test code; not every test uses all.

pub(crate) mod broker;

use std::time::Duration;

use dualbus_kafka::KafkaConfig;

/// The shared broker of the test run (`DUALBUS_TEST_KAFKA_BOOTSTRAP`, set by
/// `scripts/test.sh`). Without it the test is skipped, unless
/// `DUALBUS_TEST_REQUIRE_SERVERS` is set: then it fails.
pub(crate) fn shared_bootstrap() -> Option<String> {
    match std::env::var("DUALBUS_TEST_KAFKA_BOOTSTRAP") {
        Ok(u) => Some(u),
        Err(_) if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => {
            panic!("DUALBUS_TEST_KAFKA_BOOTSTRAP is not set but DUALBUS_TEST_REQUIRE_SERVERS is")
        }
        Err(_) => {
            eprintln!("skipped: DUALBUS_TEST_KAFKA_BOOTSTRAP is not set");
            None
        }
    }
}

/// Settings with the timeouts of the test broker (its group session is 3 s) and few
/// partitions per topic.
pub(crate) fn fast_config(bootstrap: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new([bootstrap]);
    c.topics.partitions = 4;
    c.topics.replication = 1;
    c.consumer.session_timeout = Duration::from_secs(3);
    c.consumer.commit_interval = Duration::from_millis(100);
    c.consumer.revoke_timeout = Duration::from_secs(20);
    c.request_timeout = Duration::from_secs(10);
    c.producer.linger = Duration::from_millis(1);
    c
}
