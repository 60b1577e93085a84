//! W3C trace context in message headers: the propagators' view of [`Headers`].

use dualbus_core::Headers;
use opentelemetry::propagation::{Extractor, Injector};

/// Writes propagation fields into message headers.
pub(crate) struct Inject<'a>(pub(crate) &'a mut Headers);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The names the W3C propagators write stay static.
        self.0.insert(dualbus_core::header_name(key), value);
    }
}

/// Reads propagation fields from message headers. `traceparent` is also found in another
/// case (a client may have written `Traceparent`); the other fields only as written, which
/// spares a second scan of the headers for fields most messages do not carry.
pub(crate) struct Extract<'a>(pub(crate) &'a Headers);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).or_else(|| {
            if key == "traceparent" {
                self.0.get_ignore_case(key)
            } else {
                None
            }
        })
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
        assert_eq!(Extract(&h).get("x-Custom"), Some("v"));
        assert_eq!(Extract(&h).get("X-CUSTOM"), None);
        let mut upper = Headers::new();
        upper.insert("Traceparent", "00-def");
        assert_eq!(Extract(&upper).get("traceparent"), Some("00-def"));
        assert_eq!(Extract(&h).keys(), vec!["traceparent", "x-Custom"]);
    }
}
