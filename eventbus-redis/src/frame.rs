//! The frame of a simple message on Redis pub/sub: pub/sub carries one binary string per
//! message and no headers, so headers and the reply topic travel in front of the payload.
//!
//! Version 1, all integers unsigned big-endian (`docs/backends/redis.md` has the same table
//! and a worked example):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 3 | magic: `0x00 0x64 0x62` (NUL, `d`, `b`) |
//! | 3 | 1 | version: `0x01` |
//! | 4 | 2 | header count `n` |
//! | 6 | | `n` times: name length (2), name (UTF-8), value length (2), value (UTF-8) |
//! | | 2 | reply topic length `r` (0: none) |
//! | | `r` | reply topic (UTF-8) |
//! | | rest | payload, as published |
//!
//! A message that does not start with the magic is a plain payload (what `PUBLISH` from
//! another client sends): it is delivered as it is, without headers. A message that starts
//! with the magic but does not parse (an unknown version, a length past the end, text that
//! is not UTF-8) is delivered as it is too, with the header [`FRAME_ERROR`] saying why:
//! nothing that reaches a subscriber is dropped.

use bytes::{BufMut, Bytes, BytesMut};
use dualbus_core::{Error, Headers, Result, WireOverhead};

/// The first bytes of every frame.
pub const MAGIC: [u8; 3] = [0x00, b'd', b'b'];

/// The frame version this crate writes (and the only one it reads).
pub const VERSION: u8 = 1;

/// Bytes every frame costs besides its headers, reply topic and payload: magic, version,
/// header count and reply topic length.
pub const FIXED: usize = MAGIC.len() + 1 + 2 + 2;

/// Header set on a message whose frame did not parse; its value says why.
pub const FRAME_ERROR: &str = "dualbus-frame-error";

/// How core counts a message against the limit: each header costs its two length fields
/// (the frame's fixed bytes and the reply topic are kept out of the limit by
/// [`crate::RedisConfig`]).
pub(crate) const WIRE: WireOverhead = WireOverhead::new(0, 4);

fn len16(what: &str, n: usize) -> Result<u16> {
    u16::try_from(n).map_err(|_| Error::InvalidHeader {
        name: what.chars().take(64).collect(),
        reason: "longer than 65,535 bytes: the frame cannot carry it",
    })
}

/// A message to frame: its parts checked against the format's lengths, written with
/// [`Frame::write`] straight into a buffer (the publish command's, without a copy of the
/// payload in between).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    headers: &'a Headers,
    reply: &'a str,
    payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// [`Error::InvalidHeader`] when a header, the header count or the reply topic does
    /// not fit the format's two-byte lengths.
    pub fn new(headers: &'a Headers, reply_to: Option<&'a str>, payload: &'a [u8]) -> Result<Self> {
        let reply = reply_to.unwrap_or("");
        len16("header count", headers.len())?;
        for (name, value) in headers.iter() {
            len16(name, name.len())?;
            len16(name, value.len())?;
        }
        len16("reply topic", reply.len())?;
        Ok(Self {
            headers,
            reply,
            payload,
        })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        FIXED
            + self
                .headers
                .iter()
                .map(|(n, v)| 4 + n.len() + v.len())
                .sum::<usize>()
            + self.reply.len()
            + self.payload.len()
    }

    /// Never: a frame has at least its fixed bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes it. The lengths were checked by [`Frame::new`]: the casts below cannot
    /// truncate.
    #[allow(clippy::cast_possible_truncation)]
    pub fn write(&self, b: &mut impl BufMut) {
        b.put_slice(&MAGIC);
        b.put_u8(VERSION);
        b.put_u16(self.headers.len() as u16);
        for (name, value) in self.headers.iter() {
            b.put_u16(name.len() as u16);
            b.put_slice(name.as_bytes());
            b.put_u16(value.len() as u16);
            b.put_slice(value.as_bytes());
        }
        b.put_u16(self.reply.len() as u16);
        b.put_slice(self.reply.as_bytes());
        b.put_slice(self.payload);
    }

    /// It, as bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len());
        self.write(&mut b);
        b.freeze()
    }
}

/// The frame of a message, as bytes ([`Frame`] writes it without the copy).
pub fn encode(headers: &Headers, reply_to: Option<&str>, payload: &[u8]) -> Result<Bytes> {
    Ok(Frame::new(headers, reply_to, payload)?.to_bytes())
}

/// A message read from a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Its headers (none for a plain payload).
    pub headers: Headers,
    /// Its reply topic.
    pub reply_to: Option<String>,
    /// Its payload (a slice of the message, not a copy).
    pub payload: Bytes,
}

/// Reads a message: a frame, or a plain payload (see the module documentation).
pub fn decode(message: Bytes) -> Decoded {
    if !message.starts_with(&MAGIC) {
        return Decoded {
            headers: Headers::default(),
            reply_to: None,
            payload: message,
        };
    }
    match parse(&message) {
        Ok((headers, reply_to, at)) => Decoded {
            headers,
            reply_to,
            payload: message.slice(at..),
        },
        Err(why) => {
            let mut headers = Headers::default();
            headers.insert(FRAME_ERROR, why);
            Decoded {
                headers,
                reply_to: None,
                payload: message,
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| format!("frame ends inside the {what}"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> std::result::Result<usize, String> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn text(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u16(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
    }
}

/// Headers, reply topic and the payload's offset.
fn parse(message: &[u8]) -> std::result::Result<(Headers, Option<String>, usize), String> {
    let mut r = Reader {
        bytes: message,
        at: MAGIC.len(),
    };
    let version = r.take(1, "version")?[0];
    if version != VERSION {
        return Err(format!(
            "frame version {version} is not known here (this reader knows {VERSION})"
        ));
    }
    let count = r.u16("header count")?;
    // Each header takes at least four bytes: a count past the end is refused before any
    // allocation it would size.
    if count.saturating_mul(4) > message.len() {
        return Err(format!("frame ends inside its {count} headers"));
    }
    let mut headers = Headers::with_capacity(count);
    for _ in 0..count {
        let name = r.text("header name")?;
        let value = r.text("header value")?;
        headers.insert(name, value);
    }
    let reply = r.text("reply topic")?;
    Ok((headers, (!reply.is_empty()).then_some(reply), r.at))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The worked example of `docs/backends/redis.md`, byte by byte.
    #[test]
    fn the_documented_example() {
        let f = encode(&headers(&[("k", "v")]), Some("r"), b"hi").unwrap();
        assert_eq!(
            f.as_ref(),
            [
                0x00, b'd', b'b', 0x01, // magic, version
                0x00, 0x01, // one header
                0x00, 0x01, b'k', 0x00, 0x01, b'v', // "k": "v"
                0x00, 0x01, b'r', // reply topic "r"
                b'h', b'i', // payload
            ]
        );
        let d = decode(f);
        assert_eq!(d.headers, headers(&[("k", "v")]));
        assert_eq!(d.reply_to.as_deref(), Some("r"));
        assert_eq!(d.payload.as_ref(), b"hi");
    }

    #[test]
    fn round_trip_and_size() {
        let h = headers(&[("traceparent", "00-abc-01"), ("x-tenant", "t1"), ("e", "")]);
        for payload in [&b""[..], b"x", &[0u8; 1000]] {
            for reply in [None, Some("_inbox.1")] {
                let f = encode(&h, reply, payload).unwrap();
                let counted = WIRE.size(&h, payload.len(), None, dualbus_core::Write::Publish);
                assert_eq!(
                    f.len(),
                    counted + FIXED + reply.map_or(0, str::len),
                    "the frame is what core counts, plus the fixed bytes and the reply topic"
                );
                let d = decode(f);
                assert_eq!(d.headers, h);
                assert_eq!(d.reply_to.as_deref(), reply);
                assert_eq!(d.payload.as_ref(), payload);
            }
        }
    }

    #[test]
    fn a_plain_payload_is_delivered_as_it_is() {
        for raw in [
            &b""[..],
            b"hello",
            b"{\"a\":1}",
            &[0x00, b'd'],
            &[0x01, b'd', b'b', 1],
        ] {
            let d = decode(Bytes::copy_from_slice(raw));
            assert!(d.headers.is_empty());
            assert_eq!(d.reply_to, None);
            assert_eq!(d.payload.as_ref(), raw);
        }
    }

    #[test]
    fn a_broken_frame_is_delivered_whole_with_the_reason() {
        let good = encode(&headers(&[("name", "value")]), Some("reply"), b"payload").unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        // Every truncation inside the header block and the reply topic.
        for cut in 3..good.len() - b"payload".len() {
            cases.push((good[..cut].to_vec(), "ends inside"));
        }
        let mut v2 = good.to_vec();
        v2[3] = 2;
        cases.push((v2, "version 2"));
        let mut latin1 = good.to_vec();
        latin1[8] = 0xE9; // In the name "name".
        cases.push((latin1, "not UTF-8"));
        let mut huge = good.to_vec();
        huge[4] = 0xFF;
        huge[5] = 0xFF;
        cases.push((huge, "65535 headers"));
        for (bytes, why) in cases {
            let d = decode(Bytes::from(bytes.clone()));
            let reason = d.headers.get(FRAME_ERROR).unwrap_or_else(|| {
                panic!("{bytes:?} parsed: {d:?}");
            });
            assert!(reason.contains(why), "{reason} for {bytes:?}");
            assert_eq!(d.payload.as_ref(), bytes.as_slice(), "delivered whole");
            assert_eq!(d.headers.len(), 1);
        }
    }

    #[test]
    fn lengths_past_the_format_are_refused() {
        let long = "v".repeat(65_536);
        let e = encode(&headers(&[("k", long.as_str())]), None, b"").unwrap_err();
        assert!(matches!(e, Error::InvalidHeader { .. }), "{e}");
        assert!(encode(&headers(&[("k", &long[1..])]), None, b"").is_ok());
        let e = encode(&Headers::default(), Some(&long), b"").unwrap_err();
        assert!(matches!(e, Error::InvalidHeader { .. }), "{e}");
    }
}
