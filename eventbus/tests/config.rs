//! Configuration: YAML, TOML, environment overrides, unknown keys, feature-gated sections.

#![cfg(all(feature = "config", feature = "memory"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)] // Test code; figment::Jail fixes the error type.

use std::time::Duration;

use dualbus::config::{BackendKind, CodecKind, JxtTenantId};
use dualbus::{Buses, Codec, Config, Error, Event, HandleError, handler_fn};

const YAML: &str = r#"
domain:
  type: memory
  source: orders-service
  codec: jxt
  memory: { partitions: 8, ack_wait: 30d }
  pool: { max_concurrency: 64, max_in_flight: 5000, max_per_key: 100, drain_deadline: 10s }
  retry: { attempts: 7, initial_backoff: 100ms, max_backoff: 10s }
  dead_letter: { suffix: ".dead" }
  handler_timeout: 2s
simple:
  type: memory
  max_concurrency: 32
"#;

/// Parses `yaml` while no other test changes the environment (the tests that set variables
/// do it inside a `figment::Jail`, whose lock this takes as well): async tests would
/// otherwise read another test's overrides.
fn parse_alone(yaml: &str) -> dualbus::Result<Config> {
    let mut parsed = None;
    figment::Jail::expect_with(|_| {
        parsed = Some(Config::from_yaml(yaml));
        Ok(())
    });
    parsed.expect("the jail ran the closure")
}

fn config_error(r: dualbus::Result<Config>) -> (String, String) {
    match r {
        Err(Error::Config { path, message }) => (path, message),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn yaml_with_durations() {
    figment::Jail::expect_with(|_| {
        let c = Config::from_yaml(YAML).unwrap();
        assert_eq!(c.domain.kind, BackendKind::Memory);
        assert_eq!(c.domain.source.as_deref(), Some("orders-service"));
        assert_eq!(c.domain.codec, CodecKind::Jxt);
        let m = c.domain.memory.as_ref().unwrap();
        assert_eq!(
            (m.partitions, m.ack_wait),
            (8, Duration::from_secs(30 * 86_400))
        );
        assert_eq!(c.domain.pool.max_in_flight, 5000);
        assert_eq!(c.domain.pool.drain_deadline, Duration::from_secs(10));
        assert_eq!(c.domain.retry.attempts, 7);
        assert_eq!(c.domain.retry.initial_backoff, Duration::from_millis(100));
        assert_eq!(c.domain.dead_letter.suffix, ".dead");
        assert_eq!(c.domain.handler_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.simple.max_concurrency, 32);
        Ok(())
    });
}

#[test]
fn toml_file_and_defaults() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "dualbus.toml",
            r#"
[domain]
source = "billing"
[domain.retry]
attempts = 3
max_backoff = "1m"
"#,
        )?;
        let c = Config::from_file("dualbus.toml").unwrap();
        assert_eq!(c.domain.source.as_deref(), Some("billing"));
        assert_eq!(c.domain.retry.attempts, 3);
        assert_eq!(c.domain.retry.max_backoff, Duration::from_secs(60));
        // Untouched keys keep their defaults.
        assert_eq!(c.domain.pool.max_in_flight, 10_000);
        assert_eq!(c.domain.codec, CodecKind::Cloudevents);
        let (path, message) = config_error(Config::from_file("missing.yaml"));
        assert_eq!(path, "");
        assert!(message.contains("not found"), "{message}");
        jail.create_file("dualbus.ini", "x=1")?;
        let (_, message) = config_error(Config::from_file("dualbus.ini"));
        assert!(message.contains(".yaml"), "{message}");
        Ok(())
    });
}

#[test]
fn environment_overrides() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("dualbus.yaml", YAML)?;
        jail.set_env("DUALBUS__DOMAIN__POOL__MAX_IN_FLIGHT", "500");
        jail.set_env("DUALBUS__DOMAIN__RETRY__INITIAL_BACKOFF", "250ms");
        jail.set_env("DUALBUS__DOMAIN__TYPE", "memory");
        jail.set_env("DUALBUS__SIMPLE__MAX_CONCURRENCY", "8");
        let c = Config::from_file("dualbus.yaml").unwrap();
        assert_eq!(c.domain.pool.max_in_flight, 500);
        assert_eq!(
            c.domain.pool.max_concurrency, 64,
            "the file's other keys stay"
        );
        assert_eq!(c.domain.retry.initial_backoff, Duration::from_millis(250));
        assert_eq!(c.simple.max_concurrency, 8);
        Ok(())
    });
}

#[test]
fn unknown_keys_name_their_path() {
    figment::Jail::expect_with(|jail| {
        let (path, message) =
            config_error(Config::from_yaml("domain:\n  pool:\n    max_inflight: 5\n"));
        assert_eq!(path, "domain.pool.max_inflight");
        assert!(
            message.contains("max_in_flight"),
            "the message lists the known keys: {message}"
        );
        let (path, _) = config_error(Config::from_yaml("bogus: 1\n"));
        assert_eq!(path, "bogus");
        let (path, _) = config_error(Config::from_toml("[simple]\nbuffer = 3\n"));
        assert_eq!(path, "simple.buffer");
        jail.set_env("DUALBUS__DOMAIN__BOGUS", "1");
        let (path, _) = config_error(Config::from_yaml(YAML));
        assert_eq!(path, "domain.bogus");
        Ok(())
    });
}

#[test]
fn codec_options() {
    figment::Jail::expect_with(|jail| {
        let codec = |yaml: &str| Config::from_yaml(yaml).unwrap().domain.wire_codec();
        assert_eq!(codec("{}"), Codec::CloudEvents);
        assert_eq!(
            codec("domain:\n  cloudevents_mode: structured\n"),
            Codec::CloudEventsStructured
        );
        assert_eq!(codec("domain:\n  codec: jxt\n"), Codec::JxtJson);
        let c = Config::from_yaml("domain:\n  codec: jxt\n  jxt_tenant_id: string\n").unwrap();
        assert_eq!(c.domain.jxt_tenant_id, Some(JxtTenantId::String));
        assert_eq!(c.domain.wire_codec(), Codec::JxtJsonStringTenant);
        let c =
            Config::from_toml("[domain]\ncodec = \"jxt\"\njxt_tenant_id = \"number\"\n").unwrap();
        assert_eq!(c.domain.wire_codec(), Codec::JxtJson);
        // An option of the other codec is a mistake, named by its path.
        let (path, message) = config_error(Config::from_yaml("domain:\n  jxt_tenant_id: string\n"));
        assert_eq!(path, "domain.jxt_tenant_id");
        assert!(message.contains("codec: jxt"), "{message}");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  codec: jxt\n  cloudevents_mode: structured\n",
        ));
        assert_eq!(path, "domain.cloudevents_mode");
        let (path, message) = config_error(Config::from_yaml(
            "domain:\n  codec: jxt\n  jxt_tenant_id: text\n",
        ));
        assert_eq!(path, "domain.jxt_tenant_id");
        assert!(message.contains("`string`"), "{message}");
        jail.set_env("DUALBUS__DOMAIN__JXT_TENANT_ID", "string");
        assert_eq!(codec(YAML), Codec::JxtJsonStringTenant);
        Ok(())
    });
}

#[tokio::test]
async fn jxt_tenant_id_option_reaches_the_publisher() {
    let event = dualbus::Envelope::new("o-1", "Created", 1, "{}")
        .unwrap()
        .with_tenant_id("tenant-a");
    for (yaml, accepted) in [
        ("domain:\n  codec: jxt\n", false),
        ("domain:\n  codec: jxt\n  jxt_tenant_id: string\n", true),
    ] {
        let buses = Buses::from_config(&parse_alone(yaml).unwrap())
            .await
            .unwrap();
        let result = buses.domain().publish("orders", &event).await;
        match result {
            Ok(_) => assert!(accepted, "{yaml}"),
            Err(e) => {
                assert!(!accepted, "{yaml}: {e}");
                assert_eq!(e.kind(), dualbus::ErrorKind::InvalidInput);
                assert!(e.to_string().contains("jxt_tenant_id"), "{e}");
            }
        }
        buses.close().await.unwrap();
    }
}

#[test]
fn bad_values_name_their_path() {
    figment::Jail::expect_with(|_| {
        let (path, message) = config_error(Config::from_yaml(
            "domain:\n  retry:\n    initial_backoff: soon\n",
        ));
        assert_eq!(path, "domain.retry.initial_backoff");
        assert!(message.contains("30s"), "{message}");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  pool:\n    max_concurrency: 0\n",
        ));
        assert_eq!(path, "domain.pool.max_concurrency");
        let (path, message) = config_error(Config::from_yaml("domain:\n  type: rabbitmq\n"));
        assert_eq!(path, "domain.type");
        assert!(message.contains("nats"), "{message}");
        let (path, _) = config_error(Config::from_yaml("simple:\n  type: kafka\n"));
        assert_eq!(path, "simple.type");
        let (path, _) = config_error(
            Config::from_yaml("domain:\n  memory: { partitions: 0 }\n").and_then(|c| {
                // Caught when the backend is built.
                block_on(Buses::from_config(&c)).map(|_| c)
            }),
        );
        assert_eq!(path, "domain.memory.partitions");
        Ok(())
    });
}

#[test]
fn sections_of_disabled_backends_name_the_feature() {
    figment::Jail::expect_with(|_| {
        let nats = Config::from_yaml(
            "domain:\n  type: nats\n  group: { partitions: 4 }\n  nats:\n    urls: [\"nats://127.0.0.1:4222\"]\n",
        );
        if cfg!(feature = "nats") {
            // NATS topics are partitioned: the setting is taken.
            assert!(nats.is_ok(), "{nats:?}");
        } else {
            let (path, message) = config_error(nats);
            assert_eq!(path, "domain.type");
            assert!(message.contains("cargo feature `nats`"), "{message}");
        }
        let (path, message) = config_error(Config::from_yaml("domain:\n  kafka: { brokers: x }\n"));
        if cfg!(feature = "kafka") {
            // The section is read: its unknown key is named.
            assert_eq!(path, "domain.kafka.brokers");
        } else {
            assert_eq!(path, "domain.kafka");
            assert!(message.contains("cargo feature `kafka`"), "{message}");
        }
        let (path, message) = config_error(Config::from_yaml("simple:\n  redis: { url: x }\n"));
        if cfg!(feature = "redis") {
            // The section is read and checked: the URL is not one.
            assert_eq!(path, "redis.url");
        } else {
            assert_eq!(path, "simple.redis");
            assert!(message.contains("cargo feature `redis`"), "{message}");
        }
        Ok(())
    });
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[tokio::test]
async fn buses_from_config_work() {
    let config = parse_alone(YAML).unwrap();
    let buses = Buses::from_config(&config).await.unwrap();
    assert_eq!(buses.domain().source(), "orders-service");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    let sub = buses
        .domain()
        .subscribe("orders")
        .start(handler_fn(move |e: Event| {
            let s = s.clone();
            async move {
                assert_eq!(
                    e.source.as_deref(),
                    Some("orders-service"),
                    "jxt mode carries the source in a header"
                );
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    let e = dualbus::Envelope::new("o-1", "Created", 1, "{}").unwrap();
    buses.domain().publish("orders", &e).await.unwrap();
    while sub.stats().acked < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The default group is the source.
    assert_eq!(sub.group(), "orders-service");
    drop(sub);
    buses.close().await.unwrap();
    buses.close().await.unwrap();
}

#[test]
fn group_and_topic_settings() {
    figment::Jail::expect_with(|jail| {
        let c = Config::from_yaml(
            "domain:\n  group: { name: billing, partitions: 8, drain_deadline: 3s }\n  topics: { payments: { partitions: 2 } }\n",
        )
        .unwrap();
        assert_eq!(c.domain.group.name.as_deref(), Some("billing"));
        assert_eq!(c.domain.group.partitions, Some(8));
        assert_eq!(c.domain.group.drain_deadline, Some(Duration::from_secs(3)));
        assert_eq!(c.domain.topics["payments"].partitions, Some(2));
        let (path, _) = config_error(Config::from_yaml("domain:\n  group: { size: 3 }\n"));
        assert_eq!(path, "domain.group.size");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  topics: { payments: { partition: 3 } }\n",
        ));
        assert_eq!(path, "domain.topics.payments.partition");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  topics: { payments: { partitions: 0 } }\n",
        ));
        assert_eq!(path, "domain.topics.payments.partitions");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  topics: { \"bad topic\": { partitions: 1 } }\n",
        ));
        assert_eq!(path, "domain.topics.bad topic");
        jail.set_env("DUALBUS__DOMAIN__GROUP__NAME", "from-env");
        assert_eq!(
            Config::from_yaml("{}")
                .unwrap()
                .domain
                .group
                .name
                .as_deref(),
            Some("from-env")
        );
        Ok(())
    });
}

/// `group.member_timeout` is read from a file and from the environment, whatever the
/// backend, and checked: a bad value and one below 300 ms are errors at its path.
#[test]
fn member_timeout_is_read_and_checked() {
    figment::Jail::expect_with(|jail| {
        let c = Config::from_yaml("domain:\n  group: { member_timeout: 5s }\n").unwrap();
        assert_eq!(c.domain.group.member_timeout, Some(Duration::from_secs(5)));
        let c = Config::from_toml("[domain.group]\nmember_timeout = \"500ms\"\n").unwrap();
        assert_eq!(
            c.domain.group.member_timeout,
            Some(Duration::from_millis(500))
        );
        let (path, message) = config_error(Config::from_yaml(
            "domain:\n  group: { member_timeout: 100ms }\n",
        ));
        assert_eq!(path, "domain.group.member_timeout");
        assert!(message.contains("300ms"), "{message}");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  group: { member_timeout: 299ms }\n",
        ));
        assert_eq!(path, "domain.group.member_timeout");
        for ok in ["300ms", "301ms"] {
            let c = Config::from_yaml(&format!("domain:\n  group: {{ member_timeout: {ok} }}\n"))
                .unwrap();
            assert!(c.domain.group.member_timeout.is_some(), "{ok}");
        }
        // A bad value is reported as such.
        let (path, message) = config_error(Config::from_yaml(
            "domain:\n  group: { member_timeout: soon }\n",
        ));
        assert_eq!(path, "domain.group.member_timeout");
        assert!(message.contains("30s"), "{message}");
        jail.set_env("DUALBUS__DOMAIN__GROUP__MEMBER_TIMEOUT", "7s");
        let c = Config::from_yaml("{}").unwrap();
        assert_eq!(c.domain.group.member_timeout, Some(Duration::from_secs(7)));
        Ok(())
    });
}

/// The memory sections reach the brokers: without `simple.memory` the simple bus runs on the
/// domain bus's broker (its settings), with one it gets a broker of its own. (That the
/// shared broker is one broker is checked by the unit tests of the backend table.)
#[tokio::test]
async fn memory_sections_reach_the_brokers() {
    let payloads = |yaml: &str| {
        let yaml = yaml.to_owned();
        async move {
            let buses = Buses::from_config(&parse_alone(&yaml).unwrap())
                .await
                .unwrap();
            let sizes = (
                buses.domain().capabilities().max_payload,
                buses.simple().capabilities().max_payload,
            );
            buses.close().await.unwrap();
            sizes
        }
    };
    assert_eq!(
        payloads("domain:\n  memory: { max_payload: 2048 }\n").await,
        (2048, 2048)
    );
    assert_eq!(
        payloads(
            "domain:\n  memory: { max_payload: 2048 }\nsimple:\n  memory: { max_payload: 4096 }\n"
        )
        .await,
        (2048, 4096)
    );
    assert_eq!(
        payloads("simple:\n  memory: { max_payload: 4096 }\n").await,
        (1024 * 1024, 4096)
    );
}

#[tokio::test]
async fn configured_groups_and_partitions_are_used() {
    let config = parse_alone(
        "domain:\n  source: shop\n  group: { name: billing, partitions: 8 }\n  topics: { payments: { partitions: 2 } }\n",
    )
    .unwrap();
    let buses = Buses::from_config(&config).await.unwrap();
    let parts = std::sync::Arc::new(max::Max::default());
    let p = parts.clone();
    let sub = buses
        .domain()
        .subscribe("payments")
        .start(handler_fn(move |e: Event| {
            let p = p.clone();
            async move {
                p.record(e.position.partition);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    assert_eq!(sub.group(), "billing");
    for i in 0..20 {
        let e = dualbus::Envelope::new(format!("p-{i}"), "Paid", 1, "{}").unwrap();
        buses.domain().publish("payments", &e).await.unwrap();
    }
    while sub.stats().acked < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(parts.max() < 2, "payments has 2 partitions");
    assert_eq!(sub.active_partitions(), vec![0, 1]);
    drop(sub);
    buses.close().await.unwrap();
}

mod max {
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    pub(crate) struct Max(AtomicU32);

    impl Max {
        pub(crate) fn record(&self, v: u32) {
            self.0.fetch_max(v, Ordering::SeqCst);
        }
        pub(crate) fn max(&self) -> u32 {
            self.0.load(Ordering::SeqCst)
        }
    }
}

#[cfg(feature = "nats")]
#[test]
fn nats_section() {
    figment::Jail::expect_with(|_| {
        let c = Config::from_yaml(
            "simple:\n  type: nats\n  nats:\n    urls: [\"nats://127.0.0.1:4222\"]\n    name: shop\n    credentials: { user: app, password: s3cret }\n    connect_timeout: 2s\n",
        )
        .unwrap();
        assert_eq!(c.simple.kind, BackendKind::Nats);
        let (path, _) = config_error(Config::from_yaml(
            "simple:\n  type: nats\n  nats: { url: x }\n",
        ));
        assert_eq!(path, "simple.nats.url");
        let (path, _) = config_error(Config::from_yaml(
            "simple:\n  nats: { credentials: { passwd: x } }\n",
        ));
        assert_eq!(path, "simple.nats.credentials.passwd");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "secrets must not be printed: {c:?}"
        );
        Ok(())
    });
}

/// The test server's URL; `None` (skip) without one unless servers are required.
#[cfg(feature = "nats")]
fn nats_url() -> Option<String> {
    let url = std::env::var("DUALBUS_TEST_NATS_URL").ok();
    if url.is_none() {
        assert!(
            std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_none(),
            "DUALBUS_TEST_NATS_URL is required"
        );
        eprintln!("skipped: no nats-server (DUALBUS_TEST_NATS_URL)");
    }
    url
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn simple_bus_on_nats_from_config() {
    let Some(url) = nats_url() else { return };
    let config = parse_alone(&format!(
        "simple:\n  type: nats\n  nats: {{ urls: [\"{url}\"] }}\n"
    ))
    .unwrap();
    let buses = Buses::from_config(&config).await.unwrap();
    assert_eq!(buses.simple().capabilities().backend, "nats");
    assert_eq!(buses.domain().capabilities().backend, "memory");
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = got.clone();
    let sub = buses
        .simple()
        .subscribe("config-nats")
        .start(handler_fn(move |_m: dualbus::Message| {
            let g = g.clone();
            async move {
                g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    while got.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        buses.simple().publish("config-nats", "hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(sub);
    buses.close().await.unwrap();
}

#[cfg(feature = "nats")]
#[test]
fn nats_domain_section() {
    figment::Jail::expect_with(|_| {
        let c = Config::from_yaml(
            "domain:\n  type: nats\n  nats:\n    urls: [\"nats://127.0.0.1:4222\"]\n    jetstream:\n      stream: { storage: memory, max_age: 7d, duplicate_window: 1m }\n      consumer: { ack_wait: 10s, lease_ttl: 3s }\n",
        )
        .unwrap();
        assert_eq!(c.domain.kind, BackendKind::Nats);
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  type: nats\n  nats: { jetstream: { stream: { max_agee: 1d } } }\n",
        ));
        assert_eq!(path, "domain.nats.jetstream.stream.max_agee");
        let (path, _) = config_error(Config::from_yaml(
            "domain:\n  type: nats\n  nats: { jetstream: { stream: { storage: tape } } }\n",
        ));
        assert_eq!(path, "domain.nats.jetstream.stream.storage");
        Ok(())
    });
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn domain_bus_on_jetstream_from_config() {
    let Some(url) = nats_url() else { return };
    let config = parse_alone(&format!(
        "domain:\n  type: nats\n  source: config-test\n  nats: {{ urls: [\"{url}\"], jetstream: {{ consumer: {{ ack_wait: 2s, lease_ttl: 2s }} }} }}\nsimple:\n  type: nats\n  nats: {{ urls: [\"{url}\"] }}\n"
    ))
    .unwrap();
    let buses = Buses::from_config(&config).await.unwrap();
    assert_eq!(buses.domain().capabilities().backend, "nats");
    assert!(buses.domain().capabilities().durable);
    let topic = format!(
        "config-js-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let got = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let g = got.clone();
    let sub = buses
        .domain()
        .subscribe(&topic)
        .start(handler_fn(move |e: dualbus::Event| {
            let g = g.clone();
            async move {
                g.lock().push(e.event_version);
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    for v in 1..=3 {
        let e = dualbus::Envelope::new("order-1", "OrderPlaced", v, "{}").unwrap();
        buses.domain().publish(&topic, &e).await.unwrap();
    }
    while got.lock().len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*got.lock(), [1, 2, 3]);
    drop(sub);
    buses.close().await.unwrap();
}

/// Group names follow the rule of topic names: a bad `domain.group.name` is refused with
/// its key, in the file and in the builder; a URI as the source gives a valid default group
/// (every other character replaced by `_`); a bad group on subscribe is refused.
#[test]
fn group_names_are_checked() {
    figment::Jail::expect_with(|_| {
        for bad in ["a b", "*", "a\\nb", "a..b", "orders/eu"] {
            let (path, message) = config_error(Config::from_yaml(&format!(
                "domain:\n  group: {{ name: \"{bad}\" }}\n"
            )));
            assert_eq!(path, "domain.group.name", "{bad:?}");
            assert!(message.contains("invalid group name"), "{message}");
        }
        Ok(())
    });
    let e = Buses::builder()
        .default_group("a b")
        .build()
        .expect_err("a bad default group");
    assert_eq!(e.kind(), dualbus::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("domain.group.name"), "{e}");

    let mut config = None;
    figment::Jail::expect_with(|_| {
        config = Some(
            Config::from_yaml("domain:\n  source: \"https://shop.example/orders\"\n").unwrap(),
        );
        Ok(())
    });
    let config = config.unwrap();
    block_on(async {
        let buses = Buses::from_config(&config).await.unwrap();
        let ok = handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) });
        let sub = buses.domain().subscribe("orders").start(ok).await.unwrap();
        assert_eq!(sub.group(), "https___shop_example_orders");
        drop(sub);
        let e = buses
            .domain()
            .subscribe("orders")
            .group("a b")
            .start(ok)
            .await
            .expect_err("a bad group");
        assert_eq!(e.kind(), dualbus::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("`group`"), "{e}");
        buses.close().await.unwrap();
    });
}

/// A password in a configured NATS URL shows nowhere: not in `Debug` of the configuration,
/// not in the errors of a bad URL, a misspelt section or an unreachable server.
#[cfg(feature = "nats")]
#[test]
fn nats_url_credentials_never_show() {
    const PASSWORD: &str = "pw-Zq9xK7-secret";
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let yaml = |urls: &str| {
        format!(
            "domain:\n  type: nats\n  nats: {{ urls: {urls}, connect_timeout: 1s }}\nsimple:\n  type: nats\n  nats: {{ urls: {urls}, connect_timeout: 1s }}\n"
        )
    };
    let check = |what: &str, text: String| {
        assert!(
            !text.contains(PASSWORD),
            "{what} shows the password: {text}"
        );
    };
    let mut configs = None;
    figment::Jail::expect_with(|_| {
        // A single string instead of a list: the error must not quote it.
        let e = Config::from_yaml(&yaml(&format!("\"nats://u:{PASSWORD}@127.0.0.1:{port}\"")))
            .expect_err("urls must be a list");
        assert!(e.to_string().contains("domain.nats.urls"), "{e}");
        check("a type error", format!("{e} {e:?}"));
        let good = Config::from_yaml(&yaml(&format!(
            "[\"nats://u:{PASSWORD}@127.0.0.1:{port}\"]"
        )))
        .unwrap();
        let bad = Config::from_yaml(&yaml(&format!(
            "[\"nats://u:{PASSWORD}@127.0.0.1:notaport\"]"
        )))
        .unwrap();
        configs = Some((good, bad));
        Ok(())
    });
    let (reachable_config, bad_url_config) = configs.unwrap();
    check("Debug of Config", format!("{reachable_config:?}"));
    check("Debug of Config", format!("{bad_url_config:?}"));
    check(
        "Debug of DomainSection",
        format!("{:?}", reachable_config.domain),
    );
    check(
        "Debug of SimpleSection",
        format!("{:?}", reachable_config.simple),
    );
    block_on(async {
        let e = Buses::from_config(&reachable_config)
            .await
            .expect_err("nobody listens");
        assert_eq!(e.kind(), dualbus::ErrorKind::Unavailable, "{e}");
        check("an unreachable server", format!("{e} {e:?}"));
        let e = Buses::from_config(&bad_url_config)
            .await
            .expect_err("an invalid URL");
        assert_eq!(e.kind(), dualbus::ErrorKind::InvalidInput, "{e}");
        check("an invalid URL", format!("{e} {e:?}"));
    });
}

#[test]
fn the_otel_section_is_read_or_names_its_feature() {
    figment::Jail::expect_with(|_| {
        let r = Config::from_yaml("otel: { sampler: sometimes }\n");
        if cfg!(feature = "otel") {
            let (path, message) = config_error(r);
            assert_eq!(path, "otel.sampler");
            assert!(message.contains("parentbased_always_on"), "{message}");
            let (path, _) = config_error(Config::from_yaml("otel: { colour: blue }\n"));
            assert_eq!(path, "otel.colour");
            let (path, _) = config_error(Config::from_yaml("otel: { sampler_ratio: 2.0 }\n"));
            assert_eq!(path, "otel.sampler_ratio");
            let (path, _) = config_error(Config::from_yaml(
                "otel:\n  attributes: { payload: true }\n",
            ));
            assert_eq!(path, "otel.attributes.payload");
            assert!(
                Config::from_yaml(
                    "otel: { sampler: traceidratio, sampler_ratio: 0.25, lag_interval: 2s }\n"
                )
                .is_ok()
            );
        } else {
            let (path, message) = config_error(r);
            assert_eq!(path, "otel");
            assert!(message.contains("`otel` feature"), "{message}");
        }
        Ok(())
    });
}

/// An `otel` section puts the layers on both buses: events carry a `traceparent`.
#[cfg(feature = "otel")]
#[tokio::test]
async fn an_otel_section_traces_both_buses() {
    let config =
        parse_alone("domain: { type: memory, source: traced-service }\notel: { exporter: none }\n")
            .unwrap();
    let buses = Buses::from_config(&config).await.unwrap();
    assert!(buses.telemetry().is_some());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let sub = buses
        .domain()
        .subscribe("traced")
        .start(handler_fn(move |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(e.headers.get("traceparent").map(str::to_owned))
                    .ok();
                Ok::<_, HandleError>(())
            }
        }))
        .await
        .unwrap();
    let e = dualbus::Envelope::new("o-1", "Created", 1, "{}").unwrap();
    buses.domain().publish("traced", &e).await.unwrap();
    let tp = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(tp.is_some_and(|t| t.starts_with("00-") && t.ends_with("-01")));
    sub.shutdown().await;
    buses.close().await.unwrap();
}
