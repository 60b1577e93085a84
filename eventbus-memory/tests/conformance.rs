//! The whole conformance suite on the memory backend, on tokio's paused clock.

#![allow(clippy::expect_used)] // Test code: a failed expectation is a failed test.

use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, Settings};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Result};
use dualbus_memory::{Memory, MemoryConfig};

struct MemoryBackend(Memory);

fn backend() -> MemoryBackend {
    // A short ack deadline, so that the redelivery tests see it pass (in virtual time).
    let config = MemoryConfig::default()
        .with_ack_wait(Duration::from_secs(2))
        .with_max_payload(64 * 1024);
    MemoryBackend(Memory::with_config(config).expect("valid config"))
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        Ok(std::sync::Arc::new(self.0.connect()))
    }
    async fn simple(&self) -> Result<DynSimpleTransport> {
        Ok(std::sync::Arc::new(self.0.connect()))
    }
    fn settings(&self) -> Settings {
        Settings::default()
    }
}

dualbus_core::conformance_tests!(paused: backend());
