//! The conformance suite against a real redis-server: the domain bus on Streams, the
//! simple bus on pub/sub.
//!
//! The server's URL comes from `DUALBUS_TEST_REDIS_URL` (set by `scripts/test.sh`, which
//! starts the server). Without it the tests are skipped, unless
//! `DUALBUS_TEST_REQUIRE_SERVERS` is set: then they fail.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

use std::sync::Arc;

use async_trait::async_trait;
use std::time::Duration;

use dualbus_core::conformance::{Backend, Settings};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Result};
use dualbus_redis::{RedisConfig, RedisPubSub, RedisStreams};

mod support;

struct RedisBackend {
    url: Option<String>,
}

#[async_trait]
impl Backend for RedisBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let url = self.url.clone().expect("available() was checked");
        Ok(Arc::new(RedisStreams::connect(test_config(&url)).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        let url = self.url.clone().expect("available() was checked");
        Ok(Arc::new(
            RedisPubSub::connect(support::fast_config(&url)).await?,
        ))
    }

    fn settings(&self) -> Settings {
        let mut s = Settings::default();
        // The group tests run 20 seeds against a real server, beside the other tests.
        s.deadline = Duration::from_secs(240);
        s
    }

    fn available(&self) -> bool {
        self.url.is_some()
    }
}

/// Short leases (no server restarts here) and four partitions per topic: groups of up to
/// four members share them.
fn test_config(url: &str) -> RedisConfig {
    let mut c = support::fast_config(url);
    c.streams.partitions = 4;
    c.streams.lease_ttl = Duration::from_secs(2);
    c.streams.member_timeout = Duration::from_secs(2);
    c
}

fn backend() -> RedisBackend {
    RedisBackend {
        url: support::shared_url(),
    }
}

dualbus_core::conformance_tests!(backend());
