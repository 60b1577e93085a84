//! Message headers: a small ordered map that every backend can carry.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Longest header name accepted.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Longest header value accepted.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;

/// A header name: most are static strings, so no allocation is needed for them.
pub type HeaderName = Cow<'static, str>;

/// Ordered headers with case-sensitive, unique names.
///
/// Insertion order is kept (wire formats are deterministic). Lookups are linear: messages
/// carry a handful of headers, where a vector beats a map. Clones are cheap (the entries are
/// shared and copied on the first write), so a broker can hand out stored headers without
/// copying them.
///
/// Names and values are checked by [`Headers::validate`] before anything is handed to a
/// backend client: names are HTTP tokens (`[A-Za-z0-9!#$%&'*+.^_`|~-]`, 1 to 256 bytes),
/// values are UTF-8 without control characters other than tab (no CR, LF or NUL, which
/// would break NATS and HTTP framing) and at most 8 KiB.
#[derive(Clone, Default)]
pub struct Headers {
    entries: Option<Arc<Vec<(HeaderName, String)>>>,
}

/// `name` as a header name: the W3C trace-context names that most messages carry
/// (`traceparent`, `tracestate`, `baggage`) stay static (no copy); others are copied.
pub fn header_name(name: &str) -> HeaderName {
    match name {
        "traceparent" => Cow::Borrowed("traceparent"),
        "tracestate" => Cow::Borrowed("tracestate"),
        "baggage" => Cow::Borrowed("baggage"),
        other => Cow::Owned(other.to_owned()),
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries() == other.entries()
    }
}

impl Eq for Headers {}

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Self { entries: None }
    }

    /// The entries, names as stored (a static name stays borrowed when copied).
    pub(crate) fn entries(&self) -> &[(HeaderName, String)] {
        self.entries.as_deref().map_or(&[], Vec::as_slice)
    }

    fn entries_mut(&mut self) -> &mut Vec<(HeaderName, String)> {
        Arc::make_mut(self.entries.get_or_insert_with(Default::default))
    }

    /// Room for `n` headers.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: (n > 0).then(|| Arc::new(Vec::with_capacity(n))),
        }
    }

    /// Sets `name` to `value`, replacing an earlier value of the same name in place.
    pub fn insert(&mut self, name: impl Into<HeaderName>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        let entries = self.entries_mut();
        if let Some(slot) = entries.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            entries.push((name, value));
        }
    }

    /// Appends without looking for an earlier value: for codecs that build fresh maps with
    /// names known to be distinct.
    pub(crate) fn push_unique(&mut self, name: impl Into<HeaderName>, value: impl Into<String>) {
        self.entries_mut().push((name.into(), value.into()));
    }

    /// Value of `name` (exact, case-sensitive match).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Value of `name`, ignoring ASCII case.
    pub fn get_ignore_case(&self, name: &str) -> Option<&str> {
        self.entries()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let idx = self.entries().iter().position(|(n, _)| n == name)?;
        Some(self.entries_mut().remove(idx).1)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Iterates `(name, value)` in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries().iter().map(|(n, v)| (n.as_ref(), v.as_str()))
    }

    /// Checks every name and value; see the type's documentation for the rules.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in self.entries() {
            validate_header(name, value)?;
        }
        Ok(())
    }
}

/// Checks one header name and value against the rules of [`Headers`].
pub fn validate_header(name: &str, value: &str) -> Result<()> {
    let err = |reason| {
        Err(Error::InvalidHeader {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return err("header name is empty");
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return err("header name longer than 256 bytes");
    }
    if !name.bytes().all(is_token_byte) {
        return err("header name must be an HTTP token ([A-Za-z0-9!#$%&'*+.^_`|~-])");
    }
    if value.len() > MAX_HEADER_VALUE_LEN {
        return err("header value longer than 8 KiB");
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return err("header value contains a control character (CR, LF, NUL, ...)");
    }
    Ok(())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<N: Into<HeaderName>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        let mut h = Self::new();
        for (n, v) in iter {
            h.insert(n, v);
        }
        h
    }
}

impl<N: Into<HeaderName>, V: Into<String>> Extend<(N, V)> for Headers {
    fn extend<T: IntoIterator<Item = (N, V)>>(&mut self, iter: T) {
        for (n, v) in iter {
            self.insert(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_in_place() {
        let mut h = Headers::new();
        h.insert("a", "1");
        h.insert("b", "2");
        h.insert("a", "3");
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![("a", "3"), ("b", "2")]);
        assert_eq!(h.get_ignore_case("A"), Some("3"));
        assert_eq!(h.remove("a").as_deref(), Some("3"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn validation_rejects_what_breaks_framing() {
        assert!(validate_header("traceparent", "00-ab-cd-01").is_ok());
        assert!(validate_header("x", "naïve value\twith tab").is_ok());
        for (n, v) in [
            ("", "v"),
            ("bad name", "v"),
            ("bad:name", "v"),
            ("ok", "line\r\nInjected: yes"),
            ("ok", "nul\0"),
        ] {
            let e = validate_header(n, v).unwrap_err();
            assert!(matches!(e, Error::InvalidHeader { .. }), "{n:?} {v:?}: {e}");
        }
        let long = "x".repeat(MAX_HEADER_VALUE_LEN + 1);
        assert!(validate_header("ok", &long).is_err());
    }
}
