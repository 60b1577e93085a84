//! Small JSON helpers shared by the jxt JSON and CloudEvents structured codecs.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The members of a JSON object in wire order, values unparsed (duplicates kept).
pub(super) type Members<'a> = Vec<(String, &'a RawValue)>;

/// Parses `body` as a JSON object.
pub(super) fn members(body: &str) -> Result<Members<'_>, serde_json::Error> {
    serde_json::from_str::<Object<'_>>(body).map(|o| o.0)
}

/// The last value of `name` (exact match): later duplicates win, as in Go's decoders.
pub(super) fn get<'a>(members: &Members<'a>, name: &str) -> Option<&'a RawValue> {
    members
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
}

struct Object<'a>(Members<'a>);

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    members.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Object(members))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// `value` as it stands in `body`, with the whitespace around it up to the `:` before and
/// the `,` or `}` after: the member's text exactly as the producer wrote it.
pub(super) fn verbatim<'a>(body: &'a str, value: &'a RawValue) -> &'a str {
    let v = value.get();
    // `value` was parsed from `body` without copying (a borrowed `RawValue`), so it is a
    // slice of `body`; the bounds checks make this hold without relying on it.
    let Some(start) = (v.as_ptr() as usize).checked_sub(body.as_ptr() as usize) else {
        return v;
    };
    let end = start + v.len();
    if body.get(start..end) != Some(v) {
        return v;
    }
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let bytes = body.as_bytes();
    let lead = bytes[..start].iter().rev().take_while(|b| ws(b)).count();
    let trail = bytes[end..].iter().take_while(|b| ws(b)).count();
    // JSON whitespace is ASCII, so these are character boundaries.
    body.get(start - lead..end + trail).unwrap_or(v)
}

/// Writes `s` as a JSON string: `"`, `\` and control characters escaped; with `html_safe`
/// also `<`, `>`, `&`, U+2028 and U+2029, as Go's `encoding/json` and jsoniter's
/// standard-library configuration do.
pub(super) fn write_string(out: &mut String, s: &str, html_safe: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' if html_safe => out.push_str("\\u003c"),
            '>' if html_safe => out.push_str("\\u003e"),
            '&' if html_safe => out.push_str("\\u0026"),
            '\u{2028}' if html_safe => out.push_str("\\u2028"),
            '\u{2029}' if html_safe => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[(c as usize) >> 4]));
                out.push(char::from(HEX[(c as usize) & 0xf]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_order_duplicates_and_whitespace() {
        let body = "{\"a\": 1, \"A\":\"x\",\"a\" :\t[1, 2]\n}";
        let m = members(body).unwrap();
        let names: Vec<&str> = m.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "A", "a"]);
        let last = get(&m, "a").unwrap();
        assert_eq!(last.get(), "[1, 2]");
        assert_eq!(verbatim(body, last), "\t[1, 2]\n");
        assert_eq!(verbatim(body, m[0].1), " 1");
        // A value from elsewhere comes back as it is.
        let other: &RawValue = serde_json::from_str("[1, 2]").unwrap();
        assert_eq!(verbatim(body, other), "[1, 2]");
        assert!(members("[1]").is_err());
        assert!(members("{\"a\":1").is_err());
    }

    #[test]
    fn strings() {
        let mut s = String::new();
        write_string(&mut s, "a<\"\\\u{1}\u{2028}é", true);
        assert_eq!(s, r#""a\u003c\"\\\u0001\u2028é""#);
        s.clear();
        write_string(&mut s, "a<\u{2028}", false);
        assert_eq!(s, "\"a<\u{2028}\"");
    }
}
