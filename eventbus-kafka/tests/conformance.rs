//! The conformance suite against a real Kafka broker: the domain bus (Kafka has no simple
//! bus here).
//!
//! The broker's address comes from `DUALBUS_TEST_KAFKA_BOOTSTRAP` (set by
//! `scripts/test.sh`, which starts the broker). Without it the tests are skipped, unless
//! `DUALBUS_TEST_REQUIRE_SERVERS` is set: then they fail.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::conformance::{Backend, Settings};
use dualbus_core::{DynDomainTransport, DynSimpleTransport, Error, Result};
use dualbus_kafka::{Kafka, KafkaConfig};

mod support;

struct KafkaBackend {
    bootstrap: Option<String>,
}

fn backend() -> KafkaBackend {
    KafkaBackend {
        bootstrap: support::shared_bootstrap(),
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    async fn domain(&self) -> Result<DynDomainTransport> {
        let b = self.bootstrap.clone().expect("available() was checked");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Ok(Arc::new(Kafka::connect(support::fast_config(&b)).await?))
    }

    async fn simple(&self) -> Result<DynSimpleTransport> {
        Err(Error::NotSupported {
            operation: "simple messages",
            backend: "kafka",
        })
    }

    fn settings(&self) -> Settings {
        let mut s = Settings::default();
        s.deadline = Duration::from_secs(240);
        s
    }

    fn available(&self) -> bool {
        self.bootstrap.is_some()
    }
}

dualbus_core::conformance_tests!(real, domain: backend());

#[tokio::test]
async fn unreachable_broker_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let mut config = KafkaConfig::new([format!("127.0.0.1:{port}")]);
    config.request_timeout = Duration::from_secs(1);
    let e = Kafka::connect(config).await.expect_err("nobody listens");
    assert_eq!(e.kind(), dualbus_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains(&port.to_string()), "{e}");
    let bad = Kafka::connect(KafkaConfig::new(Vec::<String>::new()))
        .await
        .expect_err("no broker");
    assert!(matches!(bad, Error::Config { .. }), "{bad}");
    let unknown = Kafka::connect(KafkaConfig::default().with_property("no.such.property", "1"))
        .await
        .expect_err("unknown property");
    assert!(
        matches!(&unknown, Error::Config { message, .. } if message.contains("no.such.property")),
        "{unknown}"
    );
}
