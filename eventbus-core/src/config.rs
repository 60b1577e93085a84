//! Configuration helpers shared by every crate: durations written as `30s`, `100ms`, `30d`,
//! and secrets kept out of `Debug` output and of the URLs shown in messages.

/// A secret string: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `url` with the secret part of its user information replaced by `***`:
/// `nats://user:***@host:4222` for a user and password, `nats://***@host:4222` for a token
/// (or a user name alone, as in `redis://user@host`).
/// A URL without user information is returned as it is.
///
/// Works on any text, valid URL or not: everything between the scheme's `://` (or the
/// start, without a scheme) and the last `@` counts as user information, so an invalid URL
/// is redacted too (at worst, too much of it).
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    let shown = match url[start..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &url[..start], &url[at..])
}

/// `text` with the user information of every `scheme://` URL in it redacted as by
/// [`redact_url`]; a URL runs until the next whitespace or quote. For messages that may
/// quote a configured URL (e.g. a deserialization error).
pub fn redact_urls(text: &str) -> String {
    let is_end = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The URL starts at its scheme: the word before `://`.
        let scheme_start = rest[..i]
            .char_indices()
            .rev()
            .find(|(_, c)| is_end(*c))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let end = rest[i..].find(is_end).map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&redact_url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Serde support for durations written as text (`"250ms"`, `"30s"`, `"5m"`, `"30d"`) or as a
/// number of milliseconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Millis(u64),
    }

    /// Parses `"30s"`-style text (humantime syntax).
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?} ({e}); write e.g. 250ms, 30s, 5m, 30d"))
    }

    /// Deserializes text or milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(t) => parse(&t).map_err(serde::de::Error::custom),
            Repr::Millis(ms) => Ok(Duration::from_millis(ms)),
        }
    }

    /// Serializes as humantime text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Deserializes an optional duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(deserialize_with = "super::deserialize")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }

        /// Serializes an optional duration.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(
            super::duration::parse("30s").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            super::duration::parse("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            super::duration::parse("100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert!(super::duration::parse("soon").unwrap_err().contains("30s"));
    }
}
