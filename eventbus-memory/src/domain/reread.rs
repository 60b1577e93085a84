//! Reading a delivered message again by its position: the pool keeps deferred deliveries
//! without their bodies and reads them back from the log when their aggregate's turn comes.

use std::sync::Arc;

use async_trait::async_trait;
use dualbus_core::{Error, InboundMessage, Position, Reread, Result};
use tokio_util::sync::CancellationToken;

use super::log::{Topic, inbound};

pub(super) struct LogReread {
    pub(super) topic: Arc<Topic>,
    pub(super) closed: CancellationToken,
}

#[async_trait]
impl Reread for LogReread {
    async fn reread(&self, position: Position) -> Result<InboundMessage> {
        if self.closed.is_cancelled() {
            return Err(Error::closed("memory domain transport"));
        }
        let logs = self.topic.logs.lock();
        let log = logs.get(position.partition as usize);
        let stored = u64::try_from(position.offset).ok().and_then(|offset| {
            let s = log?.get(usize::try_from(offset).ok()?)?;
            Some((offset, s))
        });
        match stored {
            Some((offset, s)) => Ok(inbound(&self.topic.name, s, position.partition, offset)),
            None => Err(Error::backend(
                "memory",
                false,
                format!("topic {} holds no message at {position:?}", self.topic.name),
            )),
        }
    }
}
