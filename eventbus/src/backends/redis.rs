//! Redis (`dualbus-redis`): the simple bus on Redis pub/sub, connected with the simple
//! bus's `redis` section (defaults without one).

use std::sync::Arc;

use dualbus_core::Result;
use dualbus_redis::{RedisConfig, RedisPubSub};

use super::{Backend, BoxFuture, Build, Built, Bus, read_section};
use crate::config::BackendKind;
use crate::config::Raw;

/// The entry of the table.
pub(super) const BACKEND: Backend = Backend {
    kind: BackendKind::Redis,
    takes_partitions: false,
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

fn build(b: Build<'_>) -> BoxFuture<'_, Result<Built>> {
    Box::pin(async move {
        let mut built = Built::default();
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
        // The domain bus is not offered on Redis in this release.
        let e = crate::Config::from_yaml("domain:\n  type: redis\n").expect_err("no domain bus");
        assert!(
            e.to_string().contains("redis offers no domain-event bus"),
            "{e}"
        );
    }
}
