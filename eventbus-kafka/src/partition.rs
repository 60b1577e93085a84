//! Which partition a key goes to, computed as the producers of other languages compute it:
//! the publish placement of [`Partitioner::SaramaFnv1a`] and the partition a replay
//! scans.

use crate::config::Partitioner;

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, librdkafka's `rd_murmur2`), as a
/// signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // The length wraps as Java's `int` does (keys are far shorter than 2^32 bytes).
    #[allow(clippy::cast_possible_truncation)]
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if let Some(first) = rest.first() {
        h ^= u32::from(*first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// FNV-1a, 32 bit (Go's `hash/fnv.New32a`).
pub fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of `key` among `partitions` (at least 1).
///
/// - murmur2: `(murmur2(key) & 0x7fffffff) % partitions`, the Java client's placement.
/// - sarama: `abs(int32(fnv1a32(key)) % partitions)`, sarama's default hash partitioner.
pub fn partition_of(partitioner: Partitioner, key: &[u8], partitions: u32) -> u32 {
    let n = i64::from(partitions.max(1));
    let p = match partitioner {
        Partitioner::Murmur2Random => i64::from(murmur2(key) & 0x7fff_ffff) % n,
        Partitioner::SaramaFnv1a => {
            let h = i64::from(i32::from_ne_bytes(fnv1a32(key).to_ne_bytes()));
            (h % n).abs()
        }
    };
    // 0 <= p < partitions by construction.
    u32::try_from(p).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's own test vectors (`UtilsTest.testMurmur2`).
    #[test]
    fn murmur2_matches_the_java_client() {
        for (key, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()), expected, "{key}");
        }
    }

    #[test]
    fn fnv1a_matches_go() {
        // Go: fnv.New32a() over the bytes; the empty input is the offset basis.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn placements_stay_in_range() {
        for n in 1..40u32 {
            for i in 0..200 {
                let key = format!("order-{i}");
                for p in [Partitioner::Murmur2Random, Partitioner::SaramaFnv1a] {
                    assert!(partition_of(p, key.as_bytes(), n) < n);
                }
            }
        }
    }
}
