//! The conformance suite against a real nats-server: the domain bus on JetStream, the
//! simple bus on core NATS (the group tests check that the refusal is declared).
//!
//! The server's URL comes from `DUALBUS_TEST_NATS_URL` (set by `scripts/test.sh`, which
//! starts the server). Without it the tests are skipped, unless
//! `DUALBUS_TEST_REQUIRE_SERVERS` is set: then they fail.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, Settings};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Error, Result};
use dualbus_nats::{JetStream, Nats, NatsConfig};

mod support;

/// The fast broker timeouts of the NATS tests; a short lease (no server restarts here) and
/// a longer request timeout for the loaded suite.
fn test_config(url: String) -> NatsConfig {
    let mut c = support::fast_config(url);
    c.jetstream.consumer.lease_ttl = Duration::from_secs(2);
    // Four partitions: groups of up to four members share them; fewer consumers per group
    // than the default 16 keep the many seeds quick on one server.
    c.jetstream.partitions = 4;
    c.jetstream.request_timeout = Duration::from_secs(5);
    c
}

struct NatsBackend {
    url: Option<String>,
}

fn backend() -> NatsBackend {
    NatsBackend {
        url: support::shared_url(),
    }
}

#[async_trait]
impl Backend for NatsBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let url = self.url.clone().expect("available() was checked");
        Ok(Arc::new(JetStream::connect(test_config(url)).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        let url = self.url.clone().expect("available() was checked");
        Ok(Arc::new(Nats::connect(NatsConfig::new([url])).await?))
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

dualbus_core::conformance_tests!(backend());

#[tokio::test]
async fn unreachable_server_is_a_clear_error() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config = NatsConfig::new([format!("nats://127.0.0.1:{port}")])
        .with_connect_timeout(Duration::from_secs(1));
    let e = Nats::connect(config).await.expect_err("nobody listens");
    assert_eq!(e.kind(), dualbus_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    let bad = Nats::connect(NatsConfig::new(["not a url at all"]))
        .await
        .expect_err("bad url");
    assert_eq!(bad.kind(), dualbus_core::ErrorKind::InvalidInput, "{bad}");
    let none = Nats::connect(NatsConfig::new(Vec::<String>::new()))
        .await
        .expect_err("no url");
    assert!(matches!(none, Error::Config { .. }), "{none}");
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let creds: dualbus_nats::Credentials = serde_json_free::credentials();
    let text = format!("{:?}", NatsConfig::default().with_credentials(creds));
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("***"), "{text}");
}

mod serde_json_free {
    pub(crate) fn credentials() -> dualbus_nats::Credentials {
        let mut c = dualbus_nats::Credentials::default();
        c.user = Some("app".into());
        c.password = Some(dualbus_nats::Secret::new("s3cret"));
        c.token = Some(dualbus_nats::Secret::new("s3cret-token"));
        c
    }
}
