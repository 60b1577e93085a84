//! The mutant check: with the rewind at takeover disabled, the crash trap must make the
//! order checker fail. A checker that cannot fail is a defect.

#![allow(clippy::expect_used)] // Test code.

use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, groups};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Result};
use dualbus_memory::{Memory, MemoryConfig};

struct MemoryBackend(Memory);

#[async_trait]
impl Backend for MemoryBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        Ok(std::sync::Arc::new(self.0.connect()))
    }
    async fn simple(&self) -> Result<DynSimpleTransport> {
        Ok(std::sync::Arc::new(self.0.connect()))
    }
}

fn backend(rewind: bool) -> MemoryBackend {
    let mut config = MemoryConfig::default().with_ack_wait(Duration::from_secs(2));
    if !rewind {
        config = config.without_rewind();
    }
    MemoryBackend(Memory::with_config(config).expect("valid config"))
}

#[tokio::test(start_paused = true)]
async fn without_rewind_the_checker_fails() {
    let violation = groups::crash_trap_outcome(&backend(false), 0)
        .await
        .expect_err("a takeover without rewind must break per-aggregate order");
    println!("mutant caught: {violation}");
    assert!(["C2", "C3", "C4"].contains(&violation.check), "{violation}");
}

#[tokio::test(start_paused = true)]
async fn with_rewind_the_same_scenario_passes() {
    let summary = groups::crash_trap_outcome(&backend(true), 0)
        .await
        .expect("a correct takeover");
    println!("crash trap: {summary:?}");
}
