//! Attribute names: the OpenTelemetry messaging conventions (v1.42.0) and this crate's own.

use opentelemetry::{Key, KeyValue, StringValue, Value};
pub(crate) use opentelemetry_semantic_conventions::attribute::{
    ERROR_TYPE, MESSAGING_BATCH_MESSAGE_COUNT, MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_DESTINATION_NAME, MESSAGING_DESTINATION_PARTITION_ID, MESSAGING_KAFKA_MESSAGE_KEY,
    MESSAGING_KAFKA_OFFSET, MESSAGING_MESSAGE_BODY_SIZE, MESSAGING_MESSAGE_CONVERSATION_ID,
    MESSAGING_MESSAGE_ID, MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE, MESSAGING_SYSTEM,
};

/// The attempt of the keyed pool, from 1 (no convention name exists).
pub const DUALBUS_ATTEMPT: &str = "dualbus.attempt";
/// The broker's delivery count, from 1 (no convention name exists).
pub const DUALBUS_DELIVERY_COUNT: &str = "dualbus.delivery_count";
/// What became of a handler attempt: `ok`, `retried` or `dead_lettered`.
pub const DUALBUS_OUTCOME: &str = "dualbus.outcome";
/// The aggregate id, on backends whose convention has no key attribute.
pub const DUALBUS_AGGREGATE_ID: &str = "dualbus.aggregate_id";
/// Which write a `send` span is: `event`, `batch`, `append`, `dead_letter`, `message`,
/// `request` or `reply`.
pub const DUALBUS_PUBLISH_KIND: &str = "dualbus.publish.kind";
/// Why a message was dead-lettered: `exhausted`, `permanent`, `malformed` or `unreadable`.
pub const DUALBUS_DEAD_LETTER_KIND: &str = "dualbus.dead_letter.kind";
/// The event type.
pub const DUALBUS_EVENT_TYPE: &str = "dualbus.event_type";
/// A batch's messages the broker refused.
pub const DUALBUS_BATCH_FAILED_COUNT: &str = "dualbus.batch.failed_count";
/// The bus: `domain` or `simple`.
pub const DUALBUS_BUS: &str = "dualbus.bus";

/// The `messaging.system` value of a backend: the convention's `kafka`; `nats`, `redis`
/// and `memory` are custom values (the conventions name none for them).
pub(crate) fn system(backend: &'static str) -> &'static str {
    backend
}

pub(crate) fn s(key: &'static str, value: &'static str) -> KeyValue {
    KeyValue::new(
        Key::from_static_str(key),
        Value::String(StringValue::from(value)),
    )
}

pub(crate) fn shared(key: &'static str, value: &str) -> KeyValue {
    let v: std::sync::Arc<str> = value.into();
    KeyValue::new(
        Key::from_static_str(key),
        Value::String(StringValue::from(v)),
    )
}

pub(crate) fn owned(key: &'static str, value: &str) -> KeyValue {
    KeyValue::new(Key::from_static_str(key), value.to_owned())
}

pub(crate) fn int(key: &'static str, value: impl TryInto<i64>) -> KeyValue {
    KeyValue::new(
        Key::from_static_str(key),
        value.try_into().unwrap_or(i64::MAX),
    )
}
