//! Domain-bus conformance tests, by theme: `publish` (round trip, isolation, batches, bad
//! input), `delivery` (order and redelivery), `failures` (retry and dead letters), `flow`
//! (backpressure, per-key caps and deferral), `lifecycle` (close, drain, resubscribe) and `history`
//! (replay and expected versions). `support` holds the helpers they share.

mod delivery;
mod failures;
mod flow;
mod history;
mod lifecycle;
mod publish;
mod support;

pub use self::delivery::{
    deadline_extension, order_under_failures, release_and_deadline_redelivery,
    single_active_consumer,
};
pub use self::failures::{dead_letter, malformed_input, retry_then_success};
pub use self::flow::{
    backpressure, deferred_bound, slow_aggregate_over_cap, slow_key_does_not_stall_others,
    unacked_limit,
};
pub use self::history::{expected_version, replay};
pub use self::lifecycle::{close, drain_deadline, graceful_drain, resubscribe};
pub use self::publish::{bad_input, publish_batch_order, publish_subscribe, topic_isolation};
// The size-limit tests build their buses the same way.
pub(super) use self::support::{SOURCE, bus, bus_with, fast_retry, finish, read_raw};
