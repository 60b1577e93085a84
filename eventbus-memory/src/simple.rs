//! The simple transport: fan-out to subscribers and queue groups over bounded channels.
//!
//! Every subscriber, and every member of a queue group, has a bounded channel of its own.
//! A publish puts the message into every plain subscriber's channel and into the channel of
//! one member per queue group, chosen at publish time: round-robin, skipping members whose
//! buffer is full. Members therefore take turns (two members get half each), and one that
//! stops reading gets nothing more once its buffer is full. A full buffer makes the
//! publisher wait (for a group: until any member has room); nothing is dropped while its
//! subscriber lives. A member that leaves hands the messages left in its buffer to the
//! other members.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::{
    Error, Message, Result, SimpleCapabilities, SimpleOutbound, SimpleTransport, Topic,
    request_via_inbox,
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
    /// The queue groups by name: one channel per member.
    groups: HashMap<String, Group>,
}

/// A queue group: a bounded channel per member; each message goes to one member, chosen at
/// publish time (see [`Group::offer`]).
#[derive(Debug, Default)]
struct Group {
    /// Members in joining order, by id.
    members: Vec<(u64, async_channel::Sender<Message>)>,
    /// The member whose turn is next (round-robin).
    cursor: usize,
}

impl Group {
    /// Hands `message` to the member whose turn it is (round-robin), without waiting: a
    /// member whose buffer is full is skipped, and the next one takes it. `Err` gives the
    /// message back when every member's buffer is full. A group without members drops the
    /// message (nobody to deliver to: at-most-once).
    fn offer(&mut self, message: Message) -> Result<(), Message> {
        let n = self.members.len();
        let mut message = message;
        for step in 0..n {
            let i = (self.cursor + step) % n;
            match self.members[i].1.try_send(message) {
                Ok(()) => {
                    self.cursor = (i + 1) % n;
                    return Ok(());
                }
                // Closed: a member leaving (it is removed from the group before its channel
                // closes, so this is rare); the next one takes it.
                Err(
                    async_channel::TrySendError::Full(m) | async_channel::TrySendError::Closed(m),
                ) => message = m,
            }
        }
        if n == 0 { Ok(()) } else { Err(message) }
    }
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

#[derive(Debug)]
enum Membership {
    Plain(u64),
    Group(String, u64),
}

/// A message waiting for room in a full buffer, after the broker's lock is released.
enum Waiting {
    Plain(async_channel::Sender<Message>, Message),
    Group(String, Message),
}

/// Sends `message` to one member of `group`, waiting while every member's buffer is full:
/// it goes to the first member with room (a member that stopped reading does not hold up
/// the others). If the group is gone, nobody is left to deliver to.
async fn send_to_group(broker: &crate::Broker, topic: &str, group: &str, mut message: Message) {
    loop {
        let members: Vec<async_channel::Sender<Message>> = {
            let mut topics = broker.simple.topics.lock();
            let Some(g) = topics.get_mut(topic).and_then(|s| s.groups.get_mut(group)) else {
                return;
            };
            match g.offer(message) {
                Ok(()) => return,
                Err(back) => message = back,
            }
            g.members.iter().map(|(_, tx)| tx.clone()).collect()
        };
        if members.is_empty() {
            return;
        }
        // Every buffer is full: one send per member, the first to find room wins and the
        // others are dropped unsent (a send that is not polled to completion sends nothing).
        let sends = members.iter().map(|tx| Box::pin(tx.send(message.clone())));
        match futures::future::select_all(sends).await {
            (Ok(()), _, _) => return,
            // That member left meanwhile: offer again to the members there are now.
            (Err(async_channel::SendError(back)), _, _) => message = back,
        }
    }
}

/// A subscriber's delivery stream. Dropping it leaves the topic; a queue-group member hands
/// the messages still in its buffer to the other members.
struct SubscriberStream {
    rx: Pin<Box<async_channel::Receiver<Message>>>,
    broker: Arc<crate::Broker>,
    topic: String,
    membership: Membership,
}

impl Stream for SubscriberStream {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.as_mut().poll_next(cx)
    }
}

impl Drop for SubscriberStream {
    fn drop(&mut self) {
        let mut topics = self.broker.simple.topics.lock();
        let Some(subs) = topics.get_mut(&self.topic) else {
            return;
        };
        let mut handed_over = Vec::new();
        match &self.membership {
            Membership::Plain(id) => {
                subs.plain.remove(id);
            }
            Membership::Group(name, id) => {
                if let Some(group) = subs.groups.get_mut(name) {
                    group.members.retain(|(m, _)| m != id);
                    if group.members.is_empty() {
                        subs.groups.remove(name);
                    } else {
                        // Out of the group first, then closed: a publisher that chose this
                        // member before sees its send fail and offers the message again.
                        // What is in the buffer goes to the others (buffers with room now;
                        // the rest after the lock, waiting for room).
                        self.rx.close();
                        while let Ok(m) = self.rx.try_recv() {
                            if let Err(m) = group.offer(m) {
                                handed_over.push(m);
                            }
                        }
                    }
                }
            }
        }
        if subs.is_empty() {
            topics.remove(&self.topic);
        }
        drop(topics);
        if handed_over.is_empty() {
            return;
        }
        let Membership::Group(name, _) = &self.membership else {
            return;
        };
        // Waiting needs a runtime; the stream is dropped inside one (its subscription's
        // task), but without one these messages are dropped (at-most-once).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (broker, topic, group) = (self.broker.clone(), self.topic.clone(), name.clone());
            rt.spawn(async move {
                for m in handed_over {
                    send_to_group(&broker, &topic, &group, m).await;
                }
            });
        }
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
    fn capabilities(&self) -> &SimpleCapabilities {
        &self.broker.simple_caps
    }

    /// Delivers to every current subscriber and to one member of every queue group. A full
    /// subscriber buffer makes the publisher wait (in-process backpressure, nothing dropped).
    async fn publish(&self, message: SimpleOutbound) -> Result<()> {
        self.check_simple_open()?;
        let message = message.into_message();
        // Fast path under the lock: try_send to every subscriber and to one member of every
        // group. Only the ones whose buffer is full are awaited, after the lock is released.
        let mut waiting: Vec<Waiting> = Vec::new();
        {
            let mut topics = self.broker.simple.topics.lock();
            let Some(s) = topics.get_mut(&message.topic) else {
                return Ok(());
            };
            let targets = s.plain.len() + s.groups.len();
            let mut message = Some(message);
            let mut copy = |sent: &mut usize| {
                *sent += 1;
                if *sent == targets {
                    message.take()
                } else {
                    message.clone()
                }
            };
            let mut sent = 0;
            for tx in s.plain.values() {
                let Some(m) = copy(&mut sent) else { break };
                if let Err(async_channel::TrySendError::Full(m)) = tx.try_send(m) {
                    waiting.push(Waiting::Plain(tx.clone(), m));
                }
                // A closed channel is a subscriber that just left: nothing to deliver.
            }
            for (name, group) in &mut s.groups {
                let Some(m) = copy(&mut sent) else { break };
                if let Err(m) = group.offer(m) {
                    waiting.push(Waiting::Group(name.clone(), m));
                }
            }
        }
        for w in waiting {
            match w {
                Waiting::Plain(tx, m) => {
                    let _ = tx.send(m).await;
                }
                Waiting::Group(group, m) => {
                    let topic = m.topic.clone();
                    send_to_group(&self.broker, &topic, &group, m).await;
                }
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &Topic,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>> {
        self.check_simple_open()?;
        let buffer = self.broker.config.simple_buffer;
        let (tx, rx) = async_channel::bounded(buffer);
        let membership = {
            let mut topics = self.broker.simple.topics.lock();
            let subs = topics.entry(topic.as_str().to_owned()).or_default();
            let id = subs.next_id;
            subs.next_id += 1;
            match queue_group {
                None => {
                    subs.plain.insert(id, tx);
                    Membership::Plain(id)
                }
                Some(group) => {
                    // A channel of its own per member; publishers choose the member.
                    subs.groups
                        .entry(group.to_owned())
                        .or_default()
                        .members
                        .push((id, tx));
                    Membership::Group(group.to_owned(), id)
                }
            }
        };
        let stream = SubscriberStream {
            rx: Box::pin(rx),
            broker: self.broker.clone(),
            topic: topic.as_str().to_owned(),
            membership,
        };
        Ok(stream
            .take_until(self.handle.simple_closed.clone().cancelled_owned())
            .boxed())
    }

    async fn request(&self, message: SimpleOutbound, timeout: Duration) -> Result<Message> {
        let has_responders = self
            .broker
            .simple
            .topics
            .lock()
            .get(message.topic())
            .is_some_and(|s| !s.is_empty());
        if !has_responders {
            return Err(Error::NoResponders {
                topic: message.topic().to_owned(),
            });
        }
        request_via_inbox(self, message, timeout).await
    }

    async fn close(&self) -> Result<()> {
        self.handle.simple_closed.cancel();
        Ok(())
    }
}
