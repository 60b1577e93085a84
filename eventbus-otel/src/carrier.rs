//! W3C trace context in message headers: the propagators' view of [`Headers`].

use std::borrow::Cow;

use dualbus_core::Headers;
use opentelemetry::propagation::{Extractor, Injector};

/// Writes propagation fields into message headers.
pub(crate) struct Inject<'a>(pub(crate) &'a mut Headers);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The names the W3C propagators write, without an allocation.
        let name: Cow<'static, str> = match key {
            "traceparent" => Cow::Borrowed("traceparent"),
            "tracestate" => Cow::Borrowed("tracestate"),
            "baggage" => Cow::Borrowed("baggage"),
            other => Cow::Owned(other.to_owned()),
        };
        self.0.insert(name, value);
    }
}

/// Reads propagation fields from message headers; names match without regard to case
/// (brokers and other clients may change it).
pub(crate) struct Extract<'a>(pub(crate) &'a Headers);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).or_else(|| self.0.get_ignore_case(key))
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn injected_fields_are_read_back_in_any_case() {
        let mut h = Headers::new();
        Inject(&mut h).set("traceparent", "00-abc".to_owned());
        Inject(&mut h).set("x-Custom", "v".to_owned());
        assert_eq!(Extract(&h).get("traceparent"), Some("00-abc"));
        assert_eq!(Extract(&h).get("X-CUSTOM"), Some("v"));
        assert_eq!(Extract(&h).keys(), vec!["traceparent", "x-Custom"]);
    }
}
