//! Reading by offset outside the group: replay of one aggregate, reading a deferred
//! record again, and the group's lag.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dualbus_core::{Error, InboundMessage, Position, Reread, Result, Topic};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::partition::partition_of;
use crate::topics::blocking;
use crate::{BACKEND, Kafka, KafkaConfig, Logs, headers, kafka_error};

/// The group id of clients that only read by offset (never committed, never joined).
const READER_GROUP: &str = "dualbus-reader";

fn reader(config: &KafkaConfig, group: &str) -> Result<BaseConsumer<Logs>> {
    config
        .reader_config(group)
        .create_with_context(Logs)
        .map_err(|e| Error::config("kafka.properties", e.to_string()))
}

fn part(p: u32) -> Result<i32> {
    i32::try_from(p).map_err(|e| Error::backend(BACKEND, false, e))
}

/// A consumed record as the bus's inbound message; an unreadable one (key or header not
/// UTF-8) with what the bus can keep of it, and the reason.
pub(crate) fn inbound(
    topic: &str,
    m: &BorrowedMessage<'_>,
) -> (InboundMessage, Option<&'static str>) {
    let (headers, mut problem) = match headers::from_kafka(m.headers()) {
        Ok(h) => (h, None),
        Err(why) => (dualbus_core::Headers::new(), Some(why)),
    };
    let key = match m.key().map(std::str::from_utf8) {
        None => None,
        Some(Ok(k)) => Some(k.to_owned()),
        Some(Err(_)) => {
            problem = problem.or(Some("the key is not UTF-8"));
            None
        }
    };
    let message = InboundMessage {
        topic: topic.to_owned(),
        key,
        headers,
        payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        position: Position {
            partition: u32::try_from(m.partition()).unwrap_or(0),
            offset: u128::from(u64::try_from(m.offset()).unwrap_or(0)),
        },
    };
    (message, problem)
}

/// Reads records of one partition from `from` up to (not including) `to`, calling `each`
/// for every record.
fn scan(
    consumer: &BaseConsumer<Logs>,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    timeout: Duration,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> bool,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(kafka_error)?;
    consumer.assign(&tpl).map_err(kafka_error)?;
    let mut last_progress = Instant::now();
    let mut next = from;
    while next < to {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                next = m.offset() + 1;
                if m.offset() >= to || !each(&m) {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => {
                // Possibly left over from an earlier assignment: the end only counts when
                // the partition really ends before `next`.
                let (_, high) = consumer
                    .fetch_watermarks(topic, partition, timeout)
                    .map_err(kafka_error)?;
                if next >= high {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(kafka_error(e)),
            None if last_progress.elapsed() > timeout => {
                return Err(Error::Timeout {
                    operation: "reading a partition",
                    after: timeout,
                });
            }
            None => {}
        }
    }
    consumer.unassign().map_err(kafka_error)
}

impl Kafka {
    /// Every record of `topic` with key `key`: its partition (the key's hash over the
    /// topic's partitions now) scanned from its first record to its end.
    pub(crate) async fn replay_key(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        let partitions = self.inner.topics.partitions(topic.as_str()).await?;
        let p = part(partition_of(
            self.inner.config.producer.partitioner,
            key.as_bytes(),
            partitions,
        ))?;
        let config = self.inner.config.clone();
        let topic = topic.as_str().to_owned();
        let key = key.to_owned();
        blocking(move || {
            let c = reader(&config, READER_GROUP)?;
            let (low, high) = c
                .fetch_watermarks(&topic, p, config.request_timeout)
                .map_err(kafka_error)?;
            let mut out = Vec::new();
            scan(&c, &topic, p, low, high, config.request_timeout, |m| {
                if m.key() == Some(key.as_bytes()) {
                    let (message, problem) = inbound(&topic, m);
                    if problem.is_none() {
                        out.push(message);
                    }
                }
                true
            })?;
            Ok(out)
        })
        .await
    }

    /// The group's lag on `topic`: per partition, the log end minus the committed offset
    /// (minus the first offset where nothing is committed), summed.
    pub(crate) async fn lag(&self, topic: &Topic, group: &str) -> Result<u64> {
        let partitions = self.inner.topics.partitions(topic.as_str()).await?;
        let config = self.inner.config.clone();
        let topic = topic.as_str().to_owned();
        let group = group.to_owned();
        blocking(move || {
            let c = reader(&config, &group)?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, part(p)?);
            }
            let committed = committed_with_retry(&c, &tpl, config.request_timeout)?;
            let mut lag = 0u64;
            for e in committed.elements_for_topic(&topic) {
                let (low, high) = c
                    .fetch_watermarks(&topic, e.partition(), config.request_timeout)
                    .map_err(kafka_error)?;
                let from = match e.offset() {
                    Offset::Offset(o) => o.max(low),
                    _ => low,
                };
                lag += u64::try_from(high - from).unwrap_or(0);
            }
            Ok(lag)
        })
        .await
    }

    /// Reads deferred records again by offset, for the keyed pool.
    pub(crate) fn reread(&self, topic: &Topic) -> Arc<dyn Reread> {
        Arc::new(KafkaReread {
            config: self.inner.config.clone(),
            topic: topic.as_str().to_owned(),
            state: Arc::new(Mutex::new(RereadState::default())),
        })
    }
}

/// The group's committed offsets of `tpl`. The group's coordinator may be moving or still
/// loading (`NOT_COORDINATOR`, `COORDINATOR_LOAD_IN_PROGRESS`,
/// `COORDINATOR_NOT_AVAILABLE`, as a busy broker answers for a while): such answers are
/// asked again, with a growing pause, until `timeout` has passed.
fn committed_with_retry(
    c: &BaseConsumer<Logs>,
    tpl: &TopicPartitionList,
    timeout: Duration,
) -> Result<TopicPartitionList> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.committed_offsets(tpl.clone(), left) {
            Ok(committed) => return Ok(committed),
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::NotCoordinator
                            | RDKafkaErrorCode::CoordinatorLoadInProgress
                            | RDKafkaErrorCode::CoordinatorNotAvailable
                    )
                ) && left > pause =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(kafka_error(e)),
        }
    }
}

/// How many records a reread reads ahead of the one asked for: deferred records of one
/// aggregate are asked for one after another, each a little further into the partition.
const READ_AHEAD: i64 = 512;

/// How many records read ahead are kept at most.
const CACHE_MAX: usize = 8192;

/// Reads one record by offset with a reader client kept between calls, and the records
/// after it read ahead into a bounded cache.
struct KafkaReread {
    config: Arc<KafkaConfig>,
    topic: String,
    state: Arc<Mutex<RereadState>>,
}

#[derive(Default)]
struct RereadState {
    consumer: Option<BaseConsumer<Logs>>,
    cache: std::collections::BTreeMap<(u32, u64), InboundMessage>,
}

#[async_trait]
impl Reread for KafkaReread {
    async fn reread(&self, position: Position) -> Result<InboundMessage> {
        let key = (
            position.partition,
            u64::try_from(position.offset).map_err(|e| Error::backend(BACKEND, false, e))?,
        );
        if let Some(m) = self.state.lock().cache.remove(&key) {
            return Ok(m);
        }
        let config = self.config.clone();
        let topic = self.topic.clone();
        let state = self.state.clone();
        blocking(move || {
            let p = part(position.partition)?;
            let offset = i64::try_from(key.1).map_err(|e| Error::backend(BACKEND, false, e))?;
            let mut st = state.lock();
            if let Some(m) = st.cache.remove(&key) {
                return Ok(m);
            }
            if st.consumer.is_none() {
                st.consumer = Some(reader(&config, READER_GROUP)?);
            }
            let RereadState { consumer, cache } = &mut *st;
            let Some(c) = consumer.as_ref() else {
                return Err(Error::closed("kafka reader"));
            };
            let mut found = None;
            // Any failure to read is worth another try: only a record the broker no
            // longer holds is a permanent error (the pool dead-letters on those).
            let retryable = |e: Error| {
                if e.is_retryable() {
                    e
                } else {
                    Error::Unavailable {
                        backend: BACKEND,
                        source: Box::new(e),
                    }
                }
            };
            scan(
                c,
                &topic,
                p,
                offset,
                offset + READ_AHEAD,
                config.request_timeout,
                |m| {
                    let (message, problem) = inbound(&topic, m);
                    if m.offset() == offset {
                        found = Some(message);
                    } else if problem.is_none()
                        && let Ok(o) = u64::try_from(m.offset())
                    {
                        cache.insert((key.0, o), message);
                    }
                    true
                },
            )
            .map_err(retryable)?;
            while cache.len() > CACHE_MAX {
                cache.pop_first();
            }
            found.ok_or_else(|| {
                Error::backend(
                    BACKEND,
                    false,
                    format!("offset {offset} of {topic}[{p}] is no longer held by the broker"),
                )
            })
        })
        .await
    }
}
