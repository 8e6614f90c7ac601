//! RESP framing without I/O: find where frames end, never rebuild what passes through.
//!
//! - [`request`]: client → gateway. Arrays of bulk strings (and inline commands), parsed
//!   incrementally so a 64 MB value arriving in many reads is scanned once.
//! - [`reply`]: Valkey → gateway. Any RESP2/RESP3 reply; only its boundary is found.

pub mod reply;
pub mod request;
pub mod value;

/// Writes a RESP simple error (`-<msg>\r\n`).
pub fn error(out: &mut bytes::BytesMut, msg: &str) {
    out.extend_from_slice(b"-");
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a RESP array of bulk strings, the form Valkey expects a command in.
pub fn command(out: &mut bytes::BytesMut, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses a RESP length line's number (ASCII, optional leading '-').
pub(crate) fn parse_int(line: &[u8]) -> Option<i64> {
    let (neg, digits) = match line.first() {
        Some(b'-') => (true, &line[1..]),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (b - b'0') as i64;
    }
    Some(if neg { -n } else { n })
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
pub(crate) fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let j = i + buf[i..].iter().position(|&b| b == b'\r')?;
        if j + 1 < buf.len() {
            if buf[j + 1] == b'\n' {
                return Some(j);
            }
            i = j + 1;
        } else {
            return None;
        }
    }
    None
}
