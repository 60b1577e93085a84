//! The mutant check on Kafka: with the rewind at takeover disabled (a new owner starts at
//! the partition's end instead of its committed offset), the crash trap must make the order
//! checker fail. A checker that cannot fail is a defect.

#![allow(clippy::expect_used)] // Test code.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, groups};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Error, Result};
use dualbus_kafka::Kafka;

struct KafkaBackend {
    bootstrap: String,
    rewind: bool,
}

#[async_trait]
impl Backend for KafkaBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let mut c = support::fast_config(&self.bootstrap);
        if !self.rewind {
            c = c.without_rewind();
        }
        Ok(Arc::new(Kafka::connect(c).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        Err(Error::NotSupported {
            operation: "simple messages",
            backend: "kafka",
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rewind_the_checker_fails() {
    let Some(bootstrap) = support::shared_bootstrap() else {
        return;
    };
    let backend = KafkaBackend {
        bootstrap,
        rewind: false,
    };
    let violation = groups::crash_trap_outcome(&backend, 0)
        .await
        .expect_err("a takeover without rewind must break per-aggregate order");
    println!("mutant caught: {violation}");
    assert!(
        ["C1", "C2", "C3", "C4"].contains(&violation.check),
        "{violation}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rewind_the_same_scenario_passes() {
    let Some(bootstrap) = support::shared_bootstrap() else {
        return;
    };
    let backend = KafkaBackend {
        bootstrap,
        rewind: true,
    };
    let summary = groups::crash_trap_outcome(&backend, 0)
        .await
        .expect("a correct takeover");
    println!("crash trap: {summary:?}");
}
