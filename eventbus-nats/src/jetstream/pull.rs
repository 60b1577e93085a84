//! Domain subscriptions: the durable consumer's pull loop, with the rewind to the ack floor
//! at every takeover and reconnect and the way past a message the client cannot read.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use dualbus_core::offsets::DeliveryCounter;
use dualbus_core::{Delivery, DomainSubscription, Error, Result, SubscriptionSpec};
use futures::StreamExt as _;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{BACKEND, unreadable};

use super::JetStream;
use super::ack::SettledAcker;
use super::coordination::KvLeases;
use super::inbound::{delivery, stored_inbound};
use super::lease::Owned;
use super::pinned::{self, Pin, PinnedPull, PullSettings, Pulled};
use super::plan::subject_matches;
use super::reread::StreamReread;

impl JetStream {
    /// `DomainTransport::subscribe`.
    pub(super) async fn subscribe_inner(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<DomainSubscription> {
        self.check_open()?;
        if spec.group.is_empty() {
            return Err(Error::config("domain.group.name", "must not be empty"));
        }
        let plan = self.plan(&spec.topic);
        let stream = self.stream(&spec.topic).await?;
        let partitions = plan.group_partitions();
        let mut consumers = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let (name, filter) = plan.partition_consumer(&spec.topic, &spec.group, p);
            consumers.push(self.consumer(&stream, &spec, &name, filter).await?);
        }
        let stream_name = stream.cached_info().config.name.clone();
        // The group: this subscriber delivers a partition only while it holds its lease,
        // from the rewind at its assignment on (the takeover rewind: whatever an earlier
        // owner left unacknowledged comes first, in stream order, before anything new).
        let (membership, owned, leases) = self
            .join_group(
                &stream_name,
                &plan.consumer(&spec.topic, &spec.group),
                &spec,
                partitions,
            )
            .await?;
        let lost = self.inner.shutdown.child_token();
        let c = &self.inner.config.consumer;
        let request_timeout = self.inner.config.request_timeout;
        let pulls =
            consumers
                .into_iter()
                .zip(owned)
                .zip(0..)
                .map(|((consumer, owned), partition)| {
                    let pin = Pin::default();
                    let (moves, moved) = watch::channel(0);
                    let keepalive = keep_pinned(
                        self.inner.js.clone(),
                        &consumer,
                        pin.clone(),
                        moves,
                        request_timeout,
                        lost.child_token(),
                    );
                    let state = Pulling {
                        topic: spec.topic.to_string(),
                        partition,
                        js: self.inner.js.clone(),
                        stream: stream.clone(),
                        consumer,
                        pin,
                        moved,
                        _keepalive: keepalive,
                        keepalive_open: true,
                        lease: leases.clone(),
                        suspect: false,
                        claiming: false,
                        claimed: false,
                        rewinds: self.inner.config.rewind,
                        batch: c.batch,
                        ack_wait: c.ack_wait,
                        messages: None,
                        opened_at: 0,
                        rewind: false,
                        owned,
                        epoch: None,
                        takeover: false,
                        counts: DeliveryCounter::new(),
                        last_read: 0,
                        poison: None,
                        ready: VecDeque::new(),
                        watch: {
                            let mut w = tokio::time::interval(Duration::from_millis(100));
                            w.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            w
                        },
                        stats: self.inner.client.statistics(),
                        quiet_since: tokio::time::Instant::now(),
                        lost: lost.clone(),
                    };
                    futures::stream::unfold(state, |mut s| async move {
                        let item = s.next().await?;
                        Some((item, s))
                    })
                    .boxed()
                });
        let deliveries = futures::stream::select_all(pulls).boxed();
        let reread = Arc::new(StreamReread {
            js: self.inner.js.clone(),
            stream: stream_name,
            topic: spec.topic.to_string(),
        });
        Ok(DomainSubscription::new(deliveries)
            .with_reread(reread)
            .with_group(membership))
    }
}

/// State of the delivery stream of one partition of a subscription.
struct Pulling {
    topic: String,
    /// The group's partition this consumer delivers (its deliveries' positions).
    partition: u32,
    js: jetstream::Context,
    /// The stream (to move the consumer's pin).
    stream: jetstream::stream::Stream,
    consumer: PullConsumer,
    /// The consumer's pin this subscriber holds, if any.
    pin: Pin,
    /// Changes when the keepalive found the pin gone.
    moved: watch::Receiver<u64>,
    /// Stops the keepalive with the subscription.
    _keepalive: DropGuard,
    /// The keepalive still runs (`moved` can change).
    keepalive_open: bool,
    /// The group's leases, to confirm the partition's.
    lease: Arc<KvLeases>,
    /// The pin moved, or is unknown, or the lease's time ran out: nothing is pulled until
    /// the server confirms the lease (then the takeover again) or the ownership changes.
    suspect: bool,
    /// This member moved the pin and pulls without a pin id until the first message
    /// tells it the pin is its own.
    claiming: bool,
    /// The claim took the pin: the rewind that follows counts nothing as delivered.
    claimed: bool,
    /// Whether takeovers rewind (always, except in the mutant check).
    rewinds: bool,
    batch: usize,
    ack_wait: Duration,
    messages: Option<PinnedPull>,
    /// Connections of the client when `messages` was opened.
    opened_at: u64,
    /// Rewind the consumer to its ack floor before the next pull.
    rewind: bool,
    /// The epoch this subscriber may deliver under (set while it holds the group's lease).
    owned: Owned,
    /// The epoch of the deliveries now: `None` while standing by.
    epoch: Option<u64>,
    /// Rewind to the ack floor before the first pull of the epoch.
    takeover: bool,
    /// Delivery counts across rewinds: anything at or below the highest stream sequence
    /// delivered before comes again.
    counts: DeliveryCounter,
    /// The highest stream sequence the client read since the last rewind: a message the
    /// client cannot read is after it.
    last_read: u64,
    /// An unreadable message found after a reconnect, until the consumer is past it.
    poison: Option<Poison>,
    /// Deliveries read ahead (the bounded pulls before an unreadable message).
    ready: VecDeque<Result<Delivery>>,
    /// Ticks while waiting for messages, to look at the connection count.
    watch: tokio::time::Interval,
    /// Since when the open pull has delivered nothing while polled (see [`Pulling::stalled`]).
    quiet_since: tokio::time::Instant,
    stats: Arc<async_nats::Statistics>,
    /// Cancelled when the transport closes: the stream ends.
    lost: CancellationToken,
}

/// How the consumer gets past an unreadable message `S` (see [`crate::unreadable`]).
///
/// Only an acknowledgement can move a JetStream consumer past a message without delivering
/// it, and only while the message is pending (a rewind forgets pending acks) and every
/// message before it is acknowledged (else the next rewind brings it back). So:
/// - ack floor `S - 1` and `S` pending: hand the pool a delivery for it (marked unreadable),
///   wait until the pool dead-lettered it, acknowledge it with a hand-built ack subject, and
///   only then rewind (the floor is now past it);
/// - messages before it still unacknowledged: rewind, deliver exactly the messages before
///   it (bounded pulls), wait until they are acknowledged, then pull normally: the client
///   reads `S` once more (its connection drops again), which makes it pending with the
///   floor at `S - 1`: the first case.
///
/// Nothing is ever deleted from the stream: other groups and other languages' readers
/// share it.
struct Poison {
    stored: unreadable::Stored,
    why: &'static str,
    /// The last message this consumer delivers before it: once the ack floor reached it,
    /// nothing unacknowledged is in front of it.
    last_before: u64,
    phase: Phase,
}

enum Phase {
    /// Hand the pool its delivery next.
    Hand,
    /// Wait until the pool settled it, then acknowledge it and rewind.
    Settling(CancellationToken),
    /// Deliver these messages before it (stream sequences still to come).
    Before(std::collections::BTreeSet<u64>),
    /// Wait until everything before it is acknowledged.
    Floor,
}

/// What to do next while getting past an unreadable message.
enum Step {
    /// Return this delivery.
    Deliver(Delivery),
    /// Look again (read-ahead deliveries, a rewind, or a wait).
    Again,
    /// Pull as usual.
    Pull,
}

impl Pulling {
    fn connects(&self) -> u64 {
        self.stats.connects.load(Ordering::Acquire)
    }

    fn stream_name(&self) -> &str {
        &self.consumer.cached_info().stream_name
    }

    /// Opens the pulls of the consumer under this subscriber's pin (or claiming it):
    /// continuous, or one request of `once` messages. `None` when there is neither a pin
    /// nor a claim: the caller suspects.
    async fn open(&self, once: Option<usize>) -> Option<Result<PinnedPull>> {
        if !self.claiming && self.pin.get().is_none() {
            return None;
        }
        let expires = self.expires();
        let settings = PullSettings {
            batch: once.unwrap_or(self.batch),
            expires,
            heartbeat: (expires / 4).max(Duration::from_millis(50)),
        };
        Some(
            PinnedPull::open(
                &self.js,
                self.stream_name(),
                &self.consumer.cached_info().name,
                self.pin.clone(),
                &settings,
                once.is_some(),
                self.claiming,
            )
            .await,
        )
    }

    /// Stops pulling until the lease is confirmed (see [`Pulling::suspect`]): what was
    /// pulled and not handed out is dropped (unacknowledged: the rewind brings it again).
    fn suspect(&mut self, why: &'static str) {
        if !self.suspect {
            tracing::warn!(topic = %self.topic, partition = self.partition, epoch = ?self.epoch, why, "pulling the partition stops until its lease is confirmed");
        }
        self.suspect = true;
        self.claiming = false;
        self.pin.clear();
        self.messages = None;
        self.ready.clear();
        self.poison = None;
    }

    /// The claim took the pin: its message is dropped, and the consumer is rewound again
    /// under the new pin (what the claim got counts as no delivery).
    fn pinned(&mut self) {
        self.claiming = false;
        self.claimed = true;
        self.messages = None;
        self.rewind = true;
    }

    /// Whether the lease bucket confirms the lease of the epoch delivered under now.
    async fn lease_confirmed(&self) -> Result<bool> {
        match self.epoch {
            Some(epoch) => self.lease.holds(self.partition, epoch).await,
            None => Ok(false),
        }
    }

    /// While suspect: asks the server whether the lease is still this subscriber's, every
    /// sixth of the lease's time, until it is (then the takeover again: unpin, rewind,
    /// pin) or the ownership changes. `false` when the subscription ends.
    async fn confirm(&mut self) -> bool {
        let every = self.consumer.cached_info().config.priority_timeout / 6;
        loop {
            let Some(epoch) = self.epoch else {
                self.suspect = false;
                return true;
            };
            match self.lease.holds(self.partition, epoch).await {
                Ok(true) => {
                    tracing::info!(topic = %self.topic, partition = self.partition, epoch, "the lease is still held: taking the partition over again");
                    self.suspect = false;
                    self.takeover = true;
                    return true;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "confirming the lease failed");
                }
            }
            tokio::select! {
                () = self.lost.cancelled() => return false,
                r = self.owned.changed() => return r.is_ok(),
                () = tokio::time::sleep(every.max(Duration::from_millis(50))) => {}
            }
        }
    }

    /// How long a pull request waits at the server: at most a quarter of the pin's
    /// timeout, so that the requests of a member that froze are gone before its lease can
    /// expire (a waiting request without a pin id could otherwise take the pin from the
    /// next owner).
    fn expires(&self) -> Duration {
        self.ack_wait
            .min(self.consumer.cached_info().config.priority_timeout / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(30))
    }

    /// Whether the open pull is stalled: polled and quiet for a while although the consumer
    /// has messages to deliver. After a server restart a pull can stay open (heartbeats
    /// arrive) and deliver nothing; the caller then opens a new one after the rewind. Asks
    /// the server only once per quiet period.
    async fn stalled(&mut self) -> bool {
        let quiet = self.expires().max(Duration::from_secs(5));
        if self.quiet_since.elapsed() < quiet {
            return false;
        }
        self.quiet_since = tokio::time::Instant::now();
        let Ok(info) = self.consumer.info().await else {
            return false;
        };
        if self.claiming {
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return false;
            }
            // The claim got nothing although there are messages: another request holds the
            // pin (one of a client that is gone, which the server pinned when the pin was
            // moved, or of a former owner). Move it again while the claim waits, if the
            // lease is still this member's.
            tracing::warn!(
                topic = %self.topic, partition = self.partition, pending = info.num_pending,
                ack_pending = info.num_ack_pending, ?quiet,
                "the claim of the consumer's pin got nothing; moving the pin again"
            );
            match self.lease_confirmed().await {
                Ok(true) => {
                    if let Err(e) = self.move_pin().await {
                        tracing::debug!(topic = %self.topic, error = %e, "moving the pin failed");
                    }
                }
                Ok(false) => self.suspect("the lease is not confirmed while claiming the pin"),
                Err(e) => {
                    tracing::debug!(topic = %self.topic, error = %e, "confirming the lease failed");
                }
            }
            return false;
        }
        if info.num_pending == 0 {
            return false;
        }
        tracing::warn!(
            topic = %self.topic, pending = info.num_pending, ?quiet,
            "the pull delivered nothing although the consumer has messages; pulling again"
        );
        true
    }

    /// Waits a little after a failure, unless the subscription ends meanwhile.
    async fn pause(&self) -> bool {
        tokio::select! {
            () = self.lost.cancelled() => false,
            () = tokio::time::sleep(Duration::from_millis(250)) => true,
        }
    }

    /// The consumer's ack floor and last delivered stream sequence.
    async fn floor_and_delivered(&mut self) -> Result<(u64, u64)> {
        let info = self.consumer.info().await.map_err(|e| {
            Error::backend(BACKEND, true, format!("reading the consumer's state: {e}"))
        })?;
        Ok((
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        ))
    }

    /// Whether a stored message is one this consumer delivers.
    fn filtered(&self, subject: &str) -> bool {
        let c = &self.consumer.cached_info().config;
        if c.filter_subject.is_empty() && c.filter_subjects.is_empty() {
            return true;
        }
        subject_matches(&c.filter_subject, subject)
            || c.filter_subjects
                .iter()
                .any(|f| subject_matches(f, subject))
    }

    /// The first message in `from..=to` this consumer delivers that the client cannot read,
    /// and the sequences of those it delivers before it; at most `limit` of them are read.
    /// Steps over the stream by the consumer's filter, so messages of other subjects in a
    /// shared stream cost nothing.
    async fn scan(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<(Option<(unreadable::Stored, &'static str)>, Vec<u64>)> {
        let c = &self.consumer.cached_info().config;
        let filter = if c.filter_subject.is_empty() {
            ">"
        } else {
            c.filter_subject.as_str()
        };
        let stream = self.stream_name();
        let mut readable = Vec::new();
        let mut seq = from;
        while seq <= to && readable.len() < limit {
            let which = unreadable::Which::NextOn(seq, filter);
            let Some(m) = unreadable::get(&self.js, stream, which).await? else {
                break;
            };
            if m.seq > to {
                break;
            }
            seq = m.seq + 1;
            if !self.filtered(&m.subject) {
                continue;
            }
            if let Some(why) = m.problem() {
                return Ok((Some((m, why)), readable));
            }
            readable.push(m.seq);
        }
        Ok((None, readable))
    }

    /// After a reconnect: finds a message the client cannot read among those the server
    /// delivered after the last one read.
    async fn detect(&mut self, floor: u64, delivered: u64) -> Result<()> {
        if self.poison.is_some() {
            return Ok(());
        }
        let from = self.last_read.max(floor) + 1;
        // Bounded: what the server can have sent beyond the last message read.
        if let (Some((stored, why)), _) = self.scan(from, delivered + 1, 2 * self.batch + 1).await?
        {
            tracing::warn!(
                topic = %self.topic, stream = self.stream_name(), seq = stored.seq,
                subject = %stored.subject, why,
                "a stored message the client cannot read (it drops the connection); it goes to the dead letter"
            );
            self.poison = Some(Poison {
                stored,
                why,
                last_before: floor,
                phase: Phase::Floor,
            });
        }
        Ok(())
    }

    /// The rewind after a reconnect, with an unreadable message in the way or not.
    async fn rewind(&mut self) -> Result<()> {
        // Only for the lease held now: a member back from a pause (a new connection) must
        // not rewind a consumer another member owns by now.
        if !self.lease_confirmed().await? {
            self.suspect("the lease is not confirmed at the rewind");
            return Ok(());
        }
        if self.claiming {
            // The claim may have taken the pin with a message that never arrived (the
            // connection dropped, the request was lost): the server keeps the pin for a
            // request that is gone. Move it again.
            self.move_pin().await?;
        }
        let (floor, delivered) = self.floor_and_delivered().await?;
        self.detect(floor, delivered).await?;
        // What the claim got was dropped, not handed out: not a delivery.
        let claimed = std::mem::take(&mut self.claimed);
        if !claimed {
            self.counts.delivered_through(delivered);
        }
        if let Some(seq) = self.poison.as_ref().map(|p| p.stored.seq) {
            if floor >= seq {
                // Acknowledged already: nothing in the way any more.
                self.poison = None;
            } else {
                let (earlier, before) = self.scan(floor + 1, seq - 1, usize::MAX).await?;
                let Some(p) = &mut self.poison else {
                    return Ok(());
                };
                if let Some((stored, why)) = earlier {
                    // An earlier one (read in an earlier pass, then rewound): that first.
                    p.stored = stored;
                    p.why = why;
                    return Box::pin(self.rewind()).await;
                }
                if before.is_empty() && delivered >= seq {
                    // Pending, with nothing unacknowledged before it: settle it and ack it;
                    // the rewind comes after that.
                    if !matches!(p.phase, Phase::Settling(_)) {
                        p.phase = Phase::Hand;
                    }
                    self.rewind = false;
                    return Ok(());
                }
                // Deliver exactly the messages before it first, then wait for their acks.
                p.last_before = before.last().copied().unwrap_or(floor);
                p.phase = Phase::Before(before.into_iter().collect());
            }
        }
        // After a reconnect the server may have lost acks (ours in flight, or its own
        // state after a crash) and will redeliver what it lost only after the ack wait,
        // while new messages flow at once: the takeover trap. Rewinding to the ack floor
        // delivers everything unacknowledged again, in order, before anything new.
        self.reset_to_floor().await?;
        self.last_read = floor;
        self.rewind = false;
        Ok(())
    }

    /// One step of getting past an unreadable message, if one is in the way.
    async fn poison_step(&mut self) -> Result<Step> {
        let Some(p) = &mut self.poison else {
            return Ok(Step::Pull);
        };
        match &mut p.phase {
            Phase::Hand => {
                let settled = CancellationToken::new();
                let message = stored_inbound(&self.topic, &p.stored, self.partition);
                let delivery =
                    Delivery::new(message, 1, Arc::new(SettledAcker(settled.clone()))).unreadable(
                        format!("the NATS client cannot read this message: {}", p.why),
                    );
                p.phase = Phase::Settling(settled);
                Ok(Step::Deliver(delivery))
            }
            Phase::Settling(settled) => {
                let settled = settled.clone();
                let seq = p.stored.seq;
                tokio::select! {
                    () = self.lost.cancelled() => return Err(Error::closed("subscription")),
                    () = settled.cancelled() => {}
                    // The lease ended or changed hands: the pool dropped the delivery without
                    // settling it. Start over; the next reconnect finds the message again.
                    _ = self.owned.changed() => {
                        self.poison = None;
                        self.messages = None;
                        self.rewind = true;
                        return Ok(Step::Again);
                    }
                }
                // Dead-lettered: acknowledge it while it is still pending (a hand-built
                // ack subject: there is no delivery to ack through), then rewind.
                let subject = format!(
                    "$JS.ACK.{}.{}.1.{seq}.0.0.0",
                    self.stream_name(),
                    self.consumer.cached_info().name
                );
                // A request: the server answers once the ack is applied, so the rewind
                // below sees the floor past it. No answer means it was not pending any more
                // (the next rewind finds it again if it is still in the way).
                if let Err(e) = self.js.client().request(subject, Bytes::new()).await {
                    tracing::debug!(topic = %self.topic, seq, error = %e, "the ack of an unreadable message was not confirmed");
                }
                self.poison = None;
                self.messages = None;
                self.rewind = true;
                Ok(Step::Again)
            }
            Phase::Before(remaining) => {
                if remaining.is_empty() {
                    p.phase = Phase::Floor;
                    return Ok(Step::Again);
                }
                let n = remaining.len().min(self.batch);
                let Some(batch) = self.open(Some(n)).await else {
                    self.suspect("the consumer's pin is unknown");
                    return Ok(Step::Again);
                };
                let mut batch = batch?;
                let connects = self.connects();
                let mut got = 0;
                loop {
                    let m = match batch.next().await {
                        Ok(Pulled::Message(m)) => m,
                        Ok(Pulled::Done) => break,
                        Ok(Pulled::Moved) => {
                            self.suspect("the consumer's pin moved");
                            return Ok(Step::Again);
                        }
                        Ok(Pulled::Pinned(_)) => {
                            self.pinned();
                            return Ok(Step::Again);
                        }
                        Err(e) => {
                            self.rewind = true;
                            return Err(e);
                        }
                    };
                    if self.connects() != connects {
                        self.rewind = true;
                        return Ok(Step::Again);
                    }
                    let d = delivery(&self.topic, m, &mut self.counts, self.partition)?;
                    let seq = u64::try_from(d.position().offset).unwrap_or(u64::MAX);
                    self.last_read = self.last_read.max(seq);
                    got += 1;
                    if let Some(Poison {
                        phase: Phase::Before(remaining),
                        ..
                    }) = &mut self.poison
                    {
                        remaining.remove(&seq);
                    }
                    self.ready.push_back(Ok(d));
                }
                if self.connects() != connects {
                    self.rewind = true;
                    return Ok(Step::Again);
                }
                if got == 0 {
                    if self.claiming {
                        // The claim got nothing: another request holds the pin.
                        self.suspect("the claim of the consumer's pin got nothing");
                        return Ok(Step::Again);
                    }
                    // The rest is gone from the stream (or comes as redeliveries).
                    if let Some(p) = &mut self.poison {
                        p.phase = Phase::Floor;
                    }
                }
                Ok(Step::Again)
            }
            Phase::Floor => {
                // Pulling resumes once everything before it is acknowledged: the client
                // then reads it once more, which makes it pending with the floor before it.
                let last_before = p.last_before;
                let (floor, _) = self.floor_and_delivered().await?;
                if floor >= last_before {
                    return Ok(Step::Pull);
                }
                tokio::select! {
                    () = self.lost.cancelled() => return Err(Error::closed("subscription")),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                Ok(Step::Again)
            }
        }
    }

    /// The next delivery, stamped with the ownership epoch it was pulled under, an error to
    /// report, or `None` at the end.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let d = self.next_unstamped().await?;
        let epoch = self.epoch.unwrap_or(0);
        Some(d.map(|d| d.with_epoch(epoch)))
    }

    /// Follows the group's ownership: returns `true` when this subscriber may pull now,
    /// after waiting while it stands by. A new epoch drops what was pulled under the old
    /// one (unacknowledged: the rewind delivers it again) and asks for the takeover rewind.
    async fn owning(&mut self) -> bool {
        loop {
            let now = *self.owned.borrow_and_update();
            if now != self.epoch {
                self.epoch = now;
                self.messages = None;
                self.ready.clear();
                self.poison = None;
                self.suspect = false;
                self.claiming = false;
                self.takeover = now.is_some();
                // Not renewed any more (a new epoch moves it first).
                self.pin.clear();
            }
            if self.epoch.is_some() {
                return true;
            }
            tokio::select! {
                () = self.lost.cancelled() => return false,
                r = self.owned.changed() => {
                    if r.is_err() {
                        // The group membership is gone: the subscription ended.
                        return false;
                    }
                }
            }
        }
    }

    /// The takeover, once the lease is held: the consumer's pin is moved off any earlier
    /// holder (whose pulls get `423` from now on), the consumer rewound to its ack floor
    /// (everything an earlier holder left unacknowledged is delivered again first, in stream
    /// order, before anything new), and the first pull without a pin id claims the pin;
    /// the claim's first message is dropped and the consumer rewound once more under the
    /// pin, so whatever another client's waiting request got before the claim comes again.
    async fn take_over(&mut self) -> Result<()> {
        self.move_pin().await?;
        // Read after the move: the earlier owner gets nothing more.
        let (floor, delivered) = self.floor_and_delivered().await?;
        if self.rewinds {
            self.reset_to_floor().await?;
        }
        self.counts.delivered_through(delivered);
        self.last_read = floor;
        self.rewind = false;
        self.takeover = false;
        self.claiming = true;
        self.claimed = false;
        Ok(())
    }

    /// Resets the consumer to its ack floor (nats-server 2.14's consumer reset): every
    /// unacknowledged message is delivered again, in stream order, before anything new.
    async fn reset_to_floor(&mut self) -> Result<()> {
        self.consumer.reset(None).await.map_err(|e| {
            Error::backend(
                BACKEND,
                true,
                format!(
                    "resetting consumer {} to its ack floor (nats-server 2.14 or later is needed): {e}",
                    self.consumer.cached_info().name
                ),
            )
        })?;
        Ok(())
    }

    /// Moves the consumer's pin off whoever holds it: their pulls get `423` from now on.
    async fn move_pin(&mut self) -> Result<()> {
        self.pin.clear();
        let name = self.consumer.cached_info().name.clone();
        self.stream
            .unpin_consumer(&name, pinned::GROUP)
            .await
            .map_err(|e| {
                Error::backend(
                    BACKEND,
                    true,
                    format!("moving the pin of consumer {name} (nats-server 2.11 or later is needed): {e}"),
                )
            })?;
        // Pins the keepalive found gone before now are not this epoch's.
        self.moved.borrow_and_update();
        Ok(())
    }

    /// [`Pulling::next`] before the stamp.
    async fn next_unstamped(&mut self) -> Option<Result<Delivery>> {
        // Quiet time counts within one call: the pool may leave the stream unpolled for long.
        self.quiet_since = tokio::time::Instant::now();
        loop {
            if self.lost.is_cancelled() || !self.owning().await {
                return None;
            }
            if self.suspect {
                if !self.confirm().await {
                    return None;
                }
                continue;
            }
            if self.takeover {
                if let Err(e) = self.take_over().await {
                    if !self.pause().await {
                        return None;
                    }
                    return Some(Err(e));
                }
                // The quiet clock starts with the first pull of the new epoch.
                self.quiet_since = tokio::time::Instant::now();
            }
            if let Some(d) = self.ready.pop_front() {
                return Some(d);
            }
            if self.messages.is_some() && self.connects() != self.opened_at {
                self.messages = None;
                self.rewind = true;
            }
            if self.rewind {
                self.messages = None;
                if let Err(e) = self.rewind().await {
                    if !self.pause().await {
                        return None;
                    }
                    return Some(Err(e));
                }
            }
            match self.poison_step().await {
                Ok(Step::Deliver(d)) => return Some(Ok(d)),
                Ok(Step::Again) => continue,
                Ok(Step::Pull) => {}
                Err(e) => {
                    if !self.pause().await {
                        return None;
                    }
                    return Some(Err(e));
                }
            }
            if self.messages.is_none() {
                let connects = self.connects();
                let Some(opened) = self.open(None).await else {
                    // The pin was never learnt (the connection dropped first): move it again.
                    self.suspect("the consumer's pin is unknown");
                    continue;
                };
                match opened {
                    Ok(m) => {
                        self.messages = Some(m);
                        self.opened_at = connects;
                    }
                    Err(e) => {
                        self.rewind = true;
                        if !self.pause().await {
                            return None;
                        }
                        return Some(Err(e));
                    }
                }
                continue;
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let next = tokio::select! {
                biased;
                () = self.lost.cancelled() => return None,
                n = messages.next() => n,
                // The keepalive found the pin gone.
                r = self.moved.changed(), if self.keepalive_open => {
                    if r.is_ok() {
                        self.suspect("the consumer's pin moved");
                    } else {
                        self.keepalive_open = false;
                    }
                    continue;
                }
                // Released or lost (or a new epoch): look at the ownership again.
                r = self.owned.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    continue;
                }
                // The client reconnects on its own and the pull goes on: notice a reconnect
                // even while nothing arrives (a message the client cannot read drops the
                // connection each time it is sent, and never arrives).
                _ = self.watch.tick() => {
                    if let Some(epoch) = self.epoch
                        && !self.lease.valid(self.partition, epoch)
                    {
                        // Not renewed for two thirds of its time: another member may have
                        // it soon. Stop before it can expire.
                        self.suspect("the lease could not be renewed in time");
                        continue;
                    }
                    if self.stalled().await {
                        self.messages = None;
                        self.rewind = true;
                    }
                    continue;
                }
            };
            match next {
                Ok(Pulled::Message(m)) => {
                    if self.connects() != self.opened_at {
                        // Read across a reconnect: the rewind delivers it again, in order.
                        // (Not counted as read: the pull goes on after a reconnect past a
                        // message the client could not read.)
                        continue;
                    }
                    if let Some(epoch) = self.epoch
                        && !self.lease.valid(self.partition, epoch)
                    {
                        // Not renewed for two thirds of its time: another member may have
                        // it soon. Stop before it can expire.
                        self.suspect("the lease could not be renewed in time");
                        continue;
                    }
                    if let Ok(info) = m.info() {
                        self.last_read = self.last_read.max(info.stream_sequence);
                    }
                    return Some(delivery(&self.topic, m, &mut self.counts, self.partition));
                }
                Ok(Pulled::Moved) => self.suspect("the consumer's pin moved"),
                Ok(Pulled::Pinned(m)) if !self.rewinds => {
                    // The mutant check's naive handover: delivered, no rewind.
                    self.claiming = false;
                    return Some(delivery(&self.topic, m, &mut self.counts, self.partition));
                }
                Ok(Pulled::Pinned(_)) => self.pinned(),
                Ok(Pulled::Done) => {
                    self.messages = None;
                    self.rewind = true;
                }
                Err(e) => {
                    self.messages = None;
                    self.rewind = true;
                    if self.lost.is_cancelled() {
                        return None;
                    }
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Renews the pin of `consumer` while the subscription lives, at a third of the consumer's
/// `priority_timeout` (the server renews a pin only when a request with its id arrives,
/// and the pull loop may be held up by a busy pool). Reports through `moves` when the
/// server answers that the pin is not this subscriber's any more.
fn keep_pinned(
    js: jetstream::Context,
    consumer: &PullConsumer,
    pin: Pin,
    moves: watch::Sender<u64>,
    timeout: Duration,
    stop: CancellationToken,
) -> DropGuard {
    let info = consumer.cached_info();
    let stream = info.stream_name.clone();
    let name = info.name.clone();
    let every = (info.config.priority_timeout / 3).max(Duration::from_millis(50));
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if !pinned::keep_pin(&js, &stream, &name, &pin, timeout.min(every)).await {
                moves.send_modify(|n| *n += 1);
            }
        }
    });
    guard
}
