//! Pulling a group's consumer, whose priority policy is `pinned_client`: the server delivers
//! to one client at a time, the one holding the consumer's pin.
//!
//! The server pins the first pull request without a pin id that it hands a message, and
//! adds the pin id to every message it delivers (`Nats-Pin-Id`). Every later request
//! carries that id; the server renews the pin when such a request arrives (not on acks),
//! and answers `423` to a request whose id is not the consumer's pin any more: the pin was
//! moved (`unpin` by a new owner of the partition's lease), it timed out, or a new
//! consumer leader cleared it.
//!
//! A request goes without a pin id only when claiming the pin, right after this member
//! moved it at its takeover; the first message of a claim is not delivered: it says the
//! pin is ours ([`Pulled::Pinned`]), and the consumer is rewound once more, so that
//! whatever another client got between the move and the claim comes again. A request that
//! got a `423` is never repeated without its id: that would take the pin back from the
//! new owner. The partition's pull loop decides what a `423` means.
//!
//! The pull requests are written here rather than through the client's pull stream, which
//! repeats a request without its id after a `423` and reports nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{StatusCode, Subscriber};
use dualbus_core::{Error, Result};
use futures::StreamExt as _;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::BACKEND;

/// The priority group of every consumer of a group: one pin per consumer.
pub(super) const GROUP: &str = "dualbus";

/// The header the server adds to every message of a pinned consumer.
pub(super) const PIN_HEADER: &str = "Nats-Pin-Id";

/// The pin this client holds on a consumer, shared by its pulls and its keepalive.
#[derive(Clone, Default, Debug)]
pub(super) struct Pin(Arc<Mutex<Option<String>>>);

impl Pin {
    pub(super) fn get(&self) -> Option<String> {
        self.0.lock().clone()
    }

    pub(super) fn clear(&self) {
        *self.0.lock() = None;
    }

    fn set(&self, id: &str) {
        let mut pin = self.0.lock();
        if pin.as_deref() != Some(id) {
            *pin = Some(id.to_owned());
        }
    }
}

/// A pull request, as the server reads it (`expires` and `idle_heartbeat` in nanoseconds).
#[derive(Serialize)]
struct PullRequest<'a> {
    batch: usize,
    expires: u64,
    #[serde(skip_serializing_if = "is_zero")]
    max_bytes: usize,
    #[serde(skip_serializing_if = "is_zero")]
    idle_heartbeat: u64,
    group: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The subject pull requests of `consumer` on `stream` go to.
fn next_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
}

/// What a pull gives. (Returned, never stored: boxing the message would cost an
/// allocation per message.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Pulled {
    /// A message (the pin learnt from it).
    Message(jetstream::Message),
    /// `423`: the request's pin is not the consumer's pin any more.
    Moved,
    /// The claim took the pin with this message (the caller drops it and rewinds).
    Pinned(jetstream::Message),
    /// The single request of a bounded pull is over.
    Done,
}

/// The pull requests of one consumer on one inbox: continuous (a new request once half of
/// what was asked for arrived) or a single bounded one.
pub(super) struct PinnedPull {
    js: jetstream::Context,
    subject: String,
    inbox: String,
    sub: Subscriber,
    pin: Pin,
    batch: usize,
    expires: Duration,
    heartbeat: Duration,
    /// Messages asked for and not yet delivered or cancelled by a status.
    outstanding: usize,
    /// When the inbox last heard from the server (a message, heartbeat or status).
    heard: Instant,
    /// One request of `batch` messages only.
    once: bool,
    sent: bool,
    /// Requests without a pin id, to take the pin.
    claim: bool,
}

/// How a pull asks.
pub(super) struct PullSettings {
    pub(super) batch: usize,
    pub(super) expires: Duration,
    pub(super) heartbeat: Duration,
}

impl PinnedPull {
    /// Opens the inbox of pulls of `consumer` on `stream` under `pin`, or claiming it
    /// (`claim`: only right after this member moved the pin); `once`: a single request (a
    /// bounded pull).
    pub(super) async fn open(
        js: &jetstream::Context,
        stream: &str,
        consumer: &str,
        pin: Pin,
        settings: &PullSettings,
        once: bool,
        claim: bool,
    ) -> Result<Self> {
        let client = js.client();
        let inbox = client.new_inbox();
        let sub = client.subscribe(inbox.clone()).await.map_err(|e| {
            Error::backend(BACKEND, true, format!("subscribing to the pull inbox: {e}"))
        })?;
        Ok(Self {
            js: js.clone(),
            subject: next_subject(stream, consumer),
            inbox,
            sub,
            pin,
            batch: settings.batch.max(1),
            expires: settings.expires,
            heartbeat: settings.heartbeat,
            outstanding: 0,
            heard: Instant::now(),
            once,
            sent: false,
            claim,
        })
    }

    async fn request(&mut self) -> Result<()> {
        let pin = if self.claim { None } else { self.pin.get() };
        if pin.is_none() && !self.claim {
            return Err(Error::backend(
                BACKEND,
                true,
                "no pin to pull the consumer with",
            ));
        }
        let body = serde_json::to_vec(&PullRequest {
            batch: self.batch,
            expires: nanos(self.expires),
            max_bytes: 0,
            idle_heartbeat: nanos(self.heartbeat),
            group: GROUP,
            id: pin.as_deref(),
        })
        .map_err(|e| Error::backend(BACKEND, false, format!("encoding a pull request: {e}")))?;
        self.js
            .client()
            .publish_with_reply(self.subject.clone(), self.inbox.clone(), body.into())
            .await
            .map_err(|e| Error::backend(BACKEND, true, format!("sending a pull request: {e}")))?;
        tracing::debug!(subject = %self.subject, batch = self.batch, pin = ?pin, "pull request");
        self.outstanding += self.batch;
        self.heard = Instant::now();
        self.sent = true;
        Ok(())
    }

    /// The next message, [`Pulled::Moved`] when the pin moved, [`Pulled::Done`] when the
    /// single request is over, or an error (the caller opens a new pull after a rewind).
    pub(super) async fn next(&mut self) -> Result<Pulled> {
        loop {
            if self.once {
                if !self.sent {
                    self.request().await?;
                } else if self.outstanding == 0 {
                    return Ok(Pulled::Done);
                }
            } else if self.outstanding <= self.batch / 2 {
                self.request().await?;
            }
            // The server sends a heartbeat while a request waits: silence for two of them
            // means the request is gone (a lost expiry status, a restarted server).
            let silent = self.heard + self.heartbeat * 2 + Duration::from_millis(500);
            let m = tokio::select! {
                biased;
                m = self.sub.next() => m,
                () = tokio::time::sleep_until(silent) => {
                    self.outstanding = 0;
                    return Err(Error::backend(
                        BACKEND,
                        true,
                        "the pull request got no heartbeat from the server",
                    ));
                }
            };
            let Some(m) = m else {
                return Err(Error::closed("subscription"));
            };
            self.heard = Instant::now();
            if m.status
                .is_some_and(|s| s != StatusCode::OK && s != StatusCode::IDLE_HEARTBEAT)
            {
                tracing::debug!(subject = %self.subject, status = ?m.status, description = ?m.description, outstanding = self.outstanding, "pull status");
            }
            match m.status {
                None | Some(StatusCode::OK) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    if self.claim
                        && let Some(id) = m.headers.as_ref().and_then(|h| h.get_last(PIN_HEADER))
                    {
                        self.pin.set(id.as_str());
                        self.claim = false;
                        return Ok(Pulled::Pinned(jetstream::Message {
                            message: m,
                            context: self.js.clone(),
                        }));
                    }
                    return Ok(Pulled::Message(jetstream::Message {
                        message: m,
                        context: self.js.clone(),
                    }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::PIN_ID_MISMATCH) => {
                    self.outstanding = self.outstanding.saturating_sub(cancelled(&m, self.batch));
                    return Ok(Pulled::Moved);
                }
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                    // A request over (expired): what it still asked for no longer comes.
                    self.outstanding = self.outstanding.saturating_sub(cancelled(&m, self.batch));
                }
                Some(StatusCode::REQUEST_TERMINATED) => {
                    let description = m.description.clone().unwrap_or_default();
                    if description == "Consumer Deleted"
                        || description.starts_with("Exceeded MaxRequest")
                        || description == "Consumer is push based"
                    {
                        self.outstanding = 0;
                        return Err(Error::backend(
                            BACKEND,
                            true,
                            format!("pull request refused: {description}"),
                        ));
                    }
                    self.outstanding = self.outstanding.saturating_sub(cancelled(&m, self.batch));
                }
                Some(status) => {
                    self.outstanding = 0;
                    return Err(Error::backend(
                        BACKEND,
                        true,
                        format!(
                            "pull request failed: {status} {}",
                            m.description.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
        }
    }
}

/// What a status ends of its request: the messages it says were still pending, or the
/// whole batch when it does not say.
fn cancelled(m: &async_nats::Message, batch: usize) -> usize {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Pending-Messages"))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(batch)
}

/// Renews `pin` on `consumer` of `stream`: a request with the pin's id that cannot take a
/// message (`max_bytes: 1`). Returns `false` when the server answered `423` while the pin
/// was still this one (it is not this client's any more); `true` otherwise, also when
/// nothing was renewed (no pin held, or no answer: the pulls find out).
pub(super) async fn keep_pin(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    pin: &Pin,
    timeout: Duration,
) -> bool {
    let Some(id) = pin.get() else {
        return true;
    };
    let Ok(body) = serde_json::to_vec(&PullRequest {
        batch: 1,
        expires: nanos(Duration::from_millis(100)),
        max_bytes: 1,
        idle_heartbeat: 0,
        group: GROUP,
        id: Some(&id),
    }) else {
        return true;
    };
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    match js
        .client()
        .send_request(next_subject(stream, consumer), request)
        .await
    {
        // Unless the pull loop took a new pin meanwhile.
        Ok(reply) if reply.status == Some(StatusCode::PIN_ID_MISMATCH) => {
            pin.get().as_deref() != Some(id.as_str())
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_what_the_server_reads() {
        let r = PullRequest {
            batch: 10,
            expires: nanos(Duration::from_secs(1)),
            max_bytes: 0,
            idle_heartbeat: nanos(Duration::from_millis(500)),
            group: GROUP,
            id: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"batch":10,"expires":1000000000,"idle_heartbeat":500000000,"group":"dualbus"}"#
        );
        let r = PullRequest {
            batch: 1,
            expires: 100,
            max_bytes: 1,
            idle_heartbeat: 0,
            group: GROUP,
            id: Some("abc"),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"batch":1,"expires":100,"max_bytes":1,"group":"dualbus","id":"abc"}"#
        );
    }
}
