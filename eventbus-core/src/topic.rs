//! Topic names and the dead-letter naming convention.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Longest topic name accepted.
pub const MAX_TOPIC_LEN: usize = 200;

/// Default suffix of dead-letter topics: the dead letter of `orders` is `orders.dlq`.
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".dlq";

/// Checks a topic name: 1 to 200 bytes of `[A-Za-z0-9_-]` tokens separated by single dots
/// (no leading, trailing or doubled dot). Every backend can map such a name to a subject,
/// a Kafka topic or a Redis key without escaping.
pub fn validate_topic(topic: &str) -> Result<()> {
    let err = |reason| {
        Err(Error::InvalidTopic {
            topic: topic.chars().take(64).collect(),
            reason,
        })
    };
    if topic.is_empty() {
        return err("topic is empty");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return err("topic longer than 200 bytes");
    }
    for token in topic.split('.') {
        if token.is_empty() {
            return err("empty token: a dot at the start or the end, or two dots in a row");
        }
        if !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return err("only [A-Za-z0-9_-] and '.' as a separator are allowed");
        }
    }
    Ok(())
}

/// What the buses take as a topic: a [`Topic`] (checked already, cloned cheaply) or a
/// name (`&str`, `String`), checked on the call ([`Error::InvalidTopic`]).
pub trait IntoTopic {
    /// The checked topic.
    fn into_topic(self) -> Result<Topic>;
}

impl IntoTopic for Topic {
    fn into_topic(self) -> Result<Topic> {
        Ok(self)
    }
}

impl IntoTopic for &Topic {
    fn into_topic(self) -> Result<Topic> {
        Ok(self.clone())
    }
}

impl IntoTopic for &str {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self)
    }
}

impl IntoTopic for String {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self)
    }
}

impl IntoTopic for &String {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self)
    }
}

/// A topic name checked once ([`validate_topic`]) and cheap to clone (shared text).
///
/// ```
/// use dualbus_core::Topic;
/// let orders = Topic::new("orders")?;
/// assert_eq!(orders.as_str(), "orders");
/// assert_eq!(orders.dead_letter(".dlq")?.as_str(), "orders.dlq");
/// assert!(Topic::new("orders..eu").is_err());
/// # Ok::<(), dualbus_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Checks `name` ([`Error::InvalidTopic`] naming the reason) and keeps it.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate_topic(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dead-letter topic of this one with `suffix` (e.g. `.dlq`), checked.
    pub fn dead_letter(&self, suffix: &str) -> Result<Self> {
        Self::new(dead_letter_topic(&self.0, suffix))
    }
}

impl Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for Topic {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<Topic> for str {
    fn eq(&self, other: &Topic) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Topic> for &str {
    fn eq(&self, other: &Topic) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Topic> for String {
    fn eq(&self, other: &Topic) -> bool {
        self.as_str() == &*other.0
    }
}

impl PartialEq<String> for Topic {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// Checks a group name (the consumer group of a domain subscription, the queue group of a
/// simple one): the rule of topic names ([`validate_topic`]), so that every backend can use
/// it in a consumer name, a queue group or a key. `key` names the setting in the error
/// (`group`, `queue_group`, `domain.group.name`).
///
/// The error is [`Error::Config`] (kind [`InvalidInput`](crate::ErrorKind::InvalidInput))
/// naming `key`, the refused name and the reason.
pub fn validate_group(key: &str, group: &str) -> Result<()> {
    match validate_topic(group) {
        Ok(()) => Ok(()),
        Err(Error::InvalidTopic { topic, reason }) => Err(Error::config(
            key,
            format!("invalid group name {topic:?}: {}", group_reason(reason)),
        )),
        Err(other) => Err(other),
    }
}

fn group_reason(topic_reason: &'static str) -> &'static str {
    match topic_reason {
        "topic is empty" => "the name is empty",
        "topic longer than 200 bytes" => "the name is longer than 200 bytes",
        other => other,
    }
}

/// The default group of a bus whose `source` is not a valid group name (CloudEvents
/// sources are often URIs, such as `/orders` or `urn:shop:orders`): every character other
/// than `[A-Za-z0-9_-]` (dots included) becomes `_`, and the result is cut to
/// [`MAX_TOPIC_LEN`] bytes. A source that is a valid group name is its own default group,
/// unchanged.
///
/// The mapping is deterministic, so every replica of a service gets the same group; it is
/// not reversible: sources that differ only in such characters (`/orders` and `:orders`,
/// or `/orders` and `_orders`) map to one group and would share it. Set the group name
/// explicitly (`domain.group.name`) where that matters.
pub fn group_from_source(source: &str) -> String {
    if validate_topic(source).is_ok() {
        return source.to_owned();
    }
    source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_TOPIC_LEN)
        .collect()
}

/// The dead-letter topic of `topic` with the given suffix (e.g. `.dlq`).
pub fn dead_letter_topic(topic: &str, suffix: &str) -> String {
    let mut t = String::with_capacity(topic.len() + suffix.len());
    t.push_str(topic);
    t.push_str(suffix);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        for ok in ["orders", "orders.dlq", "a-b_c.D9", "x"] {
            validate_topic(ok).unwrap();
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a b",
            "a*",
            "a>",
            "ä",
            &"x".repeat(201),
        ] {
            let e = validate_topic(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidTopic { .. }), "{bad}");
        }
        assert_eq!(dead_letter_topic("orders", ".dlq"), "orders.dlq");
    }

    #[test]
    fn checked_topics() {
        let t = Topic::new("orders.eu").unwrap();
        assert_eq!(t, "orders.eu");
        assert_eq!(t.to_string(), "orders.eu");
        assert_eq!(format!("{t:?}"), "\"orders.eu\"");
        assert_eq!(t.dead_letter(".dlq").unwrap(), "orders.eu.dlq");
        assert!(t.dead_letter("..dlq").is_err());
        assert_eq!("a-b".parse::<Topic>().unwrap().as_str(), "a-b");
        for bad in ["", "a..b", "a b", &"x".repeat(201)] {
            let e = Topic::new(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidTopic { .. }), "{bad}");
            assert!(Topic::try_from(bad.to_owned()).is_err());
        }
        // At the length limit and one past it.
        assert!(Topic::new("x".repeat(MAX_TOPIC_LEN)).is_ok());
        assert!(Topic::new("x".repeat(MAX_TOPIC_LEN + 1)).is_err());
        let clone = t.clone();
        assert!(
            std::ptr::eq(clone.as_str(), t.as_str()),
            "clones share the text"
        );
    }

    #[test]
    fn groups() {
        for ok in ["orders-service", "orders.v1", "a_b"] {
            validate_group("group", ok).unwrap();
        }
        for bad in ["", "a b", "*", "a\nb", "a..b", ">", "ä", &"g".repeat(201)] {
            let e = validate_group("group", bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{bad:?}");
            let text = e.to_string();
            assert!(text.contains("`group`"), "{text}");
            assert!(text.contains("invalid group name"), "{text}");
        }
    }

    #[test]
    fn default_group_of_a_source() {
        assert_eq!(group_from_source("orders-service"), "orders-service");
        assert_eq!(group_from_source("orders.v1"), "orders.v1");
        assert_eq!(group_from_source("/orders/eu"), "_orders_eu");
        assert_eq!(group_from_source("urn:shop:orders"), "urn_shop_orders");
        assert_eq!(
            group_from_source("https://example.com/orders"),
            "https___example_com_orders"
        );
        assert_eq!(group_from_source("a b\nü"), "a_b__");
        assert_eq!(group_from_source(&"/".repeat(300)).len(), MAX_TOPIC_LEN);
        for s in ["/orders", "a b", "x.", "ü", &"y".repeat(300)] {
            let g = group_from_source(s);
            validate_group("group", &g).unwrap();
            assert_eq!(group_from_source(s), g, "deterministic");
        }
        // Not reversible: distinct sources may share a group (documented).
        assert_eq!(group_from_source("/orders"), group_from_source(":orders"));
    }
}
