//! The domain-event transport on Redis Streams: one stream per partition of a topic,
//! publishes and appends by script, consumer groups through core's coordinator on leases
//! kept in Redis, reads and acknowledgements fenced by the lease's token.

mod entry;
mod subscribe;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use dualbus_core::{
    DomainCapabilities, DomainSubscription, DomainTransport, Error, HeaderStyle, InboundMessage,
    OutboundMessage, Position, Receipt, Result, SubscriptionSpec, Topic, WireOverhead,
};
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

pub use entry::{KEY_FIELD, PAYLOAD_FIELD};
use entry::{Keys, id_of, offset_of};

use crate::config::RedisConfig;
use crate::pubsub::manager_config;
use crate::{BACKEND, redis_error};

/// Bytes of `max_message_bytes` kept for the key field (an aggregate id: at most 256 bytes)
/// and the two reserved field names.
const ENTRY_RESERVE: usize = 256 + KEY_FIELD.len() + PAYLOAD_FIELD.len();

/// Publishes (and appends) one entry: checks the aggregate's last entry when asked, adds
/// the entry, records it as the aggregate's last.
///
/// KEYS: stream, last-entry hash. ARGV: aggregate id, expected (`''`: no check, `'-'`: no
/// entry yet, else the id of the aggregate's last entry), `MAXLEN ~` (`''`: none), then
/// the fields. Returns `{1, id}`, or `{0, current}` when the check failed.
const PUBLISH: &str = r"
if ARGV[2] ~= '' then
  local cur = redis.call('HGET', KEYS[2], ARGV[1])
  if ARGV[2] == '-' then
    if cur then return {0, cur} end
  elseif cur ~= ARGV[2] then
    return {0, cur or ''}
  end
end
local id
if ARGV[3] == '' then
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
end
redis.call('HSET', KEYS[2], ARGV[1], id)
return {1, id}
";

/// A topic's partition count: the stored one, or `ARGV[1]` stored now.
const PARTITIONS: &str = r"
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[1])
return tonumber(redis.call('HGET', KEYS[1], 'partitions'))
";

pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    pub(crate) conn: ConnectionManager,
    pub(crate) client: redis::Client,
    caps: DomainCapabilities,
    closed: AtomicBool,
    publish: Script,
    partitions_script: Script,
    partitions: Mutex<std::collections::HashMap<String, u32>>,
    pub(crate) lost_entries: Arc<AtomicU64>,
    /// The stop flags of the subscriptions, set by `close`.
    subscriptions: Mutex<Vec<std::sync::Weak<AtomicBool>>>,
}

/// A Redis client for the domain bus: events in Redis Streams, one stream per partition of
/// a topic, consumer groups with ordered, leased partitions.
///
/// Clones share the connection; `close` closes it for every clone.
#[derive(Clone)]
pub struct RedisStreams {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreams")
            .field("durable", &self.inner.caps.durable)
            .field("max_payload", &self.inner.caps.max_payload)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisStreams {
    /// Connects. An unreachable server is [`Error::Unavailable`] after the connect
    /// timeout; bad settings are [`Error::Config`].
    ///
    /// Durability is read from the server: the transport declares itself durable only when
    /// the server appends every write to its log before answering (`appendonly yes` and
    /// `appendfsync always`).
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let client = redis::Client::open(config.connection_info()?)
            .map_err(|e| Error::config("redis.url", e.to_string()))?;
        crate::probe(&client, &config).await?;
        let mut conn = client
            .get_connection_manager_with_config(manager_config(&config))
            .await
            .map_err(redis_error)?;
        let durable = durable(&mut conn).await;
        let mut caps = DomainCapabilities::new(BACKEND);
        caps.durable = durable;
        caps.ordered_per_key = true;
        caps.consumer_groups = true;
        caps.replay = true;
        caps.expected_version = config.streams.track_last;
        caps.reread = true;
        caps.max_payload = config.max_message_bytes.saturating_sub(ENTRY_RESERVE);
        // Each header is a field name and a value, each with its RESP length prefix.
        caps.wire = WireOverhead::new(0, 4);
        caps.header_style = HeaderStyle::HyphenPercentEncoded;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                conn,
                client,
                caps,
                closed: AtomicBool::new(false),
                publish: Script::new(PUBLISH),
                partitions_script: Script::new(PARTITIONS),
                partitions: Mutex::new(std::collections::HashMap::new()),
                lost_entries: Arc::new(AtomicU64::new(0)),
                subscriptions: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Pending entries that were deleted (trimmed) before a new owner could claim them: lost
    /// events, counted at each takeover.
    pub fn lost_entries(&self) -> u64 {
        self.inner.lost_entries.load(Ordering::Relaxed)
    }

    /// The connection (for what the bus does not cover).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Keeps a subscription's stop flag, for `close`.
    pub(crate) fn track(&self, stop: &Arc<AtomicBool>) {
        let mut subs = self.inner.subscriptions.lock();
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(stop));
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("redis connection"))
        } else {
            Ok(())
        }
    }

    /// Appends need the aggregates' last entries (`streams.track_last`).
    fn check_tracked(&self) -> Result<()> {
        if self.inner.config.streams.track_last {
            Ok(())
        } else {
            Err(Error::NotSupported {
                operation: "appends with an expected version (redis.streams.track_last is off)",
                backend: BACKEND,
            })
        }
    }

    fn keys(&self, topic: &str) -> Keys {
        Keys::new(&self.inner.config.streams.prefix, topic)
    }

    /// The partition count of `topic`: stored with the topic at its first use.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.inner.partitions.lock().get(topic) {
            return Ok(*n);
        }
        let wanted = self.inner.config.streams.partitions;
        let n: u32 = self
            .inner
            .partitions_script
            .key(self.keys(topic).meta())
            .arg(wanted)
            .invoke_async(&mut self.inner.conn.clone())
            .await
            .map_err(redis_error)?;
        if n == 0 {
            return Err(Error::backend(
                BACKEND,
                false,
                format!("topic {topic:?} is stored with 0 partitions"),
            ));
        }
        if n != wanted {
            tracing::info!(
                topic,
                stored = n,
                configured = wanted,
                "the topic keeps the partition count it was created with"
            );
        }
        self.inner.partitions.lock().insert(topic.to_owned(), n);
        Ok(n)
    }

    /// The command that publishes `message` (appends when `expected` is set): the publish
    /// script called by its hash, or a bare `XADD` without `streams.track_last`.
    fn command(
        &self,
        topic: &str,
        partition: u32,
        message: &OutboundMessage,
        expected: &str,
    ) -> Result<redis::Cmd> {
        let keys = self.keys(topic);
        let maxlen = self.inner.config.streams.maxlen;
        let mut cmd;
        if self.inner.config.streams.track_last {
            cmd = redis::cmd("EVALSHA");
            cmd.arg(self.inner.publish.get_hash())
                .arg(2)
                .arg(keys.stream(partition))
                .arg(keys.last(partition))
                .arg(message.key())
                .arg(expected);
            match maxlen {
                Some(n) => cmd.arg(n),
                None => cmd.arg(""),
            };
        } else {
            cmd = redis::cmd("XADD");
            cmd.arg(keys.stream(partition));
            if let Some(n) = maxlen {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*");
        }
        for (name, value) in message.headers().iter() {
            if name == KEY_FIELD || name == PAYLOAD_FIELD {
                return Err(Error::InvalidHeader {
                    name: name.to_owned(),
                    reason: "reserved for the entry's key and payload on Redis Streams",
                });
            }
            cmd.arg(name).arg(value);
        }
        cmd.arg(KEY_FIELD).arg(message.key());
        cmd.arg(PAYLOAD_FIELD).arg(message.payload().as_ref());
        Ok(cmd)
    }

    /// Runs a script command, loading the script first if the server does not know it
    /// (a restarted server): a `NOSCRIPT` refusal ran nothing, so the retry is safe.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, script: &Script) -> Result<T> {
        let mut c = self.inner.conn.clone();
        match cmd.query_async(&mut c).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script.load_async(&mut c).await.map_err(redis_error)?;
                cmd.query_async(&mut c).await.map_err(redis_error)
            }
            r => r.map_err(redis_error),
        }
    }

    async fn add(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: &str,
    ) -> Result<std::result::Result<Receipt, String>> {
        self.check_open()?;
        let n = self.partitions(topic.as_str()).await?;
        let partition = dualbus_core::partition::partition_for(message.key(), n);
        let cmd = self.command(topic.as_str(), partition, &message, expected)?;
        let (ok, id): (i64, String) = if self.inner.config.streams.track_last {
            self.run(&cmd, &self.inner.publish).await?
        } else {
            (1, self.run(&cmd, &self.inner.publish).await?)
        };
        if ok == 1 {
            Ok(Ok(receipt(partition, &id)?))
        } else {
            Ok(Err(id))
        }
    }
}

fn receipt(partition: u32, id: &str) -> Result<Receipt> {
    let offset = offset_of(id).ok_or_else(|| {
        Error::backend(
            BACKEND,
            false,
            format!("XADD answered {id:?}, not an entry id"),
        )
    })?;
    Ok(Receipt::at(Position { partition, offset }))
}

/// Whether the server writes every change to its log before answering.
async fn durable(conn: &mut ConnectionManager) -> bool {
    let get = |name: &'static str| {
        let mut c = conn.clone();
        async move {
            // A map under RESP3, a flat array under RESP2: both read as one.
            let r: redis::RedisResult<std::collections::HashMap<String, String>> =
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut c)
                    .await;
            r.ok().and_then(|mut v| v.remove(name))
        }
    };
    let aof = get("appendonly").await;
    let fsync = get("appendfsync").await;
    aof.as_deref() == Some("yes") && fsync.as_deref() == Some("always")
}

#[async_trait]
impl DomainTransport for RedisStreams {
    fn capabilities(&self) -> &DomainCapabilities {
        &self.inner.caps
    }

    async fn publish(&self, topic: &Topic, message: OutboundMessage) -> Result<Receipt> {
        match self.add(topic, message, "").await? {
            Ok(r) => Ok(r),
            Err(_) => Err(Error::backend(
                BACKEND,
                false,
                "the publish script refused an unchecked publish",
            )),
        }
    }

    /// One pipeline: the entries are stored in the order given (one connection, one
    /// server), and each has its own result.
    async fn publish_batch(
        &self,
        topic: &Topic,
        messages: Vec<OutboundMessage>,
    ) -> Vec<Result<Receipt>> {
        let all = |e: &Error| {
            (0..messages.len())
                .map(|_| Err(e.for_each_in_batch(BACKEND)))
                .collect::<Vec<_>>()
        };
        if let Err(e) = self.check_open() {
            return all(&e);
        }
        let n = match self.partitions(topic.as_str()).await {
            Ok(n) => n,
            Err(e) => return all(&e),
        };
        // The pipeline calls the script by its hash: load it first (once per batch).
        if self.inner.config.streams.track_last
            && let Err(e) = self
                .inner
                .publish
                .load_async(&mut self.inner.conn.clone())
                .await
        {
            return all(&redis_error(e));
        }
        let mut pipe = redis::pipe();
        let mut slots: Vec<std::result::Result<u32, Error>> = Vec::with_capacity(messages.len());
        for m in &messages {
            let partition = dualbus_core::partition::partition_for(m.key(), n);
            match self.command(topic.as_str(), partition, m, "") {
                Ok(cmd) => {
                    pipe.add_command(cmd);
                    slots.push(Ok(partition));
                }
                Err(e) => slots.push(Err(e)),
            }
        }
        let replies: Vec<Value> = match pipe
            .ignore_errors()
            .query_async(&mut self.inner.conn.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => return all(&redis_error(e)),
        };
        let mut replies = replies.into_iter();
        slots
            .into_iter()
            .map(|slot| {
                let partition = slot?;
                let reply = replies.next().ok_or_else(|| {
                    Error::backend(BACKEND, false, "the pipeline answered too few replies")
                })?;
                if let Value::ServerError(e) = reply {
                    return Err(redis_error(e.into()));
                }
                let parsed = if self.inner.config.streams.track_last {
                    redis::from_redis_value(reply)
                } else {
                    redis::from_redis_value(reply).map(|id: String| (1i64, id))
                };
                let (ok, id): (i64, String) =
                    parsed.map_err(|e| Error::backend(BACKEND, false, e))?;
                if ok == 1 {
                    receipt(partition, &id)
                } else {
                    Err(Error::backend(
                        BACKEND,
                        false,
                        "the publish script refused an unchecked publish",
                    ))
                }
            })
            .collect()
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<DomainSubscription> {
        self.check_open()?;
        subscribe::subscribe(self, spec).await
    }

    /// Scans the key's partition from its start (in chunks of 512 entries): it costs a read
    /// of the whole partition.
    async fn replay(&self, topic: &Topic, key: &str) -> Result<Vec<InboundMessage>> {
        self.check_open()?;
        let n = self.partitions(topic.as_str()).await?;
        let partition = dualbus_core::partition::partition_for(key, n);
        let stream = self.keys(topic.as_str()).stream(partition);
        let mut out = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let v: Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(512)
                .query_async(&mut self.inner.conn.clone())
                .await
                .map_err(redis_error)?;
            let batch = entry::entries(v)?;
            let Some(last) = batch.last().map(|e| e.id.clone()) else {
                break;
            };
            let full = batch.len() == 512;
            for e in batch {
                let (m, _) = entry::inbound(topic.as_str(), partition, e)?;
                if m.key.as_deref() == Some(key) {
                    out.push(m);
                }
            }
            if !full {
                break;
            }
            start = format!("({last}");
        }
        Ok(out)
    }

    async fn last_for_key(&self, topic: &Topic, key: &str) -> Result<Option<InboundMessage>> {
        self.check_open()?;
        self.check_tracked()?;
        let n = self.partitions(topic.as_str()).await?;
        let partition = dualbus_core::partition::partition_for(key, n);
        let keys = self.keys(topic.as_str());
        let id: Option<String> = redis::cmd("HGET")
            .arg(keys.last(partition))
            .arg(key)
            .query_async(&mut self.inner.conn.clone())
            .await
            .map_err(redis_error)?;
        let Some(id) = id else {
            return Ok(None);
        };
        read_entry(&self.inner.conn, topic.as_str(), &keys, partition, &id)
            .await
            .map(Some)
    }

    async fn publish_if_last(
        &self,
        topic: &Topic,
        message: OutboundMessage,
        expected: Option<Position>,
    ) -> Result<Receipt> {
        self.check_tracked()?;
        let want = expected.map_or_else(|| "-".to_owned(), |p| id_of(p.offset));
        match self.add(topic, message, &want).await? {
            Ok(r) => Ok(r),
            Err(current) => Err(Error::Conflict(if current.is_empty() {
                format!("the aggregate has no event yet (expected entry {want})")
            } else {
                format!("the aggregate's last entry is {current}, not {want}")
            })),
        }
    }

    /// Per partition: the group's pending entries plus its lag (`XINFO GROUPS`); all
    /// entries of a partition the group has not been created on yet.
    async fn pending(&self, topic: &Topic, group: &str) -> Result<Option<u64>> {
        self.check_open()?;
        let n = self.partitions(topic.as_str()).await?;
        let keys = self.keys(topic.as_str());
        let mut total = 0u64;
        for p in 0..n {
            total += subscribe::pending_of(&self.inner.conn, &keys.stream(p), group).await?;
        }
        Ok(Some(total))
    }

    /// Ends every subscription of this transport (their delivery streams end; their
    /// members leave the groups when the pool drops them) and refuses what comes after.
    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        for stop in self.inner.subscriptions.lock().drain(..) {
            if let Some(stop) = stop.upgrade() {
                stop.store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

/// The entry `id` of `partition`, as a message; a permanent error when it is gone.
pub(crate) async fn read_entry(
    conn: &ConnectionManager,
    topic: &str,
    keys: &Keys,
    partition: u32,
    id: &str,
) -> Result<InboundMessage> {
    let v: Value = redis::cmd("XRANGE")
        .arg(keys.stream(partition))
        .arg(id)
        .arg(id)
        .query_async(&mut conn.clone())
        .await
        .map_err(redis_error)?;
    let Some(e) = entry::entries(v)?.into_iter().next() else {
        return Err(Error::backend(
            BACKEND,
            false,
            format!(
                "entry {id} of partition {partition} of {topic:?} is gone (trimmed or deleted)"
            ),
        ));
    };
    Ok(entry::inbound(topic, partition, e)?.0)
}
