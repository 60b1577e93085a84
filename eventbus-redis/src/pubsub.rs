//! The simple-message transport on Redis pub/sub: at-most-once fan-out, headers in a
//! frame, automatic resubscription after a reconnect, request-reply through an inbox
//! channel.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use dualbus_core::{
    Error, Message, Result, SimpleCapabilities, SimpleOutbound, SimpleTransport, Topic,
};
use futures::Stream;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::config::RedisConfig;
use crate::{BACKEND, frame, redis_error};

/// The local subscriptions of each channel.
#[derive(Default)]
struct Routes {
    next_id: u64,
    by_channel: HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>,
}

struct Inner {
    publishers: Vec<ConnectionManager>,
    next: AtomicUsize,
    /// The connection that holds the subscriptions (its pushes carry the messages).
    subscriber: ConnectionManager,
    routes: Arc<Mutex<Routes>>,
    /// Serializes `SUBSCRIBE` and `UNSUBSCRIBE` with the route changes they follow.
    changes: tokio::sync::Mutex<()>,
    dropped: Arc<AtomicU64>,
    buffer: usize,
    caps: SimpleCapabilities,
    closed: AtomicBool,
}

/// A Redis client for the simple bus: messages on pub/sub channels (one channel per
/// topic, no patterns).
///
/// At most once, by Redis' design: a message reaches the subscriptions that exist when it
/// is published, and a message published while a subscriber is disconnected is lost for
/// it. After a reconnect the subscriptions are restored by themselves.
///
/// Clones share the connections; `close` closes them for every clone.
#[derive(Clone)]
pub struct RedisPubSub {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisPubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPubSub")
            .field("connections", &(self.inner.publishers.len() + 1))
            .field("max_payload", &self.inner.caps.max_payload)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// The `redis` crate's connection settings from ours.
pub(crate) fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout))
        .set_number_of_retries(config.reconnect.retries)
        .set_min_delay(config.reconnect.min_delay)
        .set_max_delay(config.reconnect.max_delay)
}

/// Hands one push to the subscriptions of its channel.
fn route(routes: &Mutex<Routes>, dropped: &AtomicU64, push: PushInfo) {
    match push.kind {
        PushKind::Message => {
            let mut data = push.data.into_iter();
            let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                return;
            };
            let (Some(channel), Some(payload)) = (bulk(channel), bulk(payload)) else {
                return;
            };
            let Ok(channel) = std::str::from_utf8(&channel) else {
                return;
            };
            let decoded = frame::decode(payload);
            if let Some(why) = decoded.headers.get(frame::FRAME_ERROR) {
                tracing::warn!(%channel, %why, "a message with a broken frame, delivered as it came");
            }
            let routes = routes.lock();
            let Some(subs) = routes.by_channel.get(channel) else {
                return;
            };
            for (_, tx) in subs {
                let mut m = Message::new(channel, decoded.payload.clone())
                    .with_headers(decoded.headers.clone());
                m.reply_to.clone_from(&decoded.reply_to);
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(m) {
                    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%channel, dropped = n, "a subscription's buffer is full: messages dropped (pub/sub is at most once)");
                    }
                }
            }
        }
        PushKind::Disconnection => {
            tracing::warn!(
                "the pub/sub connection dropped: messages published until it is back are lost (Redis keeps none); the subscriptions are restored on reconnect"
            );
        }
        _ => {}
    }
}

fn bulk(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

impl RedisPubSub {
    /// Connects (one connection for the subscriptions, `pool_size` for publishing). An
    /// unreachable server is [`Error::Unavailable`] after the connect timeout; bad settings
    /// are [`Error::Config`].
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let client = redis::Client::open(config.connection_info()?)
            .map_err(|e| Error::config("redis.url", e.to_string()))?;
        crate::probe(&client, &config).await?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let dropped = Arc::new(AtomicU64::new(0));
        let (r, d) = (routes.clone(), dropped.clone());
        let subscriber = client
            .get_connection_manager_with_config(
                manager_config(&config)
                    .set_automatic_resubscription()
                    .set_push_sender(move |push: PushInfo| {
                        route(&r, &d, push);
                        Ok::<(), redis::aio::SendError>(())
                    }),
            )
            .await
            .map_err(redis_error)?;
        let mut publishers = Vec::with_capacity(config.pool_size);
        for _ in 0..config.pool_size {
            publishers.push(
                client
                    .get_connection_manager_with_config(manager_config(&config))
                    .await
                    .map_err(redis_error)?,
            );
        }
        let mut caps = SimpleCapabilities::new(BACKEND);
        caps.request_reply = true;
        caps.max_payload = config.max_payload();
        caps.wire = frame::WIRE;
        Ok(Self {
            inner: Arc::new(Inner {
                publishers,
                next: AtomicUsize::new(0),
                subscriber,
                routes,
                changes: tokio::sync::Mutex::new(()),
                dropped,
                buffer: config.subscription_buffer,
                caps,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Messages dropped because a subscription's buffer was full
    /// ([`RedisConfig::subscription_buffer`]).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// A connection of the publishing pool (for what the bus does not cover).
    pub fn connection(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.publishers.len();
        self.inner.publishers[i].clone()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("redis connection"))
        } else {
            Ok(())
        }
    }
}

/// A frame as the argument of a command: written into the command's buffer.
struct Arg<'a>(frame::Frame<'a>);

impl redis::ToRedisArgs for Arg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut b = out.bufmut_for_next_arg(self.0.len());
        self.0.write(&mut b);
    }
}

/// A subscription's messages; dropping it removes the subscription (and unsubscribes the
/// channel when it was the last one here).
struct Subscription {
    rx: mpsc::Receiver<Message>,
    channel: String,
    id: u64,
    inner: std::sync::Weak<Inner>,
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let last = {
            let mut routes = inner.routes.lock();
            match routes.by_channel.get_mut(&self.channel) {
                Some(subs) => {
                    subs.retain(|(id, _)| *id != self.id);
                    if subs.is_empty() {
                        routes.by_channel.remove(&self.channel);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if !last || inner.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let channel = std::mem::take(&mut self.channel);
        runtime.spawn(async move {
            let _changes = inner.changes.lock().await;
            // A subscription to the channel may have come since.
            if inner.routes.lock().by_channel.contains_key(&channel) {
                return;
            }
            if let Err(e) = inner.subscriber.clone().unsubscribe(&channel).await {
                tracing::debug!(%channel, error = %e, "unsubscribe failed");
            }
        });
    }
}

#[async_trait]
impl SimpleTransport for RedisPubSub {
    fn capabilities(&self) -> &SimpleCapabilities {
        &self.inner.caps
    }

    async fn publish(&self, message: SimpleOutbound) -> Result<()> {
        self.check_open()?;
        let frame = frame::Frame::new(message.headers(), message.reply_to(), message.payload())?;
        let mut c = self.connection();
        redis::cmd("PUBLISH")
            .arg(message.topic())
            .arg(Arg(frame))
            .exec_async(&mut c)
            .await
            .map_err(redis_error)
    }

    async fn subscribe(
        &self,
        topic: &Topic,
        queue_group: Option<&str>,
    ) -> Result<BoxStream<'static, Message>> {
        self.check_open()?;
        if queue_group.is_some() {
            return Err(Error::NotSupported {
                operation: "queue groups",
                backend: BACKEND,
            });
        }
        let channel = topic.as_str().to_owned();
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let _changes = self.inner.changes.lock().await;
        // Closed meanwhile: `close` cleared the routes; a new one would never end.
        self.check_open()?;
        let (id, first) = {
            let mut routes = self.inner.routes.lock();
            let id = routes.next_id;
            routes.next_id += 1;
            let subs = routes.by_channel.entry(channel.clone()).or_default();
            subs.push((id, tx));
            (id, subs.len() == 1)
        };
        let sub = Subscription {
            rx,
            channel: channel.clone(),
            id,
            inner: Arc::downgrade(&self.inner),
        };
        if first {
            // The reply comes once the server has the subscription: a publish after this
            // returns reaches it.
            if let Err(e) = self.inner.subscriber.clone().subscribe(&channel).await {
                drop(_changes);
                drop(sub);
                return Err(redis_error(e));
            }
        }
        Ok(Box::pin(sub))
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Every subscription's stream ends.
        self.inner.routes.lock().by_channel.clear();
        Ok(())
    }
}
