//! Provisioning: the streams and durable consumers, created at first use and checked
//! against the settings, and the classification of the server's answers.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{
    AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer, pull,
};
use async_nats::jetstream::stream::{self, RetentionPolicy};
use dualbus_core::{Error, Result, StartPosition, SubscriptionSpec};

use crate::{BACKEND, unavailable};

use super::config::Retention;
use super::pinned;
use super::plan::{Plan, subject_matches};
use super::{JetStream, api_error};
use crate::subject::stream_subjects;

impl JetStream {
    fn stream_config(&self, topic: &str, plan: &Plan) -> stream::Config {
        let s = &self.inner.config.stream;
        stream::Config {
            name: plan.stream.clone(),
            subjects: plan.subjects.clone(),
            subject_transform: plan
                .transform
                .as_ref()
                .map(|dest| stream::SubjectTransform {
                    source: stream_subjects(topic),
                    destination: dest.clone(),
                }),
            storage: s.storage.into(),
            retention: match s.retention {
                Retention::Limits => RetentionPolicy::Limits,
                Retention::Interest => RetentionPolicy::Interest,
                Retention::WorkQueue => RetentionPolicy::WorkQueue,
            },
            num_replicas: s.replicas,
            max_age: s.max_age,
            max_bytes: s.max_bytes,
            max_messages: s.max_msgs,
            duplicate_window: s.duplicate_window,
            description: Some(format!("dualbus domain topic {topic}")),
            ..stream::Config::default()
        }
    }

    /// The stream of `topic`, created if missing, checked against our settings if not.
    pub(super) async fn stream(&self, topic: &str) -> Result<stream::Stream> {
        let mut streams = self.inner.streams.lock().await;
        if let Some(s) = streams.get(topic) {
            return Ok(s.clone());
        }
        let plan = self.plan(topic);
        let want = self.stream_config(topic, &plan);
        let s = match self.inner.js.get_stream(&want.name).await {
            Ok(existing) if plan.shared => {
                let have = &existing.cached_info().config.subjects;
                let probe = plan.subject(topic, "probe");
                if !have.iter().any(|p| subject_matches(p, &probe)) {
                    return Err(Error::config(
                        format!("nats.jetstream.topics.{topic}.stream"),
                        format!(
                            "stream {} (subjects {have:?}) does not take the subject {probe} of topic {topic}",
                            want.name
                        ),
                    ));
                }
                existing
            }
            Ok(existing) => {
                let have = &existing.cached_info().config;
                // The subjects and the partitioning are not settings to update in place:
                // changing them moves aggregates between partitions.
                if have.subjects != want.subjects
                    || have.subject_transform != want.subject_transform
                {
                    let path = match self
                        .inner
                        .config
                        .topics
                        .get(topic)
                        .and_then(|s| s.partitions)
                    {
                        Some(_) => format!("nats.jetstream.topics.{topic}.partitions"),
                        None => "nats.jetstream.partitions".to_owned(),
                    };
                    return Err(layout_changed(path, topic, &plan, have, &want));
                }
                let diff = stream_differences(have, &want);
                if diff.is_empty() {
                    existing
                } else if self.inner.config.stream.update_existing {
                    self.inner
                        .js
                        .update_stream(want.clone())
                        .await
                        .map_err(|e| {
                            Error::config(
                                "nats.jetstream.stream",
                                format!("updating stream {}: {e}", want.name),
                            )
                        })?;
                    self.inner
                        .js
                        .get_stream(&want.name)
                        .await
                        .map_err(api_error)?
                } else {
                    return Err(Error::config(
                        "nats.jetstream.stream",
                        format!(
                            "stream {} exists with other settings ({}); set update_existing to update it",
                            want.name,
                            diff.join(", ")
                        ),
                    ));
                }
            }
            Err(e) if is_not_found(&e) => {
                self.inner
                    .js
                    .create_stream(want.clone())
                    .await
                    .map_err(|e| {
                        Error::config(
                            "nats.jetstream.stream",
                            format!("creating stream {}: {e}", want.name),
                        )
                    })?
            }
            Err(e) => return Err(connection_or_api(e)),
        };
        streams.insert(topic.to_owned(), s.clone());
        Ok(s)
    }

    /// The stream of `topic` if it exists (read paths do not create it).
    pub(super) async fn existing_stream(&self, topic: &str) -> Result<Option<stream::Stream>> {
        if let Some(s) = self.inner.streams.lock().await.get(topic) {
            return Ok(Some(s.clone()));
        }
        let name = self.plan(topic).stream;
        match self.inner.js.get_stream(&name).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(connection_or_api(e)),
        }
    }

    /// The plan of `topic` once its stream is in place (created or checked on first use).
    pub(super) async fn ready(&self, topic: &str) -> Result<Arc<Plan>> {
        if let Some(p) = self.inner.ready.read().get(topic) {
            return Ok(p.clone());
        }
        self.stream(topic).await?;
        let plan = Arc::new(self.plan(topic));
        self.inner
            .ready
            .write()
            .insert(topic.to_owned(), plan.clone());
        Ok(plan)
    }

    /// The durable consumer `name` of `spec` on the subjects `filter`, created if missing,
    /// checked if not.
    pub(super) async fn consumer(
        &self,
        stream: &stream::Stream,
        spec: &SubscriptionSpec,
        name: &str,
        filter: String,
    ) -> Result<PullConsumer> {
        let c = &self.inner.config.consumer;
        let name = name.to_owned();
        let want = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: filter,
            description: Some(format!("dualbus group {} on {}", spec.group, spec.topic)),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            // Attempts are counted by the pool, which dead-letters: a server-side limit
            // would silently move the ack floor past a message.
            max_deliver: -1,
            max_ack_pending: c.max_ack_pending,
            deliver_policy: match spec.start {
                StartPosition::Latest => DeliverPolicy::New,
                _ => DeliverPolicy::All,
            },
            // The server delivers to the pinned client only: the member holding the
            // partition's lease, which moves the pin at takeover (see `pinned`). The pin
            // outlives a pause of its keepalive as long as the lease would.
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![pinned::GROUP.to_owned()],
            priority_timeout: c.lease_ttl,
            ..pull::Config::default()
        };
        let existing = match stream.get_consumer::<pull::Config>(&name).await {
            Ok(c) => Some(c),
            // Classify the failure: missing (create it), created meanwhile (by another
            // member starting at the same time: read it again), or anything else.
            Err(e) => match stream.consumer_info(&name).await {
                Err(i) if is_consumer_not_found(&i) => None,
                Ok(_) => Some(
                    stream
                        .get_consumer::<pull::Config>(&name)
                        .await
                        .map_err(|e| Error::backend(BACKEND, true, e))?,
                ),
                Err(_) => return Err(Error::backend(BACKEND, true, e)),
            },
        };
        match existing {
            Some(existing) => {
                let have = &existing.cached_info().config;
                let mut diff = Vec::new();
                differ(&mut diff, "ack_wait", &have.ack_wait, &want.ack_wait);
                differ(
                    &mut diff,
                    "max_ack_pending",
                    &have.max_ack_pending,
                    &want.max_ack_pending,
                );
                differ(
                    &mut diff,
                    "filter_subject",
                    &have.filter_subject,
                    &want.filter_subject,
                );
                differ(
                    &mut diff,
                    "priority_policy",
                    &have.priority_policy,
                    &want.priority_policy,
                );
                differ(
                    &mut diff,
                    "priority_groups",
                    &have.priority_groups,
                    &want.priority_groups,
                );
                differ(
                    &mut diff,
                    "priority_timeout",
                    &have.priority_timeout,
                    &want.priority_timeout,
                );
                if have.max_deliver > 0 {
                    diff.push(format!("max_deliver {} (want unlimited)", have.max_deliver));
                }
                if have.ack_policy != AckPolicy::Explicit {
                    diff.push("ack_policy (want explicit)".to_owned());
                }
                if diff.is_empty() {
                    Ok(existing)
                } else if c.update_existing {
                    let mut update = want;
                    // The start of an existing consumer cannot change.
                    update.deliver_policy = have.deliver_policy;
                    stream.update_consumer(update).await.map_err(|e| {
                        Error::config(
                            "nats.jetstream.consumer",
                            format!("updating consumer {name}: {e}"),
                        )
                    })
                } else {
                    Err(Error::config(
                        "nats.jetstream.consumer",
                        format!(
                            "consumer {name} exists with other settings ({}); set update_existing to update it",
                            diff.join(", ")
                        ),
                    ))
                }
            }
            None => stream.create_consumer(want).await.map_err(|e| {
                Error::config(
                    "nats.jetstream.consumer",
                    format!("creating consumer {name}: {e}"),
                )
            }),
        }
    }
}

/// Notes `name` in `diff` when the existing value differs from the wanted one.
fn differ<T: PartialEq + std::fmt::Debug>(diff: &mut Vec<String>, name: &str, have: &T, want: &T) {
    if have != want {
        diff.push(format!("{name} {have:?} (want {want:?})"));
    }
}

/// The refusal of a stream whose subjects or partitioning differ from the topic's: the
/// partition count changed, or the stream is of an older layout.
fn layout_changed(
    path: String,
    topic: &str,
    plan: &Plan,
    have: &stream::Config,
    want: &stream::Config,
) -> Error {
    let show = |c: &stream::Config| match &c.subject_transform {
        Some(t) => format!(
            "subjects {:?}, transform {} -> {}",
            c.subjects, t.source, t.destination
        ),
        None => format!("subjects {:?}, no transform", c.subjects),
    };
    Error::config(
        path,
        format!(
            "stream {} of topic {topic} has {}, and the topic with {} partitions needs {}. \
             Changing the partitioning moves aggregates between partitions, so their order \
             holds only if nothing of the old layout is left to consume: stop the publishers, \
             let every group of the topic drain (nothing pending), edit the stream's subjects \
             and transform to the ones needed (e.g. nats stream edit), then start again with \
             the new count (see docs/backends/nats.md, \"Changing the partition count\")",
            want.name,
            show(have),
            plan.partitions,
            show(want),
        ),
    )
}

fn stream_differences(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut d = Vec::new();
    differ(&mut d, "storage", &have.storage, &want.storage);
    differ(&mut d, "retention", &have.retention, &want.retention);
    differ(
        &mut d,
        "replicas",
        &have.num_replicas.max(1),
        &want.num_replicas,
    );
    differ(&mut d, "max_age", &have.max_age, &want.max_age);
    differ(&mut d, "max_bytes", &have.max_bytes, &want.max_bytes);
    differ(&mut d, "max_msgs", &have.max_messages, &want.max_messages);
    differ(
        &mut d,
        "duplicate_window",
        &have.duplicate_window,
        &want.duplicate_window,
    );
    d
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

pub(super) fn is_consumer_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    match e.kind() {
        jetstream::context::ConsumerInfoErrorKind::NotFound => true,
        jetstream::context::ConsumerInfoErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        }
        _ => false,
    }
}

fn connection_or_api(e: jetstream::context::GetStreamError) -> Error {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::Request => unavailable(e),
        _ => api_error(e),
    }
}
