//! The domain transport: partitioned logs, durable consumer groups with members,
//! rendezvous assignment, ack deadlines, redelivery, an ack floor per partition and the
//! rewind at takeover.
//!
//! This file implements [`DomainTransport`] for [`Memory`] on top of the parts:
//! `log` (storage), `cursor` (a group's place in a partition), `group` (membership and
//! assignment), `member` (the group protocol of one subscription), `reader` (picking the
//! next delivery), `acker` (acknowledging it) and `reread` (reading a delivered message
//! again by position).

mod acker;
mod cursor;
mod group;
mod log;
mod member;
mod reader;
mod reread;

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig};
use dualbus_core::partition::partition_for;
use dualbus_core::{
    DomainCapabilities, DomainSubscription, DomainTransport, Error, GroupMembership,
    InboundMessage, OutboundMessage, Position, Receipt, Result, StartPosition, SubscriptionSpec,
    Topic,
};
use futures::StreamExt as _;
use tokio::sync::Notify;

use self::cursor::Cursor;
use self::group::{Group, Member};
pub(crate) use self::log::DomainBroker;
use self::log::{inbound, last_of};
use self::member::{Coordination, MemberControl, MemberGuard};
use self::reader::Reader;
use self::reread::LogReread;
use crate::Memory;

impl Memory {
    fn check_domain_open(&self) -> Result<()> {
        if self.handle.domain_closed.is_cancelled() {
            Err(Error::closed("memory domain transport"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl DomainTransport for Memory {
    fn capabilities(&self) -> &DomainCapabilities {
        &self.broker.domain_caps
    }

    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let receipt = self.append(&t, message)?;
        t.wake_all();
        Ok(receipt)
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        if self.check_domain_open().is_err() {
            return messages
                .iter()
                .map(|_| Err(Error::closed("memory domain transport")))
                .collect();
        }
        let t = self.topic(topic);
        let out = messages.into_iter().map(|m| self.append(&t, m)).collect();
        t.wake_all();
        out
    }

    /// Joins the group `spec.group` as a new member through the core coordinator
    /// ([`Coordinator`]): partitions go to their rendezvous owners among the live members,
    /// and the stream of group events says which this member owns. Dropping the
    /// subscription leaves the group.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_domain_open()?;
        let topic = self.topic(&spec.topic);
        let partitions = topic.partitions();
        let wake = Arc::new(Notify::new());
        // Locks are taken in one order everywhere: logs, then groups, then a group's state.
        let log_lens: Vec<u64> = topic.logs.lock().iter().map(|l| l.len() as u64).collect();
        let (group, member) = {
            let mut groups = topic.groups.lock();
            let created = !groups.contains_key(&spec.group);
            let group = groups
                .entry(spec.group.clone())
                .or_insert_with(|| Arc::new(Group::new()))
                .clone();
            let mut st = group.state.lock();
            if created {
                st.cursors = (0..partitions).map(|_| Cursor::default()).collect();
                st.owners = vec![None; partitions];
                st.epochs = vec![0; partitions];
                if spec.start == StartPosition::Latest {
                    for (c, len) in st.cursors.iter_mut().zip(&log_lens) {
                        *c = Cursor::starting_at(*len);
                    }
                }
            }
            let member = st.next_member;
            st.next_member += 1;
            st.members.insert(
                member,
                Member {
                    name: format!("member-{member}"),
                    live: false,
                    wake: wake.clone(),
                },
            );
            drop(st);
            (group, member)
        };
        // Leaves the group on every way out from here.
        let guard = MemberGuard {
            group: group.clone(),
            member,
        };
        let control = Arc::new(MemberControl {
            group: group.clone(),
            member,
            wake: wake.clone(),
            rewind: self.broker.config.rewind,
        });
        let coordination = Arc::new(Coordination {
            group: group.clone(),
        });
        let membership = Coordinator::join(
            format!("member-{member}"),
            coordination.clone(),
            coordination,
            control,
            CoordinatorConfig::new(u32::try_from(partitions).unwrap_or(u32::MAX)),
        )
        .await?;
        let reread = Arc::new(LogReread {
            topic: topic.clone(),
            closed: self.handle.domain_closed.clone(),
        });
        let reader = Reader {
            topic,
            group,
            member,
            wake,
            ack_wait: self.broker.config.ack_wait,
        };
        let closed = self.handle.domain_closed.clone();
        let stream = futures::stream::unfold((reader, guard), |(reader, guard)| async move {
            let d = reader.next().await;
            Some((Ok(d), (reader, guard)))
        })
        .take_until(closed.clone().cancelled_owned());
        let events = membership.events.take_until(closed.cancelled_owned());
        Ok(DomainSubscription::new(stream.boxed())
            .with_group(GroupMembership {
                events: events.boxed(),
                control: membership.control,
            })
            .with_reread(reread))
    }

    async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let partition = partition_for(key, logs.len() as u32);
        Ok(logs[partition as usize]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key == key)
            .map(|(offset, s)| inbound(&t.name, s, partition, offset as u64))
            .collect())
    }

    async fn last_for_key(&self, topic: &Topic, key: &str) -> Result<Option<InboundMessage>> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let partition = partition_for(key, logs.len() as u32);
        Ok(last_of(&logs[partition as usize], key)
            .map(|(offset, s)| inbound(&t.name, s, partition, offset)))
    }

    async fn publish_if_last(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let receipt = {
            // The check and the append under one lock: atomic.
            let logs = t.logs.lock();
            let partition = partition_for(message.key(), logs.len() as u32);
            let last =
                last_of(&logs[partition as usize], message.key()).map(|(offset, _)| Position {
                    partition,
                    offset: u128::from(offset),
                });
            if last != expected {
                return Err(Error::Conflict(format!(
                    "the last message of key {:?} is at {last:?}, not {expected:?}",
                    message.key()
                )));
            }
            self.append_locked(logs, message)?
        };
        t.wake_all();
        Ok(receipt)
    }

    async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
        self.check_domain_open()?;
        let t = self.topic(topic);
        let logs = t.logs.lock();
        let total: u64 = logs.iter().map(|l| l.len() as u64).sum();
        let Some(g) = t.groups.lock().get(group).cloned() else {
            return Ok(Some(total));
        };
        let st = g.state.lock();
        let n = st
            .cursors
            .iter()
            .zip(logs.iter())
            .map(|(c, l)| l.len() as u64 - c.acks.floor() - c.acks.acked_above() as u64)
            .sum();
        Ok(Some(n))
    }

    async fn close(&self) -> Result<()> {
        self.handle.domain_closed.cancel();
        Ok(())
    }
}
