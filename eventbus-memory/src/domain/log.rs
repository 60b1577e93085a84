//! The topics' storage: one append-only log per partition, appends, and reading a key's
//! messages back.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use dualbus_core::partition::partition_for;
use dualbus_core::{Headers, InboundMessage, OutboundMessage, Position, Receipt, Result};
use parking_lot::Mutex;

use super::group::Group;
use crate::Memory;

#[derive(Debug)]
pub(super) struct Stored {
    pub(super) key: String,
    pub(super) headers: Headers,
    pub(super) payload: Bytes,
}

#[derive(Debug, Default)]
pub(crate) struct DomainBroker {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

#[derive(Debug)]
pub(super) struct Topic {
    pub(super) name: String,
    /// One append-only log per partition.
    pub(super) logs: Mutex<Vec<Vec<Arc<Stored>>>>,
    pub(super) groups: Mutex<HashMap<String, Arc<Group>>>,
}

impl Topic {
    fn new(name: &str, partitions: usize) -> Self {
        Self {
            name: name.to_owned(),
            logs: Mutex::new((0..partitions).map(|_| Vec::new()).collect()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn partitions(&self) -> usize {
        self.logs.lock().len()
    }

    pub(super) fn wake_all(&self) {
        for g in self.groups.lock().values() {
            g.state.lock().wake_members();
        }
    }
}

impl Memory {
    pub(super) fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.broker.domain.topics.lock();
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        let partitions = self.broker.config.partitions_of(name);
        topics
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Topic::new(name, partitions)))
            .clone()
    }

    pub(super) fn append(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        self.append_locked(topic.logs.lock(), message)
    }

    pub(super) fn append_locked(
        &self,
        mut logs: parking_lot::MutexGuard<'_, Vec<Vec<Arc<Stored>>>>,
        message: OutboundMessage,
    ) -> Result<Receipt> {
        // Core checked the message (key, headers, size) when it built it.
        let message = message.into_parts();
        // `partition_for` is below the partition count, which is the number of logs.
        let partition = partition_for(&message.key, logs.len() as u32);
        let log = &mut logs[partition as usize];
        log.push(Arc::new(Stored {
            key: message.key,
            headers: message.headers,
            payload: message.payload,
        }));
        Ok(Receipt::at(Position {
            partition,
            offset: u128::from(log.len() as u64 - 1),
        }))
    }
}

/// The last message of `key` in a partition's log, with its offset.
pub(super) fn last_of<'a>(log: &'a [Arc<Stored>], key: &str) -> Option<(u64, &'a Stored)> {
    log.iter()
        .enumerate()
        .rev()
        .find(|(_, s)| s.key == key)
        .map(|(offset, s)| (offset as u64, &**s))
}

pub(super) fn inbound(topic: &str, s: &Stored, partition: u32, offset: u64) -> InboundMessage {
    InboundMessage {
        topic: topic.to_owned(),
        key: Some(s.key.clone()),
        headers: s.headers.clone(),
        payload: s.payload.clone(),
        position: Position {
            partition,
            offset: u128::from(offset),
        },
    }
}
