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

    /// A `-NAK` with the delay: the server delivers the message again once the delay has
    /// passed (zero: at once, before newer messages).
    async fn release(&self, delay: Duration) -> Result<()> {
        self.send(AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
    }

    /// `+WPI`: the ack wait starts again.
    async fn progress(&self) -> Result<()> {
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

    /// Nothing to give back: the stream keeps the message until the pool settles it.
    async fn release(&self, _delay: Duration) -> Result<()> {
        Ok(())
    }
}
