//! The mutant check on Redis Streams: with the rewind at takeover broken (a new owner
//! delivers the entries its former owner left pending after newer ones), the crash trap
//! must make the order checker fail. A checker that cannot fail is a defect.

#![allow(clippy::expect_used)] // Test code.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, groups};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Result};
use dualbus_redis::{RedisPubSub, RedisStreams};

struct RedisBackend {
    url: String,
    rewind: bool,
}

#[async_trait]
impl Backend for RedisBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let mut c = support::fast_config(&self.url);
        c.streams.partitions = 4;
        c.streams.lease_ttl = Duration::from_secs(2);
        c.streams.member_timeout = Duration::from_secs(2);
        if !self.rewind {
            c = c.without_rewind();
        }
        Ok(Arc::new(RedisStreams::connect(c).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        Ok(Arc::new(
            RedisPubSub::connect(support::fast_config(&self.url)).await?,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rewind_the_checker_fails() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let backend = RedisBackend { url, rewind: false };
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
    let Some(url) = support::shared_url() else {
        return;
    };
    let backend = RedisBackend { url, rewind: true };
    let summary = groups::crash_trap_outcome(&backend, 0)
        .await
        .expect("a correct takeover");
    println!("crash trap: {summary:?}");
}
