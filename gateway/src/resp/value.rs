//! A small RESP value model for the few replies the gateway reads or writes itself
//! (virtualized commands, pub/sub rewriting). The forwarding path never builds values.

use super::{find_crlf, parse_int};
use bytes::BytesMut;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    /// Null bulk, null array, or RESP3 null.
    Null,
    Array(Vec<Value>),
    /// A map: RESP3 `%`, flattened to an array in RESP2.
    Map(Vec<(Value, Value)>),
    /// A set: RESP3 `~`, an array in RESP2.
    Set(Vec<Value>),
    /// An out-of-band push: RESP3 `>`, an array in RESP2.
    Push(Vec<Value>),
    Double(Vec<u8>),
    Boolean(bool),
    /// Anything else (verbatim strings, big numbers, attributes) kept as raw bytes.
    Raw(Vec<u8>),
}

impl Value {
    pub fn bulk(s: impl AsRef<[u8]>) -> Value {
        Value::Bulk(s.as_ref().to_vec())
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) | Value::Raw(b) => Some(b),
            _ => None,
        }
    }

    /// Elements of any aggregate (array, set, push; a map's keys and values interleaved).
    #[cfg(test)]
    pub fn elements(&self) -> Option<Vec<&Value>> {
        match self {
            Value::Array(v) | Value::Set(v) | Value::Push(v) => Some(v.iter().collect()),
            Value::Map(m) => Some(m.iter().flat_map(|(k, v)| [k, v]).collect()),
            _ => None,
        }
    }
}

/// Deepest nesting [`decode`] follows. Valkey's own replies nest a few levels, but a script
/// can return a table nested thousands deep; decoding (and encoding, and dropping) recurse,
/// so deeper values are not decoded: callers pass such a reply's bytes through as they are.
pub const MAX_DEPTH: usize = 128;

/// Decodes one complete value at the front of `buf`: the value and its length.
/// `None` if incomplete, malformed (the gateway only decodes Valkey's own replies) or nested
/// deeper than [`MAX_DEPTH`].
pub fn decode(buf: &[u8]) -> Option<(Value, usize)> {
    decode_nested(buf, 0)
}

/// [`decode`] of a value inside `depth` aggregates.
fn decode_nested(buf: &[u8], depth: usize) -> Option<(Value, usize)> {
    let kind = *buf.first()?;
    let cr = find_crlf(buf, 1)?;
    let line = &buf[1..cr];
    let next = cr + 2;
    let aggregate = |n: i64, buf: &[u8], mut pos: usize| -> Option<(Vec<Value>, usize)> {
        if depth >= MAX_DEPTH {
            return None;
        }
        let mut items = Vec::with_capacity(n.clamp(0, 1024) as usize);
        for _ in 0..n {
            let (v, len) = decode_nested(&buf[pos..], depth + 1)?;
            items.push(v);
            pos += len;
        }
        Some((items, pos))
    };
    Some(match kind {
        b'+' => (Value::Simple(line.to_vec()), next),
        b'-' => (Value::Error(line.to_vec()), next),
        b':' => (Value::Int(parse_int(line)?), next),
        b'_' => (Value::Null, next),
        b',' => (Value::Double(line.to_vec()), next),
        b'#' => (Value::Boolean(line == b"t"), next),
        b'$' | b'=' | b'!' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Some((Value::Null, next));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return None;
            }
            let body = buf[next..end].to_vec();
            let v = match kind {
                b'$' => Value::Bulk(body),
                b'!' => Value::Error(body),
                _ => Value::Raw(buf[..end + 2].to_vec()),
            };
            (v, end + 2)
        }
        b'*' | b'~' | b'>' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Some((Value::Null, next));
            }
            let (items, end) = aggregate(n, buf, next)?;
            let v = match kind {
                b'*' => Value::Array(items),
                b'~' => Value::Set(items),
                _ => Value::Push(items),
            };
            (v, end)
        }
        b'%' => {
            let n = parse_int(line)?;
            let (items, end) = aggregate(n * 2, buf, next)?;
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            (Value::Map(pairs), end)
        }
        _ => return None,
    })
}

/// Encodes `v` for a client speaking RESP `proto` (2 or 3).
pub fn encode(v: &Value, proto: u8, out: &mut BytesMut) {
    let header = |out: &mut BytesMut, kind: u8, n: usize| {
        out.extend_from_slice(&[kind]);
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    match v {
        Value::Simple(s) => line(out, b'+', s),
        Value::Error(s) => line(out, b'-', s),
        Value::Int(n) => line(out, b':', n.to_string().as_bytes()),
        Value::Bulk(b) => {
            header(out, b'$', b.len());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::Null if proto >= 3 => out.extend_from_slice(b"_\r\n"),
        Value::Null => out.extend_from_slice(b"$-1\r\n"),
        Value::Array(items) => {
            header(out, b'*', items.len());
            items.iter().for_each(|i| encode(i, proto, out));
        }
        Value::Set(items) | Value::Push(items) => {
            let kind = match (v, proto) {
                (_, 2) => b'*',
                (Value::Set(_), _) => b'~',
                _ => b'>',
            };
            header(out, kind, items.len());
            items.iter().for_each(|i| encode(i, proto, out));
        }
        Value::Map(pairs) => {
            if proto >= 3 {
                header(out, b'%', pairs.len());
            } else {
                header(out, b'*', pairs.len() * 2);
            }
            for (k, v) in pairs {
                encode(k, proto, out);
                encode(v, proto, out);
            }
        }
        Value::Double(d) if proto >= 3 => line(out, b',', d),
        Value::Double(d) => encode(&Value::Bulk(d.clone()), proto, out),
        Value::Boolean(b) if proto >= 3 => line(out, b'#', if *b { b"t" } else { b"f" }),
        Value::Boolean(b) => line(out, b':', if *b { b"1" } else { b"0" }),
        Value::Raw(raw) => out.extend_from_slice(raw),
    }
}

fn line(out: &mut BytesMut, kind: u8, body: &[u8]) {
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_both_protocols() {
        let v = Value::Map(vec![
            (Value::bulk("server"), Value::bulk("valkey")),
            (Value::bulk("proto"), Value::Int(3)),
            (Value::bulk("modules"), Value::Array(vec![])),
        ]);
        for proto in [2, 3] {
            let mut out = BytesMut::new();
            encode(&v, proto, &mut out);
            let (decoded, len) = decode(&out).unwrap();
            assert_eq!(len, out.len());
            if proto == 3 {
                assert_eq!(decoded, v);
            } else {
                assert_eq!(decoded.elements().unwrap().len(), 6);
            }
        }
        assert_eq!(decode(b"*2\r\n$1\r\na\r\n").map(|x| x.1), None, "incomplete");
    }

    /// A reply nested deeper than [`MAX_DEPTH`] (a script can return one thousands deep) is
    /// not decoded (callers pass its bytes through) instead of overflowing the stack.
    #[test]
    fn deep_nesting_fails_cleanly() {
        for open in [b"*1\r\n", b">1\r\n", b"%1\r\n", b"~1\r\n"] {
            let mut deep = open.repeat(1_000_000);
            deep.extend_from_slice(b":1\r\n");
            if open == b"%1\r\n" {
                deep.extend_from_slice(&b":2\r\n".repeat(1_000_000));
            }
            assert_eq!(decode(&deep), None);
        }
        let mut ok = b"*1\r\n".repeat(MAX_DEPTH);
        ok.extend_from_slice(b":1\r\n");
        let (v, len) = decode(&ok).expect("MAX_DEPTH levels decode");
        assert_eq!(len, ok.len());
        let mut out = BytesMut::new();
        encode(&v, 2, &mut out);
        assert_eq!(&out[..], &ok[..]);
        let mut too_deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        too_deep.extend_from_slice(b":1\r\n");
        assert_eq!(decode(&too_deep), None);
    }
}
