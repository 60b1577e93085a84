//! The commit metadata: what a member commits beside a partition's offset, so that the
//! next owner knows the ownership epoch and which records above the offset completed
//! already (they are not handled again).
//!
//! Text (librdkafka needs UTF-8), fields separated by `;`:
//!
//! ```text
//! dualbus:1;e=<epoch>[;d=<delivered through>][;r=<runs>|;b=<bitset>]
//! ```
//!
//! - `e`: the partition's ownership epoch (decimal). Each new owner commits `e + 1` before
//!   its first handler runs.
//! - `d`: the highest offset delivered so far (decimal), so that a later delivery of a
//!   record at or below it counts as a redelivery.
//! - `r`: the offsets above the committed one that completed, as unsigned LEB128 varints
//!   `gap, length, gap, length, ...` (a gap of records not completed, then a run of
//!   completed ones, starting at the committed offset), in unpadded URL-safe base64.
//! - `b`: the same set as a bitset, bit `i` (least significant first in each byte) for
//!   offset `committed + i`, in unpadded URL-safe base64.
//!
//! The encoder writes whichever of `r` and `b` is shorter and leaves both out when the
//! text would not fit the broker's `offset.metadata.max.bytes`. Metadata of other
//! clients (anything not starting with `dualbus:1`) reads as epoch 0, nothing completed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const PREFIX: &str = "dualbus:1";

/// What the metadata of a committed offset says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CommitMeta {
    /// The ownership epoch.
    pub(crate) epoch: u64,
    /// The highest offset delivered before, if known.
    pub(crate) delivered_through: Option<u64>,
    /// Offsets above the committed one that completed, ascending.
    pub(crate) completed: Vec<u64>,
}

/// The encoded metadata, and whether the completed offsets had to be left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    pub(crate) text: String,
    pub(crate) dropped: bool,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        // The low 7 bits: truncation is the point.
        #[allow(clippy::cast_possible_truncation)]
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(bytes: &mut impl Iterator<Item = u8>) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = bytes.next()?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes `meta` for a commit at `committed`, in at most `max_bytes`.
/// `meta.completed` must be ascending and above `committed`.
pub(crate) fn encode(committed: u64, meta: &CommitMeta, max_bytes: usize) -> Encoded {
    let mut text = format!("{PREFIX};e={}", meta.epoch);
    if let Some(d) = meta.delivered_through {
        text.push_str(&format!(";d={d}"));
    }
    if meta.completed.is_empty() {
        return Encoded {
            text,
            dropped: false,
        };
    }
    // Runs.
    let mut runs = Vec::new();
    let mut cursor = committed;
    let mut i = 0;
    let c = &meta.completed;
    while i < c.len() {
        let start = c[i];
        let mut end = start + 1;
        i += 1;
        while i < c.len() && c[i] == end {
            end += 1;
            i += 1;
        }
        put_varint(&mut runs, start.saturating_sub(cursor));
        put_varint(&mut runs, end - start);
        cursor = end;
    }
    // Bitset, when it is not absurdly long.
    let span = c.last().map_or(0, |last| last - committed + 1);
    let bits = (span <= 8 * max_bytes as u64).then(|| {
        let mut set = vec![0u8; usize::try_from(span.div_ceil(8)).unwrap_or(0)];
        for o in c {
            let i = usize::try_from(o - committed).unwrap_or(0);
            set[i / 8] |= 1 << (i % 8);
        }
        set
    });
    let (tag, raw) = match bits {
        Some(b) if b.len() < runs.len() => ('b', b),
        _ => ('r', runs),
    };
    let with = format!("{text};{tag}={}", URL_SAFE_NO_PAD.encode(raw));
    if with.len() <= max_bytes {
        Encoded {
            text: with,
            dropped: false,
        }
    } else {
        Encoded {
            text,
            dropped: true,
        }
    }
}

/// Decodes the metadata of a commit at `committed`. Foreign or damaged metadata gives
/// what could be read (epoch 0 and nothing completed for a foreign one).
pub(crate) fn decode(committed: u64, text: &str) -> CommitMeta {
    let mut meta = CommitMeta::default();
    let mut fields = text.split(';');
    if fields.next() != Some(PREFIX) {
        return meta;
    }
    for field in fields {
        let Some((name, value)) = field.split_once('=') else {
            continue;
        };
        match name {
            "e" => meta.epoch = value.parse().unwrap_or(0),
            "d" => meta.delivered_through = value.parse().ok(),
            "r" => {
                let Ok(raw) = URL_SAFE_NO_PAD.decode(value) else {
                    continue;
                };
                let mut bytes = raw.into_iter();
                let mut cursor = committed;
                let mut out = Vec::new();
                while let Some(gap) = get_varint(&mut bytes) {
                    let Some(len) = get_varint(&mut bytes) else {
                        break;
                    };
                    let Some(start) = cursor.checked_add(gap) else {
                        break;
                    };
                    let Some(end) = start.checked_add(len) else {
                        break;
                    };
                    // A damaged length must not allocate without bound.
                    if out.len() as u64 + len > 10_000_000 {
                        break;
                    }
                    out.extend(start..end);
                    cursor = end;
                }
                meta.completed = out;
            }
            "b" => {
                let Ok(raw) = URL_SAFE_NO_PAD.decode(value) else {
                    continue;
                };
                meta.completed = raw
                    .iter()
                    .enumerate()
                    .flat_map(|(byte, b)| {
                        (0u8..8)
                            .filter(move |bit| b & (1 << bit) != 0)
                            .map(move |bit| committed + (byte as u64) * 8 + u64::from(bit))
                    })
                    .collect();
            }
            _ => {}
        }
    }
    // The committed offset itself is never completed (else it would be committed past).
    meta.completed.retain(|o| *o > committed);
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(epoch: u64, completed: Vec<u64>) -> CommitMeta {
        CommitMeta {
            epoch,
            delivered_through: Some(completed.last().copied().unwrap_or(0)),
            completed,
        }
    }

    #[test]
    fn round_trips_runs_and_bitsets() {
        for (committed, completed) in [
            (0, vec![]),
            (10, vec![12, 13, 14, 20]),
            (1000, (1001..1500).collect::<Vec<_>>()),
            (5, (6..2000).step_by(2).collect()),
            (7, vec![u64::MAX - 1]),
        ] {
            let m = meta(3, completed);
            let e = encode(committed, &m, 4096);
            assert!(!e.dropped, "{committed}: {}", e.text);
            assert!(e.text.len() <= 4096);
            assert_eq!(decode(committed, &e.text), m, "{}", e.text);
        }
    }

    #[test]
    fn the_shorter_form_is_written() {
        let dense = encode(0, &meta(1, (1..400).step_by(2).collect()), 4096);
        assert!(dense.text.contains(";b="), "{}", dense.text);
        let sparse = encode(0, &meta(1, vec![100_000, 100_001]), 4096);
        assert!(sparse.text.contains(";r="), "{}", sparse.text);
    }

    #[test]
    fn metadata_over_the_limit_keeps_the_epoch_and_drops_the_set() {
        // Alternating offsets over a long span fit neither form in 100 bytes.
        let m = meta(9, (1..10_000).step_by(2).collect());
        let e = encode(0, &m, 100);
        assert!(e.dropped);
        assert!(e.text.len() <= 100);
        let back = decode(0, &e.text);
        assert_eq!((back.epoch, back.completed.len()), (9, 0));
        // At the limit, limit - 1 and limit + 1: the set is kept only when it fits.
        let small = meta(1, vec![3, 5, 9]);
        let full = encode(0, &small, 4096).text.len();
        for (max, kept) in [(full + 1, true), (full, true), (full - 1, false)] {
            let e = encode(0, &small, max);
            assert_eq!(!e.dropped, kept, "{max}: {}", e.text);
            assert_eq!(decode(0, &e.text).completed.is_empty(), !kept);
        }
    }

    #[test]
    fn foreign_and_damaged_metadata_read_as_nothing() {
        assert_eq!(decode(5, ""), CommitMeta::default());
        assert_eq!(decode(5, "some other client"), CommitMeta::default());
        let d = decode(5, "dualbus:1;e=x;d=;r=!!;b=*;zz");
        assert_eq!(d, CommitMeta::default());
        // A truncated run list keeps the whole pairs before the cut.
        let e = encode(0, &meta(2, vec![3, 4, 10]), 4096).text;
        let cut = &e[..e.len() - 1];
        assert_eq!(decode(0, cut).epoch, 2);
        // Offsets at or below the committed one are not trusted.
        assert!(
            decode(10, "dualbus:1;e=1;b=_w")
                .completed
                .iter()
                .all(|o| *o > 10)
        );
    }
}
