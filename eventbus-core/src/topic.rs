//! Topic names and the dead-letter naming convention.

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
}
