//! Reads of what is stored: replay by aggregate, the last event of an aggregate, and the
//! backlog of a group.

use dualbus_core::{InboundMessage, Result};

use crate::unreadable;

use super::config::Layout;
use super::inbound::stored_inbound;
use super::provision::is_consumer_not_found;
use super::{JetStream, api_error, not_per_aggregate};

impl JetStream {
    /// `DomainTransport::replay`.
    pub(super) async fn replay_inner(&self, topic: &str, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_open()?;
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(Vec::new());
        };
        let plan = self.plan(topic);
        // Message by message through the JSON message-get API, never through a consumer:
        // a stored message the client cannot read would drop the connection (see
        // `unreadable`); here its headers are decoded lossily instead.
        // Subject layout: the whole topic, filtered by the body's aggregate id below.
        let subject = plan.stored_subject(topic, key);
        let name = &stream.cached_info().config.name;
        let mut out = Vec::new();
        let mut seq = 1;
        while let Some(m) = unreadable::get(
            &self.inner.js,
            name,
            unreadable::Which::NextOn(seq, &subject),
        )
        .await?
        {
            seq = m.seq + 1;
            let mut message = stored_inbound(topic, &m, 0);
            match plan.layout {
                Layout::Partitioned => out.push(message),
                Layout::Subject => {
                    if dualbus_core::Codec::decode(&message).is_ok_and(|e| e.aggregate_id == key) {
                        message.key = Some(key.to_owned());
                        out.push(message);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `DomainTransport::last_for_key`.
    pub(super) async fn last_for_key_inner(
        &self,
        topic: &str,
        key: &str,
    ) -> Result<Option<InboundMessage>> {
        self.check_open()?;
        let plan = self.plan(topic);
        if plan.layout == Layout::Subject {
            return Err(not_per_aggregate());
        }
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(None);
        };
        let subject = plan.stored_subject(topic, key);
        let name = &stream.cached_info().config.name;
        Ok(
            unreadable::get(&self.inner.js, name, unreadable::Which::LastOn(&subject))
                .await?
                .map(|m| stored_inbound(topic, &m, 0)),
        )
    }

    /// `DomainTransport::pending`.
    pub(super) async fn pending_inner(&self, topic: &str, group: &str) -> Result<Option<u64>> {
        self.check_open()?;
        let Some(stream) = self.existing_stream(topic).await? else {
            return Ok(None);
        };
        // Every partition's consumer of the group; none yet: the broker cannot tell.
        let plan = self.plan(topic);
        let mut total = None;
        for p in 0..plan.group_partitions() {
            let (name, _) = plan.partition_consumer(topic, group, p);
            match stream.consumer_info(name).await {
                Ok(info) => {
                    *total.get_or_insert(0) += info.num_pending + info.num_ack_pending as u64;
                }
                Err(e) if is_consumer_not_found(&e) => {}
                Err(e) => return Err(api_error(e)),
            }
        }
        Ok(total)
    }
}
