//! Header fields on the wire, and their conversion to and from `http` types.
//!
//! On the wire headers are a JSON object, as in the original protocol. A name
//! that occurs more than once (`set-cookie`) carries an array of strings;
//! every other value is a plain string, so original peers see what they
//! always saw.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Limits, ProtocolError, Violation};

/// Header fields in wire order; a name may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

/// Hop-by-hop fields (RFC 9110 7.6.1) plus `proxy-connection` and
/// `keep-alive`: they describe one connection and never cross the tunnel.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True for fields that must not be forwarded: the fixed hop-by-hop list and
/// any field named in `Connection`.
pub fn is_hop_by_hop(name: &HeaderName, connection_listed: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || connection_listed.contains(name)
}

/// Names listed in the `Connection` header(s) of `map`.
pub fn connection_listed(map: &HeaderMap) -> Vec<HeaderName> {
    map.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

impl Headers {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// First value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Converts an `http` header map, dropping hop-by-hop fields and the
    /// fields `drop` names. Fails on a value that is not visible ASCII/UTF-8,
    /// which JSON cannot carry faithfully.
    pub fn from_map(map: &HeaderMap, drop: &[HeaderName]) -> Result<Self, ProtocolError> {
        Self::from_map_without(map, |name| drop.contains(name))
    }

    /// Like [`Headers::from_map`], dropping every field for which `drop`
    /// holds.
    pub fn from_map_without(
        map: &HeaderMap,
        drop: impl Fn(&HeaderName) -> bool,
    ) -> Result<Self, ProtocolError> {
        let listed = connection_listed(map);
        let mut out = Vec::with_capacity(map.len());
        for (name, value) in map {
            if is_hop_by_hop(name, &listed) || drop(name) {
                continue;
            }
            let value = value.to_str().map_err(|_| {
                ProtocolError::new(
                    Violation::InvalidHeader,
                    format!("value of {name} is not printable ASCII"),
                )
            })?;
            out.push((name.as_str().to_owned(), value.to_owned()));
        }
        Ok(Self(out))
    }

    /// Checks count, size and syntax against `limits` and builds a header
    /// map, dropping hop-by-hop fields.
    pub fn to_map(&self, limits: &Limits) -> Result<HeaderMap, ProtocolError> {
        self.check_size(limits)?;
        let mut map = HeaderMap::with_capacity(self.0.len());
        for (name, value) in &self.0 {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ProtocolError::new(
                    Violation::InvalidHeader,
                    format!("invalid header name {name:?}"),
                )
            })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                ProtocolError::new(Violation::InvalidHeader, format!("invalid value for {name}"))
            })?;
            map.append(name, value);
        }
        let listed = connection_listed(&map);
        let hop: Vec<HeaderName> =
            map.keys().filter(|n| is_hop_by_hop(n, &listed)).cloned().collect();
        for name in hop {
            map.remove(name);
        }
        Ok(map)
    }

    /// Count and byte-size checks alone.
    pub fn check_size(&self, limits: &Limits) -> Result<(), ProtocolError> {
        if self.0.len() > limits.max_headers as usize {
            return Err(ProtocolError::new(
                Violation::TooManyHeaders,
                format!("{} header fields, limit {}", self.0.len(), limits.max_headers),
            ));
        }
        let bytes: usize = self.0.iter().map(|(n, v)| n.len() + v.len()).sum();
        if bytes > limits.max_header_bytes as usize {
            return Err(ProtocolError::new(
                Violation::HeadersTooLarge,
                format!("{bytes} bytes of headers, limit {}", limits.max_header_bytes),
            ));
        }
        Ok(())
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let mut done: Vec<&str> = Vec::new();
        for (i, (name, value)) in self.0.iter().enumerate() {
            if done.iter().any(|d| d.eq_ignore_ascii_case(name)) {
                continue;
            }
            let rest: Vec<&str> = self.0[i + 1..]
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            if rest.is_empty() {
                map.serialize_entry(name, value)?;
            } else {
                let mut all = Vec::with_capacity(rest.len() + 1);
                all.push(value.as_str());
                all.extend(rest);
                map.serialize_entry(name, &all)?;
                done.push(name);
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(HeadersVisitor)
    }
}

struct HeadersVisitor;

impl<'de> Visitor<'de> for HeadersVisitor {
    type Value = Headers;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of header names to a string or an array of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Headers, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = access.next_key::<String>()? {
            match access.next_value::<OneOrMany>()? {
                OneOrMany::One(v) => out.push((name, v)),
                OneOrMany::Many(vs) => out.extend(vs.into_iter().map(|v| (name.clone(), v))),
            }
        }
        Ok(Headers(out))
    }
}

enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    out.push(v);
                }
                Ok(OneOrMany::Many(out))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_become_an_array_and_come_back_in_order() {
        let h = Headers(vec![
            ("set-cookie".into(), "a=1".into()),
            ("content-type".into(), "text/plain".into()),
            ("set-cookie".into(), "b=2".into()),
        ]);
        let json = serde_json::to_string(&h).expect("serialize");
        assert_eq!(json, r#"{"set-cookie":["a=1","b=2"],"content-type":"text/plain"}"#);
        let back: Headers = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.get("Set-Cookie"), Some("a=1"));
        assert_eq!(back.len(), 3);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_fields_are_dropped() {
        let h = Headers(vec![
            ("connection".into(), "close, x-secret".into()),
            ("x-secret".into(), "1".into()),
            ("transfer-encoding".into(), "chunked".into()),
            ("content-type".into(), "application/json".into()),
        ]);
        let map = h.to_map(&Limits::default()).expect("valid");
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("content-type"));
    }

    #[test]
    fn too_many_and_too_large_headers_are_rejected() {
        let limits = Limits { max_headers: 2, max_header_bytes: 20, ..Limits::default() };
        let many = Headers((0..3).map(|i| (format!("x-{i}"), "v".into())).collect());
        assert_eq!(many.to_map(&limits).expect_err("must fail").kind, Violation::TooManyHeaders);
        let big = Headers(vec![("x-big".into(), "v".repeat(30))]);
        assert_eq!(big.to_map(&limits).expect_err("must fail").kind, Violation::HeadersTooLarge);
    }

    #[test]
    fn invalid_names_and_values_are_rejected() {
        let limits = Limits::default();
        let name = Headers(vec![("bad name".into(), "v".into())]);
        assert_eq!(name.to_map(&limits).expect_err("must fail").kind, Violation::InvalidHeader);
        let value = Headers(vec![("x".into(), "a\r\nb".into())]);
        assert_eq!(value.to_map(&limits).expect_err("must fail").kind, Violation::InvalidHeader);
    }

    #[test]
    fn non_ascii_header_values_are_refused_when_converting_from_http() {
        let mut map = HeaderMap::new();
        map.insert("x-bin", HeaderValue::from_bytes(b"\xff\xfe").expect("opaque bytes"));
        let err = Headers::from_map(&map, &[]).expect_err("must fail");
        assert_eq!(err.kind, Violation::InvalidHeader);
    }
}
