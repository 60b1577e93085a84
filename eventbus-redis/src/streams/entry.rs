//! Stream entries: key names, entry ids as positions, and the fields that carry an
//! envelope.
//!
//! An entry's fields are the message's headers as they are (name, value), then
//! [`KEY_FIELD`] (the aggregate id) and [`PAYLOAD_FIELD`] (the body), last.

use bytes::Bytes;
use dualbus_core::{Error, Headers, InboundMessage, Position, Result};
use redis::Value;

/// The field holding the routing key (the aggregate id).
pub const KEY_FIELD: &str = "dualbus-key";

/// The field holding the payload.
pub const PAYLOAD_FIELD: &str = "dualbus-payload";

/// Keys of one topic.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    topic: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, topic: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// The stream of `partition`: `<prefix>{<topic>:<p>}`.
    pub(crate) fn stream(&self, partition: u32) -> String {
        format!("{}{{{}:{partition}}}", self.prefix, self.topic)
    }

    /// The hash aggregate id -> id of its last entry, of `partition`.
    pub(crate) fn last(&self, partition: u32) -> String {
        format!("{}{{{}:{partition}}}:last", self.prefix, self.topic)
    }

    /// The topic's settings (its partition count).
    pub(crate) fn meta(&self) -> String {
        format!("{}{{{}}}:meta", self.prefix, self.topic)
    }
}

/// An entry id (`<ms>-<seq>`) as an offset: the milliseconds in the high 64 bits.
pub(crate) fn offset_of(id: &str) -> Option<u128> {
    let (ms, seq) = id.split_once('-')?;
    Some((u128::from(ms.parse::<u64>().ok()?) << 64) | u128::from(seq.parse::<u64>().ok()?))
}

/// The entry id of an offset.
pub(crate) fn id_of(offset: u128) -> String {
    // The high half is at most u64::MAX by construction (a shift of a u64): no truncation.
    #[allow(clippy::cast_possible_truncation)]
    let (ms, seq) = ((offset >> 64) as u64, offset as u64);
    format!("{ms}-{seq}")
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// A raw entry: its id and fields, as the server sent them.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The entries of an `XRANGE` / `XREADGROUP` / `XCLAIM` reply for one stream: an array of
/// `[id, [field, value, ...]]`; a deleted entry (`[id, nil]`) has no fields.
pub(crate) fn entries(v: Value) -> Result<Vec<Entry>> {
    let Value::Array(items) = v else {
        return match v {
            Value::Nil => Ok(Vec::new()),
            other => Err(unexpected(&other)),
        };
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(unexpected(&item));
        };
        if pair.len() != 2 {
            return Err(Error::backend(
                crate::BACKEND,
                false,
                "an entry that is not [id, fields]",
            ));
        }
        let fields_v = pair.pop().unwrap_or(Value::Nil);
        let id = pair
            .pop()
            .and_then(bytes_of)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Error::backend(crate::BACKEND, false, "an entry id that is not text"))?;
        let mut fields = Vec::new();
        if let Value::Array(f) = fields_v {
            let mut it = f.into_iter();
            while let (Some(n), Some(v)) = (it.next(), it.next()) {
                if let (Some(n), Some(v)) = (bytes_of(n), bytes_of(v)) {
                    fields.push((n, v));
                }
            }
        }
        out.push(Entry { id, fields });
    }
    Ok(out)
}

fn unexpected(v: &Value) -> Error {
    Error::backend(
        crate::BACKEND,
        false,
        format!("unexpected reply from the server: {v:?}"),
    )
}

/// The message of an entry, and why it cannot be read if it cannot (fields that are not
/// UTF-8: decoded lossily).
pub(crate) fn inbound(
    topic: &str,
    partition: u32,
    entry: Entry,
) -> Result<(InboundMessage, Option<String>)> {
    let offset = offset_of(&entry.id).ok_or_else(|| {
        Error::backend(
            crate::BACKEND,
            false,
            format!("entry id {:?} is not <ms>-<seq>", entry.id),
        )
    })?;
    let mut headers = Headers::with_capacity(entry.fields.len());
    let (mut key, mut payload, mut problem) = (None, Bytes::new(), None);
    for (name, value) in entry.fields {
        if name == PAYLOAD_FIELD.as_bytes() {
            payload = Bytes::from(value);
            continue;
        }
        let (name, value) = match (String::from_utf8(name), String::from_utf8(value)) {
            (Ok(n), Ok(v)) => (n, v),
            (n, v) => {
                let lossy = |r: std::result::Result<String, std::string::FromUtf8Error>| match r {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                };
                let (n, v) = (lossy(n), lossy(v));
                problem.get_or_insert_with(|| format!("field {n:?} is not UTF-8"));
                (n, v)
            }
        };
        if name == KEY_FIELD {
            key = Some(value);
        } else {
            headers.insert(name, value);
        }
    }
    Ok((
        InboundMessage {
            topic: topic.to_owned(),
            key,
            headers,
            payload,
            position: Position { partition, offset },
        },
        problem,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_and_offsets() {
        for id in [
            "0-0",
            "0-1",
            "1700000000000-0",
            "1700000000000-42",
            "18446744073709551615-18446744073709551615",
        ] {
            let o = offset_of(id).unwrap();
            assert_eq!(id_of(o), id);
        }
        assert!(offset_of("1700000000000-1").unwrap() > offset_of("1700000000000-0").unwrap());
        assert!(offset_of("1700000000001-0").unwrap() > offset_of("1700000000000-9").unwrap());
        for bad in ["", "1", "a-b", "1-", "-1", "1-2-3"] {
            assert_eq!(offset_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_share_a_hash_tag_per_partition() {
        let k = Keys::new("dualbus:", "orders");
        assert_eq!(k.stream(3), "dualbus:{orders:3}");
        assert_eq!(k.last(3), "dualbus:{orders:3}:last");
        assert_eq!(k.meta(), "dualbus:{orders}:meta");
    }
}
