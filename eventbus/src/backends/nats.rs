//! NATS (`dualbus-nats`): the domain bus on JetStream, the simple bus on core NATS, each
//! connected with its own bus's `nats` section (defaults without one).

use std::sync::Arc;

use dualbus_core::Result;
use dualbus_nats::{JetStream, Nats, NatsConfig};

use super::{Backend, BoxFuture, Build, Built, Bus, read_section};
use crate::config::BackendKind;
use crate::config::Raw;

/// The entry of the table.
pub(super) const BACKEND: Backend = Backend {
    kind: BackendKind::Nats,
    // Partitioned consumer groups on JetStream are not offered yet: one active subscriber
    // per group and topic.
    partitioned_groups: false,
    check: Some(check),
    build,
};

fn check(raw: &Raw, bus: Bus) -> Result<()> {
    config(Some(raw), bus).map(drop)
}

/// The typed `nats` section of `bus`; errors show no secret (string values are not quoted,
/// URLs are redacted).
fn config(raw: Option<&Raw>, bus: Bus) -> Result<NatsConfig> {
    match raw {
        Some(raw) => read_section(raw, bus, "nats", dualbus_nats::redact_urls),
        None => Ok(NatsConfig::default()),
    }
}

/// The domain bus's NATS configuration: its `nats` section, with the group settings that
/// apply to it (`domain.group.member_timeout`).
fn domain_config(config: &crate::Config) -> Result<NatsConfig> {
    let mut nats = self::config(config.domain.nats.as_ref(), Bus::Domain)?;
    if let Some(t) = config.domain.group.member_timeout {
        nats.jetstream.consumer.member_timeout = t;
    }
    Ok(nats)
}

fn build(b: Build<'_>) -> BoxFuture<'_, Result<Built>> {
    Box::pin(async move {
        let mut built = Built::default();
        if b.domain {
            let config = domain_config(b.config)?;
            built.domain = Some(Arc::new(JetStream::connect(config).await?));
        }
        if b.simple {
            let config = config(b.config.simple.nats.as_ref(), Bus::Simple)?;
            built.simple = Some(Arc::new(Nats::connect(config).await?));
        }
        Ok(built)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_group_member_timeout_reaches_the_member_registry() {
        let c =
            crate::Config::from_yaml("domain:\n  type: nats\n  group: { member_timeout: 4s }\n")
                .expect("config");
        let nats = domain_config(&c).expect("nats config");
        assert_eq!(
            nats.jetstream.consumer.member_timeout,
            Duration::from_secs(4)
        );
        let c = crate::Config::from_yaml(
            "domain:\n  type: nats\n  nats: { jetstream: { consumer: { member_timeout: 7s } } }\n",
        )
        .expect("config");
        assert_eq!(
            domain_config(&c)
                .expect("nats config")
                .jetstream
                .consumer
                .member_timeout,
            Duration::from_secs(7)
        );
    }
}
