//! Publishing: acknowledged and deduplicated publishes, pipelined batches that keep each
//! aggregate's order, and appends checked against the aggregate's last position.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use dualbus_core::{Error, OutboundMessage, Position, Receipt, Result, Topic, Write};

use crate::{BACKEND, headers, unavailable};

use super::config::Layout;
use super::plan::Plan;
use super::{JetStream, not_per_aggregate, timeout};

impl JetStream {
    /// Sends one message; the returned future resolves on the server's ack. Core checked
    /// the message (headers, size with the headers added here counted), so nothing here
    /// can be refused before the server sees it.
    async fn send(
        &self,
        topic: &Topic,
        plan: &Plan,
        message: OutboundMessage,
        expected: Option<Option<Position>>,
    ) -> Result<PublishAckFuture> {
        let mut headers = headers::to_nats_with_id(message.headers(), message.id());
        if let Some(expected) = expected {
            debug_assert_eq!(message.write(), Write::Append, "checked for an append");
            let seq = expected.map_or(0, |p| p.offset);
            headers::expect_last_subject_sequence(&mut headers, seq);
        }
        let message = message.into_parts();
        let subject = plan.subject(topic, &message.key);
        self.inner
            .js
            .publish_with_headers(subject, headers, message.payload)
            .await
            .map_err(|e| publish_error(e, self.inner.config.request_timeout, &message.key))
    }

    pub(super) async fn publish_inner(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Option<Position>>,
    ) -> Result<Receipt> {
        self.check_open()?;
        let plan = self.ready(topic).await?;
        let key = message.key().to_owned();
        let ack = self.send(topic, &plan, message, expected).await?;
        self.settle(topic, ack, &key).await
    }

    /// Awaits the server's ack. A stream deleted behind our back is forgotten, so that the
    /// next publish creates it again.
    async fn settle(&self, topic: &Topic, ack: PublishAckFuture, key: &str) -> Result<Receipt> {
        let ack = ack.await;
        if let Err(e) = &ack
            && matches!(e.kind(), PublishErrorKind::StreamNotFound)
        {
            self.inner.ready.write().remove(topic.as_str());
            self.inner.streams.lock().await.remove(topic.as_str());
        }
        receipt(ack, self.inner.config.request_timeout, key)
    }

    /// `DomainTransport::publish_batch`.
    pub(super) async fn publish_batch_inner(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        let n = messages.len();
        let mut out: Vec<Option<Result<Receipt>>> = (0..n).map(|_| None).collect();
        let prepared = match self.check_open() {
            Ok(()) => self.ready(topic).await,
            Err(e) => Err(e),
        };
        let plan = match prepared {
            Ok(p) => p,
            Err(e) => return (0..n).map(|_| Err(e.for_each_in_batch(BACKEND))).collect(),
        };
        let window = self.inner.config.publish_window;
        // Keys with a failed event: their later events in this batch are not sent, so an
        // aggregate's stored events never skip one.
        let mut failed_keys: HashMap<String, usize> = HashMap::new();
        let mut pending: VecDeque<(usize, String, PublishAckFuture)> = VecDeque::new();
        for (i, message) in messages.into_iter().enumerate() {
            if pending.len() >= window
                && let Some((j, key, ack)) = pending.pop_front()
            {
                let r = self.settle(topic, ack, &key).await;
                if r.is_err() {
                    failed_keys.entry(key).or_insert(j);
                }
                out[j] = Some(r);
            }
            if let Some(first) = failed_keys.get(message.key()) {
                out[i] = Some(Err(Error::backend(
                    BACKEND,
                    true,
                    format!(
                        "not sent: event {first} of this batch for aggregate {:?} failed",
                        message.key()
                    ),
                )));
                continue;
            }
            let key = message.key().to_owned();
            match self.send(topic, &plan, message, None).await {
                Ok(ack) => pending.push_back((i, key, ack)),
                Err(e) => {
                    failed_keys.entry(key).or_insert(i);
                    out[i] = Some(Err(e));
                }
            }
        }
        for (j, key, ack) in pending {
            out[j] = Some(self.settle(topic, ack, &key).await);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::backend(BACKEND, true, "not sent"))))
            .collect()
    }

    /// `DomainTransport::publish_if_last`.
    pub(super) async fn publish_if_last_inner(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        if self.plan(topic).layout == Layout::Subject {
            return Err(not_per_aggregate());
        }
        self.publish_inner(topic, message, Some(expected)).await
    }
}

fn publish_error(e: jetstream::context::PublishError, after: Duration, key: &str) -> Error {
    match e.kind() {
        PublishErrorKind::TimedOut => {
            timeout("publish (the message may or may not be stored)", after)
        }
        PublishErrorKind::BrokenPipe => unavailable(e),
        PublishErrorKind::WrongLastSequence => Error::Conflict(format!(
            "aggregate {key:?} has a newer event than the expected one"
        )),
        PublishErrorKind::MaxPayloadExceeded => Error::backend(BACKEND, false, e),
        _ => Error::backend(BACKEND, true, e),
    }
}

fn receipt(
    ack: std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    after: Duration,
    key: &str,
) -> Result<Receipt> {
    let ack = ack.map_err(|e| publish_error(e, after, key))?;
    let r = Receipt::at(Position {
        partition: 0,
        offset: u128::from(ack.sequence),
    });
    Ok(if ack.duplicate { r.as_duplicate() } else { r })
}
