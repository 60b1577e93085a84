//! Publishing: one record per envelope, keyed by the aggregate id, resolved on the
//! broker's delivery report.

use std::future::Future;

use dualbus_core::{Error, OutboundMessage, Position, Receipt, Result, Topic};
use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::config::Partitioner;
use crate::partition::partition_of;
use crate::{BACKEND, Kafka, headers, kafka_error};

/// A record ready to go: its parts and, with sarama placement, its partition.
struct Prepared {
    key: String,
    headers: rdkafka::message::OwnedHeaders,
    payload: bytes::Bytes,
    partition: Option<i32>,
}

impl Prepared {
    fn record(self, topic: &str) -> Record<'_> {
        Record {
            topic,
            key: self.key,
            payload: self.payload,
            headers: Some(self.headers),
            partition: self.partition,
        }
    }
}

/// A record that owns its parts (librdkafka copies them when it enqueues).
struct Record<'a> {
    topic: &'a str,
    key: String,
    payload: bytes::Bytes,
    headers: Option<rdkafka::message::OwnedHeaders>,
    partition: Option<i32>,
}

impl Record<'_> {
    /// The record as rdkafka takes it; the headers move in (no copy).
    fn future(&mut self) -> FutureRecord<'_, str, [u8]> {
        let mut r = FutureRecord::to(self.topic)
            .key(self.key.as_str())
            .payload(self.payload.as_ref());
        if let Some(h) = self.headers.take() {
            r = r.headers(h);
        }
        if let Some(p) = self.partition {
            r = r.partition(p);
        }
        r
    }
}

/// The receipt of a delivery report. librdkafka reports a negative offset when it could not
/// learn where the record landed although the broker persisted it (for example when an
/// idempotent retry is answered with `DUPLICATE_SEQUENCE_NUMBER`): the publish succeeded, so
/// the receipt is returned without a position rather than as an error.
fn receipt(delivery: rdkafka::producer::future_producer::Delivery) -> Receipt {
    match (
        u32::try_from(delivery.partition),
        u64::try_from(delivery.offset),
    ) {
        (Ok(partition), Ok(offset)) => Receipt::at(Position {
            partition,
            offset: u128::from(offset),
        }),
        _ => Receipt::accepted(),
    }
}

fn delivered(
    r: std::result::Result<
        rdkafka::producer::future_producer::Delivery,
        (KafkaError, rdkafka::message::OwnedMessage),
    >,
) -> Result<Receipt> {
    match r {
        Ok(d) => Ok(receipt(d)),
        Err((e, _)) => Err(produce_error(e)),
    }
}

fn produce_error(e: KafkaError) -> Error {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        return Error::backend(
            BACKEND,
            false,
            format!(
                "{e}: the broker's or topic's message.max.bytes is below kafka.producer.max_message_bytes"
            ),
        );
    }
    kafka_error(e)
}

impl Kafka {
    fn prepare(&self, message: OutboundMessage, partitions: u32) -> Prepared {
        let m = message.into_parts();
        let partition = match self.inner.config.producer.partitioner {
            Partitioner::Murmur2Random => None,
            p @ Partitioner::SaramaFnv1a => {
                i32::try_from(partition_of(p, m.key.as_bytes(), partitions)).ok()
            }
        };
        Prepared {
            headers: headers::to_kafka(&m.headers),
            key: m.key,
            payload: m.payload,
            partition,
        }
    }

    pub(crate) async fn publish_one(
        &self,
        topic: &Topic,
        message: OutboundMessage,
    ) -> Result<Receipt> {
        let partitions = self.inner.topics.ready(topic.as_str()).await?;
        let mut r = self.prepare(message, partitions).record(topic.as_str());
        let wait = self.inner.config.producer.queue_full_wait;
        delivered(
            self.inner
                .producer
                .send(r.future(), Timeout::After(wait))
                .await,
        )
    }

    /// Enqueues every record at once (pipelined), then waits for their reports. A record
    /// that finds the local queue full waits (up to `queue_full_wait`) before the next is
    /// enqueued, so that each aggregate's order holds.
    pub(crate) async fn publish_many(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        let partitions = match self.inner.topics.ready(topic.as_str()).await {
            Ok(n) => n,
            Err(e) => {
                return messages
                    .iter()
                    .map(|_| Err(e.for_each_in_batch(BACKEND)))
                    .collect();
            }
        };
        let wait = self.inner.config.producer.queue_full_wait;
        let prepared: Vec<Prepared> = messages
            .into_iter()
            .map(|m| self.prepare(m, partitions))
            .collect();
        let mut pending: Vec<Box<dyn Future<Output = Result<Receipt>> + Send + Unpin>> =
            Vec::with_capacity(prepared.len());
        for p in prepared {
            let mut r = p.record(topic.as_str());
            let sent = self.inner.producer.send_result(r.future());
            match sent {
                Ok(f) => pending.push(Box::new(report(f))),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    // Wait for room (bounded), keeping the order; the headers come back
                    // with the refused record.
                    let headers = back.headers;
                    r.headers = headers;
                    let r = delivered(
                        self.inner
                            .producer
                            .send(r.future(), Timeout::After(wait))
                            .await,
                    );
                    pending.push(Box::new(futures::future::ready(r)));
                }
                Err((e, _)) => {
                    pending.push(Box::new(futures::future::ready(Err(produce_error(e)))))
                }
            }
        }
        join_all(pending).await
    }
}

fn report(f: DeliveryFuture) -> impl Future<Output = Result<Receipt>> + Send + Unpin {
    use futures::FutureExt as _;
    f.map(|r| match r {
        Ok(r) => delivered(r),
        Err(_) => Err(Error::closed("kafka producer")),
    })
}
