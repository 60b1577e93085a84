//! Topics: created at first use with the configured partitions, replication and
//! retention, and their partition counts known.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualbus_core::{Error, Result};
use parking_lot::RwLock;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;

use crate::{BACKEND, KafkaConfig, Logs, kafka_error};

/// What the transport knows of topics.
pub(crate) struct Topics {
    config: Arc<KafkaConfig>,
    admin: Arc<AdminClient<Logs>>,
    /// Partition counts of the topics known to exist.
    ready: RwLock<HashMap<String, u32>>,
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend(BACKEND, false, e))?
}

impl Topics {
    pub(crate) fn new(config: Arc<KafkaConfig>, admin: AdminClient<Logs>) -> Self {
        Self {
            config,
            admin: Arc::new(admin),
            ready: RwLock::new(HashMap::new()),
        }
    }

    /// Whether a broker answers a metadata request.
    pub(crate) async fn check_reachable(&self, producer: &FutureProducer<Logs>) -> Result<()> {
        let producer = producer.clone();
        let timeout = self.config.request_timeout;
        let servers = self.config.bootstrap_servers.join(",");
        blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| Error::Unavailable {
                    backend: BACKEND,
                    source: format!("no broker of {servers} answered within {timeout:?}: {e}")
                        .into(),
                })
        })
        .await
    }

    /// The partition count of `topic`, creating it first when it is missing and
    /// [`TopicSettings::create`](crate::TopicSettings::create) is on.
    pub(crate) async fn ready(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.ready.read().get(topic) {
            return Ok(*n);
        }
        if self.config.topics.create {
            self.create(topic).await?;
        }
        let n = self.partitions(topic).await?;
        self.ready.write().insert(topic.to_owned(), n);
        Ok(n)
    }

    /// The partition count the cluster reports now (no cache).
    pub(crate) async fn partitions(&self, topic: &str) -> Result<u32> {
        let admin = self.admin.clone();
        let timeout = self.config.request_timeout;
        let topic = topic.to_owned();
        blocking(move || {
            let started = Instant::now();
            loop {
                let md = admin
                    .inner()
                    .fetch_metadata(Some(&topic), timeout)
                    .map_err(kafka_error)?;
                let t = md.topics().iter().find(|t| t.name() == topic);
                match t {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        return u32::try_from(t.partitions().len())
                            .map_err(|e| Error::backend(BACKEND, false, e));
                    }
                    _ if started.elapsed() >= timeout => {
                        return Err(Error::Unavailable {
                            backend: BACKEND,
                            source: format!(
                                "topic {topic:?} does not exist (or has no leader) after {timeout:?}"
                            )
                            .into(),
                        });
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .await
    }

    async fn create(&self, topic: &str) -> Result<()> {
        let t = &self.config.topics;
        let retention = t.retention.map(|r| r.as_millis().to_string());
        let partitions = i32::try_from(t.partitions_of.get(topic).copied().unwrap_or(t.partitions))
            .map_err(|_| Error::config("kafka.topics.partitions", "too many partitions"))?;
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(t.replication));
        if let Some(r) = &retention {
            new = new.set("retention.ms", r);
        }
        for (k, v) in &t.configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new()
            .request_timeout(Some(self.config.request_timeout))
            .operation_timeout(Some(self.config.request_timeout));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(kafka_error)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    let e = rdkafka::error::KafkaError::AdminOp(code);
                    let mut err = kafka_error(e);
                    if matches!(
                        code,
                        RDKafkaErrorCode::InvalidTopic
                            | RDKafkaErrorCode::InvalidPartitions
                            | RDKafkaErrorCode::InvalidReplicationFactor
                            | RDKafkaErrorCode::InvalidConfig
                            | RDKafkaErrorCode::PolicyViolation
                    ) {
                        err = Error::config(
                            "kafka.topics",
                            format!("the broker refused to create topic {name:?}: {code}"),
                        );
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}
