//! The backends `type:` can name: one table from [`BackendKind`] to its constructor.
//!
//! Two layers:
//!
//! - **What every build knows** about a backend type, whether its crate is compiled in or
//!   not: its name (the value of `type`, the key of its section), its cargo feature and the
//!   buses it offers ([`BackendKind::name`], [`BackendKind::feature`], [`BackendKind::offers`]).
//!   These let a configuration that names a backend missing from this build be refused with
//!   the feature to enable, and `simple.type: kafka` be refused in every build.
//! - **The table** ([`TABLE`]): one [`Backend`] entry per backend whose cargo feature is on
//!   (entries of disabled features are absent): whether it takes the partition settings, how
//!   to check its section, and how to build the transports of the buses that run on it.
//!
//! A new backend adds its variant to [`BackendKind`], its section to the bus sections of
//! [`crate::config`] (a [`Raw`] value), its facts below and its entry (a submodule behind
//! its feature).

use std::future::Future;
use std::pin::Pin;

use dualbus_core::{DynDomainTransport, DynSimpleTransport, Error, Result};
use serde::de::DeserializeOwned;

use crate::config::{BackendKind, Config, Raw};

#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;

/// The backends of this build, in the order of [`BackendKind::ALL`].
pub(crate) const TABLE: &[Backend] = &[
    #[cfg(feature = "memory")]
    memory::BACKEND,
    #[cfg(feature = "nats")]
    nats::BACKEND,
    #[cfg(feature = "kafka")]
    kafka::BACKEND,
    #[cfg(feature = "redis")]
    redis::BACKEND,
];

/// One of the two buses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bus {
    /// The domain-event bus (`domain:`).
    Domain,
    /// The simple-message bus (`simple:`).
    Simple,
}

impl Bus {
    /// Its section's key: `domain` or `simple`.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Domain => "domain",
            Self::Simple => "simple",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::Domain => "domain-event bus",
            Self::Simple => "simple-message bus",
        }
    }
}

impl BackendKind {
    /// Every backend type, whether this build has it or not.
    pub(crate) const ALL: [Self; 4] = [Self::Memory, Self::Nats, Self::Kafka, Self::Redis];

    /// Its name: the value of `type` and the key of its section.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Nats => "nats",
            Self::Kafka => "kafka",
            Self::Redis => "redis",
        }
    }

    /// The cargo feature of dualbus that brings it.
    pub(crate) fn feature(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Nats => "nats",
            Self::Kafka => "kafka",
            Self::Redis => "redis",
        }
    }

    /// Whether it offers `bus` (Kafka: the domain bus only).
    pub(crate) fn offers(self, bus: Bus) -> bool {
        match (self, bus) {
            (Self::Kafka, Bus::Simple) => false,
            (Self::Memory | Self::Nats | Self::Kafka | Self::Redis, _) => true,
        }
    }
}

/// A future of the table's constructors.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend of this build.
#[derive(Debug)]
pub(crate) struct Backend {
    /// The backend type.
    pub(crate) kind: BackendKind,
    /// Whether it takes the partition settings `domain.group.partitions` and
    /// `domain.topics.<name>.partitions` (its topics are partitioned); a backend that does
    /// not is refused them when it runs the domain bus.
    pub(crate) takes_partitions: bool,
    /// Checks its section, as far as that is possible without connecting, when the section
    /// is held as a [`Raw`] value (names the path under `<bus>.<name>`); `None` when the bus
    /// sections hold it typed, read and checked by serde (memory).
    pub(crate) check: Option<fn(&Raw, Bus) -> Result<()>>,
    /// Builds the transports of the buses that run on it ([`Build::domain`],
    /// [`Build::simple`]), from its sections and the backend-neutral settings. Called once
    /// per `from_config` with both buses when both run on it, so that it may share one
    /// broker or connection between them.
    pub(crate) build: for<'a> fn(Build<'a>) -> BoxFuture<'a, Result<Built>>,
}

/// What [`Backend::build`] is asked for.
#[derive(Debug, Clone, Copy)]
// Read by the entries; a build without backends has none.
#[cfg_attr(
    not(any(
        feature = "memory",
        feature = "nats",
        feature = "kafka",
        feature = "redis"
    )),
    allow(dead_code)
)]
pub(crate) struct Build<'a> {
    /// The whole (validated) configuration: the backend reads its own sections and the
    /// backend-neutral settings (`domain.group`, `domain.topics`).
    pub(crate) config: &'a Config,
    /// Whether the domain bus runs on this backend.
    pub(crate) domain: bool,
    /// Whether the simple bus runs on this backend.
    pub(crate) simple: bool,
}

/// What [`Backend::build`] built: the transport of each bus it was asked for.
#[derive(Default)]
pub(crate) struct Built {
    /// The domain transport, when [`Build::domain`].
    pub(crate) domain: Option<DynDomainTransport>,
    /// The simple transport, when [`Build::simple`].
    pub(crate) simple: Option<DynSimpleTransport>,
}

/// A backend's section as a bus section holds it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Section<'a> {
    /// Deserialized into the backend's own type along with the bus section (memory).
    #[cfg(feature = "memory")]
    Typed,
    /// Kept raw until the backend reads it.
    Raw(&'a Raw),
}

impl<'a> From<&'a Raw> for Section<'a> {
    fn from(raw: &'a Raw) -> Self {
        Self::Raw(raw)
    }
}

#[cfg(feature = "memory")]
impl From<&dualbus_memory::MemoryConfig> for Section<'_> {
    fn from(_: &dualbus_memory::MemoryConfig) -> Self {
        Self::Typed
    }
}

/// The entry of `kind`, if this build has it.
pub(crate) fn get(kind: BackendKind) -> Option<&'static Backend> {
    TABLE.iter().find(|b| b.kind == kind)
}

/// The entry of the backend `bus` is to run on: refused (at `<bus>.type`) when the backend
/// type offers no such bus, then when this build lacks it (naming the feature).
pub(crate) fn for_bus(bus: Bus, kind: BackendKind) -> Result<&'static Backend> {
    let path = || format!("{}.type", bus.key());
    if !kind.offers(bus) {
        let others: Vec<&str> = BackendKind::ALL
            .iter()
            .filter(|k| k.offers(bus))
            .map(|k| k.name())
            .collect();
        return Err(Error::config(
            path(),
            format!(
                "{} offers no {}; use {}",
                kind.name(),
                bus.description(),
                one_of(&others)
            ),
        ));
    }
    get(kind).ok_or_else(|| feature_error(path(), kind))
}

/// Checks the backend sections of one bus: a section of a backend this build lacks is an
/// error naming its feature (whether `type` names the backend or not); the others are checked
/// by their entry.
pub(crate) fn check_sections<'a>(
    bus: Bus,
    sections: impl IntoIterator<Item = (BackendKind, Option<Section<'a>>)>,
) -> Result<()> {
    for (kind, section) in sections {
        let Some(section) = section else { continue };
        let Some(backend) = get(kind) else {
            return Err(feature_error(
                format!("{}.{}", bus.key(), kind.name()),
                kind,
            ));
        };
        if let (Section::Raw(raw), Some(check)) = (section, backend.check) {
            check(raw, bus)?;
        }
    }
    Ok(())
}

/// Refuses the partition settings of `config.domain` when its backend takes none.
pub(crate) fn check_partitions(backend: &Backend, config: &Config) -> Result<()> {
    if backend.takes_partitions {
        return Ok(());
    }
    let d = &config.domain;
    let path = if d.group.partitions.is_some() {
        "domain.group.partitions".to_owned()
    } else if let Some(topic) = d
        .topics
        .iter()
        .find(|(_, t)| t.partitions.is_some())
        .map(|(t, _)| t)
    {
        format!("domain.topics.{topic}.partitions")
    } else {
        return Ok(());
    };
    Err(Error::config(
        path,
        format!(
            "the {} backend has no partitioned topics",
            backend.kind.name()
        ),
    ))
}

/// Builds the transports of both buses: each backend once, with every bus that runs on it.
pub(crate) async fn build(config: &Config) -> Result<(DynDomainTransport, DynSimpleTransport)> {
    let domain = for_bus(Bus::Domain, config.domain.kind)?;
    let simple = for_bus(Bus::Simple, config.simple.kind)?;
    let both = |domain, simple| Build {
        config,
        domain,
        simple,
    };
    let (d, s) = if domain.kind == simple.kind {
        let built = (domain.build)(both(true, true)).await?;
        (built.domain, built.simple)
    } else {
        let d = (domain.build)(both(true, false)).await?.domain;
        let s = (simple.build)(both(false, true)).await?.simple;
        (d, s)
    };
    let missing = |backend: &Backend, bus: Bus| {
        Error::config(
            format!("{}.type", bus.key()),
            format!(
                "the {} backend built no {} (a bug of dualbus)",
                backend.kind.name(),
                bus.description()
            ),
        )
    };
    Ok((
        d.ok_or_else(|| missing(domain, Bus::Domain))?,
        s.ok_or_else(|| missing(simple, Bus::Simple))?,
    ))
}

fn feature_error(path: String, kind: BackendKind) -> Error {
    Error::config(
        path,
        format!(
            "the {} backend needs the cargo feature `{}` of dualbus, which this build does not enable",
            kind.name(),
            kind.feature()
        ),
    )
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Reads the raw section `<bus>.<name>` as `T`, naming the full path of a bad or unknown key.
/// The message quotes no string value (a section may hold credentials) and passes through
/// `redact` (e.g. for URLs with user information in a list of expected values).
#[cfg_attr(not(feature = "nats"), allow(dead_code))] // Only backends with raw sections read.
pub(crate) fn read_section<T: DeserializeOwned>(
    raw: &Raw,
    bus: Bus,
    name: &str,
    redact: fn(&str) -> String,
) -> Result<T> {
    use figment::error::{Actual, Kind};
    T::deserialize(raw.value()).map_err(|e| {
        let mut path = format!("{}.{name}", bus.key());
        for p in &e.path {
            path.push('.');
            path.push_str(p);
        }
        if let Kind::UnknownField(field, _) = &e.kind
            && e.path.last() != Some(field)
        {
            path.push('.');
            path.push_str(field);
        }
        let message = match &e.kind {
            Kind::InvalidType(Actual::Str(_), expected) => {
                format!("invalid type: found a string, expected {expected}")
            }
            Kind::InvalidValue(Actual::Str(_), expected) => {
                format!("invalid value: a string, expected {expected}")
            }
            other => other.to_string(),
        };
        Error::config(path, redact(&message))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn enabled(kind: BackendKind) -> bool {
        match kind {
            BackendKind::Memory => cfg!(feature = "memory"),
            BackendKind::Nats => cfg!(feature = "nats"),
            BackendKind::Kafka => cfg!(feature = "kafka"),
            BackendKind::Redis => cfg!(feature = "redis"),
        }
    }

    fn config_error(r: Result<impl std::fmt::Debug>) -> (String, String) {
        match r {
            Err(Error::Config { path, message }) => (path, message),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn every_kind_has_an_entry_or_a_feature_error() {
        for kind in BackendKind::ALL {
            assert_eq!(get(kind).is_some(), enabled(kind), "{kind:?}");
            for bus in [Bus::Domain, Bus::Simple] {
                let found = for_bus(bus, kind).map(|b| b.kind);
                match (kind.offers(bus), enabled(kind)) {
                    (true, true) => assert_eq!(found.unwrap(), kind),
                    (true, false) => {
                        let (path, message) = config_error(found);
                        assert_eq!(path, format!("{}.type", bus.key()));
                        assert!(
                            message.contains(&format!("cargo feature `{}`", kind.feature())),
                            "{message}"
                        );
                    }
                    (false, _) => {
                        let (path, message) = config_error(found);
                        assert_eq!(path, format!("{}.type", bus.key()));
                        assert!(message.contains("offers no"), "{message}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_has_one_entry_per_kind_in_order() {
        let kinds: Vec<BackendKind> = TABLE.iter().map(|b| b.kind).collect();
        let expected: Vec<BackendKind> = BackendKind::ALL
            .into_iter()
            .filter(|k| enabled(*k))
            .collect();
        assert_eq!(kinds, expected);
    }

    #[test]
    fn names_features_and_buses() {
        for kind in BackendKind::ALL {
            // The name is what `type` deserializes from.
            let parsed: BackendKind =
                serde_json::from_value(serde_json::Value::from(kind.name())).unwrap();
            assert_eq!(parsed, kind);
            assert!(
                kind.offers(Bus::Domain),
                "{kind:?}: every backend has a domain bus"
            );
        }
        assert!(!BackendKind::Kafka.offers(Bus::Simple));
        let (_, message) = config_error(for_bus(Bus::Simple, BackendKind::Kafka));
        assert_eq!(
            message,
            "kafka offers no simple-message bus; use memory, nats or redis"
        );
        assert_eq!(one_of(&["a"]), "a");
        assert_eq!(one_of(&["a", "b"]), "a or b");
    }

    #[test]
    fn partition_settings_follow_the_entry() {
        for backend in TABLE {
            let mut config = Config::default();
            config.domain.group.partitions = Some(4);
            let r = check_partitions(backend, &config);
            assert_eq!(r.is_ok(), backend.takes_partitions, "{:?}", backend.kind);
            config.domain.group.partitions = None;
            config
                .domain
                .topics
                .entry("payments".to_owned())
                .or_default()
                .partitions = Some(2);
            match check_partitions(backend, &config) {
                Ok(()) => assert!(backend.takes_partitions),
                Err(e) => {
                    assert!(!backend.takes_partitions);
                    assert!(
                        e.to_string().contains("domain.topics.payments.partitions"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// Needs a build without some backend (`scripts/test.sh` runs the facade's unit tests
    /// without default features too).
    #[test]
    fn sections_of_absent_backends_name_the_feature() {
        let absent: Vec<BackendKind> = BackendKind::ALL
            .into_iter()
            .filter(|k| !enabled(*k))
            .collect();
        if absent.is_empty() {
            eprintln!("every backend is in this build: nothing is absent");
            return;
        }
        let raw: Raw = serde_json::from_str(r#"{ "url": "x" }"#).unwrap();
        for kind in absent {
            let (path, message) = config_error(check_sections(
                Bus::Simple,
                [(kind, Some(Section::Raw(&raw)))],
            ));
            assert_eq!(path, format!("simple.{}", kind.name()));
            assert!(
                message.contains(&format!("cargo feature `{}`", kind.feature())),
                "{message}"
            );
            check_sections(Bus::Simple, [(kind, None)]).unwrap();
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_on_both_buses_builds_one_broker() {
        let config = Config::default();
        let (domain, simple) = build(&config).await.unwrap();
        assert_eq!(domain.capabilities().backend, "memory");
        assert_eq!(simple.capabilities().backend, "memory");
    }
}
