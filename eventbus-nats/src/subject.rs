//! Subject layout of domain topics on JetStream.
//!
//! An event of aggregate `a` is published on `<topic>.<token>`, where the token is `a`
//! encoded as below. A topic's stream takes `<topic>.*` (exactly one token after the topic,
//! so never the subjects of the dead-letter topic `<topic>.dlq` or of any other child
//! topic, which have more) and stores each message, through the server's deterministic
//! subject transform `<topic>.{{partition(P,1)}}.{{wildcard(1)}}`, under
//! `<topic>.<partition>.<token>`. The server's partition is FNV-1a (32 bit) of the token
//! modulo `P`; [`partition_of`] computes the same, so any client that publishes on the
//! plain subjects lands where this one does. Every aggregate id maps to exactly one token,
//! reversibly, so that one aggregate's history can be read back by filtering on its
//! stored subject.
//!
//! The encoding is percent-encoding with the unreserved set `[A-Za-z0-9_-]`: every other
//! byte of the id's UTF-8 is written `%XX` with upper-case hex. `order-1` stays `order-1`;
//! `a.b` becomes `a%2Eb`; `ü` becomes `%C3%BC`. Services in other languages use the same
//! rule (it is URL percent-encoding with a smaller unreserved set).

use std::fmt::Write as _;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The subject token of an aggregate id.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if unreserved(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The aggregate id of a subject token, if the token is a valid encoding.
pub fn decode_key(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = token.get(i + 1..i + 3)?;
                if hex.bytes().any(|h| h.is_ascii_lowercase()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if unreserved(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The subject an event of `key` is published on: `<topic>.<encoded key>`.
pub fn publish_subject(topic: &str, key: &str) -> String {
    format!("{topic}.{}", encode_key(key))
}

/// The subject an event is stored under: `<topic>.<partition>.<encoded key>`.
pub fn event_subject(topic: &str, partition: u32, key: &str) -> String {
    format!("{topic}.{partition}.{}", encode_key(key))
}

/// The partition of `key` among `partitions`: FNV-1a (32 bit) of its subject token modulo
/// `partitions`, what the server's `partition()` transform computes from the published
/// subject (not from the raw UTF-8 of the id: the two differ for ids with bytes outside
/// `[A-Za-z0-9_-]`).
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    dualbus_core::partition::partition_for(&encode_key(key), partitions)
}

/// The subjects a topic's stream takes: `<topic>.*`.
pub fn stream_subjects(topic: &str) -> String {
    format!("{topic}.*")
}

/// The subjects a topic's messages are stored under, every partition: `<topic>.*.*`.
pub fn stored_subjects(topic: &str) -> String {
    format!("{topic}.*.*")
}

/// The stored subjects of one partition: `<topic>.<partition>.*`.
pub fn partition_subjects(topic: &str, partition: u32) -> String {
    format!("{topic}.{partition}.*")
}

/// The destination of the stream's subject transform (its source is
/// [`stream_subjects`]): `<topic>.{{partition(P,1)}}.{{wildcard(1)}}`.
pub fn partition_transform(topic: &str, partitions: u32) -> String {
    format!("{topic}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}")
}

/// Partition and aggregate id of an event subject of `topic`.
pub fn parse_subject(topic: &str, subject: &str) -> Option<(u32, String)> {
    let rest = subject.strip_prefix(topic)?.strip_prefix('.')?;
    let (partition, token) = rest.split_once('.')?;
    Some((partition.parse().ok()?, decode_key(token)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversible_for_every_special_character() {
        for key in [
            "order-1",
            "a.b",
            "a*b",
            "a>b",
            "with space",
            "ümlaut",
            "100%",
            "x/y:z",
            "tab\tch",
            "%41",
            "-_",
        ] {
            let token = encode_key(key);
            assert!(
                token
                    .bytes()
                    .all(|b| unreserved(b) || b == b'%' || b.is_ascii_hexdigit()),
                "{key:?} -> {token:?}"
            );
            assert!(!token.contains(['.', '*', '>', ' ']), "{token}");
            assert_eq!(decode_key(&token).as_deref(), Some(key), "{token}");
        }
        assert_eq!(encode_key("a.b"), "a%2Eb");
        assert_eq!(encode_key("ü"), "%C3%BC");
        assert_eq!(encode_key("order-1"), "order-1");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["%", "%4", "%zz", "%c3%bc", "a.b", "a b", "%FF"] {
            assert_eq!(decode_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn subjects() {
        let s = event_subject("orders", 7, "order 1");
        assert_eq!(s, "orders.7.order%201");
        assert_eq!(parse_subject("orders", &s), Some((7, "order 1".to_owned())));
        assert_eq!(publish_subject("orders", "order 1"), "orders.order%201");
        assert_eq!(stream_subjects("orders"), "orders.*");
        assert_eq!(stored_subjects("orders"), "orders.*.*");
        assert_eq!(partition_subjects("orders", 3), "orders.3.*");
        assert_eq!(
            partition_transform("orders", 16),
            "orders.{{partition(16,1)}}.{{wildcard(1)}}"
        );
        // The dead letter of `orders` has one token more: outside `orders.*.*`.
        assert_eq!(parse_subject("orders", "orders.dlq.3.x"), None);
        assert_eq!(parse_subject("orders", "ordersx.1.a"), None);
    }

    /// The partition comes from the token, as the server hashes the published subject:
    /// the same as the id's own hash only where the id needs no encoding.
    #[test]
    fn partitions_hash_the_token() {
        use dualbus_core::partition::partition_for;
        for key in ["order-1", "a.b", "ümlaut", "with space", "x"] {
            assert_eq!(
                partition_of(key, 16),
                partition_for(&encode_key(key), 16),
                "{key}"
            );
            assert!(partition_of(key, 16) < 16);
            assert_eq!(partition_of(key, 1), 0);
        }
        assert_eq!(partition_of("order-1", 16), partition_for("order-1", 16));
        // Values measured on nats-server 2.14 with P = 4 (published on `ord.<token>`).
        for (key, p) in [
            ("order-1", 1),
            ("a.b", 0),
            ("x", 3),
            ("ordü", 3),
            ("dlq", 0),
        ] {
            assert_eq!(partition_of(key, 4), p, "{key}");
        }
        assert_ne!(
            (0..64)
                .map(|i| partition_of(&format!("a.{i}"), 16))
                .collect::<Vec<_>>(),
            (0..64)
                .map(|i| partition_for(&format!("a.{i}"), 16))
                .collect::<Vec<_>>(),
            "ids with a dot hash differently as tokens"
        );
    }
}
