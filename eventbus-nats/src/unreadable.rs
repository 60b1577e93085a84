//! Stored messages the client library cannot read.
//!
//! async-nats drops its connection on a message whose header block it cannot parse (a value
//! that is not UTF-8, a line without a colon, a bad header name): any producer can store
//! one with a raw `HPUB`. A consumer would get it first again after every reconnect and
//! rewind, forever. This module reads stored messages without the client's parser: the
//! non-direct `$JS.API.STREAM.MSG.GET` request answers with JSON (the header block in
//! base64), which the connection reads safely, and the block is checked here the way the
//! client's parser checks it. The direct-get API is never used: it answers with the stored
//! header block itself, which would drop the connection again.

use std::str::FromStr as _;

use async_nats::jetstream::{self, ErrorCode, response::Response, stream::RawMessage};
use base64::Engine as _;
use bytes::Bytes;
use dualbus_core::{Error, Headers, Result};
use serde::{Deserialize, Serialize};

use crate::{BACKEND, headers};

/// A stored message with its header block as stored.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) subject: String,
    pub(crate) header_block: Option<Vec<u8>>,
    pub(crate) payload: Bytes,
}

impl Stored {
    /// Why the client library cannot read this message, if it cannot.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        // The server's JSON turns a subject that is not UTF-8 into U+FFFD; the client drops
        // its connection on such a subject too.
        if self.subject.contains('\u{fffd}') {
            return Some("its subject is not UTF-8");
        }
        self.header_block.as_deref().and_then(header_problem)
    }

    /// Its headers, decoded lossily (see [`headers::from_block_lossy`]).
    pub(crate) fn headers(&self) -> Headers {
        let Some(block) = &self.header_block else {
            return Headers::new();
        };
        headers::from_block_lossy(block)
    }
}

#[derive(Serialize)]
struct GetRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_by_subj: Option<&'a str>,
}

#[derive(Deserialize)]
struct GetResponse {
    message: RawMessage,
}

/// Which stored message to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which<'a> {
    /// The message at this sequence.
    At(u64),
    /// The first message at or after this sequence on a subject filter.
    NextOn(u64, &'a str),
    /// The last message on a subject.
    LastOn(&'a str),
}

/// Reads one stored message of `stream`. `None` if there is none (deleted, or past the
/// end).
pub(crate) async fn get(
    js: &jetstream::Context,
    stream: &str,
    which: Which<'_>,
) -> Result<Option<Stored>> {
    let request = match which {
        Which::At(seq) => GetRequest {
            seq: Some(seq),
            next_by_subj: None,
            last_by_subj: None,
        },
        Which::NextOn(seq, subject) => GetRequest {
            seq: Some(seq),
            next_by_subj: Some(subject),
            last_by_subj: None,
        },
        Which::LastOn(subject) => GetRequest {
            seq: None,
            next_by_subj: None,
            last_by_subj: Some(subject),
        },
    };
    let response: Response<GetResponse> = js
        .request(format!("STREAM.MSG.GET.{stream}"), &request)
        .await
        .map_err(|e| Error::backend(BACKEND, true, e))?;
    let raw = match response {
        Response::Ok(r) => r.message,
        Response::Err { error } if error.error_code() == ErrorCode::NO_MESSAGE_FOUND => {
            return Ok(None);
        }
        Response::Err { error } => return Err(Error::backend(BACKEND, true, error)),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let undecodable = |what: &str| {
        Error::backend(
            BACKEND,
            false,
            format!(
                "message {} of stream {stream}: its {what} is not base64",
                raw.sequence
            ),
        )
    };
    let header_block = match raw.headers.as_deref() {
        None | Some("") => None,
        Some(h) => Some(b64.decode(h).map_err(|_| undecodable("header block"))?),
    };
    let payload = b64
        .decode(&raw.payload)
        .map_err(|_| undecodable("payload"))?;
    Ok(Some(Stored {
        seq: raw.sequence,
        subject: raw.subject,
        header_block,
        payload: Bytes::from(payload),
    }))
}

/// Why async-nats would drop its connection on this header block, if it would: the checks
/// of its parser (`connection.rs`, `HMSG`), in its order.
pub(crate) fn header_problem(block: &[u8]) -> Option<&'static str> {
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("its header block is not UTF-8");
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else {
        return Some("its header block has no version line");
    };
    let Some(rest) = version.strip_prefix("NATS/1.0").map(str::trim) else {
        return Some("its header block does not begin with NATS/1.0");
    };
    let status = rest.split_once(' ').map_or(rest, |(s, _)| s.trim());
    if !status.is_empty() && async_nats::StatusCode::from_str(status).is_err() {
        return Some("its header block has an invalid status code");
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some("its header block has a line without a colon");
        };
        if async_nats::HeaderName::from_str(name).is_err() {
            return Some("its header block has an invalid header name");
        }
        // Continuation lines belong to this value.
        while lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_the_client_reads_pass() {
        for ok in [
            &b"NATS/1.0\r\nce-id: 1\r\n\r\n"[..],
            b"NATS/1.0\r\n\r\n",
            b"NATS/1.0\r\nA: \xc3\xbc\r\n\r\n",
            b"NATS/1.0\r\nA: one\r\n two\r\n\r\n",
        ] {
            assert_eq!(header_problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn header_blocks_the_client_drops_are_found() {
        for (bad, why) in [
            (&b"NATS/1.0\r\nA: Mu\xf1oz\r\n\r\n"[..], "not UTF-8"),
            (b"NATS/2.0\r\nA: b\r\n\r\n", "NATS/1.0"),
            (b"NATS/1.0 abc\r\n\r\n", "status"),
            (b"NATS/1.0\r\nno colon here\r\n\r\n", "colon"),
            (b"NATS/1.0\r\nbad name: v\r\n\r\n", "name"),
        ] {
            let problem = header_problem(bad).unwrap_or_else(|| panic!("{bad:?} passed"));
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
    }
}
