//! Subject layout of domain topics on JetStream: `<topic>.<partition>.<encoded aggregate id>`.
//!
//! Every aggregate id maps to exactly one subject token, reversibly, so that one
//! aggregate's history can be read back by filtering on its subject. A topic's stream takes
//! `<topic>.*.*`: exactly two tokens after the topic, so it never captures the subjects of
//! the dead-letter topic `<topic>.dlq` or of any other child topic, which have one more.
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

/// The subject of one event: `<topic>.<partition>.<encoded key>`.
pub fn event_subject(topic: &str, partition: u32, key: &str) -> String {
    format!("{topic}.{partition}.{}", encode_key(key))
}

/// The subjects a topic's stream takes: `<topic>.*.*`.
pub fn stream_subjects(topic: &str) -> String {
    format!("{topic}.*.*")
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
        assert_eq!(stream_subjects("orders"), "orders.*.*");
        // The dead letter of `orders` has one token more: outside `orders.*.*`.
        assert_eq!(parse_subject("orders", "orders.dlq.3.x"), None);
        assert_eq!(parse_subject("orders", "ordersx.1.a"), None);
    }
}
