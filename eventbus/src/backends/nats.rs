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
    // A topic's stream is partitioned by the server's subject transform (the partition
    // count is part of the stream).
    takes_partitions: true,
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

/// The domain bus's NATS configuration: its `nats` section, with the group and topic
/// settings that apply to it (`domain.group.member_timeout`, `domain.group.partitions`,
/// `domain.topics.<name>.partitions`), which override the section's.
fn domain_config(config: &crate::Config) -> Result<NatsConfig> {
    let mut nats = self::config(config.domain.nats.as_ref(), Bus::Domain)?;
    let group = &config.domain.group;
    if let Some(t) = group.member_timeout {
        nats.jetstream.consumer.member_timeout = t;
    }
    let in_range = |path: String, p: u32| {
        let max = dualbus_nats::jetstream::MAX_PARTITIONS;
        if p > max {
            Err(dualbus_core::Error::config(
                path,
                format!("at most {max} on nats, not {p}"),
            ))
        } else {
            Ok(p)
        }
    };
    if let Some(p) = group.partitions {
        nats.jetstream.partitions = in_range("domain.group.partitions".to_owned(), p)?;
    }
    for (topic, t) in &config.domain.topics {
        if let Some(p) = t.partitions {
            let p = in_range(format!("domain.topics.{topic}.partitions"), p)?;
            nats.jetstream
                .topics
                .entry(topic.clone())
                .or_default()
                .partitions = Some(p);
        }
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
    fn partition_counts_reach_the_streams() {
        let c = crate::Config::from_yaml(
            "domain:\n  type: nats\n  group: { partitions: 8 }\n  topics: { payments: { partitions: 2 } }\n  nats: { jetstream: { partitions: 4, topics: { orders: { layout: partitioned } } } }\n",
        )
        .expect("config");
        let nats = domain_config(&c).expect("nats config");
        assert_eq!(nats.jetstream.partitions, 8, "the group setting wins");
        assert_eq!(nats.jetstream.topics["payments"].partitions, Some(2));
        assert_eq!(nats.jetstream.topics["orders"].partitions, None);
        // Past the most a NATS topic takes: refused, naming the setting.
        for (yaml, path) in [
            (
                "domain:\n  type: nats\n  topics: { payments: { partitions: 1025 } }\n",
                "domain.topics.payments.partitions",
            ),
            (
                "domain:\n  type: nats\n  group: { partitions: 1025 }\n",
                "domain.group.partitions",
            ),
        ] {
            let c = crate::Config::from_yaml(yaml).expect("config");
            match domain_config(&c) {
                Err(dualbus_core::Error::Config { path: p, .. }) => assert_eq!(p, path),
                other => panic!("{other:?}"),
            }
        }
        let c = crate::Config::from_yaml(
            "domain:\n  type: nats\n  topics: { payments: { partitions: 1024 } }\n",
        )
        .expect("config");
        assert_eq!(
            domain_config(&c).expect("at the limit").jetstream.topics["payments"].partitions,
            Some(1024)
        );
    }

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
