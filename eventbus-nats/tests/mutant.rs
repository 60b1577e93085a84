//! The mutant check on JetStream: with the rewind at takeover disabled, the crash trap must
//! make the order checker fail (the ack wait is far longer than the test's phases, so only
//! the rewind can bring the crashed member's unfinished events back in time). A checker
//! that cannot fail is a defect.

#![allow(clippy::expect_used)] // Test code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, groups};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Result};
use dualbus_nats::{JetStream, Nats, NatsConfig};

struct NatsBackend {
    url: String,
    rewind: bool,
}

#[async_trait]
impl Backend for NatsBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let mut c = support::fast_config(self.url.clone());
        c.jetstream.consumer.lease_ttl = Duration::from_secs(2);
        c.jetstream.consumer.ack_wait = Duration::from_secs(20);
        c.jetstream.partitions = 4;
        if !self.rewind {
            c.jetstream = c.jetstream.without_rewind();
        }
        Ok(Arc::new(JetStream::connect(c).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        Ok(Arc::new(
            Nats::connect(NatsConfig::new([self.url.clone()])).await?,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rewind_the_checker_fails() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let backend = NatsBackend { url, rewind: false };
    let violation = groups::crash_trap_outcome(&backend, 0)
        .await
        .expect_err("a takeover without rewind must break per-aggregate order");
    println!("mutant caught: {violation}");
    assert!(["C2", "C3", "C4"].contains(&violation.check), "{violation}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rewind_the_same_scenario_passes() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let backend = NatsBackend { url, rewind: true };
    let summary = groups::crash_trap_outcome(&backend, 0)
        .await
        .expect("a correct takeover");
    println!("crash trap: {summary:?}");
}
