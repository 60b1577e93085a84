//! NATS headers both ways: the bus's headers as a NATS header map (checked first), with the
//! JetStream publish headers, and NATS headers (parsed or a raw stored block) as the bus's.

use async_nats::HeaderMap;
use dualbus_core::Headers;

/// `Nats-Msg-Id`: the publish deduplication id.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
/// `Nats-Expected-Last-Subject-Sequence`: the conditional publish.
pub(crate) const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// How the server counts a message against its `max_payload`: the `HPUB` total, that is
/// the header block (`NATS/1.0\r\n`, one `name: value\r\n` per header, `\r\n`) and the
/// payload. A message without headers goes as `PUB`, with no block.
pub(crate) const WIRE: dualbus_core::WireOverhead = dualbus_core::WireOverhead::new(12, 4);

/// Our headers as NATS headers. They come from a message core checked
/// ([`SimpleOutbound`](dualbus_core::SimpleOutbound),
/// [`OutboundMessage`](dualbus_core::OutboundMessage)): every name is an HTTP token and no
/// value holds a control character, so no client call can panic on them.
pub(crate) fn to_nats(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        map.insert(name, value);
    }
    map
}

/// The headers of a JetStream publish: ours, and `Nats-Msg-Id` with the message id if
/// there is one (checked by core with the headers).
pub(crate) fn to_nats_with_id(headers: &Headers, id: Option<&str>) -> HeaderMap {
    let mut map = to_nats(headers);
    if let Some(id) = id {
        map.insert(MSG_ID, id);
    }
    map
}

/// Makes a JetStream publish conditional: stored only if the last message on its subject
/// has stream sequence `seq` (0: none yet).
pub(crate) fn expect_last_subject_sequence(map: &mut HeaderMap, seq: u128) {
    map.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string().as_str());
}

/// NATS headers as ours: the last value of a header given several times.
pub(crate) fn from_nats(map: Option<&HeaderMap>) -> Headers {
    let Some(h) = map else {
        return Headers::new();
    };
    let mut headers = Headers::with_capacity(h.len());
    for (name, values) in h.iter() {
        if let Some(v) = values.last() {
            headers.insert(name.to_string(), v.as_str());
        }
    }
    headers
}

/// The headers of a message delivered by a `pinned_client` consumer as ours: the server
/// appends its pin id as the last `Nats-Pin-Id`, which is not the message's (a value the
/// publisher set, before it, stays).
pub(crate) fn from_nats_pinned(map: Option<&HeaderMap>, pin_header: &str) -> Headers {
    let Some(h) = map else {
        return Headers::new();
    };
    let mut headers = Headers::with_capacity(h.len());
    for (name, values) in h.iter() {
        let n: &str = name.as_ref();
        let values = if n.eq_ignore_ascii_case(pin_header) {
            values.split_last().map_or(&[][..], |(_, rest)| rest)
        } else {
            values.as_slice()
        };
        if let Some(v) = values.last() {
            headers.insert(name.to_string(), v.as_str());
        }
    }
    headers
}

/// A stored header block as ours, decoded lossily: invalid UTF-8 becomes U+FFFD, lines
/// without a colon are skipped.
pub(crate) fn from_block_lossy(block: &[u8]) -> Headers {
    let text = String::from_utf8_lossy(block);
    let mut headers = Headers::new();
    for line in text.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() {
                headers.insert(name.to_owned(), value.trim());
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Headers {
        [("ce-id", "1"), ("X-Name", "Muñoz")].into_iter().collect()
    }

    /// `headers` hold exactly `ours()` (a NATS header map has no order).
    fn assert_ours(headers: &Headers) {
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers.get("ce-id"), Some("1"));
        assert_eq!(headers.get("X-Name"), Some("Muñoz"));
    }

    #[test]
    fn headers_go_both_ways() {
        let map = to_nats(&ours());
        assert_eq!(map.len(), 2);
        assert_ours(&from_nats(Some(&map)));
        assert!(from_nats(None).is_empty());
        assert!(to_nats(&Headers::new()).is_empty());
    }

    #[test]
    fn the_last_of_repeated_values_is_kept() {
        let mut map = HeaderMap::new();
        map.append("A", "one");
        map.append("A", "two");
        assert_eq!(from_nats(Some(&map)).get("A"), Some("two"));
    }

    #[test]
    fn publish_headers_carry_the_id_and_the_expected_sequence() {
        let mut map = to_nats_with_id(&ours(), Some("e-1"));
        expect_last_subject_sequence(&mut map, 0);
        let mut h = from_nats(Some(&map));
        assert_eq!(h.remove(MSG_ID).as_deref(), Some("e-1"));
        assert_eq!(
            h.remove(EXPECTED_LAST_SUBJECT_SEQUENCE).as_deref(),
            Some("0")
        );
        assert_ours(&h);
        assert_ours(&from_nats(Some(&to_nats_with_id(&ours(), None))));
    }

    #[test]
    fn the_servers_pin_id_is_not_a_message_header() {
        let mut map = to_nats(&ours());
        map.append("Nats-Pin-Id", "server");
        assert_ours(&from_nats_pinned(Some(&map), "Nats-Pin-Id"));
        let mut map = to_nats(&ours());
        map.append("Nats-Pin-Id", "publisher");
        map.append("Nats-Pin-Id", "server");
        let mut h = from_nats_pinned(Some(&map), "Nats-Pin-Id");
        assert_eq!(h.remove("Nats-Pin-Id").as_deref(), Some("publisher"));
        assert_ours(&h);
    }

    #[test]
    fn lossy_headers_keep_what_can_be_read() {
        let h = from_block_lossy(b"NATS/1.0\r\nce-id: 1\r\nX-Name: Mu\xf1oz\r\njunk\r\n\r\n");
        assert_eq!(h.get("ce-id"), Some("1"));
        assert_eq!(h.get("X-Name"), Some("Mu\u{fffd}oz"));
        assert_eq!(h.len(), 2);
    }
}
