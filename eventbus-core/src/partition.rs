//! The stable hash that places an aggregate in a partition.

/// The partition of `key` among `partitions`: FNV-1a (32 bit) of the key's UTF-8 bytes,
/// modulo `partitions` (0 when `partitions` is 0 or 1).
///
/// FNV-1a 32 is what nats-server's `partition(n, ...)` subject transform computes, so the
/// memory reference and JetStream place an aggregate alike. Kafka uses its own partitioner
/// (murmur2, as Java clients do) and reports partitions itself.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        // Reference values of FNV-1a 32: "" -> 0x811c9dc5, "a" -> 0xe40c292c.
        assert_eq!(partition_for("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_for("order-1", 1), 0);
        let p = partition_for("order-1", 16);
        assert!(p < 16);
        assert_eq!(p, partition_for("order-1", 16));
    }
}
