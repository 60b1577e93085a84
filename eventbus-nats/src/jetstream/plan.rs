//! Where a topic lives: its subject layout, stream, subjects and durable consumer names.

use crate::subject::{
    encode_key, event_subject, partition_of, partition_subjects, partition_transform,
    publish_subject, stored_subjects, stream_subjects,
};

use super::config::{JetStreamConfig, Layout, TopicSettings};

/// Where a topic lives: its layout, stream and subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) layout: Layout,
    pub(super) stream: String,
    /// The stream is configured by name (shared with others): not checked against our
    /// stream settings.
    pub(super) shared: bool,
    /// Subjects of the stream when we create it.
    pub(super) subjects: Vec<String>,
    /// The partition count (partitioned layout).
    pub(super) partitions: u32,
    /// The destination of the stream's subject transform (from its one subject), on the
    /// streams we own with the partitioned layout: the server stores each event under its
    /// partition. A shared stream has none: publishers write the stored subject directly.
    pub(super) transform: Option<String>,
}

impl Plan {
    pub(super) fn of(config: &JetStreamConfig, topic: &str) -> Self {
        let settings = config.topics.get(topic);
        let partitions = settings
            .and_then(|s| s.partitions)
            .unwrap_or(config.partitions);
        let own = |layout: Layout| Self {
            layout,
            stream: stream_name(&config.stream.prefix, topic),
            shared: false,
            subjects: vec![match layout {
                Layout::Partitioned => stream_subjects(topic),
                Layout::Subject => topic.to_owned(),
            }],
            partitions,
            transform: (layout == Layout::Partitioned)
                .then(|| partition_transform(topic, partitions)),
        };
        let shared = |t: &str, s: &TopicSettings, name: &String| Self {
            layout: s.layout,
            stream: name.clone(),
            shared: true,
            subjects: if s.stream_subjects.is_empty() {
                vec![match s.layout {
                    Layout::Partitioned => stored_subjects(t),
                    Layout::Subject => t.to_owned(),
                }]
            } else {
                s.stream_subjects.clone()
            },
            partitions,
            transform: None,
        };
        if let Some(s) = settings {
            return match &s.stream {
                Some(name) => shared(topic, s, name),
                None => own(s.layout),
            };
        }
        for (t, s) in &config.topics {
            if let Some(name) = &s.stream {
                let p = shared(t, s, name);
                if p.subjects
                    .iter()
                    .any(|pattern| subject_matches(pattern, topic))
                {
                    return Self {
                        layout: s.layout,
                        ..p
                    };
                }
            }
        }
        own(Layout::Partitioned)
    }

    /// The subject an event of `key` is published on: the plain subject where the
    /// stream's transform partitions it, the stored subject on a shared stream.
    pub(super) fn subject(&self, topic: &str, key: &str) -> String {
        match (self.layout, &self.transform) {
            (Layout::Partitioned, Some(_)) => publish_subject(topic, key),
            (Layout::Partitioned, None) => self.stored_subject(topic, key),
            (Layout::Subject, _) => topic.to_owned(),
        }
    }

    /// The subject the events of `key` are stored under (the whole topic in the subject
    /// layout).
    pub(super) fn stored_subject(&self, topic: &str, key: &str) -> String {
        match self.layout {
            Layout::Partitioned => event_subject(topic, partition_of(key, self.partitions), key),
            Layout::Subject => topic.to_owned(),
        }
    }

    /// The stored subjects of `topic` within its stream.
    pub(super) fn filter(&self, topic: &str) -> String {
        match self.layout {
            Layout::Partitioned => stored_subjects(topic),
            Layout::Subject => topic.to_owned(),
        }
    }

    /// The partitions a group consumes separately: the topic's partitions, or one where
    /// the subjects carry none (the subject layout).
    pub(super) fn group_partitions(&self) -> u32 {
        match self.layout {
            Layout::Partitioned => self.partitions,
            Layout::Subject => 1,
        }
    }

    /// The durable consumer of `group` for `partition` of `topic`, and its filter: with one
    /// partition the group's consumer over the whole topic, with more
    /// `<consumer>-<partition>` over the partition's stored subjects.
    pub(super) fn partition_consumer(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
    ) -> (String, String) {
        let consumer = self.consumer(topic, group);
        if self.group_partitions() == 1 {
            (consumer, self.filter(topic))
        } else {
            (
                format!("{consumer}-{partition}"),
                partition_subjects(topic, partition),
            )
        }
    }

    /// The durable consumer of `group` for `topic`: on a shared stream the topic is part of
    /// the name, as several topics share the stream.
    pub(super) fn consumer(&self, topic: &str, group: &str) -> String {
        if self.shared {
            format!("{}_{}", consumer_name(group), encode_key(topic))
        } else {
            consumer_name(group)
        }
    }
}

/// Whether the subject `pattern` (with `*` and `>` wildcards) matches the literal `subject`.
pub(super) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for p in pattern.split('.') {
        match (p, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// The stream name of a topic: the prefix and the topic's subject-token encoding (dots
/// become `%2E`), so that distinct topics never share a stream.
pub fn stream_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}{}", encode_key(topic))
}

/// The durable consumer name of a group (its subject-token encoding).
pub fn consumer_name(group: &str) -> String {
    encode_key(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_valid() {
        assert_eq!(stream_name("DUALBUS_", "orders"), "DUALBUS_orders");
        assert_eq!(stream_name("DUALBUS_", "orders.v1"), "DUALBUS_orders%2Ev1");
        assert_ne!(stream_name("P_", "a.b"), stream_name("P_", "a_b"));
        assert_eq!(consumer_name("billing.v2"), "billing%2Ev2");
    }

    #[test]
    fn subject_patterns() {
        assert!(subject_matches("business.>", "business.orders"));
        assert!(subject_matches("business.>", "business.orders.dlq"));
        assert!(!subject_matches("business.>", "business"));
        assert!(subject_matches("orders.*.*", "orders.0.k"));
        assert!(!subject_matches("orders.*.*", "orders.dlq.0.k"));
        assert!(!subject_matches("orders.*.*", "orders.0"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.x"));
    }

    #[test]
    fn plans_follow_the_topic_settings() {
        let mut c = JetStreamConfig::default();
        let own = Plan::of(&c, "orders");
        assert_eq!(own.layout, Layout::Partitioned);
        assert_eq!(own.stream, "DUALBUS_orders");
        assert_eq!(own.subjects, ["orders.*"]);
        assert_eq!(
            own.transform.as_deref(),
            Some("orders.{{partition(16,1)}}.{{wildcard(1)}}")
        );
        assert_eq!(own.subject("orders", "a.b"), "orders.a%2Eb");
        assert_eq!(
            own.stored_subject("orders", "a.b"),
            format!("orders.{}.a%2Eb", partition_of("a.b", 16))
        );
        assert_eq!(own.filter("orders"), "orders.*.*");
        assert_eq!(own.group_partitions(), 16);
        assert_eq!(
            own.partition_consumer("orders", "billing", 3),
            ("billing-3".to_owned(), "orders.3.*".to_owned())
        );
        assert_eq!(own.consumer("orders", "billing"), "billing");
        // A topic's own partition count.
        c.topics.insert(
            "payments".into(),
            TopicSettings {
                partitions: Some(4),
                ..TopicSettings::default()
            },
        );
        let payments = Plan::of(&c, "payments");
        assert_eq!(payments.partitions, 4);
        assert_eq!(
            payments.transform.as_deref(),
            Some("payments.{{partition(4,1)}}.{{wildcard(1)}}")
        );
        let jxt = TopicSettings {
            layout: Layout::Subject,
            stream: Some("BUSINESS_STREAM".into()),
            stream_subjects: vec!["business.>".into()],
            partitions: None,
        };
        c.topics.insert("business.orders".into(), jxt);
        let p = Plan::of(&c, "business.orders");
        assert_eq!(p.layout, Layout::Subject);
        assert_eq!(p.stream, "BUSINESS_STREAM");
        assert_eq!(p.subject("business.orders", "order-1"), "business.orders");
        assert_eq!(p.transform, None);
        assert_eq!(p.filter("business.orders"), "business.orders");
        assert_eq!(
            p.consumer("business.orders", "billing"),
            "billing_business%2Eorders"
        );
        // Its dead-letter topic falls inside the shared stream: same layout and stream.
        let dlq = Plan::of(&c, "business.orders.dlq");
        assert_eq!(dlq.layout, Layout::Subject);
        assert_eq!(dlq.stream, "BUSINESS_STREAM");
        // Other topics keep their own streams.
        assert_eq!(Plan::of(&c, "orders"), own);
        // A partitioned topic on a shared stream: no transform, the stored subject is
        // published directly.
        c.topics.insert(
            "shared.orders".into(),
            TopicSettings {
                stream: Some("SHARED".into()),
                partitions: Some(8),
                ..TopicSettings::default()
            },
        );
        let shared = Plan::of(&c, "shared.orders");
        assert_eq!(shared.subjects, ["shared.orders.*.*"]);
        assert_eq!(shared.transform, None);
        assert_eq!(
            shared.subject("shared.orders", "k"),
            format!("shared.orders.{}.k", partition_of("k", 8))
        );
    }
}
