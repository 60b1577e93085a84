//! Domain subscriptions on Redis Streams: a member of the consumer group (core's
//! coordinator on leases in Redis), one task reading the partitions it owns, and
//! acknowledgements fenced by the partition's lease token.
//!
//! At each takeover (the rewind) the new owner claims every pending entry of the partition
//! (`XAUTOCLAIM` from `0-0` with min-idle 0 until the cursor comes back as `0-0`) and
//! delivers them before new ones, with their delivery counts from `XPENDING`. New entries
//! come from `XREADGROUP ... >` in a script that first checks the lease token (a script
//! cannot block); between reads the task waits with `XREAD BLOCK` on a connection of its
//! own.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::group::{Coordinator, CoordinatorConfig, Placement};
use dualbus_core::{
    Acker, Delivery, DomainSubscription, Error, GroupControl, InboundMessage, PartitionControl,
    Position, Reread, Result, StartPosition, SubscriptionSpec,
};
use futures::Stream;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::entry::{self, Entry, Keys, id_of};
use super::{RedisStreams, read_entry};
use crate::coordination::{RedisLeases, RedisRegistry, token};
use crate::{BACKEND, redis_error};

/// Reads entries if the caller holds the lease. KEYS: stream, lease. ARGV: token, group,
/// consumer, count, start (`>`: new entries; an id: this consumer's pending entries after
/// it). Returns `{1, entries}`, or `{0, last id}` when there was none (for `>`: everything
/// up to the stream's last entry has been delivered to the group).
const READ: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('NOTOWNER lease lost') end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', tonumber(ARGV[4]), 'STREAMS', KEYS[1], ARGV[5])
if r and r[1] and #r[1][2] > 0 then return {1, r[1][2]} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then return {0, last[1][1]} end
return {0, '0-0'}
";

/// Claims pending entries if the caller holds the lease. KEYS: stream, lease. ARGV: token,
/// group, consumer, cursor, count. Returns `XAUTOCLAIM`'s reply: next cursor, entries,
/// deleted ids.
const CLAIM: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('NOTOWNER lease lost') end
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, ARGV[4], 'COUNT', tonumber(ARGV[5]))
";

/// Claims one entry again (a release's redelivery), if the caller holds the lease. KEYS:
/// stream, lease. ARGV: token, group, consumer, id. Returns `XCLAIM`'s entries (none when
/// it was acknowledged meanwhile).
const CLAIM_ONE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('NOTOWNER lease lost') end
return redis.call('XCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, ARGV[4])
";

/// Acknowledges entries if the caller holds the lease. KEYS: stream, lease. ARGV: token,
/// group, ids.
const ACK: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('NOTOWNER lease lost') end
return redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, 3))
";

struct Scripts {
    read: Script,
    claim: Script,
    claim_one: Script,
    ack: Script,
}

/// One partition as this member owns it (from its rewind on).
struct Part {
    epoch: u64,
    token: String,
    paused: bool,
    /// The lease is gone: nothing more is read (the coordinator reports the loss).
    dead: bool,
    /// Claimed at the rewind: delivered before new entries.
    backlog: VecDeque<(Entry, u32)>,
    /// The id up to which the group has had everything, to wait for newer ones.
    waited_from: Option<String>,
    /// A read failed after the server may have run it (its entries then pending with this
    /// consumer, never delivered): this consumer's pending entries after this id are read
    /// again before any new one. The pool drops the copies of what it already holds.
    resync_from: Option<String>,
}

/// A release's wish: claim `id` of `partition` again at `due`.
struct Redelivery {
    due: Instant,
    partition: u32,
    epoch: u64,
    id: String,
    count: u32,
}

struct Shared {
    streams: RedisStreams,
    conn: ConnectionManager,
    topic: String,
    group: String,
    member: String,
    keys: Keys,
    leases: Arc<RedisLeases>,
    parts: Mutex<HashMap<u32, Part>>,
    redeliveries: Mutex<Vec<Redelivery>>,
    /// Acknowledgements for the acknowledger task, each with its caller. When the task has
    /// ended (the subscription is gone), sends fail and the caller learns it.
    acks: mpsc::UnboundedSender<AckRequest>,
    /// Acknowledgements the server did not take (unreachable): sent again until they are
    /// taken or the partition is gone.
    unsent_acks: Mutex<Vec<(u32, u64, String)>>,
    wake: Notify,
    /// The subscription ends (its stream was dropped, or the transport closed).
    stop: Arc<AtomicBool>,
    scripts: Scripts,
}

fn not_owned(shared: &Shared, partition: u32, epoch: u64) -> Error {
    Error::Conflict(format!(
        "partition {partition} of {} is no longer owned under epoch {epoch}",
        shared.topic
    ))
}

fn is_not_owner(e: &redis::RedisError) -> bool {
    e.code() == Some("NOTOWNER") || e.to_string().contains("NOTOWNER")
}

impl Shared {
    /// Runs a fenced script; `Conflict` when the lease is not the caller's any more.
    async fn fenced<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        partition: u32,
        epoch: u64,
        args: &[&str],
    ) -> Result<T> {
        let mut inv = script.key(self.keys.stream(partition));
        inv.key(self.leases.lease_key(partition));
        for a in args {
            inv.arg(*a);
        }
        match inv.invoke_async(&mut self.conn.clone()).await {
            Ok(v) => Ok(v),
            Err(e) if is_not_owner(&e) => Err(not_owned(self, partition, epoch)),
            Err(e) => Err(redis_error(e)),
        }
    }

    fn token_of(&self, partition: u32, epoch: u64) -> Option<String> {
        self.parts
            .lock()
            .get(&partition)
            .filter(|p| p.epoch == epoch)
            .map(|p| p.token.clone())
    }

    /// The message of an entry, as a delivery.
    fn delivery(
        self: &Arc<Self>,
        partition: u32,
        epoch: u64,
        e: Entry,
        count: u32,
    ) -> Result<Delivery> {
        let id = e.id.clone();
        let (message, problem) = entry::inbound(&self.topic, partition, e)?;
        let acker = Arc::new(RedisAcker {
            shared: self.clone(),
            partition,
            epoch,
            id,
            count,
        });
        let mut d = Delivery::new(message, count, acker).with_epoch(epoch);
        if let Some(why) = problem {
            d = d.unreadable(why);
        }
        Ok(d)
    }
}

/// One acknowledgement for the acknowledger task.
struct AckRequest {
    partition: u32,
    epoch: u64,
    id: String,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

struct RedisAcker {
    shared: Arc<Shared>,
    partition: u32,
    epoch: u64,
    id: String,
    count: u32,
}

#[async_trait]
impl Acker for RedisAcker {
    /// `XACK`, if this member still holds the partition under the delivery's epoch.
    /// Acknowledgements are sent together: one fenced script per partition for all those
    /// waiting (a group commit), and this resolves when the server took its own. When the
    /// server cannot be reached, this fails (retryable) and the acknowledgement is kept
    /// and sent again until the server takes it or the partition moves (then the next
    /// owner claims the entry and handles it again).
    async fn ack(&self) -> Result<()> {
        if self.shared.token_of(self.partition, self.epoch).is_none() {
            return Err(not_owned(&self.shared, self.partition, self.epoch));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = AckRequest {
            partition: self.partition,
            epoch: self.epoch,
            id: self.id.clone(),
            done: tx,
        };
        if self.shared.acks.send(request).is_err() {
            return Err(Error::closed("redis subscription"));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::closed("redis subscription")))
    }

    /// The entry stays pending; it is claimed again (its delivery count grows) after
    /// `delay`.
    async fn release(&self, delay: Duration) -> Result<()> {
        if self.shared.token_of(self.partition, self.epoch).is_none() {
            return Err(not_owned(&self.shared, self.partition, self.epoch));
        }
        self.shared.redeliveries.lock().push(Redelivery {
            due: Instant::now() + delay,
            partition: self.partition,
            epoch: self.epoch,
            id: self.id.clone(),
            count: self.count,
        });
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// The group control: rewinds by claiming the partition's pending entries.
struct Control {
    shared: Arc<Shared>,
}

impl PartitionControl for Control {
    fn pause(&self, partition: u32) {
        if let Some(p) = self.shared.parts.lock().get_mut(&partition) {
            p.paused = true;
        }
    }

    fn resume(&self, partition: u32) {
        if let Some(p) = self.shared.parts.lock().get_mut(&partition) {
            p.paused = false;
        }
        self.shared.wake.notify_one();
    }
}

#[async_trait]
impl GroupControl for Control {
    /// Claims the partition's pending entries. A transient failure is tried again (the
    /// claim is idempotent from `0-0`) for up to a lease TTL; if it still fails, the lease
    /// is given back, so that the group hands the partition out again (to this member or
    /// another) instead of leaving it owned and unread.
    async fn rewind(&self, partition: u32, epoch: u64) -> Result<()> {
        let sh = &self.shared;
        sh.redeliveries.lock().retain(|r| r.partition != partition);
        let deadline = Instant::now() + sh.streams.inner.config.streams.lease_ttl;
        loop {
            match self.claim(partition, epoch).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tracing::warn!(topic = %sh.topic, partition, error = %e, "claiming the partition's pending entries failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    if !matches!(e, Error::Conflict(_)) {
                        let _ = dualbus_core::group::LeaseStore::release(
                            &*sh.leases,
                            partition,
                            &sh.member,
                            epoch,
                        )
                        .await;
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn release(&self, partition: u32, epoch: u64) -> Result<()> {
        let sh = &self.shared;
        {
            let mut parts = sh.parts.lock();
            if parts.get(&partition).is_some_and(|p| p.epoch == epoch) {
                parts.remove(&partition);
            }
        }
        sh.redeliveries
            .lock()
            .retain(|r| !(r.partition == partition && r.epoch == epoch));
        Ok(())
    }
}

impl Control {
    /// The rewind's work: claims every pending entry and makes them the partition's
    /// backlog.
    async fn claim(&self, partition: u32, epoch: u64) -> Result<()> {
        let sh = &self.shared;
        let token = token(&sh.member, epoch);
        let mut claimed: Vec<Entry> = Vec::new();
        let mut cursor = "0-0".to_owned();
        let mut deleted = 0u64;
        loop {
            let v: Value = sh
                .fenced(
                    &sh.scripts.claim,
                    partition,
                    epoch,
                    &[&token, &sh.group, &sh.member, &cursor, "512"],
                )
                .await?;
            let Value::Array(mut parts) = v else {
                return Err(Error::backend(
                    BACKEND,
                    false,
                    "XAUTOCLAIM: unexpected reply",
                ));
            };
            let gone = if parts.len() > 2 { parts.pop() } else { None };
            let entries = parts.pop().unwrap_or(Value::Nil);
            let next: String = parts
                .pop()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_else(|| "0-0".to_owned());
            if let Some(Value::Array(ids)) = gone {
                deleted += ids.len() as u64;
            }
            claimed.extend(entry::entries(entries)?);
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        if deleted > 0 {
            sh.streams
                .inner
                .lost_entries
                .fetch_add(deleted, Ordering::Relaxed);
            tracing::warn!(topic = %sh.topic, group = %sh.group, partition, deleted, "pending entries were deleted before this owner could claim them: lost events");
        }
        let counts =
            delivery_counts(&sh.conn, &sh.keys.stream(partition), &sh.group, &claimed).await?;
        let mut backlog: VecDeque<(Entry, u32)> = claimed
            .into_iter()
            .map(|e| {
                let n = counts.get(&e.id).copied().unwrap_or(1);
                (e, n)
            })
            .collect();
        if !sh.streams.inner.config.rewind {
            // The mutant: the claimed entries come a second later, after newer ones.
            let due = Instant::now() + Duration::from_secs(1);
            sh.redeliveries
                .lock()
                .extend(backlog.drain(..).map(|(e, n)| Redelivery {
                    due,
                    partition,
                    epoch,
                    id: e.id,
                    count: n,
                }));
        }
        if !backlog.is_empty() {
            tracing::debug!(topic = %sh.topic, partition, epoch, pending = backlog.len(), "claimed the partition's pending entries");
        }
        sh.parts.lock().insert(
            partition,
            Part {
                epoch,
                token,
                paused: false,
                dead: false,
                backlog,
                waited_from: None,
                resync_from: None,
            },
        );
        sh.wake.notify_one();
        Ok(())
    }
}

/// Delivery counts of claimed entries, from the group's pending list.
async fn delivery_counts(
    conn: &ConnectionManager,
    stream: &str,
    group: &str,
    claimed: &[Entry],
) -> Result<HashMap<String, u32>> {
    let mut out = HashMap::with_capacity(claimed.len());
    let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
        return Ok(out);
    };
    let mut start = first.id.clone();
    loop {
        let rows: Vec<(String, String, u64, u32)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(&start)
            .arg(&last.id)
            .arg(1000)
            .query_async(&mut conn.clone())
            .await
            .map_err(redis_error)?;
        let full = rows.len() == 1000;
        let Some(next) = rows.last().map(|r| format!("({}", r.0)) else {
            break;
        };
        for (id, _, _, times) in rows {
            out.insert(id, times);
        }
        if !full {
            break;
        }
        start = next;
    }
    Ok(out)
}

/// Pending plus lag of `group` on `stream` (the whole stream when the group is not there).
pub(super) async fn pending_of(conn: &ConnectionManager, stream: &str, group: &str) -> Result<u64> {
    let groups: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut conn.clone())
        .await;
    let groups = match groups {
        Ok(v) => v,
        // No such stream: nothing there.
        Err(e) if e.to_string().contains("no such key") => return Ok(0),
        Err(e) => return Err(redis_error(e)),
    };
    let Value::Array(groups) = groups else {
        return Ok(0);
    };
    for g in groups {
        let fields = fields_of(g);
        let name = fields.get("name").and_then(text);
        if name.as_deref() != Some(group) {
            continue;
        }
        let pending = fields.get("pending").and_then(int).unwrap_or(0);
        let lag = match fields.get("lag").and_then(int) {
            Some(l) => l,
            // Unknown (entries deleted in the range): count what is after the group's last
            // delivered id.
            None => {
                let from = fields
                    .get("last-delivered-id")
                    .and_then(text)
                    .unwrap_or_else(|| "0-0".to_owned());
                let mut n = 0u64;
                let mut from = from;
                loop {
                    let page: Vec<(String, Value)> = redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(format!("({from}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn.clone())
                        .await
                        .map_err(redis_error)?;
                    n += page.len() as u64;
                    match page.last() {
                        Some((id, _)) if page.len() == 1000 => from = id.clone(),
                        _ => break,
                    }
                }
                n
            }
        };
        return Ok(pending + lag);
    }
    let len: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn.clone())
        .await
        .map_err(redis_error)?;
    Ok(len)
}

fn fields_of(v: Value) -> HashMap<String, Value> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| text(&k).map(|k| (k, v)))
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// Reads a delivered entry again by its position.
struct Rereader {
    conn: ConnectionManager,
    topic: String,
    keys: Keys,
}

#[async_trait]
impl Reread for Rereader {
    async fn reread(&self, position: Position) -> Result<InboundMessage> {
        read_entry(
            &self.conn,
            &self.topic,
            &self.keys,
            position.partition,
            &id_of(position.offset),
        )
        .await
    }
}

/// Stops the reader when the delivery stream is dropped.
struct Deliveries {
    rx: mpsc::Receiver<Result<Delivery>>,
    shared: Arc<Shared>,
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

pub(super) async fn subscribe(
    streams: &RedisStreams,
    spec: SubscriptionSpec,
) -> Result<DomainSubscription> {
    let cfg = &streams.inner.config;
    let topic = spec.topic.as_str().to_owned();
    let n = streams.partitions(&topic).await?;
    let keys = streams.keys(&topic);
    let conn = streams.inner.conn.clone();
    let start = match spec.start {
        StartPosition::Latest => "$",
        _ => "0",
    };
    for p in 0..n {
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.stream(p))
            .arg(&spec.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut conn.clone())
            .await;
        match r {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(redis_error(e)),
        }
    }
    let member = format!("m-{}", uuid::Uuid::now_v7().simple());
    let st = &cfg.streams;
    let registry = Arc::new(RedisRegistry::new(
        conn.clone(),
        &st.prefix,
        &topic,
        &spec.group,
        st.member_timeout,
    ));
    let leases = Arc::new(RedisLeases::new(
        conn.clone(),
        &st.prefix,
        &topic,
        &spec.group,
        st.lease_ttl,
    ));
    // The waits block a connection of their own for up to `block`.
    let waiter = streams
        .inner
        .client
        .get_connection_manager_with_config(
            crate::pubsub::manager_config(cfg)
                .set_response_timeout(Some(cfg.response_timeout + st.block)),
        )
        .await
        .map_err(redis_error)?;
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    streams.track(&stop);
    let shared = Arc::new(Shared {
        streams: streams.clone(),
        conn: conn.clone(),
        topic: topic.clone(),
        group: spec.group.clone(),
        member: member.clone(),
        keys: keys.clone(),
        leases: leases.clone(),
        parts: Mutex::new(HashMap::new()),
        redeliveries: Mutex::new(Vec::new()),
        acks: acks_tx,
        unsent_acks: Mutex::new(Vec::new()),
        wake: Notify::new(),
        stop: stop.clone(),
        scripts: Scripts {
            read: Script::new(READ),
            claim: Script::new(CLAIM),
            claim_one: Script::new(CLAIM_ONE),
            ack: Script::new(ACK),
        },
    });
    let (tx, rx) = mpsc::channel(st.prefetch);
    tokio::spawn(read_loop(
        shared.clone(),
        tx,
        waiter,
        st.read_count,
        st.block,
    ));
    tokio::spawn(ack_loop(shared.clone(), acks_rx));
    let ttl = st.lease_ttl;
    let config = CoordinatorConfig::new(n)
        .placement(if n == 1 {
            Placement::Sticky
        } else {
            Placement::Balanced
        })
        .renew_every(ttl.min(st.member_timeout) / 3)
        // Redis reports no changes: members look again every quarter of the lease TTL.
        .poll_every(ttl / 4)
        // Partitioned topics take every member (the contract: `standby` is for topics of
        // one partition).
        .standby(spec.standby || n > 1);
    let control = Arc::new(Control {
        shared: shared.clone(),
    });
    let membership = match Coordinator::join(member, registry, leases, control, config).await {
        Ok(m) => m,
        Err(Error::Conflict(_)) if n == 1 => {
            shared.stop.store(true, Ordering::Release);
            shared.wake.notify_one();
            return Err(Error::Conflict(format!(
                "another subscriber of group {:?} on topic {topic:?} is active (the topic has one partition: one subscriber per group; subscribe as a standby to wait for it)",
                spec.group
            )));
        }
        Err(e) => {
            shared.stop.store(true, Ordering::Release);
            shared.wake.notify_one();
            return Err(e);
        }
    };
    let deliveries = Deliveries {
        rx,
        shared: shared.clone(),
    };
    Ok(DomainSubscription::new(Box::pin(deliveries))
        .with_reread(Arc::new(Rereader { conn, topic, keys }))
        .with_group(membership))
}

/// What one turn over a partition found.
enum Turn {
    /// Entries to deliver.
    Entries(u64, Vec<(Entry, u32)>),
    /// Nothing new after this id (under this epoch).
    Idle(u64, String),
    /// The lease of this epoch is gone.
    Dead(u64),
    /// Paused, not rewound, or a failed read.
    Skip,
}

async fn turn(shared: &Arc<Shared>, partition: u32, count: usize) -> Turn {
    let (epoch, token, resync) = {
        let mut parts = shared.parts.lock();
        let Some(p) = parts.get_mut(&partition) else {
            return Turn::Skip;
        };
        if p.paused || p.dead {
            return Turn::Skip;
        }
        if !p.backlog.is_empty() {
            let batch: Vec<(Entry, u32)> = p.backlog.drain(..).collect();
            return Turn::Entries(p.epoch, batch);
        }
        (p.epoch, p.token.clone(), p.resync_from.clone())
    };
    let count = count.to_string();
    let start = resync.clone().unwrap_or_else(|| ">".to_owned());
    let r: Result<(i64, Value)> = shared
        .fenced(
            &shared.scripts.read,
            partition,
            epoch,
            &[&token, &shared.group, &shared.member, &count, &start],
        )
        .await;
    let set_resync = |from: Option<String>| {
        if let Some(p) = shared.parts.lock().get_mut(&partition)
            && p.epoch == epoch
        {
            p.resync_from = from;
        }
    };
    match r {
        Ok((1, entries)) => match entry::entries(entries) {
            Ok(e) => {
                if resync.is_some() {
                    set_resync(e.last().map(|l| l.id.clone()));
                }
                // Read again from this consumer's pending entries: each was delivered
                // before (and `XREADGROUP` with an id counts this delivery), so at least
                // its second delivery.
                let count = if resync.is_some() { 2 } else { 1 };
                Turn::Entries(epoch, e.into_iter().map(|e| (e, count)).collect())
            }
            Err(e) => {
                tracing::warn!(topic = %shared.topic, partition, error = %e, "unreadable reply to a read; reading this consumer's pending entries again");
                set_resync(Some(resync.unwrap_or_else(|| "0".to_owned())));
                Turn::Skip
            }
        },
        Ok((_, last)) => {
            if resync.is_some() {
                // Every pending entry of this consumer has been read again.
                set_resync(None);
                return Turn::Skip;
            }
            Turn::Idle(
                epoch,
                redis::from_redis_value(last).unwrap_or_else(|_| "0-0".to_owned()),
            )
        }
        Err(Error::Conflict(_)) => Turn::Dead(epoch),
        Err(e) => {
            tracing::warn!(topic = %shared.topic, partition, error = %e, "reading a partition failed; reading this consumer's pending entries again");
            // The server may have run the read: its entries would be pending with this
            // consumer and never delivered.
            set_resync(Some(resync.unwrap_or_else(|| "0".to_owned())));
            Turn::Skip
        }
    }
}

/// Claims the releases that are due; returns the deliveries and the next due time.
async fn due_redeliveries(shared: &Arc<Shared>) -> (Vec<Result<Delivery>>, Option<Instant>) {
    let now = Instant::now();
    let due: Vec<Redelivery> = {
        let mut r = shared.redeliveries.lock();
        let parts = shared.parts.lock();
        // Those of partitions no longer owned under their epoch are dropped: the next
        // owner claims the entries.
        r.retain(|x| {
            parts
                .get(&x.partition)
                .is_some_and(|p| p.epoch == x.epoch && !p.dead)
        });
        let (due, keep): (Vec<Redelivery>, Vec<Redelivery>) = r
            .drain(..)
            .partition(|x| x.due <= now && parts.get(&x.partition).is_some_and(|p| !p.paused));
        *r = keep;
        due
    };
    let mut out = Vec::new();
    for r in due {
        let Some(token) = shared.token_of(r.partition, r.epoch) else {
            continue;
        };
        let v: Result<Value> = shared
            .fenced(
                &shared.scripts.claim_one,
                r.partition,
                r.epoch,
                &[&token, &shared.group, &shared.member, &r.id],
            )
            .await;
        match v.and_then(entry::entries) {
            Ok(entries) => {
                for e in entries {
                    out.push(shared.delivery(r.partition, r.epoch, e, r.count + 1));
                }
            }
            Err(Error::Conflict(_)) => {}
            Err(e) => {
                tracing::warn!(topic = %shared.topic, partition = r.partition, error = %e, "claiming a released entry failed; trying again");
                shared.redeliveries.lock().push(Redelivery {
                    due: now + Duration::from_millis(100),
                    ..r
                });
            }
        }
    }
    // The next due time of those that can be claimed (not of paused partitions).
    let next = {
        let r = shared.redeliveries.lock();
        let parts = shared.parts.lock();
        r.iter()
            .filter(|x| parts.get(&x.partition).is_some_and(|p| !p.paused))
            .map(|x| x.due)
            .min()
    };
    (out, next)
}

/// Sends `ids` of `partition` in one fenced script: `Ok` when the server took them,
/// `Conflict` when the partition is not this member's any more.
async fn send_acks(shared: &Arc<Shared>, partition: u32, epoch: u64, ids: &[String]) -> Result<()> {
    let Some(token) = shared.token_of(partition, epoch) else {
        return Err(not_owned(shared, partition, epoch));
    };
    // Lua unpacks at most a few thousand values onto its stack: 1,000 ids per call.
    for chunk in ids.chunks(1000) {
        let mut args: Vec<&str> = vec![&token, &shared.group];
        args.extend(chunk.iter().map(String::as_str));
        let _: i64 = shared
            .fenced(&shared.scripts.ack, partition, epoch, &args)
            .await?;
    }
    Ok(())
}

type Callers = Vec<tokio::sync::oneshot::Sender<Result<()>>>;

/// The acknowledger: takes every waiting acknowledgement, sends them per partition, and
/// answers each caller; sends again what the server did not take. Ends when the
/// subscription stopped and nothing waits (callers after that get `Closed`).
async fn ack_loop(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<AckRequest>) {
    loop {
        let mut waiting: Vec<AckRequest> = Vec::new();
        while let Ok(r) = requests.try_recv() {
            waiting.push(r);
        }
        let unsent: Vec<(u32, u64, String)> = std::mem::take(&mut *shared.unsent_acks.lock());
        if waiting.is_empty() && unsent.is_empty() {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                r = requests.recv() => match r {
                    Some(r) => waiting.push(r),
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        let mut groups: HashMap<(u32, u64), (Vec<String>, Callers)> = HashMap::new();
        for r in waiting {
            let g = groups.entry((r.partition, r.epoch)).or_default();
            g.0.push(r.id);
            g.1.push(r.done);
        }
        for (p, e, id) in unsent {
            groups.entry((p, e)).or_default().0.push(id);
        }
        let mut failed = false;
        for ((partition, epoch), (ids, callers)) in groups {
            match send_acks(&shared, partition, epoch, &ids).await {
                Ok(()) => {
                    for c in callers {
                        let _ = c.send(Ok(()));
                    }
                }
                Err(Error::Conflict(why)) => {
                    for c in callers {
                        let _ = c.send(Err(Error::Conflict(why.clone())));
                    }
                }
                Err(e) => {
                    failed = true;
                    // Kept and sent again while the partition stays here; the callers learn
                    // the failure (if the partition moves first, the next owner claims
                    // the entries and handles them again).
                    tracing::debug!(topic = %shared.topic, partition, error = %e, "acknowledgements not taken; sending them again");
                    shared
                        .unsent_acks
                        .lock()
                        .extend(ids.into_iter().map(|id| (partition, epoch, id)));
                    for c in callers {
                        let _ = c.send(Err(Error::Unavailable {
                            backend: BACKEND,
                            source: format!("acknowledgement not taken yet, sent again: {e}")
                                .into(),
                        }));
                    }
                }
            }
        }
        if failed {
            if shared.stop.load(Ordering::Acquire) && requests.is_empty() {
                // The subscription is gone: what is left is claimed by the next owner.
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn read_loop(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Delivery>>,
    waiter: ConnectionManager,
    count: usize,
    block: Duration,
) {
    loop {
        if shared.stop.load(Ordering::Acquire) || tx.is_closed() {
            break;
        }
        let (redelivered, next_due) = due_redeliveries(&shared).await;
        let mut progressed = !redelivered.is_empty();
        for d in redelivered {
            if tx.send(d).await.is_err() {
                return;
            }
        }
        let mut owned: Vec<u32> = shared.parts.lock().keys().copied().collect();
        owned.sort_unstable();
        for p in owned {
            match turn(&shared, p, count).await {
                Turn::Entries(epoch, entries) => {
                    progressed |= !entries.is_empty();
                    for (e, n) in entries {
                        if tx.send(shared.delivery(p, epoch, e, n)).await.is_err() {
                            return;
                        }
                    }
                }
                Turn::Idle(epoch, last) => {
                    if let Some(part) = shared.parts.lock().get_mut(&p)
                        && part.epoch == epoch
                    {
                        part.waited_from = Some(last);
                    }
                }
                Turn::Dead(epoch) => {
                    if let Some(part) = shared.parts.lock().get_mut(&p)
                        && part.epoch == epoch
                    {
                        part.dead = true;
                    }
                }
                Turn::Skip => {}
            }
        }
        if progressed {
            continue;
        }
        // Nothing to do: wait for new entries, a local change or the next release.
        let waits: Vec<(String, String)> = shared
            .parts
            .lock()
            .iter()
            .filter(|(_, p)| !p.paused && !p.dead)
            .filter_map(|(n, p)| p.waited_from.clone().map(|id| (shared.keys.stream(*n), id)))
            .collect();
        let until = next_due.map_or(block, |d| {
            d.saturating_duration_since(Instant::now()).min(block)
        });
        let notified = shared.wake.notified();
        if waits.is_empty() {
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(until) => {}
            }
            continue;
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS");
        for (k, _) in &waits {
            cmd.arg(k);
        }
        for (_, id) in &waits {
            cmd.arg(id);
        }
        let mut w = waiter.clone();
        tokio::select! {
            () = notified => {}
            r = cmd.query_async::<Value>(&mut w) => {
                if let Err(e) = r {
                    tracing::debug!(topic = %shared.topic, error = %e, "waiting for entries failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
