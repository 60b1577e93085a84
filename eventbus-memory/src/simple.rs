//! The simple transport: fan-out to subscribers and queue groups over bounded channels.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::{
    Capabilities, Error, Message, Result, SimpleTransport, request_via_inbox, validate_topic,
};
use futures::StreamExt as _;
use futures::stream::{BoxStream, Stream};
use parking_lot::Mutex;

use crate::Memory;

#[derive(Debug, Default)]
pub(crate) struct SimpleBroker {
    topics: Mutex<HashMap<String, Subscribers>>,
}

#[derive(Debug, Default)]
struct Subscribers {
    next_id: u64,
    /// One channel per plain subscriber.
    plain: HashMap<u64, async_channel::Sender<Message>>,
    /// One shared channel per queue group, with its member count.
    groups: HashMap<String, Group>,
}

#[derive(Debug)]
struct Group {
    tx: async_channel::Sender<Message>,
    rx: async_channel::Receiver<Message>,
    members: usize,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

enum Membership {
    Plain(u64),
    Group(String),
}

/// Leaves the topic when the subscription's stream is dropped.
struct Registration {
    broker: Arc<crate::Broker>,
    topic: String,
    membership: Membership,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut topics = self.broker.simple.topics.lock();
        let Some(subs) = topics.get_mut(&self.topic) else {
            return;
        };
        match &self.membership {
            Membership::Plain(id) => {
                subs.plain.remove(id);
            }
            Membership::Group(g) => {
                if let Some(group) = subs.groups.get_mut(g) {
                    group.members -= 1;
                    if group.members == 0 {
                        subs.groups.remove(g);
                    }
                }
            }
        }
        if subs.is_empty() {
            topics.remove(&self.topic);
        }
    }
}

struct SubscriberStream {
    rx: Pin<Box<async_channel::Receiver<Message>>>,
    _registration: Registration,
}

impl Stream for SubscriberStream {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.as_mut().poll_next(cx)
    }
}

impl Memory {
    fn check_simple_open(&self) -> Result<()> {
        if self.handle.simple_closed.is_cancelled() {
            Err(Error::closed("memory simple transport"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl SimpleTransport for Memory {
    fn capabilities(&self) -> &Capabilities {
        &self.broker.simple_caps
    }

    /// Delivers to every current subscriber and to one member of every queue group. A full
    /// subscriber buffer makes the publisher wait (in-process backpressure, nothing dropped).
    async fn publish(&self, message: Message) -> Result<()> {
        self.check_simple_open()?;
        validate_topic(&message.topic)?;
        crate::check_size(
            &self.broker.simple_caps,
            &message.headers,
            message.payload.len(),
        )?;
        // Fast path under the lock: try_send to every subscriber and group. Only the ones
        // whose buffer is full are awaited, after the lock is released.
        let mut waiting: Vec<(async_channel::Sender<Message>, Message)> = Vec::new();
        {
            let topics = self.broker.simple.topics.lock();
            let Some(s) = topics.get(&message.topic) else {
                return Ok(());
            };
            let mut targets = s
                .plain
                .values()
                .chain(s.groups.values().map(|g| &g.tx))
                .peekable();
            let mut message = Some(message);
            while let Some(tx) = targets.next() {
                let m = if targets.peek().is_none() {
                    message.take()
                } else {
                    message.clone()
                };
                let Some(m) = m else { break };
                if let Err(async_channel::TrySendError::Full(m)) = tx.try_send(m) {
                    waiting.push((tx.clone(), m));
                }
                // A closed channel is a subscriber that just left: nothing to deliver.
            }
        }
        for (tx, m) in waiting {
            let _ = tx.send(m).await;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>> {
        self.check_simple_open()?;
        validate_topic(topic)?;
        let buffer = self.broker.config.simple_buffer;
        let (rx, membership) = {
            let mut topics = self.broker.simple.topics.lock();
            let subs = topics.entry(topic.to_owned()).or_default();
            match queue_group {
                None => {
                    let (tx, rx) = async_channel::bounded(buffer);
                    let id = subs.next_id;
                    subs.next_id += 1;
                    subs.plain.insert(id, tx);
                    (rx, Membership::Plain(id))
                }
                Some(group) => {
                    let entry = subs.groups.entry(group.to_owned()).or_insert_with(|| {
                        let (tx, rx) = async_channel::bounded(buffer);
                        Group { tx, rx, members: 0 }
                    });
                    entry.members += 1;
                    // Every member receives from the same channel: each message to one member.
                    (entry.rx.clone(), Membership::Group(group.to_owned()))
                }
            }
        };
        let stream = SubscriberStream {
            rx: Box::pin(rx),
            _registration: Registration {
                broker: self.broker.clone(),
                topic: topic.to_owned(),
                membership,
            },
        };
        Ok(stream
            .take_until(self.handle.simple_closed.clone().cancelled_owned())
            .boxed())
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        let has_responders = self
            .broker
            .simple
            .topics
            .lock()
            .get(&message.topic)
            .is_some_and(|s| !s.is_empty());
        if !has_responders {
            return Err(Error::NoResponders {
                topic: message.topic,
            });
        }
        request_via_inbox(self, message, timeout).await
    }

    async fn close(&self) -> Result<()> {
        self.handle.simple_closed.cancel();
        Ok(())
    }
}
