//! The conformance suite against a real redis-server: the simple bus on pub/sub.
//!
//! The server's URL comes from `DUALBUS_TEST_REDIS_URL` (set by `scripts/test.sh`, which
//! starts the server). Without it the tests are skipped, unless
//! `DUALBUS_TEST_REQUIRE_SERVERS` is set: then they fail.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::conformance::Backend;
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Error, Result};
use dualbus_redis::RedisPubSub;

mod support;

struct RedisBackend {
    url: Option<String>,
}

#[async_trait]
impl Backend for RedisBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        Err(Error::NotSupported {
            operation: "domain events",
            backend: "redis",
        })
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        let url = self.url.clone().expect("available() was checked");
        Ok(Arc::new(
            RedisPubSub::connect(support::fast_config(&url)).await?,
        ))
    }

    fn available(&self) -> bool {
        self.url.is_some()
    }
}

fn backend() -> RedisBackend {
    RedisBackend {
        url: support::shared_url(),
    }
}

dualbus_core::conformance_tests!(real, simple: backend());
