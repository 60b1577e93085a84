//! Reading a delivered message again by its stream sequence: the pool keeps deferred
//! deliveries without their bodies and reads them back when their aggregate's turn comes.
//! Through the JSON message-get API, like replay (see [`crate::unreadable`]).

use async_nats::jetstream;
use async_trait::async_trait;
use dualbus_core::{Error, InboundMessage, Position, Reread, Result};

use super::inbound::stored_inbound;
use crate::{BACKEND, unreadable};

pub(super) struct StreamReread {
    pub(super) js: jetstream::Context,
    pub(super) stream: String,
    pub(super) topic: String,
}

#[async_trait]
impl Reread for StreamReread {
    async fn reread(&self, position: Position) -> Result<InboundMessage> {
        let gone = |why: &str| {
            Error::backend(
                BACKEND,
                false,
                format!(
                    "stream {} holds no message at sequence {}: {why}",
                    self.stream, position.offset
                ),
            )
        };
        let seq = u64::try_from(position.offset).map_err(|_| gone("not a sequence"))?;
        match unreadable::get(&self.js, &self.stream, unreadable::Which::At(seq)).await? {
            Some(m) if m.seq == seq => Ok(stored_inbound(&self.topic, &m, position.partition)),
            _ => Err(gone("deleted or expired")),
        }
    }
}
