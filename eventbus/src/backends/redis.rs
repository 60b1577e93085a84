//! Redis (`dualbus-redis`): the domain bus on Redis Streams, the simple bus on Redis
//! pub/sub, each connected with its own bus's `redis` section (defaults without one).

use std::sync::Arc;

use dualbus_core::Result;
use dualbus_redis::{RedisConfig, RedisPubSub, RedisStreams};

use super::{Backend, BoxFuture, Build, Built, Bus, read_section};
use crate::config::BackendKind;
use crate::config::Raw;

/// The entry of the table.
pub(super) const BACKEND: Backend = Backend {
    kind: BackendKind::Redis,
    // A topic is one stream per partition, its count stored with the topic at first use.
    takes_partitions: true,
    check: Some(check),
    build,
};

fn check(raw: &Raw, bus: Bus) -> Result<()> {
    config(Some(raw), bus)?.validate()
}

/// The typed `redis` section of `bus`; errors show no secret (string values are not
/// quoted, URLs are redacted).
fn config(raw: Option<&Raw>, bus: Bus) -> Result<RedisConfig> {
    match raw {
        Some(raw) => read_section(raw, bus, "redis", dualbus_redis::redact_urls),
        None => Ok(RedisConfig::default()),
    }
}

/// The domain bus's Redis configuration: its `redis` section, with the group settings that
/// apply to it (`domain.group.partitions` for the topics first used here,
/// `domain.group.member_timeout`), which override the section's. Per-topic partition
/// counts are refused: a Redis topic takes the count of its first use.
fn domain_config(config: &crate::Config) -> Result<RedisConfig> {
    let mut redis = self::config(config.domain.redis.as_ref(), Bus::Domain)?;
    let group = &config.domain.group;
    if let Some(t) = group.member_timeout {
        redis.streams.member_timeout = t;
    }
    if let Some(p) = group.partitions {
        redis.streams.partitions = p;
    }
    if let Some((topic, _)) = config
        .domain
        .topics
        .iter()
        .find(|(_, t)| t.partitions.is_some())
    {
        return Err(dualbus_core::Error::config(
            format!("domain.topics.{topic}.partitions"),
            "not on redis: every topic takes domain.group.partitions (or redis.streams.partitions) at its first use",
        ));
    }
    redis.validate()?;
    Ok(redis)
}

fn build(b: Build<'_>) -> BoxFuture<'_, Result<Built>> {
    Box::pin(async move {
        let mut built = Built::default();
        if b.domain {
            let config = domain_config(b.config)?;
            built.domain = Some(Arc::new(RedisStreams::connect(config).await?));
        }
        if b.simple {
            let config = config(b.config.simple.redis.as_ref(), Bus::Simple)?;
            built.simple = Some(Arc::new(RedisPubSub::connect(config).await?));
        }
        Ok(built)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_read_and_checked() {
        let c = crate::Config::from_yaml(
            "simple:\n  type: redis\n  redis: { url: \"redis://app:s3cret@cache:6380\", pool_size: 4 }\n",
        )
        .expect("config");
        let r = config(c.simple.redis.as_ref(), Bus::Simple).expect("redis config");
        assert_eq!(r.pool_size, 4);
        assert!(!format!("{r:?}").contains("s3cret"));
        for (yaml, path) in [
            (
                "simple:\n  type: redis\n  redis: { pool: 4 }\n",
                "simple.redis.pool",
            ),
            (
                "simple:\n  type: redis\n  redis: { pool_size: 0 }\n",
                "redis.pool_size",
            ),
        ] {
            match crate::Config::from_yaml(yaml) {
                Err(dualbus_core::Error::Config { path: p, .. }) => assert_eq!(p, path, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }

    #[test]
    fn group_settings_reach_the_streams() {
        let c = crate::Config::from_yaml(
            "domain:\n  type: redis\n  group: { partitions: 8, member_timeout: 6s }\n  redis: { url: \"redis://cache:6380\", streams: { partitions: 4, lease_ttl: 3s } }\n",
        )
        .expect("config");
        let r = domain_config(&c).expect("redis config");
        assert_eq!(r.streams.partitions, 8, "the group setting wins");
        assert_eq!(r.streams.member_timeout, std::time::Duration::from_secs(6));
        assert_eq!(r.streams.lease_ttl, std::time::Duration::from_secs(3));
        let c = crate::Config::from_yaml(
            "domain:\n  type: redis\n  topics: { payments: { partitions: 2 } }\n",
        )
        .expect("config");
        match domain_config(&c) {
            Err(dualbus_core::Error::Config { path, .. }) => {
                assert_eq!(path, "domain.topics.payments.partitions");
            }
            other => panic!("{other:?}"),
        }
    }
}
