//! Acknowledgements of deliveries: of a JetStream message, and of an unreadable message
//! the pull loop settles itself.

use std::time::Duration;

use async_nats::jetstream::{self, message::AckKind};
use async_trait::async_trait;
use dualbus_core::{Acker, Error, Result};
use tokio_util::sync::CancellationToken;

use crate::BACKEND;

/// Acknowledgements of one JetStream delivery.
pub(super) struct JsAcker(pub(super) jetstream::message::Acker);

impl JsAcker {
    async fn send(&self, kind: AckKind) -> Result<()> {
        self.0.ack_with(kind).await.map_err(|e| Error::Unavailable {
            backend: BACKEND,
            source: e,
        })
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack).await
    }

    async fn nack(&self, delay: Duration) -> Result<()> {
        self.send(AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
    }

    async fn term(&self) -> Result<()> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<()> {
        self.send(AckKind::Progress).await
    }
}

/// The acknowledgement of an unreadable message: tells the stream that the pool settled it
/// (dead-lettered it). The stream acknowledges it on the server itself.
pub(super) struct SettledAcker(pub(super) CancellationToken);

#[async_trait]
impl Acker for SettledAcker {
    async fn ack(&self) -> Result<()> {
        self.0.cancel();
        Ok(())
    }

    async fn nack(&self, _delay: Duration) -> Result<()> {
        Ok(())
    }

    async fn term(&self) -> Result<()> {
        self.0.cancel();
        Ok(())
    }

    async fn in_progress(&self) -> Result<()> {
        Ok(())
    }
}
