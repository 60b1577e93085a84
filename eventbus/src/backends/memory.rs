//! The in-process backend (`dualbus-memory`): both buses, one broker shared unless the simple
//! bus has a `memory` section of its own.

use std::sync::Arc;

use dualbus_core::Result;
use dualbus_memory::{Memory, MemoryConfig};

use super::{Backend, BoxFuture, Build, Built, Bus};
use crate::config::{BackendKind, prefix};

/// The entry of the table.
pub(super) const BACKEND: Backend = Backend {
    kind: BackendKind::Memory,
    takes_partitions: true,
    // The bus sections hold `memory` typed (`MemoryConfig`), checked by serde.
    check: None,
    build,
};

fn build(b: Build<'_>) -> BoxFuture<'_, Result<Built>> {
    let built = brokers(b).map(|(domain, simple)| Built {
        domain: domain.map(|m| Arc::new(m) as _),
        simple: simple.map(|m| Arc::new(m) as _),
    });
    Box::pin(std::future::ready(built))
}

/// The brokers of the domain and the simple bus, as asked: the simple bus shares the domain
/// bus's broker unless it has a `memory` section of its own. Without one (and without the
/// domain bus on memory) it takes `domain.memory`'s settings.
fn brokers(b: Build<'_>) -> Result<(Option<Memory>, Option<Memory>)> {
    let (d, s) = (&b.config.domain, &b.config.simple);
    // The backend-neutral partition settings apply to every broker.
    let broker = |section: Option<&MemoryConfig>, bus: Bus| {
        let mut c = section.cloned().unwrap_or_default();
        if let Some(p) = d.group.partitions {
            c = c.with_partitions(p);
        }
        for (topic, t) in &d.topics {
            if let Some(p) = t.partitions {
                c = c.with_topic_partitions(topic.clone(), p);
            }
        }
        Memory::with_config(c).map_err(|e| prefix(bus.key(), e))
    };
    let domain = if b.domain {
        Some(broker(d.memory.as_ref(), Bus::Domain)?)
    } else {
        None
    };
    let simple = match (b.simple, &s.memory, &domain) {
        (false, _, _) => None,
        (true, Some(own), _) => Some(broker(Some(own), Bus::Simple)?),
        // One broker for both buses (a clone: same broker, same handle).
        (true, None, Some(shared)) => Some(shared.clone()),
        (true, None, None) => Some(broker(d.memory.as_ref(), Bus::Domain)?),
    };
    Ok((domain, simple))
}

#[cfg(test)]
mod tests {
    // Test code; figment::Jail fixes the error type.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

    use super::*;
    use crate::Config;

    fn config(yaml: &str) -> Config {
        let mut config = None;
        figment::Jail::expect_with(|_| {
            config = Some(Config::from_yaml(yaml).map_err(|e| e.to_string())?);
            Ok(())
        });
        config.unwrap()
    }

    fn ask(config: &Config, domain: bool, simple: bool) -> (Option<Memory>, Option<Memory>) {
        brokers(Build {
            config,
            domain,
            simple,
        })
        .unwrap()
    }

    /// Brokers are the same when their settings are the same value.
    fn same(a: &Memory, b: &Memory) -> bool {
        std::ptr::eq(a.config(), b.config())
    }

    #[test]
    fn both_buses_share_one_broker_without_a_simple_section() {
        let c = config("domain:\n  memory: { partitions: 4 }\n");
        let (d, s) = ask(&c, true, true);
        let (d, s) = (d.unwrap(), s.unwrap());
        assert!(same(&d, &s));
        assert_eq!(d.config().partitions, 4);
    }

    #[test]
    fn a_simple_section_gets_its_own_broker() {
        let c = config(
            "domain:\n  group: { partitions: 8 }\n  topics: { payments: { partitions: 2 } }\nsimple:\n  memory: { simple_buffer: 7 }\n",
        );
        let (d, s) = ask(&c, true, true);
        let (d, s) = (d.unwrap(), s.unwrap());
        assert!(!same(&d, &s));
        assert_eq!(s.config().simple_buffer, 7);
        assert_eq!(d.config().simple_buffer, 1024);
        // The neutral settings reach both brokers.
        for m in [&d, &s] {
            assert_eq!(m.config().partitions, 8);
            assert_eq!(m.config().topic_partitions.get("payments"), Some(&2));
        }
    }

    #[test]
    fn only_what_is_asked_is_built() {
        let c = config("domain:\n  memory: { simple_buffer: 3 }\n");
        let (d, s) = ask(&c, false, true);
        assert!(d.is_none());
        assert_eq!(
            s.unwrap().config().simple_buffer,
            3,
            "without a section of its own, the simple bus takes the domain's"
        );
        let (d, s) = ask(&c, true, false);
        assert!(d.is_some() && s.is_none());
    }

    #[test]
    fn bad_values_name_their_bus() {
        let c = config("simple:\n  memory: { partitions: 0 }\n");
        match brokers(Build {
            config: &c,
            domain: true,
            simple: true,
        }) {
            Err(dualbus_core::Error::Config { path, .. }) => {
                assert_eq!(path, "simple.memory.partitions");
            }
            other => panic!(
                "expected a configuration error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
