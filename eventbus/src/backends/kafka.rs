//! Kafka (`dualbus-kafka`): the domain bus on Kafka topics, connected with the domain bus's
//! `kafka` section (defaults without one). Kafka offers no simple bus.

use std::sync::Arc;

use dualbus_core::Result;
use dualbus_kafka::{Kafka, KafkaConfig};

use super::{Backend, BoxFuture, Build, Built, Bus, read_section};
use crate::config::BackendKind;
use crate::config::Raw;

/// The entry of the table.
pub(super) const BACKEND: Backend = Backend {
    kind: BackendKind::Kafka,
    // Topics the transport creates get the configured partition count.
    takes_partitions: true,
    check: Some(check),
    build,
};

fn check(raw: &Raw, bus: Bus) -> Result<()> {
    let c = config(Some(raw), bus)?;
    c.validate()
}

/// The typed `kafka` section of `bus`; errors show no value (string values are not
/// quoted).
fn config(raw: Option<&Raw>, bus: Bus) -> Result<KafkaConfig> {
    match raw {
        Some(raw) => read_section(raw, bus, "kafka", str::to_owned),
        None => Ok(KafkaConfig::default()),
    }
}

/// The domain bus's Kafka configuration: its `kafka` section, with the group and topic
/// settings that apply to it (`domain.group.partitions`, `domain.topics.<name>.partitions`
/// for the topics the transport creates; `domain.group.member_timeout` as the session
/// timeout), which override the section's.
fn domain_config(config: &crate::Config) -> Result<KafkaConfig> {
    let mut kafka = self::config(config.domain.kafka.as_ref(), Bus::Domain)?;
    let group = &config.domain.group;
    if let Some(t) = group.member_timeout {
        kafka.consumer.session_timeout = t;
    }
    if let Some(p) = group.partitions {
        kafka.topics.partitions = p;
    }
    for (topic, t) in &config.domain.topics {
        if let Some(p) = t.partitions {
            kafka.topics.partitions_of.insert(topic.clone(), p);
        }
    }
    kafka.validate()?;
    Ok(kafka)
}

fn build(b: Build<'_>) -> BoxFuture<'_, Result<Built>> {
    Box::pin(async move {
        let mut built = Built::default();
        if b.domain {
            let config = domain_config(b.config)?;
            built.domain = Some(Arc::new(Kafka::connect(config).await?));
        }
        Ok(built)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_and_topic_settings_reach_the_kafka_config() {
        let c = crate::Config::from_yaml(
            "domain:\n  type: kafka\n  group: { partitions: 8, member_timeout: 6s }\n  topics: { payments: { partitions: 2 } }\n  kafka: { bootstrap_servers: [\"k1:9092\"], topics: { partitions: 4 } }\n",
        )
        .expect("config");
        let k = domain_config(&c).expect("kafka config");
        assert_eq!(k.topics.partitions, 8, "the group setting wins");
        assert_eq!(k.topics.partitions_of["payments"], 2);
        assert_eq!(
            k.consumer.session_timeout,
            std::time::Duration::from_secs(6)
        );
        assert_eq!(k.bootstrap_servers, ["k1:9092"]);
        let bad = crate::Config::from_yaml(
            "domain:\n  type: kafka\n  kafka: { producer: { acks: \"1\" } }\n",
        );
        let e = match bad {
            Err(e) => e,
            Ok(c) => domain_config(&c).expect_err("acks=1 with idempotence"),
        };
        assert!(e.to_string().contains("kafka.producer.acks"), "{e}");
    }
}
