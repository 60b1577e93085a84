//! Consumer-group coordination on Redis: the member registry and the partition leases that
//! core's group [`Coordinator`](dualbus_core::group::Coordinator) runs on.
//!
//! Every operation is one Lua script, so that it is atomic on the server, and every time
//! is the server's (`TIME`): members on hosts with skewed clocks agree on who is live.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>{<topic>}:<group>:members` | sorted set | member → the server time (ms) its registration expires |
//! | `<prefix>{<topic>:<p>}:<group>:lease` | string with a TTL | `<member>:<epoch>` of the partition's holder |
//! | `<prefix>{<topic>:<p>}:<group>:epoch` | integer | the partition's last epoch (never expires: epochs only grow) |
//!
//! The hash tags (`{...}`) put a partition's keys in one slot, so that a script may touch
//! them together on a cluster too.

use std::time::Duration;

use async_trait::async_trait;
use dualbus_core::Result;
use dualbus_core::group::{LeaseStore, MemberRegistry};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::redis_error;

/// The prefix of every key this crate writes, unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "dualbus:";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

const NOW: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

/// The live members of one group, in a sorted set scored by expiry time.
pub struct RedisRegistry {
    conn: ConnectionManager,
    key: String,
    ttl: u64,
    join: Script,
    heartbeat: Script,
    members: Script,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("key", &self.key)
            .field("ttl_ms", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry {
    /// The registry of `group` on `topic`; a member is live for `member_timeout` after its
    /// last join or heartbeat.
    pub fn new(
        conn: ConnectionManager,
        prefix: &str,
        topic: &str,
        group: &str,
        member_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            key: format!("{prefix}{{{topic}}}:{group}:members"),
            ttl: millis(member_timeout),
            // The set itself lives twice the timeout past the last join or heartbeat, so a
            // group nobody runs any more leaves nothing behind.
            join: Script::new(&format!(
                "{NOW} redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) \
                 redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2])) return 1"
            )),
            heartbeat: Script::new(&format!(
                "{NOW} local s = redis.call('ZSCORE', KEYS[1], ARGV[1]) \
                 if s and tonumber(s) > now then \
                   redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) \
                   redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2])) return 1 end \
                 redis.call('ZREM', KEYS[1], ARGV[1]) return 0"
            )),
            members: Script::new(&format!(
                "{NOW} redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) \
                 return redis.call('ZRANGE', KEYS[1], 0, -1)"
            )),
        }
    }
}

#[async_trait]
impl MemberRegistry for RedisRegistry {
    async fn join(&self, member: &str) -> Result<()> {
        let _: i64 = self
            .join
            .key(&self.key)
            .arg(member)
            .arg(self.ttl)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn heartbeat(&self, member: &str) -> Result<bool> {
        let alive: i64 = self
            .heartbeat
            .key(&self.key)
            .arg(member)
            .arg(self.ttl)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(alive == 1)
    }

    async fn members(&self) -> Result<Vec<String>> {
        self.members
            .key(&self.key)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    async fn leave(&self, member: &str) -> Result<()> {
        let _: i64 = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(member)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}

/// The leases of one group's partitions: a string `<member>:<epoch>` with a TTL per
/// partition, and the partition's epoch counter.
pub struct RedisLeases {
    conn: ConnectionManager,
    prefix: String,
    topic: String,
    group: String,
    ttl: u64,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl std::fmt::Debug for RedisLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLeases")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("ttl_ms", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The token a lease holds: the holder and its epoch.
pub fn token(member: &str, epoch: u64) -> String {
    format!("{member}:{epoch}")
}

impl RedisLeases {
    /// The leases of `group` on `topic`; a lease lives `ttl` after it was taken or last
    /// renewed.
    pub fn new(
        conn: ConnectionManager,
        prefix: &str,
        topic: &str,
        group: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            ttl: millis(ttl),
            acquire: Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then return false end \
                 local e = redis.call('INCR', KEYS[2]) \
                 redis.call('SET', KEYS[1], ARGV[1] .. ':' .. e, 'PX', tonumber(ARGV[2])) \
                 return e",
            ),
            renew: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) return 1 end \
                 return 0",
            ),
            release: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   redis.call('DEL', KEYS[1]) return 1 end \
                 return 0",
            ),
        }
    }

    /// The key of `partition`'s lease.
    pub fn lease_key(&self, partition: u32) -> String {
        format!(
            "{}{{{}:{partition}}}:{}:lease",
            self.prefix, self.topic, self.group
        )
    }

    fn epoch_key(&self, partition: u32) -> String {
        format!(
            "{}{{{}:{partition}}}:{}:epoch",
            self.prefix, self.topic, self.group
        )
    }
}

#[async_trait]
impl LeaseStore for RedisLeases {
    async fn acquire(&self, partition: u32, member: &str) -> Result<Option<u64>> {
        self.acquire
            .key(self.lease_key(partition))
            .key(self.epoch_key(partition))
            .arg(member)
            .arg(self.ttl)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    async fn renew(&self, partition: u32, member: &str, epoch: u64) -> Result<bool> {
        let renewed: i64 = self
            .renew
            .key(self.lease_key(partition))
            .arg(token(member, epoch))
            .arg(self.ttl)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(renewed == 1)
    }

    async fn release(&self, partition: u32, member: &str, epoch: u64) -> Result<()> {
        let _: i64 = self
            .release
            .key(self.lease_key(partition))
            .arg(token(member, epoch))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}
